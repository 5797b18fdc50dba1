# SPDX-License-Identifier: Apache-2.0
"""The one schema: defaults, validation errors that name the key and the allowed values,
per-model files, overrides, and the start-up description of where each value came from."""

import pytest

from vllm_sparse import config as cfg

SMOL_FP = {"architecture": "LlamaForCausalLM", "num_hidden_layers": 30, "hidden_size": 576,
           "num_attention_heads": 9, "num_key_value_heads": 3}
UNKNOWN_FP = {"architecture": "GPT2LMHeadModel", "num_hidden_layers": 2, "hidden_size": 8,
              "num_attention_heads": 2, "num_key_value_heads": 2}


def test_defaults_are_the_documented_ones():
    config, _ = cfg.resolve(["some/unknown-model"], UNKNOWN_FP, None, "radar")
    assert config.method == "radar" and config.budget == 2048
    assert config.radar.projection_dim == 128 and config.radar.num_sink_tokens == 1


@pytest.mark.parametrize("budget", [0, -5, "abc", "25%", 1.5, 0.0, True, None, [1]])
def test_bad_budget_is_an_error_naming_the_key(budget):
    with pytest.raises(ValueError, match=r"budget"):
        cfg.resolve(["m"], UNKNOWN_FP, {"budget": budget}, "radar")


@pytest.mark.parametrize("budget", [1, 4096, 0.125, 1.0])
def test_good_budgets(budget):
    config, _ = cfg.resolve(["m"], UNKNOWN_FP, {"budget": budget}, "radar")
    assert config.budget == budget


def test_unknown_key_lists_the_allowed_keys():
    with pytest.raises(ValueError, match=r"radar\.projection_dims: unknown key; allowed keys: "
                                         r"aspect_ratio, center_keys, local_window, num_sink_tokens, "
                                         r"projection_dim, seed"):
        cfg.resolve(["m"], UNKNOWN_FP, {"radar": {"projection_dims": 8}}, "radar")
    with pytest.raises(ValueError, match=r"bugdet: unknown key; allowed keys: .*budget"):
        cfg.resolve(["m"], UNKNOWN_FP, {"bugdet": 8}, "radar")


def test_unknown_method_lists_the_methods():
    with pytest.raises(ValueError, match=r"method: .*'radar', 'recycled', 'nats' or 'sparsek'.*"
                                         r"got 'quest'"):
        cfg.resolve(["m"], UNKNOWN_FP, {"method": "quest"}, None)


@pytest.mark.parametrize("value", [0, -1, "x"])
def test_out_of_range_hyperparameter(value):
    with pytest.raises(ValueError, match=r"radar\.projection_dim"):
        cfg.resolve(["m"], UNKNOWN_FP, {"radar": {"projection_dim": value}}, "radar")


def test_additional_config_must_be_an_object():
    with pytest.raises(ValueError, match="must be a JSON object, got str"):
        cfg.resolve(["m"], UNKNOWN_FP, "radar", "radar")


def test_backend_and_config_method_must_agree():
    with pytest.raises(ValueError, match="--attention-backend radar disagrees with "
                                         "method='nats'"):
        cfg.resolve(["m"], UNKNOWN_FP, {"method": "nats"}, "radar")


def test_sparsek_needs_a_scorer_and_an_integer_budget(tmp_path):
    with pytest.raises(ValueError, match="sparsek needs a scorer trained for the model"):
        cfg.resolve(["m"], UNKNOWN_FP, {"method": "sparsek"}, None)
    with pytest.raises(FileNotFoundError, match="sparsek scorer file .*missing.safetensors"):
        cfg.resolve(["m"], UNKNOWN_FP, {"sparsek": {"scorer": str(tmp_path / "missing.safetensors")}},
                    "sparsek")
    scorer = tmp_path / "s.safetensors"
    scorer.write_bytes(b"")
    with pytest.raises(ValueError, match=r"budget=0.5 must be an integer token count"):
        cfg.resolve(["m"], UNKNOWN_FP, {"budget": 0.5, "sparsek": {"scorer": str(scorer)}},
                    "sparsek")
    with pytest.raises(NotImplementedError, match="per-layer overrides .* not supported with sparsek"):
        cfg.resolve(["m"], UNKNOWN_FP, {"sparsek": {"scorer": str(scorer)},
                                        "layers": {0: {"method": "dense"}}}, "sparsek")
    config, _ = cfg.resolve(["m"], UNKNOWN_FP, {"budget": 96, "sparsek": {"scorer": str(scorer)}},
                            "sparsek")
    assert config.sparsek.scorer_path() == scorer and config.budget == 96
    assert config.sparsek.window_tokens(96, 64) == 64          # no window set: the file's


@pytest.mark.parametrize("window, tokens", [(0, 0), (40, 40), (0.5, 48), (0.25, 24)])
def test_sparsek_window_is_a_count_or_a_fraction_of_the_budget(tmp_path, window, tokens):
    scorer = tmp_path / "s.safetensors"
    scorer.write_bytes(b"")
    config, description = cfg.resolve(["m"], UNKNOWN_FP, {"budget": 96, "sparsek": {
        "scorer": str(scorer), "window": window}}, "sparsek")
    assert config.sparsek.window_tokens(config.budget, 64) == tokens
    assert f"sparsek.window={window} (--additional-config)" in description


@pytest.mark.parametrize("window, message", [
    (-1, "window=-1: a token count must be >= 0"),
    (1.0, r"window=1.0: a fraction of the budget must be in \(0, 1\)"),
    (0.0, r"window=0.0: a fraction of the budget must be in \(0, 1\)"),
    ("half", "sparsek.window"),
])
def test_bad_sparsek_window_is_named(tmp_path, window, message):
    with pytest.raises(ValueError, match=message):
        cfg.resolve(["m"], UNKNOWN_FP, {"sparsek": {"scorer": "x.safetensors", "window": window}},
                    "sparsek")


def test_recycled_defaults_and_overrides():
    config, description = cfg.resolve(["m"], UNKNOWN_FP, {"recycled": {"stride": 8}}, "recycled")
    assert config.method == "recycled"
    assert (config.recycled.schedule, config.recycled.check_every,
            config.recycled.similarity_threshold, config.recycled.pool_width) == \
        ("dynamic", 5, 0.85, 7)
    assert config.recycled.stride == 8
    assert "recycled.stride=8 (--additional-config)" in description


@pytest.mark.parametrize("recycled, message", [
    ({"schedule": "sometimes"}, r"recycled\.schedule: Input should be 'dynamic' or 'fixed'"),
    ({"stride": 0}, r"recycled\.stride: Input should be greater than 0"),
    ({"pool_width": 4}, r"recycled\.pool_width: .*pool_width=4: must be odd"),
    ({"similarity_threshold": 1.5}, r"recycled\.similarity_threshold: .*less than or equal to 1"),
    ({"window": 3}, r"recycled\.window: unknown key; allowed keys: check_every, pool_width"),
])
def test_bad_recycled_hyperparameters_are_named(recycled, message):
    with pytest.raises(ValueError, match=message):
        cfg.resolve(["m"], UNKNOWN_FP, {"recycled": recycled}, "recycled")


@pytest.mark.parametrize("names", [["HuggingFaceTB/SmolLM2-135M-Instruct"],
                                   ["/models/SmolLM2-135M-Instruct/"], ["x", "smollm2-135m"]])
def test_model_file_matched_by_name(names):
    config, description = cfg.resolve(names, UNKNOWN_FP, None, "radar")
    assert config.budget == 1024
    assert "budget=1024 (configs/smollm2-135m-instruct.yaml)" in description


def test_model_file_matched_by_fingerprint_of_a_local_directory():
    config, description = cfg.resolve(["/tmp/some-dir"], SMOL_FP, None, "radar")
    assert config.budget == 1024 and "smollm2-135m-instruct.yaml" in description
    llama_fp = dict(SMOL_FP, num_hidden_layers=32, hidden_size=4096, num_attention_heads=32,
                    num_key_value_heads=8)
    config, _ = cfg.resolve(["/ckpt"], llama_fp, None, "radar")
    assert config.for_layer(0) == ("dense", 2048) and config.for_layer(5) == ("radar", 2048)


def test_override_wins_and_sources_are_stated():
    config, description = cfg.resolve(["smollm2-135m"], UNKNOWN_FP,
                                      {"budget": 0.25, "radar": {"seed": 7}}, "radar")
    assert config.budget == 0.25 and config.radar.seed == 7
    assert config.radar.projection_dim == 128
    assert "method=\"radar\" (--attention-backend)" in description
    assert "budget=0.25 (--additional-config)" in description
    assert "radar.seed=7 (--additional-config)" in description
    assert "radar.local_window=64 (configs/smollm2-135m-instruct.yaml)" in description


def test_custom_backend_takes_the_method_from_config():
    config, description = cfg.resolve(["m"], UNKNOWN_FP, {"method": "radar"}, None)
    assert config.method == "radar" and "method=\"radar\" (--additional-config)" in description


def test_per_layer_override():
    config, _ = cfg.resolve(["m"], UNKNOWN_FP,
                            {"budget": 512, "layers": {"0": {"method": "dense"},
                                                       "3": {"budget": 0.5}}}, "radar")
    assert config.for_layer(0) == ("dense", 512)
    assert config.for_layer(3) == ("radar", 0.5)
    assert config.for_layer(1) == ("radar", 512)
    with pytest.raises(ValueError, match=r"layers\.2\.budget"):
        cfg.resolve(["m"], UNKNOWN_FP, {"layers": {"2": {"budget": -1}}}, "radar")


def _use_config_dir(monkeypatch, tmp_path):
    monkeypatch.setattr(cfg, "config_dir", lambda: tmp_path)
    cfg.load_model_files.cache_clear()
    monkeypatch.setattr(cfg, "load_model_files", cfg.load_model_files)


@pytest.mark.parametrize("text, message", [
    ("match: {names: [a]\nbudget: 3", "is not valid YAML"),
    ("- just\n- a list", "must hold a mapping, got list"),
    ("match: {names: [a]}\nbudget: -3", r"budget: Value error, budget=-3"),
    ("match: {names: [a]}\nradar: {aspect: 2}", r"radar\.aspect: unknown key"),
    ("budget: 3", r"match: Field required"),
])
def test_malformed_model_file_names_itself(monkeypatch, tmp_path, text, message):
    (tmp_path / "broken.yaml").write_text(text)
    _use_config_dir(monkeypatch, tmp_path)
    try:
        with pytest.raises(ValueError, match=message) as info:
            cfg.resolve(["a"], UNKNOWN_FP, None, "radar")
        assert "broken.yaml" in str(info.value)
    finally:
        cfg.load_model_files.cache_clear()


def test_shipped_files_are_valid_and_cover_the_required_models():
    files = cfg.load_model_files()
    names = {n for spec in files.values() for n in spec.match.names}
    for model in ["HuggingFaceTB/SmolLM2-135M-Instruct", "meta-llama/Llama-3.1-8B-Instruct",
                  "mistralai/Mistral-7B-Instruct-v0.3", "Qwen/Qwen2.5-7B-Instruct"]:
        assert model in names
