"""structured_: config, criteria, selection, save/load, ONNX, stages and model coverage."""

import copy
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from slimkit.exceptions import ConfigError
from slimkit.manifest import load_model, save_model
from slimkit.measure import count_macs
from slimkit.models import create_model
from slimkit.prune import StructuredConfig, apply_structured_, plan_structured, structured_
from slimkit.prune.criteria import CRITERIA, ScoreContext, filter_sparsity
from slimkit.prune.graph import ChannelGraph, Unit, build_graph
from slimkit.prune.sparse_training import BNL1Penalty, GroupLassoPenalty
from slimkit.stages import STAGES, StageContext, no_evaluation, no_training
from slimkit.train import TrainConfig


def small_net():
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(128, 10),
    ).eval()


X = torch.randn(2, 3, 8, 8)


def test_config_dict_equals_object_and_rejects_bad_values():
    a, b = small_net(), small_net()
    b.load_state_dict(a.state_dict())
    ra = structured_(a, X, {"ratio": 0.5, "criterion": "l2"})
    rb = structured_(b, X, StructuredConfig(ratio=0.5, criterion="l2"))
    assert ra.to_dict() == rb.to_dict()
    with pytest.raises(ConfigError, match="ratio"):
        StructuredConfig.coerce({"ratio": 1.0})
    with pytest.raises(ConfigError, match="unknown key"):
        StructuredConfig.coerce({"ratoi": 0.5})
    with pytest.raises(ConfigError, match="criterion: unknown pruning criterion 'l3'; did you mean"):
        structured_(small_net(), X, {"criterion": "l3"})
    with pytest.raises(ConfigError, match="no prunable channel group"):
        structured_(small_net(), X, {"layers": ["nothing*"]})


def test_zero_ratio_is_identity():
    net = small_net()
    ref = copy.deepcopy(net)
    report = structured_(net, X, {"ratio": 0.0})
    assert report.units_pruned == 0
    torch.testing.assert_close(net(X), ref(X))


def test_l1_removes_smallest_filters():
    net = small_net()
    with torch.no_grad():
        net[0].weight.mul_(10)
        net[0].weight[[1, 5, 7]] *= 0.001
    structured_(net, X, {"ratio": 3 / 16, "criterion": "l1", "layers": ["0"]})
    assert net[0].out_channels == 13 and net[1].num_features == 13 and net[3].in_channels == 13


def test_bn_gamma_and_sparsity_gamma():
    net = small_net()
    with torch.no_grad():
        net[1].weight.fill_(1.0)
        net[1].weight[[2, 3]] = 0.01
    keep = net[0].weight[[0, 1, 4]].detach().clone()
    structured_(net, X, {"ratio": 2 / 16, "criterion": "bn_gamma", "layers": ["0"]})
    assert net[0].out_channels == 14
    torch.testing.assert_close(net[0].weight[[0, 1, 2]], keep)  # channels 2, 3 went
    # S_l(n): fraction of coefficients >= mean |w| of the layer
    net2 = nn.Sequential(nn.Conv2d(1, 2, (1, 4), bias=False), nn.BatchNorm2d(2), nn.Conv2d(2, 1, 1)).eval()
    with torch.no_grad():
        net2[0].weight.copy_(torch.tensor([[1.0, 1.0, 1.0, 1.0], [4.0, 0.0, 0.0, 0.0]]).view(2, 1, 1, 4))
        net2[1].weight.copy_(torch.tensor([0.5, 2.0]))
    g = build_graph(net2, torch.zeros(1, 1, 1, 4))
    s = sorted(filter_sparsity(net2, g).values())
    assert s == [0.25, 1.0]  # mean |w| = 1.0: filter 0 has 4/4 >= 1, filter 1 has 1/4
    sg = sorted(CRITERIA.get("sparsity_gamma")(net2, g, ScoreContext()).values())
    assert sg == [0.5, 0.5]


def test_random_is_seeded_and_taylor_runs():
    g = build_graph(small_net(), X)
    r1 = CRITERIA.get("random")(small_net(), g, ScoreContext(seed=3))
    r2 = CRITERIA.get("random")(small_net(), g, ScoreContext(seed=3))
    assert r1 == r2
    net = small_net()
    report = structured_(net, X, {"ratio": 0.25, "criterion": "taylor"},
                         batches=[(X, torch.tensor([1, 2]))])
    assert report.params_after < report.params_before
    assert all(p.grad is None for p in net.parameters())


def test_global_scope_cap_and_rounding():
    net = small_net()
    with torch.no_grad():
        net[1].weight.fill_(0.001)  # layer 0 is much less important
    structured_(net, X, {"ratio": 0.5, "criterion": "bn_gamma", "scope": "global", "max_layer_ratio": 0.75})
    assert net[0].out_channels == 4  # capped at 75% removed
    assert net[3].out_channels == 32 - (24 - 12)
    net = small_net()
    structured_(net, X, {"ratio": 0.3, "round_to": 8})
    assert net[0].out_channels % 8 == 0 and net[3].out_channels % 8 == 0


@pytest.mark.parametrize("target", ["macs", "params"])
def test_targets_in_macs_and_params(target):
    net = create_model("resnet20-cifar")
    x = torch.randn(1, 3, 32, 32)
    report = structured_(net, x, {"ratio": 0.4, "target": target})
    before, after = ((report.macs_before, report.macs_after) if target == "macs"
                     else (report.params_before, report.params_after))
    assert 0.38 <= 1 - after / before <= 0.5


def grouped_net():
    """1x1 -> grouped 3x3 (4 groups of 4) -> 1x1 -> grouped 3x3 (2 groups of 4), BN after each."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1, groups=4),
        nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 8, 1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(8, 10),
    ).eval()


def _kept(before: nn.BatchNorm2d, after: nn.BatchNorm2d) -> list[int]:
    """Positions of ``before`` that survive in ``after`` (BN scales are all different)."""
    return [int(i) for i in torch.nonzero(after.weight[:, None] == before.weight[None])[:, 1]]


def _per_group(kept: list[int], size: int, groups: int) -> list[int]:
    return [sum(1 for i in kept if i // (size // groups) == k) for k in range(groups)]


@pytest.mark.parametrize("scope", ["local", "global"])
def test_grouped_convs_lose_the_same_channels_in_every_group(scope):
    torch.manual_seed(0)
    net = grouped_net()
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor([16, 1, 15, 14, 13, 12, 2, 3, 4, 11, 10, 5, 6, 7, 8, 9]) / 20)
        for i in (4, 7, 10):
            net[i].weight.uniform_(0.1, 1)
    ref = copy.deepcopy(net)
    structured_(net, X, {"ratio": 0.5, "criterion": "bn_gamma", "scope": scope})
    assert net[3].groups == 4 and net[9].groups == 2
    for bn, groups in ((1, 4), (4, 4), (7, 2), (10, 2)):
        counts = _per_group(_kept(ref[bn], net[bn]), ref[bn].num_features, groups)
        assert len(set(counts)) == 1 and 0 < counts[0] < ref[bn].num_features // groups
    assert net[3].in_channels == net[0].out_channels and net[9].in_channels == net[6].out_channels
    if scope == "local":
        assert (net[3].in_channels, net[3].out_channels, net[9].in_channels, net[9].out_channels) == (8, 8, 4, 4)
        assert _kept(ref[1], net[1]) == [0, 2, 4, 5, 9, 10, 14, 15]  # the 2 largest gammas of each group of 4
    assert net(X).shape == (2, 10)


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "regnet_x_400mf"])
def test_save_load_and_onnx(tmp_path: Path, name):
    model = create_model(name).eval() if name == "mobilenet_v3_small" else build_torchvision(name)
    x = torch.randn(1, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = structured_(model, x, {"ratio": 0.5})
    assert name != "regnet_x_400mf" or any(r["layer"] == "trunk_output.block1.block1-0.f.b.0" for r in report.layers)
    path = save_model(model, tmp_path / "m.pt")
    loaded = load_model(path) if name == "mobilenet_v3_small" else load_model(path, model=build_torchvision(name))
    torch.testing.assert_close(loaded(x), model(x))
    onnx_path = tmp_path / "m.onnx"
    kwargs = {"dynamo": False} if "dynamo" in torch.onnx.export.__code__.co_varnames else {}
    try:
        torch.onnx.export(model, (x,), str(onnx_path), input_names=["x"], **kwargs)
    except Exception:
        torch.onnx.export(model, (x,), str(onnx_path), input_names=["x"])
    import onnxruntime as ort

    out = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    np.testing.assert_allclose(out, model(x).detach().numpy(), atol=1e-4, rtol=1e-4)


def test_stages_structured_and_sparse_train(tmp_path: Path):
    net = small_net()
    ctx = StageContext(example_inputs=X[:1], data=None, train_config=TrainConfig(epochs=1), run_dir=tmp_path,
                       baseline=copy.deepcopy(net), finetune=no_training, evaluate=no_evaluation)
    spec = STAGES.get("structured")
    out = spec.apply(net, spec.config_cls.coerce({"ratio": 0.5, "rounds": 2}, where="stages[0].structured"), ctx)
    assert out.phase == "materialized" and out.model[0].out_channels in (8, 9)  # per-round floors
    assert len(out.details["rounds"]) == 2
    spec = STAGES.get("sparse-train")
    out = spec.apply(net, spec.config_cls.coerce({"lam": 0.1}), ctx)
    penalty = out.hooks.penalties[0](net)
    expected = 0.1 * (net[1].weight.abs().sum() + net[4].weight.abs().sum())
    torch.testing.assert_close(penalty, expected)
    gl = GroupLassoPenalty(1.0, layers=["0"])(net)
    torch.testing.assert_close(gl, net[0].weight.flatten(1).norm(dim=1).sum())
    assert float(BNL1Penalty(1.0, layers=["nothing"])(net)) == 0.0


# -- coverage over torchvision classification models at 64x64 --------------------------

HEAVY = {"resnext50_32x4d", "wide_resnet50_2", "densenet121", "convnext_tiny", "efficientnet_b0", "vgg11_bn",
         "regnet_x_400mf", "googlenet", "resnet50"}
COVERAGE = ["resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2", "vgg11_bn", "mobilenet_v2",
            "mobilenet_v3_small", "mobilenet_v3_large", "mnasnet0_5", "shufflenet_v2_x0_5", "squeezenet1_1",
            "densenet121", "googlenet", "efficientnet_b0", "regnet_x_400mf", "convnext_tiny"]


def build_torchvision(name: str) -> nn.Module:
    kw = {"aux_logits": False, "init_weights": False} if name in ("googlenet", "inception_v3") else {}
    return torchvision.models.get_model(name, num_classes=10, **kw).eval()


@pytest.mark.parametrize("ratio", [0.3, 0.5])
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in COVERAGE])
def test_coverage_torchvision(name, ratio):
    model = build_torchvision(name)
    x = torch.randn(1, 3, 64, 64)
    macs, params = count_macs(model, x), sum(p.numel() for p in model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = structured_(model, x, {"ratio": ratio})
    with torch.no_grad():
        y = model(torch.randn(2, 3, 64, 64))
    assert y.shape == (2, 10)
    assert report.macs_after < macs and report.params_after < params
    assert count_macs(model, x) == report.macs_after and report.macs_before == macs


class FunctionalLinear(nn.Linear):
    """An nn.Linear subclass fx traces through (as timm's ``Linear``): counted by its MAC rule, seen as F.linear."""

    def forward(self, x):
        return nn.functional.linear(x, self.weight, self.bias)


def test_report_macs_count_a_traced_through_layer_like_count_macs():
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          FunctionalLinear(16, 32), nn.ReLU(), FunctionalLinear(32, 10)).eval()
    x = torch.randn(1, 3, 16, 16)
    before = count_macs(model, x)
    report = structured_(model, x, {"ratio": 0.5})
    assert model[5].in_features == 8 and model[7].in_features == 16
    assert report.macs_before == before and report.macs_after == count_macs(model, x) < before


# -- pruning results pinned, and batched criteria equal to the per-unit formulas ----------

def seeded(name: str) -> nn.Module:
    """Zoo model with seeded weights and BatchNorm scales spread over [0, 1)."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=10).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=gen))
    return model


PINNED = {  # conv out_channels after pruning, recorded before the graph/criteria speed-up
    ("resnet20-cifar", 0.5, "bn_gamma"): [10, 10, 10, 8, 10, 7, 10, 18, 16, 16, 18, 16, 14, 16, 34, 34, 34, 30, 34, 25,
                                          34],
    ("vgg11-cifar", 0.4, "l1"): [7, 13, 26, 100, 225, 512, 512, 512],
    ("mobilenet_v3_small", 0.5, "sparsity_gamma"): [
        11, 11, 8, 11, 7, 35, 35, 12, 44, 44, 12, 40, 40, 24, 40, 23, 116, 116, 64, 116, 23, 123, 123, 64, 123, 23, 61,
        61, 32, 61, 21, 66, 66, 40, 66, 21, 137, 137, 72, 137, 48, 276, 276, 144, 276, 48, 309, 309, 144, 309, 48, 299],
}


@pytest.mark.parametrize("name,ratio,criterion", list(PINNED))
def test_pruned_channel_counts_are_pinned(name, ratio, criterion):
    model = seeded(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        structured_(model, torch.zeros(1, 3, 32, 32), {"ratio": ratio, "criterion": criterion, "scope": "global"})
    assert [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)] == PINNED[name, ratio, criterion]


class WideNet(nn.Module):
    """Depthwise multiplier 2 (units with 2 rows in BN/depthwise) and a Linear with fan_in >= 32768."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 16, 3, groups=8)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16 * 48 * 48, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.relu(self.fc(torch.flatten(self.bn2(self.dw(self.bn(self.conv(x)))), 1))))


def row_stat(criterion, rows, layer_weight):
    if criterion == "l1":
        return rows.abs().sum()
    if criterion == "l2":
        return rows.pow(2).sum().sqrt()
    return (rows.abs() >= layer_weight.abs().mean()).float().mean(dim=1).mean()


def reference_scores(model, graph, criterion):
    """The per-unit formulas (one unit at a time) that the batched criteria reproduce bit for bit."""
    modules = dict(model.named_modules())
    result = {}
    for uid, unit in graph.units.items():
        values = []
        for (name, role), idx in unit.members.items():
            m, sel = modules[name], torch.tensor(idx)
            if role != "out":
                continue
            if criterion == "bn_gamma" and isinstance(m, nn.BatchNorm2d):
                values.append(m.weight.detach()[sel].abs())
            elif criterion != "bn_gamma" and isinstance(m, (nn.Conv2d, nn.Linear)) and name in unit.producers:
                w = m.weight.detach()
                values.append(row_stat(criterion, w[sel].reshape(len(idx), -1), w))
        if not values:
            result[uid] = float("nan")
        else:
            result[uid] = float((torch.cat(values) if criterion == "bn_gamma" else torch.stack(values)).mean())
    return result


def merge_pairs(graph):
    """The graph with the first two units of every group merged (producer rows with k = 2)."""
    units = dict(graph.units)
    for group in graph.groups:
        if len(group.units) > 1:
            a, b = units[group.units[0]], units.pop(group.units[1])
            units[a.id] = Unit(a.id, {k: np.concatenate([v, b.members[k]]) for k, v in a.members.items()}, a.producers)
    return ChannelGraph(graph.axes, units, graph.groups, graph.fixed_reasons)


@pytest.mark.parametrize("threads", [1, 2])
def test_batched_criteria_equal_per_unit_formulas(threads):
    model, x = WideNet().eval(), torch.randn(1, 3, 50, 50)
    with torch.no_grad():
        model.bn.weight.uniform_(0, 1)
        model.bn2.weight.uniform_(0, 1)
    graph = build_graph(model, x)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for g in (graph, merge_pairs(graph)):
            for name in ("l1", "l2", "bn_gamma", "sparsity"):
                ours, ref = CRITERIA.get(name)(model, g, ScoreContext()), reference_scores(model, g, name)
                assert list(ours) == list(ref)
                assert all(ours[u] == ref[u] or (math.isnan(ours[u]) and math.isnan(ref[u])) for u in ref), name
    finally:
        torch.set_num_threads(saved)


def test_planning_leaves_the_model_as_it_was_and_apply_equals_structured():
    net, x = create_model("resnet20-cifar").eval(), torch.randn(1, 3, 32, 32)
    twin = copy.deepcopy(net)
    params, before, layout = list(net.parameters()), copy.deepcopy(net.state_dict()), repr(net)
    plan = plan_structured(net, x, {"ratio": 0.4, "target": "macs"})  # the ratio search prunes and undoes
    assert 0 < plan.ratio < 0.99 and plan.units
    assert repr(net) == layout and all(a is b for a, b in zip(net.parameters(), params, strict=True))
    for key, value in net.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    report = apply_structured_(net, x, plan)
    assert report.to_dict() == structured_(twin, (x,), {"ratio": 0.4, "target": "macs"}).to_dict()
    assert repr(net) == repr(twin) and report.macs_after == count_macs(net, x) == report.after.macs
    with pytest.raises(ConfigError, match="not the one the plan was made for"):
        apply_structured_(net, x, plan)  # a plan applies once, to the model it was made for
