"""
The test suite: CPU only, tiny models, a few minutes on 2 cores.

    python -m pytest -q test_smoke.py
    python test_smoke.py

Reference vectors live in fixtures/ (see fixtures/README.md for how each was made); the networks' weights are
rebuilt from (key, shape) lists by fill() below, so the fixtures stay small.
"""
import json
import math
import os
import runpy
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import model
import train

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
    args = type("A", (), dict(ot_schedule="cosine", ot_scale=0.2, ot_scale_end=0.005, ot_decay_steps=101))
    assert train.ot_scale_at(0, args) == pytest.approx(0.2)
    assert train.ot_scale_at(50, args) == pytest.approx(0.1025)
    assert train.ot_scale_at(100, args) == train.ot_scale_at(10**6, args) == 0.005
    args.ot_schedule = "constant"
    assert train.ot_scale_at(10**6, args) == 0.2


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
    args = type("A", (), dict(nfe="2", precision="fp32", gp_scale=0.25, gp_eps=0.01, gp_ratio=0.25, cp_scale=0.01,
                              grad_clip=5.0, ema_decay=0.9))
    G, D = players("2")
    EMA = model.Generator(**dict(TINY, in_channels=3, num_classes=5), use_t_src=True)
    EMA.load_state_dict(G.state_dict())
    opt_G, opt_D = torch.optim.AdamW(G.parameters(), lr=1e-3), torch.optim.AdamW(D.parameters(), lr=1e-3)
    d = train.LatentData(data)
    g0, d0, e0 = snapshot(G), snapshot(D), snapshot(EMA)
    stats = train.d_step(G, D, opt_D, train.make_batch(d, 8, "2", "cpu"), args)
    assert not changed(G, g0) and changed(D, d0) == set(d0) - {"pos_embed"}
    assert all(torch.isfinite(v) for v in stats.values())
    d1, d_grads = snapshot(D), [None if p.grad is None else p.grad.clone() for p in D.parameters()]
    stats = train.g_step(G, D, opt_G, train.GradNorm(), train.make_batch(d, 8, "2", "cpu"), args, ot_scale=0.25)
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
    for key in ("loss_d", "loss_g", "r1", "r2", "cp", "ot", "logits_real", "logits_fake", "grad_norm_d",
                "grad_norm_g", "ot_scale", "lr", "img/s"):
        assert math.isfinite(float(values[key])), key
    ckpt = torch.load(tmp_path / "checkpoints" / "0000003.pt", weights_only=True)
    assert ckpt["step"] == 3 and ckpt["args"]["model"] == "T/2" and ckpt["grad_norm"]["square_avg"] > 0
    repeat = 2 if "--repeat" in mode else 1
    assert ckpt["opt_G"]["param_groups"][0]["lr"] == pytest.approx(1e-4 / repeat)
    assert ckpt["args"]["grad_clip"] == (50.0 if mode == ["--nfe", "1"] else 5.0)


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
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29733"]
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
    expect_error("train.py", "--data-path", data, *TRAIN, "--resume", tmp_path / "missing.pt", match="does not exist")
    expect_error("train.py", "--data-path", data, *TRAIN, "--nfe", "2", "--resume", ckpt, match="holds another model")
    expect_error("train.py", "--data-path", data, "--model", "S/2", *TRAIN[2:], "--resume", ckpt,
                 match="holds another model")
    expect_error("sample.py", "--ckpt", ckpt, "--nfe", "2", match="holds a --nfe 1 model")
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


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
