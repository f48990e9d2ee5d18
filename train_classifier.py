r"""
Trains the time-conditioned classifier C(x_t, t) of Adversarial Flow Models (https://arxiv.org/abs/2511.22475, §3.5 and
§4.1) on a data directory made by prepare_latents.py: the frozen classifier of guidance (train.py --classifier).

    python train_classifier.py --model B/2 --data-path data/imagenet256 --results-dir results/cls         # one GPU
    torchrun --nproc_per_node=8 train_classifier.py --data-path data/imagenet256 --results-dir results/cls
    python train_classifier.py --model T/2 --data-path data/tiny --device cpu --global-batch-size 8 --max-steps 20

Training is the official recipe (train_adversarial_flow_classifier.py, configs/train/afm/train_afm_classifier.yaml) but
for one thing precomputed latents force: the official random affine warps the full-resolution image before the centre
crop and the VAE; here it warps the latent itself, at latent resolution, after the posterior draw (or the pixels).
Samples of small images are scored by another network, judge.py.
"""
import argparse
import math

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from checkpoint import LoopTail, check_checkpoint_room, load_starts, start_state
from common import (StopOnSignal, add_run_args, check_batch_memory, create_logger, number, per_rank_batch, positive_int,
                    run, seed, setup_distributed)
from data import LatentData, network_shape
from loss import classifier_state, classifier_step, interpolate, update_ema
from model import SIZES, Classifier

EPOCHS = 30              # the paper, §4.1: "trained from scratch ... using the cross-entropy objective for 30 epochs"
GRAD_CLIP = 50.0         # official train_adversarial_flow_classifier.py: clip_grad_norm_(..., 50.0) every step


#################################################################################
#                                 Augmentation                                  #
#################################################################################

def affine(x, angle, translate, scale):
    """Rotates each image of x (N, C, H, W) by angle (N,) degrees about its centre, zooms it by scale (N,) and shifts it
    by translate (N, 2) fractions of its width and height, as kornia's warp_affine (align_corners=False): output pixel
    p samples the input at M^-1 p with M p = s R p + t, bilinear, reflection-padded. Square images."""
    a = -angle * math.pi / 180                                 # counter-clockwise, as kornia (y points down)
    cos, sin = torch.cos(a) / scale, torch.sin(a) / scale
    tx, ty = 2 * translate[:, 0], 2 * translate[:, 1]         # grid coordinates span [-1, 1]: a fraction f is 2f
    theta = torch.stack([torch.stack([cos, sin, -(cos * tx + sin * ty)], 1),
                         torch.stack([-sin, cos, sin * tx - cos * ty], 1)], 1)  # (N, 2, 3), M^-1 = R^T (p - t) / s
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)       # (N, H, W, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def random_affine(x, p=0.8, degrees=10, translate=0.3, scale=(1.0, 1.3)):
    """The official recipe's kornia RandomAffine(p=0.8, degrees=10, translate=(0.3, 0.3), scale=(1.0, 1.3),
    padding_mode="reflection"): with probability p an image gets its own angle ~ U(-10, 10) degrees, shift ~ U(-0.3,
    0.3) of the size per axis and zoom ~ U(1, 1.3); the others stay unchanged. Parameters from the global CPU RNG."""
    n = len(x)
    angle = (2 * torch.rand(n) - 1) * degrees
    shift = (2 * torch.rand(n, 2) - 1) * translate
    zoom = scale[0] + (scale[1] - scale[0]) * torch.rand(n)
    apply = (torch.rand(n) < p).to(x.device).view(-1, 1, 1, 1)
    return torch.where(apply, affine(x, angle, shift, zoom), x)


def classifier_batch(data, n, augment_p, device):
    """(x_t, t, y): n augmented images noised to t ~ U(0, 1), made on the CPU from the global generator (which the
    checkpoints keep) like train.py's batches, so a resumed run draws exactly what it would have drawn."""
    x, y = data.sample(n)                                      # a random view is the official random flip
    x = random_affine(x, p=augment_p)     # the official code warps the image before the crop and VAE; this, the latent
    t = torch.rand(n)
    x_t = interpolate(x, torch.randn(x.shape), t)              # x_t = (1 - t) x + t z
    if device.type != "cuda":
        return x_t, t, y
    return [v.pin_memory().to(device, non_blocking=True) for v in (x_t, t, y)]


#################################################################################
#                                    Training                                   #
#################################################################################

def main(args):
    # Setup: processes and devices, the data, the network config, the checkpoint to resume, before anything is written.
    device, rank, world = setup_distributed(args.device)
    batch_size = per_rank_batch(args.global_batch_size, world)
    torch.backends.cuda.matmul.fp32_precision = torch.backends.cudnn.conv.fp32_precision = "tf32"  # as the official code
    data = LatentData(args.data_path)
    check_batch_memory(batch_size, (data.channels, data.size, data.size))
    config = dict(C=network_shape(args.model, data))
    max_steps = args.max_steps or math.ceil(EPOCHS * len(data.labels) / args.global_batch_size)
    starts = load_starts(args, config, max_steps, data.info)   # the same network and data, or one line
    stop = StopOnSignal()

    # Model, EMA and AdamW (the official yaml's), the same initial weights on every rank.
    torch.manual_seed(args.global_seed)
    state = classifier_state(Classifier(**config["C"]).to(device), args.lr, device)   # what a checkpoint holds
    check_checkpoint_room(state, args.results_dir)             # a run that could not save fails before it writes
    logger = create_logger(args.results_dir if rank == 0 else None)
    C, EMA, opt = state["model"], state["EMA"], state["opt"]
    logger.info(f"classifier {sum(p.numel() for p in C.parameters()):,} parameters")

    # Resume: weights, optimizer moments, this command's lr, every rank's RNG.
    start, _ = start_state(state, starts, args, logger, data.info, device)   # batches from the global RNG
    tail = LoopTail(stop, state, args, config, data.info, device, logger, max_steps, args.global_batch_size,
                    curves=[("loss", ["loss"], True), ("accuracy", ["acc"], False),
                            ("gradient norm", ["grad_norm"], True), ("lr", ["lr"], False)])
    C_train = DDP(C, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else C

    # The loop: cross-entropy of C(x_t, t) against the label, the EMA; logs and checkpoints every so many steps.
    logger.info(f"training classifier {args.model} on {world} x {device.type}, batch {batch_size}/rank, "
                f"{max_steps} steps ({max_steps * args.global_batch_size / len(data.labels):.1f} epochs), lr {args.lr}")
    for step in tqdm(range(start, max_steps), initial=start, total=max_steps, disable=rank != 0):
        stats = classifier_step(C_train, opt, *classifier_batch(data, batch_size, args.augment_p, device), GRAD_CLIP)
        update_ema(EMA, C, args.ema_decay)
        tail(step, stats, dict(lr=opt.param_groups[0]["lr"]))
    tail.finish([C])


def make_parser():
    parser = argparse.ArgumentParser(description="Train the time-conditioned classifier of guidance.")
    parser.add_argument("--data-path", type=str, required=True, help="directory written by prepare_latents.py")
    parser.add_argument("--results-dir", type=str, default="results/classifier")
    parser.add_argument("--model", type=str, choices=list(SIZES), default="B/2")         # the paper, §4.1: B/2
    parser.add_argument("--global-batch-size", type=positive_int, default=256)           # official classifier yaml
    parser.add_argument("--global-seed", type=seed, default=0)
    parser.add_argument("--max-steps", type=positive_int, default=None, help=f"default: {EPOCHS} epochs of the data "
                        "set at the global batch size (the paper, §4.1)")
    parser.add_argument("--lr", type=number(lo_open=True), default=1e-4)                 # constant, official yaml
    parser.add_argument("--ema-decay", type=number(0, 1, hi_open=True), default=0.9995)  # official yaml
    parser.add_argument("--augment-p", type=number(0, 1), default=0.8, help="probability of the random affine (official)")
    add_run_args(parser, ckpt_every=10_000)
    return parser


if __name__ == "__main__":
    run(main, make_parser().parse_args())
