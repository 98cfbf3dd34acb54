"""The throughput benchmark runs end to end on a tiny model (timings are not checked here)."""

import json

from benchmarks import throughput


def test_throughput_interleaves_and_records_a_failing_variant(tmp_path):
    rc = throughput.main(["--mem_lens=8", "--n_layer=1", "--d_model=16", "--n_head=2", "--d_head=8",
                          "--d_inner=32", "--n_token=50", "--tgt_len=8", "--steps=3", "--no_eval",
                          "--attention_impls=xla,pallas", f"--out={tmp_path}"])
    out = json.load(open(tmp_path / "throughput.json"))
    rows = {(r["memory"], r["attention_impl"]): r for r in out["rows"]}
    assert set(rows) == {(m, i) for m in ("lamemo", "xl") for i in ("xla", "pallas")}
    for m in ("lamemo", "xl"):
        ok = rows[(m, "xla")]
        assert ok["step_ms"] > 0 and ok["train_flops_per_step"] > 0 and ok["train_step_mb"] > 0
        # the compiled Pallas kernels do not exist on CPU: an error row, the others still timed
        assert "error" in rows[(m, "pallas")] and "step_ms" not in rows[(m, "pallas")]
    assert rc == 1 and (tmp_path / "throughput.png").exists()
