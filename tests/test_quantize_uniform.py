"""Uniform quantization: observer math, per-channel grids, BN folding, packing, mixed precision, errors."""

import numpy as np
import pytest
import torch
from torch import nn

from slimkit.exceptions import ConfigError
from slimkit.manifest import load_model, save_model
from slimkit.measure.storage import stored_bytes
from slimkit.quantize.fake import QuantConv2d, quant_layers
from slimkit.quantize.fold import fold_bn_
from slimkit.quantize.observers import make_observer, qparams_from_range
from slimkit.quantize.packing import from_unsigned, pack_bits, packed_nbytes, to_unsigned, unpack_bits
from slimkit.quantize.uniform import QuantConfig, quantize_


def _tiny():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 8 * 8, 10))


def _zoo(name):
    from slimkit.models import create_model

    return create_model(name, num_classes=10, in_channels=1)


def _randomize_bn(model):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


# --- observers ------------------------------------------------------------------------------
def test_minmax_asymmetric_and_symmetric():
    obs = make_observer("minmax")
    obs.update(torch.tensor([-1.0, 0.0, 3.0]))
    scale, zero = obs.qparams(8, symmetric=False)
    assert float(scale) == pytest.approx(4.0 / 255) and int(zero) == 64
    scale, zero = obs.qparams(8, symmetric=True)
    assert float(scale) == pytest.approx(3.0 / 127) and int(zero) == 0


def test_per_channel_scales_are_row_maxima():
    w = torch.randn(6, 4, 3, 3)
    obs = make_observer("minmax", axis=0)
    obs.update(w)
    scale, zero = obs.qparams(8, symmetric=True)
    assert torch.allclose(scale, w.abs().flatten(1).max(1).values / 127)
    assert scale.shape == (6,) and torch.all(zero == 0)


def test_percentile_and_mse_clip_outliers():
    x = torch.cat([torch.randn(10000).clamp(-3.5, 3.5), torch.tensor([6.0])])
    ranges = {}
    for name in ("minmax", "percentile", "mse"):
        obs = make_observer(name)
        obs.update(x)
        ranges[name] = float(obs.range(4, True)[1])
    assert ranges["minmax"] == 6.0
    assert ranges["percentile"] < 6.0 and ranges["mse"] < 6.0


def test_ema_moves_toward_new_batches():
    obs = make_observer("ema", momentum=0.5)
    obs.update(torch.tensor([0.0, 1.0]))
    obs.update(torch.tensor([0.0, 3.0]))
    assert float(obs.hi) == 2.0


def test_zero_is_exact_on_asymmetric_grid():
    scale, zero = qparams_from_range(torch.tensor(-0.37), torch.tensor(1.91), 8, False)
    assert float(torch.round(torch.tensor(0.0) / scale) + zero - zero) * float(scale) == 0.0


# --- BN folding -----------------------------------------------------------------------------
@pytest.mark.parametrize("build", [_tiny, lambda: _zoo("resnet20-cifar"), lambda: _zoo("mobilenet_v2")])
def test_fold_bn_equals_original(build):
    model = _randomize_bn(build())
    x = torch.randn(2, *((3, 8, 8) if isinstance(model, nn.Sequential) else (1, 28, 28)))
    with torch.no_grad():
        before = model(x)
        folded = fold_bn_(model)
        after = model(x)
    assert folded and not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert torch.allclose(before, after, atol=1e-5)


# --- quantize_ ------------------------------------------------------------------------------
def _snr_db(ref, out):
    return float(10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean()))


@pytest.mark.parametrize("build,shape", [(_tiny, (3, 8, 8)), (lambda: _zoo("lenet5"), (1, 28, 28)),
                                         (lambda: _zoo("resnet20-cifar"), (1, 28, 28))])
def test_int8_close_to_float_and_4bit_worse(build, shape):
    torch.manual_seed(0)
    model = _randomize_bn(build())
    x = torch.randn(32, *shape)
    with torch.no_grad():
        ref = model(x)
        m8 = _randomize_bn(build())
        m8.load_state_dict(model.state_dict())
        quantize_(m8, x, {"bits": 8}, calibration=[x])
        m4 = _randomize_bn(build())
        m4.load_state_dict(model.state_dict())
        quantize_(m4, x, {"bits": 4, "act_bits": None})
        snr8, snr4 = _snr_db(ref, m8.eval()(x)), _snr_db(ref, m4.eval()(x))
    assert snr8 > 25 and snr8 > snr4


def test_mixed_precision_by_glob_and_sizes():
    model = _tiny().eval()
    x = torch.randn(8, 3, 8, 8)
    report = quantize_(model, x, {"bits": 4, "overrides": {"0": 8, "7": 8}, "reduce_range": False}, calibration=[x])
    assert {n: r["bits"] for n, r in report.layers.items()} == {"0": 8, "3": 4, "7": 8}
    assert report.changed == ["0", "3", "7"]
    layers = quant_layers(model)
    assert layers["3"].per_channel and layers["3"].w_scale.shape == (8,)
    fp32 = sum(t.numel() * 4 for t in _tiny().state_dict().values())
    assert stored_bytes(model) < fp32 / 3.5
    codes, _, _ = layers["3"].quantized_weight()
    assert codes.min() >= -7 and codes.max() <= 7


@pytest.mark.parametrize("bad", [{"bits": 0}, {"bits": 9}, {"observer": "histogram"}, {"overrides": {"0": 9}},
                                 {"bitz": 8}, {"reduce_range": "maybe"}, {"scale_dtype": "bfloat16"}])
def test_bad_configs_are_one_line(bad):
    with pytest.raises(ConfigError) as err:
        QuantConfig.coerce(bad, where="stages[0].int8")
    assert "\n" not in str(err.value) and str(err.value).startswith("stages[0].int8")


def test_unknown_observer_name_in_make_observer():
    with pytest.raises(ConfigError, match="unknown observer"):
        make_observer("histogram")


def test_save_load_quantized_model(tmp_path):
    model = _tiny().eval()
    x = torch.randn(4, 3, 8, 8)
    quantize_(model, x, {"bits": 6}, calibration=[x])
    save_model(model, tmp_path / "q.pt")
    loaded = load_model(tmp_path / "q.pt", model=_tiny())
    assert isinstance(loaded.get_submodule("0"), QuantConv2d)
    assert torch.equal(model(x), loaded(x))


# --- packing --------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("count", [1, 7, 64, 1001])
def test_pack_roundtrip(bits, count):
    codes = np.random.default_rng(bits * count).integers(0, 2**bits, size=count).astype(np.uint8)
    blob = pack_bits(codes, bits)
    assert len(blob) == packed_nbytes(count, bits) == (count * bits + 7) // 8
    assert np.array_equal(unpack_bits(blob, bits, count), codes)


def test_signed_offset_roundtrip_and_range_error():
    q = np.array([-8, -1, 0, 7], dtype=np.int8)
    assert np.array_equal(from_unsigned(unpack_bits(pack_bits(to_unsigned(q, 4), 4), 4, 4), 4), q)
    with pytest.raises(ConfigError):
        pack_bits(np.array([4], np.uint8), 2)
    with pytest.raises(ConfigError):
        pack_bits(np.array([1], np.uint8), 3)


def test_weight_scales_are_rounded_up_to_float16_and_stored_in_two_bytes():
    from slimkit.quantize.observers import is_fp16_exact

    half, full = _tiny().eval(), _tiny().eval()
    full.load_state_dict(half.state_dict())
    x = torch.randn(8, 3, 8, 8)
    quantize_(half, x, {"reduce_range": False}, calibration=[x])
    quantize_(full, x, {"reduce_range": False, "scale_dtype": "float32"}, calibration=[x])
    channels = 0
    for name, layer in quant_layers(half).items():
        exact = quant_layers(full)[name].w_scale
        assert is_fp16_exact(layer.w_scale) and not is_fp16_exact(exact)
        # rounded *up* (no weight is clipped) by less than one float16 step
        assert torch.all(layer.w_scale >= exact) and torch.all(layer.w_scale <= exact * (1 + 2**-10))
        codes, _, _ = layer.quantized_weight()
        assert int(codes.abs().max()) <= 127
        channels += layer.w_scale.numel()
    assert stored_bytes(full) - stored_bytes(half) == 2 * channels


def test_round_up_fp16_edges():
    from slimkit.quantize.observers import round_up_fp16

    s = torch.tensor([1e-9, 3e-5, 0.0123456, 1.0, 7e4])
    r = round_up_fp16(s)
    assert torch.all(r >= s) and float(r[0]) > 0 and float(r[3]) == 1.0 and float(r[4]) == 7e4
