"""The DSpark drafter (and DFlash, its Markov-free special case).

A block ``[x_anchor, mask, ...]`` is processed in parallel by draft layers whose attention reads the target's
features of the context before the anchor (KV injection). A Markov head corrects each slot by the token
drafted before it, and a confidence head predicts per-slot acceptance.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.models.gemma4.modeling_gemma4 import Gemma4RMSNorm
from transformers.models.qwen3.modeling_qwen3 import Qwen3MLP, Qwen3RMSNorm, Qwen3RotaryEmbedding

from specdec.drafters.anchors import TrainingBlocks, build_training_blocks
from specdec.drafters.attention import (
    KVInjectionAttention,
    choose_attention_backend,
    dspark_block_mask,
    dspark_dense_mask,
)
from specdec.drafters.config import DSparkConfig
from specdec.drafters.markov import ConfidenceHead, build_markov_head
from specdec.drafters.target_head import FrozenTargetHead
from specdec.sampling import draw, token_probabilities, uniform
from specdec.targets.weights import TargetHead


class DSparkDecoderLayer(nn.Module):
    """Pre-norm block whose attention also reads the injected target context.

    Qwen3 style: ``x + Attn(norm(x))`` then ``x + MLP(norm(x))``. Gemma 4 style adds sandwich norms (the
    attention and MLP outputs are normed before their residual add) and a per-layer output scalar.
    """

    def __init__(self, config: DSparkConfig) -> None:
        super().__init__()
        self.sandwich = config.block_style == "gemma4"
        norm = Gemma4RMSNorm if self.sandwich else Qwen3RMSNorm
        hidden = config.hidden_size
        self.input_layernorm = norm(hidden, eps=config.rms_norm_eps)
        self.self_attn = KVInjectionAttention(config)
        self.post_attention_layernorm = norm(hidden, eps=config.rms_norm_eps)
        self.mlp = Qwen3MLP(config.backbone_config())
        if self.sandwich:
            self.pre_feedforward_layernorm = norm(hidden, eps=config.rms_norm_eps)
            self.post_feedforward_layernorm = norm(hidden, eps=config.rms_norm_eps)
            self.register_buffer("layer_scalar", torch.ones(1))

    def forward(self, hidden, block_rotary, context_keys, context_values, mask) -> torch.Tensor:
        attended = self.self_attn(self.input_layernorm(hidden), block_rotary, context_keys, context_values, mask)
        if not self.sandwich:
            hidden = hidden + attended
            return hidden + self.mlp(self.post_attention_layernorm(hidden))
        hidden = hidden + self.post_attention_layernorm(attended)
        hidden = hidden + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(hidden)))
        return hidden * self.layer_scalar


@dataclass
class DSparkTrainingOutput:
    """Per-slot predictions of a training forward, aligned with their targets."""

    draft_logits: torch.Tensor  # [B, N, P, V], Markov-corrected when the drafter has a Markov head
    target_logits: torch.Tensor  # [B, N, P, V], the target's distribution for the same tokens (no grad)
    target_ids: torch.Tensor  # [B, N, P]
    eval_mask: torch.Tensor  # [B, N, P] bool
    confidence_logits: torch.Tensor | None  # [B, N, P] fp32
    blocks: TrainingBlocks


@dataclass
class DraftContextCache:
    """Per-layer keys/values of context positions already injected (inference)."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @property
    def length(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    def crop(self, length: int) -> None:
        self.keys = [k[:, :, :length] for k in self.keys]
        self.values = [v[:, :, :length] for v in self.values]


@dataclass
class DraftBlock:
    """A sampled draft block: tokens and the exact fp32 distributions they were drawn from."""

    tokens: torch.Tensor  # [B, P]
    probabilities: torch.Tensor  # [B, P, V] fp32 (q of the acceptance test)
    confidence_logits: torch.Tensor | None  # [B, P]


class DSparkPreTrainedModel(PreTrainedModel):
    config_class = DSparkConfig
    base_model_prefix = "dspark"
    supports_gradient_checkpointing = False
    _no_split_modules = ("DSparkDecoderLayer",)


class DSparkDrafter(DSparkPreTrainedModel):
    """DSpark / DFlash draft model. Attach the target's frozen embedding and LM head before use."""

    def __init__(self, config: DSparkConfig) -> None:
        super().__init__(config)
        num_features = len(config.target_layer_ids) * config.target_hidden_size
        self.fc = nn.Linear(num_features, config.hidden_size, bias=False)
        self.hidden_norm = (Gemma4RMSNorm if config.block_style == "gemma4" else Qwen3RMSNorm)(
            config.hidden_size, eps=config.rms_norm_eps
        )
        self.layers = nn.ModuleList(DSparkDecoderLayer(config) for _ in range(config.num_hidden_layers))
        norm = Gemma4RMSNorm if config.block_style == "gemma4" else Qwen3RMSNorm
        self.norm = norm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Qwen3RotaryEmbedding(config.backbone_config())
        self.target_head = FrozenTargetHead(config)
        self.markov_head = build_markov_head(config)
        self.confidence_head = ConfidenceHead(config) if config.enable_confidence_head else None
        self.post_init()

    def attach_target_head(self, head: TargetHead) -> None:
        """Share the target's frozen embedding and LM head (see ``specdec.targets.read_target_head``)."""
        self.target_head.attach(head)

    # ---- shared pieces -------------------------------------------------------------------------------
    def context(self, target_hidden_states: torch.Tensor) -> torch.Tensor:
        """C = RMSNorm(fc(concatenated target layer features)): the context injected in every layer."""
        return self.hidden_norm(self.fc(target_hidden_states.to(self.fc.weight.dtype)))

    def backbone(self, block_embeddings, block_positions, context, context_positions, mask) -> torch.Tensor:
        block_rotary = self.rotary_emb(block_embeddings, block_positions)
        context_rotary = self.rotary_emb(context, context_positions)
        hidden = block_embeddings
        for layer in self.layers:
            keys, values = layer.self_attn.context_key_values(context, context_rotary)
            hidden = layer(hidden, block_rotary, keys, values, mask)
        return self.norm(hidden)

    def markov_inputs(self, hidden: torch.Tensor, prev_ids: torch.Tensor):
        """Teacher-forced Markov bias and previous-token features (None for DFlash)."""
        if self.markov_head is None:
            return None, None
        return self.markov_head.teacher_forced(hidden, prev_ids), self.markov_head.features(prev_ids)

    # ---- training --------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        target_hidden_states: torch.Tensor,
        loss_mask: torch.Tensor,
        target_last_hidden_states: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> DSparkTrainingOutput:
        """Training forward over ``num_anchors`` random blocks per sequence (fresh anchors every call)."""
        config = self.config
        batch, length = input_ids.shape
        blocks = build_training_blocks(
            input_ids,
            loss_mask,
            num_anchors=config.num_anchors,
            block_size=config.block_size,
            mask_token_id=config.mask_token_id,
            first_prediction_slot=config.first_prediction_slot,
            generator=generator,
        )
        context = self.context(target_hidden_states)
        context_positions = torch.arange(length, device=input_ids.device).expand(batch, length)
        backend = choose_attention_backend(config.attention_backend, input_ids.device)
        build_mask = dspark_block_mask if backend == "flex" else dspark_dense_mask
        mask = build_mask(blocks.anchors, blocks.keep, length, config.block_size)

        embeddings = self.target_head.embed(blocks.block_input_ids).to(context.dtype)
        hidden = self.backbone(embeddings, blocks.block_positions, context, context_positions, mask)
        num_blocks = blocks.anchors.shape[1]
        hidden = hidden.view(batch, num_blocks, config.block_size, -1)[:, :, config.first_prediction_slot :]

        draft_logits = self.target_head.logits(hidden)
        prev_ids = torch.gather(input_ids, 1, (blocks.label_positions - 1).flatten(1)).view_as(blocks.labels)
        markov_bias, markov_features = self.markov_inputs(hidden, prev_ids)
        if markov_bias is not None:
            draft_logits = draft_logits + markov_bias.to(draft_logits.dtype)
        confidence = self.confidence_head(hidden, markov_features) if self.confidence_head is not None else None

        with torch.no_grad():
            # The target's distribution of the token at position q is its LM head at position q - 1.
            source = (blocks.label_positions - 1).flatten(1)
            gathered = torch.gather(
                target_last_hidden_states, 1, source[..., None].expand(-1, -1, target_last_hidden_states.shape[-1])
            )
            target_logits = self.target_head.target_logits(gathered).view(*blocks.labels.shape, -1)
        return DSparkTrainingOutput(
            draft_logits=draft_logits,
            target_logits=target_logits,
            target_ids=blocks.labels,
            eval_mask=blocks.eval_mask,
            confidence_logits=confidence,
            blocks=blocks,
        )

    # ---- inference -------------------------------------------------------------------------------------
    def new_cache(self) -> DraftContextCache:
        return DraftContextCache(keys=[], values=[])

    @torch.no_grad()
    def block_hidden(
        self,
        anchor_ids: torch.Tensor,
        anchor_position: int,
        context_features: torch.Tensor | None,
        cache: DraftContextCache,
    ) -> torch.Tensor:
        """Hidden states of the prediction slots of one block at ``anchor_position`` (batch of equal lengths).

        ``context_features`` ([B, T, L*H]) are the target features of positions ``cache.length ..
        anchor_position - 1`` not yet injected; they are appended to ``cache``. The block attends the whole
        cached context and itself, exactly as a kept training block does.
        """
        config = self.config
        batch = anchor_ids.shape[0]
        device = anchor_ids.device
        if context_features is not None and context_features.shape[1] > 0:
            context = self.context(context_features)
            start = cache.length
            positions = torch.arange(start, start + context.shape[1], device=device).expand(batch, -1)
            rotary = self.rotary_emb(context, positions)
            for index, layer in enumerate(self.layers):
                keys, values = layer.self_attn.context_key_values(context, rotary)
                if index < len(cache.keys):
                    cache.keys[index] = torch.cat([cache.keys[index], keys], dim=2)
                    cache.values[index] = torch.cat([cache.values[index], values], dim=2)
                else:
                    cache.keys.append(keys)
                    cache.values.append(values)
        if cache.length != anchor_position:
            raise ValueError(f"draft context covers {cache.length} positions; the anchor is at {anchor_position}")
        block_ids = torch.full((batch, config.block_size), config.mask_token_id, dtype=torch.long, device=device)
        block_ids[:, 0] = anchor_ids
        embeddings = self.target_head.embed(block_ids).to(self.fc.weight.dtype)
        positions = torch.arange(anchor_position, anchor_position + config.block_size, device=device).expand(batch, -1)
        rotary = self.rotary_emb(embeddings, positions)
        hidden = embeddings
        for index, layer in enumerate(self.layers):
            hidden = layer(hidden, rotary, cache.keys[index], cache.values[index], None)
        return self.norm(hidden)[:, config.first_prediction_slot :]

    def calibrated_confidence(self, logits: torch.Tensor) -> torch.Tensor:
        """Confidence logits [..., P] divided by the fitted per-position STS temperatures (identity if none)."""
        temperatures = self.config.confidence_temperatures
        if not temperatures:
            return logits
        scale = torch.ones(logits.shape[-1], dtype=logits.dtype, device=logits.device)
        count = min(len(temperatures), logits.shape[-1])
        scale[:count] = torch.tensor(temperatures[:count], dtype=logits.dtype, device=logits.device)
        return logits / scale

    @torch.no_grad()
    def sample_block(
        self,
        hidden: torch.Tensor,
        anchor_ids: torch.Tensor,
        temperature: float,
        generator: torch.Generator | None = None,
        uniforms: torch.Tensor | None = None,
    ) -> DraftBlock:
        """Draft the block's tokens slot by slot; each slot's logits are corrected by the token just drafted.

        ``uniforms`` [B, P] (see :func:`specdec.sampling.draw`) make the block a pure function of its
        inputs, which is how a compiled draft step samples; without them they are drawn from ``generator``.
        """
        base_logits = self.target_head.logits(hidden)
        if uniforms is None:
            uniforms = uniform(tuple(base_logits.shape[:2]), hidden.device, generator)
        prev = anchor_ids
        state = self.markov_head.initial_state(hidden[:, 0]) if self.markov_head is not None else None
        tokens, probabilities, previous = [], [], []
        for slot in range(hidden.shape[1]):
            logits = base_logits[:, slot]
            if self.markov_head is not None:
                bias, state = self.markov_head.step(hidden[:, slot], prev, state)
                logits = logits.float() + bias.float()
            q = token_probabilities(logits, temperature)
            previous.append(prev)
            prev = draw(q, uniforms=uniforms[:, slot])
            tokens.append(prev)
            probabilities.append(q)
        confidence = None
        if self.confidence_head is not None:
            prev_ids = torch.stack(previous, dim=1)
            features = self.markov_head.features(prev_ids) if self.markov_head is not None else None
            confidence = self.calibrated_confidence(self.confidence_head(hidden, features))
        return DraftBlock(
            tokens=torch.stack(tokens, dim=1),
            probabilities=torch.stack(probabilities, dim=1),
            confidence_logits=confidence,
        )
