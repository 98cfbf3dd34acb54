"""Pure text -> token-id conversions of the benchmark formats, and the offline corpora's text.

Everything here works on in-memory text / bytes and has no tfds dependency, so tests can call it
directly. The tfds builders (``builders.py``) only chunk what these functions produce.

* WikiText (word): ``line.split() + ["<eos>"]`` per line (a blank line is a lone ``<eos>``).
* enwik8 (byte): split the first 10^8 bytes [:-v-t] / [-v-t:-t] / [-t:]; drop byte 10 unless kept.
* text8 (char): split by characters the same way; strip each split; ``" "`` -> ``"_"``; any other
  whitespace inside a split is dropped (the original wrote one symbol per space-separated field and
  read it back with ``split()``).
* ``wikifil``: Matt Mahoney's wikifil.pl (which made text8 from enwik9), transcribed on bytes.
* ``sotu_wikitext``: State of the Union speeches -> WikiText-format lines (Moses-style tokens,
  ``@-@``/``@,@``/``@.@``, ``<unk>`` for train words seen fewer than ``min_count`` times).
"""

from __future__ import annotations

import collections
import dataclasses
import re
from typing import Dict, Iterable, Iterator, List, Sequence, Tuple

import numpy as np

from lamemo_jax.data.config import DataConfigError
from lamemo_jax.data.sources import Speech
from lamemo_jax.data.vocab import EOS, SPACE_SYMBOL, UNK, Vocab, byte_vocab, char_vocab, count_words, word_vocab_from_counter

SPLITS = ("train", "valid", "test")
CHUNK_TOKENS = 1 << 16  # tokens per tfds example


# ---------------------------------------------------------------------- split arithmetic
def split_bounds(total: int, valid_size: int, test_size: int) -> Dict[str, Tuple[int, int]]:
    """[start, stop) of train / valid / test: the last ``valid_size + test_size`` items are held out."""
    if valid_size <= 0 or test_size <= 0:
        raise DataConfigError(f"valid_size={valid_size} and test_size={test_size} must be positive")
    if valid_size + test_size >= total:
        raise DataConfigError(
            f"valid_size + test_size = {valid_size + test_size} leaves no training data out of {total}")
    t0 = total - valid_size - test_size
    return {"train": (0, t0), "valid": (t0, total - test_size), "test": (total - test_size, total)}


def fraction_sizes(total: int, valid_fraction: float, test_fraction: float) -> Tuple[int, int]:
    """(valid, test) sizes as ``round(fraction * total)`` (at least 1 each)."""
    return max(1, round(valid_fraction * total)), max(1, round(test_fraction * total))


# ---------------------------------------------------------------------- WikiText (word)
def wikitext_vocab(train_lines: Iterable[str]) -> Vocab:
    return word_vocab_from_counter(count_words(train_lines))


def encode_wikitext(lines: Iterable[str], vocab: Vocab, chunk_tokens: int = CHUNK_TOKENS) -> Iterator[np.ndarray]:
    """int32 chunks (cut at line ends, each >= ``chunk_tokens`` except the last) of
    ``line.split() + [<eos>]`` per line. Tokens missing from ``vocab`` map to ``<unk>`` when the
    vocabulary has one; otherwise ``VocabError``."""
    index = {s: i for i, s in enumerate(vocab.symbols)}
    eos = index[EOS]
    unk = index.get(UNK)
    buf: List[int] = []
    for line in lines:
        words = line.split()
        try:
            buf.extend([index[w] for w in words])
        except KeyError:
            buf.extend([index[w] if w in index else (unk if unk is not None else vocab.token_to_id(w)) for w in words])
        buf.append(eos)
        if len(buf) >= chunk_tokens:
            yield np.asarray(buf, dtype=np.int32)
            buf = []
    if buf:
        yield np.asarray(buf, dtype=np.int32)


# ---------------------------------------------------------------------- enwik8 (byte)
def byte_splits(data: bytes, valid_size: int, test_size: int, keep_newlines: bool) -> Dict[str, np.ndarray]:
    """uint8 arrays of the three splits (newline bytes dropped from each unless ``keep_newlines``)."""
    arr = np.frombuffer(data, dtype=np.uint8)
    out = {}
    for s, (a, b) in split_bounds(len(arr), valid_size, test_size).items():
        part = arr[a:b]
        out[s] = part if keep_newlines else part[part != ord("\n")]
    return out


def encode_bytes(splits: Dict[str, np.ndarray]) -> Tuple[Vocab, Dict[str, np.ndarray]]:
    vocab = byte_vocab([splits[s] for s in SPLITS])
    table = vocab._byte_table  # type: ignore[attr-defined]
    return vocab, {s: table[splits[s]].astype(np.int32) for s in SPLITS}


# ---------------------------------------------------------------------- text8 (char)
def char_splits(text: str, valid_size: int, test_size: int) -> Dict[str, np.ndarray]:
    """uint32 code-point arrays of the three splits, text8 convention (strip, space -> ``_``)."""
    out = {}
    for s, (a, b) in split_bounds(len(text), valid_size, test_size).items():
        part = text[a:b].strip().replace(" ", SPACE_SYMBOL)
        if any(c.isspace() for c in part):
            part = "".join(c for c in part if not c.isspace())
        out[s] = np.frombuffer(part.encode("utf-32-le"), dtype="<u4")
    return out


def encode_chars(splits: Dict[str, np.ndarray]) -> Tuple[Vocab, Dict[str, np.ndarray]]:
    vocab = char_vocab([splits[s] for s in SPLITS])
    top = max(ord(c) for c in vocab.symbols) + 1
    table = np.full(top, -1, dtype=np.int32)
    for i, c in enumerate(vocab.symbols):
        table[ord(c)] = i
    return vocab, {s: table[splits[s].astype(np.int64)] for s in SPLITS}


# ---------------------------------------------------------------------- wikifil.pl
_DIGITS = [(str(d).encode(), f" {w} ".encode()) for d, w in enumerate(
    "zero one two three four five six seven eight nine".split())]
_WIKIFIL_SUBS: Sequence[Tuple[re.Pattern, bytes]] = [
    (re.compile(rb"<ref[^<]*</ref>"), b""),  # remove references <ref...> ... </ref>
    (re.compile(rb"<[^>]*>"), b""),  # remove xhtml tags
    (re.compile(rb"\[http:[^\] ]*"), b"["),  # remove normal url, preserve visible text
    (re.compile(rb"\|thumb", re.I), b""),  # remove images links, preserve caption
    (re.compile(rb"\|left", re.I), b""),
    (re.compile(rb"\|right", re.I), b""),
    (re.compile(rb"\|\d+px", re.I), b""),
    (re.compile(rb"\[\[image:[^\[\]]*\|", re.I), b""),
    (re.compile(rb"\[\[category:([^|\]]*)[^\]]*\]\]", re.I), rb"[[\1]]"),  # categories without markup
    (re.compile(rb"\[\[[a-z\-]*:[^\]]*\]\]"), b""),  # remove links to other languages
    (re.compile(rb"\[\[[^\|\]]*\|"), b"[["),  # remove wiki url, preserve visible text
    (re.compile(rb"{{[^}]*}}"), b""),  # remove {{icons}} and {tables}
    (re.compile(rb"{[^}]*}"), b""),
    (re.compile(rb"\["), b""),  # remove [ and ]
    (re.compile(rb"\]"), b""),
    (re.compile(rb"&[^;]*;"), b" "),  # remove URL encoded chars
]
_FIRST_TAG = re.compile(rb"<.*>")
_REDIRECT = re.compile(rb"#redirect", re.I)
_NOT_LETTER = re.compile(rb"[^a-z]+")


def wikifil(xml: bytes) -> str:
    """Matt Mahoney's wikifil.pl on bytes: records end at ``>``; keep the ``<text ...>`` bodies of
    non-redirect pages; drop markup; lowercase; spell digits; everything but a-z -> one space.
    The result starts with a space, like text8."""
    out: List[bytes] = []
    in_text = False
    records = xml.split(b">")
    last = len(records) - 1
    for k, rec in enumerate(records):
        if k < last:
            rec += b">"
        if b"<text " in rec:
            in_text = True
        if _REDIRECT.search(rec):
            in_text = False
        if not in_text:
            continue
        if b"</text>" in rec:
            in_text = False
        rec = _FIRST_TAG.sub(b"", rec, count=1)  # remove xml tags (first '<' to last '>' of a line)
        rec = rec.replace(b"&amp;", b"&").replace(b"&lt;", b"<").replace(b"&gt;", b">")
        for pat, rep in _WIKIFIL_SUBS:
            rec = pat.sub(rep, rec)
        rec = (b" " + rec + b" ").lower()  # tr/A-Z/a-z/ (ASCII only, as Perl on bytes)
        for d, w in _DIGITS:
            rec = rec.replace(d, w)
        rec = _NOT_LETTER.sub(b" ", rec)  # tr/a-z/ /cs
        out.append(rec[:-1])  # chop
    return b"".join(out).decode("ascii")


# ---------------------------------------------------------------------- sotu -> WikiText format
_NORMALIZE = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u00a0": " "})
_HYPHEN = re.compile(r"(?<=[^\W_])-(?=[^\W_])")
_NUM_COMMA = re.compile(r"(?<=\d),(?=\d)")
_NUM_POINT = re.compile(r"(?<=\d)\.(?=\d)")
_CLITIC = re.compile(r"(?<=[^\W\d_])'(?=[^\W\d_])")
_TOKEN = re.compile(r"(?:[^\W\d_]\.){2,}|\.\.\.|-{2,}|\x04[^\W_]+|[^\W_]+|[\x01\x02\x03]|\S")
_PLACEHOLDERS = {"\x01": "@-@", "\x02": "@,@", "\x03": "@.@"}


def moses_like_tokens(text: str) -> List[str]:
    """WikiText-style (Moses-like) tokens of one paragraph: punctuation split off; ``a-b`` ->
    ``a @-@ b``; ``1,000.5`` -> ``1 @,@ 000 @.@ 5``; ``don't`` -> ``don 't``; ``U.S.`` kept whole;
    case kept."""
    s = text.translate(_NORMALIZE)
    s = _HYPHEN.sub(" \x01 ", s)
    s = _NUM_COMMA.sub(" \x02 ", s)
    s = _NUM_POINT.sub(" \x03 ", s)
    s = _CLITIC.sub(" \x04", s)
    toks = []
    for t in _TOKEN.findall(s):
        if t in _PLACEHOLDERS:
            toks.append(_PLACEHOLDERS[t])
        elif t.startswith("\x04"):
            toks.append("'" + t[1:])
        else:
            toks.append(t)
    return toks


def speech_lines(sp: Speech) -> List[List[str]]:
    """One document in WikiText layout: blank, `` = Title = ``, blank, one line per paragraph."""
    title = moses_like_tokens(f"State of the Union {sp.year} ( {sp.president} )")
    lines: List[List[str]] = [[], ["="] + title + ["="], []]
    for para in re.split(r"\n\s*\n", sp.text.strip()):
        toks = moses_like_tokens(" ".join(para.split()))
        if toks:
            lines.append(toks)
    return lines


@dataclasses.dataclass(frozen=True)
class DocumentSplit:
    train: Tuple[str, ...]
    valid: Tuple[str, ...]
    test: Tuple[str, ...]


def split_documents(doc_ids: Sequence[str], sizes: Sequence[int], valid_fraction: float, test_fraction: float) -> DocumentSplit:
    """Whole documents, in order: test = the last documents whose sizes first reach
    ``test_fraction`` of the total, valid = the documents before them reaching ``valid_fraction``."""
    total = float(sum(sizes))
    idx = len(doc_ids)
    held: List[List[str]] = []
    for frac in (test_fraction, valid_fraction):
        got, part = 0.0, []
        while idx > 1 and got < frac * total:
            idx -= 1
            part.insert(0, doc_ids[idx])
            got += sizes[idx]
        held.append(part)
    if idx < 1 or not held[0] or not held[1]:
        raise DataConfigError(f"valid_fraction={valid_fraction}, test_fraction={test_fraction} leave no training document")
    return DocumentSplit(tuple(doc_ids[:idx]), tuple(held[1]), tuple(held[0]))


def sotu_wikitext(speeches: Sequence[Speech], valid_fraction: float, test_fraction: float,
                  min_count: int) -> Tuple[Dict[str, List[str]], DocumentSplit]:
    """WikiText-format lines (``" tok tok "``) per split. Train tokens seen fewer than ``min_count``
    times, and valid/test tokens outside the kept train vocabulary, become ``<unk>``."""
    docs = {sp.fileid: speech_lines(sp) for sp in speeches}
    ids = [sp.fileid for sp in speeches]
    split = split_documents(ids, [sum(len(l) for l in docs[i]) for i in ids], valid_fraction, test_fraction)
    counts: "collections.Counter[str]" = collections.Counter()
    for i in split.train:
        for line in docs[i]:
            counts.update(line)
    keep = {w for w, c in counts.items() if c >= min_count}
    out: Dict[str, List[str]] = {}
    for s in SPLITS:
        lines = []
        for i in getattr(split, s):
            for line in docs[i]:
                lines.append(" " + " ".join(w if w in keep else UNK for w in line) + " " if line else " ")
        out[s] = lines
    return out, split
