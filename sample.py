"""
Prompts to a trained run's checkpoint, as nanoGPT's sample.py:

    python sample.py --out_dir=out --start="12 x 34"             # arithmetic: answered, marked
    python sample.py --out_dir=out/text --start="Once upon a time" --num_samples=3 --temperature=0.8
    python sample.py --out_dir=out --ckpt=best                   # the best eval's weights

The task's entry in gapt.TASKS writes the prompt and shows the answer; a text run finds the
tokenizer its corpus was made with (data.py keeps it beside the shards).
"""
import os
import signal
import sys

if __name__ == "__main__":   # a signal while torch loads: one line (main() then installs its own)
    for _sig, _code, _why in ((signal.SIGINT, 130, "Ctrl-C"), (signal.SIGTERM, 143, "SIGTERM")):
        signal.signal(_sig, lambda s, f, c=_code, w=_why: (sys.stderr.write(
            f"stopped ({w}) while starting\n"), os._exit(c)))

import math   # noqa: E402 (after the handlers above)

import torch  # noqa: E402

import data   # noqa: E402
import gapt   # noqa: E402
import runs   # noqa: E402
from runs import ConfigError   # noqa: E402

FLAGS = [
    "sample.py: prompts to out_dir's checkpoint",
    ("out_dir", "out", "the run's folder"),
    ("ckpt", "latest", "latest (ckpt.pt) | best (best.pt: the weights of the run's best eval)"),
    ("start", "", "the prompt: text, or a problem like '12 x 34' (empty: a few of the task's)"),
    ("num_samples", 1, "continuations per prompt (differ only with --temperature > 0)"),
    ("max_new_tokens", 0, "tokens to add (0 = the task's: an answer, or 64 of text)"),
    ("temperature", 0.0, "0 = greedy (the argmax), else softmax(logits / temperature)"),
    ("top_k", 0, "draw from the k likeliest tokens only (0 = all)"),
    ("seed", 1337, "seeds the draws"),
    ("device", "auto", "auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps"),
    ("tokenizer_file", "", "text: a GPT-2 .tiktoken file (default: the corpus's, from data.py)"),
]
CHOICES = {"ckpt": ("latest", "best")}


def check(cfg):
    for key in ("num_samples", "max_new_tokens", "temperature", "top_k", "seed"):
        if not (math.isfinite(cfg[key]) and cfg[key] >= (key == "num_samples")):
            raise ConfigError(f"--{key}={cfg[key]}: must be " +
                              ("positive" if key == "num_samples" else ">= 0") + " and finite")
    if cfg["seed"] >= 2**63 or cfg["max_new_tokens"] > 2**20 or cfg["num_samples"] > 2**16:
        raise ConfigError("--seed below 2**63, --max_new_tokens at most 2**20 and --num_samples "
                          "at most 65536")
    return cfg


def sample(cfg):
    path = os.path.join(cfg["out_dir"], {"latest": "ckpt.pt", "best": "best.pt"}[cfg["ckpt"]])
    ck = runs.read_checkpoint(path)
    c = gapt.check_saved(ck["config"], path)
    c["tokenizer_file"] = cfg["tokenizer_file"] or c.get("tokenizer_file", "")
    try:
        model = gapt.GPT(gapt.GPTConfig(**{k: c[k] for k in gapt.GPTConfig.__dataclass_fields__}))
        model.load_state_dict(ck["model"])
    except Exception as e:
        raise ConfigError(f"{runs.quoted(path)} is damaged ({type(e).__name__})") from None
    device, ctx, _, _ = gapt.setup_device({**cfg, "dtype": "auto", "compile": "off"})
    model.to(device)
    torch.manual_seed(cfg["seed"])
    try:   # no --start: the examples the run ended with
        prompts = [cfg["start"]] if cfg["start"] else \
            gapt.TASKS[c["task"]].examples(c, gapt.make_data(c, 0, 1)[1])
        for text in prompts:
            with ctx:
                for line in gapt.complete(model, c, text, cfg["num_samples"], cfg["temperature"],
                                          cfg["top_k"], cfg["max_new_tokens"]):
                    print(line, flush=True)
    except (data.DataError, data.Unavailable) as e:
        raise ConfigError(str(e)) from None


def parse_args(argv):
    return gapt.parse_args(argv, FLAGS, CHOICES, __doc__, check)


def main(argv=None):   # gapt.py's: the same one-line errors and exit codes
    return gapt.main(argv, parse_args, sample, __file__)


if __name__ == "__main__":
    sys.exit(main())
