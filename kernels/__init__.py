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

Sharded callers: a ``pallas_call`` is opaque to XLA's SPMD partitioner, which would gather its
operands and run the whole batch on every device. When the caller traces under a mesh
(``jax.sharding.use_abstract_mesh`` / ``jax.set_mesh``) and passes ``partition=Partition(batch
mesh axes, head mesh axes)``, the dispatcher runs the kernel inside ``jax.shard_map``: each device
computes its own batch rows and heads (the kernels are independent per row and head); the
position table and biases are replicated and their gradients summed by shard_map's transpose.
An axis that does not divide the batch (or the heads) is left out (replicated), never an error.

The references' GPU forms (``BATCHED_POSITIONS``, ``ONE_PASS_SOFTMAX``; ``kernels/softmax.py``'s
``BackendSwitch``): the same values in another form, on by default on a GPU only; see
docs/kernels.md. Their CPU forms: ``NARROW_BAND`` (the look-ahead's position band in 16-row
blocks) and ``FLAT_ROWS`` (the model's dense products as 2-D products over the flattened rows,
``kernels/dense.py``'s ``rows_dot``), on by default on a CPU only.

Attention dropout: the kernels do not implement ``dropatt``. A call with ``dropatt > 0`` and a
``dropout_rng`` (training with attention dropout) falls back to the reference whatever ``impl``
says; the paper's recipes use dropatt = 0, so the kernels cover them. See docs/kernels.md.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import jax
from jax.sharding import PartitionSpec as P

from kernels._relpos_flash import BlockSizes
from kernels.dense import FLAT_ROWS, forced_flat_rows, rows_dot, set_flat_rows
from kernels.lookahead import (NARROW_BAND, forced_narrow_band, lookahead_pallas, lookahead_reference,
                               set_narrow_band)
from kernels.rel_attention import (BATCHED_POSITIONS, forced_batched_positions, rel_attention_pallas,
                                   rel_attention_reference, set_batched_positions)
from kernels.softmax import ONE_PASS as ONE_PASS_SOFTMAX

IMPLS = ("auto", "xla", "pallas", "pallas_interpret")
# the XLA path's by-backend forms (kernels.softmax.BackendSwitch), by the name benchmarks use
SWITCHES = {"batched_positions": BATCHED_POSITIONS, "one_pass_softmax": ONE_PASS_SOFTMAX,
            "narrow_band": NARROW_BAND, "flat_rows": FLAT_ROWS}


def reference_forms() -> dict:
    """{switch name: the form a function traced now gets}, for benchmark records."""
    return {name: switch() for name, switch in SWITCHES.items()}

ACCELERATOR_BACKENDS = ("gpu", "cuda", "rocm", "tpu")

__all__ = ["BlockSizes", "IMPLS", "KernelUnavailableError", "Partition", "lookahead", "lookahead_pallas",
           "lookahead_reference", "rel_attention", "rel_attention_pallas",
           "rel_attention_reference", "resolve_impl", "BATCHED_POSITIONS", "ONE_PASS_SOFTMAX",
           "forced_batched_positions", "set_batched_positions", "NARROW_BAND", "forced_narrow_band",
           "set_narrow_band", "SWITCHES", "reference_forms", "FLAT_ROWS", "forced_flat_rows",
           "rows_dot", "set_flat_rows"]


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


@dataclasses.dataclass(frozen=True)
class Partition:
    """The mesh axes over which a sharded caller splits the batch and the heads dimension."""

    batch_axes: Sequence[str] = ()
    head_axes: Sequence[str] = ()


# Layout of each positional argument / output: b = batch, h = heads, '.' = other (replicated).
_REL_IN = ("b.h.", "b.h.", "b.h.", ".h.", "h.", "h.", "b")  # q k v r u vb key_start
_LOOK_IN = ("b.h.", "b.h.", "b.h.", ".h.", "h.", "h.", "b.h.", "b.h", "b")  # ... cache cache_lse valid
_OUT = ("b.h.", "b.h")  # (out | c) [B, rows, H, D], (lse | new_lse) [B, rows, H]


def _usable_axes(mesh, names: Sequence[str], size: int) -> tuple:
    """The axes of ``names`` present in the mesh (size > 1) whose product keeps dividing ``size``."""
    used, prod = [], 1
    for a in names:
        n = mesh.shape.get(a, 1)
        if n > 1 and size % (prod * n) == 0:
            used.append(a)
            prod *= n
    return tuple(used)


def _partitioned(fn, args, layouts_in, partition: Optional[Partition]):
    """fn(*args), inside shard_map over the caller's mesh when there is one to split over."""
    if partition is None:
        return fn(*args)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or math.prod(mesh.shape.values()) == 1:
        return fn(*args)
    b_axes = _usable_axes(mesh, partition.batch_axes, args[0].shape[0])
    h_axes = _usable_axes(mesh, partition.head_axes, args[0].shape[2])
    if not b_axes and not h_axes:
        return fn(*args)
    letter = {"b": b_axes or None, "h": h_axes or None, ".": None}
    spec = lambda layout: P(*(letter[c] for c in layout))
    # check_vma=False: pallas_call has no varying-manual-axes rule; the specs above are exact.
    return jax.shard_map(fn, mesh=mesh, in_specs=tuple(spec(l) for l in layouts_in),
                         out_specs=tuple(spec(l) for l in _OUT), check_vma=False)(*args)


def rel_attention(impl: str, *args, partition: Optional[Partition] = None, **kwargs):
    """``rel_attention_reference`` / ``rel_attention_pallas`` by ``impl`` (same arguments);
    ``partition``: see the module docstring (used by the Pallas implementations)."""
    impl = resolve_impl(impl)
    with jax.named_scope("rel_attention"):  # op names in profiles (benchmarks.profile_step)
        if impl == "xla" or _uses_attention_dropout(kwargs):
            return rel_attention_reference(*args, **kwargs)
        fn = lambda *a: rel_attention_pallas(*a, interpret=(impl == "pallas_interpret"), **kwargs)
        return _partitioned(fn, args, _REL_IN, partition)


def lookahead(impl: str, *args, partition: Optional[Partition] = None, **kwargs):
    """``lookahead_reference`` / ``lookahead_pallas`` by ``impl`` (same arguments);
    ``partition``: see the module docstring (used by the Pallas implementations)."""
    impl = resolve_impl(impl)
    with jax.named_scope("lookahead"):
        if impl == "xla" or _uses_attention_dropout(kwargs):
            return lookahead_reference(*args, **kwargs)
        fn = lambda *a: lookahead_pallas(*a, interpret=(impl == "pallas_interpret"), **kwargs)
        return _partitioned(fn, args, _LOOK_IN, partition)
