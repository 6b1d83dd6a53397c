"""
Data for gapt.py: the built-in synthetic tasks (no download) and GPT-2 token shards.

    python data.py fineweb --shards 10           # FineWeb sample-10BT -> data/fineweb10B/*.bin
    python data.py fineweb --cached 10           # modded-nanogpt's pre-tokenised shards instead
    python data.py text notes.txt more.jsonl     # your own text -> the same shard format

Sections: arithmetic multiplication (gapt.py's default task), the catastrophic-forgetting toy,
token shards (format, FineWeb, your own text) and the command line. Importing it does nothing.
"""
import argparse
import base64
import importlib
import itertools
import json
import logging
import multiprocessing as mp
import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import tiktoken
import torch


class DataError(ValueError):
    """Bad input: a missing, unreadable or damaged file, an empty corpus, a shard changed."""

# -----------------------------------------------------------------------------
# Arithmetic multiplication: "<bos>a x b = c<eos>", one character per token. The paper
# trains on 1-3 digit operands and tests out-of-distribution (OOD) on 4-6 digits. The answer
# may be written least-significant digit first ("reversed"), the order in which carries are
# computed: each answer digit then depends only on the operands and the digits before it,
# which a tiny model learns in minutes (Lee et al. 2023, "Teaching arithmetic to small
# transformers"). The operands are always written normally.

ARITH_CHARS = "0123456789x= "
PAD, BOS, EOS = 0, 1, 2                               # special token ids
ARITH_STOI = {c: i + 3 for i, c in enumerate(ARITH_CHARS)}
ARITH_ITOS = {i: c for c, i in ARITH_STOI.items()} | {PAD: "", BOS: "", EOS: ""}
ARITH_VOCAB = 3 + len(ARITH_CHARS)                    # 16
EVAL_SEED = 20250513   # fixed: every run, whatever its --seed, is tested on the same problems


def arith_len(max_digits):
    """Tokens in the longest problem: bos, a, ' x ', b, ' = ', a*b (<= 2d digits), eos."""
    return 1 + max_digits + 3 + max_digits + 3 + 2 * max_digits + 1


def arith_sample(rng, n, lo, hi):
    """n operand pairs, each operand with a digit count uniform in [lo, hi] and then uniform
    among the numbers with that many digits (1 digit includes 0)."""
    d = rng.integers(lo, hi + 1, size=(2, n))
    low = np.where(d == 1, 0, 10 ** (d - 1))
    return rng.integers(low, 10 ** d, dtype=np.int64)   # (2, n)


def arith_ids(a, b, reverse):
    """Token ids of one problem and the index of its first answer token."""
    prompt, c = f"{a} x {b} = ", str(int(a) * int(b))
    ids = [BOS] + [ARITH_STOI[ch] for ch in prompt + (c[::-1] if reverse else c)] + [EOS]
    return ids, 1 + len(prompt)


def arith_encode(a, b, block_size, reverse, loss="answer"):
    """Token ids of a batch of problems, one per row at position 0, padded -> x, y: (n, block_size)
    int64, y[i, t] the target for x[i, t] or -1 where no loss is taken: off the answer digits and
    the closing <eos> (loss="answer", minGPT-adder style) or after the <eos> (loss="all")."""
    n = a.shape[0]
    seq = np.full((n, block_size + 1), PAD, dtype=np.int64)
    tgt = np.full((n, block_size + 1), -1, dtype=np.int64)
    for i in range(n):
        ids, start = arith_ids(a[i], b[i], reverse)
        if len(ids) > block_size + 1:
            raise ValueError(f"problem '{arith_decode(ids)}' needs block_size >= {len(ids) - 1}, "
                             f"got {block_size}")
        seq[i, :len(ids)] = ids
        start = 1 if loss == "all" else start
        tgt[i, start:len(ids)] = ids[start:]
    return torch.from_numpy(seq[:, :-1].copy()), torch.from_numpy(tgt[:, 1:].copy())


def arith_stream(ab, reverse):
    """The author's packed layout: problems ab (2, n) concatenated into one stream.
    Returns tokens (N,) int64 and answer (N,) bool, True on every answer digit and <eos>."""
    tokens, answer = [], []
    for a, b in ab.T:
        ids, start = arith_ids(a, b, reverse)
        tokens += ids
        answer += [False] * start + [True] * (len(ids) - start)
    return np.array(tokens, dtype=np.int64), np.array(answer)


def arith_key(a, b):
    """A unique int per ordered pair (operands < 10**9), to hold out problems."""
    return a * 10**9 + b


class Resumable:
    """Data drawn from the generator self.rng, whose state is part of a checkpoint: a resumed
    run sees the same data as the uninterrupted one."""

    def state_dict(self):
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, sd):
        self.rng.bit_generator.state = sd["rng"]


class Arithmetic(Resumable):
    """Training batches from a seeded generator plus fixed held-out ID and OOD sets. The held-out
    ID problems are excluded from training, so ID accuracy measures generalization to unseen
    problems of the trained sizes, OOD to larger sizes. layout="padded": one problem per row at
    position 0. layout="packed" (the author's): rows are windows of a stream of problems, as on
    text, drawn lazily, a fresh stretch per row; the loss is on every token or the answers only."""

    def __init__(self, seed, block_size, train_digits=(1, 2), ood_digits=(3, 3),
                 n_eval=512, reverse=True, rank=0, layout="padded", loss="answer"):
        self.block_size, self.reverse, self.train_digits = block_size, reverse, train_digits
        self.layout, self.loss = layout, loss
        digits = max(train_digits[1], ood_digits[1])
        if block_size < (need := arith_len(digits) - 1):
            raise ValueError(f"arithmetic with {digits}-digit operands needs "
                             f"--block_size >= {need}, got {block_size}")
        ev = np.random.default_rng(EVAL_SEED)          # the same test problems for every run seed
        self.id_ab = arith_sample(ev, n_eval, *train_digits)
        self.ood_ab = arith_sample(ev, n_eval, *ood_digits)
        # packed: the test streams start with unscored problems (>= 10 tokens each), so that
        # every scored problem has a full window of context before it
        n_ctx = -(-block_size // 10) if layout == "packed" else 0
        self.ctx_ab = {"id": arith_sample(ev, n_ctx, *train_digits),
                       "ood": arith_sample(ev, n_ctx, *ood_digits)}
        self.held_out = np.unique(arith_key(*np.hstack([self.id_ab, self.ctx_ab["id"]])))
        lo, hi = train_digits
        n_pairs = (10**hi - (0 if lo == 1 else 10 ** (lo - 1))) ** 2   # distinct training problems
        if 2 * len(self.held_out) > n_pairs:   # else batch() would resample (nearly) forever
            raise ValueError(f"--n_eval={n_eval} holds out {len(self.held_out)} of the {n_pairs} "
                             f"problems with {lo}-{hi} digit operands: use a smaller --n_eval or "
                             "larger operands")
        self.rng = np.random.default_rng([seed, rank])   # each DDP rank draws its own problems

    def problems(self, n):
        """(2, n) fresh training operands, none of them held out."""
        ab = arith_sample(self.rng, n, *self.train_digits)
        while (bad := np.isin(arith_key(*ab), self.held_out)).any():   # resample held-out pairs
            ab[:, bad] = arith_sample(self.rng, int(bad.sum()), *self.train_digits)
        return ab

    def batch(self, n):
        """(x, y) of n rows: n fresh problems, or n windows of the training stream."""
        if self.layout == "padded":
            return arith_encode(*self.problems(n), self.block_size, self.reverse, self.loss)
        T, m = self.block_size, -(-(2 * self.block_size + 1) // 10)   # m problems >= 2T+1 tokens
        tok, ans = arith_stream(self.problems(n * m), self.reverse)      # row i: problems i*m..
        first = np.flatnonzero(tok == BOS)[::m]                          # (n,) each row's start
        ix = first[:, None] + self.rng.integers(0, T + 1, (n, 1)) + np.arange(T + 1)   # (n, T+1)
        y = np.where(ans[ix] | (self.loss == "all"), tok[ix], -1)
        return torch.from_numpy(tok[ix[:, :-1]]), torch.from_numpy(y[:, 1:])

    def eval_sets(self):
        """{"id": (x, y), "ood": (x, y)}: the fixed test problems. Packed: row i is the window
        of the test stream that ends with problem i's <eos>, its targets that problem's answer
        (-1 elsewhere); the context before it is earlier problems of the same test set."""
        if self.layout == "padded":
            return {"id": arith_encode(*self.id_ab, self.block_size, self.reverse),
                    "ood": arith_encode(*self.ood_ab, self.block_size, self.reverse)}
        out = {}
        for name, ab in (("id", self.id_ab), ("ood", self.ood_ab)):
            tok, ans = arith_stream(np.hstack([self.ctx_ab[name], ab]), self.reverse)
            eos = np.flatnonzero(tok == EOS)[len(self.ctx_ab[name][0]) - 1:]   # (n_eval + 1,)
            ix = eos[1:, None] - self.block_size + np.arange(self.block_size + 1)   # (n, T+1)
            own = ans[ix] & (ix > eos[:-1, None])       # answer tokens after the previous <eos>
            out[name] = (torch.from_numpy(tok[ix[:, :-1]]),
                         torch.from_numpy(np.where(own, tok[ix], -1)[:, 1:]))
        return out


def arith_decode(ids):
    return "".join({BOS: "<bos>", EOS: "<eos>"}.get(int(i), ARITH_ITOS[int(i)]) for i in ids)

# -----------------------------------------------------------------------------
# Catastrophic-forgetting toy, the paper's interference experiment ("GAPT reduces interference
# by compressing and separating representations"), rebuilt from its description (no script).
# One teacher MLP is moved both ways along a random low-rank direction Delta of parameter
# space: task A is the teacher at theta0 + m Delta on inputs from P1, task B at theta0 - m
# Delta on inputs from P2. The tasks conflict along Delta, so a student that learns A and then
# B overwrites A unless it keeps the two input regions apart inside.


def forgetting_data(seed, n_in=10, n_hidden=50, m=0.8, rank=1, n_train=512, n_test=512):
    """The two regression tasks of experiments.py --task=forgetting, from one seed. Teacher f:
    n_in -> n_hidden -> 1 with ReLU; theta0 has weights and biases ~ N(0, 1/fan_in). Delta: for
    each weight matrix W a random rank-`rank` matrix U V^T (Gaussian factors) rescaled to ||W||_F;
    the biases are not moved. P1: the first n_in // 2 features ~ N(1, 0.25^2), the others
    ~ N(0, 0.25^2); P2 is P1 mirrored (the halves swap). Returns float32 tensors xa, ya, xb, yb
    (n_train rows) and the held-out xa_test, ya_test, xb_test, yb_test (n_test rows): x (n, n_in),
    y (n, 1), ya = f(theta0 + m Delta)(xa), yb = f(theta0 - m Delta)(xb)."""
    rng = np.random.default_rng(seed)
    shapes = [(n_hidden, n_in), (1, n_hidden)]                      # (out, in) per layer
    W = [rng.normal(0, 1 / np.sqrt(s[1]), s) for s in shapes]
    b = [rng.normal(0, 1 / np.sqrt(s[1]), s[0]) for s in shapes]
    D = [rng.normal(size=(s[0], rank)) @ rng.normal(size=(rank, s[1])) for s in shapes]
    D = [d * np.linalg.norm(w) / np.linalg.norm(d) for w, d in zip(W, D)]
    mean_p1 = (np.arange(n_in) < n_in // 2).astype(np.float64)      # (n_in,): 1 on the first half

    def teacher(x, sign):
        W1, W2 = (w + sign * m * d for w, d in zip(W, D))
        return np.maximum(x @ W1.T + b[0], 0) @ W2.T + b[1]             # (n, 1)

    out = {}
    for suffix, n in (("", n_train), ("_test", n_test)):
        for t, mean, sign in (("a", mean_p1, 1.0), ("b", mean_p1[::-1], -1.0)):
            x = mean + 0.25 * rng.normal(size=(n, n_in))
            out[f"x{t}{suffix}"] = torch.tensor(x, dtype=torch.float32)
            out[f"y{t}{suffix}"] = torch.tensor(teacher(x, sign), dtype=torch.float32)
    return out


# -----------------------------------------------------------------------------
# Token shards: GPT-2 tokens in the .bin format of llm.c and modded-nanogpt, a header of 256
# int32 (magic, version, token count, zeros) then uint16 tokens (GPT-2's 50257 ids fit in 16
# bits). A data directory holds *_val_*.bin (shard 0) and *_train_*.bin shards, from FineWeb
# (streamed and tokenised here, as in build-nanogpt's fineweb.py), modded-nanogpt's
# pre-tokenised FineWeb, or your own text: see the command line at the end of this file.

SHARD_MAGIC, SHARD_VERSION, HEADER_INTS = 20240520, 1, 256
EOT = 50256                                   # GPT-2's <|endoftext|>, put before every document


def write_shard(path, tokens):
    """Write tokens as one shard, atomically: an interrupted write leaves no partial shard."""
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**16):
        raise ValueError(f"{path}: token ids must be in [0, 2**16)")
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[:3] = SHARD_MAGIC, SHARD_VERSION, len(tokens)
    tmp = f"{path}.tmp"                       # same directory, so os.replace is an atomic rename
    try:
        with open(tmp, "wb") as f:
            f.write(header.tobytes() + tokens.astype(np.uint16).tobytes())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_shard(path):
    """A shard's tokens as a read-only uint16 memmap: nothing is read until sliced. Open one
    per use and let it go; a memmap kept open makes the process's memory grow as pages are read."""
    header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
    if len(header) < HEADER_INTS or header[0] != SHARD_MAGIC:
        raise DataError(f"{path}: not a token shard (bad magic number)")
    if header[1] != SHARD_VERSION:
        raise DataError(f"{path}: shard version {header[1]}, expected {SHARD_VERSION}")
    n, size = int(header[2]), os.path.getsize(path)
    if size != 4 * HEADER_INTS + 2 * n:
        raise DataError(f"{path}: the header says {n} tokens but the file has {size} bytes; "
                         "truncated?")
    return np.memmap(path, dtype=np.uint16, mode="r", offset=4 * HEADER_INTS, shape=(n,))


def check_ids(path, vocab_size, chunk=2**24):
    """ValueError if a token id in the shard is >= vocab_size (another tokenizer's shard). Reads the
    whole shard in 32 MB chunks: 0.04 s per 100M tokens from the page cache (measured)."""
    for i in range(0, len(read_shard(path)), chunk):
        top = int(read_shard(path)[i:i + chunk].max())   # a fresh memmap per chunk: flat memory
        if top >= vocab_size:
            raise ValueError(f"{path}: token id {top} is outside the vocabulary [0, {vocab_size}): "
                             f"shards from another tokenizer?")


def find_shards(data_dir, split):
    """Sorted paths of the "train" or "val" shards in data_dir."""
    paths = sorted(str(p) for p in Path(data_dir).glob(f"*_{split}_*.bin") if p.is_file())
    if not paths:
        raise FileNotFoundError(f"no {split} shards in {data_dir}: run 'python data.py fineweb "
                                f"--shards 10 --out {data_dir}' (or 'python data.py text FILE... "
                                f"--out {data_dir}')")
    return paths


class TokenShards(Resumable):
    """Random training windows and a fixed validation set from a directory of shards. Each
    batch memory-maps only the shards it reads, so no shard is ever loaded whole."""

    def __init__(self, data_dir, block_size, seed, rank=0, world_size=1, vocab_size=None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.block_size = block_size
        self.train, self.val = find_shards(data_dir, "train"), find_shards(data_dir, "val")
        self.lengths = np.array([len(read_shard(p)) for p in self.train])
        if vocab_size is not None:
            for path in self.train + self.val:
                check_ids(path, vocab_size)
        for path, n in zip(self.train, self.lengths):
            if n < block_size + 1:
                raise ValueError(f"{path} has {n} tokens, fewer than block_size + 1 = "
                                 f"{block_size + 1}")
        self.rng = np.random.default_rng([seed, rank])   # each DDP rank draws its own windows

    def batch(self, n):
        """x, y: (n, block_size) int64, y[:, t] the token after x[:, t]. Each window picks a
        shard with probability proportional to its length, then a uniform start in it."""
        T = self.block_size
        shard = self.rng.choice(len(self.train), size=n, p=self.lengths / self.lengths.sum())
        start = self.rng.integers(0, self.lengths[shard] - T)   # T + 1 tokens from start fit
        buf = np.empty((n, T + 1), dtype=np.int64)
        for s in np.unique(shard):
            rows = shard == s
            tokens = read_shard(self.train[s])                   # opened for this batch only
            if len(tokens) != self.lengths[s]:                   # rewritten by data.py, say
                raise DataError(f"{self.train[s]} changed while the run read it: "
                                f"{len(tokens)} tokens, {self.lengths[s]} at the start")
            buf[rows] = tokens[start[rows, None] + np.arange(T + 1)]
        return torch.from_numpy(buf[:, :-1].copy()), torch.from_numpy(buf[:, 1:].copy())

    def val_batches(self, n_tokens, batch_size):
        """The first n_tokens of the val shard(s) as consecutive windows, in (x, y) batches:
        a fixed budget, the same every call, so val losses compare across steps and runs."""
        T = self.block_size
        n = n_tokens // T * T + 1                     # whole windows, +1 for the last target
        tokens = np.concatenate([read_shard(p)[:n] for p in self.val])[:n]
        if n_tokens < T:
            raise ValueError(f"fewer than one window of block_size {T} tokens")
        if len(tokens) < n:
            raise ValueError(f"the val shards have {len(tokens)} tokens: at most "
                             f"--val_tokens={(len(tokens) - 1) // T * T} in windows of {T}")
        tokens = torch.from_numpy(tokens.astype(np.int64))
        x, y = tokens[:-1].view(-1, T), tokens[1:].view(-1, T)
        return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(x), batch_size)]


# -----------------------------------------------------------------------------
# Making shards: python data.py fineweb|text ... (see --help). A pool of processes tokenises
# the documents and pack() cuts their concatenation into shards. Bad input is one line
# "error: ..." and exit code 2; no network or a missing optional package, one line and 1.

class Unavailable(Exception):
    """No network, or a missing optional package (datasets, huggingface_hub: downloads only)."""


def get_tokenizer(tokenizer_file=None):
    """GPT-2's BPE: tiktoken's own (downloaded once, then cached), or built offline from a
    .tiktoken ranks file (openai-whisper ships gpt2.tiktoken), by default $GAPT_TOKENIZER_FILE."""
    tokenizer_file = tokenizer_file or os.environ.get("GAPT_TOKENIZER_FILE")
    if not tokenizer_file:
        try:
            return tiktoken.get_encoding("gpt2")
        except Exception:                     # requests' errors when offline, or anything else
            raise Unavailable("cannot download tiktoken's GPT-2 encoding (the machine seems "
                              "offline); pass --tokenizer_file path/to/gpt2.tiktoken") from None
    from tiktoken_ext.openai_public import r50k_pat_str   # the split pattern of tiktoken's gpt2
    try:   # "base64-token rank" lines, read here: tiktoken's own loader caches a file by its path
        with open(tokenizer_file, "rb") as f:
            ranks = {base64.b64decode(t): int(r) for t, r in (ln.split() for ln in f if ln.strip())}
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read tokenizer file {tokenizer_file} "
                        f"(--tokenizer_file or $GAPT_TOKENIZER_FILE): {e}") from None
    if sorted(ranks.values()) != list(range(EOT)):   # a cut file would crash the pool's workers
        raise DataError(f"{tokenizer_file} is not GPT-2's 50257-token vocabulary")
    return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str,
                             special_tokens={"<|endoftext|>": EOT}, mergeable_ranks=ranks)


def _init_worker(tokenizer_file):
    global _enc                               # each pool worker's own, loaded from the path
    _enc = get_tokenizer(tokenizer_file)
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C stops the parent, which ends the pool


def _tokenize(text):
    return np.array([EOT] + _enc.encode_ordinary(text), dtype=np.uint16)   # ids <= 50256


def tokenize_documents(docs, tokenizer_file=None, chunk=4096):
    """Yield each document's tokens, <|endoftext|> first, in order, from a pool on every core.
    The next chunk of documents is read while the pool tokenises this one, and no further: a
    stream is read as fast as it is used (Pool.imap would read it to the end, into memory).
    Load the tokenizer once before (a worker that fails to start is restarted forever), and call
    this under `if __name__ == "__main__":`, which a pool needs where processes are spawned."""
    docs = iter(docs)
    with mp.Pool(os.cpu_count() or 1, _init_worker, (tokenizer_file,)) as pool:
        work = pool.map_async(_tokenize, list(itertools.islice(docs, chunk)), chunksize=16)
        while True:
            ahead = list(itertools.islice(docs, chunk))
            if not (done := work.get()):
                return
            work = pool.map_async(_tokenize, ahead, chunksize=16)
            yield from done


def progress(token_docs, total, every=10.0):
    """Pass documents' tokens through, printing tokens/s and the ETA every few seconds."""
    n, t0, last = 0, time.time(), time.time()
    for tokens in token_docs:
        yield tokens
        n += len(tokens)
        if time.time() - last > every:
            last, rate = time.time(), n / (time.time() - t0)
            eta = (total - n) / rate / 60
            print(f"{n / 1e6:.1f}M tokens, {rate / 1e3:.0f}k tokens/s, ETA {eta:.1f} min")


def pack(token_docs, sizes):
    """Concatenate documents' tokens and cut them into shards of the given sizes, the last one
    shorter. Documents run across shard boundaries, as in build-nanogpt."""
    sizes = iter(sizes)
    shard, fill = np.empty(next(sizes), dtype=np.uint16), 0
    for tokens in token_docs:
        while len(tokens):
            take = min(len(shard) - fill, len(tokens))
            shard[fill:fill + take], fill, tokens = tokens[:take], fill + take, tokens[take:]
            if fill == len(shard):
                yield shard
                if (size := next(sizes, None)) is None:
                    return
                shard, fill = np.empty(size, dtype=np.uint16), 0
    if fill:
        yield shard[:fill]


def write_shards(token_docs, out_dir, prefix, old, sizes):
    """out_dir/{prefix}_val_000000.bin, then {prefix}_train_000001.bin, ..., of the given sizes.
    They are staged in out_dir/.partial and moved in place at the end, replacing old: a run
    stopped or failed half-way leaves the earlier corpus whole, never a mix of the two."""
    staging, made = os.path.join(out_dir, ".partial"), not os.path.exists(out_dir)
    try:
        shutil.rmtree(staging, ignore_errors=True)           # what a killed run left
        os.makedirs(staging)
    except OSError as e:
        raise DataError(f"--out {out_dir}: cannot make this folder ({e.strerror or e})") from None
    names, lengths = [], []
    try:
        for i, shard in enumerate(pack(token_docs, sizes)):
            names.append(f"{prefix}_{'train' if i else 'val'}_{i:06d}.bin")
            write_shard(os.path.join(staging, names[-1]), shard)
            lengths.append(len(shard))
        if len(lengths) < 2:                                 # gapt.py needs both splits
            raise DataError(f"{sum(lengths):,} tokens: too few for a val and a train shard "
                            "(a smaller --shard_size?)" if lengths else "no text to write")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if made:
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    for name in (stale := old - set(names)):
        os.remove(os.path.join(out_dir, name))
    for name in names:
        os.replace(os.path.join(staging, name), os.path.join(out_dir, name))
    os.rmdir(staging)
    print(f"{out_dir}: val {lengths[0]:,} tokens, train {sum(lengths[1:]):,} in "
          f"{len(lengths) - 1} shards" + (f" ({len(stale)} older shards removed)" if stale else ""))


def require(package):
    try:
        return importlib.import_module(package)
    except ImportError:
        raise Unavailable(f"this needs the {package} package: pip install {package}") from None


def offline(what, e):
    return Unavailable(f"cannot download {what} ({type(e).__name__}); the machine seems offline")


def texts(rows, error):
    """Each row's "text". A failure while reading (the network, a bad file) becomes error(e)."""
    try:
        for row in rows:
            if not isinstance(text := row["text"], str):
                raise TypeError(f'"text" is not a string but {type(text).__name__}')
            yield text
    except Exception as e:
        raise error(e) from None


def read_rows(path):
    """Rows {"text": ...}: a line of a .jsonl or a row of a .parquet, as in FineWeb (so a local
    copy takes the download's path), and in any other (UTF-8) file a block between blank lines."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq
        for batch in pq.ParquetFile(path).iter_batches(columns=["text"]):
            yield from batch.to_pylist()
    elif path.endswith((".jsonl", ".json")):
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except ValueError as e:   # json's own position is within the line
                        raise ValueError(f"line {i} is not JSON ({e.msg})") from None
    else:
        text = Path(path).read_text(encoding="utf-8")
        yield from ({"text": block} for block in re.split(r"\n\s*\n", text))


def file_docs(path):
    if not os.path.isfile(path):
        raise DataError(f"no such file: {path}")
    if path.endswith(".parquet"):
        require("pyarrow")                    # a missing package: exit 1, as for the others
    return texts(read_rows(path), lambda e: DataError(f"{path}: {type(e).__name__}: {e}"))


def download_cached(n, out_dir):
    """modded-nanogpt's pre-tokenised FineWeb (kjj0/fineweb10B-gpt2, shards of 10**8 tokens in
    this format): the val shard and n train shards. Shards already there are kept, whatever
    made them: give --cached a folder of its own."""
    os.environ.setdefault("HF_HUB_VERBOSITY", "error")   # no retry warnings: one line says it below
    hub = require("huggingface_hub")
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)   # if it was set up before
    made, cache = not os.path.exists(out_dir), os.path.join(out_dir, ".cache")   # hub's metadata
    new_cache = not os.path.exists(cache)
    for i in range(n + 1):
        name = f"fineweb_{'train' if i else 'val'}_{i:06d}.bin"
        if not os.path.exists(os.path.join(out_dir, name)):
            try:
                hub.hf_hub_download(repo_id="kjj0/fineweb10B-gpt2", filename=name,
                                    repo_type="dataset", local_dir=out_dir)
            except Exception as e:   # leave out_dir as it was, but for the shards downloaded
                if new_cache:
                    shutil.rmtree(cache, ignore_errors=True)
                if made and not os.listdir(out_dir):
                    os.rmdir(out_dir)
                raise offline(name, e) from None
        try:
            print(f"{out_dir}/{name}: {len(read_shard(os.path.join(out_dir, name))):,} tokens")
        except ValueError as e:                     # a cut or foreign file of that name
            raise DataError(f"{e}: delete it to download it again") from None


def prepare(args):
    """One corpus, read (or streamed), tokenised and written as shards. gapt.py reads every shard
    of a folder, so another corpus's shards in --out are refused, before anything is downloaded."""
    old = {p.name for split in ("train", "val") for p in Path(args.out).glob(f"*_{split}_*.bin")
           if p.is_file()}                               # this corpus's, replaced at the end
    if others := sorted(n for n in old if not n.startswith(args.source + "_")):
        raise DataError(f"{args.out} holds another corpus's shards ({others[0]}, ...): "
                        "choose another --out")
    if args.source == "fineweb" and args.cached:
        return download_cached(args.cached, args.out)
    if args.source == "text":
        docs = [d.strip() for path in args.files for d in file_docs(path) if d.strip()]
        if not docs:
            raise DataError(f"no text in {' '.join(args.files)}")
    elif args.local:
        docs = file_docs(args.local)
    else:                         # streamed: a small --shards downloads only what it needs
        datasets, name = require("datasets"), f"HuggingFaceFW/fineweb{'-edu' if args.edu else ''}"
        try:
            rows = datasets.load_dataset(name, name="sample-10BT", split="train", streaming=True)
        except Exception as e:
            raise offline(name, e) from None
        docs = texts(rows, lambda e: offline(name, e))
    get_tokenizer(args.tokenizer_file)
    token_docs = tokenize_documents(docs, args.tokenizer_file)
    if args.source == "text":
        # val is the first val_fraction of the tokens, at least one and at most a shard, and train
        # keeps at least one: a small corpus still makes both (every document has >= 2 tokens)
        token_docs = list(token_docs)
        n = sum(map(len, token_docs))
        val_size = int(np.clip(round(args.val_fraction * n), 1, min(args.shard_size, n - 1)))
        return write_shards(token_docs, args.out, "text", old,
                            itertools.chain([val_size], itertools.repeat(args.shard_size)))
    try:
        total = (args.shards + 1) * args.shard_size
        write_shards(progress(token_docs, total), args.out, "fineweb", old,
                     itertools.repeat(args.shard_size, args.shards + 1))
    finally:
        token_docs.close()        # stops the pool, and the download, once enough is written


class Parser(argparse.ArgumentParser):
    def error(self, message):                 # one line, not the usage block (subcommands too)
        raise DataError(f"{message} (see --help)")


def main(argv=None):
    p = Parser(description="Make GPT-2 token shards (llm.c's .bin format) for gapt.py.")
    sub = p.add_subparsers(dest="source", required=True)
    fw = sub.add_parser("fineweb", help="FineWeb sample-10BT, streamed and tokenised")
    count = fw.add_mutually_exclusive_group(required=True)
    count.add_argument("--shards", type=int, help="train shards to make, after the val shard")
    count.add_argument("--cached", type=int, help="instead download this many pre-tokenised train "
                       "shards (and the val shard) of modded-nanogpt's kjj0/fineweb10B-gpt2")
    fw.add_argument("--edu", action="store_true", help="FineWeb-Edu instead of FineWeb")
    fw.add_argument("--local", metavar="FILE", help="FineWeb's rows from this .parquet or .jsonl")
    tx = sub.add_parser("text", help="your own files: a document per 'text' of a .jsonl or "
                        ".parquet, else per block between blank lines")
    tx.add_argument("files", nargs="+", metavar="FILE")
    tx.add_argument("--val_fraction", type=float, default=0.1, help="share of the tokens for val "
                    "(default 0.1; at most a shard, at least a token, and a token left for train)")
    fw.add_argument("--out", help="output folder (default data/fineweb10B or data/edu_fineweb10B)")
    tx.add_argument("--out", default="data/text", help="output folder (default data/text)")
    for s in (fw, tx):
        s.add_argument("--shard_size", type=int, default=10**8, help="tokens per shard (10**8)")
        s.add_argument("--tokenizer_file", help="a GPT-2 .tiktoken file, to work offline "
                       "(default: $GAPT_TOKENIZER_FILE)")
    try:
        args = p.parse_args(argv)
        if args.out is None:      # FineWeb's default folder depends on --edu
            args.out = "data/edu_fineweb10B" if args.edu else "data/fineweb10B"
        for key in ("shards", "cached", "shard_size"):
            if getattr(args, key, None) is not None and getattr(args, key) < 1:
                p.error(f"argument --{key}: must be positive")
        if args.shard_size >= 2**31:                # the header counts tokens in an int32
            p.error("argument --shard_size: must be below 2**31")
        if not 0 < getattr(args, "val_fraction", 0.5) < 1:
            p.error("--val_fraction must be between 0 and 1")
        if getattr(args, "cached", None) and (args.edu or args.local):
            p.error("--cached downloads FineWeb itself: no --edu or --local")
        prepare(args)
    except (DataError, Unavailable) as e:
        print("error: " + str(e).replace("\n", " "), file=sys.stderr)
        return 2 if isinstance(e, DataError) else 1
    except OSError as e:   # a full disk: the earlier corpus is whole, .partial removed
        print(f"error: {e.strerror or e} (writing {args.out}); its earlier shards are kept",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stopped (Ctrl-C); --out holds its earlier shards (with --cached, also those "
              "downloaded so far)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
