"""The throughput benchmark runs end to end on a tiny model (timings are not checked here)."""

import json

import pytest

import kernels
from benchmarks import throughput


def test_throughput_interleaves_and_records_a_failing_variant(tmp_path):
    rc = throughput.main(["--mem_lens=8", "--n_layer=1", "--d_model=16", "--n_head=2", "--d_head=8",
                          "--d_inner=32", "--n_token=50", "--tgt_len=8", "--steps=3", "--no_eval",
                          "--attention_impls=xla,pallas", f"--out={tmp_path}"])
    out = json.load(open(tmp_path / "throughput.json"))
    rows = {(r["memory"], r["attention_impl"]): r for r in out["rows"]}
    assert set(rows) == {(m, i) for m in ("lamemo", "xl") for i in ("xla", "pallas")}
    # which forms of the XLA path the run traced (CPU: the narrow band and the flat dense products)
    assert out["reference_forms"] == {"batched_positions": False, "one_pass_softmax": False, "narrow_band": True,
                                      "flat_rows": True}
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
    r = compare.run_one("sotu_words", "xl", 0, 0, str(tmp_path))
    assert r["num_steps"] == 1000 and r["train_wall_s"] >= 0  # the run's time goes into summary.json
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


def test_profile_summary_sums_device_kernels_per_step():
    """Busy time is the union of the kernels' intervals (overlaps counted once), kernels inside a
    CUDA graph (hlo_op command_buffer_N) are named by kernel, derived lines and host events are
    left out."""
    from benchmarks.profile_step import summarize_trace
    meta = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
            {"ph": "M", "name": "thread_name", "pid": 1, "tid": 7, "args": {"name": "Stream #7(Compute)"}},
            {"ph": "M", "name": "thread_name", "pid": 1, "tid": 8, "args": {"name": "Stream #8(Compute)"}},
            {"ph": "M", "name": "thread_name", "pid": 1, "tid": 9, "args": {"name": "XLA Ops"}}]
    k = [("gemm_fusion_dot_1", 7, 0, 400, "command_buffer_1"), ("loop_add_fusion", 8, 300, 200, "add.3"),
         ("nvjet_sm90_tss", 7, 1000, 300, "command_buffer_1"), ("memcpy32_post", 7, 1400, 100, None)]
    events = meta + [{"ph": "X", "pid": 1, "tid": tid, "ts": ts, "dur": dur, "name": name,
                      "args": {"hlo_op": op} if op else {}} for name, tid, ts, dur, op in k]
    events += [{"ph": "X", "pid": 1, "tid": 9, "ts": 0, "dur": 5000, "name": "fusion.1"},
               {"ph": "X", "pid": 2, "tid": 1, "ts": 0, "dur": 9000, "name": "PjitFunction"}]
    s = summarize_trace({"traceEvents": events}, n_steps=2)
    assert s["device_kernels"] == 4 and s["kernels_per_step"] == 2
    assert s["kernel_ms_per_step"] == pytest.approx(1e-3 * 1000 / 2)
    assert s["busy_ms_per_step"] == pytest.approx(1e-3 * 900 / 2)  # [0, 500) + [1000, 1300) + [1400, 1500)
    assert s["span_ms_per_step"] == pytest.approx(1e-3 * 1500 / 2)
    assert s["by_kind_ms_per_step"] == pytest.approx({"matmul": 0.35, "fusion": 0.1, "copy": 0.05})
    assert [o["op"] for o in s["top_ops"]] == ["gemm_fusion_dot_1", "nvjet_sm90_tss", "add.3", "memcpy32_post"]
    assert summarize_trace({"traceEvents": meta[1:2]}, 1) == {"device_kernels": 0}
    # with the HLO: a command buffer's kernel is found by its fusion's name ('_1' for '.1');
    # a library kernel (nvjet) has no op and stays unattributed
    hlo = ('  %gemm_fusion_dot.1 = f32[8]{0} fusion(%a), kind=kCustom, calls=%c, '
           'metadata={op_name="jit(step_fn)/jvp(TransformerLM)/layers_0/pos_ff/CoreNet_0/dot_general"}\n'
           '  %add.3 = f32[8]{0} add(%a, %b), metadata={op_name="jit(step_fn)/jvp(TransformerLM)/crit.nll/add"}')
    s = summarize_trace({"traceEvents": events}, n_steps=2, hlo_text=hlo)
    assert s["source"] == "device" and s["kernel_ms_per_step"] == pytest.approx(0.5)
    assert {r["region"]: r["ms_per_step"] for r in s["by_region"]} == pytest.approx(
        {"FFN": 0.2, "unattributed": 0.2, "output layer + loss": 0.1})


def test_profile_summary_pairs_cublas_kernels_with_their_calls_in_schedule_order():
    """cuBLAS kernels inside a CUDA graph carry no op name: with one kernel per library call and
    step, the i-th (in time order) is the i-th call of the compiled schedule, step after step;
    with any other count they stay unattributed rather than guessed."""
    from benchmarks.profile_step import hlo_ops, summarize_trace
    scope = 'metadata={op_name="jit(step_fn)/%s"}'
    hlo = "\n".join([
        "HloModule jit_step_fn, is_scheduled=true",
        "ENTRY %main.9 (p: f32[8]) -> f32[8] {",
        "  %p = f32[8]{0} parameter(0)",
        "  %loop_add_fusion = f32[8]{0} fusion(%p), kind=kLoop, calls=%c, "
        + scope % "jvp(TransformerLM)/layers_0/pos_ff/add",
        '  %custom-call.4 = (f32[8]{0}, s8[4]{0}) custom-call(%p, %p), custom_call_target="__cublas$lt$matmul", '
        + scope % "jvp(TransformerLM)/layers_0/q_net/dot_general",
        '  %custom-call.2 = (f32[8]{0}, s8[4]{0}) custom-call(%p, %p), custom_call_target="__cublas$gemm", '
        + scope % "transpose(jvp(TransformerLM))/crit.nll/dot_general",
        "  ROOT %t = f32[8]{0} add(%p, %p)",
        "}"])
    ops = hlo_ops(hlo)
    assert ops["custom-call.4"].target == "__cublas$lt$matmul" and ops["custom-call.4"].computation == "main.9"
    assert ops["custom-call.4"].position < ops["custom-call.2"].position  # schedule (text) order
    meta = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "name": "thread_name", "pid": 1, "tid": 7, "args": {"name": "Stream #7(Compute)"}}]

    def trace(names_durs):
        return {"traceEvents": meta + [
            {"ph": "X", "pid": 1, "tid": 7, "ts": 1000 * i, "dur": dur, "name": name,
             "args": {"hlo_op": "command_buffer_1"}} for i, (name, dur) in enumerate(names_durs)]}

    step = [("loop_add_fusion", 100), ("nvjet_sm90_a", 300), ("nvjet_sm90_b", 500)]
    s = summarize_trace(trace(step + step), n_steps=2, hlo_text=hlo)
    assert {r["region"]: r["ms_per_step"] for r in s["by_region"]} == pytest.approx(
        {"FFN": 0.1, "q/k/v projections": 0.3, "output layer + loss": 0.5})
    assert {o["op"]: o["launches_per_step"] for o in s["top_ops"]} == {
        "loop_add_fusion": 1, "custom-call.4": 1, "custom-call.2": 1}
    # the same cuBLAS kernel for several calls: one top_ops entry (under the first call, as a
    # fusion kernel shared by identical fusions), each call's time in its own region
    same = [("loop_add_fusion", 100), ("nvjet_sm90_a", 300), ("nvjet_sm90_a", 500)]
    s = summarize_trace(trace(same + same), n_steps=2, hlo_text=hlo)
    assert {r["region"]: r["ms_per_step"] for r in s["by_region"]} == pytest.approx(
        {"FFN": 0.1, "q/k/v projections": 0.3, "output layer + loss": 0.5})
    assert {o["op"]: o["launches_per_step"] for o in s["top_ops"]} == {"loop_add_fusion": 1, "custom-call.4": 2}
    unpaired = {"FFN": 0.1, "unattributed": 0.8}
    # more cuBLAS kernels than calls in a step: no pairing is trusted
    s = summarize_trace(trace(step + step[:2] + [("nvjet_sm90_c", 50), step[2]]), n_steps=2, hlo_text=hlo)
    assert {r["region"]: r["ms_per_step"] for r in s["by_region"]} == pytest.approx(
        {"FFN": 0.1, "unattributed": 0.825})
    # the right total, but one step has an extra kernel and the other misses one: the steps'
    # kernels differ call by call, so nothing is paired
    s = summarize_trace(trace(step + [("nvjet_sm90_c", 50)] + step[:2]), n_steps=2, hlo_text=hlo)
    assert {r["region"]: r["ms_per_step"] for r in s["by_region"]} == pytest.approx(
        {"FFN": 0.1, "unattributed": 0.575})
    assert not any(o["op"].startswith("custom-call") for o in s["top_ops"])
    # library calls in two computations (e.g. one inside a while loop's body): no order to pair by
    loop = hlo.replace('  %custom-call.2 =', '}\n%body.3 (q: f32[8]) -> f32[8] {\n  %custom-call.2 =')
    assert hlo_ops(loop)["custom-call.2"].computation == "body.3"
    s = summarize_trace(trace(step + step), n_steps=2, hlo_text=loop)
    assert {r["region"]: r["ms_per_step"] for r in s["by_region"]} == pytest.approx(unpaired)


def test_profile_summary_of_a_cpu_trace_by_op_kind_and_model_region():
    """Without device kernels (XLA:CPU) the host events named by an HLO instruction are the ops
    (not the containers: while/conditional/call); each is attributed to a model region by its
    op_name scope, backward by transpose(jvp(...)); a fusion of a dot is a matmul."""
    from benchmarks.profile_step import op_region, summarize_trace
    hlo = "\n".join([
        '%fused_computation.1 (param_0: f32[8,8], param_1: f32[8,64]) -> f32[8,64] {',
        '  %param_0 = f32[8,8]{1,0} parameter(0)',
        '  %param_1 = f32[8,64]{1,0} parameter(1)',
        '  ROOT %dot.9 = f32[8,64]{1,0} dot(%param_0, %param_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}',
        '}',
        'ENTRY %main {',
        '  %ynn_fusion.1 = f32[8,64]{1,0} fusion(%a, %b), kind=kCustom, calls=%fused_computation.1, '
        'metadata={op_name="jit(step_fn)/jvp(TransformerLM)/layers_0/lookahead/bphd,bwhd->bhpw/dot_general"}',
        '  %copy_pad_fusion = f32[8,64]{1,0} fusion(%a), kind=kLoop, calls=%c2, '
        'metadata={op_name="jit(step_fn)/transpose(jvp(TransformerLM))/layers_0/lookahead/pad"}',
        '  %dot.3 = f32[8,8]{1,0} dot(%a, %b), metadata={op_name="jit(step_fn)/jvp(TransformerLM)/layers_1/pos_ff/CoreNet_0/dot_general"}',
        '  %while.5 = (s32[], u32[1]{0}, /*index=2*/u32[4]{0}) while(%t), condition=%c, body=%b',
        '  ROOT %add.4 = f32[8]{0} add(%a, %b), metadata={op_name="jit(step_fn)/add"}',
        '}'])
    events = [{"ph": "X", "pid": 5, "tid": t, "ts": ts, "dur": dur, "name": name}
              for name, t, ts, dur in [("ynn_fusion.1", 1, 0, 300), ("copy_pad_fusion", 2, 100, 400),
                                       ("dot.3", 1, 600, 200), ("add.4", 1, 900, 100),
                                       ("while.5", 2, 600, 300),  # a container: its ops are traced too
                                       ("ThunkExecutor::Execute", 1, 0, 2000)]]
    assert summarize_trace({"traceEvents": events}, 2) == {"device_kernels": 0}  # no HLO: no ops
    s = summarize_trace({"traceEvents": events}, n_steps=2, hlo_text=hlo)
    assert s["source"] == "host ops (XLA:CPU)" and s["kernels_per_step"] == 2  # executor, while left out
    assert s["kernel_ms_per_step"] == pytest.approx(1e-3 * 1000 / 2)
    assert s["busy_ms_per_step"] == pytest.approx(1e-3 * 800 / 2)  # [0, 500) + [600, 800) + [900, 1000)
    assert s["by_kind_ms_per_step"] == pytest.approx({"matmul": 0.25, "copy": 0.2, "fusion": 0.05})
    assert {r["region"]: r["ms_per_step"] for r in s["by_region"]} == pytest.approx(
        {"look-ahead (memory rows)": 0.35, "FFN": 0.1, "optimizer, gradient norm, step": 0.05})
    assert {r["region"]: r["backward_ms_per_step"] for r in s["by_region"]} == pytest.approx(
        {"look-ahead (memory rows)": 0.2, "FFN": 0.0, "optimizer, gradient norm, step": 0.0})
    assert op_region("jit(step_fn)/jvp(TransformerLM)/layers_0/rel_attention/exp") == "attention (current rows)"
    assert op_region("jit(step_fn)/jvp(TransformerLM)/crit.nll/dot_general") == "output layer + loss"
    assert op_region("jit(step_fn)/jvp(TransformerLM)/layers_1/concatenate").startswith("model, other")
    assert op_region("") == "unattributed"


def test_profile_step_and_output_layer_run_on_cpu(tmp_path, capsys):
    from benchmarks import output_layer, profile_step
    small = "n_layer=1,d_model=16,n_head=2,d_head=8,d_inner=32,n_token=50,tgt_len=4,mem_len=6"
    rc = profile_step.main(["--config=configs/tiny.py", "--dtype=float32", "--batch=2", "--steps=2",
                            "--trace_steps=1", f"--variant=a:{small}", f"--variant=x:{small},memory=xl",
                            f"--variant=b:{small},batched_positions=True,one_pass_softmax=True,narrow_band=False,flat_rows=False", "--keep=a", f"--out={tmp_path}"])
    out = json.load(open(tmp_path / "profile.json"))
    assert rc == 0 and [r["variant"] for r in out["rows"]] == ["a", "x", "b"]
    assert kernels.BATCHED_POSITIONS.value is None and kernels.ONE_PASS_SOFTMAX.value is None  # reset
    assert kernels.NARROW_BAND.value is None and kernels.FLAT_ROWS.value is None
    assert all(r["step_ms"] > 0 and r["profile"]["traced_wall_ms_per_step"] > 0 for r in out["rows"])
    assert (tmp_path / "trace_a.json.gz").exists() and (tmp_path / "hlo_a.txt.gz").exists()
    for row in out["rows"]:  # XLA:CPU: the ops from the host events, both attentions found by scope
        regions = {r["region"] for r in row["profile"]["by_region"]}
        assert row["profile"]["source"] == "host ops (XLA:CPU)" and "attention (current rows)" in regions
        # (mem_len > tgt_len: the one layer's look-ahead writes rows the cache keeps)
        assert ("look-ahead (memory rows)" in regions) == (row["variant"] != "x")
    summary = capsys.readouterr().out
    assert "by model region" in summary
    assert profile_step.main(["--summarize", str(tmp_path / "trace_a.json.gz"), "--trace_steps=1",
                              "--hlo", str(tmp_path / "hlo_a.txt.gz")]) == 0
    assert json.loads(capsys.readouterr().out)["by_region"]
    with pytest.raises(SystemExit):
        profile_step.main(["--config=configs/tiny.py", "--variant=bad", f"--out={tmp_path}"])
    assert "NAME:FIELD=VALUE" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        profile_step.main(["--config=configs/tiny.py", "--variant=b:batched_positions=3", f"--out={tmp_path}"])
    assert "batched_positions=3" in capsys.readouterr().err
    assert output_layer.main(["--tokens=16", "--d=6", "--vocab=37", "--iters=1", "--chunk=5",
                              "--dtype=float32", f"--json={tmp_path / 'ol.json'}"]) == 0
    rows = json.load(open(tmp_path / "ol.json"))["rows"]
    assert [r["variant"] for r in rows] == ["autodiff", "fused", "fused_padv", "fused_padvd", "chunk"]
    assert all(r["error_vs_first"] < 1e-5 for r in rows)


def test_alignment_pads_exactly_and_runs_on_cpu(tmp_path):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from benchmarks import alignment
    rng = np.random.default_rng(0)
    a, b, c = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in [(3, 10, 7), (3, 7, 5), (3, 10, 5)])
    plain = alignment._step((3,), 10, 7, 5, 1, jnp.float32)(a, b, c)
    padded = alignment._step((3,), 10, 7, 5, 16, jnp.float32)(a, b, c)
    for x, y in zip(jax.tree.leaves(plain), jax.tree.leaves(padded)):
        assert x.shape == y.shape
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)
    assert alignment.main(["--config=configs/tiny.py", "--iters=1", "--multiple=16",
                           f"--json={tmp_path / 'al.json'}"]) == 0
    out = json.load(open(tmp_path / "al.json"))
    assert [r["matmul"] for r in out["rows"]] == ["qkv", "o_net", "ff1", "ff2", "scores"]
    assert all(r["unpadded_matmul_ms"] > 0 and r["padded_matmul_ms"] > 0 for r in out["rows"])


def test_profile_step_passes_xla_options_per_variant(tmp_path, capsys):
    # fields named xla_... are compiler options of that variant's compile alone: a known one compiles
    # and is recorded, an unknown one fails its variant (named in the error) and not the others
    from benchmarks import profile_step
    small = "n_layer=1,d_model=16,n_head=2,d_head=8,d_inner=32,n_token=50,tgt_len=4,mem_len=6"
    rc = profile_step.main(["--config=configs/tiny.py", "--dtype=float32", "--batch=2", "--steps=2",
                            "--trace_steps=1", f"--variant=a:{small}",
                            f"--variant=o:{small},xla_cpu_enable_fast_math=False",
                            f"--variant=bad:{small},xla_no_such_option=1", f"--out={tmp_path}"])
    rows = {r["variant"]: r for r in json.load(open(tmp_path / "profile.json"))["rows"]}
    assert rc == 1 and rows["a"]["compiler_options"] is None and rows["a"]["step_ms"] > 0
    assert rows["o"]["compiler_options"] == {"xla_cpu_enable_fast_math": False} and rows["o"]["step_ms"] > 0
    assert "xla_no_such_option" in rows["bad"]["error"] and "step_ms" not in rows["bad"]
    assert "== bad: failed" in capsys.readouterr().out


def test_kernel_benchmark_sweeps_block_sizes(tmp_path, capsys, monkeypatch):
    # one XLA row and one Pallas row per --block-sizes set, each labelled, run with its own blocks
    # and checked against XLA; a set that fails leaves an error row, the others are kept
    from benchmarks import kernels as bench_kernels
    import kernels._relpos_flash as flash
    used, make_tiling = [], flash.make_tiling
    monkeypatch.setattr(flash, "make_tiling", lambda target, interpret, bs, *a: (
        used.append(bs), make_tiling(target, interpret, bs, *a))[1])
    pallas = bench_kernels.rel_attention_pallas

    def failing_at_16_warps(*a, block_sizes=None, **kw):
        if block_sizes is not None and block_sizes.num_warps == 16:
            raise RuntimeError("too many warps for this test")
        return pallas(*a, block_sizes=block_sizes, **kw)

    monkeypatch.setattr(bench_kernels, "rel_attention_pallas", failing_at_16_warps)
    rc = bench_kernels.main(["--configs=16x24x2x16", "--kernels=rel_attention", "--iters=1",
                             "--block-sizes=8,8,8", "--block-sizes=16,16,16,8",
                             "--block-sizes=16,16,16,16", f"--json={tmp_path / 'k.json'}"])
    rows = json.load(open(tmp_path / "k.json"))["rows"]
    assert rc == 1 and [(r["impl"], r["blocks"]) for r in rows] == [
        ("xla", None), ("pallas_interpret", "8,8,8,4"), ("pallas_interpret", "16,16,16,8"),
        ("pallas_interpret", "16,16,16,16")]
    assert {(b.block_q, b.num_warps) for b in used} == {(8, 4), (16, 8)}
    assert all(r["max_rel_err_vs_xla"] < 1e-5 and r["fwd_bwd_ms"] > 0 for r in rows[1:3])
    assert "too many warps" in rows[3]["error"] and "max_rel_err_vs_xla" not in rows[3]
    # without --block-sizes the row names the blocks the kernels got (interpret mode's defaults)
    monkeypatch.setattr(bench_kernels, "rel_attention_pallas", pallas)
    assert bench_kernels.main(["--configs=16x24x2x16", "--kernels=rel_attention", "--iters=1"]) == 0
    assert '"blocks": "128,128,128,4"' in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench_kernels.main(["--block-sizes=64,64"])
    assert "block_q,block_k,block_bwd" in capsys.readouterr().err


def test_compare_rejects_steps_inside_the_warmup_before_training(capsys):
    from benchmarks import compare
    for steps, dataset, warmup in ((2, "wiki_chars", 50), (-5, "sotu_words", 100)):
        with pytest.raises(SystemExit) as e:
            compare.main([f"--steps={steps}", f"--dataset={dataset}", "--out=/nonexistent/never-written"])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert f"--steps={steps}" in err and f"warmup_steps ({warmup})" in err
