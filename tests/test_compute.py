"""The daemon's K/V store: a decode step is a slice copy into an owned buffer that doubles when full,
never a view on the request; the session quota counts what the buffers take; pos 0 restarts a layer.
The linear calls give the same values with the fused weights as with the per-projection ones."""
import pytest
import torch

from shmrt.errors import ModelError, ProtocolError, TensorTooLarge
from shmrt.host.compute import KVStore, LinearCompute
from shmrt.host.weights import load_weights
from shmrt.model.config import LlamaConfig

TINY = LlamaConfig.from_name("tiny")  # 2 layers, 2 KV heads, head dim 16: 128 B a position per K or V (fp32)
ROW = 2 * 16 * 4


def rows(n, seed, batch=1, dtype=torch.float32):
    return torch.randn(batch, 2, n, 16, generator=torch.Generator().manual_seed(seed)).to(dtype)


def buffer_bytes(kv):
    return sum(b.numel() * b.element_size() for bs in kv.buffers.values() for b in bs if b is not None)


def test_decode_appends_land_in_one_buffer_that_doubles_and_equal_the_concatenation():
    kv = KVStore(TINY, torch.device("cpu"), torch.float32)
    sent = [rows(5, 0)]
    got = kv.append(0, "k", sent[0], 0)
    assert torch.equal(got, sent[0]) and kv.buffers["k"][0].shape[2] == 5
    capacities, pointers = [], set()
    for pos in range(5, 21):
        sent.append(rows(1, pos))
        got = kv.append(0, "k", sent[-1], pos)
        assert torch.equal(got, torch.cat(sent, dim=2)), pos
        capacities.append(kv.buffers["k"][0].shape[2])
        pointers.add(kv.buffers["k"][0].data_ptr())
    assert capacities == [10] * 5 + [20] * 10 + [40]
    assert len(pointers) == 3          # one buffer per capacity: the other steps copied one row in place
    assert kv.bytes == buffer_bytes(kv) == 40 * ROW


def test_stored_rows_are_owned_copies_not_views_on_the_request():
    kv = KVStore(TINY, torch.device("cpu"), torch.float32)
    prompt, step = rows(4, 1), rows(1, 2)
    expect = torch.cat([prompt, step], dim=2)
    kv.append(1, "v", prompt, 0)
    got = kv.append(1, "v", step, 4)
    prompt.fill_(float("nan"))         # the ring space is poisoned once released
    step.fill_(float("nan"))
    assert torch.equal(got, expect) and torch.equal(kv.append(1, "v", rows(0, 3), 5), expect)
    assert got.untyped_storage().data_ptr() not in (prompt.untyped_storage().data_ptr(), step.untyped_storage().data_ptr())


def test_rows_are_kept_in_the_cache_dtype():
    kv = KVStore(TINY, torch.device("cpu"), torch.float32)
    r = rows(3, 4, dtype=torch.bfloat16)
    got = kv.append(0, "k", r, 0)
    assert got.dtype == torch.float32 and torch.equal(got, r.float())


def test_pos_zero_restarts_a_layer_in_its_buffer_and_a_new_batch_gets_a_new_one():
    kv = KVStore(TINY, torch.device("cpu"), torch.float32)
    kv.append(0, "k", rows(8, 5), 0)
    kv.append(0, "k", rows(1, 6), 8)
    buffer = kv.buffers["k"][0]
    again = rows(3, 7)
    assert torch.equal(kv.append(0, "k", again, 0), again) and kv.buffers["k"][0] is buffer
    with pytest.raises(ProtocolError, match="holds 3 positions, request says pos 9"):
        kv.append(0, "k", rows(1, 8), 9)
    wide = rows(2, 9, batch=3)
    assert torch.equal(kv.append(0, "k", wide, 0), wide)
    assert kv.bytes == buffer_bytes(kv) == 3 * 2 * ROW


def test_appends_that_do_not_fit_the_cache_or_model_are_refused():
    kv = KVStore(TINY, torch.device("cpu"), torch.float32)
    with pytest.raises(ProtocolError, match=r"layer 2 out of range \[0, 2\)"):
        kv.append(2, "k", rows(1, 0), 0)
    with pytest.raises(ProtocolError, match="holds 0 positions, request says pos 1"):
        kv.append(0, "k", rows(1, 0), 1)
    with pytest.raises(ProtocolError, match="KV heads, head dim"):
        kv.append(0, "k", torch.zeros(1, 2, 1, 8), 0)
    with pytest.raises(ModelError, match="sequence would reach 2049 positions, the model allows 2048"):
        kv.append(0, "k", rows(2049, 0), 0)
    kv.append(0, "k", rows(2, 0), 0)
    with pytest.raises(ProtocolError, match=r"do not match the cache \(1, 2, 2, 16\)"):
        kv.append(0, "k", rows(1, 0, batch=2), 2)


def test_quota_counts_allocated_bytes_and_headroom_never_refuses_rows_that_fit():
    """A quota of exactly 300 positions (all layers, K and V): doubling stops at each buffer's share, so
    every position up to 300 fits; the 301st is refused naming the sizes and the flag."""
    quota = 4 * 300 * ROW
    kv = KVStore(TINY, torch.device("cpu"), torch.float32, max_bytes=quota)
    for layer in range(2):
        for which in "kv":
            kv.append(layer, which, rows(200, layer), 0)
    for pos in range(200, 300):
        for layer in range(2):
            for which in "kv":
                kv.append(layer, which, rows(1, pos), pos)
                assert kv.bytes == buffer_bytes(kv) <= quota
    assert kv.bytes == quota
    with pytest.raises(ModelError, match=r"K/V cache would reach 0\.15 MiB, more than the daemon allows per session "
                                         r"\(0\.15 MiB, --max-kv-mib\)"):
        kv.append(0, "k", rows(1, 0), 300)
    assert kv.bytes == buffer_bytes(kv) == quota   # nothing was allocated for the refused rows


def test_a_prefill_larger_than_the_quota_is_refused_before_allocating():
    kv = KVStore(TINY, torch.device("cpu"), torch.float32, max_bytes=2**18)
    with pytest.raises(ModelError, match=r"would reach 0\.29 MiB"):
        kv.append(0, "k", rows(600, 0, batch=4), 0)
    assert kv.bytes == 0 and kv.buffers["k"][0] is None


@pytest.fixture(scope="module")
def compute():
    return LinearCompute(load_weights("tiny"), "cpu", torch.float32)


def test_batch_linear_of_a_group_equals_its_projections_one_by_one(compute):
    x = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(0))
    names = ["q_proj", "k_proj", "v_proj"]
    fused = compute.linear(1, names, x)
    for name, y in zip(names, fused):
        (alone,) = compute.linear(1, [name], x)
        assert torch.allclose(y, alone, rtol=0, atol=1e-6)
        assert torch.allclose(y, x @ compute.w.projection(1, [name]).t(), rtol=0, atol=1e-6)
    q_and_v = compute.linear(1, ["q_proj", "v_proj"], x)  # not consecutive in the fused weight: two products
    assert torch.allclose(q_and_v[1], fused[2], rtol=0, atol=1e-6)


def test_cached_products_use_every_row_kept_so_far(compute):
    kv = compute.new_kv_store()
    g = torch.Generator().manual_seed(1)
    keys = torch.randn(1, 2, 6, 16, generator=g)
    q = torch.randn(1, 2, 2, 16, generator=g)
    compute.matmul(q, keys[:, :, :5], transpose_b=True, cache="k", layer=0, pos=0, kv=kv)
    scores = compute.matmul(q, keys[:, :, 5:], transpose_b=True, cache="k", layer=0, pos=5, kv=kv)
    assert torch.allclose(scores, q @ keys.transpose(-1, -2), rtol=0, atol=1e-6)


@pytest.mark.parametrize("S", [1, 3])
def test_attention_output_is_p_times_v_then_o_proj(compute, S):
    """P*V with the query heads of a KV group stacked along rows, the heads laid side by side, o_proj."""
    cfg, g = compute.cfg, compute.cfg.num_attention_heads // compute.cfg.num_key_value_heads
    gen = torch.Generator().manual_seed(S)
    T = 4 + S
    p = torch.softmax(torch.randn(2, 2, g * S, T, generator=gen), -1)
    v = torch.randn(2, 2, T, 16, generator=gen)
    kv = compute.new_kv_store()
    compute.attention_output(p[..., :4], v[:, :, :4], layer=1, cache="v", pos=0, kv=kv)  # only its cache counts
    got = compute.attention_output(p, v[:, :, 4:], layer=1, cache="v", pos=4, kv=kv)
    heads = (p.view(2, 2, g, S, T) @ v.unsqueeze(2)).reshape(2, cfg.num_attention_heads, S, 16)  # [B, H, S, hd]
    ctx = heads.transpose(1, 2).reshape(2, S, cfg.num_attention_heads * 16)
    expect = ctx @ compute.w.projection(1, ["o_proj"]).t()
    assert got.shape == (2, S, cfg.hidden_size) and torch.allclose(got, expect, rtol=0, atol=1e-5)
    assert torch.allclose(compute.attention_output(p, v, layer=1), expect, rtol=0, atol=1e-5)  # no cache
    with pytest.raises(ProtocolError, match=r"AttentionOutput: layer 2 out of range \[0, 2\)"):
        compute.attention_output(p, v, layer=2)


def test_products_give_the_fused_product_the_parts_were_split_from(compute):
    """One fused weight: the parts and the one product [B, S, q+k+v] they are views of (the handler copies a
    decode step's whole into the reply); projections that are not one fused weight have none."""
    x = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(2))
    parts, whole = compute.products(1, ["q_proj", "k_proj", "v_proj"], x)
    assert whole is not None and whole.shape == (2, 3, sum(p.shape[-1] for p in parts))
    assert torch.equal(torch.cat(parts, -1), whole) and parts[0].data_ptr() == whole.data_ptr()
    parts, whole = compute.products(1, ["q_proj", "v_proj"], x)
    assert whole is None and len(parts) == 2


def test_a_joined_reply_allocation_is_one_view_over_its_parts():
    from shmrt.wire.ring import Ring
    from shmrt.wire.shm_transport import ShmReplyBuilder
    with Ring.create(1 << 16, "rsp") as ring:
        builder = ShmReplyBuilder(ring, timeout=1.0)
        outs, joined = builder.alloc_joined([(1, 1, 32), (1, 1, 16), (1, 1, 16)], torch.float32)
        assert joined is not None and joined.shape == (64,)
        joined.copy_(torch.arange(64.0))
        assert [o.flatten()[0].item() for o in outs] == [0.0, 32.0, 48.0]
        assert [tuple(o.shape) for o in outs] == [(1, 1, 32), (1, 1, 16), (1, 1, 16)]
        assert [o.data_ptr() - joined.data_ptr() for o in outs] == [0, 128, 192]   # parts of the joined view's bytes
        assert [d.offset for d in builder.descs] == [0, 128, 192]
        outs, joined = builder.alloc_joined([(3,), (5,)], torch.float32)   # 12 bytes: the next starts aligned
        assert joined is None and builder.descs[-1].offset > builder.descs[-2].offset + 12


def test_v_rows_kept_at_the_projection_are_the_ones_p_times_v_uses(compute):
    """keep_v: v_proj's rows go into the V cache at pos (in the reply's dtype, as if they had travelled) and out
    of the results; a P*V call without rows then uses them, equal to sending the same rows along."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(1, 5, 64, generator=gen)
    names = ["q_proj", "k_proj", "v_proj"]
    kv = compute.new_kv_store()
    parts, whole = compute.products(1, names, x[:, :4], keep_v=(kv, 0))
    assert len(parts) == 2 and whole is not None and torch.equal(torch.cat(parts, -1), whole)
    parts, whole = compute.products(1, names, x[:, 4:], keep_v=(kv, 4))   # a decode step: q|k lead the product
    assert whole.shape[-1] == sum(p.shape[-1] for p in parts) and torch.equal(torch.cat(parts, -1), whole)
    v = compute.linear(1, ["v_proj"], x)[0].view(1, 5, 2, 16).transpose(1, 2)   # [B, Hkv, S, hd]
    assert torch.allclose(kv.rows(1, "v"), v, rtol=0, atol=1e-6)
    p = torch.softmax(torch.randn(1, 2, 2, 5, generator=gen), -1)
    sent = compute.new_kv_store()
    expect = compute.attention_output(p, v, layer=1, cache="v", pos=0, kv=sent)
    assert torch.allclose(compute.attention_output(p, None, layer=1, cache="v", pos=4, kv=kv), expect, rtol=0, atol=1e-6)
    bf16 = compute.new_kv_store()
    compute.products(1, names, x, dtype=torch.bfloat16, keep_v=(bf16, 0))
    assert torch.equal(bf16.rows(1, "v"), v.to(torch.bfloat16).float())


def test_a_product_without_new_rows_needs_a_kept_cache(compute):
    kv = compute.new_kv_store()
    a = torch.randn(1, 2, 2, 3)
    with pytest.raises(ProtocolError, match="V cache of layer 0 is empty"):
        compute.matmul(a, None, transpose_b=False, cache="v", layer=0, kv=kv)
    with pytest.raises(ProtocolError, match="names no cache"):
        compute.matmul(a, None, transpose_b=False, kv=kv)
    with pytest.raises(ProtocolError, match="has not got"):
        compute.matmul(a, None, transpose_b=False, cache="v", layer=0)
    compute.products(0, ["v_proj"], torch.randn(1, 3, 64), keep_v=(kv, 0))
    with pytest.raises(ProtocolError, match="does not match the V cache"):
        compute.matmul(torch.randn(2, 2, 2, 3), None, transpose_b=False, cache="v", layer=0, kv=kv)
    with pytest.raises(ProtocolError, match="inner dims differ"):
        compute.matmul(torch.randn(1, 2, 2, 2), None, transpose_b=False, cache="v", layer=0, kv=kv)
    with pytest.raises(ProtocolError, match="4 rows wide over the V cache of layer 0, which has room for 3"):
        compute.matmul(torch.randn(1, 2, 2, 4), None, transpose_b=False, cache="v", layer=0, kv=kv)


def test_keep_v_bits_name_v_proj():
    from shmrt.model.calls import KEEP_V, call_label, linear_args, projection_bits
    bits = projection_bits(["q_proj", "k_proj", "v_proj"], keep_v=True)
    assert linear_args(bits) == (["q_proj", "k_proj", "v_proj"], True) and call_label("BatchLinear", bits) == "BatchLinear q|k|v"
    with pytest.raises(ProtocolError, match="keep v_proj's rows but do not compute v_proj"):
        linear_args(projection_bits(["q_proj"]) | KEEP_V)
    with pytest.raises(ProtocolError, match="name no known projection"):
        linear_args(KEEP_V)


@pytest.mark.parametrize("S", [1, 3])
def test_attention_scores_are_the_three_calls_they_replace(compute, S):
    """AttentionScores = BatchLinear q|k|v keeping V, the enclave's RoPE on q and k, Matmul QK^T against the K
    cache: the same scores (a prefill, then a step), and the same K and V rows kept."""
    from shmrt.enclave.llama import rope_tables
    from shmrt.model.config import rope_inv_freq
    cfg = compute.cfg
    H, Hkv, hd, g = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.groups
    inv_freq, scaling = rope_inv_freq(cfg)
    gen = torch.Generator().manual_seed(10 + S)
    x = torch.randn(1, 4 + S, cfg.hidden_size, generator=gen)
    one, three = compute.new_kv_store(), compute.new_kv_store()
    for start, length in ((0, 4), (4, S)):
        step = x[:, start:start + length]
        rope = rope_tables(inv_freq, start, length, scaling, hd ** -0.5)
        got = compute.attention_scores(1, step, rope.packed.clone(), pos=start, kv=one)
        (q, k), _ = compute.products(1, ["q_proj", "k_proj", "v_proj"], step, keep_v=(three, start))
        q = rope.q(q.view(1, length, H, hd).transpose(1, 2))
        k = rope.k(k.view(1, length, Hkv, hd).transpose(1, 2))
        expect = compute.matmul(q.reshape(1, Hkv, g * length, hd), k, transpose_b=True, cache="k", layer=1,
                                pos=start, kv=three)
        assert got.shape == (1, Hkv, g * length, start + length) and torch.allclose(got, expect, rtol=0, atol=1e-5)
    for which in ("k", "v"):
        assert torch.allclose(one.rows(1, which), three.rows(1, which), rtol=0, atol=1e-6)


def test_attention_scores_refuse_what_they_cannot_compute(compute):
    x = torch.randn(1, 2, compute.cfg.hidden_size)
    tables = torch.zeros(4, 2, compute.cfg.head_dim)
    with pytest.raises(ProtocolError, match="has not got"):
        compute.attention_scores(0, x, tables, pos=0, kv=None)
    kv = compute.new_kv_store()
    for bad in (tables[:3], torch.zeros(4, 3, compute.cfg.head_dim), tables.to(torch.int32),
                tables.to(torch.bfloat16)):   # float32 only (model/rope.py), whatever the wire dtype
        with pytest.raises(ProtocolError, match=r"RoPE tables \[4, 2, 16\]"):
            compute.attention_scores(0, x, bad, pos=0, kv=kv)
    with pytest.raises(ProtocolError, match="out of range"):
        compute.attention_scores(2, x, tables, pos=0, kv=kv)
    with pytest.raises(ProtocolError, match="holds 0 positions, request says pos 3"):
        compute.attention_scores(0, x, tables, pos=3, kv=kv)
    for width in (1, compute.cfg.max_position_embeddings + 1):   # short of pos + S, or past the model
        with pytest.raises(ProtocolError, match=f"AttentionScores width {width}"):
            compute.attention_scores(0, x, tables, pos=0, kv=kv, width=width)
    from shmrt.errors import TensorTooLarge
    with pytest.raises(TensorTooLarge):
        compute.attention_scores(0, x, tables, pos=0, kv=kv, max_elements=7)
    assert {w: f.tolist() for w, f in kv.filled.items()} == {"k": [0, 0], "v": [0, 0]}   # nothing kept by a refused call


@pytest.mark.parametrize("shape", [(1, 1), (1, 5), (2, 3)])
def test_embedding_rows_are_the_tables_as_copies_and_ids_outside_the_vocabulary_are_refused(compute, shape):
    """One id (a decode step) takes its own path: the same row, a copy (a caller adds into it), the same refusals."""
    V = compute.cfg.vocab_size
    ids = torch.randint(0, V, shape, dtype=torch.int64)
    rows = compute.embedding(ids)
    assert torch.equal(rows, torch.nn.functional.embedding(ids, compute.w.embed))
    rows.add_(1.0)
    assert torch.equal(compute.embedding(ids), torch.nn.functional.embedding(ids, compute.w.embed))
    for bad in (-1, V, 2**40):
        hostile = ids.clone()
        hostile.view(-1)[-1] = bad
        with pytest.raises(ModelError, match="token id out of range"):
            compute.embedding(hostile)
    assert compute.embedding(ids.to(torch.int32)).shape == (*shape, compute.cfg.hidden_size)


@pytest.mark.parametrize("width,slices", [(256, 16), (1280, 16), (48, 4)])
def test_p_times_v_in_slices_of_its_width_equals_one_product(width, slices):
    """CUDA daemons take P*V of a decode step in slices of its width (host/compute.py); on the cache's slice of a
    larger buffer, as the daemon's V rows are."""
    gen = torch.Generator().manual_seed(width)
    p = torch.softmax(torch.randn(1, 8, 4, width, generator=gen), -1)
    v = torch.randn(1, 8, width + 100, 64, generator=gen)[:, :, :width]
    from shmrt.host.compute import split_inner_product
    torch.testing.assert_close(split_inner_product(p, v, slices), torch.matmul(p, v), rtol=1e-5, atol=1e-6)


def test_batch_linear_checks_that_passed_pass_again_and_the_rest_are_refused_every_time(monkeypatch):
    compute = LinearCompute(load_weights("tiny"), "cpu", torch.float32)
    D, gate_up = compute.cfg.hidden_size, ("gate_proj", "up_proj")
    expect = [compute.rows[n] for n in gate_up]
    for _ in range(3):
        assert compute.linear_rows(1, gate_up, torch.zeros(1, 1, D), 10**9) == expect
        assert compute.linear_rows(1, list(gate_up), torch.zeros(1, 1, D), 10**9) == expect   # a list of names too
        for bad in ((99, torch.zeros(1, 1, D), 10**9), (1, torch.zeros(1, 1, D + 1), 10**9), (1, torch.zeros(1, D), 10**9),
                    (1, torch.zeros(1, 1, D), 3)):   # layer, input width, rank, what the reply can carry
            layer, x, room = bad
            with pytest.raises((ProtocolError, TensorTooLarge)):
                compute.linear_rows(layer, gate_up, x, room)
    monkeypatch.setattr("shmrt.host.compute.CHECKED_KEPT", 4)   # bounded: a client's prefill lengths vary
    for S in range(1, 20):
        assert compute.linear_rows(0, gate_up, torch.zeros(1, S, D), 10**9) == expect
    assert len(compute._checked_rows) <= 4
