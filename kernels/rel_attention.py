"""Transformer-XL relative attention of the current rows over [memory; current].

This file holds the plain-jnp reference, the function the model runs on the XLA path. Every
other implementation (Pallas kernels) is tested against it.

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

import jax
import jax.numpy as jnp

Array = jax.Array


def stat_dtype(dtype) -> jnp.dtype:
    """dtype of softmax statistics: float64 in float64 runs, never below float32."""
    return jnp.promote_types(dtype, jnp.float32)


def rel_shift_past(bd_BHNK: Array) -> Array:
    """out[..., i, j] = bd[..., i, N-1-i+j] (index clipped; the clipped entries are masked)."""
    n, k = bd_BHNK.shape[-2:]
    i = jnp.arange(n)[:, None]
    j = jnp.arange(k)[None, :]
    idx = jnp.clip(n - 1 - i + j, 0, k - 1)
    idx = jnp.broadcast_to(idx, bd_BHNK.shape)
    return jnp.take_along_axis(bd_BHNK, idx, axis=-1)


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
    n, k = q_BNHD.shape[1], k_BKHD.shape[1]
    sdt = stat_dtype(q_BNHD.dtype)
    ac = jnp.einsum("bihd,bjhd->bhij", q_BNHD + u_HD, k_BKHD, preferred_element_type=sdt)
    bd = jnp.einsum("bihd,jhd->bhij", q_BNHD + vbias_HD, r_KHD, preferred_element_type=sdt)
    s = (ac + rel_shift_past(bd)) * scale
    mask = rel_attention_mask(n, k, key_start_B, same_length)
    s = jnp.where(mask, s, -jnp.inf)
    lse = jax.nn.logsumexp(s, axis=-1)
    p = jnp.exp(s - lse[..., None])
    if dropatt > 0.0 and dropout_rng is not None:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropatt, p.shape)
        p = jnp.where(keep, p / (1.0 - dropatt), 0.0)
    out = jnp.einsum("bhij,bjhd->bihd", p.astype(v_BKHD.dtype), v_BKHD,
                     preferred_element_type=sdt).astype(v_BKHD.dtype)
    return out, jnp.transpose(lse, (0, 2, 1))
