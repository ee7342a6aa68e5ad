"""The kernel: network namespaces (:mod:`nsm.kernel.netns`), netlink (:mod:`nsm.kernel.netlink`,
the only user of pyroute2), ICMP from inside a namespace (:mod:`nsm.kernel.ping`) and the
data-plane liveness check of connections (:mod:`nsm.kernel.liveness`).

The forwarder programs the datapath through these; the lab, the benchmarks and the tests use
them to build and inspect what they need. Nothing here depends on a role of the mesh.
"""
