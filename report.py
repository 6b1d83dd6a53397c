"""
What a user sees of a run, or of a set of runs: its flags and --help, the lines it opens with and
prints each step, the summary at its end, its curves.png, the figures of a comparison and --bench's
table (experiments.py), and the one line a run that stopped early ends with. Every function takes
records of log.jsonl (runs.read_log) and the task's panels (gapt.TASKS), not paths: this file
imports no module of this project, and a figure plots what the task's entry says.
"""
import argparse
import glob
import os
import re
import shlex
import time

import numpy as np
import torch

COMPRESS = 2   # gapt.COMPRESS: the phase shaded in every figure


def quoted(path):
    """A path as one line: quoted when it holds a newline or another odd character."""
    return repr(str(path)) if not str(path).isprintable() else str(path)


def pyplot():
    """matplotlib's pyplot on a file-only backend (no display needed), imported when first used."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def sd(v):
    """Sample standard deviation over seeds (axis 0); 0 for a single seed."""
    v = np.asarray(v, dtype=float)
    return v.std(0, ddof=1) if len(v) > 1 else np.zeros(v.shape[1:])


def phase_spans(steps, phases):
    """[(start, end)] of each compression phase, for shading: its first step and the step after
    its last (or the final step)."""
    spans, start = [], None
    for s, p in zip(steps, phases):
        if p == COMPRESS and start is None:
            start = s
        if p != COMPRESS and start is not None:
            spans.append((start, s))
            start = None
    if start is not None:
        spans.append((start, steps[-1]))
    return spans


def shade(ax, train_recs, color="tab:orange", alpha=0.3):
    """Shade the compression phases of train_recs on ax; returns how many there were."""
    steps = [r["step"] for r in train_recs]
    spans = phase_spans(steps, [r["phase"] for r in train_recs])
    for a, b in spans:   # at least 0.4% of the axis wide: a phase of one step shows
        ax.axvspan(a, max(b, a + len(steps) / 250), color=color, alpha=alpha, lw=0)
    return len(spans)


def opening(cfg, given, device, world, n_params, optimizers, total):
    """The lines a run opens with: the flags given, the machine, the optimizers, the batch."""
    B, T = cfg["batch_size"], cfg["block_size"]
    lines = ["config: " + (" ".join(f"--{k}={v}" for k, v in given.items()) or "the defaults"),
             f"torch {torch.__version__} | device {device} | dtype {cfg['dtype']} | processes "
             f"{world} | {n_params:,} parameters | MBE on layers {cfg['layers']}",
             "optimizer: " + " + ".join(
                 f"{type(o).__name__} (lr {o.defaults['lr']:g}, weight decay "
                 f"{o.param_groups[0]['weight_decay']:g}, "   # of its 2-D weights
                 f"{sum(p.numel() for g in o.param_groups for p in g['params']):,} parameters)"
                 for o in optimizers),
             f"batch: {total:,} tokens/step = {B} seqs x {T} tokens x {world} processes x "
             f"{total // (B * T * world)} accumulation steps"]
    if cfg["max_iters"] <= cfg["warmup_iters"]:
        lines.append(f"note: --max_iters={cfg['max_iters']} <= --warmup_iters="
                     f"{cfg['warmup_iters']}: the learning rate never reaches its peak, "
                     f"--learning_rate")
    return "\n".join(lines)


def step_line(cfg, s, phase, total, since):
    """A step's console line, with the time since (t0, step0) and an estimate of the time left."""
    took = time.time() - since[0]
    left = took / (s.step - since[1]) * (cfg["max_iters"] - s.step)
    clock = "{:.0f}m{:02.0f}s".format
    return (f"step {s.step:>5}/{cfg['max_iters']} | {phase} | ce {s.ce:.4f} | mbe {s.mbe:.4f} | "
            f"lr {s.lr:.2e} | {s.ms:.1f} ms | {1000 * total / s.ms:,.0f} tok/s | "
            f"{clock(*divmod(took, 60))}, ETA {clock(*divmod(left, 60))}")


def line(head, numbers):
    """"head | key value | ...": an eval's or a phase switch's console line (lists left out)."""
    return " | ".join([head] + [v if isinstance(v, str) else f"{k} {v:.4f}"
                                for k, v in numbers.items() if not isinstance(v, list)])


def summary(cfg, seconds, start, train_recs, eval_recs, switch_recs, best):
    """This session's steps and time; the whole run's phase switches by reason, compression
    share, final and best eval."""
    reasons = [r.get("reason") for r in switch_recs]
    compress = sum(r["phase"] == COMPRESS for r in train_recs)
    print("-" * 72)
    since = f" from step {start}" if start else ""
    why = ", ".join(f"{n} {reasons.count(n)}" for n in sorted(set(reasons), key=str))
    print(f"done: {max(0, cfg['max_iters'] - start)} steps{since} in {seconds:.0f} s | phase "
          f"switches {len(reasons)}{f' ({why})' if why else ''} | compression "
          f"{100 * compress / max(1, len(train_recs)):.0f}% of steps")
    if eval_recs:
        print("final eval: " + " | ".join(f"{k} {v:.4f}" for k, v in eval_recs[-1].items()
                                          if isinstance(v, float)))
    if best:
        key = next(k for k in best if k != "step")
        print(f"best eval: step {best['step']} ({key} {best[key]:.4f}), its weights in "
              f"{os.path.join(cfg['out_dir'], 'best.pt')}")


def plot_run(path, cfg, train_recs, eval_recs, curves):
    """curves.png: training CE, the task's eval curves (curves: ((metrics, label), ...)) and the
    training M, per step, the compression phases shaded."""
    try:
        plt = pyplot()
    except ImportError:
        print("figure skipped: pip install matplotlib")
        return
    fig, axes = plt.subplots(2 + len(curves), 1, figsize=(8, 2.2 * (2 + len(curves))),
                             sharex=True)
    steps = [r["step"] for r in train_recs]
    layers = "watched" if cfg["phase_mode"] == "memorize" else "compressed"
    axes[0].plot(steps, [r["ce"] for r in train_recs], lw=0.8)
    axes[0].set_ylabel("train CE (nats)")
    axes[-1].plot(steps, [r["mbe"] for r in train_recs], lw=0.8)
    axes[-1].set_ylabel(f"train MBE, {layers}\nlayers (nats)")
    for ax, (keys, label) in zip(axes[1:-1], curves):
        for k in keys:
            recs = [e for e in eval_recs if isinstance(e.get(k), (int, float))]
            ax.plot([e["step"] for e in recs], [e[k] for e in recs], marker="o", ms=3, label=k)
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    n = [shade(ax, train_recs) for ax in axes][0]
    shaded = f"shaded: {n} compression phase(s)" if n else "no compression phase"
    axes[0].set_title(f"{cfg['task']}, {cfg['phase_mode']} ({cfg['out_dir']}): per step, "
                      f"evals as dots ({shaded})", fontsize=10)
    axes[-1].set_xlabel("optimizer step")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"figure: {path}")


def plot_compare(path, evals, panels, title, shaded=None):
    """A comparison's figure, one panel per (metric, label) of the task's panels: curves over
    evals with their std band over seeds (a metric written -key: its difference from the first
    arm, seed by seed), the final per-layer values as bars, or where each run has a single eval
    (the toy), a bar per arm. evals: {arm: [each seed's eval records]}; shaded: (arm, its seed's
    train records) whose compression phases are shaded grey. Arms take turns of line style, so
    that identical arms still show."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 3.8), squeeze=False)
    n = min(len(r) for rs in evals.values() for r in rs)
    spans = 0
    for ax, (key, label) in zip(axes[0], panels):
        for i, (arm, runs) in enumerate(evals.items()):
            style = dict(color=f"C{i}", label=arm)
            if key.endswith("_layers"):            # bars: one group of layers per arm
                v = np.array([e[-1][key] for e in runs])
                x = np.arange(v.shape[1]) + (i - (len(evals) - 1) / 2) * 0.8 / len(evals)
                ax.bar(x, v.mean(0), 0.8 / len(evals), yerr=sd(v), **style)
                ax.set_xlabel("layer")
                continue
            k = key.lstrip("-")
            v = np.array([[e[k] for e in r[-n:]] for r in runs])          # (seeds, evals)
            if key.startswith("-"):
                v = v - np.array([[e[k] for e in r[-n:]] for r in next(iter(evals.values()))])
            if n == 1:                             # one value per run: a bar per arm
                ax.bar(i, v.mean(), yerr=sd(v[:, 0]), **style)
                ax.set_xticks([])
                continue
            steps, m, s = [e["step"] for e in runs[0][-n:]], v.mean(0), sd(v)
            ax.plot(steps, m, ls=("-", "--", ":", "-.")[i % 4], **style)
            ax.fill_between(steps, m - s, m + s, color=f"C{i}", alpha=0.2)
            ax.set_xlabel("optimizer step")
        if shaded and n > 1 and not key.endswith("_layers"):
            spans = shade(ax, shaded[1], color="grey", alpha=0.25)
        ax.set_ylabel(label)
    seeds = len(next(iter(evals.values())))
    grey = f" (grey: {shaded[0]}'s compression phases, first seed)" if spans else ""
    fig.suptitle(f"{title}: mean ± std over {seeds} seed(s){grey}")
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="lower center", ncol=len(evals))
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_cycle(path, aligns, seed):
    """The paper's cycle observation: cos(grad CE, grad M) against step, per seed, per arm, and
    each run's cycle_stats; nothing where none was logged. aligns: {arm: [each seed's records]}."""
    if not any(recs for seeds in aligns.values() for recs in seeds):
        return
    plt = pyplot()
    fig, axes = plt.subplots(1, len(aligns), figsize=(5 * len(aligns), 3.6), squeeze=False,
                             sharey=True)
    for ax, (arm, seeds) in zip(axes[0], aligns.items()):
        for s, recs in enumerate(seeds):
            ax.plot([r["step"] for r in recs], [r["cos"] for r in recs], lw=0.9,
                    label=f"seed {seed + s}")
        ax.axhline(0, color="k", lw=0.6)
        ax.set_title(arm)
        ax.set_xlabel("optimizer step")
        ax.legend(fontsize=7, ncol=2)
    axes[0][0].set_ylabel("cos(grad CE, grad MBE)")
    fig.suptitle("Alignment of the CE and MBE gradients: "
                 "above 0 memorising also compresses, below 0 they conflict")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"figure: {path}")
    for arm, seeds in aligns.items():
        for s, recs in enumerate(seeds):
            print(f"cycle, {arm} seed {seed + s}: {cycle_stats([r['cos'] for r in recs])}")


def cycle_stats(cos):
    """How the gradient alignment behaves over a run: a slow cycle shows as few sign changes and
    a lag-1 autocorrelation near 1; step-to-step noise as many changes and one near 0."""
    c = np.asarray(cos, dtype=float)
    if len(c) < 3:
        return f"{len(c)} measurements, too few (lower --align_interval)"
    changes = int(((c[1:] > 0) != (c[:-1] > 0)).sum())
    lag1 = np.corrcoef(c[:-1], c[1:])[0, 1]
    return (f"cos > 0 in {(c > 0).mean():.0%} of {len(c)} measurements, {changes} sign changes, "
            f"lag-1 autocorrelation {lag1:.2f}")


def plot_phases(path, trains, seed):
    """One seed's training CE and M per arm, side by side, the compression phases shaded: how
    each controller cycles. trains: {arm: that seed's train records}."""
    plt = pyplot()
    fig, axes = plt.subplots(2, len(trains), figsize=(4.6 * len(trains), 4.6), squeeze=False,
                             sharex=True, sharey="row")
    for i, (arm, recs) in enumerate(trains.items()):
        for ax, key in zip(axes[:, i], ("ce", "mbe")):
            ax.plot([r["step"] for r in recs], [r[key] for r in recs], lw=0.6)
            n = shade(ax, recs)
        share = sum(r["phase"] == COMPRESS for r in recs) / max(1, len(recs))
        axes[0, i].set_title(f"{arm}: {n} compression phase(s), {share:.0%} of steps", fontsize=9)
        axes[1, i].set_xlabel("optimizer step")
    axes[0, 0].set_ylabel("train CE (nats)")
    axes[1, 0].set_ylabel("train MBE (nats)")
    fig.suptitle(f"Phases of each arm, seed {seed} (orange: compressing)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"figure: {path}")


def phase_shares(train_recs):
    """A run's share of steps compressing, and its completed memorise -> compress -> memorise
    cycles, from its train records."""
    p = [r["phase"] for r in train_recs]
    return {"compressing": float(np.mean([x == COMPRESS for x in p] or [0])),
            "cycles": float(sum(a == COMPRESS != b for a, b in zip(p, p[1:])))}


# peak dense bf16 FLOP/s (datasheets, no sparsity) by a substring of the GPU's name: first match
PEAK_FLOPS = {"GB200": 2500e12, "B200": 2250e12, "H200 NVL": 836e12, "H200": 989e12,
              "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12,
              "L40S": 362e12, "L40": 181e12, "L4": 121e12, "RTX 4090": 165e12, "RTX 3090": 71e12}


def bench_table(cfg, device, ts, k, lag, n_params, flops, mbe, entropy):
    """experiments.py --bench's lines. ts: {mode: seconds a step, a reading of k steps per turn},
    the plain loop's, memorise's, compress's; flops: a token's; mbe: seconds of M a step (watched,
    learnt); entropy: seconds of the closed form and the eigenvalues, and the windows' shape."""
    B, T, D = cfg["batch_size"], cfg["block_size"], cfg["n_embd"]
    plain, memorise, compress = ts
    step = {m: float(np.median(t)) for m, t in ts.items()}
    ratio = lambda a, b: float(np.median(np.divide(ts[a], ts[b])))   # noqa: E731
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    peak = next((f for s, f in PEAK_FLOPS.items() if s in name), None)
    print(f"bench: GPT {cfg['n_layer']} layers x {D}, {n_params:,} parameters, MBE on "
          f"layers {cfg['layers']} | {B} x {T} random tokens a step | {device} {cfg['dtype']} | "
          f"compile {cfg['compile']} | torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads | median of {len(ts[plain]) * k} steps")
    print(f"{'mode':<16}{'ms/step':>10}{'tok/s':>12}{'vs plain':>10}{'MFU':>8}")
    for m in ts:
        mfu = f"{flops * B * T / step[m] / peak:.1%}" if peak else "-"
        print(f"{m:<16}{1000 * step[m]:>10.2f}{B * T / step[m]:>12,.0f}"
              f"{ratio(m, plain):>9.3f}x{mfu:>8}")
    print(f"compress / memorise {ratio(compress, memorise):.3f}x | host read lag {lag} step(s)")
    print(f"MBE share of a step: memorise {mbe[0] / step[memorise]:.2%} (no grad) | "
          f"compress {mbe[1] / step[compress]:.2%} (forward and backward)")
    closed, eig, shape = entropy
    print(f"alpha=2 closed form vs eigenvalue path (alpha=1) on {shape} windows: "
          f"{1e3 * closed:.3f} vs {1e3 * eig:.3f} ms, {eig / closed:.1f}x")
    print(f"GPU: {name}, MFU vs {peak / 1e12:.0f} TFLOP/s dense bf16" if peak else
          f"GPU: {name}, peak FLOP/s unknown, no MFU" if name else
          "GPU: none (MFU needs a CUDA device)")

# -----------------------------------------------------------------------------
# How a run ends. Every way is decided in one place, ending(): bad input is one line and exit 2, a
# run that fails one line and 1, Ctrl-C or SIGTERM the line that resumes it.


def boolean(text):   # --flag=yes|no, true|false, on|off, 1|0
    if text.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        raise ValueError(text)
    return text.lower() in ("1", "true", "yes", "on")


def parse_flags(argv, table, choices, doc, error):
    """--key=value flags of table (a flat list of (key, default, meaning), a string heading each
    group) -> {key: value}, typed as the defaults are, and "given": the keys given. --help shows
    doc, then each flag with its default; a bad flag is error(one line), not argparse's usage."""
    class Parser(argparse.ArgumentParser):
        def error(self, message):
            raise error(message.removeprefix("argument "))
    p = Parser(usage=argparse.SUPPRESS, description=doc, allow_abbrev=False,   # docstring first
               formatter_class=lambda prog: argparse.RawDescriptionHelpFormatter(
                   prog, max_help_position=28, width=100))
    for c in table:
        if isinstance(c, str):
            group = p.add_argument_group(c)
            continue
        key, default, text = c
        bare = dict(nargs="?", const=True) if type(default) is bool else {}   # --flag sets it
        kind = boolean if type(default) is bool else type(default)   # an int is a float too
        group.add_argument(f"--{key}", type=kind, default=default, choices=choices.get(key), **bare,
                           metavar=None if key in choices else type(default).__name__.upper(),
                           help=f"{text} (default: {default})".replace("%", "%%"))
    args, rest = p.parse_known_args(argv)
    if rest:
        raise error(f"unknown flag {rest[0].partition('=')[0]} (see --help)"
                    if rest[0].startswith("-") else
                    f"unexpected argument '{rest[0]}': use --key=value (see --help)")
    cfg = vars(args)
    cfg["given"] = [k for k in cfg if any(a == f"--{k}" or a.startswith(f"--{k}=") for a in argv)]
    return cfg


def sigterm(signum, frame):   # kill, or torchrun stopping its workers: stop as on Ctrl-C
    raise KeyboardInterrupt("SIGTERM")


def ending(e, cfg, argv, script, bad=(), failed=()):
    """(exit code, the one line to print, or none) for a run that stopped early on e: bad input
    (bad: error types) is exit 2, a run that cannot go on (failed) 1. Anything else, a bug, is
    raised with its traceback."""
    rank0 = os.environ.get("RANK", "0") == "0"
    if isinstance(e, bad):                # the same on every rank: rank 0 says it
        return 2, rank0 and f"error: {e}"
    if isinstance(e, KeyboardInterrupt):  # every rank has it: rank 0 says how to go on
        why = e.args[0] if e.args else "Ctrl-C"
        return 143 if e.args else 130, rank0 and interrupted(cfg, argv, script, why)
    if isinstance(e, failed):   # runs.TrainingError, data.DataError
        return 1, f"error: {e}"
    if isinstance(e, OSError):            # a full disk, a file gone; every write is whole or none
        return 1, f"error: {e.strerror or e}" + (f": {quoted(e.filename)}" if e.filename
                                                  else "") + "; what was written before is kept"
    if isinstance(e, (MemoryError, torch.OutOfMemoryError)) or "can't allocate" in str(e):
        return 1, (f"error: out of memory ({type(e).__name__}): try a smaller --batch_size, "
                   f"--block_size or model")
    timeout = "timed out" in str(e).lower()
    lost = timeout or isinstance(e, getattr(torch.distributed, "DistError", ())) or \
        re.search(r"connection|peer|pipe", str(e), re.I)   # gloo's, when a process is gone
    if "RANK" in os.environ and isinstance(e, RuntimeError) and lost:
        why = f"no word for --dist_timeout={cfg['dist_timeout']} s" if timeout else "lost contact"
        return 1, (f"error: rank {os.environ['RANK']}: the other processes stopped answering "
                   f"({why}: one stalled, died or failed); the last checkpoint, if any, is "
                   f"{quoted(os.path.join(cfg['out_dir'], 'ckpt.pt'))}")
    raise e


def interrupted(cfg, argv, script=os.path.join(os.path.dirname(__file__), "gapt.py"),
                why="Ctrl-C"):
    """The line a stopped run prints: where its last checkpoint is and how to go on from it."""
    if cfg and "max_iters" not in cfg:   # sample.py: nothing to resume
        return f"stopped ({why})"
    runs = "*_seed*" if cfg and cfg.get("compare") else ""
    where = cfg and os.path.join(cfg["out_dir"], runs, "ckpt.pt")
    if not where or cfg.get("bench") or cfg["task"] == "forgetting" or not glob.glob(where):
        return f"stopped ({why}) before a checkpoint was written: nothing to resume"
    drop = {i for i, a in enumerate(argv) if a.startswith(("--init_from", "--weights"))}
    drop |= {i + 1 for i in drop if argv[i] in ("--init_from", "--weights")}   # a spaced value
    flags = [a for i, a in enumerate(argv) if i not in drop] + ["--init_from=resume"]
    world, local = os.environ.get("WORLD_SIZE", "1"), os.environ.get("LOCAL_WORLD_SIZE", "1")
    launch = (["python"] if "RANK" not in os.environ else   # the same processes: an exact resume
              ["torchrun", "--standalone", f"--nproc_per_node={world}"] if world == local else
              ["torchrun", "<your launch flags>"])
    again = shlex.join([*launch, os.path.relpath(script), *flags])
    return f"stopped ({why}); the last checkpoint is {quoted(where)}; resume: {again}"
