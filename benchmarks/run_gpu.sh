#!/usr/bin/env bash
# One device call: GPU tests, then every benchmark family at 32K and 128K; the compact table prints last.
#
#   pip install --no-deps -e . && OUT=/some/dir bash benchmarks/run_gpu.sh
#
# Optional environment:
#   MINFERENCE_SDIST   path of minference-0.1.6.0.tar.gz: built here (~75 s, MAX_JOBS=16) so the
#                      MInference peer columns are timed in the same run; skipped when unset.
#   MINFERENCE_CONFIG  path of Llama_3_8B_Instruct_262k_kv_out_v32_fit_o_best_pattern.json (default: looked
#                      up under shared/minference_configs/); layer_mix and e2e are skipped without it.
#   SEQLENS            default "32768 131072".
#   PYTHON             interpreter (default python3).
#   SKIP_PYTEST        set to skip the pytest step.
#   BENCH_TIMEOUT      seconds for the benchmark step (default 420; the device allows 600 per call).
#   IMPL               attention implementation (default auto: what sparse_attention runs on the GPU).
#   BENCH_ARGS         extra arguments of flexinference bench (e.g. "--reps 10 --part-reps 5").
# Writes under $OUT: gpu.txt, pytest_gpu.txt, bench.json, bench.png, bench.txt (and minference_build.log).
set -uo pipefail
PY=${PYTHON:-python3}
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
start=$(date +%s)

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null
  "$PY" -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'triton', triton.__version__, 'transformers', transformers.__version__)"
} | tee "$OUT/gpu.txt"

if [[ -n "${MINFERENCE_SDIST:-}" && -f "${MINFERENCE_SDIST}" ]]; then
  echo "building MInference from ${MINFERENCE_SDIST}"
  MAX_JOBS=16 "$PY" -m pip install --no-deps --no-build-isolation "${MINFERENCE_SDIST}" \
    >"$OUT/minference_build.log" 2>&1 || echo "MInference build failed: peer columns skipped"
fi

if [[ -z "${SKIP_PYTEST:-}" ]]; then
  echo "== pytest -m gpu"
  timeout 240 "$PY" -m pytest -m gpu -q -p no:cacheprovider --continue-on-collection-errors tests \
    >"$OUT/pytest_gpu.txt" 2>&1
  echo "pytest exit $? ($(( $(date +%s) - start )) s so far)"
  tail -n 15 "$OUT/pytest_gpu.txt"
fi

echo "== flexinference bench"
config_args=()
if [[ -n "${MINFERENCE_CONFIG:-}" ]]; then config_args=(--minference-config "${MINFERENCE_CONFIG}"); fi
# shellcheck disable=SC2086
timeout "${BENCH_TIMEOUT:-420}" "$PY" -m flexinference.bench --seqlens ${SEQLENS:-32768 131072} \
  --families vertical_slash layer_mix block_topk a_shape dense e2e "${config_args[@]}" \
  --impl "${IMPL:-auto}" ${BENCH_ARGS:-} --json "$OUT/bench.json" --plot "$OUT/bench.png" --no-progress >"$OUT/bench.txt" 2>&1
status=$?
echo "bench exit ${status} ($(( $(date +%s) - start )) s total)"
grep -v -i "warn" "$OUT/bench.txt" | tail -n 40
exit "${status}"
