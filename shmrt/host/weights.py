"""LLaMA weight matrices for the daemon: from a checkpoint (safetensors or GGUF) or a seeded preset.
The norms and RoPE are not here: they are the enclave's half, which it reads from its own copy.

Projections are stored fused where the split asks for them together (q|k|v and gate|up), so a
BatchLinear of a group is one matrix product; a single projection is a row slice (a view).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model.checkpoint import ModelSource, resolve_model
from ..model.config import LlamaConfig, projection_cols, projection_rows
from ..errors import ModelError

GROUPS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))
MODULE_OF = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
             "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


@dataclass
class LayerWeights:
    fused: dict[tuple[str, ...], torch.Tensor]   # group -> [sum(rows), cols]


class LlamaWeights:
    def __init__(self, cfg: LlamaConfig, embed, layers, lm_head):
        self.cfg = cfg
        self.embed = embed
        self.layers: list[LayerWeights] = layers
        self.lm_head = lm_head
        self.source: ModelSource | None = None   # what it was loaded from (set by load_weights)
        rows = projection_rows(cfg)
        self._slices = {}
        for group in GROUPS:
            start = 0
            for name in group:
                self._slices[name] = (group, start, start + rows[name])
                start += rows[name]
        self._per_layer: dict[tuple[str, ...], list[list[torch.Tensor]]] = {}

    def projection(self, layer: int, names: list[str]) -> torch.Tensor | None:
        """One weight for `names` if they are consecutive in one fused group (a row slice), else None."""
        group, start, _ = self._slices[names[0]]
        end = start
        for name in names:
            g, s, e = self._slices[name]
            if g != group or s != end:
                return None
            end = e
        return self.layers[layer].fused[group][start:end]

    def projections(self, names: tuple[str, ...]) -> list[list[torch.Tensor]]:
        """Per layer, what a BatchLinear of `names` multiplies by: one weight (a row slice of a fused group)
        where the names are consecutive in one, else one weight per name. Views, worked out on first use
        and kept, so a call looks its weights up instead of slicing them."""
        per_layer = self._per_layer.get(names)
        if per_layer is None:
            fused = [self.projection(layer, list(names)) for layer in range(len(self.layers))]
            per_layer = [[w] if w is not None else [self.projection(layer, [n]) for n in names]
                         for layer, w in enumerate(fused)]
            self._per_layer[names] = per_layer
        return per_layer


# ---- loading

def _fuse(get, cfg: LlamaConfig, layer: int, dtype, device) -> LayerWeights:
    fused = {}
    for group in GROUPS:
        parts = [get(f"model.layers.{layer}.{MODULE_OF[n]}.{n}.weight") for n in group]
        fused[group] = torch.cat(parts, 0).to(device=device, dtype=dtype).contiguous()
    return LayerWeights(fused)


def _check_shapes(get, cfg: LlamaConfig) -> None:
    rows, cols = projection_rows(cfg), projection_cols(cfg)
    expected = {"model.embed_tokens.weight": (cfg.vocab_size, cfg.hidden_size)}
    for name in MODULE_OF:
        expected[f"model.layers.0.{MODULE_OF[name]}.{name}.weight"] = (rows[name], cols[name])
    for key, shape in expected.items():
        got = tuple(get(key).shape)
        if got != shape:
            raise ModelError(f"checkpoint tensor {key} has shape {got}, its config implies {shape}")


def load_checkpoint(source: ModelSource, *, dtype: torch.dtype, device: str) -> LlamaWeights:
    """Every weight matrix of a checkpoint (safetensors or GGUF, dequantized to `dtype`) on `device`."""
    cfg = source.cfg
    with source.tensors() as ckpt:
        get = ckpt.get
        _check_shapes(get, cfg)
        embed = get("model.embed_tokens.weight").to(device=device, dtype=dtype)
        layers = [_fuse(get, cfg, i, dtype, device) for i in range(cfg.num_hidden_layers)]
        untied = not cfg.tie_word_embeddings and "lm_head.weight" in ckpt
        lm_head = get("lm_head.weight").to(device=device, dtype=dtype) if untied else embed
    return LlamaWeights(cfg, embed, layers, lm_head)


def random_weights(cfg: LlamaConfig, *, seed: int, dtype: torch.dtype, device: str) -> LlamaWeights:
    """Seeded random weights of the config's shape, drawn on `device` (fast for large presets on GPU).
    The norms are not here: both sides derive them apart (model/checkpoint.py `preset_norms`)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    std = 0.02

    def normal(*shape) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, device=device, dtype=torch.float32) * std).to(dtype)

    rows, cols = projection_rows(cfg), projection_cols(cfg)
    embed = normal(cfg.vocab_size, cfg.hidden_size)
    layers = [LayerWeights({g: normal(sum(rows[n] for n in g), cols[g[0]]) for g in GROUPS})
              for _ in range(cfg.num_hidden_layers)]
    lm_head = embed if cfg.tie_word_embeddings else normal(cfg.vocab_size, cfg.hidden_size)
    return LlamaWeights(cfg, embed, layers, lm_head)


def load_weights(spec: str | ModelSource, *, layers: int | None = None, dtype: torch.dtype = torch.float32,
                 device: str = "cpu", seed: int = 0) -> LlamaWeights:
    source = spec if isinstance(spec, ModelSource) else resolve_model(spec, layers, seed)
    if source.kind == "preset":
        weights = random_weights(source.cfg, seed=source.seed, dtype=dtype, device=device)
    else:
        weights = load_checkpoint(source, dtype=dtype, device=device)
    weights.source = source
    return weights
