"""The fault-injection cases and what survives each: the source of the "what survives what" tables in
docs/data.md and docs/training.md (``python -m tests.faults.cases`` prints them; a test keeps the docs in step).
"""

from __future__ import annotations

from typing import NamedTuple


class Case(NamedTuple):
    doc: str  # the page whose table lists the case
    fault: str
    survives: str
    test: str  # module::function in tests/faults


CASES = (
    Case(
        "data",
        "429 / 500 answers, slow responses, connections reset before or after the server answered (random, seeded)",
        "every input answered exactly once, equal to an undisturbed run (seeded sampling included)",
        "test_regeneration_faults::test_injected_faults_at_random_leave_every_answer_exactly_once",
    ),
    Case(
        "data",
        "the regeneration server killed (SIGKILL) mid-run and restarted on the same port",
        "the client retries through the outage; every input answered exactly once, equal to an undisturbed run",
        "test_regeneration_faults::test_server_killed_and_restarted_mid_run",
    ),
    Case(
        "data",
        "`specdec data regenerate` killed (SIGKILL) at random points, three times in a row, behind a faulty network",
        "the rerun of the same command finishes; no answer lost or written twice",
        "test_regeneration_faults::test_client_killed_at_random_points_again_and_again_behind_a_faulty_network",
    ),
    Case(
        "data",
        "disk full (ENOSPC) while writing a shard, committing it, or appending its progress line, four times",
        "an error naming the file and saying to rerun; stored samples kept; the rerun completes a cache equal to an "
        "uninterrupted build that `cache verify` accepts",
        "test_cache_faults::test_a_disk_that_fills_up_again_and_again_fails_naming_the_file_then_the_rerun_completes",
    ),
    Case(
        "data",
        "`specdec cache build` killed (SIGKILL) at random points, three times in a row",
        "the rerun completes a cache equal, sample for sample, to an uninterrupted build; `cache verify` accepts it",
        "test_cache_faults::test_cache_build_killed_at_random_points_again_and_again",
    ),
    Case(
        "data",
        "a non-UTF-8 line or JSON document in the input of `cache build`",
        "counted and named by file and line; the build goes on",
        "test_input_faults::test_cache_build_counts_a_non_utf8_line_and_goes_on",
    ),
    Case(
        "data",
        "a 10 MB record with a small `max_length`",
        "tokenised only as far as `max_length` needs (bounded time and memory)",
        "test_input_faults::test_a_long_record_is_tokenised_only_as_far_as_max_length_needs",
    ),
    Case(
        "training",
        "`specdec fit` killed (SIGKILL) mid-run, between or during checkpoint saves",
        "resuming from `last.ckpt` reaches the weights and per-step losses of an uninterrupted run",
        "test_training_faults::test_fit_killed_mid_run_resumes_to_the_weights_and_losses_of_an_uninterrupted_run",
    ),
    Case(
        "training",
        "a truncated (half-written) checkpoint given to `--ckpt_path`",
        "refused, naming the file and the newest intact checkpoint to resume from; saves are atomic, so a kill "
        "during a save leaves the previous checkpoint",
        "test_training_faults::test_a_damaged_checkpoint_is_refused_naming_the_one_to_resume_from",
    ),
)


def table(doc: str) -> str:
    """The markdown table of ``doc``'s cases."""
    rows = ["| Fault | What survives | Case (`tests/faults/`) |", "| --- | --- | --- |"]
    for case in CASES:
        if case.doc == doc:
            module, _, function = case.test.partition("::")
            rows.append(f"| {case.fault} | {case.survives} | `{module}.py::{function}` |")
    return "\n".join(rows)


if __name__ == "__main__":
    for doc in ("data", "training"):
        print(f"docs/{doc}.md:\n\n{table(doc)}\n")
