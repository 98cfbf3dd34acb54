"""Prepare a dataset and print its sizes: ``python -m lamemo_jax.data sotu_words [--data_dir D]
[--manual_dir M] [--set field=value ...]``."""

from __future__ import annotations

import argparse
import ast
import math
from typing import Any, Dict

import numpy as np

from lamemo_jax import cli, data
from lamemo_jax.api import out_of_vocab_id
from lamemo_jax.data.config import CorruptCacheError
from lamemo_jax.data.dataset import Dataset, unigram_log_probs


def _value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def checked_split(ds: Dataset, split: str) -> np.ndarray:
    """``ds.split(split)``; an id outside the vocabulary is a ``CorruptCacheError`` naming the
    dataset, split, id, vocabulary size and cache file (one pass for each of min and max)."""
    toks = ds.split(split)
    bad = out_of_vocab_id(toks, ds.vocab.n_token)
    if bad is not None:
        path = ds.cache_file(split)
        where = (f"; its cache {path} is damaged: delete it to rebuild it from the prepared dataset "
                 f"(if the rebuilt one holds it too, delete {ds.info['data_dir']} to prepare the dataset again)"
                 if path is not None else "")
        raise CorruptCacheError(f"{ds.name}: the {split} split holds token id {bad} outside the vocabulary "
                                f"[0, {ds.vocab.n_token}) (n_token={ds.vocab.n_token}){where}")
    return toks


def _print_statistics(ds: Dataset) -> None:
    splits = {s: checked_split(ds, s) for s in data.SPLITS}  # every split checked before any output
    logp = unigram_log_probs(splits["train"], ds.vocab.n_token)  # one table (unigram_nll's) for all
    print(f"{ds.name} ({ds.unit}, report {ds.metric}): n_token={ds.vocab.n_token}")
    for s, toks in splits.items():
        nll = float(-logp[np.asarray(toks, dtype=np.int64)].mean())
        score = f"ppl {math.exp(nll):.2f}" if ds.metric == "ppl" else f"bpc {nll / math.log(2):.4f}"
        print(f"  {s:5s} {len(toks):>12,d} tokens   add-one train-unigram {score}")
    print(f"  files: {ds.info.get('data_dir', '(in memory)')}")


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
    # the splits' caches are read (and written on first use) here: a damaged one is one line too
    cli.run_reporting_errors(lambda: _print_statistics(ds))


if __name__ == "__main__":
    main()
