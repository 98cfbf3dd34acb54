"""lamemo_jax.prng.bernoulli: bit-for-bit jax.random.bernoulli, without the CPU while loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lamemo_jax import prng

SHAPES = [(), (1,), (3, 5), (1000,), (8, 64, 128), (2, 3, 4, 5), (0, 4)]


PROBS = [0.0, 0.1, 0.5, 0.9, 1.0, np.float32(0.9), np.float32(0.3)]


@pytest.mark.parametrize("shape", SHAPES)
def test_equals_jax_bernoulli_bit_for_bit(shape):
    keys = (jax.random.key(0), jax.random.fold_in(jax.random.key(123), 7), jax.random.PRNGKey(5),
            jax.random.split(jax.random.PRNGKey(9))[1])
    ours = jax.jit(lambda *ks: [[prng.bernoulli(k, p, shape) for p in PROBS] for k in ks])(*keys)
    for key, row in zip(keys, ours):
        for p, a in zip(PROBS, row):
            ref = jax.random.bernoulli(key, p, shape)
            assert a.dtype == ref.dtype == jnp.bool_ and a.shape == ref.shape == shape
            np.testing.assert_array_equal(np.asarray(a), np.asarray(ref), err_msg=f"p={p!r}")


def test_float32_and_float64_probabilities_take_their_own_bits():
    # x64 is on in the test session: a Python float p is float64 (64 random bits per draw, as jax)
    key = jax.random.key(1)
    assert jax.config.jax_enable_x64
    a64 = prng.bernoulli(key, 0.5, (4096,))
    a32 = prng.bernoulli(key, np.float32(0.5), (4096,))
    np.testing.assert_array_equal(a64, jax.random.bernoulli(key, 0.5, (4096,)))
    np.testing.assert_array_equal(a32, jax.random.bernoulli(key, np.float32(0.5), (4096,)))
    assert (np.asarray(a64) != np.asarray(a32)).any()


def test_rate_is_right():
    keep = np.asarray(prng.bernoulli(jax.random.key(2), np.float32(0.9), (512, 1024)))
    n = keep.size
    assert abs(keep.mean() - 0.9) < 5 * np.sqrt(0.09 / n)


def test_other_key_implementations_fall_back_to_jax():
    key = jax.random.key(4, impl="rbg")
    np.testing.assert_array_equal(prng.bernoulli(key, 0.7, (33, 7)),
                                  jax.random.bernoulli(key, 0.7, (33, 7)))


def test_no_while_loop_on_cpu():
    """The point of the module: jax's CPU lowering of threefry is a rolled while loop."""
    key = jax.random.key(0)
    hlo = jax.jit(lambda k: prng.bernoulli(k, np.float32(0.9), (8, 128, 512))).lower(key).as_text()
    assert "while" not in hlo
    ref = jax.jit(lambda k: jax.random.bernoulli(k, np.float32(0.9), (8, 128, 512))).lower(key)
    assert "while" in ref.as_text() or jax.default_backend() != "cpu"


def test_array_p_and_strict_legacy_keys_behave_as_jax():
    key = jax.random.key(6)
    p = jnp.linspace(0.1, 0.9, 7)
    np.testing.assert_array_equal(prng.bernoulli(key, p, (5, 7)), jax.random.bernoulli(key, p, (5, 7)))
    with pytest.raises(ValueError):  # p must broadcast to shape, as jax requires
        prng.bernoulli(key, jnp.ones((3,)) * 0.5, (5, 7))
    with jax.legacy_prng_key("error"), pytest.raises(Exception, match="[Ll]egacy"):
        prng.bernoulli(jax.random.PRNGKey(0), 0.5, (4,))


@pytest.mark.parametrize("shape,start,size", [((8, 64, 128), (0, 16, 0), (8, 48, 128)),
                                              ((2, 7, 5), (1, 2, 3), (1, 4, 2)),
                                              ((3, 5), (0, 0), (3, 5)), ((6, 9), (2, 9), (4, 0))])
def test_block_is_the_slice_of_the_whole_mask_bit_for_bit(shape, start, size):
    """bernoulli_block draws exactly the block's bits of the whole mask (what the model's last
    layer uses for the FFN dropout of the current rows alone), with both probability widths and
    with a key of another implementation (jax's own slice)."""
    limit = tuple(a + z for a, z in zip(start, size))
    for key in (jax.random.key(3), jax.random.PRNGKey(8), jax.random.key(4, impl="rbg")):
        for p in (0.9, np.float32(0.9), np.float32(0.3)):
            block = jax.jit(lambda k: prng.bernoulli_block(k, p, shape, start, size))(key)
            whole = jax.random.bernoulli(key, p, shape)
            assert block.shape == size
            np.testing.assert_array_equal(np.asarray(block), np.asarray(whole)[tuple(map(slice, start, limit))])


def test_block_outside_the_shape_is_an_error():
    with pytest.raises(ValueError, match=r"not inside the shape \(4, 6\)"):
        prng.bernoulli_block(jax.random.key(0), 0.5, (4, 6), (0, 3), (4, 4))
    with pytest.raises(ValueError, match="not inside"):
        prng.bernoulli_block(jax.random.key(0), 0.5, (4, 6), (0,), (4,))
