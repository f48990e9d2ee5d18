"""
What every script of this project needs to run, and nothing of the project itself: user errors and argparse types,
DDP set-up and tear-down, signals, logging, and outputs (claims, atomic writes, free space, image grids, line plots).
The data directory is in data.py, checkpoints in checkpoint.py, the method in model.py and loss.py. Imports no project
file; nothing here is run directly.
"""
import argparse
import contextlib
import errno
import fcntl
import logging
import math
import os
import shlex
import shutil
import signal
import sys
import zipfile

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

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


def add_run_args(parser, ckpt_every):
    """The flags every trainer shares: how often it logs and checkpoints, where it resumes, the device."""
    parser.add_argument("--log-every", type=positive_int, default=100)
    parser.add_argument("--ckpt-every", type=positive_int, default=ckpt_every)
    parser.add_argument("--resume", type=str, default=None, help="checkpoint to continue from exactly (its step, "
                        "weights, optimisers and the batches still to come)")
    parser.add_argument("--device", type=str, default=None, help="cuda or cpu (default: cuda when available)")


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


def seed(value):
    """An argparse type: a seed from 0 to 2^32 - 1, what every generator of the project takes (numpy's RandomState is
    the narrowest), with room for the per-rank seeds made from it."""
    return integer(0, 2 ** 32 - 1)(value)


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


def run(main, args, interrupted="interrupted", errors=()):
    """Runs a script's main. SIGTERM (a preemption) raises KeyboardInterrupt like Ctrl-C, and either ends in one line
    and exit status 130 after main's own cleanup, further signals ignored (trainers catch both signals themselves:
    StopOnSignal). An OSError that gets this far (a full disk, a read-only folder) ends in one line naming the file and
    the cause; so do a zip file cut short (an npz: zipfile.BadZipFile) and the user errors of library files that cannot
    call fail() (`errors`: fid.UserError for the scripts that use fid.py). Afterwards the job's claims on its outputs
    are released, and the signal handlers and the process group given back."""
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
    except zipfile.BadZipFile as e:
        fail(f"a damaged or truncated zip file (an npz): {e}")
    except errors as e:
        fail(str(e))
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


def check_batch_memory(batch_size, sample_shape, copies=16):
    """One line, before anything is written, when a rank's batch cannot fit in this machine's memory: the batch reader
    keeps batches ahead of the loop, each several float32 tensors of the images' size (the images, their noise, the
    points between), `copies` in all. A lower bound: the networks' activations come on top."""
    need = batch_size * math.prod(sample_shape) * 4 * copies
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > memory:
        fail(f"a batch of {batch_size} per rank of {' x '.join(map(str, sample_shape))} inputs needs at least "
             f"{need / 2 ** 30:.3g} GiB of memory, and this machine has {memory / 2 ** 30:.3g} GiB: give a smaller "
             f"--global-batch-size")


#################################################################################
#                    Outputs: claims, atomic writes, free space                 #
#################################################################################

CLAIMS = []   # (descriptor, lock file, folder the claim created or None) of each output this job holds


def claim(path, flag, folder=False, new=False):
    """Makes this job the only writer of an output (a file, or with folder=True a folder, created if need be) until it
    ends, before it does any work: an exclusive flock on PATH.lock (FOLDER/.lock), which the kernel drops when the
    process dies, so a crashed job blocks nothing. Another job holding it, or an output that cannot be written (a
    missing or read-only folder), ends in one line; so does, with new=True, a file already there (the output of work,
    never replaced: a checkpoint, an npz). Checks of what is already there must come after the claim: two jobs started
    on one new output would both find it empty. The temporary file that a killed writer of a file left (see
    save_atomic) is removed once the claim is held."""
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
    if not folder:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary(path))
    if new and os.path.lexists(path):
        fail(f"{flag} {path} already exists: remove it, or name another file")


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


@contextlib.contextmanager
def save_atomic(path):
    """`with save_atomic(path) as tmp:` the block writes the file to `tmp`, a temporary name beside it with the same
    extension (np.save appends none, Image.save finds the format), which is renamed into place when the block ends,
    so a crash never leaves a half-written file. A failed write (a full disk) removes the temporary file and ends in
    one line naming the cause."""
    tmp = temporary(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.lexists(tmp):
            os.remove(tmp)
        stop = e
        while stop is not None and not isinstance(stop, (KeyboardInterrupt, SystemExit)):
            stop = stop.__context__
        if stop is not None:   # a signal stopped the write: torch's writer then reports "unexpected pos" over it
            raise stop from None
        if isinstance(e, OSError):
            fail(f"cannot write {path}: {e.strerror or e}")
        raise


def temporary(path):
    """save_atomic's temporary name for `path`: NAME.tmp.EXT beside it."""
    root, ext = os.path.splitext(path)
    return f"{root}.tmp{ext}"


def check_room(folder, need, what):
    """One line, before anything is written, when the disk of `folder` has less than `need` bytes free."""
    free = shutil.disk_usage(folder).free
    size = lambda n: f"{n / 2 ** 30:.3g} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.3g} MiB"
    if free < need:
        fail(f"{what} needs {size(need)}, and {folder} has {size(free)} free")


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


def open_npy(path, shape, dtype):
    """An existing .npy (a staging file an interrupted job left) memory-mapped for writing, if it is whole: its header
    says this shape and dtype, and the file holds every byte of it (np.load(mmap_mode="r+") would extend a short file
    with zeros). Anything else raises ValueError saying what is wrong."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        found, _, kind = (np.lib.format.read_array_header_1_0 if version == (1, 0) else
                          np.lib.format.read_array_header_2_0)(f)
        offset = f.tell()
    if found != tuple(shape) or kind != np.dtype(dtype):
        raise ValueError(f"{path} holds {kind} {found}, not {np.dtype(dtype)} {tuple(shape)}")
    if os.path.getsize(path) != offset + math.prod(shape) * kind.itemsize:
        raise ValueError(f"{path} is {os.path.getsize(path)} bytes, not {offset + math.prod(shape) * kind.itemsize}: "
                         "truncated")
    return np.load(path, mmap_mode="r+")


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
    with save_atomic(path) as tmp:
        Image.fromarray(grid).save(tmp, format=image_format(path))


COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def save_curves(path, panels, columns=3, size=(360, 220)):
    """Line plots in one picture, drawn with Pillow alone and written atomically: `panels` is a list of (title,
    {name: [(x, y), ...]}, log), a small panel each, `columns` a row, each series in its colour and named in it under
    the title. y spans the panel's points (log10 of them where log), its lowest, middle and highest values written on
    the left; x runs from the first to the last point (the steps). Points that are not finite, or not positive on a log
    scale, are left out, and so are the series and panels left without points. Returns the number of panels drawn."""
    kept = []
    for title, series, log in panels:
        series = {name: [(x, math.log10(y) if log else y) for x, y in points if math.isfinite(y) and (y > 0 or not log)]
                  for name, points in series.items()}
        if any(series.values()):
            kept.append((title, {name: points for name, points in series.items() if points}, log))
    (w, h), rows = size, max(1, math.ceil(len(kept) / columns))
    image = Image.new("RGB", (w * min(columns, max(1, len(kept))), h * rows), "white")
    draw, font = ImageDraw.Draw(image), ImageFont.load_default(size=12)
    for i, (title, series, log) in enumerate(kept):
        left, top = i % columns * w, i // columns * h
        x0, y0, x1, y1 = box = (left + 62, top + 40, left + w - 16, top + h - 22)   # the plot area
        xs, ys = ([p[j] for points in series.values() for p in points] for j in (0, 1))
        (xlo, xhi), (ylo, yhi) = padded(min(xs), max(xs)), padded(min(ys), max(ys))
        to_px = lambda x, y: (x0 + (x - xlo) / (xhi - xlo) * (x1 - x0), y1 - (y - ylo) / (yhi - ylo) * (y1 - y0))
        draw.text((left + 8, top + 4), title, fill="black", font=font)
        for y in sorted({min(ys), (min(ys) + max(ys)) / 2, max(ys)}):       # a grid line and its value
            label, py = f"{10 ** y if log else y:.3g}", to_px(0, y)[1]
            draw.line((x0, py, x1, py), fill=(225, 225, 225))
            draw.text((x0 - 4 - draw.textlength(label, font=font), py - 7), label, fill="black", font=font)
        for x, shift in ((min(xs), 0), (max(xs), 1)) if max(xs) > min(xs) else ((xs[0], 0.5),):
            label = f"{x:.6g}"
            draw.text((to_px(x, 0)[0] - shift * draw.textlength(label, font=font), y1 + 4), label, fill="black",
                      font=font)
        draw.rectangle(box, outline=(150, 150, 150))
        legend = left + 8
        for k, (name, points) in enumerate(series.items()):
            colour, xy = COLOURS[k % len(COLOURS)], [to_px(x, y) for x, y in points]
            draw.text((legend, top + 21), name, fill=colour, font=font)
            legend += draw.textlength(name, font=font) + 12
            if len(xy) > 1:
                draw.line(xy, fill=colour, width=2)
            for px, py in xy if len(xy) <= 30 else ():         # few points: each marked
                draw.ellipse((px - 2, py - 2, px + 2, py + 2), fill=colour)
    with save_atomic(path) as tmp:
        image.save(tmp, format=image_format(path))
    return len(kept)


def padded(lo, hi):
    """An axis' range: the values' own with 5% to spare each side; a single value gets a range around it."""
    pad = (hi - lo) * 0.05 or abs(lo) * 0.05 or 1.0
    return lo - pad, hi + pad
