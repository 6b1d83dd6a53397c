"""
What runs or measures many gapt.py runs, as nanoGPT's bench.py sits beside its train.py:

    python experiments.py --compare=memorize,gapt --seeds=3   # arms x seeds: table, figures
    python experiments.py --task=forgetting                  # the forgetting toy: an MLP, seconds
    python experiments.py --task=forgetting --compare=memorize,gapt,compress --seeds=20
    python experiments.py --bench                            # ms/step: memorise, compress, plain
    python experiments.py --help                             # its flags, then every gapt.py flag

Every gapt.py flag works here too, for each run. Sections: the forgetting toy, comparisons (runs,
table, intervals, figures), the benchmark. It imports gapt.py and data.py, never the reverse.
"""
import os
import signal
import sys

if __name__ == "__main__":   # a signal while torch loads: one line (main() then installs its own)
    for _sig, _code, _why in ((signal.SIGINT, 130, "Ctrl-C"), (signal.SIGTERM, 143, "SIGTERM")):
        signal.signal(_sig, lambda s, f, c=_code, w=_why: (sys.stderr.write(
            f"stopped ({w}) while starting; nothing to resume\n"), os._exit(c)))

import json   # noqa: E402 (after the handlers above)
import math
import shutil
import tempfile
import time
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import gapt
import report
import runs
from gapt import COMPRESS, MEMORIZE
from report import cycle_stats   # noqa: F401 (still experiments.cycle_stats)
from runs import ConfigError, TrainingError, read_log

FLAGS = [
    "experiments.py",
    ("compare", "", "phase modes to run, e.g. memorize,gapt,compress, x --seeds: a table, figures"),
    ("seeds", 3, "seeds per arm for --compare (--seed, --seed+1, ...)"),
    ("against", "", "--compare: arms each arm's difference is taken from (default: the first)"),
    ("fig", "", "--compare's figure (default out_dir/<task>.png; cycle.png beside it)"),
    ("bench", False, "time memorise and compress steps against a plain loop; train nothing"),
    ("bench_steps", 20, "--bench: timed steps per mode, after 3 warm-up steps"),
    ("forget_m", 0.8, "--task=forgetting: teachers A theta0 + m Delta, B theta0 - m Delta"),
]
DEFAULTS = {**gapt.DEFAULTS, **{c[0]: c[1] for c in FLAGS if isinstance(c, tuple)}}

# -----------------------------------------------------------------------------
# Catastrophic-forgetting toy (--task=forgetting): a student MLP learns task A, then task B
# (data.forgetting_data) under gapt.py's IBLM loss and controller, with the L1 loss in place of
# CE and M the MBE of its hidden layer over windows of patch_size samples. The paper's claim:
# compression separates the two tasks' representations and so reduces interference. A run
# takes seconds on a CPU: no device, DDP or checkpoint machinery (nothing worth resuming).


class Student(nn.Module):
    """The teacher's shape, n_in -> n_hidden -> 1 with ReLU; also returns the hidden layer."""

    def __init__(self, n_in, n_hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(n_in, n_hidden), nn.Linear(n_hidden, 1)

    def forward(self, x):
        h = F.relu(self.fc1(x))                                        # (n, n_hidden)
        return self.fc2(h), h


def separation(ha, hb):
    """||mean(ha) - mean(hb)|| / sqrt((var_a + var_b) / 2), var the mean squared distance to the
    group's mean: how far apart two groups of vectors (n, D) lie, in units of their spread."""
    d = (ha.mean(0) - hb.mean(0)).norm().item()
    s = math.sqrt(sum((h - h.mean(0)).square().sum(1).mean().item() for h in (ha, hb)) / 2)
    return d / s if s > 0 else (0.0 if d == 0 else math.inf)   # no spread: two points, apart or not


def fit_task(model, x, y, cfg, log, task, start):
    """max_iters full-batch Adam steps on L1 (+ mbe_weight * M when compressing) -> the last step.
    The learning rate is constant: a schedule across both tasks would learn B slower than A. The
    controller starts afresh: A's best loss, which B's early losses never beat, would make it
    compress after p_m steps with B unlearnt. Non-finite steps are skipped as in gapt.py."""
    ctrl = gapt.controller(cfg)
    phase = gapt.first_phase(cfg, ctrl)
    opt = torch.optim.Adam(model.parameters(), lr=cfg["learning_rate"])   # no task-A moments in B
    n_compress = bad = 0
    for step in range(start + 1, start + cfg["max_iters"] + 1):
        pred, h = model(x)
        l1 = F.l1_loss(pred, y)
        hs = [(h if phase == COMPRESS else h.detach())[None]]   # samples as one (1, n, D) sequence
        M = gapt.layer_mbe(hs, [0], cfg["patch_size"])[0]       # in memorisation only watched
        loss, mbe = l1.item(), M.item()
        if not (math.isfinite(loss) and math.isfinite(mbe)):
            bad += 1
            log.record(kind="skip", step=step, task=task, loss=loss, mbe=mbe)
            if bad >= cfg["max_bad_steps"]:
                raise TrainingError(f"task {task}, step {step}: {bad} consecutive non-finite "
                                    f"losses (try a lower --learning_rate)")
            continue
        opt.zero_grad(set_to_none=True)
        gapt.iblm_loss(l1, M, phase, cfg["mbe_weight"]).backward()
        opt.step()
        used, n_compress, bad = phase, n_compress + (phase == COMPRESS), 0
        if cfg["phase_mode"] == "gapt":
            phase = ctrl.step(loss, mbe)
        log.record(kind="train", step=step, task=task, phase=used, loss=loss, mbe=mbe)
        if step % cfg["log_interval"] == 0:
            log.print(f"task {task} step {step:>5} | {gapt.PHASES[used]} | l1 {loss:.4f} | "
                      f"mbe {mbe:.4f}")
    log.print(f"task {task}: compression {100 * n_compress / cfg['max_iters']:.0f}% of "
              f"{cfg['max_iters']} steps")
    return step


@torch.no_grad()
def forgetting_eval(model, d, patch_size):
    """Held-out L1 on A and B, the separation of the two tasks' hidden layers, and their MBE."""
    (pa, ha), (pb, hb) = model(d["xa_test"]), model(d["xb_test"])
    mbe = lambda h: gapt.layer_mbe([h[None]], [0], patch_size).item()   # noqa: E731
    return {"loss_A": F.l1_loss(pa, d["ya_test"]).item(),
            "loss_B": F.l1_loss(pb, d["yb_test"]).item(), "separation": separation(ha, hb),
            "mbe_A": mbe(ha), "mbe_B": mbe(hb)}


def forgetting(cfg):
    if cfg["init_from"] != "scratch" or cfg["device"] not in ("auto", "cpu"):
        raise ConfigError("--task=forgetting trains a small MLP in seconds, from scratch (no "
                          "--init_from) on the CPU")
    n_in, n_hidden = 10, 50                          # the paper's teacher, and so the student
    with np.errstate(all="ignore"):   # a huge --forget_m: the run's own one line, no warnings
        d = data.forgetting_data(cfg["seed"], n_in, n_hidden, cfg["forget_m"])
    if len(d["xa"]) % cfg["patch_size"]:              # the test sets are as long
        raise ConfigError(f"--patch_size={cfg['patch_size']} must divide the toy's {len(d['xa'])} "
                          f"samples per task")
    torch.set_num_threads(1)   # matmuls this small only wait on each other in threads (20x slower)
    torch.manual_seed(cfg["seed"])
    model = Student(n_in, n_hidden)
    log = runs.open_run(cfg, True)
    log.print(f"forgetting toy: {n_in} -> {n_hidden} -> 1 student, {len(d['xa'])} samples per task,"
              f" {cfg['max_iters']} steps on A then on B, MBE over windows of {cfg['patch_size']}")
    step = fit_task(model, d["xa"], d["ya"], cfg, log, "A", 0)
    after_a = forgetting_eval(model, d, cfg["patch_size"])
    fit_task(model, d["xb"], d["yb"], cfg, log, "B", step)
    after_b = forgetting_eval(model, d, cfg["patch_size"])
    metrics = {"loss_A_after_A": after_a["loss_A"], "loss_A_after_B": after_b.pop("loss_A"),
               **after_b}
    log.record(kind="eval", step=2 * cfg["max_iters"], **metrics)
    log.print("eval (held out; loss_A_after_B is the interference) | "
              + " | ".join(f"{k} {v:.4f}" for k, v in metrics.items()))

# -----------------------------------------------------------------------------
# Comparisons: one config run as several arms and seeds, a table of final metrics (mean +- std),
# each arm's difference from the first with a 95% t interval, and figures. An arm is a phase
# mode and, after colons, gapt.py flags of its own: --compare=memorize,gapt:tau=1. Arms whose
# flags leave the data alone see the same data and initial weights per seed, so their
# differences are paired by seed; arms that change the data (DATA) get Welch's interval.

FORGETTING_PANELS = (("separation", "separation of A and B (held out)"),   # as a Task's panels
                     ("loss_A_after_B", "L1 loss on A after B (interference)"),
                     ("mbe_A", "hidden MBE on A (nats)"))
DATA = ("batch_size", "total_batch_size", "block_size", "digits_min", "digits_max", "n_eval",
        "ood_digits_min", "ood_digits_max", "reverse_answer", "arith_layout", "arith_loss",
        "data_dir", "val_tokens", "seed")   # flags that change what data a seed draws
SET_HERE = ("phase_mode", "init_from", "weights", "out_dir", "compare")   # by the comparison
COMPARE_FILES = runs.RUN_FILES + r"|results\.json|.*\.png|.*_seed\d+"   # a run in out_dir too


def parse_arms(spec):
    """"memorize,gapt:tau=1" -> {"memorize": {"phase_mode": "memorize"}, "gapt:tau=1": {...}}:
    each arm's phase mode and flags, checked and typed as on gapt.py's command line."""
    arms, modes = {}, gapt.CHOICES["phase_mode"]
    for name in spec.split(","):
        mode, *flags = name.split(":")
        keys = [f.partition("=")[0] for f in flags]
        if mode not in modes or name in arms:
            raise ConfigError(f"--compare={spec}: arms are phase modes ({', '.join(modes)}), each "
                              f"once, with flags after colons: gapt:tau=1")
        if bad := next((k for k in keys if keys.count(k) > 1 or k in SET_HERE), None):
            raise ConfigError(f"--compare={spec}: arm {name} gives {bad} " + (
                "twice" if keys.count(bad) > 1 else "(the comparison sets it)"))
        given = gapt.parse_args([f"--{f}" for f in flags])
        arms[name] = {**{k: given[k] for k in keys}, "phase_mode": mode}
    return arms


def check_outputs(cfg, arms, path):
    """Before any arm trains: each arm's data (fresh), the figure's format, and that the figure's
    folder takes a file."""
    if cfg["init_from"] != "resume" and cfg["task"] != "forgetting":
        for flags in arms.values():
            gapt.make_data(gapt.resolve({**cfg, **flags}), 0, 1)
    from matplotlib.backend_bases import FigureCanvasBase   # the formats savefig writes
    if os.path.splitext(path)[1][1:].lower() not in FigureCanvasBase.get_supported_filetypes():
        raise ConfigError(f"--fig={path}: name an image file: .png, .pdf, .svg, ...")
    try:   # a file in the way, a read-only folder: found now, not after every arm has run
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tempfile.TemporaryFile(dir=os.path.dirname(path) or ".").close()
    except OSError as e:
        k = "fig" if cfg["fig"] else "out_dir"   # path is --fig's, or in out_dir
        raise ConfigError(f"--{k}={runs.quoted(cfg[k])}: cannot write there "
                          f"({e.strerror or e})") from None


def compare(cfg):
    """Every arm x --seeds runs into out_dir/<arm>_seed<s>, then the table, the differences and the
    figures. Seeds outer: a stopped comparison has every arm for the seeds done. --init_from=resume
    continues it; arms not started yet start as the others did, from its config.json, with the
    flags given now."""
    arms = parse_arms(cfg["compare"])
    saved = os.path.join(cfg["out_dir"], "config.json")
    fresh = "scratch" if cfg["init_from"] == "resume" else cfg["init_from"]   # or config.json's
    if cfg["init_from"] == "resume" and os.path.isfile(saved):   # its model, data and start
        try:
            with open(saved) as f:
                first = json.load(f)
        except ValueError:   # a torn write, stray bytes
            raise ConfigError(f"{saved} is damaged: delete it (the arms not begun then start "
                              f"from scratch)") from None
        first = gapt.check_saved(first, saved, choices())
        cfg = runs.resume_config(cfg, first, DEFAULTS, (), saved)
        cfg["weights"] = cfg["weights"] or first.get("weights", "")
        fresh = first.get("init_from", "scratch")
    path = cfg["fig"] or os.path.join(cfg["out_dir"], cfg["task"] + ".png")
    against = cfg["against"].split(",") if cfg["against"] else [next(iter(arms))]
    if missing := [a for a in against if a not in arms]:
        raise ConfigError(f"--against={cfg['against']}: {missing[0]} is not an arm of --compare")
    check_outputs(cfg, arms, path)
    made = not os.path.isdir(cfg["out_dir"])
    try:
        lock = runs.lock_dir(cfg["out_dir"])          # held to the end
        if cfg["init_from"] != "resume":   # a fresh comparison: no arm may resume an earlier one's
            runs.keep_earlier_run(cfg["out_dir"], COMPARE_FILES)
            runs.write_atomic(saved, json.dumps(cfg, indent=1).encode())
    except OSError as e:
        raise ConfigError(f"--out_dir: cannot write {runs.quoted(e.filename)} "
                          f"({e.strerror or e})") from None
    dirs = {arm: [] for arm in arms}
    for s in range(cfg["seeds"]):
        for arm, flags in arms.items():
            out = os.path.join(cfg["out_dir"], f"{arm}_seed{s}")
            print(f"=== {arm}, seed {cfg['seed'] + s} -> {out}", flush=True)
            resume = cfg["init_from"] == "resume" and os.path.exists(os.path.join(out, "ckpt.pt"))
            one = {**cfg, **flags, "seed": cfg["seed"] + s, "out_dir": out, "compare": "",
                   "given": [*cfg.get("given", ()), *flags],
                   "init_from": "resume" if resume else fresh}
            try:
                forgetting(one) if one["task"] == "forgetting" else gapt.train(one)
            except ConfigError:   # bad input found by the first run: no out_dir made for nothing
                if made and sorted(os.listdir(cfg["out_dir"])) == [".lock", "config.json"]:
                    shutil.rmtree(cfg["out_dir"])
                raise
            dirs[arm].append(out)
    table = {a: {**row, "flags": arms[a]} for a, row in compare_table(dirs, arms, against).items()}
    runs.write_atomic(os.path.join(cfg["out_dir"], "results.json"), json.dumps(json.loads(
        json.dumps(table), parse_constant=lambda c: None), indent=1).encode())   # null, not NaN
    figures(cfg, dirs, arms, path)


def figures(cfg, dirs, arms, path):
    """The comparison's figure (the task's panels), and beside it the phases of each gapt arm's
    first seed and, where alignments were logged, the cycle figure."""
    task, here, seed = cfg["task"], os.path.dirname(path), cfg["seed"]
    gapts = [a for a in arms if arms[a]["phase_mode"] == "gapt"]
    shaded = gapts and (gapts[0], read_log(dirs[gapts[0]][0], "train", "phase"))
    report.plot_compare(path, {a: [read_log(o, "eval") for o in outs] for a, outs in dirs.items()},
                        FORGETTING_PANELS if task == "forgetting" else gapt.TASKS[task].panels,
                        what(cfg), shaded)
    print(f"figure: {path}\nresults: {os.path.join(cfg['out_dir'], 'results.json')}")
    if gapts and task != "forgetting":
        report.plot_phases(os.path.join(here, "phases.png"), {a: read_log(
            dirs[a][0], "train", "phase", "ce", "mbe") for a in gapts}, seed)
    report.plot_cycle(os.path.join(here, "cycle.png"), {
        arm: [read_log(o, "align", "cos") for o in outs] for arm, outs in dirs.items()}, seed)


def what(cfg):   # a comparison's figure's title: the task, its layout or corpus, M's layers
    if cfg["task"] == "forgetting":
        return "forgetting toy"
    data_of = {"arithmetic": f"{cfg['arith_layout']} layout, ", "text": f"{cfg['data_dir']}, "}
    return f"{cfg['task']} ({data_of.get(cfg['task'], '')}M: layers {gapt.resolve(cfg)['layers']})"


def t_quantile(p, df):
    """Student's t quantile (p > 0.5, integer df) by bisection on the exact CDF: P(|T| < t) is a
    finite sum in cos(theta)^2, theta = atan(t / sqrt(df)) (Abramowitz & Stegun 26.7.3-4)."""
    def central(t):   # P(|T| < t)
        th = math.atan(t / math.sqrt(df))
        sin, cos, term, total = math.sin(th), math.cos(th), 1.0, 0.0
        for j in range(df // 2):
            total += term
            term *= cos ** 2 * (2 * j + 1 + df % 2) / (2 * j + 2 + df % 2)
        return sin * total if df % 2 == 0 else 2 / math.pi * (th + sin * cos * total)
    lo, hi = 0.0, 1.0
    while central(hi) < 2 * p - 1:
        lo, hi = hi, 2 * hi
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if central(mid) < 2 * p - 1 else (lo, mid)
    return (lo + hi) / 2


def paired_diff(base, other, level=0.95):
    """Mean of other - base over seeds, paired by seed (the arms share data and seeds), and its
    paired t interval, mean +- t_{(1+level)/2, n-1} * sd / sqrt(n); None for a single seed."""
    d = np.asarray(other, dtype=float) - np.asarray(base, dtype=float)
    if len(d) < 2:
        return {"diff": float(d.mean()), "ci95": None}
    half = t_quantile((1 + level) / 2, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
    return {"diff": float(d.mean()), "ci95": [float(d.mean() - half), float(d.mean() + half)]}


def welch_diff(base, other, level=0.95):
    """mean(other) - mean(base) for runs that share no data, and Welch's t interval: half-width
    t * sqrt(va/na + vb/nb), with the Welch-Satterthwaite df rounded down (a little wider)."""
    a, b = np.asarray(base, dtype=float), np.asarray(other, dtype=float)
    d = float(b.mean() - a.mean())
    if min(len(a), len(b)) < 2:
        return {"diff": d, "ci95": None}
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1)) if va + vb else 1
    half = t_quantile((1 + level) / 2, max(1, int(df))) * math.sqrt(va + vb)
    return {"diff": d, "ci95": [d - half, d + half]}


def compare_table(dirs, arms=None, against=None):
    """Each arm's final evals: mean and std over seeds, its share of steps compressing and its
    completed memorise -> compress -> memorise cycles, and each other arm's difference from each
    arm in against (default: the first) under "vs_<arm>", paired by seed where the two see the
    same data (arms: {arm: flags}), else Welch's. Where the runs have an OOD test set, the same
    again at each run's eval of lowest OOD answer CE (test_selected), also against the first
    arm's final evals."""
    arms, against = arms or {a: {} for a in dirs}, against or [next(iter(dirs))]
    evals = {a: [read_log(o, "eval") for o in outs] for a, outs in dirs.items()}
    if empty := [o for a, outs in dirs.items() for o, e in zip(outs, evals[a]) if not e]:
        raise TrainingError(f"{empty[0]}/log.jsonl holds no eval: delete that folder and resume")
    final = {a: [{**e[-1], **report.phase_shares(read_log(o, "train", "phase"))}
                 for o, e in zip(dirs[a], es)] for a, es in evals.items()}
    table = summarize(final, final, arms, against, "final")
    for arm in (a for a in dirs if a.startswith("gapt")):
        if not any(f["compressing"] for f in final[arm]):
            print(f"{arm} never compressed: its intervals compare the baseline with itself")
    if all("ood_ce" in e for es in evals.values() for run in es for e in run):
        best = {a: [min(run, key=lambda e: e["ood_ce"]) for run in es] for a, es in evals.items()}
        at = sorted({e["step"] for runs_ in best.values() for e in runs_})
        print(f"\nSelected on the test set: each run at its eval of lowest OOD answer CE (steps "
              f"{at[0]}-{at[-1]}), as early stopping on it reports; optimistic by construction")
        picked = summarize(best, best, arms, against[:1], "selected")
        vs_final = summarize(best, final, arms, against[:1], "selected", "the baseline's final",
                             rows=False)
        for arm in table:
            table[arm]["test_selected"] = picked[arm]
            table[arm]["test_selected_vs_final"] = vs_final[arm].get(f"vs_{against[0]}")
    return table


def summarize(runs_, base_runs, arms, against, what, label=None, rows=True):
    """Print runs' metrics (mean +- std per arm) and each arm's difference from each arm in
    against, taken on base_runs (markdown); return them as {arm: {metric: (mean, std),
    "vs_<base>": ...}}."""
    first = next(iter(runs_))
    keys = [k for k, v in runs_[first][0].items() if isinstance(v, float) and all(
        isinstance(f.get(k), (int, float)) for fs in (*runs_.values(), *base_runs.values())
        for f in fs)]
    vals = {arm: {k: [f[k] for f in fs] for k in keys} for arm, fs in runs_.items()}
    table = {arm: {k: (float(np.mean(v)), float(report.sd(v))) for k, v in row.items()}
             for arm, row in vals.items()}
    head = " | ".join(keys) + " |\n" + "|---" * (len(keys) + 1) + "|"
    if rows:
        print(f"\n| arm (n={len(runs_[first])}), {what} | {head}")
        for arm, row in table.items():
            print(f"| {arm} | " + " | ".join(f"{m:.4f} ± {s:.4f}" for m, s in row.values()) + " |")
    for base in against:
        if len(runs_) > 1:
            print(f"\n| arm, {what} - {base}, {label or what}: mean [95% t interval] | {head}")
        for arm in (a for a in runs_ if a != base):
            same = all(arms[arm].get(k) == arms[base].get(k) for k in DATA)   # the same data
            diffs = {k: (paired_diff if same else welch_diff)(
                [f[k] for f in base_runs[base]], vals[arm][k]) for k in keys}
            table[arm]["vs_" + base] = diffs
            lohi = [d["ci95"] or (math.nan, math.nan) for d in diffs.values()]   # nan: one seed
            print(f"| {arm} ({'paired' if same else 'Welch'}) | " + " | ".join(
                f"{d['diff']:+.4f} [{lo:+.4f}, {hi:+.4f}]" for d, (lo, hi) in
                zip(diffs.values(), lohi)) + " |")
    return table


# -----------------------------------------------------------------------------
# Benchmark (--bench): what compression costs on top of language modelling. The modes take
# turns on one model and one batch of random tokens of the task's vocabulary and context (no
# data loading, one micro-batch a step), so machine noise hits them alike; ratios are medians
# of the ratios within each turn.


def renyi_entropy(Z, alpha):
    """The MBE's definition for any order alpha > 0, from the eigenvalues of G / tr G, G = Z Z^T of
    windows Z (..., N, D) -> (...,) nats. --bench times the closed form against it; for analysis."""
    G = Z.float() @ Z.float().transpose(-1, -2)
    tr, N = G.diagonal(dim1=-2, dim2=-1).sum(-1), G.shape[-1]
    ok = G.square().sum((-2, -1)) != 0                 # Z = 0 (or underflow): 0; NaN stays NaN
    eye = torch.eye(N, dtype=G.dtype, device=G.device)  # Z = 0 is swapped for I: no NaN gradients
    A = torch.where(ok[..., None, None], G, eye) / torch.where(ok, tr, N)[..., None, None]
    lam = torch.linalg.eigvalsh(A).clamp(min=0)        # (..., N): a probability distribution
    S = (-(lam * torch.log(torch.where(lam > 0, lam, 1.0))).sum(-1) if alpha == 1   # 0 log 0 = 0
         else torch.log(lam.pow(alpha).sum(-1)) / (1 - alpha))
    return torch.where(ok, S, 0.0).clamp(0.0, math.log(N))


def bench(cfg):
    """Median step times of a plain loop and of GAPT's phases, the MBE's share, the closed form."""
    if cfg["task"] == "forgetting" or cfg["compare"] or cfg["init_from"] != "scratch":
        raise ConfigError("--bench times a fresh GPT in one process, no --init_from or --compare: "
                          "python experiments.py --bench [--task=text --model=...]")
    device, ctx, scaler, _ = gapt.setup_device(cfg)
    cfg = gapt.resolve(cfg)
    B, T, P, D = cfg["batch_size"], cfg["block_size"], cfg["patch_size"], cfg["n_embd"]
    raw, optimizers = gapt.build(cfg, device)
    model, gpt = gapt.IBLM(raw, cfg["layers"], P), raw    # the GAPT steps' model, the plain step's
    if cfg["compile"] == "on":                          # setup_device resolved "auto"
        model, gpt = torch.compile(model), torch.compile(gpt)
    x, y = (torch.randint(cfg["vocab_size"], (B, T), device=device) for _ in range(2))
    lag = gapt.ReadLag(int(cfg["read_lag"]))

    def train_step(phase):   # train()'s step, one micro-batch; phase 0: a plain loop, CE only
        zero = torch.zeros((), device=device)
        with ctx:
            ce, M = model(x, y, phase == COMPRESS) if phase else (gpt(x, y)[1], zero)
        scaler.scale(gapt.iblm_loss(ce, M, phase, cfg["mbe_weight"])).backward()
        stats = torch.stack([ce.detach().float(), M.detach(), zero + phase])
        stats = gapt.update(raw, optimizers, scaler, cfg, stats)
        if phase:                                   # the host reads CE and M lag steps later
            list(lag.ready(SimpleNamespace(phase=phase, numbers=stats)))

    sync = getattr(torch, device.type).synchronize      # torch.cpu's does nothing

    def clock(fn, reps=1):   # seconds per call; a GPU's queue is drained at both ends only
        sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        sync()
        return (time.perf_counter() - t0) / reps

    median = lambda fn, n=20: float(np.median([clock(fn) for _ in range(n)]))   # noqa: E731
    modes = {"plain PyTorch": 0, "gapt memorise": MEMORIZE, "gapt compress": COMPRESS}
    names, k = list(modes), 1 if device.type == "cpu" else 5   # k steps a reading: drains are rare
    for phase in modes.values():
        clock(lambda: train_step(phase), 3)                  # warm-up (and compilation)
    ts = {m: [] for m in modes}
    for i in range(-(-cfg["bench_steps"] // k)):       # the modes take turns, in rotating order
        for m in names[i % 3:] + names[:i % 3]:
            ts[m].append(clock(lambda: train_step(modes[m]), k))
    with torch.no_grad(), ctx:                         # the MBE alone, on this model's outputs
        hs = [h.detach().requires_grad_() for h in raw(x)[2]]
    Z = torch.stack([hs[i].detach().reshape(-1, P, D) for i in cfg["layers"]])   # (L, B*T/P, P, D)
    with torch.no_grad():
        watch = median(lambda: gapt.layer_mbe(hs, cfg["layers"], P))
        closed, eig = median(lambda: gapt.matrix_entropy(Z)), median(lambda: renyi_entropy(Z, 1.0))
    learn = median(lambda: gapt.layer_mbe(hs, cfg["layers"], P).mean().backward())
    n = raw.num_params() - raw.transformer.wpe.weight.numel()
    flops = 6 * n + 12 * cfg["n_layer"] * D * T         # per token, as nanoGPT's MFU counts them
    report.bench_table(cfg, device, ts, k, lag.lag, raw.num_params(), flops, (watch, learn),
                       (closed, eig, tuple(Z.shape)))

# -----------------------------------------------------------------------------


def run(cfg):
    if not (cfg["bench"] or cfg["compare"] or cfg["task"] == "forgetting"):
        raise ConfigError("experiments.py runs --compare, --bench or --task=forgetting; "
                          "one run is python gapt.py")
    if "RANK" in os.environ:   # the toy, the benchmark and each arm run in this one process
        raise ConfigError("experiments.py runs in one process: launch it with python, not torchrun")
    return bench(cfg) if cfg["bench"] else compare(cfg) if cfg["compare"] else forgetting(cfg)


def choices():   # gapt.py's, and the toy: read when parsing, so that a task added to TASKS is one
    return {**gapt.CHOICES, "task": (*gapt.TASKS, "forgetting")}


def parse_args(argv):
    return gapt.parse_args(argv, FLAGS + gapt.CONFIG, choices(), __doc__)


def main(argv=None):   # gapt.py's: the same one-line errors, exit codes and resume line
    return gapt.main(argv, parse_args, run, __file__)


if __name__ == "__main__":
    sys.exit(main())
