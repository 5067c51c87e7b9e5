"""slimkit.encode.load(path, runtime="compressed"): pruned + shared layers run from the stored indices and codebooks."""

import pytest
import torch
from torch import nn

from slimkit.data import load_data
from slimkit.encode import load, save
from slimkit.encode.runtime import COMPRESSED_LAYERS, load_compressed, resident_bytes
from slimkit.kernels.fused import FusedChain
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


def test_the_whole_lenet_runs_as_one_fused_chain_with_the_layers_unfused_outputs(slim_file, digits):
    name, path = slim_file
    fused, unfused = load(path, runtime="compressed"), load_compressed(path, fuse=False)
    chains = [m for m in fused.modules() if isinstance(m, FusedChain)]
    assert len(chains) == 1 and not any(isinstance(m, FusedChain) for m in unfused.modules())
    assert set(RECIPES[name][0]) <= set(chains[0].names)  # every compressed layer inside the one chain
    assert all(v.endswith("fused in fused_0") for v in fused.compressed_report.values())
    x = torch.stack([digits.test[i][0] for i in range(5)])
    with torch.no_grad():
        for batch in (x[:1], x):
            assert torch.allclose(fused(batch), unfused(batch), rtol=1e-5, atol=1e-5)
        assert all(found is not None for found in chains[0]._programs.values())  # the interpreter ran
        # another resolution: FitSize resamples, which the chain cannot do, so it runs the layers one by one
        big = torch.rand(2, 1, 32, 32)
        assert torch.allclose(fused(big), load(path)(big), rtol=1e-4, atol=1e-5)
    assert resident_bytes(fused) <= resident_bytes(unfused) + 4 * 1000  # weights not held twice (biases copied)


class _Functional(nn.Module):
    """Convolutions with padding and stride 2, functional ReLU and flatten: the chain's other code paths."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 7, 3, padding=1)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(7, 5, 3, stride=2, padding=2, bias=False)
        self.fc1 = nn.Linear(5 * 4 * 4, 9)
        self.fc2 = nn.Linear(9, 4)

    def forward(self, x):
        x = torch.relu(self.pool(self.conv1(x)))  # a padded pool over negative values, then a ReLU fused into it
        x = torch.flatten(nn.functional.relu(self.conv2(x)), 1)
        return self.fc2(self.fc1(x).relu())


def test_fused_chain_matches_the_decoded_model_on_padding_stride_and_functional_ops(tmp_path):
    torch.manual_seed(1)
    model = _Functional()
    magnitude_prune_(model, torch.zeros(1, 3, 11, 11), {"sparsity": 0.6})
    share_weights_(model, torch.zeros(1, 3, 11, 11), {"conv_bits": 4, "linear_bits": 3})
    save(model, tmp_path / "m.slim")
    decoded = load(tmp_path / "m.slim", model=_Functional())
    compressed = load(tmp_path / "m.slim", model=_Functional(), runtime="compressed")
    chains = [m for m in compressed.modules() if isinstance(m, FusedChain)]
    assert len(chains) == 1 and {"conv1", "pool", "conv2", "fc1", "fc2"} <= set(chains[0].names)
    x = torch.randn(3, 3, 11, 11)
    with torch.no_grad():
        for batch in (x[:1], x):
            want = decoded(batch)
            assert torch.allclose(compressed(batch), want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
    assert list(chains[0]._programs.values())[0] is not None  # the interpreter ran, not the layer-by-layer fallback


def test_a_copy_or_a_pickle_keeps_one_copy_of_the_weights_and_the_outputs(slim_file):
    import copy
    import io

    compressed = load(slim_file[1], runtime="compressed")
    buffer = io.BytesIO()
    torch.save(compressed, buffer)
    buffer.seek(0)
    x = torch.rand(1, 1, 28, 28)
    for twin in (copy.deepcopy(compressed), torch.load(buffer, weights_only=False)):
        assert type(twin) is type(compressed) and resident_bytes(twin) == resident_bytes(compressed)
        with torch.no_grad():
            assert torch.equal(twin(x), compressed(x))


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
