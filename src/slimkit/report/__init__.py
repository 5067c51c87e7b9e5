"""Reports of a run: ``report.json`` (every figure), ``report.md`` (the table), a plot.

>>> rows = [{"name": "baseline", "accuracy": 98.6, "params": 431080, "nonzeros": 431080, "macs": 2293000,
...          "bytes": 1724320, "peak_activation_bytes": 57600, "latency_ms": 0.21, "ratio": 1.0}]
>>> print(format_stage_table(rows))
| stage    | accuracy % |  params | non-zeros |  MACs | bytes | act. peak | latency ms | ratio |
|----------|-----------:|--------:|----------:|------:|------:|----------:|-----------:|-------|
| baseline |      98.60 | 431,080 |   431,080 | 2.29M | 1.72M |    57.60k |      0.210 | 1.0x  |

``act. peak``: peak activation memory of one batch-1 forward pass, bytes
(:func:`slimkit.measure.peak_activation_bytes`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from slimkit.atomic import atomic_open, atomic_write_bytes

COLUMNS = ("stage", "accuracy %", "params", "non-zeros", "MACs", "bytes", "act. peak", "latency ms", "ratio")


def _si(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:g}"


def _cells(row: dict[str, Any]) -> list[str]:
    return [
        str(row["name"]),
        f"{row['accuracy']:.2f}",
        f"{row['params']:,}",
        f"{row['nonzeros']:,}",
        _si(row["macs"]),
        _si(row["bytes"]),
        _si(row["peak_activation_bytes"]) if row.get("peak_activation_bytes") is not None else "",
        f"{row['latency_ms']:.3f}",
        f"{row['ratio']:.1f}x",
    ]


def format_stage_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table, one line per stage, aligned for the terminal too.

    Rows with ``energy_uj`` (:mod:`slimkit.measure.energy`) add an ``energy uJ`` column.
    """
    columns = list(COLUMNS)
    body = [_cells(r) for r in rows]
    right = [False, True, True, True, True, True, True, True, False]
    if any("energy_uj" in r for r in rows):
        columns.insert(8, "energy uJ")
        right.insert(8, True)
        for cells, row in zip(body, rows):
            cells.insert(8, f"{row['energy_uj']:,.2f}" if row.get("energy_uj") is not None else "")
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(columns)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if r else "-" * (w + 2) for w, r in zip(widths, right)) + "|"
    return "\n".join([line(columns), rule, *(line(b) for b in body)])


def render_markdown(report: dict[str, Any]) -> str:
    rows = report["stages"]
    lines = [
        f"# slimkit run: {report['recipe'].get('name', '')}",
        "",
        f"Model `{report['model']}` on `{report['data']}`; input {report['example_input_shape']}, "
        f"{report['threads']} torch thread(s) for training; latency is the median of "
        f"{report.get('recipe', {}).get('latency_runs', 'repeated')} batch-1 runs on the CPU with "
        f"{report.get('latency_threads', report['threads'])} torch thread(s) (recipe `latency_threads`).",
        "`bytes` is the stored size of each stage's model: the fp32 state dict unless the stage stores an "
        "artifact (e.g. the .slim container); `ratio` = baseline bytes / bytes.",
        "",
        format_stage_table(rows),
        "",
        "| stage | phase | engine | bytes counted |",
        "|---|---|---|---|",
        *(f"| {r['name']} | {r.get('phase', '')} | {r.get('engine', '')} | {r.get('bytes_counted', '')} |"
          for r in rows),
        "",
        "![accuracy vs size](accuracy_vs_size.png)",
    ]
    energy = [r for r in rows if isinstance(r.get("energy"), dict)]
    if energy:
        lines[6:6] = ["`energy uJ`: estimated energy of one batch-1 inference from the 45 nm table of Horowitz 2014 "
                      "(arithmetic by precision, non-zero weights only; stored bytes as weight traffic):", ""]
        lines[8:8] = [f"- {r['name']}: {r['energy']['assumptions']}" for r in energy] + [""]
    for row in rows:
        lines += _engine_lines(row)
        layers = row.get("details", {}).get("layers")
        if isinstance(layers, list) and layers and isinstance(layers[0], dict):
            keys = list(dict.fromkeys(k for layer in layers for k in layer))  # rows may lack columns (pinned)
            lines += ["", f"## {row['name']}: per layer", "", "| " + " | ".join(keys) + " |",
                      "|" + "---|" * len(keys)]
            lines += ["| " + " | ".join(str(layer.get(k, "")) for k in keys) + " |" for layer in layers]
    lines += _deployable_lines(report)
    return "\n".join(lines) + "\n"


def _engine_lines(row: dict[str, Any]) -> list[str]:
    """An integer stage's engines (accuracy as executed, latency, file size), the choice and the
    comparison with the dense fp32 baseline, as markdown lines (none for other stages)."""
    from slimkit.deploy.results import DenseComparison, EngineComparison

    details = row.get("details", {})
    if not isinstance(details.get("engines"), dict) or not details["engines"]:
        return []
    engines = EngineComparison.from_dict(details["engines"])

    def fmt(value: Any, spec: str) -> str:
        return format(value, spec) if isinstance(value, (int, float)) else ""

    lines = ["", f"## {row['name']}: engines", "",
             "| engine | integer | accuracy % | latency ms | file bytes | agrees with fake-quant |",
             "|---|---|---:|---:|---:|---:|"]
    for name, res in engines.results.items():
        if res.error is not None:
            lines.append(f"| {name} | | failed: {res.error} | | | |")
            continue
        agreement = res.agreement_with_fakequant
        lines.append(f"| {name} | {'yes' if res.integer else 'no'} | {fmt(res.accuracy, '.2f')} | "
                     f"{fmt(res.latency_ms, '.3f')} | {fmt(res.file_bytes, ',')} | "
                     f"{fmt(100 * agreement, '.1f') + ' %' if agreement is not None else ''} |")
    lines += ["", f"Chosen: {details.get('engine_reason', row.get('engine', ''))}."]
    if details.get("reduce_range_reason"):
        lines.append(f"Weights: {details['reduce_range_reason']}.")
    dense = DenseComparison.from_dict(details.get("vs_dense_fp32") or {})
    if dense.speedup is not None:
        lines.append(f"Against the dense fp32 baseline: {dense.deployed_engine} {dense.deployed_ms:.3f} ms vs "
                     f"{dense.dense_engine} {dense.dense_fp32_ms:.3f} ms ({dense.speedup:.2f}x), "
                     f"{dense.deployed_bytes:,} B vs {dense.dense_fp32_bytes:,} B ({dense.size_ratio:.1f}x "
                     "smaller).")
    return lines


def _deployable_lines(report: dict[str, Any]) -> list[str]:
    """The run's top-level deployable files and the one to ship (none before the run finished)."""
    if not isinstance(report.get("deployables"), dict):
        return []
    from slimkit.deploy.run import RunDeployables

    run = RunDeployables.from_dict(report["deployables"])
    lines = ["", "## Deployable files", "", "| file | bytes | runs in | what |", "|---|---:|---|---|"]
    lines += [f"| {f.name} | {f.bytes:,} | {f.runs_in} | {f.what} |" for f in run.files]
    lines += [f"| {name} | | | not written: {why} |" for name, why in run.skipped.items()]
    return lines + ["", f"Ship `{run.ship.name}`: {run.why}."]


def plot_accuracy_vs_size(report: dict[str, Any], path: Path) -> None:
    """Accuracy against stored bytes (log scale), one labelled point per stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["stages"]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    xs = [max(r["bytes"], 1) / 1024 for r in rows]
    ys = [r["accuracy"] for r in rows]
    ax.plot(xs, ys, "-o", color="tab:blue")
    seen: dict[tuple[float, float], int] = {}
    for x, y, r in zip(xs, ys, rows):
        stacked = seen.get((x, y), 0)  # stages at the same point get their labels stacked, not overprinted
        seen[(x, y)] = stacked + 1
        ax.annotate(f"{r['name']} ({r['ratio']:.1f}x)", (x, y), textcoords="offset points",
                    xytext=(4, 4 + 11 * stacked), fontsize=8)
    ax.margins(x=0.15, y=0.25)
    ax.set_xscale("log")
    ax.set_xlabel("stored size (KiB, log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{report['model']} on {report['data']}: accuracy vs size")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    with atomic_open(path) as handle:
        fig.savefig(handle, format="png")
    plt.close(fig)


def write_report(run_dir: str | Path, report: dict[str, Any], *, figures: bool = True) -> None:
    """Write report.json, report.md and (``figures``) report.html and accuracy_vs_size.png into ``run_dir``.

    Every file is written atomically. ``figures=False`` writes only the JSON and the Markdown table: a run
    refreshes those after every stage and draws the plots (about a second each with matplotlib) once at
    its end; ``slimkit report RUN_DIR`` draws them for a run that stopped early.
    """
    run_dir = Path(run_dir)
    atomic_write_bytes(run_dir / "report.json", json.dumps(report, indent=2, default=str).encode())
    atomic_write_bytes(run_dir / "report.md", render_markdown(report).encode())
    if figures:
        from slimkit.report.html import write_run_html

        plot_accuracy_vs_size(report, run_dir / "accuracy_vs_size.png")
        write_run_html(run_dir, report)


def read_report(run_dir: str | Path) -> dict[str, Any]:
    """The report.json of a run directory; ConfigError when missing, CorruptFileError when damaged."""
    from slimkit.exceptions import ConfigError, CorruptFileError

    path = Path(run_dir) / "report.json"
    if not path.is_file():
        raise ConfigError(f"{run_dir}: no report.json here; give the directory a `slimkit compress` run wrote")
    try:
        report = json.loads(path.read_text())
        report["stages"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CorruptFileError(f"{path}: not a slimkit report ({type(err).__name__}: {err})") from None
    return report
