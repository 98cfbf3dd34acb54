"""Test setup: float64 enabled (parity checks), repo root importable, shared fixture helpers."""

import json
import os
import sys

import jax
import numpy as np
import pytest

jax.config.update("jax_enable_x64", True)

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
