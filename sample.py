"""
Draws class-conditional samples from a trained generator (the EMA weights by default) in its number of steps.

    python sample.py --ckpt results/checkpoints/0500000.pt --vae-weights sd-vae-ft-mse.pth           # PNG grid
    python sample.py --ckpt xl2_1nfe_guided_FID2.38.pth --model XL/2 --vae-weights sd-vae-ft-mse.pth  # official .pth
    python sample.py --ckpt xl2_112layer_1nfe_guided_FID1.94.pth --model XL/2 --repeat 4 --vae-weights ...
    torchrun --nproc_per_node=8 sample.py --ckpt CKPT --vae-weights ... --num-samples 50000 --npz samples.npz

The grid goes to --out (default samples.png; .jpg etc. by its extension). With --npz, --num-samples class-balanced
samples are packed into one ADM-format npz (`arr_0` uint8 NHWC, `labels`) for fid.py or the ADM evaluation suite;
an interrupted --npz run resumes when the same command is run again. Sample i always starts from noise seeded by
(--global-seed, i), whatever the device, the number of ranks or the batch size.
"""
import argparse
import json
import math
import os
import pathlib
import time

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from PIL import Image

from checkpoint import load_checkpoint, load_generator
from common import (allocate_npy, check_output, check_room, claim, fail, image_format, integer, number, open_npy,
                    parse_nfe, positive_int, rgb, run, save_atomic, save_grid, seed, setup_distributed)
from data import make_decoder
from model import SIZES, class_balanced_labels, generate

# What --npz keeps until done: the record, the rows, which of them are written, their transport costs.
STAGING = (".staging.json", ".staging.npy", ".staging-done.npy", ".staging-cost.npy")


def main(args):
    # Setup, and the output checked and claimed (by rank 0) before any work.
    device, rank, world = setup_distributed(args.device)
    torch.backends.cuda.matmul.fp32_precision = "tf32"        # TF32 matmuls on GPU, as the official sampler
    torch.backends.cudnn.conv.fp32_precision = "tf32"
    out, flag = ((args.save_generator, "--save-generator") if args.save_generator else (args.npz, "--npz") if args.npz
                 else (args.out, "--out"))
    check_output(out, flag)
    if args.npz is not None and not args.npz.endswith(".npz"):
        fail(f"--npz {args.npz}: the evaluation file must end in .npz")
    if args.npz is None and args.save_generator is None:
        image_format(args.out)
    if rank == 0:
        claim(out, flag, new=flag != "--out")                  # an npz or a generator replaces no file; a grid may
    if len(args.ckpt) > 1 and (args.npz or args.save_generator):
        fail(f"{flag} takes one --ckpt; several are for a grid that sets them side by side")
    loaded = [load_generator(path, args.model, args.nfe, args.repeat, args.weights) for path in args.ckpt]
    if args.save_generator:
        return save_generator(args.ckpt[0], args.weights, args.save_generator) if rank == 0 else None
    G, steps, info = loaded[0]
    shapes = {(g.in_channels, g.input_size, g.y_embedder.embedding_table.num_embeddings) for g, _, _ in loaded}
    if len(shapes) > 1 or len({i.get("vae", "none") for _, _, i in loaded}) > 1:
        fail(f"the checkpoints of --ckpt make different images (channels, size, classes {sorted(shapes)}): one grid "
             "sets side by side generators of the same data")
    G, steps = G.to(device), args.steps or steps
    for path, (g, _, _) in zip(args.ckpt, loaded):
        if (args.steps or 1) > 1 and not g.use_t_src:
            fail(f"--ckpt {path} holds a one-step generator, which samples in one step, not --steps {args.steps}")
        if args.sampler == "heun" and (g.use_t_tgt or not g.use_t_src):
            fail("--sampler heun is for a velocity of one time (flow matching, CAFM); this generator jumps")
        if args.cfg_scale != 1 and not g.null_class:
            fail(f"--cfg-scale {args.cfg_scale} needs a generator with a null class (a SiT-format one); this one has none")
    heun = args.sampler == "heun"
    decode = make_decoder(info, args.vae_weights, device)
    num_classes = G.y_embedder.embedding_table.num_embeddings
    classes = args.class_labels or list(range(num_classes))   # what the samples are drawn from, in turn or balanced
    if max(classes) >= num_classes or min(classes) < 0:
        fail(f"--class-labels must be in [0, {num_classes})")
    with torch.no_grad():                                      # the decoder's image size: the SD VAE's is 8x G's
        size = decode(torch.zeros(1, G.in_channels, G.input_size, G.input_size, device=device)).shape[-1]

    if args.npz is None:                                       # a grid for people to look at
        n = args.num_images or (len(args.class_labels) if args.class_labels else 16)
        labels, nrow = [classes[i % len(classes)] for i in range(n)], args.nrow or math.ceil(math.sqrt(n))
        if len(loaded) > 1:                                    # a row per noise, a column per checkpoint
            n, nrow = n * len(loaded), len(loaded)
        if nrow > n:
            fail(f"--nrow {nrow} is more than the {n} images of the grid")
        width, height = nrow * (size + 2) + 2, math.ceil(n / nrow) * (size + 2) + 2
        if width * height > Image.MAX_IMAGE_PIXELS:
            fail(f"a grid of {n} images of {size} px, {nrow} a row, is {width} x {height} pixels, more than Pillow "
                 f"opens ({Image.MAX_IMAGE_PIXELS:,}): ask for fewer --num-images")
        if rank == 0:                                          # a grid is small: the other ranks have nothing to do
            columns = [torch.cat([x for _, x, _ in generate(g.to(device), args.steps or default, decode,
                                                            list(range(len(labels))), labels, args.global_seed,
                                                            args.batch_size, device, heun, args.cfg_scale)])
                       for g, default, _ in loaded]
            images = torch.stack(columns, 1).flatten(0, 1)     # (n, K, C, H, W) -> row by row
            save_grid(images, args.out, nrow=nrow)
            print(f"saved {n} samples ({steps} step{'s' * (steps > 1)}) to {args.out}")
        return

    # Evaluation set: class-balanced, sharded over ranks into a staging file that a rerun of the same command resumes,
    # then packed by rank 0 into one npz, shuffled with a fixed permutation as the official packing script does (so
    # Inception Score splits are unbiased).
    labels = [classes[k] for k in class_balanced_labels(args.num_samples, len(classes))]
    perm = np.random.RandomState(42).permutation(args.num_samples)
    row_of = np.argsort(perm)                                  # sample i lands at row row_of[i] of arr_0
    rows, done, cost = open_staging(args, steps, (args.num_samples, size, size, 3), rank)
    indices = [i for i in range(rank, args.num_samples, world) if not done[i]]
    tic = time.time()
    batches = generate(G, steps, decode, indices, labels, args.global_seed, args.batch_size, device, heun,
                       args.cfg_scale)
    for chunk, images, costs in tqdm(batches, total=math.ceil(len(indices) / args.batch_size), disable=rank != 0):
        rows[row_of[chunk]] = rgb(images).permute(0, 2, 3, 1).cpu().numpy()  # (n, H, W, 3), ADM's NHWC
        cost[chunk] = costs.double().cpu().numpy()
        rows.flush()
        cost.flush()
        done[chunk] = 1                                        # only once the rows are on disk
        done.flush()
    drawn = torch.tensor(float(len(indices)), dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(drawn)                                 # also waits for every rank
    seconds, drawn = time.time() - tic, int(drawn)
    if rank == 0:
        with save_atomic(args.npz) as tmp:
            np.savez(tmp, arr_0=rows, labels=np.asarray(labels, dtype=np.int64)[perm])
        print(f"saved {args.num_samples} samples ({steps} step{'s' * (steps > 1)}, {len(set(labels))} classes) to "
              f"{args.npz}; drew {drawn} in {seconds:.1f} s, {drawn / seconds:.1f} images/s; transport cost "
              f"E|G(z) - z|^2/n {cost.mean():.4f} over all {args.num_samples}")
        for suffix in STAGING:
            os.remove(args.npz + suffix)


def save_generator(path, weights, out):
    """A checkpoint of one generator (the EMA's weights by default), its network and its data's info: what sample.py
    needs, a sixth of a training checkpoint."""
    ckpt = load_checkpoint(path)
    if "config" not in ckpt:
        fail(f"{path} is not a training checkpoint: it is already a generator's weights")
    slim = {key: ckpt[key] for key in ("config", "args", "data_info", "step")}
    with save_atomic(out) as tmp, open(tmp, "wb") as f:
        torch.save(dict(slim, EMA=ckpt[weights]), f)
    print(f"saved the {weights} generator of {path} to {out} ({os.path.getsize(out) / 2 ** 20:.1f} MiB)")


def open_staging(args, steps, shape, rank):
    """(rows, done, cost): the memory-mapped samples of --npz, a byte per sample written and each sample's transport
    cost; what an interrupted run of the same command (checkpoint, weights, steps, seed, number) left is kept when
    whole, anything else starts afresh."""
    identity = lambda path: path and os.path.isfile(path) and [os.path.abspath(path), os.path.getsize(path),
                                                             os.path.getmtime(path)]
    spec = dict(ckpt=identity(args.ckpt[0]), vae=identity(args.vae_weights), network=[args.model, args.nfe, args.repeat],
                weights=args.weights, steps=steps, sampler=[args.sampler, args.cfg_scale], seed=args.global_seed,
                shape=list(shape), labels=args.class_labels)
    record, *arrays = (args.npz + suffix for suffix in STAGING)
    arrays = list(zip(arrays, (shape, shape[:1], shape[:1]), (np.uint8, np.uint8, np.float64)))
    if rank == 0:
        try:
            with open(record) as f:
                same = json.load(f) == spec and all(os.path.isfile(path) for path, _, _ in arrays)
        except (OSError, ValueError):
            same = False
        # Room for the staging rows (unless kept) and then for the npz, which holds them again.
        check_room(os.path.dirname(os.path.abspath(args.npz)), math.prod(shape) * (1 if same else 2) + 9 * shape[0],
                   f"--npz {args.npz} ({shape[0]} samples, staged and then packed)")
        if not same:
            try:
                for path, size, dtype in arrays:
                    allocate_npy(path, size, dtype)
            except OSError as e:
                fail(f"cannot write the staging files of {args.npz}: {e.strerror}")
            with save_atomic(record) as tmp:
                pathlib.Path(tmp).write_text(json.dumps(spec))
    if dist.is_initialized():
        dist.barrier()
    try:                                                       # a file cut short would be read as black samples
        rows, done, cost = [open_npy(*array) for array in arrays]
    except (OSError, ValueError) as e:
        fail(f"the staging files of --npz {args.npz} are damaged ({e}); delete {record} to start over")
    if rank == 0 and same:
        print(f"resuming {args.npz}: {int(done.sum())} of {shape[0]} samples already drawn")
    return rows, done, cost


def make_parser():
    parser = argparse.ArgumentParser(description="Sample from an adversarial flow model.")
    parser.add_argument("--ckpt", type=str, nargs="+", required=True, help="training checkpoint or official release "
                        ".pth; several: a grid with a column per checkpoint, the same noise and label along each row")
    parser.add_argument("--weights", choices=["EMA", "G"], default="EMA", help="which generator of a checkpoint")
    parser.add_argument("--model", choices=list(SIZES), default=None, help="size, needed for an official .pth")
    parser.add_argument("--nfe", type=parse_nfe, default=None, help="mode of an official .pth")
    parser.add_argument("--repeat", type=int, choices=[1, 2, 4], default=None, help="depth repetition of an official "
                        ".pth")
    parser.add_argument("--steps", type=positive_int, default=None, help="sampling steps (default: the model's)")
    parser.add_argument("--sampler", choices=["euler", "heun"], default="euler", help="steps of a flow model (flow "
                        "matching, CAFM): Euler, or Heun's with two evaluations each (SiT evaluates 250 Heun steps)")
    parser.add_argument("--cfg-scale", type=number(), default=1.0, help="classifier-free guidance of a generator with "
                        "a null class (1: none)")
    parser.add_argument("--vae-weights", type=str, default=None, help="sd-vae-ft-mse weights to decode latents, or "
                        "the train_ae.py checkpoint that encoded them")
    parser.add_argument("--global-seed", type=seed, default=0, help="sample i's noise is seeded by (seed, i)")
    parser.add_argument("--class-labels", type=int, nargs="+", default=None, help="the classes to draw: a grid shows "
                        "them in turn (one image each unless --num-images), an npz is class-balanced over them")
    parser.add_argument("--num-images", type=integer(1, 10 ** 6), default=None, help="images in the grid, up to a "
                        "million and what Pillow opens (default: 16, or one per --class-labels)")
    parser.add_argument("--nrow", type=integer(1, 10 ** 6), default=None, help="images per row of the grid")
    parser.add_argument("--out", type=str, default="samples.png")
    parser.add_argument("--npz", type=str, default=None, help="write an evaluation npz instead of a grid")
    parser.add_argument("--save-generator", type=str, default=None, help="write a checkpoint of the --weights "
                        "generator alone (a sixth of a training checkpoint) instead of sampling")
    parser.add_argument("--num-samples", type=integer(1, 10_000_000), default=50_000, help="up to 10 million")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="per rank")
    parser.add_argument("--device", type=str, default=None)
    return parser


if __name__ == "__main__":
    parser = make_parser()
    args = parser.parse_args()
    run(main, args, "run the same command again to resume" if args.npz else "nothing was written")
