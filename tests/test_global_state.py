"""Process-wide settings (torch's thread count and quantized engine, numba's threads and threading layer):
every slimkit path that changes one puts it back, also when it raises."""

import numba
import pytest
import torch
from torch import nn

from slimkit.exceptions import ConfigError
from slimkit.global_state import num_threads, numba_threads, quantized_engine, snapshot


@pytest.fixture
def foreign_settings():
    """Settings slimkit would not choose itself, so that a path leaking its own choice shows;
    numba's layer is started here (it stays for the process) and its count set below its pool."""
    with numba_threads(1):
        pass
    before = (torch.get_num_threads(), torch.backends.quantized.engine, numba.get_num_threads())
    torch.set_num_threads(1)
    torch.backends.quantized.engine = "qnnpack"
    numba.set_num_threads(1)
    try:
        yield snapshot()
    finally:
        torch.set_num_threads(before[0])
        torch.backends.quantized.engine = before[1]
        numba.set_num_threads(before[2])


def test_each_context_manager_sets_inside_and_restores_after_a_raise(foreign_settings):
    with pytest.raises(RuntimeError, match="inside"):
        with num_threads(2), quantized_engine("x86"), numba_threads(99) as count:
            assert torch.get_num_threads() == 2 and torch.backends.quantized.engine == "x86"
            assert count == numba.get_num_threads() == numba.config.NUMBA_NUM_THREADS  # capped at numba's pool
            raise RuntimeError("inside")
    assert snapshot() == foreign_settings


def test_numba_threads_puts_the_configured_layer_back():
    chosen = numba.config.THREADING_LAYER
    try:
        numba.config.THREADING_LAYER = "default"
        with numba_threads(1):
            assert numba.config.THREADING_LAYER == "workqueue"  # what slimkit starts when nobody chose one
        assert numba.config.THREADING_LAYER == "default"
        numba.config.THREADING_LAYER = "omp"  # a user's choice is kept inside too
        with numba_threads(1):
            assert numba.config.THREADING_LAYER == "omp"
        assert numba.config.THREADING_LAYER == "omp"
    finally:
        numba.config.THREADING_LAYER = chosen


def test_bad_settings_are_one_line():
    with pytest.raises(ConfigError, match="quantized engine 'arm9' is not available .*available: .*x86"):
        with quantized_engine("arm9"):
            pass
    with pytest.raises(ConfigError, match="threads must be a positive integer"):
        with num_threads(0):
            pass


def test_the_x86_int8_deploy_path_restores_the_quantized_engine(foreign_settings):
    from slimkit.deploy.engines import torch_x86_int8

    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    x = torch.randn(4, 1, 8, 8)
    int8 = torch_x86_int8(model, [x], x[:1])
    assert snapshot() == foreign_settings
    with torch.no_grad():  # the converted model runs on the caller's engine: its weights were packed for x86
        assert int8(x).shape == (4, 3)
    with pytest.raises(Exception):  # noqa: B017 - whatever torch raises for inputs that do not fit
        torch_x86_int8(model, [torch.randn(2, 5)], torch.randn(1, 5))
    assert snapshot() == foreign_settings


@pytest.mark.slow
def test_run_recipe_and_the_xnor_kernel_path_restore_every_setting(tmp_path, foreign_settings):
    """``threads: 2`` and the XNOR kernel (numba's thread count set to torch's) inside the run; none of it after."""
    from slimkit.pipeline import run_recipe
    from slimkit.recipe import parse_recipe

    recipe = parse_recipe({"name": "xnor-state", "model": "lenet5", "data": "digits", "threads": 2,
                           "train": {"epochs": 0}, "latency_runs": 2,
                           "stages": [{"name": "xnor", "binarize": {"mode": "xnor", "kernel": True}}]})
    report = run_recipe(recipe, tmp_path / "ok", progress=False, log=lambda _m: None)
    assert report["threads"] == 2
    xnor = report["stages"][-1]
    assert xnor.get("engine") in ("torch", "xnor-kernel")
    assert snapshot() == foreign_settings
    bad = parse_recipe({**recipe.to_dict(), "data": "imagefolder:" + str(tmp_path / "no-such-folder")})
    with pytest.raises(Exception, match="no-such-folder"):  # noqa: B017 - the data error, raised inside the run
        run_recipe(bad, tmp_path / "bad", progress=False, log=lambda _m: None)
    assert snapshot() == foreign_settings
