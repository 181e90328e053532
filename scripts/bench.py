"""Batch-1 decode benchmark: tok/s and GB/s against the copy bandwidth measured in the same run.

    python scripts/bench.py --model Llama-2-7B                      # random bf16 weights, compiled, on CUDA
    python scripts/bench.py --model Llama-2-7B --quant int4 --groupsize 128
    python scripts/bench.py --checkpoint_path checkpoints/SmolLM2-135M-Instruct/model.pth
    python scripts/bench.py --model Llama-2-7B --verify_k 5         # cost of verifying k+1 tokens vs one step
    python scripts/bench.py --hf_reference --device cpu --dtype float32   # also time transformers' generate()

Bytes per token are counted as gpt-fast does: every weight except the token-embedding table (unless it doubles
as the output head), at the size the (quantized) weights really occupy, plus the KV cache positions in use.
"""
import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import generate as generate_py  # noqa: E402  (its QUEUE_DEPTH, for --queue_depth)
from generate import (Sampling, check_device, compile_step, decode_one_token, generate,  # noqa: E402
                      kv_bytes_per_position, load_model, model_bytes, peak_memory_gb, resolve_checkpoint, synchronize)
from model import ModelArgs, Transformer  # noqa: E402


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def copy_bandwidth(device: str, gib: float = 2.0) -> float:
    """Device-to-device (or RAM-to-RAM) copy in GB/s, counting bytes read plus bytes written; median of runs."""
    n = int(gib * 2**30) // 4
    src, dst = torch.randn(n, device=device), torch.empty(n, device=device)
    times = []
    for i in range(13):
        synchronize(device)
        t = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        if i >= 3:
            times.append(time.perf_counter() - t)
    del src, dst
    return 2 * n * 4 / statistics.median(times) / 1e9


def random_model(name: str, device: str, dtype, quant: str, groupsize: int, gemv: bool = True,
                 kernel: str = "default", attention: bool = True) -> Transformer:
    """A preset's shapes with random weights made on the device in `dtype` (no checkpoint needed, no float32 copy)."""
    with torch.device("meta"):
        model = Transformer(ModelArgs.from_name(name)).to(dtype)
    model = model.to_empty(device=device)
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    if quant != "none":
        import quantize
        model, _ = quantize.quantize_model(model, quant, groupsize)
        quantize.prepare_for_device(model, **({} if kernel == "default" else {f"{quant}_kernel": kernel}))
    if device.startswith("cuda") and gemv:
        from gemv import use_gemv
        use_gemv(model)
    if device.startswith("cuda") and attention:
        from decode_attention import use_decode_attention
        use_decode_attention(model)
    return model.eval()


def check_fits(name: str, device: str, dtype) -> None:
    """Refuse in one line a preset whose weights alone exceed the device's free memory (the kernel's OOM killer
    would end the process with no word on the CPU)."""
    with torch.device("meta"):
        need = sum(p.numel() for p in Transformer(ModelArgs.from_name(name)).parameters()) * dtype.itemsize
    free = torch.cuda.mem_get_info(torch.device(device))[0] if device.startswith("cuda") else available_ram()
    if free is not None and need > 0.9 * free:
        raise ValueError(f"--model {name} needs {need / 1e9:.1f} GB of {str(dtype).replace('torch.', '')} weights and "
                         f"{device} has {free / 1e9:.1f} GB free; pick a smaller preset (e.g. SmolLM2-135M) or a "
                         f"narrower --dtype")


def available_ram():
    """Linux's estimate of the bytes a process can still allocate (MemAvailable); None where there is none."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


def time_steps(fn, device, n=50, warmup=5, batches=3) -> float:
    """Median over `batches` of the seconds of one call of fn (which must not sync), each batch n calls queued
    back to back with one sync at the end."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    runs = []
    for _ in range(batches):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        synchronize(device)
        runs.append((time.perf_counter() - t) / n)
    return statistics.median(runs)


def verify_cost(model, device, k: int, compile: bool, prompt_len: int):
    """Seconds for one decode step and for one forward over k+1 positions, both as compiled graphs."""
    step = (lambda m, x, p: m(x, p))
    fn = compile_step(step, device) if compile else step
    fn_k = compile_step(step, device) if compile else step
    model.setup_caches(1, prompt_len + 64)
    x1, xk = torch.zeros(1, 1, dtype=torch.long, device=device), torch.zeros(1, k + 1, dtype=torch.long, device=device)
    p1 = torch.tensor([prompt_len], device=device)
    pk = torch.arange(prompt_len, prompt_len + k + 1, device=device)
    with torch.no_grad():
        one = time_steps(lambda: fn(model, x1, p1), device)
        many = time_steps(lambda: fn_k(model, xk, pk), device)
    return one, many


def hf_reference(gguf: str, device: str, dtype, prompt_len: int, new_tokens: int) -> float:
    """transformers' generate() with a static cache on the same weights (the GGUF the default was made from)."""
    from transformers import AutoModelForCausalLM
    if gguf is None:
        from convert_hf_checkpoint import smollm2_gguf_path
        gguf = smollm2_gguf_path()
    gguf = Path(gguf)
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
    hf = hf.to(device).eval()
    ids = torch.randint(100, 1000, (1, prompt_len), device=device)
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, cache_implementation="static")
    with torch.no_grad():
        hf.generate(ids, **kw)  # warm-up
        synchronize(device)
        t = time.perf_counter()
        hf.generate(ids, **kw)
        synchronize(device)
    return new_tokens / (time.perf_counter() - t)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a preset name: random weights of its shape (e.g. Llama-2-7B)")
    p.add_argument("--checkpoint_path", default=None, help="a real checkpoint instead (default: embedded SmolLM2)")
    p.add_argument("--quant", default="none", choices=["none", "int8", "int4"], help="quantize random weights first")
    p.add_argument("--groupsize", type=int, default=128, help="int4 group size")
    p.add_argument("--kernel", default="default", choices=["default", "torch", "triton", "mma"],
                   help="with --quant: torch's kernel, our Triton GEMV, or (int4) the tensor cores through a "
                        "shuffled layout (default: quantize.prepare_for_device's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    p.add_argument("--dtype", default=None, help="bfloat16 (CUDA default) or float32 (CPU default)")
    p.add_argument("--prompt_len", type=int, default=16, help="prompt tokens before decoding")
    p.add_argument("--max_new_tokens", type=int, default=200, help="tokens decoded per timed run")
    p.add_argument("--no_compile", action="store_true", help="eager decode step (default: compiled)")
    p.add_argument("--no_gemv", action="store_true", help="stock F.linear instead of the Triton GEMV (random weights)")
    p.add_argument("--sdpa", action="store_true",
                   help="PyTorch's SDPA for decode attention instead of decode_attention.py's kernel")
    p.add_argument("--pdl_attention", action="store_true",
                   help="decode_attention.py's kernel launched with programmatic dependent launch (its custom op)")
    p.add_argument("--no_pdl", action="store_true",
                   help="plain kernel launches: no programmatic dependent launch for gemv.py's float kernels")
    p.add_argument("--no_fuse", action="store_true",
                   help="the plain block forward: no gate-up matmul pair, SiLU and residual adds as kernels of their own")
    p.add_argument("--verify_k", type=int, default=0, help="also time one forward over k+1 positions vs one step")
    p.add_argument("--verify_only", action="store_true",
                   help="with --verify_k: skip the tok/s run (two compiles fewer)")
    p.add_argument("--queue_depth", default=None,
                   help="decode steps generate() queues ahead on a GPU, e.g. 1,2,3: each is timed, in turn, three "
                        "times in one process (default: generate.QUEUE_DEPTH)")
    p.add_argument("--hf_reference", action="store_true", help="also time transformers' generate() (SmolLM2 only)")
    p.add_argument("--gguf", default=None, help="with --hf_reference: the SmolLM2 GGUF (default: the wheel's)")
    args = p.parse_args(argv)
    if args.model:
        ModelArgs.from_name(args.model)  # an unknown name fails here, not after the copy measurement
    if args.max_new_tokens < 2:
        raise ValueError(f"--max_new_tokens must be at least 2 (the first token is the prefill's), got "
                         f"{args.max_new_tokens}")
    check_device(args.device)
    device = args.device
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    if args.model:
        check_fits(args.model, device, dtype)
    compile = not args.no_compile
    if compile:
        import torch._inductor.config as inductor_config
        inductor_config.coordinate_descent_tuning = True
        inductor_config.triton.unique_kernel_names = True
        inductor_config.fx_graph_cache = True
    if args.no_pdl:
        import gemv
        gemv.PDL_OK = False
    torch.manual_seed(0)

    copy_gbs = copy_bandwidth(device)
    log(f"copy bandwidth {copy_gbs:.0f} GB/s")
    if args.model:
        model, label = random_model(args.model, device, dtype, args.quant, args.groupsize, not args.no_gemv,
                                    args.kernel, not args.sdpa), f"{args.model} random"
    else:
        ckpt = resolve_checkpoint(args.checkpoint_path)
        model, label = load_model(ckpt, device, dtype), str(ckpt.parent.name)
        if args.sdpa:
            for layer in model.layers:
                layer.attention.decode_attention = None
    if args.no_fuse:
        for layer in model.layers:
            layer.fused = None
    if args.pdl_attention and not args.sdpa:
        from decode_attention import use_decode_attention
        use_decode_attention(model, pdl=True)
    label += f" {args.quant if args.quant != 'none' else str(dtype).replace('torch.', '')}"
    label += " stock-linear" if args.no_gemv else ""
    label += " sdpa" if args.sdpa else ""
    label += " pdl-attention" if args.pdl_attention and not args.sdpa else ""
    label += " unfused" if args.no_fuse else ""
    label += " no-pdl" if args.no_pdl else ""
    label += f" {args.kernel}-kernel" if args.kernel != "default" else ""

    if args.verify_only and args.verify_k:
        one, many = verify_cost(model, device, args.verify_k, compile, args.prompt_len)
        show([("model", label), ("torch", torch.__version__), ("decode step (ms)", f"{one * 1000:.3f}"),
              (f"verify {args.verify_k + 1} (ms)", f"{many * 1000:.3f}"), ("verify / step", f"{many / one:.3f}")])
        return
    decode = compile_step(decode_one_token, device) if compile else decode_one_token
    prompt = [list(range(1, args.prompt_len + 1))]
    s = Sampling(temperature=0.0)
    seq = args.prompt_len + args.max_new_tokens  # one cache size throughout: a new cache means a new CUDA graph
    with torch.no_grad():
        log(f"{label}: {model_bytes(model) / 1e9:.2f} GB of weights; compiling" if compile else f"{label}: eager")
        t = time.perf_counter()
        generate(model, prompt, min(8, args.max_new_tokens), s, decode_fn=decode, max_seq_length=seq)  # compile
        compile_s = time.perf_counter() - t
        log(f"ready after {compile_s:.0f} s; timing")
        depths = [int(d) for d in args.queue_depth.split(",")] if args.queue_depth else [generate_py.QUEUE_DEPTH]
        runs = {d: [] for d in depths}
        for _ in range(3):
            for d in depths:  # in turn, so that a drift of the machine touches every depth alike
                generate_py.QUEUE_DEPTH = d
                synchronize(device)
                t = time.perf_counter()
                generate(model, prompt, 1, s, max_seq_length=seq)
                synchronize(device)
                ttft = time.perf_counter() - t
                t = time.perf_counter()
                generate(model, prompt, args.max_new_tokens, s, decode_fn=decode, max_seq_length=seq)
                synchronize(device)
                runs[d].append((args.max_new_tokens - 1) / (time.perf_counter() - t - ttft))
    tok_s = statistics.median(runs[depths[0]])
    avg_len = args.prompt_len + args.max_new_tokens / 2
    step_bytes = model_bytes(model) + kv_bytes_per_position(model, 1) * avg_len
    gbs = step_bytes * tok_s / 1e9
    rows = [("model", label), ("device", torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"),
            ("torch", torch.__version__), ("compile (s)", f"{compile_s:.1f}"),
            ("bytes/token (GB)", f"{step_bytes / 1e9:.3f}"),
            ("tok/s" if len(depths) == 1 else f"tok/s (queue depth {depths[0]})", f"{tok_s:.1f}"),
            ("GB/s", f"{gbs:.0f}"), ("copy GB/s", f"{copy_gbs:.0f}"), ("% of copy", f"{100 * gbs / copy_gbs:.1f}"),
            ("time to first token (ms)", f"{ttft * 1000:.1f}"), ("peak memory (GB)", f"{peak_memory_gb(device):.2f}")]
    if len(depths) > 1:
        rows += [(f"tok/s, queue depth {d}", " ".join(f"{r:.1f}" for r in runs[d])) for d in depths]
    show(rows)
    if args.verify_k:
        one, many = verify_cost(model, device, args.verify_k, compile, args.prompt_len)
        show([("decode step (ms)", f"{one * 1000:.3f}"), (f"verify {args.verify_k + 1} (ms)", f"{many * 1000:.3f}"),
              ("verify / step", f"{many / one:.3f}")])
    if args.hf_reference:
        hf = hf_reference(args.gguf, device, dtype, args.prompt_len, args.max_new_tokens)
        show([("transformers tok/s", f"{hf:.1f}"), ("speed-up", f"{tok_s / hf:.2f}x")])


def show(rows):
    print("\n".join(f"{k:<26}  {v}" for k, v in rows), flush=True)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
