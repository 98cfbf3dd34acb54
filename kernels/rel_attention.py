"""Transformer-XL relative attention of the current rows over [memory; current].

This file holds the plain-jnp reference (the function the model runs on the XLA path, and the
single source of truth every other implementation is tested against) and the Pallas kernel
``rel_attention_pallas`` (flash-style, forward and backward in Pallas, see the end of the file and
``kernels/_relpos_flash.py``).

Layout (batch-major): the attention input has K = Mb + N rows, memory rows first. ``Mb`` is the
memory *buffer* size; the valid memory rows of batch row b are the last ``Mb - key_start[b]`` of
them (right-aligned, oldest first), so the distance of current row i (row Mb+i) to key j is
always ``Mb + i - j`` whatever the number of valid rows.

Score of current row i and key j (spec section 1):
    s_ij = ((q_i + u) . k_j + (q_i + v) . r[N-1-i+j]) * scale,
where ``r[t]`` is the projected position vector of distance ``K-1-t`` (the caller clamps distances
and applies position dropout before projecting). Keys j > Mb+i (future), j < key_start[b] (empty
memory slots) and, with ``same_length``, j <= i are masked.

Memory: the reference materialises the [B, H, N, K] score tensor (O(N*K), as the original).
"""

from __future__ import annotations

from typing import Optional

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from kernels import _relpos_flash as flash
from kernels._relpos_flash import BlockSizes
from kernels.softmax import GPU_BACKENDS, BackendSwitch, softmax_lse, stat_dtype

Array = jax.Array


# How the position scores' matmul is batched (read when a function is traced; set it with
# ``kernels.set_batched_positions``). False: r is shared by the batch rows, one product per head
# over all B*N rows; XLA then lays the result out as [H, rows, K] and transposes it for the shift
# (the fastest form on CPU: the broadcast form was 1.1-1.4x slower there, fwd+bwd at the 2-layer
# benchmark sizes). True: r broadcast over the batch, so the product is batched over (B, H) like
# the content scores and comes out in their layout (the wt103 bf16 training step on an H100, with
# the backward below: 98.2 -> 93.5 ms, docs/benchmarks.md). None: by backend, True on a
# GPU. The same values either way (tested in float32 and
# bfloat16, outputs and gradients): ``batched_position_product`` sums r's gradient over the batch
# in the stat dtype and rounds it once, as the shared product does.
BATCHED_POSITIONS = BackendSwitch("batched_positions", GPU_BACKENDS)
batched_positions = BATCHED_POSITIONS
set_batched_positions = BATCHED_POSITIONS.set
forced_batched_positions = BATCHED_POSITIONS.forced


def _broadcast_batch(r: Array, like: Array) -> Array:
    return jnp.broadcast_to(r, (like.shape[0],) + r.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def batched_position_product(spec: str, qv: Array, r: Array) -> Array:
    """einsum(spec, qv, r broadcast over qv's leading batch axis), in the stat dtype. ``spec`` is
    written for the broadcast operand ("bihd,bjhd->bhij"). The backward computes r's gradient
    per batch row in the stat dtype and sums it there, rounding once: plain autodiff would round
    each row's gradient to a bf16 r's dtype before the sum over the batch."""
    return jnp.einsum(spec, qv, _broadcast_batch(r, qv), preferred_element_type=stat_dtype(qv.dtype))


def _bpp_fwd(spec, qv, r):
    return batched_position_product(spec, qv, r), (qv, r)


def _bpp_bwd(spec, res, ds):
    qv, r = res
    lhs, rhs_out = spec.split(",")
    rhs, out = rhs_out.split("->")
    sdt = ds.dtype
    dqv = jnp.einsum(f"{out},{rhs}->{lhs}", ds, _broadcast_batch(r, qv), preferred_element_type=sdt)
    dr = jnp.einsum(f"{out},{lhs}->{rhs}", ds, qv, preferred_element_type=sdt)
    return dqv.astype(qv.dtype), jnp.sum(dr, axis=0).astype(r.dtype)


batched_position_product.defvjp(_bpp_fwd, _bpp_bwd)


def rel_shift_past(bd_BHNK: Array) -> Array:
    """out[..., i, j] = bd[..., i, N-1-i+j] for j <= K-N+i (the causal region; other entries
    hold other scores and must be masked).

    The Transformer-XL pad-and-reshape shift: only pads, reshapes and slices (whose gradients
    are the same), no gather/scatter, which is slow on CPU and in reverse mode everywhere.
    """
    n, k = bd_BHNK.shape[-2:]
    lead = bd_BHNK.shape[:-2]
    x = jnp.pad(bd_BHNK, [(0, 0)] * len(lead) + [(0, 0), (1, 0)])  # [..., N, K+1]
    x = x.reshape(lead + (k + 1, n))[..., 1:, :]  # drop the first N flat elements
    return x.reshape(lead + (n, k))


def rel_attention_mask(n: int, k: int, key_start_B: Array, same_length: bool) -> Array:
    """Boolean [B, 1, N, K] mask of the keys each current row may attend."""
    mb = k - n
    i = jnp.arange(n)[:, None]
    j = jnp.arange(k)[None, :]
    allowed = j <= mb + i
    if same_length:
        allowed = allowed & (j > i)
    allowed = allowed[None] & (j[None] >= key_start_B[:, None, None])
    return allowed[:, None]


def rel_attention_probs(q_BNHD: Array, k_BKHD: Array, r_KHD: Array, u_HD: Array, vbias_HD: Array,
                        key_start_B: Array, *, scale: float, same_length: bool = False):
    """Attention probabilities [B, H, N, K] and log-sum-exp [B, H, N] of the current rows (stat dtype)."""
    n, k = q_BNHD.shape[1], k_BKHD.shape[1]
    sdt = stat_dtype(q_BNHD.dtype)
    ac = jnp.einsum("bihd,bjhd->bhij", q_BNHD + u_HD, k_BKHD, preferred_element_type=sdt)
    if batched_positions():
        bd = batched_position_product("bihd,bjhd->bhij", q_BNHD + vbias_HD, r_KHD)
    else:
        bd = jnp.einsum("bihd,jhd->bhij", q_BNHD + vbias_HD, r_KHD, preferred_element_type=sdt)
    s = (ac + rel_shift_past(bd)) * scale
    mask = rel_attention_mask(n, k, key_start_B, same_length)
    s = jnp.where(mask, s, -jnp.inf)
    return softmax_lse(s)


def attention_mass_by_distance(p_BHNK: Array) -> Array:
    """[K]: attention mass at each distance d = Mb + i - j, averaged over batch, heads and rows."""
    b, h, n, k = p_BHNK.shape
    i = np.arange(n)[:, None]
    j = np.arange(k)[None, :]
    dist = np.clip(k - n + i - j, 0, k - 1)  # masked (future) entries have p = 0
    return jnp.zeros((k,), p_BHNK.dtype).at[dist.ravel()].add(p_BHNK.sum((0, 1)).ravel()) / (b * h * n)


def rel_attention_reference(
    q_BNHD: Array,
    k_BKHD: Array,
    v_BKHD: Array,
    r_KHD: Array,
    u_HD: Array,
    vbias_HD: Array,
    key_start_B: Array,
    *,
    scale: float,
    same_length: bool = False,
    dropatt: float = 0.0,
    dropout_rng: Optional[Array] = None,
) -> tuple[Array, Array]:
    """Relative attention of the N current rows. Returns (out [B,N,H,D], lse [B,N,H]).

    ``lse`` is the log-sum-exp of the scaled, masked scores (LaMemo caches it). Scores, softmax and
    lse are computed in ``stat_dtype`` (float32 for bf16/fp32 inputs, float64 for float64).
    ``dropatt`` > 0 with a ``dropout_rng`` drops attention probabilities (training only).
    """
    sdt = stat_dtype(q_BNHD.dtype)
    p, lse = rel_attention_probs(q_BNHD, k_BKHD, r_KHD, u_HD, vbias_HD, key_start_B, scale=scale,
                                 same_length=same_length)
    if dropatt > 0.0 and dropout_rng is not None:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropatt, p.shape)
        p = jnp.where(keep, p / (1.0 - dropatt), 0.0)
    out = jnp.einsum("bhij,bjhd->bihd", p.astype(v_BKHD.dtype), v_BKHD,
                     preferred_element_type=sdt).astype(v_BKHD.dtype)
    return out, jnp.transpose(lse, (0, 2, 1))


# ================================================================================ Pallas kernel
def _rel_epilogue(*, rows, s, out, lse, l, extra_refs, out_refs):
    o_ref, lse_ref = out_refs
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse.astype(lse_ref.dtype)


def _rel_forward(prob, t, scal, q, k, v, r, u, vb):
    sdt = stat_dtype(q.dtype)
    bsz, heads = q.shape[:2]
    out_shapes = [jax.ShapeDtypeStruct((bsz, heads, t.nqp, t.dp), v.dtype),
                  jax.ShapeDtypeStruct((bsz, heads, t.nqp, 1), sdt)]
    out, lse = flash.flash_forward(prob, t, scal, q, k, v, r, u, vb, extras=(),
                                   out_shapes=out_shapes, epilogue=_rel_epilogue,
                                   name="rel_attention_fwd")
    return out, lse


def _delta_kernel(nq: int, blk: int, o_ref, do_ref, dlse_ref, delta_ref):
    """delta_i = sum_d dout_i * out_i - dlse_i (0 on padded rows)."""
    sdt = delta_ref.dtype
    rows = pl.program_id(2) * blk + jax.lax.broadcasted_iota(jnp.int32, (blk, 1), 0)
    prod = o_ref[...].astype(sdt) * do_ref[...].astype(sdt)
    delta = jnp.sum(prod, axis=1, keepdims=True) - dlse_ref[...]
    delta_ref[...] = jnp.where(rows < nq, delta, jnp.zeros_like(delta))


def _rel_delta(t, nq, out, dout, dlse):
    bsz, heads = out.shape[:2]
    sdt = dlse.dtype
    blk = t.blk
    spec = lambda d: pl.BlockSpec((None, None, blk, d), lambda b, h, i: (b, h, i, 0))
    return pl.pallas_call(
        functools.partial(_delta_kernel, nq, blk), grid=(bsz, heads, t.nqb_b),
        in_specs=[spec(t.dp), spec(t.dp), spec(1)], out_specs=spec(1),
        out_shape=jax.ShapeDtypeStruct((bsz, heads, t.nqp, 1), sdt), interpret=t.interpret,
        compiler_params=flash._compiler_params(t, 3), name="rel_attention_bwd_delta",
    )(out, dout, dlse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _rel_core(prob, t, scal, q, k, v, r, u, vb):
    return _rel_forward(prob, t, scal, q, k, v, r, u, vb)


def _rel_core_fwd(prob, t, scal, q, k, v, r, u, vb):
    out, lse = _rel_forward(prob, t, scal, q, k, v, r, u, vb)
    return (out, lse), (scal, q, k, v, r, u, vb, out, lse)


def _rel_core_bwd(prob, t, res, cts):
    scal, q, k, v, r, u, vb, out, lse = res
    dout, dlse = cts
    delta = _rel_delta(t, prob.nq, out, dout.astype(out.dtype), dlse.astype(lse.dtype))
    dq, dk, dv, dr, du, dvb = flash.flash_backward(prob, t, scal, q, k, v, r, u, vb, lse,
                                                   dout.astype(out.dtype), delta)
    return (None, dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dr.astype(r.dtype),
            du.astype(u.dtype), dvb.astype(vb.dtype))


_rel_core.defvjp(_rel_core_fwd, _rel_core_bwd)


def rel_attention_pallas(
    q_BNHD: Array,
    k_BKHD: Array,
    v_BKHD: Array,
    r_KHD: Array,
    u_HD: Array,
    vbias_HD: Array,
    key_start_B: Array,
    *,
    scale: float,
    same_length: bool = False,
    dropatt: float = 0.0,
    dropout_rng: Optional[Array] = None,
    block_sizes: Optional[BlockSizes] = None,
    interpret: bool = False,
    target: Optional[str] = None,
) -> tuple[Array, Array]:
    """Pallas flash version of ``rel_attention_reference``: same arguments, same outputs.

    Returns (out [B, N, H, D] in v's dtype, lse [B, N, H] in the stat dtype). Differentiable
    (``custom_vjp``, backward in Pallas) in q, k, v, r, u and vbias, including the gradient that
    flows through ``lse`` (its cotangent enters the backward exactly: ds = p (dp - delta + dlse)).

    ``block_sizes``: tile sizes (``BlockSizes``; None: ``BlockSizes.default(target)``).
    ``interpret``: run in Pallas interpret mode (CPU). ``target``: "gpu" (Triton) or "tpu" (Mosaic)
    kernel variant; None picks it from the default backend (the "gpu" variant in interpret mode on
    CPU, see ``_relpos_flash.resolve_target``).
    Attention dropout is not implemented in the kernel: ``dropatt > 0`` with a ``dropout_rng``
    raises (the ``kernels.rel_attention`` dispatcher falls back to the reference instead).

    Memory. HBM: the inputs and outputs, O(B*H*(N + K)*D), plus the backward's per-diagonal
    position-gradient partials O(B*H*(N + K)*D) and, GPU only, a per-program skew scratch tile
    (B*H*N*span floats, span ~ 2 blocks); no [N, K] score or position tensor. On chip per program:
    the head's K, V and padded R rows (O(K*D), resident across the key loop) and O(block^2) tile
    temporaries (scores, probabilities, the [block, span] position product).
    """
    if dropatt > 0.0 and dropout_rng is not None:
        raise NotImplementedError("rel_attention_pallas: attention dropout is not implemented in "
                                  "the kernel; use rel_attention_reference (the dispatcher does)")
    if q_BNHD.ndim != 4 or k_BKHD.ndim != 4 or v_BKHD.shape != k_BKHD.shape:
        raise ValueError(f"rel_attention_pallas: q [B,N,H,D], k/v [B,K,H,D] expected; got "
                         f"{q_BNHD.shape}, {k_BKHD.shape}, {v_BKHD.shape}")
    b, n, h, d = q_BNHD.shape
    kk = k_BKHD.shape[1]
    if kk < n or k_BKHD.shape[0] != b or k_BKHD.shape[2:] != (h, d):
        raise ValueError(f"rel_attention_pallas: k {k_BKHD.shape} does not match q {q_BNHD.shape} "
                         "(needs K >= N rows, same B, H, D)")
    if r_KHD.shape[1:] != (h, d) or u_HD.shape != (h, d) or vbias_HD.shape != (h, d):
        raise ValueError(f"rel_attention_pallas: r {r_KHD.shape} / u {u_HD.shape} / vbias "
                         f"{vbias_HD.shape} do not match H={h}, D={d}")
    target = flash.resolve_target(target, interpret)
    bs = block_sizes if block_sizes is not None else BlockSizes.default(target, interpret)
    dt = q_BNHD.dtype
    prob = flash.Problem("rel", nq=n, nk=kk, c0=n - 1, scale=float(scale), mb=kk - n,
                         same_length=bool(same_length))
    t = flash.make_tiling(target, interpret, bs, n, kk, n - 1, d, dt)
    q = flash.to_kernel_layout(q_BNHD, t.nqp, t.dp)
    k = flash.to_kernel_layout(k_BKHD.astype(dt), t.nkp, t.dp)
    v = flash.to_kernel_layout(v_BKHD, t.nkp, t.dp)
    r = flash.pad_positions(r_KHD.astype(dt), t)
    u = flash.bias_layout(u_HD.astype(dt), t.dp)
    vb = flash.bias_layout(vbias_HD.astype(dt), t.dp)
    scal = jnp.broadcast_to(jnp.asarray(key_start_B, jnp.int32), (b,))
    out, lse = _rel_core(prob, t, scal, q, k, v, r, u, vb)
    return flash.from_kernel_layout(out, n, d), flash.stats_from_layout(lse, n)
