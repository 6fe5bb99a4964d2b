"""The target's frozen embedding and LM head, shared by a drafter without becoming its trainable state.

They live in non-persistent buffers: they follow ``.to()`` but stay out of ``parameters()`` (so out of
the optimizer) and out of ``state_dict()`` (so out of checkpoints). When the draft is narrower or wider
than the target, trainable projections bridge the two widths.
"""

from __future__ import annotations

import torch
from torch import nn

from specdec.drafters.config import DSparkConfig
from specdec.targets.weights import TargetHead


class FrozenTargetHead(nn.Module):
    def __init__(self, config: DSparkConfig) -> None:
        super().__init__()
        self.embedding_multiplier = config.embedding_multiplier
        self.final_logit_softcapping = config.final_logit_softcapping
        target_hidden = config.target_hidden_size
        self.register_buffer("embed_weight", torch.zeros(config.vocab_size, target_hidden), persistent=False)
        self.register_buffer("lm_head_weight", torch.zeros(config.vocab_size, target_hidden), persistent=False)
        self.attached = False
        widths_differ = target_hidden != config.hidden_size
        self.embed_proj = nn.Linear(target_hidden, config.hidden_size, bias=False) if widths_differ else None
        self.head_proj = nn.Linear(config.hidden_size, target_hidden, bias=False) if widths_differ else None

    def attach(self, head: TargetHead) -> None:
        """Point the buffers at the target's tensors (shared when tied; no copy on the same device/dtype)."""
        for name, tensor in (("embed_weight", head.embed_tokens), ("lm_head_weight", head.lm_head)):
            current = getattr(self, name)
            if tuple(tensor.shape) != tuple(current.shape):
                raise ValueError(
                    f"target {name} has shape {tuple(tensor.shape)}; drafter expects {tuple(current.shape)}"
                )
            setattr(self, name, tensor.detach().to(device=current.device, dtype=current.dtype))
        self.attached = True

    def _check(self) -> None:
        if not self.attached:
            raise RuntimeError("the drafter's target embedding / LM head are not attached: call attach_target_head()")

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        self._check()
        embeddings = nn.functional.embedding(token_ids, self.embed_weight)
        if self.embedding_multiplier != 1.0:
            embeddings = embeddings * self.embedding_multiplier
        return self.embed_proj(embeddings) if self.embed_proj is not None else embeddings

    def target_logits(self, target_hidden: torch.Tensor) -> torch.Tensor:
        """The target's own logits from its final-normed hidden states."""
        self._check()
        logits = target_hidden.to(self.lm_head_weight.dtype) @ self.lm_head_weight.T
        return softcap(logits, self.final_logit_softcapping)

    def logits(self, draft_hidden: torch.Tensor) -> torch.Tensor:
        """Draft logits through the frozen LM head (after the width bridge, if any)."""
        if self.head_proj is not None:
            draft_hidden = self.head_proj(draft_hidden)
        return self.target_logits(draft_hidden)


def softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Gemma-style final logit soft-capping: cap · tanh(logits / cap); identity when cap is None."""
    return logits if cap is None else torch.tanh(logits / cap) * cap
