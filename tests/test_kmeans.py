"""1-D k-means (exact Lloyd on sorted data) and k-means weight sharing with centroid fine-tuning."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from slimkit.exceptions import ConfigError
from slimkit.prune.magnitude import magnitude_prune_
from slimkit.prune.masks import mask_hooks
from slimkit.quantize.kmeans import kmeans_1d
from slimkit.quantize.sharing import ShareConfig, share_weights_, sharing_hooks
from slimkit.train import TrainConfig, fit


def brute_lloyd(x: np.ndarray, centroids: np.ndarray, iters: int) -> np.ndarray:
    """Textbook Lloyd: O(n k) assignment by distance, mean update, empty clusters kept."""
    c = centroids.astype(float).copy()
    for _ in range(iters):
        labels = np.abs(x[:, None] - c[None, :]).argmin(1)
        for j in range(c.size):
            if (labels == j).any():
                c[j] = x[labels == j].mean()
    return c


@pytest.mark.parametrize("init", ["linear", "density", "random"])
@pytest.mark.parametrize("k", [1, 4, 16])
def test_matches_textbook_lloyd(init, k):
    x = np.random.default_rng(k).standard_normal(3000)
    result = kmeans_1d(x, k, init=init, max_iter=500)
    from slimkit.quantize.kmeans import init_centroids

    reference = brute_lloyd(x, init_centroids(np.sort(x), k, init), 500)
    np.testing.assert_allclose(np.sort(reference), result.centroids, atol=1e-9)
    # Labels: every value goes to its nearest centroid; inertia is the sum of squared distances.
    nearest = np.abs(x[:, None] - result.centroids[None, :]).min(1)
    np.testing.assert_allclose(np.abs(x - result.centroids[result.labels]), nearest, atol=1e-12)
    assert result.inertia == pytest.approx(float((nearest**2).sum()), rel=1e-9)


def test_inertia_close_to_sklearn():
    from sklearn.cluster import KMeans

    x = np.random.default_rng(0).laplace(size=20000)
    ours = kmeans_1d(x, 8)
    init = np.linspace(x.min(), x.max(), 8).reshape(-1, 1)
    theirs = KMeans(8, init=init, n_init=1, max_iter=300).fit(x.reshape(-1, 1))
    assert ours.inertia <= theirs.inertia_ * 1.001


def test_edge_cases():
    assert kmeans_1d(np.array([3.0]), 4).labels.tolist() == [0]
    same = kmeans_1d(np.full(10, 2.5), 3)
    assert same.inertia == 0 and np.all(same.centroids[same.labels] == 2.5)
    with pytest.raises(ValueError):
        kmeans_1d(np.array([]), 2)
    with pytest.raises(ValueError):
        kmeans_1d(np.array([1.0]), 0)


def cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 6 * 6, 10))


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


@pytest.mark.parametrize("make", [cnn, mlp], ids=["cnn", "mlp"])
@pytest.mark.parametrize("pruned", [False, True])
def test_share_uses_at_most_k_values_and_keeps_zeros(make, pruned):
    model = make()
    if pruned:
        magnitude_prune_(model, torch.zeros(1, 1, 8, 8), {"sparsity": 0.6})
    zeros = {n: (m.weight == 0).clone() for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    report = share_weights_(model, torch.zeros(1, 1, 8, 8), {"conv_bits": 3, "linear_bits": 2, "per_layer": {"3": 4}})
    assert sorted(report.changed) == sorted(zeros)
    for name, was_zero in zeros.items():
        module = model.get_submodule(name)
        bits = report.layers[name]["bits"]
        assert torch.equal(module.weight == 0, was_zero)
        assert module.weight[~was_zero].unique().numel() <= 2**bits
        assert torch.equal(module.weight_index < 0, was_zero)
        index = module.weight_index.long().clamp(min=0)
        assert torch.equal(module.weight[~was_zero], module.weight_codebook[index][~was_zero])


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_centroid_finetune_changes_only_centroids(optimizer):
    torch.manual_seed(0)
    model = cnn()
    magnitude_prune_(model, torch.zeros(1, 1, 8, 8), {"sparsity": 0.5})
    share_weights_(model, torch.zeros(1, 1, 8, 8), {"conv_bits": 3, "linear_bits": 3})
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    index = {n: m.weight_index.clone() for n, m in layers.items()}
    codebook = {n: m.weight_codebook.clone() for n, m in layers.items()}
    biases = {n: m.bias.detach().clone() for n, m in layers.items()}
    x = torch.randn(64, 1, 8, 8)
    data = TensorDataset(x, (x.mean(dim=(1, 2, 3)) > 0).long())
    cfg = TrainConfig(epochs=2, optimizer=optimizer, lr=1e-3, momentum=0.9, weight_decay=1e-4, batch_size=16)
    fit(model, data, cfg, mask_hooks().merge(sharing_hooks()), progress=False)
    for name, module in layers.items():
        assert torch.equal(module.weight_index, index[name])  # assignments fixed
        valid = index[name] >= 0
        assert bool((module.weight[~valid] == 0).all())  # zeros fixed
        assert torch.equal(module.weight[valid], module.weight_codebook[index[name].long()][valid])
        assert not torch.equal(module.weight_codebook, codebook[name])  # centroids trained
        assert not torch.equal(module.bias, biases[name])  # biases train as usual


def test_centroid_gradient_is_sum_of_member_gradients():
    from slimkit.quantize.sharing import share_centroid_grads

    model = mlp()
    share_weights_(model, torch.zeros(1, 1, 8, 8), {"linear_bits": 2})
    layer = model[1]
    grad = torch.randn_like(layer.weight)
    layer.weight.grad = grad.clone()
    share_centroid_grads(model)
    index = layer.weight_index.long()
    for c in range(4):
        members = index == c
        if members.any():
            assert torch.allclose(layer.weight.grad[members], grad[members].sum().expand(int(members.sum())))


def test_bad_share_config():
    with pytest.raises(ConfigError):
        ShareConfig.coerce({"conv_bits": 0}, where="stages[1].share")
    with pytest.raises(ConfigError):
        ShareConfig.coerce({"per_layer": {"fc*": 20}}, where="stages[1].share")
    with pytest.raises(ConfigError):
        ShareConfig.coerce({"init": "kmeans++"}, where="stages[1].share")
