#!/usr/bin/env bash
# One GPU run for issue "GPU run": train OA-MEN and the paper's baselines under one protocol and
# budget inside a fixed time limit, and leave a few bounded files in $OUT.
#
#   Prepare here:  python -m ops.stage_gpu_data --out gpu_stage   (lossy copy, < 64 MiB)
#   Run there:     OUT=... MINUTES=1.5 bash scripts/gpu_run.sh        (device tool, carry gpu_stage)
#   Tiny CPU check: OUT=/tmp/gpu_out DATA=tests-tiny QUICK=1 bash scripts/gpu_run.sh
#
# The device has PyTorch 2.11, torchvision and timm but no internet: the script checks every
# other import first and stops with the list of what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to the folder whose files come back}
DATA=${DATA:-gpu_stage}
MINUTES=${MINUTES:-1.5}          # per model; 6 models + 2 ablations must fit the device budget
MODELS=${MODELS:-"oamen xception mobilenet_v2 resnet18 densenet121 nasnet"}
PY=${PY:-python3}
missing=$($PY - <<'PY'
import importlib.util as u
need = ["torch", "torchvision", "timm", "cv2", "numpy", "sklearn", "tqdm", "matplotlib", "pydicom"]
print(" ".join(n for n in need if u.find_spec(n) is None))
PY
)
if [ -n "$missing" ]; then
  echo "missing Python packages on this machine: $missing (no internet here: carry wheels or a venv)" >&2
  exit 3
fi
$PY -c "import torch; print('device:', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"
extra=()
[ "${QUICK:-0}" = 1 ] && extra+=(--quick)
start=$(date +%s)
$PY -m train.compare --data "$DATA" --out "$OUT/compare" --models $MODELS --ablations \
    --time-limit "$MINUTES" --epochs 60 --batch-size "${BATCH:-64}" --workers "${WORKERS:-8}" --no-speed "${extra[@]}"
echo "total seconds: $(( $(date +%s) - start ))"
# At most 8 files of 16 MiB come back: everything small in one tarball, OA-MEN's weights stored in
# float16 (train.evaluate and train.export load them back as float32) and split in 15 MiB parts.
cp "$OUT/compare/compare.md" "$OUT/compare/compare.json" "$OUT/compare/oamen/curves.png" "$OUT/"
$PY - "$OUT/compare/oamen/best.pt" "$OUT/oamen_best_fp16.pt" <<'PY'
import sys, torch
state = torch.load(sys.argv[1], map_location="cpu", weights_only=True)
state["model"] = {k: v.half() if v.is_floating_point() else v for k, v in state["model"].items()}
torch.save(state, sys.argv[2])
PY
tar -czf "$OUT/runs.tgz" -C "$OUT/compare" --exclude='*.pt' .
rm -rf "$OUT/compare"
split -b 15m -d "$OUT/oamen_best_fp16.pt" "$OUT/oamen_best_fp16.pt.part"
rm "$OUT/oamen_best_fp16.pt"
ls -la "$OUT"
echo "here: cat oamen_best_fp16.pt.part* > oamen_best_fp16.pt, then train.evaluate --checkpoint it on the PNGs"
