"""Plots (matplotlib Agg, PNG) and the self-contained ``report.html`` of ``vlsurv evaluate``.

The page embeds every image as base64 and escapes every piece of text (scan ids, questions,
answers), so it opens anywhere and a report cannot inject markup.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

# matplotlib (selected as Agg before pyplot loads) and lifelines are imported when a plot is drawn, so that
# importing this module (by `vlsurv evaluate`) does not load them.


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_kaplan_meier(time, event, high_risk, p_value: float, path: str | Path) -> Path:
    """Kaplan-Meier curves (lifelines) of the high- and low-risk halves with the log-rank p (paper Fig. 3)."""
    from lifelines import KaplanMeierFitter
    from lifelines.plotting import add_at_risk_counts

    plt = _pyplot()
    time, event, high_risk = np.asarray(time), np.asarray(event), np.asarray(high_risk, dtype=bool)
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    fitters = []
    for label, mask, color in (("low risk", ~high_risk, "tab:blue"), ("high risk", high_risk, "tab:red")):
        km = KaplanMeierFitter(label=f"{label} (n={int(mask.sum())})").fit(time[mask], event[mask])
        km.plot_survival_function(ax=ax, ci_show=True, color=color)
        fitters.append(km)
    add_at_risk_counts(*fitters, ax=ax)
    ax.set_xlabel("time")
    ax.set_ylabel("survival probability")
    ax.set_title(f"Median risk split, log-rank p = {p_value:.3g}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_calibration(tables: Mapping[float, pd.DataFrame], path: str | Path) -> Path:
    """Predicted vs Kaplan-Meier observed risk per bin, one series per horizon, with the diagonal."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 5.0))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect calibration")
    for horizon, table in tables.items():
        errors = np.vstack([table.observed - table.observed_low, table.observed_high - table.observed])
        ax.errorbar(
            table.predicted,
            table.observed,
            yerr=np.clip(errors, 0, None),
            marker="o",
            capsize=3,
            label=f"horizon {horizon:g}",
        )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("predicted risk of an event by the horizon")
    ax.set_ylabel("observed risk (1 - Kaplan-Meier)")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def example_scans(rows: pd.DataFrame, answers, vqa, n_examples: int) -> list[dict]:
    """The highest- and lowest-risk scans, each with its answers, question risks and references.

    ``rows``: scan_id, risk, risk_<question_id>..., time, event; ``answers`` / ``vqa``: JSONL rows
    (scan_id, question_id, [question,] answer[, risk]) or None.
    """
    order = rows.sort_values("risk", ascending=False)
    picked = pd.concat([order.head((n_examples + 1) // 2), order.tail(n_examples // 2)]).drop_duplicates(
        "scan_id"
    )
    examples = []
    for row in picked.to_dict("records"):
        by_question = {
            c[len("risk_") :]: {"question": c[len("risk_") :], "risk": row[c]}
            for c in rows.columns
            if c.startswith("risk_")
        }
        for answer in (
            [] if answers is None else answers[answers.scan_id == row["scan_id"]].to_dict("records")
        ):
            entry = by_question.setdefault(
                answer["question_id"], {"question": answer["question_id"], "risk": None}
            )
            if isinstance(answer.get("question"), str):
                entry["question"] = answer["question"]
            entry["answer"] = answer["answer"]
            if entry["risk"] is None and answer.get("risk") is not None:
                entry["risk"] = answer["risk"]
        for reference in [] if vqa is None else vqa[vqa.scan_id == row["scan_id"]].to_dict("records"):
            if reference["question_id"] in by_question:
                by_question[reference["question_id"]]["reference"] = reference["answer"]
        examples.append(
            {
                "scan_id": row["scan_id"],
                "risk": row["risk"],
                "time": row["time"],
                "event": int(row["event"]),
                "rows": list(by_question.values()),
            }
        )
    return examples


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return f"{float(value):.{digits}g}" if abs(float(value)) < 1e-3 else f"{float(value):.{digits}f}"


def _with_ci(value, ci) -> str:
    return _fmt(value) + (f" ({_fmt(ci[0])} to {_fmt(ci[1])})" if ci else "")


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _metric_rows(metrics: Mapping) -> list[list[str]]:
    rows = [
        ["Harrell's C-index", _with_ci(metrics["c_index"], metrics.get("c_index_ci"))],
        ["Uno's C-index", _with_ci(metrics.get("uno_c"), metrics.get("uno_c_ci"))],
    ]
    rows += [[f"time-dependent AUC at {h}", _fmt(v)] for h, v in metrics.get("td_auc", {}).items()]
    if metrics.get("td_auc_mean") is not None:
        rows.append(["mean time-dependent AUC", _fmt(metrics["td_auc_mean"])])
    if metrics.get("integrated_brier_score") is not None:
        rows.append(["integrated Brier score", _fmt(metrics["integrated_brier_score"])])
    rows.append(["log-rank p (median split)", _fmt(metrics.get("logrank_p"))])
    for part in ("f1", "precision", "recall"):
        if metrics.get(f"bertscore_{part}") is not None:
            rows.append([f"BERTScore {part}", _fmt(metrics[f"bertscore_{part}"])])
    if metrics.get("bertscore_model"):
        rows.append(
            [
                "BERTScore model",
                f"{metrics['bertscore_model']} (layer {metrics['bertscore_layer']}, "
                f"{metrics['bertscore_pairs']} sampled pairs)",
            ]
        )
    rows += [
        ["scans", str(metrics["n"])],
        ["patients", str(metrics.get("n_patients", metrics["n"]))],
        ["events (scans)", str(metrics["n_events"])],
    ]
    level = metrics.get("patient_level")
    if level:
        rows += [
            ["bootstrap CIs", level["bootstrap"]],
            ["Kaplan-Meier and log-rank", level["kaplan_meier_logrank"]],
        ]
    if metrics.get("calibration_baseline"):
        in_sample = "IN-SAMPLE: " if metrics.get("calibration_in_sample") else ""
        rows.append(["calibration baseline", in_sample + metrics["calibration_source"]])
    return rows


def _clinical_accuracy_html(accuracy: Mapping) -> list[str]:
    """Per-question precision / recall / F1 / prevalence of the answers' read-back status, macro F1 with CI,
    and the details (lobe, side, size) of the true-positive answers."""
    parts = [
        "<h2>Clinical accuracy: does each answer say present or absent as the scan's report does?</h2>",
        f"<p>Answers read back by {html.escape(str(accuracy['reader']))}; BERTScore cannot tell "
        "&quot;No pleural effusion&quot; from &quot;Small right pleural effusion&quot;, this can.</p>",
    ]
    statuses = accuracy.get("answer_statuses") or {}
    for title, key in (
        ("against the report", "against_report"),
        ("against the ground truth", "against_ground_truth"),
    ):
        block = accuracy.get(key)
        if not block:
            continue
        header = [
            "question",
            "n",
            "prevalence",
            "precision",
            "recall",
            "F1",
            "answers present/absent/not mentioned",
        ]
        rows = [
            [qid, s["n"], _fmt(s["prevalence"]), _fmt(s["precision"]), _fmt(s["recall"]), _fmt(s["f1"])]
            + ["/".join(str(v) for v in statuses.get(qid, {}).values())]
            for qid, s in block["per_question"].items()
        ]
        rows.append(
            ["macro F1 (95% CI)", "", "", "", "", _with_ci(block["macro_f1"], block["macro_f1_ci"]), ""]
        )
        parts += [f"<h3>{html.escape(title)}</h3>", _table(header, rows)]
    details = accuracy.get("details")
    if details:
        rows = [["tumor lobe", details["tumor_lobe"]], ["effusion side", details["pleura_side"]]]
        tolerance = details["size"]["tolerance_mm"]
        rows += [[f"{q} size within {tolerance:g} mm", d] for q, d in details["size"]["per_question"].items()]
        parts += [
            "<h3>Details of the true-positive answers</h3>",
            _table(
                ["detail", "right", "scored", "accuracy"],
                [[name, d["correct"], d["scored"], _fmt(d["accuracy"])] for name, d in rows],
            ),
        ]
    return parts


def _example_html(example: Mapping) -> str:
    title = (
        f"scan {example['scan_id']}: risk {_fmt(example['risk'])}, time {float(example['time']):g}, "
        f"{'event' if example['event'] else 'censored'}"
    )
    header = ["question", "generated answer", "question risk"]
    with_reference = any(row.get("reference") is not None for row in example["rows"])
    header += ["report-derived answer"] if with_reference else []
    rows = []
    for row in example["rows"]:
        cells = [row["question"], row.get("answer") or "", _fmt(row.get("risk"))]
        rows.append(cells + ([row.get("reference") or ""] if with_reference else []))
    return f"<h3>{html.escape(title)}</h3>" + _table(header, rows)


def write_report(
    path: str | Path,
    metrics: Mapping,
    images: Mapping[str, str | Path],
    examples: Sequence[Mapping],
    notes: Sequence[str] = (),
) -> Path:
    """Write the self-contained HTML page: metrics with CIs, per-question C, plots, example scans."""
    parts = [
        "<h1>vlsurv evaluation</h1>",
        "<h2>Metrics (95% bootstrap CI)</h2>",
        _table(["metric", "value"], _metric_rows(metrics)),
    ]
    per_question = metrics.get("per_question_c_index") or {}
    if per_question:
        parts += [
            "<h2>C-index of each question's risk</h2>",
            _table(["question", "C-index"], [[q, _fmt(c)] for q, c in per_question.items()]),
        ]
    if metrics.get("clinical_accuracy"):
        parts += _clinical_accuracy_html(metrics["clinical_accuracy"])
    for title, image in images.items():
        encoded = base64.b64encode(Path(image).read_bytes()).decode("ascii")
        parts.append(
            f'<h2>{html.escape(title)}</h2><img alt="{html.escape(title)}" '
            f'src="data:image/png;base64,{encoded}">'
        )
    if examples:
        parts.append("<h2>Example scans: the six answers and each question's risk</h2>")
        parts += [_example_html(example) for example in examples]
    if notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    style = (
        "body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse;"
        "margin:0.5em 0}td,th{border:1px solid #ccc;padding:0.25em 0.5em;text-align:left;vertical-align:top}"
    )
    page = (
        f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>vlsurv evaluation</title>'
        f"<style>{style}</style></head><body>{''.join(parts)}</body></html>"
    )
    path = Path(path)
    path.write_text(page, encoding="utf-8")
    return path
