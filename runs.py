"""
A run's folder, and what survives a crash. gapt.py trains; this file keeps its promises on disk:

- one run per out_dir at a time (a lock the kernel drops however the process ends);
- a fresh run into a used out_dir keeps the earlier run whole, in out_dir/earlier/N;
- every file is written whole or not at all (write_atomic), so a kill or a full disk loses nothing;
- checkpoints carry a sha256 in their zip archive's comment: torch.load opens them as they are, and
  read_checkpoint, the one reader every caller uses, names a changed byte in one line;
- the log survives a torn line, and on resume loses the steps after the checkpoint (they run again);
- --init_from=resume continues the run as it was started (resume_config). Also: GPT-2's weight
files (gapt.fit_gpt2 maps their names). It imports no project module.
"""
import fcntl
import glob
import hashlib
import io
import json
import os
import random
import re
import warnings

import numpy as np
import torch


class ConfigError(ValueError):   # bad input from the user: one line, exit code 2, nothing written
    pass


class TrainingError(RuntimeError):   # a run that cannot go on (e.g. persistent NaNs): one line, 1
    pass


def quoted(path):   # a path as one line: quoted when it holds a newline or another odd character
    return repr(str(path)) if not str(path).isprintable() else str(path)


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

# -----------------------------------------------------------------------------
# Checkpoints. torch.save writes a zip archive; its end record may carry a comment of up to 64 KiB,
# which zip readers (torch.load among them) skip. The comment holds the sha256 of the archive as
# torch wrote it. Older checkpoints put the same line before the archive; they still load.

CKPT_MAGIC = b"GAPT-CKPT sha256 "   # then 64 hex digits
NEEDED = ("model", "config", "step")


def save_checkpoint(path, state):
    buf = io.BytesIO()
    torch.save(state, buf)
    archive = buf.getbuffer()
    mark = CKPT_MAGIC + hashlib.sha256(archive).hexdigest().encode()
    if archive[-22:-18] != b"PK\x05\x06" or archive[-2:] != b"\0\0":   # an end record, no comment
        raise RuntimeError("torch.save wrote an archive this checksum cannot annotate")
    write_atomic(path, archive[:-2], len(mark).to_bytes(2, "little"), mark)


def read_checkpoint(path, needed=NEEDED):
    """The state save_checkpoint wrote, checked: a missing file, a changed byte, a file that is not
    a checkpoint or lacks the needed keys is a ConfigError of one line, wherever it is read."""
    if not os.path.isfile(path):
        raise ConfigError(f"no checkpoint at {quoted(path)}")
    with open(path, "rb") as f:
        blob = bytearray(f.read())
    n = len(CKPT_MAGIC) + 64
    if blob[-n:].startswith(CKPT_MAGIC):        # the mark in the comment: the archive without it
        blob, digest = blob[:-n], bytes(blob[-n + len(CKPT_MAGIC):])
        blob[-2:] = b"\0\0"
    elif blob.startswith(CKPT_MAGIC):           # older: the mark on a line before the archive
        head, _, rest = bytes(blob).partition(b"\n")
        blob, digest = bytearray(rest), head[len(CKPT_MAGIC):]
    else:
        digest = None                           # a bare torch.save, from before checksums
    if digest is not None and hashlib.sha256(blob).hexdigest().encode() != digest:
        raise ConfigError(f"{quoted(path)} is damaged: its checksum does not match (a changed "
                          f"byte); delete it to start over")
    try:
        with warnings.catch_warnings():         # torch warns before some errors: one line here
            warnings.simplefilter("ignore")
            ck = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=False)
        if not isinstance(ck, dict) or not all(k in ck for k in needed):
            raise KeyError(next((k for k in needed if not isinstance(ck, dict) or k not in ck)))
        if not isinstance(ck.get("step", 0), int) or not isinstance(ck.get("config", {}), dict):
            raise TypeError("step")
    except Exception as e:   # EOFError, UnpicklingError, a bare tensor, a missing key, ...
        raise ConfigError(f"{quoted(path)} is damaged ({type(e).__name__}); delete it to start "
                          f"over") from None
    return ck

# -----------------------------------------------------------------------------
# Resume: the run as it was started. Its checkpoint's config gives every setting the command line
# does not; a given one that differs replaces it, said in one line, unless it cannot change.

MACHINE = ("device", "compile", "dtype", "read_lag", "dist_timeout", "out_dir", "data_dir",
           "tokenizer_file", "init_from", "weights", "given")   # follow the machine it runs on


def check_saved(saved, where, defaults, choices, validate):
    """A config read back from disk (a checkpoint's, a comparison's config.json), checked as the
    command line is (each setting of its default's type, among its choices, then validate): a
    damaged or edited one is one line, not a crash later. -> the defaults updated with it"""
    for k, v in saved.items() if isinstance(saved, dict) else [("config", saved)]:
        d = defaults.get(k, v) if isinstance(saved, dict) else {}
        if not (type(v) is type(d) or type(d) is float and type(v) is int) or \
                v not in choices.get(k, (v,)):
            raise ConfigError(f"{quoted(where)}: its config has {k}={v!r}, not a valid value; "
                              f"delete it to start over")
    try:
        return validate({**defaults, **saved})
    except ConfigError as e:
        raise ConfigError(f"{quoted(where)}: its config is damaged: {e}") from None


def resume_config(cfg, saved, defaults, fixed, where, say=print):
    """cfg (the command line's) continued from saved (the run's config): saved's value for every
    setting not given, the given ones said (say), those in fixed refused when they differ."""
    given = cfg["given"] if "given" in cfg else [k for k in defaults if cfg[k] != defaults[k]]
    old = {k: saved.get(k, defaults[k]) for k in defaults}   # older configs lack newer keys
    for k in given:
        if k in MACHINE or k not in defaults or cfg[k] == old[k]:
            continue
        if k in fixed:
            raise ConfigError(f"--{k}={cfg[k]}: {quoted(where)} was trained with --{k}={old[k]}; "
                              f"it cannot change on resume (start a new run in another --out_dir)")
        if say:
            say(f"resume: --{k}={cfg[k]} replaces the run's {old[k]}")
    out = {**cfg, **{k: v for k, v in old.items() if k not in given and k not in MACHINE}}
    if "data_dir" not in given and "data_dir" in saved:    # its corpus, unless given (moved)
        out["data_dir"] = saved["data_dir"]
    return out


def rng_state():   # this process's random generators (a checkpoint holds every rank's)
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() else None   # this rank's GPU
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(), "cuda": cuda}


def set_rng_state(s):
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])


def load_checkpoint(cfg, check, defaults, fixed, master):
    """out_dir's checkpoint, whole and checked, and cfg continued from its config (check: the
    caller's check of a config read back from disk): the run as it was started."""
    path = os.path.join(cfg["out_dir"], "ckpt.pt")
    try:
        ck = read_checkpoint(path, ("model", "optimizer", "gapt", "scaler", "ranks", *NEEDED))
    except ConfigError as e:
        raise ConfigError(f"--init_from=resume: {e}") from None
    saved = check(ck["config"], path)
    opt = ck["optimizer"]                        # older checkpoints: one dict
    ck["optimizer"] = opt.get("optimizers", [opt]) if isinstance(opt, dict) else opt
    cfg = resume_config(cfg, saved, defaults, fixed, path, print if master else None)
    cfg["vocab_real"] = saved.get("vocab_real", 0)
    if cfg["max_iters"] < ck["step"]:
        raise ConfigError(f"--max_iters={cfg['max_iters']}: the checkpoint is at step {ck['step']} "
                          f"already; give a larger --max_iters to train on")
    if cfg["max_iters"] == ck["step"] and master:
        print(f"resume: the checkpoint is at step {ck['step']} = --max_iters: nothing to train")
    return cfg, ck


def restore_rank(ck, loader, rank, world):
    """This rank's data stream and RNG states from checkpoint ck."""
    if len(ck["ranks"]) != world:   # another number of processes: each rank's stream starts afresh
        if rank == 0:
            print(f"resume: checkpoint from {len(ck['ranks'])} processes, now {world}: "
                  f"data streams restart")
        return
    loader.load_state_dict(ck["ranks"][rank]["data"])
    set_rng_state(ck["ranks"][rank]["rng"])

# -----------------------------------------------------------------------------
# The log: one JSON record a line. read_records skips a damaged line (a torn write, stray bytes).


def read_records(path, valid=lambda rec: True):
    """path's records, less (with a warning) damaged ones: no integer step, refused by valid."""
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
        print(f"warning: {quoted(path)}: skipped {len(bad)} damaged line(s): {lines}")
    return recs


def read_log(run_dir, kind, *keys):
    """The records of one kind ("train", "eval", "switch", "align", "skip") in run_dir/log.jsonl;
    one that lacks a number for one of keys counts as a damaged line."""
    recs = read_records(os.path.join(run_dir, "log.jsonl"), lambda r: r.get("kind") != kind or
                        all(isinstance(r.get(k), (int, float)) for k in keys))
    return [r for r in recs if r.get("kind") == kind]


class Logger:
    """Every record to log.jsonl, and a line to the console now and then; silent without a path.
    On resume the records after the checkpoint's step go: those steps run again."""

    def __init__(self, path, resume_step=None):
        self.path = path
        if path and resume_step is not None and os.path.exists(path):
            keep = [json.dumps(r) + "\n" for r in read_records(path) if r["step"] <= resume_step]
            write_atomic(path, "".join(keep).encode())
        self.f = open(path, "w" if resume_step is None else "a") if path else None

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
# The folder: one run at a time, an earlier run kept whole.

RUN_FILES = r"ckpt\.pt|best\.pt|log\.jsonl|config\.json|curves\.png"


def lock_dir(out_dir):
    """Hold out_dir/.lock (flock) for this process's life: one run per out_dir at a time. The kernel
    drops the lock when the process ends, however it ends, so a killed run leaves nothing stuck.
    The .tmp files of a run killed mid-write go."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        f = open(os.path.join(out_dir, ".lock"), "a+")
    except OSError as e:   # e.g. a file, or a read-only folder
        raise ConfigError(f"--out_dir={quoted(out_dir)}: cannot write here "
                          f"({e.strerror or e})") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        pid = f.read().strip() or "?"
        f.close()
        raise ConfigError(f"--out_dir={quoted(out_dir)}: another run (pid {pid}) is writing here; "
                          f"wait for it to end, or choose another --out_dir") from None
    f.truncate(0)
    f.write(str(os.getpid()))
    f.flush()
    for tmp in glob.glob(os.path.join(glob.escape(out_dir), "*.tmp")):
        os.remove(tmp)
    return f


def keep_earlier_run(out_dir, run_files=RUN_FILES):
    """A fresh run into a used out_dir moves the earlier run's files (run_files, a regex) to
    out_dir/earlier/N, N = 1, 2, ...: a forgotten --init_from=resume costs nothing, and a later
    resume never pairs an old checkpoint with a new log. Other files in out_dir stay."""
    names = [n for n in sorted(os.listdir(out_dir)) if re.fullmatch(run_files, n)]
    if names:
        kept = os.path.join(out_dir, "earlier")
        n = 1 + max([int(d) for d in os.listdir(kept) if d.isdigit()]
                    if os.path.isdir(kept) else [], default=0)
        os.makedirs(os.path.join(kept, str(n)))
        for name in names:
            os.replace(os.path.join(out_dir, name), os.path.join(kept, str(n), name))
        print(f"{quoted(out_dir)}: the earlier run's files are kept in {quoted(kept)}/{n} "
              f"(this one starts afresh)")


def open_run(cfg, master, resume_step=None, run_files=RUN_FILES):
    """Rank 0 locks out_dir, keeps an earlier run's files (a fresh run), writes config.json and
    opens the log: the run's Logger (a silent one on the other ranks). Called once every check of
    the run's input has passed: the first write of a run."""
    if not master:
        return Logger(None)
    lock = lock_dir(cfg["out_dir"])
    try:
        log_path = os.path.join(cfg["out_dir"], "log.jsonl")
        if resume_step is not None and os.path.isdir(log_path):
            raise IsADirectoryError(21, "Is a directory", log_path)   # before config.json
        if resume_step is None:
            keep_earlier_run(cfg["out_dir"], run_files)
        write_atomic(os.path.join(cfg["out_dir"], "config.json"),
                     json.dumps(cfg, indent=1).encode())
        log = Logger(log_path, resume_step)
    except OSError as e:   # e.g. config.json a folder, "earlier" a file, a full disk
        raise ConfigError(f"--out_dir={quoted(cfg['out_dir'])}: cannot write "
                          f"{quoted(e.filename)} ({e.strerror or e})") from None
    log.lock = lock   # held as long as the run's Logger
    return log


# -----------------------------------------------------------------------------
# GPT-2's weight files (--init_from=gpt2*): a local copy (--weights) or Hugging Face's download.


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
        raise ConfigError(f"--weights={quoted(path)}: no such file, "
                          "nor a folder with model.safetensors or pytorch_model.bin")
    return path


GPT2_SIZES = {"gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024), "gpt2-large": (36, 20, 1280),
              "gpt2-xl": (48, 25, 1600)}   # (n_layer, n_head, n_embd): the Hugging Face checkpoints


def read_gpt2(cfg):
    """Hugging Face GPT-2's state dict less "transformer." (gapt.fit_gpt2 maps it), for a text run.
    Sets cfg's n_layer, n_embd (the tensors), n_head (the config.json beside them, else by name)
    and block_size, unless given, to their positions; nothing is written."""
    if cfg["task"] != "text":
        raise ConfigError(f"--init_from={cfg['init_from']} needs --task=text (GPT-2's vocabulary)")
    name, path = cfg["init_from"], gpt2_file(cfg["init_from"], cfg["weights"])
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
        (vocab, n_embd), n_pos = sd["wte.weight"].shape, len(sd["wpe.weight"])
        n_layer = len({k.split(".")[1] for k in sd if k.startswith("h.")})
    except ImportError:
        raise ConfigError(f"--weights={quoted(path)}: pip install safetensors to read it") from None
    except Exception as e:
        raise ConfigError(f"--weights={quoted(path)}: not a GPT-2 checkpoint "
                          f"({type(e).__name__})") from None
    config = os.path.join(os.path.dirname(path), "config.json")
    try:
        with open(config) as f:
            n_head = json.load(f)["n_head"]
        if type(n_head) is not int or not 0 < n_head <= n_embd:
            raise ValueError(n_head)
    except FileNotFoundError:
        if (n_layer, n_embd) != GPT2_SIZES[name][::2]:
            raise ConfigError(f"{quoted(config)} is missing and the weights are not {name}'s "
                              f"size: it gives n_head") from None
        n_head = GPT2_SIZES[name][1]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{quoted(config)}: no n_head in it, a positive integer "
                          f"({type(e).__name__})") from None
    if vocab != 50257 or n_embd % n_head:
        raise ConfigError(f"--weights={quoted(path)}: {vocab} tokens, {n_embd} wide, {n_head} "
                          f"heads: not a GPT-2 shape")
    for key, v in (("n_layer", n_layer), ("n_head", n_head), ("n_embd", n_embd)):
        if cfg[key] not in (0, v):
            raise ConfigError(f"--{key}={cfg[key]}: the weights have {v}")
        cfg[key] = v
    if cfg["block_size"] > n_pos:
        raise ConfigError(f"--block_size={cfg['block_size']}: the weights have {n_pos} positions")
    cfg["block_size"] = cfg["block_size"] or n_pos   # default: all its positions
    cfg["vocab_real"] = vocab   # in the checkpoint's config: a resumed run masks the padding too
    return sd
