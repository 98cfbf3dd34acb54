"""Our training step against the original PyTorch code, both measured now, on this machine.

    pip install torch==2.13.0            # not a dependency of lamemo_jax
    git clone https://github.com/thu-coai/LaMemo /tmp/LaMemo
    python -m benchmarks.original --original_dir=/tmp/LaMemo/pytorch --out=docs/benchmarks

``benchmarks.throughput`` checks the issue's target against the original's step times as they
were given (53 / 91 / 136 / 307 ms for LaMemo at mem_len 64 / 128 / 256 / 512). Those numbers
cannot be re-checked from inside a run of ours, and a shared machine drifts; this script measures
the original's ``MemTransformerLM`` (``attn_type`` 3 = LaMemo, 0 = Transformer-XL) and our
``memory="lamemo"`` / ``"xl"`` steps in one process, in interleaved rounds (order alternating), at
the same config as ``benchmarks.throughput``: 2 layers, d_model 128, 4 x 32 heads, d_inner 512,
vocab 1000 with a tied full softmax, tgt_len 64, batch 8, float32, dropout 0.1, Adam (lr 2.5e-4)
with gradient clipping at 0.25.

The original's step is its training loop's: ``model(data, target, *mems)`` in train mode (it
returns ``[loss, mem_loss] + new_mems``), ``loss.float().mean()``, backward,
``clip_grad_norm_(0.25)``, ``optimizer.step()``, with the returned memory carried to the next
step (``train_ddp.py``). Each variant first fills its memory, then the median of ``--steps`` steps
is reported. Writes ``original.json`` (``original_data_parallel.json`` with ``--data_parallel``) under ``--out``; exit status 1 if our LaMemo step is not at
least 2x faster than the original's at some mem_len (2 on bad flags or a missing torch/original).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
import types

import numpy as np

import kernels
from benchmarks.throughput import ORIGINAL_CONFIG, TrainTimer, run_rounds
from lamemo_jax import ModelConfig
from lamemo_jax.host import applied as host_settings, tune_cpu_host

# the step of benchmarks.throughput (its ORIGINAL_CONFIG; dropout 0.1, Adam 2.5e-4, clip 0.25)
C = ORIGINAL_CONFIG
N_TOKEN, N_LAYER, N_HEAD, D_MODEL = C["n_token"], C["n_layer"], C["n_head"], C["d_model"]
D_HEAD, D_INNER, TGT_LEN, BATCH = C["d_head"], C["d_inner"], C["tgt_len"], C["batch"]
DROPOUT, LR, CLIP = 0.1, 2.5e-4, 0.25
ATTN_TYPE = {"lamemo": 3, "xl": 0}


# the training-infrastructure modules the checkout's utils/__init__.py imports; a copy without them
# (e.g. only the files the model needs) gets empty stand-ins, since mem_transformer.py uses none
UTILS_TRAINING_MODULES = ("distributed", "exp_utils_ddp")


class MissingOriginal(Exception):
    """torch or the original code cannot be loaded; the message says which and how to fix it."""


def load_original(original_dir: str):
    """The original ``mem_transformer`` module from a checkout's ``pytorch`` folder.

    Three things of a checkout do not import on a CPU-only torch, and are bridged here
    without touching the checkout: ``log_uniform_sampler`` (imported by ``mem_transformer.py`` but
    absent from the repository; used only with sample_softmax > 0, never here) gets a stub that
    raises if called; ``utils/__init__.py`` imports ``distributed`` and ``exp_utils_ddp``, which
    the model does not use: where a copy lacks them they are empty modules; and
    ``utils/proj_adaptive_softmax.py``, which parses ``torch.version.cuda``
    at import (None on a CPU build), sees "0.0" during the import (it only keeps the numbers).
    """
    try:
        import torch
    except ImportError as e:
        raise MissingOriginal(f"benchmarks.original needs PyTorch (pip install torch==2.13.0): {e}")
    path = os.path.join(original_dir, "mem_transformer.py")
    if not os.path.isfile(path):
        raise MissingOriginal(f"--original_dir={original_dir}: no mem_transformer.py there (give the "
                              "'pytorch' folder of a checkout of https://github.com/thu-coai/LaMemo)")
    for d in (os.path.join(original_dir, "utils"), original_dir):
        if d not in sys.path:
            sys.path.insert(0, d)
    if importlib.util.find_spec("log_uniform_sampler") is None:
        def unavailable(*args, **kwargs):
            raise NotImplementedError("log_uniform_sampler is not part of the original checkout "
                                      "(needed only with sample_softmax > 0)")
        stub = types.ModuleType("log_uniform_sampler")
        stub.LogUniformSampler = stub.sample_logits = unavailable
        sys.modules["log_uniform_sampler"] = stub
    for name in UTILS_TRAINING_MODULES:  # imported by utils/__init__.py, unused by the model
        if not os.path.isfile(os.path.join(original_dir, "utils", f"{name}.py")):
            sys.modules.setdefault(f"utils.{name}", types.ModuleType(f"utils.{name}"))
    cuda = torch.version.cuda
    torch.version.cuda = cuda or "0.0"
    try:
        import mem_transformer
    except Exception as e:  # noqa: BLE001 - any import failure of user code is reported by name
        raise MissingOriginal(f"importing {path} failed: {type(e).__name__}: {e}") from e
    finally:
        torch.version.cuda = cuda
    return mem_transformer


class OriginalTimer:
    """The original's training step for one (memory, mem_len), memory filled, timed step by step."""

    def __init__(self, mt, memory: str, mem_len: int, seed: int = 0):
        import torch
        torch.manual_seed(seed)
        self.model = mt.MemTransformerLM(
            N_TOKEN, N_LAYER, N_HEAD, D_MODEL, D_HEAD, D_INNER, DROPOUT, 0.0, tie_weight=True,
            d_embed=D_MODEL, div_val=1, tie_projs=[False], pre_lnorm=False, tgt_len=TGT_LEN,
            ext_len=0, mem_len=mem_len, cutoffs=[], same_length=False,
            attn_type=ATTN_TYPE[memory], clamp_len=-1)
        self.model.train()
        self.opt = torch.optim.Adam(self.model.parameters(), lr=LR)
        rng = np.random.default_rng(0)
        self.data = torch.from_numpy(rng.integers(0, N_TOKEN, (TGT_LEN, BATCH))).long()  # time-major
        self.target = torch.from_numpy(rng.integers(0, N_TOKEN, (TGT_LEN, BATCH))).long()
        self.mems = tuple()
        self.times = []
        for _ in range(mem_len // TGT_LEN + 1):  # fill the memory
            self._step()

    def _step(self) -> None:
        import torch
        ret = self.model(self.data, self.target, *self.mems)
        loss, self.mems = ret[0], tuple(ret[2:])  # train mode: [loss, mem_loss] + new_mems
        loss = loss.float().mean()
        self.opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), CLIP)
        self.opt.step()

    def time_one(self) -> None:
        t = time.perf_counter()
        self._step()
        self.times.append(time.perf_counter() - t)


def ours(memory: str, mem_len: int, mesh=None):
    """Our TrainTimer at the same config (benchmarks.throughput's defaults)."""
    cfg = ModelConfig(n_token=N_TOKEN, n_layer=N_LAYER, d_model=D_MODEL, n_head=N_HEAD,
                      d_head=D_HEAD, d_inner=D_INNER, tgt_len=TGT_LEN, mem_len=mem_len,
                      dropout=DROPOUT, dropatt=0.0, memory=memory, dtype="float32",
                      attention_impl="xla")
    return TrainTimer(cfg, BATCH, mesh)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--original_dir", required=True,
                   help="the 'pytorch' folder of a checkout of thu-coai/LaMemo")
    p.add_argument("--mem_lens", default="64,128,256,512")
    p.add_argument("--memories", default="lamemo,xl")
    p.add_argument("--steps", type=int, default=15, help="timed steps per variant (median)")
    p.add_argument("--torch_threads", type=int, default=0,
                   help="torch.set_num_threads (0: torch's default, one per core)")
    p.add_argument("--data_parallel", action="store_true",
                   help="run our step data parallel over every local device (with "
                        "JAX_NUM_CPU_DEVICES=2 on the 2-core CPU: one device per core)")
    p.add_argument("--out", default="", help="folder for original.json (none: print only)")
    args = p.parse_args(argv)
    tune_cpu_host()  # before the first computation (lamemo_jax.host)
    try:
        mem_lens = [int(v) for v in args.mem_lens.split(",")]
        memories = args.memories.split(",")
        if any(m not in ATTN_TYPE for m in memories) or any(m < 1 for m in mem_lens) or args.steps < 1:
            raise ValueError
    except ValueError:
        print(f"--mem_lens must be positive integers, --memories a subset of {sorted(ATTN_TYPE)}, "
              "--steps >= 1", file=sys.stderr)
        return 2
    try:
        mt = load_original(args.original_dir)
    except MissingOriginal as e:
        print(e, file=sys.stderr)
        return 2
    import torch
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    mesh = None
    if args.data_parallel:
        from benchmarks.throughput import data_parallel_mesh
        from lamemo_jax.sharding import describe
        mesh = data_parallel_mesh()
        print(f"ours: data parallel over {describe(mesh)}", flush=True)
    rows = []
    for m in mem_lens:
        timers = {}
        for mem in memories:
            timers[("original", mem)] = OriginalTimer(mt, mem, m)
            timers[("ours", mem)] = ours(mem, m, mesh)
        run_rounds(list(timers.values()), args.steps)
        ms = {k: 1e3 * float(np.median(t.times)) for k, t in timers.items()}
        for mem in memories:
            o, u = ms[("original", mem)], ms[("ours", mem)]
            rows.append({"mem_len": m, "memory": mem, "original_ms": o, "ours_ms": u, "speedup": o / u})
            print(f"mem_len {m:5d} {mem:6s}: original {o:7.1f} ms  ours {u:7.1f} ms  "
                  f"ours is {o / u:.2f}x faster", flush=True)
    checks = [{"mem_len": r["mem_len"], "speedup": r["speedup"], "ok": bool(r["speedup"] >= 2.0)}
              for r in rows if r["memory"] == "lamemo"]
    for c in checks:
        print(f"target: LaMemo >= 2x faster than the original at mem_len {c['mem_len']}: "
              f"{c['speedup']:.2f}x {'met' if c['ok'] else 'NOT met'}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        meta = {"torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                "ours_devices": 1 if mesh is None else mesh.size, "host_tuning": host_settings(),
                "reference_forms": kernels.reference_forms(),
                "steps": args.steps, "batch": BATCH, "tgt_len": TGT_LEN,
                "date": time.strftime("%Y-%m-%d")}
        import jax
        meta["jax"] = jax.__version__
        name = "original_data_parallel.json" if mesh is not None else "original.json"
        with open(os.path.join(args.out, name), "w") as f:
            json.dump({"meta": meta, "rows": rows, "targets": checks}, f, indent=1)
    return 0 if all(c["ok"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
