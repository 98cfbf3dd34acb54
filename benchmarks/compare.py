"""LaMemo vs Transformer-XL at equal size and memory on real offline text (docs/results.md).

    python -m benchmarks.compare --dataset=wiki_chars --seeds=0,1,2 --out=runs/compare  # 400 steps
    python -m benchmarks.compare --dataset=sotu_words --seeds=0,1,2 --out=runs/compare  # 1000 steps
    (--steps=6000 for chars and --steps=2000 for words: the longer runs of docs/results.md)

For each memory type and seed: trains configs/compare.py (4 layers, d_model 128, tgt_len = mem_len
= 64; only the dataset, memory type and seed differ), evaluates the test split with the original
protocol, sweeps the evaluation memory length (extrapolation), and measures the average attention
mass by relative distance on the test split. Writes ``<out>/<dataset>/summary.json``, a markdown
table ``summary.md`` (mean +- std and per-seed numbers), and plots: loss curves, memory sweep,
attention vs distance.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time

import numpy as np

from lamemo_jax import data as data_lib
from lamemo_jax.analysis import attention_by_distance
from lamemo_jax.evaluate import evaluate_tokens, stream_matrix
from lamemo_jax.host import tune_cpu_host
from lamemo_jax.metrics import plot_loss_curves, plot_xy, read_metrics, unit_metrics
from lamemo_jax.trainer import load_run, train_and_evaluate


def run_one(dataset: str, memory: str, seed: int, steps: int, out: str) -> dict:
    cd = importlib.import_module("configs.compare").get_config(dataset)
    cd.model.memory = memory
    cd.train.seed = seed
    if steps:
        cd.train.num_steps = steps
    cd.train.progress_bar = False
    workdir = os.path.join(out, dataset, f"{memory}_seed{seed}")
    t0 = time.perf_counter()
    summary = train_and_evaluate(cd, workdir)
    train_wall_s = time.perf_counter() - t0  # this call only: a resumed run counts the resumed part
    if summary.get("interrupted"):  # SIGTERM/SIGINT: the trainer saved and returned; stop here too
        raise SystemExit(f"{workdir}: interrupted ({summary['interrupted']}) at step {summary['step']}; "
                         "run the same command again to resume")
    if summary["step"] != cd.train.num_steps:  # a reused --out holding a longer run
        raise SystemExit(f"{workdir} holds a run at step {summary['step']}, not {cd.train.num_steps}: "
                         "use a new --out (or the same --steps) so the table says what was trained")
    return {"workdir": workdir, "num_steps": cd.train.num_steps, "train_wall_s": train_wall_s, **summary}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="wiki_chars", choices=["wiki_chars", "sotu_words", "wiki_bytes"])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=0,
                   help="training steps per run (default: configs/compare.py's, 400 chars / 1000 words)")
    p.add_argument("--mem_lens", default="16,32,64,128,256")  # trained with 64
    p.add_argument("--analysis_tokens", type=int, default=16 * 64 * 12)
    p.add_argument("--sweep_tokens", type=int, default=32768, help="test tokens used by the memory sweep")
    p.add_argument("--out", default="runs/compare")
    args = p.parse_args(argv)
    warmup = importlib.import_module("configs.compare").get_config(args.dataset).train.warmup_steps
    if args.steps and args.steps <= warmup:  # the schedule warms up over the first warmup_steps
        p.error(f"--steps={args.steps}: must be 0 (configs/compare.py's) or > the recipe's "
                f"warmup_steps ({warmup}) for --dataset={args.dataset}")
    tune_cpu_host()  # before the first computation (lamemo_jax.host)
    seeds = [int(s) for s in args.seeds.split(",")]
    mem_lens = [int(m) for m in args.mem_lens.split(",")]
    root = os.path.join(args.out, args.dataset)
    os.makedirs(root, exist_ok=True)
    results = {"lamemo": [], "xl": []}
    curves, sweeps, attn = {}, {}, {}
    for memory in ("lamemo", "xl"):
        for seed in seeds:
            r = run_one(args.dataset, memory, seed, args.steps, args.out)
            exp, cfg, params, _ = load_run(r["workdir"])
            ds = data_lib.load(exp.data)
            test = ds.split("test")
            ecfg = exp.eval_model()
            res = evaluate_tokens(ecfg, params, test, batch_size=exp.eval.batch_size)
            sweep = [(m, evaluate_tokens(ecfg.replace(mem_len=m), params, test, batch_size=exp.eval.batch_size,
                                         max_tokens=args.sweep_tokens).loss) for m in mem_lens]
            streams = stream_matrix(test, exp.eval.batch_size, args.analysis_tokens)
            streams = streams[:, : (streams.shape[1] // cfg.tgt_len) * cfg.tgt_len]
            mass = attention_by_distance(ecfg, params, streams, skip=ecfg.mem_len // ecfg.tgt_len + 1)
            results[memory].append({"seed": seed, "test_loss": res.loss, **unit_metrics(res.loss, ds.unit),
                                    "valid_loss": r.get("valid_loss"), "workdir": r["workdir"],
                                    "train_wall_s": r["train_wall_s"],
                                    "sweep": sweep, "params": int(sum(np.prod(x.shape) for x in
                                                                        __import__("jax").tree.leaves(params)))})
            curves[f"{memory} s{seed}"] = read_metrics(os.path.join(r["workdir"], "metrics.jsonl"))
            sweeps.setdefault(memory, []).append([l for _, l in sweep])
            attn.setdefault(memory, []).append(mass.mean(0))
            print(f"{args.dataset} {memory} seed {seed}: test loss {res.loss:.4f} "
                  f"{unit_metrics(res.loss, ds.unit)}", flush=True)
    metric = "ppl" if ds.unit == "word" else "bpc"
    summary = {"dataset": args.dataset, "unit": ds.unit, "metric": metric, "steps": r["num_steps"],
               "seeds": seeds, "results": results, "mem_lens": mem_lens,
               # the plots' numbers: mean over seeds of the attention mass by relative distance
               "attention_by_distance": {m: [float(x) for x in np.mean(attn[m], 0)] for m in attn}}
    lines = [f"| memory | params | test {metric} mean ± std | per seed |", "|---|---|---|---|"]
    for memory in ("lamemo", "xl"):
        vals = [r[metric] for r in results[memory]]
        summary[f"{memory}_{metric}_mean"] = float(np.mean(vals))
        summary[f"{memory}_{metric}_std"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
        lines.append(f"| {memory} | {results[memory][0]['params']:,} | {np.mean(vals):.4f} ± "
                     f"{summary[f'{memory}_{metric}_std']:.4f} | {', '.join(f'{v:.4f}' for v in vals)} |")
    with open(os.path.join(root, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=float)
    with open(os.path.join(root, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot_loss_curves(curves, os.path.join(root, "loss_curves.png"), title=f"{args.dataset}: LaMemo vs XL")
    conv = (lambda l: float(np.exp(l))) if ds.unit == "word" else (lambda l: l / np.log(2))
    plot_xy({m: (mem_lens, [conv(x) for x in np.mean(sweeps[m], 0)]) for m in sweeps},
            os.path.join(root, "memory_sweep.png"), "evaluation mem_len", f"test {metric}",
            title=f"{args.dataset}: memory-length extrapolation (trained with 64)", logx=True)
    plot_xy({m: (list(range(len(attn[m][0]))), list(np.mean(attn[m], 0))) for m in attn},
            os.path.join(root, "attention_by_distance.png"), "relative distance", "attention mass",
            title=f"{args.dataset}: attention of the current rows by distance")
    return 0


if __name__ == "__main__":
    from lamemo_jax.cli import run_reporting_errors
    sys.exit(run_reporting_errors(main))  # a config or data error: one line, exit 2
