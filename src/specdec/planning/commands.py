"""``specdec plan profile`` (measure a latency profile here) and ``specdec plan speedup`` (the plan itself)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from specdec.lightning.drafter_directory import PROVENANCE_FILE

DEFAULT_PROMPT = "Write a Python function that returns the sum of the even numbers in a list."


def _recorded_target(drafter: Path) -> str | None:
    provenance = drafter / PROVENANCE_FILE
    if drafter.is_dir() and provenance.is_file():
        return json.loads(provenance.read_text()).get("target")
    return None


def plan_profile(
    drafter: Path,
    output: Path = Path("plan/profile.yaml"),
    target: str | None = None,
    concurrency: list[int] | int = 1,
    engine: str = "compiled",
    max_draft_tokens: int | None = None,
    temperature: float = 1.0,
    device: str = "auto",
    repeats: int = 7,
    prompt: str = DEFAULT_PROMPT,
) -> None:
    """Measure what a decoding round costs on this machine (target forwards, draft step, overheads) into a YAML.

    Args:
        drafter: the drafter (an HF drafter directory such as ``runs/quickstart/checkpoints/last.drafter``, or a
            Lightning ``.ckpt``).
        output: where the latency profile goes (the input of ``specdec plan speedup --profile``).
        target: the target (default: the one recorded with the drafter).
        concurrency: concurrent requests to profile, one number or a list (``'[1, 4, 16]'``).
        engine: the decoding engine to time (``compiled``, ``static`` or ``eager``; what ``specdec test`` runs).
        max_draft_tokens: cap on drafts per round (default: all the drafter predicts).
        temperature: sampling temperature of the timed decodes (costs hardly depend on it).
        device: auto, cpu, cuda or cuda:N.
        repeats: timed forwards per point (the median is kept).
        prompt: the user message the timed decodes answer.
    """
    from specdec.decoding import SpeculativeDecoder
    from specdec.decoding.evaluate import render_chat, stop_tokens_of
    from specdec.decoding.options import DecodingOptions
    from specdec.export.source import load_drafter
    from specdec.planning.profile import measure_profile
    from specdec.targets import load_target

    drafter = Path(drafter)
    target = target or _recorded_target(drafter)
    if target is None:
        raise ValueError(f"{drafter}: no target recorded with the drafter; pass --target")
    levels = [concurrency] if isinstance(concurrency, int) else list(concurrency)
    loaded = load_target(target, device=device)
    model = load_drafter(drafter, target).to(next(loaded.model.parameters()).device)
    options = DecodingOptions(temperature=temperature, max_new_tokens=64, engine=engine)
    decoder = SpeculativeDecoder(
        loaded.model,
        model,
        temperature=temperature,
        max_new_tokens=options.max_new_tokens,
        stop_token_ids=stop_tokens_of(loaded, options),
        max_draft_tokens=max_draft_tokens,
        engine=engine,
    )
    ids = render_chat(loaded, [{"role": "user", "content": prompt}], options)
    for rows in levels:
        print(f"plan profile: warming up {engine} decoding of {rows} request(s)", file=sys.stderr)
        decoder.warm_up([ids] * rows)
    profile = measure_profile(decoder, ids, levels, repeats=repeats)
    profile.source.update({"target": target, "drafter": str(drafter)})
    profile.save(output)
    print(f"latency profile of {len(levels)} concurrency level(s) written to {output}")


def plan_speedup(
    results: Path,
    profile: Path,
    concurrency: list[int] | int = 1,
    gpu_hour_price: float | None = None,
    max_draft_tokens: int | None = None,
    mode: str | None = None,
    output_dir: Path = Path("plan"),
) -> None:
    """Expected tokens/s, speedup, best draft length and $/M output tokens per dataset and concurrency.

    Args:
        results: what an evaluation measured: ``speculative_test.json`` from ``specdec test``, or a CSV metrics
            log (``specdec test``'s, or ``specdec fit``'s with the speedup callback, e.g.
            ``runs/quickstart/logs/version_0/metrics.csv``).
        profile: a latency profile YAML (``specdec plan profile``, or a serving stack's table; docs/evaluation.md).
        concurrency: concurrent requests to plan for, one number or a list (``'[1, 8, 64]'``).
        gpu_hour_price: $ per GPU-hour (adds $ per million output tokens).
        max_draft_tokens: cap on the draft lengths considered.
        mode: which proposal mode of a ``speculative_test.json`` to read (default: its own).
        output_dir: where ``plan.json``, ``plan.csv`` and one ``plan_<dataset>.png`` per dataset go.
    """
    import csv

    from specdec.lightning.speculative_test import render_table
    from specdec.planning.plan import COLUMNS, plan, plot, read_acceptance, table_rows
    from specdec.planning.profile import LatencyProfile

    levels = [concurrency] if isinstance(concurrency, int) else list(concurrency)
    curves = read_acceptance(results, mode)
    latency = LatencyProfile.load(profile)
    rows = plan(curves, latency, levels, gpu_hour_price=gpu_hour_price, max_draft_tokens=max_draft_tokens)
    profiled = sorted(latency.target_forward_ms) if latency.by_concurrency else []
    beyond = [level for level in levels if profiled and level > profiled[-1]]
    if beyond:
        print(
            f"note: concurrency {beyond} beyond the profiled levels {profiled}: their forward "
            "costs grow in proportion to the rows (a compute-bound step); profile them for measured figures",
            file=sys.stderr,
        )
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    cells = table_rows(rows)
    print(render_table(COLUMNS, cells))
    with open(output_dir / "plan.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        writer.writerows(cells)
    record = {
        "results": str(results),
        "profile": str(profile),
        "gpu_hour_price": gpu_hour_price,
        "acceptance": {curve.name: {"survival": curve.survival, "measured": curve.measured} for curve in curves},
        "rows": [row.to_dict() for row in rows],
    }
    (output_dir / "plan.json").write_text(json.dumps(record, indent=2) + "\n")
    for curve in curves:
        safe = "".join(c if c.isalnum() or c in "-_=." else "_" for c in curve.name)
        plot(rows, curve.name, output_dir / f"plan_{safe}.png")
    print(f"plan written to {output_dir} (plan.json, plan.csv, {len(curves)} plot(s))")
