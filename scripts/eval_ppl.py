"""Perplexity of one or more checkpoints (float or quantized) on a fixed text every Debian machine has.

    python scripts/eval_ppl.py --checkpoint_path checkpoints/SmolLM2-135M-Instruct/model.pth \
        checkpoints/SmolLM2-135M-Instruct/model_int8.pth checkpoints/SmolLM2-135M-Instruct/model_int4.g64.pth

The text is /usr/share/common-licenses/{GPL-3,LGPL-2.1,Apache-2.0,MPL-2.0} concatenated in that order (Debian's
base-files; its sha256 is printed so runs on two machines can be compared). GPTQ calibrates on other files of the
same folder by default (quantize.CALIBRATION_FILES), so nothing evaluated here was seen in calibration.
Windows of --window tokens start every --stride tokens; each scores only the tokens no earlier window scored, so
every token but the first is predicted once, with at least window - stride tokens of context after the first
window. One table row per checkpoint: perplexity and its change against the first checkpoint.
"""
import argparse
import hashlib
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from generate import check_device, load_model  # noqa: E402
from quantize import EVAL_FILES, LICENSES, license_text  # noqa: E402
from tokenizer import get_tokenizer  # noqa: E402

DEBIAN12_SHA256 = "564c70374dcb667abda736eb844f4da2502c02165c4b173cf458eb16fc19db24"  # base-files 12.4 (bookworm)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def windows(n_tokens: int, window: int, stride: int):
    """(start, end, first scored position) of each window over n_tokens; every position 1..n-1 is scored once."""
    out, scored_to = [], 1
    for start in range(0, max(n_tokens - 1, 1), stride):
        end = min(start + window, n_tokens)
        if end > scored_to:
            out.append((start, end, scored_to))
            scored_to = end
        if end == n_tokens:
            break
    return out


@torch.no_grad()
def perplexity(model, ids, window: int, stride: int, batch_size: int, device, label: str = ""):
    """exp(mean negative log-likelihood) of ids (T,) under `model`, with a progress line per batch of windows."""
    spans = windows(len(ids), window, stride)
    nll, count, t0 = 0.0, 0, time.perf_counter()
    for i in range(0, len(spans), batch_size):
        batch = spans[i:i + batch_size]
        length = max(e - s for s, e, _ in batch)
        x = torch.stack([F.pad(ids[s:e], (0, length - (e - s))) for s, e, _ in batch]).to(device)  # (B, L)
        logp = torch.log_softmax(model(x).float(), dim=-1)  # (B, L, V)
        for row, (s, e, first) in enumerate(batch):
            pos = torch.arange(first - s - 1, e - s - 1, device=device)  # logits at pos predict the token at pos+1
            nll -= logp[row, pos, x[row, pos + 1]].sum().item()
            count += len(pos)
        done = min(i + batch_size, len(spans))
        rate = done / (time.perf_counter() - t0)
        print(f"{label} window {done}/{len(spans)}  {rate:.2f} windows/s  ETA {(len(spans) - done) / rate:.0f}s  "
              f"ppl so far {math.exp(nll / count):.4f}", file=sys.stderr, flush=True)
    return math.exp(nll / count), count


def describe(checkpoint_path: Path) -> str:
    """What the checkpoint holds, from its own "quantization" entry (float when it has none)."""
    state = torch.load(checkpoint_path, mmap=True, weights_only=True, map_location="cpu")
    info = state.get("quantization")
    if not info:
        return "float"
    group = f" g{info['groupsize']}" if info.get("groupsize") else ""
    return f"{info['mode']}{group}" + (" +output" if info.get("quantize_output") else "")


def main(argv=None):
    p = argparse.ArgumentParser(description="Perplexity of checkpoints on Debian's license texts.")
    p.add_argument("--checkpoint_path", type=Path, nargs="+", required=True,
                   help="checkpoints to compare (the first is the reference for the relative change)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="dtype the float tensors run in")
    p.add_argument("--window", type=int, default=512, help="tokens per window")
    p.add_argument("--stride", type=int, default=256, help="tokens between window starts (scored per window)")
    p.add_argument("--max_tokens", type=int, default=None, help="evaluate only the first N tokens of the text")
    p.add_argument("--batch_size", type=int, default=4, help="windows per forward")
    args = p.parse_args(argv)
    try:
        check_device(args.device)
        if args.max_tokens is not None and args.max_tokens < 2:
            raise ValueError(f"--max_tokens {args.max_tokens} leaves nothing to score; use at least 2")
        if args.window < 2 or args.batch_size < 1:  # a window of one token scores nothing: no context to predict from
            raise ValueError(f"--window must be at least 2 and --batch_size at least 1, got {args.window} and "
                             f"{args.batch_size}")
        if not 0 < args.stride <= args.window:
            raise ValueError(f"--stride {args.stride} must be between 1 and --window {args.window}")
        missing = [str(c) for c in args.checkpoint_path if not c.is_file()]
        if missing:
            raise FileNotFoundError(f"checkpoint {', '.join(missing)} not found; convert or quantize it first")
        text = license_text(EVAL_FILES)
        sha = hashlib.sha256(text.encode()).hexdigest()
        same = "the reference text" if sha == DEBIAN12_SHA256 else "NOT the Debian 12 text: compare only with runs of this sha"
        print(f"text: {', '.join(EVAL_FILES)} from {LICENSES}, {len(text)} characters, sha256 {sha} ({same})")
        rows = []
        for path in args.checkpoint_path:
            tokenizer = get_tokenizer(path.parent)
            ids = torch.tensor(tokenizer.encode(text, bos=False, special=False), dtype=torch.long)[:args.max_tokens]
            model = load_model(path, args.device, DTYPES[args.dtype])
            if args.window > model.config.block_size:
                raise ValueError(f"--window {args.window} exceeds {path}'s context of {model.config.block_size} tokens")
            t0 = time.perf_counter()
            ppl, n = perplexity(model, ids, args.window, args.stride, args.batch_size, args.device, label=path.name)
            rows.append((path, describe(path), path.stat().st_size / 1e6, ppl, n, time.perf_counter() - t0))
            del model
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"window {args.window}, stride {args.stride}, {args.dtype} on {args.device}, torch {torch.__version__}")
    print("| checkpoint | holds | file MB | tokens | perplexity | vs first |")
    print("|---|---|---:|---:|---:|---:|")
    for path, what, mb, ppl, n, _ in rows:
        rel = f"{100 * (ppl / rows[0][3] - 1):+.2f}%"
        print(f"| {path.parent.name}/{path.name} | {what} | {mb:.1f} | {n} | {ppl:.4f} | {rel} |")


if __name__ == "__main__":
    main()
