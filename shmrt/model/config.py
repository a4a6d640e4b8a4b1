"""LLaMA configuration: a dataclass, a preset table, HuggingFace config.json parsing, RoPE tables."""
from __future__ import annotations

import dataclasses
import math
import pathlib
from dataclasses import dataclass

import torch

from ..errors import ModelError, ProtocolError, describe
from ..wire.untrusted import load_json
from .calls import PROJECTIONS


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
        """Parse a transformers config.json (4.x `rope_theta`/`rope_scaling` or 5.x `rope_parameters`).
        Values are taken as written, never coerced: a string, a bool or a fraction where an integer
        belongs is an error, as is any number out of range (huge ints included, without OverflowError)."""
        if not isinstance(hf, dict):
            raise ModelError(f"config.json must be a JSON object, got {type(hf).__name__}")
        model_type = hf.get("model_type")
        if model_type not in (None, "llama"):
            raise ModelError(f"config.json says model_type {describe(model_type)}; shmrt runs LLaMA models "
                             "(model_type 'llama')")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if key not in hf:
                raise ModelError(f"config.json has no {key!r}: not a LLaMA config")
        heads, hidden = _check_int(hf, "num_attention_heads"), _check_int(hf, "hidden_size")
        head_dim = hf.get("head_dim")
        if head_dim is None:  # implied: the hidden size split evenly over the heads
            if hidden % heads:
                raise ModelError(f"config.json has no head_dim and hidden_size {hidden} is not a multiple of "
                                 f"num_attention_heads {heads}")
            head_dim = hidden // heads
        rope = hf.get("rope_parameters")
        if rope is not None and not isinstance(rope, dict):
            raise ModelError(f"config.json rope_parameters must be an object, got {type(rope).__name__}")
        rope = dict(rope or {})
        theta = rope.pop("rope_theta", None)
        if theta is None:
            theta = hf.get("rope_theta", 10000.0)
        scaling = hf.get("rope_scaling")
        if scaling is None and rope.get("rope_type", rope.get("type", "default")) != "default":
            scaling = rope
        if scaling is not None:
            if not isinstance(scaling, dict):
                raise ModelError(f"config.json rope_scaling must be an object, got {type(scaling).__name__}")
            scaling = dict(scaling)
            kind = scaling.pop("type", None)  # the 4.x spelling of rope_type
            scaling["rope_type"] = scaling.get("rope_type", kind)
            if scaling["rope_type"] in (None, "default") and set(scaling) == {"rope_type"}:
                scaling = None
        kv_heads = hf.get("num_key_value_heads")
        cfg = cls(
            vocab_size=hf["vocab_size"], hidden_size=hidden, intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"], num_attention_heads=heads,
            num_key_value_heads=heads if kv_heads is None else kv_heads, head_dim=head_dim,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=theta, rope_scaling=scaling,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=hf.get("tie_word_embeddings", False), name=name)
        cfg.validate()
        if isinstance(cfg.rms_norm_eps, int) or isinstance(cfg.rope_theta, int):  # JSON wrote 1 for 1.0
            cfg = dataclasses.replace(cfg, rms_norm_eps=float(cfg.rms_norm_eps), rope_theta=float(cfg.rope_theta))
        return cfg

    @classmethod
    def from_dict(cls, d: dict) -> "LlamaConfig":
        """Rebuild from `to_dict()` output (e.g. a daemon's Hello): unknown keys and bad values are errors."""
        if not isinstance(d, dict):
            raise ModelError(f"model config must be a mapping, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = [k for k in d if k not in names]
        if unknown:
            raise ModelError(f"model config has unexpected fields {', '.join(describe(k) for k in unknown[:5])}")
        cfg = cls(**d)  # every key is a field name; types and ranges are validate()'s job
        cfg.validate()
        return cfg

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> "LlamaConfig":
        """Type- and range-check every field (the values may come from an untrusted file or peer)."""
        for key, (lo, hi) in INT_RANGES.items():
            _check_int(self, key, lo, hi)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ModelError(f"head_dim {self.head_dim} must be even for RoPE")
        for key, (lo, hi) in FLOAT_RANGES.items():
            _check_number(self, key, lo, hi)
        if type(self.tie_word_embeddings) is not bool:
            raise ModelError(f"model config tie_word_embeddings={describe(self.tie_word_embeddings)} must be true or false")
        if not isinstance(self.name, str) or not 0 < len(self.name) <= 256 or not self.name.isprintable():
            raise ModelError(f"model config name {describe(self.name)} must be 1-256 printable characters")
        if self.rope_scaling is not None:
            self._validate_rope_scaling()
        return self

    def _validate_rope_scaling(self) -> None:
        scaling = self.rope_scaling
        if not isinstance(scaling, dict):
            raise ModelError(f"model config rope_scaling={describe(scaling)} must be a mapping or null")
        kind = scaling.get("rope_type")
        if not isinstance(kind, str) or kind not in ROPE_FIELDS:
            raise ModelError(f"rope scaling type {describe(kind)} is not supported (one of {', '.join(ROPE_FIELDS)})")
        fields = ROPE_FIELDS[kind]
        extra = [k for k in scaling if k != "rope_type" and k not in fields]
        missing = [k for k in fields if k not in scaling]
        if extra or missing:
            raise ModelError(f"{kind} rope scaling takes exactly {', '.join(fields)}; "
                             f"unexpected {', '.join(describe(k) for k in extra[:5]) or 'none'}, "
                             f"missing {', '.join(missing) or 'none'}")
        for key, (lo, hi) in fields.items():
            if key == "original_max_position_embeddings":
                _check_int(scaling, key, lo, hi, where="rope_scaling")
            else:
                _check_number(scaling, key, lo, hi, where="rope_scaling")
        if kind == "llama3" and not scaling["low_freq_factor"] < scaling["high_freq_factor"]:
            raise ModelError(f"llama3 rope scaling needs low_freq_factor < high_freq_factor, got "
                             f"{scaling['low_freq_factor']} and {scaling['high_freq_factor']}")

    def with_layers(self, layers: int | None) -> "LlamaConfig":
        if layers is None:
            return self
        if not 1 <= layers <= self.num_hidden_layers:
            raise ModelError(f"--layers {layers}: the model has {self.num_hidden_layers} layers")
        return dataclasses.replace(self, num_hidden_layers=layers)


# ---- field checks (the config may come from an untrusted file or peer)

INT_RANGES = {
    "vocab_size": (1, 1 << 22), "hidden_size": (1, 1 << 16), "intermediate_size": (1, 1 << 18),
    "num_hidden_layers": (1, 1024), "num_attention_heads": (1, 1024), "num_key_value_heads": (1, 1024),
    "head_dim": (2, 1024), "max_position_embeddings": (1, 1 << 24),
}
FLOAT_RANGES = {"rms_norm_eps": (1e-12, 1e-1), "rope_theta": (1.0, 1e10)}
ROPE_FIELDS = {  # rope_type -> {field: (lo, hi)}, every field required
    "linear": {"factor": (1.0, 1024.0)},
    "llama3": {"factor": (1.0, 1024.0), "low_freq_factor": (1e-3, 1e3), "high_freq_factor": (1e-3, 1e3),
               "original_max_position_embeddings": (1, 1 << 24)},
}


def _get(obj, key: str):
    return obj[key] if isinstance(obj, dict) else getattr(obj, key)


def _check_int(obj, key: str, lo: int | None = None, hi: int | None = None, where: str = "model config") -> int:
    """An int (never a bool, float or string) in [lo, hi]; comparisons only, so a huge int is just out of range."""
    lo, hi = (lo, hi) if lo is not None else INT_RANGES[key]
    value = _get(obj, key)
    if type(value) is not int or not lo <= value <= hi:
        raise ModelError(f"{where} {key}={describe(value)} must be an integer in [{lo}, {hi}]")
    return value


def _check_number(obj, key: str, lo: float, hi: float, where: str = "model config") -> float:
    """A finite int or float (never a bool) in [lo, hi]."""
    value = _get(obj, key)
    if type(value) not in (int, float) or not lo <= value <= hi:  # NaN fails the comparison, inf the range
        raise ModelError(f"{where} {key}={describe(value)} must be a number in [{lo:g}, {hi:g}]")
    return value


# ---- projection shapes (what each weight matrix of a layer maps)

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
        hf = load_json(cfg_path.read_text(errors="replace"), str(cfg_path))
    except ProtocolError as exc:
        raise ModelError(str(exc)) from None
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

