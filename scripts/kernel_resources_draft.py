"""Compile gemv.py kernels for sm_90 on the CPU (no GPU needed) and print registers, spills, shared memory."""
import os, re, subprocess, sys, tempfile
sys.path.insert(0, os.getcwd())
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import gemv

BIN = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin")

def build(fn, ptrs, ints, consts, num_warps=4, num_stages=3):
    sig = {**{p: t for p, t in ptrs.items()}, **{i: "i32" for i in ints}, **{c: "constexpr" for c in consts}}
    sig = {a: sig[a] for a in fn.arg_names}
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": num_warps, "num_stages": num_stages})
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(k.asm["cubin"])
    res = subprocess.run([f"{BIN}/cuobjdump", "-res-usage", f.name], capture_output=True, text=True).stdout
    sass = subprocess.run([f"{BIN}/cuobjdump", "-sass", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)", res)
    return dict(regs=int(m[1]), stack=int(m[2]), shared=k.metadata.shared, sass_lines=sass.count("/*0"), sass=sass)

def gemv_kernel(dtype="*bf16", **kw):
    c = dict(K=4096, HAS_BIAS=False, HAS_RMS=False, EPS=1e-5, HAS_GATE=False, HAS_RES=False, **gemv.GEMV_CONFIG)
    c.update(kw); nw = c.pop("num_warps")
    return build(gemv._gemv_kernel, {p: dtype for p in ["w_ptr", "x_ptr", "b_ptr", "y_ptr", "g_ptr", "res_ptr"]}, ["N"], c, nw)

def rows_kernel(dtype="*bf16", cfg=None, **kw):
    cfg = dict(cfg or gemv.ROWS_CONFIG)
    ns = cfg.pop("num_stages"); nw = cfg.pop("num_warps")
    c = dict(K=4096, HAS_SCALE=False, HAS_BIAS=False, HAS_RMS=False, EPS=1e-5, HAS_GATE=False, HAS_RES=False,
             PRECISION="tf32", **cfg)
    c.update(kw)
    return build(gemv._rows_kernel, {p: dtype for p in ["x_ptr", "w_ptr", "s_ptr", "b_ptr", "y_ptr", "g_ptr", "gs_ptr", "res_ptr"]},
                 ["M", "N"], c, nw, ns)

if __name__ == "__main__":
    for name, f in [("gemv", gemv_kernel), ("rows", rows_kernel)]:
        for kw in [{}, dict(HAS_RMS=True), dict(HAS_GATE=True), dict(HAS_GATE=True, HAS_RMS=True), dict(HAS_RES=True)]:
            r = f(**kw)
            print(f"{name:5} {str(kw):40} regs {r['regs']:3} stack {r['stack']} shared {r['shared']:6} sass {r['sass_lines']}")
