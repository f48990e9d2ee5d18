"""
Trains TwinFlow (Cheng et al., https://arxiv.org/abs/2512.05150), the other one-step method of this project's
sources, on a data directory made by prepare_latents.py: one network and no discriminator or teacher. The network
F(x_t, y, t, t_tgt) is model.py's DiT generator with both times as inputs (negative times allowed). The loss terms
are loss.twinflow_losses, the ones toy.py trains its MLP with.

    python twinflow.py --model B/2 --data-path data/imagenet256                          # one GPU
    torchrun --nproc_per_node=8 twinflow.py --model B/2 --data-path data/imagenet256     # eight GPUs
    python twinflow.py --model XS/7 --data-path data/fmnist --global-batch-size 64 --max-steps 9000 --device cpu
    python sample.py --ckpt results/twinflow/checkpoints/0009380.pt --steps 2            # 1, 2, 4 ... steps

The recipe is the official from-scratch MNIST tutorial's (https://github.com/inclusionAI/TwinFlow/tree/main/
tutorials/mnist: main.py and methodes.py), with the values below. Where this differs, and why:
- The network is a DiT (the tutorial's is a small UNet), and it outputs the velocity F itself; the tutorial's UNet
  outputs x_t - F. A DiT's zero-initialised output layer then starts at F = 0, the identity map.
- The global batch is split over the ranks, and training is counted in steps (default: the tutorial's 20 epochs).
- The tutorial zeroes NaN gradients (nan_to_num): its RCGM divides by t - t_tgt, which can be 0. loss.rcgm_residual
  writes that branch without the division, so no NaN arises; a non-finite loss stops the run instead.
- Checkpoints keep the online network (G) and the EMA; sample.py draws from the EMA unless --weights G (the tutorial
  samples its online network; with decay 0.99 the two are close).
"""
import argparse
import math
from copy import deepcopy

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from checkpoint import LoopTail, check_checkpoint_room, load_starts, start_state
from common import (StopOnSignal, add_run_args, check_batch_memory, count, create_logger, fail, number, per_rank_batch,
                    positive_int, run, seed, setup_distributed)
from data import BatchReader, LatentData, check_vae_weights, make_grid_writer, network_shape
from loss import TWINFLOW_TERMS, twinflow_batch, twinflow_ema_decay, twinflow_losses, update_ema
from model import SIZES, Generator, mode_flags

EPOCHS = 20             # tutorial main.py: 20 epochs of MNIST at batch 128 (9,380 steps)


#################################################################################
#                                  The objective                                #
#################################################################################

class TwinFlowLoss(torch.nn.Module):
    """The loss terms as one call of one module. F runs several times per step, and DDP wants one forward call per
    backward: wrapped in DDP, this is that call, and the gradients of all the terms are averaged over the ranks once."""
    def __init__(self, F_net):
        super().__init__()
        self.F = F_net

    def forward(self, EMA, batch, cfg_ratio, terms):
        return twinflow_losses(self.F, EMA, **batch, cfg_ratio=cfg_ratio, terms=terms)


#################################################################################
#                                    Training                                   #
#################################################################################

def main(args):
    # Setup: processes, devices, data, the network config and the checkpoint to resume, before anything is written.
    if len(set(args.terms)) < len(args.terms):
        fail(f"--terms {' '.join(args.terms)} names a term twice")
    if not {"base", "real", "base_one_step"} & set(args.terms):  # F starts at 0 (DiT's zero-initialised output)
        fail(f"--terms {' '.join(args.terms)}: fake and rectify learn only from F's own samples, their loss is 0 from "
             "the start and stays 0; add base, real or base_one_step")
    device, rank, world = setup_distributed(args.device)
    batch_size = per_rank_batch(args.global_batch_size, world)
    stop = StopOnSignal()
    torch.backends.cuda.matmul.fp32_precision = torch.backends.cudnn.conv.fp32_precision = "tf32"
    data = LatentData(args.data_path)
    check_batch_memory(batch_size, (data.channels, data.size, data.size))
    check_vae_weights(data.info, args.vae_weights)
    # Flow matching alone (--terms real) learns a velocity of (x_t, t) only: its network takes no target time, and
    # sampling is then plain Euler steps of that velocity (the control of the Fashion-MNIST results).
    flags = mode_flags("any")[0] if set(args.terms) != {"real"} else dict(mode_flags("2")[0])
    config = dict(F=dict(network_shape(args.model, data), **flags), nfe="any", terms=list(args.terms))
    max_steps = args.max_steps or math.ceil(EPOCHS * len(data.labels) / args.global_batch_size)
    starts = load_starts(args, config, max_steps, data.info)
    write_grids = make_grid_writer(args, data, device, steps=1) if args.sample_every else None

    # The network F, its EMA (the consistency target) and Adam, the same initial weights on every rank.
    torch.manual_seed(args.global_seed)
    G = Generator(**config["F"]).to(device)
    EMA = deepcopy(G).requires_grad_(False)
    opt = torch.optim.Adam(G.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8)  # main.py:114, Adam's defaults
    state = dict(G=G, EMA=EMA, opt=opt)                       # what a checkpoint holds
    check_checkpoint_room(state, args.results_dir)             # a run that could not save fails before it writes
    logger = create_logger(args.results_dir if rank == 0 else None)
    logger.info(f"F {sum(p.numel() for p in G.parameters()):,} parameters")

    # Start: fresh, or the exact continuation of a run; the EMA's warm-up is a function of the step.
    start, data_rng = start_state(state, starts, args, logger, data.info, device)
    reader = BatchReader(data, batch_size, twinflow_batch, data_rng, device)
    tail = LoopTail(stop, state, args, config, data.info, device, logger, max_steps, args.global_batch_size, reader,
                    [("TwinFlow's terms", list(TWINFLOW_TERMS), True), ("EMA decay", ["ema_decay"], False)])
    decay = 0.0
    for _ in range(start):
        decay = twinflow_ema_decay(decay, args.ema_decay)
    objective = TwinFlowLoss(G)
    objective = DDP(objective, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else objective

    # The loop: the five terms, summed with weight 1 (methodes.py:525), Adam, the EMA with its warm-up.
    logger.info(f"training TwinFlow ({', '.join(args.terms)}) {args.model} on {world} x {device.type}, batch "
                f"{batch_size}/rank, {max_steps} steps "
                f"({max_steps * args.global_batch_size / len(data.labels):.1f} epochs), lr {args.lr}, "
                f"CFG ratio {args.cfg_ratio}")
    for step in tqdm(range(start, max_steps), initial=start, total=max_steps, disable=rank != 0):
        losses = objective(EMA, reader.next(), args.cfg_ratio, args.terms)
        sum(losses.values()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        decay = twinflow_ema_decay(decay, args.ema_decay)     # warm-up (methodes.py:215): 0, 0.495, 0.62, ...
        update_ema(EMA, G, decay)
        done = tail(step, {k: v.detach() for k, v in losses.items()}, dict(ema_decay=decay))
        if write_grids is not None and done % args.sample_every == 0:
            write_grids(done, dict(ema=EMA, g=G))
    tail.finish([G])


def make_parser():
    parser = argparse.ArgumentParser(description="Train TwinFlow: one network, the real flow and its own samples' flow.")
    parser.add_argument("--data-path", type=str, required=True, help="directory written by prepare_latents.py")
    parser.add_argument("--results-dir", type=str, default="results/twinflow")
    parser.add_argument("--model", type=str, choices=list(SIZES), default="B/2")
    parser.add_argument("--global-batch-size", type=positive_int, default=128)            # main.py:19
    parser.add_argument("--global-seed", type=seed, default=0)
    parser.add_argument("--max-steps", type=positive_int, default=None,
                        help=f"default: {EPOCHS} epochs of the data set at the global batch size (main.py:20)")
    parser.add_argument("--lr", type=number(lo_open=True), default=2e-4)                 # main.py:18
    parser.add_argument("--ema-decay", type=number(0, 1, hi_open=True), default=0.99,    # main.py:28, with warm-up
                        help="where the EMA's decay warms up to (the EMA is RCGM's consistency target)")
    parser.add_argument("--cfg-ratio", type=number(), default=0.5,                       # enhanced_ratio, main.py:29
                        help="weight of the EMA's CFG-enhanced velocity target (0: the plain z - x)")
    parser.add_argument("--terms", nargs="+", choices=TWINFLOW_TERMS, default=list(TWINFLOW_TERMS),
                        help="the loss terms summed (default: all five); `--terms real` alone is flow matching")
    add_run_args(parser, ckpt_every=10_000)
    parser.add_argument("--sample-every", type=count, default=0, help="write one-step sample grids of the EMA and "
                        "of F to RESULTS/samples every N steps (0: never)")
    parser.add_argument("--vae-weights", type=str, default=None, help="the data's decoder (sd-vae-ft-mse or a "
                        "train_ae.py checkpoint), to decode grids")
    return parser


if __name__ == "__main__":
    run(main, make_parser().parse_args())
