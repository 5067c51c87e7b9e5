"""Every error slimkit raises on purpose.

Each class subclasses the built-in a caller would expect (``ValueError`` for a bad value,
``KeyError``-like lookups stay ``ValueError`` so the message is printed verbatim), so
``except ValueError`` keeps working. Messages are one line: what was wrong, the value
received, what is allowed, and how to fix it. The CLI prints ``str(error)`` and exits 2.
"""


class SlimkitError(Exception):
    """Base class of the errors slimkit raises deliberately."""


class ConfigError(SlimkitError, ValueError):
    """A config, recipe or argument is invalid (wrong key, type, range or combination)."""


class UnknownNameError(ConfigError):
    """A name (model, dataset, stage, criterion, ...) is not in its registry."""


class DataNotFoundError(SlimkitError, FileNotFoundError):
    """A dataset's files are not where they were expected."""


class CorruptFileError(SlimkitError, ValueError):
    """A file slimkit wrote (checkpoint, .slim container, manifest) is damaged or truncated."""


class ModelStateError(SlimkitError, ValueError):
    """A model's tensors contradict each other (a shared weight off its codebook, a mask of the wrong shape)."""


class UnsupportedModelError(SlimkitError, TypeError):
    """A model contains a layer or operation a transform cannot handle."""
