"""Tensor parallelism: each of N processes keeps 1/N of every layer and the processes sum their partial outputs.

Launch with `torchrun --nproc_per_node=N generate.py ...`. In each layer q/k/v (by heads), w1 and w3 are split
along their outputs (column-parallel) and wo and w2 along their inputs (row-parallel), so attention and the
feed-forward each end in a partial sum that one all-reduce completes: two collectives per layer, nothing between.
Embeddings, norms, the MoE router and the output head stay whole on every rank. Quantized weights are sliced as
they are stored (rows with their scales, columns with their groups), never quantized again.
"""
import os
from dataclasses import replace
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn as nn

from model import Attention, ModelArgs, MOEFeedForward, Transformer


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


def valid_world_sizes(config: ModelArgs, groupsize: Optional[int] = None) -> list:
    """Every process count this model splits over evenly: it must divide the heads, the KV heads and the
    feed-forward width, and for int4 each rank's share of wo's and w2's inputs must be whole groups."""
    totals = [config.n_head, config.n_local_heads, config.intermediate_size]
    per_group = [config.n_head * config.head_dim, config.intermediate_size] if groupsize else []

    def ok(n):
        return all(t % n == 0 for t in totals) and all(t % (n * groupsize) == 0 for t in per_group)
    return [1] + [n for n in range(2, config.n_local_heads + 1) if ok(n)]


def check_tp(config: ModelArgs, world_size: int, groupsize: Optional[int] = None) -> None:
    """Refuse, in one line, a world size that does not split this model evenly."""
    valid = valid_world_sizes(config, groupsize)
    if world_size not in valid:
        int4 = f", int4 groups of {groupsize}" if groupsize else ""
        raise ValueError(f"tensor parallel over {world_size} processes cannot split this model ({config.n_head} heads, "
                         f"{config.n_local_heads} KV heads, feed-forward width {config.intermediate_size}{int4}); "
                         f"use --nproc_per_node {' or '.join(map(str, valid))}")


def apply_tp(model: Transformer, group: Optional[dist.ProcessGroup] = None) -> Transformer:
    """Keep this rank's shard of every layer and add the two all-reduces per layer.

    Call it on the CPU after `load_state_dict(assign=True)` and before `.to(device)`: the shards are views of
    the mmap'd checkpoint (or copies of just the shard), so each rank only ever reads and moves its own part.
    """
    group = group or dist.group.WORLD
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    check_tp(model.config, world_size, _int4_groupsize(model))
    c = model.config
    for layer in model.layers:
        attn, ffn = layer.attention, layer.feed_forward
        q, kv = attn.n_head * attn.head_dim, attn.n_kv * attn.head_dim
        _split(attn.wqkv, 0, rank, world_size, parts=[q, kv, kv])
        _split(attn.wo, 1, rank, world_size)
        attn.n_head, attn.n_kv = attn.n_head // world_size, attn.n_kv // world_size
        if isinstance(ffn, MOEFeedForward):  # experts split along their hidden width, the router stays whole
            _split(ffn, 1, rank, world_size, names=("w1", "w3"))  # (E, I/N, D)
            _split(ffn, 2, rank, world_size, names=("w2",))  # (E, D, I/N)
        else:
            _split(ffn.w1, 0, rank, world_size)
            _split(ffn.w3, 0, rank, world_size)
            _split(ffn.w2, 1, rank, world_size)
        for module in (attn, ffn):
            module.register_forward_hook(_all_reduce_hook(group))
    # setup_caches reads the KV head count from the config: give this model a copy that says this rank's share
    model.config = replace(c, n_head=c.n_head // world_size, n_local_heads=c.n_local_heads // world_size,
                           intermediate_size=c.intermediate_size // world_size)
    return model


def _all_reduce_hook(group):
    """A forward hook that sums the ranks' partial outputs; a functional collective, so torch.compile keeps it
    inside the graph (and inside the CUDA graph) instead of breaking there."""
    def hook(module, inputs, output):
        return funcol.all_reduce(output, "sum", group)
    return hook


# How each stored tensor of a (possibly quantized) linear maps onto its [out, in] weight: the dim that runs over
# output features and the dim that runs over input features (None: it has none), and how many input features
# one index along that dim stands for (int4 packs two per byte; scales/zeros hold one per group).
def _layout(module, name, tensor):
    if name in ("scales", "zeros", "scales_and_zeros") and tensor.dim() >= 2:  # per-group: (out, in / groupsize)
        return 0, 1
    if name in ("bias", "scales", "zeros"):  # per output row
        return 0, None
    return 0, 1  # weight, int8 or int4-packed: (out, in or in/2)


def _split(module, dim, rank, world_size, parts=None, names=None):
    """Keep this rank's slice of each tensor of `module` along weight dim `dim` (0 = outputs, 1 = inputs).

    `parts` splits a packed projection first (wqkv is q rows, then k rows, then v rows) so each rank gets its
    own heads of each; `names` picks plain parameters (MoE experts) whose `dim` is given directly.
    """
    if names is not None:
        for name in names:
            _set(module, name, _narrow(getattr(module, name), dim, rank, world_size))
        return
    for name, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
        out_dim, in_dim = _layout(module, name, t)
        d = out_dim if dim == 0 else in_dim
        if d is None:
            continue  # a per-output tensor of a row-parallel layer is whole on every rank
        if name == "bias" and dim == 1:
            raise ValueError("a row-parallel layer with a bias would add it once per rank; this model has none")
        if parts is not None and d == out_dim:
            scale = t.shape[d] / sum(parts)
            pieces = t.split([int(p * scale) for p in parts], d)
            t = torch.cat([_narrow(p, d, rank, world_size) for p in pieces], d)
        else:
            t = _narrow(t, d, rank, world_size)
        _set(module, name, t)
    if isinstance(module, nn.Linear) or hasattr(module, "in_features"):
        attr = "out_features" if dim == 0 else "in_features"
        setattr(module, attr, getattr(module, attr) // world_size)


def _narrow(t, dim, rank, world_size):
    """This rank's contiguous 1/N of `t` along `dim`: a view when the slice is contiguous (dim 0), else a copy
    of the slice alone."""
    n = t.shape[dim] // world_size
    return t.narrow(dim, rank * n, n).contiguous()


def _set(module, name, t):
    old = getattr(module, name)
    if isinstance(old, nn.Parameter):
        setattr(module, name, nn.Parameter(t, requires_grad=old.requires_grad))
    else:
        module._buffers[name] = t


def _int4_groupsize(model) -> Optional[int]:
    for m in model.modules():
        if getattr(m, "groupsize", None):
            return m.groupsize
    return None
