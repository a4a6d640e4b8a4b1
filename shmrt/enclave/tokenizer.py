"""Prompt text <-> token ids on the enclave side (the prompt never leaves it as text)."""
from __future__ import annotations

import pathlib

from ..errors import ModelError


class ByteTokenizer:
    """For presets without a tokenizer: UTF-8 bytes as ids (needs vocab >= 256)."""

    def __init__(self, vocab_size: int):
        if vocab_size < 256:
            raise ModelError(f"--prompt needs a tokenizer: vocab {vocab_size} is too small for bytes; "
                             "use --token-ids or --prefill")

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", "replace")


class HFTokenizer:
    def __init__(self, path: pathlib.Path):
        from tokenizers import Tokenizer
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as exc:
            raise ModelError(f"cannot load tokenizer {path}: {exc}") from None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)


def load_tokenizer(path: str | None, vocab_size: int):
    """tokenizer.json (a file, or a checkpoint directory holding one), else bytes."""
    if path:
        p = pathlib.Path(path)
        if p.is_dir():
            p = p / "tokenizer.json"
        if p.is_file():
            return HFTokenizer(p)
        if path:
            raise ModelError(f"--tokenizer {path}: no tokenizer.json there")
    return ByteTokenizer(vocab_size)
