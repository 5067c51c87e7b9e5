"""Every model verb in slimkit is spelled one way, found by walking the package (a new verb gets the check for free).

A verb is a public function whose name ends in ``_`` and whose first parameter is ``model``:
``verb_(model, example_inputs, config_or_plan, *, data...) -> Report``. Building blocks that
act on a model without being a technique (a mode switch, a fold a verb calls) are listed in
BUILDING_BLOCKS with the reason; the list may not go stale. The behaviour of each verb (a tensor
and a tuple give the same report, before/after are real measurements) is tested in
test_prune_verbs.py and test_quantize_verbs.py.
"""

import importlib
import inspect
import pkgutil
import types
import typing

import pytest

import slimkit
from slimkit.reports import Report

#: qualified name -> why it is not a contract verb
BUILDING_BLOCKS = {
    "slimkit.kernels.fused.fuse_": "a runtime rewrite of a loaded compressed model (no technique, nothing to report)",
    "slimkit.prune.surgery.prune_units_": "the cutting step structured_ plans for: (model, graph, unit ids)",
    "slimkit.quantize.binary.use_kernel_": "switches binary layers between simulation and the XNOR kernel",
    "slimkit.quantize.fake.freeze_": "freezes observers of an already quantized model",
    "slimkit.quantize.fold.fold_bn_": "BN folding, a step quantize_ and the int8 engines run",
    "slimkit.quantize.qat.attach_bn_": "a step of prepare_qat_ (keeps BN beside a fake-quant conv)",
    "slimkit.quantize.qat.freeze_bn_": "a training-schedule switch of QAT",
    "slimkit.quantize.qat.fold_qat_bn_": "the last step of QAT before export",
    "slimkit.quantize.uniform.calibrate_": "runs observers over calibration batches, a step of quantize_",
}


def _verbs() -> dict[str, types.FunctionType]:
    found = {}
    for info in pkgutil.walk_packages(slimkit.__path__, "slimkit."):
        if info.name.rsplit(".", 1)[-1].startswith("_"):
            continue
        module = importlib.import_module(info.name)
        for name, fn in vars(module).items():
            if (name.endswith("_") and not name.startswith("_") and inspect.isfunction(fn)
                    and fn.__module__ == info.name):
                params = list(inspect.signature(fn).parameters)
                if params and params[0] == "model":
                    found[f"{info.name}.{name}"] = fn
    return found


VERBS = _verbs()


def contract_problems(fn) -> list[str]:
    """What is wrong with ``fn`` as a verb (empty when it follows the contract)."""
    params = list(inspect.signature(fn).parameters.values())
    problems = []
    if [p.name for p in params[:2]] != ["model", "example_inputs"]:
        problems.append(f"parameters start {[p.name for p in params[:2]]}, not ['model', 'example_inputs']")
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) > 3:
        problems.append(f"data arguments must be keyword-only after the config; positional: "
                        f"{[p.name for p in positional[3:]]}")
    returned = typing.get_type_hints(fn).get("return")
    if not (isinstance(returned, type) and issubclass(returned, Report)):
        problems.append(f"returns {returned!r}, not a slimkit.reports.Report subclass")
    return problems


@pytest.mark.parametrize("name", sorted(set(VERBS) - set(BUILDING_BLOCKS)))
def test_every_verb_follows_the_contract(name):
    assert contract_problems(VERBS[name]) == [], name


def test_the_walk_finds_the_verbs_and_the_building_block_list_is_not_stale():
    assert {"slimkit.prune.structured.structured_", "slimkit.quantize.uniform.quantize_",
            "slimkit.decompose.core.decompose_", "slimkit.encode.dct.dct_compress_"} <= set(VERBS)
    assert set(BUILDING_BLOCKS) <= set(VERBS), set(BUILDING_BLOCKS) - set(VERBS)


def test_a_verb_spelled_the_old_way_is_caught():
    def old_prune_(model, config, calibration, batches) -> dict:  # config second, data positional, a dict back
        return {}

    problems = contract_problems(old_prune_)
    assert len(problems) == 3 and "example_inputs" in problems[0] and "keyword-only" in problems[1]
