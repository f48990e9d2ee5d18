"""
Draws class-conditional samples from a trained generator (the EMA weights by default) in its number of steps.

    python sample.py --ckpt results/checkpoints/0500000.pt --vae-weights sd-vae-ft-mse.pth           # PNG grid
    python sample.py --ckpt xl2_1nfe_guided_FID2.38.pth --model XL/2 --vae-weights sd-vae-ft-mse.pth  # official .pth
    python sample.py --ckpt xl2_112layer_1nfe_guided_FID1.94.pth --model XL/2 --repeat 4 --vae-weights ...
    torchrun --nproc_per_node=8 sample.py --ckpt CKPT --vae-weights ... --num-samples 50000 --npz samples.npz

The grid goes to --out (default samples.png). With --npz, --num-samples class-balanced samples are packed into one
ADM-format npz (`arr_0` uint8 NHWC, `labels`) for fid.py or the ADM evaluation suite. Sample i always starts from
noise seeded by --global-seed + i, whatever the number of ranks or the batch size.
"""
import argparse
import math
import os

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

from model import SIZES, Generator, sample
from train import fail, load_checkpoint, parse_nfe, positive_int, setup_distributed


def load_generator(path, model=None, nfe=None, repeat=None, weights="EMA"):
    """A Generator from a training checkpoint (its config decides the network) or from an official release .pth
    (a bare state dict for ImageNet-256 latents; --model, --nfe and --repeat say which network it is: the keys of
    few-step and repeated generators are the same, so only a wrong size can be caught there)."""
    ckpt = load_checkpoint(path)
    if isinstance(ckpt, dict) and "config" in ckpt:
        config, info = ckpt["config"], ckpt.get("data_info", {})
        trained = dict(model=ckpt["args"]["model"], nfe=ckpt["config"]["nfe"], repeat=config["G"]["repeat"])
        for key, value in dict(model=model, nfe=nfe, repeat=repeat).items():
            if value is not None and value != trained[key]:
                fail(f"{path} holds a --{key} {trained[key]} model, not --{key} {value}")
        kwargs, state, nfe = config["G"], ckpt[weights], config["nfe"]
    elif isinstance(ckpt, dict) and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        if model is None:
            fail(f"{path} is a bare state dict: say which network it is with --model (and --nfe, --repeat)")
        nfe, repeat = nfe or "1", repeat or 1
        kwargs = dict(SIZES[model], input_size=32, in_channels=4, num_classes=1000,
                      use_t_src=nfe != "1", use_t_tgt=nfe == "any", repeat=repeat)
        state, info = ckpt, dict(vae="sd-vae-ft-mse", scale=0.18215, num_classes=1000)
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


def to_uint8(x):
    """[-1, 1] floats to the uint8 an official-release PNG holds: floor(255 * clamp((x + 1) / 2, 0, 1))."""
    return (x.float().add(1).div(2).clamp(0, 1) * 255).to(torch.uint8)


def class_balanced_labels(num_samples, num_classes):
    """Sample i gets class i * C // K: 50 of each class for 50,000 ImageNet samples, in class order."""
    return [i * num_classes // num_samples for i in range(num_samples)]


@torch.no_grad()
def generate(G, steps, decode, indices, labels, seed, batch_size, device, progress=False):
    """Yields (indices, uint8 images (n, 3, H, W)) for the given sample indices, sample i from noise seed + i."""
    size = G.input_size
    for start in tqdm(range(0, len(indices), batch_size), disable=not progress, desc="sampling"):
        chunk = indices[start:start + batch_size]
        z = torch.stack([torch.randn(G.in_channels, size, size, generator=torch.Generator().manual_seed(seed + i))
                         for i in chunk]).to(device)          # (n, C, H, W), drawn on the CPU for every device
        y = torch.tensor([labels[i] for i in chunk], device=device)
        yield chunk, to_uint8(decode(sample(G, z, y, steps)))


def make_decoder(info, vae_weights, device):
    """Latents to [-1, 1] images: through the VAE (unscaled first), or as they are for pixel-space data."""
    if info.get("vae", "none") == "none":
        return lambda x: x
    if vae_weights is None:
        fail(f"these latents come from the {info['vae']} VAE: give its weights with --vae-weights")
    from vae import load_vae
    try:
        vae = load_vae(vae_weights, device)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    return lambda x: vae.decode(x / info["scale"])


def default_steps(nfe):
    return 8 if nfe == "any" else int(nfe)                     # any-step models: 8 steps, as the official code


def main(args):
    device, rank, world = setup_distributed(args.device)
    torch.backends.cuda.matmul.fp32_precision = "tf32"        # TF32 matmuls on GPU, as the official sampler
    torch.backends.cudnn.conv.fp32_precision = "tf32"
    G, nfe, info = load_generator(args.ckpt, args.model, args.nfe, args.repeat, args.weights)
    G = G.to(device)
    steps = args.steps or default_steps(nfe)
    if steps > 1 and nfe == "1":
        fail(f"a one-step generator samples in one step, not --steps {steps}")
    decode = make_decoder(info, args.vae_weights, device)
    num_classes = G.y_embedder.embedding_table.num_embeddings

    if args.npz is None:                                       # a grid of --num-images for people to look at
        labels = args.class_labels or [i % num_classes for i in range(args.num_images)]
        if max(labels) >= num_classes or min(labels) < 0:
            fail(f"class labels must be in [0, {num_classes})")
        if rank == 0:                                          # a grid is small: the other ranks have nothing to do
            images = torch.cat([x for _, x in generate(G, steps, decode, list(range(len(labels))), labels,
                                                       args.global_seed, args.batch_size, device)])
            save_grid(images, args.out, nrow=args.nrow or math.ceil(math.sqrt(len(images))))
            print(f"saved {len(images)} samples ({steps} steps) to {args.out}")
        if world > 1:
            dist.destroy_process_group()
        return

    # Evaluation set: class-balanced, sharded over ranks, packed by rank 0 into one shuffled npz.
    labels = class_balanced_labels(args.num_samples, num_classes)
    # Shuffled with a fixed permutation, as the official packing script, so Inception Score splits are unbiased.
    perm = np.random.RandomState(42).permutation(args.num_samples)
    row_of = np.argsort(perm)                                  # sample i lands at row row_of[i] of arr_0
    size = G.input_size * (8 if info.get("vae", "none") != "none" else 1)  # the VAE upsamples 8x
    staging = f"{args.npz}.staging.npy"
    if rank == 0:
        np.lib.format.open_memmap(staging, mode="w+", dtype=np.uint8, shape=(args.num_samples, size, size, 3))
    if world > 1:
        dist.barrier()
    rows = np.load(staging, mmap_mode="r+")
    for chunk, images in generate(G, steps, decode, list(range(rank, args.num_samples, world)), labels,
                                  args.global_seed, args.batch_size, device, progress=rank == 0):
        rows[row_of[chunk]] = images.permute(0, 2, 3, 1).cpu().numpy()  # (n, H, W, 3), ADM's NHWC
    rows.flush()
    if world > 1:
        dist.barrier()
    if rank == 0:
        tmp = f"{args.npz}.tmp.npz"
        np.savez(tmp, arr_0=rows, labels=np.asarray(labels, dtype=np.int64)[perm])
        os.replace(tmp, args.npz)
        os.remove(staging)
        print(f"saved {args.num_samples} samples ({steps} steps, {num_classes} classes) to {args.npz}")
    if world > 1:
        dist.destroy_process_group()


def save_grid(images, path, nrow):
    """Tiles uint8 images (N, 3, H, W) into one PNG, 2 px apart, and writes it atomically."""
    n, _, h, w = images.shape
    ncol = math.ceil(n / nrow)
    grid = np.zeros((ncol * (h + 2) + 2, nrow * (w + 2) + 2, 3), dtype=np.uint8)
    for i, image in enumerate(images.permute(0, 2, 3, 1).cpu().numpy()):
        r, c = divmod(i, nrow)
        grid[2 + r * (h + 2):2 + r * (h + 2) + h, 2 + c * (w + 2):2 + c * (w + 2) + w] = image
    tmp = f"{path}.tmp.png"
    Image.fromarray(grid).save(tmp)
    os.replace(tmp, path)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Sample from an adversarial flow model.")
    parser.add_argument("--ckpt", type=str, required=True, help="training checkpoint or official release .pth")
    parser.add_argument("--weights", choices=["EMA", "G"], default="EMA", help="which generator of a checkpoint")
    parser.add_argument("--model", choices=list(SIZES), default=None, help="size, needed for an official .pth")
    parser.add_argument("--nfe", type=parse_nfe, default=None, help="mode of an official .pth")
    parser.add_argument("--repeat", type=positive_int, default=None, help="depth repetition of an official .pth")
    parser.add_argument("--steps", type=positive_int, default=None, help="sampling steps (default: the model's)")
    parser.add_argument("--vae-weights", type=str, default=None, help="sd-vae-ft-mse weights to decode latents")
    parser.add_argument("--global-seed", type=int, default=0)
    parser.add_argument("--class-labels", type=int, nargs="+", default=None)
    parser.add_argument("--num-images", type=positive_int, default=16)
    parser.add_argument("--nrow", type=positive_int, default=None)
    parser.add_argument("--out", type=str, default="samples.png")
    parser.add_argument("--npz", type=str, default=None, help="write an evaluation npz instead of a grid")
    parser.add_argument("--num-samples", type=positive_int, default=50_000)
    parser.add_argument("--batch-size", type=positive_int, default=64, help="per rank")
    parser.add_argument("--device", type=str, default=None)
    main(parser.parse_args())
