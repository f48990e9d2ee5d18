"""
The test suite: CPU only, tiny models, a few minutes on 2 cores.

    python -m pytest -q test_smoke.py
    python test_smoke.py

Reference vectors live in fixtures/ (see fixtures/README.md for how each was made); the networks' weights are
rebuilt from (key, shape) lists by fill() below, so the fixtures stay small.
"""
import ast
import atexit
import errno
import functools
import glob
import gzip
import importlib
import json
import math
import multiprocessing
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

import fid
import model
import prepare_latents
import toy
import train
import vae

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
    """Runs a script's __main__ in this process (no interpreter start-up), as `python script argv...` would."""
    old = sys.argv
    sys.argv = [script, *map(str, argv)]
    try:
        runpy.run_path(os.path.join(HERE, script), run_name="__main__")
    finally:
        sys.argv = old


def expect_error(script, *argv, match):
    """The script must end with one clear `error: ...` line, not a traceback."""
    with pytest.raises(SystemExit) as e:
        run_script(script, *argv)
    message = str(e.value.code)
    assert message.startswith("error:") and "\n" not in message and match in message, message


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


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"))


TRAIN = ["--model", "T/2", "--device", "cpu", "--global-batch-size", 8, "--log-every", 2]


#################################################################################
#                                     Layout                                    #
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


def test_imports_flow_one_way():
    """model/vae/fid import nothing of the project; no cycle; no project import hidden in a function."""
    graph = {}
    for name in SCRIPTS:
        importlib.import_module(name)                          # every script imports without running
        graph[name], nested = project_imports(name)
        assert not nested, f"{name} imports {nested} inside a function"
    assert {"model", "train", "sample", "fid", "vae", "prepare_latents", "toy"} <= set(graph)
    for copyable in ("model", "vae", "fid"):
        assert not graph[copyable], f"{copyable}.py imports {graph[copyable]}"
    assert "sample" not in graph["train"] and "train" in graph["sample"]
    def reaches(a, b, seen=()):
        return any(n == b or (n not in seen and reaches(n, b, seen + (n,))) for n in graph[a])
    assert not [n for n in graph if reaches(n, n)], "import cycle"


#################################################################################
#                          Networks: reference vectors                          #
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
#                                  The losses                                   #
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
    loss, stats = train.discriminator_loss(D, x_real, x_fake, y, t, w, gp_scale=0.25, gp_eps=0.01, gp_ratio=0.5,
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
    torch.testing.assert_close(loss, adv + r1 + r2 + cp, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(stats["logits_real"], real.mean())


def test_generator_loss_terms_by_hand():
    D = LinearD(4)
    x_fake = torch.tensor([[1., 0, 0, 0], [0, 2, 0, 0]], requires_grad=True)
    x_src, x_real = torch.zeros(2, 4), torch.ones(2, 4)
    y, w = torch.tensor([0, 1]), torch.tensor([1.0, 0.5])
    loss, stats = train.generator_loss(D, x_fake, x_src, x_real, y, None, w, ot_scale=0.2,
                                       grad_norm=torch.nn.Identity())
    with torch.no_grad():
        real, fake = D(x_real, y), D(x_fake, y)
    torch.testing.assert_close(stats["loss_g"], torch.log1p(torch.exp(-(fake - real))).mean())
    torch.testing.assert_close(stats["ot"], torch.tensor((0.2 * 1 / 4 / 1.0 + 0.2 * 4 / 4 / 0.5) / 2))
    loss.backward()
    assert D.w.grad is not None and x_fake.grad.abs().sum() > 0


def test_gradient_normalisation_makes_the_loss_scale_irrelevant():
    """D's gradient into G, through GradNorm, is the same whether the loss is scaled by 1 or 1000."""
    grads = []
    for scale in (1.0, 1000.0):
        torch.manual_seed(0)
        G = torch.nn.Linear(3, 4)
        gn = train.GradNorm()
        x = G(torch.randn(5, 3))
        (gn(x).tanh().sum() * scale).backward()
        grads.append(G.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)
    # The running statistic: EMA_0.9 of |g|^2 numel, starting from 0.
    x = torch.randn(5, 4, requires_grad=True)
    gn = train.GradNorm()
    out = gn(x)
    out.backward(torch.full((5, 4), 2.0))
    square = 4.0 * 20 * 20
    torch.testing.assert_close(gn.square_avg, torch.tensor(0.1 * square))
    torch.testing.assert_close(x.grad, torch.full((5, 4), 2.0) / (math.sqrt(0.1 * square) + 1e-8))


def test_ot_scale_schedule():
    assert train.ot_scale_at(0, 0.2, 0.005, 101) == pytest.approx(0.2)
    assert train.ot_scale_at(50, 0.2, 0.005, 101) == pytest.approx(0.1025)
    assert train.ot_scale_at(100, 0.2, 0.005, 101) == train.ot_scale_at(10**6, 0.2, 0.005, 101) == 0.005
    assert {train.ot_scale_at(s, 0.001, 0.001, 101) for s in (0, 50, 10**6)} == {0.001}   # a constant stage


def test_defaults_table():
    """Flags left unset take the paper's per-size and per-mode values, from one table."""
    pick = train.paper_default
    assert pick("ot_scale", "XL/2", "1", 1) == 0.2 and pick("ot_scale", "XL/2", "2", 1) == 0.25
    assert pick("ot_scale", "XL/2", "any", 1) == 0.25
    assert pick("ot_scale_end", "B/2", "1", 1) == 0.01 and pick("ot_scale_end", "L/2", "1", 1) == 0.005
    assert pick("ot_constant", "B/2", "1", 1) == 0.001
    assert [pick("grad_clip", "XL/2", n, r) for n, r in (("1", 1), ("2", 1), ("1", 2), ("1", 4))] == [50, 5, 5, 5]
    assert [pick("g_lr_ratio", "XL/2", "1", r) for r in (1, 2, 4)] == [1.0, 0.5, 0.25]
    assert all(len(row) == 5 and row[4] for row in train.DEFAULTS)          # every row cites its source


def test_batches_share_the_image_not_the_noise(data):
    torch.manual_seed(0)
    d = train.LatentData(data)
    for nfe, expect in (("1", {(1.0, 0.0)}), ("4", {(1.0, .75), (.75, .5), (.5, .25), (.25, 0.0)})):
        b = train.make_batch(d, 64, nfe, "cpu")
        assert set(zip(b["t_src"].tolist(), b["t_tgt"].tolist())) == expect
    b = train.make_batch(d, 64, "any", "cpu")
    assert ((b["t_tgt"] <= b["t_src"]) & (b["t_src"] <= 1)).all() and b["weighting"].min() >= 0.001
    b = train.make_batch(d, 4, "1", "cpu")
    assert not torch.equal(b["x_src"], b["x_tgt"])             # one step: x_s is pure noise, x_t is the data
    rows = np.load(os.path.join(data, "latents.npy")).astype(np.float32)
    assert any(np.allclose(b["x_tgt"][0].numpy(), rows[i, v]) for i in range(len(rows)) for v in range(2))


#################################################################################
#                              Steps and the loop                               #
#################################################################################

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
    d = train.LatentData(data)
    g0, d0, e0 = snapshot(G), snapshot(D), snapshot(EMA)
    stats = train.d_step(G, D, opt_D, train.make_batch(d, 8, "2", "cpu"), gp_scale=0.25, gp_eps=0.01, gp_ratio=0.25,
                         cp_scale=0.01, **players_kw)
    assert not changed(G, g0) and changed(D, d0) == set(d0) - {"pos_embed"}
    assert all(torch.isfinite(v) for v in stats.values())
    d1, d_grads = snapshot(D), [None if p.grad is None else p.grad.clone() for p in D.parameters()]
    stats = train.g_step(G, D, opt_G, train.GradNorm(), train.make_batch(d, 8, "2", "cpu"), ot_scale=0.25, **players_kw)
    assert not changed(D, d1) and changed(G, g0) == set(g0) - {"pos_embed"}
    # D passed gradients to G without collecting any itself, and is trainable again (pos_embed stays frozen).
    assert all(a is None and p.grad is None or torch.equal(a, p.grad) for a, p in zip(d_grads, D.parameters()))
    assert [n for n, p in D.named_parameters() if not p.requires_grad] == ["pos_embed"]
    assert not changed(EMA, e0)
    train.update_ema(EMA, G, 0.9)
    assert changed(EMA, e0) == set(e0) - {"pos_embed"}
    torch.testing.assert_close(EMA.x_embedder.proj.bias, 0.9 * e0["x_embedder.proj.bias"] + 0.1 * G.x_embedder.proj.bias)


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
    # The same samples come out of the EMA weights by hand: sample i from noise seeded by i, two v-steps.
    state = torch.load(ckpt, weights_only=True)
    G = model.Generator(**state["config"]["G"])
    G.load_state_dict(state["EMA"])
    z = torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(4))[None]
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


def test_two_processes_under_torchrun(data, tmp_path):
    """DDP with gloo: the two ranks split the batch, stay in sync, and sample.py shards the same samples."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    out = subprocess.run(torchrun + ["train.py", "--data-path", data, "--results-dir", tmp_path,
                                     *map(str, TRAIN), "--max-steps", "3"], cwd=HERE, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "on 2 x cpu, batch 4/rank" in out.stdout and "weights identical on all 2 ranks" in out.stdout
    ckpt = tmp_path / "checkpoints" / "0000003.pt"
    assert len(torch.load(ckpt, weights_only=True)["rng"]) == 2
    out = subprocess.run(torchrun + ["sample.py", "--ckpt", str(ckpt), "--npz", str(tmp_path / "two.npz"),
                                     "--num-samples", "10", "--batch-size", "2"], cwd=HERE, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    run_script("sample.py", "--ckpt", ckpt, "--npz", tmp_path / "one.npz", "--num-samples", 10, "--batch-size", 4)
    with np.load(tmp_path / "one.npz") as one, np.load(tmp_path / "two.npz") as two:
        assert np.array_equal(one["arr_0"], two["arr_0"]) and np.array_equal(one["labels"], two["labels"])
    out = subprocess.run(torchrun + ["train.py", "--data-path", data, "--results-dir", tmp_path / "odd",
                                     *map(str, TRAIN[:-4]), "--global-batch-size", "7"], cwd=HERE, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "error: --global-batch-size 7 must be divisible by the world size 2" in out.stderr


#################################################################################
#                 Later stages: reloads, guidance, augmentation                 #
#################################################################################

def test_augment_shares_parameters_and_moves_whole_pixels():
    torch.manual_seed(0)
    x = torch.randn(64, 2, 8, 8)
    a, b = train.augment(x, x + 1, 0.0)
    assert torch.equal(a, x) and torch.equal(b, x + 1)                          # p = 0: the identity
    a, b = train.augment(x, x.clone(), 1.0)
    assert torch.equal(a, b)                                                    # one set of parameters per pair
    # Unique positive values: every output pixel is 0 (erased or vacated) or the input pixel at one whole-pixel shift
    # (dx, dy) in [0, 0.3 * 8] per sample, right and down.
    x = (torch.arange(64 * 2 * 8 * 8, dtype=torch.float32) + 1).view(64, 2, 8, 8)
    fake = x.clone().requires_grad_(True)
    a, b = train.augment(x, fake, 1.0)
    zeros, shifts = (a == 0).float().mean().item(), set()
    for n in range(64):
        kept = (a[n, 0] != 0).nonzero()
        assert len(kept), "a sample erased entirely"
        i, j = kept[0].tolist()
        flat = int(a[n, 0, i, j].item()) - 1 - n * 128                          # where the value came from
        dy, dx = i - flat // 8, j - flat % 8
        assert 0 <= dx <= 2 and 0 <= dy <= 2
        shifts.add((dx, dy))
        moved = torch.zeros(2, 8, 8)
        moved[:, dy:, dx:] = x[n, :, :8 - dy, :8 - dx]
        assert torch.equal(torch.where(a[n] != 0, moved, a[n]), a[n]) and ((a[n] == 0) | (a[n] == moved)).all()
    assert len(shifts) > 3 and 0.2 < zeros < 0.9                                # shifts vary; boxes of 10-50 % area
    b.sum().backward()
    assert ((fake.grad == 1) | (fake.grad == 0)).all() and fake.grad.sum() > 0  # differentiable in the fake sample
    p_half = train.augment(torch.ones(4000, 1, 8, 8), torch.ones(4000, 1, 8, 8), 0.4)[0]
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
    one_step = train.guidance_loss(C, x, y, None, 0.0, 0.1)                    # t' ~ U(0, 0.1), x' = (1-t')x + t'z'
    torch.manual_seed(0)
    t = 0.1 * torch.rand(3)
    x_cg = (1 - t[:, None]) * x + t[:, None] * torch.randn(3, 4)
    logp = torch.log_softmax(x_cg @ C.w + t[:, None] * C.b, 1)
    torch.testing.assert_close(one_step, -logp[torch.arange(3), y].mean())
    t = torch.tensor([0.0, 0.25, 0.5])                                          # few steps: t' = t, guided in [0, .25]
    few = train.guidance_loss(C, x, y, t, 0.0, 0.25)
    logp = torch.log_softmax(x @ C.w + t[:, None] * C.b, 1)
    torch.testing.assert_close(few, -(logp[0, 0] + logp[1, 2]) / 3)
    few.backward()
    assert x.grad[:2].abs().sum() > 0 and x.grad[2].abs().sum() == 0 and C.w.grad is None


def test_guided_g_step_trains_g_only(data):
    G, D = players("1")
    C = model.Classifier(**dict(TINY, in_channels=3, num_classes=5)).requires_grad_(False)
    opt_G = torch.optim.AdamW(G.parameters(), lr=1e-3)
    g0, d0, c0 = snapshot(G), snapshot(D), snapshot(C)
    stats = train.g_step(G, D, opt_G, train.GradNorm(), train.make_batch(train.LatentData(data), 8, "1", "cpu"),
                         velocity=False, d_time=False, ot_scale=0.2, grad_clip=50.0, aug_p=0.4, classifier=C,
                         cg_scale=0.003, cg_time=(0.0, 0.1))
    assert stats["cg"] > 0 and changed(G, g0) and not changed(D, d0) and not changed(C, c0)
    assert all(p.grad is None for p in C.parameters())


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
    expect_error("train.py", "--data-path", data, *TRAIN, "--resume", s1, "--init", s1, match="give one or the other")
    seven = dict(TINY, in_channels=3, num_classes=7)
    torch.save(dict(EMA=model.Classifier(**seven).state_dict(), config=dict(C=seven)), tmp_path / "cls7.pt")
    torch.save(dict(EMA=classifier.state_dict(), config=dict(C=seven)), tmp_path / "mixed.pt")
    expect_error("train.py", "--data-path", data, *TRAIN, "--classifier", tmp_path / "cls7.pt", match="of 7 classes")
    expect_error("train.py", "--data-path", data, *TRAIN, "--classifier", s1, match="not a classifier checkpoint")
    expect_error("train.py", "--data-path", data, *TRAIN, "--classifier", tmp_path / "mixed.pt", match="does not load")
    expect_error("train.py", "--data-path", data, *TRAIN, "--classifier", tmp_path / "no.pt", match="does not exist")


def test_a_new_stage_starts_from_the_ema_with_d_and_grad_norm_carried(data, tmp_path):
    run_script("train.py", "--data-path", data, "--results-dir", tmp_path, *TRAIN, "--max-steps", 2)
    ckpt = torch.load(tmp_path / "checkpoints" / "0000002.pt", weights_only=True)
    G, D = model.Generator(**ckpt["config"]["G"]), model.Discriminator(**ckpt["config"]["D"])
    state = dict(G=G, D=D, EMA=model.Generator(**ckpt["config"]["G"]), grad_norm=train.GradNorm(),
                 opt_G=torch.optim.AdamW(G.parameters(), lr=7e-5), opt_D=torch.optim.AdamW(D.parameters(), lr=6e-5))
    args = type("Paths", (), dict(init="stage1.pt"))
    logger = train.create_logger(None)
    assert train.begin(state, {"init": ckpt}, args, logger) == 2
    for key, source in (("G", "EMA"), ("EMA", "EMA"), ("D", "D")):
        assert all(torch.equal(v, ckpt[source][k]) for k, v in state[key].state_dict().items()), key
    assert state["grad_norm"].square_avg == ckpt["grad_norm"]["square_avg"] > 0
    assert torch.equal(state["opt_D"].state_dict()["state"][1]["exp_avg_sq"], ckpt["opt_D"]["state"][1]["exp_avg_sq"])
    assert [state[k].param_groups[0]["lr"] for k in ("opt_G", "opt_D")] == [7e-5, 6e-5]    # this command's lr


#################################################################################
#                                   Bad input                                   #
#################################################################################

def test_bad_data_directories(tmp_path):
    expect_error("train.py", "--data-path", tmp_path / "nothing", *TRAIN, match="latents.npy is missing")
    bad = make_data(tmp_path / "rank")
    np.save(os.path.join(bad, "latents.npy"), np.zeros((24, 3, 8, 8), np.float16))
    expect_error("train.py", "--data-path", bad, *TRAIN, match="must have shape (N, V, C, H, W)")
    bad = make_data(tmp_path / "labels")
    np.save(os.path.join(bad, "labels.npy"), np.zeros(23, np.int64))
    expect_error("train.py", "--data-path", bad, *TRAIN, match="but there are 24 latents")
    bad = make_data(tmp_path / "info")
    open(os.path.join(bad, "info.json"), "w").write("{not json")
    expect_error("train.py", "--data-path", bad, *TRAIN, match="cannot read the data")
    bad = make_data(tmp_path / "classes")
    np.save(os.path.join(bad, "labels.npy"), np.full(24, 9, np.int64))
    expect_error("train.py", "--data-path", bad, *TRAIN, match="labels must be in [0, 5)")


def test_bad_flags_and_checkpoints(data, tmp_path):
    with pytest.raises(SystemExit) as e:
        run_script("train.py", "--data-path", data, "--model", "Q/2")
    assert e.value.code == 2                                   # argparse: "invalid choice: 'Q/2'"
    run_script("train.py", "--data-path", data, "--results-dir", tmp_path, *TRAIN, "--max-steps", 1)
    ckpt = tmp_path / "checkpoints" / "0000001.pt"
    expect_error("train.py", "--data-path", data, "--results-dir", tmp_path / "never", *TRAIN,
                 "--resume", tmp_path / "missing.pt", match="does not exist")
    assert not (tmp_path / "never").exists()                   # a run that fails on its inputs writes nothing
    expect_error("train.py", "--data-path", data, *TRAIN, "--nfe", "2", "--resume", ckpt, match="holds another model")
    expect_error("train.py", "--data-path", data, "--model", "S/2", *TRAIN[2:], "--resume", ckpt,
                 match="holds another model")
    expect_error("sample.py", "--ckpt", ckpt, "--nfe", "2", match="holds a --nfe 1 model")
    expect_error("sample.py", "--ckpt", ckpt, "--steps", "2", match="samples in one step")
    expect_error("train.py", "--data-path", data, *TRAIN, "--precision", "bf16", match="for CUDA devices")
    for flag in ("--log-every", "--global-batch-size", "--ckpt-every"):
        with pytest.raises(SystemExit) as e:
            run_script("train.py", "--data-path", data, flag, "0")
        assert e.value.code == 2                               # argparse: "must be a positive integer"
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(ckpt.read_bytes()[:5000])
    expect_error("train.py", "--data-path", data, *TRAIN, "--resume", truncated, match="corrupt, truncated")
    expect_error("sample.py", "--ckpt", truncated, match="corrupt, truncated")
    # A pickle that would run code is refused, not executed: every load uses weights_only=True.
    marker = tmp_path / "ran"
    torch.save({"G": Exploit(str(marker))}, tmp_path / "evil.pt")
    expect_error("sample.py", "--ckpt", tmp_path / "evil.pt", match="corrupt, truncated")
    assert not marker.exists()
    # An official-style bare state dict needs --model, and must fit it.
    G = model.Generator(**dict(TINY, in_channels=4, num_classes=1000, input_size=32))
    torch.save(G.state_dict(), tmp_path / "bare.pth")
    expect_error("sample.py", "--ckpt", tmp_path / "bare.pth", match="say which network it is with --model")
    expect_error("sample.py", "--ckpt", tmp_path / "bare.pth", "--model", "S/2", match="does not fit this generator")
    expect_error("sample.py", "--ckpt", tmp_path / "bare.pth", "--model", "S/2", "--nfe", "2", "--repeat", "2",
                 match="depth repetition is for one-step generators")


class Exploit:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_errors_are_one_line_on_the_command_line(tmp_path):
    out = subprocess.run([sys.executable, "train.py", "--data-path", str(tmp_path), "--device", "cpu"], cwd=HERE,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and out.stderr.strip().count("\n") == 0 and out.stderr.startswith("error:")


def test_non_finite_loss_stops_training_and_keeps_the_last_checkpoint(tmp_path):
    bad = make_data(tmp_path / "data")
    run_script("train.py", "--data-path", bad, "--results-dir", tmp_path / "run", *TRAIN, "--max-steps", 2,
               "--ckpt-every", 2)
    rows = np.load(os.path.join(bad, "latents.npy"))
    rows[:] = np.inf
    np.save(os.path.join(bad, "latents.npy"), rows)
    expect_error("train.py", "--data-path", bad, "--results-dir", tmp_path / "run", *TRAIN, "--max-steps", 4,
                 "--ckpt-every", 2, "--resume", tmp_path / "run" / "checkpoints" / "0000002.pt",
                 match="non-finite loss at step 4")
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["0000002.pt"]


#################################################################################
#                             vae.py: the autoencoder                           #
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


#################################################################################
#                          prepare_latents.py: images to latents                #
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


def run_prepare(*argv):
    threads = torch.get_num_threads()  # prepare_latents pins CPU runs to one thread; give the rest of the suite its own
    try:
        prepare_latents.main(prepare_latents.parse_args([str(a) for a in argv]))
    finally:
        torch.set_num_threads(threads)


def error_of(*argv):
    with pytest.raises(SystemExit) as e:
        run_prepare(*argv)
    message = str(e.value.code)
    assert message.startswith("error:") and "\n" not in message, message
    return message


def test_prepare_latents_pixels_crop_flip_labels_and_skips(tmp_path):
    expected = make_image_folder(tmp_path / "images")
    run_prepare("--data-path", tmp_path / "images", "--out", tmp_path / "out", "--vae", "none",
                "--image-size", 32, "--batch-size", 3, "--num-workers", 2)
    out = tmp_path / "out"
    info = json.loads((out / "info.json").read_text())
    assert info["classes"] == ["ant", "bee", "cow"] and info["num_classes"] == 3 and info["image_size"] == 32
    assert info["num_images"] == len(expected) and info["vae"] == "none" and info["scale"] == 1.0
    assert not (out / "std.npy").exists() and not any(f.name.endswith((".partial.npy", ".tmp")) for f in out.iterdir())
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


def prepare_rank(rank, port, argv):
    torch.set_num_threads(1)  # a forked child must not enter the parent's OpenMP pool
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    prepare_latents.main(prepare_latents.parse_args(argv))
    torch.distributed.destroy_process_group()


def run_two_processes(argv):
    """What torchrun --nproc_per_node=2 does, with fork so the children need not import torch again."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [multiprocessing.get_context("fork").Process(target=prepare_rank, args=(r, port, argv)) for r in range(2)]
    [p.start() for p in procs]
    [p.join(120) for p in procs]
    [p.kill() for p in procs if p.is_alive()]
    return [p.exitcode for p in procs]


def test_prepare_latents_vae_one_vs_two_processes_and_resume(tmp_path, capsys):
    make_image_folder(tmp_path / "images")
    torch.save(tiny_vae().state_dict(), tmp_path / "tiny.pth")
    args = lambda out, *more: ["--data-path", str(tmp_path / "images"), "--out", str(tmp_path / out),
                               "--vae-weights", str(tmp_path / "tiny.pth"), "--image-size", "32", "--num-workers", "0",
                               *more]
    run_prepare(*args("one", "--batch-size", 2))
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
    assert run_two_processes(args("two", "--batch-size", "2", "--stop-after-chunks", "1")) == [1, 1]
    assert np.load(tmp_path / "two" / "status.partial.npy").nonzero()[0].tolist() == [0, 1, 4, 5]
    assert run_two_processes(args("two", "--batch-size", "2")) == [0, 0]  # resumed: the same bytes as one process
    assert {n: (tmp_path / "two" / n).read_bytes() for n in names} == one

    # Interrupted after 2 of 5 chunks, then resumed (with another --batch-size, which must not change the chunks).
    with pytest.raises(SystemExit, match="stopped after 2 chunks"):
        run_prepare(*args("resumed", "--batch-size", 2, "--stop-after-chunks", 2))
    status = np.load(tmp_path / "resumed" / "status.partial.npy")
    assert (status[:4] > 0).all() and (status[4:] == 0).all() and not (tmp_path / "resumed" / "info.json").exists()
    assert "different unfinished run (differs in image_size" in error_of(*args("resumed", "--image-size", 64))
    capsys.readouterr()
    run_prepare(*args("resumed", "--batch-size", 3))
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
    run_prepare("--data-path", tmp_path / "train-images-idx3-ubyte.gz", "--out", tmp_path / "own", "--vae", "none",
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
    run_prepare("--data-path", tmp_path / "raw-images-idx3-ubyte", "--out", tmp_path / "pad", "--vae", "none",
                "--image-size", 10, "--num-workers", 0)
    padded = np.load(tmp_path / "pad" / "latents.npy")[:, 0, 0]
    assert padded.shape == (7, 10, 10) and np.array_equal(padded[:, 2:8, 2:8], latents[:, 0, 0])
    assert (padded[:, :2] == -1).all() and (padded[:, :, 8:] == -1).all()
    # An npz of RGB images with labels, resized down as ADM crops (3 channels kept).
    rgb = rng.integers(0, 256, (5, 12, 12, 3), dtype=np.uint8)
    np.savez(tmp_path / "rgb.npz", arr_0=rgb, labels=np.arange(5))
    run_prepare("--data-path", tmp_path / "rgb.npz", "--out", tmp_path / "npz", "--vae", "none", "--image-size", 6,
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
    assert "no labels for" in error_of("--data-path", tmp_path / "lonely-images-idx3-ubyte", "--out", tmp_path / "x",
                                       "--vae", "none")
    (tmp_path / "bad-images-idx3-ubyte").write_bytes(b"\0\0\x08\x03" + b"\0" * 5)
    write_idx(tmp_path / "bad-labels-idx1-ubyte", labels)
    assert "not an IDX file" in error_of("--data-path", tmp_path / "bad-images-idx3-ubyte", "--out", tmp_path / "x",
                                         "--vae", "none")
    np.savez(tmp_path / "nolabels.npz", arr_0=rgb)
    assert "labels" in error_of("--data-path", tmp_path / "nolabels.npz", "--out", tmp_path / "x", "--vae", "none")


def test_prepare_latents_already_done_and_bad_inputs(tmp_path, capsys):
    make_image_folder(tmp_path / "images")
    base = ["--data-path", tmp_path / "images", "--out", tmp_path / "out", "--image-size", 32, "--num-workers", 0]
    run_prepare(*base, "--vae", "none")
    run_prepare(*base, "--vae", "none")
    assert "already done: 8 images" in capsys.readouterr().out
    assert "different finished run" in error_of(*base, "--vae", "none", "--image-size", 64)
    os.remove(tmp_path / "images" / "bee" / "broken.jpg")  # all good: staging arrays are renamed, not compacted
    run_prepare(*base[:2], "--out", tmp_path / "clean", *base[4:], "--vae", "none")
    for name in ("latents.npy", "labels.npy"):
        assert (tmp_path / "clean" / name).read_bytes() == (tmp_path / "out" / name).read_bytes()
    assert (tmp_path / "clean" / "skipped.txt").read_text() == ""
    assert "--vae-weights" in error_of(*base)
    assert "VAE weights not found" in error_of(*base, "--vae-weights", tmp_path / "missing.pth")
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "classifier.pth")
    assert "unexpected keys [fc.weight]" in error_of(*base, "--vae-weights", tmp_path / "classifier.pth")
    os.makedirs(tmp_path / "empty")
    assert "no images" in error_of("--data-path", tmp_path / "empty", "--out", tmp_path / "o2", "--vae", "none")
    os.makedirs(tmp_path / "flat")
    Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "x.png")  # images but no class folders
    assert "no images" in error_of("--data-path", tmp_path / "flat", "--out", tmp_path / "o3", "--vae", "none")
    os.makedirs(tmp_path / "images" / "dog")  # a class folder with nothing in it
    assert "without images" in error_of(*base[:2], "--out", tmp_path / "o4", "--vae", "none")

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
    run_prepare(*argv("clean"))
    out, room = tmp_path / "full", [0]

    def no_space(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def fallocate(fd, offset, length):  # finds room for room[0] more files
        room[0] -= 1
        if room[0] < 0:
            no_space()

    # Creating the staging arrays (latents, then status): nothing is left behind, not even run.json.
    monkeypatch.setattr(os, "posix_fallocate", fallocate, raising=False)
    room[0] = 1
    assert error_of(*argv("full")) == f"error: cannot write {out}/status.partial.npy: No space left on device"
    assert out_files(out) == []
    # Compacting the staging arrays to the good rows: no temporary file is left, the run stays resumable.
    room[0] = 2
    assert error_of(*argv("full")) == f"error: cannot write {out}/latents.npy: No space left on device"
    assert out_files(out) == ["latents.partial.npy", "run.json", "skipped.txt", "status.partial.npy"]
    # A plain write (labels.npy, through np.save).
    monkeypatch.undo()
    monkeypatch.setattr(np, "save", no_space)
    assert error_of(*argv("full")) == f"error: cannot write {out}/labels.npy: No space left on device"
    assert not any(name.endswith(".tmp") for name in os.listdir(out)) and not (out / "info.json").exists()
    monkeypatch.undo()
    run_prepare(*argv("full"))  # room again: the same command finishes the run, as if nothing had happened
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
            run_prepare(*base, flag, value)
        assert e.value.code == 2 and not (tmp_path / "out").exists(), (flag, value)
        err = capsys.readouterr().err
        assert f"error: argument {flag}" in err or f"error: {flag}" in err, err
    assert 1 <= prepare_latents.parse_args(["--benchmark"]).num_workers <= min(8, os.cpu_count())
    (tmp_path / "file").write_text("")
    assert error_of(*base[:2], "--out", tmp_path / "file", "--vae", "none") == \
        f"error: --out {tmp_path / 'file'} is a file, not a folder"


def test_prepare_latents_damaged_records_are_one_line(tmp_path):
    np.savez(tmp_path / "x.npz", arr_0=np.zeros((4, 8, 8), np.uint8), labels=np.arange(4))
    argv = ["--data-path", tmp_path / "x.npz", "--out", tmp_path / "out", "--vae", "none", "--num-workers", 0]
    run_prepare(*argv)
    for text in ("{\"num_classes\": 4, ", "[1, 2]", "\xff\xfe"):
        (tmp_path / "out" / "info.json").write_bytes(text.encode("latin-1"))
        assert error_of(*argv) == f"error: {tmp_path}/out/info.json is damaged: delete it to start this run over, " \
                                  "or use another --out"
    os.remove(tmp_path / "out" / "info.json")
    run_prepare(*argv)  # as the message says
    # An unfinished run: run.json damaged, or written by a version that recorded --batch-size 0.
    with pytest.raises(SystemExit, match="stopped after 1 chunks"):
        run_prepare(*argv[:2], "--out", tmp_path / "part", *argv[4:], "--batch-size", 1, "--stop-after-chunks", 1)
    run = json.loads((tmp_path / "part" / "run.json").read_text())
    for text in ("not json", json.dumps(dict(run, chunk_size=0))):
        (tmp_path / "part" / "run.json").write_text(text)
        assert "part/run.json is damaged: delete it to start this run over" in \
            error_of(*argv[:2], "--out", tmp_path / "part", *argv[4:])
    (tmp_path / "part" / "run.json").write_text(json.dumps(run))
    os.remove(tmp_path / "part" / "latents.partial.npy")  # a staging array deleted by hand
    assert "delete" in error_of(*argv[:2], "--out", tmp_path / "part", *argv[4:])


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
    run_prepare("--data-path", tmp_path / "images", "--out", tmp_path / "out", "--vae", "none", "--num-workers", 0,
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
    message = error_of(*argv)
    assert message.startswith("error: none of the 3 images could be decoded (the first, a/x.png: ") and \
        message.endswith(f"all reasons in {tmp_path}/out/skipped.txt)")
    assert out_files(tmp_path / "out") == ["skipped.txt"]  # and the next run starts over
    assert len((tmp_path / "out" / "skipped.txt").read_text().splitlines()) == 3
    for name in ("a/x.png", "a/y.jpg", "b/z.png"):  # fixed: the same command starts over and decodes them
        Image.new("RGB", (8, 8)).save(tmp_path / "images" / name)
    run_prepare(*argv)
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
        assert match in error_of("--data-path", tmp_path / name, "--out", tmp_path / "out", "--vae", "none"), name
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
    run_prepare(*argv)
    run_prepare(*argv[:2], "--out", tmp_path / "ref", *argv[4:-1], 200)
    names = ["latents.npy", "labels.npy", "info.json", "skipped.txt"]
    assert out_files(tmp_path / "out") == sorted(names)
    assert all((tmp_path / "out" / n).read_bytes() == (tmp_path / "ref" / n).read_bytes() for n in names)


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
    assert error_of("--benchmark", "--vae-weights", tmp_path / "evil.pth").startswith(
        f"error: {tmp_path / 'evil.pth'}: cannot read VAE weights (corrupt, or a pickle that would run code); get ")


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


def _fid_cli(*args, torchrun=False):
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if torchrun else []
    # One thread per process: two torchrun ranks, or a busy machine, would otherwise oversubscribe 2 cores.
    return subprocess.run([sys.executable, *launcher, os.path.join(HERE, "fid.py"), *map(str, args)],
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
    pool, logits = model(fx["imgs256"], return_logits=True)
    torch.testing.assert_close(pool, fx["pool256"], rtol=1e-4, atol=1e-4 * fx["pool256"].abs().max().item())
    torch.testing.assert_close(logits, fx["logits256"], rtol=1e-4, atol=1e-4 * fx["logits256"].abs().max().item())
    torch.testing.assert_close(model(fx["imgs256"][1:]), pool[1:], rtol=1e-5, atol=1e-5)  # pool alone, one image

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
    try:
        fid.frechet_distance(mu1, sigma1, mu2[:-1], sigma2[:-1, :-1])
        raise AssertionError("mismatched statistics were accepted")
    except ValueError:
        pass


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


def test_fid_inputs(tmp_path):
    a = _fid_images(5, seed=4, size=8)
    np.savez(tmp_path / "plain.npz", arr_0=a)
    np.savez_compressed(tmp_path / "compressed.npz", arr_0=a)
    plain, compressed = fid.open_input(str(tmp_path / "plain.npz")), fid.open_input(str(tmp_path / "compressed.npz"))
    assert isinstance(plain, np.memmap) and np.array_equal(plain, a) and np.array_equal(compressed, a)
    batches = list(fid.iterate_images(plain, 3, start=1, stop=5))
    assert [tuple(x.shape) for x in batches] == [(3, 3, 8, 8), (1, 3, 8, 8)] and batches[0].dtype == torch.uint8
    assert np.array_equal(torch.cat(batches).permute(0, 2, 3, 1).numpy(), a[1:5])
    np.savez(tmp_path / "both.npz", arr_0=a, mu=np.zeros(3), sigma=np.eye(3))
    assert isinstance(fid.open_input(str(tmp_path / "both.npz")), tuple)  # statistics win, as in ADM's evaluator
    mu, sigma = fid.compute_stats(str(tmp_path / "both.npz"), model=None)  # no network needed for statistics
    assert np.array_equal(mu, np.zeros(3)) and np.array_equal(sigma, np.eye(3))

    # A folder (searched recursively, sorted) may mix sizes and modes: batches split where the size changes.
    os.makedirs(tmp_path / "f" / "sub")
    Image.fromarray(a[0]).save(tmp_path / "f" / "0.png")
    Image.fromarray(a[1]).save(tmp_path / "f" / "1.png")
    Image.fromarray(a[2, :6, :4, 0]).save(tmp_path / "f" / "sub" / "2.png")  # grayscale 6x4
    files = fid.open_input(str(tmp_path / "f"))
    batches = list(fid.iterate_images(files, 4))
    assert [tuple(x.shape) for x in batches] == [(2, 3, 8, 8), (1, 3, 6, 4)]
    assert np.array_equal(batches[0].permute(0, 2, 3, 1).numpy(), a[:2])
    assert all(np.array_equal(batches[1][0, c].numpy(), a[2, :6, :4, 0]) for c in range(3))


def test_fid_cli(tmp_path):
    weights, a = _fid_weights_file(), _fid_images(4, seed=0)
    np.savez(tmp_path / "a.npz", arr_0=a)
    os.makedirs(tmp_path / "a")
    for i, image in enumerate(a):
        Image.fromarray(image).save(tmp_path / "a" / f"{i:03d}.png")

    # Statistics only (no REF): IS and the saved mu / sigma, which are np.mean / np.cov of the model's features.
    run = _fid_cli(tmp_path / "a.npz", "--inception", weights, "--batch-size", 3, "--is",
                   "--save-stats", tmp_path / "a_stats.npz")
    assert run.returncode == 0, run.stderr
    is_a = _fid_value(run.stdout, "IS")
    model = fid.InceptionV3().eval()
    model.load_state_dict(_fid_state_dict())
    with torch.no_grad():
        pool, logits = model(torch.from_numpy(a).permute(0, 3, 1, 2), return_logits=True)
    assert math.isclose(is_a, fid.inception_score(logits), rel_tol=1e-4)
    feats = pool.double().numpy()
    sigma = np.cov(feats, rowvar=False)  # float32 features differ ~1e-6 across thread and batch counts
    with np.load(tmp_path / "a_stats.npz") as saved:
        np.testing.assert_allclose(saved["mu"], feats.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(saved["sigma"], sigma, rtol=1e-4, atol=1e-4 * np.abs(sigma).max())

    # torchrun shards a folder of the same images across two ranks (gloo); the summed statistics and gathered
    # logits match one process only if the folder gives the same pixels and every image counts exactly once.
    run = _fid_cli(tmp_path / "a", "--inception", weights, "--is", "--device", "cpu",
                   "--save-stats", tmp_path / "a_folder_stats.npz", torchrun=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("IS:") == 1 and math.isclose(_fid_value(run.stdout, "IS"), is_a, rel_tol=1e-4)
    with np.load(tmp_path / "a_folder_stats.npz") as saved:
        np.testing.assert_allclose(saved["mu"], feats.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(saved["sigma"], sigma, rtol=1e-4, atol=1e-4 * np.abs(sigma).max())

    # Two statistics files need no weights (small ones here: the 2048-dim eigensolves are slow on 2 cores).
    rng = np.random.default_rng(3)
    for name in ("s1.npz", "s2.npz"):
        x = rng.standard_normal((40, 16))
        np.savez(tmp_path / name, mu=x.mean(0), sigma=np.cov(x, rowvar=False), arr_0=a)  # mu/sigma win over arr_0
    run = _fid_cli(tmp_path / "s1.npz", tmp_path / "s2.npz")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1].startswith("FID: ")
    s1, s2 = (fid.open_input(str(tmp_path / name)) for name in ("s1.npz", "s2.npz"))
    expected = fid.frechet_distance(*s1, *s2)
    assert abs(_fid_value(run.stdout, "FID") - expected) < 1e-4


def test_fid_cli_user_errors(tmp_path):
    np.savez(tmp_path / "a.npz", arr_0=_fid_images(2, seed=0))
    run = _fid_cli(tmp_path / "a.npz", tmp_path / "a.npz", "--inception", tmp_path / "missing.pth")
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and run.stderr.startswith("error:")
    assert "missing.pth" in run.stderr and "weights-inception-2015-12-05-6726825d.pth" in run.stderr  # where to get it
    # Inputs the CLI turns into one "error: ..." line the same way.
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((2, 8, 8, 3), np.float32))
    (tmp_path / "text.npz").write_text("not a zip")
    for path, words in (("float.npz", "uint8"), ("text.npz", "text.npz"), ("nowhere.npz", "not found")):
        try:
            fid.open_input(str(tmp_path / path))
            raise AssertionError(f"{path} was accepted")
        except (ValueError, FileNotFoundError) as e:
            assert words in str(e)



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
    run_script("fid.py", tmp_path / "s.npz", ref, "--inception", weights)
    offline = float(capsys.readouterr().out.strip().splitlines()[-1].split()[1])
    assert float(logged[0].split("FID-5")[1].split()[0]) == pytest.approx(offline, rel=1e-3)
    expect_error("train.py", "--data-path", data, *TRAIN, "--fid-every", 2, match="needs --fid-ref")


#################################################################################
#                        toy.py: the 1-D quick start                            #
#################################################################################

def test_toy_trains_and_writes_outputs(tmp_path):
    for nfe in (1, 2):                                        # one-step and velocity (D conditioned on t) paths
        out = tmp_path / f"nfe{nfe}"
        results, maps = toy.main(nfe=nfe, steps=3, seed=0, out_dir=str(out))
        assert set(results) == {"afm", "gan", "fm"}
        for r in results.values():
            assert r["stats"] and all(math.isfinite(v) for v in r["stats"].values())
            assert all(math.isfinite(r[k]) and r[k] >= 0 for k in ("w1", "map_err", "seed_shift"))
        assert results["gan"]["stats"]["ot"] == 0.0 and results["afm"]["stats"]["ot"] > 0.0  # GAN: lambda_ot = 0
        with np.load(out / "toy.npz") as f:
            assert {"z", "afm", "gan", "fm"} <= set(f.files)
            assert f["z"].ndim == 1 and len(f["z"]) > 100 and np.all(np.diff(f["z"]) > 0)
            for name in ("afm", "gan", "fm"):
                assert f[name].shape == f["z"].shape and np.all(np.isfinite(f[name]))
                np.testing.assert_array_equal(f[name], maps[name])
        with Image.open(out / "toy.png") as im:
            assert im.format == "PNG" and im.size == (3 * toy.PANEL_W, toy.PANEL_H)
            im.load()
        assert sorted(p.name for p in out.iterdir()) == ["toy.npz", "toy.png"]   # no temp files left behind


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


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
