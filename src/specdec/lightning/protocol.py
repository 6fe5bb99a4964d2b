"""What a LightningModule exposes to be decoded against its target: the contract of ``specdec test`` and of the
in-loop decoding callbacks (speedup, calibration, acceptance simulation, export parity).

Every :class:`~specdec.lightning.DrafterModule` satisfies it; a module of one's own does too by holding these
attributes, and can then reuse :class:`~specdec.lightning.speculative_test.SpeculativeTest` and the callbacks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch
from torch import nn

from specdec.decoding.options import DecodingOptions

if TYPE_CHECKING:
    from specdec.targets import Target


@runtime_checkable
class DecodableModule(Protocol):
    """A drafter on the module's device with the target head attached, and how to decode with it."""

    drafter: nn.Module
    target_name: str
    decoding_options: DecodingOptions
    device: torch.device

    def load_target(self) -> Target:
        """The target model, loaded once on the module's device."""
        ...


DECODABLE_MEMBERS = ("drafter", "target_name", "decoding_options", "device", "load_target")


def as_decodable(module: object, user: str) -> DecodableModule:
    """``module`` typed as :class:`DecodableModule`, or a TypeError naming what ``user`` misses on it."""
    missing = [name for name in DECODABLE_MEMBERS if not hasattr(module, name)]
    if missing:
        raise TypeError(f"{user} needs a module with {', '.join(missing)} (see specdec.lightning.DecodableModule)")
    return module  # type: ignore[return-value]
