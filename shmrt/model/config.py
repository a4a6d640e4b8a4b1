"""LLaMA configuration: a dataclass, a preset table, HuggingFace config.json parsing, RoPE tables."""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from dataclasses import dataclass

import torch

from ..errors import ModelError


@dataclass
class LlamaConfig:
    vocab_size: int = 512
    hidden_size: int = 64
    intermediate_size: int = 176
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 16
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None      # {"rope_type": "llama3", "factor", "low_freq_factor", ...}
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    name: str = "custom"

    @property
    def groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_name(cls, name: str) -> "LlamaConfig":
        if name not in PRESETS:
            raise ModelError(f"unknown preset {name!r}; presets are {', '.join(PRESETS)} "
                             "(or pass a HuggingFace checkpoint directory)")
        return dataclasses.replace(PRESETS[name], name=name)

    @classmethod
    def from_hf(cls, hf: dict, name: str = "custom") -> "LlamaConfig":
        """Parse a transformers config.json (4.x `rope_theta`/`rope_scaling` or 5.x `rope_parameters`)."""
        model_type = hf.get("model_type")
        if model_type not in (None, "llama"):
            raise ModelError(f"config.json says model_type {model_type!r}; shmrt runs LLaMA models (model_type 'llama')")
        try:
            heads = int(hf["num_attention_heads"])
            hidden = int(hf["hidden_size"])
            rope = dict(hf.get("rope_parameters") or {})
            scaling = hf.get("rope_scaling") or None
            theta = rope.pop("rope_theta", None) or hf.get("rope_theta", 10000.0)
            rope_type = rope.get("rope_type") or rope.get("type") or "default"
            if scaling is None and rope_type != "default":
                scaling = rope
            if scaling is not None:
                scaling = dict(scaling)
                scaling["rope_type"] = scaling.get("rope_type") or scaling.get("type")
                if scaling["rope_type"] in (None, "default"):
                    scaling = None
            cfg = cls(
                vocab_size=int(hf["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(hf["intermediate_size"]),
                num_hidden_layers=int(hf["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(hf.get("num_key_value_heads") or heads),
                head_dim=int(hf.get("head_dim") or hidden // heads),
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                rope_theta=float(theta),
                rope_scaling=scaling,
                max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                name=name,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"config.json is missing or has a bad LLaMA field: {exc}") from None
        cfg.validate()
        return cfg

    @classmethod
    def from_dict(cls, d: dict) -> "LlamaConfig":
        """Rebuild from `to_dict()` output (e.g. a daemon's Hello): unknown keys and bad values are errors."""
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(d, dict) or set(d) - names:
            raise ModelError(f"model config has unexpected fields {sorted(set(d) - names) if isinstance(d, dict) else d!r}")
        try:
            cfg = cls(**d)
        except TypeError as exc:
            raise ModelError(f"bad model config: {exc}") from None
        cfg.validate()
        return cfg

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> "LlamaConfig":
        ints = {
            "vocab_size": (1, 1 << 22), "hidden_size": (1, 1 << 16), "intermediate_size": (1, 1 << 18),
            "num_hidden_layers": (1, 1024), "num_attention_heads": (1, 1024), "num_key_value_heads": (1, 1024),
            "head_dim": (1, 1024), "max_position_embeddings": (1, 1 << 24),
        }
        for key, (lo, hi) in ints.items():
            value = getattr(self, key)
            if type(value) is not int or not lo <= value <= hi:
                raise ModelError(f"model config {key}={value!r} is outside [{lo}, {hi}]")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ModelError(f"head_dim {self.head_dim} must be even for RoPE")
        for key in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ModelError(f"model config {key}={value!r} must be a positive number")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type") if isinstance(self.rope_scaling, dict) else None
            if kind not in ("llama3", "linear"):
                raise ModelError(f"rope scaling {self.rope_scaling!r} is not supported (llama3 or linear)")
        return self

    def with_layers(self, layers: int | None) -> "LlamaConfig":
        if layers is None:
            return self
        if not 1 <= layers <= self.num_hidden_layers:
            raise ModelError(f"--layers {layers}: the model has {self.num_hidden_layers} layers")
        return dataclasses.replace(self, num_hidden_layers=layers)


# ---- projection shapes (what each weight matrix of a layer maps)

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def projection_rows(cfg: LlamaConfig) -> dict[str, int]:
    hd = cfg.head_dim
    return {"q_proj": cfg.num_attention_heads * hd, "k_proj": cfg.num_key_value_heads * hd,
            "v_proj": cfg.num_key_value_heads * hd, "o_proj": cfg.hidden_size,
            "gate_proj": cfg.intermediate_size, "up_proj": cfg.intermediate_size, "down_proj": cfg.hidden_size}


def projection_cols(cfg: LlamaConfig) -> dict[str, int]:
    cols = {name: cfg.hidden_size for name in PROJECTIONS}
    cols["o_proj"] = cfg.num_attention_heads * cfg.head_dim
    cols["down_proj"] = cfg.intermediate_size
    return cols


PRESETS: dict[str, LlamaConfig] = {
    # Seconds on 2 CPU cores; GQA and tied embeddings so the default run exercises both.
    "tiny": LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=10000.0,
                        max_position_embeddings=2048, tie_word_embeddings=True),
    # A CPU-benchmark size: attention at 1024 tokens is 32 MiB per layer in fp32.
    "small": LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=4, head_dim=64, rope_theta=500000.0,
                         max_position_embeddings=4096, tie_word_embeddings=False),
    # The real shape of Llama-3.2-1B (weights random, seeded).
    "llama3.2-1b": LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                               num_attention_heads=32, num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5,
                               rope_theta=500000.0,
                               rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                               max_position_embeddings=131072, tie_word_embeddings=True),
}


def read_hf_config(path: pathlib.Path) -> LlamaConfig:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise ModelError(f"{path} has no config.json: expected a HuggingFace LLaMA checkpoint directory "
                         f"(config.json + *.safetensors [+ tokenizer.json]) or a preset name ({', '.join(PRESETS)})")
    try:
        hf = json.loads(cfg_path.read_text())
    except ValueError as exc:
        raise ModelError(f"{cfg_path} is not valid JSON: {exc}") from None
    return LlamaConfig.from_hf(hf, name=path.name)


# ---- RoPE

def rope_inv_freq(cfg: LlamaConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim/2] (float32) and the attention scaling, as transformers computes them."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = cfg.rope_scaling
    if scaling is None:
        return inv_freq, 1.0
    if scaling["rope_type"] == "linear":
        return inv_freq / float(scaling["factor"]), 1.0
    factor = float(scaling["factor"])
    low = float(scaling["low_freq_factor"])
    high = float(scaling["high_freq_factor"])
    old_ctx = float(scaling["original_max_position_embeddings"])
    low_wavelen = old_ctx / low
    high_wavelen = old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled), 1.0

