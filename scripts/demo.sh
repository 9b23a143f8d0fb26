#!/usr/bin/env bash
# The main job end to end on CPU: convert the ISBI data (or a synthetic volume when it is
# missing), describe the store, train on 2 ranks under torchrun, predict the validation slices on
# 2 ranks, evaluate them, write the report PNGs and a neuroglancer screenshot. Both ranks stay on the CPU (train.device in the
# config, --device cpu here) even where a GPU is visible: two ranks cannot share one GPU.
set -euo pipefail
out=${1:-runs/demo}
isbi=${UNET_DIST_ISBI_DIR:-data/isbi2012}
config=${DEMO_CONFIG:-configs/isbi2012_cpu.yaml}
mkdir -p "$out"

if ! { [ -f "$isbi/train-volume.tif" ] && [ -f "$isbi/train-labels.tif" ]; }; then
  echo "== ISBI data not in '$isbi': fetching it (unet-dist fetch isbi2012, SHA-256 checked)"
  unet-dist fetch isbi2012 --dir "$isbi" || echo "== could not fetch the ISBI data (see the line above)"
fi
if [ -f "$isbi/train-volume.tif" ] && [ -f "$isbi/train-labels.tif" ]; then
  store="$out/isbi2012.zarr"
  echo "== convert: ISBI 2012 from $isbi"
  unet-dist convert --raw "$isbi/train-volume.tif" --labels "$isbi/train-labels.tif" \
    --resolution 50,4,4 --out "$store" --overwrite
else
  store="$out/synth.zarr"
  echo "== NOT the real data: no ISBI files in '$isbi' (set UNET_DIST_ISBI_DIR, or fetch them when the network answers); using a synthetic EM-like volume, whose scores mean little"
  unet-dist synth --out "$store" --shape 30,512,512 --seed 0 --overwrite
fi

echo "== info"
unet-dist info "$store"

echo "== train: 2 ranks (gloo, CPU) under torchrun, $config"
rm -rf "$out/run"  # the demo starts a fresh run each time
WANDB_MODE=${WANDB_MODE:-offline} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} \
  torchrun --standalone --nproc_per_node=2 -m unet_dist train --config "$config" \
  data.store="$store" run.dir="$out/run"
run="$out/run"
echo "== predict: validation slices 25:30 with the best checkpoint, 2 ranks under torchrun"
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} torchrun --standalone --nproc_per_node=2 -m unet_dist predict \
  --checkpoint "$run/checkpoints/best.pt" --input "$store" --labels "$store" --slices 25:30 \
  --out "$out/pred.zarr" --overwrite --device cpu predict.batch_size=1

echo "== segment: neurons per slice (watershed + merge of the membrane probability), 2 ranks under torchrun"
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} torchrun --standalone --nproc_per_node=2 -m unet_dist segment \
  --pred "$out/pred.zarr" --overwrite

echo "== evaluate: Dice, pixel error and the ISBI challenge's V_rand / V_info (of the threshold and of the neurons)"
unet-dist evaluate --pred "$out/pred.zarr" --labels "$store" --slices 25:30 --json "$out/evaluation.json"

echo "== report: slice grid and training curves"
unet-dist report "$run" --pred "$out/pred.zarr" --store "$store" --slices 25:30
echo "== view: raw, labels, probability and mask in neuroglancer, as a headless screenshot"
if command -v chromium >/dev/null; then
  unet-dist view "$store" "$out/pred.zarr" --slices 25:30 --screenshot "$run/report/view.png" >/dev/null
else
  echo "   (chromium not installed: skipped; 'unet-dist view $store $out/pred.zarr' serves it to a browser)"
fi
echo "== done: $run (config.yaml, checkpoints/, metrics.jsonl, wandb/, report/*.png), $out/pred.zarr, $out/evaluation.json"
