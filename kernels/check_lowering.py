"""Lowers every Pallas kernel for a GPU (Triton) or TPU (Mosaic) target on a machine without one.

    python -m kernels.check_lowering --platform cuda
    python -m kernels.check_lowering --platform tpu [--dtypes float32,bfloat16]

For each case (forward, and forward + backward through ``jax.grad`` of a loss that uses every
output, lse included) the function is traced and lowered with
``jax.jit(f).trace(...).lower(lowering_platforms=(platform,))``: that runs the Pallas -> Triton /
Mosaic lowering of every kernel (block shapes, power-of-two and alignment rules, unsupported
primitives) without hardware. It does not run the backend compiler (ptxas / the TPU compiler), so
a passing check is necessary, not sufficient. One line per case; the exit status is non-zero if
any case fails.

TPU lowering asks the TPU info registry about the current device; on CPU the device kind is
registered for the duration of the check as a TPU v5e (``_fake_tpu_info``, test-only).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import re
import sys
import traceback
from typing import Iterator, Optional

import jax
import jax.numpy as jnp

from kernels._relpos_flash import BlockSizes
from kernels.lookahead import lookahead_pallas
from kernels.rel_attention import rel_attention_pallas

PLATFORM_TARGET = {"cuda": "gpu", "rocm": "gpu", "tpu": "tpu"}
CUSTOM_CALL = {"gpu": "__gpu$xla.gpu.triton", "tpu": "tpu_custom_call"}
# pallas_calls per lowered function: forward = 1; grad = forward + row-term kernel + dQ, dK/dV, dR.
N_CALLS = {"fwd": 1, "fwd+bwd": 5}


@dataclasses.dataclass(frozen=True)
class Case:
    kernel: str  # "rel_attention" | "lookahead"
    n: int  # segment length N
    m: int  # memory buffer length Mb
    heads: int = 2
    d_head: int = 64
    dtype: str = "float32"
    same_length: bool = False
    causal: bool = True  # lookahead: False = the "full" variant
    block_sizes: Optional[BlockSizes] = None

    def describe(self) -> str:
        rel = ("M=0" if self.m == 0 else "M<N" if self.m < self.n
               else "M=N" if self.m == self.n else "M>N")
        extra = (f"same_length={self.same_length}" if self.kernel == "rel_attention"
                 else ("causal" if self.causal else "full"))
        bs = "" if self.block_sizes is None else (
            f" blocks={self.block_sizes.block_q}/{self.block_sizes.block_k}/"
            f"{self.block_sizes.block_bwd} warps={self.block_sizes.num_warps}")
        return (f"{self.kernel:13s} N={self.n:<4d} M={self.m:<4d} ({rel}) H={self.heads} "
                f"D={self.d_head} {self.dtype:8s} {extra}{bs}")


def default_cases(dtypes=("float32", "bfloat16")) -> list[Case]:
    cases = []
    for dt in dtypes:
        cases += [
            Case("rel_attention", 64, 0, dtype=dt),  # no memory
            Case("rel_attention", 64, 32, dtype=dt, same_length=True),  # M < N
            Case("rel_attention", 128, 128, dtype=dt),  # M = N
            Case("rel_attention", 48, 200, d_head=41, dtype=dt, same_length=True),  # M > N, ragged
            Case("lookahead", 64, 32, dtype=dt),  # M < N (window W = M)
            Case("lookahead", 128, 128, dtype=dt),  # M = N
            Case("lookahead", 48, 200, d_head=41, dtype=dt),  # M > N, M not a block multiple
            Case("lookahead", 48, 100, dtype=dt, causal=False),  # full variant (needs M >= N)
        ]
    cases.append(Case("rel_attention", 150, 150, heads=1, d_head=64,
                      block_sizes=BlockSizes(128, 256, 128)))
    return cases


def _args(case: Case):
    dt = jnp.dtype(case.dtype)
    sdt = jnp.promote_types(dt, jnp.float32)
    b, n, m, h, d = 2, case.n, case.m, case.heads, case.d_head
    s = lambda *shape: jax.ShapeDtypeStruct(shape, dt)
    ints = jax.ShapeDtypeStruct((b,), jnp.int32)
    if case.kernel == "rel_attention":
        k = m + n
        return (s(b, n, h, d), s(b, k, h, d), s(b, k, h, d), s(k, h, d), s(h, d), s(h, d), ints)
    w = min(m, n)
    t = m if case.causal else w - 1 + m
    return (s(b, m, h, d), s(b, w, h, d), s(b, w, h, d), s(t, h, d), s(h, d), s(h, d),
            s(b, m, h, d), jax.ShapeDtypeStruct((b, m, h), sdt), ints)


def _function(case: Case, target: str, mode: str):
    scale = 1.0 / math.sqrt(case.d_head)
    if case.kernel == "rel_attention":
        fn = lambda *a: rel_attention_pallas(*a, scale=scale, same_length=case.same_length,
                                             block_sizes=case.block_sizes, target=target)
    else:
        w = min(case.m, case.n)
        r_offset = -1 if case.causal else w - 2
        fn = lambda *a: lookahead_pallas(*a, r_offset=r_offset, scale=scale, causal=case.causal,
                                         block_sizes=case.block_sizes, target=target)
    if mode == "fwd":
        return fn

    def loss(*a):
        out, lse = fn(*a)
        return jnp.sum(out.astype(jnp.float32) ** 2) + jnp.sum(jnp.sin(lse))

    # q, k, v, r, u, vbias (lookahead's cache arguments are stop-gradient'ed by the model).
    return jax.grad(loss, argnums=tuple(range(6)))


@contextlib.contextmanager
def _fake_tpu_info(platform: str) -> Iterator[None]:
    """Test-only: lets Mosaic lowering ask the TPU info registry about a CPU device."""
    if platform != "tpu" or jax.default_backend() == "tpu":
        yield
        return
    from jax._src.pallas.mosaic import tpu_info

    kind = jax.devices()[0].device_kind
    had = kind in tpu_info.registry
    old = tpu_info.registry.get(kind)
    tpu_info.registry[kind] = lambda: tpu_info.get_tpu_info_for_chip(
        tpu_info.ChipVersion.TPU_V5E, 1)
    try:
        yield
    finally:
        if had:
            tpu_info.registry[kind] = old
        else:
            del tpu_info.registry[kind]


def lower_case(case: Case, platform: str, mode: str) -> str:
    """Lowers one case; returns a short summary, raises on failure."""
    target = PLATFORM_TARGET[platform]
    fn = _function(case, target, mode)
    with _fake_tpu_info(platform):
        text = jax.jit(fn).trace(*_args(case)).lower(lowering_platforms=(platform,)).as_text()
    n_calls = len(re.findall(re.escape(CUSTOM_CALL[target]), text))
    if n_calls != N_CALLS[mode]:
        raise AssertionError(f"expected {N_CALLS[mode]} {CUSTOM_CALL[target]} custom calls in "
                             f"the lowered module, found {n_calls}")
    return f"{n_calls} x {CUSTOM_CALL[target]}"


def run_checks(platform: str, cases: Optional[list[Case]] = None, verbose: bool = True,
               modes=("fwd", "fwd+bwd")) -> list[tuple[Case, str, bool, str]]:
    """Lowers every case in every mode; returns [(case, mode, ok, message)]."""
    if platform not in PLATFORM_TARGET:
        raise ValueError(f"platform={platform!r}: choose one of {sorted(PLATFORM_TARGET)}")
    results = []
    for case in cases if cases is not None else default_cases():
        for mode in modes:
            try:
                msg = lower_case(case, platform, mode)
                ok = True
            except Exception as e:  # noqa: BLE001 - report every failure, keep going
                ok = False
                msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                if verbose:
                    traceback.print_exc(limit=3)
            results.append((case, mode, ok, msg))
            if verbose:
                print(f"{'ok  ' if ok else 'FAIL'} {platform:5s} {mode:8s} {case.describe()}: {msg}",
                      flush=True)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--platform", required=True, choices=sorted(PLATFORM_TARGET))
    parser.add_argument("--dtypes", default="float32,bfloat16",
                        help="comma-separated input dtypes (default: float32,bfloat16)")
    args = parser.parse_args(argv)
    dtypes = tuple(x for x in args.dtypes.split(",") if x)
    results = run_checks(args.platform, default_cases(dtypes))
    failed = sum(not ok for _, _, ok, _ in results)
    print(f"{len(results) - failed}/{len(results)} lowerings passed for {args.platform}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
