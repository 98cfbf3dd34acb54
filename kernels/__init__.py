"""Attention implementations of the LaMemo / Transformer-XL layer, free of Flax and model code.

Each kernel file holds the plain-jnp reference (what the model runs on the XLA path) and, where
available, the Pallas kernels with their ``custom_vjp`` wrappers. ``rel_attention`` and
``lookahead`` below dispatch on ``ModelConfig.attention_impl``:

* ``"xla"``: the plain-jnp reference (XLA fuses it); the default on CPU.
* ``"auto"``: the Pallas kernels on GPU/TPU when they are available, else the XLA reference.
* ``"pallas"`` / ``"pallas_interpret"``: the Pallas kernels (interpret mode runs on CPU).
"""

from __future__ import annotations

import jax

from kernels.lookahead import lookahead_reference
from kernels.rel_attention import rel_attention_reference


class KernelUnavailableError(RuntimeError):
    """A Pallas implementation was forced where it cannot run."""


def _pallas_module(name: str):
    try:
        import importlib
        return importlib.import_module(f"kernels.{name}_pallas")
    except ImportError:
        return None


def resolve_impl(impl: str) -> str:
    """'auto' -> 'pallas' on GPU/TPU when the kernels exist, else 'xla'."""
    if impl == "auto":
        platform = jax.default_backend()
        if platform in ("gpu", "cuda", "rocm", "tpu") and _pallas_module("lookahead") is not None:
            return "pallas"
        return "xla"
    if impl == "pallas" and jax.default_backend() == "cpu":
        raise KernelUnavailableError(
            "ModelConfig.attention_impl='pallas' needs a GPU or TPU backend (this process runs on "
            "CPU); use 'pallas_interpret' to run the kernels in interpret mode, or 'xla'.")
    return impl


def rel_attention(impl: str, *args, **kwargs):
    impl = resolve_impl(impl)
    if impl == "xla":
        return rel_attention_reference(*args, **kwargs)
    mod = _pallas_module("rel_attention")
    if mod is None:
        raise KernelUnavailableError(f"attention_impl={impl!r}: the Pallas rel_attention kernel is "
                                     "not available in this build; use 'xla'.")
    return mod.rel_attention(*args, interpret=(impl == "pallas_interpret"), **kwargs)


def lookahead(impl: str, *args, **kwargs):
    impl = resolve_impl(impl)
    if impl == "xla":
        return lookahead_reference(*args, **kwargs)
    mod = _pallas_module("lookahead")
    if mod is None:
        raise KernelUnavailableError(f"attention_impl={impl!r}: the Pallas lookahead kernel is "
                                     "not available in this build; use 'xla'.")
    return mod.lookahead(*args, interpret=(impl == "pallas_interpret"), **kwargs)
