"""The demo's Table 2: every baseline row beside the demo's VLM, appended to the demo's report.html.

To keep `make demo` short the MLPs run with ``DEMO_SEEDS`` (3 seeds instead of 5); the rows are all of
them: CoxPH, and DeepSurv / DeepHit on text, image and both.
"""

from __future__ import annotations

from pathlib import Path

from vlsurv.baselines.run import BaselinesConfig, run_baselines
from vlsurv.baselines.table import TableConfig, to_html, write_table

DEMO_SEEDS = [0, 1, 2]
HEADING = "Table 2: baselines beside the VLM (Harrell's C on the test split)"


def demo_table(out: Path, manifest: Path, cache: Path, evaluation: Path, seed: int, bootstrap: int) -> Path:
    """Run the baselines into ``out/baselines``, write ``out/table/table.md`` beside the evaluation
    ``evaluation``, append the table to ``out/report.html``; return the table.md path."""
    run_baselines(
        BaselinesConfig(
            manifest=str(manifest),
            out=str(out / "baselines"),
            cache=str(cache),
            seeds=[seed + s for s in DEMO_SEEDS],
            bootstrap=bootstrap,
        )
    )
    table_cfg = TableConfig(
        runs=[str(out / "baselines"), str(evaluation)], out=str(out / "table"), seed=seed, bootstrap=bootstrap
    )
    table, tests = write_table(table_cfg)
    report = out / "report.html"
    page = report.read_text(encoding="utf-8")
    fragment = f"<h2>{HEADING}</h2>{to_html(table, tests)}"
    page = page.replace("</body>", fragment + "</body>") if "</body>" in page else page + fragment
    report.write_text(page, encoding="utf-8")
    return out / "table" / "table.md"
