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
REQUIRED_FIXTURES = ["lamemo_basic", "lamemo_longmem", "lamemo_adaptive", "txl_basic", "txl_longmem",
                     "txl_adaptive"]
# The six above must exist; any further fixture folder of the same format dropped next to them
# (other shapes and seeds) is checked by the same parity tests.
FIXTURES = REQUIRED_FIXTURES + sorted(
    d for d in (os.listdir(FIXTURE_DIR) if os.path.isdir(FIXTURE_DIR) else [])
    if d not in REQUIRED_FIXTURES and os.path.isfile(os.path.join(FIXTURE_DIR, d, "config.json")))


def load_fixture(name: str) -> dict:
    """The files of one torch-reference fixture; fails (never skips) when they are missing."""
    d = os.path.join(FIXTURE_DIR, name)
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
