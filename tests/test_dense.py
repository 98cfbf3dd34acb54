"""kernels.rows_dot: the layers' dense products, batched or as one 2-D product over the flattened
rows (``kernels.FLAT_ROWS``). Both forms are the same product: values and gradients equal in
float64, in the product alone and through a training loss of both memories."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
import lamemo_jax
from kernels.dense import rows_dot


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


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


@pytest.mark.parametrize("memory,train", [("lamemo", False), ("xl", False), ("lamemo", True)])
def test_training_loss_and_gradients_are_the_same_in_both_forms(memory, train):
    """Two segments (the second with the refreshed memory), every parameter's gradient, with and
    without dropout (the same masks), float64: the same to 1e-12 in both forms."""
    cfg = lamemo_jax.ModelConfig(n_token=40, n_layer=2, d_model=16, n_head=2, d_head=8, d_inner=24,
                                 tgt_len=6, mem_len=6, memory=memory, dtype="float64",
                                 param_dtype="float64", dropout=0.2 if train else 0.0, dropatt=0.0)
    params = lamemo_jax.init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 7), 0, 40)
    mem = lamemo_jax.init_memory(cfg, 2)
    kw = dict(train=True, rng=jax.random.key(7)) if train else {}

    def value_and_grad(flat):  # a new function per form (traces of one function are cached)
        def loss(p):
            _, m = lamemo_jax.apply(cfg, p, tokens[:, :6], mem, targets=tokens[:, 1:], **kw)
            out, _ = lamemo_jax.apply(cfg, p, tokens[:, 1:], m, targets=tokens[:, :6], **kw)
            return jnp.sum(out.nll * jnp.arange(1.0, 7.0))
        with kernels.forced_flat_rows(flat):
            n_flat = sum(len(op[0]) == 2 for op in _dot_generals(jax.value_and_grad(loss), params))
            return jax.jit(jax.value_and_grad(loss))(params), n_flat

    results, n_flat = zip(*(value_and_grad(flat) for flat in (False, True)))
    assert n_flat[1] > n_flat[0]  # the two forms were traced (2-D products: the flat form's)
    (l0, g0), (l1, g1) = results
    assert abs(float(l0) - float(l1)) <= 1e-12 * abs(float(l0))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g0), jax.tree.leaves(g1)):
        assert float(jnp.max(jnp.abs(a - b))) <= 1e-12, jax.tree_util.keystr(path)
