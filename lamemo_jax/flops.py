"""Model FLOPs of a training / evaluation step (matmul FLOPs, the convention behind MFU).

Counts 2*m*n*k per matrix product of the model as the method defines it: Transformer-XL
projects queries for the current rows only and keys/values for all K = M+N rows; LaMemo
recomputes every layer (q/k/v, o_net, FFN) on the memory rows too and adds the look-ahead over
the M x min(M, N) band. Position projections cover the K (+M future) position rows. A train step
is 3x the forward (forward + backward). Elementwise work is not counted.
"""

from __future__ import annotations

from typing import Optional

import jax

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


def forward_flops(cfg: ModelConfig, batch_size: int, n: Optional[int] = None, m: Optional[int] = None) -> float:
    """Matmul FLOPs of one segment's forward pass (n tokens per row, memory of m tokens)."""
    n = cfg.tgt_len if n is None else n
    m = cfg.mem_len if m is None else m
    d, hd, f = cfg.d_model, cfg.n_head * cfg.d_head, cfg.d_inner
    k = m + n
    if cfg.memory == "xl":
        per_layer = (2 * n * d * hd + 2 * k * d * 2 * hd + 2 * k * d * hd  # q (current), kv, r_net
                     + 3 * 2 * n * k * hd  # AC, BD, PV
                     + 2 * n * hd * d + 4 * n * d * f)  # o_net, FFN
    else:
        w = min(m, n)
        per_layer = (2 * k * d * 3 * hd + 2 * (k + m) * d * hd  # q, kv on all rows; r_net past + future
                     + 3 * 2 * n * k * hd  # current rows
                     + 3 * 2 * m * w * hd  # look-ahead band: AC, BD, PV
                     + 2 * k * hd * d + 4 * k * d * f)  # o_net, FFN on memory and current rows
    return batch_size * (cfg.n_layer * per_layer + softmax_flops(cfg, n))


def train_step_flops(cfg: ModelConfig, batch_size: int, n: Optional[int] = None, m: Optional[int] = None) -> float:
    return 3.0 * forward_flops(cfg, batch_size, n, m)


def device_peak_flops(device=None) -> Optional[float]:
    """Peak bf16 FLOP/s of a known accelerator, else None (no MFU on CPU)."""
    device = device or jax.devices()[0]
    kind = getattr(device, "device_kind", "")
    for name, peak in PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return peak
    return None
