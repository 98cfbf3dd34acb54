"""End to end: training lowers the loss, resume is exact, eval equals score, sweep, generation."""

import importlib
import json
import os
import re

import jax
import numpy as np
import pytest

import lamemo_jax
from lamemo_jax import ModelConfig
from lamemo_jax import data as data_lib
from lamemo_jax.evaluate import evaluate_tokens, generate
from lamemo_jax.evaluate_cli import run as eval_run
from lamemo_jax.metrics import read_metrics
from lamemo_jax.trainer import TrainingError, load_run, train_and_evaluate, workdir_lock


def tiny_config(**train):
    c = importlib.import_module("configs.tiny").get_config()
    c.train.update(train)
    return c


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("tiny"))
    summary = train_and_evaluate(tiny_config(log_every=1), workdir)
    return workdir, summary


def test_training_lowers_the_loss_and_writes_everything(tiny_run):
    workdir, summary = tiny_run
    recs = [r for r in read_metrics(os.path.join(workdir, "metrics.jsonl")) if r["split"] == "train"]
    assert len(recs) == 30
    for key in ("step", "loss", "bpc", "learning_rate", "grad_norm", "tokens_per_sec", "step_time_s"):
        assert key in recs[0], key
    first, last = np.mean([r["loss"] for r in recs[:5]]), np.mean([r["loss"] for r in recs[-5:]])
    assert last < first - 0.2, (first, last)
    valid = [r for r in read_metrics(os.path.join(workdir, "metrics.jsonl")) if r["split"] == "valid"]
    assert valid and "bpc" in valid[-1]
    assert os.path.exists(summary["plot"]) and os.path.getsize(summary["plot"]) > 1000
    assert os.listdir(os.path.join(workdir, "tensorboard"))
    assert summary["step"] == 30 and os.path.isdir(summary["checkpoint"])
    from lamemo_jax.cli import print_train_summary  # what train.py prints: every path above
    import contextlib, io
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_train_summary(summary)
    for path in (summary["checkpoint"], os.path.join(workdir, "metrics.jsonl"),
                 os.path.join(workdir, "tensorboard"), summary["plot"]):
        assert path in out.getvalue(), path


def test_throughput_windows_leave_out_evaluation_and_checkpoint_time(tmp_path, monkeypatch):
    """A window's step time (hence tokens/s and MFU) counts training only: each validation and
    checkpoint here takes 1000 s on the trainer's clock and no window may include them."""
    import time as real_time
    from lamemo_jax import trainer
    offset = [0.0]
    clock = type("Clock", (), {"time": staticmethod(lambda: real_time.time() + offset[0])})
    monkeypatch.setattr(trainer, "time", clock)
    for name in ("evaluate_tokens", "write_manifest"):
        mod = trainer if name == "evaluate_tokens" else importlib.import_module("lamemo_jax.checkpoint")
        real = getattr(mod, name)
        def slow(*a, _real=real, **k):
            offset[0] += 1000.0
            return _real(*a, **k)
        monkeypatch.setattr(mod, name, slow)
    train_and_evaluate(tiny_config(num_steps=20, log_every=4, eval_every=6, checkpoint_every=6,
                                   eval_tokens=200), str(tmp_path))
    recs = [r for r in read_metrics(os.path.join(str(tmp_path), "metrics.jsonl")) if r["split"] == "train"]
    assert [r["step"] for r in recs] == [4, 8, 12, 16, 20] and offset[0] >= 6000  # 3 evals, 3 saves
    assert all(r["step_time_s"] < 100 for r in recs), [r["step_time_s"] for r in recs]


def _fingerprint(params):
    return float(np.asarray(jax.tree.leaves(params)[0], np.float64).sum())


@pytest.mark.parametrize("best_wins", [True, False])
def test_the_test_split_is_scored_on_the_best_valid_model(tmp_path, monkeypatch, best_wins):
    """As the original (checkpoint_best.pt): the model tested is the one with the lowest
    validation loss. Here the step-10 model's validation loss is made 5 nats lower (or not) by
    wrapping the trainer's evaluation; everything else is real."""
    from lamemo_jax import trainer
    real, marked = trainer.evaluate_tokens, []

    def evaluate(cfg, params, tokens, **kw):
        res = real(cfg, params, tokens, **kw)
        is_valid = tokens.shape == valid.shape and np.array_equal(tokens, valid)
        if best_wins and is_valid and (not marked or _fingerprint(params) == marked[0]):
            marked[:1] = [_fingerprint(params)]  # the first validation: step 10
            res = type(res)(**{**res.__dict__, "loss": res.loss - 5.0})
        return res
    monkeypatch.setattr(trainer, "evaluate_tokens", evaluate)
    config = tiny_config(num_steps=30, eval_every=10, eval_tokens=200, checkpoint_every=100,
                         keep_checkpoints=1)
    config.eval.split = "test"
    valid = np.asarray(data_lib.load(config.data).split("valid"))
    workdir = str(tmp_path)
    summary = train_and_evaluate(config, workdir)
    recs = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    test = [r for r in recs if r["split"] == "test"]
    assert len(test) == 1 and summary["step"] == 30
    monkeypatch.undo()
    best_dir = os.path.join(workdir, "best")
    tested = json.load(open(os.path.join(workdir, "tested.json")))["step"]
    if best_wins:
        assert summary["tested_step"] == tested == 10 and test[0]["model_step"] == 10 and test[0]["step"] == 30
        assert "10" in os.listdir(best_dir)  # the step-10 checkpoint itself is rotated out
        _, cfg, params, step = load_run(workdir)  # the model the test used
        assert step == 10 and _fingerprint(params) == marked[0]
        assert _fingerprint(load_run(workdir, 10)[2]) == marked[0]
        assert _fingerprint(load_run(workdir, 30)[2]) != marked[0]
    else:  # the final model won: it is kept as the best too (a candidate if the run goes on)
        assert summary["tested_step"] == tested == 30 and test[0]["model_step"] == test[0]["step"] == 30
        assert "30" in os.listdir(best_dir) and load_run(workdir)[3] == 30
    res = eval_run(workdir=workdir, split="test")  # eval.py scores the same model
    assert abs(res["loss"] - summary["eval_loss"]) <= 1e-6
    assert res["source"] == os.path.join(workdir, "best", str(summary["tested_step"]))


def test_a_best_valid_model_past_the_resumed_step_is_dropped(tmp_path, caplog):
    """A crashed run can leave a best-valid model of a step after its last checkpoint; the
    resumed run re-trains those steps, so that model is not its own and must not be tested."""
    workdir = str(tmp_path)
    config = tiny_config(num_steps=10, eval_every=5, eval_tokens=200, checkpoint_every=3,
                         keep_checkpoints=10)
    train_and_evaluate(config, workdir)
    from lamemo_jax.checkpoint import Checkpointer
    ckpt, best = (Checkpointer(os.path.join(workdir, d), keep=10) for d in ("checkpoints", "best"))
    state = ckpt.restore_latest(None)  # any state will do as the 'best' of step 7
    best.save(7, state[0]["params"], {"step": 7, "valid_loss": -1.0, "n_targets": 1})
    for s_ in ckpt.all_steps():
        if s_ > 6:
            ckpt.delete(s_)  # as if the run died after step 7's validation, before step 9's save
    ckpt.close(), best.close()
    with caplog.at_level("INFO"):
        summary = train_and_evaluate(config, workdir)
    assert "dropping the best-valid model of step 7 (after the resumed step 6)" in caplog.text
    assert summary["tested_step"] in (5, 10) and load_run(workdir)[3] in (5, 10)


def test_resume_is_bit_exact(tmp_path):
    full = str(tmp_path / "full")
    part = str(tmp_path / "part")
    train_and_evaluate(tiny_config(num_steps=12, log_every=1, checkpoint_every=100), full)
    train_and_evaluate(tiny_config(num_steps=6, log_every=1, checkpoint_every=100), part)  # "interrupted"
    with open(os.path.join(part, "metrics.jsonl"), "a") as f:  # logged after the last checkpoint, then a crash
        f.write(json.dumps({"step": 9, "split": "train", "loss": 123.0}) + "\n")
    train_and_evaluate(tiny_config(num_steps=12, log_every=1, checkpoint_every=100), part)  # resumed
    records = lambda d: read_metrics(os.path.join(d, "metrics.jsonl"))
    loss = lambda d: {r["step"]: r["loss"] for r in records(d) if r["split"] == "train"}
    a, b = loss(full), loss(part)
    assert [r["step"] for r in records(part) if r["split"] == "train"] == list(range(1, 13))  # once each
    # the same command on the finished run: nothing to train, its final evaluation re-done, not repeated
    summary = train_and_evaluate(tiny_config(num_steps=12, log_every=1, checkpoint_every=100), part)
    assert summary["step"] == 12
    assert [r["step"] for r in records(part) if r["split"] == "train"] == list(range(1, 13))
    assert [r["step"] for r in records(part) if r["split"] == "valid"].count(12) == 1
    assert [a[s] for s in range(7, 13)] == [b[s] for s in range(7, 13)]
    _, _, pa, _ = load_run(full)
    _, _, pb, _ = load_run(part)
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_second_trainer_on_same_workdir_refuses(tmp_path):
    with workdir_lock(str(tmp_path)):
        with pytest.raises(TrainingError, match="in use by another trainer"):
            train_and_evaluate(tiny_config(), str(tmp_path))


def test_eval_protocol_equals_score():
    cfg = ModelConfig(n_token=40, n_layer=2, n_head=2, d_model=16, d_head=8, d_inner=32, tgt_len=5,
                      mem_len=7, memory="lamemo", dtype="float64", param_dtype="float64")
    params = lamemo_jax.init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    bs, s = 4, 6
    flat = rng.integers(0, 40, bs * (s * 5 + 1)).astype(np.int32)
    res = evaluate_tokens(cfg, params, flat, batch_size=bs, chunk_segments=4)
    nll, _ = lamemo_jax.score(cfg, params, flat.reshape(bs, -1))
    assert res.n_targets == nll.size
    assert abs(res.loss - nll.mean()) <= 1e-12
    # a split whose last segment is shorter: the first S segments equal score, plus a 3-token tail
    flat2 = rng.integers(0, 40, bs * (s * 5 + 4)).astype(np.int32)
    res2 = evaluate_tokens(cfg, params, flat2, batch_size=bs)
    streams = flat2.reshape(bs, -1)
    nll_a, mem = lamemo_jax.score(cfg, params, streams[:, :s * 5 + 1])
    out, _ = lamemo_jax.apply(cfg, params, streams[:, s * 5:-1], mem, targets=streams[:, s * 5 + 1:])
    want = (nll_a.sum() + float(np.asarray(out.nll).sum())) / (bs * (s * 5 + 3))
    assert res2.n_targets == bs * (s * 5 + 3) and res2.protocol["last_segment_len"] == 3
    assert abs(res2.loss - want) <= 1e-12


def test_eval_cli_number_equals_score_and_sweep(tiny_run):
    workdir, _ = tiny_run
    exp, cfg, params, step = load_run(workdir)
    ds = data_lib.load(exp.data)
    bs, n = exp.eval.batch_size, cfg.tgt_len
    max_tokens = bs * (20 * n + 1)
    res = eval_run(workdir=workdir, split="valid", max_tokens=max_tokens, clamp_len=-1)
    streams = ds.split("valid")[:max_tokens].reshape(bs, -1)
    nll, _ = lamemo_jax.score(cfg, params, streams)
    assert abs(res["loss"] - float(nll.mean())) <= 1e-5
    assert json.load(open(res["json"]))["protocol"]["n_segments"] == 20
    sweep = eval_run(workdir=workdir, split="valid", max_tokens=max_tokens, mem_lens=["8", "16", "32"])
    assert [r["mem_len"] for r in sweep["sweep"]] == [8, 16, 32]
    assert os.path.getsize(sweep["plot"]) > 1000 and os.path.exists(sweep["json"])
    assert abs(sweep["sweep"][1]["loss"] - res["loss"]) <= 1e-5  # mem_len 16 is the trained one
    out = os.path.join(workdir, "my_sweep")  # --output: the JSON exactly there, the plot beside it
    again = eval_run(workdir=workdir, split="valid", max_tokens=bs * (2 * n + 1), mem_lens=["8"], output=out)
    assert again["json"] == out and json.load(open(out))["sweep"][0]["mem_len"] == 8
    assert again["plot"] == out + ".png" and os.path.exists(out + ".png")


def test_a_prompt_outside_the_vocabulary_is_a_clear_error(tiny_run):
    from lamemo_jax.config import ConfigError
    workdir, _ = tiny_run  # wiki_chars: lowercase letters and the space
    with pytest.raises(ConfigError, match=r"--prompt \(wiki_chars\): .*'H'.*lowercased prompt fits: --prompt='hello world'"):
        eval_run(workdir=workdir, prompt="Hello World")
    with pytest.raises(ConfigError, match=r"--prompt \(wiki_chars\): .*'6'") as err:
        eval_run(workdir=workdir, prompt="route 66")
    assert "lowercased" not in str(err.value)


@pytest.mark.parametrize("kw,flag", [
    (dict(tgt_len=0), "--tgt_len=0"), (dict(batch_size=0), "--batch_size=0"),
    (dict(mem_len=-1), "--mem_len=-1"), (dict(max_tokens=-5), "--max_tokens=-5"),
    (dict(mem_lens=["64", "x"]), "--mem_lens: 'x'"), (dict(mem_lens=["-8"]), "--mem_lens: '-8'"),
    (dict(max_new_tokens=-3), "--max_new_tokens=-3"), (dict(temperature=0.0), "--temperature=0.0"),
    (dict(top_p=1.5), "--top_p=1.5"),
    # flags the chosen mode would ignore
    (dict(config={"eval": {"batch_size": 4}}), "--config does not apply with --workdir"),
    (dict(torch_config="args.json"), "--torch_config does not apply with --workdir"),
    (dict(workdir=None, torch_config="args.json"), "--torch_config needs --torch_checkpoint"),
    (dict(torch_checkpoint="model.pt", step=3), "--step does not apply with --torch_checkpoint"),
    (dict(prompt="the", mem_lens=["8"]), "--mem_lens does not apply with --prompt"),
    (dict(prompt="the", max_tokens=100), "--max_tokens does not apply with --prompt"),
    (dict(prompt="the", split="valid"), "--split does not apply with --prompt"),
    (dict(prompt="the", output="out.json"), "--output does not apply with --prompt"),
    (dict(mem_lens=["8"], mem_len=4), "--mem_len does not apply with --mem_lens"),
])
def test_bad_eval_flags_are_errors_naming_the_flag(kw, flag):
    """Never a silent default (0 meant "the config's" for --tgt_len) or a silent no-op."""
    from lamemo_jax.config import ConfigError
    with pytest.raises(ConfigError, match=re.escape(flag)):
        eval_run(**{"workdir": "/nonexistent", **kw})  # checked before anything is loaded


def test_generation_flags_without_a_prompt_are_errors():
    import subprocess, sys
    from tests.conftest import ROOT
    r = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "--workdir=/nonexistent",
                        "--temperature=0.5", "--seed=3"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 2 and "error: --temperature, --seed only apply with --prompt" in r.stderr


def test_words_a_prompt_reads_as_unk_are_named():
    from lamemo_jax.data.vocab import Vocab
    from lamemo_jax.evaluate_cli import unknown_words
    vocab = Vocab("word", ("<eos>", "<unk>", "The", "economy", "is", ",", "."))
    assert unknown_words(vocab, "The economy, is strong .") == ["economy,", "strong"]
    assert unknown_words(vocab, "The <unk> is .") == []
    assert unknown_words(Vocab("char", ("a", "_")), "a a") == []


def test_output_folder_is_made_first_and_the_sweep_plot_keeps_mem_len_0(tiny_run, monkeypatch):
    """--output into a folder that does not exist yet works (it failed after all the work), and a
    sweep from mem_len 0 is plotted on a symmetric-log axis (a log axis drops x = 0)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.axes
    workdir, _ = tiny_run
    scales, real = [], matplotlib.axes.Axes.set_xscale
    monkeypatch.setattr(matplotlib.axes.Axes, "set_xscale",
                        lambda self, value, **k: (scales.append(value), real(self, value, **k))[1])
    out = os.path.join(workdir, "new", "folder", "sweep.json")
    res = eval_run(workdir=workdir, split="valid", max_tokens=4 * (2 * 16 + 1), mem_lens=["0", "8"], output=out)
    assert res["json"] == out and os.path.exists(out) and [r["mem_len"] for r in res["sweep"]] == [0, 8]
    assert scales == ["symlog"] and os.path.getsize(res["plot"]) > 1000
    eval_run(workdir=workdir, split="valid", max_tokens=4 * (2 * 16 + 1), mem_lens=["4", "8"], output=out)
    assert scales == ["symlog", "log"]


def test_generation_is_deterministic_and_follows_the_prompt(tiny_run):
    workdir, _ = tiny_run
    _, cfg, params, _ = load_run(workdir)
    prompt = np.arange(1, 20, dtype=np.int32) % cfg.n_token
    a = generate(cfg, params, prompt, max_new_tokens=12, seed=3)
    b = generate(cfg, params, prompt, max_new_tokens=12, seed=3)
    c = generate(cfg, params, prompt, max_new_tokens=12, seed=4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c) and a.min() >= 0 and a.max() < cfg.n_token
    out = eval_run(workdir=workdir, prompt="the history of ", max_new_tokens=8, seed=1)
    assert len(out["ids"]) == 8


def test_greedy_generation_equals_one_pass_argmax():
    """XL with mem_len >= the whole text: streaming segment by segment and one token at a time
    gives the argmax continuation of a single forward pass over prompt + continuation."""
    cfg = ModelConfig(n_token=30, n_layer=2, n_head=2, d_model=16, d_head=8, d_inner=32, tgt_len=4,
                      mem_len=64, memory="xl", dtype="float64", param_dtype="float64")
    params = lamemo_jax.init_params(cfg, jax.random.key(1))
    params = jax.tree.map(lambda x: x * 20.0, params)  # sharpen so that argmax is well separated
    prompt = np.array([3, 1, 4, 1, 5, 9, 2], np.int32)
    new = generate(cfg, params, prompt, max_new_tokens=6, top_p=1e-9)
    seq = np.concatenate([prompt, new])
    mem = lamemo_jax.init_memory(cfg.replace(mem_len=0), 1)
    out, _ = lamemo_jax.apply(cfg.replace(mem_len=0), params, seq[None, :-1], mem)
    greedy = np.asarray(out.log_probs[0]).argmax(-1)[len(prompt) - 1:]
    np.testing.assert_array_equal(new, greedy)


def test_grad_accumulation_equals_the_full_batch():
    """grad_accum_steps=k processes the batch as k chunks of rows (each with its memory rows);
    the update equals the full-batch one up to float32 round-off."""
    from lamemo_jax.experiment import ExperimentConfig
    from lamemo_jax.trainer import init_train_state, make_optimizer, make_train_step
    exp = ExperimentConfig.from_config_dict(tiny_config(batch_size=4))
    cfg = exp.model.replace(dropout=0.0)
    x = jax.numpy.asarray(np.random.default_rng(0).integers(0, cfg.n_token, (4, cfg.tgt_len)), jax.numpy.int32)
    sos = jax.numpy.zeros((4,), bool)
    out = {}
    for k in (1, 2):
        tc = exp.train.__class__(**{**exp.train.__dict__, "grad_accum_steps": k})
        opt = make_optimizer(tc)
        state = init_train_state(cfg, tc, opt, 4)
        step = jax.jit(make_train_step(cfg, tc, opt))
        for _ in range(2):  # the second step also checks the carried memory rows
            state, m = step(state, x, x, sos)
        out[k] = (float(m["loss"]), state)
    assert abs(out[1][0] - out[2][0]) <= 1e-5
    for a, b in zip(jax.tree.leaves(out[1][1].params), jax.tree.leaves(out[2][1].params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5)
    for a, b in zip(jax.tree.leaves(out[1][1].memory), jax.tree.leaves(out[2][1].memory)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5)
