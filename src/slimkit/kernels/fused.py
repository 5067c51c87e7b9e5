"""A whole run of compressed-domain layers as one compiled call: no Python between the layers of a small model.

At batch 1 the small Deep Compression models (LeNet-300-100, LeNet-5) spend most of their
time in Python, not in arithmetic: every module call, tensor made and numba dispatch costs
a few microseconds, as much as a 14k-entry sparse layer. :func:`fuse_` traces a model whose
pruned, shared layers are :class:`~slimkit.kernels.sparse.SharedSparseLinear` /
:class:`~slimkit.kernels.sparse.SharedSparseConv2d` (``torch.fx``, every module but
containers a leaf) and replaces each maximal straight chain of layers it can compute, each
output the only input of the next, with one :class:`FusedChain`. A chain runs as a single
``nogil`` numba call of a small interpreter over a table of operations:

- sparse linear (CSR over 8/16-bit ``(gap << b) | symbol`` entries and a codebook, as stored
  in ``.slim``; four accumulators), with the ReLU that follows it fused in;
- sparse direct convolution, no im2col matrix: per output channel and stored weight, stride 1
  one contiguous multiply-add over an output grid as wide as the (zero-padded) input, the
  columns past the output width dropped at the end (LLVM vectorises it); other strides per
  output row. ReLU fused;
- max pooling, ReLU, and the layers that do not move data (``Flatten`` from dim 1, eval
  ``Dropout``, ``Identity``, :class:`~slimkit.models.classic.FitSize` at its own size).

Activations ping-pong between two scratch buffers; images of a batch run one after the other
on the calling thread. A chain's index entries, row pointers and codebooks are concatenated
once and each layer's :class:`~slimkit.kernels.sparse.SharedSparseMatrix` keeps views of them,
so no weight is held twice (biases are copied: they are small). The operation table is built
per input shape; a shape or dtype it cannot run (e.g. ``FitSize`` resampling) falls back to
calling the original layers one by one, so results never depend on which path ran. The
layers inside a chain are not called, so forward hooks on them do not fire.

Measured (docs/kernels.md, ``benchmarks/compressed_inference.py``): batch 1, one thread,
LeNet-5 4.0x and LeNet-300-100 2.2x faster than the dense model in PyTorch eager; run layer
by layer the same compressed layers were 1.3x and 0.9x.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from torch import fx, nn
from torch.nn import functional as F

from slimkit.kernels.sparse import SharedSparseConv2d, SharedSparseLinear, SharedSparseMatrix

OP_LINEAR, OP_CONV, OP_MAXPOOL, OP_RELU = 1, 2, 3, 4
# columns of the operation table (int64 [ops, WIDTH]); unused columns stay 0
WIDTH = 24
(C_OP, C_IN, C_OUT, C_PTR, C_WIDE, C_ENT, C_BOOK, C_SHIFT, C_MASK, C_BIAS, C_RELU,
 C_CH, C_H, C_W, C_KH, C_KW, C_SH, C_SW, C_PH, C_PW, C_OC, C_OH, C_OW) = range(23)


# serial (no numba threading layer); compiled on first call and cached on disk (numba's cache beside this
# file): compiling the interpreter takes tens of seconds on a busy machine
_jit = numba.njit(nogil=True, fastmath=True, boundscheck=False, cache=True)


@_jit
def _linear(p, ptrs, ent, books, fvals, src, dst):
    rows, shift, mask = p[C_OUT], p[C_SHIFT], p[C_MASK]
    pb, eb, bb, bias = p[C_PTR], p[C_ENT], p[C_BOOK], p[C_BIAS]
    for r in range(rows):
        col = -1
        a0 = np.float32(0.0)
        a1 = np.float32(0.0)
        a2 = np.float32(0.0)
        a3 = np.float32(0.0)
        e, end = eb + ptrs[pb + r], eb + ptrs[pb + r + 1]
        while e + 4 <= end:
            v0, v1, v2, v3 = np.int64(ent[e]), np.int64(ent[e + 1]), np.int64(ent[e + 2]), np.int64(ent[e + 3])
            c0 = col + (v0 >> shift) + 1
            c1 = c0 + (v1 >> shift) + 1
            c2 = c1 + (v2 >> shift) + 1
            col = c2 + (v3 >> shift) + 1
            a0 += books[bb + (v0 & mask)] * src[c0]
            a1 += books[bb + (v1 & mask)] * src[c1]
            a2 += books[bb + (v2 & mask)] * src[c2]
            a3 += books[bb + (v3 & mask)] * src[col]
            e += 4
        while e < end:
            v = np.int64(ent[e])
            col += (v >> shift) + 1
            a0 += books[bb + (v & mask)] * src[col]
            e += 1
        y = ((a0 + a1) + (a2 + a3)) + (fvals[bias + r] if bias >= 0 else np.float32(0.0))
        dst[r] = max(y, np.float32(0.0)) if p[C_RELU] else y

@_jit
def _conv_wide(p, ptrs, ent, books, fvals, src, dst):
    # stride 1: per stored weight one contiguous multiply-add over an output grid as wide as the (padded)
    # input, out_wide[oy * wp + ox] += w * x[c, oy + ky, ox + kx]; the columns ox >= ow are dropped at the end
    shift, mask, pb, eb, bb, bias = p[C_SHIFT], p[C_MASK], p[C_PTR], p[C_ENT], p[C_BOOK], p[C_BIAS]
    ch, h, w, kh, kw, ph, pw = p[C_CH], p[C_H], p[C_W], p[C_KH], p[C_KW], p[C_PH], p[C_PW]
    oc, oh, ow = p[C_OC], p[C_OH], p[C_OW]
    hp, wp = h + 2 * ph, w + 2 * pw
    if ph or pw:
        x = np.zeros(ch * hp * wp, dtype=np.float32)
        for c in range(ch):
            for y in range(h):
                row, at = (c * hp + y + ph) * wp + pw, (c * h + y) * w
                for i in range(w):
                    x[row + i] = src[at + i]
    else:
        x = src
    span = (oh - 1) * wp + ow  # the wide grid up to the last real output
    wide = np.empty(span, dtype=np.float32)
    taps = kh * kw
    for o in range(oc):
        for i in range(span):
            wide[i] = 0.0
        col = -1
        for e in range(eb + ptrs[pb + o], eb + ptrs[pb + o + 1]):
            v = np.int64(ent[e])
            col += (v >> shift) + 1
            wt = books[bb + (v & mask)]
            if wt == 0:  # a filler entry (or a centroid at exactly 0)
                continue
            c, r = col // taps, col % taps
            at = (c * hp + r // kw) * wp + r % kw
            seg = x[at:at + span]  # a slice, not x[at + i]: only then does LLVM vectorize the loop (measured 5x)
            for i in range(span):
                wide[i] += wt * seg[i]
        b = fvals[bias + o] if bias >= 0 else np.float32(0.0)
        relu = p[C_RELU]
        for oy in range(oh):
            for ox in range(ow):
                y = wide[oy * wp + ox] + b
                dst[(o * oh + oy) * ow + ox] = max(y, np.float32(0.0)) if relu else y

@_jit
def _conv_strided(p, ptrs, ent, books, fvals, src, dst):
    shift, mask, pb, eb, bb, bias = p[C_SHIFT], p[C_MASK], p[C_PTR], p[C_ENT], p[C_BOOK], p[C_BIAS]
    h, w, kh, kw, sh, sw, ph, pw = p[C_H], p[C_W], p[C_KH], p[C_KW], p[C_SH], p[C_SW], p[C_PH], p[C_PW]
    oc, oh, ow = p[C_OC], p[C_OH], p[C_OW]
    plane, taps = oh * ow, kh * kw
    for o in range(oc):
        out0 = o * plane
        b = fvals[bias + o] if bias >= 0 else np.float32(0.0)
        for i in range(plane):
            dst[out0 + i] = b
        col = -1
        for e in range(eb + ptrs[pb + o], eb + ptrs[pb + o + 1]):
            v = np.int64(ent[e])
            col += (v >> shift) + 1
            wt = books[bb + (v & mask)]
            if wt == 0:
                continue
            c, r = col // taps, col % taps
            ky, kx = r // kw, r % kw
            # output columns whose input column ix = ox * sw - pw + kx lies inside [0, w)
            ox0 = 0 if pw - kx <= 0 else (pw - kx + sw - 1) // sw
            last = w - 1 + pw - kx
            ox1 = 0 if last < 0 else min(ow, last // sw + 1)
            for oy in range(oh):
                iy = oy * sh - ph + ky
                if iy < 0 or iy >= h:
                    continue
                src0 = c * h * w + iy * w - pw + kx
                dst0 = out0 + oy * ow
                for ox in range(ox0, ox1):
                    dst[dst0 + ox] += wt * src[src0 + ox * sw]
        if p[C_RELU]:
            for i in range(plane):
                dst[out0 + i] = max(dst[out0 + i], np.float32(0.0))

@_jit
def _conv(p, ptrs, ent, books, fvals, src, dst):
    if p[C_SH] == 1 and p[C_SW] == 1:
        _conv_wide(p, ptrs, ent, books, fvals, src, dst)
    else:
        _conv_strided(p, ptrs, ent, books, fvals, src, dst)

@_jit
def _maxpool(p, src, dst):
    h, w, kh, kw, sh, sw, ph, pw = p[C_H], p[C_W], p[C_KH], p[C_KW], p[C_SH], p[C_SW], p[C_PH], p[C_PW]
    oh, ow = p[C_OH], p[C_OW]
    for c in range(p[C_CH]):
        for oy in range(oh):
            for ox in range(ow):
                # the window clipped to the input (never empty: torch allows padding up to half the kernel); its
                # first element starts the max, not -inf, as fastmath lets LLVM assume there are no infinities
                y0, x0 = max(0, oy * sh - ph), max(0, ox * sw - pw)
                y1, x1 = min(h, oy * sh - ph + kh), min(w, ox * sw - pw + kw)
                m = src[(c * h + y0) * w + x0]
                for iy in range(y0, y1):
                    row = (c * h + iy) * w
                    for ix in range(x0, x1):
                        m = max(m, src[row + ix])
                dst[(c * oh + oy) * ow + ox] = m
        if p[C_RELU]:
            for i in range(c * oh * ow, (c + 1) * oh * ow):
                dst[i] = max(dst[i], np.float32(0.0))


@_jit
def _run(prog, ptrs, ent8, ent16, books, fvals, x, scratch):
    # x: [N, in] float32 -> [N, out] float32; scratch: the largest intermediate activation
    last = prog.shape[0] - 1
    out = np.empty((x.shape[0], prog[last, C_OUT]), dtype=np.float32)
    a = np.empty(scratch, dtype=np.float32)
    b = np.empty(scratch, dtype=np.float32)
    for n in range(x.shape[0]):
        src = x[n]
        for i in range(prog.shape[0]):
            p = prog[i]
            dst = out[n] if i == last else (a if i % 2 == 0 else b)
            op = p[C_OP]
            if op == OP_LINEAR:
                if p[C_WIDE]:
                    _linear(p, ptrs, ent16, books, fvals, src, dst)
                else:
                    _linear(p, ptrs, ent8, books, fvals, src, dst)
            elif op == OP_CONV:
                if p[C_WIDE]:
                    _conv(p, ptrs, ent16, books, fvals, src, dst)
                else:
                    _conv(p, ptrs, ent8, books, fvals, src, dst)
            elif op == OP_MAXPOOL:
                _maxpool(p, src, dst)
            else:
                for j in range(p[C_OUT]):
                    dst[j] = max(src[j], np.float32(0.0))
            src = dst
    return out


def _interpreter():
    """The compiled interpreter ``run(prog, ptrs, ent8, ent16, books, fvals, x, scratch) -> out``."""
    return _run


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _passes(module: nn.Module, shape: tuple[int, ...]) -> bool:
    """Whether ``module`` returns its input unchanged (as a flat per-image array) for per-image ``shape``."""
    from slimkit.models.classic import FitSize

    if isinstance(module, (nn.Identity, nn.Dropout)):
        return not module.training
    if isinstance(module, nn.Flatten):
        return module.start_dim == 1 and module.end_dim == -1
    if isinstance(module, FitSize):
        return len(shape) == 3 and shape[1] == shape[2] == module.size
    return False


class FusedChain(nn.Module):
    """A straight chain of layers run as one numba call (see the module doc); ``steps`` are the layers themselves.

    ``steps``: ``(callable, name)`` pairs in order, each taking the previous output as its one
    argument (modules, ``F.relu``, ``torch.flatten(x, 1)``). The sparse layers among them keep
    working on their own (their matrices become views of the chain's arrays).
    """

    def __init__(self, steps: list[tuple[object, str]]) -> None:
        super().__init__()
        self._steps = steps  # not registered: the layers stay where the model had them
        self.names = [name for _, name in steps]
        self._pack(self._matrices())
        biases = [m.bias for m, _ in steps if isinstance(m, (SharedSparseLinear, SharedSparseConv2d))
                  and m.bias is not None]
        self.fvals = np.concatenate([b.detach().numpy().astype(np.float32) for b in biases]) if biases else \
            np.zeros(1, dtype=np.float32)
        self._programs: dict[tuple, tuple[np.ndarray, int, tuple[int, ...]] | None] = {}

    def _matrices(self) -> list[SharedSparseMatrix]:
        return [m.matrix for m, _ in self._steps if isinstance(m, (SharedSparseLinear, SharedSparseConv2d))]

    def __setstate__(self, state: dict) -> None:
        # copy.deepcopy and pickle come through here: the copied layers' matrices got arrays of their own, so
        # pack them again (else every weight would be held twice)
        super().__setstate__(state)
        self._pack(self._matrices())

    def _pack(self, matrices: list[SharedSparseMatrix]) -> None:
        """Concatenate the chain's entries (per width), pointers and codebooks; the matrices keep views of them."""
        def pack(arrays, dtype):
            whole = np.concatenate(arrays).astype(dtype, copy=False) if arrays else np.zeros(1, dtype=dtype)
            offsets = np.concatenate(([0], np.cumsum([a.size for a in arrays]))).astype(np.int64)
            return whole, offsets

        self.ptrs, ptr_at = pack([m.ptr for m in matrices], np.int32)
        self.books, book_at = pack([m.codebook for m in matrices], np.float32)
        narrow = [m for m in matrices if m.entries.dtype == np.uint8]
        wide = [m for m in matrices if m.entries.dtype == np.uint16]
        self.ent8, e8_at = pack([m.entries for m in narrow], np.uint8)
        self.ent16, e16_at = pack([m.entries for m in wide], np.uint16)
        self._where: dict[int, tuple[int, int, int, int]] = {}
        for i, m in enumerate(matrices):
            group, at = (wide, e16_at) if m.entries.dtype == np.uint16 else (narrow, e8_at)
            j = next(k for k, g in enumerate(group) if g is m)
            whole = self.ent16 if group is wide else self.ent8
            m.entries = whole[at[j]:at[j + 1]]
            m.ptr = self.ptrs[ptr_at[i]:ptr_at[i + 1]]
            m.codebook = self.books[book_at[i]:book_at[i + 1]]
            self._where[id(m)] = (int(ptr_at[i]), int(group is wide), int(at[j]), int(book_at[i]))

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays this chain owns (the layers' matrices are views of them; biases are copies)."""
        return int(self.ptrs.nbytes + self.books.nbytes + self.ent8.nbytes + self.ent16.nbytes + self.fvals.nbytes)

    def _program(self, shape: tuple[int, ...]):
        """(operation table, scratch size, output shape) for per-image input ``shape``; None if it cannot run."""
        rows: list[np.ndarray] = []
        bias_at = 0
        scratch = 1
        for step, _ in self._steps:
            p = np.zeros(WIDTH, dtype=np.int64)
            size = int(np.prod(shape))
            if isinstance(step, nn.Module) and _passes(step, shape):
                shape = (size,) if isinstance(step, nn.Flatten) else shape
                continue
            if step is _flatten:
                shape = (size,)
                continue
            if isinstance(step, (SharedSparseLinear, SharedSparseConv2d)):
                m = step.matrix
                if m.order != "csr":
                    return None
                ptr_at, wide, ent_at, book_at = self._where[id(m)]
                p[[C_PTR, C_WIDE, C_ENT, C_BOOK, C_SHIFT, C_MASK]] = ptr_at, wide, ent_at, book_at, m.index_bits, m.mask
                p[C_BIAS] = -1 if step.bias is None else bias_at
                bias_at += 0 if step.bias is None else m.shape[0]
                if isinstance(step, SharedSparseLinear):
                    if len(shape) != 1 or shape[0] != m.shape[1]:
                        return None
                    p[[C_OP, C_IN, C_OUT]] = OP_LINEAR, size, m.shape[0]
                    shape = (m.shape[0],)
                else:
                    (kh, kw), (sh, sw), (ph, pw) = step.kernel_size, step.stride, step.padding
                    if len(shape) != 3 or shape[0] != step.in_channels:
                        return None
                    c, h, w = shape
                    oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
                    if oh < 1 or ow < 1:
                        return None
                    p[[C_OP, C_IN, C_CH, C_H, C_W, C_KH, C_KW, C_SH, C_SW, C_PH, C_PW, C_OC, C_OH, C_OW]] = (
                        OP_CONV, size, c, h, w, kh, kw, sh, sw, ph, pw, step.out_channels, oh, ow)
                    shape = (step.out_channels, oh, ow)
                    p[C_OUT] = int(np.prod(shape))
            elif isinstance(step, nn.MaxPool2d):
                if len(shape) != 3:
                    return None
                c, h, w = shape
                (kh, kw), (sh, sw), (ph, pw) = _pair(step.kernel_size), _pair(step.stride), _pair(step.padding)
                oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
                if oh < 1 or ow < 1:
                    return None
                p[[C_OP, C_IN, C_CH, C_H, C_W, C_KH, C_KW, C_SH, C_SW, C_PH, C_PW, C_OH, C_OW]] = (
                    OP_MAXPOOL, size, c, h, w, kh, kw, sh, sw, ph, pw, oh, ow)
                shape = (c, oh, ow)
                p[C_OUT] = int(np.prod(shape))
            elif isinstance(step, nn.ReLU) or step is _relu:
                if rows and rows[-1][C_OP] in (OP_LINEAR, OP_CONV, OP_MAXPOOL):
                    rows[-1][C_RELU] = 1
                    continue
                p[[C_OP, C_IN, C_OUT]] = OP_RELU, size, size
            else:
                return None
            rows.append(p)
            scratch = max(scratch, int(p[C_OUT]))
        if not rows:
            return None
        return np.stack(rows), scratch, shape

    def _eager(self, x: torch.Tensor) -> torch.Tensor:
        for step, _ in self._steps:
            x = step(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_chain(self, x)

    def extra_repr(self) -> str:
        return " -> ".join(self.names)


_MISSING = object()


def run_chain(chain: FusedChain, x: torch.Tensor) -> torch.Tensor:
    """``chain(x)``: the program for ``x``'s per-image shape (built on first sight), one interpreter call."""
    key = (x.shape[1:], chain.training)
    found = chain._programs.get(key, _MISSING)
    if found is _MISSING:
        found = chain._programs[key] = chain._program(tuple(key[0])) if x.dim() >= 2 else None
    if found is None or x.dtype != torch.float32 or x.requires_grad or not x.is_cpu:
        return chain._eager(x)
    prog, scratch, shape = found
    n = x.shape[0]
    out = torch.from_numpy(_interpreter()(prog, chain.ptrs, chain.ent8, chain.ent16, chain.books, chain.fvals,
                                          x.contiguous().numpy().reshape(n, -1), scratch))
    return out if len(shape) == 1 else out.view(n, *shape)


def _relu(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x)


def _flatten(x: torch.Tensor) -> torch.Tensor:
    return torch.flatten(x, 1)


class _LeafTracer(fx.Tracer):
    """Every module but the containers is one node: a custom block is run as it is, never traced into."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return not isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict))


_CHAIN_MODULES = (SharedSparseLinear, SharedSparseConv2d, nn.MaxPool2d, nn.ReLU, nn.Flatten, nn.Identity, nn.Dropout)


def _step(node: fx.Node, modules: dict[str, nn.Module]):
    """The one-argument callable a graph node computes, if a chain can hold it (else None)."""
    from slimkit.models.classic import FitSize

    if node.op == "call_module":
        m = modules[node.target]
        ok = isinstance(m, _CHAIN_MODULES + (FitSize,)) and len(node.args) == 1 and not node.kwargs
        if isinstance(m, nn.MaxPool2d):
            ok = ok and _pair(m.dilation) == (1, 1) and not m.ceil_mode and not m.return_indices
        return m if ok else None
    rest = node.args[1:]
    kwargs = {k: v for k, v in node.kwargs.items() if k != "inplace"}
    if node.op == "call_function" and node.target in (F.relu, torch.relu) and not rest and not kwargs:
        return _relu
    if node.op == "call_method" and node.target in ("relu", "relu_") and not rest and not kwargs:
        return _relu
    flat_args = (rest, kwargs) in (((1,), {}), ((), {"start_dim": 1}))
    if node.op == "call_function" and node.target is torch.flatten and flat_args:
        return _flatten
    if node.op == "call_method" and node.target == "flatten" and flat_args:
        return _flatten
    return None


class _FusedForward:
    """A model's ``forward`` as the fused graph computes it; set on the instance, so the model keeps its class.

    The generated function reads ``self.<layer>`` / ``self.fused_<i>`` of the model itself.
    A copy (``copy.deepcopy``) stays fused; a pickled model compiles the graph again on its
    first call.
    """

    def __init__(self, model: nn.Module, graph: fx.Graph) -> None:
        self.model, self.graph = model, graph
        self._fn = None
        nodes = list(graph.nodes)
        # the whole model one chain (input -> chain -> output): call it without the graph's code around it
        whole = [n.op for n in nodes] == ["placeholder", "call_module", "output"] and nodes[1].args == (nodes[0],) \
            and nodes[2].args == (nodes[1],)
        self.chain = model.get_submodule(nodes[1].target) if whole else None

    def __call__(self, *args, **kwargs):
        if self.chain is not None and len(args) == 1 and not kwargs and not self.chain._forward_hooks \
                and not self.chain._forward_pre_hooks:
            return run_chain(self.chain, args[0])
        if self._fn is None:
            self._fn = type(fx.GraphModule(self.model, self.graph)).forward
        return self._fn(self.model, *args, **kwargs)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fn": None}


def fuse_(model: nn.Module) -> list[list[str]]:
    """Run each maximal straight chain of ``model`` that holds a compressed layer as one :class:`FusedChain`, in place.

    The model keeps its class, its layers (under their own names; they still work alone) and
    its state dict; each chain is added as a child ``fused_<i>`` and the instance's
    ``forward`` becomes the traced graph with the chains replaced. Returns the node names of
    each fused chain; ``[]`` (model untouched) when the model cannot be traced or has no chain.
    """
    try:
        graph = _LeafTracer().trace(model)
    except Exception:  # noqa: BLE001 - data-dependent control flow etc.: the model runs layer by layer
        return []
    modules = dict(model.named_modules())
    chains: list[list[fx.Node]] = []
    current: list[fx.Node] = []
    for node in graph.nodes:
        step = _step(node, modules) if node.op in ("call_module", "call_function", "call_method") else None
        follows = bool(current) and node.args and node.args[0] is current[-1] and len(current[-1].users) == 1
        if step is not None and (follows or not current):
            current.append(node)
            continue
        chains.append(current)
        current = [node] if step is not None else []
    chains.append(current)
    compressed = (SharedSparseLinear, SharedSparseConv2d)
    chains = [c for c in chains if any(n.op == "call_module" and isinstance(modules[n.target], compressed)
                                       for n in c)]
    names = [[n.target if n.op == "call_module" else n.name for n in c] for c in chains]
    for chain in chains:
        steps = [(_step(n, modules), n.target if n.op == "call_module" else n.name) for n in chain]
        name = next(f"fused_{i}" for i in range(len(modules) + 1) if not hasattr(model, f"fused_{i}"))
        model.add_module(name, FusedChain(steps).train(model.training))
        with graph.inserting_after(chain[-1]):
            new = graph.call_module(name, (chain[0].args[0],))
        chain[-1].replace_all_uses_with(new)
        for n in reversed(chain):
            graph.erase_node(n)
    if chains:
        graph.lint()
        model.forward = _FusedForward(model, graph)
        model.forward._fn = type(fx.GraphModule(model, graph)).forward
    return names


__all__ = ["FusedChain", "fuse_", "run_chain"]
