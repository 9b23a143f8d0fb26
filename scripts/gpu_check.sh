#!/usr/bin/env bash
# The prepared device check for the first GPU machine (issue 15), in one command with a hard deadline:
#
#   scripts/gpu_check.sh OUTDIR             one GPU: machine, CUDA-marked tests, bench train (MFU),
#                                           bench predict vs MONAI on 1.07 Gvoxel, the ISBI GPU recipe for
#                                           a few minutes then predict + evaluate slices 25-29; 8 minutes
#   scripts/gpu_check.sh --dry-run OUTDIR   the same steps and JSON on the CPU at tiny sizes (CI runs it)
#   make gpu-check GPU_CHECK_DIR=OUTDIR
#
# Every result is JSON under OUTDIR (one file per step + summary.json), logs in OUTDIR/logs/, one summary
# line per step on stdout; exit 0 when every step is ok. See scripts/gpu_check.py for the steps.
#
# The machine needs no network and no virtual environment: the Python that has torch with CUDA
# (UNET_DIST_PYTHON, default python3), the extra wheels installed beforehand with
#   pip install --no-index --no-deps --target DIR zarr numcodecs donfig google-crc32c msgspec submitit monai
# and DIR on PYTHONPATH; this checkout is put first on PYTHONPATH here. W&B stays disabled (wandb need
# not be installed, and nothing may import it). The ISBI data: $UNET_DIST_ISBI_DIR.
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${UNET_DIST_PYTHON:-python3}"
limit=470  # with --kill-after=10: 8 minutes at most (the steps stop by 455 s + 10 s to end a child)
for arg in "$@"; do [[ "$arg" == --dry-run ]] && limit=960; done
command -v "$PY" >/dev/null || { echo "gpu_check: '$PY' not found (set UNET_DIST_PYTHON)" >&2; exit 2; }
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
exec timeout --kill-after=10 "$limit" "$PY" "$here/scripts/gpu_check.py" "$@"
