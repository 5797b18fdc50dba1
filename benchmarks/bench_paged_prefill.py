# SPDX-License-Identifier: Apache-2.0
"""Benchmark the causal paged prefill kernel against torch SDPA.

On CUDA: Llama-3.1-8B attention (Hq 32, Hkv 8, D 128, bf16, cache block 16). For each
prompt length and batch (every row a fresh prompt: query length == context length) it times
  triton - paged_prefill reading K/V through a shuffled block table,
  sdpa   - torch SDPA (flash backend, causal) on contiguous K/V of the same shape, with the
           KV heads repeated to Hq beforehand (not timed),
and prints times, achieved TFLOP/s (causal: 2 * 2 * L^2 / 2 * Hq * D per row), the ratio
sdpa / triton (> 1: triton is faster) and the max abs difference of the two outputs. Without
CUDA it runs a tiny fp16 shape under the Triton interpreter only to show that the code path
works; those timings are meaningless.

    python benchmarks/bench_paged_prefill.py [--lengths 2048 8192 32768] [--batch 1]
"""

import torch

import common  # noqa: I001 (first: sets TRITON_INTERPRET, sys.path)
from common import bench
from kernels.paged_prefill import paged_prefill  # noqa: E402


def make_case(batch, length, hq, hkv, d, page, dtype, device):
    """Query [B*L, Hq, D], a paged cache with shuffled blocks, its block table, query_start_loc, seq_lens."""
    kv_cache, block_table = common.paged_cache(batch, length, hkv, d, page, dtype, device)
    query = torch.randn(batch * length, hq, d, dtype=dtype, device=device)
    qsl = torch.arange(0, batch + 1, dtype=torch.int32, device=device) * length
    seq_lens = torch.full((batch,), length, dtype=torch.int32, device=device)
    return query, kv_cache, block_table, qsl, seq_lens


def contiguous_kv(kv_cache, block_table, length, d, group):
    """The paged K/V as contiguous [B, Hq, L, D] tensors (KV heads repeated for the group)."""
    kv = kv_cache[block_table.long()]  # [B, pages, Hkv, page, 2D]
    kv = kv.permute(0, 2, 1, 3, 4).flatten(2, 3)[:, :, :length]  # [B, Hkv, L, 2D]
    kv = kv.repeat_interleave(group, dim=1)
    return kv[..., :d].contiguous(), kv[..., d:].contiguous()


def main():
    parser = common.make_parser(__doc__)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 32768])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--block-m", type=int, default=None, help="default: launcher heuristic")
    parser.add_argument("--block-n", type=int, default=None, help="default: launcher heuristic")
    args = parser.parse_args()

    hq, hkv, d, page = common.LLAMA_8B
    use_cuda, device, dtype = common.pick_device(hq, hkv, d, page)
    if not use_cuda:  # tiny fp16 shape: bf16 tl.dot is wrong in the interpreter
        hq, hkv, d, args.lengths, args.batch = 4, 2, 64, [96], 1
        common.cpu_notice()
    group, scale = hq // hkv, d ** -0.5
    tiles = dict(block_m=args.block_m, block_n=args.block_n)

    header = f"{'length':>7} {'batch':>5} {'triton ms':>10} {'sdpa ms':>9} {'triton TF/s':>11} {'sdpa TF/s':>9} " \
             f"{'x sdpa':>7} {'max diff':>9}"
    print(header)
    print("-" * len(header))
    for length in args.lengths:
        case = make_case(args.batch, length, hq, hkv, d, page, dtype, device)
        query, kv_cache, block_table = case[:3]
        out = paged_prefill(*case, scale, **tiles)
        triton_ms = bench(lambda: paged_prefill(*case, scale, out=out, **tiles), use_cuda)

        q = query.view(args.batch, length, hq, d).transpose(1, 2)  # [B, Hq, L, D]
        k, v = contiguous_kv(kv_cache, block_table, length, d, group)
        sdpa = common.sdpa_fn(q, k, v, use_cuda, is_causal=True, scale=scale)
        ref = sdpa()
        sdpa_ms = bench(sdpa, use_cuda)
        diff = (out.view(args.batch, length, hq, d).transpose(1, 2).float() - ref.float()).abs().max().item()
        flops = args.batch * 2 * length * length * hq * d  # 2 matmuls x 2 flops x L^2 / 2 (causal)
        print(f"{length:>7} {args.batch:>5} {triton_ms:>10.3f} {sdpa_ms:>9.3f} {flops / triton_ms / 1e9:>11.1f} "
              f"{flops / sdpa_ms / 1e9:>9.1f} {sdpa_ms / triton_ms:>7.2f} {diff:>9.2e}")
        del case, query, kv_cache, block_table, out, q, k, v, ref
        if use_cuda:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
