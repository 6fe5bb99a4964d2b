"""Targets: load an HF causal LM, capture its layer features, read its frozen embedding and LM head."""

from specdec.targets.geometry import TargetGeometry
from specdec.targets.layers import (
    LayerIdError,
    TargetFeatures,
    capture_target_features,
    decoder_of,
    hf_hidden_states_index,
    validate_layer_ids,
)
from specdec.targets.loading import (
    TINY_TARGET,
    TINY_TARGET_PATH,
    Runtime,
    Target,
    TargetLocation,
    choose_runtime,
    load_target,
    resolve_target,
)
from specdec.targets.weights import TargetHead, read_target_head

__all__ = [
    "TINY_TARGET",
    "TINY_TARGET_PATH",
    "LayerIdError",
    "Runtime",
    "Target",
    "TargetFeatures",
    "TargetGeometry",
    "TargetHead",
    "TargetLocation",
    "capture_target_features",
    "choose_runtime",
    "decoder_of",
    "hf_hidden_states_index",
    "load_target",
    "read_target_head",
    "resolve_target",
    "validate_layer_ids",
]
