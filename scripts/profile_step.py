"""Where the time of one decode step and of one k+1-token verify step goes, kernel by kernel.

    python scripts/profile_step.py --model Llama-2-7B --verify_k 5
    python scripts/profile_step.py --model SmolLM2-135M --quant int4 --groupsize 64
    python scripts/profile_step.py --model SmolLM2-135M --verify_k 3 --mtp   # an MTP step: k drafts + the verify

Both steps are compiled without CUDA graphs (so the profiler sees each kernel) and profiled over many calls; the
table lists each kernel's GPU time and launches per call for the two steps side by side, largest difference first
(a small kernel launched once a layer shows up as x32 on a 32-layer model). The wall
time of the same steps as CUDA graphs (what generation runs) is printed too, so the part of the difference that
is GPU work can be told from launch overhead. With --mtp the second step is generate.py's whole speculative step
with an MTP head (random weights, drafting over 16384 tokens): the head's catch-up and k drafts, then the verify of
k+1 tokens, one graph; the head's proposal alone is timed too.
"""
import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import random_model, time_steps, verify_cost  # noqa: E402
from generate import Sampling, compile_step, spec_step  # noqa: E402
from spec_eval import spec_state  # noqa: E402


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


def propose(model, drafter, x, n, token, hidden, input_pos, s):
    # spec_step's first half: the head's catch-up and its k drafts
    return drafter.propose(x, n, token, hidden, input_pos, x.shape[1] - 1, s)[0]


def mtp_call(model, k: int, pos: int, max_seq_length: int):
    """A random MTP head for `model` (drafting over 16384 of its tokens), and a function that calls a compiled
    spec_step or propose on a greedy step's state at cache position pos, as generate.py's loop does."""
    from mtp import MTPDrafter, new_head
    from gemv import use_gemv
    from decode_attention import use_decode_attention
    device, dtype = model.norm.weight.device, model.norm.weight.dtype
    head = new_head(model).to(dtype)
    for p in head.parameters():
        p.data.normal_(0, 0.02)
    use_gemv(use_decode_attention(head))
    head.share(model, torch.randperm(model.config.vocab_size, device=device)[:16384])
    head.setup_caches(1, max_seq_length)
    drafter, s, state = MTPDrafter(head, model), Sampling(), spec_state(model, k, pos)
    return lambda fn: fn(model, drafter, *state, s)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="Llama-2-7B", help="a preset name (random weights of its shape)")
    p.add_argument("--quant", default="none", choices=["none", "int8", "int4"])
    p.add_argument("--groupsize", type=int, default=128)
    p.add_argument("--verify_k", type=int, default=5)
    p.add_argument("--prompt_len", type=int, default=100, help="cache positions already filled")
    p.add_argument("--top", type=int, default=15, help="kernels shown")
    p.add_argument("--mtp", action="store_true", help="profile an MTP speculative step instead of the verify alone")
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
    second = "MTP step" if args.mtp else f"verify {n}"
    call = mtp_call(model, args.verify_k, L, args.prompt_len + 64) if args.mtp else None
    with torch.no_grad():
        one = kernel_times(lambda: step(model, x1, p1), 20)
        if args.mtp:
            spec_c = torch.compile(spec_step, fullgraph=True)
            many = kernel_times(lambda: call(spec_c), 20)
        else:
            many = kernel_times(lambda: step_k(model, xk, pk), 20)
        one_eager = time_steps(lambda: step(model, x1, p1), "cuda")
        many_eager = time_steps(lambda: step_k(model, xk, pk), "cuda")
    # CUDA graphs only after profiling: the profiler can hang on graphs made before its first use (pytorch#75504)
    one_graph, many_graph = verify_cost(model, "cuda", args.verify_k, True, args.prompt_len)
    if args.mtp:
        with torch.no_grad():
            spec_g, propose_g = (compile_step(f, "cuda", dynamic=False) for f in (spec_step, propose))
            spec_graph = time_steps(lambda: call(spec_g), "cuda")
            propose_graph = time_steps(lambda: call(propose_g), "cuda")

    none = (0.0, 0.0)
    names = sorted(set(one) | set(many), key=lambda k: -abs(many.get(k, none)[0] - one.get(k, none)[0]))
    print(f"{'kernel (GPU us per call; x: launches per call)':<70} {'decode':>9} {second:>15} {'diff':>9}")
    for k in names[:args.top]:
        (a, na), (b, nb) = one.get(k, none), many.get(k, none)
        print(f"{k[:64]:<64} x{na:<4.0f} {a:9.1f} x{nb:<4.0f} {b:9.1f} {b - a:9.1f}")
    rows = [("sum of kernels (us)", sum(t for t, _ in one.values()), sum(t for t, _ in many.values())),
            ("kernels per call", sum(c for _, c in one.values()), sum(c for _, c in many.values())),
            (f"wall, compiled no graph (us; second column: verify {n})", one_eager * 1e6, many_eager * 1e6),
            (f"wall, CUDA graph (us; second column: verify {n})", one_graph * 1e6, many_graph * 1e6)]
    if args.mtp:
        rows += [("wall, CUDA graph (us; second column: MTP step)", one_graph * 1e6, spec_graph * 1e6),
                 ("wall, CUDA graph (us; second column: the head's proposal)", one_graph * 1e6, propose_graph * 1e6)]
    for label, a, b in rows:
        print(f"{label:<70} {a:9.1f} {b:15.1f} {b - a:9.1f}")
    print(f"model {args.model} {args.quant}; torch {torch.__version__}; {torch.cuda.get_device_name()}")


if __name__ == "__main__":
    main()
