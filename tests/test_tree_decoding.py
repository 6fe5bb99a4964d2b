"""Tree drafting is lossless, and its one-forward tree verification sees exactly what per-path forwards see.

The chi-square approach of ``test_decoding.py`` is reused: a 16-token random target whose exact marginals are
enumerable, a deliberately poor drafter, committed tokens of many decodes against those marginals. The sibling
rejection math is also checked on its own, many times over, against a bigram "target" (exact joint of two
committed tokens), with the classic bug (resampling from p) shown to fail the same check.
"""

from __future__ import annotations

import pytest
import torch

import specdec.decoding.tree as tree_module
from specdec.decoding import SpeculativeDecoder, autoregressive_generate, draw, token_probabilities
from specdec.decoding.proposers import DraftRequest, proposer_for
from specdec.decoding.tree import (
    DraftTree,
    TreeShape,
    TreeSpeculativeDecoder,
    TreeTargetSession,
    draw_children,
    verify_tree,
)
from specdec.drafters import DSparkConfig, DSparkDrafter, Eagle3Config, Eagle3Drafter
from tests.helpers import tiny_random_target
from tests.test_decoding import (
    PROMPT,
    SMALL_VOCAB,
    chi_square_p_value,
    exact_marginals,
    head_of,
    make_drafter,
    small_target,
)

POSITIONS = 4
SAMPLES = 450
BUSHY = TreeShape.from_branching([3, 2, 1])  # 3 + 6 + 6 nodes, depth 3


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def target():
    return small_target()


@pytest.fixture(scope="module")
def random_target():
    return tiny_random_target("qwen3", num_layers=4)


# ---- shapes --------------------------------------------------------------------------------------------------
def test_tree_shapes():
    assert BUSHY.num_nodes == 15 and BUSHY.max_depth == 3
    assert BUSHY.children[0] == (1, 2, 3) and BUSHY.children[1] == (4, 5)
    assert BUSHY.path(12) == [2, 6, 12]
    ancestry = BUSHY.ancestry()
    assert ancestry[12].nonzero().flatten().tolist() == [0, 2, 6, 12]
    assert TreeShape.chain(4).parents == (0, 1, 2, 3)
    assert BUSHY.truncated(1).parents == (0, 0, 0)
    # confident drafts: the best 7 nodes form a chain; poor drafts: a bushy tree of the same budget
    assert TreeShape.best_first(7, [0.95], max_depth=7) == TreeShape.chain(7)
    bushy = TreeShape.best_first(7, [0.4], max_depth=7)
    assert bushy.num_nodes == 7 and len(bushy.children[0]) >= 2 and bushy.max_depth < 7
    assert TreeShape.best_first(5, [0.9], max_depth=2).max_depth == 2
    with pytest.raises(ValueError, match="precede"):
        TreeShape((0, 2))


# ---- the sibling rejection math alone ------------------------------------------------------------------------
def _bigram_rounds(target_logits, draft_logits, shape, temperature, anchor, generator, committed_needed=2):
    """Decode with a bigram target/drafter until ``committed_needed`` tokens are committed; return them."""
    committed: list[int] = []
    last = anchor
    while len(committed) < committed_needed:
        tokens = [last] + [0] * shape.num_nodes
        q_rows = [torch.zeros(target_logits.shape[-1])] * (shape.num_nodes + 1)
        for depth in range(shape.max_depth):
            parents = [n for n in range(shape.num_nodes + 1) if shape.depths[n] == depth and shape.children[n]]
            logits = draft_logits[[tokens[n] for n in parents]]
            drawn, qs = draw_children(logits, [len(shape.children[n]) for n in parents], temperature, generator)
            for index, parent in enumerate(parents):
                for child, token, q in zip(shape.children[parent], drawn[index], qs[index], strict=True):
                    tokens[child], q_rows[child] = token, q
        tree = DraftTree(shape, torch.tensor(tokens), torch.stack(q_rows))
        p = token_probabilities(target_logits[tokens], temperature)
        verdict = verify_tree(tree, p, generator)
        committed += [tokens[n] for n in verdict.path] + [verdict.next_token]
        last = committed[-1]
    return committed[:committed_needed]


def _bigram_check(temperature: float, samples: int) -> float:
    torch.manual_seed(3)
    vocab = 5
    target_logits = torch.randn(vocab, vocab) * 2.0
    draft_logits = torch.randn(vocab, vocab) * 2.0
    shape = TreeShape.from_branching([3, 2])
    generator = torch.Generator().manual_seed(5)
    counts = torch.zeros(vocab * vocab)
    for _ in range(samples):
        first, second = _bigram_rounds(target_logits, draft_logits, shape, temperature, 0, generator)
        counts[first * vocab + second] += 1
    p = token_probabilities(target_logits.double(), temperature)
    exact = (p[0][:, None] * p).flatten()
    return chi_square_p_value(counts, exact)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_sibling_rejection_commits_the_target_joint(temperature):
    assert _bigram_check(temperature, 1500) > 1e-3


def test_the_check_detects_resampling_from_p_after_a_sibling_rejection(monkeypatch):
    monkeypatch.setattr(tree_module, "residual_distribution", lambda r, q: r)
    assert _bigram_check(1.0, 1500) < 1e-6


def test_children_are_drawn_without_replacement_and_top_k_when_greedy():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, 0.0, 0.0, 0.0]])
    tokens, qs = draw_children(logits, [3, 1], 0.0, None)
    assert tokens == [[1, 3, 2], [0]]
    tokens, qs = draw_children(logits, [4, 0], 1.0, torch.Generator().manual_seed(0))
    assert sorted(tokens[0]) == [0, 1, 2, 3]
    expected = torch.softmax(logits[0].masked_fill(torch.tensor([t in tokens[0][:1] for t in range(4)]), -1e9), -1)
    assert torch.allclose(qs[0][1], expected)  # q of the second child excludes the first
    assert qs[0][3][tokens[0][3]] == 1.0


# ---- the target's tree forward -------------------------------------------------------------------------------
def test_tree_mask_logits_and_kept_path_match_plain_forwards(random_target):
    model = random_target
    prompt = [5, 17, 3, 40, 8]
    shape = TreeShape.best_first(9, [0.5], max_depth=4)
    torch.manual_seed(0)
    tokens = torch.randint(0, model.config.vocab_size, (shape.num_nodes + 1,))
    with torch.no_grad(), TreeTargetSession(model, [0, 2]) as session:
        session.prefill([prompt])
        step = session.extend_tree(tokens[None], shape)
        for node in range(shape.num_nodes + 1):
            sequence = prompt + tokens[[0, *shape.path(node)]].tolist()
            plain = model(torch.tensor([sequence]), output_hidden_states=True)
            assert torch.allclose(step.logits[0, node], plain.logits[0, -1], atol=1e-5), node
            features = torch.cat([plain.hidden_states[1][0, -1], plain.hidden_states[3][0, -1]])
            assert torch.allclose(step.features[0, node], features, atol=1e-5)
        deepest = max(range(shape.num_nodes + 1), key=lambda n: (shape.depths[n], n))
        kept = [0, *shape.path(deepest)]
        assert kept != list(range(len(kept)))  # a path that is not the first slots: the KV entries must move
        session.keep_paths([kept])
        following = session.extend(torch.tensor([[7, 9]]), torch.tensor([2]))
        plain = model(torch.tensor([prompt + tokens[kept].tolist() + [7, 9]])).logits[0, -2:]
        assert torch.allclose(following.logits[0], plain, atol=1e-5)


# ---- drafting ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("algorithm", ["dspark", "eagle3"])
def test_a_chain_shaped_tree_drafts_what_the_chain_proposer_drafts(random_target, algorithm):
    drafter = make_drafter(random_target, algorithm)
    trees = tree_module.tree_drafter_for(drafter)
    proposer = proposer_for(drafter)
    prompt = torch.tensor([5, 17, 3, 40, 8, 11])
    with torch.no_grad(), TreeTargetSession(random_target, drafter.config.target_layer_ids) as session:
        features = session.prefill([prompt[:-1].tolist()]).features[0]
    depth = trees.max_depth
    tree = trees.draft(
        trees.new_state(), prompt, features, TreeShape.chain(depth), 1.0, torch.Generator().manual_seed(4)
    )
    request = DraftRequest(state=proposer.new_state(), tokens=prompt, pending=features, limit=depth)
    chain = proposer.propose([request], 1.0, torch.Generator().manual_seed(4))[0]
    assert torch.equal(tree.tokens[1:], chain.tokens)
    assert torch.allclose(tree.probabilities[1:], chain.probabilities, atol=1e-6)
    # greedy: the rank-0 path of a bushy tree is the greedy chain (siblings do not leak into each other)
    bushy = trees.draft(trees.new_state(), prompt, features, TreeShape.from_branching([2] * depth), 0.0, None)
    request = DraftRequest(state=proposer.new_state(), tokens=prompt, pending=features, limit=depth)
    greedy = proposer.propose([request], 0.0, None)[0]
    rank0 = [0]
    for _ in range(depth):
        rank0.append(bushy.shape.children[rank0[-1]][0])
    assert torch.equal(bushy.tokens[rank0[1:]], greedy.tokens)


def _dspark_drafter(model, head_type: str):
    torch.manual_seed(1)
    layers = model.config.num_hidden_layers
    config = DSparkConfig.from_target(
        model.config, [0, layers - 2], num_hidden_layers=1, mask_token_id=model.config.vocab_size - 1,
        initializer_range=0.2, block_size=3, markov_rank=8, markov_head_type=head_type,
    )  # fmt: skip
    drafter = DSparkDrafter(config).eval()
    drafter.attach_target_head(head_of(model))
    return drafter


@pytest.mark.parametrize("head_type", ["vanilla", "rnn"])
def test_dspark_tree_nodes_are_conditioned_on_their_own_path(random_target, head_type):
    """Each node's q = the block's slot logits + the Markov bias of *its* path, minus its earlier siblings."""
    drafter = _dspark_drafter(random_target, head_type)
    trees = tree_module.tree_drafter_for(drafter)
    prompt = torch.tensor([5, 17, 3, 40, 8, 11])
    with torch.no_grad(), TreeTargetSession(random_target, drafter.config.target_layer_ids) as session:
        features = session.prefill([prompt[:-1].tolist()]).features[0]
    shape = TreeShape.from_branching([3, 2, 2])
    tree = trees.draft(trees.new_state(), prompt, features, shape, 1.0, torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = drafter.block_hidden(prompt[-1:], len(prompt) - 1, features[None], drafter.new_cache())
        base = drafter.target_head.logits(hidden)[0]
        for node in range(1, shape.num_nodes + 1):
            path = shape.path(node)
            depth = len(path)
            prev = torch.cat([prompt[-1:], tree.tokens[path[:-1]]])[None]
            logits = base[depth - 1].float() + drafter.markov_head.teacher_forced(hidden[:, :depth], prev)[0, -1]
            parent = shape.parents[node - 1]
            earlier = [s for s in shape.children[parent] if s < node]
            logits[tree.tokens[earlier]] = float("-inf")
            assert torch.allclose(tree.probabilities[node], token_probabilities(logits, 1.0), atol=1e-5), node
    assert len(set(tree.tokens[list(shape.children[0])].tolist())) == 3  # distinct siblings


def test_eagle3_tree_nodes_match_a_chain_run_along_their_path(random_target):
    """The draft-cache tree mask: each node's q equals plain chain steps along its own path (no tree)."""
    drafter = make_drafter(random_target, "eagle3")
    trees = tree_module.tree_drafter_for(drafter)
    prompt = torch.tensor([5, 17, 3, 40, 8, 11])
    position = len(prompt) - 1
    with torch.no_grad(), TreeTargetSession(random_target, drafter.config.target_layer_ids) as session:
        features = session.prefill([prompt[:-1].tolist()]).features[0]
    shape = TreeShape.from_branching([3, 2, 2])
    with torch.no_grad():
        tree = trees.draft(trees.new_state(), prompt, features, shape, 1.0, torch.Generator().manual_seed(0))
        fresh = trees.new_state()
        root = trees._inject(fresh, prompt, features)
        for node in range(1, shape.num_nodes + 1):
            path = shape.path(node)
            hidden, past = root[None, None], fresh.past
            for step, ancestor in enumerate(path[:-1]):
                token = tree.tokens[ancestor].view(1, 1)
                hidden, past = drafter.step(hidden, token, torch.full((1, 1), position + step), past, None)
            logits = drafter.logits(hidden[0, -1]).float()
            parent = shape.parents[node - 1]
            logits[tree.tokens[[s for s in shape.children[parent] if s < node]]] = float("-inf")
            assert torch.allclose(tree.probabilities[node], token_probabilities(logits, 1.0), atol=1e-5), node


# ---- whole decoding ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("algorithm", ["dspark", "dflash", "eagle3"])
def test_greedy_tree_output_equals_greedy_target_output(target, random_target, algorithm):
    accepted = 0
    for model, prompts in ((target, [PROMPT, [2, 7, 1]]), (random_target, [[1, 5, 7, 9, 11], [3, 4]])):
        decoder = TreeSpeculativeDecoder(
            model, make_drafter(model, algorithm), BUSHY, temperature=0.0, max_new_tokens=20
        )
        for prompt in prompts:
            reference = autoregressive_generate(model, [prompt], temperature=0.0, max_new_tokens=20).results[0]
            result = decoder.generate([prompt]).results[0]
            assert result.token_ids == reference.token_ids
            assert sum(result.committed) + 1 == len(result.token_ids)
            accepted += sum(result.accepted)
    assert accepted > 0  # some rounds accepted a path, so kept KV entries were really gathered


def test_eagle3_reduced_vocabulary_tree(random_target):
    """A pruned draft vocabulary: drafted tokens map through d2t, q lives on the target ids, greedy stays exact."""
    torch.manual_seed(1)
    config = Eagle3Config.from_target(
        random_target.config, [-1, 0, 2], ttt_length=3, initializer_range=0.2, draft_vocab_size=48
    )
    drafter = Eagle3Drafter(config).eval()
    drafter.attach_target_head(head_of(random_target))
    kept = torch.arange(0, random_target.config.vocab_size, 2)
    drafter.set_vocabulary_mapping(kept)
    prompt = [1, 5, 7, 9, 11]
    reference = autoregressive_generate(random_target, [prompt], temperature=0.0, max_new_tokens=20).results[0]
    greedy = TreeSpeculativeDecoder(random_target, drafter, BUSHY, temperature=0.0, max_new_tokens=20)
    assert greedy.generate([prompt]).results[0].token_ids == reference.token_ids
    trees = tree_module.tree_drafter_for(drafter)
    with torch.no_grad(), TreeTargetSession(random_target, config.target_layer_ids) as session:
        features = session.prefill([prompt]).features[0]
    tree = trees.draft(trees.new_state(), torch.tensor([*prompt, 3]), features, BUSHY, 1.0, torch.Generator())
    assert bool(torch.isin(tree.tokens[1:], kept).all())
    assert torch.allclose(tree.probabilities[1:, kept].sum(-1), torch.ones(BUSHY.num_nodes))


def test_targets_with_sliding_window_layers_are_refused(random_target):
    gemma = tiny_random_target("gemma4", num_layers=2)
    with pytest.raises(ValueError, match="sliding-window"):
        TreeSpeculativeDecoder(gemma, make_drafter(random_target, "dspark"), BUSHY)


def test_tree_decoding_stops_on_a_stop_token(random_target):
    prompt = [1, 5, 7, 9, 11]
    reference = autoregressive_generate(random_target, [prompt], temperature=0.0, max_new_tokens=20).results[0]
    stop = reference.token_ids[5]
    decoder = TreeSpeculativeDecoder(
        random_target, make_drafter(random_target, "dspark"), BUSHY, temperature=0.0, max_new_tokens=20,
        stop_token_ids=[stop],
    )  # fmt: skip
    result = decoder.generate([prompt]).results[0]
    assert result.token_ids == reference.token_ids[: reference.token_ids.index(stop) + 1] and result.stopped


@pytest.mark.parametrize(
    ("algorithm", "temperature"), [("dspark", 1.0), ("dspark", 0.6), ("eagle3", 1.0), ("eagle3", 1.5)]
)
def test_tree_committed_tokens_follow_the_target_distribution(target, algorithm, temperature):
    decoder = TreeSpeculativeDecoder(
        target, make_drafter(target, algorithm), BUSHY, temperature=temperature, max_new_tokens=POSITIONS + 1
    )
    output = decoder.generate([PROMPT] * SAMPLES, torch.Generator().manual_seed(11))
    tokens = torch.tensor([result.token_ids[:POSITIONS] for result in output.results])
    counts = torch.stack([torch.bincount(tokens[:, k], minlength=SMALL_VOCAB) for k in range(POSITIONS)])
    accepted = [a for result in output.results for a in result.accepted]
    assert max(accepted) >= 2 and min(accepted) == 0  # deep paths accepted, whole trees rejected
    exact = exact_marginals(target, PROMPT, temperature, POSITIONS)
    p_values = [chi_square_p_value(counts[k], exact[k]) for k in range(POSITIONS)]
    assert min(p_values) > 1e-3, p_values


def test_tree_raises_acceptance_over_a_chain_of_the_same_budget(target):
    """Same poor drafter, same verified tokens per round: sibling candidates rescue rejected first drafts."""
    drafter = make_drafter(target, "dspark")
    chain = SpeculativeDecoder(target, drafter, temperature=1.0, max_new_tokens=6, max_draft_tokens=3)
    tree = TreeSpeculativeDecoder(target, drafter, TreeShape.from_branching([3]), temperature=1.0, max_new_tokens=6)
    chain_out = chain.generate([PROMPT] * 250, torch.Generator().manual_seed(1)).results
    tree_out = tree.generate([PROMPT] * 250, torch.Generator().manual_seed(1)).results

    def tau(results):
        return sum(sum(r.committed) for r in results) / sum(r.rounds for r in results)

    def first_accepted(results):
        rounds = [a for r in results for a, n in zip(r.accepted, r.proposed, strict=True) if n > 0]
        return sum(a > 0 for a in rounds) / len(rounds)

    assert all(p == 3 for r in tree_out for p in r.proposed[:-1])
    assert first_accepted(tree_out) > first_accepted(chain_out) + 0.1
    assert tau(tree_out) > tau(chain_out)


def test_draw_is_the_sampling_path():
    # draw_children at T > 0 uses the same fp32 softmax as token_probabilities / draw
    logits = torch.tensor([[0.5, 1.5, -1.0]])
    tokens, qs = draw_children(logits, [1], 0.8, torch.Generator().manual_seed(2))
    assert torch.equal(qs[0][0], token_probabilities(logits[0], 0.8))
    assert tokens[0][0] == int(draw(token_probabilities(logits[0], 0.8), torch.Generator().manual_seed(2)))


@pytest.mark.parametrize("algorithm", ["dspark", "eagle3"])
def test_batched_greedy_trees_equal_each_prompt_decoded_alone(random_target, algorithm):
    """Rows of different lengths in one batch: every row's output equals its own greedy target output, also when
    one row stops early (it only pads later forwards) and when the token limit cuts a round's commit."""
    prompts = [[1, 5, 7, 9, 11], [3, 4], [2, 7, 1, 8, 2, 8, 1]]
    references = [
        autoregressive_generate(random_target, [prompt], temperature=0.0, max_new_tokens=13).results[0]
        for prompt in prompts
    ]
    stop = references[1].token_ids[2]
    drafter = make_drafter(random_target, algorithm)
    for stops in ([], [stop]):
        decoder = TreeSpeculativeDecoder(
            random_target, drafter, BUSHY, temperature=0.0, max_new_tokens=13, stop_token_ids=stops
        )
        output = decoder.generate(prompts)
        assert output.target_forwards == max(result.rounds for result in output.results)
        for result, reference in zip(output.results, references, strict=True):
            expected = reference.token_ids
            if stops and stop in expected:
                expected = expected[: expected.index(stop) + 1]
            assert result.token_ids == expected
            assert result.stopped == (bool(stops) and stop in expected)
            assert sum(result.committed) + 1 == len(result.token_ids) <= 13
