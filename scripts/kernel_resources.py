"""Compile gemv.py's Triton kernels (or decode_attention.py's) for a Hopper GPU (sm_90) on any machine, no GPU
needed, and print what each variant takes from an SM: registers a thread (and bytes spilled), shared memory, and how
many of its programs fit on one SM at once.

    python scripts/kernel_resources.py              # Llama-2-7B's widths, the tiles gemv.py ships
    python scripts/kernel_resources.py --K 576      # SmolLM2-135M's
    python scripts/kernel_resources.py --attention  # decode_attention.py's kernels, at the tiles it ships
    python scripts/kernel_resources.py --ops        # and what each inner loop spends its instructions on
    python scripts/kernel_resources.py --loads      # and each kernel's global loads by width (16 bytes a lane?)

A streaming kernel keeps the memory busy only with enough loads in flight, so a variant that needs more registers
or shared memory (the gate-up pair, deeper pipelines) fits fewer programs on an SM: this shows it before any
device time is spent. It must also issue few enough instructions: the last column counts the warp-instructions
of the kernel's inner loop per KB of weights it streams. An SM issues at most 4 a cycle, so an H200 (132 SMs,
1.98 GHz, about 4.2 TB/s) has about 250 per KB to spend at copy speed, all of them, memory instructions
included. The script also fails on a kernel that does not compile for the GPU, in paths the CPU interpreter never
takes (the inline PTX). Triton's compiler and the cuobjdump it ships do the work. The pointers are
declared 16-byte aligned and the sizes multiples of 16, as Triton's launcher specializes them on the GPU: without
that it would not vectorize or pipeline the loads, and the figures would be another kernel's.
"""
import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import decode_attention as A  # noqa: E402
import gemv as G  # noqa: E402

REGISTERS_PER_SM, SHARED_PER_SM, THREADS_PER_SM = 65536, 228 * 1024, 2048  # sm_90
ATTENTION_POINTERS = dict(qkv_ptr="*bf16", cos_ptr="*fp32", sin_ptr="*fp32", rope_pos_ptr="*i64", k_ptr="*bf16",
                          v_ptr="*bf16", mask_ptr="*i64", pos_ptr="*i64", o_ptr="*bf16", acc_ptr="*fp32",
                          ml_ptr="*fp32")


def compile_for(fn, pointers: dict, consts: dict, num_warps: int, num_stages: int = 3, capability: int = 90):
    """fn compiled for sm_<capability>. Arguments not in `pointers` or `consts` are int32 sizes, taken as
    multiples of 16."""
    consts = {k: v for k, v in consts.items() if k in fn.arg_names}
    sig = {a: pointers.get(a, "constexpr" if a in consts else "i32") for a in fn.arg_names}
    aligned = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names) if a not in consts}
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=aligned),
                          target=GPUTarget("cuda", capability, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def compile_sm(fn, pointers: dict, consts: dict, num_warps: int, num_stages: int = 3, capability: int = 90) -> dict:
    """fn compiled for sm_<capability> (Hopper unless told): registers a thread, shared bytes, programs an SM holds
    (by sm_90's limits), and the instructions of its weights' loop (0 if the compiler unrolled it)."""
    k = compile_for(fn, pointers, consts, num_warps, num_stages, capability)
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as d:
        cubin = Path(d) / "k.cubin"
        cubin.write_bytes(k.asm["cubin"])
        usage, sass = (subprocess.run([str(tool), flag, str(cubin)], capture_output=True, text=True, check=True).stdout
                       for flag in ("-res-usage", "-sass"))
    regs, threads = int(re.search(r"REG:(\d+)", usage)[1]), 32 * num_warps
    stack = int(re.search(r"STACK:(\d+)", usage)[1])  # bytes a thread spills to local memory
    fit = min(REGISTERS_PER_SM // (regs * threads), THREADS_PER_SM // threads,
              SHARED_PER_SM // max(k.metadata.shared, 1))
    # a loop is a branch back to an earlier address; sm_90 instructions are 16 bytes each
    branches = re.findall(r"/\*([0-9a-f]+)\*/[^;]*?BRA 0x([0-9a-f]+)", sass)
    loops = [(int(target, 16), int(at, 16)) for at, target in branches if int(target, 16) < int(at, 16)]
    # the weights' loop: the last of the innermost loops (the int8 GEMV's first loop runs over x alone)
    inner = [(a, b) for a, b in loops if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in loops)]
    first, last = max(inner, default=(0, -16))
    loop = (last - first) // 16 + 1
    instructions = re.findall(r"/\*([0-9a-f]+)\*/\s+([^;]*);", sass)  # (address, instruction)
    # the loop's opcodes (predicates and modifiers dropped: IDP.2A.LO.S16.S8 counts as IDP)
    ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", op).split()[0].split(".")[0]
                              for at, op in instructions if first <= int(at, 16) <= last)
    # the global loads by width and cache hint (LDG.E.128: 16 bytes a lane; .EF: evict first), the whole kernel
    loads = collections.Counter(re.search(r"LDG\S*", op)[0] for _, op in instructions if "LDG" in op)
    return dict(regs=regs, stack=stack, shared=k.metadata.shared, programs_per_sm=fit, loop_instructions=loop,
                loop_ops=ops, loads=loads)


def register_layout(fn, pointers: dict, consts: dict, num_warps: int, shape: tuple) -> str:
    """The layout Triton gives fn's float32 tensors of `shape`, compiled for sm_90: how their elements are split
    between a thread's registers, a warp's lanes and the warps, which fixes the order in which a sum over them
    adds up (the float GEMV's (rows, BLOCK_N, BLOCK_K) products)."""
    ir = compile_for(fn, pointers, consts, num_warps).asm["ttgir"]
    layouts = dict(re.findall(r"^(#\w+) = (#ttg\.\w+<.*>)$", ir, re.M))
    used = set(re.findall(r"tensor<{}xf32, (#\w+)>".format("x".join(map(str, shape))), ir))
    return " ".join(sorted(layouts[name] for name in used))


def gemv_sum_layouts(K: int, tile: dict, gate=False, residual=False, norm=False, rows=(1, 2, 4)) -> list:
    """register_layout of the float GEMV's products under `tile` (a gemv.py tile dict) at each count of x's rows
    (rounded up to a power of two, as the kernel does): one layout for all means each row's sums add up in the
    same order whatever the count, so a verify's rows are a decode step's bit for bit."""
    consts = dict(K=K, HAS_BIAS=False, HAS_GATE=gate, HAS_RES=residual, HAS_RMS=norm, EPS=1e-5, PDL=True, CHUNKS=1,
                  **{k: v for k, v in tile.items() if k != "num_warps"})
    pointers = dict.fromkeys(["x_ptr", "w_ptr", "b_ptr", "y_ptr", "g_ptr", "res_ptr"], "*bf16")
    mps = [triton.next_power_of_2(m) for m in rows]
    return [register_layout(G._gemv_kernel, pointers, dict(consts, MP=mp), tile["num_warps"],
                            (mp, tile["BLOCK_N"], tile["BLOCK_K"])) for mp in mps]


def weight_bytes_per_step(pointers: dict, consts: dict) -> float:
    """Bytes of weights one program streams per trip of its loop: BLOCK_N rows of a chunk (BLOCK_W int32 words for
    the int8 and int4 GEMVs, BLOCK_K weights for the float and int8 rows kernels, a group for the int4 one; the
    int4 mma kernel's warps two steps each), twice that with the gate-up pair."""
    if "TPS" in consts:  # the int4 mma kernel: each warp's two steps of TPS tiles of 16 x 64 weights a trip
        return consts["SPLIT"] * 2 * consts["TPS"] * 512 * (2 if consts.get("HAS_GATE") else 1)
    if "BLOCK_W" in consts:  # int32 words
        chunk = consts["BLOCK_W"] * 4
    elif "BLOCK_K" in consts:
        chunk = consts["BLOCK_K"] * {"*bf16": 2, "*i8": 1}[pointers["w_ptr"]]
    else:  # the int4 rows kernel: a group of int4 weights
        chunk = consts["GROUPSIZE"] // 2
    return consts["BLOCK_N"] * chunk * (2 if consts.get("HAS_GATE") else 1)


def variants(K: int):
    """(name, kernel, pointer types, constexprs, num_warps, num_stages) for each kernel variant the model runs,
    with the tiles gemv.py ships for width K."""
    bf16 = dict.fromkeys(["x_ptr", "w_ptr", "s_ptr", "z_ptr", "b_ptr", "y_ptr", "g_ptr", "gs_ptr", "gz_ptr", "res_ptr",
                          "nw_ptr"], "*bf16")
    int8, int4 = dict(bf16, w_ptr="*i8", g_ptr="*i8"), dict(bf16, w_ptr="*u8", g_ptr="*u8", e_ptr="*fp32")
    off = dict(K=K, GROUPSIZE=128, HAS_BIAS=False, HAS_GATE=False, HAS_RES=False, HAS_RMS=False, HAS_NW=False,
               EPS=1e-5, PRECISION="tf32", PDL=True, XQ=False, MP2=0, CHUNKS=1, LOCAL=G.INT8_LOCAL,
               SCALES_AHEAD=G.SCALES_AHEAD)
    gate, res, norm = dict(HAS_GATE=True), dict(HAS_RES=True), dict(HAS_RMS=True)
    rows_cfg = G.ROWS_CONFIG if K >= 4096 else G.SMALL_ROWS_CONFIG
    one, pair = G.gemv_config(K, K), G.gemv_config(K, K, gate=True)
    rows = triton.next_power_of_2(G.FLOAT_GEMV_ROWS)  # a verify's rows through the GEMV, padded as it pads them
    kernels = [("float GEMV", G._gemv_kernel, bf16, dict(one, MP=1), [{}, res, norm]),
               ("float GEMV", G._gemv_kernel, bf16, dict(pair, MP=1), [gate, dict(gate, **norm)]),
               (f"float GEMV x{rows} rows", G._gemv_kernel, bf16, dict(one, MP=rows), [{}]),
               (f"float GEMV x{rows} rows", G._gemv_kernel, bf16, dict(pair, MP=rows), [dict(gate, **norm)]),
               ("int8 GEMV", G._int8_gemv_kernel, int8, G.INT8_CONFIG, [{}, res, norm]),
               ("int8 GEMV", G._int8_gemv_kernel, int8, G.INT8_GATE_CONFIG, [gate, dict(gate, **norm)]),
               ("float rows", G._rows_kernel, bf16, rows_cfg, [{}, gate, res, norm, dict(gate, **norm)]),
               ("int8 rows", G._rows_kernel, int8, G.INT8_ROWS_CONFIG,
                [dict(HAS_SCALE=True), dict(gate, HAS_SCALE=True), dict(gate, HAS_SCALE=True, HAS_NW=True, **norm)]),
               ("int4 GEMV g128", G._int4_kernel, int4, dict(G.int4_config(K), MP=1), [{}, res, norm]),
               ("int4 GEMV g128", G._int4_kernel, int4, dict(G.int4_config(K, gate=True), MP=1),
                [gate, dict(gate, **norm)]),
               ("int4 GEMV g128 wide", G._int4_kernel, int4, dict(G.int4_config(K, N=G.WIDE_N), MP=1), [norm]),
               ("int4 GEMV g128 x6 XQ wide", G._int4_kernel, dict(int4, x_ptr="*i16"),
                dict(G.int4_config(K, rows=6, N=G.WIDE_N), MP=4, MP2=2, XQ=True, PDL=True), [{}]),
               *[(f"int4 GEMV g128 x{m} XQ", G._int4_kernel, dict(int4, x_ptr="*i16"),
                  dict(G.int4_config(K, rows=m), MP=G.xq_blocks(m)[0], MP2=G.xq_blocks(m)[1], XQ=True, PDL=True),
                  [{}, gate]) for m in (4, 6, 8)],
               ("int4 rows g128", G._int4_rows_kernel, int4, dict(G.INT4_ROWS_CONFIG, HI=0x43, OFFSET=128.0),
                [{}, gate, dict(gate, **norm)]),
               *[(f"int4 mma g128 N={n}", G._int4_mma_kernel, dict(int4, w_ptr="*i32", g_ptr="*i32"),
                  dict(G.int4_mma_config(n, K, "HAS_GATE" in extras[0]), SHIFT=136.0), extras)
                 for n, extras in ((3 * K, [norm]), (K, [res]), (2 * K, [dict(gate, **norm)]), (K // 2, [res]))]]
    for name, fn, pointers, cfg, extras in kernels:
        cfg = dict(cfg)
        warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages", 3)
        for extra in extras:
            label = "".join(f" + {n}" for n, f in [("gate", "HAS_GATE"), ("residual", "HAS_RES"), ("norm", "HAS_RMS")]
                            if extra.get(f))
            consts = dict(off, HAS_SCALE=False)
            consts.update(cfg)
            consts.update(extra)
            if fn is G._int4_mma_kernel:  # its PTX, made for the variant
                consts["ASM"] = G.mma_asm(consts["HAS_GATE"], consts["HAS_RMS"])
            yield name + label, fn, pointers, consts, warps, stages


def attention_consts(**changes) -> dict:
    """decode_attention.py's constexprs for Llama-2-7B's decode (128-wide heads, one query head a KV head, one
    query, the causal mask), at the tiles it ships, a merge of 16 chunks (a cache of 4096 at CHUNK = 256)"""
    consts = dict(SCALE=128 ** -0.5, G=1, D=128, R=16, CHUNK=A.CHUNK, BLOCK_L=A.BLOCK_L, PRECISION="tf32",
                  CAUSAL=True, PDL=False, SPLIT=False, LINES=2, N_CHUNKS=16)
    return dict(consts, **changes)


def attention():
    """What decode_attention.py's kernels take from an SM: the attention over one chunk, alone and split (partial
    sums for the merge), and the merge."""
    print(f"{f'(CHUNK, BLOCK_L) = ({A.CHUNK}, {A.BLOCK_L})':<30} {'registers':>9} {'shared B':>9} {'programs/SM':>12}")
    kernels = [("attention, one chunk", A._attention_kernel, False, A.NUM_WARPS, A.NUM_STAGES),
               ("attention, split", A._attention_kernel, True, A.NUM_WARPS, A.NUM_STAGES),
               ("merge of 16 chunks", A._merge_kernel, True, 4, 3)]
    for name, fn, split, warps, stages in kernels:
        r = compile_sm(fn, ATTENTION_POINTERS, attention_consts(SPLIT=split), warps, stages)
        print(f"{name:<30} {r['regs']:>9} {r['shared']:>9} {r['programs_per_sm']:>12}", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--K", type=int, default=4096, help="input features of the weights (a layer's width)")
    p.add_argument("--attention", action="store_true", help="decode_attention.py's kernels instead")
    p.add_argument("--ops", action="store_true", help="also each loop's most frequent opcodes, warp-instructions a KB")
    p.add_argument("--loads", action="store_true", help="also each kernel's global load instructions by width")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("error: TRITON_INTERPRET=1 is set, and the interpreter compiles nothing; unset it")
    if args.attention:
        return attention()
    print(f"{f'kernel, K={args.K}':<30} {'registers':>9} {'spilled B':>9} {'shared B':>9} {'programs/SM':>12} "
          f"{'instr/KB':>9}")
    for name, fn, pointers, consts, warps, stages in variants(args.K):
        r = compile_sm(fn, pointers, consts, warps, stages)
        # the loop is counted in a second build, K wide enough that the compiler keeps it a loop
        loop = compile_sm(fn, pointers, dict(consts, K=1 << 16), warps, stages)
        kb = weight_bytes_per_step(pointers, consts) / 1024
        per_kb = loop["loop_instructions"] * warps / kb
        print(f"{name:<30} {r['regs']:>9} {r['stack']:>9} {r['shared']:>9} {r['programs_per_sm']:>12} {per_kb:>9.0f}",
              flush=True)
        if args.ops:
            print("    " + ", ".join(f"{op} {n * warps / kb:.0f}" for op, n in loop["loop_ops"].most_common(10)))
        if args.loads:
            print("    " + ", ".join(f"{op} {n}" for op, n in sorted(r["loads"].items())))


if __name__ == "__main__":
    main()
