"""LaMemo look-ahead attention of the memory rows, fused with the normaliser interpolation.

This file holds the plain-jnp reference (the function the model runs on the XLA path, and the
single source of truth every other implementation is tested against) and the fused Pallas kernel
``lookahead_pallas`` (see the end of the file and ``kernels/_relpos_flash.py``).

Layout (batch-major, spec section 2.2 in memory-buffer coordinates): the memory buffer has Mb
rows; the valid rows of batch row b are the last ``mem_valid[b]`` (right-aligned). The look-ahead
window holds the W = min(Mb, N) rows ``Mb-W+1 .. Mb`` of the layer input (the last W-1 memory
slots and the first current token): exactly the keys ``c in [max(1, M-N+1), M]`` of the spec,
whatever M is. For memory row p and window key w (row c = Mb-W+1+w), with delta = c - p:

    t_pw = ((q_p + u) . k_w + (q_p + v_) . r_table[delta + r_offset]) * scale
    causal variants: keys with delta <= 0 are masked; every row keeps at least key c = Mb.
    b_p = softmax(t_p) . V,  z_p = logsumexp(t_p)
    m = max(Z_p, z_p);  alpha = e^(Z_p-m) / (e^(Z_p-m) + e^(z_p-m) + eps)
    c_p = alpha * C_p + (1 - alpha) * b_p  (NaN -> 0);  Z'_p = logaddexp(Z_p, z_p)

C and Z are constants (the caller passes them stop-gradient'ed; gradient flows through b and
through alpha via z). ``eps`` = 1e-6 is the original's and is added after the max-subtraction.

Cost: the position term is computed by blocks of R rows (min(16, W) on CPU, W elsewhere:
``NARROW_BAND``) against the R + W - 1 distances each block needs, then shifted: O(Mb * W) scores
and O(Mb * W * D) FLOPs per head; no Mb x Mb score or position tensor is ever built. The largest
temporaries are the band scores [B, H, Mb, R + W - 1] and the gathered position rows,
[Mb / R, R + W - 1, H, D] (broadcast over the batch with ``BATCHED_POSITIONS``).
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
from kernels.rel_attention import batched_position_product, batched_positions, rel_shift_past
from kernels.softmax import BackendSwitch, softmax_lse, stat_dtype

Array = jax.Array

LOOKAHEAD_EPS = 1e-6


NARROW_BAND = BackendSwitch("narrow_band", ("cpu",))
"""The look-ahead's position band in blocks of ``NARROW_BAND_ROWS`` memory rows (on) or of W rows
(off). A block of R rows needs the R + W - 1 distances it spans, so 16-row blocks compute and shift
16 + W - 1 instead of 2W - 1 scores per row (79 instead of 127 at W = 64): on the 2-core CPU the
look-ahead's forward + backward took 26% / 21% less time at mem_len 256 / 512, the training step
5% / 9% less (docs/benchmarks.md). On by default on CPU only: on an H200 the wt103 bf16
LaMemo step was 6.6% slower with it (87.8 vs 82.3 ms, 2026-11-27), so a GPU keeps W-row blocks."""
NARROW_BAND_ROWS = 16
set_narrow_band = NARROW_BAND.set
forced_narrow_band = NARROW_BAND.forced


def band_block_rows(window: int) -> int:
    """Memory rows per block of the look-ahead's position band (see ``NARROW_BAND``)."""
    return min(NARROW_BAND_ROWS, window) if NARROW_BAND() else window


def band_position_scores(qv_BMHD: Array, r_THD: Array, r_offset: int, window: int,
                         block_rows: Optional[int] = None) -> Array:
    """pos[b, h, p, w] = qv[b, p, h] . r[clip(delta + r_offset)], delta = Mb - W + 1 + w - p.

    Computed per block of R = ``block_rows`` rows (default ``band_block_rows(W)``) against the
    R + W - 1 distances the block spans: O(Mb * (R + W)). Returns [B, H, Mb, W] in the stat dtype.
    """
    b, mb, h, d = qv_BMHD.shape
    w = window
    rows = band_block_rows(w) if block_rows is None else block_rows
    if rows < 1:
        raise ValueError(f"band_position_scores: block_rows must be >= 1, got {rows}")
    rows = min(rows, mb)
    nb = -(-mb // rows)
    mp = nb * rows
    pad = mp - mb
    sdt = stat_dtype(qv_BMHD.dtype)
    qv = jnp.pad(qv_BMHD, ((0, 0), (pad, 0), (0, 0), (0, 0))).reshape(b, nb, rows, h, d)
    # block n, local row i (padded row n*R+i, p = n*R+i-pad), key w: local distance
    # e = w - i + R - 1 in [0, R + W - 2], delta = Mb - W + 1 + w - p = Mp - W + 2 - (n+1)*R + e
    blk = np.arange(nb)[:, None]
    e = np.arange(rows + w - 1)[None, :]
    delta = mp - w + 2 - (blk + 1) * rows + e
    idx = np.clip(delta + r_offset, 0, r_THD.shape[0] - 1)
    r_blk = r_THD[idx]  # [nb, R+W-1, H, D]
    # out[i, w] = s[i, R-1-i+w]: the Transformer-XL shift with N = R, K = R+W-1 (w <= W-1+i always)
    if batched_positions():  # r broadcast over the batch (see kernels.rel_attention)
        s = batched_position_product("bnihd,bnehd->bhnie", qv, r_blk)
        s = rel_shift_past(s)[..., :w]  # [B, H, nb, R(i), W(w)]
    else:
        s = jnp.einsum("bnihd,nehd->bnhie", qv, r_blk, preferred_element_type=sdt)
        s = rel_shift_past(s)[..., :w]  # [B, nb, H, R(i), W(w)]
        s = jnp.transpose(s, (0, 2, 1, 3, 4))
    return s.reshape(b, h, mp, w)[:, :, pad:]


def lookahead_mask(mb: int, window: int, mem_valid_B: Array, causal: bool) -> Array:
    """Boolean [B, 1, Mb, W]: the window keys each memory row may attend."""
    w = window
    p = np.arange(mb)[:, None]
    c = mb - w + 1 + np.arange(w)[None, :]
    is_first_current = (c == mb)[None]
    valid_key = (c[None] >= (mb - mem_valid_B[:, None, None] + 1)) | is_first_current
    if causal:
        valid_key = valid_key & (c > p)[None]
    return valid_key[:, None]


def lookahead_reference(
    q_BMHD: Array,
    k_BWHD: Array,
    v_BWHD: Array,
    r_THD: Array,
    u_HD: Array,
    vbias_HD: Array,
    cache_BMHD: Array,
    cache_lse_BMH: Array,
    mem_valid_B: Array,
    *,
    r_offset: int,
    scale: float,
    causal: bool = True,
    eps: float = LOOKAHEAD_EPS,
    dropatt: float = 0.0,
    dropout_rng: Optional[Array] = None,
) -> tuple[Array, Array]:
    """Look-ahead + interpolation. Returns (c [B,Mb,H,D], new cache lse [B,Mb,H]).

    Rows that are not valid memory (p < Mb - mem_valid[b]) come back as zeros.
    """
    b, mb, h, d = q_BMHD.shape
    w = k_BWHD.shape[1]
    sdt = stat_dtype(q_BMHD.dtype)
    ac = jnp.einsum("bphd,bwhd->bhpw", q_BMHD + u_HD, k_BWHD, preferred_element_type=sdt)
    bd = band_position_scores(q_BMHD + vbias_HD, r_THD, r_offset, w)
    t = (ac + bd) * scale
    t = jnp.where(lookahead_mask(mb, w, mem_valid_B, causal), t, -jnp.inf)
    p, z = softmax_lse(t)  # z [B, H, Mb]
    if dropatt > 0.0 and dropout_rng is not None:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropatt, p.shape)
        p = jnp.where(keep, p / (1.0 - dropatt), 0.0)
    attn = jnp.einsum("bhpw,bwhd->bphd", p.astype(v_BWHD.dtype), v_BWHD,
                      preferred_element_type=sdt)
    z = jnp.transpose(z, (0, 2, 1))  # [B, Mb, H]
    zc = cache_lse_BMH.astype(sdt)
    m = jnp.maximum(zc, z)
    e_old = jnp.exp(zc - m)
    e_new = jnp.exp(z - m)
    alpha = (e_old / (e_old + e_new + eps))[..., None]
    c = alpha * cache_BMHD.astype(sdt) + (1.0 - alpha) * attn
    c = jnp.where(jnp.isnan(c), 0.0, c)
    new_lse = jnp.logaddexp(zc, z)
    row_valid = (np.arange(mb)[None, :] >= (mb - mem_valid_B[:, None]))
    c = jnp.where(row_valid[..., None, None], c, 0.0).astype(cache_BMHD.dtype)
    new_lse = jnp.where(row_valid[..., None], new_lse, 0.0)
    return c, new_lse


# ================================================================================ Pallas kernel
def interpolate(attn, z, cache, cache_lse, row_valid, eps: float):
    """The normaliser interpolation of one block (all in the stat dtype), as in the reference.

    attn [R, D] window attention output, z [R, 1] its log-sum-exp, cache [R, D] = C,
    cache_lse [R, 1] = Z, row_valid [R, 1]. Returns (c [R, D], new lse [R, 1]); invalid rows 0.
    The new normaliser is written m + log(e_old + e_new), which equals logaddexp(Z, z) (same value
    to rounding, same derivative); every other expression is the reference's.
    """
    m = jnp.maximum(cache_lse, z)
    e_old = jnp.exp(cache_lse - m)
    e_new = jnp.exp(z - m)
    alpha = e_old / (e_old + e_new + eps)
    c = alpha * cache + (1.0 - alpha) * attn
    c = jnp.where(jnp.isnan(c), jnp.zeros_like(c), c)
    new_lse = m + jnp.log(e_old + e_new)
    c = jnp.where(row_valid, c, jnp.zeros_like(c))
    new_lse = jnp.where(row_valid, new_lse, jnp.zeros_like(new_lse))
    return c, new_lse


def _row_valid(rows, s, mb: int):
    return (rows >= mb - s) & (rows < mb)


def _look_epilogue(mb: int, eps: float, residuals: bool, *, rows, s, out, lse, l, extra_refs,
                   out_refs):
    cache_ref, zc_ref = extra_refs
    sdt = out.dtype
    valid = _row_valid(rows, s, mb)
    c, new_lse = interpolate(out, lse, cache_ref[...].astype(sdt), zc_ref[...], valid, eps)
    out_refs[0][...] = c.astype(out_refs[0].dtype)
    out_refs[1][...] = new_lse.astype(out_refs[1].dtype)
    if residuals:  # the window attention and its lse (0 on rows without any key: padding)
        out_refs[2][...] = jnp.where(l > 0, out, jnp.zeros_like(out)).astype(out_refs[2].dtype)
        out_refs[3][...] = lse.astype(out_refs[3].dtype)


def _look_forward(prob, t, eps, residuals, scal, q, k, v, r, u, vb, cache, cache_lse):
    sdt = stat_dtype(q.dtype)
    bsz, heads = q.shape[:2]
    rows_shape = lambda d, dt: jax.ShapeDtypeStruct((bsz, heads, t.nqp, d), dt)
    out_shapes = [rows_shape(t.dp, cache.dtype), rows_shape(1, sdt)]
    if residuals:
        out_shapes += [rows_shape(t.dp, sdt), rows_shape(1, sdt)]
    return flash.flash_forward(
        prob, t, scal, q, k, v, r, u, vb, extras=(cache, cache_lse), out_shapes=out_shapes,
        epilogue=functools.partial(_look_epilogue, prob.mb, eps, residuals),
        name="lookahead_fwd")


def _look_pre_kernel(mb: int, eps: float, blk: int, s_ref, attn_ref, z_ref, cache_ref, zc_ref,
                     gc_ref, gl_ref, dattn_ref, delta_ref, dcache_ref, dzc_ref):
    """Backward of the interpolation (jax.vjp of the same jnp function) + the flash row term."""
    sdt = attn_ref.dtype
    rows = pl.program_id(2) * blk + jax.lax.broadcasted_iota(jnp.int32, (blk, 1), 0)
    valid = _row_valid(rows, s_ref[pl.program_id(0)], mb)
    attn = attn_ref[...]
    f = lambda a, z, c, zc: interpolate(a, z, c, zc, valid, eps)
    _, vjp = jax.vjp(f, attn, z_ref[...], cache_ref[...].astype(sdt), zc_ref[...])
    g_attn, g_z, g_cache, g_zc = vjp((gc_ref[...].astype(sdt), gl_ref[...]))
    dattn_ref[...] = g_attn
    delta_ref[...] = jnp.sum(g_attn * attn, axis=1, keepdims=True) - g_z
    dcache_ref[...] = g_cache.astype(dcache_ref.dtype)
    dzc_ref[...] = g_zc.astype(dzc_ref.dtype)


def _look_pre(prob, t, eps, scal, attn, z, cache, cache_lse, gc, gl):
    bsz, heads = attn.shape[:2]
    sdt = attn.dtype
    blk = t.blk
    spec = lambda d: pl.BlockSpec((None, None, blk, d), lambda b, h, i: (b, h, i, 0))
    shape = lambda d, dt: jax.ShapeDtypeStruct((bsz, heads, t.nqp, d), dt)
    return pl.pallas_call(
        functools.partial(_look_pre_kernel, prob.mb, eps, blk), grid=(bsz, heads, t.nqb_b),
        in_specs=[flash._scalar_spec(t), spec(t.dp), spec(1), spec(t.dp), spec(1), spec(t.dp),
                  spec(1)],
        out_specs=[spec(t.dp), spec(1), spec(t.dp), spec(1)],
        out_shape=[shape(t.dp, sdt), shape(1, sdt), shape(t.dp, cache.dtype),
                   shape(1, cache_lse.dtype)],
        interpret=t.interpret, compiler_params=flash._compiler_params(t, 3),
        name="lookahead_bwd_interpolation",
    )(scal, attn, z, cache, cache_lse, gc, gl)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _look_core(prob, t, eps, scal, q, k, v, r, u, vb, cache, cache_lse):
    c, new_lse = _look_forward(prob, t, eps, False, scal, q, k, v, r, u, vb, cache, cache_lse)
    return c, new_lse


def _look_core_fwd(prob, t, eps, scal, q, k, v, r, u, vb, cache, cache_lse):
    c, new_lse, attn, z = _look_forward(prob, t, eps, True, scal, q, k, v, r, u, vb, cache,
                                        cache_lse)
    return (c, new_lse), (scal, q, k, v, r, u, vb, cache, cache_lse, attn, z)


def _look_core_bwd(prob, t, eps, res, cts):
    scal, q, k, v, r, u, vb, cache, cache_lse, attn, z = res
    gc, gl = cts
    d_attn, delta, d_cache, d_cache_lse = _look_pre(prob, t, eps, scal, attn, z, cache, cache_lse,
                                                    gc.astype(cache.dtype),
                                                    gl.astype(cache_lse.dtype))
    dq, dk, dv, dr, du, dvb = flash.flash_backward(prob, t, scal, q, k, v, r, u, vb, z, d_attn,
                                                   delta)
    return (None, dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dr.astype(r.dtype),
            du.astype(u.dtype), dvb.astype(vb.dtype), d_cache, d_cache_lse)


_look_core.defvjp(_look_core_fwd, _look_core_bwd)


def lookahead_pallas(
    q_BMHD: Array,
    k_BWHD: Array,
    v_BWHD: Array,
    r_THD: Array,
    u_HD: Array,
    vbias_HD: Array,
    cache_BMHD: Array,
    cache_lse_BMH: Array,
    mem_valid_B: Array,
    *,
    r_offset: int,
    scale: float,
    causal: bool = True,
    eps: float = LOOKAHEAD_EPS,
    dropatt: float = 0.0,
    dropout_rng: Optional[Array] = None,
    block_sizes: Optional[BlockSizes] = None,
    interpret: bool = False,
    target: Optional[str] = None,
) -> tuple[Array, Array]:
    """Fused Pallas version of ``lookahead_reference``: same arguments, same outputs.

    One kernel computes, per block of memory rows, the look-ahead attention over the window
    (content bias u, future position bias vbias, position term r_table[c - p + r_offset] computed
    by tile inside the kernel: no [Mb, W] position tensor in HBM) with an online softmax, then the
    interpolation against the old cache (C, Z) with ``eps`` added after the max-subtraction, and
    writes (c, logaddexp(Z, z)). Returns (c [B, Mb, H, D] in the cache dtype, new lse [B, Mb, H]
    in the stat dtype); rows that are not valid memory are zeros, as in the reference.

    Gradients (``custom_vjp``, backward in Pallas) are the reference's: into q, k_win, v_win,
    r_table, u, vbias through the window attention b and through the window normaliser z (via
    alpha, m and the new normaliser), and into the cache and cache_lse arguments exactly as the
    reference function differentiates them (the model passes them stop-gradient'ed, so the old
    cache receives no gradient there).

    ``block_sizes`` / ``interpret`` / ``target``: as in ``rel_attention_pallas``. ``dropatt > 0``
    with a ``dropout_rng`` raises (the dispatcher falls back to the reference).

    Memory. HBM: inputs and outputs, O(B*H*(Mb + W)*D); the backward's residuals (the window
    attention [B, H, Mb, D] and its lse in the stat dtype), its per-diagonal position-gradient
    partials O(B*H*(Mb + W)*D) and, GPU only, a per-program skew scratch tile (B*H*Mb*span
    floats); no [Mb, W] score or position tensor. On chip per program: the head's window K, V and
    padded r_table rows (O((W + Mb)*D)) and O(block^2) tile temporaries.
    """
    if dropatt > 0.0 and dropout_rng is not None:
        raise NotImplementedError("lookahead_pallas: attention dropout is not implemented in the "
                                  "kernel; use lookahead_reference (the dispatcher does)")
    if q_BMHD.ndim != 4 or k_BWHD.ndim != 4 or v_BWHD.shape != k_BWHD.shape:
        raise ValueError(f"lookahead_pallas: q [B,Mb,H,D], k/v [B,W,H,D] expected; got "
                         f"{q_BMHD.shape}, {k_BWHD.shape}, {v_BWHD.shape}")
    b, mb, h, d = q_BMHD.shape
    w = k_BWHD.shape[1]
    if mb < 1 or w < 1 or k_BWHD.shape[0] != b or k_BWHD.shape[2:] != (h, d):
        raise ValueError(f"lookahead_pallas: k {k_BWHD.shape} does not match q {q_BMHD.shape}")
    if cache_BMHD.shape != q_BMHD.shape or cache_lse_BMH.shape != (b, mb, h):
        raise ValueError(f"lookahead_pallas: cache {cache_BMHD.shape} / cache_lse "
                         f"{cache_lse_BMH.shape} do not match q {q_BMHD.shape}")
    if r_THD.shape[1:] != (h, d) or u_HD.shape != (h, d) or vbias_HD.shape != (h, d):
        raise ValueError(f"lookahead_pallas: r_table {r_THD.shape} / u {u_HD.shape} / vbias "
                         f"{vbias_HD.shape} do not match H={h}, D={d}")
    target = flash.resolve_target(target, interpret)
    bs = block_sizes if block_sizes is not None else BlockSizes.default(target, interpret)
    dt = q_BMHD.dtype
    sdt = stat_dtype(dt)
    c0 = mb - w + 1 + int(r_offset)
    prob = flash.Problem("lookahead", nq=mb, nk=w, c0=c0, scale=float(scale), mb=mb,
                         causal=bool(causal))
    t = flash.make_tiling(target, interpret, bs, mb, w, c0, d, dt)
    q = flash.to_kernel_layout(q_BMHD, t.nqp, t.dp)
    k = flash.to_kernel_layout(k_BWHD.astype(dt), t.nkp, t.dp)
    v = flash.to_kernel_layout(v_BWHD, t.nkp, t.dp)
    r = flash.pad_positions(r_THD.astype(dt), t)
    u = flash.bias_layout(u_HD.astype(dt), t.dp)
    vb = flash.bias_layout(vbias_HD.astype(dt), t.dp)
    cache = flash.to_kernel_layout(cache_BMHD, t.nqp, t.dp)
    cache_lse = flash.stats_layout(cache_lse_BMH.astype(sdt), t.nqp)
    scal = jnp.broadcast_to(jnp.asarray(mem_valid_B, jnp.int32), (b,))
    c, new_lse = _look_core(prob, t, float(eps), scal, q, k, v, r, u, vb, cache, cache_lse)
    return flash.from_kernel_layout(c, mb, d), flash.stats_from_layout(new_lse, mb)
