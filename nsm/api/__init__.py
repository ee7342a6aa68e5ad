"""Generated protobuf/gRPC code for the networkservicemesh.io v1 API.

Regenerate with ``python -m nsm.api.generate`` after editing ``api/*.proto``.
"""
