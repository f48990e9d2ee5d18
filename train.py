"""
Trains an Adversarial Flow Model (https://arxiv.org/abs/2511.22475) on a latent data directory made by
prepare_latents.py: a generator G and a discriminator D, one D step then one G step per iteration.

    python train.py --model B/2 --data-path data/imagenet256                          # one GPU
    torchrun --nproc_per_node=8 train.py --model B/2 --data-path data/imagenet256     # eight GPUs
    python train.py --model T/2 --data-path data/tiny --device cpu --global-batch-size 8 --max-steps 20
    python train.py --model XL/2 --nfe 2 ...       # few-step (velocity) model; --nfe any for any-step
    python train.py --model XL/2 --repeat 4 ...    # 112-layer one-step generator by depth repetition

Defaults are the paper's one-step B/2 setting: the official configs' values (configs/train/afm/*.yaml, written for
XL/2) with B/2's final lambda_ot of 0.01; flags left unset take the paper's value for the chosen mode and size.
"""
import argparse
import json
import logging
import math
import os
import sys
import time
from copy import deepcopy

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from model import SIZES, Discriminator, Generator, transport


def fail(message):
    """A user error: one line on stderr and a non-zero exit, no traceback."""
    raise SystemExit(f"error: {message}")


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
            self.num_classes = int(self.info["num_classes"])
        except (ValueError, OSError, KeyError, TypeError) as e:
            fail(f"cannot read the data in {path}: {e}")
        if self.latents.ndim != 5:
            fail(f"latents.npy must have shape (N, V, C, H, W), got {self.latents.shape}")
        if self.labels.shape != (len(self.latents),):
            fail(f"labels.npy has shape {self.labels.shape} but there are {len(self.latents)} latents")
        if self.std is not None and self.std.shape != self.latents.shape:
            fail(f"std.npy has shape {self.std.shape}, latents.npy {self.latents.shape}")
        if len(self.labels) == 0 or self.labels.min() < 0 or self.labels.max() >= self.num_classes:
            fail(f"labels must be in [0, {self.num_classes}) and there must be at least one image")
        _, self.views, self.channels, self.size, _ = self.latents.shape

    def sample(self, n):
        """n random images with a random view each, a posterior draw when std.npy is there, as float32."""
        idx = torch.randint(len(self.labels), (n,)).numpy()
        view = torch.randint(self.views, (n,)).numpy()
        x = torch.from_numpy(self.latents[idx, view].astype(np.float32))
        if self.std is not None:
            x = x + torch.from_numpy(self.std[idx, view].astype(np.float32)) * torch.randn(x.shape)
        return x, torch.from_numpy(self.labels[idx])


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

def discriminator_loss(D, x_real, x_fake, y, t, weighting, gp_scale=0.25, gp_eps=0.01, gp_ratio=0.25,
                       cp_scale=0.01):
    """D's loss on real and generated samples at time t (t=None for one-step models). Returns (loss, stats)."""
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


def generator_loss(D, x_fake, x_src, x_real, y, t, weighting, ot_scale, grad_norm):
    """G's loss with D frozen: the relativistic loss through normalised gradients plus the optimal-transport loss."""
    with torch.no_grad():
        logits_real = D(x_real, y, t).float()                 # D is frozen: real logits need no graph
    logits_fake = D(grad_norm(x_fake), y, t).float()
    loss_adv = F.softplus(-(logits_fake - logits_real)).mean()                  # log(1 + e^-(D(x^_t) - D(x_t)))
    loss_ot = (ot_scale * (x_fake - x_src).square().flatten(1).mean(1) / weighting).mean()  # l_ot |x^_t - x_s|^2/(n w)
    # (the G step's logits, logged apart from the D step's, which they would otherwise overwrite)
    stats = dict(loss_g=loss_adv, ot=loss_ot, g_logits_real=logits_real.mean(), g_logits_fake=logits_fake.mean())
    return loss_adv + loss_ot, {name: v.detach() for name, v in stats.items()}


#################################################################################
#                                Training helpers                               #
#################################################################################

def ot_scale_at(step, args):
    """lambda_ot at generator step `step`: cosine from --ot-scale to --ot-scale-end, then constant."""
    if args.ot_schedule == "constant" or step >= args.ot_decay_steps - 1:
        return args.ot_scale if args.ot_schedule == "constant" else args.ot_scale_end
    progress = step / (args.ot_decay_steps - 1)
    return args.ot_scale_end + (args.ot_scale - args.ot_scale_end) * (1 + math.cos(math.pi * progress)) / 2


def d_step(G, D_train, opt_D, batch, args):
    """One discriminator update; G runs without gradients. D's own step stays in fp32 (TF32 matmuls on GPU, as the
    official code) even with --precision bf16: R1/R2 differences of logits 0.01 apart drown in bf16 rounding."""
    with torch.no_grad(), autocast(args):
        x_fake = transport(G, batch["x_src"], batch["y"], batch["t_src"], batch["t_tgt"], args.nfe != "1")
    loss, stats = discriminator_loss(D_train, batch["x_tgt"], x_fake, batch["y"], time_for_d(batch, args),
                                     batch["weighting"], args.gp_scale, args.gp_eps, args.gp_ratio, args.cp_scale)
    opt_D.zero_grad(set_to_none=True)
    loss.backward()
    stats["grad_norm_d"] = torch.nn.utils.clip_grad_norm_(D_train.parameters(), args.grad_clip)
    opt_D.step()
    return stats


def g_step(G_train, D, opt_G, grad_norm, batch, args, ot_scale):
    """One generator update; D is frozen but passes gradients through to G's samples."""
    frozen = [p for p in D.parameters() if p.requires_grad]   # not pos_embed, which stays fixed for good
    for p in frozen:
        p.requires_grad_(False)
    with autocast(args):
        x_fake = transport(G_train, batch["x_src"], batch["y"], batch["t_src"], batch["t_tgt"], args.nfe != "1")
        loss, stats = generator_loss(D, x_fake, batch["x_src"], batch["x_tgt"], batch["y"], time_for_d(batch, args),
                                     batch["weighting"], ot_scale, grad_norm)
    opt_G.zero_grad(set_to_none=True)
    loss.backward()
    for p in frozen:
        p.requires_grad_(True)
    stats["grad_norm_g"] = torch.nn.utils.clip_grad_norm_(G_train.parameters(), args.grad_clip)
    opt_G.step()
    return stats


@torch.no_grad()
def update_ema(EMA, G, decay):
    # One fused kernel over all tensors instead of one launch per parameter (hundreds per step on GPU).
    torch._foreach_lerp_(list(EMA.parameters()), list(G.parameters()), 1 - decay)


def time_for_d(batch, args):
    return None if args.nfe == "1" else batch["t_tgt"]       # one-step discriminators take no time


def autocast(args):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.precision == "bf16")


def evaluate_fid(G, steps, decode, inception, ref, num_samples, num_classes, seed, batch_size, device):
    """FID of num_samples class-balanced samples of G against the reference (mu, sigma), sharded over ranks."""
    import fid
    from sample import class_balanced_labels, generate
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    labels = class_balanced_labels(num_samples, num_classes)
    batches = (images for _, images in generate(G, steps, decode, list(range(rank, num_samples, world)), labels,
                                                seed, batch_size, device))
    stats, _ = fid.extract_features(batches, inception)     # summed over ranks
    return fid.frechet_distance(*stats.mean_cov(), *ref)


#################################################################################
#                                  Checkpoints                                  #
#################################################################################

def load_checkpoint(path):
    """Loads an untrusted checkpoint file safely (tensors and primitives only), or ends with one clear line."""
    if not os.path.isfile(path):
        fail(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # mmap: no copy of unused parts
    except Exception as e:  # a truncated zip, random bytes or a pickle with code all end here
        fail(f"cannot read checkpoint {path} (corrupt, truncated or not a checkpoint): {type(e).__name__}")


def save_atomic(obj, path):
    """Writes to a temporary file and renames it, so a crash never leaves a half-written checkpoint."""
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def gather_rng_states(device):
    """Every rank's RNG states, so a resumed run draws exactly the batches and noise it would have drawn."""
    state = dict(cpu=torch.get_rng_state(), cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
    if not dist.is_initialized():
        return [state]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


#################################################################################
#                                 Training loop                                 #
#################################################################################

def setup_distributed(device):
    """DDP as in DiT and nanoGPT: torchrun sets RANK/WORLD_SIZE, plain `python` runs one process. nccl on CUDA,
    gloo on CPU. Returns (device, rank, world size)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if "RANK" not in os.environ:
        return device, 0, 1
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    return device, dist.get_rank(), dist.get_world_size()


def main(args):
    device, rank, world = setup_distributed(args.device)
    if args.precision == "bf16" and device.type != "cuda":
        fail("--precision bf16 is for CUDA devices")
    if args.global_batch_size % world:
        fail(f"--global-batch-size {args.global_batch_size} must be divisible by the world size {world}")
    batch_size = args.global_batch_size // world
    torch.backends.cuda.matmul.fp32_precision = "tf32"        # TF32 matmuls on GPU, as the official code
    torch.backends.cudnn.conv.fp32_precision = "tf32"

    data = LatentData(args.data_path)
    if data.size % SIZES[args.model]["patch_size"]:
        fail(f"latents of size {data.size} do not split into patches of {SIZES[args.model]['patch_size']}")

    # The paper's per-mode values (official configs) where a flag was left unset.
    multi = args.nfe != "1"
    args.ot_scale_end = args.ot_scale_end if args.ot_scale_end is not None else (0.01 if args.model == "B/2" else 0.005)
    if args.ot_scale is None:                                  # a constant stage continues where the decay ended
        args.ot_scale = args.ot_scale_end if args.ot_schedule == "constant" else (0.25 if multi else 0.2)
    args.grad_clip = args.grad_clip if args.grad_clip is not None else (5.0 if multi or args.repeat > 1 else 50.0)

    common = dict(SIZES[args.model], input_size=data.size, in_channels=data.channels, num_classes=data.num_classes)
    config = dict(G=dict(common, use_t_src=multi, use_t_tgt=args.nfe == "any", repeat=args.repeat),
                  D=dict(common, use_t=multi), nfe=args.nfe)
    ckpt = load_checkpoint(args.resume) if args.resume else None
    if ckpt is not None and (not isinstance(ckpt, dict) or "config" not in ckpt):
        fail(f"{args.resume} is not a training checkpoint of this project")
    if ckpt is not None and ckpt["config"] != config:
        fail(f"{args.resume} holds another model (--model {ckpt['args']['model']} --nfe {ckpt['args']['nfe']} "
             f"--repeat {ckpt['args']['repeat']}, data {ckpt['args']['data_path']}) than this run asks for")
    if args.fid_every:                                         # Inception, VAE and reference loaded once
        import fid
        from sample import default_steps, make_decoder
        if not (args.fid_ref and args.inception):
            fail("--fid-every needs --fid-ref (statistics, image npz or folder) and --inception (weights file)")
        try:
            inception = fid.load_inception(args.inception, device)
            ref = fid.compute_stats(args.fid_ref, inception, batch_size=args.fid_batch_size)
        except (FileNotFoundError, ValueError) as e:
            fail(str(e))
        decode = make_decoder(data.info, args.vae_weights, device)
        fid_steps = default_steps(args.nfe)

    # Inputs are good: only now does the run write anything.
    if rank == 0:
        os.makedirs(os.path.join(args.results_dir, "checkpoints"), exist_ok=True)
    logger = create_logger(args.results_dir if rank == 0 else None)
    torch.manual_seed(args.global_seed)                        # the same initial weights on every rank
    G, D = Generator(**config["G"]).to(device), Discriminator(**config["D"]).to(device)
    EMA = deepcopy(G).requires_grad_(False)
    grad_norm = GradNorm().to(device)
    adamw = dict(betas=(0.0, 0.9), eps=1e-8, weight_decay=0.01, fused=device.type == "cuda")
    opt_G = torch.optim.AdamW(G.parameters(), lr=args.lr / args.repeat, **adamw)  # repeated G: lr / R
    opt_D = torch.optim.AdamW(D.parameters(), lr=args.lr, **adamw)
    hyper = {opt: dict(adamw, lr=opt.param_groups[0]["lr"]) for opt in (opt_G, opt_D)}
    logger.info(f"G {sum(p.numel() for p in G.parameters()):,} parameters, D {sum(p.numel() for p in D.parameters()):,}")

    start = 0
    if ckpt is not None:
        for module, key in ((G, "G"), (D, "D"), (EMA, "EMA"), (opt_G, "opt_G"), (opt_D, "opt_D"), (grad_norm, "grad_norm")):
            module.load_state_dict(ckpt[key])
        for opt, values in hyper.items():                      # this command's lr etc., not the checkpoint's
            opt.param_groups[0].update(values)
        start = ckpt["step"]
        logger.info(f"resumed from {args.resume} at step {start}")
    torch.manual_seed(args.global_seed * world + rank)         # per-rank streams of batches and noise
    if ckpt is not None and len(ckpt["rng"]) == world:
        torch.set_rng_state(ckpt["rng"][rank]["cpu"])
        if device.type == "cuda" and ckpt["rng"][rank]["cuda"] is not None:
            torch.cuda.set_rng_state(ckpt["rng"][rank]["cuda"], device)
    elif ckpt is not None:                                     # another world size: fresh streams for this step
        torch.manual_seed((args.global_seed * world + rank) * 1_000_003 + start)

    # Only the player being trained runs through DDP: D's step calls the bare G without gradients, and G's step
    # calls the bare, frozen D, so neither wrapper ever waits for gradients that do not come.
    G_fwd, D_fwd = (torch.compile(G), torch.compile(D)) if args.compile else (G, D)
    G_train = DDP(G_fwd, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else G_fwd
    D_train = DDP(D_fwd, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else D_fwd

    logger.info(f"training {args.model} nfe={args.nfe} repeat={args.repeat} on {world} x {device.type}, "
                f"batch {batch_size}/rank, ot_scale {args.ot_scale}->{args.ot_scale_end}, grad clip {args.grad_clip}")
    sums, count, tic = {}, 0, time.time()
    for step in tqdm(range(start, args.max_steps), initial=start, total=args.max_steps, disable=rank != 0):
        ot_scale = ot_scale_at(step, args)
        stats = d_step(G_fwd, D_train, opt_D, make_batch(data, batch_size, args.nfe, device), args)
        stats.update(g_step(G_train, D_fwd, opt_G, grad_norm, make_batch(data, batch_size, args.nfe, device), args,
                            ot_scale))
        update_ema(EMA, G, args.ema_decay)
        sums = {k: sums.get(k, 0) + v.float() for k, v in stats.items()}
        count += 1
        done = step + 1
        log_now = done % args.log_every == 0 or done == args.max_steps
        ckpt_now = done % args.ckpt_every == 0 or done == args.max_steps
        if log_now or ckpt_now:
            means = reduce_means(sums, count)
            if not all(math.isfinite(v) for v in means.values()):
                fail(f"non-finite loss at step {done} ({', '.join(f'{k} {v:.4g}' for k, v in means.items())}); "
                     f"the last good checkpoint is in {os.path.join(args.results_dir, 'checkpoints')}")
        if log_now:
            seconds = time.time() - tic
            logger.info(f"step {done:07d} " + " ".join(f"{k} {v:.4f}" for k, v in means.items()) +
                        f" ot_scale {ot_scale:.4g} lr {opt_D.param_groups[0]['lr']:.3g}"
                        f" img/s {2 * args.global_batch_size * count / seconds:.1f}")
            sums, count, tic = {}, 0, time.time()
        if ckpt_now:
            rng_states = gather_rng_states(device)
            if rank == 0:
                path = os.path.join(args.results_dir, "checkpoints", f"{done:07d}.pt")
                save_atomic(dict(G=G.state_dict(), D=D.state_dict(), EMA=EMA.state_dict(), opt_G=opt_G.state_dict(),
                                 opt_D=opt_D.state_dict(), grad_norm=grad_norm.state_dict(), step=done,
                                 args=vars(args), config=config, data_info=data.info, rng=rng_states), path)
                logger.info(f"saved {path}")
            if world > 1:
                dist.barrier()
        if args.fid_every and done % args.fid_every == 0:
            t0 = time.time()
            score = evaluate_fid(EMA, fid_steps, decode, inception, ref, args.fid_samples, data.num_classes,
                                 args.global_seed, args.fid_batch_size, device)
            logger.info(f"step {done:07d} FID-{args.fid_samples} {score:.4f} (EMA, {fid_steps} steps)")
            tic += time.time() - t0                            # keep sampling time out of img/s

    if world > 1:
        # Every rank must hold the same weights: a cheap end-of-run proof that DDP kept the players in step.
        check = torch.stack([sum(p.double().sum() for p in m.parameters()) for m in (G, D)]).to(device)
        gathered = [torch.zeros_like(check) for _ in range(world)]
        dist.all_gather(gathered, check)
        if not all(torch.equal(g, gathered[0]) for g in gathered):
            raise RuntimeError("ranks ended with different weights")
        logger.info(f"weights identical on all {world} ranks")
        dist.destroy_process_group()
    logger.info("done")


def reduce_means(sums, count):
    """Averages the accumulated statistics over steps and ranks."""
    keys = sorted(sums)
    values = torch.stack([sums[k] for k in keys]) / count
    if dist.is_initialized():
        dist.all_reduce(values, op=dist.ReduceOp.AVG)
    return dict(zip(keys, values.tolist()))


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


def parse_nfe(value):
    if value == "any" or (value.isdigit() and int(value) >= 1):
        return value if value == "any" else str(int(value))
    raise argparse.ArgumentTypeError(f"must be a positive integer or 'any', not {value!r}")


def positive_int(value):
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {value!r}")
    return int(value)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Train an adversarial flow model.")
    parser.add_argument("--data-path", type=str, required=True, help="directory written by prepare_latents.py")
    parser.add_argument("--results-dir", type=str, default="results")
    parser.add_argument("--model", type=str, choices=list(SIZES), default="B/2")
    parser.add_argument("--nfe", type=parse_nfe, default="1", help="1 (one step), 2 or 4 (few steps), or any")
    parser.add_argument("--repeat", type=positive_int, default=1, help="depth repetition R of a one-step generator (2, 4)")
    parser.add_argument("--global-batch-size", type=positive_int, default=256)            # official configs
    parser.add_argument("--global-seed", type=int, default=0)
    parser.add_argument("--max-steps", type=positive_int, default=500_000, help="iterations of one D step and one G step")
    parser.add_argument("--lr", type=float, default=1e-4)                        # G gets lr / repeat
    parser.add_argument("--ema-decay", type=float, default=0.9999)
    parser.add_argument("--ot-scale", type=float, default=None, help="lambda_ot start (default 0.2, multi-step 0.25)")
    parser.add_argument("--ot-scale-end", type=float, default=None, help="lambda_ot end (default 0.005, B/2 0.01)")
    parser.add_argument("--ot-schedule", choices=["cosine", "constant"], default="cosine")
    parser.add_argument("--ot-decay-steps", type=positive_int, default=500_000, help="cosine length in G steps (~100 epochs)")
    parser.add_argument("--gp-scale", type=float, default=0.25)                 # lambda_gp for R1 and R2
    parser.add_argument("--gp-eps", type=float, default=0.01)                   # finite-difference step
    parser.add_argument("--gp-ratio", type=float, default=0.25)                 # share of the batch for R1/R2
    parser.add_argument("--cp-scale", type=float, default=0.01)                 # logit centering
    parser.add_argument("--grad-clip", type=float, default=None, help="default 50, multi-step or repeated 5")
    parser.add_argument("--log-every", type=positive_int, default=100)
    parser.add_argument("--ckpt-every", type=positive_int, default=10_000)
    parser.add_argument("--fid-every", type=int, default=0, help="score the EMA every N steps (0: never)")
    parser.add_argument("--fid-samples", type=positive_int, default=50_000)               # FID-50K, as the paper
    parser.add_argument("--fid-ref", type=str, default=None, help="reference statistics/images, e.g. ADM's npz")
    parser.add_argument("--inception", type=str, default=None, help="FID Inception weights file")
    parser.add_argument("--vae-weights", type=str, default=None, help="sd-vae-ft-mse weights, to decode samples")
    parser.add_argument("--fid-batch-size", type=positive_int, default=64, help="per rank")
    parser.add_argument("--resume", type=str, default=None, help="checkpoint to continue from")
    parser.add_argument("--device", type=str, default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="fp32 uses TF32 matmuls")
    parser.add_argument("--compile", action="store_true", help="torch.compile both networks")
    args = parser.parse_args()
    if args.repeat > 1 and args.nfe != "1":
        parser.error("--repeat is for one-step models (--nfe 1)")
    main(args)
