"""Training: the jitted train step, the loop with logging, evaluation, checkpoints and resume.

``train_and_evaluate(config, workdir)`` is what ``train.py`` calls. Every step reads the batch
``TrainStream.batch(step)`` (a pure function of the step and seed), so the data position is the
step; the checkpoint holds params, optimizer state, step, RNG and the carried memory, and a
restarted run continues bit-exactly. SIGTERM / SIGINT finish the current step, save, flush and
exit 0. Non-finite losses or gradients skip the update (and clear the memory); too many in a row
stop the run with the last good checkpoint intact.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import sys
import time
from typing import Any, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lamemo_jax import sharding as shard_lib
from lamemo_jax.api import apply, init_params, out_of_vocab_id
from lamemo_jax.checkpoint import Checkpointer, CheckpointError
from lamemo_jax.config import ConfigError, ModelConfig
from lamemo_jax.evaluate import evaluate_tokens
from lamemo_jax.fileio import exclusive_lock, write_text_atomic
from lamemo_jax.flops import device_peak_flops, train_step_flops
from lamemo_jax.experiment import ExperimentConfig, TrainConfig, ignored_train_settings
from lamemo_jax.memory import LaMemoMemory, Memory, XLMemory, init_memory, reset_rows
from lamemo_jax.metrics import MetricWriter, headline, plot_loss_curves, read_metrics, unit_metrics


BEST = "best"  # <workdir>/best: the params of the best-valid models (BestValid)
TESTED = "tested.json"  # <workdir>/tested.json: the step of the model a finished run tested


class TrainingError(RuntimeError):
    """The run cannot continue (the message says why and what is intact)."""


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32: number of batches consumed (= the data position)
    params: Any
    opt_state: Any
    memory: Memory
    rng: jax.Array  # raw uint32 key data
    nonfinite_streak: jax.Array  # int32: consecutive skipped steps


# --------------------------------------------------------------------------- optimiser
def learning_rate_schedule(tc: TrainConfig) -> optax.Schedule:
    """Cosine from learning_rate to min_learning_rate, after an optional linear warmup that
    starts at lr / warmup_steps (not 0, which would make the first update zero).

    Without warmup (the paper's recipes) this is the original's lr_t = lr (1 + cos(pi t / T)) / 2
    with min_learning_rate as its eta_min. With warmup_steps = w the cosine runs over the
    remaining T - w steps, from lr at step w; the original instead takes its cosine at the
    absolute step after warmup (lr_w = lr (1 + cos(pi w / T)) / 2, not lr) and uses the full lr
    for update 0."""
    lr, total = tc.learning_rate, tc.num_steps
    if tc.schedule == "constant":
        main = optax.constant_schedule(lr)
    else:
        main = optax.cosine_decay_schedule(lr, max(total - tc.warmup_steps, 1),
                                           alpha=tc.min_learning_rate / lr)
    if not tc.warmup_steps:
        return main
    warm = optax.linear_schedule(lr / tc.warmup_steps, lr, tc.warmup_steps)
    return optax.join_schedules([warm, main], [tc.warmup_steps])


def advance_schedule(opt_state):
    """The optimizer state of a skipped (non-finite) step: the learning-rate schedule's count
    advances as the training step does, as the original steps its scheduler at every train_step
    whether or not the update was skipped; Adam's moments and its bias-correction count stay."""
    is_schedule = lambda x: isinstance(x, optax.ScaleByScheduleState)
    return jax.tree.map(
        lambda x: x._replace(count=optax.safe_int32_increment(x.count)) if is_schedule(x) else x,
        opt_state, is_leaf=is_schedule)


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    sched = learning_rate_schedule(tc)
    if tc.optimizer == "adam":
        opt = optax.adam(sched, b1=tc.b1, b2=tc.b2, eps=tc.eps)
    else:
        opt = optax.adamw(sched, b1=tc.b1, b2=tc.b2, eps=tc.eps, weight_decay=tc.weight_decay)
    return optax.chain(optax.clip_by_global_norm(tc.clip), opt) if tc.clip > 0 else opt


# --------------------------------------------------------------------------- memory <-> chunks
def _memory_batch_axes(memory: Memory):
    if isinstance(memory, XLMemory):
        return XLMemory(hidden=1, length=0)
    return LaMemoMemory(embed=0, attn=1, lse=1, length=0)


def split_batch(tree, axes, k: int):
    """[k, ...] stacked chunks of the batch dimension (contiguous rows per chunk)."""
    def one(x, ax):
        x = jnp.moveaxis(x, ax, 0)
        x = x.reshape((k, x.shape[0] // k) + x.shape[1:])
        return jnp.moveaxis(x, 1, ax + 1)
    return jax.tree.map(one, tree, axes)


def merge_batch(tree, axes):
    def one(x, ax):
        x = jnp.moveaxis(x, ax + 1, 1)
        x = x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])
        return jnp.moveaxis(x, 0, ax)
    return jax.tree.map(one, tree, axes)


# --------------------------------------------------------------------------- the step
def make_train_step(cfg: ModelConfig, tc: TrainConfig, optimizer: optax.GradientTransformation,
                    mesh=None):
    """(state, inputs [B,N], targets [B,N], start_of_sequence [B]) -> (state, metrics).

    ``mesh``: the mesh the step is jitted for; the step is traced under it so that the Pallas
    attention kernels run per device shard (shard_map) instead of on gathered operands.

    With ``grad_accum_steps = k`` the global batch is processed as k sequential chunks of B/k
    rows, each with its own rows of the memory (the original's ``batch_chunk``); the gradient is
    their mean, identical to the full batch up to float round-off.
    """
    k = tc.grad_accum_steps
    schedule = learning_rate_schedule(tc)

    def loss_fn(params, memory, inputs, targets, rng):
        out, new_memory = apply(cfg, params, inputs, memory, targets=targets, train=True, rng=rng)
        loss = jnp.mean(out.nll.astype(jnp.float32) if out.nll.dtype == jnp.bfloat16 else out.nll)
        objective = loss / 2.0 if tc.halve_loss else loss  # the original backprops (loss + 0) / 2
        return objective, (loss, new_memory)

    grad_fn = jax.value_and_grad(shard_lib.remat(loss_fn, tc.remat), has_aux=True)

    def step_fn(state: TrainState, inputs, targets, start_of_sequence):
        rng = jax.random.fold_in(state.rng, state.step)
        memory = reset_rows(state.memory, start_of_sequence)
        if k == 1:
            (_, (loss, new_memory)), grads = grad_fn(state.params, memory, inputs, targets, rng)
        else:
            axes = _memory_batch_axes(memory)
            chunks = (split_batch(memory, axes, k), split_batch(inputs, 0, k), split_batch(targets, 0, k))

            def body(acc, xs):
                mem_c, inp_c, tgt_c, idx = xs
                (_, (loss_c, mem_c)), g = grad_fn(state.params, mem_c, inp_c, tgt_c,
                                                  jax.random.fold_in(rng, idx))
                acc = jax.tree.map(lambda a, b: a + b / k, acc, (g, loss_c))
                return acc, mem_c

            zeros = (jax.tree.map(jnp.zeros_like, state.params), jnp.zeros((), jnp.float32))
            (grads, loss), mem_chunks = jax.lax.scan(body, zeros, chunks + (jnp.arange(k),))
            new_memory = merge_batch(mem_chunks, axes)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def update(params, opt_state):
            updates, new_opt = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), new_opt

        # A non-finite step changes neither params nor the optimizer's moments; only the
        # schedule moves on. A cond, not where(finite, new, old) per leaf: with the donated
        # state, the where made XLA copy every optimizer-state buffer on every step (59 copies at
        # the benchmark config).
        new_params, new_opt = jax.lax.cond(finite, update, lambda p, o: (p, advance_schedule(o)),
                                           state.params, state.opt_state)
        new_state = TrainState(
            step=state.step + 1,
            params=new_params,
            opt_state=new_opt,
            memory=jax.tree.map(lambda m: jnp.where(finite, m, jnp.zeros_like(m)),  # a non-finite
                                new_memory),  # step leaves no memory behind
            rng=state.rng,
            nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1))
        metrics = {"loss": loss, "grad_norm": grad_norm, "learning_rate": schedule(state.step),
                   "finite": finite}
        return new_state, metrics

    return shard_lib.with_mesh(step_fn, mesh)


def init_train_state(cfg: ModelConfig, tc: TrainConfig, optimizer, batch_size: int) -> TrainState:
    key = jax.random.PRNGKey(tc.seed)
    init_key, train_key = jax.random.split(key)
    params = init_params(cfg, init_key)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                      memory=init_memory(cfg, batch_size), rng=train_key,
                      nonfinite_streak=jnp.zeros((), jnp.int32))


def init_sharded_train_state(cfg: ModelConfig, tc: TrainConfig, optimizer, batch_size: int, mesh):
    """(state, shardings): the initial TrainState created by one jitted call directly in its
    shardings on ``mesh`` (lamemo_jax.sharding rules; works across processes)."""
    init = lambda: init_train_state(cfg, tc, optimizer, batch_size)
    shardings = shard_lib.state_shardings(jax.eval_shape(init), mesh)
    return jax.jit(init, out_shardings=shardings)(), shardings


# --------------------------------------------------------------------------- the best-valid model
def _protocol_key(res) -> dict:
    """What makes two validation losses comparable: the same targets under the same settings."""
    return {**{k: v for k, v in res.protocol.items() if k != "last_segment_len"},
            "n_targets": int(res.n_targets)}


class BestValid:
    """``<workdir>/best``: the params of the best-valid models (the original's
    checkpoint_best.pt), the newest the best. Every validation offers its model; a loss measured
    under another protocol (eval_tokens or eval settings changed on a resume, or the final
    validation on the whole split against a periodic one on a part) is not compared as is: the
    kept model is evaluated again under the new one. The older of the two kept models is the
    fallback when a resume drops a newer one, which a crashed run saved past its last
    checkpoint. Every process makes the same calls (orbax's save and delete are collective)."""

    def __init__(self, workdir: str, start: int, abstract_params):
        self.ckpt = Checkpointer(os.path.join(workdir, BEST), keep=2)
        self.abstract = abstract_params
        self._restored = (None, None)  # (step, params): the kept model is read from disk once
        for s in self.ckpt.all_steps():
            if s > start:  # the resumed run re-trains these steps: not its models
                logging.info("dropping the best-valid model of step %d (after the resumed step %d)", s, start)
                self.ckpt.delete(s)
        self.meta = self.ckpt.latest_meta()

    def offer(self, step: int, params, res, evaluate) -> None:
        """Keeps ``params`` (the model of ``step``, validated as ``res``) if it is the best so far.
        ``evaluate(params)`` validates the kept model under ``res``'s protocol when needed."""
        if not np.isfinite(res.loss) or (self.meta is not None and self.meta["step"] == step):
            return
        if self.meta is not None and self._loss_under(res, evaluate) <= res.loss:
            return
        self.meta = {"step": step, "valid_loss": float(res.loss), "protocol": _protocol_key(res)}
        self.ckpt.save(step, params, self.meta)
        shard_lib.sync(f"lamemo_best_{step}")

    def _loss_under(self, res, evaluate) -> float:
        if self.meta.get("protocol") == _protocol_key(res):
            return self.meta["valid_loss"]
        params = self.params()
        if params is None:
            return float("inf")
        again = evaluate(params)
        self.meta.update(valid_loss=float(again.loss), protocol=_protocol_key(again))
        return again.loss

    def params(self):
        """The kept best model's params (None, with a warning, when it is unusable)."""
        step = self.meta["step"]
        if self._restored[0] != step:
            try:
                self._restored = (step, self.ckpt.restore(step, self.abstract)[0])
            except CheckpointError as e:  # e.g. a deletion that a kill cut short
                logging.warning("the best-valid model is unusable (%s)", e)
                return None
        return self._restored[1]

    def close(self):
        self.ckpt.close()


# --------------------------------------------------------------------------- run helpers
@contextlib.contextmanager
def workdir_lock(workdir: str):
    """Refuses a second trainer on the same workdir (an exclusive flock on <workdir>/.lock)."""
    path = os.path.join(workdir, ".lock")
    held = contextlib.ExitStack()
    try:
        fd = held.enter_context(exclusive_lock(path, wait=False))
    except BlockingIOError:
        raise TrainingError(f"workdir {workdir} is in use by another trainer (lock {path}); "
                            "stop it or choose another --workdir") from None
    with held:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield


def prepare_workdir(workdir: str) -> str:
    workdir = os.path.abspath(os.path.expanduser(workdir))
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write_probe.{jax.process_index()}.{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise TrainingError(f"workdir {workdir} is not writable: {e.strerror}") from None
    return workdir


class _Interrupted(BaseException):  # like KeyboardInterrupt: no `except Exception` swallows it
    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal = signal_name


class _StopFlag:
    """SIGTERM / SIGINT set a flag; the loop finishes its step, checkpoints and exits 0.
    Once ``interrupt`` is set (the final evaluations, after the last checkpoint) they raise
    ``_Interrupted`` instead, so that a preempted run stops at once and still exits 0."""

    def __init__(self):
        self.signal = None
        self.interrupt = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread: no signal handling
                pass
        return self

    def _handler(self, signum, frame):
        self.signal = signal.Signals(signum).name
        if self.interrupt:
            raise _Interrupted(self.signal)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def resolve_model(exp: ExperimentConfig, ds) -> ModelConfig:
    """The model config, checked against the data's vocabulary size."""
    n = ds.vocab.n_token
    if exp.model.n_token != n:
        raise ConfigError(f"model.n_token={exp.model.n_token} but the {ds.name} vocabulary has {n} "
                          f"tokens; set --config.model.n_token={n}")
    return exp.model


def _check_evaluations_fit(exp: ExperimentConfig, name: str, splits: dict) -> None:
    """Before any training: every evaluation the run will do (periodic validation on
    train.eval_tokens, the final one on the whole valid split and on eval.split) has at least two
    tokens per eval.batch_size stream; otherwise the run would fail at its first evaluation."""
    bs, tc = exp.eval.batch_size, exp.train
    checks = [("valid", len(splits["valid"]), "the final validation", ""),
              (exp.eval.split, len(splits[exp.eval.split]), "the final evaluation (eval.split)", "")]
    if tc.eval_every and tc.eval_every < tc.num_steps and tc.eval_tokens:
        checks.append(("valid", min(tc.eval_tokens, len(splits["valid"])),
                       f"the periodic validation (train.eval_tokens={tc.eval_tokens})",
                       " or raise train.eval_tokens"))
    for split, n, what, or_else in checks:
        if n // bs < 2:
            raise ConfigError(f"{what} would read {n} {name} {split} tokens: too few for "
                              f"eval.batch_size={bs} streams of at least 2 tokens (needs {2 * bs}); "
                              f"lower eval.batch_size{or_else}")


def _compatible(meta: dict, cfg: ModelConfig, tc: TrainConfig) -> None:
    """Refuses to resume a checkpoint whose parameter or memory shapes differ from the config's."""
    saved, now = meta.get("model", {}), cfg.to_dict()
    shape_fields = ("n_token", "n_layer", "n_head", "d_model", "d_head", "d_inner", "d_embed",
                    "div_val", "cutoffs", "tie_weight", "tie_projs", "memory", "lookahead", "mem_len",
                    "param_dtype")
    diff = [f"{f}: checkpoint {saved.get(f)!r} vs config {now[f]!r}" for f in shape_fields
            if f in saved and _norm(saved.get(f)) != _norm(now[f])]
    if "batch_size" in meta and meta["batch_size"] != tc.batch_size:  # the carried memory's rows
        diff.append(f"train.batch_size: checkpoint {meta['batch_size']!r} vs config {tc.batch_size!r}")
    if diff:
        raise CheckpointError("the checkpoint in the workdir was written by an incompatible "
                              "config (parameter/memory shapes differ); use a new workdir or the "
                              "checkpoint's values:\n  " + "\n  ".join(diff))


# settings that do not change what a step computes: a resume may change them silently
_BOOKKEEPING = {"train.num_steps", "train.log_every", "train.eval_every", "train.eval_tokens",
                "train.checkpoint_every", "train.keep_checkpoints", "train.progress_bar",
                "train.max_consecutive_nonfinite", "train.remat", "model.attention_impl"}


def _changed_settings(previous_config_json: str, run_info: dict) -> list:
    """'section.key: old -> new' for each model/data/train setting of the run recorded in the
    workdir's config.json that this run changes (bookkeeping and the num_steps of a constant
    schedule left out). Empty when there is no readable record."""
    try:
        with open(previous_config_json) as f:
            old = json.load(f)
    except (OSError, ValueError):
        return []
    new = json.loads(json.dumps(run_info, default=str))  # the form config.json has
    if new["train"].get("schedule") == "constant" and old.get("train", {}).get("schedule") == "constant":
        skip = _BOOKKEEPING
    else:  # a decaying schedule runs over num_steps: changing it moves the learning rate
        skip = _BOOKKEEPING - {"train.num_steps"}
    out = []
    for sec in ("model", "data", "train"):
        a, b = old.get(sec, {}), new.get(sec, {})
        for k in sorted(set(a) | set(b)):
            if f"{sec}.{k}" not in skip and _norm(a.get(k)) != _norm(b.get(k)):
                out.append(f"{sec}.{k}: {a.get(k)!r} -> {b.get(k)!r}")
    return out


def _norm(v):
    return list(v) if isinstance(v, (list, tuple)) else v


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


def _progress(total: int, initial: int, enabled: bool):
    if not enabled or not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)


# --------------------------------------------------------------------------- the loop
def train_and_evaluate(config, workdir: str) -> dict:
    """Trains (resuming from the workdir's latest checkpoint), evaluates, returns a summary."""
    exp = config if isinstance(config, ExperimentConfig) else ExperimentConfig.from_config_dict(config)
    tc = exp.train
    workdir = prepare_workdir(workdir)
    with workdir_lock(workdir) if jax.process_index() == 0 else contextlib.nullcontext():
        return _train(exp, tc, workdir)  # (multi-host: process 0 holds the lock for the run)


def _train(exp: ExperimentConfig, tc: TrainConfig, workdir: str) -> dict:
    # Imported here, not at module level: the train step (make_train_step, init_train_state) is
    # usable without the data stack (tensorflow-datasets), e.g. by benchmarks on an accelerator
    # image that lacks it, or with a user's own input pipeline.
    from lamemo_jax import data as data_lib

    ds = data_lib.load(exp.data)
    cfg = resolve_model(exp, ds)
    if tc.batch_size % tc.grad_accum_steps:
        raise ConfigError(f"train.batch_size={tc.batch_size} must be divisible by "
                          f"train.grad_accum_steps={tc.grad_accum_steps}")
    train_tokens = ds.split("train")
    valid_tokens = ds.split("valid")
    splits = {"train": train_tokens, "valid": valid_tokens, exp.eval.split: ds.split(exp.eval.split)}
    for split, toks in splits.items():
        bad = out_of_vocab_id(toks, cfg.n_token)
        if bad is not None:
            raise ConfigError(f"the {ds.name} {split} split holds token id {bad} outside the model "
                              f"vocabulary [0, {cfg.n_token}) (model.n_token)")
    _check_evaluations_fit(exp, ds.name, splits)
    mesh = shard_lib.make_mesh(exp.mesh)
    batch_sh = shard_lib.batch_sharding(mesh, (tc.batch_size, cfg.tgt_len))
    sos_sh = shard_lib.batch_sharding(mesh, (tc.batch_size,))
    rows = shard_lib.process_row_block(sos_sh, tc.batch_size)  # this process's rows of the batch
    stream = data_lib.TrainStream(train_tokens, batch_size=tc.batch_size, tgt_len=cfg.tgt_len,
                                  seed=tc.seed, roll_each_epoch=tc.roll_each_epoch,
                                  process_index=rows[0] if rows else 0, process_count=rows[1] if rows else 1)
    optimizer = make_optimizer(tc)
    writer = MetricWriter(workdir, enabled=jax.process_index() == 0)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=tc.keep_checkpoints)
    run_info = {"model": cfg.to_dict(), "data": dict(exp.data), "train": dataclasses.asdict(tc),
                "eval": dataclasses.asdict(exp.eval), "mesh": dataclasses.asdict(exp.mesh),
                "unit": ds.unit, "dataset": ds.name}
    state, state_sh = init_sharded_train_state(cfg, tc, optimizer, tc.batch_size, mesh)
    meta = ckpt.latest_meta()
    if meta is not None:
        _compatible(meta, cfg, tc)
        restored = ckpt.restore_latest(_abstract(state))
        if restored is not None:
            state, _, step = restored
            logging.info("resumed from %s (step %d)", ckpt.step_dir(step), step)
            changed = _changed_settings(os.path.join(workdir, "config.json"), run_info)
            if changed:
                logging.warning(
                    "resuming with settings that differ from the run that wrote the checkpoint, so "
                    "it will not continue as that run would have (data order, dropout, learning "
                    "rate): %s", "; ".join(changed))
    start = int(state.step)
    best = BestValid(workdir, start, _abstract(state.params))
    if start >= tc.num_steps and start > 0:
        logging.warning("the checkpoint in %s is at step %d, not before train.num_steps=%d: nothing to "
                        "train; evaluating the step-%d model", workdir, start, tc.num_steps, start)
    if jax.process_index() == 0:
        # Only now (the workdir's checkpoint, if any, was accepted): a rejected resume must leave
        # the run's config.json, which eval.py reads, as it was. Records past the restored step
        # (written after the last checkpoint of a crashed run) would repeat: they are dropped,
        # and so is a final evaluation that is about to be re-done.
        write_text_atomic(os.path.join(workdir, "config.json"), json.dumps(run_info, indent=2, default=str))
        if start < tc.num_steps and os.path.exists(os.path.join(workdir, TESTED)):
            os.remove(os.path.join(workdir, TESTED))  # not finished any more: eval.py reads the latest
        writer.truncate(start, drop_evals_at_last=start >= tc.num_steps)
    step_fn = jax.jit(make_train_step(cfg, tc, optimizer, mesh), donate_argnums=(0,),  # state + memory
                      in_shardings=(state_sh, batch_sh, batch_sh, sos_sh),
                      out_shardings=(state_sh, shard_lib.replicated(mesh)))
    place = lambda x, sh: shard_lib.global_array(x, sh, (tc.batch_size,) + x.shape[1:], rows)
    logging.info("mesh %s; process %d of %d reads batch rows block %s", shard_lib.describe(mesh),
                 jax.process_index(), jax.process_count(), rows)
    eval_cfg = exp.eval_model().replace(n_token=cfg.n_token)
    periodic_eval_cfg = eval_cfg
    tokens_per_step = tc.batch_size * cfg.tgt_len
    step_flops = train_step_flops(cfg, tc.batch_size)
    peak_flops = device_peak_flops()
    logging.info("training %s (%s) on %s: %d params, %d steps of %d tokens, starting at step %d",
                 cfg.memory, cfg.lookahead if cfg.memory == "lamemo" else "-", ds.name,
                 sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params)), tc.num_steps,
                 tokens_per_step, start)

    def save(step: int):
        meta = {"step": step, "model": cfg.to_dict(), "dataset": ds.name, "unit": ds.unit,
                "n_token": cfg.n_token, "batch_size": tc.batch_size, "time": time.time()}
        try:
            path = ckpt.save(step, state, meta)
        except OSError as e:
            prev = [s for s in ckpt.all_steps() if s < step]  # not the one that failed
            raise TrainingError(
                f"writing the checkpoint of step {step} failed: {e.strerror or e} (disk full?). "
                f"The previous checkpoint is intact: "
                f"{ckpt.step_dir(prev[-1]) if prev else 'none'}") from e
        shard_lib.sync(f"lamemo_checkpoint_{step}")  # every process waits for process 0's manifest
        writer.flush()
        return path

    def valid_result(params, full: bool):  # periodic: the first train.eval_tokens; full: all
        return evaluate_tokens(periodic_eval_cfg, shard_lib.host_local(params), valid_tokens,
                               batch_size=exp.eval.batch_size, max_tokens=0 if full else tc.eval_tokens)

    def validate(step: int, full: bool = False):
        res = valid_result(state.params, full)
        rec = {"step": step, "split": "valid", "loss": res.loss, **unit_metrics(res.loss, ds.unit),
               "n_targets": res.n_targets, "eval_seconds": round(res.seconds, 2)}
        writer.write(rec)
        logging.info("step %d valid: loss %.4f %s", step, res.loss, headline(res.loss, ds.unit))
        return res

    bar = _progress(tc.num_steps, start, tc.progress_bar)
    stop_reason = None
    last_saved = start if ckpt.all_steps() else None
    window = []
    t_last, paused = time.time(), 0.0
    with _StopFlag() as stop:  # until the end: the final evaluations stop at a signal too
        step = start
        while step < tc.num_steps:
            batch = stream.batch(step)
            state, m = step_fn(state, place(batch.inputs, batch_sh), place(batch.targets, batch_sh),
                               place(batch.start_of_sequence, sos_sh))
            step += 1
            window.append(m)
            if not bool(m["finite"]):
                logging.warning("step %d: non-finite loss or gradient (loss %s, grad_norm %s); update "
                                "skipped, memory cleared", step, float(m["loss"]), float(m["grad_norm"]))
                writer.write({"step": step, "split": "train", "nonfinite": True,
                              "nonfinite_streak": int(state.nonfinite_streak)})
                if int(state.nonfinite_streak) >= tc.max_consecutive_nonfinite:
                    stop_reason = "nonfinite"
                    break
            if step % tc.log_every == 0 or step == tc.num_steps:
                jax.block_until_ready(state.params)
                dt = time.time() - t_last - paused
                t_last, paused = time.time(), 0.0
                finite = [x for x in window if bool(x["finite"])]
                loss = float(np.mean([float(x["loss"]) for x in finite])) if finite else float("nan")
                rec = {"step": step, "split": "train", "loss": loss, **unit_metrics(loss, ds.unit),
                       "learning_rate": float(window[-1]["learning_rate"]),
                       "grad_norm": float(np.mean([float(x["grad_norm"]) for x in finite])) if finite else float("nan"),
                       "step_time_s": dt / len(window), "tokens_per_sec": tokens_per_step * len(window) / dt,
                       "epoch": batch.epoch,
                       "model_tflops_per_sec": step_flops * len(window) / dt / 1e12}
                if peak_flops:
                    rec["mfu"] = step_flops * len(window) / dt / (peak_flops * jax.device_count())
                writer.write(rec)
                logging.info("step %d: loss %.4f %s lr %.3g |g| %.3f %.0f tok/s", step, loss,
                             headline(loss, ds.unit), rec["learning_rate"], rec["grad_norm"],
                             rec["tokens_per_sec"])
                window = []
            if bar is not None:
                bar.update(1)
            # the windows' step time, tokens/s and MFU count training only, not these pauses
            if tc.eval_every and step % tc.eval_every == 0 and step < tc.num_steps:
                jax.block_until_ready(state.params)  # the steps dispatched so far are training time
                t0 = time.time()
                best.offer(step, state.params, validate(step), lambda p: valid_result(p, full=False))
                paused += time.time() - t0
            if step % tc.checkpoint_every == 0 and step < tc.num_steps and int(state.nonfinite_streak) == 0:
                jax.block_until_ready(state.params)
                t0 = time.time()
                save(step)
                last_saved = step
                paused += time.time() - t0
            if stop.signal:
                stop_reason = stop.signal
                break
        if bar is not None:
            bar.close()

        if stop_reason == "nonfinite":
            writer.close()
            where = ckpt.step_dir(last_saved) if last_saved is not None else "none (no checkpoint yet)"
            raise TrainingError(f"stopped at step {step}: {tc.max_consecutive_nonfinite} consecutive steps "
                                f"with a non-finite loss or gradient. Last good checkpoint: {where}. "
                                "Lower the learning rate or check the data.")
        path = save(step) if last_saved != step else ckpt.step_dir(step)
        summary = {"workdir": workdir, "step": step, "checkpoint": path, "dataset": ds.name, "unit": ds.unit}
        if stop_reason:
            writer.close()
            msg = (f"received {stop_reason}: saved checkpoint {path} at step {step}; run the same "
                   "command again to resume")
            logging.warning(msg)
            print(msg, flush=True)
            summary["interrupted"] = stop_reason
            return summary
        try:  # a signal now stops the evaluations at once: the checkpoint is already saved
            stop.interrupt = True
            if stop.signal:  # it came during the final save
                raise _Interrupted(stop.signal)
            res = validate(step, full=True)
            summary.update({"valid_loss": res.loss, **{f"valid_{k}": v for k, v in unit_metrics(res.loss, ds.unit).items()}})
            # the final model competes on the whole split (the kept one is evaluated there too)
            best.offer(step, state.params, res, lambda p: valid_result(p, full=True))
            tested_step = best.meta["step"] if best.meta is not None else step
            tested_params = state.params if tested_step == step else best.params()
            if tested_params is None:  # the kept model broke since it was compared
                tested_step, tested_params = step, state.params
            if tested_step != step:
                logging.info("testing the best-valid model of step %d (valid loss %.4f; the final step "
                             "%d has %.4f): %s", tested_step, best.meta["valid_loss"], step, res.loss,
                             best.ckpt.step_dir(tested_step))
            summary["tested_step"] = tested_step
            if jax.process_index() == 0:
                write_text_atomic(os.path.join(workdir, TESTED), json.dumps({"step": tested_step}))
            if exp.eval.split != "valid":
                split = exp.eval.split
                r = evaluate_tokens(eval_cfg, shard_lib.host_local(tested_params), ds.split(split),
                                    batch_size=exp.eval.batch_size)
                writer.write({"step": step, "model_step": tested_step, "split": split, "loss": r.loss,
                              **unit_metrics(r.loss, ds.unit), "n_targets": r.n_targets,
                              "eval_seconds": round(r.seconds, 2)})
                logging.info("step %d %s: loss %.4f %s", tested_step, split, r.loss, headline(r.loss, ds.unit))
                summary.update({"eval_split": split, "eval_loss": r.loss})
            records = read_metrics(writer.path)
            if jax.process_index() == 0 and records:
                summary["plot"] = plot_loss_curves({cfg.memory: records}, os.path.join(workdir, "loss.png"),
                                                   title=f"{cfg.memory} on {ds.name}")
        except _Interrupted as e:
            msg = (f"received {e.signal} during the final evaluation: the step-{step} checkpoint "
                   f"{path} is saved; run the same command again to evaluate it")
            logging.warning(msg)
            print(msg, flush=True)
            summary["interrupted"] = e.signal
        finally:
            stop.interrupt = False  # the run is complete: a later signal only sets the flag
        writer.close()
        ckpt.close()
        best.close()
        return summary


# --------------------------------------------------------------------------- loading a run
def recorded_experiment(info: dict, path: str) -> ExperimentConfig:
    """The ExperimentConfig of a run's config.json (``info``, read from ``path``).

    Settings that had no effect on the run and are errors since they are checked (weight_decay
    with optimizer 'adam', min_learning_rate with a constant schedule, the random source's fields
    on a real corpus) are reset to their defaults, with a warning: the run loads as it trained.
    Any other invalid value is an error naming the file."""
    from lamemo_jax.data.config import DataConfigError, ignored_random_source_fields
    missing = [k for k in ("model", "data", "train", "eval", "mesh") if not isinstance(info.get(k), dict)]
    if missing:
        raise ConfigError(f"{path}: the run record has no {', '.join(missing)} section(s); it is "
                          "damaged (train.py rewrites it when the run is resumed)")
    sections = {k: dict(info[k]) for k in ("model", "data", "train", "eval", "mesh")}
    reset = []
    for name, ignored in (("train", ignored_train_settings), ("data", ignored_random_source_fields)):
        for key, default in ignored(sections[name]).items():
            reset.append(f"{name}.{key}={sections[name][key]!r}")
            sections[name][key] = default
    if reset:
        logging.warning("%s: %s had no effect on this run (ignored by its optimizer, schedule or "
                        "corpus); loaded with the defaults", path, ", ".join(reset))
    try:
        return ExperimentConfig.from_config_dict(sections)
    except (ConfigError, DataConfigError) as e:
        raise ConfigError(f"{path}: {e}") from e


def load_run(workdir: str, step: Optional[int] = None, *, with_path: bool = False):
    """(ExperimentConfig, ModelConfig, params, step) of a training workdir's model: the
    checkpoint of ``step``; by default the model a finished run tested (its best-valid one,
    named by ``<workdir>/tested.json``), else the latest good checkpoint (a live, stopped or
    crashed run). ``with_path=True`` adds the directory the params came from."""
    workdir = os.path.abspath(os.path.expanduser(workdir))
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise CheckpointError(f"{workdir} is not a training workdir (no config.json)")
    try:
        with open(path) as f:
            info = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is unreadable ({e}); it is damaged (train.py rewrites it "
                              "when the run is resumed)") from None
    if not isinstance(info, dict):
        raise CheckpointError(f"{path} is not a run record (a JSON object)")
    exp = recorded_experiment(info, path)
    cfg = exp.model
    optimizer = make_optimizer(exp.train)
    abstract = jax.eval_shape(lambda: init_train_state(cfg, exp.train, optimizer, exp.train.batch_size))
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])  # a checkpoint of any mesh loads here
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one), abstract)
    tested = None
    if step is None and os.path.exists(os.path.join(workdir, TESTED)):
        try:
            with open(os.path.join(workdir, TESTED)) as f:
                tested = int(json.load(f)["step"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            logging.warning("%s is unreadable (%s); using the latest checkpoint", TESTED, e)
    # read-only: a reader beside a live trainer must never move or delete its checkpoints
    best = Checkpointer(os.path.join(workdir, BEST), read_only=True) \
        if os.path.isdir(os.path.join(workdir, BEST)) else None
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=exp.train.keep_checkpoints,
                        read_only=True)

    def params_of(where, s):  # the params of step s in one of the two directories
        restored = where.restore(s, abstract.params if where is best else abstract)[0]
        return restored if where is best else restored.params

    try:
        params = None
        if step is not None:  # checkpoints/, or best/ when it was rotated out of checkpoints/
            where = best if best is not None and step in best.all_steps() and step not in ckpt.all_steps() else ckpt
            params, found = params_of(where, step), where.step_dir(step)
        elif tested is not None:
            for where in (best, ckpt):
                if where is not None and tested in where.all_steps():
                    try:
                        params, found, step = params_of(where, tested), where.step_dir(tested), tested
                        break
                    except CheckpointError as e:
                        logging.warning("%s", e)
            if params is None:
                logging.warning("the tested model of step %d is not available; using the latest "
                                "checkpoint", tested)
        if params is None:
            restored = ckpt.restore_latest(abstract)
            if restored is None:
                raise CheckpointError(f"no checkpoint in {ckpt.directory}")
            params, step, found = restored[0].params, restored[2], ckpt.step_dir(restored[2])
    finally:
        ckpt.close()
        if best is not None:
            best.close()
    return (exp, cfg, params, int(step)) + ((found,) if with_path else ())
