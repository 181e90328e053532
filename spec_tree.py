"""Draft trees: the drafter proposes its b most likely tokens at each depth instead of one, and the target verifies
every branch in one forward, each draft attending only to the drafts before it on its own branch.

A tree is its branching (b_1, ..., b_K), e.g. (2, 2, 1): the root (the token the target chose last) has b_1
children, the drafter's b_1 most likely next tokens; each of those has b_2 children, and so on down to depth K.
Nodes are numbered level by level, the root 0. In a verify node j sits at cache slot root + j and RoPE position
root + depth[j], and sees every slot before the root and the slots of its own ancestors and itself (`visible`);
model.py's `tree_inputs` turns that into the attention mask.

The target then picks its own next token after every node at once: the argmax, or a sample from its distribution
there. Walking down from the root, the child whose token is the target's pick is accepted and the walk goes on from
it; the first node with no such child emits the target's pick and the step ends (`walk`). Sampling first and then
looking for the sample among the children is lossless whatever the drafts are: every token that comes out is a
sample of the target given the text before it, and the drafts only decide how many come out of one forward.
Rejection sampling against the drafter's q, as the chain does, is needed only where the drafts are samples.

After the walk, generate.py's `tree_step` moves the accepted nodes' keys and values to the slots right after the
root, and hands on the state of a chain step that accepted the same tokens, so nothing downstream tells the two
apart. The tree's own numbers (offline, session 58): on the dev prompts the shipped head's chain of 3 drafts
accepts 2.34 tokens a step, (2, 2, 1) 2.71 (BENCHMARKS.md). (Not named tree.py: torch.compile does not trace into
a module of that name, dm-tree's.)
"""
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DraftTree:
    branching: tuple  # (b_1, ..., b_K): children per node at each depth, the drafter's top-b tokens

    def __post_init__(self):
        if not self.branching or any(int(b) != b or b < 1 for b in self.branching):
            raise ValueError(f"a draft tree's branching is one or more counts of at least 1, got {self.branching}; "
                             f"e.g. --draft_tree 2,2,1")

    @property
    def depth(self) -> int:
        return len(self.branching)

    @property
    def widths(self) -> list:
        """Nodes at each depth 0..K (the root alone at depth 0)."""
        w = [1]
        for b in self.branching:
            w.append(w[-1] * b)
        return w

    @property
    def size(self) -> int:
        """Nodes including the root: the positions one verify feeds the target."""
        return sum(self.widths)

    def level(self, d: int) -> range:
        """The node numbers at depth d."""
        start = sum(self.widths[:d])
        return range(start, start + self.widths[d])

    def parents(self) -> list:
        """Each node's parent (the root's own is 0): level by level, the children of one parent together."""
        out = [0]
        for d, b in enumerate(self.branching):
            out += [p for p in self.level(d) for _ in range(b)]
        return out

    def tensors(self, device):
        """(depth (N,), visible (N, N) bool: visible[i, j] when j is i or one of its ancestors), N = size. Built
        as Python lists and made on `device` at once, so that a compiled step holds them as constants there: no
        CPU work in the step's CUDA graph."""
        parent = self.parents()
        depth, branch = [0], [{0}]
        for j in range(1, self.size):
            depth.append(depth[parent[j]] + 1)
            branch.append(branch[parent[j]] | {j})
        visible = [[i in b for i in range(self.size)] for b in branch]
        return torch.tensor(depth, device=device), torch.tensor(visible, device=device)


def parse_tree(text: str) -> DraftTree:
    """--draft_tree's "2,2,1" -> DraftTree((2, 2, 1)), or one line saying what is wrong."""
    try:
        return DraftTree(tuple(int(b) for b in text.split(",")))
    except ValueError:
        raise ValueError(f"--draft_tree {text!r}: give the children per node at each depth as counts of at least 1, "
                         f"e.g. 2,2,1 (2 drafts at depth 1, 2 after each of them, 1 after each of those)") from None


def walk(tokens, choice, tree: DraftTree):
    """tokens (N,): the tree's tokens (the root's first); choice (N,): the target's pick after each node ->
    (path (K+1,): the accepted node at each depth, the root past the last one; n (): drafts accepted; the
    target's pick after the last accepted node ()). Siblings are distinct tokens, so at most one child matches."""
    depth, visible = tree.tensors(tokens.device)
    parent = torch.tensor(tree.parents(), device=tokens.device)
    matches = (tokens == choice[parent]) | (depth == 0)  # node j is what the target picked after its parent
    on_path = (matches[None, :] | ~visible).all(-1)  # j and all its ancestors matched
    n = on_path.long().sum() - 1
    at_depth = on_path[None, :] & (depth[None, :] == torch.arange(tree.depth + 1, device=tokens.device)[:, None])
    path = at_depth.long().argmax(-1)  # (K+1,): 0 (the root) where no node of that depth was accepted
    return path, n, choice.index_select(0, path.index_select(0, n.view(1))).squeeze(0)
