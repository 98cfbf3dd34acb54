"""Pallas kernels vs the plain-jnp references (interpret mode on CPU), the dispatcher, the whole
model with attention_impl="pallas_interpret", and the GPU/TPU lowering checks.

Tolerances are fixed: float32 1e-5 absolute (inputs and outputs of magnitude 0.1-5);
bfloat16 2e-2 * max(1, max|reference|) per array, i.e. about 5 bf16 epsilons (2^-8) of the array's
scale: both paths round q, k, v, r, p and the bf16 outputs (one bf16 ulp of a gradient of
magnitude 4 is already 0.031) but in different orders, so they agree to a few ulps, not bit for
bit; the kernel is checked against the bf16 reference and against the float32 one. The model
fixtures: 2e-5 on the NLL against the original's pure-float64 run.

On a GPU machine, ``LAMEMO_KERNELS_COMPILED=1 python -m pytest tests/test_kernels.py`` runs the
same reference-equality cases (and the model tests) through the real Triton compile instead of
interpret mode: target "gpu", blocks raised to the Triton minimum of 16, attention_impl="pallas",
and float32 matmuls at full precision on both sides (no TF32). Without the variable (CI, CPU) the
kernels run in interpret mode.

Interpret mode is slow, so the shapes are small, the blocks are 8 or 16 rows (which makes the
shapes span several blocks and end in ragged ones), and each case checks the forward outputs and
every gradient (one random cotangent per output, lse included) in one jitted call.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import re
import sys
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from kernels import BlockSizes, KernelUnavailableError
from kernels import _relpos_flash as flash
from kernels.check_lowering import main as check_lowering_main
from kernels.lookahead import lookahead_pallas, lookahead_reference
from kernels.rel_attention import rel_attention_pallas, rel_attention_reference

# Compiled mode (see the module docstring): needs a GPU backend, fails loudly otherwise.
COMPILED = os.environ.get("LAMEMO_KERNELS_COMPILED", "") == "1"
if COMPILED:
    if jax.default_backend() != "gpu":
        raise RuntimeError("LAMEMO_KERNELS_COMPILED=1 needs a GPU backend; this process runs on "
                           f"{jax.default_backend()!r}")
    jax.config.update("jax_default_matmul_precision", "highest")
MODEL_PALLAS_IMPL = "pallas" if COMPILED else "pallas_interpret"


def _pallas_mode(target: str, bs: BlockSizes) -> dict:
    """Keyword arguments of a Pallas call in this test mode: interpret mode with the case's target
    and blocks on CPU; the compiled GPU kernels (blocks >= 16) with LAMEMO_KERNELS_COMPILED=1."""
    if not COMPILED:
        return dict(interpret=True, target=target, block_sizes=bs)
    up = lambda v: max(v, 16)
    return dict(interpret=False, target="gpu",
                block_sizes=dataclasses.replace(bs, block_q=up(bs.block_q), block_k=up(bs.block_k),
                                                block_bwd=up(bs.block_bwd)))


F32_TOL = 1e-5  # absolute
BF16_TOL = 2e-2  # relative to max(1, max|reference|) of each array (see the module docstring)


# ----------------------------------------------------------------------------------- helpers
def _positions(dist: np.ndarray, heads: int, d_head: int, clamp) -> jnp.ndarray:
    """r rows for the given distances as the model builds them: sinusoid(clamped) @ W_R."""
    dist = np.asarray(dist, np.float64)
    if clamp is not None:
        dist = np.minimum(dist, clamp)
    d_model = 16
    freq = 1.0 / (10000 ** (np.arange(0, d_model, 2) / d_model))
    x = dist[:, None] * freq[None, :]
    emb = np.concatenate([np.sin(x), np.cos(x)], axis=-1)
    w = np.random.default_rng(123).normal(size=(d_model, heads * d_head)) * 0.4
    return jnp.asarray((emb @ w).reshape(len(dist), heads, d_head), jnp.float32)


def _normal(rng, *shape, scale=0.5):
    return jnp.asarray(rng.normal(size=shape) * scale, jnp.float32)


def _rel_inputs(b, n, mb, h, d, valid, clamp, seed=0):
    rng = np.random.default_rng(seed)
    k = mb + n
    r = _positions(np.arange(k - 1, -1, -1), h, d, clamp)
    args = (_normal(rng, b, n, h, d), _normal(rng, b, k, h, d), _normal(rng, b, k, h, d), r,
            _normal(rng, h, d), _normal(rng, h, d))
    key_start = jnp.asarray([mb - v for v in valid], jnp.int32)
    return args, key_start


def _lookahead_inputs(b, n, mb, h, d, valid, clamp, causal, seed=0):
    """As the model calls it: window = rows Mb-W+1 .. Mb of [memory; current], the r_table and
    r_offset of the causal / full variants, a cache that is zero on empty memory slots."""
    rng = np.random.default_rng(seed)
    k = mb + n
    w = min(mb, n)
    r_all = _positions(np.concatenate([np.arange(k - 1, -1, -1), np.arange(1, mb + 1)]), h, d,
                       clamp)
    r_past, r_fut = r_all[:k], r_all[k:]
    if causal:
        r_table, r_offset = r_fut, -1
    else:
        r_table, r_offset = jnp.concatenate([r_past[k - w + 1:], r_fut]), w - 2
    row_ok = np.arange(mb)[None, :] >= (mb - np.asarray(valid)[:, None])  # [B, Mb]
    cache = np.asarray(_normal(rng, b, mb, h, d)) * row_ok[..., None, None]
    cache_lse = (rng.normal(size=(b, mb, h)) + 1.5) * row_ok[..., None]
    args = (_normal(rng, b, mb, h, d), _normal(rng, b, w, h, d), _normal(rng, b, w, h, d),
            r_table, _normal(rng, h, d), _normal(rng, h, d), jnp.asarray(cache, jnp.float32),
            jnp.asarray(cache_lse, jnp.float32))
    return args, jnp.asarray(valid, jnp.int32), r_offset


def _fwd_and_grads(fn, args, seed=1):
    """(outputs..., cotangents of every array argument) for a random cotangent of each output."""
    rng = np.random.default_rng(seed)
    cts = tuple(jnp.asarray(rng.normal(size=o.shape), jnp.float32).astype(o.dtype)
                for o in jax.eval_shape(fn, *args))

    def run(a, c):
        outs, vjp = jax.vjp(fn, *a)
        return outs + vjp(c)

    return jax.jit(run)(args, cts)


def _assert_close(got, want, names, tol, scaled=False):
    """max |got - want| <= tol (scaled: tol * max(1, max|want|)) for every named array."""
    assert len(got) == len(want) == len(names)
    for name, g, w in zip(names, got, want):
        assert g.shape == w.shape, (name, g.shape, w.shape)
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        assert np.all(np.isfinite(g)), f"{name}: non-finite values"
        bound = tol * max(1.0, float(np.abs(w).max())) if scaled else tol
        err = float(np.max(np.abs(g - w))) if g.size else 0.0
        assert err <= bound, (f"{name}: max abs error {err:.3g} > {bound:.3g} "
                              f"(max |ref| {np.abs(w).max():.3g})")


REL_NAMES = ("out", "lse", "dq", "dk", "dv", "dr", "du", "dvbias")
LOOK_NAMES = ("c", "new_lse", "dq", "dk_win", "dv_win", "dr_table", "du", "dvbias", "dcache",
              "dcache_lse")

# (B, N, Mb, H, D, valid memory per row, clamp, same_length, target, BlockSizes)
REL_CASES = {
    "no_memory": (2, 12, 0, 2, 8, (0, 0), None, False, "tpu", BlockSizes(8, 8, 8)),
    "M<N_partial_clamp_samelen": (2, 16, 8, 2, 8, (8, 5), 6, True, "tpu", BlockSizes(8, 16, 8)),
    "M=N_empty_row_gpu": (2, 16, 16, 3, 8, (0, 12), None, False, "gpu", BlockSizes(16, 8, 8)),
    "M>N_ragged_clamp_samelen_gpu": (2, 7, 21, 2, 16, (21, 4), 9, True, "gpu", BlockSizes(8, 8, 8)),
}


@pytest.mark.parametrize("case", sorted(REL_CASES))
def test_rel_attention_matches_reference(case):
    b, n, mb, h, d, valid, clamp, same_length, target, bs = REL_CASES[case]
    args, key_start = _rel_inputs(b, n, mb, h, d, valid, clamp)
    kw = dict(scale=1.0 / math.sqrt(d), same_length=same_length)
    got = _fwd_and_grads(lambda *a: rel_attention_pallas(
        *a, key_start, **_pallas_mode(target, bs), **kw), args)
    want = _fwd_and_grads(lambda *a: rel_attention_reference(*a, key_start, **kw), args)
    assert [x.dtype for x in got] == [x.dtype for x in want]
    _assert_close(got, want, REL_NAMES, F32_TOL)


# (B, N, Mb, H, D, valid memory per row, clamp, causal, target, BlockSizes)
LOOK_CASES = {
    "M<N_partial_clamp": (2, 12, 8, 2, 8, (8, 3), 5, True, "tpu", BlockSizes(8, 8, 8)),
    "M=N_empty_row_gpu": (2, 16, 16, 3, 8, (16, 0), None, True, "gpu", BlockSizes(16, 8, 8)),
    "M>N_ragged": (2, 6, 21, 2, 8, (21, 10), None, True, "tpu", BlockSizes(8, 8, 8)),
    "full_M>N_clamp_gpu": (2, 8, 13, 2, 16, (13, 7), 6, False, "gpu", BlockSizes(8, 8, 8)),
}


@pytest.mark.parametrize("case", sorted(LOOK_CASES))
def test_lookahead_matches_reference(case):
    b, n, mb, h, d, valid, clamp, causal, target, bs = LOOK_CASES[case]
    args, mem_valid, r_offset = _lookahead_inputs(b, n, mb, h, d, valid, clamp, causal)
    kw = dict(r_offset=r_offset, scale=1.0 / math.sqrt(d), causal=causal)
    got = _fwd_and_grads(lambda *a: lookahead_pallas(
        *a, mem_valid, **_pallas_mode(target, bs), **kw), args)
    want = _fwd_and_grads(lambda *a: lookahead_reference(*a, mem_valid, **kw), args)
    assert [x.dtype for x in got] == [x.dtype for x in want]
    _assert_close(got, want, LOOK_NAMES, F32_TOL)


def test_bfloat16_matches_reference():
    """bf16 inputs, float32 statistics: within BF16_TOL (scaled) of the bf16 reference and of the
    float32 reference; outputs and gradients in the reference's dtypes."""
    bf = lambda xs: tuple(x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x for x in xs)
    bs = BlockSizes(16, 16, 16)
    args, key_start = _rel_inputs(2, 12, 20, 2, 16, (20, 9), None)
    kw = dict(scale=0.25, same_length=True)
    pal = lambda *a: rel_attention_pallas(*a, key_start, **_pallas_mode("tpu", bs), **kw)
    ref = lambda *a: rel_attention_reference(*a, key_start, **kw)
    got = _fwd_and_grads(pal, bf(args))
    want = _fwd_and_grads(ref, bf(args))
    assert got[0].dtype == jnp.bfloat16 and got[1].dtype == jnp.float32
    assert [x.dtype for x in got] == [x.dtype for x in want]
    _assert_close(got, want, REL_NAMES, BF16_TOL, scaled=True)
    _assert_close(got, _fwd_and_grads(ref, args), REL_NAMES, BF16_TOL, scaled=True)

    args, mem_valid, r_offset = _lookahead_inputs(2, 12, 20, 2, 16, (20, 9), None, True)
    kw = dict(r_offset=r_offset, scale=0.25)
    pal = lambda *a: lookahead_pallas(*a, mem_valid, **_pallas_mode("gpu", bs), **kw)
    ref = lambda *a: lookahead_reference(*a, mem_valid, **kw)
    bf_args = bf(args[:7]) + (args[7],)  # cache_lse stays float32 (the model keeps Z >= f32)
    got = _fwd_and_grads(pal, bf_args)
    want = _fwd_and_grads(ref, bf_args)
    assert got[0].dtype == jnp.bfloat16 and got[1].dtype == jnp.float32
    assert [x.dtype for x in got] == [x.dtype for x in want]
    _assert_close(got, want, LOOK_NAMES, BF16_TOL, scaled=True)
    _assert_close(got, _fwd_and_grads(ref, args), LOOK_NAMES, BF16_TOL, scaled=True)


# ----------------------------------------------------------------------------------- memory
def _max_intermediate(jaxpr) -> int:
    """Largest array in a jaxpr, recursing into sub-jaxprs except Pallas kernel bodies (whose
    shapes are on-chip blocks, not HBM arrays)."""
    best = 0
    for eqn in jaxpr.eqns:
        for v in list(eqn.outvars) + [x for x in eqn.invars if hasattr(x, "aval")]:
            if hasattr(v.aval, "shape"):
                best = max(best, math.prod(v.aval.shape))
        if eqn.primitive.name == "pallas_call":
            continue
        for p in eqn.params.values():
            for sub in (p if isinstance(p, (list, tuple)) else [p]):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    best = max(best, _max_intermediate(inner))
    return best


@pytest.mark.parametrize("target", ["gpu", "tpu"])
def test_no_rows_by_keys_tensor_in_hbm(target):
    """Traced at N = Mb = 4096 (no execution): no HBM array of the forward or the backward is
    within a factor 4 of N*K, while the reference's score tensor is N*K itself."""
    n = mb = 4096
    b, h, d = 1, 1, 64
    f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
    ks = jax.ShapeDtypeStruct((b,), jnp.int32)
    rel_args = (f32(b, n, h, d), f32(b, mb + n, h, d), f32(b, mb + n, h, d), f32(mb + n, h, d),
                f32(h, d), f32(h, d))

    def rel_loss(fn):
        return lambda *a: sum(jnp.sum(o) for o in fn(*a[:-1], a[-1], scale=0.125))

    pal = lambda *a, **kw: rel_attention_pallas(*a, target=target, interpret=False, **kw)
    jp = jax.make_jaxpr(jax.grad(rel_loss(pal), argnums=tuple(range(6))))(*rel_args, ks)
    jr = jax.make_jaxpr(jax.grad(rel_loss(rel_attention_reference), argnums=(0,)))(*rel_args, ks)
    assert _max_intermediate(jr.jaxpr) >= n * (mb + n)  # the check can see an [N, K] tensor
    assert _max_intermediate(jp.jaxpr) < n * (mb + n) // 4

    w = min(mb, n)
    look_args = (f32(b, mb, h, d), f32(b, w, h, d), f32(b, w, h, d), f32(mb, h, d), f32(h, d),
                 f32(h, d), f32(b, mb, h, d), f32(b, mb, h))

    def look_loss(*a):
        c, z = lookahead_pallas(*a[:-1], a[-1], r_offset=-1, scale=0.125, target=target)
        return jnp.sum(c) + jnp.sum(z)

    jl = jax.make_jaxpr(jax.grad(look_loss, argnums=tuple(range(6))))(*look_args, ks)
    assert _max_intermediate(jl.jaxpr) < mb * w // 4


# ----------------------------------------------------------------------------------- API
def test_block_sizes_validation():
    assert BlockSizes() == BlockSizes(128, 128, 128)
    for bad in (0, 12, 4, -8, 8.0, True):
        with pytest.raises(ValueError, match="power of two"):
            BlockSizes(block_q=bad)
    with pytest.raises(ValueError, match="multiple of 128"):
        flash.make_tiling("tpu", False, BlockSizes(128, 64, 128), 64, 64, 63, 64, jnp.float32)
    with pytest.raises(ValueError, match=">= 16"):
        flash.make_tiling("gpu", False, BlockSizes(8, 64, 64), 64, 64, 63, 64, jnp.float32)
    with pytest.raises(dataclasses.FrozenInstanceError):
        BlockSizes().block_q = 16  # type: ignore[misc]
    # Triton warps per program: a tuning knob of the compiled GPU kernels, 4 unless set
    assert BlockSizes().num_warps == 4 and BlockSizes.default("gpu") == BlockSizes(64, 64, 32, 4)
    for bad in (0, 3, 32, True, 4.0):
        with pytest.raises(ValueError, match="num_warps"):
            BlockSizes(num_warps=bad)
    assert BlockSizes.parse("64,64,32") == BlockSizes(64, 64, 32)
    assert BlockSizes.parse("64,32,32,8") == BlockSizes(64, 32, 32, 8)
    for bad in ("64,64", "64,64,32,8,1", "a,64,32", "64,64,-32", "\u00b2,64,32", "64,,32"):
        with pytest.raises(ValueError, match="block_q,block_k,block_bwd"):
            BlockSizes.parse(bad)
    with pytest.raises(ValueError, match="power of two"):  # well-formed, then validated
        BlockSizes.parse("64,64,48")


@pytest.mark.parametrize("kind", ["rel", "lookahead"])
@pytest.mark.parametrize("warps", [2, 8])
def test_num_warps_reaches_the_triton_kernels(kind, warps):
    """The lowered Triton calls (forward, row term, dQ, dK/dV, dR) carry the asked warps."""
    bs = BlockSizes(16, 16, 16, warps)
    if kind == "rel":
        args, extra = _rel_inputs(2, 16, 16, 2, 16, (16, 5), None)
        call = lambda *a: rel_attention_pallas(*a, extra, scale=0.25, target="gpu", interpret=False,
                                               block_sizes=bs)
    else:
        args, extra, r_offset = _lookahead_inputs(2, 16, 16, 2, 16, (16, 5), None, True)
        call = lambda *a: lookahead_pallas(*a, extra, r_offset=r_offset, scale=0.25, target="gpu",
                                           interpret=False, block_sizes=bs)

    def loss(*a):
        out, lse = call(*a)
        return jnp.sum(out * out) + jnp.sum(lse)

    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).trace(*args).lower(
        lowering_platforms=("cuda",)).as_text()
    assert re.findall(r"num_warps = (\d+)", text) == [str(warps)] * 5


def test_dispatcher(monkeypatch):
    assert kernels.resolve_impl("xla") == "xla"
    assert kernels.resolve_impl("pallas_interpret") == "pallas_interpret"
    assert kernels.resolve_impl("auto") == ("xla" if jax.default_backend() == "cpu" else "pallas")
    with pytest.raises(ValueError, match="attention_impl"):
        kernels.resolve_impl("triton")
    args, key_start = _rel_inputs(2, 8, 8, 2, 8, (8, 3), None)
    if jax.default_backend() == "cpu":
        with pytest.raises(KernelUnavailableError, match="pallas_interpret"):
            kernels.resolve_impl("pallas")
        with pytest.raises(RuntimeError, match="interpret=True"):
            rel_attention_pallas(*args, key_start, scale=0.3)
    # Attention dropout (dropatt > 0 with an rng) falls back to the reference whatever impl says;
    # the kernels themselves refuse it.
    kw = dict(scale=0.3, dropatt=0.5, dropout_rng=jax.random.key(0))
    with pytest.raises(NotImplementedError, match="dropout"):
        rel_attention_pallas(*args, key_start, interpret=True, **kw)
    largs, mem_valid, r_offset = _lookahead_inputs(2, 8, 8, 2, 8, (8, 3), None, True)
    lkw = dict(r_offset=r_offset, scale=0.3, dropatt=0.5, dropout_rng=jax.random.key(0))
    with pytest.raises(NotImplementedError, match="dropout"):
        lookahead_pallas(*largs, mem_valid, interpret=True, **lkw)
    calls = []
    monkeypatch.setattr(kernels, "rel_attention_reference", lambda *a, **k: calls.append("rel"))
    monkeypatch.setattr(kernels, "lookahead_reference", lambda *a, **k: calls.append("look"))
    kernels.rel_attention("pallas_interpret", *args, key_start, **kw)
    kernels.lookahead("pallas_interpret", *largs, mem_valid, **lkw)
    kernels.rel_attention("xla", *args, key_start, scale=0.3)
    assert calls == ["rel", "look", "rel"]


# ----------------------------------------------------------------------------------- lowering
@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_lowering(platform, capsys):
    """Every kernel, forward and backward, several shapes and dtypes, lowers for the platform."""
    assert check_lowering_main(["--platform", platform]) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out and "lowerings passed" in out


# ----------------------------------------------------------------------------------- the model
def _fixture_root() -> Path:
    local = Path(__file__).resolve().parent / "fixtures" / "torch-reference"
    if local.is_dir():
        return local
    return Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "torch-reference"


FIXTURES = ["lamemo_basic", "lamemo_longmem", "lamemo_adaptive", "txl_basic", "txl_longmem",
            "txl_adaptive"]


@pytest.mark.parametrize("name", FIXTURES)
def test_model_pallas_interpret_matches_torch_fixture(name):
    import lamemo_jax

    d = _fixture_root() / name
    if not d.is_dir():
        pytest.fail(f"fixture folder {d} not found")
    state = {k: v.astype(np.float32) for k, v in np.load(d / "state_dict.npz").items()}
    cfg, params = lamemo_jax.convert.from_torch(json.load(open(d / "config.json")), state)
    assert cfg.dtype == "float32"
    cfg = cfg.replace(attention_impl=MODEL_PALLAS_IMPL)
    nll, _ = lamemo_jax.score(cfg, params, np.load(d / "tokens.npy"))
    want = np.load(d / "nll_pure64.npy")
    err = float(np.max(np.abs(nll - want)))
    assert err <= 2e-5, f"{name}: max |nll - nll_pure64| = {err:.3g}"


def test_model_pallas_interpret_float64_matches_pure64():
    """In float64 (interpret mode computes in float64 throughout) the kernels reproduce the
    original's pure-float64 run to rounding: M > N, mem_len not a multiple of tgt_len, clamp on."""
    import lamemo_jax

    if not jax.config.jax_enable_x64:
        pytest.fail("this test needs jax_enable_x64 (tests/conftest.py enables it)")
    d = _fixture_root() / "lamemo_longmem"
    cfg, params = lamemo_jax.convert.from_torch(json.load(open(d / "config.json")),
                                                dict(np.load(d / "state_dict.npz")))
    assert cfg.dtype == "float64"
    nll, _ = lamemo_jax.score(cfg.replace(attention_impl="pallas_interpret"), params,
                              np.load(d / "tokens.npy"))
    err = float(np.max(np.abs(nll - np.load(d / "nll_pure64.npy"))))
    assert err <= 1e-10, f"max |nll - nll_pure64| = {err:.3g}"


def test_sgd_steps_pallas_interpret_equal_xla():
    """A few SGD steps of a small LaMemo model (memory carried between steps, M > N with a ragged
    block, clamp on): the same losses with the Pallas kernels as with the XLA reference."""
    import lamemo_jax

    base = lamemo_jax.ModelConfig(n_token=40, n_layer=2, n_head=2, d_model=32, d_head=16,
                                  d_inner=48, tgt_len=6, mem_len=10, clamp_len=8)
    params0 = lamemo_jax.init_params(base.replace(attention_impl="xla"), jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 4 * 6 + 1), 0, 40)

    def run(impl):
        cfg = base.replace(attention_impl=impl)

        @jax.jit
        def step(params, memory, x, y):
            def loss_fn(p):
                out, mem = lamemo_jax.apply(cfg, p, x, memory, targets=y, train=False)
                return jnp.mean(out.nll), mem

            (loss, mem), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            params = jax.tree.map(lambda p, g: p - 0.5 * g, params, grads)
            return params, mem, loss

        params, memory, losses = params0, lamemo_jax.init_memory(cfg, 2), []
        for s in range(4):
            x, y = tokens[:, s * 6:(s + 1) * 6], tokens[:, s * 6 + 1:(s + 1) * 6 + 1]
            params, memory, loss = step(params, memory, x, y)
            losses.append(float(loss))
        return np.asarray(losses)

    xla, pallas = run("xla"), run(MODEL_PALLAS_IMPL)
    assert np.all(np.abs(np.diff(xla)) > 1e-3)  # the steps do move the loss
    np.testing.assert_allclose(pallas, xla, rtol=0, atol=1e-5)


def test_auto_self_check_passes_in_interpret_mode_and_falls_back_on_failure(monkeypatch):
    """'auto' trusts the kernels on an accelerator only after they match the references there."""
    import functools
    import kernels as K
    monkeypatch.setattr(K, "rel_attention_pallas", functools.partial(K.rel_attention_pallas, interpret=True))
    monkeypatch.setattr(K, "lookahead_pallas", functools.partial(K.lookahead_pallas, interpret=True))
    monkeypatch.setattr(K, "_SELF_CHECK", {})
    assert K.pallas_self_check() is True

    def broken(*a, **k):
        raise RuntimeError("simulated Mosaic/Triton compile failure")
    monkeypatch.setattr(K, "lookahead_pallas", broken)
    monkeypatch.setattr(K, "_SELF_CHECK", {})
    monkeypatch.setattr(K.jax, "default_backend", lambda: "gpu")
    assert K.resolve_impl("auto") == "xla"


def _batched_positions_case(kind, case, dtype=jnp.float32):
    """(fresh-function factory, input arrays, output/gradient names) of one reference case."""
    if kind == "rel":
        b, n, mb, h, d, valid, clamp, same_length, _, _ = REL_CASES[case]
        args, key_start = _rel_inputs(b, n, mb, h, d, valid, clamp)
        kw = dict(scale=1.0 / math.sqrt(d), same_length=same_length)
        make_fn, names = (lambda: lambda *a: rel_attention_reference(*a, key_start, **kw)), REL_NAMES
    else:
        b, n, mb, h, d, valid, clamp, causal, _, _ = LOOK_CASES[case]
        args, mem_valid, r_offset = _lookahead_inputs(b, n, mb, h, d, valid, clamp, causal)
        kw = dict(r_offset=r_offset, scale=1.0 / math.sqrt(d), causal=causal)
        make_fn, names = (lambda: lambda *a: lookahead_reference(*a, mem_valid, **kw)), LOOK_NAMES
    args = tuple(x.astype(dtype) if i < 6 else x for i, x in enumerate(args))  # q k v r u vb
    return make_fn, args, names


def _both_forms(kind, case, dtype=jnp.float32, switch=kernels.BATCHED_POSITIONS):
    """The reference case's outputs and gradients with ``switch`` forced off, then on."""
    results, programs = [], []
    make_fn, args, names = _batched_positions_case(kind, case, dtype)
    for on in (False, True):
        with switch.forced(on):
            fn = make_fn()  # a new function: jax caches traces per function
            programs.append(str(jax.make_jaxpr(fn)(*args)))
            results.append(_fwd_and_grads(fn, args))
    assert programs[0] != programs[1]  # the setting does change the computation
    return results, names


@pytest.mark.parametrize("kind,case", [("rel", c) for c in sorted(REL_CASES)]
                         + [("lookahead", c) for c in sorted(LOOK_CASES)])
def test_batched_positions_same_values(kind, case):
    """The references' two batchings of the position product (r shared by the batch rows: the CPU
    default; r broadcast over them: the GPU default) give the same outputs and gradients."""
    (shared, batched), names = _both_forms(kind, case)
    _assert_close(batched, shared, names, F32_TOL)


@pytest.mark.parametrize("kind,case", [("rel", "M=N_empty_row_gpu"), ("lookahead", "M>N_ragged")])
def test_batched_positions_bfloat16_position_gradient(kind, case):
    """In bf16 the broadcast form's r gradient is summed over the batch in float32 and rounded
    once, like the shared form's: the two differ by at most one bf16 ulp per element (plain
    autodiff of the broadcast would round each batch row's gradient to bf16 first)."""
    (shared, batched), names = _both_forms(kind, case, jnp.bfloat16)
    _assert_close(batched, shared, names, BF16_TOL, scaled=True)
    i = names.index("dr" if "dr" in names else "dr_table")
    a, b = (np.asarray(x[i], np.float64) for x in (batched, shared))
    ulp = 2.0 ** -7 * np.maximum(np.abs(a), np.abs(b))
    assert np.all(np.abs(a - b) <= ulp), float(np.max(np.abs(a - b) / np.maximum(ulp, 1e-30)))


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("case", sorted(LOOK_CASES))
def test_narrow_band_same_values(case, batched, monkeypatch):
    """The look-ahead's position band in narrow blocks (the CPU default; 3-row blocks here, so that
    every case has several, some ragged) equals W-row blocks: outputs and every gradient, in
    float64, to 1e-12, with either batching of the position product."""
    monkeypatch.setattr(sys.modules["kernels.lookahead"], "NARROW_BAND_ROWS", 3)
    with kernels.forced_batched_positions(batched):
        (wide, narrow), names = _both_forms("lookahead", case, jnp.float64, kernels.NARROW_BAND)
    _assert_close(narrow, wide, names, 1e-12)


@pytest.mark.parametrize("kind,case", [("rel", c) for c in sorted(REL_CASES)]
                         + [("lookahead", c) for c in sorted(LOOK_CASES)])
def test_one_pass_softmax_same_values(kind, case):
    """The references' softmax in one pass with its closed-form backward (the GPU default) equals
    the plain two-pass autodiff (the CPU's): outputs and every gradient, in float64, to 1e-12
    (both compute lse, so also through the lookahead's interpolation weights)."""
    (plain, one_pass), names = _both_forms(kind, case, jnp.float64, kernels.ONE_PASS_SOFTMAX)
    _assert_close(one_pass, plain, names, 1e-12)
