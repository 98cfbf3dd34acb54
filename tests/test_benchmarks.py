"""The throughput benchmark runs end to end on a tiny model (timings are not checked here)."""

import json

import pytest

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


def test_targets_only_for_the_original_config_and_failed_variants_do_not_crash(tmp_path, capsys):
    # another model: the original's timings say nothing about it, so no target is checked
    small = ["--mem_lens=8", "--n_layer=1", "--d_model=16", "--n_head=2", "--d_head=8", "--d_inner=32",
             "--n_token=50", "--tgt_len=8", "--steps=2", "--no_eval"]
    assert throughput.main(small + [f"--out={tmp_path / 'a'}"]) == 0
    assert json.load(open(tmp_path / "a" / "throughput.json"))["checks"] == []
    assert "targets off: --tgt_len=8 --n_layer=1" in capsys.readouterr().out
    # the original config with only variants that cannot run here: failed checks, files still written
    rc = throughput.main(["--mem_lens=64", "--steps=1", "--no_eval", "--attention_impls=pallas",
                          f"--out={tmp_path / 'b'}"])
    out = json.load(open(tmp_path / "b" / "throughput.json"))
    assert rc == 1 and all("error" in r for r in out["rows"])
    assert [c["ok"] for c in out["checks"]] == [False] and (tmp_path / "b" / "throughput.png").exists()


def test_compare_refuses_a_reused_out_holding_a_run_at_other_steps(tmp_path, monkeypatch):
    from benchmarks import compare
    seen = {}

    def fake_train(cd, workdir):  # the workdir already holds a longer run: training does nothing
        seen["num_steps"] = cd.train.num_steps
        return {"workdir": workdir, "step": 1000}

    monkeypatch.setattr(compare, "train_and_evaluate", fake_train)
    assert compare.run_one("sotu_words", "xl", 0, 0, str(tmp_path))["num_steps"] == 1000
    assert seen["num_steps"] == 1000  # --steps 0: configs/compare.py's (the docs/results.md runs)
    with pytest.raises(SystemExit, match="holds a run at step 1000, not 400"):
        compare.run_one("sotu_words", "xl", 0, 400, str(tmp_path))
    # a SIGTERM'd run (the trainer saved and returned) ends the comparison, not a table row
    monkeypatch.setattr(compare, "train_and_evaluate",
                        lambda cd, wd: {"workdir": wd, "step": 378, "interrupted": "SIGTERM"})
    with pytest.raises(SystemExit, match=r"interrupted \(SIGTERM\) at step 378"):
        compare.run_one("sotu_words", "xl", 0, 0, str(tmp_path))


def test_original_benchmark_names_what_is_missing(tmp_path, capsys):
    """benchmarks.original times the original PyTorch code, which lamemo_jax does not ship: bad
    flags exit 2, and a missing torch or original checkout is a message that says which."""
    from benchmarks import original
    assert original.main([f"--original_dir={tmp_path}", "--mem_lens=0"]) == 2
    assert original.main([f"--original_dir={tmp_path}", "--memories=lamemo,gpt"]) == 2
    assert "--mem_lens" in capsys.readouterr().err
    assert original.main([f"--original_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err  # which message depends on whether torch is installed
    assert "no mem_transformer.py" in err or "needs PyTorch" in err, err


def test_throughput_data_parallel_runs_the_trainers_sharded_step(tmp_path):
    """--data_parallel jits the step over the trainer's mesh of every local device (one here;
    with JAX_NUM_CPU_DEVICES=2 one per core) and is timed like the single-device step."""
    rc = throughput.main(["--mem_lens=8", "--n_layer=1", "--d_model=16", "--n_head=2", "--d_head=8",
                          "--d_inner=32", "--n_token=50", "--tgt_len=8", "--steps=2", "--no_eval",
                          "--data_parallel", f"--out={tmp_path}"])
    rows = json.load(open(tmp_path / "throughput.json"))["rows"]
    assert rc == 0 and {r["memory"] for r in rows} == {"lamemo", "xl"}
    assert all(r["step_ms"] > 0 and "error" not in r for r in rows)
