#!/usr/bin/env bash
# One-shot GPU benchmark run on the lent machine (issue 6), from the repository root:
#
#     bash benchmarks/run_gpu.sh                      # the default plan, results under $OUT
#     bash benchmarks/run_gpu.sh --steps long         # extra arguments go to gpu_scaling.py
#
# Prints the versions and nvidia-smi, then runs benchmarks/gpu_scaling.py with a 500 s budget
# (runs it cannot afford are recorded as skipped) under a hard limit of 540 s: SIGINT first (the
# script records the run under way as interrupted and writes its summary), SIGKILL 15 s later.
# Every run's JSON is written as soon as it ends, so a kill loses at most the run under way.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-benchmarks/results}"
BUDGET_S="${BUDGET_S:-500}"
HARD_S="${HARD_S:-540}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
PY="${PYTHON:-python3}"

echo "== $(date -u +%FT%TZ) structprune GPU benchmark, out=$OUT budget=${BUDGET_S}s hard=${HARD_S}s"
"$PY" - <<'EOF'
import platform, torch, transformers
print("python", platform.python_version(), "| torch", torch.__version__, "| transformers", transformers.__version__,
      "| cuda", torch.version.cuda, "| available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"{p.total_memory / 2**30:.1f} GiB", "| cpus", __import__("os").cpu_count())
EOF
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv 2>/dev/null || echo "(no nvidia-smi)"

timeout -s INT -k 15 "$HARD_S" "$PY" benchmarks/gpu_scaling.py --out "$OUT" --budget-s "$BUDGET_S" "$@" \
    2>&1 | tee "$OUT/gpu-run.log"
rc=${PIPESTATUS[0]}
echo "== gpu_scaling.py exit $rc; $(ls "$OUT"/gpu-*.json 2>/dev/null | wc -l) JSON files in $OUT"
exit "$rc"
