"""Parity with the original PyTorch LaMemo / Transformer-XL (golden fixtures)."""

from types import SimpleNamespace

import numpy as np
import pytest

import lamemo_jax
from lamemo_jax import convert
from lamemo_jax.model import inv_freq
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
    assert np.abs(nll - fx["nll_pure64"]).max() <= 1e-10, name
    assert np.abs(nll - fx["nll"]).max() <= 1e-8, name
    mems = convert.memory_to_torch(cfg, memory)
    assert len(mems) == len(fx["mems_pure64"])
    for i, m in enumerate(mems):
        ref = fx["mems_pure64"][f"mem_{i:02d}"]
        assert m.shape == ref.shape, (name, i)
        assert np.abs(m - ref).max() <= 1e-10, (name, i)


def test_sinusoid_frequencies_are_the_fixture_buffer_bit_for_bit(fixture):
    """model.inv_freq is the original's float32 buffer exactly, on any CPU: numpy's float32 power
    was one ulp off in 3 of 12 frequencies at d_model 24 on an AVX-512 CPU (8e-10 in the NLL)."""
    name, fx = fixture
    buf = fx["state_dict"]["pos_emb.inv_freq"]
    ours = inv_freq(fx["config"]["d_model"])
    assert ours.dtype == np.float32 and ours.shape == buf.shape, name
    np.testing.assert_array_equal(ours.astype(np.float64), buf.astype(np.float64), err_msg=name)


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
    # attn_type 33 needs mem_len >= tgt_len (the original crashes): a ConversionError, by name
    cfg = dict(fx["config"], attn_type=33, mem_len=fx["config"]["tgt_len"] - 3)
    with pytest.raises(convert.ConversionError, match="attn_type=33.*mem_len"):
        convert.from_torch(cfg, fx["state_dict"])
    # options the original's forward never reads (attn_norm_type) or reads only in training
    # (half_loss) do not change the model: accepted
    other = dict(fx["config"]["other_constructor_args"], attn_norm_type=1, half_loss=True)
    cfg, _ = convert.from_torch(dict(fx["config"], other_constructor_args=other), fx["state_dict"])
    assert cfg.memory == "lamemo"


def _fake_original_module(fx, *, untie_weight=False, **options):
    """An object with the attributes of the original MemTransformerLM that _config_of_module
    reads (ties are object identity, as in the original's training script)."""
    c = fx["config"]
    emb_w = object()
    ns = SimpleNamespace
    layer = ns(pos_ff=ns(d_inner=c["d_inner"], dropout=c["dropout"], pre_lnorm=c["pre_lnorm"]),
               dec_attn=ns(dropatt=ns(p=c["dropatt"])))
    model = ns(n_token=c["n_token"], n_layer=c["n_layer"], n_head=c["n_head"], d_model=c["d_model"],
               d_head=c["d_head"], d_embed=c["d_embed"], cutoffs=list(c["cutoffs"]),
               tgt_len=c["tgt_len"], ext_len=c["ext_len"], mem_len=c["mem_len"],
               same_length=c["same_length"], attn_type=c["attn_type"], clamp_len=c["clamp_len"],
               sample_softmax=c["sample_softmax"], enhance_recurrence=False, layers=[layer],
               word_emb=ns(div_val=c["div_val"], emb_layers=[ns(weight=emb_w)], emb_projs=[]),
               crit=ns(out_layers=[ns(weight=object() if untie_weight else emb_w)], out_projs=[None]))
    for k, v in options.items():
        if k == "pre_lnorm":
            layer.pos_ff.pre_lnorm = v
        else:
            setattr(model, k, v)
    return model


def test_whole_module_checkpoint_config_reads_every_option():
    """from_torch_checkpoint on a torch.save'd model reads its options off the module: an untied
    output layer is untied (it was refused as 'should be tied'), and pre-LN / enhance_recurrence
    models are refused by name (they were converted into a different model)."""
    fx = load_fixture("txl_basic")
    args = convert._config_of_module(_fake_original_module(fx))
    assert convert.config_from_torch(args) == convert.config_from_torch(fx["config"])
    # adaptive, div_val 2: the tail projections are the embedding's objects, the head's is not
    fx_a = load_fixture("lamemo_adaptive")
    model = _fake_original_module(fx_a)
    n_out = len(fx_a["config"]["cutoffs"]) + 1
    tables = [object() for _ in range(n_out)]
    emb_projs = [object() for _ in range(n_out)]
    model.word_emb.emb_layers = [SimpleNamespace(weight=w) for w in tables]
    model.word_emb.emb_projs = emb_projs
    model.crit = SimpleNamespace(out_layers=[SimpleNamespace(weight=w) for w in tables],
                                 out_projs=[object()] + emb_projs[1:])
    args = convert._config_of_module(model)
    assert args["tie_weight"] is True and args["tie_projs"] == [False, True, True]
    assert convert.config_from_torch(args) == convert.config_from_torch(fx_a["config"])
    # sampled softmax: the original has no crit; refused by name
    model = _fake_original_module(fx, sample_softmax=10)
    del model.crit
    with pytest.raises(convert.ConversionError, match="sample_softmax"):
        convert.config_from_torch(convert._config_of_module(model))
    assert convert._config_of_module(_fake_original_module(fx, untie_weight=True))["tie_weight"] is False
    for option in ("pre_lnorm", "enhance_recurrence"):
        args = convert._config_of_module(_fake_original_module(fx, **{option: True}))
        with pytest.raises(convert.ConversionError, match=option):
            convert.config_from_torch(args)


def test_mem_len_zero_carries_no_memory_like_the_original():
    """With mem_len = 0 the original returns no memory list; the converters follow it."""
    fx = load_fixture("txl_basic")
    cfg, params = convert.from_torch(dict(fx["config"], mem_len=0), fx["state_dict"])
    n = cfg.tgt_len
    toks = fx["tokens"]
    nll_full, memory = lamemo_jax.score(cfg, params, toks)
    assert convert.memory_to_torch(cfg, memory) == []
    assert convert.memory_from_torch(cfg, []) is None and convert.memory_from_torch(cfg, None) is None
    nll_a, _ = lamemo_jax.score(cfg, params, toks[:, : toks.shape[1] - n])
    nll_b, _ = lamemo_jax.score(cfg, params, toks[:, -n - 1:], memory=convert.memory_from_torch(cfg, []))
    np.testing.assert_array_equal(np.concatenate([nll_a, nll_b], 1), nll_full)
    cfg8, _ = convert.from_torch(fx["config"], fx["state_dict"])
    with pytest.raises(ValueError, match="mem_len=8"):
        convert.memory_from_torch(cfg8, [])
    # the original's own starting memory (init_mems: one empty 1-D tensor per entry) holds nothing
    assert convert.memory_from_torch(cfg8, [np.zeros((0,))] * (cfg8.n_layer + 1)) is None
    # LaMemo cannot run without a memory in the original (it crashes): refused by name
    fx_l = load_fixture("lamemo_basic")
    with pytest.raises(convert.ConversionError, match="mem_len=0"):
        convert.from_torch(dict(fx_l["config"], mem_len=0), fx_l["state_dict"])


def test_attn_type_names():
    fx = load_fixture("lamemo_basic")
    for attn_type, lookahead in ((3, "disentangled"), (33, "full")):
        cfg = convert.config_from_torch(dict(fx["config"], attn_type=attn_type))
        assert (cfg.memory, cfg.lookahead) == ("lamemo", lookahead)
    assert convert.config_from_torch(load_fixture("txl_basic")["config"]).memory == "xl"
