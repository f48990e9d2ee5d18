"""
Trains an Adversarial Flow Model (https://arxiv.org/abs/2511.22475) on a data directory made by prepare_latents.py:
a generator G and a discriminator D, one D step then one G step per iteration.

    python train.py --model B/2 --data-path data/imagenet256                          # one GPU
    torchrun --nproc_per_node=8 train.py --model B/2 --data-path data/imagenet256     # eight GPUs
    python train.py --model XS/7 --data-path data/fmnist --device cpu                 # Fashion-MNIST, 8 min on 2 cores
    python train.py --model XL/2 --nfe 2 ...       # few-step (velocity) model; --nfe any for any-step
    python train.py --model XL/2 --repeat 4 ...    # 112-layer one-step generator by depth repetition

Flags left unset take the paper's value for the chosen size and mode from DEFAULTS below (each row cites its source).
"""
import argparse
import errno
import glob
import json
import logging
import math
import os
import signal
import sys
import time
from copy import deepcopy

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import fid
from model import (SIZES, Classifier, Discriminator, Generator, class_balanced_labels, default_steps, generate, mode_flags,
                   transport)
from vae import SCALE, load_vae

#################################################################################
#                       The paper's values, per size and mode                   #
#################################################################################
# The only place these values are written. A flag left unset takes the first row whose flag, size and mode match.
# Modes: "1" one step, "2"/"4"/"any" few or any steps, "multi" any of those, "R2"/"R4" depth repetition, "*" all.
DEFAULTS = [
    # flag          size    mode    value   source
    # XS/7: 28-pixel images, one-step Fashion-MNIST in under an hour on 2 CPU cores (the README's search).
    ("global_batch_size", "XS/7", "*", 64,  "small images: 64 images a step keep a step at ~0.3 s on 2 CPU cores"),
    ("max_steps",    "XS/7", "*",    3000,  "small images: 3 epochs of Fashion-MNIST; longer runs lost diversity"),
    ("lr",           "XS/7", "*",    3e-4,  "small images: at 1e-4 the class conditioning (label embedding x zero-"
                                            "initialised adaLN) grows too slowly for a run of thousands of steps"),
    ("g_lr_ratio",   "XS/7", "*",    2.0,   "small images: with G no faster than D, D wins within 200 steps; at 3x "
                                            "D falls to chance and G loses diversity"),
    ("ema_decay",    "XS/7", "*",    0.995, "small images: a horizon of ~200 steps in a 3,000-step run"),
    ("ot_decay_steps", "XS/7", "*",  2000,  "small images: the decay over 2/3 of the run, as B/2's 100 of 150 epochs"),
    ("global_batch_size", "*", "*",  256,   "Table 10"),
    ("max_steps",    "*",   "*",     500_000, "the length of the lambda_ot decay; later stages continue (Table 11)"),
    ("lr",           "*",   "*",     1e-4,  "Table 11, stage 1 (D's lr; G's is lr x g_lr_ratio)"),
    ("ema_decay",    "*",   "*",     0.9999, "Table 10"),
    ("ot_decay_steps", "*", "*",     500_000, "official decay_steps 1M counts D and G steps: 500K G steps, ~100 epochs"),
    ("ot_scale",     "*",   "multi", 0.25,  "official configs/train/afm/train_afm_multi_nfe.yaml, train_afm_any_nfe.yaml"),
    ("ot_scale",     "*",   "*",     0.2,   "Table 11, stage 1; official train_afm_1nfe.yaml"),
    ("ot_scale_end", "B/2", "*",     0.01,  "Table 11, B/2 stage 1 (0.2 -> 0.01)"),
    ("ot_scale_end", "*",   "*",     0.005, "Table 11, stage 1 of the other models"),
    ("ot_constant",  "*",   "*",     0.001, "Table 11, stages 2-4 (--ot-schedule constant)"),
    ("grad_clip",    "*",   "multi", 5.0,   "official train_afm_multi_nfe.yaml, train_afm_any_nfe.yaml"),
    ("grad_clip",    "*",   "R2",    5.0,   "official train_afm_1nfe_deep.yaml"),
    ("grad_clip",    "*",   "R4",    5.0,   "official train_afm_1nfe_deep.yaml"),
    ("grad_clip",    "*",   "*",     50.0,  "official train_afm_1nfe.yaml ('effectively disabled, kept for logging')"),
    ("g_lr_ratio",   "*",   "R2",    0.5,   "Table 11, 56 layers: G 5e-5 with D 1e-4 ('lr / depth', train_afm_1nfe_deep.yaml)"),
    ("g_lr_ratio",   "*",   "R4",    0.25,  "Table 11, 112 layers: G 2.5e-5 with D 1e-4"),
    ("g_lr_ratio",   "*",   "*",     1.0,   "Table 11: one lr for both players"),
    ("cg_scale",     "*",   "multi", 0.02,  "Table 11, stage 4 of the 2- and 4-step models"),
    ("cg_scale",     "*",   "*",     0.003, "Table 11, stage 4 of the one-step models; Table 3"),
    ("cg_time",      "*",   "multi", (0.0, 0.25), "Table 11: guided target times [0] (2 steps), [0, 0.25] (4 steps); "
                                           "the paper guides no other few- or any-step model"),
    ("cg_time",      "*",   "*",     (0.0, 0.1), "Table 3's best range of t' (U(0, 0.1)); Table 11, stage 4"),
]


def mode_labels(nfe, repeat):
    return {"*", nfe} | ({"multi"} if nfe != "1" else set()) | ({f"R{repeat}"} if repeat > 1 else set())


def paper_default(flag, model, nfe, repeat):
    labels = mode_labels(nfe, repeat)
    return next(value for f, size, mode, value, _ in DEFAULTS if f == flag and size in ("*", model) and mode in labels)


def defaults_help(flag):
    """'0.25 (multi), 0.2 (*)' for the argparse help: the table, not a copy of it."""
    return ", ".join(f"{value} ({mode if size == '*' else size})" for f, size, mode, value, _ in DEFAULTS if f == flag)


def fail(message):
    """A user error: one line on stderr and a non-zero exit, no traceback."""
    raise SystemExit(f"error: {message}")


def check_output(path, flag, folder=False):
    """Fails before any work when an output path cannot be what it must be: a file (not an existing folder) in a
    folder that exists, or a folder (not an existing file)."""
    if folder and os.path.isfile(path):
        fail(f"{flag} {path} is a file, not a folder")
    if not folder and os.path.isdir(path):
        fail(f"{flag} {path} is a folder; give a file name")
    if not folder and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        fail(f"{flag} {path}: the folder {os.path.dirname(os.path.abspath(path))} does not exist")


def run_interruptible(main, args, resume_hint):
    """Runs a script's main with SIGTERM (a preemption) raising KeyboardInterrupt like Ctrl-C: either ends in one line
    and exit status 130 after main's own cleanup, never a traceback. The process group is destroyed in any case."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        main(args)
    except KeyboardInterrupt:
        print(f"interrupted: {resume_hint}", file=sys.stderr)
        sys.exit(130)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


#################################################################################
#                                      Data                                     #
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

    def sample(self, n):
        """n random images with a random view each, a posterior draw when std.npy is there, as float32."""
        idx = torch.randint(len(self.labels), (n,)).numpy()
        view = torch.randint(self.views, (n,)).numpy()
        x = torch.from_numpy(self.latents[idx, view].astype(np.float32))
        if self.std is not None:
            x = x + torch.from_numpy(self.std[idx, view].astype(np.float32)) * torch.randn(x.shape)
        return x, torch.from_numpy(self.labels[idx])


def check_data(data, path):
    """Refuses, in one line, what cannot be latents or [-1, 1] pixels, before a run starts on it."""
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
    rows = np.asarray(x[np.linspace(0, n - 1, min(n, 256)).astype(int)], dtype=np.float32)  # a sample of rows
    if info.get("vae", "none") == "none":
        if x.shape[2] not in (1, 3) or not np.isfinite(rows).all() or np.abs(rows).max() > 1.001:
            fail(f"{path}: pixel data (info.json vae 'none') must be 1 or 3 channels in [-1, 1], got {x.shape[2]} "
                 f"channels in [{rows.min():.4g}, {rows.max():.4g}]")
    else:
        scale = info.get("scale")
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not scale > 0:
            fail(f"{path}/info.json: latents of the {info['vae']} VAE need a positive `scale`, got {scale!r}")
        if not np.isfinite(rows).all() or np.abs(rows).max() > 1000:
            fail(f"{path}: values up to {np.abs(rows).max():.4g} cannot be scaled VAE latents (they are of order 1)")


def make_decoder(info, vae_weights, device):
    """G's outputs to [-1, 1] images, as the data's info.json says: through the VAE (after undoing the latent scale),
    or as they are for pixel-space data."""
    if info.get("vae", "none") == "none":
        return lambda x: x
    if vae_weights is None:
        fail(f"these latents come from the {info['vae']} VAE: give its weights with --vae-weights")
    try:
        vae = load_vae(vae_weights, device)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    return lambda x: vae.decode(x / info["scale"])


def make_batch(data, n, nfe, device):
    """Source x_s and real target x_t at times s > t. They share the image, not the noise. The batch is made on the
    CPU from the global generator, whose state the checkpoints keep, and copied to the device without a sync."""
    x, y = data.sample(n)
    if nfe == "any":
        t_src = torch.rand(n)
        t_tgt = torch.rand(n) * t_src
    else:                                                      # s from {1/k, ..., 1}, t = s - 1/k
        k = int(nfe)
        j = k - torch.randint(k, (n,))
        t_src, t_tgt = j / k, (j - 1) / k
    x_src = interpolate(x, torch.randn(x.shape), t_src)
    x_tgt = interpolate(x, torch.randn(x.shape), t_tgt)
    weighting = (t_src - t_tgt).abs().clamp_min(0.001)        # w = max(|s - t|, 0.001)
    batch = dict(x_src=x_src, x_tgt=x_tgt, y=y, t_src=t_src, t_tgt=t_tgt, weighting=weighting)
    if torch.device(device).type != "cuda":
        return batch
    # From pinned memory the copy is asynchronous; from pageable memory it would wait for the GPU every step.
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}


def interpolate(x, z, t):
    """x_t = (1 - t) x + t z: t = 0 is data, t = 1 is noise."""
    t = t.view(-1, *[1] * (x.dim() - 1))
    return (1 - t) * x + t * z


#################################################################################
#                            Gradient normalisation                             #
#################################################################################

class GradNorm(torch.nn.Module):
    """Identity forward; backward divides the incoming gradient by sqrt(EMA_0.9(|g|^2 numel)) + 1e-8, so the size
    of D's push on G no longer depends on the scale of D's logits, and one lambda_ot works at every model size."""
    def __init__(self, decay=0.9, eps=1e-8):
        super().__init__()
        self.decay, self.eps = decay, eps
        self.register_buffer("square_avg", torch.tensor(0.0))

    def forward(self, x):
        return _GradNormFn.apply(x, self)


class _GradNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, module):
        ctx.module = module
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        m = ctx.module
        # |g|^2 times numel equals mean(g^2) times numel^2: independent of the per-rank batch size once averaged.
        square = grad.float().square().sum() * grad.numel()
        if dist.is_initialized():
            dist.all_reduce(square, op=dist.ReduceOp.AVG)
        m.square_avg.lerp_(square, 1 - m.decay)
        return grad / (m.square_avg.sqrt() + m.eps), None


#################################################################################
#                             The two players' losses                           #
#################################################################################

def augment(x_real, x_fake, p):
    """Discriminator augmentation (App. C, Eq. 33-34, Algorithm 1), Kornia's RandomTranslate(translate_x=translate_y=
    (0, 0.3), nearest) and then three RandomErasing(scale=(0.1, 0.5)), each applied to a pair with probability p, with
    the SAME parameters for the real and the generated sample of a pair: the relativistic loss compares the two.
    Batched, in plain torch; differentiable in x_fake. Returns the pair."""
    if p == 0:
        return x_real, x_fake
    x = torch.cat([x_real, x_fake], dim=1)                    # (N, 2C, H, W): a pair shares its parameters
    N, _, H, W = x.shape
    uniform = lambda lo, hi: lo + (hi - lo) * torch.rand(N, device=x.device)
    on = lambda: torch.rand(N, device=x.device) < p
    rows, cols = torch.arange(H, device=x.device), torch.arange(W, device=x.device)
    # Translation by (dx, dy) ~ U(0, 0.3) (W, H), right and down only (Kornia reads the tuple as the range itself);
    # nearest resampling makes it a whole-pixel shift. The vacated band is zero.
    shift = on()
    dx, dy = (torch.round(uniform(0, 0.3 * size)).long() * shift for size in (W, H))
    src_y, src_x = rows - dy[:, None], cols - dx[:, None]                         # (N, H), (N, W)
    moved = x[torch.arange(N, device=x.device)[:, None, None], :, src_y.clamp(min=0)[:, :, None],
              src_x.clamp(min=0)[:, None, :]].permute(0, 3, 1, 2)                 # (N, 2C, H, W)
    x = torch.where(((src_y >= 0)[:, :, None] & (src_x >= 0)[:, None, :])[:, None], moved, torch.zeros_like(x))
    for _ in range(3):
        y0, x0, h, w = erasing_boxes(N, H, W, x.device)
        inside = ((rows >= y0[:, None]) & (rows < (y0 + h)[:, None]))[:, :, None] & \
                 ((cols >= x0[:, None]) & (cols < (x0 + w)[:, None]))[:, None, :]  # (N, H, W)
        x = torch.where((inside & on()[:, None, None])[:, None], torch.zeros_like(x), x)
    return x.chunk(2, dim=1)


def erasing_boxes(n, H, W, device):
    """Kornia's RandomErasing(scale=(0.1, 0.5)) boxes (top, left, height, width), each (n,): area ~ U(0.1, 0.5) HW,
    aspect h/w from U(0.3, 1) or U(1, 3.3) on a coin flip, the box placed uniformly where it fits."""
    uniform = lambda lo, hi: lo + (hi - lo) * torch.rand(n, device=device)
    area, r = uniform(0.1, 0.5) * H * W, torch.where(torch.rand(n, device=device) < 0.5, uniform(0.3, 1), uniform(1, 3.3))
    h = torch.round((area * r).sqrt()).clamp(1, H).long()
    w = torch.round((area / r).sqrt()).clamp(1, W).long()
    y0 = (torch.rand(n, device=device) * (H - h + 1)).floor().long()
    x0 = (torch.rand(n, device=device) * (W - w + 1)).floor().long()
    return y0, x0, h, w


def discriminator_loss(D, x_real, x_fake, y, t, weighting, gp_scale, gp_eps, gp_ratio, cp_scale, aug_p=0.0):
    """D's loss on real and generated samples at time t (t=None for one-step models). Returns (loss, stats)."""
    x_real, x_fake = augment(x_real, x_fake, aug_p)           # Eq. 33: before the R1/R2 perturbation
    bsz = len(x_real)
    gp_bsz = max(round(bsz * gp_ratio), 1)                    # R1/R2 on the first gp_ratio of the batch
    x_real_gp = x_real[:gp_bsz] + gp_eps * torch.randn_like(x_real[:gp_bsz])
    x_fake_gp = x_fake[:gp_bsz] + gp_eps * torch.randn_like(x_fake[:gp_bsz])
    # One forward over [real, fake, real + eps n, fake + eps n] instead of four.
    x_all = torch.cat([x_real, x_fake, x_real_gp, x_fake_gp])                   # (2 bsz + 2 gp_bsz, ...)
    y_all = torch.cat([y, y, y[:gp_bsz], y[:gp_bsz]])
    t_all = None if t is None else torch.cat([t, t, t[:gp_bsz], t[:gp_bsz]])
    logits_real, logits_fake, logits_real_gp, logits_fake_gp = D(x_all, y_all, t_all).float().split(
        [bsz, bsz, gp_bsz, gp_bsz])
    gp_weight = gp_scale * weighting[:gp_bsz] / gp_eps ** 2
    loss_adv = F.softplus(-(logits_real - logits_fake)).mean()                  # log(1 + e^-(D(x_t) - D(x^_t)))
    loss_r1 = (gp_weight * (logits_real_gp - logits_real[:gp_bsz]).square()).mean()  # R1 ~ l w/e^2 (D(x+en) - D(x))^2
    loss_r2 = (gp_weight * (logits_fake_gp - logits_fake[:gp_bsz]).square()).mean()  # R2, the same on generated x^_t
    loss_cp = cp_scale * (logits_real + logits_fake).square().mean()           # centering: l_cp (D(x_t) + D(x^_t))^2
    loss = loss_adv + loss_r1 + loss_r2 + loss_cp
    stats = dict(loss_d=loss_adv, r1=loss_r1, r2=loss_r2, cp=loss_cp,
                 logits_real=logits_real.mean(), logits_fake=logits_fake.mean())
    return loss, {name: v.detach() for name, v in stats.items()}


def generator_loss(D, x_fake, x_src, x_real, y, t, weighting, ot_scale, grad_norm, aug_p=0.0, classifier=None,
                   cg_scale=0.0, cg_time=(0.0, 0.1)):
    """G's loss with D frozen (Eq. 25): the relativistic loss through normalised gradients, the optimal-transport loss,
    and with a classifier its guidance."""
    x_real_aug, x_fake_aug = augment(x_real, x_fake, aug_p)  # Eq. 34: D sees the augmented pair, normalised after it
    with torch.no_grad():
        logits_real = D(x_real_aug, y, t).float()             # D is frozen: real logits need no graph
    logits_fake = D(grad_norm(x_fake_aug), y, t).float()
    loss_adv = F.softplus(-(logits_fake - logits_real)).mean()                  # log(1 + e^-(D(x^_t) - D(x_t)))
    loss_ot = (ot_scale * (x_fake - x_src).square().flatten(1).mean(1) / weighting).mean()  # l_ot |x^_t - x_s|^2/(n w)
    # (the G step's logits, logged apart from the D step's, which they would otherwise overwrite)
    stats = dict(loss_g=loss_adv, ot=loss_ot, g_logits_real=logits_real.mean(), g_logits_fake=logits_fake.mean())
    loss = loss_adv + loss_ot
    if classifier is not None:
        stats["cg"] = cg_scale * guidance_loss(classifier, x_fake, y, t, *cg_time)  # l_cg CE(C(x', t'), y)
        loss = loss + stats["cg"]
    return loss, {name: v.detach() for name, v in stats.items()}


def guidance_loss(C, x_fake, y, t, lo, hi):
    """Cross-entropy of the frozen classifier C on G's samples. One-step models (t None) interpolate the sample with
    fresh noise at t' ~ U(lo, hi) (Eq. 26, Algorithm 2); few-step models classify their own x^_t at t' = t where
    lo <= t <= hi, zero elsewhere, averaged over the batch (Eq. 38). The gradient reaches G only (C is frozen) and,
    as in the official code, is not normalised: only D's gradient passes the gradient normalisation."""
    if t is None:
        t_cg = lo + (hi - lo) * torch.rand(len(x_fake), device=x_fake.device)
        x_cg, guided = interpolate(x_fake, torch.randn_like(x_fake), t_cg), torch.ones_like(t_cg)
    else:
        t_cg, x_cg, guided = t, x_fake, ((t >= lo) & (t <= hi)).float()
    return (F.cross_entropy(C(x_cg, t_cg).float(), y, reduction="none") * guided).mean()


#################################################################################
#                              The two players' steps                           #
#################################################################################
# velocity: G predicts velocity (few-step models), not the sample; d_time: D sees the target time. bf16: G runs under
# bf16 autocast. D runs in fp32 in both steps (TF32 matmuls on GPU, as the official code): R1/R2 differences of logits
# 0.01 apart drown in bf16 rounding, and the G step then trains against the same D the D step trained.

def d_step(G, D, opt_D, batch, velocity, d_time, gp_scale, gp_eps, gp_ratio, cp_scale, grad_clip, bf16=False,
           aug_p=0.0):
    """One discriminator update; G runs without gradients."""
    with torch.no_grad(), autocast(bf16):
        x_fake = transport(G, batch["x_src"], batch["y"], batch["t_src"], batch["t_tgt"], velocity)
    loss, stats = discriminator_loss(D, batch["x_tgt"], x_fake, batch["y"], batch["t_tgt"] if d_time else None,
                                     batch["weighting"], gp_scale, gp_eps, gp_ratio, cp_scale, aug_p)
    opt_D.zero_grad(set_to_none=True)
    loss.backward()
    stats["grad_norm_d"] = torch.nn.utils.clip_grad_norm_(D.parameters(), grad_clip)
    opt_D.step()
    return stats


def g_step(G, D, opt_G, grad_norm, batch, velocity, d_time, ot_scale, grad_clip, bf16=False, aug_p=0.0, **guidance):
    """One generator update; D (and a guidance classifier) are frozen but pass gradients through to G's samples.
    guidance: classifier, cg_scale and cg_time, as generator_loss takes them."""
    frozen = [p for p in D.parameters() if p.requires_grad]   # not pos_embed, which stays fixed for good
    for p in frozen:
        p.requires_grad_(False)
    with autocast(bf16):
        x_fake = transport(G, batch["x_src"], batch["y"], batch["t_src"], batch["t_tgt"], velocity)
    loss, stats = generator_loss(D, x_fake, batch["x_src"], batch["x_tgt"], batch["y"],
                                 batch["t_tgt"] if d_time else None, batch["weighting"], ot_scale, grad_norm, aug_p,
                                 **guidance)
    opt_G.zero_grad(set_to_none=True)
    loss.backward()
    for p in frozen:
        p.requires_grad_(True)
    stats["grad_norm_g"] = torch.nn.utils.clip_grad_norm_(G.parameters(), grad_clip)
    opt_G.step()
    return stats


def autocast(bf16):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16)


@torch.no_grad()
def update_ema(EMA, G, decay):
    # One fused kernel over all tensors instead of one launch per parameter (hundreds per step on GPU).
    torch._foreach_lerp_(list(EMA.parameters()), list(G.parameters()), 1 - decay)


@torch.no_grad()
def reload_ema(G, EMA):
    # EMA reload (App. C, Table 11 stages 2-4): G continues from the EMA, which outperforms it; optimizer state kept.
    torch._foreach_copy_(list(G.parameters()), list(EMA.parameters()))


def ot_scale_at(step, start, end, decay_steps):
    """lambda_ot at generator step `step`: cosine from start to end over decay_steps, then end (constant: start = end)."""
    if step >= decay_steps - 1:
        return end
    return end + (start - end) * (1 + math.cos(math.pi * step / (decay_steps - 1))) / 2


#################################################################################
#                            Checkpoints and evaluation                         #
#################################################################################

# The official release's .pth files are bare state dicts of networks on ImageNet 256 latents of the SD VAE.
OFFICIAL_DATA = dict(vae="sd-vae-ft-mse", scale=SCALE, num_classes=1000)              # as info.json would say
OFFICIAL_SHAPE = dict(input_size=32, in_channels=4, num_classes=1000)


def is_state_dict(ckpt):
    return isinstance(ckpt, dict) and bool(ckpt) and all(isinstance(v, torch.Tensor) for v in ckpt.values())


def load_checkpoint(path):
    """Loads an untrusted checkpoint file safely (tensors and primitives only), or ends with one clear line."""
    if not os.path.isfile(path):
        fail(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # mmap: no copy of unused parts
    except Exception as e:  # a truncated zip, random bytes or a pickle with code all end here
        fail(f"cannot read checkpoint {path} (corrupt, truncated or not a checkpoint): {type(e).__name__}")


def load_resume(path, config):
    """A whole training checkpoint (train.py's or train_classifier.py's) of this very network configuration, or one
    clear line."""
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("config"), dict) or "step" not in ckpt:
        fail(f"{path} is not a training checkpoint of this project")
    if "rng" not in ckpt:
        fail(f"{path} holds a generator alone (sample.py --save-generator); continuing needs a training checkpoint")
    if set(ckpt["config"]) != set(config):
        kind = lambda c: "a classifier" if "C" in c else "a generator and a discriminator"
        fail(f"{path} holds {kind(ckpt['config'])}, and this run trains {kind(config)}")
    if ckpt["config"] != config:
        flat = lambda c: {f"{k}.{j}" if isinstance(v, dict) else k: w
                          for k, v in c.items() for j, w in (v.items() if isinstance(v, dict) else [(k, v)])}
        old, new = flat(ckpt["config"]), flat(config)
        diffs = [f"{k} {old.get(k)} (asked: {new.get(k)})" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        fail(f"{path} holds another network than this run asks for: {', '.join(diffs[:4])}")
    return ckpt


def load_generator(path, model=None, nfe=None, repeat=None, weights="EMA"):
    """A Generator from a training checkpoint (its config decides the network) or from an official release .pth
    (a bare state dict for ImageNet-256 latents; --model, --nfe and --repeat say which network it is: the keys of
    few-step and repeated generators are the same, so only a wrong size can be caught there)."""
    ckpt = load_checkpoint(path)
    if isinstance(ckpt, dict) and "config" in ckpt:
        config, info = ckpt["config"], ckpt.get("data_info", {})
        if "G" not in config or weights not in ckpt:
            fail(f"{path} holds no {weights} generator (" + ("a classifier checkpoint" if "C" in config else
                 "a generator alone, as sample.py --save-generator writes it: its EMA") + ")")
        trained = dict(model=ckpt["args"]["model"], nfe=ckpt["config"]["nfe"], repeat=config["G"]["repeat"])
        for key, value in dict(model=model, nfe=nfe, repeat=repeat).items():
            if value is not None and value != trained[key]:
                fail(f"{path} holds a --{key} {trained[key]} model, not --{key} {value}")
        kwargs, state, nfe = config["G"], ckpt[weights], config["nfe"]
    elif is_state_dict(ckpt):
        if model is None:
            fail(f"{path} is a bare state dict: say which network it is with --model (and --nfe, --repeat)")
        nfe, repeat = nfe or "1", repeat or 1
        kwargs = dict(SIZES[model], **OFFICIAL_SHAPE, **mode_flags(nfe, repeat)[0])
        state, info = ckpt, dict(OFFICIAL_DATA)
    else:
        fail(f"{path} is neither a training checkpoint nor a generator state dict")
    try:
        G = Generator(**kwargs)
    except ValueError as e:                                    # e.g. --repeat with --nfe 2
        fail(str(e))
    missing, unexpected = [k for k in G.state_dict() if k not in state], [k for k in state if k not in G.state_dict()]
    shapes = [k for k in state if k in G.state_dict() and state[k].shape != G.state_dict()[k].shape]
    if missing or unexpected or shapes:
        fail(f"{path} does not fit this generator (missing {missing[:3]}, unexpected {unexpected[:3]}, "
             f"other shapes {shapes[:3]}): check --model, --nfe and --repeat")
    G.load_state_dict(state, strict=True)
    return G.eval().requires_grad_(False), nfe, info


def save_atomic(obj, path, save=torch.save):
    """Writes through a temporary file renamed into place, so a crash never leaves a half-written file; a failed
    write (a full disk) removes the temporary file and ends in one line."""
    tmp = f"{path}.tmp"
    try:
        save(obj, tmp)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, (OSError, RuntimeError)):       # torch.save reports a failed write as a RuntimeError
            fail(f"cannot write {path}: {getattr(e, 'strerror', None) or ' '.join(str(e).split())[:200]}")
        raise


def savez(arrays, path):
    """np.savez to exactly this path (given a name, np.savez would append ".npz" to a temporary one)."""
    with open(path, "wb") as f:
        np.savez(f, **arrays)


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
        C.load_state_dict(ckpt[weights])
    except (KeyError, TypeError, RuntimeError) as e:
        fail(f"{path} holds a classifier that does not load: {' '.join(str(e).split())[:200]}")
    return C.eval().requires_grad_(False), ckpt.get("data_info", {})


def save_grid(images, path, nrow):
    """Tiles uint8 images (N, C, H, W) into one picture, 2 px apart, in the format its extension names, atomically."""
    n, _, h, w = images.shape
    ncol = math.ceil(n / nrow)
    grid = np.zeros((ncol * (h + 2) + 2, nrow * (w + 2) + 2, 3), dtype=np.uint8)
    for i, image in enumerate(images.permute(0, 2, 3, 1).cpu().numpy()):
        r, c = divmod(i, nrow)
        grid[2 + r * (h + 2):2 + r * (h + 2) + h, 2 + c * (w + 2):2 + c * (w + 2) + w] = image
    save_atomic(Image.fromarray(grid), path, save=lambda im, tmp: im.save(tmp, format=image_format(path)))


def image_format(path):
    """The Pillow format an image file's extension names (PNG for .png, JPEG for .jpg, ...), or one clear line."""
    fmt = Image.registered_extensions().get(os.path.splitext(path)[1].lower())
    if fmt is None or fmt not in Image.SAVE:
        fail(f"{path}: name an image file (.png, .jpg, ...), not {os.path.splitext(path)[1] or 'no extension'}")
    return fmt


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


def gather_rng_states(device):
    """Every rank's RNG states, so a resumed run draws exactly the batches and noise it would have drawn."""
    state = dict(cpu=torch.get_rng_state(), cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
    if not dist.is_initialized():
        return [state]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


def restore_rng(ckpt, seed, rank, world, step, device):
    """Per-rank streams of batches and noise: a resumed checkpoint's when the world size is the same, else fresh
    ones for this step (a new stage, or another world size)."""
    torch.manual_seed(seed * world + rank)
    if ckpt is not None and len(ckpt["rng"]) == world:
        torch.set_rng_state(ckpt["rng"][rank]["cpu"])
        if device.type == "cuda" and ckpt["rng"][rank]["cuda"] is not None:
            torch.cuda.set_rng_state(ckpt["rng"][rank]["cuda"], device)
    elif step > 0:
        torch.manual_seed((seed * world + rank) * 1_000_003 + step)


def load_starts(args, config, max_steps):
    """The checkpoints a run starts from, read before the run writes anything: --resume (the exact continuation of a
    run), or --init (a new stage from a run's last checkpoint) and --init-d (D from an earlier one). The classifier
    trainer has --resume alone."""
    flags = {key: getattr(args, key, None) for key in ("resume", "init", "init_d")}
    if flags["resume"] and (flags["init"] or flags["init_d"]):
        fail("--resume continues a run exactly; --init and --init-d start a new stage: give one or the other")
    starts = {key: load_resume(path, config) for key, path in flags.items() if path}
    if start_step(starts) >= max_steps:
        fail(f"the checkpoint is at step {start_step(starts)}, already at --max-steps {max_steps}: ask for more steps")
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


def begin(state, starts, args, logger):
    """Loads the starting checkpoints into `state` and returns the step to start from. --resume restores everything.
    --init starts a stage as the paper does (Table 11): G from the previous stage's EMA, and the EMA, D, both
    optimizers and the gradient normalisation carried over (its running scale too: restarted from zero it would make
    the first G steps ~3x too large). --init-d then takes D and its optimizer from an earlier checkpoint (App. C)."""
    hyper = {key: {k: opt.param_groups[0][k] for k in ("lr", "betas", "eps", "weight_decay")}
             for key, opt in state.items() if isinstance(opt, torch.optim.Optimizer)}
    if "resume" in starts:
        for key, module in state.items():
            module.load_state_dict(starts["resume"][key])
    if "init" in starts:
        for key, module in state.items():
            module.load_state_dict(starts["init"]["EMA" if key == "G" else key])
    if "init_d" in starts:
        for key in ("D", "opt_D"):
            state[key].load_state_dict(starts["init_d"][key])
    for key, values in hyper.items():                         # this command's lr etc., not the checkpoint's
        state[key].param_groups[0].update(values)
    for key, ckpt in starts.items():
        logger.info(f"--{key.replace('_', '-')} {getattr(args, key)} (step {ckpt['step']})")
    return start_step(starts)


def load_guidance(args, data, device):
    """The frozen classifier for classifier guidance, checked against the data it must classify."""
    C, info = load_classifier(args.classifier)
    shape = (C.input_size, C.in_channels, C.final_layer[1].out_features)
    if shape != (data.size, data.channels, data.num_classes):
        fail(f"{args.classifier} classifies {shape[1]} x {shape[0]} x {shape[0]} inputs of {shape[2]} classes, "
             f"but the data are {data.channels} x {data.size} x {data.size} of {data.num_classes}")
    return dict(classifier=C.to(device), cg_scale=args.cg_scale, cg_time=args.cg_time)


def make_fid_evaluator(args, data, device):
    """Loads the Inception network, the VAE and the reference statistics once; returns G -> FID of its samples."""
    if not (args.fid_ref and args.inception):
        fail("--fid-every needs --fid-ref (statistics, image npz or folder) and --inception (weights file)")
    if args.fid_samples < max(2, data.num_classes):
        fail(f"--fid-samples {args.fid_samples} must be at least the number of classes ({data.num_classes}) and 2")
    try:
        inception = fid.load_inception(args.inception, device)
        ref = fid.compute_stats(args.fid_ref, inception, batch_size=args.fid_batch_size)
    except (FileNotFoundError, fid.UserError) as e:
        fail(str(e))
    decode = make_decoder(data.info, args.vae_weights, device)

    def evaluate(G, steps):
        """FID of --fid-samples class-balanced samples, sharded over ranks, against the reference."""
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        labels = class_balanced_labels(args.fid_samples, data.num_classes)
        indices = list(range(rank, args.fid_samples, world))
        batches = (images for _, images in generate(G, steps, decode, indices, labels, args.global_seed,
                                                    args.fid_batch_size, device))
        stats, _ = fid.extract_features(batches, inception)  # summed over ranks
        return fid.frechet_distance(*stats.mean_cov(), *ref)
    return evaluate


def make_grid_writer(args, data, device):
    """Fixed noise and labels (8 samples of each of up to 10 classes, a row per class); returns a function that writes
    a PNG grid of each generator it is given to RESULTS/samples/, so a run can be watched."""
    decode = make_decoder(data.info, args.vae_weights, device)
    shown = min(data.num_classes, 10)
    labels = [k * data.num_classes // shown for k in range(shown) for _ in range(8)]

    def write(step, generators):
        if not dist.is_initialized() or dist.get_rank() == 0:
            os.makedirs(os.path.join(args.results_dir, "samples"), exist_ok=True)
            for name, G in generators.items():
                images = torch.cat([x for _, x in generate(G, default_steps(args.nfe), decode, list(range(len(labels))),
                                                           labels, args.global_seed, 64, device)])
                save_grid(images, os.path.join(args.results_dir, "samples", f"{step:07d}_{name}.png"), nrow=8)
            # With decay d the EMA still holds d^step of its initialisation (a zero-output G: a grey grid).
            share = args.ema_decay ** step
            note = f"; the EMA is still {share:.0%} its initialisation (decay {args.ema_decay})" if share > 0.01 else ""
            logging.getLogger("afm").info(f"step {step:07d} sample grids in {args.results_dir}/samples{note}")
        if dist.is_initialized():
            dist.barrier()
    return write


#################################################################################
#                                    Logging                                    #
#################################################################################

def create_logger(logging_dir):
    """Rank 0 logs to stdout and log.txt; the other ranks stay silent."""
    logger = logging.getLogger("afm")
    logger.setLevel(logging.INFO)
    logger.handlers.clear()
    if logging_dir is None:
        logger.addHandler(logging.NullHandler())
        return logger
    fmt = logging.Formatter("[%(asctime)s] %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    for handler in (TqdmHandler(), logging.FileHandler(os.path.join(logging_dir, "log.txt"))):
        handler.setFormatter(fmt)
        logger.addHandler(handler)
    return logger


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


#################################################################################
#                                  Training                                     #
#################################################################################

def save_checkpoint(state, step, args, config, data_info, device, logger):
    """The modules in `state`, the step, the command, the networks' config, the data's info and every rank's RNG."""
    ckpt = dict({k: m.state_dict() for k, m in state.items()}, step=step, args=vars(args), config=config,
                data_info=data_info, rng=gather_rng_states(device))
    path = os.path.join(args.results_dir, "checkpoints", f"{step:07d}.pt")
    if not dist.is_initialized() or dist.get_rank() == 0:
        save_atomic(ckpt, path)
        logger.info(f"saved {path}")
    if dist.is_initialized():
        dist.barrier()
    return path


def check_in_sync(models, device, world, logger):
    """Every rank must end with the same weights: a cheap proof that DDP kept the players in step."""
    if world == 1:
        return
    check = torch.stack([sum(p.double().sum() for p in m.parameters()) for m in models]).to(device)
    gathered = [torch.zeros_like(check) for _ in range(world)]
    dist.all_gather(gathered, check)
    if not all(torch.equal(g, gathered[0]) for g in gathered):
        raise RuntimeError("ranks ended with different weights")
    logger.info(f"weights identical on all {world} ranks")


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
            print(f"{signal.Signals(signum).name} again: stopping now, without a checkpoint", file=sys.stderr)
            raise SystemExit(128 + signum)
        self.signum = signum

    @staticmethod
    def exit(signum, step, path, logger):
        """After the checkpoint: the line that says how to resume, and the exit status of the signal."""
        logger.info(f"stopped by {signal.Signals(signum).name} after step {step}: resume with --resume {path}")
        raise SystemExit(128 + signum)

    def requested(self):
        flag = torch.tensor([self.signum])
        if self.group is not None:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return int(flag)


def run_training(main, args):
    """Runs a trainer's main, then gives back what it took: the signal handlers of StopOnSignal (for callers in the
    same process) and the process group."""
    try:
        main(args)
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if dist.is_initialized():
            dist.destroy_process_group()


def setup_distributed(device):
    """DDP as in DiT and nanoGPT: torchrun sets RANK/WORLD_SIZE, plain `python` runs one process. nccl on CUDA,
    gloo on CPU. Returns (device, rank, world size)."""
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


def check_setup(args, device, world):
    """-> the per-rank batch size, once the flags fit this device and world size."""
    if args.precision == "bf16" and device.type != "cuda":
        fail("--precision bf16 is for CUDA devices")
    return per_rank_batch(args.global_batch_size, world)


def per_rank_batch(global_batch_size, world):
    if global_batch_size % world:
        fail(f"--global-batch-size {global_batch_size} must be divisible by the world size {world}")
    return global_batch_size // world


def fill_defaults(args):
    """The paper's value (DEFAULTS) for every such flag left unset; a constant schedule holds --ot-scale."""
    pick = lambda flag: paper_default(flag, args.model, args.nfe, args.repeat)
    for flag in ("global_batch_size", "max_steps", "lr", "ema_decay", "ot_decay_steps", "grad_clip", "cg_scale"):
        if getattr(args, flag) is None:
            setattr(args, flag, pick(flag))
    if args.ot_schedule == "constant":
        args.ot_scale = args.ot_scale_end = args.ot_scale if args.ot_scale is not None else pick("ot_constant")
    args.ot_scale = args.ot_scale if args.ot_scale is not None else pick("ot_scale")
    args.ot_scale_end = args.ot_scale_end if args.ot_scale_end is not None else pick("ot_scale_end")
    args.lr_g = args.lr_g if args.lr_g is not None else args.lr * pick("g_lr_ratio")
    args.cg_time = tuple(args.cg_time) if args.cg_time is not None else pick("cg_time")


def network_config(model, nfe, repeat, data):
    """Everything that decides the networks' shapes: what a checkpoint must match to be resumed."""
    g_flags, d_flags = mode_flags(nfe, repeat)
    common = network_shape(model, data)
    return dict(G=dict(common, **g_flags), D=dict(common, **d_flags), nfe=nfe)


def network_shape(model, data):
    """The constructor arguments every network of `model` size shares on this data."""
    if data.size % SIZES[model]["patch_size"]:
        fail(f"inputs of size {data.size} do not split into patches of {SIZES[model]['patch_size']}")
    return dict(SIZES[model], input_size=data.size, in_channels=data.channels, num_classes=data.num_classes)


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


def main(args):
    # Setup: processes and devices; flags left unset take the paper's values.
    device, rank, world = setup_distributed(args.device)
    fill_defaults(args)
    batch_size = check_setup(args, device, world)
    stop = StopOnSignal()
    torch.backends.cuda.matmul.fp32_precision = torch.backends.cudnn.conv.fp32_precision = "tf32"  # as the official code

    # Inputs: data, checkpoint and evaluation files are all checked before the run writes anything.
    data = LatentData(args.data_path)
    config = network_config(args.model, args.nfe, args.repeat, data)
    starts = load_starts(args, config, args.max_steps)
    if dist.is_initialized():
        dist.barrier()                                         # every rank has checked --results-dir before rank 0 writes
    guidance = load_guidance(args, data, device) if args.classifier else {}
    evaluate_fid = make_fid_evaluator(args, data, device) if args.fid_every else None
    write_grids = make_grid_writer(args, data, device) if args.sample_every else None

    # Models: G, D and the EMA of G (the same initial weights on every rank), the gradient normalisation, AdamW.
    if rank == 0:
        os.makedirs(os.path.join(args.results_dir, "checkpoints"), exist_ok=True)
    logger = create_logger(args.results_dir if rank == 0 else None)
    torch.manual_seed(args.global_seed)
    G, D = Generator(**config["G"]).to(device), Discriminator(**config["D"]).to(device)
    adamw = dict(betas=(0.0, 0.9), eps=1e-8, weight_decay=0.01, fused=device.type == "cuda")  # Table 10
    opt_G = torch.optim.AdamW(G.parameters(), lr=args.lr_g, **adamw)
    opt_D = torch.optim.AdamW(D.parameters(), lr=args.lr, **adamw)
    EMA, grad_norm = deepcopy(G).requires_grad_(False), GradNorm().to(device)
    state = dict(G=G, D=D, EMA=EMA, opt_G=opt_G, opt_D=opt_D, grad_norm=grad_norm)   # what a checkpoint holds
    logger.info(f"G {sum(p.numel() for p in G.parameters()):,} parameters, D {sum(p.numel() for p in D.parameters()):,}")

    # Start: fresh, the exact continuation of a run (--resume), or a new stage of one (--init, --init-d).
    start = begin(state, starts, args, logger)
    restore_rng(starts.get("resume"), args.global_seed, rank, world, start, device)

    # Only the player being trained runs through DDP: D's step calls the bare G without gradients, and G's step
    # calls the bare, frozen D, so neither wrapper ever waits for gradients that do not come.
    G_fwd, D_fwd = (torch.compile(G), torch.compile(D)) if args.compile else (G, D)
    G_train = DDP(G_fwd, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else G_fwd
    D_train = DDP(D_fwd, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else D_fwd
    players = dict(velocity=G.use_t_src, d_time=D.use_t, grad_clip=args.grad_clip, bf16=args.precision == "bf16",
                   aug_p=args.aug_p)
    d_weights = dict(gp_scale=args.gp_scale, gp_eps=args.gp_eps, gp_ratio=args.gp_ratio, cp_scale=args.cp_scale)

    # The loop: one D step, one G step, the EMA; logs, checkpoints and FID every so many steps.
    logger.info(f"training {args.model} nfe={args.nfe} repeat={args.repeat} on {world} x {device.type}, batch {batch_size}/"
                f"rank, ot_scale {args.ot_scale}->{args.ot_scale_end}, lr G {args.lr_g} D {args.lr}, clip {args.grad_clip}")
    sums, count, tic = {}, 0, time.time()
    for step in tqdm(range(start, args.max_steps), initial=start, total=args.max_steps, disable=rank != 0):
        ot_scale = ot_scale_at(step, args.ot_scale, args.ot_scale_end, args.ot_decay_steps)
        stats = d_step(G_fwd, D_train, opt_D, make_batch(data, batch_size, args.nfe, device), **players, **d_weights)
        stats.update(g_step(G_train, D_fwd, opt_G, grad_norm, make_batch(data, batch_size, args.nfe, device),
                            ot_scale=ot_scale, **players, **guidance))
        update_ema(EMA, G, args.ema_decay)
        if args.ema_reload_every and (step + 1) % args.ema_reload_every == 0:
            reload_ema(G, EMA)
        sums, count, done = {k: sums.get(k, 0) + v.float() for k, v in stats.items()}, count + 1, step + 1
        log_now, ckpt_now = done % args.log_every == 0 or done == args.max_steps, done % args.ckpt_every == 0
        signum = stop.requested()
        if log_now or ckpt_now or signum:                      # no checkpoint of non-finite weights
            means = reduce_means(sums, count, done, args.results_dir)
        if log_now:
            logger.info(f"step {done:07d} " + " ".join(f"{k} {v:.4f}" for k, v in means.items()) +
                        f" ot_scale {ot_scale:.4g} aug_p {args.aug_p:.3g} lr {opt_D.param_groups[0]['lr']:.3g}"
                        f" img/s {2 * args.global_batch_size * count / (time.time() - tic):.1f}")
            sums, count, tic = {}, 0, time.time()
        if ckpt_now or done == args.max_steps or signum:
            path = save_checkpoint(state, done, args, config, data.info, device, logger)
        if signum:
            stop.exit(signum, done, path, logger)
        if write_grids is not None and done % args.sample_every == 0:
            write_grids(done, dict(ema=EMA, g=G))
        if evaluate_fid is not None and done % args.fid_every == 0:
            t0, steps = time.time(), default_steps(args.nfe)
            logger.info(f"step {done:07d} FID-{args.fid_samples} {evaluate_fid(EMA, steps):.4f} (EMA, {steps} steps)")
            tic += time.time() - t0                            # keep sampling time out of img/s

    # End: every rank must hold the same weights, a cheap proof that DDP kept the players in step.
    check_in_sync([G, D], device, world, logger)
    logger.info("done")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Train an adversarial flow model. Unset defaults: train.DEFAULTS.")
    parser.add_argument("--data-path", type=str, required=True, help="directory written by prepare_latents.py")
    parser.add_argument("--results-dir", type=str, default="results")
    parser.add_argument("--model", type=str, choices=list(SIZES), default="B/2")
    parser.add_argument("--nfe", type=parse_nfe, default="1", help="1 (one step), 2 or 4 (few steps), or any")
    parser.add_argument("--repeat", type=positive_int, default=1, help="depth repetition R of a one-step generator (2, 4)")
    parser.add_argument("--global-batch-size", type=positive_int, default=None,
                        help=f"split over the ranks ({defaults_help('global_batch_size')})")
    parser.add_argument("--global-seed", type=count, default=0)
    parser.add_argument("--max-steps", type=positive_int, default=None,
                        help=f"iterations of one D step and one G step ({defaults_help('max_steps')})")
    parser.add_argument("--lr", type=number(lo_open=True), default=None,
                        help=f"D's lr, and G's unless --lr-g ({defaults_help('lr')})")
    parser.add_argument("--lr-g", type=number(lo_open=True), default=None,
                        help=f"G's lr (default: --lr x {defaults_help('g_lr_ratio')})")
    parser.add_argument("--ema-decay", type=number(0, 1, hi_open=True), default=None,
                        help=f"EMA of G after every G step ({defaults_help('ema_decay')})")
    parser.add_argument("--ot-scale", type=number(), default=None, help=f"lambda_ot at the start (default: "
                        f"{defaults_help('ot_scale')}; constant: {defaults_help('ot_constant')})")
    parser.add_argument("--ot-scale-end", type=number(), default=None,
                        help=f"lambda_ot at the end ({defaults_help('ot_scale_end')})")
    parser.add_argument("--ot-schedule", choices=["cosine", "constant"], default="cosine",
                        help="cosine decay (stage 1) or constant (later stages, Table 11)")
    parser.add_argument("--ot-decay-steps", type=positive_int, default=None,
                        help=f"cosine length in G steps ({defaults_help('ot_decay_steps')})")
    parser.add_argument("--gp-scale", type=number(), default=0.25)              # lambda_gp for R1 and R2 (Table 10)
    parser.add_argument("--gp-eps", type=number(lo_open=True), default=0.01)    # finite-difference step (Table 10)
    parser.add_argument("--gp-ratio", type=number(0, 1, lo_open=True), default=0.25)  # share of the batch (Table 10)
    parser.add_argument("--cp-scale", type=number(), default=0.01)              # logit centering (Table 10)
    parser.add_argument("--grad-clip", type=number(lo_open=True), default=None,
                        help=f"both players ({defaults_help('grad_clip')})")
    parser.add_argument("--log-every", type=positive_int, default=100)
    parser.add_argument("--ckpt-every", type=positive_int, default=10_000)
    parser.add_argument("--sample-every", type=count, default=0, help="write sample grids of the EMA and of G to "
                        "RESULTS/samples every N steps (0: never)")
    parser.add_argument("--fid-every", type=count, default=0, help="score the EMA every N steps (0: never)")
    parser.add_argument("--fid-samples", type=positive_int, default=50_000)               # FID-50K, as the paper
    parser.add_argument("--fid-ref", type=str, default=None, help="reference statistics/images, e.g. ADM's npz")
    parser.add_argument("--inception", type=str, default=None, help="FID Inception weights file")
    parser.add_argument("--vae-weights", type=str, default=None, help="sd-vae-ft-mse weights, to decode samples")
    parser.add_argument("--fid-batch-size", type=positive_int, default=64, help="per rank")
    parser.add_argument("--resume", type=str, default=None, help="checkpoint to continue from exactly")
    parser.add_argument("--init", type=str, default=None, help="start a new stage from this checkpoint: G from its "
                        "EMA; EMA, D, optimizers and gradient normalisation carried over; this command's settings")
    parser.add_argument("--init-d", type=str, default=None, help="D and its optimizer from this (earlier) checkpoint")
    parser.add_argument("--ema-reload-every", type=count, default=0, help="copy the EMA into G every N steps "
                        "(0: never; the paper's later stages: every epoch)")
    parser.add_argument("--classifier", type=str, default=None, help="train_classifier.py checkpoint: classifier "
                        "guidance (stage 4)")
    parser.add_argument("--cg-scale", type=number(), default=None, help=f"lambda_cg ({defaults_help('cg_scale')})")
    parser.add_argument("--cg-time", type=number(0, 1), nargs=2, default=None, metavar=("LO", "HI"),
                        help=f"one step: t' ~ U(LO, HI); few steps: the guided target times ({defaults_help('cg_time')})")
    parser.add_argument("--aug-p", type=number(0, 1), default=0.0, help="discriminator augmentation probability "
                        "(the paper's guided stage: 0.4, Algorithm 1)")
    parser.add_argument("--device", type=str, default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="fp32 (TF32 matmuls on GPU, the paper's setting) or bf16 autocast for G, D staying fp32; "
                             "the paper (App. D) found bf16 needs QK-norm for stability and no faster at 256 px")
    parser.add_argument("--compile", action="store_true", help="torch.compile both networks")
    args = parser.parse_args()
    if args.repeat > 1 and args.nfe != "1":
        parser.error("--repeat is for one-step models (--nfe 1)")
    if args.cg_time is not None and args.cg_time[0] > args.cg_time[1]:
        parser.error("--cg-time LO HI needs LO <= HI")
    if args.classifier is None and args.cg_scale is not None:
        parser.error("--cg-scale needs --classifier")
    run_training(main, args)
