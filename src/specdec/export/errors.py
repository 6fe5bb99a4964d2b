"""Errors of the export package: a drafter a format cannot express, and an export that breaks its contract."""

from __future__ import annotations


class UnsupportedDrafterError(ValueError):
    """The drafter has a feature the target format cannot represent; the message says which and what to use."""

    def __init__(self, format_name: str, reason: str) -> None:
        super().__init__(f"cannot export to {format_name}: {reason}")
        self.format_name = format_name
        self.reason = reason


class ExportValidationError(ValueError):
    """An exported directory breaks its engine's contract; ``problems`` lists every finding, each naming a file."""

    def __init__(self, directory: str, problems: list[str]) -> None:
        lines = "\n".join(f"  - {problem}" for problem in problems)
        super().__init__(f"export at {directory} is invalid ({len(problems)} problem(s)):\n{lines}")
        self.directory = directory
        self.problems = problems


class ParityError(AssertionError):
    """The drafter rebuilt from an export does not reproduce the original drafter's logits."""
