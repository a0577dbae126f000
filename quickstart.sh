#!/usr/bin/env bash
# The quick start on the built-in synthetic set, on a CPU: a teacher (DeepLabV3-ResNet18 at width
# 0.5), a student at width 0.125 trained without distillation and one distilled from the teacher
# with FCKD, then the evaluation of all three (a table of their val mIoU), with pictures of the
# teacher's entropy and condensation matrix. Extra flags go to every train.py run.
set -euo pipefail
cd "$(dirname "$0")"
out=runs/quickstart
# sized to fit 10 minutes on a 2-core CPU (README, "Install and quick start")
teacher_iters=1600
student_iters=1200
python train.py --model deeplabv3_resnet18 --width 0.5 --iters "$teacher_iters" --out "$out/teacher" --resume auto "$@"
python train.py --iters "$student_iters" --out "$out/student_baseline" --resume auto "$@"
python train.py --iters "$student_iters" --teacher-ckpt "$out/teacher/best.pt" --kd fckd --out "$out/student_fckd" \
    --resume auto "$@"
for run in teacher student_baseline student_fckd; do
    python eval.py --ckpt "$out/$run/best.pt" --json "$out/$run/eval.json"
done
python eval.py --ckpt "$out/student_fckd/best.pt" --teacher-ckpt "$out/teacher/best.pt" --save-dir "$out/pictures"
python - "$out" <<'PY'
import json, sys
print("| run | val mIoU | val mAcc |\n| --- | --- | --- |")
for run in ("teacher", "student_baseline", "student_fckd"):
    metrics = json.load(open(f"{sys.argv[1]}/{run}/eval.json"))
    print(f"| {run} | {metrics['mIoU']:.2f} | {metrics['mAcc']:.2f} |")
PY
