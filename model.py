"""A compact Llama-family transformer (Llama 2/3/3.1/3.2, Mistral, Qwen2.5, SmolLM2, Mixtral) with a static KV cache.

One `forward(idx, input_pos)` serves prefill, one-token decode and multi-token verification: the KV cache is
written at `input_pos` and the mask hides every slot after each query's own position, so stale entries left by
a rejected speculation are never read. RoPE uses the Hugging Face "rotate half" layout, so HF weights load as
they are.
"""
import json
import math
import platform
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ModelArgs:
    block_size: int = 2048
    vocab_size: int = 32000
    n_layer: int = 32
    n_head: int = 32
    dim: int = 4096
    intermediate_size: Optional[int] = None
    n_local_heads: int = -1  # key/value heads (grouped-query attention); -1 means n_head
    head_dim: Optional[int] = None
    rope_base: float = 10000
    norm_eps: float = 1e-5
    rope_scaling: Optional[dict] = None  # Llama-3.1 style: factor, low_freq_factor, high_freq_factor, original_max_position_embeddings
    tie_embeddings: bool = False
    attention_bias: bool = False  # Qwen2 puts a bias on q, k and v
    num_experts: int = 0  # > 0 makes every feed-forward a mixture of experts (Mixtral)
    num_activated_experts: int = 2

    def __post_init__(self):
        if self.n_local_heads == -1:
            self.n_local_heads = self.n_head
        if self.intermediate_size is None:  # Llama's 2/3 * 4 * dim rounded up to a multiple of 256
            hidden = int(2 * 4 * self.dim / 3)
            self.intermediate_size = hidden + (-hidden % 256)
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_head

    @classmethod
    def from_name(cls, name: str) -> "ModelArgs":
        """The preset whose name is in `name` (case-insensitive); the most specific one when several are."""
        key = str(name).lower()
        hits = [p for p in transformer_configs if p.lower() in key]
        hits = [p for p in hits if not any(p.lower() in q.lower() and p != q for q in hits)]
        if len(hits) != 1:
            what = f"matches several presets ({', '.join(hits)})" if hits else "matches no preset"
            raise ValueError(f"model name {name!r} {what}; use one of: {', '.join(transformer_configs)} (a checkpoint "
                             f"folder without config.json is named after one; convert_hf_checkpoint.py writes one)")
        return cls(**transformer_configs[hits[0]])

    @classmethod
    def from_json(cls, path) -> "ModelArgs":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in json.loads(Path(path).read_text()).items() if k in known})

    def to_json(self, path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")


_LLAMA31_SCALING = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
_LLAMA32_SCALING = dict(_LLAMA31_SCALING, factor=32.0)

transformer_configs = {
    "Llama-2-7B": dict(n_layer=32, n_head=32, dim=4096, block_size=4096),
    "Llama-2-13B": dict(n_layer=40, n_head=40, dim=5120, block_size=4096),
    "Llama-2-70B": dict(n_layer=80, n_head=64, dim=8192, n_local_heads=8, intermediate_size=28672, block_size=4096),
    "CodeLlama-7B": dict(n_layer=32, n_head=32, dim=4096, vocab_size=32016, rope_base=1e6, block_size=16384),
    "CodeLlama-34B": dict(n_layer=48, n_head=64, dim=8192, n_local_heads=8, intermediate_size=22016, rope_base=1e6,
                          block_size=16384),
    "Mistral-7B": dict(n_layer=32, n_head=32, dim=4096, n_local_heads=8, intermediate_size=14336, block_size=32768),
    "Llama-3-8B": dict(n_layer=32, n_head=32, dim=4096, n_local_heads=8, intermediate_size=14336, vocab_size=128256,
                       rope_base=500000, block_size=8192),
    "Llama-3-70B": dict(n_layer=80, n_head=64, dim=8192, n_local_heads=8, intermediate_size=28672, vocab_size=128256,
                        rope_base=500000, block_size=8192),
    "Llama-3.1-8B": dict(n_layer=32, n_head=32, dim=4096, n_local_heads=8, intermediate_size=14336, vocab_size=128256,
                         rope_base=500000, block_size=131072, rope_scaling=_LLAMA31_SCALING),
    "Llama-3.1-70B": dict(n_layer=80, n_head=64, dim=8192, n_local_heads=8, intermediate_size=28672,
                          vocab_size=128256, rope_base=500000, block_size=131072, rope_scaling=_LLAMA31_SCALING),
    "Llama-3.1-405B": dict(n_layer=126, n_head=128, dim=16384, n_local_heads=8, intermediate_size=53248,
                           vocab_size=128256, rope_base=500000, block_size=131072, rope_scaling=_LLAMA31_SCALING),
    "Llama-3.2-1B": dict(n_layer=16, n_head=32, dim=2048, n_local_heads=8, intermediate_size=8192, vocab_size=128256,
                         rope_base=500000, block_size=131072, rope_scaling=_LLAMA32_SCALING, tie_embeddings=True),
    "Llama-3.2-3B": dict(n_layer=28, n_head=24, dim=3072, n_local_heads=8, intermediate_size=8192, vocab_size=128256,
                         rope_base=500000, block_size=131072, rope_scaling=_LLAMA32_SCALING, tie_embeddings=True),
    "Qwen2.5-0.5B": dict(n_layer=24, n_head=14, dim=896, n_local_heads=2, intermediate_size=4864, vocab_size=151936,
                         rope_base=1e6, norm_eps=1e-6, block_size=32768, tie_embeddings=True, attention_bias=True),
    "Qwen2.5-1.5B": dict(n_layer=28, n_head=12, dim=1536, n_local_heads=2, intermediate_size=8960, vocab_size=151936,
                         rope_base=1e6, norm_eps=1e-6, block_size=32768, tie_embeddings=True, attention_bias=True),
    "Qwen2.5-7B": dict(n_layer=28, n_head=28, dim=3584, n_local_heads=4, intermediate_size=18944, vocab_size=152064,
                       rope_base=1e6, norm_eps=1e-6, block_size=32768, attention_bias=True),
    "SmolLM2-135M": dict(n_layer=30, n_head=9, dim=576, n_local_heads=3, intermediate_size=1536, vocab_size=49152,
                         rope_base=100000, block_size=8192, tie_embeddings=True),
    "SmolLM2-360M": dict(n_layer=32, n_head=15, dim=960, n_local_heads=5, intermediate_size=2560, vocab_size=49152,
                         rope_base=100000, block_size=8192, tie_embeddings=True),
    "SmolLM2-1.7B": dict(n_layer=24, n_head=32, dim=2048, intermediate_size=8192, vocab_size=49152,
                         rope_base=130000, block_size=8192, tie_embeddings=True),
    "Mixtral-8x7B": dict(n_layer=32, n_head=32, dim=4096, n_local_heads=8, intermediate_size=14336, rope_base=1e6,
                         block_size=32768, num_experts=8, num_activated_experts=2),
}


class KVCache(nn.Module):
    """Preallocated keys and values, written in place at `input_pos`; rolling back is writing those slots again."""

    def __init__(self, max_batch_size, max_seq_length, n_heads, head_dim, dtype):
        super().__init__()
        shape = (max_batch_size, n_heads, max_seq_length, head_dim)  # (B, H_kv, S_max, D)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype), persistent=False)

    def update(self, input_pos, k, v):
        # input_pos: (S,), k/v: (B, H_kv, S, D); a batch smaller than the cache uses its first rows
        B = k.shape[0]
        self.k_cache[:B, :, input_pos] = k
        self.v_cache[:B, :, input_pos] = v
        return self.k_cache[:B], self.v_cache[:B]


def cache_window(input_pos, max_seq_length: int) -> int:
    """How many cache slots a step attends to. On the CPU only those up to the furthest position written: reading a
    4096-slot chat cache whole made SmolLM2's decode 3x slower there. On a GPU the whole cache: a length read back
    would stall the queued steps and break the CUDA graph, and decode_attention.py's kernel reads only the slots in
    use anyway. Compiled, the CPU's length is a data-dependent size: torch._dynamo.config.capture_scalar_outputs."""
    if input_pos.device.type != "cpu":
        return max_seq_length
    n = int(input_pos.max()) + 1
    torch._check(n >= 1)
    torch._check(n <= max_seq_length)
    return n


class Transformer(nn.Module):
    def __init__(self, config: ModelArgs):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.output = Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.max_batch_size = -1
        self.max_seq_length = -1

    def setup_caches(self, max_batch_size: int, max_seq_length: int, dtype=None):
        """Allocate the KV caches and RoPE tables on the device the weights live on."""
        c = self.config
        if max_seq_length > c.block_size:
            raise ValueError(f"a sequence of {max_seq_length} tokens exceeds the model's context of {c.block_size}; "
                             f"shorten the prompt or lower --max_new_tokens")
        device = self.norm.weight.device
        dtype = dtype or self.norm.weight.dtype
        self.max_batch_size, self.max_seq_length = max_batch_size, max_seq_length
        for layer in self.layers:
            n_kv = layer.attention.n_kv  # this process's KV heads (all of them unless tensor parallel split them)
            layer.attention.kv_cache = KVCache(max_batch_size, max_seq_length, n_kv, c.head_dim, dtype).to(device)
        cos, sin = rope_tables(max_seq_length, c.head_dim, c.rope_base, c.rope_scaling, device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, idx, input_pos=None, left_pad=None, return_hidden=False, tree=None):
        """idx: (B, S) token ids written to cache slots `input_pos` (S,).

        `left_pad` (B,) is the number of padding slots at the start of each row of a batch of unequal prompts:
        those slots are masked out and each row's RoPE positions start at 0 after its padding, so every row
        computes what it would alone. `tree` makes the S tokens a draft tree's nodes rather than a sequence
        (tree_inputs). Without caches (training) this is a plain causal forward.
        """
        B, S = idx.shape
        if input_pos is None:  # positions 0..S-1, causal, the cache neither read nor written
            rope, mask = causal_rope(self.config, S, idx.device), None
        else:
            slots = torch.arange(cache_window(input_pos, self.max_seq_length), device=idx.device)
            mask = slots[None, :] <= input_pos[:, None]  # (S, n): causal over the cache slots attended to
            pos = input_pos[None, :]  # (1, S)
            if tree is not None:
                mask, pos = tree_inputs(slots, *tree)
            elif left_pad is not None:
                # padding slots are hidden; a padding query still sees itself so its softmax has no empty row
                mask = (mask & (slots >= left_pad[:, None, None])) | (slots == input_pos[:, None])  # (B, S, S_max)
                pos = (input_pos[None, :] - left_pad[:, None]).clamp(min=0)  # (B, S)
                mask = mask[:, None]  # (B, 1, S, S_max)
            # the tables and each query's row in them, gathered where they are used: a step gathering them once,
            # compiled, had inductor copy the rows again for every layer's attention kernel
            rope = (self.rope_cos, self.rope_sin, pos)
        x = self.tok_embeddings(idx)
        for layer in self.layers:
            x = layer(x, rope, mask, input_pos)
        h = self.norm(x)
        logits = self.output(h)
        return (logits, h) if return_hidden else logits

    def move_cache(self, src, dst):
        """Copy every layer's cached keys and values from slots src to slots dst (S,) each: a draft tree's accepted
        branch to the slots right after its root. The source is read whole before anything is written."""
        for layer in self.layers:
            cache = layer.attention.kv_cache
            cache.k_cache[:, :, dst] = cache.k_cache[:, :, src]
            cache.v_cache[:, :, dst] = cache.v_cache[:, :, src]


def tree_inputs(slots, root, depth, visible):
    """The attention mask and RoPE positions of S nodes of a draft tree (spec_tree.py) whose N nodes sit at cache
    slots root..root+N-1: slots (n,) the cache slots attended to, root (1,), depth (S,) and visible (S, N), each node's
    rows of DraftTree.tensors. A node sees every slot before the root and the slots of its ancestors and itself;
    it sits at position root + depth. -> mask (1, 1, S, n): 4-D, which decode_attention reads (a 2-D mask it takes
    for the causal one and recomputes); positions (1, S)."""
    rel = slots - root  # (n,)
    n_tree = visible.shape[1]
    seen = visible[:, rel.clamp(0, n_tree - 1)] & (rel < n_tree)[None, :]  # (S, n)
    return (seen | (rel < 0)[None, :])[None, None], (root + depth)[None, :]


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelArgs):
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = MOEFeedForward(config) if config.num_experts else FeedForward(config)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.fused = None  # CUDA decode and verify with small steps inside the matmuls: gemv.fused_block

    def forward(self, x, rope, mask, input_pos):
        if self.fused is not None and x.is_cuda and x.shape[0] * x.shape[1] <= 16:  # decode, verification
            return self.fused(self, x, rope, mask, input_pos)
        h = x + self.attention(self.attention_norm(x), rope, mask, input_pos)
        return h + self.feed_forward(self.ffn_norm(h))


class Attention(nn.Module):
    def __init__(self, config: ModelArgs):
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = config.n_head, config.n_local_heads, config.head_dim
        # q, k and v in one matmul: at batch 1 a decode step is three weight reads fewer kernels
        self.wqkv = Linear(config.dim, (self.n_head + 2 * self.n_kv) * self.head_dim, bias=config.attention_bias)
        self.wo = Linear(self.n_head * self.head_dim, config.dim, bias=False)
        self.kv_cache: Optional[KVCache] = None
        self.decode_attention = None  # CUDA kernel for a few new positions: decode_attention.use_decode_attention

    def forward(self, x, rope, mask, input_pos):
        return self.wo(self.attend(self.wqkv(x), rope, mask, input_pos))

    def attend(self, qkv, rope, mask, input_pos):
        """(B, S, (H + 2 H_kv) D) projections -> (B, S, H D) attention output, the new keys and values cached."""
        B, S, _ = qkv.shape
        cache = self.kv_cache
        if (self.decode_attention is not None and qkv.is_cuda and S <= 16 and cache is not None
                and input_pos is not None):
            # decode, verification: RoPE, the cache writes and attention in one kernel
            return self.decode_attention(qkv, rope, cache.k_cache, cache.v_cache, mask, input_pos, self.n_head)
        q_size, kv_size = self.n_head * self.head_dim, self.n_kv * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(B, S, -1, self.head_dim).transpose(1, 2)  # (B, H, S, D); H is per rank under tensor parallel
        k = k.view(B, S, -1, self.head_dim).transpose(1, 2)  # (B, H_kv, S, D)
        v = v.view(B, S, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        if cache is not None and input_pos is not None:
            k, v = cache.update(input_pos, k, v)  # (B, H_kv, S_max, D)
            k, v = k[:, :, :mask.shape[-1]], v[:, :, :mask.shape[-1]]  # the slots the mask covers (cache_window)
        gqa = q.shape[1] != k.shape[1]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa)
        return y.transpose(1, 2).reshape(B, S, -1)


class FeedForward(nn.Module):
    def __init__(self, config: ModelArgs):
        super().__init__()
        self.w1 = Linear(config.dim, config.intermediate_size, bias=False)  # gate
        self.w3 = Linear(config.dim, config.intermediate_size, bias=False)  # up
        self.w2 = Linear(config.intermediate_size, config.dim, bias=False)  # down

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MOEFeedForward(nn.Module):
    """Mixtral's sparse feed-forward: a router picks the top-k experts per token and mixes their SwiGLU outputs."""

    def __init__(self, config: ModelArgs):
        super().__init__()
        E, D, I = config.num_experts, config.dim, config.intermediate_size
        self.gate = Linear(D, E, bias=False)
        self.w1 = nn.Parameter(torch.empty(E, I, D))
        self.w3 = nn.Parameter(torch.empty(E, I, D))
        self.w2 = nn.Parameter(torch.empty(E, D, I))
        self.top_k = config.num_activated_experts

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (T, D)
        weights, experts = torch.topk(F.softmax(self.gate(x).float(), dim=-1), self.top_k, dim=-1)  # (T, A)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
        if x.shape[0] <= 16:
            # decode: read only the chosen experts' weights, which is what bounds a small batch's speed
            w1, w3, w2 = self.w1[experts], self.w3[experts], self.w2[experts]  # (T, A, I, D), (T, A, D, I)
            h = F.silu(torch.einsum("ti,taoi->tao", x, w1)) * torch.einsum("ti,taoi->tao", x, w3)  # (T, A, I)
            y = torch.einsum("tai,taoi->tao", h, w2)  # (T, A, D)
            out = torch.einsum("tao,ta->to", y, weights)
        else:
            # prefill: every expert on every token, weighted by a (T, E) matrix that is zero off the top-k
            dense = torch.zeros(x.shape[0], self.w1.shape[0], dtype=x.dtype, device=x.device).scatter(1, experts, weights)
            h = F.silu(torch.einsum("ti,eoi->teo", x, self.w1)) * torch.einsum("ti,eoi->teo", x, self.w3)  # (T, E, I)
            out = torch.einsum("teo,te->to", torch.einsum("tei,edi->ted", h, self.w2), dense)
        return out.reshape(shape)


# builds whose float32 F.linear goes to MKL (x86) and that ship oneDNN's linear; elsewhere F.linear is left alone
ONEDNN = (torch.backends.mkl.is_available() and torch.backends.mkldnn.is_available()
          and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def intel_cpu() -> bool:
    try:
        return "GenuineIntel" in Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux
        return "Intel" in platform.processor()


# MKL runs its fast code on Intel processors only: there it beat oneDNN at one row at every SmolLM2 shape and over
# a whole eager decode step (BENCHMARKS.md)
ONEDNN_FASTER = ONEDNN and not intel_cpu()


def linear(x, weight, bias=None):
    """F.linear, except float32 on the CPU, outside torch.compile and autograd, where oneDNN is faster than MKL:
    there it runs through oneDNN. torch sends float32 F.linear to MKL, whose matrix-vector product on AMD CPUs is
    far below the memory's speed: SmolLM2's 113 MB output head takes 6.0 ms (19 GB/s) there and 1.8 ms (64 GB/s)
    through oneDNN on 2 AMD cores, and its eager decode goes from 24 to 40-44 tok/s; on 2 Intel cores MKL's decode
    step was the faster, 32.6 ms against 43.3 (BENCHMARKS.md). Compiled, F.linear is traced as usual and inductor
    picks its own kernels. `torch.backends.mkldnn.enabled = False` turns it off."""
    if (not torch.compiler.is_compiling() and ONEDNN_FASTER and torch.backends.mkldnn.enabled
            and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    def forward(self, x):
        return linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()  # normalize in float32 as the reference does, then scale in the model's dtype
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rope_tables(seq_len, head_dim, base, scaling=None, device=None):
    """cos and sin of shape (seq_len, head_dim) in float32, halves repeated for the rotate-half layout."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    if scaling is not None:
        inv_freq = llama3_scale(inv_freq, **scaling)
    freqs = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)  # (S, D/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (S, D)
    return emb.cos(), emb.sin()


def causal_rope(config: ModelArgs, seq_len, device=None):
    """apply_rope's (cos, sin, rows) for positions 0..seq_len-1 read without a cache (training, GPTQ calibration)."""
    cos, sin = rope_tables(seq_len, config.head_dim, config.rope_base, config.rope_scaling, device)
    return cos, sin, torch.arange(seq_len, device=device)[None]


def llama3_scale(inv_freq, factor, low_freq_factor, high_freq_factor, original_max_position_embeddings, **_):
    """Llama 3.1: keep high frequencies, divide low ones by `factor`, blend smoothly in between."""
    wavelen = 2 * math.pi / inv_freq
    low_wavelen = original_max_position_embeddings / low_freq_factor
    high_wavelen = original_max_position_embeddings / high_freq_factor
    smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, blended, scaled)


def apply_rope(x, rope):
    # x: (B, H, S, D); rope: the cos and sin tables (positions, D) and x's positions in them (B or 1, S)
    cos, sin = (t[rope[2]][:, None].to(x.dtype) for t in rope[:2])
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin
