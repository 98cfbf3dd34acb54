"""Memory measures shared by the benchmarks."""

from __future__ import annotations

from typing import Optional

import jax


def compiled_mb(compiled) -> Optional[float]:
    """One compiled executable's memory (``memory_analysis()``: arguments + outputs + temporaries,
    minus aliased (donated) bytes), MB; None where the backend does not report it."""
    try:
        ma = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend reports it
        return None
    if ma is None:
        return None
    total = (ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes
             - ma.alias_size_in_bytes)
    return total / 2**20


def device_peak_mb() -> Optional[float]:
    """Peak device memory of this process so far, MB (GPU/TPU allocators report it; None on CPU)."""
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001
        return None
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return stats["peak_bytes_in_use"] / 2**20
