"""Batches of a flat token stream: the original's ordered iterator as a pure function of the step,
and the original evaluation protocol.

Training (``TrainStream``): the stream is trimmed to ``B * L`` tokens (``L = len // B``) and cut into
``B`` contiguous row-streams, row ``r = tokens[r*L:(r+1)*L]``. Step ``t`` is step ``i = t mod S`` of
epoch ``e = t // S`` (``S = steps_per_epoch = (L - 1) // N``, so every target exists; the last
``(L - 1) % N`` columns of an epoch are not used) and reads columns ``[i*N, i*N + N]`` of every row:
inputs are the first ``N``, targets the last ``N``. With ``roll_each_epoch`` each row is cyclically
shifted at the start of EVERY epoch (the first included) by an offset in ``[0, L)`` drawn from
``np.random.default_rng([seed, epoch, row])``: the batch at any step is computed in O(B*N) without
replaying earlier steps, and does not depend on how many processes share the rows.
``start_of_sequence`` is True at step 0 of each epoch (the stream restarts: reset the memory).

Multi-host: process ``p`` of ``P`` gets the global rows ``[p*B/P, (p+1)*B/P)``; the union over
processes is the global batch. Limitation: a row-stream crosses the wrap point of its roll inside
an epoch (the original rolls the same way).

Evaluation (``eval_batches``): trim to a multiple of ``batch_size``, ``batch_size`` contiguous
streams, non-overlapping segments of ``tgt_len`` (the last one shorter when ``(L - 1) % tgt_len``),
never shuffled; the ``batch_size * (L - 1)`` targets are each scored exactly once.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Iterator, Tuple

import numpy as np


class StreamError(ValueError):
    """An invalid batching argument (the message names it)."""


@dataclasses.dataclass(frozen=True)
class Batch:
    """One training step's slice for this process."""

    inputs: np.ndarray  # [B_local, N] int32
    targets: np.ndarray  # [B_local, N] int32, inputs shifted by one
    start_of_sequence: np.ndarray  # [B_local] bool: reset the memory of these rows before this step
    epoch: int
    step: int
    position: int  # step within the epoch


def _check_tokens(tokens: np.ndarray) -> np.ndarray:
    if not isinstance(tokens, np.ndarray) or tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise StreamError(f"tokens must be a 1-D integer numpy array, got {type(tokens).__name__} "
                          f"{getattr(tokens, 'dtype', '')}{list(getattr(tokens, 'shape', []))}")
    return tokens


def _row_slice(batch_size: int, process_index: int, process_count: int) -> Tuple[int, int]:
    if not isinstance(process_count, int) or process_count < 1:
        raise StreamError(f"process_count={process_count!r} must be a positive integer")
    if not isinstance(process_index, int) or not 0 <= process_index < process_count:
        raise StreamError(f"process_index={process_index!r} must be in [0, process_count={process_count})")
    if batch_size % process_count:
        raise StreamError(f"batch_size={batch_size} must be divisible by process_count={process_count} "
                          "(every process reads batch_size / process_count rows)")
    per = batch_size // process_count
    return process_index * per, (process_index + 1) * per


class TrainStream:
    """The training batches of one process (see the module docstring)."""

    def __init__(self, tokens: np.ndarray, batch_size: int, tgt_len: int, seed: int = 0,
                 roll_each_epoch: bool = True, process_index: int = 0, process_count: int = 1):
        self.tokens = _check_tokens(tokens)
        for name, v in (("batch_size", batch_size), ("tgt_len", tgt_len)):
            if not isinstance(v, (int, np.integer)) or v < 1:
                raise StreamError(f"{name}={v!r} must be a positive integer")
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise StreamError(f"seed={seed!r} must be an integer >= 0")
        self.batch_size = int(batch_size)
        self.tgt_len = int(tgt_len)
        self.seed = int(seed)
        self.roll_each_epoch = bool(roll_each_epoch)
        self.process_index, self.process_count = process_index, process_count
        self.row_start, self.row_stop = _row_slice(self.batch_size, process_index, process_count)
        self.row_len = len(tokens) // self.batch_size
        if self.row_len < self.tgt_len + 1:
            raise StreamError(
                f"{len(tokens)} tokens give rows of {self.row_len} tokens for batch_size={batch_size}; "
                f"tgt_len={tgt_len} needs at least {tgt_len + 1} per row")
        self.steps_per_epoch = (self.row_len - 1) // self.tgt_len
        self._shift_cache: Dict[int, np.ndarray] = {}

    @property
    def local_batch_size(self) -> int:
        return self.row_stop - self.row_start

    def row_shifts(self, epoch: int) -> np.ndarray:
        """The cyclic offsets of this process's rows in ``epoch`` (zeros without rolling)."""
        rows = range(self.row_start, self.row_stop)
        if not self.roll_each_epoch:
            return np.zeros(len(rows), dtype=np.int64)
        if epoch not in self._shift_cache:
            if len(self._shift_cache) > 4:
                self._shift_cache.clear()
            self._shift_cache[epoch] = np.asarray(
                [np.random.default_rng([self.seed, epoch, r]).integers(self.row_len) for r in rows], dtype=np.int64)
        return self._shift_cache[epoch]

    def batch(self, step: int) -> Batch:
        """The batch of global step ``step`` (a pure function of ``step`` and the constructor arguments)."""
        if not isinstance(step, (int, np.integer)) or step < 0:
            raise StreamError(f"step={step!r} must be an integer >= 0")
        step = int(step)
        epoch, pos = divmod(step, self.steps_per_epoch)
        rows = np.arange(self.row_start, self.row_stop, dtype=np.int64)
        cols = pos * self.tgt_len + np.arange(self.tgt_len + 1, dtype=np.int64)
        idx = rows[:, None] * self.row_len + (cols[None, :] + self.row_shifts(epoch)[:, None]) % self.row_len
        window = np.asarray(self.tokens[idx.reshape(-1)], dtype=np.int32).reshape(len(rows), self.tgt_len + 1)
        return Batch(
            inputs=np.ascontiguousarray(window[:, :-1]),
            targets=np.ascontiguousarray(window[:, 1:]),
            start_of_sequence=np.full(len(rows), pos == 0, dtype=bool),
            epoch=epoch,
            step=step,
            position=pos,
        )

    def iterate(self, start_step: int = 0) -> Iterator[Batch]:
        """Batches from ``start_step`` on, forever (resume: pass the restored step)."""
        step = start_step
        while True:
            yield self.batch(step)
            step += 1


def eval_batches(tokens: np.ndarray, batch_size: int = 16, tgt_len: int = 512,
                 process_index: int = 0, process_count: int = 1) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    """``(inputs, targets)`` int32 ``[batch_size / process_count, n]`` segments of the original
    evaluation protocol, in order; ``n = tgt_len`` except the last (``(L - 1) % tgt_len`` when nonzero).
    The memory carries across segments from an empty start."""
    tokens = _check_tokens(tokens)
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise StreamError(f"batch_size={batch_size!r} must be a positive integer")
    if not isinstance(tgt_len, (int, np.integer)) or tgt_len < 1:
        raise StreamError(f"tgt_len={tgt_len!r} must be a positive integer")
    lo, hi = _row_slice(int(batch_size), process_index, process_count)
    row_len = len(tokens) // batch_size
    if row_len < 2:
        raise StreamError(f"{len(tokens)} tokens are too few for {batch_size} evaluation streams")
    rows = np.asarray(tokens[: row_len * batch_size]).reshape(batch_size, row_len)[lo:hi]
    for i in range(0, row_len - 1, tgt_len):
        n = min(tgt_len, row_len - 1 - i)
        yield (np.ascontiguousarray(rows[:, i: i + n], dtype=np.int32),
               np.ascontiguousarray(rows[:, i + 1: i + 1 + n], dtype=np.int32))


def eval_num_targets(n_tokens: int, batch_size: int = 16) -> int:
    """Targets scored by ``eval_batches`` over all processes: ``batch_size * (n_tokens // batch_size - 1)``."""
    return batch_size * (n_tokens // batch_size - 1)
