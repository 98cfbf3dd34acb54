"""Metrics: units (ppl / bpc converted in one place), JSON lines, TensorBoard, plots."""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any, Dict, Iterable, Optional

from lamemo_jax.fileio import write_text_atomic

LN2 = math.log(2.0)


def unit_metrics(loss_nats: float, unit: str) -> Dict[str, float]:
    """{'ppl': e^loss} for words; {'bpc': loss / ln 2} for characters and bytes."""
    if unit == "word":
        return {"ppl": math.exp(min(loss_nats, 700.0))}
    if unit in ("char", "byte"):
        return {"bpc": loss_nats / LN2}
    raise ValueError(f"unknown data unit {unit!r}; expected 'word', 'char' or 'byte'")


def headline(loss_nats: float, unit: str) -> str:
    (k, v), = unit_metrics(loss_nats, unit).items()
    return f"{k} {v:.3f}" if k == "bpc" else f"{k} {v:.2f}"


class MetricWriter:
    """Appends one JSON object per record to ``<workdir>/metrics.jsonl`` and mirrors scalars to
    TensorBoard event files under ``<workdir>/tensorboard`` (tensorboardX, no TensorFlow)."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if enabled:
            os.makedirs(workdir, exist_ok=True)
            try:
                from tensorboardX import SummaryWriter
                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
            except ImportError:  # optional: metrics.jsonl is the record of truth
                self._tb = None

    def write(self, record: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self._tb is not None:
            prefix = record.get("split", "train")
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                    self._tb.add_scalar(f"{prefix}/{k}", v, record.get("step", 0))

    def truncate(self, step: int, drop_evals_at_last: bool = False) -> None:
        """Drops the records after ``step`` (and, with ``drop_evals_at_last``, the evaluation
        records at ``step``) from metrics.jsonl, atomically: a resumed run re-does that work."""
        if not self.enabled or not os.path.exists(self.path):
            return
        keep = [r for r in read_metrics(self.path)
                if r.get("step", 0) < step or (r.get("step", 0) == step and not (
                    drop_evals_at_last and r.get("split", "train") != "train"))]
        write_text_atomic(self.path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in keep))

    def flush(self):
        if self._tb is not None:
            self._tb.flush()

    def close(self):
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(path: str) -> list:
    """The records of a metrics.jsonl. A last line without its newline that is not JSON is an
    append that was cut (a kill, a full disk, or a trainer writing it right now): it is left out
    with a warning, and a resumed run's truncate removes it. Any other bad line is an error
    naming the file and the line."""
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        lines = f.readlines()
    for i, raw in enumerate(lines):
        line = raw.strip()
        if not line:
            continue
        try:
            out.append(json.loads(line))
        except ValueError as e:
            if i == len(lines) - 1 and not raw.endswith("\n"):
                logging.warning("%s: its last line is incomplete (a write that was cut); left out: %r",
                                path, line[:80])
                continue
            raise ValueError(f"{path}: line {i + 1} is not a JSON record ({e}); fix or delete that "
                             "line") from None
    return out


def _figure():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    return plt, fig, ax


def _finish(plt, fig, ax, path, xlabel, ylabel, title) -> str:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_loss_curves(runs: Dict[str, Iterable[Dict[str, Any]]], path: str, title: str = "") -> str:
    """Training (and validation) loss vs step for one or several runs, written as a PNG."""
    plt, fig, ax = _figure()
    for i, (name, records) in enumerate(runs.items()):
        records = list(records)
        tr = [(r["step"], r["loss"]) for r in records if r.get("split", "train") == "train" and "loss" in r]
        va = [(r["step"], r["loss"]) for r in records if r.get("split") == "valid" and "loss" in r]
        color = f"C{i}"
        if tr:
            ax.plot(*zip(*tr), color=color, alpha=0.8, label=f"{name} train")
        if va:
            ax.plot(*zip(*va), "o--", color=color, label=f"{name} valid")
    return _finish(plt, fig, ax, path, "step", "loss (nats / token)", title)


def plot_xy(series: Dict[str, tuple], path: str, xlabel: str, ylabel: str, title: str = "",
            logx: bool = False) -> str:
    """Generic line plot: series = {label: (xs, ys)}."""
    plt, fig, ax = _figure()
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, "o-", label=name)
    if logx:  # symmetric-log when x = 0 is a point (a memory sweep from mem_len 0): log below 1 hides it
        has_zero = any(x <= 0 for xs, _ in series.values() for x in xs)
        ax.set_xscale("symlog", base=2, linthresh=1) if has_zero else ax.set_xscale("log", base=2)
    return _finish(plt, fig, ax, path, xlabel, ylabel, title)


def format_seconds(s: Optional[float]) -> str:
    if s is None:
        return "?"
    s = int(s)
    return f"{s // 3600}h{(s % 3600) // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
