"""Shared helpers of the thin entry points (train.py, eval.py): logging and clear errors."""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable

import jax

from lamemo_jax import host


def setup_logging():
    logging.getLogger().setLevel(logging.INFO)
    for noisy in ("absl", "jax._src", "orbax", "tensorflow_datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def log_devices():
    logging.info("JAX %s: process %d of %d, %d local device(s) %s, backend %s; host settings %s",
                 jax.__version__, jax.process_index(), jax.process_count(), jax.local_device_count(),
                 [d.device_kind for d in jax.local_devices()], jax.default_backend(),
                 host.applied() or "none")


def parse_flags(argv):
    """absl's flag parsing for ``app.run(main, flags_parser=cli.parse_flags)``: a bad
    ``--config.<section>.<key>`` override (an unknown key, a value of the wrong type) is one line
    naming the flag and exit status 2, not ml_collections' chained tracebacks."""
    from absl import flags
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:  # absl's own errors: its message and usage, as app.run does
        print(f"FATAL Flags parsing error: {e}", file=sys.stderr)
        print("Pass --helpshort or --helpfull to see help on flags.", file=sys.stderr)
        sys.exit(1)
    except (AttributeError, KeyError) as e:  # ml_collections: an unknown key in an override
        inner = e.args[0] if e.args else e
        text = " ".join(str(inner.args[0] if isinstance(inner, KeyError) and inner.args else inner).split())
        key = text.split("'")[1] if text.count("'") >= 2 else None
        named = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.") and key
                 and key in a.split("=")[0].split(".")]
        if not named:  # not an override's key (e.g. a bug inside the config file): the traceback
            raise
        print(f"error: {named[0]}: unknown config key {text}", file=sys.stderr)
        sys.exit(2)


def run_reporting_errors(fn: Callable):
    """Runs fn; a known user error becomes one clear line on stderr and exit status 2."""
    from lamemo_jax.checkpoint import CheckpointError
    from lamemo_jax.config import ConfigError
    from lamemo_jax.data.config import ChecksumError, DataConfigError, SourceNotFoundError
    from lamemo_jax.data.stream import StreamError
    from lamemo_jax.trainer import TrainingError
    from kernels import KernelUnavailableError
    try:
        return fn()
    except (ConfigError, CheckpointError, TrainingError, DataConfigError, SourceNotFoundError,
            ChecksumError, StreamError, FileNotFoundError, KernelUnavailableError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except ValueError as e:  # e.g. bad token ids: the traceback, then the message on its own line
        import traceback
        traceback.print_exc()
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


def print_train_summary(summary: dict):
    from lamemo_jax.metrics import headline
    lines = [f"workdir:    {summary['workdir']}", f"step:       {summary['step']}",
             f"checkpoint: {summary['checkpoint']}", f"metrics:    {summary['workdir']}/metrics.jsonl"]
    if "valid_loss" in summary:
        lines.insert(0, f"valid ({summary['dataset']}): loss {summary['valid_loss']:.4f}  "
                        f"{headline(summary['valid_loss'], summary['unit'])}")
    if "eval_loss" in summary:
        which = (f"  (the step-{summary['tested_step']} model, best on valid)"
                 if summary.get("tested_step", summary["step"]) != summary["step"] else "")
        lines.insert(1, f"{summary['eval_split']} ({summary['dataset']}): loss {summary['eval_loss']:.4f}  "
                        f"{headline(summary['eval_loss'], summary['unit'])}{which}")
    tensorboard = os.path.join(summary["workdir"], "tensorboard")
    if os.path.isdir(tensorboard):
        lines.append(f"tensorboard: {tensorboard}")
    if summary.get("plot"):
        lines.append(f"plot:       {summary['plot']}")
    print("\n".join(lines), flush=True)
