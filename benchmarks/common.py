# SPDX-License-Identifier: Apache-2.0
"""Shared set-up for the kernel benchmarks (benchmarks/bench_*.py).

Import this module before any `kernels.*` module: without CUDA it sets TRITON_INTERPRET (Triton
reads it when a kernel module is imported), and it puts the repository root on sys.path.
"""

import argparse
import os
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the kernel import

import triton  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Llama-3.1-8B attention: query heads, KV heads, head size, cache block size.
LLAMA_8B = (32, 8, 128, 16)


def make_parser(doc):
    """An argument parser that prints the benchmark's module docstring as its help."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def pick_device(hq, hkv, d, page):
    """(use_cuda, device, dtype): bf16 on CUDA (and prints the device), else fp16 on the CPU.

    The CPU case uses fp16 because bf16 tl.dot is wrong in the interpreter; each benchmark
    shrinks its own shape for it and then calls cpu_notice()."""
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        print(f"device: {torch.cuda.get_device_name()}  Llama-3.1-8B: Hq={hq} Hkv={hkv} D={d} page={page} bf16")
        return use_cuda, "cuda", torch.bfloat16
    return use_cuda, "cpu", torch.float16


def cpu_notice():
    print("NOTE: no CUDA GPU -- running a tiny shape under TRITON_INTERPRET; timings are meaningless.")


def bench(fn, use_cuda):
    """Milliseconds per call: triton's do_bench on CUDA, one timed call otherwise."""
    if use_cuda:
        return triton.testing.do_bench(fn, warmup=25, rep=100)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def paged_cache(batch, context, hkv, d, page, dtype, device):
    """(kv_cache [B * pages, Hkv, page, 2D], shuffled block table [B, pages] int32) for `context` tokens a row."""
    pages = triton.cdiv(context, page)
    kv_cache = torch.randn(batch * pages, hkv, page, 2 * d, dtype=dtype, device=device)
    block_table = torch.randperm(batch * pages, device=device).view(batch, pages).to(torch.int32)
    return kv_cache, block_table


def make_decode_case(batch, context, hq, hkv, d, page, dtype, device):
    """Random paged cache (shuffled blocks), query and block table; every sequence has `context` tokens."""
    kv_cache, block_table = paged_cache(batch, context, hkv, d, page, dtype, device)
    query = torch.randn(batch, hq, d, dtype=dtype, device=device)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    return query, kv_cache, block_table, seq_lens


def all_pages(batch, hkv, n_pages, device):
    """[B, Hkv, n_pages] int32 selection of every page (dense paged decode)."""
    return torch.arange(n_pages, dtype=torch.int32, device=device).expand(batch, hkv, n_pages).contiguous()


def sdpa_fn(q, k, v, use_cuda, **kwargs):
    """A closure running torch SDPA on (q, k, v): the flash backend on CUDA, the default on the CPU."""
    if use_cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def sdpa():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, **kwargs)
    else:
        def sdpa():
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, **kwargs)
    return sdpa


def decode_sdpa(query, hkv, context, use_cuda):
    """(sdpa closure, k, v): torch SDPA for the decode query [B, Hq, D] on random contiguous K/V [B, Hkv, T, D].

    Each KV head's query group acts as its query length (exact for decode, no causal mask), so the
    flash backend needs no GQA support."""
    batch, hq, d = query.shape
    k = torch.randn(batch, hkv, context, d, dtype=query.dtype, device=query.device)
    v = torch.randn_like(k)
    q = query.view(batch, hkv, hq // hkv, d)
    return sdpa_fn(q, k, v, use_cuda), k, v
