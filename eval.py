"""Evaluate a trained model with the original protocol, sweep memory lengths, or generate text.

    python eval.py --workdir=runs/default                        # latest checkpoint, eval.split
    python eval.py --workdir=runs/default --split=valid --mem_lens=32,64,128,256
    python eval.py --workdir=runs/default --prompt="The state of the union" --max_new_tokens=60
    python eval.py --torch_checkpoint=model.pt --torch_config=config.json --config=configs/wt103.py

Writes <workdir>/eval_<split>.json (and eval_<split>_memsweep.{json,png} for a sweep).
"""

import json
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from lamemo_jax import cli
from lamemo_jax.host import tune_cpu_host

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, only with --torch_checkpoint: "
                                          "its data and eval sections (a --workdir run's come from its "
                                          "config.json).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir to evaluate.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the model a finished run "
                             "tested, its best-valid one (<workdir>/tested.json); else the latest "
                             "good checkpoint).")
_TORCH = flags.DEFINE_string("torch_checkpoint", None, "An original PyTorch checkpoint (.pt).")
_TORCH_CONFIG = flags.DEFINE_string("torch_config", None, "JSON of its MemTransformerLM constructor args.")
_SPLIT = flags.DEFINE_enum("split", None, ["valid", "test", "train"], "Split (default: eval.split).")
_TGT = flags.DEFINE_integer("tgt_len", None, "Evaluation segment length (default: eval.tgt_len).")
_MEM = flags.DEFINE_integer("mem_len", None, "Evaluation memory length (default: eval.mem_len).")
_CLAMP = flags.DEFINE_integer("clamp_len", None, "Clamp distances, -1 = off (default: eval.clamp_len, "
                               "or the model's).")
_SAME = flags.DEFINE_bool("same_length", None, "Same-length attention (default: eval.same_length, or "
                          "the model's).")
_BATCH = flags.DEFINE_integer("batch_size", None, "Contiguous streams (default: eval.batch_size, 16).")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 0, "Use only the first N tokens of the split (0: all).")
_MEM_LENS = flags.DEFINE_list("mem_lens", None, "Memory-length sweep, e.g. 64,128,256.")
_OUTPUT = flags.DEFINE_string("output", None, "JSON output path (default: in the workdir); with "
                               "--mem_lens also the plot's, with .png.")
_PROMPT = flags.DEFINE_string("prompt", None, "Generate a continuation of this text instead.")
_NEW = flags.DEFINE_integer("max_new_tokens", 100, "Tokens to generate.")
_TEMP = flags.DEFINE_float("temperature", 1.0, "Sampling temperature.")
_TOP_P = flags.DEFINE_float("top_p", 0.9, "Nucleus sampling mass.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    tune_cpu_host()  # XLA:CPU steps without page faults (lamemo_jax.host); before any computation
    cli.setup_logging()
    if _PROMPT.value is None:  # their defaults are not errors; a value given for nothing is
        given = [f"--{n}" for n in ("max_new_tokens", "temperature", "top_p", "seed") if flags.FLAGS[n].present]
        if given:
            print(f"error: {', '.join(given)} only apply with --prompt (generation)", file=sys.stderr)
            sys.exit(2)
    from lamemo_jax.evaluate_cli import run
    result = cli.run_reporting_errors(lambda: run(
        workdir=_WORKDIR.value, step=_STEP.value, config=_CONFIG.value, torch_checkpoint=_TORCH.value,
        torch_config=_TORCH_CONFIG.value, split=_SPLIT.value, tgt_len=_TGT.value, mem_len=_MEM.value,
        clamp_len=_CLAMP.value, same_length=_SAME.value, batch_size=_BATCH.value,
        max_tokens=_MAX_TOKENS.value, mem_lens=_MEM_LENS.value, output=_OUTPUT.value,
        prompt=_PROMPT.value, max_new_tokens=_NEW.value, temperature=_TEMP.value, top_p=_TOP_P.value,
        seed=_SEED.value))
    if _PROMPT.value is None:
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
