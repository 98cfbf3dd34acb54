"""Attention implementations of the LaMemo / Transformer-XL layer, free of Flax and model code.

Each kernel file holds the plain-jnp reference (what the model runs on the XLA path, and the
single source of truth), the Pallas kernels and their ``custom_vjp`` wrapper
(``rel_attention_pallas``, ``lookahead_pallas``; shared engine in ``kernels/_relpos_flash.py``).
``rel_attention`` and ``lookahead`` below dispatch on ``ModelConfig.attention_impl``:

* ``"xla"``: the plain-jnp reference (XLA fuses it).
* ``"auto"``: the Pallas kernels on GPU (Triton) / TPU (Mosaic), the XLA reference on CPU.
* ``"pallas"``: the Pallas kernels compiled for the current GPU/TPU backend; a
  ``KernelUnavailableError`` on CPU.
* ``"pallas_interpret"``: the Pallas kernels in interpret mode (runs anywhere; slow; for tests).

Attention dropout: the kernels do not implement ``dropatt``. A call with ``dropatt > 0`` and a
``dropout_rng`` (training with attention dropout) falls back to the reference whatever ``impl``
says; the paper's recipes use dropatt = 0, so the kernels cover them. See docs/kernels.md.
"""

from __future__ import annotations

import jax

from kernels._relpos_flash import BlockSizes
from kernels.lookahead import lookahead_pallas, lookahead_reference
from kernels.rel_attention import rel_attention_pallas, rel_attention_reference

IMPLS = ("auto", "xla", "pallas", "pallas_interpret")
ACCELERATOR_BACKENDS = ("gpu", "cuda", "rocm", "tpu")

__all__ = ["BlockSizes", "IMPLS", "KernelUnavailableError", "lookahead", "lookahead_pallas",
           "lookahead_reference", "rel_attention", "rel_attention_pallas",
           "rel_attention_reference", "resolve_impl"]


class KernelUnavailableError(RuntimeError):
    """A Pallas implementation was forced where it cannot run."""


_SELF_CHECK: dict = {}


def pallas_self_check() -> bool:
    """Once per process on an accelerator: both kernels, forward and gradients, at a small ragged
    shape against the references (float32 at full matmul precision, 1e-4). 'auto' uses Pallas only when this passes; a
    failure (compile error or mismatch) is logged and 'auto' falls back to XLA."""
    if "ok" in _SELF_CHECK:
        return _SELF_CHECK["ok"]
    import logging
    import numpy as np
    import jax.numpy as jnp
    ok, why = True, ""
    try:
        rng = np.random.default_rng(0)
        b, n, mb, h, d = 2, 40, 72, 2, 32
        k_len, w = mb + n, min(mb, n)
        f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
        q, kk, vv, r = f(b, n, h, d), f(b, k_len, h, d), f(b, k_len, h, d), f(k_len, h, d)
        qm, kw, vw, rt = f(b, mb, h, d), f(b, w, h, d), f(b, w, h, d), f(mb, h, d)
        u, vb, cache, zc = f(h, d), f(h, d), f(b, mb, h, d), f(b, mb, h)
        ks = jnp.asarray([0, 30], jnp.int32)
        mv = jnp.asarray([mb, 20], jnp.int32)

        def loss(fr, fl, *xs):
            o, l = fr(*xs[:7], scale=0.2)
            c, z = fl(*xs[7:], scale=0.2, r_offset=-1)
            return jnp.sum(o * o) + jnp.sum(l) + jnp.sum(c * c) + jnp.sum(z)

        args = (q, kk, vv, r, u, vb, ks, qm, kw, vw, rt, u, vb, cache, zc, mv)
        argnums = (0, 1, 2, 3, 7, 8, 9, 10)
        with jax.default_matmul_precision("highest"):  # exact float32 on both paths (no TF32)
            ref = jax.jit(jax.value_and_grad(
                lambda *a: loss(rel_attention_reference, lookahead_reference, *a), argnums=argnums))(*args)
            got = jax.jit(jax.value_and_grad(
                lambda *a: loss(rel_attention_pallas, lookahead_pallas, *a), argnums=argnums))(*args)
        for x, y in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
            err = float(jnp.max(jnp.abs(x - y)) / jnp.maximum(1.0, jnp.max(jnp.abs(x))))
            if not err <= 1e-4:
                ok, why = False, f"mismatch {err:.2e} against the reference"
                break
    except Exception as e:  # noqa: BLE001 - any failure means: do not use the kernels
        ok, why = False, f"{type(e).__name__}: {str(e)[:500]}"
    if not ok:
        logging.warning("attention_impl='auto': the Pallas kernels failed their self-check on %s (%s); "
                        "using the XLA reference", jax.devices()[0].device_kind, why)
    _SELF_CHECK["ok"] = ok
    return ok


def resolve_impl(impl: str) -> str:
    """'auto' -> 'pallas' on GPU/TPU (after a one-time self-check), else 'xla'; 'pallas' on CPU
    raises; others pass through."""
    if impl not in IMPLS:
        raise ValueError(f"attention_impl={impl!r}: choose one of {IMPLS}")
    backend = jax.default_backend()
    if impl == "auto":
        return "pallas" if backend in ACCELERATOR_BACKENDS and pallas_self_check() else "xla"
    if impl == "pallas" and backend not in ACCELERATOR_BACKENDS:
        raise KernelUnavailableError(
            f"ModelConfig.attention_impl='pallas' needs a GPU or TPU backend (this process runs on "
            f"{backend!r}); use 'pallas_interpret' to run the kernels in interpret mode, or 'xla'.")
    return impl


def _uses_attention_dropout(kwargs) -> bool:
    return kwargs.get("dropatt", 0.0) > 0.0 and kwargs.get("dropout_rng") is not None


def rel_attention(impl: str, *args, **kwargs):
    """``rel_attention_reference`` / ``rel_attention_pallas`` by ``impl`` (same arguments)."""
    impl = resolve_impl(impl)
    if impl == "xla" or _uses_attention_dropout(kwargs):
        return rel_attention_reference(*args, **kwargs)
    return rel_attention_pallas(*args, interpret=(impl == "pallas_interpret"), **kwargs)


def lookahead(impl: str, *args, **kwargs):
    """``lookahead_reference`` / ``lookahead_pallas`` by ``impl`` (same arguments)."""
    impl = resolve_impl(impl)
    if impl == "xla" or _uses_attention_dropout(kwargs):
        return lookahead_reference(*args, **kwargs)
    return lookahead_pallas(*args, interpret=(impl == "pallas_interpret"), **kwargs)
