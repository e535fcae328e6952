#!/usr/bin/env bash
# The GPU check: one script, one JSON file of results, at most ~8 minutes on one H100/H200.
#
#   bash tools/gpu_check.sh [--dry-run] [--out PATH] [--work DIR] [--budget SECONDS]
#
# Steps (tools/gpu_check.py has them; each runs under its own time limit, and one failing or
# timing out does not stop the others): the CUDA tests (tests/test_gpu.py); GPT-2 124M at seq 1024
# in bf16 (tokens/s, MFU against the GPU's dense bf16 peak, IronCore vs HF and the plain GPT);
# a ~1.2B LLaMA shape's MFU; flash-attn vs SDPA; recompute none/selective/full (step peak memory
# and tokens/s); a torch-profiled run and its `ironcore profile-summary --json`; the same run under
# nsys when nsys is on PATH. Every result carries the commands it ran.
#
# --dry-run: the same steps at tiny shapes in fp32 on CPU (< 90 s on a 2-core box); the CUDA-only
# parts are recorded as skipped with the reason. --out: the JSON file (default gpu_check.json).
# --work: where runs write traces and reports (default: a temporary folder, removed at the end).
# --budget: the whole check's limit in seconds (default 465); a step gets at most what is left.
# Exit status: 0 when no step failed, 1 otherwise (the JSON file is written either way), 2 on a
# usage error.
set -euo pipefail

cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python}"

dry=""
out="gpu_check.json"
work=""
budget=465
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) dry="--dry-run"; shift ;;
    --out) out="${2:?--out needs a path}"; shift 2 ;;
    --work) work="${2:?--work needs a folder}"; shift 2 ;;
    --budget) budget="${2:?--budget needs seconds}"; shift 2 ;;
    -h|--help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done
[[ "$budget" =~ ^[0-9]+$ ]] || { echo "gpu_check.sh: --budget must be whole seconds" >&2; exit 2; }

started=$(date +%s)
if [[ -z "$work" ]]; then
  work="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
  trap 'rm -rf "$work"' EXIT
fi
mkdir -p "$work/steps"
rm -f "$work"/steps/*.json

while read -r name limit; do
  left=$(( budget - ($(date +%s) - started) - 10 ))  # 10 s kept for the report
  if (( left < 5 )); then
    "$PY" tools/gpu_check.py mark "$name" --work "$work" --reason "not run: the check's ${budget} s budget was spent"
    continue
  fi
  (( limit > left )) && limit=$left
  echo "gpu_check: $name (limit ${limit} s)" >&2
  rc=0
  # The step stops its own commands at its limit; timeout is the backstop if the step itself hangs.
  timeout --kill-after=5 $(( limit + 5 )) "$PY" tools/gpu_check.py step "$name" --work "$work" --budget "$limit" $dry \
    > "$work/$name.log" 2>&1 || rc=$?
  if (( rc != 0 )); then
    reason="the step exited with status $rc"
    (( rc == 124 || rc == 137 )) && reason="killed at its ${limit} s limit"
    "$PY" tools/gpu_check.py mark "$name" --work "$work" --reason "$reason: $(tail -c 300 "$work/$name.log" | tr '\n' ' ')"
  fi
done < <("$PY" tools/gpu_check.py limits)

rc=0
"$PY" tools/gpu_check.py assemble --work "$work" --out "$out" --started "$started" $dry || rc=$?
exit $rc
