#!/usr/bin/env bash
# One GPU run for issue "GPU run", inside a fixed time budget, leaving at most 8 bounded files in $OUT:
#   1. the request path's GPU throughput (python -m ops.bench gpu), alone on the machine;
#   2. OA-MEN with the ImageNet Lite0 branch (full-width trunk at 224 and 384 px, the served
#      half-width one at 224), Lite0 alone, the no-fusion ablation, and the paper's baselines
#      (Xception, MobileNetV2, ResNet-18, DenseNet-121, NASNet-A Large), all under one protocol:
#      30 epochs, batch 64, AdamW lr 1e-3, the same augmentation, loss and seed; five streams of
#      runs share the GPU and the 16 cores, each run with a time cap (see CAP_* below). The served
#      architecture and the full-width one at 384 px have a stream each and the long cap, so that
#      they can reach the 30 epochs (the first run, 2026-11-30, gave every run about 100 s and
#      the served one stopped at 15 epochs, bound by the CPU's augmentation);
#   3. the table of the best epoch of every run, the runs' curves, and the weights of two OA-MEN
#      runs in float16 (the knee gate's buffers left out: train.calibrate fits them here).
#
#   Prepare here:  python -m ops.stage_gpu_data --out /tmp/koa_stage && mkdir -p gpu_stage \
#                    && tar -czf gpu_stage/koa.tgz -C /tmp/koa_stage .   (train less the tune fold, val; 54 MiB)
#                  python -m ops.stage_gpu_data --travel gpu_stage   (what the run sends, against the 64 MiB limit:
#                    with the shipped grader it is about 92 MiB, so move weights/oamen.ckpt out of the checkout
#                    for the run, which does not read it, and back afterwards)
#   Run there:     OUT=... bash scripts/gpu_run.sh                 (device tool, carry gpu_stage)
#   CPU check:     OUT=/tmp/gpu_out DATA=/tmp/tiny QUICK=1 BUDGET_S=400 bash scripts/gpu_run.sh
#   Back here:     cat X_fp16.pt.part* > X_fp16.pt; train.evaluate / train.calibrate read it as float32
#
# The device has PyTorch, torchvision, timm, OpenCV, scikit-learn and matplotlib but no internet and
# no Java: the script checks the imports first and stops with the list of what is missing.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to the folder whose files come back}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
if [ -z "${DATA:-}" ] && [ -f gpu_stage/koa.tgz ]; then  # one file travels better than 6000
  mkdir -p /tmp/koa_stage && tar -xzf gpu_stage/koa.tgz -C /tmp/koa_stage && DATA=/tmp/koa_stage
fi
DATA=${DATA:?set DATA, or stage gpu_stage/koa.tgz}
BUDGET_S=${BUDGET_S:-540}        # the whole script, packaging included
EPOCHS=${EPOCHS:-30}
CAP_SMALL=${CAP_SMALL:-1.5}      # minutes per run in the streams of two or three runs
CAP_LARGE=${CAP_LARGE:-4.5}      # minutes for the one-run streams (the served model, 384 px); with the
                                 # throughput bench first, about 5.5 minutes are left for training
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2 KOA_LITE0_WEIGHTS=${KOA_LITE0_WEIGHTS:-$DATA/lite0_imagenet_fp16.pth}
start=$(date +%s)
left() { echo $(( BUDGET_S - ($(date +%s) - start) )); }
log="$OUT/run.log"
missing=$($PY - <<'PY'
import importlib.util as u
need = ["torch", "torchvision", "timm", "cv2", "numpy", "sklearn", "tqdm", "matplotlib"]
print(" ".join(n for n in need if u.find_spec(n) is None))
PY
)
if [ -n "$missing" ]; then
  echo "missing Python packages on this machine: $missing (no internet here: carry wheels)" | tee "$log" >&2
  exit 3
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  $PY -c "import torch, os; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'cores', os.cpu_count())"
} 2>&1 | tee "$log"

quick=()
bench=(--seconds 0.4 --drivers 4 --driver-batches 256)
if [ "${QUICK:-0}" = 1 ]; then quick=(--quick); bench=(--seconds 0.1 --batches 1 16 --path-images 64 --max-images 64); fi

if [ "${SKIP_BENCH:-0}" != 1 ]; then  # about 100 s, and up to a minute more for the 4 drivers
  echo "== 1. request-path throughput ($(left) s left)" | tee -a "$log"
  timeout 170 $PY -m ops.bench gpu --images "$DATA/val" --json "$OUT/bench_gpu.json" "${bench[@]}" 2>&1 \
    | grep -v '%|' | tee -a "$log"
fi

echo "== 2. training streams ($(left) s left)" | tee -a "$log"
common=(--data "$DATA" --tune-fraction 0 --no-eval --no-speed --no-save-last --epochs "$EPOCHS" --batch-size 64
        --lr 1e-3 --no-balance --workers 3 --seed 0 "${quick[@]}")
train_s=$(( $(left) - 50 ))   # every stream is stopped then, whatever it is doing, to leave time for step 3
stream() {  # name, cap, input size, models...
  local name=$1 cap=$2 size=$3; shift 3
  timeout "$train_s" $PY -m train.compare "${common[@]}" --time-limit "$cap" --input-size "$size" \
    --cache-dir "cache/$name" --out "runs_gpu/$name" --models "$@" > "runs_gpu/$name.log" 2>&1
  echo "stream $name finished: rc $? ($(left) s left)" | tee -a "$log"
}
mkdir -p runs_gpu
stream s384 "$CAP_LARGE" 384 oamen_pt_full &
stream served "$CAP_LARGE" 224 oamen_pt &
stream s224 "$CAP_SMALL" 224 oamen_pt_full efficientnet_lite0 oamen_pt_nofusion &
stream base "$CAP_SMALL" 224 xception mobilenet_v2 resnet18 &
stream base2 "$CAP_SMALL" 224 densenet121 nasnet &
wait
echo "training ended ($(left) s left)" | tee -a "$log"
for f in runs_gpu/*.log; do echo "--- $f"; grep -v '%|' "$f" | grep -E "epoch [0-9]+:|stopping|Error|error|Traceback" | tail -40; done >> "$log" 2>&1

echo "== 3. results ($(left) s left)" | tee -a "$log"
$PY - "$OUT" <<'PY' 2>&1 | tee -a "$log"
import json, sys, tarfile
from pathlib import Path
import torch
out = Path(sys.argv[1])
rows = []
for hist in sorted(Path("runs_gpu").glob("*/*/history.json")):
    run = hist.parent
    h = json.loads(hist.read_text())
    if not h:
        continue
    best = max(h, key=lambda r: r["val_qwk"])
    cfg = json.loads((run / "config.json").read_text())
    rows.append({"run": f"{run.parent.name}/{run.name}", "model": run.name, "input_size": cfg["input_size"],
                 "epochs_run": len(h), "epochs_budget": cfg["epochs"], "time_cap_min": cfg["time_limit"],
                 "train_seconds": round(sum(r["seconds"] for r in h), 1), "best_epoch": best["epoch"],
                 "val_acc": best["val_acc"], "val_qwk": best["val_qwk"], "val_macro_auc": best["val_macro_auc"],
                 "val_macro_f1": best["val_macro_f1"], "val_loss": best["val_loss"],
                 "best_metrics": json.loads((run / "best_metrics.json").read_text()) if (run / "best_metrics.json").is_file() else None})
(out / "gpu_table.json").write_text(json.dumps(rows, indent=2))
for r in rows:
    print(f"{r['run']:32s} {r['input_size']:4d}px ep {r['epochs_run']:2d}/{r['epochs_budget']} {r['train_seconds']:6.0f}s "
          f"best@{r['best_epoch']:2d} acc {r['val_acc']:.4f} qwk {r['val_qwk']:.4f} auc {r['val_macro_auc']}")
with tarfile.open(out / "runs.tgz", "w:gz") as tar:
    for f in Path("runs_gpu").rglob("*"):
        if f.is_file() and f.suffix in {".json", ".png", ".csv", ".log"}:
            tar.add(f, arcname=str(f.relative_to("runs_gpu")))

def half(run: Path, dst: Path) -> None:
    state = torch.load(run / "best.pt", map_location="cpu", weights_only=True)
    state["model"] = {k: v.half() if v.is_floating_point() else v for k, v in state["model"].items()
                      if not k.startswith("knee_gate.")}
    torch.save(state, dst)
    print(dst.name, round(dst.stat().st_size / 2**20, 1), "MiB")

oamen = {r["run"]: r for r in rows}
if "served/oamen_pt" in oamen:
    half(Path("runs_gpu/served/oamen_pt"), out / "oamen_pt_224_fp16.pt")
full = [r for k, r in oamen.items() if k in ("s224/oamen_pt_full", "s384/oamen_pt_full")]
if full:
    best = max(full, key=lambda r: r["val_qwk"])
    half(Path("runs_gpu") / best["run"], out / f"oamen_pt_full_{best['input_size']}_fp16.pt")
PY
cd "$OUT" && for f in *_fp16.pt; do
  [ -f "$f" ] || continue
  if [ "$(stat -c %s "$f")" -gt 15728640 ]; then split -b 15m -d "$f" "$f.part" && rm "$f"; fi
done
ls -la "$OUT" | tee -a "$log"
echo "total seconds: $(( $(date +%s) - start ))" | tee -a "$log"
