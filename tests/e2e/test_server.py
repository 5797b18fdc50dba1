# SPDX-License-Identifier: Apache-2.0
"""`vllm serve MODEL --attention-backend radar`: the real console script, a real HTTP
request on loopback, and a configuration error that stops the server at start-up."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
VLLM = str(Path(sys.executable).parent / "vllm")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(model, port, *extra, log):
    env = dict(os.environ)
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the server's default engine
    return subprocess.Popen(
        [VLLM, "serve", model, "--served-model-name", "tiny", "--host", "127.0.0.1",
         "--port", str(port), "--max-model-len", "2048", "--enforce-eager", "--dtype", "float32",
         *extra], env=env, stdout=log, stderr=subprocess.STDOUT)


def _wait_ready(proc, port, timeout=240) -> None:
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise AssertionError("server not ready in time")


def test_serve_radar_answers_a_completion(tiny_model, tmp_path):
    from openai import OpenAI

    port = _free_port()
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        proc = _serve(tiny_model, port, "--attention-backend", "radar", "--additional-config",
                      '{"vllm_sparse": {"budget": 64, "radar": {"local_window": 32}}}', log=log)
        try:
            _wait_ready(proc, port)
            client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
            prompt = "the quick brown fox jumps over a lazy dog " * 40
            out = client.completions.create(model="tiny", prompt=prompt, max_tokens=16,
                                            temperature=0)
            assert out.choices[0].text and out.usage.completion_tokens == 16
            assert out.usage.prompt_tokens > 64  # longer than the budget: sparse decode ran
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    text = log_path.read_text()
    assert "using RADAR attention on CPU" in text
    assert "vllm_sparse config: method=\"radar\" (--attention-backend); budget=64 " \
           "(--additional-config)" in text


def test_serve_rejects_a_bad_config_at_startup(tiny_model, tmp_path):
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        proc = _serve(tiny_model, _free_port(), "--attention-backend", "radar",
                      "--additional-config", '{"vllm_sparse": {"budget": -3}}', log=log)
        assert proc.wait(timeout=240) != 0
    assert "budget=-3: a token count must be >= 1" in log_path.read_text()
