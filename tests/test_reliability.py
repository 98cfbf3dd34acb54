"""Reliability: signals, hard kills, corrupted checkpoints, NaN guard, clear errors, determinism."""

import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lamemo_jax.checkpoint import MANIFEST, Checkpointer, CheckpointError
from lamemo_jax.config import ConfigError
from lamemo_jax.experiment import ExperimentConfig
from lamemo_jax.metrics import read_metrics
from lamemo_jax.trainer import (TrainingError, advance_schedule, init_train_state, make_optimizer,
                                make_train_step, train_and_evaluate)
from tests.conftest import ROOT


def tiny(**train):
    c = importlib.import_module("configs.tiny").get_config()
    c.train.update(train)
    return c


def train_cmd(workdir, *overrides):
    return [sys.executable, os.path.join(ROOT, "train.py"), "--config", os.path.join(ROOT, "configs/tiny.py"),
            f"--workdir={workdir}", *overrides]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _wait_for_steps(workdir, n, proc, timeout=240):
    t0 = time.time()
    path = os.path.join(workdir, "metrics.jsonl")
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited early with {proc.returncode}: {proc.stderr.read()[-3000:]}")
        steps = [r["step"] for r in read_metrics(path) if r.get("split") == "train" and "loss" in r] \
            if os.path.exists(path) else []
        if len(steps) >= n:
            return steps
        time.sleep(0.2)
    raise AssertionError("trainer made no progress")


def test_sigterm_saves_and_exits_zero_then_resumes(tmp_path):
    wd = str(tmp_path / "run")
    args = ["--config.train.num_steps=100000", "--config.train.log_every=1",
            "--config.train.checkpoint_every=100000", "--config.train.eval_tokens=500"]
    p = subprocess.Popen(train_cmd(wd, *args), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_steps(wd, 3, p)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=240)
    assert p.returncode == 0, err[-3000:]
    assert "received SIGTERM: saved checkpoint" in out
    steps = Checkpointer(os.path.join(wd, "checkpoints")).all_steps()
    assert len(steps) == 1 and steps[0] >= 3
    # restarting the same command resumes from there (num_steps reached right after one more step)
    r = subprocess.run(train_cmd(wd, f"--config.train.num_steps={steps[0] + 2}", "--config.train.log_every=1",
                                 "--config.train.eval_tokens=500"),
                       env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"starting at step {steps[0]}" in r.stderr
    assert f"step:       {steps[0] + 2}" in r.stdout


@pytest.mark.parametrize("when", ["evaluation", "save"])
def test_a_signal_after_the_last_step_stops_the_final_evaluation_and_exits_zero(tmp_path, monkeypatch, when):
    """SIGTERM/SIGINT save and exit 0 at any time: after the final checkpoint, a signal stops the
    (possibly long) final evaluations at once instead of killing the process (exit 143)."""
    from lamemo_jax import checkpoint, trainer
    real = {"evaluation": trainer.evaluate_tokens, "save": checkpoint.write_manifest}[when]

    def signalling(*a, **k):
        if when == "evaluation" or os.path.basename(a[0]) == "6":  # the final save: step 6
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)
    monkeypatch.setattr(trainer if when == "evaluation" else checkpoint,
                        "evaluate_tokens" if when == "evaluation" else "write_manifest", signalling)
    wd = str(tmp_path)
    summary = train_and_evaluate(tiny(num_steps=6, checkpoint_every=3), wd)
    assert summary["interrupted"] == "SIGTERM" and "valid_loss" not in summary
    assert Checkpointer(os.path.join(wd, "checkpoints")).all_steps() == [3, 6]
    from lamemo_jax.trainer import load_run
    assert not os.path.exists(os.path.join(wd, "tested.json")) and load_run(wd)[3] == 6  # the latest
    monkeypatch.undo()
    again = train_and_evaluate(tiny(num_steps=6, checkpoint_every=3), wd)  # the evaluation, re-done
    assert "interrupted" not in again and np.isfinite(again["valid_loss"])
    assert json.load(open(os.path.join(wd, "tested.json"))) == {"step": 6}
    assert len([r for r in read_metrics(os.path.join(wd, "metrics.jsonl")) if r["split"] == "valid"]) == 1


def test_a_signal_once_the_run_is_complete_only_sets_the_flag(tmp_path, monkeypatch):
    """After the final evaluations (the metrics writer closing), a signal must not escape as an
    exception: the run is complete and exits 0."""
    from lamemo_jax import metrics
    real = metrics.MetricWriter.close

    def close(self):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(self)
    monkeypatch.setattr(metrics.MetricWriter, "close", close)
    summary = train_and_evaluate(tiny(num_steps=3), str(tmp_path))
    assert "interrupted" not in summary and np.isfinite(summary["valid_loss"])


def test_a_cut_metrics_line_does_not_block_the_resume(tmp_path, caplog):
    wd = str(tmp_path)
    train_and_evaluate(tiny(num_steps=10, log_every=5), wd)
    path = os.path.join(wd, "metrics.jsonl")
    with open(path, "a") as f:
        f.write('{"bpc": 4.1, "epoch": 0, "gra')  # what a kill or a full disk leaves mid-append
    with caplog.at_level("WARNING"):
        summary = train_and_evaluate(tiny(num_steps=15, log_every=5), wd)
    assert summary["step"] == 15 and "its last line is incomplete" in caplog.text and path in caplog.text
    recs = read_metrics(path)
    assert [r["step"] for r in recs if r["split"] == "train"] == [5, 10, 15]
    assert open(path).read().endswith("}\n")  # the cut line is gone
    lines = open(path).read().splitlines(True)
    lines[1] = "not json\n"  # damage inside the file is an error naming file and line
    open(path, "w").write("".join(lines))
    with pytest.raises(ValueError, match=f"{path}: line 2 is not a JSON record"):
        read_metrics(path)


def test_evaluation_settings_that_cannot_run_fail_before_training(tmp_path):
    """Not at the first evaluation, hours later: before any step, naming the setting."""
    train_and_evaluate(tiny(num_steps=3, eval_every=3, eval_tokens=5), str(tmp_path / "ok"))  # never run
    for train, evaluation, match in (({"eval_every": 5, "eval_tokens": 5}, {}, "train.eval_tokens=5"),
                                     ({}, {"batch_size": 100_000}, "eval.batch_size=100000")):
        c = tiny(**train)
        c.eval.update(evaluation)
        wd = str(tmp_path / match.split("=")[0])
        with pytest.raises(ConfigError, match=match):
            train_and_evaluate(c, wd)
        assert not os.path.exists(os.path.join(wd, "checkpoints", "0")) and not os.path.exists(
            os.path.join(wd, "metrics.jsonl"))


def test_a_mistyped_config_override_is_one_line_naming_it(tmp_path):
    r = subprocess.run(train_cmd(str(tmp_path), "--config.train.batch_siez=4"), env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr[-2000:]
    assert "--config.train.batch_siez" in r.stderr and 'Did you mean "batch_size"' in r.stderr
    buggy = tmp_path / "buggy.py"  # a bug inside a config file is not blamed on a valid override
    buggy.write_text("import importlib\n\ndef get_config():\n"
                     "    c = importlib.import_module('configs.tiny').get_config()\n"
                     "    c.train.lr_schedule.warmup = 3\n    return c\n")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), f"--config={buggy}",
                        f"--workdir={tmp_path / 'w'}", "--config.train.num_steps=3"], env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "Traceback" in r.stderr and "lr_schedule" in r.stderr
    assert "error: --config.train.num_steps" not in r.stderr


def test_a_damaged_run_record_is_an_error_naming_it(tmp_path):
    wd = str(tmp_path)
    train_and_evaluate(tiny(num_steps=3), wd)
    path = os.path.join(wd, "config.json")
    text = open(path).read()
    from lamemo_jax.trainer import load_run
    open(path, "w").write(text[:200])
    with pytest.raises(CheckpointError, match=f"{path} is unreadable"):
        load_run(wd)
    open(path, "w").write("{}")
    with pytest.raises(ConfigError, match=f"{path}: the run record has no model, data, train, eval, mesh"):
        load_run(wd)
    train_and_evaluate(tiny(num_steps=3), wd)  # the trainer rewrites it
    assert load_run(wd)[3] == 3


def test_sigkill_at_any_moment_resumes_from_last_complete_checkpoint(tmp_path):
    wd = str(tmp_path / "run")
    args = ["--config.train.num_steps=100000", "--config.train.log_every=1",
            "--config.train.checkpoint_every=1", "--config.train.keep_checkpoints=2"]
    p = subprocess.Popen(train_cmd(wd, *args), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_steps(wd, 4, p)
    time.sleep(0.37)  # checkpoints every step: a kill now very likely hits a write
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=60)
    ck = Checkpointer(os.path.join(wd, "checkpoints"))
    good = [s for s in ck.all_steps() if os.path.exists(os.path.join(ck.step_dir(s), MANIFEST))]
    assert good
    # simulate the worst case too: the newest step directory is a partial write (no manifest)
    partial = ck.step_dir(max(ck.all_steps()) + 1)
    shutil.copytree(ck.step_dir(good[-1]), partial)
    os.remove(os.path.join(partial, MANIFEST))
    ck.close()
    r = subprocess.run(train_cmd(wd, f"--config.train.num_steps={good[-1] + 3}", "--config.train.log_every=1",
                                 "--config.train.checkpoint_every=1", "--config.train.eval_tokens=500"),
                       env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "is unusable" in r.stderr and f"starting at step {good[-1]}" in r.stderr


def _state_and_ckpt(tmp_path):
    exp = ExperimentConfig.from_config_dict(tiny())
    opt = make_optimizer(exp.train)
    state = init_train_state(exp.model, exp.train, opt, 2)
    ck = Checkpointer(str(tmp_path / "ck"), keep=5)
    return exp, state, ck


def test_corrupted_checkpoint_falls_back_with_a_warning(tmp_path, caplog):
    exp, state, ck = _state_and_ckpt(tmp_path)
    ck.save(1, state, {"step": 1})
    ck.save(2, state.replace(step=jnp.int32(2)), {"step": 2})
    abstract = jax.eval_shape(lambda: state)
    # flip bytes in the largest file of the newest checkpoint
    files = [os.path.join(r, f) for r, _, fs in os.walk(ck.step_dir(2)) for f in fs if f != MANIFEST]
    big = max(files, key=os.path.getsize)
    raw = bytearray(open(big, "rb").read())
    raw[len(raw) // 2] ^= 0xFF
    open(big, "wb").write(bytes(raw))
    with caplog.at_level("WARNING"):
        restored, meta, step = ck.restore_latest(abstract)
    assert step == 1 and meta["step"] == 1
    assert any(ck.step_dir(2) in rec.getMessage() and "sha256" in rec.getMessage() for rec in caplog.records)
    # files removed from the only other one: no good checkpoint left -> one clear error
    shutil.rmtree(os.path.join(ck.step_dir(1), "state"))
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        ck.restore_latest(abstract)


def test_a_save_killed_before_its_manifest_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    """Retention runs after the new step verifies: with keep=1, a kill while the new step's
    manifest is being written must not have deleted the only good checkpoint already."""
    exp = ExperimentConfig.from_config_dict(tiny())
    state = init_train_state(exp.model, exp.train, make_optimizer(exp.train), 2)
    ck = Checkpointer(str(tmp_path / "ck"), keep=1)
    ck.save(1, state, {"step": 1})
    ck.save(2, state.replace(step=jnp.int32(2)), {"step": 2})
    assert ck.all_steps() == [2]  # keep=1 still keeps one

    def killed(step_dir):
        raise KeyboardInterrupt("killed while hashing")  # like SIGKILL: nothing after it runs
    monkeypatch.setattr("lamemo_jax.checkpoint.write_manifest", killed)
    with pytest.raises(KeyboardInterrupt):
        ck.save(3, state.replace(step=jnp.int32(3)), {"step": 3})
    ck.close()
    monkeypatch.undo()
    reopened = Checkpointer(str(tmp_path / "ck"), keep=1)
    assert reopened.all_steps() == [2, 3]
    restored, meta, step = reopened.restore_latest(jax.eval_shape(lambda: state))
    assert step == 2 and meta["step"] == 2 and int(restored.step) == 2
    reopened.save(4, state.replace(step=jnp.int32(4)), {"step": 4})  # the next save tidies up
    assert reopened.all_steps() == [4]
    reopened.close()
    with pytest.raises(ValueError, match="keep=0"):
        Checkpointer(str(tmp_path / "ck"), keep=0)


def test_read_only_reader_skips_an_unverified_checkpoint_and_moves_nothing(tmp_path, caplog):
    """eval.py beside a live trainer: the newest checkpoint may still lack its manifest (the
    trainer is hashing it). The reader must use the previous one and leave the directory alone."""
    exp, state, ck = _state_and_ckpt(tmp_path)
    ck.save(1, state, {"step": 1})
    ck.save(2, state.replace(step=jnp.int32(2)), {"step": 2})
    os.remove(os.path.join(ck.step_dir(2), MANIFEST))  # as during the trainer's manifest write
    ck.close()
    before = sorted(os.listdir(tmp_path))
    reader = Checkpointer(str(tmp_path / "ck"), read_only=True)
    with caplog.at_level("WARNING"):
        _, meta, step = reader.restore_latest(jax.eval_shape(lambda: state))
    assert step == 1 and meta["step"] == 1
    assert any(reader.step_dir(2) in r.getMessage() and MANIFEST in r.getMessage() for r in caplog.records)
    assert sorted(os.listdir(tmp_path)) == before  # no checkpoints_corrupt/, nothing moved
    assert os.path.isdir(reader.step_dir(2)) and reader.all_steps() == [1, 2]
    with pytest.raises(CheckpointError, match="read-only"):
        reader.save(3, state, {"step": 3})
    reader.close()


def test_load_run_beside_a_trainer_leaves_its_checkpoints_in_place(tmp_path):
    from lamemo_jax.trainer import load_run
    wd = str(tmp_path / "run")
    train_and_evaluate(tiny(num_steps=4, checkpoint_every=2), wd)
    ckdir = os.path.join(wd, "checkpoints")
    os.remove(os.path.join(ckdir, "4", MANIFEST))  # the trainer is still hashing step 4
    os.remove(os.path.join(wd, "tested.json"))  # and (live) has not tested a model yet
    assert load_run(wd)[3] == 2
    assert os.path.isdir(os.path.join(ckdir, "4")) and not os.path.exists(ckdir + "_corrupt")


def test_resume_with_changed_settings_warns_naming_them(tmp_path, caplog):
    """A resume may change bookkeeping silently (more steps of a constant schedule, logging),
    but a change that makes it diverge from the run it continues is named in a warning."""
    wd = str(tmp_path / "run")
    train_and_evaluate(tiny(num_steps=2), wd)
    with caplog.at_level("WARNING"):
        train_and_evaluate(tiny(num_steps=3, log_every=1), wd)
    assert not any("differ from the run" in r.getMessage() for r in caplog.records)
    caplog.clear()
    c = tiny(num_steps=4, seed=5)
    c.model.tgt_len = 8
    with caplog.at_level("WARNING"):
        train_and_evaluate(c, wd)
    msgs = [r.getMessage() for r in caplog.records if "differ from the run" in r.getMessage()]
    assert len(msgs) == 1, msgs
    assert "model.tgt_len: 16 -> 8" in msgs[0] and "train.seed: 0 -> 5" in msgs[0]
    assert "num_steps" not in msgs[0] and "log_every" not in msgs[0]


def test_a_kernel_forced_where_it_cannot_run_is_a_one_line_error(capsys):
    """attention_impl='pallas' on a CPU: the entry points print the message and exit 2, as for
    every other configuration error (not a traceback and exit 1)."""
    from kernels import KernelUnavailableError
    from lamemo_jax import cli
    def fails():
        raise KernelUnavailableError("ModelConfig.attention_impl='pallas' needs a GPU or TPU backend")
    with pytest.raises(SystemExit) as e:
        cli.run_reporting_errors(fails)
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: ModelConfig.attention_impl='pallas' needs a GPU or TPU backend\n"


def test_nonfinite_step_is_skipped_and_counted():
    exp = ExperimentConfig.from_config_dict(tiny())
    cfg, tc = exp.model, exp.train
    opt = make_optimizer(tc)
    state = init_train_state(cfg, tc, opt, 2)
    step = jax.jit(make_train_step(cfg, tc, opt))
    x = jnp.asarray(np.random.default_rng(0).integers(0, cfg.n_token, (2, cfg.tgt_len)), jnp.int32)
    sos = jnp.zeros((2,), bool)
    good, m = step(state, x, x, sos)
    assert bool(m["finite"]) and int(good.nonfinite_streak) == 0
    bad_params = jax.tree.map(lambda p: p.at[...].set(jnp.nan) if p.ndim == 2 else p, good.params)
    bad = good.replace(params=bad_params)
    after, m = step(bad, x, x, sos)
    assert not bool(m["finite"]) and int(after.nonfinite_streak) == 1
    # Adam's moments and count stay; the learning-rate schedule moves on with the step (as the
    # original's scheduler does), so later updates use the lr that the metrics log
    for a, b in zip(jax.tree.leaves(after.opt_state), jax.tree.leaves(advance_schedule(bad.opt_state))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    is_schedule = lambda x: isinstance(x, optax.ScaleByScheduleState)
    count = lambda st: [int(x.count) for x in jax.tree.leaves(st, is_leaf=is_schedule) if is_schedule(x)]
    adam_count = lambda st: [int(x.count) for x in jax.tree.leaves(
        st, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState)) if isinstance(x, optax.ScaleByAdamState)]
    assert count(good.opt_state) == [1] and count(after.opt_state) == [2] == [int(after.step)]
    assert adam_count(after.opt_state) == adam_count(good.opt_state) == [1]
    assert float(jnp.abs(after.memory.embed).sum()) == 0.0  # memory cleared


def test_consecutive_nonfinite_steps_stop_the_run(tmp_path):
    wd = str(tmp_path / "nan")
    # an absurd learning rate blows the params up after the first update
    with pytest.raises(TrainingError, match="consecutive steps with a non-finite"):
        train_and_evaluate(tiny(learning_rate=1e30, clip=0.0, max_consecutive_nonfinite=3,
                                num_steps=50, checkpoint_every=100), wd)
    recs = read_metrics(os.path.join(wd, "metrics.jsonl"))
    assert any(r.get("nonfinite") for r in recs)


def test_same_seed_same_losses_other_seed_differs(tmp_path):
    losses = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        wd = str(tmp_path / name)
        train_and_evaluate(tiny(num_steps=5, log_every=1, seed=seed), wd)
        losses[name] = [r["loss"] for r in read_metrics(os.path.join(wd, "metrics.jsonl")) if r["split"] == "train"]
    assert losses["a"] == losses["b"]
    assert losses["a"] != losses["c"]


def test_clear_errors_for_bad_input(tmp_path):
    c = tiny()
    c.model.n_token = 50
    with pytest.raises(ConfigError, match="n_token=50.*27"):
        train_and_evaluate(c, str(tmp_path / "a"))
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "file").write_text("x")
    with pytest.raises(TrainingError, match="not writable"):
        train_and_evaluate(tiny(), str(ro / "file" / "sub"))
    # a checkpoint from an incompatible config
    wd = str(tmp_path / "b")
    train_and_evaluate(tiny(num_steps=2), wd)
    c = tiny(num_steps=4)
    c.model.d_model = 48
    c.model.d_head = 24
    saved_config = open(os.path.join(wd, "config.json")).read()
    with pytest.raises(CheckpointError, match="d_model: checkpoint 32 vs config 48"):
        train_and_evaluate(c, wd)
    c = tiny(num_steps=4, batch_size=8)  # the carried memory has one row per batch row
    with pytest.raises(CheckpointError, match="train.batch_size: checkpoint 4 vs config 8"):
        train_and_evaluate(c, wd)
    # a refused resume leaves the run as it was: eval.py still loads it
    assert open(os.path.join(wd, "config.json")).read() == saved_config
    from lamemo_jax.trainer import load_run
    assert load_run(wd)[1].d_model == 32
    r = subprocess.run(train_cmd(str(tmp_path / "c"), "--config.train.batch_siez=3"), env=_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "batch_siez" in r.stderr


@pytest.mark.parametrize("coordinator,num_processes,process_id", [
    (None, 2, 0), (None, None, 1), (None, 2, None), ("127.0.0.1:1234", None, 0), ("127.0.0.1:1234", 2, None)])
def test_explicit_multi_process_flags_go_together(coordinator, num_processes, process_id):
    """train.py's --coordinator_address / --num_processes / --process_id: a partial set is an
    error (--num_processes alone had been ignored: a silent single-process run)."""
    from lamemo_jax.sharding import initialize_distributed
    with pytest.raises(ConfigError, match="go together"):
        initialize_distributed(coordinator, num_processes, process_id, auto=False)


def test_disk_full_during_checkpoint_keeps_the_previous(tmp_path, monkeypatch):
    wd = str(tmp_path / "full")
    train_and_evaluate(tiny(num_steps=2), wd)
    import errno
    def no_space(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(Checkpointer, "save", no_space)
    with pytest.raises(TrainingError, match="No space left on device.*previous checkpoint is intact"):
        train_and_evaluate(tiny(num_steps=4, checkpoint_every=3), wd)
    monkeypatch.undo()
    ck = Checkpointer(os.path.join(wd, "checkpoints"))
    assert ck.all_steps() == [2]


def test_failed_checkpoint_write_names_the_previous_checkpoint(tmp_path, monkeypatch):
    """The write of step 3 leaves its directory behind and then fails: the error must name step
    2's checkpoint as the intact one, not the half-written step 3."""
    wd = str(tmp_path / "half")
    train_and_evaluate(tiny(num_steps=2), wd)
    real_save = Checkpointer.save
    import errno
    def fails_after_the_state(self, step, state, meta):
        real_save(self, step, state, meta)
        os.remove(os.path.join(self.step_dir(step), MANIFEST))
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(Checkpointer, "save", fails_after_the_state)
    with pytest.raises(TrainingError) as e:
        train_and_evaluate(tiny(num_steps=4, checkpoint_every=3), wd)
    msg = str(e.value)
    assert "step 3 failed" in msg
    assert msg.endswith("previous checkpoint is intact: " + os.path.join(wd, "checkpoints", "2")), msg
