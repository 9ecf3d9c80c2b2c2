#!/usr/bin/env bash
# GPU measurements in one go (each part under a time limit, the whole under 8 min):
#   1. bf16 pretraining steps at 96³ for UNet and SwinUNETR (paper widths), batch 2, 4 and 8: lsmfm's
#      trainer step (benchmarks/pretrain_step.py), with the paper's step and the bare backbone at batch 2
#      (step_ratio_vs_paper, ssl_step_over_bare); FLOPs, TFLOP/s and MFU, peak CUDA memory;
#   2. the patch stream's feeding rate through the DataLoader with 8 workers (benchmarks/stream.py);
#   3. prediction voxels/s, blockwise `lsmfm predict` on the GPU (benchmarks/predict.py).
# Every part writes its JSON to OUT_DIR, and OUT_DIR/gpu.json holds them all.
#
#   bash benchmarks/gpu.sh OUT_DIR          # on a machine with a GPU
#   bash benchmarks/gpu.sh --dry OUT_DIR    # CPU, tiny UNet at 32³: the same script end to end (tests)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DRY=0
if [ "${1:-}" = "--dry" ]; then DRY=1; shift; fi
OUT=${1:?usage: benchmarks/gpu.sh [--dry] OUT_DIR}
mkdir -p "$OUT"

if [ "$DRY" = 1 ]; then
    # UNet only: tiny SwinUNETR needs 64³ (its bottleneck instance norm), minutes per step on a CPU
    DEVICE=cpu SIZE=32 ARCHS="unet" BATCHES="2" STEPS=1 EXTRA="--tiny --threads 1" WORKERS=2 PATCHES=8
    PREDICT="--sizes 80 --blocks 64 --threads 1" LIMIT=300 TOTAL=1500
else
    DEVICE=cuda SIZE=96 ARCHS="unet swinunetr" BATCHES="2 4 8" STEPS=3 EXTRA="" WORKERS=8 PATCHES=96
    PREDICT="--sizes 256 --blocks 128" LIMIT=150 TOTAL=470
fi
start=$(date +%s)

limit() {  # a part's timeout: LIMIT, or less where the whole would pass TOTAL seconds
    local left=$(( start + TOTAL - $(date +%s) ))
    if [ "$left" -gt "$LIMIT" ]; then left=$LIMIT; fi
    if [ "$left" -lt 1 ]; then left=1; fi
    echo "$left"
}

first=1
for batch in $BATCHES; do
    variants="lsmfm"
    if [ "$first" = 1 ]; then variants="bare paper lsmfm"; first=0; fi
    # shellcheck disable=SC2086  # word splitting of the option lists is intended
    timeout "$(limit)" "$PY" benchmarks/pretrain_step.py --device "$DEVICE" --size "$SIZE" --batch "$batch" \
        --steps "$STEPS" --archs $ARCHS --variants $variants --mask-repeats 5 $EXTRA \
        --json "$OUT/step_batch$batch.json"
done
timeout "$(limit)" "$PY" benchmarks/stream.py --data synthetic --layout sharded --workers "$WORKERS" \
    --n "$PATCHES" --json "$OUT/stream.json"
# shellcheck disable=SC2086
timeout "$(limit)" "$PY" benchmarks/predict.py --device "$DEVICE" $PREDICT --ranks 1 --in-memory-up-to 0 \
    --json "$OUT/predict.json"

"$PY" - "$OUT" "$(( $(date +%s) - start ))" "$DRY" <<'EOF'
import json, sys
from pathlib import Path

out, seconds, dry = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
steps = {p.stem.removeprefix("step_"): json.loads(p.read_text()) for p in sorted(out.glob("step_batch*.json"))}
stream = json.loads((out / "stream.json").read_text())
predict = json.loads((out / "predict.json").read_text())
loader = next(k for k in stream if k.startswith("lsmfm_loader_") and k.endswith("_patches_per_s"))
rows = [{"arch": a, "batch": r["batch"], "seconds_per_step": r[a]["lsmfm"]["seconds_per_step"],
         "patches_per_s": r["batch"] / r[a]["lsmfm"]["seconds_per_step"],
         "tflops_per_s": r[a]["lsmfm"]["tflops_per_s"], "mfu": r[a]["lsmfm"].get("mfu"),
         "peak_memory_mb": r[a]["lsmfm"].get("peak_memory_mb", r[a]["lsmfm"].get("peak_rss_mb"))}
        for r in steps.values() for a in ("unet", "swinunetr") if a in r]
first = steps[min(steps, key=lambda k: int(k.removeprefix("batch")))]
summary = {"dry_run": dry, "wall_seconds": seconds, "device": first["device"], "gpu": first.get("gpu"),
           "size": first["size"], "precision": first["precision"], "steps": rows,
           "step_ratio_vs_paper": first.get("step_ratio_vs_paper"),
           "ssl_step_over_bare": first.get("ssl_step_over_bare"),
           "mask_speedup_vs_paper": first["mask_speedup_vs_paper"],
           "stream_loader_patches_per_s": stream[loader], "stream_loader": loader,
           "predict_voxels_per_s": [r["voxels_per_s"] for r in predict["rows"]],
           "parts": {"steps": steps, "stream": stream, "predict": predict}}
(out / "gpu.json").write_text(json.dumps(summary, indent=1) + "\n")
for r in rows:
    print(f"{r['arch']:<10} batch {r['batch']}: {r['seconds_per_step']:.3f} s/step, {r['patches_per_s']:.1f} "
          f"patches/s, {r['tflops_per_s']:.1f} TFLOP/s, MFU {r['mfu'] if r['mfu'] is None else round(r['mfu'], 3)}")
print(f"stream ({loader}): {stream[loader]:.1f} patches/s; predict: "
      f"{', '.join(f'{v / 1e6:.2f}' for v in summary['predict_voxels_per_s'])} Mvoxel/s; {seconds} s in all")
EOF
