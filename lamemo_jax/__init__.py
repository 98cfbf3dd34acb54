"""lamemo_jax: LaMemo (look-ahead memory) and Transformer-XL language models in JAX/Flax.

Pure functional API (see ``lamemo_jax.api``): ``ModelConfig``, ``init_params``, ``init_memory``,
``apply``, ``run_segments``, ``score``; checkpoint conversion from the original PyTorch code in
``lamemo_jax.convert``.
"""

from lamemo_jax.config import ConfigError, ModelConfig
from lamemo_jax.memory import LaMemoMemory, Memory, XLMemory, init_memory, reset_rows
from lamemo_jax.api import SegmentOutput, apply, eval_config, init_params, run_segments, score
from lamemo_jax import convert

__all__ = ["ConfigError", "ModelConfig", "LaMemoMemory", "Memory", "XLMemory", "init_memory",
           "reset_rows", "SegmentOutput", "apply", "eval_config", "init_params", "run_segments",
           "score", "convert"]
