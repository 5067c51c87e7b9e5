"""Coverage of structured pruning: which models slimkit prunes, side by side with Torch-Pruning.

``--zoo torchvision`` (the default): torchvision classifiers, 30% and 50% of channel units
(l1, local); forward works with an unchanged output shape and MACs and params go down.

``--zoo timm``: one model per timm architecture module (``timm.list_modules()``), the
smallest variant of each with at most ``--max-params`` parameters (counted on the meta
device; timm's ``test_*`` configurations skipped), random init, ratio 0.5, l1, local, the classifier ignored; slimkit's
``structured_`` and Torch-Pruning's ``MagnitudePruner`` (L1) on fresh copies in the same
run. A model counts as *pruned* when its forward works after pruning with the same output
shape and at most 0.8 of the dense MACs; *broken* when pruning returned but the forward
crashes or the output shape changed; *refused* when the library raised before pruning
(slimkit names the op). Rows stream to ``--json`` as they finish; ``--write-docs`` puts the
table between the ``<!-- coverage-timm -->`` markers of docs/structured-pruning.md.

    python benchmarks/prune_coverage.py --size 64 [--models resnet18,mobilenet_v2] [--write-docs]
    python benchmarks/prune_coverage.py --zoo timm --cpu-limit 60 --json runs/timm.jsonl
    python benchmarks/prune_coverage.py --zoo timm --models nest_tiny --libs slimkit --json runs/timm.jsonl
    python benchmarks/prune_coverage.py --zoo timm --table-from runs/timm.jsonl --write-docs

``--zoo timm`` runs each model at its own input size (``pretrained_cfg["input_size"]``) unless
``--size`` names one it accepts. In a ``--json`` file the last row of a model wins (a rerun of
one model, or of one library with ``--libs``, replaces its earlier cells).
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import signal
import time
import warnings
from pathlib import Path

import torch
import torchvision

from slimkit.measure import count_macs
from slimkit.prune import structured_

DEFAULT = ["resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2", "vgg11_bn", "mobilenet_v2",
           "mobilenet_v3_small", "mobilenet_v3_large", "mnasnet0_5", "shufflenet_v2_x0_5", "squeezenet1_1",
           "densenet121", "googlenet", "efficientnet_b0", "regnet_x_400mf", "regnet_y_400mf", "convnext_tiny",
           "alexnet", "inception_v3", "vit_b_16", "swin_t", "maxvit_t"]
DOC = Path(__file__).resolve().parents[1] / "docs" / "structured-pruning.md"


def _line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:400] if text else ''}"


def check(name: str, size: int) -> str:
    kw = {"aux_logits": False, "init_weights": False} if name in ("googlenet", "inception_v3") else {}
    if name == "vit_b_16":
        kw["image_size"] = size
    cells = []
    for ratio in (0.3, 0.5):
        try:
            model = torchvision.models.get_model(name, num_classes=10, **kw).eval()
            x = torch.randn(1, 3, size, size)
            macs, params = count_macs(model, x), sum(p.numel() for p in model.parameters())
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                report = structured_(model, x, {"ratio": ratio})
            with torch.no_grad():
                y = model(torch.randn(2, 3, size, size))
            assert y.shape == (2, 10), f"output shape {tuple(y.shape)}"
            assert report.macs_after < macs and report.params_after < params, "MACs/params did not decrease"
            cells.append(f"ok: MACs x{macs / report.macs_after:.2f}, params x{params / report.params_after:.2f}")
        except Exception as err:  # the table reports the reason
            cells.append(f"not pruned: {type(err).__name__}: {str(err).splitlines()[0][:160]}")
    return " | ".join(cells)


# -- timm ------------------------------------------------------------------------------

def timm_models(max_params: float) -> list[tuple[str, str]]:
    """(module, smallest model of that module with at most ``max_params`` parameters), on the meta device."""
    import timm

    chosen = []
    for module in timm.list_modules():
        best = None
        for name in timm.list_models(module=module):
            if name.startswith("test_"):  # timm's own tiny test configurations are not architectures
                continue
            try:
                with torch.device("meta"), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    n = sum(p.numel() for p in timm.create_model(name).parameters())
            except Exception:  # a model that cannot be built on meta is not a candidate
                continue
            if n <= max_params and (best is None or n < best[1]):
                best = (name, n)
        if best is not None:
            chosen.append((module, best[0]))
    return chosen


def _input(model: torch.nn.Module, size: int | None) -> torch.Tensor:
    """One batch at ``size`` when the model accepts it, else at its own input size."""
    own = model.pretrained_cfg.get("input_size", (3, 224, 224))
    if size:
        x = torch.randn(1, own[0], size, size)
        try:
            with torch.no_grad():
                model(x)
            return x
        except Exception:  # fixed-size models (position embeddings, window sizes)
            pass
    return torch.randn(1, *own)


def _slimkit(model, x) -> None:
    structured_(model, x, {"ratio": 0.5, "criterion": "l1", "scope": "local"})


def _torch_pruning(model, x) -> None:
    import torch_pruning as tp

    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    ignored = [classifier] if isinstance(classifier, torch.nn.Module) else []
    tp.pruner.MagnitudePruner(model, x, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=0.5,
                              ignored_layers=ignored).step()


class CpuTimeout(Exception):
    """A library spent more than ``--cpu-limit`` seconds of CPU time on one model."""


def _on_cpu_limit(signum, frame):
    raise CpuTimeout


def run_one(model: torch.nn.Module, x: torch.Tensor, prune, cpu_limit: float = 0) -> dict:
    """Status, MACs and params left, reason of one library on one model (pruning limited to ``cpu_limit`` s)."""
    macs, params = count_macs(model, x), sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        shape = tuple(model(x).shape)
    start = time.perf_counter()
    if cpu_limit:
        signal.signal(signal.SIGPROF, _on_cpu_limit)
        signal.setitimer(signal.ITIMER_PROF, cpu_limit)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prune(model, x)
    except CpuTimeout:
        return {"status": "timeout", "reason": f"over {cpu_limit:.0f} s of CPU time"}
    except Exception as err:
        return {"status": "refused", "reason": _line(err)}
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
    seconds = time.perf_counter() - start
    try:
        with torch.no_grad():
            y = model(x)
        if tuple(y.shape) != shape:
            return {"status": "broken", "reason": f"output shape {tuple(y.shape)}, was {shape}"}
        left = count_macs(model, x) / macs
    except Exception as err:
        return {"status": "broken", "reason": _line(err)}
    row = {"macs_left": left, "params_left": sum(p.numel() for p in model.parameters()) / params, "s": seconds}
    row["status"] = "pruned" if left <= 0.8 else "too little"
    if left > 0.8:
        row["reason"] = f"MACs left {left:.2f} > 0.8"
    return row


LIBS = {"slimkit": _slimkit, "torch_pruning": _torch_pruning}
NAMES = {"slimkit": "slimkit", "torch_pruning": "Torch-Pruning"}


def _commit() -> str | None:
    """The checkout's commit when this process started (its code is what was on disk then; the rows record it)."""
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=DOC.parent, capture_output=True,
                              text=True, check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


COMMIT = _commit()


def timm_row(module: str, name: str, size: int | None, cpu_limit: float = 0,
             libs: tuple[str, ...] = tuple(LIBS)) -> dict:
    """One JSON row: the model, its input shape, and per library in ``libs`` what :func:`run_one` found."""
    import timm

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dense = timm.create_model(name, num_classes=10).eval()
    x = _input(dense, size)
    row = {"module": module, "model": name, "params": sum(p.numel() for p in dense.parameters()),
           "input": list(x.shape[1:]), "commit": COMMIT}
    for lib, prune in ((lib, LIBS[lib]) for lib in libs):
        try:
            row[lib] = run_one(copy.deepcopy(dense), x, prune, cpu_limit)
        except Exception as err:  # the dense model itself fails (the row says so)
            row[lib] = {"status": "dense fails", "reason": _line(err)}
    return row


def short_reason(reason: str) -> str:
    """The part of a refusal that names what failed (slimkit's advice on what to do next left out)."""
    broke = re.search(r"would break its forward \((?:ConfigError: example_inputs of shape \[[^]]*\] do not fit \w+ "
                      r"\()?(.*?)\)?; the model is left", reason)
    if broke:
        return f"cut breaks the forward: {broke.group(1)}"
    return re.sub(r" acts on pruned channels and slimkit cannot prune through it.*", "", reason)


def _cell(r: dict) -> str:
    if r["status"] in ("pruned", "too little"):
        return f"{r['status']} | {r['macs_left']:.2f} | {r['params_left']:.2f}"
    return f"{r['status']}: {short_reason(r['reason'])[:140].replace('|', '/')} | - | -"


def read_rows(path: str) -> list[dict]:
    """The rows of a JSON-lines file written by ``--json``."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def merge_rows(sources: list[tuple[str, list[dict]]]) -> list[dict]:
    """Rows from ``(source name, rows)`` pairs, the last per model winning (sources in order, rows in order).

    A row that ran only some libraries (``--libs``) replaces only their cells when its input
    shape is the earlier row's; at another input it replaces the whole row. Each cell records
    the file and commit it came from (``source``, ``commit``). Sorted by module, then model.
    """
    merged: dict[str, dict] = {}
    for path, rows in sources:
        for row in rows:
            old = merged.get(row["model"])
            new = dict(old) if old is not None and old["input"] == row["input"] else {}
            new.update({k: v for k, v in row.items() if k not in LIBS})
            for lib in LIBS:
                if lib in row:
                    new[lib] = {**row[lib], "source": path, "commit": row.get("commit")}
            merged[row["model"]] = new
    for r in merged.values():
        for lib in LIBS:
            r.setdefault(lib, {"status": "not run", "reason": "in none of these files", "source": None})
    return sorted(merged.values(), key=lambda r: (r["module"], r["model"]))


def counts(rows: list[dict], lib: str) -> dict[str, int]:
    """How many rows of ``rows`` have each status for ``lib`` (pruned, refused, broken, ...)."""
    found: dict[str, int] = {}
    for r in rows:
        found[r[lib]["status"]] = found.get(r[lib]["status"], 0) + 1
    return found


def _counted(c: dict[str, int]) -> str:
    rest = ", ".join(f"{n} {status}" for status, n in sorted(c.items()) if status != "pruned")
    return f"**{c.get('pruned', 0)}**" + (f" ({rest})" if rest else "")


def _px(row: dict) -> str:
    h, w = row["input"][1:]
    return str(h) if h == w else f"{h}x{w}"


def timm_table(rows: list[dict]) -> str:
    """The docs table of ``rows`` (see :func:`merge_rows`), with a sentence saying what ran where."""
    sizes: dict[str, int] = {}
    for r in rows:
        sizes[_px(r)] = sizes.get(_px(r), 0) + 1
    size_text = ", ".join(f"{n} at {px} px" for px, n in sorted(sizes.items(), key=lambda kv: -kv[1]))
    sources: dict[tuple, int] = {}
    for r in rows:
        for lib in LIBS:
            if r[lib]["source"] is not None:
                key = (NAMES[lib], Path(r[lib]["source"]).name, r[lib].get("commit") or "unrecorded")
                sources[key] = sources.get(key, 0) + 1
    source_text = "; ".join(f"{lib} {n} rows from `{src}` at commit {commit}"
                            for (lib, src, commit), n in sorted(sources.items(), key=lambda kv: (kv[0][0], -kv[1])))
    lines = [f"{len(rows)} timm models (one per architecture module, smallest variant <= 60M params, random init, "
             f"ratio 0.5, l1, local; input: {size_text}, the column *px*): slimkit pruned "
             f"{_counted(counts(rows, 'slimkit'))}, Torch-Pruning {_counted(counts(rows, 'torch_pruning'))}. "
             f"Sources: {source_text}.", "",
             "| module | model | px | slimkit | MACs left | params left | Torch-Pruning | MACs left | params left |",
             "|---|---|---:|---|---:|---:|---|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['module']} | {r['model']} | {_px(r)} | {_cell(r['slimkit'])} | "
                     f"{_cell(r['torch_pruning'])} |")
    return "\n".join(lines)


def _module_of(name: str) -> str:
    """timm's architecture module of model ``name`` (``mixnet_s`` -> ``efficientnet``)."""
    import timm
    from timm.models import is_model_in_modules

    return next((m for m in timm.list_modules() if is_model_in_modules(name, [m])), name)


def _write_docs(marker: str, table: str) -> None:
    text = DOC.read_text()
    block = f"<!-- {marker} -->\n{table}\n<!-- /{marker} -->"
    if f"<!-- {marker} -->" in text:
        text = re.sub(rf"<!-- {marker} -->.*<!-- /{marker} -->", lambda _: block, text, flags=re.S)
    else:
        text += "\n" + block + "\n"
    from slimkit.atomic import atomic_write_bytes

    atomic_write_bytes(DOC, text.encode())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", choices=["torchvision", "timm"], default="torchvision")
    parser.add_argument("--size", type=int, default=None, help="input size (default: 64, timm: the model's own)")
    parser.add_argument("--models", default=None, help="comma-separated names (timm: module=model or model)")
    parser.add_argument("--max-params", type=float, default=60e6)
    parser.add_argument("--cpu-limit", type=float, default=0, help="timm: CPU seconds per library and model (0: none)")
    parser.add_argument("--json", default=None, help="timm: append rows to this JSON-lines file")
    parser.add_argument("--table-from", default=None,
                        help="timm: only print (and --write-docs) the table of --json files, comma-separated "
                             "(the last row per model wins, later files over earlier ones)")
    parser.add_argument("--libs", default=",".join(LIBS),
                        help="timm: libraries to run (rerun one library's cells: --libs slimkit)")
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.zoo == "torchvision":
        size = args.size or 64
        lines = ["| model | 30% of channel units | 50% of channel units |", "|---|---|---|"]
        for name in (args.models or ",".join(DEFAULT)).split(","):
            start = time.perf_counter()
            lines.append(f"| {name} | {check(name, size)} |")
            print(lines[-1], f"({time.perf_counter() - start:.1f} s)", flush=True)
        table = "\n".join(lines)
        print(table)
        if args.write_docs:
            _write_docs("coverage", table)
        return
    if args.table_from:
        table = timm_table(merge_rows([(path, read_rows(path)) for path in args.table_from.split(",")]))
        print(table)
        if args.write_docs:
            _write_docs("coverage-timm", table)
        return
    if args.models:
        todo = [tuple(m.split("=")) if "=" in m else (_module_of(m), m) for m in args.models.split(",")]
    else:
        todo = timm_models(args.max_params)
    libs = tuple(args.libs.split(","))
    rows = []
    for module, name in todo:
        start = time.perf_counter()
        row = timm_row(module, name, args.size, args.cpu_limit, libs)
        rows.append(row)
        print(json.dumps(row), f"({time.perf_counter() - start:.1f} s)", flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")
    table = timm_table(merge_rows([(args.json, read_rows(args.json))] if args.json else [("this run", rows)]))
    print(table)
    if args.write_docs:
        _write_docs("coverage-timm", table)


if __name__ == "__main__":
    main()
