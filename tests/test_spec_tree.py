"""Draft trees (spec_tree.py): the layout, the walk, the target's tree verify against plain forwards, the MTP head's
tree against its chain, and the whole loop: greedy text identical to the target alone, sampling from the target's
distribution, one compiled graph."""
import pytest
import torch

import generate as gen
import mtp
from conftest import tiny
from generate import generate, speculative_generate
from test_mtp import GREEDY, WARM, mtp_loop_pvalue, sharp_and_trained, tiny_head  # noqa: F401, F811 (a fixture)
from spec_tree import DraftTree, parse_tree, walk

TREES = [(1, 1, 1), (2, 2, 1), (3, 1), (1, 2, 2, 1)]


def test_layout_numbers_nodes_level_by_level():
    t = DraftTree((2, 2, 1))
    assert (t.depth, t.widths, t.size) == (3, [1, 2, 4, 4], 11)
    assert t.parents() == [0, 0, 0, 1, 1, 2, 2, 3, 4, 5, 6]
    depth, visible = t.tensors("cpu")
    assert depth.tolist() == [0, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3]
    assert torch.nonzero(visible[9]).flatten().tolist() == [0, 2, 5, 9]  # the root, its branch, itself
    assert visible.sum(1).tolist() == [d + 1 for d in depth.tolist()]


@pytest.mark.parametrize("text", ["", "2,0", "2,x", "1.5"])
def test_a_bad_branching_is_one_clear_error(text):
    with pytest.raises(ValueError, match="--draft_tree"):
        parse_tree(text)


def test_walk_follows_the_targets_picks():
    t = DraftTree((2, 2, 1))
    tokens = torch.tensor([50, 10, 11, 20, 21, 22, 23, 30, 31, 32, 33])  # the root, then level by level
    choice = torch.full((11,), 99)
    path, n, token = walk(tokens, choice, t)  # nothing matches: the target's pick after the root
    assert (n.item(), token.item(), path.tolist()) == (0, 99, [0, 0, 0, 0])
    choice[0], choice[2] = 11, 23  # the second child of the root, then its second child, then not its child
    path, n, token = walk(tokens, choice, t)
    assert (n.item(), token.item(), path.tolist()) == (2, 99, [0, 2, 6, 0])
    choice[6] = 33
    path, n, token = walk(tokens, choice, t)
    assert (n.item(), token.item(), path.tolist()) == (3, 99, [0, 2, 6, 10])
    choice[1], choice[3] = 20, 30  # a matching node off the accepted branch is not accepted
    assert walk(tokens, choice, t)[1].item() == 3


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@torch.no_grad()
def test_tree_verify_computes_every_branch_as_a_plain_forward(device):
    """Each node's logits are those of a causal forward over the prompt and its branch, and after move_cache the
    accepted branch's slots serve the next decode as if it had been decoded one token at a time. On CUDA the tree
    verify runs decode_attention.py's kernel, which reads the tree's 4-D mask; the plain forwards run SDPA."""
    model, t = tiny(dim=64, intermediate_size=128).to(device), DraftTree((2, 2, 1))
    if device == "cuda":
        from decode_attention import use_decode_attention
        use_decode_attention(model)
    prompt = torch.tensor([[5, 17, 3, 44, 9]], device=device)
    model.setup_caches(1, 32)
    model(prompt, torch.arange(5, device=device))
    x = torch.randint(0, 101, (1, t.size), generator=torch.Generator().manual_seed(0)).to(device)
    root = torch.tensor([5], device=device)
    logits = model(x, root + torch.arange(t.size, device=device), tree=(root, *t.tensors(device)))[0]
    parent = t.parents()
    for j in range(t.size):
        branch = [j]
        while branch[-1]:
            branch.append(parent[branch[-1]])
        seq = torch.cat([prompt[0], x[0, branch[::-1]]])
        torch.testing.assert_close(logits[j], model(seq[None])[0, -1], atol=1e-4, rtol=1e-4)
    path = torch.tensor([0, 2, 5, 9], device=device)
    model.move_cache(root + path, root + torch.arange(4, device=device))
    after = model(torch.tensor([[7]], device=device), torch.tensor([9], device=device))[0, -1]
    seq = torch.cat([prompt[0], x[0, path], torch.tensor([7], device=device)])
    torch.testing.assert_close(after, model(seq[None])[0, -1], atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_head_tree_holds_the_heads_chain_and_each_nodes_own_top_tokens():
    """The tree's first children are the chain's greedy drafts, and the children of a node off that branch are the
    head's top tokens after drafting that node one step at a time."""
    model = tiny()
    head = tiny_head(model, vocab_ids=torch.arange(60)).to(torch.float64)
    model = model.to(torch.float64)  # the head's tree and its chain agree on top-2 orders even near ties
    prompt = torch.tensor([[1, 2, 3, 4, 5, 6]])
    model.setup_caches(1, 64)
    _, hidden = model(prompt, torch.arange(6), return_hidden=True)
    head.setup_caches(1, 64)
    tokens, pos, last = torch.tensor([[2, 3, 4, 5, 6, 7]]), torch.arange(6), torch.tensor([5])
    t = DraftTree((2, 2, 1))
    nodes = mtp.draft_tree(head, model, hidden, tokens, pos, last, t)[0]
    chain, _ = mtp.draft(head, model, hidden, tokens, pos, last, 3, GREEDY)
    assert nodes[[0, 2, 6]].tolist() == chain[0].tolist()  # nodes 1, 3, 7: the first child at every depth
    y = head(hidden, model.tok_embeddings(tokens), pos).index_select(1, last)
    y = head(y, model.tok_embeddings(nodes[1].view(1, 1)), torch.tensor([6]))  # node 2, drafted as a chain would
    assert nodes[4:6].tolist() == head.top(y, 2)[0, 0].tolist()  # nodes 5, 6: its children


@pytest.mark.parametrize("branching", TREES)
@torch.no_grad()
def test_greedy_output_equals_the_target_alone(branching, sharp_and_trained):  # noqa: F811
    model, trained = sharp_and_trained
    t, accepted = DraftTree(branching), []
    for seed in range(6):
        g = torch.Generator().manual_seed(seed)
        prompt = torch.randint(0, 101, (1 + seed % 4 * 3,), generator=g).tolist()  # lengths 1, 4, 7, 10
        want = generate(model, [prompt], 40)
        for head in (tiny_head(model, seed), trained):
            mine = []
            got = speculative_generate(model, mtp.MTPDrafter(head, model, tree=t), [prompt], 40, GREEDY, t.depth,
                                       accepted=mine)
            assert got == want
            accepted += mine
        if branching == (1, 1, 1):  # one branch is the chain: the same acceptances, step for step
            chain = []
            speculative_generate(model, mtp.MTPDrafter(trained, model), [prompt], 40, GREEDY, 3, accepted=chain)
            assert mine == chain
    assert 0 in accepted and t.depth in accepted  # rejections and full acceptances both happened


def test_sampling_with_a_tree_follows_the_target_distribution():
    assert mtp_loop_pvalue(2000, DraftTree((2, 1))) > 1e-3


def test_negative_control_accepting_the_first_branch_is_detected(monkeypatch):
    def first_branch(tokens, choice, tree):  # every first child accepted, whatever the target picked
        path = torch.tensor([sum(tree.widths[:d]) for d in range(tree.depth + 1)])
        return path, torch.tensor(tree.depth), choice[path[-1]]
    monkeypatch.setattr(gen, "walk", first_branch)
    assert mtp_loop_pvalue(600, DraftTree((2, 1))) < 1e-6


@torch.no_grad()
def test_the_tree_step_traces_as_one_graph_and_compiles_once(sharp_and_trained):  # noqa: F811
    """fullgraph capture of the whole tree step (what --compile makes one CUDA graph) computes the same thing, and
    full, partial and zero acceptances reuse it."""
    from torch._dynamo.testing import CompileCounter
    torch._dynamo.reset()
    counter = CompileCounter()
    model, head = sharp_and_trained
    step = torch.compile(gen.spec_step, backend=counter, fullgraph=True, dynamic=False)
    drafter, accepted = mtp.MTPDrafter(head, model, tree=DraftTree((2, 2, 1))), []
    for seed in range(6):
        prompt = torch.randint(0, 101, (1 + seed % 4 * 3,), generator=torch.Generator().manual_seed(seed)).tolist()
        for s in (GREEDY, WARM):
            torch.manual_seed(seed)
            want = speculative_generate(model, drafter, [prompt], 40, s, 3, max_seq_length=80)
            torch.manual_seed(seed)
            got = speculative_generate(model, drafter, [prompt], 40, s, 3, max_seq_length=80, step_fn=step,
                                       accepted=accepted)
            assert got == want
    assert 0 in accepted and 3 in accepted, f"runs should mix zero and full acceptance, got {set(accepted)}"
    assert counter.frame_count == 2, f"compiled {counter.frame_count} times, expected once per sampling setting"


def test_flags_refuse_a_tree_without_a_head_or_with_another_k():
    with pytest.raises(ValueError, match="--draft_tree is drafted by an MTP head"):
        gen.check_args(gen.parse_args(["--draft_tree", "2,2,1", "--device", "cpu"]))
    with pytest.raises(ValueError, match="the tree sets k"):
        gen.check_args(gen.parse_args(["--draft_tree", "2,2,1", "--mtp", "--speculate_k", "2", "--device", "cpu"]))
    with pytest.raises(ValueError, match="--draft_tree '2,,1'"):
        gen.check_args(gen.parse_args(["--draft_tree", "2,,1", "--mtp", "--device", "cpu"]))
    model = tiny()
    drafter = mtp.MTPDrafter(tiny_head(model), model, tree=DraftTree((2, 1)))
    with pytest.raises(ValueError, match="the tree sets k"):
        speculative_generate(model, drafter, [[1, 2]], 5, GREEDY, 3)
