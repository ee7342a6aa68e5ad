"""CNI: the thin ``nsm-cni`` plugin (:mod:`nsm.cni.plugin`, standard library only), the node
agent that does the work (:mod:`nsm.cni.agent`, ``nsm cni-agent``) and what both share about
the CNI spec (:mod:`nsm.cni.spec`, standard library only).

This package's ``__init__`` imports nothing, so that the plugin starts without gRPC or protobuf.
"""
