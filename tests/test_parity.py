"""Parity with the original PyTorch LaMemo / Transformer-XL (golden fixtures)."""

import numpy as np
import pytest

import lamemo_jax
from lamemo_jax import convert
from tests.conftest import FIXTURES, load_fixture


def _run(fx, dtype=None):
    sd = fx["state_dict"]
    if dtype is not None:
        sd = {k: v.astype(dtype) for k, v in sd.items()}
    cfg, params = convert.from_torch(fx["config"], sd)
    nll, memory = lamemo_jax.score(cfg, params, fx["tokens"])
    return cfg, params, nll, memory


def test_fixture_set_is_complete():
    for name in FIXTURES:
        load_fixture(name)  # raises (fails) when anything is missing


def test_float64_matches_pure64_and_official(fixture):
    name, fx = fixture
    cfg, params, nll, memory = _run(fx)
    assert nll.dtype == np.float64 and nll.shape == fx["nll_pure64"].shape
    assert np.abs(nll - fx["nll_pure64"]).max() <= 1e-9, name
    assert np.abs(nll - fx["nll"]).max() <= 1e-8, name
    mems = convert.memory_to_torch(cfg, memory)
    assert len(mems) == len(fx["mems_pure64"])
    for i, m in enumerate(mems):
        ref = fx["mems_pure64"][f"mem_{i:02d}"]
        assert m.shape == ref.shape, (name, i)
        assert np.abs(m - ref).max() <= 1e-9, (name, i)


def test_float32_matches(fixture):
    name, fx = fixture
    cfg, params, nll, _ = _run(fx, np.float32)
    assert cfg.dtype == "float32" and nll.dtype == np.float32
    assert np.abs(nll - fx["nll_pure64"]).max() <= 2e-5, name


def test_memory_round_trip_and_resume(fixture):
    """memory_from_torch(official mems after S-1 segments) + last segment == full run."""
    name, fx = fixture
    cfg, params, nll_full, mem_full = _run(fx)
    n = cfg.tgt_len
    toks = fx["tokens"]
    nll_a, mem_a = lamemo_jax.score(cfg, params, toks[:, : toks.shape[1] - n])
    back = convert.memory_from_torch(cfg, convert.memory_to_torch(cfg, mem_a))
    nll_b, mem_b = lamemo_jax.score(cfg, params, toks[:, -n - 1:], memory=back)
    np.testing.assert_allclose(np.concatenate([nll_a, nll_b], 1), nll_full, rtol=0, atol=1e-12)


def test_to_torch_inverts_from_torch(fixture):
    name, fx = fixture
    cfg, params = convert.from_torch(fx["config"], fx["state_dict"])
    sd = convert.to_torch(cfg, params)
    for k, v in fx["state_dict"].items():
        if k.endswith(("train_logits_constant", "eval_logits_constant")):
            continue
        np.testing.assert_array_equal(sd[k], v, err_msg=k)


def test_converter_errors_name_the_problem():
    fx = load_fixture("lamemo_basic")
    sd = dict(fx["state_dict"])
    del sd["layers.1.dec_attn.o_net.weight"]
    with pytest.raises(convert.ConversionError, match="layers.1.dec_attn.o_net.weight"):
        convert.from_torch(fx["config"], sd)
    sd = dict(fx["state_dict"])
    sd["layers.0.dec_attn.q_net.weight"] = sd["layers.0.dec_attn.q_net.weight"][:, :5]
    with pytest.raises(convert.ConversionError, match="q_net.weight.*shape"):
        convert.from_torch(fx["config"], sd)
    sd = dict(fx["state_dict"])
    sd["crit.out_layers.0.weight"] = sd["crit.out_layers.0.weight"] + 1.0
    with pytest.raises(convert.ConversionError, match="tied"):
        convert.from_torch(fx["config"], sd)
    cfg = dict(fx["config"], attn_type=1)
    with pytest.raises(convert.ConversionError, match="attn_type=1"):
        convert.from_torch(cfg, fx["state_dict"])
    cfg = dict(fx["config"], pre_lnorm=True)
    with pytest.raises(convert.ConversionError, match="pre_lnorm"):
        convert.from_torch(cfg, fx["state_dict"])


def test_attn_type_names():
    fx = load_fixture("lamemo_basic")
    for attn_type, lookahead in ((3, "disentangled"), (33, "full")):
        cfg = convert.config_from_torch(dict(fx["config"], attn_type=attn_type))
        assert (cfg.memory, cfg.lookahead) == ("lamemo", lookahead)
    assert convert.config_from_torch(load_fixture("txl_basic")["config"]).memory == "xl"
