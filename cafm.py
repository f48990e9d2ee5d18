"""
Post-trains a flow model with Continuous Adversarial Flow Models (CAFM, Lin et al., https://arxiv.org/abs/2604.11521)
on a data directory made by prepare_latents.py. G, a velocity field of one time, starts from a flow-matching model:
the official SiT-XL/2 checkpoint (SiT-XL-2-256.pt of https://github.com/willisma/SiT) or a `twinflow.py --terms real`
checkpoint of this project. D, a scalar potential, starts from the same weights (a new token and head, RMSNorm in
its blocks). The objective is loss.py's CAFM section; the recipe is the official train_cafm_sit.yaml.

    python cafm.py --model XL/2 --data-path data/imagenet256 --init SiT-XL-2-256.pt                           # one GPU
    torchrun --nproc_per_node=8 cafm.py --model XL/2 --data-path data/imagenet256 --init SiT-XL-2-256.pt     # eight GPUs
    python cafm.py --data-path data/fmnist --init runs/fm/checkpoints/0006000.pt --device cpu --global-batch-size 64 \\
        --max-steps 3000 --warmup 500 --n-dis 4 --lr-g 1e-4 --lr-d 1e-4                    # docs/results.md's CPU run
    python sample.py --ckpt results/cafm/checkpoints/0003000.pt --steps 8 [--sampler heun] [--cfg-scale 1.5]

Where this differs from the official trainer, and why:
- One batch is drawn per step, from one reader (the official has a loader for D steps and another for G steps).
- The G step runs D unwrapped and frozen, and the D step runs G without gradients, as AFM's steps here do: DDP then
  wraps the network that is trained in each step and nothing else.
- Checkpoints hold G, D, the EMA and both optimizers; sample.py draws from the EMA unless --weights G.
"""
import argparse
from copy import deepcopy

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from checkpoint import (LoopTail, cafm_discriminator, load_checkpoint, load_sit, load_starts, load_weights,
                        start_state)
from common import (StopOnSignal, add_run_args, check_batch_memory, count, create_logger, fail, number, per_rank_batch,
                    positive_int, run, seed, setup_distributed)
from data import BatchReader, LatentData, check_vae_weights, make_grid_writer
from loss import (FlowDerivative, cafm_batch, cafm_discriminator_loss, cafm_generator_loss, cafm_is_d_step,
                  update_ema)
from model import SIZES, Discriminator, Generator, cafm_discriminator_kwargs

GRAD_CLIP = 1e4         # train_cafm_sit.yaml: gradient_clip and dis_gradient_clip, for both players
BETAS = (0.0, 0.95)     # train_cafm_sit.yaml: AdamW betas, no weight decay
CURVES = [("D and G loss", ["loss_d", "loss_g"], False), ("centering and OT", ["loss_cp", "loss_ot"], True),
          ("G's logits", ["logits_g"], False), ("gradient norms", ["grad_norm_d", "grad_norm_g"], True)]  # curves.png


#################################################################################
#                           The starting flow model                             #
#################################################################################

def load_flow(path, model):
    """(size, G's kwargs, G's weights) of the flow model: a flow-matching checkpoint of this project (its EMA) or the
    official SiT format."""
    ckpt = load_checkpoint(path)
    if not (isinstance(ckpt, dict) and "config" in ckpt):
        G, kwargs, _ = load_sit(path, model or "XL/2")
        return model or "XL/2", kwargs, G.state_dict()
    flow = ckpt["config"].get("F", {})
    if not flow.get("use_t_src") or flow.get("use_t_tgt") or "EMA" not in ckpt:
        fail(f"{path} is not a flow-matching checkpoint (twinflow.py --terms real) nor a SiT one")
    if model and model != ckpt["args"]["model"]:
        fail(f"{path} holds a --model {ckpt['args']['model']} flow model, not --model {model}")
    return ckpt["args"]["model"], dict(flow), ckpt["EMA"]


def share(batch_of, rank, world):
    """batch_of(x, y, generator) for the global batch, cut to this rank's share: every rank draws the whole batch from
    the same stream, so any number of ranks trains on the batches of one process."""
    return lambda x, y, generator: {k: v.chunk(world)[rank] for k, v in batch_of(x, y, generator).items()}


#################################################################################
#                                    Training                                   #
#################################################################################

def main(args):
    # Setup: processes, devices, data, the networks' config and the checkpoint to resume, before anything is written.
    device, rank, world = setup_distributed(args.device)
    batch_size = per_rank_batch(args.global_batch_size, world)
    stop = StopOnSignal()
    torch.backends.cuda.matmul.fp32_precision = torch.backends.cudnn.conv.fp32_precision = "tf32"
    data = LatentData(args.data_path)
    check_batch_memory(batch_size, (data.channels, data.size, data.size))
    check_vae_weights(data.info, args.vae_weights)
    if args.resume:                                            # the networks are the resumed run's; --init not read
        ckpt = load_checkpoint(args.resume)
        if not isinstance(ckpt, dict) or ckpt.get("config", {}).get("method") != "cafm":
            fail(f"--resume {args.resume} is not a checkpoint of cafm.py")
        args.model, config, g_state = ckpt["args"]["model"], ckpt["config"], None
    elif not args.flow:
        fail("cafm.py starts from a flow model (--init FM.pt or SiT-XL-2-256.pt) or continues a run (--resume)")
    else:
        args.model, g_kwargs, g_state = load_flow(args.flow, args.model)
        config = dict(G=g_kwargs, D=cafm_discriminator_kwargs(g_kwargs), nfe="any", method="cafm")
    null_class = config["G"]["num_classes"] - 1 if config["G"].get("null_class") else None
    shape = tuple(config["G"][k] for k in ("input_size", "in_channels", "num_classes"))
    if shape != (data.size, data.channels, data.num_classes + (null_class is not None)):
        fail(f"the flow model's (size, channels, classes) are {shape}: --data-path {args.data_path} holds "
             f"{(data.size, data.channels, data.num_classes)}" + (" and the null class" if null_class else ""))
    starts = load_starts(args, config, args.max_steps, data.info)
    write_grids = make_grid_writer(args, data, device, steps=8) if args.sample_every else None

    # G and its EMA from the flow model, D from its trunk (or all from --resume); AdamW for both players.
    logger = create_logger(args.results_dir if rank == 0 else None)
    if not args.resume:
        logger.info(f"--init {args.flow}: a {args.model} flow model")
    torch.manual_seed(args.global_seed)
    G = Generator(**config["G"])
    D = Discriminator(**config["D"]) if g_state is None else cafm_discriminator(config["G"], g_state)
    if g_state is not None:
        load_weights(G, g_state, args.flow)
    G, D = G.to(device), D.to(device)
    EMA = deepcopy(G).requires_grad_(False)
    opt_G = torch.optim.AdamW(G.parameters(), lr=args.lr_g, betas=BETAS, weight_decay=0.0)
    opt_D = torch.optim.AdamW(D.parameters(), lr=args.lr_d, betas=BETAS, weight_decay=0.0)
    state = dict(G=G, D=D, EMA=EMA, opt_G=opt_G, opt_D=opt_D)  # what a checkpoint holds
    logger.info(f"G {sum(p.numel() for p in G.parameters()):,} parameters, D {sum(p.numel() for p in D.parameters()):,}")

    # Start: fresh, or the exact continuation of a run.
    start, data_rng = start_state(state, starts, args, logger, data.info, device)
    if len(starts.get("resume", {}).get("rng", ())) != world:  # not a resumed stream: the one all ranks share
        data_rng.manual_seed(args.global_seed * 1_000_003 + start + 2 ** 32)
    batch_of = lambda x, y, generator: cafm_batch(x, y, generator, null_class, args.label_dropout)
    reader = BatchReader(data, args.global_batch_size, share(batch_of, rank, world), data_rng, device)
    tail = LoopTail(stop, state, args, config, data.info, device, logger, args.max_steps, args.global_batch_size,
                    reader, CURVES)
    ddp = lambda m: DDP(m, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else m
    DJ = FlowDerivative(D)                                     # G's step: the bare, frozen D
    DJ_train, G_train = ddp(DJ), ddp(G)                        # each player's own step: DDP averages its gradients
    trainable_D = [p for p in D.parameters() if p.requires_grad]

    # The loop: D alone for --warmup steps, then --n-dis D steps per G step; the EMA follows G's steps.
    logger.info(f"training CAFM {args.model} on {world} x {device.type}, batch {batch_size}/rank, {args.max_steps} "
                f"steps: D alone to step {args.warmup}, then {args.n_dis} D steps per G step; lr G {args.lr_g}, "
                f"D {args.lr_d}, cp {args.cp_scale}, ot {args.ot_scale}, label dropout "
                f"{args.label_dropout if null_class is not None else 'none (no null class)'}")
    for step in tqdm(range(start, args.max_steps), initial=start, total=args.max_steps, disable=rank != 0):
        x_t, v_real, y, t = reader.next().values()
        if cafm_is_d_step(step, args.warmup, args.n_dis):
            with torch.no_grad():
                v_fake = G(x_t, y, t)
            loss, stats = cafm_discriminator_loss(DJ_train, x_t, y, t, v_real, v_fake, args.cp_scale)
            loss.backward()
            stats["grad_norm_d"] = torch.nn.utils.clip_grad_norm_(D.parameters(), GRAD_CLIP)
            opt_D.step()
            opt_D.zero_grad(set_to_none=True)
        else:
            for p in trainable_D:
                p.requires_grad_(False)
            loss, stats = cafm_generator_loss(DJ, x_t, y, t, G_train(x_t, y, t), args.ot_scale)
            loss.backward()
            for p in trainable_D:
                p.requires_grad_(True)
            stats["grad_norm_g"] = torch.nn.utils.clip_grad_norm_(G.parameters(), GRAD_CLIP)
            opt_G.step()
            opt_G.zero_grad(set_to_none=True)
            update_ema(EMA, G, args.ema_decay)
        done = tail(step, {k: v.detach() for k, v in stats.items()})
        if write_grids is not None and done % args.sample_every == 0:
            write_grids(done, dict(ema=EMA, g=G))
    tail.finish([G, D])


def make_parser():
    parser = argparse.ArgumentParser(description="Post-train a flow model with CAFM (train_cafm_sit.yaml's values).")
    parser.add_argument("--data-path", type=str, required=True, help="directory written by prepare_latents.py")
    parser.add_argument("--init", dest="flow", type=str, default=None, help="the flow model: a twinflow.py --terms "
                        "real checkpoint, or SiT's format (SiT-XL-2-256.pt, with --model XL/2); not read with --resume")
    parser.add_argument("--results-dir", type=str, default="results/cafm")
    parser.add_argument("--model", type=str, choices=list(SIZES), default=None,
                        help="size of a SiT-format --init (default XL/2); a checkpoint of ours knows its own")
    parser.add_argument("--global-batch-size", type=positive_int, default=256)          # exp.bsz
    parser.add_argument("--global-seed", type=seed, default=0)
    parser.add_argument("--max-steps", type=positive_int, default=1_000_000)            # training.steps
    parser.add_argument("--lr-g", type=number(lo_open=True), default=1e-5)              # optimizer.gen_lr
    parser.add_argument("--lr-d", type=number(lo_open=True), default=1e-5)              # optimizer.dis_lr
    parser.add_argument("--warmup", type=count, default=10_000,                         # adversarial.warmup
                        help="D alone up to this step (2 ImageNet epochs at batch 256)")
    parser.add_argument("--n-dis", type=positive_int, default=16, help="D steps per G step")  # adversarial.N
    parser.add_argument("--cp-scale", type=number(), default=0.001, help="weight of D(x_t)^2")  # adversarial.cp_scale
    parser.add_argument("--ot-scale", type=number(), default=0.0, help="weight of mean(v^2) in G's loss")  # ot_scale
    parser.add_argument("--label-dropout", type=number(0, 1), default=0.1, help="share of labels dropped to the null "
                        "class, for a G that has one (gen.dropout)")
    parser.add_argument("--ema-decay", type=number(0, 1, hi_open=True), default=0.99)   # ema.decay
    add_run_args(parser, ckpt_every=25_000)  # persistence.interval
    parser.add_argument("--sample-every", type=count, default=0, help="write 8-step sample grids of the EMA and G to "
                        "RESULTS/samples every N steps (0: never)")
    parser.add_argument("--vae-weights", type=str, default=None, help="the data's decoder (sd-vae-ft-mse or a "
                        "train_ae.py checkpoint), to decode grids")
    return parser


if __name__ == "__main__":
    run(main, make_parser().parse_args())
