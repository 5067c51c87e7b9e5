"""``report.html``: one self-contained page per run and per search (plots inline as base64 PNG).

Sections, each a ``<section id=...>`` (the ids are what tests and links use):

- ``stage-table``: every stage's accuracy, size, MACs, latency (p50 and p99), energy, ratio;
- ``accuracy-vs``: accuracy against stored size, latency and estimated energy;
- ``sensitivity``: the per-layer sensitivity (heat map and table) where the run measured one
  (a search; an int8 stage with ``sensitivity`` or ``bits: auto``), else a line saying so;
- ``engines``: the engine comparison of integer stages (accuracy as executed, latency, file size);
- ``realtime``: p50 / p99 / max latency, jitter and deadline misses (a search measures them on
  its engine; a run shows each stage's median and p99 batch-1 latency);
- for a search also ``search``: budget, baseline vs chosen, the Pareto plot and table.

No script, no external file: the page opens offline and in any browser.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

from slimkit.atomic import atomic_write_bytes

SECTIONS = ("stage-table", "accuracy-vs", "sensitivity", "engines", "realtime")

_CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;font-size:13px;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 7px}
th{background:#f3f3f3}td.n{text-align:right}img{max-width:100%}section{margin-bottom:2em}
.note{color:#555;font-size:13px}"""


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _img(src: str, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="{src}">'


def _file_img(path: Path, alt: str) -> str:
    if not path.is_file():
        return f'<p class="note">({html.escape(alt)}: no plot)</p>'
    return _img("data:image/png;base64," + base64.b64encode(path.read_bytes()).decode(), alt)


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return f"<td>{'yes' if value else 'no'}</td>"
    if isinstance(value, int):
        return f'<td class="n">{value:,}</td>'
    if isinstance(value, float):
        return f'<td class="n">{value:,.4g}</td>' if abs(value) < 1e4 else f'<td class="n">{value:,.0f}</td>'
    return f"<td>{html.escape(str(value))}</td>"


def table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    """An HTML table of ``rows`` (dicts), one column per key (``columns``: which, in order)."""
    if not rows:
        return '<p class="note">(none)</p>'
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(_cell(r.get(c, "")) for c in columns) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _section(sid: str, title: str, body: str) -> str:
    return f'<section id="{sid}"><h2>{html.escape(title)}</h2>{body}</section>'


def _accuracy_plots(rows: list[dict[str, Any]], title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), dpi=100)
    axes_spec = (("bytes", "stored size (KiB)", 1 / 1024), ("latency_ms", "latency median (ms)", 1.0),
                 ("energy_uj", "energy estimate (uJ)", 1.0))
    for ax, (key, label, scale) in zip(axes, axes_spec):
        pts = [(r[key] * scale, r["accuracy"], r["name"]) for r in rows if isinstance(r.get(key), (int, float))]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", color="tab:blue")
            for x, y, name in pts:
                ax.annotate(name, (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
        if key in ("bytes", "energy_uj") and pts and min(p[0] for p in pts) > 0:
            ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("accuracy (%)")
        ax.grid(True, alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _img(_png(fig), "accuracy vs size, latency and energy")


def _stage_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"stage": r["name"], "kind": r.get("kind", ""), "accuracy %": r["accuracy"], "params": r["params"],
             "MACs": r["macs"], "bytes": r["bytes"], "latency ms": r.get("latency_ms"),
             "p99 ms": r.get("latency_p99_ms"), "energy uJ": r.get("energy_uj", ""), "engine": r.get("engine", ""),
             "phase": r.get("phase", ""), "ratio": r.get("ratio")} for r in rows]


def _engine_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        engines = r.get("details", {}).get("engines")
        if not isinstance(engines, dict):
            continue
        for name, res in engines.items():
            out.append({"stage": r["name"], "engine": name, "integer": bool(res.get("integer")),
                        "accuracy %": res.get("accuracy", ""), "latency ms": res.get("latency_ms", ""),
                        "file bytes": res.get("file_bytes", ""), "error": res.get("error", "")})
    return out


def _sensitivity_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        for name, cells in (r.get("details", {}).get("sensitivity") or {}).items():
            for bits, cell in cells.items():
                out.append({"stage": r["name"], "layer": name, "setting": f"{bits} bit", "drop": cell["drop"],
                            "kl": cell["kl"]})
    return out


def _page(title: str, sections: list[str]) -> str:
    return (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>{''.join(sections)}</body></html>\n")


def render_run_html(report: dict[str, Any]) -> str:
    """The page of a ``slimkit compress`` run from its report (``report.json``)."""
    rows = report["stages"]
    title = f"slimkit run: {report.get('recipe', {}).get('name', '')} ({report.get('model')} on {report.get('data')})"
    sens = _sensitivity_rows(rows)
    engines = _engine_rows(rows)
    realtime = [{"stage": r["name"], "engine": r.get("engine", ""), "median ms": r.get("latency_ms"),
                 "p99 ms": r.get("latency_p99_ms")} for r in rows]
    energy_note = next((r["energy"]["assumptions"] for r in reversed(rows) if isinstance(r.get("energy"), dict)), "")
    sections = [
        _section("stage-table", "Stages", table(_stage_rows(rows))
                 + (f'<p class="note">energy: {html.escape(energy_note)}</p>' if energy_note else "")),
        _section("accuracy-vs", "Accuracy vs size, latency and energy", _accuracy_plots(rows, title)),
        _section("sensitivity", "Per-layer sensitivity",
                 table(sens) if sens else '<p class="note">This run measured no per-layer sensitivity (int8 with '
                                          '<code>sensitivity: true</code> or <code>bits: auto</code>, or '
                                          '<code>slimkit search</code>, do).</p>'),
        _section("engines", "Engine comparison",
                 table(engines) if engines else '<p class="note">No stage compared engines (integer stages do).</p>'),
        _section("realtime", "Real-time view", table(realtime)
                 + '<p class="note">Batch-1 median and p99 of each stage on its engine; '
                   '<code>slimkit profile --deadline-ms D</code> adds jitter and deadline misses.</p>'),
    ]
    return _page(title, sections)


def write_run_html(run_dir: str | Path, report: dict[str, Any]) -> Path:
    """Write ``report.html`` of a run into ``run_dir`` (atomically); returns its path."""
    path = Path(run_dir) / "report.html"
    atomic_write_bytes(path, render_run_html(report).encode())
    return path


def render_search_html(run_dir: str | Path, result: dict[str, Any]) -> str:
    """The page of a ``slimkit search`` from its result (``search.json``) and the files beside it."""
    import json

    run_dir = Path(run_dir)
    metric = result["budget"]["metric"]
    final = json.loads((run_dir / "final" / "report.json").read_text()) if (run_dir / "final" / "report.json"
                                                                            ).is_file() else {"stages": []}
    rows = final["stages"]
    base, chosen = result["baseline"], result["chosen"]
    summary = table([{"model": "baseline", "accuracy %": base["accuracy"], metric: base[metric]},
                     {"model": "chosen", "accuracy %": chosen["accuracy"], metric: chosen[metric],
                      "meets budget": chosen["meets_budget"]}])
    settings = ", ".join(f"{k} {v}" for k, v in chosen["settings"].items()) or "none"
    title = f"slimkit search: {metric} <= {result['budget']['value']:.6g} on {result['engine']}"
    realtime_rows = [{"model": name, **view} for name, view in result.get("realtime", {}).items()]
    predictor = result.get("latency_predictor")
    engines = _engine_rows(rows)
    if not engines:
        engines = [{"model": r["model"], "engine": r.get("engine", ""), "p50 ms": r.get("p50_ms", ""),
                    "p99 ms": r.get("p99_ms", "")} for r in realtime_rows]
    sections = [
        _section("search", "Budget search", summary + f"<p>Chosen settings: {html.escape(settings)}</p>"
                 + _file_img(run_dir / "pareto.png", "Pareto front") + "<h3>Pareto front</h3>"
                 + table(result["pareto"])
                 + ("<h3>Finalists (mean validation accuracy over fine-tune seeds)</h3>"
                    + table([{**f, "val_accuracies": ", ".join(f"{v:.2f}" for v in f["val_accuracies"])}
                             for f in chosen["finalists"]]) if chosen.get("finalists") else "")
                 + "<h3>Trials</h3>"
                 + table([{k: (", ".join(f"{a} {b}" for a, b in v.items()) if isinstance(v, dict) else v)
                           for k, v in t.items() if k != "choice"} for t in result["trials"]])
                 + (f'<p class="note">Latency predictor: mean error {predictor.get("mean_abs_error_pct")} %, max '
                    f'{predictor.get("max_abs_error_pct")} % over {predictor.get("points")} models measured end to '
                    f'end.</p>' if predictor else "")),
        _section("stage-table", "Stages of the chosen recipe (final run)", table(_stage_rows(rows))),
        _section("accuracy-vs", "Accuracy vs size, latency and energy",
                 _accuracy_plots(rows, "final run") if rows else '<p class="note">(no final run)</p>'),
        _section("sensitivity", "Per-layer sensitivity", _file_img(run_dir / "sensitivity.png", "sensitivity heat map")
                 + table(result.get("sensitivity", []))),
        _section("engines", "Engine comparison", table(engines)),
        _section("realtime", "Real-time view", table(realtime_rows)),
    ]
    return _page(title, sections)


def write_search_html(run_dir: str | Path, result: dict[str, Any]) -> Path:
    """Write ``report.html`` of a search into ``run_dir`` (atomically); returns its path."""
    path = Path(run_dir) / "report.html"
    atomic_write_bytes(path, render_search_html(run_dir, result).encode())
    return path
