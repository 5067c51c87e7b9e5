"""Knowledge distillation: losses, feature taps, trainer hooks, teacher-assistant chains.

- :class:`KDLoss` (Hinton 2015), :class:`HintLoss` / :class:`HintRegressor` (FitNets),
  :class:`ATLoss` (attention transfer), :class:`RKDLoss` (relational KD);
- :class:`FeatureTap`: outputs of modules named on a model, by forward hooks;
- :func:`build_hooks`: ``TrainHooks`` for :func:`slimkit.train.fit` from a ``distill:``
  spec (methods ``kd``, ``hint``, ``at``, ``rkd`` in ``slimkit.stages.DISTILL_METHODS``);
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

__all__ = [
    "ATLoss", "FeatureTap", "HintLoss", "HintRegressor", "KDLoss", "RKDLoss", "attention_map", "build_hooks",
    "resolve_module", "soft_kl", "takd_chain",
]


def __getattr__(name: str):
    # methods/takd import slimkit.stages and slimkit.train; keep `import slimkit.distill` light.
    if name == "build_hooks":
        from slimkit.distill.methods import build_hooks

        return build_hooks
    if name == "takd_chain":
        from slimkit.distill.takd import takd_chain

        return takd_chain
    raise AttributeError(f"module 'slimkit.distill' has no attribute {name!r}")
