"""
What keeps a training run safe, for train.py (and the checkpoint reading eval.py shares):

- checkpoint files: written atomically (a crash leaves the last good file), with a SHA-256 of
  their contents that every read verifies; what a checkpoint holds (checkpoint_state, restore);
- the output folder: one run per folder, locked while it trains, never written by another run
  unless --overwrite, and then only once the new run's inputs have all been checked; the log cut
  back to the checkpoint a run resumes from;
- the resume check: a resumed run must be the run its checkpoint records (settings, and the
  contents of the teacher, the labelled list and the data split, not their paths);
- RNG states per rank and a data order that a resumed run picks up at the exact batch;
- stop signals (SIGINT, SIGTERM: stop after the current step, save, exit 128 + signal);
- checks that stop a run before bad data or bad numbers cost it: every val image decoded first,
  no NaN or inf ever saved;
- run_cli: every error a user can cause as one line naming the flag, file or value.
"""

import contextlib
import fcntl
import glob
import hashlib
import json
import math
import os
import random
import signal
import sys
import threading

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from data import split_fingerprint
from losses import unused_flags
from models import build_model, listing, load_torch_file, load_weights, require_file
from utils import all_reduce, is_main, progress_bar, quiet_on_stop_signals, writable_folder


# -----------------------------------------------------------------------------
# checkpoint files: written atomically, verified on reading

# Every key of a checkpoint, as checkpoint_state writes them: the run's net, data and settings,
# its optimiser and RNG states, and its progress (FRESH_PROGRESS's keys).
CHECKPOINT_KEYS = ("model", "optimizer", "scaler", "iteration", "args", "rng", "best_miou", "num_classes",
                   "dataset", "model_name", "model_options", "best_iteration", "unlabelled_batches", "val_pending")
# a run's progress when it starts: iteration 0, no validation yet, nothing pending
FRESH_PROGRESS = {"iteration": 0, "best_miou": None, "best_iteration": None, "unlabelled_batches": 0,
                  "val_pending": False}
# progress that train.py began to record later: a checkpoint without it had none of it (load_checkpoint)
ADDED_KEYS = ("best_iteration", "unlabelled_batches", "val_pending")
TEMPORARY = ".{name}.tmp{pid}"  # atomic_write's temporary file next to OUT/name


def atomic_write(path, write):
    """write(f) into a binary file that appears at `path` whole or not at all.

    The bytes go to a temporary file in the same folder, are flushed to disk, and the file is then
    renamed over `path` (os.replace is atomic on POSIX and Windows). If anything fails the old
    file is untouched and the temporary one is removed; one left by a kill -9 is removed by
    remove_temporaries.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, TEMPORARY.format(name=os.path.basename(path), pid=os.getpid()))
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):  # a full disk, a lost mount: one line that names the file
            before = "the file there is as it was" if os.path.exists(path) else "nothing was written"
            error = OSError(f"cannot write {path} ({e.strerror or e}); {before}")
            error.errno = e.errno
            raise error from None
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable
        fd = os.open(folder, os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove_temporaries(folder):
    """Remove the temporary files that atomic_write left in `folder` when its process was killed
    (call it only while no other process writes there: train.py holds OUT's lock)."""
    for path in glob.glob(os.path.join(glob.escape(folder), TEMPORARY.format(name="*", pid="*"))):
        os.remove(path)


def payload_sha256(value, digest=None):
    """SHA-256 (hex) of a checkpoint's contents: every tensor's dtype, shape and bytes, and every
    other value's type and repr, in order. Computed from the objects, not the file, so the same
    checkpoint loaded back gives the same digest."""
    top = digest is None
    digest = hashlib.sha256() if top else digest
    if isinstance(value, torch.Tensor):
        data = value.detach().cpu().contiguous().reshape(-1)
        digest.update(f"tensor {data.dtype} {tuple(value.shape)};".encode())
        digest.update(data.view(torch.uint8).numpy().data)
    elif isinstance(value, dict):
        digest.update(f"dict {len(value)};".encode())
        for key, item in value.items():
            payload_sha256(key, digest)
            payload_sha256(item, digest)
    elif isinstance(value, (list, tuple)):
        digest.update(f"sequence {len(value)};".encode())
        for item in value:
            payload_sha256(item, digest)
    else:
        digest.update(f"{type(value).__name__} {value!r};".encode())
    return digest.hexdigest() if top else None


def file_sha256(path, what="checkpoint"):
    """SHA-256 of the file's bytes, hex; FileNotFoundError "{what} not found: {path}" if it is missing."""
    require_file(path, what)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(checkpoint, path):
    """torch.save of `checkpoint` plus its payload_sha256 under "sha256", written atomically."""
    payload = {**checkpoint, "sha256": payload_sha256(checkpoint)}
    atomic_write(path, lambda f: torch.save(payload, f))


def load_checkpoint(path):
    """Read a checkpoint written by train.py onto the CPU; returns it without its "sha256".

    FileNotFoundError naming the path if it does not exist; ValueError naming the file if it is
    not a torch file, lacks any of CHECKPOINT_KEYS but ADDED_KEYS (filled in from FRESH_PROGRESS), or
    its contents do not match the SHA-256 stored in it (damaged bytes: torch.load itself checks
    none). Checkpoints written before the SHA-256 was stored load unchecked.
    """
    path = os.fspath(path)
    checkpoint = load_torch_file(path, "checkpoint")
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path} is not a train.py checkpoint: it holds a {type(checkpoint).__name__}, not a dict")
    stored = checkpoint.pop("sha256", None)
    if stored is not None and payload_sha256(checkpoint) != stored:
        raise ValueError(f"{path} is damaged: its contents do not match the SHA-256 stored in it; "
                         "use another checkpoint (e.g. best.pt or a copy)")
    missing = [key for key in CHECKPOINT_KEYS if key not in checkpoint and key not in ADDED_KEYS]
    if missing:
        raise ValueError(f"{path} is not a train.py checkpoint: it lacks {', '.join(missing)}")
    for key in ADDED_KEYS:  # a checkpoint of an earlier train.py
        checkpoint.setdefault(key, FRESH_PROGRESS[key])
    return checkpoint


def non_finite_tensors(state):
    """Names of the floating-point tensors of a state dict that hold NaN or inf. One fused check
    (the max-abs of every tensor at once, one host sync); the tensors are named only when it fails."""
    floats = [t for t in state.values() if t.is_floating_point() and t.numel()]
    if not floats or torch.stack(torch._foreach_norm(floats, ord=math.inf)).isfinite().all():
        return []
    return [name for name, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()]


def load_state(model, state, path, what="the model"):
    """model.load_state_dict(state), with a one-line ValueError naming the file and the tensors
    that hold NaN or inf (a diverged run's weights must not be resumed, distilled from or scored),
    or, when the weights do not fit, the missing, unexpected and mis-shaped keys (models.load_weights)."""
    bad = non_finite_tensors(state)
    if bad:
        raise ValueError(f"{path} holds NaN or inf in {len(bad)} tensors ({listing(bad, 3)}); "
                         "use an earlier checkpoint")
    load_weights(model, state, f"the weights in {path} do not fit {what}")


def model_from_checkpoint(path):
    """(model, checkpoint): the net a checkpoint describes (model_name, num_classes,
    model_options), with its weights, on the CPU."""
    checkpoint = load_checkpoint(path)
    name = checkpoint["model_name"]
    model = build_model(name, checkpoint["num_classes"], **checkpoint["model_options"])
    load_state(model, checkpoint["model"], path,
               f"{name} with {checkpoint['num_classes']} classes and options {checkpoint['model_options']}")
    return model, checkpoint


def checkpoint_state(args, model, optimizer, scaler, world_size, num_classes, model_options, progress):
    """What last.pt and best.pt hold: the keys of CHECKPOINT_KEYS. progress: the keys of
    FRESH_PROGRESS (val_pending: saved before its validation, which a resume then does first)."""
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "args": vars(args), "rng": all_rng_states(world_size), "num_classes": num_classes,
            "dataset": args.dataset, "model_name": args.model, "model_options": model_options,
            **{key: progress[key] for key in FRESH_PROGRESS}}


def restore(checkpoint, optimizer, scaler, rank):
    """Put the optimiser, the loss scaler and this rank's RNG states back as `checkpoint` holds
    them; returns the run's progress there (the keys of FRESH_PROGRESS)."""
    optimizer.load_state_dict(checkpoint["optimizer"])
    scaler.load_state_dict(checkpoint["scaler"])
    set_rng_state(checkpoint["rng"][rank % len(checkpoint["rng"])])
    return {key: checkpoint[key] for key in FRESH_PROGRESS}


# -----------------------------------------------------------------------------
# the output folder: one run at a time, never overwritten by accident

RUN_FILES = ("last.pt", "best.pt", "log.jsonl")  # a folder with any of them holds a run
LOCK_FILE = ".lock"


@contextlib.contextmanager
def claimed_out_folder(args):
    """Hold OUT's lock for the duration: create OUT, lock OUT/.lock (flock, released by the kernel
    whatever way the process ends), remove what killed runs left. Yields clear_old_run(), which
    removes the run that --overwrite replaces: the caller calls it once every input of the new run
    has been checked, so that a typo in a flag never costs the old run.

    ValueError when OUT cannot be written, when another run holds the lock, or when OUT holds a run
    (RUN_FILES) that this run is not: a fresh run without --overwrite; --resume auto where last.pt
    is gone but the run's other files are there; --resume PATH with PATH outside OUT.
    """
    writable_folder(args.out, "--out")
    with open(os.path.join(args.out, LOCK_FILE), "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip()
            raise ValueError(f"{args.out} is in use by another train.py run{f' (pid {holder})' if holder else ''}; "
                             "wait for it to end or choose another --out") from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}\n")  # names the holder in the error above
        lock.flush()
        held = [name for name in RUN_FILES if os.path.exists(os.path.join(args.out, name))]
        check_folder_is_this_runs(args, held)
        remove_temporaries(args.out)

        def clear_old_run():
            for name in held if args.overwrite else ():
                os.remove(os.path.join(args.out, name))
        yield clear_old_run


def check_folder_is_this_runs(args, held):
    """ValueError unless the run files `held` in OUT belong to this run (see claimed_out_folder)."""
    if not held or args.overwrite:
        return
    what = f"{args.out} already holds a run ({', '.join(held)})"
    if not args.resume:
        raise ValueError(f"{what}; continue it with --resume auto, start it afresh with --overwrite, or choose "
                         "another --out")
    if args.resume == "auto" and "last.pt" not in held:
        raise ValueError(f"{what} but no last.pt to continue it from; start it afresh with --overwrite, or choose "
                         "another --out")
    if args.resume != "auto" and os.path.realpath(os.path.dirname(os.path.abspath(args.resume))) \
            != os.path.realpath(args.out):
        raise ValueError(f"{what} that --resume {args.resume} is not: resume into the checkpoint's own folder "
                         f"(--out {os.path.dirname(args.resume) or '.'}) or an empty one, or pass --overwrite instead "
                         "to replace this run")


def cut_log(log_path, iteration, val_pending):
    """Cut log.jsonl back to the records up to `iteration`, the checkpoint a run resumes from
    (0: a fresh run, an empty log). Records written after that checkpoint, by a run that was killed,
    are written again by the resumed one; a half-written last line goes too. Atomic."""
    kept = []
    if os.path.exists(log_path):
        with open(log_path, "rb") as f:
            for line in f:
                try:
                    record = json.loads(line)
                    at = record["iter"]
                except (ValueError, TypeError, KeyError):
                    continue
                # a validation still pending at the checkpoint is done, and logged, again
                if at < iteration or (at == iteration and not (val_pending and "val" in record)):
                    kept.append(line if line.endswith(b"\n") else line + b"\n")
    atomic_write(log_path, lambda f: f.writelines(kept))


def append_log(log_path, record):
    """One JSON line in log.jsonl, on rank 0."""
    if is_main():
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")


# -----------------------------------------------------------------------------
# resuming: the checkpoint must be the run's

# The settings a resumed run may change: they do not change what is trained. Every other setting
# (and any flag added later) must equal the checkpoint's (check_resumed_settings).
MAY_DIFFER_ON_RESUME = ("workers", "log_every", "val_every", "save_every", "out", "resume", "overwrite")


def checkpoint_to_resume(args, device, world_size, parser):
    """(path, checkpoint) that --resume names (auto: OUT/last.pt when it exists), or (None, None)
    for a fresh start. ValueError unless every rank sees OUT/last.pt or none does, unless the
    checkpoint was trained with this run's settings (check_resumed_settings), and unless it is at
    an iteration no later than --iters."""
    path = args.resume
    if path == "auto":
        last_path = os.path.join(args.out, "last.pt")
        path = last_path if os.path.exists(last_path) else None
        resuming = all_reduce(torch.tensor(int(path is not None), device=device)).item()
        if 0 < resuming < world_size:  # every rank loads last.pt: they must all see it
            raise ValueError(f"{last_path} exists on {resuming} of {world_size} ranks only; put --out on a "
                             "filesystem that every node shares, or pass --resume PATH with a copy on each node")
    if not path:
        return None, None
    checkpoint = load_checkpoint(path)
    check_resumed_settings(checkpoint["args"], args, path, parser)
    if checkpoint["iteration"] > args.iters:
        raise ValueError(f"cannot resume from {path}: it is at iteration {checkpoint['iteration']}, "
                         f"beyond --iters {args.iters}")
    return path, checkpoint


def input_fingerprints(args):
    """The contents of a run's inputs, stored with its settings so that a resume refuses inputs that
    changed on disk and takes the same ones under another path: the SHA-256 of --teacher-ckpt's and
    --labelled-list's bytes (None without one), and data.split_fingerprint of the data split."""
    return {"teacher_sha256": file_sha256(args.teacher_ckpt, "--teacher-ckpt") if args.teacher_ckpt else None,
            "labelled_list_sha256": file_sha256(args.labelled_list, "--labelled-list") if args.labelled_list else None,
            "data_fingerprint": split_fingerprint(args.dataset, args.data_root)}


# {fingerprint: the path setting it stands for}: with a fingerprint stored, the path may differ
FINGERPRINTED = {"teacher_sha256": "teacher_ckpt", "labelled_list_sha256": "labelled_list",
                 "data_fingerprint": "data_root"}
FINGERPRINT_NAMES = {"teacher_sha256": "the teacher checkpoint's content (SHA-256)",
                     "labelled_list_sha256": "the labelled list's content (SHA-256)",
                     "data_fingerprint": "the data split's files (names and sizes)"}


def translated(stored):
    """A checkpoint's settings in today's flags: --no-fckd-enhance (retired by spec revision 4) is
    --fckd-gamma 0, the same loss."""
    stored = dict(stored)
    if stored.pop("fckd_enhance", True) is False:
        stored["fckd_gamma"] = 0.0
    return stored


def check_resumed_settings(stored, args, path, parser):
    """ValueError naming every setting (but MAY_DIFFER_ON_RESUME, and the loss flags the run does
    not use) in which this run's args differ from `stored`, the args of the checkpoint at `path`,
    with both values: a resumed run must be the run its checkpoint records. Inputs are compared by
    content where the checkpoint stores a fingerprint (input_fingerprints), else by path. A setting
    that an older checkpoint lacks counts as its default (parser's)."""
    flags = {action.dest: action.option_strings[0] for action in parser._actions if action.option_strings}
    stored = translated(stored)
    defaults = {dest: parser.get_default(dest) for dest in flags}
    then_all, now_all = {**defaults, **stored}, {**defaults, **vars(args)}
    # a path may differ where the content is compared instead; a path given or not is a setting of its own
    ignored = set(MAY_DIFFER_ON_RESUME) | {path for key, path in FINGERPRINTED.items() if key in stored
                                           and then_all.get(path) is not None and now_all.get(path) is not None}
    if then_all.get("kd") == now_all.get("kd"):
        ignored |= unused_flags(now_all.get("kd"), then_all) & unused_flags(now_all.get("kd"), now_all)
    ignored |= {key for key in FINGERPRINTED if key not in stored}  # an older checkpoint: its paths are compared
    differ = []
    for key in sorted((set(stored) | set(vars(args))) - ignored):
        then, now = then_all.get(key), now_all.get(key)
        if then != now:
            differ.append(f"{FINGERPRINT_NAMES.get(key, flags.get(key, key))}: {then!r} in the checkpoint, {now!r} now")
    if differ:
        raise ValueError(f"cannot resume from {path}: this run's settings differ from the ones it was trained with "
                         f"({'; '.join(differ)}); resume with the checkpoint's settings, or start a new run "
                         f"(another --out, or --overwrite to replace this one)")


def check_resumed_model(checkpoint, path, args, num_classes, model_options):
    """ValueError unless the checkpoint holds this run's net (--model, model_options) for this run's data."""
    trained = tuple(checkpoint[key] for key in ("dataset", "model_name", "num_classes", "model_options"))
    if trained != (args.dataset, args.model, num_classes, model_options):
        raise ValueError(f"cannot resume from {path}: it holds {trained[1]} {trained[3]} for {trained[0]} "
                         f"({trained[2]} classes), this run trains {args.model} {model_options} for "
                         f"{args.dataset} ({num_classes} classes)")


# -----------------------------------------------------------------------------
# RNG states, stored per rank in the checkpoint

def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state():
    """This process's RNG states in a form torch.load(weights_only=True) accepts."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(), "numpy": (kind, keys.tolist(), position, has_gauss, cached),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def set_rng_state(state):
    random.setstate(state["python"])
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def all_rng_states(world_size):
    """Every rank's RNG states, indexed by rank (each rank draws its own dropout masks)."""
    states = [None] * world_size
    if world_size > 1:
        dist.all_gather_object(states, rng_state())
    else:
        states[0] = rng_state()
    return states


# -----------------------------------------------------------------------------
# data order that survives a restart

class ResumableSampler(DistributedSampler):
    """DistributedSampler (shuffled, seeded per epoch, drop_last) that yields (epoch, index) pairs
    and can start part-way into an epoch: `start` indices of this rank's share are skipped
    without being loaded, which is how a resumed run picks up at the exact batch it stopped at."""

    def __init__(self, dataset, num_replicas, rank, seed):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.start = 0

    def __iter__(self):
        indices = list(super().__iter__())[self.start:]
        return iter([(self.epoch, index) for index in indices])

    def __len__(self):
        return self.num_samples - self.start


class SeededSamples(Dataset):
    """dataset[index], with torch's global RNG seeded from (seed, epoch, index) for the duration.

    The random augmentation of a sample (data.py draws it from torch's global generator) then
    depends only on which sample is drawn in which epoch: not on the number of workers or ranks,
    and not on whether the run was interrupted and resumed in between. The caller's RNG state is
    restored afterwards, so with workers=0 the training RNG stream is untouched.
    """

    def __init__(self, dataset, seed):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        sample_seed = int(np.random.SeedSequence([self.seed, epoch, index]).generate_state(1)[0])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed)
            return self.dataset[index]


def batches(loader, sampler, iteration, batches_per_epoch):
    """Batches without end, epoch after epoch, starting at batch `iteration` of the run: the
    sampler skips the part of the current epoch that was consumed before (without loading it)."""
    epoch, consumed = divmod(iteration, batches_per_epoch)
    while True:
        sampler.set_epoch(epoch)
        sampler.start = consumed * loader.batch_size
        yield from loader
        epoch, consumed = epoch + 1, 0


def restartable_stream(dataset, what, batch_size, seed, rank, world_size, workers, cuda):
    """(loader, sampler, batches_per_epoch): this rank's share of `dataset`'s shuffled batches of the
    global `batch_size`, in an order a resumed run picks up exactly (ResumableSampler, SeededSamples).
    ValueError naming `what` when it has fewer images than a batch."""
    batch_per_rank = batch_size // world_size
    batches_per_epoch = len(dataset) // world_size // batch_per_rank
    if batches_per_epoch == 0:
        raise ValueError(f"the {what} has {len(dataset)} images, fewer than the global batch size {batch_size}")
    sampler = ResumableSampler(dataset, world_size, rank, seed)
    loader = DataLoader(SeededSamples(dataset, seed), batch_size=batch_per_rank, sampler=sampler, num_workers=workers,
                        pin_memory=cuda, drop_last=True, persistent_workers=workers > 0,
                        worker_init_fn=quiet_on_stop_signals,
                        generator=torch.Generator())  # its own generator: iter(loader) leaves the global RNG alone
    return loader, sampler, batches_per_epoch


def training_batches(streams, iteration):
    """The training batches from `iteration` on: one batch of each stream, concatenated."""
    data = [batches(loader, sampler, iteration, per_epoch) for loader, sampler, per_epoch in streams]
    if len(data) == 1:
        return data[0]
    return ((torch.cat([images for images, _ in parts]), torch.cat([labels for _, labels in parts]))
            for parts in zip(*data))


# -----------------------------------------------------------------------------
# stopping on SIGINT and SIGTERM, after the current step

class StopRequest:
    """While active, SIGINT and SIGTERM only record the signal (`signum`): the loop stops after
    the current step, saves last.pt and raises Interrupted. A signal that comes while the process
    waits for its next batch (`fetching`) abandons the wait. A second signal stops at once (the
    signal's default action; temporaries are removed at the next start)."""

    def __init__(self):
        self.signum, self.previous, self.fetching = 0, {}, False

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # Python allows handlers there only
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.previous[signum] = signal.signal(signum, self.handle)
        return self

    def __exit__(self, *exc_info):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def handle(self, signum, frame):
        if self.signum:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        self.signum = signum
        if self.fetching:
            raise FetchAbandoned


class FetchAbandoned(Exception):
    """Raised by StopRequest into a wait for the next batch."""


def next_batch(data, stop, world_size):
    """The next training batch, or None when a stop signal comes first: the run then stops
    before this step, at once, also when the signal has ended the data workers it waits for (a
    scheduler may signal every process). Under DDP the ranks must agree on the last step, so
    there the batch is always fetched and the ranks stop together after it (agreed_stop)."""
    if world_size > 1:
        return next(data)
    if stop.signum:  # came during the last step's validation or save
        return None
    try:
        stop.fetching = True  # inside the try: from here on a signal abandons the wait
        batch = next(data)
        stop.fetching = False
        return batch
    except FetchAbandoned:
        return None
    finally:
        stop.fetching = False


def agreed_stop(stop, world_size, group):
    """The signal that ends training after this step (0: go on). Under DDP every rank must stop
    at the same step, so the ranks agree every step, over gloo on the CPU: no wait for the GPU."""
    if world_size == 1:
        return stop.signum
    flag = torch.tensor(stop.signum)
    dist.all_reduce(flag, dist.ReduceOp.MAX, group=group)
    return int(flag)


class Interrupted(Exception):
    """Training stopped cleanly on a signal (last.pt saved); run_cli exits with 128 + the signal's
    number, the shell's code for a process ended by that signal (130 SIGINT, 143 SIGTERM)."""

    def __init__(self, message, signum):
        super().__init__(message)
        self.exit_code = 128 + signum


# -----------------------------------------------------------------------------
# checks that save a run from bad data and bad numbers

def decode_split(dataset, workers, rank, world_size, name):
    """Read every item of `dataset` (this rank a share) so that a bad file stops the run before
    training, not at the first validation thousands of iterations later (data.py's errors name it)."""
    share = Subset(dataset, range(rank, len(dataset), world_size))
    loader = DataLoader(share, batch_size=None, num_workers=workers, worker_init_fn=quiet_on_stop_signals)
    for _ in progress_bar(loader, desc=f"checking the {name} images", leave=False):
        pass


def last_good(last_path, saved_iteration):
    """What the error of a stopped run says about last.pt."""
    if saved_iteration is None:
        return "no checkpoint was written"
    return f"{last_path} holds iteration {saved_iteration}"


def check_finite_model(model, iteration, last_path, saved_iteration):
    """FloatingPointError naming the tensors if a parameter or buffer holds NaN or inf, so that a
    checkpoint is only ever a good state: BatchNorm statistics can overflow while the loss stays
    finite. Called before each save: one fused check and one host sync there, none in between."""
    bad = non_finite_tensors(model.state_dict())
    if all_reduce(torch.tensor(len(bad), device=next(model.parameters()).device)).item():
        where = f"{len(bad)} tensors of the model ({listing(bad, 3)})" if bad else "the model on another rank"
        raise FloatingPointError(f"iteration {iteration} left NaN or inf in {where}; training stopped "
                                 f"({last_good(last_path, saved_iteration)}, the last good state)")


# -----------------------------------------------------------------------------
# the command line: one line per error

def one_line(error):
    """The message of `error`. An exception raised in a DataLoader worker comes back as the
    worker's whole traceback ("Caught ValueError in DataLoader worker process 0. Original
    Traceback ..."); its last line holds the original message."""
    message = str(error)
    if message.startswith("Caught ") and "\nOriginal Traceback" in message:
        last = message.rstrip().splitlines()[-1]
        message = last.split(": ", 1)[1] if last.startswith(type(error).__name__ + ":") else last
    return message


def run_cli(main):
    """Run main(); a ValueError, OSError or FloatingPointError (bad input, a missing file or a full
    disk, a non-finite loss) becomes one line "error: ..." on stderr and exit status 2, also when a
    DataLoader worker raised it; Interrupted becomes its one-line message and 128 + the signal."""
    try:
        main()
    except Interrupted as e:
        print(e, file=sys.stderr)
        sys.exit(e.exit_code)
    except (ValueError, OSError, FloatingPointError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)

