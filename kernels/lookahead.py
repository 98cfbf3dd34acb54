"""LaMemo look-ahead attention of the memory rows, fused with the normaliser interpolation.

This file holds the plain-jnp reference, the function the model runs on the XLA path. Every
other implementation (Pallas kernels) is tested against it.

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

Cost: the position term is computed by blocks of W rows against the 2W-1 distances each block
needs, then shifted: O(Mb * W) scores and O(Mb * W * D) FLOPs per head; no Mb x Mb score or
position tensor is ever built (the reference's largest temporary is [B, H, Mb, 2W-1]).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from kernels.rel_attention import stat_dtype

Array = jax.Array

LOOKAHEAD_EPS = 1e-6


def band_position_scores(qv_BMHD: Array, r_THD: Array, r_offset: int, window: int) -> Array:
    """pos[b, h, p, w] = qv[b, p, h] . r[clip(delta + r_offset)], delta = Mb - W + 1 + w - p.

    Computed per block of W rows against the 2W-1 distances the block spans: O(Mb * W).
    Returns [B, H, Mb, W] in the stat dtype.
    """
    b, mb, h, d = qv_BMHD.shape
    w = window
    nb = -(-mb // w)
    mp = nb * w
    pad = mp - mb
    sdt = stat_dtype(qv_BMHD.dtype)
    qv = jnp.pad(qv_BMHD, ((0, 0), (pad, 0), (0, 0), (0, 0))).reshape(b, nb, w, h, d)
    # block n, local row i (padded row n*W+i, p = n*W+i-pad); local distance e = w - i + W - 1.
    blk = np.arange(nb)[:, None]
    e = np.arange(2 * w - 1)[None, :]
    delta = mp - blk * w - 2 * w + 2 + e
    idx = np.clip(delta + r_offset, 0, r_THD.shape[0] - 1)
    r_blk = r_THD[idx]  # [nb, 2W-1, H, D]
    s = jnp.einsum("bnihd,nehd->bnhie", qv, r_blk, preferred_element_type=sdt)
    i = np.arange(w)[:, None]
    ww = np.arange(w)[None, :]
    sel = jnp.broadcast_to(jnp.asarray(ww - i + w - 1), s.shape[:-1] + (w,))
    s = jnp.take_along_axis(s, sel, axis=-1)  # [B, nb, H, W(i), W(w)]
    s = jnp.transpose(s, (0, 2, 1, 3, 4)).reshape(b, h, mp, w)
    return s[:, :, pad:]


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
    z = jax.nn.logsumexp(t, axis=-1)  # [B, H, Mb]
    p = jnp.exp(t - z[..., None])
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
