"""The softmax statistics every XLA path shares: a log-sum-exp in one pass, and softmax-with-lse.

``logsumexp(x)``: log(sum(exp(x))) over the last axis. Two forms, the same value to rounding:

* two passes (``jax.nn.logsumexp``): the row maximum, then the sum of exp(x - max);
* one pass: one variadic reduction carries (running max m, sum s of exp(x - m)) per row and
  rescales s when m grows (the online softmax of flash attention). On a GPU each pass over a
  score or logits tensor is a kernel that reads it from memory (the attention's f32
  [B, H, rows, keys] scores 16x per step at wt103, and the [9,600, 267,776] f32 logits, 3.4 ms per
  pass on an H100), so one pass saves a read of each.

``softmax_lse(s)`` -> (p = softmax(s), lse = logsumexp(s)): the attention references' softmax.
In the one-pass form it is a ``custom_vjp`` whose backward is the closed form
ds = p * (dp - sum(p * dp) + dlse) from the saved p (reverse mode only, like the Pallas kernels:
``jax.jvp`` of it raises). It did not save memory on the H100 (the wt103 step's buffers:
28,538 MB against 28,518 MB for the two-pass autodiff), only time.

Which form runs is a ``BackendSwitch``, ``ONE_PASS``: by backend (on a GPU), or forced
(``ONE_PASS.forced(True)`` for a block, ``ONE_PASS.set``). The CPU keeps the two-pass,
plain-autodiff program: bit for bit what the recorded CPU runs used, and the one-pass form was
not faster there (LaMemo train step at the 2-layer benchmark config, the two forms interleaved
in one scratch run, two-pass vs one-pass: 89.0 vs 90.3 ms at mem_len 64, 98.2 vs 122.4 at 128,
365.2 vs 368.6 at 512: even at 64 and 512, slower at 128).
"""

from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array


class BackendSwitch:
    """A boolean choice between two forms of the same computation (same values to rounding): by
    backend unless forced. Read when a function is traced: jitted functions traced earlier keep
    the form they were traced with."""

    def __init__(self, name: str, on_backends: Sequence[str]):
        self.name = name
        self.on_backends = tuple(on_backends)
        self.value: Optional[bool] = None

    def set(self, value: Optional[bool]) -> None:
        """Force the form (True / False), or None: by backend."""
        if value is not None and not isinstance(value, bool):
            raise TypeError(f"{self.name}: True, False or None expected, got {value!r}")
        self.value = value

    @contextlib.contextmanager
    def forced(self, value: bool):
        """``set(value)`` for the functions traced inside the block, then the previous setting."""
        previous = self.value
        self.set(value)
        try:
            yield
        finally:
            self.value = previous

    def __call__(self) -> bool:
        if self.value is not None:
            return self.value
        return jax.default_backend() in self.on_backends

    def __bool__(self):
        raise TypeError(f"{self.name}: call the switch (``{self.name}()``) for its current form")

    def __repr__(self) -> str:
        return f"BackendSwitch({self.name!r}, value={self.value}, on={self.on_backends})"


def stat_dtype(dtype) -> jnp.dtype:
    """dtype of softmax statistics: float64 in float64 runs, never below float32."""
    return jnp.promote_types(dtype, jnp.float32)


GPU_BACKENDS = ("gpu", "cuda", "rocm")
ONE_PASS = BackendSwitch("one_pass_softmax", GPU_BACKENDS)


def _combine(a, b):
    """(max, sum of exp(x - max)) of two partial reductions; one exp per combination."""
    (m1, s1), (m2, s2) = a, b
    first = m1 >= m2
    m = jnp.where(first, m1, m2)
    # e = exp(-|m1 - m2|); equal maxima (also both -inf, or both +inf) scale by 1, not by NaN
    e = jnp.exp(jnp.where(m1 == m2, jnp.zeros_like(m1), -jnp.abs(m1 - m2)))
    s = jnp.where(first, s1 + s2 * e, s1 * e + s2)
    return m, s


@jax.custom_jvp
def logsumexp_one_pass(x: Array) -> Array:
    """log(sum(exp(x))) over the last axis in one variadic reduction, in x's dtype (computed in at
    least float32, as ``jax.nn.logsumexp``). A row of -inf gives -inf; NaN propagates.
    Differentiable (its JVP is sum(softmax(x) * dx), as the two-pass form's)."""
    xf = x.astype(stat_dtype(x.dtype))
    neg_inf = jnp.array(-jnp.inf, xf.dtype)
    m, s = lax.reduce((xf, jnp.ones_like(xf)), (neg_inf, jnp.array(0, xf.dtype)), _combine,
                      (x.ndim - 1,))
    return (m + jnp.log(s)).astype(x.dtype)


@logsumexp_one_pass.defjvp
def _logsumexp_one_pass_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    lse = logsumexp_one_pass(x)
    return lse, jnp.sum(jnp.exp(x - lse[..., None]) * dx, axis=-1)


def logsumexp(x: Array) -> Array:
    """log(sum(exp(x))) over the last axis, in the form ``ONE_PASS`` picks."""
    return logsumexp_one_pass(x) if ONE_PASS() else jax.nn.logsumexp(x, axis=-1)


def softmax_lse(s: Array) -> tuple[Array, Array]:
    """(softmax(s), logsumexp(s)) over the last axis: p [..., K] and lse [...], in s's dtype.

    ``ONE_PASS`` on: the one-pass log-sum-exp and a ``custom_vjp`` with p as its only residual.
    Off (the CPU's default): plain autodiff of ``jax.nn.logsumexp`` and exp, the program the
    project ran before, bit for bit (CPU results and the recorded runs stay reproducible)."""
    if ONE_PASS():
        return _softmax_lse_one_pass(s)
    lse = jax.nn.logsumexp(s, axis=-1)
    return jnp.exp(s - lse[..., None]), lse


@jax.custom_vjp
def _softmax_lse_one_pass(s: Array) -> tuple[Array, Array]:
    return _softmax_lse_fwd(s)[0]


def _softmax_lse_fwd(s):
    lse = logsumexp_one_pass(s)
    p = jnp.exp(s - lse[..., None])
    return (p, lse), p


def _softmax_lse_bwd(p, g):
    """ds = p * (dp - sum(p * dp) + dlse): the derivative of (softmax, logsumexp) in closed form."""
    dp, dlse = g
    ds = p * (dp - jnp.sum(p * dp, axis=-1, keepdims=True) + dlse[..., None])
    return (ds,)


_softmax_lse_one_pass.defvjp(_softmax_lse_fwd, _softmax_lse_bwd)
