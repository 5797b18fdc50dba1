# SPDX-License-Identifier: Apache-2.0
"""Flash-decoding plumbing shared by the decode kernels: how many splits, and the merge.

A decode kernel that splits each (row, head)'s work over NUM_SPLITS programs writes
partial outputs o_part [N, Hq, NUM_SPLITS, D] (each normalised by its own softmax sum)
and their log-sum-exps lse_part [N, Hq, NUM_SPLITS]; `merge_splits` combines them:
out = sum_s w_s o_s / sum_s w_s with w_s = exp(lse_s - max lse), and the total lse.
Empty splits carry lse = -inf and weigh nothing.
"""

import functools

import torch
import triton
import triton.language as tl


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def default_num_splits(query: torch.Tensor, num_programs: int, num_tiles: int,
                       min_tiles_per_split: int = 2) -> int:
    """About two waves of programs on the GPU, from shapes only (no host sync); 1 elsewhere.

    num_programs: programs before splitting (e.g. rows x KV heads); num_tiles: tiles of
    work of the longest program.
    """
    if not query.is_cuda:
        return 1
    device = query.device.index if query.device.index is not None else torch.cuda.current_device()
    target = 2 * _num_sms(device)
    return max(1, min(triton.cdiv(target, max(num_programs, 1)),
                      triton.cdiv(max(num_tiles, 1), min_tiles_per_split), 64))


@triton.jit
def _merge_splits_kernel(
    o_part_ptr,  # [N, Hq, NUM_SPLITS, D] fp32
    lse_part_ptr,  # [N, Hq, NUM_SPLITS] fp32
    out_ptr,  # [N, Hq, D]
    lse_ptr,  # [N, Hq] fp32
    stride_op_seq, stride_op_head, stride_op_split, stride_op_dim,
    stride_lp_seq, stride_lp_head, stride_lp_split,
    stride_out_seq, stride_out_head, stride_out_dim,
    stride_lse_seq, stride_lse_head,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,  # NUM_SPLITS padded to a power of two
    LOG2_UNITS: tl.constexpr,  # lse values are log2 (True) or natural log (False)
):
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < NUM_SPLITS
    d_mask = offs_d < HEAD_DIM

    lse_s = tl.load(lse_part_ptr + seq * stride_lp_seq + head * stride_lp_head + offs_s * stride_lp_split,
                    mask=s_mask, other=float("-inf"))
    m = tl.max(lse_s, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    if LOG2_UNITS:
        w = tl.exp2(lse_s - m_safe)  # 0 for empty splits
    else:
        w = tl.exp(lse_s - m_safe)
    total = tl.sum(w, 0)
    o_s = tl.load(o_part_ptr + seq * stride_op_seq + head * stride_op_head + offs_s[:, None] * stride_op_split
                  + offs_d[None, :] * stride_op_dim, mask=s_mask[:, None] & d_mask[None, :], other=0.0)
    total_safe = tl.where(total > 0.0, total, 1.0)
    o = tl.sum(w[:, None] * o_s, 0) / total_safe
    if LOG2_UNITS:
        lse = tl.where(total > 0.0, m_safe + tl.log2(total_safe), float("-inf"))
    else:
        lse = tl.where(total > 0.0, m_safe + tl.log(total_safe), float("-inf"))
    tl.store(out_ptr + seq * stride_out_seq + head * stride_out_head + offs_d * stride_out_dim,
             o.to(out_ptr.dtype.element_ty), mask=d_mask)
    tl.store(lse_ptr + seq * stride_lse_seq + head * stride_lse_head, lse)


def merge_splits(o_part: torch.Tensor, lse_part: torch.Tensor, out: torch.Tensor,
                 lse: torch.Tensor, log2_units: bool) -> None:
    """Combine partials o_part [N, Hq, S, D], lse_part [N, Hq, S] into out [N, Hq, D], lse [N, Hq]."""
    n, hq, num_splits, d = o_part.shape
    _merge_splits_kernel[(n, hq)](
        o_part, lse_part, out, lse,
        *o_part.stride(), *lse_part.stride(), *out.stride(), *lse.stride(),
        HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)), NUM_SPLITS=num_splits,
        BLOCK_S=triton.next_power_of_2(num_splits), LOG2_UNITS=log2_units, num_warps=4,
    )
