"""
The paper's 1-D toy (Figures 1 and 2): transport N(0, 1) to four Gaussian modes, learned four ways on one budget --
an adversarial flow model (AFM), TwinFlow (the other one-step method without a teacher: no discriminator, one
network that learns the real flow at t > 0 and its own samples' flow at t < 0), the AFM model without the
optimal-transport loss (a plain GAN), and flow matching (FM) sampled with the same number of Euler steps. AFM and
the GAN use loss.py's losses and steps, as train.py does.

    python toy.py                 # one-step models, about a minute on 2 CPU cores
    python toy.py --nfe 2         # two-step velocity models (--nfe 4 too)
    python toy.py --steps 200 --out-dir /tmp

In 1-D the optimal-transport map is known exactly, the monotone rearrangement T(z) = F^-1(Phi(z)), so each
learned map is scored against it and against the same model trained from a second seed. Writes toy.png (one
panel per model: paths z -> G(z) over the density of x_t) and toy.npz (the maps on a grid of z). Seed 0, one step:
AFM matches the data (W1 0.03) with T's map (error 0.05, 0.02 between seeds); TwinFlow follows T too, but is
still converging after 1,000 steps (W1 0.08); the GAN matches the data with a folded map that another seed folds
differently; flow matching at one step puts every sample near the data mean (W1 0.94). In 1-D the exact
flow-matching ODE is monotone, so it is T too: with enough Euler steps FM would find it; AFM gets there in one.
"""
import argparse
import math
import os
import time
from copy import deepcopy
from functools import partial

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from scipy.special import erf, ndtr, ndtri

from common import check_output, claim, fail, integer, positive_int, release_claims, run, save_atomic, seed
from loss import (DStep, GStep, GradNorm, afm_batch, interpolate, ot_scale_at, rcgm_residual, twinflow_ema_decay,
                  twinflow_losses, update_ema)
from model import transport

# Where the toy departs from train.py's image defaults, and why: a 40k-parameter MLP on 1-D data is not a DiT.
# D's regularisers keep the image defaults (gp_scale 0.25, gp_eps 0.01, gp_ratio 0.25, cp_scale 0.01): 1-D needs them
# as much as latents do (gp_scale 0.01, the official toy notebook's value, doubles the map error in 1,000 steps).
WIDTH, DEPTH, BATCH = 128, 3, 256
LR = 3e-3               # images 1e-4: here 1,000 steps must suffice
EMA_DECAY = 0.99        # images 0.9999: a horizon of ~100 steps in a 1,000-step run
# lambda_ot, cosine from start to end over the run, starting at the images' values (official configs). Images end at 0.005;
# a 1,000-step run ending there lost a mode's balance at one seed in six, so the toy ends at 0.02, and few-step
# models at 0.1 (ending at 0.025 left their maps 0.07-0.11 from T over four seeds, against 0.05-0.06).
OT_SCALE = {1: (0.2, 0.02), "multi": (0.25, 0.1)}

#################################################################################
#                    Data, its exact OT map and the metrics                     #
#################################################################################

MODES, SIGMA = np.array([-1.5, -0.5, 0.5, 1.5]), 0.05


def sample_data(n):
    """(n, 1): one channel, so loss.py's losses, written over (N, ...) tensors, apply as they are."""
    return (torch.from_numpy(MODES).float()[torch.randint(4, (n,))] + SIGMA * torch.randn(n)).view(n, 1)


def mixture_quantile(u, iters=60):
    """F^-1(u) by vectorised bisection, in erf form: F(x) = (1 + mean_k erf((x - mu_k) / (sigma sqrt 2))) / 2. erf is
    odd, so F is as precise left of 0 as right of it. Between modes F is flat to float precision; there the middle of
    the flat stretch is taken (mean of the lower and upper quantiles), so T is odd like the data: T(0) = 0."""
    v = 2 * np.asarray(u, dtype=np.float64) - 1

    def bisect(below):
        lo, hi = np.full(v.shape, -4.0), np.full(v.shape, 4.0)
        for _ in range(iters):
            mid = (lo + hi) / 2
            go_right = below(erf((mid[..., None] - MODES) / (SIGMA * math.sqrt(2))).mean(-1), v)  # F(mid) vs u
            lo, hi = np.where(go_right, mid, lo), np.where(go_right, hi, mid)
        return (lo + hi) / 2
    return (bisect(np.less) + bisect(np.less_equal)) / 2


def ot_map(z):
    """The optimal-transport map in 1-D for any convex cost: the monotone rearrangement T(z) = F^-1(Phi(z))."""
    return mixture_quantile(ndtr(np.asarray(z, dtype=np.float64)))


def wasserstein1(a, b):
    """Exact W1 of two equally large 1-D samples: the optimal coupling pairs them in sorted order."""
    a, b = np.sort(np.ravel(a)), np.sort(np.ravel(b))
    assert a.shape == b.shape, "wasserstein1 compares samples of equal size"
    return float(np.abs(a - b).mean())


def w1_to_data(x):
    """W1 to the mixture, against its quantiles F^-1((i + 1/2) / n): n noise-free 'draws'."""
    return wasserstein1(x, mixture_quantile((np.arange(len(x)) + 0.5) / len(x)))


def prior_mean_abs(a, b, z):
    """E_{z ~ N(0, 1)} |a(z) - b(z)| for two maps tabulated on the uniform grid z."""
    w = np.exp(-np.square(z) / 2)
    return float((w * np.abs(a - b)).sum() / w.sum())

#################################################################################
#                                   Networks                                    #
#################################################################################

class MLP(nn.Module):
    """Each scalar input enters as sinusoids at 16 geometric frequencies, 0.1 to 30 rad per unit, as in the paper's
    toy: the high ones let a small MLP jump between modes (and let a GAN with no OT loss fold anywhere). use_t: how
    many times follow x (False or True; TwinFlow's network takes two)."""
    def __init__(self, use_t):
        super().__init__()
        self.use_t = use_t
        self.register_buffer("freqs", torch.exp(torch.linspace(math.log(0.1), math.log(30.0), 16)))
        dims = [32 * (1 + use_t)] + [WIDTH] * DEPTH
        self.net = nn.Sequential(*[m for a, b in zip(dims, dims[1:]) for m in (nn.Linear(a, b), nn.SiLU())],
                                 nn.Linear(WIDTH, 1))

    def mlp(self, x, *times):
        phases = [v.reshape(-1, 1).float() * self.freqs for v in (x, *times)[:1 + self.use_t]]  # (N, 16) each
        return self.net(torch.cat([f(p) for p in phases for f in (torch.sin, torch.cos)], 1))  # (N, 1)


class ToyGenerator(MLP):
    """model.Generator's signature, y a dummy label. One step: G(z) is the sample. Few steps (use_t_src): the
    velocity at (x_s, s), which model.transport turns into x_t = x_s - (s - t) v. TwinFlow (use_t=2): its F(x_t, t,
    t_tgt), the velocity that carries x_t from time t to t_tgt, x_tgt = x_t - (t - t_tgt) F. Times t > 0 are the real
    flow; t < 0 the flow of the model's own one-step samples."""
    use_t_src = property(lambda self: self.use_t)

    def forward(self, x, y, t_src=None, t_tgt=None):
        return self.mlp(x, t_src, t_tgt)                                       # (N, 1), like x


class ToyDiscriminator(MLP):
    """model.Discriminator's signature; t=None for one-step models."""
    def forward(self, x, y, t=None):
        return self.mlp(x, t).view(-1)                                         # (N,) logits


#################################################################################
#                                   Training                                    #
#################################################################################

def train_adversarial(nfe, steps, seed, use_ot=True):
    """AFM (use_ot) or the plain GAN (lambda_ot = 0, all else equal): the batches, D step and G step of train.py."""
    torch.manual_seed(seed)
    multi = nfe > 1                                  # velocity G and time-conditioned D, as train.py for nfe > 1
    G, D, grad_norm = ToyGenerator(multi), ToyDiscriminator(multi), GradNorm()
    EMA = deepcopy(G).requires_grad_(False)
    opt_G, opt_D = (torch.optim.AdamW(m.parameters(), lr=LR, betas=(0.0, 0.9), weight_decay=0.01) for m in (G, D))
    start, end = OT_SCALE["multi" if multi else 1]
    # The image defaults for D's regularisers (see above), but no gradient clipping.
    d_step = DStep(G, D, opt_D, velocity=multi, d_time=multi)
    g_step = GStep(G, D, opt_G, grad_norm, velocity=multi, d_time=multi)
    y = torch.zeros(BATCH, dtype=torch.long)                 # a dummy label
    for step in range(steps):
        stats = d_step(afm_batch(sample_data(BATCH), y, str(nfe)))
        stats |= g_step(afm_batch(sample_data(BATCH), y, str(nfe)), ot_scale_at(step, start, end, steps) if use_ot else 0.0)
        update_ema(EMA, G, EMA_DECAY)
    return EMA, {k: v.item() for k, v in stats.items()}


def train_flow_matching(nfe, steps, seed):
    """The same MLP, batch and steps, regressed on the flow-matching velocity v = z - x at t ~ U(0, 1)."""
    torch.manual_seed(seed)
    G = ToyGenerator(use_t=True)
    EMA = deepcopy(G).requires_grad_(False)
    opt = torch.optim.AdamW(G.parameters(), lr=LR, weight_decay=0.01)    # regression: the usual betas
    y = torch.zeros(BATCH, dtype=torch.long)
    for _ in range(steps):
        x, z, t = sample_data(BATCH), torch.randn(BATCH, 1), torch.rand(BATCH)
        loss = F.mse_loss(G(interpolate(x, z, t), y, t), z - x)         # E|v(x_t, t) - (z - x)|^2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        update_ema(EMA, G, EMA_DECAY)
    return EMA, dict(loss_fm=loss.item())


@torch.no_grad()
def trajectory(G, z, nfe):
    """x at t = 1, (n-1)/n, ..., 0 from x_1 = z, stepping as model.sample does: (nfe + 1, N)."""
    path, y = [torch.as_tensor(z).float().view(-1, 1)], torch.zeros(len(z), dtype=torch.long)
    for k in range(nfe, 0, -1):
        t_src, t_tgt = torch.full((len(z),), k / nfe), torch.full((len(z),), (k - 1) / nfe)
        path.append(transport(G, path[-1], y, t_src, t_tgt, G.use_t_src))
    return torch.cat(path, 1).T.double().numpy()

#################################################################################
#                 TwinFlow: one network, the real and the fake flow             #
#################################################################################
# TwinFlow (Cheng et al., arXiv 2512.05150) as its from-scratch MNIST tutorial trains it, without teacher or
# discriminator: loss.twinflow_losses, the five terms of the tutorial's step, the same lines twinflow.py trains DiTs
# with. The toy has no classes, so the tutorial's CFG-enhanced target (enhanced_ratio) is the plain v = z - x.

TWIN_EMA = 0.99             # ema_decay_rate (main.py:28), reached through the tutorial's warm-up


def train_twinflow(nfe, steps, seed):
    """The tutorial's step on the toy's data, batch and steps; Adam at the toy's learning rate. One any-step F, so
    nfe only matters when sampling: x_tgt = x - (t - t_tgt) F(x, t, t_tgt). The EMA is returned, as for the other
    rows; the tutorial samples its online network and keeps this EMA as the consistency target."""
    torch.manual_seed(seed)
    G = ToyGenerator(use_t=2)
    EMA, decay = deepcopy(G).requires_grad_(False), 0.0
    opt = torch.optim.Adam(G.parameters(), lr=LR)
    for _ in range(steps):
        x, z, z2 = sample_data(BATCH), torch.randn(BATCH, 1), torch.randn(BATCH, 1)
        t, u, t2 = torch.rand(3, BATCH)
        losses = twinflow_losses(G, EMA, x, None, z, t, t * (1 - u), z2, t2)
        opt.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        opt.step()
        decay = twinflow_ema_decay(decay, TWIN_EMA)         # warm-up (:215): 0.495, 0.62, ..., 0.976 at step 100
        update_ema(EMA, G, decay)
    return EMA, {k: v.item() for k, v in losses.items()}

#################################################################################
#                                  The picture                                  #
#################################################################################

PANEL_W, PANEL_H, STRIP, TOP, BOTTOM, X_RANGE = 320, 360, 40, 40, 22, 2.5
VIRIDIS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64)


def density(x, t):
    """p_t(x) of x_t = (1 - t) x + t z, exactly: mode k becomes N((1 - t) mu_k, (1 - t)^2 sigma^2 + t^2)."""
    t = np.asarray(t, dtype=np.float64)[..., None]
    var = ((1 - t) * SIGMA) ** 2 + t ** 2
    return (np.exp(-(x[..., None] - (1 - t) * MODES) ** 2 / (2 * var)) / np.sqrt(2 * np.pi * var)).mean(-1)


def draw_panel(title, paths, z):
    """Prior on the left, data on the right, between them p_t from t = 1 to t = 0 (as Figure 2's background); each
    z's path through the sampling steps in white, and where the exact OT map sends it as a red dot."""
    img, font = Image.new("RGB", (PANEL_W, PANEL_H), "white"), ImageFont.load_default(size=13)
    d = ImageDraw.Draw(img)
    plot_w, plot_h = PANEL_W - 2 * STRIP, PANEL_H - TOP - BOTTOM
    x = np.linspace(X_RANGE, -X_RANGE, plot_h)                                    # one value per pixel row
    level = np.sqrt(np.clip(density(x[:, None], np.linspace(1, 0, plot_w)) / 1.2, 0, 1)) * (len(VIRIDIS) - 1)
    rgb = np.stack([np.interp(level, np.arange(len(VIRIDIS)), VIRIDIS[:, c]) for c in range(3)], -1)  # (H, W, 3)
    img.paste(Image.fromarray(rgb.astype(np.uint8)), (STRIP, TOP))
    row = lambda v: TOP + (X_RANGE - v) / (2 * X_RANGE) * (plot_h - 1)
    for col, side, t in ((STRIP, -1, 1.0), (PANEL_W - STRIP, 1, 0.0)):              # prior, data
        pdf = density(x, t)
        d.line([(col + side * 36 * p / pdf.max(), row(v)) for p, v in zip(pdf, x)], fill=(40, 40, 40))
        d.line([(col, TOP), (col, TOP + plot_h)], fill="black")
    for path, end in zip(paths.T, ot_map(z)):
        d.line([(c, row(v)) for c, v in zip(np.linspace(STRIP, STRIP + plot_w - 1, len(path)), path)], fill="white")
        d.ellipse([PANEL_W - STRIP - 2, row(end) - 2, PANEL_W - STRIP + 2, row(end) + 2], fill=(230, 30, 30))
    for i, text in enumerate(title):
        d.text((6, 3 + 17 * i), text, fill="black", font=font)
    d.text((4, PANEL_H - BOTTOM + 4), "z ~ N(0, 1)   t = 1", fill="black", font=font)
    d.text((PANEL_W - 4, PANEL_H - BOTTOM + 4), "t = 0   data", fill="black", font=font, anchor="ra")
    return img

#################################################################################
#                                     Main                                      #
#################################################################################

MODELS = dict(afm=("AFM", partial(train_adversarial, use_ot=True)),
              twinflow=("TwinFlow", train_twinflow),
              gan=("GAN (no OT loss)", partial(train_adversarial, use_ot=False)),
              fm=("flow matching", train_flow_matching))


def main(nfe=1, steps=1000, seed=0, out_dir="."):
    """Trains each model at seeds `seed` and `seed + 1`, prints the table, writes toy.png and toy.npz. Returns the
    metrics and the maps of the seed-`seed` models (whole n-step chains) on a grid of z."""
    try:
        os.makedirs(out_dir, exist_ok=True)                  # before the training: a bad folder fails at once
    except OSError as e:
        fail(f"cannot create --out-dir {out_dir}: {e.strerror}")
    for name in ("toy.png", "toy.npz"):                      # so does a read-only one, or another toy.py writing there
        claim(os.path.join(out_dir, name), "--out-dir")
    z_grid = np.linspace(-4, 4, 801)
    maps, results, panels = dict(z=z_grid, ot=ot_map(z_grid)), {}, []
    z_eval = torch.randn(20_000, generator=torch.Generator().manual_seed(seed))
    z_lines = ndtri((np.arange(32) + 0.5) / 32)              # paths at prior quantiles: their density is the prior's
    print(f"{nfe}-step models, {steps} steps of batch {BATCH}, seeds {seed} and {seed + 1}")
    print(f"{'model':<18}{'W1 to data':>11}{'map error':>11}{'seed shift':>12}{'seconds':>9}")
    for name, (label, train) in MODELS.items():
        tic = time.time()
        (G, stats), (G_other, _) = (train(nfe, steps, s) for s in (seed, seed + 1))
        maps[name] = trajectory(G, z_grid, nfe)[-1]
        r = results[name] = dict(w1=w1_to_data(trajectory(G, z_eval, nfe)[-1]),
                                 map_err=prior_mean_abs(maps[name], maps["ot"], z_grid),
                                 seed_shift=prior_mean_abs(maps[name], trajectory(G_other, z_grid, nfe)[-1], z_grid),
                                 seconds=time.time() - tic, stats=stats)
        print(f"{label:<18}{r['w1']:>11.4f}{r['map_err']:>11.4f}{r['seed_shift']:>12.4f}{r['seconds']:>9.1f}")
        title = [f"{label}, {nfe} step{'s' * (nfe > 1)}", f"W1 {r['w1']:.3f}  map err {r['map_err']:.3f}"]
        panels.append(draw_panel(title, trajectory(G, z_lines, nfe), z_lines))
    print("W1: 20,000 samples against the mixture. map error: E|G(z) - T(z)| with T the exact OT map. "
          "seed shift: E|G_seed(z) - G_seed+1(z)|. z ~ N(0, 1).")

    image = Image.new("RGB", (PANEL_W * len(panels), PANEL_H))
    for i, panel in enumerate(panels):
        image.paste(panel, (i * PANEL_W, 0))
    with save_atomic(os.path.join(out_dir, "toy.png")) as tmp:
        image.save(tmp)
    with save_atomic(os.path.join(out_dir, "toy.npz")) as tmp:
        np.savez(tmp, **maps)
    print(f"wrote {os.path.join(out_dir, 'toy.png')} and toy.npz")
    release_claims()                                         # common.run would, but main is called on its own too
    return results, maps


def make_parser():
    parser = argparse.ArgumentParser(description="1-D toy: AFM, TwinFlow, GAN and flow matching against the exact OT map.")
    parser.add_argument("--nfe", type=integer(1, 1000), default=1, help="sampling steps of every model: 1, 2, 4, ...")
    parser.add_argument("--steps", type=positive_int, default=1000, help="training steps per model and seed")
    parser.add_argument("--seed", type=seed, default=0, help="the second run uses seed + 1")
    parser.add_argument("--out-dir", type=str, default=".")
    return parser


if __name__ == "__main__":
    parser = make_parser()
    args = parser.parse_args()
    check_output(args.out_dir, "--out-dir", folder=True)
    # The networks are tiny: one thread skips OpenMP synchronisation, which on a busy 2-core machine cost far more
    # than it saved (measured: about 20 ms per step with one thread, 150 ms with two).
    torch.set_num_threads(1)
    run(lambda a: main(a.nfe, a.steps, a.seed, a.out_dir), args, "run it again")
