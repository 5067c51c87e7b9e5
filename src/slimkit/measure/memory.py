"""Peak activation memory: the RAM one forward pass needs besides the weights.

:func:`peak_activation_bytes` counts the bytes of activation tensors simultaneously alive
during one forward pass of ``example_inputs`` (the whole batch, eval mode, no grad), in the
tensors' own dtypes, the input included. Kernel workspace (im2col buffers, ...) and buffer
reuse by the allocator or a deployment runtime are not modelled; tensors that share storage
(views such as ``flatten``/``view``/``chunk``, results of in-place ops such as
``ReLU(inplace=True)`` or ``x.relu_()``) are counted once. fx records ``out += x`` as an
out-of-place addition, so the graph method counts its result as a new tensor (an
overestimate by that one tensor). Weights, and tensors computed from weights alone
(a masked or fake-quantized weight), are not activations.

Two methods, the first that works is used:

- ``"graph"``: the model is traced by :func:`slimkit.tracing.trace_model` (torch's own
  modules are leaves, as fx does by default; control flow on shapes is resolved for the
  example's shapes, else a submodule whose forward fx cannot trace is kept whole), the
  graph is run once recording every node's output storages, and a liveness sweep in
  execution order follows: a node's output is alive from the node until its last user
  has run, so while node ``n`` runs, the tensors still needed later, ``n``'s inputs and
  ``n``'s output are alive. The peak is the largest such sum; skip connections count.
- ``"layers"``: when nothing traces (:func:`~slimkit.tracing.trace_model` finds no graph:
  data-dependent control flow in the model's own ``forward``), forward hooks on the leaf
  modules give, per call, the input bytes plus the output bytes; the peak is the largest
  of those (and of the inputs). Tensors kept alive across layers (a residual's skip) are
  missed, so it is a lower bound.

>>> import torch
>>> from torch import nn
>>> model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3, padding=1))
>>> mem = peak_activation_bytes(model, torch.zeros(1, 1, 8, 8))  # fp32: 4 B per element
>>> mem.peak_bytes, mem.peak_at, mem.method  # ReLU: its [1, 4, 8, 8] input and output, 2 * 256 * 4 B
(2048, '1', 'graph')
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from slimkit.measure.inputs import as_args, eval_mode, run_forward
from slimkit.tracing import trace_model

#: storage key -> bytes of that storage.
Storages = dict[tuple[str, int], int]


@dataclass(frozen=True)
class MemoryProfile:
    """Peak activation memory of one forward pass (see the module docstring for what counts).

    - ``peak_bytes``: bytes alive at the peak, whole batch, tensors at their own dtypes;
    - ``peak_at``: the node ("graph": module name for a module call, argument name for an
      input, fx node name otherwise) or leaf module ("layers") running when the peak is first
      reached;
    - ``method``: ``"graph"`` (fx liveness sweep) or ``"layers"`` (per-layer input + output);
    - ``steps``: ``(name, bytes alive)`` per executed node or layer call, in execution order.
    """

    peak_bytes: int
    peak_at: str
    method: str
    steps: tuple[tuple[str, int], ...]


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    """Every tensor inside nested tuples, lists and dicts of ``value``."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


def _storages(value: Any, exclude: frozenset[tuple[str, int]] = frozenset()) -> Storages:
    """The distinct storages of the tensors in ``value``, keyed by (device, address), in bytes."""
    found: Storages = {}
    for t in _tensors(value):
        try:
            storage = t.untyped_storage()
            key, size = (str(t.device), storage.data_ptr()), storage.nbytes()
        except (RuntimeError, NotImplementedError):  # sparse and other storage-less layouts
            key, size = (str(t.device), id(t)), t.numel() * t.element_size()
        if key not in exclude:
            found[key] = size
    return found


def _weight_storages(model: nn.Module) -> frozenset[tuple[str, int]]:
    return frozenset(_storages([*model.parameters(), *model.buffers()]))


def _peak(steps: list[tuple[str, int]], method: str) -> MemoryProfile:
    name, peak = max(steps, key=lambda step: step[1])  # max keeps the first of equal peaks
    return MemoryProfile(peak_bytes=peak, peak_at=name, method=method, steps=tuple(steps))


class _Recorder(fx.Interpreter):
    """Runs a GraphModule keeping every value alive (so no address is reused) and records output storages."""

    def __init__(self, module: fx.GraphModule, weights: frozenset[tuple[str, int]]) -> None:
        super().__init__(module, garbage_collect_values=False)
        self.weights = weights
        self.outputs: dict[fx.Node, Storages] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        self.outputs[n] = _storages(result, self.weights)
        return result


def _weight_only(nodes: list[fx.Node]) -> set[fx.Node]:
    """Nodes computed from weights alone: ``get_attr`` and nodes all of whose inputs are such nodes."""
    found: set[fx.Node] = set()
    for n in nodes:
        inputs = n.all_input_nodes
        if n.op == "get_attr" or (n.op != "placeholder" and inputs and all(i in found for i in inputs)):
            found.add(n)
    return found


def _node_name(n: fx.Node) -> str:
    return str(n.target) if n.op in ("call_module", "placeholder") else n.name


def _liveness(nodes: list[fx.Node], outputs: dict[fx.Node, Storages]) -> list[tuple[str, int]]:
    """Bytes alive while each node runs: storages from their first producer to the last user of any holder."""
    index = {n: i for i, n in enumerate(nodes)}
    spans: dict[tuple[str, int], list[int]] = {}  # key -> [first step, last step, bytes]
    for n in nodes:
        last = max((index[u] for u in n.users), default=index[n])
        for key, size in outputs.get(n, {}).items():
            span = spans.setdefault(key, [index[n], last, size])
            span[1] = max(span[1], last)
    alive = [0] * (len(nodes) + 1)
    for first, last, size in spans.values():
        alive[first] += size
        alive[last + 1] -= size
    steps, total = [], 0
    for n, delta in zip(nodes, alive):
        total += delta
        steps.append((_node_name(n), total))
    return steps


def _graph_steps(model: nn.Module, args: tuple[torch.Tensor, ...]) -> list[tuple[str, int]] | None:
    """Live bytes per fx node (see the module docstring), or None when the model cannot be traced or run traced."""
    graph_module = trace_model(model, args).graph_module
    if graph_module is None:
        return None
    recorder = _Recorder(graph_module, _weight_storages(model))
    try:
        recorder.run(*(t.clone() for t in args))  # a clone's storage is exactly the input's bytes
    except Exception:
        return None
    nodes = list(graph_module.graph.nodes)
    weight_only = _weight_only(nodes)
    outputs = {n: s for n, s in recorder.outputs.items() if n not in weight_only and n.op != "output"}
    return _liveness(nodes, outputs)


def _leaves(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules without children, by qualified name (the model's type name when it is one itself)."""
    return [(name or type(module).__name__, module) for name, module in model.named_modules()
            if not list(module.children())]


def _layer_steps(model: nn.Module, args: tuple[torch.Tensor, ...]) -> list[tuple[str, int]]:
    """Per leaf-module call, the bytes of its inputs plus its output; the inputs of the model first."""
    weights = _weight_storages(model)
    steps = [("input", sum(_storages(args, weights).values()))]

    def make_hook(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            steps.append((name, sum(_storages([inputs, output], weights).values())))

        return hook

    handles = [module.register_forward_hook(make_hook(name)) for name, module in _leaves(model)]
    try:
        run_forward(model, args)
    finally:
        for handle in handles:
            handle.remove()
    return steps


def peak_activation_bytes(model: nn.Module, example_inputs: Any) -> MemoryProfile:
    """Peak bytes of activations alive at once in one forward of ``example_inputs`` (the whole batch).

    ``example_inputs``: a Tensor or a tuple of Tensors, e.g. ``torch.zeros(1, 1, 28, 28)``.
    Bytes are at the tensors' own dtypes (4 per fp32 element), the input included, weights
    excluded; method "graph" (fx liveness) when the model traces, else "layers" (the
    largest input + output of one leaf module). Runs in eval mode under ``torch.no_grad``
    and restores every module's mode. Raises ConfigError when ``example_inputs`` do not fit.
    """
    args = as_args(example_inputs)
    with eval_mode(model), torch.no_grad():
        steps = _graph_steps(model, args)
        if steps is not None:
            return _peak(steps, "graph")
        return _peak(_layer_steps(model, args), "layers")
