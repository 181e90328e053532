"""Sweep quantize.py's int8 / int4 GEMV tile configs (1 input row: decode; 6 rows: speculative verify) over
Llama-2-7B-shaped random weights, all 160 matmuls of a step replayed as one CUDA graph, against the device-to-device
copy bandwidth measured in the same run. Counts the bytes the quantized weights and their scales occupy.

    python scripts/gemv_sweep.py     # about 3 minutes on an H100; the best configs go into quantize.py by hand
"""
import itertools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import quantize as Q  # noqa: E402


def graph_time(fn, n=20):
    """Median seconds per replay of fn captured as one CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn(); fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay(); torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        e0.record()
        for _ in range(n):
            g.replay()
        e1.record(); torch.cuda.synchronize()
        times.append(e0.elapsed_time(e1) / n / 1000)
    return sorted(times)[2]


def copy_bandwidth(nbytes=2 * 2**30):
    """GB/s of a device-to-device copy (bytes read + written), float32 like bench.py (a uint8 copy runs slower)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    return 2 * nbytes / graph_time(lambda: dst.copy_(src), n=5) / 1e9


def main():
    d, g = 4096, 128
    shapes = [(12288, d), (d, d), (11008, d), (11008, d), (d, 11008)] * 32
    torch.manual_seed(0)
    w8 = [(torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda"),
           torch.rand(n, device="cuda", dtype=torch.bfloat16)) for n, k in shapes]
    w4 = [(torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda"),
           torch.rand(n, k // g, device="cuda", dtype=torch.bfloat16),
           torch.rand(n, k // g, device="cuda", dtype=torch.bfloat16)) for n, k in shapes]
    bytes8 = sum(w.numel() + s.numel() * 2 for w, s in w8)
    bytes4 = sum(w.numel() + 2 * s.numel() * 2 for w, s, _ in w4)
    copy = copy_bandwidth()
    x = torch.randn(8, 11008, device="cuda", dtype=torch.bfloat16)
    print(f"copy {copy:.0f} GB/s", flush=True)

    def run(kind, rows):
        xs = [x[:rows, :k].contiguous() for _, k in shapes]
        if kind == "int8":
            fn = lambda: [Q.int8_gemv(xi, w, s) for xi, (w, s) in zip(xs, w8)]  # noqa: E731
        else:
            fn = lambda: [Q.int4_gemv(xi, w, s, z, g) for xi, (w, s, z) in zip(xs, w4)]  # noqa: E731
        return (bytes8 if kind == "int8" else bytes4) / graph_time(fn) / 1e9

    grids = {("int8", 1): itertools.product([2, 4, 8], [2048, 4096], [4, 8]),
             ("int4", 1): itertools.product([2, 4, 8], [2048, 4096, 8192], [4, 8]),
             ("int8", 6): itertools.product([1, 2, 4, 8], [512, 1024, 2048, 4096], [4, 8]),
             ("int4", 6): itertools.product([1, 2, 4, 8], [512, 1024, 2048, 4096], [4, 8])}
    names = {("int8", 1): "INT8_CONFIG", ("int4", 1): "INT4_CONFIG", ("int8", 6): "INT8_ROWS_CONFIG",
             ("int4", 6): "INT4_ROWS_CONFIG"}
    table = []
    for (kind, rows), grid in grids.items():
        t0, res = time.time(), []
        default = dict(getattr(Q, names[kind, rows]))
        for bn, bk, warps in grid:
            if time.time() - t0 > 45:
                break
            setattr(Q, names[kind, rows], dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=warps))
            try:
                res.append(((bn, bk, warps), run(kind, rows)))
            except Exception as e:  # noqa: BLE001
                print(kind, rows, (bn, bk, warps), "failed", type(e).__name__, flush=True)
        setattr(Q, names[kind, rows], default)
        res.sort(key=lambda r: -r[1])
        for cfg, gbs in res[:4]:
            table.append(f"{kind} rows={rows} BN,BK,warps={str(cfg):18s} {gbs:7.0f} GB/s {100 * gbs / copy:5.1f}%")
        print(table[-4], flush=True)
    print("\n".join(table))


if __name__ == "__main__":
    main()
