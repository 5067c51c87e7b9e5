"""Quantization-aware training that keeps batch norm, and freezes its statistics late.

Folding BN into the convolutions before QAT leaves a deep network without normalization:
4-bit QAT of a BN-folded resnet20 at lr 0.005 collapsed to chance on digits, 99.44 % with BN kept
(``benchmarks/qat_bn_study.py``).
:class:`QuantConvBn2d` instead keeps the BN and quantizes the weight the deployed model
will hold, the *folded* one (Jacob et al. 2018, section 3.2; Krishnamoorthi 2018, section 3.3)::

    f = gamma / sqrt(running_var + eps)                      per output channel
    y = BN( conv(q(x), fq(W * f)) / f + b )                  BN on batch statistics, updating them

Once ``bn_frozen`` (late in training, as the whitepaper recommends) or in eval mode, BN uses
its running statistics and ``y`` equals the folded convolution
``conv(q(x), fq(W * f)) + (b - mean) * f + beta`` exactly: :func:`fold_qat_bn_` turns every
such layer into that plain :class:`~slimkit.quantize.fake.QuantConv2d`, keeping its grid.

>>> import torch
>>> from torch import nn
>>> from slimkit.quantize.uniform import quantize_
>>> m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
>>> x = torch.randn(8, 1, 6, 6)
>>> pairs = conv_bn_pairs(m)  # on the float model (quantized layers do not trace)
>>> quantize_(m, x, {"fold_bn": False, "reduce_range": False}, calibration=[x]).folded_bn
[]
>>> attach_bn_(m, pairs)
['0']
>>> before = m.eval()(x)
>>> fold_qat_bn_(m)
['0']
>>> torch.allclose(before, m(x), atol=1e-5), type(m[0]).__name__, type(m[1]).__name__
(True, 'QuantConv2d', 'Identity')
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from slimkit.manifest import register_module_spec
from slimkit.quantize.fake import QuantConv2d, conv_spec, quant_layers
from slimkit.quantize.fold import conv_bn_pairs
from slimkit.quantize.uniform import QuantConfig, QuantReport, quantize_
from slimkit.reports import ModelSize
from slimkit.selection import replace_module


class QuantConvBn2d(QuantConv2d):
    """A fake-quantized convolution that carries the BatchNorm after it (see the module docstring).

    ``bn`` is a child ``nn.BatchNorm2d``; ``bn_frozen`` stops it from using and updating batch
    statistics in training. The weight grid (``w_scale``, ``w_zero``) is that of the folded weight.
    """

    def __init__(self, *args, bn_eps: float = 1e-5, bn_momentum: float | None = 0.1, bn_affine: bool = True,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.bn = nn.BatchNorm2d(self.out_channels, eps=bn_eps, momentum=bn_momentum, affine=bn_affine)
        self.bn_frozen = False

    @classmethod
    def from_quant(cls, conv: QuantConv2d, bn: nn.BatchNorm2d) -> QuantConvBn2d:
        new = cls(**conv_spec(conv), **conv.quant_args(), bn_eps=bn.eps, bn_momentum=bn.momentum,
                  bn_affine=bn.affine)
        new.load_state_dict(conv.state_dict(), strict=False)
        new.bn.load_state_dict(bn.state_dict())
        new.train_observer = conv.train_observer
        return new.train(conv.training)

    def bn_factor(self) -> torch.Tensor:
        """``gamma / sqrt(running_var + eps)`` per output channel (shape [out_channels])."""
        gamma = self.bn.weight if self.bn.affine else torch.ones_like(self.bn.running_var)
        return gamma / torch.sqrt(self.bn.running_var + self.bn.eps)

    def grid_weight(self) -> torch.Tensor:
        return self.weight * self.bn_factor().reshape(-1, 1, 1, 1)

    def forward(self, x):
        factor = self.bn_factor().reshape(1, -1, 1, 1)
        # a channel with gamma = 0 has a zero folded weight and outputs beta: divide by 1 there
        safe = torch.where(factor == 0, torch.ones_like(factor), factor)
        y = self._conv_forward(self._quant_input(x), self._quant_weight(), None) / safe
        if self.bias is not None:
            y = y + self.bias.reshape(1, -1, 1, 1)
        self.bn.train(self.training and not self.bn_frozen)
        return self.bn(y)

    @torch.no_grad()
    def folded(self) -> QuantConv2d:
        """The plain QuantConv2d this layer equals in eval mode (folded weight and bias, same grids)."""
        spec = {**conv_spec(self), "bias": True}
        conv = QuantConv2d(**spec, **self.quant_args())
        factor = self.bn_factor()
        bias = self.bias if self.bias is not None else torch.zeros_like(factor)
        beta = self.bn.bias if self.bn.affine else torch.zeros_like(factor)
        conv.weight.copy_(self.grid_weight())
        conv.bias.copy_((bias - self.bn.running_mean) * factor + beta)
        for name in ("w_scale", "w_zero", "a_scale", "a_zero", "a_range"):
            getattr(conv, name).copy_(getattr(self, name))
        conv.freeze_act, conv.train_observer = self.freeze_act, self.train_observer
        return conv.train(self.training)


register_module_spec(QuantConvBn2d, lambda m: {**conv_spec(m), **m.quant_args(), "bn_eps": m.bn.eps,
                                               "bn_momentum": m.bn.momentum, "bn_affine": m.bn.affine})


def attach_bn_(model: nn.Module, pairs: list[tuple[str, str]], observer: str = "minmax") -> list[str]:
    """Move each BatchNorm2d of ``pairs`` (from :func:`~slimkit.quantize.fold.conv_bn_pairs` on the
    float model) into its QuantConv2d (as a QuantConvBn2d); the BN becomes Identity and the
    weight grid is re-derived on the folded weight with ``observer``. Pairs whose conv was not
    quantized are left alone. Returns the names of the convolutions that now carry a BN."""
    attached = []
    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        if type(conv) is not QuantConv2d or not isinstance(bn, nn.BatchNorm2d) or not bn.track_running_stats:
            continue
        new = QuantConvBn2d.from_quant(conv, bn)
        new.set_weight_qparams(observer)
        replace_module(model, conv_name, new)
        replace_module(model, bn_name, nn.Identity())
        attached.append(conv_name)
    return attached


def freeze_bn_(model: nn.Module, frozen: bool = True) -> None:
    """Stop (or resume) batch-statistics use and updates in every QuantConvBn2d."""
    for m in model.modules():
        if isinstance(m, QuantConvBn2d):
            m.bn_frozen = frozen


def fold_qat_bn_(model: nn.Module) -> list[str]:
    """Replace every QuantConvBn2d by its folded QuantConv2d (same eval outputs); returns their names."""
    names = [n for n, m in model.named_modules() if isinstance(m, QuantConvBn2d)]
    for name in names:
        replace_module(model, name, model.get_submodule(name).folded())
    return names


class QATConfig(QuantConfig):
    """QuantConfig plus how QAT starts: ``keep_bn`` trains every conv-BN pair as a
    :class:`QuantConvBn2d` (else BN is folded first, as PTQ does); ``train_observer`` re-derives
    the weight grids at every training step."""

    keep_bn: bool = True
    train_observer: Literal["minmax", "mse"] = Field("minmax", description="weight grid observer while training")


@dataclass(kw_only=True)
class QATReport(QuantReport):
    """:class:`~slimkit.quantize.uniform.QuantReport` plus ``bn_in_qat``: the convolutions carrying their BN."""

    verb: str = "prepare_qat_"
    bn_in_qat: list[str] = field(default_factory=list)


def prepare_qat_(model: nn.Module, example_inputs: torch.Tensor | tuple[torch.Tensor, ...],
                 config: QATConfig | QuantConfig | dict | None = None, *, calibration=None) -> QATReport:
    """The PTQ starting point of QAT, in place: :func:`~slimkit.quantize.uniform.quantize_` with
    every conv-BN pair kept as a QuantConvBn2d (``config.keep_bn``; else BN folded first, as PTQ does).

    ``example_inputs``: a tensor or a tuple of tensors the model accepts; ``calibration``: as for
    quantize_. A plain QuantConfig gets QATConfig's defaults for ``keep_bn`` / ``train_observer``.
    """
    if isinstance(config, QuantConfig) and not isinstance(config, QATConfig):
        config = config.model_dump(include=set(QuantConfig.model_fields))
    config = QATConfig.coerce(config, where="qat")
    before = ModelSize.of(model, example_inputs)
    pairs = conv_bn_pairs(model) if config.keep_bn else []
    quant = config.model_copy(update={"fold_bn": False}) if config.keep_bn else config
    ptq = quantize_(model, example_inputs, quant, calibration=calibration)
    bn_in_qat = attach_bn_(model, pairs, config.weight_observer)
    for layer in quant_layers(model).values():
        layer.train_observer = config.train_observer
    fields = {f.name: getattr(ptq, f.name) for f in dataclasses.fields(QuantReport) if f.name != "verb"}
    fields.update(before=before, after=ModelSize.of(model, example_inputs))
    return QATReport(**fields, bn_in_qat=bn_in_qat)


def late_freezer(act_after: float = 0.5, bn_after: float = 0.5):
    """A ``TrainHooks.after_step`` callback: activation ranges freeze after ``act_after`` and BN
    statistics after ``bn_after`` of the training steps (fractions in [0, 1]; 1 = never)."""
    from slimkit.quantize.fake import freeze_

    def freeze_late(model: nn.Module, info) -> None:
        if info.step >= act_after * info.total_steps:
            freeze_(model)
        if info.step >= bn_after * info.total_steps:
            freeze_bn_(model)

    return freeze_late
