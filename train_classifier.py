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
from checkpoint import (check_checkpoint_room, load_checkpoint, load_starts, load_weights, restore_rng, restore_state,
                        save_checkpoint)
from common import (StopOnSignal, check_in_sync, check_input, count, create_logger, fail, number, per_rank_batch,
                    positive_int, reduce_means, run, setup_distributed)
from data import SPACE, LatentData, data_differences, network_shape
from loss import interpolate, update_ema
from model import SIZES, Classifier

EPOCHS = 30              # the paper, §4.1: "trained from scratch ... using the cross-entropy objective for 30 epochs"
JUDGE_EPOCHS = 10        # the judge: above 0.91 on Fashion-MNIST's test images after 10 epochs, with its cosine lr
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
#                         The judge of small-image samples                      #
#################################################################################
# Generators of small pixel images (the MNIST family) are scored by a judge that has seen clean real images only: a
# small CNN, chosen over the guidance classifier at t = 0 because it shares nothing with the networks it judges (a DiT
# judge of DiT samples can share their blind spots, such as 7 x 7 patch seams), is strong on the real test set after
# minutes on a CPU, and, never trained on noisy inputs, is hard to please with speckled samples.

class Judge(torch.nn.Module):
    """Two 3x3 convolutions at full, half and quarter resolution (GroupNorm, ReLU; max-pooled between), global
    average pooling, a 256-wide hidden layer (the features the Frechet distance and Precision/Recall use), a linear
    read-out. The t argument is ignored: the judge sees clean images only."""
    def __init__(self, in_channels, num_classes, width=32, features=256):
        super().__init__()
        layers, c = [], in_channels
        for i, w in enumerate((width, 2 * width, 4 * width)):
            for _ in range(2 if i < 2 else 1):
                layers += [torch.nn.Conv2d(c, w, 3, padding=1), torch.nn.GroupNorm(8, w), torch.nn.ReLU()]
                c = w
            layers.append(torch.nn.MaxPool2d(2) if i < 2 else torch.nn.AdaptiveAvgPool2d(1))
        self.convs = torch.nn.Sequential(*layers, torch.nn.Flatten())
        self.hidden = torch.nn.Sequential(torch.nn.Linear(c, features), torch.nn.ReLU())
        self.head = torch.nn.Sequential(torch.nn.Dropout(0.3), torch.nn.Linear(features, num_classes))

    def features(self, x):
        return self.hidden(self.convs(x))

    def forward(self, x, t=None):
        return self.head(self.features(x))


def judge_batch(data, n, device):
    """(x, None, y): n clean training images, a random view each (the flip) shifted by up to 2 pixels each way (the
    vacated band black, -1), from the global generator like classifier_batch."""
    x, y = data.sample(n)
    _, _, H, W = x.shape
    dy, dx = torch.randint(0, 5, (2, n))                       # the crop's corner in the image padded by 2
    rows, cols = torch.arange(H) + dy[:, None], torch.arange(W) + dx[:, None]              # (n, H), (n, W)
    x = F.pad(x, (2, 2, 2, 2), value=-1.0)[torch.arange(n)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    return x.permute(0, 3, 1, 2).to(device), None, y.to(device)  # (n, C, H, W)


def load_judge(path):
    """The frozen judge of a `train_classifier.py --judge` checkpoint (its EMA weights) and its data's info.json."""
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("config"), dict) or "J" not in ckpt["config"]:
        fail(f"{path} is not a judge checkpoint (train_classifier.py --judge)")
    J = Judge(**ckpt["config"]["J"])
    load_weights(J, ckpt.get("EMA"), path)
    return J.eval().requires_grad_(False), ckpt.get("data_info", {})


def npz_images(path):
    """(float images (N, C, H, W) in [-1, 1], labels) of an ADM-format npz (sample.py --npz), or one line."""
    check_input(path, "sample npz")
    try:
        with np.load(path) as f:
            images, labels = f["arr_0"], f["labels"]
    except (OSError, ValueError, KeyError, EOFError) as e:
        fail(f"cannot read {path} as a sample npz with arr_0 and labels: {type(e).__name__}: {e}")
    if images.dtype != np.uint8 or images.ndim != 4 or labels.shape != images.shape[:1]:
        fail(f"{path}: arr_0 must be uint8 (N, H, W, C) with one label each, got {images.dtype} {images.shape}")
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1, torch.from_numpy(labels.astype(np.int64))


@torch.no_grad()
def judge_set(J, x, batch_size=500):
    """The judge's features (N, 256) and predicted classes of images x (N, C, H, W); samples written as RGB (the npz
    of 1-channel data repeats the channel) are read back as the judge's channels."""
    if x.shape[1] != J.convs[0].in_channels:
        x = x[:, :J.convs[0].in_channels]
    features = torch.cat([J.features(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
    return features.double(), J.head(features).argmax(1)


def scores(J, x, y, ref_features):
    """Class accuracy (overall and per class), Frechet distance and Precision/Recall of images x with labels y
    against the judge's features of the reference (held-out) images."""
    features, predicted = judge_set(J, x)
    if features.var(0).sum() < 1e-8 * max(ref_features.var(0).sum().item(), 1e-30):
        print(f"warning: the judge's features of these {len(x)} images are degenerate (they barely vary): an "
              "under-trained judge, or images that are all alike")
    mean_cov = lambda f: (f.mean(0).numpy(), np.cov(f.numpy(), rowvar=False))
    precision, recall = fid.precision_recall(ref_features, features)
    per_class = [(predicted[y == k] == k).double().mean().item() for k in range(int(y.max()) + 1)]
    return dict(accuracy=(predicted == y).double().mean().item(), per_class=per_class, precision=precision,
                recall=recall, frechet=fid.frechet_distance(*mean_cov(features), *mean_cov(ref_features)))


def main_evaluate(args):
    """Scores sample npz files, and real training images as the floor, by the judge against the held-out images."""
    torch.set_num_threads(min(torch.get_num_threads(), 8))
    J, j_info = load_judge(args.judge)
    held_out = LatentData(args.data_path)
    check_fits(J, j_info, args.data_path, held_out.info)
    x_ref, y_ref = torch.from_numpy(held_out.latents[:, 0].astype(np.float32)), torch.from_numpy(held_out.labels)
    ref_features, predicted = judge_set(J, x_ref)
    print(f"judge {args.judge}: class accuracy {(predicted == y_ref).double().mean():.4f} on the {len(y_ref)} "
          f"held-out images of {args.data_path}")
    if ref_features.var(0).sum() <= 1e-8 * ref_features.square().mean(0).sum():  # all alike, or all zero (dead ReLUs)
        print("warning: the judge's features of the held-out images are degenerate (they barely vary): an "
              "under-trained judge, whose Frechet distances say nothing (0 for any images)")
    sets = []
    if args.real_data:                                        # the floor: as many real images as samples, at random
        real = LatentData(args.real_data)
        check_fits(J, j_info, args.real_data, real.info)
        n = min(len(real.labels), max(len(npz_images(p)[1]) for p in args.evaluate) if args.evaluate else 10_000)
        idx = np.sort(np.random.RandomState(args.global_seed).permutation(len(real.labels))[:n])
        sets.append((f"real {args.real_data} ({n})", torch.from_numpy(real.latents[idx, 0].astype(np.float32)),
                     torch.from_numpy(real.labels[idx])))
    for path in args.evaluate:
        x, y = npz_images(path)
        sets.append((f"{path} ({len(y)})", x, y))
    floor = None
    for name, x, y in sets:
        r = scores(J, x, y, ref_features)
        floor = r["frechet"] if floor is None and name.startswith("real") else floor
        ratio = f" ({r['frechet'] / floor:.1f}x the real floor)" if floor and not name.startswith("real") else ""
        print(f"{name}: class accuracy {r['accuracy']:.4f}  Frechet distance {r['frechet']:.4f}{ratio}  "
              f"precision {r['precision']:.4f}  recall {r['recall']:.4f}")
        print("    per class " + " ".join(f"{a:.3f}" for a in r["per_class"]))
    if args.compare:
        compare(J, *args.compare, x_ref, y_ref, args.global_seed)


def compare(J, path_a, path_b, x_ref, y_ref, seed):
    """Two sample sets of the same noise and labels (sample.py --npz with the same --num-samples and --global-seed):
    the mean squared pixel difference of their images (in [-1, 1]) and how often the judge gives both the same class;
    for reference the same numbers for pairs of unrelated real images of one class."""
    (xa, ya), (xb, yb) = npz_images(path_a), npz_images(path_b)
    if xa.shape != xb.shape or not torch.equal(ya, yb):
        fail(f"{path_a} and {path_b} are not samples of the same noise and labels (same --num-samples and labels)")
    same = lambda a, b: (judge_set(J, a)[1] == judge_set(J, b)[1]).double().mean().item()
    print(f"{path_a} vs {path_b}: mean squared difference {(xa - xb).square().mean():.4f}, same judged class "
          f"{same(xa, xb):.4f} ({len(ya)} pairs)")
    rng = np.random.RandomState(seed)
    partner = np.empty(len(y_ref), dtype=np.int64)
    for k in y_ref.unique().tolist():                          # each image with another of its class, at random
        members = np.flatnonzero(y_ref.numpy() == k)
        partner[members] = rng.permutation(members)
    xa, xb = x_ref, x_ref[partner]
    print(f"real pairs of one class (reference): mean squared difference {(xa - xb).square().mean():.4f}, same judged "
          f"class {same(xa, xb):.4f} ({len(y_ref)} pairs)")


def check_fits(J, j_info, name, info):
    """One line when a data set is not in the space the judge was trained on."""
    differ = data_differences(j_info, info, SPACE)
    if differ:
        fail(f"the judge does not fit {name}: {', '.join(differ)}")


#################################################################################
#                                    Training                                   #
#################################################################################

def main(args):
    # Setup: processes and devices, the data, the network config, the checkpoint to resume, before anything is written.
    device, rank, world = setup_distributed(args.device)
    judge = args.judge is not None                            # the judge, not the guidance classifier
    batch_size = per_rank_batch(args.global_batch_size, world)
    torch.backends.cuda.matmul.fp32_precision = torch.backends.cudnn.conv.fp32_precision = "tf32"  # as the official code
    data = LatentData(args.data_path)
    if judge and data.info.get("vae", "none") != "none":
        fail(f"{args.data_path} holds latents; the judge is for small pixel images (prepare_latents.py --vae none)")
    config = (dict(J=dict(in_channels=data.channels, num_classes=data.num_classes)) if judge else
              dict(C=network_shape(args.model, data)))
    epochs = JUDGE_EPOCHS if judge else EPOCHS
    max_steps = args.max_steps or math.ceil(epochs * len(data.labels) / args.global_batch_size)
    starts = load_starts(args, config, max_steps, data.info)   # the same network and data, or one line
    if dist.is_initialized():
        dist.barrier()                                         # every rank has checked --results-dir before rank 0 writes
    stop = StopOnSignal()

    # Model, EMA and AdamW, the same initial weights on every rank.
    if rank == 0:
        os.makedirs(os.path.join(args.results_dir, "checkpoints"), exist_ok=True)
    logger = create_logger(args.results_dir if rank == 0 else None)
    torch.manual_seed(args.global_seed)
    C = (Judge(**config["J"]) if judge else Classifier(**config["C"])).to(device)
    EMA = deepcopy(C).requires_grad_(False)
    adamw = dict(betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01, fused=device.type == "cuda")  # official yaml
    opt = torch.optim.AdamW(C.parameters(), lr=args.lr, **adamw)
    state = dict(model=C, EMA=EMA, opt=opt)                    # what a checkpoint holds
    logger.info(f"{'judge' if judge else 'classifier'} {sum(p.numel() for p in C.parameters()):,} parameters")

    # Resume: weights, optimizer moments, this command's lr, every rank's RNG.
    start = restore_state(state, starts, args, logger, data.info)
    check_checkpoint_room(state, args.results_dir)             # a run that could not save fails before it trains
    restore_rng(starts.get("resume"), args.global_seed, rank, world, start, device)
    C_train = DDP(C, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else C

    # The loop: cross-entropy of C(x_t, t) against the label, the EMA; logs and checkpoints every so many steps.
    logger.info(f"training {'the judge' if judge else 'classifier ' + args.model} on {world} x {device.type}, batch "
                f"{batch_size}/rank, "
                f"{max_steps} steps ({max_steps * args.global_batch_size / len(data.labels):.1f} epochs), lr {args.lr}")
    sums, count, tic = {}, 0, time.time()
    for step in tqdm(range(start, max_steps), initial=start, total=max_steps, disable=rank != 0):
        if judge:                                              # the judge's lr: a cosine to 0 (the classifier's: constant)
            opt.param_groups[0]["lr"] = args.lr * (1 + math.cos(math.pi * step / max_steps)) / 2
        x_t, t, y = (judge_batch(data, batch_size, device) if judge else
                     classifier_batch(data, batch_size, args.augment_p, device))
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
            logger.info(f"step {done:07d} " + " ".join(f"{k} {v:.4f}" for k, v in means.items()) + f" lr {opt.param_groups[0]['lr']:.3g}"
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
    parser = argparse.ArgumentParser(description="Train the guidance classifier or the judge, or --evaluate samples.")
    parser.add_argument("--data-path", type=str, required=True, help="training data; with --evaluate the held-out data")
    parser.add_argument("--results-dir", type=str, default="results/classifier")
    parser.add_argument("--judge", type=str, nargs="?", const="", default=None, metavar="JUDGE",
                        help="train the judge of small-image samples instead of the classifier; with --evaluate, the "
                             "judge checkpoint that scores them")
    parser.add_argument("--model", type=str, choices=list(SIZES), default="B/2")         # the paper, §4.1: B/2
    parser.add_argument("--global-batch-size", type=positive_int, default=None,
                        help="default: 256 (official classifier yaml); the judge 128")
    parser.add_argument("--global-seed", type=count, default=0, help="also the seed of --evaluate's real subset")
    parser.add_argument("--max-steps", type=positive_int, default=None, help=f"default: {EPOCHS} epochs of the data "
                        f"set at the global batch size (the paper, §4.1); the judge {JUDGE_EPOCHS}")
    parser.add_argument("--lr", type=number(lo_open=True), default=None,
                        help="default: 1e-4, constant (official classifier yaml); the judge 1e-3, a cosine decay to 0")
    parser.add_argument("--ema-decay", type=number(0, 1, hi_open=True), default=None,
                        help="default: 0.9995 (official classifier yaml); the judge 0.999")
    parser.add_argument("--augment-p", type=number(0, 1), default=0.8, help="probability of the random affine (official)")
    parser.add_argument("--log-every", type=positive_int, default=100)
    parser.add_argument("--ckpt-every", type=positive_int, default=10_000)
    parser.add_argument("--resume", type=str, default=None, help="checkpoint to continue from")
    parser.add_argument("--device", type=str, default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--evaluate", type=str, nargs="+", default=None, metavar="NPZ",
                        help="score these sample npz files (sample.py --npz) against --data-path's images by --judge")
    parser.add_argument("--real-data", type=str, default=None, help="with --evaluate: real images scored as the "
                        "samples are (the floor: what a perfect generator would score), e.g. the training set")
    parser.add_argument("--compare", type=str, nargs=2, default=None, metavar=("A", "B"), help="with --evaluate: two "
                        "sample npz files of the same noise and labels, compared image by image")
    args = parser.parse_args()
    if args.evaluate is not None and not args.judge:
        parser.error("--evaluate needs --judge JUDGE.pt")
    judge = args.judge is not None
    defaults = dict(global_batch_size=(128, 256), lr=(1e-3, 1e-4), ema_decay=(0.999, 0.9995))
    for flag, (for_judge, for_classifier) in defaults.items():
        if getattr(args, flag) is None:
            setattr(args, flag, for_judge if judge else for_classifier)
    run(main_evaluate if args.evaluate is not None else main, args)
