#!/usr/bin/env bash
# The one command for a GPU machine: the GPU tests, then the benchmarks (mixed attention, the
# assignment solver, the Croc step vs the plain GPT step), each under its own timeout, so one
# part failing or hanging never stops the others. Full logs and JSON go to $OUT; the tables are
# printed again at the end. Exit status 0 only if every part passed.
#
#   OUT=/some/dir bash bench/gpu_suite.sh          # GPU machine: ~4-6 min on an H100, 7 min at most
#   OUT=/tmp/suite bash bench/gpu_suite.sh --cpu   # the same plumbing at toy size on a CPU (~1 min)
#
# Needs torch and megatron-core importable by $PYTHON (default: python, else python3); this
# repository is put on PYTHONPATH (no install needed). Per-part timeouts (seconds) can be
# overridden: T_TESTS, T_ATTN, T_ASSIGN, T_STEP, and the whole budget: SUITE_BUDGET_S (480 on a
# GPU; every part keeps a minimum, so below ~300 s the total runs over it). SUITE_PARTS limits
# the parts run (default all: "gpu_tests bench_attention bench_assignment bench_step").
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
OUT=${OUT:-$ROOT/bench_out}
mkdir -p "$OUT"
PYTHON=${PYTHON:-$(command -v python || command -v python3)}

MODE=gpu
if [ "${1:-}" = "--cpu" ]; then MODE=cpu; fi
if [ "$MODE" = gpu ]; then
  DEV_ARGS=(--device cuda)
  TINY=()
  # Each part's timeout is its default below, shortened when needed so that the parts after
  # it keep their minimum (MIN_*) within SUITE_BUDGET_S; the benchmarks skip their
  # optional work past their own budget (and print what they measured when
  # killed by the timeout). Worst case: SUITE_BUDGET_S (8 min) plus the kill grace.
  SUITE_BUDGET_S=${SUITE_BUDGET_S:-480}
  T_TESTS=${T_TESTS:-180}; T_ATTN=${T_ATTN:-100}; T_ASSIGN=${T_ASSIGN:-45}; T_STEP=${T_STEP:-155}
  MIN_ATTN=45; MIN_ASSIGN=30; MIN_STEP=125
else
  export CUDA_VISIBLE_DEVICES=""
  DEV_ARGS=(--device cpu)
  TINY=(--tiny)
  SUITE_BUDGET_S=${SUITE_BUDGET_S:-600}
  T_TESTS=${T_TESTS:-120}; T_ATTN=${T_ATTN:-60}; T_ASSIGN=${T_ASSIGN:-60}; T_STEP=${T_STEP:-90}
  MIN_ATTN=30; MIN_ASSIGN=30; MIN_STEP=60
fi

SUITE_START=$(date +%s)
DEADLINE=$((SUITE_START + SUITE_BUDGET_S))

limit_for() {  # default_timeout reserve_for_later_parts -> the timeout to use (>= 20 s)
  local left=$(( DEADLINE - $(date +%s) - $2 )) lim=$1
  [ "$left" -lt "$lim" ] && lim=$left
  [ "$lim" -lt 20 ] && lim=20
  echo "$lim"
}
{
  echo "gpu_suite ($MODE) at $(date -u +%Y-%m-%dT%H:%M:%SZ) in $ROOT, git $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  if command -v nvidia-smi >/dev/null 2>&1 && [ "$MODE" = gpu ]; then
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.sm,power.limit,temperature.gpu,utilization.gpu \
      --format=csv 2>&1 | head -5
  fi
  PYTHONWARNINGS=ignore "$PYTHON" - <<'EOF' 2>&1 | grep -v "^W[0-9]\|warn"
import importlib.util, sys, torch
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, cuda available {torch.cuda.is_available()}",
      f"({torch.cuda.get_device_name()})" if torch.cuda.is_available() else "")
for name in ("megatron.core", "transformer_engine", "apex", "scipy", "triton"):
    try:
        found = importlib.util.find_spec(name) is not None
    except Exception:
        found = False
    version = ""
    if found and name in ("megatron.core", "triton", "scipy"):
        try:
            version = __import__(name, fromlist=["__version__"]).__version__
        except Exception:
            pass
    print(f"  {name}: {'yes ' + version if found else 'no'}")
EOF
} | tee "$OUT/env.txt"

declare -a NAMES STATUS SECONDS_TAKEN
FAILED=0
SUITE_PARTS=${SUITE_PARTS:-gpu_tests bench_attention bench_assignment bench_step}

wanted() { case " $SUITE_PARTS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

run_part() {  # name timeout_s command...
  local name=$1 limit=$2; shift 2
  local t0 rc
  if ! wanted "$name"; then
    echo "(not run: $name is not in SUITE_PARTS)" >"$OUT/$name.log"
    NAMES+=("$name"); STATUS+=("not run"); SECONDS_TAKEN+=(0)
    return
  fi
  t0=$(date +%s)
  echo ">>> [$name] timeout ${limit}s: $*"
  timeout -k 10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  local dt=$(( $(date +%s) - t0 ))
  local status=ok
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status="TIMEOUT(${limit}s)"; elif [ $rc -ne 0 ]; then status="FAILED(rc=$rc)"; fi
  [ "$status" = ok ] || FAILED=1
  NAMES+=("$name"); STATUS+=("$status"); SECONDS_TAKEN+=("$dt")
  echo "<<< [$name] $status in ${dt}s (log: $OUT/$name.log; total so far $(( $(date +%s) - SUITE_START ))s)"
}

# 1. GPU tests (skipped on a CPU)
L=$(limit_for "$T_TESTS" $((MIN_ATTN + MIN_ASSIGN + MIN_STEP)))
run_part gpu_tests "$L" "$PYTHON" -m pytest -q -p no:cacheprovider tests/gpu --durations=8

# 2. mixed vs causal attention (also warms the compile cache for the step benchmark's shape)
L=$(limit_for "$T_ATTN" $((MIN_ASSIGN + MIN_STEP)))
run_part bench_attention "$L" "$PYTHON" bench/bench_attention.py "${DEV_ARGS[@]}" "${TINY[@]}" \
  --budget-s $((L - 35)) --json-out "$OUT/bench_attention.json"

# 3. the assignment solver vs scipy (bench/bench_assignment.py)
L=$(limit_for "$T_ASSIGN" "$MIN_STEP")
run_part bench_assignment "$L" "$PYTHON" bench/bench_assignment.py "${DEV_ARGS[@]}" --json-out "$OUT/bench_assignment.json"

# 4. the Croc step vs the plain GPT step (the optional local-spec and TE rows only if time allows)
L=$(limit_for "$T_STEP" 0)
run_part bench_step "$L" "$PYTHON" bench/bench_step.py "${DEV_ARGS[@]}" "${TINY[@]}" \
  --budget-s $((L - 45)) --json-out "$OUT/bench_step.json"

# ---- summary: the tables again, last in the output ----
show_between() {  # file start-pattern end-pattern
  sed -n "/$2/,/$3/p" "$1" 2>/dev/null
}
echo
echo "################ gpu_suite summary ($MODE) ################"
head -12 "$OUT/env.txt"
echo
echo "--- GPU tests ---"
grep -E "passed|failed|error|skipped|FAILED|ERROR" "$OUT/gpu_tests.log" | grep -v "warnings.warn" | tail -12
echo
echo "--- bench_attention ---"
show_between "$OUT/bench_attention.log" "^=== attention table" "^=== end attention table" | grep -q . \
  && show_between "$OUT/bench_attention.log" "^=== attention table" "^=== end attention table" \
  || tail -25 "$OUT/bench_attention.log"
echo
echo "--- bench_assignment (last lines) ---"
grep -v "warnings.warn\|UserWarning" "$OUT/bench_assignment.log" | tail -20
echo
echo "--- bench_step ---"
show_between "$OUT/bench_step.log" "^=== step table" "^=== end step table" | grep -q . \
  && show_between "$OUT/bench_step.log" "^=== step table" "^=== end step table" \
  || tail -30 "$OUT/bench_step.log"
echo
echo "--- parts ---"
for i in "${!NAMES[@]}"; do
  printf '  %-18s %-18s %5ss\n' "${NAMES[$i]}" "${STATUS[$i]}" "${SECONDS_TAKEN[$i]}"
done | tee "$OUT/status.txt"
echo "  total $(( $(date +%s) - SUITE_START ))s; logs and JSON in $OUT"
exit $FAILED
