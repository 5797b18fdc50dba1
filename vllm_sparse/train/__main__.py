# SPDX-License-Identifier: Apache-2.0
"""`python -m vllm_sparse.train {nats,nats-kept,sparsek,sparsek-fit,sparsek-eval} ...` (see `--help` of each command)."""

import argparse
import importlib
import sys

# command -> (module, add_arguments function, run function, help)
COMMANDS = {
    "nats": ("vllm_sparse.train.nats_cli", "add_train_arguments", "train",
             "learn NAtS gates by self-distillation"),
    "nats-kept": ("vllm_sparse.train.nats_cli", "add_kept_arguments", "kept",
                  "measure the KV fraction NAtS gates keep at a context length"),
    "sparsek": ("vllm_sparse.train.sparsek_cli", "add_train_arguments", "train",
                "learn a SparseK scorer by self-distillation"),
    "sparsek-fit": ("vllm_sparse.train.sparsek_cli", "add_fit_arguments", "fit",
                    "fit a SparseK scorer to the dense model's attention maps (closed form)"),
    "sparsek-eval": ("vllm_sparse.train.sparsek_cli", "add_eval_arguments", "evaluate",
                     "measure KL(dense || SparseK) of a scorer at a context length"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m vllm_sparse.train", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True,
                                metavar="{" + ",".join(COMMANDS) + "}")
    for name, (module, add, _, help_) in COMMANDS.items():
        getattr(importlib.import_module(module), add)(sub.add_parser(name, help=help_))
    return parser


def main(argv: list[str] | None = None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    module, _, run, _ = COMMANDS[args.command]
    return getattr(importlib.import_module(module), run)(args, argv)


if __name__ == "__main__":
    main()
