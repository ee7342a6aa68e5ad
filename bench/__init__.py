"""Benchmarks of the mesh against the raw kernel floor: ``python -m bench.run`` (``./dev bench``).

- :mod:`bench.local_setup`: local connection setup/close through the real daemons, with the
  raw netlink floor (:mod:`bench.netlink_floor`) measured in the same run.
"""
