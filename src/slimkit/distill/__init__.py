"""Knowledge distillation: losses, feature taps, trainer hooks, teacher-assistant chains.

- :class:`KDLoss` (Hinton 2015), :class:`HintLoss` / :class:`HintRegressor` (FitNets),
  :class:`ATLoss` (attention transfer), :class:`RKDLoss` (relational KD);
- :class:`FeatureTap`: outputs of modules named on a model, by forward hooks;
- :func:`build_hooks`: ``TrainHooks`` for :func:`slimkit.train.fit` from a ``distill:``
  spec (methods ``kd``, ``hint``, ``at``, ``rkd``, ``fsp``, ``crd`` in
  :data:`slimkit.distill.spec.DISTILL_METHODS`); :func:`prepare_distillation` also runs the
  first, training stage of a two-stage method (``two_stage`` for ``hint``/``fsp``);
- :class:`~slimkit.distill.spec.DistillSpec`: the ``distill:`` settings;
- :func:`takd_chain`: teacher -> assistant(s) -> student (Mirzadeh 2020);
- recipe stages ``distill`` (train a new, smaller student from the current model) and ``takd``.

>>> from slimkit.distill import KDLoss
>>> KDLoss(temperature=4.0, alpha=0.9)
KDLoss(temperature=4.0, alpha=0.9)
"""

from slimkit.distill.attention import ATLoss, attention_map
from slimkit.distill.features import FeatureTap, resolve_module
from slimkit.distill.hints import HintLoss, HintRegressor
from slimkit.distill.losses import KDLoss, soft_kl
from slimkit.distill.relational import RKDLoss
from slimkit.distill.spec import DISTILL_METHODS, DistillSpec

__all__ = [
    "DISTILL_METHODS", "ATLoss", "DistillSpec", "FeatureTap", "HintLoss", "HintRegressor", "KDLoss", "RKDLoss",
    "attention_map", "build_hooks", "prepare_distillation", "resolve_module", "soft_kl", "takd_chain",
]


def __getattr__(name: str):
    # methods/takd import slimkit.stages and slimkit.train; keep `import slimkit.distill` light.
    if name in ("build_hooks", "prepare_distillation"):
        from slimkit.distill import methods

        return getattr(methods, name)
    if name == "takd_chain":
        from slimkit.distill.takd import takd_chain

        return takd_chain
    raise AttributeError(f"module 'slimkit.distill' has no attribute {name!r}")
