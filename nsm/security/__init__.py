"""Identities (X.509-SVIDs), mTLS, path tokens and authorization.

- :mod:`~nsm.security.ids`: SPIFFE IDs and the IDs of the mesh's own daemons;
- :mod:`~nsm.security.svid`: an SVID and its checks; :mod:`~nsm.security.ca`: the built-in CA;
- :mod:`~nsm.security.sources`: where an SVID comes from (built-in CA, PEM files, Workload API);
- :mod:`~nsm.security.tls`: :class:`Security`, the credentials of every listen and dial and the
  caller's identity; :mod:`~nsm.security.options`: the flags every command shares.
"""
