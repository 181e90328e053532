"""A Triton attention kernel for decode and speculative verification on CUDA: up to 16 new positions against the
static KV cache, with their RoPE and cache writes done in the same kernel.

`F.scaled_dot_product_attention` with a boolean mask reads every slot of the cache, used or not, and at batch 1
costs a few microseconds of fixed overhead per layer (cuDNN's kernel took 23% of SmolLM2-135M's decode step on an
H100; BENCHMARKS.md). This kernel reads the cache only up to the furthest query position (`input_pos` is read on
the device, so one CUDA graph serves every position), reads the model's boolean mask only for a left-padded batch
(model.py's plain causal mask, slot <= input_pos, it recomputes from input_pos, so a compiled step never builds
one tensor per layer for it), and writes its output already laid out as (B, S, H*D) for the output projection. It
starts from the fused q/k/v projection: RoPE on the queries and the new keys, and writing the new keys and values
into the cache, would otherwise be kernels of their own in every layer.

One program per (batch row, KV head) and chunk of CHUNK cache slots; the query heads that share a KV head
(grouped-query attention) and the S queries ride together as the rows of one `tl.dot`. A program first writes
the new keys and values whose slots fall in its own chunk, then waits for all its threads (so that what it reads
next includes them) and attends; no other program reads those slots. With more than one chunk, a second kernel
merges the chunks' partial softmax sums (flash-decoding); empty chunks past the furthest position cost a launch
slot and nothing else.

`use_decode_attention(model)` hands this function to every `Attention` of model.py, which calls it for CUDA
inputs of at most MAX_QUERIES positions and keeps SDPA for prefill, training and the CPU. `pdl=True` hands it
`decode_attention_pdl` instead: the same kernel launched with programmatic dependent launch (Hopper), as gemv.py
launches its float GEMVs, so that it starts while the GEMV before it drains and lets the one after it start early.
Both run the kernel through one custom op (`_attention_op`). Before it waits, each program asks L2 for the cache
slots it will read that earlier steps wrote (a prefetch hint: it changes no value read). Not the default: launched
with PDL alone it left the bf16 Llama-2-7B step as it was (3.573 against 3.569 ms, H200), and with the prefetch it
made the int4 one slower (539-540 against 543-544 tok/s, H100, session 42; `scripts/bench.py --pdl_attention`).
"""
import math
import os
from typing import Optional

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the model keeps SDPA
    triton = None
PDL_OK = triton is not None and os.environ.get("TRITON_INTERPRET") != "1" and torch.version.hip is None

MAX_QUERIES = 16  # new positions per call (decode: 1, verification: k+1)
# tiles: best of `scripts/attention_bench.py --sweep` on an H100 for Llama-2-7B's verification (BENCHMARKS.md)
CHUNK = 256  # cache slots per program; caches longer than this are split and the chunks merged
BLOCK_L = 128  # slots per step inside a chunk
NUM_WARPS = 4
NUM_STAGES = 3  # the K/V tiles' pipeline depth: (256, 128) at 3 takes 136 KB of shared memory, one program an SM

if triton is not None:
    @triton.jit
    def _rope(x_ptr, rows, cos_ptr, sin_ptr, rope_rows, ok, D: tl.constexpr):
        # (n, D) float32: the vectors at offsets `rows` from x_ptr, rotated by the cos/sin table rows at rope_rows, in
        # model.apply_rope's rotate-half layout: x * cos + cat(-x2, x1) * sin
        d = tl.arange(0, D)
        partner = (d + D // 2) % D
        x = tl.load(x_ptr + rows[:, None] + d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        x_rot = tl.load(x_ptr + rows[:, None] + partner[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        x_rot = tl.where(d < D // 2, -x_rot, x_rot)
        cos = tl.load(cos_ptr + rope_rows[:, None] + d[None, :], mask=ok[:, None], other=0.0)
        sin = tl.load(sin_ptr + rope_rows[:, None] + d[None, :], mask=ok[:, None], other=0.0)
        return x * cos + x_rot * sin

    @triton.jit
    def _prefetch(ptrs, ok):
        # ask L2 for the lines at ptrs where ok: a hint, which changes nothing that a later load reads
        return tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.u32 $0, 0; }",
            "=r,l,r", [ptrs, ok.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)

    @triton.jit
    def _attention_kernel(qkv_ptr, cos_ptr, sin_ptr, rope_pos_ptr, k_ptr, v_ptr, mask_ptr, pos_ptr, o_ptr, acc_ptr,
                          ml_ptr, sx_b, sx_s, sr_b, sr_s, sk_b, sk_h, sk_s, sm_b, sm_s, n_kv, S, S_max,
                          SCALE: tl.constexpr, G: tl.constexpr, D: tl.constexpr, R: tl.constexpr, CHUNK: tl.constexpr,
                          BLOCK_L: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr, CAUSAL: tl.constexpr,
                          PDL: tl.constexpr, LINES: tl.constexpr):
        # one program: KV head `hk` of batch row `b` over cache slots [chunk * CHUNK, (chunk + 1) * CHUNK)
        # rows r = g * S + s: query s of the g-th query head sharing KV head `hk`
        b, hk, chunk = tl.program_id(0) // n_kv, tl.program_id(0) % n_kv, tl.program_id(1)
        start = chunk * CHUNK
        kv = b * sk_b + hk * sk_h
        if PDL:
            # let the next kernel launch, then wait for the one before (which wrote qkv) before reading qkv or
            # writing anything. The slots before the first new position were written by earlier steps, not by the
            # kernel waited for: their trip from memory to L2 (LINES 128-byte lines a slot) starts before the wait
            tl.extra.cuda.gdc_launch_dependents()
            ahead = start + tl.arange(0, CHUNK)
            old = (ahead < tl.minimum(tl.load(pos_ptr), S_max))[:, None] & (tl.arange(0, LINES) >= 0)[None, :]
            lines = kv + ahead[:, None] * sk_s + (tl.arange(0, LINES) * (D // LINES))[None, :]
            _prefetch(k_ptr + lines, old)
            _prefetch(v_ptr + lines, old)
            tl.extra.cuda.gdc_wait()
        d = tl.arange(0, D)
        t = tl.arange(0, 16)  # the new positions
        pos = tl.load(pos_ptr + t, mask=t < S, other=0)
        # the new keys (after RoPE) and values whose slots are in this chunk, into the cache
        mine = (t < S) & (pos >= start) & (pos < start + CHUNK)
        row = b * sx_b + t * sx_s  # in qkv: q heads, then k heads, then v heads
        # the cos/sin table rows of the new keys and of the queries (loaded before the barrier: no wait after it)
        k_rope = tl.load(rope_pos_ptr + b * sr_b + t * sr_s, mask=mine, other=0) * D
        r = tl.arange(0, R)
        s, h = r % S, hk * G + r // S
        valid = r < G * S
        q_rope = tl.load(rope_pos_ptr + b * sr_b + s * sr_s, mask=valid, other=0) * D
        k_new = _rope(qkv_ptr, row + (n_kv * G + hk) * D, cos_ptr, sin_ptr, k_rope, mine, D)
        v_new = tl.load(qkv_ptr + (row + (n_kv * G + n_kv + hk) * D)[:, None] + d[None, :], mask=mine[:, None],
                        other=0.0)
        tl.store(k_ptr + kv + pos[:, None] * sk_s + d[None, :], k_new.to(k_ptr.dtype.element_ty), mask=mine[:, None])
        tl.store(v_ptr + kv + pos[:, None] * sk_s + d[None, :], v_new.to(v_ptr.dtype.element_ty), mask=mine[:, None])
        tl.debug_barrier()  # the stores above are seen by every thread's loads below
        q = _rope(qkv_ptr, b * sx_b + s * sx_s + h * D, cos_ptr, sin_ptr, q_rope, valid, D)
        q = q.to(k_ptr.dtype.element_ty)  # rounded to the cache's dtype like the keys it meets
        end = tl.minimum(start + CHUNK, tl.max(pos) + 1)  # no query sees a slot past the furthest position
        q_pos = tl.load(pos_ptr + s, mask=valid, other=-1)  # (R,) each row's own position
        m_i = tl.full((R,), float("-inf"), tl.float32)
        l_i = tl.zeros((R,), tl.float32)
        acc = tl.zeros((R, D), tl.float32)
        for i in range(0, CHUNK // BLOCK_L):  # a fixed trip count, so the loads are pipelined; past `end`, masked
            slots = start + i * BLOCK_L + tl.arange(0, BLOCK_L)
            in_range = slots < end
            k = tl.load(k_ptr + kv + slots[:, None] * sk_s + d[None, :], mask=in_range[:, None], other=0.0)
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * SCALE  # (R, BLOCK_L), float32
            if CAUSAL:
                seen = slots[None, :] <= q_pos[:, None]
            else:
                seen = tl.load(mask_ptr + b * sm_b + s[:, None] * sm_s + slots[None, :],
                               mask=valid[:, None] & in_range[None, :], other=0) != 0
            scores = tl.where(seen, scores, float("-inf"))
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


def decode_attention(qkv, rope, k_cache, v_cache, mask, input_pos, n_head: int):
    """qkv (B, S, (H + 2 H_kv) D), the fused projection before RoPE; rope (cos, sin, rope_pos): model.py's float32
    tables (positions, D) and each query's row in them (B or 1, S), which the kernel gathers itself;
    caches (B_max, H_kv, S_max, D), into which the new keys (after RoPE) and values are written at `input_pos` (S,);
    mask (S, S_max) or (B, 1, S, S_max) bool (True: attend) -> (B, S, H*D): what model.Attention's RoPE, cache
    update and SDPA with that mask give. A 2-D mask must be model.py's causal one, slot <= input_pos: it is not
    read. A custom op (see _attention_op) runs the kernel."""
    return _attention_op(qkv, *rope, k_cache, v_cache, None if mask.dim() == 2 else mask, input_pos, n_head, False)


def decode_attention_pdl(qkv, rope, k_cache, v_cache, mask, input_pos, n_head: int):
    """decode_attention launched with programmatic dependent launch where the GPU has it."""
    return _attention_op(qkv, *rope, k_cache, v_cache, None if mask.dim() == 2 else mask, input_pos, n_head, True)


def _attend(qkv, cos, sin, rope_pos, k_cache, v_cache, mask, input_pos, n_head: int, pdl: bool):
    """decode_attention's launcher; mask None: model.py's causal mask (slot <= input_pos), not read."""
    B, S, _ = qkv.shape
    n_kv, S_max, D = k_cache.shape[1:]
    if S > MAX_QUERIES:
        raise ValueError(f"decode_attention takes up to {MAX_QUERIES} new positions, got {S}")
    assert qkv.shape[-1] == (n_head + 2 * n_kv) * D and k_cache.is_contiguous() and v_cache.is_contiguous()
    qkv = qkv if qkv.stride(-1) == 1 else qkv.contiguous()
    assert cos.shape[-1] == D and cos.is_contiguous() and sin.is_contiguous() and rope_pos.dim() == 2
    G = n_head // n_kv
    R = 16  # tl.dot's smallest tile; a power of two (a loop, not next_power_of_2: S may be symbolic under compile)
    while R < G * S:
        R *= 2
    n_chunks = triton.cdiv(S_max, CHUNK)
    causal = mask is None
    m = input_pos if causal else mask if mask.stride(-1) == 1 else mask.contiguous()  # bool, read as bytes
    sm_b, sm_s = (0, 0) if causal else (m.stride(0), m.stride(2))
    out = torch.empty(B, S, n_head * D, dtype=qkv.dtype, device=qkv.device)
    part_acc = torch.empty(B * n_kv * n_chunks * R * D if n_chunks > 1 else 1, dtype=torch.float32, device=qkv.device)
    part_ml = torch.empty(B * n_kv * n_chunks * R * 2 if n_chunks > 1 else 1, dtype=torch.float32, device=qkv.device)
    precision = "ieee" if qkv.dtype == torch.float32 else "tf32"
    pdl = pdl and PDL_OK and qkv.is_cuda and torch.cuda.get_device_capability(qkv.device)[0] >= 9
    _attention_kernel[(B * n_kv, n_chunks)](
        qkv, cos, sin, rope_pos, k_cache, v_cache, m, input_pos, out, part_acc, part_ml, qkv.stride(0), qkv.stride(1),
        rope_pos.stride(0) if rope_pos.shape[0] > 1 else 0, rope_pos.stride(1), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), sm_b, sm_s, n_kv, S, S_max, SCALE=1.0 / math.sqrt(D), G=G, D=D, R=R, CHUNK=CHUNK,
        BLOCK_L=BLOCK_L, SPLIT=n_chunks > 1, PRECISION=precision, CAUSAL=causal, PDL=pdl,
        LINES=max(1, D * k_cache.element_size() // 128), num_warps=NUM_WARPS, num_stages=NUM_STAGES,
        **({"launch_pdl": True} if pdl else {}))
    if n_chunks > 1:
        _merge_kernel[(B * n_kv,)](part_acc, part_ml, out, n_kv, S, N_CHUNKS=n_chunks, G=G, D=D, R=R, num_warps=4)
    return out


@torch.library.custom_op("mtp_fast::decode_attention", mutates_args=("k_cache", "v_cache"))
def _attention_op(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rope_pos: torch.Tensor,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, mask: Optional[torch.Tensor], input_pos: torch.Tensor,
                  n_head: int, pdl: bool) -> torch.Tensor:
    """The kernel as an op that declares the two caches as the only tensors it writes: traced by torch.compile as a
    plain Triton kernel, one with PDL's inline PTX counts as writing every input, and CUDA graphs are then skipped."""
    return _attend(qkv, cos, sin, rope_pos, k_cache, v_cache, mask, input_pos, n_head, pdl)


@_attention_op.register_fake
def _(qkv, cos, sin, rope_pos, k_cache, v_cache, mask, input_pos, n_head, pdl):
    return qkv.new_empty(*qkv.shape[:2], n_head * k_cache.shape[-1])


def use_decode_attention(model, pdl: bool = False):
    """Let every attention layer of a model.py module (a Transformer, an MTP head) use decode_attention (with
    pdl, decode_attention_pdl) for up to MAX_QUERIES new positions on CUDA; a no-op without Triton."""
    if triton is not None:
        for m in model.modules():
            if hasattr(m, "decode_attention") and hasattr(m, "kv_cache"):
                m.decode_attention = decode_attention_pdl if pdl else decode_attention
    return model
