"""Scale-out on CPU: sharded steps equal the single-device step, two real processes equal one,
a checkpoint moves between meshes, bf16 tracks float32.

The 8-device checks need ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` before jax is
imported, so they run in ONE subprocess: this file run as a script (``python
tests/test_sharding.py eight_devices OUT_DIR``), which prints one JSON line the tests assert on.
The two-process check runs ``train.py`` three times (two cooperating processes on 127.0.0.1 and
one single-process reference) in parallel.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time

import numpy as np

HERE = os.path.abspath(__file__)
ROOT = os.path.dirname(os.path.dirname(HERE))
MESHES = {"8x1x1": (8, 1, 1), "2x4x1": (2, 4, 1), "2x2x2": (2, 2, 2),
          "2x1x4": (2, 1, 4)}  # 2x1x4 (LaMemo only): n_head=2 does not divide tensor=4 -> fallback
TOL = 1e-5  # float32 agreement of sharded vs single-device results (losses and parameters)
# Subprocesses compile with LLVM optimisation off: 2-3x faster compiles of these tiny programs on
# a 2-core machine. Both sides of every comparison run under the same flags.
FAST_COMPILE = "--xla_backend_optimization_level=0"
# bf16 vs float32 on configs/tiny.py, 30 steps: measured max per-step |loss difference| 2.9e-4
# (mean 5.8e-5) on CPU; the bound is 10x the measured maximum.
BF16_MAX_LOSS_GAP = 3e-3


# =========================================================================== subprocess side
def _tiny_model(memory: str, **kw):
    from lamemo_jax.config import ModelConfig
    return ModelConfig(**{**dict(n_token=32, n_layer=2, n_head=2, d_model=32, d_head=16, d_inner=64,
                                 tgt_len=8, mem_len=8, memory=memory, dropout=0.1, dropatt=0.1), **kw})


def _parity(memory: str, meshes=tuple(MESHES), **model) -> dict:
    """Two train steps (the memory carried into the second) on every mesh vs one device."""
    import jax
    from lamemo_jax import sharding as sl
    from lamemo_jax.experiment import MeshConfig, TrainConfig
    from lamemo_jax.trainer import init_sharded_train_state, make_optimizer, make_train_step

    cfg = _tiny_model(memory, **model)
    tc = TrainConfig(batch_size=8, num_steps=10, learning_rate=3e-3, schedule="constant", clip=1.0)
    opt = make_optimizer(tc)
    rng = np.random.default_rng(0)
    batches = [(rng.integers(0, 32, (8, 8)).astype(np.int32), rng.integers(0, 32, (8, 8)).astype(np.int32),
                np.full((8,), s == 0)) for s in range(2)]

    initial = None

    def run(shape, devices):
        nonlocal initial
        mesh = sl.make_mesh(MeshConfig(*shape), devices)
        if initial is None:  # the single-device run: the trainer's init (saves one compile per mesh)
            state, sh = init_sharded_train_state(cfg, tc, opt, 8, mesh)
            initial = jax.tree.map(np.asarray, state)
        else:
            sh = sl.state_shardings(initial, mesh)
            state = jax.device_put(initial, sh)
        bsh, ssh = sl.batch_sharding(mesh, (8, 8)), sl.batch_sharding(mesh, (8,))
        step = jax.jit(make_train_step(cfg, tc, opt), in_shardings=(sh, bsh, bsh, ssh),
                       out_shardings=(sh, sl.replicated(mesh)), donate_argnums=(0,))
        losses = []
        for x, y, s in batches:
            place = lambda a, shd: sl.global_array(a, shd, a.shape, (0, 1))
            state, m = step(state, place(x, bsh), place(y, bsh), place(s, ssh))
            losses.append(float(m["loss"]))
        # the shardings the state actually has after the step (out_shardings honoured)
        honoured = all(a.sharding.is_equivalent_to(s, a.ndim)
                       for a, s in zip(jax.tree.leaves(state), jax.tree.leaves(sh)))
        layer = state.params["layers_0"]
        proj = "qkv_net" if memory == "xl" else "q_net"
        mem_buf = state.memory.hidden if memory == "xl" else state.memory.attn
        specs = {"proj": str(layer[proj]["kernel"].sharding.spec),
                 "o_net": str(layer["o_net"]["kernel"].sharding.spec),
                 "CoreNet_0": str(layer["pos_ff"]["CoreNet_0"]["kernel"].sharding.spec),
                 "CoreNet_3": str(layer["pos_ff"]["CoreNet_3"]["kernel"].sharding.spec),
                 "r_w_bias": str(state.params["r_w_bias"].sharding.spec),
                 "mu_proj": str(state.opt_state[1][0].mu["layers_0"][proj]["kernel"].sharding.spec),
                 "memory": str(mem_buf.sharding.spec), "batch": str(bsh.spec),
                 "mesh": sl.describe(mesh)}
        return (losses, jax.tree.map(np.asarray, state.params), jax.tree.map(np.asarray, state.memory),
                specs, bool(honoured))

    devices = jax.devices()
    ref_loss, ref_params, ref_mem, ref_specs, _ = run((1, 1, 1), devices[:1])
    out = {"ref_loss": ref_loss, "ref_specs": ref_specs}
    for name, shape in MESHES.items():
        if name not in meshes or (name == "2x1x4" and memory == "xl"):
            continue  # the fallback case once is enough (compile time)
        loss, params, mem, specs, honoured = run(shape, devices)
        diff = lambda a, b: max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
        out[name] = {"loss": loss, "param_diff": diff(params, ref_params), "memory_diff": diff(mem, ref_mem),
                     "params_changed": diff(params, jax.tree.map(np.zeros_like, params)) > 0,
                     "specs": specs, "honoured": honoured}
    return out


def _pallas_sharded() -> dict:
    """The Pallas kernels (interpret mode) in a sharded LaMemo step: two steps on meshes 2x2x2 and
    2x1x4 (heads not divisible by tensor=4) vs the single-device XLA step, and the batch / heads
    each kernel call sees inside its shard_map (local shapes, not the gathered global ones)."""
    import jax
    from lamemo_jax import sharding as sl
    from lamemo_jax.experiment import MeshConfig, TrainConfig
    from lamemo_jax.trainer import init_sharded_train_state, make_optimizer, make_train_step

    base = _tiny_model("lamemo").replace(dropatt=0.0)  # the kernels have no attention dropout
    tc = TrainConfig(batch_size=8, num_steps=10, learning_rate=3e-3, schedule="constant", clip=1.0)
    opt = make_optimizer(tc)
    rng = np.random.default_rng(0)
    batches = [(rng.integers(0, 32, (8, 8)).astype(np.int32), rng.integers(0, 32, (8, 8)).astype(np.int32),
                np.full((8,), s == 0)) for s in range(2)]

    def kernel_local_shapes(jaxpr):
        """(batch, heads) of the first 4-D operand ([B, H, rows, D] in the kernels' layout) of
        every pallas_call; ``None`` marks a pallas_call outside any shard_map."""
        found = []

        def walk(j, inside):
            for e in j.eqns:
                if e.primitive.name == "pallas_call":
                    four = [v.aval.shape for v in e.invars if len(getattr(v.aval, "shape", ())) == 4]
                    found.append(tuple(int(x) for x in four[0][:2]) if inside else None)
                for v in e.params.values():
                    for sub in (v if isinstance(v, (list, tuple)) else [v]):
                        inner = getattr(sub, "jaxpr", sub)
                        if hasattr(inner, "eqns"):
                            walk(inner, inside or e.primitive.name == "shard_map")
        walk(jaxpr.jaxpr, False)
        return sorted(set(found), key=str)

    def run(impl, shape, devices, initial=None):
        cfg = base.replace(attention_impl=impl)
        mesh = sl.make_mesh(MeshConfig(*shape), devices)
        if initial is None:
            state, sh = init_sharded_train_state(cfg, tc, opt, 8, mesh)
        else:
            sh = sl.state_shardings(initial, mesh)
            state = jax.device_put(initial, sh)
        init = jax.tree.map(np.asarray, state)
        bsh, ssh = sl.batch_sharding(mesh, (8, 8)), sl.batch_sharding(mesh, (8,))
        fn = make_train_step(cfg, tc, opt, mesh)
        step = jax.jit(fn, in_shardings=(sh, bsh, bsh, ssh), out_shardings=(sh, sl.replicated(mesh)))
        place = lambda a, shd: sl.global_array(a, shd, a.shape, (0, 1))
        x0 = [place(a, s) for a, s in zip(batches[0], (bsh, bsh, ssh))]
        local = kernel_local_shapes(jax.make_jaxpr(fn)(state, *x0))
        losses = []
        for x, y, s in batches:
            state, m = step(state, place(x, bsh), place(y, bsh), place(s, ssh))
            losses.append(float(m["loss"]))
        return losses, jax.tree.map(np.asarray, state.params), init, local

    devices = jax.devices()
    ref_loss, ref_params, init, _ = run("xla", (1, 1, 1), devices[:1])
    out = {"ref_loss": ref_loss}
    for name in ("2x2x2", "2x1x4"):
        loss, params, _, local = run("pallas_interpret", MESHES[name], devices, init)
        out[name] = {"loss": loss, "local_batch_heads": local,
                     "param_diff": max(float(np.max(np.abs(a - b)))
                                       for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)))}
    return out


def _checkpoint_across_meshes(out_dir: str) -> dict:
    """Train 6 steps on mesh 8x1x1; train 3 steps on 2x2x2, resume on 2x4x1 to step 6."""
    import jax
    from lamemo_jax.data import default_config
    from lamemo_jax.experiment import base_config
    from lamemo_jax.metrics import read_metrics
    from lamemo_jax.trainer import load_run, train_and_evaluate

    def config(steps, mesh):
        c = base_config()
        c.model.update(n_token=32, n_layer=2, d_model=32, n_head=2, d_head=16, d_inner=64, dropout=0.1,
                       dropatt=0.0, tgt_len=8, mem_len=8, memory="lamemo")
        c.data = default_config("random")
        c.data.update(random_n_token=32, random_length=4000, random_eval_length=100)  # eval: 3 segments
        c.train.update(batch_size=8, num_steps=steps, learning_rate=3e-3, schedule="constant", clip=1.0,
                       log_every=1, eval_every=0, checkpoint_every=3, progress_bar=False)
        c.eval.update(batch_size=4, split="valid")
        c.mesh.update(data=mesh[0], fsdp=mesh[1], tensor=mesh[2])
        return c

    full, part = os.path.join(out_dir, "full"), os.path.join(out_dir, "part")
    train_and_evaluate(config(6, (8, 1, 1)), full)
    train_and_evaluate(config(3, (2, 2, 2)), part)  # "interrupted" after step 3
    summary = train_and_evaluate(config(6, (2, 4, 1)), part)  # resumed on another mesh
    loss = lambda d: {r["step"]: r["loss"] for r in read_metrics(os.path.join(d, "metrics.jsonl"))
                      if r["split"] == "train"}
    _, _, p_full, s_full = load_run(full)
    _, _, p_part, s_part = load_run(part)
    np.savez(os.path.join(out_dir, "full_params.npz"),
             **{jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(p_full)[0]})
    # after 6 Adam steps on different meshes the parameters differ by float32 reduction order,
    # amplified by Adam's normalisation (reported, not asserted; the losses are asserted)
    drift = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                for a, b in zip(jax.tree.leaves(p_full), jax.tree.leaves(p_part)))
    # the step-3 checkpoint written on 2x2x2, restored onto 2x4x1 and onto 8x1x1: bit-identical
    from lamemo_jax import sharding as sl
    from lamemo_jax.checkpoint import Checkpointer
    from lamemo_jax.experiment import ExperimentConfig, MeshConfig
    from lamemo_jax.trainer import init_sharded_train_state, make_optimizer
    exp = ExperimentConfig.from_config_dict(config(6, (2, 4, 1)))
    ckpt = Checkpointer(os.path.join(part, "checkpoints"))
    restored = []
    for shape in ((2, 4, 1), (8, 1, 1)):
        mesh = sl.make_mesh(MeshConfig(*shape))
        cfg = exp.model.replace(n_token=32)
        abstract = jax.eval_shape(lambda: init_sharded_train_state(cfg, exp.train, make_optimizer(exp.train),
                                                                    8, mesh)[0])
        sh = sl.state_shardings(abstract, mesh)
        abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, sh)
        state, _ = ckpt.restore(3, abstract)
        assert all(a.sharding.is_equivalent_to(s, a.ndim)
                   for a, s in zip(jax.tree.leaves(state), jax.tree.leaves(sh)))
        restored.append(jax.tree.map(np.asarray, state))
    ckpt.close()
    exact = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(restored[0]), jax.tree.leaves(restored[1])))
    return {"full": loss(full), "part": loss(part), "param_drift": drift, "steps": [s_full, s_part],
            "resumed_step": summary["step"], "full_dir": full, "restore_exact": exact,
            "restored_step": int(restored[0].step)}


def _worker_bf16() -> None:
    """configs/tiny.py's 30 steps in float32 and in bfloat16 (the trainer's step, one device)."""
    import importlib
    import jax
    from lamemo_jax import data as data_lib
    from lamemo_jax import sharding as sl
    from lamemo_jax.experiment import ExperimentConfig, MeshConfig
    from lamemo_jax.trainer import init_sharded_train_state, make_optimizer, make_train_step

    res = {}
    for dtype in ("float32", "bfloat16"):
        c = importlib.import_module("configs.tiny").get_config()
        c.model.dtype = dtype  # = --config.model.dtype=bfloat16
        exp = ExperimentConfig.from_config_dict(c)
        cfg, tc = exp.model, exp.train
        ds = data_lib.load(exp.data)
        stream = data_lib.TrainStream(ds.split("train"), batch_size=tc.batch_size, tgt_len=cfg.tgt_len,
                                      seed=tc.seed, roll_each_epoch=tc.roll_each_epoch)
        mesh = sl.make_mesh(MeshConfig())
        optimizer = make_optimizer(tc)
        state, sh = init_sharded_train_state(cfg, tc, optimizer, tc.batch_size, mesh)
        bsh, ssh = sl.batch_sharding(mesh, (tc.batch_size, cfg.tgt_len)), sl.batch_sharding(mesh, (tc.batch_size,))
        step = jax.jit(make_train_step(cfg, tc, optimizer), in_shardings=(sh, bsh, bsh, ssh),
                       out_shardings=(sh, sl.replicated(mesh)), donate_argnums=(0,))
        losses = []
        for t in range(tc.num_steps):
            b = stream.batch(t)
            state, m = step(state, b.inputs, b.targets, b.start_of_sequence)
            losses.append(float(m["loss"]))
        res[dtype] = losses
    res["memory_dtype"] = str(state.memory.embed.dtype)
    res["lse_dtype"] = str(state.memory.lse.dtype)
    res["param_dtypes"] = sorted({str(x.dtype) for x in jax.tree.leaves(state.params)})
    res["remat"] = _remat_check()
    print(json.dumps(res))


def _remat_check() -> dict:
    """train.remat = none / full / dots: two LaMemo steps (dropout on) give the same results."""
    import jax
    from lamemo_jax.experiment import TrainConfig
    from lamemo_jax.trainer import init_train_state, make_optimizer, make_train_step

    cfg = _tiny_model("lamemo").replace(n_layer=1)  # one layer: three compiles stay cheap
    rng = np.random.default_rng(1)
    batches = [(rng.integers(0, 32, (8, 8)).astype(np.int32), rng.integers(0, 32, (8, 8)).astype(np.int32),
                np.full((8,), s == 0)) for s in range(2)]
    out = {}
    for policy in ("none", "full", "dots"):
        tc = TrainConfig(batch_size=8, num_steps=10, learning_rate=3e-3, schedule="constant", clip=1.0,
                         remat=policy)
        opt = make_optimizer(tc)
        step = jax.jit(make_train_step(cfg, tc, opt))
        state = init_train_state(cfg, tc, opt, 8)
        losses = []
        for x, y, s in batches:
            state, m = step(state, x, y, s)
            losses.append(float(m["loss"]))
        out[policy] = (losses, [np.asarray(a) for a in jax.tree.leaves(state.params)])
        # the policy is really in the program: remat shows up as a checkpoint/remat op in the jaxpr
        out[policy + "_in_jaxpr"] = "remat" in str(jax.make_jaxpr(make_train_step(cfg, tc, opt))(
            state, *batches[0]))
    ref_loss, ref_params = out["none"]
    return {p: {"loss_diff": max(abs(a - b) for a, b in zip(out[p][0], ref_loss)),
                "param_diff": max(float(np.max(np.abs(a - b))) for a, b in zip(out[p][1], ref_params)),
                "in_jaxpr": out[p + "_in_jaxpr"]} for p in ("none", "full", "dots")}


def _gpu_forms_parity() -> dict:
    """The GPU's forms of the step, forced on CPU: layer matmuls zero-padded to multiples of 8 on
    sizes that are not (d_model 30, 15-wide heads, d_inner 60), the position product batched
    over the batch rows, and the one-pass softmax (attention, and the output layer's log-sum-exp
    through the chunked loss). The 2x2x2 mesh (batch, fsdp and tensor sharding) vs one device."""
    import kernels
    from lamemo_jax import embedding
    embedding.PAD_MULTIPLES, previous = (1, 8), embedding.PAD_MULTIPLES
    try:
        with kernels.forced_batched_positions(True), kernels.ONE_PASS_SOFTMAX.forced(True):
            return _parity("lamemo", meshes=("2x2x2",), d_model=30, d_head=15, d_inner=60,
                           softmax_chunk=24)
    finally:
        embedding.PAD_MULTIPLES = previous


def _worker_eight_devices(out_dir: str) -> None:
    import jax
    assert jax.device_count() == 8, jax.devices()
    warnings = []

    class Grab(logging.Handler):
        def emit(self, record):
            warnings.append(record.getMessage())

    logging.getLogger().addHandler(Grab(level=logging.WARNING))
    t0 = time.time()
    res = {"parity": {m: _parity(m) for m in ("lamemo", "xl")}}
    res["parity_seconds"] = time.time() - t0
    t0 = time.time()
    res["gpu_forms"] = _gpu_forms_parity()
    res["gpu_forms_seconds"] = time.time() - t0
    t0 = time.time()
    res["pallas"] = _pallas_sharded()
    res["pallas_seconds"] = time.time() - t0
    t0 = time.time()
    res["checkpoint"] = _checkpoint_across_meshes(out_dir)
    res["checkpoint_seconds"] = time.time() - t0
    res["warnings"] = warnings
    print(json.dumps(res))


# =========================================================================== pytest side
import pytest  # noqa: E402  (the worker above does not need pytest)


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def eight_started(tmp_path_factory):
    """The 8-device worker, started in the background (the two-process test runs meanwhile)."""
    out = str(tmp_path_factory.mktemp("eight"))
    with open(os.path.join(out, "stdout"), "w") as so, open(os.path.join(out, "stderr"), "w") as se:
        proc = subprocess.Popen([sys.executable, HERE, "eight_devices", out], cwd=ROOT, stdout=so, stderr=se,
                                env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=8 " + FAST_COMPILE))
    yield proc, out
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def eight(eight_started):
    proc, out = eight_started
    proc.wait(timeout=900)
    err = open(os.path.join(out, "stderr")).read()
    assert proc.returncode == 0, err[-6000:]
    return json.loads(open(os.path.join(out, "stdout")).read().strip().splitlines()[-1])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_losses(workdir):
    from lamemo_jax.metrics import read_metrics
    return {r["step"]: r["loss"] for r in read_metrics(os.path.join(workdir, "metrics.jsonl"))
            if r["split"] == "train"}


def test_two_processes_equal_one(tmp_path, eight_started):
    """configs/tiny.py for 4 steps: 2 processes x 1 CPU device (each reads 2 of the 4 rows) vs 1."""
    common = [sys.executable, os.path.join(ROOT, "train.py"), "--config=" + os.path.join(ROOT, "configs/tiny.py"),
              "--config.train.num_steps=4", "--config.train.log_every=1", "--config.train.checkpoint_every=2",
              "--config.eval.batch_size=400"]  # 400 eval streams: one scan of 24 segments (fast)
    port = _free_port()
    multi, single = str(tmp_path / "multi"), str(tmp_path / "single")
    procs = [subprocess.Popen(common + [f"--workdir={multi}", f"--coordinator_address=127.0.0.1:{port}",
                                        "--num_processes=2", f"--process_id={i}"],
                              cwd=ROOT, env=_env(XLA_FLAGS=FAST_COMPILE), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    procs.append(subprocess.Popen(common + [f"--workdir={single}"], cwd=ROOT, env=_env(XLA_FLAGS=FAST_COMPILE),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=600)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, o in zip(procs, outs):
        assert p.returncode == 0, o[-5000:]
    assert "process 0 of 2, 1 local device(s)" in outs[0] and "process 1 of 2, 1 local device(s)" in outs[1]
    assert "reads batch rows block (0, 2)" in outs[0]
    a, b = _train_losses(multi), _train_losses(single)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    np.testing.assert_allclose([a[s] for s in a], [b[s] for s in a], rtol=0, atol=TOL)
    # one process writes metrics; the multi-host checkpoint is complete and verified
    from lamemo_jax.checkpoint import verify_manifest
    for step in (2, 4):
        assert verify_manifest(os.path.join(multi, "checkpoints", str(step))) is None
    assert sum(1 for _ in open(os.path.join(multi, "metrics.jsonl"))) == 5  # 4 train + 1 valid


def test_bf16_tracks_float32(tmp_path):
    """configs/tiny.py with --config.model.dtype=bfloat16 (float32 params, optimizer, softmax
    statistics) for its 30 steps vs float32: per-step losses within BF16_MAX_LOSS_GAP."""
    proc = subprocess.run([sys.executable, HERE, "bf16"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=_env(XLA_FLAGS=FAST_COMPILE))
    assert proc.returncode == 0, proc.stderr[-6000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["memory_dtype"] == "bfloat16" and r["lse_dtype"] == "float32"  # bf16 compute happened
    assert r["param_dtypes"] == ["float32"]
    f32, bf16 = np.array(r["float32"]), np.array(r["bfloat16"])
    assert len(f32) == len(bf16) == 30
    gap = np.abs(bf16 - f32)
    assert 0 < gap.max() <= BF16_MAX_LOSS_GAP, (gap.max(), f32, bf16)
    assert bf16[-5:].mean() < bf16[:5].mean() - 0.2  # it trains
    # train.remat: full / dots recompute in the backward pass and give the same step
    remat = r["remat"]
    assert not remat["none"]["in_jaxpr"] and remat["full"]["in_jaxpr"] and remat["dots"]["in_jaxpr"]
    for policy in ("full", "dots"):
        assert remat[policy]["loss_diff"] <= TOL and remat[policy]["param_diff"] <= TOL, remat


@pytest.mark.parametrize("memory,mesh", [(m, k) for m in ("lamemo", "xl") for k in MESHES
                                         if not (m == "xl" and k == "2x1x4")])
def test_sharded_step_equals_single_device(eight, memory, mesh):
    _assert_parity(eight["parity"][memory], mesh)


def _assert_parity(r, mesh):
    """The mesh's two steps equal the single-device run: losses, parameters, memory."""
    got = r[mesh]
    assert got["honoured"], got["specs"]
    assert got["params_changed"]
    np.testing.assert_allclose(got["loss"], r["ref_loss"], rtol=0, atol=TOL)
    assert got["param_diff"] <= TOL, got["param_diff"]
    assert got["memory_diff"] <= TOL, got["memory_diff"]


def test_gpu_forms_sharded_equal_single_device(eight):
    """Padded layer matmuls, the batched position product and the one-pass softmax (the GPU
    defaults, forced on CPU) under the 2x2x2 mesh give the single-device step's losses, parameters and memory."""
    _assert_parity(eight["gpu_forms"], "2x2x2")


@pytest.mark.parametrize("mesh,local", [("2x2x2", [[2, 1]]), ("2x1x4", [[4, 2]])])
def test_pallas_kernels_run_per_shard(eight, mesh, local):
    """With a mesh, each Pallas kernel call runs inside shard_map on its device's rows and heads:
    mesh 2x2x2 splits batch 8 over data x fsdp (2 rows each) and 2 heads over tensor (1 each);
    on 2x1x4 tensor=4 does not divide 2 heads, so heads stay whole (4 rows each, 2 heads). The
    sharded steps equal the single-device XLA step."""
    r = eight["pallas"]
    got = r[mesh]
    assert got["local_batch_heads"] == local, got["local_batch_heads"]
    np.testing.assert_allclose(got["loss"], r["ref_loss"], rtol=0, atol=TOL)
    assert got["param_diff"] <= TOL, got["param_diff"]


def test_sharding_rules_are_applied(eight):
    """Data parallel, FSDP and tensor parallel are really on (not everything replicated)."""
    lam = eight["parity"]["lamemo"]
    xl = eight["parity"]["xl"]
    s = lam["8x1x1"]["specs"]
    assert s["batch"] == "P('data',)"
    assert s["proj"] == s["o_net"] == "P()"  # pure data parallel: params replicated
    assert s["memory"] == "P(None, 'data')"
    s = lam["2x4x1"]["specs"]
    assert s["batch"] == "P(('data', 'fsdp'),)"
    assert "fsdp" in s["proj"] and "fsdp" in s["CoreNet_0"] and s["mu_proj"] == s["proj"]
    assert s["CoreNet_0"] == "P(None, 'fsdp')"  # the largest dim (d_inner=64)
    s = lam["2x2x2"]["specs"]
    assert s["proj"] == "P('fsdp', 'tensor')"  # heads over tensor, d_model over fsdp
    assert s["o_net"] == "P('tensor', 'fsdp')"
    assert s["CoreNet_0"] == "P('fsdp', 'tensor')"
    assert s["CoreNet_3"] == "P('tensor', 'fsdp')"
    assert s["r_w_bias"] == "P('tensor', 'fsdp')"
    assert s["memory"] == "P(None, ('data', 'fsdp'), None, 'tensor')"
    assert s["mu_proj"] == s["proj"]  # optimizer state sharded like the parameters
    assert xl["2x2x2"]["specs"]["memory"] == "P(None, ('data', 'fsdp'))"
    assert xl["2x2x2"]["specs"]["proj"] == "P('fsdp', 'tensor')"
    # 2x1x4: 2 heads over tensor=4 fall back to replication (logged once), the rest still shards
    s = lam["2x1x4"]["specs"]
    assert s["r_w_bias"] == "P()" and s["proj"] == "P(None, 'tensor')"
    assert s["memory"] == "P(None, 'data')"
    fallbacks = [w for w in eight["warnings"] if "logical axis 'heads' of size 2" in w]
    assert len(fallbacks) == 1, eight["warnings"]


def test_checkpoint_restores_under_another_mesh(eight):
    r = eight["checkpoint"]
    full = {int(k): v for k, v in r["full"].items()}
    part = {int(k): v for k, v in r["part"].items()}
    assert sorted(part) == list(range(1, 7)) and sorted(full) == list(range(1, 7))
    assert r["resumed_step"] == 6 and r["steps"] == [6, 6]
    np.testing.assert_allclose([part[s] for s in range(1, 7)], [full[s] for s in range(1, 7)],
                               rtol=0, atol=TOL)
    assert r["restore_exact"] and r["restored_step"] == 3


def test_checkpoint_from_eight_devices_loads_on_one(eight):
    """The 8-device run's checkpoint restores in this 1-device process (load_run, as eval.py)."""
    import jax
    from lamemo_jax.trainer import load_run
    assert jax.device_count() == 1
    _, _, params, step = load_run(eight["checkpoint"]["full_dir"])
    saved = np.load(os.path.join(os.path.dirname(eight["checkpoint"]["full_dir"]), "full_params.npz"))
    flat = {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    assert step == 6 and sorted(flat) == sorted(saved.files)
    for k in saved.files:
        np.testing.assert_array_equal(flat[k], saved[k])


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    if sys.argv[1] == "eight_devices":
        _worker_eight_devices(sys.argv[2])
    elif sys.argv[1] == "bf16":
        _worker_bf16()
    else:
        raise SystemExit(f"unknown worker mode {sys.argv[1]!r}")
