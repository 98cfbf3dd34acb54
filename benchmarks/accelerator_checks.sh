#!/usr/bin/env bash
# Every check that needs a GPU, in one pass with a time limit per stage (for a short lease on a
# GPU machine). Usage, from the repository root:
#
#     benchmarks/accelerator_checks.sh OUTDIR [wt103 config] [throughput steps]
#
# Stages (each writes OUTDIR/<stage>.log; a failing or timed-out stage does not stop the others):
#   env           versions, devices, and kernels.pallas_self_check() (what attention_impl="auto"
#                 runs before trusting the kernels)
#   kernel_tests  tests/test_kernels.py's reference-equality cases, bf16 case and model tests
#                 through the real Triton compile (LAMEMO_KERNELS_COMPILED=1), and the output
#                 layer's tests (padding, custom_vjp) where padding is on by default, the
#                 position product's two batchings (batched_positions), and the softmax's one-
#                 and two-pass forms (tests/test_softmax.py, one_pass_softmax)
#   kernel_bench  python -m benchmarks.kernels (Pallas vs XLA: time, memory, error) -> kernels.json
#   throughput    the paper config in bf16, LaMemo and Transformer-XL, Pallas and XLA attention:
#                 tokens/s and MFU -> tp/throughput.json
#   throughput_chunked  the same LaMemo step with the fused chunked cross-entropy
#                 (model.softmax_chunk=2048) -> tpc/throughput.json
#   output_layer  python -m benchmarks.output_layer: the wt103 output layer alone, its variants
#                 (autodiff, custom_vjp, padding, chunks) -> output_layer.json
#   profile       python -m benchmarks.profile_step: where the LaMemo and XL steps' device time
#                 goes (kernels by kind and by op, busy vs wall), and LaMemo with the softmax in
#                 two passes (one_pass_softmax=False) and with the position product shared by
#                 the batch (batched_positions=False) -> prof/profile.json, and the LaMemo
#                 step's trace and compiled HLO (prof/trace_lamemo.json.gz, prof/hlo_lamemo.txt.gz)
#   alignment     python -m benchmarks.alignment: one layer's matmuls unpadded vs padded to 8
#                 (matmul kernel time from a trace) -> alignment.json
#   forms         the CPU's forms of the XLA path on this GPU: the layers' dense products as 2-D
#                 products (flat_rows=True) for LaMemo and XL, the look-ahead's position band in
#                 16-row blocks (narrow_band=True), against today's defaults -> forms/profile.json
#   gemm          XLA's choice of matrix-product kernels for LaMemo: Triton gemm fusions where
#                 the autotuner picks them (the default) against the library for every product
#                 (xla_gpu_enable_triton_gemm=False) and the legacy cuBLAS API instead of
#                 cuBLASLt (xla_gpu_enable_cublaslt=False); XL's default -> gemm/profile.json
#   gemm_search   LaMemo with an exhaustive search of Triton tilings (the 41-wide attention
#                 products; xla_gpu_exhaustive_tiling_search), alone in its process: compare
#                 with the gemm stage's default on the same machine -> gemm_search/profile.json
#   kernel_blocks the Pallas kernels at the wt103 step's attention shape (150x150x10x41, bf16,
#                 batch 64) over a sweep of tiles and Triton warps (--block-sizes), against
#                 XLA: their backward is what made the Pallas step slower -> kernel_blocks.json
# All stages together need up to ~47 minutes (their limits); a shorter lease runs some of them
# (a 15-minute lease, machine start included: kernel_blocks and gemm, the open measurements; a
# wt103 step variant costs ~1 minute to compile, time and trace on an H200):
# STAGES="kernel_blocks gemm" benchmarks/accelerator_checks.sh OUT
# (with the machine's own jax; carry the ml_collections wheel, the one package its image lacks).
# Results are recorded in docs/benchmarks.md.
set -u
OUT=${1:?usage: $0 OUTDIR [config] [steps]}
CONFIG=${2:-configs/wt103.py}
STEPS=${3:-10}
mkdir -p "$OUT/tp" "$OUT/tpc" "$OUT/prof" "$OUT/forms" "$OUT/gemm" "$OUT/gemm_search"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
LIMIT_ENV=${LIMIT_ENV:-90}
LIMIT_TESTS=${LIMIT_TESTS:-300}
LIMIT_BENCH=${LIMIT_BENCH:-110}
LIMIT_TP=${LIMIT_TP:-200}
LIMIT_TPC=${LIMIT_TPC:-90}
LIMIT_OL=${LIMIT_OL:-80}
LIMIT_PROF=${LIMIT_PROF:-540}
LIMIT_AL=${LIMIT_AL:-60}
LIMIT_FORMS=${LIMIT_FORMS:-400}
LIMIT_GEMM=${LIMIT_GEMM:-420}
LIMIT_GEMM_SEARCH=${LIMIT_GEMM_SEARCH:-300}
LIMIT_BLOCKS=${LIMIT_BLOCKS:-240}

STAGES=${STAGES:-env kernel_tests kernel_bench throughput throughput_chunked output_layer profile alignment forms gemm gemm_search kernel_blocks}

stage() {
  local name=$1 limit=$2 start rc
  shift 2
  case " $STAGES " in *" $name "*) ;; *) return 0 ;; esac
  echo "=== $name (limit ${limit}s) $(date +%T)"
  start=$(date +%s)
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  echo "=== $name: exit $rc after $(($(date +%s) - start)) s"
  tail -n "${TAIL:-25}" "$OUT/$name.log"
}

stage env "$LIMIT_ENV" "$PY" -c "
import jax, jaxlib, flax, optax
print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'flax', flax.__version__, 'optax', optax.__version__)
print(jax.devices())
import kernels
print('pallas_self_check:', kernels.pallas_self_check())"
stage kernel_tests "$LIMIT_TESTS" env LAMEMO_KERNELS_COMPILED=1 "$PY" -m pytest -q -p no:cacheprovider \
  tests/test_kernels.py tests/test_model_properties.py tests/test_softmax.py -k "matches_reference or \
  bfloat16 or torch_fixture or sgd_steps or output_layer or fused_cross or padded_layer or \
  batched_positions or one_pass or softmax_lse or default_form or backend_switch"
stage kernel_bench "$LIMIT_BENCH" "$PY" -m benchmarks.kernels --iters 20 --json "$OUT/kernels.json"
stage throughput "$LIMIT_TP" "$PY" -m benchmarks.throughput --config="$CONFIG" --dtype=bfloat16 \
  --memories=lamemo,xl --attention_impls=pallas,xla --steps="$STEPS" --no_eval --out="$OUT/tp"
stage throughput_chunked "$LIMIT_TPC" "$PY" -m benchmarks.throughput --config="$CONFIG" --dtype=bfloat16 \
  --memories=lamemo --attention_impls=xla --set softmax_chunk=2048 --steps="$STEPS" --no_eval --out="$OUT/tpc"
stage output_layer "$LIMIT_OL" "$PY" -m benchmarks.output_layer --iters 10 --json "$OUT/output_layer.json"
stage profile "$LIMIT_PROF" "$PY" -m benchmarks.profile_step --config="$CONFIG" --dtype=bfloat16 \
  --variant lamemo: --variant lamemo_two_pass:one_pass_softmax=False \
  --variant lamemo_shared_pos:batched_positions=False --variant xl:memory=xl --steps="$STEPS" \
  --trace_steps 2 --top 30 --keep lamemo --out="$OUT/prof"
stage alignment "$LIMIT_AL" "$PY" -m benchmarks.alignment --config="$CONFIG" --multiple 8 --iters 20 \
  --json "$OUT/alignment.json"
stage forms "$LIMIT_FORMS" "$PY" -m benchmarks.profile_step --config="$CONFIG" --dtype=bfloat16 \
  --variant lamemo: --variant lamemo_flat:flat_rows=True --variant lamemo_band:narrow_band=True \
  --variant xl:memory=xl --variant xl_flat:memory=xl,flat_rows=True --steps="$STEPS" --trace_steps 2 \
  --top 20 --out="$OUT/forms"
stage gemm "$LIMIT_GEMM" "$PY" -m benchmarks.profile_step --config="$CONFIG" --dtype=bfloat16 \
  --variant lamemo: --variant lamemo_cublas:xla_gpu_enable_triton_gemm=False \
  --variant lamemo_no_lt:xla_gpu_enable_cublaslt=False --variant xl:memory=xl \
  --steps="$STEPS" --trace_steps 2 --top 20 --out="$OUT/gemm"
# in a process of its own: XLA's in-process autotuning cache would hand an exhaustive search the
# tilings a default compile of the same fusions chose (or the other way round)
stage gemm_search "$LIMIT_GEMM_SEARCH" "$PY" -m benchmarks.profile_step --config="$CONFIG" \
  --dtype=bfloat16 --variant lamemo_exhaustive:xla_gpu_exhaustive_tiling_search=True \
  --steps="$STEPS" --trace_steps 2 --top 20 --out="$OUT/gemm_search"
stage kernel_blocks "$LIMIT_BLOCKS" "$PY" -m benchmarks.kernels --configs 150x150x10x41 --dtypes bfloat16 \
  --batch 64 --iters 20 --block-sizes 64,64,32 --block-sizes 64,64,32,8 --block-sizes 64,64,16 \
  --block-sizes 64,64,64 --block-sizes 64,64,64,8 --block-sizes 128,64,64,8 --block-sizes 32,32,32 \
  --json "$OUT/kernel_blocks.json"
