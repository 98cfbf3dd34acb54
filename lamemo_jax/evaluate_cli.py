"""The logic behind ``eval.py`` (importable and testable): evaluate, sweep, or generate."""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Optional, Sequence

from lamemo_jax import data as data_lib
from lamemo_jax.config import ConfigError
from lamemo_jax.data.vocab import UNK, VocabError
from lamemo_jax.evaluate import evaluate_tokens, generate, memory_sweep
from lamemo_jax.experiment import ExperimentConfig
from lamemo_jax.metrics import headline, plot_xy, unit_metrics


def _load_model(workdir, step, config, torch_checkpoint, torch_config):
    """(ExperimentConfig, ModelConfig, params, source description)."""
    if torch_checkpoint:
        from lamemo_jax import convert
        if config is None:
            raise ConfigError("--torch_checkpoint needs --config (for the data and eval sections)")
        exp = ExperimentConfig.from_config_dict(config)
        tc = json.load(open(torch_config)) if torch_config else None
        cfg, params = convert.from_torch_checkpoint(torch_checkpoint, tc)
        return exp, cfg, params, f"torch:{torch_checkpoint}"
    if not workdir:
        raise ConfigError("give --workdir (a training run) or --torch_checkpoint")
    from lamemo_jax.trainer import load_run
    exp, cfg, params, _, path = load_run(workdir, step, with_path=True)
    return exp, cfg, params, path


def unknown_words(vocab, text: str) -> list:
    """The words of ``text`` that a word vocabulary reads as <unk> (a literal <unk> aside)."""
    if vocab.unit != "word" or vocab.unk_id is None:
        return []
    return [w for w in text.split() if w != UNK and vocab.token_to_id(w) == vocab.unk_id]


def _check_flags(*, workdir, step, config, torch_checkpoint, torch_config, split, tgt_len, mem_len,
                 batch_size, max_tokens, mem_lens, output, prompt, max_new_tokens, temperature,
                 top_p):
    """A bad value, or a flag that the chosen mode would ignore, is an error naming the flag,
    before any work (never a silent default or a silent no-op)."""
    if torch_checkpoint and step is not None:
        raise ConfigError("--step does not apply with --torch_checkpoint (one model, no checkpoint steps)")
    for name, value in (("--config", config), ("--torch_config", torch_config)):
        if value is not None and not torch_checkpoint:
            raise ConfigError(
                f"{name} does not apply with --workdir: a training run's settings come from its "
                "config.json; change the evaluation with eval.py's flags (--split, --batch_size, ...)"
                if workdir else f"{name} needs --torch_checkpoint (an original PyTorch checkpoint)")
    if mem_lens and mem_len is not None:
        raise ConfigError("--mem_len does not apply with --mem_lens (the sweep sets the memory length)")
    if prompt is not None:
        for name, value in (("--split", split), ("--batch_size", batch_size), ("--mem_lens", mem_lens),
                            ("--max_tokens", max_tokens or None), ("--output", output)):
            if value is not None:
                raise ConfigError(f"{name} does not apply with --prompt (generation)")
    for name, v in (("tgt_len", tgt_len), ("batch_size", batch_size)):
        if v is not None and v <= 0:
            raise ConfigError(f"--{name}={v}: must be > 0 (leave it out for the config's eval.{name})")
    if mem_len is not None and mem_len < 0:
        raise ConfigError(f"--mem_len={mem_len}: must be >= 0")
    if max_tokens < 0:
        raise ConfigError(f"--max_tokens={max_tokens}: must be >= 0 (0: the whole split)")
    for m in mem_lens or ():
        try:
            ok = int(m) >= 0
        except ValueError:
            ok = False
        if not ok:
            raise ConfigError(f"--mem_lens: {m!r} is not a memory length (integers >= 0, e.g. 64,128,256)")
    if max_new_tokens < 1:
        raise ConfigError(f"--max_new_tokens={max_new_tokens}: must be >= 1")
    if not temperature > 0:
        raise ConfigError(f"--temperature={temperature}: must be > 0")
    if not 0.0 < top_p <= 1.0:
        raise ConfigError(f"--top_p={top_p}: must be in (0, 1]")


def run(*, workdir: Optional[str] = None, step: Optional[int] = None, config=None,
        torch_checkpoint: Optional[str] = None, torch_config: Optional[str] = None,
        split: Optional[str] = None, tgt_len: Optional[int] = None, mem_len: Optional[int] = None,
        clamp_len: Optional[int] = None, same_length: Optional[bool] = None,
        batch_size: Optional[int] = None, max_tokens: int = 0,
        mem_lens: Optional[Sequence[str]] = None, output: Optional[str] = None,
        prompt: Optional[str] = None, max_new_tokens: int = 100, temperature: float = 1.0,
        top_p: float = 0.9, seed: int = 0) -> dict:
    _check_flags(workdir=workdir, step=step, config=config, torch_checkpoint=torch_checkpoint,
                 torch_config=torch_config, split=split, tgt_len=tgt_len, mem_len=mem_len,
                 batch_size=batch_size, max_tokens=max_tokens, mem_lens=mem_lens, output=output,
                 prompt=prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
    if output is not None:  # before any work: a missing folder would lose the results at the end
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    exp, cfg, params, source = _load_model(workdir, step, config, torch_checkpoint, torch_config)
    ds = data_lib.load(exp.data)
    if ds.vocab.n_token != cfg.n_token:
        raise ConfigError(f"the model has n_token={cfg.n_token} but the {ds.name} vocabulary has "
                          f"{ds.vocab.n_token}")
    out_dir = workdir or os.getcwd()
    e = exp.eval
    ecfg = exp.eval_model(cfg, tgt_len=tgt_len, mem_len=mem_len, clamp_len=clamp_len,
                          same_length=same_length)

    if prompt is not None:
        try:
            ids = ds.vocab.encode(prompt)
        except VocabError as err:
            hint = ""
            try:
                ds.vocab.encode(prompt.lower())
                hint = f"; the lowercased prompt fits: --prompt={prompt.lower()!r}"
            except VocabError:
                pass
            raise ConfigError(f"--prompt ({ds.name}): {err}{hint}") from None
        unknown = unknown_words(ds.vocab, prompt)
        if unknown:
            logging.warning("--prompt: %d word(s) not in the %s vocabulary are read as %s: %s (the corpus "
                            "is tokenized: punctuation is its own word, e.g. 'economy , is strong .')",
                            len(unknown), ds.name, UNK, ", ".join(repr(w) for w in unknown))
        print(prompt, end="", flush=True)
        sep = " " if ds.unit == "word" else ""
        text_of = ds.vocab.stream_decoder()
        new = generate(ecfg, params, ids, max_new_tokens=max_new_tokens, temperature=temperature,
                       top_p=top_p, seed=seed,
                       on_token=lambda t: print(sep + text_of(t), end="", flush=True))
        print(text_of(None), flush=True)
        return {"prompt": prompt, "continuation": ds.vocab.decode(list(new)), "ids": [int(t) for t in new],
                "seed": seed, "temperature": temperature, "top_p": top_p, "source": source}

    split = split or e.split
    tokens = ds.split(split)
    bs = batch_size or e.batch_size
    if mem_lens:
        lens = [int(m) for m in mem_lens]
        results = memory_sweep(ecfg, params, tokens, lens, batch_size=bs, max_tokens=max_tokens)
        rows = [{"mem_len": m, **r.to_dict(ds.unit)} for m, r in results]
        res = {"source": source, "split": split, "dataset": ds.name, "unit": ds.unit,
               "trained_mem_len": cfg.mem_len, "sweep": rows}
        # --output is the JSON's path; the plot goes next to it (".json" replaced by / plus ".png")
        json_path = output or os.path.join(out_dir, f"eval_{split}_memsweep.json")
        png_path = (json_path[:-5] if json_path.endswith(".json") else json_path) + ".png"
        with open(json_path, "w") as f:
            json.dump(res, f, indent=2)
        metric = "ppl" if ds.unit == "word" else "bpc"
        res["plot"] = plot_xy({cfg.memory: ([r["mem_len"] for r in rows], [r[metric] for r in rows])},
                              png_path, "evaluation mem_len", f"{split} {metric}",
                              title=f"memory-length sweep (trained with mem_len {cfg.mem_len})", logx=True)
        res["json"] = json_path
        for r in rows:
            print(f"mem_len {r['mem_len']:6d}: loss {r['loss']:.4f} {headline(r['loss'], ds.unit)}",
                  file=sys.stderr)
        return res

    r = evaluate_tokens(ecfg, params, tokens, batch_size=bs, max_tokens=max_tokens)
    res = {"source": source, "split": split, "dataset": ds.name, **r.to_dict(ds.unit)}
    path = output or os.path.join(out_dir, f"eval_{split}.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=2)
    res["json"] = path
    print(f"{split}: loss {r.loss:.4f} {headline(r.loss, ds.unit)} over {r.n_targets} targets",
          file=sys.stderr)
    return res
