"""
Trains SmallAE (vae.py), the small convolutional autoencoder in whose latent space the generators of 28-pixel images
(the MNIST family) train, on a pixel data directory (prepare_latents.py --vae none, at the images' own size), and
reports its reconstruction error on held-out images: the ceiling of any generator in its latent space.

    python train_ae.py --data-path data/fmnist --test-path data/fmnist-test --results-dir results/ae --device cpu
    torchrun --nproc_per_node=8 train_ae.py --data-path data/fmnist --results-dir results/ae       # eight GPUs
    python train_ae.py --evaluate results/ae/checkpoints/0003000.pt --test-path data/fmnist-test \
        --recon-npz recon.npz                                  # score a trained one; judge.py --evaluate recon.npz

A checkpoint holds the autoencoder's config (--latent-channels, --downsamples, --width, the images' channels and size),
its weights and the command (the recipe): the last one is the file that prepare_latents.py --vae ae, train.py and
sample.py take as --vae-weights. Recipe: AdamW at --lr with no weight decay under a one-cycle schedule; the loss is
MSE + L1 between the images and the decoding of their latents plus --latent-noise x N(0, 1), so that the decoder
learns to draw what a generator's slightly wrong latents mean, plus 0.01 mean(z^2), which keeps the latents small.
"""
import argparse
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from checkpoint import LoopTail, check_checkpoint_room, load_starts, start_state
from common import (StopOnSignal, add_run_args, check_batch_memory, claim, create_logger, fail, integer, number,
                    per_rank_batch, positive_int, rgb, run, save_atomic, seed, setup_distributed)
from data import LatentData
from model import to_uint8
from vae import SmallAE, load_ae

LATENT_PENALTY = 1e-2    # x mean(z^2): latents of order one without a KL term (the generator's data is scaled anyway)
PCT_START = 0.05         # the share of the run that the one-cycle schedule warms up in


def one_cycle(step, total, lr):
    """(lr, Adam's beta1) at `step` of torch's OneCycleLR with its defaults and pct_start PCT_START: cosine from lr / 25
    up to lr, then down to lr / 25e4, beta1 from 0.95 down to 0.85 and back. A function of the step alone, so a resumed
    run sets what the run would have set (and `<` where torch has `<=`: the same values, without its 0 / 0 at 20
    steps)."""
    peak = PCT_START * total - 1
    if step < peak:
        pct, lrs, betas = step / peak, (lr / 25, lr), (0.95, 0.85)
    else:
        pct, lrs, betas = (step - peak) / (total - 1 - peak), (lr, lr / 25e4), (0.85, 0.95)
    anneal = lambda a, b: b + (a - b) * (1 + math.cos(math.pi * pct)) / 2
    return anneal(*lrs), anneal(*betas)


def pixel_data(path, flag, channels=None, size=None):
    """The pixel data directory at path, of `channels` x `size` x `size` images when given; else one line."""
    data = LatentData(path)
    if data.info.get("vae", "none") != "none":
        fail(f"{flag} {path} holds latents of the {data.info['vae']} VAE; the autoencoder is trained and scored on "
             "pixels (prepare_latents.py --vae none)")
    if channels is not None and (data.channels, data.size) != (channels, size):
        fail(f"{flag} {path} holds {data.channels}-channel {data.size}-pixel images; the autoencoder's are "
             f"{channels}-channel {size}-pixel")
    return data


@torch.no_grad()
def evaluate(AE, test, recon_npz, device, log, batch_size=500):
    """The reconstruction MSE (in [-1, 1] units, clamped to them as images are) and PSNR of the held-out images (view
    0), and with recon_npz their reconstructions as a sample npz (uint8 NHWC, grey as RGB, and labels: sample.py
    --npz's format) for judge.py --evaluate."""
    x = torch.from_numpy(test.latents[:, 0].astype(np.float32))
    recon = torch.cat([AE.decode(AE.encode(x[i:i + batch_size].to(device))).clamp(-1, 1).cpu()
                       for i in range(0, len(x), batch_size)])
    mse = (recon - x).square().mean().item()
    log(f"reconstruction of the {len(x)} held-out images: MSE {mse:.5f} (pixels in [-1, 1]), PSNR "
        f"{10 * math.log10(4 / max(mse, 1e-12)):.2f} dB")
    if recon_npz:
        with save_atomic(recon_npz) as tmp:
            np.savez(tmp, arr_0=rgb(to_uint8(recon)).permute(0, 2, 3, 1).numpy(), labels=test.labels)
        log(f"saved the reconstructions to {recon_npz}")


def main_evaluate(args):
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.recon_npz:
        claim(args.recon_npz, "--recon-npz", new=True)         # an npz of work is never replaced
    try:
        AE = load_ae(args.evaluate, device)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    test = pixel_data(args.test_path, "--test-path", AE.channels, AE.image_size)
    evaluate(AE, test, args.recon_npz, device, print)


def main(args):
    # Setup: processes and devices, the data, the network config, the checkpoint to resume, before anything is written.
    device, rank, world = setup_distributed(args.device)
    batch_size = per_rank_batch(args.global_batch_size, world)
    torch.backends.cuda.matmul.fp32_precision = torch.backends.cudnn.conv.fp32_precision = "tf32"
    data = pixel_data(args.data_path, "--data-path")
    if args.recon_npz and rank == 0:
        claim(args.recon_npz, "--recon-npz", new=True)
    test = pixel_data(args.test_path, "--test-path", data.channels, data.size) if args.test_path else None
    check_batch_memory(batch_size, (data.channels, data.size, data.size))
    config = dict(AE=dict(channels=data.channels, image_size=data.size, latent=args.latent_channels,
                          down=args.downsamples, width=args.width))
    starts = load_starts(args, config, args.max_steps, data.info)   # the same network and data, or one line
    stop = StopOnSignal()

    # The autoencoder (the same initial weights on every rank), AdamW, and the start.
    torch.manual_seed(args.global_seed)
    AE = SmallAE(**config["AE"]).to(device)
    opt = torch.optim.AdamW(AE.parameters(), lr=args.lr, weight_decay=0.0)
    state = dict(AE=AE, opt=opt)
    check_checkpoint_room(state, args.results_dir)             # a run that could not save fails before it writes
    logger = create_logger(args.results_dir if rank == 0 else None)
    logger.info(f"autoencoder {sum(p.numel() for p in AE.parameters()):,} parameters, {data.channels} x {data.size}^2 "
                f"images to latents {args.latent_channels} x {AE.latent_size}^2")
    start, _ = start_state(state, starts, args, logger, data.info, device)   # batches and noise from the global RNG
    tail = LoopTail(stop, state, args, config, data.info, device, logger, args.max_steps, args.global_batch_size,
                    curves=[("reconstruction", ["mse", "l1"], True), ("mean z^2", ["z2"], False), ("lr", ["lr"], True)])
    AE_train = DDP(AE, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else AE

    # The loop: a random view of random images, reconstructed from noisy latents; logs and checkpoints.
    logger.info(f"training the autoencoder on {world} x {device.type}, batch {batch_size}/rank, {args.max_steps} steps "
                f"({args.max_steps * args.global_batch_size / len(data.labels):.1f} epochs), lr {args.lr}")
    for step in tqdm(range(start, args.max_steps), initial=start, total=args.max_steps, disable=rank != 0):
        lr, beta1 = one_cycle(step, args.max_steps, args.lr)
        opt.param_groups[0].update(lr=lr, betas=(beta1, 0.999))
        x = data.sample(batch_size)[0].to(device)
        x_rec, z = AE_train(x, args.latent_noise)
        mse, l1, z2 = F.mse_loss(x_rec, x), F.l1_loss(x_rec, x), z.square().mean()
        opt.zero_grad(set_to_none=True)
        (mse + l1 + LATENT_PENALTY * z2).backward()
        opt.step()
        tail(step, dict(mse=mse.detach(), l1=l1.detach(), z2=z2.detach()), dict(lr=lr))
    tail.finish([AE])
    if test is not None and rank == 0:
        evaluate(AE.eval(), test, args.recon_npz, device, logger.info)


def make_parser():
    parser = argparse.ArgumentParser(description="Train the small autoencoder of 28-pixel images, or --evaluate one.")
    parser.add_argument("--data-path", type=str, default=None, help="pixel training data (prepare_latents.py --vae "
                        "none)")
    parser.add_argument("--results-dir", type=str, default="results/ae")
    parser.add_argument("--test-path", type=str, default=None, help="held-out pixel data: the reconstruction error")
    parser.add_argument("--recon-npz", type=str, default=None, help="with --test-path: write its reconstructions as a "
                        "sample npz for judge.py --evaluate")
    parser.add_argument("--evaluate", type=str, default=None, metavar="CKPT", help="score this checkpoint on "
                        "--test-path instead of training")
    parser.add_argument("--latent-channels", type=integer(1, 1024), default=16)
    parser.add_argument("--downsamples", type=integer(1, 8), default=3, help="2x each: 28 px (padded to 32) -> 4 x 4")
    parser.add_argument("--width", type=integer(8, 4096), default=32, help="channels of the first level (x2 per "
                        "level; a multiple of 8, GroupNorm's groups)")
    parser.add_argument("--max-steps", type=positive_int, default=3000)
    parser.add_argument("--global-batch-size", type=positive_int, default=128)
    parser.add_argument("--lr", type=number(lo_open=True), default=2e-3, help="the one-cycle schedule's peak")
    parser.add_argument("--latent-noise", type=number(), default=0.1, help="std of the noise added to the latents")
    add_run_args(parser, ckpt_every=1000)
    parser.add_argument("--global-seed", type=seed, default=0)
    return parser


if __name__ == "__main__":
    parser = make_parser()
    args = parser.parse_args()
    if args.width % 8:
        parser.error(f"--width {args.width} is not a multiple of 8 (GroupNorm's 8 groups)")
    if args.recon_npz and not args.test_path:
        parser.error("--recon-npz writes the reconstructions of --test-path: give it")
    if args.evaluate is None and not args.data_path:
        parser.error("--data-path is required (or --evaluate CKPT --test-path DATA)")
    if args.evaluate is not None and not args.test_path:
        parser.error("--evaluate scores the reconstructions of --test-path: give it")
    run(main_evaluate if args.evaluate is not None else main, args)
