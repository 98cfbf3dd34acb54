"""Vocabularies of the three token units and the rules that order their ids.

* ``word``: whitespace tokens. ``<eos>`` is id 0, then the training tokens by descending count,
  ties in first-occurrence order (exactly the original ``Vocab``: ``Counter.most_common`` is a stable
  sort of a dict kept in insertion order). ``encode`` follows the file convention: every ``"\\n"``
  closes a line and adds ``<eos>``; ``decode`` turns ``<eos>`` back into ``"\\n"``.
* ``char``: one symbol per character; text8 writes the space as ``_``. Ids by descending count over
  all splits, ties by code point (the original broke ties by first occurrence; with 27 symbols over
  10^8 characters no tie occurs). ``decode`` maps ``_`` back to a space.
* ``byte``: one symbol per byte value. Ids by descending count over all splits, ties by byte value
  (the original broke ties by first occurrence in train, valid, test; this differs only for byte values
  with equal counts). ``encode`` takes ``str`` (UTF-8 encoded) or ``bytes``; newline bytes are dropped
  when the vocabulary has no newline (the enwik8 convention). ``id_to_token`` gives the byte as a
  one-character latin-1 string (``ord(token)`` is the byte value).
"""

from __future__ import annotations

import codecs
import collections
import dataclasses
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

EOS = "<eos>"
UNK = "<unk>"
SPACE_SYMBOL = "_"
UNITS = ("word", "char", "byte")


class VocabError(KeyError):
    """A token that the vocabulary does not hold (the message names it)."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable.
        return str(self.args[0]) if self.args else ""


@dataclasses.dataclass(frozen=True)
class Vocab:
    """An id <-> token map. ``symbols[i]`` is the token of id ``i``."""

    unit: str
    symbols: Tuple[str, ...]

    def __post_init__(self):
        if self.unit not in UNITS:
            raise ValueError(f"Vocab.unit={self.unit!r}: choose one of {UNITS}")
        if len(set(self.symbols)) != len(self.symbols):
            raise ValueError("Vocab.symbols holds a duplicate token")
        if self.unit == "byte" and any(len(s) != 1 or ord(s) > 255 for s in self.symbols):
            raise ValueError("a byte Vocab holds one latin-1 character per byte value")
        index = {s: i for i, s in enumerate(self.symbols)}
        object.__setattr__(self, "_index", index)
        if self.unit == "byte":
            table = np.full(256, -1, dtype=np.int32)
            for i, s in enumerate(self.symbols):
                table[ord(s)] = i
            object.__setattr__(self, "_byte_table", table)

    # ------------------------------------------------------------------ basics
    @property
    def n_token(self) -> int:
        return len(self.symbols)

    def __len__(self) -> int:
        return len(self.symbols)

    def id_to_token(self, i: int) -> str:
        if not 0 <= int(i) < len(self.symbols):
            raise IndexError(f"token id {i} is outside the vocabulary [0, {len(self.symbols)})")
        return self.symbols[int(i)]

    def token_to_id(self, token: str) -> int:
        index: Dict[str, int] = self._index  # type: ignore[attr-defined]
        if token in index:
            return index[token]
        if self.unit == "word" and UNK in index:
            return index[UNK]
        raise VocabError(f"token {token!r} is not in the {self.unit} vocabulary (n_token={self.n_token})")

    @property
    def eos_id(self) -> Optional[int]:
        return self._index.get(EOS)  # type: ignore[attr-defined]

    @property
    def unk_id(self) -> Optional[int]:
        return self._index.get(UNK)  # type: ignore[attr-defined]

    def byte_value(self, i: int) -> int:
        """The byte value of id ``i`` (byte vocabularies only)."""
        if self.unit != "byte":
            raise ValueError("byte_value() needs a byte vocabulary")
        return ord(self.id_to_token(i))

    # ------------------------------------------------------------------ text <-> ids
    def encode(self, text: Union[str, bytes]) -> np.ndarray:
        """Text -> int32 ids with the conventions of this unit (see the module docstring)."""
        if self.unit == "byte":
            raw = text.encode("utf-8") if isinstance(text, str) else bytes(text)
            arr = np.frombuffer(raw, dtype=np.uint8)
            if "\n" not in self._index:  # type: ignore[attr-defined]
                arr = arr[arr != ord("\n")]
            ids = self._byte_table[arr]  # type: ignore[attr-defined]
            if (ids < 0).any():
                bad = sorted(set(int(b) for b in arr[ids < 0]))
                raise VocabError(f"byte value(s) {bad} are not in the byte vocabulary")
            return ids.astype(np.int32)
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        if self.unit == "char":
            return np.asarray(
                [self.token_to_id(SPACE_SYMBOL if c == " " else c) for c in text], dtype=np.int32
            )
        ids: List[int] = []
        lines = text.split("\n")
        for k, line in enumerate(lines):
            ids.extend(self.token_to_id(w) for w in line.split())
            if k < len(lines) - 1:
                ids.append(self.token_to_id(EOS))
        return np.asarray(ids, dtype=np.int32)

    def stream_decoder(self):
        """For printing generated tokens as they come: ``f(id)`` returns the text that token
        completes and ``f(None)`` whatever is still pending. On a byte vocabulary the bytes of a
        multi-byte UTF-8 character are held until it is whole (``decode([id])`` one byte at a
        time would print a replacement character per byte)."""
        if self.unit != "byte":
            return lambda i: "" if i is None else self.decode([i])
        pending = codecs.getincrementaldecoder("utf-8")(errors="replace")
        return lambda i: (pending.decode(b"", final=True) if i is None
                          else pending.decode(self.id_to_token(int(i)).encode("latin-1")))

    def decode(self, ids: Iterable[int]) -> str:
        """int ids -> text (inverse of ``encode`` up to whitespace)."""
        toks = [self.id_to_token(int(i)) for i in np.asarray(ids).reshape(-1)]
        if self.unit == "byte":
            return "".join(toks).encode("latin-1").decode("utf-8", errors="replace")
        if self.unit == "char":
            return "".join(" " if t == SPACE_SYMBOL else t for t in toks)
        lines: List[str] = []
        current: List[str] = []
        for t in toks:
            if t == EOS:
                lines.append(" ".join(current))
                current = []
            else:
                current.append(t)
        return "\n".join(lines + [" ".join(current)])

    # ------------------------------------------------------------------ (de)serialisation
    def to_json(self) -> Dict[str, Any]:
        if self.unit == "byte":
            return {"unit": "byte", "byte_values": [ord(s) for s in self.symbols]}
        return {"unit": self.unit, "symbols": list(self.symbols)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Vocab":
        if d["unit"] == "byte":
            return cls("byte", tuple(chr(int(b)) for b in d["byte_values"]))
        return cls(str(d["unit"]), tuple(str(s) for s in d["symbols"]))


# ---------------------------------------------------------------------- building
def word_vocab_from_counter(counter: "collections.Counter[str]") -> Vocab:
    """``<eos>`` first, then by descending count, ties in the counter's insertion (first-occurrence) order."""
    symbols = [EOS] + [s for s, _ in counter.most_common() if s != EOS]
    return Vocab("word", tuple(symbols))


def count_words(lines: Iterable[str], counter: Optional["collections.Counter[str]"] = None) -> "collections.Counter[str]":
    """Counts ``line.split()`` tokens (no ``<eos>``, as the original ``count_file``)."""
    counter = collections.Counter() if counter is None else counter
    for line in lines:
        counter.update(line.split())
    return counter


def frequency_order(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Values sorted by descending count, ties by ascending value."""
    order = np.lexsort((values, -counts.astype(np.int64)))
    return values[order]


def byte_vocab(splits: Sequence[np.ndarray]) -> Vocab:
    """Distinct byte values of all splits (uint8 arrays), ids by descending count, ties by value."""
    counts = np.zeros(256, dtype=np.int64)
    for s in splits:
        counts += np.bincount(np.asarray(s, dtype=np.uint8), minlength=256)
    present = np.nonzero(counts)[0]
    order = frequency_order(present, counts[present])
    return Vocab("byte", tuple(chr(int(b)) for b in order))


def char_vocab(splits: Sequence[np.ndarray]) -> Vocab:
    """Distinct code points of all splits (uint32 arrays), ids by descending count, ties by code point."""
    counts = np.zeros(0, dtype=np.int64)
    for s in splits:
        c = np.bincount(np.asarray(s, dtype=np.uint32).astype(np.int64))
        if len(c) > len(counts):
            c[: len(counts)] += counts
            counts = c
        else:
            counts[: len(c)] += c
    present = np.nonzero(counts)[0]
    order = frequency_order(present, counts[present])
    return Vocab("char", tuple(chr(int(c)) for c in order))
