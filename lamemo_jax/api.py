"""The pure functional API: init_params, init_memory, apply (one segment), run_segments, score.

    cfg = lamemo_jax.ModelConfig(n_token=1000, memory="lamemo", ...)
    params = lamemo_jax.init_params(cfg, jax.random.key(0))
    memory = lamemo_jax.init_memory(cfg, batch_size=8)
    out, memory = lamemo_jax.apply(cfg, params, tokens_BN, memory, targets=targets_BN)
    nll_BT, memory = lamemo_jax.score(cfg, params, tokens_BT1)   # eval over S segments

Dropout masks: ``apply(..., train=True, rng=key)`` draws every dropout mask of the segment from
``key``; ``run_segments`` gives segment s the key ``fold_in(rng, s)``, so masks differ per
segment and (with a per-step ``rng``) per step.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from lamemo_jax.config import ModelConfig
from lamemo_jax.memory import Memory, check_memory, init_memory, reset_rows
from lamemo_jax.model import TransformerLM

Array = jax.Array
Params = Any


@flax.struct.dataclass
class SegmentOutput:
    """``nll`` [B, N] when targets were given, else ``log_probs`` [B, N, n_token]."""

    nll: Optional[Array] = None
    log_probs: Optional[Array] = None


def _check_x64(cfg: ModelConfig):
    if "float64" in (cfg.dtype, cfg.param_dtype) and not jax.config.jax_enable_x64:
        raise ValueError("ModelConfig dtype float64 needs jax_enable_x64: call "
                         "jax.config.update('jax_enable_x64', True) before building arrays")


def init_params(cfg: ModelConfig, rng: Array) -> Params:
    """Fresh parameters with the original's initialisation (see ``lamemo_jax.model``)."""
    _check_x64(cfg)
    tokens = jnp.zeros((1, cfg.tgt_len), jnp.int32)
    variables = TransformerLM(cfg).init({"params": rng}, tokens, init_memory(cfg, 1), tokens)
    return variables["params"]


def out_of_vocab_id(tokens, n_token: int) -> Optional[int]:
    """The first offending id (the minimum if negative, else the maximum) of a NumPy token array
    that leaves [0, n_token), or None. One pass for each of min and max."""
    tokens = np.asarray(tokens)
    if not tokens.size:
        return None
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0:
        return lo
    return hi if hi >= n_token else None


def _check_tokens(cfg: ModelConfig, tokens, name: str, layout: str = "[B, T]"):
    if tokens.ndim != layout.count(",") + 1:
        raise ValueError(f"{name} must be int {layout}; got shape {tuple(tokens.shape)}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"{name} must hold integer token ids; got dtype {tokens.dtype}")
    # Concrete arrays (NumPy, or JAX arrays outside a trace) are checked here; under jit/grad/
    # scan the ids are tracers and cannot be: there an out-of-range id gives NaN (>= n_token) or
    # wraps around (< 0), so traced callers check their data first (the trainer and evaluation
    # check every split when they load it).
    if not isinstance(tokens, jax.core.Tracer) and getattr(tokens, "is_fully_addressable", True):
        bad = out_of_vocab_id(tokens, cfg.n_token)
        if bad is not None:
            raise ValueError(f"{name} holds token id {bad} outside the vocabulary [0, {cfg.n_token})")


def apply(cfg: ModelConfig, params: Params, tokens: Array, memory: Memory, *,
          targets: Optional[Array] = None, train: bool = False, rng: Optional[Array] = None,
          start_of_sequence: Optional[Array] = None) -> tuple[SegmentOutput, Memory]:
    """One segment. ``start_of_sequence`` [B] bool clears those rows' memory first.

    Returns (SegmentOutput, new memory). ``train=True`` applies dropout and needs ``rng`` when
    ``cfg.dropout`` or ``cfg.dropatt`` is non-zero. Works under ``jit`` / ``grad`` / ``scan``.
    """
    _check_tokens(cfg, tokens, "tokens")
    if tokens.shape[1] == 0:
        raise ValueError(f"tokens has shape {tuple(tokens.shape)}: a segment needs at least one "
                         "token per row")
    if targets is not None:
        _check_tokens(cfg, targets, "targets")
        if targets.shape != tokens.shape:
            raise ValueError(f"targets shape {tuple(targets.shape)} != tokens shape {tuple(tokens.shape)}")
    check_memory(cfg, memory, tokens.shape[0])
    if start_of_sequence is not None and np.shape(start_of_sequence) != tokens.shape[:1]:
        raise ValueError(f"start_of_sequence has shape {np.shape(start_of_sequence)}; needs [B] = "
                         f"{tuple(tokens.shape[:1])}, one flag per row of tokens {tuple(tokens.shape)}")
    if train and (cfg.dropout > 0 or cfg.dropatt > 0) and rng is None:
        raise ValueError("apply(train=True) with dropout needs an rng key")
    memory = reset_rows(memory, start_of_sequence)
    rngs = {"dropout": rng} if (train and rng is not None) else {}
    out, new_memory = TransformerLM(cfg).apply({"params": params}, tokens, memory, targets, train,
                                               rngs=rngs)
    if targets is None:
        return SegmentOutput(log_probs=out), new_memory
    return SegmentOutput(nll=out), new_memory


def run_segments(cfg: ModelConfig, params: Params, inputs_BSN: Array, targets_BSN: Array,
                 memory: Memory, *, train: bool = False, rng: Optional[Array] = None,
                 start_of_sequence_BS: Optional[Array] = None) -> tuple[Array, Memory]:
    """S consecutive segments in one ``lax.scan``, carrying the memory. Returns (nll [B,S,N], memory).

    Gradients do not cross segment boundaries (the carried memory is stop-gradient'ed).
    """
    # Checked here while concrete (inside the scan apply sees tracers and cannot check the ids)
    _check_tokens(cfg, inputs_BSN, "inputs_BSN", "[B, S, N]")
    _check_tokens(cfg, targets_BSN, "targets_BSN", "[B, S, N]")
    if targets_BSN.shape != inputs_BSN.shape:
        raise ValueError(f"targets_BSN shape {tuple(targets_BSN.shape)} != inputs_BSN shape "
                         f"{tuple(inputs_BSN.shape)}")
    b, s, n = inputs_BSN.shape
    if start_of_sequence_BS is not None and np.shape(start_of_sequence_BS) != (b, s):
        raise ValueError(f"start_of_sequence_BS has shape {np.shape(start_of_sequence_BS)}; needs "
                         f"[B, S] = {(b, s)} for inputs_BSN {tuple(inputs_BSN.shape)}")
    xs = {"inputs": jnp.swapaxes(inputs_BSN, 0, 1), "targets": jnp.swapaxes(targets_BSN, 0, 1),
          "index": jnp.arange(s)}
    if start_of_sequence_BS is not None:
        xs["reset"] = jnp.swapaxes(jnp.asarray(start_of_sequence_BS, bool), 0, 1)

    def body(mem, x):
        key = None if rng is None else jax.random.fold_in(rng, x["index"])
        out, mem = apply(cfg, params, x["inputs"], mem, targets=x["targets"], train=train, rng=key,
                         start_of_sequence=x.get("reset"))
        return mem, out.nll

    memory, nll = jax.lax.scan(body, memory, xs)
    return jnp.swapaxes(nll, 0, 1), memory


@functools.partial(jax.jit, static_argnames=("cfg",))
def _score_jit(cfg, params, inputs, targets, memory):
    return run_segments(cfg, params, inputs, targets, memory, train=False)


def eval_config(cfg: ModelConfig, *, tgt_len: Optional[int] = None, mem_len: Optional[int] = None,
                clamp_len: Optional[int] = None, same_length: Optional[bool] = None) -> ModelConfig:
    """The config with evaluation lengths substituted (None keeps the config's)."""
    kw = {}
    if tgt_len is not None:
        kw["tgt_len"] = tgt_len
    if mem_len is not None:
        kw["mem_len"] = mem_len
    if clamp_len is not None:
        kw["clamp_len"] = clamp_len
    if same_length is not None:
        kw["same_length"] = same_length
    return cfg.replace(**kw) if kw else cfg


def score(cfg: ModelConfig, params: Params, tokens, *, tgt_len: Optional[int] = None,
          mem_len: Optional[int] = None, clamp_len: Optional[int] = None,
          same_length: Optional[bool] = None, memory: Optional[Memory] = None):
    """Per-token NLL of contiguous streams in eval mode, S segments with the memory carried.

    ``tokens`` int [B, S*N+1]; returns (nll np.ndarray [B, S*N] where nll[b, t] predicts
    tokens[b, t+1], memory after the last segment). The memory starts empty unless given.
    """
    cfg = eval_config(cfg, tgt_len=tgt_len, mem_len=mem_len, clamp_len=clamp_len,
                      same_length=same_length)
    _check_x64(cfg)
    tokens = np.asarray(tokens)
    _check_tokens(cfg, tokens, "tokens")
    b, t = tokens.shape
    n = cfg.tgt_len
    if t < 2 or (t - 1) % n:
        raise ValueError(f"score: tokens has {t} columns; needs S*tgt_len+1 with tgt_len={n}")
    s = (t - 1) // n
    inputs = tokens[:, :-1].reshape(b, s, n).astype(np.int32)
    targets = tokens[:, 1:].reshape(b, s, n).astype(np.int32)
    if memory is None:
        memory = init_memory(cfg, b)
    nll, memory = _score_jit(cfg, params, inputs, targets, memory)
    return np.asarray(nll).reshape(b, s * n), memory
