# SPDX-License-Identifier: Apache-2.0
"""`vllm serve MODEL --attention-backend radar`: the real console script on loopback and the
`openai` client. One server for the whole module (start-up costs most of the time):
completions, chat, streaming, `n > 1` and stop strings, each greedy output equal to the
offline `LLM(..., attention_backend="radar")` output; bad requests get HTTP 400 and change
nothing for anyone else, alone or fired concurrently with good ones.

The budget (64 tokens, window 32) is far below the prompts (~300 to ~1200 tokens), so every
decode step runs the sparse path. Start-up errors are in test_server_startup.py."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
VLLM = str(Path(sys.executable).parent / "vllm")
MAX_LEN = 2048
SPARSE = {"budget": 64, "radar": {"local_window": 32}}
ADDITIONAL = '{"vllm_sparse": {"budget": 64, "radar": {"local_window": 32}}}'
MAX_TOKENS = 24
GREEDY = {"temperature": 0, "max_tokens": MAX_TOKENS}
EXTRA = {"ignore_eos": True, "return_token_ids": True}  # vLLM's extensions of the API
SAMPLED = {"n": 3, "temperature": 0.8, "seed": 1, "max_tokens": 16}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(model, port, *extra, log):
    env = dict(os.environ)
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the server's default engine
    # uvicorn closes idle keep-alive connections after 5 s; the client (max_retries=0) could
    # then reuse a pooled connection just as the server closes it, and read "Server
    # disconnected without sending a response" (seen once in CI): keep connections open
    env["VLLM_HTTP_TIMEOUT_KEEP_ALIVE"] = "600"
    return subprocess.Popen(
        [VLLM, "serve", model, "--served-model-name", "tiny", "--host", "127.0.0.1",
         "--port", str(port), "--max-model-len", str(MAX_LEN), "--enforce-eager",
         "--dtype", "float32", *extra], env=env, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)  # its own process group, for _stop


def _stop(proc) -> None:
    """SIGTERM to the server (it shuts its engine down), then SIGKILL to what is left of
    its process group (an engine core or worker orphaned by a failed start)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _wait_ready(proc, port, log_path, timeout=300) -> None:
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n"
                                 + Path(log_path).read_text()[-4000:])
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise AssertionError("server not ready in time")


def _prompts():
    from vllm_sparse.models import long_text

    text = long_text()
    return [text[:1500], text[9000:9400], text[20000:21000]]


def _messages():
    from vllm_sparse.models import long_text

    text = long_text()
    return [[{"role": "system", "content": "Answer briefly."},
             {"role": "user", "content": text[30000:30600]}],
            [{"role": "user", "content": text[40000:40300]}]]


class Server:
    def __init__(self, proc, port, log_path):
        self.proc, self.port, self.log_path = proc, port, log_path
        self.url = f"http://127.0.0.1:{port}/v1"

    def alive(self) -> bool:
        import urllib.request

        if self.proc.poll() is not None:
            return False
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5) as r:
            return r.status == 200


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    """Launches the one radar server of this module; `client` waits until it is ready."""
    port = _free_port()
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    log = open(log_path, "w")
    proc = _serve(tiny_model, port, "--attention-backend", "radar",
                  "--additional-config", ADDITIONAL, log=log)
    try:
        yield Server(proc, port, log_path)
    finally:
        _stop(proc)
        log.close()


@pytest.fixture(scope="module")
def offline(tiny_model, server):
    """Offline radar outputs with the same model, config and engine settings as the server,
    computed in this process while the server starts."""
    import gc

    from vllm import LLM, SamplingParams

    llm = LLM(model=tiny_model, dtype="float32", max_model_len=MAX_LEN, enforce_eager=True,
              seed=0, attention_backend="radar", additional_config={"vllm_sparse": SPARSE})
    greedy = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    sampled = SamplingParams(n=3, temperature=0.8, seed=1, max_tokens=16, ignore_eos=True)

    def ids(outputs):
        return [[list(c.token_ids) for c in o.outputs] for o in outputs]

    completions = llm.generate(_prompts(), greedy, use_tqdm=False)
    stats = llm.apply_model(lambda m: m.model.layers[1].self_attn.attn.impl.stats)[0]
    assert stats.queries and stats.attended_tokens < 0.5 * stats.context_tokens, \
        "the sparse path must run, or nothing is tested"
    refs = {
        "completion": [o[0] for o in ids(completions)],
        "completion_text": [o.outputs[0].text for o in completions],
        "chat": [o[0] for o in ids(llm.chat(_messages(), greedy, use_tqdm=False))],
        "sampled": ids(llm.generate(_prompts()[:1], sampled, use_tqdm=False))[0],
    }
    del llm
    gc.collect()
    return refs


@pytest.fixture(scope="module")
def client(server, offline):  # `offline` first: it runs while the server starts
    from openai import OpenAI

    _wait_ready(server.proc, server.port, server.log_path)
    return OpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=120)


def _complete(client, prompt, **kwargs):
    kwargs = {**GREEDY, "extra_body": EXTRA, **kwargs}
    return client.completions.create(model="tiny", prompt=prompt, **kwargs)


def _token_ids(choice):
    return choice.model_extra["token_ids"]


# ---------------------------------------------------------------- normal requests
def test_serve_radar_answers_a_completion(client, server):
    prompt = "the quick brown fox jumps over a lazy dog " * 40
    out = client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0)
    assert out.choices[0].text and out.usage.completion_tokens == 16
    assert out.usage.prompt_tokens > 64  # longer than the budget: sparse decode ran
    text = Path(server.log_path).read_text()
    assert "using RADAR attention on CPU" in text
    assert "vllm_sparse config: method=\"radar\" (--attention-backend); budget=64 " \
           "(--additional-config)" in text


def test_completions_equal_offline(client, offline):
    for prompt, ids, text in zip(_prompts(), offline["completion"], offline["completion_text"]):
        out = _complete(client, prompt)
        assert out.usage.prompt_tokens > 4 * SPARSE["budget"]
        assert _token_ids(out.choices[0]) == ids
        assert out.choices[0].text == text
    # several prompts in one request: the same outputs, in order
    out = _complete(client, _prompts())
    assert [_token_ids(c) for c in sorted(out.choices, key=lambda c: c.index)] == \
        offline["completion"]


def test_chat_completions_equal_offline(client, offline):
    for messages, ids in zip(_messages(), offline["chat"]):
        out = client.chat.completions.create(model="tiny", messages=messages, extra_body=EXTRA,
                                             **GREEDY)
        assert out.usage.prompt_tokens > 2 * SPARSE["budget"]
        assert _token_ids(out.choices[0]) == ids
        assert out.choices[0].message.role == "assistant"


def test_streaming_equals_non_streaming(client, offline):
    prompt = _prompts()[0]
    whole = _complete(client, prompt).choices[0]
    text, ids, finish = "", [], None
    for chunk in _complete(client, prompt, stream=True):
        for choice in chunk.choices:
            text += choice.text
            ids += choice.model_extra.get("token_ids") or []
            finish = choice.finish_reason or finish
    assert (text, ids, finish) == (whole.text, _token_ids(whole), "length")
    assert ids == offline["completion"][0]

    messages = _messages()[0]
    content, ids = "", []
    for chunk in client.chat.completions.create(model="tiny", messages=messages, stream=True,
                                                extra_body=EXTRA, **GREEDY):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            ids += choice.model_extra.get("token_ids") or []
    whole = client.chat.completions.create(model="tiny", messages=messages, extra_body=EXTRA,
                                           **GREEDY).choices[0]
    assert content == whole.message.content and ids == offline["chat"][0]


def test_n_choices(client, offline):
    prompt = _prompts()[0]
    out = _complete(client, prompt, **SAMPLED)
    choices = sorted(out.choices, key=lambda c: c.index)
    assert [c.index for c in choices] == [0, 1, 2]
    sampled = [_token_ids(c) for c in choices]
    assert all(len(s) == SAMPLED["max_tokens"] for s in sampled)
    assert len({tuple(s) for s in sampled}) > 1, "seeded children must differ"
    assert sampled == offline["sampled"]  # per-request seeds: independent of the batch
    again = _complete(client, prompt, **SAMPLED)
    assert [_token_ids(c) for c in sorted(again.choices, key=lambda c: c.index)] == sampled

    # vLLM 0.32 refuses n > 1 with temperature 0; top_k=1 samples the argmax every time
    _assert_400(lambda: _complete(client, prompt, n=3), "n must be 1 when using greedy sampling")
    greedy = _complete(client, prompt, n=3, temperature=1.0, extra_body={**EXTRA, "top_k": 1})
    assert len(greedy.choices) == 3
    assert all(_token_ids(c) == offline["completion"][0] for c in greedy.choices)


def test_stop_string_truncates(client, offline):
    full = offline["completion_text"][0]
    stop = full[len(full) // 2:len(full) // 2 + 3]
    assert stop.strip(), f"pick a visible stop string from {full!r}"
    cut = full.index(stop)
    out = _complete(client, _prompts()[0], stop=[stop]).choices[0]
    assert out.text == full[:cut]
    assert out.finish_reason == "stop" and out.model_extra["stop_reason"] == stop
    # the same through the stream
    text = "".join(c.choices[0].text for c in _complete(client, _prompts()[0], stop=[stop],
                                                          stream=True) if c.choices)
    assert text == full[:cut]


# ---------------------------------------------------------------- bad requests
def _too_long_prompts():
    from vllm_sparse.models import long_text

    return {"text": long_text()[:40000],            # far over 2048 tokens
            "tokens": [11] * (MAX_LEN + 1)}          # one token over


def _assert_400(call, *fragments):
    import openai

    with pytest.raises(openai.BadRequestError) as info:
        call()
    assert info.value.status_code == 400
    for fragment in fragments:
        assert fragment in str(info.value)


@pytest.mark.parametrize("kind", ["text", "tokens"])
def test_prompt_over_max_model_len_is_a_400(client, server, offline, kind):
    prompt = _too_long_prompts()[kind]
    _assert_400(lambda: _complete(client, prompt), f"maximum context length is {MAX_LEN} tokens")
    _assert_400(lambda: list(_complete(client, prompt, stream=True)),
                f"maximum context length is {MAX_LEN} tokens")
    _assert_400(lambda: client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": _too_long_prompts()["text"]}],
        **GREEDY), f"maximum context length is {MAX_LEN} tokens")
    assert server.alive()
    out = _complete(client, _prompts()[1])
    assert _token_ids(out.choices[0]) == offline["completion"][1]


def test_context_filled_to_max_model_len(client, server):
    """A prompt that leaves room for exactly the requested tokens is served to the last
    position (the last KV block of the longest context the server accepts)."""
    prompt = [11 + i % 200 for i in range(MAX_LEN - 8)]
    out = _complete(client, prompt, max_tokens=8).choices[0]
    assert len(_token_ids(out)) == 8 and out.finish_reason == "length"
    assert server.alive()


def test_bad_requests_among_good_ones(client, server, offline):
    """Good requests, fired concurrently with bad ones (too long, out-of-vocabulary token,
    negative max_tokens) and with streams the client drops half-way, keep their outputs."""
    import openai

    prompts = _prompts()
    too_long = _too_long_prompts()
    bad = [lambda: _complete(client, too_long["text"]),
           lambda: _complete(client, too_long["tokens"]),
           lambda: _complete(client, [1, 2, 10**6]),
           lambda: _complete(client, prompts[0], max_tokens=-1),
           lambda: client.chat.completions.create(
               model="tiny", messages=[{"role": "user", "content": too_long["text"]}], **GREEDY)]
    dropped = threading.Event()

    def drop_stream():
        stream = _complete(client, prompts[2], stream=True, max_tokens=200)
        for i, _ in enumerate(stream):
            if i == 3:
                break
        stream.close()  # the server aborts the request mid-decode
        dropped.set()

    def good(i):
        return _token_ids(_complete(client, prompts[i % 3]).choices[0])

    def bad_call(call):
        try:
            call()
        except openai.BadRequestError as exc:
            return exc.status_code
        return "accepted"

    with ThreadPoolExecutor(max_workers=8) as pool:
        goods = [pool.submit(good, i) for i in range(6)]
        bads = [pool.submit(bad_call, call) for call in bad * 2]
        drops = [pool.submit(drop_stream) for _ in range(2)]
        good_ids = [f.result() for f in goods]
        bad_codes = [f.result() for f in bads]
        for f in drops:
            f.result()
    assert dropped.is_set()
    assert bad_codes == [400] * len(bad_codes)
    assert good_ids == [offline["completion"][i % 3] for i in range(6)]
    assert server.alive()
    assert [_token_ids(_complete(client, p).choices[0]) for p in prompts] == \
        offline["completion"]


def test_server_log_has_no_errors(client, server):
    """Run last: nothing above left a traceback or an engine error in the server's log."""
    assert server.alive()
    text = Path(server.log_path).read_text()
    assert "Traceback" not in text and "EngineCore encountered" not in text
    assert " ERROR " not in text, [l for l in text.splitlines() if " ERROR " in l][:5]
