"""Triton kernels for the acceptance test of one verified round, without an [A, W, V] probability tensor.

The reference is ``specdec.decoding.engine.acceptance_test``: it materialises the target's fp32 probabilities of
every verified slot, gathers p(d) and q(d), and draws the token after the accepted drafts from
``norm(max(p − q, 0))``. Here one program per (row, slot) walks the vocabulary once with an online max and
sum of ``exp(logit / T)`` (greedy: the first-index argmax instead) and computes p(d) from them; the
accept / cumprod / stop logic runs in plain torch on the [A, W] results, with the same ops as the reference;
then one program per row recomputes p block by block at its next slot from the saved max and sum, takes the
residual's mass in a first pass and finds the drawn token by an inverse-CDF scan (``tl.cumsum`` per block
with a running carry) in a second. A residual of mass <= 1e-8 means p itself is drawn, as in
``specdec.sampling.residual_distribution``; greedy takes the argmax of the next slot and needs no scan.

Precision: the logits are read in their own dtype and computed on in fp32, like ``token_probabilities``; the
masses and the running carry of the scan are fp64 (``FP64_CARRY``), as in ``specdec.sampling.draw``, which
the interpreter and every CUDA GPU Triton targets support (a memory-bound pass of one program per row, so
fp64's lower throughput does not show). With fp32 instead, a 150 k vocabulary moves about 1e-6 of the
mass by rounding; the scan then never returns a token of zero probability either (a threshold above the
rounded total returns the last token of positive probability). The kernel's p differs from
``torch.softmax`` by float rounding, so tokens equal the reference's except for draws landing within rounding
of a CDF boundary or an acceptance ratio within rounding of its uniform.

Runs on CUDA, and on CPU when ``TRITON_INTERPRET=1`` was set before Triton was first imported.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from specdec.sampling import GREEDY_TEMPERATURE, accept_draft

DEFAULT_BLOCK_SIZE = 4096
MIN_RESIDUAL_MASS = 1e-8  # residual_distribution's: below it the residual is rounding and p is drawn instead
FP64_CARRY = True


@triton.jit
def _slot_statistics_kernel(
    logits_ptr,
    q_ptr,
    drafts_ptr,
    max_ptr,
    sum_ptr,
    argmax_ptr,
    p_draft_ptr,
    q_draft_ptr,
    logits_row_stride,
    logits_slot_stride,
    q_row_stride,
    q_slot_stride,
    drafts_row_stride,
    width,
    vocab,
    temperature,
    GREEDY: tl.constexpr,
    BLOCK: tl.constexpr,
):
    program = tl.program_id(0)
    row = (program // width).to(tl.int64)
    slot = program % width
    logits_base = logits_ptr + row * logits_row_stride + slot * logits_slot_stride
    offsets = tl.arange(0, BLOCK)

    has_draft = slot < width - 1  # the last slot only follows the drafts
    draft = tl.load(drafts_ptr + row * drafts_row_stride + slot, mask=has_draft, other=0)
    q_draft = tl.load(q_ptr + row * q_row_stride + slot * q_slot_stride + draft)
    draft_index = row * (width - 1) + slot
    if GREEDY:
        best = float("-inf")
        best_index = 0
        for start in range(0, vocab, BLOCK):
            cols = start + offsets
            logits = tl.load(logits_base + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
            block_best = tl.max(logits, axis=0)
            block_index = tl.min(tl.where(logits == block_best, cols, vocab), axis=0)
            best_index = tl.where(block_best > best, block_index, best_index)  # strictly: the first index wins
            best = tl.maximum(best, block_best)
        tl.store(argmax_ptr + program, best_index.to(tl.int64))
        p_draft = tl.where(draft == best_index, 1.0, 0.0)
    else:
        running_max = float("-inf")
        running_sum = 0.0
        for start in range(0, vocab, BLOCK):
            cols = start + offsets
            logits = tl.load(logits_base + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
            scaled = logits / temperature
            new_max = tl.maximum(running_max, tl.max(scaled, axis=0))
            running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(scaled - new_max), axis=0)
            running_max = new_max
        tl.store(max_ptr + program, running_max)
        tl.store(sum_ptr + program, running_sum)
        draft_logit = tl.load(logits_base + draft).to(tl.float32) / temperature
        p_draft = tl.exp(draft_logit - running_max) / running_sum
    tl.store(p_draft_ptr + draft_index, p_draft, mask=has_draft)
    tl.store(q_draft_ptr + draft_index, q_draft, mask=has_draft)


@triton.jit
def _residual_draw_kernel(
    logits_ptr,
    q_ptr,
    slots_ptr,
    max_ptr,
    sum_ptr,
    u_ptr,
    tokens_ptr,
    logits_row_stride,
    logits_slot_stride,
    q_row_stride,
    q_slot_stride,
    width,
    vocab,
    temperature,
    min_mass,
    CARRY: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + row)
    running_max = tl.load(max_ptr + row * width + slot)
    running_sum = tl.load(sum_ptr + row * width + slot)
    logits_base = logits_ptr + row * logits_row_stride + slot * logits_slot_stride
    q_base = q_ptr + row * q_row_stride + slot * q_slot_stride
    offsets = tl.arange(0, BLOCK)

    # pass 1: the mass of max(p − q, 0), and of p (what a draw from p scales its uniform by)
    residual_mass = tl.zeros([BLOCK], dtype=CARRY)
    target_mass = tl.zeros([BLOCK], dtype=CARRY)
    for start in range(0, vocab, BLOCK):
        cols = start + offsets
        valid = cols < vocab
        logits = tl.load(logits_base + cols, mask=valid, other=float("-inf")).to(tl.float32)
        p = tl.exp(logits / temperature - running_max) / running_sum
        q = tl.load(q_base + cols, mask=valid, other=0.0)
        residual_mass += tl.maximum(p - q, 0.0).to(CARRY)
        target_mass += p.to(CARRY)
    residual_total = tl.sum(residual_mass, axis=0)
    use_residual = residual_total > min_mass
    total = tl.where(use_residual, residual_total, tl.sum(target_mass, axis=0))
    threshold = tl.load(u_ptr + row).to(CARRY) * total

    # pass 2: the first token whose cumulative weight exceeds u · total, stopping at the block that holds it
    token = vocab
    last_positive = tl.full([BLOCK], -1, dtype=tl.int32)
    carry = tl.zeros_like(total)
    start = 0
    while (start < vocab) & (token == vocab):
        cols = start + offsets
        valid = cols < vocab
        logits = tl.load(logits_base + cols, mask=valid, other=float("-inf")).to(tl.float32)
        p = tl.exp(logits / temperature - running_max) / running_sum
        q = tl.load(q_base + cols, mask=valid, other=0.0)
        weight = tl.where(use_residual, tl.maximum(p - q, 0.0), p).to(CARRY)
        cumulative = carry + tl.cumsum(weight, axis=0)
        positive = weight > 0  # a token of zero weight is never drawn, whatever the rounding of the carry
        token = tl.minimum(token, tl.min(tl.where((cumulative > threshold) & positive, cols, vocab), axis=0))
        last_positive = tl.maximum(last_positive, tl.where(positive, cols, -1))
        carry += tl.sum(weight, axis=0)
        start += BLOCK
    last_positive_token = tl.max(last_positive, axis=0)
    fallback = tl.where(last_positive_token >= 0, last_positive_token, vocab - 1)  # threshold above the total
    tl.store(tokens_ptr + row, tl.where(token < vocab, token, fallback).to(tl.int64))


def _block_size(requested: int | None, vocab: int) -> int:
    """A power of two no larger than ``requested`` (default ``DEFAULT_BLOCK_SIZE``) nor than needed for ``vocab``."""
    block = 1 << (max(requested or DEFAULT_BLOCK_SIZE, 16).bit_length() - 1)
    return min(block, max(triton.next_power_of_2(vocab), 16))


def _launch_options(block: int) -> dict[str, int]:
    return {"num_warps": 8 if block >= 2048 else 4}


def _rows_contiguous(tensor: torch.Tensor) -> torch.Tensor:
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()


def accepted_prefix(
    p_draft: torch.Tensor,
    q_draft: torch.Tensor,
    drafts: torch.Tensor,
    counts: torch.Tensor,
    u: torch.Tensor,
    stops: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Accepted drafts per row and whether a stop token among them ended the row: the reference's own ops on
    the [A, W − 1] probabilities of the drafted tokens, so the two paths decide alike from equal inputs."""
    rows, slots = drafts.shape
    slot = torch.arange(slots, device=drafts.device)
    passed = accept_draft(p_draft, q_draft, u) & (slot[None] < counts[:, None])
    accepted = passed.long().cumprod(dim=-1).sum(dim=-1)
    stop_hit = torch.isin(drafts, stops) & (slot[None] < accepted[:, None])
    sentinel = torch.ones(rows, 1, dtype=torch.bool, device=drafts.device)
    first_stop = torch.cat([stop_hit, sentinel], dim=-1).long().argmax(dim=-1)  # slots when there is none
    stopped_early = first_stop < slots
    return torch.where(stopped_early, first_stop + 1, accepted), stopped_early


def draft_statistics(
    logits: torch.Tensor,
    q: torch.Tensor,
    drafts: torch.Tensor,
    temperature: float,
    *,
    block_size: int | None = None,
) -> dict[str, torch.Tensor]:
    """The vocabulary pass over every (row, slot): p(d) and q(d) [A, W − 1] of the drafted tokens, and per slot
    [A, W] the max and sum of ``exp(logits / T − max)`` (sampling) or the first-index argmax (greedy)."""
    rows, width, vocab = logits.shape
    device = logits.device
    greedy = temperature < GREEDY_TEMPERATURE
    logits, q = _rows_contiguous(logits), _rows_contiguous(q.float())
    if width == 1:  # no draft at all: the kernel still reads a (masked) draft per row
        drafts = torch.zeros(rows, 1, dtype=torch.long, device=device)
    drafts = _rows_contiguous(drafts.long())
    slots = max(width - 1, 1)
    stats = {
        "max": torch.empty(rows, width, dtype=torch.float32, device=device),
        "sum": torch.empty(rows, width, dtype=torch.float32, device=device),
        "argmax": torch.empty(rows, width, dtype=torch.long, device=device),
        "p_draft": torch.empty(rows, slots, dtype=torch.float32, device=device),
        "q_draft": torch.empty(rows, slots, dtype=torch.float32, device=device),
    }
    block = _block_size(block_size, vocab)
    if rows:
        _slot_statistics_kernel[(rows * width,)](
            logits,
            q,
            drafts,
            stats["max"],
            stats["sum"],
            stats["argmax"],
            stats["p_draft"],
            stats["q_draft"],
            logits.stride(0),
            logits.stride(1),
            q.stride(0),
            q.stride(1),
            drafts.stride(0),
            width,
            vocab,
            1.0 if greedy else float(temperature),
            GREEDY=greedy,
            BLOCK=block,
            **_launch_options(block),
        )
    stats["p_draft"], stats["q_draft"] = stats["p_draft"][:, : width - 1], stats["q_draft"][:, : width - 1]
    return stats


def residual_draw(
    logits: torch.Tensor,
    q: torch.Tensor,
    slots: torch.Tensor,
    stats: dict[str, torch.Tensor],
    u_next: torch.Tensor,
    temperature: float,
    *,
    block_size: int | None = None,
    fp64_carry: bool = FP64_CARRY,
) -> torch.Tensor:
    """One token per row drawn from ``norm(max(p − q, 0))`` at slot ``slots[row]`` (p where that has no mass)."""
    rows, width, vocab = logits.shape
    logits, q = _rows_contiguous(logits), _rows_contiguous(q.float())
    tokens = torch.empty(rows, dtype=torch.long, device=logits.device)
    block = _block_size(block_size, vocab)
    if rows:
        _residual_draw_kernel[(rows,)](
            logits,
            q,
            slots.long().contiguous(),
            stats["max"],
            stats["sum"],
            u_next.float().contiguous(),
            tokens,
            logits.stride(0),
            logits.stride(1),
            q.stride(0),
            q.stride(1),
            width,
            vocab,
            float(temperature),
            MIN_RESIDUAL_MASS,
            CARRY=tl.float64 if fp64_carry else tl.float32,
            BLOCK=block,
            **_launch_options(block),
        )
    return tokens


def verify_round(
    logits: torch.Tensor,
    q: torch.Tensor,
    drafts: torch.Tensor,
    counts: torch.Tensor,
    u: torch.Tensor,
    u_next: torch.Tensor,
    stops: torch.Tensor,
    temperature: float,
    *,
    block_size: int | None = None,
    fp64_carry: bool = FP64_CARRY,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The acceptance test of one round, as ``acceptance_test(temperature)(logits, q, drafts, counts, u, u_next,
    stops)``: accepted drafts [A], the next token [A], whether a stop token among the accepted drafts ended the
    row [A] and whether the next token is a stop token [A].

    ``logits`` [A, W, V] (any float dtype) are the target's at the anchor and each draft, ``q`` [A, W, V] the
    drafter's fp32 distributions, ``drafts`` [A, W − 1] with ``counts`` [A] of them verified, ``u`` [A, W − 1]
    the acceptance uniforms and ``u_next`` [A] the uniform of the residual or bonus draw.
    """
    stats = draft_statistics(logits, q, drafts, temperature, block_size=block_size)
    accepted, stopped_early = accepted_prefix(stats["p_draft"], stats["q_draft"], drafts, counts, u, stops)
    if temperature < GREEDY_TEMPERATURE:  # the residual of a one-hot p is that one-hot: its argmax is drawn
        next_tokens = stats["argmax"].gather(1, accepted[:, None]).squeeze(1)
    else:
        next_tokens = residual_draw(
            logits, q, accepted, stats, u_next, temperature, block_size=block_size, fp64_carry=fp64_carry
        )
    return accepted, next_tokens, stopped_early, torch.isin(next_tokens, stops)
