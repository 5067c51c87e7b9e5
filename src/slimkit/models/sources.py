"""Model sources: one spelling for every way a model can come in.

The same text names a model on the command line (``--model``), in a recipe (``model:``)
and in Python (:func:`slimkit.models.create_model`):

- ``lenet5``, ``resnet20-cifar``, ...: a zoo name (:data:`slimkit.models.MODELS`);
- ``torchvision:NAME``: a torchvision classification model, built with ``weights=None``;
- ``timm:NAME``: a timm model (when timm is installed), built with ``pretrained=False``;
- ``path/to/file.py:callable``: a class or function in a Python file of yours;
- ``package.module:callable``: a class or function in an importable module.

Keyword arguments (``model_args:`` in a recipe, ``--model-arg KEY=VALUE`` on the CLI) go
to the builder. Like the zoo builders, a callable also receives ``num_classes`` and
``in_channels`` from the data when its signature names them (``in_chans`` too, timm's
spelling). Nothing is downloaded: ``weights``/``pretrained`` are refused, load trained
weights with ``--weights FILE`` (:func:`slimkit.models.weights.load_weights`).

A model built here remembers its source (:func:`slimkit.models.arch_of`), so a saved
model is rebuilt from the same spelling; a file source is recorded with its absolute path.

>>> parse_source("torchvision:mobilenet_v2")
ModelSource(kind='torchvision', name='mobilenet_v2', location=None)
>>> parse_source("mypkg.nets:TinyNet").spelling
'mypkg.nets:TinyNet'
>>> parse_source("nets/tiny.txt:TinyNet")
Traceback (most recent call last):
...
slimkit.exceptions.ConfigError: model 'nets/tiny.txt:TinyNet': ...
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import inspect
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from torch import nn

from slimkit.exceptions import ConfigError, UnknownNameError

SPELLINGS = ("a zoo name (slimkit models)", "torchvision:NAME", "timm:NAME", "path/to/file.py:callable",
             "package.module:callable")
_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_DOTTED = re.compile(rf"^{_IDENT}(\.{_IDENT})*$")
#: keyword arguments that would fetch pretrained weights: refused (no hidden downloads).
_DOWNLOAD_ARGS = ("weights", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path")
#: packages whose functions are never model builders (a saved file must not be able to name them).
_NOT_BUILDERS = frozenset({"pip", "setuptools", "pkg_resources", "_pytest", "pytest", "torch", "IPython"})


@dataclass(frozen=True)
class ModelSource:
    """A parsed model spelling.

    ``kind``: ``zoo``, ``torchvision``, ``timm``, ``file`` or ``module``; ``name``: the zoo,
    torchvision or timm name, or the callable (``Outer.build`` allowed); ``location``: the
    Python file (absolute) or the module path, for ``file`` and ``module``.
    """

    kind: str
    name: str
    location: str | None = None

    @property
    def spelling(self) -> str:
        """The canonical text of this source (what a saved model records)."""
        if self.kind == "zoo":
            return self.name
        if self.kind in ("torchvision", "timm"):
            return f"{self.kind}:{self.name}"
        return f"{self.location}:{self.name}"


def _bad(text: str, why: str) -> ConfigError:
    return ConfigError(f"model {text!r}: {why}; use one of: {', '.join(SPELLINGS)}")


def parse_source(text: str) -> ModelSource:
    """Parse a model spelling (see the module docstring); ConfigError naming the accepted forms."""
    if not isinstance(text, str) or not text.strip():
        raise _bad(str(text), "must be a non-empty string")
    text = text.strip()
    prefix, sep, rest = text.partition(":")
    if not sep:
        return ModelSource("zoo", text.lower())
    if prefix.lower() in ("torchvision", "timm"):
        if not rest or not re.fullmatch(r"[A-Za-z0-9_.-]+", rest):
            raise _bad(text, f"needs a model name after '{prefix.lower()}:'")
        return ModelSource(prefix.lower(), rest)
    where, _, name = text.rpartition(":")
    if not _DOTTED.match(name):
        raise _bad(text, f"{name!r} after the last ':' is not a Python name")
    if where.endswith(".py"):
        return ModelSource("file", name, str(Path(where).expanduser().absolute()))
    if _DOTTED.match(where):
        return ModelSource("module", name, where)
    raise _bad(text, f"{where!r} is neither a .py file nor a dotted module path")


def check_source(text: str) -> ModelSource:
    """Parse ``text`` and check what can be checked without building: zoo and library names, files exist."""
    source = parse_source(text)
    if source.kind == "zoo":
        from slimkit.models import MODELS

        if source.name not in MODELS:
            raise UnknownNameError(MODELS.unknown_message(source.name))
    elif source.kind == "torchvision":
        _torchvision_name(source.name)
    elif source.kind == "timm":
        _timm_name(source.name)
    elif source.kind == "file" and not Path(source.location).is_file():
        raise ConfigError(f"model {text!r}: no file {source.location}; give the path of the .py file defining "
                          f"{source.name}")
    return source


def _suggest(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(map(repr, close))}?" if close else ""


def _torchvision_name(name: str) -> str:
    from torchvision import models as tvm

    known = tvm.list_models(module=tvm)
    if name.lower() not in known:
        raise UnknownNameError(f"unknown torchvision model {name!r}{_suggest(name.lower(), known)} "
                               "(list them with torchvision.models.list_models())")
    return name.lower()


def _timm():
    try:
        import timm
    except ImportError:
        raise ConfigError("timm: models need the timm package; pip install 'slimkit[timm]'") from None
    return timm


def _timm_name(name: str) -> str:
    timm = _timm()
    if not timm.is_model(name):
        raise UnknownNameError(f"unknown timm model {name!r}{_suggest(name, timm.list_models())} "
                               "(list them with timm.list_models('pattern*'))")
    return name


def _no_downloads(source: ModelSource, model_args: dict[str, Any]) -> None:
    asked = [k for k in _DOWNLOAD_ARGS if k in model_args]
    if asked:
        raise ConfigError(f"model_args of {source.spelling}: {asked[0]!r} would fetch pretrained weights, and "
                          "slimkit downloads nothing; save the weights to a file and pass --weights FILE "
                          "(recipe 'weights:')")


def _import_file(path: str) -> ModuleType:
    """Import a Python file once per (path, modification time) under a stable private module name."""
    if not os.path.isfile(path):
        raise ConfigError(f"model file {path}: no such file; give the path of the .py file that defines the model")
    stat = os.stat(path)
    key = hashlib.sha1(f"{path}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    module_name = f"slimkit_user_{Path(path).stem}_{key}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"model file {path}: cannot be imported as Python")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # classes must find their module (deepcopy, fx, dataclasses)
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules[module_name]
        line = f" (line {err.lineno})" if isinstance(err, SyntaxError) and err.lineno else ""
        reason = (str(err).strip().splitlines() or [""])[0]
        raise ConfigError(f"model file {path}: importing it raised {type(err).__name__}{line}: {reason}") from None
    return module


def _import_module(source: ModelSource) -> ModuleType:
    top = source.location.split(".")[0]
    if top in sys.stdlib_module_names or top in _NOT_BUILDERS:
        raise ConfigError(f"model {source.spelling!r}: {top} is not a package of model builders")
    try:
        return importlib.import_module(source.location)
    except ModuleNotFoundError as err:
        raise ConfigError(f"model {source.spelling!r}: no module named {err.name!r}; install it, or give "
                          "path/to/file.py:callable for a file") from None
    except Exception as err:
        reason = (str(err).strip().splitlines() or [""])[0]
        raise ConfigError(f"model {source.spelling!r}: importing {source.location} raised "
                          f"{type(err).__name__}: {reason}") from None


def _resolve(source: ModelSource) -> Any:
    module = _import_file(source.location) if source.kind == "file" else _import_module(source)
    obj: Any = module
    for part in source.name.split("."):
        if not hasattr(obj, part):
            defined = sorted(n for n, v in vars(module).items() if not n.startswith("_") and _is_builder(v, module))
            raise ConfigError(f"model {source.spelling!r}: {source.location} has no {source.name!r}"
                              f"{_suggest(source.name, defined)} (it defines: {', '.join(defined) or 'no builders'})")
        obj = getattr(obj, part)
    if not _is_builder(obj, module):
        raise ConfigError(f"model {source.spelling!r}: {source.name} is a {type(obj).__name__}, not an nn.Module "
                          f"class or a function defined in {source.location} that returns one")
    return obj


def _is_builder(obj: Any, module: ModuleType) -> bool:
    """An nn.Module subclass, or a Python function defined in ``module`` itself (not one it imported):
    a saved file names its source, and must not be able to make slimkit call an arbitrary function."""
    if inspect.isclass(obj):
        return issubclass(obj, nn.Module)
    return inspect.isfunction(obj) and getattr(obj, "__module__", None) == module.__name__


def _call(source: ModelSource, builder: Any, num_classes: int, in_channels: int,
          model_args: dict[str, Any]) -> nn.Module:
    try:
        params = inspect.signature(builder).parameters
    except (TypeError, ValueError):
        params = {}
    kwargs = dict(model_args)
    named = {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    if "num_classes" in named:
        kwargs.setdefault("num_classes", num_classes)
    if "in_channels" in named:
        kwargs.setdefault("in_channels", in_channels)
    elif "in_chans" in named:
        kwargs.setdefault("in_chans", in_channels)
    takes_any = any(p.kind == p.VAR_KEYWORD for p in params.values())
    unknown = sorted(k for k in model_args if k not in named and not takes_any)
    if params and unknown:
        raise ConfigError(f"model_args of {source.spelling}: {source.name} takes no argument {unknown[0]!r} "
                          f"(it takes: {', '.join(sorted(named)) or 'none'})")
    try:
        model = builder(**kwargs)
    except Exception as err:
        reason = (str(err).strip().splitlines() or [""])[0]
        raise ConfigError(f"model {source.spelling!r}: {source.name}(**{kwargs}) raised "
                          f"{type(err).__name__}: {reason}") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model {source.spelling!r}: {source.name} returned a {type(model).__name__}, "
                          "not an nn.Module")
    return model


def build_from_source(source: ModelSource, num_classes: int, in_channels: int,
                      model_args: dict[str, Any]) -> nn.Module:
    """Build a non-zoo source (``torchvision``, ``timm``, ``file``, ``module``); no weights are fetched."""
    _no_downloads(source, model_args)
    if source.kind == "torchvision":
        from torchvision import models as tvm

        from slimkit.models.torchvision_zoo import adapt_in_channels

        name = _torchvision_name(source.name)
        model = _call(source, lambda **kw: tvm.get_model(name, weights=None, **kw), num_classes, in_channels,
                      {"num_classes": num_classes, **model_args})
        return adapt_in_channels(model, in_channels)
    if source.kind == "timm":
        timm = _timm()
        name = _timm_name(source.name)
        return _call(source, lambda **kw: timm.create_model(name, pretrained=False, **kw), num_classes, in_channels,
                     {"num_classes": num_classes, "in_chans": in_channels, **model_args})
    return _call(source, _resolve(source), num_classes, in_channels, model_args)
