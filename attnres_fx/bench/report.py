"""The suite's outputs: a CSV in the dynamo harness's columns, a JSON, a summary table and a chart."""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

from tabulate import tabulate

# Where a column means what the dynamo benchmark harness's column of that name means, it has that name and unit:
# speedup = eager / compiled time, abs_latency in ms, compilation_latency in s (the first compiled step, cold),
# peak memory in GB and compression_ratio = eager / compiled peak. Ours: variant, mismatch (largest relative
# difference from eager over the output and every gradient), attnres_overhead (transformed / original time on the
# same backend) and error.
COLUMNS = [
    "dev",
    "name",
    "variant",
    "backend",
    "mode",
    "dtype",
    "batch_size",
    "accuracy",
    "mismatch",
    "speedup",
    "abs_latency",
    "eager_latency",
    "compilation_latency",
    "eager_peak_mem",
    "dynamo_peak_mem",
    "compression_ratio",
    "calls_captured",
    "unique_graphs",
    "graph_breaks",
    "attnres_overhead",
    "error",
]


def csv_row(row: dict, batch_size: int) -> dict:
    """A worker's result in the CSV's columns and units."""
    ok = row["accuracy"] == "pass"
    ms = {k: row[k] * 1e3 if row.get(k) is not None else None for k in ("latency", "eager_latency")}
    memory = row.get("eager_peak_mem"), row.get("dynamo_peak_mem")
    return {
        "dev": row["device"],
        "name": row["model"],
        "variant": row["variant"],
        "backend": row["backend"],
        "mode": row["mode"],
        "dtype": row["dtype"],
        "batch_size": batch_size,
        "accuracy": row["accuracy"],
        "mismatch": row.get("mismatch"),
        "speedup": ms["eager_latency"] / ms["latency"] if ok else None,
        "abs_latency": ms["latency"],
        "eager_latency": ms["eager_latency"],
        "compilation_latency": row.get("compilation_latency"),
        "eager_peak_mem": memory[0],
        "dynamo_peak_mem": memory[1],
        "compression_ratio": memory[0] / memory[1] if ok and all(memory) else None,
        "calls_captured": row.get("calls_captured"),
        "unique_graphs": row.get("unique_graphs"),
        "graph_breaks": row.get("graph_breaks"),
        "attnres_overhead": None,
        "error": row["error"],
    }


def add_overhead(rows: list[dict]) -> None:
    """The transformed model's time over the original's on the same backend, where both pass."""
    original = {(r["name"], r["backend"]): r for r in rows if r["variant"] == "original" and r["accuracy"] == "pass"}
    for r in rows:
        base = original.get((r["name"], r["backend"]))
        if r["variant"] == "attnres" and r["accuracy"] == "pass" and base:
            r["attnres_overhead"] = r["abs_latency"] / base["abs_latency"]


def gmean(values: list[float | None]) -> float | None:
    """Geometric mean of the values present (a ratio is absent where it could not be measured)."""
    present = [v for v in values if v]
    return math.exp(statistics.fmean(math.log(v) for v in present)) if present else None


def mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def summary(rows: list[dict]) -> list[dict]:
    """Per backend and variant, as the dashboard: pass rate, and over passing entries only the geometric means of
    speedup and compression ratio, the mean compilation latency and the geometric-mean AttnRes overhead."""
    out = []
    for backend in dict.fromkeys(r["backend"] for r in rows):
        for variant in ("original", "attnres"):
            group = [r for r in rows if r["backend"] == backend and r["variant"] == variant]
            passed = [r for r in group if r["accuracy"] == "pass"]
            out.append(
                {
                    "backend": backend,
                    "variant": variant,
                    "pass_rate": f"{len(passed)}/{len(group)}",
                    "speedup_gmean": gmean([r["speedup"] for r in passed]),
                    "compilation_latency_mean": mean([r["compilation_latency"] for r in passed]),
                    "compression_ratio_gmean": gmean([r["compression_ratio"] for r in passed]),
                    "attnres_overhead_gmean": gmean([r["attnres_overhead"] for r in passed]),
                }
            )
    return out


# (column of the summary / of a row, its heading in the printed tables)
_SUMMARY_COLUMNS = {
    "backend": "backend",
    "variant": "variant",
    "pass_rate": "pass rate",
    "speedup_gmean": "speedup (gmean)",
    "compilation_latency_mean": "compile s (mean)",
    "compression_ratio_gmean": "compression (gmean)",
    "attnres_overhead_gmean": "AttnRes / original (gmean)",
}
_MODEL_COLUMNS = {
    "name": "model",
    "variant": "variant",
    "backend": "backend",
    "accuracy": "accuracy",
    "speedup": "speedup",
    "abs_latency": "ms",
    "compilation_latency": "compile s",
    "compression_ratio": "compression",
    "unique_graphs": "graphs",
    "graph_breaks": "breaks",
    "attnres_overhead": "AttnRes / original",
}


def summary_table(rows: list[dict]) -> str:
    return _table(summary(rows), _SUMMARY_COLUMNS)


def models_table(rows: list[dict]) -> str:
    return _table(rows, _MODEL_COLUMNS)


def _table(rows: list[dict], columns: dict[str, str]) -> str:
    cells = [[_fmt(r[key]) for key in columns] for r in rows]
    return tabulate(cells, headers=list(columns.values()), disable_numparse=True)


def _fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def write(rows: list[dict], meta: dict, stem: Path) -> list[Path]:
    """`<stem>.csv`, `<stem>.json` and, with matplotlib installed, `<stem>.png`; returns the paths written."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    stem.with_suffix(".json").write_text(json.dumps({**meta, "summary": summary(rows), "rows": rows}, indent=1))
    paths = [stem.with_suffix(".csv"), stem.with_suffix(".json")]
    try:
        paths.append(chart(rows, meta, stem.with_suffix(".png")))
    except ImportError:
        pass  # matplotlib is optional: the table and the CSV carry the same numbers
    return paths


def chart(rows: list[dict], meta: dict, path: Path) -> Path:
    """Bars of the AttnRes overhead (transformed / original time) per model, one colour per backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["name"] for r in rows))
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(models), 3.6))
    width = 0.8 / len(backends)
    for i, backend in enumerate(backends):
        overhead = {
            r["name"]: r["attnres_overhead"] for r in rows if r["backend"] == backend and r["variant"] == "attnres"
        }
        xs = [m + (i - (len(backends) - 1) / 2) * width for m in range(len(models))]
        ax.bar(xs, [overhead.get(name) or 0 for name in models], width, label=backend)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(models)), models, rotation=20)
    ax.set_ylabel("AttnRes time / original")
    ax.set_title(f"{meta['mode']}, {meta['size']}, {meta['dtype']}, {meta['device']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
