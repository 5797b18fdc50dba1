# SPDX-License-Identifier: Apache-2.0
"""benchmarks/load.py's reading of the server's gauges: Prometheus text parsed as vLLM 0.32's
/metrics writes it, the KV pool's size from cache_config_info, the occupancy summary (running
requests, pool use, KV held per running request), the sampler stopping with the load, and
--kv-blocks reaching every server's command line."""

import argparse
import asyncio
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import load  # noqa: E402

METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="model"} 3.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="model"} 5.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="model"} 0.75
# TYPE vllm:num_preemptions_total counter
vllm:num_preemptions_total{engine="0",model_name="model"} 2.0
vllm:num_preemptions_total{engine="1",model_name="model"} 1.0
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="32",cache_dtype="auto",engine="0",num_gpu_blocks="192"} 1.0
"""


def test_metric_values_are_summed_over_label_sets():
    assert load.metric_value(METRICS, "vllm:num_requests_running") == 3.0
    assert load.metric_value(METRICS, "vllm:num_preemptions_total") == 3.0
    assert load.metric_value(METRICS, "vllm:kv_cache_usage_perc") == 0.75
    assert load.metric_value(METRICS, "vllm:num_requests") is None   # a prefix is not a name


def test_pool_tokens_is_blocks_times_block_size():
    assert load.pool_tokens(METRICS) == 192 * 32
    assert load.pool_tokens("vllm:num_requests_running 1.0\n") is None


def test_occupancy_averages_busy_samples_only():
    samples = [{"t": 0.0, "running": 0.0, "waiting": 0.0, "kv_usage": 0.0},   # idle: left out
               {"t": 1.0, "running": 2.0, "waiting": 4.0, "kv_usage": 0.5},
               {"t": 2.0, "running": 4.0, "waiting": 0.0, "kv_usage": 1.0}]
    out = load.occupancy(samples, pool=1000)
    assert out["running_mean"] == 3.0 and out["running_peak"] == 4.0
    assert out["waiting_mean"] == 2.0
    assert out["kv_usage_mean"] == 0.75 and out["kv_usage_peak"] == 1.0
    # (0.5 * 1000 + 1.0 * 1000) tokens held over 2 + 4 running requests
    assert out["kv_tokens_per_running"] == pytest.approx(1500 / 6)
    assert "kv_tokens_per_running" not in load.occupancy(samples, pool=None)
    assert load.occupancy(samples[:1], pool=1000) == {}


class FakeServer:
    """metrics_text() counts its calls; running requests go 1, 2, 3, ..."""

    def __init__(self):
        self.calls = 0

    def metrics_text(self):
        self.calls += 1
        return METRICS.replace("} 3.0", f"}} {self.calls}.0", 1)


def test_sampler_reads_until_the_load_is_done(monkeypatch):
    monkeypatch.setattr(load, "SAMPLE_EVERY_S", 0.01)
    server = FakeServer()

    async def run():
        done = asyncio.Event()
        task = asyncio.create_task(load.sample_gauges(server, done))
        await asyncio.sleep(0.1)
        done.set()
        return await task

    samples = asyncio.run(run())
    assert len(samples) == server.calls >= 3
    assert [s["running"] for s in samples] == [float(i + 1) for i in range(len(samples))]
    assert all(s["waiting"] == 5.0 and s["kv_usage"] == 0.75 for s in samples)


def _args(**kwargs):
    base = dict(max_model_len=2048, dtype="float32", seed=0, serve_arg=[], enforce_eager=True,
                on_cpu=True, kv_blocks=None, additional_config='{"budget": 64}')
    return argparse.Namespace(**(base | kwargs))


def test_kv_blocks_reach_every_server_and_dense_stays_vllms_own():
    dense = load.server_command("dense", "/m", _args(kv_blocks=192), 8000)
    nats = load.server_command("nats", "/m", _args(kv_blocks=192), 8001)
    for cmd in (dense, nats):
        assert cmd[cmd.index("--num-gpu-blocks-override") + 1] == "192"
        assert cmd[cmd.index("--block-size") + 1] == "32"
    assert "--attention-backend" not in dense and "--additional-config" not in dense
    assert nats[nats.index("--attention-backend") + 1] == "nats"
    assert "--num-gpu-blocks-override" not in load.server_command("dense", "/m", _args(), 8000)


def test_non_positive_kv_blocks_are_refused(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["load.py", "--kv-blocks", "0"])
    with pytest.raises(SystemExit):
        load.parse_args()
    assert "--kv-blocks must be a positive number of blocks, got 0" in capsys.readouterr().err


def test_block_size_follows_serve_args():
    assert load.block_size(_args()) == 32
    assert load.block_size(_args(on_cpu=False)) is None          # vLLM picks it
    assert load.block_size(_args(serve_arg=["--block-size=16"])) == 16
    assert load.block_size(_args(serve_arg=["--block-size", "64"])) == 64
