"""slimkit.kernels: convolution algorithms, sparse + shared-weight kernels and the bit-packed XNOR kernel.

Everything is compiled lazily on first use (``import slimkit.kernels`` stays light).
:func:`conv2d` computes a convolution by a named algorithm (docs/kernels.md),
:func:`plan` / :func:`apply_plan` time every candidate per layer of a model and swap in the
fastest, :func:`xnor_conv2d` is the XNOR-popcount binary convolution.
"""

from slimkit.kernels.conv import ALGORITHMS, conv2d
from slimkit.kernels.plan import KernelPlan, apply_plan, plan
from slimkit.kernels.xnor import PackedWeight, xnor_conv2d

__all__ = ["ALGORITHMS", "KernelPlan", "PackedWeight", "apply_plan", "conv2d", "plan", "xnor_conv2d"]
