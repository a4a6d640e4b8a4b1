"""Which model a `--model` argument names: a preset, or a checkpoint on disk. Both sides resolve it
on their own copy (the enclave never takes its half of the model from the host)."""
from __future__ import annotations

import pathlib

from ..errors import ModelError
from .config import PRESETS, LlamaConfig, read_hf_config


def resolve_model(spec: str, layers: int | None = None) -> tuple[LlamaConfig, pathlib.Path | None]:
    """A preset name or a checkpoint directory -> (config, path or None)."""
    if spec in PRESETS:
        return LlamaConfig.from_name(spec).with_layers(layers), None
    path = pathlib.Path(spec).expanduser()
    if not path.exists():
        raise ModelError(f"--model {spec!r} is neither a preset ({', '.join(PRESETS)}) nor an existing directory")
    if not path.is_dir():
        raise ModelError(f"--model {spec}: expected a checkpoint directory (config.json + *.safetensors)")
    return read_hf_config(path).with_layers(layers), path
