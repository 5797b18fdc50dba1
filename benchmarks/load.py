# SPDX-License-Identifier: Apache-2.0
"""A bounded load test of the real `vllm serve`, dense next to Radar.

    python benchmarks/load.py [--small] [--model smollm2|tiny|PATH] [--requests 200]
                              [--concurrency 16] [--backends dense,radar]
                              [--additional-config JSON] [--max-model-len N]

For each backend in turn (dense: no --attention-backend, vLLM's own; radar:
`--attention-backend radar`) it starts `vllm serve` on loopback, sends one warm-up request,
then the same seeded request set from a closed loop of `--concurrency` clients
(openai.AsyncOpenAI, streaming completions, token-id prompts cut from CPython's pydoc text,
lengths uniform between --min-prompt and the context left after the output, `ignore_eos`
so every request produces exactly its drawn number of tokens), stops the server and goes on.

It prints p50/p90/p99 of end-to-end latency and of time to first token (TTFT, the first
streamed token), requests/s and output tokens/s, side by side with Radar/dense ratios, and
writes benchmarks/results/load[_small].json (machine, versions, date, every setting, each
server's `vllm_sparse config:` line and preemption count; a list of runs, one per device and
scenario (the default pool, or `--kv-blocks`), so another device's or scenario's run is kept).
Any failed request, short output or server error makes it exit non-zero.

While the load runs, the server's own gauges are read from /metrics once a second
(`vllm:num_requests_running`, `vllm:num_requests_waiting`, `vllm:kv_cache_usage_perc`):
mean and peak running requests, mean waiting, mean and peak KV-pool use, and the KV held per
running request (pool use × pool tokens / running requests, averaged over the samples). That
is where an evicting method (NAtS, SparseK) shows its memory: `--kv-blocks N` gives every
server the same pool of N blocks (`--num-gpu-blocks-override`), small enough that dense must
queue or preempt requests, and the evicting method, which returns pages to the pool while its
requests run, keeps more of them running in the same memory:

    python benchmarks/load.py --backends dense,nats --kv-blocks 192 --max-model-len 2048 ...

Default: SmolLM2-135M-Instruct at its full 8K context, 200 requests, 16 concurrent, 32 to
256 output tokens, Radar at the per-model file's budget (configs/). That is a GPU-sized run;
on a 2-core CPU it takes hours. `--small` (CI): the tiny random Llama, 2K context, 24
requests, 4 concurrent, 128 to 512 prompt tokens, 16 to 32 output tokens, Radar at budget
64 with a 32-token window (so sparse decoding runs), both servers started together to halve
the start-up time (an idle server uses about 2% of one core, measured on the CPU).

On CPU both servers run with --enforce-eager (torch.compile there costs minutes per start;
the tests run eager too), the KV block size is 32 for both backends (Radar's pinned size,
passed to dense too) and, unless VLLM_CPU_KVCACHE_SPACE is set, the KV cache is sized to
hold every concurrent request at the full context, so neither backend is measured through
preemptions (a preempted Radar request is recomputed densely; see tests/e2e).
"""

import argparse
import asyncio
import contextlib
import datetime
import json
import math
import os
import platform
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from report_tables import LOAD_NO_RATIO, LOAD_ROWS  # noqa: E402
from results_io import command_line, git_revision, save_run  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
VLLM = str(Path(sys.executable).parent / "vllm")
SMALL_SPARSE = {"budget": 64, "radar": {"local_window": 32}}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="the CI-sized run (see above)")
    parser.add_argument("--model", default=None, help="smollm2 | tiny | a model directory")
    parser.add_argument("--backends", default="dense,radar")
    parser.add_argument("--requests", type=int, default=None)
    parser.add_argument("--concurrency", type=int, default=None)
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="default: the model's context (2048 with --small)")
    parser.add_argument("--min-prompt", type=int, default=None)
    parser.add_argument("--max-prompt", type=int, default=None,
                        help="default: the context left after the longest output")
    parser.add_argument("--min-tokens", type=int, default=None)
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--additional-config", default=None,
                        help="JSON for `vllm_sparse` given to radar (default: the per-model "
                             "file; with --small " + json.dumps(SMALL_SPARSE) + ")")
    parser.add_argument("--kv-blocks", type=int, default=None,
                        help="the KV pool of every server, in blocks (--num-gpu-blocks-override;"
                             " default: sized to hold every concurrent request at full context)")
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, auto on GPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=None,
                        help="default: on CPU (torch.compile there costs minutes per start)")
    parser.add_argument("--parallel-start", action=argparse.BooleanOptionalAction, default=None,
                        help="start every server at once (default: with --small only)")
    parser.add_argument("--serve-arg", action="append", default=[],
                        help="extra argument for `vllm serve` (repeatable; use --serve-arg=...)")
    parser.add_argument("--output", default=None,
                        help="default: benchmarks/results/load[_small].json")
    args = parser.parse_args()
    small = args.small
    defaults = dict(model="tiny" if small else "smollm2", requests=24 if small else 200,
                    concurrency=4 if small else 16, min_prompt=128 if small else 64,
                    max_prompt=512 if small else None, min_tokens=16 if small else 32,
                    max_tokens=32 if small else 256, max_model_len=2048 if small else None,
                    parallel_start=small)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.additional_config is None and small:
        args.additional_config = json.dumps(SMALL_SPARSE)
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if args.kv_blocks is not None and args.kv_blocks <= 0:
        parser.error(f"--kv-blocks must be a positive number of blocks, got {args.kv_blocks}")
    return args


# ---------------------------------------------------------------- model and requests
def model_dir(name: str) -> str:
    from vllm_sparse.models import smollm2_dir, tiny_llama_dir

    return str({"smollm2": smollm2_dir, "tiny": tiny_llama_dir}.get(name, lambda: Path(name))())


def model_context(path: str) -> int:
    config = json.loads((Path(path) / "config.json").read_text())
    return int(config.get("max_position_embeddings", 2048))


def kv_bytes_per_token(path: str, dtype_bytes: int) -> int:
    config = json.loads((Path(path) / "config.json").read_text())
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    kv_heads = config.get("num_key_value_heads", heads)
    return 2 * config["num_hidden_layers"] * kv_heads * head_dim * dtype_bytes


def build_requests(path: str, args) -> list[tuple[list[int], int]]:
    """(prompt token ids, output tokens) for every request: seeded, the same for every backend."""
    from transformers import AutoTokenizer

    from vllm_sparse.models import long_text

    tokenizer = AutoTokenizer.from_pretrained(path)
    text_ids = tokenizer(long_text(), add_special_tokens=False, verbose=False)["input_ids"]
    rng = random.Random(args.seed)
    requests = []
    for _ in range(args.requests):
        length = rng.randint(args.min_prompt, args.max_prompt)
        start = rng.randrange(0, len(text_ids) - length)  # distinct windows: few prefix hits
        requests.append((text_ids[start:start + length],
                         rng.randint(args.min_tokens, args.max_tokens)))
    return requests


# ---------------------------------------------------------------- servers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CPU_BLOCK_SIZE = 32   # Radar's pinned block size, given to every backend on CPU


def _explicit_block_size(serve_arg: list[str]) -> int | None:
    """N of --serve-arg=--block-size=N (or --block-size N), None if not given."""
    for i, arg in enumerate(serve_arg):
        if arg.startswith("--block-size"):
            return int(arg.split("=", 1)[1] if "=" in arg else serve_arg[i + 1])
    return None


def block_size(args) -> int | None:
    """The KV block size the servers run with: --serve-arg=--block-size=N, else 32 on CPU;
    None where vLLM picks it (GPU)."""
    explicit = _explicit_block_size(args.serve_arg)
    if explicit is not None:
        return explicit
    return CPU_BLOCK_SIZE if args.on_cpu else None


def server_command(backend: str, model: str, args, port: int) -> list[str]:
    """`vllm serve` for one backend: dense is vLLM's own (no --attention-backend)."""
    cmd = [VLLM, "serve", model, "--served-model-name", "model", "--host", "127.0.0.1",
           "--port", str(port), "--max-model-len", str(args.max_model_len),
           "--dtype", args.dtype, "--seed", str(args.seed), *args.serve_arg]
    if args.enforce_eager:
        cmd.append("--enforce-eager")
    if args.on_cpu and _explicit_block_size(args.serve_arg) is None:
        cmd += ["--block-size", str(CPU_BLOCK_SIZE)]
    if args.kv_blocks is not None:
        cmd += ["--num-gpu-blocks-override", str(args.kv_blocks)]
    if backend != "dense":
        cmd += ["--attention-backend", backend]
        if args.additional_config:
            cmd += ["--additional-config",
                    json.dumps({"vllm_sparse": json.loads(args.additional_config)})]
    return cmd


class Server:
    def __init__(self, backend: str, model: str, args, log_dir: Path, env: dict):
        self.backend, self.port = backend, free_port()
        self.log_path = log_dir / f"{backend}.log"
        self.cmd = server_command(backend, model, args, self.port)
        self.log = open(self.log_path, "w")
        # its own process group: stop() reaches the engine core and workers too
        self.proc = subprocess.Popen(self.cmd, env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.started = time.perf_counter()
        self.startup_s = None

    def wait_ready(self, timeout: float = 900) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.backend} server exited with {self.proc.returncode}; "
                                   f"log {self.log_path}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        self.startup_s = time.perf_counter() - self.started
                        return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"{self.backend} server not ready in {timeout} s; log {self.log_path}")

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=10) as r:
            return r.read().decode()

    def metric(self, name: str) -> float | None:
        return metric_value(self.metrics_text(), name)

    def log_text(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def log_tail(self, n: int = 4000) -> str:
        return self.log_text()[-n:]

    def stop(self) -> int:
        """SIGTERM to the server (it shuts its engine down), then SIGKILL to its group."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # leftovers of the group, if any
        except ProcessLookupError:
            pass
        code = self.proc.wait()
        self.log.close()
        return code


# ---------------------------------------------------------------- the server's gauges
GAUGES = {"running": "vllm:num_requests_running", "waiting": "vllm:num_requests_waiting",
          "kv_usage": "vllm:kv_cache_usage_perc"}
SAMPLE_EVERY_S = 1.0


def metric_value(text: str, name: str) -> float | None:
    """The sum over label sets of a Prometheus metric in /metrics text; None if absent."""
    values = [float(m.group(1)) for m in
              re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.eE+-]+)$", text, re.M)]
    return sum(values) if values else None


def pool_tokens(text: str) -> int | None:
    """Tokens the KV pool holds: `num_gpu_blocks` × `block_size` of vllm:cache_config_info."""
    match = re.search(r"^vllm:cache_config_info\{([^}]*)\}", text, re.M)
    labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1))) if match else {}
    try:
        return int(labels["num_gpu_blocks"]) * int(labels["block_size"])
    except (KeyError, ValueError):
        return None


async def sample_gauges(server: "Server", done: asyncio.Event) -> list[dict]:
    """Reads GAUGES from the server every SAMPLE_EVERY_S until `done`: [{t, running, ...}]."""
    samples, start = [], time.perf_counter()
    while not done.is_set():
        text = await asyncio.to_thread(server.metrics_text)
        samples.append({"t": round(time.perf_counter() - start, 2)}
                       | {key: metric_value(text, name) for key, name in GAUGES.items()})
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), SAMPLE_EVERY_S)
    return samples


def occupancy(samples: list[dict], pool: int | None) -> dict:
    """Mean and peak running requests, mean waiting, mean and peak pool use (0-1) and the KV
    tokens held per running request (Σ use × pool / Σ running, over samples with any)."""
    busy = [s for s in samples if s["running"]]
    if not busy:
        return {}
    out = {"running_mean": sum(s["running"] for s in busy) / len(busy),
           "running_peak": max(s["running"] for s in busy),
           "waiting_mean": sum(s["waiting"] or 0 for s in busy) / len(busy),
           "kv_usage_mean": sum(s["kv_usage"] or 0 for s in busy) / len(busy),
           "kv_usage_peak": max(s["kv_usage"] or 0 for s in busy), "pool_tokens": pool}
    if pool:
        out["kv_tokens_per_running"] = (sum((s["kv_usage"] or 0) * pool for s in busy)
                                        / sum(s["running"] for s in busy))
    return out


async def measure(server: "Server", requests: list, concurrency: int) -> tuple:
    """run_load against `server` while its gauges are sampled: (results, wall, samples)."""
    done = asyncio.Event()
    sampler = asyncio.create_task(sample_gauges(server, done))
    try:
        results, wall = await run_load(f"http://127.0.0.1:{server.port}/v1", requests,
                                       concurrency)
    finally:
        done.set()
    return results, wall, await sampler


# ---------------------------------------------------------------- load
async def one_request(client, prompt: list[int], max_tokens: int) -> dict:
    start = time.perf_counter()
    ttft, tokens, usage = None, 0, None
    stream = await client.completions.create(
        model="model", prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True, "return_token_ids": True})
    async for chunk in stream:
        for choice in chunk.choices:
            new = len(choice.model_extra.get("token_ids") or [])
            if new and ttft is None:
                ttft = time.perf_counter() - start
            tokens += new
        if chunk.usage is not None:
            usage = chunk.usage
    latency = time.perf_counter() - start
    completion_tokens = usage.completion_tokens if usage else tokens
    return {"prompt_tokens": len(prompt), "max_tokens": max_tokens, "ttft_s": ttft,
            "latency_s": latency, "output_tokens": completion_tokens, "streamed_tokens": tokens}


async def run_load(url: str, requests: list, concurrency: int) -> tuple[list[dict], float]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=3600)
    await one_request(client, requests[0][0][:64], 4)  # warm-up, not counted
    queue: asyncio.Queue = asyncio.Queue()
    for index, request in enumerate(requests):
        queue.put_nowait((index, request))
    results: list[dict | None] = [None] * len(requests)

    async def worker():
        while not queue.empty():
            index, (prompt, max_tokens) = queue.get_nowait()
            try:
                results[index] = await one_request(client, prompt, max_tokens)
            except Exception as exc:  # recorded, reported, and fails the run
                results[index] = {"prompt_tokens": len(prompt), "max_tokens": max_tokens,
                                  "error": f"{type(exc).__name__}: {exc}"}

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    await client.close()
    return results, wall


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    values = sorted(values)
    if not values:
        return math.nan
    pos = (len(values) - 1) * q / 100
    low, high = math.floor(pos), math.ceil(pos)
    return values[low] + (values[high] - values[low]) * (pos - low)


def summarize(results: list[dict], wall: float) -> dict:
    ok = [r for r in results if "error" not in r]
    out_tokens = sum(r["output_tokens"] for r in ok)
    summary = {"requests": len(results), "errors": len(results) - len(ok), "wall_s": wall,
               "requests_per_s": len(ok) / wall, "output_tokens_per_s": out_tokens / wall,
               "output_tokens": out_tokens,
               "prompt_tokens": sum(r["prompt_tokens"] for r in ok),
               "short_outputs": sum(r["output_tokens"] != r["max_tokens"] for r in ok)}
    for key in ("latency_s", "ttft_s"):
        values = [r[key] for r in ok if r[key] is not None]
        for q in (50, 90, 99):
            summary[f"{key[:-2]}_p{q}_s"] = percentile(values, q)
    return summary


# ---------------------------------------------------------------- report
ROWS = [*LOAD_ROWS[:8], ("wall (s)", "wall_s"), *LOAD_ROWS[8:], ("server start (s)", "startup_s")]
"""The report's rows (report_tables.LOAD_ROWS) plus two the console table adds."""
NO_RATIO = (*LOAD_NO_RATIO, "startup_s")


def table(runs: dict) -> str:
    names = list(runs)
    base = runs.get("dense")
    head = f"{'':<38}" + "".join(f"{n:>12}" for n in names)
    others = [n for n in names if n != "dense"] if base else []
    head += "".join(f"{' ' + n + '/dense':>15}" for n in others)
    lines = [head]
    for label, key in ROWS:
        row = f"{label:<38}"
        for n in names:
            v = runs[n].get(key)
            if v is None:
                row += f"{'-':>12}"
            else:
                row += f"{v:>12.3f}" if isinstance(v, float) else f"{v:>12}"
        for n in others:
            a, b = runs[n].get(key), base.get(key)
            ok = isinstance(a, (int, float)) and isinstance(b, (int, float)) and b
            ok = ok and key not in NO_RATIO
            row += f"{a / b:>15.3f}" if ok else f"{'-':>15}"
        lines.append(row)
    return "\n".join(lines)


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


# ---------------------------------------------------------------- main
def main() -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")      # when run, not on import (tests import it)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse_args()
    t_start = time.perf_counter()
    import torch
    import vllm

    args.on_cpu = not torch.cuda.is_available()
    if args.dtype is None:
        args.dtype = "float32" if args.on_cpu else "auto"
    if args.enforce_eager is None:
        args.enforce_eager = args.on_cpu
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # clean up the servers
    model = model_dir(args.model)
    if args.max_model_len is None:
        args.max_model_len = model_context(model)
    if args.max_prompt is None:
        args.max_prompt = args.max_model_len - args.max_tokens
    if not args.min_prompt <= args.max_prompt <= args.max_model_len - args.max_tokens:
        raise SystemExit(f"prompt lengths [{args.min_prompt}, {args.max_prompt}] plus up to "
                         f"{args.max_tokens} output tokens do not fit in {args.max_model_len}")
    pool = args.kv_blocks and block_size(args) and args.kv_blocks * block_size(args)
    if pool and pool < args.max_model_len:
        raise SystemExit(f"--kv-blocks {args.kv_blocks} holds {pool}"
                         f" tokens, less than one request at --max-model-len "
                         f"{args.max_model_len}; vLLM refuses to start with such a pool")
    env = dict(os.environ)
    if args.on_cpu and "VLLM_CPU_KVCACHE_SPACE" not in env:
        dtype_bytes = 4 if args.dtype == "float32" else 2
        need = kv_bytes_per_token(model, dtype_bytes) * args.max_model_len * args.concurrency
        env["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, math.ceil(1.25 * need / 2**30)))
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the server's default engine
    requests = build_requests(model, args)
    log_dir = Path(tempfile.mkdtemp(prefix="vllm_sparse_load_"))
    print(f"model {model}, {args.requests} requests, {args.concurrency} concurrent, prompts "
          f"{args.min_prompt}-{args.max_prompt} tokens, outputs {args.min_tokens}-"
          f"{args.max_tokens} tokens, max-model-len {args.max_model_len}, dtype {args.dtype}, "
          f"KV cache {env.get('VLLM_CPU_KVCACHE_SPACE', 'default')} GiB; logs in {log_dir}",
          flush=True)

    runs, servers, failed = {}, {}, []
    try:
        if args.parallel_start:
            servers = {b: Server(b, model, args, log_dir, env) for b in args.backends}
        for backend in args.backends:
            server = servers.get(backend) or Server(backend, model, args, log_dir, env)
            servers[backend] = server
            server.wait_ready()
            print(f"{backend}: server ready in {server.startup_s:.1f} s; running the load",
                  flush=True)
            pool = pool_tokens(server.metrics_text())
            results, wall, samples = asyncio.run(measure(server, requests, args.concurrency))
            summary = summarize(results, wall) | occupancy(samples, pool)
            summary["gauge_samples"] = samples
            summary["startup_s"] = server.startup_s
            preemptions = server.metric("vllm:num_preemptions_total")
            summary["preemptions"] = None if preemptions is None else int(preemptions)
            log = server.log_text()
            config = re.search(r"vllm_sparse config: (.*)", log)
            summary["vllm_sparse_config"] = config.group(1) if config else None
            summary["server_command"] = " ".join(server.cmd[1:])
            errors = [r["error"] for r in results if "error" in r]
            bad_log = [l for l in log.splitlines() if "Traceback" in l or " ERROR " in l]
            if server.stop() not in (0, -15):
                bad_log.append(f"server exit status {server.proc.returncode}")
            summary["server_log_errors"] = bad_log[:20]
            if errors or summary["short_outputs"] or bad_log:
                failed.append(f"{backend}: {len(errors)} failed requests {errors[:3]}, "
                              f"{summary['short_outputs']} short outputs, server log: "
                              f"{bad_log[:3]}")
            summary["per_request"] = results
            runs[backend] = summary
            print(f"{backend}: {summary['requests']} requests in {wall:.1f} s, "
                  f"{summary['errors']} errors", flush=True)
    finally:
        for server in servers.values():
            if server.proc.poll() is None:
                server.stop()

    print()
    print(table(runs))
    record = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {cpu_model()}, {os.cpu_count()} cores",
        "device": "cpu" if args.on_cpu else torch.cuda.get_device_name(),
        "versions": {"vllm": vllm.__version__, "torch": torch.__version__,
                     "python": platform.python_version(), "vllm_sparse": git_revision()},
        "mode": "small" if args.small else "full", "command": command_line(),
        "scenario": f"KV pool of {args.kv_blocks} blocks" if args.kv_blocks else None,
        "model": model, "settings": {k: v for k, v in vars(args).items() if k != "serve_arg"}
        | {"serve_arg": args.serve_arg,
           "VLLM_CPU_KVCACHE_SPACE": env.get("VLLM_CPU_KVCACHE_SPACE")},
        "runs": runs,
        "ratios_vs_dense": {n: {key: runs[n][key] / runs["dense"][key]
                                for _, key in LOAD_ROWS[:8] if runs["dense"].get(key)}
                            for n in runs if n != "dense" and "dense" in runs},
        "total_s": time.perf_counter() - t_start,
        "ok": not failed,
    }
    output = Path(args.output) if args.output else \
        RESULTS / ("load_small.json" if args.small else "load.json")
    save_run(output, record)  # keeps other devices' runs
    print(f"\nwrote {output} ({record['total_s']:.0f} s in all)")
    if failed:
        print("FAILED:\n  " + "\n  ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
