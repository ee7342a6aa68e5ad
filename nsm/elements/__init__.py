"""Chain elements shared by several roles; one feature per module."""
