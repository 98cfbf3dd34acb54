"""Configs: validation errors name the field; every config file loads and builds its model."""

import glob
import importlib
import os

import jax
import numpy as np
import pytest

import lamemo_jax
from lamemo_jax import ModelConfig
from lamemo_jax.config import ConfigError
from lamemo_jax.experiment import ExperimentConfig
from lamemo_jax.evaluate import evaluate_tokens
from tests.conftest import ROOT

CONFIG_FILES = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                      if not p.endswith("__init__.py"))


@pytest.mark.parametrize("kw,field", [
    (dict(memory="fifo"), "memory"),
    (dict(lookahead="31"), "lookahead"),
    (dict(cutoffs=(20, 10)), "cutoffs"),
    (dict(cutoffs=(20, 50)), "cutoffs"),
    (dict(mem_len=-3), "mem_len"),
    (dict(tgt_len=0), "tgt_len"),
    (dict(clamp_len=-5), "clamp_len"),
    (dict(dropout=1.5), "dropout"),
    (dict(d_model=33, d_head=11, n_head=3), "d_model"),
    (dict(dtype="float8"), "dtype"),
    (dict(memory="lamemo", lookahead="full", mem_len=4, tgt_len=8), "mem_len"),
    (dict(cutoffs=(10,), tie_projs=(False,)), "tie_projs"),
    (dict(mem_len=True), "mem_len"),  # a bool is not a length
    (dict(clamp_len=True), "clamp_len"),
    (dict(tie_weight="false"), "tie_weight"),  # a non-empty string is truthy: never guess
    (dict(same_length="no"), "same_length"),
    (dict(cutoffs=(10,), tie_projs=("no", True)), "tie_projs"),
    (dict(lookahead_eps=float("inf")), "lookahead_eps"),
    (dict(lookahead_eps=float("nan")), "lookahead_eps"),
    (dict(dropout=True), "dropout"),
    (dict(tgt_len=8.0), "tgt_len"),
])
def test_invalid_model_config_names_the_field(kw, field):
    base = dict(n_token=50, n_layer=1, n_head=2, d_model=8, d_head=4, d_inner=16)
    base.update(kw)
    with pytest.raises(ConfigError, match=f"ModelConfig.{field}"):
        ModelConfig(**base)


def test_numpy_scalars_mean_their_python_values():
    cfg = ModelConfig(n_token=np.int64(50), n_layer=1, n_head=2, d_model=8, d_head=4, d_inner=16,
                      tgt_len=np.int32(8), mem_len=np.int64(4), same_length=np.bool_(True),
                      dropout=np.float32(0.25), cutoffs=[np.int64(10)], tie_projs=[np.bool_(False), True])
    assert cfg == ModelConfig(n_token=50, n_layer=1, n_head=2, d_model=8, d_head=4, d_inner=16,
                              tgt_len=8, mem_len=4, same_length=True, dropout=0.25, cutoffs=(10,),
                              tie_projs=(False, True))
    assert type(cfg.tgt_len) is int and type(cfg.same_length) is bool


def test_unknown_keys_are_rejected():
    with pytest.raises(ConfigError, match="n_layers"):
        ModelConfig.from_dict({"n_token": 10, "n_layers": 2})
    cd = importlib.import_module("configs.wt103").get_config()
    cd.train.batch_siez = 3
    with pytest.raises(ConfigError, match="batch_siez"):
        ExperimentConfig.from_config_dict(cd)
    cd = importlib.import_module("configs.wt103").get_config()
    cd.train.optimizer = "sgd"
    with pytest.raises(ConfigError, match="train.optimizer"):
        ExperimentConfig.from_config_dict(cd)


@pytest.mark.parametrize("train, match", [
    (dict(weight_decay=0.1), r"train.weight_decay=0.1 applies only with train.optimizer='adamw'"),
    (dict(schedule="constant", min_learning_rate=1e-4), r"min_learning_rate=0.0001 applies only with "
                                                        r"train.schedule='cosine'"),
    (dict(learning_rate=1e-3, min_learning_rate=2e-3), r"min_learning_rate=0.002: must be <= "),
])
def test_settings_the_optimizer_or_schedule_would_ignore_are_errors(train, match):
    cd = importlib.import_module("configs.wt103").get_config()
    cd.train.update(train)
    with pytest.raises(ConfigError, match=match):
        ExperimentConfig.from_config_dict(cd)
    cd.train.update(optimizer="adamw", schedule="cosine", min_learning_rate=0.0)  # where they apply
    ExperimentConfig.from_config_dict(cd)


def test_a_run_recorded_before_the_checks_loads_as_it_trained(caplog):
    """A config.json holding settings its run ignored (and that are errors now) loads with them at
    their defaults and a warning naming them; any other bad value is an error naming the file."""
    from lamemo_jax.trainer import recorded_experiment
    info = importlib.import_module("configs.default").get_config().to_dict()
    info["train"].update(schedule="constant", optimizer="adam", weight_decay=0.01)  # min_learning_rate 1e-4
    info["data"]["seed"] = 3
    with caplog.at_level("WARNING"):
        exp = recorded_experiment(info, "/runs/a/config.json")
    assert (exp.train.min_learning_rate, exp.train.weight_decay, exp.data["seed"]) == (0.0, 0.0, 0)
    assert exp.train.schedule == "constant" and exp.train.learning_rate == info["train"]["learning_rate"]
    msg = " ".join(r.getMessage() for r in caplog.records)
    for part in ("/runs/a/config.json", "train.min_learning_rate=0.0001", "train.weight_decay=0.01",
                 "data.seed=3"):
        assert part in msg, msg
    info["train"]["batch_size"] = 0
    with pytest.raises(ConfigError, match=r"/runs/a/config.json: .*batch_size"):
        recorded_experiment(info, "/runs/a/config.json")


def test_evaluation_keeps_the_models_clamp_len_and_same_length_unless_told():
    """As the original's eval.py: the trained model's clamp_len / same_length, unless the eval
    section or eval.py's flags set them (the same function serves the trainer and eval.py)."""
    cd = importlib.import_module("configs.tiny").get_config()
    cd.model.update(clamp_len=5, same_length=True, dropout=0.1)
    exp = ExperimentConfig.from_config_dict(cd)
    assert exp.eval.clamp_len is None and exp.eval.same_length is None
    m = exp.eval_model()
    assert (m.clamp_len, m.same_length, m.dropout, m.tgt_len, m.mem_len) == (5, True, 0.0, 16, 16)
    cd.eval.update(clamp_len=-1, same_length=False, tgt_len=8, mem_len=32)
    exp = ExperimentConfig.from_config_dict(cd)
    m = exp.eval_model()
    assert (m.clamp_len, m.same_length, m.tgt_len, m.mem_len) == (-1, False, 8, 32)
    m = exp.eval_model(exp.model.replace(n_token=7), clamp_len=3, same_length=True, tgt_len=4, mem_len=0)
    assert (m.clamp_len, m.same_length, m.tgt_len, m.mem_len, m.n_token) == (3, True, 4, 0, 7)
    from lamemo_jax.experiment import EvalConfig  # NumPy scalars mean their Python values
    assert EvalConfig(clamp_len=np.int64(5), same_length=np.bool_(True)) == EvalConfig(clamp_len=5, same_length=True)
    for bad in (dict(clamp_len=-2), dict(same_length=1)):
        with pytest.raises(ConfigError, match="eval." + next(iter(bad))):
            ExperimentConfig.from_config_dict({**cd.to_dict(), "eval": {**cd.eval.to_dict(), **bad}})


def test_evaluation_computes_in_float32_whatever_the_training_dtype():
    """The protocol evaluates in fp32 (the original casts the model to float before eval): a bf16
    run is validated and tested in float32, unless eval.dtype says otherwise; float64 stays."""
    cd = importlib.import_module("configs.tiny").get_config()
    for train_dtype, eval_dtype, want in (("bfloat16", None, "float32"), ("float32", None, "float32"),
                                          ("float64", None, "float64"), ("bfloat16", "bfloat16", "bfloat16"),
                                          ("float64", "bfloat16", "float64")):
        cd.model.dtype = train_dtype
        if eval_dtype:
            cd.eval.dtype = eval_dtype
        exp = ExperimentConfig.from_config_dict(cd)
        assert exp.eval_model().dtype == want, (train_dtype, eval_dtype)
        assert exp.eval_model().param_dtype == exp.model.param_dtype
    with jax.enable_x64(False):
        cd.model.dtype, cd.eval.dtype = "float32", "float64"
        with pytest.raises(ConfigError, match="eval.dtype='float64' needs float64 enabled"):
            ExperimentConfig.from_config_dict(cd).eval_model()
        cd.eval.dtype = "float32"
    with pytest.raises(ConfigError, match="eval.dtype='fp32'"):
        ExperimentConfig.from_config_dict({**cd.to_dict(), "eval": {**cd.eval.to_dict(), "dtype": "fp32"}})
    cfg = exp.model.replace(dtype="float32", n_token=11)
    params = lamemo_jax.init_params(cfg, jax.random.key(0))
    res = evaluate_tokens(cfg, params, np.arange(200, dtype=np.int32) % 11, batch_size=2)
    assert res.protocol["dtype"] == "float32"


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_config_file_loads_and_builds(name):
    mod = importlib.import_module(f"configs.{name}")
    assert mod.__doc__ and "python train.py" in mod.__doc__, f"configs/{name}.py must document its command"
    exp = ExperimentConfig.from_config_dict(mod.get_config())
    for memory in ("lamemo", "xl"):
        cfg = exp.model.replace(memory=memory)
        shapes = jax.eval_shape(lambda: lamemo_jax.init_params(cfg, jax.random.key(0)))
        assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) > 0
        mem = jax.eval_shape(lambda: lamemo_jax.init_memory(cfg, 2))
        assert mem.length.shape == (2,)


@pytest.mark.parametrize("name,memory,count", [
    ("wt103", "lamemo", 151_106_715), ("wt103", "xl", 151_106_305),
    ("enwik8", "lamemo", 41_055_948), ("enwik8", "xl", 41_055_436),
    ("text8", "lamemo", 40_965_147), ("text8", "xl", 40_964_635),
])
def test_paper_parameter_counts(name, memory, count):
    mod = importlib.import_module(f"configs.{name}")
    assert f"{count:,}" in mod.__doc__, "the docstring must state the parameter count"
    cfg = ExperimentConfig.from_config_dict(mod.get_config()).model.replace(memory=memory)
    shapes = jax.eval_shape(lambda: lamemo_jax.init_params(cfg, jax.random.key(0)))
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == count


def _leaves(cd, prefix=""):
    from ml_collections import config_dict
    for k in cd.keys():
        v = cd[k]
        if isinstance(v, config_dict.ConfigDict):
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v, cd.get_type(k)


@pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")  # inside ml_collections
@pytest.mark.parametrize("name", CONFIG_FILES)
def test_every_unset_field_can_be_set_from_the_command_line(name):
    """Fields left None (data.manual_dir, model.d_embed, ...) must be typed placeholders: absl
    refuses to override a plain None ('Type NoneType ... is not supported for overriding')."""
    from absl import flags
    from ml_collections import config_flags
    sample = {str: ("/tmp/lamemo_manual", "/tmp/lamemo_manual"), int: ("3", 3), float: ("0.25", 0.25),
              tuple: ("(True,)", (True,)), bool: ("True", True)}
    cd = importlib.import_module(f"configs.{name}").get_config()
    unset = [(path, typ) for path, value, typ in _leaves(cd) if value is None]
    assert "data.manual_dir" in [p for p, _ in unset]
    for path, typ in unset:
        assert typ in sample, f"configs/{name}.py: {path} is None without a type (use config_dict.placeholder)"
        text, value = sample[typ]
        argv = ["prog", f"--config={os.path.join(ROOT, 'configs', name + '.py')}", f"--config.{path}={text}"]
        fv = flags.FlagValues()
        config_flags.DEFINE_config_file("config", flag_values=fv, sys_argv=argv)  # as train.py's flag
        fv(argv)
        got = fv.config
        for part in path.split("."):
            got = got[part]
        assert got == value, (name, path, got)


def test_configs_and_the_train_step_need_no_tensorflow_datasets():
    """A GPU machine's image may have jax but not tensorflow-datasets: a config file, the model and
    the benchmarks' train step must still import (tfds loads with the data pipeline, on first use)."""
    import subprocess
    import sys
    code = ("import sys; sys.modules['tensorflow_datasets'] = None\n"
            "import benchmarks.throughput as t, benchmarks.profile_step, lamemo_jax.trainer\n"
            "print(t.load_config_file('configs/wt103.py').model.n_token)\n"
            "import lamemo_jax.data as d\n"
            "try:\n    d.load\nexcept ImportError as e:\n    print('lazy', e.name)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["267735", "lazy", "tensorflow_datasets"]
