"""
The judge of small-image samples: a small CNN trained on the clean real images of a pixel data directory (the MNIST
family, prepare_latents.py --vae none), which scores the sample npz files of sample.py --npz against held-out images:
class accuracy, the Frechet distance and Precision/Recall in its hidden features, with real images as the floor.

    python judge.py --data-path data/fmnist --results-dir results/judge --device cpu          # train it (14 minutes)
    python judge.py --evaluate s.npz --judge results/judge/checkpoints/0004688.pt \
        --data-path data/fmnist-test --real-data data/fmnist --device cpu                      # score samples
    python judge.py --evaluate a.npz --compare a.npz b.npz --judge J.pt --data-path data/fmnist-test

Training: 10 epochs of batch 128, AdamW 1e-3 with a cosine decay to 0, EMA 0.999, random flips and shifts of up to
2 pixels, the gradient clipped as the guidance classifier's (train_classifier.py). docs/fashion_mnist.md says why a
separate network judges.
"""
import argparse
import math
import zipfile

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import fid
from checkpoint import LoopTail, check_checkpoint_room, load_checkpoint, load_starts, load_weights, start_state
from common import (StopOnSignal, check_batch_memory, check_input, create_logger, fail, number, per_rank_batch,
                    positive_int, run, seed, setup_distributed)
from data import SPACE, LatentData, data_differences
from loss import classifier_state, classifier_step, update_ema

EPOCHS = 10              # above 0.91 on Fashion-MNIST's test images after 10 epochs, with its cosine lr
GRAD_CLIP = 50.0         # as the guidance classifier (official train_adversarial_flow_classifier.py)

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
    """The frozen judge of a judge.py checkpoint (its EMA weights) and its data's info.json."""
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("config"), dict) or "J" not in ckpt["config"]:
        fail(f"{path} is not a judge checkpoint (of judge.py)")
    J = Judge(**ckpt["config"]["J"])
    load_weights(J, ckpt.get("EMA"), path)
    return J.eval().requires_grad_(False), ckpt.get("data_info", {})


def npz_images(path, J, size):
    """(float images (N, C, H, W) in [-1, 1], labels) of an ADM-format npz (sample.py --npz), checked against the
    judge's space: at least 4 images (Precision/Recall take 3 neighbours) of size x size pixels in its channels (grey
    samples written as RGB, the three channels equal, are read as one), labels among its classes; else one line."""
    check_input(path, "sample npz")
    try:
        with np.load(path) as f:
            images, labels = f["arr_0"], f["labels"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        fail(f"cannot read {path} as a sample npz with arr_0 and labels: {type(e).__name__}: {e}")
    if images.dtype != np.uint8 or images.ndim != 4 or labels.shape != images.shape[:1]:
        fail(f"{path}: arr_0 must be uint8 (N, H, W, C) with one label each, got arr_0 {images.dtype} {images.shape} "
             f"and labels {labels.dtype} {labels.shape}")
    channels, classes = J.convs[0].in_channels, J.head[-1].out_features
    n, h, w, c = images.shape
    if n < 4 or (h, w) != (size, size) or c not in (1, 3) or (c != channels and not (
            c == 3 and channels == 1 and (images == images[..., :1]).all())):
        fail(f"{path}: the judge scores 4 or more images of {size} x {size} pixels in {channels} channel(s) (grey as "
             f"RGB too), got {n} of {h} x {w} in {c}")
    if labels.dtype.kind not in "iu" or labels.min() < 0 or labels.max() >= classes:
        found = f"from {labels.min()} to {labels.max()}" if labels.dtype.kind in "iu" else f"{labels[:3].tolist()}..."
        fail(f"{path}: labels must be the judge's classes, integers from 0 to {classes - 1}, got {labels.dtype} "
             f"{found}")
    x = torch.from_numpy(images[..., :channels]).permute(0, 3, 1, 2).float() / 127.5 - 1
    return x, torch.from_numpy(labels.astype(np.int64))


@torch.no_grad()
def judge_set(J, x, batch_size=500):
    """The judge's features (N, 256) and predicted classes of images x (N, C, H, W) of its space."""
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
    check_fits(J, j_info, args.data_path, held_out)
    npz = lambda path: npz_images(path, J, held_out.size)
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
        check_fits(J, j_info, args.real_data, real)
        n = min(len(real.labels), max(len(npz(p)[1]) for p in args.evaluate) if args.evaluate else 10_000)
        idx = np.sort(np.random.RandomState(args.global_seed).permutation(len(real.labels))[:n])
        sets.append((f"real {args.real_data} ({n})", torch.from_numpy(real.latents[idx, 0].astype(np.float32)),
                     torch.from_numpy(real.labels[idx])))
    for path in args.evaluate:
        x, y = npz(path)
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
        compare(J, *args.compare, npz, x_ref, y_ref, args.global_seed)


def compare(J, path_a, path_b, load, x_ref, y_ref, seed):
    """Two sample sets of the same noise and labels (sample.py --npz with the same --num-samples and --global-seed):
    the mean squared pixel difference of their images (in [-1, 1]) and how often the judge gives both the same class;
    for reference the same numbers for pairs of unrelated real images of one class."""
    (xa, ya), (xb, yb) = load(path_a), load(path_b)
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


def check_fits(J, j_info, name, data):
    """One line when a data set is not in the space the judge was trained on (its info.json, and its channels)."""
    differ = data_differences(j_info, data.info, SPACE)
    if data.channels != J.convs[0].in_channels:
        differ.append(f"channels {J.convs[0].in_channels} vs {data.channels}")
    if differ:
        fail(f"the judge does not fit {name}: {', '.join(differ)}")


#################################################################################
#                                    Training                                   #
#################################################################################

def main(args):
    # Setup: processes and devices, the data, the network config, the checkpoint to resume, before anything is written.
    device, rank, world = setup_distributed(args.device)
    batch_size = per_rank_batch(args.global_batch_size, world)
    torch.backends.cuda.matmul.fp32_precision = torch.backends.cudnn.conv.fp32_precision = "tf32"
    data = LatentData(args.data_path)
    check_batch_memory(batch_size, (data.channels, data.size, data.size))
    if data.info.get("vae", "none") != "none":
        fail(f"{args.data_path} holds latents; the judge is for small pixel images (prepare_latents.py --vae none)")
    config = dict(J=dict(in_channels=data.channels, num_classes=data.num_classes))
    max_steps = args.max_steps or math.ceil(EPOCHS * len(data.labels) / args.global_batch_size)
    starts = load_starts(args, config, max_steps, data.info)   # the same network and data, or one line
    stop = StopOnSignal()

    # The judge, its EMA and AdamW as the classifier's (the same initial weights on every rank), and the start.
    torch.manual_seed(args.global_seed)
    state = classifier_state(Judge(**config["J"]).to(device), args.lr, device)
    J, EMA, opt = state["model"], state["EMA"], state["opt"]
    check_checkpoint_room(state, args.results_dir)             # a run that could not save fails before it writes
    logger = create_logger(args.results_dir if rank == 0 else None)
    logger.info(f"judge {sum(p.numel() for p in J.parameters()):,} parameters")
    start, _ = start_state(state, starts, args, logger, data.info, device)   # batches from the global RNG
    tail = LoopTail(stop, state, args, config, data.info, device, logger, max_steps, args.global_batch_size,
                    curves=[("loss", ["loss"], True), ("accuracy", ["acc"], False), ("gradient norm", ["grad_norm"], True),
                            ("lr", ["lr"], False)])
    J_train = DDP(J, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else J

    # The loop: cross-entropy with a cosine lr, the EMA; logs and checkpoints every so many steps.
    logger.info(f"training the judge on {world} x {device.type}, batch {batch_size}/rank, "
                f"{max_steps} steps ({max_steps * args.global_batch_size / len(data.labels):.1f} epochs), lr {args.lr}")
    for step in tqdm(range(start, max_steps), initial=start, total=max_steps, disable=rank != 0):
        opt.param_groups[0]["lr"] = args.lr * (1 + math.cos(math.pi * step / max_steps)) / 2
        stats = classifier_step(J_train, opt, *judge_batch(data, batch_size, device), GRAD_CLIP)
        update_ema(EMA, J, args.ema_decay)
        tail(step, stats, dict(lr=opt.param_groups[0]["lr"]))
    tail.finish([J])


def make_parser():
    parser = argparse.ArgumentParser(description="Train the judge of small-image samples, or --evaluate samples.")
    parser.add_argument("--data-path", type=str, required=True, help="training data; with --evaluate the held-out data")
    parser.add_argument("--results-dir", type=str, default="results/judge")
    parser.add_argument("--global-batch-size", type=positive_int, default=128)
    parser.add_argument("--global-seed", type=seed, default=0, help="also the seed of --evaluate's real subset")
    parser.add_argument("--max-steps", type=positive_int, default=None,
                        help=f"default: {EPOCHS} epochs of the data set at the global batch size")
    parser.add_argument("--lr", type=number(lo_open=True), default=1e-3, help="the start of a cosine decay to 0")
    parser.add_argument("--ema-decay", type=number(0, 1, hi_open=True), default=0.999)
    parser.add_argument("--log-every", type=positive_int, default=100)
    parser.add_argument("--ckpt-every", type=positive_int, default=10_000)
    parser.add_argument("--resume", type=str, default=None, help="checkpoint to continue from")
    parser.add_argument("--device", type=str, default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--evaluate", type=str, nargs="+", default=None, metavar="NPZ",
                        help="score these sample npz files (sample.py --npz) against --data-path's images by --judge")
    parser.add_argument("--judge", type=str, default=None, help="with --evaluate: the judge checkpoint that scores")
    parser.add_argument("--real-data", type=str, default=None, help="with --evaluate: real images scored as the "
                        "samples are (the floor: what a perfect generator would score), e.g. the training set")
    parser.add_argument("--compare", type=str, nargs=2, default=None, metavar=("A", "B"), help="with --evaluate: two "
                        "sample npz files of the same noise and labels, compared image by image")
    return parser


if __name__ == "__main__":
    parser = make_parser()
    args = parser.parse_args()
    if args.evaluate is not None and not args.judge:
        parser.error("--evaluate needs --judge JUDGE.pt")
    scoring = [flag for flag in ("judge", "real_data", "compare") if getattr(args, flag) is not None]
    if args.evaluate is None and scoring:                      # else they would be dropped, and a judge trained
        flags = ", ".join("--" + flag.replace("_", "-") for flag in scoring)
        fail(f"{flags}: only with --evaluate NPZ, which scores samples; without it judge.py trains a judge")
    run(main_evaluate if args.evaluate is not None else main, args, errors=(fid.UserError,))
