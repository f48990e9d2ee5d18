"""
FID and Inception Score with the InceptionV3 behind published ImageNet numbers.

The network is TensorFlow's 2015-12-05 Inception graph (used by ADM's evaluator and TTUR) rebuilt in PyTorch. It
loads the ported weights of torch-fidelity / torchmetrics (weights-inception-2015-12-05-6726825d.pth) or of
pytorch-fid (pt_inception-2015-12-05-6726825d.pth), and resizes uint8 images the way TensorFlow 1 did, so FIDs are
comparable with those of ADM's evaluator (https://github.com/openai/guided-diffusion/tree/main/evaluations).

FID-50K against ADM's ImageNet 256x256 reference batch, on one GPU or sharded over eight:
    python fid.py samples.npz VIRTUAL_imagenet256_labeled.npz --inception weights-inception-2015-12-05-6726825d.pth
    torchrun --nproc_per_node=8 fid.py samples.npz VIRTUAL_imagenet256_labeled.npz --inception ... --is
Statistics of an image folder, saved once and then passed as REF (works on CPU, slowly):
    python fid.py /data/imagenet256_val --inception ... --save-stats imagenet256_val.npz --device cpu
Throughput of this machine:  python fid.py --benchmark [--device cpu --batch-size 16]

SAMPLES and REF are each an .npz of uint8 images `arr_0` (N, H, W, 3) as ADM writes them, an .npz of statistics
(`mu`, `sigma`; preferred when a file has both), or a folder of .png/.jpg files. From Python (under DDP every rank
calls extract_features with its own images; the statistics are summed over ranks):
    model = load_inception("weights-inception-2015-12-05-6726825d.pth", "cuda")
    stats, _ = extract_features(batches, model)  # batches: uint8 (B, 3, H, W) tensors
    fid = frechet_distance(*stats.mean_cov(), *compute_stats("VIRTUAL_imagenet256_labeled.npz", model))
"""
import argparse
import contextlib
import math
import os
import struct
import sys
import tempfile
import time
import zipfile

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

WEIGHTS_URLS = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                "weights-inception-2015-12-05-6726825d.pth",
                "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                "pt_inception-2015-12-05-6726825d.pth")


#################################################################################
#                     TensorFlow-Compatible Preprocessing                       #
#################################################################################

def resize_bilinear_tf1(x, size=299):
    """
    tf.image.resize_bilinear(align_corners=False) of TensorFlow 1: output pixel i reads input coordinate
    i * in / out, with no half-pixel offset (F.interpolate uses (i + 0.5) * in / out - 0.5). The Inception graph
    resizes this way, and FID is sensitive to the resize (Parmar et al. 2022, https://arxiv.org/abs/2104.11222), so
    this is what keeps numbers comparable.
    https://github.com/tensorflow/tensorflow/blob/r1.15/tensorflow/core/kernels/image_resizer_state.h
    x: float (N, C, H, W) -> (N, C, size, size).
    """
    def taps(n_in):
        src = torch.arange(size, dtype=torch.float32, device=x.device) * (n_in / size)  # float32, as TF does
        lo = src.floor().long().clamp(max=n_in - 1)
        return lo, (lo + 1).clamp(max=n_in - 1), (src - lo).to(x.dtype)
    (y0, y1, wy), (x0, x1, wx) = taps(x.shape[2]), taps(x.shape[3])
    top, bottom = x[:, :, y0], x[:, :, y1]                      # (N, C, size, W)
    top = top[..., x0] + (top[..., x1] - top[..., x0]) * wx      # (N, C, size, size)
    bottom = bottom[..., x0] + (bottom[..., x1] - bottom[..., x0]) * wx
    return top + (bottom - top) * wy[:, None]


def tf_avg_pool(x):
    # TensorFlow's 3x3 average pool divides by the number of real pixels under the window, not by 9, at the
    # borders; the FID ports patch torchvision's blocks the same way (github.com/mseitzer/pytorch-fid).
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


@contextlib.contextmanager
def exact_fp32():
    # cuDNN runs fp32 convolutions in TF32 (10 mantissa bits) by default on Ampere and later. Feature extraction
    # is a small part of an evaluation even in true fp32, so we keep FID exact and the same on every GPU, and give
    # the caller (train.py may want TF32) its setting back afterwards.
    saved = torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision
    torch.backends.cudnn.conv.fp32_precision = torch.backends.cuda.matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision = saved


#################################################################################
#                                  InceptionV3                                  #
#################################################################################

class BasicConv2d(nn.Module):
    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=1e-3)  # TensorFlow's epsilon, not PyTorch's 1e-5

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class InceptionA(nn.Module):
    """Mixed_5b/5c/5d at 35x35: 1x1, 5x5, double 3x3 and pooled branches."""
    def __init__(self, in_channels, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, 1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, 1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(tf_avg_pool(x))], 1)


class InceptionB(nn.Module):
    """Mixed_6a: 35x35 -> 17x17 by strided convolutions next to a max pool."""
    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):
    """Mixed_6b-6e at 17x17: 7x7 convolutions factored into 1x7 and 7x1."""
    def __init__(self, in_channels, c7):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7d = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            b7d = layer(b7d)
        return torch.cat([self.branch1x1(x), b7, b7d, self.branch_pool(tf_avg_pool(x))], 1)


class InceptionD(nn.Module):
    """Mixed_7a: 17x17 -> 8x8."""
    def __init__(self, in_channels):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    """Mixed_7b/7c at 8x8: 3x3 convolutions split into parallel 1x3 and 3x1."""
    def __init__(self, in_channels, max_pool=False):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(in_channels, 320, 1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        b3d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b3d = torch.cat([self.branch3x3dbl_3a(b3d), self.branch3x3dbl_3b(b3d)], 1)
        # The 2015 graph max-pools in the last block's pool branch (the paper says average); FID ports keep it.
        pool = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else tf_avg_pool(x)
        return torch.cat([self.branch1x1(x), b3, b3d, self.branch_pool(pool)], 1)


class InceptionV3(nn.Module):
    """
    The FID Inception: uint8 images of any size -> 2048 pool features (and 1008 logits for the Inception Score).
    Attribute names follow the standard FID weight files, so they load without renaming.
    """
    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)  # 1008 = ImageNet's 1000 classes + 8 unused outputs of the 2015 graph

    def forward(self, images, return_logits=False):
        """images: uint8 (N, 3, H, W) -> pool (N, 2048), or (pool, logits without the fc bias (N, 1008))."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        x = resize_bilinear_tf1(images.float(), 299)       # (N, 3, 299, 299)
        x = ((x - 128) / 128).contiguous(memory_format=torch.channels_last)
        with exact_fp32():
            x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (N, 64, 147, 147)
            x = F.max_pool2d(x, 3, stride=2)                                   # (N, 64, 73, 73)
            x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))                      # (N, 192, 71, 71)
            x = F.max_pool2d(x, 3, stride=2)                                   # (N, 192, 35, 35)
            x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))                 # (N, 288, 35, 35)
            x = self.Mixed_6a(x)                                               # (N, 768, 17, 17)
            x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))  # (N, 768, 17, 17)
            x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))                 # (N, 2048, 8, 8)
            pool = x.mean(dim=(2, 3))                                          # (N, 2048)
            if not return_logits:
                return pool
            # The Inception Score of ADM and torch-fidelity uses logits without the bias.
            return pool, pool @ self.fc.weight.T                               # (N, 1008)


def load_inception(path, device="cpu"):
    """InceptionV3 with the FID weights at `path`, in eval mode, without gradients. Never downloads."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Inception weights {path} not found; download {WEIGHTS_URLS[0]} "
                                f"(or pytorch-fid's {WEIGHTS_URLS[1]})")
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read Inception weights {path}: {e}") from e
    if not isinstance(state_dict, dict):
        raise ValueError(f"{path} holds a {type(state_dict).__name__}, not a state_dict of Inception weights")
    model = InceptionV3()
    # Files converted straight from the TensorFlow graph carry no BatchNorm step counters; eval mode never reads them.
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            state_dict.setdefault(key, value)
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        raise ValueError(f"{path} is not an FID Inception weights file: {' '.join(str(e).split())[:300]}") from e
    return model.to(device, memory_format=torch.channels_last).eval().requires_grad_(False)


#################################################################################
#                       Statistics, FID and Inception Score                     #
#################################################################################

class FeatureStats:
    """
    Running float64 sums of features and of their outer products: the mean and covariance of any number of
    images in O(D^2) memory, and sums add up across ranks.
    """
    def __init__(self, dim=2048, device="cpu"):
        self.n = torch.zeros((), dtype=torch.float64, device=device)
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def update(self, features):
        f = features.to(self.sum.device, torch.float64)  # (N, D)
        self.n += f.shape[0]
        self.sum += f.sum(0)
        self.outer += f.T @ f                             # (D, D)

    def all_reduce(self):
        if dist.is_initialized():
            for t in (self.n, self.sum, self.outer):
                dist.all_reduce(t)
        return self

    def mean_cov(self):
        """(mu, sigma) as numpy float64, sigma unbiased like np.cov(features, rowvar=False)."""
        n = self.n.item()
        if n < 2:
            raise ValueError(f"need at least 2 images for a covariance, got {n:.0f}")
        mu = self.sum / n
        sigma = (self.outer - n * torch.outer(mu, mu)) / (n - 1)
        return mu.cpu().numpy(), sigma.cpu().numpy()


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """
    Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (Dowson & Landau 1982,
    https://doi.org/10.1016/0047-259X(82)90077-X; used as FID by Heusel et al. 2017, https://arxiv.org/abs/1706.08500):
        |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr(sqrt(sigma1 sigma2)).
    sigma1 sigma2 has the eigenvalues of the symmetric PSD matrix A = sqrt(sigma1) sigma2 sqrt(sigma1), so the trace
    term is the sum of square roots of A's eigenvalues: two symmetric eigensolves instead of scipy's complex Schur
    sqrtm, several times faster at 2048 dims, real by construction, and finite for singular covariances.
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    w, v = np.linalg.eigh(sigma1)
    sqrt_sigma1 = (v * np.sqrt(w.clip(min=0))) @ v.T
    eigvals = np.linalg.eigvalsh(sqrt_sigma1 @ sigma2 @ sqrt_sigma1)
    tr_covmean = np.sqrt(eigvals.clip(min=0)).sum()  # rounding leaves tiny negative eigenvalues
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def inception_score(logits, split_size=5000):
    """
    Inception Score (Salimans et al. 2016, https://arxiv.org/abs/1606.03498): exp E_x KL(p(y|x) || p(y)), with p(y)
    the marginal within consecutive parts of `split_size` images, averaged over parts. ADM's evaluator splits this
    way; for 50k images it is the usual 10 splits. logits: (N, 1008) from InceptionV3(return_logits=True).
    """
    logits = torch.as_tensor(logits, dtype=torch.float64)
    if len(logits) == 0:
        raise ValueError("no logits for the Inception Score")
    scores = []
    for part in logits.split(split_size):
        log_p = F.log_softmax(part, dim=1)                           # log p(y|x), (n, 1008)
        log_py = torch.logsumexp(log_p, dim=0) - math.log(len(part))  # log p(y), (1008,)
        scores.append((log_p.exp() * (log_p - log_py)).sum(1).mean().exp().item())
    return float(np.mean(scores))


#################################################################################
#                                    Inputs                                     #
#################################################################################

def _npz_array(path, name):
    """One array of an .npz, memory-mapped when stored uncompressed (np.savez) so a rank reads only its slice."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(name + ".npy")
        if info.compress_type != zipfile.ZIP_STORED:
            with zf.open(info) as f:
                return np.lib.format.read_array(f)
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)  # zip local header: name and extra-field lengths, then the .npy file
        name_len, extra_len = struct.unpack("<HH", f.read(4))
        f.seek(info.header_offset + 30 + name_len + extra_len)
        version = np.lib.format.read_magic(f)
        if version not in ((1, 0), (2, 0)):
            return np.load(path)[name]
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read_header(f)
        offset = f.tell()
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran_order else "C")


def open_input(path):
    """
    (mu, sigma) of a statistics .npz (preferred when it also holds images, like ADM's reference batches), else the
    images: uint8 (N, H, W, 3) `arr_0` of an .npz (memory-mapped), or the sorted image files under a folder.
    """
    if os.path.isdir(path):
        files = sorted(os.path.join(root, name) for root, _, names in os.walk(path) for name in names
                       if name.lower().endswith((".png", ".jpg", ".jpeg", ".bmp", ".webp")))
        if not files:
            raise ValueError(f"no .png/.jpg images in folder {path}")
        return files
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found")
    try:
        if not zipfile.is_zipfile(path):
            raise ValueError("not an .npz file")
        with np.load(path) as data:
            if "mu" in data.files and "sigma" in data.files:
                return data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
        images = _npz_array(path, "arr_0")
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path} is neither an image folder nor an .npz with arr_0 or mu/sigma ({e})") from e
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
        raise ValueError(f"{path}: arr_0 must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    return images


def iterate_images(images, batch_size, start=0, stop=None):
    """uint8 (B, 3, H, W) batches of images[start:stop]; folder images are read as RGB, equal sizes batched."""
    stop = len(images) if stop is None else stop
    if isinstance(images, np.ndarray):
        for i in range(start, stop, batch_size):
            yield torch.from_numpy(np.array(images[i:min(i + batch_size, stop)])).permute(0, 3, 1, 2)
        return
    from PIL import Image  # only folders need Pillow
    batch = []
    for file in images[start:stop]:
        try:
            with Image.open(file) as im:
                image = np.asarray(im.convert("RGB"))  # (H, W, 3)
        except OSError as e:
            raise ValueError(f"cannot read image {file}: {e}") from e
        if batch and (len(batch) == batch_size or image.shape != batch[0].shape):
            yield torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2)
            batch = []
        batch.append(image)
    if batch:
        yield torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2)


def shard(n):
    """This rank's contiguous slice of n items; contiguous slices in rank order keep the order for IS splits."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    return rank * n // world, (rank + 1) * n // world


@torch.no_grad()
def extract_features(batches, model, with_logits=False):
    """
    (FeatureStats, logits) of uint8 (B, 3, H, W) image batches. With torch.distributed initialised every rank must
    call it: statistics are summed over ranks, and logits (N, 1008), if asked for, gathered in rank order.
    """
    device = next(model.parameters()).device
    stats, logits = FeatureStats(device=device), []
    for images in batches:
        out = model(torch.as_tensor(images).to(device, non_blocking=True), return_logits=with_logits)
        stats.update(out[0] if with_logits else out)
        if with_logits:
            logits.append(out[1].cpu())
    stats.all_reduce()
    if not with_logits:
        return stats, None
    logits = torch.cat(logits) if logits else torch.zeros(0, 1008)
    if dist.is_initialized():
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, logits)
        logits = torch.cat(gathered)
    return stats, logits


def compute_stats(path, model, batch_size=200, device=None):
    """
    (mu, sigma) of a statistics .npz, an image .npz or an image folder. The model runs where it is, or on `device`;
    under DDP every rank must call it, and each extracts a slice of the images.
    """
    source = open_input(path)
    if isinstance(source, tuple):
        return source
    if device is not None:
        model.to(device)
    return extract_features(iterate_images(source, batch_size, *shard(len(source))), model)[0].mean_cov()


def save_stats(path, mu, sigma):
    """Write an .npz of `mu` and `sigma` atomically: a crash never leaves a truncated file under the final name."""
    fd, tmp = tempfile.mkstemp(suffix=".npz", dir=os.path.dirname(os.path.abspath(path)))
    with os.fdopen(fd, "wb") as f:
        np.savez(f, mu=mu, sigma=sigma)
    os.replace(tmp, path)


#################################################################################
#                                 Command Line                                  #
#################################################################################

def benchmark(model, device, batch_size):
    images = torch.randint(0, 256, (batch_size, 3, 256, 256), dtype=torch.uint8, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.no_grad():
        model(images)  # warm-up: cuDNN autotuning, allocator
        sync()
        start, n = time.perf_counter(), 0
        while n == 0 or time.perf_counter() - start < 10:
            model(images)
            sync()
            n += batch_size
    print(f"Inception: {n / (time.perf_counter() - start):.1f} images/s ({device}, batch {batch_size}, 256px)")
    a, b = np.random.default_rng(0).standard_normal((2, 2048, 4096)) / 64
    mu1, mu2, sigma1, sigma2 = a[:, 0], b[:, 0], a @ a.T, b @ b.T  # full-rank, FID-sized
    start = time.perf_counter()
    ours = frechet_distance(mu1, sigma1, mu2, sigma2)
    t_ours, start = time.perf_counter() - start, time.perf_counter()
    import scipy.linalg  # only this comparison needs scipy
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2).real  # the route of TTUR, ADM's evaluator and pytorch-fid
    ref = (mu1 - mu2) @ (mu1 - mu2) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)
    t_ref = time.perf_counter() - start
    print(f"Frechet distance at 2048 dims: eigh {t_ours:.2f} s, scipy sqrtm {t_ref:.2f} s ({t_ref / t_ours:.1f}x), "
          f"relative difference {abs(ours - ref) / abs(ref):.1e}")


def main(args):
    from tqdm import tqdm
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but no GPU is visible")
    if args.batch_size < 1:
        raise ValueError("--batch-size must be positive")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if "RANK" in os.environ:  # launched by torchrun: each rank extracts a slice, rank 0 reports
        if device == "cuda":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    device = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device(device)
    torch.backends.cudnn.benchmark = True  # every batch is 299x299

    if args.benchmark:
        model = (load_inception(args.inception, device) if args.inception else  # speed does not depend on weights
                 InceptionV3().to(device, memory_format=torch.channels_last).eval())
        return benchmark(model, device, args.batch_size) if rank == 0 else None
    if args.samples is None or (args.ref is None and args.save_stats is None):
        raise ValueError("give SAMPLES and REF to compute FID, or SAMPLES and --save-stats OUT.npz (see --help)")
    if args.save_stats and not os.path.isdir(os.path.dirname(os.path.abspath(args.save_stats))):
        raise FileNotFoundError(f"the folder of --save-stats {args.save_stats} does not exist")
    paths = [p for p in (args.samples, args.ref) if p is not None]
    sources = [open_input(p) for p in paths]  # a bad REF fails now, not after extracting SAMPLES
    if args.inception_score and isinstance(sources[0], tuple):
        raise ValueError(f"--is needs images, but {args.samples} holds statistics")
    model = None
    if not all(isinstance(source, tuple) for source in sources):  # two statistics files need no network
        if args.inception is None:
            raise ValueError("reading images needs --inception weights-inception-2015-12-05-6726825d.pth")
        model = load_inception(args.inception, device)

    results = []
    for i, (path, source) in enumerate(zip(paths, sources)):
        if isinstance(source, tuple):
            results.append(source)
            continue
        start, stop = shard(len(source))
        batches = tqdm(iterate_images(source, args.batch_size, start, stop), desc=os.path.basename(path.rstrip("/")),
                       total=math.ceil((stop - start) / args.batch_size), unit="batch", disable=rank != 0)
        stats, logits = extract_features(batches, model, with_logits=args.inception_score and i == 0)
        results.append(stats.mean_cov())
        if logits is not None and rank == 0:
            print(f"IS: {inception_score(logits):.4f}")
    if rank == 0 and args.save_stats:
        save_stats(args.save_stats, *results[0])
        print(f"saved statistics of {args.samples} to {args.save_stats}")
    if rank == 0 and len(results) == 2:
        print(f"FID: {frechet_distance(*results[0], *results[1]):.4f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="FID (and IS) with the TensorFlow FID Inception, in PyTorch.")
    parser.add_argument("samples", nargs="?", help="npz of uint8 images (arr_0, NHWC), image folder, or stats npz")
    parser.add_argument("ref", nargs="?", help="the same kinds; e.g. ADM's VIRTUAL_imagenet256_labeled.npz")
    parser.add_argument("--inception", help="weights-inception-2015-12-05-6726825d.pth (or pytorch-fid's pt_ file)")
    parser.add_argument("--batch-size", type=int, default=200, help="images per forward pass, per rank")
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda if available")
    parser.add_argument("--is", dest="inception_score", action="store_true", help="also print SAMPLES' IS")
    parser.add_argument("--save-stats", metavar="OUT.npz", help="save SAMPLES' mu and sigma (then REF is optional)")
    parser.add_argument("--benchmark", action="store_true", help="time Inception and the Frechet distance")
    args = parser.parse_args()
    try:
        main(args)
    except (FileNotFoundError, ValueError) as e:  # user errors: one line, no traceback
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
