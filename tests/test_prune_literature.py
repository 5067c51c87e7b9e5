"""OBD / L-OBS, DSD / IHT, L0 gates, ThiNet / LASSO reconstruction and Fisher pruning: defining properties."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from slimkit.exceptions import ConfigError
from slimkit.pipeline import run_recipe
from slimkit.prune.criteria import CRITERIA, ScoreContext
from slimkit.prune.dsd import dsd_, fit_train
from slimkit.prune.graph import build_graph
from slimkit.prune.l0 import HardConcrete, L0Penalty, add_l0_gates_, fold_l0_, gates
from slimkit.prune.masks import MASK, masked_modules
from slimkit.prune.reconstruction import reconstruct_prune_
from slimkit.prune.second_order import hessian_diagonal, layer_hessians, lobs_prune_, obd_prune_, obd_saliency
from slimkit.recipe import parse_recipe
from slimkit.train import TrainConfig, TrainHooks, fit


def tiny_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


def tiny_batches(n: int = 12, d: int = 3, classes: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g))]


# -- OBD ----------------------------------------------------------------------------------


def test_obd_exact_saliency_is_half_hii_w2_from_the_full_hessian():
    net = tiny_mlp()
    batches = tiny_batches()
    x, y = batches[0]
    s = obd_saliency(net, batches, ["0", "2"], hessian="exact")
    for name, layer in (("0", net[0]), ("2", net[2])):
        w0 = layer.weight.detach().clone()

        def loss_of(w, layer=layer):
            saved = layer.weight
            del layer.weight
            layer.weight = w
            try:
                return F.cross_entropy(net(x), y)
            finally:
                layer.weight = saved

        h = torch.autograd.functional.hessian(loss_of, w0)  # [out, in, out, in]
        diag = h.reshape(w0.numel(), w0.numel()).diagonal().view_as(w0)
        torch.testing.assert_close(s[name], 0.5 * diag * w0 ** 2, rtol=1e-4, atol=1e-7)
    assert net[0].weight.grad is None, "the saliency must leave the model's gradients as they were"


def test_obd_fisher_is_the_mean_squared_per_sample_gradient():
    net = tiny_mlp()
    batches = tiny_batches(10)
    x, y = batches[0]
    diag = hessian_diagonal(net, batches, ["0"], "fisher")["0"]
    expected = torch.zeros_like(net[0].weight)
    for i in range(len(x)):
        g = torch.autograd.grad(F.cross_entropy(net(x[i:i + 1]), y[i:i + 1]), net[0].weight)[0]
        expected += g ** 2 / len(x)
    torch.testing.assert_close(diag, expected, rtol=1e-5, atol=1e-8)
    s = obd_saliency(net, batches, ["0"])["0"]
    torch.testing.assert_close(s, 0.5 * expected * net[0].weight.detach() ** 2, rtol=1e-5, atol=1e-9)


def test_hutchinson_estimates_the_exact_diagonal():
    net = tiny_mlp()
    batches = tiny_batches()
    exact = hessian_diagonal(net, batches, ["2"], "exact")["2"]
    est = hessian_diagonal(net, batches, ["2"], "hutchinson", probes=1500)["2"]
    assert float((est - exact).abs().max()) < 0.2 * float(exact.abs().max())


def test_obd_prune_reaches_the_sparsity_and_refuses_exact_on_big_models():
    net = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5))
    batches = tiny_batches(16, 20, 5)
    report = obd_prune_(net, batches[0][0][:1], {"sparsity": 0.8, "scope": "local"}, batches=batches)
    assert report.layers["0"]["sparsity"] == 0.8 and report.layers["2"]["sparsity"] == 0.8
    assert int((net[0].weight == 0).sum()) == 480
    big = nn.Sequential(nn.Linear(200, 200), nn.Linear(200, 2))
    with pytest.raises(ConfigError, match="hessian: fisher or hutchinson"):
        obd_prune_(big, torch.zeros(1, 200), {"sparsity": 0.5, "hessian": "exact"}, batches=tiny_batches(4, 200, 2))
    with pytest.raises(ConfigError, match=r"batches=\[\(inputs, targets\)"):
        obd_prune_(net, torch.zeros(1, 20), {"sparsity": 0.5}, batches=[torch.zeros(4, 20)])


# -- L-OBS -------------------------------------------------------------------------------


def _correlated(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, d // 2, generator=g)
    mix = torch.randn(d // 2, d, generator=g)
    return base @ mix + 0.1 * torch.randn(n, d, generator=g)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_lobs_output_closer_to_the_original_than_magnitude(kind):
    torch.manual_seed(1)
    if kind == "linear":
        net = nn.Sequential(nn.Linear(16, 12))
        x = _correlated(256, 16)
    else:
        net = nn.Sequential(nn.Conv2d(4, 6, 3))
        x = _correlated(64 * 36, 4).view(64, 6, 6, 4).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        original = net(x)
    lobs, mag = copy.deepcopy(net), copy.deepcopy(net)
    report = lobs_prune_(lobs, x[:1], {"sparsity": 0.75, "rounds": 3}, batches=[x])
    assert report.layers["0"]["sparsity"] == 0.75
    from slimkit.prune import magnitude_prune_

    magnitude_prune_(mag, x[:1], {"sparsity": 0.75})
    with torch.no_grad():
        err_lobs = float((lobs(x) - original).pow(2).mean())
        err_mag = float((mag(x) - original).pow(2).mean())
    assert err_lobs < 0.5 * err_mag, (err_lobs, err_mag)
    assert int((lobs[0].weight != 0).sum()) == int(lobs[0].weight_mask.sum())


def test_layer_hessian_is_the_input_covariance():
    net = nn.Sequential(nn.Linear(5, 2))
    x = torch.randn(40, 5)
    h = layer_hessians(net, ["0"], [x[:25], x[25:]])["0"]
    torch.testing.assert_close(h, (x.double().T @ x.double()) / 40)


# -- DSD / IHT ---------------------------------------------------------------------------


def _blobs(n: int = 256, d: int = 20, classes: int = 4, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    centers = 3 * torch.randn(classes, d, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return TensorDataset(centers[y] + torch.randn(n, d, generator=g), y)


@pytest.mark.parametrize("cycles", [1, 2])
def test_dsd_releases_the_mask_and_ends_dense(cycles):
    data = _blobs()
    net = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 4))
    cfg = TrainConfig(epochs=1, lr=0.05, batch_size=32)
    fit(net, data, cfg, progress=False)
    seen = {}

    def train(model, tcfg, hooks):
        if hooks is not None:  # the sparse phase: the masks are in force
            seen["masked"] = {n: getattr(m, MASK).clone() for n, m in masked_modules(model).items()}
        return fit(model, data, tcfg, hooks, progress=False)

    report = dsd_(net, data.tensors[0][:1], {"sparsity": 0.5, "cycles": cycles, "sparse_epochs": 1,
                                             "dense_epochs": 1}, train=train, train_config=cfg)
    assert report.dense and not masked_modules(net)
    assert len(report.cycles) == cycles
    for c in report.cycles:
        assert c["sparse_sparsity"] == 0.5
        assert c["released"] > 0.9, "pruned weights must learn again once the mask is released"
        assert c["sparsity_after_dense"] < 0.05  # only weights of dead ReLU units stay 0
    pruned = seen["masked"]["0"] == 0
    assert float((net[0].weight.detach()[pruned] != 0).float().mean()) > 0.9


def test_fit_train_trains_on_the_given_data():
    data = _blobs(64)
    net = nn.Linear(20, 4)
    before = net.weight.detach().clone()
    fit_train(data, progress=False)(net, TrainConfig(epochs=1, batch_size=32), None)
    assert not torch.equal(before, net.weight.detach())


# -- L0 ----------------------------------------------------------------------------------


def test_hard_concrete_has_exact_zeros_and_the_closed_form_expected_l0():
    draws = 40_000
    gate = HardConcrete((draws, 5), init_drop=0.5)  # every row: the same 5 gates, drawn independently
    gate.set_log_alpha_(torch.tensor([-3.0, -1.0, 0.0, 1.0, 3.0]))
    z = gate.sample(torch.Generator().manual_seed(0)).detach()
    assert float(z.min()) == 0.0 and float(z.max()) == 1.0, "the clamp puts mass on exactly 0 and 1"
    p = gate.prob_nonzero().detach()[0]
    beta, gamma, zeta = 2 / 3, -0.1, 1.1
    alpha = gate.log_alpha.detach()[0]
    torch.testing.assert_close(p, torch.sigmoid(alpha - beta * torch.log(torch.tensor(-gamma / zeta))))
    freq = (z != 0).float().mean(0)
    sigma = (p * (1 - p) / draws).sqrt()
    assert bool(((freq - p).abs() < 5 * sigma + 1e-3).all()), (freq, p)
    torch.testing.assert_close(gate.expected_l0().detach(), draws * p.sum(), rtol=1e-5, atol=1e-2)
    gate = HardConcrete((5,))
    gate.set_log_alpha_(torch.tensor([-5.0, -2.4, -2.3, 0.0, 5.0]))  # log(-gamma/zeta) = -2.398
    det = gate.deterministic().detach()
    assert det[:2].tolist() == [0.0, 0.0] and float(det[2]) > 0 and float(det[4]) == 1.0


def test_l0_weight_gates_train_to_exact_zeros_and_fold_exactly():
    data = _blobs()
    net = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 4))
    add_l0_gates_(net, data.tensors[0][:1], {"target": "weights", "init_drop": 0.3})
    assert set(gates(net)) == {"0", "2"}
    fit(net, data, TrainConfig(epochs=3, lr=0.1, batch_size=32, weight_decay=0),
        TrainHooks(penalties=(L0Penalty(0.05),)), progress=False)
    x = data.tensors[0][:16]
    net.eval()
    with torch.no_grad():
        gated = net(x)
    report = fold_l0_(net, x[:1])
    assert not gates(net)
    zero = sum(v["zero"] for v in report.layers.values())
    assert zero > 0.2 * (20 * 32 + 32 * 4), report
    assert int((net[0].weight == 0).sum()) == int((net[0].weight_mask == 0).sum())
    torch.testing.assert_close(net(x), gated)


def test_l0_channel_gates_cut_the_zero_channels_and_keep_the_output():
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 3),
                        nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 3)).eval()
    x = torch.randn(4, 1, 6, 6)
    report = add_l0_gates_(net, x[:1], {"target": "channels"})
    assert set(report.gated) == {"1", "4"}
    alpha = net[1].l0_gate.log_alpha.detach().clone()
    alpha[[0, 3, 5]] = -10.0
    net[1].l0_gate.set_log_alpha_(alpha)
    with torch.no_grad():
        gated = net(x)
    folded = fold_l0_(net, x[:1])
    assert folded.channels_removed == 3
    assert net[0].out_channels == 5 and net[3].in_channels == 5
    torch.testing.assert_close(net(x), gated, atol=1e-5, rtol=1e-5)


# -- ThiNet / LASSO reconstruction -------------------------------------------------------


def _redundant_convnet() -> nn.Module:
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1), nn.ReLU(),
                        nn.Flatten(), nn.Linear(6 * 8 * 8, 4)).eval()
    with torch.no_grad():  # make the filters differ in norm so that L1 is a real (and wrong) choice
        net[0].weight.mul_(torch.linspace(0.3, 2.0, 8).view(8, 1, 1, 1))
        net[2].weight[:, 6:] *= 0.05  # the two largest filters barely matter downstream
    return net


def _next_layer_error(net: nn.Module, reference: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        a = reference[:3](x)
        b = net[:3](x)
    return float((a - b).pow(2).sum() / a.pow(2).sum())


@pytest.mark.parametrize("method", ["thinet", "lasso"])
def test_reconstruction_beats_l1_at_the_same_channel_count(method):
    reference = _redundant_convnet()
    x = torch.randn(64, 3, 8, 8)
    inputs = [x[:32], x[32:]]
    recon, l1 = copy.deepcopy(reference), copy.deepcopy(reference)
    r = reconstruct_prune_(recon, x[:1], {"method": method, "ratio": 0.5, "layers": ["0"]}, batches=inputs)
    plain = reconstruct_prune_(l1, x[:1], {"method": "l1", "ratio": 0.5, "layers": ["0"], "refit": False},
                               batches=inputs)
    assert recon[0].out_channels == l1[0].out_channels == 4
    assert r.groups[0]["error_selected"] < plain.groups[0]["error_selected"]
    assert r.groups[0]["error_refit"] <= r.groups[0]["error_selected"] + 1e-9
    held_out = torch.randn(64, 3, 8, 8)
    assert _next_layer_error(recon, reference, held_out) < _next_layer_error(l1, reference, held_out)


def test_least_squares_refit_is_exact_on_a_linear_layer():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 3)).eval()
    with torch.no_grad():  # hidden units 4 and 5 are linear combinations of units 0..3
        net[0].weight[4] = net[0].weight[0] + net[0].weight[1]
        net[0].bias[4] = net[0].bias[0] + net[0].bias[1]
        net[0].weight[5] = 2 * net[0].weight[2] - net[0].weight[3]
        net[0].bias[5] = 2 * net[0].bias[2] - net[0].bias[3]
    reference = copy.deepcopy(net)
    x = torch.randn(50, 4)
    report = reconstruct_prune_(net, x[:1], {"method": "thinet", "ratio": 0.34, "ridge": 0.0, "ignore": ["1"]},
                                batches=[x])
    assert net[0].out_features == 4 and net[1].in_features == 4
    assert report.groups[0]["error_refit"] < 1e-10
    fresh = torch.randn(20, 4)  # the dependency is exact, so the refit is exact on any input
    torch.testing.assert_close(net(fresh), reference(fresh), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_reconstruction_on_a_residual_net_keeps_it_running():
    from slimkit.models import create_model

    net = create_model("resnet20-cifar", num_classes=10, in_channels=1).eval()
    x = torch.randn(8, 1, 16, 16)
    report = reconstruct_prune_(net, x[:1], {"method": "lasso", "ratio": 0.5, "layers": ["conv1"]}, batches=[x])
    stream = next(g for g in report.groups if "conv1" in g["group"].split(","))
    assert len(stream["consumers"]) > 1, "a residual stream is read by several blocks (multi-branch)"
    assert net(x).shape == (8, 10)


def test_unknown_reconstruction_method_lists_the_choices():
    with pytest.raises(ConfigError, match="unknown pruning criterion 'thinett'"):
        reconstruct_prune_(nn.Linear(2, 2), torch.zeros(1, 2), {"method": "thinett"}, batches=[torch.zeros(1, 2)])


# -- Fisher pruning ----------------------------------------------------------------------


def test_fisher_criterion_matches_the_per_sample_definition():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 16, 2)).eval()
    with torch.no_grad():
        net[1].running_var.uniform_(0.5, 2.0)
    x, y = torch.randn(6, 1, 6, 6), torch.randint(0, 2, (6,))
    graph = build_graph(net, x[:1])
    scores = CRITERIA.get("fisher")(net, graph, ScoreContext(batches=[(x, y)]))
    expected = []
    for c in range(3):
        total = 0.0
        for n in range(len(x)):
            m = torch.ones(3, requires_grad=True)
            a = net[1](net[0](x[n:n + 1]))
            out = net[2:](a * m.view(1, 3, 1, 1))
            g = torch.autograd.grad(F.cross_entropy(out, y[n:n + 1]), m)[0][c]
            total += float(g) ** 2
        expected.append(total / (2 * len(x)))
    got = [scores[graph.units[u].id] for u in graph.groups[0].units]
    assert got == pytest.approx(expected, rel=1e-5)


# -- every method from a recipe ----------------------------------------------------------


def _run(tmp_path, model: str, stages: list) -> dict:
    recipe = parse_recipe({"name": "literature", "model": model, "data": "digits",
                           "train": {"epochs": 1, "lr": 0.05, "batch_size": 64}, "latency_runs": 2, "stages": stages})
    return run_recipe(recipe, tmp_path, progress=False, log=lambda _m: None)


@pytest.mark.slow
def test_unstructured_methods_run_from_a_recipe(tmp_path):
    ft = {"epochs": 1, "lr": 0.01}
    report = _run(tmp_path, "lenet-300-100", [
        {"name": "obd", "obd": {"sparsity": 0.8, "samples": 64}, "finetune": ft},
        {"name": "lobs", "lobs": {"sparsity": 0.9, "samples": 64, "layers": ["fc2", "fc3"]}, "finetune": ft},
        {"name": "dsd", "dsd": {"sparsity": 0.5, "sparse_epochs": 1, "dense_epochs": 1}},
        {"name": "l0", "l0": {"target": "weights", "lam": 0.1}, "finetune": ft},
    ])
    base, obd, lobs, dsd, l0 = report["stages"]
    assert obd["phase"] == "simulated" and obd["nonzeros"] < 0.25 * base["nonzeros"]
    assert lobs["details"]["layers"]["fc2"]["sparsity"] >= 0.9
    assert dsd["phase"] == "materialized" and dsd["details"]["dense"] and dsd["nonzeros"] > 2 * lobs["nonzeros"]
    assert dsd["details"]["cycles"][0]["released"] > 0.5  # weights fed by always-blank pixels get no gradient
    # the gates were trained and folded (a one-epoch budget is too short for L0 to close any: docs/pruning-methods.md)
    assert l0["phase"] == "simulated" and l0["details"]["layers"]["fc1"]["gates"] == 784 * 300
    assert l0["params"] == base["params"], "folding removes the gate parameters again"
    for row in report["stages"]:
        assert row["accuracy"] > 20


@pytest.mark.slow
def test_channel_methods_run_from_a_recipe(tmp_path):
    ft = {"epochs": 1, "lr": 0.01}
    report = _run(tmp_path, "plaincnn-3", [
        {"name": "thinet", "reconstruct": {"method": "thinet", "ratio": 0.25, "samples": 64}, "finetune": ft},
        {"name": "lasso", "reconstruct": {"method": "lasso", "ratio": 0.25, "samples": 64}, "finetune": ft},
        {"name": "fisher-kd", "structured": {"criterion": "fisher", "ratio": 0.25},
         "finetune": {**ft, "distill": {"method": "kd", "teacher": "baseline"}}},
        {"name": "l0", "l0": {"target": "channels", "lam": 0.05, "init_drop": 0.3}, "finetune": ft},
    ])
    base, thinet, lasso, fisher, l0 = report["stages"]
    assert base["params"] > thinet["params"] > lasso["params"] > fisher["params"] >= l0["params"]
    assert thinet["phase"] == lasso["phase"] == l0["phase"] == "materialized"
    assert all("error_refit" in g for g in thinet["details"]["groups"])
    for row in report["stages"]:
        assert row["accuracy"] > 20
