"""A tiny DSpark drafter fits one batch on CPU: the model, masks and loss are wired to learn."""

import torch

from specdec.losses import dspark_loss
from tests.test_drafters import HIDDEN, VOCAB, tiny_dspark


def peaked_batch(length: int = 24):
    """A batch whose tokens are the target's argmax continuations, with sharp target distributions."""
    generator = torch.Generator().manual_seed(7)
    drafter = tiny_dspark(num_anchors=6, block_size=4)
    last = 6 * torch.randn(2, length, HIDDEN, generator=generator)
    target_logits = last @ drafter.target_head.lm_head_weight.T
    input_ids = torch.randint(0, VOCAB - 1, (2, length), generator=generator)
    input_ids[:, 1:] = target_logits[:, :-1].argmax(-1)
    features = torch.randn(2, length, 2 * HIDDEN, generator=generator)
    loss_mask = torch.zeros(2, length, dtype=torch.bool)
    loss_mask[:, 4:] = True
    return drafter, (input_ids, features, loss_mask, last)


def test_tiny_dspark_overfits_one_batch():
    drafter, batch = peaked_batch()
    optimizer = torch.optim.AdamW(drafter.parameters(), lr=3e-3)
    first = None
    for _ in range(300):
        output = drafter(*batch, generator=torch.Generator().manual_seed(0))  # the same blocks every step
        loss = dspark_loss(
            output.draft_logits,
            output.target_logits,
            output.target_ids,
            output.eval_mask,
            output.confidence_logits,
            impl="chunked",
        )
        first = first if first is not None else loss.loss.item()
        optimizer.zero_grad()
        loss.loss.backward()
        optimizer.step()
    assert loss.loss.item() < 0.1 * first
    assert loss.accept_rate[0].item() > 0.95
    assert loss.tau_probabilistic.item() > 4.0  # block of 4 drafts + bonus: close to the maximum of 5
