"""
The objectives: Adversarial Flow Models (Lin et al., https://arxiv.org/abs/2511.22475), TwinFlow (Cheng et al.,
https://arxiv.org/abs/2512.05150), the other one-step method trained without a teacher, and at the end Continuous
Adversarial Flow Models (CAFM, https://arxiv.org/abs/2604.11521), the post-training of a flow model. Written over
generic networks with model.py's signatures (G(x, y, t_src, t_tgt), D(x, y, t), C(x, t)) and (N, ...) tensors, so
the 1-D toy (toy.py) and the DiT trainers (train.py, twinflow.py, cafm.py) run the same lines. Imports torch and
model.py only: model.py + loss.py are the method, and can be copied together into another project.

    batch times -> gradient normalisation -> augmentation -> the two losses -> guidance -> the two steps ->
    EMA and the lambda_ot schedule -> TwinFlow's terms -> CAFM's jvp, losses and schedule
"""
import math
from copy import deepcopy
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from model import transport

#################################################################################
#                        Batch times and interpolation                          #
#################################################################################

def per_sample(t, x):
    """A per-sample (N,) tensor shaped to broadcast against x (N, ...)."""
    return t.view(-1, *[1] * (x.dim() - 1))


def interpolate(x, z, t):
    """x_t = (1 - t) x + t z: t = 0 is data, t = 1 is noise."""
    t = per_sample(t, x)
    return (1 - t) * x + t * z


def afm_batch(x, y, nfe, generator=None):
    """Source x_src and real target x_tgt at times t_src > t_tgt for the clean images x (Algorithm 1). They share
    the image, not the noise. One-step models go from 1 to 0; k-step models from s = j/k to s - 1/k; any-step
    models from s ~ U(0, 1) to t ~ U(0, s). Every draw comes from `generator` (the global one when None)."""
    n = len(x)
    rand = lambda *shape: torch.rand(*shape, generator=generator)
    if nfe == "any":
        t_src = rand(n)
        t_tgt = rand(n) * t_src
    else:                                                      # s from {1/k, ..., 1}, t = s - 1/k
        k = int(nfe)
        j = k - torch.randint(k, (n,), generator=generator)
        t_src, t_tgt = j / k, (j - 1) / k
    x_src = interpolate(x, torch.randn(x.shape, generator=generator), t_src)
    x_tgt = interpolate(x, torch.randn(x.shape, generator=generator), t_tgt)
    weighting = (t_src - t_tgt).abs().clamp_min(0.001)        # w = max(|s - t|, 0.001)
    return dict(x_src=x_src, x_tgt=x_tgt, y=y, t_src=t_src, t_tgt=t_tgt, weighting=weighting)


#################################################################################
#                            Gradient normalisation                             #
#################################################################################

class GradNorm(torch.nn.Module):
    """Identity forward; backward divides the incoming gradient by sqrt(EMA_0.9(|g|^2 numel)) + 1e-8, so the size
    of D's push on G no longer depends on the scale of D's logits, and one lambda_ot works at every model size."""
    def __init__(self, decay=0.9, eps=1e-8):
        super().__init__()
        self.decay, self.eps = decay, eps
        self.register_buffer("square_avg", torch.tensor(0.0))

    def forward(self, x):
        return _GradNormFn.apply(x, self)


class _GradNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, module):
        ctx.module = module
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        m = ctx.module
        # |g|^2 times numel equals mean(g^2) times numel^2: independent of the per-rank batch size once averaged.
        square = grad.float().square().sum() * grad.numel()
        if dist.is_initialized():
            dist.all_reduce(square, op=dist.ReduceOp.AVG)
        m.square_avg.lerp_(square, 1 - m.decay)
        return grad / (m.square_avg.sqrt() + m.eps), None


#################################################################################
#                         Discriminator augmentation                            #
#################################################################################

def augment(x_real, x_fake, p):
    """Discriminator augmentation (App. C, Eq. 33-34, Algorithm 1), Kornia's RandomTranslate(translate_x=translate_y=
    (0, 0.3), nearest) and then three RandomErasing(scale=(0.1, 0.5)), each applied to a pair with probability p, with
    the SAME parameters for the real and the generated sample of a pair: the relativistic loss compares the two.
    Batched, in plain torch; differentiable in x_fake. Returns the pair."""
    if p == 0:
        return x_real, x_fake
    x = torch.cat([x_real, x_fake], dim=1)                    # (N, 2C, H, W): a pair shares its parameters
    N, _, H, W = x.shape
    uniform = lambda lo, hi: lo + (hi - lo) * torch.rand(N, device=x.device)
    on = lambda: torch.rand(N, device=x.device) < p
    rows, cols = torch.arange(H, device=x.device), torch.arange(W, device=x.device)
    # Translation by (dx, dy) ~ U(0, 0.3) (W, H), right and down only (Kornia reads the tuple as the range itself).
    # Kornia's warp normalises pixel coordinates by size - 1, so a shift of d pixels moves the image d size/(size - 1)
    # pixels, and nearest resampling rounds that to a whole pixel. The vacated band is zero.
    shift = on()
    dx, dy = (torch.round(uniform(0, 0.3 * size) * size / (size - 1)).long() * shift for size in (W, H))
    src_y, src_x = rows - dy[:, None], cols - dx[:, None]                         # (N, H), (N, W)
    moved = x[torch.arange(N, device=x.device)[:, None, None], :, src_y.clamp(min=0)[:, :, None],
              src_x.clamp(min=0)[:, None, :]].permute(0, 3, 1, 2)                 # (N, 2C, H, W)
    x = torch.where(((src_y >= 0)[:, :, None] & (src_x >= 0)[:, None, :])[:, None], moved, torch.zeros_like(x))
    for _ in range(3):
        y0, x0, h, w = erasing_boxes(N, H, W, x.device)
        inside = ((rows >= y0[:, None]) & (rows < (y0 + h)[:, None]))[:, :, None] & \
                 ((cols >= x0[:, None]) & (cols < (x0 + w)[:, None]))[:, None, :]  # (N, H, W)
        x = torch.where((inside & on()[:, None, None])[:, None], torch.zeros_like(x), x)
    return x.chunk(2, dim=1)


def erasing_boxes(n, H, W, device):
    """Kornia's RandomErasing(scale=(0.1, 0.5)) boxes (top, left, height, width), each (n,): area ~ U(0.1, 0.5) HW,
    aspect h/w from U(0.3, 1) or U(1, 3.3) on a coin flip, the box placed uniformly where it fits."""
    uniform = lambda lo, hi: lo + (hi - lo) * torch.rand(n, device=device)
    area, r = uniform(0.1, 0.5) * H * W, torch.where(torch.rand(n, device=device) < 0.5, uniform(0.3, 1), uniform(1, 3.3))
    h = torch.round((area * r).sqrt()).clamp(1, H).long()
    w = torch.round((area / r).sqrt()).clamp(1, W).long()
    y0 = (torch.rand(n, device=device) * (H - h + 1)).floor().long()
    x0 = (torch.rand(n, device=device) * (W - w + 1)).floor().long()
    return y0, x0, h, w


#################################################################################
#                             The two players' losses                           #
#################################################################################

def discriminator_loss(D, x_real, x_fake, y, t, weighting, gp_scale, gp_eps, gp_ratio, cp_scale, aug_p=0.0):
    """D's loss on real and generated samples at time t (t=None for one-step models). Returns (loss, stats)."""
    x_real, x_fake = augment(x_real, x_fake, aug_p)           # Eq. 33: before the R1/R2 perturbation
    bsz = len(x_real)
    gp_bsz = max(round(bsz * gp_ratio), 1)                    # R1/R2 on the first gp_ratio of the batch
    x_real_gp = x_real[:gp_bsz] + gp_eps * torch.randn_like(x_real[:gp_bsz])
    x_fake_gp = x_fake[:gp_bsz] + gp_eps * torch.randn_like(x_fake[:gp_bsz])
    # One forward over [real, fake, real + eps n, fake + eps n] instead of four.
    x_all = torch.cat([x_real, x_fake, x_real_gp, x_fake_gp])                   # (2 bsz + 2 gp_bsz, ...)
    y_all = torch.cat([y, y, y[:gp_bsz], y[:gp_bsz]])
    t_all = None if t is None else torch.cat([t, t, t[:gp_bsz], t[:gp_bsz]])
    logits_real, logits_fake, logits_real_gp, logits_fake_gp = D(x_all, y_all, t_all).float().split(
        [bsz, bsz, gp_bsz, gp_bsz])
    gp_weight = gp_scale * weighting[:gp_bsz] / gp_eps ** 2
    loss_adv = F.softplus(-(logits_real - logits_fake)).mean()                  # log(1 + e^-(D(x_t) - D(x^_t)))
    loss_r1 = (gp_weight * (logits_real_gp - logits_real[:gp_bsz]).square()).mean()  # R1 ~ l w/e^2 (D(x+en) - D(x))^2
    loss_r2 = (gp_weight * (logits_fake_gp - logits_fake[:gp_bsz]).square()).mean()  # R2, the same on generated x^_t
    loss_cp = cp_scale * (logits_real + logits_fake).square().mean()           # centering: l_cp (D(x_t) + D(x^_t))^2
    loss = loss_adv + loss_r1 + loss_r2 + loss_cp
    stats = dict(loss_d=loss_adv, r1=loss_r1, r2=loss_r2, cp=loss_cp,
                 logits_real=logits_real.mean(), logits_fake=logits_fake.mean())
    return loss, {name: v.detach() for name, v in stats.items()}


def generator_loss(D, x_fake, x_src, x_real, y, t, weighting, ot_scale, grad_norm, aug_p=0.0, guidance=None):
    """G's loss with D frozen (Eq. 25): the relativistic loss through normalised gradients, the optimal-transport loss,
    and with a Guidance its classifier's cross-entropy. Returns (loss, stats)."""
    x_real_aug, x_fake_aug = augment(x_real, x_fake, aug_p)  # Eq. 34: D sees the augmented pair, normalised after it
    with torch.no_grad():
        logits_real = D(x_real_aug, y, t).float()             # D is frozen: real logits need no graph
    logits_fake = D(grad_norm(x_fake_aug), y, t).float()
    loss_adv = F.softplus(-(logits_fake - logits_real)).mean()                  # log(1 + e^-(D(x^_t) - D(x_t)))
    loss_ot = (ot_scale * (x_fake - x_src).square().flatten(1).mean(1) / weighting).mean()  # l_ot |x^_t - x_s|^2/(n w)
    # (the G step's logits, logged apart from the D step's, which they would otherwise overwrite)
    stats = dict(loss_g=loss_adv, ot=loss_ot, g_logits_real=logits_real.mean(), g_logits_fake=logits_fake.mean())
    loss = loss_adv + loss_ot
    if guidance is not None:
        stats["cg"] = guidance.scale * guidance_loss(guidance.classifier, x_fake, y, t, *guidance.time)  # l_cg CE
        loss = loss + stats["cg"]
    return loss, {name: v.detach() for name, v in stats.items()}


#################################################################################
#                              Classifier guidance                              #
#################################################################################

@dataclass
class Guidance:
    """Classifier guidance (§3.5, stage 4 of Table 11): a frozen time-conditioned classifier C(x_t, t), its weight
    lambda_cg and the range of times it guides."""
    classifier: torch.nn.Module
    scale: float
    time: tuple = (0.0, 0.1)


def guidance_loss(C, x_fake, y, t, lo, hi):
    """Cross-entropy of the frozen classifier C on G's samples. One-step models (t None) interpolate the sample with
    fresh noise at t' ~ U(lo, hi) (Eq. 26, Algorithm 2); few-step models classify their own x^_t at t' = t where
    lo <= t <= hi, zero elsewhere, averaged over the batch (Eq. 38). The gradient reaches G only (C is frozen) and,
    as in the official code, is not normalised: only D's gradient passes the gradient normalisation."""
    if t is None:
        t_cg = lo + (hi - lo) * torch.rand(len(x_fake), device=x_fake.device)
        x_cg, guided = interpolate(x_fake, torch.randn_like(x_fake), t_cg), torch.ones_like(t_cg)
    else:
        t_cg, x_cg, guided = t, x_fake, ((t >= lo) & (t <= hi)).float()
    return (F.cross_entropy(C(x_cg, t_cg).float(), y, reduction="none") * guided).mean()


def classifier_state(C, lr, device):
    """What a checkpoint of a classifier's training holds: C, its EMA, and AdamW as the official recipe
    (configs/train/afm/train_afm_classifier.yaml: betas (0.9, 0.95), eps 1e-8, weight decay 0.01)."""
    adamw = dict(betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01, fused=device.type == "cuda")
    return dict(model=C, EMA=deepcopy(C).requires_grad_(False), opt=torch.optim.AdamW(C.parameters(), lr=lr, **adamw))


def classifier_step(C, opt, x_t, t, y, grad_clip):
    """One update of the classifier C(x_t, t) (or of a judge of clean images, t None; C may be wrapped in DDP): the
    cross-entropy against the labels, with no label smoothing and no weighting over t (the official code), the
    gradient clipped. Returns the step's statistics."""
    logits = C(x_t, t).float()
    loss = F.cross_entropy(logits, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(C.parameters(), grad_clip)
    opt.step()
    return dict(loss=loss.detach(), acc=(logits.argmax(1) == y).float().mean(), grad_norm=grad_norm)


#################################################################################
#                              The two players' steps                           #
#################################################################################
# Each player's fixed settings are bound once, so that the loop reads like Algorithm 1: d_step(batch), then
# g_step(batch, ot_scale). velocity: G predicts velocity (few-step models), not the sample; d_time: D sees the target
# time. bf16: G runs under bf16 autocast (on any device). D runs in fp32 in both steps (TF32 matmuls on GPU,
# as the official code): R1/R2 differences of logits 0.01 apart drown in bf16 rounding, and the G step then trains
# against the same D that the D step trained.

@dataclass
class DStep:
    """One discriminator update; G runs without gradients. G and D may be wrapped (DDP, compile)."""
    G: torch.nn.Module
    D: torch.nn.Module
    opt: torch.optim.Optimizer
    velocity: bool
    d_time: bool
    gp_scale: float = 0.25                                    # lambda_gp of R1 and R2 (Table 10)
    gp_eps: float = 0.01                                      # the finite-difference step (Table 10)
    gp_ratio: float = 0.25                                    # share of the batch R1/R2 see (Table 10)
    cp_scale: float = 0.01                                    # logit centering (Table 10)
    aug_p: float = 0.0
    grad_clip: float = math.inf
    bf16: bool = False

    def __call__(self, batch):
        with torch.no_grad(), torch.autocast(batch["x_src"].device.type, torch.bfloat16, enabled=self.bf16):
            x_fake = transport(self.G, batch["x_src"], batch["y"], batch["t_src"], batch["t_tgt"], self.velocity)
        loss, stats = discriminator_loss(self.D, batch["x_tgt"], x_fake, batch["y"],
                                         batch["t_tgt"] if self.d_time else None, batch["weighting"], self.gp_scale,
                                         self.gp_eps, self.gp_ratio, self.cp_scale, self.aug_p)
        loss.backward()
        stats["grad_norm_d"] = torch.nn.utils.clip_grad_norm_(self.D.parameters(), self.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)                  # D's gradients freed before G's step needs the memory
        return stats


@dataclass
class GStep:
    """One generator update; D (and a guidance classifier) are frozen but pass gradients through to G's samples.
    G may be wrapped (DDP, compile); D is the bare or compiled D, never the DDP one: it is frozen here."""
    G: torch.nn.Module
    D: torch.nn.Module
    opt: torch.optim.Optimizer
    grad_norm: GradNorm
    velocity: bool
    d_time: bool
    aug_p: float = 0.0
    grad_clip: float = math.inf
    guidance: Optional[Guidance] = None
    bf16: bool = False

    def __call__(self, batch, ot_scale):
        frozen = [p for p in self.D.parameters() if p.requires_grad]  # not pos_embed, which stays fixed for good
        for p in frozen:
            p.requires_grad_(False)
        with torch.autocast(batch["x_src"].device.type, torch.bfloat16, enabled=self.bf16):
            x_fake = transport(self.G, batch["x_src"], batch["y"], batch["t_src"], batch["t_tgt"], self.velocity)
        loss, stats = generator_loss(self.D, x_fake, batch["x_src"], batch["x_tgt"], batch["y"],
                                     batch["t_tgt"] if self.d_time else None, batch["weighting"], ot_scale,
                                     self.grad_norm, self.aug_p, self.guidance)
        loss.backward()
        for p in frozen:
            p.requires_grad_(True)
        stats["grad_norm_g"] = torch.nn.utils.clip_grad_norm_(self.G.parameters(), self.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)                  # G's gradients freed before D's step needs the memory
        return stats


#################################################################################
#                        EMA and the lambda_ot schedule                         #
#################################################################################

@torch.no_grad()
def update_ema(EMA, G, decay):
    # One fused kernel over all tensors instead of one launch per parameter (hundreds per step on GPU).
    torch._foreach_lerp_(list(EMA.parameters()), list(G.parameters()), 1 - decay)


@torch.no_grad()
def reload_ema(G, EMA):
    # EMA reload (App. C, Table 11 stages 2-4): G continues from the EMA, which outperforms it; optimizer state kept.
    torch._foreach_copy_(list(G.parameters()), list(EMA.parameters()))


def ot_scale_at(step, start, end, decay_steps):
    """lambda_ot at generator step `step`: cosine from start to end over decay_steps, then end (constant: start = end)."""
    if step >= decay_steps - 1:
        return end
    return end + (start - end) * (1 + math.cos(math.pi * step / (decay_steps - 1))) / 2


#################################################################################
#                 TwinFlow: one network, the real and the fake flow             #
#################################################################################
# TwinFlow as its from-scratch MNIST tutorial trains it, without teacher or discriminator:
# https://github.com/inclusionAI/TwinFlow/blob/main/tutorials/mnist/methodes.py (line numbers below). One network
# F(x_t, y, t, t_tgt) (model.Generator with both times) is the velocity that carries x_t from time t to t_tgt,
# x_tgt = x_t - (t - t_tgt) F: at t > 0 the real flow between data and noise, at t < 0 the flow between noise and its
# own one-step samples z - F(z, y, 1, 0). Times are (N,) tensors; y may be None (the toy has no classes).

RCGM_DELTA, RCGM_ORDER = 0.01, 2      # RCGM's first step and its estimate_order (methodes.py:189, main.py:27)


@torch.no_grad()
def rcgm_residual(EMA, F_th, x_t, v, y, t, t_tgt):
    """RCGM's any-step consistency residual (get_rcgm_target, :170), clipped to +-1: the jump (t - t_tgt) F_th from x_t
    should equal RCGM_DELTA along the target velocity v, then RCGM_ORDER Euler steps of the EMA from t - RCGM_DELTA
    to t_tgt. Within RCGM_DELTA of t_tgt the residual is flow matching's F_th - v."""
    t_mid = torch.maximum(t - RCGM_DELTA, t_tgt)
    times = [t_mid * (1 - i / RCGM_ORDER) + t_tgt * i / RCGM_ORDER for i in range(RCGM_ORDER + 1)]
    x, jump = x_t - RCGM_DELTA * v, 0
    for t_c, t_n in zip(times, times[1:]):
        step = per_sample(t_c - t_n, x) * EMA(x, y, t_c, t_n)
        x, jump = x - step, jump + step
    near = per_sample(t < t_tgt + RCGM_DELTA, x)
    return torch.where(near, F_th - v, (per_sample(t - t_tgt, x) * F_th - jump) / RCGM_DELTA - v).clamp(-1, 1)


TWINFLOW_TERMS = ("base", "real", "fake", "rectify", "base_one_step")


def twinflow_batch(x, y, generator=None):
    """Everything random in a step for the images x with labels y, drawn from `generator` (the global one when None):
    the labels shuffled for the CFG-enhanced target (tutorial main.py:133), t ~ U(0, 1), t_tgt = t - u t with
    u ~ U(0, 1) (:128), t2 ~ U(0, 1) for the rectification (:423), noise z and z2 (:117)."""
    n = len(x)
    y_cfg = y[torch.randperm(n, generator=generator)]
    t, u, t2 = torch.rand(3, n, generator=generator)
    z, z2 = torch.randn(x.shape, generator=generator), torch.randn(x.shape, generator=generator)
    return dict(x=x, y=y, z=z, t=t, t_tgt=t * (1 - u), z2=z2, t2=t2, y_cfg=y_cfg)


def twinflow_losses(G, EMA, x, y, z, t, t_tgt, z2, t2, y_cfg=None, cfg_ratio=0.0, terms=TWINFLOW_TERMS):
    """The five terms of TwinFlow.training_step (:448), each a mean square over the whole batch, weight 1 each (those
    named in `terms`; "real" alone is flow matching). All randomness is given: data x with labels y, noise z and z2
    like x, times t, t_tgt <= t and t2, (N,). With y_cfg (the labels shuffled, :133) the velocity target gains the
    EMA's guidance cfg_ratio (F(y) - F(y_cfg)) (:102)."""
    ones, zeros, x_t = torch.ones_like(t), torch.zeros_like(t), interpolate(x, z, t)
    v = z - x                                                 # the real flow's velocity
    if y_cfg is not None and cfg_ratio:
        with torch.no_grad():                                 # the CFG-enhanced target, at t_tgt = t (:466)
            v = v + cfg_ratio * (EMA(x_t, y, t, t) - EMA(x_t, y_cfg, t, t))
    losses = {}
    if "base" in terms:                                       # L_base: RCGM's any-step consistency (:475)
        F_th_t = G(x_t, y, t, t_tgt)
        losses["base"] = F.mse_loss(F_th_t, F_th_t.detach() - rcgm_residual(EMA, F_th_t, x_t, v, y, t, t_tgt))
    if "real" in terms:                                       # flow matching, t_tgt = t (:487)
        losses["real"] = F.mse_loss(G(x_t, y, t, t), v)
    if not {"fake", "rectify", "base_one_step"} & set(terms):
        return losses
    F_fake = G(z, y, ones, zeros)
    x_fake = (z - F_fake).detach()                            # the one-step samples
    if "fake" in terms:                                       # L_adv: the fake flow at -t (:498)
        losses["fake"] = F.mse_loss(G(interpolate(x_fake, z, t), y, -t, -t), z - x_fake)
    if "rectify" in terms:  # fake minus real velocity at x_fake noised afresh (dist_match, :423): the score difference
        with torch.no_grad():
            x_2 = interpolate(x_fake, z2, t2)
            F_grad = G(x_2, y, -t2, -t2) - G(x_2, y, t2, t2)
        losses["rectify"] = F.mse_loss(F_fake, (F_fake - F_grad).detach())      # L_rectify: x_fake += F_grad (:506)
    if "base_one_step" in terms:                              # the one-step L_base (:509)
        residual = rcgm_residual(EMA, F_fake, z, v, y, ones, zeros)
        losses["base_one_step"] = F.mse_loss(F_fake, F_fake.detach() - residual)
    return losses


def twinflow_ema_decay(decay, target=0.99):
    """The tutorial's EMA warm-up (:215): each update moves the decay halfway from where it is to `target`, weighted by
    1 - decay: 0, 0.495, 0.62, ..., 0.976 after 100 updates, then towards `target`."""
    return decay + (1 - decay) * (target - decay) / 2


#################################################################################
#              CAFM: a potential D, judged by its derivative along a flow       #
#################################################################################
# Continuous Adversarial Flow Models (https://arxiv.org/abs/2604.11521) as the official training_step runs them
# (train_continuous_adversarial_flow_imagenet.py): G(x_t, y, t) is a flow model's velocity (model.Generator with
# use_t_src), D(x_t, y, t) a scalar potential (model.Discriminator with use_t, norm="rms"), and what is judged is D's
# derivative along a flow, J(v) = d/de D(x_t + e v, y, t + e) at e = 0, by forward-mode autodiff.

def cafm_batch(x, y, generator=None, null_class=None, dropout=0.1):
    """x_t at t ~ U(0, 1), the real velocity z - x, and y dropped to the null class with p = dropout when G has one
    (the official prepare_input, timesteps "uniform"); every draw from `generator`."""
    drop, t = torch.rand(2, len(x), generator=generator)
    y = y if null_class is None else torch.where(drop < dropout, null_class, y)
    z = torch.randn(x.shape, generator=generator)
    return dict(x_t=interpolate(x, z, t), v_real=z - x, y=y, t=t)


class FlowDerivative(torch.nn.Module):
    """(D(x, y, t), J): J the derivative of D along (dx, dt), (N,); K tangents stacked, dx (K, N, ...) and dt (K, N),
    give J (K, N) from one vmapped jvp. A module, so that DDP can wrap it (the official DiscriminatorJVP). SDPA's math
    backend has forward-mode AD; its flash kernels (CPU and CUDA) and the memory-efficient one do not."""
    def __init__(self, D):
        super().__init__()
        self.D = D

    def forward(self, x, y, t, dx, dt):
        jvp_along = lambda dx, dt: torch.func.jvp(lambda x, t: self.D(x, y, t), (x, t), (dx, dt))
        with sdpa_kernel(SDPBackend.MATH):
            return torch.func.vmap(jvp_along)(dx, dt) if dx.dim() > x.dim() else jvp_along(dx, dt)


def cafm_discriminator_loss(DJ, x_t, y, t, v_real, v_fake, cp_scale):
    """D's least squares, J(v_real) -> 1 and J(v_fake) -> -1, plus cp_scale D(x_t)^2 for the potential's level, which
    the derivative leaves free. DJ: a FlowDerivative (DDP-wrapped or not)."""
    ones = torch.ones_like(t)
    out, (logits_real, logits_fake) = DJ(x_t, y, t, torch.stack([v_real, v_fake.detach()]), torch.stack([ones, ones]))
    loss_adv = (logits_real - 1).square().mean() + (logits_fake + 1).square().mean()
    loss_cp = cp_scale * out.square().mean()
    return loss_adv + loss_cp, dict(loss_d=loss_adv.detach(), loss_cp=loss_cp.detach(),
                                    logits_real=logits_real.detach().mean(), logits_fake=logits_fake.detach().mean())


def cafm_generator_loss(DJ, x_t, y, t, v_fake, ot_scale):
    """G's loss, J(v_fake) -> 1, plus ot_scale mean(v_fake^2) (0 in the official SiT config); DJ wraps the bare, frozen
    D, and the gradient reaches G through the tangent v_fake."""
    _, logits_fake = DJ(x_t, y, t, v_fake, torch.ones_like(t))
    loss_adv, loss_ot = (logits_fake - 1).square().mean(), ot_scale * v_fake.square().mean()
    return loss_adv + loss_ot, dict(loss_g=loss_adv.detach(), loss_ot=loss_ot.detach(), logits_g=logits_fake.detach().mean())


def cafm_is_d_step(step, warmup, n_dis):
    """The official is_dis_step: D alone up to step `warmup`, then n_dis D steps and a G step in every n_dis + 1."""
    return step <= warmup or step % (n_dis + 1) < n_dis
