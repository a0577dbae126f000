#!/usr/bin/env bash
# bench/gpu.sh: what to run on a machine with a CUDA GPU, in at most 8 minutes (GPU_SH_SECONDS).
#
#   bash bench/gpu.sh                        # from the repository root (it cds there from anywhere)
#   CAMVID=/path/to/camvid bash bench/gpu.sh # part (d) on this CamVid (default: data/camvid if there)
#
# In order, each part under its own time limit (timeout):
#   (a)  python -m pytest tests/test_devices.py -k cuda: the CUDA paths (bf16 autocast, channels_last,
#        fused SGD, NCCL under torchrun, pinned memory, FCKDLoss without a host sync, resume, eval, export)
#   (b1, b2) bench/loss_speed.py: the losses alone, fp32 and bf16 logits
#   (c1) bench/speed.py at the paper's size (batch 8, 512 x 1024, 19 classes, R101 teacher, R18 student),
#        fp32 and bf16, eager; (c2, c3) the same with --compile, bf16 then fp32
#   (d1-d3) CamVid, 200 iterations: a baseline without a teacher, an FCKD student distilled from it,
#        eval.py on the student
# then the targets of docs/benchmarks.md checked on what (b) and (c) measured, and a summary table.
#
# A part runs only if the time left (less what (d) keeps for itself, for c2 and c3) reaches its
# minimum; its limit is its budget or the time left, whichever is less; what does not fit is
# skipped and named. A stop signal (Ctrl-C, SIGTERM) ends the running part and skips the rest.
# Results go to bench/results under *_cuda* names (written only by a part that succeeded), with the
# whole transcript in gpu_sh_cuda.log and the targets in gpu_sh_targets_cuda.json. Exit status: 2
# without CUDA (nothing run), 130/143 when stopped, 1 if a part failed or ran out of time, else 0
# (a skipped part or a missed target is reported, not a failure).
#
# Environment: PYTHON (default python), CAMVID, GPU_SH_SECONDS (default 480), GPU_SH_RESULTS
# (default bench/results); relative paths are taken from the repository root.

set -u
export PYTHONUNBUFFERED=1
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
PY=${PYTHON:-python}

"$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 3)' >/dev/null 2>&1
found=$?
if [ "$found" -eq 3 ]; then
    echo "bench/gpu.sh needs a CUDA GPU (torch.cuda.is_available() is False); nothing was run" >&2
    exit 2
elif [ "$found" -ne 0 ]; then
    echo "bench/gpu.sh needs a CUDA GPU and a python with torch: '$PY' cannot import torch (exit $found); nothing was run" >&2
    exit 2
fi

TOTAL=${GPU_SH_SECONDS:-480}
case $TOTAL in
    '' | *[!0-9]*) echo "bench/gpu.sh: GPU_SH_SECONDS must be a whole number of seconds, got '$TOTAL'; nothing was run" >&2
                   exit 2 ;;
esac
RESULTS=${GPU_SH_RESULTS:-bench/results}
mkdir -p "$RESULTS" || exit 2
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_sh.XXXXXX") || exit 2
trap 'rm -rf "$WORK"' EXIT
LOG=$RESULTS/gpu_sh_cuda.log
: > "$LOG"

# CamVid for part (d): $CAMVID if set (and only it), else data/camvid
CAMVID_ROOT=""
CAMVID_MISSING=""
if [ -n "${CAMVID:-}" ]; then
    if [ -d "$CAMVID" ]; then CAMVID_ROOT=$CAMVID; else CAMVID_MISSING="CAMVID=$CAMVID is not a folder"; fi
elif [ -d data/camvid ]; then
    CAMVID_ROOT=data/camvid
else
    CAMVID_MISSING="no CamVid: CAMVID is not set and there is no data/camvid"
fi
D_RESERVE=0  # what c2 and c3 leave for (d): about what its three parts take
[ -n "$CAMVID_ROOT" ] && D_RESERVE=150
END_RESERVE=10  # what every part leaves for the targets and the summary

ROWS=()       # the summary: "part|what|status|seconds"
PUBLISHED=()  # the result files this run wrote
FAILED=0
CURRENT=""    # the pid of the running part's timeout (its process group: timeout makes one)
STOPPED=""    # the stop signal received, if any

note() { printf '%s\n' "$*" | tee -a "$LOG"; }

skip() {  # skip PART WHAT WHY
    note "== ($1) $2: skipped ($3)"
    ROWS+=("$1|$2|skipped: $3|-")
}

stop() {  # SIGINT or SIGTERM: stop the running part (timeout passes TERM on to it) and run no other
    STOPPED=$1
    [ -n "$CURRENT" ] && kill -TERM "$CURRENT" 2>/dev/null
}
trap 'stop INT' INT
trap 'stop TERM' TERM

# part PART WHAT MIN BUDGET RESERVE COMMAND...: run COMMAND if at least MIN (>= 1) seconds are left
# once RESERVE seconds are kept for later parts, under a limit of BUDGET or what is left, whichever is
# less (timeout: SIGTERM to its process group, SIGKILL 5 s later); its output to the terminal and the
# log as it comes; returns its exit status
part() {
    local id=$1 what=$2 min=$3 budget=$4 reserve=$5
    shift 5
    if [ -n "$STOPPED" ]; then
        skip "$id" "$what" "stopped by SIG$STOPPED"
        return 1
    fi
    local left=$((TOTAL - SECONDS - reserve))
    local limit=$((budget < left ? budget : left))
    if [ "$limit" -lt "$min" ]; then
        local why="$((TOTAL - SECONDS)) s of $TOTAL s left"
        [ "$reserve" -gt 0 ] && why="$why, $reserve s kept for the parts after it"
        skip "$id" "$what" "$why; it needs $min s"
        return 1
    fi
    note "== ($id) $what [limit $limit s]: $*"
    local start=$SECONDS fifo=$WORK/output.$id
    mkfifo "$fifo"
    tee -a "$LOG" < "$fifo" &
    local tee_pid=$!
    timeout --kill-after=5 "$limit" "$@" > "$fifo" 2>&1 < /dev/null &
    CURRENT=$!
    wait "$CURRENT"
    local status=$?
    while kill -0 "$CURRENT" 2>/dev/null; do  # a stop signal ended the wait, not the part
        wait "$CURRENT"
        status=$?
    done
    CURRENT=""
    wait "$tee_pid"  # every line of the part is out before the next one
    rm -f "$fifo"
    local took=$((SECONDS - start))
    case $status in
        0) ROWS+=("$id|$what|ok|$took") ;;
        124) ROWS+=("$id|$what|TIMED OUT (limit $limit s)|$took"); FAILED=1 ;;
        137) ROWS+=("$id|$what|KILLED (limit $limit s, or out of memory)|$took"); FAILED=1 ;;
        *) ROWS+=("$id|$what|FAILED (exit $status)|$took"); FAILED=1 ;;
    esac
    [ -n "$STOPPED" ] && ROWS[${#ROWS[@]}-1]="$id|$what|STOPPED by SIG$STOPPED (exit $status)|$took"
    note "== ($id) exit $status after $took s"
    return "$status"
}

publish() {  # publish FILE NAME: FILE becomes $RESULTS/NAME
    cp "$1" "$RESULTS/$2" && PUBLISHED+=("$RESULTS/$2") && note "wrote $RESULTS/$2"
}

note "bench/gpu.sh: $("$PY" -c 'import torch; print(torch.cuda.get_device_name(), "| torch", torch.__version__)' 2>&1)"
note "budget $TOTAL s; results in $RESULTS; CamVid: ${CAMVID_ROOT:-none ($CAMVID_MISSING)}"

# (a) the CUDA tests
part a "tests/test_devices.py -k cuda" 30 120 "$END_RESERVE" \
    "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_devices.py -k cuda

# (b) the losses alone
for dtype in float32 bfloat16; do
    id=b1; [ "$dtype" = bfloat16 ] && id=b2
    if part "$id" "loss_speed.py, $dtype logits" 15 45 "$END_RESERVE" \
            "$PY" bench/loss_speed.py --dtype "$dtype" --out "$WORK/loss_$dtype"; then
        publish "$WORK/loss_$dtype/loss_speed_cuda_$dtype.json" "loss_speed_cuda_$dtype.json"
    fi
done

# (c) the whole training step at the paper's size: eager, then compiled (bf16 first: the targets are bf16)
if part c1 "speed.py, fp32 and bf16, eager" 60 150 "$END_RESERVE" "$PY" bench/speed.py --out "$WORK/speed"; then
    publish "$WORK/speed/speed_cuda.json" speed_cuda.json
fi
id=c2
for precision in bf16 fp32; do
    if part "$id" "speed.py --compile, $precision" 90 180 $((D_RESERVE + END_RESERVE)) \
            "$PY" bench/speed.py --compile --out "$WORK/speed_compile_$precision" --precisions "$precision"; then
        publish "$WORK/speed_compile_$precision/speed_cuda_compile.json" "speed_cuda_compile_$precision.json"
    fi
    id=c3
done

# (d) CamVid, 200 iterations: the baseline is the student's teacher
D1="CamVid baseline, 200 iterations"
D2="CamVid FCKD student of d1, 200 iterations"
D3="eval.py on the d2 student"
if [ -z "$CAMVID_ROOT" ]; then
    skip d1 "$D1" "$CAMVID_MISSING"; skip d2 "$D2" "$CAMVID_MISSING"; skip d3 "$D3" "$CAMVID_MISSING"
else
    CAMVID_FLAGS=(--dataset camvid --data-root "$CAMVID_ROOT" --iters 200 --val-every 200 --save-every 200
                  --log-every 50)
    if part d1 "$D1" 40 75 "$END_RESERVE" "$PY" train.py "${CAMVID_FLAGS[@]}" --out "$WORK/camvid_baseline"; then
        publish "$WORK/camvid_baseline/log.jsonl" camvid_200iters_cuda_baseline_log.jsonl
        if part d2 "$D2" 40 90 "$END_RESERVE" "$PY" train.py "${CAMVID_FLAGS[@]}" \
                --teacher-ckpt "$WORK/camvid_baseline/last.pt" --kd fckd --out "$WORK/camvid_fckd"; then
            publish "$WORK/camvid_fckd/log.jsonl" camvid_200iters_cuda_fckd_log.jsonl
            if part d3 "$D3" 20 45 "$END_RESERVE" "$PY" eval.py --ckpt "$WORK/camvid_fckd/last.pt" \
                    --json "$WORK/camvid_fckd_eval.json"; then
                publish "$WORK/camvid_fckd_eval.json" camvid_200iters_cuda_fckd_eval.json
            fi
        else
            skip d3 "$D3" "d2 did not succeed"
        fi
    else
        skip d2 "$D2" "d1 did not succeed"; skip d3 "$D3" "d1 did not succeed"
    fi
fi

# the targets, on the figures of this run only
if [ ${#PUBLISHED[@]} -eq 0 ]; then
    skip targets "targets of docs/benchmarks.md" "nothing was measured"
else
    cat > "$WORK/gpu_sh_targets.py" <<'EOF'
import json
import os
import sys

out, paths = sys.argv[1], sys.argv[2:]
checks, device = [], None


def check(what, measured, target, ok):
    checks.append({"what": what, "measured": measured, "target": target,
                   "verdict": "n/a" if ok is None else ("met" if ok else "MISSED")})


for path in paths:
    name = os.path.basename(path)
    stem = name.rsplit(".", 1)[0]
    if name.startswith("speed_cuda"):
        data = json.load(open(path))
        device = data["device"]
        rows = {(r["mode"], r["precision"]): r for r in data["rows"]}
        for precision in ("fp32", "bf16"):
            base, fckd = rows.get(("student+teacher", precision)), rows.get(("fckd", precision))
            if base is None or fckd is None:
                continue
            where = f"{stem} {precision}: FCKD"
            extra = base["images_per_s"] / fckd["images_per_s"] - 1  # the step time is 1 / images_per_s
            check(f"{where} step time over student + teacher forward",
                  f"{extra:+.1%} ({fckd['images_per_s']:.1f} vs {base['images_per_s']:.1f} img/s)", "<= +5%",
                  extra <= 0.05)
            if base["peak_memory_GiB"] and fckd["peak_memory_GiB"] is not None:
                extra = fckd["peak_memory_GiB"] / base["peak_memory_GiB"] - 1
                check(f"{where} peak memory over student + teacher forward",
                      f"{extra:+.1%} ({fckd['peak_memory_GiB']:.2f} vs {base['peak_memory_GiB']:.2f} GiB)",
                      "<= +10%", extra <= 0.10)
            if precision == "bf16":  # the H200 has the H100's chip (GH100), with more memory
                hopper = "H100" in device or "H200" in device
                check(f"{where} step throughput", f"{fckd['tflop_per_s']:.0f} TFLOP/s on {device}",
                      ">= 220 TFLOP/s on an H100", fckd["tflop_per_s"] >= 220 if hopper else None)
    elif name.startswith("loss_speed_cuda"):
        data = json.load(open(path))
        for r in data["rows"]:
            if r["loss"].startswith("fckd"):
                check(f"{stem}: {r['loss']}", f"{r['ms']:.2f} ms, {r['peak_extra_MiB']:.0f} MiB",
                      "< 4 ms and < 1 GiB", r["ms"] < 4 and r["peak_extra_MiB"] < 1024)
    elif name.endswith("_log.jsonl"):
        records = [json.loads(line) for line in open(path)]
        steps, vals = [r for r in records if "img_per_s" in r], [r for r in records if "val" in r]
        print(f"{name}: {steps[-1]['img_per_s']:.1f} img/s at iteration {steps[-1]['iter']}; "
              f"val mIoU {vals[-1]['val']['mIoU']:.2f}" if steps and vals else f"{name}: incomplete")
    elif name.endswith("_eval.json"):
        print(f"{name}: mIoU {json.load(open(path))['mIoU']:.2f}")

with open(out, "w") as f:
    json.dump({"device": device, "checks": checks}, f, indent=1)
print(f"targets (docs/benchmarks.md), written to {out}:")
for c in checks:
    print(f"  {c['verdict']:>6}  {c['what']}: {c['measured']} (target {c['target']})")
EOF
    part targets "targets of docs/benchmarks.md" 1 30 0 \
        "$PY" "$WORK/gpu_sh_targets.py" "$RESULTS/gpu_sh_targets_cuda.json" "${PUBLISHED[@]}"
    [ -f "$RESULTS/gpu_sh_targets_cuda.json" ] && PUBLISHED+=("$RESULTS/gpu_sh_targets_cuda.json")
fi

note ""
note "bench/gpu.sh summary ($SECONDS s of $TOTAL s; results in $RESULTS):"
note "| part | what | status | seconds |"
note "| --- | --- | --- | --- |"
for row in "${ROWS[@]}"; do
    IFS='|' read -r id what status took <<< "$row"
    note "| $id | $what | $status | $took |"
done
case $STOPPED in
    INT) exit 130 ;;
    TERM) exit 143 ;;
esac
exit "$FAILED"
