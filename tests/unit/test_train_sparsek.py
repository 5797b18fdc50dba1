# SPDX-License-Identifier: Apache-2.0
"""SparseK scorer training (`vllm_sparse.train.sparsek`, `python -m vllm_sparse.train
sparsek` / `sparsek-fit` / `sparsek-eval`) on the tiny random Llama: distillation lowers the KL on a fixed
sequence, gradients reach weight and slope (not bias), resume continues the same run, the
saved file is a `SparseKScorer` with the k / window / meta given, and the KL measurement is
0 in the dense limit.

CI needs no apt download: the CLI tests train on a small generated text (`--data`); the
shipped scorer is fitted (`sparsek-fit`) on Debian's python3.11-doc (see configs/sparsek/README.md).
"""

import random

import pytest
import torch

from vllm_sparse.sparsek.hf_attention import SparseKParams, SparseKStep
from vllm_sparse.sparsek.scorer import SparseKScorer
from vllm_sparse.train import sparsek as S

LAYERS, KV_HEADS, HEAD = 4, 2, 64  # the tiny Llama


@pytest.fixture(scope="module")
def tiny(tiny_model):
    from vllm_sparse.train.nats_cli import load_model

    return load_model(tiny_model)


def _ids(model, length=96, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (1, length), generator=gen)


def _params(k=8, window=8, slope=-0.05, seed=0):
    params = SparseKParams(SparseKScorer.zeros(LAYERS, KV_HEADS, HEAD, k, window, slope=slope))
    with torch.no_grad():
        params.weight.normal_(0, 0.01, generator=torch.Generator().manual_seed(seed))
    return params


def test_step_kwargs_fresh_state_and_zero_penalty(tiny):
    from vllm_sparse.train.distill import _hidden

    model, _ = tiny
    method = S.SparseKMethod(_params(), query_block=32, detach_features=True)
    first, second = method.step_kwargs(), method.step_kwargs()
    assert isinstance(first["sparsek"], SparseKStep) and first["sparsek"] is not second["sparsek"]
    assert first["sparsek"].detach_features and first["sparsek"].params is method.params
    with torch.no_grad():
        _hidden(model, _ids(model), method.attn_name, first)
    penalty, metrics = method.regularizer(first)
    assert penalty.item() == 0.0
    assert sorted(first["sparsek"].top) == list(range(LAYERS))
    assert 0 < metrics["p_top"] <= 1 and 0 < metrics["free_top"] <= 1
    assert 0 < metrics["free_top_min"] <= metrics["free_top"]
    assert metrics["slope"] == pytest.approx(-0.05)
    assert second["sparsek"].top == {}  # untouched: each forward gets its own state


def test_gradients_reach_weight_and_slope_not_bias(tiny):
    from vllm_sparse.train.distill import DistillConfig, distill_step

    model, _ = tiny
    params = _params()
    loss, metrics = distill_step(model, S.SparseKMethod(params, query_block=32), _ids(model),
                                 DistillConfig(loss_chunk=40), lam=0.0)
    loss.backward()
    for grad in (params.weight.grad, params.slope.grad):
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    # b shifts all scores of a head alike: top-k and SPARSEK ignore it
    assert params.bias.grad.abs().max() < 1e-6 * params.slope.grad.abs().max() + 1e-9
    assert metrics["kl"] > 0 and metrics["free_top"] > 0
    assert all(p.grad is None for p in model.parameters())


def test_few_steps_reduce_kl(tiny, tmp_path):
    from vllm_sparse.train.distill import DistillConfig, distill

    model, _ = tiny
    ids = _ids(model, 96, seed=1)
    method = S.SparseKMethod(_params(k=6, window=8, slope=-0.02), query_block=48)
    cfg = DistillConfig(steps=4, lr=2e-2, weight_decay=0.0, lam=0.0, checkpoint_every=100,
                        loss_chunk=96)
    state = distill(model, method, lambda step: ids, cfg, tmp_path / "c.pt", progress=False)
    kls = [m["kl"] for m in state.history]
    assert kls[-1] < 0.8 * kls[0], kls
    assert state.history[0]["free_top"] > 0


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    words = ("scorer top window token cache query key value sparse dense slope sink "
             "model layer head train step loss").split()
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(120))
                                for _ in range(60)))
    return path


def _train(tiny_model, text_file, out, *extra):
    from vllm_sparse.train.__main__ import main

    return main(["sparsek", "--model", tiny_model, "--out", str(out), "--data", str(text_file),
                 "--seq-len", "64", "--k", "12", "--window", "8", "--query-block", "32",
                 "--init-slope", "-0.02", "--lr", "1e-2", "--checkpoint-every", "1",
                 "--no-progress", *extra])


def test_cli_trains_resumes_and_saves(tiny_model, text_file, tmp_path):
    straight = _train(tiny_model, text_file, tmp_path / "a.safetensors", "--steps", "2")
    _train(tiny_model, text_file, tmp_path / "b.safetensors", "--steps", "1")
    resumed = _train(tiny_model, text_file, tmp_path / "b.safetensors", "--steps", "2",
                     "--resume")
    loaded = SparseKScorer.load(tmp_path / "b.safetensors")
    assert torch.equal(loaded.weight, resumed.weight) and torch.equal(loaded.slope, resumed.slope)
    torch.testing.assert_close(resumed.weight, straight.weight)  # resume == uninterrupted
    torch.testing.assert_close(resumed.slope, straight.slope)
    assert not torch.equal(loaded.slope, torch.full_like(loaded.slope, -0.02))  # it trained
    assert (loaded.k, loaded.window, loaded.num_layers, loaded.num_kv_heads,
            loaded.head_size) == (12, 8, LAYERS, KV_HEADS, HEAD)
    meta = loaded.meta
    assert meta["steps"] == 2 and meta["tokens"] == 2 * 64 and meta["wall_time_s"] > 0
    assert meta["command"].startswith("python -m vllm_sparse.train sparsek")
    assert "--resume" in meta["command"] and str(text_file) in meta["data"]
    assert (meta["k"], meta["window"], meta["seq_len"], meta["lr"]) == (12, 8, 64, 1e-2)
    assert [h["step"] for h in meta["history"]] == [1, 2]
    assert all(h["kl"] > 0 and 0 <= h["free_top"] <= 1 for h in meta["history"])
    ckpt = torch.load(tmp_path / "b.safetensors.ckpt.pt", weights_only=False)
    assert ckpt["state"]["step"] == 2 and len(ckpt["state"]["history"]) == 2


def test_cli_eval(tiny_model, text_file, tmp_path):
    """k + window >= context: every token attended with weight 1, i.e. dense (KL 0);
    StreamingLLM at a small budget: KL > 0, p = 1 everywhere, no free entries."""
    from vllm_sparse.train.__main__ import main

    base = ["sparsek-eval", "--model", tiny_model, "--context", "96", "--windows", "1",
            "--data", str(text_file), "--query-block", "32"]
    dense = main(base + ["--slope", "-1", "--k", "100", "--window", "8"])
    assert abs(dense["kl"]) < 1e-6 and dense["attended_last"] == 1.0
    streaming = main(base + ["--slope", "-1", "--k", "8", "--window", "8"])
    assert streaming["kl"] > 1e-4 and streaming["p_top"] == 1.0 and streaming["free_top"] == 0.0
    path = tmp_path / "s.safetensors"
    SparseKScorer.zeros(LAYERS, KV_HEADS, HEAD, 8, 8, slope=-1.0).save(path)
    from_file = main(base + ["--scorer", str(path), "--record"])
    assert from_file["kl"] == pytest.approx(streaming["kl"])
    assert SparseKScorer.load(path).meta["measured_kl_96_k8_w8"]["kl"] == pytest.approx(
        streaming["kl"])


def test_cli_fit_saves_a_scorer_with_its_record(tiny_model, text_file, tmp_path):
    from vllm_sparse.train.__main__ import main

    out = tmp_path / "fit.safetensors"
    fitted = main(["sparsek-fit", "--model", tiny_model, "--out", str(out), "--data",
                   str(text_file), "--windows", "2", "--seq-len", "64", "--k", "12",
                   "--window", "8", "--min-queries", "4", "--sharpness", "50", "--no-progress"])
    assert (fitted.k, fitted.window, fitted.num_layers, fitted.num_kv_heads,
            fitted.head_size) == (12, 8, LAYERS, KV_HEADS, HEAD)
    assert fitted.weight.abs().sum() > 0 and torch.isfinite(fitted.weight).all()
    meta = fitted.meta
    assert meta["command"].startswith("python -m vllm_sparse.train sparsek-fit")
    assert (meta["windows"], meta["seq_len"], meta["tokens"], meta["sharpness"]) == (2, 64, 128, 50)
    assert str(text_file) in meta["data"] and meta["wall_time_s"] > 0
    assert len(meta["r2_per_layer"]) == LAYERS and meta["r2_min"] <= meta["r2_mean"] <= 1
    # the file serves as a training start
    trained = _train(tiny_model, text_file, tmp_path / "t.safetensors", "--steps", "1",
                     "--init", str(out))
    assert trained.weight.shape == fitted.weight.shape


@pytest.mark.parametrize("flag,value,message", [
    ("--window", "64", "--window 64; allowed: 1 .. --seq-len - 1"),
    ("--windows", "0", "--windows 0; allowed: >= 1"),
    ("--windows", "10000", "the data has only"),
    ("--sharpness", "0", "--sharpness 0.0, --ridge 0.001; allowed: sharpness > 0, ridge >= 0"),
    ("--ridge", "-1", "--ridge -1.0; allowed"),
])
def test_cli_fit_errors(tiny_model, text_file, tmp_path, flag, value, message):
    from vllm_sparse.train.__main__ import main

    args = ["sparsek-fit", "--model", tiny_model, "--out", str(tmp_path / "f.safetensors"),
            "--data", str(text_file), "--seq-len", "64", "--window", "8", "--no-progress"]
    with pytest.raises(ValueError, match=message):
        main(args + [flag, value])


def test_cli_errors(tiny_model, tmp_path):
    from vllm_sparse.train.__main__ import main

    with pytest.raises(SystemExit):  # --scorer or --slope is required
        main(["sparsek-eval", "--model", tiny_model])
    path = tmp_path / "wrong.safetensors"
    SparseKScorer.zeros(3, KV_HEADS, HEAD, 8, 8).save(path)
    with pytest.raises(ValueError, match="model needs"):
        main(["sparsek-eval", "--model", tiny_model, "--scorer", str(path)])
