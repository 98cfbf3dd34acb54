"""kernels.lookahead_reference (banded, O(M*W)) against a dense per-row loop written from the spec."""

import sys

import numpy as np
import pytest
import jax
import jax.numpy as jnp

import kernels
from kernels.lookahead import band_position_scores, lookahead_reference

LOOK = sys.modules["kernels.lookahead"]  # (the package's ``kernels.lookahead`` is the dispatcher)


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


@pytest.mark.parametrize("narrow", [False, True])
@pytest.mark.parametrize("mb,n,causal", [(7, 3, True), (3, 5, True), (6, 6, True), (9, 4, False), (5, 5, False),
                                         (11, 5, True)])
def test_band_reference_equals_dense_loop(mb, n, causal, narrow, monkeypatch):
    """Both band blockings (``NARROW_BAND``; 2-row blocks here, so that blocks are ragged)."""
    monkeypatch.setattr(LOOK, "NARROW_BAND_ROWS", 2)
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
    with kernels.forced_narrow_band(narrow):
        c, z = lookahead_reference(jnp.asarray(q), jnp.asarray(kw), jnp.asarray(vw), jnp.asarray(r_table),
                                   jnp.asarray(u), jnp.asarray(vb), jnp.asarray(C), jnp.asarray(Z),
                                   jnp.asarray(mem_valid), r_offset=r_offset, scale=scale, causal=causal)
    np.testing.assert_allclose(np.asarray(c), c_ref, rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.asarray(z), z_ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("mb,w", [(13, 5), (16, 16), (64, 64), (40, 7)])
def test_band_position_scores_any_block_rows(mb, w, batched):
    """pos[b, h, p, w] = qv[b, p, h] . r[clip(Mb - W + 1 + w - p + r_offset)] for every block size
    (1 row, ragged, 16, W, more than Mb), both batchings of the product; value and gradients."""
    rng = np.random.default_rng(mb + w)
    b, h, d, r_offset = 2, 3, 4, 1
    qv = jnp.asarray(rng.normal(size=(b, mb, h, d)))
    r = jnp.asarray(rng.normal(size=(mb + 2, h, d)))  # short: some distances are clipped
    idx = np.clip(mb - w + 1 + np.arange(w)[None, :] - np.arange(mb)[:, None] + r_offset, 0, mb + 1)
    dense = lambda qv, r: jnp.einsum("bphd,pwhd->bhpw", qv, r[idx])
    ct = jnp.asarray(rng.normal(size=(b, h, mb, w)))
    vjp = lambda f: jax.vjp(f, qv, r)
    want, want_vjp = vjp(dense)
    for rows in (1, 3, 16, w, mb + 5):
        with kernels.forced_batched_positions(batched):
            got, got_vjp = vjp(lambda qv, r: band_position_scores(qv, r, r_offset, w, block_rows=rows))
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-12, err_msg=f"rows={rows}")
        for g, gw in zip(got_vjp(ct), want_vjp(ct)):
            np.testing.assert_allclose(np.asarray(g), np.asarray(gw), rtol=0, atol=1e-12, err_msg=f"rows={rows}")
    with pytest.raises(ValueError, match="block_rows"):
        band_position_scores(qv, r, r_offset, w, block_rows=0)


def test_narrow_band_is_the_cpu_default():
    assert kernels.NARROW_BAND.value is None
    assert kernels.NARROW_BAND() is (jax.default_backend() == "cpu")
    with kernels.forced_narrow_band(False):
        assert LOOK.band_block_rows(64) == 64
    with kernels.forced_narrow_band(True):
        assert LOOK.band_block_rows(64) == LOOK.NARROW_BAND_ROWS == 16
        assert LOOK.band_block_rows(6) == 6
    assert kernels.NARROW_BAND.value is None
