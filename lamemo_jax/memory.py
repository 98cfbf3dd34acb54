"""The carried recurrence memory: explicit, typed pytrees (batch-major, fixed-size buffers).

Every buffer has ``Mb = mem_len`` slots per batch row; the valid slots of row b are the last
``length[b]`` (right-aligned, oldest first), so a segment always sees static shapes (what
``lax.scan`` and ``jit`` need) while the memory grows 0, N, 2N, ... up to mem_len as in the
original. Empty slots are zero and masked out of every attention.

* ``XLMemory``: Transformer-XL. ``hidden[l]`` is the input of layer l for the memory tokens
  (l = 0: the post-dropout scaled embeddings); ``hidden[L]``, the last layer's output, is
  carried like the original's but never read.
* ``LaMemoMemory``: ``embed`` (post-dropout scaled embeddings, the only hidden state carried),
  ``attn[l]`` = C, each memory token's attention output before o_net, and ``lse[l]`` = Z, its
  log-normaliser. ``lse`` is stored in float64 in float64 runs and never below float32 (the
  original keeps fp16 normalisers in fp16 training; float32 is a deliberate improvement).

All memory leaving a segment is stop-gradient'ed.
"""

from __future__ import annotations

from typing import Optional, Union

import flax.struct
import jax
import jax.numpy as jnp

from kernels.softmax import stat_dtype
from lamemo_jax.config import ModelConfig

Array = jax.Array


@flax.struct.dataclass
class XLMemory:
    hidden: Array  # [L+1, B, Mb, d_model]
    length: Array  # [B] int32: valid slots per row

    @property
    def mem_len(self) -> int:
        return self.hidden.shape[2]


@flax.struct.dataclass
class LaMemoMemory:
    embed: Array  # [B, Mb, d_model]
    attn: Array  # [L, B, Mb, H, Dh]
    lse: Array  # [L, B, Mb, H], float32 or float64
    length: Array  # [B] int32

    @property
    def mem_len(self) -> int:
        return self.embed.shape[1]


Memory = Union[XLMemory, LaMemoMemory]


def stat_dtype_of(cfg: ModelConfig):
    return stat_dtype(jnp.dtype(cfg.dtype))


def init_memory(cfg: ModelConfig, batch_size: int) -> Memory:
    """An empty memory (length 0 in every row) with ``cfg.mem_len`` slots."""
    if batch_size <= 0:
        raise ValueError(f"init_memory: batch_size={batch_size} must be positive")
    mb, b, d = cfg.mem_len, batch_size, cfg.d_model
    dt = jnp.dtype(cfg.dtype)
    length = jnp.zeros((b,), jnp.int32)
    if cfg.memory == "xl":
        return XLMemory(hidden=jnp.zeros((cfg.n_layer + 1, b, mb, d), dt), length=length)
    return LaMemoMemory(
        embed=jnp.zeros((b, mb, d), dt),
        attn=jnp.zeros((cfg.n_layer, b, mb, cfg.n_head, cfg.d_head), dt),
        lse=jnp.zeros((cfg.n_layer, b, mb, cfg.n_head), stat_dtype_of(cfg)),
        length=length,
    )


def check_memory(cfg: ModelConfig, memory: Memory, batch_size: int) -> None:
    """Clear errors for a memory that does not belong to this config / batch."""
    want = jax.eval_shape(lambda: init_memory(cfg, batch_size))
    kind = "XLMemory" if cfg.memory == "xl" else "LaMemoMemory"
    if type(memory).__name__ != kind:
        raise ValueError(f"memory is a {type(memory).__name__} but ModelConfig.memory="
                         f"{cfg.memory!r} needs a {kind}")
    for name in want.__dataclass_fields__:
        got, exp = getattr(memory, name), getattr(want, name)
        if tuple(got.shape) != tuple(exp.shape):
            raise ValueError(
                f"memory.{name} has shape {tuple(got.shape)} but the config (batch {batch_size}, "
                f"mem_len {cfg.mem_len}, n_layer {cfg.n_layer}) needs {tuple(exp.shape)}")


def reset_rows(memory: Memory, start_of_sequence: Optional[Array]) -> Memory:
    """Clears every slot of the rows where ``start_of_sequence`` is True (a fresh stream)."""
    if start_of_sequence is None:
        return memory
    keep = jnp.logical_not(jnp.asarray(start_of_sequence, bool))

    def clear(x, batch_axis):
        shape = [1] * x.ndim
        shape[batch_axis] = keep.shape[0]
        return jnp.where(keep.reshape(shape), x, jnp.zeros_like(x))

    if isinstance(memory, XLMemory):
        return XLMemory(hidden=clear(memory.hidden, 1), length=clear(memory.length, 0))
    return LaMemoMemory(embed=clear(memory.embed, 0), attn=clear(memory.attn, 1),
                        lse=clear(memory.lse, 1), length=clear(memory.length, 0))


def push(buffer: Array, new: Array, axis: int) -> Array:
    """The last Mb rows of concat([buffer, new]) along ``axis`` (FIFO update)."""
    mb = buffer.shape[axis]
    cat = jnp.concatenate([buffer, new.astype(buffer.dtype)], axis=axis)
    total = cat.shape[axis]
    return jax.lax.slice_in_dim(cat, total - mb, total, axis=axis)


def valid_mask(length_B: Array, mem_len: int) -> Array:
    """[B, Mb] True where a slot holds a real token."""
    return jnp.arange(mem_len)[None, :] >= (mem_len - length_B[:, None])
