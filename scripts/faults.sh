#!/usr/bin/env bash
# Fault drills, end to end through experiments/run.py: kill -9, SIGINT, SIGTERM, damaged
# checkpoints (truncated, bit-flipped, empty _METADATA), a partial or deleted metrics.jsonl,
# a moved run folder, a concurrent launch and a diverging LR. Every recovered run must equal
# an uninterrupted one: same metrics rows (minus seconds) and the same sha256 of every array of
# the final checkpoint. Prints a table; exits 1 if any drill fails.
#   bash scripts/faults.sh [drill ...]   (PYTHON=... picks the interpreter; ~1–2 min)
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-$ROOT/.venv/bin/python}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" JAX_PLATFORMS=cpu TF_CPP_MIN_LOG_LEVEL=3
WORK=$(mktemp -d "${TMPDIR:-/tmp}/sparsefl_faults.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
T=300   # rounds of every run; a tiny model makes each round a few milliseconds
FLAGS=(--dataset=synthetic --model=linear --synthetic_shape=6,6,1 --synthetic_classes=4
       --synthetic_examples=12 --synthetic_test=40 --num_clients=4 --clients_per_round=2
       --batch_size=5 --local_epochs=2 --lr=0.2 --momentum=0.5 --server_optimizer=adam
       --eval_every=1 --checkpoint_every=30 --keep_checkpoints=3 --noprogress --rounds=$T)
ROWS=()
FAILED=0
START_ALL=$(date +%s.%N)

launch() {  # launch WORKDIR [flags...]: runs in the background, sets PID
  local dir=$1; shift
  "$PY" experiments/run.py "${FLAGS[@]}" --workdir="$dir" "$@" >"$dir.out" 2>"$dir.err" &
  PID=$!
}

run_fg() {  # run_fg WORKDIR [flags...]: runs to the end, sets RC
  local dir=$1; shift
  "$PY" experiments/run.py "${FLAGS[@]}" --workdir="$dir" "$@" >"$dir.out" 2>"$dir.err"
  RC=$?
}

wait_rows() {  # wait_rows WORKDIR N: until metrics.jsonl has N rows (or the run ended)
  local i
  for i in $(seq 2400); do
    [[ -f $1/metrics.jsonl ]] && (( $(wc -l <"$1/metrics.jsonl") >= $2 )) && return 0
    kill -0 "$PID" 2>/dev/null || return 1
    sleep 0.05
  done
  return 1
}

latest_ckpt() { ls "$1/checkpoints" 2>/dev/null | grep -E '^[0-9]+$' | sort -n | tail -1; }

same_as_ref() {  # same_as_ref WORKDIR [FROM_ROUND]: rows (from FROM_ROUND on) and final arrays
  "$PY" - "$WORK/ref" "$1" "${2:-1}" <<'EOF'
import json, os, sys
ref, got, first = sys.argv[1], sys.argv[2], int(sys.argv[3])
def rows(d):
  out = []
  for line in open(os.path.join(d, "metrics.jsonl")):
    r = json.loads(line, parse_constant=lambda c: sys.exit(f"bare {c} in {d}"))
    r.pop("seconds", None)
    if r["round"] >= first:
      out.append(r)
  return out
def sums(d):
  steps = [int(s) for s in os.listdir(os.path.join(d, "checkpoints")) if s.isdigit()]
  with open(os.path.join(d, "checkpoints", str(max(steps)), "meta", "metadata")) as f:
    meta = json.load(f)
  return meta["round"], meta["sha256"], meta["counters"]
a, b = rows(ref), rows(got)
if a != b:
  sys.exit(f"metrics differ: {len(a)} vs {len(b)} rows")
if sums(ref) != sums(got):
  sys.exit("final checkpoint differs")
EOF
}

record() {  # record NAME EXPECTED GOT OK SECONDS
  ROWS+=("$1|$2|$3|$4|$5")
  [[ $4 == ok ]] || FAILED=1
}

drill() {  # drill NAME: times the function drill_NAME; it sets EXPECT, GOT and OK
  local t0 t1
  t0=$(date +%s.%N)
  EXPECT=""; GOT=""; OK=FAIL
  "drill_$1"
  t1=$(date +%s.%N)
  record "$1" "$EXPECT" "$GOT" "$OK" "$(printf '%.1f' "$(echo "$t1 - $t0" | bc)")"
}

interrupted_run() {  # interrupted_run DIR ROWS: a run killed with -9 after ROWS rows
  launch "$1"
  wait_rows "$1" "$2"
  kill -9 "$PID" 2>/dev/null
  wait "$PID" 2>/dev/null
}

resume_and_compare() {  # resume_and_compare DIR [FROM_ROUND]: sets GOT/OK
  run_fg "$1" --resume
  if [[ $RC != 0 ]]; then GOT="resume rc=$RC: $(tail -1 "$1.err")"; return; fi
  if grep -q Traceback "$1.err"; then GOT="traceback on resume"; return; fi
  if msg=$(same_as_ref "$1" "${2:-1}" 2>&1); then OK=ok; GOT="${GOT:+$GOT; }resumed = reference"
  else GOT="${GOT:+$GOT; }$msg"; fi
}

drill_reference() {
  EXPECT="uninterrupted run, rc 0"
  run_fg "$WORK/ref"
  GOT="rc=$RC"; [[ $RC == 0 ]] && OK=ok
}

drill_kill9() {
  EXPECT="resume = reference"
  interrupted_run "$WORK/k9" 100    # checkpoints 30, 60, 90 (or later)
  cp -a "$WORK/k9" "$WORK/killed"   # the killed folder the file-damage drills start from
  GOT="killed after ckpt $(latest_ckpt "$WORK/k9")"
  resume_and_compare "$WORK/k9"
}

killed_copy() {  # killed_copy DIR: a copy of the run killed in drill kill9
  [[ -d $WORK/killed ]] || { interrupted_run "$WORK/killed" 100; }
  cp -a "$WORK/killed" "$1"
}

signal_drill() {  # signal_drill DIR SIGNAL CODE
  launch "$1"
  wait_rows "$1" 60
  kill "-$2" "$PID"
  wait "$PID"; local rc=$?
  GOT="rc=$rc, ckpt $(latest_ckpt "$1")"
  if [[ $rc != "$3" ]] || ! tail -1 "$1.err" | grep -q "checkpoint saved"; then
    GOT="$GOT: $(tail -1 "$1.err")"; return
  fi
  resume_and_compare "$1"
}

drill_sigint() { EXPECT="rc 130 + checkpoint; resume = ref"; signal_drill "$WORK/si" INT 130; }
drill_sigterm() { EXPECT="rc 143 + checkpoint; resume = ref"; signal_drill "$WORK/st" TERM 143; }

damage_drill() {  # damage_drill DIR KIND
  killed_copy "$1"
  local step; step=$(latest_ckpt "$1")
  "$PY" - "$1/checkpoints/$step" "$2" <<'EOF'
import glob, os, sys
step_dir, kind = sys.argv[1], sys.argv[2]
if kind == "empty_metadata":
  open(os.path.join(step_dir, "state", "_METADATA"), "w").close()
for path in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True):
  data = bytearray(open(path, "rb").read())
  if kind == "truncate":
    data = data[:len(data) // 2]
  elif kind == "bitflip":
    data[len(data) // 2] ^= 0x04
  open(path, "wb").write(bytes(data))
EOF
  resume_and_compare "$1"
  if grep -q "checkpoints/$step is damaged" "$1.err"; then GOT="ckpt $step damaged -> fallback; $GOT"
  else OK=FAIL; GOT="no damage warning; $GOT"; fi
}

drill_truncated_ckpt() { EXPECT="warn, fall back, resume = ref"; damage_drill "$WORK/tr" truncate; }
drill_bitflip_ckpt() { EXPECT="detected, fall back, resume = ref"; damage_drill "$WORK/bf" bitflip; }
drill_empty_metadata() { EXPECT="warn, fall back, resume = ref"; damage_drill "$WORK/em" empty_metadata; }

drill_partial_metrics() {
  EXPECT="partial last line dropped; resume = ref"
  killed_copy "$WORK/pm"
  printf '{"round": 999, "clients": [1,' >>"$WORK/pm/metrics.jsonl"
  GOT="partial line appended"
  resume_and_compare "$WORK/pm"
}

drill_missing_metrics() {
  EXPECT="recreated; counters from ckpt"
  killed_copy "$WORK/mm"
  local step; step=$(latest_ckpt "$WORK/mm")
  rm -f "$WORK/mm/metrics.jsonl"
  GOT="deleted at ckpt $step"
  resume_and_compare "$WORK/mm" $((step + 1))
}

drill_moved_workdir() {
  EXPECT="moved folder resumes = ref"
  killed_copy "$WORK/mv"
  mkdir -p "$WORK/moved"
  mv "$WORK/mv" "$WORK/moved/run"
  GOT="moved after ckpt $(latest_ckpt "$WORK/moved/run")"
  resume_and_compare "$WORK/moved/run"
}

drill_concurrent() {
  EXPECT="2nd launch rc 2; 1st loses no row"
  launch "$WORK/cc" --rounds=1000000   # long enough to be busy whatever the machine
  local first=$PID
  wait_rows "$WORK/cc" 20
  "$PY" experiments/run.py "${FLAGS[@]}" --workdir="$WORK/cc" --resume >"$WORK/cc2.out" \
      2>"$WORK/cc2.err"
  local rc2=$?
  kill -INT "$first"
  wait "$first"; local rc1=$?
  GOT="2nd rc=$rc2, 1st rc=$rc1 at ckpt $(latest_ckpt "$WORK/cc")"
  if [[ $rc2 == 2 && $rc1 == 130 ]] && grep -q "is in use by pid $first" "$WORK/cc2.err"; then
    # Rows 1..stop, each once: the second launch deleted or duplicated nothing.
    if "$PY" -c 'import json,sys; r=[json.loads(l)["round"] for l in open(sys.argv[1])];
sys.exit(r != list(range(1, len(r) + 1)) or r[-1] != int(sys.argv[2]))' \
        "$WORK/cc/metrics.jsonl" "$(latest_ckpt "$WORK/cc")"; then
      OK=ok; GOT="$GOT; rows 1..stop intact"
    else GOT="$GOT; rows lost or duplicated"; fi
  else
    GOT="$GOT: $(tail -1 "$WORK/cc2.err")"
  fi
}

drill_divergence() {
  EXPECT="rc 3, one line, no NaN ckpt"
  run_fg "$WORK/dv" --lr=1e30 --checkpoint_every=1
  local line; line=$(tail -1 "$WORK/dv.err")
  GOT="rc=$RC, ckpts: $(ls "$WORK/dv/checkpoints" | tr '\n' ' ')"
  if [[ $RC == 3 && $line == "error: round 1: "*"not finite"* && -z $(latest_ckpt "$WORK/dv") ]]
  then OK=ok; else GOT="$GOT: $line"; fi
}

ALL=(reference kill9 sigint sigterm truncated_ckpt bitflip_ckpt empty_metadata
     partial_metrics missing_metrics moved_workdir concurrent divergence)
for d in "${@:-${ALL[@]}}"; do   # arguments pick drills (the comparisons need 'reference')
  drill "$d"
done

TOTAL=$(printf '%.0f' "$(echo "$(date +%s.%N) - $START_ALL" | bc)")
printf '\n%-16s | %-38s | %-6s | %5s | %s\n' drill expected result s got
printf '%s\n' "-----------------+----------------------------------------+--------+-------+------"
for r in "${ROWS[@]}"; do
  IFS='|' read -r name expect got ok secs <<<"$r"
  printf '%-16s | %-38s | %-6s | %5s | %s\n' "$name" "$expect" "$ok" "$secs" "$got"
done
echo "faults.sh: ${#ROWS[@]} drills in ${TOTAL} s, $([[ $FAILED == 0 ]] && echo all passed || echo FAILURES)"
exit $FAILED
