"""
GAPT (Gated Phase Transition): one training run of a GPT-2 that alternates between memorising
(cross-entropy, CE) and compressing (CE plus the matrix-based entropy, MBE, of its
representations). Paper: Fangyuan Yu, "Memorization-Compression Cycles Improve Generalization",
arXiv 2505.08727 (2025).

    python gapt.py                                   # tiny GPT on arithmetic, CPU, ~3 minutes
    python gapt.py --phase_mode=memorize             # the CE-only baseline, same data and seed
    python gapt.py --task=text --data_dir=data/text  # pretraining on token shards (see data.py)
    python gapt.py --task=text --model=gpt2 --data_dir=data/fineweb10B   # one GPU
    torchrun --standalone --nproc_per_node=8 gapt.py --task=text --model=gpt2 \\
        --total_batch_size=524288 --batch_size=32     # 8 GPUs (nccl), or CPU processes (gloo)
    torchrun --nnodes=2 --node_rank=0 --rdzv_endpoint=HOST:29500 --nproc_per_node=8 gapt.py ...
    python gapt.py --optimizer=muon                  # Muon for the blocks' matrices
    python gapt.py --task=text --init_from=gpt2      # GAPT on GPT-2's pretrained weights
    python gapt.py --init_from=resume                # go on from out_dir's checkpoint
    python gapt.py --help                            # every flag, its default and meaning

Read top to bottom: config -> model -> MBE -> IBLM -> GAPT -> tasks -> the training loop, then
where a run starts and ends: GPT-2's weights, checkpoints, the run folder, the summary.
experiments.py runs many of these (comparisons over seeds), the forgetting toy and a benchmark.
Importing this file has no side effects; everything runs under __main__.
"""
import argparse
import datetime
import fcntl
import glob
import hashlib
import io
import json
import math
import os
import random
import re
import shlex
import signal
import sys
import time
import warnings
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass

try:
    import numpy as np
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    import data
except KeyboardInterrupt:   # Ctrl-C while torch loads, the first second: one line, no traceback
    sys.stderr.write("stopped (Ctrl-C) while starting; nothing to resume\n")
    sys.exit(130)

# -----------------------------------------------------------------------------
# Config: flat defaults, each with its meaning. Override with --key=value (or --key value).

CONFIG = [
    "what to run",
    ("task", "arithmetic", "arithmetic (built in) | text (token shards made by data.py)"),
    ("phase_mode", "gapt", "gapt (switch) | memorize (CE only: baseline) | compress (CE + MBE)"),
    ("out_dir", "out", "log.jsonl, config.json, ckpt.pt and curves.png go here"),
    ("init_from", "scratch", "scratch | resume (out_dir/ckpt.pt) | gpt2[-medium|-large|-xl]"),
    ("weights", "", "--init_from=gpt2*: model.safetensors or pytorch_model.bin (none: download)"),
    ("seed", 1337, "seeds the model init, the data stream and dropout"),
    ("device", "auto", "auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps"),
    ("dtype", "auto", "auto (bfloat16 on cuda if supported) | float32 | bfloat16 | float16 (cuda)"),
    ("compile", "auto", "torch.compile the model and its MBE: auto (on for cuda) | on | off"),
    ("read_lag", "auto", "steps before the host reads CE and M: auto (1 on cuda, else 0) | 0 | 1"),
    ("dist_timeout", 1800, "torchrun: seconds a process waits for the others, then stops"),
    "model",
    ("model", "tiny", "tiny (4 layers, 4 heads, 128 wide) | small (6/6/384) | gpt2 (12/12/768)"),
    ("n_layer", 0, "transformer blocks (0 = from --model)"),
    ("n_head", 0, "attention heads (0 = from --model)"),
    ("n_embd", 0, "residual width (0 = from --model)"),
    ("block_size", 0, "context (0 = the task's: arithmetic ~24, packed 32, text 256, gpt2 1024)"),
    ("dropout", 0.0, "dropout probability"),
    ("bias", True, "biases in Linear and LayerNorm layers, as GPT-2"),
    "GAPT: MBE, the IBLM loss and the phase controller",
    ("mbe_weight", 1.0, "weight of M in the compression phase: L = CE + mbe_weight * M"),
    ("patch_size", 8, "MBE window: entropy of each run of patch_size consecutive tokens"),
    ("mbe_layers", "inner", "layers in M: inner (all but first and last) | all | a list like 1,2"),
    ("p_m", 100, "memorisation patience: steps without a CE gain > delta_ce, then compress"),
    ("p_c", 50, "compression patience: steps without an MBE gain > delta_mbe, then memorise"),
    ("delta_ce", 0.01, "CE improvement (nats) that resets the memorisation patience"),
    ("delta_mbe", 0.002, "MBE improvement (nats) that resets the compression patience"),
    ("tau", 0.1, "CE spike: compression ends when CE > (1 + tau) * its best in the phase"),
    "arithmetic task",
    ("digits_min", 1, "smallest operand digit count in training (paper: 1)"),
    ("digits_max", 2, "largest operand digit count in training (paper: 3)"),
    ("ood_digits_min", 3, "smallest operand digit count, out-of-distribution (OOD) test (paper 4)"),
    ("ood_digits_max", 3, "largest operand digit count, OOD test (paper 6)"),
    ("reverse_answer", True, "write the product least-significant digit first (learnable fast)"),
    ("n_eval", 512, "problems in each fixed test set (ID and OOD)"),
    ("arith_layout", "padded", "padded (a problem a row) | packed (the author's: stream windows)"),
    ("arith_loss", "answer", "training loss on: answer (tokens) | all (tokens); tests: answers"),
    "text task",
    ("data_dir", "data/fineweb10B", "folder of *_train_*.bin and *_val_*.bin shards (data.py)"),
    ("val_tokens", 65536, "fixed validation budget: the same val tokens at every eval"),
    ("tokenizer_file", "", "a GPT-2 .tiktoken file, for offline machines ($GAPT_TOKENIZER_FILE)"),
    "optimisation",
    ("batch_size", 64, "micro-batch size in sequences, per process"),
    ("total_batch_size", 0, "tokens per optimizer step, all processes (0 = one micro-batch each)"),
    ("max_iters", 2000, "optimizer steps"),
    ("learning_rate", 1e-3, "peak learning rate (AdamW)"),
    ("min_lr", 1e-4, "learning rate at the end of the cosine decay (at most --learning_rate)"),
    ("warmup_iters", 100, "linear warmup steps"),
    ("weight_decay", 0.1, "AdamW decay, on 2-D weights only"),
    ("beta1", 0.9, "AdamW beta1"),
    ("beta2", 0.99, "AdamW beta2"),
    ("optimizer", "adamw", "adamw | muon (Muon for the blocks' matrices, AdamW for the rest)"),
    ("muon_lr", 0.02, "--optimizer=muon: Muon's peak learning rate (scheduled as the lr)"),
    ("muon_weight_decay", 0.0, "--optimizer=muon: Muon's decoupled weight decay"),
    ("grad_clip", 1.0, "clip the gradient norm to this (0 = off)"),
    "evaluation and logging",
    ("eval_interval", 250, "steps between evals and checkpoints (0 = only the last checkpoint)"),
    ("log_interval", 50, "steps between printed lines (every step goes to log.jsonl)"),
    ("align_interval", 0, "every K steps log cos(grad CE, grad MBE) (0 = off)"),
    ("max_bad_steps", 3, "stop after this many steps in a row with a non-finite loss or gradient"),
    "sampling from out_dir's checkpoint (python gapt.py --sample='7 x 8' or --sample='Once')",
    ("sample", "", "a prompt to continue, then exit: text, or a problem like '7 x 8'"),
    ("num_samples", 3, "--sample: how many continuations (with --temperature > 0)"),
    ("temperature", 0.0, "--sample: 0 = greedy (the argmax), else softmax(logits / temperature)"),
]
DEFAULTS = {c[0]: c[1] for c in CONFIG if isinstance(c, tuple)}   # a string heads a group of flags
CHOICES = {"task": ("arithmetic", "text"), "phase_mode": ("gapt", "memorize", "compress"),
           "init_from": ("scratch", "resume", "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"),
           "dtype": ("auto", "float32", "bfloat16", "float16"),
           "compile": ("auto", "on", "off"), "read_lag": ("auto", "0", "1"),
           "model": ("tiny", "small", "gpt2"), "optimizer": ("adamw", "muon"),
           "arith_layout": ("padded", "packed"), "arith_loss": ("answer", "all")}
PRESETS = {"tiny": (4, 4, 128), "small": (6, 6, 384), "gpt2": (12, 12, 768)}
# flags of experiments.py, which runs many of these runs: gapt.py names the command to use instead
EXPERIMENTS = ("--compare", "--seeds", "--fig", "--bench", "--task=forgetting", "--forget_m")


class ConfigError(ValueError):
    """Bad input from the user: one line, exit code 2, nothing written."""


class TrainingError(RuntimeError):
    """A run that cannot go on (e.g. persistent NaNs): one line, exit code 1."""


class Parser(argparse.ArgumentParser):
    def error(self, message):   # one line, not argparse's usage block
        raise ConfigError(message.removeprefix("argument "))


def boolean(text):   # --flag=yes|no, true|false, on|off, 1|0
    if text.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        raise ValueError(text)
    return text.lower() in ("1", "true", "yes", "on")


def parse_args(argv, table=CONFIG, choices=CHOICES, doc=__doc__):
    """Flags -> the config dict, checked. experiments.py passes its flags + CONFIG as table."""
    if table is CONFIG and (moved := [a for a in argv if a.startswith(EXPERIMENTS)]):
        raise ConfigError(f"{moved[0]} runs in experiments.py: python experiments.py "
                          f"{shlex.join(argv)}")
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
        raise ConfigError(f"unknown flag {rest[0].partition('=')[0]} (see --help)"
                          if rest[0].startswith("-") else
                          f"unexpected argument '{rest[0]}': use --key=value (see --help)")
    return validate(vars(args))


def validate(cfg):
    """Reject values that would fail later, or silently do the wrong thing."""
    positive = ("p_m", "p_c", "batch_size", "max_iters", "patch_size", "n_eval", "log_interval",
                "max_bad_steps", "val_tokens", "dist_timeout", "num_samples", "seeds",
                "bench_steps")
    for key, v in cfg.items():   # every number is finite and >= 0, these > 0
        number = type(v) in (int, float)
        if number and not (math.isfinite(v) and (v > 0 or v == 0 and key not in positive)):
            raise ConfigError(f"--{key}={v}: must be " + ("positive" if key in positive else
                                                          ">= 0") + " and finite")
    for key in ("beta1", "beta2", "dropout"):
        if cfg[key] >= 1:
            raise ConfigError(f"--{key}={cfg[key]}: must be in [0, 1)")
    digits = (cfg["digits_min"], cfg["digits_max"], cfg["ood_digits_min"], cfg["ood_digits_max"])
    for bad, message in (
            (not cfg["out_dir"].strip(), "--out_dir is empty: name a folder for the run"),
            (not 0 < cfg["learning_rate"] <= 1e30 or cfg["min_lr"] > 1e30,   # Adam overflows
             f"--learning_rate={cfg['learning_rate']} (--min_lr={cfg['min_lr']}): must be in "
             f"(0, 1e30]"),
            (not 0 < cfg["muon_lr"] <= 1e30, f"--muon_lr={cfg['muon_lr']}: must be in (0, 1e30]"),
            (cfg["seed"] + cfg.get("seeds", 1) > 2**63,       # torch and numpy seeds are 64-bit
             f"--seed={cfg['seed']}: must be below 2**63 (less --seeds)"),
            (cfg["dist_timeout"] > 10**9, f"--dist_timeout={cfg['dist_timeout']}: at most 10**9 s"),
            (cfg["weights"] and not cfg["init_from"].startswith("gpt2"),
             f"--weights is read by --init_from=gpt2*, not --init_from={cfg['init_from']}"),
            (not 1 <= digits[0] <= digits[1] < digits[2] <= digits[3] <= 9,   # OOD: larger
             "digit ranges need 1 <= --digits_min <= --digits_max < --ood_digits_min <= "
             "--ood_digits_max <= 9")):
        if bad:
            raise ConfigError(message)
    return cfg


def resolve(cfg):
    """Fill in what depends on the task: model shape, context length, vocabulary, MBE layers."""
    cfg = dict(cfg)
    for key, v in zip(("n_layer", "n_head", "n_embd"), PRESETS[cfg["model"]]):
        cfg[key] = cfg[key] or v
    if cfg["n_embd"] % cfg["n_head"]:
        raise ConfigError(f"--n_embd={cfg['n_embd']} must be divisible by --n_head={cfg['n_head']}")
    cfg["block_size"] = cfg["block_size"] or TASKS[cfg["task"]].context(cfg)
    if cfg["block_size"] % cfg["patch_size"]:
        raise ConfigError(f"--block_size={cfg['block_size']} is not divisible by "
                          f"--patch_size={cfg['patch_size']}")
    cfg["vocab_size"] = TASKS[cfg["task"]].vocab_size
    cfg.setdefault("vocab_real", 0)   # GPT-2's weights set it: ids from it on are padding
    cfg["layers"] = mbe_layer_ids(cfg["mbe_layers"], cfg["n_layer"])
    return cfg


def mbe_layer_ids(spec, n_layer):
    """Which blocks' outputs form the compression target M."""
    if spec == "all" or (spec == "inner" and n_layer < 3):
        return list(range(n_layer))
    if spec == "inner":   # the first block still embeds tokens, the last already predicts them
        return list(range(1, n_layer - 1))
    try:
        ids = sorted({int(s) for s in spec.split(",")})
    except ValueError:
        raise ConfigError(f"--mbe_layers={spec}: use inner, all, or a list like 1,2") from None
    if not ids or ids[0] < 0 or ids[-1] >= n_layer:
        raise ConfigError(f"--mbe_layers={spec}: layers must be in 0..{n_layer - 1}")
    return ids

# -----------------------------------------------------------------------------
# Model: GPT-2 as in nanoGPT. Parameter names follow Hugging Face's GPT-2, so its
# weights load by name (--init_from=gpt2, load_gpt2 below); the forward pass also returns
# the residual stream after every block, the representations whose entropy GAPT compresses.


@dataclass
class GPTConfig:
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    block_size: int = 1024
    vocab_size: int = 50257
    dropout: float = 0.0
    bias: bool = True
    vocab_real: int = 0   # ids >= vocab_real are padding (logit -inf); 0: every id is a token


class CausalSelfAttention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.n_head, self.dropout = c.n_head, c.dropout
        self.c_attn = nn.Linear(c.n_embd, 3 * c.n_embd, bias=c.bias)   # q, k, v in one matmul
        self.c_proj = nn.Linear(c.n_embd, c.n_embd, bias=c.bias)
        self.resid_dropout = nn.Dropout(c.dropout)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, nh, T, hs): heads become a batch dimension
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,   # flash attention if there
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)             # heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c_fc = nn.Linear(c.n_embd, 4 * c.n_embd, bias=c.bias)
        self.c_proj = nn.Linear(4 * c.n_embd, c.n_embd, bias=c.bias)
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.ln_1 = nn.LayerNorm(c.n_embd, bias=c.bias)
        self.attn = CausalSelfAttention(c)
        self.ln_2 = nn.LayerNorm(c.n_embd, bias=c.bias)
        self.mlp = MLP(c)

    def forward(self, x):   # pre-LayerNorm residual block
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.config = c
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(c.vocab_size, c.n_embd),
            wpe=nn.Embedding(c.block_size, c.n_embd),   # learned positions, as GPT-2
            drop=nn.Dropout(c.dropout),
            h=nn.ModuleList([Block(c) for _ in range(c.n_layer)]),
            ln_f=nn.LayerNorm(c.n_embd, bias=c.bias)))
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight   # weight tying, as GPT-2
        self.apply(self._init_weights)
        for name, p in self.named_parameters():   # GPT-2: residual projections / sqrt(2 * n_layer)
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * c.n_layer))

    def _init_weights(self, m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx, targets=None):
        """idx (B, T) token ids; targets (B, T) with -1 where there is nothing to predict.
        Returns logits (B, T, vocab), the mean CE over targets (or None), and the
        residual stream after each block: a list of n_layer tensors (B, T, n_embd)."""
        T = idx.shape[1]
        pos = torch.arange(T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        hs = []
        for block in self.transformer.h:
            x = block(x)
            hs.append(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        if self.config.vocab_real:   # GPT-2's zero padding rows give logit 0, far above its real
            logits[..., self.config.vocab_real:] = float("-inf")   # ones: no probability there
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                                   ignore_index=-1)
        return logits, loss, hs

    def num_params(self):
        return sum(p.numel() for p in self.parameters())   # tied weights are counted once

# -----------------------------------------------------------------------------
# Matrix-based entropy (MBE). For N token representations Z (N, D) the Gram
# matrix G = Z Z^T, normalised to unit trace, A = G / tr(G), has eigenvalues
# that form a probability distribution; its Renyi entropy of order alpha is
#     S_alpha(A) = log(sum_i lambda_i^alpha) / (1 - alpha),  S_1 = -sum_i lambda_i log lambda_i.
# It is 0 when all N representations lie on one line (rank one) and log N when
# they are orthogonal with equal norms: a measure of how many directions the
# layer spreads these tokens over. For alpha = 2, sum_i lambda_i^2 = ||A||_F^2,
# so S_2 = 2 log tr(G) - log ||G||_F^2: no eigendecomposition, just the Gram matrix.


def matrix_entropy(Z):
    """MBE of windows of token representations: Z (..., N, D) -> S_2 (...,) nats, in [0, log N].
    This is the function training runs (through layer_mbe): change it to change the MBE.
    Computed in at least float32, also inside autocast; 0 with a zero gradient for Z = 0."""
    with torch.autocast(Z.device.type, enabled=False):
        Z = Z.to(torch.promote_types(Z.dtype, torch.float32))
        G = Z @ Z.transpose(-1, -2)                                  # Gram matrices (..., N, N)
    tiny = torch.finfo(G.dtype).tiny                  # Z = 0: log tiny < 0, clamped to 0, no grad
    lt = torch.log(G.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(tiny))   # log tr G
    S = lt + lt - torch.log(G.square().sum((-2, -1)).clamp_min(tiny))      # - log ||G||_F^2
    return S.clamp(0.0, math.log(G.shape[-1]))        # clamp: rounding only (and Z = 0)


def layer_mbe(hs, layers, patch_size):
    """MBE of the chosen layers: hs, the block outputs (B, T, D) -> (len(layers),) nats, each the
    mean S_2 over non-overlapping windows of patch_size consecutive tokens (the author's setup).
    The windows are views (B*T/P, P, D): nothing larger than their Gram blocks is formed."""
    T, D = hs[0].shape[1:]
    if T % patch_size:
        raise ValueError(f"sequence length {T} is not divisible by patch_size {patch_size}")
    return torch.stack([matrix_entropy(hs[i].reshape(-1, patch_size, D)).mean() for i in layers])

# -----------------------------------------------------------------------------
# IBLM: Information Bottleneck Language Modelling asks for the representations
# of least entropy among those that predict optimally:  min MBE  s.t.  CE = CE*.
# GAPT does not solve that constrained problem at once; it alternates. In the
# memorisation phase it minimises CE alone (approach the constraint); in the
# compression phase it adds the MBE term, L = CE + mbe_weight * M (descend the
# objective while CE stays in the loss, so prediction is held near its best).
# The controller below watches CE to leave the compression phase as soon as
# the constraint is visibly violated: a penalty method with a gate.


def iblm_loss(ce, mbe, phase, mbe_weight):
    """Memorise (phase 1): L = CE. Compress (phase 2): L = CE + mbe_weight * M."""
    return ce + mbe_weight * mbe if phase == 2 else ce


class IBLM(nn.Module):
    """The objective's two terms from one forward pass: the GPT's CE and M, the mean MBE of the
    chosen layers. One module, so torch.compile makes one graph of the model and its MBE. In
    memorisation M is only watched: it is computed from detached representations, no gradient."""

    def __init__(self, gpt, layers, patch_size):
        super().__init__()
        self.gpt, self.layers, self.patch_size = gpt, layers, patch_size

    def forward(self, idx, targets, compress):
        _, ce, hs = self.gpt(idx, targets)
        hs = hs if compress else [h.detach() for h in hs]
        return ce, layer_mbe(hs, self.layers, self.patch_size).mean()

# -----------------------------------------------------------------------------
# GAPT: the gated phase transition (the paper's Algorithm 1, as reconstructed
# from the author's code). Memorise until CE stops improving for p_m steps;
# then compress until MBE stops improving for p_c steps, or CE spikes above
# (1 + tau) times its best in the phase; repeat. Comparisons are strict.

MEMORIZE, COMPRESS = 1, 2
PHASES = {MEMORIZE: "memorise", COMPRESS: "compress"}


class GAPT:
    def __init__(self, delta_ce=0.01, delta_mbe=0.002, tau=0.1, p_m=100, p_c=50):
        self.delta_ce, self.delta_mbe, self.tau = delta_ce, delta_mbe, tau
        self.p_m, self.p_c = p_m, p_c
        self.phase, self.s_m, self.s_c = MEMORIZE, 0, 0
        self.E_min, self.M_min = math.inf, math.inf   # best CE and MBE seen (reset to compress)
        self.why = None                                # what ended the last phase, and the numbers

    def step(self, ce, mbe):
        """Feed one optimizer step's training CE and compression target M;
        returns the phase for the next optimizer step."""
        improved_ce = self.E_min - ce > self.delta_ce
        spike = ce > (1 + self.tau) * self.E_min
        self.E_min = min(self.E_min, ce)
        if self.phase == MEMORIZE:
            self.s_m = 0 if improved_ce else self.s_m + 1
            if self.s_m >= self.p_m:                       # CE has plateaued: compress
                self.why = {"reason": "CE plateau", "ce": ce, "best_ce": self.E_min}
                self.phase, self.s_c, self.E_min, self.M_min = COMPRESS, 0, math.inf, math.inf
        elif spike:                                        # compression hurts prediction
            self.why = {"reason": "CE spike", "ce": ce, "best_ce": self.E_min}
            self.phase, self.s_m = MEMORIZE, 0
        else:
            self.s_c = 0 if self.M_min - mbe > self.delta_mbe else self.s_c + 1
            self.M_min = min(self.M_min, mbe)
            if self.s_c >= self.p_c:                       # compression has plateaued
                self.why = {"reason": "MBE plateau", "mbe": mbe, "best_mbe": self.M_min}
                self.phase, self.s_m = MEMORIZE, 0
        return self.phase

    def state_dict(self):
        return {k: getattr(self, k) for k in ("phase", "s_m", "s_c", "E_min", "M_min")}

    def load_state_dict(self, sd):
        for k, v in sd.items():
            setattr(self, k, v)


def controller(cfg):
    """GAPT with cfg's thresholds, and the first phase: the controller's under --phase_mode=gapt,
    fixed under memorize (the CE-only baseline) and compress (the static regulariser)."""
    c = GAPT(cfg["delta_ce"], cfg["delta_mbe"], cfg["tau"], cfg["p_m"], cfg["p_c"])
    return c, {"gapt": c.phase, "memorize": MEMORIZE, "compress": COMPRESS}[cfg["phase_mode"]]


# -----------------------------------------------------------------------------
# Tasks and evaluation. What differs between tasks sits in one table, TASKS: the data and fixed
# eval sets (data.py), the vocabulary, the default context and the metrics kept. A new task is
# a data class in data.py and an entry here.


def arithmetic_data(cfg, rank, world):
    """Multiplication problems drawn on the fly, and the fixed ID and OOD test sets."""
    d = data.Arithmetic(cfg["seed"], cfg["block_size"], (cfg["digits_min"], cfg["digits_max"]),
                        (cfg["ood_digits_min"], cfg["ood_digits_max"]), cfg["n_eval"],
                        cfg["reverse_answer"], rank, cfg["arith_layout"], cfg["arith_loss"])
    B = cfg["batch_size"]
    return d, {name: list(zip(x.split(B), y.split(B))) for name, (x, y) in d.eval_sets().items()}


def text_data(cfg, rank, world):
    """Random windows of the token shards, and a fixed budget of validation tokens."""
    d = data.TokenShards(cfg["data_dir"], cfg["block_size"], cfg["seed"], rank, world,
                         vocab_size=50257)   # GPT-2's; the model's rows up to 50304 are padding
    try:
        if cfg["tokenizer_file"]:                 # given: checked now, used for the samples
            data.get_tokenizer(cfg["tokenizer_file"])
        return d, {"val": d.val_batches(cfg["val_tokens"], cfg["batch_size"])}
    except data.DataError as e:
        raise ConfigError(f"--tokenizer_file: {e}") from None
    except ValueError as e:
        raise ConfigError(f"--val_tokens={cfg['val_tokens']}: {e}") from None


def arithmetic_context(cfg):
    """Padded: the longest problem (ID or OOD), rounded up to whole MBE windows. Packed: 32, the
    longest test problem and some context (README)."""
    if cfg["arith_layout"] == "packed":
        return 32
    need = data.arith_len(max(cfg["digits_max"], cfg["ood_digits_max"])) - 1
    return -(-need // cfg["patch_size"]) * cfg["patch_size"]


@dataclass
class Task:
    make: object            # (cfg, rank, world) -> (training data, {name: [(x, y), ...]} eval sets)
    vocab_size: int
    context: object         # cfg -> the default block_size
    metrics: tuple          # evaluate()'s metrics kept, per eval set


TASKS = {"arithmetic": Task(arithmetic_data, data.ARITH_VOCAB, arithmetic_context,
                            ("ce", "acc", "conf", "mbe", "mbe_layers")),
         "text": Task(text_data, 50304,   # GPT-2's 50,257 tokens padded to a multiple of 64: faster
                      lambda cfg: 1024 if cfg["model"] == "gpt2" else 256,
                      ("ce", "mbe", "mbe_layers"))}


def make_data(cfg, rank, world):
    """The task's training data and eval sets. data.py's errors (missing shards, a context too
    short or too long) are bad input."""
    try:
        return TASKS[cfg["task"]].make(cfg, rank, world)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(str(e)) from None


@torch.no_grad()
def evaluate(model, batches, cfg, device, ctx):
    """CE on the target tokens only (arithmetic: the answer, the paper's "masked entropy"), exact
    match, confidence and the MBE of every layer. Exact match needs no decoding loop: greedy
    decoding reproduces the answer when, given the true prefix, the argmax is the target at every
    answer position (and so, inductively, greedy follows the true prefix)."""
    nll = tokens = exact = seqs = conf = 0.0
    mbe = torch.zeros(cfg["n_layer"])
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with ctx:
            logits, _, hs = model(x, y)
        logp, mask = logits.float().log_softmax(-1), y >= 0                # (B, T, V), (B, T)
        nll -= (logp.gather(-1, y.clamp(min=0)[..., None])[..., 0] * mask).sum().item()
        tokens += mask.sum().item()
        exact += ((logp.argmax(-1) == y) | ~mask).all(-1).sum().item()
        conf += (logp.max(-1).values.exp() * mask).sum().item()     # the model's own top token's p
        mbe += layer_mbe(hs, range(len(hs)), cfg["patch_size"]).cpu() * len(x)
        seqs += len(x)
    mbe /= seqs
    return {"ce": nll / tokens, "acc": exact / seqs, "conf": conf / tokens,
            "mbe": mbe[cfg["layers"]].mean().item(),
            "mbe_layers": [round(v, 5) for v in mbe.tolist()]}


def run_eval(model, evals, cfg, device, ctx):
    """{set_metric: value} over the task's eval sets and metrics."""
    model.eval()
    keep = TASKS[cfg["task"]].metrics
    out = {f"{name}_{k}": v for name, batches in evals.items()
           for k, v in evaluate(model, batches, cfg, device, ctx).items() if k in keep}
    model.train()
    return out


def grad_alignment(model, x, y, cfg):
    """The paper's cycle observation: cosine between grad(CE) and grad(M) over the parameters M
    depends on (the embeddings and the blocks up to the last regularised layer), and per block (0
    above it). Positive: lowering CE also compresses; negative: the two pull apart."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    _, ce, hs = model(x, y)
    M = layer_mbe(hs, cfg["layers"], cfg["patch_size"]).mean()
    g_ce = torch.autograd.grad(ce, list(params.values()), retain_graph=True, allow_unused=True)
    g_m = torch.autograd.grad(M, list(params.values()), allow_unused=True)

    def cos(prefix):   # over the parameters whose names start with prefix; 0 where M has none
        pairs = [(a, b) for n, a, b in zip(params, g_ce, g_m)
                 if n.startswith(prefix) and a is not None and b is not None]
        a, b = (torch.cat([p[i].flatten() for p in pairs]) if pairs else torch.zeros(1)
                for i in (0, 1))
        return F.cosine_similarity(a.float(), b.float(), dim=0, eps=1e-12).item()
    return cos(""), [cos(f"transformer.h.{i}.") for i in range(cfg["n_layer"])]

# -----------------------------------------------------------------------------
# Training loop: the device, the model and optimizer, the schedule, then train(), whose step
# reads forward (CE and M) -> IBLM loss -> backward -> clipped update -> the next phase.


def setup_device(cfg):
    """(device, autocast context, grad scaler, (ddp, rank, world)): one code path for cpu, mps and
    cuda. Resolves cfg's "auto" dtype, compile and read_lag for the device."""
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ   # launched by torchrun
    rank, local, world = (int(os.environ.get(k, d))
                          for k, d in (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)))
    dev, mps = cfg["device"], torch.backends.mps.is_available()
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"
    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    try:   # torch keeps a CUDA index in 8 bits (cuda:200 is -56): check it is one of ours
        device = torch.device(dev)
        ok = {"cpu": True, "mps": mps, "cuda": 0 <= (device.index or 0) < n_gpus}[device.type]
    except (RuntimeError, KeyError):
        ok = False
    if not ok:
        raise ConfigError(f"--device={dev}: no such device on this machine (auto, cpu, cuda, "
                          f"cuda:N, mps)")
    if ddp:
        timeout = datetime.timedelta(seconds=cfg["dist_timeout"])
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                             timeout=timeout)
    cuda = device.type == "cuda"
    if cuda:   # set_device needs an index: the local rank, or N of cuda:N, or 0
        device = torch.device("cuda", local if ddp else device.index or 0)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    auto = {"dtype": "bfloat16" if cuda and torch.cuda.is_bf16_supported() else "float32",
            "compile": "on" if cuda else "off",   # where one graph of GPT and MBE pays off
            "read_lag": "1" if cuda else "0"}     # see train(): only a GPU's queue gains
    cfg.update({k: v for k, v in auto.items() if cfg[k] == "auto"})
    if cfg["dtype"] == "float16" and not cuda:
        raise ConfigError("--dtype=float16 needs a CUDA device (use bfloat16 or float32)")
    dtype = getattr(torch, cfg["dtype"])
    ctx = nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    return device, ctx, scaler, (ddp, rank, world)


def build(cfg, device, gpt2=None):
    """The GPT, initialised from --seed or from GPT-2's state dict gpt2 (load_gpt2), and its
    optimizers: [AdamW], weight decay on 2-D weights only (not biases, LayerNorms), or with
    --optimizer=muon [Muon, AdamW]: Muon (orthogonalised momentum, as in the paper's
    modded-nanogpt runs) for the blocks' attention and MLP matrices, AdamW for the rest."""
    torch.manual_seed(cfg["seed"])
    model = GPT(GPTConfig(**{k: cfg[k] for k in GPTConfig.__dataclass_fields__}))
    model = (fit_gpt2(model, gpt2) if gpt2 else model).to(device)
    return model, make_optimizer(model, cfg, device)


def make_optimizer(model, cfg, device):
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    muon = cfg["optimizer"] == "muon"
    to_muon = [p for n, p in named if muon and n.startswith("transformer.h.") and p.dim() == 2]
    rest = [p for _, p in named if all(p is not q for q in to_muon)]
    groups = [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": cfg["weight_decay"]},
              {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}]
    adamw = torch.optim.AdamW(groups, lr=cfg["learning_rate"], betas=(cfg["beta1"], cfg["beta2"]),
                              fused=device.type == "cuda")
    if not muon:
        return [adamw]
    if not hasattr(torch.optim, "Muon"):
        raise ConfigError(f"--optimizer=muon needs torch >= 2.9 (torch.optim.Muon); "
                          f"this is torch {torch.__version__}")
    m = torch.optim.Muon(to_muon, lr=cfg["muon_lr"], weight_decay=cfg["muon_weight_decay"])
    m.lr_scale = cfg["muon_lr"] / cfg["learning_rate"]   # train(): lr = get_lr(step) * lr_scale
    return [m, adamw]


def describe(optimizers):
    """For the run log: each optimizer's peak lr, weight decay (of its 2-D weights), parameters."""
    return " + ".join(f"{type(o).__name__} (lr {o.defaults['lr']:g}, "
                      f"weight decay {o.param_groups[0]['weight_decay']:g}, "
                      f"{sum(p.numel() for g in o.param_groups for p in g['params']):,} parameters)"
                      for o in optimizers)


def get_lr(step, cfg):
    """Linear warmup from lr/warmup (never 0) to lr, then cosine down to min_lr (never up: a
    --learning_rate below the default --min_lr stays constant)."""
    lr, warm, total = cfg["learning_rate"], cfg["warmup_iters"], cfg["max_iters"]
    if step < warm:
        return lr * (step + 1) / warm
    t, low = (step - warm) / max(1, total - warm), min(cfg["min_lr"], lr)
    return low + 0.5 * (1 + math.cos(math.pi * min(t, 1.0))) * (lr - low)


def update(raw, optimizers, scaler, cfg, stats):
    """Clip the gradient and step, unless CE, M (stats[:2]) or the gradient norm is not finite:
    then the update is skipped. Fused AdamW (cuda) skips on the device, from the found_inf flag
    fp16's grad scaler also uses, so the host need not wait for the GPU; elsewhere the host
    decides. -> (*stats, norm, ok)"""
    for o in optimizers:
        scaler.unscale_(o)
    norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg["grad_clip"] or math.inf)
    ok = torch.isfinite(stats[:2]).all() & (torch.isfinite(norm) | scaler.is_enabled())
    for o in optimizers:
        if all(g.get("fused") for g in o.param_groups) and not scaler.is_enabled():
            o.grad_scale, o.found_inf = None, (~ok).float()   # fused: as loaded from a checkpoint
            o.step()
            del o.grad_scale, o.found_inf
        elif ok:
            scaler.step(o)       # under fp16 it also skips overflows
        o.zero_grad(set_to_none=True)
    scaler.update()              # also after a skip: it closes unscale_ (a no-op without fp16)
    return torch.cat([stats, norm.float()[None], ok.float()[None]])


def host_copy(t):
    """Start moving t to the host: on cuda a non-blocking copy and an event marking its end, so the
    host can launch the next step while the GPU finishes this one; elsewhere the values now."""
    if t.device.type != "cuda":
        return t.tolist()
    t, done = t.to("cpu", non_blocking=True), torch.cuda.Event()
    done.record()
    return t, done


def host_values(copy):
    """The values of a host_copy, waiting for its copy to end if it has not."""
    if isinstance(copy, list):
        return copy
    copy[1].synchronize()
    return copy[0].tolist()


def train(cfg):
    given = {k: v for k, v in cfg.items() if k in DEFAULTS and v != DEFAULTS[k]}   # for the log
    device, ctx, scaler, (ddp, rank, world) = setup_device(cfg)
    master = rank == 0
    ck = load_checkpoint(cfg, master) if cfg["init_from"] == "resume" else None   # sets model, data
    gpt2 = load_gpt2(cfg) if cfg["init_from"] in GPT2_SIZES else None   # sets the model's shape
    cfg = resolve(cfg)
    B, T, W = cfg["batch_size"], cfg["block_size"], cfg["mbe_weight"]
    micro_tokens = B * T * world
    total = cfg["total_batch_size"] or micro_tokens      # tokens per optimizer step, all processes
    if total % micro_tokens:
        raise ConfigError(f"--total_batch_size={total} is not a multiple of batch_size * block_size"
                          f" * processes = {micro_tokens}")
    accum = total // micro_tokens
    loader, evals = make_data(cfg, rank, world)   # before anything is written: bad input
    raw, optimizers = build(cfg, device, gpt2)   # raw: uncompiled, unwrapped: what checkpoints hold
    ctrl, phase = controller(cfg)
    step = 0
    if ck:
        raw.load_state_dict(ck["model"])
        for o, sd in zip(optimizers, ck["optimizer"], strict=True):
            o.load_state_dict(sd)
        ctrl.load_state_dict(ck["gapt"])
        if ck["scaler"]:                  # empty when the run had no fp16 grad scaler
            scaler.load_state_dict(ck["scaler"])
        step = ck["step"]
        phase = ctrl.phase if cfg["phase_mode"] == "gapt" else phase
        restore_rank(ck, loader, rank, world)
    model = IBLM(raw, cfg["layers"], cfg["patch_size"])   # CE and M from one forward pass
    if cfg["compile"] == "on":
        model = torch.compile(model)                      # one graph of the GPT and its MBE
    if ddp:
        ids = [device.index] if device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    log = on_every_rank(lambda: open_run(cfg, master, step if ck else None), ddp)
    log.print("config: " + (" ".join(f"--{k}={v}" for k, v in given.items()) or "the defaults"))
    log.print(f"torch {torch.__version__} | device {device} | dtype {cfg['dtype']} | processes "
              f"{world} | {raw.num_params():,} parameters | MBE on layers {cfg['layers']}")
    log.print(f"optimizer: {describe(optimizers)}")
    log.print(f"batch: {total:,} tokens/step = {B} seqs x {T} tokens x {world} processes x "
              f"{accum} accumulation steps")
    if cfg["max_iters"] <= cfg["warmup_iters"]:
        log.print(f"note: --max_iters={cfg['max_iters']} <= --warmup_iters={cfg['warmup_iters']}: "
                  f"the learning rate never reaches its peak, --learning_rate")
    if step == 0 and cfg["eval_interval"] and master:
        log.record(kind="eval", step=0, **run_eval(raw, evals, cfg, device, ctx))
    # The read lag. The controller needs CE and M as numbers, and reading them at once would make
    # a GPU wait for the host every step. On cuda (lag 1) the host reads step t's CE and M from a
    # non-blocking copy after launching step t+1, so step t+2's phase comes from step t's values;
    # at an eval, where the host waits anyway, it catches up. Elsewhere (lag 0) step t+1's phase
    # comes from step t's, as in Algorithm 1. The controller sees only steps run in its own
    # phase: at lag 1, the step in flight at a switch is left out.
    lag, pending = int(cfg["read_lag"]), deque()   # pending: steps launched, not yet read
    bad, t_start, start = 0, time.time(), step
    while step < cfg["max_iters"]:
        t0, lr = time.time(), get_lr(step, cfg)
        for o in optimizers:
            for g in o.param_groups:
                g["lr"] = lr * getattr(o, "lr_scale", 1.0)   # Muon: its own peak (make_optimizer)
        stats = torch.zeros(3, device=device)    # CE, M (means over micro-batches), the phase
        for micro in range(accum):
            x, y = (t.pin_memory().to(device, non_blocking=True) if device.type == "cuda"
                    else t.to(device) for t in loader.batch(B))
            if ddp:   # sync gradients on the last micro-step only; set before the forward pass
                model.require_backward_grad_sync = micro == accum - 1
            with ctx:
                ce, M = model(x, y, phase == COMPRESS)   # CE, and the MBE of the chosen layers
            loss = iblm_loss(ce, M, phase, W)            # + mbe_weight * M when compressing
            scaler.scale(loss / accum).backward()        # a mean over micro-batches, not a sum
            stats[:2] += torch.stack([ce.detach().float(), M.detach()]) / accum
        stats[2] = phase                         # its mean over ranks is exact where they agree
        stats = update(raw, optimizers, scaler, cfg, all_mean(stats, ddp, world))   # or skip it
        step += 1                                # a skipped step counts, as under fp16's scaler
        pending.append({"step": step, "phase": phase, "lr": lr, "ms": 1000 * (time.time() - t0),
                        "stats": host_copy(stats)})
        at_eval = (cfg["eval_interval"] and step % cfg["eval_interval"] == 0) or \
            step == cfg["max_iters"]
        while len(pending) > (0 if at_eval else lag):
            rec = pending.popleft()
            s, used = rec["step"], rec["phase"]
            ce, mbe, phase_mean, norm, ok = host_values(rec["stats"])
            bad = 0 if ok else bad + 1
            log_step(log, cfg, rec, (ce, mbe, norm), bad, total, (t_start, start))
            if abs(phase_mean - used) > 1e-6:    # all ranks read the same all-reduced values
                raise TrainingError(f"step {s}: processes disagree about the phase "
                                    f"(mean {phase_mean}, this one {used})")
            if bad >= cfg["max_bad_steps"]:
                raise TrainingError(f"stopped after {bad} consecutive non-finite steps (try a "
                                    f"lower --learning_rate); the last good checkpoint, if any, "
                                    f"is {os.path.join(cfg['out_dir'], 'ckpt.pt')}")
            if ok and cfg["phase_mode"] == "gapt" and used == ctrl.phase:   # skips: never seen
                phase = ctrl.step(ce, mbe)       # Algorithm 1: the phase of the next step
                if phase != used:                # a switch: what ended the phase, and why
                    log.record(kind="switch", step=s, phase=phase, **ctrl.why)
                    log.print(f"step {s:>5} | {PHASES[used]} -> {PHASES[phase]} | " + " | ".join(
                        v if k == "reason" else f"{k} {v:.4f}" for k, v in ctrl.why.items()))
        if master and cfg["align_interval"] and step % cfg["align_interval"] == 0:
            x, y = (t.to(device) for t in next(iter(evals.values()))[0])
            cos, per_layer = grad_alignment(raw, x, y, cfg)
            log.record(kind="align", step=step, cos=cos, cos_layers=per_layer)
        if at_eval:
            if master:
                metrics = run_eval(raw, evals, cfg, device, ctx)
                log.record(kind="eval", step=step, **metrics)
                log.print(f"eval {step:>5} | " + " | ".join(
                    f"{k} {v:.4f}" for k, v in metrics.items() if not isinstance(v, list)))
            on_every_rank(lambda: save(cfg, loader, ddp, world, master, {
                "model": raw.state_dict(), "optimizer": [o.state_dict() for o in optimizers],
                "step": step, "gapt": ctrl.state_dict(), "scaler": scaler.state_dict(),
                "config": cfg}), ddp)
    if ddp:   # every rank leaves the process group together, before rank 0 writes the summary
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if master:
        summary(cfg, time.time() - t_start, start)
        if cfg["task"] == "text":
            print_samples(raw, evals["val"][0][0], cfg, device)


def log_step(log, cfg, rec, values, bad, total, since):
    """A step's record in log.jsonl (train, or skip: its update was not applied, the bad-th in a
    row), and a line on the console every log_interval steps, with the time since (t0, step0)
    and an estimate of the time left."""
    (ce, mbe, norm), step, phase, ms = values, rec["step"], rec["phase"], rec["ms"]
    if bad:
        log.record(kind="skip", step=step, ce=ce, mbe=mbe, grad_norm=norm)
        log.print(f"step {step}: non-finite ce={ce} mbe={mbe} grad_norm={norm}: update skipped "
                  f"({bad}/{cfg['max_bad_steps']})")
        return
    log.record(kind="train", step=step, phase=phase, ce=ce, mbe=mbe, lr=rec["lr"], ms=ms,
               tok_s=1000 * total / ms)
    if step % cfg["log_interval"] == 0 or step in (1, cfg["max_iters"]):
        took = time.time() - since[0]
        left = took / (step - since[1]) * (cfg["max_iters"] - step)
        clock = "{:.0f}m{:02.0f}s".format
        log.print(f"step {step:>5}/{cfg['max_iters']} | {PHASES[phase]} | ce {ce:.4f} | mbe "
                  f"{mbe:.4f} | lr {rec['lr']:.2e} | {ms:.1f} ms | {1000 * total / ms:,.0f} tok/s"
                  f" | {clock(*divmod(took, 60))}, ETA {clock(*divmod(left, 60))}")


def on_every_rank(fn, ddp):
    """fn() on this rank. Under torchrun an error on rank 0 alone (its lock, its files, a full
    disk) is raised on every rank, so that none is left waiting for it in a collective."""
    err, out = None, None
    try:
        out = fn()
    except (ConfigError, TrainingError, OSError) as e:
        err = e
    if ddp:
        box = [err]
        torch.distributed.broadcast_object_list(box, src=0)
        err = err or box[0]
    if err:
        raise err
    return out


def all_mean(t, ddp, world):
    """Mean over ranks. gloo has no ReduceOp.AVG: sum, then divide."""
    if ddp:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        t /= world
    return t

# -----------------------------------------------------------------------------
# Where a run starts: GPT-2's pretrained weights (--init_from=gpt2*), or its own checkpoint
# (--init_from=resume). Checkpoints are written whole or not at all, carry a checksum, and hold
# every rank's data and RNG state: a resumed run goes on as if it had never stopped.

GPT2_SIZES = {"gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024), "gpt2-large": (36, 20, 1280),
              "gpt2-xl": (48, 25, 1600)}   # (n_layer, n_head, n_embd): the Hugging Face checkpoints
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def gpt2_file(name, path):
    """The weights file: --weights (a file, or a folder holding one), else downloaded."""
    if not path:
        os.environ.setdefault("HF_HUB_VERBOSITY", "error")   # no retry warnings: one line below
        try:
            from huggingface_hub import hf_hub_download
        except ImportError:
            raise ConfigError(f"--init_from={name}: pip install huggingface_hub, "
                              "or pass --weights=PATH to a local copy") from None
        try:
            hf_hub_download(f"openai-community/{name}", "config.json")   # beside them: n_head
            return hf_hub_download(f"openai-community/{name}", "model.safetensors")
        except Exception as e:
            raise ConfigError(f"--init_from={name}: download failed ({type(e).__name__}); pass "
                              "--weights=PATH to a local copy") from None
    for f in ("model.safetensors", "pytorch_model.bin"):
        if os.path.isdir(path) and os.path.isfile(os.path.join(path, f)):
            return os.path.join(path, f)
    if not os.path.isfile(path):
        raise ConfigError(f"--weights={path}: no such file, "
                          "nor a folder with model.safetensors or pytorch_model.bin")
    return path


def load_gpt2(cfg):
    """Hugging Face GPT-2's state dict, less the "transformer." prefix (fit_gpt2 makes it this
    GPT's). Sets cfg's n_layer and n_embd from the tensors, n_head from the config.json beside
    them (else by name), and block_size, unless given, to their positions; nothing is written."""
    name = cfg["init_from"]
    if cfg["task"] != "text":
        raise ConfigError(f"--init_from={name} needs --task=text (GPT-2's vocabulary)")
    path = gpt2_file(name, cfg["weights"])
    try:
        with warnings.catch_warnings():   # torch warns of a pickle it cannot read, then raises
            warnings.simplefilter("ignore")
            if path.endswith(".safetensors"):
                from safetensors.torch import load_file
                sd = load_file(path)
            else:
                sd = torch.load(path, map_location="cpu", weights_only=True)
        skip = (".attn.bias", ".attn.masked_bias", "lm_head.weight")   # mask buffers; tied to wte
        sd = {k.removeprefix("transformer."): v.float() for k, v in sd.items()
              if not k.endswith(skip)}
        vocab, n_embd = sd["wte.weight"].shape
        n_layer = len({k.split(".")[1] for k in sd if k.startswith("h.")})
    except ImportError:
        raise ConfigError(f"--weights={path}: pip install safetensors to read it") from None
    except Exception as e:
        kind = type(e).__name__
        raise ConfigError(f"--weights={path}: not a GPT-2 checkpoint ({kind})") from None
    config = os.path.join(os.path.dirname(path), "config.json")
    try:
        with open(config) as f:
            n_head = int(json.load(f)["n_head"])
    except FileNotFoundError:
        if (n_layer, n_embd) != GPT2_SIZES[name][::2]:
            raise ConfigError(f"{config} is missing and the weights are not {name}'s size: it "
                              f"gives n_head") from None
        n_head = GPT2_SIZES[name][1]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{config}: no n_head in it ({type(e).__name__})") from None
    if vocab != 50257 or n_embd % n_head:
        raise ConfigError(f"--weights={path}: {vocab} tokens, {n_embd} wide, {n_head} heads: "
                          "not a GPT-2 shape")
    for key, v in (("n_layer", n_layer), ("n_head", n_head), ("n_embd", n_embd)):
        if cfg[key] not in (0, v):
            raise ConfigError(f"--{key}={cfg[key]}: the weights have {v}")
        cfg[key] = v
    cfg["block_size"] = cfg["block_size"] or len(sd["wpe.weight"])   # default: all its positions
    cfg["vocab_real"] = vocab   # in the checkpoint's config: a resumed run masks the padding too
    return sd


def fit_gpt2(model, sd):
    """Load GPT-2's state dict into model: wte padded with zero rows to the model's vocabulary (the
    padded logits are masked, GPTConfig.vocab_real), wpe cut to its context. Returns the model."""
    c = model.config
    wte, wpe = sd["wte.weight"], sd["wpe.weight"]
    if c.block_size > len(wpe):
        raise ConfigError(f"--block_size={c.block_size}: the GPT-2 weights have {len(wpe)} "
                          f"positions")
    sd = {("transformer." + k): (v.t() if k.endswith(CONV1D) else v) for k, v in sd.items()}
    wte = F.pad(wte, (0, 0, 0, c.vocab_size - len(wte)))   # (vocab_size, n_embd), zero rows last
    sd["transformer.wte.weight"] = sd["lm_head.weight"] = wte
    sd["transformer.wpe.weight"] = wpe[: c.block_size]
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:   # a missing, extra or misshapen tensor
        raise ConfigError(f"--init_from: the weights do not fit this GPT "
                          f"({str(e).splitlines()[-1].strip()[:80]})") from None
    return model


def save(cfg, loader, ddp, world, master, state):
    """Checkpoint state and every rank's data-generator and RNG states (gathered to rank 0):
    enough to continue as if never stopped. Never from non-finite weights."""
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() else None   # this rank's GPU
    mine = {"data": loader.state_dict(), "rng": {"python": random.getstate(), "cuda": cuda,
                                                "numpy": np.random.get_state(),
                                                "torch": torch.get_rng_state()}}
    ranks = [None] * world if ddp else [mine]
    if ddp:
        torch.distributed.all_gather_object(ranks, mine)
    if master and not all(torch.isfinite(p).all() for p in state["model"].values()):
        print(f"step {state['step']}: non-finite weights, checkpoint not written")
    elif master:
        save_checkpoint(os.path.join(cfg["out_dir"], "ckpt.pt"), {**state, "ranks": ranks})


def write_atomic(path, *chunks):
    """Write path whole or not at all: a run killed mid-write, or a full disk, leaves the file as it
    was and no path.tmp behind (an OSError then names path)."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
        os.replace(tmp, path)
    except BaseException as e:   # also Ctrl-C mid-write
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError) and not e.filename:
            e.filename = path
        raise


CKPT_MAGIC = b"GAPT-CKPT sha256 "   # then the payload's sha256 (64 hex digits), "\n", the payload


def save_checkpoint(path, state):
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getbuffer()
    write_atomic(path, CKPT_MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n", payload)


def read_checkpoint(path):
    """The state save_checkpoint wrote; ConfigError if its checksum does not match."""
    with open(path, "rb") as f:
        blob = f.read()
    if blob.startswith(CKPT_MAGIC):   # older checkpoints are a bare torch.save payload
        head, _, blob = blob.partition(b"\n")
        if hashlib.sha256(blob).hexdigest().encode() != head[len(CKPT_MAGIC):]:
            raise ConfigError(f"{path} is damaged: its checksum does not match (a changed bit); "
                              f"delete it to start over")
    return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=False)


# on resume the model and the data are the checkpoint's; the schedule and logging the command line's
RESUMED = ("task", "model", "n_layer", "n_head", "n_embd", "block_size", "bias", "patch_size",
           "mbe_layers", "seed", "reverse_answer", "digits_min", "digits_max", "ood_digits_min",
           "ood_digits_max", "n_eval", "arith_layout", "arith_loss", "val_tokens")


def load_checkpoint(cfg, master):
    """out_dir's checkpoint, whole and checked; cfg takes its model and data settings, naming the
    flags given other values that they replace."""
    path = os.path.join(cfg["out_dir"], "ckpt.pt")
    if not os.path.exists(path):
        raise ConfigError(f"--init_from=resume: no checkpoint at {path}")
    try:
        ck = read_checkpoint(path)
        saved = ck["config"]
        old = {k: saved.get(k, DEFAULTS[k]) for k in RESUMED}   # older checkpoints lack some
        trained = saved.get("optimizer", "adamw")   # another optimizer's state would not load
        opt = ck["optimizer"]                        # older checkpoints: one dict
        ck["optimizer"] = opt.get("optimizers", [opt]) if isinstance(opt, dict) else opt
        if not {"model", "optimizer", "gapt", "scaler", "ranks"} <= set(ck) or \
                not isinstance(ck["step"], int):
            raise KeyError("step")
    except ConfigError as e:
        raise ConfigError(f"--init_from=resume: {e}") from None
    except Exception as e:
        raise ConfigError(f"--init_from=resume: {path} is damaged ({type(e).__name__}); "
                          f"delete it to start over") from None
    given = [k for k in RESUMED if cfg[k] != DEFAULTS[k] and cfg[k] != old[k]]
    if given and master:
        print("resume: the checkpoint's values replace " +
              ", ".join(f"--{k}={cfg[k]} (now {old[k]})" for k in given))
    cfg.update(old, vocab_real=saved.get("vocab_real", 0))
    if cfg["data_dir"] == DEFAULTS["data_dir"]:   # its corpus, unless given (a copy moved, say)
        cfg["data_dir"] = saved.get("data_dir", cfg["data_dir"])
    if cfg["optimizer"] != trained:
        raise ConfigError(f"--optimizer={cfg['optimizer']}: the checkpoint was trained with "
                          f"--optimizer={trained}; resume with that")
    if cfg["max_iters"] < ck["step"]:
        raise ConfigError(f"--max_iters={cfg['max_iters']}: the checkpoint is at step {ck['step']} "
                          f"already; give a larger --max_iters to train on")
    if cfg["max_iters"] == ck["step"] and master:
        print(f"resume: the checkpoint is at step {ck['step']} = --max_iters: nothing to train")
    return ck


def restore_rank(ck, loader, rank, world):
    """This rank's data stream and RNG states from checkpoint ck."""
    if len(ck["ranks"]) != world:   # another number of processes: each rank's stream starts afresh
        if rank == 0:
            print(f"resume: checkpoint from {len(ck['ranks'])} processes, now {world}: "
                  f"data streams restart")
        return
    s = ck["ranks"][rank]["rng"]
    loader.load_state_dict(ck["ranks"][rank]["data"])
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])

# -----------------------------------------------------------------------------
# The run folder: one run at a time (a lock), an earlier run kept whole, a log that survives a
# damaged line.


def read_records(path, valid=lambda rec: True):
    """The records of a log.jsonl. A damaged line (a torn write, stray bytes, no integer step, or
    what valid(record) refuses) is skipped, with a warning."""
    recs, bad = [], []
    with open(path, "rb") as f:
        for i, line in enumerate(f, 1):
            try:
                rec = json.loads(line)
                ok = isinstance(rec, dict) and isinstance(rec.get("step"), int) and valid(rec) \
                    and line.endswith(b"\n")
            except ValueError:   # JSONDecodeError and UnicodeDecodeError both are
                ok = False
            recs.append(rec) if ok else bad.append(i)
    if bad:
        lines = ", ".join(map(str, bad[:5]))
        print(f"warning: {path}: skipped {len(bad)} damaged line(s): {lines}")
    return recs


def read_log(run_dir, kind, *keys):
    """The records of one kind ("train", "eval", "align", "skip") in run_dir/log.jsonl; one that
    lacks a number for one of keys counts as a damaged line."""
    number = lambda v: isinstance(v, (int, float))   # noqa: E731
    return [r for r in read_records(os.path.join(run_dir, "log.jsonl"), lambda r: r.get("kind")
                                    != kind or all(number(r.get(k)) for k in keys))
            if r.get("kind") == kind]


def lock_dir(out_dir):
    """Hold out_dir/.lock (flock) for this process's life: one run per out_dir at a time. The kernel
    drops the lock when the process ends, however it ends, so a killed run leaves nothing stuck.
    The .tmp files of a run killed mid-write go."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        f = open(os.path.join(out_dir, ".lock"), "a+")
    except OSError as e:   # e.g. a file, or a read-only folder
        raise ConfigError(f"--out_dir={out_dir}: cannot write here ({e.strerror or e})") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        pid = f.read().strip() or "?"
        raise ConfigError(f"--out_dir={out_dir}: another run (pid {pid}) is writing here; wait "
                          f"for it to end, or choose another --out_dir") from None
    f.truncate(0)
    f.write(str(os.getpid()))
    f.flush()
    for tmp in glob.glob(os.path.join(glob.escape(out_dir), "*.tmp")):
        os.remove(tmp)
    return f


RUN_FILES = r"ckpt\.pt|log\.jsonl|config\.json|curves\.png"


def keep_earlier_run(out_dir, run_files=RUN_FILES):
    """A fresh run into a used out_dir moves the earlier run's files (run_files, a regex) to
    out_dir/earlier/N, N = 1, 2, ...: a forgotten --init_from=resume costs nothing, and a later
    resume never pairs an old checkpoint with a new log. Other files in out_dir stay."""
    names = [n for n in sorted(os.listdir(out_dir)) if re.fullmatch(run_files, n)]
    if names:
        kept = os.path.join(out_dir, "earlier")
        n = 1 + max([int(d) for d in os.listdir(kept) if d.isdigit()]
                    if os.path.isdir(kept) else [0])
        os.makedirs(os.path.join(kept, str(n)))
        for name in names:
            os.replace(os.path.join(out_dir, name), os.path.join(kept, str(n), name))
        print(f"{out_dir}: the earlier run's files are kept in {kept}/{n} (this one starts afresh)")


def open_run(cfg, master, resume_step=None):
    """Rank 0 locks out_dir, keeps an earlier run's files (a fresh run), writes config.json and
    opens the log: the run's Logger (a silent one on the other ranks)."""
    if not master:
        return Logger(None)
    lock = lock_dir(cfg["out_dir"])
    try:
        if resume_step is None:
            keep_earlier_run(cfg["out_dir"])
        write_atomic(os.path.join(cfg["out_dir"], "config.json"),
                     json.dumps(cfg, indent=1).encode())
        log = Logger(os.path.join(cfg["out_dir"], "log.jsonl"), resume_step)
    except OSError as e:   # e.g. config.json a folder, "earlier" a file, a full disk
        raise ConfigError(f"--out_dir={cfg['out_dir']}: cannot write {e.filename} "
                          f"({e.strerror or e})") from None
    log.lock = lock   # held as long as the run's Logger
    return log


class Logger:
    """Every record to log.jsonl, and a line to the console now and then; silent without a path.
    On resume the records after the checkpoint's step go: those steps run again."""

    def __init__(self, path, resume_step=None):
        self.path, self.f = path, None
        if path and resume_step is not None and os.path.exists(path):
            keep = [json.dumps(r) + "\n" for r in read_records(path) if r["step"] <= resume_step]
            write_atomic(path, "".join(keep).encode())
        if path:
            self.f = open(path, "w" if resume_step is None else "a")

    def record(self, **rec):
        if self.f:
            try:
                self.f.write(json.dumps(rec) + "\n")
                self.f.flush()
            except OSError as e:   # a full disk: named (a write's error has no file name)
                raise OSError(e.errno, e.strerror, self.path) from None

    def print(self, *a):
        if self.f:
            print(*a, flush=True)

# -----------------------------------------------------------------------------
# The end of a run: a summary, curves.png, and for text a few greedy samples.


def summary(cfg, seconds, start):
    """This session's steps and time; the whole run's phase switches by reason, compression
    share, final eval and curves.png."""
    train_recs = read_log(cfg["out_dir"], "train", "phase", "ce", "mbe")
    eval_recs = read_log(cfg["out_dir"], "eval")
    reasons = [r.get("reason") for r in read_log(cfg["out_dir"], "switch")]
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
    try:
        plot_run(train_recs, os.path.join(cfg["out_dir"], "curves.png"), cfg["phase_mode"])
        print(f"figure: {os.path.join(cfg['out_dir'], 'curves.png')}")
    except ImportError:
        print("figure skipped: pip install matplotlib")


def pyplot():
    """matplotlib's pyplot on a file-only backend (no display needed), imported when first used."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


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


def plot_run(train_recs, path, phase_mode):
    """curves.png: training CE and M per step, the compression phases shaded."""
    plt, steps = pyplot(), [r["step"] for r in train_recs]
    spans = phase_spans(steps, [r["phase"] for r in train_recs])
    fig, axes = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
    layers = "watched" if phase_mode == "memorize" else "compressed"
    for ax, key, label in zip(axes, ("ce", "mbe"), ("train CE", f"MBE of the {layers} layers")):
        ax.plot(steps, [r[key] for r in train_recs], lw=0.8)
        for a, b in spans:   # at least 0.4% of the axis wide: a phase of one step shows
            ax.axvspan(a, max(b, a + len(steps) / 250), color="tab:orange", alpha=0.3, lw=0)
        ax.set_ylabel(label)
    shaded = "shaded: compression phases" if spans else "no compression phase"
    axes[0].set_title(f"{phase_mode}: CE and MBE (nats) per step ({shaded})")
    axes[1].set_xlabel("optimizer step")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@torch.no_grad()
def generate(model, idx, n_new, block_size, temperature=0.0, stop=None):
    """idx (B, T) continued by up to n_new tokens: the argmax at temperature 0, else a draw from
    softmax(logits / temperature); done early once every row holds the token stop."""
    model.eval()
    for _ in range(n_new):
        logits = model(idx[:, -block_size:])[0][:, -1].float()          # (B, vocab)
        nxt = (logits.argmax(-1, keepdim=True) if temperature == 0 else
               torch.multinomial(F.softmax(logits / temperature, -1), 1))
        idx = torch.cat([idx, nxt], dim=1)
        if stop is not None and (idx == stop).any(1).all():
            break
    return idx


def print_samples(model, prompts, cfg, device):
    """Greedy continuations of a few val prompts, decoded when the GPT-2 tokenizer is at hand."""
    idx = generate(model, prompts[:3, : cfg["block_size"] // 2].to(device), 32, cfg["block_size"])
    try:
        enc = data.get_tokenizer(cfg["tokenizer_file"] or None)
        decode = lambda ids: enc.decode([i for i in ids if i < enc.n_vocab])   # noqa: E731
    except Exception:   # offline and no --tokenizer_file: show ids
        decode = str
        print("samples as token ids: no GPT-2 BPE here (pass --tokenizer_file)")
    for row in idx.tolist():
        print("sample:", repr(decode(row)))


def sample(cfg):
    """--sample=PROMPT: continue it with out_dir's checkpoint, as nanoGPT's sample.py. Text goes
    through GPT-2's BPE; an arithmetic problem is typed as "7 x 8", its answer shown in reading
    order (the model may write it least-significant digit first, --reverse_answer)."""
    path = os.path.join(cfg["out_dir"], "ckpt.pt")
    if not os.path.isfile(path):
        raise ConfigError(f"--sample: no checkpoint at {path} (train one, or name its --out_dir)")
    ck = read_checkpoint(path)
    try:
        c = ck["config"]
        model = GPT(GPTConfig(**{k: c[k] for k in GPTConfig.__dataclass_fields__}))
        model.load_state_dict(ck["model"])
    except Exception as e:
        raise ConfigError(f"--sample: {path} is damaged ({type(e).__name__})") from None
    device, ctx, _, _ = setup_device(cfg)
    torch.manual_seed(cfg["seed"])
    n = cfg["num_samples"] if cfg["temperature"] > 0 else 1   # greedy: always the same
    if c["task"] == "text":
        try:
            enc = data.get_tokenizer(cfg["tokenizer_file"] or c.get("tokenizer_file") or None)
        except (data.DataError, data.Unavailable) as e:
            raise ConfigError(f"--sample: {e}") from None
        prompt, stop, n_new = enc.encode_ordinary(cfg["sample"]), None, 64
    else:
        problem = re.fullmatch(r"\s*(\d{1,9})\s*[x*]\s*(\d{1,9})\s*=?\s*", cfg["sample"])
        if not problem:
            raise ConfigError(f"--sample={cfg['sample']!r}: this checkpoint multiplies: give a "
                              f"problem like '7 x 8'")
        a, b = (int(v) for v in problem.groups())
        ids, start = data.arith_ids(a, b, False)
        prompt, stop, n_new = ids[:start], data.EOS, 2 * len(ids) - 2 * start
    with ctx:
        rows = generate(model.to(device), torch.tensor([prompt] * n, device=device), n_new,
                        c["block_size"], cfg["temperature"], stop)
    for row in rows[:, len(prompt):].tolist():
        if c["task"] == "text":
            print(repr(cfg["sample"] + enc.decode([i for i in row if i < enc.n_vocab])))
            continue
        said = data.arith_decode(row).partition("<eos>")[0]
        flip = c["reverse_answer"] and said.isdigit()   # else not an answer: as written
        answer = said[::-1] if flip else said
        print(f"{a} x {b} = {answer}   " + ("right" if answer == str(a * b) else
                                           f"wrong: {a * b}") + f" (written {said})" * flip)

# -----------------------------------------------------------------------------
# The command line. Every way a run can end is decided in one place, ending(): bad input is one
# line and exit 2, a run that fails one line and 1, Ctrl-C or SIGTERM the resume command.


def main(argv=None, parse=parse_args, run=None, script=__file__):
    """`python gapt.py`: one run. experiments.py calls it with its own parse and run."""
    argv = sys.argv[1:] if argv is None else argv
    cfg, term = None, signal.signal(signal.SIGTERM, sigterm)
    try:
        cfg = parse(argv)
        (run or (sample if cfg["sample"] else train))(cfg)
        return 0
    except BaseException as e:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)   # the last line is not cut short
        code, line = ending(e, cfg, argv, script)
        if line:
            sys.stderr.write(line + "\n")                # one write: ranks' lines do not mix
        return code
    finally:   # on an error path too: a process group left to the interpreter's exit can abort it
        signal.signal(signal.SIGTERM, term)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def sigterm(signum, frame):   # kill, or torchrun stopping its workers: stop as on Ctrl-C
    raise KeyboardInterrupt("SIGTERM")


def ending(e, cfg, argv, script):
    """(exit code, the one line to print, or none) for a run that stopped early; anything else,
    a bug, is raised with its traceback."""
    rank0 = os.environ.get("RANK", "0") == "0"
    if isinstance(e, ConfigError):        # the same on every rank: rank 0 says it
        return 2, rank0 and f"error: {e}"
    if isinstance(e, KeyboardInterrupt):  # every rank has it: rank 0 says how to go on
        why = e.args[0] if e.args else "Ctrl-C"
        return 143 if e.args else 130, rank0 and interrupted(cfg, argv, script, why)
    if isinstance(e, (TrainingError, data.DataError)):
        return 1, f"error: {e}"
    if isinstance(e, OSError):            # a full disk, a file gone; every write is whole or none
        return 1, f"error: {e.strerror or e}" + (f": {e.filename}" if e.filename else "") + \
            "; what was written before is kept"
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
                   f"{os.path.join(cfg['out_dir'], 'ckpt.pt')}")
    raise e


def interrupted(cfg, argv, script=__file__, why="Ctrl-C"):
    """The line a stopped run prints: where its last checkpoint is and how to go on from it."""
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
    return f"stopped ({why}); the last checkpoint is {where}; resume: {again}"


if __name__ == "__main__":
    sys.exit(main())
