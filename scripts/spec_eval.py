"""Speculative decoding on the dev prompts: acceptance, speed and greedy equality with the target alone, per category.

    python scripts/spec_eval.py --draft_checkpoint_path checkpoints/SmolLM2-135M-Instruct/model_int4.g64.pth
    python scripts/spec_eval.py --mtp                                   # the MTP head beside the target
    python scripts/spec_eval.py --device cuda --compile --draft_checkpoint_path ... --speculate_k 5

Each prompt (chat template applied) runs twice: the target alone (generate()) and the target with the drafter
(speculative_generate()), with one cache length for both. It prints a line per prompt as it goes, then, for every
prompt whose speculative text differs from the target's, the target's top-2 logits at the first difference (under
bf16 on the GPU, verifying k+1 tokens runs other matmul shapes than one-token decode and can flip a near-tie; a
gap beyond bf16 rounding there is a bug), then the measured cost of one decode step of the target alone and of
one speculative step (proposal + verify) with the speed-up they predict, and last a table per category (speed-up:
all tokens over all time; median: the median over prompts of the per-prompt speed-up). `--recheck run.json`
recomputes the near-tie report of an earlier run with this machine's model (say a GPU run in float32 on the CPU).
The dev prompts are for evaluation only: never train on them.
"""
import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench import time_steps  # noqa: E402  (scripts/, beside this file)
from generate import (Sampling, check_device, check_draft_tree, compile_steps, decode_one_token, generate,  # noqa: E402
                      load_model, load_speculation, parse_args as generate_args, prefill, resolve_checkpoint,
                      spec_extra_slots, speculates, speculative_generate, synchronize)

DEV_PROMPTS = ROOT.parent / "shared/prompts/dev.jsonl"


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def timed_run(fn, device):
    """fn(callback) -> ids; returns (ids, seconds from the first token to the end). The first token comes out of
    prefill, so the rate (len(ids) - 1) / seconds is the decode rate, as generate.py reports it."""
    first = {}

    def on_token(token):  # the token is on the host already: no sync, which would wait for the step queued after it
        first.setdefault("t", time.perf_counter())

    ids = fn(on_token)
    synchronize(device)
    return ids, time.perf_counter() - first["t"]


def run_pair(model, ids, args, s, steps, spec, L, device, seed, n_new):
    """The target alone, then speculative, on one prompt: (ref ids, ref seconds, spec ids, spec seconds, accepted)."""
    torch.manual_seed(seed)
    ref, t_ref = timed_run(lambda cb: generate(
        model, [ids], n_new, s, stop_ids=args.eos_ids, callback=cb, prefill_fn=steps[0], decode_fn=steps[1],
        max_seq_length=L)[0], device)
    accepted = []
    torch.manual_seed(seed)
    out, t_spec = timed_run(lambda cb: speculative_generate(
        model, spec.drafter, [ids], n_new, s, spec.k, stop_ids=args.eos_ids, callback=cb, prefill_fn=spec.prefill_fn,
        step_fn=spec.step_fn, max_seq_length=L, accepted=accepted)[0], device)
    return ref, t_ref, out, t_spec, accepted


def median_speedup(results: list) -> float:
    """Median over prompts of (speculative decode rate / target decode rate): robust to the odd prompt that pays
    for a recompilation, which the all-tokens-over-all-time rate is not."""
    ratios = [((len(r["out"]) - 1) / r["t_spec"]) / ((len(r["ref"]) - 1) / r["t_ref"])
              for r in results if len(r["out"]) > 1 and len(r["ref"]) > 1]
    return statistics.median(ratios) if ratios else float("nan")


def position_acceptance(accepted: list, k: int) -> list:
    """Per draft position i = 1..k: the fraction of the steps that reached position i which accepted draft i."""
    reached = [sum(n >= i - 1 for n in accepted) for i in range(1, k + 1)]
    return [sum(n >= i for n in accepted) / r if r else float("nan") for i, r in zip(range(1, k + 1), reached)]


def bf16_ulp(x: float) -> float:
    """The spacing of bfloat16 numbers (8 significant bits) around x."""
    return 2.0 ** (math.floor(math.log2(abs(x))) - 7) if x else 2.0 ** -133


@torch.no_grad()
def near_tie(model, ids, ref, out):
    """The target's top-2 logits at the first position where the speculative ids leave the target's own."""
    j = next((i for i, (a, b) in enumerate(zip(ref, out)) if a != b), min(len(ref), len(out)))
    if j == min(len(ref), len(out)):
        return f"one stops early at token {j} (lengths {len(ref)} and {len(out)})"
    device = model.norm.weight.device
    logits = model(torch.tensor([ids + ref[:j]], device=device))[0, -1].float()  # a plain causal forward, no cache
    top = logits.topk(2)
    (v1, v2), (i1, i2) = top.values.tolist(), top.indices.tolist()
    gap, ulp = v1 - v2, bf16_ulp(v1)
    return (f"first difference at new token {j}: target alone chose {ref[j]}, speculative {out[j]}; the target's "
            f"top-2 logits {v1:.4f} (id {i1}) and {v2:.4f} (id {i2}), gap {gap:.4f} = {gap / ulp:.2f} bf16 ulp at "
            f"that size ({ulp:.4g})")


def spec_state(model, k: int, pos: int) -> tuple:
    """A speculative step's state as generate.py's loop passes it to spec_step (x, n, token, hidden, input_pos):
    k drafts verified at cache positions pos..pos+k, none accepted."""
    device, i64 = model.norm.weight.device, dict(dtype=torch.long, device=model.norm.weight.device)
    return (torch.ones(1, k + 1, **i64), torch.zeros((), **i64), torch.ones((), **i64),
            torch.zeros(1, k + 1, model.config.dim, device=device, dtype=model.norm.weight.dtype),
            torch.arange(pos, pos + k + 1, **i64))


@torch.no_grad()
def step_costs(model, spec, steps, L, s, device, reps):
    """Seconds per call of one target decode step and of one speculative step (the drafter's catch-up, k drafts
    and the verify of k+1 tokens), at a cache position half way along, each called as both loops call it: queued
    back to back, one sync at the end (median of five batches of `reps` calls)."""
    pos = L // 2

    def per_call(fn):
        return time_steps(fn, device, n=reps, warmup=1, batches=5)

    one, at = torch.ones(1, 1, dtype=torch.long, device=device), torch.tensor([pos], device=device)
    state = spec_state(model, spec.k, pos)
    c_target = per_call(lambda: steps[1](model, one, at, None, s))
    c_step = per_call(lambda: spec.step_fn(model, spec.drafter, *state, s))
    return c_target, c_step


def recheck(path: Path, model, tokenizer):
    """The near-tie report of an earlier greedy run, recomputed with this model: in float32 it shows how close the
    top-2 logits really were where a bf16 run left the target's own text."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; pass the --json file of an earlier greedy run")
    results = json.loads(path.read_text())
    differ = [(i, r) for i, r in enumerate(results) if not r["equal"]]
    dtype = model.norm.weight.dtype
    print(f"{len(differ)} of {len(results)} prompts differ in {path}; the target's top-2 logits in {dtype}:")
    for i, r in differ:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True)
        print(f"  #{i} ({r['category']}) {near_tie(model, ids, r['ref'], r['out'])}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint_path", default=None, help="the target model.pth (default: the embedded SmolLM2)")
    p.add_argument("--draft_checkpoint_path", default=None, help="a draft model.pth (e.g. the target quantized)")
    p.add_argument("--mtp", action="store_true", help="draft with the MTP head beside the target instead")
    p.add_argument("--mtp_checkpoint_path", default=None, help="draft with this MTP head instead")
    p.add_argument("--draft_vocab", type=int, default=None, help="MTP: draft over the N most frequent tokens")
    p.add_argument("--draft_tree", default=None, help="MTP: draft a tree, e.g. 2,2,1 (generate.py --draft_tree)")
    p.add_argument("--speculate_k", type=int, default=None, help="drafts per target step (default: 5, or the MTP k)")
    p.add_argument("--prompts", type=Path, default=DEV_PROMPTS, help="JSON lines with category and prompt")
    p.add_argument("--categories", default=None, help="comma-separated categories to run (default: all)")
    p.add_argument("--limit", type=int, default=None, help="at most this many prompts per category")
    p.add_argument("--max_new_tokens", type=int, default=128, help="new tokens per prompt at most")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (and checks equality)")
    p.add_argument("--top_k", type=int, default=None, help="with --temperature > 0")
    p.add_argument("--top_p", type=float, default=1.0, help="with --temperature > 0")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--compile", action="store_true", help="compiled steps (CUDA graphs on the GPU) for both runs")
    p.add_argument("--cost_reps", type=int, default=50, help="repetitions when timing single steps (0: skip)")
    p.add_argument("--seed", type=int, default=1234, help="sampling seed (prompt i uses seed + i for both runs)")
    p.add_argument("--json", type=Path, default=None, help="also write the per-prompt results here")
    p.add_argument("--recheck", type=Path, default=None,
                   help="no run: recompute here (--device, --dtype) the target's top-2 logits at every greedy "
                        "difference in this --json of an earlier run, e.g. a bf16 GPU run in float32 on the CPU")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be at least 1, got {args.limit}")
    for name, least in (("max_new_tokens", 2), ("cost_reps", 0)):  # a rate needs a token after the prefill's
        if getattr(args, name) < least:
            raise ValueError(f"--{name} must be at least {least}, got {getattr(args, name)}")
    if not (speculates(args) or args.recheck):
        raise ValueError("nothing to draft with: pass --draft_checkpoint_path, --mtp or --mtp_checkpoint_path")
    check_draft_tree(args)
    if not args.prompts.is_file():
        raise FileNotFoundError(f"prompts file {args.prompts} not found; pass --prompts")
    check_device(args.device)
    device = args.device
    default_dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    dtype = getattr(torch, args.dtype) if args.dtype else default_dtype
    from tokenizer import get_tokenizer

    checkpoint = resolve_checkpoint(args.checkpoint_path)
    model = load_model(checkpoint, device, dtype)
    tokenizer = get_tokenizer(checkpoint.parent)
    args.eos_ids = tokenizer.eos_ids
    if args.recheck:
        return recheck(args.recheck, model, tokenizer)
    drafting = generate_args([])  # generate.py's defaults for every flag load_speculation reads, then ours
    for name in ("draft_checkpoint_path", "mtp", "mtp_checkpoint_path", "draft_vocab", "draft_tree", "speculate_k",
                 "compile"):
        setattr(drafting, name, getattr(args, name))
    spec = load_speculation(drafting, model, tokenizer, checkpoint.parent, device, dtype)
    steps = compile_steps(device, False) if args.compile else (prefill, decode_one_token)
    s = Sampling(args.temperature, args.top_k, args.top_p)

    rows = [json.loads(line) for line in args.prompts.read_text().splitlines() if line.strip()]
    if args.categories:
        wanted = args.categories.split(",")
        rows = [r for r in rows if r["category"] in wanted]
    if args.limit:
        rows = [r for i, r in enumerate(rows) if sum(q["category"] == r["category"] for q in rows[:i]) < args.limit]
    if not rows:
        raise ValueError(f"no prompts left in {args.prompts}; check --categories/--limit")
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True)
               for r in rows]
    L = max(map(len, prompts)) + args.max_new_tokens + spec_extra_slots(spec.k, spec.tree)  # one length, both runs
    log(f"{len(rows)} prompts, {args.max_new_tokens} new tokens at most, {spec.describe()}, {s}, {dtype}, {device}"
        f"{', compiled' if args.compile else ''}; warming up")
    run_pair(model, prompts[0], args, s, steps, spec, L, device, args.seed, min(3 * (spec.k + 1), args.max_new_tokens))

    results, t_start = [], time.perf_counter()
    for i, (row, ids) in enumerate(zip(rows, prompts)):
        ref, t_ref, out, t_spec, accepted = run_pair(model, ids, args, s, steps, spec, L, device, args.seed + i,
                                                     args.max_new_tokens)
        results.append(dict(category=row["category"], prompt=row["prompt"], ref=ref, out=out, t_ref=t_ref,
                            t_spec=t_spec, accepted=accepted, equal=ref == out))
        mean = sum(accepted) / max(len(accepted), 1)
        done, spent = i + 1, time.perf_counter() - t_start
        log(f"[{done:2d}/{len(rows)}] {row['category']:8s} {len(ref):4d} tokens  target {(len(ref) - 1) / t_ref:7.1f} "
            f"tok/s  speculative {(len(out) - 1) / t_spec:7.1f} tok/s  accepted {mean:.2f}/{spec.k}"
            f"{'' if s.temperature > 0 else '  equal' if ref == out else '  DIFFERS'}  "
            f"ETA {spent / done * (len(rows) - done):.0f} s")

    if s.temperature == 0:
        differ = [(i, r) for i, r in enumerate(results) if not r["equal"]]
        print(f"\ngreedy equality: {len(results) - len(differ)} of {len(results)} prompts identical")
        for i, r in differ:
            print(f"  #{i} ({r['category']}) {r['prompt'][:60]!r}: {near_tie(model, prompts[i], r['ref'], r['out'])}")

    all_accepted = [n for r in results for n in r["accepted"]]
    tok_step = 1 + sum(all_accepted) / len(all_accepted)
    if args.cost_reps:
        c_t, c_s = step_costs(model, spec, steps, L, s, device, args.cost_reps)
        ref_rate = sum(len(r["ref"]) - 1 for r in results) / sum(r["t_ref"] for r in results)
        spec_rate = sum(len(r["out"]) - 1 for r in results) / sum(r["t_spec"] for r in results)
        print(f"\nstep costs: target decode {c_t * 1e3:.3f} ms, speculative step ({spec.describe()}) "
              f"{c_s * 1e3:.3f} ms ({c_s / c_t:.2f}x)")
        print(f"predicted speed-up E[tokens/step] / c_step * c_target = {tok_step:.2f} / {c_s / c_t:.2f} = "
              f"{tok_step * c_t / c_s:.2f}x; measured {spec_rate / ref_rate:.2f}x")
        per_step = sum(r["t_spec"] for r in results) / len(all_accepted)
        print(f"measured time per target step {per_step * 1e3:.3f} ms = c_step + {(per_step - c_s) * 1e3:.3f} ms "
              f"(host work the device did not overlap, and each answer's one step queued past its end)")

    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    cats = list(dict.fromkeys(r["category"] for r in results)) + ["all"]
    head = (f"{'category':10s} {'prompts':>7s} {'steps':>6s} {'drafts/step':>11s} {'tok/step':>8s} "
            + " ".join(f"{f'acc@{i}':>6s}" for i in range(1, spec.k + 1))
            + f" {'target tok/s':>12s} {'spec tok/s':>10s} {'speed-up':>8s} {'median':>7s} {'equal':>7s}")
    print("\n" + head + "\n" + "-" * len(head))
    for c in cats:
        rs = [r for r in results if c in ("all", r["category"])]
        acc = [n for r in rs for n in r["accepted"]]
        ref_rate = sum(len(r["ref"]) - 1 for r in rs) / sum(r["t_ref"] for r in rs)
        spec_rate = sum(len(r["out"]) - 1 for r in rs) / sum(r["t_spec"] for r in rs)
        equal = f"{sum(r['equal'] for r in rs)}/{len(rs)}" if s.temperature == 0 else "-"
        median = median_speedup(rs)
        print(f"{c:10s} {len(rs):7d} {len(acc):6d} {sum(acc) / len(acc):11.2f} {1 + sum(acc) / len(acc):8.2f} "
              + " ".join(f"{a:6.2f}" for a in position_acceptance(acc, spec.k))
              + f" {ref_rate:12.1f} {spec_rate:10.1f} {spec_rate / ref_rate:7.2f}x {median:6.2f}x {equal:>7s}")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
