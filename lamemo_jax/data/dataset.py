"""``load(cfg) -> Dataset``: builds a corpus once (tfds), then serves each split as a memory-mapped
flat int32 array cached in ``<tfds data dir>/tokens-<split>.npy``."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Tuple

import numpy as np

from lamemo_jax.data import builders
from lamemo_jax.data.config import CorruptCacheError, DataConfig
from lamemo_jax.data.corpora import SPLITS
from lamemo_jax.data.vocab import Vocab
from lamemo_jax.fileio import exclusive_lock

log = logging.getLogger(__name__)


class Dataset:
    """A tokenised corpus: ``name``, ``unit`` ("word": report ppl; "char"/"byte": report bpc),
    ``vocab`` and ``split(name)`` -> flat ``np.int32`` array."""

    splits: Tuple[str, ...] = SPLITS

    def __init__(self, name: str, unit: str, vocab: Vocab, config: DataConfig,
                 get_split: Callable[[str], np.ndarray], info: Mapping[str, Any],
                 builder: Optional[builders.LmBuilder] = None):
        self.name = name
        self.unit = unit
        self.vocab = vocab
        self.config = config
        self.info: Dict[str, Any] = dict(info)
        self.builder = builder
        self._get_split = get_split
        self._cache: Dict[str, np.ndarray] = {}

    @property
    def metric(self) -> str:
        """"ppl" for word corpora, "bpc" for character / byte corpora."""
        return "ppl" if self.unit == "word" else "bpc"

    def split(self, split: str) -> np.ndarray:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
        if split not in self._cache:
            self._cache[split] = self._get_split(split)
        return self._cache[split]

    def num_tokens(self, split: str) -> int:
        return int(len(self.split(split)))

    def cache_file(self, split: str) -> Optional[Path]:
        """The ``tokens-<split>.npy`` file that ``split(split)`` maps, or None (``random``)."""
        return cache_file(self.builder.data_dir, split) if self.builder is not None else None

    def __repr__(self) -> str:
        return f"Dataset({self.name!r}, unit={self.unit!r}, n_token={self.vocab.n_token})"


def load(cfg: Any) -> Dataset:
    """The dataset of a data config (``DataConfig``, mapping, ``ConfigDict``, or a whole experiment
    config with a ``data`` section). Prepares it on first use (see ``lamemo_jax.data`` for sources)."""
    c = DataConfig.from_any(cfg)
    if c.name == "random":
        return _random_dataset(c)
    b = builders.make_builder(c)
    if not b.is_prepared() or builders.changed_sources(b):
        with preparing_lock(c):  # another process may have prepared it while this one waited
            b = builders.make_builder(c)
            if not b.is_prepared():
                log.info("preparing %s/%s in %s", c.name, b.builder_config.name, c.tfds_dir_)
                b.download_and_prepare()
            else:
                changed = builders.changed_sources(b)
                if changed:
                    log.warning("%s: %s; rebuilding it from them.", c.name, changed)
                    b = builders.rebuild(c, b)
    md = b.info.metadata
    vocab = Vocab.from_json(md["vocab"])
    counts = {s: int(n) for s, n in md["split_tokens"].items()}
    info = {"builder_config": b.builder_config.name, "data_dir": str(b.data_dir), "split_tokens": counts,
            "provenance": md.get("provenance", {})}
    return Dataset(c.name, str(md["unit"]), vocab, c, lambda s: cached_split(b, s, counts[s]), info, b)


@contextlib.contextmanager
def preparing_lock(c: DataConfig) -> Iterator[None]:
    """An exclusive lock on ``<tfds dir>/.<name>.lock`` while a process prepares or rebuilds the
    dataset: processes sharing a data dir (two runs started at once, the workers of a test run, the
    hosts of a pod on a shared filesystem with ``flock``) prepare it one at a time; the others wait,
    then find it prepared. Without it the second build crashed on tfds's final rename. On a
    filesystem without locks it warns and prepares without one."""
    c.tfds_dir_.mkdir(parents=True, exist_ok=True)
    path = c.tfds_dir_ / f".{c.name}.lock"
    held = contextlib.ExitStack()
    try:
        held.enter_context(exclusive_lock(path, wait=True, on_wait=lambda: log.warning(
            "%s: another process is preparing it in %s; waiting for it (lock %s)", c.name, c.tfds_dir_, path)))
    except OSError as e:
        log.warning("%s: no lock on %s (%s); preparing without one: processes that share this data dir "
                    "should let one of them prepare it first", c.name, path, e)
    with held:
        yield


def cache_file(data_dir: Any, split: str) -> Path:
    """``<data_dir>/tokens-<split>.npy``: the flat int32 cache of a split of a built dataset."""
    return Path(data_dir) / f"tokens-{split}.npy"


def cached_split(builder: builders.LmBuilder, split: str, n_tokens: int) -> np.ndarray:
    """The split as a read-only memory map of ``<data_dir>/tokens-<split>.npy``, written once from the
    tfds data source (chunks put in ``index`` order). A damaged cache (see ``open_cache``) is a
    ``CorruptCacheError`` naming the file."""
    path = cache_file(builder.data_dir, split)
    if not path.exists():
        src = builder.as_data_source(split=split)
        meta = sorted((int(src[i]["index"]), i) for i in range(len(src)))
        if [k for k, _ in meta] != list(range(len(src))):
            raise ValueError(f"{builder.name}: chunk indices of split {split!r} are not 0..{len(src) - 1}; "
                             f"delete {builder.data_dir} and prepare again")
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.partial.npy")
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int32, shape=(n_tokens,))
        pos = 0
        for _, i in meta:
            ids = np.asarray(src[i]["ids"], dtype=np.int32)
            if pos + len(ids) > n_tokens:
                raise ValueError(f"{builder.name}: split {split!r} holds more than the {n_tokens} tokens of its metadata")
            out[pos: pos + len(ids)] = ids
            pos += len(ids)
        if pos != n_tokens:
            raise ValueError(f"{builder.name}: split {split!r} holds {pos} tokens, its metadata says {n_tokens}")
        out.flush()
        del out
        os.replace(tmp, path)
    return open_cache(path, n_tokens)


def open_cache(path: Path, n_tokens: int) -> np.ndarray:
    """The read-only memory map of a ``tokens-<split>.npy`` cache that must hold int32[n_tokens].

    Checks only the ``.npy`` header and the file size (O(1), no pass over the ids): a file cut
    short (which ``mmap`` refused with no path: "mmap length is greater than file size"), one with
    bytes beyond its data, an unreadable header, another dtype or length are each a
    ``CorruptCacheError`` naming the file; deleting it rebuilds it on the next load. The ids
    themselves are checked where they are used (the trainer, evaluation, ``python -m
    lamemo_jax.data``)."""
    hint = "delete it to rebuild it from the prepared dataset"
    fmt = np.lib.format
    try:
        with open(path, "rb") as f:
            version = fmt.read_magic(f)
            read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, _, dtype = read_header(f)
            data_offset = f.tell()
            size = os.fstat(f.fileno()).st_size
    except (OSError, ValueError, EOFError) as e:
        raise CorruptCacheError(f"{path}: not a readable .npy token cache ({type(e).__name__}: {e}); {hint}") from e
    if dtype != np.int32 or tuple(shape) != (n_tokens,):
        raise CorruptCacheError(f"{path}: expected int32[{n_tokens}], found {dtype}{list(shape)}; {hint}")
    expected = data_offset + n_tokens * np.dtype(np.int32).itemsize
    if size != expected:
        what = "cut short" if size < expected else "longer than its header says"
        raise CorruptCacheError(f"{path}: {what}: {size:,} bytes, its header (int32[{n_tokens}]) needs "
                                f"{expected:,}; {hint}")
    try:
        return np.load(path, mmap_mode="r")
    except (OSError, ValueError, EOFError) as e:  # e.g. changed between the check and the map
        raise CorruptCacheError(f"{path}: cannot be memory-mapped ({type(e).__name__}: {e}); {hint}") from e


def _random_dataset(c: DataConfig) -> Dataset:
    """Uniform tokens for throughput runs: split ``k`` is ``default_rng([seed, k])`` integers."""
    lengths = {"train": c.random_length, "valid": c.random_eval_length_, "test": c.random_eval_length_}

    def get(split: str) -> np.ndarray:
        rng = np.random.default_rng([c.seed, SPLITS.index(split)])
        return rng.integers(0, c.random_n_token, size=lengths[split], dtype=np.int32)

    vocab = Vocab("word", tuple(str(i) for i in range(c.random_n_token)))
    return Dataset("random", "word", vocab, c, get, {"split_tokens": lengths})


def unigram_nll(train: np.ndarray, tokens: np.ndarray, n_token: int, alpha: float = 1.0) -> float:
    """Mean NLL (nats) of ``tokens`` under the train unigram distribution with add-``alpha``
    smoothing over the whole vocabulary: ``p(w) = (count_train(w) + alpha) / (len(train) + alpha * n_token)``.
    ``exp`` of it is the unigram perplexity, ``/ ln 2`` the unigram bits per character: a
    sanity ceiling any trained model must beat. An id outside ``[0, n_token)`` in either is a
    ``ValueError`` naming it."""
    from lamemo_jax.api import out_of_vocab_id  # NumPy only; imported here so the loader does not need the model
    for name, ids in (("train", train), ("tokens", tokens)):
        bad = out_of_vocab_id(ids, n_token)
        if bad is not None:
            raise ValueError(f"{name} holds token id {bad} outside the vocabulary [0, {n_token})")
    return float(-unigram_log_probs(train, n_token, alpha)[np.asarray(tokens, dtype=np.int64)].mean())


def unigram_log_probs(train: np.ndarray, n_token: int, alpha: float = 1.0) -> np.ndarray:
    """float64 [n_token]: ``log p(w)`` of ``unigram_nll``, for ids already checked to be in
    ``[0, n_token)`` (one table for several splits)."""
    counts = np.bincount(np.asarray(train, dtype=np.int64), minlength=n_token).astype(np.float64)
    return np.log(counts + alpha) - np.log(len(train) + alpha * n_token)
