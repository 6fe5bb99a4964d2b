import pytest
import torch
from transformers import Qwen3Config

from specdec.drafters import DSparkConfig, DSparkDrafter
from specdec.drafters.anchors import anchor_candidates, build_training_blocks, sample_anchors
from specdec.drafters.attention import dspark_dense_mask, dspark_mask_mod
from specdec.drafters.eagle3 import Eagle3Config, Eagle3Drafter, ttt_dense_mask, ttt_mask_mod, vocabulary_from_counts
from specdec.targets.weights import TargetHead

VOCAB, HIDDEN = 50, 32

QWEN3_4B = Qwen3Config(
    vocab_size=151936,
    hidden_size=2560,
    intermediate_size=9728,
    num_hidden_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    tie_word_embeddings=True,
    rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
    max_position_embeddings=40960,
)
QWEN3_4B_LAYERS = [1, 9, 17, 25, 33]


def trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_paper_parameter_counts_on_meta_device():
    with torch.device("meta"):
        dspark = DSparkDrafter(
            DSparkConfig.from_target(QWEN3_4B, QWEN3_4B_LAYERS, num_hidden_layers=5, mask_token_id=151669)
        )
        dflash = DSparkDrafter(
            DSparkConfig.from_target(
                QWEN3_4B,
                QWEN3_4B_LAYERS,
                num_hidden_layers=5,
                mask_token_id=151669,
                markov_rank=0,
                enable_confidence_head=False,
            )
        )
        eagle3 = Eagle3Drafter(Eagle3Config.from_target(QWEN3_4B, QWEN3_4B_LAYERS))
    markov = trainable(dspark.markov_head)
    assert markov == pytest.approx(77.8e6, rel=0.01)
    assert trainable(dspark) == pytest.approx(615e6, rel=0.01)
    assert trainable(dflash) == trainable(dspark) - markov - trainable(dspark.confidence_head)
    assert trainable(eagle3) == pytest.approx(149e6, rel=0.01)
    assert all(p.is_meta for p in dspark.parameters())


def tiny_dspark(**overrides) -> DSparkDrafter:
    fields = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        target_layer_ids=[0, 1],
        block_size=4,
        num_anchors=6,
        markov_rank=8,
        mask_token_id=VOCAB - 1,
        attention_backend="sdpa",
    )
    fields.update(overrides)
    torch.manual_seed(0)
    drafter = DSparkDrafter(DSparkConfig(**fields))
    generator = torch.Generator().manual_seed(1)
    target_hidden = fields.get("target_hidden_size") or HIDDEN
    drafter.attach_target_head(
        TargetHead(
            torch.randn(VOCAB, target_hidden, generator=generator),
            torch.randn(VOCAB, target_hidden, generator=generator),
            tied=False,
            embed_key="embed",
            lm_head_key="lm_head",
        )
    )
    return drafter


def toy_batch(batch: int = 2, length: int = 20, target_hidden: int = HIDDEN):
    generator = torch.Generator().manual_seed(3)
    input_ids = torch.randint(0, VOCAB - 1, (batch, length), generator=generator)
    features = torch.randn(batch, length, 2 * target_hidden, generator=generator)
    last = torch.randn(batch, length, target_hidden, generator=generator)
    loss_mask = torch.zeros(batch, length, dtype=torch.bool)
    loss_mask[:, 6:] = True
    loss_mask[-1, 15:] = False
    return input_ids, features, loss_mask, last


def test_dspark_mask_hand_built():
    # Two blocks of 3 over a context of 6: block 0 anchored at 2 (kept), block 1 dropped.
    mask = dspark_dense_mask(torch.tensor([[2, 0]]), torch.tensor([[True, False]]), 6, 3)[0, 0]
    context, own = mask[:, :6], mask[:, 6:]
    assert context[:3].tolist() == [[True, True, False, False, False, False]] * 3
    assert not context[3:].any()  # a dropped block sees no context
    assert own.tolist() == [[True] * 3 + [False] * 3] * 3 + [[False] * 3 + [True] * 3] * 3


def test_flex_mask_mod_equals_dense_mask():
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    anchors, keep, _ = sample_anchors(toy_batch()[2], 5, torch.Generator().manual_seed(0))
    dense = dspark_dense_mask(anchors, keep, 20, 4)
    from_mod = flex.create_mask(dspark_mask_mod(anchors, keep, 20, 4), 2, 1, 20, 20 + 20, device="cpu")
    assert torch.equal(dense, from_mod)
    assert torch.equal(ttt_dense_mask(7, 3), flex.create_mask(ttt_mask_mod(7), 1, 1, 7, 28, device="cpu"))


def test_ttt_mask_hand_built():
    mask = ttt_dense_mask(3, 2)[0, 0].int().tolist()
    assert mask == [
        [1, 0, 0, 1, 0, 0, 1, 0, 0],
        [1, 1, 0, 0, 1, 0, 0, 1, 0],
        [1, 1, 1, 0, 0, 1, 0, 0, 1],
    ]


def test_anchor_sampling_respects_candidates_and_seed():
    loss_mask = toy_batch()[2]
    candidates = anchor_candidates(loss_mask)
    anchors, keep, count = sample_anchors(loss_mask, 6, torch.Generator().manual_seed(5))
    again, _, _ = sample_anchors(loss_mask, 6, torch.Generator().manual_seed(5))
    assert torch.equal(anchors, again)
    assert count.tolist() == [13, 8]
    for row in range(2):
        kept = anchors[row][keep[row]]
        assert kept.numel() == min(6, int(count[row]))
        assert bool(candidates[row, kept].all())
        assert kept.unique().numel() == kept.numel() and torch.equal(kept, kept.sort().values)
    few, keep_few, _ = sample_anchors(loss_mask[:, :8], 6)
    assert keep_few.sum(1).tolist() == [1, 1] and few.shape == (2, 6)


@pytest.mark.parametrize(("convention", "offset"), [("deepspec", 0), ("zlab", 1)])
def test_labels_and_contiguous_eval_mask(convention, offset):
    input_ids = torch.arange(12)[None]
    loss_mask = torch.tensor([[0, 0, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    blocks = build_training_blocks(
        input_ids, loss_mask, num_anchors=8, block_size=4, mask_token_id=99, first_prediction_slot=offset
    )
    row = blocks.anchors[0].tolist().index(3)  # the anchor at position 3
    assert blocks.block_input_ids[0, row * 4 : row * 4 + 4].tolist() == [3, 99, 99, 99]
    assert blocks.block_positions[0, row * 4 : row * 4 + 4].tolist() == [3, 4, 5, 6]
    expected_labels = [4, 5, 6, 7][: 4 - offset]
    assert blocks.labels[0, row].tolist() == expected_labels
    # position 6 is unsupervised: the prefix stops before it even though 7 is supervised again
    assert blocks.eval_mask[0, row].tolist() == [True, True, False, False][: 4 - offset]


@pytest.mark.parametrize("convention", ["deepspec", "zlab"])
@pytest.mark.parametrize("markov", ["vanilla", "gated", "rnn", "none"])
def test_training_blocks_equal_inference_blocks(convention, markov):
    """A kept training block computes exactly what inference computes for the same anchor and context."""
    overrides = {"anchor_convention": convention}
    overrides.update(
        {"markov_rank": 0, "enable_confidence_head": False} if markov == "none" else {"markov_head_type": markov}
    )
    drafter = tiny_dspark(**overrides).eval()
    input_ids, features, loss_mask, last = toy_batch()
    output = drafter(input_ids, features, loss_mask, last, generator=torch.Generator().manual_seed(0))
    for row, block in ((0, 0), (0, 3), (1, 1)):
        anchor = int(output.blocks.anchors[row, block])
        assert output.blocks.keep[row, block]
        cache = drafter.new_cache()
        hidden = drafter.block_hidden(input_ids[row : row + 1, anchor], anchor, features[row : row + 1, :anchor], cache)
        logits = drafter.target_head.logits(hidden)
        prev = torch.gather(input_ids[row : row + 1], 1, output.blocks.label_positions[row : row + 1, block] - 1)
        bias, _ = drafter.markov_inputs(hidden, prev)
        if bias is not None:
            logits = logits + bias
        torch.testing.assert_close(logits, output.draft_logits[row : row + 1, block], rtol=1e-5, atol=1e-5)
        assert cache.length == anchor


def test_target_logits_align_with_labels():
    drafter = tiny_dspark()
    input_ids, features, loss_mask, last = toy_batch()
    output = drafter(input_ids, features, loss_mask, last)
    row, block, slot = 0, 1, 2
    position = int(output.blocks.label_positions[row, block, slot])
    expected = last[row, position - 1] @ drafter.target_head.lm_head_weight.T
    torch.testing.assert_close(output.target_logits[row, block, slot], expected)
    assert not output.target_logits.requires_grad


def test_frozen_head_is_shared_not_trained_or_saved(tmp_path):
    drafter = tiny_dspark()
    names = {name for name, _ in drafter.named_parameters()}
    assert not any("embed_weight" in n or "lm_head_weight" in n for n in names)
    assert not any("target_head.embed_weight" in k or "lm_head_weight" in k for k in drafter.state_dict())
    input_ids, features, loss_mask, last = toy_batch()
    output = drafter(input_ids, features, loss_mask, last, generator=torch.Generator().manual_seed(0))
    (output.draft_logits.float().logsumexp(-1).mean() + output.confidence_logits.mean()).backward()
    assert drafter.fc.weight.grad is not None and drafter.markov_head.markov_w1.weight.grad is not None

    drafter.save_pretrained(tmp_path)
    loaded = DSparkDrafter.from_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match="not attached"):
        loaded(input_ids, features, loss_mask, last)
    loaded.target_head.attach(
        TargetHead(drafter.target_head.embed_weight, drafter.target_head.lm_head_weight, False, "e", "h")
    )
    reloaded = loaded(input_ids, features, loss_mask, last, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(reloaded.draft_logits, output.draft_logits)
    assert loaded.config.markov_head_type == "vanilla" and loaded.config.num_predictions == 4


def test_draft_width_differs_from_target():
    drafter = tiny_dspark(hidden_size=16, head_dim=4, target_hidden_size=HIDDEN)
    output = drafter(*toy_batch())
    assert output.draft_logits.shape[-1] == VOCAB
    assert drafter.target_head.embed_proj.weight.shape == (16, HIDDEN)


def test_sampling_returns_the_distributions_it_drew_from():
    drafter = tiny_dspark().eval()
    input_ids, features, _, _ = toy_batch()
    hidden = drafter.block_hidden(input_ids[:1, 7], 7, features[:1, :7], drafter.new_cache())
    greedy = drafter.sample_block(hidden, input_ids[:1, 7], temperature=0.0)
    assert torch.equal(greedy.probabilities.argmax(-1), greedy.tokens)
    sampled = drafter.sample_block(hidden, input_ids[:1, 7], 1.0, torch.Generator().manual_seed(0))
    assert sampled.probabilities.dtype == torch.float32
    torch.testing.assert_close(sampled.probabilities.sum(-1), torch.ones(1, 4))
    # slot k's distribution depends on the token drafted at slot k - 1 (Markov correction)
    bias, _ = drafter.markov_head.step(hidden[:, 1], sampled.tokens[:, 0], None)
    expected = torch.softmax(drafter.target_head.logits(hidden[:, 1]).float() + bias.float(), -1)
    torch.testing.assert_close(sampled.probabilities[:, 1], expected)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="markov_head_type"):
        DSparkConfig(markov_head_type="lstm")
    with pytest.raises(ValueError, match="anchor_convention"):
        DSparkConfig(anchor_convention="medusa")
    with pytest.raises(ValueError, match="final layer"):
        DSparkConfig.from_target(QWEN3_4B, [1, 35], mask_token_id=151669)
    with pytest.raises(ValueError, match="3 or 5"):
        Eagle3Config(target_layer_ids=[1, 2])


def test_eagle3_reduced_vocabulary_mapping():
    counts = torch.tensor([5, 0, 9, 9, 1, 7])
    kept = vocabulary_from_counts(counts, 3)
    assert kept.tolist() == [2, 3, 5]
    config = Eagle3Config(
        vocab_size=6,
        draft_vocab_size=3,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
    )
    drafter = Eagle3Drafter(config)
    head = torch.randn(6, HIDDEN)
    drafter.attach_target_head(TargetHead(torch.randn(6, HIDDEN), head, False, "e", "h"))
    drafter.set_vocabulary_mapping(kept)
    assert drafter.d2t.tolist() == [2, 2, 3]
    assert drafter.t2d.tolist() == [False, False, True, True, False, True]
    torch.testing.assert_close(drafter.lm_head.weight.detach(), head[[2, 3, 5]])
    assert set(drafter.state_dict()) >= {"d2t", "t2d", "lm_head.weight"}


def test_eagle3_ttt_steps_equal_sequential_chain():
    """TTT step s at position t equals running the draft as a chain: step 0 over the prefix, then one
    position at a time feeding back its own hidden state."""
    config = Eagle3Config(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        ttt_length=3,
        num_hidden_layers=2,
        attention_backend="sdpa",
    )
    torch.manual_seed(0)
    drafter = Eagle3Drafter(config).eval()
    drafter.attach_target_head(TargetHead(torch.randn(VOCAB, HIDDEN), torch.randn(VOCAB, HIDDEN), False, "e", "h"))
    generator = torch.Generator().manual_seed(2)
    length = 9
    input_ids = torch.randint(0, VOCAB, (1, length), generator=generator)
    features = torch.randn(1, length, 3 * HIDDEN, generator=generator)
    output = drafter(input_ids, features, torch.ones(1, length, dtype=torch.bool), torch.randn(1, length, HIDDEN))

    t = 4
    with torch.no_grad():
        hidden0 = drafter.fc(features[:, : t + 1])
        positions = torch.arange(t + 1)[None]
        out0, past = drafter.step(hidden0, input_ids[:, 1 : t + 2], positions, None, ttt_dense_mask(t + 1, 0))
        torch.testing.assert_close(drafter.logits(out0[:, -1]), output.draft_logits[0][:, t], rtol=1e-5, atol=1e-5)
        # chain step 1: only the last position's own output, token x_{t+2}, at position t + 1
        prefix = [(k, v) for k, v in past]
        out1, past1 = drafter.step(out0[:, -1:], input_ids[:, t + 2 : t + 3], torch.tensor([[t + 1]]), prefix, None)
        torch.testing.assert_close(drafter.logits(out1[:, -1]), output.draft_logits[1][:, t], rtol=1e-5, atol=1e-5)
        out2, _ = drafter.step(out1, input_ids[:, t + 3 : t + 4], torch.tensor([[t + 2]]), past1, None)
        torch.testing.assert_close(drafter.logits(out2[:, -1]), output.draft_logits[2][:, t], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k_eq_v", [False, True])
def test_gemma4_style_drafter_from_target(k_eq_v):
    from tests.helpers import tiny_random_target

    target = tiny_random_target("gemma4")
    target.config.attention_k_eq_v = k_eq_v
    target.config.final_logit_softcapping = 30.0
    config = DSparkConfig.from_target(
        target.config, [0, 1], num_hidden_layers=2, mask_token_id=3, num_anchors=4, block_size=3, markov_rank=8
    )
    assert config.block_style == "gemma4" and config.attention_k_eq_v == k_eq_v
    assert config.embedding_multiplier == pytest.approx(HIDDEN**0.5) and config.final_logit_softcapping == 30.0
    torch.manual_seed(0)
    drafter = DSparkDrafter(config).eval()
    assert (drafter.layers[0].self_attn.v_proj is None) == k_eq_v
    assert hasattr(drafter.layers[0], "post_feedforward_layernorm") and drafter.layers[0].layer_scalar.item() == 1.0
    vocab = config.vocab_size
    drafter.attach_target_head(
        TargetHead(target.model.embed_tokens.weight.detach(), target.lm_head.weight.detach(), False, "e", "h")
    )
    generator = torch.Generator().manual_seed(4)
    input_ids = torch.randint(4, vocab, (1, 16), generator=generator)
    loss_mask = torch.ones(1, 16, dtype=torch.bool)
    loss_mask[:, :5] = False
    features = torch.randn(1, 16, 2 * HIDDEN, generator=generator)
    output = drafter(input_ids, features, loss_mask, torch.randn(1, 16, HIDDEN), generator=generator)
    assert output.draft_logits.abs().max() <= 30.0
    anchor = int(output.blocks.anchors[0, 1])
    hidden = drafter.block_hidden(input_ids[:, anchor], anchor, features[:, :anchor], drafter.new_cache())
    prev = torch.gather(input_ids, 1, output.blocks.label_positions[:, 1] - 1)
    logits = drafter.target_head.logits(hidden) + drafter.markov_inputs(hidden, prev)[0]
    torch.testing.assert_close(logits, output.draft_logits[:, 1], rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_flex_attention_forward_equals_dense_reference_on_cpu():
    from specdec.drafters.attention import attend, dspark_block_mask
    from specdec.drafters.eagle3 import ttt_block_mask

    loss_mask = torch.ones(2, 40, dtype=torch.bool)
    loss_mask[:, :5] = False
    anchors, keep, _ = sample_anchors(loss_mask, 6, torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(1)
    query = torch.randn(2, 4, 24, 8, generator=generator)
    keys = torch.randn(2, 2, 64, 8, generator=generator)
    values = torch.randn(2, 2, 64, 8, generator=generator)
    flex = attend(query, keys, values, dspark_block_mask(anchors, keep, 40, 4), 0.3)
    dense = attend(query, keys, values, dspark_dense_mask(anchors, keep, 40, 4), 0.3)
    torch.testing.assert_close(flex, dense, rtol=1e-5, atol=1e-5)
    step_query = torch.randn(1, 4, 10, 8, generator=generator)
    step_keys, step_values = torch.randn(2, 1, 2, 30, 8, generator=generator)
    flex = attend(step_query, step_keys, step_values, ttt_block_mask(10, 2, torch.device("cpu")), 0.3)
    dense = attend(step_query, step_keys, step_values, ttt_dense_mask(10, 2), 0.3)
    torch.testing.assert_close(flex, dense, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_flex_training_forward_and_backward_equal_dense_on_cuda():
    outputs = {}
    for backend in ("sdpa", "flex"):
        drafter = tiny_dspark(attention_backend=backend).cuda()
        batch = [tensor.cuda() for tensor in toy_batch(length=160)]
        output = drafter(*batch, generator=torch.Generator().manual_seed(0))
        output.draft_logits.float().logsumexp(-1).mean().backward()
        outputs[backend] = (output.draft_logits.detach(), drafter.fc.weight.grad.clone())
    torch.testing.assert_close(outputs["flex"][0], outputs["sdpa"][0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(outputs["flex"][1], outputs["sdpa"][1], rtol=1e-3, atol=1e-5)


def test_saved_drafters_load_through_auto_classes(tmp_path):
    from transformers import AutoModel

    drafter = tiny_dspark()
    drafter.save_pretrained(tmp_path / "dspark")
    assert isinstance(AutoModel.from_pretrained(tmp_path / "dspark"), DSparkDrafter)
    eagle = Eagle3Drafter(Eagle3Config(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, head_dim=8))
    eagle.save_pretrained(tmp_path / "eagle3")
    assert isinstance(AutoModel.from_pretrained(tmp_path / "eagle3"), Eagle3Drafter)
