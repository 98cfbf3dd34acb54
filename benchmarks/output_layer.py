"""The training loss's output layer alone (full softmax): forward + backward time of its variants.

    python -m benchmarks.output_layer                         # the wt103 shape: 9600 x 410 x 267,735, bf16
    python -m benchmarks.output_layer --tokens=512 --vocab=5000 --iters=3    # a quick CPU check

Variants (value and gradient of sum(nll) w.r.t. x, w, b; x and w in --dtype, b float32):
  autodiff     logsumexp(x w^T + b) - logit[target] differentiated by JAX (the path before the
               custom_vjp: its backward matmuls run in float32 against the float32 d(logits))
  fused        embedding.softmax_cross_entropy (what the model runs), no padding: with a bf16 / fp16
               --dtype its custom_vjp (backward matmuls in --dtype); with float32, plain autodiff
  fused_padv   ... with the vocabulary padded to a multiple of 128
  fused_padvd  ... and d padded to a multiple of 8 (the accelerator default)
  chunk        ... padded, over chunks of --chunk tokens (ModelConfig.softmax_chunk)
Measured on an H200 (docs/benchmarks.md): 69.8 / 52.8 / 35.1 / 22.0 / 28.1 ms.
Prints median ms per variant and its error against ``autodiff`` (max |difference| of the loss and
gradients over max(1, max |autodiff|)); writes --json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from lamemo_jax import embedding
from lamemo_jax.host import tune_cpu_host


def _loss_fns(chunk: int):
    def autodiff(x, w, b, t):
        return jnp.sum(embedding._nll_from_logits(embedding._logits(x, w, b), t))

    def fused(pad, c=0):
        def f(x, w, b, t):
            old = embedding.PAD_MULTIPLES
            embedding.PAD_MULTIPLES = pad  # read at trace time
            try:
                return jnp.sum(embedding.softmax_cross_entropy(x, w, b, t, c))
            finally:
                embedding.PAD_MULTIPLES = old
        return f

    return {"autodiff": autodiff, "fused": fused((1, 1)), "fused_padv": fused((128, 1)),
            "fused_padvd": fused((128, 8)), "chunk": fused((128, 8), chunk)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=9600)
    p.add_argument("--d", type=int, default=410)
    p.add_argument("--vocab", type=int, default=267735)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--chunk", type=int, default=2048)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--variants", default="autodiff,fused,fused_padv,fused_padvd,chunk")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    tune_cpu_host()  # before the first computation (lamemo_jax.host)
    fns = _loss_fns(args.chunk)
    names = [v for v in args.variants.split(",") if v]
    bad = [v for v in names if v not in fns]
    if bad:
        p.error(f"--variants: unknown {bad}; choose from {sorted(fns)}")
    rng = np.random.default_rng(0)
    dt = jnp.dtype(args.dtype)
    x = jnp.asarray(rng.standard_normal((args.tokens, args.d)), dt)
    w = jnp.asarray(rng.standard_normal((args.vocab, args.d)) * 0.05, dt)
    b = jnp.asarray(rng.standard_normal(args.vocab) * 0.1, jnp.float32)
    t = jnp.asarray(rng.integers(0, args.vocab, args.tokens), jnp.int32)
    print(f"device: {jax.devices()[0].device_kind}; tokens {args.tokens}, d {args.d}, vocab {args.vocab}, "
          f"{args.dtype}", flush=True)
    flops = 3 * 2 * args.tokens * args.d * args.vocab
    rows, ref = [], None
    for name in names:
        step = jax.jit(jax.value_and_grad(fns[name], argnums=(0, 1, 2)))
        t0 = time.perf_counter()
        out = jax.block_until_ready(step(x, w, b, t))
        compile_s = time.perf_counter() - t0
        times = []
        for _ in range(args.iters):
            t0 = time.perf_counter()
            jax.block_until_ready(step(x, w, b, t))
            times.append(time.perf_counter() - t0)
        leaves = [np.asarray(a, np.float64) for a in jax.tree.leaves(out)]
        if ref is None:
            ref = leaves
        err = max(float(np.max(np.abs(a - r))) / max(1.0, float(np.max(np.abs(r))))
                  for a, r in zip(leaves, ref))
        ms = float(np.median(times)) * 1e3
        rows.append({"variant": name, "ms": ms, "compile_s": compile_s, "tflops": flops / ms / 1e9,
                     "error_vs_first": err})
        print(f"  {name:12s} {ms:9.2f} ms  {flops / ms / 1e9:7.1f} TFLOP/s  error vs {names[0]} {err:.1e}"
              f"  (compile {compile_s:.1f} s)", flush=True)
        del out
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": jax.devices()[0].device_kind, "args": vars(args), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
