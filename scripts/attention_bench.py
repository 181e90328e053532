"""Time decode_attention.py's kernel (RoPE, cache writes and attention) against model.py's own path without it
(`Attention.attend`: apply_rope, the cache update, SDPA with the boolean mask model.py passes; eager ops, so
inductor's fusion of the first two is not counted) over every layer of a model preset, as one CUDA graph: 1 query
(decode) and k+1 (verification) at a given cache length and position.

    python scripts/attention_bench.py --model Llama-2-7B --cache 216 --pos 116
    python scripts/attention_bench.py --model SmolLM2-135M --cache 4096 --pos 500 --sweep   # tile configs too
"""
import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import decode_attention as A  # noqa: E402
from gemv_sweep import graph_time  # noqa: E402
from model import Attention, KVCache, ModelArgs, rope_tables  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="Llama-2-7B", help="a model.py preset: its heads, head size and layers")
    p.add_argument("--cache", type=int, default=216, help="KV cache length (max_seq_length)")
    p.add_argument("--pos", type=int, default=116, help="position of the first new query")
    p.add_argument("--k", type=int, default=5, help="verification of k+1 queries is timed too")
    p.add_argument("--sweep", action="store_true", help="also try CHUNK, BLOCK_L, num_warps and num_stages settings")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("attention_bench.py needs a CUDA GPU (it times Triton kernels in CUDA graphs)")
    c = ModelArgs.from_name(args.model)
    torch.manual_seed(0)
    kv = []  # one KVCache per layer, random contents
    for _ in range(c.n_layer):
        cache = KVCache(1, args.cache, c.n_local_heads, c.head_dim, torch.bfloat16).cuda()
        cache.k_cache.normal_(), cache.v_cache.normal_()
        kv.append(cache)
    kv_bytes = 2 * (args.pos + args.k + 1) * c.n_local_heads * c.head_dim * 2 * c.n_layer  # slots in use, K and V
    with torch.device("meta"):
        attn = Attention(c)  # model.py's own attention path (its weights are not used)

    def timed(S, kernel):
        H, n_kv, D = c.n_head, c.n_local_heads, c.head_dim
        qkv = torch.randn(1, S, (H + 2 * n_kv) * D, device="cuda", dtype=torch.bfloat16)
        pos = torch.arange(args.pos, args.pos + S, device="cuda")
        mask = torch.arange(args.cache, device="cuda")[None, :] <= pos[:, None]
        cos, sin = rope_tables(args.cache, D, c.rope_base, c.rope_scaling, device="cuda")
        rope = (cos, sin, pos[None])
        attn.decode_attention = A.decode_attention if kernel else None

        def layer(cache):
            attn.kv_cache = cache
            return attn.attend(qkv, rope, mask, pos)
        return graph_time(lambda: [layer(cache) for cache in kv])

    print(f"{args.model}: {c.n_layer} layers, {c.n_head} query / {c.n_local_heads} KV heads of {c.head_dim}; cache "
          f"{args.cache}, queries at {args.pos}", flush=True)
    rows = []
    for S in (1, args.k + 1):
        sdpa, ours = timed(S, False), timed(S, True)
        rows.append(f"{S} queries: RoPE + cache + SDPA {sdpa * 1e6:7.1f} us  kernel {ours * 1e6:7.1f} us  "
                    f"({sdpa / ours:.2f}x; {kv_bytes / ours / 1e9:.0f} GB/s of cache)  per layer "
                    f"{ours / c.n_layer * 1e6:.2f} us")
        print(rows[-1], flush=True)
    if args.sweep:
        default = (A.CHUNK, A.BLOCK_L, A.NUM_WARPS, A.NUM_STAGES)
        res = []
        for cfg in itertools.product([64, 128, 256, 512], [32, 64, 128], [4, 8], [1, 2, 3]):
            if cfg[1] > cfg[0]:
                continue
            A.CHUNK, A.BLOCK_L, A.NUM_WARPS, A.NUM_STAGES = cfg
            try:
                res.append((cfg, timed(1, True), timed(args.k + 1, True)))
            except Exception as e:  # noqa: BLE001
                print(cfg, "failed", type(e).__name__, flush=True)
        A.CHUNK, A.BLOCK_L, A.NUM_WARPS, A.NUM_STAGES = default
        res.sort(key=lambda r: r[1] + r[2])
        for cfg, t1, tk in res[:8]:
            rows.append(f"CHUNK, BLOCK_L, warps, stages = {cfg}: 1 query {t1 * 1e6:.1f} us, {args.k + 1} queries "
                        f"{tk * 1e6:.1f} us")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
