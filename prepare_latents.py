"""
Encode images into the data set that train.py reads: an ImageNet-style folder (one sub-folder per class), an IDX
image file of the MNIST family (Fashion-MNIST, MNIST, KMNIST; its labels file beside it) or an npz of uint8 images
with labels (`arr_0` and `labels`, as ADM writes them).

    python prepare_latents.py --data-path /data/imagenet/train --out data/imagenet256 --vae-weights sd-vae-ft-mse.pth
    torchrun --nproc_per_node=8 prepare_latents.py --data-path ... --out ... --vae-weights ...    # 8 GPUs
    python prepare_latents.py --data-path ... --out data/pixels64 --vae none --image-size 64       # pixels, no VAE
    python prepare_latents.py --data-path /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz \
        --out data/fmnist --vae none --image-size 32                                               # 28 px padded to 32
    python prepare_latents.py --data-path .../train-images-idx3-ubyte.gz --out data/fmnist-ae --vae ae \
        --vae-weights results/ae/checkpoints/0003000.pt                     # 28 px through train_ae.py's autoencoder
    python prepare_latents.py --benchmark --vae-weights sd-vae-ft-mse.pth                         # encoder images/s

Folder images are centre-cropped as ADM does; IDX and npz images keep their size unless --image-size asks for
another (a larger size pads them with zeros, centred; a smaller one crops and resizes as ADM does). Each image is
stored twice, as is (view 0) and mirrored (view 1):
    latents.npy  float16 (N, 2, 4, S/8, S/8)  posterior mean * 0.18215  (--vae none: pixels in [-1, 1], N,2,C,S,S)
    std.npy      float16 (N, 2, 4, S/8, S/8)  posterior std * 0.18215   (not written with --vae none)
    (--vae ae: latents.npy (N, 2, latent, s, s), the autoencoder's latents scaled to unit std over the set, no std.npy)
    labels.npy   int64 (N,)                   index into info.json's `classes` (sorted folder names, or 0..K-1)
    info.json    num_classes, image_size, scale, vae, classes, num_images, ...
    skipped.txt  images that could not be decoded, with the reason (they are left out of the arrays)
Interrupted (Ctrl-C, SIGTERM, a crash)? Run the same command again: finished chunks are kept and the result is
byte-identical. Directory links in class folders are followed, each real directory once.
"""
import argparse
import gzip
import hashlib
import json
import math
import os
import struct
import sys
import time
import zipfile
import zlib

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

from common import (allocate_npy, check_output, check_room, claim, fail, integer, open_npy, positive_int, run,
                    save_atomic, setup_distributed)
from vae import SCALE, AutoencoderKL, SmallAE, file_sha1, load_ae, load_vae

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")


#################################################################################
#                                     Images                                    #
#################################################################################

def walk_once(top):
    """os.walk(top) following directory links, but into each real directory once and never back into top or a folder
    above it, so that a link loop neither repeats images nor leaves top's tree. Sub-folders in sorted order."""
    identity = lambda path: (os.stat(path).st_dev, os.stat(path).st_ino)
    seen, up = set(), top
    while identity(up) not in seen:  # top and every folder above it, up to /
        seen.add(identity(up))
        up = os.path.join(up, "..")
    for folder, subfolders, names in os.walk(top, followlinks=True):
        keep = []
        for d in sorted(subfolders):
            real = identity(os.path.join(folder, d))
            if real not in seen:
                seen.add(real)
                keep.append(d)
        subfolders[:] = keep
        yield folder, names


def list_images(root):
    """Labels = sorted class-folder names; files in sorted order (sub-folders included), paths relative to root."""
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    files, labels = [], []
    for label, name in enumerate(classes):
        for folder, names in walk_once(os.path.join(root, name)):
            files += [os.path.relpath(os.path.join(folder, n), root) for n in sorted(names)
                      if n.lower().endswith(IMAGE_EXTENSIONS)]
        labels += [label] * (len(files) - len(labels))
    return classes, files, labels


def center_crop_arr(img, image_size):
    """ADM's centre crop: halve with a box filter while the short side is >= 2x the target, bicubic-resize the short
    side to image_size, crop the centre (center_crop_arr in
    https://github.com/openai/guided-diffusion/blob/main/guided_diffusion/image_datasets.py)."""
    while min(img.size) >= 2 * image_size:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.BOX)
    scale = image_size / min(img.size)
    img = img.resize(tuple(round(s * scale) for s in img.size), resample=Image.BICUBIC)
    arr = np.asarray(img)
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[top:top + image_size, left:left + image_size]  # (S, S, 3) uint8


def load_image(path, image_size):
    """-> ((S, S, 3) uint8, None), or (zeros, the reason) when the file cannot be decoded."""
    try:
        with Image.open(path) as img:
            # Transparent pixels are composited onto white, as a viewer shows them; a plain convert("RGB") would
            # expose whatever colour hides under alpha 0 (often black). CMYK/grayscale/palette use Pillow's conversion.
            if "A" in img.getbands() or "a" in img.getbands() or "transparency" in img.info:
                img = img.convert("RGBA")
                img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img)
            return center_crop_arr(img.convert("RGB"), image_size), None
    except Exception as e:  # any decoding failure (truncated, not an image, bomb): skip the image, never crash the job
        return np.zeros((image_size, image_size, 3), np.uint8), f"{type(e).__name__}: {e}"


class ImageFiles(torch.utils.data.Dataset):
    def __init__(self, root, files, image_size):
        self.root, self.files, self.image_size = root, files, image_size

    def __getitem__(self, i):
        arr, error = load_image(os.path.join(self.root, self.files[i]), self.image_size)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1), error is None  # (3, S, S) uint8, good?


#################################################################################
#                          Small-image files: IDX and npz                       #
#################################################################################

def read_idx(path):
    """An IDX array of uint8 (the MNIST family's format), gzip-compressed or not: two zero bytes, the type 0x08, the
    number of dimensions, the sizes as big-endian uint32, then the values."""
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:  # (a damaged .gz)
        fail(f"cannot read {path}: {e}")
    ndim = raw[3] if len(raw) > 3 else 0
    if raw[:3] != b"\0\0\x08" or ndim == 0 or len(raw) < 4 + 4 * ndim:
        fail(f"{path} is not an IDX file of uint8 values (the MNIST format)")
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    if len(raw) != 4 + 4 * ndim + math.prod(dims):
        fail(f"{path} is truncated or corrupt: its header says {dims}, its size does not match")
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def read_arrays(path):
    """(uint8 images (N, H, W, C), int64 labels (N,)) of an IDX image file (the labels are the matching
    *-labels-idx1-ubyte file beside it) or of an npz holding `arr_0` and `labels` (or `arr_1`)."""
    if path.endswith(".npz"):
        if not zipfile.is_zipfile(path):
            fail(f"{path} is not an npz file")
        try:
            with np.load(path) as f:
                label_key = next((k for k in ("labels", "arr_1") if k in f.files), None)
                if "arr_0" not in f.files or label_key is None:
                    fail(f"{path} needs the images in `arr_0` and the labels in `labels` (found {f.files})")
                images, labels = f["arr_0"], f[label_key]
        except (OSError, ValueError, EOFError) as e:
            fail(f"cannot read {path}: {e}")
    else:
        label_path = os.path.join(os.path.dirname(path), os.path.basename(path).replace("images-idx3", "labels-idx1"))
        if not os.path.isfile(label_path):
            fail(f"no labels for {path}: expected {label_path} (an MNIST-family *-images-idx3-ubyte file's labels)")
        images, labels = read_idx(path), read_idx(label_path)
    images = images[..., None] if images.ndim == 3 else images                # (N, H, W, C)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] not in (1, 3) or 0 in images.shape:
        fail(f"{path}: images must be uint8 (N, H, W) or (N, H, W, 1 or 3), got {images.dtype} {images.shape}")
    if labels.shape != images.shape[:1] or labels.dtype.kind not in "iu" or labels.min() < 0:
        fail(f"{path}: labels must be {len(images)} non-negative integers, got {labels.dtype} {labels.shape}")
    if labels.max() >= 10**6:  # class indices 0..K-1: a huge one is a damaged file, not a million classes
        fail(f"{path}: labels must be class indices 0..K-1, got {labels.max()}")
    return images, labels.astype(np.int64)


def fit(image, size):
    """(H, W, C) uint8 -> (size, size, C): zero-padded around the centre when it fits (28 -> 32 for the MNIST family,
    whose background is 0), else cropped and resized as ADM does."""
    h, w, c = image.shape
    if h <= size and w <= size:
        top, left = (size - h) // 2, (size - w) // 2
        out = np.zeros((size, size, c), np.uint8)
        out[top:top + h, left:left + w] = image
        return out
    return center_crop_arr(Image.fromarray(image[..., 0] if c == 1 else image), size).reshape(size, size, c)


class ArrayImages(torch.utils.data.Dataset):
    def __init__(self, images, image_size):
        self.images, self.image_size = images, image_size

    def __getitem__(self, i):
        return torch.from_numpy(np.array(fit(self.images[i], self.image_size))).permute(2, 0, 1), True  # (C, S, S)


def open_source(path, image_size):
    """-> (classes, names, labels, dataset, channels, image_size, sha1 of what was read) for a class folder, an IDX
    image file or an npz; sha1 identifies the input, so that a resumed run continues the same one."""
    if os.path.isdir(path):
        try:
            classes, files, labels = list_images(path)
        except OSError as e:
            fail(f"cannot list the images in {path}: {e}")
        if not files:
            fail(f"no images in class sub-folders of {path} (expected one folder per class)")
        empty = sorted(set(classes) - {classes[label] for label in labels})
        if empty:
            fail(f"{len(empty)} class folder(s) without images in {path}: {', '.join(empty[:5])}")
        image_size = image_size or 256
        sha1 = hashlib.sha1("\n".join(f"{l} {f}" for l, f in zip(labels, files)).encode()).hexdigest()
        return classes, files, labels, ImageFiles(path, files, image_size), 3, image_size, sha1
    if not os.path.exists(path):
        fail(f"--data-path {path} does not exist")
    if not os.path.isfile(path) or not (path.endswith(".npz") or "images-idx3" in os.path.basename(path)):
        fail(f"--data-path {path} is neither a folder, an npz nor an MNIST-family *-images-idx3-ubyte[.gz] file")
    images, labels = read_arrays(path)
    image_size = image_size or max(images.shape[1:3])
    sha1 = hashlib.sha1(labels.tobytes() + images.tobytes()).hexdigest()
    classes = [str(k) for k in range(labels.max() + 1)]
    names = [str(i) for i in range(len(images))]
    return classes, names, labels.tolist(), ArrayImages(images, image_size), images.shape[3], image_size, sha1


#################################################################################
#                                  Output files                                 #
#################################################################################
# Corrupt images are found only by decoding them, and decoding is usually the slowest part of the job, so it is done
# once: every candidate image gets a row in staging arrays (*.partial.npy, memory-mapped, each process writing its own
# contiguous chunks) and a status byte: 0 = not written yet, 1 = good, 2 = unreadable. A chunk's status bytes are
# written only after its rows are flushed, so a chunk is done iff none of its status bytes is 0: the resume record.
# At the end the staging arrays are renamed if every image was good (no copy), else compacted to the good rows; only
# the few bad images are decoded again, for skipped.txt's reasons. info.json, written last, marks the run finished.

def copy_rows(src, rows, path, factor=None):
    """A new .npy at path holding src[rows] (times factor), a block at a time: the arrays can be larger than memory."""
    dst = allocate_npy(path, (len(rows),) + src.shape[1:], src.dtype)
    for j in range(0, len(rows), 1024):
        dst[j:j + 1024] = src[rows[j:j + 1024]] if factor is None else src[rows[j:j + 1024]].astype(np.float32) * factor
    dst.flush()


def unit_scale(src, rows):
    """1 / the standard deviation of all values of src[rows], a block at a time in float64."""
    total, squares, n = 0.0, 0.0, 0
    for j in range(0, len(rows), 1024):
        block = src[rows[j:j + 1024]].astype(np.float64)
        total, squares, n = total + block.sum(), squares + np.square(block).sum(), n + block.size
    return float(1 / math.sqrt(max(squares / n - (total / n) ** 2, 1e-12)))


def start_run(out, arrays, run):
    """The staging arrays [(name, dtype, shape)], then run.json, which marks them complete, if the disk has room for
    them. A failure part-way removes them: a full disk is not left fuller, and the next try does not need room for two
    copies."""
    size = sum(np.dtype(dtype).itemsize * math.prod(shape) for _, dtype, shape in arrays)
    check_room(out, size, f"--out {out} ({arrays[0][2][0]} images of {' x '.join(map(str, arrays[0][2][1:]))})")
    try:
        for name, dtype, shape in arrays:
            with save_atomic(f"{out}/{name}.partial.npy") as tmp:
                allocate_npy(tmp, shape, dtype)
        with save_atomic(f"{out}/run.json") as tmp, open(tmp, "w") as f:
            json.dump(run, f, indent=1)
    except BaseException:
        discard_run(out)
        raise


def discard_run(out):
    """Removes what an unfinished run keeps: its staging arrays and run.json."""
    for name in ("latents.partial.npy", "std.partial.npy", "status.partial.npy", "run.json"):
        if os.path.exists(f"{out}/{name}"):
            os.remove(f"{out}/{name}")


def finalize(out, spec, classes, files, labels):
    status = np.load(f"{out}/status.partial.npy")
    if (status == 0).any():
        fail(f"{int((status == 0).sum())} images were not written (did a process fail?); "
             "run the same command again to finish")
    good = status == 1
    reason = lambda f: load_image(os.path.join(spec["data_path"], f), spec["image_size"])[1]
    skipped = [(f, reason(f) or "unreadable in the worker") for f, ok in zip(files, good) if not ok]
    with save_atomic(f"{out}/skipped.txt") as tmp, open(tmp, "w", encoding="utf-8") as file:
        file.writelines(f"{f}\t{why}\n" for f, why in skipped)
    if not good.any():  # nothing to train on; once the images are fixed, the same command starts over
        discard_run(out)
        fail(f"none of the {len(files)} images could be decoded (the first, {': '.join(skipped[0])}; "
             f"all reasons in {out}/skipped.txt)")
    scale = spec["scale"]
    for name in ("latents", "std"):
        part, final = f"{out}/{name}.partial.npy", f"{out}/{name}.npy"
        if not os.path.exists(part):  # no std with --vae none or ae, or already moved by an interrupted finalize
            continue
        if scale is None:  # --vae ae: scaled to unit std as copied; the staging array stays until info.json is written
            rows = np.flatnonzero(good)
            scale = unit_scale(np.load(part, mmap_mode="r"), rows)
            with save_atomic(final) as tmp:
                copy_rows(np.load(part, mmap_mode="r"), rows, tmp, scale)
        elif good.all():
            os.replace(part, final)
        else:
            src = np.load(part, mmap_mode="r")
            with save_atomic(final) as tmp:
                copy_rows(src, np.flatnonzero(good), tmp)
            os.remove(part)
    latents = np.load(f"{out}/latents.npy", mmap_mode="r")
    assert len(latents) == good.sum() and latents.shape[1] == 2, "latents.npy does not match the status record"
    with save_atomic(f"{out}/labels.npy") as tmp:
        np.save(tmp, np.asarray(labels, dtype=np.int64)[good])
    info = dict(num_classes=len(classes), image_size=spec["image_size"], scale=scale, vae=spec["vae"],
                num_images=int(good.sum()), num_skipped=len(skipped), views=2, shape=list(latents.shape[1:]),
                classes=classes, source=spec, **{"ae": spec["ae"]} if "ae" in spec else {})
    with save_atomic(f"{out}/info.json") as tmp, open(tmp, "w") as f:
        json.dump(info, f, indent=1)
    discard_run(out)
    return int(good.sum()), len(skipped)


#################################################################################
#                                      Main                                     #
#################################################################################

@torch.no_grad()
def encode(vae, x, device):
    """(N, 3, S, S) in [-1, 1] -> posterior mean and std in float32; bf16 autocast and channels_last on CUDA.
    SmallAE: (N, C, S, S) -> [its latents], in float32 throughout."""
    if isinstance(vae, SmallAE):
        return [vae.encode(x)]
    if device.type == "cuda":  # (on CPU channels_last is slower)
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):
        mean, logvar = vae.encode(x)
    return mean.float(), torch.exp(0.5 * logvar.float())


def benchmark(vae, args, device, steps=3):
    """Encoder images/s on random images: a warm-up call (on a CPU on one image: a 256-px image takes seconds there),
    then `steps` calls on a batch of --batch-size (default 64 on a GPU, 2 on a CPU)."""
    size, batch = args.image_size or 256, args.batch_size or (64 if device.type == "cuda" else 2)
    channels, size = (vae.channels, vae.image_size) if isinstance(vae, SmallAE) else (3, size)
    print(f"timing the encoder on {steps} batches of {batch} random {size}x{size} images on {device}"
          f"{' (one thread, as prepare_latents.py runs on a CPU)' if device.type == 'cpu' else ''}", flush=True)
    x = torch.rand(batch, channels, size, size, device=device) * 2 - 1
    encode(vae, x[:1] if device.type == "cpu" else x, device)[0].sum().item()  # .item() waits for the GPU
    start = time.time()
    for _ in range(steps):
        mean, _ = encode(vae, x, device)
    mean.sum().item()
    print(f"encoder: {steps * batch / (time.time() - start):.3g} images/s ({size}x{size}, batch {batch}, {device})")


def quiet_hand_over(worker_id):
    """In each DataLoader worker: a batch whose hand-over the main process broke off (interrupted by Ctrl-C or SIGTERM
    while it received the batch's shared memory) ends the worker without a traceback from multiprocessing's
    fd-sharing thread, which reports the reset connection through sys.excepthook."""
    hook = sys.excepthook
    sys.excepthook = lambda kind, value, tb: None if issubclass(kind, ConnectionError) else hook(kind, value, tb)


def load_encoder(args, device):
    """The frozen VAE, or None for --vae none (pixels); bad weights end the script with one line."""
    if args.vae == "none" and not args.benchmark:
        return None
    if not args.vae_weights:
        if args.benchmark and args.vae != "ae":
            return AutoencoderKL().to(device).eval()  # random weights time the same as real ones
        fail("--vae-weights FILE is required (or --vae none); " + ("a checkpoint of train_ae.py" if args.vae == "ae"
             else "get sd-vae-ft-mse from https://huggingface.co/stabilityai/sd-vae-ft-mse"))
    try:
        vae = (load_ae if args.vae == "ae" else load_vae)(args.vae_weights, device)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    if isinstance(vae, SmallAE):
        if args.vae != "ae":
            fail(f"--vae-weights {args.vae_weights} holds a small autoencoder of train_ae.py: encode with --vae ae")
        return vae
    return vae.to(memory_format=torch.channels_last) if device.type == "cuda" else vae


def read_record(path, valid):
    """info.json or run.json as this script writes them; anything else (damaged, edited by hand, or run.json of an older
    version that recorded --batch-size 0) ends in one line saying what to do."""
    try:
        with open(path) as f:
            record = json.load(f)
    except OSError as e:
        fail(f"cannot read {path}: {e.strerror or e}")
    except ValueError:  # not JSON, or not text
        record = None
    if not isinstance(record, dict) or not valid(record):
        fail(f"{path} is damaged: delete it to start this run over, or use another --out")
    return record


def check_out(out, spec, batch_size, rank):
    """-> the chunk size, or None when --out already holds this finished run; a different run there -> error."""
    finished = lambda r: isinstance(r.get("source"), dict) and "num_images" in r and "num_skipped" in r
    unfinished = lambda r: isinstance(r.get("chunk_size"), int) and r["chunk_size"] > 0
    for name, state, valid in (("info.json", "finished", finished), ("run.json", "unfinished", unfinished)):
        if not os.path.exists(f"{out}/{name}"):
            continue
        found = read_record(f"{out}/{name}", valid)
        previous = found["source"] if state == "finished" else found
        differs = [k for k in spec if previous.get(k) != spec[k]]
        if differs:
            fail(f"{out} holds a different {state} run (differs in {', '.join(differs)}); use another --out")
        if state == "finished":
            if rank == 0:
                print(f"already done: {found['num_images']} images in {out} ({found['num_skipped']} skipped)")
            return None
        return found["chunk_size"]  # keep the first run's chunking so that the bytes stay the same
    return batch_size


def main(args):
    if not args.benchmark:
        check_output(args.out, "--out", folder=True)
    device, rank, world = setup_distributed(args.device)
    if not args.benchmark and rank == 0:
        claim(args.out, "--out", folder=True)  # before its records are read: two jobs on a new --out find it empty
    ddp = dist.is_initialized()
    if device.type == "cpu":
        # CPU kernels split their float sums by thread count, so 1 and N processes would differ in the last bit.
        # One thread per process keeps the bytes independent of it; use more processes to use more cores.
        torch.set_num_threads(1)
    vae = load_encoder(args, device)
    if args.benchmark:
        return benchmark(vae, args, device)

    classes, files, labels, dataset, channels, image_size, sha1 = open_source(args.data_path, args.image_size)
    ae = None
    if vae is None:
        vae_name, scale, shape = "none", 1.0, (channels, image_size, image_size)
    elif isinstance(vae, SmallAE):  # its latents are scaled to unit std once all are encoded (finalize)
        if (channels, image_size) != (vae.channels, vae.image_size):
            fail(f"--vae-weights {args.vae_weights} encodes {vae.channels}-channel {vae.image_size}-pixel images; "
                 f"--data-path {args.data_path} gives {channels}-channel {image_size}-pixel ones (see --image-size)")
        vae_name, scale, shape = "ae", None, (vae.latent, vae.latent_size, vae.latent_size)
        ae = dict(config=vae.config, sha1=file_sha1(args.vae_weights))  # what make_decoder checks its weights by
    else:
        factor, latent = 2 ** (len(vae.encoder.down_blocks) - 1), vae.post_quant_conv.out_channels
        if image_size % factor:
            fail(f"--image-size {image_size} is not a multiple of {factor}, which the VAE needs")
        widths = [block.resnets[0].conv1.out_channels for block in vae.encoder.down_blocks]
        vae_name = "sd-vae-ft-mse" if widths == [128, 256, 512, 512] and latent == 4 else f"kl-f{factor}-c{latent}"
        scale, shape = SCALE, (latent, image_size // factor, image_size // factor)
    # What identifies a run, so that a resumed run continues the same one.
    spec = dict(data_path=os.path.abspath(args.data_path), num_files=len(files), files_sha1=sha1,
                image_size=image_size, vae=vae_name, scale=scale,
                vae_weights=None if vae is None else os.path.basename(args.vae_weights), **{"ae": ae} if ae else {})
    out, names = args.out, ["latents", "std"] if isinstance(vae, AutoencoderKL) else ["latents"]
    chunk = check_out(out, spec, args.batch_size or 64, rank)
    if chunk is None:
        return
    arrays = [(name, np.float16, (len(files), 2) + shape) for name in names] + [("status", np.uint8, (len(files),))]
    if rank == 0 and not os.path.exists(f"{out}/run.json"):
        start_run(out, arrays, dict(spec, chunk_size=chunk))
    if ddp:
        dist.barrier()  # a new run's staging files exist before any rank opens them

    # Rank r owns a contiguous range of chunks and skips the ones a previous run finished.
    try:  # every staging array whole (a short one would be read as zeros), unless finalize already renamed it
        staging = [open_npy(f"{out}/{name}.partial.npy", shape, dtype) for name, dtype, shape in arrays
                   if name == "status" or os.path.exists(f"{out}/{name}.partial.npy")]
        status = staging.pop()
        num_chunks = (len(files) + chunk - 1) // chunk
        mine = range(rank * num_chunks // world, (rank + 1) * num_chunks // world)
        batches = [list(range(c * chunk, min((c + 1) * chunk, len(files)))) for c in mine
                   if (status[c * chunk:(c + 1) * chunk] == 0).any()]
        if batches and len(staging) != len(names):
            raise FileNotFoundError(f"{out}/{names[-1]}.partial.npy is missing")
    except (OSError, ValueError) as e:  # staging files deleted, cut short or damaged by hand
        fail(f"the unfinished run in {out} is damaged ({e}); delete {out}/run.json to start it over")
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=args.num_workers,
                                         pin_memory=device.type == "cuda", worker_init_fn=quiet_hand_over)
    start = time.time()
    for i, (rows, (x, ok)) in enumerate(tqdm(zip(batches, loader), total=len(batches), disable=rank != 0)):
        a, b = rows[0], rows[-1] + 1
        x = x.to(device, non_blocking=True).float() / 127.5 - 1
        x = torch.cat([x, x.flip(3)])                                         # (2B, C, S, S): views 0, then 1
        if isinstance(vae, AutoencoderKL) and x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)                                       # grayscale to RGB for the VAE
        for array, t in zip(staging, [x] if vae is None else encode(vae, x, device)):  # pixels, or mean and std
            t = t if scale is None else t * scale                             # (--vae ae: scaled in finalize)
            array[a:b] = t.view(2, b - a, *shape).transpose(0, 1).half().cpu().numpy()  # (B, 2, C, H, W)
            array.flush()
        status[a:b] = np.where(ok.numpy(), 1, 2)  # only once the rows above are on disk
        status.flush()
        if i + 1 == args.stop_after_chunks:
            sys.exit(f"stopped after {i + 1} chunks (--stop-after-chunks); run again to resume")
    total = torch.tensor([sum(map(len, batches))], device=device if device.type == "cuda" else "cpu")
    if ddp:
        dist.all_reduce(total)
        dist.barrier()
    if rank == 0:
        written, skipped = finalize(out, spec, classes, files, labels)
        print(f"done: {written} images written to {out}, {skipped} skipped (see skipped.txt), of {len(files)} listed; "
              f"this run read {total.item()} images, {total.item() / (time.time() - start):.1f} images/s")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-path", type=str, help="folder with one sub-folder of images per class, an "
                        "MNIST-family *-images-idx3-ubyte[.gz] file, or an npz with arr_0 and labels")
    parser.add_argument("--out", type=str, help="output folder (created; rerun the same command to resume)")
    parser.add_argument("--vae", type=str, choices=["sd-vae-ft-mse", "ae", "none"], default="sd-vae-ft-mse",
                        help="ae: the small autoencoder of train_ae.py, for 28-pixel images")
    parser.add_argument("--vae-weights", type=str, default=None, help=".safetensors, .bin or .pth of sd-vae-ft-mse, "
                        "or with --vae ae a checkpoint of train_ae.py")
    parser.add_argument("--image-size", type=integer(1, 4096), default=None,
                        help="output size, up to 4096 (default: 256 for folders, the images' own size for IDX and npz)")
    parser.add_argument("--batch-size", type=positive_int, default=None,
                        help="images per chunk and per encoder call (x2 views; default 64, --benchmark on a CPU 2)")
    parser.add_argument("--num-workers", type=integer(0, os.cpu_count() or 1), default=min(8, os.cpu_count() or 1),
                        help="image-decoding DataLoader workers per process, at most the CPUs (default: min(8, CPUs); "
                             "0: none)")
    parser.add_argument("--device", type=str, default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--benchmark", action="store_true", help="time the encoder on random inputs and exit")
    parser.add_argument("--stop-after-chunks", type=int, default=0, help=argparse.SUPPRESS)  # tests: a crash
    args = parser.parse_args(argv)
    if not args.benchmark and not (args.data_path and args.out):
        parser.error("--data-path and --out are required")
    try:
        device = torch.device(args.device or "cpu")
    except RuntimeError:
        parser.error(f"--device {args.device} is not a torch device (cpu, cuda, cuda:1, ...)")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device here")
    return args


if __name__ == "__main__":
    run(main, parse_args(), "run the same command again to resume")
