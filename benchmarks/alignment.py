"""Do a model's layer matmuls lose time to unaligned sizes? Forward + backward of each matmul of
one layer, at its own sizes and zero-padded (inside the jitted function, as a model would do it)
to aligned ones.

    python -m benchmarks.alignment --config=configs/wt103.py        # on a GPU
    python -m benchmarks.alignment --config=configs/tiny.py --iters=2   # a CPU smoke test

The matmuls of one LaMemo layer at the config's batch, tgt_len and mem_len (rows R = batch x
(mem_len + tgt_len), all recomputed by LaMemo): q/k/v [R, d] x [d, 3 H Dh], o_net [R, H Dh] x
[H Dh, d], the FFN's [R, d] x [d, F] and [R, F] x [F, d], and the attention scores
[B H, N, Dh] x [B H, Dh, K]. Each is timed as value-and-gradient (w.r.t. both operands) of
sum(out * c) in --dtype with float32 accumulation, unpadded and with every size rounded up to a
multiple of --multiple. Times come from a jax.profiler trace of --iters calls: the matmul kernels,
all kernels, and the wall time per call. Prints them and the matmul kernels' TFLOP/s for both
(the padded FLOPs counted at the unpadded sizes, i.e. useful work), and one layer's matmul time
each way.

A first version timed each call with a host clock (2026-11-26, H200; docs/benchmarks/
h200_alignment_host_clock_{8,64}.json): that time also holds the elementwise sum, the launches and
the synchronisation, which the trace now separates (first run on an H100, 2026-11-26:
docs/benchmarks/h100_alignment.json).
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.profile_step import trace_calls
from benchmarks.throughput import load_config_file
from lamemo_jax.embedding import pad_to_multiple
from lamemo_jax.host import tune_cpu_host


def layer_matmuls(cfg, batch: int) -> dict:
    """name -> (batch dims, M, K, N) of one LaMemo layer's matmuls."""
    r = batch * (cfg.mem_len + cfg.tgt_len)
    d, hd, f = cfg.d_model, cfg.n_head * cfg.d_head, cfg.d_inner
    return {"qkv": ((), r, d, 3 * hd), "o_net": ((), r, hd, d), "ff1": ((), r, d, f), "ff2": ((), r, f, d),
            "scores": ((batch * cfg.n_head,), cfg.tgt_len, cfg.d_head, cfg.mem_len + cfg.tgt_len)}


def _step(bdims, m, k, n, mult, dtype):
    def f(a, b, c):
        a = pad_to_multiple(pad_to_multiple(a, -2, mult), -1, mult)
        b = pad_to_multiple(pad_to_multiple(b, -2, mult), -1, mult)
        out = jnp.matmul(a, b, preferred_element_type=jnp.float32)[..., :m, :n]
        return jnp.sum(out.astype(dtype) * c)

    return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))


def time_one(fn, args, iters: int) -> dict:
    """Per call: the device's matmul kernels and all its kernels (from a jax.profiler trace; a
    host clock around each call also times the elementwise sum, the launches and the
    synchronisation), and the wall time. On a CPU the trace has no device
    kernels: the wall time stands in for both."""
    jax.block_until_ready(fn(*args))
    prof = trace_calls(lambda: fn(*args), iters)
    wall = prof["traced_wall_ms_per_step"]
    if not prof.get("device_kernels"):
        return {"matmul_ms": wall, "kernels_ms": wall, "wall_ms": wall}
    return {"matmul_ms": prof["by_kind_ms_per_step"].get("matmul", 0.0),
            "kernels_ms": prof["kernel_ms_per_step"], "wall_ms": wall}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--batch", type=int, default=None, help="default: the config's")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--multiple", type=int, default=64)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    tune_cpu_host()  # before the first computation (lamemo_jax.host)
    exp = load_config_file(args.config)
    batch = args.batch or exp.train.batch_size
    dt = jnp.dtype(args.dtype)
    rng = np.random.default_rng(0)
    print(f"device: {jax.devices()[0].device_kind}; {args.config}, batch {batch}, {args.dtype}, "
          f"padded to multiples of {args.multiple}", flush=True)
    rows, total = [], {"unpadded": 0.0, "padded": 0.0}
    for name, (bdims, m, k, n) in layer_matmuls(exp.model, batch).items():
        a = jnp.asarray(rng.standard_normal(bdims + (m, k)), dt)
        b = jnp.asarray(rng.standard_normal(bdims + (k, n)) * k ** -0.5, dt)
        c = jnp.asarray(rng.standard_normal(bdims + (m, n)), dt)
        flops = 3 * 2 * m * k * n * int(np.prod(bdims))
        row = {"matmul": name, "shape": [*bdims, m, k, n], "flops": flops}
        for label, mult in (("unpadded", 1), ("padded", args.multiple)):
            t = time_one(_step(bdims, m, k, n, mult, dt), (a, b, c), args.iters)
            row.update({f"{label}_{key}": v for key, v in t.items()})
            row[f"{label}_tflops"] = flops / t["matmul_ms"] / 1e9
            total[label] += t["matmul_ms"]
        rows.append(row)
        print(f"  {name:7s} {str(tuple(row['shape'])):28s} matmul kernels: unpadded {row['unpadded_matmul_ms']:8.3f} ms "
              f"({row['unpadded_tflops']:6.1f} TFLOP/s)  padded {row['padded_matmul_ms']:8.3f} ms "
              f"({row['padded_tflops']:6.1f} TFLOP/s); all kernels {row['unpadded_kernels_ms']:.3f} / "
              f"{row['padded_kernels_ms']:.3f} ms, wall {row['unpadded_wall_ms']:.3f} / {row['padded_wall_ms']:.3f} ms",
              flush=True)
    print(f"one layer's matmul kernels (fwd+bwd): unpadded {total['unpadded']:.2f} ms, padded "
          f"{total['padded']:.2f} ms", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": jax.devices()[0].device_kind, "args": vars(args), "rows": rows,
                       "layer_ms": total}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
