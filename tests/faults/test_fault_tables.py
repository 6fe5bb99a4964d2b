"""The "what survives what" tables in the docs are the fault suite's cases, and every case names a real test."""

import importlib
from pathlib import Path

import pytest

from tests.faults.cases import CASES, table

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.faults


@pytest.mark.parametrize("doc", ["data", "training"])
def test_docs_hold_the_generated_table(doc):
    assert table(doc) in (ROOT / "docs" / f"{doc}.md").read_text(), "regenerate with python -m tests.faults.cases"


@pytest.mark.parametrize("case", CASES, ids=[case.test for case in CASES])
def test_every_case_is_a_test_of_the_suite(case):
    module, _, function = case.test.partition("::")
    assert callable(getattr(importlib.import_module(f"tests.faults.{module}"), function))
