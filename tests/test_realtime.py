"""The real-time view: percentiles, jitter, deadline misses, engines and the CLI flags."""

import time

import pytest
import torch
from torch import nn

from slimkit.cli import main
from slimkit.exceptions import ConfigError
from slimkit.measure.realtime import deadline_from, realtime_profile, realtime_stats, robust_p99_ms


def late_every(n: int, sleep_s: float):
    calls = {"i": 0}

    def fn():
        calls["i"] += 1
        if calls["i"] % n == 0:
            time.sleep(sleep_s)

    return fn


def test_miss_rate_and_margin_count_the_late_runs():
    # warmup 0: of 100 timed calls exactly 4 (every 25th) sleep 25 ms; the rest return at once
    stats = realtime_stats(late_every(25, 0.025), runs=100, warmup=0, deadline_ms=20.0)
    assert stats.miss_rate == pytest.approx(0.04)
    assert stats.max_ms >= 25.0 and stats.p50_ms < 20.0
    assert stats.p99_ms >= 25.0 and stats.meets is False and stats.margin_ms == pytest.approx(20.0 - stats.p99_ms)
    assert stats.jitter_ms > 0 and stats.p99_minus_p50_ms == pytest.approx(stats.p99_ms - stats.p50_ms)
    calm = realtime_stats(lambda: None, runs=100, deadline_ms=20.0)
    assert calm.miss_rate == 0.0 and calm.meets is True and "meets" in calm.summary()


def test_robust_p99_ignores_a_burst_in_one_block():
    calls = {"i": 0}

    def fn():  # one burst: 5 slow calls in the first block only
        calls["i"] += 1
        if calls["i"] <= 5:
            time.sleep(0.02)

    assert robust_p99_ms(fn, blocks=5, runs=100, warmup=0) < 20.0
    assert realtime_stats(late_every(10**9, 0), runs=10).runs == 10


def test_deadline_from_fps_and_bad_values():
    assert deadline_from(fps=50) == pytest.approx(20.0)
    assert deadline_from(deadline_ms=8.0) == 8.0 and deadline_from() is None
    for kwargs, match in (({"fps": 0}, "--fps"), ({"deadline_ms": -1}, "--deadline-ms"),
                          ({"fps": 30, "deadline_ms": 5}, "not both")):
        with pytest.raises(ConfigError, match=match):
            deadline_from(**kwargs)
    with pytest.raises(ConfigError, match="runs"):
        realtime_stats(lambda: None, runs=1)


@pytest.mark.parametrize("engine", ["eager", "onnxruntime", "onnxruntime-int8"])
def test_realtime_profile_on_each_engine(engine, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    x = torch.randn(4, 1, 8, 8)
    if engine == "onnxruntime-int8":
        from slimkit.quantize import quantize_

        quantize_(model, x, {"bits": 8}, calibration=[x])
    stats = realtime_profile(model, x, engine, runs=50, deadline_ms=1000.0, workdir=tmp_path)
    assert stats.engine == engine and stats.runs == 50 and stats.meets and stats.miss_rate == 0.0
    if engine != "eager":
        assert (tmp_path / f"realtime.{engine}.onnx").is_file()


def test_unknown_engine_and_int8_without_quantization_are_clear_errors():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ConfigError, match="did you mean 'onnxruntime'"):
        realtime_profile(model, torch.zeros(1, 4), "onnxruntme", runs=5)
    with pytest.raises(ConfigError, match="quantize it first"):
        realtime_profile(model, torch.zeros(1, 4), "onnxruntime-int8", runs=5)


def test_cli_profile_prints_the_real_time_view(capsys):
    args = ["profile", "--model", "lenet5", "--input-shape", "1,1,28,28", "--num-classes", "10", "--no-latency",
            "--fps", "10", "--runs", "50"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "real-time    p50" in out and "deadline     100.000 ms" in out and "energy" in out
    assert main([*args[:-4], "--fps", "0"]) == 2
    assert "--fps must be > 0" in capsys.readouterr().err
