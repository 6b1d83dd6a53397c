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
    python gapt.py --init_from=resume                # go on with out_dir's run
    python gapt.py --help                            # every flag, its default and meaning

Read top to bottom: config -> model -> MBE -> IBLM -> GAPT -> tasks -> the training loop, whose
step in train() is Algorithm 1. Beside it: sample.py (prompts to a checkpoint), experiments.py
(comparisons, the forgetting toy, a benchmark), runs.py (the run folder, checkpoints, resume),
report.py (the summary, figures, the last line). Importing this file has no side effects.
"""
import os
import signal
import sys

if __name__ == "__main__":   # a signal while torch loads: one line (main() then installs its own)
    for _sig, _code, _why in ((signal.SIGINT, 130, "Ctrl-C"), (signal.SIGTERM, 143, "SIGTERM")):
        signal.signal(_sig, lambda s, f, c=_code, w=_why: (sys.stderr.write(
            f"stopped ({w}) while starting; nothing to resume\n"), os._exit(c)))

import datetime   # noqa: E402 (after the handlers above)
import math
import re
import shlex
import time
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import report
import runs
from runs import ConfigError, TrainingError

# -----------------------------------------------------------------------------
# Config: flat defaults, each with its meaning. Override with --key=value (or --key value).

CONFIG = [
    "what to run",
    ("task", "arithmetic", "arithmetic (built in) | text (token shards made by data.py)"),
    ("phase_mode", "gapt", "gapt (switch) | memorize (CE only: baseline) | compress (CE + MBE)"),
    ("out_dir", "out", "log.jsonl, config.json, ckpt.pt, best.pt and curves.png go here"),
    ("init_from", "scratch", "scratch | resume (out_dir's run) | gpt2[-medium|-large|-xl]"),
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
    ("gapt_ema", 0.0, "a variant, not the paper's: the controller sees EMAs of CE and M with this "
                      "decay, as clean as a far larger batch (0 = each step's, Algorithm 1)"),
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
    ("tokenizer_file", "", "a GPT-2 .tiktoken file (default: the corpus's, from data.py)"),
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
]
DEFAULTS = {c[0]: c[1] for c in CONFIG if isinstance(c, tuple)}   # a string heads a group of flags
CHOICES = {"phase_mode": ("gapt", "memorize", "compress"),        # --task: the keys of TASKS
           "init_from": ("scratch", "resume", "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"),
           "dtype": ("auto", "float32", "bfloat16", "float16"),
           "compile": ("auto", "on", "off"), "read_lag": ("auto", "0", "1"),
           "model": ("tiny", "small", "gpt2"), "optimizer": ("adamw", "muon"),
           "arith_layout": ("padded", "packed"), "arith_loss": ("answer", "all")}
PRESETS = {"tiny": (4, 4, 128), "small": (6, 6, 384), "gpt2": (12, 12, 768)}
# flags of the scripts beside this one: gapt.py names the command to use instead
ELSEWHERE = {"experiments.py": ("--compare", "--seeds", "--fig", "--bench", "--task=forgetting",
                                "--forget_m"), "sample.py": ("--sample",)}


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
# Model: GPT-2 as in nanoGPT. Parameter names follow Hugging Face's GPT-2, so its weights load by
# name (--init_from=gpt2: fit_gpt2 below); the forward pass also returns the residual stream after
# every block, the representations whose entropy GAPT compresses.


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

    @torch.no_grad()
    def generate(self, idx, n_new, temperature=0.0, top_k=0, stop=None):
        """idx (B, T) and up to n_new tokens more: the argmax at temperature 0, else drawn from
        softmax(logits / temperature) over the top_k (0: all); done once each row holds stop."""
        self.eval()
        for _ in range(n_new):
            logits = self(idx[:, -self.config.block_size:])[0][:, -1].float()   # (B, vocab)
            if top_k:
                kth = logits.topk(min(top_k, logits.shape[-1])).values[:, -1:]  # (B, 1)
                logits[logits < kth] = float("-inf")
            logits = (logits - logits.max(-1, keepdim=True).values).double()   # any temperature > 0
            nxt = (logits.argmax(-1, keepdim=True) if temperature == 0 else
                   torch.multinomial(F.softmax(logits / temperature, -1), 1))
            idx = torch.cat([idx, nxt], dim=1)
            if stop is not None and (idx == stop).any(1).all():
                break
        return idx


CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def fit_gpt2(model, sd):
    """Load GPT-2's state dict (runs.read_gpt2) into model by name: Hugging Face's Conv1D weights
    transposed to Linear's, wte padded with zero rows to the model's vocabulary (their logits are
    masked, GPTConfig.vocab_real), wpe cut to its context. Returns the model."""
    c, wte = model.config, sd["wte.weight"]
    sd = {("transformer." + k): (v.t() if k.endswith(CONV1D) else v) for k, v in sd.items()}
    wte = F.pad(wte, (0, 0, 0, c.vocab_size - len(wte)))   # (vocab_size, n_embd), zero rows last
    sd["transformer.wte.weight"] = sd["lm_head.weight"] = wte
    sd["transformer.wpe.weight"] = sd["transformer.wpe.weight"][: c.block_size]
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
    SETTINGS = ("delta_ce", "delta_mbe", "tau", "p_m", "p_c", "ema", "why")   # not state

    def __init__(self, delta_ce=0.01, delta_mbe=0.002, tau=0.1, p_m=100, p_c=50, ema=0.0):
        self.delta_ce, self.delta_mbe, self.tau = delta_ce, delta_mbe, tau
        self.p_m, self.p_c, self.ema = p_m, p_c, ema
        self.phase, self.s_m, self.s_c = MEMORIZE, 0, 0
        self.E_min, self.M_min = math.inf, math.inf   # best CE and MBE seen (reset to compress)
        self.ce_avg = self.mbe_avg = None             # the variant's EMAs (ema > 0)
        self.why = None                               # what ended the last phase, and the numbers

    def step(self, ce, mbe):
        """Feed one optimizer step's training CE and compression target M;
        returns the phase for the next optimizer step."""
        if self.ema:   # the variant: moving averages, as quiet as a larger batch's CE
            a = self.ema
            self.ce_avg = ce if self.ce_avg is None else a * self.ce_avg + (1 - a) * ce
            self.mbe_avg = mbe if self.mbe_avg is None else a * self.mbe_avg + (1 - a) * mbe
            ce, mbe = self.ce_avg, self.mbe_avg
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

    def state_dict(self):   # every attribute but the settings: a new field resumes by itself
        return {k: v for k, v in vars(self).items() if k not in self.SETTINGS}

    def load_state_dict(self, sd):
        for k, v in sd.items():
            setattr(self, k, v)


def controller(cfg):
    """GAPT with cfg's thresholds."""
    return GAPT(cfg["delta_ce"], cfg["delta_mbe"], cfg["tau"], cfg["p_m"], cfg["p_c"],
                cfg["gapt_ema"])


def first_phase(cfg, ctrl):   # memorize (the CE-only baseline) and compress (static) never switch
    return {"memorize": MEMORIZE, "compress": COMPRESS}.get(cfg["phase_mode"], ctrl.phase)

# -----------------------------------------------------------------------------
# Tasks and evaluation. Everything that differs between tasks sits in its entry of TASKS: the
# data and fixed eval sets (data.py), the vocabulary and context, the metrics kept, the one that
# picks best.pt, the figures' panels, and how a prompt is written and an answer shown. A new task
# is a data class in data.py and an entry here; --task, experiments.py and sample.py follow.


@dataclass
class Task:
    make: Callable       # (cfg, rank, world) -> (training data with .batch(n), {name: [(x, y)]})
    vocab_size: int
    context: Callable    # cfg -> the default block_size
    metrics: tuple       # evaluate()'s metrics kept, per eval set
    best: str            # the eval metric (lower is better) whose best eval best.pt keeps
    curves: tuple        # ((eval metrics, axis label), ...): curves.png's panels after train CE
    panels: tuple        # ((metric, axis label), ...): a comparison's figure (experiments.py)
    prompt: Callable     # (cfg, text) -> (token ids, stop id or None, tokens to add): sampling
    show: Callable       # (cfg, text, new ids) -> the line a sample prints
    examples: Callable   # (cfg, eval sets) -> prompts sampled at the end of a run


def arithmetic_data(cfg, rank, world):
    """Multiplication problems drawn on the fly, and the fixed ID and OOD test sets."""
    d = data.Arithmetic(cfg["seed"], cfg["block_size"], (cfg["digits_min"], cfg["digits_max"]),
                        (cfg["ood_digits_min"], cfg["ood_digits_max"]), cfg["n_eval"],
                        cfg["reverse_answer"], rank, cfg["arith_layout"], cfg["arith_loss"])
    B = cfg["batch_size"]
    return d, {name: list(zip(x.split(B), y.split(B))) for name, (x, y) in d.eval_sets().items()}


def arithmetic_context(cfg):
    """Padded: the longest problem (ID or OOD), rounded up to whole MBE windows. Packed: 32, the
    longest test problem and some context (README)."""
    if cfg["arith_layout"] == "packed":
        return 32
    need = data.arith_len(max(cfg["digits_max"], cfg["ood_digits_max"])) - 1
    return -(-need // cfg["patch_size"]) * cfg["patch_size"]


def arithmetic_examples(cfg, evals):
    """The last problem in the first row of each test set (ID, OOD): held out from training."""
    rows = (data.arith_decode(evals[name][0][0][0].tolist()) for name in ("id", "ood"))
    return [" x ".join(re.findall(r"(\d+) x (\d+) = ", row)[-1]) for row in rows]


def text_data(cfg, rank, world):
    """Random windows of the token shards, and a fixed budget of validation tokens."""
    d = data.TokenShards(cfg["data_dir"], cfg["block_size"], cfg["seed"], rank, world,
                         vocab_size=50257)   # GPT-2's; the model's rows up to 50304 are padding
    try:
        cfg["tokenizer_file"] and data.get_tokenizer(cfg["tokenizer_file"])   # given: checked now
        return d, {"val": d.val_batches(cfg["val_tokens"], cfg["batch_size"])}
    except data.DataError as e:
        raise ConfigError(f"--tokenizer_file: {e}") from None
    except ValueError as e:
        raise ConfigError(f"--val_tokens={cfg['val_tokens']}: {e}") from None


def tokenizer(cfg):   # --tokenizer_file, $GAPT_TOKENIZER_FILE, the corpus's copy, tiktoken's own
    return data.get_tokenizer(cfg["tokenizer_file"] or None, cfg["data_dir"])


TASKS = {
    "arithmetic": Task(
        arithmetic_data, data.ARITH_VOCAB, arithmetic_context,
        metrics=("ce", "acc", "conf", "mbe", "mbe_layers"), best="id_ce",
        curves=((("id_ce", "ood_ce"), "test answer CE (nats)"),
                (("id_acc", "ood_acc"), "test exact match")),
        panels=(("id_acc", "ID exact match"), ("id_mbe", "ID MBE, regularised layers (nats)"),
                ("ood_ce", "OOD answer CE (nats)"), ("ood_conf", "OOD confidence (top p)")),
        prompt=lambda cfg, text: data.arith_prompt(text), examples=arithmetic_examples,
        show=lambda cfg, text, new: data.arith_show(text, new, cfg["reverse_answer"])),
    "text": Task(
        text_data, 50304,   # GPT-2's 50,257 tokens padded to a multiple of 64: faster
        lambda cfg: 1024 if cfg["model"] == "gpt2" else 256,
        metrics=("ce", "mbe", "mbe_layers"), best="val_ce",
        curves=((("val_ce",), "val CE (nats/token)"),),
        panels=(("val_ce", "val CE (nats/token)"), ("-val_ce", "val CE minus the first arm's"),
                ("val_mbe_layers", "val MBE per layer (nats)")),
        prompt=lambda cfg, text: (tokenizer(cfg).encode_ordinary(text) or [data.EOT], None, 64),
        show=lambda cfg, text, new: repr(text + tokenizer(cfg).decode(
            [i for i in new if i <= data.EOT])), examples=lambda cfg, evals: [
            tokenizer(cfg).decode(row[: cfg["block_size"] // 2].tolist())
            for row in evals["val"][0][0][:3]])}


def make_data(cfg, rank, world):   # data.py's errors (no shards, a context too short): bad input
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
    out = {f"{name}_{k}": v for name, batches in evals.items() for k, v in
           evaluate(model, batches, cfg, device, ctx).items() if k in TASKS[cfg["task"]].metrics}
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


def complete(model, cfg, text, n=1, temperature=0.0, top_k=0, n_new=0):
    """n continuations of the prompt text by model (trained on cfg's task): the lines to print."""
    task, device = TASKS[cfg["task"]], next(model.parameters()).device
    ids, stop, room = task.prompt(cfg, text)
    rows = model.generate(torch.tensor([ids] * n, device=device), n_new or room, temperature,
                          top_k, stop)
    return [task.show(cfg, text, row) for row in rows[:, len(ids):].tolist()]

# -----------------------------------------------------------------------------
# Training loop: the device, the model and optimizer, the schedule, then train(), whose step
# reads as Algorithm 1: the batch, the loss the phase asks for, backward, the update, the log,
# the controller's next phase, then eval and checkpoint.


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
            "read_lag": "1" if cuda else "0"}     # see ReadLag: only a GPU's queue gains
    cfg.update({k: v for k, v in auto.items() if cfg.get(k, "auto") == "auto"})
    if cfg["dtype"] == "float16" and not cuda:
        raise ConfigError("--dtype=float16 needs a CUDA device (use bfloat16 or float32)")
    dtype = getattr(torch, cfg["dtype"])
    ctx = nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    return device, ctx, scaler, (ddp, rank, world)


def build(cfg, device, gpt2=None):
    """The GPT, from --seed or GPT-2's weights, and its optimizers: [AdamW] with weight decay on
    2-D weights only, or [Muon, AdamW]: Muon (orthogonalised momentum, as in the paper's
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


class ReadLag:
    """A detour from Algorithm 1 for speed: reading CE and M at once makes a GPU wait for the host
    every step. At lag 1 (cuda) the host reads a step's numbers from a non-blocking copy after
    launching the next, so step t+2's phase comes from step t's, catching up at an eval; at lag 0
    step t+1's comes from step t's, as in Algorithm 1. ready() hands back the readable steps with
    named fields (ce, mbe, norm, ok; bad: non-finite in a row), all ranks' phases checked equal."""

    def __init__(self, lag):
        self.lag, self.pending, self.bad = lag, deque(), 0

    def ready(self, step, catch_up=False):
        if step.numbers.device.type == "cuda":   # start the copy; an event marks its end
            step.numbers = step.numbers.to("cpu", non_blocking=True)
            step.copied = torch.cuda.Event()
            step.copied.record()
        self.pending.append(step)
        while len(self.pending) > (0 if catch_up else self.lag):
            s = self.pending.popleft()
            if hasattr(s, "copied"):                    # wait for its copy, if not there yet
                s.copied.synchronize()
            s.ce, s.mbe, phase_mean, s.norm, ok = s.numbers.tolist()
            s.ok, self.bad = bool(ok), 0 if ok else self.bad + 1
            s.bad = self.bad
            if abs(phase_mean - s.phase) > 1e-6:      # all ranks read the same all-reduced values
                raise TrainingError(f"step {s.step}: processes disagree about the phase "
                                    f"(mean {phase_mean}, this one {s.phase})")
            yield s


def train(cfg):
    r = start(cfg)   # the device, data, model, optimizers, controller and log: below
    cfg, model, raw, ctrl, log, device = r.cfg, r.model, r.raw, r.ctrl, r.log, r.device
    step, phase, lag, t_start = r.step, r.phase, ReadLag(int(cfg["read_lag"])), time.time()
    while step < cfg["max_iters"]:
        t0, lr = time.time(), get_lr(step, cfg)
        for o in r.optimizers:
            for group in o.param_groups:   # Muon: its own peak (make_optimizer)
                group["lr"] = lr * getattr(o, "lr_scale", 1.0)
        numbers = torch.zeros(3, device=device)      # CE, M (means over micro-batches), the phase
        for micro in range(r.accum):
            x, y = (t.pin_memory().to(device, non_blocking=True) if device.type == "cuda"
                    else t.to(device) for t in r.loader.batch(cfg["batch_size"]))   # the batch
            if r.ddp:   # sync gradients on the last micro-step only; set before the forward pass
                model.require_backward_grad_sync = micro == r.accum - 1
            with r.ctx:
                ce, M = model(x, y, phase == COMPRESS)   # CE, and the MBE of the chosen layers
            loss = iblm_loss(ce, M, phase, cfg["mbe_weight"])   # the phase's: CE (+ weight * M)
            r.scaler.scale(loss / r.accum).backward()    # a mean over micro-batches, not a sum
            numbers[:2] += torch.stack([ce.detach().float(), M.detach()]) / r.accum
        numbers[2] = phase                       # its mean over ranks is exact where they agree
        numbers = update(raw, r.optimizers, r.scaler, cfg, all_mean(numbers, r.ddp, r.world))
        step += 1                                # a skipped update counts, as under fp16's scaler
        at_eval = step == cfg["max_iters"] or bool(cfg["eval_interval"]) and \
            step % cfg["eval_interval"] == 0
        ran = SimpleNamespace(step=step, phase=phase, lr=lr, ms=1000 * (time.time() - t0),
                              numbers=numbers)
        for s in lag.ready(ran, catch_up=at_eval):   # this step (lag 0), or the one before
            log_step(log, cfg, s, r.total, (t_start, r.step))   # stops after max_bad_steps
            if s.ok and cfg["phase_mode"] == "gapt" and s.phase == ctrl.phase:
                phase = ctrl.step(s.ce, s.mbe)   # Algorithm 1: the next step's phase
                log_switch(log, s, phase, ctrl.why)
        if r.master and cfg["align_interval"] and step % cfg["align_interval"] == 0:
            x, y = (t.to(device) for t in next(iter(r.evals.values()))[0])
            cos, per_layer = grad_alignment(raw, x, y, cfg)
            log.record(kind="align", step=step, cos=cos, cos_layers=per_layer)
        if at_eval:
            eval_and_save(r, step)
    if r.ddp:   # every rank leaves the process group together, before rank 0 writes the summary
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if r.master:
        finish(r, time.time() - t_start)


def start(cfg):
    """Everything a run needs, each input checked before the first file is written: the device,
    the run to resume or GPT-2's weights, data, model, optimizers, controller, then the log."""
    given = {k: cfg[k] for k in cfg.get("given", ()) if k in DEFAULTS}   # for the log
    device, ctx, scaler, (ddp, rank, world) = setup_device(cfg)
    master = rank == 0
    cfg, ck = runs.load_checkpoint(cfg, check_saved, DEFAULTS, FIXED, master) \
        if cfg["init_from"] == "resume" else (cfg, None)   # the run as it was started
    gpt2 = runs.read_gpt2(cfg) if cfg["init_from"].startswith("gpt2") else None   # sets its shape
    cfg = resolve(cfg)
    micro_tokens = cfg["batch_size"] * cfg["block_size"] * world
    total = cfg["total_batch_size"] or micro_tokens      # tokens per optimizer step, all processes
    if total % micro_tokens:
        raise ConfigError(f"--total_batch_size={total} is not a multiple of batch_size * block_size"
                          f" * processes = {micro_tokens}")
    loader, evals = make_data(cfg, rank, world)
    raw, optimizers = build(cfg, device, gpt2)   # raw: uncompiled, unwrapped: what checkpoints hold
    ctrl = controller(cfg)
    phase, step, best = first_phase(cfg, ctrl), 0, {}
    if ck:
        raw.load_state_dict(ck["model"])
        for o, sd in zip(optimizers, ck["optimizer"], strict=True):
            o.load_state_dict(sd)
        ctrl.load_state_dict(ck["gapt"])
        if ck["scaler"]:                  # empty when the run had no fp16 grad scaler
            scaler.load_state_dict(ck["scaler"])
        step, best = ck["step"], ck.get("best", {})
        phase = ctrl.phase if cfg["phase_mode"] == "gapt" else phase
        runs.restore_rank(ck, loader, rank, world)
    model = IBLM(raw, cfg["layers"], cfg["patch_size"])   # CE and M from one forward pass
    if cfg["compile"] == "on":
        model = torch.compile(model)                      # one graph of the GPT and its MBE
    if ddp:
        ids = [device.index] if device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    log = on_every_rank(lambda: runs.open_run(cfg, master, step if ck else None), ddp)
    log.print(report.opening(cfg, given, device, world, raw.num_params(), optimizers, total))
    if step == 0 and cfg["eval_interval"] and master:
        log.record(kind="eval", step=0, **run_eval(raw, evals, cfg, device, ctx))
    return SimpleNamespace(
        cfg=cfg, device=device, ctx=ctx, scaler=scaler, ddp=ddp, rank=rank, world=world,
        master=master, loader=loader, evals=evals, raw=raw, model=model, log=log,
        optimizers=optimizers, ctrl=ctrl, phase=phase, step=step, best=best, total=total,
        accum=total // micro_tokens)


def log_step(log, cfg, s, total, since):
    """A step's record in log.jsonl (train, or skip: its update was not applied, the s.bad-th in a
    row; max_bad_steps stop the run) and its console line every log_interval steps."""
    if s.bad:
        log.record(kind="skip", step=s.step, ce=s.ce, mbe=s.mbe, grad_norm=s.norm)
        log.print(f"step {s.step}: non-finite ce={s.ce} mbe={s.mbe} grad_norm={s.norm}: update "
                  f"skipped ({s.bad}/{cfg['max_bad_steps']})")
        if s.bad >= cfg["max_bad_steps"]:
            raise TrainingError(f"stopped after {s.bad} consecutive non-finite steps (try a "
                                f"lower --learning_rate); the last good checkpoint, if any, is "
                                f"{runs.quoted(os.path.join(cfg['out_dir'], 'ckpt.pt'))}")
        return
    log.record(kind="train", step=s.step, phase=s.phase, ce=s.ce, mbe=s.mbe, lr=s.lr, ms=s.ms,
               tok_s=1000 * total / s.ms)
    if s.step % cfg["log_interval"] == 0 or s.step in (1, cfg["max_iters"]):
        log.print(report.step_line(cfg, s, PHASES[s.phase], total, since))


def log_switch(log, s, phase, why):
    """A phase switch after step s: what ended the phase, and the numbers behind it."""
    if phase != s.phase:
        log.record(kind="switch", step=s.step, phase=phase, **why)
        log.print(report.line(f"step {s.step:>5} | {PHASES[s.phase]} -> {PHASES[phase]}", why))


def eval_and_save(r, step):
    """Rank 0 evaluates on the fixed eval sets; every rank joins the checkpoint: ckpt.pt (the
    latest, resumes exactly) and best.pt (the best eval's weights). Never non-finite weights."""
    new_best = False
    if r.master:
        metrics = run_eval(r.raw, r.evals, r.cfg, r.device, r.ctx)
        r.log.record(kind="eval", step=step, **metrics)
        r.log.print(report.line(f"eval {step:>5}", metrics))
        key = TASKS[r.cfg["task"]].best
        if new_best := metrics[key] < r.best.get(key, math.inf):
            r.best = {"step": step, key: metrics[key]}
    state = {"model": r.raw.state_dict(), "optimizer": [o.state_dict() for o in r.optimizers],
             "step": step, "gapt": r.ctrl.state_dict(), "scaler": r.scaler.state_dict(),
             "best": r.best, "config": r.cfg}
    on_every_rank(lambda: save(r, state, new_best), r.ddp)


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
# Checkpoints and resume: every rank's data and RNG state, so a resumed run goes on as if it had
# never stopped (runs.py writes and checks the files). On resume these cannot change:
FIXED = ("task", "model", "n_layer", "n_head", "n_embd", "block_size", "bias", "patch_size",
         "mbe_layers", "seed", "reverse_answer", "digits_min", "digits_max", "ood_digits_min",
         "ood_digits_max", "n_eval", "arith_layout", "arith_loss", "val_tokens", "optimizer")


def save(r, state, new_best):   # every rank's data and RNG state; ckpt.pt and best.pt on rank 0
    mine = {"data": r.loader.state_dict(), "rng": runs.rng_state()}
    ranks = [None] * r.world if r.ddp else [mine]
    if r.ddp:
        torch.distributed.all_gather_object(ranks, mine)
    if r.master and not all(torch.isfinite(p).all() for p in state["model"].values()):
        print(f"step {state['step']}: non-finite weights, checkpoint not written")
    elif r.master:
        if new_best:   # first (a stop between them: the resume writes it again); weights only
            runs.save_checkpoint(os.path.join(r.cfg["out_dir"], "best.pt"), {
                k: state[k] for k in ("model", "step", "best", "config")})
        runs.save_checkpoint(os.path.join(r.cfg["out_dir"], "ckpt.pt"), {**state, "ranks": ranks})


def finish(r, seconds):
    """The end of a run: the summary, curves.png, and greedy samples of the task's examples."""
    cfg, out = r.cfg, r.cfg["out_dir"]
    trains, evals = runs.read_log(out, "train", "phase", "ce", "mbe"), runs.read_log(out, "eval")
    report.summary(cfg, seconds, r.step, trains, evals, runs.read_log(out, "switch"), r.best)
    report.plot_run(os.path.join(out, "curves.png"), cfg, trains, evals, TASKS[cfg["task"]].curves)
    try:
        for text in TASKS[cfg["task"]].examples(cfg, r.evals):
            print("sample:", complete(r.raw, cfg, text)[0])
    except (data.Unavailable, data.DataError) as e:   # offline, no tokenizer: the run still counts
        print(f"samples skipped: {e}")

# -----------------------------------------------------------------------------
# The command line: flags read and checked against CONFIG, and main(), where every way a run can
# end is decided (report.ending): bad input is one line and exit 2, a run that fails one line and
# 1, Ctrl-C or SIGTERM the line that resumes it.


def parse_args(argv, table=CONFIG, choices=None, doc=__doc__, check=None):
    """Flags -> the config dict, checked (by check, default validate); cfg["given"] lists the flags
    given (resume keeps the rest from the run). experiments.py and sample.py pass their table."""
    for script, flags in ELSEWHERE.items():
        if table is CONFIG and (moved := [a for a in argv if a.startswith(flags)]):
            again = [a.replace("--sample", "--start", 1) for a in argv]
            raise ConfigError(f"{moved[0]} runs in {script}: python {script} {shlex.join(again)}")
    cfg = report.parse_flags(argv, table, choices or {**CHOICES, "task": tuple(TASKS)}, doc,
                             ConfigError)
    return (check or validate)(cfg)


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
    for key in ("beta1", "beta2", "dropout", "gapt_ema"):
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
            (max(cfg[k] for k in ("n_layer", "n_head", "n_embd", "block_size")) > 2**20,   # torch's
             "--n_layer, --n_head, --n_embd and --block_size: at most 2**20"),   # sizes overflow
            (cfg["weights"] and not cfg["init_from"].startswith("gpt2"),
             f"--weights is read by --init_from=gpt2*, not --init_from={cfg['init_from']}"),
            (not 1 <= digits[0] <= digits[1] < digits[2] <= digits[3] <= 9,   # OOD: larger
             "digit ranges need 1 <= --digits_min <= --digits_max < --ood_digits_min <= "
             "--ood_digits_max <= 9")):
        if bad:
            raise ConfigError(message)
    return cfg


def check_saved(saved, where, choices=None):   # a config read back from disk, as the flags are
    return runs.check_saved(saved, where, DEFAULTS, choices or {**CHOICES, "task": tuple(TASKS)},
                            validate)


def main(argv=None, parse=parse_args, run=None, script=__file__):
    """`python gapt.py`: one run. experiments.py and sample.py call it with their parse and run."""
    argv = sys.argv[1:] if argv is None else argv
    cfg = None
    handlers = (signal.signal(signal.SIGINT, signal.default_int_handler),
                signal.signal(signal.SIGTERM, report.sigterm))
    try:
        cfg = parse(argv)
        (run or train)(cfg)
        return 0
    except BaseException as e:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)   # the last line is not cut short
        code, line = report.ending(e, cfg, argv, script, ConfigError,
                                   (TrainingError, data.DataError, data.Unavailable))
        if line:
            sys.stderr.write(line + "\n")                # one write: ranks' lines do not mix
        return code
    finally:   # on an error path too: a process group left to the interpreter's exit can abort it
        signal.signal(signal.SIGINT, handlers[0])
        signal.signal(signal.SIGTERM, handlers[1])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
