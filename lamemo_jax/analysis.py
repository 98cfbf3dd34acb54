"""Analyses of a trained model: attention mass by relative distance (the paper's analysis)."""

from __future__ import annotations

import functools

import jax
import numpy as np

from lamemo_jax.config import ModelConfig
from lamemo_jax.memory import init_memory
from lamemo_jax.model import TransformerLM


@functools.partial(jax.jit, static_argnames=("cfg",))
def _segment_with_attention(cfg, params, tokens, memory):
    (_, memory), inter = TransformerLM(cfg).apply({"params": params}, tokens, memory, None, False,
                                                  mutable=["intermediates"])
    mass = [inter["intermediates"][f"layers_{l}"]["attn_by_distance"][0] for l in range(cfg.n_layer)]
    return memory, jax.numpy.stack(mass)


def attention_by_distance(cfg: ModelConfig, params, streams: np.ndarray, *, skip: int = 0) -> np.ndarray:
    """[L, Mb+N]: average attention mass of the current rows at each distance (0 = itself),
    over contiguous ``streams [B, S*N]`` run segment by segment in eval mode with the memory
    carried; the first ``skip`` segments (memory still filling) are left out of the average."""
    cfg = cfg.replace(dropout=0.0, dropatt=0.0)
    b, t = streams.shape
    n = cfg.tgt_len
    memory = init_memory(cfg, b)
    total, count = None, 0
    for s in range(t // n):
        memory, mass = _segment_with_attention(cfg, params, np.asarray(streams[:, s * n:(s + 1) * n], np.int32), memory)
        if s >= skip:
            total = np.asarray(mass, np.float64) if total is None else total + np.asarray(mass, np.float64)
            count += 1
    if not count:
        raise ValueError(f"attention_by_distance: streams hold {t // n} segments, need more than skip={skip}")
    return total / count
