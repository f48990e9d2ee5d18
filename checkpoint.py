"""
Checkpoints: loading them safely, a run's start (--resume, or --init and --init-d for a new stage), saving them with
every rank's RNG states, and the loaders of the generators and classifiers of this project's checkpoints and of the
official release's .pth files. Nothing here is run directly.
"""
import contextlib
import glob
import json
import math
import os
import time

import torch
import torch.distributed as dist

from common import (check_in_sync, check_input, check_output, check_room, claim, fail, save_atomic, save_curves,
                    temporary)
from data import IDENTITY, data_differences
from model import (SIT_FLAGS, SIZES, Classifier, Discriminator, Generator, cafm_discriminator_kwargs, default_steps,
                   mode_flags)
from vae import SCALE

#################################################################################
#                           Checkpoints and resume                              #
#################################################################################

def load_checkpoint(path):
    """Loads an untrusted checkpoint file safely (tensors and primitives only), or ends with one clear line."""
    check_input(path, "checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # mmap: no copy of unused parts
    except Exception as e:  # a truncated zip, random bytes or a pickle with code all end here
        fail(f"cannot read checkpoint {path} (corrupt, truncated or not a checkpoint): {type(e).__name__}")


def load_weights(module, state, path, hint=""):
    """module.load_state_dict(state, strict=True), or one line naming what does not fit: the one way a mismatch of
    keys or shapes is reported."""
    try:
        if isinstance(module, torch.optim.Optimizer):
            module.load_state_dict(state)
        else:
            module.load_state_dict(state, strict=True)
    except (RuntimeError, KeyError, TypeError, ValueError, AttributeError) as e:
        detail = " ".join(str(e).split()).split(": ", 1)[-1]   # without "Error(s) in loading state_dict for X:"
        fail(f"{path} does not load into this {type(module).__name__}: {detail[:240]}{hint}")


def load_training_checkpoint(path, config):
    """A whole training checkpoint (of train.py, twinflow.py, train_classifier.py or judge.py) of this very network
    configuration, or one clear line."""
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("config"), dict) or "step" not in ckpt:
        fail(f"{path} is not a training checkpoint of this project")
    if "rng" not in ckpt:
        fail(f"{path} holds a generator alone (sample.py --save-generator); continuing needs a training checkpoint")
    if set(ckpt["config"]) != set(config):
        kind = lambda c: ("a classifier" if "C" in c else "a judge (judge.py)" if "J" in c else "a TwinFlow network" if
                          "F" in c else "CAFM's networks" if "method" in c else "an autoencoder (train_ae.py)" if "AE"
                          in c else "a generator and a discriminator")
        fail(f"{path} holds {kind(ckpt['config'])}, and this run trains {kind(config)}")
    if ckpt["config"] != config:
        flat = lambda c: {f"{k}.{j}" if isinstance(v, dict) else k: w
                          for k, v in c.items() for j, w in (v.items() if isinstance(v, dict) else [(k, v)])}
        old, new = flat(ckpt["config"]), flat(config)
        diffs = [f"{k} {old.get(k)} (asked: {new.get(k)})" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        fail(f"{path} holds another network than this run asks for: {', '.join(diffs[:4])}")
    return ckpt


def load_starts(args, config, max_steps, data_info):
    """The checkpoints a run starts from, read before the run writes anything: --resume (the exact continuation of a
    run, on the same data), or --init (a new stage from a run's last checkpoint) and --init-d (D from an earlier one).
    Scripts without --init or --init-d have --resume alone. Then rank 0 claims --results-dir, and every rank checks it.
    """
    flags = {key: getattr(args, key, None) for key in ("resume", "init", "init_d")}
    if flags["resume"] and (flags["init"] or flags["init_d"]):
        fail("--resume continues a run exactly; --init and --init-d start a new stage: give one or the other")
    starts = {key: load_training_checkpoint(path, config) for key, path in flags.items() if path}
    if start_step(starts) >= max_steps:
        fail(f"the checkpoint is at step {start_step(starts)}, already at --max-steps {max_steps}: ask for more steps")
    differ = data_differences(starts.get("resume", {}).get("data_info", {}), data_info, IDENTITY)
    if differ:
        hint = "; a new stage on other data starts with --init" if hasattr(args, "init") else ""
        fail(f"--resume {args.resume} was trained on other data than --data-path {args.data_path}: "
             f"{', '.join(differ)}{hint}")
    if not dist.is_initialized() or dist.get_rank() == 0:
        claim(args.results_dir, "--results-dir", folder=True)
        for tmp in glob.glob(temporary(os.path.join(args.results_dir, "checkpoints", "*.pt"))):  # a killed writer's
            os.remove(tmp)
    check_results_dir(args.results_dir, args.resume)
    if dist.is_initialized():
        dist.barrier()                                         # every rank has checked it before rank 0 writes
    return starts


def start_step(starts):
    return starts.get("resume", starts.get("init", {})).get("step", 0)


def check_results_dir(results_dir, resume):
    """A run never overwrites another: a results directory that holds a run takes only a --resume of that run."""
    check_output(results_dir, "--results-dir", folder=True)
    ckpts = os.path.join(results_dir, "checkpoints")
    holds_run = bool(glob.glob(os.path.join(ckpts, "*.pt")))   # a run that never saved a checkpoint may be redone
    this_run = resume and os.path.isdir(ckpts) and os.path.samefile(os.path.dirname(os.path.abspath(resume)), ckpts)
    if holds_run and not this_run:
        fail(f"{results_dir} already holds a run: continue it with --resume {ckpts}/<last>.pt, or give a fresh "
             f"--results-dir")


def restore_state(state, starts, args, logger, data_info=None, init_from="EMA"):
    """Loads the starting checkpoints into `state` (name -> module or optimizer) and returns the step to start from.
    --resume restores everything. --init starts a stage as the paper does (Table 11): G from the previous stage's EMA
    (init_from), and the EMA, D, both optimizers and the gradient normalisation carried over (its running scale too:
    restarted from zero it would make the first G steps ~3x too large). --init-d then takes D and its optimizer from
    an earlier checkpoint (App. C). The optimizers keep this command's lr, betas, eps and weight decay. A start from
    other data than data_info's is noted in the log."""
    hyper = {key: {k: opt.param_groups[0][k] for k in ("lr", "betas", "eps", "weight_decay")}
             for key, opt in state.items() if isinstance(opt, torch.optim.Optimizer)}
    paths = {key: getattr(args, key) for key in starts}
    for key, source in (("resume", None), ("init", init_from)):
        for name, module in state.items() if key in starts else ():
            load_weights(module, starts[key][source if name == "G" and source else name], paths[key])
    if "init_d" in starts:
        for name in ("D", "opt_D"):
            load_weights(state[name], starts["init_d"][name], paths["init_d"])
    for key, values in hyper.items():
        state[key].param_groups[0].update(values)
    for key, ckpt in starts.items():
        differ = data_differences(ckpt.get("data_info", {}), data_info or {}, IDENTITY)
        logger.info(f"--{key.replace('_', '-')} {getattr(args, key)} (step {ckpt['step']})" +
                    (f"; note: trained on other data than --data-path ({', '.join(differ)})" if differ else ""))
    return start_step(starts)


def start_state(state, starts, args, logger, data_info, device):
    """A trainer's start: the starting checkpoints loaded into `state` (restore_state), RESULTS/checkpoints made (the
    trainer checked its disk's room for a checkpoint, check_checkpoint_room, before it wrote anything: a run that could
    not save fails and leaves nothing), every rank's RNG streams set (restore_rng).
    Returns the step to start from and the generator of the batch reader's draws."""
    start = restore_state(state, starts, args, logger, data_info)
    if not dist.is_initialized() or dist.get_rank() == 0:
        os.makedirs(os.path.join(args.results_dir, "checkpoints"), exist_ok=True)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    return start, restore_rng(starts.get("resume"), args.global_seed, rank, world, start, device)


def check_checkpoint_room(state, results_dir, what="a checkpoint of this run"):
    """On rank 0, one line when the disk has no room for the next checkpoint of `state`: about the size of the last
    one, or before the first the state's tensors (Adam's two moments per parameter counted before the first step
    makes them). Trainers call it before they write anything, so a run that could not save fails at once and leaves
    nothing behind."""
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    last = sorted(glob.glob(os.path.join(results_dir, "checkpoints", "*.pt")))
    check_room(results_dir, os.path.getsize(last[-1]) if last else state_bytes(state),
               what + (f" (the last is {last[-1]})" if last else ""))


def state_bytes(state):
    total = 0
    for m in state.values():
        if isinstance(m, torch.optim.Optimizer):
            moments = [v for s in m.state.values() for v in s.values() if torch.is_tensor(v)]
            total += sum(t.nbytes for t in moments) or 2 * sum(p.nbytes for g in m.param_groups for p in g["params"])
        else:
            total += sum(t.nbytes for t in m.state_dict().values())
    return total


def save_checkpoint(state, step, args, config, data_info, device, logger, *, data_rng=None):
    """The modules in `state`, the step, the command, the networks' config, the data's info and every rank's RNG
    states (with data_rng, the state of the batch reader's generator after the last batch the loop took). A disk
    without room for it ends the run in one line before anything is written."""
    path = os.path.join(args.results_dir, "checkpoints", f"{step:07d}.pt")
    check_checkpoint_room(state, args.results_dir, f"the checkpoint of step {step}")
    ckpt = dict({k: m.state_dict() for k, m in state.items()}, step=step, args=vars(args), config=config,
                data_info=data_info, rng=gather_rng_states(device, data_rng))
    if not dist.is_initialized() or dist.get_rank() == 0:
        with save_atomic(path) as tmp, open(tmp, "wb") as f:
            torch.save(ckpt, f)                                # a Python file: a full disk raises OSError, not torch's
        logger.info(f"saved {path}")
    if dist.is_initialized():
        dist.barrier()
    return path


def gather_rng_states(device, data_rng=None):
    """Every rank's RNG states, so a resumed run draws exactly the batches and noise it would have drawn."""
    state = dict(cpu=torch.get_rng_state(), cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                 data=data_rng)
    if not dist.is_initialized():
        return [state]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


def restore_rng(ckpt, seed, rank, world, step, device):
    """Per-rank streams of batches and noise: a resumed checkpoint's when the world size is the same, else fresh
    ones for this step (a new stage, or another world size). Returns the generator of a BatchReader's draws, seeded
    apart from the global one (which draws D's R1/R2 noise and the augmentation on the CPU)."""
    base = seed * world + rank
    torch.manual_seed(base)
    data_rng = torch.Generator().manual_seed(base + 2 ** 32)
    if ckpt is not None and len(ckpt["rng"]) == world:
        torch.set_rng_state(ckpt["rng"][rank]["cpu"])
        if device.type == "cuda" and ckpt["rng"][rank]["cuda"] is not None:
            torch.cuda.set_rng_state(ckpt["rng"][rank]["cuda"], device)
        if ckpt["rng"][rank].get("data") is not None:
            data_rng.set_state(ckpt["rng"][rank]["data"])
    elif step > 0:
        torch.manual_seed(base * 1_000_003 + step)
        data_rng.manual_seed(base * 1_000_003 + step + 2 ** 32)
    return data_rng


#################################################################################
#                         The tail of every training loop                       #
#################################################################################

class LoopTail:
    """What every trainer does after each step: running means of the step's statistics (since the last log line, over
    all ranks), a log line every --log-every steps, and a checkpoint every --ckpt-every steps, at the last step and
    when a signal asks to stop (StopOnSignal: the checkpoint, then the exit). The means are checked before every
    checkpoint: a non-finite one ends the run in one line naming the last good checkpoint, and none holds non-finite
    weights. The checkpoints keep the reader's RNG state (BatchReader.state).
    Rank 0 also keeps RESULTS/scalars.jsonl, one JSON record a log line ({"step": N, each mean, each extra scalar,
    "img_per_s": ...}, flushed as it is written; a resumed run first drops the records after its start), and draws it
    at every checkpoint into RESULTS/curves.png: a panel per (title, [keys], log scale) of `curves`."""
    def __init__(self, stop, state, args, config, data_info, device, logger, max_steps, images_per_step, reader=None,
                 curves=()):
        self.stop, self.state, self.args, self.config, self.data_info = stop, state, args, config, data_info
        self.device, self.logger, self.max_steps, self.reader = device, logger, max_steps, reader
        self.images_per_step, self.curves, self.started = images_per_step, curves, False
        self.sums, self.counts, self.count, self.tic = {}, {}, 0, time.time()
        rank0 = not dist.is_initialized() or dist.get_rank() == 0
        self.scalars = os.path.join(args.results_dir, "scalars.jsonl") if rank0 else None

    def __call__(self, step, stats, scalars=None):
        """After step `step` (from 0) with its statistics (scalar tensors; each is averaged over the steps that report
        it) and the loop's own `scalars` (numbers such as the lr, logged as they are). Returns the number of steps
        done."""
        done, scalars = step + 1, scalars or {}
        if not self.started and self.scalars and os.path.isfile(self.scalars):  # the run as it stands from `step` on
            kept = [r for r in read_scalars(self.scalars) if r["step"] <= step]
            with save_atomic(self.scalars) as tmp, open(tmp, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
        self.started = True
        for k, v in stats.items():
            self.sums[k], self.counts[k] = self.sums.get(k, 0) + v.float(), self.counts.get(k, 0) + 1
        self.count += 1
        log_now = done % self.args.log_every == 0 or done == self.max_steps
        ckpt_now = done % self.args.ckpt_every == 0 or done == self.max_steps
        signum = self.stop.requested()
        if log_now or ckpt_now or signum:                      # no checkpoint of non-finite weights
            means = self.finite_means(done)
        if log_now:
            images = self.images_per_step * self.count / (time.time() - self.tic)
            self.logger.info(f"step {done:07d} " + " ".join(f"{k} {v:.4f}" for k, v in means.items()) +
                             "".join(f" {k} {v:.4g}" for k, v in scalars.items()) + f" img/s {images:.1f}")
            if self.scalars:
                with open(self.scalars, "a") as f:
                    f.write(json.dumps(dict(step=done, **means, **scalars, img_per_s=images)) + "\n")
            self.sums, self.counts, self.count, self.tic = {}, {}, 0, time.time()
        if ckpt_now or signum:
            data_rng = self.reader.state if self.reader is not None else None
            path = save_checkpoint(self.state, done, self.args, self.config, self.data_info, self.device, self.logger,
                                   data_rng=data_rng)
            if self.scalars:
                records = read_scalars(self.scalars)
                save_curves(os.path.join(self.args.results_dir, "curves.png"),
                            [(title, {k: [(r["step"], r[k]) for r in records if k in r] for k in keys}, log)
                             for title, keys, log in self.curves])
        if signum:
            self.stop.exit(signum, done, path, self.logger)
        return done

    def finish(self, models):
        """The end of the run: the reader stopped, and every rank must hold the same weights of `models`."""
        if self.reader is not None:
            self.reader.close()
        check_in_sync(models, self.device, dist.get_world_size() if dist.is_initialized() else 1, self.logger)
        self.logger.info("done")

    def finite_means(self, step):
        """The statistics averaged over the steps since the last log line and over the ranks; a non-finite one stops
        the run."""
        keys = sorted(self.sums)
        values = torch.stack([self.sums[k] / self.counts[k] for k in keys])
        if dist.is_initialized():
            dist.all_reduce(values, op=dist.ReduceOp.AVG)
        means = dict(zip(keys, values.tolist()))
        if not all(math.isfinite(v) for v in means.values()):
            ckpts = sorted(glob.glob(os.path.join(self.args.results_dir, "checkpoints", "*.pt")))
            fail(f"non-finite loss at step {step} ({', '.join(f'{k} {v:.4g}' for k, v in means.items())}); " +
                 (f"the last good checkpoint is {ckpts[-1]}" if ckpts else "no checkpoint was written before it"))
        return means


def read_scalars(path):
    """The records of a scalars.jsonl, less a last line that a killed job left cut short."""
    records = []
    with open(path) as f:
        for line in f:
            with contextlib.suppress(ValueError):
                records.append(json.loads(line))
    return records


#################################################################################
#                   Generators and classifiers, ours and official               #
#################################################################################

# The official release's .pth files are bare state dicts of networks on ImageNet 256 latents of the SD VAE.
OFFICIAL_DATA = dict(vae="sd-vae-ft-mse", scale=SCALE, num_classes=1000)              # as info.json would say
OFFICIAL_SHAPE = dict(input_size=32, in_channels=4, num_classes=1000)


def is_state_dict(ckpt):
    return isinstance(ckpt, dict) and bool(ckpt) and all(isinstance(v, torch.Tensor) for v in ckpt.values())


def load_generator(path, model=None, nfe=None, repeat=None, weights="EMA", ckpt=None):
    """(Generator, its default number of sampling steps, data info) from a training checkpoint (its config decides the
    network; TwinFlow's is an any-step generator that samples in one step by default) or from an official release
    .pth (a bare state dict for ImageNet-256 latents; --model, --nfe and --repeat say which network it is: the keys of
    few-step and repeated generators are the same, so only a wrong size can be caught there). `ckpt`: the file's
    contents where the caller has already loaded them."""
    ckpt = load_checkpoint(path) if ckpt is None else ckpt
    if isinstance(ckpt, dict) and "config" in ckpt:
        config, info = ckpt["config"], ckpt.get("data_info", {})
        net = "F" if "F" in config else "G"
        if net not in config or weights not in ckpt:
            fail(f"{path} holds no {weights} generator (" + ("a classifier checkpoint" if "C" in config else
                 "a generator alone, as sample.py --save-generator writes it: its EMA") + ")")
        trained = dict(model=ckpt["args"]["model"], nfe=config["nfe"], repeat=config[net].get("repeat", 1))
        for key, value in dict(model=model, nfe=nfe, repeat=repeat).items():
            if value is not None and value != trained[key]:
                fail(f"{path} holds a --{key} {trained[key]} model, not --{key} {value}")
        kwargs, state, steps = config[net], ckpt[weights], 1 if net == "F" else default_steps(config["nfe"])
    elif is_state_dict(ckpt):
        if model is None:
            fail(f"{path} is a bare state dict: say which network it is with --model (and --nfe, --repeat)")
        nfe, repeat = nfe or "1", repeat or 1
        kwargs, steps = dict(SIZES[model], **OFFICIAL_SHAPE, **mode_flags(nfe, repeat)[0]), default_steps(nfe)
        state, info = ckpt, dict(OFFICIAL_DATA)
    else:
        fail(f"{path} is neither a training checkpoint nor a generator state dict")
    try:
        G = Generator(**kwargs)
    except ValueError as e:                                    # e.g. --repeat with --nfe 2
        fail(str(e))
    load_weights(G, state, path, ": check --model, --nfe and --repeat")
    return G.eval().requires_grad_(False), steps, info


# The official CAFM release post-trains SiT's checkpoint (SiT-XL-2-256.pt); SiT's own training checkpoints wrap it.
SIT_SOURCE = "SiT-XL-2-256.pt of https://github.com/willisma/SiT (its download.py has the link)"
SIT_KEYS = {"x_embedder.proj.weight", "pos_embed", "t_embedder.mlp.0.weight", "y_embedder.embedding_table.weight",
            "final_layer.linear.weight"}


def load_sit(path, model):
    """(G, its kwargs, data info) from a checkpoint in the official SiT format, the flow model CAFM post-trains, loaded
    strictly. `model` (a SIZES key) gives the number of heads, which the weights do not show."""
    ckpt = load_checkpoint(path)
    ckpt = ckpt.get("ema", ckpt) if isinstance(ckpt, dict) else ckpt    # SiT's train.py checkpoints hold the EMA
    if not is_state_dict(ckpt) or not SIT_KEYS <= set(ckpt):
        fail(f"{path} is not a SiT checkpoint: CAFM post-trains the official {SIT_SOURCE}, or a flow-matching "
             "checkpoint of twinflow.py --terms real")
    proj, grid = ckpt["x_embedder.proj.weight"], math.isqrt(ckpt["pos_embed"].shape[1])
    kwargs = dict(SIZES[model], input_size=grid * proj.shape[-1], in_channels=proj.shape[1],
                  num_classes=len(ckpt["y_embedder.embedding_table.weight"]), **SIT_FLAGS)
    G = Generator(**kwargs)
    load_weights(G, ckpt, path, f": check --model {model} (SiT-XL/2 is XL/2)")
    return G, kwargs, dict(OFFICIAL_DATA, num_classes=kwargs["num_classes"] - 1)


def cafm_discriminator(g_kwargs, g_state):
    """CAFM's D on the trunk of the flow model G (kwargs and weights): its token and head are new, initialised from
    the global RNG (the official loads the flow model with strict=False)."""
    D = Discriminator(**cafm_discriminator_kwargs(g_kwargs))
    missing, _ = D.load_state_dict(g_state, strict=False)     # without G's output layer
    assert set(missing) == {"dis_embed", "final_layer.1.weight"}, missing          # G loaded: the trunk is there
    return D


def load_classifier(path, weights="EMA"):
    """The frozen time-conditioned classifier of a train_classifier.py checkpoint (its EMA weights by default), or of
    the official release's classifier.pth (a bare B/2 state dict for ImageNet-256 latents), and the info.json of the
    data it was trained on; one clear line when the file is neither."""
    ckpt = load_checkpoint(path)
    if is_state_dict(ckpt):
        ckpt = dict(EMA=ckpt, config=dict(C=dict(SIZES["B/2"], **OFFICIAL_SHAPE)), data_info=dict(OFFICIAL_DATA))
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("config"), dict) or "C" not in ckpt["config"]:
        fail(f"{path} is not a classifier checkpoint of train_classifier.py")
    try:
        C = Classifier(**ckpt["config"]["C"])
    except TypeError as e:
        fail(f"{path} holds a classifier that does not load: {e}")
    load_weights(C, ckpt.get(weights), path)
    return C.eval().requires_grad_(False), ckpt.get("data_info", {})
