"""The enclave model with in-process ops against transformers' LlamaForCausalLM."""
import pytest
import torch

from conftest import check_close, random_ids
from shmrt.host.compute import LinearCompute
from shmrt.model.config import LlamaConfig
from shmrt.errors import ModelError, ProtocolError
from shmrt.enclave.generate import Sampler, generate, greedy
from shmrt.enclave.llama import EnclaveModel, add_residual, rms_norm
from shmrt.host.local_ops import LocalOps
from shmrt.host.weights import load_weights
from shmrt.model.checkpoint import load_enclave_part, resolve_model


def local_model(path, kv_cache="daemon", calls="fewest", score_step=1):
    w = load_weights(str(path))
    compute = LinearCompute(w, "cpu", torch.float32)
    return EnclaveModel(load_enclave_part(w.source), LocalOps(compute), kv_cache, calls, score_step=score_step)


@pytest.mark.parametrize("calls", ["fewest", "fused", "v2.4"])
@pytest.mark.parametrize("name", ["gqa-tied-llama3", "untied-mha-legacy", "sharded-gqa"])
def test_prefill_logits_match_transformers(checkpoints, name, calls):
    path, hf = checkpoints[name]
    ids = random_ids(40, 320, seed=1)
    with torch.no_grad():
        ref = hf(ids).logits[:, -1]
    got = local_model(path, calls=calls).forward(ids, 0)
    check_close(f"{name}/{calls}", got, ref, 1e-5)


@pytest.mark.parametrize("calls", ["fewest", "fused", "v2.4"])
@pytest.mark.parametrize("kv_cache", ["client", "daemon"])
def test_greedy_generation_matches_transformers(checkpoints, kv_cache, calls):
    path, hf = checkpoints["gqa-tied-llama3"]
    ids = random_ids(20, 320, seed=2)
    with torch.no_grad():
        ref = hf.generate(ids, max_new_tokens=8, do_sample=False)[0, 20:].tolist()
    got = generate(local_model(path, kv_cache, calls), ids, 8, Sampler()).tokens
    assert got == ref


@pytest.mark.parametrize("step", [8, 256])
def test_padded_decode_scores_give_transformers_tokens_also_after_a_restart(checkpoints, step):
    """Decode scores padded to a multiple of `step` (model/calls.py: the K/V store's zero rows, -inf over the padding
    in the reply, P as wide): transformers' tokens; then a shorter sequence from pos 0 in the same K/V store (whose
    rows past the new ones must be zeros again) and one that starts with a single, padded, position."""
    path, hf = checkpoints["gqa-tied-llama3"]
    model = local_model(path, score_step=step)
    for n, seed in ((20, 2), (3, 4), (1, 6)):
        ids = random_ids(n, 320, seed=seed)
        with torch.no_grad():
            ref = hf.generate(ids, max_new_tokens=12, do_sample=False)[0, n:].tolist()
        assert generate(model, ids, 12, Sampler()).tokens == ref, (n, step)


def test_the_daemons_score_width_step_is_a_bounded_power_of_two_or_nothing():
    from shmrt.model.calls import MAX_SCORE_WIDTH_STEP, padded_width, score_width_step
    assert [score_width_step(h) for h in (256, 1, MAX_SCORE_WIDTH_STEP)] == [256, 1, MAX_SCORE_WIDTH_STEP]
    for hostile in (None, 0, -256, 3, 96, 2 * MAX_SCORE_WIDTH_STEP, 1 << 40, 256.0, "256", True, [256]):
        assert score_width_step(hostile) == 1, hostile
    assert [padded_width(n, 8) for n in (1, 8, 9)] == [8, 8, 16] and padded_width(5, 1) == 5


@pytest.mark.parametrize("kv_cache", ["client", "daemon"])
def test_one_shot_prefill_equals_token_by_token(kv_cache):
    """Without a causal mask earlier positions see the future and the two paths disagree (v2.4's bug)."""
    w = load_weights("tiny")
    compute = LinearCompute(w, "cpu", torch.float32)
    ids = random_ids(16, w.cfg.vocab_size, seed=5)
    one_shot = EnclaveModel(load_enclave_part(w.source), LocalOps(compute), kv_cache).forward(ids, 0)
    stepwise = EnclaveModel(load_enclave_part(w.source), LocalOps(compute), kv_cache)
    logits = stepwise.forward(ids[:, :6], 0)
    for pos in range(6, 16):
        logits = stepwise.forward(ids[:, pos:pos + 1], pos)
    check_close("one-shot vs stepwise", logits, one_shot, 1e-5)


@pytest.mark.parametrize("out_dtype", [None, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e4])
def test_one_row_rms_norm_matches_transformers_norm(out_dtype, scale):
    """The decode step's one-row path against HF's LlamaRMSNorm (and the many-row path, F.rms_norm)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    g = torch.Generator().manual_seed(int(scale * 7))
    hf = LlamaRMSNorm(2048, eps=1e-5)
    with torch.no_grad():
        hf.weight.copy_(torch.randn(2048, generator=g))
        rows = torch.randn(3, 1, 2048, generator=g) * scale
        for x in (rows[:1], rows):          # one row: the fast path; three: F.rms_norm
            ref = hf(x)
            out = None if out_dtype is None else torch.empty(x.shape, dtype=out_dtype)
            got = rms_norm(x, hf.weight, 1e-5, out=out)
            assert out is None or got.data_ptr() == out.data_ptr()
            tolerance = 1e-6 if out_dtype in (None, torch.float32) else 8e-3
            assert ((got.float() - ref).abs().max() / ref.abs().max()).item() < tolerance


@pytest.mark.parametrize("out_dtype", [None, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("position", [0, 7, 131071])
def test_one_position_rope_as_a_product_matches_transformers(out_dtype, position):
    """A decode step's RoPE, one [hd, hd] product per tensor, against HF's apply_rotary_pos_emb (llama3 scaling)
    and the elementwise path of a prefill; q's rotation carries the attention scale."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    from shmrt.enclave.llama import rope_tables
    g = torch.Generator().manual_seed(position)
    hd, scale = 64, 64 ** -0.5
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    q = torch.randn(2, 1, 4 * hd, generator=g).view(2, 1, 4, hd).transpose(1, 2)   # a reply's layout
    k = torch.randn(2, 1, 2 * hd, generator=g).view(2, 1, 2, hd).transpose(1, 2)
    one = rope_tables(inv_freq, position, 1, 1.25, scale)
    assert one.turn_q is not None and rope_tables(inv_freq, position, 2, 1.25, scale).turn_q is None
    bare = rope_tables(inv_freq, position, 1, 1.25, scale, turns=False)   # a daemon applies them: tables alone
    assert bare.turn_q is None and bare.turn_k is None and torch.equal(bare.packed, one.packed)
    freqs = position * inv_freq
    emb = torch.cat((freqs, freqs))[None, None, :]
    ref_q, ref_k = apply_rotary_pos_emb(q, k, emb.cos() * 1.25, emb.sin() * 1.25)
    for x, ref, got_of, factor in ((q, ref_q, one.q, scale), (k, ref_k, one.k, 1.0)):
        out = None if out_dtype is None else torch.empty(x.shape, dtype=out_dtype)
        got = got_of(x, out=out)
        assert got.shape == x.shape and (out is None or got.data_ptr() == out.data_ptr())
        tolerance = 1e-5 if out_dtype in (None, torch.float32) else 8e-3
        assert ((got.float() - ref * factor).abs().max() / ref.abs().max()).item() < tolerance
        elementwise = one._replace(turn_q=None, turn_k=None)
        assert torch.allclose(got_of.__func__(elementwise, x), got_of(x), rtol=0, atol=1e-5)


def test_a_decode_steps_rope_tables_from_a_block_are_the_tables_of_its_position():
    """With the scores in one call, decode steps slice their tables out of a block made for ROPE_BLOCK positions:
    bit for bit the tables of that one position, across block boundaries and far positions."""
    from shmrt.enclave.llama import ROPE_BLOCK, EnclaveModel, rope_tables
    from shmrt.model.checkpoint import load_enclave_part, resolve_model
    model = EnclaveModel(load_enclave_part(resolve_model("tiny")), ops=None)
    assert model.scores_in_one
    for start in (0, 1, ROPE_BLOCK - 1, ROPE_BLOCK, ROPE_BLOCK + 1, 5 * ROPE_BLOCK + 17, 1, 100_000):
        got = model._rope(start, 1)
        want = rope_tables(model.inv_freq, start, 1, model.attention_scaling, model.scale, turns=False)
        assert got.turn_q is None and got.packed.shape == want.packed.shape == (4, 1, model.cfg.head_dim)
        for a, b in zip(got, want):
            assert (a is None and b is None) or torch.equal(a, b), start


def test_config_parsing_errors_are_clear(tmp_path):
    with pytest.raises(ModelError, match="unknown preset"):
        LlamaConfig.from_name("huge")
    with pytest.raises(ModelError, match="neither a model name"):
        resolve_model(str(tmp_path / "missing"))
    with pytest.raises(ModelError, match="config.json"):
        resolve_model(str(tmp_path))
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(ModelError, match="model_type 'llama'"):
        resolve_model(str(tmp_path))


def test_presets_have_the_documented_shapes():
    cfg = LlamaConfig.from_name("llama3.2-1b")
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.intermediate_size, cfg.vocab_size, cfg.tie_word_embeddings) == (2048, 16, 32, 8, 8192, 128256, True)
    assert cfg.rope_scaling["rope_type"] == "llama3"
    assert LlamaConfig.from_name("small").with_layers(2).num_hidden_layers == 2


class PoisoningOps(LocalOps):
    """LocalOps whose reply of one call at layer 1 carries one non-finite value."""

    def __init__(self, compute, call: str, value: float):
        super().__init__(compute)
        self.call, self.value = call, value

    def _poison(self, layer, reply):
        if layer == 1:
            reply.view(0).view(-1)[5] = self.value
        return reply

    def attention_output(self, p, v, *, layer, cache=None, pos=0):
        reply = super().attention_output(p, v, layer=layer, cache=cache, pos=pos)
        return self._poison(layer, reply) if self.call == "AttentionOutput" else reply

    def linear(self, layer, names, x, keep_v_at=None):
        reply = super().linear(layer, names, x, keep_v_at)
        return self._poison(layer, reply) if self.call == "down_proj" and names == ["down_proj"] else reply


@pytest.mark.parametrize("call,value", [("AttentionOutput", float("nan")), ("AttentionOutput", float("inf")),
                                        ("down_proj", float("-inf")), ("down_proj", float("nan"))])
def test_a_non_finite_reply_is_refused_at_its_layer(call, value):
    w = load_weights("tiny")
    model = EnclaveModel(load_enclave_part(w.source), PoisoningOps(LinearCompute(w, "cpu", torch.float32), call, value))
    with pytest.raises(ProtocolError, match=f"{call}.* non-finite at layer 1"):
        model.forward(random_ids(4, w.cfg.vocab_size, seed=3), 0)


@pytest.mark.parametrize("call,value", [("AttentionOutput", float("nan")), ("down_proj", float("inf"))])
def test_a_non_finite_reply_in_a_decode_step_is_refused_at_the_reply_that_made_it(call, value):
    """A decode step's rows take the C helper's one pass, which checks h at each residual: the message names
    the one call whose reply made it non-finite (the embedding's is checked as it is taken)."""
    w = load_weights("tiny")
    ops = PoisoningOps(LinearCompute(w, "cpu", torch.float32), call, value)
    model = EnclaveModel(load_enclave_part(w.source), ops)
    ids = random_ids(5, w.cfg.vocab_size, seed=3)
    ops.call = None                                   # a clean prefill
    model.forward(ids[:, :4], 0)
    ops.call = call
    expected = "AttentionOutput reply" if call == "AttentionOutput" else "BatchLinear down_proj reply"
    with pytest.raises(ProtocolError, match=f"the daemon's {expected} made the hidden state non-finite at layer 1"):
        model.forward(ids[:, 4:], 4)


def test_the_one_pass_row_matches_torch_add_and_norm():
    """native.residual_rms_norm against h.add_(delta) and HF's LlamaRMSNorm in float64: the add bit for bit, the
    norm within float32 rounding; a non-finite h is reported, a finite one not."""
    gen = torch.Generator().manual_seed(0)
    for n in (1, 3, 4, 7, 2048, 2051):
        h = torch.randn(1, 1, n, generator=gen) * 3
        delta = torch.randn(1, 1, n, generator=gen)
        weight = torch.rand(n, generator=gen) + 0.5
        out = torch.empty(1, 1, n)
        expected_h = h + delta
        x = expected_h.double()
        expected = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * weight.double()
        assert add_residual(h, delta, "AttentionOutput", 0, weight, 1e-5, out) is True
        assert torch.equal(h, expected_h)
        torch.testing.assert_close(out.double(), expected, rtol=2e-7, atol=1e-7)
        delta[0, 0, n // 2] = float("nan")
        with pytest.raises(ProtocolError, match="AttentionOutput reply made the hidden state non-finite at layer 0"):
            add_residual(h, delta, "AttentionOutput", 0, weight, 1e-5, out)


@pytest.mark.parametrize("start", [0, 4])   # a prefill (many rows), a decode step (one row)
def test_a_non_finite_embedding_is_blamed_on_the_embedding(start):
    w = load_weights("tiny")

    class Ops(LocalOps):
        poison = False

        def embedding(self, ids):
            reply = super().embedding(ids)
            if self.poison:
                reply.view(0).view(-1)[3] = float("nan")
            return reply

    ops = Ops(LinearCompute(w, "cpu", torch.float32))
    model = EnclaveModel(load_enclave_part(w.source), ops)
    ids = random_ids(5, w.cfg.vocab_size, seed=4)
    if start:
        model.forward(ids[:, :start], 0)
    ops.poison = True
    with pytest.raises(ProtocolError, match="the daemon's Embedding reply made the hidden state non-finite"):
        model.forward(ids[:, start:] if start else ids, start)


def test_the_one_pass_row_takes_only_contiguous_float32_rows_of_one_length():
    """native.residual_rms_norm checks what it hands the C helper: anything else is None (the caller's torch
    path), never a read or write past a tensor."""
    from shmrt.wire import native
    n = 8
    row = lambda dtype=torch.float32: torch.zeros(1, 1, n, dtype=dtype)   # noqa: E731
    w = torch.ones(n)
    cases = [(row(torch.float16), row(torch.float16), None, None),       # not float32
             (row(), torch.zeros(1, 1, 2 * n)[..., ::2], None, None),     # not contiguous
             (row(), torch.zeros(1, 1, n + 1), None, None),               # another length
             (torch.zeros(2, n), None, w, torch.zeros(2, n)),             # two rows
             (row(), None, torch.ones(n - 1), row())]                     # a short weight
    for h, delta, weight, out in cases:
        assert native.residual_rms_norm(h, delta, weight, 1e-5, out) is None
    assert native.residual_rms_norm(row(), row(), w, 1e-5, row()) is True


@pytest.mark.parametrize("rows,vocab", [(1, 128256), (3, 49152), (2, 5)])
def test_greedy_sampling_picks_torch_argmaxs_index_ties_included(rows, vocab):
    g = torch.Generator().manual_seed(vocab)
    for trial in range(12):
        logits = torch.randn(rows, vocab, generator=g)
        if trial % 2:   # the largest value in several places: the first of them wins, as in torch.argmax
            top = logits.max(dim=-1, keepdim=True).values
            logits.scatter_(1, torch.randint(0, vocab, (rows, 3), generator=g), top.expand(rows, 3))
        if trial % 3 == 0:
            logits = logits.round()   # ties everywhere
        got = greedy(logits)
        assert got.dtype == torch.int64 and torch.equal(got, logits.argmax(dim=-1)), trial
        assert torch.equal(Sampler()(logits), got)
    for dtype in (torch.float64, torch.bfloat16, torch.float16):   # other dtypes, and a row of its own
        logits = torch.randn(rows, vocab, generator=g).to(dtype)
        assert torch.equal(greedy(logits), logits.argmax(dim=-1)) and torch.equal(greedy(logits[0]), logits[0].argmax())
    assert greedy(torch.tensor([[1.0, 1.0 + 2 ** -40]], dtype=torch.float64)).tolist() == [1]
