"""Where the time of one decode step and of one k+1-token verify step goes, kernel by kernel.

    python scripts/profile_step.py --model Llama-2-7B --verify_k 5
    python scripts/profile_step.py --model SmolLM2-135M --quant int4 --groupsize 64

Both steps are compiled without CUDA graphs (so the profiler sees each kernel) and profiled over many calls; the
table lists each kernel's GPU time and launches per call for the two steps side by side, largest difference first
(a small kernel launched once a layer shows up as x32 on a 32-layer model). The wall
time of the same steps as CUDA graphs (what generation runs) is printed too, so the part of the difference that
is GPU work can be told from launch overhead.
"""
import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import random_model, time_steps, verify_cost  # noqa: E402


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def kernel_times(fn, calls: int):
    """Per kernel name, GPU microseconds and launches per call of fn, over `calls` calls."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    log("profiling")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    log("profiled")
    out = defaultdict(lambda: [0.0, 0.0])
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t > 0 and e.device_type == torch.autograd.DeviceType.CUDA:
            out[e.key][0] += t / calls
            out[e.key][1] += e.count / calls
    return dict(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="Llama-2-7B", help="a preset name (random weights of its shape)")
    p.add_argument("--quant", default="none", choices=["none", "int8", "int4"])
    p.add_argument("--groupsize", type=int, default=128)
    p.add_argument("--verify_k", type=int, default=5)
    p.add_argument("--prompt_len", type=int, default=100, help="cache positions already filled")
    p.add_argument("--top", type=int, default=15, help="kernels shown")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("profile_step.py needs a CUDA GPU")
    torch.manual_seed(0)
    model = random_model(args.model, "cuda", torch.bfloat16, args.quant, args.groupsize)

    model.setup_caches(1, args.prompt_len + 64)
    step = torch.compile(lambda m, x, pos: m(x, pos), fullgraph=True)
    step_k = torch.compile(lambda m, x, pos: m(x, pos), fullgraph=True)
    n, L = args.verify_k + 1, args.prompt_len
    x1, xk = torch.zeros(1, 1, dtype=torch.long, device="cuda"), torch.zeros(1, n, dtype=torch.long, device="cuda")
    p1, pk = torch.tensor([L], device="cuda"), torch.arange(L, L + n, device="cuda")
    with torch.no_grad():
        one = kernel_times(lambda: step(model, x1, p1), 20)
        many = kernel_times(lambda: step_k(model, xk, pk), 20)
        one_eager = time_steps(lambda: step(model, x1, p1), "cuda")
        many_eager = time_steps(lambda: step_k(model, xk, pk), "cuda")
    # CUDA graphs only after profiling: the profiler can hang on graphs made before its first use (pytorch#75504)
    one_graph, many_graph = verify_cost(model, "cuda", args.verify_k, True, args.prompt_len)

    none = (0.0, 0.0)
    names = sorted(set(one) | set(many), key=lambda k: -abs(many.get(k, none)[0] - one.get(k, none)[0]))
    print(f"{'kernel (GPU us per call; x: launches per call)':<70} {'decode':>9} {f'verify {n}':>15} {'diff':>9}")
    for k in names[:args.top]:
        (a, na), (b, nb) = one.get(k, none), many.get(k, none)
        print(f"{k[:64]:<64} x{na:<4.0f} {a:9.1f} x{nb:<4.0f} {b:9.1f} {b - a:9.1f}")
    rows = [("sum of kernels (us)", sum(t for t, _ in one.values()), sum(t for t, _ in many.values())),
            ("kernels per call", sum(c for _, c in one.values()), sum(c for _, c in many.values())),
            ("wall, compiled no graph (us)", one_eager * 1e6, many_eager * 1e6),
            ("wall, CUDA graph (us)", one_graph * 1e6, many_graph * 1e6)]
    for label, a, b in rows:
        print(f"{label:<70} {a:9.1f} {b:15.1f} {b - a:9.1f}")
    print(f"model {args.model} {args.quant}; torch {torch.__version__}; {torch.cuda.get_device_name()}")


if __name__ == "__main__":
    main()
