"""Inputs that used to fail deep inside (or silently): conversion of half-precision original state
dicts, and errors that name the problem (the key, the argument, the shape, the token id)."""

import jax
import ml_dtypes
import numpy as np
import pytest

import lamemo_jax
from lamemo_jax import ModelConfig, convert
from tests.conftest import load_fixture


def _cast(sd, dtype):
    return {k: v.astype(dtype) for k, v in sd.items()}


def test_float16_state_dict_converts_and_scores():
    """The original's --fp16 runs call model.half(), which casts the pos_emb.inv_freq buffer too:
    its float16 rounding (~5e-4 relative) was refused by a float32 tolerance."""
    fx = load_fixture("lamemo_basic")
    cfg, params = convert.from_torch(fx["config"], _cast(fx["state_dict"], np.float16))
    assert cfg.dtype == "float16" and params["r_w_bias"].dtype == np.float16
    nll, _ = lamemo_jax.score(cfg, params, fx["tokens"])
    assert nll.dtype == np.float32 and nll.shape == fx["nll"].shape
    # float16 weights (and float16 compute) against the original's float64 NLL (~4.3 per token):
    # measured 1.05e-3 max abs on the CPU (each weight rounded by up to 2^-11 relative); 5e-3
    # leaves ~5x margin, while a wrong model (e.g. another sinusoid) is off by > 0.1.
    assert np.abs(nll - fx["nll"]).max() <= 5e-3


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float32])
def test_wrong_sinusoid_frequencies_are_still_refused(dtype):
    fx = load_fixture("lamemo_basic")
    d = fx["config"]["d_model"]
    sd = _cast(fx["state_dict"], dtype)
    sd["pos_emb.inv_freq"] = (1.0 / 1000.0 ** (np.arange(0, d, 2) / d)).astype(dtype)  # base 1000
    with pytest.raises(convert.ConversionError, match=r"pos_emb\.inv_freq.*differs"):
        convert.from_torch(fx["config"], sd)


def test_bfloat16_state_dict_converts():
    """ml_dtypes' bfloat16 has dtype.kind 'V': it gave 'state_dict mixes float dtypes []'."""
    fx = load_fixture("lamemo_basic")
    cfg, params = convert.from_torch(fx["config"], _cast(fx["state_dict"], ml_dtypes.bfloat16))
    assert cfg.dtype == "bfloat16" and params["r_w_bias"].dtype == ml_dtypes.bfloat16
    sd = _cast(fx["state_dict"], ml_dtypes.bfloat16)
    sd["r_w_bias"] = sd["r_w_bias"].astype(np.float32)
    with pytest.raises(convert.ConversionError, match=r"mixes float dtypes \['bfloat16', 'float32'\]"):
        convert.from_torch(fx["config"], sd)


def test_config_missing_a_required_key_names_it():
    fx = load_fixture("lamemo_basic")
    config = {k: v for k, v in fx["config"].items() if k != "n_head"}
    with pytest.raises(convert.ConversionError, match=r"missing required key\(s\) \['n_head'\]"):
        convert.from_torch(config, fx["state_dict"])
    with pytest.raises(convert.ConversionError, match="'d_inner', 'tgt_len'"):
        convert.config_from_torch({k: v for k, v in fx["config"].items()
                                   if k not in ("d_inner", "tgt_len")})


def test_memory_from_torch_wrong_shapes_name_the_tensor():
    fx = load_fixture("lamemo_basic")
    cfg, _ = convert.from_torch(fx["config"], fx["state_dict"])
    mems = [fx["mems"][f"mem_{i:02d}"] for i in range(2 * cfg.n_layer + 1)]  # [8, 2, ...]
    assert convert.memory_from_torch(cfg, mems) is not None
    bad = list(mems)
    bad[1] = np.zeros((8, 3, 2, 16), np.float32)  # batch 3 after mems[0]'s batch 2
    with pytest.raises(ValueError, match=r"mems\[1\] \(layer 0 attn\) has shape \(8, 3, 2, 16\); "
                                         r"expected \(8, 2, 2, 16\)"):
        convert.memory_from_torch(cfg, bad)
    bad = list(mems)
    bad[4] = bad[4][:5]  # fewer tokens than mems[0]
    with pytest.raises(ValueError, match=r"mems\[4\] \(layer 1 lse\) has shape \(5, 2, 2\)"):
        convert.memory_from_torch(cfg, bad)
    with pytest.raises(ValueError, match=r"mems\[0\] has shape \(8,\)"):
        convert.memory_from_torch(cfg, [np.zeros(8)] + mems[1:])
    fx = load_fixture("txl_basic")
    cfg, _ = convert.from_torch(fx["config"], fx["state_dict"])
    mems = [fx["mems"][f"mem_{i:02d}"] for i in range(cfg.n_layer + 1)]
    mems[2] = mems[2][..., :-1]
    with pytest.raises(ValueError, match=r"mems\[2\] \(layer 1 output\) has shape"):
        convert.memory_from_torch(cfg, mems)


def _small():
    cfg = ModelConfig(n_token=50, n_layer=1, n_head=2, d_model=16, d_head=8, d_inner=32, tgt_len=8,
                      mem_len=8)
    return cfg, lamemo_jax.init_params(cfg, jax.random.key(0))


def test_run_segments_checks_concrete_token_ids():
    """run_segments scans over segments, where apply sees tracers and cannot check the ids: an id
    >= n_token gave NaN silently."""
    cfg, params = _small()
    mem = lamemo_jax.init_memory(cfg, 2)
    ok = np.ones((2, 4, 8), np.int32)
    with pytest.raises(ValueError, match=r"inputs_BSN holds token id 50 outside the vocabulary \[0, 50\)"):
        lamemo_jax.run_segments(cfg, params, np.full((2, 4, 8), 50, np.int32), ok, mem)
    bad = ok.copy()
    bad[1, 2, 3] = -1
    with pytest.raises(ValueError, match=r"targets_BSN holds token id -1 outside"):
        lamemo_jax.run_segments(cfg, params, ok, bad, mem)
    with pytest.raises(ValueError, match=r"inputs_BSN must be int \[B, S, N\]; got shape \(2, 32\)"):
        lamemo_jax.run_segments(cfg, params, ok.reshape(2, 32), ok, mem)
    with pytest.raises(ValueError, match=r"start_of_sequence_BS has shape \(2,\); needs \[B, S\] = \(2, 4\)"):
        lamemo_jax.run_segments(cfg, params, ok, ok, mem, start_of_sequence_BS=np.ones(2, bool))
    nll, _ = lamemo_jax.run_segments(cfg, params, ok, ok, mem)
    assert nll.shape == (2, 4, 8) and np.isfinite(np.asarray(nll)).all()


def test_apply_checks_segment_length_and_start_of_sequence():
    cfg, params = _small()
    mem = lamemo_jax.init_memory(cfg, 2)
    with pytest.raises(ValueError, match=r"tokens has shape \(2, 0\): a segment needs at least one token"):
        lamemo_jax.apply(cfg, params, np.ones((2, 0), np.int32), mem)
    with pytest.raises(ValueError, match=r"start_of_sequence has shape \(3,\); needs \[B\] = \(2,\)"):
        lamemo_jax.apply(cfg, params, np.ones((2, 8), np.int32), mem,
                         start_of_sequence=np.array([True, False, True]))
    out, _ = lamemo_jax.apply(cfg, params, np.ones((2, 8), np.int32), mem,
                              start_of_sequence=np.array([True, False]))
    assert out.log_probs.shape == (2, 8, 50)
