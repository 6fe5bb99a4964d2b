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
class DrafterHolder(Protocol):
    """A drafter and the target it was trained for: all that checks on the weights alone (export parity) need."""

    drafter: nn.Module
    target_name: str


@runtime_checkable
class DecodableModule(DrafterHolder, Protocol):
    """A drafter on the module's device with the target head attached, and how to decode with it."""

    decoding_options: DecodingOptions
    device: torch.device

    def load_target(self) -> Target:
        """The target model, loaded once on the module's device."""
        ...


DRAFTER_HOLDER_MEMBERS = ("drafter", "target_name")
DECODABLE_MEMBERS = (*DRAFTER_HOLDER_MEMBERS, "decoding_options", "device", "load_target")


def _require(module: object, members: tuple[str, ...], protocol: str, user: str) -> None:
    missing = [name for name in members if not hasattr(module, name)]
    if missing:
        raise TypeError(f"{user} needs a module with {', '.join(missing)} (see specdec.lightning.{protocol})")


def as_decodable(module: object, user: str) -> DecodableModule:
    """``module`` typed as :class:`DecodableModule`, or a TypeError naming what ``user`` misses on it."""
    _require(module, DECODABLE_MEMBERS, "DecodableModule", user)
    return module  # type: ignore[return-value]


def as_drafter_holder(module: object, user: str) -> DrafterHolder:
    """``module`` typed as :class:`DrafterHolder`, or a TypeError naming what ``user`` misses on it."""
    _require(module, DRAFTER_HOLDER_MEMBERS, "DrafterHolder", user)
    return module  # type: ignore[return-value]
