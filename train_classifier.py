r"""
Trains the time-conditioned classifier C(x_t, t) of Adversarial Flow Models (https://arxiv.org/abs/2511.22475, §3.5 and
§4.1) on a data directory made by prepare_latents.py, and scores generators with it (--evaluate).

    python train_classifier.py --model B/2 --data-path data/imagenet256 --results-dir results/cls         # one GPU
    torchrun --nproc_per_node=8 train_classifier.py --data-path data/imagenet256 --results-dir results/cls
    python train_classifier.py --model T/2 --data-path data/tiny --device cpu --global-batch-size 8 --max-steps 20
    python train_classifier.py --evaluate results/afm/checkpoints/0002000.pt --num-samples 10000 \
        --classifier results/cls/checkpoints/0009000.pt --data-path data/fmnist_test --real-data data/fmnist_train

Training is the official recipe (train_adversarial_flow_classifier.py, configs/train/afm/train_afm_classifier.yaml) but
for one thing precomputed latents force: the official random affine warps the full-resolution image before the centre
crop and the VAE; here it warps the latent itself, at latent resolution, after the posterior draw (or the pixels).
Evaluation runs C at t = 0 on samples and real images: class accuracy, and the Frechet distance of C's last hidden
features to those of the held-out images, an FID in the classifier's feature space for latents and pixels alike.
"""
import argparse
import math
import os
import time
from copy import deepcopy

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import fid
from common import (LatentData, StopOnSignal, check_in_sync, count, create_logger, fail, load_classifier,
                    load_generator, load_starts, network_shape, number, per_rank_batch, positive_int, reduce_means,
                    restore_rng, restore_state, run, save_checkpoint, setup_distributed)
from loss import interpolate, update_ema
from model import SIZES, Classifier, class_balanced_labels, noise, sample

EPOCHS = 30              # the paper, §4.1: "trained from scratch ... using the cross-entropy objective for 30 epochs"
GRAD_CLIP = 50.0         # official train_adversarial_flow_classifier.py: clip_grad_norm_(..., 50.0) every step
SPACE = ("vae", "scale", "image_size", "classes")  # info.json keys that must agree between C's data and what it scores

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
#                                   Evaluation                                  #
#################################################################################

def image_batches(data, indices, batch_size):
    """(x, y) batches of the images `indices` of a data directory: view 0, the posterior mean (no std draw)."""
    for i in range(0, len(indices), batch_size):
        idx = np.asarray(indices[i:i + batch_size])
        yield torch.from_numpy(data.latents[idx, 0].astype(np.float32)), torch.from_numpy(data.labels[idx])


def sample_batches(G, steps, labels, indices, seed, batch_size, device):
    """(x, y) batches of G's samples `indices`, floats in the data's space: no uint8 quantisation, no VAE decoding."""
    for i in range(0, len(indices), batch_size):
        chunk = indices[i:i + batch_size]
        y = torch.tensor([labels[j] for j in chunk], device=device)
        yield sample(G, noise(chunk, (G.in_channels, G.input_size, G.input_size), seed).to(device), y, steps), y


@torch.no_grad()
def classify(C, batches, device):
    """(mu, sigma, accuracy) of C's features and predictions at t = 0 over all batches of every rank."""
    stats, correct = fid.FeatureStats(dim=C.cls_embed.numel(), device=device), torch.zeros((), device=device)
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        features = C.features(x, torch.zeros(len(x), device=device))        # (n, D)
        correct += (C.final_layer(features).argmax(1) == y).sum()
        stats.update(features)
    stats.all_reduce()
    if dist.is_initialized():
        dist.all_reduce(correct)
    mu, sigma = stats.mean_cov()
    return mu, sigma, correct.item() / stats.n.item()


def evaluate(G, steps, C, held_out, real, num_samples, seed, batch_size, device):
    """Class accuracy and Frechet distance to the held-out images (LatentData) of num_samples class-balanced samples
    of G in `steps` steps and of num_samples real images (LatentData, or None), plus C's accuracy on the held-out
    images. Samples and images are sharded over ranks under torchrun; every rank returns the same dict."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    batches = image_batches(held_out, range(rank, len(held_out.labels), world), batch_size)
    mu_ref, sigma_ref, acc = classify(C, batches, device)
    out = dict(held_out_accuracy=acc, num_held_out=len(held_out.labels))
    labels = class_balanced_labels(num_samples, held_out.num_classes)
    batches = sample_batches(G, steps, labels, range(rank, num_samples, world), seed, batch_size, device)
    mu, sigma, out["samples_accuracy"] = classify(C, batches, device)
    out["samples_frechet"] = fid.frechet_distance(mu, sigma, mu_ref, sigma_ref)
    if real is not None:                                       # a fixed random subset, read in file order
        idx = np.sort(np.random.RandomState(seed).permutation(len(real.labels))[:num_samples])
        mu, sigma, out["real_accuracy"] = classify(C, image_batches(real, idx[rank::world], batch_size), device)
        out["real_frechet"], out["num_real"] = fid.frechet_distance(mu, sigma, mu_ref, sigma_ref), len(idx)
    return out


def check_fits(C, c_info, name, info, size, channels, num_classes):
    """One line when `name` (a generator or a data set) is not in the space the classifier was trained on."""
    ours, theirs = (C.input_size, C.in_channels, C.final_layer[1].out_features), (size, channels, num_classes)
    differ = [k for k in SPACE if k in c_info and k in info and c_info[k] != info[k]]
    if ours != theirs or differ:
        fail(f"the classifier does not fit {name}: (size, channels, classes) {ours} vs {theirs}" +
             "".join(f", {k} {c_info[k]!r} vs {info[k]!r}" for k in differ))


def main_evaluate(args):
    device, rank, world = setup_distributed(args.device)
    torch.backends.cuda.matmul.fp32_precision = "tf32"        # TF32 matmuls on GPU, as training
    G, steps, g_info = load_generator(args.evaluate, weights=args.weights)
    C, c_info = load_classifier(args.classifier)
    G, C = G.to(device), C.to(device)
    num_classes = G.y_embedder.embedding_table.num_embeddings
    check_fits(C, c_info, args.evaluate, g_info, G.input_size, G.in_channels, num_classes)
    held_out, real = LatentData(args.data_path), LatentData(args.real_data) if args.real_data else None
    for name, data in ((args.data_path, held_out), (args.real_data, real)):
        if data is not None:
            check_fits(C, c_info, name, data.info, data.size, data.channels, data.num_classes)
    if min(args.num_samples, len(held_out.labels), len(real.labels) if real else 2) < 2:
        fail("the Frechet distance needs at least 2 images in each set (--num-samples, --data-path, --real-data)")
    out = evaluate(G, steps, C, held_out, real, args.num_samples, args.global_seed, args.batch_size, device)
    if rank == 0:                                              # Frechet distances to the held-out features
        score = lambda k: f"class accuracy {out[k + '_accuracy']:.4f}  Frechet distance {out[k + '_frechet']:.4f}"
        rows = [("samples", f"({args.weights}, {steps} step{'s' * (steps > 1)}, {args.num_samples})", score("samples"))]
        if real is not None:
            rows.append(("real", f"({args.real_data}, {out['num_real']})",
                         score("real") + "  (what a perfect generator would score)"))
        rows.append(("held-out", f"({args.data_path}, {out['num_held_out']})",
                     f"class accuracy {out['held_out_accuracy']:.4f}  (the classifier's own test accuracy)"))
        for name, what, numbers in rows:
            print(f"{name:<9} {what:<{max(len(r[1]) for r in rows)}}  {numbers}")


#################################################################################
#                                    Training                                   #
#################################################################################

def main(args):
    # Setup: processes and devices, the data, the network config, the checkpoint to resume, before anything is written.
    device, rank, world = setup_distributed(args.device)
    batch_size = per_rank_batch(args.global_batch_size, world)
    torch.backends.cuda.matmul.fp32_precision = torch.backends.cudnn.conv.fp32_precision = "tf32"  # as the official code
    data = LatentData(args.data_path)
    config = dict(C=network_shape(args.model, data))
    max_steps = args.max_steps or math.ceil(EPOCHS * len(data.labels) / args.global_batch_size)
    starts = load_starts(args, config, max_steps)              # the same network, or one line
    if dist.is_initialized():
        dist.barrier()                                         # every rank has checked --results-dir before rank 0 writes
    stop = StopOnSignal()

    # Model, EMA and AdamW, the same initial weights on every rank.
    if rank == 0:
        os.makedirs(os.path.join(args.results_dir, "checkpoints"), exist_ok=True)
    logger = create_logger(args.results_dir if rank == 0 else None)
    torch.manual_seed(args.global_seed)
    C = Classifier(**config["C"]).to(device)
    EMA = deepcopy(C).requires_grad_(False)
    adamw = dict(betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01, fused=device.type == "cuda")  # official yaml
    opt = torch.optim.AdamW(C.parameters(), lr=args.lr, **adamw)
    state = dict(model=C, EMA=EMA, opt=opt)                    # what a checkpoint holds
    logger.info(f"classifier {sum(p.numel() for p in C.parameters()):,} parameters")

    # Resume: weights, optimizer moments, this command's lr, every rank's RNG.
    start = restore_state(state, starts, args, logger)
    restore_rng(starts.get("resume"), args.global_seed, rank, world, start, device)
    C_train = DDP(C, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else C

    # The loop: cross-entropy of C(x_t, t) against the label, the EMA; logs and checkpoints every so many steps.
    logger.info(f"training classifier {args.model} on {world} x {device.type}, batch {batch_size}/rank, "
                f"{max_steps} steps ({max_steps * args.global_batch_size / len(data.labels):.1f} epochs), lr {args.lr}")
    sums, count, tic = {}, 0, time.time()
    for step in tqdm(range(start, max_steps), initial=start, total=max_steps, disable=rank != 0):
        x_t, t, y = classifier_batch(data, batch_size, args.augment_p, device)
        logits = C_train(x_t, t).float()
        loss = F.cross_entropy(logits, y)                      # no label smoothing, no weighting over t (official)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(C.parameters(), GRAD_CLIP)
        opt.step()
        update_ema(EMA, C, args.ema_decay)
        stats = dict(loss=loss.detach(), acc=(logits.argmax(1) == y).float().mean(), grad_norm=grad_norm)
        sums, count, done = {k: sums.get(k, 0) + v.float() for k, v in stats.items()}, count + 1, step + 1
        if done % args.log_every == 0 or done == max_steps:
            means = reduce_means(sums, count, done, args.results_dir)
            logger.info(f"step {done:07d} " + " ".join(f"{k} {v:.4f}" for k, v in means.items()) + f" lr {args.lr:.3g}"
                        f" img/s {args.global_batch_size * count / (time.time() - tic):.1f}")
            sums, count, tic = {}, 0, time.time()
        signum = stop.requested()
        if done % args.ckpt_every == 0 or done == max_steps or signum:
            path = save_checkpoint(state, done, args, config, data.info, device, logger)
        if signum:
            stop.exit(signum, done, path, logger)
    check_in_sync([C], device, world, logger)
    logger.info("done")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Train the guidance classifier, or --evaluate a generator with it.")
    parser.add_argument("--data-path", type=str, required=True, help="training data; with --evaluate the held-out data")
    parser.add_argument("--results-dir", type=str, default="results/classifier")
    parser.add_argument("--model", type=str, choices=list(SIZES), default="B/2")         # the paper, §4.1: B/2
    parser.add_argument("--global-batch-size", type=positive_int, default=256)            # official classifier yaml
    parser.add_argument("--global-seed", type=count, default=0, help="also the noise seed of --evaluate's samples")
    parser.add_argument("--max-steps", type=positive_int, default=None,
                        help=f"default: {EPOCHS} epochs of the data set at the global batch size (the paper, §4.1)")
    parser.add_argument("--lr", type=number(lo_open=True), default=1e-4)     # official classifier yaml, constant
    parser.add_argument("--ema-decay", type=number(0, 1, hi_open=True), default=0.9995)    # official classifier yaml
    parser.add_argument("--augment-p", type=number(0, 1), default=0.8, help="probability of the random affine (official)")
    parser.add_argument("--log-every", type=positive_int, default=100)
    parser.add_argument("--ckpt-every", type=positive_int, default=10_000)
    parser.add_argument("--resume", type=str, default=None, help="checkpoint to continue from")
    parser.add_argument("--device", type=str, default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--evaluate", type=str, default=None, help="evaluate this train.py generator checkpoint")
    parser.add_argument("--classifier", type=str, default=None, help="with --evaluate: a classifier checkpoint")
    parser.add_argument("--weights", choices=["EMA", "G"], default="EMA", help="with --evaluate: which generator")
    parser.add_argument("--real-data", type=str, default=None, help="with --evaluate: real images, e.g. the train set")
    parser.add_argument("--num-samples", type=positive_int, default=10_000,
                        help="with --evaluate: how many samples, and real images of --real-data")
    parser.add_argument("--batch-size", type=positive_int, default=256, help="with --evaluate: per rank")
    args = parser.parse_args()
    if args.evaluate and not args.classifier:
        parser.error("--evaluate needs --classifier")
    run(main_evaluate if args.evaluate else main, args)
