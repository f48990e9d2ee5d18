"""
Trains an Adversarial Flow Model (https://arxiv.org/abs/2511.22475) on a data directory made by prepare_latents.py:
a generator G and a discriminator D, one D step then one G step per iteration (the objective is in loss.py).

    python train.py --model B/2 --data-path data/imagenet256                          # one GPU
    torchrun --nproc_per_node=8 train.py --model B/2 --data-path data/imagenet256     # eight GPUs
    python train.py --model XS/7 --data-path data/fmnist --device cpu                 # Fashion-MNIST on 2 CPU cores
    python train.py --model XL/2 --nfe 2 ...       # few-step (velocity) model; --nfe any for any-step
    python train.py --model XL/2 --repeat 4 ...    # 112-layer one-step generator by depth repetition

Flags left unset take the paper's value for the chosen size and mode from DEFAULTS below (each row cites its source).
"""
import argparse
import resource
import time
from copy import deepcopy

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import fid
from checkpoint import LoopTail, check_checkpoint_room, load_classifier, load_starts, start_state
from common import (StopOnSignal, add_run_args, check_batch_memory, check_input, count, create_logger, fail, integer,
                    number, parse_nfe, per_rank_batch, positive_int, rgb, run, seed, setup_distributed)
from data import (SPACE, BatchReader, LatentData, check_vae_weights, data_differences, make_decoder, make_grid_writer,
                  network_shape)
from loss import DStep, GStep, GradNorm, Guidance, afm_batch, ot_scale_at, reload_ema, update_ema
from model import (SIZES, Discriminator, Generator, class_balanced_labels, default_steps, generate, mode_flags, sample,
                   to_uint8)
from vae import SCALE, AutoencoderKL, SmallAE

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
    # XS/1: the 16 x 4 x 4 latents of train_ae.py's autoencoder of 28-pixel images.
    ("global_batch_size", "XS/1", "*", 64,  "Fashion-MNIST latent search (docs/fashion_mnist.md)"),
    ("max_steps",    "XS/1", "*",    2000,  "Fashion-MNIST latent search (docs/fashion_mnist.md)"),
    ("lr",           "XS/1", "*",    3e-4,  "Fashion-MNIST latent search (docs/fashion_mnist.md)"),
    ("g_lr_ratio",   "XS/1", "*",    2.0,   "Fashion-MNIST latent search (docs/fashion_mnist.md)"),
    ("ema_decay",    "XS/1", "*",    0.995, "Fashion-MNIST latent search (docs/fashion_mnist.md)"),
    ("ot_scale",     "XS/1", "*",    0.2,   "Fashion-MNIST latent search (docs/fashion_mnist.md)"),
    ("ot_scale_end", "XS/1", "*",    0.1,   "Fashion-MNIST latent search (docs/fashion_mnist.md)"),
    ("ot_decay_steps", "XS/1", "*",  1500,  "Fashion-MNIST latent search (docs/fashion_mnist.md)"),
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
    ("g_lr_ratio",   "*",   "*",     1.0,   "Table 11: one lr for both players (a depth-repeated G's divided by the "
                                            "repetition: 56 layers G 5e-5, 112 layers 2.5e-5, with D 1e-4; 'lr / "
                                            "depth', train_afm_1nfe_deep.yaml)"),
    ("cg_scale",     "*",   "multi", 0.02,  "Table 11, stage 4 of the 2- and 4-step models"),
    ("cg_scale",     "*",   "*",     0.003, "Table 11, stage 4 of the one-step models; Table 3"),
    ("cg_time",      "*",   "multi", (0.0, 0.25), "Table 11: guided target times [0] (2 steps), [0, 0.25] (4 steps); "
                                           "the paper guides no other few- or any-step model"),
    ("cg_time",      "*",   "*",     (0.0, 0.1), "Table 3's best range of t' (U(0, 0.1)); Table 11, stage 4"),
    ("aug_p",        "*",   "*",     0.4,   "Table 11, stage 4: D's augmentation in the guided stage (Algorithm 1); "
                                            "taken with --classifier only, else 0"),
]


def mode_labels(nfe, repeat):
    return {"*", nfe} | ({"multi"} if nfe != "1" else set()) | ({f"R{repeat}"} if repeat > 1 else set())


def paper_default(flag, model, nfe, repeat):
    labels = mode_labels(nfe, repeat)
    return next(value for f, size, mode, value, _ in DEFAULTS if f == flag and size in ("*", model) and mode in labels)


def defaults_help(flag):
    """'0.25 (multi), 0.2 (*)' for the argparse help: the table, not a copy of it."""
    return ", ".join(f"{value} ({mode if size == '*' else size})" for f, size, mode, value, _ in DEFAULTS if f == flag)


def fill_defaults(args):
    """The paper's value (DEFAULTS) for every such flag left unset; a constant schedule holds --ot-scale. Returns a
    note for the log where a default follows from another flag."""
    pick = lambda flag: paper_default(flag, args.model, args.nfe, args.repeat)
    for flag in ("global_batch_size", "max_steps", "lr", "ema_decay", "ot_decay_steps", "grad_clip", "cg_scale"):
        if getattr(args, flag) is None:
            setattr(args, flag, pick(flag))
    if args.ot_schedule == "constant":
        args.ot_scale = args.ot_scale_end = args.ot_scale if args.ot_scale is not None else pick("ot_constant")
    args.ot_scale = args.ot_scale if args.ot_scale is not None else pick("ot_scale")
    args.ot_scale_end = args.ot_scale_end if args.ot_scale_end is not None else pick("ot_scale_end")
    args.lr_g = args.lr_g if args.lr_g is not None else args.lr * pick("g_lr_ratio") / args.repeat  # Table 11
    args.cg_time = tuple(args.cg_time) if args.cg_time is not None else pick("cg_time")
    if args.aug_p is None:                                     # the guided stage pairs guidance with augmentation
        args.aug_p = pick("aug_p") if args.classifier else 0.0
        if args.classifier:
            return f"--aug-p {args.aug_p}: D's augmentation of the guided stage (Table 11), as --classifier is given"
    return None


def network_config(model, nfe, repeat, data):
    """Everything that decides the networks' shapes: what a checkpoint must match to be resumed."""
    g_flags, d_flags = mode_flags(nfe, repeat)
    shape = network_shape(model, data)
    return dict(G=dict(shape, **g_flags), D=dict(shape, **d_flags), nfe=nfe)


# The panels of RESULTS/curves.png (checkpoint.LoopTail): title, the statistics drawn, log scale.
CURVES = [("D and G loss", ["loss_d", "loss_g"], False), ("logit gap: logits_real - logits_fake", ["logit_gap"], False),
          ("R1 and R2", ["r1", "r2"], True), ("lambda_ot and the OT cost", ["ot_scale", "ot"], True),
          ("grad_rms: the RMS GradNorm divides by", ["grad_rms"], True)]


#################################################################################
#                                Training hooks                                 #
#################################################################################

def load_guidance(args, data, device):
    """Classifier guidance with the frozen classifier of --classifier, checked against the data it must classify: their
    shape, and the space (VAE, latent scale, image size, classes) of the data it was trained on."""
    C, info = load_classifier(args.classifier)
    shape = (C.input_size, C.in_channels, C.final_layer[1].out_features)
    if shape != (data.size, data.channels, data.num_classes):
        fail(f"{args.classifier} classifies {shape[1]} x {shape[0]} x {shape[0]} inputs of {shape[2]} classes, "
             f"but the data are {data.channels} x {data.size} x {data.size} of {data.num_classes}")
    differ = data_differences(info, data.info, SPACE)
    if differ:
        fail(f"{args.classifier} was trained on other data than --data-path {args.data_path}: {', '.join(differ)}")
    return Guidance(C.to(device), args.cg_scale, args.cg_time)


def make_fid_evaluator(args, data, device):
    """Loads the Inception network, the VAE and the reference statistics once, and sends one sample-shaped batch down
    the path the samples take (decoded, as RGB like sample.py --npz writes them) so that a mismatch ends the run
    before it trains; returns G -> FID of its samples."""
    if not (args.fid_ref and args.inception):
        fail("--fid-every needs --fid-ref (statistics, image npz or folder) and --inception (weights file)")
    if args.fid_samples < max(2, data.num_classes):
        fail(f"--fid-samples {args.fid_samples} must be at least the number of classes ({data.num_classes}) and 2")
    check_input(args.inception, "--inception")
    decode = make_decoder(data.info, args.vae_weights, device)
    try:
        inception = fid.load_inception(args.inception, device)
        ref = fid.compute_stats(args.fid_ref, inception, batch_size=args.fid_batch_size)
        with torch.no_grad():
            probe = to_uint8(decode(torch.zeros(1, data.channels, data.size, data.size, device=device)))
            features = inception(rgb(probe))[0]
    except (FileNotFoundError, fid.UserError) as e:
        fail(str(e))
    if ref[0].shape != features.shape[1:]:
        fail(f"--fid-ref {args.fid_ref} holds statistics of {ref[0].shape[0]} features; Inception gives "
             f"{features.shape[1]}")

    def evaluate(G, steps):
        """FID of --fid-samples class-balanced samples, sharded over ranks, against the reference."""
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        labels = class_balanced_labels(args.fid_samples, data.num_classes)
        indices = list(range(rank, args.fid_samples, world))
        batches = (rgb(images) for _, images, _ in generate(G, steps, decode, indices, labels, args.global_seed,
                                                         args.fid_batch_size, device))
        stats, _ = fid.extract_features(batches, inception)  # summed over ranks
        return fid.frechet_distance(*stats.mean_cov(), *ref)
    return evaluate


def make_players(args, config, device, world, guidance=None):
    """G, D and the EMA of G (the same initial weights on every rank), AdamW and the gradient normalisation: what a
    checkpoint holds; and the two steps bound to them. Only the player being trained runs through DDP: D's step calls
    the bare G without gradients, and G's step calls the bare, frozen D, so neither wrapper ever waits for gradients
    that do not come. DDP's gradients are views of its all-reduce buckets (no second copy), and torch.compile wraps DDP,
    not the reverse, so that the compiled backward is split at bucket boundaries and the all-reduces overlap it."""
    torch.manual_seed(args.global_seed)
    G, D = Generator(**config["G"]).to(device), Discriminator(**config["D"]).to(device)
    adamw = dict(betas=(0.0, 0.9), eps=1e-8, weight_decay=0.01, fused=True)  # Table 10; one fused kernel, CPU or GPU
    opt_G = torch.optim.AdamW(G.parameters(), lr=args.lr_g, **adamw)
    opt_D = torch.optim.AdamW(D.parameters(), lr=args.lr, **adamw)
    EMA, grad_norm = deepcopy(G).requires_grad_(False), GradNorm().to(device)
    state = dict(G=G, D=D, EMA=EMA, opt_G=opt_G, opt_D=opt_D, grad_norm=grad_norm)
    ddp = lambda m: DDP(m, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True)
    compiled = torch.compile if args.compile else (lambda m: m)
    G_train, D_train = (compiled(ddp(m)) for m in (G, D)) if world > 1 else (compiled(G), compiled(D))
    G_fwd, D_fwd = (compiled(G), compiled(D)) if world > 1 else (G_train, D_train)
    players = dict(velocity=G.use_t_src, d_time=D.use_t, aug_p=args.aug_p, grad_clip=args.grad_clip,
                   bf16=args.precision == "bf16")
    d_step = DStep(G_fwd, D_train, opt_D, gp_scale=args.gp_scale, gp_eps=args.gp_eps, gp_ratio=args.gp_ratio,
                   cp_scale=args.cp_scale, **players)
    return state, d_step, GStep(G_train, D_fwd, opt_G, grad_norm, guidance=guidance, **players)


#################################################################################
#                                   Benchmark                                   #
#################################################################################
# Peak dense matmul throughput (TFLOP/s) per precision of the GPUs this is meant for; elsewhere the benchmark measures
# a large matmul itself. fp32 runs TF32 matmuls on these GPUs, as training does.
PEAK_TFLOPS = {"H100": dict(fp32=494.7, bf16=989.4), "H200": dict(fp32=494.7, bf16=989.4),
               "A100": dict(fp32=156.0, bf16=312.0)}


def forward_macs(depth, hidden_size, patch_size, input_size, in_channels, repeat=1, **_):
    """Multiply-accumulates of one forward pass of one image: patch embedding, blocks (qkv, projection and MLP: 12 d^2
    per token; attention: 2 T^2 d), the output layer. DiT-B/2 on 32 x 32 latents: 22.9 G (the paper's ~23), XL/2 118."""
    T = (input_size // patch_size) ** 2
    patch = T * patch_size ** 2 * in_channels * hidden_size
    return 2 * patch + repeat * depth * (12 * T * hidden_size ** 2 + 2 * T ** 2 * hidden_size)


def peak_flops(device, precision):
    """(FLOP/s, where the number comes from): the table's value for a known GPU, else a measured 2048^3 matmul."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    for key, peaks in PEAK_TFLOPS.items():
        if key in name:
            return peaks[precision] * 1e12, f"{name}'s {precision} peak"
    a = torch.randn(2048, 2048, device=device, dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
    seconds = timed(lambda: a @ a, device, 5)
    return 2 * 2048 ** 3 / seconds, f"a measured {precision} 2048^3 matmul on {name}"


def timed(fn, device, n):
    """Seconds per call of fn, after one warm-up call, the device synchronised around the n timed calls."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    tic = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    return (time.perf_counter() - tic) / n


class RandomLatents:
    """LatentData's interface over random values, for the benchmark: ImageNet-256 latents of the SD VAE by default."""
    def __init__(self, channels=4, size=32, num_classes=1000, info=None):
        self.channels, self.size, self.num_classes = channels, size, num_classes
        self.info = info or dict(vae="sd-vae-ft-mse", scale=SCALE)

    def sample(self, n, generator=None):
        x = torch.randn(n, self.channels, self.size, self.size, generator=generator)
        return x, torch.randint(self.num_classes, (n,), generator=generator)


def benchmark(args):
    """Training images/s (each player's batch counted once: 2 x the global batch per iteration), the model FLOP
    utilisation by the paper's cost model (one D+G iteration ~ 14.5 forward passes: D's step G + 2.5 x 3 D, G's step
    3 G + D + 2 D, the last D backward to its input only), peak memory, sampling images/s with and without VAE
    decoding and, with --inception, the FID Inception's images/s, on this device, for --model, --nfe, --repeat,
    --global-batch-size, --precision and --compile."""
    device, rank, world = setup_distributed(args.device)
    fill_defaults(args)
    batch_size, iters = per_rank_batch(args.global_batch_size, world), args.benchmark
    torch.backends.cuda.matmul.fp32_precision = torch.backends.cudnn.conv.fp32_precision = "tf32"
    data = LatentData(args.data_path) if args.data_path else RandomLatents()
    check_batch_memory(batch_size, (data.channels, data.size, data.size))
    config = network_config(args.model, args.nfe, args.repeat, data)
    state, d_step, g_step = make_players(args, config, device, world)
    reader = BatchReader(data, batch_size, afm_batch, torch.Generator(), device, nfe=args.nfe)

    def iteration():
        d_step(reader.next())
        g_step(reader.next(), 0.1)
    iteration()                                                # compilation, allocator, kernel selection
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = timed(iteration, device, iters)
    reader.close()
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda" else
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2 ** 30
    macs = 4 * forward_macs(**config["G"]) + 10.5 * forward_macs(**config["D"])   # 14.5 passes when G = D
    flops, source = peak_flops(device, args.precision)
    mfu = 2 * macs * args.global_batch_size / seconds / world / flops

    G, decode, inception = state["EMA"].eval(), None, None
    z, y = torch.randn(batch_size, data.channels, data.size, data.size, device=device), torch.arange(batch_size) % 10
    y, steps, latents = y.to(device) % data.num_classes, default_steps(args.nfe), data.info.get("vae", "none") != "none"
    with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=args.precision == "bf16"):
        one_step = timed(lambda: sample(G, z, y, steps), device, iters)
        if latents:                                            # random weights time the same as the real ones
            ae = data.info["vae"] == "ae"                      # the small autoencoder's config is in info.json
            vae = (SmallAE(**data.info["ae"]["config"]) if ae else AutoencoderKL()).to(device).eval()
            decode = timed(lambda: vae.decode(sample(G, z, y, steps)), device, max(1, iters // 5))
    if args.inception:                                         # what an FID evaluation costs per image
        try:
            net = fid.load_inception(args.inception, device)
        except (FileNotFoundError, fid.UserError) as e:
            fail(str(e))
        size = data.info.get("image_size", data.size * (8 if latents else 1))
        images = torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8, device=device)
        with torch.no_grad():
            inception = timed(lambda: net(images), device, max(1, iters // 5))
    if rank == 0:
        print(f"{args.model} nfe {args.nfe} repeat {args.repeat}, {world} x {device.type}, batch {batch_size}/rank, "
              f"{args.precision}{', compiled' if args.compile else ''}: training {2 * args.global_batch_size / seconds:.4g}"
              f" images/s ({1 / seconds:.4g} it/s), MFU {100 * mfu:.3g}% of {source}, peak memory {peak:.2f} GiB "
              f"({'allocated' if device.type == 'cuda' else 'RSS'}); sampling {world * batch_size / one_step:.4g} images/s"
              + (f", {world * batch_size / decode:.4g} with VAE decoding" if decode else "")
              + f" ({steps} step{'s' * (steps > 1)})"
              + (f"; Inception {world * batch_size / inception:.4g} images/s" if inception else ""))


def main(args):
    # Setup: processes and devices; flags left unset take the paper's values.
    device, rank, world = setup_distributed(args.device)
    note = fill_defaults(args)
    batch_size = per_rank_batch(args.global_batch_size, world)
    stop = StopOnSignal()
    torch.backends.cuda.matmul.fp32_precision = torch.backends.cudnn.conv.fp32_precision = "tf32"  # as the official code

    # Inputs: data, checkpoint and evaluation files are all checked before the run writes anything.
    data = LatentData(args.data_path)
    check_batch_memory(batch_size, (data.channels, data.size, data.size))
    check_vae_weights(data.info, args.vae_weights)
    config = network_config(args.model, args.nfe, args.repeat, data)
    starts = load_starts(args, config, args.max_steps, data.info)
    guidance = load_guidance(args, data, device) if args.classifier else None
    evaluate_fid = make_fid_evaluator(args, data, device) if args.fid_every else None
    write_grids = (make_grid_writer(args, data, device, default_steps(args.nfe), args.ema_decay) if args.sample_every
                   else None)

    # Models and start: fresh, the exact continuation of a run (--resume), or a new stage of one (--init, --init-d).
    state, d_step, g_step = make_players(args, config, device, world, guidance)
    check_checkpoint_room(state, args.results_dir)             # a run that could not save fails before it writes
    logger = create_logger(args.results_dir if rank == 0 else None)
    G, D, EMA, opt_D = state["G"], state["D"], state["EMA"], state["opt_D"]
    logger.info(f"G {sum(p.numel() for p in G.parameters()):,} parameters, D {sum(p.numel() for p in D.parameters()):,}")
    start, data_rng = start_state(state, starts, args, logger, data.info, device)
    reader = BatchReader(data, batch_size, afm_batch, data_rng, device, nfe=args.nfe)
    tail = LoopTail(stop, state, args, config, data.info, device, logger, args.max_steps, 2 * args.global_batch_size,
                    reader, CURVES)

    # The loop: one D step, one G step, the EMA; logs, checkpoints and FID every so many steps.
    logger.info(f"training {args.model} nfe={args.nfe} repeat={args.repeat} on {world} x {device.type}, batch {batch_size}/"
                f"rank, ot_scale {args.ot_scale}->{args.ot_scale_end}, lr G {args.lr_g} D {args.lr}, clip {args.grad_clip}")
    if note:
        logger.info(note)
    if round(batch_size * args.gp_ratio) < 1:                  # loss.py's R1/R2 take at least one row
        logger.info(f"note: R1/R2 see 1 row of each rank's batch of {batch_size} (--gp-ratio {args.gp_ratio} of it is "
                    "less than one)")
    for step in tqdm(range(start, args.max_steps), initial=start, total=args.max_steps, disable=rank != 0):
        ot_scale = ot_scale_at(step, args.ot_scale, args.ot_scale_end, args.ot_decay_steps)
        stats = d_step(reader.next())
        stats |= g_step(reader.next(), ot_scale)
        update_ema(EMA, G, args.ema_decay)
        if args.ema_reload_every and (step + 1) % args.ema_reload_every == 0:
            reload_ema(G, EMA)
        stats |= dict(logit_gap=stats["logits_real"] - stats["logits_fake"],  # D's margin, and what GradNorm divides by
                      grad_rms=state["grad_norm"].square_avg.sqrt())
        done = tail(step, stats, dict(ot_scale=ot_scale, aug_p=args.aug_p, lr=opt_D.param_groups[0]["lr"]))
        if write_grids is not None and done % args.sample_every == 0:
            write_grids(done, dict(ema=EMA, g=G))
        if evaluate_fid is not None and done % args.fid_every == 0:
            t0, steps = time.time(), default_steps(args.nfe)
            logger.info(f"step {done:07d} FID-{args.fid_samples} {evaluate_fid(EMA, steps):.4f} (EMA, {steps} steps)")
            tail.tic += time.time() - t0                       # keep sampling time out of img/s

    # End: every rank must hold the same weights, a cheap proof that DDP kept the players in step.
    tail.finish([G, D])


def make_parser():
    parser = argparse.ArgumentParser(description="Train an adversarial flow model. Unset defaults: train.DEFAULTS.")
    parser.add_argument("--data-path", type=str, default=None, help="directory written by prepare_latents.py")
    parser.add_argument("--results-dir", type=str, default="results")
    parser.add_argument("--model", type=str, choices=list(SIZES), default="B/2")
    parser.add_argument("--nfe", type=parse_nfe, default="1", help="1 (one step), k >= 2 (a k-step model; the paper's "
                        "are 2 and 4) or any (any number of steps)")
    parser.add_argument("--repeat", type=int, choices=[1, 2, 4], default=1, help="depth repetition R of a one-step "
                        "generator (the paper's R2 and R4 rows in DEFAULTS: G's lr / R)")
    parser.add_argument("--global-batch-size", type=positive_int, default=None,
                        help=f"split over the ranks ({defaults_help('global_batch_size')})")
    parser.add_argument("--global-seed", type=seed, default=0)
    parser.add_argument("--max-steps", type=positive_int, default=None,
                        help=f"iterations of one D step and one G step ({defaults_help('max_steps')})")
    parser.add_argument("--lr", type=number(lo_open=True), default=None,
                        help=f"D's lr, and G's unless --lr-g ({defaults_help('lr')})")
    parser.add_argument("--lr-g", type=number(lo_open=True), default=None,
                        help=f"G's lr (default: --lr x {defaults_help('g_lr_ratio')} / --repeat)")
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
    add_run_args(parser, ckpt_every=10_000)
    parser.add_argument("--sample-every", type=count, default=0, help="write sample grids of the EMA and of G to "
                        "RESULTS/samples every N steps (0: never)")
    parser.add_argument("--fid-every", type=count, default=0, help="score the EMA every N steps (0: never)")
    parser.add_argument("--fid-samples", type=integer(1, 10_000_000), default=50_000)   # FID-50K, as the paper
    parser.add_argument("--fid-ref", type=str, default=None, help="reference statistics/images, e.g. ADM's npz")
    parser.add_argument("--inception", type=str, default=None, help="FID Inception weights file")
    parser.add_argument("--vae-weights", type=str, default=None, help="sd-vae-ft-mse weights, to decode samples "
                        "(or the train_ae.py checkpoint that encoded the latents)")
    parser.add_argument("--fid-batch-size", type=positive_int, default=64, help="per rank")
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
    parser.add_argument("--aug-p", type=number(0, 1), default=None, help="discriminator augmentation probability "
                        f"(default: 0; with --classifier {defaults_help('aug_p')})")
    # D stays in fp32 (TF32 matmuls on GPU) with bf16 too: R1/R2 are finite differences of logits eps = 0.01 apart,
    # and bf16's rounding of the logits (measured on latents: an error about 20x the difference) would drown them.
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="fp32 (TF32 matmuls on GPU, the paper's setting) or bf16 autocast for G (on GPU or CPU), "
                             "D staying fp32; the paper (App. D) found bf16 needs QK-norm for stability at 256 px")
    parser.add_argument("--compile", action="store_true", help="torch.compile both networks")
    parser.add_argument("--benchmark", type=positive_int, nargs="?", const=10, default=0, metavar="ITERATIONS",
                        help="instead of training, time ITERATIONS (10) iterations and print training and sampling "
                             "throughput, MFU and peak memory (on --data-path's shape, or ImageNet-256 latents)")
    return parser


if __name__ == "__main__":
    parser = make_parser()
    args = parser.parse_args()
    if args.data_path is None and not args.benchmark:
        parser.error("--data-path is required")
    if args.repeat > 1 and args.nfe != "1":
        parser.error("--repeat is for one-step models (--nfe 1)")
    if args.cg_time is not None and args.cg_time[0] > args.cg_time[1]:
        parser.error("--cg-time LO HI needs LO <= HI")
    if args.classifier is None and args.cg_scale is not None:
        parser.error("--cg-scale needs --classifier")
    if args.ot_schedule == "constant" and args.ot_scale_end is not None:
        parser.error("--ot-scale-end is the end of the cosine schedule; a constant schedule holds --ot-scale")
    run(benchmark if args.benchmark else main, args, errors=(fid.UserError,))
