"""Why model.linear sends float32 CPU matmuls to oneDNN: the ways torch can compute y = x W^T on the CPU, timed on
SmolLM2's output head (49152 x 576) and on 60 of its 1536 x 576 layers (more than the caches hold), at one row
(decode) and four (a verify). Kept so that BENCHMARKS.md's figures reproduce; MKL's environment switches
(MKL_ENABLE_INSTRUCTIONS, MKL_DEBUG_CPU_TYPE, MKL_NUM_THREADS, MKL_CBWR) can be tried by setting them before it.

    python scripts/cpu_linear_probe.py
"""
import argparse
import time

import torch
import torch.nn.functional as F


def ms(fn, reps: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps * 1e3


def onednn(x, w):
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


def ways(weights: list, rows: int) -> dict:
    """name -> (the weights as that way stores them, the matmul)."""
    return {
        "F.linear (MKL)": (weights, F.linear),
        "oneDNN": (weights, onednn),
        "oneDNN, packed weight": ([torch.ops.mkldnn._reorder_linear_weight(w, rows) for w in weights], onednn),
        "MKL, packed weight": ([(torch.ops.mkl._mkl_reorder_linear_weight(w, rows), w) for w in weights],
                               lambda x, p: torch.ops.mkl._mkl_linear(x, p[0], p[1], None, rows)),
        "x @ W^T stored (K, N)": ([w.t().contiguous() for w in weights], lambda x, wt: x @ wt),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=10, help="timed calls of each matmul (after one untimed)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    head, layers = torch.randn(49152, 576), [torch.randn(1536, 576) for _ in range(60)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for rows in (1, 4):
        x = torch.randn(rows, 576)
        for name, (stored, f) in ways([head] + layers, rows).items():
            t1 = ms(lambda: f(x, stored[0]), args.reps)
            t2 = ms(lambda: [f(x, w) for w in stored[1:]], args.reps)
            print(f"{rows} row(s)  {name:22s} head {t1:6.2f} ms {head.nbytes / t1 / 1e6:5.1f} GB/s | "
                  f"60 x 1536x576 {t2:6.2f} ms {sum(w.nbytes for w in layers) / t2 / 1e6:5.1f} GB/s")
    x = torch.randn(1, 576)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        print(f"{threads} thread(s): head F.linear {ms(lambda: F.linear(x, head), args.reps):.2f} ms, oneDNN "
              f"{ms(lambda: onednn(x, head), args.reps):.2f} ms, head.sum() {ms(lambda: head.sum(), args.reps):.2f} ms")


if __name__ == "__main__":
    main()
