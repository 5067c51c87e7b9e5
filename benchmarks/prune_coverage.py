"""Coverage of structured pruning over torchvision classification models and our zoo.

For each model: prune 30% and 50% of channel units (l1, local), check the forward works
with an unchanged output shape and that MACs and params go down; print a Markdown table
(model -> ok / reason) and optionally write it into docs/structured-pruning.md.

    python benchmarks/coverage.py --size 64 [--models resnet18,mobilenet_v2] [--write-docs]
"""

from __future__ import annotations

import argparse
import re
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--models", default=",".join(DEFAULT))
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    lines = ["| model | 30% of channel units | 50% of channel units |", "|---|---|---|"]
    for name in args.models.split(","):
        start = time.perf_counter()
        row = check(name, args.size)
        lines.append(f"| {name} | {row} |")
        print(lines[-1], f"({time.perf_counter() - start:.1f} s)", flush=True)
    table = "\n".join(lines)
    print(table)
    if args.write_docs:
        doc = Path(__file__).resolve().parents[1] / "docs" / "structured-pruning.md"
        text = doc.read_text()
        text = re.sub(r"<!-- coverage -->.*<!-- /coverage -->", f"<!-- coverage -->\n{table}\n<!-- /coverage -->",
                      text, flags=re.S)
        doc.write_text(text)


if __name__ == "__main__":
    main()
