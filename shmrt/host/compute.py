"""The daemon's linear algebra: embedding, projections, Q*K^T and P*V (with an optional K/V
cache per session), LM head. Inputs are CPU tensors (possibly views on a ring, valid only until the
request is released); outputs are tensors on the compute device. Anything kept past the request
(the K/V cache) goes through `keep()`, the one place that copies request bytes into memory the daemon
owns on the device. (Round 1 kept the view itself: on a CPU daemon `.to(device)` is a no-op, and a cache
that aliased the ring was overwritten as soon as the ring wrapped; every token after the first was wrong
on real models.) Argument checks raise ModelError/ProtocolError, never a device-side assert: ids are
copied out of shared memory first, then range-checked.

Every op checks the size of its result *before* computing it (`max_elements`: what the reply can
carry). A request is bounded by the request ring, but a result need not be: an inner dimension of 0
makes two empty inputs whose product is [M, N] zeros, and an embedding turns 8 bytes per id into a
row of `hidden` floats. Without the check, a request of a few bytes could make the daemon allocate
gigabytes (found by the fuzz test: 24 GiB, then the OOM killer).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..model.config import LlamaConfig
from ..errors import ModelError, ProtocolError, TensorTooLarge
from ..model.config import projection_cols, projection_rows
from ..model.rope import ROPE_TABLES, apply_rope
from .weights import LlamaWeights

QKV = ("q_proj", "k_proj", "v_proj")


def check_result_fits(shape, max_elements: int | None, what: str) -> None:
    """Refuse a result larger than the reply can carry, before anything is allocated for it."""
    elements = math.prod(shape)
    if max_elements is not None and elements > max_elements:
        raise TensorTooLarge(f"{what} result {tuple(shape)} has {elements} elements, more than the reply can "
                             f"carry ({max_elements}): the client needs a larger --ring-mib (over msgpack the "
                             "daemon's SHMRT_MAX_REPLY_MIB bounds it too)")


def keep(view: torch.Tensor, into: torch.Tensor) -> torch.Tensor:
    """Copy request memory into `into`, memory the daemon owns on the compute device: the only way bytes
    outlive a request. Non-blocking on CUDA (DMA from the registered ring): the handler waits for the
    device once per call, before the request is released."""
    return into.copy_(view, non_blocking=True)


def write_parts(outs: list[torch.Tensor], joined: torch.Tensor | None, parts: list[torch.Tensor],
                whole: torch.Tensor | None) -> None:
    """Queue a BatchLinear's results into its reply buffers: one copy where they lie end to end both in the
    product and in the reply (one row's q|k|v or gate|up: one DMA on CUDA), else one per part. Non-blocking:
    the handler waits for the device before the reply is published."""
    if joined is not None and whole is not None and whole.numel() == joined.numel() == whole.shape[-1]:
        joined.copy_(whole.view(-1), non_blocking=True)
        return
    for out, part in zip(outs, parts):
        out.copy_(part, non_blocking=True)


CACHES = ("k", "v")


class KVStore:
    """K and V rows per layer for one session, on the compute device.

    Each layer's K (and V) lives in one owned buffer [B, Hkv, capacity, hd] whose first `filled` rows
    hold positions 0..filled-1; a decode step's rows are a slice copy into it (`keep`), and the buffer
    doubles when full, so a step costs its own rows, not the whole cache. `bytes` is what the buffers
    take (their capacity), checked against the session's quota before anything is allocated; no buffer
    grows past its share of the quota (quota / layers / 2) unless the rows it must hold need it, so
    headroom in one layer never makes another layer's rows not fit.

    Rows past `filled` are zeros (buffers are allocated zeroed; a restart at pos 0 zeroes what the earlier
    sequence left). A padded product (`width` rows, model/calls.py's score widths) reads them: the client gives
    their scores no weight (-inf before its softmax, zeros in P), and zeros, unlike rows an earlier sequence
    left, cannot be NaN or Inf (which times a zero probability would still be NaN).
    """

    def __init__(self, cfg: LlamaConfig, device: torch.device, dtype: torch.dtype, max_bytes: int | None = None):
        layers = cfg.num_hidden_layers
        self.device, self.dtype = device, dtype
        self.buffers: dict[str, list[torch.Tensor | None]] = {w: [None] * layers for w in CACHES}
        # per layer: rows kept, and how many buffers it has had (a new one each time it grows): numbers a daemon's
        # planned calls read and count in C (host/lane.py), where a Python list or an identity cannot be read
        self.filled: dict[str, np.ndarray] = {w: np.zeros(layers, dtype=np.int64) for w in CACHES}
        self.generation: dict[str, np.ndarray] = {w: np.zeros(layers, dtype=np.uint64) for w in CACHES}
        self.max_positions = cfg.max_position_embeddings
        self.heads_and_dim = (cfg.num_key_value_heads, cfg.head_dim)
        self.max_bytes = max_bytes  # the session's quota (a client chooses its batch and ring size)
        self.bytes = 0

    def append(self, layer: int, which: str, rows: torch.Tensor, pos: int, width: int = 0) -> torch.Tensor:
        """Store `rows` (a request view, or V's rows of a product of ours) at `pos` of layer `layer`'s K or V;
        returns all rows so far, or the first `width` rows where that is more (a view on the owned buffer, valid
        until the next append to it)."""
        buffer = self.place(layer, which, tuple(rows.shape), pos, width)
        total = pos + rows.shape[2]
        keep(rows, buffer[:, :, pos:total])
        return buffer[:, :, :max(total, width)]

    def place(self, layer: int, which: str, shape: tuple, pos: int, width: int = 0, commit: bool = True) -> torch.Tensor:
        """Make room for rows of `shape` [B, Hkv, S, hd] at `pos` of layer `layer`'s K or V (and for `width` rows
        in all, where a padded product reads that many) and count them as kept (unless not `commit`: then
        `commit()` once they are): the buffer, whose rows [pos, pos + S) the caller fills (`append`, or a CUDA
        graph's copy). Everything is checked first."""
        filled = self.filled[which]
        if not 0 <= layer < len(filled):
            raise ProtocolError(f"layer {layer} out of range [0, {len(filled)})")
        have = 0 if pos == 0 else filled[layer]  # pos 0 restarts the layer
        if pos != have:
            raise ProtocolError(f"{which.upper()} cache of layer {layer} holds {have} positions, request says pos {pos}")
        if len(shape) != 4 or (shape[1], shape[3]) != self.heads_and_dim:
            raise ProtocolError(f"{which.upper()} rows {shape} are not [B, {self.heads_and_dim[0]}, S, "
                                f"{self.heads_and_dim[1]}] (KV heads, head dim of this model)")
        total = pos + shape[2]
        if max(total, width) > self.max_positions:
            raise ModelError(f"sequence would reach {max(total, width)} positions, the model allows {self.max_positions}")
        buffer = self.buffers[which][layer]
        if have and buffer.shape[0] != shape[0]:
            raise ProtocolError(f"{which.upper()} rows {shape} do not match the cache "
                                f"{tuple(buffer[:, :, :have].shape)}")
        buffer = self._reserve(layer, which, shape[0], pos, max(total, width))
        if commit:
            self.commit(layer, which, total)
        return buffer

    def commit(self, layer: int, which: str, total: int) -> None:
        """Count rows up to `total` as kept (`place` does, unless told not to: then this, once they are in the
        buffer; a caller placing K and V checks both before either changes). A restart, fewer rows than the
        earlier sequence kept, zeroes what that sequence left past them."""
        filled = self.filled[which]
        if filled[layer] > total:
            self.buffers[which][layer][:, :, total:filled[layer]].zero_()
        filled[layer] = total

    def rows(self, layer: int, which: str, width: int = 0) -> torch.Tensor:
        """Every row of layer `layer`'s K or V kept so far, or its first `width` rows where that is more (zeros
        past the kept ones; at most the buffer's rows): a view on the owned buffer, valid until the next append to
        it; for a product whose new rows were kept by an earlier call (V, at the projection)."""
        filled = self.filled[which]
        if not 0 <= layer < len(filled):
            raise ProtocolError(f"layer {layer} out of range [0, {len(filled)})")
        if not filled[layer]:
            raise ProtocolError(f"{which.upper()} cache of layer {layer} is empty, and the request brings no rows")
        buffer = self.buffers[which][layer]
        if width > buffer.shape[2]:
            raise ProtocolError(f"a product {width} rows wide over the {which.upper()} cache of layer {layer}, which "
                                f"has room for {buffer.shape[2]} (a padded width must be one its scores had)")
        return buffer[:, :, :max(filled[layer], width)]

    def _reserve(self, layer: int, which: str, batch: int, kept: int, need: int) -> torch.Tensor:
        """Layer `layer`'s buffer for `which` with room for `need` rows of `batch`: the one it has, or a larger
        zeroed one (quota checked first) that holds the `kept` rows kept so far."""
        buffer = self.buffers[which][layer]
        heads, dim = self.heads_and_dim
        if buffer is not None and buffer.shape[0] == batch and buffer.shape[2] >= need:
            return buffer
        old_bytes = 0 if buffer is None else buffer.numel() * buffer.element_size()
        capacity = 0 if buffer is None or buffer.shape[0] != batch else buffer.shape[2]
        row_bytes = batch * heads * dim * self.dtype.itemsize
        limit = self.max_positions
        if self.max_bytes is not None and row_bytes:
            others = self.bytes - old_bytes
            if others + need * row_bytes > self.max_bytes:
                raise ModelError(f"this session's K/V cache would reach {(others + need * row_bytes) / 2**20:.2f} MiB, "
                                 f"more than the daemon allows per session ({self.max_bytes / 2**20:.2f} MiB, "
                                 "--max-kv-mib): use a shorter sequence or batch, or raise --max-kv-mib on the daemon")
            share = self.max_bytes // (2 * len(self.filled[which]) * row_bytes)
            limit = min(limit, (self.max_bytes - others) // row_bytes, max(share, need))
        grown = torch.zeros((batch, heads, min(max(need, 2 * capacity), limit), dim), device=self.device, dtype=self.dtype)
        if kept:  # owned rows into the larger owned buffer (device to device)
            grown[:, :, :kept] = buffer[:, :, :kept]
        self.buffers[which][layer] = grown
        self.generation[which][layer] += 1
        self.bytes += grown.numel() * grown.element_size() - old_bytes
        return grown


CHECKED_KEPT = 4096   # argument sets `linear_rows` remembers (a few per layer in a decode step)

# P*V of a decode step on CUDA (at most SPLIT_MAX_ROWS rows: a KV group's query heads for one position): its inner
# dimension, the scores' width, in this many slices (`split_inner_product`)
INNER_SLICES = 16
SPLIT_MAX_ROWS = 16


def grouped_product(a: torch.Tensor, b: torch.Tensor, transpose_b: bool) -> torch.Tensor:
    """a @ b (or b^T) over [B, Hkv, rows, inner] factors on one device, in float32 whatever their dtype (scores
    and probabilities accumulate in float32): one bmm over B*Hkv (what matmul would do, without its expand and
    reshape steps: flattening the two leading dims of the cache's slice is a view). On CUDA, P*V of a decode step
    (a few rows, a width of hundreds or more) takes `split_inner_product`."""
    a, b = a.float(), b.float()
    if not transpose_b and a.is_cuda and a.shape[2] <= SPLIT_MAX_ROWS and a.shape[3] >= 16 * INNER_SLICES \
            and not a.shape[3] % INNER_SLICES:
        return split_inner_product(a, b, INNER_SLICES)
    out = torch.bmm(a.flatten(0, 1), (b.transpose(-1, -2) if transpose_b else b).flatten(0, 1))
    return out.view(a.shape[0], a.shape[1], out.shape[1], out.shape[2])


def split_inner_product(a: torch.Tensor, b: torch.Tensor, slices: int) -> torch.Tensor:
    """a @ b for a [B, H, rows, T] and b [B, H, T, d] with `slices` dividing T: the products of T/slices columns
    each, then their sum. cuBLAS's kernel for few rows against a long T walks all of T in one block per output tile:
    P*V took 40 us a layer at T = 1280 on an H200 (torch.profiler, session 11); in 16 slices, one batched product
    and a sum, ~2 (bench/results/h200-llama3.2-1b-session11/graph-launch-probe.txt). Float32 sums in another order:
    equal up to rounding."""
    B, H, rows, T = a.shape
    parts = torch.matmul(a.reshape(B, H, rows, slices, T // slices).transpose(2, 3),
                         b.reshape(B, H, slices, T // slices, b.shape[-1]))   # [B, H, slices, rows, d]
    return parts.sum(2)


class LinearCompute:
    def __init__(self, weights: LlamaWeights, device: str, dtype: torch.dtype):
        self.w = weights
        self.cfg = weights.cfg
        self.device = torch.device(device)
        self.dtype = dtype
        self.rows = projection_rows(self.cfg)
        self.cols = projection_cols(self.cfg)
        self._on_cpu = self.device.type == "cpu"
        self._inputs: list[torch.Tensor | None] = [None] * 3   # `to_device`'s buffers, one per input slot
        self._o_proj = [w for (w,) in weights.projections(("o_proj",))]
        # BatchLinear arguments checked before, by what the check reads (layer, names, the input's shape, the room):
        # a decode step asks the same four per layer, step after step (`linear_rows`)
        self._checked_rows: dict[tuple, list[int]] = {}

    def to_device(self, t: torch.Tensor, slot: int = 0, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A request tensor in `dtype` (default: the compute dtype) on the compute device. On a GPU it is copied
        (DMA from the registered ring) into input slot `slot`'s device buffer, reused call after call instead of
        allocated per call: the handler waits for the device at the end of each call, so the last use is over by
        the next; the inputs of one call take different slots."""
        dtype = dtype or self.dtype
        if self._on_cpu:   # request tensors are CPU tensors: nothing to move
            return t if t.dtype == dtype else t.to(dtype)
        n = t.numel()
        buffer = self._inputs[slot]
        if buffer is None or buffer.numel() < n or buffer.dtype != dtype:
            buffer = self._inputs[slot] = torch.empty(n, device=self.device, dtype=dtype)
        return buffer[:n].view(t.shape).copy_(t, non_blocking=True)

    def _layer(self, layer: int, what: str) -> None:
        if not 0 <= layer < self.cfg.num_hidden_layers:
            raise ProtocolError(f"{what}: layer {layer} out of range [0, {self.cfg.num_hidden_layers})")

    def check_embedding(self, ids: torch.Tensor, max_elements: int | None = None) -> tuple[int, int, int]:
        """Embedding's argument checked but for the ids' values: its result's shape, which must fit the reply."""
        if ids.dtype not in (torch.int64, torch.int32) or ids.dim() != 2:
            raise ProtocolError(f"Embedding expects int64 ids [B, S], got {ids.dtype} {tuple(ids.shape)}")
        shape = (*ids.shape, self.cfg.hidden_size)
        check_result_fits(shape, max_elements, "Embedding")
        return shape

    def embedding(self, ids: torch.Tensor, max_elements: int | None = None) -> torch.Tensor:
        shape = self.check_embedding(ids, max_elements)
        if ids.numel() == 1:   # a decode step: the id read once and checked, its row copied (no ids sent to a device)
            return self.embedding_rows(self.decode_token(ids)).view(shape).clone()
        ids = ids.to(torch.int64, copy=True)  # private copy first, then validate (no double fetch)
        if ids.numel():
            low, high = (int(v) for v in torch.aminmax(ids))
            if low < 0 or high >= self.cfg.vocab_size:
                raise ModelError(f"token id out of range [0, {self.cfg.vocab_size}): min {low}, max {high}")
        return F.embedding(ids if self._on_cpu else ids.to(self.device), self.w.embed)

    def embedding_rows(self, index: int | torch.Tensor) -> torch.Tensor:
        """The embedding rows of checked ids: one id (an int: a view of its row) or ids on the compute device."""
        return self.w.embed[index] if isinstance(index, int) else self.w.embed.index_select(0, index)

    def decode_token(self, ids: torch.Tensor) -> int:
        """A decode step's one id (ids [1, 1], int64 or int32: checked by the caller), read once from the request
        (the client may rewrite it meanwhile: what is used is what was checked) and checked against the vocabulary."""
        token = ids.item()   # (int64 or int32: a Python int)
        if not 0 <= token < self.cfg.vocab_size:
            raise ModelError(f"token id out of range [0, {self.cfg.vocab_size}): {token}")
        return token

    def linear(self, layer: int, names: list[str] | tuple[str, ...], x: torch.Tensor, max_elements: int | None = None,
               dtype: torch.dtype | None = None) -> list[torch.Tensor]:
        """x @ W^T for each projection in `names`, one product where they are one fused weight; results in
        `dtype` (default: the compute dtype), converted once before they are split."""
        return self.products(layer, names, x, max_elements, dtype)[0]

    def linear_rows(self, layer: int, names, x: torch.Tensor, max_elements: int | None = None) -> list[int]:
        """Check a BatchLinear's arguments (layer, input shape, what the reply can carry): each projection's rows. The
        answer depends on nothing else, so arguments that passed are remembered (a bounded set: a client's prefill
        lengths vary) and pass again with one lookup."""
        key = (layer, names if type(names) is tuple else tuple(names), x.shape, max_elements)
        rows = self._checked_rows.get(key)
        if rows is not None:
            return rows
        rows = self._linear_rows(layer, names, x, max_elements)
        if len(self._checked_rows) >= CHECKED_KEPT:
            self._checked_rows.clear()
        self._checked_rows[key] = rows
        return rows

    def _linear_rows(self, layer: int, names, x: torch.Tensor, max_elements: int | None) -> list[int]:
        self._layer(layer, "BatchLinear")
        cols = self.cols[names[0]]
        if any(self.cols[n] != cols for n in names) or x.dim() != 3 or x.shape[-1] != cols:
            raise ProtocolError(f"BatchLinear {list(names)} expects input [B, S, {cols}], got {tuple(x.shape)}")
        rows = [self.rows[n] for n in names]
        check_result_fits((x.shape[0], x.shape[1], sum(rows)), max_elements, "BatchLinear")
        return rows

    def products(self, layer: int, names: list[str] | tuple[str, ...], x: torch.Tensor, max_elements: int | None = None,
                 dtype: torch.dtype | None = None, keep_v: tuple[KVStore, int] | None = None
                 ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """`linear`'s results, and the one product [B, S, sum of rows] they were split from where one fused weight
        made them all (else None): for one row (a decode step) the parts lie end to end in it, so the handler
        copies q|k|v or gate|up into the reply in one piece. `keep_v` (a K/V store, a position): v_proj's rows
        go into its V cache there, in `dtype` as if they had travelled, and are left out of the results. V's
        cache grows here, K's at the step's Q*K^T: a step whose Q*K^T is refused leaves V one step ahead (the
        client's session ends with the error; a new one starts both at pos 0)."""
        rows = self.linear_rows(layer, names, x, max_elements)
        parts, whole, v = self.project(layer, names, rows, self.to_device(x), dtype or self.dtype, keep_v is not None)
        if v is not None:
            self.keep_v_rows(keep_v, layer, v)
        return parts, whole

    def project(self, layer: int, names, rows: list[int], xd: torch.Tensor, dtype: torch.dtype, drop_v: bool
                ) -> tuple[list[torch.Tensor], torch.Tensor | None, torch.Tensor | None]:
        """The device math of `products` on an input on the device: (the parts in `dtype`, the fused product they
        lie in or None, v_proj's part where `drop_v` takes it out of the parts, else None)."""
        weights = self.w.projections(tuple(names))[layer]
        ys = [F.linear(xd, w) for w in weights]
        ys = [y if y.dtype == dtype else y.to(dtype) for y in ys]
        whole = ys[0] if len(ys) < len(rows) else None
        parts = list(whole.split_with_sizes(rows, -1)) if whole is not None else ys
        v = None
        if drop_v:
            i = list(names).index("v_proj")
            v = parts.pop(i)
            if whole is not None:   # the kept part was the last one (q|k|v): the rest leads the product
                whole = whole[..., :whole.shape[-1] - v.shape[-1]] if i == len(parts) else None
        return parts, whole, v

    @staticmethod
    def keep_v_rows(keep_v: tuple[KVStore, int], layer: int, v: torch.Tensor, width: int = 0) -> None:
        """v_proj's rows [B, S, Hkv*hd] into the V cache of `keep_v` (a store, a position)."""
        kv, pos = keep_v
        kv.append(layer, "v", v.view(*v.shape[:2], *kv.heads_and_dim).transpose(1, 2), pos, width)  # [B, Hkv, S, hd]

    def matmul(self, a: torch.Tensor, b: torch.Tensor | None, *, transpose_b: bool, cache: str | None = None,
               layer: int = -1, pos: int = 0, kv: KVStore | None = None, max_elements: int | None = None) -> torch.Tensor:
        """a @ b (or a @ b^T); with `cache` ("k" or "v"), b holds new rows appended to the session's cache
        at `pos` and the product uses every cached row; b None: no new rows (an earlier call kept them: V at
        the projection), the product uses the cached rows as they are (`pos` unused: a's inner dimension must
        equal the rows cached, or a padded width past them: model/calls.py, checked with the product's)."""
        bd = self.factor(a, b, transpose_b=transpose_b, cache=cache, layer=layer, pos=pos, kv=kv,
                         max_elements=max_elements)
        return grouped_product(self.to_device(a), bd, transpose_b)

    def factor(self, a: torch.Tensor, b: torch.Tensor | None, *, transpose_b: bool, cache: str | None, layer: int,
               pos: int, kv: KVStore | None, max_elements: int | None) -> torch.Tensor:
        """`matmul`'s checks, and its second factor on the device (new rows kept first, where they come)."""
        assert cache in (None, *CACHES), cache
        cached = cache is not None
        if cached and kv is None:
            raise ProtocolError("Matmul asks for the daemon K/V cache, which this session has not got")
        if b is None:
            if not cached:
                raise ProtocolError("Matmul with one tensor takes its other factor from the daemon's K/V cache, "
                                    "but the request names no cache")
            if a.dim() != 4:
                raise ProtocolError(f"Matmul expects a [B, Hkv, rows, cols] tensor, got {tuple(a.shape)}")
            bd = kv.rows(layer, cache, width=0 if transpose_b else a.shape[-1])   # P may be padded (model/calls.py)
            if a.shape[:2] != bd.shape[:2]:
                raise ProtocolError(f"Matmul {tuple(a.shape)} does not match the {cache.upper()} cache "
                                    f"{tuple(bd.shape)} of layer {layer}")
            check_result_fits((*a.shape[:-1], bd.shape[2] if transpose_b else bd.shape[3]), max_elements, "Matmul")
        else:
            if a.dim() != 4 or b.dim() != 4 or a.shape[:2] != b.shape[:2] or a.dtype != b.dtype:
                raise ProtocolError(f"Matmul expects two [B, Hkv, rows, cols] tensors of one dtype, got "
                                    f"{tuple(a.shape)} {a.dtype} and {tuple(b.shape)} {b.dtype}")
            if transpose_b:  # result columns: rows of b (all cached rows, with the cache)
                cols = b.shape[2] + (max(pos, 0) if cached else 0)
            else:
                cols = b.shape[3]
            check_result_fits((*a.shape[:-1], cols), max_elements, "Matmul")
            bd = kv.append(layer, cache, b, pos) if cached else self.to_device(b, slot=1)
        inner_b = bd.shape[-1] if transpose_b else bd.shape[-2]
        if a.shape[-1] != inner_b:
            raise ProtocolError(f"Matmul inner dims differ: {tuple(a.shape)} x {tuple(bd.shape)}"
                                f"{' transposed' if transpose_b else ''}")
        return bd

    def attention_scores(self, layer: int, x: torch.Tensor, tables: torch.Tensor, *, pos: int, kv: KVStore | None,
                         width: int = 0, max_elements: int | None = None) -> torch.Tensor:
        """q|k|v of x [B, S, D]; q and k rotated with the enclave's RoPE `tables` [4, S, hd] (model/rope.py: its
        own tables, the daemon only does the arithmetic); K's and V's rows kept in the cache at `pos`; then Q*K^T
        over every kept row: [B, Hkv, g*S, W], query heads of a KV group stacked along rows, in float32 (as
        Matmul's). W = pos + S, or `width` (model/calls.py: a padded width; the columns past pos + S are
        products with zero rows). The three calls BatchLinear q|k|v (KEEP_V), the client's RoPE and Matmul QK^T
        as one. In three steps, so a CUDA daemon can replay the last two as graphs (`host/graphs.py`: the second
        alone where the width is not padded): `scores_rows` (the checks), `rotated_qkv` (device math on inputs on
        the device), `keep_and_score` (the cache, the product)."""
        rows = self.scores_rows(layer, x, tables, pos, kv, width, max_elements)
        rotated = self.rotated_qkv(layer, rows, self.to_device(x), self.to_device(tables, 2, torch.float32))
        return self.keep_and_score(layer, *rotated, pos, kv, width)

    def scores_rows(self, layer: int, x: torch.Tensor, tables: torch.Tensor, pos: int, kv: KVStore | None,
                    width: int, max_elements: int | None) -> list[int]:
        """Check AttentionScores' arguments (the cache's position is checked where rows are kept): q|k|v's rows."""
        cfg = self.cfg
        if kv is None:
            raise ProtocolError("AttentionScores keeps K/V rows in the daemon's cache, which this session has not got")
        rows = self.linear_rows(layer, QKV, x)
        B, S = x.shape[:2]
        if tables.shape != (ROPE_TABLES, S, cfg.head_dim) or tables.dtype != torch.float32:
            raise ProtocolError(f"AttentionScores expects RoPE tables [{ROPE_TABLES}, {S}, {cfg.head_dim}] in "
                                f"float32 for input {tuple(x.shape)}, got {tuple(tables.shape)} {tables.dtype}")
        if width and not pos + S <= width <= cfg.max_position_embeddings:
            raise ProtocolError(f"AttentionScores width {width}: expected 0 or from pos + S = {pos + S} to the model's "
                                f"{cfg.max_position_embeddings} positions")
        check_result_fits((B, cfg.num_key_value_heads, cfg.groups * S, max(pos + S, width)), max_elements,
                          "AttentionScores")
        return rows

    def rotated_qkv(self, layer: int, rows: list[int], xd: torch.Tensor, tables: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q|k|v of xd [B, S, D] on the device, in float32, q and k rotated with `tables` (float32, on the device):
        (q [B, Hkv, g*S, hd], k [B, Hkv, S, hd], v [B, S, Hkv*hd])."""
        cfg = self.cfg
        H, Hkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        B, S = xd.shape[:2]
        (q, k, v), _, _ = self.project(layer, QKV, rows, xd, torch.float32, drop_v=False)
        cos_q, sin_q, cos_k, sin_k = tables.unbind(0)
        q = apply_rope(q.view(B, S, H, hd).transpose(1, 2), cos_q, sin_q)       # [B, H, S, hd]
        k = apply_rope(k.view(B, S, Hkv, hd).transpose(1, 2), cos_k, sin_k)     # [B, Hkv, S, hd]
        return q.reshape(B, Hkv, cfg.groups * S, hd), k, v

    def keep_and_score(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: int,
                       kv: KVStore, width: int = 0) -> torch.Tensor:
        """K's and V's new rows into the cache at `pos` (room for `width` rows in both), then q against every K row
        kept (the first `width` where that is more)."""
        keys = kv.append(layer, "k", k, pos, width)
        self.keep_v_rows((kv, pos), layer, v, width)
        return grouped_product(q, keys, transpose_b=True)

    def attention_output(self, p: torch.Tensor, v: torch.Tensor | None, *, layer: int, cache: str | None = None,
                         pos: int = 0, kv: KVStore | None = None, max_elements: int | None = None) -> torch.Tensor:
        """P*V and o_proj in one call (only a reshape lies between them): p [B, Hkv, g*S, T] (query heads
        of a KV group stacked along rows), v [B, Hkv, T or new rows, hd] or None (kept at the projection; P may
        then be padded past the kept rows: model/calls.py) -> [B, S, D]. `output_factor` (the checks, V on the
        device), then `output_product`: a CUDA daemon replays the second as a graph."""
        vd = self.output_factor(p, v, layer=layer, cache=cache, pos=pos, kv=kv, max_elements=max_elements)
        return self.output_product(layer, self.to_device(p), vd)

    def output_factor(self, p: torch.Tensor, v: torch.Tensor | None, *, layer: int, cache: str | None, pos: int,
                      kv: KVStore | None, max_elements: int | None) -> torch.Tensor:
        H, Hkv = self.cfg.num_attention_heads, self.cfg.num_key_value_heads
        if p.dim() != 4 or p.shape[1] != Hkv or p.shape[2] % (H // Hkv):
            raise ProtocolError(f"AttentionOutput expects P [B, {Hkv}, {H // Hkv}*S, T], got {tuple(p.shape)}")
        self._layer(layer, "AttentionOutput")
        check_result_fits((p.shape[0], p.shape[2] // (H // Hkv), self.cfg.hidden_size), max_elements, "AttentionOutput")
        return self.factor(p, v, transpose_b=False, cache=cache, layer=layer, pos=pos, kv=kv, max_elements=None)

    def output_product(self, layer: int, pd: torch.Tensor, vd: torch.Tensor) -> torch.Tensor:
        """P*V (both on the device, checked) then o_proj: [B, S, D]."""
        H, hd = self.cfg.num_attention_heads, self.cfg.head_dim
        B, S = pd.shape[0], pd.shape[2] // (H // self.cfg.num_key_value_heads)
        ctx = grouped_product(pd, vd, transpose_b=False)   # [B, Hkv, g*S, hd]
        # [B, H, S, hd] -> [B, S, H*hd]; with one row (decode) the transpose moves a size-1 dim: a view
        ctx = ctx.view(B, S, H * hd) if S == 1 else ctx.view(B, H, S, hd).transpose(1, 2).reshape(B, S, H * hd)
        return F.linear(ctx if ctx.dtype == self.dtype else ctx.to(self.dtype), self._o_proj[layer])

    def check_lm_head(self, x: torch.Tensor, max_elements: int | None = None) -> tuple[int, int]:
        """LMHead's argument checked: its logits' shape (B, vocabulary), which must fit the reply."""
        D = self.cfg.hidden_size
        if x.dim() not in (2, 3) or x.shape[-1] != D or (x.dim() == 3 and x.shape[1] != 1):
            raise ProtocolError(f"LMHead expects [B, 1, {D}] or [B, {D}], got {tuple(x.shape)}")
        shape = (x.shape[0], self.cfg.vocab_size)
        check_result_fits(shape, max_elements, "LMHead")
        return shape

    def lm_head(self, x: torch.Tensor, max_elements: int | None = None) -> torch.Tensor:
        self.check_lm_head(x, max_elements)
        return self.logits(self.to_device(x))

    def logits(self, xd: torch.Tensor) -> torch.Tensor:
        """float32 logits [B, V] of the checked last-position states `xd` on the compute device."""
        logits = F.linear(xd.reshape(xd.shape[0], self.cfg.hidden_size), self.w.lm_head)
        return logits if logits.dtype == torch.float32 else logits.float()

    def new_kv_store(self, max_bytes: int | None = None) -> KVStore:
        return KVStore(self.cfg, self.device, self.dtype, max_bytes)
