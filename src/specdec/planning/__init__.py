"""What a drafter buys on a serving stack: expected tokens/s, speedup and cost per concurrency, before deploying.

:mod:`~specdec.planning.profile` holds what a round costs (measured on the local target or given as a table),
:mod:`~specdec.planning.plan` combines it with the acceptance by position an evaluation measured, and
:mod:`~specdec.planning.commands` is ``specdec plan profile`` / ``specdec plan speedup``.
"""

from specdec.planning.plan import AcceptanceCurve, PlanRow, plan, read_acceptance
from specdec.planning.profile import LatencyProfile, measure_profile

__all__ = ["AcceptanceCurve", "LatencyProfile", "PlanRow", "measure_profile", "plan", "read_acceptance"]
