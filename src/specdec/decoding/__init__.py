"""Speculative decoding: the fp32 sampling path, proposals of each drafter, verification and its baseline."""

from specdec.decoding.engine import DecodeOutput, GenerationResult, SpeculativeDecoder, autoregressive_generate
from specdec.decoding.options import DecodingOptions
from specdec.decoding.proposers import DraftRequest, DSparkProposer, Eagle3Proposer, Proposal, proposer_for
from specdec.decoding.scheduler import DynamicTopK, PrefixScheduler, StepsPerSecond, profile_verification
from specdec.decoding.simulator import RecordedRound, RoundRecorder, simulate
from specdec.decoding.target_session import TargetSession, TargetStep
from specdec.decoding.temperature_scaling import CalibrationRounds, calibrate, fit_sequential_temperatures
from specdec.decoding.tree import TreeShape, TreeSpeculativeDecoder, verify_tree
from specdec.decoding.truncation import DynamicThreshold, FixedLength, StaticThreshold, TruncationPolicy, survival
from specdec.sampling import (
    GREEDY_TEMPERATURE,
    accept_draft,
    draw,
    residual_distribution,
    token_probabilities,
    uniform,
)

__all__ = [
    "GREEDY_TEMPERATURE",
    "CalibrationRounds",
    "DSparkProposer",
    "DecodeOutput",
    "DecodingOptions",
    "DraftRequest",
    "DynamicThreshold",
    "DynamicTopK",
    "Eagle3Proposer",
    "FixedLength",
    "GenerationResult",
    "PrefixScheduler",
    "Proposal",
    "RecordedRound",
    "RoundRecorder",
    "SpeculativeDecoder",
    "StaticThreshold",
    "StepsPerSecond",
    "TargetSession",
    "TargetStep",
    "TreeShape",
    "TreeSpeculativeDecoder",
    "TruncationPolicy",
    "accept_draft",
    "autoregressive_generate",
    "calibrate",
    "draw",
    "fit_sequential_temperatures",
    "profile_verification",
    "proposer_for",
    "residual_distribution",
    "simulate",
    "survival",
    "token_probabilities",
    "uniform",
    "verify_tree",
]
