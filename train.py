"""Train a LaMemo / Transformer-XL language model.

    python train.py --config=configs/default.py --workdir=runs/default
    python train.py --config=configs/wt103.py --config.model.memory=xl --workdir=runs/wt103_xl

Resumes automatically from the workdir's latest checkpoint. SIGTERM/SIGINT save and exit 0.

Multi-host (docs/scaling.md): on a TPU pod slice / SLURM / Open MPI launch the same command runs
on every host and ``jax.distributed.initialize()`` is called automatically; elsewhere pass
``--coordinator_address=host0:1234 --num_processes=N --process_id=i`` to every process.
"""

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from lamemo_jax import cli
from lamemo_jax.host import tune_cpu_host

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 for jax.distributed (multi-process runs).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
_AUTO_DISTRIBUTED = flags.DEFINE_bool("auto_distributed", True,
                                      "Call jax.distributed.initialize() when a TPU pod / SLURM / Open MPI "
                                      "multi-process environment is detected.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    tune_cpu_host()  # XLA:CPU steps without page faults (lamemo_jax.host); before any computation
    from lamemo_jax.sharding import initialize_distributed
    cli.run_reporting_errors(lambda: initialize_distributed(
        _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, auto=_AUTO_DISTRIBUTED.value))
    cli.setup_logging()
    cli.log_devices()
    import jax
    if jax.process_index() != 0:  # one process writes logs and metrics
        logging.getLogger().setLevel(logging.WARNING)
    from lamemo_jax.trainer import train_and_evaluate
    summary = cli.run_reporting_errors(lambda: train_and_evaluate(_CONFIG.value, _WORKDIR.value))
    if jax.process_index() == 0:
        cli.print_train_summary(summary)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
