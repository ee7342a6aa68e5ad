"""Names shared by the daemons: headers, labels and service names of our conventions."""

from __future__ import annotations

#: gRPC header from a manager telling its forwarder which URL to dial for the next hop.
NEXT_HOP_HEADER = "nsm-next-hop-url"
#: Network service under which forwarders register.
FORWARDER_SERVICE = "forwarder"
#: Forwarder label: the URL of the manager it serves.
MANAGER_URL_LABEL = "nsmgrURL"
#: Connection/forwarder label: the node name.
NODE_LABEL = "nodeName"
