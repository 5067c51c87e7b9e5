"""Writes the ``.slim`` files in this folder and ``tensors.json`` (what they decode to).

They were written by the container of commit 6bb6d82 (before the record codec table). Every
later slimkit must decode them to the same tensors and re-encode the decoded model to the
same bytes as that container did (``reencoded_sha256``: the file itself, except for the
binary layers, whose alpha is recomputed in float32 from the decoded weights)
(``tests/test_encode.py::test_files_written_before_the_codec_table_decode_and_reencode_identically``).
Rerun only on purpose (``python tests/data/slim_v2/make_files.py``): the files are the reference.
Every record kind is here: RAW (with and without the mask flag), SHARED (pruned and dense,
csr/bitmask/dense layouts), DCT, PACKED uniform (per-channel asymmetric with fp16 scales,
per-tensor symmetric with fp32 scales) and PACKED binary.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).parent


def skeleton() -> nn.Module:
    """The model every file stores (rebuilt by ``load(path, model=skeleton())``)."""
    return nn.Sequential(nn.Conv2d(1, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 8, 3), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 4 * 4, 24), nn.ReLU(), nn.Linear(24, 3))


def tensor_digest(t: torch.Tensor) -> list:
    """[dtype, shape, sha256 of the bytes] of a tensor."""
    t = t.detach().cpu().contiguous()
    return [str(t.dtype), list(t.shape), hashlib.sha256(t.numpy().tobytes()).hexdigest()]


def models() -> dict[str, nn.Module]:
    from slimkit.encode.dct import dct_compress_
    from slimkit.prune.magnitude import magnitude_prune_
    from slimkit.quantize.binary import binarize_
    from slimkit.quantize.sharing import share_weights_
    from slimkit.quantize.uniform import quantize_

    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    out = {}
    torch.manual_seed(0)
    m = skeleton()
    m[1].running_mean.uniform_()
    dct_compress_(m, x, {"conv_bits": 3, "zero_fraction": 0.5, "layers": ("0",)})
    magnitude_prune_(m, x, {"sparsity": 0.8, "layers": ("3", "6")})
    share_weights_(m, x, {"conv_bits": 4, "linear_bits": 3, "layers": ("3", "8")})
    out["shared_dct"] = m.eval()
    torch.manual_seed(1)
    m = skeleton().eval()
    quantize_(m, x, {"bits": 4, "per_channel": True, "symmetric": False, "scale_dtype": "float16",
                     "overrides": {"0": 8}, "reduce_range": False}, calibration=[x])
    out["int4_per_channel"] = m.eval()
    torch.manual_seed(2)
    m = skeleton().eval()
    quantize_(m, x, {"bits": 8, "per_channel": False, "symmetric": True, "scale_dtype": "float32"},
              calibration=[x])
    out["int8_per_tensor"] = m.eval()
    torch.manual_seed(3)
    m = skeleton().eval()
    binarize_(m, x, {"mode": "xnor"})
    out["binary"] = m.eval()
    return out


def main() -> None:
    from slimkit.encode.container import encode_model, load, save

    digests = {}
    for name, model in models().items():
        path = HERE / f"{name}.slim"
        save(model, path)
        decoded = load(path, model=skeleton())
        digests[name] = {"tensors": {k: tensor_digest(v) for k, v in decoded.state_dict().items()},
                         "reencoded_sha256": hashlib.sha256(encode_model(decoded)[0]).hexdigest()}
    (HERE / "tensors.json").write_text(json.dumps(digests, indent=1) + "\n")


if __name__ == "__main__":
    main()
