"""Evaluation with the original protocol, memory-length sweeps, and generation.

Protocol (lamemo-spec section 3): trim the split to a multiple of ``batch_size`` (16), form that
many contiguous streams, run non-overlapping segments of ``tgt_len`` (the last one shorter) with
the memory carried from an empty start, and average the NLL over all targets.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lamemo_jax.api import _score_jit, apply, out_of_vocab_id
from lamemo_jax.config import ModelConfig
from lamemo_jax.memory import init_memory
from lamemo_jax.metrics import unit_metrics


@dataclasses.dataclass
class EvalResult:
    loss: float  # mean NLL in nats over all targets
    n_targets: int
    seconds: float
    protocol: dict

    def to_dict(self, unit: Optional[str] = None) -> dict:
        d = {"loss": self.loss, "n_targets": self.n_targets, "seconds": round(self.seconds, 3),
             "protocol": self.protocol}
        if unit:
            d.update(unit_metrics(self.loss, unit))
        return d


def stream_matrix(tokens: np.ndarray, batch_size: int, max_tokens: int = 0) -> np.ndarray:
    """[batch_size, L]: the (optionally truncated) split trimmed to a multiple of batch_size and cut
    into contiguous streams, row r = tokens[r*L:(r+1)*L] (the original's ordered iterator)."""
    tokens = np.asarray(tokens)
    if max_tokens:
        tokens = tokens[:max_tokens]
    n_step = len(tokens) // batch_size
    if n_step < 2:
        raise ValueError(f"evaluation needs at least 2*batch_size={2 * batch_size} tokens; got {len(tokens)}")
    return np.ascontiguousarray(tokens[: n_step * batch_size].reshape(batch_size, n_step))


@functools.partial(jax.jit, static_argnames=("cfg",))
def _segment_nll(cfg, params, inputs, targets, memory):
    out, memory = apply(cfg, params, inputs, memory, targets=targets)
    return out.nll, memory


def evaluate_tokens(cfg: ModelConfig, params, tokens: np.ndarray, *, batch_size: int = 16,
                    max_tokens: int = 0, chunk_segments: int = 32,
                    progress: Optional[Callable[[int, int], None]] = None) -> EvalResult:
    """Mean NLL of ``tokens`` (a flat split) under the original evaluation protocol.

    ``cfg`` carries the evaluation lengths (tgt_len, mem_len, clamp_len, same_length); dropout is
    off. Segments are scanned in chunks of ``chunk_segments`` (one compile per chunk size).
    """
    t0 = time.time()
    streams = stream_matrix(tokens, batch_size, max_tokens)
    bad = out_of_vocab_id(streams, cfg.n_token)
    if bad is not None:
        raise ValueError(f"evaluation data holds token id {bad} outside the model vocabulary [0, {cfg.n_token})")
    inputs, targets = streams[:, :-1].astype(np.int32), streams[:, 1:].astype(np.int32)
    n = cfg.tgt_len
    total_t = inputs.shape[1]
    n_full, rest = divmod(total_t, n)
    memory = init_memory(cfg, batch_size)
    total = 0.0
    done = 0
    s = 0
    while s < n_full:
        k = min(chunk_segments, n_full - s)
        sl = slice(s * n, (s + k) * n)
        nll, memory = _score_jit(cfg, params, inputs[:, sl].reshape(batch_size, k, n),
                                 targets[:, sl].reshape(batch_size, k, n), memory)
        total += float(jnp.sum(nll.astype(jnp.float64) if jax.config.jax_enable_x64 else nll))
        s += k
        done = s * n
        if progress:
            progress(done, total_t)
    if rest:
        nll, memory = _segment_nll(cfg, params, inputs[:, n_full * n:], targets[:, n_full * n:], memory)
        total += float(jnp.sum(nll))
        if progress:
            progress(total_t, total_t)
    n_targets = batch_size * total_t
    protocol = {"batch_size": batch_size, "tgt_len": n, "mem_len": cfg.mem_len,
                "clamp_len": cfg.clamp_len, "same_length": cfg.same_length,
                "last_segment_len": rest or n, "n_segments": n_full + (1 if rest else 0),
                "tokens_used": int(streams.size), "memory": cfg.memory, "dtype": cfg.dtype}
    return EvalResult(loss=total / n_targets, n_targets=n_targets, seconds=time.time() - t0,
                      protocol=protocol)


def memory_sweep(cfg: ModelConfig, params, tokens: np.ndarray, mem_lens: Sequence[int], **kw) -> list:
    """The same model evaluated with each memory length (longer than trained = extrapolation)."""
    return [(m, evaluate_tokens(cfg.replace(mem_len=int(m)), params, tokens, **kw)) for m in mem_lens]


# --------------------------------------------------------------------------- generation
def _top_p_filter(logits: jax.Array, top_p: float) -> jax.Array:
    """Keeps the smallest set of tokens whose probability reaches top_p (nucleus sampling)."""
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    cum = jnp.cumsum(probs, axis=-1)
    keep_sorted = (cum - probs) < top_p  # a token is kept if the mass before it is < top_p
    keep = jnp.take_along_axis(keep_sorted, jnp.argsort(order, axis=-1), axis=-1)
    return jnp.where(keep, logits, -jnp.inf)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _next_log_probs(cfg, params, tokens, memory):
    out, memory = apply(cfg, params, tokens, memory)
    return out.log_probs[:, -1], memory


@functools.partial(jax.jit, static_argnames=("top_p_enabled",))
def _sample(key, log_probs, temperature, top_p, top_p_enabled: bool):
    logits = log_probs / temperature
    if top_p_enabled:
        logits = _top_p_filter(logits, top_p)
    return jax.random.categorical(key, logits, axis=-1)


def generate(cfg: ModelConfig, params, prompt: np.ndarray, *, max_new_tokens: int,
             temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
             on_token: Optional[Callable[[int], None]] = None) -> np.ndarray:
    """Samples a continuation of ``prompt`` (1-D token ids) with the memory carried.

    The prompt streams through the model in segments of ``cfg.tgt_len`` (the last one shorter);
    then each sampled token is its own segment, so the memory (XL hidden states or LaMemo's
    refreshed caches) carries the context. Deterministic for a seed. Returns the new ids.

    This is the original's generation schedule (its eval_ddp.py --generate). For LaMemo it has a
    property that evaluation with a constant segment length does not have: a segment's
    look-ahead window is as long as the segment, so once the segments shrink to one token, no
    memory token ever attends to the tokens of the last prompt segment after its first one (the
    caches of those memory tokens stay without them; later layers still see them as keys).
    """
    prompt = np.asarray(prompt, np.int32).reshape(-1)
    if prompt.size == 0:
        raise ValueError("generate: the prompt is empty; give at least one token")
    if temperature <= 0:
        raise ValueError(f"generate: temperature={temperature} must be > 0")
    if not (0.0 < top_p <= 1.0):
        raise ValueError(f"generate: top_p={top_p} must be in (0, 1]")
    bad = out_of_vocab_id(prompt, cfg.n_token)
    if bad is not None:
        raise ValueError(f"generate: prompt token id {bad} outside the vocabulary [0, {cfg.n_token})")
    cfg = cfg.replace(dropout=0.0, dropatt=0.0)
    memory = init_memory(cfg, 1)
    n = cfg.tgt_len
    lp = None
    for s in range(0, prompt.size, n):
        lp, memory = _next_log_probs(cfg, params, prompt[None, s:s + n], memory)
    key = jax.random.key(seed)
    out = []
    for i in range(max_new_tokens):
        tok = _sample(jax.random.fold_in(key, i), lp, jnp.float32(temperature), jnp.float32(top_p),
                      top_p < 1.0)
        t = int(tok[0])
        out.append(t)
        if on_token:
            on_token(t)
        if i + 1 < max_new_tokens:
            lp, memory = _next_log_probs(cfg, params, np.asarray([[t]], np.int32), memory)
    return np.asarray(out, np.int32)
