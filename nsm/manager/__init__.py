"""The network service manager (nsmgr): one per node."""
