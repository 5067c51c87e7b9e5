"""Every benchmarks/*.py answers --help: it imports cleanly the way ``python benchmarks/NAME.py`` runs it.

The scripts run in one subprocess (torch is imported once) with ``benchmarks/`` first on
``sys.path``, as when a script is started directly, so a file there named after a package
(``coverage.py`` shadowed the ``coverage`` package that numba imports) breaks this test.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"

RUNNER = r"""
import contextlib, io, json, runpy, sys
folder, scripts = sys.argv[1], sys.argv[2:]
sys.path.insert(0, folder)
results = {}
for script in scripts:
    sys.argv = [script, "--help"]
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(script, run_name="__main__")
        results[script] = "no SystemExit: --help did not stop the script"
    except SystemExit as done:
        results[script] = "ok" if done.code in (0, None) and "usage:" in out.getvalue() else f"exit {done.code}"
    except Exception as err:
        results[script] = f"{type(err).__name__}: {err}"
print(json.dumps(results))
"""


@pytest.mark.slow
def test_every_benchmark_answers_help():
    scripts = sorted(str(p) for p in BENCHMARKS.glob("*.py"))
    assert len(scripts) >= 5
    done = subprocess.run([sys.executable, "-c", RUNNER, str(BENCHMARKS), *scripts], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert sorted(results) == scripts
    failed = {Path(k).name: v for k, v in results.items() if v != "ok"}
    assert failed == {}


def test_no_benchmark_is_named_after_an_installed_package():
    import importlib.util

    shadowing = [p.name for p in BENCHMARKS.glob("*.py")
                 if (spec := importlib.util.find_spec(p.stem)) is not None and spec.origin != str(p)]
    assert shadowing == []
