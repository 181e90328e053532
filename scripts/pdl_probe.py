"""Experiment record (session 22): programmatic dependent launch (PDL) and L2 prefetch for the chain of one-row
GEMVs in a Llama-2-7B decode step. Its winner, pdl+w0, is gemv.py's `_gemv_kernel` now.

    python scripts/pdl_probe.py          # CUDA, Hopper or newer; about 30 s

32 layers x (wqkv + norm, wo + residual, the w1/w3 pair + norm, w2 + residual) + the output head, each kernel reading
the one before's output, captured as one CUDA graph; no attention. Variants of a copy of the kernel:
  base     the one-row GEMV as gemv.py had it before PDL (session 21)
  pdl      launched with PDL; launch_dependents + wait at program start
  pdl+pf   the same, and each program prefetches its weight rows into L2 before the wait
  pf       the L2 prefetch alone, no PDL
  pdl+w0   PDL, the first weight chunk loaded into registers before the wait
"""
import statistics
import sys
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import gemv as G  # noqa: E402


@triton.jit
def _prefetch_l2(ptrs):
    # one prefetch.global.L2 per element: a 128-byte line into L2, nothing into registers
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def _kernel(w_ptr, x_ptr, y_ptr, g_ptr, res_ptr, N, K: tl.constexpr, HAS_RMS: tl.constexpr, EPS: tl.constexpr,
            HAS_GATE: tl.constexpr, HAS_RES: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
            PDL: tl.constexpr, PF: tl.constexpr, W0: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_K)
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    if PF:
        LINE: tl.constexpr = 64  # bf16 weights a 128-byte line
        lines = tl.arange(0, 64)
        safe = tl.minimum(rows, N - 1)
        for c in tl.static_range(0, K, LINE * 64):
            o = tl.minimum(c + lines * LINE, K - 1)
            _prefetch_l2(w_ptr + safe[:, None] * K + o[None, :])
            if HAS_GATE:
                _prefetch_l2(g_ptr + safe[:, None] * K + o[None, :])
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc_g = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    ss = tl.zeros((BLOCK_K,), dtype=tl.float32)
    if W0:
        offs0, ok0 = rows[:, None] * K + cols[None, :], (rows[:, None] < N) & (cols < K)[None, :]
        w0 = tl.load(w_ptr + offs0, mask=ok0, other=0.0, eviction_policy="evict_first")
        if HAS_GATE:
            g0 = tl.load(g_ptr + offs0, mask=ok0, other=0.0, eviction_policy="evict_first")
    if PDL:
        tl.extra.cuda.gdc_wait()
    if W0:
        x = tl.load(x_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
        acc += w0.to(tl.float32) * x[None, :]
        if HAS_GATE:
            acc_g += g0.to(tl.float32) * x[None, :]
        if HAS_RMS:
            ss += x * x
    for k in tl.range(BLOCK_K if W0 else 0, K, BLOCK_K):
        in_k = k + cols < K
        offs, ok = rows[:, None] * K + (k + cols)[None, :], (rows[:, None] < N) & in_k[None, :]
        w = tl.load(w_ptr + offs, mask=ok, other=0.0, eviction_policy="evict_first")
        x = tl.load(x_ptr + k + cols, mask=in_k, other=0.0).to(tl.float32)
        acc += w.to(tl.float32) * x[None, :]
        if HAS_GATE:
            g = tl.load(g_ptr + offs, mask=ok, other=0.0, eviction_policy="evict_first")
            acc_g += g.to(tl.float32) * x[None, :]
        if HAS_RMS:
            ss += x * x
    y, gate = tl.sum(acc, axis=1), tl.sum(acc_g, axis=1)
    if HAS_RMS:
        r = tl.rsqrt(tl.sum(ss, axis=0) / K + EPS)
        y, gate = y * r, gate * r
    if HAS_GATE:
        y *= gate / (1.0 + tl.exp(-gate))
    if HAS_RES:
        y += tl.load(res_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=rows < N)


def run(w, x, gate=None, res=None, rms=False, variant="base"):
    N, K = w.shape
    y = torch.empty(N, dtype=x.dtype, device=x.device)
    flags = dict(base=(0, 0, 0), pdl=(1, 0, 0), **{"pdl+pf": (1, 1, 0), "pf": (0, 1, 0), "pdl+w0": (1, 0, 1)})
    pdl, pf, w0 = flags[variant]
    bn = G.GEMV_CONFIG["BLOCK_N"]
    _kernel[(triton.cdiv(N, bn),)](w, x, y, gate if gate is not None else w, res if res is not None else x, N, K=K,
                                   HAS_RMS=rms, EPS=1e-5, HAS_GATE=gate is not None, HAS_RES=res is not None,
                                   BLOCK_N=bn, BLOCK_K=G.GEMV_CONFIG["BLOCK_K"], num_warps=G.GEMV_CONFIG["num_warps"],
                                   PDL=bool(pdl), PF=bool(pf), W0=bool(w0), launch_pdl=bool(pdl))
    return y


def main():
    if not torch.cuda.is_available():
        sys.exit("pdl_probe.py needs a CUDA GPU (Hopper: programmatic dependent launch)")
    dev = "cuda"
    D, F, L, V = 4096, 11008, int(sys.argv[1]) if len(sys.argv) > 1 else 32, 32000
    torch.manual_seed(0)
    layers = [dict(qkv=torch.randn(3 * D, D, device=dev, dtype=torch.bfloat16) * 0.02,
                   wo=torch.randn(D, D, device=dev, dtype=torch.bfloat16) * 0.02,
                   w1=torch.randn(F, D, device=dev, dtype=torch.bfloat16) * 0.02,
                   w3=torch.randn(F, D, device=dev, dtype=torch.bfloat16) * 0.02,
                   w2=torch.randn(D, F, device=dev, dtype=torch.bfloat16) * 0.02) for _ in range(L)]
    out = torch.randn(V, D, device=dev, dtype=torch.bfloat16) * 0.02
    nbytes = sum(t.numel() * 2 for l in layers for t in l.values()) + out.numel() * 2
    h0 = torch.randn(D, device=dev, dtype=torch.bfloat16)

    def step(variant):
        h = h0
        for l in layers:
            q = run(l["qkv"], h, rms=True, variant=variant)
            h = run(l["wo"], q[:D], res=h, variant=variant)
            f = run(l["w3"], h, gate=l["w1"], rms=True, variant=variant)
            h = run(l["w2"], f, res=h, variant=variant)
        return run(out, h, rms=True, variant=variant)

    src, dst = torch.randn(2**29 // 4 * 4, device=dev), torch.empty(2**29 // 4 * 4, device=dev)
    ts = []
    for i in range(13):
        torch.cuda.synchronize(); t = time.perf_counter(); dst.copy_(src); torch.cuda.synchronize()
        if i >= 3:
            ts.append(time.perf_counter() - t)
    copy = 2 * src.numel() * 4 / statistics.median(ts) / 1e9
    del src, dst
    ref = step("base").float()
    rows = []
    for variant in ["base", "pdl", "pdl+pf", "pf", "pdl+w0", "base"]:
        y = step(variant)
        torch.cuda.synchronize()
        err = (y.float() - ref).abs().max().item()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            step(variant)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            yg = step(variant)
        g.replay(); torch.cuda.synchronize()
        err = max(err, (yg.float() - ref).abs().max().item())
        runs = []
        for _ in range(5):
            torch.cuda.synchronize(); t = time.perf_counter()
            for _ in range(20):
                g.replay()
            torch.cuda.synchronize(); runs.append((time.perf_counter() - t) / 20)
        t = statistics.median(runs)
        rows.append((variant, t * 1e6, nbytes / t / 1e9, nbytes / t / 1e9 / copy * 100, err))
        print(rows[-1], flush=True)
    print(f"layers {L}, {nbytes / 1e9:.2f} GB of weights, {4 * L + 1} kernels; copy {copy:.0f} GB/s; "
          f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    print(f"{'variant':<8} {'us/step':>9} {'GB/s':>7} {'% copy':>7} {'max err':>8}")
    for r in rows:
        print(f"{r[0]:<8} {r[1]:9.1f} {r[2]:7.0f} {r[3]:7.1f} {r[4]:8.1e}")


if __name__ == "__main__":
    main()
