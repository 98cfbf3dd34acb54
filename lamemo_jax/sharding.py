"""Scale-out: the device mesh, logical axis names -> mesh axes, shardings, multi-host helpers.

Everything about WHERE arrays live is decided here, in one place:

* The mesh has three axes, ``("data", "fsdp", "tensor")``, sized by the config's ``mesh`` section
  (``-1`` = the rest of the devices). It is built with ``jax.make_mesh`` and ``AxisType.Auto``
  on every axis: the train step is a ``jax.jit`` with explicit in/out shardings and the SPMD
  partitioner propagates shardings through the model (the model code places no constraints;
  ``Explicit`` axes would require sharding-aware code in ``model.py``).
* Every array dimension gets a LOGICAL name (``batch``, ``embed``, ``heads``, ``mlp`` ...);
  ``LOGICAL_AXIS_RULES`` maps logical names to mesh axes. Parameters get their names from
  ``PARAM_LOGICAL_AXES`` (regexes on the parameter path), the carried memory from
  ``memory_logical_axes`` (its batch axis shards with the batch), batches are ``("batch", "seq")``.
* FSDP: after the rules, the largest still-unsharded dimension of each weight matrix (ndim >= 2)
  divisible by the ``fsdp`` axis is sharded over ``fsdp``. Vectors (biases, norms) are not.
* Divisibility: a dimension that a mesh axis does not divide is not sharded over that axis
  (replicated instead) and the first occurrence of each such case is logged: never a crash, never
  a different result.

Optimizer state leaves get the sharding of the parameter they mirror (the same path rules apply
to ``opt_state``'s ``mu``/``nu`` subtrees; scalars are replicated).
"""

from __future__ import annotations

import logging
import math
import os
import re
from typing import Any, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from lamemo_jax.experiment import REMAT_POLICIES

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis name -> mesh axes (in order; a tuple shards one dimension over several axes).
LOGICAL_AXIS_RULES: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
    ("batch", ("data", "fsdp")),  # batches, the carried memory, per-token outputs
    ("heads", ("tensor",)),  # attention heads (q/kv/qkv/r_net outputs, o_net inputs, memory C/Z)
    ("mlp", ("tensor",)),  # d_inner (CoreNet_0 output, CoreNet_3 input)
    ("fsdp", ("fsdp",)),  # the dimension the FSDP rule picks for a weight
    ("embed", ()),  # d_model
    ("vocab", ()),
    ("head_dim", ()),
    ("seq", ()),
    ("mem_slots", ()),
    ("layers", ()),
    ("clusters", ()),
)
_RULES = dict(LOGICAL_AXIS_RULES)


def kernel_partition():
    """How the attention kernels split over the mesh (kernels.Partition): batch rows over the
    'batch' rule's axes, heads over the 'heads' rule's. Used by the model; takes effect only when
    the step is traced under a mesh (``with_mesh``) and a Pallas implementation runs."""
    import kernels
    return kernels.Partition(batch_axes=_RULES["batch"], head_axes=_RULES["heads"])


def with_mesh(fn, mesh: Optional[Mesh]):
    """``fn`` traced under ``mesh`` as the abstract context mesh (no-op for None), so that code
    that needs the mesh at trace time (the Pallas kernels' shard_map) sees it."""
    if mesh is None:
        return fn

    def wrapped(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)

    return wrapped

# parameter path regex (on "a/b/c") -> logical names of its dimensions; first match wins.
# Fused projections are sharded along their whole output: qkv_net's [q | k | v] and kv_net's
# [k | v] blocks are split by contiguous ranges, which is head-aligned only within each block
# (the partitioner inserts the resharding; results are identical either way).
PARAM_LOGICAL_AXES: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
    (r"(^|/)(q_net|kv_net|qkv_net|r_net)/kernel$", ("embed", "heads")),
    (r"(^|/)o_net/kernel$", ("heads", "embed")),
    (r"(^|/)CoreNet_0/kernel$", ("embed", "mlp")),
    (r"(^|/)CoreNet_0/bias$", ("mlp",)),
    (r"(^|/)CoreNet_3/kernel$", ("mlp", "embed")),
    (r"(^|/)r_[wr]_bias(_future)?$", ("heads", "head_dim")),
    (r"(^|/)(emb_layers|out_layers)_\d+(_weight)?$", ("vocab", "embed")),
    (r"(^|/)out_layers_\d+_bias$", ("vocab",)),
    (r"(^|/)(emb_projs|out_projs)_\d+$", ("embed", "embed")),
    (r"(^|/)cluster_weight$", ("clusters", "embed")),
    (r"(^|/)(scale|bias|cluster_bias)$", ("embed",)),
)

BATCH_LOGICAL = ("batch", "seq")  # inputs / targets / per-token NLL
ACTIVATION_LOGICAL_AXES = {  # for constraints placed by callers (the model places none)
    "tokens": ("batch", "seq"),
    "hidden": ("batch", "seq", "embed"),
    "attention": ("batch", "seq", "heads", "head_dim"),
    "ff_hidden": ("batch", "seq", "mlp"),
    "logits": ("batch", "seq", "vocab"),
}

_logged: set = set()


def _log_once(key, msg, *args):
    if key not in _logged:
        _logged.add(key)
        logging.warning(msg, *args)


# --------------------------------------------------------------------------- mesh
def mesh_shape(mesh_cfg, n_devices: int) -> Tuple[int, int, int]:
    """(data, fsdp, tensor) with the single -1 resolved to the rest of ``n_devices``."""
    from lamemo_jax.config import ConfigError
    sizes = [int(getattr(mesh_cfg, a)) for a in MESH_AXES]
    for a, s in zip(MESH_AXES, sizes):
        if s == 0 or s < -1:
            raise ConfigError(f"mesh.{a}={s}: must be a positive integer or -1 (the rest)")
    if sizes.count(-1) > 1:
        raise ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n_devices % known:
            raise ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))}: {n_devices} devices are not "
                              f"divisible by the fixed axes' product {known}")
        sizes[sizes.index(-1)] = n_devices // known
    if math.prod(sizes) != n_devices:
        raise ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices but "
                          f"{n_devices} are available; set one axis to -1 (the rest)")
    return tuple(sizes)


def make_mesh(mesh_cfg, devices: Optional[Sequence[Any]] = None) -> Mesh:
    """The ``(data, fsdp, tensor)`` mesh over ``devices`` (default: all devices of all processes).

    ``jax.make_mesh`` orders devices for the hardware topology (ICI rings on TPU); ``data`` is the
    outermost axis, so on multi-host systems the data axis spans hosts and fsdp/tensor stay within.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_cfg, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def describe(mesh: Mesh) -> str:
    return " x ".join(f"{a}={mesh.shape[a]}" for a in mesh.axis_names) + f" ({mesh.size} devices)"


# --------------------------------------------------------------------------- logical -> spec
def logical_to_spec(logical: Sequence[Optional[str]], shape: Sequence[int], mesh: Mesh,
                    what: str = "") -> P:
    """PartitionSpec for an array with per-dimension logical names (None = unsharded).

    Mesh axes of size 1 are dropped; a dimension that the product of its mesh axes does not
    divide loses axes from the end until it does (possibly all: replicated); logged once.
    """
    if len(logical) != len(shape):
        raise ValueError(f"{what}: {len(logical)} logical names {tuple(logical)} for shape {tuple(shape)}")
    used = set()
    spec = []
    for name, size in zip(logical, shape):
        if name is None:
            spec.append(None)
            continue
        if name not in _RULES:
            raise ValueError(f"{what}: logical axis {name!r} has no rule in LOGICAL_AXIS_RULES")
        axes = [a for a in _RULES[name] if a in mesh.shape and mesh.shape[a] > 1 and a not in used]
        while axes and size % math.prod(mesh.shape[a] for a in axes):
            dropped = axes.pop()
            _log_once(("div", name, size, dropped, mesh.shape[dropped]),
                      "sharding: logical axis %r of size %d is not divisible by mesh axis %r (%d); "
                      "replicated over %r instead (first seen: %s)",
                      name, size, dropped, mesh.shape[dropped], dropped, what or "?")
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    while spec and spec[-1] is None:  # P('data', None) -> P('data'); replicated -> P()
        spec.pop()
    return P(*spec)


def _path_str(path) -> str:
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(k.name)
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        else:
            parts.append(str(k))
    return "/".join(parts)


def param_logical_axes(path: str, shape: Sequence[int]) -> Tuple[Optional[str], ...]:
    """Logical names of a parameter's dimensions from its path (unknown: all None)."""
    for pattern, names in PARAM_LOGICAL_AXES:
        if re.search(pattern, path) and len(names) == len(shape):
            return names
    return (None,) * len(shape)


def param_spec(path: str, shape: Sequence[int], mesh: Mesh) -> P:
    """Rules first (tensor parallel), then FSDP on the largest still-unsharded divisible dim."""
    if len(shape) == 0:
        return P()
    logical = list(param_logical_axes(path, shape))
    spec = list(logical_to_spec(logical, shape, mesh, path))
    spec += [None] * (len(shape) - len(spec))
    n_fsdp = mesh.shape.get("fsdp", 1)
    if n_fsdp > 1 and len(shape) >= 2 and not any(_uses(s, "fsdp") for s in spec):
        free = sorted((i for i in range(len(shape)) if spec[i] is None), key=lambda i: -shape[i])
        ok = [i for i in free if shape[i] % n_fsdp == 0]
        if ok:
            spec[ok[0]] = "fsdp"
        elif free:
            _log_once(("fsdp", tuple(shape), n_fsdp),
                      "sharding: no dimension of %s %s is divisible by fsdp=%d; replicated over fsdp",
                      path, tuple(shape), n_fsdp)
    while spec and spec[-1] is None:
        spec.pop()
    return P(*spec)


def _uses(entry, axis: str) -> bool:
    return entry == axis or (isinstance(entry, tuple) and axis in entry)


def param_shardings(tree, mesh: Mesh):
    """NamedShardings for a parameter tree or any tree that mirrors it (optimizer state)."""
    def one(path, x):
        return NamedSharding(mesh, param_spec(_path_str(path), tuple(np.shape(x)), mesh))
    return jax.tree_util.tree_map_with_path(one, tree)


def memory_logical_axes(memory):
    """The logical names of every memory buffer: the batch axis is 'batch' (shards with the batch)."""
    from lamemo_jax.memory import XLMemory, LaMemoMemory
    if isinstance(memory, XLMemory):
        return XLMemory(hidden=("layers", "batch", "mem_slots", "embed"), length=("batch",))
    if isinstance(memory, LaMemoMemory):
        return LaMemoMemory(embed=("batch", "mem_slots", "embed"),
                            attn=("layers", "batch", "mem_slots", "heads", "head_dim"),
                            lse=("layers", "batch", "mem_slots", "heads"), length=("batch",))
    raise TypeError(f"unknown memory type {type(memory).__name__}")


def memory_shardings(memory, mesh: Mesh):
    names = memory_logical_axes(memory)
    return jax.tree.map(lambda x, n: NamedSharding(mesh, logical_to_spec(n, x.shape, mesh, "memory")),
                        memory, names, is_leaf=lambda v: isinstance(v, tuple))


def batch_sharding(mesh: Mesh, shape: Sequence[int]) -> NamedSharding:
    """Inputs / targets [B, N] and start_of_sequence [B]: the batch axis over (data, fsdp)."""
    logical = BATCH_LOGICAL[: len(shape)]
    return NamedSharding(mesh, logical_to_spec(logical, shape, mesh, "batch"))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def state_shardings(abstract_state, mesh: Mesh):
    """Shardings of a TrainState-like flax struct: params / opt_state by the parameter rules,
    memory with the batch, every other field (step, rng, counters) replicated."""
    rep = replicated(mesh)
    out = {f: jax.tree.map(lambda _: rep, getattr(abstract_state, f))
           for f in abstract_state.__dataclass_fields__}
    out["params"] = param_shardings(abstract_state.params, mesh)
    out["opt_state"] = param_shardings(abstract_state.opt_state, mesh)
    out["memory"] = memory_shardings(abstract_state.memory, mesh)
    return abstract_state.replace(**out)


def constrain(x, logical: Sequence[Optional[str]], mesh: Mesh):
    """``with_sharding_constraint`` by logical names (for use inside jitted code)."""
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(logical, x.shape, mesh)))


def describe_params(shardings, params) -> str:
    """One line per parameter: path, shape, spec (for logs and docs)."""
    lines = []
    for (path, s), x in zip(jax.tree_util.tree_flatten_with_path(shardings)[0], jax.tree.leaves(params)):
        lines.append(f"{_path_str(path)} {tuple(x.shape)} {s.spec}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- remat
def remat(fn, policy: str):
    """``fn`` wrapped in ``jax.checkpoint``: "full" saves nothing (recompute everything in the
    backward pass), "dots" saves matmul outputs (``checkpoint_dots``), "none" returns ``fn``."""
    if policy == "none":
        return fn
    if policy == "full":
        return jax.checkpoint(fn)
    if policy == "dots":
        return jax.checkpoint(fn, policy=jax.checkpoint_policies.checkpoint_dots)
    raise ValueError(f"remat policy {policy!r}: choose one of {REMAT_POLICIES}")


# --------------------------------------------------------------------------- data placement
def process_row_block(sharding: NamedSharding, batch_size: int) -> Optional[Tuple[int, int]]:
    """(block, n_blocks) such that this process must supply the global rows
    ``[block * B / n_blocks, (block + 1) * B / n_blocks)``; ``None`` if its devices need a
    non-contiguous set of rows (then it must supply all of them).

    With the usual device order this is ``(jax.process_index(), jax.process_count())`` when the
    batch is sharded across processes, and ``(0, 1)`` when it is replicated across them.
    """
    index_map = sharding.devices_indices_map((batch_size,))
    pid = jax.process_index()
    rows = set()
    for d, idx in index_map.items():
        if d.process_index == pid:
            rows.update(range(*idx[0].indices(batch_size)))
    lo, hi = min(rows), max(rows) + 1
    per = hi - lo
    if len(rows) != per or batch_size % per or lo % per:
        return None
    return lo // per, batch_size // per


def global_array(local: np.ndarray, sharding: NamedSharding, global_shape: Tuple[int, ...],
                 block: Optional[Tuple[int, int]]) -> jax.Array:
    """The global ``jax.Array`` from this process's rows (``block`` from ``process_row_block``;
    ``None``: ``local`` holds every row)."""
    if block is None or tuple(local.shape) == tuple(global_shape):
        return jax.make_array_from_callback(global_shape, sharding, lambda idx: local[idx])
    return jax.make_array_from_process_local_data(sharding, local, global_shape)


def host_local(tree):
    """A tree usable by single-process code (evaluation): unchanged when every array is fully
    addressable, else all-gathered to numpy on every process (collective: all must call it)."""
    leaves = jax.tree.leaves(tree)
    if all(getattr(x, "is_fully_addressable", True) for x in leaves):
        return tree
    from jax.experimental import multihost_utils
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def sync(name: str) -> None:
    """A barrier across processes (no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


# --------------------------------------------------------------------------- multi-host start
def _count(env, *names) -> int:
    for n in names:
        v = env.get(n, "")
        if v.strip().isdigit():
            return int(v)
    return 1


def cluster_detected(env=None) -> Optional[str]:
    """The variable that shows a multi-process cluster launch, or None (run as one process).

    ``JAX_COORDINATOR_ADDRESS`` / ``MEGASCALE_COORDINATOR_ADDRESS`` always count; SLURM and
    Open MPI only with more than one task; a Cloud TPU only with more than one worker host.
    """
    env = os.environ if env is None else env
    for name in ("JAX_COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS"):
        if env.get(name):
            return name
    if env.get("SLURM_JOB_ID") and _count(env, "SLURM_NTASKS", "SLURM_NPROCS") > 1:
        return "SLURM_NTASKS"
    if _count(env, "OMPI_COMM_WORLD_SIZE") > 1:
        return "OMPI_COMM_WORLD_SIZE"
    if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]) > 1:
        return "TPU_WORKER_HOSTNAMES"
    return None


def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None, auto: bool = True) -> bool:
    """Starts JAX's multi-controller runtime; True if it did.

    With ``coordinator_address`` (and ``num_processes``, ``process_id``): explicit start, e.g.
    two CPU processes on 127.0.0.1. Otherwise, when ``auto`` and a cluster environment is
    detected (``cluster_detected``): ``jax.distributed.initialize()`` with no arguments, which
    reads the TPU / SLURM / Open MPI environment. Otherwise nothing (one process).
    Must run before any other JAX call that touches devices.
    """
    if coordinator_address or num_processes is not None or process_id is not None:
        if not (coordinator_address and num_processes is not None and process_id is not None):
            from lamemo_jax.config import ConfigError
            raise ConfigError("--coordinator_address, --num_processes and --process_id go together "
                              "(an explicit multi-process start); leave all three out for one "
                              "process or a detected cluster")
        jax.distributed.initialize(coordinator_address=coordinator_address,
                                   num_processes=int(num_processes), process_id=int(process_id))
        return True
    if auto:
        why = cluster_detected()
        if why:
            logging.info("cluster environment detected (%s): jax.distributed.initialize()", why)
            jax.distributed.initialize()
            return True
    return False


# --------------------------------------------------------------------------- ahead-of-time check
def aot_compile_train_step(exp, devices, mesh_cfg=None):
    """Lowers and compiles the sharded train step of ``exp`` (an ExperimentConfig with
    ``model.n_token`` set) for ``devices`` without running it: e.g. compile-only TPU devices of
    ``jax.experimental.topologies.get_topology_desc("v5e:2x2", platform="tpu")`` (needs libtpu
    installed; no TPU hardware). Returns the compiled executable (``memory_analysis()``,
    ``cost_analysis()``, ``as_text()``)."""
    from lamemo_jax.trainer import init_train_state, make_optimizer, make_train_step
    cfg, tc = exp.model, exp.train
    mesh = make_mesh(mesh_cfg or exp.mesh, devices)
    optimizer = make_optimizer(tc)
    abstract = jax.eval_shape(lambda: init_train_state(cfg, tc, optimizer, tc.batch_size))
    sh = state_shardings(abstract, mesh)
    bsh = batch_sharding(mesh, (tc.batch_size, cfg.tgt_len))
    ssh = batch_sharding(mesh, (tc.batch_size,))
    sds = lambda shape, dtype, s: jax.ShapeDtypeStruct(shape, dtype, sharding=s)
    args = (jax.tree.map(lambda a, s: sds(a.shape, a.dtype, s), abstract, sh),
            sds((tc.batch_size, cfg.tgt_len), jnp.int32, bsh), sds((tc.batch_size, cfg.tgt_len), jnp.int32, bsh),
            sds((tc.batch_size,), jnp.bool_, ssh))
    step = jax.jit(make_train_step(cfg, tc, optimizer, mesh), in_shardings=(sh, bsh, bsh, ssh),
                   out_shardings=(sh, replicated(mesh)), donate_argnums=(0,))
    return step.lower(*args).compile()


def _main(argv=None):
    """``python -m lamemo_jax.sharding --config configs/wt103.py --topology v5e:2x2 [--mesh 1,4,1]``:
    the ahead-of-time compile check for a named TPU topology (docs/scaling.md)."""
    import argparse
    import importlib.util
    from lamemo_jax.experiment import ExperimentConfig, MeshConfig
    from jax.experimental import topologies

    ap = argparse.ArgumentParser(description=_main.__doc__)
    ap.add_argument("--config", required=True)
    ap.add_argument("--topology", required=True, help="e.g. v5e:2x2, v4:2x2x2, v5p:2x2x2")
    ap.add_argument("--mesh", default=None, help="data,fsdp,tensor (default: the config's mesh)")
    ap.add_argument("--batch_size", type=int, default=0, help="override train.batch_size")
    ap.add_argument("--attention_impl", default="xla")
    a = ap.parse_args(argv)
    spec = importlib.util.spec_from_file_location("_cfg", a.config)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cd = mod.get_config()
    cd.model.attention_impl = a.attention_impl
    if a.batch_size:
        cd.train.batch_size = a.batch_size
    exp = ExperimentConfig.from_config_dict(cd)
    mesh_cfg = MeshConfig(*[int(x) for x in a.mesh.split(",")]) if a.mesh else None
    topo = topologies.get_topology_desc(a.topology, platform="tpu")
    compiled = aot_compile_train_step(exp, topo.devices, mesh_cfg)
    mem = compiled.memory_analysis()
    gib = lambda b: b / 2 ** 30
    print(f"compiled the train step for {a.topology} ({len(topo.devices)} {topo.devices[0].device_kind} devices)")
    if mem is not None:
        print(f"per device: arguments {gib(mem.argument_size_in_bytes):.3f} GiB, outputs "
              f"{gib(mem.output_size_in_bytes):.3f} GiB, temporaries {gib(mem.temp_size_in_bytes):.3f} GiB")


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    _main()
