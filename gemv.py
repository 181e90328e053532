"""A faster matmul for batch-1 decode on CUDA: y = W x as a Triton GEMV that streams W once, near copy speed.

At batch 1 every linear layer is a matrix-vector product bound by how fast the weights stream from memory.
Over Llama-2-7B-shaped weights cuBLAS streams at about 82% (H200) and 89% (H100) of the device-to-device copy
bandwidth; this kernel at 91% and 98% (scripts/gemv_sweep.py; BENCHMARKS.md has the runs). Speculative verification
multiplies a handful of rows (k+1) by the same weights: there cuBLAS's kernels took 10% (7B) to 65% (SmolLM2)
longer than one GEMV (scripts/profile_step.py), so 2..MAX_ROWS rows go through a second kernel that also reads
each weight tile once and multiplies it on the tensor cores. `use_gemv(model)` swaps every float nn.Linear for
`GemvLinear`, which takes these paths on CUDA and is F.linear otherwise (prefill, the CPU). Triton kernels called
inside torch.compile stay in its graph.
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
MAX_ROWS = 16  # the rows kernel pads to 16 (tl.dot's smallest tile): 2..16 rows cost the same
# best of `scripts/gemv_sweep.py --sweep bf16` on an H100: 32 weight rows a program over Llama-2-7B's layers
# (K >= 4096), 16 over SmolLM2-135M's (K <= 1536), where the grid needs more programs to keep the memory busy
ROWS_CONFIG = dict(BLOCK_N=32, BLOCK_K=128, num_warps=4, num_stages=6)
SMALL_ROWS_CONFIG = dict(BLOCK_N=16, BLOCK_K=128, num_warps=4, num_stages=6)  # K < 4096

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


    @triton.jit
    def _rows_kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, N, K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr):
        # y (M, N) = x (M, K) @ W (N, K).T for M <= 16: each program owns BLOCK_N rows of W and streams them once in
        # pipelined BLOCK_K chunks (num_stages); the x rows, padded to 16, ride along on the tensor cores
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        ms = tl.arange(0, 16)
        cols = tl.arange(0, BLOCK_K)
        acc = tl.zeros((16, BLOCK_N), dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            in_k = k + cols < K
            x = tl.load(x_ptr + ms[:, None] * K + (k + cols)[None, :], mask=(ms[:, None] < M) & in_k[None, :],
                        other=0.0)
            w = tl.load(w_ptr + rows[:, None] * K + (k + cols)[None, :], mask=(rows[:, None] < N) & in_k[None, :],
                        other=0.0, eviction_policy="evict_first")
            acc = tl.dot(x, tl.trans(w).to(x.dtype), acc)
        if HAS_BIAS:
            acc += tl.load(b_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + ms[:, None] * N + rows[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=(ms[:, None] < M) & (rows[None, :] < N))


def gemv(x, weight, bias=None):
    """x: (..., K) holding one row, weight (N, K) contiguous -> (..., N)."""
    N, K = weight.shape
    y = torch.empty(*x.shape[:-1], N, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(N, BLOCK_N),)
    _gemv_kernel[grid](weight, x, bias if bias is not None else weight, y, N, K, HAS_BIAS=bias is not None,
                       BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, num_warps=NUM_WARPS)
    return y


def gemm_rows(x, weight, bias=None):
    """x: (..., K) holding 2..MAX_ROWS rows of bfloat16 or float16, weight (N, K) contiguous -> (..., N)."""
    N, K = weight.shape
    x2 = x.reshape(-1, K).contiguous()
    y = torch.empty(x2.shape[0], N, dtype=x.dtype, device=x.device)
    cfg = ROWS_CONFIG if K >= 4096 else SMALL_ROWS_CONFIG
    _rows_kernel[(triton.cdiv(N, cfg["BLOCK_N"]),)](x2, weight, bias if bias is not None else weight, y, x2.shape[0],
                                                     N, K, HAS_BIAS=bias is not None, **cfg)
    return y.view(*x.shape[:-1], N)


class GemvLinear(nn.Linear):
    def forward(self, x):
        rows = x.numel() // x.shape[-1]
        if x.is_cuda and rows <= MAX_ROWS and self.weight.is_contiguous() and self.weight.dtype == x.dtype:
            if rows == 1:
                return gemv(x.contiguous(), self.weight, self.bias)
            if x.dtype != torch.float32:  # tl.dot would round float32 to tf32
                return gemm_rows(x, self.weight, self.bias)
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
