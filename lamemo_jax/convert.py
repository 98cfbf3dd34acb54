"""Conversion between the original PyTorch LaMemo / Transformer-XL and this implementation.

* ``from_torch(config, state_dict) -> (ModelConfig, params)``: ``config`` holds the original
  ``MemTransformerLM`` constructor arguments (a fixture's ``config.json``), ``state_dict`` maps
  the original key names to NumPy arrays. Params keep the arrays' dtype (float64 needs
  ``jax_enable_x64``).
* ``to_torch(cfg, params) -> state_dict`` (NumPy, original key names, tied keys repeated).
* ``memory_to_torch(cfg, memory)`` / ``memory_from_torch(cfg, mems)``: the original memory list
  (time-major ``[M, B, ...]``, original order).
* ``from_torch_checkpoint(path)``: a real original ``.pt`` checkpoint (needs torch, which the
  library does not require).

Original attention types map to names: 0 -> memory "xl"; 3 / 31 / 32 / 33 -> memory "lamemo"
with lookahead "disentangled" / "signed" / "future_content_bias" / "full".
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from lamemo_jax.config import ConfigError, ModelConfig
from lamemo_jax.memory import LaMemoMemory, Memory, XLMemory, init_memory
from lamemo_jax.model import inv_freq

ATTN_TYPES = {0: ("xl", "disentangled"), 3: ("lamemo", "disentangled"), 31: ("lamemo", "signed"),
              32: ("lamemo", "future_content_bias"), 33: ("lamemo", "full")}
ATTN_TYPE_OF = {v: k for k, v in ATTN_TYPES.items()}
IGNORED_BUFFERS = ("train_logits_constant", "eval_logits_constant")
REQUIRED_KEYS = ("n_token", "n_layer", "n_head", "d_model", "d_head", "d_inner", "tgt_len", "mem_len")


class ConversionError(ValueError):
    """The original config / state dict cannot be converted; the message names the key."""


def config_from_torch(config: Mapping[str, Any], dtype: str = "float32") -> ModelConfig:
    other = dict(config.get("other_constructor_args") or {})
    get = lambda k, default=None: config.get(k, other.get(k, default))
    missing = [k for k in REQUIRED_KEYS if get(k) is None]
    if missing:
        raise ConversionError(f"original config is missing required key(s) {missing} (the "
                              "MemTransformerLM constructor arguments)")
    attn_type = int(get("attn_type", 0))
    if attn_type not in ATTN_TYPES:
        raise ConversionError(f"attn_type={attn_type} is not supported (supported: "
                              f"{sorted(ATTN_TYPES)}: 0 = Transformer-XL, 3x = LaMemo)")
    # attn_norm_type (never read by the original's forward) and half_loss (a loss mask the
    # original applies only in train mode; no effect on the model) are accepted whatever their value.
    for key, ok in (("ext_len", lambda v: not v), ("pre_lnorm", lambda v: not v),
                    ("sample_softmax", lambda v: v is None or v <= 0),
                    ("enhance_recurrence", lambda v: not v)):
        v = get(key)
        if v is not None and not ok(v):
            raise ConversionError(f"original option {key}={v!r} is not supported by lamemo_jax")
    memory, lookahead = ATTN_TYPES[attn_type]
    if memory == "lamemo" and get("mem_len") is not None and int(get("mem_len")) <= 0:
        raise ConversionError(f"attn_type={attn_type} with mem_len={get('mem_len')}: the original "
                              "LaMemo cannot run without a memory (its interpolation needs one)")
    cutoffs = tuple(get("cutoffs") or ())
    tie_projs = get("tie_projs")
    if tie_projs is not None:
        tie_projs = tuple(bool(t) for t in tie_projs)
        n = len(cutoffs) + 1
        tie_projs = (tie_projs + (False,) * n)[:n]  # the original ignores missing/extra entries
    try:
        return ModelConfig(
            n_token=int(get("n_token")), n_layer=int(get("n_layer")), n_head=int(get("n_head")),
            d_model=int(get("d_model")), d_head=int(get("d_head")), d_inner=int(get("d_inner")),
            d_embed=None if get("d_embed") is None else int(get("d_embed")),
            div_val=int(get("div_val", 1)), cutoffs=cutoffs, tie_weight=bool(get("tie_weight", True)),
            tie_projs=tie_projs, dropout=float(get("dropout", 0.0)), dropatt=float(get("dropatt", 0.0)),
            tgt_len=int(get("tgt_len")), mem_len=int(get("mem_len")), clamp_len=int(get("clamp_len", -1)),
            same_length=bool(get("same_length", False)), memory=memory, lookahead=lookahead,
            dtype=dtype, param_dtype=dtype)
    except TypeError as e:  # the required keys are all present (checked above): a wrong type
        raise ConversionError(f"original config has a value of the wrong type: {e}") from e
    except ConfigError as e:  # e.g. attn_type 33 with mem_len < tgt_len (the original crashes too)
        raise ConversionError(f"original config (attn_type={attn_type}) is not a valid model: {e}") from e


def _param_map(cfg: ModelConfig):
    """Pairs (flax path tuple, torch key, transpose?) for every parameter."""
    from lamemo_jax.embedding import cluster_dims  # noqa: F401  (layout documented there)
    out = []
    for name in ("r_w_bias", "r_r_bias"):
        out.append(((name,), name, False))
    if cfg.memory == "lamemo" and cfg.lookahead != "signed":
        out.append((("r_r_bias_future",), "r_r_bias_future", False))
    if cfg.memory == "lamemo" and cfg.lookahead == "future_content_bias":
        out.append((("r_w_bias_future",), "r_w_bias_future", False))
    n_emb = 1 if cfg.div_val == 1 else cfg.n_clusters + 1
    for i in range(n_emb):
        out.append((("word_emb", f"emb_layers_{i}"), f"word_emb.emb_layers.{i}.weight", False))
        if cfg.div_val > 1 or cfg.d_embed_ != cfg.d_model:
            out.append((("word_emb", f"emb_projs_{i}"), f"word_emb.emb_projs.{i}", False))
    for l in range(cfg.n_layer):
        p = f"layers.{l}."
        lp = f"layers_{l}"
        attn = ["qkv_net"] if cfg.memory == "xl" else ["q_net", "kv_net"]
        for a in attn + ["r_net", "o_net"]:
            out.append(((lp, a, "kernel"), p + f"dec_attn.{a}.weight", True))
        out.append(((lp, "attn_norm", "scale"), p + "dec_attn.layer_norm.weight", False))
        out.append(((lp, "attn_norm", "bias"), p + "dec_attn.layer_norm.bias", False))
        for j in (0, 3):
            out.append(((lp, "pos_ff", f"CoreNet_{j}", "kernel"), p + f"pos_ff.CoreNet.{j}.weight", True))
            out.append(((lp, "pos_ff", f"CoreNet_{j}", "bias"), p + f"pos_ff.CoreNet.{j}.bias", False))
        out.append(((lp, "pos_ff", "layer_norm", "scale"), p + "pos_ff.layer_norm.weight", False))
        out.append(((lp, "pos_ff", "layer_norm", "bias"), p + "pos_ff.layer_norm.bias", False))
    n_out = 1 if cfg.div_val == 1 else cfg.n_clusters + 1
    for i in range(n_out):
        if not cfg.tie_weight:
            out.append((("crit", f"out_layers_{i}_weight"), f"crit.out_layers.{i}.weight", False))
        out.append((("crit", f"out_layers_{i}_bias"), f"crit.out_layers.{i}.bias", False))
    has_proj = cfg.div_val > 1 or cfg.d_embed_ != cfg.d_model
    for i in range(cfg.n_clusters + 1):
        if has_proj and not cfg.tie_projs_[i]:
            out.append((("crit", f"out_projs_{i}"), f"crit.out_projs.{i}", False))
    if cfg.n_clusters:
        out.append((("crit", "cluster_weight"), "crit.cluster_weight", False))
        out.append((("crit", "cluster_bias"), "crit.cluster_bias", False))
    return out


def _tied_keys(cfg: ModelConfig):
    """(torch key, torch key it must equal) for the original's tied parameters."""
    ties = []
    n_out = 1 if cfg.div_val == 1 else cfg.n_clusters + 1
    if cfg.tie_weight:
        ties += [(f"crit.out_layers.{i}.weight", f"word_emb.emb_layers.{i}.weight") for i in range(n_out)]
    has_proj = cfg.div_val > 1 or cfg.d_embed_ != cfg.d_model
    for i in range(cfg.n_clusters + 1):
        if has_proj and cfg.tie_projs_[i]:
            ties.append((f"crit.out_projs.{i}", f"word_emb.emb_projs.{0 if cfg.div_val == 1 else i}"))
    return ties


def from_torch(config: Mapping[str, Any], state_dict: Mapping[str, Any]):
    """(ModelConfig, params) from the original constructor args and a NumPy state dict."""
    sd = {k: np.asarray(v) for k, v in state_dict.items()}
    # jnp.issubdtype, not dtype.kind == "f": ml_dtypes' bfloat16 has kind "V"
    float_dtypes = {str(v.dtype) for k, v in sd.items() if jnp.issubdtype(v.dtype, jnp.floating)}
    if len(float_dtypes) != 1:
        raise ConversionError(f"state_dict mixes float dtypes {sorted(float_dtypes)}; cast it to one")
    dtype = float_dtypes.pop()
    if dtype not in ("float32", "float64", "bfloat16", "float16"):
        raise ConversionError(f"state_dict dtype {dtype} is not supported")
    if dtype == "float64" and not jax.config.jax_enable_x64:
        raise ConversionError("float64 state_dict needs jax_enable_x64: call "
                              "jax.config.update('jax_enable_x64', True) first")
    cfg = config_from_torch(config, dtype=dtype)
    want = jax.eval_shape(lambda: __import__("lamemo_jax.api", fromlist=["init_params"]).init_params(
        cfg, jax.random.key(0)))
    params: Dict[str, Any] = {}
    used = set()
    for path, key, transpose in _param_map(cfg):
        if key not in sd:
            raise ConversionError(f"state_dict has no key {key!r} (needed for {'/'.join(path)})")
        arr = sd[key].T if transpose else sd[key]
        node, exp = params, want
        for p in path[:-1]:
            node = node.setdefault(p, {})
            exp = exp[p]
        exp_shape = tuple(exp[path[-1]].shape)
        if tuple(arr.shape) != exp_shape:
            raise ConversionError(f"state_dict[{key!r}] has shape {tuple(sd[key].shape)}; the config "
                                  f"needs {exp_shape[::-1] if transpose else exp_shape}")
        node[path[-1]] = jnp.asarray(arr)
        used.add(key)
    for key, twin in _tied_keys(cfg):
        if key in sd:
            if not np.array_equal(sd[key], sd[twin]):
                raise ConversionError(f"state_dict[{key!r}] should be tied to {twin!r} but differs")
            used.add(key)
    if "pos_emb.inv_freq" in sd:
        # A few float32 ulps of slack: the original's float32 power is torch's, whose last bit
        # depends on the CPU (model.inv_freq rounds each step correctly; it matches every fixture's
        # buffer exactly); a different formula is off by far more. The buffer is compared in its
        # own dtype: the original's model.half() (--fp16) or a bfloat16 cast rounds the float32
        # buffer once (~5e-4 / ~4e-3 relative), so ours rounded the same way is at most one ulp of
        # that dtype away: 2 of its ulps of slack when coarser than float32.
        buf = sd["pos_emb.inv_freq"]
        want = inv_freq(cfg.d_model).astype(buf.dtype)
        rtol = max(8 * float(np.finfo(np.float32).eps), 2 * float(jnp.finfo(buf.dtype).eps))
        if buf.shape != want.shape or not np.allclose(buf.astype(np.float64), want.astype(np.float64),
                                                      rtol=rtol, atol=0):
            raise ConversionError("state_dict['pos_emb.inv_freq'] differs from 1/10000^(2k/d_model) "
                                  f"computed in float32 (compared in {buf.dtype}); this model's "
                                  "sinusoid would not match")
        used.add("pos_emb.inv_freq")
    leftover = sorted(k for k in sd if k not in used and not k.endswith(IGNORED_BUFFERS))
    if leftover:
        raise ConversionError(f"state_dict keys not used by {cfg.memory}/{cfg.lookahead}: {leftover}")
    return cfg, params


def to_torch(cfg: ModelConfig, params) -> Dict[str, np.ndarray]:
    """The original state dict (NumPy) of ``params``: inverse of ``from_torch``."""
    sd = {}
    for path, key, transpose in _param_map(cfg):
        node = params
        for p in path:
            node = node[p]
        arr = np.asarray(node)
        sd[key] = arr.T if transpose else arr
    for key, twin in _tied_keys(cfg):
        sd[key] = sd[twin]
    sd["pos_emb.inv_freq"] = inv_freq(cfg.d_model).astype(np.asarray(params["r_w_bias"]).dtype)
    return sd


def _valid_length(memory: Memory) -> int:
    lengths = np.asarray(memory.length)
    if lengths.size and not np.all(lengths == lengths[0]):
        raise ValueError(f"memory rows hold different numbers of tokens {lengths.tolist()}; the "
                         "original's memory list needs one length for the whole batch")
    return int(lengths[0]) if lengths.size else 0


def memory_to_torch(cfg: ModelConfig, memory: Memory) -> list:
    """The original memory list: time-major [M, B, ...] arrays, M = tokens held.

    With ``mem_len = 0`` the original carries no memory at all (its forward returns only the
    loss), so the list is empty.
    """
    if cfg.mem_len == 0:
        return []
    m = _valid_length(memory)
    tm = lambda x: np.swapaxes(np.asarray(x), 0, 1)[x.shape[1] - m:]  # [B, Mb, ...] -> [M, B, ...]
    if isinstance(memory, XLMemory):
        return [tm(h) for h in memory.hidden]
    out = [tm(memory.embed)]
    for l in range(cfg.n_layer):
        out += [tm(memory.attn[l]), tm(memory.lse[l])]
    return out


def memory_from_torch(cfg: ModelConfig, mems) -> Optional[Memory]:
    """Inverse of ``memory_to_torch`` (right-aligned into ``cfg.mem_len`` slots).

    The original's "no memory" (``None`` or an empty list, what it carries with ``mem_len = 0``)
    gives None, which ``lamemo_jax.score`` and ``lamemo_jax.forward`` read as an empty memory.
    """
    if mems is None or len(mems) == 0:
        if cfg.mem_len != 0:
            raise ValueError(f"the memory list is empty but ModelConfig.mem_len={cfg.mem_len}: the "
                             "original returns an empty list only with mem_len=0; pass memory=None "
                             "to start from an empty memory instead")
        return None
    mems = [np.asarray(x) for x in mems]
    if all(x.size == 0 and x.ndim == 1 for x in mems):
        return None  # the original's init_mems(): empty 1-D tensors, i.e. no token held yet
    if mems[0].ndim < 2:
        raise ValueError(f"mems[0] has shape {mems[0].shape}; the original's memory tensors are "
                         "time-major [M, B, ...]")
    m, b = mems[0].shape[:2]
    if m > cfg.mem_len:
        raise ValueError(f"memory holds {m} tokens but ModelConfig.mem_len={cfg.mem_len}")
    empty = init_memory(cfg, b)

    def place(buf, x, i, what):  # buf [B, Mb, ...]; x = mems[i], [M, B, ...]
        want = (m, b) + tuple(buf.shape[2:])
        if x.shape != want:
            raise ValueError(f"mems[{i}] ({what}) has shape {x.shape}; expected {want} ([M, B, ...] "
                             f"with M={m} tokens and batch B={b} from mems[0])")
        x = np.swapaxes(x, 0, 1)
        return buf.at[:, buf.shape[1] - m:].set(jnp.asarray(x, buf.dtype))

    length = jnp.full((b,), m, jnp.int32)
    if cfg.memory == "xl":
        if len(mems) != cfg.n_layer + 1:
            raise ValueError(f"XL memory list needs n_layer+1={cfg.n_layer + 1} tensors, got {len(mems)}")
        hidden = jnp.stack([place(empty.hidden[i], mems[i], i, f"layer {i - 1} output" if i else "embed")
                            for i in range(cfg.n_layer + 1)])
        return XLMemory(hidden=hidden, length=length)
    if len(mems) != 2 * cfg.n_layer + 1:
        raise ValueError(f"LaMemo memory list needs 2*n_layer+1={2 * cfg.n_layer + 1} tensors, got {len(mems)}")
    return LaMemoMemory(
        embed=place(empty.embed, mems[0], 0, "embed"),
        attn=jnp.stack([place(empty.attn[l], mems[2 * l + 1], 2 * l + 1, f"layer {l} attn")
                        for l in range(cfg.n_layer)]),
        lse=jnp.stack([place(empty.lse[l], mems[2 * l + 2], 2 * l + 2, f"layer {l} lse")
                       for l in range(cfg.n_layer)]),
        length=length)


def from_torch_checkpoint(path: str, config: Mapping[str, Any] | None = None):
    """(ModelConfig, params) from an original checkpoint (``torch.save`` of the model or its
    state dict). Needs torch installed. ``config`` (constructor args) is required when the file
    holds only a state dict."""
    try:
        import torch  # noqa: F401
    except ImportError as e:
        raise ConversionError("from_torch_checkpoint needs PyTorch (pip install torch); the rest "
                              "of lamemo_jax does not") from e
    import torch
    obj = torch.load(path, map_location="cpu", weights_only=False)
    if hasattr(obj, "state_dict"):
        model = obj
        sd = model.state_dict()
        if config is None:
            config = _config_of_module(model)
    elif isinstance(obj, Mapping):
        sd = obj.get("model_state_dict", obj.get("state_dict", obj))
        if config is None:
            raise ConversionError(f"{path} holds only a state dict: pass config= (the original "
                                  "MemTransformerLM constructor arguments; eval.py: --torch_config="
                                  "a JSON file of them)")
    else:
        raise ConversionError(f"{path}: unrecognised checkpoint object {type(obj).__name__}")
    sd = {k.removeprefix("module."): v.detach().cpu().numpy() for k, v in sd.items()}
    return from_torch(config, sd)


def _config_of_module(model) -> Dict[str, Any]:
    """Constructor arguments recovered from an original MemTransformerLM instance.

    Every option that changes the model is read off the module (never assumed), so that
    ``config_from_torch`` refuses what lamemo_jax does not implement (pre-LN, enhance_recurrence,
    sampled softmax, ext_len) instead of converting it into a different model.
    """
    try:
        layer = model.layers[0]
        emb = model.word_emb
        crit = getattr(model, "crit", None)  # absent with sample_softmax > 0
        n_out = len(model.cutoffs) + 1 if crit is None else len(crit.out_layers)
        tie_weight = crit is not None and all(
            crit.out_layers[i].weight is emb.emb_layers[i].weight for i in range(n_out))
        out_projs = [] if crit is None else list(crit.out_projs)
        tie_projs = [out_projs[i] is not None and any(out_projs[i] is p for p in emb.emb_projs)
                     if i < len(out_projs) else False for i in range(len(model.cutoffs) + 1)]
        return dict(
            n_token=model.n_token, n_layer=model.n_layer, n_head=model.n_head, d_model=model.d_model,
            d_head=model.d_head, d_inner=layer.pos_ff.d_inner, dropout=layer.pos_ff.dropout,
            dropatt=float(layer.dec_attn.dropatt.p), tie_weight=tie_weight, d_embed=model.d_embed,
            div_val=emb.div_val, cutoffs=list(model.cutoffs),
            tie_projs=tie_projs, pre_lnorm=bool(layer.pos_ff.pre_lnorm), tgt_len=model.tgt_len,
            ext_len=model.ext_len, mem_len=model.mem_len, same_length=model.same_length,
            attn_type=model.attn_type, clamp_len=model.clamp_len,
            sample_softmax=getattr(model, "sample_softmax", -1),
            enhance_recurrence=bool(getattr(model, "enhance_recurrence", False)))
    except AttributeError as e:
        raise ConversionError(f"cannot read the constructor arguments off the checkpoint's model: {e}")
