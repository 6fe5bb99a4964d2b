"""Layer-id conventions of each engine field, converted from specdec's (the only place this happens).

specdec's layer id L is the output of decoder layer L, 0-based, before the final norm (HF ``hidden_states[L+1]``).

=====================================================  ==========================  ==============
field                                                  meaning                      from specdec L
=====================================================  ==========================  ==============
DeepSpec / SGLang ``target_layer_ids`` (DSpark)        output of layer L            L
SGLang ``eagle_config.eagle_aux_hidden_state_layer_ids``  output of layer L (+1 inside)  L
z-lab / SGLang ``dflash_config.target_layer_ids``      output of layer L            L
vLLM ``eagle_aux_hidden_state_layer_ids`` (EAGLE3)     capture index (input of L+1)  L + 1
speculators ``aux_hidden_state_layer_ids`` (DFlash/DSpark)  capture index          L + 1
=====================================================  ==========================  ==============
"""

from __future__ import annotations

from collections.abc import Sequence


def output_of_layer_ids(layer_ids: Sequence[int]) -> list[int]:
    """DeepSpec, z-lab DFlash and SGLang config fields use specdec's own convention."""
    return [int(layer_id) for layer_id in layer_ids]


def vllm_capture_ids(layer_ids: Sequence[int]) -> list[int]:
    """vLLM captures the input of layer i, i.e. the output of layer i - 1: specdec L becomes L + 1."""
    return [int(layer_id) + 1 for layer_id in layer_ids]
