"""Data for gapt.py: the synthetic tasks (no download) and GPT-2 token shards. Importing it does
nothing; the command line makes shards:

    python data.py fineweb --shards 10           # FineWeb sample-10BT -> data/fineweb10B/*.bin
    python data.py fineweb --cached 10           # modded-nanogpt's pre-tokenised shards instead
    python data.py text notes.txt more.jsonl     # your own text -> the same shard format
"""
import os
import signal
import sys

STOPS = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}   # as the one line names them
if __name__ == "__main__":   # a stop while numpy, tiktoken and torch load: one line, no traceback
    for _sig in STOPS:       # (main() then installs its own handler)
        signal.signal(_sig, lambda s, f: (print(f"stopped ({STOPS[s]})", file=sys.stderr),
                                          os._exit(128 + s)))

import argparse   # noqa: E402 (after the handlers above)
import base64
import itertools
import json
import logging
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tiktoken
import torch


class DataError(ValueError):
    """Bad input: a missing, unreadable or damaged file, an empty corpus, a shard changed."""

# -----------------------------------------------------------------------------
# Arithmetic multiplication: "<bos>a x b = c<eos>", one character per token. The paper trains on
# 1-3 digit operands and tests out-of-distribution (OOD) on 4-6 digits. The answer may be written
# least-significant digit first ("reversed"), the order in which carries are computed: each answer
# digit then depends only on the operands and the digits before it, which a tiny model learns in
# minutes (Lee et al. 2023, "Teaching arithmetic to small transformers"). Operands read normally.

PAD, BOS, EOS = 0, 1, 2                               # special token ids
ARITH_STOI = {c: i + 3 for i, c in enumerate("0123456789x= ")}
ARITH_ITOS = {i: c for c, i in ARITH_STOI.items()} | {PAD: "", BOS: "", EOS: ""}
ARITH_VOCAB = 3 + len(ARITH_STOI)                     # 16
EVAL_SEED = 20250513   # fixed: every run, whatever its --seed, is tested on the same problems


def arith_len(max_digits):
    """Tokens in the longest problem: bos, a, ' x ', b, ' = ', a*b (<= 2d digits), eos."""
    return 1 + max_digits + 3 + max_digits + 3 + 2 * max_digits + 1


def arith_sample(rng, n, lo, hi):
    """n operand pairs, each operand with a digit count uniform in [lo, hi] and then uniform
    among the numbers with that many digits (1 digit includes 0)."""
    d = rng.integers(lo, hi + 1, size=(2, n))
    return rng.integers(np.where(d == 1, 0, 10 ** (d - 1)), 10 ** d, dtype=np.int64)   # (2, n)


def arith_ids(a, b, reverse):
    """Token ids of one problem and the index of its first answer token."""
    prompt, c = f"{a} x {b} = ", str(int(a) * int(b))
    ids = [BOS] + [ARITH_STOI[ch] for ch in prompt + (c[::-1] if reverse else c)] + [EOS]
    return ids, 1 + len(prompt)


def arith_encode(a, b, block_size, reverse, loss="answer"):
    """Token ids of a batch of problems, one per row at position 0, padded -> x, y: (n, block_size)
    int64, y[i, t] the target for x[i, t] or -1 where no loss is taken: off the answer digits and
    the closing <eos> (loss="answer", minGPT-adder style) or after the <eos> (loss="all")."""
    seq = np.full((len(a), block_size + 1), PAD, dtype=np.int64)
    tgt = np.full_like(seq, -1)
    for i in range(len(a)):
        ids, start = arith_ids(a[i], b[i], reverse)
        if len(ids) > block_size + 1:
            raise ValueError(f"problem '{arith_decode(ids)}' needs block_size >= {len(ids) - 1}, "
                             f"got {block_size}")
        start = 1 if loss == "all" else start
        seq[i, :len(ids)], tgt[i, start:len(ids)] = ids, ids[start:]
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


def arith_decode(ids):
    return "".join({BOS: "<bos>", EOS: "<eos>"}.get(int(i), ARITH_ITOS[int(i)]) for i in ids)


def arith_prompt(text):
    """'7 x 8' (also '7*8 =') -> (the problem's token ids up to its '= ', <eos>, room for the
    answer): what a model is asked; DataError if text is not a problem."""
    problem = re.fullmatch(r"\s*(\d{1,9})\s*[x*]\s*(\d{1,9})\s*=?\s*", text)
    if not problem:
        raise DataError(f"{text!r}: this checkpoint multiplies: give a problem like '7 x 8'")
    ids, start = arith_ids(*(int(v) for v in problem.groups()), False)
    return ids[:start], EOS, 2 * len(ids) - 2 * start


def arith_show(text, new, reverse):
    """The answer to problem text in the ids new (up to <eos>), in reading order (the model may
    write it last digit first: reverse), marked right or wrong."""
    a, b = (int(v) for v in re.findall(r"\d+", text)[:2])
    said = arith_decode(new).partition("<eos>")[0]
    flip = reverse and said.isdigit()   # else not an answer: as written
    answer = said[::-1] if flip else said
    return f"{a} x {b} = {answer}   " + ("right" if answer == str(a * b) else
                                       f"wrong: {a * b}") + f" (written {said})" * flip


class Resumable:
    """Data drawn from self.rng, its state kept in checkpoints: a resumed run sees the same data."""
    def state_dict(self):
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, sd):
        self.rng.bit_generator.state = sd["rng"]


class Arithmetic(Resumable):
    """Training batches from a seeded generator plus fixed ID and OOD test sets: ID accuracy is on
    problems of the trained sizes held out of training, OOD on larger ones. layout="padded": one
    problem per row at position 0; "packed" (the author's): rows are windows of a stream of
    problems, as on text, a fresh stretch per row, the loss on every token or the answers only."""
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
        # packed: unscored problems (>= 10 tokens each) give the first scored one a full window
        n_ctx = -(-block_size // 10) if layout == "packed" else 0
        self.ctx_ab = {"id": arith_sample(ev, n_ctx, *train_digits),
                       "ood": arith_sample(ev, n_ctx, *ood_digits)}
        # held out, by a key per problem: [10**9, 1] @ ab = a * 10**9 + b (operands < 10**9)
        self.held_out = np.unique([10**9, 1] @ np.hstack([self.id_ab, self.ctx_ab["id"]]))
        lo, hi = train_digits
        n_pairs = (10**hi - (0 if lo == 1 else 10 ** (lo - 1))) ** 2   # distinct training problems
        if 2 * len(self.held_out) > n_pairs:   # else batch() would resample (nearly) forever
            raise ValueError(f"--n_eval={n_eval} holds out {len(self.held_out)} of the {n_pairs} "
                             f"problems of {lo}-{hi} digits: use a smaller --n_eval or larger ones")
        self.rng = np.random.default_rng([seed, rank])   # each DDP rank draws its own problems

    def problems(self, n):
        """(2, n) fresh training operands, none of them held out."""
        ab = arith_sample(self.rng, n, *self.train_digits)
        while (bad := np.isin([10**9, 1] @ ab, self.held_out)).any():   # resample held-out ones
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
        """{"id": (x, y), "ood": (x, y)}: the fixed test problems. Packed: row i is the window of
        the test stream that ends at problem i's <eos>, its targets that answer, -1 elsewhere."""
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

# -----------------------------------------------------------------------------
# Catastrophic-forgetting toy, the paper's interference experiment ("GAPT reduces interference by
# compressing and separating representations"), rebuilt from its description (no script).


def forgetting_data(seed, n_in=10, n_hidden=50, m=0.8, rank=1, n_train=512, n_test=512):
    """The two regression tasks of experiments.py --task=forgetting, from one seed. A teacher MLP f
    moves both ways along a random low-rank direction Delta of its weights: task A is f at theta0 +
    m Delta on inputs from P1 (the first half of the features near 1, the others near 0), task B at
    theta0 - m Delta on P2 (P1 mirrored). They conflict along Delta: a student that learns A, then
    B, overwrites A unless it keeps their inputs apart inside. Float32 xa, ya, xb, yb (n_train
    rows), held-out xa_test, ya_test, xb_test, yb_test (n_test rows): x (n, n_in), y (n, 1)."""
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
# Token shards: GPT-2 tokens in llm.c's and modded-nanogpt's .bin format, a header of 256 int32
# (magic, version, token count, zeros), then uint16 tokens (GPT-2's 50257 ids fit in 16 bits). A
# data folder holds *_val_*.bin (shard 0) and *_train_*.bin shards, of FineWeb (tokenised here as
# in build-nanogpt's fineweb.py, or modded-nanogpt's) or your own text (see the command line at
# the end), and gpt2.tiktoken: a copy of the tokenizer file used, so that it travels with them.

SHARD_MAGIC, SHARD_VERSION, HEADER_INTS = 20240520, 1, 256
EOT = 50256                                   # GPT-2's <|endoftext|>, put before every document
TOKENIZER_COPY = "gpt2.tiktoken"


def write_shard(path, tokens):
    """Write tokens as one shard, atomically: an interrupted write leaves no partial shard."""
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**16):
        raise ValueError(f"{path}: token ids must be in [0, 2**16)")
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[:3] = SHARD_MAGIC, SHARD_VERSION, len(tokens)
    tmp = Path(f"{path}.tmp")                 # same directory, so os.replace is an atomic rename
    try:
        tmp.write_bytes(header.tobytes() + tokens.astype(np.uint16).tobytes())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
        raise DataError(f"{path}: {size} bytes, but the header says {n} tokens: truncated?")
    return np.memmap(path, dtype=np.uint16, mode="r", offset=4 * HEADER_INTS, shape=(n,))


def find_shards(data_dir, split):
    paths = sorted(str(p) for p in Path(data_dir).glob(f"*_{split}_*.bin") if p.is_file())
    if not paths:
        raise FileNotFoundError(f"no {split} shards in {data_dir}: run 'python data.py fineweb "
                                f"--shards 10 --out {data_dir}' (or 'data.py text FILE... --out')")
    return paths


class TokenShards(Resumable):
    """Random training windows and a fixed validation set from a directory of shards. Each
    batch memory-maps only the shards it reads, so no shard is ever loaded whole."""
    def __init__(self, data_dir, block_size, seed, rank=0, world_size=1, vocab_size=None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.block_size = T = block_size
        self.train, self.val = find_shards(data_dir, "train"), find_shards(data_dir, "val")
        self.lengths = np.array([len(read_shard(p)) for p in self.train])
        for path in (self.train + self.val if vocab_size else []):   # another tokenizer's ids?
            for i in range(0, len(read_shard(path)), 2**24):   # all read, 32 MB a fresh memmap
                top = int(read_shard(path)[i:i + 2**24].max())   # (flat memory): 0.04 s/100M tokens
                if top >= vocab_size:
                    raise ValueError(f"{path}: token id {top} is outside the vocabulary "
                                     f"[0, {vocab_size}): shards from another tokenizer?")
        for path, n in zip(self.train, self.lengths):
            if n < T + 1:
                raise ValueError(f"{path} has {n} tokens, fewer than block_size + 1 ({T + 1})")
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
# Making shards (python data.py fineweb|text ..., see --help). Bad input: one line "error: ..." and
# exit 2; no network or a missing package: one line and 1; a stop (Ctrl-C, SIGTERM) at any moment:
# one line, 130 or 143, --out holding a whole corpus. Threads tokenise: one process, no workers.


class Unavailable(Exception):
    """No network, or a missing optional package (datasets, huggingface_hub: downloads only)."""


def _stop(signum, frame, *then):   # main()'s handler: a stop unwinds to main()'s one line, and
    for sig in STOPS:              # the first is the only one (cleaning up is not cut short)
        signal.signal(sig, signal.SIG_IGN)
    raise KeyboardInterrupt(STOPS[signum], *then)


def get_tokenizer(tokenizer_file=None, corpus=None):
    """GPT-2's BPE from the first of: tokenizer_file, $GAPT_TOKENIZER_FILE, the corpus folder's
    copy (gpt2.tiktoken, made by data.py), tiktoken's own (downloaded once, then cached). From a
    .tiktoken ranks file (openai-whisper ships gpt2.tiktoken) it is built offline."""
    copy = os.path.join(corpus or "", TOKENIZER_COPY)
    tokenizer_file = (tokenizer_file or os.environ.get("GAPT_TOKENIZER_FILE")
                      or (copy if corpus and os.path.isfile(copy) else None))
    if not tokenizer_file:
        try:
            return tiktoken.get_encoding("gpt2")
        except Exception:                     # requests' errors when offline, or anything else
            raise Unavailable("cannot download tiktoken's GPT-2 encoding (the machine seems "
                              "offline); pass --tokenizer_file path/to/gpt2.tiktoken, or set "
                              "TIKTOKEN_CACHE_DIR to a folder of tiktoken's cache") from None
    from tiktoken_ext.openai_public import r50k_pat_str   # the split pattern of tiktoken's gpt2
    try:   # "base64-token rank" lines, read here: tiktoken's own loader caches a file by its path
        with open(tokenizer_file, "rb") as f:
            ranks = {base64.b64decode(t): int(r) for t, r in (ln.split() for ln in f if ln.strip())}
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read tokenizer file {tokenizer_file} (--tokenizer_file, "
                        f"$GAPT_TOKENIZER_FILE or the corpus's copy): {e}") from None
    if sorted(ranks.values()) != list(range(EOT)):   # else a merge it lacks fails mid-corpus
        raise DataError(f"{tokenizer_file} is not GPT-2's 50257-token vocabulary")
    return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str,
                             special_tokens={"<|endoftext|>": EOT}, mergeable_ranks=ranks)


def tokenize_documents(docs, tokenizer_file=None, chunk=4096):
    """Yield each document's tokens, <|endoftext|> first, in order, from a thread per core (tiktoken
    lets go of the GIL). A stream is read a chunk ahead, not to its end as Executor.map would."""
    def tokenize(texts):   # 64 documents a task: a task costs more GIL time than a document does
        return [np.array([EOT] + enc.encode_ordinary(text), dtype=np.uint16) for text in texts]
    enc, docs, done = get_tokenizer(tokenizer_file), iter(docs), []
    with ThreadPoolExecutor(os.cpu_count()) as pool:    # a stop waits for the chunk in hand
        ahead = list(itertools.islice(docs, chunk))
        while ahead:
            work = pool.map(tokenize, (ahead[i:i + 64] for i in range(0, len(ahead), 64)))
            yield from done                                  # the previous chunk, meanwhile
            ahead = list(itertools.islice(docs, chunk))      # and the next one is read
            done = [tokens for part in work for tokens in part]
        yield from done


def write_shards(token_docs, out_dir, prefix, old, sizes, tokenizer_file=None, total=None):
    """Documents' tokens run together (one may span two shards, as in build-nanogpt) into
    out_dir/{prefix}_val_000000.bin, {prefix}_train_000001.bin, ... of the given sizes, with the
    tokenizer file's copy: staged in out_dir/.partial and moved in at the end, replacing old, so a
    run stopped or failed half-way leaves the earlier corpus whole. Given total, says how far."""
    staging, made = os.path.join(out_dir, ".partial"), not os.path.exists(out_dir)
    try:
        shutil.rmtree(staging, ignore_errors=True)           # what a killed run left
        os.makedirs(staging)
    except OSError as e:
        raise DataError(f"--out {out_dir}: cannot make this folder ({e.strerror or e})") from None
    token_docs, names, lengths, parts, have, t0 = iter(token_docs), [], [], [], 0, time.time()
    try:
        for i, size in enumerate(sizes):
            while have < size and (tokens := next(token_docs, None)) is not None:
                parts.append(tokens)
                have += len(tokens)
            if not have:
                break
            tokens = np.concatenate(parts)
            parts, have = [tokens[size:]], max(have - size, 0)
            names.append(f"{prefix}_{'train' if i else 'val'}_{i:06d}.bin")
            write_shard(os.path.join(staging, names[-1]), tokens[:size])
            lengths.append(len(tokens[:size]))
            if total:
                print(f"{names[-1]}: {sum(lengths):,} of {total:,} tokens, {time.time() - t0:.0f}s")
        if len(lengths) < 2 or min(lengths[0], sum(lengths[1:])) < 2:   # gapt.py needs both
            raise DataError(f"{sum(lengths):,} tokens: too few for a val and a train shard of 2 or "
                            "more (a smaller --shard_size?)" if lengths else "no text to write")
        if tokenizer_file:
            shutil.copyfile(tokenizer_file, os.path.join(staging, TOKENIZER_COPY))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if made:
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    came = []                      # a stop now waits until the new corpus is whole
    handlers = {sig: signal.signal(sig, lambda s, f: came.append(s)) for sig in STOPS}
    for name in (stale := old - set(names)):
        os.remove(os.path.join(out_dir, name))
    for name in names + [TOKENIZER_COPY] * bool(tokenizer_file):
        os.replace(os.path.join(staging, name), os.path.join(out_dir, name))
    os.rmdir(staging)
    for sig, handler in handlers.items():   # (if this fails, main() puts its own back)
        signal.signal(sig, handler)
    if came:
        _stop(came[0], None, "in place")
    print(f"{out_dir}: val {lengths[0]:,} tokens, train {sum(lengths[1:]):,} in "
          f"{len(lengths) - 1} shards" + (f" ({len(stale)} older shards removed)" if stale else ""))


def require(package):
    try:
        return __import__(package)
    except ImportError:
        raise Unavailable(f"this needs the {package} package: pip install {package}") from None


def offline(what, e):
    return Unavailable(f"cannot download {what} ({type(e).__name__}); the machine seems offline")


def texts(rows, error):
    """Each "text" of rows(), as it is used; a failure (the network, a bad file) is error(e)."""
    try:
        for row in rows():
            if not isinstance(text := row["text"], str):
                raise TypeError(f'"text" is not a string but {type(text).__name__}')
            yield text
    except Exception as e:
        raise error(e) from None


def file_docs(path):
    """A file's documents, read as they are used: each row's "text" of a .jsonl or .parquet, as in
    FineWeb (so a local copy takes the download's path), else each block between blank lines."""
    def rows():
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
            yield from ({"text": t} for t in re.split(r"\n\s*\n", Path(path).read_text("utf-8")))
    if not os.path.isfile(path):
        raise DataError(f"no such file: {path}")
    if path.endswith(".parquet"):
        require("pyarrow")                    # a missing package: exit 1, as for the others
    return texts(rows, lambda e: DataError(f"{path}: {type(e).__name__}: {e}"))


def download_cached(n, out_dir):
    """The val shard and n train shards of modded-nanogpt's pre-tokenised FineWeb (10**8 tokens
    each). Shards already there are kept, whatever made them: give --cached a folder of its own."""
    hub = require("huggingface_hub")   # its retry warnings not shown: one line says it below
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
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
        return download_cached(args.cached, args.out)   # pre-tokenised: no tokenizer file to copy
    if args.source == "text":
        docs = [d.strip() for path in args.files for d in file_docs(path) if d.strip()]
        if not docs:
            raise DataError(f"no text in {' '.join(args.files)}")
    elif args.local:
        docs = file_docs(args.local)
    else:                         # streamed: a small --shards downloads only what it needs
        datasets, name = require("datasets"), f"HuggingFaceFW/fineweb{'-edu' if args.edu else ''}"
        docs = texts(lambda: datasets.load_dataset(name, name="sample-10BT", split="train",
                                                   streaming=True), lambda e: offline(name, e))
    get_tokenizer(tokenizer_file := args.tokenizer_file or os.environ.get("GAPT_TOKENIZER_FILE"))
    tokens = tokenize_documents(docs, tokenizer_file)   # (a bad tokenizer file: failed above)
    if args.source == "fineweb":   # its threads and the download end once enough is written
        return write_shards(tokens, args.out, "fineweb", old, [args.shard_size] * (args.shards + 1),
                            tokenizer_file, total=(args.shards + 1) * args.shard_size)
    tokens = list(tokens)   # val: the first val_fraction, at most a shard, 2 left for train
    n = sum(map(len, tokens))
    val = max(2, min(round(args.val_fraction * n), args.shard_size, n - 2))   # and 2 at least
    write_shards(tokens, args.out, "text", old, itertools.chain([val], itertools.repeat(
                 args.shard_size)), tokenizer_file)


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
                    "(default 0.1; at most a shard, at least 2 tokens, and 2 left for train)")
    for s, out in ((fw, "data/fineweb10B or data/edu_fineweb10B"), (tx, "data/text")):
        s.add_argument("--out", help=f"output folder (default {out})")
        s.add_argument("--shard_size", type=int, default=10**8, help="tokens per shard (10**8)")
        s.add_argument("--tokenizer_file", help="a GPT-2 .tiktoken file, to work offline "
                       "(default: $GAPT_TOKENIZER_FILE), copied into --out as gpt2.tiktoken")
    old = {}
    try:
        for sig in STOPS:                       # a stop unwinds (KeyboardInterrupt) to its line
            old[sig] = signal.signal(sig, _stop)
        args = p.parse_args(argv)
        args.out = args.out or ("data/text" if args.source == "text" else
                                "data/edu_fineweb10B" if args.edu else "data/fineweb10B")
        for key in ("shards", "cached", "shard_size"):   # the header counts tokens in an int32
            if vars(args).get(key) is not None and not 0 < vars(args)[key] < 2**31:
                p.error(f"argument --{key}: must be from 1 to 2**31 - 1")
        if not 0 < getattr(args, "val_fraction", 0.5) < 1:
            p.error("--val_fraction must be between 0 and 1")
        if getattr(args, "cached", None) and (args.edu or args.local):
            p.error("--cached downloads FineWeb itself: no --edu or --local")
        prepare(args)
    except (DataError, Unavailable, OSError) as e:   # OSError: a full disk (.partial removed)
        why = (f"{e.strerror or e} (writing {args.out}); its earlier shards are kept"
               if isinstance(e, OSError) else str(e).replace("\n", " "))
        print(f"error: {why}", file=sys.stderr)
        return 2 if isinstance(e, DataError) else 1
    except KeyboardInterrupt as e:
        why, *moved = e.args or ["Ctrl-C"]      # moved: it came as the new shards were moved in
        print(f"stopped ({why}); --out holds " + ("the new shards, all in place" if moved else
              "its earlier shards (with --cached, also those downloaded so far)"), file=sys.stderr)
        return 143 if why == "SIGTERM" else 130
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    return 0


if __name__ == "__main__":
    code = main()
    for sig in STOPS:   # the run is over: a stop while the interpreter exits (a second, for torch)
        signal.signal(sig, signal.SIG_IGN)   # would kill it silently, by the signal
    sys.exit(code)
