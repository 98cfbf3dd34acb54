"""Pallas kernels vs the XLA references: forward and forward+backward time and peak memory.

    python -m benchmarks.kernels                       # defaults for this backend
    python -m benchmarks.kernels --configs 512x512x8x64,150x150x10x41 --dtypes bfloat16 \
        --batch 8 --iters 20 --json runs/kernels.json

A config is ``NxMxHxDh`` (segment length, memory length, heads, head dim). For every config,
dtype and kernel (``rel_attention``: the current rows over [memory; current]; ``lookahead``: the
memory rows over the window, fused with the interpolation) it measures, for the XLA reference
and the Pallas kernel:

* ``fwd_ms`` / ``fwd_bwd_ms``: median wall time of the jitted forward / ``jax.grad`` of a scalar
  loss of every output (all differentiable inputs), after one warm-up call;
* ``fwd_bwd_peak_mb``: the compiled executable's memory (``memory_analysis()``: arguments +
  outputs + temporaries, minus aliased bytes), plus ``device_peak_mb`` from the device's
  ``memory_stats()`` where the backend reports one (GPU/TPU; the process's running peak, so
  it only bounds a config's memory from above);
* ``max_rel_err_vs_xla`` (Pallas rows): max over the outputs and all gradients of
  ``max|pallas - xla| / max(1, max|xla|)``, so a fast but wrong kernel shows up in the table.

``--block-sizes q,k,bwd[,warps]`` (repeatable) times the Pallas kernels with those tiles (and
Triton warps per program) instead of the target's defaults, one Pallas row per set, each with
its own error against the one XLA row: a tile sweep on a GPU in one process (``device_peak_mb``
is the process's running peak, so in a sweep it only grows from row to row), e.g.

    python -m benchmarks.kernels --configs 150x150x10x41 --dtypes bfloat16 --batch 64 \
        --block-sizes 64,64,32 --block-sizes 64,64,64 --block-sizes 64,64,64,8

On CPU the Pallas kernels only run in interpret mode, which emulates the kernel grid with XLA
loops: its numbers say nothing about kernel speed, so on CPU the benchmark is a smoke test (small
default configs, three iterations) and says so. Results are printed as a table and written as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from kernels import BlockSizes
from kernels._relpos_flash import resolve_target
from kernels.lookahead import lookahead_pallas, lookahead_reference
from kernels.rel_attention import rel_attention_pallas, rel_attention_reference
from benchmarks.memory import compiled_mb, device_peak_mb
from lamemo_jax.host import tune_cpu_host

ACCEL_CONFIGS = "150x150x10x41,512x512x8x64,512x1024x8x64,256x2048x8x64"
CPU_CONFIGS = "16x24x2x16,24x16x2x16"


def parse_config(text: str) -> tuple[int, int, int, int]:
    parts = text.lower().split("x")
    if len(parts) != 4 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"config {text!r}: expected NxMxHxDh with positive integers, "
                         "e.g. 512x512x8x64")
    return tuple(int(p) for p in parts)  # type: ignore[return-value]


def make_inputs(kernel: str, b: int, n: int, m: int, h: int, d: int, dtype, seed: int = 0):
    """(differentiable args, static kwargs, extra trailing args) for one kernel call."""
    rng = np.random.default_rng(seed)
    arr = lambda *s: jnp.asarray(rng.normal(size=s) * 0.5, dtype)
    sdt = jnp.promote_types(dtype, jnp.float32)
    scale = 1.0 / math.sqrt(d)
    if kernel == "rel_attention":
        k = m + n
        args = (arr(b, n, h, d), arr(b, k, h, d), arr(b, k, h, d), arr(k, h, d), arr(h, d),
                arr(h, d))
        key_start = jnp.zeros((b,), jnp.int32)
        return args, (key_start,), dict(scale=scale)
    w = min(m, n)
    args = (arr(b, m, h, d), arr(b, w, h, d), arr(b, w, h, d), arr(m, h, d), arr(h, d), arr(h, d))
    cache = arr(b, m, h, d)
    cache_lse = jnp.asarray(rng.normal(size=(b, m, h)) + 2.0, sdt)
    mem_valid = jnp.full((b,), m, jnp.int32)
    return args, (cache, cache_lse, mem_valid), dict(r_offset=-1, scale=scale)


def _functions(kernel: str, impl: str, extra, kw, interpret: bool, block_sizes):
    if kernel == "rel_attention":
        ref, pal = rel_attention_reference, rel_attention_pallas
    else:
        ref, pal = lookahead_reference, lookahead_pallas
    if impl == "xla":
        call = lambda *a: ref(*a, *extra, **kw)
    else:
        call = lambda *a: pal(*a, *extra, interpret=interpret, block_sizes=block_sizes, **kw)

    def loss(*a):
        out, lse = call(*a)
        return jnp.sum(out.astype(jnp.float32) ** 2) + jnp.sum(lse)

    return call, jax.grad(loss, argnums=tuple(range(6)))


def _time(fn, args, iters: int) -> float:
    jax.block_until_ready(fn(*args))  # warm-up (compiled already)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def bench_one(kernel, impl, cfg, dtype, batch, iters, interpret, block_sizes) -> dict:
    n, m, h, d = cfg
    args, extra, kw = make_inputs(kernel, batch, n, m, h, d, dtype)
    fwd, fwd_bwd = _functions(kernel, impl, extra, kw, interpret, block_sizes)
    row = dict(kernel=kernel, impl=impl + ("_interpret" if impl == "pallas" and interpret else ""),
               N=n, M=m, H=h, Dh=d, batch=batch, dtype=jnp.dtype(dtype).name,
               blocks=_blocks_label(block_sizes, interpret) if impl == "pallas" else None)
    try:
        cf = jax.jit(fwd).lower(*args).compile()
        cb = jax.jit(fwd_bwd).lower(*args).compile()
        row["fwd_ms"] = _time(cf, args, iters)
        row["fwd_bwd_ms"] = _time(cb, args, iters)
        row["fwd_bwd_peak_mb"] = compiled_mb(cb)
        row["device_peak_mb"] = device_peak_mb()
        row["_values"] = jax.tree.leaves((cf(*args), cb(*args)))  # for the error vs the reference
    except Exception as e:  # noqa: BLE001 - one failing config must not hide the others
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return row


def _max_rel_err(got: list, ref: list) -> float:
    """Max over the arrays of max|got - ref| / max(1, max|ref|), in float32."""
    return max(float(jnp.max(jnp.abs(g.astype(jnp.float32) - r.astype(jnp.float32)))
                     / max(1.0, float(jnp.max(jnp.abs(r.astype(jnp.float32))))))
               for g, r in zip(got, ref))


def _blocks_label(bs: Optional[BlockSizes], interpret: bool) -> str:
    """'q,k,bwd,warps' of a block-size set (None: the target's defaults, which the kernels use)."""
    if bs is None:
        bs = BlockSizes.default(resolve_target(None, interpret), interpret)
    return f"{bs.block_q},{bs.block_k},{bs.block_bwd},{bs.num_warps}"


def print_table(rows: list[dict]) -> None:
    cols = ["kernel", "impl", "blocks", "N", "M", "H", "Dh", "batch", "dtype", "fwd_ms", "fwd_bwd_ms",
            "fwd_bwd_peak_mb", "device_peak_mb", "max_rel_err_vs_xla"]
    fmt = lambda v: "-" if v is None else (
        (f"{v:.2e}" if abs(v) < 0.01 else f"{v:.2f}") if isinstance(v, float) else str(v))
    table = [[fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(t[i]) for t in table)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for r, t in zip(rows, table):
        line = "  ".join(v.ljust(w) for v, w in zip(t, widths))
        print(line + (f"  ERROR {r['error']}" if "error" in r else ""))


def main(argv=None) -> int:
    backend = jax.default_backend()
    on_cpu = backend == "cpu"
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default=CPU_CONFIGS if on_cpu else ACCEL_CONFIGS,
                   help="comma-separated NxMxHxDh")
    p.add_argument("--dtypes", default="float32" if on_cpu else "bfloat16,float32")
    p.add_argument("--kernels", default="rel_attention,lookahead")
    p.add_argument("--batch", type=int, default=2 if on_cpu else 8)
    p.add_argument("--iters", type=int, default=3 if on_cpu else 20)
    p.add_argument("--block-sizes", action="append", default=None, metavar="Q,K,BWD[,WARPS]",
                   help="tiles (and Triton warps) of the Pallas kernels (default: per target); "
                        "repeat for a sweep: one Pallas row per set")
    p.add_argument("--json", default=None, help="write the results here (JSON)")
    a = p.parse_args(argv)
    tune_cpu_host()  # before the first computation (lamemo_jax.host)
    configs = [parse_config(c) for c in a.configs.split(",") if c]
    dtypes = [jnp.dtype(x) for x in a.dtypes.split(",") if x]
    kernel_names = [k for k in a.kernels.split(",") if k]
    for k in kernel_names:
        if k not in ("rel_attention", "lookahead"):
            raise SystemExit(f"--kernels: unknown kernel {k!r}")
    try:
        block_sets = [BlockSizes.parse(b) for b in a.block_sizes] if a.block_sizes else [None]
    except ValueError as e:
        p.error(f"--block-sizes: {e}")
    interpret = on_cpu
    if on_cpu:
        print("NOTE: backend is CPU: the Pallas kernels run in interpret mode (an XLA emulation of "
              "the kernel grid). This is a SMOKE TEST of the benchmark and the kernels; the "
              "timings and memory of 'pallas_interpret' say nothing about GPU/TPU performance.")
    print(f"backend={backend} device={jax.devices()[0].device_kind}")
    rows = []
    for kernel in kernel_names:
        for cfg in configs:
            if kernel == "lookahead" and cfg[1] == 0:
                continue  # no memory rows to refresh
            for dt in dtypes:
                ref = bench_one(kernel, "xla", cfg, dt, a.batch, a.iters, interpret, None)
                ref_vals = ref.pop("_values", None)
                rows.append(ref)
                print("  " + json.dumps(ref), flush=True)  # as it goes: a run cut short keeps it
                for bs in block_sets:
                    row = bench_one(kernel, "pallas", cfg, dt, a.batch, a.iters, interpret, bs)
                    pal_vals = row.pop("_values", None)
                    if ref_vals is not None and pal_vals is not None:  # outputs and gradients
                        row["max_rel_err_vs_xla"] = _max_rel_err(pal_vals, ref_vals)
                    rows.append(row)
                    print("  " + json.dumps(row), flush=True)
    print_table(rows)
    result = dict(backend=backend, device=jax.devices()[0].device_kind, interpret=interpret,
                  smoke_test=on_cpu, iters=a.iters, rows=rows)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(result, indent=2))
        print(f"wrote {a.json}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
