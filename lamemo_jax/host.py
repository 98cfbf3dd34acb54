"""Process settings that keep XLA:CPU steps from page-faulting their memory in again every step,
and that let XLA:CPU use an AVX-512 CPU's full vector width.

XLA:CPU allocates an execution's temporaries and outputs anew each time it runs. glibc's malloc
serves a block above its mmap threshold (dynamic, at most 32 MiB) with a fresh ``mmap`` and gives
it back to the kernel on ``free``; a block above 64 MiB requested from a worker thread (the heap
limit of a thread's arena) always gets its own ``mmap``. So a step whose temporaries cross those
sizes touches fresh pages every time: at the 2-layer benchmark config (benchmarks.throughput) the
LaMemo training step took 9.6k minor page faults and 17 ms of system time per 42 ms step at
mem_len 64, 42k faults and 65-70 ms per step at mem_len 512; Transformer-XL's smaller
temporaries stayed under the threshold at mem_len 64 / 128 (no faults).

Against the page faults ``tune_cpu_host()`` does two things, both for the whole process:

* ``mallopt(M_MMAP_THRESHOLD, 1 GiB)`` and ``mallopt(M_TRIM_THRESHOLD, INT_MAX ~ 2 GiB)``
  (glibc only): blocks up to 1 GiB come from the heap, and freed memory stays there for the
  next step. The cost: the process keeps its peak heap instead of returning it to the system.
* ``jax_cpu_enable_async_dispatch = False`` (only possible before the CPU backend is created):
  single-device CPU computations run on the calling thread, whose arena (the main one) has no
  64 MiB limit, instead of a worker thread. Python then waits for each CPU step to finish before
  it goes on; on these 2-core machines the host work it could have overlapped shares the same
  cores anyway. It does not change GPU/TPU computations or multi-device CPU ones.

Measured (benchmarks.throughput's config, one process per setting, 20 steps):
mem_len 64 / 128 / 512, LaMemo 42.2 / 91.7 / 195.8 ms -> 32.2 / 47.2 / 154.8 ms per step, no page
faults left; XL 21.9 / 26.2 / 66.5 -> 21.9 / 25.2 / 51.2 ms. Either setting alone was not enough
(malloc alone: still 42k faults per LaMemo step at mem_len 512; inline dispatch alone: 9.6k at
mem_len 64). Sending every thread to the main arena (``M_ARENA_MAX`` = 1) instead of inline
dispatch also removed the faults but slowed the steps by 4-32% (two runs against the malloc
setting alone, separate processes; probably contention on the one arena's lock).

On an AVX-512 CPU it also asks XLA:CPU's LLVM backend for 512-bit vectors
(``--xla_cpu_prefer_vector_width=512`` added to ``XLA_FLAGS``, read when the first backend is
made; a value already there is kept). XLA prefers 256 bits by default, to spare the
older AVX-512 chips' clock: on the project's AVX-512 Xeon the benchmark config's training step was
1-9% faster with 512 (measured interleaved in one process, docs/benchmarks.md), and the training
state after the same steps was bit for bit the same.

The entry points (train.py, eval.py, the benchmarks) call it first thing;
``LAMEMO_TUNE_CPU_HOST=0`` in the environment turns it off. A library user calls it, before the
first JAX computation, where the same applies.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 1 << 30
TRIM_THRESHOLD_BYTES = (1 << 31) - 1  # mallopt takes a C int: INT_MAX, about 2 GiB
ENV_SWITCH = "LAMEMO_TUNE_CPU_HOST"
VECTOR_WIDTH_FLAG = "--xla_cpu_prefer_vector_width"
VECTOR_WIDTH_BITS = 512

_DONE: dict = {}


def tune_cpu_host() -> dict:
    """Applies the settings above once per process; returns what was applied:
    {"malloc": "glibc mallopt" | reason it was not, "inline_cpu_dispatch": True | reason,
    "cpu_vector_width": 512 | reason it was not}."""
    if _DONE:
        return dict(_DONE)
    if not _switched_on():
        _DONE.update(malloc=f"off ({ENV_SWITCH}=0)", inline_cpu_dispatch=f"off ({ENV_SWITCH}=0)",
                     cpu_vector_width=f"off ({ENV_SWITCH}=0)")
        return dict(_DONE)
    _DONE["malloc"] = _keep_freed_memory()
    _DONE["inline_cpu_dispatch"] = _inline_cpu_dispatch()
    _DONE["cpu_vector_width"] = _wide_cpu_vectors()
    logging.debug("tune_cpu_host: %s", _DONE)
    return dict(_DONE)


def _switched_on() -> bool:
    value = os.environ.get(ENV_SWITCH, "1").strip().lower()
    if value in ("1", "true", "yes", "on", ""):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{ENV_SWITCH}={os.environ[ENV_SWITCH]!r}: use 1 (tune the CPU host, the "
                     "default) or 0 (leave malloc and JAX's CPU dispatch as they are)")


def applied() -> dict:
    """What ``tune_cpu_host()`` applied in this process ({} if it was not called)."""
    return dict(_DONE)


def _keep_freed_memory():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return f"not glibc ({platform.system()} {platform.libc_ver()[0] or 'unknown libc'})"
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError as e:
        return f"libc.so.6 not loadable: {e}"
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    libc.mallopt.restype = ctypes.c_int
    ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
    ok = (libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1) and ok
    return "glibc mallopt" if ok else "glibc mallopt refused a value"


def _backends_exist() -> bool:
    try:
        from jax._src.xla_bridge import backends_are_initialized
    except ImportError:  # a jax without it: the settings are then read whenever a client is made
        return False
    return backends_are_initialized()


def _cpu_flags() -> set:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _wide_cpu_vectors():
    if "avx512f" not in _cpu_flags():
        return "no AVX-512 (XLA's default vector width kept)"
    flags = os.environ.get("XLA_FLAGS", "")
    if VECTOR_WIDTH_FLAG in flags:
        return "already in XLA_FLAGS: kept"
    if _backends_exist():  # XLA has read its flags by now
        return "backends already created: XLA's default vector width kept"
    os.environ["XLA_FLAGS"] = f"{flags} {VECTOR_WIDTH_FLAG}={VECTOR_WIDTH_BITS}".strip()
    return VECTOR_WIDTH_BITS


def _inline_cpu_dispatch():
    import jax
    if _backends_exist():
        return "backends already created: asynchronous CPU dispatch kept"
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    return True
