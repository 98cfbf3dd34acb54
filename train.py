"""Train a LaMemo / Transformer-XL language model.

    python train.py --config=configs/default.py --workdir=runs/default
    python train.py --config=configs/wt103.py --config.model.memory=xl --workdir=runs/wt103_xl

Resumes automatically from the workdir's latest checkpoint. SIGTERM/SIGINT save and exit 0.
"""

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from lamemo_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cli.setup_logging()
    cli.log_devices()
    from lamemo_jax.trainer import train_and_evaluate
    summary = cli.run_reporting_errors(lambda: train_and_evaluate(_CONFIG.value, _WORKDIR.value))
    cli.print_train_summary(summary)


if __name__ == "__main__":
    app.run(main)
