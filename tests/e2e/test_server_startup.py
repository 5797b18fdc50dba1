# SPDX-License-Identifier: Apache-2.0
"""Bad start-up configurations through the real `vllm serve`: the process exits non-zero
and its log names the bad value and what is allowed. The launches run concurrently (each
costs from ~20 s, an argument error, to ~60 s, an error found when the engine builds its
attention layers). What is cheaper to check on the parser itself is checked there, below;
tests/unit/test_config.py and tests/e2e/test_registration.py hold the rest (zero and
negative budgets, unknown keys and methods, offline start-up errors)."""

import pytest

from tests.e2e.test_server import _free_port, _serve, _stop

pytestmark = pytest.mark.e2e

RADAR_KEYS = "aspect_ratio, center_keys, local_window, num_sink_tokens, projection_dim, seed"
LAUNCHES = {
    "malformed_json": ["--attention-backend", "radar",
                       "--additional-config", '{"vllm_sparse": {"budget": 64,}'],
    "bad_values": ["--attention-backend", "radar", "--additional-config",
                   '{"vllm_sparse": {"budget": "abc", "radar": {"local_windows": 32}}}'],
}


@pytest.fixture(scope="module")
def launched(tiny_model, tmp_path_factory):
    """{case: (exit status, log)} for every launch in LAUNCHES, run side by side."""
    folder = tmp_path_factory.mktemp("startup")
    procs = {}
    try:
        for case, args in LAUNCHES.items():
            log = open(folder / f"{case}.log", "w")
            procs[case] = (_serve(tiny_model, _free_port(), *args, log=log), log)
        results = {}
        for case, (proc, log) in procs.items():
            code = proc.wait(timeout=300)
            log.close()
            results[case] = (code, (folder / f"{case}.log").read_text())
        return results
    finally:
        for proc, log in procs.values():
            _stop(proc)


def test_malformed_json_is_refused_by_the_cli(launched):
    code, log = launched["malformed_json"]
    assert code == 2, log[-3000:]  # argparse: before any engine starts
    assert 'argument --additional-config: Value {"vllm_sparse": {"budget": 64,} cannot be ' \
           "converted" in log


def test_bad_values_stop_the_server(launched):
    """A non-numeric budget and a misspelt Radar key, both reported by one failed start."""
    code, log = launched["bad_values"]
    assert code != 0, log[-3000:]
    assert "vllm_sparse: invalid configuration in --additional-config vllm_sparse:" in log
    assert f"radar.local_windows: unknown key; allowed keys: {RADAR_KEYS}" in log
    budget = [l for l in log.splitlines() if "  budget" in l]
    assert budget, log[-3000:]
    budget = "\n".join(budget)
    assert "'abc'" in budget and "(0, 1]" in budget, budget


# ---------------------------------------------------------------- the parser itself
UNKNOWN_FP = {"architecture": "GPT2LMHeadModel", "num_hidden_layers": 2, "hidden_size": 8,
              "num_attention_heads": 2, "num_key_value_heads": 2}
@pytest.mark.parametrize("budget, allowed", [
    (0, ">= 1"), (-5, ">= 1"), (1.5, "(0, 1]"), (0.0, "(0, 1]"),
    ("abc", "(0, 1]"),
    ("25%", "(0, 1]"),
    (None, "(0, 1]"),
    (True, "(0, 1]"),
])
def test_budget_error_names_value_and_allowed_forms(budget, allowed):
    from vllm_sparse import config as cfg

    with pytest.raises(ValueError) as info:
        cfg.resolve(["m"], UNKNOWN_FP, {"budget": budget}, "radar")
    lines = [l for l in str(info.value).splitlines() if l.strip().startswith("budget")]
    assert lines and any(repr(budget) in l and allowed in l for l in lines), lines


def test_every_error_of_one_config_is_reported(tmp_path):
    from vllm_sparse import config as cfg

    with pytest.raises(ValueError) as info:
        cfg.resolve(["m"], UNKNOWN_FP, {"budget": -5, "method": "quest", "kernels": "cuda",
                                        "radar": {"seed": "x"}}, None)
    text = str(info.value)
    assert "budget=-5" in text
    assert "method: Input should be 'radar', 'recycled', 'nats' or 'sparsek' (got 'quest')" in text
    assert "kernels: Input should be 'auto', 'triton', 'torch' or 'numba'" in text
    assert "radar.seed" in text
