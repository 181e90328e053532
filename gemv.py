"""A faster matmul for batch-1 decode on CUDA: y = W x as a Triton GEMV that streams W once, near copy speed.

At batch 1 every linear layer is a matrix-vector product bound by how fast the weights stream from memory.
cuBLAS reaches about 82% of the device-to-device copy bandwidth over Llama-2-7B-shaped weights on an H200; this
kernel reaches about 91% (scripts/bench.py and BENCHMARKS.md have the measurements). `use_gemv(model)` swaps every
float nn.Linear for `GemvLinear`, which takes this path only for a single row on CUDA and is F.linear otherwise, so
prefill, verification and the CPU are untouched. Triton kernels called inside torch.compile stay in its graph.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: GemvLinear then always uses F.linear
    triton = None

BLOCK_N, BLOCK_K, NUM_WARPS = 2, 1024, 4  # tuned on an H200 over Llama-2-7B shapes (.dev notes in BENCHMARKS.md)

if triton is not None:
    @triton.jit
    def _gemv_kernel(w_ptr, x_ptr, b_ptr, y_ptr, N, K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr):
        # each program owns BLOCK_N rows of W (N, K) and walks K in wide, coalesced chunks; fp32 accumulation.
        # K is a compile-time constant: one specialization per layer width, with a static loop
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            in_k = k + cols < K
            w = tl.load(w_ptr + rows[:, None] * K + (k + cols)[None, :], mask=(rows[:, None] < N) & in_k[None, :],
                        other=0.0, eviction_policy="evict_first")  # weights are read once: keep them out of L2
            x = tl.load(x_ptr + k + cols, mask=in_k, other=0.0)
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        y = tl.sum(acc, axis=1)
        if HAS_BIAS:
            y += tl.load(b_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)
        tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=rows < N)


def gemv(x, weight, bias=None):
    """x: (..., K) holding one row, weight (N, K) contiguous -> (..., N)."""
    N, K = weight.shape
    y = torch.empty(*x.shape[:-1], N, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(N, BLOCK_N),)
    _gemv_kernel[grid](weight, x, bias if bias is not None else weight, y, N, K, HAS_BIAS=bias is not None,
                       BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, num_warps=NUM_WARPS)
    return y


class GemvLinear(nn.Linear):
    def forward(self, x):
        if x.is_cuda and x.numel() == x.shape[-1] and self.weight.is_contiguous() and self.weight.dtype == x.dtype:
            return gemv(x.contiguous(), self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


def use_gemv(model: nn.Module) -> nn.Module:
    """Swap float nn.Linear modules for GemvLinear, sharing their parameters (tied weights stay tied)."""
    if triton is None:
        return model
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                new = GemvLinear(child.in_features, child.out_features, bias=child.bias is not None, device="meta")
                new.weight, new.bias = child.weight, child.bias
                setattr(parent, name, new)
    return model
