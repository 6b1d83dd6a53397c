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
    python gapt.py --optimizer=muon                  # Muon for the blocks' matrices
    python gapt.py --task=text --init_from=gpt2      # GAPT on GPT-2's pretrained weights
    python gapt.py --task=forgetting                 # the forgetting toy: an MLP, seconds
    python gapt.py --compare=memorize,gapt --seeds=3 # both arms x 3 seeds: table, out/<task>.png
    python gapt.py --bench                           # ms/step: memorise, compress, a plain loop
    python gapt.py --help                            # every flag, its default and meaning

Read top to bottom: config -> model -> MBE -> IBLM -> GAPT -> tasks -> the training loop, then
the run folder (checkpoints, logs), the forgetting toy, the experiments (--compare) and the
benchmark (--bench).
Importing this file has no side effects; everything runs under __main__.
"""
import argparse
import datetime
import fcntl
import hashlib
import io
import json
import math
import os
import random
import re
import shlex
import sys
import time
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data

# -----------------------------------------------------------------------------
# Config: flat defaults, each with its meaning. Override with --key=value (or --key value).

CONFIG = [
    "what to run",
    ("task", "arithmetic", "arithmetic (built in) | text (token shards, data.py) | forgetting"),
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
    ("bench", False, "time memorise and compress steps against a plain loop; train nothing"),
    ("bench_steps", 20, "--bench: timed steps per mode, after 3 warm-up steps"),
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
    "forgetting toy",
    ("forget_m", 0.8, "teachers: A theta0 + m * Delta, B theta0 - m * Delta (paper: 0.8)"),
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
    "experiments",
    ("compare", "", "phase modes to run, e.g. memorize,gapt,compress, x --seeds: a table, figures"),
    ("seeds", 3, "seeds per arm for --compare (--seed, --seed+1, ...)"),
    ("fig", "", "--compare's figure (default out_dir/<task>.png; cycle.png beside it)"),
]
DEFAULTS = {c[0]: c[1] for c in CONFIG if isinstance(c, tuple)}   # a string heads a group of flags
CHOICES = {"task": ("arithmetic", "text", "forgetting"),
           "phase_mode": ("gapt", "memorize", "compress"),
           "init_from": ("scratch", "resume", "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"),
           "dtype": ("auto", "float32", "bfloat16", "float16"),
           "compile": ("auto", "on", "off"), "read_lag": ("auto", "0", "1"),
           "model": ("tiny", "small", "gpt2"), "optimizer": ("adamw", "muon"),
           "arith_layout": ("padded", "packed"), "arith_loss": ("answer", "all")}
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
    for key, v in cfg.items():
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"--{key}={v}: must be a finite number")
    positive = ("p_m", "p_c", "batch_size", "max_iters", "patch_size", "n_eval", "log_interval",
                "max_bad_steps", "val_tokens", "seeds", "bench_steps", "dist_timeout")
    not_negative = ("seed", "n_layer", "n_head", "n_embd", "block_size", "eval_interval",
                    "align_interval", "total_batch_size", "warmup_iters", "tau", "delta_ce",
                    "delta_mbe", "mbe_weight", "weight_decay", "grad_clip", "min_lr")
    for keys, ok, what in ((positive, lambda v: v > 0, "positive"),
                           (not_negative, lambda v: v >= 0, ">= 0"),
                           (("beta1", "beta2", "dropout"), lambda v: 0 <= v < 1, "in [0, 1)")):
        for key in keys:
            if not ok(cfg[key]):
                raise ConfigError(f"--{key}={cfg[key]}: must be {what}")
    if not cfg["out_dir"].strip():
        raise ConfigError("--out_dir is empty: name a folder for the run")
    if not 0 < cfg["learning_rate"] <= 1e30 or cfg["min_lr"] > 1e30:   # Adam overflows at 1e38
        raise ConfigError(f"--learning_rate={cfg['learning_rate']} (--min_lr={cfg['min_lr']}): "
                          f"must be in (0, 1e30]")
    if cfg["seed"] + cfg["seeds"] > 2**63:     # torch and numpy seeds are 64-bit
        raise ConfigError(f"--seed={cfg['seed']}: must be below 2**63 (less --seeds)")
    digits = (cfg["digits_min"], cfg["digits_max"], cfg["ood_digits_min"], cfg["ood_digits_max"])
    if not 1 <= digits[0] <= digits[1] < digits[2] <= digits[3] <= 9:   # OOD: larger operands
        raise ConfigError("digit ranges need 1 <= --digits_min <= --digits_max < "
                          "--ood_digits_min <= --ood_digits_max <= 9")
    return cfg


def resolve(cfg):
    """Fill in what depends on the task: model shape, context length, vocabulary."""
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


def gpt2_heads(config, name, n_layer, n_embd):
    """n_head, which the tensors do not show: from config.json beside the weights, else by name."""
    if not os.path.isfile(config):
        if (n_layer, n_embd) != GPT2_SIZES[name][::2]:
            raise ConfigError(f"{config} is missing and the weights are not {name}'s size: "
                              f"it gives n_head")
        return GPT2_SIZES[name][1]
    try:
        with open(config) as f:
            return int(json.load(f)["n_head"])
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{config}: no n_head in it ({type(e).__name__})") from None


def load_gpt2(cfg):
    """Hugging Face GPT-2's state dict, as saved but for the "transformer." prefix (fit_gpt2 makes
    this model's). Sets cfg's n_layer, n_head, n_embd from the weights and the config.json beside
    them, and block_size, unless given, to the weights' positions; nothing is written."""
    name = cfg["init_from"]
    if cfg["task"] != "text":
        raise ConfigError(f"--init_from={name} needs --task=text (GPT-2's vocabulary)")
    path = gpt2_file(name, cfg["weights"])
    try:
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
    n_head = gpt2_heads(os.path.join(os.path.dirname(path), "config.json"), name, n_layer, n_embd)
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


def controller(cfg):
    """GAPT with cfg's thresholds, and the first phase: the controller's under --phase_mode=gapt,
    fixed under memorize (the CE-only baseline) and compress (the static regulariser)."""
    c = GAPT(cfg["delta_ce"], cfg["delta_mbe"], cfg["tau"], cfg["p_m"], cfg["p_c"])
    return c, {"gapt": c.phase, "memorize": MEMORIZE, "compress": COMPRESS}[cfg["phase_mode"]]

# -----------------------------------------------------------------------------
# Tasks and evaluation. What differs between tasks sits in one table, TASKS: the data and
# fixed eval sets (data.py), the vocabulary, the default context, the metrics kept, the panels
# of --compare's figure. A new task is a data class in data.py and an entry here.


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
    """Padded: the longest problem (ID or OOD), rounded up to whole MBE windows."""
    if cfg["arith_layout"] == "packed":
        return 32   # windows of the stream: the longest test problem and some context (README)
    need = data.arith_len(max(cfg["digits_max"], cfg["ood_digits_max"])) - 1
    return -(-need // cfg["patch_size"]) * cfg["patch_size"]


@dataclass
class Task:
    make: object = None     # (cfg, rank, world) -> (training data, {name: [(x, y), ...]} eval sets)
    vocab_size: int = 0
    context: object = None  # cfg -> the default block_size
    metrics: tuple = ()     # evaluate()'s metrics kept, per eval set
    panels: tuple = ()      # (logged metric, axis label): --compare's figure


TASKS = {
    "arithmetic": Task(arithmetic_data, data.ARITH_VOCAB, arithmetic_context,
                       ("ce", "acc", "conf", "mbe", "mbe_layers"),
                       (("ood_ce", "OOD answer CE (nats)"), ("ood_conf", "OOD confidence (top p)"),
                        ("id_acc", "ID exact match"), ("ood_acc", "OOD exact match"))),
    "text": Task(text_data, 50304,   # GPT-2's 50,257 tokens padded to a multiple of 64: faster
                 lambda cfg: 1024 if cfg["model"] == "gpt2" else 256, ("ce", "mbe", "mbe_layers"),
                 (("val_ce", "val CE (nats/token)"), ("val_mbe_layers", "val MBE per layer"))),
    "forgetting": Task(panels=(("separation", "separation of A and B (held out)"),   # its own loop
                               ("loss_A_after_B", "L1 loss on A after B (interference)"),
                               ("loss_B", "L1 loss on B"))),
}


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
    """(device, autocast context, grad scaler, ddp info). One code path for cpu, mps and cuda."""
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ   # launched by torchrun
    rank, local, world = (int(os.environ.get(k, d))
                          for k, d in (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)))
    dev, mps = cfg["device"], torch.backends.mps.is_available()
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"
    try:
        device = torch.device(dev)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"--device={dev}: use auto, cpu, cuda, cuda:N or mps")
    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device.type == "cuda" and not 0 <= (device.index or 0) < n_gpus:   # torch wraps cuda:200
        raise ConfigError(f"--device={dev}: no such CUDA device on this machine")
    if device.type == "mps" and not mps:
        raise ConfigError("--device=mps: MPS is not available on this machine")
    if ddp:
        timeout = datetime.timedelta(seconds=cfg["dist_timeout"])
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend, timeout=timeout)
    if device.type == "cuda":   # set_device needs an index: the local rank, or N of cuda:N, or 0
        device = torch.device("cuda", local if ddp else device.index or 0)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if cfg["dtype"] == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        cfg["dtype"] = "bfloat16" if bf16 else "float32"
    if cfg["compile"] == "auto":   # where compiling the model with its MBE pays off
        cfg["compile"] = "on" if device.type == "cuda" else "off"
    if cfg["read_lag"] == "auto":   # see train(): only a GPU's queue gains from the lag
        cfg["read_lag"] = "1" if device.type == "cuda" else "0"
    if cfg["dtype"] == "float16" and device.type != "cuda":
        raise ConfigError("--dtype=float16 needs a CUDA device (use bfloat16 or float32)")
    dtype = getattr(torch, cfg["dtype"])
    ctx = nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    return device, ctx, scaler, (ddp, rank, world)


def build(cfg, device, gpt2=None):
    """The GPT, initialised from --seed or from GPT-2's state dict gpt2 (load_gpt2), and its
    optimizer."""
    torch.manual_seed(cfg["seed"])
    model = GPT(GPTConfig(**{k: cfg[k] for k in GPTConfig.__dataclass_fields__}))
    model = (fit_gpt2(model, gpt2) if gpt2 else model).to(device)
    return model, make_optimizer(model, cfg, device)


def make_optimizer(model, cfg, device):
    """AdamW with weight decay on 2-D weights only (not biases, LayerNorms). With --optimizer=muon,
    the blocks' attention and MLP matrices go to Muon (orthogonalised momentum, as in the paper's
    modded-nanogpt runs) and the rest (tied embedding/head, positions, biases, norms) to AdamW."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    muon = cfg["optimizer"] == "muon"
    to_muon = [p for n, p in named if muon and n.startswith("transformer.h.") and p.dim() == 2]
    rest = [p for _, p in named if all(p is not q for q in to_muon)]
    groups = [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": cfg["weight_decay"]},
              {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}]
    adamw = torch.optim.AdamW(groups, lr=cfg["learning_rate"], betas=(cfg["beta1"], cfg["beta2"]),
                              fused=device.type == "cuda")
    if not muon:
        return adamw
    if not 0 < cfg["muon_lr"] <= 1e30 or cfg["muon_weight_decay"] < 0:
        raise ConfigError("--muon_lr must be in (0, 1e30] and --muon_weight_decay >= 0")
    if not hasattr(torch.optim, "Muon"):
        raise ConfigError(f"--optimizer=muon needs torch >= 2.9 (torch.optim.Muon); "
                          f"this is torch {torch.__version__}")
    scale = cfg["muon_lr"] / cfg["learning_rate"]   # train(): lr = get_lr(step) * lr_scale
    return Optimizers([torch.optim.Muon([{"params": to_muon, "lr_scale": scale}], lr=cfg["muon_lr"],
                                        weight_decay=cfg["muon_weight_decay"]), adamw])


class Optimizers:
    """Muon and AdamW driven as one: GradScaler (unscale_, the inf check, step), update()'s skip
    and the checkpoint see one param_groups list, one step() and one state dict."""

    def __init__(self, opts):
        self.opts = opts

    @property
    def param_groups(self):
        return [g for o in self.opts for g in o.param_groups]

    def step(self):
        for o in self.opts:
            o.step()

    def zero_grad(self, set_to_none=True):
        for o in self.opts:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"optimizers": [o.state_dict() for o in self.opts]}

    def load_state_dict(self, sd):
        scales = [g.get("lr_scale") for g in self.param_groups]   # the command line's, as the lr
        for o, s in zip(self.opts, sd["optimizers"], strict=True):
            o.load_state_dict(s)
        for g, s in zip(self.param_groups, scales):
            g["lr_scale"] = s


def describe(optimizer):
    """For the run log: each optimizer's peak lr, weight decay (of its 2-D weights), parameters."""
    return " + ".join(f"{type(o).__name__} (lr {o.defaults['lr']:g}, "
                      f"weight decay {o.param_groups[0]['weight_decay']:g}, "
                      f"{sum(p.numel() for g in o.param_groups for p in g['params']):,} parameters)"
                      for o in getattr(optimizer, "opts", [optimizer]))


def get_lr(step, cfg):
    """Linear warmup from lr/warmup (never 0) to lr, then cosine down to min_lr (never up: a
    --learning_rate below the default --min_lr stays constant)."""
    lr, warm, total = cfg["learning_rate"], cfg["warmup_iters"], cfg["max_iters"]
    if step < warm:
        return lr * (step + 1) / warm
    t, low = (step - warm) / max(1, total - warm), min(cfg["min_lr"], lr)
    return low + 0.5 * (1 + math.cos(math.pi * min(t, 1.0))) * (lr - low)


def update(raw, optimizer, scaler, cfg, stats):
    """Clip the gradient and step, unless CE, M (stats[:2]) or the gradient norm is not finite: then
    the update is skipped (under fp16 the grad scaler skips overflows too). Fused AdamW (on cuda)
    skips on the device from a found_inf flag, as under fp16's grad scaler, so the host does not
    wait for the GPU here; Muon and fp16 read the flag on the host. -> (*stats, norm, ok)"""
    scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg["grad_clip"] or math.inf)
    ok = torch.isfinite(stats[:2]).all() & (torch.isfinite(norm) | scaler.is_enabled())
    fused = all(g.get("fused") for g in optimizer.param_groups)   # as loaded from a checkpoint
    if fused and not scaler.is_enabled():
        optimizer.grad_scale, optimizer.found_inf = None, (~ok).float()
        optimizer.step()
        del optimizer.grad_scale, optimizer.found_inf
    elif ok:
        scaler.step(optimizer)
    scaler.update()         # also after a skip: it closes the unscale_ above (no-op without fp16)
    optimizer.zero_grad(set_to_none=True)
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
    raw, optimizer = build(cfg, device, gpt2)   # raw: uncompiled, unwrapped: what checkpoints hold
    ctrl, phase = controller(cfg)
    step, pending = 0, deque()            # pending: steps launched, not yet seen by the controller
    if ck:
        raw.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        ctrl.load_state_dict(ck["gapt"])
        if ck["scaler"]:                  # empty when the run had no fp16 grad scaler
            scaler.load_state_dict(ck["scaler"])
        step, pending = ck["step"], deque(ck.get("pending", []))
        phase = ctrl.phase if cfg["phase_mode"] == "gapt" else phase
        restore_rank(ck, loader, rank, world)
    model = IBLM(raw, cfg["layers"], cfg["patch_size"])   # CE and M from one forward pass
    if cfg["compile"] == "on":
        model = torch.compile(model)                      # one graph of the GPT and its MBE
    if ddp:
        ids = [device.index] if device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    log = on_every_rank(lambda: open_run(cfg, master, step if ck else None), ddp)
    log.print(f"torch {torch.__version__} | device {device} | dtype {cfg['dtype']} | processes "
              f"{world} | {raw.num_params():,} parameters | MBE on layers {cfg['layers']}")
    log.print(f"optimizer: {describe(optimizer)}")
    log.print(f"batch: {total:,} tokens/step = {B} seqs x {T} tokens x {world} processes x "
              f"{accum} accumulation steps")
    if step == 0 and cfg["eval_interval"] and master:
        log.record(kind="eval", step=0, **run_eval(raw, evals, cfg, device, ctx))
    # The host reads a step's CE, M and gradient norm `lag` steps after launching it. On cuda
    # (lag 1) the GPU then never waits for the host: the phase of step t+1 is decided from step
    # t-1's CE and M, read from a non-blocking copy. Elsewhere (lag 0) from step t's (Algorithm 1).
    # The controller sees only steps run in its own phase: at lag 1, the step in flight at a switch
    # is skipped, so a phase's best CE and MBE are its own steps'.
    lag = int(cfg["read_lag"])
    bad, t_start, start, switches = 0, time.time(), step, 0
    while step < cfg["max_iters"]:
        t0, lr = time.time(), get_lr(step, cfg)
        for g in optimizer.param_groups:
            g["lr"] = lr * (g.get("lr_scale") or 1.0)   # Muon keeps its own peak (make_optimizer)
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
        stats = update(raw, optimizer, scaler, cfg, all_mean(stats, ddp, world))   # or skip it
        step += 1                                # a skipped step counts, as under fp16's scaler
        pending.append({"step": step, "phase": phase, "lr": lr, "ms": 1000 * (time.time() - t0),
                        "stats": host_copy(stats)})
        while len(pending) > lag:                # the controller sees step s after s + lag starts
            rec = settle(pending.popleft(), log, cfg, total)
            ce, mbe, phase_mean, norm, ok = rec["stats"]
            if abs(phase_mean - rec["phase"]) > 1e-6:   # all ranks read the same all-reduced values
                raise TrainingError(f"step {rec['step']}: processes disagree about the phase "
                                    f"(mean {phase_mean}, this one {rec['phase']})")
            bad = 0 if ok else bad + 1
            if not ok:                           # a skipped update: the controller never sees it
                log.print(f"step {rec['step']}: non-finite ce={ce} mbe={mbe} grad_norm={norm}: "
                          f"update skipped ({bad}/{cfg['max_bad_steps']})")
                if bad >= cfg["max_bad_steps"]:
                    raise TrainingError(f"stopped after {bad} consecutive non-finite steps (try a "
                                        f"lower --learning_rate); the last good checkpoint, if any,"
                                        f" is {os.path.join(cfg['out_dir'], 'ckpt.pt')}")
            elif cfg["phase_mode"] == "gapt" and rec["phase"] == ctrl.phase:
                new = ctrl.step(ce, mbe)         # Algorithm 1: the phase of the next step
                switches, phase = switches + (new != phase), new
        if master and cfg["align_interval"] and step % cfg["align_interval"] == 0:
            x, y = (t.to(device) for t in next(iter(evals.values()))[0])
            cos, per_layer = grad_alignment(raw, x, y, cfg)
            log.record(kind="align", step=step, cos=cos, cos_layers=per_layer)
        if (cfg["eval_interval"] and step % cfg["eval_interval"] == 0) or step == cfg["max_iters"]:
            for rec in pending:                  # logged now, given to the controller on time
                settle(rec, log, cfg, total)
            if master:
                metrics = run_eval(raw, evals, cfg, device, ctx)
                log.record(kind="eval", step=step, **metrics)
                log.print(f"eval {step:>5} | " + " | ".join(
                    f"{k} {v:.4f}" for k, v in metrics.items() if not isinstance(v, list)))
            on_every_rank(lambda: save(cfg, loader, ddp, world, master, {
                "model": raw.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                "gapt": ctrl.state_dict(), "scaler": scaler.state_dict(), "config": cfg,
                "pending": list(pending)}), ddp)
    if ddp:   # every rank leaves the process group together, before rank 0 writes the summary
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if master:
        summary(cfg, time.time() - t_start, start, switches)
        if cfg["task"] == "text":
            print_samples(raw, evals["val"][0][0], cfg, device)


def on_every_rank(fn, ddp):
    """fn() on this rank. Under torchrun an error on rank 0 alone (its lock, its files, a full
    disk) is raised on every rank, so that none is left waiting for it in a collective."""
    err, out = None, None
    try:
        out = fn()
    except (ConfigError, TrainingError) as e:
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


def settle(rec, log, cfg, total):
    """Read a launched step's values on the host (once) and log them: a train or a skip record."""
    if not rec.get("logged"):
        rec["stats"], rec["logged"] = host_values(rec["stats"]), True
        (ce, mbe, _, norm, ok), step, ms = rec["stats"], rec["step"], rec["ms"]
        if not ok:
            log.record(kind="skip", step=step, ce=ce, mbe=mbe, grad_norm=norm)
        else:
            log.record(kind="train", step=step, phase=rec["phase"], ce=ce, mbe=mbe, lr=rec["lr"],
                       ms=ms, tok_s=1000 * total / ms)
        if ok and (step % cfg["log_interval"] == 0 or step in (1, cfg["max_iters"])):
            log.print(f"step {step:>5}/{cfg['max_iters']} | {PHASES[rec['phase']]} | ce {ce:.4f} | "
                      f"mbe {mbe:.4f} | lr {rec['lr']:.2e} | {ms:.1f} ms | "
                      f"{1000 * total / ms:,.0f} tok/s")
    return rec


class TrainingError(RuntimeError):
    """A run that cannot go on (e.g. persistent NaNs): reported as one line, exit code 1."""


# -----------------------------------------------------------------------------
# The run folder: one run at a time, an earlier run kept whole, checkpoints that are atomic and
# checksummed and hold every rank's data and RNG state, a log that survives a damaged line.


def save(cfg, loader, ddp, world, master, state):
    """Checkpoint state and every rank's data-generator and RNG states (gathered to rank 0):
    enough to continue as if never stopped. Never from non-finite weights."""
    mine = {"data": loader.state_dict(), "rng": rng_state()}
    ranks = [None] * world if ddp else [mine]
    if ddp:
        torch.distributed.all_gather_object(ranks, mine)
    if master and not all(torch.isfinite(p).all() for p in state["model"].values()):
        print(f"step {state['step']}: non-finite weights, checkpoint not written")
    elif master:
        save_checkpoint(os.path.join(cfg["out_dir"], "ckpt.pt"), {**state, "ranks": ranks})


CKPT_MAGIC = b"GAPT-CKPT sha256 "   # then the payload's sha256 (64 hex digits), "\n", the payload


def save_checkpoint(path, state):
    """Atomic: a run killed while saving leaves the previous checkpoint intact, and a failed save
    (a full disk) leaves no .tmp behind. The checksum lets a load tell a changed bit."""
    buf = io.BytesIO()
    torch.save(state, buf)
    payload, tmp = buf.getbuffer(), path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(CKPT_MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n")
            f.write(payload)
        os.replace(tmp, path)
    except BaseException as e:   # also Ctrl-C mid-write
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise TrainingError(f"step {state['step']}: cannot write {path} ({e.strerror or e}); "
                                f"the previous checkpoint there is kept") from None
        raise


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
        missing = {"model", "optimizer", "gapt", "scaler", "step", "config", "ranks"} - set(ck)
        if missing:
            raise KeyError(", ".join(sorted(missing)))
    except ConfigError as e:
        raise ConfigError(f"--init_from=resume: {e}") from None
    except Exception as e:
        raise ConfigError(f"--init_from=resume: {path} is damaged ({type(e).__name__}); "
                          f"delete it to start over") from None
    old = {k: ck["config"].get(k, DEFAULTS[k]) for k in RESUMED}   # older checkpoints lack some
    given = [k for k in RESUMED if cfg[k] != DEFAULTS[k] and cfg[k] != old[k]]
    if given and master:
        print("resume: the checkpoint's values replace " +
              ", ".join(f"--{k}={cfg[k]} (now {old[k]})" for k in given))
    cfg.update(old, vocab_real=ck["config"].get("vocab_real", 0))
    if cfg["data_dir"] == DEFAULTS["data_dir"]:   # its corpus, unless given (a copy moved, say)
        cfg["data_dir"] = ck["config"].get("data_dir", cfg["data_dir"])
    trained = ck["config"].get("optimizer", "adamw")   # another optimizer's state would not load
    if cfg["optimizer"] != trained:
        raise ConfigError(f"--optimizer={cfg['optimizer']}: the checkpoint was trained with "
                          f"--optimizer={trained}; resume with that")
    if cfg["max_iters"] < ck["step"]:
        raise ConfigError(f"--max_iters={cfg['max_iters']}: the checkpoint is at step {ck['step']} "
                          f"already; give a larger --max_iters to train on")
    if cfg["max_iters"] == ck["step"] and master:
        print(f"resume: the checkpoint is at step {ck['step']} = --max_iters: nothing to train")
    return ck


def rng_state():
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() else None   # this rank's GPU
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(), "cuda": cuda}


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


def read_records(path):
    """The records in a log.jsonl; a damaged line (a torn write, stray bytes) is skipped, with a
    warning."""
    recs, bad = [], []
    with open(path, "rb") as f:
        for i, line in enumerate(f, 1):
            try:
                rec = json.loads(line)
                ok = isinstance(rec, dict) and line.endswith(b"\n")
            except ValueError:   # JSONDecodeError and UnicodeDecodeError both are
                ok = False
            recs.append(rec) if ok else bad.append(i)
    if bad:
        lines = ", ".join(map(str, bad[:5]))
        print(f"warning: {path}: skipped {len(bad)} damaged line(s): {lines}")
    return recs


def read_log(run_dir, kind):
    """The records of one kind ("train", "eval", "align", "skip") in run_dir/log.jsonl."""
    return [r for r in read_records(os.path.join(run_dir, "log.jsonl")) if r.get("kind") == kind]


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
        raise ConfigError(f"--{flag}={path}: cannot make this folder ({head} is not a writable "
                          f"folder)")


RUN_FILES = re.compile(r"ckpt\.pt|ckpt\.prev\.pt|log\.jsonl|config\.json|curves\.png|results\.json"
                       r"|(arithmetic|text|forgetting|cycle)\.png|(gapt|memorize|compress)_seed\d+")


def lock_dir(out_dir):
    """Hold out_dir/.lock (flock) for this process's life: one run per out_dir at a time. The kernel
    drops the lock when the process ends, however it ends, so a killed run leaves nothing stuck."""
    make_dir(out_dir, "out_dir")
    try:
        f = open(os.path.join(out_dir, ".lock"), "a+")
    except OSError as e:   # e.g. a read-only or immutable folder
        raise ConfigError(f"--out_dir={out_dir}: cannot write here ({e.strerror or e})") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        pid = f.read().strip() or "?"
        raise ConfigError(f"--out_dir={out_dir}: another run (pid {pid}) is writing here; "
                          f"wait for it to end, or choose another --out_dir") from None
    f.truncate(0)
    f.write(str(os.getpid()))
    f.flush()
    for name in ("ckpt.pt.tmp", "log.jsonl.tmp"):   # what a run killed mid-write left
        if os.path.exists(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))
    return f


def keep_earlier_run(out_dir):
    """A fresh run into a used out_dir moves the earlier run's files (a whole --compare's too) to
    out_dir/earlier/N, N = 1, 2, ...: a forgotten --init_from=resume costs nothing, and a later
    resume never pairs an old checkpoint with a new log. Other files in out_dir stay."""
    names = [n for n in sorted(os.listdir(out_dir)) if RUN_FILES.fullmatch(n)]
    if names:
        n = 1 + max([int(d) for d in os.listdir(os.path.join(out_dir, "earlier")) if d.isdigit()]
                    if os.path.isdir(os.path.join(out_dir, "earlier")) else [0])
        dest = os.path.join(out_dir, "earlier", str(n))
        try:
            os.makedirs(dest)
        except OSError as e:   # e.g. a file named "earlier"
            raise ConfigError(f"--out_dir={out_dir}: cannot keep the earlier run's files in {dest} "
                              f"({e.strerror or e})") from None
        for name in names:
            os.replace(os.path.join(out_dir, name), os.path.join(dest, name))
        print(f"{out_dir}: the earlier run's files are kept in {dest} (this one starts afresh)")


def open_run(cfg, master, resume_step=None):
    """Lock out_dir, keep an earlier run's files (fresh run), write config.json: the Logger."""
    lock = lock_dir(cfg["out_dir"]) if master else None
    try:
        if master and resume_step is None:
            keep_earlier_run(cfg["out_dir"])
        if master:
            with open(os.path.join(cfg["out_dir"], "config.json"), "w") as f:
                json.dump(cfg, f, indent=1)
        log = Logger(cfg["out_dir"], master, resume_step)
    except OSError as e:   # e.g. config.json or log.jsonl is a folder, or the disk is full
        raise ConfigError(f"--out_dir={cfg['out_dir']}: cannot write {e.filename} "
                          f"({e.strerror or e})") from None
    log.lock = lock   # held as long as the run's Logger
    log.print(f"config: {json.dumps({k: cfg[k] for k in DEFAULTS})}")
    return log


class Logger:
    """Rank 0 only: one human line per log interval, every record to log.jsonl."""

    def __init__(self, out_dir, master, resume_step=None):
        self.master, self.path = master, os.path.join(out_dir, "log.jsonl")
        if master and resume_step is not None and os.path.exists(self.path):
            self.truncate_after(resume_step)   # steps after the checkpoint will be run again
        self.f = open(self.path, "a" if resume_step is not None else "w") if master else None

    def truncate_after(self, step):
        keep = [json.dumps(r) + "\n" for r in read_records(self.path) if r.get("step", 0) <= step]
        with open(self.path + ".tmp", "w") as f:
            f.writelines(keep)
        os.replace(self.path + ".tmp", self.path)

    def record(self, **rec):
        if self.master:
            try:
                self.f.write(json.dumps(rec) + "\n")
                self.f.flush()
            except OSError as e:   # a full disk: one line, and the last checkpoint is whole
                raise TrainingError(f"cannot write {self.path} ({e.strerror or e})") from None

    def print(self, *a):
        if self.master:
            print(*a, flush=True)


# -----------------------------------------------------------------------------
# The end of a run: a summary, curves.png, and for text a few greedy samples.


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
    """This session's steps, time and phase switches; the whole run's compression share, final
    eval and curves.png."""
    train_recs, eval_recs = read_log(cfg["out_dir"], "train"), read_log(cfg["out_dir"], "eval")
    compress = sum(r["phase"] == COMPRESS for r in train_recs)
    print("-" * 72)
    since = f" from step {start}" if start else ""
    print(f"done: {max(0, cfg['max_iters'] - start)} steps{since} in {seconds:.0f} s | phase "
          f"switches {switches} | compression {100 * compress / max(1, len(train_recs)):.0f}% "
          f"of steps")
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


def plot_run(train_recs, path, phase_mode):
    """curves.png: training CE and M per step, the compression phases shaded."""
    plt, steps = pyplot(), [r["step"] for r in train_recs]
    spans = phase_spans(steps, [r["phase"] for r in train_recs])
    fig, axes = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
    layers = "watched" if phase_mode == "memorize" else "compressed"
    for ax, key, label in zip(axes, ("ce", "mbe"), ("train CE", f"MBE of the {layers} layers")):
        ax.plot(steps, [r[key] for r in train_recs], lw=0.8)
        for a, b in spans:
            ax.axvspan(a, b, color="tab:orange", alpha=0.2, lw=0)
        ax.set_ylabel(label)
    shaded = "shaded: compression phases" if spans else "no compression phase"
    axes[0].set_title(f"{phase_mode}: CE and MBE (nats) per step ({shaded})")
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
        enc = data.get_tokenizer(cfg["tokenizer_file"] or None)
        decode = lambda ids: enc.decode([i for i in ids if i < enc.n_vocab])   # noqa: E731
    except Exception:   # offline and no --tokenizer_file: show ids
        decode = str
        print("samples as token ids: no GPT-2 BPE here (pass --tokenizer_file)")
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
    """||mean(ha) - mean(hb)|| / sqrt((var_a + var_b) / 2), var the mean squared distance to the
    group's mean: how far apart two groups of vectors (n, D) lie, in units of their spread."""
    d = (ha.mean(0) - hb.mean(0)).norm().item()
    s = math.sqrt(sum((h - h.mean(0)).square().sum(1).mean().item() for h in (ha, hb)) / 2)
    return d / s if s > 0 else (0.0 if d == 0 else math.inf)   # no spread: two points, apart or not


def fit_task(model, x, y, cfg, log, task, start):
    """max_iters full-batch Adam steps on L1 (+ mbe_weight * M when compressing) -> the last step.
    The learning rate is constant: a schedule across both tasks would learn B slower than A.
    The controller starts afresh: carried over, its best loss would be A's, which B's early
    losses never improve on, so it would compress after p_m steps while B is still unlearnt."""
    ctrl, phase = controller(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg["learning_rate"])   # no task-A moments in B
    n_compress = 0
    for step in range(start + 1, start + cfg["max_iters"] + 1):
        pred, h = model(x)
        l1 = F.l1_loss(pred, y)
        hs = [(h if phase == COMPRESS else h.detach())[None]]   # samples as one (1, n, D) sequence
        M = layer_mbe(hs, [0], cfg["patch_size"])[0]            # in memorisation only watched
        opt.zero_grad(set_to_none=True)
        iblm_loss(l1, M, phase, cfg["mbe_weight"]).backward()
        opt.step()
        used, n_compress = phase, n_compress + (phase == COMPRESS)
        if cfg["phase_mode"] == "gapt":
            phase = ctrl.step(l1.item(), M.item())
        log.record(kind="train", step=step, task=task, phase=used, loss=l1.item(), mbe=M.item())
        if step % cfg["log_interval"] == 0:
            log.print(f"task {task} step {step:>5} | {PHASES[used]} | "
                      f"l1 {l1.item():.4f} | mbe {M.item():.4f}")
    log.print(f"task {task}: compression {100 * n_compress / cfg['max_iters']:.0f}% of "
              f"{cfg['max_iters']} steps")
    return step


@torch.no_grad()
def forgetting_eval(model, d, patch_size):
    """Held-out L1 on A and B, the separation of the two tasks' hidden layers, and their MBE."""
    (pa, ha), (pb, hb) = model(d["xa_test"]), model(d["xb_test"])
    mbe = lambda h: layer_mbe([h[None]], [0], patch_size).item()   # noqa: E731
    return {"loss_A": F.l1_loss(pa, d["ya_test"]).item(),
            "loss_B": F.l1_loss(pb, d["yb_test"]).item(), "separation": separation(ha, hb),
            "mbe_A": mbe(ha), "mbe_B": mbe(hb)}


def train_forgetting(cfg):
    if "RANK" in os.environ:
        raise ConfigError("--task=forgetting runs in one process: launch it with python")
    if cfg["init_from"] == "resume":
        raise ConfigError("--task=forgetting takes seconds and keeps no checkpoint: run it again, "
                          "without --init_from")
    if cfg["device"] not in ("auto", "cpu"):
        raise ConfigError(f"--device={cfg['device']}: --task=forgetting is a 10 -> 50 -> 1 MLP and "
                          f"runs on the CPU")
    n_in, n_hidden = 10, 50                          # the paper's teacher, and so the student
    d = data.forgetting_data(cfg["seed"], n_in, n_hidden, cfg["forget_m"])
    if len(d["xa"]) % cfg["patch_size"] or len(d["xa_test"]) % cfg["patch_size"]:
        raise ConfigError(f"--patch_size={cfg['patch_size']} must divide the toy's {len(d['xa'])} "
                          f"samples per task")
    torch.set_num_threads(1)   # matmuls this small only wait on each other in threads (20x slower)
    torch.manual_seed(cfg["seed"])
    model = Student(n_in, n_hidden)
    log = open_run(cfg, True)
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
# Experiments: one config run under several phase modes and seeds (identical
# data and steps per seed), a table of final metrics (mean +- std) and a figure.


def compare(cfg):
    """Every arm (a phase mode) x --seeds runs into out_dir/<arm>_seed<s>, then the table, the
    paired differences and the figures. Seeds outer: a stopped comparison has every arm for the
    seeds done, and --init_from=resume continues it: arms not started yet start as the others did,
    from the comparison's config.json."""
    arms, modes = cfg["compare"].split(","), CHOICES["phase_mode"]
    if any(a not in modes for a in arms) or len(set(arms)) < len(arms):
        raise ConfigError(f"--compare={cfg['compare']}: a comma list of {' | '.join(modes)}, "
                          f"each once")
    if "RANK" in os.environ:
        raise ConfigError("--compare runs its arms one after another: launch it with python")
    saved, fresh = os.path.join(cfg["out_dir"], "config.json"), cfg["init_from"]
    if fresh == "resume" and os.path.isfile(saved):   # the model, data and start of its arms
        try:
            with open(saved) as f:
                first = dict(json.load(f))
        except (ValueError, TypeError):   # a torn write, stray bytes
            raise ConfigError(f"{saved} is damaged: delete it (the arms not begun then start "
                              f"from scratch)") from None
        given = {"data_dir": cfg["data_dir"]} if cfg["data_dir"] != DEFAULTS["data_dir"] else {}
        cfg = {**cfg, **{k: first.get(k, DEFAULTS[k]) for k in (*RESUMED, "weights", "data_dir")},
               **given}
        fresh = first.get("init_from", "scratch")
    elif fresh == "resume":                           # a comparison from before config.json
        fresh = "scratch"
    elif cfg["task"] != "forgetting":                 # bad data input: one line, nothing moved
        make_data(resolve(cfg), 0, 1)
    path = cfg["fig"] or os.path.join(cfg["out_dir"], cfg["task"] + ".png")
    from matplotlib.backend_bases import FigureCanvasBase   # the formats savefig writes
    if os.path.splitext(path)[1][1:].lower() not in FigureCanvasBase.get_supported_filetypes():
        raise ConfigError(f"--fig={path}: name an image file: .png, .pdf, .svg, ...")
    check_dir(cfg["out_dir"], "out_dir")                  # before the runs, not after
    check_dir(os.path.dirname(path) or ".", "fig" if cfg["fig"] else "out_dir")
    made, lock = not os.path.isdir(cfg["out_dir"]), lock_dir(cfg["out_dir"])   # held to the end
    if cfg["init_from"] != "resume":      # a fresh comparison: no arm may resume an earlier one's
        keep_earlier_run(cfg["out_dir"])
        with open(saved, "w") as f:
            json.dump(cfg, f, indent=1)
    dirs = {arm: [] for arm in arms}
    for s in range(cfg["seeds"]):
        for arm in arms:
            out = os.path.join(cfg["out_dir"], f"{arm}_seed{s}")
            print(f"=== {arm}, seed {cfg['seed'] + s} -> {out}", flush=True)
            resume = cfg["init_from"] == "resume" and os.path.exists(os.path.join(out, "ckpt.pt"))
            try:
                run(dict(cfg, phase_mode=arm, seed=cfg["seed"] + s, out_dir=out, compare="",
                         init_from="resume" if resume else fresh))
            except ConfigError:   # bad input found by the first run: no out_dir made for nothing
                if made and sorted(os.listdir(cfg["out_dir"])) == [".lock", "config.json"]:
                    os.remove(saved)
                    os.remove(lock.name)
                    os.rmdir(cfg["out_dir"])
                raise
            dirs[arm].append(out)
    with open(os.path.join(cfg["out_dir"], "results.json"), "w") as f:
        json.dump(compare_table(dirs), f, indent=1)
    make_dir(os.path.dirname(path) or ".", "fig")
    plot_compare(dirs, cfg, path)
    print(f"figure: {path}\nresults: {os.path.join(cfg['out_dir'], 'results.json')}")
    aligns = {(arm, s): [r["cos"] for r in read_log(out, "align")]
              for arm, outs in dirs.items() for s, out in enumerate(outs)}
    if any(aligns.values()):
        plot_cycle(dirs, os.path.join(os.path.dirname(path), "cycle.png"))
        print(f"figure: {os.path.join(os.path.dirname(path), 'cycle.png')}")
        for (arm, s), cos in aligns.items():
            print(f"cycle, {arm} seed {cfg['seed'] + s}: {cycle_stats(cos)}")


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
    finals = {a: [(read_log(o, "eval") or [None])[-1] for o in outs] for a, outs in dirs.items()}
    empty = [o for arm, outs in dirs.items() for o, f in zip(outs, finals[arm]) if f is None]
    if empty:   # its log.jsonl was deleted, say
        raise TrainingError(f"{empty[0]}/log.jsonl holds no eval: delete that folder and resume")
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
    """How the gradient alignment behaves over a run: a slow cycle shows as few sign changes and
    a lag-1 autocorrelation near 1; step-to-step noise as many changes and one near 0."""
    c = np.asarray(cos, dtype=float)
    if len(c) < 3:
        return f"{len(c)} measurements, too few (lower --align_interval)"
    changes = int(((c[1:] > 0) != (c[:-1] > 0)).sum())
    lag1 = np.corrcoef(c[:-1], c[1:])[0, 1]
    return (f"cos > 0 in {(c > 0).mean():.0%} of {len(c)} measurements, {changes} sign changes, "
            f"lag-1 autocorrelation {lag1:.2f}")


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
    axes[0][0].set_ylabel("cos(grad CE, grad MBE)")
    fig.suptitle("Alignment of the CE and MBE gradients: "
                 "above 0 memorising also compresses, below 0 they conflict")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_compare(dirs, cfg, path):
    """One panel per metric of the task (TASKS): curves over steps with their std band, the final
    per-layer values as bars, or, where each run has a single eval (the toy), a bar per arm."""
    plt, panels = pyplot(), TASKS[cfg["task"]].panels
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    curves = False
    for ax, (key, label) in zip(axes[0], panels):
        for i, (arm, outs) in enumerate(dirs.items()):
            evals = [read_log(o, "eval") for o in outs]
            if key.endswith("_layers"):            # bars: one group of layers per arm
                v = np.array([e[-1][key] for e in evals])
                x = np.arange(v.shape[1]) + (i - (len(dirs) - 1) / 2) * 0.8 / len(dirs)
                ax.bar(x, v.mean(0), 0.8 / len(dirs), yerr=sd(v), label=arm)
                ax.set_xlabel("layer")
            elif len(evals[0]) == 1:               # one value per run: a bar per arm
                v = [e[-1][key] for e in evals]
                ax.bar(i, np.mean(v), yerr=sd(v))
                ax.set_xticks(range(len(dirs)), list(dirs))
            else:
                steps, m, s = mean_curve(outs, "eval", key)
                ax.plot(steps, m, label=arm)
                ax.fill_between(steps, m - s, m + s, alpha=0.2)
                ax.set_xlabel("optimizer step")
                curves = True
        if curves and "gapt" in dirs and not key.endswith("_layers"):
            recs = read_log(dirs["gapt"][0], "train")
            for a, b in phase_spans([r["step"] for r in recs], [r["phase"] for r in recs]):
                ax.axvspan(a, b, color="grey", alpha=0.15, lw=0)
        ax.set_ylabel(label)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    n = len(next(iter(dirs.values())))
    shaded = " (grey: GAPT seed-0 compression)" if curves and "gapt" in dirs else ""
    fig.suptitle(f"{cfg['task']}: {' vs '.join(dirs)}, mean ± std over {n} seeds{shaded}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

# -----------------------------------------------------------------------------
# Benchmark (--bench): what compression costs on top of language modelling. The
# modes take turns on one model and one batch of random tokens of the task's
# vocabulary and context (no data loading, one micro-batch a step), so machine
# noise hits them alike; ratios are medians of the ratios within each turn.

# peak dense bf16 tensor FLOP/s (datasheets, no sparsity) by a substring of the GPU's name; first
# match wins
PEAK_FLOPS = (("GB200", 2500e12), ("B200", 2250e12), ("H200 NVL", 836e12), ("H200", 989e12),
              ("H100 NVL", 835e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12),
              ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12), ("RTX 4090", 165e12),
              ("RTX 3090", 71e12))


def renyi_entropy(Z, alpha):
    """The MBE's definition for any order alpha > 0, from the eigenvalues of G / tr G, G = Z Z^T of
    windows Z (..., N, D) -> (...,) nats. --bench times the closed form against it; for analysis."""
    G = Z.float() @ Z.float().transpose(-1, -2)
    tr, N = G.diagonal(dim1=-2, dim2=-1).sum(-1), G.shape[-1]
    ok = G.square().sum((-2, -1)) != 0                 # Z = 0 (or underflow): 0; NaN stays NaN
    eye = torch.eye(N, dtype=G.dtype, device=G.device) # Z = 0 is swapped for I: no NaN gradients
    A = torch.where(ok[..., None, None], G, eye) / torch.where(ok, tr, N)[..., None, None]
    lam = torch.linalg.eigvalsh(A).clamp(min=0)        # (..., N): a probability distribution
    if alpha == 1:
        S = -(lam * torch.log(torch.where(lam > 0, lam, 1.0))).sum(-1)   # 0 log 0 = 0
    else:
        S = torch.log(lam.pow(alpha).sum(-1)) / (1 - alpha)
    return torch.where(ok, S, 0.0).clamp(0.0, math.log(N))


def bench(cfg):
    """Median step times of a plain loop and of GAPT's phases, the MBE's share, the closed form."""
    if "RANK" in os.environ or cfg["task"] == "forgetting" or cfg["compare"] or \
            cfg["init_from"] != "scratch":
        raise ConfigError("--bench times a fresh GPT in one process, no --init_from or --compare: "
                          "python gapt.py --bench [--task=text --model=...]")
    device, ctx, scaler, _ = setup_device(cfg)
    cfg = resolve(cfg)
    B, T, P, D = cfg["batch_size"], cfg["block_size"], cfg["patch_size"], cfg["n_embd"]
    raw, optimizer = build(cfg, device)
    model, gpt = IBLM(raw, cfg["layers"], P), raw          # the GAPT steps' model, the plain step's
    compiled = cfg["compile"] == "on"
    if compiled:
        model, gpt = torch.compile(model), torch.compile(gpt)
    x, y = (torch.randint(cfg["vocab_size"], (B, T), device=device) for _ in range(2))
    lag, pending = int(cfg["read_lag"]), deque()

    def train_step(phase):   # train()'s step, one micro-batch; phase 0: a plain loop, CE only
        zero = torch.zeros((), device=device)
        with ctx:
            ce, M = model(x, y, phase == COMPRESS) if phase else (gpt(x, y)[1], zero)
        scaler.scale(iblm_loss(ce, M, phase, cfg["mbe_weight"])).backward()
        stats = torch.stack([ce.detach().float(), M.detach(), zero + phase])
        stats = update(raw, optimizer, scaler, cfg, stats)
        if phase:                                   # the host reads CE and M lag steps later
            pending.append(host_copy(stats))
            while len(pending) > lag:
                host_values(pending.popleft())

    syncs = {"cuda": torch.cuda.synchronize, "mps": torch.mps.synchronize}
    sync = syncs.get(device.type, lambda: None)

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
    step = {m: float(np.median(t)) for m, t in ts.items()}
    ratio = lambda a, b: float(np.median(np.divide(ts[a], ts[b])))   # noqa: E731
    with torch.no_grad(), ctx:                         # the MBE alone, on this model's outputs
        hs = [h.detach().requires_grad_() for h in raw(x)[2]]
    with torch.no_grad():
        watch = median(lambda: layer_mbe(hs, cfg["layers"], P))
    learn = median(lambda: layer_mbe(hs, cfg["layers"], P).mean().backward())
    Z = torch.stack([hs[i].detach().reshape(-1, P, D) for i in cfg["layers"]])   # (L, B*T/P, P, D)
    with torch.no_grad():
        closed, eig = median(lambda: matrix_entropy(Z)), median(lambda: renyi_entropy(Z, 1.0))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    peak = next((f for s, f in PEAK_FLOPS if s in name), None) if name else None
    n = raw.num_params() - raw.transformer.wpe.weight.numel()
    flops = 6 * n + 12 * cfg["n_layer"] * D * T         # per token, as nanoGPT's MFU counts them
    print(f"bench: GPT {cfg['n_layer']} layers x {D}, {raw.num_params():,} parameters, MBE on "
          f"layers {cfg['layers']} | {B} x {T} random tokens a step | {device} {cfg['dtype']} | "
          f"compile {'on' if compiled else 'off'} | torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads | median of {len(ts['plain PyTorch']) * k} steps")
    print(f"{'mode':<16}{'ms/step':>10}{'tok/s':>12}{'vs plain':>10}{'MFU':>8}")
    for m in modes:
        mfu = f"{flops * B * T / step[m] / peak:.1%}" if peak else "-"
        print(f"{m:<16}{1000 * step[m]:>10.2f}{B * T / step[m]:>12,.0f}"
              f"{ratio(m, 'plain PyTorch'):>9.3f}x{mfu:>8}")
    print(f"compress / memorise {ratio('gapt compress', 'gapt memorise'):.3f}x | "
          f"host read lag {lag} step(s)")
    print(f"MBE share of a step: memorise {watch / step['gapt memorise']:.2%} (no grad) | "
          f"compress {learn / step['gapt compress']:.2%} (forward and backward)")
    print(f"alpha=2 closed form vs eigenvalue path (alpha=1) on {tuple(Z.shape)} windows: "
          f"{1e3 * closed:.3f} vs {1e3 * eig:.3f} ms, {eig / closed:.1f}x")
    print(f"GPU: {name}, MFU vs {peak / 1e12:.0f} TFLOP/s dense bf16" if peak else
          f"GPU: {name}, peak FLOP/s unknown, no MFU" if name else
          "GPU: none (MFU needs a CUDA device)")


def run(cfg):
    """One training run: the GPT's loop, or the forgetting toy's own."""
    return train_forgetting(cfg) if cfg["task"] == "forgetting" else train(cfg)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cfg = None
    try:
        cfg = parse_args(argv)
        if cfg["bench"]:
            bench(cfg)
            return 0
        compare(cfg) if cfg["compare"] else run(cfg)
    except ConfigError as e:   # the same on every rank: rank 0 says it
        if os.environ.get("RANK", "0") == "0":
            sys.stderr.write(f"error: {e}\n")
        return 2
    except (TrainingError, OSError) as e:   # OSError: e.g. a full disk, writing a log or figure
        sys.stderr.write(f"error: {e}\n")      # one write: ranks' lines do not interleave
        return 1
    except (MemoryError, RuntimeError) as e:   # out of memory; under torchrun, lost processes
        if isinstance(e, (MemoryError, torch.OutOfMemoryError)) or "can't allocate" in str(e):
            sys.stderr.write(f"error: out of memory ({type(e).__name__}): try a smaller "
                             f"--batch_size, --block_size or model\n")
            return 1
        timeout = "timed out" in str(e).lower()
        lost = timeout or isinstance(e, getattr(torch.distributed, "DistError", ())) or \
            re.search(r"connection|peer|pipe", str(e), re.I)   # gloo's, when a process is gone
        if "RANK" not in os.environ or not lost:
            raise
        why = f"no word for --dist_timeout={cfg['dist_timeout']} s" if timeout else "lost contact"
        sys.stderr.write(f"error: rank {os.environ['RANK']}: the other processes stopped answering "
                         f"({why}: one stalled, died or failed); the last checkpoint, if any, is "
                         f"{os.path.join(cfg['out_dir'], 'ckpt.pt')}\n")
        return 1
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") == "0":
            print(interrupted(cfg, argv), file=sys.stderr)
        return 130
    finally:   # on an error path too: a process group left to the interpreter's exit can abort it
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


def interrupted(cfg, argv):
    """The line Ctrl-C prints: where the last checkpoint is and how to go on from it."""
    if cfg is None or cfg["task"] == "forgetting" or cfg["bench"]:
        return "stopped (Ctrl-C); nothing to resume: run the command again"
    drop = {i for i, a in enumerate(argv) if a.startswith("--init_from")}
    drop |= {i + 1 for i in drop if argv[i] == "--init_from"}          # --init_from VALUE
    flags = [a for i, a in enumerate(argv) if i not in drop] + ["--init_from=resume"]
    world, local = os.environ.get("WORLD_SIZE", "1"), os.environ.get("LOCAL_WORLD_SIZE", "1")
    launch = (["python"] if "RANK" not in os.environ else   # the same processes: an exact resume
              ["torchrun", "--standalone", f"--nproc_per_node={world}"] if world == local else
              ["torchrun", "<your launch flags>"])
    again = shlex.join([*launch, os.path.relpath(__file__), *flags])
    where = os.path.join(cfg["out_dir"], "*_seed*" if cfg["compare"] else "", "ckpt.pt")
    return f"stopped (Ctrl-C); the last checkpoint is {where} (if one was written); resume: {again}"


if __name__ == "__main__":
    sys.exit(main())
