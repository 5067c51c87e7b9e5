"""HashedNets (Chen 2015) and DCT-domain compression (CNNpack, Wang 2016): sizes, exact decode, damage, recipes."""

from __future__ import annotations

import struct
import zlib

import pytest
import scipy.fft
import torch
from torch import nn

from slimkit.encode import container, load, save
from slimkit.encode.dct import (
    dct_compress_,
    dct_hooks,
    dct_matrix,
    forward_dct,
    inverse_dct,
    synthesize,
    transform_of,
)
from slimkit.exceptions import ConfigError, CorruptFileError
from slimkit.manifest import load_model, save_model
from slimkit.measure.storage import stored_bytes
from slimkit.models import create_model
from slimkit.quantize.hashed import (
    HashedConv2d,
    HashedLinear,
    hash_index_sign,
    hash_weights_,
)
from slimkit.stages import STAGES
from slimkit.train import TrainConfig, fit


def small_net() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(2, 6, 3), nn.ReLU(), nn.Conv2d(6, 4, 1), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))


X_SMALL = torch.zeros(1, 2, 8, 8)  # one input of small_net
X_LENET = torch.zeros(1, 1, 28, 28)


def test_stages_registered():
    assert {"hash", "dct"} <= set(STAGES.names())


# ------------------------------------------------------------------------------ HashedNets


def test_hash_is_deterministic_in_range_and_seeded():
    index, sign = hash_index_sign(10_000, 37, seed=5)
    again, sign_again = hash_index_sign(10_000, 37, seed=5)
    assert torch.equal(index, again) and torch.equal(sign, sign_again)
    assert int(index.min()) == 0 and int(index.max()) == 36
    assert set(sign.unique().tolist()) == {-1.0, 1.0}
    assert abs(float(sign.mean())) < 0.05  # the sign hash is balanced
    counts = torch.bincount(index, minlength=37).float()
    assert counts.min() > 0.6 * counts.mean()  # buckets are filled evenly
    other, _ = hash_index_sign(10_000, 37, seed=6)
    assert not torch.equal(index, other)


def test_virtual_weight_and_gradient_are_the_papers():
    layer = HashedLinear(6, 4, bias=True, buckets=5, seed=3)
    idx, sign = layer.hash_index, layer.hash_sign
    w = layer.hashed_weight.detach()
    assert torch.equal(layer.weight, sign * w[idx])
    x = torch.randn(3, 6)
    layer(x).pow(2).sum().backward()
    dense = (sign * w[idx]).requires_grad_(True)
    (x @ dense.T + layer.bias.detach()).pow(2).sum().backward()
    # dL/dw_k = sum_{h(j)=k} xi(j) dL/dV_j
    want = torch.zeros(5).index_add_(0, idx.flatten(), (sign * dense.grad).flatten())
    torch.testing.assert_close(layer.hashed_weight.grad, want)


def test_project_is_the_least_squares_fit():
    layer = HashedConv2d(3, 2, 3, buckets=7, seed=1)
    dense = torch.randn(2, 3, 3, 3)
    layer.project_(dense)
    a = torch.zeros(dense.numel(), 7, dtype=torch.float64)  # V = A w
    a[torch.arange(dense.numel()), layer.hash_index.flatten()] = layer.hash_sign.flatten().double()
    lstsq = torch.linalg.lstsq(a, dense.flatten().double().unsqueeze(1)).solution.flatten()
    torch.testing.assert_close(layer.hashed_weight.double(), lstsq, rtol=1e-5, atol=1e-6)


def test_stored_size_is_the_vector_plus_the_seed(tmp_path):
    model = nn.Sequential(nn.Linear(40, 10), nn.ReLU(), nn.Linear(10, 3, bias=False))
    report = hash_weights_(model, torch.zeros(1, 40), {"linear_ratio": 0.1})
    k0, k1 = report.layers["0"]["buckets"], report.layers["2"]["buckets"]
    assert (k0, k1) == (40, 3)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {
        "0.hashed_weight": (40,), "0.bias": (10,), "2.hashed_weight": (3,)}
    # fp32 vectors + bias + one uint32 seed each
    assert stored_bytes(model) == report.after.bytes == 4 * (40 + 10 + 3) + 4 * 2
    infos = save(model, tmp_path / "m.slim")
    assert {i.name: i.weights for i in infos} == {"0.hashed_weight": 40, "0.bias": 10, "2.hashed_weight": 3}


@pytest.mark.parametrize("fmt", ["pt", "slim"])
def test_hashed_round_trip_is_exact(tmp_path, fmt):
    model = create_model("lenet5", num_classes=10, in_channels=1)
    hash_weights_(model, X_LENET, {"conv_ratio": 0.25, "linear_ratio": 0.05, "seed": 9})
    with torch.no_grad():
        model.fc1.hashed_weight.add_(0.01)  # not the projected init: what training leaves
    path = tmp_path / f"m.{fmt}"
    if fmt == "pt":
        save_model(model, path)
        loaded = load_model(path)
    else:
        save(model, path)
        loaded = load(path)
    assert isinstance(loaded.fc1, HashedLinear) and isinstance(loaded.conv2, HashedConv2d)
    assert loaded.fc1.seed == model.fc1.seed and loaded.fc1.buckets == model.fc1.buckets
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(model.eval()(x), loaded(x))


def test_hashed_layers_train_in_place():
    model = small_net()
    hash_weights_(model, X_SMALL, {"conv_ratio": 0.5, "linear_ratio": 0.1})
    before = model[4].hashed_weight.detach().clone()
    x, y = torch.randn(16, 2, 8, 8), torch.arange(16) % 5
    fit(model, torch.utils.data.TensorDataset(x, y), TrainConfig(epochs=1, batch_size=8, lr=0.1), progress=False)
    assert not torch.equal(before, model[4].hashed_weight)
    assert model[4].hashed_weight.numel() == 72  # still 10% of the 144 x 5 weights


def test_hash_refuses_pruned_layers_and_bad_config():
    from slimkit.prune.masks import set_mask

    model = small_net()
    set_mask(model[0], torch.ones_like(model[0].weight))
    with pytest.raises(ConfigError, match="carries weight_mask"):
        hash_weights_(model, X_SMALL, {})
    with pytest.raises(ConfigError, match="linear_ratio"):
        hash_weights_(small_net(), X_SMALL, {"linear_ratio": 0})
    with pytest.raises(ConfigError, match="no Conv2d/Linear module matches"):
        hash_weights_(small_net(), X_SMALL, {"layers": ["nothing*"]})


# ------------------------------------------------------------------------------ DCT


def test_dct_matrix_is_orthonormal_and_matches_scipy():
    d = dct_matrix(5)
    torch.testing.assert_close(d @ d.T, torch.eye(5, dtype=torch.float64))
    w = torch.randn(3, 2, 5, 5)
    want = scipy.fft.dctn(w.double().numpy(), type=2, norm="ortho", axes=(2, 3))
    torch.testing.assert_close(forward_dct(w, "kernel"), torch.from_numpy(want))
    row = torch.randn(4, 9)
    torch.testing.assert_close(forward_dct(row, "row"), torch.from_numpy(
        scipy.fft.dct(row.double().numpy(), type=2, norm="ortho", axis=1)))
    torch.testing.assert_close(inverse_dct(forward_dct(w, "kernel"), "kernel"), w.double())
    assert transform_of((4, 2, 3, 3)) == "kernel" and transform_of((4, 2, 1, 1)) == transform_of((4, 2)) == "row"


@pytest.mark.parametrize("zero_fraction", [0.0, 0.6])
def test_dct_error_is_exactly_the_coefficient_quantization(zero_fraction):
    model = small_net()
    original = {n: m.weight.detach().clone() for n, m in model.named_modules() if hasattr(m, "weight")}
    report = dct_compress_(model, X_SMALL, {"conv_bits": 3, "linear_bits": 4, "zero_fraction": zero_fraction})
    assert [report.layers[n]["transform"] for n in ("0", "2", "4")] == ["kernel", "row", "row"]
    for name, w in original.items():
        m = model.get_submodule(name)
        t = transform_of(tuple(w.shape))
        index, book = m.dct_index.long(), m.dct_codebook.double()
        assert int(index.max()) < book.numel()
        assert (index < 0).sum().item() == round(zero_fraction * w.numel())
        quantized = torch.where(index >= 0, book[index.clamp(min=0)], torch.zeros((), dtype=torch.float64))
        assert torch.equal(m.weight.detach(), inverse_dct(quantized, t).float())
        # Parseval: the weight error is the coefficient error
        coeff_err = (forward_dct(w, t) - quantized).norm()
        torch.testing.assert_close((w.double() - m.weight.double()).norm(), coeff_err, rtol=1e-5, atol=1e-6)


def test_dct_container_round_trip_is_bit_exact(tmp_path):
    model = create_model("lenet5", num_classes=10, in_channels=1)
    dct_compress_(model, X_LENET, {"conv_bits": 4, "linear_bits": 3, "zero_fraction": 0.5})
    infos = save(model, tmp_path / "m.slim")
    assert {i.name for i in infos if i.kind == "dct"} == {"conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"}
    loaded = load(tmp_path / "m.slim")
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    dense = 4 * 430_500  # fp32 weights of the four layers
    assert sum(i.bytes for i in infos if i.kind == "dct") < dense / 8  # 3-4 bit indices, half of them dropped


def _records(data: bytes) -> list[tuple[int, int, int]]:
    """(offset, body length, kind) of each record of a .slim file."""
    out, pos = [], 14
    while pos < len(data):
        (length,) = struct.unpack("<I", data[pos:pos + 4])
        out.append((pos, length, data[pos + 4]))
        pos += 8 + length
    return out


def test_damaged_dct_record_is_refused(tmp_path):
    model = small_net()
    dct_compress_(model, X_SMALL, {"conv_bits": 3, "linear_bits": 3})
    save(model, tmp_path / "m.slim")
    data = bytearray((tmp_path / "m.slim").read_bytes())
    offset, length, kind = next(r for r in _records(bytes(data)) if r[2] == container.KIND_DCT)
    flipped = bytearray(data)
    flipped[offset + 4 + length - 3] ^= 0xFF
    (tmp_path / "flip.slim").write_bytes(flipped)
    with pytest.raises(CorruptFileError, match=r"record \d+ \('0.weight'\) is corrupted \(CRC mismatch\)"):
        load(tmp_path / "flip.slim")
    # a well-framed record (valid CRC) whose content is impossible: unknown transform id
    body = bytearray(data[offset + 4: offset + 4 + length])
    name_len = struct.unpack("<H", body[1:3])[0]
    body[3 + name_len] = 7
    forged = data[:offset + 4] + body + struct.pack("<I", zlib.crc32(bytes(body))) + data[offset + 8 + length:]
    (tmp_path / "forged.slim").write_bytes(forged)
    with pytest.raises(CorruptFileError, match="unknown DCT transform id 7") as err:
        load(tmp_path / "forged.slim")
    assert "\n" not in str(err.value)
    body[3 + name_len] = 1  # 'row' does not fit the 3x3 kernel's shape
    forged = data[:offset + 4] + body + struct.pack("<I", zlib.crc32(bytes(body))) + data[offset + 8 + length:]
    (tmp_path / "forged.slim").write_bytes(forged)
    with pytest.raises(CorruptFileError, match="does not fit a weight of shape"):
        load(tmp_path / "forged.slim")


def test_dct_fine_tune_moves_codebooks_only():
    model = small_net()
    dct_compress_(model, X_SMALL, {"conv_bits": 3, "linear_bits": 3})
    index = {n: m.dct_index.clone() for n, m in model.named_modules() if hasattr(m, "dct_index")}
    books = {n: m.dct_codebook.clone() for n, m in model.named_modules() if hasattr(m, "dct_index")}
    x, y = torch.randn(16, 2, 8, 8), torch.arange(16) % 5
    fit(model, torch.utils.data.TensorDataset(x, y), TrainConfig(epochs=1, batch_size=8, lr=0.1), dct_hooks(),
        progress=False)
    for name, idx in index.items():
        m = model.get_submodule(name)
        assert torch.equal(m.dct_index, idx)
        assert not torch.equal(m.dct_codebook, books[name])
        assert torch.equal(m.weight.detach(), synthesize(m.dct_codebook, m.dct_index, transform_of(idx.shape)))


def test_dct_refuses_shared_layers():
    from slimkit.quantize import share_weights_

    model = small_net()
    share_weights_(model, X_SMALL, {"conv_bits": 2, "layers": ["0"]})
    with pytest.raises(ConfigError, match="carries weight_codebook"):
        dct_compress_(model, X_SMALL, {})
    with pytest.raises(ConfigError, match="zero_fraction"):
        dct_compress_(small_net(), X_SMALL, {"zero_fraction": 1.0})


# ------------------------------------------------------------------------------ through run_recipe


@pytest.mark.slow
def test_recipe_runs_dct_hash_and_encode(tmp_path):
    from slimkit.pipeline import run_recipe
    from slimkit.recipe import parse_recipe

    recipe = parse_recipe({
        "name": "dct-hash", "model": "plaincnn-2", "data": "digits", "image_size": 8, "latency_runs": 1,
        "train": {"epochs": 1, "batch_size": 256},
        "stages": [
            {"hash": {"linear_ratio": 0.25, "layers": ["classifier"]}, "finetune": {"epochs": 1}},
            {"dct": {"conv_bits": 4, "layers": ["features.*"]}, "finetune": {"epochs": 1}},
            {"encode": {}},
        ],
    })
    report = run_recipe(recipe, tmp_path / "run", progress=False, log=lambda _m: None)
    names = [row["name"] for row in report["stages"]]
    assert names == ["baseline", "hash", "dct", "encode"]
    final = load(tmp_path / "run" / "model.slim")
    assert isinstance(final.classifier, HashedLinear)
    assert hasattr(final.features.block1[0], "dct_codebook")
    base, hashed, dct, encoded = report["stages"]
    assert hashed["bytes"] < base["bytes"] and dct["bytes"] < hashed["bytes"]
    assert encoded["bytes"] == (tmp_path / "run" / "model.slim").stat().st_size
    assert all(0.0 <= row["accuracy"] <= 100.0 for row in report["stages"])
