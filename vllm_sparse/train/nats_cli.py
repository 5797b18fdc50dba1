# SPDX-License-Identifier: Apache-2.0
"""The `nats` (train) and `nats-kept` (measure) commands of `python -m vllm_sparse.train`."""

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

import torch

from vllm_sparse.nats.gates import NatsGates


def load_model(model_dir: str):
    """-> (frozen fp32 causal LM with sdpa attention, tokenizer)."""
    if not (Path(model_dir) / "config.json").is_file():
        raise FileNotFoundError(f"--model {model_dir}: not a Hugging Face model directory "
                                "(no config.json); e.g. `python -m vllm_sparse.models smollm2`")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 attn_implementation="sdpa")
    model.requires_grad_(False).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


def _gate_shape(model) -> tuple[int, int, int]:
    cfg = model.config
    head = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return cfg.num_hidden_layers, cfg.num_key_value_heads, head


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="Hugging Face model directory (Llama-style)")
    p.add_argument("--out", required=True, help="gates file to write (.safetensors)")
    p.add_argument("--data", help="text file or directory (default: Debian python3.11-doc)")
    p.add_argument("--checkpoint", help="training checkpoint (default: OUT.ckpt.pt)")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    p.add_argument("--init", help="start from this gates file instead of zero gates")
    p.add_argument("--steps", type=int, default=200, help="total optimizer steps")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--chunk-size", type=int, default=16, help="multiple of 16")
    p.add_argument("--window", type=int, default=256, help="SLIDING lifetime past the chunk end")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--lam", type=float, default=1.0, help="weight of the kept-fraction penalty")
    p.add_argument("--target-kept", type=float, help="adapt --lam toward this argmax kept "
                   "fraction (at --seq-len)")
    p.add_argument("--lam-lr", type=float, default=1.0, help="rate of the --lam adaptation")
    p.add_argument("--tau", type=float, default=1.0, help="Gumbel-softmax temperature")
    p.add_argument("--query-block", type=int, default=256, help="queries per attention block")
    p.add_argument("--checkpoint-every", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar (log lines only)")


def _initial_params(args, model):
    from vllm_sparse.train.nats import NatsGateParams

    layers, kv_heads, head = _gate_shape(model)
    if not args.init:
        return NatsGateParams.zeros(layers, kv_heads, head, args.chunk_size, args.window)
    gates = NatsGates.load(args.init)
    if gates.weight.shape[:2] != (layers, kv_heads) or gates.head_size != head:
        raise ValueError(f"--init {args.init}: gates for {tuple(gates.weight.shape)}, model "
                         f"needs [{layers}, {kv_heads}, 3, {2 * head}]")
    return NatsGateParams(NatsGates(gates.weight, gates.bias, args.chunk_size, args.window))


def train(args, argv: list[str]) -> NatsGates:
    from vllm_sparse.train import data
    from vllm_sparse.train.distill import DistillConfig, distill
    from vllm_sparse.train.nats import NatsMethod

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model)
    method = NatsMethod(_initial_params(args, model), args.tau, args.query_block)
    corpus = data.load_corpus(args.data)
    windows = data.TokenWindows(data.tokenize(corpus, tokenizer), args.seq_len, args.seed)
    print(f"data: {corpus.description}; {len(windows)} windows of {args.seq_len} tokens",
          flush=True)
    cfg = DistillConfig(steps=args.steps, lr=args.lr, weight_decay=args.weight_decay,
                        grad_clip=args.grad_clip, lam=args.lam, target=args.target_kept,
                        lam_lr=args.lam_lr, checkpoint_every=args.checkpoint_every)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    ckpt = Path(args.checkpoint) if args.checkpoint else out.with_name(out.name + ".ckpt.pt")
    command = "python -m vllm_sparse.train " + shlex.join(argv)

    def save(state):
        meta = {"command": command, "model": model.config._name_or_path, "steps": state.step,
                "wall_time_s": round(state.elapsed_s, 1), "data": corpus.description,
                "seq_len": args.seq_len, "kept_fraction": state.mean("kept_hard"),
                "kept_fraction_at": f"{args.seq_len} tokens, argmax types, mean of last 10 steps",
                "kl": state.mean("kl"), "lam": state.lam, "target_kept": args.target_kept,
                "lr": args.lr, "weight_decay": args.weight_decay, "tau": args.tau,
                "seed": args.seed, "checkpoint": str(ckpt),
                "gate": "chunk mean of concat(k, v) (post-RoPE) -> linear; straight-through "
                        "Gumbel-softmax; KL(teacher || student) self-distillation"}
        tmp = out.with_name(out.name + ".tmp")
        method.params.to_gates(meta).save(tmp)
        os.replace(tmp, out)

    state = distill(model, method, windows, cfg, ckpt, resume=args.resume, on_checkpoint=save,
                    progress=not args.no_progress)
    print(f"saved {out} after {state.step} steps ({state.elapsed_s:.0f} s); checkpoint {ckpt}",
          flush=True)
    return NatsGates.load(out)


def add_kept_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gates", required=True, help="gates file (.safetensors)")
    p.add_argument("--model", required=True, help="Hugging Face model directory")
    p.add_argument("--context", type=int, default=4096, help="tokens per window")
    p.add_argument("--windows", type=int, default=2, help="windows to average over")
    p.add_argument("--data", help="text file or directory (default: pydoc_data.topics, the "
                   "benchmarks' held-out evaluation text)")
    p.add_argument("--no-kl", action="store_true", help="skip the dense forward and the KL")
    p.add_argument("--record", action="store_true",
                   help="also store the result in the gates file's meta")
    p.add_argument("--query-block", type=int, default=256)


def measure_kept(model, gates: NatsGates, ids: torch.Tensor, kl: bool = True,
                 query_block: int = 256) -> dict:
    """ids [W, N] -> kept fraction at the last position (argmax types, mean over windows,
    layers, KV heads), type shares and, if kl, KL(dense || NAtS) per token."""
    from vllm_sparse.train.distill import _hidden, kl_loss
    from vllm_sparse.train.nats import NatsGateParams, NatsMethod

    method = NatsMethod(NatsGateParams(gates), query_block=query_block)
    rows = []
    with torch.no_grad():
        for window in ids:
            kwargs = method.step_kwargs(sample=False)
            student = _hidden(model, window[None], method.attn_name, kwargs)
            row = method.regularizer(kwargs)[1]
            if kl:
                teacher = _hidden(model, window[None], "sdpa", {})
                row["kl"] = kl_loss(model, student, teacher, 512).item()
            rows.append(row)
    out = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0] if k != "kept"}
    out["kept_fraction"] = out.pop("kept_hard")
    return out


def kept(args, argv: list[str]) -> dict:
    model, tokenizer = load_model(args.model)
    gates = NatsGates.load(args.gates)
    if args.data:
        from vllm_sparse.train.data import read_texts

        text, source = "\n\n".join(t for _, t in read_texts(Path(args.data))), args.data
    else:
        from vllm_sparse.models import long_text

        text, source = long_text(), "pydoc_data.topics"
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    count = len(ids) // args.context
    if count < 1:
        raise ValueError(f"--context {args.context}: the text has only {len(ids)} tokens")
    step = count // min(args.windows, count)
    starts = [i * step * args.context for i in range(min(args.windows, count))]
    batch = torch.stack([ids[s:s + args.context] for s in starts])
    result = {"context": args.context, "windows": len(starts), "data": source,
              **measure_kept(model, gates, batch, not args.no_kl, args.query_block)}
    print(json.dumps(result), flush=True)
    if args.record:
        gates.meta[f"measured_kept_{args.context}"] = result
        gates.save(args.gates)
    return result


if __name__ == "__main__":
    sys.exit("use: python -m vllm_sparse.train {nats,nats-kept} ...")
