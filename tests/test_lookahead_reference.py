"""kernels.lookahead_reference (banded, O(M*W)) against a dense per-row loop written from the spec."""

import numpy as np
import pytest
import jax.numpy as jnp

from kernels.lookahead import lookahead_reference


def naive(q, k_win, v_win, r_table, u, vb, C, Z, mem_valid, r_offset, causal, scale, eps):
    b, mb, h, d = q.shape
    w = k_win.shape[1]
    c_out = np.zeros_like(C)
    z_out = np.zeros_like(Z)
    for bi in range(b):
        for p in range(mb - mem_valid[bi], mb):
            keys = []
            for wi in range(w):
                c = mb - w + 1 + wi
                if c != mb and c < mb - mem_valid[bi] + 1:
                    continue
                if causal and c <= p:
                    continue
                keys.append(wi)
            t = np.stack([(np.einsum("hd,hd->h", q[bi, p] + u, k_win[bi, wi])
                           + np.einsum("hd,hd->h", q[bi, p] + vb, r_table[(mb - w + 1 + wi - p) + r_offset]))
                          * scale for wi in keys])
            z = np.log(np.exp(t - t.max(0)).sum(0)) + t.max(0)
            att = np.einsum("jh,jhd->hd", np.exp(t - z), v_win[bi, keys])
            m = np.maximum(Z[bi, p], z)
            alpha = np.exp(Z[bi, p] - m) / (np.exp(Z[bi, p] - m) + np.exp(z - m) + eps)
            c_out[bi, p] = alpha[:, None] * C[bi, p] + (1 - alpha[:, None]) * att
            z_out[bi, p] = np.logaddexp(Z[bi, p], z)
    return c_out, z_out


@pytest.mark.parametrize("mb,n,causal", [(7, 3, True), (3, 5, True), (6, 6, True), (9, 4, False), (5, 5, False)])
def test_band_reference_equals_dense_loop(mb, n, causal):
    rng = np.random.default_rng(mb * 10 + n)
    b, h, d = 3, 2, 4
    w = min(mb, n)
    q = rng.normal(size=(b, mb, h, d))
    kw = rng.normal(size=(b, w, h, d))
    vw = rng.normal(size=(b, w, h, d))
    C = rng.normal(size=(b, mb, h, d))
    Z = rng.normal(size=(b, mb, h))
    u, vb = rng.normal(size=(h, d)), rng.normal(size=(h, d))
    mem_valid = np.array([mb, max(mb - 2, 1), 1])
    if causal:
        r_table, r_offset = rng.normal(size=(mb, h, d)), -1
    else:
        r_table, r_offset = rng.normal(size=(mb + w - 1, h, d)), w - 2
    scale = 0.5
    c_ref, z_ref = naive(q, kw, vw, r_table, u, vb, C, Z, mem_valid, r_offset, causal, scale, 1e-6)
    c, z = lookahead_reference(jnp.asarray(q), jnp.asarray(kw), jnp.asarray(vw), jnp.asarray(r_table),
                               jnp.asarray(u), jnp.asarray(vb), jnp.asarray(C), jnp.asarray(Z),
                               jnp.asarray(mem_valid), r_offset=r_offset, scale=scale, causal=causal)
    np.testing.assert_allclose(np.asarray(c), c_ref, rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.asarray(z), z_ref, rtol=0, atol=1e-12)
