"""Properties of the model that hold by construction of the method (no fixtures needed)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
import lamemo_jax
from lamemo_jax import ModelConfig
from lamemo_jax.model import position_sequence, sinusoid


def small_cfg(**kw):
    base = dict(n_token=64, n_layer=2, n_head=2, d_model=16, d_head=8, d_inner=32, tgt_len=6,
                mem_len=10, memory="lamemo", dtype="float64", param_dtype="float64")
    base.update(kw)
    return ModelConfig(**base)


def perturbed_params(cfg, seed=0):
    """Init params plus N(0, 0.1) noise so that no bias is 0 and no gain is 1."""
    params = lamemo_jax.init_params(cfg, jax.random.key(seed))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape, x.dtype)
                                     for x, k in zip(leaves, keys)])


@pytest.mark.parametrize("lookahead", ["disentangled", "signed", "future_content_bias", "full"])
def test_causality_through_gradients(lookahead):
    """The loss at t has exactly zero gradient w.r.t. the input embedding of every later token.

    Every position holds a distinct token id and the softmax is untied, so the gradient w.r.t. a
    table row is the gradient w.r.t. that position's input embedding. Three segments, memory
    refresh included, train mode with dropout.
    """
    n = 6
    cfg = small_cfg(lookahead=lookahead, tie_weight=False, mem_len=n + 3 if lookahead != "full" else n,
                    dropout=0.1, tgt_len=n)
    params = perturbed_params(cfg)
    tokens = np.arange(3 * n + 1, dtype=np.int32)[None, :] + 1  # distinct ids per position
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    rng = jax.random.key(7)

    def loss_at(table, t):
        p = dict(params, word_emb=dict(params["word_emb"], emb_layers_0=table))
        # the three segments in one scan (segment s gets dropout key fold_in(rng, s))
        nll, _ = lamemo_jax.run_segments(cfg, p, inputs.reshape(1, 3, n), targets.reshape(1, 3, n),
                                         lamemo_jax.init_memory(cfg, 1), train=True, rng=rng)
        # the loss at position t alone (t traced: one compile for every t below)
        return jnp.sum(jnp.where(jnp.arange(3 * n) == t, nll.reshape(-1), 0.0))

    table = params["word_emb"]["emb_layers_0"]
    grad_at = jax.jit(jax.grad(loss_at))
    for t in (2 * n + 1, 2 * n + n - 2, n + 2):
        g = np.asarray(grad_at(table, t))
        row_norm = np.abs(g).sum(-1)
        later = tokens[0, t + 1:3 * n]  # input ids of later positions
        assert np.all(row_norm[later] == 0.0), (t, row_norm[later])
        assert row_norm[tokens[0, t]] > 0 and row_norm[tokens[0, t - 1]] > 0


def test_xl_with_long_memory_equals_one_pass():
    """XL, mem_len >= total length: S segments with memory == one segment over everything."""
    s, n = 4, 5
    cfg = small_cfg(memory="xl", tgt_len=n, mem_len=s * n, dtype="float32", param_dtype="float32")
    params = perturbed_params(cfg)
    tokens = np.random.default_rng(0).integers(0, cfg.n_token, (3, s * n + 1)).astype(np.int32)
    nll_seg, _ = lamemo_jax.score(cfg, params, tokens)
    nll_one, _ = lamemo_jax.score(cfg, params, tokens, tgt_len=s * n)
    assert np.abs(nll_seg - nll_one).max() <= 1e-6


def _layer0_window_softmax(cfg, params, tokens, S):
    """Naive: for each memory token after S segments, one softmax over its whole window at layer 0.

    Keys run from the token's causal window start (its own segment's memory start) up to
    max(t, first token of the last segment); past keys use v and r(t-j), future keys v_ and r(j-t).
    """
    n, mem_len = cfg.tgt_len, cfg.mem_len
    h, dh = cfg.n_head, cfg.d_head
    p = jax.tree.map(np.asarray, params)
    emb = p["word_emb"]["emb_layers_0"][tokens[0, :S * n]] * math.sqrt(cfg.d_model)
    lp = p["layers_0"]
    q = (emb @ lp["q_net"]["kernel"]).reshape(-1, h, dh)
    kv = emb @ lp["kv_net"]["kernel"]
    k = kv[:, :h * dh].reshape(-1, h, dh)
    v = kv[:, h * dh:].reshape(-1, h, dh)
    u, vb = p["r_w_bias"], p["r_r_bias"]
    vf = vb if cfg.lookahead == "signed" else p["r_r_bias_future"]
    uf = p["r_w_bias_future"] if cfg.lookahead == "future_content_bias" else u
    wr = lp["r_net"]["kernel"]

    def r(dist, future=False):
        d = min(dist, cfg.clamp_len) if cfg.clamp_len > 0 else dist
        if future and cfg.lookahead == "signed":
            d = -dist  # signed TXL distance; the original clamps from above only
        return (np.asarray(sinusoid(jnp.asarray([float(d)]), cfg.d_model, jnp.float64)) @ wr).reshape(h, dh)

    m = min(mem_len, S * n)
    C, Z = [], []
    for t in range(S * n - m, S * n):
        s0 = t // n
        start = s0 * n - min(mem_len, s0 * n)
        end = t if s0 == S - 1 else max(t, (S - 1) * n)
        sc = []
        for j in range(start, end + 1):
            if j <= t:
                sc.append(np.einsum("hd,hd->h", q[t] + u, k[j]) + np.einsum("hd,hd->h", q[t] + vb, r(t - j)))
            else:
                sc.append(np.einsum("hd,hd->h", q[t] + uf, k[j])
                          + np.einsum("hd,hd->h", q[t] + vf, r(j - t, future=True)))
        sc = np.stack(sc) / math.sqrt(dh)  # [keys, H]
        z = np.log(np.exp(sc - sc.max(0)).sum(0)) + sc.max(0)
        C.append(np.einsum("jh,jhd->hd", np.exp(sc - z), v[start:end + 1]))
        Z.append(z)
    return np.stack(C), np.stack(Z), np.abs(v).max()


@pytest.mark.parametrize("mem_len,clamp,lookahead", [(15, -1, "disentangled"), (9, 4, "disentangled"),
                                                     (9, 4, "signed"), (15, -1, "future_content_bias")])
def test_lamemo_layer0_refresh_is_one_softmax_over_the_window(mem_len, clamp, lookahead):
    """With eps = 0 the layer-0 cache is exactly one softmax over each token's whole window;
    with the original's eps = 1e-6 it deviates by at most S * 2 * eps * max|v|."""
    S, n = 5, 6
    cfg = small_cfg(n_layer=1, tgt_len=n, mem_len=mem_len, clamp_len=clamp, lookahead_eps=0.0,
                    lookahead=lookahead)
    params = perturbed_params(cfg, seed=3)
    tokens = np.random.default_rng(1).integers(0, cfg.n_token, (1, S * n + 1)).astype(np.int32)
    _, mem = lamemo_jax.score(cfg, params, tokens)
    C_ref, Z_ref, v_max = _layer0_window_softmax(cfg, params, tokens, S)
    np.testing.assert_allclose(np.asarray(mem.attn[0, 0]), C_ref, rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.asarray(mem.lse[0, 0]), Z_ref, rtol=0, atol=1e-12)
    _, mem_eps = lamemo_jax.score(cfg.replace(lookahead_eps=1e-6), params, tokens)
    dev = np.abs(np.asarray(mem_eps.attn[0, 0]) - C_ref).max()
    # each refresh moves alpha by <= eps and c by <= eps*|C - b| <= 2*eps*max|v|; <= S refreshes
    assert 0 < dev <= S * 1e-6 * 2 * v_max


@pytest.mark.parametrize("memory", ["lamemo", "xl"])
def test_reset_row_equals_fresh_stream(memory):
    S, n = 4, 5
    cfg = small_cfg(memory=memory, tgt_len=n, mem_len=7)
    params = perturbed_params(cfg)
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, cfg.n_token, (2, S * n + 1)).astype(np.int32)
    inputs = tokens[:, :-1].reshape(2, S, n)
    targets = tokens[:, 1:].reshape(2, S, n)
    reset = np.zeros((2, S), bool)
    reset[0, 2] = True
    mem0 = lamemo_jax.init_memory(cfg, 2)
    nll, _ = lamemo_jax.run_segments(cfg, params, inputs, targets, mem0, start_of_sequence_BS=reset)
    nll_plain, _ = lamemo_jax.run_segments(cfg, params, inputs, targets, mem0)
    fresh, _ = lamemo_jax.run_segments(cfg, params, inputs[:1, 2:], targets[:1, 2:],
                                       lamemo_jax.init_memory(cfg, 1))
    np.testing.assert_allclose(np.asarray(nll[0, 2:]), np.asarray(fresh[0]), rtol=0, atol=1e-12)
    # other rows and earlier segments untouched (float64 round-off of a differently fused program)
    np.testing.assert_allclose(np.asarray(nll[1]), np.asarray(nll_plain[1]), rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.asarray(nll[0, :2]), np.asarray(nll_plain[0, :2]), rtol=0, atol=1e-12)
    assert np.abs(np.asarray(nll[0, 2:]) - np.asarray(nll_plain[0, 2:])).max() > 1e-6


def test_dropout_masks_differ_per_segment_and_step():
    n = 6
    cfg = small_cfg(dropout=0.3, dropatt=0.2, tgt_len=n, dtype="float32", param_dtype="float32")
    params = perturbed_params(cfg)
    seg = np.random.default_rng(3).integers(0, cfg.n_token, (1, n + 1)).astype(np.int32)
    inputs = np.repeat(seg[:, None, :-1], 3, axis=1)
    targets = np.repeat(seg[:, None, 1:], 3, axis=1)
    reset = np.ones((1, 3), bool)  # identical segments from an empty memory each time
    mem = lamemo_jax.init_memory(cfg, 1)
    run = lambda key: np.asarray(lamemo_jax.run_segments(cfg, params, inputs, targets, mem, train=True,
                                                         rng=key, start_of_sequence_BS=reset)[0])
    a = run(jax.random.key(0))
    assert not np.allclose(a[0, 0], a[0, 1]) and not np.allclose(a[0, 1], a[0, 2])
    np.testing.assert_array_equal(a, run(jax.random.key(0)))  # same key: same masks
    assert not np.allclose(a, run(jax.random.key(1)))
    ev = np.asarray(lamemo_jax.run_segments(cfg, params, inputs, targets, mem, start_of_sequence_BS=reset)[0])
    np.testing.assert_allclose(ev[0, 0], ev[0, 1], rtol=0, atol=1e-6)  # eval: no dropout


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float64"])
def test_dropout_is_x_times_mask_over_keep_rounded_once(dtype):
    """dropout(x) = x * (mask / (1 - p)) as the original's CPU dropout computes it in float32: the
    factor is 1 / (1 - p) rounded once in the compute dtype (float32 for bf16 and float32), the
    product rounded to x's dtype, the mask jax.random.bernoulli of the module's dropout stream.
    In bf16 the factor is never 1 / bf16(0.9) = 1/0.8984375, a +0.17% bias on every kept value.
    Different keys give different masks with the expected keep rate."""
    import flax.linen as nn
    from lamemo_jax.model import dropout

    class Drop(nn.Module):
        @nn.compact
        def __call__(self, x):
            return dropout(self, x, 0.1, True)

    x = jnp.asarray(np.random.default_rng(0).normal(size=(64, 96)) * 3, dtype)  # no exact zeros
    y = np.asarray(Drop().apply({}, x, rngs={"dropout": jax.random.key(5)}).astype(jnp.float64))
    keep = y != 0  # (the mask itself is jax.random.bernoulli bit for bit: tests/test_prng.py)
    cdt = np.float64 if dtype == "float64" else np.float32
    factor = cdt(1.0) / cdt(0.9)
    x64 = np.asarray(x.astype(jnp.float64))
    want = np.asarray(jnp.asarray(x64.astype(cdt) * factor).astype(dtype).astype(jnp.float64))
    np.testing.assert_array_equal(y[keep], want[keep])
    assert 0.85 < keep.mean() < 0.95
    other = np.asarray(Drop().apply({}, x, rngs={"dropout": jax.random.key(6)}).astype(jnp.float64))
    assert ((other != 0) != keep).mean() > 0.1
    if dtype == "bfloat16":  # unbiased: kept values within half a bf16 ulp of x / 0.9
        rel = (y[keep] - x64[keep] / 0.9) / (x64[keep] / 0.9)
        assert np.abs(rel).max() <= 2.0 ** -8 and abs(rel.mean()) < 3e-4  # 1/bf16(0.9): 1.7e-3


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dropout_gradient_is_the_same_mask_and_saves_only_the_mask(dtype):
    """d dropout(x) / dx applied to g is g * (mask / (1 - p)) rounded to g's dtype, and the only
    array the backward keeps of x's size is the boolean mask (not the float32 factor: in bf16
    that would be twice the activation)."""
    from lamemo_jax.model import apply_dropout_mask

    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(32, 48)), dtype)
    g = jnp.asarray(rng.normal(size=(32, 48)), dtype)
    keep = jnp.asarray(rng.random((32, 48)) < 0.9)
    y, vjp = jax.vjp(lambda x: apply_dropout_mask(x, keep, 0.1), x)
    np.testing.assert_array_equal(np.asarray(vjp(g)[0].astype(jnp.float32)),
                                  np.asarray(apply_dropout_mask(g, keep, 0.1).astype(jnp.float32)))
    np.testing.assert_array_equal(np.asarray(vjp(g)[0] != 0), np.asarray(keep))
    saved = [leaf for leaf in jax.tree.leaves(vjp) if getattr(leaf, "shape", None) == x.shape]
    assert [leaf.dtype for leaf in saved] == [jnp.dtype(bool)]


@pytest.mark.parametrize("n", [8, 40])
def test_lookahead_never_builds_an_M_by_M_tensor(n):
    """Every intermediate of a LaMemo segment with M=256 is O(M*min(M,N)), never M x M (N = 40:
    the CPU's narrow band, 16-row blocks of the window)."""
    m = 256
    cfg = small_cfg(tgt_len=n, mem_len=m, dtype="float32", param_dtype="float32")
    params = jax.eval_shape(lambda: lamemo_jax.init_params(cfg, jax.random.key(0)))
    mem = jax.eval_shape(lambda: lamemo_jax.init_memory(cfg, 2))
    toks = jax.ShapeDtypeStruct((2, n), jnp.int32)
    jaxpr = jax.make_jaxpr(lambda p, t, mm: lamemo_jax.apply(cfg, p, t, mm, targets=t, train=True,
                                                              rng=jax.random.key(0)))(params, toks, mem)

    def walk(jx):
        for eqn in jx.eqns:
            for var in eqn.outvars:
                shape = getattr(var.aval, "shape", ())
                assert sum(1 for d in shape if d >= m) <= 1, (eqn.primitive, shape)
            for sub in jax.core.subjaxprs(eqn) if hasattr(jax.core, "subjaxprs") else []:
                walk(sub)
    walk(jaxpr.jaxpr)


def test_first_segment_is_plain_causal_attention():
    """M = 0: the memory types agree on a fresh segment only through the XL current-row math;
    LaMemo's caches are filled with the causal attention outputs."""
    cfg = small_cfg(mem_len=6, tgt_len=6)
    params = perturbed_params(cfg)
    tokens = np.random.default_rng(4).integers(0, cfg.n_token, (2, 7)).astype(np.int32)
    _, mem = lamemo_jax.score(cfg, params, tokens)
    assert np.asarray(mem.length).tolist() == [6, 6]
    assert np.all(np.isfinite(np.asarray(mem.lse))) and np.abs(np.asarray(mem.attn)).sum() > 0


def test_position_sequence_matches_original():
    cfg = small_cfg(clamp_len=4, tgt_len=3, mem_len=5)
    np.testing.assert_array_equal(position_sequence(cfg, 3, 5), [4, 4, 4, 4, 3, 2, 1, 0, 1, 2, 3, 4, 4])
    cfg = cfg.replace(lookahead="signed")
    np.testing.assert_array_equal(position_sequence(cfg, 3, 5)[8:], [-1, -2, -3, -4, -5])


@pytest.mark.parametrize("kw", [
    dict(),  # full softmax, tied
    dict(cutoffs=(20, 40), div_val=2),  # adaptive: head + 2 tail clusters, projections
    dict(cutoffs=(20, 40), div_val=1, d_embed=24, tie_projs=(False, True, False), tie_weight=False),
])
def test_training_nll_equals_minus_log_probs_at_the_target(kw):
    """The training loss takes logsumexp - logit[target] per softmax (head and the target's tail
    cluster) without building the [..., n_token] log-probabilities; it must equal
    -log_probs[target] of the evaluation path, in value and in every parameter's gradient; so must
    the fused cross-entropy of softmax_chunk (4 tokens per chunk, each cluster on its own)."""
    cfg = small_cfg(n_token=53, n_layer=1, dropout=0.0, **kw)
    params = perturbed_params(cfg)
    tokens = jax.random.randint(jax.random.key(1), (3, 6), 0, 53)
    targets = jnp.asarray(np.random.default_rng(0).permutation(np.arange(53))[:18].reshape(3, 6))
    assert {int(t) // 20 for t in targets.ravel()} == {0, 1, 2}  # every cluster is a target

    def via_nll(p, c=cfg):
        out, _ = lamemo_jax.apply(c, p, tokens, lamemo_jax.init_memory(c, 3), targets=targets)
        return out.nll

    def via_chunked_nll(p):
        return via_nll(p, cfg.replace(softmax_chunk=4))

    def via_log_probs(p):
        out, _ = lamemo_jax.apply(cfg, p, tokens, lamemo_jax.init_memory(cfg, 3))
        return -jnp.take_along_axis(out.log_probs, targets[..., None], axis=-1)[..., 0]

    @jax.jit
    def all_three(p):
        return [(f(p), jax.grad(lambda q: jnp.sum(f(q)))(p))
                for f in (via_log_probs, via_nll, via_chunked_nll)]

    (l0, g0), *others = all_three(params)
    for l1, g1 in others:
        np.testing.assert_allclose(l1, l0, rtol=1e-13, atol=1e-13)
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g0), jax.tree.leaves(g1)):
            assert float(jnp.max(jnp.abs(a - b))) <= 1e-12, jax.tree_util.keystr(path)


@pytest.mark.parametrize("d_embed,dtype", [(None, "float64"), (24, "float32")])
def test_chunked_softmax_equals_full_log_softmax(d_embed, dtype):
    """softmax_chunk > 0 (fused cross-entropy over token chunks, never [tokens, vocab] logits) gives
    the same loss and the same gradient of every parameter as the plain log-softmax, with a chunk
    that does not divide the tokens and with an output projection (d_embed != d_model); memory
    carried over two segments, dropout on. (The adaptive softmax, chunked per cluster: the test above.)"""
    base = ModelConfig(n_token=53, n_layer=2, n_head=2, d_model=32, d_head=16, d_inner=48, tgt_len=6,
                       mem_len=6, d_embed=d_embed, dropout=0.1, dtype=dtype, param_dtype=dtype)
    params = lamemo_jax.init_params(base, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (3, 13), 0, 53)

    def loss_and_grads(cfg):
        def loss(p):  # the two segments in one scan: one compiled segment instead of two
            nll, _ = lamemo_jax.run_segments(cfg, p, tokens[:, :12].reshape(3, 2, 6),
                                             tokens[:, 1:].reshape(3, 2, 6), lamemo_jax.init_memory(cfg, 3),
                                             train=True, rng=jax.random.key(7))
            return jnp.sum(nll)
        return jax.jit(jax.value_and_grad(loss))(params)

    (l0, g0), (l1, g1) = loss_and_grads(base), loss_and_grads(base.replace(softmax_chunk=4))
    # float32: summation order only (measured 1.4e-6 on gradients of magnitude 8)
    tol = 1e-12 if dtype == "float64" else 1e-5
    assert abs(float(l0) - float(l1)) <= tol * max(1.0, abs(float(l0)))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g0), jax.tree.leaves(g1)):
        err = float(jnp.max(jnp.abs(a - b)))
        assert err <= tol, (jax.tree_util.keystr(path), err)


def test_chunked_cross_entropy_with_a_huge_bias_and_padded_chunks():
    """Padded rows of the last chunk (x = 0, lse = 0) would give e^b = inf for a bias > ~88 in
    float32; their gradient must still be exactly 0, and the result equal the plain NLL."""
    from lamemo_jax.embedding import _logits, _nll_from_logits, softmax_cross_entropy_chunked
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(7, 5)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(11, 5)), jnp.float32)
    b = jnp.zeros((11,), jnp.float32).at[3].set(100.0)
    t = jnp.asarray(rng.integers(0, 11, 7))
    chunked = jax.grad(lambda *a: jnp.sum(softmax_cross_entropy_chunked(*a, t, 4)), (0, 1, 2))(x, w, b)
    plain = jax.grad(lambda x, w, b: jnp.sum(_nll_from_logits(_logits(x, w, b), t)), (0, 1, 2))(x, w, b)
    for a, c in zip(chunked, plain):
        assert bool(jnp.all(jnp.isfinite(a)))
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-5)


def test_softmax_chunk_validation():
    with pytest.raises(lamemo_jax.ConfigError, match="softmax_chunk"):
        ModelConfig(n_token=50, softmax_chunk=-1)
    with pytest.raises(lamemo_jax.ConfigError, match="softmax_chunk"):
        ModelConfig(n_token=50, softmax_chunk=True)
    assert ModelConfig(n_token=50, cutoffs=(10,), softmax_chunk=8).softmax_chunk == 8


@pytest.mark.parametrize("chunk", [0, 4])
def test_accelerator_padding_of_the_output_layer_is_exact(monkeypatch, chunk):
    """On a GPU / TPU the output layer (each softmax of the adaptive one too) pads the vocabulary
    (to 128) and the contracted dimension (to 8) for aligned matmuls: zero rows / columns and the
    lowest bias for the padded words. The NLL and its gradients w.r.t. x, w and b must be those
    of the unpadded layer, whole or over token chunks, for any cotangent."""
    from lamemo_jax import embedding
    rng = np.random.default_rng(5)
    x, w, b = (jnp.asarray(rng.normal(size=s)) for s in [(2, 5, 14), (53, 14), (53,)])
    t = jnp.asarray(rng.integers(0, 53, (2, 5)))
    g = jnp.asarray(rng.normal(size=(2, 5)))
    results = []
    for pad in [(1, 1), (128, 8)]:
        monkeypatch.setattr(embedding, "PAD_MULTIPLES", pad)
        nll, vjp = jax.vjp(lambda *a: embedding.softmax_cross_entropy(*a, t, chunk), x, w, b)
        results.append((nll, vjp(g)))
    (n0, g0), (n1, g1) = results
    np.testing.assert_allclose(n1, n0, rtol=1e-14)
    for a, c in zip(g1, g0):
        assert a.shape == c.shape
        np.testing.assert_allclose(a, c, rtol=1e-12, atol=1e-13)


def test_accelerator_padding_of_the_output_layer_in_bf16_is_exact(monkeypatch):
    """What bf16 training on a GPU runs: padding plus the bf16 custom_vjp, a float32 bias. Padded
    and unpadded agree to float32 rounding of the same sums (the padded terms are exact zeros)."""
    from lamemo_jax import embedding
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.normal(size=(3, 5, 14)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(53, 14)) * 0.3, jnp.bfloat16)
    b = jnp.asarray(rng.normal(size=53), jnp.float32)
    t = jnp.asarray(rng.integers(0, 53, (3, 5)))
    g = jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)
    results = []
    for pad in [(1, 1), (128, 8)]:
        monkeypatch.setattr(embedding, "PAD_MULTIPLES", pad)
        nll, vjp = jax.vjp(lambda *a: embedding.softmax_cross_entropy(*a, t), x, w, b)
        results.append((nll, vjp(g)))
    (n0, g0), (n1, g1) = results
    np.testing.assert_allclose(n1, n0, rtol=1e-6)
    for a, c in zip(g1, g0):
        assert a.shape == c.shape and a.dtype == c.dtype and bool(jnp.all(jnp.isfinite(a)))
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(c, np.float32), rtol=1e-2, atol=1e-6)


def test_float32_output_layer_is_the_plain_expression_bit_for_bit(monkeypatch):
    """Without padding (CPU), chunks or bf16, the loss is exactly logsumexp - logit[target] on the
    [B, N, d] hidden states as given, its gradients bit-identical (no reshape that would change
    the order of dw's sum)."""
    from lamemo_jax import embedding
    from lamemo_jax.embedding import _logits, _nll_from_logits, softmax_cross_entropy
    monkeypatch.setattr(embedding, "PAD_MULTIPLES", (1, 1))  # the CPU default, on any backend
    rng = np.random.default_rng(7)
    x, w, b = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in [(3, 7, 33), (301, 33), (301,)])
    t = jnp.asarray(rng.integers(0, 301, (3, 7)))
    new = jax.jit(jax.value_and_grad(lambda *a: jnp.mean(softmax_cross_entropy(*a, t)), (0, 1, 2)))(x, w, b)
    ref = jax.jit(jax.value_and_grad(lambda x, w, b: jnp.mean(_nll_from_logits(_logits(x, w, b), t)),
                                     (0, 1, 2)))(x, w, b)
    for a, c in zip(jax.tree.leaves(new), jax.tree.leaves(ref)):
        assert np.array_equal(a, c)


@pytest.mark.parametrize("chunk", [0, 64])
def test_float16_output_layer_gradient_keeps_the_small_terms(chunk):
    """float16 has no bf16 range: a mean loss over many tokens gives every word a gradient term
    p * g ~ 1e-9, below float16's smallest value. d(logits) must stay float32 there, so that the
    weight gradient of the words that are not targets is not flushed to zero."""
    from lamemo_jax.embedding import softmax_cross_entropy
    rng = np.random.default_rng(8)
    x, w = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in [(512, 16), (4000, 16)])
    w = w * 0.1
    b = jnp.zeros((4000,), jnp.float32)
    t = jnp.asarray(rng.integers(0, 100, 512))  # words 100.. are never targets

    def dw(dtype):
        f = lambda w: jnp.mean(softmax_cross_entropy(x.astype(dtype), w, b, t, chunk)) / 16.0
        return np.asarray(jax.grad(f)(w.astype(dtype)), np.float32)[100:]

    ref, half = dw(jnp.float32), dw(jnp.float16)
    assert float(np.max(np.abs(half - ref))) <= 1e-2 * float(np.max(np.abs(ref)))


def test_fused_cross_entropy_backward_is_the_gradient_of_the_nll():
    """The custom_vjp that bf16 training uses (d(logits) once, backward matmuls in x's dtype),
    called in float64: its gradients equal autodiff of logsumexp - logit[target] for any
    cotangent, zeros included."""
    from lamemo_jax.embedding import _fused_ce, _logits, _nll_from_logits
    rng = np.random.default_rng(3)
    x, w, b = (jnp.asarray(rng.normal(size=s)) for s in [(9, 7), (31, 7), (31,)])
    t = jnp.asarray(rng.integers(0, 31, 9))
    g = jnp.asarray(rng.normal(size=9)).at[2].set(0.0)
    fused = jax.vjp(lambda *a: _fused_ce(*a, t), x, w, b)
    plain = jax.vjp(lambda x, w, b: _nll_from_logits(_logits(x, w, b), t), x, w, b)
    np.testing.assert_allclose(fused[0], plain[0], rtol=1e-14)
    for a, c in zip(fused[1](g), plain[1](g)):
        np.testing.assert_allclose(a, c, rtol=1e-12, atol=1e-13)


def test_bf16_output_layer_backward_matmuls_run_in_bf16():
    """In bf16 training no matmul of the output layer's backward runs in float32 against the
    [tokens, vocab] float32 gradient (what plain autodiff does, and what made the wt103 step on a
    GPU 3x slower in its output layer); the gradients stay within bf16 rounding of float32."""
    from lamemo_jax.embedding import softmax_cross_entropy
    rng = np.random.default_rng(4)
    x32, w32 = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in [(2, 12, 16), (300, 16)])
    w32 = w32 * 0.2
    b = jnp.asarray(rng.normal(size=300), jnp.float32)
    t = jnp.asarray(rng.integers(0, 300, (2, 12)))

    def loss(x, w, b):
        return jnp.sum(softmax_cross_entropy(x, w, b, t))

    grad = jax.grad(loss, (0, 1, 2))
    x16, w16 = x32.astype(jnp.bfloat16), w32.astype(jnp.bfloat16)
    jaxpr = jax.make_jaxpr(grad)(x16, w16, b)

    def eqns(jp):  # every equation, inside custom_vjp / pjit bodies too
        for e in jp.eqns:
            yield e
            for v in e.params.values():
                for sub in (v if isinstance(v, (tuple, list)) else [v]):
                    sub = getattr(sub, "jaxpr", sub)
                    if hasattr(sub, "eqns"):
                        yield from eqns(sub)

    dots = [e for e in eqns(jaxpr.jaxpr) if e.primitive.name == "dot_general"]
    assert len(dots) >= 3  # forward + the two backward matmuls
    for e in dots:
        assert [v.aval.dtype for v in e.invars] == [jnp.bfloat16] * 2, e
    g16 = grad(x16, w16, b)
    g32 = grad(x16.astype(jnp.float32), w16.astype(jnp.float32), b)
    for a, c in zip(g16, g32):
        err = float(jnp.max(jnp.abs(a.astype(jnp.float32) - c))) / float(jnp.max(jnp.abs(c)))
        assert err <= 1e-2, err


def _layer_padding_case(memory, train=False):
    """(unpadded config, params, loss(params, config)) over two segments, on sizes 14, 10 and 22
    (none a multiple of 8); ``train``: with dropout (the same masks must drop the same units)."""
    cfg = small_cfg(n_token=40, n_layer=1, d_model=14, n_head=2, d_head=5, d_inner=22, memory=memory,
                    pad_layer_matmuls=False, dropout=0.3 if train else 0.0)
    params = perturbed_params(cfg)
    tokens = jax.random.randint(jax.random.key(1), (2, 7), 0, 40)
    mem = lamemo_jax.init_memory(cfg, 2)

    kw = dict(train=True, rng=jax.random.key(7)) if train else {}

    def loss(p, c):
        _, m = lamemo_jax.apply(c, p, tokens[:, :6], mem, targets=tokens[:, 1:], **kw)  # fill the memory
        out, _ = lamemo_jax.apply(c, p, tokens[:, 1:], m, targets=tokens[:, :6], **kw)
        return jnp.sum(out.nll * jnp.arange(1.0, 7.0))

    return cfg, params, loss


@pytest.mark.parametrize("memory,train", [("lamemo", False), ("xl", False), ("lamemo", True)])
def test_padded_layer_matmuls_are_exact(monkeypatch, memory, train):
    """pad_layer_matmuls=True zero-pads every layer matmul to multiples of 8 on an accelerator
    (forced here): the same loss and gradients in float64, with the same parameters, also with
    dropout (the same masks)."""
    from lamemo_jax import embedding
    monkeypatch.setattr(embedding, "PAD_MULTIPLES", (1, 8))
    cfg, params, loss = _layer_padding_case(memory, train)
    padded = cfg.replace(pad_layer_matmuls=True)
    n_pads = [str(jax.make_jaxpr(loss, static_argnums=1)(params, c)).count(" pad[") for c in (cfg, padded)]
    assert n_pads[1] > n_pads[0]  # the padded model does pad
    (l0, g0), (l1, g1) = [jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, c)
                          for c in (cfg, padded)]
    assert abs(float(l0) - float(l1)) <= 1e-12 * abs(float(l0))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g0), jax.tree.leaves(g1)):
        assert float(jnp.max(jnp.abs(a - b))) <= 1e-12, jax.tree_util.keystr(path)


@pytest.mark.parametrize("memory,train", [("lamemo", False), ("xl", False), ("lamemo", True)])
def test_layer_padding_changes_nothing_on_cpu(monkeypatch, memory, train):
    """pad_layer_matmuls is on by default; with a CPU's padding multiples (none, forced here so
    that the test means the same on any backend) the training step is the same program as with
    it off, so CPU results are bit-identical either way."""
    from lamemo_jax import embedding
    monkeypatch.setattr(embedding, "PAD_MULTIPLES", (1, 1))
    assert lamemo_jax.ModelConfig(n_token=40).pad_layer_matmuls is True
    cfg, params, loss = _layer_padding_case(memory, train)
    texts = [str(jax.make_jaxpr(jax.value_and_grad(loss), static_argnums=1)(params, c))
             for c in (cfg, cfg.replace(pad_layer_matmuls=True))]
    assert texts[0] == texts[1]


@pytest.mark.parametrize("memory,train", [("lamemo", False), ("xl", False), ("lamemo", True)])
def test_flat_dense_products_give_the_same_loss_and_gradients(memory, train):
    """kernels.FLAT_ROWS (the layers' products as one 2-D product over the flattened rows, on by
    default on a CPU): two segments, with and without dropout (the same masks), float64: the same
    loss and every parameter's gradient (1e-12) as the batched products."""
    cfg, params, loss = _layer_padding_case(memory, train)
    results, texts = [], []
    for flat in (False, True):
        with kernels.forced_flat_rows(flat):
            value_and_grad = jax.value_and_grad(loss)  # a new function per form (traces are cached)
            texts.append(str(jax.make_jaxpr(value_and_grad, static_argnums=1)(params, cfg)))
            results.append(jax.jit(value_and_grad, static_argnums=1)(params, cfg))
    assert texts[0] != texts[1]  # the two forms were traced
    (l0, g0), (l1, g1) = results
    assert abs(float(l0) - float(l1)) <= 1e-12 * abs(float(l0))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g0), jax.tree.leaves(g1)):
        assert float(jnp.max(jnp.abs(a - b))) <= 1e-12, jax.tree_util.keystr(path)


@pytest.mark.parametrize("mem_len,n_layer,lookahead", [(10, 2, "disentangled"), (4, 3, "disentangled"),
                                                       (6, 2, "full"), (9, 1, "signed")])
def test_last_layer_without_memory_rows_is_the_whole_computation(monkeypatch, mem_len, n_layer, lookahead):
    """LaMemo's last layer leaves out the memory rows' o_net / LayerNorm / FFN (nothing reads
    them) and its look-ahead gets no backward. Against the whole computation (every layer on all
    rows, as the original): the same NLL, new memory and parameter gradients over three segments
    in train mode with dropout, i.e. also the same dropout masks on the rows that remain."""
    import lamemo_jax.model as model_lib

    cfg = small_cfg(mem_len=mem_len, n_layer=n_layer, lookahead=lookahead, dropout=0.1)
    params = perturbed_params(cfg)
    tokens = np.random.default_rng(3).integers(0, cfg.n_token, (2, 3 * cfg.tgt_len + 1)).astype(np.int32)

    def run():
        def segment_loss(p, mem, s):
            n = cfg.tgt_len
            inputs = jax.lax.dynamic_slice_in_dim(tokens, s * n, n, axis=1)
            targets = jax.lax.dynamic_slice_in_dim(tokens, s * n + 1, n, axis=1)
            out, new_mem = lamemo_jax.apply(cfg, p, inputs, mem, targets=targets, train=True,
                                            rng=jax.random.fold_in(jax.random.key(11), s))
            return out.nll.sum(), (out.nll, new_mem)
        step = jax.jit(jax.grad(segment_loss, has_aux=True))
        mem, nlls, grads = lamemo_jax.init_memory(cfg, 2), [], []
        for s in range(3):
            g, (nll, mem) = step(params, mem, s)
            nlls.append(nll)
            grads.append(g)
        return nlls, mem, grads

    skipped = run()
    whole_layer = model_lib.DecoderLayer
    monkeypatch.setattr(model_lib, "DecoderLayer", lambda cfg, memory_rows_out, name: whole_layer(
        cfg, memory_rows_out=True, name=name))
    whole = run()
    for a, b in zip(jax.tree.leaves(skipped), jax.tree.leaves(whole)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("as_array", [np.asarray, jnp.asarray], ids=["numpy", "jax"])
@pytest.mark.parametrize("which,bad", [("tokens", -1), ("tokens", 64), ("targets", -1), ("targets", 99)])
def test_out_of_vocabulary_ids_are_a_clear_error(as_array, which, bad):
    """Concrete ids, NumPy or JAX, are checked: -1 would otherwise wrap around to the last row
    (a finite, plausible NLL) and ids >= n_token give NaN."""
    cfg = small_cfg(dtype="float32", param_dtype="float32")
    params = lamemo_jax.init_params(cfg, jax.random.key(0))
    x = np.arange(12, dtype=np.int32).reshape(2, 6)
    arrays = {"tokens": x, "targets": x}
    arrays[which] = x.copy()
    arrays[which][1, 3] = bad
    with pytest.raises(ValueError, match=rf"{which} holds token id {bad} outside the vocabulary \[0, 64\)"):
        lamemo_jax.apply(cfg, params, as_array(arrays["tokens"]), lamemo_jax.init_memory(cfg, 2),
                         targets=as_array(arrays["targets"]))
