"""Experiment configuration: the ConfigDict schema of ``configs/*.py`` and its typed, validated form.

A config file's ``get_config()`` starts from ``base_config()`` and overrides fields; the command
line overrides more (``--config.model.n_layer=4``). ``ExperimentConfig.from_config_dict`` turns
the result into frozen dataclasses at the library boundary: an unknown key or an invalid value
fails here with a message naming it (``train.batch_siez: unknown key ...``).

Sections: ``model`` (``ModelConfig`` fields), ``data``, ``train``, ``eval``, ``mesh``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import jax
import ml_collections

from lamemo_jax.config import DTYPES, ConfigError, ModelConfig, _is_int, _py

OPTIMIZERS = ("adam", "adamw")
SCHEDULES = ("cosine", "constant")
SPLITS = ("train", "valid", "test")
REMAT_POLICIES = ("none", "full", "dots")  # train.remat (applied by lamemo_jax.sharding.remat)


# train settings that only one optimizer / schedule reads: key -> (the field, the value it needs)
CONDITIONAL_SETTINGS = {"weight_decay": ("optimizer", "adamw"), "min_learning_rate": ("schedule", "cosine")}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 8  # global batch (all processes)
    num_steps: int = 1000
    optimizer: str = "adam"
    learning_rate: float = 2.5e-4
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    schedule: str = "cosine"  # cosine from learning_rate to min_learning_rate over num_steps
    warmup_steps: int = 0
    min_learning_rate: float = 0.0
    clip: float = 0.25  # global-norm clip (of the gradient of the loss as optimised; see halve_loss)
    grad_accum_steps: int = 1  # k: each step runs the batch as k chunks of batch_size/k rows, one update
    halve_loss: bool = False  # original: backprop (loss + 0) / 2, so clip 0.25 acts like 0.5
    log_every: int = 50
    eval_every: int = 1000  # 0: only at the end
    eval_tokens: int = 0  # tokens of the validation split used by periodic evals (0: all)
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    seed: int = 0
    roll_each_epoch: bool = True  # the original's per-epoch random roll of every row-stream
    max_consecutive_nonfinite: int = 10
    progress_bar: bool = True  # only shown on a terminal
    remat: str = "none"  # jax.checkpoint of the per-segment loss: "none" | "full" | "dots" (docs/scaling.md)

    def __post_init__(self):
        _positive(self, "batch_size", "num_steps", "log_every", "checkpoint_every",
                  "grad_accum_steps", "keep_checkpoints", "max_consecutive_nonfinite")
        _nonneg(self, "warmup_steps", "eval_every", "eval_tokens", "weight_decay", "clip",
                "min_learning_rate", "seed")
        if not self.learning_rate > 0:
            raise ConfigError(f"train.learning_rate={self.learning_rate}: must be > 0")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"train.optimizer={self.optimizer!r}: choose one of {OPTIMIZERS}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"train.schedule={self.schedule!r}: choose one of {SCHEDULES}")
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"train.remat={self.remat!r}: choose one of {REMAT_POLICIES}")
        if self.warmup_steps >= self.num_steps and self.warmup_steps:
            raise ConfigError(f"train.warmup_steps={self.warmup_steps}: must be < num_steps")
        for key in ignored_train_settings(vars(self)):
            on, value = CONDITIONAL_SETTINGS[key]
            raise ConfigError(f"train.{key}={getattr(self, key)} applies only with train.{on}="
                              f"{value!r} (it is {getattr(self, on)!r}): set train.{key}=0 or "
                              f"train.{on}={value!r}")
        if self.min_learning_rate > self.learning_rate:
            raise ConfigError(f"train.min_learning_rate={self.min_learning_rate}: must be <= "
                              f"train.learning_rate={self.learning_rate} (the cosine decays to it)")


def ignored_train_settings(section: Mapping[str, Any]) -> dict:
    """{key: its default} for each of CONDITIONAL_SETTINGS set (not to its default) in a train
    section whose optimizer / schedule would ignore it."""
    default = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    return {key: default[key] for key, (on, value) in CONDITIONAL_SETTINGS.items()
            if section.get(key, default[key]) != default[key] and section.get(on, default[on]) != value}


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    tgt_len: int = 0  # 0: model.tgt_len
    mem_len: int = -1  # -1: model.mem_len
    # None: the model's (the original's eval.py keeps the trained clamp_len and same_length
    # unless told otherwise); clamp_len -1 or 0: off
    clamp_len: Optional[int] = None
    same_length: Optional[bool] = None
    batch_size: int = 16  # contiguous streams (the original's protocol)
    split: str = "test"
    # compute dtype of evaluation (the protocol's fp32, whatever the training dtype); a float64
    # model is evaluated in float64
    dtype: str = "float32"

    def __post_init__(self):
        _nonneg(self, "tgt_len")
        _positive(self, "batch_size")
        if self.mem_len < -1:
            raise ConfigError(f"eval.mem_len={self.mem_len}: must be >= 0 (or -1 = model.mem_len)")
        for f in ("clamp_len", "same_length"):  # NumPy scalars as the Python values they hold
            object.__setattr__(self, f, _py(getattr(self, f)))
        if self.clamp_len is not None and (not _is_int(self.clamp_len) or self.clamp_len < -1):
            raise ConfigError(f"eval.clamp_len={self.clamp_len!r}: must be an integer >= -1 (-1 or 0: "
                              "off), or None for the model's")
        if self.same_length is not None and not isinstance(self.same_length, bool):
            raise ConfigError(f"eval.same_length={self.same_length!r}: True, False, or None for the model's")
        if self.split not in SPLITS:
            raise ConfigError(f"eval.split={self.split!r}: choose one of {SPLITS}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"eval.dtype={self.dtype!r}: choose one of {DTYPES}")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh axes (lamemo_jax.sharding, docs/scaling.md): ``data`` (data parallel),
    ``fsdp`` (data parallel with parameters / optimizer state sharded), ``tensor`` (heads and
    d_inner split across devices). One axis may be -1: the rest of the devices."""

    data: int = -1  # -1: the rest of the devices
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self):
        for n in ("data", "fsdp", "tensor"):
            v = getattr(self, n)
            if isinstance(v, bool) or not isinstance(v, int) or (v < 1 and v != -1):
                raise ConfigError(f"mesh.{n}={v!r}: must be a positive integer or -1 (the rest)")
        if [self.data, self.fsdp, self.tensor].count(-1) > 1:
            raise ConfigError(f"mesh data={self.data} fsdp={self.fsdp} tensor={self.tensor}: "
                              "at most one axis may be -1")


def _positive(obj, *names):
    sec = type(obj).__name__.replace("Config", "").lower()
    for n in names:
        v = getattr(obj, n)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
            raise ConfigError(f"{sec}.{n}={v!r}: must be > 0")


def _nonneg(obj, *names):
    sec = type(obj).__name__.replace("Config", "").lower()
    for n in names:
        v = getattr(obj, n)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            raise ConfigError(f"{sec}.{n}={v!r}: must be >= 0")


def _build(cls, section: str, d: Mapping[str, Any]):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"{section}: unknown key(s) {unknown}; known: {sorted(names)}")
    try:
        return cls(**dict(d))
    except TypeError as e:
        raise ConfigError(f"{section}: {e}") from e


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    model: ModelConfig
    data: Mapping[str, Any]  # validated by lamemo_jax.data.load
    train: TrainConfig
    eval: EvalConfig
    mesh: MeshConfig

    @classmethod
    def from_config_dict(cls, cd) -> "ExperimentConfig":
        d = cd.to_dict() if isinstance(cd, ml_collections.ConfigDict) else dict(cd)
        unknown = sorted(set(d) - {"model", "data", "train", "eval", "mesh"})
        if unknown:
            raise ConfigError(f"unknown config section(s) {unknown}; known: data, eval, mesh, model, train")
        model = ModelConfig.from_dict(d.get("model", {}))
        return cls(model=model, data=dict(d.get("data", {})),
                   train=_build(TrainConfig, "train", d.get("train", {})),
                   eval=_build(EvalConfig, "eval", d.get("eval", {})),
                   mesh=_build(MeshConfig, "mesh", d.get("mesh", {})))

    def eval_model(self, model: Optional[ModelConfig] = None, *, tgt_len: Optional[int] = None,
                   mem_len: Optional[int] = None, clamp_len: Optional[int] = None,
                   same_length: Optional[bool] = None) -> ModelConfig:
        """``model`` (default: the model section) as evaluated: no dropout, and the evaluation
        settings. An argument given (eval.py's flags) overrides the ``eval`` section; the
        section's unset values (tgt_len 0, mem_len -1, clamp_len and same_length None) keep the
        model's. The compute dtype is eval.dtype (float32 by default: a bf16 run is validated and
        tested in float32, as the original evaluates), float64 for a float64 model."""
        e, m = self.eval, model or self.model
        if e.dtype == "float64" and not jax.config.jax_enable_x64:
            raise ConfigError("eval.dtype='float64' needs float64 enabled (jax_enable_x64): JAX would "
                              "compute in float32")
        first = lambda *values: next(v for v in values if v is not None)
        return m.replace(dtype="float64" if m.dtype == "float64" else e.dtype,
                         tgt_len=tgt_len or e.tgt_len or m.tgt_len,
                         mem_len=first(mem_len, e.mem_len if e.mem_len >= 0 else None, m.mem_len),
                         clamp_len=first(clamp_len, e.clamp_len, m.clamp_len),
                         same_length=first(same_length, e.same_length, m.same_length),
                         dropout=0.0, dropatt=0.0)


def base_config() -> ml_collections.ConfigDict:
    """Defaults of every section; config files override what they need."""
    model = {f.name: f.default for f in dataclasses.fields(ModelConfig)
             if f.default is not dataclasses.MISSING}
    model["n_token"] = 0  # must be set by the config file (the trainer checks it against the data)
    model["cutoffs"] = ()
    # typed placeholders (value None), so that --config.model.d_embed=256 parses from the command line
    model["tie_projs"] = ml_collections.config_dict.placeholder(tuple)
    model["d_embed"] = ml_collections.config_dict.placeholder(int)
    cd = ml_collections.ConfigDict()
    cd.model = ml_collections.ConfigDict(model, type_safe=False)
    cd.data = ml_collections.ConfigDict({"name": "random"}, type_safe=False)
    cd.train = ml_collections.ConfigDict(dataclasses.asdict(TrainConfig()))
    evaluation = dataclasses.asdict(EvalConfig())
    evaluation["clamp_len"] = ml_collections.config_dict.placeholder(int)  # None: the model's
    evaluation["same_length"] = ml_collections.config_dict.placeholder(bool)
    cd.eval = ml_collections.ConfigDict(evaluation)
    cd.mesh = ml_collections.ConfigDict(dataclasses.asdict(MeshConfig()))
    return cd
