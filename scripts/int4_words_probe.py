"""An experiment kept so that its figures in BENCHMARKS.md reproduce (not used by the model): a one-row int4 GEMV
on int32 words instead of gemv.py's bytes. Nibble i of word t in a group holds column i*g/8 + t, so each nibble
position reads a contiguous slice of x; a nibble becomes f = 1 + q/16 with one shift and one OR into the mantissa of
1.0, one FMA with x, and the group's scale and zero are applied once per word: 16 s P + (z - 24 s) X, where
P = sum x f and X = sum x over the word's eight columns. Checks itself against the dequantized weights, then times
it over a model's layers (one CUDA graph, as scripts/gemv_sweep.py) against gemv.py's int4 GEMV and tinygemm.

    python scripts/int4_words_probe.py [MODEL]          # on CUDA: about 90 s
    TRITON_INTERPRET=1 python scripts/int4_words_probe.py   # on the CPU: the check alone, under Triton's interpreter

Result (H200, session 17): 1374 GB/s at best against 1166 for gemv.py's kernel and 1612 for tinygemm: not adopted.
PRE=True (scale and zero pre-combined in float32) is a variant that did not help either.
"""
import itertools
import os
import sys
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import gemv as G  # noqa: E402
import quantize as Q  # noqa: E402


@triton.jit
def int4w_kernel(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, N, K: tl.constexpr, K_IN: tl.constexpr, GS: tl.constexpr,
                 PRE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):
    T: tl.constexpr = GS // 8
    KW: tl.constexpr = K // 8
    NG: tl.constexpr = K // GS
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    wi = tl.arange(0, BLOCK_W)
    acc = tl.zeros((BLOCK_N, BLOCK_W), dtype=tl.float32)
    for c in range(0, KW, BLOCK_W):
        word = c + wi
        ok = (word < KW) if KW % BLOCK_W else word >= 0
        grp = word // T
        col0 = grp * GS + word % T
        wd = tl.load(w_ptr + rows[:, None] * KW + word[None, :], mask=(rows[:, None] < N) & ok[None, :], other=0,
                     eviction_policy="evict_first")
        p = tl.zeros((BLOCK_N, BLOCK_W), dtype=tl.float32)
        xs = tl.zeros((BLOCK_W,), dtype=tl.float32)
        for i in tl.static_range(8):
            col = col0 + i * T
            xi = tl.load(x_ptr + col, mask=ok & (col < K_IN), other=0.0).to(tl.float32)
            f = ((((wd >> (4 * i)) & 15) << 19) | 0x3F800000).to(tl.float32, bitcast=True)  # 1 + q/16
            p += f * xi[None, :]
            xs += xi
        m = (rows[:, None] < N) & ok[None, :]
        s = tl.load(s_ptr + rows[:, None] * NG + grp[None, :], mask=m, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + rows[:, None] * NG + grp[None, :], mask=m, other=0.0).to(tl.float32)
        if PRE:
            acc += s * p + z * xs[None, :]
        else:
            acc += (16.0 * s) * p + (z - 24.0 * s) * xs[None, :]
    y = tl.sum(acc, axis=1)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=rows < N)


def pack_words(q, gs):
    """(N, K) 0..15 -> (N, K/8) int32: word t of a group holds column i*gs/8 + t in nibble i."""
    N, K = q.shape
    q = q.to(torch.int64).view(N, K // gs, 8, gs // 8)
    w = sum(q[:, :, i] << (4 * i) for i in range(8))  # (N, groups, T)
    w = torch.where(w >= 2**31, w - 2**32, w)
    return w.reshape(N, K // 8).to(torch.int32)


CFG = dict(BLOCK_N=4, BLOCK_W=512, num_warps=4)  # the best of the sweep on an H200


def int4w(x, words, s, z, gs, pre=False, cfg=None):
    cfg = cfg or CFG
    (M, K_in), N, K = x.shape, words.shape[0], words.shape[1] * 8
    y = x.new_empty(M, N)
    int4w_kernel[(triton.cdiv(N, cfg["BLOCK_N"]),)](x, words, s, z, y, N, K=K, K_IN=K_in, GS=gs, PRE=pre, **cfg)
    return y


def check(device, dtype) -> float:
    """Worst max-abs error over max-abs against the dequantized weights in float64, both variants, ragged shapes."""
    worst = 0.0
    for N, K_in, g in [(64, 256, 128), (40, 96, 32), (24, 512, 256), (16, 4160, 64), (8, 200, 64), (33, 4096, 128)]:
        K = -(-K_in // g) * g
        w = torch.nn.functional.pad(torch.randn(N, K_in), (0, K - K_in))
        s, z = Q.int4_qparams(w, g)
        q = Q.quantize_int4(w, s, z, g)
        x = torch.randn(1, K_in).to(dtype)
        sd, zd = s.to(dtype), z.to(dtype)
        ref = x.double() @ Q.dequantize_int4(q, sd.float(), zd.float(), g)[:, :K_in].double().T
        for pre in (False, True):
            ss, zz = (16 * sd.float(), zd.float() - 24 * sd.float()) if pre else (sd, zd)
            y = int4w(x.to(device), pack_words(q, g).to(device), ss.to(device), zz.to(device), g, pre)
            e = ((y.double().cpu() - ref).abs().max() / ref.abs().max()).item()
            worst = max(worst, e)
    return worst


def main():
    if not torch.cuda.is_available():
        if os.environ.get("TRITON_INTERPRET") != "1":
            sys.exit("error: no CUDA GPU; run the check alone on the CPU with TRITON_INTERPRET=1")
        print("check (interpreter): worst relative error float32", check("cpu", torch.float32),
              "bfloat16", check("cpu", torch.bfloat16))
        return
    from bench import copy_bandwidth
    from gemv_sweep import graph_time, layer_shapes, random_int4
    print("check: worst relative error bfloat16", check("cuda", torch.bfloat16), "float32", check("cuda", torch.float32))
    g = 128
    shapes = layer_shapes(sys.argv[1] if len(sys.argv) > 1 else "Llama-2-7B")
    torch.manual_seed(0)
    w4 = random_int4(shapes, g)
    words = [pack_words(Q.unpack_int4(w, g), g) for w, _, _ in w4]
    pre = [(16 * s.float(), z.float() - 24 * s.float()) for _, s, z in w4]  # float32: more bytes than counted
    tiny = [(torch.ops.aten._convert_weight_to_int4pack(w, Q.cuda_inner_k_tiles(k)),
             torch.stack([s, z], -1).transpose(0, 1).contiguous()) for (w, s, z), (_, k) in zip(w4, shapes)]
    bytes4 = sum(w.numel() + 2 * s.numel() * 2 for w, s, _ in w4)
    copy = copy_bandwidth("cuda")
    print(f"copy {copy:.0f} GB/s")
    x = torch.randn(1, max(k for _, k in shapes), device="cuda", dtype=torch.bfloat16)
    xs = [x[:, :k].contiguous() for _, k in shapes]
    runs = {"int4 gemv.py": lambda: [G.int4_gemv(xi, w, s, z, g) for xi, (w, s, z) in zip(xs, w4)],
            "int4 tinygemm": lambda: [torch.ops.aten._weight_int4pack_mm(xi, w, g, sz) for xi, (w, sz) in zip(xs, tiny)]}
    for bn, bw, nw, p in itertools.product([1, 2, 4, 8], [64, 128, 256, 512, 1024, 2048], [4, 8], [False, True]):
        cfg = dict(BLOCK_N=bn, BLOCK_W=bw, num_warps=nw)
        meta = pre if p else [(s, z) for _, s, z in w4]
        runs[f"words{' PRE' if p else ''} {bn} {bw} {nw}"] = (
            lambda cfg=cfg, meta=meta, p=p: [int4w(xi, w, s, z, g, p, cfg) for xi, w, (s, z) in zip(xs, words, meta)])
    results, t0 = [], time.time()
    for name, fn in runs.items():
        if time.time() - t0 > 240:
            break
        gbs = bytes4 / graph_time(fn) / 1e9
        results.append((gbs, name))
        print(f"{name:32s} {gbs:7.0f} GB/s {100 * gbs / copy:5.1f}%", flush=True)
    print("best (words: BLOCK_N, BLOCK_W, warps)")
    for gbs, name in sorted(results, reverse=True)[:6]:
        print(f"{name:32s} {gbs:7.0f} GB/s {100 * gbs / copy:5.1f}%")


if __name__ == "__main__":
    main()
