"""
GAPT (Gated Phase Transition) in one file: a GPT-2, matrix-based entropy (MBE) of
its representations, the IBLM objective, and the controller that alternates
memorisation and compression phases. Paper: Fangyuan Yu, "Memorization-Compression
Cycles Improve Generalization", arXiv 2505.08727 (2025).

    python gapt.py                                   # tiny GPT on arithmetic, CPU, ~3 minutes
    python gapt.py --phase_mode=memorize             # the CE-only baseline, same data and seed
    python gapt.py --task=text --data_dir=data/text  # pretraining on token shards (see data.py)
    python gapt.py --task=text --model=gpt2 --data_dir=data/fineweb10B   # one GPU
    torchrun --standalone --nproc_per_node=8 gapt.py --task=text --model=gpt2 \\
        --total_batch_size=524288 --batch_size=32     # 8 GPUs (nccl), or CPU processes (gloo)
    torchrun --nnodes=2 --node_rank=0 --rdzv_endpoint=HOST:29500 --nproc_per_node=8 gapt.py ...
    python gapt.py --task=forgetting                 # the catastrophic-forgetting toy (an MLP, seconds)
    python gapt.py --compare=memorize,gapt --seeds=3 # both arms x 3 seeds, a table and out/<task>.png
    python gapt.py --bench                           # ms/step: memorise vs compress vs plain PyTorch, MBE share
    python gapt.py --help                            # every flag, its default and meaning

Read top to bottom: config -> model -> MBE -> IBLM -> GAPT -> data -> loop, then the
forgetting toy, the experiments (--compare) and the benchmark (--bench).
Importing this file has no side effects; everything runs under __main__.
"""
import argparse
import json
import math
import os
import random
import re
import sys
import time
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# Config: flat defaults, each with its meaning. Override with --key=value (or --key value).

CONFIG = [
    "what to run",
    ("task", "arithmetic", "arithmetic (built in, no download) | text (token shards from data.py) | forgetting (MLP toy)"),
    ("phase_mode", "gapt", "gapt (switch phases) | memorize (CE only: the baseline) | compress (CE + MBE always)"),
    ("out_dir", "out", "log.jsonl, config.json, ckpt.pt and curves.png go here"),
    ("init_from", "scratch", "scratch | resume (continue from out_dir/ckpt.pt)"),
    ("seed", 1337, "seeds the model init, the data stream and dropout"),
    ("device", "auto", "auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps"),
    ("dtype", "auto", "auto (bfloat16 on cuda if supported, else float32) | float32 | bfloat16 | float16 (cuda)"),
    ("compile", "auto", "torch.compile the model: auto (on for cuda) | on | off"),
    ("read_lag", "auto", "steps before the host reads a step's CE and M for the controller: auto (1 on cuda, "
                         "so the GPU never waits; else 0) | 0 | 1"),
    ("bench", False, "time memorise and compress steps against a plain PyTorch loop, print a table, train nothing"),
    ("bench_steps", 20, "--bench: timed steps per mode, after 3 warm-up steps"),
    "model",
    ("model", "tiny", "size preset: tiny (4 layers, 4 heads, 128 wide) | small (6/6/384) | gpt2 (12/12/768, 124M)"),
    ("n_layer", 0, "transformer blocks (0 = from --model)"),
    ("n_head", 0, "attention heads (0 = from --model)"),
    ("n_embd", 0, "residual width (0 = from --model)"),
    ("block_size", 0, "context length (0 = task default: arithmetic fits its longest problem, text 256 / gpt2 1024)"),
    ("dropout", 0.0, "dropout probability"),
    ("bias", True, "biases in Linear and LayerNorm layers, as GPT-2"),
    "GAPT: MBE, the IBLM loss and the phase controller",
    ("mbe_weight", 1.0, "weight of the MBE term in the compression phase: L = CE + mbe_weight * M"),
    ("patch_size", 8, "MBE window: entropy of each run of patch_size consecutive tokens"),
    ("mbe_layers", "inner", "layers whose MBE is compressed: inner (all but first and last; all if < 3 layers) | all | list like 1,2"),
    ("p_m", 100, "memorisation patience: steps without a CE improvement > delta_ce before compressing"),
    ("p_c", 50, "compression patience: steps without an MBE improvement > delta_mbe before memorising again"),
    ("delta_ce", 0.01, "CE improvement (nats) that resets the memorisation patience"),
    ("delta_mbe", 0.002, "MBE improvement (nats) that resets the compression patience"),
    ("tau", 0.1, "CE spike tolerance: compression ends when CE > (1 + tau) * its best in the phase"),
    "arithmetic task",
    ("digits_min", 1, "smallest operand digit count in training (paper: 1)"),
    ("digits_max", 2, "largest operand digit count in training (paper: 3)"),
    ("ood_digits_min", 3, "smallest operand digit count of the out-of-distribution test (paper: 4)"),
    ("ood_digits_max", 3, "largest operand digit count of the out-of-distribution test (paper: 6)"),
    ("reverse_answer", True, "write the product least-significant digit first (learnable in minutes)"),
    ("n_eval", 512, "problems in each fixed test set (ID and OOD)"),
    ("arith_layout", "padded", "padded (one problem per row) | packed (the author's: windows of a "
                               "stream of problems; block_size 32 unless set)"),
    ("arith_loss", "answer", "training loss on: answer (tokens) | all (tokens); tests: answers"),
    "text task",
    ("data_dir", "data/fineweb10B", "directory with *_train_*.bin and *_val_*.bin shards (data.py)"),
    ("val_tokens", 65536, "fixed validation token budget: the same val tokens at every eval"),
    ("tokenizer_file", "", "a GPT-2 .tiktoken ranks file, for machines that cannot download the BPE ($GAPT_TOKENIZER_FILE)"),
    "forgetting toy",
    ("forget_m", 0.8, "task A's teacher is theta0 + m * Delta, task B's theta0 - m * Delta (paper: 0.8)"),
    "optimisation",
    ("batch_size", 64, "micro-batch size in sequences, per process"),
    ("total_batch_size", 0, "tokens per optimizer step over all processes (0 = one micro-batch each)"),
    ("max_iters", 2000, "optimizer steps"),
    ("learning_rate", 1e-3, "peak learning rate (AdamW)"),
    ("min_lr", 1e-4, "learning rate at the end of the cosine decay"),
    ("warmup_iters", 100, "linear warmup steps"),
    ("weight_decay", 0.1, "AdamW decay, on 2-D weights only"),
    ("beta1", 0.9, "AdamW beta1"),
    ("beta2", 0.99, "AdamW beta2"),
    ("grad_clip", 1.0, "clip the gradient norm to this (0 = off)"),
    "evaluation and logging",
    ("eval_interval", 250, "steps between evaluations and checkpoints (0 = none but the last checkpoint)"),
    ("log_interval", 50, "steps between printed lines (every step goes to log.jsonl)"),
    ("align_interval", 0, "every K steps log the cosine between grad(CE) and grad(MBE) (0 = off)"),
    ("max_bad_steps", 3, "stop after this many consecutive steps with a non-finite loss or gradient"),
    "experiments",
    ("compare", "", "run these phase modes, e.g. memorize,gapt,compress, x --seeds into out_dir, then a figure"),
    ("seeds", 3, "seeds per arm for --compare (--seed, --seed+1, ...)"),
    ("fig", "", "figure path for --compare (default out_dir/<task>.png; cycle.png beside it with --align_interval)"),
]
DEFAULTS = {c[0]: c[1] for c in CONFIG if isinstance(c, tuple)}   # a string heads a group of flags
CHOICES = {"task": ("arithmetic", "text", "forgetting"), "phase_mode": ("gapt", "memorize", "compress"),
           "init_from": ("scratch", "resume"), "dtype": ("auto", "float32", "bfloat16", "float16"),
           "compile": ("auto", "on", "off"), "read_lag": ("auto", "0", "1"),
           "model": ("tiny", "small", "gpt2"), "arith_layout": ("padded", "packed"),
           "arith_loss": ("answer", "all")}
PRESETS = {"tiny": (4, 4, 128), "small": (6, 6, 384), "gpt2": (12, 12, 768)}


class ConfigError(ValueError):
    """Bad input from the user: reported as one line, exit code 2."""


BOOLS = {**dict.fromkeys(("1", "true", "yes", "on"), True),
         **dict.fromkeys(("0", "false", "no", "off"), False)}


class Parser(argparse.ArgumentParser):
    def error(self, message):   # one line and exit 2, nothing written, as for all bad input
        raise ConfigError(re.sub(r"^argument (--\w+): (?=\1=)|^argument ", "", message))


def as_type(key):
    """Text -> the type of the key's default; an int is accepted where a float is expected."""
    kind, choices = type(DEFAULTS[key]), CHOICES.get(key)

    def convert(text):
        if choices and text not in choices:
            raise argparse.ArgumentTypeError(f"--{key}={text}: choose one of {' | '.join(choices)}")
        try:
            return BOOLS[text.lower()] if kind is bool else kind(text)
        except (KeyError, ValueError):
            raise argparse.ArgumentTypeError(
                f"--{key}={text}: expected {kind.__name__} (default {DEFAULTS[key]!r})") from None
    return convert


def make_parser():
    """CONFIG as argparse flags, one help group per heading: --key=value or --key value."""
    p = Parser(usage=argparse.SUPPRESS, description=__doc__, allow_abbrev=False,   # docstring first
               formatter_class=lambda prog: argparse.RawDescriptionHelpFormatter(
                   prog, max_help_position=28, width=100))
    for c in CONFIG:
        if isinstance(c, str):
            group = p.add_argument_group(c)
            continue
        key, default, text = c
        kind = type(default).__name__.upper()
        bare = dict(nargs="?", const=True) if kind == "BOOL" else {}   # a bare --flag sets it
        group.add_argument(f"--{key}", type=as_type(key), default=default, choices=CHOICES.get(key),
                           metavar=None if key in CHOICES else kind, **bare,
                           help=f"{text} (default: {default})".replace("%", "%%"))
    return p


def parse_args(argv):
    """The config dict from command-line flags, checked; ConfigError on bad input."""
    args, rest = make_parser().parse_known_args(argv)
    for arg in rest:
        if arg.startswith("-"):
            raise ConfigError(f"unknown flag {arg.partition('=')[0]} (see --help)")
        raise ConfigError(f"unexpected argument '{arg}': use --key=value (see --help)")
    return validate(vars(args))


def validate(cfg):
    """Reject values that would fail later (or silently do the wrong thing)."""
    for key in ("p_m", "p_c", "batch_size", "max_iters", "patch_size", "n_eval", "log_interval",
                "max_bad_steps", "val_tokens", "seeds", "bench_steps"):
        if cfg[key] <= 0:
            raise ConfigError(f"--{key}={cfg[key]}: must be positive")
    for key in ("seed", "n_layer", "n_head", "n_embd", "block_size", "eval_interval", "align_interval",
                "total_batch_size", "warmup_iters"):
        if cfg[key] < 0:
            raise ConfigError(f"--{key}={cfg[key]}: must be >= 0")
    for key, v in cfg.items():
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"--{key}={v}: must be a finite number")
    for key in ("tau", "delta_ce", "delta_mbe", "mbe_weight", "weight_decay", "grad_clip", "min_lr"):
        if cfg[key] < 0:
            raise ConfigError(f"--{key}={cfg[key]}: must be >= 0")
    for key in ("beta1", "beta2"):
        if not 0 <= cfg[key] < 1:
            raise ConfigError(f"--{key}={cfg[key]}: must be in [0, 1)")
    if not cfg["out_dir"].strip():
        raise ConfigError("--out_dir is empty: name a folder for the run")
    if cfg["learning_rate"] <= 0:
        raise ConfigError(f"--learning_rate={cfg['learning_rate']}: must be positive")
    if not 0 <= cfg["dropout"] < 1:
        raise ConfigError(f"--dropout={cfg['dropout']}: must be in [0, 1)")
    if not (1 <= cfg["digits_min"] <= cfg["digits_max"] <= 9 and 1 <= cfg["ood_digits_min"] <= cfg["ood_digits_max"] <= 9):
        raise ConfigError("digit ranges need 1 <= *_digits_min <= *_digits_max <= 9")
    return cfg


def resolve(cfg, vocab_size):
    """Fill in what depends on the task: model shape and context length."""
    cfg = dict(cfg)
    for key, v in zip(("n_layer", "n_head", "n_embd"), PRESETS[cfg["model"]]):
        cfg[key] = cfg[key] or v
    if cfg["n_embd"] % cfg["n_head"]:
        raise ConfigError(f"--n_embd={cfg['n_embd']} must be divisible by --n_head={cfg['n_head']}")
    if cfg["block_size"] == 0:
        if cfg["task"] == "arithmetic" and cfg["arith_layout"] == "packed":
            cfg["block_size"] = 32   # the longest test problem and context: see README
        elif cfg["task"] == "arithmetic":   # the longest problem, rounded up to whole MBE windows
            from data import arith_len
            need = arith_len(max(cfg["digits_max"], cfg["ood_digits_max"])) - 1
            cfg["block_size"] = -(-need // cfg["patch_size"]) * cfg["patch_size"]
        else:
            cfg["block_size"] = 1024 if cfg["model"] == "gpt2" else 256
    if cfg["block_size"] % cfg["patch_size"]:
        raise ConfigError(f"--block_size={cfg['block_size']} is not divisible by --patch_size={cfg['patch_size']}")
    cfg["vocab_size"] = vocab_size
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
        raise ConfigError(f"--mbe_layers={spec}: use inner, all, or a comma list like 1,2") from None
    if not ids or ids[0] < 0 or ids[-1] >= n_layer:
        raise ConfigError(f"--mbe_layers={spec}: layers must be in 0..{n_layer - 1}")
    return ids


# -----------------------------------------------------------------------------
# Model: GPT-2 as in nanoGPT. Parameter names follow Hugging Face's GPT-2 so
# weights can be loaded by name; the forward pass also returns the residual
# stream after every block, the representations whose entropy GAPT compresses.


@dataclass
class GPTConfig:
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    block_size: int = 1024
    vocab_size: int = 50257
    dropout: float = 0.0
    bias: bool = True


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
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,   # flash attention where available
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)             # re-assemble heads side by side
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
        for name, p in self.named_parameters():   # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer)
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
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
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
    tiny = torch.finfo(G.dtype).tiny                                 # Z = 0: log tiny < 0, clamped to 0, gradient 0
    lt = torch.log(G.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(tiny))   # log tr G
    S = lt + lt - torch.log(G.square().sum((-2, -1)).clamp_min(tiny))      # 2 log tr G - log ||G||_F^2
    return S.clamp(0.0, math.log(G.shape[-1]))                       # clamp: rounding only (and Z = 0)


def layer_mbe(hs, layers, patch_size):
    """MBE of the chosen layers: hs, the block outputs (B, T, D) -> (len(layers),) nats, each the mean
    S_2 over non-overlapping windows of patch_size consecutive tokens (the author's setup). The
    windows are views of the outputs (B*T/P, P, D): nothing larger than their Gram blocks is formed."""
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


class GAPT:
    def __init__(self, delta_ce=0.01, delta_mbe=0.002, tau=0.1, p_m=100, p_c=50):
        self.delta_ce, self.delta_mbe, self.tau, self.p_m, self.p_c = delta_ce, delta_mbe, tau, p_m, p_c
        self.phase, self.s_m, self.s_c = MEMORIZE, 0, 0
        self.E_min, self.M_min = math.inf, math.inf   # best CE and MBE seen (reset at each compression)

    def step(self, ce, mbe):
        """Feed one optimizer step's training CE and compression target M;
        returns the phase for the next optimizer step."""
        improved_ce = self.E_min - ce > self.delta_ce
        spike = ce > (1 + self.tau) * self.E_min
        self.E_min = min(self.E_min, ce)
        if self.phase == MEMORIZE:
            self.s_m = 0 if improved_ce else self.s_m + 1
            if self.s_m >= self.p_m:                       # CE has plateaued: compress
                self.phase, self.s_c, self.E_min, self.M_min = COMPRESS, 0, math.inf, math.inf
        elif spike:                                        # compression hurts prediction
            self.phase, self.s_m = MEMORIZE, 0
        else:
            self.s_c = 0 if self.M_min - mbe > self.delta_mbe else self.s_c + 1
            self.M_min = min(self.M_min, mbe)
            if self.s_c >= self.p_c:                       # compression has plateaued
                self.phase, self.s_m = MEMORIZE, 0
        return self.phase

    def state_dict(self):
        return {k: getattr(self, k) for k in ("phase", "s_m", "s_c", "E_min", "M_min")}

    def load_state_dict(self, sd):
        for k, v in sd.items():
            setattr(self, k, v)

# -----------------------------------------------------------------------------
# Data and evaluation. The arithmetic task is generated on the fly (data.py);
# the text task reads GPT-2 token shards prepared by data.py.


def make_data(cfg, rank, world):
    import data
    try:   # data.py's errors (missing shards, a context too short or too long) are bad input
        if cfg["task"] == "arithmetic":
            return data.Arithmetic(cfg["seed"], cfg["block_size"], (cfg["digits_min"], cfg["digits_max"]),
                                   (cfg["ood_digits_min"], cfg["ood_digits_max"]), cfg["n_eval"],
                                   cfg["reverse_answer"], rank, cfg["arith_layout"],
                                   cfg["arith_loss"])
        return data.TokenShards(cfg["data_dir"], cfg["block_size"], cfg["seed"], rank, world)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(str(e)) from None


def eval_batches(cfg, data):
    """Fixed evaluation sets, {name: [(x, y), ...]}: the same tokens at every eval."""
    B = cfg["batch_size"]
    if cfg["task"] == "arithmetic":
        return {name: list(zip(x.split(B), y.split(B))) for name, (x, y) in data.eval_sets().items()}
    try:
        return {"val": data.val_batches(cfg["val_tokens"], B)}
    except ValueError as e:
        raise ConfigError(f"--val_tokens={cfg['val_tokens']}: {e}") from None


@torch.no_grad()
def evaluate(model, batches, cfg, device, ctx):
    """CE on the target tokens only (for arithmetic: the answer, the paper's
    "masked entropy"), exact match, confidence and the MBE of every layer.
    Exact match needs no decoding loop: greedy decoding reproduces the answer
    exactly when, given the true prefix, the argmax is the target at every
    answer position (and so, inductively, greedy follows the true prefix)."""
    nll = tokens = exact = seqs = conf = 0.0
    mbe = torch.zeros(cfg["n_layer"])
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with ctx:
            logits, _, hs = model(x, y)
        logp = logits.float().log_softmax(-1)                       # (B, T, V)
        mask = y >= 0
        nll += -(logp.gather(-1, y.clamp(min=0)[..., None])[..., 0] * mask).sum().item()
        tokens += mask.sum().item()
        exact += ((logp.argmax(-1) == y) | ~mask).all(-1).sum().item()
        conf += (logp.max(-1).values.exp() * mask).sum().item()     # probability of the model's own top token
        mbe += layer_mbe(hs, range(len(hs)), cfg["patch_size"]).cpu() * len(x)
        seqs += len(x)
    mbe /= seqs
    return {"ce": nll / tokens, "acc": exact / seqs, "conf": conf / tokens,
            "mbe": mbe[cfg["layers"]].mean().item(), "mbe_layers": [round(v, 5) for v in mbe.tolist()]}


def run_eval(model, evals, cfg, device, ctx):
    model.eval()
    out = {}
    for name, batches in evals.items():
        for k, v in evaluate(model, batches, cfg, device, ctx).items():
            if cfg["task"] == "arithmetic" or k in ("ce", "mbe", "mbe_layers"):
                out[f"{name}_{k}"] = v
    model.train()
    return out


def grad_alignment(model, x, y, cfg):
    """The paper's cycle observation: cosine between grad(CE) and grad(M), over
    all parameters and per block. Positive: lowering CE also compresses;
    negative: memorising and compressing pull apart."""
    params = dict((n, p) for n, p in model.named_parameters() if p.requires_grad)
    _, ce, hs = model(x, y)
    M = layer_mbe(hs, cfg["layers"], cfg["patch_size"]).mean()
    g_ce = torch.autograd.grad(ce, list(params.values()), retain_graph=True, allow_unused=True)
    g_m = torch.autograd.grad(M, list(params.values()), allow_unused=True)

    def cos(names):
        pairs = [(a, b) for n, a, b in zip(params, g_ce, g_m) if n in names and a is not None and b is not None]
        a = torch.cat([p[0].flatten() for p in pairs]) if pairs else torch.zeros(1)
        b = torch.cat([p[1].flatten() for p in pairs]) if pairs else torch.zeros(1)
        return F.cosine_similarity(a.float(), b.float(), dim=0, eps=1e-12).item()
    per_layer = [cos({n for n in params if n.startswith(f"transformer.h.{i}.")}) for i in range(cfg["n_layer"])]
    return cos(set(params)), per_layer

# -----------------------------------------------------------------------------
# Training loop: setup, checkpoints, logging, then the steps.


def setup_device(cfg):
    """(device, autocast context, grad scaler, ddp info). One code path for cpu, mps and cuda."""
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ   # launched by torchrun
    rank, local_rank, world = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)))
    dev = cfg["device"]
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        device = torch.device(dev)
    except RuntimeError:
        raise ConfigError(f"--device={dev}: not a device (use auto, cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise ConfigError(f"--device={dev}: no such CUDA device on this machine")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("--device=mps: MPS is not available on this machine")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"--device={dev}: use auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda":   # set_device needs an index: torchrun's local rank, else N of cuda:N, else 0
        device = torch.device("cuda", local_rank if ddp else device.index or 0)
    if ddp:
        import torch.distributed as dist
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    dtype = cfg["dtype"]
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    if dtype == "float16" and device.type != "cuda":
        raise ConfigError("--dtype=float16 needs a CUDA device (use bfloat16 or float32)")
    cfg["dtype"] = dtype
    ptdtype = getattr(torch, dtype)
    ctx = nullcontext() if dtype == "float32" else torch.autocast(device.type, dtype=ptdtype)
    scaler = torch.amp.GradScaler("cuda", enabled=(dtype == "float16"))
    return device, ctx, scaler, (ddp, rank, world)


def make_optimizer(model, cfg, device):
    """AdamW with weight decay on 2-D weights only (not biases, LayerNorms)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg["weight_decay"]},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg["learning_rate"], betas=(cfg["beta1"], cfg["beta2"]),
                             fused=device.type == "cuda")


def get_lr(step, cfg):
    """Linear warmup from lr/warmup (never 0) to lr, then cosine down to min_lr."""
    lr, warm, total = cfg["learning_rate"], cfg["warmup_iters"], cfg["max_iters"]
    if step < warm:
        return lr * (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return cfg["min_lr"] + 0.5 * (1 + math.cos(math.pi * min(t, 1.0))) * (lr - cfg["min_lr"])


def save_checkpoint(path, state):
    """Atomic: a run killed while saving leaves the previous checkpoint intact."""
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def rng_state():
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}   # this rank's GPU


def set_rng_state(s):
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])


def load_checkpoint(out_dir):
    path = os.path.join(out_dir, "ckpt.pt")
    if not os.path.exists(path):
        raise ConfigError(f"--init_from=resume: no checkpoint at {path}")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
        missing = {"model", "optimizer", "gapt", "scaler", "step", "config", "ranks"} - set(ck)
        if missing:
            raise KeyError(", ".join(sorted(missing)))
    except Exception as e:
        raise ConfigError(f"--init_from=resume: {path} is damaged ({type(e).__name__}); delete it to start over") from None
    return ck


class Logger:
    """Rank 0 only: one human line per log interval, every record to log.jsonl."""

    def __init__(self, out_dir, master, resume_step=None):
        self.master, self.path = master, os.path.join(out_dir, "log.jsonl")
        if master and resume_step is not None and os.path.exists(self.path):
            self.truncate_after(resume_step)   # steps after the checkpoint will be run again
        self.f = open(self.path, "a" if resume_step is not None else "w") if master else None

    def truncate_after(self, step):
        with open(self.path) as f:
            keep = [line for line in f if line.endswith("\n") and json.loads(line).get("step", 0) <= step]
        with open(self.path + ".tmp", "w") as f:
            f.writelines(keep)
        os.replace(self.path + ".tmp", self.path)

    def record(self, **rec):
        if self.master:
            self.f.write(json.dumps(rec) + "\n")
            self.f.flush()

    def print(self, *a):
        if self.master:
            print(*a, flush=True)


def make_dir(path, flag):
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--{flag}={path}: cannot make this folder ({e.strerror or e})") from None


def check_dir(path, flag):
    """Fail now, with nothing written, if make_dir(path) would fail later: the nearest existing
    ancestor must be a writable folder."""
    head = os.path.abspath(path)
    while not os.path.exists(head):
        head = os.path.dirname(head)
    if not (os.path.isdir(head) and os.access(head, os.W_OK)):
        raise ConfigError(f"--{flag}={path}: cannot make this folder ({head} is not a writable folder)")


def retire_checkpoint(out_dir):
    """An earlier run's ckpt.pt becomes ckpt.prev.pt: --init_from=resume must never pair it with
    a new run's log, and a forgotten --init_from=resume must not cost it."""
    path = os.path.join(out_dir, "ckpt.pt")
    if os.path.exists(path):
        os.replace(path, os.path.join(out_dir, "ckpt.prev.pt"))
        print(f"{path}: an earlier run's checkpoint, kept as ckpt.prev.pt (this run starts from scratch)")


def open_run(cfg, master, resume_step=None):
    """out_dir with the run's config.json, and its Logger; a fresh run retires an earlier checkpoint."""
    if master:
        make_dir(cfg["out_dir"], "out_dir")
        if resume_step is None:
            retire_checkpoint(cfg["out_dir"])
        with open(os.path.join(cfg["out_dir"], "config.json"), "w") as f:
            json.dump(cfg, f, indent=1)
    log = Logger(cfg["out_dir"], master, resume_step)
    log.print(f"config: {json.dumps({k: cfg[k] for k in DEFAULTS})}")
    return log


def all_mean(t, ddp, world):
    """Mean over ranks. gloo has no ReduceOp.AVG: sum, then divide."""
    if ddp:
        import torch.distributed as dist
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= world
    return t


class TrainingError(RuntimeError):
    """A run that cannot go on (e.g. persistent NaNs): reported as one line, exit code 1."""


def build(cfg, device, ck):
    """Model, optimizer and controller, restored from checkpoint ck when resuming."""
    torch.manual_seed(cfg["seed"])
    mc = GPTConfig(cfg["n_layer"], cfg["n_head"], cfg["n_embd"], cfg["block_size"], cfg["vocab_size"],
                   cfg["dropout"], cfg["bias"])
    model = GPT(mc).to(device)
    optimizer = make_optimizer(model, cfg, device)
    controller = GAPT(cfg["delta_ce"], cfg["delta_mbe"], cfg["tau"], cfg["p_m"], cfg["p_c"])
    if ck:
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        controller.load_state_dict(ck["gapt"])
    return model, optimizer, controller


def micro_step(model, x, y, phase, cfg, ctx, scaler, accum):
    """Forward (CE and M, model is an IBLM), the IBLM loss and backward on one micro-batch: the code
    that train() runs and bench() times. Returns the detached CE and M."""
    with ctx:
        ce, M = model(x, y, phase == COMPRESS)
    loss = iblm_loss(ce, M, phase, cfg["mbe_weight"]) / accum       # a mean over micro-batches, not a sum
    scaler.scale(loss).backward()
    return ce.detach().float(), M.detach()


def resume(ck, data, scaler, rank, world):
    """Continue where checkpoint ck stopped: this rank's data stream and RNG, the grad scaler. Returns the step."""
    if len(ck["ranks"]) == world:
        data.load_state_dict(ck["ranks"][rank]["data"])
        set_rng_state(ck["ranks"][rank]["rng"])
    elif rank == 0:   # another number of processes: each rank keeps its own fresh data stream
        print(f"resume: checkpoint from {len(ck['ranks'])} processes, now {world}: data streams restart")
    scaler.load_state_dict(ck["scaler"])
    return ck["step"]


def update(raw, optimizer, scaler, cfg, stats):
    """Clip the gradient and step, unless CE, M (stats[:2]) or the gradient norm is not finite: then
    the update is skipped (with fp16, the grad scaler handles an overflow itself). A fused optimizer
    (AdamW on cuda) skips on the device from a found_inf flag, as under the fp16 grad scaler, so the
    host does not wait for the GPU here; otherwise the flag is read on the host.
    Returns (ce, M, phase, grad norm, ok) on the device."""
    scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg["grad_clip"] or math.inf)
    ok = torch.isfinite(stats[:2]).all() & (torch.isfinite(norm) | scaler.is_enabled())
    if getattr(optimizer, "_step_supports_amp_scaling", False) and not scaler.is_enabled():
        optimizer.grad_scale, optimizer.found_inf = None, (~ok).float()
        optimizer.step()
        del optimizer.grad_scale, optimizer.found_inf
    elif ok:
        scaler.step(optimizer)
    scaler.update()                  # also after a skip: it closes the unscale_ above (a no-op without fp16)
    optimizer.zero_grad(set_to_none=True)
    return torch.cat([stats, norm.float()[None], ok.float()[None]])


def host_copy(t):
    """Start moving t to the host. On cuda: a non-blocking copy and an event marking its end, so the
    host can launch the next step while the GPU finishes this one; elsewhere: the values now."""
    if t.device.type != "cuda":
        return t.tolist()
    t, done = t.to("cpu", non_blocking=True), torch.cuda.Event()
    done.record()
    return t, done


def host_values(copy):
    """The values of a host_copy, waiting for its copy to finish if needed."""
    if isinstance(copy, list):
        return copy
    t, done = copy
    done.synchronize()
    return t.tolist()


def to_device(t, device):
    """A host batch to the device; on cuda from pinned memory, without blocking the host."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


def train(cfg):
    device, ctx, scaler, (ddp, rank, world) = setup_device(cfg)
    master = rank == 0
    ck = load_checkpoint(cfg["out_dir"]) if cfg["init_from"] == "resume" else None
    if ck:   # the model and data are the checkpoint's; the schedule and logging are the command line's
        cfg.update({k: ck["config"][k] for k in ("task", "model", "n_layer", "n_head", "n_embd", "block_size",
                                                 "bias", "patch_size", "mbe_layers", "seed", "reverse_answer",
                                                 "digits_min", "digits_max", "ood_digits_min", "ood_digits_max",
                                                 "n_eval")})
        cfg.update({k: ck["config"].get(k, v) for k, v in   # older checkpoints: padded, answer
                    (("arith_layout", "padded"), ("arith_loss", "answer"))})
    from data import ARITH_VOCAB
    cfg = resolve(cfg, ARITH_VOCAB if cfg["task"] == "arithmetic" else 50304)   # 50257 padded to 64k: faster
    B, T = cfg["batch_size"], cfg["block_size"]
    tokens_per_micro = B * T * world
    total = cfg["total_batch_size"] or tokens_per_micro
    if total % tokens_per_micro:
        raise ConfigError(f"--total_batch_size={total} is not a multiple of batch_size*block_size*processes = {tokens_per_micro}")
    accum = total // tokens_per_micro
    data = make_data(cfg, rank, world)
    model, optimizer, controller = build(cfg, device, ck)
    phase = {"gapt": controller.phase, "memorize": MEMORIZE, "compress": COMPRESS}[cfg["phase_mode"]]
    step = resume(ck, data, scaler, rank, world) if ck else 0
    evals = eval_batches(cfg, data)                # before anything is written: a bad size is bad input
    raw = model                                    # the GPT, uncompiled, unwrapped: what checkpoints hold
    model = IBLM(raw, cfg["layers"], cfg["patch_size"])   # CE and M from one forward pass
    if cfg["compile"] == "on" or (cfg["compile"] == "auto" and device.type == "cuda"):
        model = torch.compile(model)
    if ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    log = open_run(cfg, master, step if ck else None)
    log.print(f"torch {torch.__version__} | device {device} | dtype {cfg['dtype']} | processes {world} | "
              f"{raw.num_params():,} parameters | MBE on layers {cfg['layers']} of {cfg['n_layer']}")
    log.print(f"batch: {total:,} tokens/step = {B} seqs x {T} tokens x {world} processes x {accum} accumulation steps")
    if step == 0 and cfg["eval_interval"] and master:
        log.record(kind="eval", step=0, **run_eval(raw, evals, cfg, device, ctx))
    # The host reads a step's CE, M and gradient norm `lag` steps after launching it. On cuda (lag 1)
    # the GPU then never waits for the host: the phase of step t+1 is decided from step t-1's CE and M,
    # read from a non-blocking copy. Elsewhere (lag 0) it is decided from step t's, as in Algorithm 1.
    lag = int(device.type == "cuda") if cfg["read_lag"] == "auto" else int(cfg["read_lag"])
    pending = deque(ck.get("pending", []) if ck else [])   # launched, not yet seen by the controller
    bad, t_start, start, switches = 0, time.time(), step, 0
    while step < cfg["max_iters"]:
        t0 = time.time()
        lr = get_lr(step, cfg)
        for g in optimizer.param_groups:
            g["lr"] = lr
        stats = torch.zeros(3, device=device)       # ce, M, phase: averaged over micro-batches and ranks
        for micro in range(accum):
            x, y = (to_device(t, device) for t in data.batch(B))
            if ddp:   # sync gradients on the last micro-step only; must be set before the forward pass
                model.require_backward_grad_sync = micro == accum - 1
            ce, M = micro_step(model, x, y, phase, cfg, ctx, scaler, accum)
            stats += torch.stack([ce, M, torch.full((), float(phase), device=device)]) / accum   # full: no host copy
        stats = update(raw, optimizer, scaler, cfg, all_mean(stats, ddp, world))   # skips non-finite steps
        step += 1                                  # a skipped step counts, as under fp16's grad scaler
        pending.append({"step": step, "phase": phase, "lr": lr, "ms": 1000 * (time.time() - t0),
                        "stats": host_copy(stats)})
        while len(pending) > lag:
            rec = settle(pending.popleft(), log, cfg, total)
            ce, mbe, phase_mean, norm, ok = rec["stats"]
            if abs(phase_mean - rec["phase"]) > 1e-6:   # every rank reads the same all-reduced CE and M
                raise TrainingError(f"step {rec['step']}: processes disagree about the phase "
                                    f"(mean {phase_mean}, this one {rec['phase']})")
            if not ok:                             # the update was skipped; the controller never sees it
                bad += 1
                log.print(f"step {rec['step']}: non-finite ce={ce} mbe={mbe} grad_norm={norm}: update skipped "
                          f"({bad}/{cfg['max_bad_steps']})")
                if bad >= cfg["max_bad_steps"]:
                    raise TrainingError(f"stopped after {bad} consecutive non-finite steps (try a lower "
                                        f"--learning_rate); the last good checkpoint, if any, is "
                                        f"{os.path.join(cfg['out_dir'], 'ckpt.pt')}")
                continue
            bad = 0
            if cfg["phase_mode"] == "gapt":
                new = controller.step(ce, mbe)
                switches, phase = switches + (new != phase), new
        if master and cfg["align_interval"] and step % cfg["align_interval"] == 0:
            x, y = (t.to(device) for t in next(iter(evals.values()))[0])
            cos, per_layer = grad_alignment(raw, x, y, cfg)
            log.record(kind="align", step=step, cos=cos, cos_layers=per_layer)
        if (cfg["eval_interval"] and step % cfg["eval_interval"] == 0) or step == cfg["max_iters"]:
            for rec in pending:                    # logged now, given to the controller on time
                settle(rec, log, cfg, total)
            if master:
                metrics = run_eval(raw, evals, cfg, device, ctx)
                log.record(kind="eval", step=step, **metrics)
                log.print(f"eval {step:>5} | " + " | ".join(f"{k} {v:.4f}" for k, v in metrics.items() if not isinstance(v, list)))
            save(cfg, raw, optimizer, controller, scaler, data, step, ddp, world, master, list(pending))
    if ddp:   # every rank leaves the process group together, before rank 0 writes the summary
        import torch.distributed as dist
        dist.barrier()
        dist.destroy_process_group()
    if master:
        summary(cfg, time.time() - t_start, start, switches)
        if cfg["task"] == "text":
            print_samples(raw, evals["val"][0][0], cfg, device)


def settle(rec, log, cfg, total):
    """Read a launched step's values on the host (once) and log them: a train or a skip record."""
    if not rec.get("logged"):
        rec["stats"], rec["logged"] = host_values(rec["stats"]), True
        (ce, mbe, _, norm, ok), step, ms = rec["stats"], rec["step"], rec["ms"]
        if not ok:
            log.record(kind="skip", step=step, ce=ce, mbe=mbe, grad_norm=norm)
            return rec
        log.record(kind="train", step=step, phase=rec["phase"], ce=ce, mbe=mbe, lr=rec["lr"], ms=ms,
                   tok_s=1000 * total / ms)
        if step % cfg["log_interval"] == 0 or step == 1 or step == cfg["max_iters"]:
            log.print(f"step {step:>5}/{cfg['max_iters']} | {'memorise' if rec['phase'] == MEMORIZE else 'compress'} | "
                      f"ce {ce:.4f} | mbe {mbe:.4f} | lr {rec['lr']:.2e} | {ms:.1f} ms | {1000 * total / ms:,.0f} tok/s")
    return rec


def save(cfg, raw, optimizer, controller, scaler, data, step, ddp, world, master, pending):
    """Checkpoint everything needed to continue as if never stopped, including
    every rank's data generator and RNG state (gathered to rank 0)."""
    mine = {"data": data.state_dict(), "rng": rng_state()}
    ranks = [mine]
    if ddp:
        import torch.distributed as dist
        ranks = [None] * world
        dist.all_gather_object(ranks, mine)
    if master and not all(torch.isfinite(p).all() for p in raw.parameters()):
        print(f"step {step}: non-finite weights, checkpoint not written")
    elif master:
        save_checkpoint(os.path.join(cfg["out_dir"], "ckpt.pt"), {
            "model": raw.state_dict(), "optimizer": optimizer.state_dict(), "gapt": controller.state_dict(),
            "scaler": scaler.state_dict(), "step": step, "config": cfg, "ranks": ranks, "pending": pending})


def read_log(run_dir, kind):
    """The records of one kind ("train", "eval", "align", "skip") in run_dir/log.jsonl."""
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


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


def summary(cfg, seconds, start, switches):
    """The session's steps, time and phase switches; compression share and final eval of the whole run."""
    train_recs, eval_recs = read_log(cfg["out_dir"], "train"), read_log(cfg["out_dir"], "eval")
    compress = sum(r["phase"] == COMPRESS for r in train_recs)
    print("-" * 72)
    since = f" from step {start}" if start else ""
    print(f"done: {max(0, cfg['max_iters'] - start)} steps{since} in {seconds:.0f} s | phase switches {switches} | "
          f"compression {100 * compress / max(1, len(train_recs)):.0f}% of steps")
    if eval_recs:
        print("final eval: " + " | ".join(f"{k} {v:.4f}" for k, v in eval_recs[-1].items()
                                          if isinstance(v, float)))
    try:
        plot_run(train_recs, os.path.join(cfg["out_dir"], "curves.png"), cfg["phase_mode"])
        print(f"figure: {os.path.join(cfg['out_dir'], 'curves.png')}")
    except ImportError:
        print("figure skipped: pip install matplotlib")


def pyplot():
    """matplotlib's pyplot on a file-only backend (no display needed), imported when first drawing."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_run(train_recs, path, title):
    plt = pyplot()
    steps = [r["step"] for r in train_recs]
    fig, axes = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
    for ax, key, label in zip(axes, ("ce", "mbe"), ("train CE (nats/token)", "MBE of regularised layers (nats)")):
        ax.plot(steps, [r[key] for r in train_recs], lw=0.8)
        for a, b in phase_spans(steps, [r["phase"] for r in train_recs]):
            ax.axvspan(a, b, color="tab:orange", alpha=0.2, lw=0)
        ax.set_ylabel(label)
    axes[0].set_title(f"{title}: CE and MBE per step (shaded: compression phases)")
    axes[1].set_xlabel("optimizer step")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@torch.no_grad()
def print_samples(model, prompts, cfg, device, n_new=32):
    """Greedy continuations of a few val prompts, decoded when the GPT-2 tokenizer is at hand."""
    model.eval()
    idx = prompts[:3, : cfg["block_size"] // 2].to(device)
    for _ in range(n_new):
        logits, _, _ = model(idx[:, -cfg["block_size"]:])
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    try:
        from data import get_tokenizer
        enc = get_tokenizer(cfg["tokenizer_file"] or None)
        decode = lambda ids: enc.decode([i for i in ids if i < enc.n_vocab])   # noqa: E731
    except Exception:   # offline and no --tokenizer_file: show ids
        decode = str
    for row in idx.tolist():
        print("sample:", repr(decode(row)))

# -----------------------------------------------------------------------------
# Catastrophic-forgetting toy (--task=forgetting): a student MLP learns task A,
# then task B (data.forgetting_data) under the same IBLM loss and controller as
# the GPT, with the L1 loss in place of CE and M the MBE of its hidden layer over
# windows of patch_size samples. The paper's claim: compression separates the
# two tasks' representations and so reduces interference. A run takes seconds
# on a CPU, so it skips train()'s device, DDP and checkpoint machinery (there is
# nothing worth resuming).


class Student(nn.Module):
    """The teacher's shape, n_in -> n_hidden -> 1 with ReLU; also returns the hidden layer."""

    def __init__(self, n_in, n_hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(n_in, n_hidden), nn.Linear(n_hidden, 1)

    def forward(self, x):
        h = F.relu(self.fc1(x))                                        # (n, n_hidden)
        return self.fc2(h), h


def separation(ha, hb):
    """||mean(ha) - mean(hb)|| / sqrt((var_a + var_b) / 2), var = the mean squared distance
    to the group's mean: how far apart two groups of vectors (n, D) lie, in units of their spread."""
    d = (ha.mean(0) - hb.mean(0)).norm().item()
    s = math.sqrt(sum((h - h.mean(0)).square().sum(1).mean().item() for h in (ha, hb)) / 2)
    return d / s if s > 0 else (0.0 if d == 0 else math.inf)   # no spread: two points, apart or not


def fit_task(model, x, y, cfg, log, task, start):
    """max_iters full-batch Adam steps on L1 (+ mbe_weight * M when compressing); returns the last step.
    The learning rate is constant: a schedule across both tasks would learn B slower than A.
    The controller starts afresh: carried over, its best loss would be A's, which B's early
    losses never improve on, so it would compress after p_m steps while B is still unlearnt."""
    controller = GAPT(cfg["delta_ce"], cfg["delta_mbe"], cfg["tau"], cfg["p_m"], cfg["p_c"])
    phase = {"gapt": controller.phase, "memorize": MEMORIZE, "compress": COMPRESS}[cfg["phase_mode"]]
    opt = torch.optim.Adam(model.parameters(), lr=cfg["learning_rate"])   # fresh: no task-A moments in B
    n_compress = 0
    for step in range(start + 1, start + cfg["max_iters"] + 1):
        pred, h = model(x)
        l1 = F.l1_loss(pred, y)
        with nullcontext() if phase == COMPRESS else torch.no_grad():   # in memorisation M is only watched
            M = layer_mbe([h[None]], [0], cfg["patch_size"])[0]          # samples as a (1, n, D) sequence
        opt.zero_grad(set_to_none=True)
        iblm_loss(l1, M, phase, cfg["mbe_weight"]).backward()
        opt.step()
        used, n_compress = phase, n_compress + (phase == COMPRESS)
        if cfg["phase_mode"] == "gapt":
            phase = controller.step(l1.item(), M.item())
        log.record(kind="train", step=step, task=task, phase=used, loss=l1.item(), mbe=M.item())
        if step % cfg["log_interval"] == 0:
            log.print(f"task {task} step {step:>5} | {'memorise' if used == MEMORIZE else 'compress'} | "
                      f"l1 {l1.item():.4f} | mbe {M.item():.4f}")
    log.print(f"task {task}: compression {100 * n_compress / cfg['max_iters']:.0f}% of {cfg['max_iters']} steps")
    return step


@torch.no_grad()
def forgetting_eval(model, d, patch_size):
    """Held-out L1 on A and B, the separation of the two tasks' hidden layers, and their MBE."""
    (pa, ha), (pb, hb) = model(d["xa_test"]), model(d["xb_test"])
    return {"loss_A": F.l1_loss(pa, d["ya_test"]).item(), "loss_B": F.l1_loss(pb, d["yb_test"]).item(),
            "separation": separation(ha, hb), "mbe_A": layer_mbe([ha[None]], [0], patch_size).item(),
            "mbe_B": layer_mbe([hb[None]], [0], patch_size).item()}


def train_forgetting(cfg):
    import data
    if cfg["init_from"] == "resume":
        raise ConfigError("--task=forgetting takes seconds and keeps no checkpoint: run it again, without --init_from")
    if cfg["device"] not in ("auto", "cpu"):
        raise ConfigError(f"--device={cfg['device']}: --task=forgetting is a 10 -> 50 -> 1 MLP and runs on the CPU")
    n_in, n_hidden = 10, 50                                            # the paper's teacher, and so the student
    d = data.forgetting_data(cfg["seed"], n_in, n_hidden, cfg["forget_m"])
    if len(d["xa"]) % cfg["patch_size"] or len(d["xa_test"]) % cfg["patch_size"]:
        raise ConfigError(f"--patch_size={cfg['patch_size']} must divide the toy's {len(d['xa'])} samples per task")
    torch.set_num_threads(1)   # matmuls this small only wait on each other in threads (20x slower on 2 busy cores)
    torch.manual_seed(cfg["seed"])
    model = Student(n_in, n_hidden)
    log = open_run(cfg, True)
    log.print(f"forgetting toy: {n_in} -> {n_hidden} -> 1 student, {len(d['xa'])} samples per task, "
              f"{cfg['max_iters']} steps on A then on B, MBE over windows of {cfg['patch_size']} samples")
    step = fit_task(model, d["xa"], d["ya"], cfg, log, "A", 0)
    after_a = forgetting_eval(model, d, cfg["patch_size"])
    fit_task(model, d["xb"], d["yb"], cfg, log, "B", step)
    after_b = forgetting_eval(model, d, cfg["patch_size"])
    metrics = {"loss_A_after_A": after_a["loss_A"], "loss_A_after_B": after_b.pop("loss_A"), **after_b}
    log.record(kind="eval", step=2 * cfg["max_iters"], **metrics)
    log.print("eval (held out; loss_A_after_B is the interference) | "
              + " | ".join(f"{k} {v:.4f}" for k, v in metrics.items()))


# -----------------------------------------------------------------------------
# Experiments: one config run under several phase modes and seeds (identical
# data and steps per seed), a table of final metrics (mean +- std) and a figure.


def compare(cfg):
    arms = cfg["compare"].split(",")
    if any(a not in CHOICES["phase_mode"] for a in arms):
        raise ConfigError(f"--compare={cfg['compare']}: a comma list of {' | '.join(CHOICES['phase_mode'])}")
    if "RANK" in os.environ:
        raise ConfigError("--compare runs its arms one after another: launch it with python, not torchrun")
    path = cfg["fig"] or os.path.join(cfg["out_dir"], cfg["task"] + ".png")
    check_dir(cfg["out_dir"], "out_dir")
    check_dir(os.path.dirname(path) or ".", "fig" if cfg["fig"] else "out_dir")   # before the runs, not after
    runs = [(arm, s, os.path.join(cfg["out_dir"], f"{arm}_seed{s}"))   # seeds outer: a stopped comparison
            for s in range(cfg["seeds"]) for arm in arms]              # has every arm for the seeds done
    if cfg["init_from"] != "resume":   # a fresh comparison: no arm may later resume an earlier one's run
        for _, _, out in runs:
            retire_checkpoint(out)
    dirs = {arm: [] for arm in arms}
    for arm, s, out in runs:
        print(f"=== {arm}, seed {cfg['seed'] + s} -> {out}", flush=True)
        run = train_forgetting if cfg["task"] == "forgetting" else train
        resume = cfg["init_from"] == "resume" and os.path.exists(os.path.join(out, "ckpt.pt"))
        run(dict(cfg, phase_mode=arm, seed=cfg["seed"] + s, out_dir=out, compare="",
                 init_from="resume" if resume else "scratch"))   # resume a stopped comparison
        dirs[arm].append(out)
    table = compare_table(dirs)
    with open(os.path.join(cfg["out_dir"], "results.json"), "w") as f:
        json.dump(table, f, indent=1)
    make_dir(os.path.dirname(path) or ".", "fig")
    plot_compare(dirs, cfg, path)
    print(f"figure: {path}\nresults: {os.path.join(cfg['out_dir'], 'results.json')}")
    if cfg["align_interval"] and cfg["task"] != "forgetting":
        plot_cycle(dirs, os.path.join(os.path.dirname(path), "cycle.png"))
        print(f"figure: {os.path.join(os.path.dirname(path), 'cycle.png')}")
        for arm, outs in dirs.items():
            for s, out in enumerate(outs):
                print(f"cycle, {arm} seed {cfg['seed'] + s}: " + cycle_stats([r["cos"] for r in read_log(out, "align")]))


def sd(v):
    """Sample standard deviation over seeds (axis 0); 0 for a single seed."""
    v = np.asarray(v, dtype=float)
    return v.std(0, ddof=1) if len(v) > 1 else np.zeros(v.shape[1:])


def t_quantile(p, df):
    """Student's t quantile (p > 0.5, integer df) by bisection on the exact CDF: P(|T| < t) is a
    finite sum in cos(theta)^2, theta = atan(t / sqrt(df)) (Abramowitz & Stegun 26.7.3-4)."""
    def central(t):   # P(|T| < t)
        th = math.atan(t / math.sqrt(df))
        term, total = 1.0, 0.0
        for j in range(df // 2):
            total += term
            term *= math.cos(th) ** 2 * (2 * j + 1 + df % 2) / (2 * j + 2 + df % 2)
        if df % 2 == 0:
            return math.sin(th) * total
        return 2 / math.pi * (th + math.sin(th) * math.cos(th) * total)
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


def compare_table(dirs):
    """Final eval metrics per arm: mean and std over seeds, and each later arm's paired difference
    from the first (the baseline) with its 95% t interval, under "vs_<baseline>"; as markdown."""
    finals = {arm: [read_log(o, "eval")[-1] for o in outs] for arm, outs in dirs.items()}
    base, n = next(iter(dirs)), len(dirs[next(iter(dirs))])
    keys = [k for k, v in finals[base][0].items() if isinstance(v, float)]
    vals = {arm: {k: [f[k] for f in fs] for k in keys} for arm, fs in finals.items()}
    table = {arm: {k: (float(np.mean(v)), float(sd(v))) for k, v in row.items()}
             for arm, row in vals.items()}
    head = " | ".join(keys) + " |\n" + "|---" * (len(keys) + 1) + "|"
    print(f"\n| arm (n={n}) | {head}")
    for arm, row in table.items():
        print(f"| {arm} | " + " | ".join(f"{m:.4f} ± {s:.4f}" for m, s in row.values()) + " |")
    if len(dirs) > 1:
        print(f"\n| arm - {base}: mean [95% paired t interval] | {head}")
    for arm in list(dirs)[1:]:
        diffs = {k: paired_diff(vals[base][k], vals[arm][k]) for k in keys}
        table[arm]["vs_" + base] = diffs
        lohi = [d["ci95"] or (math.nan, math.nan) for d in diffs.values()]   # nan: a single seed
        print(f"| {arm} | " + " | ".join(f"{d['diff']:+.4f} [{lo:+.4f}, {hi:+.4f}]"
                                         for d, (lo, hi) in zip(diffs.values(), lohi)) + " |")
    return table


def mean_curve(outs, kind, key):
    """steps, mean and std over seeds of one logged metric."""
    recs = [[r for r in read_log(o, kind) if key in r] for o in outs]
    n = min(map(len, recs))
    vals = np.array([[r[key] for r in rs[:n]] for rs in recs])
    return [r["step"] for r in recs[0][:n]], vals.mean(0), sd(vals)


def cycle_stats(cos):
    """How the gradient alignment behaves over a run: a slow cycle shows as few sign changes and a
    lag-1 autocorrelation near 1; step-to-step noise as many changes and an autocorrelation near 0."""
    c = np.asarray(cos, dtype=float)
    if len(c) < 3:
        return f"{len(c)} measurements, too few (lower --align_interval)"
    changes = int(((c[1:] > 0) != (c[:-1] > 0)).sum())
    lag1 = np.corrcoef(c[:-1], c[1:])[0, 1]
    return f"cos > 0 in {(c > 0).mean():.0%} of {len(c)} measurements, {changes} sign changes, lag-1 autocorrelation {lag1:.2f}"


def plot_cycle(dirs, path):
    """The paper's cycle observation: cos(grad CE, grad M) against step, per seed, per arm."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(dirs), figsize=(5 * len(dirs), 3.6), squeeze=False, sharey=True)
    for ax, (arm, outs) in zip(axes[0], dirs.items()):
        for s, out in enumerate(outs):
            recs = read_log(out, "align")
            ax.plot([r["step"] for r in recs], [r["cos"] for r in recs], lw=0.9, label=f"seed {s}")
        ax.axhline(0, color="k", lw=0.6)
        ax.set_title(f"{arm}")
        ax.set_xlabel("optimizer step")
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("cos(grad CE, grad MBE), all parameters")
    fig.suptitle("Alignment of the CE and MBE gradients: above 0 memorising also compresses, below 0 they conflict")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_compare(dirs, cfg, path):
    plt = pyplot()
    if cfg["task"] == "arithmetic":
        panels = [("eval", "ood_ce", "OOD answer CE (nats)"), ("eval", "ood_conf", "OOD confidence (top-token prob.)"),
                  ("eval", "id_acc", "ID exact match"), ("eval", "ood_acc", "OOD exact match")]
    elif cfg["task"] == "text":
        panels = [("eval", "val_ce", "val CE (nats/token)"), ("eval", "val_mbe_layers", "val MBE per layer (nats)")]
    else:
        panels = [("eval", "separation", "separation of A and B (held out)"),
                  ("eval", "loss_A_after_B", "L1 loss on A after B (interference)"), ("eval", "loss_B", "L1 loss on B")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (kind, key, label) in zip(axes[0], panels):
        for i, (arm, outs) in enumerate(dirs.items()):
            if key.endswith("_layers"):   # bars: the final per-layer values, one group per arm
                v = np.array([read_log(o, "eval")[-1][key] for o in outs])
                x = np.arange(v.shape[1]) + (i - (len(dirs) - 1) / 2) * 0.8 / len(dirs)
                ax.bar(x, v.mean(0), 0.8 / len(dirs), yerr=sd(v), label=arm)
                ax.set_xlabel("layer")
            elif cfg["task"] == "forgetting":
                v = [read_log(o, "eval")[-1][key] for o in outs]
                ax.bar(i, np.mean(v), yerr=sd(v), label=arm)
                ax.set_xticks(range(len(dirs)), list(dirs))
            else:
                steps, m, s = mean_curve(outs, kind, key)
                ax.plot(steps, m, label=arm)
                ax.fill_between(steps, m - s, m + s, alpha=0.2)
                ax.set_xlabel("optimizer step")
        if "gapt" in dirs and not key.endswith("_layers") and cfg["task"] != "forgetting":
            train_recs = read_log(dirs["gapt"][0], "train")
            for a, b in phase_spans([r["step"] for r in train_recs], [r["phase"] for r in train_recs]):
                ax.axvspan(a, b, color="grey", alpha=0.15, lw=0)
        ax.set_ylabel(label)
        if cfg["task"] != "forgetting":
            ax.legend(fontsize=8)
    n = len(next(iter(dirs.values())))
    fig.suptitle(f"{cfg['task']}: {' vs '.join(dirs)}, mean ± std over {n} seeds"
                 + ("" if cfg["task"] == "forgetting" or "gapt" not in dirs else " (grey: GAPT seed-0 compression)"))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

# -----------------------------------------------------------------------------
# Benchmark (--bench): what compression costs on top of language modelling. The
# modes take turns on one model and one batch of random tokens of the task's
# vocabulary and context (no data loading, one micro-batch a step), so machine
# noise hits them alike; ratios are medians of the ratios within each turn.

# peak dense bf16 tensor FLOP/s (datasheets, no sparsity) by a substring of the GPU's name; first match wins
PEAK_FLOPS = (("GB200", 2500e12), ("B200", 2250e12), ("H200 NVL", 836e12), ("H200", 989e12), ("H100 NVL", 835e12),
              ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12), ("L40", 181e12),
              ("L4", 121e12), ("RTX 4090", 165e12), ("RTX 3090", 71e12))


def renyi_entropy(Z, alpha):
    """The MBE's definition for any order alpha > 0: the eigenvalues of G / tr G, G = Z Z^T of windows
    Z (..., N, D) -> (...,) nats. What --bench times the closed form against; for analysis, not training."""
    G = Z.float() @ Z.float().transpose(-1, -2)
    tr, N = G.diagonal(dim1=-2, dim2=-1).sum(-1), G.shape[-1]
    ok = G.square().sum((-2, -1)) != 0                                # Z = 0 (or underflow): 0; NaN stays NaN
    eye = torch.eye(N, dtype=G.dtype, device=G.device)                # Z = 0 is swapped for I: no NaN gradients
    A = torch.where(ok[..., None, None], G, eye) / torch.where(ok, tr, N)[..., None, None]
    lam = torch.linalg.eigvalsh(A).clamp(min=0)                       # (..., N): a probability distribution
    if alpha == 1:
        S = -(lam * torch.log(torch.where(lam > 0, lam, 1.0))).sum(-1)   # 0 log 0 = 0
    else:
        S = torch.log(lam.pow(alpha).sum(-1)) / (1 - alpha)
    return torch.where(ok, S, 0.0).clamp(0.0, math.log(N))


def bench(cfg):
    """Median step times of a plain PyTorch loop and of GAPT's two phases, the MBE's share, and the closed form."""
    if "RANK" in os.environ or cfg["task"] == "forgetting":
        raise ConfigError("--bench times the GPT in one process: python gapt.py --bench [--task=text --model=...]")
    device, ctx, scaler, _ = setup_device(cfg)
    from data import ARITH_VOCAB
    cfg = resolve(cfg, ARITH_VOCAB if cfg["task"] == "arithmetic" else 50304)
    B, T, P, D = cfg["batch_size"], cfg["block_size"], cfg["patch_size"], cfg["n_embd"]
    raw, optimizer, _ = build(cfg, device, None)
    compiled = cfg["compile"] == "on" or (cfg["compile"] == "auto" and device.type == "cuda")
    model, gpt = IBLM(raw, cfg["layers"], P), raw               # the GAPT steps' model, the plain step's
    model, gpt = (torch.compile(model), torch.compile(gpt)) if compiled else (model, gpt)
    x, y = (torch.randint(cfg["vocab_size"], (B, T), device=device) for _ in range(2))
    clip = cfg["grad_clip"] or math.inf

    lag, pending = int(device.type == "cuda") if cfg["read_lag"] == "auto" else int(cfg["read_lag"]), deque()

    def gapt_step(phase):   # as in train(): micro_step, update, and the host reads CE and M lag steps later
        ce, M = micro_step(model, x, y, phase, cfg, ctx, scaler, 1)
        stats = torch.stack([ce, M, torch.full((), float(phase), device=device)])
        pending.append(host_copy(update(raw, optimizer, scaler, cfg, stats)))
        while len(pending) > lag:
            host_values(pending.popleft())

    def plain_step():       # the reference: a plain PyTorch loop on the same model, CE only, nothing read
        with ctx:
            loss = gpt(x, y)[1]
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(raw.parameters(), clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    sync = {"cuda": torch.cuda.synchronize, "mps": torch.mps.synchronize}.get(device.type, lambda: None)

    def clock(fn, reps=1):  # seconds per call; a GPU's queue is drained at both ends only
        sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        sync()
        return (time.perf_counter() - t0) / reps

    median = lambda fn, n=20: float(np.median([clock(fn) for _ in range(n)]))   # noqa: E731
    modes = {"plain PyTorch": plain_step, "gapt memorise": lambda: gapt_step(MEMORIZE),
             "gapt compress": lambda: gapt_step(COMPRESS)}
    names, k = list(modes), 1 if device.type == "cpu" else 5   # k steps per reading: the drains cost little
    for fn in modes.values():
        clock(fn, 3)                                   # warm-up (and compilation)
    ts = {m: [] for m in modes}
    for i in range(-(-cfg["bench_steps"] // k)):       # the modes take turns, in rotating order
        for m in names[i % 3:] + names[:i % 3]:
            ts[m].append(clock(modes[m], k))
    step = {m: float(np.median(t)) for m, t in ts.items()}
    ratio = lambda a, b: float(np.median(np.divide(ts[a], ts[b])))   # noqa: E731
    with torch.no_grad(), ctx:                         # the MBE alone, on this model's representations
        hs = [h.detach().requires_grad_() for h in raw(x)[2]]
    with torch.no_grad():
        watch = median(lambda: layer_mbe(hs, cfg["layers"], P))
    learn = median(lambda: layer_mbe(hs, cfg["layers"], P).mean().backward())
    Z = torch.stack([hs[i].detach().reshape(-1, P, D) for i in cfg["layers"]])   # windows (L, B*T/P, P, D)
    with torch.no_grad():
        closed, eig = median(lambda: matrix_entropy(Z)), median(lambda: renyi_entropy(Z, 1.0))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    peak = next((f for s, f in PEAK_FLOPS if s in name), None) if name else None
    flops = 6 * (raw.num_params() - raw.transformer.wpe.weight.numel()) + 12 * cfg["n_layer"] * D * T   # nanoGPT's MFU
    print(f"bench: GPT {cfg['n_layer']} layers x {D}, {raw.num_params():,} parameters, MBE on layers {cfg['layers']} | "
          f"{B} x {T} random tokens a step | {device} {cfg['dtype']} | compile {'on' if compiled else 'off'} | "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads | median of {len(ts['plain PyTorch']) * k} steps")
    print(f"{'mode':<16}{'ms/step':>10}{'tok/s':>12}{'vs plain':>10}{'MFU':>8}")
    for m in modes:
        mfu = f"{flops * B * T / step[m] / peak:.1%}" if peak else "-"
        print(f"{m:<16}{1000 * step[m]:>10.2f}{B * T / step[m]:>12,.0f}{ratio(m, 'plain PyTorch'):>9.3f}x{mfu:>8}")
    print(f"compress / memorise {ratio('gapt compress', 'gapt memorise'):.3f}x | host read lag {lag} step(s)")
    print(f"MBE share of a step: memorise {watch / step['gapt memorise']:.2%} (no grad) | "
          f"compress {learn / step['gapt compress']:.2%} (forward and backward)")
    print(f"alpha=2 closed form vs eigenvalue path (alpha=1) on {tuple(Z.shape)} windows: {1e3 * closed:.3f} vs "
          f"{1e3 * eig:.3f} ms, {eig / closed:.1f}x")
    print(f"GPU: {name}, MFU vs {peak / 1e12:.0f} TFLOP/s dense bf16" if peak else
          f"GPU: {name}, peak FLOP/s unknown, no MFU" if name else "GPU: none (MFU needs a CUDA device)")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg = parse_args(argv)
        if cfg["bench"]:
            bench(cfg)
            return 0
        compare(cfg) if cfg["compare"] else (train_forgetting if cfg["task"] == "forgetting" else train)(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:   # on an error path too: a process group left to the interpreter's exit can abort it
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
