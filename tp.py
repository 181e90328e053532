"""Tensor parallelism: each of N processes keeps 1/N of every layer and the processes sum their partial outputs.

Launch with `torchrun --nproc_per_node=N generate.py ...`. In each layer q/k/v (by heads), w1 and w3 are split
along their outputs (column-parallel) and wo and w2 along their inputs (row-parallel), so attention and the
feed-forward each end in a partial sum that one all-reduce completes: two collectives per layer, nothing between.
Embeddings, norms, the MoE router and the output head stay whole on every rank. Quantized weights are sliced as
they are stored, never quantized again: every tensor of a linear layer, float, int8 or packed int4, keeps output
rows on dim 0 and (when 2-D) input columns on dim 1, in whatever unit its packing uses (int4 bytes hold two
columns, its scales and zeros one group), so one rule slices them all.
"""
import os
import time
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn as nn

from model import ModelArgs, Transformer, TransformerBlock


def maybe_init_dist() -> Optional[int]:
    """Join torchrun's process group (NCCL on CUDA, gloo on CPU) and return this rank; None when run alone."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size < 2 or "RANK" not in os.environ:
        return None
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            dist.init_process_group("nccl", rank=rank, world_size=world_size,
                                    device_id=torch.device("cuda", local_rank))
        else:
            dist.init_process_group("gloo", rank=rank, world_size=world_size)
    return rank


def leave_dist() -> None:
    """Leave the process group at the end of a torchrun job, after its last collective. Gloo's worker threads
    free a finished collective's tensors a moment after the caller moves on, and freeing one Python still knows
    takes the GIL; if the interpreter is already shutting down by then, the process aborts ("terminate called
    without an active exception": 2 of 60 runs of tests/test_tp.py on a 2-core CPU, BENCHMARKS.md; pytorch/pytorch
    PR 179291). Sleeping hands them the GIL first."""
    if dist.is_initialized():
        time.sleep(0.1)
        dist.destroy_process_group()


def valid_world_sizes(config: ModelArgs, groupsize: Optional[int] = None) -> list:
    """Every process count this model splits over evenly: it divides the heads, the KV heads and the
    feed-forward width; with int4 layers each rank's share of wo's and w2's inputs is whole groups, and
    each rank's share of wqkv's, w1's and w3's outputs a multiple of 8 (torch's int4 layout)."""
    c = config
    whole = [c.n_head, c.n_local_heads, c.intermediate_size]
    groups = [c.n_head * c.head_dim, c.intermediate_size] if groupsize else []
    rows8 = [(c.n_head + 2 * c.n_local_heads) * c.head_dim, c.intermediate_size] if groupsize else []

    def ok(n):
        return (all(t % n == 0 for t in whole) and all(t % (n * groupsize) == 0 for t in groups)
                and all(t % (n * 8) == 0 for t in rows8))
    return [1] + [n for n in range(2, c.n_local_heads + 1) if ok(n)]


def check_tp(config: ModelArgs, world_size: int, groupsize: Optional[int] = None) -> None:
    """Refuse, in one line, a world size that does not split this model evenly."""
    valid = valid_world_sizes(config, groupsize)
    if world_size not in valid:
        int4 = f", int4 groups of {groupsize}" if groupsize else ""
        raise ValueError(f"tensor parallel over {world_size} processes cannot split this model ({config.n_head} heads, "
                         f"{config.n_local_heads} KV heads, feed-forward width {config.intermediate_size}{int4}); "
                         f"use --nproc_per_node {' or '.join(map(str, valid))}")


@torch.no_grad()
def apply_tp(model: Transformer, group: Optional[dist.ProcessGroup] = None) -> Transformer:
    """Keep this rank's shard of every layer and add the two all-reduces per layer.

    Call it on the CPU after `load_state_dict(assign=True)` and before `.to(device)` and
    `quantize.prepare_for_device`: a shard of rows is a view of the mmap'd checkpoint and a shard of columns a
    copy of just that shard, so each rank only ever reads and moves its own part. `model.config` keeps
    describing the whole model; each Attention's n_head/n_kv say this rank's share.
    """
    group = group or dist.group.WORLD
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    groupsize = next((m.groupsize for m in model.modules() if getattr(m, "groupsize", None)), None)  # int4
    check_tp(model.config, world_size, groupsize)
    for block in model.layers:
        shard_block(block, rank, world_size, group)
    return model


def own_storage(model: Transformer) -> Transformer:
    """Copy every shard that is a view into the checkpoint at an offset (row shards, after any rank's first) into
    storage of its own, for a model that runs on the CPU: inductor's freezing with max-autotune (how
    generate.compile_step compiles on the CPU) computed such a weight's matmul wrong in torch 2.13, and every rank
    but the first then gave garbage. On a GPU, `.to(device)` has already made each shard its own copy."""
    for module in model.modules():
        for name, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if t.device.type == "cpu" and t.storage_offset():
                _set(module, name, t.clone())
    return model


def shard_block(block: TransformerBlock, rank: int, world_size: int, group) -> None:
    """Split one TransformerBlock in place: q/k/v by heads, the feed-forward by its hidden width."""
    attn, ffn = block.attention, block.feed_forward
    q, kv = attn.n_head * attn.head_dim, attn.n_kv * attn.head_dim
    _split_linear(attn.wqkv, 0, rank, world_size, parts=[q, kv, kv])  # rows: this rank's q heads, then k, then v
    _split_linear(attn.wo, 1, rank, world_size)
    attn.n_head, attn.n_kv = attn.n_head // world_size, attn.n_kv // world_size
    if hasattr(ffn, "gate"):  # MoE, float or int8: experts split along their hidden width I, the router whole
        for name in ("w1", "w3", "w1_scales", "w3_scales"):  # (E, I, D) and scales (E, I) -> I/N
            if hasattr(ffn, name):
                _set(ffn, name, _narrow(getattr(ffn, name), 1, rank, world_size))
        _set(ffn, "w2", _narrow(ffn.w2, 2, rank, world_size))  # (E, D, I) -> (E, D, I/N); its scales are per D
    else:
        _split_linear(ffn.w1, 0, rank, world_size)
        _split_linear(ffn.w3, 0, rank, world_size)
        _split_linear(ffn.w2, 1, rank, world_size)
    for module in (attn, ffn):
        module.register_forward_hook(_all_reduce_hook(group))


def _all_reduce_hook(group):
    """A forward hook that sums the ranks' partial outputs; a functional collective, so torch.compile keeps it
    inside the graph (and inside the CUDA graph) instead of breaking there."""
    def hook(module, inputs, output):
        return funcol.all_reduce(output, "sum", group)
    return hook


def _split_linear(module, dim, rank, world_size, parts=None):
    """Keep this rank's 1/N of a linear layer (nn.Linear, Int8Linear or Int4Linear) along dim 0 (outputs: every
    tensor) or dim 1 (inputs: the 2-D tensors; a per-output scale stays whole). `parts` splits packed rows
    first (wqkv: q, then k, then v) so each rank gets its own heads of each."""
    if getattr(module, "prepared_for", None):
        raise ValueError("the int4 weights are already repacked for a device; call tp.apply_tp before "
                         "quantize.prepare_for_device")
    for name, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
        if dim == 1 and t.dim() == 1:
            if name == "bias":
                raise ValueError(f"{type(module).__name__} has a bias, which a row-parallel split would add once "
                                 f"per rank")
            continue
        if parts is not None:
            t = torch.cat([_narrow(p, dim, rank, world_size) for p in t.split(parts, dim)], dim)
        else:
            t = _narrow(t, dim, rank, world_size)
        _set(module, name, t)
    attr = "out_features" if dim == 0 else "in_features"
    setattr(module, attr, getattr(module, attr) // world_size)


def _narrow(t, dim, rank, world_size):
    """This rank's contiguous 1/N of `t` along `dim`: a view when that is contiguous (dim 0), else a copy of
    the slice alone."""
    n = t.shape[dim] // world_size
    return t.narrow(dim, rank * n, n).contiguous()


def _set(module, name, t):
    old = getattr(module, name)
    if isinstance(old, nn.Parameter):
        setattr(module, name, nn.Parameter(t, requires_grad=old.requires_grad))
    else:
        module._buffers[name] = t
