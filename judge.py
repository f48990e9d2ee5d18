"""
The judge of small-image samples: a small CNN trained on the clean real images of a pixel data directory (the MNIST
family, prepare_latents.py --vae none), which scores the sample npz files of sample.py --npz, or the samples it draws
itself from generator checkpoints, against held-out images: class accuracy, the Frechet distance and Precision/Recall
in its hidden features, and the spread, with real images as the floor.

    python judge.py --data-path data/fmnist --results-dir results/judge --device cpu          # train it (14 minutes)
    python judge.py --evaluate s.npz --judge results/judge/checkpoints/0004688.pt \
        --data-path data/fmnist-test --real-data data/fmnist --device cpu                      # score samples
    python judge.py --evaluate a.npz --compare a.npz b.npz --judge J.pt --data-path data/fmnist-test
    python judge.py --checkpoints results/afm/checkpoints/*.pt --judge J.pt --data-path data/fmnist-test \
        --real-data data/fmnist --num-samples 10000 --scores-out scores.jsonl --figure scores.png --device cpu

The spread says what samples vary with, class by class: the spread of the judge's features over the samples of a class
(sqrt(trace(cov) / d), the root of their mean variance) divided by the same over the held-out images of that class.
Real images score about 1; a generator that draws one image per class, whatever its noise, scores 0.

Training: 10 epochs of batch 128, AdamW 1e-3 with a cosine decay to 0, EMA 0.999, random flips and shifts of up to
2 pixels, the gradient clipped as the guidance classifier's (train_classifier.py). docs/fashion_mnist.md says why a
separate network judges.
"""
import argparse
import json
import math
import zipfile

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import fid
from checkpoint import (LoopTail, check_checkpoint_room, load_checkpoint, load_generator, load_starts, load_weights,
                        start_state)
from common import (StopOnSignal, add_run_args, check_batch_memory, check_input, check_output, create_logger, fail,
                    image_format, integer, number, per_rank_batch, positive_int, rgb, run, save_atomic, save_curves,
                    seed, setup_distributed)
from data import SPACE, LatentData, data_differences, make_decoder
from loss import classifier_state, classifier_step, update_ema
from model import class_balanced_labels, generate

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


def read_npz(path, keys=("arr_0", "labels")):
    """The arrays `keys` of an ADM-format npz (sample.py --npz); an npz reads only the arrays asked for."""
    check_input(path, "sample npz")
    try:
        with np.load(path) as f:
            return [f[key] for key in keys]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        fail(f"cannot read {path} as a sample npz with arr_0 and labels: {type(e).__name__}: {e}")


def npz_images(path, J, size):
    """judge_images of an ADM-format npz."""
    return judge_images(*read_npz(path), J, size, path)


def checkpoint_images(path, args, J, j_info, size, device):
    """(judge_images, the checkpoint's step, sampling steps) of --num-samples class-balanced samples of a generator
    checkpoint (its EMA, or --weights G), drawn as sample.py --npz draws them: sample i from the noise of
    (--global-seed, i), in --steps or the generator's own number, decoded by its data's decoder."""
    ckpt = load_checkpoint(path)
    G, steps, info = load_generator(path, weights=args.weights, ckpt=ckpt)
    steps, num_classes = args.steps or steps, G.num_classes - G.null_class
    differ = data_differences(j_info, info, ("classes", "num_classes"))
    if differ:
        fail(f"the judge does not fit {path}: {', '.join(differ)}")
    if steps > 1 and not G.use_t_src:
        fail(f"{path} holds a one-step generator, which samples in one step, not --steps {steps}")
    labels = class_balanced_labels(args.num_samples, num_classes)
    batches = generate(G.to(device), steps, make_decoder(info, args.vae_weights, device), list(range(len(labels))),
                       labels, args.global_seed, args.batch_size, device)
    images = torch.cat([rgb(x).permute(0, 2, 3, 1).cpu() for _, x, _ in tqdm(  # (n, H, W, 3) as in an npz
        batches, total=math.ceil(len(labels) / args.batch_size), leave=False)])
    step = ckpt.get("step") if isinstance(ckpt, dict) else None              # none in a bare state dict
    return judge_images(images.numpy(), np.asarray(labels), J, size, path), step, steps


def judge_images(images, labels, J, size, name):
    """(float images (N, C, H, W) in [-1, 1], labels) of uint8 images (N, H, W, C) as an npz holds them, checked
    against the judge's space: at least 4 images (Precision/Recall take 3 neighbours) of size x size pixels in its
    channels (grey samples written as RGB, the three channels equal, are read as one), labels among its classes; else
    one line naming `name`."""
    if images.dtype != np.uint8 or images.ndim != 4 or labels.shape != images.shape[:1]:
        fail(f"{name}: arr_0 must be uint8 (N, H, W, C) with one label each, got arr_0 {images.dtype} {images.shape} "
             f"and labels {labels.dtype} {labels.shape}")
    channels, classes = J.convs[0].in_channels, J.head[-1].out_features
    n, h, w, c = images.shape
    if n < 4 or (h, w) != (size, size) or c not in (1, 3) or (c != channels and not (
            c == 3 and channels == 1 and (images == images[..., :1]).all())):
        fail(f"{name}: the judge scores 4 or more images of {size} x {size} pixels in {channels} channel(s) (grey as "
             f"RGB too), got {n} of {h} x {w} in {c}")
    if labels.dtype.kind not in "iu" or labels.min() < 0 or labels.max() >= classes:
        found = f"from {labels.min()} to {labels.max()}" if labels.dtype.kind in "iu" else f"{labels[:3].tolist()}..."
        fail(f"{name}: labels must be the judge's classes, integers from 0 to {classes - 1}, got {labels.dtype} "
             f"{found}")
    x = torch.from_numpy(images[..., :channels]).permute(0, 3, 1, 2).float() / 127.5 - 1
    return x, torch.from_numpy(labels.astype(np.int64))


@torch.no_grad()
def judge_set(J, x, batch_size=500):
    """The judge's features (N, 256) and predicted classes of images x (N, C, H, W) of its space."""
    features = torch.cat([J.features(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
    return features.double(), J.head(features).argmax(1)


def scores(J, x, y, ref_features, ref_labels):
    """Class accuracy (overall and per class), Frechet distance, Precision/Recall and the spread (overall and per
    class) of images x with labels y against the judge's features of the reference (held-out) images."""
    features, predicted = judge_set(J, x)
    if features.var(0).sum() < 1e-8 * max(ref_features.var(0).sum().item(), 1e-30):
        print(f"warning: the judge's features of these {len(x)} images are degenerate (they barely vary): an "
              "under-trained judge, or images that are all alike")
    mean_cov = lambda f: (f.mean(0).numpy(), np.cov(f.numpy(), rowvar=False))
    precision, recall = fid.precision_recall(ref_features, features)
    per_class = [(predicted[y == k] == k).double().mean().item() for k in range(int(y.max()) + 1)]
    ratios = spread(features, y, ref_features, ref_labels)
    finite = [r for r in ratios if math.isfinite(r)]
    return dict(accuracy=(predicted == y).double().mean().item(), frechet=fid.frechet_distance(
        *mean_cov(features), *mean_cov(ref_features)), precision=precision, recall=recall,
        spread=sum(finite) / len(finite) if finite else math.nan, per_class=per_class, spread_per_class=ratios)


def spread(features, labels, ref_features, ref_labels):
    """What a set of images varies with, for each class of the reference: the spread of the features (N, d) of the
    set's images of that class, sqrt(trace(cov) / d) (the root of the mean per-feature variance), divided by the same
    of the reference (held-out real) images of that class. About 1 for real images, 0 for a generator that draws one
    image per class whatever its noise; NaN for a class with fewer than 2 images on either side."""
    size = lambda f: f.var(0).mean().sqrt().item() if len(f) > 1 else math.nan
    ratio = lambda a, b: a / b if b > 0 else math.nan
    return [ratio(size(features[labels == k]), size(ref_features[ref_labels == k]))
            for k in range(int(ref_labels.max()) + 1)]


def main_evaluate(args):
    """Scores sample npz files, the samples of generator checkpoints, and real training images as the floor, by the
    judge against the held-out images; with --scores-out and --figure the scores go to a JSONL file and a figure."""
    torch.set_num_threads(min(torch.get_num_threads(), 8))
    for path, flag in ((args.scores_out, "--scores-out"), (args.figure, "--figure")):
        if path is not None:
            check_output(path, flag)
    if args.figure:
        image_format(args.figure)
    for path in args.checkpoints:
        check_input(path, "--checkpoints")
    device = setup_distributed(args.device)[0]
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

    def sets():
        """(name, images, labels, what the JSONL record says of them) of each set, drawn when its turn comes."""
        if args.real_data:                                    # the floor: as many real images as samples, at random
            real = LatentData(args.real_data)
            check_fits(J, j_info, args.real_data, real)
            n = min(len(real.labels), max([len(read_npz(p, ["labels"])[0]) for p in args.evaluate] +
                                          [args.num_samples] * bool(args.checkpoints)))
            idx = np.sort(np.random.RandomState(args.global_seed).permutation(len(real.labels))[:n])
            yield (f"real {args.real_data} ({n})", torch.from_numpy(real.latents[idx, 0].astype(np.float32)),
                   torch.from_numpy(real.labels[idx]), dict(real=args.real_data))
        for path in args.evaluate:
            x, y = npz(path)
            yield f"{path} ({len(y)})", x, y, dict(npz=path)
        for path in args.checkpoints:
            (x, y), step, steps = checkpoint_images(path, args, J, j_info, held_out.size, device)
            yield (f"{path} (step {step}, {len(y)} {args.weights} samples in {steps} step{'s' * (steps > 1)})", x, y,
                   dict(checkpoint=path, step=step, weights=args.weights, steps=steps))

    floor, records = None, []
    for name, x, y, record in sets():
        r = scores(J, x, y, ref_features, y_ref)
        floor = r["frechet"] if floor is None and "real" in record else floor
        ratio = f" ({r['frechet'] / floor:.1f}x the real floor)" if floor and "real" not in record else ""
        print(f"{name}: class accuracy {r['accuracy']:.4f}  Frechet distance {r['frechet']:.4f}{ratio}  "
              f"precision {r['precision']:.4f}  recall {r['recall']:.4f}  spread {r['spread']:.2f} of the real's")
        print("    per class " + " ".join(f"{a:.3f}" for a in r["per_class"]))
        print("    spread per class " + " ".join(f"{a:.2f}" for a in r["spread_per_class"]))
        records.append(dict(record, samples=len(y), **r))
        if args.scores_out:
            with save_atomic(args.scores_out) as tmp, open(tmp, "w") as f:
                f.writelines(json.dumps(line) + "\n" for line in records)
        if args.figure and "checkpoint" in record:
            save_figure(args.figure, records)
    if args.compare:
        compare(J, *args.compare, npz, x_ref, y_ref, args.global_seed)


def save_figure(path, records):
    """The checkpoints' scores against their steps (their order where a file holds no step), the real floor a flat
    line in each panel."""
    points = [r for r in records if "checkpoint" in r]
    xs = [r["step"] if r["step"] is not None else i for i, r in enumerate(points)]
    real = [r for r in records if "real" in r]
    panels = []
    for key, title, log in (("accuracy", "class accuracy", False), ("frechet", "Frechet distance", True),
                            ("precision", "precision", False), ("recall", "recall", False),
                            ("spread", "spread (of the real's)", False)):
        series = {f"{points[0]['weights']} samples": [(x, r[key]) for x, r in zip(xs, points)]}
        series |= {"real": [(min(xs), real[0][key]), (max(xs), real[0][key])]} if real else {}
        panels.append((title, series, log))
    save_curves(path, panels)


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
                    curves=[("loss", ["loss"], True), ("accuracy", ["acc"], False),
                            ("gradient norm", ["grad_norm"], True), ("lr", ["lr"], False)])
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
    parser.add_argument("--data-path", type=str, required=True, help="training data; when scoring the held-out data")
    parser.add_argument("--results-dir", type=str, default="results/judge")
    parser.add_argument("--global-batch-size", type=positive_int, default=128)
    parser.add_argument("--global-seed", type=seed, default=0, help="also the seed of --real-data's subset and "
                        "of the noise of --checkpoints' samples")
    parser.add_argument("--max-steps", type=positive_int, default=None,
                        help=f"default: {EPOCHS} epochs of the data set at the global batch size")
    parser.add_argument("--lr", type=number(lo_open=True), default=1e-3, help="the start of a cosine decay to 0")
    parser.add_argument("--ema-decay", type=number(0, 1, hi_open=True), default=0.999)
    add_run_args(parser, ckpt_every=10_000)
    parser.add_argument("--evaluate", type=str, nargs="+", default=None, metavar="NPZ",
                        help="score these sample npz files (sample.py --npz) against --data-path's images by --judge")
    parser.add_argument("--judge", type=str, default=None, help="with --evaluate: the judge checkpoint that scores")
    parser.add_argument("--real-data", type=str, default=None, help="with --evaluate: real images scored as the "
                        "samples are (the floor: what a perfect generator would score), e.g. the training set")
    parser.add_argument("--compare", type=str, nargs=2, default=None, metavar=("A", "B"), help="with --evaluate: two "
                        "sample npz files of the same noise and labels, compared image by image")
    parser.add_argument("--checkpoints", type=str, nargs="+", default=None, metavar="CKPT", help="score the samples "
                        "of these generator checkpoints (train.py, twinflow.py, cafm.py, sample.py --save-generator)")
    parser.add_argument("--weights", choices=["EMA", "G"], default="EMA", help="with --checkpoints: which generator")
    parser.add_argument("--num-samples", type=integer(4, 10_000_000), default=10_000, help="with --checkpoints: "
                        "class-balanced samples of each, sample i from the noise of (--global-seed, i)")
    parser.add_argument("--steps", type=positive_int, default=None, help="with --checkpoints: sampling steps "
                        "(default: the generator's, as sample.py)")
    parser.add_argument("--batch-size", type=positive_int, default=500, help="with --checkpoints: samples a batch")
    parser.add_argument("--vae-weights", type=str, default=None, help="with --checkpoints: weights of the decoder of "
                        "the generator's data, where it is latents")
    parser.add_argument("--scores-out", type=str, default=None, help="write the scores of every set as JSONL")
    parser.add_argument("--figure", type=str, default=None, help="with --checkpoints: a figure of their scores "
                        "against the step, the real floor as a flat line (e.g. scores.png)")
    return parser


if __name__ == "__main__":
    parser = make_parser()
    args = parser.parse_args()
    evaluating = args.evaluate is not None or args.checkpoints is not None
    if evaluating and not args.judge:
        parser.error("--evaluate and --checkpoints need --judge JUDGE.pt")
    scoring = [flag for flag in ("judge", "real_data", "compare", "scores_out", "figure", "vae_weights", "steps")
               if getattr(args, flag) is not None]
    if not evaluating and scoring:                             # else they would be dropped, and a judge trained
        flags = ", ".join("--" + flag.replace("_", "-") for flag in scoring)
        fail(f"{flags}: only with --evaluate NPZ or --checkpoints CKPT, which score samples; without them judge.py "
             "trains a judge")
    if args.figure and not args.checkpoints:
        fail("--figure draws the scores of --checkpoints against their steps: give --checkpoints")
    args.evaluate, args.checkpoints = args.evaluate or [], args.checkpoints or []
    run(main_evaluate if evaluating else main, args, errors=(fid.UserError,))
