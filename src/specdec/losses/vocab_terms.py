"""Per-row vocabulary-sized loss terms with a choice of implementation.

``impl`` picks how the terms are computed; all agree in value and gradient:

- ``"reference"``: plain PyTorch with full fp32 softmaxes (:mod:`specdec.losses.reference`), the ground truth.
- ``"chunked"``: pure PyTorch, loops over vocabulary chunks (:mod:`specdec.losses.chunked`); memory-lean on
  any device.
- ``"triton"``: the kernels of ``specdec.kernels.vocab_losses``; CUDA, or CPU under ``TRITON_INTERPRET=1``.
- ``"auto"``: ``"triton"`` for CUDA tensors when Triton is installed, else ``"chunked"``.

Logits may have any leading shape and any float dtype; the results are fp32 with the leading shape, and the
gradient reaches the draft logits only (target logits are treated as frozen). ``row_mask`` marks the rows
that count: the others are not read by the lean paths and get a zero loss and zero gradient.
"""

from __future__ import annotations

from typing import Literal

import torch

from specdec.kernels import kernels_usable_on
from specdec.losses.chunked import DEFAULT_CHUNK_SIZE, DSparkTermsChunked, SoftCrossEntropyChunked
from specdec.losses.reference import dspark_terms_reference, soft_cross_entropy_reference

Impl = Literal["auto", "reference", "chunked", "triton"]
IMPLS: tuple[str, ...] = ("auto", "reference", "chunked", "triton")


def resolve_impl(impl: str, device: torch.device) -> str:
    """The concrete implementation ``impl`` stands for on ``device``, refusing one that cannot run there."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "triton" if device.type == "cuda" and kernels_usable_on("cuda") else "chunked"
    if impl == "triton" and not kernels_usable_on(device.type):
        raise RuntimeError(
            f"impl='triton' cannot run on {device.type}: it needs Triton and a CUDA device, "
            "or TRITON_INTERPRET=1 set before Triton is imported for CPU tensors"
        )
    return impl


def _check_shapes(
    draft_logits: torch.Tensor,
    target_logits: torch.Tensor,
    target_ids: torch.Tensor | None,
    row_mask: torch.Tensor | None,
) -> None:
    if target_logits.shape != draft_logits.shape:
        raise ValueError(f"target_logits {tuple(target_logits.shape)} != draft_logits {tuple(draft_logits.shape)}")
    leading = draft_logits.shape[:-1]
    if target_ids is not None and target_ids.shape != leading:
        raise ValueError(f"target_ids {tuple(target_ids.shape)} must match the logits' leading shape {tuple(leading)}")
    if row_mask is not None and (row_mask.shape != leading or row_mask.dtype != torch.bool):
        raise ValueError(
            f"row_mask must be a bool tensor of shape {tuple(leading)}, got {row_mask.dtype} {tuple(row_mask.shape)}"
        )


def _selected_rows(row_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Indices of the rows to compute, or ``None`` when every row counts (the lean paths then skip indexing)."""
    if row_mask is None:
        return None
    flat = row_mask.reshape(-1)
    rows = flat.nonzero().squeeze(-1)
    return None if rows.numel() == flat.numel() else rows


def dspark_vocab_terms(
    draft_logits: torch.Tensor,
    target_logits: torch.Tensor,
    target_ids: torch.Tensor,
    *,
    row_mask: torch.Tensor | None = None,
    impl: Impl = "auto",
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(ce, l1)``: ``ce = logsumexp(d) − d[y]``, ``l1 = ‖softmax(d) − softmax(t)‖₁`` (= 2·TV).

    ``chunk_size`` is the number of vocabulary columns the lean paths handle at once (Triton rounds it down
    to a power of two); ``None`` takes each path's default.
    """
    _check_shapes(draft_logits, target_logits, target_ids, row_mask)
    impl = resolve_impl(impl, draft_logits.device)
    if impl == "reference":
        return dspark_terms_reference(draft_logits, target_logits, target_ids, row_mask)
    leading, vocab = draft_logits.shape[:-1], draft_logits.shape[-1]
    draft_rows = draft_logits.reshape(-1, vocab)
    target_rows = target_logits.detach().reshape(-1, vocab)
    ids = target_ids.reshape(-1)
    rows = _selected_rows(row_mask)
    if impl == "triton":
        from specdec.kernels.vocab_losses import dspark_terms_triton

        ce, l1 = dspark_terms_triton(draft_rows, target_rows, ids, rows, chunk_size)
    else:
        ce, l1 = DSparkTermsChunked.apply(draft_rows, target_rows, ids, rows, chunk_size or DEFAULT_CHUNK_SIZE)
    return ce.reshape(leading), l1.reshape(leading)


def soft_cross_entropy(
    draft_logits: torch.Tensor,
    target_logits: torch.Tensor,
    *,
    row_mask: torch.Tensor | None = None,
    impl: Impl = "auto",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Per-row ``−Σ_v softmax(t)_v · log_softmax(d)_v``; the target arrives as logits and is softmaxed inside.

    Taking logits rather than probabilities lets the lean paths avoid an fp32 ``[rows, V]`` probability tensor.
    """
    _check_shapes(draft_logits, target_logits, None, row_mask)
    impl = resolve_impl(impl, draft_logits.device)
    if impl == "reference":
        return soft_cross_entropy_reference(draft_logits, target_logits, row_mask)
    leading, vocab = draft_logits.shape[:-1], draft_logits.shape[-1]
    draft_rows = draft_logits.reshape(-1, vocab)
    target_rows = target_logits.detach().reshape(-1, vocab)
    rows = _selected_rows(row_mask)
    if impl == "triton":
        from specdec.kernels.vocab_losses import soft_cross_entropy_triton

        loss = soft_cross_entropy_triton(draft_rows, target_rows, rows, chunk_size)
    else:
        loss = SoftCrossEntropyChunked.apply(draft_rows, target_rows, rows, chunk_size or DEFAULT_CHUNK_SIZE)
    return loss.reshape(leading)
