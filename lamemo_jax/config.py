"""ModelConfig: the frozen, validated description of a LaMemo / Transformer-XL language model.

Field names follow the original implementation's hyper-parameters (``MemTransformerLM``), with
names by meaning where the original used integers:

* ``memory="xl"`` is Transformer-XL (original ``attn_type 0``), ``memory="lamemo"`` is LaMemo.
* ``lookahead`` picks LaMemo's look-ahead variant (the original's ablations):
  ``"disentangled"`` (attn_type 3, the paper's model: separate future position bias v_),
  ``"signed"`` (31: signed Transformer-XL distances with the shared v),
  ``"future_content_bias"`` (32: like 3 plus a separate future content bias u_),
  ``"full"`` (33: the whole window without the causal mask, distance |c-p|; needs mem_len >= tgt_len).

Every invalid value fails at construction with a ``ConfigError`` naming the field.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional, Tuple

import numpy as np

MEMORY_TYPES = ("xl", "lamemo")
LOOKAHEAD_VARIANTS = ("disentangled", "signed", "future_content_bias", "full")
DTYPES = ("float32", "float64", "bfloat16", "float16")
ATTENTION_IMPLS = ("auto", "xla", "pallas", "pallas_interpret")


class ConfigError(ValueError):
    """An invalid configuration value; the message names the field."""


_INT_FIELDS = ("n_token", "n_layer", "n_head", "d_model", "d_head", "d_inner", "d_embed", "div_val",
               "tgt_len", "mem_len", "clamp_len", "softmax_chunk")
_BOOL_FIELDS = ("tie_weight", "same_length", "pad_layer_matmuls")
_RATE_FIELDS = ("dropout", "dropatt")


def _py(v):
    """A NumPy scalar as the Python value it holds; anything else as it is."""
    return v.item() if isinstance(v, np.generic) else v


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    n_token: int
    n_layer: int = 2
    n_head: int = 2
    d_model: int = 32
    d_head: int = 16
    d_inner: int = 64
    d_embed: Optional[int] = None  # None: d_model
    div_val: int = 1
    cutoffs: Tuple[int, ...] = ()
    tie_weight: bool = True
    tie_projs: Optional[Tuple[bool, ...]] = None  # None: [False] + [True]*len(cutoffs), as the original scripts
    dropout: float = 0.0
    dropatt: float = 0.0
    tgt_len: int = 8
    mem_len: int = 8
    clamp_len: int = -1  # <= 0: off (the original's -1)
    same_length: bool = False
    memory: str = "lamemo"
    lookahead: str = "disentangled"
    lookahead_eps: float = 1e-6  # the original's eps in alpha; 0.0 = exact online-softmax merge (non-default)
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    attention_impl: str = "auto"
    # > 0 computes the loss against targets (training, and evaluation's NLL) as a fused
    # cross-entropy over chunks of this many tokens (each cluster of an adaptive softmax on its
    # own), never materialising the [tokens, n_token] logits (forward or backward); 0 = off.
    softmax_chunk: int = 0
    # True zero-pads every layer matmul (the Dense projections: q/k/v, r_net, o_net, FFN) to
    # sizes that are multiples of 8 on a GPU / TPU: exact, parameters unchanged. On a CPU it
    # changes nothing (the same program). The output layer always pads there. Measured on an
    # H100 at the wt103 config (bf16): LaMemo 117.7 -> 101.6 ms/step, Transformer-XL 81.4 ->
    # 72.9 ms (docs/benchmarks.md). False keeps the paper's odd sizes in every matmul.
    pad_layer_matmuls: bool = True

    def __post_init__(self):
        # NumPy scalars (np.int64(8) from an array, np.bool_) mean the same as Python's; anything
        # else of the wrong type fails in _validate (a bool is not a length, "false" is not False)
        for f in _INT_FIELDS + _BOOL_FIELDS + _RATE_FIELDS + ("lookahead_eps",):
            object.__setattr__(self, f, _py(getattr(self, f)))
        for f in ("cutoffs", "tie_projs"):
            if isinstance(getattr(self, f), (list, tuple)):
                object.__setattr__(self, f, tuple(_py(v) for v in getattr(self, f)))
        self._validate()

    # ------------------------------------------------------------------ validation
    def _fail(self, field: str, why: str):
        raise ConfigError(f"ModelConfig.{field}={getattr(self, field)!r}: {why}")

    def _validate(self):
        for f in ("n_token", "n_layer", "n_head", "d_model", "d_head", "d_inner", "tgt_len"):
            v = getattr(self, f)
            if not _is_int(v) or v <= 0:
                self._fail(f, "must be a positive integer" + (
                    " (the vocabulary size of the data; the trainer names it when it does not match)"
                    if f == "n_token" else ""))
        if not _is_int(self.mem_len) or self.mem_len < 0:
            self._fail("mem_len", "must be an integer >= 0")
        if not _is_int(self.clamp_len) or self.clamp_len < -1:
            self._fail("clamp_len", "must be an integer >= -1 (-1 or 0 switch clamping off)")
        if self.d_embed is not None and (not _is_int(self.d_embed) or self.d_embed <= 0):
            self._fail("d_embed", "must be a positive integer or None (= d_model)")
        if self.d_model % 2:
            self._fail("d_model", "must be even (sinusoid position embedding halves)")
        if not _is_int(self.div_val) or self.div_val < 1:
            self._fail("div_val", "must be an integer >= 1")
        for f in _BOOL_FIELDS:
            if not isinstance(getattr(self, f), bool):
                self._fail(f, "must be True or False")
        if not isinstance(self.cutoffs, tuple):
            self._fail("cutoffs", "must be a sequence of integers")
        prev = 0
        for c in self.cutoffs:
            if not _is_int(c) or c <= prev:
                self._fail("cutoffs", "must be strictly increasing positive integers")
            prev = c
        if self.cutoffs and self.cutoffs[-1] >= self.n_token:
            self._fail("cutoffs", f"every cutoff must be below n_token={self.n_token}")
        if self.div_val > 1:
            for i in range(len(self.cutoffs) + 1):
                if self.d_embed_ // (self.div_val ** i) < 1:
                    self._fail("div_val", f"d_embed // div_val**{i} is 0 for cluster {i}")
        if self.tie_projs is not None:
            if not isinstance(self.tie_projs, tuple) or not all(isinstance(t, bool) for t in self.tie_projs):
                self._fail("tie_projs", "must be None or a sequence of True/False, one per cluster")
            if len(self.tie_projs) != len(self.cutoffs) + 1:
                self._fail("tie_projs", f"needs one entry per cluster ({len(self.cutoffs) + 1})")
        for f in _RATE_FIELDS:
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0.0 <= v < 1.0):
                self._fail(f, "must be a rate in [0, 1)")
        if self.memory not in MEMORY_TYPES:
            self._fail("memory", f"unknown memory type; choose one of {MEMORY_TYPES}")
        if self.lookahead not in LOOKAHEAD_VARIANTS:
            self._fail("lookahead", f"unknown look-ahead variant; choose one of {LOOKAHEAD_VARIANTS}")
        if self.memory == "lamemo" and self.lookahead == "full" and self.mem_len < self.tgt_len:
            self._fail("mem_len", "lookahead='full' needs mem_len >= tgt_len (as the original)")
        if isinstance(self.lookahead_eps, bool) or not isinstance(self.lookahead_eps, (int, float)) \
                or not 0 <= self.lookahead_eps < math.inf:
            self._fail("lookahead_eps", "must be a finite number >= 0")
        for f in ("dtype", "param_dtype"):
            if getattr(self, f) not in DTYPES:
                self._fail(f, f"unknown dtype; choose one of {DTYPES}")
        if self.attention_impl not in ATTENTION_IMPLS:
            self._fail("attention_impl", f"choose one of {ATTENTION_IMPLS}")
        if not _is_int(self.softmax_chunk) or self.softmax_chunk < 0:
            self._fail("softmax_chunk", "must be an integer >= 0 (0 = off)")

    # ------------------------------------------------------------------ derived
    @property
    def d_embed_(self) -> int:
        return self.d_model if self.d_embed is None else self.d_embed

    @property
    def tie_projs_(self) -> Tuple[bool, ...]:
        if self.tie_projs is not None:
            return self.tie_projs
        return (False,) + (True,) * len(self.cutoffs)

    @property
    def n_clusters(self) -> int:
        return len(self.cutoffs)

    @property
    def cutoff_ends(self) -> Tuple[int, ...]:
        return (0,) + tuple(self.cutoffs) + (self.n_token,)

    @property
    def clamp(self) -> Optional[int]:
        return self.clamp_len if self.clamp_len > 0 else None

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        """Builds from a mapping (e.g. a ConfigDict's ``model`` section); unknown keys fail."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown ModelConfig field(s) {unknown}; known: {sorted(names)}")
        kw = dict(d)
        for k in ("cutoffs", "tie_projs"):
            if kw.get(k) is not None:
                kw[k] = tuple(kw[k])
        return cls(**kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
