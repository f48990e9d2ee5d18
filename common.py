"""
What every script of this project needs to run, and none of the method: user errors and argparse types, DDP set-up
and tear-down, signals, logging, atomic writes, the data directory and its checks, checkpoints (resume and the start
of a new stage), the loaders of trained and official generators and classifiers, image grids. The method itself is
in model.py and loss.py. Nothing here is run directly.
"""
import argparse
import contextlib
import errno
import fcntl
import glob
import json
import logging
import math
import os
import queue
import shlex
import shutil
import signal
import sys
import threading

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

from model import SIZES, Classifier, Generator, default_steps, generate, mode_flags
from vae import SCALE, load_vae

#################################################################################
#                          User errors and argparse types                       #
#################################################################################

def fail(message):
    """A user error: one line on stderr and a non-zero exit, no traceback."""
    raise SystemExit(f"error: {message}")


def parse_nfe(value):
    if value == "any" or (value.isdigit() and int(value) >= 1):
        return value if value == "any" else str(int(value))
    raise argparse.ArgumentTypeError(f"must be a positive integer or 'any', not {value!r}")


def positive_int(value):
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {value!r}")
    return int(value)


def count(value):
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, not {value!r}")
    return int(value)


def integer(lo, hi):
    """An argparse type: an integer in [lo, hi], for sizes that must stay within what a job can hold."""
    def parse(value):
        if not value.isdigit() or not lo <= int(value) <= hi:
            raise argparse.ArgumentTypeError(f"must be an integer from {lo} to {hi}, not {value!r}")
        return int(value)
    return parse


def number(lo=0.0, hi=math.inf, lo_open=False, hi_open=False):
    """An argparse type: a finite float in [lo, hi], ends open where asked ("nan" and "inf" are refused)."""
    def parse(value):
        try:
            x = float(value)
        except ValueError:
            x = math.nan
        if not (math.isfinite(x) and (lo < x if lo_open else lo <= x) and (x < hi if hi_open else x <= hi)):
            raise argparse.ArgumentTypeError(f"must be a number in {'(' if lo_open else '['}{lo}, {hi}"
                                             f"{')' if hi_open else ']'}, not {value!r}")
        return x
    return parse


def check_input(path, what):
    """An input that must be a file (a checkpoint, weights, an npz): one line when it is missing or a folder."""
    if os.path.isdir(path):
        fail(f"{what} {path} is a folder, not a file")
    if not os.path.isfile(path):
        fail(f"{what} {path} does not exist")


def check_output(path, flag, folder=False):
    """Fails before any work when an output path cannot be what it must be: a file (not an existing folder) in a
    folder that exists, or a folder (not an existing file)."""
    if folder and os.path.isfile(path):
        fail(f"{flag} {path} is a file, not a folder")
    if not folder and os.path.isdir(path):
        fail(f"{flag} {path} is a folder; give a file name")
    if not folder and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        fail(f"{flag} {path}: the folder {os.path.dirname(os.path.abspath(path))} does not exist")


#################################################################################
#                          Processes, signals, logging                          #
#################################################################################

def setup_distributed(device):
    """DDP as in DiT and nanoGPT: torchrun sets RANK/WORLD_SIZE, plain `python` runs one process. nccl on CUDA,
    gloo on CPU; the GPU is chosen by the local rank, rank-0-only work by the global rank. Returns (device, global
    rank, world size)."""
    try:
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        fail(f"--device {device} is not a device: use cuda, cuda:N or cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        fail(f"--device {device}, but no GPU is visible")
    if "RANK" not in os.environ:
        return device, 0, 1
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    return device, dist.get_rank(), dist.get_world_size()


def run(main, args, interrupted="interrupted"):
    """Runs a script's main. SIGTERM (a preemption) raises KeyboardInterrupt like Ctrl-C, and either ends in one line
    and exit status 130 after main's own cleanup, further signals ignored (trainers catch both signals themselves:
    StopOnSignal). An OSError that gets this far (a full disk, a read-only folder) ends in one line naming the file and
    the cause. Afterwards the job's claims on its outputs are released, and the signal handlers and the process group
    given back."""
    global STOPPING
    STOPPING = False
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, interrupt)
    try:
        main(args)
    except KeyboardInterrupt:
        ignore_signals()
        print(f"interrupted: {interrupted}", file=sys.stderr)
        sys.exit(130)
    except OSError as e:
        fail(f"{e.filename}: {e.strerror}" if e.filename and e.strerror else f"{type(e).__name__}: {e}")
    finally:
        release_claims()
        for sig, handler in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL)):
            # Stopping, the process only exits now: SIG_IGN, which Python (unlike a handler of its own) keeps to the end.
            signal.signal(sig, signal.SIG_IGN if STOPPING else handler)
        if dist.is_initialized():
            dist.destroy_process_group()


STOPPING = False   # set once a signal has stopped the job: further signals are ignored until the process is gone


def interrupt(signum, frame):
    ignore_signals()
    raise KeyboardInterrupt


def ignore_signals():
    """A job that a signal stops ignores further signals until it has exited: a second Ctrl-C or SIGTERM during the
    interpreter's clean-up (DataLoader workers, threads, atexit hooks) would print their tracebacks. The handler is a
    Python one that does nothing (common.run ends with SIG_IGN): a signal that arrived just before this call, and is
    handled after it, would find SIG_IGN and print "Signal 15 ignored due to race condition"."""
    global STOPPING
    STOPPING = True
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: None)


class StopOnSignal:
    """SIGINT (Ctrl-C) or SIGTERM (a preemption) asks the loop to stop after the current step and write a checkpoint;
    a second signal stops at once. Every rank sees the request at the same step: a CPU all-reduce per step (gloo,
    so it never waits for the GPU)."""
    def __init__(self):
        self.signum = 0
        self.group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self.handle)

    def handle(self, signum, frame):
        if self.signum:
            ignore_signals()
            print(f"{signal.Signals(signum).name} again: stopping now, without a checkpoint", file=sys.stderr)
            raise SystemExit(128 + signum)
        self.signum = signum

    def requested(self):
        flag = torch.tensor([self.signum])
        if self.group is not None:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return int(flag)

    @staticmethod
    def exit(signum, step, path, logger):
        """After the checkpoint: the command that resumes, and the exit status of the signal."""
        ignore_signals()
        logger.info(f"stopped by {signal.Signals(signum).name} after step {step}: resume with {resume_command(path)}")
        raise SystemExit(128 + signum)


def resume_command(path):
    """This job's command with --resume `path` in place of any --resume, --init or --init-d, launched as it was
    (torchrun with as many processes per node; a job of several nodes also needs its rendezvous flags again)."""
    starts, words, argv = ("--resume", "--init", "--init-d"), [], iter(sys.argv[1:])
    for word in argv:
        if word in starts:
            next(argv, None)                                   # and its value
        elif word.split("=", 1)[0] not in starts:
            words.append(word)
    launch = ["python"]
    if "RANK" in os.environ:
        world = int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        nodes = [f"--nnodes={world // local}"] if world != local else []
        launch = ["torchrun", *nodes, f"--nproc_per_node={local}"]
    return shlex.join(launch + [sys.argv[0], *words, "--resume", str(path)])


def create_logger(logging_dir):
    """Rank 0 logs to stdout and log.txt; the other ranks stay silent."""
    logger = logging.getLogger("afm")
    logger.setLevel(logging.INFO)
    logger.handlers.clear()
    if logging_dir is None:
        logger.addHandler(logging.NullHandler())
        return logger
    fmt = logging.Formatter("[%(asctime)s] %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    for handler in (TqdmHandler(), LogFile(os.path.join(logging_dir, "log.txt"))):
        handler.setFormatter(fmt)
        logger.addHandler(handler)
    return logger


class LogFile(logging.FileHandler):
    """log.txt, where a failed write (a full disk) ends the job in one line instead of logging's traceback."""
    def handleError(self, record):
        error = sys.exc_info()[1]
        if not isinstance(error, OSError):                     # a bug (a bad format string) still shows its traceback
            return super().handleError(record)
        fail(f"cannot write {self.baseFilename}: {error.strerror or error}")


class TqdmHandler(logging.Handler):
    """Prints log lines to stdout above the progress bar instead of through it."""
    def emit(self, record):
        tqdm.write(self.format(record), file=sys.stdout)


def reduce_means(sums, count, step, results_dir):
    """Averages the accumulated statistics over steps and ranks; a non-finite one stops the run."""
    keys = sorted(sums)
    values = torch.stack([sums[k] for k in keys]) / count
    if dist.is_initialized():
        dist.all_reduce(values, op=dist.ReduceOp.AVG)
    means = dict(zip(keys, values.tolist()))
    if not all(math.isfinite(v) for v in means.values()):
        ckpts = sorted(glob.glob(os.path.join(results_dir, "checkpoints", "*.pt")))
        fail(f"non-finite loss at step {step} ({', '.join(f'{k} {v:.4g}' for k, v in means.items())}); " +
             (f"the last good checkpoint is {ckpts[-1]}" if ckpts else "no checkpoint was written before it"))
    return means


def check_in_sync(models, device, world, logger):
    """Every rank must end with the same weights: a cheap proof that DDP kept the networks in step."""
    if world == 1:
        return
    check = torch.stack([sum(p.double().sum() for p in m.parameters()) for m in models]).to(device)
    gathered = [torch.zeros_like(check) for _ in range(world)]
    dist.all_gather(gathered, check)
    if not all(torch.equal(g, gathered[0]) for g in gathered):
        raise RuntimeError("ranks ended with different weights")
    logger.info(f"weights identical on all {world} ranks")


def per_rank_batch(global_batch_size, world):
    if global_batch_size % world:
        fail(f"--global-batch-size {global_batch_size} must be divisible by the world size {world}")
    return global_batch_size // world


#################################################################################
#                    Outputs: claims, atomic writes, free space                 #
#################################################################################

CLAIMS = []   # (descriptor, lock file, folder the claim created or None) of each output this job holds


def claim(path, flag, folder=False):
    """Makes this job the only writer of an output (a file, or with folder=True a folder, created if need be) until it
    ends, before it does any work: an exclusive flock on PATH.lock (FOLDER/.lock), which the kernel drops when the
    process dies, so a crashed job blocks nothing. Another job holding it, or an output that cannot be written (a
    missing or read-only folder), ends in one line. Checks of what is already there must come after the claim: two
    jobs started on one new output would both find it empty."""
    check_output(path, flag, folder)
    created = folder and not os.path.isdir(path)
    lock = os.path.join(path, ".lock") if folder else f"{path}.lock"
    try:
        if folder:
            os.makedirs(path, exist_ok=True)
        while True:
            fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                fail(f"{flag} {path} is held by another job that writes it ({lock}): wait for it to end, or give "
                     f"another {flag}")
            with contextlib.suppress(FileNotFoundError):
                if os.path.samestat(os.fstat(fd), os.stat(lock)):
                    break
            os.close(fd)                                       # its holder removed it as it ended: take the new one
    except OSError as e:
        fail(f"cannot write {flag} {path}: {e.strerror}")
    CLAIMS.append((fd, lock, path if created else None))


def release_claims():
    """Ends this job's claims (common.run does, however the job ends): each lock file is removed while still locked,
    so a job waiting on it finds it gone and makes a new one, and a folder that the claim created and that the job
    left empty is removed again."""
    while CLAIMS:
        fd, lock, created = CLAIMS.pop()
        with contextlib.suppress(OSError):
            os.remove(lock)
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):                 # not empty: the job wrote something
                os.rmdir(created)


def save_atomic(obj, path, save=None):
    """Writes through a temporary file renamed into place, so a crash never leaves a half-written file; a failed
    write (a full disk) removes the temporary file and ends in one line naming the cause. torch.save (the default)
    writes through a Python file: given a path, its own writer reports a full disk as "unexpected pos"."""
    tmp = f"{path}.tmp"
    try:
        if save is None:
            with open(tmp, "wb") as f:
                torch.save(obj, f)
        else:
            save(obj, tmp)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.lexists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):
            fail(f"cannot write {path}: {e.strerror or e}")
        raise


def check_room(folder, need, what):
    """One line, before anything is written, when the disk of `folder` has less than `need` bytes free."""
    free = shutil.disk_usage(folder).free
    size = lambda n: f"{n / 2 ** 30:.3g} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.3g} MiB"
    if free < need:
        fail(f"{what} needs {size(need)}, and {folder} has {size(free)} free")


def savez(arrays, path):
    """np.savez to exactly this path (given a name, np.savez would append ".npz" to a temporary one)."""
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def allocate_npy(path, shape, dtype):
    """A new .npy of zeros, memory-mapped for writing, with its disk blocks reserved now: a full disk raises OSError
    here (and leaves no file), not a SIGBUS that kills the process when a page of the mapping is written later."""
    array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    try:
        if hasattr(os, "posix_fallocate"):                    # not on macOS or Windows
            with open(path, "r+b") as f:
                os.posix_fallocate(f.fileno(), 0, os.path.getsize(path))
    except OSError as e:
        if e.errno != errno.EOPNOTSUPP:                       # a file system without it is left as it is
            os.remove(path)
            raise
    return array


def image_format(path):
    """The Pillow format an image file's extension names (PNG for .png, JPEG for .jpg, ...), or one clear line."""
    fmt = Image.registered_extensions().get(os.path.splitext(path)[1].lower())
    if fmt is None or fmt not in Image.SAVE:
        fail(f"{path}: name an image file (.png, .jpg, ...), not {os.path.splitext(path)[1] or 'no extension'}")
    return fmt


def rgb(images):
    """uint8 images (N, C, H, W) with the 3 channels that Inception and the ADM npz format take: a grey image's one
    channel repeated, as everywhere samples are scored (sample.py --npz, train.py --fid-every)."""
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def save_grid(images, path, nrow):
    """Tiles uint8 images (N, C, H, W) into one picture, 2 px apart, in the format its extension names, atomically."""
    n, _, h, w = images.shape
    ncol = math.ceil(n / nrow)
    grid = np.zeros((ncol * (h + 2) + 2, nrow * (w + 2) + 2, 3), dtype=np.uint8)
    for i, image in enumerate(images.permute(0, 2, 3, 1).cpu().numpy()):
        r, c = divmod(i, nrow)
        grid[2 + r * (h + 2):2 + r * (h + 2) + h, 2 + c * (w + 2):2 + c * (w + 2) + w] = image
    save_atomic(Image.fromarray(grid), path, save=lambda im, tmp: im.save(tmp, format=image_format(path)))


#################################################################################
#                                 Data directory                                #
#################################################################################

class LatentData:
    """The directory prepare_latents.py writes, memory-mapped: latents.npy float16 (N, V, C, H, W) with view 1 the
    horizontal flip, optional std.npy of the same shape (posterior std), labels.npy int64 (N,), info.json."""
    def __init__(self, path):
        for name in ("latents.npy", "labels.npy", "info.json"):
            if not os.path.isfile(os.path.join(path, name)):
                fail(f"{path} is not a latent data directory: {name} is missing (make one with prepare_latents.py)")
        try:
            self.latents = np.load(os.path.join(path, "latents.npy"), mmap_mode="r")
            self.labels = np.load(os.path.join(path, "labels.npy"))
            with open(os.path.join(path, "info.json")) as f:
                self.info = json.load(f)
            has_std = os.path.isfile(os.path.join(path, "std.npy"))
            self.std = np.load(os.path.join(path, "std.npy"), mmap_mode="r") if has_std else None
            self.num_classes = self.info["num_classes"]
        except (ValueError, OSError, KeyError, TypeError, AttributeError) as e:
            fail(f"cannot read the data in {path}: {type(e).__name__}: {e}")
        check_data(self, path)
        _, self.views, self.channels, self.size, _ = self.latents.shape
        self.labels = self.labels.astype(np.int64)

    def sample(self, n, generator=None):
        """n random images with a random view each, a posterior draw when std.npy is there, as float32; every draw
        from `generator` (the global one when None)."""
        idx = torch.randint(len(self.labels), (n,), generator=generator).numpy()
        view = torch.randint(self.views, (n,), generator=generator).numpy()
        x = torch.from_numpy(self.latents[idx, view].astype(np.float32))
        if self.std is not None:
            x = x + torch.from_numpy(self.std[idx, view].astype(np.float32)) * torch.randn(x.shape, generator=generator)
        return x, torch.from_numpy(self.labels[idx])


def check_data(data, path):
    """Refuses, in one line, what cannot be latents or [-1, 1] pixels, before a run starts on it: every value of
    latents.npy and std.npy is read."""
    x, labels, info, n = data.latents, data.labels, data.info, len(data.latents)
    if x.ndim != 5 or x.shape[1] < 1 or x.shape[3] != x.shape[4] or 0 in x.shape:
        fail(f"{path}/latents.npy must have shape (N, V, C, S, S) with N, V >= 1, got {x.shape}")
    if x.dtype not in (np.float16, np.float32):
        fail(f"{path}/latents.npy holds {x.dtype}; latents and pixels are float16 or float32 (pixels in [-1, 1])")
    if labels.shape != (n,) or labels.dtype.kind not in "iu":
        fail(f"{path}/labels.npy must hold {n} integers, got {labels.dtype} {labels.shape}")
    k = info.get("num_classes")
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 100_000:
        fail(f"{path}/info.json: num_classes must be an integer from 1 to 100000, got {k!r}")
    if labels.min() < 0 or labels.max() >= k:
        fail(f"{path}: labels must be in [0, {k}), found {labels.min()} to {labels.max()}")
    if data.std is not None and data.std.shape != x.shape:
        fail(f"{path}: std.npy has shape {data.std.shape}, latents.npy {x.shape}")
    pixels = info.get("vae", "none") == "none"
    if pixels and x.shape[2] not in (1, 3):
        fail(f"{path}: pixel data (info.json vae 'none') must be 1 or 3 channels in [-1, 1], got {x.shape[2]} channels")
    if not pixels:
        scale = info.get("scale")
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not scale > 0:
            fail(f"{path}/info.json: latents of the {info['vae']} VAE need a positive `scale`, got {scale!r}")
    for name, array, lo, hi in (("latents.npy", x, *((-1.001, 1.001) if pixels else (-1000, 1000))),
                                ("std.npy", data.std, 0, 1000)):
        bad = first_bad_row(array, lo, hi) if array is not None else None
        if bad is None:
            continue
        row, finite, values = bad
        if not finite:
            fail(f"{path}/{name} holds NaN or inf values (first at row {row})")
        if name == "std.npy":
            fail(f"{path}/std.npy: a posterior std must be in [0, {hi}], row {row} holds values in [{values}]")
        if pixels:
            fail(f"{path}: pixel data (info.json vae 'none') must be 1 or 3 channels in [-1, 1], row {row} holds "
                 f"values in [{values}]")
        fail(f"{path}: values in [{values}] (row {row}) cannot be scaled VAE latents (they are of order 1)")


def first_bad_row(array, lo, hi, chunk_bytes=64 * 2 ** 20):
    """(row, whether it is finite, 'min, max' of it) for the first row of `array` holding NaN, inf or a value outside
    [lo, hi], or None. Every row is read, 64 MiB at a time, by one min-max pass in the stored dtype (NaN propagates
    through it): measured 0.45 s per GB from the page cache on 2 busy CPU cores, so ImageNet's 21 GB of latents take
    about 10 s, plus their reading from disk when not cached (15 s more at 1.4 GB/s)."""
    buffer = np.empty((max(1, chunk_bytes // max(1, array[:1].nbytes)),) + array.shape[1:], array.dtype)
    chunk = torch.from_numpy(buffer)                           # a writable copy: torch will not wrap a read-only map
    for a in range(0, len(array), len(buffer)):
        n = min(len(buffer), len(array) - a)
        buffer[:n] = array[a:a + n]
        low, high = (float(v) for v in torch.aminmax(chunk[:n]))
        if lo <= low and high <= hi:                           # False for NaN
            continue
        rows = chunk[:n].flatten(1)
        finite = torch.isfinite(rows).all(1)
        inside = finite & ((rows >= lo) & (rows <= hi)).all(1)
        k = int(torch.nonzero(~inside)[0])
        return a + k, bool(finite[k]), f"{float(rows[k].min()):.4g}, {float(rows[k].max()):.4g}"
    return None


# info.json's keys that place data in one space (a classifier or a judge fits any data that agree on them), and those
# that with them identify one data set (a resumed run must go on with it); `files_sha1` is the source's identity.
SPACE = ("vae", "scale", "image_size", "classes")
IDENTITY = SPACE + ("num_classes", "num_images", "shape", "files_sha1")


def data_differences(a, b, keys):
    """['key A vs B', ...] over the keys that both info.json dicts hold and on which they differ."""
    flat = lambda i: dict(i, files_sha1=i["source"].get("files_sha1")) if isinstance(i.get("source"), dict) else i
    a, b = flat(a), flat(b)
    short = lambda v: repr(v) if len(repr(v)) <= 60 else repr(v)[:57] + "..."   # a sha1 whole, a list of classes not
    return [f"{k} {short(a[k])} vs {short(b[k])}" for k in keys if k in a and k in b and a[k] != b[k]]


def make_decoder(info, vae_weights, device):
    """G's outputs to [-1, 1] images, as the data's info.json says: through the VAE (after undoing the latent scale),
    or as they are for pixel-space data."""
    if info.get("vae", "none") == "none":
        return lambda x: x
    if vae_weights is None:
        fail(f"these latents come from the {info['vae']} VAE: give its weights with --vae-weights")
    check_input(vae_weights, "--vae-weights")
    try:
        vae = load_vae(vae_weights, device)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    return lambda x: vae.decode(x / info["scale"])


def network_shape(model, data):
    """The constructor arguments every network of `model` size shares on this data."""
    if data.size % SIZES[model]["patch_size"]:
        fail(f"inputs of size {data.size} do not split into patches of {SIZES[model]['patch_size']}")
    return dict(SIZES[model], input_size=data.size, in_channels=data.channels, num_classes=data.num_classes)


#################################################################################
#                           Checkpoints and resume                              #
#################################################################################

def load_checkpoint(path):
    """Loads an untrusted checkpoint file safely (tensors and primitives only), or ends with one clear line."""
    check_input(path, "checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # mmap: no copy of unused parts
    except Exception as e:  # a truncated zip, random bytes or a pickle with code all end here
        fail(f"cannot read checkpoint {path} (corrupt, truncated or not a checkpoint): {type(e).__name__}")


def load_weights(module, state, path, hint=""):
    """module.load_state_dict(state, strict=True), or one line naming what does not fit: the one way a mismatch of
    keys or shapes is reported."""
    try:
        if isinstance(module, torch.optim.Optimizer):
            module.load_state_dict(state)
        else:
            module.load_state_dict(state, strict=True)
    except (RuntimeError, KeyError, TypeError, ValueError, AttributeError) as e:
        detail = " ".join(str(e).split()).split(": ", 1)[-1]   # without "Error(s) in loading state_dict for X:"
        fail(f"{path} does not load into this {type(module).__name__}: {detail[:240]}{hint}")


def load_training_checkpoint(path, config):
    """A whole training checkpoint (of train.py, twinflow.py or train_classifier.py) of this very network
    configuration, or one clear line."""
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("config"), dict) or "step" not in ckpt:
        fail(f"{path} is not a training checkpoint of this project")
    if "rng" not in ckpt:
        fail(f"{path} holds a generator alone (sample.py --save-generator); continuing needs a training checkpoint")
    if set(ckpt["config"]) != set(config):
        kind = lambda c: ("a classifier" if "C" in c else "a TwinFlow network" if "F" in c else
                          "a generator and a discriminator")
        fail(f"{path} holds {kind(ckpt['config'])}, and this run trains {kind(config)}")
    if ckpt["config"] != config:
        flat = lambda c: {f"{k}.{j}" if isinstance(v, dict) else k: w
                          for k, v in c.items() for j, w in (v.items() if isinstance(v, dict) else [(k, v)])}
        old, new = flat(ckpt["config"]), flat(config)
        diffs = [f"{k} {old.get(k)} (asked: {new.get(k)})" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        fail(f"{path} holds another network than this run asks for: {', '.join(diffs[:4])}")
    return ckpt


def load_starts(args, config, max_steps, data_info):
    """The checkpoints a run starts from, read before the run writes anything: --resume (the exact continuation of a
    run, on the same data), or --init (a new stage from a run's last checkpoint) and --init-d (D from an earlier one).
    Scripts without --init or --init-d have --resume alone. Then rank 0 claims --results-dir and checks it."""
    flags = {key: getattr(args, key, None) for key in ("resume", "init", "init_d")}
    if flags["resume"] and (flags["init"] or flags["init_d"]):
        fail("--resume continues a run exactly; --init and --init-d start a new stage: give one or the other")
    starts = {key: load_training_checkpoint(path, config) for key, path in flags.items() if path}
    if start_step(starts) >= max_steps:
        fail(f"the checkpoint is at step {start_step(starts)}, already at --max-steps {max_steps}: ask for more steps")
    differ = data_differences(starts.get("resume", {}).get("data_info", {}), data_info, IDENTITY)
    if differ:
        hint = "; a new stage on other data starts with --init" if hasattr(args, "init") else ""
        fail(f"--resume {args.resume} was trained on other data than --data-path {args.data_path}: "
             f"{', '.join(differ)}{hint}")
    if not dist.is_initialized() or dist.get_rank() == 0:
        claim(args.results_dir, "--results-dir", folder=True)
    check_results_dir(args.results_dir, args.resume)
    return starts


def start_step(starts):
    return starts.get("resume", starts.get("init", {})).get("step", 0)


def check_results_dir(results_dir, resume):
    """A run never overwrites another: a results directory that holds a run takes only a --resume of that run."""
    check_output(results_dir, "--results-dir", folder=True)
    ckpts = os.path.join(results_dir, "checkpoints")
    holds_run = bool(glob.glob(os.path.join(ckpts, "*.pt")))   # a run that never saved a checkpoint may be redone
    this_run = resume and os.path.isdir(ckpts) and os.path.samefile(os.path.dirname(os.path.abspath(resume)), ckpts)
    if holds_run and not this_run:
        fail(f"{results_dir} already holds a run: continue it with --resume {ckpts}/<last>.pt, or give a fresh "
             f"--results-dir")


def restore_state(state, starts, args, logger, data_info=None, init_from="EMA"):
    """Loads the starting checkpoints into `state` (name -> module or optimizer) and returns the step to start from.
    --resume restores everything. --init starts a stage as the paper does (Table 11): G from the previous stage's EMA
    (init_from), and the EMA, D, both optimizers and the gradient normalisation carried over (its running scale too:
    restarted from zero it would make the first G steps ~3x too large). --init-d then takes D and its optimizer from
    an earlier checkpoint (App. C). The optimizers keep this command's lr, betas, eps and weight decay. A start from
    other data than data_info's is noted in the log."""
    hyper = {key: {k: opt.param_groups[0][k] for k in ("lr", "betas", "eps", "weight_decay")}
             for key, opt in state.items() if isinstance(opt, torch.optim.Optimizer)}
    paths = {key: getattr(args, key) for key in starts}
    for key, source in (("resume", None), ("init", init_from)):
        for name, module in state.items() if key in starts else ():
            load_weights(module, starts[key][source if name == "G" and source else name], paths[key])
    if "init_d" in starts:
        for name in ("D", "opt_D"):
            load_weights(state[name], starts["init_d"][name], paths["init_d"])
    for key, values in hyper.items():
        state[key].param_groups[0].update(values)
    for key, ckpt in starts.items():
        differ = data_differences(ckpt.get("data_info", {}), data_info or {}, IDENTITY)
        logger.info(f"--{key.replace('_', '-')} {getattr(args, key)} (step {ckpt['step']})" +
                    (f"; note: trained on other data than --data-path ({', '.join(differ)})" if differ else ""))
    return start_step(starts)


def check_checkpoint_room(state, results_dir, what="a checkpoint of this run"):
    """On rank 0, one line when the disk has no room for the next checkpoint of `state`: about the size of the last
    one, or before the first the state's tensors (Adam's two moments per parameter counted before the first step
    makes them). Trainers call it before they train, so a run that could not save fails at once."""
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    last = sorted(glob.glob(os.path.join(results_dir, "checkpoints", "*.pt")))
    check_room(os.path.join(results_dir, "checkpoints"), os.path.getsize(last[-1]) if last else state_bytes(state),
               what + (f" (the last is {last[-1]})" if last else ""))


def state_bytes(state):
    total = 0
    for m in state.values():
        if isinstance(m, torch.optim.Optimizer):
            moments = [v for s in m.state.values() for v in s.values() if torch.is_tensor(v)]
            total += sum(t.nbytes for t in moments) or 2 * sum(p.nbytes for g in m.param_groups for p in g["params"])
        else:
            total += sum(t.nbytes for t in m.state_dict().values())
    return total


def save_checkpoint(state, step, args, config, data_info, device, logger, data_rng=None):
    """The modules in `state`, the step, the command, the networks' config, the data's info and every rank's RNG
    states (with data_rng, the state of the batch reader's generator after the last batch the loop took). A disk
    without room for it ends the run in one line before anything is written."""
    path = os.path.join(args.results_dir, "checkpoints", f"{step:07d}.pt")
    check_checkpoint_room(state, args.results_dir, f"the checkpoint of step {step}")
    ckpt = dict({k: m.state_dict() for k, m in state.items()}, step=step, args=vars(args), config=config,
                data_info=data_info, rng=gather_rng_states(device, data_rng))
    if not dist.is_initialized() or dist.get_rank() == 0:
        save_atomic(ckpt, path)
        logger.info(f"saved {path}")
    if dist.is_initialized():
        dist.barrier()
    return path


def gather_rng_states(device, data_rng=None):
    """Every rank's RNG states, so a resumed run draws exactly the batches and noise it would have drawn."""
    state = dict(cpu=torch.get_rng_state(), cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                 data=data_rng)
    if not dist.is_initialized():
        return [state]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


def restore_rng(ckpt, seed, rank, world, step, device):
    """Per-rank streams of batches and noise: a resumed checkpoint's when the world size is the same, else fresh
    ones for this step (a new stage, or another world size). Returns the generator of a BatchReader's draws, seeded
    apart from the global one (which draws D's R1/R2 noise and the augmentation on the CPU)."""
    base = seed * world + rank
    torch.manual_seed(base)
    data_rng = torch.Generator().manual_seed(base + 2 ** 32)
    if ckpt is not None and len(ckpt["rng"]) == world:
        torch.set_rng_state(ckpt["rng"][rank]["cpu"])
        if device.type == "cuda" and ckpt["rng"][rank]["cuda"] is not None:
            torch.cuda.set_rng_state(ckpt["rng"][rank]["cuda"], device)
        if ckpt["rng"][rank].get("data") is not None:
            data_rng.set_state(ckpt["rng"][rank]["data"])
    elif step > 0:
        torch.manual_seed(base * 1_000_003 + step)
        data_rng.manual_seed(base * 1_000_003 + step + 2 ** 32)
    return data_rng


class BatchReader:
    """Makes the batches on a background thread, `depth` ahead of the loop, so that reading the memory-mapped data
    (a page fault per image from a network file system) and drawing the noise overlap the device's work, and copies
    them to the device from pinned memory without a sync. make(generator) -> dict of CPU tensors draws everything
    from `generator`; `state` is the generator's state after the last batch next() returned, what a checkpoint keeps
    so that a resumed run draws exactly the batches it would have drawn."""
    def __init__(self, make, generator, device, depth=2):
        self.make, self.generator, self.device = make, generator, device
        self.state = generator.get_state()
        self.queue, self.stopped = queue.Queue(maxsize=depth), threading.Event()
        self.thread = threading.Thread(target=self._fill, daemon=True)
        self.thread.start()

    def _fill(self):
        while not self.stopped.is_set():
            try:
                batch = self.make(self.generator)
                if self.device.type == "cuda":
                    batch = {k: v.pin_memory() for k, v in batch.items()}
                item = (batch, self.generator.get_state())
            except BaseException as e:                        # handed to the loop, which raises it
                item = (e, None)
            self.queue.put(item)
            if item[1] is None:
                return

    def next(self):
        batch, state = self.queue.get()
        if state is None:
            raise batch
        self.state = state
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def close(self):
        self.stopped.set()
        while self.thread.is_alive():                         # unblock a put() waiting for room
            try:
                self.queue.get(timeout=0.1)
            except queue.Empty:
                pass


#################################################################################
#                   Generators and classifiers, ours and official               #
#################################################################################

# The official release's .pth files are bare state dicts of networks on ImageNet 256 latents of the SD VAE.
OFFICIAL_DATA = dict(vae="sd-vae-ft-mse", scale=SCALE, num_classes=1000)              # as info.json would say
OFFICIAL_SHAPE = dict(input_size=32, in_channels=4, num_classes=1000)


def is_state_dict(ckpt):
    return isinstance(ckpt, dict) and bool(ckpt) and all(isinstance(v, torch.Tensor) for v in ckpt.values())


def load_generator(path, model=None, nfe=None, repeat=None, weights="EMA"):
    """(Generator, its default number of sampling steps, data info) from a training checkpoint (its config decides the
    network; TwinFlow's is an any-step generator that samples in one step by default) or from an official release
    .pth (a bare state dict for ImageNet-256 latents; --model, --nfe and --repeat say which network it is: the keys of
    few-step and repeated generators are the same, so only a wrong size can be caught there)."""
    ckpt = load_checkpoint(path)
    if isinstance(ckpt, dict) and "config" in ckpt:
        config, info = ckpt["config"], ckpt.get("data_info", {})
        net = "F" if "F" in config else "G"
        if net not in config or weights not in ckpt:
            fail(f"{path} holds no {weights} generator (" + ("a classifier checkpoint" if "C" in config else
                 "a generator alone, as sample.py --save-generator writes it: its EMA") + ")")
        trained = dict(model=ckpt["args"]["model"], nfe=config["nfe"], repeat=config[net]["repeat"])
        for key, value in dict(model=model, nfe=nfe, repeat=repeat).items():
            if value is not None and value != trained[key]:
                fail(f"{path} holds a --{key} {trained[key]} model, not --{key} {value}")
        kwargs, state, steps = config[net], ckpt[weights], 1 if net == "F" else default_steps(config["nfe"])
    elif is_state_dict(ckpt):
        if model is None:
            fail(f"{path} is a bare state dict: say which network it is with --model (and --nfe, --repeat)")
        nfe, repeat = nfe or "1", repeat or 1
        kwargs, steps = dict(SIZES[model], **OFFICIAL_SHAPE, **mode_flags(nfe, repeat)[0]), default_steps(nfe)
        state, info = ckpt, dict(OFFICIAL_DATA)
    else:
        fail(f"{path} is neither a training checkpoint nor a generator state dict")
    try:
        G = Generator(**kwargs)
    except ValueError as e:                                    # e.g. --repeat with --nfe 2
        fail(str(e))
    load_weights(G, state, path, ": check --model, --nfe and --repeat")
    return G.eval().requires_grad_(False), steps, info


def load_classifier(path, weights="EMA"):
    """The frozen time-conditioned classifier of a train_classifier.py checkpoint (its EMA weights by default), or of
    the official release's classifier.pth (a bare B/2 state dict for ImageNet-256 latents), and the info.json of the
    data it was trained on; one clear line when the file is neither."""
    ckpt = load_checkpoint(path)
    if is_state_dict(ckpt):
        ckpt = dict(EMA=ckpt, config=dict(C=dict(SIZES["B/2"], **OFFICIAL_SHAPE)), data_info=dict(OFFICIAL_DATA))
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("config"), dict) or "C" not in ckpt["config"]:
        fail(f"{path} is not a classifier checkpoint of train_classifier.py")
    try:
        C = Classifier(**ckpt["config"]["C"])
    except TypeError as e:
        fail(f"{path} holds a classifier that does not load: {e}")
    load_weights(C, ckpt.get(weights), path)
    return C.eval().requires_grad_(False), ckpt.get("data_info", {})


def make_grid_writer(args, data, device, steps, ema_decay=None):
    """Fixed noise and labels (8 samples of each of up to 10 classes, a row per class); returns a function that writes
    a PNG grid of each generator it is given to RESULTS/samples/, sampled in `steps` steps, so a run can be watched.
    With ema_decay, the log says while the EMA is still mostly its initialisation."""
    decode = make_decoder(data.info, args.vae_weights, device)
    shown = min(data.num_classes, 10)
    labels = [k * data.num_classes // shown for k in range(shown) for _ in range(8)]

    def write(step, generators):
        if not dist.is_initialized() or dist.get_rank() == 0:
            os.makedirs(os.path.join(args.results_dir, "samples"), exist_ok=True)
            for name, G in generators.items():
                images = torch.cat([x for _, x, _ in generate(G, steps, decode, list(range(len(labels))), labels,
                                                           args.global_seed, 64, device)])
                save_grid(images, os.path.join(args.results_dir, "samples", f"{step:07d}_{name}.png"), nrow=8)
            # With decay d the EMA still holds d^step of its initialisation (a zero-output G: a grey grid).
            share = ema_decay ** step if ema_decay else 0
            note = f"; the EMA is still {share:.0%} its initialisation (decay {ema_decay})" if share > 0.01 else ""
            logging.getLogger("afm").info(f"step {step:07d} sample grids in {args.results_dir}/samples{note}")
        if dist.is_initialized():
            dist.barrier()
    return write
