"""
The test suite: CPU only, tiny models, a few minutes on 2 cores.

    python -m pytest -q test_smoke.py
    python test_smoke.py

Reference vectors live in fixtures/ (see fixtures/README.md for how each was made); the networks' weights are
rebuilt from (key, shape) lists by fill() below, so the fixtures stay small.
"""
import ast
import atexit
import contextlib
import errno
import functools
import glob
import gzip
import hashlib
import importlib
import io
import json
import math
import os
import re
import runpy
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
import scipy.linalg
from scipy.special import ndtr, ndtri
import torch
import torch.nn.functional as F
from PIL import Image

import checkpoint
import common
import fid
import loss
import model
import prepare_latents
import toy
import train
import train_ae
import train_classifier
import vae
from data import LatentData, first_bad_row, make_decoder
from judge import load_judge, npz_images, spread


#################################################################################
#                          Shared helpers and constants                         #
#################################################################################

HERE = os.path.dirname(os.path.abspath(__file__))

FIXTURES = os.path.join(HERE, "fixtures")


def fill(keys_shapes, seed=0):
    """Deterministic weights by key, in the listed order (the procedure behind every reference vector)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in keys_shapes:
        shape = tuple(shape)
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.tensor(0, dtype=torch.long)
        elif k.endswith("running_var"):
            sd[k] = 0.5 + torch.rand(shape, generator=g)
        elif k.endswith("running_mean"):
            sd[k] = 0.1 * torch.randn(shape, generator=g)
        elif len(shape) >= 2:
            gain = math.sqrt(2) if len(shape) == 4 else 1.0
            sd[k] = gain * torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))
        elif any(s in k for s in ("norm", "bn.weight", "gamma")) and k.endswith("weight"):
            sd[k] = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            sd[k] = 0.1 * torch.randn(shape, generator=g)
    return sd


def run_script(script, *argv):
    """Runs a script's __main__ in this process (no interpreter start-up), as `python script argv...` would; torch's
    thread count is given back afterwards (scripts may pin it to one)."""
    old, threads = sys.argv, torch.get_num_threads()
    sys.argv = [script, *map(str, argv)]
    try:
        runpy.run_path(os.path.join(HERE, script), run_name="__main__")
    finally:
        sys.argv = old
        torch.set_num_threads(threads)


def cli_error(script, *argv, match=""):
    """A user error: the script, run in this process, must end with one line `error: ...` holding `match` and a
    non-zero exit, not a traceback (the exit message of common.fail; for fid.py, which stands alone, the line it
    prints to stderr before exit status 1). Returns the line."""
    stderr = io.StringIO()
    with pytest.raises(SystemExit) as e, contextlib.redirect_stderr(stderr):
        run_script(script, *argv)
    message = stderr.getvalue().removesuffix("\n") if e.value.code == 1 else str(e.value.code)
    assert message.startswith("error:") and "\n" not in message and match in message, message
    return message


def launch(script, *argv, node=None):
    """The one way these tests start two processes: `torchrun --standalone --nproc_per_node=2 script argv...`, or with
    node=(rank, port) one of two nodes of one process each that meet at 127.0.0.1:port, as two machines would. One
    thread per process (two ranks on a busy machine would otherwise oversubscribe 2 cores). Returns the Popen."""
    nodes = (["--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(node[0]), "--master-addr", "127.0.0.1",
              "--master-port", str(node[1])] if node else ["--standalone", "--nproc_per_node=2"])
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *nodes, script, *map(str, argv)], cwd=HERE,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def torchrun(script, *argv):
    """launch, waited for: the CompletedProcess (returncode, stdout, stderr)."""
    proc = launch(script, *argv)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def make_data(path, n=24, num_classes=5, size=8, channels=3, std=False, seed=0):
    """A tiny data directory in train.py's format (pixel-space unless std is given)."""
    rng = np.random.default_rng(seed)
    os.makedirs(path, exist_ok=True)
    x = np.clip(rng.standard_normal((n, 1, channels, size, size)) * 0.5, -1, 1)
    np.save(os.path.join(path, "latents.npy"), np.concatenate([x, x[..., ::-1]], 1).astype(np.float16))
    if std:
        np.save(os.path.join(path, "std.npy"), np.full((n, 2, channels, size, size), 0.05, np.float16))
    np.save(os.path.join(path, "labels.npy"), rng.integers(0, num_classes, n).astype(np.int64))
    info = dict(num_classes=num_classes, image_size=size, scale=1.0, vae="none")
    with open(os.path.join(path, "info.json"), "w") as f:
        json.dump(info, f)
    return str(path)


def exit_status(argv):
    """The exit status of a script, run in this process, that must stop (argparse: 2, a signal: 130)."""
    with pytest.raises(SystemExit) as e:
        run_script(*argv)
    return e.value.code


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"))


TRAIN = ["--model", "T/2", "--device", "cpu", "--global-batch-size", 8, "--log-every", 2]

TWIN = ["--model", "T/2", "--device", "cpu", "--global-batch-size", 8, "--log-every", 2, "--lr", 0.02]  # F moves

CLS = ["--model", "T/2", "--device", "cpu", "--log-every", 2, "--lr", 1e-3]


class Exploit:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


#################################################################################
#                          Layout: imports flow one way                         #
#################################################################################

SCRIPTS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(HERE, "*.py")) if "test_" not in p)


def project_imports(name):
    """-> (project modules imported at module level, project modules imported inside a function or class)."""
    tree = ast.parse(open(os.path.join(HERE, name + ".py")).read())
    def imported(nodes):
        found = set()
        for node in nodes:
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                found.add(node.module.split(".")[0])
        return found & set(SCRIPTS)
    scopes = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    nested = imported(n for scope in scopes for n in ast.walk(scope))
    return imported(ast.walk(tree)) - nested, nested


LIBRARIES = {"model", "vae", "fid", "loss", "common", "data", "checkpoint"}   # imported by scripts; import no script


def test_imports_flow_one_way():
    """Library files import no script, and model/vae/fid/common nothing of the project, loss.py model.py alone (each can be
    copied out with what it names); no script imports a script; no cycle; no project import hidden in a function."""
    graph = {}
    for name in SCRIPTS:
        importlib.import_module(name)                          # every file imports without running
        graph[name], nested = project_imports(name)
        assert not nested, f"{name} imports {nested} inside a function"
    assert LIBRARIES | {"train", "twinflow", "sample", "prepare_latents", "train_classifier", "judge", "toy"} <= set(graph)
    for ground in ("model", "vae", "fid", "common"):         # copyable alone; common.py is every script's ground floor
        assert not graph[ground], f"{ground}.py imports {graph[ground]}"
    assert graph["loss"] == {"model"}
    for name, imported in graph.items():
        assert imported <= LIBRARIES, f"{name} imports the script(s) {imported - LIBRARIES}"
    def reaches(a, b, seen=()):
        return any(n == b or (n not in seen and reaches(n, b, seen + (n,))) for n in graph[a])
    assert not [n for n in graph if reaches(n, n)], "import cycle"


#################################################################################
#                             model.py: the networks                            #
#################################################################################

REF = torch.load(os.path.join(FIXTURES, "models.pt"), weights_only=True)

TINY = dict(input_size=8, in_channels=4, patch_size=2, hidden_size=64, depth=2, num_heads=4, num_classes=10)


@pytest.mark.parametrize("name", sorted(REF["variants"]))
def test_reference_vectors(name):
    """Official-layout weights load with strict=True and reproduce the official networks' outputs."""
    v, i = REF["variants"][name], REF["inputs"]
    net = getattr(model, v["kind"])(**TINY, **v["kwargs"])
    assert torch.equal(net.pos_embed.data, REF["pos_embed"])   # our sin-cos table is the official one
    state = fill(v["keys"], v["seed"])
    state["pos_embed"] = REF["pos_embed"]
    net.load_state_dict(state, strict=True)
    with torch.no_grad():
        if v["kind"] == "Generator":
            out = net.eval()(i["x"], i["y"], i["t_src"], i["t_tgt"])
        elif v["kind"] == "Discriminator":
            out = net.eval()(i["x"], i["y"], i["t_tgt"])
        else:
            out = net.eval()(i["x"], i["t_src"])
    assert out.shape == v["output"].shape
    torch.testing.assert_close(out, v["output"], atol=1e-5, rtol=1e-5)


def test_parameter_counts_match_the_paper():
    """Table 10: generator B/2 130M, XL/2 673M (675M with a time embedder); discriminator B/2 129M, XL/2 671M."""
    def millions(cls, size, **kw):
        with torch.device("meta"):
            net = cls(**model.SIZES[size], input_size=32, in_channels=4, num_classes=1000, **kw)
        return round(sum(p.numel() for p in net.parameters()) / 1e6)
    assert millions(model.Generator, "B/2") == 130
    assert millions(model.Generator, "XL/2") == 673
    assert millions(model.Generator, "XL/2", use_t_src=True) == 675
    assert millions(model.Generator, "XL/2", repeat=4) == 675     # the 112-layer model: same weights, R passes
    assert millions(model.Discriminator, "B/2") == 129
    assert millions(model.Discriminator, "XL/2") == 671
    assert [millions(model.Generator, s) for s in ("M/2", "L/2")] == [306, 457]
    assert [millions(model.Discriminator, s) for s in ("M/2", "L/2")] == [304, 455]


def test_initialisation_follows_the_official_code():
    torch.manual_seed(0)
    G = model.Generator(**TINY, use_t_src=True, use_t_tgt=True)
    D = model.Discriminator(**TINY)
    assert G.final_layer.linear.weight.abs().sum() == 0 and G.blocks[0].adaLN_modulation[1].weight.abs().sum() == 0
    assert 0.01 < G.t_tgt_embedder.mlp[0].weight.std() < 0.03 and G.t_tgt_embedder.mlp[0].bias.abs().sum() > 0
    assert D.final_layer[1].weight.abs().sum() > 0 and 0.01 < D.dis_embed.std() < 0.03
    assert not G.pos_embed.requires_grad and not hasattr(model.Generator(**TINY), "t_embedder")


def test_repetition_runs_the_same_blocks_R_times():
    """With R passes the output differs from one pass, and pass r sees the time 1 - r/R."""
    torch.manual_seed(0)
    G = model.Generator(**TINY, repeat=4)
    seen = []
    G.t_embedder.register_forward_hook(lambda m, inp, out: seen.append(inp[0][0].item()))
    G(torch.randn(2, 4, 8, 8), torch.tensor([1, 2]))
    assert seen == [1.0, 0.75, 0.5, 0.25]
    with pytest.raises(ValueError):
        model.Generator(**TINY, repeat=2, use_t_src=True)


#################################################################################
#                            loss.py: the objectives                            #
#################################################################################

class LinearD(torch.nn.Module):
    """D(x, y, t) = <w, x> + b_y (+ t): finite differences of a linear D are exact, so R1/R2 can be hand-checked."""
    def __init__(self, dim):
        super().__init__()
        self.w = torch.nn.Parameter(torch.linspace(-1, 1, dim))
        self.b = torch.nn.Parameter(torch.tensor([0.5, -0.25, 0.0]))

    def forward(self, x, y, t=None):
        return x.flatten(1) @ self.w + self.b[y] + (0 if t is None else t)


def test_discriminator_loss_terms_by_hand():
    D = LinearD(4)
    x_real, x_fake = torch.arange(16.).view(4, 4) / 10, -torch.arange(16.).view(4, 4) / 20
    y, t, w = torch.tensor([0, 1, 2, 0]), torch.tensor([0.5, 0.25, 0.0, 0.75]), torch.tensor([0.5, 0.5, 1.0, 0.25])
    torch.manual_seed(0)
    total, stats = loss.discriminator_loss(D, x_real, x_fake, y, t, w, gp_scale=0.25, gp_eps=0.01, gp_ratio=0.5,
                                           cp_scale=0.01)
    torch.manual_seed(0)                                       # the same noise the loss drew
    n1, n2 = torch.randn(2, 4), torch.randn(2, 4)
    with torch.no_grad():
        real, fake = D(x_real, y, t), D(x_fake, y, t)
        adv = torch.log1p(torch.exp(-(real - fake))).mean()
        r1 = (0.25 * w[:2] / 1e-4 * (0.01 * n1 @ D.w) ** 2).mean()   # exact finite difference of a linear D
        r2 = (0.25 * w[:2] / 1e-4 * (0.01 * n2 @ D.w) ** 2).mean()
        cp = 0.01 * ((real + fake) ** 2).mean()
    for key, value in dict(loss_d=adv, r1=r1, r2=r2, cp=cp).items():
        torch.testing.assert_close(stats[key], value, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(total, adv + r1 + r2 + cp, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(stats["logits_real"], real.mean())


def test_generator_loss_terms_by_hand():
    D = LinearD(4)
    x_fake = torch.tensor([[1., 0, 0, 0], [0, 2, 0, 0]], requires_grad=True)
    x_src, x_real = torch.zeros(2, 4), torch.ones(2, 4)
    y, w = torch.tensor([0, 1]), torch.tensor([1.0, 0.5])
    total, stats = loss.generator_loss(D, x_fake, x_src, x_real, y, None, w, ot_scale=0.2,
                                        grad_norm=torch.nn.Identity())
    with torch.no_grad():
        real, fake = D(x_real, y), D(x_fake, y)
    torch.testing.assert_close(stats["loss_g"], torch.log1p(torch.exp(-(fake - real))).mean())
    torch.testing.assert_close(stats["ot"], torch.tensor((0.2 * 1 / 4 / 1.0 + 0.2 * 4 / 4 / 0.5) / 2))
    total.backward()
    assert D.w.grad is not None and x_fake.grad.abs().sum() > 0


def test_gradient_normalisation_makes_the_loss_scale_irrelevant():
    """D's gradient into G, through GradNorm, is the same whether the loss is scaled by 1 or 1000."""
    grads = []
    for scale in (1.0, 1000.0):
        torch.manual_seed(0)
        G = torch.nn.Linear(3, 4)
        gn = loss.GradNorm()
        x = G(torch.randn(5, 3))
        (gn(x).tanh().sum() * scale).backward()
        grads.append(G.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)
    # The running statistic: EMA_0.9 of |g|^2 numel, starting from 0.
    x = torch.randn(5, 4, requires_grad=True)
    gn = loss.GradNorm()
    out = gn(x)
    out.backward(torch.full((5, 4), 2.0))
    square = 4.0 * 20 * 20
    torch.testing.assert_close(gn.square_avg, torch.tensor(0.1 * square))
    torch.testing.assert_close(x.grad, torch.full((5, 4), 2.0) / (math.sqrt(0.1 * square) + 1e-8))


def test_ot_scale_schedule():
    assert loss.ot_scale_at(0, 0.2, 0.005, 101) == pytest.approx(0.2)
    assert loss.ot_scale_at(50, 0.2, 0.005, 101) == pytest.approx(0.1025)
    assert loss.ot_scale_at(100, 0.2, 0.005, 101) == loss.ot_scale_at(10**6, 0.2, 0.005, 101) == 0.005
    assert {loss.ot_scale_at(s, 0.001, 0.001, 101) for s in (0, 50, 10**6)} == {0.001}   # a constant stage


def test_batches_share_the_image_not_the_noise(data):
    torch.manual_seed(0)
    d = LatentData(data)
    for nfe, expect in (("1", {(1.0, 0.0)}), ("4", {(1.0, .75), (.75, .5), (.5, .25), (.25, 0.0)})):
        b = batch(d, 64, nfe)
        assert set(zip(b["t_src"].tolist(), b["t_tgt"].tolist())) == expect
    b = batch(d, 64, "any")
    assert ((b["t_tgt"] <= b["t_src"]) & (b["t_src"] <= 1)).all() and b["weighting"].min() >= 0.001
    b = batch(d, 4, "1")
    assert not torch.equal(b["x_src"], b["x_tgt"])             # one step: x_s is pure noise, x_t is the data
    rows = np.load(os.path.join(data, "latents.npy")).astype(np.float32)
    assert any(np.allclose(b["x_tgt"][0].numpy(), rows[i, v]) for i in range(len(rows)) for v in range(2))


def batch(data, n, nfe):
    return loss.afm_batch(*data.sample(n), nfe)


def players(nfe="1"):
    torch.manual_seed(0)
    kw = dict(TINY, in_channels=3, num_classes=5)
    G = model.Generator(**kw, use_t_src=nfe != "1")
    D = model.Discriminator(**kw, use_t=nfe != "1")
    # adaLN-Zero makes a fresh D ignore its input; random weights give every parameter a gradient.
    for net in (G, D):
        for p in net.parameters():
            if p.requires_grad:
                p.data.normal_(0, 0.05)
    return G, D


def snapshot(net):
    return {k: v.clone() for k, v in net.state_dict().items()}


def changed(net, before):
    return {k for k, v in net.state_dict().items() if not torch.equal(v, before[k])}


def test_d_step_changes_only_d_and_g_step_only_g(data):
    players_kw = dict(velocity=True, d_time=True, grad_clip=5.0)
    G, D = players("2")
    EMA = model.Generator(**dict(TINY, in_channels=3, num_classes=5), use_t_src=True)
    EMA.load_state_dict(G.state_dict())
    opt_G, opt_D = torch.optim.AdamW(G.parameters(), lr=1e-3), torch.optim.AdamW(D.parameters(), lr=1e-3)
    d = LatentData(data)
    g0, d0, e0 = snapshot(G), snapshot(D), snapshot(EMA)
    stats = loss.DStep(G, D, opt_D, **players_kw)(batch(d, 8, "2"))
    assert not changed(G, g0) and changed(D, d0) == set(d0) - {"pos_embed"}
    assert all(torch.isfinite(v) for v in stats.values())
    d1, d_grads = snapshot(D), [None if p.grad is None else p.grad.clone() for p in D.parameters()]
    assert all(p.grad is None for p in D.parameters())      # D's gradients are freed right after its step
    stats = loss.GStep(G, D, opt_G, loss.GradNorm(), **players_kw)(batch(d, 8, "2"), ot_scale=0.25)
    assert all(p.grad is None for p in G.parameters())      # and G's after its own
    assert not changed(D, d1) and changed(G, g0) == set(g0) - {"pos_embed"}
    # D passed gradients to G without collecting any itself, and is trainable again (pos_embed stays frozen).
    assert all(a is None and p.grad is None or torch.equal(a, p.grad) for a, p in zip(d_grads, D.parameters()))
    assert [n for n, p in D.named_parameters() if not p.requires_grad] == ["pos_embed"]
    assert not changed(EMA, e0)
    loss.update_ema(EMA, G, 0.9)
    assert changed(EMA, e0) == set(e0) - {"pos_embed"}
    torch.testing.assert_close(EMA.x_embedder.proj.bias, 0.9 * e0["x_embedder.proj.bias"] + 0.1 * G.x_embedder.proj.bias)


class _AutocastSpy(torch.nn.Module):
    """A linear G (x, y, t_src, t_tgt) or D (x, y, t: summed to one logit) that records whether CPU autocast was on."""
    def __init__(self, discriminator=False):
        super().__init__()
        self.lin, self.seen, self.discriminator, self.use_t_src = torch.nn.Linear(4, 4), [], discriminator, False

    def forward(self, x, y, *times):
        self.seen.append(torch.is_autocast_enabled("cpu"))
        return self.lin(x).sum(1) if self.discriminator else self.lin(x)


def test_bf16_runs_g_under_autocast_and_d_in_fp32():
    torch.manual_seed(0)
    G, D = _AutocastSpy(), _AutocastSpy(discriminator=True)
    opt_G, opt_D = (torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (G, D))
    batch = loss.afm_batch(torch.randn(8, 4), torch.zeros(8, dtype=torch.long), "1")
    loss.DStep(G, D, opt_D, velocity=False, d_time=False, bf16=True)(batch)
    loss.GStep(G, D, opt_G, loss.GradNorm(), velocity=False, d_time=False, bf16=True)(batch, 0.1)
    assert G.seen == [True, True] and len(D.seen) == 3 and not any(D.seen)


def test_augment_shares_parameters_and_moves_whole_pixels():
    torch.manual_seed(0)
    x = torch.randn(64, 2, 8, 8)
    a, b = loss.augment(x, x + 1, 0.0)
    assert torch.equal(a, x) and torch.equal(b, x + 1)                          # p = 0: the identity
    a, b = loss.augment(x, x.clone(), 1.0)
    assert torch.equal(a, b)                                                    # one set of parameters per pair
    # Unique positive values: every output pixel is 0 (erased or vacated) or the input pixel at one whole-pixel shift
    # (dx, dy) per sample, right and down: Kornia's round(u W / (W - 1)) for u ~ U(0, 0.3 W), as it shifts by pixel
    # coordinates normalised by W - 1 (up to 3 pixels at W = 8, not round(u)'s 2).
    x = (torch.arange(64 * 2 * 8 * 8, dtype=torch.float32) + 1).view(64, 2, 8, 8)
    fake = x.clone().requires_grad_(True)
    torch.manual_seed(1)
    a, b = loss.augment(x, fake, 1.0)
    torch.manual_seed(1)
    torch.rand(64)                                                              # the draw of which pairs shift
    expected = [tuple(v) for v in torch.round(torch.rand(2, 64) * 0.3 * 8 * 8 / 7).long().T.tolist()]  # (dx, dy)
    zeros, shifts = (a == 0).float().mean().item(), set()
    for n in range(64):
        kept = (a[n, 0] != 0).nonzero()
        assert len(kept), "a sample erased entirely"
        i, j = kept[0].tolist()
        flat = int(a[n, 0, i, j].item()) - 1 - n * 128                          # where the value came from
        dy, dx = i - flat // 8, j - flat % 8
        assert (dx, dy) == expected[n] and 0 <= dx <= 3 and 0 <= dy <= 3
        shifts.add((dx, dy))
        moved = torch.zeros(2, 8, 8)
        moved[:, dy:, dx:] = x[n, :, :8 - dy, :8 - dx]
        assert torch.equal(torch.where(a[n] != 0, moved, a[n]), a[n]) and ((a[n] == 0) | (a[n] == moved)).all()
    assert len(shifts) > 3 and any(3 in d for d in shifts) and 0.2 < zeros < 0.9  # 3 px: not round(u)'s
    b.sum().backward()
    assert ((fake.grad == 1) | (fake.grad == 0)).all() and fake.grad.sum() > 0  # differentiable in the fake sample
    # Kornia's erasing boxes: areas of 10-50 % (up to rounding), h/w below 1 half of the time, always inside.
    torch.manual_seed(0)
    y0, x0, h, w = loss.erasing_boxes(20000, 32, 32, "cpu")
    area = (h * w).float() / 32 ** 2
    assert 0.1 - 0.04 < area.min() and area.max() < 0.5 + 0.04 and abs(area.mean() - 0.3) < 0.01
    assert abs((h < w).float().mean() - 0.5) < 0.03 and (h.float() / w).max() < 3.3 * 1.2
    assert (y0 >= 0).all() and (x0 >= 0).all() and (y0 + h <= 32).all() and (x0 + w <= 32).all()
    assert y0.float().std() > 3 and x0.float().std() > 3                       # placed anywhere it fits
    p_half = loss.augment(torch.ones(4000, 1, 8, 8), torch.ones(4000, 1, 8, 8), 0.4)[0]
    assert 0.6 < (p_half == 1).all(-1).all(-1).float().mean().item() / 0.6 ** 4 < 1.4   # untouched ~ (1 - p)^4


class LinearC(torch.nn.Module):
    """A classifier C(x, t) = x W + t b with frozen weights: the guidance loss can be computed by hand."""
    def __init__(self, dim, classes=3):
        super().__init__()
        self.w = torch.nn.Parameter(torch.linspace(-1, 1, dim * classes).view(dim, classes), requires_grad=False)
        self.b = torch.nn.Parameter(torch.tensor([0.5, -1.0, 2.0]), requires_grad=False)

    def forward(self, x, t):
        return x.flatten(1) @ self.w + t[:, None] * self.b


def test_classifier_guidance_by_hand():
    C, x = LinearC(4), torch.tensor([[1., 0, 0, 2], [0, 1, -1, 0], [2, 2, 0, 1]], requires_grad=True)
    y = torch.tensor([0, 2, 1])
    torch.manual_seed(0)
    one_step = loss.guidance_loss(C, x, y, None, 0.0, 0.1)                    # t' ~ U(0, 0.1), x' = (1-t')x + t'z'
    torch.manual_seed(0)
    t = 0.1 * torch.rand(3)
    x_cg = (1 - t[:, None]) * x + t[:, None] * torch.randn(3, 4)
    logp = torch.log_softmax(x_cg @ C.w + t[:, None] * C.b, 1)
    torch.testing.assert_close(one_step, -logp[torch.arange(3), y].mean())
    t = torch.tensor([0.0, 0.25, 0.5])                                          # few steps: t' = t, guided in [0, .25]
    few = loss.guidance_loss(C, x, y, t, 0.0, 0.25)
    logp = torch.log_softmax(x @ C.w + t[:, None] * C.b, 1)
    torch.testing.assert_close(few, -(logp[0, 0] + logp[1, 2]) / 3)
    few.backward()
    assert x.grad[:2].abs().sum() > 0 and x.grad[2].abs().sum() == 0 and C.w.grad is None


def test_guided_g_step_trains_g_only(data):
    G, D = players("1")
    C = model.Classifier(**dict(TINY, in_channels=3, num_classes=5)).requires_grad_(False)
    opt_G = torch.optim.AdamW(G.parameters(), lr=1e-3)
    g0, d0, c0 = snapshot(G), snapshot(D), snapshot(C)
    g_step = loss.GStep(G, D, opt_G, loss.GradNorm(), velocity=False, d_time=False, grad_clip=50.0, aug_p=0.4,
                        guidance=loss.Guidance(C, 0.003, (0.0, 0.1)))
    stats = g_step(batch(LatentData(data), 8, "1"), ot_scale=0.2)
    assert stats["cg"] > 0 and changed(G, g0) and not changed(D, d0) and not changed(C, c0)
    assert all(p.grad is None for p in C.parameters())


class _ToyVelocity(torch.nn.Module):
    """F(x, y, t, t_tgt) = a x + b t + c t_tgt + d + e x t + f x t_tgt (+ g_y with labels), elementwise in float64:
    smooth enough to work out by hand, with x, both times and the label interacting so that no input can be mixed up
    unnoticed. x may be (N, 1) (the toy) or (N, C, H, W) (images); times are (N,)."""
    def __init__(self, a, b, c, d, e, f, g=(0.0, 0.0, 0.0)):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([a, b, c, d, e, f], dtype=torch.float64))
        self.g = torch.nn.Parameter(torch.tensor(g, dtype=torch.float64))

    def forward(self, x, y, t_src, t_tgt):
        out = (self.w * self.features(x, t_src, t_tgt)).sum(-1)
        return out if y is None else out + self.g[y].view(-1, *[1] * (x.dim() - 1))

    @staticmethod
    def features(x, t, tt):                                   # dF/dw, (*x.shape, 6)
        x = torch.as_tensor(x, dtype=torch.float64)
        t, tt = (torch.as_tensor(v, dtype=torch.float64).reshape(-1, *[1] * (x.dim() - 1)).expand_as(x) for v in (t, tt))
        return torch.stack([x, t, tt, torch.ones_like(x), x * t, x * tt], -1)


@pytest.mark.parametrize("shape, cfg", [((1,), 0.0), ((1, 2, 2), 0.5)])
def test_twinflow_loss_terms_by_hand(shape, cfg):
    """loss.twinflow_losses, which toy.py (1-D, no labels) and twinflow.py (images, labels, the CFG-enhanced target)
    both train with, against the tutorial's arithmetic written out per element in plain floats. Three samples: an RCGM
    roll-out, a t_tgt within DELTA of t (flow matching) and one whose residual is clipped."""
    P = math.prod(shape)
    per_pixel = lambda *v: torch.tensor(v, dtype=torch.float64).view(-1, 1) + torch.linspace(0, 0.2, P, dtype=torch.float64)
    x, z, z2 = per_pixel(0.5, -1.0, 1.5), per_pixel(1.0, 0.3, -0.7), per_pixel(0.2, -0.4, 0.9)   # (3, P)
    t, t_tgt, t2 = torch.tensor([0.8, 0.5, 0.3]), torch.tensor([0.2, 0.495, 0.0]), torch.tensor([0.6, 0.1, 0.9])
    t, t_tgt, t2 = (v.double() for v in (t, t_tgt, t2))
    y, y_cfg = (torch.tensor([0, 2, 1]), torch.tensor([1, 2, 0])) if cfg else (None, None)
    # A nearly constant field and an EMA close to it, so that the roll-out's residual falls inside the clip.
    G = _ToyVelocity(3e-3, -2e-3, 4e-3, 0.8, 2e-3, -3e-3, g=(1e-3, -2e-3, 3e-3))
    EMA = _ToyVelocity(4e-3, -1e-3, 3e-3, 0.802, 3e-3, -2e-3, g=(5e-3, 1e-3, -4e-3)).requires_grad_(False)
    image = lambda v: v.view(3, *shape)
    losses = loss.twinflow_losses(G, EMA, image(x), y, image(z), t, t_tgt, image(z2), t2, y_cfg=y_cfg, cfg_ratio=cfg)
    assert list(losses) == ["base", "real", "fake", "rectify", "base_one_step"]

    # The tutorial's arithmetic (methodes.py), written out per element in plain floats.
    g, ema = G.w.tolist(), EMA.w.tolist()
    Fw = lambda w, b, x, t, tt: sum(wi * fi for wi, fi in zip(w, _ToyVelocity.features([x], [t], [tt]).view(-1).tolist())) + b

    def rcgm(F_th, xt, v, t, tt, b_ema):                      # get_rcgm_target's residual before the clip
        if t < tt + 0.01:                                     # cof_l = 1; the roll-out from tt to tt adds nothing
            return F_th - v
        ts = [(t - 0.01) * (1 - i / 2) + tt * i / 2 for i in range(3)]
        xs, pred = xt - 0.01 * v, 0.0
        for tc, tn in zip(ts, ts[1:]):
            step = Fw(ema, b_ema, xs, tc, tn) * (tc - tn)
            xs, pred = xs - step, pred + step
        return 100 * (t - tt) * F_th - 100 * pred - v         # cof_l = 100 (t - tt), cof_r = 100

    clip = lambda r: min(max(r, -1.0), 1.0)
    want = {k: [0.0, np.zeros(6), np.zeros(3)] for k in losses}  # value, gradients with respect to G.w and G.g
    M = 3 * P

    def add(name, residual, feats, label):                    # mean of residual^2; gradient 2 residual dF/dw
        want[name][0] += residual ** 2 / M
        want[name][1] += 2 * residual * np.array(feats) / M
        if label is not None:
            want[name][2][label] += 2 * residual / M
    for i in range(3):
        ti, tti, t2i = float(t[i]), float(t_tgt[i]), float(t2[i])
        yi = None if y is None else int(y[i])
        b, b_ema = (0.0, 0.0) if y is None else (G.g[yi].item(), EMA.g[yi].item())
        guide = 0.0 if y is None else cfg * (EMA.g[yi].item() - EMA.g[int(y_cfg[i])].item())  # the CFG-enhanced v
        feats = lambda a, c, d: _ToyVelocity.features([a], [c], [d]).view(-1).numpy()
        for j in range(P):
            xi, zi, z2i = float(x[i, j]), float(z[i, j]), float(z2[i, j])
            vi, xti = zi - xi + guide, ti * zi + (1 - ti) * xi
            r = rcgm(Fw(g, b, xti, ti, tti), xti, vi, ti, tti, b_ema)
            add("base", clip(r), feats(xti, ti, tti), yi)
            add("real", Fw(g, b, xti, ti, ti) - vi, feats(xti, ti, ti), yi)
            x_fake = zi - Fw(g, b, zi, 1.0, 0.0)
            xf = ti * zi + (1 - ti) * x_fake
            add("fake", Fw(g, b, xf, -ti, -ti) - (zi - x_fake), feats(xf, -ti, -ti), yi)
            x2 = t2i * z2i + (1 - t2i) * x_fake
            add("rectify", Fw(g, b, x2, -t2i, -t2i) - Fw(g, b, x2, t2i, t2i), feats(zi, 1.0, 0.0), yi)
            r1 = rcgm(Fw(g, b, zi, 1.0, 0.0), zi, vi, 1.0, 0.0, b_ema)
            add("base_one_step", clip(r1), feats(zi, 1.0, 0.0), yi)
            if i == 0:                                        # the roll-out, in range; the third sample clipped
                assert 0.05 < abs(r) < 1
            if i == 2:
                assert abs(r) > 1 and abs(r1) > 1
    for name, term in losses.items():
        G.zero_grad()
        term.backward(retain_graph=True)
        assert term.item() == pytest.approx(want[name][0], rel=1e-12), name
        np.testing.assert_allclose(G.w.grad.numpy(), want[name][1], rtol=1e-10, atol=1e-14, err_msg=name)
        g_grad = np.zeros(3) if G.g.grad is None else G.g.grad.numpy()   # without labels, no gradient reaches g
        np.testing.assert_allclose(g_grad, want[name][2], rtol=1e-10, atol=1e-14, err_msg=name)
    assert EMA.w.grad is None


#################################################################################
#                 common.py: errors, processes, signals, outputs                #
#################################################################################

def test_errors_are_one_line_on_the_command_line(tmp_path):
    out = subprocess.run([sys.executable, "train.py", "--data-path", str(tmp_path), "--device", "cpu"], cwd=HERE,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and out.stderr.strip().count("\n") == 0 and out.stderr.startswith("error:")


def test_bad_flags_devices_and_outputs_fail_before_any_work(data, tmp_path):
    for flag, value in (("--ema-decay", "2"), ("--gp-ratio", "-1"), ("--lr", "nan"), ("--lr", "0"), ("--aug-p", "1.5"),
                        ("--gp-eps", "0"), ("--global-seed", "-1"), ("--fid-every", "-3"), ("--cg-time", "0.5")):
        with pytest.raises(SystemExit) as e:
            run_script("train.py", "--data-path", data, "--results-dir", tmp_path / "never", flag, value)
        assert e.value.code == 2, flag                         # argparse names the flag and the rule
    with pytest.raises(SystemExit) as e:
        run_script("train.py", "--data-path", data, "--cg-time", "0.5", "0.1")
    assert e.value.code == 2
    cli_error("train.py", "--data-path", data, "--results-dir", tmp_path / "never", *TRAIN[2:], "--device", "gpu0",
                 match="--device gpu0 is not a device")
    if not torch.cuda.is_available():
        cli_error("train.py", "--data-path", data, "--results-dir", tmp_path / "never", *TRAIN[2:], "--device",
                     "cuda", match="no GPU is visible")
    cli_error("train.py", "--data-path", data, "--results-dir", tmp_path / "never", *TRAIN, "--fid-every", 1,
                 "--fid-samples", 3, "--fid-ref", "x.npz", "--inception", "w.pth", match="--fid-samples 3 must be")
    assert not (tmp_path / "never").exists()
    run_script("train.py", "--data-path", data, "--results-dir", tmp_path / "run", *TRAIN, "--max-steps", 1)
    ckpt = tmp_path / "run" / "checkpoints" / "0000001.pt"
    os.makedirs(tmp_path / "folder.npz")
    for out, words in ((["--npz", tmp_path / "folder.npz"], "is a folder"), (["--out", tmp_path], "is a folder"),
                       (["--out", tmp_path / "no" / "s.png"], "does not exist"), (["--out", tmp_path / "s.xyz"],
                       "name an image file"), (["--npz", tmp_path / "s.zip"], "must end in .npz")):
        cli_error("sample.py", "--ckpt", ckpt, *out, match=words)
    assert sorted(os.listdir(tmp_path)) == ["folder.npz", "run"]   # nothing written, no temporary file
    run_script("sample.py", "--ckpt", ckpt, "--out", tmp_path / "s.jpg", "--num-images", 4)
    assert Image.open(tmp_path / "s.jpg").format == "JPEG"


def test_a_failed_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    def full_disk(obj, path):
        open(path, "wb").write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(SystemExit) as e, common.save_atomic(str(tmp_path / "ckpt.pt")) as tmp:
        assert tmp == str(tmp_path / "ckpt.tmp.pt")            # the extension kept: np.save and Image.save use it
        full_disk(None, tmp)
    assert str(e.value.code) == f"error: cannot write {tmp_path / 'ckpt.pt'}: No space left on device"
    assert os.listdir(tmp_path) == []
    monkeypatch.setattr(os, "posix_fallocate", lambda fd, offset, size: full_disk(None, "/dev/null"))
    with pytest.raises(OSError, match="No space left"):
        common.allocate_npy(str(tmp_path / "big.npy"), (10, 10), np.uint8)
    assert os.listdir(tmp_path) == []


HOLDER = """import fcntl, os, sys
held = [os.open(path, os.O_CREAT | os.O_RDWR) for path in sys.argv[1:]]
for fd in held:
    fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
sys.stdin.read()
"""


def test_two_jobs_on_one_output_one_runs_and_the_other_refuses_in_one_line(data, tmp_path, capsys):
    """Every script that writes claims its output before any work and before it looks at what the output holds: while
    another process holds the claim, the script refuses in one line (not with what it would say of a run or a file
    already there); once that process is gone, the next job takes its lock file over and leaves none behind."""
    run_script("train.py", "--data-path", data, "--results-dir", tmp_path / "run", *TRAIN, "--max-steps", 1)
    ckpt, log = tmp_path / "run" / "checkpoints" / "0000001.pt", (tmp_path / "run" / "log.txt").read_text()
    np.savez(tmp_path / "taken.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8), labels=np.arange(4))
    for folder in ("twinflow", "classifier", "latents", "toy"):
        os.makedirs(tmp_path / folder)
    trainer = lambda script, folder: lambda: cli_error(script, "--data-path", data, "--results-dir",
                                                          tmp_path / folder, *TRAIN, match="held by another job")
    sample = lambda *out: lambda: cli_error("sample.py", "--ckpt", ckpt, *out, match="held by another job")

    def toy_main():
        with pytest.raises(SystemExit, match="held by another job"):
            toy.main(steps=1, out_dir=str(tmp_path / "toy"))

    def fid_stats():
        cli_error("fid.py", tmp_path / "taken.npz", "--save-stats", tmp_path / "stats.npz", match="held by another job")

    jobs = {"run/.lock": trainer("train.py", "run"),             # a run is there: the claim is checked first
            "twinflow/.lock": trainer("twinflow.py", "twinflow"),
            "classifier/.lock": trainer("train_classifier.py", "classifier"),
            "taken.npz.lock": sample("--npz", tmp_path / "taken.npz"),    # the file is there: the claim comes first
            "grid.png.lock": sample("--out", tmp_path / "grid.png"),
            "G.pt.lock": sample("--save-generator", tmp_path / "G.pt"),
            "latents/.lock": lambda: "held by another job" in cli_error("prepare_latents.py", 
                "--data-path", tmp_path / "taken.npz", "--out", tmp_path / "latents", "--vae", "none"),
            "toy/toy.png.lock": toy_main, "stats.npz.lock": fid_stats}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, *(str(tmp_path / lock) for lock in jobs)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        for lock, job in jobs.items():
            assert job() is not False, lock
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert (tmp_path / "run" / "log.txt").read_text() == log and not (tmp_path / "G.pt").exists()
    assert os.listdir(tmp_path / "latents") == [".lock"] and not (tmp_path / "stats.npz").exists()
    # The holder ended without removing its lock files, as a crashed job would: they block nothing.
    run_script("sample.py", "--ckpt", ckpt, "--out", tmp_path / "grid.png", "--num-images", 4)
    cli_error("sample.py", "--ckpt", ckpt, "--npz", tmp_path / "taken.npz", match="already exists")
    assert (tmp_path / "grid.png").exists() and not (tmp_path / "grid.png.lock").exists()
    assert not (tmp_path / "taken.npz.lock").exists()


def test_full_and_read_only_disks_end_in_one_line_naming_the_path_and_the_cause(data, tmp_path, monkeypatch):
    # torch.save onto a full disk (the temporary file is /dev/full): the cause, not torch's "unexpected pos".
    os.makedirs(tmp_path / "full")
    path = tmp_path / "full" / "ckpt.pt"
    os.symlink("/dev/full", tmp_path / "full" / "ckpt.tmp.pt")
    with pytest.raises(SystemExit) as e, common.save_atomic(str(path)) as tmp, open(tmp, "wb") as f:
        torch.save({"x": torch.zeros(1000)}, f)
    assert str(e.value.code) == f"error: cannot write {path}: No space left on device"
    assert os.listdir(tmp_path / "full") == []
    # log.txt on a full disk: one line, not logging's "--- Logging error ---" and its traceback.
    os.symlink("/dev/full", tmp_path / "full" / "log.txt")
    try:
        with pytest.raises(SystemExit) as e:
            common.create_logger(str(tmp_path / "full")).info("a line")
        assert str(e.value.code) == f"error: cannot write {tmp_path}/full/log.txt: No space left on device"
    finally:
        common.create_logger(None)
    # No room for a checkpoint: before the run trains, and before each checkpoint, in one line that writes nothing.
    usage, calls = shutil.disk_usage(tmp_path), []
    monkeypatch.setattr(shutil, "disk_usage", lambda p: calls.append(p) or usage._replace(free=1000))
    cli_error("train.py", "--data-path", data, "--results-dir", tmp_path / "a", *TRAIN, "--max-steps", 2,
                 match="a checkpoint of this run needs ")
    assert not (tmp_path / "a").exists()                        # refused before its log or folder were written
    monkeypatch.setattr(shutil, "disk_usage", lambda p: calls.append(p) or usage._replace(free=1000 if len(calls) > 2
                                                                                          else usage.free))
    cli_error("train.py", "--data-path", data, "--results-dir", tmp_path / "b", *TRAIN, "--max-steps", 2,
                 "--ckpt-every", 1, match="the checkpoint of step 1 needs ")
    assert os.listdir(tmp_path / "b" / "checkpoints") == []
    monkeypatch.undo()
    # A read-only folder (simulated: the tests may run as root, whom chmod does not stop) is found before any work.
    ro = str(tmp_path / "ro")
    os.makedirs(ro)
    for name in ("open", "mkdir"):
        real = getattr(os, name)
        monkeypatch.setattr(os, name, lambda p, *a, real=real, **k: real(p, *a, **k) if not str(p).startswith(ro) else
                            (_ for _ in ()).throw(PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(p))))
    for script in ("train.py", "train_classifier.py"):
        cli_error(script, "--data-path", data, "--results-dir", f"{ro}/run", *TRAIN,
                     match=f"cannot write --results-dir {ro}/run: Permission denied")
    run_script("train.py", "--data-path", data, "--results-dir", tmp_path / "c", *TRAIN, "--max-steps", 1)
    cli_error("sample.py", "--ckpt", tmp_path / "c" / "checkpoints" / "0000001.pt", "--npz", f"{ro}/s.npz",
                 match=f"cannot write --npz {ro}/s.npz: Permission denied")
    with pytest.raises(SystemExit, match=f"cannot write --out-dir {ro}/toy.png: Permission denied"):
        toy.main(out_dir=ro)                                   # before its minute of training
    np.savez(tmp_path / "a.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(fid.UserError, match=f"cannot write {ro}/s.npz: Permission denied"):
        fid.lock_output(f"{ro}/s.npz")
    # Any other OSError that reaches a script's top: the file and the cause, once for every script.
    def refused(args):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), f"{ro}/x")
    with pytest.raises(SystemExit) as e:
        common.run(refused, None)
    assert str(e.value.code) == f"error: {ro}/x: Permission denied"
    assert os.listdir(ro) == []


def test_size_flags_are_bounded_by_what_the_job_can_hold(tmp_path, monkeypatch, capsys):
    np.savez(tmp_path / "x.npz", arr_0=np.zeros((4, 28, 28), np.uint8), labels=np.arange(4))
    argv = ["--data-path", tmp_path / "x.npz", "--out", tmp_path / "out", "--vae", "none", "--num-workers", 0]
    with pytest.raises(SystemExit) as e:
        run_script("prepare_latents.py", *argv, "--image-size", 100000)
    assert e.value.code == 2 and "--image-size: must be an integer from 1 to 4096" in capsys.readouterr().err
    # An output larger than the disk's free space: one line before a byte is reserved, and no folder left.
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=4 * 2 * 64 * 64 * 2))   # status does not fit
    assert "(4 images of 2 x 1 x 64 x 64) needs" in cli_error("prepare_latents.py", *argv, "--image-size", 64)
    assert not (tmp_path / "out").exists()
    monkeypatch.undo()
    # The encoder benchmark on a CPU says what it times before it times it, and times a small batch.
    capsys.readouterr()
    run_script("prepare_latents.py", "--benchmark", "--image-size", 8, "--device", "cpu")
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("timing the encoder on 3 batches of 2 random 8x8 images on cpu")
    assert printed[1].startswith("encoder: ") and printed[1].endswith("images/s (8x8, batch 2, cpu)")
    # A grid no wider than its images, and no larger than Pillow opens.
    ckpt = os.path.join(HERE, "docs", "fmnist_afm_pixels.pt")
    cli_error("sample.py", "--ckpt", ckpt, "--out", tmp_path / "g.png", "--nrow", 1000,
                 match="--nrow 1000 is more than the 16 images of the grid")
    cli_error("sample.py", "--ckpt", ckpt, "--out", tmp_path / "g.png", "--num-images", 10 ** 6,
                 match="more than Pillow opens")
    assert sorted(os.listdir(tmp_path)) == ["x.npz"]


def test_messages_name_folders_give_the_resume_command_and_a_stopping_job_ignores_signals(data, tmp_path, monkeypatch):
    os.makedirs(tmp_path / "dir.pt")
    cli_error("train.py", "--data-path", data, "--results-dir", tmp_path / "r", *TRAIN, "--resume", tmp_path / "dir.pt",
                 match=f"checkpoint {tmp_path}/dir.pt is a folder, not a file")
    cli_error("sample.py", "--ckpt", tmp_path / "dir.pt", match="is a folder, not a file")
    with pytest.raises(SystemExit, match="--vae-weights .*dir.pt is a folder, not a file"):
        make_decoder(dict(vae="sd-vae-ft-mse", scale=0.18215), str(tmp_path / "dir.pt"), "cpu")
    with pytest.raises(SystemExit, match="sample npz .*dir.pt is a folder, not a file"):
        npz_images(str(tmp_path / "dir.pt"), None, 8)
    with pytest.raises(fid.UserError, match="dir.pt is a folder, not a file"):
        fid.load_inception(str(tmp_path / "dir.pt"))
    # The command that resumes: this one, its starting checkpoints replaced by --resume; under torchrun as launched.
    monkeypatch.setattr(sys, "argv", ["train.py", "--data-path", "d", "--init", "a.pt", "--init-d=b.pt", "--lr", "2",
                                      "--resume", "c.pt"])
    assert common.resume_command("out/0000010.pt") == "python train.py --data-path d --lr 2 --resume out/0000010.pt"
    monkeypatch.setattr(os, "environ", dict(os.environ, RANK="0", WORLD_SIZE="16", LOCAL_WORLD_SIZE="8"))
    assert common.resume_command("my run/1.pt") == ("torchrun --nnodes=2 --nproc_per_node=8 train.py --data-path d "
                                                    "--lr 2 --resume 'my run/1.pt'")
    monkeypatch.undo()
    # A job that a signal stops ignores the next ones until it has exited (their tracebacks from the clean-up).
    def stopped(args):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)                                          # the handler raises at once
    try:
        with pytest.raises(SystemExit) as e:
            common.run(stopped, None)
        assert e.value.code == 130
        assert signal.getsignal(signal.SIGINT) == signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
        os.kill(os.getpid(), signal.SIGINT)                     # ignored: the test goes on
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def test_outputs_of_work_are_never_replaced(data, tmp_path):
    """--save-generator, like --npz and --save-stats, refuses a file already there (its own --ckpt included), and the
    temporary file that a killed writer of the output left is removed by the next job that takes the output."""
    run_script("train.py", "--data-path", data, "--results-dir", tmp_path, *TRAIN, "--max-steps", 1)
    ckpt = tmp_path / "checkpoints" / "0000001.pt"
    before = ckpt.read_bytes()
    cli_error("sample.py", "--ckpt", ckpt, "--save-generator", ckpt, match=f"--save-generator {ckpt} already exists")
    assert ckpt.read_bytes() == before
    (tmp_path / "g.tmp.pt").write_bytes(b"half a generator")
    run_script("sample.py", "--ckpt", ckpt, "--save-generator", tmp_path / "g.pt")
    assert "EMA" in torch.load(tmp_path / "g.pt", weights_only=True)
    assert not (tmp_path / "g.tmp.pt").exists() and not (tmp_path / "g.pt.lock").exists()


def test_sizes_counts_and_seeds_are_bounded_before_any_work(data, tmp_path, capsys):
    """Every size, count and seed flag within what the job can hold, and term sets that can learn, refused in one line
    before any work: no results folder appears."""
    for argv in (["sample.py", "--ckpt", "x.pt", "--npz", "s.npz", "--num-samples", 10 ** 9],
                 ["sample.py", "--ckpt", "x.pt", "--num-images", 10 ** 9],
                 ["prepare_latents.py", "--data-path", "x.npz", "--out", tmp_path / "p", "--num-workers", 100000],
                 ["train.py", "--data-path", data, *TRAIN, "--global-seed", 2 ** 64],
                 ["train.py", "--data-path", data, *TRAIN, "--fid-samples", 10 ** 9],
                 ["twinflow.py", "--data-path", data, "--global-seed", 2 ** 32],
                 ["cafm.py", "--data-path", data, "--global-seed", 2 ** 64],
                 ["train_classifier.py", "--data-path", data, "--global-seed", -1],
                 ["judge.py", "--data-path", data, "--global-seed", "1e3"],
                 ["toy.py", "--seed", 2 ** 64], ["toy.py", "--nfe", 10 ** 9]):
        assert exit_status(argv) == 2
        assert "must be an integer from" in capsys.readouterr().err
    run = lambda name: ["--results-dir", tmp_path / name, "--device", "cpu"]
    cli_error("train.py", "--data-path", data, *run("a"), *TRAIN[4:], "--global-batch-size", 10 ** 8,
                 match="needs at least")
    cli_error("twinflow.py", "--data-path", data, *run("b"), "--model", "T/2", "--global-batch-size", 10 ** 8,
                 match="give a smaller --global-batch-size")
    for script in ("train_classifier.py", "judge.py", "cafm.py"):
        cli_error(script, "--data-path", data, *run("c"), "--global-batch-size", 10 ** 8, match="needs at least")
    for terms, why in ((["fake"], "loss is 0 from the start"), (["rectify", "fake"], "loss is 0 from the start"),
                       (["real", "real"], "names a term twice")):
        cli_error("twinflow.py", "--data-path", data, *run("d"), "--terms", *terms, match=why)
    cli_error("train.py", "--data-path", data, *run("e"), *TRAIN[4:], "--vae-weights", "vae.pth",
                 match="--vae-weights vae.pth: these are pixels")
    cli_error("cafm.py", "--data-path", data, *run("f"), "--vae-weights", "vae.pth",
              match="--vae-weights vae.pth: these are pixels")
    assert os.listdir(tmp_path) == []


def test_refused_or_killed_jobs_leave_nothing_behind(data, tmp_path, monkeypatch):
    """A run refused for disk writes nothing; a killed checkpoint write's NNNNNNN.tmp.pt goes with the next run of
    the folder; a second Ctrl-C inside torch.save stops at once (130), not with torch's "unexpected pos"; fid.py
    stopped by SIGTERM exits 130 and leaves neither its lock nor its temporary file."""
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=1000))
    for script, flags in (("train.py", TRAIN), ("twinflow.py", TRAIN), ("train_classifier.py", TRAIN),
                          ("judge.py", TRAIN[2:])):
        cli_error(script, "--data-path", data, "--results-dir", tmp_path / "full", *flags,
                     match="a checkpoint of this run needs")
        assert not (tmp_path / "full").exists()
    monkeypatch.undo()
    run_script("train.py", "--data-path", data, "--results-dir", tmp_path / "r", *TRAIN, "--max-steps", 1)
    (tmp_path / "r" / "checkpoints" / "0000007.tmp.pt").write_bytes(b"killed half-way")
    run_script("train.py", "--data-path", data, "--results-dir", tmp_path / "r", *TRAIN, "--max-steps", 2,
               "--resume", tmp_path / "r" / "checkpoints" / "0000001.pt")
    assert sorted(os.listdir(tmp_path / "r" / "checkpoints")) == ["0000001.pt", "0000002.pt"]

    script = f"""if True:
        import builtins, io, os, signal, torch, common
        class SlowDisk(io.FileIO):                             # both Ctrl-C arrive while torch writes the tensors
            calls = 0
            def write(self, b):
                SlowDisk.calls += 1
                if SlowDisk.calls == 3:
                    os.kill(os.getpid(), signal.SIGINT)
                    os.kill(os.getpid(), signal.SIGINT)
                return super().write(b)
        stop = common.StopOnSignal()
        with common.save_atomic({str(tmp_path / 'c.pt')!r}) as tmp, SlowDisk(tmp, "w") as f:
            torch.save(dict(x=torch.zeros(100_000)), f)       # as save_checkpoint writes"""
    out = subprocess.run([sys.executable, "-c", script], cwd=HERE, capture_output=True, text=True, timeout=120)
    assert out.returncode == 130 and out.stderr.strip() == "SIGINT again: stopping now, without a checkpoint", \
        out.stderr
    assert not glob.glob(str(tmp_path / "c.*"))

    np.savez(tmp_path / "images.npz", arr_0=_fid_images(60, seed=0, size=8))
    stats = tmp_path / "stats.npz"
    (tmp_path / "stats.tmp.npz").write_bytes(b"a killed job's")
    argv = [tmp_path / "images.npz", "--inception", _fid_weights_file(), "--save-stats", stats, "--batch-size", 1]
    proc = subprocess.Popen([sys.executable, "fid.py", *map(str, argv), "--device", "cpu"], cwd=HERE, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 60
    while proc.poll() is None and time.time() < deadline and (tmp_path / "stats.tmp.npz").exists():
        time.sleep(0.01)                                       # the lock is held and the leftover removed: SIGTERM
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.strip().splitlines()[-1] == "interrupted", err
    assert not glob.glob(str(tmp_path / "stats*"))


def test_messages_name_the_file_and_the_cause(data, tmp_path):
    """A folder in place of a data file; which of several --ckpt is one-step; a judge checkpoint resumed as a
    classifier; a fid.UserError (too few held-out images for Precision/Recall) in one line through run()."""
    for name in ("latents.npy", "labels.npy", "info.json"):
        folder = shutil.copytree(data, tmp_path / name.split(".")[0])
        os.remove(folder / name)
        os.makedirs(folder / name)
        cli_error("train.py", "--data-path", folder, "--results-dir", tmp_path / "never", *TRAIN,
                     match=f"{folder / name} is a folder, not a file")
    afm, twin = (os.path.join(HERE, "docs", name) for name in ("fmnist_afm_pixels.pt", "fmnist_twinflow.pt"))
    cli_error("sample.py", "--ckpt", twin, afm, "--steps", 2, "--out", tmp_path / "g.png",
                 match=f"--ckpt {afm} holds a one-step generator, which samples in one step, not --steps 2")
    run_script("judge.py", "--data-path", data, "--results-dir", tmp_path / "j", "--device", "cpu",
               "--global-batch-size", 8, "--max-steps", 1)
    judge = tmp_path / "j" / "checkpoints" / "0000001.pt"
    cli_error("train_classifier.py", "--data-path", data, "--results-dir", tmp_path / "c", *CLS, "--resume", judge,
                 match="holds a judge (judge.py), and this run trains a classifier")
    few = make_data(tmp_path / "few", n=3)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "s.npz", arr_0=rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8), labels=np.arange(6) % 5)
    cli_error("judge.py", "--evaluate", tmp_path / "s.npz", "--judge", judge, "--data-path", few,
                 match="Precision and Recall need more than k=3 images")
    assert not (tmp_path / "never").exists() and not (tmp_path / "c").exists()


#################################################################################
#                          data.py: the data directory                          #
#################################################################################

def test_bad_data_directories(tmp_path):
    """What cannot be latents or [-1, 1] pixels is refused in one line before the run writes anything."""
    cli_error("train.py", "--data-path", tmp_path / "nothing", *TRAIN, match="latents.npy is missing")
    cases = [  # (file, content, words of the error)
        ("latents.npy", np.zeros((24, 3, 8, 8), np.float16), "must have shape (N, V, C, S, S)"),
        ("latents.npy", np.zeros((24, 2, 3, 8, 6), np.float16), "must have shape (N, V, C, S, S)"),
        ("latents.npy", np.zeros((24, 0, 3, 8, 8), np.float16), "must have shape (N, V, C, S, S)"),
        ("latents.npy", np.full((24, 2, 3, 8, 8), 200, np.uint8), "holds uint8"),
        ("latents.npy", np.full((24, 2, 3, 8, 8), 60000, np.float16), "must be 1 or 3 channels in [-1, 1]"),
        ("latents.npy", np.zeros((24, 2, 4, 8, 8), np.float16), "must be 1 or 3 channels in [-1, 1]"),
        ("labels.npy", np.zeros(23, np.int64), "must hold 24 integers"),
        ("labels.npy", np.zeros(24, np.float32), "must hold 24 integers"),
        ("labels.npy", np.array(["a"] * 24), "must hold 24 integers"),
        ("labels.npy", np.full(24, 9, np.int64), "labels must be in [0, 5)"),
        ("info.json", "{not json", "cannot read the data"),
        ("info.json", '{"num_classes": 10.9, "vae": "none"}', "num_classes must be an integer"),
        ("info.json", '{"num_classes": 1000000000000, "vae": "none"}', "num_classes must be an integer"),
        ("info.json", '{"num_classes": 5, "vae": "sd-vae-ft-mse"}', "need a positive `scale`"),
    ]
    for i, (name, content, words) in enumerate(cases):
        bad = make_data(tmp_path / str(i))
        if isinstance(content, str):
            open(os.path.join(bad, name), "w").write(content)
        else:
            np.save(os.path.join(bad, name), content)
        cli_error("train.py", "--data-path", bad, "--results-dir", tmp_path / f"run{i}", *TRAIN, match=words)
        assert not (tmp_path / f"run{i}").exists()
    latents = make_data(tmp_path / "latents")
    with open(os.path.join(latents, "info.json"), "w") as f:
        json.dump(dict(num_classes=5, vae="sd-vae-ft-mse", scale=0.18215), f)
    np.save(os.path.join(latents, "latents.npy"), np.full((24, 2, 4, 8, 8), 6e4, np.float16))
    cli_error("train.py", "--data-path", latents, *TRAIN, match="cannot be scaled VAE latents")


def test_the_data_check_reads_every_row_and_scores_say_what_they_rest_on(data, tmp_path, capsys):
    """Rows that a sample of 256 of 1000 rows misses, and a chunk boundary; NaN and inf told apart from values out of
    range; a std that is not one; a statistics file whose sigma is not a covariance (-I gave FID 0); a judge whose
    features do not vary (its Frechet distances are 0 for any images)."""
    path = make_data(tmp_path / "d", n=1000, size=2, channels=1, std=True)
    x, std = np.load(f"{path}/latents.npy"), np.load(f"{path}/std.npy")
    for row, value, words in ((1, np.nan, f"{path}/latents.npy holds NaN or inf values (first at row 1)"),
                              (998, -np.inf, f"{path}/latents.npy holds NaN or inf values (first at row 998)"),
                              (500, 3.0, "must be 1 or 3 channels in [-1, 1], row 500 holds values in [")):
        bad = x.copy()
        bad[row, 1, 0, 1, 1] = value
        np.save(f"{path}/latents.npy", bad)
        with pytest.raises(SystemExit) as e:
            LatentData(path)
        assert words in str(e.value.code), e.value.code
        assert first_bad_row(bad, -1, 1, chunk_bytes=7 * bad[:1].nbytes)[0][0] == row  # across 7-row chunks
    np.save(f"{path}/latents.npy", x)
    std[700, 0, 0, 0, 0] = -0.5
    np.save(f"{path}/std.npy", std)
    with pytest.raises(SystemExit, match="std.npy: a posterior std must be in .0, 1000., row 700 holds values in .-0.5"):
        LatentData(path)
    os.remove(f"{path}/std.npy")
    assert LatentData(path).latents.shape == (1000, 2, 1, 2, 2)
    rng = np.random.default_rng(0)
    features = rng.standard_normal((3, 16))
    for sigma, words in ((-np.eye(16), "sigma is not a covariance: it has the eigenvalue -1"),
                         (np.triu(np.ones((16, 16))), "sigma is not a covariance: it is not symmetric"),
                         (np.eye(4), "sigma must be a 16 x 16 matrix")):
        np.savez(tmp_path / "s.npz", mu=np.zeros(16), sigma=sigma)
        capsys.readouterr()
        cli_error("fid.py", tmp_path / "s.npz", tmp_path / "s.npz", "--metrics", "fid", match=words)
        assert capsys.readouterr().out == ""
    np.savez(tmp_path / "s.npz", mu=features.mean(0), sigma=np.cov(features, rowvar=False))   # rank 2 of 16: fine
    assert fid.open_input(str(tmp_path / "s.npz"))[0]["sigma"].shape == (16, 16)
    run_script("judge.py", "--data-path", data, "--results-dir", tmp_path / "j", "--device", "cpu",
               "--global-batch-size", 8, "--max-steps", 1)
    judge = torch.load(tmp_path / "j" / "checkpoints" / "0000001.pt", weights_only=True)
    judge["EMA"]["hidden.0.bias"].fill_(-1e6)                  # every hidden ReLU off: the features are all zero
    torch.save(judge, tmp_path / "dead.pt")
    np.savez(tmp_path / "images.npz", arr_0=rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8), labels=np.arange(6) % 5)
    capsys.readouterr()
    run_script("judge.py", "--evaluate", tmp_path / "images.npz", "--judge", tmp_path / "dead.pt",
               "--data-path", data)
    assert "features of the held-out images are degenerate" in capsys.readouterr().out


def test_resume_is_refused_on_other_contents_under_the_same_info_json(data, tmp_path):
    """The data's identity holds a checksum of its arrays, taken by the pass that checks every row: a directory written
    by hand with the run's info.json but other contents (one value changed, two rows exchanged) takes no --resume."""
    run_script("train.py", "--data-path", data, "--results-dir", tmp_path / "run", *TRAIN, "--max-steps", 1)
    ckpt = tmp_path / "run" / "checkpoints" / "0000001.pt"
    x = np.load(os.path.join(data, "latents.npy"))
    for name, edit in (("value", lambda x: x.__setitem__((3, 0, 0, 0, 0), -x[3, 0, 0, 0, 0])),
                       ("rows", lambda x: x.__setitem__([4, 5], x[[5, 4]]))):
        other = shutil.copytree(data, tmp_path / name)
        changed = x.copy()
        edit(changed)
        assert not np.array_equal(changed, x)
        np.save(other / "latents.npy", changed)
        cli_error("train.py", "--data-path", other, "--results-dir", tmp_path / "run", *TRAIN, "--max-steps", 2,
                     "--resume", ckpt, match="was trained on other data than --data-path")
    run_script("train.py", "--data-path", shutil.copytree(data, tmp_path / "copy"), "--results-dir", tmp_path / "run",
               *TRAIN, "--max-steps", 2, "--resume", ckpt)           # the same contents elsewhere: resumed
    assert (tmp_path / "run" / "checkpoints" / "0000002.pt").exists()


#################################################################################
#              checkpoint.py: checkpoints, starts, the loop's tail              #
#################################################################################

def test_bad_flags_and_checkpoints(data, tmp_path):
    with pytest.raises(SystemExit) as e:
        run_script("train.py", "--data-path", data, "--model", "Q/2")
    assert e.value.code == 2                                   # argparse: "invalid choice: 'Q/2'"
    run_script("train.py", "--data-path", data, "--results-dir", tmp_path, *TRAIN, "--max-steps", 1)
    ckpt = tmp_path / "checkpoints" / "0000001.pt"
    cli_error("train.py", "--data-path", data, "--results-dir", tmp_path / "never", *TRAIN,
                 "--resume", tmp_path / "missing.pt", match="does not exist")
    assert not (tmp_path / "never").exists()                   # a run that fails on its inputs writes nothing
    cli_error("train.py", "--data-path", data, *TRAIN, "--nfe", "2", "--resume", ckpt,
                 match="holds another network than this run asks for: D.use_t False (asked: True)")
    cli_error("train.py", "--data-path", data, "--model", "S/2", *TRAIN[2:], "--resume", ckpt,
                 match="G.depth 2 (asked: 12)")
    cli_error("sample.py", "--ckpt", ckpt, "--nfe", "2", match="holds a --nfe 1 model")
    cli_error("sample.py", "--ckpt", ckpt, "--steps", "2", match="samples in one step")
    for flag in ("--log-every", "--global-batch-size", "--ckpt-every"):
        with pytest.raises(SystemExit) as e:
            run_script("train.py", "--data-path", data, flag, "0")
        assert e.value.code == 2                               # argparse: "must be a positive integer"
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(ckpt.read_bytes()[:5000])
    cli_error("train.py", "--data-path", data, *TRAIN, "--resume", truncated, match="corrupt, truncated")
    cli_error("sample.py", "--ckpt", truncated, match="corrupt, truncated")
    # A pickle that would run code is refused, not executed: every load uses weights_only=True.
    marker = tmp_path / "ran"
    torch.save({"G": Exploit(str(marker))}, tmp_path / "evil.pt")
    cli_error("sample.py", "--ckpt", tmp_path / "evil.pt", match="corrupt, truncated")
    assert not marker.exists()
    # An official-style bare state dict needs --model, and must fit it.
    G = model.Generator(**dict(TINY, in_channels=4, num_classes=1000, input_size=32))
    torch.save(G.state_dict(), tmp_path / "bare.pth")
    cli_error("sample.py", "--ckpt", tmp_path / "bare.pth", match="say which network it is with --model")
    cli_error("sample.py", "--ckpt", tmp_path / "bare.pth", "--model", "S/2", match="does not load into this Generator")
    cli_error("sample.py", "--ckpt", tmp_path / "bare.pth", "--model", "S/2", "--nfe", "2", "--repeat", "2",
                 match="depth repetition is for one-step generators")


def test_a_run_never_overwrites_another(data, tmp_path):
    run_script("train.py", "--data-path", data, "--results-dir", tmp_path, *TRAIN, "--max-steps", 2)
    before = (tmp_path / "log.txt").read_text()
    cli_error("train.py", "--data-path", data, "--results-dir", tmp_path, *TRAIN, "--max-steps", 4,
                 match="already holds a run: continue it with --resume")
    other = tmp_path / "other"
    run_script("train.py", "--data-path", data, "--results-dir", other, *TRAIN, "--max-steps", 2)
    cli_error("train.py", "--data-path", data, "--results-dir", tmp_path, *TRAIN, "--max-steps", 4,
                 "--resume", other / "checkpoints" / "0000002.pt", match="already holds a run")
    assert (tmp_path / "log.txt").read_text() == before and os.listdir(tmp_path / "checkpoints") == ["0000002.pt"]
    cli_error("train.py", "--data-path", data, "--results-dir", tmp_path, *TRAIN, "--max-steps", 2,
                 "--resume", tmp_path / "checkpoints" / "0000002.pt", match="already at --max-steps 2")
    run_script("train.py", "--data-path", data, "--results-dir", tmp_path, *TRAIN, "--max-steps", 3,
               "--resume", tmp_path / "checkpoints" / "0000002.pt")         # a resume of this run is welcome
    (tmp_path / "file").write_text("")
    cli_error("train.py", "--data-path", data, "--results-dir", tmp_path / "file", *TRAIN, match="is a file")


def with_source(path, sha):
    info = json.load(open(os.path.join(path, "info.json")))
    json.dump(dict(info, num_images=24, source=dict(files_sha1=sha)), open(os.path.join(path, "info.json"), "w"))
    return path


def test_resume_refuses_a_checkpoint_of_other_data_and_init_says_so(tmp_path):
    """Two data sets of one shape and size (prepare_latents.py's info.json names their source's sha1): a run resumes
    only on its own; a new stage may start on other data, with a note in the log."""
    a, b = with_source(make_data(tmp_path / "a"), "a1" * 20), with_source(make_data(tmp_path / "b"), "b2" * 20)
    run_script("train.py", "--data-path", a, "--results-dir", tmp_path / "run", *TRAIN, "--max-steps", 1)
    ckpt = tmp_path / "run" / "checkpoints" / "0000001.pt"
    cli_error("train.py", "--data-path", b, "--results-dir", tmp_path / "run", *TRAIN, "--max-steps", 2, "--resume",
                 ckpt, match=f"--resume {ckpt} was trained on other data than --data-path {b}: files_sha1 "
                             f"'{'a1' * 20}' vs '{'b2' * 20}'; a new stage on other data starts with --init")
    run_script("train.py", "--data-path", b, "--results-dir", tmp_path / "stage", *TRAIN, "--max-steps", 2, "--init", ckpt)
    assert f"--init {ckpt} (step 1); note: trained on other data than --data-path (files_sha1" in \
        (tmp_path / "stage" / "log.txt").read_text()
    run_script("train_classifier.py", "--data-path", a, "--results-dir", tmp_path / "cls", *CLS, "--global-batch-size", 8,
               "--max-steps", 1)
    cli_error("train_classifier.py", "--data-path", b, "--results-dir", tmp_path / "cls", *CLS, "--global-batch-size",
                 8, "--max-steps", 2, "--resume", tmp_path / "cls" / "checkpoints" / "0000001.pt",
                 match="was trained on other data than --data-path")


def test_a_new_stage_starts_from_the_ema_with_d_and_grad_norm_carried(data, tmp_path):
    run_script("train.py", "--data-path", data, "--results-dir", tmp_path, *TRAIN, "--max-steps", 2)
    ckpt = torch.load(tmp_path / "checkpoints" / "0000002.pt", weights_only=True)

    def fresh_state():
        G, D = model.Generator(**ckpt["config"]["G"]), model.Discriminator(**ckpt["config"]["D"])
        return dict(G=G, D=D, EMA=model.Generator(**ckpt["config"]["G"]), grad_norm=loss.GradNorm(),
                    opt_G=torch.optim.AdamW(G.parameters(), lr=7e-5), opt_D=torch.optim.AdamW(D.parameters(), lr=6e-5))
    train_args = lambda *argv: train.make_parser().parse_args(["--data-path", data, *argv])
    logger, state = common.create_logger(None), fresh_state()
    assert checkpoint.restore_state(state, {"init": ckpt}, train_args("--init", "s1.pt"), logger) == 2
    for key, source in (("G", "EMA"), ("EMA", "EMA"), ("D", "D")):
        assert all(torch.equal(v, ckpt[source][k]) for k, v in state[key].state_dict().items()), key
    assert state["grad_norm"].square_avg == ckpt["grad_norm"]["square_avg"] > 0
    assert torch.equal(state["opt_D"].state_dict()["state"][1]["exp_avg_sq"], ckpt["opt_D"]["state"][1]["exp_avg_sq"])
    assert [state[k].param_groups[0]["lr"] for k in ("opt_G", "opt_D")] == [7e-5, 6e-5]    # this command's lr
    # --init-d then takes D and its optimizer from an earlier checkpoint, and leaves the rest as --init put it.
    earlier = dict(ckpt, D={k: v + 1 for k, v in ckpt["D"].items()})
    state = fresh_state()
    checkpoint.restore_state(state, {"init": ckpt, "init_d": earlier}, train_args("--init", "s1.pt", "--init-d", "s0.pt"),
                             logger)
    assert all(torch.equal(v, earlier["D"][k]) for k, v in state["D"].state_dict().items())
    assert all(torch.equal(v, ckpt["EMA"][k]) for k, v in state["G"].state_dict().items())


def test_non_finite_loss_stops_training_and_keeps_the_last_checkpoint(data, tmp_path):
    run_script("train.py", "--data-path", data, "--results-dir", tmp_path / "run", *TRAIN, "--max-steps", 2,
               "--ckpt-every", 2)
    # An absurd lr makes the weights, and then the losses, non-finite within a step or two.
    cli_error("train.py", "--data-path", data, "--results-dir", tmp_path / "run", *TRAIN, "--max-steps", 6,
                 "--ckpt-every", 2, "--lr", 1e30, "--resume", tmp_path / "run" / "checkpoints" / "0000002.pt",
                 match="the last good checkpoint is " + str(tmp_path / "run" / "checkpoints" / "0000002.pt"))
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["0000002.pt"]
    cli_error("train.py", "--data-path", data, "--results-dir", tmp_path / "fresh", *TRAIN, "--max-steps", 6,
                 "--lr", 1e30, match="no checkpoint was written before it")
    run_script("train.py", "--data-path", data, "--results-dir", tmp_path / "fresh", *TRAIN, "--max-steps", 2)
    assert os.listdir(tmp_path / "fresh" / "checkpoints") == ["0000002.pt"]  # a run with no checkpoint may be redone


@pytest.mark.parametrize("script", ["train.py", "twinflow.py", "train_classifier.py", "judge.py"])
def test_every_trainer_checks_its_losses_before_every_checkpoint(script, data, tmp_path):
    """The shared loop tail: a run that would log only at its end, blown up by an absurd lr, stops at the first
    checkpoint's step in one line, and writes no checkpoint of non-finite weights."""
    model = ["--model", "T/2"] if script != "judge.py" else []
    cli_error(script, "--data-path", data, "--results-dir", tmp_path, *model, "--device", "cpu", "--global-batch-size",
                 8, "--max-steps", 6, "--log-every", 6, "--ckpt-every", 2, "--lr", 1e30,
                 match="non-finite loss at step 2 (")
    assert os.listdir(tmp_path / "checkpoints") == []


#################################################################################
#                             train.py: AFM training                            #
#################################################################################

def test_defaults_table():
    """Flags left unset take the paper's per-size and per-mode values, from one table."""
    pick = train.paper_default
    assert pick("ot_scale", "XL/2", "1", 1) == 0.2 and pick("ot_scale", "XL/2", "2", 1) == 0.25
    assert pick("ot_scale", "XL/2", "any", 1) == 0.25
    assert pick("ot_scale_end", "B/2", "1", 1) == 0.01 and pick("ot_scale_end", "L/2", "1", 1) == 0.005
    assert pick("ot_constant", "B/2", "1", 1) == 0.001
    assert [pick("grad_clip", "XL/2", n, r) for n, r in (("1", 1), ("2", 1), ("1", 2), ("1", 4))] == [50, 5, 5, 5]
    def lr_g(model, repeat):                                   # a depth-repeated G's lr: the size's ratio / R
        args = train.make_parser().parse_args(["--model", model, "--repeat", str(repeat)])     # every default unset
        train.fill_defaults(args)
        return args.lr_g / args.lr
    assert [lr_g("XL/2", r) for r in (1, 2, 4)] == [1.0, 0.5, 0.25] and [lr_g("XS/7", r) for r in (1, 2)] == [2.0, 1.0]
    assert pick("lr", "B/2", "1", 1) == 1e-4 and pick("lr", "XS/7", "1", 1) == 3e-4      # small images: their own row
    assert [pick(f, "XS/7", "1", 1) for f in ("global_batch_size", "ema_decay", "g_lr_ratio")] == [64, 0.995, 2.0]
    assert pick("global_batch_size", "XL/2", "1", 1) == 256 and pick("ema_decay", "XL/2", "1", 1) == 0.9999
    assert all(len(row) == 5 and row[4] for row in train.DEFAULTS)          # every row cites its source


@pytest.mark.parametrize("mode", [["--nfe", "1"], ["--nfe", "2"], ["--nfe", "4"], ["--nfe", "any"], ["--repeat", "2"]])
def test_every_mode_trains(data, tmp_path, mode):
    run_script("train.py", "--data-path", data, "--results-dir", tmp_path, *TRAIN, "--max-steps", 3, *mode)
    log = open(tmp_path / "log.txt").read()
    step = [line for line in log.splitlines() if "step 0000002" in line][0]
    values = dict(zip(step.split()[4::2], step.split()[5::2]))
    for key in ("loss_d", "loss_g", "r1", "r2", "cp", "ot", "logits_real", "logits_fake", "g_logits_real",
                "g_logits_fake", "grad_norm_d", "grad_norm_g", "ot_scale", "lr", "img/s"):
        assert math.isfinite(float(values[key])), key
    ckpt = torch.load(tmp_path / "checkpoints" / "0000003.pt", weights_only=True)
    assert ckpt["step"] == 3 and ckpt["args"]["model"] == "T/2" and ckpt["grad_norm"]["square_avg"] > 0
    repeat = 2 if "--repeat" in mode else 1
    assert ckpt["opt_G"]["param_groups"][0]["lr"] == pytest.approx(1e-4 / repeat)
    assert ckpt["args"]["grad_clip"] == (50.0 if mode == ["--nfe", "1"] else 5.0)


def test_sample_grids_during_training(data, tmp_path):
    """--sample-every writes grids of the EMA and of G on fixed noise: a row of 8 per class, up to 10 classes."""
    run_script("train.py", "--data-path", data, "--results-dir", tmp_path, *TRAIN, "--max-steps", 2, "--sample-every", 2)
    ema, g = (np.asarray(Image.open(tmp_path / "samples" / f"0000002_{name}.png")) for name in ("ema", "g"))
    assert ema.shape == g.shape == (2 + 5 * 10, 2 + 8 * 10, 3)              # 5 classes x 8 samples of 8 x 8 pixels
    # A fresh generator outputs zeros (DiT's zero-initialised output layer): its EMA after 2 steps at 0.9999 is a
    # grey grid, while the online G has moved; the log says why the EMA grid is grey.
    assert (ema[2:10, 2:10] == 127).all() and g[2:10, 2:10].std() > 0
    assert "the EMA is still 100% its initialisation" in open(tmp_path / "log.txt").read()


def test_resume_is_bit_identical(data, tmp_path):
    run_script("train.py", "--data-path", data, "--results-dir", tmp_path / "a", *TRAIN, "--max-steps", 4)
    run_script("train.py", "--data-path", data, "--results-dir", tmp_path / "b", *TRAIN, "--max-steps", 2)
    run_script("train.py", "--data-path", data, "--results-dir", tmp_path / "b", *TRAIN, "--max-steps", 4,
               "--resume", tmp_path / "b" / "checkpoints" / "0000002.pt")
    a = torch.load(tmp_path / "a" / "checkpoints" / "0000004.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoints" / "0000004.pt", weights_only=True)
    for key in ("G", "D", "EMA", "grad_norm"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    assert torch.equal(a["opt_G"]["state"][1]["exp_avg_sq"], b["opt_G"]["state"][1]["exp_avg_sq"])


def test_resume_takes_this_commands_hyperparameters(data, tmp_path):
    """A later stage resumes with a new lr and a constant lambda_ot, which defaults to Table 11's 0.001."""
    run_script("train.py", "--data-path", data, "--results-dir", tmp_path, *TRAIN, "--max-steps", 1)
    run_script("train.py", "--data-path", data, "--results-dir", tmp_path, *TRAIN, "--max-steps", 2, "--lr", 5e-4,
               "--ot-schedule", "constant", "--resume", tmp_path / "checkpoints" / "0000001.pt")
    ckpt = torch.load(tmp_path / "checkpoints" / "0000002.pt", weights_only=True)
    assert ckpt["opt_G"]["param_groups"][0]["lr"] == ckpt["opt_D"]["param_groups"][0]["lr"] == 5e-4
    assert ckpt["args"]["ot_scale"] == ckpt["args"]["ot_scale_end"] == 0.001
    assert "ot_scale 0.001" in open(tmp_path / "log.txt").read().splitlines()[-3]


def test_train_checkpoint_sample_end_to_end(data, tmp_path):
    run_script("train.py", "--data-path", data, "--results-dir", tmp_path, *TRAIN, "--max-steps", 2, "--nfe", "2")
    ckpt = tmp_path / "checkpoints" / "0000002.pt"
    run_script("sample.py", "--ckpt", ckpt, "--out", tmp_path / "grid.png", "--num-images", 6, "--nrow", 3)
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert grid.shape == (2 + 2 * 10, 2 + 3 * 10, 3) and grid[2:10, 2:10].std() > 0
    # The same samples come out of the EMA weights by hand: sample i from noise seeded by (seed 0, i), two v-steps.
    state = torch.load(ckpt, weights_only=True)
    G = model.Generator(**state["config"]["G"])
    G.load_state_dict(state["EMA"])
    z = torch.from_numpy(np.random.default_rng([0, 4]).standard_normal((1, 3, 8, 8), dtype=np.float32))
    x = model.sample(G.eval(), z, torch.tensor([4]), steps=2)          # grid cell (1, 1), label 4 % 5
    expect = ((x[0].clamp(-1, 1) + 1) / 2 * 255).to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.abs(grid[12:20, 12:20].astype(int) - expect.astype(int)).max() <= 1
    # The evaluation npz: class-balanced, shuffled by a fixed permutation, labels alongside.
    run_script("sample.py", "--ckpt", ckpt, "--npz", tmp_path / "s.npz", "--num-samples", 20, "--batch-size", 3)
    with np.load(tmp_path / "s.npz") as f:
        assert f["arr_0"].shape == (20, 8, 8, 3) and f["arr_0"].dtype == np.uint8
        assert np.bincount(f["labels"]).tolist() == [4] * 5 and f["labels"].tolist() != sorted(f["labels"])
        first = int(np.where(np.random.RandomState(42).permutation(20) == 4)[0][0])
        assert np.abs(f["arr_0"][first].astype(int) - expect.astype(int)).max() <= 1
    assert not os.path.exists(tmp_path / "s.npz.staging.npy")
    # A generator alone samples the same grid.
    run_script("sample.py", "--ckpt", ckpt, "--save-generator", tmp_path / "G.pt")
    assert set(torch.load(tmp_path / "G.pt", weights_only=True)) == {"EMA", "config", "args", "data_info", "step"}
    run_script("sample.py", "--ckpt", tmp_path / "G.pt", "--out", tmp_path / "grid2.png", "--num-images", 6, "--nrow", 3)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "grid2.png")), grid)
    cli_error("sample.py", "--ckpt", tmp_path / "G.pt", "--weights", "G", match="holds no G generator")
    cli_error("train.py", "--data-path", data, "--results-dir", tmp_path / "r", *TRAIN, "--nfe", "2", "--resume",
                 tmp_path / "G.pt", match="holds a generator alone")
    cli_error("sample.py", "--ckpt", ckpt, "--npz", tmp_path / "s.npz", match="already exists")


def test_two_processes_under_torchrun(data, tmp_path):
    """DDP with gloo: the two ranks split the batch, stay in sync, and sample.py shards the same samples."""
    out = torchrun("train.py", "--data-path", data, "--results-dir", tmp_path, *TRAIN, "--max-steps", 3)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "on 2 x cpu, batch 4/rank" in out.stdout and "weights identical on all 2 ranks" in out.stdout
    ckpt = tmp_path / "checkpoints" / "0000003.pt"
    assert len(torch.load(ckpt, weights_only=True)["rng"]) == 2
    out = torchrun("sample.py", "--ckpt", ckpt, "--npz", tmp_path / "two.npz", "--num-samples", 10, "--batch-size", 2)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "drew 10 in" in out.stdout                          # both ranks' samples counted in the throughput
    run_script("sample.py", "--ckpt", ckpt, "--npz", tmp_path / "one.npz", "--num-samples", 10, "--batch-size", 4)
    with np.load(tmp_path / "one.npz") as one, np.load(tmp_path / "two.npz") as two:
        assert np.array_equal(one["arr_0"], two["arr_0"]) and np.array_equal(one["labels"], two["labels"])
    out = torchrun("train.py", "--data-path", data, "--results-dir", tmp_path / "odd", *TRAIN[:-4], "--global-batch-size", 7)
    assert out.returncode != 0 and "error: --global-batch-size 7 must be divisible by the world size 2" in out.stderr


def test_two_nodes_give_the_checkpoint_of_one_node_with_two_processes(data, tmp_path):
    """Two torchrun launches of one process each, as two machines would run them (--nnodes 2, --node-rank, one
    rendezvous endpoint), train exactly what one launch of two processes does: global ranks 0 and 1 either way."""
    argv = ["train.py", "--data-path", data, *TRAIN, "--max-steps", 2]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nodes = [launch(*argv, "--results-dir", tmp_path / "nodes", node=(rank, port)) for rank in (0, 1)]
    outs = [node.communicate(timeout=300) for node in nodes]
    assert all(node.returncode == 0 for node in nodes), outs[0][1][-2000:] + outs[1][1][-2000:]
    assert "weights identical on all 2 ranks" in outs[0][0] and not outs[1][0].strip()   # rank 1 logs nothing
    out = torchrun(*argv, "--results-dir", tmp_path / "one")
    assert out.returncode == 0, out.stderr[-2000:]
    a, b = (torch.load(tmp_path / d / "checkpoints" / "0000002.pt", weights_only=True) for d in ("nodes", "one"))
    for key in ("G", "D", "EMA"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key


def test_bf16_and_compile_run_on_cpu_close_to_fp32(data, tmp_path):
    """--precision bf16 (CPU autocast) and --compile train a tiny model for two steps with finite losses close to
    fp32's; fused AdamW is what every run uses."""
    logs = {}
    for name, flags in (("fp32", []), ("bf16", ["--precision", "bf16"]), ("compile", ["--compile"])):
        run_script("train.py", "--data-path", data, "--results-dir", tmp_path / name, *TRAIN, "--max-steps", 2, *flags)
        line = [l for l in open(tmp_path / name / "log.txt") if "step 0000002 " in l][0]
        logs[name] = {k: float(v) for k, v in re.findall(r" (loss_d|loss_g|ot|grad_norm_g) (-?[0-9.]+)", line)}
    assert len(logs["fp32"]) == 4 and all(math.isfinite(v) for log in logs.values() for v in log.values())
    for k, v in logs["fp32"].items():
        assert abs(logs["bf16"][k] - v) < 0.02 * max(1, abs(v)) and abs(logs["compile"][k] - v) < 1e-3, k


def test_benchmark_prints_throughput_mfu_and_memory(data, capsys):
    for size, extra in (("T/2", ["--inception", _fid_weights_file()]), ("B/2", [])):
        run_script("train.py", "--benchmark", 1, "--model", size, "--data-path", data, "--device", "cpu",
                   "--global-batch-size", 2, *extra)
        out = capsys.readouterr().out
        assert bool(re.search(r"; Inception [0-9.]+ images/s", out)) == bool(extra), out
        numbers = re.search(r"training ([0-9.]+) images/s \(([0-9.]+) it/s\), MFU ([0-9.]+)% of a measured fp32 "
                            r"2048\^3 matmul on CPU, peak memory ([0-9.]+) GiB \(RSS\); sampling ([0-9.]+) images/s", out)
        assert numbers, out
        images, its, mfu, peak, sampling = map(float, numbers.groups())
        assert images == pytest.approx(4 * its, rel=0.01) and 0 < mfu < 100 and peak > 0.1 and sampling > 0
    assert train.forward_macs(**model.SIZES["B/2"], input_size=32, in_channels=4) == pytest.approx(23e9, rel=0.01)
    assert train.forward_macs(**model.SIZES["XL/2"], input_size=32, in_channels=4) == pytest.approx(119e9, rel=0.01)


def test_ema_reload_and_a_four_stage_chain(data, tmp_path):
    """decay -> constant + EMA reload -> D reload -> guidance + augmentation, each stage from the last (Table 11)."""
    run_script("train.py", "--data-path", data, "--results-dir", tmp_path / "s1", *TRAIN, "--max-steps", 2)
    s1 = tmp_path / "s1" / "checkpoints" / "0000002.pt"
    run_script("train.py", "--data-path", data, "--results-dir", tmp_path / "s2", *TRAIN, "--max-steps", 4,
               "--init", s1, "--ot-schedule", "constant", "--lr", 8e-5, "--ema-reload-every", 2)
    s2 = torch.load(tmp_path / "s2" / "checkpoints" / "0000004.pt", weights_only=True)
    assert all(torch.equal(s2["G"][k], s2["EMA"][k]) for k in s2["G"])     # reloaded at step 4, right before saving
    assert s2["args"]["ot_scale"] == 0.001 and s2["opt_D"]["param_groups"][0]["lr"] == 8e-5
    run_script("train.py", "--data-path", data, "--results-dir", tmp_path / "s3", *TRAIN, "--max-steps", 5,
               "--init", tmp_path / "s2" / "checkpoints" / "0000004.pt", "--init-d", s1, "--lr", 3e-5,
               "--ot-schedule", "constant", "--ema-reload-every", 2)
    s3 = torch.load(tmp_path / "s3" / "checkpoints" / "0000005.pt", weights_only=True)
    assert not all(torch.equal(s3["G"][k], s3["EMA"][k]) for k in s3["G"])  # step 5: no reload
    assert float(s3["opt_D"]["state"][1]["step"]) == 3                    # D's optimizer: s1's 2 steps + 1, not s2's 4
    classifier = model.Classifier(**dict(TINY, in_channels=3, num_classes=5))
    torch.save(dict(EMA=classifier.state_dict(), config=dict(C=dict(TINY, in_channels=3, num_classes=5))),
               tmp_path / "cls.pt")
    run_script("train.py", "--data-path", data, "--results-dir", tmp_path / "s4", *TRAIN, "--max-steps", 6,
               "--init", tmp_path / "s3" / "checkpoints" / "0000005.pt", "--lr", 5e-5, "--ot-schedule", "constant",
               "--ema-reload-every", 2, "--classifier", tmp_path / "cls.pt", "--aug-p", 0.4)
    s4 = torch.load(tmp_path / "s4" / "checkpoints" / "0000006.pt", weights_only=True)
    assert s4["step"] == 6 and s4["args"]["classifier"] == str(tmp_path / "cls.pt") and s4["args"]["aug_p"] == 0.4
    assert s4["args"]["cg_scale"] == 0.003 and tuple(s4["args"]["cg_time"]) == (0.0, 0.1)
    log = open(tmp_path / "s4" / "log.txt").read()
    assert " cg " in log and "aug_p 0.4" in log and "--init " in log
    cli_error("train.py", "--data-path", data, *TRAIN, "--resume", s1, "--init", s1, match="give one or the other")
    seven = dict(TINY, in_channels=3, num_classes=7)
    torch.save(dict(EMA=model.Classifier(**seven).state_dict(), config=dict(C=seven)), tmp_path / "cls7.pt")
    torch.save(dict(EMA=classifier.state_dict(), config=dict(C=seven)), tmp_path / "mixed.pt")
    cli_error("train.py", "--data-path", data, *TRAIN, "--classifier", tmp_path / "cls7.pt", match="of 7 classes")
    cli_error("train.py", "--data-path", data, *TRAIN, "--classifier", s1, match="not a classifier checkpoint")
    cli_error("train.py", "--data-path", data, *TRAIN, "--classifier", tmp_path / "mixed.pt", match="does not load")
    cli_error("train.py", "--data-path", data, *TRAIN, "--classifier", tmp_path / "no.pt", match="does not exist")
    official = model.Classifier(**model.SIZES["T/2"], input_size=32, in_channels=4, num_classes=1000)
    torch.save(official.state_dict(), tmp_path / "classifier.pth")        # the release's bare B/2 state dict ...
    cli_error("train.py", "--data-path", data, *TRAIN, "--classifier", tmp_path / "classifier.pth",
                 match="does not load")                                    # ... is read as B/2, which T/2 is not


def test_sigterm_checkpoints_and_the_run_resumes_exactly(data, tmp_path):
    """SIGTERM: the step finishes, a checkpoint is written, the log says how to resume, the exit is non-zero; the
    resumed run then ends bit-identical to one that was never stopped."""
    command = [sys.executable, "train.py", "--data-path", data, "--results-dir", str(tmp_path / "a"),
               *map(str, TRAIN[:-2]), "--log-every", "1", "--max-steps", "100000"]
    proc = subprocess.Popen(command, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    log, deadline = tmp_path / "a" / "log.txt", time.time() + 300
    while not (log.exists() and "step 0000002" in log.read_text()):
        assert proc.poll() is None and time.time() < deadline, proc.kill() or proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err, err
    saved = sorted(os.listdir(tmp_path / "a" / "checkpoints"))
    assert len(saved) == 1 and "stopped by SIGTERM after step" in out and f"--resume {tmp_path}/a/checkpoints" in out
    step = int(saved[0][:7])
    run_script("train.py", "--data-path", data, "--results-dir", tmp_path / "a", *TRAIN, "--max-steps", step + 2,
               "--resume", tmp_path / "a" / "checkpoints" / saved[0])
    run_script("train.py", "--data-path", data, "--results-dir", tmp_path / "b", *TRAIN, "--max-steps", step + 2)
    a, b = (torch.load(tmp_path / r / "checkpoints" / f"{step + 2:07d}.pt", weights_only=True) for r in "ab")
    assert all(torch.equal(a[k][n], b[k][n]) for k in ("G", "D", "EMA") for n in a[k])
    stop = common.StopOnSignal()                                # a second signal does not wait for the step
    try:
        stop.handle(signal.SIGINT, None)
        assert stop.requested() == signal.SIGINT
        with pytest.raises(SystemExit) as e:
            stop.handle(signal.SIGINT, None)
        assert e.value.code == 128 + signal.SIGINT
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def test_accepted_flags_do_what_they_say_and_the_others_are_refused(data, tmp_path):
    run_script("sample.py", "--ckpt", os.path.join(HERE, "docs", "fmnist_afm_pixels.pt"), "--npz", tmp_path / "s.npz",
               "--num-samples", 6, "--class-labels", 7, 3)
    with np.load(tmp_path / "s.npz") as f:
        assert sorted(f["labels"].tolist()) == [3, 3, 3, 7, 7, 7]              # balanced over the labels asked for
    for argv in (["--ot-schedule", "constant", "--ot-scale-end", 0.1], ["--repeat", 3]):
        with pytest.raises(SystemExit) as e:
            run_script("train.py", "--data-path", data, "--results-dir", tmp_path / "never", *TRAIN, *argv)
        assert e.value.code == 2, argv
    # --classifier: Table 11's augmentation unless --aug-p says otherwise, and a classifier of this data's space only.
    run_script("train_classifier.py", "--data-path", data, "--results-dir", tmp_path / "cls", *CLS, "--global-batch-size",
               8, "--max-steps", 1)
    guide = ["--classifier", tmp_path / "cls" / "checkpoints" / "0000001.pt"]
    run_script("train.py", "--data-path", data, "--results-dir", tmp_path / "g", *TRAIN, "--max-steps", 1, *guide,
               "--gp-ratio", 0.05)
    run_script("train.py", "--data-path", data, "--results-dir", tmp_path / "g0", *TRAIN, "--max-steps", 1, *guide,
               "--aug-p", 0)
    aug_p = lambda run: torch.load(tmp_path / run / "checkpoints" / "0000001.pt", weights_only=True)["args"]["aug_p"]
    assert (aug_p("g"), aug_p("g0")) == (0.4, 0.0) and train.paper_default("aug_p", "B/2", "1", 1) == 0.4
    log = (tmp_path / "g" / "log.txt").read_text()
    assert "--aug-p 0.4: D's augmentation of the guided stage (Table 11)" in log
    assert "note: R1/R2 see 1 row of each rank's batch of 8 (--gp-ratio 0.05 of it is less than one)" in log
    other = make_data(tmp_path / "other")
    json.dump(dict(json.load(open(f"{other}/info.json")), image_size=16), open(f"{other}/info.json", "w"))
    cli_error("train.py", "--data-path", other, "--results-dir", tmp_path / "never", *TRAIN, *guide,
                 match=f"was trained on other data than --data-path {other}: image_size 8 vs 16")
    assert not (tmp_path / "never").exists()


def test_fid_during_training_of_grey_images_takes_the_sampling_path(tmp_path, monkeypatch):
    """1-channel pixels reach Inception as RGB during training, as sample.py --npz writes them: the same statistics
    (so the same FID; the 2048-dim Frechet distance itself is left out, slow on 2 cores), and what cannot be scored
    (statistics of another feature size) fails before the run trains."""
    grey, weights, ref = make_data(tmp_path / "grey", num_classes=2, channels=1), _fid_weights_file(), tmp_path / "r.npz"
    np.savez(ref, arr_0=_fid_images(3, seed=5, size=8))
    np.savez(tmp_path / "small.npz", mu=np.zeros(16), sigma=np.eye(16))
    fid_flags = lambda ref: ["--fid-every", 2, "--fid-samples", 2, "--fid-ref", ref, "--inception", weights]
    cli_error("train.py", "--data-path", grey, "--results-dir", tmp_path / "never", *TRAIN, *fid_flags(
        tmp_path / "small.npz"), match="holds statistics of 16 features; Inception gives 2048")
    assert not (tmp_path / "never").exists()
    scored = []
    monkeypatch.setattr(fid, "frechet_distance", lambda mu, sigma, *ref: scored.append((mu, sigma)) or 0.0)
    run_script("train.py", "--data-path", grey, "--results-dir", tmp_path, *TRAIN, "--max-steps", 2, *fid_flags(ref))
    run_script("sample.py", "--ckpt", tmp_path / "checkpoints" / "0000002.pt", "--npz", tmp_path / "s.npz",
               "--num-samples", 2)
    with np.load(tmp_path / "s.npz") as f:
        assert f["arr_0"].shape == (2, 8, 8, 3) and (f["arr_0"] == f["arr_0"][..., :1]).all()    # grey as RGB
    mu, sigma = fid.compute_stats(str(tmp_path / "s.npz"), fid.load_inception(weights))
    assert len(scored) == 1 and "FID-2 0.0000" in (tmp_path / "log.txt").read_text()
    np.testing.assert_allclose(scored[0][0], mu, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(scored[0][1], sigma, rtol=1e-4, atol=1e-4 * np.abs(sigma).max())


#################################################################################
#                         twinflow.py: TwinFlow training                        #
#################################################################################

def test_twinflow_trains_resumes_exactly_and_samples_in_1_and_2_steps(data, tmp_path):
    run_script("twinflow.py", "--data-path", data, "--results-dir", tmp_path / "a", *TWIN, "--max-steps", 4,
               "--sample-every", 4)
    run_script("twinflow.py", "--data-path", data, "--results-dir", tmp_path / "b", *TWIN, "--max-steps", 2)
    run_script("twinflow.py", "--data-path", data, "--results-dir", tmp_path / "b", *TWIN, "--max-steps", 4,
               "--resume", tmp_path / "b" / "checkpoints" / "0000002.pt")
    a = torch.load(tmp_path / "a" / "checkpoints" / "0000004.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoints" / "0000004.pt", weights_only=True)
    assert set(a) >= {"G", "EMA", "opt", "config", "rng"} and a["config"]["F"]["use_t_tgt"]
    for key in ("G", "EMA"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key        # the EMA's warm-up included
    assert not all(torch.equal(a["G"][k], a["EMA"][k]) for k in a["G"])
    log = open(tmp_path / "a" / "log.txt").read()
    assert all(f" {term} " in log for term in ("base", "real", "fake", "rectify", "base_one_step"))
    assert os.path.exists(tmp_path / "a" / "samples" / "0000004_ema.png")
    # Sampling: x <- x - (t - t') F(x, y, t, t') from the EMA, one step by default, 1, 2 or 4 on request.
    ckpt = tmp_path / "a" / "checkpoints" / "0000004.pt"
    G = model.Generator(**a["config"]["F"])
    G.load_state_dict(a["EMA"])
    z = torch.from_numpy(np.random.default_rng([0, 1]).standard_normal((1, 3, 8, 8), dtype=np.float32))
    y = torch.tensor([1])
    with torch.no_grad():
        one = z - G(z, y, torch.ones(1), torch.zeros(1))
        half = z - 0.5 * G(z, y, torch.ones(1), torch.full((1,), 0.5))
        two = half - 0.5 * G(half, y, torch.full((1,), 0.5), torch.zeros(1))
    for steps, x in ((None, one), (2, two)):
        out = tmp_path / f"grid{steps}.png"
        run_script("sample.py", "--ckpt", ckpt, "--out", out, "--num-images", 2, "--nrow", 2,
                   *(["--steps", steps] if steps else []))
        expect = model.to_uint8(x)[0].permute(1, 2, 0).numpy().astype(int)
        assert np.abs(np.asarray(Image.open(out))[2:10, 12:20].astype(int) - expect).max() <= 1, steps
    assert not np.array_equal(model.to_uint8(one), model.to_uint8(two))
    run_script("sample.py", "--ckpt", ckpt, "--npz", tmp_path / "s.npz", "--num-samples", 10, "--steps", 2)
    with np.load(tmp_path / "s.npz") as f:
        assert f["arr_0"].shape == (10, 8, 8, 3) and np.bincount(f["labels"]).tolist() == [2] * 5
    cli_error("train.py", "--data-path", data, "--results-dir", tmp_path / "c", *TRAIN, "--resume", ckpt,
                 match="holds a TwinFlow network")
    cli_error("twinflow.py", "--data-path", data, "--results-dir", tmp_path / "a", *TWIN, "--max-steps", 6,
                 match="already holds a run")


def test_twinflow_real_term_alone_is_flow_matching_sampled_by_euler_steps(data, tmp_path):
    run_script("twinflow.py", "--data-path", data, "--results-dir", tmp_path, *TWIN, "--max-steps", 2,
               "--terms", "real", "--cfg-ratio", 0)
    ckpt = torch.load(tmp_path / "checkpoints" / "0000002.pt", weights_only=True)
    assert not ckpt["config"]["F"]["use_t_tgt"] and ckpt["config"]["terms"] == ["real"]
    assert "training TwinFlow (real)" in open(tmp_path / "log.txt").read() and " fake " not in open(tmp_path / "log.txt").read()
    G, steps, _ = checkpoint.load_generator(tmp_path / "checkpoints" / "0000002.pt")
    z, y = torch.randn(2, 3, 8, 8), torch.tensor([0, 3])
    with torch.no_grad():                                     # one Euler step of the velocity: x = z - F(z, y, 1)
        assert steps == 1 and torch.equal(model.sample(G, z, y, 1), z - G(z, y, torch.ones(2)))
    # The loss is flow matching's by hand: |F(x_t, y, t) - (z - x)|^2 with the batch's draws.
    g = torch.Generator().manual_seed(0)
    batch = {k: v[:3] for k, v in loss.twinflow_batch(*LatentData(data).sample(8, g), g).items()}
    F_net = model.Generator(**ckpt["config"]["F"]).requires_grad_(False)
    terms = loss.twinflow_losses(F_net, None, **batch, terms=("real",))
    x_t = loss.interpolate(batch["x"], batch["z"], batch["t"])
    want = (F_net(x_t, batch["y"], batch["t"]) - (batch["z"] - batch["x"])).square().mean()
    assert list(terms) == ["real"] and torch.allclose(terms["real"], want)


def test_twinflow_under_torchrun(data, tmp_path):
    """Two ranks split the batch and end with the same weights: the five terms are one DDP forward."""
    out = torchrun("twinflow.py", "--data-path", data, "--results-dir", tmp_path, *TWIN, "--max-steps", 2)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "on 2 x cpu, batch 4/rank" in out.stdout and "weights identical on all 2 ranks" in out.stdout


#################################################################################
#                  train_classifier.py: the guidance classifier                 #
#################################################################################

def logged(path):
    """The values of every `step ...` line of a log.txt, as dicts."""
    rows = [line.split()[4:] for line in open(path).read().splitlines() if " step " in line]
    return [{k: float(v) for k, v in zip(row[::2], row[1::2])} for row in rows]


def test_classifier_trains_30_epochs_and_load_classifier_reads_it(data, tmp_path):
    run_script("train_classifier.py", "--data-path", data, "--results-dir", tmp_path, *CLS, "--global-batch-size", 24)
    assert "30 steps (30.0 epochs)" in open(tmp_path / "log.txt").read()   # default: 30 epochs of 24 images
    for row in logged(tmp_path / "log.txt"):
        assert 0 <= row["acc"] <= 1 and all(math.isfinite(row[k]) for k in ("loss", "grad_norm", "lr", "img/s"))
    path = tmp_path / "checkpoints" / "0000030.pt"
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["step"] == 30 and ckpt["config"] == dict(C=dict(model.SIZES["T/2"], input_size=8, in_channels=3,
                                                                num_classes=5))
    assert ckpt["opt"]["param_groups"][0]["betas"] == (0.9, 0.95) and ckpt["opt"]["param_groups"][0]["lr"] == 1e-3
    assert ckpt["data_info"]["num_classes"] == 5 and len(ckpt["rng"]) == 1 and ckpt["args"]["ema_decay"] == 0.9995
    C, info = checkpoint.load_classifier(path)
    assert info == ckpt["data_info"]
    torch.manual_seed(0)
    init = model.Classifier(**ckpt["config"]["C"])                        # the run's initial weights (seed 0)
    for name, p in C.state_dict().items():
        assert torch.equal(p, ckpt["EMA"][name])
        if name != "pos_embed":
            assert not torch.equal(p, init.state_dict()[name]) and not torch.equal(p, ckpt["model"][name]), name


def test_classifier_resume_is_bit_identical(data, tmp_path):
    run = ["--data-path", data, *CLS, "--global-batch-size", 8]
    run_script("train_classifier.py", *run, "--results-dir", tmp_path / "a", "--max-steps", 4)
    run_script("train_classifier.py", *run, "--results-dir", tmp_path / "b", "--max-steps", 2)
    run_script("train_classifier.py", *run, "--results-dir", tmp_path / "b", "--max-steps", 4,
               "--resume", tmp_path / "b" / "checkpoints" / "0000002.pt")
    a = torch.load(tmp_path / "a" / "checkpoints" / "0000004.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoints" / "0000004.pt", weights_only=True)
    for key in ("model", "EMA"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    assert torch.equal(a["opt"]["state"][1]["exp_avg_sq"], b["opt"]["state"][1]["exp_avg_sq"])


def test_classifier_loss_falls_on_a_learnable_set(tmp_path):
    """Two classes that differ by a constant offset: the loss must fall well below ln 2 within a few dozen steps."""
    path = make_data(tmp_path / "offset", n=32, num_classes=2)
    labels = np.load(os.path.join(path, "labels.npy"))
    x = (labels - 0.5)[:, None, None, None, None] + 0.1 * np.random.default_rng(0).standard_normal((32, 2, 3, 8, 8))
    np.save(os.path.join(path, "latents.npy"), x.astype(np.float16))
    run_script("train_classifier.py", "--data-path", path, "--results-dir", tmp_path, *CLS, "--global-batch-size", 16,
               "--max-steps", 40, "--log-every", 5)
    losses = [row["loss"] for row in logged(tmp_path / "log.txt")]
    assert losses[0] > 0.5 and max(losses[-2:]) < 0.35, losses


def test_classifier_random_affine():
    x = torch.randn(4, 3, 8, 8)
    assert torch.equal(train_classifier.random_affine(x, p=0), x)
    identity = train_classifier.random_affine(x, p=1, degrees=0, translate=0, scale=(1, 1))
    torch.testing.assert_close(identity, x, atol=1e-5, rtol=0)
    # 2 px right and 1 px up: the content moves, the vacated band mirrors the edge (reflection about it).
    out = train_classifier.affine(x, torch.zeros(4), torch.tensor([[0.25, -0.125]]).repeat(4, 1), torch.ones(4))
    torch.testing.assert_close(out[..., :7, 2:], x[..., 1:, :6], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[..., :7, :2], x[..., 1:, [1, 0]], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[..., 7, 2:], x[..., 7, :6], atol=1e-5, rtol=0)
    # 90 degrees about the image centre, counter-clockwise like kornia; a 2x zoom about the centre (3.5, 3.5).
    out = train_classifier.affine(x, torch.full((4,), 90.0), torch.zeros(4, 2), torch.ones(4))
    torch.testing.assert_close(out, torch.rot90(x, 1, (2, 3)), atol=1e-5, rtol=0)
    ramp = torch.arange(8.0).expand(1, 1, 8, 8)
    out = train_classifier.affine(ramp, torch.zeros(1), torch.zeros(1, 2), torch.full((1,), 2.0))
    torch.testing.assert_close(out[0, 0, 0, 2:6], torch.tensor([2.75, 3.25, 3.75, 4.25]))
    # Each image on its own: p = 0.8 leaves about a fifth unchanged, and the ranges are respected.
    x = torch.randn(2000, 1, 4, 4)
    torch.manual_seed(0)
    unchanged = (train_classifier.random_affine(x) == x).flatten(1).all(1).float().mean()
    assert 0.17 < unchanged < 0.23


def test_classifier_under_torchrun(data, tmp_path):
    """Two ranks split the batch and stay in sync."""
    out = torchrun("train_classifier.py", "--data-path", data, "--results-dir", tmp_path, *CLS, "--global-batch-size", 8,
                   "--max-steps", 4)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "on 2 x cpu, batch 4/rank" in out.stdout and "weights identical on all 2 ranks" in out.stdout


#################################################################################
#                   judge.py: the judge of small-image samples                  #
#################################################################################

def test_judge_trains_and_scores_samples_against_the_real_floor(data, tmp_path, capsys):
    held_out = make_data(tmp_path / "held_out", seed=1)
    run_script("judge.py", "--data-path", data, "--results-dir", tmp_path / "judge", "--device",
               "cpu", "--global-batch-size", 8, "--max-steps", 6, "--log-every", 3)
    judge = tmp_path / "judge" / "checkpoints" / "0000006.pt"
    assert "training the judge on 1 x cpu" in open(tmp_path / "judge" / "log.txt").read()
    # Two steps of a 2-step model: samples near their noise, which the judge's features tell apart.
    run_script("train.py", "--data-path", data, "--results-dir", tmp_path / "afm", *TRAIN, "--max-steps", 2, "--nfe", 2)
    g_path = tmp_path / "afm" / "checkpoints" / "0000002.pt"
    for name in ("a", "b"):
        run_script("sample.py", "--ckpt", g_path, "--npz", tmp_path / f"{name}.npz", "--num-samples", 20)
    capsys.readouterr()
    run_script("judge.py", "--evaluate", tmp_path / "a.npz", "--judge", judge, "--data-path", held_out,
               "--real-data", data, "--compare", tmp_path / "a.npz", tmp_path / "b.npz")
    printed = capsys.readouterr().out.splitlines()
    # By hand: the judge's EMA on the held-out images (view 0), the real training images and the samples' pixels.
    J, _ = load_judge(judge)
    ref, real = LatentData(held_out), LatentData(data)
    view0 = lambda d, rows=slice(None): torch.from_numpy(d.latents[rows, 0].astype(np.float32))
    subset = np.sort(np.random.RandomState(0).permutation(24)[:20])    # as many real images as samples, at random
    with np.load(tmp_path / "a.npz") as f:
        x_fake = torch.from_numpy(f["arr_0"]).permute(0, 3, 1, 2).float() / 127.5 - 1
        y_fake = torch.from_numpy(f["labels"])
    with torch.no_grad():
        f_ref, f_real, f_fake = (J.features(x).double() for x in (view0(ref), view0(real, subset), x_fake))
        acc = lambda x, y: (J(x).argmax(1) == y).double().mean().item()
    stats = lambda f: (f.mean(0).numpy(), np.cov(f.numpy(), rowvar=False))
    floor, fake = (fid.frechet_distance(*stats(f), *stats(f_ref)) for f in (f_real, f_fake))
    assert printed[0].endswith(f"class accuracy {acc(view0(ref), torch.from_numpy(ref.labels)):.4f} on the 24 "
                               f"held-out images of {held_out}")
    assert printed[1].startswith(f"real {data} (20): class accuracy") and f"Frechet distance {floor:.4f}" in printed[1]
    ratios = spread(f_real, torch.from_numpy(real.labels[subset]), f_ref, torch.from_numpy(ref.labels))
    assert printed[1].endswith(f"spread {np.nanmean(ratios):.2f} of the real's")
    assert printed[4].startswith(f"{tmp_path / 'a.npz'} (20): class accuracy {acc(x_fake, y_fake):.4f}")
    assert f"Frechet distance {fake:.4f} ({fake / floor:.1f}x the real floor)" in printed[4]
    precision, recall = fid.precision_recall(f_ref, f_fake)
    assert f"precision {precision:.4f}  recall {recall:.4f}" in printed[4] and printed[5].startswith("    per class")
    assert len(printed[5].split()) == 2 + 5 and printed[6].startswith("    spread per class")
    # The same checkpoint and seed give the same images: no difference, the same classes; unrelated real pairs differ.
    assert printed[7].endswith("mean squared difference 0.0000, same judged class 1.0000 (20 pairs)")
    assert printed[8].startswith("real pairs of one class (reference): mean squared difference 0.")
    # Two steps of a one-step model: a G that still outputs nearly one image, which the report warns of.
    run_script("train.py", "--data-path", data, "--results-dir", tmp_path / "one", *TRAIN, "--max-steps", 2)
    run_script("sample.py", "--ckpt", tmp_path / "one" / "checkpoints" / "0000002.pt", "--npz", tmp_path / "c.npz",
               "--num-samples", 20)
    capsys.readouterr()
    run_script("judge.py", "--evaluate", tmp_path / "c.npz", "--judge", judge, "--data-path", held_out)
    assert "features of these 20 images are degenerate" in capsys.readouterr().out


def test_classifier_and_judge_bad_inputs(data, tmp_path):
    run = ["--results-dir", tmp_path / "cls", *CLS, "--global-batch-size", 8]
    cli_error("train_classifier.py", "--data-path", tmp_path / "nothing", *run, match="latents.npy is missing")
    odd = make_data(tmp_path / "odd", size=7)
    cli_error("train_classifier.py", "--data-path", odd, *run, match="inputs of size 7 do not split into patches")
    run_script("train_classifier.py", "--data-path", data, *run, "--max-steps", 1)
    c_path = tmp_path / "cls" / "checkpoints" / "0000001.pt"
    cli_error("train_classifier.py", "--data-path", data, *run, "--max-steps", 2, match="already holds a run")
    run_script("train.py", "--data-path", data, "--results-dir", tmp_path / "afm", *TRAIN, "--max-steps", 1)
    g_path = tmp_path / "afm" / "checkpoints" / "0000001.pt"
    cli_error("train_classifier.py", "--data-path", data, *run[:2], "--model", "S/2", *run[4:], "--resume", c_path,
                 match="holds another network than this run asks for: C.depth 2 (asked: 12)")
    cli_error("train_classifier.py", "--data-path", data, *run, "--resume", g_path,
                 match="holds a generator and a discriminator, and this run trains a classifier")
    run_script("sample.py", "--ckpt", g_path, "--npz", tmp_path / "s.npz", "--num-samples", 10)
    evaluate = ["--evaluate", tmp_path / "s.npz", "--device", "cpu"]
    cli_error("judge.py", *evaluate, "--judge", c_path, "--data-path", data, match="not a judge checkpoint")
    run_script("judge.py", "--data-path", data, "--results-dir", tmp_path / "j", "--device", "cpu",
               "--global-batch-size", 8, "--max-steps", 1)
    judge = tmp_path / "j" / "checkpoints" / "0000001.pt"
    latents = make_data(tmp_path / "latents")
    json.dump(dict(num_classes=5, image_size=8, scale=0.18215, vae="sd-vae-ft-mse"),
              open(os.path.join(latents, "info.json"), "w"))
    cli_error("judge.py", *evaluate, "--judge", judge, "--data-path", latents,
                 match="vae 'none' vs 'sd-vae-ft-mse'")
    cli_error("judge.py", "--data-path", latents, "--results-dir", tmp_path / "j2",
                 "--device", "cpu", match="the judge is for small pixel images")
    (tmp_path / "bad.npz").write_bytes(b"not an npz")
    cli_error("judge.py", "--evaluate", tmp_path / "bad.npz", "--judge", judge, "--data-path", data,
                 match="cannot read")
    with pytest.raises(SystemExit) as e:
        run_script("judge.py", *evaluate, "--data-path", data)
    assert e.value.code == 2                                   # argparse: "--evaluate needs --judge"


def test_the_judge_scores_only_inputs_of_its_space(tmp_path):
    """Labels among the judge's classes, images of its size and channels (grey written as RGB is grey), enough of
    them, a readable npz, and the scoring flags only with --evaluate: each refused in one line before any scoring."""
    grey = make_data(tmp_path / "grey", channels=1)
    run_script("judge.py", "--data-path", grey, "--results-dir", tmp_path / "j", "--device", "cpu",
               "--global-batch-size", 8, "--max-steps", 1)
    judge = tmp_path / "j" / "checkpoints" / "0000001.pt"
    rng = np.random.default_rng(0)
    images = np.repeat(rng.integers(0, 256, (6, 8, 8, 1), dtype=np.uint8), 3, axis=3)   # grey, as sample.py writes it
    labels = np.arange(6) % 5

    def refused(match, arr_0=images, y=labels, held_out=grey):
        np.savez(tmp_path / "s.npz", arr_0=arr_0, labels=y)
        cli_error("judge.py", "--evaluate", tmp_path / "s.npz", "--judge", judge, "--data-path", held_out,
                     match=match)
    classes = "labels must be the judge's classes, integers from 0 to 4"
    refused(classes, y=np.array([0, 1, 2, 3, 4, 99]))
    refused(classes, y=np.array([0, 1, 2, 3, 4, -1]))
    refused(classes, y=labels + 0.7)
    refused(classes, y=np.array(list("012340")))
    space = "the judge scores 4 or more images of 8 x 8 pixels in 1 channel(s)"
    refused(f"{space} (grey as RGB too), got 6 of 16 x 16 in 3", arr_0=np.zeros((6, 16, 16, 3), np.uint8))
    colour = images.copy()
    colour[0, 0, 0] = (255, 0, 0)
    refused("got 6 of 8 x 8 in 3", arr_0=colour)
    refused("got 0 of 8 x 8", arr_0=images[:0], y=labels[:0])
    refused("got 2 of 8 x 8", arr_0=images[:2], y=labels[:2])
    refused("with one label each, got arr_0 uint8 (6, 8, 8, 3) and labels int64 (5,)", y=labels[:5])
    refused("channels 1 vs 3", held_out=make_data(tmp_path / "rgb"))
    np.savez(tmp_path / "good.npz", arr_0=images, labels=labels)
    (tmp_path / "cut.npz").write_bytes((tmp_path / "good.npz").read_bytes()[:300])
    cli_error("judge.py", "--evaluate", tmp_path / "cut.npz", "--judge", judge, "--data-path", grey,
                 match=f"cannot read {tmp_path / 'cut.npz'} as a sample npz")
    run_script("judge.py", "--evaluate", tmp_path / "good.npz", "--judge", judge, "--data-path", grey)
    for flags in (["--judge", judge], ["--real-data", grey], ["--compare", "a.npz", "b.npz"]):
        cli_error("judge.py", "--data-path", grey, "--results-dir", tmp_path / "new", *flags,
                     match=": only with --evaluate NPZ or --checkpoints CKPT, which score samples; without them "
                           "judge.py trains a judge")
    assert not (tmp_path / "new").exists()


#################################################################################
#                         sample.py: grids and npz files                        #
#################################################################################

def test_a_grid_sets_checkpoints_side_by_side_on_the_same_noise(data, tmp_path):
    for seed in (0, 1):
        run_script("train.py", "--data-path", data, "--results-dir", tmp_path / f"s{seed}", *TRAIN, "--max-steps", 1,
                   "--nfe", 2, "--global-seed", seed)
    ckpts = [tmp_path / f"s{seed}" / "checkpoints" / "0000001.pt" for seed in (0, 1)]
    for i, ckpt in enumerate(ckpts):
        run_script("sample.py", "--ckpt", ckpt, "--out", tmp_path / f"one{i}.png", "--num-images", 3, "--nrow", 1)
    run_script("sample.py", "--ckpt", *ckpts, "--out", tmp_path / "both.png", "--num-images", 3)
    both, one = np.asarray(Image.open(tmp_path / "both.png")), [np.asarray(Image.open(tmp_path / f"one{i}.png")) for i in (0, 1)]
    assert both.shape == (2 + 3 * 10, 2 + 2 * 10, 3)                          # 3 rows of noise, a column per checkpoint
    assert np.array_equal(both[:, 2:12], one[0][:, 2:12]) and np.array_equal(both[:, 12:22], one[1][:, 2:12])
    cli_error("sample.py", "--ckpt", *ckpts, "--npz", tmp_path / "x.npz", match="--npz takes one --ckpt")


@pytest.mark.parametrize("name, steps", [("fmnist_afm.pt", 1), ("fmnist_afm_pixels.pt", 1), ("fmnist_twinflow.pt", 1),
                                         ("fmnist_twinflow.pt", 2)])
def test_the_committed_fashion_mnist_generators_sample_alone(tmp_path, name, steps):
    """docs/fmnist_afm.pt (on the latents of the committed autoencoder docs/fmnist_ae.pt, its only other file),
    docs/fmnist_afm_pixels.pt and docs/fmnist_twinflow.pt (pixel data: no other file): a grid and an evaluation npz,
    TwinFlow's in 1 and 2 steps; the committed grids are the checkpoints' own."""
    ckpt, steps = os.path.join(HERE, "docs", name), ["--steps", steps]
    if name == "fmnist_afm.pt":
        steps += ["--vae-weights", os.path.join(HERE, "docs", "fmnist_ae.pt")]
    run_script("sample.py", "--ckpt", ckpt, "--out", tmp_path / "grid.png", "--class-labels", *range(10),
               "--num-images", 100, "--nrow", 10, *steps)              # docs' grid: ten of each class, in turn
    grid = np.asarray(Image.open(tmp_path / "grid.png"), dtype=np.int16)
    assert grid.shape == (2 + 10 * 30, 2 + 10 * 30, 3)
    if steps[1] == 1:
        committed = np.asarray(Image.open(os.path.join(HERE, "docs", name.replace(".pt", ".png"))), dtype=np.int16)
        assert np.abs(grid - committed).max() <= 1
    run_script("sample.py", "--ckpt", ckpt, "--npz", tmp_path / "s.npz", "--num-samples", 20, *steps)
    with np.load(tmp_path / "s.npz") as f:
        assert f["arr_0"].shape == (20, 28, 28, 3) and np.bincount(f["labels"]).tolist() == [2] * 10
        assert f["arr_0"].std() > 20                                # images, not a constant
    assert os.path.getsize(ckpt) < 10 * 2 ** 20


def interrupted_after_one_batch(generate):
    """model.generate as a Ctrl-C after the first batch finds it."""
    def interrupted(*args, **kwargs):
        for i, batch in enumerate(generate(*args, **kwargs)):
            if i == 1:
                raise KeyboardInterrupt
            yield batch
    return interrupted


def test_noise_seeds_are_unrelated_and_an_interrupted_npz_resumes(data, tmp_path, monkeypatch, capsys):
    a, b = model.noise(range(6), (3, 4, 4), 0), model.noise(range(6), (3, 4, 4), 1)
    assert torch.equal(a[2:4], model.noise([2, 3], (3, 4, 4), 0))              # sample i's noise is its own
    assert not any(torch.allclose(x, y) for x in a for y in b)                 # seed 1 is not seed 0 shifted
    run_script("train.py", "--data-path", data, "--results-dir", tmp_path, *TRAIN, "--max-steps", 1)
    ckpt = tmp_path / "checkpoints" / "0000001.pt"
    run_script("sample.py", "--ckpt", ckpt, "--npz", tmp_path / "whole.npz", "--num-samples", 10, "--batch-size", 3)
    real_generate = model.generate
    monkeypatch.setattr(model, "generate", interrupted_after_one_batch(real_generate))
    with pytest.raises(SystemExit) as e:
        run_script("sample.py", "--ckpt", ckpt, "--npz", tmp_path / "part.npz", "--num-samples", 10, "--batch-size", 3)
    assert e.value.code == 130 and "run the same command again to resume" in capsys.readouterr().err
    assert not (tmp_path / "part.npz").exists() and (tmp_path / "part.npz.staging.npy").exists()
    monkeypatch.setattr(model, "generate", real_generate)
    run_script("sample.py", "--ckpt", ckpt, "--npz", tmp_path / "part.npz", "--num-samples", 10, "--batch-size", 4)
    assert "3 of 10 samples already drawn" in capsys.readouterr().out
    with np.load(tmp_path / "whole.npz") as whole, np.load(tmp_path / "part.npz") as part:
        assert np.array_equal(whole["arr_0"], part["arr_0"]) and np.array_equal(whole["labels"], part["labels"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "curves.png", "log.txt", "part.npz",
                                                          "scalars.jsonl", "whole.npz"]


def test_staging_files_are_checked_whole_before_reuse(data, tmp_path, monkeypatch, capsys):
    """A staging file cut short or damaged is one line naming what to delete, never read as zeros (black samples, or
    all-zero images in prepare_latents.py); a resumed --npz reports the transport cost over all its samples."""
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "x.npz", arr_0=rng.integers(0, 256, (6, 4, 4), dtype=np.uint8), labels=rng.integers(0, 3, 6))
    argv = ["--data-path", tmp_path / "x.npz", "--out", tmp_path / "out", "--vae", "none", "--num-workers", 0,
            "--batch-size", 1]
    with pytest.raises(SystemExit, match="stopped after 1 chunks"):
        run_script("prepare_latents.py", *argv, "--stop-after-chunks", 1)
    latents = tmp_path / "out" / "latents.partial.npy"
    whole = latents.read_bytes()
    latents.write_bytes(whole[:-40])
    message = cli_error("prepare_latents.py", *argv)
    assert "truncated" in message and f"delete {tmp_path / 'out'}/run.json" in message, message
    latents.write_bytes(whole)
    run_script("prepare_latents.py", *argv)
    assert np.load(tmp_path / "out" / "latents.npy").shape == (6, 2, 1, 4, 4)

    run_script("train.py", "--data-path", data, "--results-dir", tmp_path / "r", *TRAIN, "--max-steps", 1)
    ckpt, npz = tmp_path / "r" / "checkpoints" / "0000001.pt", tmp_path / "s.npz"
    command = ["sample.py", "--ckpt", ckpt, "--npz", npz, "--num-samples", 10, "--batch-size", 3]
    run_script(*command[:3], "--npz", tmp_path / "straight.npz", *command[5:])
    straight = capsys.readouterr().out
    real_generate = model.generate
    monkeypatch.setattr(model, "generate", interrupted_after_one_batch(real_generate))
    assert exit_status(command) == 130
    monkeypatch.setattr(model, "generate", real_generate)
    mask, rows = tmp_path / "s.npz.staging-done.npy", tmp_path / "s.npz.staging.npy"
    kept = {path: path.read_bytes() for path in (mask, rows)}
    np.save(mask, np.array([None] * 10, dtype=object))                  # damaged: a pickled array in its place
    cli_error(*command, match=f"the staging files of --npz {npz} are damaged")
    mask.write_bytes(kept[mask])
    rows.write_bytes(kept[rows][:-100])                                  # cut short
    cli_error(*command, match=f"truncated); delete {npz}.staging.json to start over")
    rows.write_bytes(kept[rows])
    capsys.readouterr()
    run_script(*command)
    resumed = capsys.readouterr().out
    assert "3 of 10 samples already drawn" in resumed and "drew 7 in" in resumed
    cost = lambda out: re.search(r"transport cost E\|G\(z\) - z\|\^2/n ([0-9.]+) over all 10", out).group(1)
    assert cost(resumed) == cost(straight)
    with np.load(npz) as part, np.load(tmp_path / "straight.npz") as whole:
        assert np.array_equal(part["arr_0"], whole["arr_0"])
    assert not glob.glob(f"{npz}.*")


#################################################################################
#                           fid.py: FID and Inception                           #
#################################################################################

FID_FIXTURE = os.path.join(FIXTURES, "inception.pt")


@functools.lru_cache(maxsize=None)
def _fid_fixture():
    return torch.load(FID_FIXTURE, weights_only=True)


@functools.lru_cache(maxsize=None)
def _fid_state_dict():
    return fill(_fid_fixture()["keys"], _fid_fixture()["seed"])


@functools.lru_cache(maxsize=None)
def _fid_weights_file():
    """The fixture's deterministic weights saved as a weights file (once per session, ~95 MB in a temp dir)."""
    folder = tempfile.mkdtemp()
    atexit.register(shutil.rmtree, folder, True)
    path = os.path.join(folder, "weights-inception-2015-12-05-6726825d.pth")
    torch.save(_fid_state_dict(), path)
    return path


def _fid_images(n, seed, size=64):
    """uint8 (n, size, size, 3): smooth colour gradients plus noise, so features vary between images."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    images = []
    for _ in range(n):
        a, b, c = rng.uniform(-1, 1, (3, 3))
        base = 128 + 100 * np.sin(3 * (a[:, None, None] * xx + b[:, None, None] * yy) + c[:, None, None])
        images.append(base.transpose(1, 2, 0) + rng.normal(0, 20, (size, size, 3)))
    return np.clip(images, 0, 255).astype(np.uint8)


def _fid_cli(*args):
    # One thread: a busy machine would otherwise oversubscribe 2 cores.
    return subprocess.run([sys.executable, os.path.join(HERE, "fid.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=HERE, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _fid_value(stdout, name):
    lines = stdout.strip().splitlines()
    return float([line for line in lines if line.startswith(name + ":")][-1].split()[1])


def _fid_sqrtm_reference(mu1, sigma1, mu2, sigma2):
    """The classic route (TTUR, ADM, pytorch-fid): scipy's matrix square root of sigma1 sigma2."""
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2).real
    return (mu1 - mu2) @ (mu1 - mu2) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


def test_fid_inception_reference_vectors(tmp_path):
    fx = _fid_fixture()
    model = fid.load_inception(_fid_weights_file())
    assert [(k, list(v.shape)) for k, v in model.state_dict().items()] == \
        [(k, list(s)) for k, s in fx["keys"]]  # the standard FID weight layout, key for key
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    pool, _, logits = model(fx["imgs256"])
    torch.testing.assert_close(pool, fx["pool256"], rtol=1e-4, atol=1e-4 * fx["pool256"].abs().max().item())
    torch.testing.assert_close(logits, fx["logits256"], rtol=1e-4, atol=1e-4 * fx["logits256"].abs().max().item())
    torch.testing.assert_close(model(fx["imgs256"][1:])[0], pool[1:], rtol=1e-5, atol=1e-5)  # one image alone

    # pytorch-fid's and torch-fidelity's files share these key names, but a file converted straight from TensorFlow
    # has no BatchNorm num_batches_tracked. A versioned state_dict (with _metadata) gets no help from torch's
    # BatchNorm there, so the loader must add them; the weights must then be exactly those above.
    versioned = model.state_dict()
    for key in [k for k in versioned if k.endswith("num_batches_tracked")]:
        del versioned[key]
    torch.save(versioned, tmp_path / "pt_inception-2015-12-05-6726825d.pth")
    other = fid.load_inception(str(tmp_path / "pt_inception-2015-12-05-6726825d.pth"))
    for (key, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), key


def test_fid_spatial_features_are_adm_mixed_6_conv():
    """
    sFID's features are ADM's 'mixed_6/conv:0'[..., :7] of the 2015 graph: the graph numbers its blocks mixed,
    mixed_1, ..., mixed_10 in order, so mixed_6 is the seventh Mixed_* block, Mixed_6d; its op 'mixed_6/conv' is the
    ReLU after mixed_6/conv/Conv2D and mixed_6/conv/batchnorm, i.e. the output of Mixed_6d.branch1x1; ADM flattens
    the first 7 channels of the (N, 17, 17, 192) NHWC tensor. No reference values exist for it, so the layer is pinned
    by hooks: every other candidate gives different numbers with these weights.
    """
    model = fid.InceptionV3().eval()
    model.load_state_dict(_fid_state_dict())
    blocks = [name for name, _ in model.named_children() if name.startswith("Mixed_")]
    assert len(blocks) == 11 and blocks[6] == "Mixed_6d"  # mixed, mixed_1, ..., mixed_6 is the seventh
    outputs = {}
    for name in ("Mixed_6c.branch1x1", "Mixed_6d.branch1x1", "Mixed_6d.branch1x1.bn", "Mixed_6e.branch1x1"):
        model.get_submodule(name).register_forward_hook(lambda m, i, out, name=name: outputs.update({name: out}))
    with torch.no_grad():
        pool, spatial, _ = model(torch.from_numpy(_fid_images(2, seed=6)).permute(0, 3, 1, 2))
    nhwc = lambda x: x[:, :7].permute(0, 2, 3, 1).reshape(len(x), -1)  # ADM: spatial[..., :7], then reshape
    assert spatial.shape == (2, 7 * 17 * 17) == (2, 2023) and spatial.dtype == torch.float32
    assert torch.equal(spatial, nhwc(outputs["Mixed_6d.branch1x1"]))
    assert (spatial >= 0).all() and (outputs["Mixed_6d.branch1x1.bn"][:, :7] < 0).any()  # after the ReLU
    wrong = dict(before_relu=nhwc(outputs["Mixed_6d.branch1x1.bn"]), Mixed_6c=nhwc(outputs["Mixed_6c.branch1x1"]),
                 Mixed_6e=nhwc(outputs["Mixed_6e.branch1x1"]), nchw=outputs["Mixed_6d.branch1x1"][:, :7].flatten(1))
    for name, other in wrong.items():
        assert (other - spatial).abs().max() > 1e-3 * spatial.abs().max(), name


def test_fid_resize_is_tensorflow1_bilinear():
    # f(y, x) = 10 y + x on a 4x4 grid, resized to 6x6. TF1 samples source coordinates d * 4/6 (no half-pixel
    # offset) = 0, 2/3, 4/3, 2, 8/3, 10/3, the last clamped to the edge 3; bilinear is exact on a linear f.
    x = (10 * torch.arange(4.0)[:, None] + torch.arange(4.0)[None, :])[None, None]  # (1, 1, 4, 4)
    c = torch.tensor([0, 2 / 3, 4 / 3, 2, 8 / 3, 3])
    expected = 10 * c[:, None] + c[None, :]
    out = fid.resize_bilinear_tf1(x, 6)[0, 0]
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    half_pixel = F.interpolate(x, size=(6, 6), mode="bilinear", align_corners=False)[0, 0]
    assert (half_pixel - expected).abs().max() > 0.1  # the test tells the two conventions apart


def test_fid_frechet_distance():
    rng = np.random.default_rng(0)
    d = 64
    a, b = rng.standard_normal((2, d, 3 * d)) / np.sqrt(3 * d)
    mu1, mu2, sigma1, sigma2 = rng.standard_normal(d), rng.standard_normal(d), a @ a.T, b @ b.T
    assert abs(fid.frechet_distance(mu1, sigma1, mu1, sigma1)) < 1e-10 * np.trace(sigma1)
    dmu = np.sum((mu1 - mu2) ** 2)
    assert math.isclose(fid.frechet_distance(mu1, sigma1, mu2, sigma1), dmu, rel_tol=1e-9)
    ours, ref = fid.frechet_distance(mu1, sigma1, mu2, sigma2), _fid_sqrtm_reference(mu1, sigma1, mu2, sigma2)
    assert math.isclose(ours, ref, rel_tol=1e-6) and ours > dmu
    # Fewer samples than dimensions: singular covariances. The answer stays finite and exact where known.
    feats = rng.standard_normal((10, d))
    singular = np.cov(feats, rowvar=False)
    assert np.linalg.matrix_rank(singular) < d
    assert math.isclose(fid.frechet_distance(mu1, singular, mu2, singular), dmu, rel_tol=1e-6)
    assert np.isfinite(fid.frechet_distance(mu1, singular, mu2, np.cov(feats[:, ::-1], rowvar=False)))
    with pytest.raises(ValueError, match="do not match"):
        fid.frechet_distance(mu1, sigma1, mu2[:-1], sigma2[:-1, :-1])
    with pytest.raises(ValueError, match="not finite"):
        fid.frechet_distance(mu1, np.where(np.eye(d) > 0, np.nan, sigma1), mu2, sigma2)

    # A small set against itself is 0 to the printed precision. 8 nonnegative 512-dim features (pool-like) leave 505
    # rounding-level eigenvalues; summing their square roots, as before the cutoff, printed -0.0001.
    feats = np.abs(rng.standard_normal((8, 512))) * rng.uniform(0.2, 2, 512)
    mu, sigma = feats.mean(0), np.cov(feats, rowvar=False)
    assert f"{fid.frechet_distance(mu, sigma, mu, sigma):.4f}" == "0.0000"
    w, v = np.linalg.eigh(sigma)
    root = (v * np.sqrt(w.clip(min=0))) @ v.T
    every_root = 2 * np.trace(sigma) - 2 * np.sqrt(np.linalg.eigvalsh(root @ sigma @ root).clip(min=0)).sum()
    assert f"{every_root:.4f}" == "-0.0001"  # the test tells the two apart


def test_fid_feature_stats_match_numpy():
    rng = np.random.default_rng(1)
    feats = 100 + rng.standard_normal((50, 8)) * rng.uniform(0.1, 3, 8)  # a large mean tests cancellation
    stats = fid.FeatureStats(dim=8)
    for chunk in np.array_split(feats, [7, 30]):
        stats.update(torch.from_numpy(chunk).float())
    mu, sigma = stats.all_reduce().mean_cov()  # all_reduce is a no-op without torch.distributed
    feats32 = feats.astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(mu, feats32.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(feats32, rowvar=False), rtol=1e-9, atol=1e-9)


def test_fid_inception_score():
    rng = np.random.default_rng(2)
    assert math.isclose(fid.inception_score(torch.zeros(20, 1008)), 1.0, rel_tol=1e-9)
    confident = torch.full((10, 1008), -50.0)
    confident[torch.arange(10), torch.arange(10)] = 50.0  # ten sure, distinct classes
    assert math.isclose(fid.inception_score(confident), 10.0, rel_tol=1e-6)
    logits = rng.standard_normal((25, 1008)) * 3
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    scores = [np.exp(np.mean(np.sum(q * (np.log(q) - np.log(q.mean(0))), 1))) for q in (p[:10], p[10:20], p[20:])]
    assert math.isclose(fid.inception_score(torch.from_numpy(logits), split_size=10), np.mean(scores), rel_tol=1e-9)


def _fid_brute_force_precision_recall(ref, samples, k=3, inside=np.less_equal):
    """The definition directly: exact float64 differences; a ball reaches a point's k-th nearest other point."""
    ref, samples = np.asarray(ref, np.float64), np.asarray(samples, np.float64)
    dist = lambda a, b: ((a[:, None] - b[None]) ** 2).sum(-1)
    radius = lambda x: np.array([np.sort(np.delete(row, i))[k - 1] for i, row in enumerate(dist(x, x))])
    d = dist(ref, samples)  # (Nr, Ns)
    return inside(d, radius(ref)[:, None]).any(0).mean(), inside(d, radius(samples)[None, :]).any(1).mean()


def test_fid_precision_recall_match_the_definition():
    rng = np.random.default_rng(7)
    # Continuous features of two overlapping clouds: values strictly between 0 and 1, whatever the block size.
    ref, samples = rng.standard_normal((40, 16)), 0.7 * rng.standard_normal((57, 16)) + 0.6
    expected = _fid_brute_force_precision_recall(ref, samples)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1
    for batch_size in (10000, 7, 1):
        assert fid.precision_recall(ref, samples, batch_size=batch_size) == expected
    assert fid.precision_recall(torch.from_numpy(ref).float(), torch.from_numpy(samples).float()) == \
        _fid_brute_force_precision_recall(ref.astype(np.float32), samples.astype(np.float32))

    # Ties: small integer features put many points exactly on a ball's boundary (inside, as in ADM: <=), and four
    # copies of one point give it a radius of 0 that only an exact copy reaches.
    grid = np.random.default_rng(1)
    ref, samples = grid.integers(0, 4, (30, 3)).astype(np.float64), grid.integers(1, 5, (25, 3)).astype(np.float64)
    expected = _fid_brute_force_precision_recall(ref, samples)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1
    assert _fid_brute_force_precision_recall(ref, samples, inside=np.less) != expected  # the ties count
    assert fid.precision_recall(ref, samples, batch_size=4) == expected
    far = np.full((4, 3), 9.0)
    ref, samples = np.concatenate([ref, far]), np.concatenate([samples, far[:1], far[:1] + 0.1])
    expected = _fid_brute_force_precision_recall(ref, samples)
    assert fid.precision_recall(ref, samples, batch_size=4) == expected
    assert fid.precision_recall(ref, samples[:-1]) == _fid_brute_force_precision_recall(ref, samples[:-1])

    # Copies at 2048 dims with large norms, where the distance expansion cancels to rounding, which must read as 0:
    # four copies of a far point give it a radius of 0, and the sample that copies it is inside that ball alone.
    pool = (rng.uniform(0, 3, (20, 2048)) + 50).astype(np.float32)
    pool[0] += 20
    ref, samples = np.concatenate([pool, pool[:1].repeat(3, 0)]), np.concatenate([pool[:1], pool[5:] + 1])
    expected = _fid_brute_force_precision_recall(ref, samples)
    assert expected[0] == 1 > _fid_brute_force_precision_recall(ref, samples, inside=np.less)[0]
    assert fid.precision_recall(ref, samples) == fid.precision_recall(ref, samples, batch_size=3) == expected
    assert fid.precision_recall(pool, pool) == (1.0, 1.0)  # a sample set equal to the reference

    for k in (1, 5):
        assert fid.precision_recall(ref, samples, k=k) == _fid_brute_force_precision_recall(ref, samples, k=k)
    with pytest.raises(ValueError, match="more than k=3"):
        fid.precision_recall(ref, samples[:3])
    with pytest.raises(ValueError, match="not finite"):
        fid.precision_recall(ref, np.where(samples == samples[0, 0], np.nan, samples))


def test_fid_inputs(tmp_path):
    a = _fid_images(5, seed=4, size=8)
    np.savez(tmp_path / "plain.npz", arr_0=a)
    np.savez_compressed(tmp_path / "compressed.npz", arr_0=a)
    (_, plain), (_, compressed) = (fid.open_input(str(tmp_path / name)) for name in ("plain.npz", "compressed.npz"))
    assert isinstance(plain, np.memmap) and np.array_equal(plain, a) and np.array_equal(compressed, a)
    batches = list(fid.iterate_images(plain, 3, start=1, stop=5))
    assert [tuple(x.shape) for x in batches] == [(3, 3, 8, 8), (1, 3, 8, 8)] and batches[0].dtype == torch.uint8
    assert np.array_equal(torch.cat(batches).permute(0, 2, 3, 1).numpy(), a[1:5])
    # ADM's reference batches hold images and statistics: FID and sFID read the statistics, Precision/Recall the images.
    np.savez(tmp_path / "both.npz", arr_0=a, mu=np.zeros(3), sigma=np.eye(3), mu_s=np.ones(2), sigma_s=np.eye(2))
    stats, images = fid.open_input(str(tmp_path / "both.npz"))
    assert sorted(stats) == ["mu", "mu_s", "sigma", "sigma_s"] and np.array_equal(images, a)
    assert not fid.needs_images((stats, images)) and fid.needs_images((stats, images), keep=["pool"])
    mu, sigma = fid.compute_stats(str(tmp_path / "both.npz"), model=None)  # no network needed for statistics
    assert np.array_equal(mu, np.zeros(3)) and np.array_equal(sigma, np.eye(3))
    # Statistics written before sFID: FID still reads them (no mu_s: sFID needs the images or a newer file).
    np.savez(tmp_path / "old.npz", mu=np.zeros(3), sigma=np.eye(3))
    stats, images = fid.open_input(str(tmp_path / "old.npz"))
    assert sorted(stats) == ["mu", "sigma"] and images is None
    assert fid.compute_stats(str(tmp_path / "old.npz"), model=None)[1].shape == (3, 3)

    # A folder (searched recursively, sorted) may mix sizes and modes: batches split where the size changes.
    os.makedirs(tmp_path / "f" / "sub")
    Image.fromarray(a[0]).save(tmp_path / "f" / "0.png")
    Image.fromarray(a[1]).save(tmp_path / "f" / "1.png")
    Image.fromarray(a[2, :6, :4, 0]).save(tmp_path / "f" / "sub" / "2.png")  # grayscale 6x4
    stats, files = fid.open_input(str(tmp_path / "f"))
    batches = list(fid.iterate_images(files, 4))
    assert stats is None and [tuple(x.shape) for x in batches] == [(2, 3, 8, 8), (1, 3, 6, 4)]
    assert np.array_equal(batches[0].permute(0, 2, 3, 1).numpy(), a[:2])
    assert all(np.array_equal(batches[1][0, c].numpy(), a[2, :6, :4, 0]) for c in range(3))


def test_fid_cli(tmp_path, capsys):
    weights, a = _fid_weights_file(), _fid_images(4, seed=0)
    b = np.clip(_fid_images(4, seed=1).astype(int) + 60, 0, 255).astype(np.uint8)  # other images, brighter
    np.savez(tmp_path / "a.npz", arr_0=a)
    np.savez(tmp_path / "b.npz", arr_0=b)
    os.makedirs(tmp_path / "a")
    for i, image in enumerate(a):
        Image.fromarray(image).save(tmp_path / "a" / f"{i:03d}.png")
    model = fid.InceptionV3().eval()
    model.load_state_dict(_fid_state_dict())
    with torch.no_grad():
        pool, spatial, logits = model(torch.from_numpy(a).permute(0, 3, 1, 2))
        pool_b = model(torch.from_numpy(b).permute(0, 3, 1, 2))[0]

    def assert_saved_stats(path):  # np.mean / np.cov of the features (which differ by a few 1e-6 across batch sizes and CPUs)
        with np.load(path) as saved:
            assert sorted(saved.files) == ["mu", "mu_s", "sigma", "sigma_s"]
            for (mu, sigma), features in (("mu", "sigma"), pool), (("mu_s", "sigma_s"), spatial):
                sigma_ = np.cov(features.double().numpy(), rowvar=False)
                np.testing.assert_allclose(saved[mu], features.double().mean(0), rtol=1e-4, atol=2e-5)
                np.testing.assert_allclose(saved[sigma], sigma_, rtol=1e-4, atol=1e-4 * np.abs(sigma_).max())

    # SAMPLES alone: IS (printed by default) and the saved statistics, FID's and sFID's.
    run = _fid_cli(tmp_path / "a.npz", "--inception", weights, "--batch-size", 3, "--save-stats", tmp_path / "a_s.npz")
    assert run.returncode == 0, run.stderr
    assert [line.split(" ")[0] for line in run.stdout.splitlines()] == ["saved", "IS:"]
    assert math.isclose(_fid_value(run.stdout, "IS"), fid.inception_score(logits), rel_tol=1e-4)
    assert_saved_stats(tmp_path / "a_s.npz")

    # torchrun shards a folder of the same images across two ranks (gloo): the summed statistics, the IS of the
    # gathered logits and the Precision/Recall of the gathered pool features against REF's are those of one process
    # only if every image counts exactly once. The whole row, FID last; the brighter images are far (sFID, FID > 1).
    run = torchrun("fid.py", tmp_path / "a", tmp_path / "b.npz", "--inception", weights, "--device", "cpu",
                   "--save-stats", tmp_path / "a_folder_s.npz")
    assert run.returncode == 0, run.stderr
    assert [line.split(":")[0] for line in run.stdout.splitlines()[1:]] == ["sFID", "IS", "Precision", "Recall", "FID"]
    assert_saved_stats(tmp_path / "a_folder_s.npz")
    assert math.isclose(_fid_value(run.stdout, "IS"), fid.inception_score(logits), rel_tol=1e-4)
    assert _fid_value(run.stdout, "sFID") > 1 and _fid_value(run.stdout, "FID") > 1
    precision, recall = _fid_brute_force_precision_recall(pool_b, pool)
    assert (_fid_value(run.stdout, "Precision"), _fid_value(run.stdout, "Recall")) == (precision, recall)

    # Statistics files written before sFID (no mu_s/sigma_s) need no weights and still give FID; each metric that
    # needs more says why in one line (small statistics: 2048-dim eigensolves are slow on 2 cores).
    rng = np.random.default_rng(3)
    for name, extra in (("s1.npz", {}), ("s2.npz", dict(arr_0=a))):  # s2's mu/sigma win over its arr_0
        x = rng.standard_normal((40, 16))
        np.savez(tmp_path / name, mu=x.mean(0), sigma=np.cov(x, rowvar=False), **extra)
    s1, s2 = (fid.open_input(str(tmp_path / name))[0] for name in ("s1.npz", "s2.npz"))
    fid_line = f"FID: {fid.frechet_distance(s1['mu'], s1['sigma'], s2['mu'], s2['sigma']):.4f}"
    capsys.readouterr()
    run_script("fid.py", tmp_path / "s1.npz", tmp_path / "s2.npz")
    assert capsys.readouterr() == ("\n".join([
        f"no sFID: {tmp_path / 's1.npz'} holds statistics without mu_s/sigma_s (written before sFID)",
        f"no IS: {tmp_path / 's1.npz'} holds statistics only, no images",
        f"no Precision/Recall: {tmp_path / 's1.npz'} holds statistics only, no images", fid_line, ""]), "")
    run_script("fid.py", tmp_path / "s2.npz", tmp_path / "s2.npz", "--metrics", "fid")
    assert capsys.readouterr() == ("FID: 0.0000\n", "")


def test_fid_cli_user_errors(tmp_path, capsys):
    np.savez(tmp_path / "a.npz", arr_0=_fid_images(2, seed=0))
    run = _fid_cli(tmp_path / "a.npz", tmp_path / "a.npz", "--inception", tmp_path / "missing.pth")
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and run.stderr.startswith("error:")
    assert "missing.pth" in run.stderr and "weights-inception-2015-12-05-6726825d.pth" in run.stderr  # where to get it
    # A metric asked for by name that the inputs cannot give, an unknown one, and statistics that are not finite.
    np.savez(tmp_path / "old.npz", mu=np.zeros(3), sigma=np.eye(3))
    np.savez(tmp_path / "nan.npz", mu=np.zeros(3), sigma=np.where(np.eye(3) > 0, np.nan, 0))
    old, nan, images, missing = (tmp_path / name for name in ("old.npz", "nan.npz", "a.npz", "missing.pth"))
    for args, words in (((old, old, "--metrics", "fid,sfid"), "without mu_s"),
                        ((old, images, "--metrics", "pr", "--inception", missing), "old.npz holds statistics only"),
                        ((old, old, "--metrics", "fid,kid"), "sfid,is,pr,fid"),
                        ((old, nan), "nan.npz: sigma is not finite")):
        capsys.readouterr()
        cli_error("fid.py", *args, match=words)                # exit status 1 and one line on stderr
        assert capsys.readouterr().out == ""
    # Inputs the CLI turns into one "error: ..." line the same way.
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((2, 8, 8, 3), np.float32))
    (tmp_path / "text.npz").write_text("not a zip")
    for path, words in (("float.npz", "uint8"), ("text.npz", "text.npz"), ("nowhere.npz", "not found")):
        with pytest.raises((ValueError, FileNotFoundError), match=words):
            fid.open_input(str(tmp_path / path))


def test_fid_cli_checks_outputs_and_weights_files(tmp_path, monkeypatch):
    np.savez(tmp_path / "a.npz", arr_0=_fid_images(2, seed=0, size=8))
    os.makedirs(tmp_path / "stats.npz")
    run = _fid_cli(tmp_path / "a.npz", "--inception", tmp_path / "missing.pth", "--save-stats", tmp_path / "stats.npz")
    assert run.returncode == 1 and run.stderr.strip() == f"error: --save-stats {tmp_path / 'stats.npz'} is a folder; " \
        "give a file name"                                     # before any work, so before the missing weights
    (tmp_path / "random.pth").write_bytes(os.urandom(1000))
    torch.save({"x": Exploit(str(tmp_path / "ran"))}, tmp_path / "pickle.pth")
    for name in ("random.pth", "pickle.pth"):
        run = _fid_cli(tmp_path / "a.npz", tmp_path / "a.npz", "--inception", tmp_path / name)
        assert run.returncode == 1 and len(run.stderr.strip().splitlines()) == 1, run.stderr
        assert f"{name} is not a readable weights file" in run.stderr and "torch-fidelity" in run.stderr
    assert not (tmp_path / "ran").exists()
    fid.save_stats(str(tmp_path / "s.npz"), dict(mu=np.zeros(2), sigma=np.eye(2)))
    assert os.stat(tmp_path / "s.npz").st_mode & 0o044                    # readable by others, as umask allows
    def full_disk(f, **arrays):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(np, "savez", full_disk)
    with pytest.raises(ValueError, match="cannot write .*t.npz: No space left on device"):
        fid.save_stats(str(tmp_path / "t.npz"), dict(mu=np.zeros(2), sigma=np.eye(2)))
    assert sorted(os.listdir(tmp_path)) == ["a.npz", "pickle.pth", "random.pth", "s.npz", "stats.npz"]


def test_fid_during_training_matches_the_offline_pipeline(data, tmp_path, capsys):
    """train.py --fid-every scores the EMA exactly as sample.py --npz followed by fid.py would."""
    weights, ref = _fid_weights_file(), tmp_path / "ref.npz"
    np.savez(ref, arr_0=_fid_images(6, seed=5, size=8))
    run_script("train.py", "--data-path", data, "--results-dir", tmp_path, *TRAIN, "--max-steps", 2,
               "--fid-every", 2, "--fid-samples", 5, "--fid-ref", ref, "--inception", weights)
    logged = [line for line in open(tmp_path / "log.txt") if "FID-5" in line]
    assert len(logged) == 1
    run_script("sample.py", "--ckpt", tmp_path / "checkpoints" / "0000002.pt", "--npz", tmp_path / "s.npz",
               "--num-samples", 5)
    capsys.readouterr()
    run_script("fid.py", tmp_path / "s.npz", ref, "--inception", weights, "--metrics", "fid")
    offline = float(capsys.readouterr().out.strip().splitlines()[-1].split()[1])
    assert float(logged[0].split("FID-5")[1].split()[0]) == pytest.approx(offline, rel=1e-3)
    cli_error("train.py", "--data-path", data, *TRAIN, "--fid-every", 2, match="needs --fid-ref")


#################################################################################
#                            vae.py: the autoencoder                            #
#################################################################################

def tiny_vae(seed=0):
    torch.manual_seed(seed)
    return vae.AutoencoderKL(block_out_channels=(32, 32), layers_per_block=1, latent_channels=4).eval()


@torch.no_grad()
def test_vae_matches_reference_vectors_with_both_key_namings():
    ref = torch.load(os.path.join(HERE, "fixtures", "vae.pt"), weights_only=True)
    with torch.device("meta"):  # skip the default init of 84M parameters; the weights come from fill()
        model, model_old = vae.AutoencoderKL().eval(), vae.AutoencoderKL().eval()
    assert [(k, list(v.shape)) for k, v in model.state_dict().items()] == [(k, list(s)) for k, s in ref["keys"]]
    weights = fill(ref["keys"], ref["seed"])
    model.load_state_dict(weights, assign=True)
    torch.testing.assert_close(model.decode(ref["z"]), ref["decoded"], atol=1e-4, rtol=1e-4)
    for x, mean, logvar in [("x", "mean", "logvar"), ("x2", "mean2", "logvar2")]:
        m, lv = model.encode(ref[x])
        torch.testing.assert_close(m, ref[mean], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(lv, ref[logvar], atol=1e-4, rtol=1e-4)

    # The same weights under the older names (query/key/value/proj_attn), also with 1x1-conv attention kernels.
    old = {old_key: weights[key] for (key, _), (old_key, _) in zip(ref["keys"], ref["old_style_keys"])}
    assert any(".query." in k for k in old) and not any(".to_q." in k for k in old)
    model_old.load_state_dict(old, assign=True)
    torch.testing.assert_close(model_old.encode(ref["x2"])[0], ref["mean2"], atol=1e-4, rtol=1e-4)
    old_conv = {k: v[:, :, None, None] if v.dim() == 2 else v for k, v in old.items()}
    model_old.load_state_dict(old_conv)
    assert all(torch.equal(a, b) for a, b in zip(model_old.state_dict().values(), model.state_dict().values()))


@torch.no_grad()
def test_vae_logvar_is_clamped():
    model = tiny_vae()
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    for shift, bound in ((1e4, 20.0), (-1e4, -30.0)):
        model.quant_conv.bias.data[4:] += shift
        assert torch.all(model.encode(x)[1] == bound)
        model.quant_conv.bias.data[4:] -= shift


def write_safetensors(path, state_dict, dtype):
    """A .safetensors file written by hand from the format's spec (header length, JSON header, raw data)."""
    names = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
    header, chunks, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for k, v in state_dict.items():
        raw = v.to(dtype).contiguous().view(torch.uint8).numpy().tobytes()
        header[k] = {"dtype": names[dtype], "shape": list(v.shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(chunks))


@torch.no_grad()
def test_load_vae_reads_safetensors_bin_and_wrapped_pth(tmp_path):
    model = tiny_vae()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    expected = model.encode(x)[0]
    sd = model.state_dict()
    old = {k.replace("to_q", "query").replace("to_k", "key").replace("to_v", "value").replace("to_out.0", "proj_attn"): v
           for k, v in sd.items()}
    torch.save(sd, tmp_path / "diffusion_pytorch_model.bin")
    torch.save({"state_dict": {"module." + k: v for k, v in old.items()}}, tmp_path / "wrapped.pth")
    torch.save({"vae." + k: v for k, v in old.items()}, tmp_path / "prefixed.pth")
    write_safetensors(tmp_path / "f32.safetensors", sd, torch.float32)
    for name in ("diffusion_pytorch_model.bin", "wrapped.pth", "prefixed.pth", "f32.safetensors"):
        loaded = vae.load_vae(str(tmp_path / name))
        assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
        assert torch.equal(loaded.encode(x)[0], expected), name
    for dtype in (torch.float16, torch.bfloat16):
        write_safetensors(tmp_path / "half.safetensors", sd, dtype)
        loaded = vae.load_vae(str(tmp_path / "half.safetensors")).state_dict()
        assert all(torch.equal(loaded[k], v.to(dtype).float()) for k, v in sd.items())


def test_load_vae_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="huggingface.co/stabilityai/sd-vae-ft-mse"):
        vae.load_vae(str(tmp_path / "nope.pth"))
    torch.save({"net.weight": torch.zeros(3), **{k: v for k, v in tiny_vae().state_dict().items()
                                                 if not k.startswith("decoder.")}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"missing keys \[decoder\.conv_in\.weight.*more\).*unexpected keys \[net\.weight\]"):
        vae.load_vae(str(tmp_path / "other.pth"))
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError):
        vae.load_vae(str(tmp_path / "junk.safetensors"))


def test_load_vae_rejects_random_bytes_and_pickles_in_one_line(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"encoder.conv_in.weight": Exploit(str(marker))}, tmp_path / "evil.pth")
    (tmp_path / "random.pth").write_bytes(np.random.default_rng(0).bytes(256))
    (tmp_path / "random.safetensors").write_bytes(np.random.default_rng(1).bytes(256))
    for name in ("evil.pth", "random.pth", "random.safetensors"):
        with pytest.raises(ValueError) as e:
            vae.load_vae(str(tmp_path / name))
        message = str(e.value)
        assert "\n" not in message and message.startswith(f"{tmp_path / name}: cannot read VAE weights") and \
            "https://huggingface.co/stabilityai/sd-vae-ft-mse" in message, message
    assert not marker.exists()
    assert cli_error("prepare_latents.py", "--benchmark", "--vae-weights", tmp_path / "evil.pth").startswith(
        f"error: {tmp_path / 'evil.pth'}: cannot read VAE weights (corrupt, or a pickle that would run code); get ")


#################################################################################
#                     prepare_latents.py: images to latents                     #
#################################################################################

def make_image_folder(root):
    """Three classes covering the odd cases; returns the expected (relative path, label) of the good images."""
    rng = np.random.default_rng(0)
    rgb = lambda w, h: Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    for c in ("ant", "bee", "cow"):
        os.makedirs(root / c)
    os.makedirs(root / "cow" / "more")
    rgb(300, 200).save(root / "ant" / "b.JPG")
    rgb(1200, 900).save(root / "ant" / "a_large.png")
    rgb(10, 7).save(root / "ant" / "c_tiny.png")
    Image.fromarray(rng.integers(0, 256, (80, 90), dtype=np.uint8), "L").save(root / "bee" / "gray.png")
    rgb(70, 64).convert("CMYK").save(root / "bee" / "cmyk.jpg")
    rgb(64, 70).convert("P").save(root / "bee" / "palette.png")
    rgba = np.concatenate([np.full((50, 60, 3), (255, 0, 0), np.uint8), np.zeros((50, 60, 1), np.uint8)], 2)
    rgba[:, :20, 3] = 255  # left third opaque red, the rest fully transparent red
    Image.fromarray(rgba, "RGBA").save(root / "cow" / "alpha.png")
    (root / "bee" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")  # mid-list: labels shift if mishandled
    (root / "cow" / "notes.txt").write_text("not an image, ignored")
    rgb(40, 40).save(root / "cow" / "more" / "nested.webp", lossless=True)
    return [("ant/a_large.png", 0), ("ant/b.JPG", 0), ("ant/c_tiny.png", 0), ("bee/cmyk.jpg", 1),
            ("bee/gray.png", 1), ("bee/palette.png", 1), ("cow/alpha.png", 2), ("cow/more/nested.webp", 2)]


def reference_crop(path, size):
    """ADM's centre crop, written out again independently, after the RGB conversion the script documents."""
    img = Image.open(path)
    if img.mode == "RGBA":
        img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img)
    img = img.convert("RGB")
    while min(img.size) >= 2 * size:
        img = img.resize((img.width // 2, img.height // 2), Image.BOX)
    s = size / min(img.size)
    img = img.resize((round(img.width * s), round(img.height * s)), Image.BICUBIC)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)))


def test_prepare_latents_pixels_crop_flip_labels_and_skips(tmp_path):
    expected = make_image_folder(tmp_path / "images")
    run_script("prepare_latents.py", "--data-path", tmp_path / "images", "--out", tmp_path / "out", "--vae", "none",
                "--image-size", 32, "--batch-size", 3, "--num-workers", 2)
    out = tmp_path / "out"
    info = json.loads((out / "info.json").read_text())
    assert info["classes"] == ["ant", "bee", "cow"] and info["num_classes"] == 3 and info["image_size"] == 32
    assert info["num_images"] == len(expected) and info["vae"] == "none" and info["scale"] == 1.0
    assert not (out / "std.npy").exists() and not any(f.name.endswith(".partial.npy") or ".tmp" in f.name for f in out.iterdir())
    latents, labels = np.load(out / "latents.npy"), np.load(out / "labels.npy")
    assert latents.dtype == np.float16 and latents.shape == (len(expected), 2, 3, 32, 32)
    assert labels.dtype == np.int64 and labels.tolist() == [label for _, label in expected]
    assert (out / "skipped.txt").read_text().startswith("bee/broken.jpg\t")
    pixels = np.round((latents.astype(np.float32) + 1) * 127.5).astype(np.uint8).transpose(0, 1, 3, 4, 2)
    for i, (path, _) in enumerate(expected):  # every row is the right image, in order, with its mirror
        ref = reference_crop(tmp_path / "images" / path, 32)
        assert np.array_equal(pixels[i, 0], ref), path
        assert np.array_equal(pixels[i, 1], ref[:, ::-1]), path
    gray = pixels[[p for p, _ in expected].index("bee/gray.png"), 0]
    assert np.array_equal(gray[..., 0], gray[..., 1]) and np.array_equal(gray[..., 0], gray[..., 2])
    alpha = pixels[[p for p, _ in expected].index("cow/alpha.png"), 0]
    assert alpha[16, 0].tolist() == [255, 0, 0] and alpha[16, -1].tolist() == [255, 255, 255]  # transparent -> white
    # train.py trains from this output as it is (pixel space here: in_channels 3, 32 x 32, 3 classes).
    run_script("train.py", "--data-path", out, "--results-dir", tmp_path / "run", *TRAIN, "--max-steps", 1)
    config = torch.load(tmp_path / "run" / "checkpoints" / "0000001.pt", weights_only=True)["config"]["G"]
    assert (config["input_size"], config["in_channels"], config["num_classes"]) == (32, 3, 3)


def test_prepare_latents_vae_one_vs_two_processes_and_resume(tmp_path, capsys):
    make_image_folder(tmp_path / "images")
    torch.save(tiny_vae().state_dict(), tmp_path / "tiny.pth")
    args = lambda out, *more: ["--data-path", str(tmp_path / "images"), "--out", str(tmp_path / out),
                               "--vae-weights", str(tmp_path / "tiny.pth"), "--image-size", "32", "--num-workers", "0",
                               *more]
    run_script("prepare_latents.py", *args("one", "--batch-size", 2))
    names = ["latents.npy", "std.npy", "labels.npy", "info.json", "skipped.txt"]
    one = {n: (tmp_path / "one" / n).read_bytes() for n in names}

    # The values: mean and std of the tiny VAE's posterior, times the scale, for both views.
    latents, std = np.load(tmp_path / "one" / "latents.npy"), np.load(tmp_path / "one" / "std.npy")
    assert latents.shape == std.shape == (8, 2, 4, 16, 16) and json.loads(one["info.json"])["scale"] == vae.SCALE
    x = torch.tensor(reference_crop(tmp_path / "images" / "bee" / "gray.png", 32)).permute(2, 0, 1)[None]
    x = x.float() / 127.5 - 1
    with torch.no_grad():
        mean, logvar = tiny_vae().encode(torch.cat([x, x.flip(3)]))
    np.testing.assert_allclose(latents[4], (mean * vae.SCALE).numpy(), rtol=2e-3, atol=1e-4)
    np.testing.assert_allclose(std[4], (torch.exp(0.5 * logvar) * vae.SCALE).numpy(), rtol=2e-3, atol=1e-4)

    # Two processes (gloo). Each stops after its first chunk: rank 0 owns chunks 0-1, rank 1 chunks 2-4 (of 5).
    run = torchrun("prepare_latents.py", *args("two", "--batch-size", "2", "--stop-after-chunks", "1"))
    assert run.returncode == 1 and run.stderr.count("stopped after 1 chunks (--stop-after-chunks)") == 2, run.stderr
    assert np.load(tmp_path / "two" / "status.partial.npy").nonzero()[0].tolist() == [0, 1, 4, 5]
    run = torchrun("prepare_latents.py", *args("two", "--batch-size", "2"))
    assert run.returncode == 0, run.stderr                     # resumed: the same bytes as one process
    assert {n: (tmp_path / "two" / n).read_bytes() for n in names} == one

    # Interrupted after 2 of 5 chunks, then resumed (with another --batch-size, which must not change the chunks).
    with pytest.raises(SystemExit, match="stopped after 2 chunks"):
        run_script("prepare_latents.py", *args("resumed", "--batch-size", 2, "--stop-after-chunks", 2))
    status = np.load(tmp_path / "resumed" / "status.partial.npy")
    assert (status[:4] > 0).all() and (status[4:] == 0).all() and not (tmp_path / "resumed" / "info.json").exists()
    assert "different unfinished run (differs in image_size" in cli_error("prepare_latents.py", *args("resumed", "--image-size", 64))
    capsys.readouterr()
    run_script("prepare_latents.py", *args("resumed", "--batch-size", 3))
    assert "this run read 5 images" in capsys.readouterr().out  # only chunks 2-4 (rows 4-8) were left
    assert {n: (tmp_path / "resumed" / n).read_bytes() for n in names} == one
    assert sorted(os.listdir(tmp_path / "resumed")) == sorted(names)


def write_idx(path, array):
    """An IDX file of uint8 values, as the MNIST family ships them (gzip when the name ends in .gz)."""
    raw = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()
    with (gzip.open if str(path).endswith(".gz") else open)(path, "wb") as f:
        f.write(raw)


def test_prepare_latents_small_image_files(tmp_path):
    """MNIST-family IDX files (gzip or not) and ADM-style npz files, at their own size, padded or resized."""
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (7, 6, 6), dtype=np.uint8), np.array([3, 0, 1, 3, 2, 0, 1])
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels)
    run_script("prepare_latents.py", "--data-path", tmp_path / "train-images-idx3-ubyte.gz", "--out", tmp_path / "own", "--vae", "none",
                "--num-workers", 0, "--batch-size", 3)
    latents = np.load(tmp_path / "own" / "latents.npy")
    assert latents.shape == (7, 2, 1, 6, 6) and np.load(tmp_path / "own" / "labels.npy").tolist() == labels.tolist()
    pixels = np.round((latents.astype(np.float32) + 1) * 127.5)
    assert np.array_equal(pixels[:, 0, 0], images) and np.array_equal(pixels[:, 1, 0], images[:, :, ::-1])
    info = json.loads((tmp_path / "own" / "info.json").read_text())
    assert info["num_classes"] == 4 and info["image_size"] == 6 and info["shape"] == [2, 1, 6, 6]
    # Padded to 10 (zeros, i.e. -1, around the centred image), uncompressed IDX gives the same.
    write_idx(tmp_path / "raw-images-idx3-ubyte", images)
    write_idx(tmp_path / "raw-labels-idx1-ubyte", labels)
    run_script("prepare_latents.py", "--data-path", tmp_path / "raw-images-idx3-ubyte", "--out", tmp_path / "pad", "--vae", "none",
                "--image-size", 10, "--num-workers", 0)
    padded = np.load(tmp_path / "pad" / "latents.npy")[:, 0, 0]
    assert padded.shape == (7, 10, 10) and np.array_equal(padded[:, 2:8, 2:8], latents[:, 0, 0])
    assert (padded[:, :2] == -1).all() and (padded[:, :, 8:] == -1).all()
    # An npz of RGB images with labels, resized down as ADM crops (3 channels kept).
    rgb = rng.integers(0, 256, (5, 12, 12, 3), dtype=np.uint8)
    np.savez(tmp_path / "rgb.npz", arr_0=rgb, labels=np.arange(5))
    run_script("prepare_latents.py", "--data-path", tmp_path / "rgb.npz", "--out", tmp_path / "npz", "--vae", "none", "--image-size", 6,
                "--num-workers", 0)
    small = np.round((np.load(tmp_path / "npz" / "latents.npy")[:, 0].astype(np.float32) + 1) * 127.5)
    expect = [prepare_latents.center_crop_arr(Image.fromarray(im), 6) for im in rgb]
    assert small.shape == (5, 3, 6, 6) and np.array_equal(small.transpose(0, 2, 3, 1), np.stack(expect))
    # train.py trains on one channel at its own size.
    run_script("train.py", "--data-path", tmp_path / "own", "--results-dir", tmp_path / "run", "--model", "T/2",
               "--device", "cpu", "--global-batch-size", 4, "--max-steps", 1)
    config = torch.load(tmp_path / "run" / "checkpoints" / "0000001.pt", weights_only=True)["config"]["G"]
    assert (config["input_size"], config["in_channels"], config["num_classes"]) == (6, 1, 4)
    # Bad small-image files: one line each.
    write_idx(tmp_path / "lonely-images-idx3-ubyte", images)
    assert "no labels for" in cli_error("prepare_latents.py", "--data-path", tmp_path / "lonely-images-idx3-ubyte", "--out", tmp_path / "x",
                                       "--vae", "none")
    (tmp_path / "bad-images-idx3-ubyte").write_bytes(b"\0\0\x08\x03" + b"\0" * 5)
    write_idx(tmp_path / "bad-labels-idx1-ubyte", labels)
    assert "not an IDX file" in cli_error("prepare_latents.py", "--data-path", tmp_path / "bad-images-idx3-ubyte", "--out", tmp_path / "x",
                                         "--vae", "none")
    np.savez(tmp_path / "nolabels.npz", arr_0=rgb)
    assert "labels" in cli_error("prepare_latents.py", "--data-path", tmp_path / "nolabels.npz", "--out", tmp_path / "x", "--vae", "none")


def test_prepare_latents_already_done_and_bad_inputs(tmp_path, capsys):
    make_image_folder(tmp_path / "images")
    base = ["--data-path", tmp_path / "images", "--out", tmp_path / "out", "--image-size", 32, "--num-workers", 0]
    run_script("prepare_latents.py", *base, "--vae", "none")
    run_script("prepare_latents.py", *base, "--vae", "none")
    assert "already done: 8 images" in capsys.readouterr().out
    assert "different finished run" in cli_error("prepare_latents.py", *base, "--vae", "none", "--image-size", 64)
    os.remove(tmp_path / "images" / "bee" / "broken.jpg")  # all good: staging arrays are renamed, not compacted
    run_script("prepare_latents.py", *base[:2], "--out", tmp_path / "clean", *base[4:], "--vae", "none")
    for name in ("latents.npy", "labels.npy"):
        assert (tmp_path / "clean" / name).read_bytes() == (tmp_path / "out" / name).read_bytes()
    assert (tmp_path / "clean" / "skipped.txt").read_text() == ""
    assert "--vae-weights" in cli_error("prepare_latents.py", *base)
    assert "VAE weights not found" in cli_error("prepare_latents.py", *base, "--vae-weights", tmp_path / "missing.pth")
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "classifier.pth")
    assert "unexpected keys [fc.weight]" in cli_error("prepare_latents.py", *base, "--vae-weights", tmp_path / "classifier.pth")
    os.makedirs(tmp_path / "empty")
    assert "no images" in cli_error("prepare_latents.py", "--data-path", tmp_path / "empty", "--out", tmp_path / "o2", "--vae", "none")
    os.makedirs(tmp_path / "flat")
    Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "x.png")  # images but no class folders
    assert "no images" in cli_error("prepare_latents.py", "--data-path", tmp_path / "flat", "--out", tmp_path / "o3", "--vae", "none")
    os.makedirs(tmp_path / "images" / "dog")  # a class folder with nothing in it
    assert "without images" in cli_error("prepare_latents.py", *base[:2], "--out", tmp_path / "o4", "--vae", "none")

    # From the shell: one line on stderr, no traceback, non-zero exit.
    result = subprocess.run([sys.executable, os.path.join(HERE, "prepare_latents.py"), "--data-path", str(tmp_path / "x"),
                             "--out", str(tmp_path / "o5"), "--vae-weights", str(tmp_path / "missing.pth")],
                            capture_output=True, text=True, cwd=HERE)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("error: VAE weights not found") and len(result.stderr.strip().splitlines()) == 1


def out_files(path):
    return sorted(os.listdir(path)) if os.path.isdir(path) else None


def test_prepare_latents_full_disk_is_one_line_and_leaves_no_partial_file(tmp_path, monkeypatch):
    make_image_folder(tmp_path / "images")  # one broken image: the staging arrays are compacted at the end
    argv = lambda out: ["--data-path", tmp_path / "images", "--out", tmp_path / out, "--vae", "none",
                        "--image-size", 8, "--num-workers", 0]
    run_script("prepare_latents.py", *argv("clean"))
    out, room = tmp_path / "full", [0]

    def no_space(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def fallocate(fd, offset, length):  # finds room for room[0] more files
        room[0] -= 1
        if room[0] < 0:
            no_space()

    # Creating the staging arrays (latents, then status): nothing is left behind, not even run.json or the folder.
    monkeypatch.setattr(os, "posix_fallocate", fallocate, raising=False)
    room[0] = 1
    assert cli_error("prepare_latents.py", *argv("full")) == f"error: cannot write {out}/status.partial.npy: No space left on device"
    assert out_files(out) is None
    # Compacting the staging arrays to the good rows: no temporary file is left, the run stays resumable.
    room[0] = 2
    assert cli_error("prepare_latents.py", *argv("full")) == f"error: cannot write {out}/latents.npy: No space left on device"
    assert out_files(out) == ["latents.partial.npy", "run.json", "skipped.txt", "status.partial.npy"]
    # A plain write (labels.npy, through np.save).
    monkeypatch.undo()
    monkeypatch.setattr(np, "save", no_space)
    assert cli_error("prepare_latents.py", *argv("full")) == f"error: cannot write {out}/labels.npy: No space left on device"
    assert not any(".tmp" in name for name in os.listdir(out)) and not (out / "info.json").exists()
    monkeypatch.undo()
    run_script("prepare_latents.py", *argv("full"))  # room again: the same command finishes the run, as if nothing had happened
    names = ["latents.npy", "labels.npy", "info.json", "skipped.txt"]
    assert out_files(out) == sorted(names)
    assert all((out / n).read_bytes() == (tmp_path / "clean" / n).read_bytes() for n in names)


def test_prepare_latents_bad_flags_create_nothing(tmp_path, capsys):
    make_image_folder(tmp_path / "images")
    base = ["--data-path", tmp_path / "images", "--out", tmp_path / "out", "--vae", "none", "--num-workers", 0]
    bad = [("--batch-size", 0), ("--batch-size", -2), ("--image-size", 0), ("--image-size", -8),
           ("--num-workers", -1), ("--device", "gpu")] + ([] if torch.cuda.is_available() else [("--device", "cuda")])
    for flag, value in bad:
        with pytest.raises(SystemExit) as e:
            run_script("prepare_latents.py", *base, flag, value)
        assert e.value.code == 2 and not (tmp_path / "out").exists(), (flag, value)
        err = capsys.readouterr().err
        assert f"error: argument {flag}" in err or f"error: {flag}" in err, err
    assert 1 <= prepare_latents.parse_args(["--benchmark"]).num_workers <= min(8, os.cpu_count())
    (tmp_path / "file").write_text("")
    assert cli_error("prepare_latents.py", *base[:2], "--out", tmp_path / "file", "--vae", "none") == \
        f"error: --out {tmp_path / 'file'} is a file, not a folder"


def test_prepare_latents_damaged_records_are_one_line(tmp_path):
    np.savez(tmp_path / "x.npz", arr_0=np.zeros((4, 8, 8), np.uint8), labels=np.arange(4))
    argv = ["--data-path", tmp_path / "x.npz", "--out", tmp_path / "out", "--vae", "none", "--num-workers", 0]
    run_script("prepare_latents.py", *argv)
    for text in ("{\"num_classes\": 4, ", "[1, 2]", "\xff\xfe"):
        (tmp_path / "out" / "info.json").write_bytes(text.encode("latin-1"))
        assert cli_error("prepare_latents.py", *argv) == f"error: {tmp_path}/out/info.json is damaged: delete it to start this run over, " \
                                  "or use another --out"
    os.remove(tmp_path / "out" / "info.json")
    run_script("prepare_latents.py", *argv)  # as the message says
    # An unfinished run: run.json damaged, or written by a version that recorded --batch-size 0.
    with pytest.raises(SystemExit, match="stopped after 1 chunks"):
        run_script("prepare_latents.py", *argv[:2], "--out", tmp_path / "part", *argv[4:], "--batch-size", 1, "--stop-after-chunks", 1)
    run = json.loads((tmp_path / "part" / "run.json").read_text())
    for text in ("not json", json.dumps(dict(run, chunk_size=0))):
        (tmp_path / "part" / "run.json").write_text(text)
        assert "part/run.json is damaged: delete it to start this run over" in \
            cli_error("prepare_latents.py", *argv[:2], "--out", tmp_path / "part", *argv[4:])
    (tmp_path / "part" / "run.json").write_text(json.dumps(run))
    os.remove(tmp_path / "part" / "latents.partial.npy")  # a staging array deleted by hand
    assert "delete" in cli_error("prepare_latents.py", *argv[:2], "--out", tmp_path / "part", *argv[4:])


def test_prepare_latents_follows_each_directory_link_once(tmp_path, capsys):
    """Links into the class folder itself, above it, and to a sibling folder: each real folder once, right labels."""
    colours = iter(range(10, 250, 10))
    image = lambda path: Image.new("RGB", (8, 8), (next(colours),) * 3).save(path)
    for folder in ("ant/sub", "bee/more"):
        os.makedirs(tmp_path / "images" / folder)
    expected = ["ant/1.png", "ant/2.png", "ant/sub/3.png", "bee/4.png", "bee/again/5.png"]
    for name in expected:
        image(tmp_path / "images" / name.replace("again", "more"))
    os.symlink(".", tmp_path / "images" / "ant" / "self")
    os.symlink("..", tmp_path / "images" / "ant" / "sub" / "parent")
    os.symlink("..", tmp_path / "images" / "ant" / "root")  # the data folder: the other classes' images
    os.symlink("../../..", tmp_path / "images" / "bee" / "more" / "above")  # above the data folder
    os.symlink("more", tmp_path / "images" / "bee" / "again")  # listed first, so its path is the one kept
    classes, files, labels = prepare_latents.list_images(str(tmp_path / "images"))
    assert (classes, files, labels) == (["ant", "bee"], expected, [0, 0, 0, 1, 1])
    run_script("prepare_latents.py", "--data-path", tmp_path / "images", "--out", tmp_path / "out", "--vae", "none", "--num-workers", 0,
                "--image-size", 8)
    summary = capsys.readouterr().out
    assert "done: 5 images written" in summary and "of 5 listed" in summary
    pixels = np.load(tmp_path / "out" / "latents.npy")[:, 0, 0, 0, 0]
    assert np.round((pixels.astype(np.float32) + 1) * 127.5).tolist() == [10, 20, 30, 40, 50]
    assert np.load(tmp_path / "out" / "labels.npy").tolist() == [0, 0, 0, 1, 1]


def test_prepare_latents_nothing_decodable_is_an_error(tmp_path):
    for name in ("a/x.png", "a/y.jpg", "b/z.png"):
        os.makedirs(tmp_path / "images" / os.path.dirname(name), exist_ok=True)
        (tmp_path / "images" / name).write_bytes(b"not an image")
    argv = ["--data-path", tmp_path / "images", "--out", tmp_path / "out", "--vae", "none", "--num-workers", 0,
            "--image-size", 8]
    message = cli_error("prepare_latents.py", *argv)
    assert message.startswith("error: none of the 3 images could be decoded (the first, a/x.png: ") and \
        message.endswith(f"all reasons in {tmp_path}/out/skipped.txt)")
    assert out_files(tmp_path / "out") == ["skipped.txt"]  # and the next run starts over
    assert len((tmp_path / "out" / "skipped.txt").read_text().splitlines()) == 3
    for name in ("a/x.png", "a/y.jpg", "b/z.png"):  # fixed: the same command starts over and decodes them
        Image.new("RGB", (8, 8)).save(tmp_path / "images" / name)
    run_script("prepare_latents.py", *argv)
    assert np.load(tmp_path / "out" / "labels.npy").tolist() == [0, 0, 1]


def test_prepare_latents_bad_small_image_files(tmp_path):
    images, labels = np.zeros((3, 4, 4), np.uint8), np.arange(3)
    cases = {"empty.npz": dict(arr_0=np.zeros((3, 0, 0), np.uint8), labels=labels),
             "float.npz": dict(arr_0=images, labels=labels.astype(np.float32)),
             "str.npz": dict(arr_0=images, labels=np.array(["a", "b", "c"])),
             "huge.npz": dict(arr_0=images, labels=np.array([0, 1, 10 ** 6])),
             "object.npz": dict(arr_0=images, labels=np.array([0, None, 2], dtype=object))}
    for name, arrays in cases.items():
        np.savez(tmp_path / name, **arrays)
    write_idx(tmp_path / "n-images-idx3-ubyte", images)
    write_idx(tmp_path / "n-labels-idx1-ubyte", np.arange(2))  # one label short
    (tmp_path / "random.npz").write_bytes(np.random.default_rng(0).bytes(64))
    (tmp_path / "random.bin").write_bytes(np.random.default_rng(1).bytes(64))
    raw = gzip.compress(bytes([0, 0, 8, 3]) + struct.pack(">3I", 3, 4, 4) + bytes(48))
    (tmp_path / "g-images-idx3-ubyte.gz").write_bytes(raw[:12] + bytes(b ^ 0x5A for b in raw[12:]))
    write_idx(tmp_path / "g-labels-idx1-ubyte.gz", labels)
    for name, match in [("empty.npz", "images must be uint8"), ("float.npz", "non-negative integers, got float32"),
                        ("str.npz", "non-negative integers, got <U1"), ("huge.npz", "class indices 0..K-1"),
                        ("object.npz", "cannot read"), ("n-images-idx3-ubyte", "labels must be 3 non-negative"),
                        ("random.npz", "is not an npz file"), ("random.bin", "is neither a folder, an npz nor"),
                        ("g-images-idx3-ubyte.gz", "cannot read"), ("missing.npz", "does not exist")]:
        assert match in cli_error("prepare_latents.py", "--data-path", tmp_path / name, "--out", tmp_path / "out", "--vae", "none"), name
    assert not (tmp_path / "out").exists()


def test_prepare_latents_interrupted_by_signals_then_resumed(tmp_path):
    """SIGTERM (a preemption) and then Ctrl-C, each after the first chunk is on disk: exit 130, one line, no traceback;
    the same command then finishes with the bytes of an uninterrupted run."""
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (200, 4, 4), dtype=np.uint8), rng.integers(0, 3, 200)
    np.savez(tmp_path / "x.npz", arr_0=images, labels=labels)
    argv = ["--data-path", str(tmp_path / "x.npz"), "--out", str(tmp_path / "out"), "--vae", "none",
            "--num-workers", "0", "--batch-size", "1"]
    status = tmp_path / "out" / "status.partial.npy"
    for sig in (signal.SIGTERM, signal.SIGINT):
        done, deadline = np.count_nonzero(np.load(status)) if status.exists() else 0, time.time() + 60
        proc = subprocess.Popen([sys.executable, "prepare_latents.py", *argv], cwd=HERE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        while proc.poll() is None and time.time() < deadline and not (
                status.exists() and np.count_nonzero(np.load(status)) > done):
            time.sleep(0.005)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        lines = [line for line in re.split(r"[\r\n]+", err) if line.strip() and "|" not in line]  # not tqdm's bar
        assert proc.returncode == 130 and lines == ["interrupted: run the same command again to resume"], err
        assert 0 < np.count_nonzero(np.load(status)) < 200 and not (tmp_path / "out" / "info.json").exists()
    run_script("prepare_latents.py", *argv)
    run_script("prepare_latents.py", *argv[:2], "--out", tmp_path / "ref", *argv[4:-1], 200)
    names = ["latents.npy", "labels.npy", "info.json", "skipped.txt"]
    assert out_files(tmp_path / "out") == sorted(names)
    assert all((tmp_path / "out" / n).read_bytes() == (tmp_path / "ref" / n).read_bytes() for n in names)


#################################################################################
#                          toy.py: the 1-D quick start                          #
#################################################################################

def test_toy_trains_and_writes_outputs(tmp_path):
    for nfe in (1, 2):                                        # one-step and velocity (D conditioned on t) paths
        out = tmp_path / f"nfe{nfe}"
        results, maps = toy.main(nfe=nfe, steps=3, seed=0, out_dir=str(out))
        assert set(results) == {"afm", "twinflow", "gan", "fm"}
        for r in results.values():
            assert r["stats"] and all(math.isfinite(v) for v in r["stats"].values())
            assert all(math.isfinite(r[k]) and r[k] >= 0 for k in ("w1", "map_err", "seed_shift"))
        assert results["gan"]["stats"]["ot"] == 0.0 and results["afm"]["stats"]["ot"] > 0.0  # GAN: lambda_ot = 0
        with np.load(out / "toy.npz") as f:
            assert {"z", "afm", "twinflow", "gan", "fm"} <= set(f.files)
            assert f["z"].ndim == 1 and len(f["z"]) > 100 and np.all(np.diff(f["z"]) > 0)
            for name in ("afm", "twinflow", "gan", "fm"):
                assert f[name].shape == f["z"].shape and np.all(np.isfinite(f[name]))
                np.testing.assert_array_equal(f[name], maps[name])
        with Image.open(out / "toy.png") as im:
            assert im.format == "PNG" and im.size == (4 * toy.PANEL_W, toy.PANEL_H)
            im.load()
        assert sorted(p.name for p in out.iterdir()) == ["toy.npz", "toy.png"]   # no temp files left behind


def test_toy_bad_flags(tmp_path):
    (tmp_path / "file").write_text("")
    cli_error("toy.py", "--out-dir", tmp_path / "file", match="is a file, not a folder")
    with pytest.raises(SystemExit) as e:
        run_script("toy.py", "--steps", "0")
    assert e.value.code == 2


def test_toy_training_is_deterministic():
    G1, s1 = toy.train_adversarial(nfe=1, steps=3, seed=5)
    G2, s2 = toy.train_adversarial(nfe=1, steps=3, seed=5)
    G3, _ = toy.train_adversarial(nfe=1, steps=3, seed=6)
    assert s1 == s2
    assert all(torch.equal(a, b) for a, b in zip(G1.state_dict().values(), G2.state_dict().values()))
    assert not all(torch.equal(a, b) for a, b in zip(G1.state_dict().values(), G3.state_dict().values()))


def test_toy_trajectory_ends_where_model_sample_does():
    torch.manual_seed(0)
    z = torch.linspace(-3, 3, 50)
    for nfe in (1, 2, 4):
        G = toy.ToyGenerator(use_t=nfe > 1)
        path = toy.trajectory(G, z.numpy(), nfe)
        assert path.shape == (nfe + 1, 50)
        np.testing.assert_allclose(path[0], z.numpy(), atol=1e-6)
        expected = model.sample(G, z.view(-1, 1), torch.zeros(50, dtype=torch.long), nfe).view(-1).numpy()
        np.testing.assert_allclose(path[-1], expected, atol=1e-5)


def test_toy_exact_ot_map():
    z = np.linspace(-4, 4, 801)
    T = toy.ot_map(z)
    assert np.all(np.diff(T) >= 0)                            # monotone
    np.testing.assert_allclose(T, -T[::-1], atol=1e-9)        # odd, like the data
    assert abs(toy.ot_map(0.0)) < 1e-9
    # Inside the top mode the map is 1.5 + sigma Phi^-1(4 Phi(z) - 3) (the other modes' mass there is < 1e-20);
    # inside the second from the top 0.5 + sigma Phi^-1(4 Phi(z) - 2).
    for zs, mu, k in (([1.0, 2.0, 3.0], 1.5, 3), ([0.2, 0.5], 0.5, 2), ([-0.2, -0.5], -0.5, 1)):
        np.testing.assert_allclose(toy.ot_map(zs), mu + toy.SIGMA * ndtri(4 * ndtr(zs) - k), atol=1e-7)
    assert 1.6 < toy.ot_map(3.0) < 1.65 and 1.7 < toy.ot_map(6.0) < 1.8   # far tail: still in the top mode
    # Prior quantiles go to mixture quantiles: a quarter of the prior's mass to each mode.
    for q, lo, hi in ((0.125, -1.51, -1.49), (0.375, -0.51, -0.49), (0.875, 1.49, 1.51)):
        assert lo < toy.ot_map(ndtri(q)) < hi
    np.testing.assert_allclose(toy.mixture_quantile([0.125, 0.875]), [-1.5, 1.5], atol=1e-7)


def test_toy_wasserstein1_and_prior_weighting():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(100_000), rng.standard_normal(100_000)
    assert toy.wasserstein1(a, b) < 0.02
    assert abs(toy.wasserstein1(a, a + 0.3) - 0.3) < 1e-9
    assert abs(toy.wasserstein1(a, b + 0.3) - 0.3) < 0.02
    # N(0, 1) against N(0, 4): the sorted coupling moves E|Z| = sqrt(2/pi); an unsorted one would move ~1.78.
    assert abs(toy.wasserstein1(a, 2 * b) - math.sqrt(2 / math.pi)) < 0.02
    x = toy.sample_data(20_000).numpy().ravel()
    assert toy.w1_to_data(x) < 0.03
    assert abs(toy.w1_to_data(x + 0.2) - 0.2) < 0.03
    assert abs(toy.w1_to_data(np.zeros(20_000)) - 1.0) < 0.01      # everything at 0: each point moves ~1 on average
    z = np.linspace(-4, 4, 801)
    assert abs(toy.prior_mean_abs(z, np.zeros_like(z), z) - math.sqrt(2 / math.pi)) < 1e-3


def test_toy_twinflow_trains_and_samples_any_step():
    G1, s1 = toy.train_twinflow(nfe=1, steps=3, seed=5)
    G2, s2 = toy.train_twinflow(nfe=1, steps=3, seed=5)
    assert s1 == s2 and set(s1) == {"base", "real", "fake", "rectify", "base_one_step"}
    assert all(torch.equal(a, b) for a, b in zip(G1.state_dict().values(), G2.state_dict().values()))
    # The network sees both times; n steps are x <- x - (t - t_next) F(x, t, t_next) from z at t = 1.
    z, t = torch.linspace(-2, 2, 9).view(-1, 1), lambda v: torch.full((9, 1), v)
    assert not torch.equal(G1(z, None, t(1.0), t(0.0)), G1(z, None, t(1.0), t(0.5)))
    x = z
    for s, s_next in ((1.0, 0.5), (0.5, 0.0)):
        x = x - (s - s_next) * G1(x, None, t(s), t(s_next))
    np.testing.assert_allclose(toy.trajectory(G1, z.view(-1).numpy(), 2)[-1], x.view(-1).detach().numpy(), atol=1e-6)


#################################################################################
#             CAFM: the objective, its networks and the SiT format              #
#################################################################################

def cafm_reference():
    """The official CAFM networks of fixtures/cafm.pt, as model.py builds them, with the fixture's weights."""
    ref = torch.load(os.path.join(FIXTURES, "cafm.pt"), weights_only=True)
    shape = {k: v for k, v in ref["config"].items() if k not in ("learn_sigma", "class_dropout_prob")}
    G = model.Generator(**shape, **model.SIT_FLAGS)
    D = model.Discriminator(**model.cafm_discriminator_kwargs(dict(shape, **model.SIT_FLAGS)))
    G.load_state_dict(dict(fill(ref["gen_keys"], ref["gen_seed"]), pos_embed=ref["pos_embed"]))
    D.load_state_dict(dict(fill(ref["dis_keys"], ref["dis_seed"]), pos_embed=ref["pos_embed"]))
    x, z, t, y = (ref["inputs"][k] for k in "xzty")
    return ref, G, D, loss.interpolate(x, z, t), z - x, y, t


def assert_grads_equal(net, want):
    got = {k: p.grad for k, p in net.named_parameters() if p.grad is not None}
    assert set(got) == set(want)
    for k in want:
        assert torch.allclose(got[k], want[k], rtol=1e-4, atol=1e-5 * want[k].abs().max()), k


def test_cafm_losses_and_gradients_equal_the_official_training_step():
    """D's step and G's step of the official training_step (SiT networks, fill weights, cp 0.001, ot 0.05) on the same
    inputs: the networks' outputs, both players' losses and every parameter's gradient, and the D/G schedule."""
    ref, G, D, x_t, v_real, y, t = cafm_reference()
    assert torch.allclose(G(x_t, y, t), ref["gen_out"], atol=1e-5)
    assert torch.allclose(D(x_t, y, t), ref["dis_out"], atol=1e-5)
    DJ = loss.FlowDerivative(D)
    with torch.no_grad():
        v_fake = G(x_t, y, t)
    loss_d, stats = loss.cafm_discriminator_loss(DJ, x_t, y, t, v_real, v_fake, ref["cp_scale"])
    loss_d.backward()
    assert torch.allclose(loss_d, ref["d_losses"]["loss/total"], rtol=1e-5)
    assert torch.allclose(stats["loss_cp"], ref["d_losses"]["loss/cp"], rtol=1e-4)
    assert torch.allclose(stats["logits_fake"], ref["d_losses"]["logits/fake"], rtol=1e-5)
    assert_grads_equal(D, ref["d_grads"])
    D.requires_grad_(False)
    loss_g, stats = loss.cafm_generator_loss(DJ, x_t, y, t, G(x_t, y, t), ref["ot_scale"])
    loss_g.backward()
    assert torch.allclose(loss_g, ref["g_losses"]["loss/total"], rtol=1e-5)
    assert torch.allclose(stats["loss_ot"], ref["g_losses"]["loss/ot"], rtol=1e-5)
    assert_grads_equal(G, ref["g_grads"])
    assert [loss.cafm_is_d_step(s, ref["warmup"], ref["N"]) for s in range(40)] == ref["schedule"]


def test_cafm_jvp_is_the_finite_difference_of_D_along_the_flow():
    """J(v) = d/de D(x_t + e v, y, t + e) through our attention (SDPA, whose default CPU kernel has no forward-mode AD),
    one tangent or two stacked, against a central difference in float64."""
    _, _, D, x_t, v_real, y, t = cafm_reference()
    D, x_t, v_real, t = D.double(), x_t.double(), v_real.double(), t.double()
    v_other, ones, e = torch.randn_like(v_real), torch.ones_like(t), 1e-5
    out, J = loss.FlowDerivative(D)(x_t, y, t, v_real, ones)
    with torch.no_grad():
        fd = (D(x_t + e * v_real, y, t + e) - D(x_t - e * v_real, y, t - e)) / (2 * e)
        assert torch.allclose(out, D(x_t, y, t)) and torch.allclose(J, fd, rtol=1e-6, atol=1e-8)
    _, J2 = loss.FlowDerivative(D)(x_t, y, t, torch.stack([v_real, v_other]), torch.stack([ones, 0 * ones]))
    _, J_other = loss.FlowDerivative(D)(x_t, y, t, v_other, 0 * ones)   # along x alone: t held
    assert J2.shape == (2, 3) and torch.allclose(J2[0], J) and torch.allclose(J2[1], J_other)
    assert not torch.allclose(J, J_other)


def test_sit_checkpoint_loads_into_cafm_G_strictly_and_into_D(tmp_path):
    """Our G has exactly SiT-XL/2's key set and shapes (the official class, listed on the meta device); D shares its
    trunk. A file in SiT's format loads through checkpoint.load_sit; a wrong one ends in one line naming the source."""
    ref = torch.load(os.path.join(FIXTURES, "cafm.pt"), weights_only=True)
    xl2 = dict(model.SIZES["XL/2"], input_size=32, in_channels=4, num_classes=1001)
    with torch.device("meta"):
        G = model.Generator(**xl2, **model.SIT_FLAGS)
        D = model.Discriminator(**model.cafm_discriminator_kwargs(dict(xl2, **model.SIT_FLAGS)))
    sit = dict(ref["sit_xl2_keys"])
    assert {k: tuple(v.shape) for k, v in G.state_dict().items()} == sit
    d_keys = {k: tuple(v.shape) for k, v in D.state_dict().items()}
    assert set(d_keys) - set(sit) == {"dis_embed", "final_layer.1.weight"}
    assert set(sit) - set(d_keys) == {k for k in sit if k.startswith("final_layer.")} - {"final_layer.1.weight"}
    assert all(sit[k] == d_keys[k] for k in set(sit) & set(d_keys))
    # A tiny file in SiT's format (T/2, 8 x 8 x 4, 10 classes + null); SiT's own training checkpoints wrap it in "ema".
    _, G_ref, D_ref, x_t, _, y, t = cafm_reference()
    torch.save(dict(ema=G_ref.state_dict(), opt={}), tmp_path / "sit.pt")
    G, kwargs, info = checkpoint.load_sit(str(tmp_path / "sit.pt"), "T/2")
    D = checkpoint.cafm_discriminator(kwargs, G.state_dict())
    assert kwargs["sit"] and kwargs["learn_sigma"] and kwargs["num_classes"] == 11 and info["num_classes"] == 10
    with torch.no_grad():
        assert torch.equal(G(x_t, y, t), G_ref(x_t, y, t))
    for k, v in D.state_dict().items():
        if k in G_ref.state_dict():
            assert torch.equal(v, G_ref.state_dict()[k]), k
    torch.save(dict(G_ref.state_dict(), **{"blocks.0.attn.qkv.weight": torch.zeros(3, 3)}), tmp_path / "bad.pt")
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pt")
    for name, match in (("bad.pt", "check --model T/2"), ("other.pt", "SiT-XL-2-256.pt of https://github.com/")):
        with pytest.raises(SystemExit) as e:
            checkpoint.load_sit(str(tmp_path / name), "T/2")
        err = str(e.value.code)
        assert err.startswith("error:") and "\n" not in err and name in err and match in err, err


CAFM = ["--device", "cpu", "--global-batch-size", 8, "--log-every", 2, "--warmup", 1, "--n-dis", 2, "--lr-g", 1e-3,
        "--lr-d", 1e-3]   # steps 0, 1: D alone; step 2: G; step 3: D


def flow_model(data, path):
    run_script("twinflow.py", "--data-path", data, "--results-dir", path, *TWIN, "--max-steps", 2, "--terms", "real",
               "--cfg-ratio", 0)
    return path / "checkpoints" / "0000002.pt"


def test_cafm_post_trains_a_flow_model_resumes_exactly_and_samples_in_8_steps(data, tmp_path):
    fm = flow_model(data, tmp_path / "fm")
    run_script("cafm.py", "--model", "T/2", "--data-path", data, "--init", fm, "--results-dir", tmp_path / "a", *CAFM,
               "--max-steps", 4)
    run_script("cafm.py", "--data-path", data, "--init", fm, "--results-dir", tmp_path / "b", *CAFM, "--max-steps", 2)
    run_script("cafm.py", "--data-path", data, "--results-dir", tmp_path / "b", *CAFM, "--max-steps", 4,
               "--resume", tmp_path / "b" / "checkpoints" / "0000002.pt")
    a, b = (torch.load(tmp_path / d / "checkpoints" / "0000004.pt", weights_only=True) for d in ("a", "b"))
    for key in ("G", "D", "EMA"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    start = torch.load(fm, weights_only=True)["EMA"]           # G and its EMA start from the flow model's EMA
    assert a["config"]["method"] == "cafm" and a["config"]["D"]["use_t"] and a["config"]["D"]["norm"] == "rms"
    assert not torch.equal(a["G"]["blocks.0.attn.qkv.weight"], start["blocks.0.attn.qkv.weight"])   # one G step
    ema = start["blocks.0.attn.qkv.weight"].lerp(a["G"]["blocks.0.attn.qkv.weight"], 0.01)          # decay 0.99
    assert torch.allclose(a["EMA"]["blocks.0.attn.qkv.weight"], ema, atol=1e-7)
    assert not torch.equal(a["D"]["blocks.0.attn.qkv.weight"], start["blocks.0.attn.qkv.weight"])   # D's trunk: FM's
    log = open(tmp_path / "a" / "log.txt").read()
    assert "D alone to step 1, then 2 D steps per G step" in log and " loss_d " in log and " loss_g " in log
    # sample.py draws the EMA in 8 Euler steps (and Heun's) of its velocity, as model.sample does.
    ckpt = tmp_path / "a" / "checkpoints" / "0000004.pt"
    G = model.Generator(**a["config"]["G"])
    G.load_state_dict(a["EMA"])
    z = torch.from_numpy(np.random.default_rng([0, 1]).standard_normal((1, 3, 8, 8), dtype=np.float32))
    for sampler in ("euler", "heun"):
        run_script("sample.py", "--ckpt", ckpt, "--out", tmp_path / "g.png", "--num-images", 2, "--nrow", 2,
                   "--steps", 8, "--sampler", sampler)
        x = model.sample(G, z, torch.tensor([1]), 8, heun=sampler == "heun")
        expect = model.to_uint8(x)[0].permute(1, 2, 0).numpy().astype(int)
        assert np.abs(np.asarray(Image.open(tmp_path / "g.png"))[2:10, 12:20].astype(int) - expect).max() <= 1
    cli_error("sample.py", "--ckpt", ckpt, "--out", tmp_path / "c.png", "--cfg-scale", 2,
              match="needs a generator with a null class")
    cli_error("cafm.py", "--data-path", data, "--init", ckpt, "--results-dir", tmp_path / "c", *CAFM,
              match="is not a flow-matching checkpoint")
    cli_error("train.py", "--data-path", data, "--results-dir", tmp_path / "d", *TRAIN, "--resume", ckpt,
              match="holds CAFM's networks")


def test_cafm_from_the_sit_format_drops_labels_and_samples_with_guidance(data, tmp_path):
    """A SiT-format flow model (learned sigma, SiT's time, a null class) post-trained on the 5-class data; sample.py
    guides it; model.sample's Euler and Heun steps with guidance are the formulas."""
    sit = model.Generator(**model.SIZES["T/2"], input_size=8, in_channels=3, num_classes=6, **model.SIT_FLAGS)
    torch.save(sit.state_dict(), tmp_path / "sit.pt")
    run_script("cafm.py", "--model", "T/2", "--data-path", data, "--init", tmp_path / "sit.pt", "--results-dir",
               tmp_path / "r", *CAFM, "--max-steps", 3)
    ckpt = torch.load(tmp_path / "r" / "checkpoints" / "0000003.pt", weights_only=True)
    assert ckpt["config"]["G"]["null_class"] and "label dropout 0.1" in open(tmp_path / "r" / "log.txt").read()
    y = torch.arange(5).repeat(8)
    b = loss.cafm_batch(torch.randn(40, 3, 8, 8), y, torch.Generator().manual_seed(0), null_class=5, dropout=0.5)
    kept = b["y"] < 5
    assert set(b) == {"x_t", "v_real", "y", "t"} and 5 < (~kept).sum() < 35 and torch.equal(b["y"][kept], y[kept])
    run_script("sample.py", "--ckpt", tmp_path / "r" / "checkpoints" / "0000003.pt", "--out", tmp_path / "g.png",
               "--steps", 8, "--cfg-scale", 1.5)
    assert np.asarray(Image.open(tmp_path / "g.png")).shape == (2 + 4 * 10, 2 + 4 * 10, 3)
    cli_error("cafm.py", "--model", "T/2", "--data-path", make_data(tmp_path / "d7", num_classes=7), "--init",
              tmp_path / "sit.pt", "--results-dir", tmp_path / "x", *CAFM, match="and the null class")
    G = model.Generator(**model.SIZES["T/2"], input_size=8, in_channels=3, num_classes=6, **model.SIT_FLAGS)
    G.load_state_dict(fill([(k, v.shape) for k, v in G.state_dict().items() if k != "pos_embed"], 3), strict=False)
    z, y, null, s = torch.randn(2, 3, 8, 8), torch.tensor([0, 4]), torch.tensor([5, 5]), 1.5
    with torch.no_grad():
        v = lambda x, t: G(x, null, t) + s * (G(x, y, t) - G(x, null, t))
        one, zero = torch.ones(2), torch.zeros(2)
        assert torch.allclose(model.sample(G, z, y, 1, cfg_scale=s), z - v(z, one), atol=1e-5)
        heun = z - (v(z, one) + v(z - v(z, one), zero)) / 2
        assert torch.allclose(model.sample(G, z, y, 1, heun=True, cfg_scale=s), heun, atol=1e-5)


def test_cafm_two_processes_train_what_one_does(data, tmp_path):
    """Each rank takes its share of the one global batch, so two processes train the networks one process trains (up
    to the order in which the ranks' gradients are summed)."""
    fm = flow_model(data, tmp_path / "fm")
    argv = ["cafm.py", "--data-path", data, "--init", fm, *CAFM, "--max-steps", 3]
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          *map(str, argv), "--results-dir", str(tmp_path / "two")], cwd=HERE,
                         env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "on 2 x cpu, batch 4/rank" in out.stdout and "weights identical on all 2 ranks" in out.stdout
    run_script(*argv, "--results-dir", tmp_path / "one")
    one, two = (torch.load(tmp_path / d / "checkpoints" / "0000003.pt", weights_only=True) for d in ("one", "two"))
    start = torch.load(fm, weights_only=True)["EMA"]
    for key in ("G", "D", "EMA"):
        for k in one[key]:
            close = torch.isclose(one[key][k], two[key][k], rtol=1e-4, atol=1e-6)
            if k.endswith("attn.qkv.bias"):  # key biases: softmax is blind to them, so their gradient is rounding
                close[64:128] = True         # noise, and Adam (beta1 = 0) steps by lr along its sign
            assert close.all(), (key, k)
    assert not torch.allclose(one["G"]["final_layer.linear.weight"], start["final_layer.linear.weight"], atol=1e-4)


def test_the_committed_cafm_generator_draws_its_grid(tmp_path):
    """docs/fmnist_cafm.pt alone (pixel data, no VAE) draws the committed 8-step grid of docs/results.md."""
    ckpt = os.path.join(HERE, "docs", "fmnist_cafm.pt")
    assert torch.load(ckpt, weights_only=True)["config"]["method"] == "cafm" and os.path.getsize(ckpt) < 10 * 2 ** 20
    run_script("sample.py", "--ckpt", ckpt, "--out", tmp_path / "grid.png", "--class-labels", *range(10),
               "--num-images", 100, "--nrow", 10, "--steps", 8)
    grid = np.asarray(Image.open(tmp_path / "grid.png"), dtype=np.int16)
    committed = np.asarray(Image.open(os.path.join(HERE, "docs", "fmnist_cafm8.png")), dtype=np.int16)
    assert grid.shape == committed.shape == (2 + 10 * 30, 2 + 10 * 30, 3) and np.abs(grid - committed).max() <= 1


#################################################################################
#              Run curves and the judge over checkpoints                        #
#################################################################################

def scalars(path):
    return [json.loads(line) for line in open(path)]


def test_scalars_are_the_log_lines_and_a_resume_drops_the_records_after_it(data, tmp_path):
    """RESULTS/scalars.jsonl holds every log line's numbers (with the logit gap and GradNorm's RMS), and
    RESULTS/curves.png draws them at every checkpoint; a resume from step 2 rewrites the file up to step 2 (a line cut
    short by a killed job dropped too) before it goes on."""
    run = ["--data-path", data, "--results-dir", tmp_path, *TRAIN, "--log-every", 1, "--ckpt-every", 2]
    run_script("train.py", *run, "--max-steps", 4)
    first = scalars(tmp_path / "scalars.jsonl")
    assert [r["step"] for r in first] == [1, 2, 3, 4]
    for record, line in zip(first, logged(tmp_path / "log.txt")):
        assert set(record) == {"step", "img_per_s"} | set(line) - {"img/s"} >= {"grad_rms", "logit_gap", "ot_scale",
                                                                               "aug_p", "lr", "r1", "r2", "ot"}
        assert all(math.isclose(record[k], v, rel_tol=1e-3, abs_tol=1e-4) for k, v in line.items() if k != "img/s")
        assert math.isclose(record["img_per_s"], line["img/s"], abs_tol=0.05)
        assert math.isclose(record["logit_gap"], record["logits_real"] - record["logits_fake"], abs_tol=1e-6)
    ckpt = torch.load(tmp_path / "checkpoints" / "0000004.pt", weights_only=True)
    assert first[-1]["grad_rms"] > 0 and first[-1]["aug_p"] == 0 and first[-1]["lr"] == ckpt["args"]["lr"]
    curves = Image.open(tmp_path / "curves.png")
    assert curves.format == "PNG" and curves.size == (3 * 360, 2 * 220)    # five panels, three a row
    with open(tmp_path / "scalars.jsonl", "a") as f:
        f.write('{"step": 5, "loss_d"')
    run_script("train.py", *run, "--max-steps", 3, "--resume", tmp_path / "checkpoints" / "0000002.pt")
    again = scalars(tmp_path / "scalars.jsonl")
    assert again[:2] == first[:2] and [r["step"] for r in again] == [1, 2, 3]
    assert {k: v for k, v in again[2].items() if k != "img_per_s"} == {k: v for k, v in first[2].items()
                                                                         if k != "img_per_s"}    # resumed exactly


@pytest.mark.parametrize("script", ["twinflow.py", "train_classifier.py", "judge.py", "cafm.py"])
def test_every_trainer_writes_its_scalars_and_curves(script, data, tmp_path):
    argv = {"twinflow.py": TWIN, "train_classifier.py": [*CLS, "--global-batch-size", 8],
            "judge.py": ["--device", "cpu", "--global-batch-size", 8],
            "cafm.py": [*CAFM, "--init", flow_model(data, tmp_path / "fm")] if script == "cafm.py" else []}[script]
    run_script(script, "--data-path", data, "--results-dir", tmp_path / "run", *argv, "--max-steps", 3,
               "--log-every", 1)
    records = scalars(tmp_path / "run" / "scalars.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3] and all(r["img_per_s"] > 0 for r in records)
    keys = {"twinflow.py": {"base", "real", "fake", "rectify", "base_one_step", "ema_decay"},
            "cafm.py": {"loss_d", "loss_cp", "loss_g", "grad_norm_g"}}.get(script, {"loss", "acc", "grad_norm", "lr"})
    assert keys <= {k for r in records for k in r}           # CAFM's D and G steps log apart
    assert Image.open(tmp_path / "run" / "curves.png").format == "PNG"


def test_curves_of_a_single_point_a_constant_and_a_log_scale_of_non_positive_values(tmp_path):
    panels = [("one point", {"a": [(5, 1.0)]}, False),
              ("constant", {"flat": [(0, 2.0), (10, 2.0)], "rising": [(0, 1.0), (10, 3.0)]}, False),
              ("log", {"r1": [(0, 0.0), (1, -1.0), (2, math.nan), (3, 1e-3), (4, 1e2)]}, True),
              ("nothing to draw", {"none": [(0, math.nan)], "gone": []}, True)]
    assert common.save_curves(tmp_path / "c.png", panels) == 3
    image = Image.open(tmp_path / "c.png")
    assert image.format == "PNG" and image.size == (3 * 360, 220)
    pixels = np.asarray(image)
    colour = lambda k, panel: (pixels[40:198, panel * 360 + 62:panel * 360 + 344] == common.COLOURS[k]).all(-1).sum()
    assert colour(0, 0) > 0 and colour(0, 1) > 100 and colour(1, 1) > 100 and colour(0, 2) > 100
    flat = (pixels[40:198, 360 + 90:360 + 310] == common.COLOURS[0]).all(-1).any(1)
    assert 1 <= flat.sum() <= 4                                 # a constant: one horizontal line, 2 px wide

def test_the_judge_scores_checkpoints_as_it_scores_their_npz_and_draws_them_against_the_step(data, tmp_path, capsys):
    held_out = make_data(tmp_path / "held_out", seed=1)
    run_script("judge.py", "--data-path", data, "--results-dir", tmp_path / "judge", "--device", "cpu",
               "--global-batch-size", 8, "--max-steps", 4)
    judge = tmp_path / "judge" / "checkpoints" / "0000004.pt"
    run_script("train.py", "--data-path", data, "--results-dir", tmp_path / "afm", *TRAIN, "--max-steps", 4,
               "--ckpt-every", 2, "--nfe", 2)
    ckpts = [tmp_path / "afm" / "checkpoints" / f"000000{k}.pt" for k in (2, 4)]
    run_script("sample.py", "--ckpt", ckpts[1], "--save-generator", tmp_path / "gen.pt")
    run_script("sample.py", "--ckpt", ckpts[1], "--npz", tmp_path / "s.npz", "--num-samples", 20)
    run_script("train.py", "--data-path", data, "--results-dir", tmp_path / "one", *TRAIN, "--max-steps", 2)
    one = tmp_path / "one" / "checkpoints" / "0000002.pt"      # a one-step G of 2 steps: nearly one image
    capsys.readouterr()
    score = ["--judge", judge, "--data-path", held_out, "--real-data", data]
    run_script("judge.py", "--evaluate", tmp_path / "s.npz", *score)
    by_npz = capsys.readouterr().out.splitlines()
    run_script("judge.py", "--checkpoints", *ckpts, tmp_path / "gen.pt", one, *score, "--num-samples", 20,
               "--batch-size", 8, "--scores-out", tmp_path / "scores.jsonl", "--figure", tmp_path / "scores.png")
    printed = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("warning")]
    assert printed[:4] == by_npz[:4]                           # the judge, the real floor and its two lines
    assert "spread per class" in printed[3] and len(printed[3].split()) == 3 + 5
    names = [f"{ckpts[0]} (step 2, 20 EMA samples in 2 steps)", f"{ckpts[1]} (step 4, 20 EMA samples in 2 steps)",
             f"{tmp_path / 'gen.pt'} (step 4, 20 EMA samples in 2 steps)", f"{one} (step 2, 20 EMA samples in 1 step)"]
    assert [printed[4 + 3 * i].split(": ")[0] for i in range(4)] == names and len(printed) == 4 + 3 * 4
    # The samples of a checkpoint score as its npz does (the same noise, labels and images), as does its generator.
    scored = lambda lines: [lines[0].split(": ", 1)[1], *lines[1:3]]     # without the name
    assert scored(printed[7:10]) == scored(printed[10:13]) == scored(by_npz[4:7])
    records = scalars(tmp_path / "scores.jsonl")
    assert [r.get("step") for r in records] == [None, 2, 4, 4, 2] and records[0]["real"] == str(data)
    assert [r.get("checkpoint") for r in records[1:]] == [str(p) for p in (*ckpts, tmp_path / "gen.pt", one)]
    for r, i in zip(records, range(1, 16, 3)):
        assert f"class accuracy {r['accuracy']:.4f}  Frechet distance {r['frechet']:.4f}" in printed[i]
        assert f"recall {r['recall']:.4f}  spread {r['spread']:.2f} of the real's" in printed[i]
    assert records[-1]["spread"] < 0.05 < records[1]["spread"]  # the one-step G of 2 steps draws one image a class
    figure = Image.open(tmp_path / "scores.png")
    assert figure.format == "PNG" and figure.size == (3 * 360, 2 * 220)   # accuracy, FD, precision, recall, spread
    cli_error("judge.py", "--evaluate", tmp_path / "s.npz", *score, "--figure", tmp_path / "f.png",
              match="--figure draws the scores of --checkpoints")
    cli_error("judge.py", "--checkpoints", one, *score, "--steps", 2, match="holds a one-step generator")


def test_the_judge_scores_a_generator_of_autoencoder_latents_in_pixels(ae_route, tmp_path, capsys):
    """The images' size is the decoder's (28 pixels from 4 x 4 latents), and they score as their npz does."""
    root, _, _ = ae_route
    ae_path = root / "ae" / "checkpoints" / "0000004.pt"
    run_script("judge.py", "--data-path", root / "pixels", "--results-dir", tmp_path / "j", "--device", "cpu",
               "--global-batch-size", 8, "--max-steps", 1)
    run_script("train.py", "--data-path", root / "latents", "--results-dir", tmp_path / "g", "--model", "XS/1",
               "--device", "cpu", "--global-batch-size", 4, "--max-steps", 1)
    ckpt = tmp_path / "g" / "checkpoints" / "0000001.pt"
    run_script("sample.py", "--ckpt", ckpt, "--vae-weights", ae_path, "--npz", tmp_path / "s.npz", "--num-samples", 8)
    score = ["--judge", tmp_path / "j" / "checkpoints" / "0000001.pt", "--data-path", root / "pixels"]
    capsys.readouterr()
    run_script("judge.py", "--evaluate", tmp_path / "s.npz", *score)
    by_npz = capsys.readouterr().out.splitlines()
    run_script("judge.py", "--checkpoints", ckpt, *score, "--vae-weights", ae_path, "--num-samples", 8)
    printed = capsys.readouterr().out.splitlines()
    assert printed[1].startswith(f"{ckpt} (step 1, 8 EMA samples in 1 step): ")
    assert printed[1].split(": ", 1)[1] == by_npz[1].split(": ", 1)[1] and printed[2:4] == by_npz[2:4]
    cli_error("judge.py", "--checkpoints", ckpt, *score, match="give its weights with --vae-weights")

def test_the_spread_is_one_for_real_images_and_zero_for_identical_ones():
    f, y = torch.randn(4000, 16, dtype=torch.float64), torch.arange(4000) % 4
    g = torch.randn(4000, 16, dtype=torch.float64)            # other images of the same distribution
    assert spread(f, y, f, y) == [1.0] * 4
    assert all(abs(r - 1) < 0.1 for r in spread(g, y, f, y))
    assert spread(f[:1].expand(4000, -1), y, f, y) == [0.0] * 4
    assert spread(f[y == 0].mul(3), y[y == 0], f, y)[0] == pytest.approx(3)
    assert all(math.isnan(r) for r in spread(f[:1], y[:1], f, y))       # fewer than 2 a class


#################################################################################
#                          The small autoencoder route                          #
#################################################################################
# 28-pixel images -> train_ae.py's SmallAE -> prepare_latents.py --vae ae -> an XS/1 generator -> sample.py, which
# draws through the same autoencoder; a tiny one here (width 8, 4 latent channels: 4 x 4 x 4 latents).

AE = ["--width", 8, "--downsamples", 3, "--latent-channels", 4, "--global-batch-size", 8, "--log-every", 2,
      "--ckpt-every", 2, "--device", "cpu"]


def test_small_ae_pads_with_the_background_crops_back_and_makes_16x4x4_latents():
    ae = vae.SmallAE()
    x = torch.rand(2, 1, 28, 28) * 2 - 1
    z = ae.encode(x)
    assert z.shape == (2, 16, 4, 4) and ae.decode(z).shape == x.shape and ae.latent_size == 4
    assert sum(p.numel() for p in ae.parameters()) == 666_833                      # widths 32, 64, 128
    assert torch.equal(z, ae.encoder(F.pad(x, (2, 2, 2, 2), value=-1.0)))          # padded with the background
    assert torch.equal(ae.decode(z), ae.decoder(z)[..., 2:30, 2:30])               # and cropped back
    assert [type(m).__name__ for m in ae.encoder] == ["Conv2d", "SiLU", "Sequential"] * 3 + ["Conv2d"]
    up = ["Upsample", "Sequential", "Sequential"]
    assert [type(m).__name__ for m in ae.decoder] == ["Sequential"] * 2 + up * 2 + ["ConvTranspose2d"]
    odd = vae.SmallAE(channels=3, image_size=7, latent=4, down=2, width=8)       # 7 px padded to 8: a row after
    assert odd.pad == (0, 1) and odd.decode(odd.encode(torch.zeros(1, 3, 7, 7))).shape == (1, 3, 7, 7)


@pytest.fixture(scope="module")
def ae_route(tmp_path_factory):
    """(folder, images, labels): an IDX source of seven 28-pixel images, its pixel data directory (also the held-out
    set), an autoencoder trained on it for 4 steps (checkpoints at 2 and 4) and its latents of the source."""
    root = tmp_path_factory.mktemp("ae")
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8), np.array([3, 0, 1, 3, 2, 0, 1])
    write_idx(root / "train-images-idx3-ubyte", images)
    write_idx(root / "train-labels-idx1-ubyte", labels)
    source = ["--data-path", root / "train-images-idx3-ubyte", "--num-workers", 0]
    run_script("prepare_latents.py", *source, "--out", root / "pixels", "--vae", "none")
    run_script("train_ae.py", "--data-path", root / "pixels", "--test-path", root / "pixels", "--results-dir",
               root / "ae", "--max-steps", 4, *AE, "--recon-npz", root / "recon.npz")
    run_script("prepare_latents.py", *source, "--out", root / "latents", "--vae", "ae", "--vae-weights",
               root / "ae" / "checkpoints" / "0000004.pt", "--batch-size", 3)
    return root, images, labels


def test_train_ae_keeps_config_recipe_and_weights_in_one_file_resumes_exactly_and_scores(ae_route, tmp_path, capsys):
    root, images, labels = ae_route
    path = root / "ae" / "checkpoints" / "0000004.pt"
    ckpt, ae = torch.load(path, weights_only=True), vae.load_ae(str(path))
    assert ae.config == ckpt["config"]["AE"] == dict(channels=1, image_size=28, latent=4, down=3, width=8)
    assert all(torch.equal(v, ckpt["AE"][k]) for k, v in ae.state_dict().items())
    assert (ckpt["args"]["lr"], ckpt["args"]["latent_noise"], ckpt["args"]["global_batch_size"]) == (2e-3, 0.1, 8)
    assert isinstance(vae.load_vae(str(path)), vae.SmallAE)                # what the file holds decides
    assert [r["step"] for r in scalars(root / "ae" / "scalars.jsonl")] == [2, 4] and scalars(
        root / "ae" / "scalars.jsonl")[0]["lr"] == pytest.approx(train_ae.one_cycle(1, 4, 2e-3)[0])
    assert Image.open(root / "ae" / "curves.png").format == "PNG"
    torch.manual_seed(0)
    assert not torch.equal(vae.SmallAE(**ae.config).state_dict()["encoder.0.weight"], ckpt["AE"]["encoder.0.weight"])
    # --resume from step 2 ends where the uninterrupted run did, bit for bit.
    shutil.copytree(root / "ae", tmp_path / "ae")
    os.remove(tmp_path / "ae" / "checkpoints" / "0000004.pt")
    run_script("train_ae.py", "--data-path", root / "pixels", "--results-dir", tmp_path / "ae", "--max-steps", 4, *AE,
               "--resume", tmp_path / "ae" / "checkpoints" / "0000002.pt")
    again = torch.load(tmp_path / "ae" / "checkpoints" / "0000004.pt", weights_only=True)
    assert all(torch.equal(again["AE"][k], v) for k, v in ckpt["AE"].items())
    assert torch.equal(again["opt"]["state"][0]["exp_avg_sq"], ckpt["opt"]["state"][0]["exp_avg_sq"])
    # The held-out score: MSE of the clamped reconstructions, and the npz the judge reads.
    x = torch.from_numpy(np.load(root / "pixels" / "latents.npy")[:, 0]).float()
    with torch.no_grad():
        recon = ae.decode(ae.encode(x)).clamp(-1, 1)
    mse = f"MSE {(recon - x).square().mean():.5f}"
    assert mse in (root / "ae" / "log.txt").read_text()
    with np.load(root / "recon.npz") as f:
        assert np.array_equal(f["arr_0"], model.to_uint8(recon).expand(-1, 3, -1, -1).permute(0, 2, 3, 1).numpy())
        assert f["labels"].tolist() == labels.tolist()
    run_script("train_ae.py", "--evaluate", path, "--test-path", root / "pixels")
    assert mse in capsys.readouterr().out
    cli_error("train_ae.py", "--evaluate", path, "--test-path", root / "pixels", "--recon-npz", root / "recon.npz",
              match="already exists")
    # Other files: one line each.
    torch.save(dict(config=dict(G={}), G={}), tmp_path / "g.pt")
    torch.save(dict(ckpt, config=dict(AE=dict(ae.config, width=16))), tmp_path / "edited.pt")
    for name, match in (("g.pt", "is not a small autoencoder; train one with train_ae.py"),
                        ("edited.pt", "its small autoencoder does not load (")):
        with pytest.raises(ValueError, match=re.escape(match)) as e:
            vae.load_ae(str(tmp_path / name))
        assert "\n" not in str(e.value)
        cli_error("train_ae.py", "--evaluate", tmp_path / name, "--test-path", root / "pixels", match=match)
    cli_error("train_ae.py", "--data-path", root / "latents", match="holds latents of the ae VAE")
    assert exit_status(["train_ae.py", "--data-path", root / "pixels", "--width", 12]) == 2          # GroupNorm's 8
    cli_error("train.py", "--data-path", root / "latents", "--model", "XS/1", "--results-dir", tmp_path / "r",
              "--resume", path, match="holds an autoencoder (train_ae.py), and this run trains a generator")
    cli_error("train_ae.py", "--data-path", root / "pixels", "--results-dir", tmp_path / "nan", *AE, "--max-steps", 6,
              "--log-every", 6, "--lr", 1e30, match="non-finite loss at step 2 (")


def test_prepare_latents_ae_writes_unit_std_latents_that_only_their_autoencoder_decodes(ae_route, tmp_path):
    root, images, labels = ae_route
    path = root / "ae" / "checkpoints" / "0000004.pt"
    ae, out = vae.load_ae(str(path)), root / "latents"
    latents, info = np.load(out / "latents.npy"), json.loads((out / "info.json").read_text())
    assert latents.shape == (7, 2, 4, 4, 4) and latents.dtype == np.float16 and not os.path.exists(out / "std.npy")
    assert abs(latents.astype(np.float64).std() - 1) < 1e-3 and np.load(out / "labels.npy").tolist() == labels.tolist()
    x = torch.from_numpy(images[:, None] / 127.5 - 1).float()
    with torch.no_grad():
        z = torch.stack([ae.encode(x), ae.encode(x.flip(3))], 1)                # (N, 2 views, 4, 4, 4)
    assert info["scale"] == pytest.approx(1 / z.double().std(unbiased=False).item(), rel=1e-3)
    np.testing.assert_allclose(latents, (z * info["scale"]).numpy(), rtol=2e-3, atol=2e-3)
    sha1 = hashlib.sha1(path.read_bytes()).hexdigest()
    assert info["vae"] == "ae" and info["ae"] == dict(config=ae.config, sha1=sha1)
    # The data's decoder is this autoencoder after the scale is undone; any other weights are refused in one line.
    data = LatentData(str(out))
    with torch.no_grad():
        decoded = make_decoder(data.info, str(path), "cpu")(torch.from_numpy(latents[:, 0]).float())
        direct = ae.decode(z[:, 0])
    assert decoded.shape == (7, 1, 28, 28) and torch.allclose(decoded, direct, atol=5e-3)
    with pytest.raises(SystemExit, match="0000002.pt is not the autoencoder that encoded these latents"):
        make_decoder(data.info, str(root / "ae" / "checkpoints" / "0000002.pt"), "cpu")
    torch.save(tiny_vae().state_dict(), tmp_path / "kl.pth")
    with pytest.raises(SystemExit, match="holds a KL VAE; these latents come from the ae autoencoder"):
        make_decoder(data.info, str(tmp_path / "kl.pth"), "cpu")
    with pytest.raises(SystemExit, match="holds a small autoencoder"):
        make_decoder(dict(vae="sd-vae-ft-mse", scale=0.18215), str(path), "cpu")
    # Interrupted after a chunk, the same command finishes the same bytes.
    source = ["--data-path", root / "train-images-idx3-ubyte", "--num-workers", 0, "--batch-size", 3]
    assert exit_status(["prepare_latents.py", *source, "--out", tmp_path / "b", "--vae", "ae", "--vae-weights", path,
                        "--stop-after-chunks", 1]) != 0
    run_script("prepare_latents.py", *source, "--out", tmp_path / "b", "--vae", "ae", "--vae-weights", path)
    assert (tmp_path / "b" / "latents.npy").read_bytes() == (out / "latents.npy").read_bytes()
    assert json.loads((tmp_path / "b" / "info.json").read_text())["scale"] == info["scale"]
    assert sorted(os.listdir(tmp_path / "b")) == sorted(os.listdir(out))
    # Each autoencoder for its --vae, on images of its own size.
    source += ["--out", tmp_path / "c", "--vae-weights"]
    cli_error("prepare_latents.py", *source, tmp_path / "kl.pth", "--vae", "ae", match="is not a small autoencoder")
    cli_error("prepare_latents.py", *source, path, match="encode with --vae ae")
    cli_error("prepare_latents.py", *source, path, "--vae", "ae", "--image-size", 32, match="encodes 1-channel 28-pixel")


def test_xs1_trains_on_the_latents_and_samples_28_pixel_images_through_the_autoencoder(ae_route, tmp_path, capsys):
    root, _, _ = ae_route
    pick = lambda flag: train.paper_default(flag, "XS/1", "1", 1)
    assert [pick(f) for f in ("global_batch_size", "max_steps", "lr", "g_lr_ratio", "ema_decay", "ot_scale",
                              "ot_scale_end", "ot_decay_steps")] == [64, 2000, 3e-4, 2.0, 0.995, 0.2, 0.1, 1500]
    ae_path = root / "ae" / "checkpoints" / "0000004.pt"
    run_script("train.py", "--data-path", root / "latents", "--results-dir", tmp_path, "--model", "XS/1", "--device",
               "cpu", "--global-batch-size", 4, "--max-steps", 1)
    ckpt = tmp_path / "checkpoints" / "0000001.pt"
    state = torch.load(ckpt, weights_only=True)
    assert {k: state["config"]["G"][k] for k in ("patch_size", "input_size", "in_channels")} == dict(
        patch_size=1, input_size=4, in_channels=4)
    run_script("sample.py", "--ckpt", ckpt, "--vae-weights", ae_path, "--out", tmp_path / "grid.png", "--num-images", 4,
               "--nrow", 2)
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert grid.shape == (2 + 2 * 30, 2 + 2 * 30, 3)
    # Cell (0, 0) by hand: sample 0 (label 0) from noise seeded by (0, 0), one step, decoded after the scale is undone.
    G = model.Generator(**state["config"]["G"])
    G.load_state_dict(state["EMA"])
    z = torch.from_numpy(np.random.default_rng([0, 0]).standard_normal((1, 4, 4, 4), dtype=np.float32))
    with torch.no_grad():
        x = model.sample(G.eval(), z, torch.tensor([0]), steps=1) / state["data_info"]["scale"]
        expect = model.to_uint8(vae.load_ae(str(ae_path)).decode(x))[0, 0].numpy()
    assert np.abs(grid[2:30, 2:30, 0].astype(int) - expect.astype(int)).max() <= 1
    run_script("sample.py", "--ckpt", ckpt, "--vae-weights", ae_path, "--npz", tmp_path / "s.npz", "--num-samples", 5)
    with np.load(tmp_path / "s.npz") as f:
        assert f["arr_0"].shape == (5, 28, 28, 3) and f["arr_0"].dtype == np.uint8
    cli_error("sample.py", "--ckpt", ckpt, "--out", tmp_path / "g2.png", match="give its weights with --vae-weights")
    # The benchmark decodes with an autoencoder of the data's config (random weights).
    run_script("train.py", "--benchmark", 1, "--model", "XS/1", "--data-path", root / "latents", "--device", "cpu",
               "--global-batch-size", 2)
    assert "with VAE decoding" in capsys.readouterr().out


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
