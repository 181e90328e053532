"""Experiment, kept so that its figures in BENCHMARKS.md reproduce: what the one-row int8 GEMV gained from building
each weight's float with one `prmt` (`_from_int8`, in gemv.py until its int8 GEMV went to integers) instead of a
sign extension and an integer add, at the old tile (2 rows x 4096 columns) and the new one (4 x 1024). A bare copy
of that one-row int8 kernel (no gate, bias or residual) with the conversion as a switch, checked against the
dequantized weights, then timed over Llama-2-7B's 160 layers in one CUDA graph against the copy bandwidth measured
in the same run.

    python scripts/int8_probe.py     # under a minute on an H200
"""
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import copy_bandwidth  # noqa: E402  (scripts/ is on the path: this file's folder)
from gemv_sweep import graph_time  # noqa: E402
from model import ModelArgs  # noqa: E402


@triton.jit
def _from_int8(w):
    # int8 -> the same integer as float32 without the slow conversion: the float 2**23 + 128 + w, minus that
    # constant. prmt builds that float from a byte in one instruction: the xor (one per 4 bytes) turns each byte
    # into w + 128, prmt places it under the exponent byte 0x4B (the probe runs on the GPU only: no fallback)
    f = tl.inline_asm_elementwise(
        "{ .reg .b32 t, m; xor.b32 t, $4, 0x80808080; mov.b32 m, 0x4B000000; "
        "prmt.b32 $0, t, m, 0x7540; prmt.b32 $1, t, m, 0x7541; "
        "prmt.b32 $2, t, m, 0x7542; prmt.b32 $3, t, m, 0x7543; }",
        "=r,=r,=r,=r,r", [w], dtype=tl.float32, is_pure=True, pack=4)
    return f - 8388736.0


@triton.jit
def _kernel(x_ptr, w_ptr, s_ptr, y_ptr, N, K: tl.constexpr, USE_PRMT: tl.constexpr, BLOCK_N: tl.constexpr,
            BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        in_k = (k + cols < K) if K % BLOCK_K else cols >= 0
        w = tl.load(w_ptr + rows[:, None] * K + (k + cols)[None, :], mask=(rows[:, None] < N) & in_k[None, :],
                    other=0, eviction_policy="evict_first")
        x = tl.load(x_ptr + k + cols, mask=in_k, other=0.0).to(tl.float32)
        if USE_PRMT:
            w = _from_int8(w)
        else:  # gemv.py's conversion before prmt
            w = (w.to(tl.int32) + 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0
        acc += w * x[None, :]
    y = tl.sum(acc, axis=1) * tl.load(s_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=rows < N)


def gemv8(x, w, s, prmt: bool, block_n: int, block_k: int, warps: int):
    N, K = w.shape
    y = x.new_empty(1, N)
    _kernel[(triton.cdiv(N, block_n),)](x, w, s, y, N, K=K, USE_PRMT=prmt, BLOCK_N=block_n, BLOCK_K=block_k,
                                        num_warps=warps)
    return y


def main():
    if not torch.cuda.is_available():
        sys.exit("error: needs a CUDA GPU (the prmt path is inline PTX)")
    c = ModelArgs.from_name("Llama-2-7B")
    d = c.dim
    shapes = [(3 * d, d), (d, d), (c.intermediate_size, d), (c.intermediate_size, d), (d, c.intermediate_size)] * 32
    torch.manual_seed(0)
    ws = [(torch.randint(-128, 128, (n, k), dtype=torch.int8, device="cuda"),
           torch.rand(n, device="cuda", dtype=torch.bfloat16)) for n, k in shapes]
    nbytes = sum(w.numel() + s.numel() * 2 for w, s in ws)
    xs = [torch.randn(1, k, device="cuda", dtype=torch.bfloat16) for _, k in shapes]
    copy = copy_bandwidth("cuda")
    print(f"copy {copy:.0f} GB/s")
    rows = []
    for prmt in (False, True):
        for tile in ((2, 4096, 4), (4, 1024, 4), (4, 512, 2), (8, 1024, 8)):
            for i in (0, 4):  # qkv (K = 4096) and w2 (K = 11008): against the dequantized weights
                (w, s), x = ws[i], xs[i]
                ref = (x.float() @ w.float().T) * s.float()
                err = ((gemv8(x, w, s, prmt, *tile).float() - ref).norm() / ref.norm()).item()
                assert err < 4e-3, f"prmt={prmt} tile={tile}: relative error {err:.1e}"
            gbs = nbytes / graph_time(lambda: [gemv8(x, w, s, prmt, *tile) for x, (w, s) in zip(xs, ws)]) / 1e9
            rows.append(f"| {'prmt' if prmt else 'add'} | {tile[0]} x {tile[1]}, {tile[2]} warps | {gbs:.0f} | "
                        f"{100 * gbs / copy:.1f}% |")
            print(rows[-1], flush=True)
    print(f"\ncopy {copy:.0f} GB/s, {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| conversion | tile | GB/s | % of copy |\n|---|---|---|---|\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
