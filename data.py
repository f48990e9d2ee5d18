"""
The data directory that prepare_latents.py writes, as the trainers read it: LatentData and its checks, the keys that
identify a data set, the batch reader that overlaps reading with the device's work, the decoder of samples to images
and the grids a run writes of its generators. Nothing here is run directly.
"""
import json
import logging
import os
import queue
import threading

import numpy as np
import torch
import torch.distributed as dist

from common import check_input, fail, save_grid
from model import SIZES, generate
from vae import SmallAE, file_sha1, load_vae

#################################################################################
#                                 Data directory                                #
#################################################################################

class LatentData:
    """The directory prepare_latents.py writes, memory-mapped: latents.npy float16 (N, V, C, H, W) with view 1 the
    horizontal flip, optional std.npy of the same shape (posterior std), labels.npy int64 (N,), info.json."""
    def __init__(self, path):
        for name in ("latents.npy", "labels.npy", "info.json"):
            if os.path.isdir(os.path.join(path, name)):
                fail(f"{path}/{name} is a folder, not a file (a latent data directory holds the files latents.npy, "
                     "labels.npy and info.json)")
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
        except (ValueError, OSError, KeyError, TypeError, AttributeError, EOFError) as e:
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
    latents.npy and std.npy is read. The same pass takes a checksum of their bytes (and of the labels), which joins
    info.json's keys in the data's identity (`contents_checksum`): a run resumes only on the contents it was trained on,
    even in a directory written by hand with the same info.json."""
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
    checksum = row_checksum(labels.reshape(len(labels), -1))
    for name, array, lo, hi in (("latents.npy", x, *((-1.001, 1.001) if pixels else (-1000, 1000))),
                                ("std.npy", data.std, 0, 1000)):
        bad, checksum = first_bad_row(array, lo, hi, checksum) if array is not None else (None, checksum)
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
    info["contents_checksum"] = f"{checksum:016x}"


def first_bad_row(array, lo, hi, checksum=0, chunk_bytes=64 * 2 ** 20):
    """((row, whether it is finite, 'min, max' of it) for the first row of `array` holding NaN, inf or a value outside
    [lo, hi], or None; `checksum` continued over the array's rows, see row_checksum). Every row is read, 64 MiB at a
    time, by one min-max pass in the stored dtype (NaN propagates through it) and one sum for the checksum: measured
    0.45 s per GB from the page cache on 2 busy CPU cores for the min-max alone; on 2 cores running 8 to 12 jobs, 1.0 to
    1.6 s per GB with the checksum against 0.8 to 1.0 without. ImageNet's 21 GB of latents take about 15 s, plus their
    reading from disk when not cached (15 s more at 1.4 GB/s)."""
    buffer = np.empty((max(1, chunk_bytes // max(1, array[:1].nbytes)),) + array.shape[1:], array.dtype)
    chunk = torch.from_numpy(buffer)                           # a writable copy: torch will not wrap a read-only map
    for a in range(0, len(array), len(buffer)):
        n = min(len(buffer), len(array) - a)
        buffer[:n] = array[a:a + n]
        checksum = row_checksum(buffer[:n].reshape(n, -1), a, checksum)
        low, high = (float(v) for v in torch.aminmax(chunk[:n]))
        if lo <= low and high <= hi:                           # False for NaN
            continue
        rows = chunk[:n].flatten(1)
        finite = torch.isfinite(rows).all(1)
        inside = finite & ((rows >= lo) & (rows <= hi)).all(1)
        k = int(torch.nonzero(~inside)[0])
        return (a + k, bool(finite[k]), f"{float(rows[k].min()):.4g}, {float(rows[k].max()):.4g}"), checksum
    return None, checksum


def row_checksum(rows, first=0, checksum=0):
    """`checksum` continued over rows (n, D) numbered from `first`: the sum over rows of (row number + 1) times the sum
    of the row's bytes read as 64-bit words (narrower where the row is not a whole number of them), modulo 2^64. One
    changed value changes it, and so does an exchange of rows; as fast as a plain sum, which a CRC-32 is not (3x
    slower here)."""
    width = next(w for w in (8, 4, 2, 1) if rows.shape[1] * rows.itemsize % w == 0)
    sums = rows.view(f"<i{width}").sum(1, dtype=np.int64)     # wraps modulo 2^64, as the checksum does
    return (checksum + int((sums * np.arange(first + 1, first + len(rows) + 1)).sum())) % 2 ** 64


# info.json's keys that place data in one space (a classifier or a judge fits any data that agree on them), and those
# that with them identify one data set (a resumed run must go on with it); `files_sha1` is the source's identity,
# `contents_checksum` (check_data's) that of the arrays themselves; `ae`, the small autoencoder's config and sha1.
SPACE = ("vae", "scale", "image_size", "classes", "ae")
IDENTITY = SPACE + ("num_classes", "num_images", "shape", "files_sha1", "contents_checksum")


def data_differences(a, b, keys):
    """['key A vs B', ...] over the keys that both info.json dicts hold and on which they differ."""
    flat = lambda i: dict(i, files_sha1=i["source"].get("files_sha1")) if isinstance(i.get("source"), dict) else i
    a, b = flat(a), flat(b)
    short = lambda v: repr(v) if len(repr(v)) <= 60 else repr(v)[:57] + "..."   # a sha1 whole, a list of classes not
    return [f"{k} {short(a[k])} vs {short(b[k])}" for k in keys if k in a and k in b and a[k] != b[k]]


def check_vae_weights(info, vae_weights):
    """--vae-weights for pixel data, which nothing decodes, is a mistake (of data, or of command): one line."""
    if vae_weights is not None and info.get("vae", "none") == "none":
        fail(f"--vae-weights {vae_weights}: these are pixels (info.json vae 'none'), which need no decoder; leave "
             "it out")


def make_decoder(info, vae_weights, device):
    """G's outputs to [-1, 1] images, as the data's info.json says: through the VAE (after undoing the latent scale),
    or as they are for pixel-space data. The small autoencoder (info.json vae 'ae') must be the very file that encoded
    the data (its sha1)."""
    check_vae_weights(info, vae_weights)
    if info.get("vae", "none") == "none":
        return lambda x: x
    if vae_weights is None:
        fail(f"these latents come from the {info['vae']} VAE: give its weights with --vae-weights")
    check_input(vae_weights, "--vae-weights")
    try:
        vae = load_vae(vae_weights, device)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    ae = info["vae"] == "ae"
    if ae != isinstance(vae, SmallAE):
        fail(f"--vae-weights {vae_weights} holds {'a small autoencoder (train_ae.py)' if not ae else 'a KL VAE'}; "
             f"these latents come from the {info['vae']} {'autoencoder' if ae else 'VAE'}")
    if ae and file_sha1(vae_weights) != info.get("ae", {}).get("sha1"):
        fail(f"--vae-weights {vae_weights} is not the autoencoder that encoded these latents "
             f"({info.get('source', {}).get('vae_weights')}, sha1 {str(info.get('ae', {}).get('sha1'))[:12]}...)")
    return lambda x: vae.decode(x / info["scale"])


def network_shape(model, data):
    """The constructor arguments every network of `model` size shares on this data."""
    if data.size % SIZES[model]["patch_size"]:
        fail(f"inputs of size {data.size} do not split into patches of {SIZES[model]['patch_size']}")
    return dict(SIZES[model], input_size=data.size, in_channels=data.channels, num_classes=data.num_classes)


#################################################################################
#                                The batch reader                               #
#################################################################################

class BatchReader:
    """Draws the batches of a trainer on a background thread, `depth` ahead of the loop, so that reading the
    memory-mapped data (a page fault per image from a network file system) and drawing the noise overlap the device's
    work, and copies them to the device from pinned memory without a sync. A batch is `batch_size` images of `data`
    (LatentData.sample) completed by `times` (loss.afm_batch or loss.twinflow_batch, given `options`) with a step's
    times and noise, every draw from `generator`. `state` is the generator's state after the last batch next()
    returned, what a checkpoint keeps so that a resumed run draws exactly the batches it would have drawn."""
    def __init__(self, data, batch_size, times, generator, device, depth=2, **options):
        self.data, self.batch_size, self.times, self.options = data, batch_size, times, options
        self.generator, self.device = generator, device
        self.state = generator.get_state()
        self.queue, self.stopped = queue.Queue(maxsize=depth), threading.Event()
        self.thread = threading.Thread(target=self._fill, daemon=True)
        self.thread.start()

    def _fill(self):
        while not self.stopped.is_set():
            try:
                x, y = self.data.sample(self.batch_size, self.generator)
                batch = self.times(x, y, generator=self.generator, **self.options)
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
#                             Sample grids of a run                             #
#################################################################################

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
