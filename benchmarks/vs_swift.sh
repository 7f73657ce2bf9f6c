#!/usr/bin/env bash
# winnow sample vs ms-swift's swift sample, side by side on the same tiny offline model and data.
#
#   bash benchmarks/vs_swift.sh            # needs the peer installed: bash ../shared/peers/ms-swift/run_peer_bench.sh
#   SKIP_SLOW=1 bash benchmarks/vs_swift.sh   # skip swift at its defaults (about 5 minutes)
#
# Workload (issue 2): the peer's `small` Qwen2 model (34M params), data/math.jsonl (32 prompts),
# 8 samples x 64 new tokens, temperature 1, top-k 50. Wall time of the whole command, start-up
# included, for: winnow at its defaults; swift at its defaults (engine batch size 1); swift at its
# best setting (all 256 sequences in one batch). Runs alternate; medians are printed.
set -uo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
PEERS=${PEERS:-$REPO/../shared/peers/ms-swift}
ROOT=${ROOT:-$HOME/.cache/winnow-peers/ms-swift}
REPEATS=${REPEATS:-3}
SWIFT=$ROOT/venv/bin/swift
WINNOW=${WINNOW:-$REPO/.venv/bin/winnow}
[ -x "$SWIFT" ] || { echo "ms-swift is not installed under $ROOT; run: bash $PEERS/run_peer_bench.sh (or its install step)"; exit 1; }
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONHASHSEED=0
if [ ! -f "$ROOT/small/model.safetensors" ]; then
  "$ROOT/venv/bin/python" "$PEERS/make_tiny_model.py" --root "$ROOT" --force > /dev/null 2>&1
fi
[ -f "$ROOT/data/math.jsonl" ] || "$ROOT/venv/bin/python" "$PEERS/make_data.py" "$ROOT" > /dev/null
OUT=$(mktemp -d)
W=(--num_return_sequences 8 --dataset "$ROOT/data/math.jsonl" --dataset_shuffle false --max_new_tokens 64
   --temperature 1.0 --top_k 50 --top_p 1.0)
SW=(--model "$ROOT/small" --model_type qwen2 --template qwen --sampler_engine transformers)

timeit() {  # NAME -- command... ; prints seconds
  local name=$1; shift 2
  local t0 t1
  t0=$(date +%s.%N)
  "$@" > "$OUT/$name.log" 2>&1 || { echo "FAILED: $name (see $OUT/$name.log)" >&2; tail -3 "$OUT/$name.log" >&2; }
  t1=$(date +%s.%N)
  awk "BEGIN{printf \"%.2f\", $t1 - $t0}"
}

declare -A times
for r in $(seq 1 "$REPEATS"); do
  w=$(timeit winnow.$r -- "$WINNOW" sample --model "$ROOT/small" "${W[@]}" --output_dir "$OUT/w$r" --progress false)
  s=$(timeit swift_best.$r -- "$SWIFT" sample "${SW[@]}" --engine_kwargs '{"template_type":"qwen","max_batch_size":0}' \
      --num_sampling_batch_size 32 "${W[@]}" --output_dir "$OUT/sb$r" --output_file s.jsonl)
  times[winnow]+="$w "
  times[swift_best]+="$s "
  echo "repeat $r: winnow ${w}s, swift at its best setting ${s}s"
done
if [ "${SKIP_SLOW:-0}" != 1 ]; then
  times[swift_default]="$(timeit swift_default -- "$SWIFT" sample "${SW[@]}" --engine_kwargs '{"template_type":"qwen"}' "${W[@]}" --output_dir "$OUT/sd" --output_file s.jsonl)"
fi
python3 - "$OUT" <<PY
import json, statistics, sys
t = {k: [float(x) for x in v.split()] for k, v in {"winnow": "${times[winnow]}", "swift_best": "${times[swift_best]}",
     "swift_default": "${times[swift_default]:-}"}.items() if v.strip()}
med = {k: statistics.median(v) for k, v in t.items()}
lines = sum(1 for _ in open(next(__import__("pathlib").Path(sys.argv[1]).glob("w1/*.jsonl"))))
out = {"benchmark": "vs_swift", "runs_s": t, "median_s": {k: round(v, 1) for k, v in med.items()}, "winnow_lines": lines}
out["winnow_over_swift_best"] = round(med["winnow"] / med["swift_best"], 3)
if "swift_default" in med:
    out["winnow_over_swift_default"] = round(med["winnow"] / med["swift_default"], 3)
print(json.dumps(out))
PY
