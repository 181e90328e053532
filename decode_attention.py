"""A Triton attention kernel for decode and speculative verification on CUDA: up to 16 new queries against the
static KV cache.

`F.scaled_dot_product_attention` with a boolean mask reads every slot of the cache, used or not, and at batch 1
costs a few microseconds of fixed overhead per layer (cuDNN's kernel took 23% of SmolLM2-135M's decode step on an
H100; BENCHMARKS.md). This kernel reads the cache only up to the furthest query position (`input_pos` is read on
the device, so one CUDA graph serves every position), takes the model's own boolean mask (causal, left padding),
and writes its output already laid out as (B, S, H*D) for the output projection. One program per (batch row, KV
head) and chunk of CHUNK cache slots; the query heads that share a KV head (grouped-query attention) and the S
queries ride together as the rows of one `tl.dot`. With more than one chunk, a second kernel merges the chunks'
partial softmax sums (flash-decoding); empty chunks past the furthest position cost a launch slot and nothing else.

`use_decode_attention(model)` hands this function to every `Attention` of model.py, which calls it for CUDA
inputs of at most MAX_QUERIES positions and keeps SDPA for prefill, training and the CPU.
"""
import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the model keeps SDPA
    triton = None

MAX_QUERIES = 16  # new positions per call (decode: 1, verification: k+1)
# tiles: best of `scripts/attention_bench.py --sweep` on an H100 for Llama-2-7B's verification (BENCHMARKS.md)
CHUNK = 256  # cache slots per program; caches longer than this are split and the chunks merged
BLOCK_L = 128  # slots per step inside a chunk
NUM_WARPS = 4

if triton is not None:
    @triton.jit
    def _attention_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, pos_ptr, o_ptr, acc_ptr, ml_ptr,
                          sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, sm_b, sm_s, n_kv, S,
                          SCALE: tl.constexpr, G: tl.constexpr, D: tl.constexpr, R: tl.constexpr, CHUNK: tl.constexpr,
                          BLOCK_L: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr):
        # one program: KV head `hk` of batch row `b` over cache slots [chunk * CHUNK, (chunk + 1) * CHUNK)
        # rows r = g * S + s: query s of the g-th query head sharing KV head `hk`
        b, hk, chunk = tl.program_id(0) // n_kv, tl.program_id(0) % n_kv, tl.program_id(1)
        r = tl.arange(0, R)
        s, h = r % S, hk * G + r // S
        valid = r < G * S
        d = tl.arange(0, D)
        q = tl.load(q_ptr + b * sq_b + h[:, None] * sq_h + s[:, None] * sq_s + d[None, :], mask=valid[:, None],
                    other=0.0)
        pos = tl.load(pos_ptr + tl.arange(0, 16), mask=tl.arange(0, 16) < S, other=0)
        start = chunk * CHUNK
        end = tl.minimum(start + CHUNK, tl.max(pos) + 1)  # no query sees a slot past the furthest position
        m_i = tl.full((R,), float("-inf"), tl.float32)
        l_i = tl.zeros((R,), tl.float32)
        acc = tl.zeros((R, D), tl.float32)
        kv = b * sk_b + hk * sk_h
        for i in range(0, CHUNK // BLOCK_L):  # a fixed trip count, so the loads are pipelined; past `end`, masked
            slots = start + i * BLOCK_L + tl.arange(0, BLOCK_L)
            in_range = slots < end
            k = tl.load(k_ptr + kv + slots[:, None] * sk_s + d[None, :], mask=in_range[:, None], other=0.0)
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * SCALE  # (R, BLOCK_L), float32
            seen = tl.load(mask_ptr + b * sm_b + s[:, None] * sm_s + slots[None, :],
                           mask=valid[:, None] & in_range[None, :], other=0)
            scores = tl.where(seen != 0, scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen nothing yet stays at zero
            p = tl.exp(scores - m_ref[:, None])
            alpha = tl.exp(m_i - m_ref)
            v = tl.load(v_ptr + kv + slots[:, None] * sk_s + d[None, :], mask=in_range[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            m_i = m_new
        if SPLIT:  # partial sums of this chunk, merged by _merge_kernel
            part = (tl.program_id(0) * tl.num_programs(1) + chunk) * R + r
            tl.store(acc_ptr + part[:, None] * D + d[None, :], acc)
            tl.store(ml_ptr + 2 * part, m_i)
            tl.store(ml_ptr + 2 * part + 1, l_i)
        else:
            out = acc / l_i[:, None]
            tl.store(o_ptr + ((b * S + s[:, None]) * n_kv * G + h[:, None]) * D + d[None, :],
                     out.to(o_ptr.dtype.element_ty), mask=valid[:, None])

    @triton.jit
    def _merge_kernel(acc_ptr, ml_ptr, o_ptr, n_kv, S, N_CHUNKS: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
                      R: tl.constexpr):
        b, hk = tl.program_id(0) // n_kv, tl.program_id(0) % n_kv
        r = tl.arange(0, R)
        s, h = r % S, hk * G + r // S
        d = tl.arange(0, D)
        m = tl.full((R,), float("-inf"), tl.float32)
        for c in range(N_CHUNKS):  # the largest running max of all chunks
            m = tl.maximum(m, tl.load(ml_ptr + 2 * ((tl.program_id(0) * N_CHUNKS + c) * R + r)))
        m_ref = tl.where(m == float("-inf"), 0.0, m)
        l = tl.zeros((R,), tl.float32)
        acc = tl.zeros((R, D), tl.float32)
        for c in range(N_CHUNKS):
            part = (tl.program_id(0) * N_CHUNKS + c) * R + r
            w = tl.exp(tl.load(ml_ptr + 2 * part) - m_ref)  # 0 for a chunk that saw nothing
            l += w * tl.load(ml_ptr + 2 * part + 1)
            acc += w[:, None] * tl.load(acc_ptr + part[:, None] * D + d[None, :])
        tl.store(o_ptr + ((b * S + s[:, None]) * n_kv * G + h[:, None]) * D + d[None, :],
                 (acc / l[:, None]).to(o_ptr.dtype.element_ty), mask=(r < G * S)[:, None])


def decode_attention(q, k_cache, v_cache, mask, input_pos):
    """q (B, H, S, D) after RoPE, caches (B, H_kv, S_max, D) already holding the new keys and values, mask (S, S_max)
    or (B, 1, S, S_max) bool (True: attend), input_pos (S,) -> (B, S, H*D), what SDPA with that mask gives."""
    B, H, S, D = q.shape
    if S > MAX_QUERIES:
        raise ValueError(f"decode_attention takes up to {MAX_QUERIES} new positions, got {S}")
    q, k_cache, v_cache = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k_cache, v_cache))
    n_kv, S_max = k_cache.shape[1], k_cache.shape[2]
    G = H // n_kv
    R = 16  # tl.dot's smallest tile; a power of two (a loop, not next_power_of_2: S may be symbolic under compile)
    while R < G * S:
        R *= 2
    n_chunks = triton.cdiv(S_max, CHUNK)
    m = mask if mask.stride(-1) == 1 else mask.contiguous()  # bool, read by the kernel as bytes
    sm_b, sm_s = (m.stride(0), m.stride(2)) if m.dim() == 4 else (0, m.stride(0))
    out = torch.empty(B, S, H * D, dtype=q.dtype, device=q.device)
    part_acc = torch.empty(B * n_kv * n_chunks * R * D if n_chunks > 1 else 1, dtype=torch.float32, device=q.device)
    part_ml = torch.empty(B * n_kv * n_chunks * R * 2 if n_chunks > 1 else 1, dtype=torch.float32, device=q.device)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    _attention_kernel[(B * n_kv, n_chunks)](
        q, k_cache, v_cache, m, input_pos, out, part_acc, part_ml, q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), sm_b, sm_s, n_kv, S,
        SCALE=1.0 / math.sqrt(D), G=G, D=D, R=R, CHUNK=CHUNK, BLOCK_L=BLOCK_L, SPLIT=n_chunks > 1,
        PRECISION=precision, num_warps=NUM_WARPS)
    if n_chunks > 1:
        _merge_kernel[(B * n_kv,)](part_acc, part_ml, out, n_kv, S, N_CHUNKS=n_chunks, G=G, D=D, R=R, num_warps=4)
    return out


def use_decode_attention(model):
    """Let every attention layer of a model.py module (a Transformer, an MTP head) use decode_attention for up to
    MAX_QUERIES new positions on CUDA; a no-op without Triton."""
    if triton is not None:
        for m in model.modules():
            if hasattr(m, "decode_attention") and hasattr(m, "kv_cache"):
                m.decode_attention = decode_attention
    return model
