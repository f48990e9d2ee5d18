"""
The Stable Diffusion KL-f8 autoencoder (sd-vae-ft-mse) in plain PyTorch, for encoding ImageNet into latents
(prepare_latents.py) and decoding samples back to pixels (sample.py), and SmallAE, a small convolutional autoencoder
for 28-pixel images (the MNIST family; trained by train_ae.py). Depends only on torch, so it can be copied alone into
another project.

Parameter names are exactly those of diffusers' AutoencoderKL, so released weights load with strict=True:
    vae = load_vae("sd-vae-ft-mse/diffusion_pytorch_model.safetensors")   # or .bin, or AFM's sd-vae-ft-mse.pth
    mean, logvar = vae.encode(x)          # x in [-1, 1], (N, 3, H, W) -> two (N, 4, H/8, W/8)
    x = vae.decode(z / SCALE)             # z: a latent in the scaled space the generator works in
Weights: https://huggingface.co/stabilityai/sd-vae-ft-mse (diffusion_pytorch_model.safetensors or .bin), or
sd-vae-ft-mse.pth from https://huggingface.co/ByteDance-Seed/Adversarial-Flow-Models/tree/main/misc
    ae = load_vae("results/ae/checkpoints/0003000.pt")   # a train_ae.py checkpoint: a SmallAE
    z = ae.encode(x)                      # x in [-1, 1], (N, 1, 28, 28) -> (N, 16, 4, 4), unscaled
"""
import hashlib
import json
import os
import pickle
import struct

import torch
import torch.nn as nn
import torch.nn.functional as F

# Latents are multiplied by this (about 1 / their std on ImageNet) so the generator sees unit variance, as in LDM
# (Rombach et al., 2022) and DiT. encode() and decode() work in unscaled units; callers apply SCALE.
SCALE = 0.18215


#################################################################################
#                                 Building Blocks                               #
#################################################################################

def Norm(channels):
    return nn.GroupNorm(32, channels, eps=1e-6)


def Conv(c_in, c_out, kernel_size=3, stride=1, padding=1):
    return nn.Conv2d(c_in, c_out, kernel_size, stride, padding)


class ResnetBlock(nn.Module):
    """Pre-activation residual block: (GroupNorm, SiLU, 3x3 conv) twice; 1x1 shortcut when widths differ."""
    def __init__(self, c_in, c_out):
        super().__init__()
        self.norm1, self.conv1 = Norm(c_in), Conv(c_in, c_out)
        self.norm2, self.conv2 = Norm(c_out), Conv(c_out, c_out)
        self.conv_shortcut = Conv(c_in, c_out, 1, padding=0) if c_in != c_out else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Attention(nn.Module):
    """Single-head self-attention over all H*W positions, with a residual connection (only in the mid blocks)."""
    def __init__(self, channels):
        super().__init__()
        self.group_norm = Norm(channels)
        self.to_q, self.to_k, self.to_v = (nn.Linear(channels, channels) for _ in range(3))
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # a list only so the key reads to_out.0

    def forward(self, x):
        N, C, H, W = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)                        # (N, H*W, C)
        q, k, v = (f(h).unsqueeze(1) for f in (self.to_q, self.to_k, self.to_v))  # (N, 1, H*W, C)
        h = F.scaled_dot_product_attention(q, k, v).squeeze(1)                   # softmax(q k^T / sqrt(C)) v
        h = self.to_out[0](h).transpose(1, 2).reshape(N, C, H, W)
        return x + h


class Resample(nn.Module):
    """Down: zero-pad right/bottom by one, then a stride-2 3x3 conv. Up: nearest 2x, then a 3x3 conv."""
    def __init__(self, channels, up):
        super().__init__()
        self.up = up
        self.conv = Conv(channels, channels, stride=1 if up else 2, padding=1 if up else 0)

    def forward(self, x):
        if self.up:
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric padding: (H, W) -> (H/2, W/2) exactly


class Block(nn.Module):
    """`num_layers` resnets, then an optional 2x down- or upsampler (stored where diffusers stores it)."""
    def __init__(self, c_in, c_out, num_layers, down=False, up=False):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(c_in if i == 0 else c_out, c_out) for i in range(num_layers)])
        self.downsamplers = nn.ModuleList([Resample(c_out, up=False)] if down else [])
        self.upsamplers = nn.ModuleList([Resample(c_out, up=True)] if up else [])

    def forward(self, x):
        for layer in [*self.resnets, *self.downsamplers, *self.upsamplers]:
            x = layer(x)
        return x


class MidBlock(nn.Module):
    """resnet -> attention -> resnet at the lowest resolution."""
    def __init__(self, channels):
        super().__init__()
        self.attentions = nn.ModuleList([Attention(channels)])
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels) for _ in range(2)])

    def forward(self, x):
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


#################################################################################
#                              Encoder and Decoder                              #
#################################################################################

class Encoder(nn.Module):
    def __init__(self, widths, layers_per_block, out_channels):
        super().__init__()
        self.conv_in = Conv(3, widths[0])
        last = len(widths) - 1  # no downsampling after the last level: 2**last = 8x in all
        self.down_blocks = nn.ModuleList([Block(widths[max(i - 1, 0)], w, layers_per_block, down=i < last)
                                          for i, w in enumerate(widths)])
        self.mid_block = MidBlock(widths[-1])
        self.conv_norm_out = Norm(widths[-1])
        self.conv_out = Conv(widths[-1], out_channels)

    def forward(self, x):
        h = self.conv_in(x)
        for block in self.down_blocks:
            h = block(h)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(h))))


class Decoder(nn.Module):
    # The decoder mirrors the encoder with one more resnet per level (as in LDM).
    def __init__(self, widths, layers_per_block, in_channels):
        super().__init__()
        widths = widths[::-1]
        self.conv_in = Conv(in_channels, widths[0])
        last = len(widths) - 1
        self.up_blocks = nn.ModuleList([Block(widths[max(i - 1, 0)], w, layers_per_block + 1, up=i < last)
                                        for i, w in enumerate(widths)])
        self.mid_block = MidBlock(widths[0])
        self.conv_norm_out = Norm(widths[-1])
        self.conv_out = Conv(widths[-1], 3)

    def forward(self, z):
        h = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            h = block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


# Older released files (sd-vae-ft-mse's .bin, AFM's .pth) name the attention layers differently.
OLD_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def rename_old_keys(state_dict):
    """Map old attention names to today's; 1x1-conv attention kernels (C, C, 1, 1) become linear (C, C)."""
    out = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if ".attentions." in key and len(parts) >= 2:
            parts[-2] = OLD_ATTENTION_NAMES.get(parts[-2], parts[-2])
            if value.dim() == 4 and parts[-1] == "weight" and parts[-2] != "group_norm":
                value = value[:, :, 0, 0]
        out[".".join(parts)] = value
    return out


class AutoencoderKL(nn.Module):
    """KL-regularised autoencoder; the defaults are the sd-vae-ft-mse configuration (8x downsampling)."""
    def __init__(self, block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4):
        super().__init__()
        self.encoder = Encoder(block_out_channels, layers_per_block, 2 * latent_channels)  # mean and logvar
        self.decoder = Decoder(block_out_channels, layers_per_block, latent_channels)
        self.quant_conv = Conv(2 * latent_channels, 2 * latent_channels, 1, padding=0)
        self.post_quant_conv = Conv(latent_channels, latent_channels, 1, padding=0)

    def encode(self, x):
        """(N, 3, H, W) in [-1, 1] -> posterior mean and log-variance, each (N, 4, H/8, W/8), unscaled."""
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z):
        """(N, 4, h, w) unscaled latent -> (N, 3, 8h, 8w) image, roughly in [-1, 1] (not clamped)."""
        return self.decoder(self.post_quant_conv(z))

    def load_state_dict(self, state_dict, strict=True, assign=False):
        return super().load_state_dict(rename_old_keys(state_dict), strict=strict, assign=assign)


#################################################################################
#                       A small autoencoder for small images                    #
#################################################################################
# A generator of 28-pixel images in pixel space (XS/7: a token per 7 x 7 patch) leaves seams along the patch edges;
# in the latent space of this autoencoder (16 x 4 x 4 by default, a token per position) its samples are clean, as the
# paper's are in the SD VAE's latent space.

def conv_block(c_in, c_out):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(8, c_out), nn.SiLU())


class SmallAE(nn.Module):
    """Images (N, channels, S, S) in [-1, 1], padded with -1 (the background) to a multiple of 2^down, to latents
    (N, latent, P / 2^down, P / 2^down): a stride-2 4x4 conv and a 3x3 block per level, widths width * 2^i, then a 1x1
    conv. The decoder mirrors it (nearest 2x upsampling, two blocks per level, a stride-2 transposed conv to the padded
    size) and crops the padding away. Not variational: train_ae.py keeps the latents small with a penalty on z^2."""
    def __init__(self, channels=1, image_size=28, latent=16, down=3, width=32):
        super().__init__()
        self.config = dict(channels=channels, image_size=image_size, latent=latent, down=down, width=width)
        self.channels, self.image_size, self.latent = channels, image_size, latent
        padded = -(-image_size // 2 ** down) * 2 ** down
        self.pad = ((padded - image_size) // 2, (padded - image_size + 1) // 2)   # (before, after), on both axes
        self.latent_size = padded // 2 ** down
        w = [width * 2 ** i for i in range(down)]
        enc = [nn.Conv2d(channels, w[0], 4, 2, 1), nn.SiLU(), conv_block(w[0], w[0])]
        for i in range(1, down):
            enc += [nn.Conv2d(w[i - 1], w[i], 4, 2, 1), nn.SiLU(), conv_block(w[i], w[i])]
        self.encoder = nn.Sequential(*enc, nn.Conv2d(w[-1], latent, 1))
        dec = [conv_block(latent, w[-1]), conv_block(w[-1], w[-1])]
        for i in range(down - 1, 0, -1):
            dec += [nn.Upsample(scale_factor=2, mode="nearest"), conv_block(w[i], w[i - 1]),
                    conv_block(w[i - 1], w[i - 1])]
        self.decoder = nn.Sequential(*dec, nn.ConvTranspose2d(w[0], channels, 4, 2, 1))

    def encode(self, x):
        """(N, C, S, S) in [-1, 1] -> (N, latent, s, s), unscaled."""
        a, b = self.pad
        return self.encoder(F.pad(x, (a, b, a, b), value=-1.0))

    def decode(self, z):
        """(N, latent, s, s) -> (N, C, S, S), roughly in [-1, 1] (not clamped)."""
        a, b = self.pad
        x = self.decoder(z)
        return x[..., a:x.shape[-2] - b, a:x.shape[-1] - b]

    def forward(self, x, noise=0.0):
        """(reconstruction of x from its latents plus `noise` x N(0, 1), the latents): the training pass."""
        z = self.encode(x)
        return self.decode(z + noise * torch.randn_like(z)), z


#################################################################################
#                                    Loading                                    #
#################################################################################

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def load_safetensors(path):
    """Read a .safetensors file without the safetensors package. Layout (https://github.com/huggingface/safetensors):
    u64 little-endian header size, a JSON header {name: {dtype, shape, data_offsets}}, then raw little-endian data."""
    with open(path, "rb") as f:
        (header_size,) = struct.unpack("<Q", f.read(8))
        if header_size > 100_000_000:
            raise ValueError(f"not a safetensors file (header size {header_size})")
        header = json.loads(f.read(header_size))
        data = memoryview(f.read())
    state_dict = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        raw = bytearray(data[begin:end])  # a copy out of the file buffer: aligned and writable
        flat = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        state_dict[name] = flat.reshape(info["shape"])
    return state_dict


def _shorten(keys, n=6):
    return "[" + ", ".join(keys[:n]) + (f", ... ({len(keys) - n} more)" if len(keys) > n else "") + "]"


WEIGHTS = ("get diffusion_pytorch_model.safetensors from https://huggingface.co/stabilityai/sd-vae-ft-mse or "
           "sd-vae-ft-mse.pth from https://huggingface.co/ByteDance-Seed/Adversarial-Flow-Models/tree/main/misc, or "
           "train a small autoencoder with train_ae.py")


AE_WEIGHTS = "train one with train_ae.py, whose checkpoints hold a small autoencoder's config and weights"


def read_weights(path, hint):
    """What a weights file holds (a .safetensors file, or a torch file loaded with weights_only=True), or
    FileNotFoundError / ValueError with a one-line message ending in `hint`."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"VAE weights not found: {path} ({hint})")
    try:
        if path.endswith(".safetensors"):
            return load_safetensors(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated download, an unrelated file, or a pickle that carries code (never run)
        reason = ("corrupt, or a pickle that would run code" if isinstance(e, pickle.UnpicklingError)
                  else f"{type(e).__name__}: {e}".splitlines()[0])  # torch's own messages run over many lines
        raise ValueError(f"{path}: cannot read VAE weights ({reason}); {hint}") from e


def is_ae_checkpoint(ckpt):
    return isinstance(ckpt, dict) and isinstance(ckpt.get("config"), dict) and "AE" in ckpt["config"]


def load_ae(path, device="cpu", ckpt=None):
    """The frozen SmallAE of a train_ae.py checkpoint (`ckpt`: the file's contents when already read), built from the
    config stored with its weights; any other file raises FileNotFoundError or ValueError with a one-line message."""
    ckpt = read_weights(path, AE_WEIGHTS) if ckpt is None else ckpt
    if not is_ae_checkpoint(ckpt):
        raise ValueError(f"{path} is not a small autoencoder; {AE_WEIGHTS}")
    try:
        ae = SmallAE(**ckpt["config"]["AE"])
        ae.load_state_dict(ckpt["AE"])
    except (TypeError, KeyError, RuntimeError, ValueError) as e:  # a damaged or edited checkpoint
        raise ValueError(f"{path}: its small autoencoder does not load ({' '.join(str(e).split())[:200]})") from e
    return ae.to(device).eval().requires_grad_(False)


def file_sha1(path):
    """The file's identity, which a data set of latents records so that only its own autoencoder decodes them."""
    with open(path, "rb") as f:
        return hashlib.sha1(f.read()).hexdigest()


def load_vae(path, device="cpu"):
    """Load a frozen AutoencoderKL from diffusers' .safetensors / .bin or a plain state dict (.pth, .pt), or the
    SmallAE of a train_ae.py checkpoint (load_ae): what the file holds decides. Channel widths are read from the file,
    so other KL autoencoders of this family load too.
    A file that is not such weights raises FileNotFoundError or ValueError with a one-line message."""
    state_dict = read_weights(path, WEIGHTS)
    if is_ae_checkpoint(state_dict):
        return load_ae(path, device, state_dict)
    if isinstance(state_dict, dict) and isinstance(state_dict.get("state_dict"), dict):
        state_dict = state_dict["state_dict"]
    if not isinstance(state_dict, dict) or not all(torch.is_tensor(v) for v in state_dict.values()):
        raise ValueError(f"{path}: not a state dict of tensors; {WEIGHTS}")
    for prefix in ("module.", "vae."):
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
    state_dict = rename_old_keys(state_dict)

    widths, layers = [], 0
    while f"encoder.down_blocks.{len(widths)}.resnets.0.conv1.weight" in state_dict:
        widths.append(state_dict[f"encoder.down_blocks.{len(widths)}.resnets.0.conv1.weight"].shape[0])
    while f"encoder.down_blocks.0.resnets.{layers}.conv1.weight" in state_dict:
        layers += 1
    latent = state_dict["post_quant_conv.weight"].shape[0] if "post_quant_conv.weight" in state_dict else 4
    vae = AutoencoderKL(tuple(widths) or (128, 256, 512, 512), layers or 2, latent)

    expected = vae.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [k for k in expected if k in state_dict and state_dict[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(f"{path} is not a KL autoencoder state dict: missing keys {_shorten(missing)}, "
                         f"unexpected keys {_shorten(unexpected)}, wrong shapes {_shorten(wrong)}")
    vae.load_state_dict(state_dict)
    return vae.to(device).eval().requires_grad_(False)
