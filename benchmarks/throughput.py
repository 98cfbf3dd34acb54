"""Training / evaluation throughput of LaMemo vs Transformer-XL across memory lengths.

    python -m benchmarks.throughput                       # the original-code comparison config
    python -m benchmarks.throughput --mem_lens=64,128 --steps=20 --out=/tmp/tp
    python -m benchmarks.throughput --config=configs/wt103.py --dtype=bfloat16 \
        --attention_impls=pallas,xla --steps=10 --out=runs/tp_wt103      # a paper config (GPU)

With ``--config`` the model (and the default batch and mem_len) come from a configs/*.py file
instead of the flags; ``--memories`` still switches lamemo / xl and ``--dtype`` the compute dtype.

For each (memory, mem_len): the median step time over ``--steps`` training steps after compile
(Adam, dropout 0.1; the variants of one mem_len run their steps in interleaved rounds, so a slow
phase of a shared machine slows them alike and their ratios hold), evaluation tokens/s, model
FLOPs per step (lamemo_jax.flops: the products the method needs; beside them the products the
compiled step runs, ``compiled_matmul_flops_per_step``, summed over the devices and without
those inside Pallas kernels, and the original code's count, ``original_count_flops_per_step``), achieved FLOP/s (and MFU on a known accelerator), the compiled
train step's memory (``train_step_mb``: arguments + outputs + temporaries of that variant's
executable) and, process-wide so far, peak host RSS and peak device memory. Writes
``throughput.json`` and ``throughput.png`` (step time vs mem_len), prints a table, and checks the
targets in one run (ratios only, since these shared machines are noisy):

* LaMemo's step at least 2x faster than the original PyTorch code measured on the project's
  2-core CPU (53 / 91 / 136 / 307 ms at mem_len 64 / 128 / 256 / 512, the issue's timings;
  ``benchmarks.original`` times the original itself, in the same run as ours);
* LaMemo / XL step-time ratio within 10% of the LaMemo / XL FLOP ratio (the method's products;
  the check also records the ratio of the original's arithmetic, which computes the last
  layer's memory rows and its look-ahead's backward that no result uses);
* the look-ahead cost linear in mem_len (LaMemo time per extra memory token roughly constant).
Exit status 1 if a target fails (2 on bad flags).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import kernels
from benchmarks.memory import compiled_mb, device_peak_mb
from lamemo_jax import ModelConfig, init_memory
from lamemo_jax.api import _score_jit
from lamemo_jax import sharding as shard_lib
from lamemo_jax.experiment import MeshConfig, TrainConfig
from lamemo_jax.flops import (compiled_matmul_flops, device_peak_flops, forward_flops,
                               train_step_flops)
from lamemo_jax.host import applied as host_settings, tune_cpu_host
from lamemo_jax.trainer import (init_sharded_train_state, init_train_state, make_optimizer,
                                make_train_step)

ORIGINAL_LAMEMO_MS = {64: 53.0, 128: 91.0, 256: 136.0, 512: 307.0}
ORIGINAL_XL_MS = {64: 31.0, 128: 37.0, 256: 49.0, 512: 70.0}
# the config those timings are for (the flags' defaults); any other one turns the targets off
ORIGINAL_CONFIG = {"batch": 8, "tgt_len": 64, "n_layer": 2, "d_model": 128, "n_head": 4, "d_head": 32,
                   "d_inner": 512, "n_token": 1000, "dtype": "float32"}


@functools.lru_cache(maxsize=None)
def load_config_file(path: str):
    """The ExperimentConfig of a configs/*.py file (its get_config()); read once per path."""
    import importlib.util
    from lamemo_jax.experiment import ExperimentConfig
    spec = importlib.util.spec_from_file_location("_bench_config", path)
    if spec is None or not os.path.isfile(path):
        raise SystemExit(f"--config: no such config file {path!r}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return ExperimentConfig.from_config_dict(mod.get_config())


def parse_overrides(items) -> dict:
    """--set FIELD=VALUE items -> {field: value} (VALUE parsed as a Python literal when it is one)."""
    import ast
    out = {}
    for item in items:
        key, sep, val = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set {item!r}: expected FIELD=VALUE")
        try:
            out[key] = ast.literal_eval(val)
        except (ValueError, SyntaxError):
            out[key] = val
    return out


def base_config(args, memory: str, mem_len: int, impl: str = "auto") -> ModelConfig:
    return _base_config(args, memory, mem_len, impl).replace(**parse_overrides(args.set))


def _base_config(args, memory: str, mem_len: int, impl: str) -> ModelConfig:
    if args.config:
        return load_config_file(args.config).model.replace(
            memory=memory, mem_len=mem_len, dtype=args.dtype, attention_impl=impl)
    return ModelConfig(n_token=args.n_token, n_layer=args.n_layer, d_model=args.d_model, n_head=args.n_head,
                       d_head=args.d_head, d_inner=args.d_inner, tgt_len=args.tgt_len, mem_len=mem_len,
                       dropout=0.1, dropatt=0.0, memory=memory, dtype=args.dtype,
                       attention_impl=impl)


def data_parallel_mesh():
    """The trainer's default mesh (data parallel) over every local device: with
    JAX_NUM_CPU_DEVICES=2 the batch rows run on the two cores as two CPU devices."""
    return shard_lib.make_mesh(MeshConfig(), jax.local_devices())


class TrainTimer:
    """One variant's jitted train step, compiled and with its memory filled, timed one step at a time.

    ``mesh``: jit the step sharded over it as the trainer does (None: one device).
    ``compiler_options``: XLA options for this step's compile alone (``{"xla_gpu_...": value}``,
    as ``jax.stages.Lowered.compile`` takes them), so variants of one process can differ in them."""

    def __init__(self, cfg: ModelConfig, batch: int, mesh=None, compiler_options: dict | None = None):
        tc = TrainConfig(batch_size=batch, learning_rate=2.5e-4, clip=0.25, num_steps=10**6)
        opt = make_optimizer(tc)
        rng = np.random.default_rng(0)
        self.x = jnp.asarray(rng.integers(0, cfg.n_token, (batch, cfg.tgt_len)), jnp.int32)
        self.sos = jnp.zeros((batch,), bool)
        if mesh is None:
            self.state = init_train_state(cfg, tc, opt, batch)
            jitted = jax.jit(make_train_step(cfg, tc, opt), donate_argnums=(0,))
        else:
            self.state, state_sh = init_sharded_train_state(cfg, tc, opt, batch, mesh)
            rows_sh = shard_lib.batch_sharding(mesh, self.x.shape)
            sos_sh = shard_lib.batch_sharding(mesh, self.sos.shape)
            self.x, self.sos = jax.device_put(self.x, rows_sh), jax.device_put(self.sos, sos_sh)
            jitted = jax.jit(make_train_step(cfg, tc, opt, mesh), donate_argnums=(0,),
                             in_shardings=(state_sh, rows_sh, rows_sh, sos_sh),
                             out_shardings=(state_sh, shard_lib.replicated(mesh)))
        compiled = jitted.lower(self.state, self.x, self.x, self.sos).compile(compiler_options or None)
        self.step_mb = compiled_mb(compiled)  # this variant's executable, whatever else is alive
        self.step = compiled
        self.times = []
        for _ in range(cfg.mem_len // cfg.tgt_len + 1):  # fill the memory
            self.state, m = self.step(self.state, self.x, self.x, self.sos)
        jax.block_until_ready(m)

    def time_one(self) -> None:
        t = time.perf_counter()
        self.state, m = self.step(self.state, self.x, self.x, self.sos)
        jax.block_until_ready(m)
        self.times.append(time.perf_counter() - t)

    def summary(self):
        """(median, 10th, 90th percentile) seconds per step."""
        return (float(np.median(self.times)), float(np.percentile(self.times, 10)),
                float(np.percentile(self.times, 90)))


def time_interleaved(cfgs, batch: int, steps: int, mesh=None, setups=None, compiler_options=None):
    """Times the variants' steps in interleaved rounds, alternating the order (A B C, C B A, ...):
    a slow phase of a shared machine then hits every variant alike, so their ratios hold, and no
    variant always follows the same neighbour. Returns one entry per variant: its TrainTimer, or
    the exception that stopped it from compiling or filling its memory. ``setups``: one context
    manager factory per variant (or None), entered while that variant's step is traced;
    ``compiler_options``: one dict of XLA options per variant (or None), for its compile."""
    timers = []
    for i, c in enumerate(cfgs):
        setup = setups[i] if setups and setups[i] else contextlib.nullcontext
        options = compiler_options[i] if compiler_options else None
        try:
            with setup():
                timers.append(TrainTimer(c, batch, mesh, compiler_options=options))
        except Exception as e:  # noqa: BLE001 - one failing variant must not hide the others
            timers.append(e)
    run_rounds([t for t in timers if isinstance(t, TrainTimer)], steps)
    return timers


def run_rounds(timers, steps: int) -> None:
    """``steps`` rounds of one ``time_one()`` per timer, the order alternating (A B C, C B A, ...)."""
    for r in range(steps):
        for t in (timers if r % 2 == 0 else timers[::-1]):
            t.time_one()


def time_eval(cfg: ModelConfig, batch: int, segments: int = 8):
    from lamemo_jax.api import init_params
    params = init_params(cfg, jax.random.key(0))
    x = np.random.default_rng(1).integers(0, cfg.n_token, (batch, segments, cfg.tgt_len)).astype(np.int32)
    mem = init_memory(cfg, batch)
    nll, mem = _score_jit(cfg, params, x, x, mem)
    jax.block_until_ready(nll)
    t = time.perf_counter()
    nll, mem = _score_jit(cfg, params, x, x, mem)
    jax.block_until_ready(nll)
    return batch * segments * cfg.tgt_len / (time.perf_counter() - t)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="a configs/*.py file: take the model from it")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a ModelConfig field (repeatable), e.g. --set dropout=0.0")
    p.add_argument("--attention_impls", default="auto",
                   help="comma-separated ModelConfig.attention_impl values to compare")
    p.add_argument("--mem_lens", default=None, help="default 64,128,256,512 (the config's with --config)")
    p.add_argument("--memories", default="lamemo,xl")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=None, help="default 8 (the config's with --config)")
    p.add_argument("--tgt_len", type=int, default=64)
    p.add_argument("--n_layer", type=int, default=2)
    p.add_argument("--d_model", type=int, default=128)
    p.add_argument("--n_head", type=int, default=4)
    p.add_argument("--d_head", type=int, default=32)
    p.add_argument("--d_inner", type=int, default=512)
    p.add_argument("--n_token", type=int, default=1000)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--no_targets", action="store_true", help="only measure (other configs)")
    p.add_argument("--no_eval", action="store_true", help="skip the evaluation throughput")
    p.add_argument("--data_parallel", action="store_true",
                   help="shard the train step's batch over every local device, as the trainer does "
                        "(on a CPU host: JAX_NUM_CPU_DEVICES=<cores> makes each core a device)")
    args = p.parse_args(argv)
    tune_cpu_host()  # before the first computation (lamemo_jax.host)
    if args.config:
        exp = load_config_file(args.config)
        args.mem_lens = args.mem_lens or str(exp.model.mem_len)
        args.batch = args.batch or exp.train.batch_size
        args.tgt_len, args.n_layer, args.d_model = exp.model.tgt_len, exp.model.n_layer, exp.model.d_model
        args.n_head, args.d_head, args.d_inner = exp.model.n_head, exp.model.d_head, exp.model.d_inner
        args.n_token = exp.model.n_token
        args.no_targets = True  # the targets are for the original-code comparison config
    args.mem_lens = args.mem_lens or "64,128,256,512"
    args.batch = args.batch or 8
    changed = [f"--{k}={getattr(args, k)}" for k, v in ORIGINAL_CONFIG.items() if getattr(args, k) != v]
    if changed and not args.no_targets:
        print(f"targets off: {' '.join(changed)} is not the original-code comparison config", flush=True)
        args.no_targets = True  # the original's timings are for that config only
    impls = [i for i in args.attention_impls.split(",") if i]
    if args.set:
        args.no_targets = True  # a changed model is not the original-code comparison config
    if len(impls) > 1:
        args.no_targets = True
    mem_lens = [int(m) for m in args.mem_lens.split(",")]
    memories = args.memories.split(",")
    try:  # bad --set / --memories / --dtype values fail here, naming the field, before any timing
        for memory in memories:
            base_config(args, memory, mem_lens[0], impls[0])
    except (TypeError, ValueError) as e:
        p.error(str(e))
    os.makedirs(args.out, exist_ok=True)
    peak = device_peak_flops()
    rows = []
    mesh = data_parallel_mesh() if args.data_parallel else None
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), batch {args.batch}, "
          f"tgt_len {args.tgt_len}, {args.n_layer}L d{args.d_model} {args.n_head}x{args.d_head} "
          f"ff{args.d_inner} vocab {args.n_token}, {args.dtype}"
          + (f", data parallel over {shard_lib.describe(mesh)}" if mesh is not None else "")
          + (f", overrides {parse_overrides(args.set)}" if args.set else ""), flush=True)
    for m in mem_lens:
        variants = [(memory, impl) for memory in memories for impl in impls]
        cfgs = [base_config(args, memory, m, impl) for memory, impl in variants]
        timers = time_interleaved(cfgs, args.batch, args.steps, mesh)
        for (memory, impl), cfg, timer in zip(variants, cfgs, timers):
            head = {"memory": memory, "mem_len": m, "attention_impl": impl,
                    "overrides": parse_overrides(args.set)}
            try:
                if isinstance(timer, Exception):
                    raise timer
                med, p10, p90 = timer.summary()
                eval_tps = None if args.no_eval else time_eval(cfg, args.batch)
            except Exception as e:  # noqa: BLE001 - one failing variant must not hide the others
                rows.append({**head, "error": f"{type(e).__name__}: {str(e)[:400]}"})
                print(f"  {memory:6s} mem_len {m:5d} {impl}: ERROR {rows[-1]['error']}", flush=True)
                continue
            flops = train_step_flops(cfg, args.batch)
            row = {**head, "step_ms": med * 1e3, "step_ms_p10": p10 * 1e3,
                   "step_ms_p90": p90 * 1e3, "train_tokens_per_sec": args.batch * args.tgt_len / med,
                   "eval_tokens_per_sec": eval_tps, "train_flops_per_step": flops,
                   # an SPMD module holds one device's products: times the devices
                   "compiled_matmul_flops_per_step": (compiled_matmul_flops(timer.step.as_text())
                                                      * (mesh.size if mesh is not None else 1)),
                   "original_count_flops_per_step": train_step_flops(cfg, args.batch, as_original=True),
                   "eval_flops_per_token": forward_flops(cfg, 1) / args.tgt_len,
                   "achieved_tflops": flops / med / 1e12,
                   "mfu": (flops / med / peak) if peak else None,
                   "train_step_mb": timer.step_mb,
                   "peak_host_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                   "device_peak_mb": device_peak_mb()}
            rows.append(row)
            mfu = f"  MFU {row['mfu']:.1%}" if row["mfu"] is not None else ""
            ev = f"  eval {eval_tps:8.0f} tok/s" if eval_tps is not None else ""
            rate = (f"{row['achieved_tflops']:.1f} TFLOP/s" if row["achieved_tflops"] >= 1
                    else f"{row['achieved_tflops'] * 1e3:.1f} GFLOP/s")
            print(f"  {memory:6s} mem_len {m:5d} {impl}: {row['step_ms']:8.1f} ms/step "
                  f"(p10 {row['step_ms_p10']:.1f}, p90 {row['step_ms_p90']:.1f})  "
                  f"train {row['train_tokens_per_sec']:8.0f} tok/s{ev}  "
                  f"{flops / 1e9:6.2f} GFLOP/step  {rate}{mfu}", flush=True)

    by = {(r["memory"], r["mem_len"]): r for r in rows if "error" not in r}
    checks = []
    if not args.no_targets and set(memories) >= {"lamemo", "xl"}:
        for m in mem_lens:
            if ("lamemo", m) not in by or ("xl", m) not in by:  # a variant failed (its error row says why)
                checks.append({"check": f"targets @ {m}", "error": "a variant has no timing", "ok": False})
                continue
            la, xl = by[("lamemo", m)], by[("xl", m)]
            t_ratio = la["step_ms"] / xl["step_ms"]
            f_ratio = la["train_flops_per_step"] / xl["train_flops_per_step"]
            checks.append({"check": f"lamemo/xl time ratio within 10% of flop ratio @ {m}",
                           "time_ratio": t_ratio, "flop_ratio": f_ratio,
                           "flop_ratio_original_count": (la["original_count_flops_per_step"]
                                                         / xl["original_count_flops_per_step"]),
                           "ok": bool(abs(t_ratio / f_ratio - 1) <= 0.10)})
            if m in ORIGINAL_LAMEMO_MS:
                checks.append({"check": f"lamemo >= 2x faster than the original @ {m}",
                               "ours_ms": la["step_ms"], "original_ms": ORIGINAL_LAMEMO_MS[m],
                               "speedup": ORIGINAL_LAMEMO_MS[m] / la["step_ms"],
                               "ok": bool(ORIGINAL_LAMEMO_MS[m] / la["step_ms"] >= 2.0)})
        if len(mem_lens) >= 3 and all((mem, m) in by for mem in ("lamemo", "xl") for m in mem_lens):
            xs = np.array(mem_lens, float)
            ys = np.array([by[("lamemo", m)]["step_ms"] - by[("xl", m)]["step_ms"] for m in mem_lens])
            coef = np.polyfit(xs, ys, 2)
            lin = np.polyfit(xs, ys, 1)
            resid = np.abs(np.polyval(lin, xs) - ys).max() / max(abs(ys).max(), 1e-9)
            checks.append({"check": "look-ahead overhead (lamemo - xl time) linear in mem_len",
                           "max_rel_residual_of_linear_fit": float(resid), "quadratic_coef": float(coef[0]),
                           "ok": bool(resid <= 0.15)})
    for c in checks:
        print(("PASS " if c["ok"] else "FAIL ") + json.dumps(c), flush=True)
    out = {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(), "args": vars(args),
           "host_tuning": host_settings(), "reference_forms": kernels.reference_forms(),
           "rows": rows, "checks": checks,
           "original_pytorch_ms": {"lamemo": ORIGINAL_LAMEMO_MS, "xl": ORIGINAL_XL_MS}}
    with open(os.path.join(args.out, "throughput.json"), "w") as f:
        json.dump(out, f, indent=2)
    from lamemo_jax.metrics import plot_xy
    ok_rows = [r for r in rows if "error" not in r]
    series = {}
    for mem in memories:
        for impl in impls:
            sel = [r for r in ok_rows if r["memory"] == mem and r["attention_impl"] == impl]
            series[mem if len(impls) == 1 else f"{mem} ({impl})"] = (
                [r["mem_len"] for r in sel], [r["step_ms"] for r in sel])
    if not args.no_targets:
        for mem, ref in (("lamemo", ORIGINAL_LAMEMO_MS), ("xl", ORIGINAL_XL_MS)):
            ks = [m for m in mem_lens if m in ref]
            if ks and mem in memories:
                series[f"{mem} (original PyTorch)"] = (ks, [ref[m] for m in ks])
    plot_xy(series, os.path.join(args.out, "throughput.png"), "mem_len", "train step (ms)",
            title=f"step time vs memory length ({jax.devices()[0].device_kind})", logx=True)
    print(f"wrote {args.out}/throughput.json and throughput.png", flush=True)
    return 0 if all(c["ok"] for c in checks) and not any("error" in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
