"""Test setup: float64 enabled (parity checks), repo root importable, shared fixture helpers."""

import atexit
import json
import os
import shutil
import sys
import tempfile

import jax
import numpy as np
import pytest

jax.config.update("jax_enable_x64", True)

# The processes the tests start (train.py, eval.py, benchmarks, multi-process workers) share one
# persistent XLA compilation cache, in a fresh folder removed at the end (or the user's own
# JAX_COMPILATION_CACHE_DIR). Each program is still compiled once in the session; the same tiny
# train step compiled again by the next train.py of the reliability tests is loaded, the same
# executable (test_reliability.py: 218 s -> 134 s measured). Set after jax is imported, so this
# process does not write its own programs there: they rarely repeat and writing them cost as
# much as the hits saved (whole suite: 23:05 -> 22:35 with it on here too). pytest-xdist's workers
# (`-n`) start after it is set, so they inherit the folder and use it as well.
if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    _cache_dir = tempfile.mkdtemp(prefix="lamemo-tests-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

FIXTURE_DIR = os.path.join(ROOT, "tests", "fixtures", "torch-reference")
# More shapes, same format and procedure, generated with the original code (see its README.md).
EXTRA_FIXTURE_DIR = os.path.join(ROOT, "tests", "fixtures", "torch-reference-extra")
REQUIRED_FIXTURES = ["lamemo_basic", "lamemo_longmem", "lamemo_adaptive", "txl_basic", "txl_longmem",
                     "txl_adaptive"]


def _fixture_folders(root: str) -> dict:
    return {d: os.path.join(root, d) for d in (sorted(os.listdir(root)) if os.path.isdir(root) else [])
            if os.path.isfile(os.path.join(root, d, "config.json"))}


# The six above must exist; every further fixture folder of the same format (the extra folder's,
# or one dropped next to the six) is checked by the same parity tests.
_FOLDERS = {**_fixture_folders(EXTRA_FIXTURE_DIR), **_fixture_folders(FIXTURE_DIR)}
FIXTURES = REQUIRED_FIXTURES + sorted(d for d in _FOLDERS if d not in REQUIRED_FIXTURES)


def load_fixture(name: str) -> dict:
    """The files of one torch-reference fixture; fails (never skips) when they are missing."""
    d = _FOLDERS.get(name, os.path.join(FIXTURE_DIR, name))
    if not os.path.isdir(d):
        raise FileNotFoundError(f"fixture folder {d} is missing: copy ../shared/fixtures/torch-reference "
                                "into tests/fixtures/ (byte-identical)")
    return {
        "config": json.load(open(os.path.join(d, "config.json"))),
        "state_dict": dict(np.load(os.path.join(d, "state_dict.npz"))),
        "tokens": np.load(os.path.join(d, "tokens.npy")),
        "nll": np.load(os.path.join(d, "nll.npy")),
        "nll_pure64": np.load(os.path.join(d, "nll_pure64.npy")),
        "mems": dict(np.load(os.path.join(d, "mems.npz"))),
        "mems_pure64": dict(np.load(os.path.join(d, "mems_pure64.npz"))),
    }


@pytest.fixture(params=FIXTURES)
def fixture(request):
    return request.param, load_fixture(request.param)


# ---------------------------------------------------------------------- parallel runs (pytest-xdist)
# Under `-n N` each test file runs whole on one worker (--dist loadfile), so a costly
# module- or session-scoped fixture is built once: the 8-device worker process (test_sharding.py),
# a trained tiny run (test_train_eval.py), the offline corpora built afresh (test_data.py). The files
# are handed out in this order, the longest first (seconds of one sequential run on the 2-core CPU,
# 2026-11-27: ~170, ~330, ~200, ~150, ~115), so that none of them starts last and runs alone.
LONGEST_FILES = ("test_sharding.py", "test_model_properties.py", "test_reliability.py", "test_train_eval.py",
                 "test_flops.py")


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    """`-n N` without a --dist of one's own: --dist loadfile in the order of the collected items
    (not by the files' test counts). Set here, not in an ini file's addopts, so that pytest without
    pytest-xdist (e.g. an accelerator machine's image) still runs the tests in one process."""
    if getattr(config.option, "numprocesses", None) and config.option.dist == "no":
        config.option.dist = "loadfile"
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = os.path.basename(str(item.path))
        return LONGEST_FILES.index(name) if name in LONGEST_FILES else len(LONGEST_FILES)

    items.sort(key=rank)  # stable: within a file, and for the other files, the collection order


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: unknown to pytest without it
def pytest_xdist_auto_num_workers(config):
    """`-n auto`: one worker per core (the tests are mostly XLA:CPU compiles, one core each), at most
    8: more would not shorten the longest file, and each worker is a JAX process of its own (up to
    4.6 GB seen; the whole 2-worker run peaked at 10 GB). PYTEST_XDIST_AUTO_NUM_WORKERS, when set,
    decides instead (pytest-xdist reads it)."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None
    return max(1, min(8, len(os.sched_getaffinity(0))))
