"""A run directory's deployable files, at its top level, and which one to ship.

At the end of a run (:func:`slimkit.pipeline.run_recipe`) the final stage's artifacts are
placed beside ``model.pt`` under fixed names, as the recipe produces them:

- ``model.int8.onnx``: the int8 QDQ export an ``int8``/``qat`` stage ran in ONNX Runtime;
- ``model.slim``: the compressed container (``encode``, ``int8``, ``qat``, ``binarize``);
- ``model.onnx``: the final model as fp32 ONNX, when it is a float model (pruned,
  decomposed, distilled, shared) that exports.

The file to ship is the one whose figures the report's last row gives: the chosen integer
engine's file; else ``model.slim`` (the stored size the ratio counts); else the int8 ONNX;
else ``model.onnx``; else ``model.pt``.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

#: top-level name -> (engine or runtime that runs it, what it is)
KINDS = {
    "model.int8.onnx": ("onnxruntime-int8", "int8 QDQ ONNX with slimkit's grids"),
    "model.int8.pte": ("executorch-int8", "ExecuTorch program, XNNPACK int8"),
    "model.pte": ("executorch-fp32", "ExecuTorch program, XNNPACK fp32"),
    "model.slim": ("slimkit-decoded", "compressed .slim container; decode with `slimkit decode` or "
                                      "slimkit.encode.load, or run it compressed (engine slimkit-compressed: "
                                      "slimkit.encode.load(path, runtime='compressed'))"),
    "model.onnx": ("onnxruntime-fp32", "fp32 ONNX of the final model"),
    "model.pt": ("pytorch-eager", "slimkit model file (manifest + state dict; slimkit.manifest.load_model)"),
}
#: what a stage's artifact becomes at the top level, by how its file name ends
_SUFFIXES = ((".int8.onnx", "model.int8.onnx"), (".int8.pte", "model.int8.pte"), (".pte", "model.pte"),
             (".slim", "model.slim"))


@dataclass(frozen=True)
class Deployable:
    """One file at the run directory's top level: name, path, size in bytes, what runs it."""

    name: str
    path: str
    bytes: int
    runs_in: str
    what: str


@dataclass(frozen=True)
class RunDeployables:
    """The deployable files of a run, the one to ship and why; ``skipped``: name -> reason."""

    files: tuple[Deployable, ...]
    ship: Deployable
    why: str
    baseline_bytes: int | None = None
    skipped: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"files": [asdict(f) for f in self.files], "ship": asdict(self.ship), "why": self.why,
                "baseline_bytes": self.baseline_bytes, "skipped": dict(self.skipped)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunDeployables:
        return cls(tuple(Deployable(**f) for f in data["files"]), Deployable(**data["ship"]), data["why"],
                   data.get("baseline_bytes"), dict(data.get("skipped", {})))

    def ship_line(self) -> str:
        """``ship: PATH (SIZE, ...): why`` for the end of ``slimkit compress``."""
        ratio = ""
        if self.baseline_bytes:
            ratio = f", {self.baseline_bytes / max(self.ship.bytes, 1):.1f}x smaller than the fp32 baseline"
        return f"ship: {self.ship.path} ({self.ship.bytes:,} bytes{ratio}): {self.why}"


def _place(src: Path, dst: Path) -> None:
    if src.resolve() == dst.resolve():
        return
    from slimkit.atomic import atomic_open

    with open(src, "rb") as handle, atomic_open(dst) as out:
        shutil.copyfileobj(handle, out)


def publish_deployables(run_dir: str | os.PathLike, model: nn.Module, final_row: dict[str, Any],
                        example: torch.Tensor, baseline_bytes: int | None = None) -> RunDeployables:
    """Place the final deployables at ``run_dir``'s top level (see the module docstring).

    ``final_row``: the report's last stage row (its ``artifacts`` and ``engine``);
    ``model``: the final model (``model.pt`` must already be written).
    """
    root = Path(run_dir)
    skipped: dict[str, str] = {}
    placed: dict[str, Path] = {}
    for path in (final_row.get("artifacts") or {}).values():
        src = Path(path)
        name = next((top for end, top in _SUFFIXES if src.name.endswith(end)), None)
        if name is None or not src.is_file():
            continue
        _place(src, root / name)
        placed[name] = root / name
    from slimkit.deploy.onnx import export_onnx, is_quantized

    if is_quantized(model):
        skipped["model.onnx"] = "the final model is quantized: model.int8.onnx is its ONNX form"
    else:
        try:
            placed["model.onnx"] = export_onnx(model, example[:1], root / "model.onnx")
        except Exception as err:  # a layer without an ONNX form: say so, the run still stands
            skipped["model.onnx"] = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:200]}"
    placed["model.pt"] = root / "model.pt"
    files = tuple(Deployable(name, str(path), path.stat().st_size, *KINDS[name])
                  for name, path in sorted(placed.items(), key=lambda kv: list(KINDS).index(kv[0])))
    by_name = {f.name: f for f in files}
    engine = str(final_row.get("engine") or "")
    own = next((f for f in files if f.runs_in == engine), None)
    if own is not None and own.name != "model.pt":
        ship, why = own, f"the file the chosen engine ({engine}) ran: the report's accuracy and latency are its"
    elif "model.slim" in by_name:
        ship, why = by_name["model.slim"], "the smallest stored form, the size the report's ratio counts"
    elif "model.int8.onnx" in by_name:
        ship, why = by_name["model.int8.onnx"], "int8 ONNX with the model's own grids"
    elif "model.onnx" in by_name:
        ship, why = by_name["model.onnx"], "the final model as fp32 ONNX, for any ONNX runtime"
    else:
        ship, why = by_name["model.pt"], "no other deployable form was produced (see skipped)"
    return RunDeployables(files, ship, why, baseline_bytes, skipped)
