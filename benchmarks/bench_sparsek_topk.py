# SPDX-License-Identifier: Apache-2.0
"""Benchmark the SparseK operator (kernels/sparsek_topk.py) against its torch reference and torch.topk.

On CUDA: bf16 scores [rows, n] (rows = batch x heads, e.g. 8 KV heads x 4 sequences = 32), one
row per (sequence, head) over n candidate tokens, budget k. For each n and row count it times
  fwd      - sparsek (Triton): bisection + Newton refinement, writes p and tau,
  fwd+bwd  - the same plus the Triton backward (dz = 1_S (g - mean_S g)),
  ref      - sparsek_ref forward (sort-based exact tau in float64, pure torch),
  ref+bwd  - the reference forward and backward,
  topk     - torch.topk(k) values and indices (the hard selection SparseK replaces),
and the forward's effective bandwidth (z read once, p written once; the bisection re-reads rows
longer than one 4096-column tile from L2, so long rows read more than this counts).
Without CUDA it runs a tiny shape under the Triton interpreter only to show that the code
path works; those timings are meaningless.

    python benchmarks/bench_sparsek_topk.py [--contexts 4096 32768 131072] [--rows 32 256] [--budget 2048]
"""

import torch

import common  # noqa: I001 (first: sets TRITON_INTERPRET, sys.path)
from common import bench
from kernels.sparsek_topk import DEFAULT_ITERS, sparsek, sparsek_ref  # noqa: E402


def _fwd_bwd(fn, z, k, g):
    def run():
        zz = z.detach().requires_grad_()
        fn(zz, k).backward(g)
    return run


def main():
    parser = common.make_parser(__doc__)
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 32768, 131072], help="n per row")
    parser.add_argument("--rows", type=int, nargs="+", default=[32, 256], help="batch x heads")
    parser.add_argument("--budget", type=int, default=2048, help="k (capped at n / 2)")
    parser.add_argument("--iters", type=int, default=DEFAULT_ITERS, help="bisection steps")
    parser.add_argument("--no-ref", action="store_true", help="skip the torch reference")
    args = parser.parse_args()

    use_cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if use_cuda else ("cpu", torch.float16)
    if use_cuda:
        print(f"device: {torch.cuda.get_device_name()}  scores bf16, iters={args.iters}")
    else:  # fp16: the interpreter path the tests use
        args.contexts, args.rows, args.budget = [300], [4], 32
        common.cpu_notice()
    header = (f"{'n':>7} {'rows':>5} {'k':>5} {'fwd ms':>8} {'fwd+bwd':>8} {'ref ms':>8} {'ref+bwd':>8} "
              f"{'topk ms':>8} {'x ref':>6} {'GB/s':>7}")
    print(header)
    print("-" * len(header))
    for n in args.contexts:
        for rows in args.rows:
            k = min(args.budget, n // 2)
            z = torch.randn(rows, n, device=device).mul_(2).to(dtype)
            g = torch.randn_like(z)

            def tri(zz, kk):
                return sparsek(zz, kk, kernels="triton", iters=args.iters)

            fwd_ms = bench(lambda: tri(z, k), use_cuda)
            both_ms = bench(_fwd_bwd(tri, z, k, g), use_cuda)
            ref_ms = ref_both_ms = float("nan")
            if not args.no_ref:
                ref_ms = bench(lambda: sparsek_ref(z, k), use_cuda)
                ref_both_ms = bench(_fwd_bwd(sparsek_ref, z, k, g), use_cuda)
            topk_ms = bench(lambda: torch.topk(z, k, dim=-1), use_cuda)
            nbytes = 2 * z.numel() * z.element_size()
            print(f"{n:>7} {rows:>5} {k:>5} {fwd_ms:>8.4f} {both_ms:>8.4f} {ref_ms:>8.3f} {ref_both_ms:>8.3f} "
                  f"{topk_ms:>8.4f} {ref_ms / fwd_ms:>6.1f} {nbytes / fwd_ms / 1e6:>7.1f}")
            if use_cuda:
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
