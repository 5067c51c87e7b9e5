"""report.html: a single page with inline PNG plots and every section, for a run and for a search."""

import base64
import json
import shutil
import subprocess
from html.parser import HTMLParser

import pytest

from slimkit.report.html import SECTIONS, render_run_html, table


class Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sections, self.images, self.external, self.tags = [], [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        if tag == "section":
            self.sections.append(attrs.get("id"))
        if tag == "img":
            self.images.append(attrs["src"])
        if tag in ("script", "link") or (tag == "img" and not attrs["src"].startswith("data:")):
            self.external.append(tag)


def parse(text: str) -> Page:
    page = Page()
    page.feed(text)
    page.close()
    return page


def assert_pngs(page: Page) -> None:
    assert page.images
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"


ROWS = [
    {"name": "baseline", "kind": "train", "accuracy": 98.0, "params": 1000, "nonzeros": 1000, "macs": 50000,
     "bytes": 4000, "latency_ms": 0.2, "latency_p99_ms": 0.3, "energy_uj": 3.1, "ratio": 1.0, "engine": "eager",
     "energy": {"assumptions": "Horowitz 2014 45 nm; weights in SRAM"}, "details": {}},
    {"name": "int8", "kind": "int8", "accuracy": 97.5, "params": 1000, "nonzeros": 1000, "macs": 50000,
     "bytes": 1100, "latency_ms": 0.1, "latency_p99_ms": 0.15, "energy_uj": 0.9, "ratio": 3.6,
     "engine": "onnxruntime-int8",
     "details": {"engines": {"onnxruntime-int8": {"accuracy": 97.5, "latency_ms": 0.1, "integer": True,
                                                  "file_bytes": 1500},
                             "torch-x86-int8": {"error": "RuntimeError: no"}},
                 "sensitivity": {"fc": {"8": {"drop": 0.0, "kl": 1e-4}, "4": {"drop": 1.5, "kl": 0.02}}}}},
]


def test_run_page_has_every_section_inline():
    text = render_run_html({"recipe": {"name": "t"}, "model": "m", "data": "digits", "stages": ROWS})
    page = parse(text)
    assert page.sections == list(SECTIONS)
    assert_pngs(page)
    assert not page.external  # one self-contained file
    assert "torch-x86-int8" in text and "RuntimeError: no" in text and "Horowitz 2014" in text
    assert "4 bit" in text  # the int8 stage's sensitivity table


def test_table_escapes_and_formats():
    html_text = table([{"a": "<b>", "n": 1234567, "f": 0.12345}])
    assert "&lt;b&gt;" in html_text and "1,234,567" in html_text and "0.1235" in html_text


def test_real_run_writes_report_html(tmp_path):
    from slimkit.pipeline import run_recipe
    from slimkit.recipe import parse_recipe

    recipe = parse_recipe({"name": "html", "model": "lenet-300-100", "train": {"epochs": 0}, "latency_runs": 3,
                           "stages": [{"magnitude": {"sparsity": 0.5}}]})
    run_recipe(recipe, tmp_path / "run", progress=False, log=lambda _m: None)
    text = (tmp_path / "run" / "report.html").read_text()
    page = parse(text)
    assert page.sections == list(SECTIONS)
    assert_pngs(page)
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert all("energy_uj" in row for row in report["stages"])


@pytest.mark.slow
def test_search_page_renders_in_a_headless_browser_or_parses(tmp_path):
    """The search page: every section plus the search's own; rendered by Chromium when the machine has one."""
    from slimkit.search import search

    out = tmp_path / "s"
    search({"model": "plaincnn-2", "budget": "macs=0.6x", "epochs": 0, "final_epochs": 0, "population": 4,
            "generations": 1, "max_steps": 2, "sensitivity_samples": 16, "greedy_candidates": 1,
            "evolution_trials": 1, "trial_epochs": 0, "engine": "eager", "ratios": [0.5], "ranks": [0.5],
            "runner": "sequential"}, out, log=None)
    text = (out / "report.html").read_text()
    page = parse(text)
    assert page.sections == ["search", *SECTIONS]
    assert_pngs(page)
    assert not page.external
    browser = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)),
                   None)
    if browser:
        dom = subprocess.run([browser, "--headless", "--disable-gpu", "--no-sandbox", "--dump-dom",
                              (out / "report.html").as_uri()], capture_output=True, text=True, timeout=60).stdout
        for sid in ["search", *SECTIONS]:
            assert f'id="{sid}"' in dom
