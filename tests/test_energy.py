"""Energy estimate: the arithmetic on a hand-computed two-layer model, and the SRAM/DRAM switch."""

import pytest
import torch
from torch import nn

from slimkit.exceptions import ConfigError
from slimkit.measure import profile
from slimkit.measure.energy import HOROWITZ_45NM, estimate_energy, rapl_domains, rapl_energy_mj


def two_layer() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3, bias=False)).eval()


X = torch.zeros(1, 1, 4, 4)


def test_table_is_horowitz_2014():
    t = HOROWITZ_45NM
    assert (t.fp32_mult, t.fp32_add, t.int32_add, t.int8_mult, t.int8_add) == (3.7, 0.9, 0.1, 0.2, 0.03)
    assert (t.sram_read_32, t.dram_read_32) == (5.0, 640.0)


def test_two_layer_arithmetic_by_hand():
    model = two_layer()
    prof = profile(model, X, latency=False)
    # conv: output [1, 2, 2, 2] = 8 elements x 1 channel x 9 taps = 72 MACs; linear 3 x 8 = 24 MACs
    # weights 18 + 24 = 42 fp32 = 168 B = 42 words; activations: input 16 x 4 B, conv out 8 x 4 B
    # written + read, linear out 3 x 4 B written + read = 64 + 64 + 24 = 152 B = 38 words
    dram = estimate_energy(model, prof, sram_bytes=0)
    assert dram.macs_fp32 == 96 and dram.macs_int8 == 0
    assert dram.arithmetic_pj == pytest.approx(96 * (3.7 + 0.9))
    assert dram.weight_bytes == 168 and dram.weight_pj == pytest.approx(42 * 640)
    assert dram.activation_bytes == 152 and dram.activation_pj == pytest.approx(38 * 640)
    assert dram.total_pj == pytest.approx(441.6 + 26880 + 24320)
    sram = estimate_energy(model, prof, sram_bytes=1 << 20)
    assert (sram.weights_in, sram.activations_in) == ("sram", "sram")
    assert sram.weight_pj == pytest.approx(42 * 5) and sram.activation_pj == pytest.approx(38 * 5)
    assert prof.energy is not None and prof.energy.total_pj > 0


def test_zero_weights_do_not_execute_when_skipped():
    model = two_layer()
    with torch.no_grad():
        model[3].weight[:, :4] = 0  # half of the linear weights
    prof = profile(model, X, latency=False)
    assert estimate_energy(model, prof, sram_bytes=0).macs_fp32 == 72 + 12
    assert estimate_energy(model, prof, sram_bytes=0, skip_zeros=False).macs_fp32 == 96


def test_int8_layers_cost_int8_multiply_and_int32_add():
    from slimkit.quantize import quantize_

    model = two_layer()
    x = torch.randn(8, 1, 4, 4)
    quantize_(model, x, {"bits": 8, "reduce_range": False}, calibration=[x])
    est = estimate_energy(model, profile(model, X, latency=False), sram_bytes=0)
    assert est.macs_int8 == 96 and est.macs_fp32 == 0
    assert est.arithmetic_pj == pytest.approx(96 * (0.2 + 0.1))


def test_weights_move_from_dram_to_sram_once_they_fit():
    """Deep Compression's argument: the same weights cost 128x less to read once they are on chip."""
    from slimkit.models import create_model
    from slimkit.quantize import quantize_

    model = create_model("lenet-300-100", in_channels=1).eval()
    x = torch.zeros(1, 1, 28, 28)
    sram = 512 * 1024
    fp32 = estimate_energy(model, profile(model, x, latency=False), sram_bytes=sram)
    assert fp32.weight_bytes > sram and fp32.weights_in == "dram"
    x = torch.randn(16, 1, 28, 28)
    quantize_(model, x, {"bits": 8, "reduce_range": False}, calibration=[x])
    int8 = estimate_energy(model, profile(model, x, latency=False), sram_bytes=sram)
    assert int8.weight_bytes <= sram and int8.weights_in == "sram"
    assert fp32.weight_pj / int8.weight_pj == pytest.approx(640 / 5 * fp32.weight_bytes / int8.weight_bytes, rel=1e-3)
    # exactly at the boundary: a model whose stored bytes equal the SRAM still fits
    edge = estimate_energy(model, profile(model, x, latency=False), sram_bytes=int8.weight_bytes)
    below = estimate_energy(model, profile(model, x, latency=False), sram_bytes=int8.weight_bytes - 1)
    assert (edge.weights_in, below.weights_in) == ("sram", "dram")


def test_bad_sram_size_is_one_clear_error():
    model = two_layer()
    with pytest.raises(ConfigError, match="sram_bytes"):
        estimate_energy(model, profile(model, X, latency=False), sram_bytes=-1)


def test_rapl_reads_counters_or_says_why(tmp_path):
    zone = tmp_path / "intel-rapl:0"
    zone.mkdir()
    (zone / "name").write_text("package-0\n")
    (zone / "energy_uj").write_text("1000\n")
    calls = []

    def work():  # the counter advances by 2000 uJ per call, like a package drawing 2 mJ per inference
        calls.append(1)
        (zone / "energy_uj").write_text(f"{1000 + 2000 * len(calls)}\n")

    assert list(rapl_domains(tmp_path)) == ["package-0"]
    mj, note = rapl_energy_mj(work, runs=5, root=tmp_path)
    assert mj == pytest.approx(2.0) and "package-0" in note
    assert rapl_energy_mj(work, runs=1, root=tmp_path / "missing") == (None, f"no readable RAPL counter under "
                                                                            f"{tmp_path / 'missing'}")


def test_weight_traffic_is_the_stored_bytes_figure():
    """The energy's weight bytes come from the one stored-bytes module: fp32 state dict for a float model,
    1 bit per weight + alpha for a binarized one (the rule binary layers register)."""
    from slimkit.measure.energy import model_weight_bytes
    from slimkit.measure.storage import state_dict_bytes, stored_bytes
    from slimkit.quantize.binary import binarize_

    model = two_layer()
    assert model_weight_bytes(model) == state_dict_bytes(model) == 4 * (18 + 24)
    binarize_(model, X, {"mode": "bwn", "keep_first_last": False})
    packed = model_weight_bytes(model)
    assert packed == stored_bytes(model) < state_dict_bytes(model)
    assert estimate_energy(model, profile(model, X, latency=False), sram_bytes=0).weight_bytes == packed
