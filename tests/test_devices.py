"""The CUDA paths, tested wherever there is a device to test them on.

Every device test runs once per device of DEVICES: on the CPU everywhere, on CUDA where there is
a GPU (elsewhere collected and skipped, with the reason). On a CUDA machine the CPU variant hides
the GPU (torch.cuda.is_available() -> False, CUDA_VISIBLE_DEVICES="" for subprocesses), so that
train.py and eval.py take their CPU defaults there too. What is tested on CUDA is what train.py
and eval.py do only there: bf16 autocast and channels_last by default, fused SGD, NCCL under
torchrun, pinned-memory loading, the CUDA RNG state in checkpoints, and FCKDLoss's forward without
a host synchronisation (its "nothing kept" warning read without waiting for the GPU).

`bash bench/gpu.sh` runs the CUDA variants (`-k cuda`) first thing on a lent GPU; the tests of
bench/gpu.sh itself (at the end) run everywhere, with a stand-in python where there is no GPU.
"""

import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import warnings

import pytest
import torch

import eval as evaluate_script
import train
from fckd import FCKDLoss
from run import load_checkpoint, model_from_checkpoint
from test_fckd import logits, ref_fckd, ref_quantile_matrix
from utils import autocast, dataset_from_checkpoint, memory_format, predict, upsample

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="needs CUDA"))]

# cuBLAS reads its workspace setting once, when it starts: deterministic cuBLAS (the resume test)
# needs it set before any test in this process touches the GPU
if CUDA:
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

pytestmark = pytest.mark.usefixtures("one_thread")

# 8 synthetic 32 x 32 images per split, nets at the narrowest width train.py takes, 2 batches of 4 an epoch
TINY = ["--synthetic-length", "8", "--synthetic-size", "32", "--width", "0.0625", "--batch-size", "4",
        "--log-every", "1"]

# what train.py picks when --amp, the layout and the optimiser are left to it
DEFAULTS = {"cpu": {"autocast": None, "channels_last": False, "fused": None},
            "cuda": {"autocast": torch.bfloat16, "channels_last": True, "fused": True}}


@pytest.fixture(scope="module", params=DEVICES)
def device(request):
    """"cpu" or "cuda"; for "cpu" CUDA is hidden (a no-op on a machine without it), so that
    utils.setup_distributed and run.rng_state see a CPU-only machine. The global flags that
    train.py sets on CUDA (cuDNN autotuning, TF32) are put back afterwards."""
    flags = [(torch.backends.cudnn, "benchmark"), (torch.backends.cudnn, "allow_tf32"),
             (torch.backends.cuda.matmul, "allow_tf32")]
    before = [getattr(module, name) for module, name in flags]
    with pytest.MonkeyPatch.context() as patch:
        if request.param == "cpu":
            patch.setattr(torch.cuda, "is_available", lambda: False)
        yield request.param
    for (module, name), value in zip(flags, before):
        setattr(module, name, value)


def train_main(out, *flags):
    """train.py in this process, with TINY and data loading in the main process; returns last.pt."""
    train.main(TINY + ["--workers", "0", "--out", str(out)] + [str(f) for f in flags])
    return load_checkpoint(os.path.join(out, "last.pt"))


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


@contextlib.contextmanager
def no_host_sync(device):
    """On CUDA: any host-device synchronisation inside raises (torch.cuda.set_sync_debug_mode)."""
    if device != "cuda":
        yield
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.fixture(scope="module")
def trained(device, tmp_path_factory):
    """A tiny student trained for 3 iterations on `device` with train.py's defaults there, and
    what each training step saw: the device, the layout of the images and of the conv weights,
    and the autocast dtype (None: autocast off)."""
    out = tmp_path_factory.mktemp(f"trained_{device}")
    real_losses, steps = train.train_losses, []

    def watched(model, images, labels, *rest):
        weight = next(p for p in model.parameters() if p.dim() == 4)
        on = torch.is_autocast_enabled(images.device.type)
        steps.append({"device": images.device.type, "weights_device": weight.device.type,
                      "channels_last": images.is_contiguous(memory_format=torch.channels_last),
                      "weights_channels_last": weight.is_contiguous(memory_format=torch.channels_last),
                      "autocast": torch.get_autocast_dtype(images.device.type) if on else None})
        return real_losses(model, images, labels, *rest)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "train_losses", watched)
        checkpoint = train_main(out, "--iters", 3)
    return out, checkpoint, steps


# -----------------------------------------------------------------------------
# FCKDLoss on the device

LOSS_SETTINGS = {
    "default": ({}, dict(condense="hard", threshold=0.7, apply="mask", gamma=0.0)),
    "quantile": ({"condense": "quantile"}, dict(apply="mask", gamma=0.0)),  # keep 0.8: the matrix below
    "gamma0.5-cosine": ({"gamma": 0.5, "similarity": "cosine"},
                        dict(condense="hard", threshold=0.7, apply="mask", similarity="cosine", temperature=0.1,
                             gamma=0.5)),
}


@pytest.fixture
def float32_matmul():
    """Matmuls in float32 (torch's default), for the duration: train.py turns TF32 on for CUDA
    (use_fast_cuda_kernels) in this process, and FCKDLoss's channel attention would run in it."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize("setting", list(LOSS_SETTINGS))
def test_fckd_loss_under_bf16_autocast_on_channels_last_logits_matches_the_float64_reference(device, setting,
                                                                                            float32_matmul):
    """FCKDLoss on `device` under bf16 autocast, fed bf16 channels_last logits as a bf16 net
    gives them (the student at half the teacher's size, so it is resized on the device), equals
    the float64 reference (tests/test_fckd.py) of the same bf16-rounded logits to 1e-4 relative:
    FCKDLoss computes in float32 whatever arrives. The student's gradient, which comes back in
    bf16 (the dtype of the logits), is the gradient of FCKDLoss on the CPU in float32, without
    autocast, in the default layout, to bf16 resolution (2 ulps, 2^-7; the float64 reference
    has no usable gradient in the mask reading: its log 0 at dropped pixels gives NaN).
    On CUDA the forward makes no host synchronisation (set_sync_debug_mode "error" raises on one)."""
    options, reference_options = LOSS_SETTINGS[setting][0], dict(LOSS_SETTINGS[setting][1])
    teacher = logits(2, 19, 12, 20, scale=1.75, seed=1).bfloat16()  # hard 0.7 keeps about half of its pixels
    student = logits(2, 19, 6, 10, scale=3.0, seed=2).bfloat16()
    if setting == "quantile":
        reference_options["matrix"] = ref_quantile_matrix(teacher.double(), 0.8)
    want = ref_fckd(student.double(), teacher.double(), **reference_options)
    assert 0.1 < float(want["keep_ratio"]) < 0.9  # the condensation splits this fixture's pixels
    plain = student.float().requires_grad_()
    FCKDLoss(**options)(plain, teacher.float())["loss"].backward()

    on_device = student.to(device, memory_format=torch.channels_last).requires_grad_()
    teacher_on_device = teacher.to(device, memory_format=torch.channels_last)
    loss_fn = FCKDLoss(**options)
    with torch.autocast(device, dtype=torch.bfloat16), no_host_sync(device):
        got = loss_fn(on_device, teacher_on_device)
    got["loss"].backward()

    for key in ("loss", "spatial", "channel", "keep_ratio"):
        assert got[key].device.type == device and got[key].dtype == torch.float32, key
        torch.testing.assert_close(got[key].double().cpu(), want[key], rtol=1e-4, atol=1e-6, msg=key)
    grad = on_device.grad
    assert grad.dtype == torch.bfloat16 and grad.device.type == device
    expected = plain.grad
    assert expected.abs().max() > 0
    torch.testing.assert_close(grad.float().cpu(), expected, rtol=2 ** -7, atol=1e-5 * expected.abs().max().item())


def test_the_nothing_kept_warning_comes_without_waiting_for_the_device(device):
    """FCKDLoss warns once when a whole batch keeps no pixel. On the CPU it reads the count at
    once and warns at the first call; on CUDA it starts a non-blocking copy and reads it at a
    later call once it has landed (here: the next call, after a synchronize), so the warning
    comes one call late and no forward waits for the GPU. Never a second time."""
    loss_fn = FCKDLoss()
    student = logits(2, 5, 4, 4, seed=3).to(device)
    uniform_teacher = torch.zeros(2, 5, 4, 4, device=device)  # entropy 1 everywhere: hard 0.7 keeps nothing
    warned_at_call = []
    for _ in range(4):
        with warnings.catch_warnings(record=True) as caught, no_host_sync(device):
            warnings.simplefilter("always")
            out = loss_fn(student, uniform_teacher)
        if device == "cuda":
            torch.cuda.synchronize()  # the copy has landed before the next call
        assert out["loss"].item() == 0 and out["keep_ratio"].item() == 0
        warned_at_call.append(sum("kept no pixel of a whole batch" in str(w.message) for w in caught))
    assert warned_at_call == ([1, 0, 0, 0] if device == "cpu" else [0, 1, 0, 0])


# -----------------------------------------------------------------------------
# train.py and eval.py on the device


def test_training_takes_the_device_defaults_and_eval_reads_its_checkpoint(device, trained, tmp_path):
    """train.py with nothing but tiny synthetic flags trains on `device` with its defaults there:
    on CUDA bf16 autocast, channels_last images and weights, fused SGD, the CUDA RNG state in the
    checkpoint; on the CPU fp32, the default layout, the plain SGD, no CUDA state. Every logged
    loss is finite, and eval.py, also on `device` with its defaults, scores the checkpoint exactly
    as the run's final validation did (the same weights, images, precision and layout)."""
    out, checkpoint, steps = trained
    expected = DEFAULTS[device]
    assert len(steps) == 3
    for step in steps:
        assert step == {"device": device, "weights_device": device, "channels_last": expected["channels_last"],
                        "weights_channels_last": expected["channels_last"], "autocast": expected["autocast"]}
    assert checkpoint["args"]["amp"] is None  # left to train.py: resolved per device
    assert checkpoint["optimizer"]["param_groups"][0]["fused"] is expected["fused"]
    assert (checkpoint["rng"][0]["cuda"] is not None) == (device == "cuda")
    assert all(t.device.type == "cpu" for t in checkpoint["model"].values())  # load_checkpoint maps to the CPU

    log = read_log(out)
    losses = [r for r in log if "loss" in r]
    assert [r["iter"] for r in losses] == [1, 2, 3]
    for record in losses:
        assert all(math.isfinite(v) for k, v in record.items() if k != "iter"), record
    final_val = [r for r in log if "val" in r][-1]["val"]

    evaluate_script.main(["--ckpt", str(out / "last.pt"), "--json", str(tmp_path / "m.json")])
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert {k: metrics[k] for k in ("aAcc", "mAcc", "mIoU")} == final_val


@pytest.fixture
def reproducible(device):
    """On CUDA: deterministic algorithms where torch has them (warn_only: the bilinear
    upsampling's backward, NLLLoss and adaptive pooling's backward have none on CUDA and run as
    they are), with CUBLAS_WORKSPACE_CONFIG set at import. Nothing to do on the CPU."""
    if device != "cuda":
        yield
        return
    assert os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def test_an_interrupted_and_resumed_run_ends_where_an_uninterrupted_one_does(device, reproducible, tmp_path,
                                                                            crash_in_step):
    """Six iterations straight, against five with a crash in the fifth (last.pt at iteration 3,
    mid-epoch at 2 batches an epoch, validated) and a `--resume auto` to six, on `device` with
    its defaults (on CUDA: bf16, fused SGD, dropout drawn from the CUDA RNG that the checkpoint
    stores).

    CPU: bit-identical weights, momentum and best mIoU. CUDA: the weights and momentum agree to
    rtol 1e-2, atol 1e-3. Even with deterministic algorithms the two runs are not bit-identical
    there: the backward of the bilinear upsampling and of the ASPP's adaptive pooling, and the
    cross-entropy (NLLLoss), have no deterministic CUDA kernel (warn_only lets them run), so their
    float32 sums come in another order, and bf16 autocast can turn such a
    last-bit difference into one bf16 ulp (2^-8 relative) of an activation. A resume that loses
    the momentum, or restores another RNG state (other dropout masks), ends 0.15 and 0.04 away at
    the most and outside this tolerance in 81 and 50 tensors (measured on the CPU)."""
    flags = ["--iters", 6, "--save-every", 3, "--val-every", 3]
    uninterrupted = train_main(tmp_path / "a", *flags)

    restore = crash_in_step(5)  # the weights are at step 4, last.pt at 3
    with pytest.raises(KeyboardInterrupt):
        train_main(tmp_path / "b", *flags)
    assert load_checkpoint(tmp_path / "b" / "last.pt")["iteration"] == 3
    restore()
    resumed = train_main(tmp_path / "b", *flags, "--resume", "auto")

    assert resumed["iteration"] == uninterrupted["iteration"] == 6
    assert [r["lr"] for r in read_log(tmp_path / "b") if "lr" in r] == \
        [r["lr"] for r in read_log(tmp_path / "a") if "lr" in r]
    momentum = [(a["momentum_buffer"], b["momentum_buffer"]) for a, b in
                zip(resumed["optimizer"]["state"].values(), uninterrupted["optimizer"]["state"].values())]
    assert len(momentum) == len(list(resumed["optimizer"]["state"])) > 0
    for key, value in resumed["model"].items():
        if device == "cpu" or not value.is_floating_point():
            assert torch.equal(value, uninterrupted["model"][key]), key
        else:
            torch.testing.assert_close(value, uninterrupted["model"][key], rtol=1e-2, atol=1e-3, msg=key)
    for a, b in momentum:
        if device == "cpu":
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-3)
    if device == "cpu":
        assert resumed["best_miou"] == uninterrupted["best_miou"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc, out, device, workers, iters):
    """train.py under torchrun (a rendezvous on a free local port) with TINY flags; CUDA hidden
    for the CPU, NCCL's INFO log on, so that its use shows."""
    env = dict(os.environ, OMP_NUM_THREADS="1", NCCL_DEBUG="INFO")
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={free_port()}", "train.py", *TINY, "--workers", str(workers), "--iters", str(iters),
               "--out", str(out)]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_torchrun_with_one_process_trains_and_saves(device, tmp_path):
    """`torchrun --nproc_per_node=1 train.py` joins a process group (gloo on the CPU, NCCL on
    CUDA, whose collectives then carry the logged losses) and trains: exit 0, the final summary,
    a checkpoint with one rank's RNG states. On CUDA with a data worker, whose batches come
    through pinned memory (train.py pins on CUDA)."""
    workers = 1 if device == "cuda" else 0
    result = torchrun(1, tmp_path, device, workers, iters=2)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1])["iterations"] == 2
    checkpoint = load_checkpoint(tmp_path / "last.pt")
    assert len(checkpoint["rng"]) == 1 and checkpoint["args"]["workers"] == workers
    assert (checkpoint["rng"][0]["cuda"] is not None) == (device == "cuda")
    assert checkpoint["optimizer"]["param_groups"][0]["fused"] is DEFAULTS[device]["fused"]
    assert ("NCCL INFO" in output) == (device == "cuda"), output[-3000:]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_torchrun_on_two_cuda_gpus_trains_with_ddp_syncbn_and_nccl(tmp_path):
    """Two ranks, one GPU each: DDP over NCCL, SyncBatchNorm (converted only with more than one
    rank on CUDA), the stop agreement over a gloo group beside NCCL. Exit 0, the summary printed
    once, both ranks' RNG states (with their CUDA states) in the checkpoint."""
    result = torchrun(2, tmp_path, "cuda", workers=1, iters=3)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1])["iterations"] == 3
    assert result.stdout.count("iteration 3: aAcc") == 1  # rank 0 alone prints
    checkpoint = load_checkpoint(tmp_path / "last.pt")
    assert len(checkpoint["rng"]) == 2 and all(state["cuda"] is not None for state in checkpoint["rng"])
    assert "NCCL INFO" in output


def test_eval_with_flip_and_window_on_the_device_gives_the_float32_cpu_probabilities(device, trained, tmp_path,
                                                                                     capsys):
    """eval.py --flip --scales --window runs on `device` with its defaults and writes its scores.
    Its prediction (mirrored passes averaged, windows stitched, scales resized back) under bf16
    autocast on `device`, the layout eval.py uses there, gives the class probabilities of the
    float32 prediction on the CPU to 1e-2 (bf16 on the CPU too, so that the comparison is one of
    precision on both: 3e-3 measured on the CPU)."""
    out = trained[0]
    evaluate_script.main(["--ckpt", str(out / "last.pt"), "--flip", "--scales", "0.75", "1.0",
                          "--window", "24", "24", "--json", str(tmp_path / "m.json")])
    assert "scales [0.75, 1.0], flip, window (24, 24))" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert all(0 <= metrics[k] <= 100 for k in ("aAcc", "mAcc", "mIoU"))

    model, checkpoint = model_from_checkpoint(out / "last.pt")
    model.eval()
    on_device = torch.device(device)
    device_model, _ = model_from_checkpoint(out / "last.pt")
    device_model.eval().to(on_device, memory_format=memory_format(on_device))
    val_set = dataset_from_checkpoint(checkpoint, "val")
    for index in range(3):
        image = val_set[index][0][None]
        want = predict(model, image, (0.75, 1.0), True, (24, 24))
        with autocast(on_device, "bf16"):
            got = predict(device_model, image.to(on_device, memory_format=memory_format(on_device)), (0.75, 1.0),
                          True, (24, 24))
        assert got.device.type == device and got.shape == want.shape
        torch.testing.assert_close(got.cpu(), want, rtol=0, atol=1e-2)


def test_the_export_of_a_device_trained_checkpoint_runs_on_the_cpu_and_gives_its_logits(device, trained, tmp_path,
                                                                                       capsys):
    """eval.py --export of the checkpoint trained on `device` (on CUDA: saved from GPU tensors)
    writes a torch.export program; loaded back (torch.export.load), it runs on the CPU and gives
    the logits of the checkpoint's net in float32, upsampled to the input, for any batch size."""
    out, program_path = trained[0], tmp_path / "student.pt2"
    evaluate_script.main(["--ckpt", str(out / "last.pt"), "--export", str(program_path)])
    assert capsys.readouterr().out.startswith(f"wrote {program_path}: ")
    program = torch.export.load(program_path).module()
    model, _ = model_from_checkpoint(out / "last.pt")
    model.eval()
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    for n in (1, 3):
        with torch.no_grad():
            want = upsample(model(images[:n])["out"], (32, 32))
        got = program(images[:n])
        assert got.device.type == "cpu" and got.dtype == torch.float32 and got.shape == want.shape
        torch.testing.assert_close(got, want)


# -----------------------------------------------------------------------------
# bench/gpu.sh

GPU_SH = os.path.join(ROOT, "bench", "gpu.sh")


def folder_state(path):
    """{relative path: (size, mtime_ns)} of every file under `path`, and {relative path: None} of every folder."""
    state = {}
    for folder, folders, files in os.walk(path):
        for name in folders:
            state[os.path.relpath(os.path.join(folder, name), path)] = None
        for name in files:
            stat = os.stat(os.path.join(folder, name))
            state[os.path.relpath(os.path.join(folder, name), path)] = (stat.st_size, stat.st_mtime_ns)
    return state


@pytest.mark.skipif(CUDA, reason="this machine has CUDA: gpu.sh would run")
def test_gpu_sh_without_a_gpu_exits_2_with_one_line_and_writes_nothing(tmp_path):
    """`bash bench/gpu.sh` from the repository root without CUDA stops at once: exit status 2,
    one line on stderr that names CUDA, nothing on stdout, nothing written: bench/results and the
    rest of the tree as they were, no scratch folder. (In a copy of the script in a tree of its
    own, so that another process writing to this repository's bench/results cannot interfere.)"""
    repo, scratch = tmp_path / "repo", tmp_path / "tmp"
    (repo / "bench" / "results").mkdir(parents=True)
    scratch.mkdir()
    with open(GPU_SH) as source:
        (repo / "bench" / "gpu.sh").write_text(source.read())
    (repo / "bench" / "results" / "speed_cpu.json").write_text("{}")
    before = folder_state(repo)
    result = subprocess.run(["bash", "bench/gpu.sh"], cwd=repo,
                            env=dict(os.environ, PYTHON=sys.executable, TMPDIR=str(scratch)),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "CUDA" in lines[0], result.stderr
    assert folder_state(repo) == before and os.listdir(scratch) == []


# A stand-in for python in bench/gpu.sh: it says CUDA is there, records every command, and writes
# the files the real command would, with figures chosen so that some targets are met and some not.
# The script's own targets check runs on the real interpreter.
STAND_IN_PYTHON = '''#!{python}
import json, os, sys
args = sys.argv[1:]
if args and os.path.basename(args[0]) == "gpu_sh_targets.py":
    os.execv({python!r}, [{python!r}] + args)
with open(os.environ["STAND_IN_CALLS"], "a") as f:
    f.write(json.dumps(args) + "\\n")
if os.environ.get("STAND_IN_HANG") in args[:2]:  # this command starts, says its pid, and hangs
    with open(os.environ["STAND_IN_CALLS"] + ".hanging", "w") as f:
        f.write(str(os.getpid()))
    import time
    time.sleep(120)


def flag(name, default=None):
    return args[args.index(name) + 1] if name in args else default


def write(path, value):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write(value if isinstance(value, str) else json.dumps(value))


device = "NVIDIA H100 80GB HBM3"
if args[:1] == ["bench/loss_speed.py"]:
    rows = [{{"loss": "fckd revision 1: multiply, dot, gamma 1", "ms": 5.0, "peak_extra_MiB": 300.0}},
            {{"loss": "fckd default: mask, no enhancement (gamma 0)", "ms": 1.5, "peak_extra_MiB": 100.0}},
            {{"loss": "kd", "ms": 0.5, "peak_extra_MiB": 50.0}}]
    write(os.path.join(flag("--out"), f"loss_speed_cuda_{{flag('--dtype', 'float32')}}.json"),
          {{"device": device, "rows": rows}})
elif args[:1] == ["bench/speed.py"]:
    compiled = "--compile" in args
    precisions = args[args.index("--precisions") + 1:] if "--precisions" in args else ["fp32", "bf16"]
    rows = []
    for precision in precisions:
        # eager: FCKD +2.6% time, +2.5% memory, 230 TFLOP/s; compiled: +10%, +16.7%, 200 TFLOP/s
        rows += [{{"mode": "student+teacher", "precision": precision, "images_per_s": 110.0 if compiled else 100.0,
                   "tflop_per_s": 200.0, "peak_memory_GiB": 12.0}},
                 {{"mode": "fckd", "precision": precision, "images_per_s": 100.0 if compiled else 97.5,
                   "tflop_per_s": 200.0 if compiled else 230.0, "peak_memory_GiB": 14.0 if compiled else 12.3}}]
    write(os.path.join(flag("--out"), "speed_cuda" + ("_compile" if compiled else "") + ".json"),
          {{"device": device, "rows": rows}})
elif args[:1] == ["train.py"]:
    out = flag("--out")
    write(os.path.join(out, "last.pt"), "weights")
    write(os.path.join(out, "log.jsonl"), json.dumps({{"iter": 200, "loss": 1.0, "img_per_s": 250.0}}) + "\\n"
          + json.dumps({{"iter": 200, "val": {{"aAcc": 70.0, "mAcc": 30.0, "mIoU": 20.0}}}}) + "\\n")
elif args[:1] == ["eval.py"]:
    write(flag("--json"), {{"aAcc": 70.0, "mAcc": 30.0, "mIoU": 20.0}})
'''


@pytest.fixture
def stand_in(tmp_path):
    """(environment, calls): run bench/gpu.sh with the stand-in python, its results and CamVid
    in tmp_path; calls() lists the commands it was given."""
    python = tmp_path / "python"
    python.write_text(STAND_IN_PYTHON.format(python=sys.executable))
    python.chmod(0o755)
    (tmp_path / "camvid").mkdir()
    env = dict(os.environ, PYTHON=str(python), STAND_IN_CALLS=str(tmp_path / "calls.jsonl"),
               GPU_SH_RESULTS=str(tmp_path / "results"), CAMVID=str(tmp_path / "camvid"))

    def calls():
        with open(tmp_path / "calls.jsonl") as f:
            return [json.loads(line) for line in f]
    return env, calls


def summary_rows(stdout):
    """{part: status} from the summary table (markdown: | part | what | status | seconds |) that
    ends gpu.sh's output."""
    table = stdout[stdout.rindex("bench/gpu.sh summary"):].splitlines()[3:]
    cells = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in table if line.startswith("|")]
    assert all(len(row) == 4 for row in cells), cells
    return {row[0]: row[2] for row in cells}


def test_gpu_sh_runs_its_parts_in_order_and_checks_the_targets_on_what_they_measured(stand_in, tmp_path):
    """With a python that says CUDA is there (and writes what the real commands would), gpu.sh
    runs, in order: the CUDA tests, the loss benchmark in fp32 and bf16, the step benchmark eager
    and compiled (bf16, then fp32), CamVid's baseline, the FCKD student distilled from it and
    eval.py on that student. It writes each result to the results folder under a *_cuda* name,
    checks the targets on these figures (met and missed as the figures say) and ends with a
    summary table of every part; exit 0 since nothing failed."""
    env, calls = stand_in
    result = subprocess.run(["bash", GPU_SH], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    commands = [c for c in calls() if c[0] != "-c"]  # without the CUDA check and the device's name
    work = os.path.dirname(commands[1][commands[1].index("--out") + 1])
    camvid = ["--dataset", "camvid", "--data-root", str(tmp_path / "camvid"), "--iters", "200", "--val-every", "200",
              "--save-every", "200", "--log-every", "50"]
    assert commands == [
        ["-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests/test_devices.py", "-k", "cuda"],
        ["bench/loss_speed.py", "--dtype", "float32", "--out", f"{work}/loss_float32"],
        ["bench/loss_speed.py", "--dtype", "bfloat16", "--out", f"{work}/loss_bfloat16"],
        ["bench/speed.py", "--out", f"{work}/speed"],
        ["bench/speed.py", "--compile", "--out", f"{work}/speed_compile_bf16", "--precisions", "bf16"],
        ["bench/speed.py", "--compile", "--out", f"{work}/speed_compile_fp32", "--precisions", "fp32"],
        ["train.py", *camvid, "--out", f"{work}/camvid_baseline"],
        ["train.py", *camvid, "--teacher-ckpt", f"{work}/camvid_baseline/last.pt", "--kd", "fckd",
         "--out", f"{work}/camvid_fckd"],
        ["eval.py", "--ckpt", f"{work}/camvid_fckd/last.pt", "--json", f"{work}/camvid_fckd_eval.json"],
    ]
    assert not os.path.exists(work)  # its scratch folder is removed
    assert sorted(os.listdir(tmp_path / "results")) == [
        "camvid_200iters_cuda_baseline_log.jsonl", "camvid_200iters_cuda_fckd_eval.json",
        "camvid_200iters_cuda_fckd_log.jsonl", "gpu_sh_cuda.log", "gpu_sh_targets_cuda.json",
        "loss_speed_cuda_bfloat16.json", "loss_speed_cuda_float32.json", "speed_cuda.json",
        "speed_cuda_compile_bf16.json", "speed_cuda_compile_fp32.json"]

    verdicts = {check["what"]: check["verdict"] for check in
                json.loads((tmp_path / "results" / "gpu_sh_targets_cuda.json").read_text())["checks"]}
    for precision in ("fp32", "bf16"):
        assert verdicts[f"speed_cuda {precision}: FCKD step time over student + teacher forward"] == "met"
        assert verdicts[f"speed_cuda {precision}: FCKD peak memory over student + teacher forward"] == "met"
        assert verdicts[f"speed_cuda_compile_{precision} {precision}: FCKD step time over student + teacher "
                        "forward"] == "MISSED"
        assert verdicts[f"speed_cuda_compile_{precision} {precision}: FCKD peak memory over student + teacher "
                        "forward"] == "MISSED"
    assert verdicts["speed_cuda bf16: FCKD step throughput"] == "met"
    assert verdicts["speed_cuda_compile_bf16 bf16: FCKD step throughput"] == "MISSED"
    for dtype in ("float32", "bfloat16"):
        assert verdicts[f"loss_speed_cuda_{dtype}: fckd default: mask, no enhancement (gamma 0)"] == "met"
        assert verdicts[f"loss_speed_cuda_{dtype}: fckd revision 1: multiply, dot, gamma 1"] == "MISSED"
    assert len(verdicts) == 14
    assert "camvid_200iters_cuda_fckd_eval.json: mIoU 20.00" in result.stdout

    rows = summary_rows(result.stdout)
    assert list(rows) == ["a", "b1", "b2", "c1", "c2", "c3", "d1", "d2", "d3", "targets"]
    assert set(rows.values()) == {"ok"}, rows
    assert (tmp_path / "results" / "gpu_sh_cuda.log").read_text().endswith(
        result.stdout[result.stdout.rindex("bench/gpu.sh summary"):])


def test_gpu_sh_skips_and_names_what_its_time_or_data_rule_out(stand_in, tmp_path):
    """With 10 s in all (GPU_SH_SECONDS) no part fits its minimum: each is skipped, saying how
    much time was left; with CAMVID naming no folder, the CamVid parts say that instead. Nothing
    is run but the CUDA check, nothing but the transcript is written, and the exit status is 0
    (a skip is not a failure)."""
    env, calls = stand_in
    env.update(GPU_SH_SECONDS="10", CAMVID=str(tmp_path / "no_camvid"))
    result = subprocess.run(["bash", GPU_SH], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert all(c[0] == "-c" for c in calls())
    assert os.listdir(tmp_path / "results") == ["gpu_sh_cuda.log"]
    rows = summary_rows(result.stdout)
    assert list(rows) == ["a", "b1", "b2", "c1", "c2", "c3", "d1", "d2", "d3", "targets"]
    for part in ("a", "b1", "b2", "c1", "c2", "c3"):
        assert rows[part].startswith("skipped: ") and "s of 10 s left" in rows[part], rows[part]
    for part in ("d1", "d2", "d3"):
        assert rows[part] == f"skipped: CAMVID={tmp_path / 'no_camvid'} is not a folder"
    assert rows["targets"] == "skipped: nothing was measured"


def test_gpu_sh_stopped_by_sigterm_stops_its_part_runs_no_other_and_still_sums_up(stand_in, tmp_path):
    """A SIGTERM to gpu.sh (a scheduler, or Ctrl-C's SIGINT alike) while a part runs is passed on
    to that part, which ends; no other part starts; the summary says so, and gpu.sh exits 143."""
    env, calls = stand_in
    env["STAND_IN_HANG"] = "pytest"
    hanging = tmp_path / "calls.jsonl.hanging"
    process = subprocess.Popen(["bash", GPU_SH], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not (hanging.exists() and hanging.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        stdout, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 143, stdout[-3000:]
    part_pid = int(hanging.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(part_pid, 0)  # the part's process has ended
    assert [c[:2] for c in calls() if c[0] != "-c"] == [["-m", "pytest"]]
    rows = summary_rows(stdout)
    assert rows["a"] == "STOPPED by SIGTERM (exit 143)"
    for part in ("b1", "b2", "c1", "c2", "c3", "d1"):
        assert rows[part] == "skipped: stopped by SIGTERM"
