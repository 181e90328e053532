"""Weight-only quantization: int8 per channel, int4 groupwise (round-to-nearest or GPTQ), and the kernels that run it.

    python quantize.py --checkpoint_path checkpoints/SmolLM2-135M-Instruct/model.pth --mode int8
    python quantize.py --checkpoint_path ... --mode int4 --groupsize 64
    python quantize.py --checkpoint_path ... --mode int4-gptq --groupsize 64   # calibrated on a fixed text

The new checkpoint (model_int8.pth, model_int4.g64.pth, model_int4-gptq.g64.pth beside the input) is the same state
dict with quantized tensors plus one entry "quantization" that says which modules hold what, so a loader rebuilds it
without guessing: `apply_quantization` on the meta model, `load_state_dict(assign=True)`, `.to(device, dtype)`,
`prepare_for_device`. The stored format does not depend on the device: int8 weights with one float scale per
output row; int4 values packed two per byte (even column in the high nibble) with a float scale and zero per
group of `groupsize` input columns, w = (q - 8) * scale + zero (the zero in the float domain, as gpt-fast and
torchao do). `prepare_for_device` repacks int4 for torch's kernel on that device; those kernels compute in
bfloat16 (CUDA's takes nothing else; the CPU one is ~30x slower in float32), whatever the model's dtype.

Decode at batch 1 reads every weight once per token, so it runs as fast as those bytes stream. On CUDA a
single-row input goes to the Triton GEMVs below (dequantization fused into the dot product; torch's own int4
kernel streams at about 57% of the copy bandwidth on an H100); anything else goes to torch's kernels.
Decisions: embeddings, the output head (unless --quantize_output) and the MoE router stay float; MoE experts are
int8 per channel in every mode (an int4 expert would need one kernel call per chosen expert); int4 layers whose
output width is not a multiple of 16 (torch's CPU kernel; CUDA needs 8) stay float and are listed; an input width that the
group size does not divide is refused unless --pad zero-pads it to a multiple of the group size.
"""
import argparse
import math
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import MOEFeedForward, Transformer, rope_tables

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: torch's kernels do all the work
    triton = None

MODES = ("int8", "int4", "int4-gptq")
GROUPSIZES = (32, 64, 128, 256)  # what torch's int4 kernels accept
FORMAT = 1


# ------------------------------------------------------------------------------------------------ quantization math
def quantize_int8(w):
    """Symmetric per-output-channel: w (..., N, K) float -> int8 (..., N, K), scales (..., N) float32."""
    scales = w.float().abs().amax(dim=-1).clamp(min=1e-8) / 127
    q = torch.round(w.float() / scales[..., None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def int4_qparams(w, groupsize: int):
    """Asymmetric groupwise: w (N, K) -> scales, zeros (N, K / groupsize) float32, so that each group's range
    maps onto 0..15 and w ~ (q - 8) * scale + zero."""
    if w.shape[-1] % groupsize:
        raise ValueError(f"group size {groupsize} does not divide the {w.shape[-1]} input features")
    g = w.float().reshape(w.shape[0], -1, groupsize)  # (N, K/g, g)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    scales = (hi - lo).clamp(min=1e-6) / 15
    return scales, lo + 8 * scales


def quantize_int4(w, scales, zeros, groupsize: int):
    """w (N, K) -> integers 0..15 (N, K) int32 on the grid that `scales` and `zeros` (N, K/g) define."""
    g = w.float().reshape(w.shape[0], -1, groupsize)  # (N, K/g, g)
    low = (zeros - 8 * scales)[..., None]
    return torch.round((g - low) / scales[..., None]).clamp(0, 15).to(torch.int32).reshape(w.shape)


def dequantize_int4(q, scales, zeros, groupsize: int):
    """Integers 0..15 (N, K) -> float32 (N, K): the weights the int4 kernels compute with."""
    g = q.float().reshape(q.shape[0], -1, groupsize)  # (N, K/g, g)
    return ((g - 8) * scales.float()[..., None] + zeros.float()[..., None]).reshape(q.shape)


def pack_int4(q):
    """(N, K) integers 0..15 -> (N, K/2) uint8, column 2j in the high nibble: what _convert_weight_to_int4pack takes."""
    q = q.to(torch.uint8)
    return (q[:, ::2] << 4) | q[:, 1::2]


def unpack_int4(packed):
    """(N, K/2) uint8 -> (N, K) int32."""
    return torch.stack([packed >> 4, packed & 15], dim=-1).reshape(packed.shape[0], -1).to(torch.int32)


def inner_k_tiles(groupsize: int) -> int:
    """torch's int4 layout packs K in tiles of 16 * inner_k_tiles; keeping a tile inside one group lets the
    Triton GEMV load one scale per row per tile. 8 (16-byte loads) whenever the group allows."""
    return min(8, groupsize // 16)


def tinygemm_layout(packed, ikt: int):
    """The int32 layout [N/8, K/(16*ikt), 32, ikt/2] that torch's CUDA `_convert_weight_to_int4pack` produces,
    computed with plain tensor ops. Word (n-tile, k-tile, lane 4r+c, jj) holds the 8 nibbles of row 8*ntile+r at
    columns 32*jj + 2*c + 8*(p%4) + p//4 of that k-tile, nibble p at bits 4p. Used to test the Triton kernel on CPU
    and to check on the GPU that torch still packs this way."""
    q = unpack_int4(packed)
    N, K = q.shape
    KO, J = K // (16 * ikt), ikt // 2
    q = q.view(N // 8, 8, KO, J, 4, 4, 2).permute(0, 2, 1, 5, 3, 6, 4)  # (NT, KO, r, c, jj, p//4, p%4)
    q = q.reshape(N // 8, KO, 32, J, 8).long()
    words = (q << (4 * torch.arange(8))).sum(-1)  # (NT, KO, 32, J), 0 .. 2**32-1
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


# --------------------------------------------------------------------------------------------------- Triton GEMVs
# One program reads BLOCK_N rows (int4: 8 * BLOCK_NT) of the weight along all of K (or 1/SPLIT_K of it) with
# 16-byte loads, dequantizes in registers and accumulates in float32. Each 4- or 8-bit field is turned into a
# float without a conversion instruction: its bits are moved to mantissa bits b..b+3 (b+7) and OR-ed with the bits
# of 1.0f, giving exactly 1 + q * 2**(b-23). The input comes pre-multiplied by 2**(23-b) (so each product is
# x' + q*x) and pre-permuted into the order the fields sit in memory; the x' sums are subtracted once at the end.
# ONE (= 0x3F800000) is a run-time argument so ptxas keeps it in a register and fuses mask-and-or into one LOP3.
# About 3.3 (int4) and 3.8 (int8) instructions per weight on sm_90 by the SASS; memory does the rest.

if triton is not None:
    @triton.jit
    def _int4_gemv_kernel(xp_ptr, xs_ptr, w_ptr, sz_ptr, out_ptr, N, ONE, KO: tl.constexpr,
                          GROUPSIZE: tl.constexpr, IKT: tl.constexpr, BLOCK_NT: tl.constexpr, KS: tl.constexpr,
                          SPLIT_K: tl.constexpr, EVEN: tl.constexpr):
        WORDS: tl.constexpr = 2 * IKT  # int32 words per row per k-tile
        KT: tl.constexpr = 16 * IKT  # columns per k-tile
        nt = tl.program_id(0) * BLOCK_NT + tl.arange(0, BLOCK_NT)
        r = tl.arange(0, 8)
        ks = tl.arange(0, KS)
        cw = tl.arange(0, WORDS)
        n = nt[:, None] * 8 + r[None, :]  # (BNT, 8) output rows
        nt_ok = nt < N // 8
        row = nt[:, None, None, None] * (KO * 8 * WORDS) + r[None, None, :, None] * WORDS + cw[None, None, None, :]
        acc = tl.zeros([BLOCK_NT, KS, 8, WORDS], dtype=tl.float32)
        acc_z = tl.zeros([BLOCK_NT, KS, 8], dtype=tl.float32)
        for i in range(tl.cdiv(KO, KS * SPLIT_K)):
            ko = (i * SPLIT_K + tl.program_id(1)) * KS + ks  # (KS,) k-tiles
            ok = ko < KO
            w_ptrs = w_ptr + row + (ko * (8 * WORDS))[None, :, None, None]  # (BNT, KS, 8, WORDS)
            if EVEN:
                w = tl.load(w_ptrs)
            else:
                w = tl.load(w_ptrs, mask=nt_ok[:, None, None, None] & ok[None, :, None, None], other=0)
            for p in tl.static_range(8):  # nibble p sits at bits 4p: move pairs of them to bits 12-15 and 16-19
                if p == 0:
                    src = w << 16
                elif p < 3:
                    src = w << 8
                elif p < 5:
                    src = w
                elif p < 7:
                    src = w >> 8
                else:
                    src = w >> 16
                f = ((src & (0xF << (16 - 4 * (p % 2)))) | ONE).to(tl.float32, bitcast=True)
                x_ptrs = xp_ptr + (ko * (8 * WORDS) + p * WORDS)[:, None] + cw[None, :]  # (KS, WORDS)
                xv = tl.load(x_ptrs) if EVEN else tl.load(x_ptrs, mask=ok[:, None], other=0.0)
                if p == 0:
                    part = f * xv[None, :, None, :]
                else:
                    part += f * xv[None, :, None, :]
            sz = sz_ptr + ((ko * KT) // GROUPSIZE)[None, :, None] * (2 * N) + 2 * n[:, None, :]  # (BNT, KS, 8)
            sz_ok = nt_ok[:, None, None] & ok[None, :, None]
            s = tl.load(sz, mask=sz_ok, other=0.0).to(tl.float32)
            z = tl.load(sz + 1, mask=sz_ok, other=0.0).to(tl.float32)
            x_sum = tl.load(xs_ptr + 2 * ko, mask=ok, other=0.0)[None, :, None]  # sum of x over the k-tile
            xp_sum = tl.load(xs_ptr + 2 * ko + 1, mask=ok, other=0.0)[None, :, None]  # sum of x' over it
            acc += part * s[:, :, :, None]
            acc_z += (z - 8.0 * s) * x_sum - s * xp_sum
        y = tl.sum(tl.sum(acc, axis=3), axis=1) + tl.sum(acc_z, axis=1)  # (BNT, 8)
        if SPLIT_K == 1:
            tl.store(out_ptr + n, y, mask=nt_ok[:, None])
        else:
            tl.atomic_add(out_ptr + n, y, mask=nt_ok[:, None])

    @triton.jit
    def _int8_gemv_kernel(xp_ptr, xs_ptr, w_ptr, s_ptr, out_ptr, N, ONE, KW: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr, SPLIT_K: tl.constexpr, EVEN: tl.constexpr):
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < N
        kb = tl.arange(0, BLOCK_KW)
        acc = tl.zeros([BLOCK_N, BLOCK_KW], dtype=tl.float32)
        for i in range(tl.cdiv(KW, BLOCK_KW * SPLIT_K)):
            k = (i * SPLIT_K + tl.program_id(1)) * BLOCK_KW + kb  # (BKW,) int32 words = 4 int8 weights each
            if EVEN:
                w = tl.load(w_ptr + n[:, None] * KW + k[None, :])
            else:
                w = tl.load(w_ptr + n[:, None] * KW + k[None, :], mask=n_ok[:, None] & (k < KW)[None, :], other=0)
            w = w ^ -2139062144  # 0x80808080: each signed byte b becomes the unsigned b + 128
            for j in tl.static_range(4):  # byte j sits at bits 8j: move it to bits 8-15 (j=1) or 15-22
                if j == 0:
                    f = ((w << 15) & 0x7F8000) | ONE
                elif j == 1:
                    f = (w & 0xFF00) | ONE
                elif j == 2:
                    f = ((w >> 1) & 0x7F8000) | ONE
                else:
                    f = ((w >> 9) & 0x7F8000) | ONE
                f = f.to(tl.float32, bitcast=True)
                xv = tl.load(xp_ptr + j * KW + k) if EVEN else tl.load(xp_ptr + j * KW + k, mask=k < KW, other=0.0)
                acc += f * xv[None, :]
        first = (tl.program_id(1) == 0).to(tl.float32)  # one split subtracts the offsets
        y = tl.sum(acc, axis=1) - first * tl.load(xs_ptr)  # sum of x' + 128 * sum of x
        y *= tl.load(s_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
        if SPLIT_K == 1:
            tl.store(out_ptr + n, y, mask=n_ok)
        else:
            tl.atomic_add(out_ptr + n, y, mask=n_ok)


def _float_bits_one() -> int:
    return 0x3F800000


def int4_gemv(x, weight, scales_and_zeros, groupsize: int, block_nt: int = 2, ks: Optional[int] = None,
              split_k: int = 1, num_warps: int = 4, num_stages: int = 2):
    """y (1, N) = x (1, K) @ W.T for W in torch's CUDA int4 layout `weight` [N/8, K/(16*ikt), 32, ikt/2] with
    `scales_and_zeros` [K/g, N, 2]. Tunables: block_nt (8 rows each per program), ks (k-tiles per loop step;
    default 64 words per row), split_k (programs along K, summed with atomics), num_warps, num_stages."""
    NT, KO, _, J = weight.shape
    N, ikt, K = NT * 8, 2 * J, x.shape[-1]
    ks = ks or max(1, 32 // ikt)
    xf = x.float().reshape(KO, J, 2, 2, 4, 2)  # (KO, jj, a, b, c, p//4): column 32*jj + 8*(2a+b) + 2*c + p//4
    xp = torch.cat([xf[:, :, :, :1] * 128, xf[:, :, :, 1:] * 2048], dim=3)  # x * 2**(23-bit): even p at 16, odd at 12
    xp = xp.permute(0, 5, 2, 3, 4, 1).contiguous()  # (KO, p//4, a, b, c, jj) = (KO, 8, WORDS), p = 4*(p//4) + 2a + b
    xs = torch.stack([xf.reshape(KO, -1).sum(-1), xp.reshape(KO, -1).sum(-1)], dim=-1)  # (KO, 2)
    even = NT % block_nt == 0 and KO % (ks * split_k) == 0
    out = torch.zeros(N, device=x.device, dtype=torch.float32) if split_k > 1 else x.new_empty(N)
    grid = (triton.cdiv(NT, block_nt), split_k)
    _int4_gemv_kernel[grid](xp, xs, weight, scales_and_zeros, out, N, _float_bits_one(), KO=KO, GROUPSIZE=groupsize,
                            IKT=ikt, BLOCK_NT=block_nt, KS=ks, SPLIT_K=split_k, EVEN=even,
                            num_warps=num_warps, num_stages=num_stages)
    return out.view(1, N).to(x.dtype)


def int8_gemv(x, weight, scales, block_n: int = 16, block_kw: int = 64, split_k: int = 1, num_warps: int = 4,
              num_stages: int = 2):
    """y (1, N) = (x (1, K) @ weight.T) * scales for int8 `weight` (N, K), K a multiple of 4. Tunables: block_n
    (rows per program), block_kw (int32 words = 4 weights per row per loop step), split_k, num_warps, num_stages."""
    N, K = weight.shape
    KW = K // 4
    xf = x.float().reshape(KW, 4)
    xt = xf.t() * 256  # (4, KW): byte j of every word; x * 2**(23-bit), bytes at bit 15 but byte 1 at bit 8
    xp = torch.cat([xt[:1], xt[1:2] * 128, xt[2:]])
    xs = (xp.sum() + 128 * xf.sum()).reshape(1)
    even = N % block_n == 0 and KW % (block_kw * split_k) == 0
    out = torch.zeros(N, device=x.device, dtype=torch.float32) if split_k > 1 else x.new_empty(N)
    grid = (triton.cdiv(N, block_n), split_k)
    _int8_gemv_kernel[grid](xp, xs, weight.view(torch.int32), scales, out, N, _float_bits_one(), KW=KW,
                            BLOCK_N=block_n, BLOCK_KW=block_kw, SPLIT_K=split_k, EVEN=even,
                            num_warps=num_warps, num_stages=num_stages)
    return out.view(1, N).to(x.dtype)


# ---------------------------------------------------------------------------------------------- quantized modules
class Int8Linear(nn.Module):
    """int8 weight (out, in) and a float scale per output row; the matmul dequantizes on the fly."""

    def __init__(self, in_features, out_features, bias=False, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=dtype, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)
        self.gemv = None  # kwargs for int8_gemv when prepare_for_device enabled it (tunable per module)

    def forward(self, x):
        if self.gemv is not None and x.numel() == x.shape[-1]:  # one row: decode at batch 1
            y = int8_gemv(x.reshape(1, -1), self.weight, self.scales, **self.gemv).view(*x.shape[:-1], -1)
        else:
            y = F.linear(x, self.weight.to(x.dtype)) * self.scales
        return y if self.bias is None else y + self.bias

    def prepare(self, use_triton: bool):
        usable = use_triton and self.weight.is_cuda and self.weight.shape[1] % 4 == 0
        self.gemv = dict(self.gemv or {}) if usable else None


class Int4Linear(nn.Module):
    """int4 groupwise weight, stored packed (out, in_padded/2) uint8 with scales and zeros (out, in_padded/g).

    `prepare` repacks for the device: torch's tensor-core layout on CUDA, its CPU layout on CPU, scales and zeros
    in bfloat16 as both kernels want. Inputs narrower than the padded width are zero-padded on the fly.
    """

    def __init__(self, in_features, out_features, groupsize, bias=False, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.groupsize = in_features, out_features, groupsize
        k = -(-in_features // groupsize) * groupsize
        self.register_buffer("weight", torch.empty(out_features, k // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.empty(out_features, k // groupsize, dtype=dtype, device=device))
        self.register_buffer("zeros", torch.empty(out_features, k // groupsize, dtype=dtype, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)
        self.prepared_for = None  # device type the packed weight is laid out for
        self.gemv = None

    def forward(self, x):
        if self.prepared_for != x.device.type:
            raise RuntimeError(f"this int4 layer is laid out for {self.prepared_for or 'no device yet'}, the input is on "
                               f"{x.device.type}; call quantize.prepare_for_device(model) after moving the model")
        x2 = x.reshape(-1, x.shape[-1])  # (B*S, K)
        if self.padded_in != x2.shape[-1]:
            x2 = F.pad(x2, (0, self.padded_in - x2.shape[-1]))
        if self.gemv is not None and x2.shape[0] == 1:  # decode at batch 1
            y = int4_gemv(x2, self.packed, self.scales_and_zeros, self.groupsize, **self.gemv)
        else:  # torch's kernels in bfloat16: CUDA's takes nothing else, the CPU one is ~30x slower in float32
            mm = torch.ops.aten._weight_int4pack_mm if self.prepared_for == "cuda" else \
                torch.ops.aten._weight_int4pack_mm_for_cpu
            y = mm(x2.to(torch.bfloat16), self.packed, self.groupsize, self.scales_and_zeros).to(x.dtype)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    @torch.no_grad()
    def prepare(self, use_triton: bool):
        """Repack the stored tensors for this device and drop them (a prepared module is for inference only)."""
        if self.prepared_for is not None:
            if self.prepared_for != self.packed.device.type:
                raise RuntimeError(f"this int4 layer was prepared for {self.prepared_for} and then moved; "
                                   f"move the model before prepare_for_device, never after")
            self.gemv = dict(self.gemv or {}) if use_triton and self.prepared_for == "cuda" else None
            return
        device = self.weight.device
        self.padded_in = self.weight.shape[1] * 2  # derived from the tensors: tensor parallel may have sliced them
        sz = torch.stack([self.scales, self.zeros], dim=-1).transpose(0, 1).to(torch.bfloat16).contiguous()  # (K/g, N, 2)
        ikt = inner_k_tiles(self.groupsize)
        if device.type == "cuda":
            packed = torch.ops.aten._convert_weight_to_int4pack(self.weight.contiguous(), ikt)
        elif device.type == "cpu":
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_int4(self.weight), ikt)
        else:
            raise ValueError(f"int4 layers run on CPU and CUDA, not {device.type}; use --mode int8 there")
        del self.weight, self.scales, self.zeros
        self.register_buffer("packed", packed, persistent=False)
        self.register_buffer("scales_and_zeros", sz, persistent=False)
        self.prepared_for = device.type
        self.gemv = dict(self.gemv or {}) if use_triton and device.type == "cuda" else None


class Int8MOEFeedForward(nn.Module):
    """Mixtral's feed-forward with int8 experts (w1, w3: (E, I, D); w2: (E, D, I)) and a scale per expert row
    (w1_scales...: (E, I) or (E, D)); the router stays float. Same routing as model.MOEFeedForward."""

    def __init__(self, config, device=None, dtype=None):
        super().__init__()
        E, D, I = config.num_experts, config.dim, config.intermediate_size
        self.gate = nn.Linear(D, E, bias=False, device=device, dtype=dtype)
        for name, shape in (("w1", (E, I, D)), ("w3", (E, I, D)), ("w2", (E, D, I))):
            self.register_buffer(name, torch.empty(shape, dtype=torch.int8, device=device))
            self.register_buffer(name + "_scales", torch.empty(shape[:2], dtype=dtype, device=device))
        self.top_k = config.num_activated_experts

    def experts(self, name, index, dtype):
        """Dequantized weights of the experts `index` picks (all of them for a slice(None))."""
        return getattr(self, name)[index].to(dtype) * getattr(self, name + "_scales")[index][..., None]

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (T, D)
        weights, experts = torch.topk(F.softmax(self.gate(x).float(), dim=-1), self.top_k, dim=-1)  # (T, A)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
        if x.shape[0] <= 16:  # decode: dequantize only the chosen experts
            w1, w3, w2 = (self.experts(n, experts, x.dtype) for n in ("w1", "w3", "w2"))  # (T, A, I, D), (T, A, D, I)
            h = F.silu(torch.einsum("ti,taoi->tao", x, w1)) * torch.einsum("ti,taoi->tao", x, w3)  # (T, A, I)
            out = torch.einsum("tao,ta->to", torch.einsum("tai,taoi->tao", h, w2), weights)
        else:
            w1, w3, w2 = (self.experts(n, slice(None), x.dtype) for n in ("w1", "w3", "w2"))
            dense = torch.zeros(x.shape[0], w1.shape[0], dtype=x.dtype, device=x.device).scatter(1, experts, weights)
            h = F.silu(torch.einsum("ti,eoi->teo", x, w1)) * torch.einsum("ti,eoi->teo", x, w3)  # (T, E, I)
            out = torch.einsum("teo,te->to", torch.einsum("tei,edi->ted", h, w2), dense)
        return out.reshape(shape)


QUANTIZED = (Int8Linear, Int4Linear, Int8MOEFeedForward)


# ------------------------------------------------------------------------------------------- building and loading
def _set_module(model, name, module):
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def _empty_like_quantized(old, kind, groupsize, config, device):
    """The quantized module for float module `old` with empty tensors (on `device`, meta for loading)."""
    if kind == "int8-experts":
        return Int8MOEFeedForward(config, device=device, dtype=old.w1.dtype)
    bias = old.bias is not None
    if kind == "int8":
        return Int8Linear(old.in_features, old.out_features, bias, device=device, dtype=old.weight.dtype)
    if kind == "int4":
        return Int4Linear(old.in_features, old.out_features, groupsize, bias, device=device, dtype=old.weight.dtype)
    raise ValueError(f"unknown quantized module kind {kind!r} in the checkpoint; it was written by a newer quantize.py")


def apply_quantization(model: Transformer, info: dict) -> Transformer:
    """Swap in empty quantized modules wherever `info` (the checkpoint's "quantization" entry) says, so that
    `load_state_dict(state, assign=True)` takes the quantized tensors as saved. Call it on the meta model."""
    if info.get("format", FORMAT) > FORMAT:
        raise ValueError(f"the checkpoint's quantization format {info['format']} is newer than this quantize.py reads")
    for name, kind in info["quantized"].items():
        old = model.get_submodule(name)
        device = next(iter(old.parameters())).device
        _set_module(model, name, _empty_like_quantized(old, kind, info.get("groupsize"), model.config, device))
    return model


def prepare_for_device(model, use_triton: Optional[bool] = None):
    """After `model.to(device, dtype)` (and tensor-parallel slicing): repack int4 for this device's kernel and turn
    on the Triton GEMVs for single-row inputs on CUDA (use_triton None: whenever triton imports)."""
    use_triton = triton is not None if use_triton is None else use_triton and triton is not None
    for m in model.modules():
        if isinstance(m, (Int8Linear, Int4Linear)):
            m.prepare(use_triton)
    return model


# ----------------------------------------------------------------------------------------------------- quantizing
def _plan(model: Transformer, mode: str, groupsize: int, pad: bool, quantize_output: bool):
    """Decide, for every float weight, what happens to it: {name: kind}, {name: why it stays float}."""
    quantized, skipped = {}, {}
    for name, m in model.named_modules():
        if isinstance(m, QUANTIZED):
            raise ValueError(f"the model is already quantized ({name} is {type(m).__name__}); quantize the float "
                             f"checkpoint (model.pth) instead")
        if isinstance(m, MOEFeedForward):
            quantized[name] = "int8-experts"
        elif isinstance(m, nn.Linear):
            if name.endswith("feed_forward.gate"):
                skipped[name] = "MoE router (tiny, and routing is sensitive)"
            elif name == "output" and not quantize_output:
                skipped[name] = "output head (pass --quantize_output to quantize it)"
            elif mode == "int8":
                quantized[name] = "int8"
            elif m.out_features % 16:
                skipped[name] = f"{m.out_features} outputs: torch's int4 kernels need a multiple of 16 (8 on CUDA)"
            elif m.in_features % groupsize and not pad:
                fits = [g for g in GROUPSIZES if m.in_features % g == 0]
                raise ValueError(f"group size {groupsize} does not divide the {m.in_features} input features of {name}; "
                                 f"use --groupsize {' or '.join(map(str, fits)) or '32'} or pass --pad to zero-pad "
                                 f"inputs to a multiple of {groupsize}")
            else:
                quantized[name] = "int4"
    return quantized, skipped


@torch.no_grad()
def _quantized_module(old, kind, groupsize, config, packed=None, scales=None, zeros=None):
    """A quantized module holding `old`'s weights: round-to-nearest unless GPTQ's packed/scales/zeros are given."""
    new = _empty_like_quantized(old, kind, groupsize, config, device=next(iter(old.parameters())).device)
    if kind == "int8-experts":
        new.gate.weight.copy_(old.gate.weight)
        for n in ("w1", "w3", "w2"):
            qn, s = quantize_int8(getattr(old, n))
            getattr(new, n).copy_(qn)
            getattr(new, n + "_scales").copy_(s)
        return new
    w = old.weight.detach().float()
    if kind == "int8":
        qn, s = quantize_int8(w)
        new.weight.copy_(qn)
        new.scales.copy_(s)
    else:
        if packed is None:
            w = F.pad(w, (0, new.weight.shape[1] * 2 - w.shape[1]))
            scales, zeros = int4_qparams(w, groupsize)
            packed = pack_int4(quantize_int4(w, scales, zeros, groupsize))
        new.weight.copy_(packed)
        new.scales.copy_(scales)
        new.zeros.copy_(zeros)
    if old.bias is not None:
        new.bias.copy_(old.bias)
    return new


class _Progress:
    """One line per step with rate and ETA (no tqdm: not a dependency)."""

    def __init__(self, total: int, what: str, out=sys.stderr):
        self.total, self.what, self.out, self.t0 = total, what, out, time.perf_counter()

    def __call__(self, done: int, note: str = ""):
        dt = time.perf_counter() - self.t0
        rate = done / dt if dt > 0 else float("inf")
        eta = (self.total - done) / rate if rate > 0 else 0.0
        print(f"{self.what} {done}/{self.total}  {rate:.2f}/s  ETA {eta:.0f}s  {note}".rstrip(), file=self.out, flush=True)


def quantize_model(model: Transformer, mode: str, groupsize: int = 128, calibration=None, *, pad: bool = False,
                   quantize_output: bool = False, percdamp: float = 0.01, act_order: bool = False,
                   device=None, verbose: bool = True):
    """Quantize a float model in place: -> (model, info). `calibration` (samples, seq) token ids is needed for
    int4-gptq only. Quantized modules stay where the float ones were, unprepared: call prepare_for_device next."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
    if mode != "int8" and groupsize not in GROUPSIZES:
        raise ValueError(f"group size {groupsize} is not one torch's int4 kernels take; use one of "
                         f"{', '.join(map(str, GROUPSIZES))}")
    if mode == "int4-gptq" and calibration is None:
        raise ValueError("int4-gptq needs calibration token ids (samples, seq)")
    quantized, skipped = _plan(model, mode, groupsize, pad, quantize_output)
    if verbose and skipped:
        print("left in float: " + "; ".join(f"{n} ({why})" for n, why in skipped.items()), file=sys.stderr)
    info = dict(format=FORMAT, mode=mode, groupsize=groupsize if mode != "int8" else None, quantized=quantized,
                skipped=skipped, quantize_output=quantize_output, pad=pad)
    if any(k == "int8-experts" for k in quantized.values()):
        info["experts"] = "int8 per channel"
    gptq_results = {}
    if mode == "int4-gptq":
        gptq_results = gptq_calibrate(model, calibration, [n for n, k in quantized.items() if k == "int4"], groupsize,
                                      percdamp=percdamp, act_order=act_order, device=device, verbose=verbose)
        info["gptq"] = dict(percdamp=percdamp, act_order=act_order, samples=int(calibration.shape[0]),
                            seq_len=int(calibration.shape[1]))
    names = list(quantized)
    blocks = [n.split(".")[:2] for n in names]  # ["layers", "3"]: one progress line per transformer block
    progress = _Progress(len({".".join(b) for b in blocks}), "quantizing blocks") if verbose else None
    for i, name in enumerate(names):
        packed, s, z = gptq_results.get(name, (None, None, None))
        module = _quantized_module(model.get_submodule(name), quantized[name], groupsize, model.config, packed, s, z)
        _set_module(model, name, module)
        if progress and (i + 1 == len(names) or blocks[i + 1] != blocks[i]):
            progress(len({".".join(b) for b in blocks[:i + 1]}), ".".join(blocks[i]))
    return model, info


# ---------------------------------------------------------------------------------------------------------- GPTQ
def gptq_quantize(w, H, groupsize: int, percdamp: float = 0.01, act_order: bool = False, blocksize: int = 128):
    """GPTQ (Frantar et al. 2022) for one linear: w (N, K), H (K, K) = E[x x^T] over calibration inputs ->
    q (N, K) int32 0..15, scales, zeros (N, K/g) in the same int4 format as round-to-nearest.

    Columns are quantized one at a time and each one's error is spread over the columns not yet quantized,
    weighted by the inverse Hessian's Cholesky factor. A group's scale and zero come from its columns as updated
    so far; with act_order (largest Hessian diagonal first) they come from the original weights instead, so
    groups stay contiguous in the stored order.
    """
    W = w.detach().float().clone()
    H = H.detach().float().clone()
    N, K = W.shape
    dead = torch.diag(H) == 0  # inputs that were always zero: any weight works, use zero
    H[dead, dead] = 1
    W[:, dead] = 0
    empty = torch.empty(N, K // groupsize, device=W.device)
    scales, zeros = int4_qparams(W, groupsize) if act_order else (empty, empty.clone())
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(K, device=W.device)
    W, H = W[:, perm], H[perm][:, perm]
    Hinv = _inverse_cholesky(H, percdamp)
    Q = torch.zeros(N, K, dtype=torch.int32, device=W.device)
    blocksize = max(blocksize // groupsize, 1) * groupsize  # whole groups per block
    for i1 in range(0, K, blocksize):
        i2 = min(i1 + blocksize, K)
        W1, Hinv1, Err1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2], torch.zeros(N, i2 - i1, device=W.device)
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            g = col // groupsize
            if not act_order and col % groupsize == 0:
                scales[:, g], zeros[:, g] = (t[:, 0] for t in int4_qparams(W1[:, i:i + groupsize], groupsize))
            s, z = scales[:, g:g + 1], zeros[:, g:g + 1]
            q = quantize_int4(W1[:, i:i + 1], s, z, 1)  # (N, 1)
            Q[:, i1 + i] = q[:, 0]
            err = (W1[:, i] - dequantize_int4(q, s, z, 1)[:, 0]) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return Q[:, torch.argsort(perm)], scales, zeros


def _inverse_cholesky(H, percdamp):
    """Upper Cholesky factor of (H + damp*I)^-1, raising the damping until it is positive definite."""
    eye = torch.eye(H.shape[0], device=H.device)
    damp = percdamp * torch.diag(H).mean()
    for _ in range(6):
        L, bad = torch.linalg.cholesky_ex(H + damp * eye)
        if not bad:
            return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
        damp *= 10
    raise ValueError("the calibration Hessian is not positive definite even with heavy damping; "
                     "give more calibration text or raise --percdamp")


@torch.no_grad()
def gptq_calibrate(model: Transformer, tokens, names, groupsize: int, percdamp: float = 0.01, act_order: bool = False,
                   device=None, batch_size: int = 8, verbose: bool = True) -> dict:
    """Run GPTQ block by block: {linear name: (packed int4, scales, zeros)} for every name in `names`.

    Only one block's inputs live at once. Inside a block the linears go in forward order (wqkv, wo, then w1
    and w3 together, w2): each group's Hessian comes from inputs computed with the already-quantized weights
    before it ("true sequential"), so GPTQ also corrects the error those introduced. The block's outputs, with
    all its weights quantized, become the next block's inputs. The output head (if asked) is last.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    wanted, results = set(names), {}
    c = model.config
    S = tokens.shape[1]
    emb = model.tok_embeddings.weight
    x = F.embedding(tokens.to(emb.device), emb).to(device=device, dtype=torch.float32)  # (samples, S, D): block 0's inputs
    cos, sin = rope_tables(S, c.head_dim, c.rope_base, c.rope_scaling, device)
    rope = (cos[None], sin[None])
    blocks = [(f"layers.{i}", layer) for i, layer in enumerate(model.layers)]
    progress = _Progress(len(blocks) + ("output" in wanted), "GPTQ blocks") if verbose else None
    for i, (prefix, block) in enumerate(blocks):
        home, dtype = block.attention_norm.weight.device, block.attention_norm.weight.dtype
        block_dev = block.to(device=device, dtype=torch.float32)  # in place: this block only, back below
        ffn = ["feed_forward.w1", "feed_forward.w3"]
        for group in (["attention.wqkv"], ["attention.wo"], ffn, ["feed_forward.w2"]):
            group = [n for n in group if f"{prefix}.{n}" in wanted]
            if group:
                H = _hessian(block_dev.get_submodule(group[0]), x, batch_size,
                             lambda b: block_dev(b, rope, None, torch.arange(S, device=device)))
                for n in group:
                    lin = block_dev.get_submodule(n)
                    results[f"{prefix}.{n}"] = _gptq_linear(lin, H, groupsize, percdamp, act_order)
        x = torch.cat([block_dev(b, rope, None, torch.arange(S, device=device)) for b in x.split(batch_size)])
        block.to(device=home, dtype=dtype)
        if progress:
            progress(i + 1, prefix)
    if "output" in wanted:
        if model.output.weight is model.tok_embeddings.weight:  # tied: GPTQ writes into the head, not the embeddings
            model.output.weight = nn.Parameter(model.output.weight.detach().clone())
        home, dtype = model.norm.weight.device, model.norm.weight.dtype
        norm, out = model.norm.to(device=device, dtype=torch.float32), model.output.to(device=device, dtype=torch.float32)
        H = _hessian(out, x, batch_size, lambda b: out(norm(b)))
        results["output"] = _gptq_linear(out, H, groupsize, percdamp, act_order)
        norm.to(device=home, dtype=dtype), out.to(device=home, dtype=dtype)
        if progress:
            progress(len(blocks) + 1, "output")
    return results


def _hessian(linear, x, batch_size, run):
    """E[u u^T] over the inputs u that `linear` sees while `run` processes x in batches."""
    H, count = 0, 0

    def hook(module, inputs):
        nonlocal H, count
        u = inputs[0].reshape(-1, inputs[0].shape[-1]).float()  # (tokens, K)
        H = H + (u.T @ u).double()  # float64 across batches: many tokens add up
        count += u.shape[0]

    handle = linear.register_forward_pre_hook(hook)
    try:
        for b in x.split(batch_size):
            run(b)
    finally:
        handle.remove()
    return (H / count).float()


def _gptq_linear(lin, H, groupsize, percdamp, act_order):
    """GPTQ one linear (padded to whole groups) and write its dequantized weights back, so the forward passes
    that follow see the quantized layer."""
    w = lin.weight.float()
    K = w.shape[1]
    k = -(-K // groupsize) * groupsize
    w, H = F.pad(w, (0, k - K)), F.pad(H, (0, k - K, 0, k - K))
    q, s, z = gptq_quantize(w, H, groupsize, percdamp, act_order)
    lin.weight.copy_(dequantize_int4(q, s, z, groupsize)[:, :K].to(lin.weight))
    return pack_int4(q).cpu(), s.cpu(), z.cpu()


# ------------------------------------------------------------------------------------------- calibration text
# A fixed text every Debian machine has (base-files' /usr/share/common-licenses). scripts/eval_ppl.py evaluates on
# EVAL_FILES; GPTQ calibrates on CALIBRATION_FILES by default: different documents, so nothing overlaps.
LICENSES = Path("/usr/share/common-licenses")
EVAL_FILES = ("GPL-3", "LGPL-2.1", "Apache-2.0", "MPL-2.0")
CALIBRATION_FILES = ("GFDL-1.3", "MPL-1.1", "GPL-2", "Artistic", "CC0-1.0")


def license_text(files) -> str:
    missing = [f for f in files if not (LICENSES / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{LICENSES}/{missing[0]} not found (Debian's base-files provides it); "
                                f"pass --calibration_file with your own text instead")
    return "".join((LICENSES / f).read_text(encoding="utf-8") for f in files)


def calibration_tokens(tokenizer, text: str, samples: int, seq_len: int):
    """Up to `samples` non-overlapping windows of seq_len tokens from `text`: (samples, seq_len) int64."""
    ids = torch.tensor(tokenizer.encode(text, bos=False, special=False), dtype=torch.long)
    n = min(samples, len(ids) // seq_len)
    if n < 1:
        raise ValueError(f"the calibration text has {len(ids)} tokens, fewer than one window of {seq_len}; "
                         f"give a longer --calibration_file or a smaller --seq_len")
    return ids[:n * seq_len].view(n, seq_len)


# -------------------------------------------------------------------------------------------------------- script
def output_path(checkpoint_path: Path, mode: str, groupsize: int) -> Path:
    name = "model_int8.pth" if mode == "int8" else f"model_{mode}.g{groupsize}.pth"
    return checkpoint_path.parent / name


def load_float_model(checkpoint_path: Path):
    """The float model on the CPU in its checkpoint's dtype, refusing a checkpoint that is already quantized."""
    from generate import load_model
    if not checkpoint_path.is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint_path} not found; convert one with convert_hf_checkpoint.py")
    state = torch.load(checkpoint_path, mmap=True, weights_only=True, map_location="cpu")
    if "quantization" in state:
        raise ValueError(f"{checkpoint_path} is already quantized ({state['quantization'].get('mode')}); quantize "
                         f"the float checkpoint (model.pth) instead")
    dtype = state["tok_embeddings.weight"].dtype
    del state
    return load_model(checkpoint_path, "cpu", dtype)


def main(argv=None):
    p = argparse.ArgumentParser(description="Write an int8 or int4 (round-to-nearest or GPTQ) copy of a checkpoint.")
    p.add_argument("--checkpoint_path", type=Path, required=True, help="the float model.pth to quantize")
    p.add_argument("--mode", required=True, choices=MODES, help="int8 per channel, int4 groupwise, or int4 by GPTQ")
    p.add_argument("--groupsize", type=int, default=128, help="int4: input columns per scale/zero (32, 64, 128, 256)")
    p.add_argument("--pad", action="store_true",
                   help="int4: zero-pad input features the group size does not divide (else that is an error)")
    p.add_argument("--quantize_output", action="store_true", help="quantize the output head too")
    p.add_argument("--calibration_file", type=Path,
                   help=f"int4-gptq: text to calibrate on (default: {', '.join(CALIBRATION_FILES)} from {LICENSES})")
    p.add_argument("--samples", type=int, default=32, help="int4-gptq: calibration windows")
    p.add_argument("--seq_len", type=int, default=512, help="int4-gptq: tokens per calibration window")
    p.add_argument("--percdamp", type=float, default=0.01, help="int4-gptq: Hessian damping, fraction of its mean diagonal")
    p.add_argument("--act_order", action="store_true", help="int4-gptq: quantize columns by decreasing Hessian diagonal")
    p.add_argument("--device", default=None, help="int4-gptq: where calibration runs (default cuda if available)")
    args = p.parse_args(argv)
    try:
        model = load_float_model(args.checkpoint_path)
        tokens = None
        if args.mode == "int4-gptq":
            from tokenizer import get_tokenizer
            text = args.calibration_file.read_text(encoding="utf-8") if args.calibration_file else \
                license_text(CALIBRATION_FILES)
            tokens = calibration_tokens(get_tokenizer(args.checkpoint_path.parent), text, args.samples, args.seq_len)
            print(f"calibrating on {tokens.shape[0]} x {tokens.shape[1]} tokens", file=sys.stderr)
        t0 = time.perf_counter()
        model, info = quantize_model(model, args.mode, args.groupsize, tokens, pad=args.pad,
                                     quantize_output=args.quantize_output, percdamp=args.percdamp,
                                     act_order=args.act_order, device=args.device)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    state = model.state_dict()
    if model.config.tie_embeddings and not args.quantize_output:
        state.pop("output.weight", None)  # the loader ties it to the embeddings again
    state["quantization"] = info
    out = output_path(args.checkpoint_path, args.mode, args.groupsize)
    torch.save(state, out)
    size = sum(t.numel() * t.element_size() for t in state.values() if isinstance(t, torch.Tensor))
    print(f"wrote {out} ({size / 1e6:.1f} MB of tensors) in {time.perf_counter() - t0:.1f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
