"""FSP (Yim 2017) and CRD (Tian 2020): loss math against direct computations, gradients, recipes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from slimkit.distill.crd import CRDLoss, SlotTable, nce_loss
from slimkit.distill.fsp import FSPLoss, fsp_matrix, parse_sections
from slimkit.distill.methods import build_hooks, prepare_distillation
from slimkit.distill.spec import DISTILL_METHODS
from slimkit.exceptions import ConfigError
from slimkit.finetune import training_context
from slimkit.models.plain import plain_cnn
from slimkit.stages import StageContext
from slimkit.train import TrainConfig, fit


class Bundle:
    """28x28x1 images with a learnable signal, 3 classes."""

    def __init__(self, n: int = 48, classes: int = 3) -> None:
        g = torch.Generator().manual_seed(1)
        x = torch.randn(n, 1, 28, 28, generator=g)
        y = torch.arange(n) % classes
        x[:, :, :8, :8] += y.view(-1, 1, 1, 1).float()
        self.train = TensorDataset(x, y)
        self.test = TensorDataset(x[:16], y[:16])
        self.num_classes, self.in_channels, self.input_shape = classes, 1, (1, 28, 28)


def make_ctx(tmp_path, baseline=None) -> StageContext:
    return training_context(Bundle(), TrainConfig(epochs=1, lr=0.05, batch_size=16), baseline=baseline,
                            run_dir=tmp_path)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------ FSP


def test_registered_methods():
    assert {"fsp", "crd"} <= set(DISTILL_METHODS.names())


def test_fsp_matrix_matches_the_definition():
    f1, f2 = torch.randn(2, 3, 4, 5), torch.randn(2, 6, 4, 5)
    got = fsp_matrix(f1, f2)
    want = torch.zeros(2, 3, 6)
    for n in range(2):
        for i in range(3):
            for j in range(6):
                want[n, i, j] = (f1[n, i] * f2[n, j]).sum() / 20  # sum over the 4 x 5 positions
    torch.testing.assert_close(got, want)


def test_fsp_matrix_max_pools_the_larger_map():
    f1, f2 = torch.randn(1, 2, 8, 8), torch.randn(1, 3, 4, 4)
    torch.testing.assert_close(fsp_matrix(f1, f2), fsp_matrix(F.max_pool2d(f1, 2), f2))


def test_fsp_loss_is_the_papers_sum_over_pairs():
    s = [torch.randn(3, 2, 4, 4), torch.randn(3, 5, 4, 4), torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)]
    t = [torch.randn_like(x) for x in s]
    want = sum(((fsp_matrix(t[i], t[i + 1]) - fsp_matrix(s[i], s[i + 1])) ** 2).sum((1, 2)).mean()
               for i in (0, 2))
    torch.testing.assert_close(FSPLoss(weight=0.5)(s, t), 0.5 * want)
    assert FSPLoss()(s, s).item() == 0.0


def test_fsp_gradient_reaches_only_the_student():
    s = [torch.randn(2, 3, 4, 4, requires_grad=True) for _ in range(2)]
    t = [torch.randn(2, 3, 4, 4, requires_grad=True) for _ in range(2)]
    FSPLoss()(s, t).backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in s)
    assert all(x.grad is None for x in t)


def test_fsp_pairs_need_equal_channels(tmp_path):
    teacher = plain_cnn("plaincnn-8-16", num_classes=3, in_channels=1)
    student = plain_cnn("plaincnn-4-8", num_classes=3, in_channels=1)
    pairs = [{"student": ["features.block1", "features.block2"], "teacher": ["features.block1", "features.block2"]}]
    with pytest.raises(ConfigError, match="student FSP matrix is 4x8 but the teacher's is 8x16"):
        build_hooks({"method": "fsp", "options": {"pairs": pairs}}, student, teacher, make_ctx(tmp_path))
    with pytest.raises(ConfigError, match="two module names on each network"):
        parse_sections([{"student": "features.block1", "teacher": ["a", "b"]}])
    with pytest.raises(ConfigError, match="no option"):
        build_hooks({"method": "fsp", "options": {"pairs": pairs, "beta": 1}}, student, teacher, make_ctx(tmp_path))


FSP_PAIRS = [{"student": ["features.block1", "features.block2"], "teacher": ["features.block2", "features.block4"]}]


@pytest.mark.parametrize("method,options", [
    ("fsp", {"pairs": FSP_PAIRS}),
    ("fsp", {"pairs": FSP_PAIRS, "two_stage": True, "fsp_epochs": 1, "kd": True}),
    ("crd", {}),
    ("crd", {"pairs": [{"student": "flatten", "teacher": "flatten"}], "dim": 16, "negatives": 8}),
])
def test_method_trains_student_and_leaves_teacher_untouched(tmp_path, method, options):
    # teacher block2 -> block4 is a 16 x 32 FSP matrix, as the student's block1 -> block2
    teacher = plain_cnn("plaincnn-16-16-16-32", num_classes=3, in_channels=1)
    student = plain_cnn("plaincnn-16-32", num_classes=3, in_channels=1)
    ctx = make_ctx(tmp_path, baseline=teacher)
    before_t, before_s = snapshot(teacher), snapshot(student)
    hooks = prepare_distillation({"method": method, "options": options}, student, ctx=ctx)
    fit(student, ctx.data.train, ctx.train_config, hooks, progress=False)
    after_t = snapshot(teacher)
    assert all(torch.equal(v, after_t[k]) for k, v in before_t.items())
    assert all(p.grad is None for p in teacher.parameters())
    assert any(not torch.equal(v, student.state_dict()[k]) for k, v in before_s.items())
    assert not any(m._forward_hooks for m in student.modules())
    assert not any(m._forward_hooks for m in teacher.modules())


# ------------------------------------------------------------------------------ CRD


def _direct_crd(crd: CRDLoss, f_s, f_t, slots, neg, bank_s, bank_t, z):
    """The CRD objective written out term by term from the paper's formulas."""
    s = F.normalize(crd.embed_s(f_s), dim=1)
    t = F.normalize(crd.embed_t(f_t), dim=1)
    m, k = crd.bank_size, neg.shape[1]
    noise = k / m
    total = 0.0
    for anchor, bank, zz in ((s, bank_t, z[0]), (t, bank_s, z[1])):
        for i in range(len(slots)):
            h_pos = torch.exp(anchor[i] @ bank[slots[i]] / crd.tau) / zz
            total = total - torch.log(h_pos / (h_pos + noise + 1e-7)) / len(slots)
            for j in neg[i]:
                h_neg = torch.exp(anchor[i] @ bank[j] / crd.tau) / zz
                total = total - torch.log(noise / (h_neg + noise + 1e-7)) / len(slots)
    return total


def test_crd_loss_matches_direct_computation():
    torch.manual_seed(3)
    crd = CRDLoss(student_dim=5, teacher_dim=7, bank_size=10, dim=4, negatives=3, tau=0.5, momentum=0.5)
    bank_s = F.normalize(torch.randn(10, 4), dim=1)
    bank_t = F.normalize(torch.randn(10, 4), dim=1)
    crd.bank_s.copy_(bank_s)
    crd.bank_t.copy_(bank_t)
    crd.filled.fill_(True)
    crd.z.copy_(torch.tensor([2.0, 3.0]))
    f_s, f_t = torch.randn(3, 5), torch.randn(3, 7)
    slots = torch.tensor([1, 4, 7])
    neg = torch.tensor([[0, 2, 3], [5, 6, 9], [1, 2, 8]])
    want = _direct_crd(crd, f_s, f_t, slots, neg, bank_s, bank_t, (2.0, 3.0))
    got = crd(f_s, f_t, slots, negatives_idx=neg)
    torch.testing.assert_close(got, want)
    # the banks moved to normalize(0.5 * old + 0.5 * new) at the batch's slots only
    s = F.normalize(crd.embed_s(f_s), dim=1).detach()
    torch.testing.assert_close(crd.bank_s[slots], F.normalize(0.5 * bank_s[slots] + 0.5 * s, dim=1))
    untouched = [i for i in range(10) if i not in slots.tolist()]
    assert torch.equal(crd.bank_s[untouched], bank_s[untouched])


def test_nce_loss_matches_formula():
    h = torch.tensor([[0.5, 0.1, 0.2], [0.3, 0.05, 0.4]])
    noise = 2 / 100
    want = -(math.log(0.5 / (0.5 + noise + 1e-7)) + math.log(noise / (0.1 + noise + 1e-7))
             + math.log(noise / (0.2 + noise + 1e-7)) + math.log(0.3 / (0.3 + noise + 1e-7))
             + math.log(noise / (0.05 + noise + 1e-7)) + math.log(noise / (0.4 + noise + 1e-7))) / 2
    assert nce_loss(h, 100).item() == pytest.approx(want, rel=1e-6)


def test_crd_gradients_reach_student_and_heads_only():
    crd = CRDLoss(student_dim=6, teacher_dim=6, bank_size=16, dim=4, negatives=4)
    f_s = torch.randn(8, 6, requires_grad=True)
    f_t = torch.randn(8, 6, requires_grad=True)
    crd(f_s, f_t, torch.arange(8)).backward()
    assert f_s.grad is not None and f_s.grad.abs().sum() > 0
    assert f_t.grad is None
    assert crd.embed_s.weight.grad.abs().sum() > 0 and crd.embed_t.weight.grad.abs().sum() > 0
    assert crd.z.min() > 0  # Z fixed from the first batch


def test_crd_negatives_never_the_anchor_and_slots_stable():
    crd = CRDLoss(student_dim=2, teacher_dim=2, bank_size=6, dim=2, negatives=100)
    crd.filled[:5] = True
    slots = torch.tensor([0, 2, 4])
    neg = crd.sample_negatives(slots)
    assert neg.shape == (3, 4)  # at most filled - 1 negatives
    assert not (neg == slots.view(-1, 1)).any() and bool(crd.filled[neg].all())
    table = SlotTable(3)
    x = torch.randn(4, 1, 2, 2)
    assert table(x[:2]).tolist() == [0, 1]
    assert table(x[:2]).tolist() == [0, 1]  # the same samples keep their rows
    assert table(x[2:]).tolist() == [2, 0]  # full: round-robin reuse
    assert table(x[:1]).tolist() == [1]  # sample 0 lost its row to sample 3


def test_crd_bad_options(tmp_path):
    teacher = plain_cnn("plaincnn-4-8", num_classes=3, in_channels=1)
    student = plain_cnn("plaincnn-4-8", num_classes=3, in_channels=1)
    with pytest.raises(ConfigError, match="'negatives' must be an integer"):
        build_hooks({"method": "crd", "options": {"negatives": 0}}, student, teacher, make_ctx(tmp_path))
    with pytest.raises(ConfigError, match="one {student, teacher} pair"):
        build_hooks({"method": "crd", "options": {"pairs": [["flatten", "flatten"]] * 2}}, student, teacher,
                    make_ctx(tmp_path))


# ------------------------------------------------------------------------------ through run_recipe


FSP_SELF = [{"student": ["features.block1", "features.block2"], "teacher": ["features.block1", "features.block2"]}]


@pytest.mark.slow
def test_recipe_runs_fsp_and_crd_for_one_epoch(tmp_path):
    """Both methods from a recipe: FSP in a fine-tune, CRD after structured pruning (teacher: the baseline)."""
    from slimkit.pipeline import run_recipe
    from slimkit.recipe import parse_recipe

    recipe = parse_recipe({
        "name": "fsp-crd-one-epoch", "model": "plaincnn-2", "data": "digits", "image_size": 8,
        "latency_runs": 1, "train": {"epochs": 1, "batch_size": 256},
        "stages": [
            {"name": "fsp", "train": {}, "finetune": {"epochs": 1, "distill": {
                "method": "fsp", "options": {"pairs": FSP_SELF}}}},
            {"name": "crd", "structured": {"ratio": 0.5}, "finetune": {"epochs": 1, "distill": {
                "method": "crd", "options": {"pairs": [{"student": "flatten", "teacher": "flatten"}], "dim": 16}}}},
        ],
    })
    report = run_recipe(recipe, tmp_path / "run", progress=False, log=lambda _m: None)
    assert [row["name"] for row in report["stages"]] == ["baseline", "fsp", "crd"]
    assert all(0.0 <= row["accuracy"] <= 100.0 for row in report["stages"])
    assert report["stages"][2]["params"] < report["stages"][1]["params"]
