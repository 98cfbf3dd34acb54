"""Model FLOPs of a training / evaluation step (matmul FLOPs, the convention behind MFU).

Counts 2*m*n*k per matrix product that the method needs for the loss and the carried memory:
Transformer-XL projects queries for the current rows only and keys/values for all K = M+N rows;
LaMemo recomputes the layers on the memory rows too (q/k/v on all K rows, o_net and FFN on the
memory rows of every layer but the last) and adds the look-ahead over the M x min(M, N) band.
The position vectors (r_net of the K past, and for LaMemo M future, distances) are one product
per layer, shared by the batch. The adaptive input's projections and the (adaptive) softmax are
counted as this implementation runs them, every cluster for every token. Elementwise work is
not counted.

A train step is the forward plus, for every product the loss's gradient passes through, twice
its forward (input and weight gradients); the position vectors project constant sinusoids, so
they add only their weight gradient. LaMemo's last layer: nothing reads its memory-row outputs
(no o_net / FFN on them, see ``model.DecoderLayer``), and its look-ahead only writes the
stop-gradient cache (no backward); with M <= N the cache keeps none of the refreshed rows, so
the look-ahead itself goes. ``compiled_matmul_flops`` counts what a compiled step runs: equal to
this count for Transformer-XL and within 5% above it for LaMemo (tests/test_flops.py, small
configs); at the benchmark config LaMemo's is 0.2-0.7% above (benchmarks.throughput's JSON): the
extra position rows of the CPU's 16-row look-ahead band.

The original PyTorch code computes the last layer's memory rows and the look-ahead's backward
anyway; ``as_original=True`` counts its arithmetic. At the benchmark config (benchmarks.throughput)
the LaMemo / XL ratio is 1.55 / 1.94 / 2.46 / 3.01 that way, the issue's "1.55 at mem_len 64 and
2.9 at 512", against 1.27 / 1.51 / 1.78 / 2.08 for the method's own products at mem_len 64 / 128
/ 256 / 512.
"""

from __future__ import annotations

import re
from typing import NamedTuple, Optional

import jax
import numpy as np

from lamemo_jax.config import ModelConfig
from lamemo_jax.embedding import cluster_dims

# Dense bf16 peak FLOP/s of accelerators (per chip / GPU), for MFU.
PEAK_FLOPS = {
    "H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12,
}


def softmax_flops(cfg: ModelConfig, n_rows: int) -> float:
    """Output layer FLOPs for n_rows hidden states (full or adaptive softmax)."""
    d = cfg.d_model
    if not cfg.cutoffs:
        proj = 2 * d * cfg.d_embed_ if cfg.d_embed_ != cfg.d_model else 0
        return n_rows * (proj + 2 * cfg.d_embed_ * cfg.n_token)
    ends = cfg.cutoff_ends
    dims = cluster_dims(cfg)
    total = 0.0
    for i in range(cfg.n_clusters + 1):
        di = dims[0] if cfg.div_val == 1 else dims[i]
        size = ends[i + 1] - ends[i] + (cfg.n_clusters if i == 0 else 0)
        has_proj = cfg.div_val > 1 or cfg.d_embed_ != cfg.d_model
        total += (2 * d * di if has_proj else 0) + 2 * di * size
    return n_rows * total


def embedding_flops(cfg: ModelConfig, n_rows: int) -> float:
    """Input layer FLOPs for n_rows tokens: the adaptive embedding's projections to d_model (none
    for a plain table). Each cluster's projection runs on every token (a select keeps the token's
    own cluster), as ``AdaptiveEmbedding`` computes it."""
    if cfg.div_val == 1:
        return n_rows * 2 * cfg.d_embed_ * cfg.d_model if cfg.d_embed_ != cfg.d_model else 0
    return n_rows * sum(2 * di * cfg.d_model for di in cluster_dims(cfg))


class _LayerFlops(NamedTuple):
    rows: float  # per batch row: the forward's products
    rows_grad: float  # per batch row: the forward of the products the gradient passes through
    pos: float  # position vectors, once per step: forward
    pos_grad: float  # position vectors: the forward of the rows that get a weight gradient


def _layer_flops(cfg: ModelConfig, n: int, m: int, last: bool, as_original: bool) -> _LayerFlops:
    """One layer's matmul FLOPs."""
    d, hd, f = cfg.d_model, cfg.n_head * cfg.d_head, cfg.d_inner
    k = m + n
    if cfg.memory == "xl":
        rows = (2 * n * d * hd + 2 * k * d * 2 * hd  # q (current), kv
                + 3 * 2 * n * k * hd  # AC, BD, PV
                + 2 * n * hd * d + 4 * n * d * f)  # o_net, FFN
        return _LayerFlops(rows, rows, 2 * k * d * hd, 2 * k * d * hd)  # r_net: K past distances
    w = min(m, n)
    cut = last and not as_original
    rows_out = n if cut else k  # rows that get o_net and the FFN
    rows = (2 * k * d * 3 * hd  # q, kv on all rows
            + 3 * 2 * n * k * hd  # current rows
            + 3 * 2 * m * w * hd  # look-ahead band: AC, BD, PV
            + 2 * rows_out * hd * d + 4 * rows_out * d * f)  # o_net, FFN
    pos = 2 * (k + m) * d * hd  # r_net: K past and M future distances
    if not cut:
        return _LayerFlops(rows, rows, pos, pos)
    # The last layer's look-ahead (memory-row queries, future position vectors, band) only
    # writes the stop-gradient cache: no backward. The cache keeps the last M rows of
    # [refreshed memory; current rows], so with M <= N it keeps none and the look-ahead goes.
    lookahead = 2 * m * d * hd + 3 * 2 * m * w * hd
    if m > n:
        return _LayerFlops(rows, rows - lookahead, pos, 2 * k * d * hd)
    return _LayerFlops(rows - lookahead, rows - lookahead, 2 * k * d * hd, 2 * k * d * hd)


def forward_flops(cfg: ModelConfig, batch_size: int, n: Optional[int] = None, m: Optional[int] = None,
                  *, as_original: bool = False) -> float:
    """Matmul FLOPs of one segment's forward pass (n tokens per row, memory of m tokens)."""
    layers, out = _layers(cfg, n, m, as_original)
    return batch_size * (sum(l.rows for l in layers) + out) + sum(l.pos for l in layers)


def train_step_flops(cfg: ModelConfig, batch_size: int, n: Optional[int] = None, m: Optional[int] = None,
                     *, as_original: bool = False) -> float:
    """Matmul FLOPs of one training step: the forward; for the products the loss's gradient
    passes through, twice their forward (input and weight gradients); for the position vectors
    (a projection of constant sinusoids), once (the weight gradient)."""
    layers, out = _layers(cfg, n, m, as_original)
    rows = sum(l.rows + 2 * l.rows_grad for l in layers) + 3 * out
    return batch_size * rows + sum(l.pos + l.pos_grad for l in layers)


def _layers(cfg: ModelConfig, n: Optional[int], m: Optional[int], as_original: bool):
    n = cfg.tgt_len if n is None else n
    m = cfg.mem_len if m is None else m
    layers = [_layer_flops(cfg, n, m, i == cfg.n_layer - 1, as_original) for i in range(cfg.n_layer)]
    return layers, softmax_flops(cfg, n) + embedding_flops(cfg, n)


_SHAPE = r"\w+\[([\d,]*)\](?:\{[^}]*\})?"
_HLO_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*" + _SHAPE, re.M)
_OPERAND = r"(?:" + _SHAPE + r"\s+)?%?([\w.\-]+)"  # an operand, its type printed or not
_HLO_DOT = re.compile(r"=\s*" + _SHAPE + r"[^\n]*?\sdot\(" + _OPERAND
                      + r"[^\n]*?lhs_contracting_dims=\{([\d,]*)\}")
# XLA:GPU's library products: (result, workspace) = custom-call(lhs, rhs, ...) to cuBLAS, with
# the dot's dimension numbers in the backend config
_HLO_LIBRARY_DOT = re.compile(r"=\s*\(\s*" + _SHAPE + r"[^\n]*?\scustom-call\(" + _OPERAND
                              + r"[^\n]*?custom_call_target=\"__cublas[^\"]*\"[^\n]*?"
                              r"\"lhs_contracting_dimensions\":\[([^\]]*)\]")


def compiled_matmul_flops(hlo_text: str) -> float:
    """2 * |output| * |contracted dims| summed over the matrix products of an optimized HLO
    module's text (``jax.jit(f).lower(...).compile().as_text()``): XLA ``dot`` instructions and
    XLA:GPU's cuBLAS calls. The products the compiled program runs, to hold against the model
    count above. Not seen: products inside opaque kernels (the Pallas attention kernels' custom
    calls). Each instruction counts once: a product inside a loop body once, not per iteration;
    in an SPMD-partitioned module, once per device with the device's local shapes."""
    ints = lambda s: [int(x) for x in re.findall(r"\d+", s)]
    shapes = {m.group(1): ints(m.group(2)) for m in _HLO_INSTRUCTION.finditer(hlo_text)}
    total = 0.0
    for pattern in (_HLO_DOT, _HLO_LIBRARY_DOT):
        for m in pattern.finditer(hlo_text):
            out, lhs_inline, lhs_name, contracting = m.groups()
            if lhs_inline is None and lhs_name not in shapes:
                raise ValueError(f"compiled_matmul_flops: no shape for the operand {lhs_name!r} of "
                                 f"{m.group(0)[:160]!r}: not an HLO module's full text?")
            lhs = ints(lhs_inline) if lhs_inline is not None else shapes[lhs_name]
            total += 2.0 * np.prod(ints(out), dtype=float) * np.prod(
                [lhs[c] for c in ints(contracting)], dtype=float)
    return total


def device_peak_flops(device=None) -> Optional[float]:
    """Peak bf16 FLOP/s of a known accelerator, else None (no MFU on CPU)."""
    device = device or jax.devices()[0]
    kind = getattr(device, "device_kind", "")
    for name, peak in PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return peak
    return None
