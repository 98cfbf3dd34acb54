"""Where a training step's device time goes: times variants of one config, then traces a few steps
of each with the JAX profiler and sums the device kernels by XLA op and by kind.

    python -m benchmarks.profile_step --config=configs/wt103.py --dtype=bfloat16 \
        --variant plain: --variant chunk:softmax_chunk=2048 --variant xl:memory=xl --out=runs/prof

Each ``--variant NAME:FIELD=VALUE,...`` is the config's model with those ModelConfig fields
changed (``NAME:`` alone: unchanged). Four pseudo-fields force a form of the XLA path while that
variant is traced: ``batched_positions=True|False`` the attention references' position product
batched or shared (``kernels.BATCHED_POSITIONS``), ``one_pass_softmax=True|False`` the one-pass
log-sum-exp and softmax backward or the plain two-pass autodiff (``kernels.ONE_PASS_SOFTMAX``),
``narrow_band=True|False`` the look-ahead's position band in 16-row or W-row blocks
(``kernels.NARROW_BAND``), ``flat_rows=True|False`` the layers' dense products as 2-D products
over the flattened rows or batched (``kernels.FLAT_ROWS``). A field named ``xla_...`` is an XLA
option for that variant's compile alone (``xla_gpu_enable_triton_gemm=False``: the step's
matrix-product fusions go to cuBLAS instead of Triton), so compiler settings are compared in one
process too; an option this XLA does not know fails that variant, not the run. (Values cannot
hold a comma: it separates the fields.)
For each variant: compile, fill the memory, time ``--steps`` steps (interleaved with the other
variants, as benchmarks.throughput does), then trace ``--trace_steps`` steps. From the trace (``*.trace.json.gz`` of ``jax.profiler``) it
reports, per step: the device's busy time (the union of its kernels' intervals) against the
step's wall time (the gap is launch / host overhead), the time by kind of kernel (matrix
products, fusions, copies, collectives, custom calls such as Pallas/Triton), and the XLA ops
that take the most time. Writes ``profile.json`` (and, for each ``--keep NAME``, that variant's
trace and its compiled HLO, where the ops' names are defined). The ops' time is also summed by
model region (look-ahead, current-row attention, FFN, projections, output layer, optimizer...),
from the name scopes in the compiled HLO's metadata.

On a CPU (XLA:CPU has no device kernels) the same summary comes from the runtime's host events
that are the executable's ops; without ``--config`` it profiles benchmarks.throughput's CPU
config (the original code's, mem_len 64 unless a variant sets it):

    python -m benchmarks.profile_step --variant lamemo: --variant xl:memory=xl --steps=15
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import glob
import gzip
import json
import os
import re
import shutil
import sys
import tempfile
import time

from typing import NamedTuple

import jax
import numpy as np

import kernels
from benchmarks.throughput import (ORIGINAL_CONFIG, TrainTimer, base_config, load_config_file,
                                   parse_overrides, time_interleaved)
from lamemo_jax.flops import device_peak_flops, train_step_flops
from lamemo_jax.host import applied as host_settings, tune_cpu_host

# kernel-name fragments -> kind (first match wins; names are lower-cased)
KINDS = (
    ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "wgmma", "matmul", "dot")),
    ("copy", ("memcpy", "memset", "copy")),
    ("collective", ("nccl", "all_reduce", "all-reduce", "allreduce", "all_gather", "reduce_scatter")),
    ("pallas/triton", ("triton", "pallas", "mosaic", "rel_attention", "lookahead")),  # ours: kernels/
    ("fusion", ("fusion", "reduce", "loop_", "input_", "convert", "transpose", "scatter", "gather",
                "select", "slice", "concatenate", "pad", "rng", "broadcast", "add", "multiply")),
)


def kernel_kind(name: str) -> str:
    low = name.lower()
    for kind, frags in KINDS:
        if any(f in low for f in frags):
            return kind
    return "other"


def busy_time(intervals) -> float:
    """Length of the union of [start, end) intervals."""
    total, end = 0.0, -np.inf
    for s, e in sorted(intervals):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total


# model regions by the op's name scope (op_name metadata; first match wins). The attention
# dispatchers in kernels/ open the "rel_attention" and "lookahead" scopes.
REGIONS = (
    ("look-ahead (memory rows)", ("/lookahead/",)),
    ("attention (current rows)", ("/rel_attention/",)),
    ("FFN", ("/pos_ff/",)),
    ("o_net + LayerNorm", ("/o_net/", "/attn_norm/")),
    ("q/k/v projections", ("/q_net/", "/kv_net/", "/qkv_net/")),
    ("position vectors (r_net)", ("/r_net/",)),
    ("output layer + loss", ("/crit.",)),
    ("embedding", ("/word_emb/",)),
)


def op_region(op_name: str) -> str:
    """The model region of an XLA op, from its op_name metadata."""
    for region, frags in REGIONS:
        if any(f in op_name for f in frags):
            return region
    if "TransformerLM" in op_name:
        return "model, other (concat, dropout, memory)"
    return "optimizer, gradient norm, step" if op_name else "unattributed"


class HloOp(NamedTuple):
    opcode: str
    op_name: str  # the op_name metadata ('' when none)
    has_dot: bool  # a fusion whose fused computation contains a dot
    computation: str = ""  # the computation that holds the instruction
    position: int = -1  # its index in that computation (the schedule order of a compiled module)
    target: str = ""  # a custom-call's custom_call_target ('__cublas$lt$matmul', ...)


# custom-call targets whose kernels are a library's (cuBLAS), named after the library
LIBRARY_TARGETS = ("cublas",)


# ops that only hold other ops (the XLA:CPU runtime traces the ops inside them too)
CONTAINER_OPCODES = ("while", "conditional", "call")


def _skip_shape(rhs: str) -> str:
    """What follows the result shape of an instruction's right-hand side ('f32[8]{0} add(...)'
    or a tuple shape '(f32[], /*index=5*/u32[]) while(...)')."""
    if not rhs.startswith("("):
        return rhs.partition(" ")[2]
    depth = 0
    for i, c in enumerate(rhs):
        depth += (c == "(") - (c == ")")
        if depth == 0:
            return rhs[i + 1:].lstrip()
    return ""


def hlo_ops(hlo_text: str) -> dict:
    """Instruction name -> ``HloOp`` of a compiled HLO module's text (names are unique in a
    module, fused computations' parameters included)."""
    dot_comps, comp, position = set(), None, 0
    ops = {}
    for line in hlo_text.splitlines():
        head = re.match(r'^(?:ENTRY )?%?([\w.\-]+) \(', line)
        if head:  # a computation's header line
            comp, position = head.group(1), 0
            continue
        m = re.match(r'^\s*(?:ROOT )?%?([\w.\-]+) = (.*)$', line)
        if not m:
            continue
        rest = _skip_shape(m.group(2))
        op = re.match(r'([\w\-]+)\(', rest)
        if not op:
            continue
        if op.group(1) == "dot":
            dot_comps.add(comp)
        meta = re.search(r'op_name="([^"]*)"', rest)
        calls = re.search(r'calls=%?([\w.\-]+)', rest)
        target = re.search(r'custom_call_target="([^"]*)"', rest)
        ops.setdefault(m.group(1), (op.group(1), meta.group(1) if meta else "",
                                    calls.group(1) if calls else None, comp, position,
                                    target.group(1) if target else ""))
        position += 1
    return {name: HloOp(opcode, op_name, calls in dot_comps, comp, pos, target)
            for name, (opcode, op_name, calls, comp, pos, target) in ops.items()}


def _library_calls(ops: dict) -> list:
    """The module's library custom-calls (``LIBRARY_TARGETS``) in schedule order, when they are
    all in one computation (else none: calls in a loop body have no single order to pair by)."""
    calls = [(op.position, name, op.computation) for name, op in ops.items()
             if op.opcode == "custom-call" and any(t in op.target.lower() for t in LIBRARY_TARGETS)]
    if len({comp for _, _, comp in calls}) != 1:
        return []
    return [name for _, name, _ in sorted(calls)]


def _host_op_kind(name: str, op: HloOp) -> str:
    """Kind of an XLA:CPU op: its matrix products run as dots or as fusions of a dot."""
    if op.opcode == "dot" or op.has_dot:
        return "matmul"
    return kernel_kind(name)


def _kernel_op(name: str, ops: dict) -> str:
    """The HLO op of a GPU kernel inside a command buffer (a CUDA graph), from the kernel's
    name: XLA names a fusion's kernel after it with '_' for '.' (input_reduce_fusion_32 ->
    input_reduce_fusion.32); library kernels (cuBLAS) have no op of their name (see
    ``summarize_trace``)."""
    if name in ops:
        return name
    dotted = re.sub(r"_(\d+)$", r".\1", name)
    return dotted if dotted in ops else name


def _pair_library_kernels(kernels: list, kernel_ops: list, ops: dict, n_steps: int) -> dict:
    """{index in ``kernels``: library custom-call} for the device kernels no op was found for
    that are matrix products (cuBLAS's): the i-th of them in time order is the i-th library call
    of the compiled schedule, step after step. Empty (nothing paired) unless all library calls
    are in one computation, there is one such kernel per call and step, and every step runs the
    same kernel for the same call (an extra kernel in one step and a missing one in another
    would otherwise shift the pairing silently)."""
    calls = _library_calls(ops)
    library = [i for i, (e, op) in enumerate(zip(kernels, kernel_ops))
               if op not in ops and kernel_kind(e["name"]) == "matmul"]
    if not calls or len(library) != n_steps * len(calls):
        return {}
    names = [kernels[i]["name"] for i in library]
    if any(names[j] != names[j % len(calls)] for j in range(len(names))):
        return {}
    return {i: calls[j % len(calls)] for j, i in enumerate(library)}


def _event_op(e: dict, ops: dict) -> str:
    """The HLO op of a device kernel's trace event (its name when none is known)."""
    op = (e.get("args", {}) or {}).get("hlo_op") or e["name"]
    if op.startswith("command_buffer"):  # a CUDA graph of many ops: its kernels by name instead
        op = _kernel_op(e["name"], ops)
    return op


def summarize_trace(trace: dict, n_steps: int, top: int = 25, hlo_text: str | None = None) -> dict:
    """Device-kernel time of a Chrome-format trace (``jax.profiler`` output), per step.

    Device kernels are the complete ("X") events on a process named ``/device:...`` whose thread
    is a stream (not the derived "XLA Ops" / "XLA Modules" / "Steps" lines). With ``hlo_text``
    (the traced executable's compiled HLO) the time is also summed by model region
    (``op_region``), and a trace without device kernels (XLA:CPU) is summarized from its host
    events that are the module's ops (the CPU runtime's thunks, named by HLO instruction). On a
    CPU independent ops run concurrently on the cores, so there the summed op time exceeds the
    busy time (the union of the ops' intervals).

    Inside a command buffer (a CUDA graph) a kernel carries the buffer's name, not its op's:
    a fusion's kernel is found by its name (``_kernel_op``), which XLA shares between identical
    fusions (the same fusion of every layer runs one kernel, named after the first: the time of
    all counts to that op and its model region). A library kernel (cuBLAS's ``nvjet_...``) has
    no op's name at all: the library kernels (in time order) are paired with the cuBLAS calls in
    the compiled module's schedule order, step after step, when that pairing is unambiguous
    (``_pair_library_kernels``); otherwise they stay unattributed. A paired kernel's time counts
    to its own call's model region, and in ``top_ops`` (like a shared fusion kernel) to the first
    call that ran the same kernel. (Checked on a kept H100 trace: the three largest cuBLAS
    kernels pair with the output layer's three products.)"""
    events = trace.get("traceEvents", [])
    pnames, tnames = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            pnames[e["pid"]] = e.get("args", {}).get("name", "")
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            tnames[(e["pid"], e.get("tid"))] = e.get("args", {}).get("name", "")
    # the first device only (a multi-device trace would otherwise sum its devices' kernels)
    devices = sorted((n, p) for p, n in pnames.items() if n.startswith("/device:"))
    dev_pids = {devices[0][1]} if devices else set()
    ops = hlo_ops(hlo_text) if hlo_text else {}
    kernels, source = [], "device"
    for e in events:
        if e.get("ph") != "X" or e.get("pid") not in dev_pids:
            continue
        tname = tnames.get((e["pid"], e.get("tid")), "")
        if tname.startswith(("XLA Ops", "XLA Modules", "Steps", "TensorFlow", "Framework", "Source")):
            continue
        kernels.append(e)
    if not kernels and ops:
        source = "host ops (XLA:CPU)"
        kernels = [e for e in events if e.get("ph") == "X" and "dur" in e and e.get("name") in ops
                   and ops[e["name"]].opcode not in CONTAINER_OPCODES]
    if not kernels:
        return {"device_kernels": 0}
    per_step = 1e-3 / n_steps  # trace times are microseconds -> ms per step
    by_kind = collections.Counter()
    by_op = collections.Counter()
    by_region = collections.Counter()
    by_region_bwd = collections.Counter()
    op_kernel = {}
    op_count = collections.Counter()
    kernels.sort(key=lambda e: e["ts"])
    kernel_ops = [_event_op(e, ops) for e in kernels]
    top_keys = list(kernel_ops)  # what top_ops groups by (a paired cuBLAS kernel: see below)
    if source == "device" and ops:
        pairs = _pair_library_kernels(kernels, kernel_ops, ops, n_steps)
        first_call = {}  # like a shared fusion kernel, a cuBLAS kernel counts to its first op
        for i, call in pairs.items():  # in time order
            kernel_ops[i] = call
            top_keys[i] = first_call.setdefault(kernels[i]["name"], call)
    for e, op, key in zip(kernels, kernel_ops, top_keys):
        hlo_op = ops.get(op, HloOp("", "", False))
        op_name = hlo_op.op_name
        if source == "device":
            by_kind[kernel_kind(e["name"])] += e["dur"]
        else:
            by_kind[_host_op_kind(e["name"], hlo_op)] += e["dur"]
        by_op[key] += e["dur"]
        op_count[key] += 1
        op_kernel.setdefault(key, e["name"][:120] if source == "device" else op_name[-120:])
        if ops:
            region = op_region(op_name)
            by_region[region] += e["dur"]
            if "transpose(jvp(" in op_name:
                by_region_bwd[region] += e["dur"]
    busy = busy_time((e["ts"], e["ts"] + e["dur"]) for e in kernels)
    span = max(e["ts"] + e["dur"] for e in kernels) - min(e["ts"] for e in kernels)
    total = sum(by_kind.values())
    out = {
        "source": source,
        "device_kernels": len(kernels),
        "kernels_per_step": len(kernels) / n_steps,
        "kernel_ms_per_step": total * per_step,
        "busy_ms_per_step": busy * per_step,
        "span_ms_per_step": span * per_step,
        "by_kind_ms_per_step": {k: v * per_step for k, v in by_kind.most_common()},
        "top_ops": [{"op": op, "ms_per_step": t * per_step, "share": t / total,
                     "launches_per_step": op_count[op] / n_steps, "kernel": op_kernel[op]}
                    for op, t in by_op.most_common(top)],
    }
    if ops:
        out["by_region"] = [{"region": r, "ms_per_step": t * per_step, "share": t / total,
                             "backward_ms_per_step": by_region_bwd[r] * per_step}
                            for r, t in by_region.most_common()]
    return out


def trace_calls(call, n_steps: int, keep: str | None = None, hlo_text: str | None = None) -> dict:
    """Traces n_steps calls of ``call()`` (which returns what to wait for) with jax.profiler and
    summarizes the device kernels per call (``summarize_trace``; ``hlo_text``: the called
    executable's compiled HLO); ``keep``: also copy the trace there."""
    d = tempfile.mkdtemp(prefix="lamemo_prof_")
    try:
        with jax.profiler.trace(d):
            t = time.perf_counter()
            for _ in range(n_steps):
                out = call()
            jax.block_until_ready(out)
            wall = (time.perf_counter() - t) * 1e3 / n_steps
        paths = glob.glob(os.path.join(d, "plugins", "profile", "*", "*.trace.json.gz"))
        if not paths:
            return {"error": "the profiler wrote no trace.json.gz", "traced_wall_ms_per_step": wall}
        with gzip.open(paths[0], "rb") as f:
            summary = summarize_trace(json.load(f), n_steps, hlo_text=hlo_text)
        if keep:
            shutil.copy(paths[0], keep)
        return {"traced_wall_ms_per_step": wall, **summary}
    finally:
        shutil.rmtree(d, ignore_errors=True)


def trace_steps(timer: TrainTimer, n_steps: int, keep: str | None = None) -> dict:
    """Traces n_steps of ``timer``'s train step (its state carried) and summarizes the kernels."""
    jax.block_until_ready(timer.state)

    def call():
        timer.state, m = timer.step(timer.state, timer.x, timer.x, timer.sos)
        return timer.state, m

    return trace_calls(call, n_steps, keep, hlo_text=timer.step.as_text())


def switch_setup(fields: dict):
    """Pops the switch pseudo-fields (``kernels.SWITCHES``) from ``fields``: None when there are none,
    else a context manager factory that forces them while the variant's step is traced."""
    forced = {}
    for name, switch in kernels.SWITCHES.items():
        value = fields.pop(name, None)
        if value is None:
            continue
        if not isinstance(value, bool):
            raise ValueError(f"{name}={value!r}: True or False expected")
        forced[switch] = value
    if not forced:
        return None

    @contextlib.contextmanager
    def setup():
        with contextlib.ExitStack() as stack:
            for switch, value in forced.items():
                stack.enter_context(switch.forced(value))
            yield
    return setup


def compiler_options(fields: dict) -> dict | None:
    """Pops the XLA options (fields named ``xla_...``) from ``fields``: None when there are none."""
    options = {k: fields.pop(k) for k in [k for k in fields if k.startswith("xla_")]}
    return options or None


def parse_variant(spec: str) -> tuple[str, dict]:
    """'NAME:FIELD=VALUE,FIELD=VALUE' -> (NAME, {FIELD: value})."""
    name, sep, rest = spec.partition(":")
    if not sep or not name:
        raise ValueError(f"--variant {spec!r}: expected NAME:FIELD=VALUE,... (NAME: alone for none)")
    items = [i for i in rest.split(",") if i]
    bad = [i for i in items if "=" not in i or i.startswith("=")]
    if bad:
        raise ValueError(f"--variant {spec!r}: {bad[0]!r} is not FIELD=VALUE")
    return name, parse_overrides(items)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None,
                   help="a configs/*.py file; none: the CPU benchmark config of benchmarks.throughput "
                        "(the original code's: 2 layers, d_model 128, batch 8, tgt_len 64, mem_len 64)")
    p.add_argument("--dtype", default=None, help="default: bfloat16 with --config, else float32")
    p.add_argument("--attention_impl", default="xla")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:FIELD=VALUE,...")
    p.add_argument("--batch", type=int, default=None, help="default: the config's")
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    p.add_argument("--trace_steps", type=int, default=3)
    p.add_argument("--top", type=int, default=12, help="ops printed per variant")
    p.add_argument("--keep", action="append", default=[], metavar="NAME",
                   help="also write this variant's trace and compiled HLO text (repeatable)")
    p.add_argument("--out", default="runs/profile")
    p.add_argument("--summarize", default=None, metavar="TRACE.json.gz",
                   help="only summarize a kept trace (--keep) of --trace_steps steps, print JSON")
    p.add_argument("--hlo", default=None, metavar="HLO.txt.gz",
                   help="with --summarize: the kept HLO (op names and model regions; needed on CPU)")
    args = p.parse_args(argv)
    tune_cpu_host()  # before the first computation (lamemo_jax.host)
    if args.hlo and not args.summarize:
        p.error("--hlo goes with --summarize (a profiling run reads its own executable's HLO)")
    if args.summarize:
        hlo = None
        if args.hlo:
            with gzip.open(args.hlo, "rt") as f:
                hlo = f.read()
        with gzip.open(args.summarize, "rb") as f:
            print(json.dumps(summarize_trace(json.load(f), args.trace_steps, top=args.top,
                                             hlo_text=hlo), indent=1))
        return 0
    if args.config:
        exp = load_config_file(args.config)
        exp_model, batch = exp.model, args.batch or exp.train.batch_size
        dtype = args.dtype or "bfloat16"
        ns = argparse.Namespace(config=args.config, dtype=dtype, set=[])
    else:  # benchmarks.throughput's CPU config, the original code's (ORIGINAL_CONFIG)
        dtype = args.dtype or ORIGINAL_CONFIG["dtype"]
        model = {k: v for k, v in ORIGINAL_CONFIG.items() if k not in ("batch", "dtype")}
        ns = argparse.Namespace(config=None, dtype=dtype, set=[], **model)
        exp_model = base_config(ns, "lamemo", 64, args.attention_impl)
        batch = args.batch or ORIGINAL_CONFIG["batch"]
    specs = args.variant or ["default:"]
    try:
        variants = []
        for spec in specs:
            name, fields = parse_variant(spec)
            memory = fields.pop("memory", exp_model.memory)
            mem_len = fields.pop("mem_len", exp_model.mem_len)
            impl = fields.pop("attention_impl", args.attention_impl)
            setup = switch_setup(fields)
            options = compiler_options(fields)
            variants.append((name, base_config(ns, memory, mem_len, impl).replace(**fields), setup, options))
    except (TypeError, ValueError) as e:
        p.error(str(e))
    os.makedirs(args.out, exist_ok=True)
    peak = device_peak_flops()
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), config "
          f"{args.config or 'benchmarks.throughput (CPU)'}, batch {batch}, {dtype}", flush=True)
    _, cfgs, setups, options_per_variant = zip(*variants)
    timers = time_interleaved(list(cfgs), batch, args.steps, setups=list(setups),
                              compiler_options=list(options_per_variant))
    rows = []
    for (name, cfg, _, options), timer in zip(variants, timers):
        if isinstance(timer, Exception):
            rows.append({"variant": name, "compiler_options": options,
                         "error": f"{type(timer).__name__}: {str(timer)[:400]}"})
            print(f"\n== {name}: failed: {rows[-1]['error']}", flush=True)
            continue
        med = timer.summary()[0]
        flops = train_step_flops(cfg, batch)
        keep = os.path.join(args.out, f"trace_{name}.json.gz") if name in args.keep else None
        prof = trace_steps(timer, args.trace_steps, keep)
        if name in args.keep:
            with gzip.open(os.path.join(args.out, f"hlo_{name}.txt.gz"), "wt") as f:
                f.write(timer.step.as_text())
        row = {"variant": name, "compiler_options": options, "step_ms": med * 1e3,
               "train_tokens_per_sec": batch * cfg.tgt_len / med,
               "train_flops_per_step": flops, "achieved_tflops": flops / med / 1e12,
               "mfu": flops / med / peak if peak else None, "train_step_mb": timer.step_mb,
               "profile": prof}
        rows.append(row)
        mfu = f", MFU {row['mfu']:.1%}" if row["mfu"] is not None else ""
        print(f"\n== {name}: {row['step_ms']:.1f} ms/step (median of {args.steps}), "
              f"{row['train_tokens_per_sec']:.0f} tok/s, {flops / 1e12:.2f} TFLOP/step, "
              f"{row['achieved_tflops']:.1f} TFLOP/s{mfu}", flush=True)
        if prof.get("device_kernels"):
            what = "device" if prof["source"] == "device" else "ops (XLA:CPU, concurrent on the cores)"
            print(f"   traced {prof['traced_wall_ms_per_step']:.1f} ms/step wall; {what} busy "
                  f"{prof['busy_ms_per_step']:.1f} ms, summed {prof['kernel_ms_per_step']:.1f} ms "
                  f"({prof['kernels_per_step']:.0f} launches)", flush=True)
            print("   by kind (ms/step): " + ", ".join(
                f"{k} {v:.1f}" for k, v in prof["by_kind_ms_per_step"].items()), flush=True)
            print("   by model region (ms/step, of which backward): " + ", ".join(
                f"{r['region']} {r['ms_per_step']:.1f} ({r['backward_ms_per_step']:.1f})"
                for r in prof.get("by_region", [])), flush=True)
            for o in prof["top_ops"][:args.top]:
                print(f"   {o['ms_per_step']:7.2f} ms {o['share']:6.1%} x{o['launches_per_step']:<4.0f} "
                      f"{o['op'][:40]:40s} {o['kernel'][:70]}", flush=True)
        else:
            print(f"   traced {prof.get('traced_wall_ms_per_step', float('nan')):.1f} ms/step wall; "
                  f"no device kernels in the trace ({jax.default_backend()})", flush=True)
    out = {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
           "jax": jax.__version__, "host_tuning": host_settings(),
           "reference_forms": kernels.reference_forms(), "args": vars(args), "batch": batch,
           "dtype": dtype, "rows": rows}
    with open(os.path.join(args.out, "profile.json"), "w") as f:
        json.dump(out, f, indent=2)
    print(f"wrote {args.out}/profile.json", flush=True)
    return 0 if not any("error" in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
