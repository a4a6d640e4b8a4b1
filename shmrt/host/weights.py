"""LLaMA weights for the daemon: HuggingFace safetensors checkpoints or seeded random presets.

Projections are stored fused where the split asks for them together (q|k|v and gate|up), so a
BatchLinear of a group is one matrix product; a single projection is a row slice (a view).
"""
from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass

import torch

from ..model.checkpoint import resolve_model
from ..model.config import LlamaConfig, projection_cols, projection_rows
from ..errors import ModelError

GROUPS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))
MODULE_OF = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
             "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


@dataclass
class LayerWeights:
    fused: dict[tuple[str, ...], torch.Tensor]   # group -> [sum(rows), cols]
    input_norm: torch.Tensor
    post_norm: torch.Tensor


class LlamaWeights:
    def __init__(self, cfg: LlamaConfig, embed, layers, norm, lm_head):
        self.cfg = cfg
        self.embed = embed
        self.layers: list[LayerWeights] = layers
        self.norm = norm
        self.lm_head = lm_head
        rows = projection_rows(cfg)
        self._slices = {}
        for group in GROUPS:
            start = 0
            for name in group:
                self._slices[name] = (group, start, start + rows[name])
                start += rows[name]

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

    def norms(self) -> torch.Tensor:
        """[2L+1, D] float32: input and post-attention norm of each layer, then the final norm."""
        rows = []
        for lw in self.layers:
            rows += [lw.input_norm, lw.post_norm]
        rows.append(self.norm)
        return torch.stack([r.float().cpu() for r in rows])


# ---- loading

def _fuse(get, cfg: LlamaConfig, layer: int, dtype, device) -> LayerWeights:
    fused = {}
    for group in GROUPS:
        parts = [get(f"model.layers.{layer}.{MODULE_OF[n]}.{n}.weight") for n in group]
        fused[group] = torch.cat(parts, 0).to(device=device, dtype=dtype).contiguous()
    return LayerWeights(fused,
                        get(f"model.layers.{layer}.input_layernorm.weight").to(device=device, dtype=torch.float32),
                        get(f"model.layers.{layer}.post_attention_layernorm.weight").to(device=device, dtype=torch.float32))


def _check_shapes(get, cfg: LlamaConfig) -> None:
    rows, cols = projection_rows(cfg), projection_cols(cfg)
    expected = {"model.embed_tokens.weight": (cfg.vocab_size, cfg.hidden_size), "model.norm.weight": (cfg.hidden_size,)}
    for name in MODULE_OF:
        expected[f"model.layers.0.{MODULE_OF[name]}.{name}.weight"] = (rows[name], cols[name])
    for key, shape in expected.items():
        got = tuple(get(key).shape)
        if got != shape:
            raise ModelError(f"checkpoint tensor {key} has shape {got}, config.json implies {shape}")


def load_checkpoint(path: pathlib.Path, cfg: LlamaConfig, *, dtype: torch.dtype, device: str) -> LlamaWeights:
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError) as exc:
            raise ModelError(f"{index} is not a safetensors index: {exc}") from None
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{path} has no *.safetensors weights (a .bin/.pth checkpoint must be converted first)")
    handles = {}
    where: dict[str, str] = {}
    try:
        for f in files:
            fp = path / f
            if not fp.is_file():
                raise ModelError(f"{path}: shard {f} named in the index is missing")
            handles[f] = safe_open(str(fp), framework="pt", device="cpu")
            for key in handles[f].keys():
                where[key] = f
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"cannot read safetensors in {path}: {exc}") from None

    def get(key: str) -> torch.Tensor:
        if key not in where:
            raise ModelError(f"checkpoint {path} lacks tensor {key}: is it a LLaMA checkpoint?")
        return handles[where[key]].get_tensor(key)

    _check_shapes(get, cfg)
    embed = get("model.embed_tokens.weight").to(device=device, dtype=dtype)
    layers = [_fuse(get, cfg, i, dtype, device) for i in range(cfg.num_hidden_layers)]
    norm = get("model.norm.weight").to(device=device, dtype=torch.float32)
    if cfg.tie_word_embeddings or "lm_head.weight" not in where:
        lm_head = embed
    else:
        lm_head = get("lm_head.weight").to(device=device, dtype=dtype)
    return LlamaWeights(cfg, embed, layers, norm, lm_head)


def random_weights(cfg: LlamaConfig, *, seed: int, dtype: torch.dtype, device: str) -> LlamaWeights:
    """Seeded random weights of the config's shape, drawn on `device` (fast for large presets on GPU)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    std = 0.02

    def normal(*shape) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, device=device, dtype=torch.float32) * std).to(dtype)

    def norm_weight() -> torch.Tensor:
        return 1.0 + 0.1 * torch.randn(cfg.hidden_size, generator=gen, device=device, dtype=torch.float32)

    rows, cols = projection_rows(cfg), projection_cols(cfg)
    embed = normal(cfg.vocab_size, cfg.hidden_size)
    layers = []
    for _ in range(cfg.num_hidden_layers):
        fused = {g: normal(sum(rows[n] for n in g), cols[g[0]]) for g in GROUPS}
        layers.append(LayerWeights(fused, norm_weight(), norm_weight()))
    norm = norm_weight()
    lm_head = embed if cfg.tie_word_embeddings else normal(cfg.vocab_size, cfg.hidden_size)
    return LlamaWeights(cfg, embed, layers, norm, lm_head)


def load_weights(spec: str, *, layers: int | None = None, dtype: torch.dtype = torch.float32,
                 device: str = "cpu", seed: int = 0) -> LlamaWeights:
    cfg, path = resolve_model(spec, layers)
    if path is None:
        return random_weights(cfg, seed=seed, dtype=dtype, device=device)
    return load_checkpoint(path, cfg, dtype=dtype, device=device)
