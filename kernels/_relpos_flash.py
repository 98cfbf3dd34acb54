"""Shared Pallas engine: flash attention with a Transformer-XL relative-position term.

Both LaMemo kernels are instances of one problem. Row ``i`` (a query) attends key ``j`` with

    s_ij = ((q_i + u) . k_j + (q_i + vb) . R[c0 - i + j]) * scale,   masked by a problem mask,

and the softmax output ``o_i`` and its log-sum-exp ``lse_i`` are computed online over key blocks
(FlashAttention-2), never materialising an [rows, keys] tensor in HBM. ``rel_attention`` is the
instance with rows = current tokens, keys = [memory; current], c0 = N - 1 (the Transformer-XL
distances); ``lookahead`` is the instance with rows = memory tokens, keys = the incremental window
and c0 = Mb - W + 1 + r_offset (the future distances).

Relative shift inside a tile. For a tile of rows ``i0 .. i0+bq-1`` and keys ``j0 .. j0+bk-1`` the
position indices span ``bq + bk - 1`` consecutive rows of R, so the kernel computes one matmul
``P = (q + vb) @ R_span^T`` of shape [bq, span] and then *skews* it, ``bd[a, b] = P[a, b + bq-1-a]``
(the backward kernels need the inverse, *unskew*). The skew is the only platform-specific piece:

* ``target="tpu"`` (Mosaic): one strided lane rotation, ``pltpu.roll(P, shift, 1, stride=1,
  stride_axis=0)`` (the unskew uses stride ``span - 1``), then a static lane slice.
* ``target="gpu"`` (Triton): Triton has no in-register gather, so the tile makes a round trip
  through a per-program scratch tile in global memory (an extra, discarded output of
  ``bq x span`` floats per program, i.e. O(N * block) in total, never O(N * K)): store,
  ``debug_barrier``, gather-load with the skewed indices, barrier. Because the same scratch tile is
  reused every key block, the Triton kernels run with ``num_stages=1`` (no software pipelining
  that could hoist a scratch load above the store of its own iteration).

Both variants run in interpret mode on CPU (the barrier is dropped there; execution is
sequential), so the tests cover the logic of each.

Layout of the engine's arrays (the wrappers in ``rel_attention.py`` / ``lookahead.py`` transpose,
pad and slice; autodiff handles those jnp ops):

    q [B, H, Nqp, Dp], k/v [B, H, Nkp, Dp], R [H, Tp, Dp], u/vb [H, 1, Dp], scalar [B] int32,
    row statistics [B, H, Nqp, 1] (2-D per block: [block, 1]).

R is edge-padded in the wrapper so that every tile reads an in-bounds, aligned span and an
out-of-range index reads the edge row, which is exactly the reference's ``clip`` (gradient
included: the VJP of edge padding sums into the edge rows).

Backward (given dout, the row term ``delta_i = sum_d dout_i . o_i - dlse_i`` and lse):
``ds = p * (dout @ v^T - delta) * scale``, which carries the lse cotangent exactly. Three kernels
recompute the tiles: dQ (grid over row blocks: dq_content = ds @ K, dq_position = unskew(ds) @
R_span), dK/dV (grid over key blocks) and dR (grid over tile *diagonals*: with square backward
tiles every tile on diagonal g = J - I reads the same R span, so one program accumulates the
position gradient of a whole diagonal, [2*blk, D]; the wrapper overlap-adds the diagonals and sums
the batch: O((N + K) * D) per head, never O(N * K)). du / dvb are the sums of the two dq parts.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

Array = jax.Array

TARGETS = ("gpu", "tpu")
NEG_INF = -float("inf")


# --------------------------------------------------------------------------------- block sizes
@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of the relative-position flash kernels (validated at construction).

    block_q:   rows (queries) per forward tile.
    block_k:   keys per forward tile.
    block_bwd: rows = keys per backward tile (square: the position-gradient kernel works per tile
               diagonal, which needs equal row and key blocks).
    num_warps: warps per program of the compiled GPU (Triton) kernels (1, 2, 4, 8 or 16);
               ignored in interpret mode and on a TPU.

    Every size must be a power of two >= 8. Per target (checked when a kernel is built):
    GPU (Triton) needs >= 16 (``tl.dot`` minimum); compiled TPU (Mosaic) needs ``block_k`` and
    ``block_bwd`` to be multiples of 128 (they are lane dimensions) and ``block_q`` a multiple of 8
    (16 for 16-bit inputs). Blocks larger than the (padded) problem are shrunk automatically,
    except the TPU lane blocks. ``BlockSizes.default(target)`` gives rule-of-thumb defaults (not tuned on hardware).
    """

    block_q: int = 128
    block_k: int = 128
    block_bwd: int = 128
    num_warps: int = 4

    def __post_init__(self):
        for f in ("block_q", "block_k", "block_bwd"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 8 or (v & (v - 1)):
                raise ValueError(f"BlockSizes.{f}={v!r}: must be a power of two >= 8")
        w = self.num_warps
        if not isinstance(w, int) or isinstance(w, bool) or w not in (1, 2, 4, 8, 16):
            raise ValueError(f"BlockSizes.num_warps={w!r}: must be 1, 2, 4, 8 or 16")

    @classmethod
    def parse(cls, text: str) -> "BlockSizes":
        """'block_q,block_k,block_bwd[,num_warps]' (a command-line flag's value)."""
        parts = text.split(",")
        if len(parts) not in (3, 4) or not all(p.strip().isdecimal() and p.strip().isascii()
                                                for p in parts):
            raise ValueError(f"block sizes {text!r}: expected block_q,block_k,block_bwd[,num_warps] "
                             "as integers, e.g. 64,64,32 or 64,64,64,8")
        return cls(*(int(p) for p in parts))

    @classmethod
    def default(cls, target: str, interpret: bool = False) -> "BlockSizes":
        if interpret:
            return cls(128, 128, 128)  # interpret mode: bigger blocks are faster
        if target == "gpu":
            return cls(64, 64, 32)
        return cls(128, 128, 128)

    def check_target(self, target: str, interpret: bool, itemsize: int) -> None:
        if target == "gpu" and not interpret:
            for f in ("block_q", "block_k", "block_bwd"):
                if getattr(self, f) < 16:
                    raise ValueError(f"BlockSizes.{f}={getattr(self, f)}: the GPU (Triton) kernels "
                                     "need blocks >= 16 (tl.dot minimum)")
        elif target == "tpu" and not interpret:
            for f in ("block_k", "block_bwd"):
                if getattr(self, f) % 128:
                    raise ValueError(f"BlockSizes.{f}={getattr(self, f)}: the TPU (Mosaic) kernels "
                                     "need a multiple of 128 (a lane dimension)")
            sub = 16 if itemsize == 2 else 8
            if self.block_q % sub:
                raise ValueError(f"BlockSizes.block_q={self.block_q}: the TPU kernels need a "
                                 f"multiple of {sub} for this dtype")


def resolve_target(target: Optional[str], interpret: bool) -> str:
    """'gpu' | 'tpu': the kernel variant. None: from the default backend.

    In interpret mode on CPU the default is the 'gpu' variant: its skew (a scratch round trip)
    interprets as O(1) XLA ops, while the generic interpretation of the TPU strided roll unrolls
    one roll per tile row (5x longer compiles at 128-row blocks). Both are tested.
    """
    if target is not None:
        if target not in TARGETS:
            raise ValueError(f"target={target!r}: choose one of {TARGETS} (or None)")
        return target
    backend = jax.default_backend()
    if backend in ("gpu", "cuda", "rocm"):
        return "gpu"
    if backend == "tpu":
        return "tpu"
    if interpret:
        return "gpu"
    raise RuntimeError(
        f"the Pallas kernels need a GPU or TPU backend (this process runs on {backend!r}); pass "
        "interpret=True to run them in interpret mode, or target='gpu'/'tpu' to lower them for "
        "another platform")


# --------------------------------------------------------------------------------- problem
@dataclasses.dataclass(frozen=True)
class Problem:
    """Static description of one attention instance (hashable: a custom_vjp nondiff argument).

    kind "rel": rows = N current tokens, keys = K = mb + N; allowed iff j <= mb + i, j >= s
    (s = key_start[b]) and, with same_length, j > i.
    kind "lookahead": rows = mb memory tokens, keys = the W window rows c = mb - W + 1 + j;
    allowed iff j < W and (c >= mb - s + 1 or j == W - 1) (s = mem_valid[b]) and, if causal,
    c > i. The position index of (i, j) is c0 - i + j in both.
    """

    kind: str
    nq: int
    nk: int
    c0: int
    scale: float
    mb: int
    same_length: bool = False
    causal: bool = True

    def mask(self, rows, cols, s):
        """rows [bq, 1], cols [1, bk] (int32), s scalar -> bool [bq, bk]."""
        if self.kind == "rel":
            ok = (cols <= rows + self.mb) & (cols >= s)
            if self.same_length:
                ok = ok & (cols > rows)
            return ok
        w = self.nk
        c = cols + (self.mb - w + 1)
        ok = ((c >= self.mb - s + 1) | (cols == w - 1)) & (cols < w)
        if self.causal:
            ok = ok & (c > rows)
        return ok

    # Conservative tile ranges (the mask stays exact; these only skip fully masked tiles).
    def key_blocks(self, i0, bq: int, bk: int, nkb: int, s):
        """[lo, hi) key blocks for the row block starting at i0."""
        if self.kind != "rel":
            return 0, nkb
        hi = jnp.minimum(nkb, (i0 + bq - 1 + self.mb) // bk + 1)
        first = jnp.maximum(s, i0 + 1) if self.same_length else s
        lo = jnp.minimum(first // bk, hi)
        return lo, hi

    def row_blocks(self, j0, bq: int, bk: int, nqb: int, s):
        """[lo, hi) row blocks for the key block starting at j0."""
        if self.kind != "rel":
            return 0, nqb
        lo = jnp.minimum(jnp.maximum(j0 - self.mb, 0) // bq, nqb)
        hi = jnp.minimum(nqb, (j0 + bk - 2) // bq + 1) if self.same_length else nqb
        hi = jnp.where(j0 + bk <= s, lo, jnp.maximum(hi, lo))
        return lo, hi


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Static tiling / padding plan (hashable). Built by ``make_tiling``."""

    target: str
    interpret: bool
    bq: int
    bk: int
    blk: int
    nqp: int
    nkp: int
    dp: int
    span_f: int
    align: int  # sublane alignment of dynamic R slices (TPU: 8 rows for 32-bit, 16 for 16-bit)
    num_warps: int  # per program of the compiled Triton kernels
    x: int  # c0 + front_pad + 1: R row (padded coordinates) of the span start is x - bq + j0 - i0
    front: int
    tp: int

    @property
    def nqb(self):
        return self.nqp // self.bq

    @property
    def nkb(self):
        return self.nkp // self.bk

    @property
    def nqb_b(self):
        return self.nqp // self.blk

    @property
    def nkb_b(self):
        return self.nkp // self.blk

    @property
    def n_diag(self):
        return self.nqb_b + self.nkb_b - 1


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _round_up(n: int, m: int) -> int:
    return -(-int(n) // m) * m


def make_tiling(target: str, interpret: bool, bs: BlockSizes, nq: int, nk: int, c0: int,
                d: int, dtype) -> Tiling:
    itemsize = jnp.dtype(dtype).itemsize
    bs.check_target(target, interpret, itemsize)
    if target == "gpu":
        least = 8 if interpret else 16  # tl.dot needs >= 16; interpret mode does not
        unit = lambda n: max(least, _next_pow2(n))
        bq = min(bs.block_q, unit(nq))
        bk = min(bs.block_k, unit(nk))
        blk = min(bs.block_bwd, unit(max(nq, nk)))
        dp = unit(d)
        span_f = _next_pow2(bq + bk - 1)
        align = 1
    else:
        sub = 16 if itemsize == 2 else 8
        bq = min(bs.block_q, _next_pow2(max(nq, sub)))
        if interpret:
            bk = min(bs.block_k, _next_pow2(max(nk, 8)))
            blk = min(bs.block_bwd, _next_pow2(max(nq, nk, sub)))
            dp = d
            span_f = _round_up(bq + bk - 1, 8)
        else:  # key blocks are lane dimensions: keep them at >= 128
            bk, blk = bs.block_k, bs.block_bwd
            dp = _round_up(d, 128)
            span_f = _round_up(bq + bk - 1, 128)
        align = sub
    nqp = _round_up(nq, math.lcm(bq, blk))
    nkp = _round_up(nk, math.lcm(bk, blk))
    a = math.lcm(blk, align)
    x = _round_up(max(nqp, c0 + 1), a)
    front = x - 1 - c0
    tp = max(x - bq + nkp - bk + span_f, x + nkp)
    tp = _round_up(tp, math.lcm(blk, 8))
    return Tiling(target=target, interpret=interpret, bq=bq, bk=bk, blk=blk, nqp=nqp, nkp=nkp,
                  dp=dp, span_f=span_f, align=align, num_warps=bs.num_warps, x=x, front=front, tp=tp)


def pad_positions(r_THD: Array, t: Tiling) -> Array:
    """[T, H, D] -> [H, Tp, Dp]: edge-padded rows (the reference's clip), zero-padded head dim."""
    n = r_THD.shape[0]
    back = t.tp - t.front - n
    if back < 0:
        r_THD = r_THD[: n + back]
        back = 0
    r = jnp.pad(r_THD, ((t.front, back), (0, 0), (0, 0)), mode="edge")
    r = jnp.pad(r, ((0, 0), (0, 0), (0, t.dp - r.shape[-1])))
    return jnp.transpose(r, (1, 0, 2))


def to_kernel_layout(x_BNHD: Array, n_pad: int, d_pad: int) -> Array:
    """[B, N, H, D] -> [B, H, Np, Dp] (zero padding)."""
    b, n, h, d = x_BNHD.shape
    x = jnp.pad(x_BNHD, ((0, 0), (0, n_pad - n), (0, 0), (0, d_pad - d)))
    return jnp.transpose(x, (0, 2, 1, 3))


def from_kernel_layout(x_BHND: Array, n: int, d: int) -> Array:
    return jnp.transpose(x_BHND[:, :, :n, :d], (0, 2, 1, 3))


def bias_layout(b_HD: Array, d_pad: int) -> Array:
    return jnp.pad(b_HD, ((0, 0), (0, d_pad - b_HD.shape[-1])))[:, None, :]


def stats_layout(x_BNH: Array, n_pad: int, fill=0.0) -> Array:
    """[B, N, H] -> [B, H, Np, 1]."""
    x = jnp.pad(x_BNH, ((0, 0), (0, n_pad - x_BNH.shape[1]), (0, 0)), constant_values=fill)
    return jnp.transpose(x, (0, 2, 1))[..., None]


def stats_from_layout(x_BHN1: Array, n: int) -> Array:
    return jnp.transpose(x_BHN1[:, :, :n, 0], (0, 2, 1))


# --------------------------------------------------------------------------------- tile helpers
def _precision(dtype):
    """float32 tiles follow jax_default_matmul_precision like the XLA reference does: the default
    lets the GPU use TF32 tensor cores (as XLA's own float32 dots do there; measured on an H200:
    full-precision float32 tiles made the kernel 10-20x slower than XLA), and
    ``jax.default_matmul_precision("highest")`` gives exact float32 on both paths (the tests and
    the self-check use that). CPU interpret mode computes float32 exactly either way."""
    if jnp.dtype(dtype) != jnp.float32:
        return None
    setting = str(jax.config.jax_default_matmul_precision or "").lower()
    return lax.Precision.HIGHEST if setting in ("highest", "float32", "precision.highest") else None


def _dot(a, b, contract, out_dtype):
    """2-D dot_general: contract = ((lhs dim,), (rhs dim,)); accumulates in out_dtype."""
    prec = _precision(a.dtype)
    return lax.dot_general(a, b, (contract, ((), ())), preferred_element_type=out_dtype,
                           precision=None if prec is None else (prec, prec))


def _dot_nt(a, b, sdt):  # a [m, k], b [n, k] -> [m, n]
    return _dot(a, b, ((1,), (1,)), sdt)


def _dot_nn(a, b, sdt):  # a [m, k], b [k, n] -> [m, n]
    return _dot(a, b, ((1,), (0,)), sdt)


def _dot_tn(a, b, sdt):  # a [k, m], b [k, n] -> [m, n]
    return _dot(a, b, ((0,), (0,)), sdt)


def _iota(shape, dim):
    return lax.broadcasted_iota(jnp.int32, shape, dim)


def _i32(x):
    """Index scalars stay int32 (Mosaic wants i32; under jax_enable_x64 Python ints are i64)."""
    return jnp.asarray(x, jnp.int32)


def _barrier(t: Tiling):
    if t.target == "gpu" and not t.interpret:
        plgpu.debug_barrier()


def _skew(pfull, rows_n: int, cols_n: int, t: Tiling, scratch_ref):
    """out[a, b] = pfull[a, b + rows_n - 1 - a] for a < rows_n, b < cols_n."""
    span = pfull.shape[1]
    if t.target == "tpu":
        rolled = pltpu.roll(pfull, _i32(span - rows_n + 1), 1, stride=1, stride_axis=0)
        return rolled[:, :cols_n]
    _barrier(t)
    scratch_ref[:, pl.ds(0, span)] = pfull
    _barrier(t)
    a = _iota((rows_n, cols_n), 0)
    e = _iota((rows_n, cols_n), 1) + (rows_n - 1) - a
    return scratch_ref[a, e]


def _unskew(ds, span: int, t: Tiling, scratch_ref):
    """out[a, e] = ds[a, e - (rows_n - 1 - a)] where that index is in range, else 0."""
    rows_n, cols_n = ds.shape
    if t.target == "tpu":
        x = jnp.concatenate([ds, jnp.zeros((rows_n, span - cols_n), ds.dtype)], axis=1)
        return pltpu.roll(x, _i32(rows_n - 1), 1, stride=span - 1, stride_axis=0)
    _barrier(t)
    scratch_ref[:, pl.ds(0, cols_n)] = ds
    _barrier(t)
    a = _iota((rows_n, span), 0)
    b = _iota((rows_n, span), 1) - (rows_n - 1) + a
    ok = (b >= 0) & (b < cols_n)
    vals = scratch_ref[a, jnp.clip(b, 0, cols_n - 1)]
    return jnp.where(ok, vals, jnp.zeros_like(vals))


def _scores(prob: Problem, t: Tiling, qu, qv, k, r_span, rows, cols, s, sdt, scratch_ref):
    """Masked, scaled scores of one tile (rows x keys), -inf where masked."""
    ac = _dot_nt(qu, k, sdt)
    pfull = _dot_nt(qv, r_span, sdt)
    bd = _skew(pfull, qu.shape[0], k.shape[0], t, scratch_ref)
    sc = (ac + bd) * prob.scale
    return jnp.where(prob.mask(rows, cols, s), sc, NEG_INF)


def _safe_lse(lse):
    """Fully masked rows have lse = -inf; their p must be 0, not exp(-inf + inf)."""
    return jnp.where(lse == NEG_INF, jnp.zeros_like(lse), lse)


# --------------------------------------------------------------------------------- forward
def _fwd_kernel(prob: Problem, t: Tiling, sdt, epilogue, n_extra: int, n_out: int, *refs):
    s_ref, q_ref, k_ref, v_ref, r_ref, u_ref, vb_ref = refs[:7]
    extra_refs = refs[7:7 + n_extra]
    out_refs = refs[7 + n_extra:7 + n_extra + n_out]
    scratch_ref = refs[7 + n_extra + n_out] if t.target == "gpu" else None
    b, iq = pl.program_id(0), pl.program_id(2)
    s = s_ref[b]
    bq, bk = t.bq, t.bk
    i0 = iq * bq
    q = q_ref[...]
    qu = q + u_ref[...]
    qv = q + vb_ref[...]
    rows = i0 + _iota((bq, 1), 0)
    lo, hi = prob.key_blocks(i0, bq, bk, t.nkb, s)

    def body(jb, carry):
        m, l, acc = carry
        j0 = jb * bk
        if t.target == "tpu":
            j0 = pl.multiple_of(j0, bk)
        k = k_ref[pl.ds(j0, bk), :]
        v = v_ref[pl.ds(j0, bk), :]
        s0 = t.x - bq + j0 - i0
        if t.target == "tpu":
            s0 = pl.multiple_of(s0, t.align)
        r_span = r_ref[pl.ds(s0, t.span_f), :]
        cols = j0 + _iota((1, bk), 1)
        sc = _scores(prob, t, qu, qv, k, r_span, rows, cols, s, sdt, scratch_ref)
        m_new = jnp.maximum(m, jnp.max(sc, axis=1, keepdims=True))
        m_use = jnp.where(m_new == NEG_INF, jnp.zeros_like(m_new), m_new)
        corr = jnp.exp(m - m_use)
        p = jnp.exp(sc - m_use)
        l = corr * l + jnp.sum(p, axis=1, keepdims=True)
        acc = corr * acc + _dot_nn(p.astype(v.dtype), v, sdt)
        return m_new, l, acc

    init = (jnp.full((bq, 1), NEG_INF, sdt), jnp.zeros((bq, 1), sdt), jnp.zeros((bq, t.dp), sdt))
    m, l, acc = lax.fori_loop(_i32(lo), _i32(hi), body, init)
    out = acc / l
    lse = m + jnp.log(l)
    epilogue(rows=rows, s=s, out=out, lse=lse, l=l, extra_refs=extra_refs, out_refs=out_refs)


def _compiler_params(t: Tiling, n_grid: int):
    if t.interpret:
        return None
    if t.target == "gpu":
        return plgpu.CompilerParams(num_warps=t.num_warps, num_stages=1)
    return pltpu.CompilerParams(dimension_semantics=("parallel",) * n_grid)


def _scalar_spec(t: Tiling):
    if t.target == "tpu":
        return pl.BlockSpec(memory_space=pltpu.SMEM)
    return pl.BlockSpec()


def _full_bh(n: int, d: int):
    return pl.BlockSpec((None, None, n, d), lambda b, h, i: (b, h, 0, 0))


def _blocked_bh(n: int, d: int):
    return pl.BlockSpec((None, None, n, d), lambda b, h, i: (b, h, i, 0))


def _per_head(n: int, d: int):
    return pl.BlockSpec((None, n, d), lambda b, h, i: (h, 0, 0))


def _scratch(t: Tiling, batch: int, heads: int, nprog: int, rows: int, cols: int, sdt):
    """GPU only: per-program skew scratch tile (an extra output that the wrapper discards)."""
    shape = jax.ShapeDtypeStruct((batch, heads, nprog, rows, cols), sdt)
    spec = pl.BlockSpec((None, None, None, rows, cols), lambda b, h, i: (b, h, i, 0, 0))
    return shape, spec


def flash_forward(prob: Problem, t: Tiling, scal, q, k, v, r, u, vb, *, extras: Sequence[Array],
                  out_shapes: Sequence[jax.ShapeDtypeStruct], epilogue: Callable, name: str):
    """Runs the forward kernel. ``extras`` / ``out_shapes`` are row-blocked [B, H, Nqp, X] arrays
    that the epilogue reads / writes. Returns the list of outputs."""
    bsz, heads = q.shape[0], q.shape[1]
    sdt = jnp.promote_types(q.dtype, jnp.float32)
    in_specs = [_scalar_spec(t), _blocked_bh(t.bq, t.dp), _full_bh(t.nkp, t.dp),
                _full_bh(t.nkp, t.dp), _per_head(t.tp, t.dp), _per_head(1, t.dp),
                _per_head(1, t.dp)]
    in_specs += [_blocked_bh(t.bq, x.shape[-1]) for x in extras]
    out_specs = [_blocked_bh(t.bq, o.shape[-1]) for o in out_shapes]
    out_shapes = list(out_shapes)
    if t.target == "gpu":
        shp, spec = _scratch(t, bsz, heads, t.nqb, t.bq, t.span_f, sdt)
        out_shapes.append(shp)
        out_specs.append(spec)
    kernel = functools.partial(_fwd_kernel, prob, t, sdt, epilogue, len(extras),
                               len(out_specs) - (t.target == "gpu"))
    outs = pl.pallas_call(
        kernel, grid=(bsz, heads, t.nqb), in_specs=in_specs, out_specs=out_specs,
        out_shape=out_shapes, interpret=t.interpret, compiler_params=_compiler_params(t, 3),
        name=name)(scal, q, k, v, r, u, vb, *extras)
    return list(outs[:len(outs) - (t.target == "gpu")])


# --------------------------------------------------------------------------------- backward
def _dq_kernel(prob: Problem, t: Tiling, sdt, s_ref, q_ref, k_ref, v_ref, r_ref, u_ref, vb_ref,
               do_ref, lse_ref, dl_ref, dqa_ref, dqb_ref, scratch_ref=None):
    b, iq = pl.program_id(0), pl.program_id(2)
    s = s_ref[b]
    blk = t.blk
    i0 = iq * blk
    q = q_ref[...]
    qu = q + u_ref[...]
    qv = q + vb_ref[...]
    do = do_ref[...]
    lse = _safe_lse(lse_ref[...])
    delta = dl_ref[...]
    rows = i0 + _iota((blk, 1), 0)
    lo, hi = prob.key_blocks(i0, blk, blk, t.nkb_b, s)

    def body(jb, carry):
        dqa, dqb = carry
        j0 = jb * blk
        if t.target == "tpu":
            j0 = pl.multiple_of(j0, blk)
        k = k_ref[pl.ds(j0, blk), :]
        v = v_ref[pl.ds(j0, blk), :]
        s0 = t.x - blk + j0 - i0
        if t.target == "tpu":
            s0 = pl.multiple_of(s0, blk)
        r_span = r_ref[pl.ds(s0, 2 * blk), :]
        cols = j0 + _iota((1, blk), 1)
        sc = _scores(prob, t, qu, qv, k, r_span, rows, cols, s, sdt, scratch_ref)
        p = jnp.exp(sc - lse)
        dp = _dot_nt(do.astype(v.dtype), v, sdt)
        ds = p * (dp - delta) * prob.scale
        dqa = dqa + _dot_nn(ds.astype(k.dtype), k, sdt)
        ds_full = _unskew(ds, 2 * blk, t, scratch_ref)
        dqb = dqb + _dot_nn(ds_full.astype(r_span.dtype), r_span, sdt)
        return dqa, dqb

    zeros = jnp.zeros((blk, t.dp), sdt)
    dqa, dqb = lax.fori_loop(_i32(lo), _i32(hi), body, (zeros, zeros))
    dqa_ref[...] = dqa.astype(dqa_ref.dtype)
    dqb_ref[...] = dqb.astype(dqb_ref.dtype)


def _dkv_kernel(prob: Problem, t: Tiling, sdt, s_ref, q_ref, k_ref, v_ref, r_ref, u_ref, vb_ref,
                do_ref, lse_ref, dl_ref, dk_ref, dv_ref, scratch_ref=None):
    b, jk = pl.program_id(0), pl.program_id(2)
    s = s_ref[b]
    blk = t.blk
    j0 = jk * blk
    k = k_ref[...]
    v = v_ref[...]
    u = u_ref[...]
    vb = vb_ref[...]
    cols = j0 + _iota((1, blk), 1)
    lo, hi = prob.row_blocks(j0, blk, blk, t.nqb_b, s)

    def body(ib, carry):
        dk, dv = carry
        i0 = ib * blk
        if t.target == "tpu":
            i0 = pl.multiple_of(i0, blk)
        q = q_ref[pl.ds(i0, blk), :]
        qu = q + u
        qv = q + vb
        do = do_ref[pl.ds(i0, blk), :]
        lse = _safe_lse(lse_ref[pl.ds(i0, blk), :])
        delta = dl_ref[pl.ds(i0, blk), :]
        s0 = t.x - blk + j0 - i0
        if t.target == "tpu":
            s0 = pl.multiple_of(s0, blk)
        r_span = r_ref[pl.ds(s0, 2 * blk), :]
        rows = i0 + _iota((blk, 1), 0)
        sc = _scores(prob, t, qu, qv, k, r_span, rows, cols, s, sdt, scratch_ref)
        p = jnp.exp(sc - lse)
        dv = dv + _dot_tn(p.astype(v.dtype), do.astype(v.dtype), sdt)
        dp = _dot_nt(do.astype(v.dtype), v, sdt)
        ds = p * (dp - delta) * prob.scale
        dk = dk + _dot_tn(ds.astype(qu.dtype), qu, sdt)
        return dk, dv

    zeros = jnp.zeros((blk, t.dp), sdt)
    dk, dv = lax.fori_loop(_i32(lo), _i32(hi), body, (zeros, zeros))
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dr_kernel(prob: Problem, t: Tiling, sdt, s_ref, q_ref, k_ref, v_ref, r_ref, u_ref, vb_ref,
               do_ref, lse_ref, dl_ref, dr_ref, scratch_ref=None):
    """One program per tile diagonal g = J - I: all its tiles read the same R span."""
    b, gi = pl.program_id(0), pl.program_id(2)
    s = s_ref[b]
    blk = t.blk
    g = gi - (t.nqb_b - 1)
    s0 = t.x - blk + g * blk
    if t.target == "tpu":
        s0 = pl.multiple_of(s0, blk)
    r_span = r_ref[pl.ds(s0, 2 * blk), :]
    u = u_ref[...]
    vb = vb_ref[...]
    lo = jnp.maximum(0, -g)
    hi = jnp.minimum(t.nqb_b, t.nkb_b - g)
    if prob.kind == "rel":  # causal: the tile (I, I+g) is empty when g*blk > mb + blk - 1
        hi = jnp.where(g * blk > prob.mb + blk - 1, lo, hi)

    def body(ib, dr):
        i0 = ib * blk
        j0 = (ib + g) * blk
        if t.target == "tpu":
            i0 = pl.multiple_of(i0, blk)
            j0 = pl.multiple_of(j0, blk)
        q = q_ref[pl.ds(i0, blk), :]
        qu = q + u
        qv = q + vb
        k = k_ref[pl.ds(j0, blk), :]
        v = v_ref[pl.ds(j0, blk), :]
        do = do_ref[pl.ds(i0, blk), :]
        lse = _safe_lse(lse_ref[pl.ds(i0, blk), :])
        delta = dl_ref[pl.ds(i0, blk), :]
        rows = i0 + _iota((blk, 1), 0)
        cols = j0 + _iota((1, blk), 1)
        sc = _scores(prob, t, qu, qv, k, r_span, rows, cols, s, sdt, scratch_ref)
        p = jnp.exp(sc - lse)
        dp = _dot_nt(do.astype(v.dtype), v, sdt)
        ds = p * (dp - delta) * prob.scale
        ds_full = _unskew(ds, 2 * blk, t, scratch_ref)
        return dr + _dot_tn(ds_full.astype(qv.dtype), qv, sdt)

    dr = lax.fori_loop(_i32(lo), _i32(hi), body, jnp.zeros((2 * blk, t.dp), sdt))
    dr_ref[...] = dr.astype(dr_ref.dtype)


def flash_backward(prob: Problem, t: Tiling, scal, q, k, v, r, u, vb, lse, dout, delta):
    """Gradients of the flash core. dout [B,H,Nqp,Dp]; lse, delta [B,H,Nqp,1] (stat dtype).

    Returns (dq, dk, dv, dr, du, dvb) in kernel layout (dr: [H, Tp, Dp]; du/dvb: [H, 1, Dp]).
    """
    bsz, heads = q.shape[0], q.shape[1]
    sdt = jnp.promote_types(q.dtype, jnp.float32)
    blk, dp = t.blk, t.dp
    args = (scal, q, k, v, r, u, vb, dout, lse, delta)
    gpu = t.target == "gpu"
    cp = _compiler_params(t, 3)

    def call(kernel, grid_n, in_specs, out_shapes, out_specs, scratch_cols, name):
        out_shapes, out_specs = list(out_shapes), list(out_specs)
        if gpu:
            shp, spec = _scratch(t, bsz, heads, grid_n, blk, scratch_cols, sdt)
            out_shapes.append(shp)
            out_specs.append(spec)
        outs = pl.pallas_call(
            functools.partial(kernel, prob, t, sdt), grid=(bsz, heads, grid_n),
            in_specs=in_specs, out_specs=out_specs, out_shape=out_shapes,
            interpret=t.interpret, compiler_params=cp, name=name)(*args)
        return outs[:len(outs) - gpu]

    common = [_scalar_spec(t)]
    # dQ: grid over row blocks.
    dq_in = common + [_blocked_bh(blk, dp), _full_bh(t.nkp, dp), _full_bh(t.nkp, dp),
                      _per_head(t.tp, dp), _per_head(1, dp), _per_head(1, dp),
                      _blocked_bh(blk, dp), _blocked_bh(blk, 1), _blocked_bh(blk, 1)]
    dq_shape = jax.ShapeDtypeStruct((bsz, heads, t.nqp, dp), sdt)
    dqa, dqb = call(_dq_kernel, t.nqb_b, dq_in, [dq_shape, dq_shape],
                    [_blocked_bh(blk, dp)] * 2, 2 * blk, "relpos_flash_dq")
    # dK, dV: grid over key blocks.
    dkv_in = common + [_full_bh(t.nqp, dp), _blocked_bh(blk, dp), _blocked_bh(blk, dp),
                       _per_head(t.tp, dp), _per_head(1, dp), _per_head(1, dp),
                       _full_bh(t.nqp, dp), _full_bh(t.nqp, 1), _full_bh(t.nqp, 1)]
    dk_shape = jax.ShapeDtypeStruct((bsz, heads, t.nkp, dp), sdt)
    dk, dv = call(_dkv_kernel, t.nkb_b, dkv_in, [dk_shape, dk_shape],
                  [_blocked_bh(blk, dp)] * 2, 2 * blk, "relpos_flash_dkv")
    # dR: grid over tile diagonals.
    dr_in = common + [_full_bh(t.nqp, dp), _full_bh(t.nkp, dp), _full_bh(t.nkp, dp),
                      _per_head(t.tp, dp), _per_head(1, dp), _per_head(1, dp),
                      _full_bh(t.nqp, dp), _full_bh(t.nqp, 1), _full_bh(t.nqp, 1)]
    dr_shape = jax.ShapeDtypeStruct((bsz, heads, t.n_diag, 2 * blk, dp), sdt)
    dr_spec = pl.BlockSpec((None, None, None, 2 * blk, dp), lambda b, h, i: (b, h, i, 0, 0))
    (dr_diag,) = call(_dr_kernel, t.n_diag, dr_in, [dr_shape], [dr_spec], 2 * blk,
                      "relpos_flash_dr")
    dr = _overlap_add_diagonals(jnp.sum(dr_diag, axis=0), t)
    du = jnp.sum(dqa, axis=(0, 2))[:, None, :]
    dvb = jnp.sum(dqb, axis=(0, 2))[:, None, :]
    return dqa + dqb, dk, dv, dr, du, dvb


def _overlap_add_diagonals(dr_diag: Array, t: Tiling) -> Array:
    """[H, n_diag, 2*blk, Dp] (diagonal g covers R rows (x/blk - 1 + g)*blk .. +2*blk) -> [H, Tp, Dp]."""
    heads, nd, _, dp = dr_diag.shape
    blk = t.blk
    first = t.x // blk - 1 - (t.nqb_b - 1)  # block index of the lowest diagonal's span
    lo, hi = dr_diag[:, :, :blk], dr_diag[:, :, blk:]
    blocks = (jnp.pad(lo, ((0, 0), (0, 1), (0, 0), (0, 0)))
              + jnp.pad(hi, ((0, 0), (1, 0), (0, 0), (0, 0))))  # [H, nd + 1, blk, Dp]
    n_blocks = t.tp // blk
    blocks = jnp.pad(blocks, ((0, 0), (first, n_blocks - first - nd - 1), (0, 0), (0, 0)))
    return blocks.reshape(heads, t.tp, dp)
