# SPDX-License-Identifier: Apache-2.0
"""NAtS gate training (`vllm_sparse.train`): the training mask against the inference rules
of `vllm_sparse.nats.gates`, the masked attention against a dense reference, student vs
teacher on the tiny Llama, gradients, and the CLI (train, resume, measure).

CI needs no apt download: the CLI tests train on a small generated text (`--data`); real
gates are trained on Debian's python3.11-doc (see configs/nats/README.md).
"""

import random

import pytest
import torch

from vllm_sparse.nats import gates as G
from vllm_sparse.train import nats as N

# (chunk_size, window, seq_len): windows 0 / shorter / longer than a chunk; lengths that
# are not multiples of the chunk, shorter than one chunk, and exact multiples.
MASK_CASES = [(16, 0, 87), (16, 16, 100), (16, 40, 160), (32, 16, 150), (32, 256, 300),
              (16, 5, 15), (32, 48, 64)]


def _random_types(heads: int, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 3, (heads, n), generator=gen)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("chunk, window, length", MASK_CASES)
def test_training_mask_equals_visible(chunk, window, length, seed):
    types = _random_types(3, length // chunk, seed)
    y = torch.nn.functional.one_hot(types, 3).float()
    mask = N.training_mask(y, chunk, window, length)
    ref = G.visible(types, chunk, window, torch.arange(length), length)
    assert torch.equal(mask, ref.float())


@pytest.mark.parametrize("chunk, window, length", MASK_CASES)
def test_straight_through_mask_and_kept(chunk, window, length):
    """Gumbel straight-through y has one-hot values: same mask; kept = gates.kept_fraction."""
    torch.manual_seed(0)
    logits = torch.randn(2, length // chunk, 3, requires_grad=True)
    y = N.sample_types(logits, sample=True, tau=1.0)
    types = y.detach().argmax(-1)
    assert (types[:, :1] == G.GLOBAL).all()
    mask = N.training_mask(y, chunk, window, length)
    ref = G.visible(types, chunk, window, torch.arange(length), length)
    torch.testing.assert_close(mask, ref.float(), atol=1e-6, rtol=0)
    life = G.type_lifetimes(types, chunk, window)
    kept = N._kept(y, life, chunk, length)
    torch.testing.assert_close(kept, G.kept_fraction(types, chunk, window, length))
    kept.sum().backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_type_lifetimes_agree_with_lifetime_end():
    types = _random_types(4, 40, 3)
    life = G.type_lifetimes(types, 16, 48)
    picked = life.gather(-1, types[..., None])[..., 0]
    assert torch.equal(picked, G._lifetime_end(types, 16, 48))


def _reference_attention(q, k, v, types, chunk, window, scaling):
    heads_q, length, _ = q.shape
    vis = G.visible(types, chunk, window, torch.arange(length), length)
    vis = vis.repeat_interleave(heads_q // k.shape[0], dim=0)
    kk = k.double().repeat_interleave(heads_q // k.shape[0], dim=0)
    vv = v.double().repeat_interleave(heads_q // k.shape[0], dim=0)
    s = (q.double() @ kk.transpose(1, 2) * scaling).masked_fill(~vis, float("-inf"))
    return torch.softmax(s, dim=-1) @ vv


@pytest.mark.parametrize("heads", [(4, 2), (5, 1)])
@pytest.mark.parametrize("grad", [False, True])
def test_masked_attention_matches_reference(heads, grad):
    """Training path (blocked, checkpointed when grad) and the no-grad sdpa path."""
    torch.manual_seed(1)
    (hq, hkv), length, chunk, window, dim = heads, 117, 16, 24, 8
    q, k, v = (torch.randn(h, length, dim) for h in (hq, hkv, hkv))
    types = _random_types(hkv, length // chunk, 5)
    y = torch.nn.functional.one_hot(types, 3).float().requires_grad_(grad)
    life = G.type_lifetimes(types, chunk, window)
    with torch.set_grad_enabled(grad):
        out = N.masked_attention(q, k, v, y, life, chunk, 0.3, query_block=32)
    ref = _reference_attention(q, k, v, types, chunk, window, 0.3)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    fused = N._visible_sdpa(q, k, v, y.detach(), life, chunk, 0.3)
    torch.testing.assert_close(fused.double(), ref, atol=1e-5, rtol=1e-5)
    if grad:
        out.square().sum().backward()
        assert torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0


@pytest.fixture(scope="module")
def tiny(tiny_model):
    from vllm_sparse.train.nats_cli import load_model

    return load_model(tiny_model)


def _ids(model, length=80, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (1, length), generator=gen)


def test_all_global_student_equals_teacher(tiny):
    from vllm_sparse.train.distill import _hidden

    model, _ = tiny
    layers, kv_heads, head = 4, 2, 64
    gates = G.NatsGates.constant(layers, kv_heads, head, 16, 16, G.GLOBAL)
    gates.bias *= 100.0  # Gumbel noise cannot flip a 100-logit margin
    method = N.NatsMethod(N.NatsGateParams(gates), query_block=32)
    ids = _ids(model, 90)
    with torch.no_grad():
        teacher = model.lm_head(_hidden(model, ids, "sdpa", {}))
        for sample in (True, False):
            kwargs = method.step_kwargs(sample=sample)
            student = model.lm_head(_hidden(model, ids, method.attn_name, kwargs))
            torch.testing.assert_close(student, teacher, atol=1e-5, rtol=1e-5)
            assert method.regularizer(kwargs)[1]["kept_hard"] == 1.0


def test_gradients_reach_gates(tiny):
    from vllm_sparse.train.distill import DistillConfig, distill_step

    model, _ = tiny
    torch.manual_seed(0)
    params = N.NatsGateParams.zeros(4, 2, 64, 16, 16)
    with torch.no_grad():
        params.weight.normal_(0, 0.05)
    loss, metrics = distill_step(model, N.NatsMethod(params, query_block=32), _ids(model, 96),
                                 DistillConfig(loss_chunk=40), lam=0.5)
    loss.backward()
    for grad in (params.weight.grad, params.bias.grad):
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert metrics["kl"] >= 0 and 0 < metrics["kept"] <= 1
    assert all(p.grad is None for p in model.parameters())


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    words = ("gate chunk window token cache query key value sparse dense local global "
             "sliding model layer head train step loss").split()
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(120))
                                for _ in range(60)))
    return path


def _train(tiny_model, text_file, out, *extra):
    from vllm_sparse.train.__main__ import main

    return main(["nats", "--model", tiny_model, "--out", str(out), "--data", str(text_file),
                 "--seq-len", "64", "--window", "16", "--query-block", "32",
                 "--checkpoint-every", "2", "--no-progress", "--lam", "0.5", *extra])


def test_cli_trains_resumes_and_saves(tiny_model, text_file, tmp_path):
    straight = _train(tiny_model, text_file, tmp_path / "a.safetensors", "--steps", "3")
    _train(tiny_model, text_file, tmp_path / "b.safetensors", "--steps", "2")
    resumed = _train(tiny_model, text_file, tmp_path / "b.safetensors", "--steps", "3",
                     "--resume")
    loaded = G.NatsGates.load(tmp_path / "b.safetensors")
    assert torch.equal(loaded.weight, resumed.weight)
    torch.testing.assert_close(resumed.weight, straight.weight)  # resume == uninterrupted
    assert (loaded.chunk_size, loaded.window, loaded.num_layers) == (16, 16, 4)
    meta = loaded.meta
    assert meta["steps"] == 3 and meta["wall_time_s"] > 0 and "--resume" in meta["command"]
    assert meta["command"].startswith("python -m vllm_sparse.train nats")
    assert str(text_file) in meta["data"] and 0 < meta["kept_fraction"] <= 1
    assert meta["lr"] == 2e-3 and meta["seq_len"] == 64
    ckpt = torch.load(tmp_path / "b.safetensors.ckpt.pt", weights_only=False)
    assert ckpt["state"]["step"] == 3 and len(ckpt["state"]["history"]) == 3


@pytest.mark.parametrize("kind, expected", [(G.GLOBAL, 1.0), (G.SLIDING, 48 / 128)])
def test_cli_kept(tiny_model, text_file, tmp_path, kind, expected):
    """All-SLIDING, C=16, W=16, 128 tokens: chunk 0 (forced GLOBAL) + chunks 6, 7 live."""
    from vllm_sparse.train.__main__ import main

    path = tmp_path / "g.safetensors"
    G.NatsGates.constant(4, 2, 64, 16, 16, kind).save(path)
    result = main(["nats-kept", "--gates", str(path), "--model", tiny_model, "--context", "128",
                   "--data", str(text_file), "--record"])
    assert result["kept_fraction"] == pytest.approx(expected)
    assert result["kl"] > -1e-6 and (kind != G.GLOBAL or result["kl"] < 1e-6)
    assert G.NatsGates.load(path).meta["measured_kept_128"]["kept_fraction"] == pytest.approx(
        expected)


@pytest.mark.parametrize("argv, error, words", [
    (["sparse"], SystemExit, None),
    (["nats", "--model", "/nonexistent", "--out", "x"], FileNotFoundError, "config.json"),
])
def test_cli_errors(argv, error, words, capsys):
    from vllm_sparse.train.__main__ import main

    with pytest.raises(error) as info:
        main(argv)
    if words:
        assert words in str(info.value)
    else:
        assert "invalid choice" in capsys.readouterr().err


def test_bad_chunk_size_names_allowed_values(tiny_model, text_file, tmp_path):
    with pytest.raises(ValueError, match="chunk_size=24.*multiples of 16"):
        _train(tiny_model, text_file, tmp_path / "c.safetensors", "--steps", "1",
               "--chunk-size", "24")


def test_decontamination_drops_evaluation_text():
    from vllm_sparse.models import long_text
    from vllm_sparse.train import data

    clean = "the gate decides per chunk which tokens stay in the cache " * 20
    kept, dropped = data.decontaminate([("eval", long_text()[:20000]), ("clean", clean)],
                                       data.evaluation_ngrams())
    assert dropped == ["eval"] and kept == [clean]


def test_token_windows_deterministic():
    from vllm_sparse.train.data import TokenWindows

    windows = TokenWindows(torch.arange(1000), 64, seed=3)
    assert len(windows) == 15 and windows(2).shape == (1, 64)
    assert torch.equal(windows(2), windows(2 + len(windows)))
    assert torch.equal(windows(5), TokenWindows(torch.arange(1000), 64, seed=3)(5))
