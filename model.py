"""
The networks of Adversarial Flow Models (Lin et al., 2025, https://arxiv.org/abs/2511.22475): a DiT generator,
a DiT discriminator and a time-conditioned DiT classifier, and those of its continuous version, CAFM. Imports only
torch, numpy and math, so the file can be copied alone into another project. Nothing here is run directly; train.py,
cafm.py and sample.py build these classes.

How the networks differ from vanilla DiT (https://github.com/facebookresearch/DiT/blob/main/models.py):
- Written without timm; attention goes through F.scaled_dot_product_attention (flash attention on GPU).
- The label embedder is a plain table: no null class, no label dropout (AFM trains without CFG); a CAFM generator
  from SiT's checkpoint has one, its last class (null_class), for classifier-free guidance.
- No learned sigma: the generator outputs as many channels as it takes in (learn_sigma, for SiT's checkpoints,
  keeps the output layer's extra channels and drops them).
- Generator: a one-step model has no timestep embedder at all and predicts the sample (x-prediction). A few-step
  model (use_t_src) embeds the source time and predicts velocity; an any-step model (use_t_tgt) adds a second
  embedder for the target time. Times are in [0, 1] (1 = noise, 0 = data) and are multiplied by 1000 before the
  sinusoidal embedding so the frequencies match DiT's integer timesteps.
- Depth repetition (repeat=R): the same blocks run R times; pass r adds an embedding of the repetition "time"
  1 - r/R to the class embedding, and the final layer sees the class embedding alone (the paper's 56- and
  112-layer XL/2 one-step generators).
- Discriminator: a learned token (no position embedding) is prepended to the patch tokens, the blocks are
  conditioned on the class (plus the target time with use_t), and a LayerNorm without affine followed by a
  bias-free Linear reads that token out as one logit.
- CAFM (Lin et al., 2026, https://arxiv.org/abs/2604.11521): G is the few-step generator as a velocity of one time
  (use_t_src); D is the discriminator with time and norm="rms" (parameter-free RMSNorm in its blocks and head), a
  scalar potential. sit=True takes SiT's conventions (https://github.com/willisma/SiT): time 1 - t, embedded without
  the factor 1000, and velocity -v, so the official CAFM checkpoints (SiT format) load with strict=True.
- Classifier: like the discriminator, but conditioned on time only and read out to class logits (with bias);
  used for classifier guidance.
Parameter names, shapes and initialisation follow the official release, so its checkpoints load with strict=True.
"""
import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


#################################################################################
#                   Embedding Layers for Patches, Times and Labels              #
#################################################################################

class PatchEmbed(nn.Module):
    """Cuts the image into p x p patches and projects each one to a token."""
    def __init__(self, input_size, patch_size, in_channels, hidden_size):
        super().__init__()
        self.patch_size = patch_size
        self.num_patches = (input_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, T, D)


class TimestepEmbedder(nn.Module):
    """Embeds a time t in [0, 1]: sinusoids of scale * t (1000: DiT's timestep scale; SiT embeds t itself), then a
    two-layer MLP."""
    def __init__(self, hidden_size, frequency_embedding_size=256, scale=1000):
        super().__init__()
        self.scale = scale
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000):
        # https://github.com/openai/glide-text2im/blob/main/glide_text2im/nn.py
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].to(torch.promote_types(t.dtype, freqs.dtype)) * freqs[None]  # (N, dim / 2), >= fp32
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)      # (N, dim)

    def forward(self, t):
        t_freq = self.timestep_embedding(t * self.scale, self.frequency_embedding_size)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """A plain table of class embeddings (no null class: AFM trains without classifier-free guidance)."""
    def __init__(self, num_classes, hidden_size):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes, hidden_size)

    def forward(self, y):
        return self.embedding_table(y)


def get_2d_sincos_pos_embed(embed_dim, grid_size):
    """Fixed 2-D sin-cos position embedding, (grid_size**2, embed_dim), laid out as MAE/DiT lay it out."""
    # https://github.com/facebookresearch/mae/blob/main/util/pos_embed.py
    def embed_1d(dim, pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)                # (M, dim / 2)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)         # (M, dim)

    grid_w, grid_h = np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32))
    # DiT/MAE embed the first half of the channels from the w-major grid and the second half from the h grid.
    return np.concatenate([embed_1d(embed_dim // 2, grid_w), embed_1d(embed_dim // 2, grid_h)], axis=1)


#################################################################################
#                                 Core DiT Block                                #
#################################################################################

class Attention(nn.Module):
    def __init__(self, hidden_size, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, hidden_size * 3, bias=True)
        self.proj = nn.Linear(hidden_size, hidden_size, bias=True)

    def forward(self, x):
        N, T, D = x.shape
        qkv = self.qkv(x).reshape(N, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)  # (3, N, H, T, D/H)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])        # (N, H, T, D/H)
        return self.proj(x.transpose(1, 2).reshape(N, T, D))


class Mlp(nn.Module):
    def __init__(self, hidden_size, mlp_hidden_size):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, mlp_hidden_size, bias=True)
        self.fc2 = nn.Linear(mlp_hidden_size, hidden_size, bias=True)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def make_norm(norm, hidden_size):
    """A parameter-free LayerNorm ("ln", DiT's) or RMSNorm ("rms", CAFM's discriminator)."""
    return (nn.LayerNorm if norm == "ln" else nn.RMSNorm)(hidden_size, elementwise_affine=False, eps=1e-6)


class DiTBlock(nn.Module):
    """A transformer block with adaptive layer norm zero (adaLN-Zero) conditioning."""
    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, norm="ln"):
        super().__init__()
        self.norm1 = make_norm(norm, hidden_size)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = make_norm(norm, hidden_size)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """The trunk the three networks share: patch tokens with a fixed position embedding, optional time and label
    embedders, and the stack of blocks. Subclasses add their heads, extend initialize_weights() for them, and call it.
    sit: SiT's time convention (https://github.com/willisma/SiT, the official CAFM networks): its time runs the other
    way, t_SiT = 1 - t, and is embedded without DiT's factor 1000."""
    def __init__(self, input_size, in_channels, patch_size, hidden_size, depth, num_heads, num_classes,
                 mlp_ratio=4.0, use_t=False, use_y=True, norm="ln", sit=False):
        super().__init__()
        self.input_size, self.in_channels, self.patch_size, self.sit = input_size, in_channels, patch_size, sit
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        if use_t:
            self.t_embedder = TimestepEmbedder(hidden_size, scale=1 if sit else 1000)
        if use_y:
            self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        # A frozen parameter, as in DiT: fixed sin-cos values, counted in the paper's parameter totals (Table 10).
        self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio, norm) for _ in range(depth)])

    def initialize_weights(self):
        """DiT's initialisation of the shared trunk: xavier-uniform linears with zero biases (subclasses then redo
        their heads), the patch projection like a linear, N(0, 0.02) label table and time MLP, zeroed adaLN."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        grid = int(self.x_embedder.num_patches ** 0.5)
        self.pos_embed.data.copy_(torch.from_numpy(get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid)).float()[None])
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        if hasattr(self, "y_embedder"):
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        if hasattr(self, "t_embedder"):
            nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
            nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)

    def embed_time(self, t):
        return self.t_embedder(1 - t if self.sit else t)

    def token_features(self, token, x, c):
        """Runs the blocks over [token, patches] and returns the token's features, (N, D)."""
        x = self.x_embedder(x) + self.pos_embed                    # (N, T, D)
        token = token.to(x.dtype).expand(x.shape[0], 1, -1)        # (N, 1, D), no position embedding
        x = torch.cat([token, x], dim=1)                           # (N, T+1, D)
        for block in self.blocks:
            x = block(x, c)                                        # (N, T+1, D)
        return x[:, 0]                                             # (N, D)


#################################################################################
#                                   Generator                                   #
#################################################################################

class Generator(DiT):
    """learn_sigma: an output layer of 2C channels of which the first C are used (SiT/DiT checkpoints). sit: SiT's
    time convention, its velocity is -v. null_class: the last class is the unconditional one (classifier-free
    guidance)."""
    def __init__(self, input_size, in_channels, patch_size, hidden_size, depth, num_heads, num_classes,
                 mlp_ratio=4.0, use_t_src=False, use_t_tgt=False, repeat=1, learn_sigma=False, sit=False,
                 null_class=False):
        if repeat > 1 and (use_t_src or use_t_tgt):
            raise ValueError("depth repetition is for one-step generators (use_t_src=use_t_tgt=False)")
        if use_t_tgt and not use_t_src:
            raise ValueError("an any-step generator (use_t_tgt) needs use_t_src too")
        # The repeated generator uses the time embedder for the repetition "time" of each pass.
        super().__init__(input_size, in_channels, patch_size, hidden_size, depth, num_heads, num_classes,
                         mlp_ratio, use_t=use_t_src or repeat > 1, sit=sit)
        self.use_t_src, self.use_t_tgt, self.repeat, self.null_class = use_t_src, use_t_tgt, repeat, null_class
        self.num_classes = num_classes
        if use_t_tgt:
            self.t_tgt_embedder = TimestepEmbedder(hidden_size)
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels * (2 if learn_sigma else 1))
        self.initialize_weights()

    def initialize_weights(self):
        super().initialize_weights()
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)   # DiT: the output starts at zero
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)
        if self.use_t_tgt:
            # AFM: the target-time embedder is added after DiT's initialisation, so its biases keep PyTorch's
            # default init; its weights get the N(0, 0.02) of DiT's time MLP.
            for linear in (self.t_tgt_embedder.mlp[0], self.t_tgt_embedder.mlp[2]):
                linear.reset_parameters()
                nn.init.normal_(linear.weight, std=0.02)

    def unpatchify(self, x):
        p, c = self.patch_size, x.shape[-1] // self.patch_size ** 2
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)                   # (N, H/p, W/p, p, p, C)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)  # (N, C, H, W)

    def forward(self, x, y, t_src=None, t_tgt=None):
        """Raw network output: the sample for one-step models, the velocity for few-step models."""
        x = self.x_embedder(x) + self.pos_embed                    # (N, T, D)
        c = self.y_embedder(y)                                     # (N, D)
        if self.use_t_src:
            c = c + self.embed_time(t_src)
        if self.use_t_tgt:
            c = c + self.t_tgt_embedder(t_tgt)
        for r in range(self.repeat):
            c_r = c
            if self.repeat > 1:
                t_r = torch.full((x.shape[0],), 1 - r / self.repeat, device=x.device)
                c_r = c + self.t_embedder(t_r)                     # (N, D)
            for block in self.blocks:
                x = block(x, c_r)                                  # (N, T, D)
        x = self.unpatchify(self.final_layer(x, c))[:, :self.in_channels]  # (N, C, H, W), without sigma channels
        return -x if self.sit else x


#################################################################################
#                                    Sampling                                   #
#################################################################################

def transport(G, x_src, y, t_src, t_tgt, velocity):
    """One generator step from x_src at time t_src to a sample at time t_tgt. G may be wrapped (DDP, compile)."""
    out = G(x_src, y, t_src, t_tgt).float()
    if not velocity:
        return out                                                 # one-step models predict the sample itself
    return x_src - (t_src - t_tgt).view(-1, *[1] * (x_src.dim() - 1)) * out  # x_t = x_s - (s - t) v


def guided(G, cfg_scale):
    """G with classifier-free guidance, v_null + s (v_y - v_null), the null class being G's last (s = 1: G itself)."""
    if cfg_scale == 1:
        return G

    def G_cfg(x, y, *times):
        null = torch.full_like(y, G.num_classes - 1)
        cond, uncond = G(torch.cat([x, x]), torch.cat([y, null]), *(torch.cat([t, t]) for t in times)).float().chunk(2)
        return uncond + cfg_scale * (cond - uncond)
    return G_cfg


@torch.no_grad()
def sample(G, z, y, steps=1, heun=False, cfg_scale=1.0):
    """Transports noise z (t = 1) to data (t = 0) in `steps` uniform steps with an unwrapped Generator: Euler steps, or
    Heun's (two evaluations a step) for a velocity of one time (flow matching, CAFM); cfg_scale needs a null class."""
    if steps > 1 and not G.use_t_src:
        raise ValueError(f"a one-step generator cannot sample in {steps} steps")
    if heun and (G.use_t_tgt or not G.use_t_src):
        raise ValueError("Heun steps are for a velocity of one time (flow matching, CAFM)")
    if cfg_scale != 1 and not G.null_class:
        raise ValueError("classifier-free guidance needs a generator trained with a null class")
    net, times, x = guided(G, cfg_scale), torch.linspace(1, 0, steps + 1, device=z.device), z
    for t_src, t_tgt in zip(times[:-1], times[1:]):
        s, t = t_src.expand(len(z)), t_tgt.expand(len(z))
        x_next = transport(net, x, y, s, t, velocity=G.use_t_src)
        if heun:                   # the trapezoid: x - (s - t) (v(x, s) + v(x_next, t)) / 2
            x_next = (x_next + x - (t_src - t_tgt) * net(x_next, y, t, t).float()) / 2
        x = x_next
    return x


def default_steps(nfe):
    return 8 if nfe == "any" else int(nfe)                     # any-step models: 8 steps, as the official code


def class_balanced_labels(num_samples, num_classes):
    """Sample i gets class i * C // K: 50 of each class for 50,000 ImageNet samples, in class order."""
    return [i * num_classes // num_samples for i in range(num_samples)]


def to_uint8(x):
    """[-1, 1] floats to the uint8 an official-release PNG holds: floor(255 * clamp((x + 1) / 2, 0, 1))."""
    return (x.float().add(1).div(2).clamp(0, 1) * 255).to(torch.uint8)


def noise(indices, shape, seed):
    """The starting noise of samples `indices`, (n, *shape) float32: sample i's from its own generator seeded by
    (seed, i), so it depends on neither the device, the number of ranks nor the batch size, and two seeds give
    unrelated samples (seed + i would give the same samples shifted by one). seed >= 0."""
    return torch.from_numpy(np.stack([np.random.default_rng([seed, i]).standard_normal(shape, dtype=np.float32)
                                      for i in indices]))


@torch.no_grad()
def generate(G, steps, decode, indices, labels, seed, batch_size, device, heun=False, cfg_scale=1.0):
    """Yields (indices, uint8 images (n, C, H, W), transport costs |G(z) - z|^2 / dim (n,)) for the given sample
    indices, batch by batch, from noise(); decode maps G's output to [-1, 1] images (the VAE decoder, or the identity
    for pixels). The next batch's noise is drawn on the host while the device samples this one."""
    shape, labels = (G.in_channels, G.input_size, G.input_size), torch.as_tensor(labels)
    chunks = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
    to_device = lambda t: (t.pin_memory() if torch.device(device).type == "cuda" else t).to(device, non_blocking=True)
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(noise, chunks[0], shape, seed) if chunks else None
        for k, chunk in enumerate(chunks):
            z = to_device(pending.result())                    # (n, C, H, W)
            if k + 1 < len(chunks):
                pending = pool.submit(noise, chunks[k + 1], shape, seed)
            x = sample(G, z, to_device(labels[chunk]), steps, heun, cfg_scale)
            yield chunk, to_uint8(decode(x)), (x - z).square().flatten(1).mean(1)


#################################################################################
#                          Discriminator and Classifier                         #
#################################################################################

def init_token_head(token, head):
    # AFM departs from DiT: the read-out replaces DiT's final layer after DiT's initialisation in the official code,
    # so it keeps PyTorch's default init, and the token gets N(0, 0.02).
    head[1].reset_parameters()
    nn.init.normal_(token, std=0.02)


class Discriminator(DiT):
    """AFM's D(x, y) or D(x, y, t); with norm="rms" (and use_t) CAFM's scalar potential D(x_t, y, t)."""
    def __init__(self, input_size, in_channels, patch_size, hidden_size, depth, num_heads, num_classes,
                 mlp_ratio=4.0, use_t=False, norm="ln", sit=False):
        super().__init__(input_size, in_channels, patch_size, hidden_size, depth, num_heads, num_classes,
                         mlp_ratio, use_t=use_t, norm=norm, sit=sit)
        self.use_t = use_t
        self.dis_embed = nn.Parameter(torch.zeros(hidden_size))
        self.final_layer = nn.Sequential(make_norm(norm, hidden_size), nn.Linear(hidden_size, 1, bias=False))
        self.initialize_weights()

    def initialize_weights(self):
        super().initialize_weights()
        init_token_head(self.dis_embed, self.final_layer)

    def forward(self, x, y, t=None):
        """Logits (N,) of x being real, for class y (and time t with use_t)."""
        c = self.y_embedder(y)                                     # (N, D)
        if self.use_t:
            c = c + self.embed_time(t)
        return self.final_layer(self.token_features(self.dis_embed, x, c)).view(-1)  # (N,)


class Classifier(DiT):
    def __init__(self, input_size, in_channels, patch_size, hidden_size, depth, num_heads, num_classes,
                 mlp_ratio=4.0):
        super().__init__(input_size, in_channels, patch_size, hidden_size, depth, num_heads, num_classes,
                         mlp_ratio, use_t=True, use_y=False)
        self.cls_embed = nn.Parameter(torch.zeros(hidden_size))
        self.final_layer = nn.Sequential(
            nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6),
            nn.Linear(hidden_size, num_classes, bias=True),
        )
        self.initialize_weights()

    def initialize_weights(self):
        super().initialize_weights()
        init_token_head(self.cls_embed, self.final_layer)

    def features(self, x, t):
        """The last hidden features (N, D): the class token after the blocks, before the read-out."""
        return self.token_features(self.cls_embed, x, self.t_embedder(t))

    def forward(self, x, t):
        """Class logits (N, num_classes) of x_t at time t."""
        return self.final_layer(self.features(x, t))


#################################################################################
#                                Sizes and modes                                #
#################################################################################

def mode_flags(nfe, repeat=1):
    """The one place a training mode becomes network flags: (Generator kwargs, Discriminator kwargs). nfe "1" is the
    one-step model (x-prediction, no time input, D blind to time); "2", "4", ... few-step models (velocity from the
    source time; D sees the target time); "any" also gives G the target time. repeat: depth repetition (one step)."""
    multi = nfe != "1"
    return dict(use_t_src=multi, use_t_tgt=nfe == "any", repeat=repeat), dict(use_t=multi)


# CAFM's networks (configs/models/cafm/sit/xl2.yaml): G is a flow model's velocity, as SiT's checkpoints hold it
# (learned sigma, SiT's time, 1,000 classes + the null one); D is the same trunk with RMSNorm, time and the token head.
SIT_FLAGS = dict(use_t_src=True, learn_sigma=True, sit=True, null_class=True)
SHAPE_KEYS = ("input_size", "in_channels", "patch_size", "hidden_size", "depth", "num_heads", "num_classes", "mlp_ratio")


def cafm_discriminator_kwargs(g_kwargs):
    """CAFM's D for the generator of `g_kwargs`: both start from the same flow model, so D takes its trunk."""
    return dict({k: g_kwargs[k] for k in SHAPE_KEYS if k in g_kwargs}, use_t=True, norm="rms",
                sit=g_kwargs.get("sit", False))


# B/2 ... XL/2 are the paper's sizes (Table 10); S/2 is for demos, T/2 for tests, XS/7 for 28-pixel images (the
# MNIST family at its own size: 16 tokens of 7 x 7 pixels) and XS/1 for their 16 x 4 x 4 latents of train_ae.py's
# autoencoder (16 tokens of one position); train.py's DEFAULTS has their hyperparameters.
SIZES = {
    "T/2": dict(depth=2, hidden_size=64, patch_size=2, num_heads=4),
    "XS/7": dict(depth=4, hidden_size=96, patch_size=7, num_heads=4),
    "XS/1": dict(depth=4, hidden_size=96, patch_size=1, num_heads=4),
    "S/2": dict(depth=12, hidden_size=384, patch_size=2, num_heads=6),
    "B/2": dict(depth=12, hidden_size=768, patch_size=2, num_heads=12),
    "M/2": dict(depth=16, hidden_size=1024, patch_size=2, num_heads=16),
    "L/2": dict(depth=24, hidden_size=1024, patch_size=2, num_heads=16),
    "XL/2": dict(depth=28, hidden_size=1152, patch_size=2, num_heads=16),
}
