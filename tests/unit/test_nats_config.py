# SPDX-License-Identifier: Apache-2.0
"""NAtS configuration: the gates file is required and is the source of truth (chunk size,
window), checked against the model (layers, KV heads, head size) with errors naming the
bad value and the allowed ones; the budget is unused (logged); TP head slices."""

import logging

import pytest

from vllm_sparse import config as cfg
from vllm_sparse.eviction.impl import check_model, rank_heads
from vllm_sparse.nats.backend import load_gates
from vllm_sparse.nats.gates import NatsGates

FP = {"architecture": "LlamaForCausalLM", "num_hidden_layers": 4, "hidden_size": 256,
      "num_attention_heads": 4, "num_key_value_heads": 2}


@pytest.fixture
def gates_path(tmp_path):
    path = tmp_path / "g.safetensors"
    NatsGates.constant(4, 2, 64, 32, 64).save(path)
    return path


def _resolve(override):
    return cfg.resolve(["test/tiny-nats"], FP, override, "nats")


def test_gates_are_required(tmp_path):
    with pytest.raises(ValueError, match=r"nats needs gates trained for the model and none are "
                                         r"configured; set nats.gates"):
        _resolve(None)


def test_missing_gates_file_is_a_start_up_error(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match=rf"nats gates file {missing} .*does not exist"):
        _resolve({"nats": {"gates": str(missing)}})


def test_relative_gates_path_is_relative_to_configs():
    config = cfg.NatsConfig(gates="nats/some-model.safetensors")
    assert config.gates_path() == cfg.config_dir() / "nats" / "some-model.safetensors"
    with pytest.raises(FileNotFoundError, match=str(cfg.config_dir() / "nats")):
        _resolve({"nats": {"gates": "nats/some-model.safetensors"}})


def test_config_names_the_gates_and_their_source(gates_path):
    config, description = _resolve({"nats": {"gates": str(gates_path)}})
    assert config.method == "nats"
    assert f'nats.gates="{gates_path}" (--additional-config)' in description


def test_unknown_nats_key_lists_the_allowed_keys(gates_path):
    with pytest.raises(ValueError, match=r"nats\.chunk: unknown key; allowed keys: chunk_size, "
                                         r"gates, window"):
        _resolve({"nats": {"gates": str(gates_path), "chunk": 16}})


def test_chunk_size_and_window_come_from_the_gates_file(gates_path):
    config, _ = _resolve({"nats": {"gates": str(gates_path), "chunk_size": 32, "window": 64}})
    gates, _ = load_gates(config.nats)
    assert (gates.chunk_size, gates.window) == (32, 64)
    for key, value, have in (("chunk_size", 16, 32), ("window", 256, 64)):
        config, _ = _resolve({"nats": {"gates": str(gates_path), key: value}})
        with pytest.raises(ValueError, match=rf"nats.{key}={value} contradicts the gates file "
                                             rf".*\({key}={have}\).*set it to {have}"):
            load_gates(config.nats)


def test_budget_is_unused_and_says_so(gates_path):
    records = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("vllm.vllm_sparse")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        _resolve({"budget": 777, "nats": {"gates": str(gates_path)}})
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert any("budget=777 (--additional-config) is not used by nats" in r for r in records)


def test_layer_overrides_are_refused(gates_path):
    with pytest.raises(NotImplementedError, match=r"per-layer overrides .* not supported with "
                                                  r"nats.*layers=\[0\]"):
        _resolve({"nats": {"gates": str(gates_path)}, "layers": {"0": {"method": "dense"}}})


@pytest.mark.parametrize("model,message", [
    ((5, 2, 64), r"layers=4, the model has 5"),
    ((4, 3, 64), r"KV heads=2, the model has 3"),
    ((4, 2, 128), r"head size=64, the model has 128"),
])
def test_gates_must_match_the_model(gates_path, model, message):
    gates = NatsGates.load(gates_path)
    check_model(gates, gates_path, 4, 2, 64, "nats gates")
    with pytest.raises(ValueError, match=r"nats gates .* have " + message +
                       r"; allowed: weights trained for this model"):
        check_model(gates, gates_path, *model, "nats gates")


def test_tensor_parallel_ranks_take_their_kv_heads():
    assert [rank_heads(4, 2, r, 2) for r in range(2)] == [slice(0, 2), slice(2, 4)]
    assert [rank_heads(8, 2, r, 4) for r in range(4)] == [slice(2 * r, 2 * r + 2)
                                                          for r in range(4)]
    # fewer KV heads than ranks: vLLM replicates each head over tp // total ranks
    assert [rank_heads(2, 1, r, 4) for r in range(4)] == [slice(0, 1), slice(0, 1),
                                                          slice(1, 2), slice(1, 2)]
    with pytest.raises(ValueError, match="3 KV heads per rank x 2 ranks != 4"):
        rank_heads(4, 3, 0, 2)
