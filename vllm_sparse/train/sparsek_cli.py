# SPDX-License-Identifier: Apache-2.0
"""The `sparsek` (train), `sparsek-fit` (closed-form fit) and `sparsek-eval` (measure) commands of `python -m vllm_sparse.train`."""

import argparse
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

import torch

from vllm_sparse.sparsek.scorer import SparseKScorer
from vllm_sparse.train.nats_cli import _gate_shape, load_model

DEFAULT_K, DEFAULT_WINDOW, DEFAULT_SLOPE = 192, 64, -0.05


def _finite(x):
    """JSON-safe float (nan / inf -> None)."""
    return x if isinstance(x, (int, str)) or x is None or math.isfinite(x) else None


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="Hugging Face model directory (Llama-style)")
    p.add_argument("--out", required=True, help="scorer file to write (.safetensors)")
    p.add_argument("--data", help="text file or directory (default: Debian python3.11-doc)")
    p.add_argument("--checkpoint", help="training checkpoint (default: OUT.ckpt.pt)")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    p.add_argument("--init", help="start from this scorer file (its weight, bias, slope) "
                   "instead of the position-only scorer of --init-slope")
    p.add_argument("--steps", type=int, default=200, help="total optimizer steps")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--k", type=int, default=DEFAULT_K, help="top-k candidates per KV head")
    p.add_argument("--window", type=int, default=DEFAULT_WINDOW,
                   help="always-attended recent tokens (the query's own included)")
    p.add_argument("--init-slope", type=float, default=DEFAULT_SLOPE,
                   help="initial slope (weight = bias = 0): <= -1 is StreamingLLM without "
                        "gradient, 0 is 'oldest k, damped'; small negative values prefer "
                        "sinks while SPARSEK still passes gradient")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--query-block", type=int, default=256, help="queries per attention block")
    p.add_argument("--kernels", default="auto", choices=("auto", "triton", "torch"),
                   help="SPARSEK implementation (auto: Triton on CUDA, torch elsewhere)")
    p.add_argument("--detach-features", action="store_true",
                   help="score detached k / v (no gradient into earlier layers' scorers)")
    p.add_argument("--checkpoint-every", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar (log lines only)")


def _check_shape(scorer: SparseKScorer, model, what: str) -> None:
    layers, kv_heads, head = _gate_shape(model)
    if scorer.weight.shape != (layers, kv_heads, 2 * head):
        raise ValueError(f"{what}: scorer for {tuple(scorer.weight.shape)}, model needs "
                         f"[{layers}, {kv_heads}, {2 * head}]")


def _initial_params(args, model):
    from vllm_sparse.sparsek.hf_attention import SparseKParams

    if not args.init:
        return SparseKParams(SparseKScorer.zeros(*_gate_shape(model), args.k, args.window,
                                                 slope=args.init_slope))
    scorer = SparseKScorer.load(args.init)
    _check_shape(scorer, model, f"--init {args.init}")
    return SparseKParams(SparseKScorer(scorer.weight, scorer.bias, scorer.slope, args.k,
                                       args.window))


def train(args, argv: list[str]) -> SparseKScorer:
    from vllm_sparse.train import data
    from vllm_sparse.train.distill import DistillConfig, distill
    from vllm_sparse.train.sparsek import SparseKMethod

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model)
    method = SparseKMethod(_initial_params(args, model), args.query_block, args.kernels,
                           args.detach_features)
    corpus = data.load_corpus(args.data)
    windows = data.TokenWindows(data.tokenize(corpus, tokenizer), args.seq_len, args.seed)
    print(f"data: {corpus.description}; {len(windows)} windows of {args.seq_len} tokens",
          flush=True)
    cfg = DistillConfig(steps=args.steps, lr=args.lr, weight_decay=args.weight_decay,
                        grad_clip=args.grad_clip, lam=0.0, target=None,
                        checkpoint_every=args.checkpoint_every)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    ckpt = Path(args.checkpoint) if args.checkpoint else out.with_name(out.name + ".ckpt.pt")
    command = "python -m vllm_sparse.train " + shlex.join(argv)

    def save(state):
        history = [{key: _finite(round(m[key], 5) if isinstance(m[key], float) else m[key])
                    for key in ("step", "kl", "free_top", "p_top", "slope", "grad_norm",
                                "step_s") if key in m} for m in state.history]
        meta = {"command": command, "model": model.config._name_or_path, "steps": state.step,
                "tokens": state.step * args.seq_len, "wall_time_s": round(state.elapsed_s, 1),
                "data": corpus.description, "seq_len": args.seq_len, "k": args.k,
                "window": args.window, "init": args.init or f"zeros, slope={args.init_slope}",
                "kl": _finite(state.mean("kl")), "kl_at": "mean of the last 10 steps",
                "free_top": _finite(state.mean("free_top")), "lr": args.lr,
                "weight_decay": args.weight_decay, "grad_clip": args.grad_clip,
                "detach_features": args.detach_features, "seed": args.seed,
                "checkpoint": str(ckpt), "history": history,
                "scorer": "u_j = w . concat(k_j, v_j) (post-RoPE, per KV head) + b + slope * j; "
                          "window + hard top-k, values scaled by SPARSEK p; "
                          "KL(teacher || student) self-distillation"}
        tmp = out.with_name(out.name + ".tmp")
        method.params.to_scorer(meta).save(tmp)
        os.replace(tmp, out)

    state = distill(model, method, windows, cfg, ckpt, resume=args.resume, on_checkpoint=save,
                    progress=not args.no_progress)
    print(f"saved {out} after {state.step} steps ({state.elapsed_s:.0f} s); checkpoint {ckpt}",
          flush=True)
    return SparseKScorer.load(out)


def add_fit_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="Hugging Face model directory (Llama-style)")
    p.add_argument("--out", required=True, help="scorer file to write (.safetensors)")
    p.add_argument("--data", help="text file or directory (default: Debian python3.11-doc)")
    p.add_argument("--windows", type=int, default=16, help="training sequences to fit on")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--k", type=int, default=DEFAULT_K, help="top-k candidates per KV head")
    p.add_argument("--window", type=int, default=DEFAULT_WINDOW,
                   help="always-attended recent tokens; attention inside it is not fitted")
    p.add_argument("--sharpness", type=float, default=100.0,
                   help="scores = sharpness * fitted log relative attention (large: p = 1 on "
                        "the top-k; small: SPARSEK damps more values and passes more gradient)")
    p.add_argument("--ridge", type=float, default=1e-3,
                   help="ridge penalty, relative to the diagonal of the Gram matrix")
    p.add_argument("--min-queries", type=int, default=32,
                   help="fit only tokens that are candidates of at least this many queries")
    p.add_argument("--query-block", type=int, default=256)
    p.add_argument("--seed", type=int, default=0, help="order of the training windows")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")


def fit(args, argv: list[str]) -> SparseKScorer:
    """Closed-form scorer from the dense model's attention maps (`train.sparsek_fit`)."""
    from vllm_sparse.train import data
    from vllm_sparse.train import sparsek_fit

    for name in ("windows", "seq_len", "k", "min_queries"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)}; allowed: >= 1")
    if not 1 <= args.window < args.seq_len:
        raise ValueError(f"--window {args.window}; allowed: 1 .. --seq-len - 1 ({args.seq_len - 1})")
    if not args.sharpness > 0 or not args.ridge >= 0:
        raise ValueError(f"--sharpness {args.sharpness}, --ridge {args.ridge}; allowed: "
                         "sharpness > 0, ridge >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model, tokenizer = load_model(args.model)
    corpus = data.load_corpus(args.data)
    windows = data.TokenWindows(data.tokenize(corpus, tokenizer), args.seq_len, args.seed)
    if len(windows) < args.windows:
        raise ValueError(f"--windows {args.windows}: the data has only {len(windows)} windows "
                         f"of {args.seq_len} tokens")
    print(f"data: {corpus.description}; fitting on {args.windows} of {len(windows)} windows of "
          f"{args.seq_len} tokens", flush=True)
    beta, ridge_fit = sparsek_fit.fit(model, windows, args.windows, args.window,
                                      args.min_queries, args.ridge, args.query_block,
                                      progress=not args.no_progress)
    r2 = ridge_fit.r_squared(beta)
    meta = {"command": "python -m vllm_sparse.train " + shlex.join(argv),
            "model": model.config._name_or_path, "data": corpus.description,
            "windows": args.windows, "seq_len": args.seq_len,
            "tokens": args.windows * args.seq_len, "k": args.k, "window": args.window,
            "sharpness": args.sharpness, "ridge": args.ridge, "min_queries": args.min_queries,
            "seed": args.seed, "wall_time_s": round(time.perf_counter() - start, 1),
            "r2_mean": round(r2.mean().item(), 4), "r2_min": round(r2.min().item(), 4),
            "r2_per_layer": [round(x, 4) for x in r2.mean(-1).tolist()],
            "scorer": "u_j = sharpness * (w . concat(k_j, v_j) + c * j + b), (w, c, b) the "
                      "weighted ridge fit of log(relative attention as a candidate + 1e-3) "
                      "of the dense teacher (vllm_sparse/train/sparsek_fit.py)"}
    scorer = sparsek_fit.scorer_from(beta, args.sharpness, args.k, args.window, meta)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    scorer.save(out)
    print(f"saved {out}: R^2 mean {meta['r2_mean']}, min {meta['r2_min']}; "
          f"{meta['wall_time_s']} s", flush=True)
    return SparseKScorer.load(out)


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="Hugging Face model directory")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--scorer", help="scorer file (.safetensors)")
    which.add_argument("--slope", type=float, help="no file: the position-only scorer "
                       "u_j = slope * j (-1: StreamingLLM; the untrained init of `sparsek`)")
    p.add_argument("--k", type=int, help=f"override the file's k (default with --slope: "
                   f"{DEFAULT_K})")
    p.add_argument("--window", type=int, help=f"override the file's window (default with "
                   f"--slope: {DEFAULT_WINDOW})")
    p.add_argument("--context", type=int, default=4096, help="tokens per window")
    p.add_argument("--windows", type=int, default=2, help="windows to average over")
    p.add_argument("--data", help="text file or directory (default: pydoc_data.topics, the "
                   "benchmarks' held-out evaluation text)")
    p.add_argument("--record", action="store_true",
                   help="also store the result in the scorer file's meta (needs --scorer)")
    p.add_argument("--query-block", type=int, default=256)
    p.add_argument("--kernels", default="auto", choices=("auto", "triton", "torch"))
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")


def eval_windows(tokenizer, context: int, windows: int, data_path: str | None = None):
    """-> (ids [W, context] evenly spaced over the text, source): pydoc_data.topics by default."""
    if data_path:
        from vllm_sparse.train.data import read_texts

        text, source = "\n\n".join(t for _, t in read_texts(Path(data_path))), data_path
    else:
        from vllm_sparse.models import long_text

        text, source = long_text(), "pydoc_data.topics"
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    count = len(ids) // context
    if count < 1:
        raise ValueError(f"--context {context}: the text has only {len(ids)} tokens")
    step = count // min(windows, count)
    starts = [i * step * context for i in range(min(windows, count))]
    return torch.stack([ids[s:s + context] for s in starts]), source


def measure_kl(model, scorer: SparseKScorer, ids: torch.Tensor, query_block: int = 256,
               kernels: str = "auto") -> dict:
    """ids [W, N] -> KL(dense || SparseK) nats/token (mean over windows and positions),
    p_top / free_top (see `sparsek.step_metrics`) and the attended share at the last query."""
    from vllm_sparse.train.distill import _hidden, kl_loss
    from vllm_sparse.train.sparsek import SparseKMethod, step_metrics

    method = SparseKMethod(scorer, query_block, kernels)  # a SparseKScorer serves as params
    rows = []
    with torch.no_grad():
        for window in ids:
            start = time.perf_counter()
            kwargs = method.step_kwargs()
            student = _hidden(model, window[None], method.attn_name, kwargs)
            teacher = _hidden(model, window[None], "sdpa", {})
            row = {"kl": kl_loss(model, student, teacher, 512).item(),
                   **step_metrics(kwargs["sparsek"])}
            row["seconds"] = time.perf_counter() - start
            rows.append(row)
    out = {key: sum(r[key] for r in rows) / len(rows) for key in rows[0]}
    out["kl_per_window"] = [r["kl"] for r in rows]
    out["attended_last"] = min(1.0, (scorer.k + scorer.window) / ids.shape[1])
    return out


def evaluate(args, argv: list[str]) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.record and not args.scorer:
        raise ValueError("--record needs --scorer (a file to write the result into)")
    model, tokenizer = load_model(args.model)
    if args.scorer:
        scorer = SparseKScorer.load(args.scorer)
        _check_shape(scorer, model, f"--scorer {args.scorer}")
        label = args.scorer
    else:
        scorer = SparseKScorer.zeros(*_gate_shape(model), args.k or DEFAULT_K,
                                     DEFAULT_WINDOW if args.window is None else args.window,
                                     slope=args.slope)
        label = f"zeros, slope={args.slope}"
    if args.k is not None or args.window is not None:
        scorer = SparseKScorer(scorer.weight, scorer.bias, scorer.slope, args.k or scorer.k,
                               scorer.window if args.window is None else args.window,
                               scorer.meta)
    batch, source = eval_windows(tokenizer, args.context, args.windows, args.data)
    result = {"scorer": label, "k": scorer.k, "window": scorer.window,
              "context": args.context, "windows": len(batch), "data": source,
              **measure_kl(model, scorer, batch, args.query_block, args.kernels)}
    result = {key: _finite(v) if isinstance(v, float) else v for key, v in result.items()}
    print(json.dumps(result), flush=True)
    if args.record:
        stored = SparseKScorer.load(args.scorer)
        stored.meta[f"measured_kl_{args.context}_k{scorer.k}_w{scorer.window}"] = result
        stored.save(args.scorer)
    return result


if __name__ == "__main__":
    sys.exit("use: python -m vllm_sparse.train {sparsek,sparsek-eval} ...")
