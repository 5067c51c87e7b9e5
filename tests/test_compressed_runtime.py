"""slimkit.encode.load(path, runtime="compressed"): pruned + shared layers run from the stored indices and codebooks."""

import pytest
import torch
from torch import nn

from slimkit.data import load_data
from slimkit.encode import load, save
from slimkit.encode.runtime import COMPRESSED_LAYERS, resident_bytes
from slimkit.models import create_model
from slimkit.prune.magnitude import magnitude_prune_
from slimkit.quantize.sharing import share_weights_
from slimkit.train import evaluate, fit

# the deep-compression recipes' sparsities and bits (src/slimkit/recipes/deep-compression*.yaml)
RECIPES = {
    "lenet-300-100": ({"fc1": 0.94, "fc2": 0.9, "fc3": 0.7}, {"linear_bits": 6}),
    "lenet5": ({"conv1": 0.34, "conv2": 0.9, "fc1": 0.96, "fc2": 0.8}, {"conv_bits": 8, "linear_bits": 5}),
}


@pytest.fixture(scope="module")
def digits():
    return load_data("digits")


@pytest.fixture(scope="module", params=sorted(RECIPES))
def slim_file(request, digits, tmp_path_factory):
    """A trained (1 epoch), pruned and shared model written as .slim, the stages of the deep-compression recipe."""
    name = request.param
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, in_channels=1)
    fit(model, digits.train, {"epochs": 1, "lr": 0.02, "batch_size": 32})
    sparsity, bits = RECIPES[name]
    magnitude_prune_(model, torch.zeros(1, 1, 28, 28), {"per_layer": sparsity})
    share_weights_(model, torch.zeros(1, 1, 28, 28), bits)
    path = tmp_path_factory.mktemp(name) / "model.slim"
    save(model, path)
    return name, path


def test_same_outputs_and_accuracy_as_the_decoded_model(slim_file, digits):
    _, path = slim_file
    decoded, compressed = load(path), load(path, runtime="compressed")
    x = torch.stack([digits.test[i][0] for i in range(8)])
    with torch.no_grad():
        for batch in (x[:1], x):
            want, got = decoded(batch), compressed(batch)
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
    assert evaluate(compressed, digits.test) == evaluate(decoded, digits.test)


def test_no_dense_weight_is_kept_and_memory_is_at_most_twice_the_file(slim_file):
    name, path = slim_file
    compressed = load(path, runtime="compressed")
    layers = [n for n, m in compressed.named_modules() if isinstance(m, COMPRESSED_LAYERS)]
    assert layers == list(RECIPES[name][0])  # every pruned + shared layer runs from its indices
    assert not any(k.endswith(".weight") for k in compressed.state_dict())
    assert all(v.startswith("indices") for v in compressed.compressed_report.values())
    kept = resident_bytes(compressed)
    assert kept <= 2 * path.stat().st_size
    assert kept < resident_bytes(load(path)) / 20


def test_layers_it_cannot_run_sparse_are_decoded_and_reported(tmp_path):
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    magnitude_prune_(model, torch.zeros(1, 4, 6, 6), {"sparsity": 0.5})
    share_weights_(model, torch.zeros(1, 4, 6, 6), {"conv_bits": 3, "linear_bits": 3})
    save(model, tmp_path / "m.slim")
    compressed = load(tmp_path / "m.slim", model=nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(),
                                                                nn.Linear(64, 3)), runtime="compressed")
    assert compressed.compressed_report["0"] == "decoded to dense (grouped or dilated convolution)"
    assert isinstance(compressed[2], COMPRESSED_LAYERS)
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        assert torch.allclose(compressed(x), model.eval()(x), atol=1e-5)


def test_unknown_runtime_is_one_line(slim_file):
    with pytest.raises(ValueError, match="runtime must be one of decoded, compressed, got 'sparse'"):
        load(slim_file[1], runtime="sparse")


def test_slimkit_compressed_is_an_engine_of_the_deploy_registry(slim_file, tmp_path):
    from slimkit.deploy.engines import ENGINES, EngineInput

    model = load(slim_file[1])
    x = torch.randn(2, 1, 28, 28)
    spec = ENGINES.get("slimkit-compressed")
    runner = spec.build(EngineInput(model, model, x[:1], tmp_path))
    assert spec.family == "slimkit" and runner.path.is_file()
    assert any(isinstance(m, COMPRESSED_LAYERS) for m in runner.model.modules())
    with torch.no_grad():
        assert torch.allclose(runner(x), model(x), atol=1e-5)
