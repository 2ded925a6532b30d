#!/usr/bin/env bash
# Every accelerator figure the sampler and trainer issues ask for, in one
# device call, from the repository root of the device machine:
#
#   bash launch/device_bench.sh [sample] [train] [lora8b]     (default: all three)
#
# `sample`: launch.bench --what=sample --peer --lora (A = 1, 2, 4, 8, roofline, vs
# sequential, vs HF generate, LoRA populations); `train`: --what=train --peer (MFU, vs
# sequential, LoRA rows, vs the compiled PyTorch peer); `lora8b`: LoRA rank 16
# for 8 agents of a Llama-3-8B-shaped model on one card (memory and tok/s).
# The peers are benchmarks/peers/hf_{generate,train}_peer.py, run with $PY:
# it needs a CUDA torch and transformers for them (benchmarks/peers/README.md).
# Wheels staged in .whl (../shared/bin/stage-wheels) are installed first.
# Full logs go to $OUT (default /tmp/device_bench), with the card's compiled
# HLO of the decode loop and train step (gzipped, to check offline for copies
# of weights or cache in the step); the tails print last.
# TINY=1 runs the CPU-sized versions (a smoke test of this script).
set -uo pipefail
OUT=${OUT:-/tmp/device_bench}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD"
fi
export PYTHONPATH="${PYTHONPATH:-$PWD}"
PY=${PY:-python3}
tiny=()
[ -n "${TINY:-}" ] && tiny=(--tiny)
{ nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || true; } > "$OUT/card.txt" 2>&1
date -u +%FT%TZ >> "$OUT/card.txt"
: > "$OUT/status.txt"

bench() {  # name, launch.bench flags...
  local name=$1
  shift
  timeout "${LIMIT:-280}" "$PY" -m launch.bench "$@" "${tiny[@]}" > "$OUT/$name.log" 2>&1
  echo "$name: exit $? ($*)" >> "$OUT/status.txt"
}

jobs_=("$@")
[ ${#jobs_[@]} -eq 0 ] && jobs_=(sample train lora8b)
for job in "${jobs_[@]}"; do
  case $job in
    sample) bench sample --what=sample --peer --lora --dump_hlo="$OUT/decode_hlo.txt.gz" ;;
    train) bench train --what=train --peer --dump_hlo="$OUT/train_hlo.txt.gz" ;;
    lora8b) bench lora8b --what=train --lora_only --arch=llama-3-8b --agents=8 --train_batch=4 \
                         --repeats=2 ;;
    *) echo "unknown job $job (sample, train, lora8b)" >&2; exit 2 ;;
  esac
done
cat "$OUT/card.txt" "$OUT/status.txt"
for job in "${jobs_[@]}"; do
  echo "== $job"
  tail -n 16 "$OUT/$job.log"
done
