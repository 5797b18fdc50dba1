# SPDX-License-Identifier: Apache-2.0
"""Every way a user names our backends reaches our code, in the real vLLM engine on CPU."""

import os
import pickle
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.e2e

SPARSE = {"budget": 64, "radar": {"local_window": 32}}  # far below the ~300-token prompts


def _prompts():
    from vllm_sparse.models import long_text

    return [long_text()[:1500], long_text()[9000:10200]]


def _run(llm, n=16):
    from vllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(_prompts(), params, use_tqdm=False)]


def _backend_and_impl(llm):
    def describe(model):
        attn = model.model.layers[0].self_attn.attn
        config = getattr(attn.impl, "config", None)
        return attn.attn_backend.get_name(), type(attn.impl).__name__, config and config.method

    return llm.apply_model(describe)[0]


def _llm(model, **kwargs):
    from vllm import LLM

    kwargs.setdefault("additional_config", {"vllm_sparse": SPARSE})
    return LLM(model=model, dtype="float32", max_model_len=2048, enforce_eager=True, seed=0,
               **kwargs)


@pytest.fixture(scope="module")
def radar_tokens(tiny_model):
    llm = _llm(tiny_model, attention_backend="radar")
    assert _backend_and_impl(llm) == ("RADAR", "RadarImpl", "radar")
    assert llm.llm_engine.vllm_config.cache_config.block_size == 32  # pinned on CPU
    tokens = _run(llm)
    stats = llm.apply_model(lambda m: m.model.layers[1].self_attn.attn.impl.stats)[0]
    assert stats.queries and stats.attended_tokens < 0.5 * stats.context_tokens
    dense = _llm(tiny_model, additional_config={})
    assert _backend_and_impl(dense)[0] == "CPU_ATTN"
    assert _run(dense) != tokens, "the small budget must change the output, or nothing is tested"
    return tokens


def test_attention_config_after_import(tiny_model, radar_tokens):
    import vllm_sparse  # noqa: F401  (registers the names before LLM validates its config)

    llm = _llm(tiny_model, attention_config={"backend": "radar"}, block_size=32)
    assert _backend_and_impl(llm) == ("RADAR", "RadarImpl", "radar")
    assert _run(llm) == radar_tokens


def test_custom_takes_the_method_from_config(tiny_model, radar_tokens):
    llm = _llm(tiny_model, attention_backend="custom",
               additional_config={"vllm_sparse": dict(SPARSE, method="radar")})
    assert _backend_and_impl(llm) == ("CUSTOM", "CustomImpl", "radar")
    assert _run(llm) == radar_tokens


def test_user_block_size_is_kept(tiny_model):
    llm = _llm(tiny_model, attention_backend="radar", block_size=64)
    assert llm.llm_engine.vllm_config.cache_config.block_size == 64


MP_SCRIPT = textwrap.dedent("""
    import json, sys
    from vllm import LLM, SamplingParams
    from vllm_sparse.models import long_text
    llm = LLM(model=sys.argv[1], dtype="float32", max_model_len=2048, enforce_eager=True, seed=0,
              attention_backend="radar", additional_config={"vllm_sparse": json.loads(sys.argv[2])})
    prompts = [long_text()[:1500], long_text()[9000:10200]]
    out = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    print("TOKENS", json.dumps([list(o.outputs[0].token_ids) for o in out]))
""")


def test_multiprocess_engine(tiny_model, radar_tokens):
    """Default engine: EngineCore and the worker are spawned processes that unpickle the
    config (with our enum member) before plugins load there."""
    import json

    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1")
    proc = subprocess.run([sys.executable, "-c", MP_SCRIPT, tiny_model, json.dumps(SPARSE)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tokens = json.loads(proc.stdout.split("TOKENS", 1)[1].splitlines()[0])
    assert tokens == [list(t) for t in radar_tokens]
    assert "using RADAR attention on CPU" in proc.stderr + proc.stdout


def _chain(exc):
    while exc is not None:
        yield exc
        exc = exc.__cause__ or exc.__context__


def test_bad_config_fails_at_startup(tiny_model):
    with pytest.raises(Exception) as info:
        _llm(tiny_model, attention_backend="radar",
             additional_config={"vllm_sparse": {"budget": 0}})
    assert "budget=0: a token count must be >= 1" in "".join(str(e) for e in _chain(info.value))


def test_enum_member_unpickles_in_a_fresh_process():
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    import vllm_sparse  # noqa: F401

    blob = pickle.dumps(AttentionBackendEnum["RADAR"])
    code = ("import pickle, sys; m = pickle.loads(sys.stdin.buffer.read()); "
            "print(m.name, m.get_path())")
    proc = subprocess.run([sys.executable, "-c", code], input=blob, capture_output=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert proc.stdout.decode().split() == ["RADAR", "vllm_sparse.backend.RadarBackend"]
    # vLLM's own members keep pickling by value
    assert pickle.loads(pickle.dumps(AttentionBackendEnum.CPU_ATTN)) is AttentionBackendEnum.CPU_ATTN
