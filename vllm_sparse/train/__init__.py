# SPDX-License-Identifier: Apache-2.0
"""Gate training for learned sparse attention: `python -m vllm_sparse.train <command>`.

- `distill`: method-agnostic self-distillation loop (frozen model, dense teacher, student
  through a transformers attention function, KL + lam * penalty, AdamW on the gates only);
- `nats`: the NAtS attention function and `NatsMethod`; `nats_cli`: its commands
  (`nats` trains, `nats-kept` measures the kept KV fraction);
- `data`: training text (Debian's python3.11-doc, decontaminated against the benchmarks).

A new method adds `<method>.py` (attention function + a `distill.GateMethod`) and a
`<method>_cli.py` with `add_arguments(parser)` / `run(args, argv)` pairs, then one entry
in `__main__.COMMANDS`.
"""
