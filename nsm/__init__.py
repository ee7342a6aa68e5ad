"""A Python Network Service Mesh, wire-compatible with the networkservicemesh.io v1 API."""

from __future__ import annotations

__version__ = "0.1.0"
