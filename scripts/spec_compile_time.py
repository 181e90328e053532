"""How long the first speculative run takes to compile with a draft model: the whole step as one graph, or the
draft model's step and the verify compiled apart (what generate.py does). Kept as the record behind
generate.compile_spec_steps' choice.

    python scripts/spec_compile_time.py --whole          # one graph: k draft forwards unrolled before the verify
    python scripts/spec_compile_time.py                  # apart: one draft step (two shapes) and the verify
"""
import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import generate as gen  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint_path", default=None, help="target (default: the embedded SmolLM2); a copy drafts")
    p.add_argument("--speculate_k", type=int, default=5)
    p.add_argument("--whole", action="store_true", help="compile proposal and verify as one graph")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model = gen.load_model(gen.resolve_checkpoint(args.checkpoint_path), args.device, dtype)
    draft = copy.deepcopy(model)
    drafter = gen.ModelDrafter(draft) if args.whole else gen.compiled_model_drafter(draft, args.device)
    pre, spec_step = gen.compile_spec_steps(args.device, False, whole=args.whole)
    t = time.perf_counter()
    out = gen.speculative_generate(model, drafter, [[1, 2, 3, 4]], 12, gen.Sampling(), args.speculate_k,
                                   step_fn=spec_step, max_seq_length=64)[0]
    gen.synchronize(args.device)
    print(f"{'one graph' if args.whole else 'draft step and verify apart'}, k={args.speculate_k}, {args.device}: "
          f"first run (compiles included) {time.perf_counter() - t:.1f} s; tokens {out}")


if __name__ == "__main__":
    main()
