"""Tests for gapt.py, experiments.py and data.py. CPU only; the whole file runs in a few minutes on 2 cores.

    python -m pytest            # everything
    python -m pytest -k mbe     # a part
"""
import errno
import io
import itertools
import json
import logging
import math
import re
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import types
from contextlib import nullcontext, redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils._pytree import tree_flatten
from torch.utils._python_dispatch import TorchDispatchMode

import data
import experiments
import gapt
import report
import runs
import sample

HERE = os.path.dirname(os.path.abspath(__file__))
torch.set_num_threads(1)   # the tests' models are tiny: a second thread only waits (2-3x slower on 2 cores)
TINY = ["--n_layer=3", "--n_head=2", "--n_embd=32", "--batch_size=16", "--log_interval=1"]


def run_gapt(*args, env=None, script=gapt):
    """`python gapt.py ARGS` as a user runs it: (returncode, stdout, stderr). In this process, so the
    imports (torch, dynamo, matplotlib: ~8 s a process) are paid once; with env, in a fresh one. On
    the CPU unless a test names a device (the suite gives the same results on a machine with a GPU)."""
    argv = [*args, *([] if any(a.startswith("--device") for a in args) else ["--device=cpu"])]
    if env is not None:
        return subprocess.run([sys.executable, script.__file__, *argv], capture_output=True,
                              text=True, timeout=240, cwd=HERE, env=env)
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = script.main(argv)
        except SystemExit as e:   # argparse's --help
            code = e.code or 0
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def run_exp(*args, env=None):
    """`python experiments.py ARGS`, as run_gapt."""
    return run_gapt(*args, env=env, script=experiments)


read_log = runs.read_log   # records of one kind from a run directory's log.jsonl

# -----------------------------------------------------------------------------
# matrix-based entropy


def reference_entropy(G, alpha):
    """The definition in float64: Renyi entropy of the eigenvalues of G / tr(G), G (..., N, N)."""
    lam = torch.linalg.eigvalsh(G.double() / G.double().diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None])
    lam = lam.clamp(min=0)
    if alpha == 1:
        return -(lam * torch.log(torch.where(lam > 0, lam, 1.0))).sum(-1)
    return torch.log(lam.pow(alpha).sum(-1)) / (1 - alpha)


def mbe(Z, alpha=2.0):
    """Training's closed form for alpha = 2, the eigenvalue path for other orders."""
    return gapt.matrix_entropy(Z) if alpha == 2 else experiments.renyi_entropy(Z, alpha)


def test_mbe_closed_form_equals_eigenvalue_formula():
    torch.manual_seed(0)
    for N, D in [(8, 16), (8, 4), (5, 32)]:
        Z = torch.randn(N, D) * torch.rand(N, 1)   # unequal norms: not a trivial spectrum
        ref = reference_entropy(Z.double() @ Z.double().T, 2.0).item()
        assert gapt.matrix_entropy(Z).item() == pytest.approx(ref, abs=1e-5)
        assert experiments.renyi_entropy(Z, 2.0).item() == pytest.approx(ref, abs=1e-5)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 3.0])
def test_mbe_other_orders_match_definition(alpha):
    torch.manual_seed(1)
    Z = torch.randn(3, 8, 12)   # a batch of three windows
    got = experiments.renyi_entropy(Z, alpha)
    assert got.shape == (3,)
    ref = reference_entropy(Z.double() @ Z.double().mT, alpha)   # (3,): each window's Gram matrix
    for i in range(3):
        assert got[i].item() == pytest.approx(ref[i].item(), abs=1e-4)


def test_mbe_orders_are_ordered():
    # Renyi entropies decrease with the order: S_0.5 >= S_1 >= S_2 >= S_3
    torch.manual_seed(2)
    Z = torch.randn(8, 6)
    s = [mbe(Z, a).item() for a in (0.5, 1.0, 2.0, 3.0)]
    assert s[0] > s[1] > s[2] > s[3] > 0


def test_mbe_invariants():
    torch.manual_seed(3)
    N = 8
    rank_one = torch.randn(N, 1) @ torch.randn(1, 16)                 # all rows on one line
    orthonormal = torch.linalg.qr(torch.randn(16, N))[0].T            # (N, 16), orthonormal rows
    for alpha in (1.0, 2.0):
        assert mbe(rank_one, alpha).item() == pytest.approx(0.0, abs=1e-4)
        assert mbe(orthonormal, alpha).item() == pytest.approx(math.log(N), abs=1e-5)
    Z = torch.randn(4, N, 16)
    assert torch.allclose(gapt.matrix_entropy(Z), gapt.matrix_entropy(37.0 * Z), atol=1e-5)   # scale invariant
    s = gapt.matrix_entropy(torch.randn(64, N, 3) * 5)
    assert (s >= 0).all() and (s <= math.log(N) + 1e-6).all()


def test_mbe_zero_input_is_zero_with_zero_gradient():
    Z = torch.zeros(2, 8, 16, requires_grad=True)
    for alpha in (2.0, 1.0, 3.0, 0.5):
        s = mbe(Z, alpha)
        s.sum().backward()
        assert torch.equal(s.detach(), torch.zeros(2))
        assert torch.equal(Z.grad, torch.zeros_like(Z)), alpha
        Z.grad = None


def test_mbe_half_precision_input_is_computed_in_float32():
    torch.manual_seed(4)
    Z = torch.randn(8, 32)
    assert gapt.matrix_entropy(Z.bfloat16()).dtype == torch.float32
    assert gapt.matrix_entropy(Z.bfloat16()).item() == pytest.approx(gapt.matrix_entropy(Z).item(), abs=2e-2)


def test_mbe_gradient_descent_compresses():
    # the compression phase relies on this: following -grad(MBE) lowers MBE
    torch.manual_seed(5)
    Z = torch.randn(8, 16, requires_grad=True)
    before = gapt.matrix_entropy(Z).item()
    opt = torch.optim.Adam([Z], lr=0.05)
    for _ in range(100):
        opt.zero_grad()
        gapt.matrix_entropy(Z).backward()
        opt.step()
    assert gapt.matrix_entropy(Z).item() < 0.5 * before


def tf32_round(Z):
    """Z (float32) with its mantissa rounded to TF32's 10 bits: what a GPU's TF32 matmul multiplies."""
    return ((Z.contiguous().view(torch.int32) + 0x1000) & ~0x1FFF).view(torch.float32)


def test_tf32_rounding_of_the_gram_inputs_moves_m_far_below_delta_mbe():
    # on CUDA gapt.py turns TF32 on, so the float32 Gram product rounds its inputs to 10 mantissa bits
    torch.manual_seed(0)
    x = torch.randint(0, 50, (16, 64))
    with torch.no_grad():
        hs = gapt.GPT(gapt.GPTConfig(4, 4, 128, 64, 50, 0.0, True))(x)[2]
    exact = gapt.layer_mbe([h.double() for h in hs], [1, 2], 8)
    rounded = gapt.layer_mbe([tf32_round(h) for h in hs], [1, 2], 8).double()
    assert tf32_round(torch.tensor([1 + 2 ** -12, 1 + 2 ** -10])).tolist() == [1.0, 1 + 2 ** -10]
    assert 0 < (rounded - exact).abs().max() < gapt.DEFAULTS["delta_mbe"] / 100


def test_layer_mbe_windows():
    torch.manual_seed(6)
    h = torch.randn(2, 16, 8)
    by_hand = torch.stack([gapt.matrix_entropy(h[b, w * 8:(w + 1) * 8]) for b in range(2) for w in range(2)]).mean()
    assert gapt.layer_mbe([h], [0], 8).item() == pytest.approx(by_hand.item(), abs=1e-6)
    assert gapt.layer_mbe([h, 2 * h], [0, 1], 8).tolist() == pytest.approx([by_hand.item()] * 2, abs=1e-5)
    with pytest.raises(ValueError, match="not divisible"):
        gapt.layer_mbe([torch.randn(2, 12, 8)], [0], 8)


def test_matrix_entropy_is_the_fork_point_training_uses(monkeypatch):
    # README: change matrix_entropy to change the MBE; here, centring each window changes M in a step
    torch.manual_seed(7)
    model = gapt.IBLM(gapt.GPT(gapt.GPTConfig(3, 2, 32, 16, 20, 0.0, True)), [1], 8)
    x, y = torch.randint(0, 20, (4, 16)), torch.randint(0, 20, (4, 16))
    M = model(x, y, True)[1].item()
    plain = gapt.matrix_entropy
    monkeypatch.setattr(gapt, "matrix_entropy", lambda Z: plain(Z - Z.mean(-2, keepdim=True)))
    assert abs(model(x, y, True)[1].item() - M) > 0.01

# -----------------------------------------------------------------------------
# the GAPT controller (Algorithm 1)


def trace(ctrl, seq):
    return [ctrl.step(ce, mbe) for ce, mbe in seq]


def test_gapt_memorise_until_ce_plateaus():
    g = gapt.GAPT(delta_ce=0.1, p_m=2, p_c=5)
    # 3.0 improves on inf; 2.95 is not > 0.1 better (patience 1); 2.9 likewise (patience 2) -> compress
    assert trace(g, [(3.0, 1.0), (2.95, 1.0), (2.9, 1.0)]) == [1, 1, 2]
    assert (g.E_min, g.M_min, g.s_c) == (math.inf, math.inf, 0)   # both records reset on entering compression


def test_gapt_ce_improvement_threshold_is_strict():
    g = gapt.GAPT(delta_ce=0.5, p_m=2)
    # 2.5 is exactly delta better than 3.0: not an improvement (strict), so patience counts
    assert trace(g, [(3.0, 1.0), (2.5, 1.0)]) == [1, 1] and g.s_m == 1
    g = gapt.GAPT(delta_ce=0.5, p_m=2)
    assert trace(g, [(3.0, 1.0), (2.49, 1.0)]) == [1, 1] and g.s_m == 0


def test_gapt_compression_ends_when_mbe_plateaus():
    g = gapt.GAPT(delta_ce=0.1, delta_mbe=0.1, tau=0.5, p_m=1, p_c=2)
    assert trace(g, [(3.0, 9.0), (3.0, 9.0)]) == [1, 2]              # first step sets E_min, second plateaus
    # in compression: 1.0 improves on inf; 0.95 and 0.9 are not > 0.1 better -> back to memorise
    assert trace(g, [(3.0, 1.0), (3.0, 0.95), (3.0, 0.9)]) == [2, 2, 1]
    assert g.s_m == 0 and g.M_min == 0.9


def test_gapt_compression_ends_on_ce_spike_with_strict_threshold():
    g = gapt.GAPT(delta_ce=0.1, tau=0.5, p_m=1, p_c=100)
    trace(g, [(2.0, 1.0), (2.0, 1.0)])                              # now compressing
    assert g.phase == 2
    assert trace(g, [(2.0, 1.0), (3.0, 1.0)]) == [2, 2]            # 3.0 == 1.5 * 2.0: not a spike (strict)
    assert trace(g, [(3.0001, 1.0)]) == [1]                         # above (1 + tau) * E_min: spike
    assert g.s_m == 0


def test_gapt_mbe_threshold_is_strict_and_cycle_repeats():
    g = gapt.GAPT(delta_ce=1.0, delta_mbe=0.5, tau=10, p_m=1, p_c=1)
    assert trace(g, [(5.0, 0.0), (5.0, 0.0)]) == [1, 2]
    assert trace(g, [(5.0, 2.0)]) == [2]                            # M improves on inf: s_c = 0
    assert trace(g, [(5.0, 1.5)]) == [1]                            # exactly delta_mbe better: not enough
    assert trace(g, [(5.0, 0.0)]) == [2]                            # E_min 5.0 kept: no CE improvement -> compress
    assert g.s_c == 0


def test_gapt_state_dict_round_trip():
    head = [(3.0, 1.0), (2.95, 0.9), (2.94, 0.8), (2.93, 0.7), (2.92, 0.6)]   # ends compressing
    for rest in ([(3.3, 0.6), (2.91, 0.6)],     # a spike over the restored best CE
                 [(2.92, 0.6), (2.92, 0.6)]):   # no gain on the restored best M
        g = gapt.GAPT(delta_ce=0.1, p_m=3, p_c=3)
        trace(g, head)
        assert math.isfinite(g.E_min) and math.isfinite(g.M_min)
        h = gapt.GAPT(delta_ce=0.1, p_m=3, p_c=3)
        h.load_state_dict(json.loads(json.dumps(g.state_dict(), default=str).replace('"inf"', "Infinity")))
        assert trace(h, rest) == trace(g, rest)
        assert h.state_dict() == g.state_dict()


def test_iblm_loss_by_phase():
    ce, m = torch.tensor(2.0), torch.tensor(0.5)
    assert gapt.iblm_loss(ce, m, 1, 3.0).item() == 2.0
    assert gapt.iblm_loss(ce, m, 2, 3.0).item() == 3.5

# -----------------------------------------------------------------------------
# the model


def test_gpt2_small_parameter_count_and_names():
    with torch.device("meta"):   # no memory: shapes only
        model = gapt.GPT(gapt.GPTConfig(12, 12, 768, 1024, 50257, 0.0, True))
    assert model.num_params() == 124_439_808
    names = dict(model.named_parameters())
    for n in ("transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.attn.c_attn.weight",
              "transformer.h.11.mlp.c_fc.bias", "transformer.ln_f.weight"):
        assert n in names
    assert model.lm_head.weight is model.transformer.wte.weight


def test_residual_projection_init_is_scaled():
    torch.manual_seed(0)
    model = gapt.GPT(gapt.GPTConfig(8, 2, 64, 16, 50, 0.0, True))
    std = model.transformer.h[0].mlp.c_proj.weight.std().item()
    assert std == pytest.approx(0.02 / math.sqrt(16), rel=0.1)
    assert model.transformer.h[0].mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.1)


def test_model_is_causal_and_returns_every_block():
    torch.manual_seed(0)
    model = gapt.GPT(gapt.GPTConfig(3, 2, 32, 16, 20, 0.0, True)).eval()
    x = torch.randint(0, 20, (2, 16))
    x2 = x.clone()
    x2[:, 10:] = (x2[:, 10:] + 1) % 20                               # change the future only
    logits, loss, hs = model(x)
    logits2, _, hs2 = model(x2)
    assert loss is None and logits.shape == (2, 16, 20)
    assert len(hs) == 3 and all(h.shape == (2, 16, 32) for h in hs)
    assert torch.allclose(logits[:, :10], logits2[:, :10], atol=1e-6)
    assert not torch.allclose(logits[:, 10:], logits2[:, 10:])
    assert torch.allclose(hs[1][:, :10], hs2[1][:, :10], atol=1e-6)


@pytest.mark.skipif(not torch._dynamo.is_dynamo_supported(), reason="torch.compile is not supported here")
def test_compiled_model_gives_the_eager_compression_step():
    # torch.compile (on by default on CUDA) traces the GPT and its MBE as one graph, one per phase.
    # aot_eager: dynamo and AOT autograd, no C++ compiler needed.
    torch.manual_seed(0)
    eager = gapt.GPT(gapt.GPTConfig(3, 2, 32, 16, 20, 0.0, True))
    twin = gapt.GPT(gapt.GPTConfig(3, 2, 32, 16, 20, 0.0, True))
    twin.load_state_dict(eager.state_dict())
    compiled = torch.compile(gapt.IBLM(twin, [1, 2], 8), backend="aot_eager")
    x, y = torch.randint(0, 20, (4, 16)), torch.randint(0, 20, (4, 16))

    def step(model, phase):   # train()'s forward, IBLM loss and backward
        ce, M = model(x, y, phase == gapt.COMPRESS)
        gapt.iblm_loss(ce, M, phase, 1.0).backward()
        return torch.stack([ce.detach(), M.detach()])
    for phase in (gapt.MEMORIZE, gapt.COMPRESS):
        got, want = step(compiled, phase), step(gapt.IBLM(eager, [1, 2], 8), phase)
        assert torch.allclose(got, want, atol=1e-5)
        for (name, p), q in zip(eager.named_parameters(), twin.parameters()):
            assert torch.allclose(p.grad, q.grad, atol=1e-5), (phase, name)
        eager.zero_grad(), twin.zero_grad()


def test_overfits_one_batch_and_compression_lowers_mbe():
    torch.manual_seed(0)
    A = data.Arithmetic(0, 24)
    x, y = A.batch(8)
    model = gapt.GPT(gapt.GPTConfig(3, 2, 64, 24, data.ARITH_VOCAB, 0.0, True))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    mbe0 = gapt.layer_mbe(model(x, y)[2], [1], 8).item()
    for _ in range(150):
        _, ce, hs = model(x, y)
        loss = gapt.iblm_loss(ce, gapt.layer_mbe(hs, [1], 8).mean(), 2, 1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    _, ce, hs = model(x, y)
    assert ce.item() < 0.05
    assert gapt.layer_mbe(hs, [1], 8).item() < mbe0

# -----------------------------------------------------------------------------
# the arithmetic task


def test_arithmetic_encoding_and_answer_mask():
    x, y = data.arith_encode(np.array([12]), np.array([34]), 24, reverse=False)
    assert data.arith_decode(x[0]) == "<bos>12 x 34 = 408<eos>"
    answer = [data.ARITH_ITOS[int(t)] for t in y[0] if t > 2]
    assert "".join(answer) == "408" and (y[0] == data.EOS).sum() == 1
    assert (y[0][:8] == -1).all()                                    # no loss on the prompt
    x, _ = data.arith_encode(np.array([12]), np.array([34]), 24, reverse=True)
    assert data.arith_decode(x[0]) == "<bos>12 x 34 = 804<eos>"
    with pytest.raises(ValueError, match="block_size"):
        data.arith_encode(np.array([123456]), np.array([654321]), 16, reverse=False)


def test_arithmetic_splits_are_fixed_and_held_out():
    A, B = data.Arithmetic(0, 32, (1, 2), (3, 3)), data.Arithmetic(1, 32, (1, 2), (3, 3))
    assert torch.equal(A.eval_sets()["id"][0], B.eval_sets()["id"][0])      # same test set for every seed
    assert not torch.equal(A.batch(64)[0], B.batch(64)[0])                   # different training streams
    held = set(map(tuple, A.id_ab.T.tolist()))
    for _ in range(20):
        x, _ = A.batch(256)
        seen = {tuple(int(v) for v in data.arith_decode(r).split(" = ")[0][5:].split(" x ")) for r in x}
        assert not seen & held
    ood = data.Arithmetic(0, 40, (1, 3), (4, 6)).ood_ab                      # the paper's split is reachable
    assert ood.min() >= 1000 and ood.max() < 10**6


def test_arithmetic_state_round_trip():
    A = data.Arithmetic(0, 24)
    A.batch(10)
    s = A.state_dict()
    first = A.batch(10)[0]
    A.load_state_dict(s)
    assert torch.equal(A.batch(10)[0], first)


def test_exact_match_equals_greedy_decoding():
    torch.manual_seed(0)
    A = data.Arithmetic(0, 24)
    model = gapt.GPT(gapt.GPTConfig(2, 2, 32, 24, data.ARITH_VOCAB, 0.0, True))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(300):   # a half-trained model: some answers right, some wrong
        _, ce, _ = model(*A.batch(64))
        opt.zero_grad()
        ce.backward()
        opt.step()
    x, y = A.eval_sets()["id"]
    x, y = x[:64], y[:64]
    cfg = {"n_layer": 2, "patch_size": 8, "layers": [0, 1]}
    fast = gapt.evaluate(model.eval(), [(x, y)], cfg, "cpu", gapt.nullcontext())["acc"]
    slow = 0
    for xi, yi in zip(x, y):                                          # real greedy decoding
        start = int((yi >= 0).nonzero()[0])
        seq = xi[:start + 1].tolist()
        while len(seq) < 24 and seq[-1] != data.EOS:
            seq.append(int(model(torch.tensor([seq]))[0][0, -1].argmax()))
        want = xi[:start + 1].tolist() + yi[start:][yi[start:] >= 0].tolist()
        slow += seq[:len(want)] == want
    assert 0 < slow < 64 and fast == slow / 64

# -----------------------------------------------------------------------------
# the command line


def test_help_lists_every_flag():
    r = run_gapt("--help")
    assert r.returncode == 0
    for key in gapt.DEFAULTS:
        assert f"--{key}" in r.stdout
    assert "--compare" not in r.stdout and "--bench" not in r.stdout   # experiments.py's
    r = run_exp("--help")                                              # its own flags first
    assert r.returncode == 0 and r.stdout.index("--compare") < r.stdout.index("--task")
    assert all(f"--{key}" in r.stdout for key in gapt.DEFAULTS) and "forgetting" in r.stdout


@pytest.mark.parametrize("args", [["--compare=memorize,gapt", "--seeds=3"], ["--bench"],
                                  ["--task=forgetting", "--max_iters=5"], ["--seeds=2"]])
def test_gapt_names_the_experiments_command_for_its_flags(args, capsys):
    assert gapt.main(["--device=cpu", *args]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {args[0]} runs in experiments.py: python experiments.py --device=cpu {' '.join(args)}\n"


def test_experiments_alone_names_what_it_runs(capsys):
    assert experiments.main(["--max_iters=1"]) == 2
    assert "python gapt.py" in capsys.readouterr().err


@pytest.mark.parametrize("args,msg", [
    (["--nope=1"], "unknown flag --nope"),
    (["--p_m=abc"], "invalid int value"),
    (["--p_m=1.5"], "invalid int value"),
    (["--task=poetry"], "invalid choice"),
    (["--bias=maybe"], "invalid boolean value"),
    (["--phase_mode=sleep"], "invalid choice"),
    (["--p_m=0"], "must be positive"),
    (["--p_c=-1"], "must be positive"),
    (["--batch_size=0"], "must be positive"),
    (["--max_iters=0"], "must be positive"),
    (["--tau=-0.1"], "must be >= 0"),
    (["--delta_ce=nan"], "finite"),
    (["--learning_rate=inf"], "finite"),
    (["--block_size=20"], "not divisible by --patch_size"),
    (["--device=cuda:999"], "no such device"),
    (["--device=tpu"], "--device=tpu"),
    (["--init_from=resume"], "no checkpoint"),
    (["--task=text", "--data_dir=nowhere"], "python data.py"),
    (["stray"], "unexpected argument"),
    (["--beta2=1.5"], "must be in [0, 1)"),
    (["--block_size=8"], "needs --block_size >= 19"),
    (["--digits_max=1", "--n_eval=2000"], "smaller --n_eval"),
    (["--ood_digits_min=2"], "--digits_max < --ood_digits_min"),   # OOD problems would be trained on
    (["--compare=gapt,gapt"], "each once"),                        # each seed twice, counted twice
    (["--optimizer=muon", "--muon_lr=1e300"], "--muon_lr"),        # Muon's own overflow traceback
    (["--task=forgetting", "--init_from=resume"], "no --init_from"),
    (["--task=forgetting", "--device=cuda"], "on the CPU"),
    (["--seed=-1"], "must be >= 0"),
    (["--weights=/nonexistent"], "--weights is read by --init_from=gpt2"),   # trained from scratch
    (["--dist_timeout=99999999999999"], "--dist_timeout"),                  # timedelta's overflow
])
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, capsys, args, msg):
    out = tmp_path / "run"
    main = experiments.main if any(a.startswith(gapt.ELSEWHERE["experiments.py"]) for a in args) else gapt.main
    code, err = main(["--device=cpu", *args, f"--out_dir={out}"]), capsys.readouterr().err   # as a user runs it
    assert code == 2, err
    assert msg in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


def test_unusable_output_paths_are_one_line_errors(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("keep")
    for args, flag in (([f"--out_dir={afile}"], "--out_dir"), ([f"--out_dir={afile / 'sub'}"], "--out_dir"),
                       (["--out_dir="], "--out_dir"), (["--compare=memorize", f"--out_dir={afile}"], "--out_dir"),
                       (["--compare=memorize", f"--out_dir={tmp_path / 'cmp'}", f"--fig={afile / 'x.png'}"], "--fig"),
                       (["--compare=memorize", f"--out_dir={tmp_path / 'cmp'}", "--block_size=8"], "--block_size"),
                       (["--compare=memorize", f"--out_dir={tmp_path / 'cmp'}", f"--fig={tmp_path / 'f.txt'}"],
                        "--fig")):                                   # not after every run, as a traceback
        seeds = ["--seeds=1"] if "--compare" in args[0] else []
        main = experiments.main if seeds else gapt.main
        code, err = main(["--device=cpu", *TINY, "--max_iters=2", *seeds, *args]), capsys.readouterr().err
        assert code == 2 and err.startswith("error: ") and flag in err and len(err.strip().splitlines()) == 1, err
    assert afile.read_text() == "keep" and not (tmp_path / "cmp").exists()   # no comparison started


def test_fresh_run_moves_an_earlier_runs_files_aside(tmp_path):
    # else --init_from=resume would pair the arithmetic checkpoint with the toy's log
    out = tmp_path / "run"
    assert run_gapt(*TINY, "--max_iters=4", "--eval_interval=2", f"--out_dir={out}").returncode == 0
    assert (out / "ckpt.pt").exists()
    r = run_exp("--task=forgetting", "--max_iters=20", f"--out_dir={out}")
    assert r.returncode == 0 and "kept in" in r.stdout and not (out / "ckpt.pt").exists(), r.stderr
    assert runs.read_checkpoint(out / "earlier" / "1" / "ckpt.pt")["step"] == 4   # kept, not lost
    r = run_gapt(*TINY, "--init_from=resume", "--max_iters=6", f"--out_dir={out}")
    assert r.returncode == 2 and "no checkpoint" in r.stderr


def test_fresh_compare_moves_every_arms_run_aside_before_its_first_run(tmp_path, monkeypatch):
    # stopped after its first run, a fresh comparison must not leave an earlier one's runs to resume
    out = tmp_path / "cmp"
    for d in ("memorize_seed0", "gapt_seed0"):
        (out / d).mkdir(parents=True)
        (out / d / "ckpt.pt").write_bytes(b"an earlier comparison's")
    runs = []

    def stop_after_one(cfg):
        runs.append(cfg["out_dir"])
        if len(runs) > 1:
            raise KeyboardInterrupt
    monkeypatch.setattr(experiments, "forgetting", stop_after_one)
    with pytest.raises(KeyboardInterrupt):
        experiments.compare(experiments.parse_args(["--task=forgetting", "--compare=memorize,gapt", "--seeds=1", f"--out_dir={out}"]))
    assert len(runs) == 2
    for d in ("memorize_seed0", "gapt_seed0"):
        assert not (out / d / "ckpt.pt").exists() and (out / "earlier/1" / d / "ckpt.pt").exists()


def test_grad_scaler_survives_a_skipped_step():
    # with fp16 a non-finite CE or M skips the update; the scaler must still be ready for the next step
    model = torch.nn.Linear(2, 1)
    opt, scaler = torch.optim.SGD(model.parameters(), lr=0.1), torch.amp.GradScaler("cpu", init_scale=4.0)
    cfg = {"grad_clip": 1.0}
    for ce, stepped in ((float("nan"), False), (1.0, True)):
        scaler.scale(model(torch.ones(1, 2)).sum()).backward()
        assert bool(gapt.update(model, [opt], scaler, cfg, torch.tensor([ce, 0.5, 1.0]))[4]) is stepped
        assert all(p.grad is None for p in model.parameters())


def test_parse_accepts_int_for_float_and_bools():
    cfg = gapt.parse_args(["--tau=1", "--bias=false", "--reverse_answer"])
    assert cfg["tau"] == 1.0 and isinstance(cfg["tau"], float)
    assert cfg["bias"] is False and cfg["reverse_answer"] is True


def test_few_step_run_switches_phases_and_logs(tmp_path):
    out = tmp_path / "run"
    r = run_gapt(*TINY, "--max_iters=60", "--p_m=3", "--p_c=3", "--delta_ce=0.05", "--tau=10",
                 "--eval_interval=30", "--align_interval=20", f"--out_dir={out}")
    assert r.returncode == 0, r.stderr
    assert "compress" in r.stdout and "eval" in r.stdout and "done: 60 steps" in r.stdout
    train = read_log(out, "train")
    assert [t["step"] for t in train] == list(range(1, 61))
    phases = [t["phase"] for t in train]
    assert any(a == 1 and b == 2 for a, b in zip(phases, phases[1:]))
    assert any(a == 2 and b == 1 for a, b in zip(phases, phases[1:]))
    assert all(set(t) == {"kind", "step", "phase", "ce", "mbe", "lr", "ms", "tok_s"} for t in train)
    ev = read_log(out, "eval")
    assert [e["step"] for e in ev] == [0, 30, 60]
    assert len(ev[-1]["id_mbe_layers"]) == 3 and 0 <= ev[-1]["ood_acc"] <= 1
    assert len(read_log(out, "align")) == 3
    assert (out / "curves.png").stat().st_size > 0 and (out / "ckpt.pt").exists()
    assert json.loads((out / "config.json").read_text())["p_m"] == 3


def test_memorize_mode_never_compresses_and_compress_mode_always(tmp_path):
    for mode, want in (("memorize", {1}), ("compress", {2})):
        out = tmp_path / mode
        r = run_gapt(*TINY, "--max_iters=20", "--p_m=1", "--eval_interval=0", f"--phase_mode={mode}", f"--out_dir={out}")
        assert r.returncode == 0, r.stderr
        assert {t["phase"] for t in read_log(out, "train")} == want

# -----------------------------------------------------------------------------
# reliability: exact resume, DDP, non-finite losses

STEADY = [*TINY, "--p_m=3", "--p_c=3", "--delta_ce=0.05", "--tau=10", "--dropout=0.1",
          "--warmup_iters=0", "--learning_rate=3e-3", "--min_lr=3e-3"]   # constant lr: the schedule ignores max_iters


def without_timing(records):
    return [{k: v for k, v in r.items() if k not in ("ms", "tok_s")} for r in records]


def test_resume_reproduces_uninterrupted_run(tmp_path):
    a, b = tmp_path / "straight", tmp_path / "resumed"
    assert run_gapt(*STEADY, "--max_iters=40", "--eval_interval=20", f"--out_dir={a}").returncode == 0
    assert run_gapt(*STEADY, "--max_iters=20", "--eval_interval=20", f"--out_dir={b}").returncode == 0
    r = run_gapt(*STEADY, "--max_iters=40", "--eval_interval=20", f"--out_dir={b}", "--init_from=resume")
    assert r.returncode == 0, r.stderr
    straight, resumed = without_timing(read_log(a, "train")), without_timing(read_log(b, "train"))
    assert len(straight) == len(resumed) == 40
    assert {t["phase"] for t in straight} == {1, 2}                  # the controller state was resumed too
    assert straight == resumed                                       # same CE, MBE and phase at every step
    assert without_timing(read_log(a, "eval")) == without_timing(read_log(b, "eval"))
    ck = runs.read_checkpoint(b / "ckpt.pt")
    assert ck["step"] == 40 and not any(k.startswith("_orig_mod") for k in ck["model"])


def test_resume_drops_log_lines_after_the_checkpoint(tmp_path):
    out = tmp_path / "run"
    assert run_gapt(*STEADY, "--max_iters=10", "--eval_interval=5", f"--out_dir={out}").returncode == 0
    ck = runs.read_checkpoint(out / "ckpt.pt")
    ck["step"] = 5                                                   # as if killed after the step-5 checkpoint
    runs.save_checkpoint(str(out / "ckpt.pt"), ck)
    r = run_gapt(*STEADY, "--max_iters=10", "--eval_interval=5", f"--out_dir={out}", "--init_from=resume")
    assert r.returncode == 0, r.stderr
    assert [t["step"] for t in read_log(out, "train")] == list(range(1, 11))


def test_damaged_checkpoint_is_one_line_error(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "ckpt.pt").write_bytes(b"not a checkpoint")
    r = run_gapt(*TINY, f"--out_dir={out}", "--init_from=resume")
    assert r.returncode == 2 and "damaged" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert (out / "ckpt.pt").read_bytes() == b"not a checkpoint"


def test_non_finite_losses_stop_and_keep_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "run"
    assert run_gapt(*STEADY, "--max_iters=10", "--eval_interval=10", f"--out_dir={out}").returncode == 0
    good = (out / "ckpt.pt").read_bytes()
    r = run_gapt(*STEADY, "--max_iters=40", "--eval_interval=5", "--learning_rate=1e30", "--min_lr=1e30",
                 "--grad_clip=0", f"--out_dir={out}", "--init_from=resume")
    assert r.returncode == 1 and "consecutive non-finite" in r.stderr and "Traceback" not in r.stderr
    skips = read_log(out, "skip")
    assert len(skips) == 3 and all(not math.isfinite(s["ce"]) for s in skips)
    assert (out / "ckpt.pt").read_bytes() == good                   # never overwritten by a poisoned model


def test_many_accumulation_steps_keep_the_phase_check_exact(tmp_path):
    # the phase averaged over 42 micro-batches in float32 was 2.0000012: "processes disagree" in one
    r = run_gapt(*TINY, "--phase_mode=compress", "--batch_size=1", "--total_batch_size=1008",
                 "--max_iters=2", "--n_eval=64", "--eval_interval=0", f"--out_dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    assert "42 accumulation steps" in r.stdout and len(read_log(tmp_path, "train")) == 2
    assert all(t["ce"] < 4 for t in read_log(tmp_path, "train"))   # a mean over micro-batches (log 16 = 2.8)


def test_nan_representations_give_nan_mbe():
    Z = torch.randn(8, 4)
    Z[0, 0] = float("nan")
    assert math.isnan(gapt.matrix_entropy(Z).item())


def test_ddp_two_cpu_processes_agree_on_phases(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(HERE, "gapt.py"), "--device=cpu", *TINY, "--batch_size=8", "--total_batch_size=768", "--max_iters=30",
           "--p_m=3", "--p_c=3", "--delta_ce=0.05", "--tau=10", "--eval_interval=15", f"--out_dir={out}"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=HERE)
    assert r.returncode == 0, r.stderr[-2000:]
    # the ranks leave the process group together, at the end: no rank aborts after a finished run
    assert "terminate called" not in r.stderr and "SIGABRT" not in r.stderr
    assert "processes 2" in r.stdout and "2 accumulation steps" in r.stdout
    assert r.stdout.count("done: 30 steps") == 1                     # only rank 0 prints
    phases = [t["phase"] for t in read_log(out, "train")]
    assert len(phases) == 30 and 1 in phases and 2 in phases
    ck = runs.read_checkpoint(out / "ckpt.pt")
    assert len(ck["ranks"]) == 2 and ck["ranks"][0]["data"] != ck["ranks"][1]["data"]

# -----------------------------------------------------------------------------
# data.py: token shards, FineWeb and own-text preparation (offline)

TOKENIZER = Path(os.environ.get("GAPT_TOKENIZER_FILE")
                 or Path(__file__).resolve().parent.parent / "shared" / "data" / "gpt2.tiktoken")
EOT_TEXT = "<|endoftext|>"


def tokenizer_file():
    if not TOKENIZER.is_file():
        pytest.skip(f"no GPT-2 tokenizer file at {TOKENIZER}")
    return str(TOKENIZER)


def run_data(*args, env=None):
    """`python data.py ARGS` in a fresh process: (exit code, stdout, stderr)."""
    r = subprocess.run([sys.executable, data.__file__, *map(str, args)], capture_output=True, text=True,
                       timeout=120, env=env)
    return r.returncode, r.stdout, r.stderr


def corpus(n_docs, seed=0):
    """Documents of made-up sentences, with a non-ASCII word so bytes and tokens differ."""
    rng = np.random.default_rng(seed)
    words = "the a model learns forgets compresses tokens data entropy naïve 42 phase cycle".split()
    return [" ".join(rng.choice(words, size=rng.integers(5, 30))).capitalize() + "." for _ in range(n_docs)]


def all_tokens(out_dir):
    """Every token of a data directory, val shard first, as one array."""
    return np.concatenate([data.read_shard(p) for p in data.find_shards(out_dir, "val")
                           + data.find_shards(out_dir, "train")])


def test_shard_round_trip(tmp_path):
    path = tmp_path / "x_train_000001.bin"
    tokens = np.array([0, 1, 50256, 2**16 - 1, 7])
    data.write_shard(path, tokens)
    assert np.array_equal(data.read_shard(path), tokens) and data.read_shard(path).dtype == np.uint16
    header = np.fromfile(path, dtype=np.int32, count=3)
    assert header.tolist() == [20240520, 1, 5] and path.stat().st_size == 256 * 4 + 5 * 2
    assert os.listdir(tmp_path) == [path.name]                     # no temp file left behind
    with pytest.raises(ValueError):
        data.write_shard(tmp_path / "y.bin", [2**16])              # would wrap around in uint16
    assert not (tmp_path / "y.bin").exists()


@pytest.mark.parametrize("damage, message", [("magic", "magic"), ("version", "version"), ("truncate", "truncated")])
def test_corrupt_shard_is_named(tmp_path, damage, message):
    path = tmp_path / f"bad_{damage}_train_000001.bin"
    data.write_shard(path, np.arange(100))
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        raw = raw[:-2]
    else:
        raw[0 if damage == "magic" else 4] += 1
    path.write_bytes(raw)
    with pytest.raises(ValueError, match=message) as e:
        data.read_shard(path)
    assert str(path) in str(e.value)


def test_tokenizer_from_file():
    enc = data.get_tokenizer(tokenizer_file())
    assert enc.encode_ordinary("hello world") == [31373, 995]
    assert enc.encode(EOT_TEXT, allowed_special="all") == [50256] and enc.n_vocab == 50257


def test_bad_tokenizer_file(tmp_path):
    (tmp_path / "bad.tiktoken").write_text("not base64 ranks\n")
    for path in (tmp_path / "bad.tiktoken", tmp_path / "missing.tiktoken"):
        with pytest.raises(data.DataError, match="tokenizer file"):
            data.get_tokenizer(path)
    cut = tmp_path / "cut.tiktoken"   # its workers crashed on a merge it lacks and the pool hung
    cut.write_bytes(b"".join(Path(tokenizer_file()).read_bytes().splitlines(keepends=True)[:100]))
    with pytest.raises(data.DataError, match="not GPT-2's"):
        data.get_tokenizer(cut)


def test_tokenizer_pool_reads_a_stream_only_as_fast_as_it_is_used():
    pulled = []

    def stream():                                                # an endless FineWeb
        for i in itertools.count():
            pulled.append(i)
            yield f"document {i}"
    tokens = data.tokenize_documents(stream(), tokenizer_file(), chunk=8)
    first = [next(tokens) for _ in range(10)]                    # Pool.imap read on without end
    assert [data.get_tokenizer(tokenizer_file()).decode(t[1:].tolist()) for t in first] == \
        [f"document {i}" for i in range(10)]
    assert len(pulled) <= 3 * 8                                  # this chunk and the next, read ahead
    tokens.close()


def test_tokenize_prepends_eot():
    docs = ["hello world", "naïve café ☕ 🎉", "line\n\nbreaks  and   spaces"]
    enc = data.get_tokenizer(tokenizer_file())
    for doc, tokens in zip(docs, data.tokenize_documents(docs, tokenizer_file()), strict=True):
        ids = enc.encode_ordinary(doc)
        assert max(ids) < 2**16 and tokens.dtype == np.uint16
        assert tokens.tolist() == [50256] + ids                    # nothing wrapped around
        assert enc.decode(tokens.tolist()) == EOT_TEXT + doc


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    """`python data.py text` on a small corpus, in its own process: (data dir, documents)."""
    tmp = tmp_path_factory.mktemp("text")
    docs = corpus(60)
    (tmp / "a.txt").write_text("\n\n".join(docs[:40]) + "\n")
    (tmp / "b.jsonl").write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs[40:])))
    code, out, err = run_data("text", tmp / "a.txt", tmp / "b.jsonl", "--out", tmp / "shards", "--shard_size", 300,
                              "--tokenizer_file", tokenizer_file())
    assert code == 0, err
    return tmp / "shards", docs


def test_text_cli(text_dir):
    out_dir, docs = text_dir
    val, train = data.find_shards(out_dir, "val"), data.find_shards(out_dir, "train")
    assert [Path(p).name for p in val] == ["text_val_000000.bin"] and len(train) >= 3
    assert Path(train[0]).name == "text_train_000001.bin"
    enc = data.get_tokenizer(tokenizer_file())
    n_val, n_all = len(data.read_shard(val[0])), len(all_tokens(out_dir))
    assert abs(n_val - 0.1 * n_all) <= 1                           # the default --val_fraction
    assert data.read_shard(val[0])[:20].tolist() == ([50256] + enc.encode_ordinary(docs[0]))[:20]
    # every document once, in order, each after an <|endoftext|>, across the shard boundaries
    assert enc.decode(all_tokens(out_dir).tolist()) == "".join(EOT_TEXT + d for d in docs)


def test_rewriting_shards_removes_stale_ones_and_refuses_another_corpus(tmp_path, capsys):
    out = tmp_path / "out"
    (tmp_path / "long.txt").write_text("\n\n".join(corpus(200)))
    (tmp_path / "short.txt").write_text("hello big world\n")
    assert data.main(["text", str(tmp_path / "long.txt"), "--out", str(out), "--shard_size", "500",
                      "--tokenizer_file", tokenizer_file()]) == 0
    assert len(data.find_shards(out, "train")) >= 3
    assert data.main(["text", str(tmp_path / "short.txt"), "--out", str(out), "--tokenizer_file", tokenizer_file()]) == 0
    assert "older shards removed" in capsys.readouterr().out
    assert [Path(p).name for p in data.find_shards(out, "train")] == ["text_train_000001.bin"]
    assert len(all_tokens(out)) == 4                                # <|endoftext|> hello big world, nothing older
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    real_write = data.write_shard

    def stop_at_train(path, tokens):                               # a rewrite stopped after the val shard
        if "_train_" in str(path):
            raise KeyboardInterrupt
        real_write(path, tokens)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(data, "write_shard", stop_at_train)
        assert data.main(["text", str(tmp_path / "long.txt"), "--out", str(out), "--tokenizer_file",
                          tokenizer_file()]) == 130                # Ctrl-C: one line, exit 130
    assert "stopped (Ctrl-C)" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before   # the earlier corpus, whole
    (out / "fineweb_train_000001.bin").write_bytes(b"")
    assert data.main(["text", str(tmp_path / "short.txt"), "--out", str(out), "--tokenizer_file", tokenizer_file()]) == 2
    one_line_error(2, capsys.readouterr().err, 2, "another corpus")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name in before} == before
    assert data.main(["text", str(tmp_path / "short.txt"), "--out", str(tmp_path / "short.txt" / "x"),
                      "--tokenizer_file", tokenizer_file()]) == 2
    one_line_error(2, capsys.readouterr().err, 2, "cannot make this folder")
    code, _, err = run_data("text", tmp_path / "short.txt", "--shard_size", "abc")
    one_line_error(code, err, 2, "--shard_size")


def test_token_shards_batches(text_dir):
    out_dir, _ = text_dir
    T = 16
    ds = data.TokenShards(out_dir, T, seed=0)
    x, y = ds.batch(32)
    assert x.shape == y.shape == (32, T) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])                        # y is x shifted by one
    windows = {tuple(s[i:i + T + 1]) for s in map(data.read_shard, data.find_shards(out_dir, "train"))
               for i in range(len(s) - T)}
    assert all(tuple(row) in windows for row in torch.cat([x, y[:, -1:]], 1).tolist())   # from train shards
    assert torch.equal(data.TokenShards(out_dir, T, seed=0).batch(32)[0], x)             # seeded
    assert not torch.equal(data.TokenShards(out_dir, T, seed=0, rank=1, world_size=2).batch(32)[0], x)
    assert not torch.equal(ds.batch(32)[0], x)


def test_token_shards_resume(text_dir, tmp_path):
    out_dir, _ = text_dir
    ds = data.TokenShards(out_dir, 16, seed=0)
    ds.batch(8)
    torch.save({"data": ds.state_dict()}, tmp_path / "ckpt.pt")    # as a checkpoint would carry it
    expected = ds.batch(8)
    resumed = data.TokenShards(out_dir, 16, seed=123)
    resumed.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True)["data"])
    assert all(torch.equal(a, b) for a, b in zip(resumed.batch(8), expected))


def test_val_batches_fixed(text_dir):
    out_dir, _ = text_dir
    ds = data.TokenShards(out_dir, 16, seed=0)
    batches = ds.val_batches(64 + 5, batch_size=3)                 # 4 whole windows: batches of 3 and 1
    assert [tuple(x.shape) for x, _ in batches] == [(3, 16), (1, 16)]
    val = torch.from_numpy(data.read_shard(data.find_shards(out_dir, "val")[0])[:65].astype(np.int64))
    assert torch.equal(torch.cat([x for x, _ in batches]).flatten(), val[:64])
    assert torch.equal(torch.cat([y for _, y in batches]).flatten(), val[1:65])
    ds.batch(4)
    other = data.TokenShards(out_dir, 16, seed=1, rank=1, world_size=2).val_batches(69, 3)
    assert all(torch.equal(a, b) for p, q in zip(ds.val_batches(69, 3), other) for a, b in zip(p, q))
    with pytest.raises(ValueError, match="val"):
        ds.val_batches(10**6, 8)


def test_token_shards_edges(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"python data.py fineweb --shards 10 --out {tmp_path}"):
        data.TokenShards(tmp_path, 16, seed=0)
    data.write_shard(tmp_path / "t_val_000000.bin", np.arange(100))
    data.write_shard(tmp_path / "t_train_000001.bin", np.arange(16))
    with pytest.raises(ValueError, match="t_train_000001.bin has 16 tokens"):
        data.TokenShards(tmp_path, 16, seed=0)
    data.write_shard(tmp_path / "t_train_000001.bin", np.arange(17))    # exactly one window fits
    (tmp_path / "t_train_000009.bin").mkdir()                         # a folder is not a shard
    x, y = data.TokenShards(tmp_path, 16, seed=0).batch(8)
    assert torch.equal(x, torch.arange(16).expand(8, 16)) and torch.equal(y, x + 1)


FINEWEB_COLUMNS = {"id": "<urn:uuid:0>", "dump": "CC-MAIN-2013-20", "url": "https://example.com", "date": "2013-05-18",
                   "file_path": "s3://commoncrawl/x.warc.gz", "language": "en", "language_score": 0.9, "token_count": 0}


@pytest.mark.parametrize("kind", ["parquet", "jsonl"])
def test_fineweb_local(tmp_path, kind):
    docs, path = corpus(40, seed=1), tmp_path / f"fineweb.{kind}"
    rows = [{"text": d, **FINEWEB_COLUMNS} for d in docs]
    if kind == "parquet":
        pq = pytest.importorskip("pyarrow.parquet")
        pq.write_table(pytest.importorskip("pyarrow").Table.from_pylist(rows), path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out_dir = tmp_path / "fw"
    assert data.main(["fineweb", "--local", str(path), "--shards", "2", "--shard_size", "100",
                      "--out", str(out_dir), "--tokenizer_file", tokenizer_file()]) == 0
    assert sorted(os.listdir(out_dir)) == ["fineweb_train_000001.bin", "fineweb_train_000002.bin",
                                           "fineweb_val_000000.bin", "gpt2.tiktoken"]   # its tokenizer   # --shards 2 stops at 2 full ones
    tokens = all_tokens(out_dir)
    enc = data.get_tokenizer(tokenizer_file())
    assert len(tokens) == 300 and tokens[0] == 50256
    assert np.array_equal(tokens, np.concatenate(list(data.tokenize_documents(docs, tokenizer_file())))[:300])
    assert enc.decode(tokens[:50].tolist()).startswith(EOT_TEXT + docs[0][:10])


def one_line_error(code, err, expected_code, *needles):
    assert code == expected_code, err
    assert err.endswith("\n") and err.count("\n") == 1 and err.startswith("error: "), err
    assert "Traceback" not in err and all(n in err for n in needles), err


def test_missing_package_is_one_line(tmp_path):
    script = (f"import sys; sys.modules['datasets'] = None; import data; "
              f"sys.exit(data.main(['fineweb', '--shards', '1', '--out', {str(tmp_path / 'fw')!r}]))")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                       cwd=Path(data.__file__).parent)
    one_line_error(r.returncode, r.stderr, 1, "pip install datasets")
    assert not (tmp_path / "fw").exists()


def test_missing_hub_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    assert data.main(["fineweb", "--cached", "1", "--out", str(tmp_path)]) == 1
    one_line_error(1, capsys.readouterr().err, 1, "pip install huggingface_hub")


def test_offline_is_one_line(tmp_path):
    """A stand-in for `datasets` whose stream breaks as it does when the network goes away:
    the error is raised while the documents are read, mid-stream, and must still end as one line."""
    (tmp_path / "datasets.py").write_text("def load_dataset(*args, **kwargs):\n    yield {'text': 'hi'}\n"
                                          "    raise ConnectionError('Max retries exceeded')\n")
    code, _, err = run_data("fineweb", "--shards", "1", "--out", tmp_path / "fw", "--tokenizer_file",
                            tokenizer_file(), env={**os.environ, "PYTHONPATH": str(tmp_path)})
    one_line_error(code, err, 1, "offline", "ConnectionError")
    assert not list((tmp_path / "fw").glob("*.bin"))


def test_cached_offline_is_one_line(tmp_path, monkeypatch, capsys, caplog):
    def hf_hub_download(local_dir, **kwargs):   # as the real one offline: metadata, warnings, then the error
        os.makedirs(os.path.join(local_dir, ".cache", "huggingface"))
        logging.getLogger("huggingface_hub.utils._http").warning("Retrying in 1s [Retry 1/5].")
        raise ConnectionError("Max retries exceeded")
    hub = types.ModuleType("huggingface_hub")
    hub.hf_hub_download = hf_hub_download
    monkeypatch.setitem(sys.modules, "huggingface_hub", hub)
    assert data.main(["fineweb", "--cached", "1", "--out", str(tmp_path / "fw")]) == 1
    one_line_error(1, capsys.readouterr().err, 1, "offline", "fineweb_val_000000.bin")
    assert not (tmp_path / "fw").exists()                            # nothing left behind
    assert not caplog.records                                        # the hub's retry warnings are not shown


def test_cached_refuses_another_corpus_before_downloading(tmp_path, monkeypatch, capsys):
    hub = types.ModuleType("huggingface_hub")
    hub.hf_hub_download = lambda **kwargs: pytest.fail("downloaded into another corpus's folder")
    monkeypatch.setitem(sys.modules, "huggingface_hub", hub)
    data.write_shard(tmp_path / "text_val_000000.bin", np.arange(10))
    assert data.main(["fineweb", "--cached", "1", "--out", str(tmp_path)]) == 2
    one_line_error(2, capsys.readouterr().err, 2, "another corpus")
    assert [p.name for p in tmp_path.iterdir()] == ["text_val_000000.bin"]
    fw = tmp_path / "fw"
    fw.mkdir()
    (fw / "fineweb_val_000000.bin").write_bytes(b"\0" * 100)             # a cut download, say
    assert data.main(["fineweb", "--cached", "1", "--out", str(fw)]) == 2
    one_line_error(2, capsys.readouterr().err, 2, "fineweb_val_000000.bin", "delete it")


def test_bad_input_is_one_line(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    out = tmp_path / "out"
    for name, needle in [("missing.txt", "no such file"), ("two\nlines.txt", "no such file"),
                         ("empty.txt", "no text"), ("bad.jsonl", "bad.jsonl"), ("latin1.txt", "latin1.txt")]:
        assert data.main(["text", str(tmp_path / name), "--out", str(out)]) == 2
        one_line_error(2, capsys.readouterr().err, 2, needle)
        assert not out.exists()                                    # nothing half-written


def test_fineweb_local_bad_rows(tmp_path, capsys):
    """A bad row fails while the documents are read; it must still end as one line, naming the
    line, and leave nothing (no staging folder, no --out that was not there)."""
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    assert data.main(["fineweb", "--shards", "1", "--local", str(tmp_path / "bad.jsonl"), "--out",
                      str(tmp_path / "out"), "--tokenizer_file", tokenizer_file()]) == 2
    one_line_error(2, capsys.readouterr().err, 2, "bad.jsonl", "line 2 is not JSON")
    assert not (tmp_path / "out").exists()


def test_fineweb_local_too_small_for_a_train_shard(tmp_path, capsys):
    # it wrote a val shard alone, which gapt.py cannot train on, and removed the older train shards
    (tmp_path / "small.jsonl").write_text('{"text": "a few words"}\n')
    out = tmp_path / "out"
    out.mkdir()
    data.write_shard(out / "fineweb_train_000001.bin", np.arange(500))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert data.main(["fineweb", "--shards", "1", "--local", str(tmp_path / "small.jsonl"), "--out",
                      str(out), "--tokenizer_file", tokenizer_file()]) == 2
    one_line_error(2, capsys.readouterr().err, 2, "too few for a val and a train shard")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before   # and no .partial


def test_data_bad_sizes_and_missing_pyarrow_are_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "a.txt").write_text("some text")
    assert data.main(["text", str(tmp_path / "a.txt"), "--shard_size", str(2**31)]) == 2
    one_line_error(2, capsys.readouterr().err, 2, "--shard_size")      # an int32 in the header
    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    assert data.main(["fineweb", "--shards", "1", "--local", str(tmp_path / "x.parquet"),
                      "--out", str(tmp_path / "out")]) == 1            # a missing package, as the others
    one_line_error(1, capsys.readouterr().err, 1, "pip install pyarrow")
    assert not (tmp_path / "out").exists()

# -----------------------------------------------------------------------------
# the catastrophic-forgetting toy


def test_forgetting_data_shapes_and_input_distributions():
    d = data.forgetting_data(0, n_train=4000, n_test=64)
    for t in "ab":
        assert d[f"x{t}"].shape == (4000, 10) and d[f"y{t}"].shape == (4000, 1)
        assert d[f"x{t}_test"].shape == (64, 10) and d[f"y{t}_test"].shape == (64, 1)
    assert len(d) == 8 and all(v.dtype == torch.float32 for v in d.values())
    ones, zeros = torch.ones(5), torch.zeros(5)
    # P1: first half ~ N(1, 0.25^2), second ~ N(0, 0.25^2); P2 the halves swapped
    assert torch.allclose(d["xa"].mean(0), torch.cat([ones, zeros]), atol=0.02)
    assert torch.allclose(d["xb"].mean(0), torch.cat([zeros, ones]), atol=0.02)
    assert torch.allclose(d["xa"].std(0), torch.full((10,), 0.25), atol=0.02)
    assert not torch.equal(d["xa"][:64], d["xa_test"])   # held out: fresh draws, not a copy


def test_forgetting_data_is_seeded_and_m_moves_only_the_targets():
    a, b = data.forgetting_data(3), data.forgetting_data(3)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["ya"], data.forgetting_data(4)["ya"])
    still = data.forgetting_data(3, m=0.0)
    assert torch.equal(a["xa"], still["xa"]) and torch.equal(a["xb_test"], still["xb_test"])
    assert (a["ya"] - still["ya"]).abs().mean() > 0.05 and (a["yb"] - still["yb"]).abs().mean() > 0.05


def test_separation_on_hand_made_groups():
    ha = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])        # mean 0, mean squared distance to it 2
    assert experiments.separation(ha, ha.clone()) == 0.0
    shift = torch.tensor([3.0, 4.0])                       # means 5 apart
    assert experiments.separation(ha, ha + shift) == pytest.approx(5 / math.sqrt(2))   # not 5: var sums over dims
    hb = 3 * ha + shift                                    # spread 18: sqrt((2 + 18) / 2)
    assert experiments.separation(ha, hb) == pytest.approx(5 / math.sqrt(10))
    assert experiments.separation(ha, hb) == pytest.approx(experiments.separation(10 * hb, 10 * ha))   # symmetric, scale-free
    point = torch.zeros(4, 2)
    assert experiments.separation(point, point) == 0.0 and experiments.separation(point, point + 1) == math.inf


def test_forgetting_run_logs_both_tasks_and_eval_metrics(tmp_path):
    # after the first step (any loss beats inf) no step improves L1 by > 1: compress after p_m = 50 more,
    # then never stop (no p_c plateau, no spike)
    r = run_exp("--task=forgetting", "--max_iters=60", "--p_m=50", "--delta_ce=1", "--p_c=1000", "--tau=1000",
                 "--log_interval=20", f"--out_dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    assert "loss_A_after_B" in r.stdout and os.path.exists(tmp_path / "config.json")
    train = read_log(tmp_path, "train")
    assert [r["step"] for r in train] == list(range(1, 121))
    assert [r["task"] for r in train] == ["A"] * 60 + ["B"] * 60
    # the controller runs in both tasks and starts B afresh, in memorisation
    assert [r["phase"] for r in train] == 2 * ([gapt.MEMORIZE] * 51 + [gapt.COMPRESS] * 9)
    (ev,) = read_log(tmp_path, "eval")
    keys = ("loss_A_after_A", "loss_A_after_B", "loss_B", "separation", "mbe_A", "mbe_B")
    assert ev["step"] == 120 and all(math.isfinite(ev[k]) and ev[k] >= 0 for k in keys)
    assert ev["loss_A_after_A"] != ev["loss_A_after_B"]
    assert 0 <= ev["mbe_A"] <= math.log(8) and 0 <= ev["mbe_B"] <= math.log(8)


def test_forgetting_compress_mode_always_compresses(tmp_path):
    r = run_exp("--task=forgetting", "--phase_mode=compress", "--max_iters=20", f"--out_dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    assert {r["phase"] for r in read_log(tmp_path, "train")} == {gapt.COMPRESS}


def test_forgetting_patch_size_must_divide_the_samples(tmp_path, capsys):
    assert experiments.main(["--task=forgetting", "--patch_size=7", f"--out_dir={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err
    assert "--patch_size=7" in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "out")   # rejected before anything is written


def test_compression_lowers_the_hidden_layer_mbe(tmp_path):
    d = data.forgetting_data(0, n_train=64)
    last = {}
    for mode in ("memorize", "compress"):   # same init and data; only the loss differs
        torch.manual_seed(0)
        cfg = dict(gapt.DEFAULTS, phase_mode=mode, max_iters=30, learning_rate=1e-2, mbe_weight=10.0)
        experiments.fit_task(experiments.Student(10, 50), d["xa"], d["ya"], cfg, runs.Logger(str(tmp_path / "log.jsonl")), "A", 0)
        last[mode] = read_log(tmp_path, "train")[-1]["mbe"]
    assert last["compress"] < 0.5 * last["memorize"]


def test_text_task_trains_on_prepared_shards(text_dir, tmp_path):
    shards, _ = text_dir
    out = tmp_path / "run"
    r = run_gapt("--task=text", f"--data_dir={shards}", "--n_layer=2", "--n_head=2", "--n_embd=32",
                 "--block_size=16", "--batch_size=4", "--val_tokens=64", "--max_iters=12", "--eval_interval=6",
                 "--p_m=2", "--p_c=2", "--delta_ce=1", "--tau=10", f"--tokenizer_file={tokenizer_file()}",
                 f"--out_dir={out}")
    assert r.returncode == 0, r.stderr
    ev = read_log(out, "eval")
    assert [e["step"] for e in ev] == [0, 6, 12] and ev[-1]["val_ce"] < ev[0]["val_ce"]
    assert len(ev[-1]["val_mbe_layers"]) == 2 and ev[0]["val_ce"] == pytest.approx(math.log(50304), abs=0.3)
    assert {t["phase"] for t in read_log(out, "train")} == {1, 2}
    assert r.stdout.count("sample:") == 3

# -----------------------------------------------------------------------------
# the benchmark and the MBE formulation it times (no timing asserted)

B, T, P, D = 64, 24, 8, 128          # the default config's batch: (B*T/P, P, P) = (192, 8, 8) Gram blocks


def test_bench_runs_and_prints_one_table(tmp_path):
    r = run_exp("--bench", "--n_layer=4", "--n_head=2", "--n_embd=32", "--batch_size=8", "--bench_steps=2",
                 f"--out_dir={tmp_path / 'out'}")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for line in ("bench: GPT 4 layers x 32", "plain PyTorch", "gapt memorise", "gapt compress", "compress / memorise",
                 "host read lag 0", "MBE share of a step", "closed form vs eigenvalue path", "GPU: none"):
        assert line in out, f"missing '{line}' in:\n{out}"
    assert "(2, 24, 8, 32) windows" in out                       # layers 1 and 2, B*T/P = 8*24/8 windows each
    assert "target" not in out                                   # measurements only: the targets are the README's
    assert not (tmp_path / "out").exists()                          # trains nothing, writes nothing


def test_bench_refuses_the_forgetting_toy():
    r = run_exp("--bench", "--task=forgetting")
    assert r.returncode == 2 and "--bench" in r.stderr and "Traceback" not in r.stderr


def bench_windows(seed=0):
    """(B*T/P, P, D) windows with spectra from flat to nearly rank one."""
    g = torch.Generator().manual_seed(seed)
    n = B * T // P
    low = torch.randn(n, P, 1, generator=g) @ torch.randn(n, 1, D, generator=g)   # rank one per window
    mix = torch.rand(n, 1, 1, generator=g)
    return low + mix * torch.randn(n, P, D, generator=g) * torch.rand(n, P, 1, generator=g)


def test_closed_form_and_eigenvalue_path_agree_on_the_bench_blocks():
    Z = bench_windows()
    G = Z @ Z.transpose(-1, -2)
    assert G.shape == (B * T // P, P, P)
    closed, eig_path = gapt.matrix_entropy(Z), experiments.renyi_entropy(Z, 1.0)
    assert closed.shape == eig_path.shape == (B * T // P,)
    assert torch.allclose(closed.double(), reference_entropy(G, 2.0), atol=1e-5)
    assert torch.allclose(eig_path.double(), reference_entropy(G, 1.0), atol=1e-4)
    assert torch.allclose(experiments.renyi_entropy(Z, 2.0), closed, atol=1e-5)  # the closed form is S_2
    assert closed.min() < 0.5 and closed.max() > 1.5                      # the test spans the range
    assert (eig_path >= closed - 1e-5).all()                              # Renyi orders: S_1 >= S_2


def test_layer_mbe_is_the_mean_windowed_entropy_of_each_layer():
    torch.manual_seed(0)
    hs = [torch.randn(4, T, 16) * (i + 1) for i in range(4)]
    got = gapt.layer_mbe(hs, [1, 3], P)
    want = [gapt.matrix_entropy(hs[i].reshape(-1, P, 16)).mean() for i in (1, 3)]
    assert torch.allclose(got, torch.stack(want), atol=1e-6)
    with pytest.raises(ValueError):
        gapt.layer_mbe([torch.randn(2, T + 1, 16)], [0], P)


class NewTensors(TorchDispatchMode):
    """Records the element count of every tensor an op allocates (views of existing storage are not)."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        self.sizes += [t.numel() for t in tree_flatten(out)[0]
                       if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs]
        return out


@pytest.mark.parametrize("grad", [False, True])
def test_mbe_forms_nothing_larger_than_the_gram_blocks(grad):
    hs = [torch.randn(B, T, D, requires_grad=grad) for _ in range(4)]
    blocks = B * T // P * P * P                                            # one layer's (B*T/P, P, P)
    with torch.set_grad_enabled(grad):
        with NewTensors() as one:
            gapt.matrix_entropy(hs[1].reshape(-1, P, D))
        with NewTensors() as layers:
            M = gapt.layer_mbe(hs, [1, 2], P).mean()
    assert max(one.sizes) == blocks                                        # the Gram blocks themselves
    assert max(layers.sizes) == blocks                                     # a layer's blocks at a time, no (B, T, D) copy
    if grad:
        M.backward()
        assert all(torch.isfinite(h.grad).all() for h in hs[1:3]) and hs[0].grad is None
        assert math.isfinite(M.item())


def test_text_task_bad_sizes_are_one_line_errors(text_dir, tmp_path):
    shards, _ = text_dir
    for flags, msg in ((["--block_size=16", "--val_tokens=100000000"], "--val_tokens"),
                       (["--block_size=400000"], "fewer than block_size"),
                       (["--block_size=64", "--val_tokens=10"], "fewer than one window")):
        r = run_gapt("--task=text", f"--data_dir={shards}", "--n_layer=2", "--n_head=2", "--n_embd=32",
                     *flags, f"--out_dir={tmp_path / 'run'}")
        assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not (tmp_path / "run").exists()


def test_cycle_stats_tell_a_slow_cycle_from_noise():
    assert experiments.cycle_stats([0.1, -0.1] * 4) == ("cos > 0 in 50% of 8 measurements, 7 sign changes, "
                                                 "lag-1 autocorrelation -1.00")
    assert "too few" in experiments.cycle_stats([0.3, -0.2])
    slow = experiments.cycle_stats(np.sin(np.linspace(0.5, 4 * np.pi - 0.5, 100)))   # two periods
    assert "3 sign changes" in slow and float(slow.split()[-1]) > 0.95


def test_compare_runs_every_arm_and_seed_then_table_and_figures(tmp_path):
    out, fig = tmp_path / "cmp", tmp_path / "figs" / "arith.png"
    r = run_exp(*TINY, "--max_iters=12", "--eval_interval=6", "--align_interval=3", "--p_m=2", "--p_c=2",
                "--compare=memorize,gapt", "--seeds=2", f"--out_dir={out}", f"--fig={fig}")
    assert r.returncode == 0, r.stderr
    assert sorted(set(os.listdir(out)) - {".lock"}) == ["config.json", "gapt_seed0", "gapt_seed1", "memorize_seed0",
                                                      "memorize_seed1", "results.json"]
    table = json.loads((out / "results.json").read_text())
    assert set(table) == {"memorize", "gapt"} and len(table["gapt"]["id_ce"]) == 2   # (mean, std)
    assert "| memorize |" in r.stdout and fig.stat().st_size > 0 and (fig.parent / "cycle.png").exists()
    assert "cycle, gapt seed 1338: cos > 0 in" in r.stdout and "of 4 measurements" in r.stdout
    seeds = [json.loads((out / d / "config.json").read_text())["seed"] for d in ("gapt_seed0", "gapt_seed1")]
    assert seeds == [1337, 1338]

# -----------------------------------------------------------------------------
# the CUDA path, checked on the CPU: device set-up, a step without host reads, the
# controller one step late, and a torchrun that exits cleanly


@pytest.mark.parametrize("flag, env, want", [("cuda", {}, 0), ("cuda:1", {}, 1), ("auto", {}, 0),
                                             ("cuda", {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}, 1)])
def test_setup_device_gives_cuda_an_index(monkeypatch, flag, env, want):
    # torch.cuda.set_device rejects a device without an index: the fake keeps that contract
    set_to = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: set_to.append(torch.cuda._utils._get_device_index(d)))
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda *a, **k: None)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    cfg = gapt.parse_args([f"--device={flag}"])
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32   # set_device turns them on
    try:
        with pytest.warns() if not torch.cuda.is_available() else nullcontext():   # autocast("cuda"), CPU build
            device, _, _, (ddp, _, _) = gapt.setup_device(cfg)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    assert device == torch.device("cuda", want) and set_to == [want] and cfg["dtype"] == "bfloat16"
    assert ddp == bool(env)


class HostReads(TorchDispatchMode):
    """Counts the ops that copy a tensor's value to the host (.item(), .tolist(), bool(t))."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("ce", [1.0, float("nan")])
def test_fused_optimizer_skips_a_non_finite_step_on_the_device(ce):
    # the cuda path: update() decides the skip without reading anything on the host
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)   # fused AdamW also runs on the CPU
    scaler, cfg = torch.amp.GradScaler("cpu", enabled=False), {"grad_clip": 1.0}
    for step in range(2):   # a good step first, so the optimizer has state to keep
        model(torch.ones(2, 4)).sum().backward()
        before = ([p.clone() for p in model.parameters()],
                  [{k: v.clone() for k, v in st.items()} for st in opt.state.values()])
        stats = torch.tensor([ce if step else 1.0, 0.5, 1.0])
        with HostReads() as reads:
            out = gapt.update(model, [opt], scaler, cfg, stats)
        assert reads.n == 0 and out.shape == (5,) and all(p.grad is None for p in model.parameters())
    assert out[4].item() == (ce == 1.0)
    same = all(torch.equal(a, b) for a, b in zip(before[0], model.parameters())) and all(
        torch.equal(v, st[k]) for st0, st in zip(before[1], opt.state.values()) for k, v in st0.items())
    assert same == (ce != 1.0)                   # skipped: weights, moments and step count untouched


def replay_phases(train, lag, evals=(), p_m=3, p_c=3, delta_ce=0.05, tau=10):
    """The phases Algorithm 1 gives when the host reads step t's logged CE and M after launching
    step t + lag (at the steps in evals, step t's own), and feeds them to the controller if step t
    ran in its current phase (at lag 1 the step in flight at a switch did not)."""
    c, phase, phases, unread = gapt.GAPT(delta_ce, 0.002, tau, p_m, p_c), gapt.MEMORIZE, [], []
    for t in train:
        phases.append(phase)
        unread.append(t)
        while len(unread) > (0 if t["step"] in evals else lag):
            u = unread.pop(0)
            phase = c.step(u["ce"], u["mbe"]) if u["phase"] == c.phase else phase
    return phases


@pytest.mark.parametrize("lag", [0, 1])
def test_read_lag_decides_each_phase_from_the_step_lag_before(tmp_path, lag):
    out = tmp_path / "run"
    r = run_gapt(*STEADY, "--max_iters=40", "--eval_interval=5", f"--read_lag={lag}", f"--out_dir={out}")
    assert r.returncode == 0, r.stderr
    train, evals = read_log(out, "train"), range(5, 41, 5)
    assert [t["step"] for t in train] == list(range(1, 41))
    assert [t["phase"] for t in train] == replay_phases(train, lag, evals)
    assert {t["phase"] for t in train} == {1, 2}
    assert replay_phases(train, 1 - lag, evals) != replay_phases(train, lag, evals)
    if lag:                                  # at an eval the host catches up: not lag 1 throughout
        assert replay_phases(train, 1) != replay_phases(train, 1, evals)


def test_resume_with_read_lag_one_reproduces_uninterrupted_run(tmp_path):
    # at a checkpoint the controller has seen every step (the host caught up at the eval)
    a, b = tmp_path / "straight", tmp_path / "resumed"
    args = [*STEADY, "--read_lag=1", "--eval_interval=10"]
    assert run_gapt(*args, "--max_iters=30", f"--out_dir={a}").returncode == 0
    assert run_gapt(*args, "--max_iters=15", f"--out_dir={b}").returncode == 0
    r = run_gapt(*args, "--max_iters=30", f"--out_dir={b}", "--init_from=resume")
    assert r.returncode == 0, r.stderr
    straight, resumed = without_timing(read_log(a, "train")), without_timing(read_log(b, "train"))
    assert len(straight) == 30 and {t["phase"] for t in straight} == {1, 2} and straight == resumed


# -----------------------------------------------------------------------------
# issue 14, parts 2-3: --compare's paired differences from the baseline arm, with t intervals


def test_t_quantile_matches_the_printed_t_table():
    for p, df, t in ((0.975, 1, 12.706), (0.975, 2, 4.303), (0.975, 3, 3.182), (0.975, 19, 2.093),
                     (0.975, 30, 2.042), (0.995, 3, 5.841), (0.95, 10, 1.812)):
        assert experiments.t_quantile(p, df) == pytest.approx(t, abs=1e-3), (p, df)
    assert experiments.t_quantile(0.975, 2000) == pytest.approx(1.961, abs=1e-3)   # the normal's: 1.960


def test_paired_diff_is_the_hand_computed_paired_t_interval():
    # differences 1, 2, 3, 4: mean 2.5, sd 1.2910, t_{0.975,3} = 3.1824,
    # half-width 3.1824 * 1.2910 / sqrt(4) = 2.0542
    r = experiments.paired_diff([10.0, 20.0, 30.0, 40.0], [11.0, 22.0, 33.0, 44.0])
    assert r["diff"] == 2.5 and r["ci95"] == pytest.approx([0.4458, 4.5542], abs=1e-4)
    other = experiments.paired_diff([10.0, 20.0, 30.0, 40.0], [22.0, 11.0, 44.0, 33.0])   # re-paired
    assert other["diff"] == pytest.approx(2.5) and other["ci95"][0] < -10 and other["ci95"][1] > 15
    assert experiments.paired_diff([1.0], [3.0]) == {"diff": 2.0, "ci95": None}   # one seed: no interval


def test_compare_table_differences_are_from_the_first_arm_and_paired_by_seed(tmp_path, capsys):
    arms = {"memorize": [1, 2, 3, 4], "gapt": [2, 4, 6, 8], "compress": [3, 4, 5, 6]}   # per seed
    dirs = {}
    for arm, seps in arms.items():
        dirs[arm] = [str(tmp_path / f"{arm}_seed{s}") for s in range(4)]
        for out, sep in zip(dirs[arm], seps):
            os.makedirs(out)
            recs = [{"kind": "eval", "step": 1, "separation": -1.0, "loss": 9.0},   # not the last
                    {"kind": "eval", "step": 2, "separation": float(sep), "loss": 0.5,
                     "layers": [1.0, 2.0]}]                                   # no table column
            Path(out, "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    table = json.loads(json.dumps(experiments.compare_table(dirs)))   # as results.json holds it
    assert table["memorize"] == {"separation": [2.5, pytest.approx(1.2910, abs=1e-4)],
                                 "loss": [0.5, 0.0], "compressing": [0.0, 0.0],   # no train records
                                 "cycles": [0.0, 0.0]}
    vs = table["gapt"]["vs_memorize"]["separation"]                     # differences 1, 2, 3, 4
    assert vs["diff"] == 2.5 and vs["ci95"] == pytest.approx([0.4458, 4.5542], abs=1e-4)
    assert table["gapt"]["vs_memorize"]["loss"] == {"diff": 0.0, "ci95": [0.0, 0.0]}
    vs = table["compress"]["vs_memorize"]["separation"]   # from memorize, not gapt
    assert vs == {"diff": 2.0, "ci95": [2.0, 2.0]}
    out = capsys.readouterr().out
    assert "| arm, final - memorize, final: mean [95% t interval] | separation | loss | compressing | cycles |" in out
    assert "| gapt (paired) | +2.5000 [+0.4457, +4.5543] | +0.0000 [+0.0000, +0.0000] |" in out
    assert "gapt never compressed: its intervals compare the baseline with itself" in out


def test_compare_writes_each_arms_paired_differences_to_results_json(tmp_path):
    out = tmp_path / "cmp"
    r = run_exp("--task=forgetting", "--compare=memorize,gapt", "--seeds=3", "--max_iters=10",
                 f"--out_dir={out}", f"--fig={tmp_path / 'forget.png'}")
    assert r.returncode == 0, r.stderr
    table = json.loads((out / "results.json").read_text())
    assert "vs_memorize" not in table["memorize"]
    assert "| arm, final - memorize, final: mean [95% t interval] |" in r.stdout
    final = {a: [read_log(out / f"{a}_seed{s}", "eval")[-1] for s in range(3)] for a in table}
    for k, d in table["gapt"]["vs_memorize"].items():
        if k in ("compressing", "cycles"):                    # from the train records, not an eval
            continue
        diffs = [g[k] - m[k] for g, m in zip(final["gapt"], final["memorize"])]
        half = 4.3027 * np.std(diffs, ddof=1) / math.sqrt(3)   # t_{0.975, 2} = 4.3027
        assert d["diff"] == pytest.approx(np.mean(diffs)), k
        assert d["ci95"] == pytest.approx([np.mean(diffs) - half, np.mean(diffs) + half],
                                          abs=1e-4), k

# issue 11, faults: one run per out_dir, earlier runs kept, damaged files, full disks,
# stalled ranks, Ctrl-C, resume messages. Each ends in one line and loses nothing.

FAST = ["--device=cpu", *TINY, "--eval_interval=2", "--n_eval=32"]


def small_run(out, *args, capsys=None):
    """An in-process 4-step arithmetic run (checkpoints at steps 2 and 4): (exit code, stderr)."""
    code = gapt.main([*FAST, "--max_iters=4", f"--out_dir={out}", *args])
    return code, capsys.readouterr().err if capsys else ""


def test_a_locked_out_dir_refuses_a_second_run_and_a_killed_holder_frees_it(tmp_path, capsys):
    out = tmp_path / "run"
    held = runs.lock_dir(str(out))                    # as a run in progress holds it
    one_line_error(*small_run(out, capsys=capsys), 2, "another run", str(os.getpid()))
    assert os.listdir(out) == [".lock"]              # nothing written
    held.close()
    hold = f"import runs, time\nruns.lock_dir({str(out)!r})\nprint('locked', flush=1)\ntime.sleep(99)"
    child = subprocess.Popen([sys.executable, "-c", hold], cwd=HERE, stdout=subprocess.PIPE,
                             text=True)
    assert child.stdout.readline() == "locked\n"
    child.kill()                                      # a killed run leaves no stale lock
    child.wait()
    assert small_run(out)[0] == 0 and (out / "ckpt.pt").exists()


def test_fresh_runs_into_one_out_dir_keep_every_earlier_run(tmp_path, capsys):
    out = tmp_path / "run"
    logs = []
    for seed in (1, 2, 3):
        args = ["--task=forgetting", "--max_iters=5", f"--seed={seed}", f"--out_dir={out}"]
        assert experiments.main(args) == 0
        logs.append((out / "log.jsonl").read_text())
    assert "kept in" in capsys.readouterr().out
    assert [(out / "earlier" / n / "log.jsonl").read_text() for n in ("1", "2")] == logs[:2]
    assert json.loads((out / "earlier" / "2" / "config.json").read_text())["seed"] == 2
    assert len(set(logs)) == 3


def test_damaged_log_lines_are_skipped_with_a_warning_on_resume(tmp_path, capsys):
    out = tmp_path / "run"
    assert small_run(out)[0] == 0
    lines = (out / "log.jsonl").read_bytes().split(b"\n")
    i = lines.index(next(x for x in lines if x.startswith(b'{"kind": "train", "step": 3,')))
    lines[i] = b"GARBAGE{{"
    (out / "log.jsonl").write_bytes(b"\n".join(lines) + b"\xff\xfe\n")
    capsys.readouterr()
    assert small_run(out, "--max_iters=6", "--init_from=resume")[0] == 0
    assert f"skipped 2 damaged line(s): {i + 1}, " in capsys.readouterr().out
    assert [r["step"] for r in read_log(out, "train")] == [1, 2, 4, 5, 6]   # step 3's was damaged


def test_token_ids_outside_the_vocabulary_are_one_line_with_nothing_written(tmp_path, capsys):
    for bad in (50257, 65000):                        # GPT-2's padding rows, and beyond the model
        shards = tmp_path / f"shards{bad}"
        shards.mkdir()
        ids = np.arange(1000) % 50000
        data.write_shard(str(shards / "x_val_000000.bin"), ids)
        data.write_shard(str(shards / "x_train_000001.bin"), np.where(ids == 777, bad, ids))
        code = gapt.main(["--task=text", f"--data_dir={shards}", f"--out_dir={tmp_path / 'run'}",
                          "--device=cpu"])
        err = capsys.readouterr().err
        one_line_error(code, err, 2, "x_train_000001.bin", f"token id {bad}")
        assert not (tmp_path / "run").exists()


def test_an_out_dir_that_cannot_be_written_is_one_line(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert small_run(out)[0] == 0
    real_open = open

    def read_only(path, mode="r", *a, **k):           # as on a read-only mount (root ignores chmod)
        if str(path).startswith(str(out)) and mode[0] in "wa":
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, mode, *a, **k)
    monkeypatch.setattr(runs, "open", read_only, raising=False)
    for resume in ("scratch", "resume"):
        one_line_error(*small_run(out, f"--init_from={resume}", capsys=capsys), 2, "cannot write")
    assert runs.read_checkpoint(out / "ckpt.pt")["step"] == 4


def test_config_json_folder_and_a_stray_tmp_on_resume(tmp_path, capsys):
    out = tmp_path / "run"
    assert small_run(out)[0] == 0
    (out / "ckpt.pt.tmp").write_bytes(b"half a checkpoint")   # a kill during a save
    (out / "config.json").unlink()
    (out / "config.json").mkdir()
    one_line_error(*small_run(out, "--init_from=resume", capsys=capsys), 2, "config.json")
    assert not (out / "ckpt.pt.tmp").exists()
    (out / "config.json").rmdir()
    assert small_run(out, "--init_from=resume", "--max_iters=6")[0] == 0


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint_and_no_tmp(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    runs.save_checkpoint(path, {"step": 1, "w": torch.ones(3)})
    real_open = open

    class Full:                                       # writes 10 bytes, then the disk is full
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *e):
            self.f.close()

        def write(self, b):
            self.f.write(bytes(b)[:10])
            raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(runs, "open", lambda p, m="r": Full(real_open(p, m)), raising=False)
    with pytest.raises(OSError, match="No space left on device") as e:
        runs.save_checkpoint(path, {"step": 2, "w": torch.zeros(3)})
    monkeypatch.undo()
    assert e.value.filename == path                                   # named, for main's one line
    assert os.listdir(tmp_path) == ["ckpt.pt"] and runs.read_checkpoint(path, ("step",))["step"] == 1


def test_values_that_would_crash_later_are_one_line(capsys):
    for flag in ("--learning_rate=1e38", "--seed=99999999999999999999", "--min_lr=1e38",
                 "--dist_timeout=0"):
        one_line_error(gapt.main([flag]), capsys.readouterr().err, 2, flag.split("=")[0])


def test_resume_names_overridden_flags_and_refuses_a_max_iters_below_its_step(tmp_path, capsys):
    out = tmp_path / "run"
    assert small_run(out)[0] == 0
    capsys.readouterr()
    for flag in ("--seed=5", "--n_layer=2"):                        # the model and its data: refused
        code, err = small_run(out, "--init_from=resume", flag, capsys=capsys)
        one_line_error(code, err, 2, flag, "cannot change on resume")
    assert small_run(out, "--init_from=resume", "--learning_rate=0.002")[0] == 0
    said = capsys.readouterr().out
    assert "resume: --learning_rate=0.002 replaces the run's 0.001" in said
    assert "nothing to train" in said                                # its --max_iters, not the default
    code, err = small_run(out, "--init_from=resume", "--max_iters=3", capsys=capsys)
    one_line_error(code, err, 2, "step 4")
    ck = runs.read_checkpoint(out / "ckpt.pt")                      # as saved before --arith_layout
    del ck["config"]["arith_layout"], ck["config"]["arith_loss"]
    torch.save(ck, out / "ckpt.pt")
    code, err = small_run(out, "--init_from=resume", "--max_iters=6", "--arith_layout=packed",
                          capsys=capsys)
    one_line_error(code, err, 2, "--arith_layout=packed", "was trained with --arith_layout=padded")
    assert small_run(out, "--init_from=resume", "--max_iters=6")[0] == 0


def test_the_schedule_never_rises_above_the_learning_rate():
    cfg = dict(gapt.DEFAULTS, learning_rate=5e-5, warmup_iters=10, max_iters=100)   # below --min_lr
    lrs = [gapt.get_lr(s, cfg) for s in range(120)]
    assert max(lrs) == pytest.approx(5e-5) and lrs[-1] == pytest.approx(5e-5)
    assert lrs[0] > 0 and lrs[9] == pytest.approx(5e-5)              # warmup: never 0, at its peak on time
    assert gapt.get_lr(999, gapt.DEFAULTS | {"max_iters": 1000}) < 2e-4   # the default still decays


@pytest.mark.parametrize("error", [MemoryError("Unable to allocate 381. GiB"), torch.OutOfMemoryError("CUDA"),
                                   RuntimeError("DefaultCPUAllocator: can't allocate memory")])
def test_out_of_memory_is_one_line(monkeypatch, capsys, error):
    def run(cfg):
        raise error
    monkeypatch.setattr(gapt, "train", run)
    one_line_error(gapt.main(["--device=cpu"]), capsys.readouterr().err, 1, "out of memory", "--batch_size")


def test_a_comparison_keeps_its_earlier_runs_on_bad_input_and_names_a_missing_log(tmp_path, capsys):
    out = tmp_path / "cmp"
    out.mkdir()
    (out / "results.json").write_text("{}")                          # a finished comparison
    code = experiments.main(["--device=cpu", "--task=text", f"--data_dir={tmp_path / 'none'}",
                             "--compare=memorize,gapt", f"--out_dir={out}"])
    one_line_error(code, capsys.readouterr().err, 2, "no train shards")
    assert sorted(os.listdir(out)) == ["results.json"]               # not moved to earlier/1
    (out / "earlier").write_text("")                                 # a file in the way
    code = experiments.main(["--device=cpu", "--task=forgetting", "--compare=gapt", "--seeds=1", f"--out_dir={out}"])
    one_line_error(code, capsys.readouterr().err, 2, "earlier")
    args = ["--device=cpu", *FAST, "--max_iters=3", "--eval_interval=0", "--compare=gapt,memorize", "--seeds=1",
            f"--out_dir={tmp_path / 'c2'}"]
    assert experiments.main(args) == 0
    os.remove(tmp_path / "c2" / "gapt_seed0" / "log.jsonl")
    capsys.readouterr()
    code = experiments.main([*args, "--init_from=resume"])                 # nothing to train: no eval logged
    one_line_error(code, capsys.readouterr().err, 1, "gapt_seed0/log.jsonl holds no eval")


def test_a_flipped_bit_in_a_checkpoint_is_named(tmp_path, capsys):
    out = tmp_path / "run"
    assert small_run(out)[0] == 0
    blob = bytearray((out / "ckpt.pt").read_bytes())
    blob[len(blob) // 2] ^= 1
    (out / "ckpt.pt").write_bytes(blob)
    one_line_error(*small_run(out, "--init_from=resume", capsys=capsys), 2, "checksum", "ckpt.pt")


def test_ctrl_c_is_one_line_with_the_resume_command_and_exit_130(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, os.path.join(HERE, "gapt.py"), *FAST, "--max_iters=999", f"--out_dir={out}"]
    default_sigint = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)   # noqa: E731
    p = subprocess.Popen(cmd, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=default_sigint)   # a suite started in the background ignores it
    for line in p.stdout:
        if line.startswith("step     3"):             # after the step-2 checkpoint
            break
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and err.count("\n") == 1 and err.startswith("stopped (Ctrl-C)"), err
    assert f"the last checkpoint is {out / 'ckpt.pt'}" in err
    assert err.strip().endswith(f"--out_dir={out} --init_from=resume")
    assert runs.read_checkpoint(out / "ckpt.pt")["step"] >= 2 and not (out / "ckpt.pt.tmp").exists()


@pytest.mark.parametrize("sig", [signal.SIGSTOP, signal.SIGKILL])
def test_a_stalled_or_dead_rank_stops_the_other_in_one_line(tmp_path, sig):
    # two gloo processes started by hand (so the test knows their pids); rank 1 stopped or killed
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    cmd = [sys.executable, os.path.join(HERE, "gapt.py"), "--device=cpu", "--n_layer=1",
           "--n_head=2", "--n_embd=16", "--batch_size=4", "--log_interval=1", "--eval_interval=0",
           "--max_iters=100000", "--dist_timeout=3", f"--out_dir={tmp_path / 'run'}"]
    env = dict(os.environ, WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    procs = [subprocess.Popen(cmd, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=dict(env, RANK=str(r), LOCAL_RANK=str(r))) for r in (0, 1)]
    try:
        for line in procs[0].stdout:
            if line.startswith("step "):
                break
        os.kill(procs[1].pid, sig)
        _, err = procs[0].communicate(timeout=120)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    why = "--dist_timeout=3 s" if sig == signal.SIGSTOP else "lost contact"   # killed: was a traceback
    one_line_error(procs[0].returncode, err, 1, "rank 0", why)

# issue 13: --optimizer=muon, and --init_from=gpt2 (Hugging Face GPT-2 weights; needs transformers)


def test_muon_takes_the_block_matrices_and_adamw_the_rest(monkeypatch):
    cfg = gapt.resolve(dict(gapt.DEFAULTS, n_layer=2, n_head=2, n_embd=32, optimizer="muon"))
    model, opt = gapt.build(cfg, torch.device("cpu"))
    muon, adamw = opt
    name = {id(p): n for n, p in model.named_parameters()}
    in_muon = sorted(name[id(p)] for g in muon.param_groups for p in g["params"])
    assert in_muon == sorted(n for n, p in model.named_parameters() if n.startswith("transformer.h.") and p.dim() == 2)
    assert len(in_muon) == 2 * 4                                     # c_attn, attn c_proj, c_fc, mlp c_proj
    in_adamw = {name[id(p)] for g in adamw.param_groups for p in g["params"]}
    assert in_adamw.isdisjoint(in_muon) and len(in_adamw) + len(in_muon) == len(name)
    assert {"transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.ln_1.weight"} <= in_adamw
    said = report.opening(cfg, {}, "cpu", 1, 0, opt, 64 * cfg["block_size"])
    assert "Muon (lr 0.02, weight decay 0," in said and "AdamW (lr 0.001" in said
    monkeypatch.delattr(torch.optim, "Muon")                         # as on torch < 2.9
    with pytest.raises(gapt.ConfigError, match=r"needs torch >= 2.9"):
        gapt.make_optimizer(model, cfg, torch.device("cpu"))


def test_resume_with_muon_reproduces_uninterrupted_run(tmp_path):
    a, b = tmp_path / "straight", tmp_path / "resumed"
    args = [*STEADY, "--optimizer=muon", "--muon_lr=0.01", "--eval_interval=10"]
    assert run_gapt(*args, "--max_iters=20", f"--out_dir={a}").returncode == 0
    assert run_gapt(*args, "--max_iters=10", f"--out_dir={b}").returncode == 0
    r = run_gapt(*args, "--max_iters=20", f"--out_dir={b}", "--init_from=resume")
    assert r.returncode == 0, r.stderr
    straight, resumed = without_timing(read_log(a, "train")), without_timing(read_log(b, "train"))
    assert len(straight) == 20 and {t["phase"] for t in straight} == {1, 2} and straight == resumed
    muon, adamw = runs.read_checkpoint(b / "ckpt.pt")["optimizer"]
    assert len(muon["state"]) == 3 * 4 and adamw["state"]           # both optimizers' states were saved
    assert muon["param_groups"][0]["lr"] == pytest.approx(0.01)      # its own peak, not AdamW's 3e-3


def test_grad_scaler_skips_and_unscales_muon_and_adamw_together(tmp_path):
    cfg = gapt.resolve(dict(gapt.DEFAULTS, n_layer=1, n_head=2, n_embd=16, optimizer="muon"))
    model, opt = gapt.build(cfg, torch.device("cpu"))
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)         # fp16's scaler, here on the CPU
    x, y = torch.randint(cfg["vocab_size"], (2, 4, cfg["block_size"]))
    for factor, moves in ((math.inf, False), (1.0, True)):           # an overflow: neither optimizer steps
        before = [p.detach().clone() for p in model.parameters()]
        scaler.scale(model(x, y)[1] * factor).backward()
        gapt.update(model, opt, scaler, cfg, torch.tensor([1.0, 0.5, 1.0]))
        assert [not torch.equal(a, p) for a, p in zip(before, model.parameters())] == [moves] * len(before)
    assert scaler.get_scale() == 512.0                               # halved once, for the overflow
    runs.save_checkpoint(str(tmp_path / "ckpt.pt"), {"model": {}, "optimizer": {}, "gapt": {}, "scaler": {},
                                                     "step": 1, "config": cfg, "ranks": []})
    with pytest.raises(gapt.ConfigError, match="trained with --optimizer=muon"):
        runs.load_checkpoint(dict(cfg, optimizer="adamw", out_dir=str(tmp_path), given=["optimizer"]),
                             gapt.check_saved, gapt.DEFAULTS, gapt.FIXED, True)


def save_tiny_gpt2(path, safetensors=True):
    """A small random transformers.GPT2LMHeadModel (GPT-2's vocabulary), saved with save_pretrained."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=64))
    hf.save_pretrained(path)
    if not safetensors:   # the older format (transformers 5 writes safetensors only): a pickled state dict
        torch.save(hf.state_dict(), path / "pytorch_model.bin")
        (path / "model.safetensors").unlink()
    return hf.eval()


@pytest.mark.parametrize("safetensors", [True, False])
def test_gpt2_weights_give_the_logits_of_transformers(tmp_path, safetensors):
    hf = save_tiny_gpt2(tmp_path, safetensors)
    assert (tmp_path / ("model.safetensors" if safetensors else "pytorch_model.bin")).is_file()
    cfg = dict(gapt.DEFAULTS, task="text", init_from="gpt2", weights=str(tmp_path), block_size=64)
    sd = runs.read_gpt2(cfg)
    assert (cfg["n_layer"], cfg["n_head"], cfg["n_embd"]) == (2, 2, 64)   # from the weights and config.json
    model = gapt.build(gapt.resolve(cfg), torch.device("cpu"), sd)[0].eval()
    x, y = torch.randint(50257, (2, 2, 64))
    with torch.no_grad():
        (ours, ce, _), theirs = model(x, y), hf(x).logits
    assert ours.shape[-1] == 50304 and (ours[..., :50257] - theirs).abs().max() <= 1e-4
    assert torch.isneginf(ours[..., 50257:]).all()                  # padding takes no probability:
    assert ce.item() == pytest.approx(torch.nn.functional.cross_entropy(theirs.flatten(0, 1), y.flatten()).item(),
                                      abs=1e-4)                     # the same CE as transformers
    with pytest.raises(gapt.ConfigError, match="64 positions"):      # a context longer than GPT-2's
        runs.read_gpt2(dict(cfg, n_layer=0, n_head=0, n_embd=0, block_size=128))
    default = dict(gapt.DEFAULTS, task="text", init_from="gpt2", weights=str(tmp_path))
    runs.read_gpt2(default)
    assert gapt.resolve(default)["block_size"] == 64                # no --block_size: the weights' positions


def test_gapt_continues_from_gpt2_weights_and_resumes(text_dir, tmp_path):
    hf = save_tiny_gpt2(tmp_path / "hf")
    shards, _ = text_dir
    out = tmp_path / "run"
    args = ["--task=text", f"--data_dir={shards}", "--block_size=16", "--batch_size=4", "--val_tokens=64",
            "--eval_interval=3", "--p_m=2", "--p_c=2", "--delta_ce=1", "--tau=10",
            f"--tokenizer_file={tokenizer_file()}", f"--out_dir={out}"]
    r = run_gapt(*args, "--max_iters=6", "--init_from=gpt2", f"--weights={tmp_path / 'hf'}")
    assert r.returncode == 0, r.stderr
    ck = runs.read_checkpoint(out / "ckpt.pt")
    assert (ck["config"]["n_layer"], ck["config"]["n_embd"], ck["config"]["vocab_real"]) == (2, 64, 50257)
    wpe = hf.transformer.wpe.weight[:16].detach()                    # warmup: 6 steps move it < 1e-3
    assert (ck["model"]["transformer.wpe.weight"] - wpe).abs().max() < 1e-3
    r = run_gapt(*args, "--max_iters=8", "--init_from=resume")
    assert r.returncode == 0, r.stderr
    assert [t["step"] for t in read_log(out, "train")] == list(range(1, 9))
    assert {t["phase"] for t in read_log(out, "train")} == {1, 2}


def test_a_resumed_comparison_starts_its_missing_arms_as_the_others(text_dir, tmp_path):
    # they started from scratch in the command line's shape: a random tiny GPT against GPT-2
    save_tiny_gpt2(tmp_path / "hf")
    shards, _ = text_dir
    out = tmp_path / "cmp"
    args = ["--task=text", "--block_size=16", "--batch_size=4", "--val_tokens=64", "--max_iters=3",
            "--eval_interval=0", "--seeds=1", "--compare=memorize,gapt", f"--out_dir={out}"]
    r = run_exp(*args, f"--data_dir={shards}", "--init_from=gpt2", f"--weights={tmp_path / 'hf'}")
    assert r.returncode == 0, r.stderr
    shutil.rmtree(out / "gapt_seed0")                                 # stopped before this arm began
    r = run_exp(*args, "--init_from=resume")                           # Ctrl-C's line, less --data_dir
    assert r.returncode == 0, r.stderr
    for arm in ("memorize", "gapt"):
        c = runs.read_checkpoint(out / f"{arm}_seed0" / "ckpt.pt")["config"]
        assert (c["n_layer"], c["n_embd"], c["val_tokens"], c["data_dir"]) == (2, 64, 64, str(shards))
    assert runs.read_checkpoint(out / "gapt_seed0" / "ckpt.pt")["config"]["init_from"] == "gpt2"
    (out / "config.json").write_text('{"task": "te')                 # torn
    r = run_exp(*args, "--init_from=resume")
    assert r.returncode == 2 and "config.json is damaged" in r.stderr, r.stderr


def test_gpt2_weights_that_cannot_load_are_one_line_errors(tmp_path, monkeypatch, capsys):
    hf = tmp_path / "hf"
    save_tiny_gpt2(hf)
    (hf / "config.json").unlink()                                    # n_head: by name, and it is not gpt2-xl
    bad = tmp_path / "pytorch_model.bin"
    torch.save({"h.0.mlp.c_fc.weight": torch.zeros(8, 32)}, bad)      # a state dict, not GPT-2's
    (tmp_path / "junk.bin").write_bytes(b"not weights")
    for init, weights, msg in (("gpt2", bad, "not a GPT-2 checkpoint"),
                               ("gpt2", tmp_path / "junk.bin", "not a GPT-2 checkpoint"),
                               ("gpt2", tmp_path / "none", "no such file"),
                               ("gpt2-xl", hf / "model.safetensors", "gives n_head")):
        with pytest.raises(gapt.ConfigError, match=msg):
            runs.read_gpt2(dict(gapt.DEFAULTS, task="text", init_from=init, weights=str(weights)))
    capsys.readouterr()                                              # transformers' progress bars
    code = gapt.main(["--device=cpu", "--init_from=gpt2", f"--weights={hf}",
                      f"--out_dir={tmp_path / 'arith'}"])
    one_line_error(code, capsys.readouterr().err, 2, "needs --task=text")
    env = dict(os.environ, HF_HUB_OFFLINE="1")                       # no network: the download fails
    for flags, msg in (([f"--weights={bad}"], "not a GPT-2 checkpoint"),   # as the user sees them
                       ([], "--weights=PATH to a local copy")):            # or: not installed
        r = run_gapt("--task=text", "--init_from=gpt2", *flags, f"--out_dir={tmp_path / 'run'}", env=env)
        assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not (tmp_path / "run").exists()
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)        # not installed
    with pytest.raises(gapt.ConfigError, match="pip install huggingface_hub"):
        runs.gpt2_file("gpt2", "")

# -----------------------------------------------------------------------------
# review fixes: a resumed optimizer's fused flag, rank 0's errors under torchrun, the resume line


def test_update_follows_the_loaded_groups_fused_flag():
    # a CPU checkpoint (non-fused AdamW) resumed where AdamW is built fused must not pass found_inf
    model = torch.nn.Linear(4, 3)
    plain = torch.optim.AdamW(model.parameters(), lr=0.1)
    fused = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    fused.load_state_dict(plain.state_dict())          # the groups now say fused=False
    model(torch.ones(2, 4)).sum().backward()
    out = gapt.update(model, [fused], torch.amp.GradScaler("cpu", enabled=False), {"grad_clip": 1.0},
                      torch.tensor([1.0, 0.5, 1.0]))
    assert out[4].item() == 1.0


def test_rank_zero_lock_error_stops_every_torchrun_process(tmp_path):
    # only rank 0 takes the lock; the other rank must not wait for it in a collective
    out = tmp_path / "run"
    held = runs.lock_dir(str(out))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(HERE, "gapt.py"), "--device=cpu", *TINY, "--max_iters=4", "--dist_timeout=60",
           f"--out_dir={out}"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=HERE)
    held.close()
    assert r.returncode != 0 and r.stderr.count("error: --out_dir") == 1, r.stderr[-2000:]   # by rank 0
    assert "Traceback" not in "".join(l for l in r.stderr.splitlines(True) if "error:" in l)


def test_ctrl_c_resume_line_drops_a_spaced_init_from_and_bench_has_none(tmp_path):
    argv = ["--task", "text", "--init_from", "gpt2", "--weights", "w.bin", f"--out_dir={tmp_path}"]
    cfg = gapt.parse_args(argv)
    assert "nothing to resume" in report.interrupted(cfg, argv)          # no checkpoint yet
    (tmp_path / "ckpt.pt").write_bytes(b"")
    line = report.interrupted(cfg, argv)
    assert line.endswith(f"--task text --out_dir={tmp_path} --init_from=resume") and "gpt2" not in line
    assert "nothing to resume" in report.interrupted(experiments.parse_args(["--bench"]), ["--bench"])


def test_under_torchrun_ctrl_c_names_torchrun_and_bad_input_is_said_once(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.chdir(tmp_path)
    os.makedirs("out")
    open("out/ckpt.pt", "w").close()
    line = report.interrupted(gapt.parse_args([]), [])       # a python resume would halve the batch
    assert f"resume: torchrun --standalone --nproc_per_node=2 {os.path.relpath(gapt.__file__)} --init_from=resume" in line
    assert gapt.main(["--bogus=1"]) == 2 and capsys.readouterr().err == ""   # rank 0 says it
    for args in (["--task=forgetting"], ["--bench", "--init_from=gpt2"]):      # one process only
        monkeypatch.setenv("RANK", "0")
        one_line_error(experiments.main(["--device=cpu", *args]), capsys.readouterr().err, 2, "python")


def test_a_bad_tokenizer_file_is_named_before_a_text_run(tmp_path, capsys):
    # it was ignored: the run ended with samples as token ids and no word why
    data.write_shard(tmp_path / "t_val_000000.bin", np.arange(600))
    data.write_shard(tmp_path / "t_train_000001.bin", np.arange(600))
    code = gapt.main(["--device=cpu", "--task=text", f"--data_dir={tmp_path}", "--block_size=16",
                      "--val_tokens=64", f"--tokenizer_file={tmp_path / 'none.tiktoken'}",
                      f"--out_dir={tmp_path / 'run'}"])
    one_line_error(code, capsys.readouterr().err, 2, "--tokenizer_file", "none.tiktoken")
    assert not (tmp_path / "run").exists()

# -----------------------------------------------------------------------------
# issue 14: the arithmetic task in the author's packed layout (--arith_layout=packed)


def answer_mask(z):
    """For each token of z, read from the text: is it an answer digit or <eos> (the tokens after
    '= ' up to <eos>)? None before z's first <bos>, where a problem may be cut."""
    mask, state, prev = [], None, None
    for t in z.tolist():
        if t == data.BOS:
            state = False
        mask.append(state)
        if state and t == data.EOS:
            state = False
        elif state is False and prev == data.ARITH_STOI["="] and t == data.ARITH_STOI[" "]:
            state = True                                          # the answer starts after '= '
        prev = t
    return mask


def test_packed_stream_round_trips_and_masks_only_answers():
    ab = np.array([[12, 7, 0], [34, 8, 5]])
    tok, ans = data.arith_stream(ab, reverse=True)
    assert data.arith_decode(tok) == ("<bos>12 x 34 = 804<eos><bos>7 x 8 = 65<eos>"
                                      "<bos>0 x 5 = 0<eos>")
    assert data.arith_decode(tok[ans]) == "804<eos>65<eos>0<eos>"
    assert answer_mask(torch.from_numpy(tok)) == ans.tolist()


def test_packed_windows_are_stream_windows_with_answer_or_all_targets():
    A = data.Arithmetic(0, 32, layout="packed", loss="answer")
    B = data.Arithmetic(0, 32, layout="packed", loss="all")
    (x, y), (xb, yb) = A.batch(64), B.batch(64)                  # the same draws
    assert x.shape == y.shape == (64, 32) and torch.equal(x, xb)
    assert torch.equal(yb[:, :-1], x[:, 1:])                      # all: the next token everywhere
    starts = {data.arith_decode(r)[:8] for r in x}
    assert len(starts) > 32                                       # windows start anywhere
    for xr, ya, yr in zip(x, y, yb):
        mask = answer_mask(torch.cat([xr[:1], yr]))[1:]           # is each target an answer token?
        for t, m in enumerate(mask):
            if m is not None:
                assert (ya[t] >= 0) == m and (not m or ya[t] == yr[t]), data.arith_decode(xr)


def test_packed_eval_rows_are_one_held_out_problem_each_with_its_answer_at_the_end():
    A = data.Arithmetic(3, 32, layout="packed")
    padded = data.Arithmetic(3, 24).eval_sets()
    for name, (x, y) in A.eval_sets().items():
        ab = A.id_ab if name == "id" else A.ood_ab
        assert x.shape == y.shape == (512, 32) and (y[:, -1] == data.EOS).all()
        for i in range(0, 512, 7):
            tgt = (y[i] >= 0).nonzero()[:, 0]
            assert torch.equal(tgt, torch.arange(32 - len(tgt), 32))   # contiguous, at the end
            text = data.arith_decode(x[i])
            assert text.split("<bos>")[-1] == f"{ab[0, i]} x {ab[1, i]} = " + \
                data.arith_decode(y[i][tgt][:-1])                     # its prompt, then the answer
            assert data.arith_decode(y[i][tgt]) == str(ab[0, i] * ab[1, i])[::-1] + "<eos>"
            assert "<eos>" in text.split("<bos>")[-2]                 # context: earlier problems
            yp = padded[name][1][i]
            assert torch.equal(y[i][tgt], yp[yp >= 0])                # the padded layout's i-th
    held = set(map(tuple, np.hstack([A.id_ab, A.ctx_ab["id"]]).T.tolist()))
    assert len(held) > 400                                        # 512 draws, some twice
    for _ in range(10):                                           # every whole training problem
        for r in A.batch(256)[0]:
            for p in data.arith_decode(r).split("<bos>")[1:-1]:
                assert tuple(int(v) for v in p.split(" = ")[0].split(" x ")) not in held


def test_packed_data_state_round_trip():
    A = data.Arithmetic(0, 32, layout="packed")
    A.batch(10)
    s = A.state_dict()
    first = A.batch(10)
    A.load_state_dict(s)
    assert all(torch.equal(a, b) for a, b in zip(A.batch(10), first))


def test_packed_run_trains_and_resumes_in_its_layout(tmp_path):
    out = tmp_path / "pk"
    r = run_gapt("--arith_layout=packed", "--arith_loss=all", "--max_iters=10", "--eval_interval=5",
                 "--batch_size=16", "--n_eval=64", f"--out_dir={out}")
    assert r.returncode == 0, r.stderr
    ev = read_log(out, "eval")[-1]
    assert ev["step"] == 10 and 0 < ev["id_ce"] < 5 and 0 <= ev["ood_acc"] <= 1
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["block_size"] == 32 and cfg["arith_loss"] == "all"
    r = run_gapt("--init_from=resume", "--max_iters=12", f"--out_dir={out}")   # no layout flag
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "config.json").read_text())["arith_layout"] == "packed"

# -----------------------------------------------------------------------------
# A mutation audit: each test below turned red on a one-line bug the suite had let through


def tiny_gpt(n_layer=3, T=16, vocab=16):
    torch.manual_seed(0)
    return gapt.GPT(gapt.GPTConfig(n_layer, 2, 32, T, vocab, 0.0, True))


def test_iblm_gives_m_a_gradient_only_when_compressing():
    model, x = gapt.IBLM(tiny_gpt(), [1], 8), torch.randint(16, (2, 16))
    for compress in (True, False):
        ce, M = model(x, x, compress)
        assert ce.requires_grad and M.requires_grad is compress


def test_evaluate_matches_its_definitions_over_unequal_batches():
    model, (x, y) = tiny_gpt(T=24).eval(), data.Arithmetic(0, 24).eval_sets()["id"]
    x, y = x[:48], y[:48]
    cfg = {"n_layer": 3, "patch_size": 8, "layers": [1]}
    got = gapt.evaluate(model, [(x[:40], y[:40]), (x[40:], y[40:])], cfg, "cpu", gapt.nullcontext())
    with torch.no_grad():
        logits, _, hs = model(x, y)
    logp, mask = logits.log_softmax(-1), y >= 0
    assert got["ce"] == pytest.approx(-logp.gather(-1, y.clamp(min=0)[..., None])[..., 0][mask].mean().item(),
                                      rel=1e-4)                       # the answer tokens' mean
    assert got["conf"] == pytest.approx(logp.max(-1).values.exp()[mask].mean().item(), rel=1e-4)
    mbe = gapt.layer_mbe(hs, range(3), 8)                             # every window of all 48 rows
    assert got["mbe_layers"] == pytest.approx(mbe.tolist(), abs=1e-4)
    assert got["mbe"] == pytest.approx(mbe[1].item(), abs=1e-4)       # the regularised layers only


def test_mbe_stays_float32_under_autocast():
    Z = torch.randn(4, 8, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = gapt.matrix_entropy(Z)
    assert got.dtype == torch.float32 and torch.allclose(got, gapt.matrix_entropy(Z))


@pytest.mark.parametrize("stats, grad", [((1.0, float("nan")), 1.0), ((float("nan"), 0.5), 1.0),
                                         ((1.0, 0.5), float("inf")), ((1.0, 0.5), 1.0)])
def test_update_skips_a_non_finite_step_on_the_host_path(stats, grad):
    # unfused AdamW (the CPU's path, and Muon's): CE, M or the gradient norm not finite: weights kept
    model = torch.nn.Linear(2, 1)
    opt, scaler = torch.optim.AdamW(model.parameters(), lr=0.1), torch.amp.GradScaler("cpu", enabled=False)
    (model(torch.ones(1, 2)).sum() * grad).backward()
    before = [p.detach().clone() for p in model.parameters()]
    out = gapt.update(model, [opt], scaler, {"grad_clip": 1.0}, torch.tensor([*stats, 1.0]))
    ok = all(math.isfinite(v) for v in (*stats, grad))
    assert out[4].item() == ok
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())) is not ok


def test_save_refuses_non_finite_weights(tmp_path, capsys):
    loader = types.SimpleNamespace(state_dict=lambda: {})
    state = {"model": {"w": torch.tensor([1.0, float("nan")])}, "step": 7}
    gapt.save(types.SimpleNamespace(cfg={"out_dir": str(tmp_path)}, loader=loader, ddp=False, world=1,
                                    master=True), state, False)
    assert not (tmp_path / "ckpt.pt").exists() and "non-finite weights" in capsys.readouterr().out
    state["model"]["w"][1] = 2.0
    gapt.save(types.SimpleNamespace(cfg={"out_dir": str(tmp_path)}, loader=loader, ddp=False, world=1,
                                    master=True), state, False)
    assert runs.read_checkpoint(tmp_path / "ckpt.pt", ("step",))["step"] == 7


def test_a_good_step_resets_the_bad_count_and_skips_never_reach_the_controller(tmp_path, monkeypatch):
    calls, seen, loss, step = [0], [], gapt.iblm_loss, gapt.GAPT.step

    def poisoned(ce, mbe, phase, w):                                 # steps 1, 3 and 4: NaN gradients
        calls[0] += 1
        return loss(ce, mbe, phase, w) * (float("nan") if calls[0] in (1, 3, 4) else 1.0)

    def watched(self, ce, mbe):
        seen.append(ce)
        return step(self, ce, mbe)
    monkeypatch.setattr(gapt, "iblm_loss", poisoned)
    monkeypatch.setattr(gapt.GAPT, "step", watched)
    r = run_gapt(*TINY, "--max_iters=6", "--max_bad_steps=3", "--eval_interval=0", "--n_eval=32",
                 f"--out_dir={tmp_path}")
    assert r.returncode == 0, r.stderr                                # bad, good, bad, bad: never 3 in a row
    assert [t["step"] for t in read_log(tmp_path, "skip")] == [1, 3, 4] and len(seen) == 3


def test_token_shards_draw_windows_in_proportion_to_shard_length(tmp_path):
    data.write_shard(tmp_path / "t_val_000000.bin", np.arange(100))
    data.write_shard(tmp_path / "t_train_000001.bin", np.arange(20))
    data.write_shard(tmp_path / "t_train_000002.bin", 1000 + np.arange(2000))
    x, _ = data.TokenShards(tmp_path, 4, seed=0).batch(4000)
    assert (x[:, 0] < 1000).float().mean().item() < 0.05            # ~1%, not a uniform shard's half


def test_grad_alignment_is_a_cosine_of_two_different_gradients():
    x = torch.randint(16, (4, 16))
    cfg = {"layers": [1, 2], "patch_size": 8, "n_layer": 4}
    cos, per_layer = gapt.grad_alignment(tiny_gpt(n_layer=4), x, x.roll(-1, 1), cfg)
    assert -1 <= cos < 0.99 and all(-1 <= c < 0.99 for c in per_layer[:3])
    assert per_layer[3] == 0                                          # above the last layer in M: no grad(M)


def test_padded_arithmetic_trains_on_every_token_with_loss_all_but_tests_answers():
    A = data.Arithmetic(0, 24, loss="all")
    x, y = A.batch(16)
    assert torch.equal((y >= 0).sum(1), (x != data.PAD).sum(1) - 1)   # every token after <bos>
    xe, ye = A.eval_sets()["id"]
    assert ((ye >= 0).sum(1) < (xe != data.PAD).sum(1) - 3).all()     # the answer only

# -----------------------------------------------------------------------------
# issue 22: the last fault cases, each one line, by handlers that cover a class of failure


def test_log_records_with_wrong_fields_are_skipped_as_damaged_lines(tmp_path, capsys):
    out = tmp_path / "run"
    assert small_run(out)[0] == 0
    lines = (out / "log.jsonl").read_text().splitlines(True)
    assert [json.loads(lines[i])["step"] for i in (2, 4, 5)] == [2, 3, 4]   # train records
    lines[2] = lines[2].replace('"ce":', '"cf":')                     # a key renamed
    lines[4] = lines[4].replace('"step": 3', '"step": "x"')           # a step that is not one
    lines[5] = lines[5].replace('"phase": 1, ', '')                   # a field gone
    (out / "log.jsonl").write_text("".join(lines))
    (out / "curves.png").unlink()
    capsys.readouterr()
    assert small_run(out, "--max_iters=6", "--init_from=resume")[0] == 0   # was a traceback, every time
    said = capsys.readouterr().out
    assert "skipped 1 damaged line(s): 5" in said                     # the resume drops the step "x"
    assert "skipped 2 damaged line(s): 3, 5" in said and "done: 2 steps" in said   # the summary the others
    assert (out / "curves.png").exists() and [r["step"] for r in read_log(out, "train", "ce", "phase")] == [1, 5, 6]


def test_sigterm_stops_a_run_as_ctrl_c_does(tmp_path):
    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, os.path.join(HERE, "gapt.py"), *FAST, "--max_iters=999",
                          f"--out_dir={out}"], cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in p.stdout:
        if line.startswith("step     3"):                               # after the step-2 checkpoint
            break
    p.terminate()
    _, err = p.communicate(timeout=60)
    assert p.returncode == 143 and err.count("\n") == 1 and err.startswith("stopped (SIGTERM)"), err
    assert err.strip().endswith(f"--out_dir={out} --init_from=resume")   # was silent


def test_under_torchrun_sigterm_to_rank_0_is_its_one_line(tmp_path):
    # torchrun sends SIGTERM to the workers left when one dies: rank 0 must still say what was saved
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    cmd = [sys.executable, os.path.join(HERE, "gapt.py"), "--device=cpu", "--n_layer=1", "--n_head=2",
           "--n_embd=16", "--batch_size=4", "--log_interval=1", "--eval_interval=2", "--n_eval=16",
           "--max_iters=100000", "--dist_timeout=20", f"--out_dir={tmp_path / 'run'}"]
    env = dict(os.environ, WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    procs = [subprocess.Popen(cmd, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=dict(env, RANK=str(r), LOCAL_RANK=str(r))) for r in (0, 1)]
    try:
        for line in procs[0].stdout:
            if line.startswith("step     3"):
                break
        procs[0].terminate()
        _, err = procs[0].communicate(timeout=60)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert procs[0].returncode == 143 and err.count("\n") == 1 and err.startswith("stopped (SIGTERM)"), err
    assert "resume: torchrun --standalone --nproc_per_node=2" in err


def test_a_diverging_forgetting_toy_stops_and_results_json_is_strict(tmp_path, capsys, monkeypatch):
    code = experiments.main(["--task=forgetting", "--learning_rate=1e30", "--max_iters=50",
                             f"--out_dir={tmp_path / 'toy'}"])
    one_line_error(code, capsys.readouterr().err, 1, "non-finite")      # was exit 0 with nan metrics
    assert len(read_log(tmp_path / "toy", "skip")) == 3
    real = experiments.forgetting_eval

    def nan_separation(*a):
        return dict(real(*a), separation=float("nan"))
    monkeypatch.setattr(experiments, "forgetting_eval", nan_separation)
    out = tmp_path / "cmp"
    assert experiments.main(["--task=forgetting", "--compare=memorize,gapt", "--seeds=2", "--max_iters=5",
                             f"--out_dir={out}"]) == 0
    text = (out / "results.json").read_text()
    table = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in results.json"))
    assert table["gapt"]["separation"] == [None, None] and table["gapt"]["vs_memorize"]["separation"]["diff"] is None
    assert isinstance(table["gapt"]["loss_B"][0], float)


def test_data_py_on_a_full_disk_is_one_line_and_keeps_the_earlier_corpus(tmp_path, capsys, monkeypatch):
    docs = tmp_path / "d.txt"
    docs.write_text("\n\n".join(corpus(40)) + "\n")
    args = ["text", str(docs), "--out", str(tmp_path / "s"), "--shard_size", "200", "--tokenizer_file",
            tokenizer_file()]
    assert data.main(args) == 0
    before = {p: Path(p).read_bytes() for p in data.find_shards(tmp_path / "s", "train")}
    real = data.write_shard

    def full(path, tokens):
        real(path, tokens[:1])                                       # a shard, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(data, "write_shard", full)
    capsys.readouterr()
    one_line_error(data.main(args), capsys.readouterr().err, 1, "No space left", str(tmp_path / "s"))
    assert {p: Path(p).read_bytes() for p in data.find_shards(tmp_path / "s", "train")} == before
    assert not (tmp_path / "s" / ".partial").exists()


def test_resume_on_a_full_disk_names_the_log_and_leaves_no_tmp(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert small_run(out)[0] == 0
    real_open = open

    class Full:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *e):
            self.f.close()

        def write(self, b):
            raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(runs, "open", lambda p, m="r", *a, **k: Full(real_open(p, m)) if str(p).endswith("log.jsonl.tmp")
                        else real_open(p, m, *a, **k), raising=False)
    code, err = small_run(out, "--init_from=resume", "--max_iters=6", capsys=capsys)
    one_line_error(code, err, 2, "log.jsonl", "No space left")       # was "cannot write None"
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]


def test_a_shard_changed_under_a_text_run_is_one_line(text_dir, tmp_path, capsys, monkeypatch):
    shards, _ = text_dir
    mine = tmp_path / "shards"
    shutil.copytree(shards, mine)
    train = data.find_shards(mine, "train")
    real, calls = data.TokenShards.batch, [0]

    def changing(self, n):
        calls[0] += 1
        if calls[0] == 3:
            for p in train:                                          # rewritten shorter, or cut
                data.write_shard(p, data.read_shard(p)[:50]) if p == train[0] else os.truncate(p, 1024 + 100)
        return real(self, n)
    monkeypatch.setattr(data.TokenShards, "batch", changing)
    for p in train:
        assert len(data.read_shard(p)) > 51
    code = gapt.main(["--device=cpu", "--task=text", f"--data_dir={mine}", "--n_layer=1", "--n_head=2",
                      "--n_embd=16", "--block_size=16", "--batch_size=64", "--val_tokens=64", "--max_iters=5",
                      "--eval_interval=0", f"--out_dir={tmp_path / 'run'}"])
    one_line_error(code, capsys.readouterr().err, 1, "_train_")       # was a ValueError/IndexError traceback


def test_a_garbage_weights_pickle_is_our_line_only(tmp_path):
    (tmp_path / "w.bin").write_bytes(b"\x80\x04garbage")
    r = run_gapt("--task=text", "--init_from=gpt2", f"--weights={tmp_path / 'w.bin'}", f"--out_dir={tmp_path / 'o'}",
                 env=dict(os.environ))
    one_line_error(r.returncode, r.stderr, 2, "not a GPT-2 checkpoint")   # torch's UserWarning came first


def test_ctrl_c_while_torch_loads_is_one_line(tmp_path):
    p = subprocess.Popen([sys.executable, os.path.join(HERE, "gapt.py"), f"--out_dir={tmp_path}"], cwd=HERE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    maps = Path(f"/proc/{p.pid}/maps")
    while p.poll() is None and "numpy" not in maps.read_text():   # in the guarded imports, before torch
        pass
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and err.count("\n") == 1 and err.startswith("stopped (Ctrl-C)"), err


def test_a_checkpoint_whose_config_is_not_a_dict_is_damaged(tmp_path, capsys):
    out = tmp_path / "run"
    assert small_run(out)[0] == 0
    ck = runs.read_checkpoint(out / "ckpt.pt")
    for bad in ("not a dict", [1, 2]):                                # a valid checksum all the same
        runs.save_checkpoint(str(out / "ckpt.pt"), dict(ck, config=bad))
        one_line_error(*small_run(out, "--init_from=resume", capsys=capsys), 2, "damaged")

# -----------------------------------------------------------------------------
# issue 21: what a new user meets first


def test_the_controller_says_what_ended_each_phase():
    g = gapt.GAPT(delta_ce=0.1, delta_mbe=0.5, tau=0.5, p_m=1, p_c=2)
    assert trace(g, [(3.0, 1.0), (2.95, 1.0)]) == [1, 2]
    assert g.why == {"reason": "CE plateau", "ce": 2.95, "best_ce": 2.95}
    assert trace(g, [(2.0, 1.0), (3.1, 0.9)]) == [2, 1]              # 3.1 > 1.5 * 2.0
    assert g.why == {"reason": "CE spike", "ce": 3.1, "best_ce": 2.0}
    trace(g, [(2.9, 1.0)])                                           # compressing again
    assert trace(g, [(2.9, 1.0), (2.9, 0.9), (2.9, 0.8)]) == [2, 2, 1]   # no gain > 0.5 in 2 steps
    assert g.why == {"reason": "MBE plateau", "mbe": 0.8, "best_mbe": 0.8}


def test_each_switch_is_a_line_and_a_record_and_the_summary_counts_them(tmp_path):
    out = tmp_path / "run"
    r = run_gapt(*STEADY, "--max_iters=40", "--eval_interval=20", "--tau=0.05", f"--out_dir={out}")
    assert r.returncode == 0, r.stderr
    train, switches = read_log(out, "train"), read_log(out, "switch")
    changes = [(a["step"], b["phase"]) for a, b in zip(train, train[1:]) if a["phase"] != b["phase"]]
    assert [(s["step"], s["phase"]) for s in switches] == changes and len(changes) >= 2
    reasons = [s["reason"] for s in switches]
    assert len(set(reasons)) >= 2 and set(reasons) <= {"CE plateau", "CE spike", "MBE plateau"}
    for s in switches:
        assert f"step {s['step']:>5} | {gapt.PHASES[3 - s['phase']]} -> {gapt.PHASES[s['phase']]} | {s['reason']}" \
            in r.stdout
    counts = ", ".join(f"{n} {reasons.count(n)}" for n in sorted(set(reasons)))
    assert f"phase switches {len(switches)} ({counts})" in r.stdout


def test_the_console_opens_with_the_changed_flags_and_counts_the_time(tmp_path):
    r = run_gapt(*TINY, "--max_iters=3", "--warmup_iters=5", "--eval_interval=0", f"--out_dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    first = r.stdout.splitlines()[0]
    assert first.startswith("config: ") and "--n_embd=32" in first and "--p_m" not in first   # not the defaults
    assert "--max_iters=3 <= --warmup_iters=5: the learning rate never reaches its peak" in r.stdout
    assert re.search(r"step +3/3 \|.* \| \d+m\d\ds, ETA 0m00s", r.stdout), r.stdout


def test_sampling_an_arithmetic_checkpoint_shows_the_answer_in_reading_order(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    assert small_run(out)[0] == 0
    capsys.readouterr()
    said = [data.ARITH_STOI[c] for c in "65"] + [data.EOS]                 # 56, least-significant digit first
    monkeypatch.setattr(gapt.GPT, "generate", lambda m, idx, *a, **k: torch.cat(
        [idx, torch.tensor([said] * len(idx))], 1))
    assert sample.main(["--device=cpu", f"--out_dir={out}", "--start= 7x8 ="]) == 0
    assert capsys.readouterr().out == "7 x 8 = 56   right (written 65)\n"
    monkeypatch.undo()
    assert sample.main(["--device=cpu", f"--out_dir={out}", "--start=7 x 8", "--temperature=1",
                        "--num_samples=4", "--top_k=3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and all(re.fullmatch(r"7 x 8 = .* +(right|wrong: 56)( \(written \d+\))?", l)
                                   for l in lines), lines
    assert sample.main(["--device=cpu", f"--out_dir={out}", "--ckpt=best"]) == 0     # the run's examples
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all(re.fullmatch(r"\d+ x \d+ = .*(right|wrong: \d+).*", l) for l in lines)
    code = sample.main(["--device=cpu", f"--out_dir={out}", "--start=hello"])
    one_line_error(code, capsys.readouterr().err, 2, "like '7 x 8'")
    code = sample.main(["--device=cpu", f"--out_dir={tmp_path / 'none'}", "--start=7 x 8"])
    one_line_error(code, capsys.readouterr().err, 2, "no checkpoint")
    code = gapt.main(["--device=cpu", f"--out_dir={out}", "--sample=7 x 8"])   # moved: named
    one_line_error(code, capsys.readouterr().err, 2, "python sample.py", "'--start=7 x 8'")


def test_generate_is_greedy_at_temperature_zero_and_stops_at_the_stop_token():
    model = tiny_gpt(T=16, vocab=16).eval()
    idx = torch.randint(16, (2, 3))
    out = model.generate(idx, 5)
    want = idx
    for _ in range(5):
        want = torch.cat([want, model(want)[0][:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, want)
    first = int(want[0, 3])
    stopped = model.generate(idx[:1], 5, stop=first)
    assert stopped.shape == (1, 4)                                        # done at the stop token


def test_sampling_a_text_checkpoint_continues_the_prompt(text_dir, tmp_path, capsys):
    shards, _ = text_dir
    out = tmp_path / "run"
    assert gapt.main(["--device=cpu", "--task=text", f"--data_dir={shards}", "--n_layer=1", "--n_head=2",
                      "--n_embd=16", "--block_size=16", "--batch_size=4", "--val_tokens=64", "--max_iters=2",
                      f"--tokenizer_file={tokenizer_file()}", f"--out_dir={out}"]) == 0
    capsys.readouterr()
    assert sample.main(["--device=cpu", f"--out_dir={out}", "--start=The model", "--temperature=0.8",
                        "--num_samples=2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all(l.startswith("'The model") for l in lines)


def test_the_val_tokens_error_names_the_largest_value_that_fits(text_dir, tmp_path, capsys):
    shards, _ = text_dir
    args = ["--device=cpu", "--task=text", f"--data_dir={shards}", "--n_layer=1", "--n_head=2", "--n_embd=16",
            "--block_size=16", "--batch_size=4", "--max_iters=1", f"--out_dir={tmp_path / 'run'}"]
    code = gapt.main([*args, "--val_tokens=100000000"])
    err = capsys.readouterr().err
    one_line_error(code, err, 2, "at most --val_tokens=")
    fits = int(re.search(r"at most --val_tokens=(\d+)", err).group(1))
    assert fits % 16 == 0 and gapt.main([*args, f"--val_tokens={fits}"]) == 0
    capsys.readouterr()
    one_line_error(gapt.main([*args, f"--val_tokens={fits + 16}"]), capsys.readouterr().err, 2, str(fits))

# -----------------------------------------------------------------------------
# issue 20: arms with flags, unpaired arms, selection on the test set


def test_each_arms_flags_reach_its_run_and_results_json(tmp_path):
    out = tmp_path / "cmp"
    r = run_exp(*TINY, "--max_iters=4", "--eval_interval=2", "--n_eval=32", "--seeds=2", f"--out_dir={out}",
                "--compare=memorize,gapt:tau=0.5:p_m=2,memorize:batch_size=8")
    assert r.returncode == 0, r.stderr
    for arm, want in (("memorize", {"tau": 0.1, "batch_size": 16}), ("gapt:tau=0.5:p_m=2", {"tau": 0.5, "p_m": 2}),
                      ("memorize:batch_size=8", {"batch_size": 8, "phase_mode": "memorize"})):
        for s in range(2):
            c = json.loads((out / f"{arm}_seed{s}" / "config.json").read_text())
            assert {k: c[k] for k in want} == want and c["seed"] == 1337 + s
    table = json.loads((out / "results.json").read_text())
    assert table["gapt:tau=0.5:p_m=2"]["flags"] == {"tau": 0.5, "p_m": 2, "phase_mode": "gapt"}
    assert "| gapt:tau=0.5:p_m=2 (paired) |" in r.stdout and "| memorize:batch_size=8 (Welch) |" in r.stdout
    for bad in ("memorize,sleep", "gapt,gapt", "gapt:nope=1", "gapt:tau=x"):
        r = run_exp(*TINY, f"--compare={bad}", f"--out_dir={tmp_path / 'bad'}")
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and not (tmp_path / "bad").exists(), r.stderr


def test_welch_interval_is_the_hand_computed_one():
    # base 1, 2, 3, 4 (mean 2.5, var 5/3), other 2, 4, 6 (mean 4, var 4): se^2 = 5/12 + 4/3 = 1.75,
    # df = 1.75^2 / ((5/12)^2 / 3 + (4/3)^2 / 2) = 3.30 -> 3, t_{0.975, 3} = 3.1824
    r = experiments.welch_diff([1, 2, 3, 4], [2, 4, 6])
    half = 3.1824 * math.sqrt(1.75)
    assert r["diff"] == 1.5 and r["ci95"] == pytest.approx([1.5 - half, 1.5 + half], abs=1e-3)
    assert experiments.welch_diff([1.0], [2.0, 3.0])["ci95"] is None
    assert experiments.welch_diff([1, 1], [2, 2]) == {"diff": 1.0, "ci95": [1.0, 1.0]}


def test_selection_on_the_test_set_is_each_runs_eval_of_lowest_ood_ce(tmp_path, capsys):
    logs = {"memorize": [[(1, 5.0, 0.1), (2, 4.0, 0.2), (3, 4.5, 0.3)], [(1, 3.0, 0.5), (2, 3.5, 0.6), (3, 3.2, 0.7)]],
            "gapt": [[(1, 4.8, 0.0), (2, 4.9, 0.1), (3, 3.9, 0.2)], [(1, 2.0, 0.9), (2, 2.5, 0.8), (3, 2.9, 0.7)]]}
    dirs = {}
    for arm, runs in logs.items():
        for s, run in enumerate(runs):
            d = tmp_path / f"{arm}_seed{s}"
            d.mkdir()
            recs = [{"kind": "eval", "step": st, "ood_ce": ce, "id_acc": acc} for st, ce, acc in run]
            recs += [{"kind": "train", "step": 1, "phase": 2 if arm == "gapt" else 1, "ce": 1.0, "mbe": 1.0}]
            (d / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
            dirs.setdefault(arm, []).append(str(d))
    table = experiments.compare_table(dirs)
    # by hand: memorize picks (2, 4.0, 0.2) and (1, 3.0, 0.5); gapt (3, 3.9, 0.2) and (1, 2.0, 0.9)
    assert table["memorize"]["test_selected"]["id_acc"][0] == pytest.approx(0.35)
    assert table["gapt"]["test_selected"]["ood_ce"][0] == pytest.approx(2.95)
    assert table["gapt"]["test_selected"]["vs_memorize"]["ood_ce"]["diff"] == pytest.approx(2.95 - 3.5)
    assert table["gapt"]["test_selected_vs_final"]["ood_ce"]["diff"] == pytest.approx(2.95 - (4.5 + 3.2) / 2)
    assert table["gapt"]["ood_ce"][0] == pytest.approx((3.9 + 2.9) / 2)       # the final evals, as before
    assert table["gapt"]["compressing"][0] == 1.0 and table["memorize"]["compressing"][0] == 0.0
    out = capsys.readouterr().out
    assert "Selected on the test set" in out and "optimistic" in out and "(steps 1-3)" in out

# -----------------------------------------------------------------------------
# issue 28: the method end to end through gapt.main, a new task in one place, a new controller field


def test_compress_lowers_the_training_mbe_far_below_memorize_on_the_same_seed(tmp_path):
    last = {}
    for mode in ("memorize", "compress"):
        r = run_gapt(*TINY, "--max_iters=30", "--eval_interval=0", f"--phase_mode={mode}",
                     f"--out_dir={tmp_path / mode}")
        assert r.returncode == 0, r.stderr
        last[mode] = np.mean([t["mbe"] for t in read_log(tmp_path / mode, "train")[-5:]])
    assert last["compress"] < 0.5 * last["memorize"], last       # GAPT that never compresses fails


def test_mbe_weight_zero_is_memorize_and_two_differs_from_one(tmp_path):
    ces = {}
    for name, flags in (("memorize", ["--phase_mode=memorize"]),
                        ("w0", ["--phase_mode=compress", "--mbe_weight=0"]),
                        ("w1", ["--phase_mode=compress", "--mbe_weight=1"]),
                        ("w2", ["--phase_mode=compress", "--mbe_weight=2"])):
        r = run_gapt(*TINY, "--max_iters=8", "--eval_interval=0", *flags, f"--out_dir={tmp_path / name}")
        assert r.returncode == 0, r.stderr
        ces[name] = [t["ce"] for t in read_log(tmp_path / name, "train")]
    assert ces["w0"] == pytest.approx(ces["memorize"], rel=1e-5)      # the weight reaches the loss
    assert ces["w2"][2:] != pytest.approx(ces["w1"][2:], rel=1e-4)


def test_inner_regularises_exactly_layers_1_to_n_minus_2(tmp_path):
    out = tmp_path / "run"
    r = run_gapt("--n_layer=5", "--n_head=2", "--n_embd=32", "--batch_size=16", "--max_iters=1",
                 "--eval_interval=0", "--phase_mode=compress", f"--out_dir={out}")
    assert r.returncode == 0, r.stderr
    cfg = gapt.resolve(gapt.parse_args(["--n_layer=5", "--n_head=2", "--n_embd=32", "--batch_size=16"]))
    loader, _ = gapt.make_data(cfg, 0, 1)
    model, _ = gapt.build(cfg, torch.device("cpu"))
    x, y = loader.batch(16)                                          # step 1's batch and weights
    per_layer = gapt.layer_mbe(model(x, y)[2], range(5), cfg["patch_size"])
    logged = read_log(out, "train")[0]["mbe"]
    assert logged == pytest.approx(per_layer[1:4].mean().item(), rel=1e-5)   # M: layers 1, 2, 3
    assert logged != pytest.approx(per_layer.mean().item(), rel=1e-3)


def test_the_schedule_is_cosine_in_its_middle():
    cfg = dict(gapt.DEFAULTS, learning_rate=1e-3, min_lr=1e-4, warmup_iters=100, max_iters=1100)
    assert gapt.get_lr(600, cfg) == pytest.approx(0.55e-3)              # halfway: the mean of the two
    assert gapt.get_lr(350, cfg) == pytest.approx(1e-4 + 0.9e-3 * (1 + math.cos(math.pi / 4)) / 2)


def test_gradient_alignment_is_plus_one_for_the_same_objective_and_minus_one_for_its_opposite(monkeypatch):
    class Toy(torch.nn.Module):        # CE = |w|^2, and M the same (or its negative) of the one layer
        def __init__(self):
            super().__init__()
            self.transformer = torch.nn.ModuleDict({"h": torch.nn.ModuleList([torch.nn.Linear(3, 3)])})

        def forward(self, x, y):
            w = self.transformer.h[0].weight
            return None, w.square().sum(), [w[None]]
    cfg = {"layers": [0], "patch_size": 3, "n_layer": 1}
    for sign in (1.0, -1.0):
        monkeypatch.setattr(gapt, "layer_mbe", lambda hs, layers, p, s=sign: s * hs[0].square().sum()[None])
        cos, per_layer = gapt.grad_alignment(Toy(), None, None, cfg)
        assert cos == pytest.approx(sign) and per_layer == [pytest.approx(sign)]


def test_a_new_task_is_one_entry_in_tasks(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(gapt.TASKS, "times", gapt.TASKS["arithmetic"])   # a fork's new task, as a copy
    out = tmp_path / "run"
    assert gapt.main([*FAST, "--task=times", "--max_iters=4", f"--out_dir={out}"]) == 0
    assert read_log(out, "eval")[-1]["step"] == 4 and (out / "curves.png").exists()
    assert "sample: " in capsys.readouterr().out                      # the run's end samples it too
    assert sample.main(["--device=cpu", f"--out_dir={out}", "--start=3 x 4"]) == 0
    assert re.match(r"3 x 4 = .*(right|wrong: 12)", capsys.readouterr().out)
    cmp = tmp_path / "cmp"
    assert experiments.main([*FAST, "--task=times", "--max_iters=2", "--seeds=1", f"--out_dir={cmp}",
                             "--compare=memorize,gapt"]) == 0
    assert (cmp / "times.png").exists() and (cmp / "phases.png").exists()
    assert sorted(json.loads((cmp / "results.json").read_text())) == ["gapt", "memorize"]
    assert experiments.main([*FAST, "--task=times", "--max_iters=2", "--seeds=1", f"--out_dir={cmp}",
                             "--compare=memorize"]) == 0              # a fresh one moves every figure
    assert (cmp / "earlier" / "1" / "times.png").exists()


def test_a_new_controller_field_is_saved_and_resumed_without_a_second_edit(tmp_path, monkeypatch):
    class Counting(gapt.GAPT):                                       # a fork's new rule, say an EMA
        def __init__(self, *a):
            super().__init__(*a)
            self.seen = 0

        def step(self, ce, mbe):
            self.seen += 1
            return super().step(ce, mbe)
    monkeypatch.setattr(gapt, "GAPT", Counting)
    out = tmp_path / "run"
    assert small_run(out)[0] == 0
    assert runs.read_checkpoint(out / "ckpt.pt")["gapt"]["seen"] == 4
    assert small_run(out, "--init_from=resume", "--max_iters=6")[0] == 0
    assert runs.read_checkpoint(out / "ckpt.pt")["gapt"]["seen"] == 6   # 4 restored, then 2 more

# -----------------------------------------------------------------------------
# issue 31: the smoothed controller (--gapt_ema), a variant


def test_the_smoothed_controller_ignores_a_one_step_spike_the_plain_one_switches_on():
    plain, smooth = gapt.GAPT(p_m=2, tau=0.1), gapt.GAPT(p_m=2, tau=0.1, ema=0.9)
    for c in (plain, smooth):                                        # CE flat: compress after 3 steps
        assert [c.step(1.0, 1.0) for _ in range(4)] == [1, 1, 2, 2]
    assert plain.step(1.3, 0.9) == gapt.MEMORIZE and plain.why["reason"] == "CE spike"   # noise
    assert smooth.step(1.3, 0.9) == gapt.COMPRESS                    # its average rose 3%: no spike


def test_the_smoothed_controller_compresses_where_outliers_keep_the_plain_one_memorising():
    plain, smooth = gapt.GAPT(p_m=3), gapt.GAPT(p_m=3, ema=0.9)
    ces = [1.0, 0.98, 1.0, 0.96, 1.0, 0.94, 1.0, 0.92, 1.0, 0.90]   # a low outlier every other step
    assert {plain.step(ce, 1.0) for ce in ces} == {gapt.MEMORIZE}    # each a new best by 0.02
    assert [smooth.step(ce, 1.0) for ce in ces][3] == gapt.COMPRESS  # its average: a plateau


def test_the_smoothed_controller_resumes_exactly():
    seq = [(2.0 - 0.01 * i + 0.1 * (i % 3), 1.0 - 0.002 * i) for i in range(60)]
    a = gapt.GAPT(p_m=5, p_c=5, ema=0.9)
    phases = [a.step(*v) for v in seq]
    b = gapt.GAPT(p_m=5, p_c=5, ema=0.9)
    for v in seq[:30]:
        b.step(*v)
    c = gapt.GAPT(p_m=5, p_c=5, ema=0.9)
    c.load_state_dict(json.loads(json.dumps(b.state_dict())))     # through a checkpoint's config
    assert [c.step(*v) for v in seq[30:]] == phases[30:] and c.state_dict() == a.state_dict()
    assert b.state_dict()["ce_avg"] is not None and "ema" not in b.state_dict()   # state, not settings

# -----------------------------------------------------------------------------
# issue 30: best.pt, curves with the evals, a checkpoint torch.load opens


def test_best_pt_holds_the_best_evals_weights(tmp_path):
    out = tmp_path / "run"
    assert small_run(out, "--max_iters=8", "--learning_rate=0.05", "--min_lr=0.05")[0] == 0
    evals = [e for e in read_log(out, "eval") if e["step"]]
    best = min(evals, key=lambda e: e["id_ce"])
    ck = runs.read_checkpoint(out / "best.pt")
    assert ck["step"] == best["step"] and ck["best"] == {"step": best["step"], "id_ce": best["id_ce"]}
    cfg = gapt.resolve(ck["config"])
    model = gapt.GPT(gapt.GPTConfig(**{k: cfg[k] for k in gapt.GPTConfig.__dataclass_fields__}))
    model.load_state_dict(ck["model"])
    _, evals_sets = gapt.make_data(cfg, 0, 1)
    again = gapt.run_eval(model, evals_sets, cfg, torch.device("cpu"), nullcontext())
    assert again["id_ce"] == pytest.approx(best["id_ce"], rel=1e-5)
    assert runs.read_checkpoint(out / "ckpt.pt")["step"] == 8       # the latest resumes


def test_curves_png_draws_the_eval_steps(tmp_path, monkeypatch):
    out = tmp_path / "run"
    figs = []
    real = report.pyplot

    def keep():
        plt = real()
        monkeypatch.setattr(plt, "close", figs.append)
        return plt
    monkeypatch.setattr(report, "pyplot", keep)
    assert small_run(out)[0] == 0
    lines = {l.get_label(): l for ax in figs[0].axes for l in ax.get_lines()}
    assert list(lines["id_ce"].get_xdata()) == [e["step"] for e in read_log(out, "eval")]
    assert list(lines["ood_acc"].get_ydata()) == [e["ood_acc"] for e in read_log(out, "eval")]
    assert "arithmetic" in figs[0].axes[0].get_title() and str(out) in figs[0].axes[0].get_title()


def test_torch_load_opens_a_checkpoint_and_a_flipped_byte_is_still_named(tmp_path, capsys):
    out = tmp_path / "run"
    assert small_run(out)[0] == 0
    ck = torch.load(out / "ckpt.pt", weights_only=False)             # the first thing a user types
    assert ck["step"] == 4 and ck["config"]["task"] == "arithmetic"
    blob = bytearray((out / "ckpt.pt").read_bytes())
    blob[len(blob) // 2] ^= 1
    (out / "ckpt.pt").write_bytes(bytes(blob))
    with pytest.raises(runs.ConfigError, match="checksum does not match"):
        runs.read_checkpoint(out / "ckpt.pt")
    one_line_error(sample.main(["--device=cpu", f"--out_dir={out}"]), capsys.readouterr().err, 2, "checksum")
    one_line_error(*small_run(out, "--init_from=resume", capsys=capsys), 2, "checksum")


def test_a_checkpoint_written_with_the_older_header_still_loads(tmp_path):
    import hashlib
    buf = io.BytesIO()
    torch.save({"model": {}, "config": {}, "step": 3}, buf)
    payload = buf.getvalue()
    (tmp_path / "old.pt").write_bytes(b"GAPT-CKPT sha256 " + hashlib.sha256(payload).hexdigest().encode()
                                      + b"\n" + payload)
    assert runs.read_checkpoint(tmp_path / "old.pt")["step"] == 3

# -----------------------------------------------------------------------------
# issue 29: a resume continues the run that was started; faults that were tracebacks


def test_a_resume_with_no_flags_continues_the_run_as_it_was_started(tmp_path, capsys):
    run = [*FAST, "--batch_size=8", "--max_iters=6", "--learning_rate=0.003"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert gapt.main([*run, f"--out_dir={straight}"]) == 0
    assert gapt.main([*run[:-2], "--max_iters=4", "--learning_rate=0.003", f"--out_dir={stopped}"]) == 0
    capsys.readouterr()
    assert gapt.main(["--device=cpu", "--init_from=resume", "--max_iters=6", f"--out_dir={stopped}"]) == 0
    assert "replaces" not in capsys.readouterr().out.replace("--max_iters=6 replaces", "")   # but the end
    assert without_timing(read_log(stopped, "train")) == without_timing(read_log(straight, "train"))
    assert json.loads((stopped / "config.json").read_text())["batch_size"] == 8
    assert gapt.main(["--device=cpu", "--init_from=resume", "--max_iters=7", "--batch_size=4",
                      f"--out_dir={stopped}"]) == 0                   # a given value is said and kept
    assert "resume: --batch_size=4 replaces the run's 8" in capsys.readouterr().out
    assert json.loads((stopped / "config.json").read_text())["batch_size"] == 4


def test_a_failing_resume_or_weights_check_writes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert small_run(out)[0] == 0
    before = (out / "config.json").read_bytes()
    (out / "log.jsonl").unlink()
    (out / "log.jsonl").mkdir()
    one_line_error(*small_run(out, "--init_from=resume", "--max_iters=6", capsys=capsys), 2, "log.jsonl")
    assert (out / "config.json").read_bytes() == before


@pytest.mark.parametrize("n_head", [0, -2, "1e400", '"4"'])
def test_a_bad_n_head_beside_gpt2_weights_is_one_line_and_writes_nothing(tmp_path, capsys, n_head):
    hf = tmp_path / "hf"
    save_tiny_gpt2(hf)
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps(config).replace('"n_head": 2', f'"n_head": {n_head}'))
    out = tmp_path / "run"
    capsys.readouterr()                                              # transformers' progress bars
    code = gapt.main(["--device=cpu", "--task=text", "--init_from=gpt2", f"--weights={hf}",
                      f"--out_dir={out}"])
    one_line_error(code, capsys.readouterr().err, 2, "n_head")
    assert not out.exists()


def test_a_fresh_comparison_moves_a_single_run_in_its_folder_whole(tmp_path, capsys):
    out = tmp_path / "run"
    assert small_run(out)[0] == 0
    kept = sorted(p for p in os.listdir(out) if not p.startswith("."))
    assert experiments.main([*FAST, "--task=forgetting", "--compare=gapt", "--seeds=1", "--max_iters=4",
                             f"--out_dir={out}"]) == 0
    assert sorted(os.listdir(out / "earlier" / "1")) == kept and "ckpt.pt" in kept and "best.pt" in kept
    assert not (out / "ckpt.pt").exists()


@pytest.mark.parametrize("content", [b"", b"garbage\x00\x01", "tensor", "headerless"])
def test_sampling_from_a_damaged_checkpoint_is_one_line(tmp_path, capsys, content):
    out = tmp_path / "run"
    out.mkdir()
    if content == "tensor":                                          # checksummed, but no checkpoint
        runs.save_checkpoint(str(out / "ckpt.pt"), torch.ones(3))
    elif content == "headerless":                                    # a bare torch.save of the wrong thing
        torch.save([1, 2], out / "ckpt.pt")
    else:
        (out / "ckpt.pt").write_bytes(content)
    one_line_error(sample.main(["--device=cpu", f"--out_dir={out}"]), capsys.readouterr().err, 2, "damaged")


def test_a_tiny_temperature_is_greedy_and_ctrl_c_while_sampling_is_one_line(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert small_run(out)[0] == 0
    capsys.readouterr()
    assert sample.main(["--device=cpu", f"--out_dir={out}", "--start=7 x 8"]) == 0
    greedy = capsys.readouterr().out
    assert sample.main(["--device=cpu", f"--out_dir={out}", "--start=7 x 8", "--temperature=1e-300"]) == 0
    assert capsys.readouterr().out == greedy

    def stop(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(gapt.GPT, "generate", stop)
    assert sample.main(["--device=cpu", f"--out_dir={out}", "--start=7 x 8"]) == 130
    assert capsys.readouterr().err == "stopped (Ctrl-C)\n"


@pytest.mark.parametrize("key, value", [("task", "nosuch"), ("seed", "abc"), ("n_layer", "abc")])
def test_a_resumed_comparison_with_a_damaged_config_is_one_line(tmp_path, capsys, key, value):
    out = tmp_path / "cmp"
    args = [*FAST, "--max_iters=2", "--seeds=1", "--compare=memorize", f"--out_dir={out}"]
    assert experiments.main(args) == 0
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(dict(config, **{key: value})))
    capsys.readouterr()
    one_line_error(experiments.main([*args, "--init_from=resume"]), capsys.readouterr().err, 2, key)


@pytest.mark.parametrize("spec, msg", [("gapt:tau=1:tau=2", "twice"), ("gapt:phase_mode=memorize", "sets it"),
                                       ("memorize,gapt:init_from=gpt2", "sets it"), ("gapt:sample=1", "sample")])
def test_compare_specs_that_cannot_mean_what_they_say_are_refused(tmp_path, capsys, spec, msg):
    out = tmp_path / "cmp"
    code = experiments.main([*FAST, f"--compare={spec}", f"--out_dir={out}"])
    one_line_error(code, capsys.readouterr().err, 2, msg)
    assert not out.exists()


def test_a_figure_folder_that_cannot_be_written_is_found_before_any_arm_trains(tmp_path, capsys, monkeypatch):
    def refuse(*a, **k):                                             # as a read-only folder (root ignores chmod)
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(experiments.tempfile, "TemporaryFile", refuse)
    out = tmp_path / "cmp"
    code = experiments.main([*FAST, "--compare=memorize", f"--fig={tmp_path / 'figs' / 'a.png'}",
                             f"--out_dir={out}"])
    one_line_error(code, capsys.readouterr().err, 2, "--fig", "Permission denied")
    assert not out.exists()


def test_bad_input_paths_and_huge_values_are_one_line(tmp_path, capsys):
    for flag in ("--n_layer=1000000000000000000000000000000", "--n_embd=1000000000000000000000000000000"):
        one_line_error(gapt.main(["--device=cpu", flag, f"--out_dir={tmp_path / 'a'}"]),
                       capsys.readouterr().err, 2, flag.partition("=")[0])
    code = experiments.main(["--task=forgetting", "--forget_m=1e308", f"--out_dir={tmp_path / 'f'}"])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Warning" not in err, err       # one line, exit 0 or 1
    afile = tmp_path / "a\nfile"
    afile.write_text("")
    one_line_error(gapt.main(["--device=cpu", f"--out_dir={afile}"]), capsys.readouterr().err, 2,
                   repr(str(afile)))


def test_a_torch_warning_on_a_bare_tensor_checkpoint_is_not_printed(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    runs.save_checkpoint(str(out / "ckpt.pt"), torch.ones(3))
    import warnings
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        code = sample.main(["--device=cpu", f"--out_dir={out}"])
    assert code == 2 and not said, [str(w.message) for w in said]


@pytest.mark.parametrize("script, sig, code", [("gapt.py", signal.SIGTERM, 143), ("experiments.py", signal.SIGINT, 130),
                                               ("sample.py", signal.SIGTERM, 143)])
def test_a_signal_while_an_entry_script_imports_is_one_line(tmp_path, script, sig, code):
    p = subprocess.Popen([sys.executable, os.path.join(HERE, script), f"--out_dir={tmp_path}"], cwd=HERE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    maps = Path(f"/proc/{p.pid}/maps")
    while p.poll() is None and "numpy" not in maps.read_text():
        pass
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    assert p.returncode == code and err.count("\n") == 1 and err.startswith("stopped ("), err

# -----------------------------------------------------------------------------
# issues 29 and 30, data.py: the arithmetic prompt and answer of sample.py, the tokenizer travels
# with the corpus, input too small for two splits is refused, and a stop (Ctrl-C, SIGTERM) at any
# moment of `data.py text` is one line and keeps the earlier corpus


def folder(path):
    """Every file under path, hidden ones (.partial) too: {relative path: bytes}."""
    return {str(p.relative_to(path)): p.read_bytes() for p in Path(path).rglob("*") if p.is_file()}


def make_text(tmp_path, out, text, *more):
    """`data.py text` (in this process) on a file holding text, into out: its exit code."""
    path = tmp_path / f"in{len(list(tmp_path.glob('in*.txt')))}.txt"
    path.write_text(text)
    return data.main(["text", str(path), "--out", str(out), "--tokenizer_file", tokenizer_file(),
                      *more])

# -----------------------------------------------------------------------------
# the arithmetic task's prompt and answer, as sample.py shows them


def test_arith_prompt_and_show():
    for text in ("7 x 8", "7*8 =", " 7 x 8 = "):
        ids, stop, room = data.arith_prompt(text)
        assert data.arith_decode(ids) == "<bos>7 x 8 = " and stop == data.EOS and room >= 3
    answer = [data.ARITH_STOI[c] for c in "65"] + [data.EOS, data.ARITH_STOI["1"]]   # after <eos>: unread
    assert data.arith_show("7 x 8", answer, True) == "7 x 8 = 56   right (written 65)"
    assert data.arith_show("7 x 8", answer, False) == "7 x 8 = 65   wrong: 56"
    assert data.arith_show("7 x 8", [data.ARITH_STOI[c] for c in "56"], False) == "7 x 8 = 56   right"
    assert data.arith_show("7 x 8", [data.ARITH_STOI[c] for c in "5 x"], True) == \
        "7 x 8 = 5 x   wrong: 56"                                    # not an answer: as written
    for text in ("hello", "7 + 8", "7 x", "1234567890 x 2"):
        with pytest.raises(data.DataError, match="multiplies"):
            data.arith_prompt(text)

# -----------------------------------------------------------------------------
# the tokenizer travels with the corpus, as gpt2.tiktoken beside the shards


@pytest.fixture
def offline(monkeypatch):
    """No $GAPT_TOKENIZER_FILE, and tiktoken's own encoding fails as it does offline."""
    def no_download(name):
        raise ConnectionError("Max retries exceeded")
    monkeypatch.delenv("GAPT_TOKENIZER_FILE", raising=False)
    monkeypatch.setattr(data.tiktoken, "get_encoding", no_download)


def test_the_corpus_keeps_its_tokenizer_and_get_tokenizer_finds_it_offline(tmp_path, offline, monkeypatch):
    docs, out = corpus(30), tmp_path / "out"
    assert make_text(tmp_path, out, "\n\n".join(docs), "--shard_size", "300") == 0
    assert (out / "gpt2.tiktoken").read_bytes() == Path(tokenizer_file()).read_bytes()   # a copy, not a path
    assert sorted(p.name for p in out.iterdir() if not p.name.endswith(".bin")) == ["gpt2.tiktoken"]
    moved = tmp_path / "elsewhere"
    shutil.move(out, moved)                                          # the folder is self-contained
    enc, ref = data.get_tokenizer(None, moved), data.get_tokenizer(tokenizer_file())
    assert enc.decode(all_tokens(moved).tolist()) == "".join(EOT_TEXT + d for d in docs)
    text = "Naïve models compress 42 tokens."
    assert enc.encode_ordinary(text) == ref.encode_ordinary(text)
    assert enc.decode(enc.encode_ordinary(text)) == text
    assert data.get_tokenizer(None, str(moved)).encode_ordinary(text) == ref.encode_ordinary(text)  # a str
    # the order: the file given, then $GAPT_TOKENIZER_FILE, then the corpus's copy, then tiktoken's own
    (moved / "gpt2.tiktoken").write_text("not base64 ranks\n")      # a damaged copy is read, and named
    with pytest.raises(data.DataError, match="gpt2.tiktoken"):
        data.get_tokenizer(None, moved)
    assert data.get_tokenizer(tokenizer_file(), moved).encode_ordinary(text) == ref.encode_ordinary(text)
    monkeypatch.setenv("GAPT_TOKENIZER_FILE", tokenizer_file())
    assert data.get_tokenizer(None, moved).encode_ordinary(text) == ref.encode_ordinary(text)
    monkeypatch.delenv("GAPT_TOKENIZER_FILE")
    for corpus_dir in (tmp_path, None):                              # no copy there: tiktoken's own, offline
        with pytest.raises(data.Unavailable, match="TIKTOKEN_CACHE_DIR"):
            data.get_tokenizer(None, corpus_dir)


def test_the_tokenizer_copy_is_written_only_with_the_shards(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    monkeypatch.setenv("GAPT_TOKENIZER_FILE", tokenizer_file())    # $GAPT_TOKENIZER_FILE is copied too
    (tmp_path / "a.txt").write_text("\n\n".join(corpus(40)))
    assert data.main(["text", str(tmp_path / "a.txt"), "--out", str(out), "--shard_size", "300"]) == 0
    assert (out / "gpt2.tiktoken").read_bytes() == Path(tokenizer_file()).read_bytes()
    (out / "gpt2.tiktoken").write_bytes(b"the earlier corpus's copy")
    before = folder(out)
    real_write = data.write_shard

    def stop_at_train(path, tokens):                                 # a rewrite stopped after the val shard
        if "_train_" in str(path):
            raise KeyboardInterrupt
        real_write(path, tokens)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(data, "write_shard", stop_at_train)
        assert make_text(tmp_path, out, "\n\n".join(corpus(50, seed=1)), "--shard_size", "300") == 130
        assert make_text(tmp_path, tmp_path / "new", "\n\n".join(corpus(50)), "--shard_size", "300") == 130
    assert folder(out) == before and not (tmp_path / "new").exists()   # the earlier copy, as it was
    assert make_text(tmp_path, out, "\n\n".join(corpus(50, seed=1)), "--shard_size", "300") == 0
    assert (out / "gpt2.tiktoken").read_bytes() == Path(tokenizer_file()).read_bytes()
    jsonl = tmp_path / "fw.jsonl"                                    # and FineWeb's rows, read locally
    jsonl.write_text("".join(json.dumps({"text": d}) + "\n" for d in corpus(40)))
    assert data.main(["fineweb", "--local", str(jsonl), "--shards", "1", "--shard_size", "100",
                      "--out", str(tmp_path / "fw")]) == 0
    assert (tmp_path / "fw" / "gpt2.tiktoken").read_bytes() == Path(tokenizer_file()).read_bytes()
    capsys.readouterr()

# -----------------------------------------------------------------------------
# input too small for a val and a train split of 2 tokens each (an input and its target)


def test_input_too_small_for_two_splits_is_refused_before_the_earlier_corpus_is_touched(tmp_path, capsys):
    out = tmp_path / "out"
    assert make_text(tmp_path, out, "\n\n".join(corpus(40)), "--shard_size", "300") == 0
    before = folder(out)
    for text, n in (("hello\n", 2), ("hello world\n", 3)):          # <|endoftext|> first: 2 and 3 tokens
        capsys.readouterr()
        assert make_text(tmp_path, out, text) == 2                  # was 0, and a val and a train shard of 1
        one_line_error(2, capsys.readouterr().err, 2, f"{n} tokens", "too few")
        assert folder(out) == before                                # the earlier corpus, its copy: untouched
        assert make_text(tmp_path, tmp_path / "new", text) == 2 and not (tmp_path / "new").exists()
    (tmp_path / "word.txt").write_text("word\n")
    code, _, err = run_data("text", tmp_path / "word.txt", "--out", out, "--tokenizer_file", tokenizer_file())
    one_line_error(code, err, 2, "2 tokens")                          # and on the command line
    assert folder(out) == before


@pytest.mark.parametrize("text, val_fraction, split", [("hello big world\n", "0.1", (2, 2)),
                                                        ("hello big world again\n", "0.1", (2, 3)),
                                                        ("hello big world again\n", "0.9", (3, 2))])
def test_a_small_corpus_makes_val_and_train_of_at_least_two_tokens(tmp_path, text, val_fraction, split):
    # replaces test_gapt.py's test_small_corpus_makes_val_and_train, whose 3 tokens are now refused
    assert make_text(tmp_path, tmp_path / "out", text, "--val_fraction", val_fraction) == 0
    shards = data.find_shards(tmp_path / "out", "val") + data.find_shards(tmp_path / "out", "train")
    assert tuple(len(data.read_shard(p)) for p in shards) == split

# -----------------------------------------------------------------------------
# a stop, Ctrl-C or SIGTERM, at any moment of `data.py text`: one line, 130 or 143, the earlier
# corpus whole, no process left


def live(pgid):
    """The pids of the process group's processes that are still running (zombies aside)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()   # state, ppid, pgrp, ...
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


def threads(pid):
    """How many threads the process runs (0 once it has ended)."""
    try:
        return int(re.search(r"Threads:\s*(\d+)", Path(f"/proc/{pid}/status").read_text())[1])
    except OSError:
        return 0


@pytest.fixture(scope="module")
def big_text(tmp_path_factory):
    """~15 MB of text, ~3M tokens: `data.py text` tokenises it for seconds (2 cores)."""
    rng = np.random.default_rng(0)
    words = np.array("the a model learns forgets compresses tokens data entropy naïve 42 phase cycle"
                     .split())
    path = tmp_path_factory.mktemp("big") / "big.txt"
    path.write_text("\n\n".join(map(" ".join, rng.choice(words, size=(200_000, 12)))))
    return path


STOP_NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
@pytest.mark.parametrize("moment", ["the threads start", "tokenising", "writing shards"])
def test_a_stop_mid_run_is_one_line_and_keeps_the_earlier_corpus(tmp_path, big_text, moment, capsys):
    out = tmp_path / "out"
    assert make_text(tmp_path, out, "\n\n".join(corpus(40)), "--shard_size", "300") == 0
    before = folder(out)
    for sig in (signal.SIGINT, signal.SIGTERM):
        # its own process group, as a shell's job: Ctrl-C reaches every process of the run
        p = subprocess.Popen([sys.executable, data.__file__, "text", str(big_text), "--out", str(out),
                              "--shard_size", "2000", "--tokenizer_file", tokenizer_file()],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
        try:
            # until its tokenizer threads start, one a core: the main thread and numpy's (OpenBLAS:
            # one a core but one) make no more than a thread a core before
            while p.poll() is None and threads(p.pid) <= os.cpu_count():
                time.sleep(0.005)
            if moment == "tokenising":
                time.sleep(0.2)
            while moment == "writing shards" and p.poll() is None and not (out / ".partial").exists():
                time.sleep(0.005)
            assert p.poll() is None, "the run ended before the stop"
            os.killpg(p.pid, sig)
            _, err = p.communicate(timeout=60)
            for _ in range(100):                                     # nothing of the run is left
                if not live(p.pid):
                    break
                time.sleep(0.1)
            assert not live(p.pid), "a process of the run is left"
        finally:
            if live(p.pid):
                os.killpg(p.pid, signal.SIGKILL)
        assert p.returncode == 128 + sig and err.count("\n") == 1, err   # one line: no worker's traceback
        assert err.startswith(f"stopped ({STOP_NAMES[sig]}); --out holds") and "Traceback" not in err, err
        if "all in place" not in err:
            assert folder(out) == before, moment                    # the earlier corpus and its copy, whole
        else:                                                        # it came as the shards were moved in
            names = sorted(path.name for path in out.glob("*.bin"))
            assert names == [f"text_{'train' if i else 'val'}_{i:06d}.bin" for i in range(len(names))]
            assert not (out / ".partial").exists() and len(names) > 100
            shutil.rmtree(out)
            assert make_text(tmp_path, out, "\n\n".join(corpus(40)), "--shard_size", "300") == 0


def test_a_stop_while_the_shards_move_in_waits_until_the_new_corpus_is_whole(tmp_path, monkeypatch, capsys):
    out, new = tmp_path / "out", tmp_path / "new"
    assert make_text(tmp_path, out, "\n\n".join(corpus(120)), "--shard_size", "300") == 0     # 9 shards
    assert make_text(tmp_path, new, "\n\n".join(corpus(60, seed=1)), "--shard_size", "300") == 0   # 5
    expected, real_replace, sent = folder(new), os.replace, []

    def replace(src, dst):                                           # Ctrl-C as the first shard moves in
        if Path(dst).parent == out and not sent:
            sent.append(dst)
            os.kill(os.getpid(), signal.SIGINT)
        real_replace(src, dst)
    monkeypatch.setattr(os, "replace", replace)
    capsys.readouterr()
    assert make_text(tmp_path, out, "\n\n".join(corpus(60, seed=1)), "--shard_size", "300") == 130
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert sent and err == "stopped (Ctrl-C); --out holds the new shards, all in place\n", err
    assert folder(out) == expected                                   # was a mix of the two corpora


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_while_data_py_starts_is_one_line(tmp_path, sig):
    p = subprocess.Popen([sys.executable, data.__file__, "text", str(tmp_path / "none.txt"), "--out",
                          str(tmp_path / "out")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    maps = Path(f"/proc/{p.pid}/maps")
    while p.poll() is None and "numpy" not in maps.read_text(errors="replace"):   # in the imports,
        time.sleep(0.001)                                            # before torch
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 128 + sig and err.count("\n") == 1, err    # was a KeyboardInterrupt traceback
    assert err.startswith(f"stopped ({STOP_NAMES[sig]})") and not (tmp_path / "out").exists(), err
