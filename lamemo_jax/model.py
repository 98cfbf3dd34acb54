"""The LaMemo / Transformer-XL language model as Flax (Linen) modules: one segment per call.

``TransformerLM(cfg)(tokens, memory, targets, train)`` runs one segment of N tokens of every
batch row against the carried memory and returns the per-token NLL (or log-probabilities) and
the new memory. The recurrence over segments (``lax.scan``) lives in ``lamemo_jax.api``.

The attention math is not written here: the model calls ``kernels.rel_attention`` (current rows,
Transformer-XL) and ``kernels.lookahead`` (LaMemo memory refresh + interpolation) through the
dispatcher in ``kernels``, so the XLA path and the kernel tests share one reference.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import kernels
from kernels.rel_attention import attention_mass_by_distance, rel_attention_probs
from lamemo_jax import prng
from lamemo_jax.config import ModelConfig
from lamemo_jax.embedding import AdaptiveEmbedding, AdaptiveSoftmax, aligned_dot, normal_init
from lamemo_jax.memory import LaMemoMemory, XLMemory, push, stat_dtype_of
from lamemo_jax.sharding import kernel_partition

Array = jax.Array


def inv_freq(d_model: int) -> np.ndarray:
    """Sinusoid frequencies 1/10000^(2k/d) as the original's float32 buffer, the same on every CPU.

    The exponent 2k/d in float32, 10000^e rounded once to float32 (libm's double ``pow``), then
    its float32 reciprocal: the original's float32 steps, each correctly rounded. This reproduces
    the ``pos_emb.inv_freq`` buffer of every torch-reference fixture bit for bit. numpy's float32
    ``power`` does not: its last bit depends on the CPU's SIMD path (on an AVX-512 CPU 3 of the 12
    frequencies at d_model 24 were one ulp off, which moved the float64 fixtures' NLL by 8e-10, and
    9 of 64 at d_model 128) and on the numpy version.
    """
    e = np.arange(0.0, d_model, 2.0, dtype=np.float32) / np.float32(d_model)
    power = np.array([math.pow(10000.0, float(x)) for x in e], dtype=np.float64).astype(np.float32)
    return (np.float32(1.0) / power).astype(np.float32)


def sinusoid(pos: Array, d_model: int, dtype) -> Array:
    """[P] distances -> [P, d]: [sin(pos*f) | cos(pos*f)] (halves concatenated)."""
    x = pos.astype(dtype)[:, None] * jnp.asarray(inv_freq(d_model), dtype)[None, :]
    return jnp.concatenate([jnp.sin(x), jnp.cos(x)], axis=-1)


def position_sequence(cfg: ModelConfig, n: int, mb: int) -> np.ndarray:
    """The original's pos_seq: past distances K-1..0, then (LaMemo) future distances.

    Future distances are 1..Mb, or -1..-Mb for the 'signed' variant; clamp_len clamps from above
    only (so the signed variant's negative distances are never clamped, as in the original).
    """
    k = mb + n
    pos = np.arange(k - 1, -1, -1, dtype=np.float64)
    if cfg.memory == "lamemo" and mb > 0:
        fut = np.arange(1, mb + 1, dtype=np.float64)
        if cfg.lookahead == "signed":
            fut = -fut
        pos = np.concatenate([pos, fut])
    if cfg.clamp is not None:
        pos = np.minimum(pos, cfg.clamp)
    return pos


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def apply_dropout_mask(x: Array, keep: Array, rate: float) -> Array:
    """x * (keep / (1 - rate)): the factor 1 / (1 - rate) where ``keep``, else 0, in x's compute
    dtype (float32 for bf16/f16/f32 activations, float64 for float64), the product rounded to
    x's dtype.

    In float32 this is the original's CPU dropout (``noise.bernoulli_(1 - p); noise.div_(1 - p);
    x * noise``): the factor is 1 / (1 - rate) rounded once (1.0f / float(1 - p)) and the output x
    times it. For bf16/f16 activations the factor stays float32 and the product is rounded to x's
    dtype (the original's half-precision noise would round the factor itself to that dtype, a
    -0.16% bias in bf16). Never 1 / bf16(1 - rate): bf16(0.9) is 0.8984375, which would scale
    every kept bf16 activation up by 0.17% (an expectation bias that eval, without dropout, does
    not have).

    Its own VJP (the same expression applied to the cotangent) keeps the boolean mask as the only
    residual: plain autodiff would save the float32 factor, 4 bytes per element instead of 1,
    which in bf16 training is more than the activation itself.
    """
    cdt = jnp.promote_types(x.dtype, jnp.float32)
    factor = np.asarray(1.0, cdt) / np.asarray(1.0 - rate, cdt)
    scale = jnp.where(keep, jnp.asarray(factor, cdt), jnp.zeros((), cdt))
    return (x.astype(cdt) * scale).astype(x.dtype)


def _apply_dropout_mask_fwd(x, keep, rate):
    return apply_dropout_mask(x, keep, rate), keep


def _apply_dropout_mask_bwd(rate, keep, g):
    return apply_dropout_mask(g, keep, rate), None


apply_dropout_mask.defvjp(_apply_dropout_mask_fwd, _apply_dropout_mask_bwd)


def dropout(module: nn.Module, x: Array, rate: float, train: bool, rows=None) -> Array:
    """Inverted dropout with a fresh mask from the module's 'dropout' RNG stream: x * (mask / (1 - rate)).

    ``rows = (K, r0)``: x [B, R, ...] holds rows r0 .. r0+R-1 of a [B, K, ...] tensor, and gets
    exactly the mask those rows would have had in that tensor's dropout (``prng.bernoulli_block``:
    a computation on part of the rows keeps the whole computation's random bits).

    The multiply form (rather than a select of x / (1 - rate)) also lets XLA:CPU fuse the
    backward's uses of the mask better: -0.2% to -7% per training step at the CPU benchmark config
    (docs/benchmarks.md).
    """
    if not train or rate == 0.0:
        return x
    key = module.make_rng("dropout")
    if rows is None:
        keep = prng.bernoulli(key, 1.0 - rate, x.shape)  # = jax.random.bernoulli
    else:
        k_rows, r0 = rows
        full = x.shape[:1] + (k_rows,) + x.shape[2:]
        keep = prng.bernoulli_block(key, 1.0 - rate, full, (0, r0) + (0,) * (x.ndim - 2), x.shape)
    return apply_dropout_mask(x, keep, rate)


class LayerNorm(nn.Module):
    """Post-LN LayerNorm (eps 1e-5, biased variance); gain initialised N(1, 0.02) as the original."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        pdt = jnp.dtype(self.cfg.param_dtype)
        d = x.shape[-1]
        g = self.param("scale", lambda k, s, t: 1.0 + 0.02 * jax.random.normal(k, s, t), (d,), pdt)
        b = self.param("bias", nn.initializers.zeros, (d,), pdt)
        sdt = stat_dtype_of(self.cfg)
        xf = x.astype(sdt)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) / jnp.sqrt(var + 1e-5)
        return (y * g.astype(sdt) + b.astype(sdt)).astype(x.dtype)


def layer_dot(cfg: ModelConfig, x: Array, w: Array) -> Array:
    """x @ w of a layer projection: on aligned (zero-padded) sizes with ``cfg.pad_layer_matmuls``;
    ``kernels.rows_dot`` either way (on a CPU one 2-D product over the flattened rows)."""
    return aligned_dot(x, w) if cfg.pad_layer_matmuls else kernels.rows_dot(x, w)


class Dense(nn.Module):
    """y = x @ kernel (+ bias); kernel stored [in, out] (the original's weight transposed)."""

    cfg: ModelConfig
    features: int
    use_bias: bool = False

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        pdt, dt = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
        w = self.param("kernel", normal_init(0.02), (x.shape[-1], self.features), pdt)
        y = layer_dot(cfg, x.astype(dt), w.astype(dt))
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), pdt).astype(dt)
        return y


class QKVProjection(nn.Module):
    """Transformer-XL's one [d, 3HD] weight ([q | k | v]); queries only for the current rows."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, h_cur, cat):
        cfg = self.cfg
        hd = cfg.n_head * cfg.d_head
        dt = jnp.dtype(cfg.dtype)
        w = self.param("kernel", normal_init(0.02), (cat.shape[-1], 3 * hd),
                       jnp.dtype(cfg.param_dtype)).astype(dt)
        q = layer_dot(cfg, h_cur.astype(dt), w[:, :hd])
        kv = layer_dot(cfg, cat.astype(dt), w[:, hd:])
        return q, kv[..., :hd], kv[..., hd:]


class PositionwiseFF(nn.Module):
    """LN(x + Linear(dropout(ReLU(Linear(x)))) -> dropout)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, train: bool, rows=None):
        """x [B, R, d]; ``rows = (K, r0)``: x is rows r0.. of the block's [B, K, d] input, and
        its dropout masks are those rows' masks in the whole input's (``dropout``)."""
        cfg = self.cfg
        y = Dense(cfg, cfg.d_inner, use_bias=True, name="CoreNet_0")(x)
        y = dropout(self, jax.nn.relu(y), cfg.dropout, train, rows)
        y = Dense(cfg, cfg.d_model, use_bias=True, name="CoreNet_3")(y)
        y = dropout(self, y, cfg.dropout, train, rows)
        return LayerNorm(cfg, name="layer_norm")(x + y)


class DecoderLayer(nn.Module):
    """One post-LN layer. XL: attention of the current rows. LaMemo: plus the memory refresh.

    ``memory_rows_out=False`` (LaMemo's last layer): nothing reads this layer's memory-row outputs
    (the next layer's input), so their o_net, LayerNorm and FFN are not computed and the layer
    returns None for them. The look-ahead still runs where its output and normaliser reach the
    new cache (Mb > N; the cache keeps the last Mb of [refreshed memory; current] rows), with its
    memory-row queries and future position vectors as products of their own: the cache is
    stop-gradient, so none of it gets a backward. The current rows' values and dropout masks are
    the ones the whole computation gives.
    """

    cfg: ModelConfig
    memory_rows_out: bool = True

    @nn.compact
    def __call__(self, h_cur, h_mem, pos_emb, biases, mem_length, cache, train: bool):
        cfg = self.cfg
        hd = cfg.n_head * cfg.d_head
        b, n, _ = h_cur.shape
        mb = h_mem.shape[1]
        k_len = mb + n
        scale = 1.0 / math.sqrt(cfg.d_head)
        split = lambda x: x.reshape(x.shape[:-1] + (cfg.n_head, cfg.d_head))
        cat = jnp.concatenate([h_mem, h_cur], axis=1)  # [B, K, d]
        key_start = mb - mem_length
        drop = lambda x: dropout(self, x, cfg.dropout, train)
        dropatt_rng = self.make_rng("dropout") if (train and cfg.dropatt > 0) else None
        partition = kernel_partition()  # per-shard kernels when traced under a mesh

        r_net = Dense(cfg, hd, name="r_net")
        # LaMemo's look-ahead output feeds the next layer and the new cache; the last layer's
        # only the cache, which with Mb <= N keeps none of its rows: then it is not run
        lookahead_used = cfg.memory == "lamemo" and mb > 0 and (self.memory_rows_out or mb > n)
        if lookahead_used and not self.memory_rows_out:
            # the future rows feed only the stop-gradient cache: their own product, no backward
            r_past, r_fut = split(r_net(pos_emb[:k_len])), split(r_net(pos_emb[k_len:]))
        else:
            r_all = split(r_net(pos_emb if lookahead_used else pos_emb[:k_len]))  # [K(+Mb), H, Dh]
            r_past, r_fut = r_all[:k_len], r_all[k_len:]

        def analyse(q_cur, k_all):
            """Analysis only (mutable 'intermediates'): attention mass of the current rows by distance."""
            if self.is_mutable_collection("intermediates"):
                p, _ = rel_attention_probs(q_cur, k_all, r_past, biases["u"], biases["v"], key_start,
                                           scale=scale, same_length=cfg.same_length)
                self.sow("intermediates", "attn_by_distance", attention_mass_by_distance(p))
        o_net = Dense(cfg, cfg.d_model, name="o_net")
        attn_norm = LayerNorm(cfg, name="attn_norm")
        ff = PositionwiseFF(cfg, name="pos_ff")

        if cfg.memory == "xl":
            q, k, v = map(split, QKVProjection(cfg, name="qkv_net")(h_cur, cat))
            analyse(q, k)
            a, _ = kernels.rel_attention(cfg.attention_impl, q, k, v, r_past, biases["u"], biases["v"],
                                         key_start, scale=scale, same_length=cfg.same_length,
                                         dropatt=cfg.dropatt if train else 0.0, dropout_rng=dropatt_rng,
                                         partition=partition)
            out = attn_norm(h_cur + drop(o_net(a.reshape(b, n, hd))))
            return ff(out, train), None

        q_net = Dense(cfg, hd, name="q_net")
        if self.memory_rows_out:
            q = split(q_net(cat))
            q_cur = q[:, mb:]
        else:  # the memory rows' queries feed only the look-ahead (below), i.e. the
            q_cur = split(q_net(h_cur))  # stop-gradient cache: their own product, no backward
        kv = Dense(cfg, 2 * hd, name="kv_net")(cat)
        k, v = split(kv[..., :hd]), split(kv[..., hd:])
        analyse(q_cur, k)
        a, lse_cur = kernels.rel_attention(cfg.attention_impl, q_cur, k, v, r_past, biases["u"],
                                           biases["v"], key_start, scale=scale,
                                           same_length=cfg.same_length,
                                           dropatt=cfg.dropatt if train else 0.0,
                                           dropout_rng=dropatt_rng, partition=partition)
        h_cur = attn_norm(h_cur + drop(o_net(a.reshape(b, n, hd))))
        cache_attn, cache_lse = cache
        if lookahead_used:
            w = min(mb, n)
            if cfg.lookahead == "full":
                r_table, r_offset, causal = jnp.concatenate([r_past[k_len - w + 1:], r_fut]), w - 2, False
            else:
                r_table, r_offset, causal = r_fut, -1, True
            q_mem = q[:, :mb] if self.memory_rows_out else split(q_net(h_mem))
            c, new_lse = kernels.lookahead(
                cfg.attention_impl, q_mem, k[:, mb - w + 1:mb + 1], v[:, mb - w + 1:mb + 1],
                r_table, biases["u_future"], biases["v_future"],
                jax.lax.stop_gradient(cache_attn), jax.lax.stop_gradient(cache_lse), mem_length,
                r_offset=r_offset, scale=scale, causal=causal, eps=cfg.lookahead_eps,
                dropatt=cfg.dropatt if train else 0.0,
                dropout_rng=self.make_rng("dropout") if dropatt_rng is not None else None,
                partition=partition)
            if self.memory_rows_out:
                h_mem = attn_norm(h_mem + drop(o_net(c.reshape(b, mb, hd))))
        else:
            c, new_lse = cache_attn, cache_lse
        new_cache = (jax.lax.stop_gradient(push(c, a, axis=1)),
                     jax.lax.stop_gradient(push(new_lse, lse_cur, axis=1)))
        if not self.memory_rows_out:  # the current rows only, with their masks of the whole FFN
            return (ff(h_cur, train, rows=(k_len, mb)), None), new_cache
        out = ff(jnp.concatenate([h_mem, h_cur], axis=1), train)
        return (out[:, mb:], out[:, :mb]), new_cache


class TransformerLM(nn.Module):
    """One segment: tokens [B, N] + memory -> (nll [B, N] or log-probs [B, N, V], new memory)."""

    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        pdt = jnp.dtype(cfg.param_dtype)
        hshape = (cfg.n_head, cfg.d_head)
        self.word_emb = AdaptiveEmbedding(cfg)
        self.crit = AdaptiveSoftmax(cfg)
        self.r_w_bias = self.param("r_w_bias", normal_init(0.02), hshape, pdt)
        self.r_r_bias = self.param("r_r_bias", normal_init(0.02), hshape, pdt)
        if cfg.memory == "lamemo" and cfg.lookahead != "signed":
            self.r_r_bias_future = self.param("r_r_bias_future", nn.initializers.xavier_uniform(), hshape, pdt)
        if cfg.memory == "lamemo" and cfg.lookahead == "future_content_bias":
            self.r_w_bias_future = self.param("r_w_bias_future", nn.initializers.xavier_uniform(), hshape, pdt)
        self.layers = [DecoderLayer(cfg, memory_rows_out=i < cfg.n_layer - 1, name=f"layers_{i}")
                       for i in range(cfg.n_layer)]

    def _biases(self):
        cfg = self.cfg
        dt = jnp.dtype(cfg.dtype)
        u, v = self.r_w_bias.astype(dt), self.r_r_bias.astype(dt)
        biases = {"u": u, "v": v, "u_future": u, "v_future": v}
        if cfg.memory == "lamemo" and cfg.lookahead != "signed":
            biases["v_future"] = self.r_r_bias_future.astype(dt)
        if cfg.memory == "lamemo" and cfg.lookahead == "future_content_bias":
            biases["u_future"] = self.r_w_bias_future.astype(dt)
        return biases

    def __call__(self, tokens: Array, memory, targets: Optional[Array] = None, train: bool = False):
        cfg = self.cfg
        dt = jnp.dtype(cfg.dtype)
        n = tokens.shape[1]
        mb = memory.mem_len
        drop = lambda x: dropout(self, x, cfg.dropout, train)

        core = drop(self.word_emb(tokens))  # post-dropout scaled embeddings: what memory stores
        pos = jnp.asarray(position_sequence(cfg, n, mb))
        pos_emb = drop(sinusoid(pos, cfg.d_model, stat_dtype_of(cfg)).astype(dt))  # one mask, all layers
        biases = self._biases()
        new_length = jnp.minimum(memory.length + n, mb).astype(jnp.int32)

        if isinstance(memory, XLMemory):
            hids = [core]
            h = core
            for i, layer in enumerate(self.layers):
                h, _ = layer(h, memory.hidden[i], pos_emb, biases, memory.length, None, train)
                hids.append(h)
            new_memory = XLMemory(
                hidden=jax.lax.stop_gradient(push(memory.hidden, jnp.stack(hids), axis=2)),
                length=new_length)
        else:
            h, h_mem = core, memory.embed
            attn, lse = [], []
            for i, layer in enumerate(self.layers):
                (h, h_mem), (c_i, z_i) = layer(h, h_mem, pos_emb, biases, memory.length,
                                               (memory.attn[i], memory.lse[i]), train)
                attn.append(c_i)
                lse.append(z_i)
            new_memory = LaMemoMemory(
                embed=jax.lax.stop_gradient(push(memory.embed, core, axis=1)),
                attn=jnp.stack(attn), lse=jnp.stack(lse), length=new_length)

        h = drop(h)
        tables = self.word_emb.tables
        projs = self.word_emb.projs
        if targets is None:
            return self.crit.log_probs(h, tables, projs), new_memory
        return self.crit.nll(h, targets, tables, projs), new_memory
