"""Prompt text <-> token ids on the enclave side (the prompt never leaves it as text).

Where the tokenizer comes from, in order: `--tokenizer` (a tokenizer.json or a directory holding
one), the model's own (tokenizer.json beside a HuggingFace checkpoint; for a GGUF file, built from
its metadata), else UTF-8 bytes for presets.
"""
from __future__ import annotations

import pathlib

from ..errors import ModelError
from ..model.checkpoint import ModelSource


class ByteTokenizer:
    """For presets without a tokenizer: UTF-8 bytes as ids (needs vocab >= 256)."""

    eos_token_id = None
    chat_template = None

    def __init__(self, vocab_size: int):
        if vocab_size < 256:
            raise ModelError(f"--prompt needs a tokenizer: vocab {vocab_size} is too small for bytes; "
                             "use --token-ids or --prefill")

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", "replace")


class HFTokenizer:
    """A `tokenizers.Tokenizer` (from tokenizer.json or a GGUF file), with the model's EOS and chat template."""

    def __init__(self, tok, *, eos_token_id: int | None = None, chat_template: str | None = None):
        self._tok = tok
        self.eos_token_id = eos_token_id
        self.chat_template = chat_template

    @classmethod
    def from_file(cls, path: pathlib.Path) -> "HFTokenizer":
        from tokenizers import Tokenizer
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as exc:
            raise ModelError(f"cannot load tokenizer {path}: {exc}") from None
        config = _tokenizer_config(path.parent)
        eos = config.get("eos_token")
        eos = eos.get("content") if isinstance(eos, dict) else eos
        template = config.get("chat_template")
        return cls(tok, eos_token_id=tok.token_to_id(eos) if isinstance(eos, str) else None,
                   chat_template=template if isinstance(template, str) else None)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


def _tokenizer_config(folder: pathlib.Path) -> dict:
    import json
    path = folder / "tokenizer_config.json"
    try:
        config = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def load_tokenizer(path: str | None, source: ModelSource):
    if path:
        p = pathlib.Path(path)
        if p.is_dir():
            p = p / "tokenizer.json"
        if not p.is_file():
            raise ModelError(f"--tokenizer {path}: no tokenizer.json there")
        return HFTokenizer.from_file(p)
    if source.kind == "gguf":
        from ..model.gguf_checkpoint import GGUFCheckpoint
        with GGUFCheckpoint(source.path) as ckpt:
            return HFTokenizer(ckpt.tokenizer(), eos_token_id=ckpt.eos_token_id, chat_template=ckpt.chat_template)
    if source.kind == "hf" and (source.path / "tokenizer.json").is_file():
        return HFTokenizer.from_file(source.path / "tokenizer.json")
    return ByteTokenizer(source.cfg.vocab_size)


def apply_chat_template(tok, prompt: str) -> str:
    """One user turn rendered with the model's chat template, ready for the assistant's answer."""
    if not tok.chat_template:
        raise ModelError("--chat: this model ships no chat template; drop --chat to send the prompt as it is")
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    try:
        template = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(tok.chat_template)
        return template.render(messages=[{"role": "user", "content": prompt}], add_generation_prompt=True,
                               bos_token="", eos_token="")
    except Exception as exc:  # a template of the model's that jinja2 cannot render
        raise ModelError(f"--chat: the model's chat template does not render ({type(exc).__name__}: {exc})") from None
