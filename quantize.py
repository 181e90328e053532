"""Weight-only quantization: int8 per channel, int4 groupwise (round-to-nearest or GPTQ), and the kernels that run it.

    python quantize.py --checkpoint_path checkpoints/SmolLM2-135M-Instruct/model.pth --mode int8
    python quantize.py --checkpoint_path ... --mode int4 --groupsize 64
    python quantize.py --checkpoint_path ... --mode int4-gptq --groupsize 64   # calibrated on a fixed text

The new checkpoint (model_int8.pth, model_int4.g64.pth, model_int4-gptq.g64.pth beside the input) is the same state
dict with quantized tensors plus one entry "quantization" that says which modules hold what, so a loader rebuilds it
without guessing: `apply_quantization` on the meta model, `load_state_dict(assign=True)`, `.to(device, dtype)`,
`prepare_for_device`. The stored format does not depend on the device: int8 weights with one float scale per
output row; int4 values packed two per byte (see pack_int4) with a float scale and zero per group of `groupsize`
input columns, w = (q - 8) * scale + zero (the zero in the float domain, as gpt-fast and torchao do).

Decode at batch 1 reads every weight once per token, so it runs as fast as those bytes stream. `prepare_for_device`
picks each layer's kernel, by default the faster one measured on an H100 (BENCHMARKS.md): int8 on CUDA runs
gemv.py's Triton GEMV for one row (decode; 2462 GB/s alone, 84% of copy), its rows kernel for 2..MAX_ROWS
(speculative verify; 2186 GB/s at 6 rows) and dequantizes into F.linear above that (prefill); on the CPU int8 runs
torch's `_weight_int8pack_mm` in bfloat16 (a dequantizing F.linear decoded no faster than float32 there). int4 on
CUDA runs gemv.py's Triton kernels on the stored layout (one row in integers: 2247 GB/s over Llama-2-7B's layers,
76% of copy, a 7B decoding at 467 tok/s) and dequantizes into F.linear above MAX_ROWS; or, with int4_kernel="torch",
is repacked for torch's `_weight_int4pack_mm` (tinygemm: 1661 GB/s at one row, 365 tok/s; a 7B verify of 4 tokens
2.74 ms through the Triton kernels, 3.43 through tinygemm, of 6 3.77 and 4.21, of 8 4.61 and 5.03; above 8 rows the
Triton path is a tensor-core kernel that tinygemm beats, so generate.py takes tinygemm when it verifies more than 8);
or, with int4_kernel="mma", is shuffled (shuffle_int4) for gemv.py's mma.sync kernel, which verifies up to 8 tokens
at nearly one cost (a 7B verify of 6: 2.34 ms, one-row decode 2.14 ms against the GEMV's 1.81): generate.py's choice
when it verifies 8 tokens or fewer. On the CPU int4 always runs
`_weight_int4pack_mm_for_cpu`. torch's kernels compute in bfloat16 (on the CPU ~30x faster than float32).
Decisions: embeddings, the output head (unless --quantize_output) and the MoE router stay float; MoE experts are
int8 per channel in every mode (an int4 expert would need one kernel call per chosen expert); int4 layers whose
output width is not a multiple of 16 (torch's CPU kernel; CUDA needs 8) stay float and are listed; an input width
that the group size does not divide is refused unless --pad zero-pads it to a multiple of the group size.
"""
import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import MOEFeedForward, Transformer, causal_rope

try:  # our Triton kernels for CUDA decode and verify; without gemv.py or triton, torch's kernels do all the work
    from gemv import MAX_ROWS, int4_gemv, int8_gemv, triton
except ImportError:
    triton = None

MODES = ("int8", "int4", "int4-gptq")
GROUPSIZES = (32, 64, 128, 256)  # what torch's int4 kernels accept
FORMAT = 2  # 2: pack_int4's half-group nibble order (1 put even columns in the high nibble)


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


def pack_int4(q, groupsize: int):
    """(N, K) integers 0..15 -> (N, K/2) uint8. Byte j of each group holds column j in the low nibble and column
    j + groupsize/2 in the high one: the GEMV then reads both halves of x with contiguous loads, no shuffles."""
    N, K = q.shape
    q = q.to(torch.uint8).view(N, K // groupsize, 2, groupsize // 2)  # (N, groups, half, column in half)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(N, K // 2)


def unpack_int4(packed, groupsize: int):
    """(N, K/2) uint8 -> (N, K) int32; the inverse of pack_int4."""
    b = packed.view(packed.shape[0], -1, groupsize // 2)  # (N, groups, half a group)
    return torch.cat([b & 15, b >> 4], dim=-1).reshape(packed.shape[0], -1).to(torch.int32)


# shuffle_int4's nibbles p = 0..7 of a word: (row g or g + 8 of the tile, column c + e)
MMA_NIBBLES = ((0, 0), (1, 0), (0, 2), (1, 2), (0, 1), (1, 1), (0, 3), (1, 3))


def mma_layout_ok(N: int, K: int, groupsize: int) -> bool:
    """Whether shuffle_int4 (and gemv.py's tensor-core kernel) can take W (N, K) at this group size."""
    return N % 16 == 0 and K % 64 == 0 and groupsize % 64 == 0


def shuffle_int4(q: torch.Tensor) -> torch.Tensor:
    """(N, K) integers 0..15 -> (N, K/8) int32 in the order mma.sync's operand fragments sit in a warp's registers
    (gemv.py's _int4_mma_kernel), so that each lane loads its 16 bytes of a 16 x 64 tile with no shuffles. Tiles in
    row-major order, 128 words each; lane l = 4g + t holds words 4l..4l+3, word j the weights of rows g and g + 8
    at columns c..c+3, c = 16t + 4j, nibble p = MMA_NIBBLES[p]: (word >> 4i) & 0x000F000F is then the i-th
    A register, two weights of one row. As many bytes as pack_int4's layout; the (N, K/8) shape only sizes it (row
    r of the words is not W's row r)."""
    N, K = q.shape
    v = q.to(torch.int32).view(N // 16, 2, 8, K // 64, 4, 4, 4)  # (R, h, g, C, t, j, e): row 16R + 8h + g
    v = v.permute(0, 3, 2, 4, 5, 1, 6)  # (R, C, g, t, j, h, e)
    words = torch.zeros(v.shape[:5], dtype=torch.int32, device=q.device)
    for p, (h, e) in enumerate(MMA_NIBBLES):
        words |= v[..., h, e] << (4 * p)  # nibble 7 lands in the sign bit: the bits are what matter
    return words.reshape(N, K // 8)


def unshuffle_int4(words: torch.Tensor) -> torch.Tensor:
    """The inverse of shuffle_int4: (N, K/8) int32 -> (N, K) int32 0..15."""
    N, K = words.shape[0], words.shape[1] * 8
    w = words.reshape(N // 16, K // 64, 8, 4, 4)  # (R, C, g, t, j)
    q = torch.empty(N // 16, K // 64, 8, 4, 4, 2, 4, dtype=torch.int32, device=words.device)  # (..., h, e)
    for p, (h, e) in enumerate(MMA_NIBBLES):
        q[..., h, e] = (w >> (4 * p)) & 15
    return q.permute(0, 5, 2, 1, 3, 4, 6).reshape(N, K)  # (R, h, g, C, t, j, e)


def inner_k_tiles(groupsize: int) -> int:
    """torch's CPU int4 layout packs K in tiles of 16 * inner_k_tiles: 8 whenever the group allows."""
    return min(8, groupsize // 16)


def cuda_inner_k_tiles(k: int) -> int:
    """tinygemm (CUDA) packs K in tiles of 16 * inner_k_tiles, 8 of them for 16-byte loads where K allows."""
    return next(t for t in (8, 4, 2) if k % (16 * t) == 0)


# ---------------------------------------------------------------------------------------------- quantized modules
class Int8Linear(nn.Module):
    """int8 weight (out, in) and a float scale per output row; the matmul dequantizes on the fly (on CUDA in our
    Triton GEMV or F.linear, on the CPU in torch's int8 kernel)."""

    def __init__(self, in_features, out_features, bias=False, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=dtype, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)
        self.register_buffer("unit_scales", None, persistent=False)
        self.use_triton = False  # set by prepare_for_device

    def forward(self, x):
        x2 = x.reshape(-1, x.shape[-1])  # (B*S, K)
        if self.use_triton and x.is_cuda and x2.shape[0] <= MAX_ROWS:  # decode and verify: stream the int8 once
            return int8_gemv(x2.contiguous(), self.weight, self.scales, self.bias).view(*x.shape[:-1], -1)
        if self.unit_scales is not None and not x.is_cuda:  # torch's CPU int8 kernel, where prepare found it fits
            y = torch.ops.aten._weight_int8pack_mm(x2.to(torch.bfloat16).contiguous(), self.weight, self.unit_scales)
            y = (y * self.scales).to(x.dtype).view(*x.shape[:-1], -1)  # scaled first: unscaled, float16 overflows
        else:
            y = F.linear(x, self.weight.to(x.dtype) * self.scales[:, None])
        return y if self.bias is None else y + self.bias

    def prepare(self, kernel: str = "triton"):
        self.use_triton = kernel == "triton" and self.weight.is_cuda and triton is not None
        # On the CPU, torch's int8 kernel: SmolLM2 int8 decode 71 -> 126 tok/s (BENCHMARKS.md). It takes bfloat16
        # activations only, input widths that are multiples of 16 (others crash it in torch 2.13) and a bfloat16
        # scale per row: ones, made here (made inside a compiled graph they fail inductor's lowering), so that
        # the float scales apply afterwards in full precision.
        cpu_kernel = self.weight.device.type == "cpu" and self.weight.shape[1] % 16 == 0
        self.unit_scales = torch.ones(self.weight.shape[0], dtype=torch.bfloat16) if cpu_kernel else None


class Int4Linear(nn.Module):
    """int4 groupwise weight, stored packed (out, in_padded/2) uint8 with scales and zeros (out, in_padded/g).

    `prepare` lays the tensors out for the kernel that will run them: by default torch's packed-int4 matmul on
    either device (`_weight_int4pack_mm`, tinygemm, on CUDA; `_weight_int4pack_mm_for_cpu` on the CPU); or, on
    CUDA with kernel="triton", the stored tensors as they are, for our Triton GEMV (up to MAX_ROWS rows) and
    dequantize-then-F.linear above that; or with kernel="mma" the weight shuffled for gemv.py's tensor-core kernel
    (shuffle_int4: int32 words), where its shape allows (else as "triton").
    """

    def __init__(self, in_features, out_features, groupsize, bias=False, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.groupsize = in_features, out_features, groupsize
        k = -(-in_features // groupsize) * groupsize
        self.register_buffer("weight", torch.empty(out_features, k // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.empty(out_features, k // groupsize, dtype=dtype, device=device))
        self.register_buffer("zeros", torch.empty(out_features, k // groupsize, dtype=dtype, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)
        self.prepared_for = None  # device type the tensors are laid out for
        self.use_triton = False

    def forward(self, x):
        if self.prepared_for != x.device.type:
            raise RuntimeError(f"this int4 layer is laid out for {self.prepared_for or 'no device yet'}, the input is on "
                               f"{x.device.type}; call quantize.prepare_for_device(model) after moving the model")
        x2 = x.reshape(-1, x.shape[-1])  # (B*S, K)
        if self.use_triton:
            if x2.shape[0] <= MAX_ROWS:
                y = int4_gemv(x2.contiguous(), self.weight, self.scales, self.zeros, self.groupsize, self.bias)
                return y.view(*x.shape[:-1], self.out_features)
            q = unshuffle_int4(self.weight) if self.weight.dtype == torch.int32 else unpack_int4(self.weight,
                                                                                                   self.groupsize)
            q = q.view(self.out_features, -1, self.groupsize)
            w = (q.to(x.dtype) - 8) * self.scales[..., None] + self.zeros[..., None]  # (N, K/g, g)
            y = F.linear(x2, w.view(self.out_features, -1)[:, :x2.shape[-1]])
        else:
            if self.padded_in != x2.shape[-1]:
                x2 = F.pad(x2, (0, self.padded_in - x2.shape[-1]))
            mm = torch.ops.aten._weight_int4pack_mm if x.is_cuda else torch.ops.aten._weight_int4pack_mm_for_cpu
            y = mm(x2.to(torch.bfloat16).contiguous(), self.packed, self.groupsize, self.scales_and_zeros).to(x.dtype)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    @torch.no_grad()
    def prepare(self, kernel: str = "torch"):
        """Lay the tensors out for this device's kernel; for torch's, repack and drop the stored ones, for "mma"
        shuffle the weight in place (inference only: save no state_dict after it). Both torch kernels compute in
        bfloat16 (on the CPU ~30x faster than float32), whatever the dtype."""
        device = (self.weight if self.prepared_for is None or self.use_triton else self.packed).device
        if self.prepared_for is not None:
            if self.prepared_for != device.type:
                raise RuntimeError(f"this int4 layer was prepared for {self.prepared_for} and then moved; "
                                   f"move the model before prepare_for_device, never after")
            return
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"int4 layers run on CPU and CUDA, not {device.type}; use --mode int8 there")
        self.prepared_for = device.type
        self.use_triton = kernel in ("triton", "mma") and device.type == "cuda" and triton is not None
        if self.use_triton:  # the kernels index the stored tensors as dense rows (tensor parallel may slice them)
            self.weight, self.scales, self.zeros = (t.contiguous() for t in (self.weight, self.scales, self.zeros))
            if kernel == "mma" and mma_layout_ok(self.weight.shape[0], self.weight.shape[1] * 2, self.groupsize):
                self.weight = shuffle_int4(unpack_int4(self.weight, self.groupsize))
            return
        q = unpack_int4(self.weight, self.groupsize)  # (N, K) 0..15
        self.padded_in = q.shape[1]  # derived from the tensors: tensor parallel may have sliced them
        if device.type == "cpu":
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, inner_k_tiles(self.groupsize))
        else:  # tinygemm reads two columns per byte, the even one in the high nibble
            pairs = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
            packed = torch.ops.aten._convert_weight_to_int4pack(pairs, cuda_inner_k_tiles(q.shape[1]))
        sz = torch.stack([self.scales, self.zeros], dim=-1).transpose(0, 1).to(torch.bfloat16).contiguous()  # (K/g, N, 2)
        del self.weight, self.scales, self.zeros
        self.register_buffer("packed", packed, persistent=False)
        self.register_buffer("scales_and_zeros", sz, persistent=False)


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
    if info.get("format", 1) < 2 and "int4" in info["quantized"].values():
        raise ValueError("this int4 checkpoint packs nibbles in an older order; quantize the float model.pth again")
    for name, kind in info["quantized"].items():
        old = model.get_submodule(name)
        device = next(iter(old.parameters())).device
        _set_module(model, name, _empty_like_quantized(old, kind, info.get("groupsize"), model.config, device))
    return model


def prepare_for_device(model, int8_kernel: str = "triton", int4_kernel: str = "triton"):
    """After `model.to(device, dtype)` (and tensor-parallel slicing): lay the quantized tensors out for their
    kernels. On CUDA int8 runs our Triton GEMV for up to MAX_ROWS rows ("triton") or dequantizes in the matmul
    ("torch"); int4 runs our Triton kernels ("triton", CUDA) or torch's packed-int4 matmul ("torch", both devices;
    the CPU always), or the tensor cores through a shuffled layout ("mma", CUDA; int4 only). The defaults decode
    fastest on an H100; for int4, "mma" verifies 2..8 rows fastest and "torch" 9..16, which is why generate.py asks
    for them when it verifies drafts (BENCHMARKS.md). Without triton installed, torch's are used."""
    for name, kernel, known in (("int8_kernel", int8_kernel, ("torch", "triton")),
                                ("int4_kernel", int4_kernel, ("torch", "triton", "mma"))):
        if kernel not in known:
            raise ValueError(f"{name} must be " + " or ".join(repr(k) for k in known) + f", not {kernel!r}")
    for m in model.modules():
        if isinstance(m, Int8Linear):
            m.prepare(int8_kernel)
        elif isinstance(m, Int4Linear):
            m.prepare(int4_kernel)
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
            packed = pack_int4(quantize_int4(w, scales, zeros, groupsize), groupsize)
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
                   quantize_output: bool = False, percdamp: float = 0.01, act_order: bool = True,
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
def gptq_quantize(w, H, groupsize: int, percdamp: float = 0.01, act_order: bool = True, blocksize: int = 128):
    """GPTQ (Frantar et al. 2022) for one linear: w (N, K), H (K, K) = E[x x^T] over calibration inputs ->
    q (N, K) int32 0..15, scales, zeros (N, K/g) in the same int4 format as round-to-nearest.

    Columns are quantized one at a time and each one's error is spread over the columns not yet quantized,
    weighted by the inverse Hessian's Cholesky factor. With act_order (the default) they go by decreasing Hessian
    diagonal, the busiest inputs first, and each group's scale and zero come from its original weights ("static
    groups"): groups stay contiguous in the stored order, so the kernels need no column index. Without it columns go
    in order, and a group's scale and zero come from its columns as updated so far.
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
def gptq_calibrate(model: Transformer, tokens, names, groupsize: int, percdamp: float = 0.01, act_order: bool = True,
                   device=None, batch_size: int = 8, verbose: bool = True) -> dict:
    """Run GPTQ block by block: {linear name: (packed int4, scales, zeros)} for every name in `names`.

    Only one block's inputs live at once. Inside a block the linears go in forward order (wqkv, wo, then w1
    and w3 together, w2): each group's Hessian comes from inputs computed with the already-quantized weights
    before it ("true sequential"), so GPTQ also corrects the error those introduced. The block's outputs, with
    all its weights quantized, become the next block's inputs. The output head (if asked) is last.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    wanted, results = set(names), {}
    S = tokens.shape[1]
    emb = model.tok_embeddings.weight
    x = F.embedding(tokens.to(emb.device), emb).to(device=device, dtype=torch.float32)  # (samples, S, D): block 0's inputs
    rope = causal_rope(model.config, S, device)
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
    return pack_int4(q, groupsize).cpu(), s.cpu(), z.cpu()


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
    try:
        state = torch.load(checkpoint_path, mmap=True, weights_only=True, map_location="cpu")
    except Exception:  # noqa: BLE001  load_model below says what is wrong with the file
        state = None
    if isinstance(state, dict) and "quantization" in state:
        raise ValueError(f"{checkpoint_path} is already quantized ({state['quantization'].get('mode')}); quantize "
                         f"the float checkpoint (model.pth) instead")
    del state
    return load_model(checkpoint_path, "cpu", dtype=None)  # its own dtype; a file that holds no model fails there


def main(argv=None):
    p = argparse.ArgumentParser(description="Write an int8 or int4 (round-to-nearest or GPTQ) copy of a checkpoint.")
    p.add_argument("--checkpoint_path", type=Path, required=True, help="the float model.pth to quantize")
    p.add_argument("--mode", required=True, choices=MODES, help="int8 per channel, int4 groupwise, or int4 by GPTQ")
    p.add_argument("--groupsize", type=int, help="int4: input columns per scale/zero (32, 64, 128 default, 256)")
    p.add_argument("--pad", action="store_true",
                   help="int4: zero-pad input features the group size does not divide (else that is an error)")
    p.add_argument("--quantize_output", action="store_true", help="quantize the output head too")
    p.add_argument("--calibration_file", type=Path,
                   help=f"int4-gptq: text to calibrate on (default: {', '.join(CALIBRATION_FILES)} from {LICENSES})")
    p.add_argument("--samples", type=int, default=32, help="int4-gptq: calibration windows")
    p.add_argument("--seq_len", type=int, default=512, help="int4-gptq: tokens per calibration window")
    p.add_argument("--percdamp", type=float, default=0.01, help="int4-gptq: Hessian damping, fraction of its mean diagonal")
    p.add_argument("--act_order", action=argparse.BooleanOptionalAction, default=True,
                   help="int4-gptq: quantize columns by decreasing Hessian diagonal, each group's scale and zero from "
                        "its original weights (SmolLM2 g128: +17.5%% perplexity against +25.8%% without)")
    p.add_argument("--device", default=None, help="int4-gptq: where calibration runs (default cuda if available)")
    args = p.parse_args(argv)
    try:
        if args.mode == "int8" and (args.groupsize is not None or args.pad):
            raise ValueError("--groupsize and --pad are for int4 modes; int8 has one scale per output channel")
        gptq_only = [f"--{'no-' if n == 'act_order' else ''}{n}" for n in
                     ("calibration_file", "samples", "seq_len", "percdamp", "act_order", "device")
                     if getattr(args, n) != p.get_default(n)]  # set on the command line
        if args.mode != "int4-gptq" and gptq_only:
            raise ValueError(f"{', '.join(gptq_only)}: for --mode int4-gptq only; drop for --mode {args.mode}")
        if args.calibration_file and not args.calibration_file.is_file():
            raise FileNotFoundError(f"calibration file {args.calibration_file} not found; pass a text file")
        if args.groupsize is None:
            args.groupsize = 128
        for name in ("samples", "seq_len"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(args, name)}")
        if args.device is not None:
            from generate import check_device
            check_device(args.device)
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
