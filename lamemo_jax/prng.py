"""Dropout masks that are bit-for-bit ``jax.random.bernoulli``, without its CPU loop overhead.

jax lowers the threefry2x32 hash on CPU as a rolled 5-iteration ``while`` loop (to keep compile
times short). XLA:CPU runs every iteration as separate thunks with copies of the loop state, so a
mask costs ~1.3 ms of fixed overhead whatever its size: about a quarter of a small model's training
step (the 2-layer d128 benchmark config draws 7 masks per layer pass; profile in
docs/benchmarks.md). ``bernoulli`` below writes the same hash unrolled in plain ``jnp`` ops, which
XLA fuses into one elementwise loop, and builds the uniform floats exactly as
``jax.random.uniform`` does. The result is identical to ``jax.random.bernoulli(key, p, shape)``
(tested bit for bit) whenever that function would use the partitionable threefry path, which is
jax's default, with a scalar p; for any other key implementation, setting or p it calls jax.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = np.uint32(0x1BD11BDA)


def _rotl(x, d: int):
    return (x << np.uint32(d)) | (x >> np.uint32(32 - d))


def threefry2x32(k1, k2, x1, x2):
    """The Threefry-2x32 block cipher (20 rounds), unrolled; uint32 in, (uint32, uint32) out."""
    ks = (k1, k2, k1 ^ k2 ^ _PARITY)
    x1 = x1 + ks[0]
    x2 = x2 + ks[1]
    for i in range(5):
        for r in _ROTATIONS[i % 2]:
            x1 = x1 + x2
            x2 = _rotl(x2, r)
            x2 = x1 ^ x2
        x1 = x1 + ks[(i + 1) % 3]
        x2 = x2 + ks[(i + 2) % 3] + np.uint32(i + 1)
    return x1, x2


def _setting(value) -> str:
    return str(getattr(value, "value", value))


def _threefry_key_words(key):
    """(k1, k2) uint32 scalars of a threefry key (typed or raw), or None for other keys."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.shape != () or str(jax.random.key_impl(key)) != "threefry2x32":
            return None
        words = jax.random.key_data(key)
    elif (key.dtype == jnp.uint32 and key.shape == (2,) and _setting(jax.config.jax_legacy_prng_key) == "allow"
          and _setting(jax.config.jax_default_prng_impl) == "threefry2x32"):
        words = key  # a raw key (jax.random.PRNGKey); with other legacy_prng_key settings jax warns/raises
    else:
        return None
    return words[0], words[1]


def _flat_index(shape, full_shape=None, start=None) -> jax.Array:
    """uint32 [shape]: the row-major flat index (in ``full_shape``, default ``shape``, of the
    block of ``shape`` that begins at ``start``), as a sum of per-axis iotas (like jax's
    ``iota_2x32_shape``) so that the SPMD partitioner builds only each device's slice of it."""
    full_shape = shape if full_shape is None else full_shape
    start = (0,) * len(shape) if start is None else start
    idx = jnp.zeros(shape, np.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        idx = idx + (lax.broadcasted_iota(np.uint32, shape, axis) + np.uint32(start[axis])) * np.uint32(stride)
        stride *= full_shape[axis]
    return idx


def bernoulli(key, p: float, shape: Sequence[int]) -> jax.Array:
    """Boolean [shape] with P(True) = p: equal to ``jax.random.bernoulli(key, p, shape)``."""
    return bernoulli_block(key, p, shape, (0,) * len(shape), shape)


def bernoulli_block(key, p: float, shape: Sequence[int], start: Sequence[int],
                    size: Sequence[int]) -> jax.Array:
    """Boolean [size]: the block of ``bernoulli(key, p, shape)`` that begins at ``start``
    (``lax.slice(bernoulli(key, p, shape), start, start + size)``), hashing only the block's
    elements, so a computation on part of the rows draws exactly the masks those rows would have
    had in the whole computation."""
    try:
        shape = tuple(int(s) for s in shape)
        start, size = tuple(int(s) for s in start), tuple(int(s) for s in size)
    except TypeError:  # symbolic (shape-polymorphic) dimensions
        return _sliced(jax.random.bernoulli(key, p, shape), start, size)
    if not len(shape) == len(start) == len(size) or any(
            a < 0 or z < 0 or a + z > s for s, a, z in zip(shape, start, size)):
        raise ValueError(f"bernoulli_block: the block at {start} of size {size} is not inside "
                         f"the shape {shape}")
    n = math.prod(shape)
    dtype = jnp.dtype(lax.dtype(p))  # as jax: float32, or float64 under jax_enable_x64
    words = _threefry_key_words(key)
    if (words is None or not jax.config.jax_threefry_partitionable or n == 0 or n >= 2**32
            or jnp.shape(p) != () or dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64))):
        return _sliced(jax.random.bernoulli(key, p, shape), start, size)
    # the partitionable counters: the row-major flat index as (high, low) 32-bit words
    b1, b2 = threefry2x32(words[0], words[1], jnp.zeros(size, np.uint32), _flat_index(size, shape, start))
    finfo = jnp.finfo(dtype)
    if dtype == jnp.float32:
        bits, one = b1 ^ b2, np.array(1.0, np.float32).view(np.uint32)
    else:
        bits = (b1.astype(np.uint64) << np.uint64(32)) | b2.astype(np.uint64)
        one = np.array(1.0, np.float64).view(np.uint64)
    ubits = bits >> np.array(finfo.bits - finfo.nmant, bits.dtype)
    u = lax.bitcast_convert_type(ubits | one, dtype) - jnp.array(1.0, dtype)
    return jnp.maximum(jnp.array(0.0, dtype), u) < jnp.asarray(p, dtype)


def _sliced(x, start, size):
    if tuple(start) == (0,) * x.ndim and tuple(size) == x.shape:
        return x
    return lax.slice(x, tuple(start), tuple(a + z for a, z in zip(start, size)))
