"""kernels.softmax: the one-pass log-sum-exp, softmax_lse's two forms, and BackendSwitch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from kernels import softmax as sm
from lamemo_jax import embedding


def _rows(dtype=jnp.float64, scale=5.0, seed=0):
    x = np.random.default_rng(seed).normal(size=(3, 5, 37)) * scale
    x[0, 0, :] = -np.inf  # a row with no allowed key
    x[1, 2, 20:] = -np.inf  # a masked tail
    x[2, 1, 3] = 1e4 * scale  # one dominant entry (exp would overflow without the max)
    return jnp.asarray(x, dtype)


def test_one_pass_logsumexp_equals_two_pass():
    x = _rows()
    want, got = jax.nn.logsumexp(x, axis=-1), sm.logsumexp_one_pass(x)
    assert bool(jnp.all(jnp.isneginf(got) == jnp.isneginf(want))) and bool(jnp.isneginf(got[0, 0]))
    finite = ~jnp.isinf(want)
    np.testing.assert_allclose(np.asarray(got)[finite], np.asarray(want)[finite], rtol=1e-14, atol=0)
    # float32 at the wt103 output layer's row length: a few float32 ulps of |lse| ~ 40
    big = jnp.asarray(np.random.default_rng(1).normal(size=(4, 267_776)) * 8, jnp.float32)
    want = jax.nn.logsumexp(big.astype(jnp.float64), axis=-1)
    for got in (sm.logsumexp_one_pass(big), jax.nn.logsumexp(big, axis=-1)):
        assert float(jnp.max(jnp.abs(got - want) / jnp.abs(want))) < 4e-6
    nan = x.at[1, 1, 4].set(jnp.nan)
    assert bool(jnp.isnan(sm.logsumexp_one_pass(nan)[1, 1])) and not bool(jnp.any(jnp.isnan(sm.logsumexp_one_pass(x))))


def test_softmax_lse_forms_agree_in_values_and_gradients():
    x = _rows()
    rng = np.random.default_rng(2)
    gp, gl = jnp.asarray(rng.normal(size=x.shape)), jnp.asarray(rng.normal(size=x.shape[:-1]))
    keep = ~jnp.isneginf(jax.nn.logsumexp(x, axis=-1))  # the all-masked row's p is NaN in both forms

    def loss(s):
        p, lse = sm.softmax_lse(s)
        return jnp.sum(jnp.where(keep[..., None], p * gp, 0.0)) + jnp.sum(jnp.where(keep, lse * gl, 0.0))

    results = []
    for one_pass in (False, True):
        with sm.ONE_PASS.forced(one_pass):
            f = lambda s: loss(s)  # a fresh function per form: jax caches traces per function
            results.append((jax.jit(f)(x), jax.jit(jax.grad(f))(x)))
    (v0, g0), (v1, g1) = results
    assert abs(float(v0 - v1)) < 1e-12
    assert bool(jnp.all(jnp.isfinite(g1[keep])))
    # a row with every key masked has p = NaN in both forms, and so its gradient (the references
    # always leave each row a key: the current row itself, the first current token)
    assert bool(jnp.all(jnp.isnan(g1[~keep]))) and bool(jnp.all(jnp.isnan(g0[~keep])))
    np.testing.assert_allclose(np.asarray(g1)[np.asarray(keep)], np.asarray(g0)[np.asarray(keep)],
                               rtol=0, atol=1e-12)


def test_default_form_by_backend_and_cpu_program_unchanged():
    """One pass on a GPU; elsewhere (the CPU) the references run the two-pass autodiff program
    they always ran, so the recorded CPU results stay reproducible bit for bit. Forcing the
    switch changes the program."""
    assert sm.ONE_PASS.value is None
    assert sm.ONE_PASS() is (jax.default_backend() == "gpu")

    def plain(s):
        lse = jax.nn.logsumexp(s, axis=-1)
        return jnp.exp(s - lse[..., None]), lse

    x = jnp.ones((2, 3, 4), jnp.float32)
    grad_of = lambda f: jax.make_jaxpr(jax.grad(lambda s: jnp.sum(f(s)[0]) + jnp.sum(f(s)[1])))(x)
    with sm.ONE_PASS.forced(False):
        assert str(grad_of(lambda s: sm.softmax_lse(s))) == str(grad_of(plain))
    with sm.ONE_PASS.forced(True):
        assert str(grad_of(lambda s: sm.softmax_lse(s))) != str(grad_of(plain))


@pytest.mark.parametrize("path", ["plain", "fused_bf16", "chunked"])
def test_output_layer_one_pass(path):
    """The output layer's three paths (plain autodiff, the bf16 fused custom_vjp, the chunked
    custom_vjp) with the one-pass log-sum-exp: the one-pass form really runs (another program),
    with the same loss and gradients as two passes."""
    rng = np.random.default_rng(3)
    dtype = jnp.bfloat16 if path == "fused_bf16" else jnp.float64
    chunk = 7 if path == "chunked" else 0
    x = jnp.asarray(rng.normal(size=(20, 16)), dtype)
    w = jnp.asarray(rng.normal(size=(300, 16)), dtype)
    b = jnp.asarray(rng.normal(size=300), jnp.float64 if dtype == jnp.float64 else jnp.float32)
    t = jnp.asarray(rng.integers(0, 300, size=20))
    results, programs = [], []
    for one_pass in (False, True):
        with sm.ONE_PASS.forced(one_pass):
            f = lambda x, w, b: jnp.sum(embedding.softmax_cross_entropy(x, w, b, t, chunk) * jnp.arange(20.0))
            vg = jax.value_and_grad(f, argnums=(0, 1, 2))
            programs.append(str(jax.make_jaxpr(vg)(x, w, b)))
            results.append(jax.jit(vg)(x, w, b))
    assert programs[0] != programs[1]
    (v0, g0), (v1, g1) = results
    tol = 1e-12 if dtype == jnp.float64 else 1e-5  # bf16: the f32 statistics' rounding only
    assert abs(float(v1 - v0)) <= tol * max(1.0, abs(float(v0)))
    for a, c in zip(g1, g0):
        a, c = np.asarray(a, np.float64), np.asarray(c, np.float64)
        bound = tol * max(1.0, np.max(np.abs(c)))
        if dtype == jnp.bfloat16:
            bound = max(bound, 2.0 ** -7 * np.max(np.abs(c)))  # bf16 gradients: one ulp
        assert np.max(np.abs(a - c)) <= bound


def test_one_pass_logsumexp_low_precision_and_derivatives():
    """bf16 input: the sum is carried in float32 (as jax.nn.logsumexp does), not in bf16. The
    one-pass form has the two-pass form's derivatives (forward and reverse mode)."""
    x = jnp.asarray(np.random.default_rng(4).normal(size=(3, 4096)), jnp.bfloat16)
    got, want = sm.logsumexp_one_pass(x), jax.nn.logsumexp(x, axis=-1)
    assert got.dtype == want.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want, np.float64), rtol=2.0 ** -8)
    y = _rows()[1:]  # finite rows (the second has a masked tail)
    dy = jnp.asarray(np.random.default_rng(5).normal(size=y.shape))
    g1, g0 = (jax.grad(lambda v: jnp.sum(f(v) * jnp.arange(1.0, 6.0)))(y)
              for f in (sm.logsumexp_one_pass, lambda v: jax.nn.logsumexp(v, axis=-1)))
    np.testing.assert_allclose(np.asarray(g1), np.asarray(g0), rtol=0, atol=1e-12)
    t1 = jax.jvp(sm.logsumexp_one_pass, (y,), (dy,))[1]
    t0 = jax.jvp(lambda v: jax.nn.logsumexp(v, axis=-1), (y,), (dy,))[1]
    np.testing.assert_allclose(np.asarray(t1), np.asarray(t0), rtol=0, atol=1e-12)


def test_backend_switch():
    s = sm.BackendSwitch("demo", ("gpu",))
    assert s() is (jax.default_backend() == "gpu")
    with s.forced(True):
        assert s() is True
        with s.forced(False):
            assert s() is False
        assert s() is True
    assert s.value is None
    with pytest.raises(TypeError, match="demo: True, False or None expected"):
        s.set(1)
    with pytest.raises(TypeError, match=r"call the switch"):  # not a bool: `if switch:` would be a bug
        bool(s)
    assert kernels.BATCHED_POSITIONS.value is None and kernels.ONE_PASS_SOFTMAX is sm.ONE_PASS
