#!/usr/bin/env bash
# The GPU run (issues 6 and 19) on the lent machine, from the repository root. Before it, here:
#
#     python3 benchmarks/gpu_archive.py stamp      # gpu-stamp.json names the commit (the copy has no .git)
#
# then on the device (the `run` tool: carry ["gpu-stamp.json"], timeout_s 600):
#
#     bash benchmarks/run_gpu.sh                    # the default plan (gpu_scaling.py's steps)
#     STEPS=speed,big BUDGET_S=180 HARD_S=210 TAG=run3b bash benchmarks/run_gpu.sh   # a rerun of a part
#     SMOKE=1 OUT=/tmp/smoke nice -n 19 bash benchmarks/run_gpu.sh     # the whole flow on CPU, tiny (seconds)
#
# and back here: python3 benchmarks/gpu_archive.py unpack <files_at>/structprune-gpu-run3.tar.gz
#
# Records go to $WORK (a temporary folder); after every record ALL of them, and this console log,
# are packed into the one archive $OUT/structprune-gpu-$TAG.tar.gz (atomically), so a run killed at
# any moment brings back everything it finished in one file; the summary and the log are also
# copied to $OUT as plain files (4 files: the machine gives back at most 8). gpu_scaling.py gets a
# BUDGET_S budget (runs it cannot afford are recorded as skipped) under a hard limit of HARD_S:
# SIGINT first (the run under way is recorded as interrupted, the summary written), SIGKILL 15 s
# later; the archive is packed once more at the end whatever happened.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-${TMPDIR:-/tmp}/structprune-gpu-out}"
TAG="${TAG:-run3}"
WORK="${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/structprune-gpu-$TAG.XXXXXX")}"
BUDGET_S="${BUDGET_S:-450}"
HARD_S="${HARD_S:-500}"
ARCHIVE="$OUT/structprune-gpu-$TAG.tar.gz"
mkdir -p "$OUT" "$WORK"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
PY="${PYTHON:-python3}"
STEP_ARGS=()
[ -n "${STEPS:-}" ] && STEP_ARGS=(--steps "$STEPS")
[ -n "${SMOKE:-}" ] && STEP_ARGS+=(--cpu-smoke)

{
    echo "== $(date -u +%FT%TZ) structprune GPU run $TAG, work=$WORK archive=$ARCHIVE budget=${BUDGET_S}s hard=${HARD_S}s"
    "$PY" - <<'EOF'
import platform, torch, transformers
print("python", platform.python_version(), "| torch", torch.__version__, "| transformers", transformers.__version__,
      "| cuda", torch.version.cuda, "| available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"{p.total_memory / 2**30:.1f} GiB", "| cpus", __import__("os").cpu_count())
EOF
    nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,clocks.sm,clocks.max.sm --format=csv 2>/dev/null \
        || echo "(no nvidia-smi)"
    echo "commit: $("$PY" benchmarks/gpu_archive.py commit)"
    timeout -s INT -k 15 "$HARD_S" "$PY" benchmarks/gpu_scaling.py --out "$WORK" --archive "$ARCHIVE" \
        --budget-s "$BUDGET_S" "${STEP_ARGS[@]}" "$@"
    echo "$?" > "$WORK/.rc"
} 2>&1 | tee "$WORK/gpu-run.log"
rc=$(cat "$WORK/.rc" 2>/dev/null || echo 1)
echo "== gpu_scaling.py exit $rc; $(ls "$WORK"/gpu-*.json 2>/dev/null | wc -l) JSON files" | tee -a "$WORK/gpu-run.log"
"$PY" benchmarks/gpu_archive.py pack "$WORK" "$ARCHIVE" --prefix "structprune-gpu-$TAG"
cp "$WORK/gpu-run.log" "$OUT/gpu-run-$TAG.log"
for f in gpu-summary.json gpu-summary.txt; do
    [ -f "$WORK/$f" ] && cp "$WORK/$f" "$OUT/${f%.*}-$TAG.${f##*.}"
done
exit "$rc"
