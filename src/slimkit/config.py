"""The base of every config: a small frozen pydantic model that also accepts a dict.

A technique's config subclasses :class:`Config`. Unknown keys are errors, values are
validated when the config is built, and every violation becomes one line naming the
path of the bad value, e.g. ``stages[1].prune.sparsity: must be between 0 and 1``.

>>> from pydantic import Field
>>> class PruneConfig(Config):
...     sparsity: float = Field(0.5, ge=0, lt=1)
>>> PruneConfig.coerce({"sparsity": 0.8}).sparsity
0.8
>>> PruneConfig.coerce({"sparsity": 1.5}, where="stages[1].prune")
Traceback (most recent call last):
...
slimkit.exceptions.ConfigError: stages[1].prune.sparsity: must be less than 1 (got 1.5)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from slimkit.exceptions import ConfigError

C = TypeVar("C", bound="Config")


class Config(BaseModel):
    """Frozen, strict-keyed config. Build with ``Cls(**fields)`` or ``Cls.coerce(dict)``."""

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())

    @classmethod
    def coerce(cls: type[C], value: C | Mapping[str, Any] | None, where: str = "") -> C:
        """Return ``value`` as a ``cls``: an instance passes through, a dict is validated.

        Raises ConfigError with one line naming the path (``where`` is the prefix, such
        as ``stages[1].prune``) of the first invalid field.
        """
        if isinstance(value, cls):
            return value
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where or cls.__name__}: expected a mapping of settings, got {value!r}")
        try:
            return cls.model_validate(dict(value))
        except ValidationError as err:
            raise ConfigError(format_validation_error(err, where)) from None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-friendly dict of the fields (what a recipe would contain)."""
        return self.model_dump(mode="json")


def _join_path(prefix: str, loc: tuple[Any, ...]) -> str:
    path = prefix
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path


_PHRASES = {
    "extra_forbidden": lambda e: "unknown key; remove it or check its spelling",
    "missing": lambda e: "required but missing",
}


def format_validation_error(err: ValidationError, prefix: str = "") -> str:
    """One line for the first error of a pydantic ValidationError, path first."""
    first = err.errors(include_url=False)[0]
    path = _join_path(prefix, tuple(first["loc"])) or "config"
    kind = first["type"]
    if kind in _PHRASES:
        return f"{path}: {_PHRASES[kind](first)}"
    message = first["msg"]
    message = message.removeprefix("Value error, ").removeprefix("Assertion failed, ")
    message = message[0].lower() + message[1:] if message else message
    message = message.replace("input should be", "must be")
    got = first.get("input")
    suffix = "" if isinstance(got, (dict, list)) or got is None else f" (got {got!r})"
    return f"{path}: {message}{suffix}"
