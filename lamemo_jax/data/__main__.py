"""Prepare a dataset and print its sizes: ``python -m lamemo_jax.data sotu_words [--data_dir D]
[--manual_dir M] [--set field=value ...]``."""

from __future__ import annotations

import argparse
import ast
import math
from typing import Any, Dict

from lamemo_jax import cli, data
from lamemo_jax.data.dataset import unigram_nll


def _value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("name", choices=sorted(data.DATASETS))
    p.add_argument("--data_dir")
    p.add_argument("--manual_dir")
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="other DataConfig fields")
    a = p.parse_args()
    cfg: Dict[str, Any] = {"name": a.name, "data_dir": a.data_dir, "manual_dir": a.manual_dir}
    for kv in a.set:
        k, _, v = kv.partition("=")
        cfg[k] = _value(v)
    ds = cli.run_reporting_errors(lambda: data.load(cfg))  # a user error: one line, exit 2
    train = ds.split("train")
    print(f"{ds.name} ({ds.unit}, report {ds.metric}): n_token={ds.vocab.n_token}")
    for s in data.SPLITS:
        nll = unigram_nll(train, ds.split(s), ds.vocab.n_token)
        score = f"ppl {math.exp(nll):.2f}" if ds.metric == "ppl" else f"bpc {nll / math.log(2):.4f}"
        print(f"  {s:5s} {ds.num_tokens(s):>12,d} tokens   add-one train-unigram {score}")
    print(f"  files: {ds.info.get('data_dir', '(in memory)')}")


if __name__ == "__main__":
    main()
