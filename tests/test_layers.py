import pytest
import torch

from specdec.targets import LayerIdError, capture_target_features, hf_hidden_states_index, validate_layer_ids
from tests.helpers import FAMILIES, HIDDEN, VOCAB, tiny_random_target


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layer_ids", [[1], [0, 2], [-1, 1, 2], [2, 0]])
def test_capture_matches_hf_hidden_states(family, layer_ids):
    model = tiny_random_target(family)
    input_ids = torch.randint(1, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))
    reference = model(input_ids=input_ids, output_hidden_states=True).hidden_states

    features = capture_target_features(model, input_ids, layer_ids)

    assert features.hidden_states.shape == (2, 11, len(layer_ids) * HIDDEN)
    for slot, layer_id in enumerate(layer_ids):
        captured = features.hidden_states[..., slot * HIDDEN : (slot + 1) * HIDDEN]
        torch.testing.assert_close(captured, reference[hf_hidden_states_index(layer_id)], rtol=0, atol=0)
    # The final-normed state is HF's last entry: post-norm, and different from the last layer's raw output.
    torch.testing.assert_close(features.last_hidden_state, reference[-1], rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_capture_with_padding_matches_unpadded_rows(family):
    model = tiny_random_target(family)
    generator = torch.Generator().manual_seed(2)
    long = torch.randint(1, VOCAB, (1, 9), generator=generator)
    short = torch.randint(1, VOCAB, (1, 6), generator=generator)
    batch = torch.zeros(2, 9, dtype=torch.long)
    batch[0], batch[1, :6] = long[0], short[0]
    mask = torch.zeros(2, 9, dtype=torch.long)
    mask[0], mask[1, :6] = 1, 1

    padded = capture_target_features(model, batch, [0, 2], attention_mask=mask)
    alone = capture_target_features(model, short, [0, 2])

    torch.testing.assert_close(padded.hidden_states[1, :6], alone.hidden_states[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(padded.last_hidden_state[1, :6], alone.last_hidden_state[0], rtol=1e-5, atol=1e-5)


def test_hooks_are_removed_after_capture():
    model = tiny_random_target("qwen3")
    capture_target_features(model, torch.ones(1, 3, dtype=torch.long), [-1, 1])
    for layer in model.model.layers:
        assert not layer._forward_hooks and not layer._forward_pre_hooks


@pytest.mark.parametrize(
    ("layer_ids", "message"),
    [
        ([], "empty"),
        ([3], "final layer"),
        ([4], "post-norm final state"),
        ([7], "out of range"),
        ([-2], "out of range"),
        ([1, 1], "repeat"),
        ([1.0], "not an integer"),
    ],
)
def test_bad_layer_ids_are_refused(layer_ids, message):
    with pytest.raises(LayerIdError, match=message):
        validate_layer_ids(layer_ids, num_hidden_layers=4)


def test_capture_refuses_final_layer_before_running():
    model = tiny_random_target("llama")
    with pytest.raises(LayerIdError, match="final layer"):
        capture_target_features(model, torch.ones(1, 3, dtype=torch.long), [0, 3])
