#!/usr/bin/env bash
# The quick start on the built-in synthetic set, on a CPU: a teacher (DeepLabV3-ResNet18 at width
# 0.5), a student at width 0.125 distilled from it with FCKD, then the evaluation of both, with
# pictures of the teacher's entropy and condensation matrix. Extra flags go to both train.py runs.
set -euo pipefail
cd "$(dirname "$0")"
out=runs/quickstart
python train.py --model deeplabv3_resnet18 --width 0.5 --out "$out/teacher" --resume auto "$@"
python train.py --teacher-ckpt "$out/teacher/best.pt" --kd fckd --out "$out/student_fckd" --resume auto "$@"
python eval.py --ckpt "$out/teacher/best.pt"
python eval.py --ckpt "$out/student_fckd/best.pt" --teacher-ckpt "$out/teacher/best.pt" --save-dir "$out/pictures"
