# SPDX-License-Identifier: Apache-2.0
"""Self-distillation of attention gates into a frozen causal LM (method-agnostic).

Teacher = the model with its dense attention (`teacher_attn`, e.g. "sdpa"); student = the
same weights with the method's attention function (`GateMethod.attn_name`, registered in
transformers' `AttentionInterface` and selected through `config._attn_implementation`).
Loss per step = KL(teacher || student) of the next-token distributions, averaged over
positions, + lam * the method's differentiable penalty. AdamW updates only the method's
parameters; the model never changes.

Policy (what a good lam is) stays out of the loop: lam is fixed unless `target` is set,
in which case it is adapted multiplicatively, lam *= exp(lam_lr * (metric - target)), on
the method's `target_metric` (NAtS: the argmax kept fraction), so the run settles near the
requested sparsity whatever the scale of the KL gradients.
"""

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class GateMethod(Protocol):
    """What `distill` needs from a sparse-attention method (see `nats.NatsMethod`)."""

    attn_name: str
    params: nn.Module

    def step_kwargs(self, sample: bool = True) -> dict:
        """Fresh per-forward state, passed to the student forward as model kwargs."""

    def regularizer(self, kwargs: dict) -> tuple[torch.Tensor, dict]:
        """-> (differentiable penalty, float metrics) after a student forward with kwargs."""


@dataclass
class DistillConfig:
    """Optimisation settings (AdamW on the gate parameters; batch = 1 sequence)."""

    steps: int = 200
    lr: float = 2e-3
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    lam: float = 1.0
    target: float | None = None
    target_metric: str = "kept_hard"
    lam_lr: float = 1.0
    checkpoint_every: int = 10
    log_every: int = 1
    loss_chunk: int = 512
    teacher_attn: str = "sdpa"


@dataclass
class DistillState:
    """Everything a resumed run needs; saved with torch.save."""

    step: int = 0
    lam: float = 1.0
    elapsed_s: float = 0.0
    metrics: dict | None = None
    history: list = field(default_factory=list)

    def mean(self, key: str, last: int = 10) -> float:
        """Mean of a metric over the last `last` steps (nan before the first step)."""
        values = [m[key] for m in self.history[-last:] if key in m]
        return sum(values) / len(values) if values else float("nan")


def _hidden(model: nn.Module, input_ids: torch.Tensor, attn: str, kwargs: dict) -> torch.Tensor:
    model.config._attn_implementation = attn  # the setter also updates sub-configs
    return model.get_decoder()(input_ids=input_ids, use_cache=False, **kwargs).last_hidden_state


def _chunk_kl(head: nn.Module, student: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    logp = F.log_softmax(head(student).float(), dim=-1)
    return F.kl_div(logp, teacher_logp, log_target=True, reduction="sum")


def kl_loss(model: nn.Module, student_h: torch.Tensor, teacher_h: torch.Tensor,
            chunk: int) -> torch.Tensor:
    """hidden [B, N, H] -> mean over positions of KL(teacher || student), computed through
    the LM head in chunks of positions so [N, vocab] logits never exist at once."""
    head, total = model.get_output_embeddings(), student_h.new_zeros(())
    n = student_h.shape[0] * student_h.shape[1]
    for start in range(0, student_h.shape[1], chunk):
        sl = slice(start, start + chunk)
        with torch.no_grad():
            teacher_logp = F.log_softmax(head(teacher_h[:, sl]).float(), dim=-1)
        total = total + checkpoint(_chunk_kl, head, student_h[:, sl], teacher_logp,
                                   use_reentrant=False)
    return total / n


def distill_step(model, method: GateMethod, input_ids: torch.Tensor, cfg: DistillConfig,
                 lam: float) -> tuple[torch.Tensor, dict]:
    """One forward: -> (loss, metrics with kl and the method's metrics)."""
    with torch.no_grad():
        teacher_h = _hidden(model, input_ids, cfg.teacher_attn, {})
    kwargs = method.step_kwargs(sample=True)
    student_h = _hidden(model, input_ids, method.attn_name, kwargs)
    kl = kl_loss(model, student_h, teacher_h, cfg.loss_chunk)
    penalty, metrics = method.regularizer(kwargs)
    return kl + lam * penalty, {"kl": kl.item(), **metrics}


def _save_checkpoint(path: Path, method, opt, state: DistillState) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"params": method.params.state_dict(), "opt": opt.state_dict(),
                "state": asdict(state), "rng": torch.get_rng_state()}, tmp)
    os.replace(tmp, path)


def _load_checkpoint(path: Path, method, opt) -> DistillState:
    if not path.exists():
        raise FileNotFoundError(f"--resume: no checkpoint at {path}")
    ckpt = torch.load(path, weights_only=False)
    method.params.load_state_dict(ckpt["params"])
    opt.load_state_dict(ckpt["opt"])
    torch.set_rng_state(ckpt["rng"])
    return DistillState(**ckpt["state"])


def distill(model: nn.Module, method: GateMethod, batches: Callable[[int], torch.Tensor],
            cfg: DistillConfig, checkpoint_path: Path, resume: bool = False,
            on_checkpoint: Callable[[DistillState], None] | None = None,
            progress: bool = True) -> DistillState:
    """Train `method.params` for cfg.steps steps in total (a resumed run continues).

    batches(step) -> input_ids [B, N] for that step (deterministic, so a resume sees the
    same data). Every cfg.checkpoint_every steps and at the end: checkpoint (params,
    AdamW, lam, step, wall time, RNG) to checkpoint_path, then on_checkpoint(state).
    """
    from tqdm import tqdm

    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    opt = torch.optim.AdamW(method.params.parameters(), lr=cfg.lr, betas=cfg.betas,
                            weight_decay=cfg.weight_decay)
    state = _load_checkpoint(checkpoint_path, method, opt) if resume else DistillState(lam=cfg.lam)
    bar = tqdm(total=cfg.steps, initial=state.step, disable=not progress, dynamic_ncols=True,
               mininterval=0)
    while state.step < cfg.steps:
        start = time.perf_counter()
        loss, metrics = distill_step(model, method, batches(state.step), cfg, state.lam)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad = torch.nn.utils.clip_grad_norm_(method.params.parameters(), cfg.grad_clip)
        opt.step()
        if cfg.target is not None:
            err = metrics[cfg.target_metric] - cfg.target
            state.lam = min(1e4, max(1e-6, state.lam * math.exp(cfg.lam_lr * err)))
        state.step += 1
        state.elapsed_s += time.perf_counter() - start
        state.metrics = {"step": state.step, "loss": loss.item(), "grad_norm": grad.item(),
                         "lam": state.lam, "step_s": time.perf_counter() - start, **metrics}
        state.history.append(state.metrics)
        if cfg.log_every and state.step % cfg.log_every == 0:
            bar.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                               for k, v in state.metrics.items()))
        bar.update(1)
        bar.set_postfix({"loss": f"{loss.item():.4f}", "kl": f"{metrics['kl']:.4f}",
                         cfg.target_metric: f"{metrics.get(cfg.target_metric, float('nan')):.3f}",
                         "lam": f"{state.lam:.3g}"}, refresh=False)
        if state.step % cfg.checkpoint_every == 0 or state.step == cfg.steps:
            _save_checkpoint(checkpoint_path, method, opt, state)
            if on_checkpoint is not None:
                on_checkpoint(state)
    bar.close()
    return state

