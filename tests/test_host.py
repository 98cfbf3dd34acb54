"""lamemo_jax.host: with tune_cpu_host() an XLA:CPU training step stops page-faulting its memory.

Each case runs in a fresh process (the settings are process-wide and must come before the CPU
backend exists). Page-fault counts are exact, not timings: the LaMemo step of the benchmark
config at mem_len 128 allocates temporaries above glibc's mmap threshold, so without the settings
every step faults them in again (~10.3k faults per step measured); with them, none after warm-up.
(At mem_len 64 it did too, 9.6k per step, until its last layer stopped computing the memory
rows nothing reads: its temporaries now stay below the threshold.)
The training state after those steps is bit for bit the same either way.
"""

import concurrent.futures
import json
import os
import platform
import subprocess
import sys

import jax
import pytest

from lamemo_jax import host

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import json, resource
from lamemo_jax.host import tune_cpu_host
applied = tune_cpu_host()
import jax
from benchmarks.throughput import ORIGINAL_CONFIG as C, TrainTimer
from lamemo_jax import ModelConfig
cfg = ModelConfig(n_token=C["n_token"], n_layer=C["n_layer"], d_model=C["d_model"], n_head=C["n_head"],
                  d_head=C["d_head"], d_inner=C["d_inner"], tgt_len=C["tgt_len"], mem_len=128, dropout=0.1,
                  memory="lamemo", dtype="float32", attention_impl="xla")
t = TrainTimer(cfg, C["batch"])
for _ in range(3):
    t.time_one()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    t.time_one()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 4
import hashlib, numpy as np
digest = hashlib.sha256(b"".join(np.asarray(x).tobytes() for x in jax.tree.leaves(t.state))).hexdigest()
print(json.dumps({"applied": applied, "faults_per_step": faults, "state_sha256": digest,
                  "async": jax.config.values["jax_cpu_enable_async_dispatch"]}))
"""


def _run(switch: str) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", **{host.ENV_SWITCH: switch})
    env.pop("JAX_NUM_CPU_DEVICES", None)
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if not f.startswith(host.VECTOR_WIDTH_FLAG))
    r = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the malloc settings are glibc's")
def test_tuned_cpu_step_takes_no_page_faults_and_untuned_one_does_with_the_same_results():
    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # side by side: fault counts are per process
        tuned, off = pool.map(_run, ["1", "0"])
    wide = 512 if "avx512f" in host._cpu_flags() else "no AVX-512 (XLA's default vector width kept)"
    assert tuned["applied"] == {"malloc": "glibc mallopt", "inline_cpu_dispatch": True,
                                "cpu_vector_width": wide}
    assert tuned["async"] is False
    assert tuned["faults_per_step"] < 100, tuned
    assert off["applied"]["malloc"].startswith("off") and off["async"] is True
    # the same step without the settings: its temporaries are mapped and faulted in every step
    assert off["faults_per_step"] > 2000, off
    # the settings change where memory comes from and how wide XLA's vectors are, not the
    # computation: the same training state, bit for bit
    assert tuned["state_sha256"] == off["state_sha256"]


def test_tune_cpu_host_is_applied_once_keeps_an_existing_backend_and_names_a_bad_switch(monkeypatch):
    # once the CPU backend exists (as in this test process) dispatch stays asynchronous, said so
    jax.devices()
    monkeypatch.setattr(host, "_DONE", {})
    assert host.applied() == {}
    first = host.tune_cpu_host()
    assert first["inline_cpu_dispatch"] == "backends already created: asynchronous CPU dispatch kept"
    if "avx512f" in host._cpu_flags():
        assert first["cpu_vector_width"] in ("backends already created: XLA's default vector width kept",
                                             "already in XLA_FLAGS: kept")
    assert host.tune_cpu_host() == first == host.applied()  # once per process
    monkeypatch.setattr(host, "_DONE", {})
    monkeypatch.setenv(host.ENV_SWITCH, "0")
    assert host.tune_cpu_host() == {"malloc": f"off ({host.ENV_SWITCH}=0)",
                                    "inline_cpu_dispatch": f"off ({host.ENV_SWITCH}=0)",
                                    "cpu_vector_width": f"off ({host.ENV_SWITCH}=0)"}
    monkeypatch.setattr(host, "_DONE", {})
    monkeypatch.setenv(host.ENV_SWITCH, "maybe")
    with pytest.raises(ValueError, match="LAMEMO_TUNE_CPU_HOST='maybe'"):
        host.tune_cpu_host()


def test_wide_cpu_vectors_only_on_avx512_before_any_backend_and_never_over_a_given_value(monkeypatch):
    monkeypatch.setattr(host, "_backends_exist", lambda: False)  # as in a fresh process
    monkeypatch.setattr(host, "_cpu_flags", lambda: {"sse2", "avx2"})
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
    assert host._wide_cpu_vectors() == "no AVX-512 (XLA's default vector width kept)"
    assert os.environ["XLA_FLAGS"] == "--xla_cpu_enable_fast_math=false"
    monkeypatch.setattr(host, "_cpu_flags", lambda: {"avx2", "avx512f"})
    assert host._wide_cpu_vectors() == 512
    assert os.environ["XLA_FLAGS"] == "--xla_cpu_enable_fast_math=false --xla_cpu_prefer_vector_width=512"
    assert host._wide_cpu_vectors() == "already in XLA_FLAGS: kept"  # a second call adds nothing
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_prefer_vector_width=256")
    assert host._wide_cpu_vectors() == "already in XLA_FLAGS: kept"
    assert os.environ["XLA_FLAGS"] == "--xla_cpu_prefer_vector_width=256"
    monkeypatch.delenv("XLA_FLAGS")
    monkeypatch.setattr(host, "_backends_exist", lambda: True)  # XLA has read its flags already
    assert host._wide_cpu_vectors() == "backends already created: XLA's default vector width kept"
    assert "XLA_FLAGS" not in os.environ
