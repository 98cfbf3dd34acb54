"""kernels.rows_dot: the layers' dense products, batched or as one 2-D product over the flattened
rows (``kernels.FLAT_ROWS``). Both forms are the same product: values and gradients equal in
float64 (float64 is on for all tests, conftest.py). Through a whole training loss:
tests/test_model_properties.py."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from kernels.dense import rows_dot


def _dot_generals(fn, *args):
    """The operand shapes of every dot_general in fn's jaxpr (its backward too, if fn takes grads)."""
    out = []

    def walk(jaxpr):
        for e in jaxpr.eqns:
            if e.primitive.name == "dot_general":
                out.append(tuple(tuple(v.aval.shape) for v in e.invars))
            for sub in jax.extend.core.jaxprs_in_params(e.params):
                walk(sub)
    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return out


@pytest.mark.parametrize("x_shape", [(7,), (5, 7), (3, 5, 7), (2, 3, 4, 7)])
def test_both_forms_are_jnp_dot_in_values_and_gradients(x_shape):
    x = jax.random.normal(jax.random.key(0), x_shape, jnp.float64)
    w = jax.random.normal(jax.random.key(1), (7, 6), jnp.float64)
    loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w)))
    want = (jnp.dot(x, w), jax.grad(loss(jnp.dot), argnums=(0, 1))(x, w))
    for flat in (False, True):
        with kernels.forced_flat_rows(flat):
            got = (rows_dot(x, w), jax.grad(loss(rows_dot), argnums=(0, 1))(x, w))
        assert got[0].shape == x_shape[:-1] + (6,)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-12, err_msg=f"flat={flat}")


def test_flat_form_differentiates_as_2d_products():
    """With FLAT_ROWS on, the forward and both backward products (input and weight gradients) are
    2-D products over the B * L rows; off, the batched [B, L, K] form of jnp.dot."""
    x = jnp.ones((3, 5, 7))
    w = jnp.ones((7, 6))

    def shapes(flat):  # a new function per form: traces of the same function object are cached
        grads = jax.grad(lambda x, w: jnp.sum(rows_dot(x, w) ** 2), argnums=(0, 1))
        with kernels.forced_flat_rows(flat):
            return _dot_generals(grads, x, w)
    flat = shapes(True)
    assert len(flat) == 3 and all(len(s) == 2 for op in flat for s in op), flat
    assert ((15, 7), (7, 6)) in flat  # the forward, over the flattened rows
    assert ((3, 5, 7), (7, 6)) in shapes(False)


def test_rows_dot_names_mismatched_shapes():
    with pytest.raises(ValueError, match=r"rows_dot: x \(3, 5, 7\) @ w \(6, 7\): w must be \[7, N\]"):
        rows_dot(jnp.ones((3, 5, 7)), jnp.ones((6, 7)))
    with pytest.raises(ValueError, match="w must be"):
        rows_dot(jnp.ones((3, 7)), jnp.ones((7,)))


def test_flat_rows_is_the_cpu_default_and_in_the_benchmark_records():
    assert kernels.FLAT_ROWS.value is None
    assert kernels.FLAT_ROWS() is (jax.default_backend() == "cpu")
    assert kernels.reference_forms()["flat_rows"] is kernels.FLAT_ROWS()
    with kernels.forced_flat_rows(False):
        assert kernels.reference_forms()["flat_rows"] is False
    assert kernels.FLAT_ROWS.value is None
