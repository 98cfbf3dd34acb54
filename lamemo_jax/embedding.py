"""Adaptive input embedding and (adaptive) softmax, laid out as the original.

Parameters live in two Flax modules, ``AdaptiveEmbedding`` (``word_emb``) and
``AdaptiveSoftmax`` (``crit``). Tied weights are not duplicated: the softmax receives the
embedding's tables / projections when ``tie_weight`` / ``tie_projs`` say so.

Conventions (fixture README): an embedding projection P_i is stored ``[d_model, d_i]``; the
embedding applies it as ``e @ P_i.T`` and the softmax as ``h @ Q_i`` (no transpose), so a tied
projection works both ways. Tail cluster i uses row ``n_clusters - i`` of ``cluster_weight``.
The embedding is multiplied by sqrt(d_model) after the projection.
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from kernels.dense import rows_dot
from kernels.softmax import logsumexp, stat_dtype
from lamemo_jax.config import ModelConfig

Array = jax.Array


def normal_init(std: float):
    def init(key, shape, dtype):
        return std * jax.random.normal(key, shape, dtype)
    return init


def cluster_dims(cfg: ModelConfig) -> list:
    """Embedding width of each cluster (one entry when div_val == 1)."""
    if cfg.div_val == 1:
        return [cfg.d_embed_]
    return [cfg.d_embed_ // (cfg.div_val ** i) for i in range(cfg.n_clusters + 1)]


class AdaptiveEmbedding(nn.Module):
    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        pdt = jnp.dtype(cfg.param_dtype)
        ends = cfg.cutoff_ends
        dims = cluster_dims(cfg)
        if cfg.div_val == 1:
            sizes = [cfg.n_token]
        else:
            sizes = [ends[i + 1] - ends[i] for i in range(cfg.n_clusters + 1)]
        self.tables = [self.param(f"emb_layers_{i}", normal_init(0.02), (sizes[i], dims[i]), pdt)
                       for i in range(len(sizes))]
        if cfg.div_val == 1:
            self.projs = ([self.param("emb_projs_0", normal_init(0.01), (cfg.d_model, dims[0]), pdt)]
                          if cfg.d_embed_ != cfg.d_model else [None])
        else:
            self.projs = [self.param(f"emb_projs_{i}", normal_init(0.01), (cfg.d_model, dims[i]), pdt)
                          for i in range(len(sizes))]

    def __call__(self, tokens: Array) -> Array:
        cfg = self.cfg
        dt = jnp.dtype(cfg.dtype)
        if cfg.div_val == 1:
            e = jnp.take(self.tables[0].astype(dt), tokens, axis=0)
            if self.projs[0] is not None:
                e = e @ self.projs[0].astype(dt).T
        else:
            ends = cfg.cutoff_ends
            e = jnp.zeros(tokens.shape + (cfg.d_model,), dt)
            for i, (table, proj) in enumerate(zip(self.tables, self.projs)):
                lo, hi = ends[i], ends[i + 1]
                inside = (tokens >= lo) & (tokens < hi)
                ei = jnp.take(table.astype(dt), jnp.clip(tokens - lo, 0, hi - lo - 1), axis=0)
                ei = ei @ proj.astype(dt).T
                e = jnp.where(inside[..., None], ei, e)
        return e * jnp.asarray(math.sqrt(cfg.d_model), dt)


class AdaptiveSoftmax(nn.Module):
    """Output layer: full softmax (no cutoffs) or the original's projected adaptive softmax."""

    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        pdt = jnp.dtype(cfg.param_dtype)
        ends = cfg.cutoff_ends
        dims = cluster_dims(cfg)
        tie_projs = cfg.tie_projs_
        n_out = 1 if cfg.div_val == 1 else cfg.n_clusters + 1
        sizes = [cfg.n_token] if cfg.div_val == 1 else [ends[i + 1] - ends[i] for i in range(n_out)]
        self.weights = [None if cfg.tie_weight else
                        self.param(f"out_layers_{i}_weight", normal_init(0.02), (sizes[i], dims[i]), pdt)
                        for i in range(n_out)]
        self.biases = [self.param(f"out_layers_{i}_bias", nn.initializers.zeros, (sizes[i],), pdt)
                       for i in range(n_out)]
        projs = []
        for i in range(cfg.n_clusters + 1):
            d_i = dims[0] if cfg.div_val == 1 else dims[i]
            has_proj = cfg.div_val > 1 or cfg.d_embed_ != cfg.d_model
            if not has_proj or tie_projs[i]:
                projs.append(None)
            else:
                projs.append(self.param(f"out_projs_{i}", normal_init(0.01), (cfg.d_model, d_i), pdt))
        self.projs = projs
        if cfg.n_clusters:
            self.cluster_weight = self.param("cluster_weight", normal_init(0.02),
                                             (cfg.n_clusters, dims[0]), pdt)
            self.cluster_bias = self.param("cluster_bias", nn.initializers.zeros, (cfg.n_clusters,), pdt)

    def _cluster_params(self, emb_tables: Sequence[Array], emb_projs: Sequence[Optional[Array]]):
        """(weight, bias, proj) of the head and each tail cluster, ties resolved."""
        cfg = self.cfg
        ends = cfg.cutoff_ends
        tie_projs = cfg.tie_projs_
        out = []
        for i in range(cfg.n_clusters + 1):
            j = 0 if cfg.div_val == 1 else i
            w = emb_tables[j] if cfg.tie_weight else self.weights[j]
            b = self.biases[j]
            if cfg.div_val == 1 and cfg.n_clusters:
                w, b = w[ends[i]:ends[i + 1]], b[ends[i]:ends[i + 1]]
            proj = self.projs[i]
            if proj is None and tie_projs[i]:
                proj = emb_projs[0] if cfg.div_val == 1 else emb_projs[i]
            out.append((w, b, proj))
        return out

    def _softmaxes(self, h: Array, emb_tables, emb_projs):
        """(x, w, b) of each softmax: the head (its words, then one row per tail cluster, as the
        original) and each tail cluster; x = h through the cluster's projection, w in h's dtype."""
        out = []
        for i, (w, b, proj) in enumerate(self._cluster_params(emb_tables, emb_projs)):
            if i == 0 and self.cfg.n_clusters:
                w = jnp.concatenate([w, self.cluster_weight.astype(w.dtype)], axis=0)
                b = jnp.concatenate([b, self.cluster_bias.astype(b.dtype)], axis=0)
            x = h if proj is None else h @ proj.astype(h.dtype)
            out.append((x, w.astype(h.dtype), b))
        return out

    def log_probs(self, h: Array, emb_tables, emb_projs) -> Array:
        """Full log-probabilities [..., n_token] in the stat dtype (float32 or float64)."""
        cfg = self.cfg
        head, *tails = [jax.nn.log_softmax(_logits(*s), axis=-1)
                        for s in self._softmaxes(h, emb_tables, emb_projs)]
        if not cfg.n_clusters:
            return head
        c1 = cfg.cutoffs[0]
        parts = [head[..., :c1]]
        for i, tail in enumerate(tails, start=1):
            parts.append(head[..., c1 + cfg.n_clusters - i, None] + tail)
        return jnp.concatenate(parts, axis=-1)

    def nll(self, h: Array, targets: Array, emb_tables, emb_projs) -> Array:
        """-log p(target) [...] in the stat dtype: the value of ``-log_probs(...)[target]``.

        Computed as logsumexp(logits) - logits[target] per softmax (the head, and the tail
        cluster of each target), without the [..., n_token] log-probabilities: no log_softmax
        array, no concatenation of the clusters, no gather over the whole vocabulary (whose
        backward is a scatter into a [..., n_token] zero array). The tails are still computed
        for every token (static shapes), and a token only takes its own cluster's term.
        """
        cfg = self.cfg

        def nll_of(softmax, targets):
            x, w, b = softmax
            return softmax_cross_entropy(x, w, b, targets, cfg.softmax_chunk)

        head, *tails = self._softmaxes(h, emb_tables, emb_projs)
        ends, head_class, tail_nll = cfg.cutoff_ends, targets, 0.0
        for i, tail in enumerate(tails, start=1):
            in_i = (targets >= ends[i]) & (targets < ends[i + 1])
            head_class = jnp.where(in_i, cfg.cutoffs[0] + cfg.n_clusters - i, head_class)  # as log_probs
            t_i = nll_of(tail, jnp.where(in_i, targets - ends[i], 0))
            tail_nll = tail_nll + jnp.where(in_i, t_i, 0.0)
        return nll_of(head, head_class) + tail_nll


def _nll_and_lse(logits: Array, targets: Array):
    """(-log softmax(logits)[target], logsumexp(logits)) over the last axis; the log-sum-exp in
    the form ``kernels.softmax.ONE_PASS`` picks (one pass over the logits on a GPU; on a CPU
    ``jax.nn.logsumexp``, the program as before)."""
    lse = logsumexp(logits)
    return lse - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0], lse


def _nll_from_logits(logits: Array, targets: Array) -> Array:
    """-log softmax(logits)[target] = logsumexp(logits) - logits[target] over the last axis."""
    return _nll_and_lse(logits, targets)[0]


# ------------------------------------------------------------------ fused cross-entropy
# Output-layer matmuls on an accelerator pad the vocabulary to a multiple of 128 and the contracted
# dimension to a multiple of 8 (zero rows / columns, padded words get the lowest bias, so the loss
# and every gradient are unchanged): with 267,735 words and d_model 410 the unpadded rows are not
# 16-byte aligned, which keeps the GPU's matrix units on slow kernels. None: by backend (no padding
# on CPU, where it would only add work); a (vocab, d) pair forces one (tests). Read when a step
# is traced: set it before the first call of a jitted function.
PAD_MULTIPLES: Optional[tuple] = None


def _pad_multiples() -> tuple:
    if PAD_MULTIPLES is not None:
        return PAD_MULTIPLES
    return (1, 1) if jax.default_backend() == "cpu" else (128, 8)


def pad_to_multiple(a, axis: int, multiple: int, value=0):
    """``a`` padded with ``value`` at the end of ``axis`` to a multiple of ``multiple`` (itself
    when it already is one)."""
    extra = -a.shape[axis] % multiple
    if not extra:
        return a
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, extra)
    return jnp.pad(a, widths, constant_values=value)


def aligned_dot(x, w):
    """x [..., K] @ w [K, N] with K and N zero-padded to the accelerator's multiple (8 on a GPU /
    TPU, none on a CPU; ``PAD_MULTIPLES[1]``): the same product, on aligned sizes. The product is
    ``kernels.rows_dot`` (on a CPU one 2-D product over the flattened rows, ``FLAT_ROWS``)."""
    m = _pad_multiples()[1]
    k, n = w.shape
    if not (k % m or n % m):  # already aligned (always on a CPU): the plain product, same jaxpr
        return rows_dot(x, w)
    w = pad_to_multiple(pad_to_multiple(w, 0, m), 1, m)
    return rows_dot(pad_to_multiple(x, -1, m), w)[..., :n]


def softmax_cross_entropy(x, w, b, targets, chunk: int = 0):
    """-log softmax(x @ w^T + b)[target], x [..., d], w [V, d], b [V], targets [...] int ->
    [...] in the stat dtype (float32, or float64 for float64 inputs).

    With bf16 x (bf16 compute), a ``custom_vjp`` whose backward computes d(logits) once in
    float32 and runs both backward matmuls in bf16 with float32 accumulation: plain autodiff would
    run them in float32 against the [tokens, V] float32 gradient (measured on an H200 at the wt103
    shape: 70 -> 53 ms, and 22 ms with the padding above). Rounding d(logits) to bf16 is the one
    numerical difference (~3e-3 relative). float16 keeps d(logits) in float32 (its range would
    flush the per-word terms p * g ~ 1e-9 of a mean loss to zero); float32 / float64 take plain
    autodiff, exactly as before (on a CPU: no padding, bit-identical). ``chunk`` > 0: over token
    chunks, never more than [chunk, V] logits at once (``softmax_cross_entropy_chunked``)."""
    mv, md = _pad_multiples()
    v, d = w.shape
    fused = x.dtype == jnp.bfloat16
    if not (chunk or fused or v % mv or d % md):  # the plain path, on x as given (bit-identical)
        return _nll_from_logits(_logits(x, w, b), targets)
    x2, t2 = pad_to_multiple(x.reshape(-1, d), 1, md), targets.reshape(-1)
    w = pad_to_multiple(pad_to_multiple(w, 1, md), 0, mv)
    b = pad_to_multiple(b, 0, mv, jnp.finfo(b.dtype).min)  # padded words: never chosen, p = 0
    if chunk:
        nll = softmax_cross_entropy_chunked(x2, w, b, t2, chunk)
    elif fused:
        nll = _fused_ce(x2, w, b, t2)
    else:
        nll = _nll_from_logits(_logits(x2, w, b), t2)
    return nll.reshape(targets.shape)


@jax.custom_vjp
def _fused_ce(x, w, b, targets):
    return _fused_fwd(x, w, b, targets)[0]


def _fused_fwd(x, w, b, targets):
    logits = _logits(x, w, b)
    nll, lse = _nll_and_lse(logits, targets)
    return nll, (x, w, b, logits, lse, targets)


def _fused_bwd(res, g):
    x, w, b, logits, lse, targets = res
    dx, dw, db = _ce_grads(x, w, logits, lse, targets, g.astype(logits.dtype))
    return dx, dw.astype(w.dtype), db.astype(b.dtype), None


_fused_ce.defvjp(_fused_fwd, _fused_bwd)


def _ce_grads(x, w, logits, lse, targets, g):
    """(dx in x's dtype, dw and db in the stat dtype) of sum(g * nll) for one block of rows, from
    its logits [T, V] and logsumexp [T]; the two matmuls in x's dtype with float32 accumulation,
    except float16, whose d(logits) stays float32 (see softmax_cross_entropy)."""
    sdt = logits.dtype
    p = jnp.exp(logits - lse[:, None]) - jax.nn.one_hot(targets, logits.shape[-1], dtype=sdt)
    # rows with g = 0 contribute exactly 0 (never inf * 0: a chunk's zero padding has x = 0 and
    # lse = 0, so p = e^b, which overflows for a bias > ~88 in float32)
    dlogits = jnp.where(g[:, None] == 0, 0.0, p * g[:, None])
    dl = dlogits if x.dtype == jnp.float16 else dlogits.astype(x.dtype)
    dx = jnp.einsum("tv,vd->td", dl, w, preferred_element_type=sdt).astype(x.dtype)
    dw = jnp.einsum("tv,td->vd", dl, x, preferred_element_type=sdt)
    return dx, dw, jnp.sum(dlogits, axis=0)


def softmax_cross_entropy_chunked(x, w, b, targets, chunk: int):
    """-log softmax(x @ w^T + b)[target] per row, computed over row chunks of ``chunk`` tokens:
    never more than [chunk, V] logits at once (forward or backward), statistics in float32 (or
    float64), backward matmuls in x's dtype with float32 accumulation.

    x [T, d] (compute dtype), w [V, d] (same dtype), b [V], targets [T] int -> nll [T] (stat dtype).
    """
    return _chunked_ce(max(1, min(int(chunk), x.shape[0])), x, w, b, targets)


def _logits(x, w, b):
    """x [..., d] @ w[V, d]^T + b in the stat dtype (float32, or float64 for float64 inputs)."""
    sdt = stat_dtype(x.dtype)
    return jnp.einsum("...d,vd->...v", x, w, preferred_element_type=sdt) + b.astype(sdt)


def _chunked(chunk: int, *arrays):
    """Each [T, ...] array zero-padded to a multiple of ``chunk`` rows -> [T/chunk, chunk, ...]."""
    n = -(-arrays[0].shape[0] // chunk)
    return tuple(jnp.pad(a, [(0, n * chunk - a.shape[0])] + [(0, 0)] * (a.ndim - 1))
                 .reshape((n, chunk) + a.shape[1:]) for a in arrays)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _chunked_ce(chunk, x, w, b, targets):
    return _fwd(chunk, x, w, b, targets)[0]


def _fwd(chunk, x, w, b, targets):
    t = x.shape[0]

    def one(args):
        xc, tc = args
        return _nll_and_lse(_logits(xc, w, b), tc)

    nll, lse = lax.map(one, _chunked(chunk, x, targets))
    nll, lse = nll.reshape(-1)[:t], lse.reshape(-1)[:t]
    return nll, (x, w, b, targets, lse)


def _bwd(chunk, res, g):
    x, w, b, targets, lse = res
    t = x.shape[0]
    sdt = stat_dtype(x.dtype)

    def body(carry, args):
        dw, db = carry
        xc, tc, lc, gc = args
        dx, dwc, dbc = _ce_grads(xc, w, _logits(xc, w, b), lc, tc, gc)
        return (dw + dwc, db + dbc), dx

    init = (jnp.zeros(w.shape, sdt), jnp.zeros(b.shape, sdt))
    (dw, db), dx = lax.scan(body, init, _chunked(chunk, x, targets, lse, g.astype(sdt)))
    dx = dx.reshape(-1, x.shape[1])[:t]
    return dx, dw.astype(w.dtype), db.astype(b.dtype), None


_chunked_ce.defvjp(_fwd, _bwd)
