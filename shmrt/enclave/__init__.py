"""Runs inside the enclave (trusted): the client session, the model's non-linear half, the remote
ops, the tokenizer and sampling. Its import closure is the code Gramine measures: it never imports
`shmrt.host` (a test pins that)."""
