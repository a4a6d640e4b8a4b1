"""Used by both sides: the rings, the doorbell protocol, the C helper binding and the transports.

Nothing here knows what a LLaMA is; it moves tensors and validates every byte a peer wrote.
"""
