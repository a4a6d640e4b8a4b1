"""Runs on the host (untrusted): the daemon's serving loop, its linear algebra and weight loading,
and the in-process reference ops built on them."""
