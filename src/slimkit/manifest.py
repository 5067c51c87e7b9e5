"""Saving and loading models whose architecture a transform changed.

Pruning removes channels, decomposition replaces one conv by a chain, binarization swaps
layer classes: a plain ``state_dict`` of the original class no longer fits. A saved model
is therefore a *manifest* plus a state dict, in one file readable with
``torch.load(weights_only=True)`` (no pickled code):

- ``arch``: how to build the original skeleton: the model source as
  :func:`slimkit.models.create_model` spells it (a zoo name, ``torchvision:NAME``,
  ``timm:NAME``, ``/abs/path/file.py:callable``, ``package.module:callable``) with
  ``num_classes``, ``in_channels`` and its keyword ``args``; None when the caller supplies
  the skeleton;
- ``data``: what the model was trained on (:func:`data_spec`: dataset, image size, input
  shape, classes, normalisation), so evaluating or exporting it needs no flags;
- ``modules``: for every module, in ``named_modules`` order (the root first, named ``""``),
  its class and constructor arguments (for the layer types listed in :data:`MODULE_SPECS`),
  or just its class name, with its integer attributes (``attrs``) and the shapes
  of its own parameters and buffers (``shapes``): what channel surgery changes in a layer
  slimkit has no constructor spec for (timm's ``BatchNormAct2d``, an attention's
  ``num_heads``, a model's ``cls_token``);
- ``state_dict``: the weights and buffers (masks included).

Loading builds the skeleton, replaces every module whose recorded spec differs, sets the
recorded attributes and resizes the recorded tensors where they differ, adds the buffers the
transforms registered, and loads the state dict strictly (a state dict that does not fit the
recorded shapes is refused). :func:`load_model`
also opens slimkit's other model files (the ``.slim`` container) through
:data:`MODEL_FILE_FORMATS`, which their packages fill, so this module imports none of them.
"""

from __future__ import annotations

import importlib
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimkit.atomic import atomic_open
from slimkit.exceptions import ConfigError, CorruptFileError
from slimkit.registry import Registry

FORMAT = "slimkit-model"
VERSION = 1

SpecFn = Callable[[nn.Module], dict[str, Any]]

#: class -> function returning the keyword arguments that rebuild an equivalent module.
MODULE_SPECS: dict[type[nn.Module], SpecFn] = {}


def register_module_spec(cls: type[nn.Module], to_args: SpecFn | None = None) -> None:
    """Teach the manifest how to rebuild ``cls``: ``cls(**to_args(module))``.

    Without ``to_args`` the module must provide ``spec_args() -> dict``.
    """
    MODULE_SPECS[cls] = to_args or (lambda m: m.spec_args())


def _conv_args(m: nn.Conv2d) -> dict[str, Any]:
    return dict(
        in_channels=m.in_channels, out_channels=m.out_channels, kernel_size=tuple(m.kernel_size),
        stride=tuple(m.stride), padding=m.padding if isinstance(m.padding, str) else tuple(m.padding),
        dilation=tuple(m.dilation), groups=m.groups, bias=m.bias is not None, padding_mode=m.padding_mode,
    )


def _bn_args(m: nn.modules.batchnorm._BatchNorm) -> dict[str, Any]:
    return dict(num_features=m.num_features, eps=m.eps, momentum=m.momentum, affine=m.affine,
                track_running_stats=m.track_running_stats)


for _cls in (nn.Conv1d, nn.Conv2d):
    register_module_spec(_cls, _conv_args)
for _cls in (nn.BatchNorm1d, nn.BatchNorm2d):
    register_module_spec(_cls, _bn_args)
register_module_spec(nn.Linear, lambda m: dict(in_features=m.in_features, out_features=m.out_features,
                                               bias=m.bias is not None))
register_module_spec(nn.GroupNorm, lambda m: dict(num_groups=m.num_groups, num_channels=m.num_channels,
                                                  eps=m.eps, affine=m.affine))
register_module_spec(nn.PReLU, lambda m: dict(num_parameters=m.num_parameters))
register_module_spec(nn.LayerNorm, lambda m: dict(normalized_shape=tuple(m.normalized_shape), eps=m.eps,
                                                  elementwise_affine=m.elementwise_affine,
                                                  bias=getattr(m, "bias", None) is not None))
register_module_spec(nn.Sequential, lambda m: {})
register_module_spec(nn.Identity, lambda m: {})


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


#: attributes every nn.Module has (its parameter/buffer/child tables, hooks, ``training``)
_MODULE_INTERNALS = frozenset(vars(nn.Module()))


def _plain(value: Any) -> bool:
    """An attribute the manifest records: an int or a tuple/list of ints (channel and head counts)."""
    if type(value) is int:  # exact types: a str or int enum would pickle its class
        return True
    return type(value) in (tuple, list) and all(type(v) is int for v in value)


def _attrs(module: nn.Module) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in vars(module).items()
            if k not in _MODULE_INTERNALS and not k.startswith("__") and _plain(v)}


def _own_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: t for table in (module._parameters, module._buffers) for k, t in table.items() if t is not None}


def _records_state(module: nn.Module) -> bool:
    """Whether the manifest records ``module``'s attrs and shapes: a class without a constructor spec from
    outside torch.nn and slimkit (timm's, the user's), or one from inside with tensors of its own."""
    if type(module) in MODULE_SPECS:
        return False
    return not type(module).__module__.startswith(("torch.nn.", "slimkit.")) or bool(_own_tensors(module))


def module_manifest(model: nn.Module) -> list[dict[str, Any]]:
    """One entry per module (the root, named ``""``, only with attrs or shapes): name, class, args where known,
    and for the classes of :func:`_records_state` their ``attrs`` and ``shapes`` where they have any."""
    entries = []
    for name, module in model.named_modules():
        spec_fn = MODULE_SPECS.get(type(module)) if name else None
        entry: dict[str, Any] = {"name": name, "type": _qualname(type(module))}
        if spec_fn is not None:
            entry["args"] = spec_fn(module)
        if _records_state(module):
            if attrs := _attrs(module):
                entry["attrs"] = attrs
            if shapes := {k: list(t.shape) for k, t in _own_tensors(module).items()}:
                entry["shapes"] = shapes
        if name or len(entry) > 2:
            entries.append(entry)
    return entries


def _class_for(qualname: str) -> type[nn.Module]:
    for attempt in range(2):
        for cls in MODULE_SPECS:
            if _qualname(cls) == qualname:
                return cls
        module_name = qualname.rpartition(".")[0]
        # slimkit's own layer classes register their specs where they are defined: import that module
        # (only slimkit's: a file must not be able to make us import arbitrary modules)
        if attempt or not module_name.startswith("slimkit."):
            break
        try:
            importlib.import_module(module_name)
        except ImportError:
            break
    raise CorruptFileError(
        f"saved model uses module class {qualname} that slimkit cannot rebuild; "
        "import the module that registers it (register_module_spec) before loading"
    )


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    if isinstance(parent, (nn.Sequential, nn.ModuleList)) and leaf.isdigit() and int(leaf) == len(parent):
        parent.append(module)
    else:
        setattr(parent, leaf, module)


def rebuild(skeleton: nn.Module, entries: list[dict[str, Any]]) -> nn.Module:
    """Make ``skeleton``'s module tree match a manifest, replacing modules in place."""
    current = dict(skeleton.named_modules())
    for entry in entries:
        name, qualname = entry["name"], entry["type"]
        existing = current.get(name)
        same_class = existing is not None and _qualname(type(existing)) == qualname
        if same_class and ("args" not in entry or MODULE_SPECS[type(existing)](existing) == entry["args"]):
            continue
        if "args" not in entry:
            raise CorruptFileError(
                f"saved model has a {qualname} at {name!r} that the skeleton lacks; "
                "load with the model class that produced it (model=skeleton)"
            )
        module = _class_for(qualname)(**entry["args"])
        _set_module(skeleton, name, module)
        current = dict(skeleton.named_modules())
    for entry in entries:
        if (module := current.get(entry["name"])) is not None:
            _resize(module, entry.get("attrs", {}), entry.get("shapes", {}))
    return skeleton


def _resize(module: nn.Module, attrs: dict[str, Any], shapes: dict[str, list[int]]) -> None:
    """Give ``module`` the recorded attribute values and tensor shapes where they differ (contents follow)."""
    own = vars(module)
    for key, value in attrs.items():
        now = own.get(key)
        if key in own and _plain(now) and (list(now) if isinstance(now, tuple) else now) != value:
            setattr(module, key, tuple(value) if isinstance(now, tuple) else value)
    for key, tensor in _own_tensors(module).items():
        shape = shapes.get(key)
        if shape is None or list(tensor.shape) == shape:
            continue
        empty = torch.empty(shape, dtype=tensor.dtype, device=tensor.device)
        if isinstance(tensor, nn.Parameter):
            module._parameters[key] = nn.Parameter(empty, requires_grad=tensor.requires_grad)
        else:
            module._buffers[key] = empty


def _add_missing_buffers(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    have = model.state_dict()
    for key, tensor in state.items():
        if key in have:
            continue
        owner_name, _, leaf = key.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        owner.register_buffer(leaf, torch.empty_like(tensor))


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` atomically (temporary file beside ``path``, then rename)."""
    with atomic_open(path) as handle:
        torch.save(obj, handle)
    return Path(path)


def save_model(model: nn.Module, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (any architecture a transform produced) atomically to ``path``.

    ``extra`` is stored alongside (plain data only: str, numbers, lists, dicts, tensors).
    """
    from slimkit.models import arch_of

    payload = {
        "format": FORMAT,
        "version": VERSION,
        "arch": arch_of(model),
        "data": data_spec_of(model),
        "modules": module_manifest(model),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "extra": extra or {},
    }
    return atomic_save(payload, path)


_DATA_ATTR = "slimkit_data"


def data_spec(bundle: Any, data_dir: str | os.PathLike | None = None, image_size: int | None = None) -> dict[str, Any]:
    """What a model trained on ``bundle`` (a :class:`slimkit.data.DataBundle`) expects, as plain data.

    ``dataset`` is the name :func:`slimkit.data.load_data` takes (an image folder with its
    absolute path), ``input_shape`` is ``[C, H, W]``, ``mean``/``std`` the per-channel
    normalisation applied to the inputs (None where the loader records none).
    """
    base, sep, arg = bundle.name.partition(":")
    dataset = f"{base}:{os.path.abspath(arg)}" if sep and base == "imagefolder" else bundle.name
    return {
        "dataset": dataset,
        "data_dir": os.path.abspath(data_dir) if data_dir is not None else None,
        "image_size": image_size,
        "input_shape": [int(d) for d in bundle.input_shape],
        "num_classes": int(bundle.num_classes),
        "mean": [float(v) for v in bundle.mean] if bundle.mean is not None else None,
        "std": [float(v) for v in bundle.std] if bundle.std is not None else None,
    }


def set_data_spec(model: nn.Module, spec: dict[str, Any] | None) -> nn.Module:
    """Attach a :func:`data_spec` to ``model`` (kept through deep copies and in-place transforms)."""
    if spec:
        setattr(model, _DATA_ATTR, dict(spec))
    return model


def data_spec_of(model: nn.Module) -> dict[str, Any] | None:
    """The data spec a model carries (set by the pipeline, read back from saved files), or None."""
    spec = getattr(model, _DATA_ATTR, None)
    return dict(spec) if spec else None


def _shape(values: Any) -> str:
    return "x".join(str(v) for v in values)


def check_data_fits(model: nn.Module, bundle: Any, what: str) -> None:
    """One ConfigError line when ``bundle`` is not what ``model`` was trained on, or its output does not
    have one logit per class of ``bundle``: a mismatch must never become a wrong score."""
    spec = data_spec_of(model)
    if spec:
        trained = f"{what} was trained on {spec['dataset']} ({_shape(spec['input_shape'])}, " \
                  f"{spec['num_classes']} classes)"
        if list(bundle.input_shape) != list(spec["input_shape"]):
            hint = ""
            if list(bundle.input_shape)[0] == spec["input_shape"][0]:
                hint = f"; pass --image-size {spec['input_shape'][-1]}"
            raise ConfigError(f"{trained}, but {bundle.name} gives {_shape(bundle.input_shape)} inputs{hint}")
        if int(bundle.num_classes) != int(spec["num_classes"]):
            raise ConfigError(f"{trained}, but {bundle.name} has {bundle.num_classes} classes")
        mean = [round(float(v), 6) for v in bundle.mean] if bundle.mean is not None else None
        std = [round(float(v), 6) for v in bundle.std] if bundle.std is not None else None
        want_mean = [round(v, 6) for v in spec["mean"]] if spec.get("mean") is not None else None
        want_std = [round(v, 6) for v in spec["std"]] if spec.get("std") is not None else None
        if (mean, std) != (want_mean, want_std) and None not in (want_mean, mean):
            raise ConfigError(f"{trained} normalised with mean {want_mean} std {want_std}, but {bundle.name} "
                              f"is normalised with mean {mean} std {std}; evaluate it on data prepared the same way")
    example = torch.zeros(1, *bundle.input_shape)
    try:
        with torch.no_grad():
            out = model.eval()(example)
    except Exception as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise ConfigError(f"{what} cannot run on {bundle.name} inputs of shape {_shape(example.shape)} "
                          f"({type(err).__name__}: {reason})") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[1] != bundle.num_classes:
        got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"{what} gives outputs {got} on {bundle.name}, which has {bundle.num_classes} classes "
                          "(expected [N, classes])")


def _peek_pickle(path: Path) -> bytes:
    """The raw pickle stream of a torch zip file (read as bytes, never unpickled), or b''."""
    try:
        with zipfile.ZipFile(path) as archive:
            name = next((n for n in archive.namelist() if n.endswith("/data.pkl")), None)
            return archive.read(name) if name else b""
    except (zipfile.BadZipFile, OSError):
        return b""


def _is_slim(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(4) == b"SLIM"


def read_payload(path: str | os.PathLike) -> dict[str, Any]:
    """The raw saved dict, validated; one ConfigError/CorruptFileError line for anything else
    (a training checkpoint, a plain state dict, a pickled module, a .slim container, a damaged file)."""
    from slimkit.models.weights import read_weights_file

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"model file {str(path)!r} does not exist")
    if _is_slim(path):
        raise ConfigError(f"{path} is a .slim container; read it with slimkit.encode.load (the CLI commands "
                          "accept it directly), or convert it with: slimkit decode FILE")
    raw = _peek_pickle(path)
    if b"hook_modules" in raw and b"optimizer" in raw:
        run = path.parent.parent if path.parent.name == "checkpoints" else None
        where = f" ({run / 'model.pt'} or {run / 'models'}/NN-<stage>.pt)" if run else ""
        raise ConfigError(f"{path} is a training checkpoint (what --resume continues from), not a model file; "
                          f"evaluate a model file slimkit wrote{where}")
    try:
        payload = read_weights_file(path, "model file")
    except ConfigError as err:
        if "pickled" in str(err) or "TorchScript" in str(err):
            raise ConfigError(str(err).replace("and pass that file", "and build the model with --model SOURCE "
                                                                     "--weights FILE")) from None
        raise CorruptFileError(f"{path}: not a readable slimkit model file ({err})") from None
    if isinstance(payload, dict) and payload.get("format") != FORMAT and payload and all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in payload.items()):
        raise ConfigError(f"{path} is a plain state dict, which does not say what model it belongs to; "
                          "pass --model SOURCE (e.g. torchvision:resnet18 or mynet.py:MyNet) with it")
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CorruptFileError(f"{path}: not a slimkit model file (no '{FORMAT}' header)")
    if payload.get("version", 0) > VERSION:
        raise CorruptFileError(f"{path}: format version {payload['version']} is newer than this slimkit ({VERSION})")
    return payload


@dataclass(frozen=True)
class ModelFileFormat:
    """A model file format other than :func:`save_model`'s, told apart by the bytes it starts with.

    ``load(path, model)``: the model in the file, in eval mode (``model``: a skeleton or None).
    """

    name: str
    magic: bytes
    load: Callable[[str | os.PathLike, nn.Module | None], nn.Module]


#: the formats :func:`load_model` opens besides its own; ``.slim`` registers in slimkit.encode.container
MODEL_FILE_FORMATS: Registry[ModelFileFormat] = Registry("model file format",
                                                         lazy_modules=("slimkit.encode.container",))


def register_model_file_format(fmt: ModelFileFormat) -> ModelFileFormat:
    """Let :func:`load_model` open files starting with ``fmt.magic`` with ``fmt.load``."""
    return MODEL_FILE_FORMATS.register(fmt.name, fmt)


def file_format(path: str | os.PathLike) -> ModelFileFormat | None:
    """The registered format whose magic bytes ``path`` starts with, or None (e.g. a model.pt)."""
    with open(path, "rb") as handle:
        head = handle.read(64)
    return next((f for f in map(MODEL_FILE_FORMATS.get, MODEL_FILE_FORMATS.names()) if head.startswith(f.magic)),
                None)


def load_model(path: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """Rebuild a model saved by :func:`save_model` (or a ``.slim`` container), from its recorded source.

    The skeleton is built from the recorded source spelling (zoo, torchvision, timm, your
    file or module, with its arguments); ``model=skeleton`` (an instance of the original,
    unchanged class) replaces that, e.g. for a model built outside ``create_model``.
    Returns the model in eval mode, carrying its data spec (:func:`data_spec_of`).
    """
    other = file_format(path) if Path(path).is_file() else None
    if other is not None:
        return other.load(path, model)
    payload = read_payload(path)
    return restore(path, payload.get("arch"), payload["modules"], payload["state_dict"], model,
                   data=payload.get("data"))


def model_meta(model: nn.Module) -> dict[str, Any]:
    """What every slimkit file format stores beside the weights: source, data spec, module manifest."""
    from slimkit.models import arch_of

    return {"arch": arch_of(model), "data": data_spec_of(model), "modules": module_manifest(model)}


def skeleton_from(source: str | os.PathLike, arch: dict[str, Any] | None) -> nn.Module:
    """The unchanged model a saved file's ``arch`` names, built again from its source."""
    from slimkit.models import create_model

    if not arch or not arch.get("name"):
        raise ConfigError(f"{source}: the model is not from the zoo or another source slimkit records (it was "
                          "built outside slimkit.models.create_model); in Python load it with load_model(path, "
                          "model=<an instance of its class>), or build it with --model SOURCE")
    try:
        return create_model(arch["name"], num_classes=arch["num_classes"], in_channels=arch["in_channels"],
                            **(arch.get("args") or {}))
    except ConfigError as err:
        hint = "; put it back there" if ".py:" in str(arch["name"]) else ""
        raise ConfigError(f"{source}: cannot rebuild its model from the recorded source {arch['name']!r}: "
                          f"{err}{hint}") from None


def restore(source: str | os.PathLike, arch: dict[str, Any] | None, modules: list[dict[str, Any]],
            state: dict[str, torch.Tensor], model: nn.Module | None = None,
            data: dict[str, Any] | None = None) -> nn.Module:
    """Build the skeleton (from ``arch``, or ``model``), apply the manifest, load ``state``.

    Shared by every slimkit file format; ``source`` names the file in error messages.
    Tensors stored in another dtype than the model's (e.g. decoded weights) are cast.
    ``data`` (a :func:`data_spec`) is attached to the result.
    """
    if model is None:
        model = skeleton_from(source, arch)
    rebuild(model, modules)
    load_rebuilt_state(model, state, source)
    set_data_spec(model, data)
    return model.eval()


def load_rebuilt_state(model: nn.Module, state: dict[str, torch.Tensor], source: str | os.PathLike) -> None:
    """Load ``state`` strictly into a rebuilt ``model``, in place.

    Buffers the manifest adds (masks, codebooks) are registered first; tensors stored in another dtype
    than the model's are cast. A state that does not fit is a one-line CorruptFileError naming ``source``.
    """
    _add_missing_buffers(model, state)
    expected = model.state_dict()
    state = {k: v.to(expected[k].dtype) if k in expected and expected[k].dtype != v.dtype else v
             for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = " ".join(str(err).strip().splitlines()[0:2])
        raise CorruptFileError(f"{source}: weights do not fit the rebuilt model: {first}") from None
