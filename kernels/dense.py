"""The dense products of the model's layers, in the form XLA:CPU differentiates well.

``rows_dot(x, w)`` is ``x [..., K] @ w [K, N]``, the layers' projections (``model.layer_dot``). With
``FLAT_ROWS`` on it is written as one 2-D product over the flattened rows,
``(x.reshape(-1, K) @ w).reshape(..., N)``: the same values to rounding. What changes is the
backward. Autodiff of the batched form ``[B, L, K] @ [K, N]`` gives a weight gradient that
contracts over two dimensions (B and L); XLA:CPU lays it out with the output gradient transposed,
and fuses the output gradient's whole computation (a LayerNorm backward, the dropout mask's
threefry hash) into that transposing copy, one element at a time, although the same gradient is
already materialized for the input gradient. The 2-D form's weight gradient is a plain
``x2^T @ g2`` that reads the materialized gradient. Measured on the 2-core CPU at the benchmark
config (docs/benchmarks.md): the LaMemo training step 6% faster at mem_len 64 and 13-16% at 256
(the o_net's weight gradient over the memory rows had been the step's two most expensive ops),
Transformer-XL's 6-10%.

On by default on a CPU only. On a GPU it did not change the step time (the wt103 bf16 step on
an H200, 2026-11-27: 82.0 vs 82.3 ms for LaMemo, 56.4 vs 56.0 ms for XL, within noise; most
likely XLA:GPU runs the batched product and its weight gradient as single GEMMs already), so
the GPU keeps the plain form.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels.softmax import BackendSwitch

Array = jax.Array

FLAT_ROWS = BackendSwitch("flat_rows", ("cpu",))
"""Dense products as one 2-D product over the flattened rows (on) or batched over the leading
dimensions (off); see the module docstring."""

set_flat_rows = FLAT_ROWS.set
forced_flat_rows = FLAT_ROWS.forced


def rows_dot(x: Array, w: Array) -> Array:
    """x [..., K] @ w [K, N] -> [..., N], as ``jnp.dot(x, w)``; with ``FLAT_ROWS`` on, as one 2-D
    product over the flattened rows (same values; the weight gradient's sums in another order)."""
    k = x.shape[-1]
    if w.ndim != 2 or w.shape[0] != k:
        raise ValueError(f"rows_dot: x {x.shape} @ w {w.shape}: w must be [{k}, N]")
    if x.ndim <= 2 or not FLAT_ROWS():
        return jnp.dot(x, w)
    return jnp.dot(x.reshape(-1, k), w).reshape(x.shape[:-1] + (w.shape[1],))
