"""
FID, sFID, Inception Score, Precision and Recall with the InceptionV3 behind published ImageNet numbers: the metric
set of ADM's evaluator (https://github.com/openai/guided-diffusion/tree/main/evaluations), in PyTorch.

The network is TensorFlow's 2015-12-05 Inception graph (used by ADM's evaluator and TTUR) rebuilt in PyTorch. It
loads the ported weights of torch-fidelity / torchmetrics (weights-inception-2015-12-05-6726825d.pth) or of
pytorch-fid (pt_inception-2015-12-05-6726825d.pth), and resizes uint8 images the way TensorFlow 1 did, so the
numbers are comparable with those of ADM's evaluator.

All five against ADM's ImageNet 256x256 reference batch, on one GPU or sharded over eight (FID printed last):
    python fid.py samples.npz VIRTUAL_imagenet256_labeled.npz --inception weights-inception-2015-12-05-6726825d.pth
    torchrun --nproc_per_node=8 fid.py samples.npz VIRTUAL_imagenet256_labeled.npz --inception ... --metrics fid
Statistics of an image folder, saved once and then passed as REF (works on CPU, slowly):
    python fid.py /data/imagenet256_val --inception ... --save-stats imagenet256_val.npz --device cpu

SAMPLES and REF are each an .npz of uint8 images `arr_0` (N, H, W, 3) as ADM writes them, an .npz of statistics
(`mu`, `sigma`, and `mu_s`, `sigma_s` for sFID; they win over images for FID and sFID, and Precision/Recall read the
images), or a folder of .png/.jpg files. From Python (under DDP every rank calls extract_features with its own
images; statistics are summed over ranks):
    model = load_inception("weights-inception-2015-12-05-6726825d.pth", "cuda")
    samples = summarize(*extract_features(batches, model, keep=("pool", "logits")))  # uint8 (B, 3, H, W) batches
    ref = read_set(open_input("VIRTUAL_imagenet256_labeled.npz"), model, keep=("pool",))
    print(evaluate(samples, ref, device="cuda"))  # {"sFID": ..., "IS": ..., "Precision": ..., "Recall": ..., ...}
"""
import argparse
import contextlib
import fcntl
import functools
import math
import os
import signal
import struct
import sys
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


class UserError(ValueError):
    """A problem with what fid.py was given (a file, a flag): the command line prints it in one line, without a
    traceback; a ValueError from anywhere else is a bug and still raises."""


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
    The FID Inception: uint8 images of any size -> pool features, spatial features and logits (see forward).
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

    def forward(self, images):
        """
        uint8 images (N, 3, H, W) -> pool features (N, 2048) for FID and Precision/Recall, spatial features
        (N, 2023) for sFID, and logits without the fc bias (N, 1008) for the Inception Score.
        """
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise UserError(f"expected uint8 images (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        x = resize_bilinear_tf1(images.float(), 299)       # (N, 3, 299, 299)
        x = ((x - 128) / 128).contiguous(memory_format=torch.channels_last)
        with exact_fp32():
            x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (N, 64, 147, 147)
            x = F.max_pool2d(x, 3, stride=2)                                   # (N, 64, 73, 73)
            x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))                      # (N, 192, 71, 71)
            x = F.max_pool2d(x, 3, stride=2)                                   # (N, 192, 35, 35)
            x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))                 # (N, 288, 35, 35)
            x = self.Mixed_6a(x)                                               # (N, 768, 17, 17)
            x = self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x)))                 # (N, 768, 17, 17)
            # sFID's features: ADM's 'mixed_6/conv:0'[..., :7], flattened in TensorFlow's NHWC order so that the
            # statistics match ADM's mu_s, sigma_s. The 2015 graph names its blocks mixed, mixed_1, ..., mixed_10 in
            # order, so mixed_6 is Mixed_6d (torch-fidelity's weight converter maps mixed_6/conv/* to its branch1x1),
            # and its op 'mixed_6/conv' is the ReLU after mixed_6/conv/Conv2D and mixed_6/conv/batchnorm: the output
            # of Mixed_6d.branch1x1, which is channels 0-191 of Mixed_6d's (concatenated in the graph's order).
            spatial = x[:, :7].permute(0, 2, 3, 1).flatten(1)                  # (N, 17 * 17 * 7)
            x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(self.Mixed_6e(x))))  # (N, 2048, 8, 8)
            pool = x.mean(dim=(2, 3))                                          # (N, 2048)
            # The Inception Score of ADM and torch-fidelity uses logits without the bias.
            return pool, spatial, pool @ self.fc.weight.T                      # (N, 1008)


def load_inception(path, device="cpu"):
    """InceptionV3 with the FID weights at `path`, in eval mode, without gradients. Never downloads."""
    if os.path.isdir(path):
        raise UserError(f"Inception weights {path} is a folder, not a file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Inception weights {path} not found; download {WEIGHTS_URLS[0]} "
                                f"(or pytorch-fid's {WEIGHTS_URLS[1]})")
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # random bytes, a truncated file, a pickle carrying code: one line, not torch's advice
        raise UserError(f"{path} is not a readable weights file ({type(e).__name__}); download "
                         f"{WEIGHTS_URLS[0]}") from e
    if not isinstance(state_dict, dict):
        raise UserError(f"{path} holds a {type(state_dict).__name__}, not a state_dict of Inception weights")
    model = InceptionV3()
    # Files converted straight from the TensorFlow graph carry no BatchNorm step counters; eval mode never reads them.
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            state_dict.setdefault(key, value)
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        raise UserError(f"{path} is not an FID Inception weights file: {' '.join(str(e).split())[:300]}") from e
    return model.to(device, memory_format=torch.channels_last).eval().requires_grad_(False)


#################################################################################
#                  FID, sFID, Inception Score, Precision, Recall                #
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
            raise UserError(f"need at least 2 images for a covariance, got {n:.0f}")
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
        raise UserError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    if not all(np.isfinite(a).all() for a in (mu1, sigma1, mu2, sigma2)):
        raise UserError("the statistics are not finite (NaN or inf)")

    def nonzero(w):
        # Eigenvalues below rounding of the largest (numpy.linalg.matrix_rank's tolerance) are zero. Fewer images
        # than dimensions leave hundreds of them at about 1e-13 of the largest, and their square roots (3e-7 of
        # its root each) would add up to a visible bias: 64 images gave FID -0.0001 against themselves.
        return np.where(w > len(w) * np.finfo(np.float64).eps * w.max(), w, 0)

    w, v = np.linalg.eigh(sigma1)
    sqrt_sigma1 = (v * np.sqrt(nonzero(w))) @ v.T
    tr_covmean = np.sqrt(nonzero(np.linalg.eigvalsh(sqrt_sigma1 @ sigma2 @ sqrt_sigma1))).sum()
    diff = mu1 - mu2
    # A squared distance: what rounding leaves below 0 (about 1e-13 for a set against itself) is 0.
    return max(0.0, float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean))


def inception_score(logits, split_size=5000):
    """
    Inception Score (Salimans et al. 2016, https://arxiv.org/abs/1606.03498): exp E_x KL(p(y|x) || p(y)), with p(y)
    the marginal within consecutive parts of `split_size` images, averaged over parts. ADM's evaluator splits this
    way; for 50k images it is the usual 10 splits. logits: (N, 1008) from InceptionV3.
    """
    logits = torch.as_tensor(logits, dtype=torch.float64)
    if len(logits) == 0:
        raise UserError("no logits for the Inception Score")
    scores = []
    for part in logits.split(split_size):
        log_p = F.log_softmax(part, dim=1)                           # log p(y|x), (n, 1008)
        log_py = torch.logsumexp(log_p, dim=0) - math.log(len(part))  # log p(y), (1008,)
        scores.append((log_p.exp() * (log_p - log_py)).sum(1).mean().exp().item())
    return float(np.mean(scores))


def squared_distances(u, v, u_norms, v_norms):
    """
    |u_i - v_j|^2 of float64 rows u (Nu, D) and v (Nv, D) with squared norms u_norms, v_norms, as |u|^2 + |v|^2 -
    2 u.v: one matmul, like ADM's evaluator (which runs it in float16). Its rounding error is below
    D eps (|u|^2 + |v|^2) (Higham 2002, Accuracy and Stability of Numerical Algorithms, sec. 3.1), so values under
    that are 0: none is negative, and duplicates are exactly 0 apart, as a point and a radius of 0 need for a tie.
    """
    scale = u_norms[:, None] + v_norms                                      # (Nu, Nv)
    d = torch.addmm(scale, u, v.T, alpha=-2)
    return d.masked_fill_(d <= scale.mul_(u.shape[1] * torch.finfo(d.dtype).eps), 0)


def precision_recall(ref, samples, k=3, batch_size=10000, device="cpu"):
    """
    Improved Precision and Recall (Kynkäänniemi et al. 2019, https://arxiv.org/abs/1904.06991) as ADM's evaluator
    computes them from pool features ref (Nr, D) and samples (Ns, D). Each point of a set gets a ball whose squared
    radius is its squared distance to its k-th nearest neighbour in the set (the (k+1)-th smallest distance of its
    row, the first being its own 0). Precision: the fraction of samples inside some reference ball (boundary
    included); Recall: the fraction of references inside some sample ball. Distances are computed in float64, in
    blocks of batch_size x batch_size as ADM's (one takes ~2 GB at 10,000), so the result is the same on any device
    and for any block size; ADM's float16 distances (rounded to ~1e-3) can move points next to a boundary.
    """
    ref, samples = (torch.as_tensor(x).to(device, torch.float64) for x in (ref, samples))
    if min(len(ref), len(samples)) <= k:
        raise UserError(f"Precision and Recall need more than k={k} images in each set, got {len(ref)} and "
                         f"{len(samples)}")
    if not (ref.isfinite().all() and samples.isfinite().all()):
        raise UserError("the features for Precision and Recall are not finite (NaN or inf)")
    blocks = lambda x: [slice(i, i + batch_size) for i in range(0, len(x), batch_size)]

    def radii(x, norms):  # each row's (k+1)-th smallest distance, from the k+1 smallest of each column block
        out = []
        for rows in blocks(x):
            nearest = []
            for cols in blocks(x):
                d = squared_distances(x[rows], x[cols], norms[rows], norms[cols])  # (Br, Bc)
                nearest.append(d.topk(min(k + 1, d.shape[1]), dim=1, largest=False).values)
            out.append(torch.cat(nearest, 1).kthvalue(k + 1, dim=1).values)
        return torch.cat(out)

    ref_norms, sample_norms = ref.square().sum(1), samples.square().sum(1)
    ref_radii, sample_radii = radii(ref, ref_norms), radii(samples, sample_norms)
    ref_in = torch.zeros(len(ref), dtype=torch.bool, device=device)
    samples_in = torch.zeros(len(samples), dtype=torch.bool, device=device)
    for r in blocks(ref):
        for s in blocks(samples):
            d = squared_distances(ref[r], samples[s], ref_norms[r], sample_norms[s])  # (Br, Bs)
            samples_in[s] |= (d <= ref_radii[r, None]).any(0)
            ref_in[r] |= (d <= sample_radii[None, s]).any(1)
    return samples_in.double().mean().item(), ref_in.double().mean().item()


METRICS = {"sfid": "sFID", "is": "IS", "pr": "Precision/Recall", "fid": "FID"}  # names for --metrics


def evaluate(samples, ref, metrics=tuple(METRICS), device="cpu"):
    """
    {"sFID", "IS", "Precision", "Recall", "FID": value} for the chosen metrics, in that order. samples, ref: dicts
    (see summarize) of mu, sigma (FID), mu_s, sigma_s (sFID), pool features (N, 2048) (Precision and Recall) and,
    for samples, logits (N, 1008) (IS). Raises ValueError rather than returning a value that is not finite.
    """
    values = {}
    if "sfid" in metrics:
        values["sFID"] = frechet_distance(samples["mu_s"], samples["sigma_s"], ref["mu_s"], ref["sigma_s"])
    if "is" in metrics:
        values["IS"] = inception_score(samples["logits"])
    if "pr" in metrics:
        values["Precision"], values["Recall"] = precision_recall(ref["pool"], samples["pool"], device=device)
    if "fid" in metrics:
        values["FID"] = frechet_distance(samples["mu"], samples["sigma"], ref["mu"], ref["sigma"])
    bad = [name for name, value in values.items() if not math.isfinite(value)]
    if bad:
        raise UserError(f"{', '.join(bad)} not finite: the features or statistics hold NaN or inf")
    return values


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
    (statistics, images) of SAMPLES or REF, either None where absent. Statistics: a dict of float64 mu, sigma and,
    in files written since fid.py computes sFID, mu_s, sigma_s. Images: uint8 (N, H, W, 3) `arr_0` of an .npz
    (memory-mapped), or the sorted image files under a folder. ADM's reference batches hold both.
    """
    if os.path.isdir(path):
        files = sorted(os.path.join(root, name) for root, _, names in os.walk(path) for name in names
                       if name.lower().endswith((".png", ".jpg", ".jpeg", ".bmp", ".webp")))
        if not files:
            raise UserError(f"no .png/.jpg images in folder {path}")
        return None, files
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found")
    try:
        if not zipfile.is_zipfile(path):
            raise UserError("not an .npz file")
        with np.load(path) as data:
            pairs = [pair for pair in (("mu", "sigma"), ("mu_s", "sigma_s")) if set(pair) <= set(data.files)]
            stats = {name: data[name].astype(np.float64) for pair in pairs for name in pair}
            images = _npz_array(path, "arr_0") if "arr_0" in data.files else None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise UserError(f"{path} is neither an image folder nor an .npz with arr_0 or mu/sigma ({e})") from e
    if "mu" not in stats and images is None:
        raise UserError(f"{path} is neither an image folder nor an .npz with arr_0 or mu/sigma")
    for name, value in stats.items():
        if not np.isfinite(value).all():
            raise UserError(f"{path}: {name} is not finite (NaN or inf)")
    for mu, sigma in pairs:
        check_covariance(stats[mu], stats[sigma], f"{path}: {sigma}")
    if images is not None and (images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3):
        raise UserError(f"{path}: arr_0 must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    return (stats if "mu" in stats else None), images


def check_covariance(mu, sigma, name, tol=1e-5):
    """A covariance of len(mu) features is a symmetric positive semi-definite matrix (to rounding, `tol` relative to
    its largest entry or eigenvalue); anything else (-I, say) would give a meaningless FID, 0 for -I."""
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise UserError(f"{name} must be a {len(mu)} x {len(mu)} matrix for its mean of {mu.shape}, got {sigma.shape}")
    if np.abs(sigma - sigma.T).max() > tol * max(np.abs(sigma).max(), 1e-300):
        raise UserError(f"{name} is not a covariance: it is not symmetric")
    w = np.linalg.eigvalsh(sigma)
    if w.min() < -tol * max(np.abs(w).max(), 1e-300):
        raise UserError(f"{name} is not a covariance: it has the eigenvalue {w.min():.4g} (the largest: "
                        f"{w.max():.4g})")


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
            raise UserError(f"cannot read image {file}: {e}") from e
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
def extract_features(batches, model, keep=()):
    """
    Features of uint8 (B, 3, H, W) image batches: (FeatureStats of the pool features, dict of the rest). The dict
    holds the FeatureStats of the spatial features ("spatial") and, for each name in keep ("pool" for Precision and
    Recall, "logits" for IS), those features of every image, float32 on the CPU. With torch.distributed initialised
    every rank must call it: statistics are summed over ranks, and the kept features gathered in rank order.
    """
    device = next(model.parameters()).device
    stats, spatial, kept = FeatureStats(2048, device), FeatureStats(2023, device), {name: [] for name in keep}
    for images in batches:
        pool, features, logits = model(torch.as_tensor(images).to(device, non_blocking=True))
        stats.update(pool)
        spatial.update(features)
        for name, rows in (("pool", pool), ("logits", logits)):
            if name in kept:
                kept[name].append(rows.cpu())
    extra = dict(spatial=spatial.all_reduce())
    for name, rows in kept.items():
        rows = torch.cat(rows) if rows else torch.zeros(0, 2048 if name == "pool" else 1008)
        if dist.is_initialized():
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, rows)
            rows = torch.cat(gathered)
        extra[name] = rows
    return stats.all_reduce(), extra


def summarize(stats, extra):
    """What evaluate() reads of a set, from extract_features: mu, sigma, mu_s, sigma_s and the kept features."""
    (mu, sigma), (mu_s, sigma_s) = stats.mean_cov(), extra["spatial"].mean_cov()
    return dict(mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s, **{k: v for k, v in extra.items() if k != "spatial"})


def needs_images(source, keep=(), spatial=True):
    """Whether read_set() must run the network over the images of an open_input() source."""
    stats, images = source
    return images is not None and (bool(keep) or stats is None or (spatial and "mu_s" not in stats))


def read_set(source, model, keep=(), spatial=True, batch_size=200, progress=None):
    """
    What evaluate() reads of one open_input() source: a statistics file's values (they win, as in ADM's evaluator),
    the rest from its images, each rank extracting its slice: the features named in keep, and the statistics if
    the file has none (or, with `spatial`, none for sFID). progress(batches, total=n) may wrap them in a bar.
    """
    if not needs_images(source, keep, spatial):
        return source[0]
    stats, images = source
    start, stop = shard(len(images))
    batches = iterate_images(images, batch_size, start, stop)
    if progress is not None:
        batches = progress(batches, total=math.ceil((stop - start) / batch_size))
    return {**summarize(*extract_features(batches, model, keep)), **(stats or {})}


def compute_stats(path, model, batch_size=200, device=None):
    """
    FID's (mu, sigma) of a statistics .npz, an image .npz or an image folder. The model runs where it is, or on
    `device`; under DDP every rank must call it, and each extracts a slice of the images.
    """
    if device is not None:
        model.to(device)
    result = read_set(open_input(path), model, spatial=False, batch_size=batch_size)
    return result["mu"], result["sigma"]


def save_stats(path, stats):
    """Write an .npz of mu, sigma, mu_s, sigma_s atomically, through NAME.tmp.npz: a crash never leaves a truncated file
    under the name, and a failed write (a full disk, a read-only folder) leaves no temporary file and names the cause.
    What a killed job left there is removed by the next one that takes the output (lock_output)."""
    tmp = "{}.tmp{}".format(*os.path.splitext(path))
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **{name: stats[name] for name in ("mu", "sigma", "mu_s", "sigma_s") if name in stats})
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise UserError(f"cannot write {path}: {e.strerror}") from e
        raise


LOCKS = []  # (lock file, descriptor) of the outputs this process writes; released as it ends


def lock_output(path):
    """Makes this process the only writer of `path` until it ends: an exclusive flock on PATH.lock (the lock that the
    project's scripts take on their outputs), checked to be still the file under that name once held. The temporary
    file a killed job left (NAME.tmp.npz of save_stats) is removed once the lock is held."""
    lock = f"{path}.lock"
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o666)
        except OSError as e:
            raise UserError(f"cannot write {path}: {e.strerror}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(f"{path} is held by another job that writes it ({lock}): wait for it to end") from None
        with contextlib.suppress(FileNotFoundError):
            if os.path.samestat(os.fstat(fd), os.stat(lock)):
                LOCKS.append((lock, fd))
                with contextlib.suppress(FileNotFoundError):
                    os.remove("{}.tmp{}".format(*os.path.splitext(path)))
                return
        os.close(fd)                                           # its holder removed it as it ended: take the new one


#################################################################################
#                                 Command Line                                  #
#################################################################################

def unavailable(metric, inputs, network):
    """Why `metric` cannot come from inputs [(path, open_input(path)) of SAMPLES and, if given, REF], or None."""
    if len(inputs) == 1 and metric != "is":
        return "it needs REF"
    for path, (stats, images) in inputs[:1] if metric == "is" else inputs:
        readable = images is not None and network
        if metric == "fid" or readable or (metric == "sfid" and stats is not None and "mu_s" in stats):
            continue
        if images is not None:
            return f"reading the images of {path} needs --inception"
        return f"{path} holds statistics " + ("without mu_s/sigma_s (written before sFID)" if metric == "sfid" else
                                              "only, no images")
    return None


def main(args):
    from tqdm import tqdm
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda, but no GPU is visible")
    if args.batch_size < 1:
        raise UserError("--batch-size must be positive")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if "RANK" in os.environ:  # launched by torchrun: each rank extracts a slice, rank 0 reports
        if device == "cuda":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    device = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device(device)
    torch.backends.cudnn.benchmark = True  # every batch is 299x299

    if args.samples is None or (args.ref is None and args.save_stats is None):
        raise UserError("give SAMPLES and REF to compute metrics, or SAMPLES and --save-stats OUT.npz (see --help)")
    if args.save_stats and not os.path.isdir(os.path.dirname(os.path.abspath(args.save_stats))):
        raise FileNotFoundError(f"the folder of --save-stats {args.save_stats} does not exist")
    if args.save_stats and os.path.isdir(args.save_stats):
        raise UserError(f"--save-stats {args.save_stats} is a folder; give a file name")
    if args.save_stats and rank == 0:
        lock_output(args.save_stats)                           # before anything is read: one job per statistics file
        if os.path.exists(args.save_stats):
            raise UserError(f"--save-stats {args.save_stats} already exists: remove it, or name another file")
    metrics = list(METRICS) if args.metrics is None else args.metrics.split(",")
    if not set(metrics) <= set(METRICS):
        raise UserError(f"--metrics takes names from {','.join(METRICS)}, got {args.metrics}")
    inputs = [(path, open_input(path)) for path in (args.samples, args.ref) if path]  # a bad REF fails now
    if args.inception is None and any(stats is None for _, (stats, _) in inputs):
        raise UserError("reading images needs --inception weights-inception-2015-12-05-6726825d.pth")
    for metric in [m for m in METRICS if m in metrics]:
        reason = unavailable(metric, inputs, network=args.inception is not None)
        if reason and args.metrics is not None:  # asked for by name: an error; by default: a note
            raise UserError(f"cannot compute {METRICS[metric]}: {reason}")
        if reason:
            metrics.remove(metric)
            if len(inputs) == 2 and rank == 0:  # without REF only IS applies; the others go unmentioned
                print(f"no {METRICS[metric]}: {reason}")

    keep = ["pool"] if "pr" in metrics else []
    jobs = [(path, source, keep + (["logits"] if "is" in metrics and i == 0 else []))
            for i, (path, source) in enumerate(inputs)]
    model = None  # two statistics files need no network
    if any(needs_images(source, keep, "sfid" in metrics) for _, source, keep in jobs):
        model = load_inception(args.inception, device)
    results = []
    for path, source, keep in jobs:
        progress = functools.partial(tqdm, desc=os.path.basename(path.rstrip("/")), unit="batch", disable=rank != 0)
        results.append(read_set(source, model, keep, "sfid" in metrics, args.batch_size, progress))
    if rank != 0:
        return
    if args.save_stats:
        save_stats(args.save_stats, results[0])
        print(f"saved statistics of {args.samples} to {args.save_stats}")
    for name, value in evaluate(results[0], results[-1], metrics, device).items():  # no REF: IS alone
        print(f"{name}: {value:.4f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="FID, sFID, IS, Precision and Recall with the TensorFlow FID "
                                                 "Inception, in PyTorch, as ADM's evaluator computes them.")
    parser.add_argument("samples", nargs="?", help="npz of uint8 images (arr_0, NHWC), image folder, or stats npz")
    parser.add_argument("ref", nargs="?", help="the same kinds; e.g. ADM's VIRTUAL_imagenet256_labeled.npz")
    parser.add_argument("--inception", help="weights-inception-2015-12-05-6726825d.pth (or pytorch-fid's pt_ file)")
    parser.add_argument("--metrics", help="comma-separated subset of sfid,is,pr,fid (default: all that the inputs "
                                          "allow; named ones must be computable), e.g. --metrics fid")
    parser.add_argument("--batch-size", type=int, default=200, help="images per forward pass, per rank")
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda if available")
    parser.add_argument("--save-stats", metavar="OUT.npz", help="save SAMPLES' mu, sigma, mu_s, sigma_s (then REF "
                                                                "is optional)")
    args = parser.parse_args()

    stopping = []

    def stop(signum, frame):  # Ctrl-C or SIGTERM (a preemption): clean up (temporary file, lock) and exit 130
        stopping.append(signum)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: None)                # a second signal does not break the clean-up
        raise KeyboardInterrupt

    handlers = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        main(args)
    except (OSError, UserError) as e:  # user errors, and a disk or folder that refuses a read or write: one line
        if int(os.environ.get("RANK", 0)) == 0:
            named = isinstance(e, OSError) and e.filename and e.strerror
            print(f"error: {f'{e.filename}: {e.strerror}' if named else e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        while LOCKS:
            lock, fd = LOCKS.pop()
            os.remove(lock)                                    # while still held: see lock_output
            os.close(fd)
        if dist.is_initialized():
            dist.destroy_process_group()
        for sig, handler in handlers.items():                  # stopping: ignored until the process is gone
            signal.signal(sig, signal.SIG_IGN if stopping else handler)
