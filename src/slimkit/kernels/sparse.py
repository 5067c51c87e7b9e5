"""Sparse, weight-shared kernels that compute from b-bit cluster indices and a codebook (Han et al. 2016, EIE).

A pruned, k-means-shared weight matrix ``W [rows, cols]`` is kept as it is stored in a
``.slim`` file, never as dense floats: per row (CSR) or per column (CSC) a run of *entries*,
each one integer ``(gap << index_bits) | symbol``, where ``symbol`` is ``0`` for a filler and
``1 + i`` for centroid ``i`` and ``gap`` counts the zeros skipped since the previous entry of
the row (relative indexing as in Deep Compression, Fig. 2; a gap too long for its bits is
bridged by filler entries). Entries are 8- or 16-bit, whichever is smaller for the layer;
``ptr [rows + 1]`` (int32) gives each row's first entry, and the codebook holds ``k + 1``
float32 values (``0`` first, so fillers multiply by zero without a branch).

Kernels (numba, ``nogil``):

- CSR ``out[r, :] = sum_e codebook[sym_e] * x[col_e, :]`` over the entries of row ``r``:
  rows split over threads; the inner loop runs over the batch (linear) or over the output
  positions of an im2col matrix (convolution), so it vectorizes for convolutions.
- CSC ``out[row_e, :] += codebook[sym_e] * x[c, :]`` for each column ``c`` whose input is not
  all zero: skips the columns a ReLU zeroed (EIE's activation sparsity); one thread.

Linear ``y = x W^T`` is ``out = W @ x^T``; convolution is sparse im2col-GEMM: ``cols = unfold(x)``
``[C*kh*kw, L]`` per image and ``out [O, L] = W @ cols``.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from torch import nn

from slimkit.kernels._threads import parallel_for

# below this many multiply-adds a call runs on one thread: a pool hand-off costs more than it saves
PARALLEL_WORK = 200_000


@lru_cache(maxsize=1)
def _kernels():
    import numba

    @numba.njit(nogil=True, fastmath=True, boundscheck=False)
    def csr_vector(ptr, entries, shift, mask, codebook, x, bias, out, start, stop):
        # batch 1: x [cols], bias [rows], out [rows]; four accumulators hide the add latency
        for r in range(start, stop):
            col = -1
            a0 = np.float32(0.0)
            a1 = np.float32(0.0)
            a2 = np.float32(0.0)
            a3 = np.float32(0.0)
            e, end = ptr[r], ptr[r + 1]
            while e + 4 <= end:
                v0, v1, v2, v3 = np.int64(entries[e]), np.int64(entries[e + 1]), np.int64(entries[e + 2]), \
                    np.int64(entries[e + 3])
                c0 = col + (v0 >> shift) + 1
                c1 = c0 + (v1 >> shift) + 1
                c2 = c1 + (v2 >> shift) + 1
                col = c2 + (v3 >> shift) + 1
                a0 += codebook[v0 & mask] * x[c0]
                a1 += codebook[v1 & mask] * x[c1]
                a2 += codebook[v2 & mask] * x[c2]
                a3 += codebook[v3 & mask] * x[col]
                e += 4
            while e < end:
                v = np.int64(entries[e])
                col += (v >> shift) + 1
                a0 += codebook[v & mask] * x[col]
                e += 1
            out[r] = bias[r] + ((a0 + a1) + (a2 + a3))

    @numba.njit(nogil=True, fastmath=True, boundscheck=False)
    def csr(ptr, entries, shift, mask, codebook, x, out, start, stop):
        # x: [cols, B]; out: [rows, B] (zeroed); the inner loop over B vectorizes
        nb = x.shape[1]
        for r in range(start, stop):
            col = -1
            dst = out[r]
            for e in range(ptr[r], ptr[r + 1]):
                v = np.int64(entries[e])
                col += (v >> shift) + 1
                c = codebook[v & mask]
                src = x[col]
                for b in range(nb):
                    dst[b] += c * src[b]

    @numba.njit(nogil=True, fastmath=True, boundscheck=False)
    def csc(ptr, entries, shift, mask, codebook, x, out, start, stop):
        # x: [cols, B]; out: [rows, B] (zeroed); columns whose inputs are all zero are skipped
        nb = x.shape[1]
        for j in range(start, stop):
            src = x[j]
            live = False
            for b in range(nb):
                if src[b] != 0:
                    live = True
                    break
            if not live:
                continue
            row = -1
            for e in range(ptr[j], ptr[j + 1]):
                v = np.int64(entries[e])
                row += (v >> shift) + 1
                c = codebook[v & mask]
                dst = out[row]
                for b in range(nb):
                    dst[b] += c * src[b]

    return csr_vector, csr, csc


def _entries(major: np.ndarray, minor: np.ndarray, symbols: np.ndarray, lines: int, index_bits: int,
             width: int) -> tuple[np.ndarray, np.ndarray]:
    """(ptr, entries) of non-zeros at (major, minor) sorted by (major, minor), ``width``-bit entries."""
    gap_bits = width - index_bits
    span = 1 << gap_bits  # positions one entry can advance at most
    first = np.ones(major.size, dtype=bool)
    first[1:] = major[1:] != major[:-1]
    prev = np.where(first, -1, np.concatenate(([0], minor[:-1])))
    skipped = minor - prev - 1
    fillers = skipped // span
    counts = fillers + 1
    total = int(counts.sum())
    entries = np.full(total, (span - 1) << index_bits, dtype=np.int64)  # fillers: max gap, symbol 0
    real_at = np.cumsum(counts) - 1
    entries[real_at] = ((skipped - fillers * span) << index_bits) | symbols
    per_line = np.bincount(major, weights=counts, minlength=lines).astype(np.int64)
    ptr = np.zeros(lines + 1, dtype=np.int32)
    np.cumsum(per_line, out=ptr[1:])
    return ptr, entries.astype(np.uint8 if width == 8 else np.uint16)


class SharedSparseMatrix:
    """A ``[rows, cols]`` matrix of codebook indices, CSR or CSC, 8/16-bit relative-index entries (see module doc).

    Built from the flat row-major ``positions`` of its non-zeros and their ``symbols``
    (``1 + centroid``), e.g. straight from a ``.slim`` SHARED record; ``nbytes`` counts every
    array it keeps.
    """

    def __init__(self, shape: tuple[int, int], positions: np.ndarray, symbols: np.ndarray, codebook: np.ndarray,
                 order: str = "csr") -> None:
        if order not in ("csr", "csc"):
            raise ValueError(f"SharedSparseMatrix: order must be 'csr' or 'csc', got {order!r}")
        rows, cols = int(shape[0]), int(shape[1])
        positions, symbols = np.asarray(positions, dtype=np.int64), np.asarray(symbols, dtype=np.int64)
        if symbols.size and (symbols.min() < 1 or symbols.max() > len(codebook)):
            raise ValueError(f"SharedSparseMatrix: symbols must be 1..{len(codebook)}, "
                             f"got {symbols.min()}..{symbols.max()}")
        self.shape, self.order, self.nonzeros = (rows, cols), order, int(positions.size)
        r, c = positions // cols, positions % cols
        major, minor, lines = (r, c, rows) if order == "csr" else (c, r, cols)
        sort = np.lexsort((minor, major))
        major, minor, symbols = major[sort], minor[sort], symbols[sort]
        self.index_bits = max(1, int(len(codebook)).bit_length())  # symbols 0..k
        best = None
        for width in (8, 16):
            if self.index_bits >= width:
                continue
            ptr, entries = _entries(major, minor, symbols, lines, self.index_bits, width)
            if best is None or entries.nbytes < best[1].nbytes:
                best = (ptr, entries)
        if best is None:
            raise ValueError(f"SharedSparseMatrix: {len(codebook)} centroids need {self.index_bits} bits, at most 15")
        self.ptr, self.entries = best
        self.mask = (1 << self.index_bits) - 1
        self.codebook = np.concatenate(([0.0], np.asarray(codebook, dtype=np.float32))).astype(np.float32)

    @property
    def nbytes(self) -> int:
        """Bytes of every array kept: entries, pointers, codebook."""
        return int(self.entries.nbytes + self.ptr.nbytes + self.codebook.nbytes)

    def matvec(self, x: np.ndarray, bias: np.ndarray, out: np.ndarray | None = None,
               threads: int | None = None) -> np.ndarray:
        """``W @ x + bias`` for float32 ``x [cols]``, ``bias [rows]`` (batch 1): float32 ``[rows]`` (into ``out``)."""
        if self.order == "csc":
            result = self.matmul(x.reshape(-1, 1), threads)[:, 0] + bias
            if out is not None:
                out[:] = result
            return result
        out = np.empty(self.shape[0], dtype=np.float32) if out is None else out
        args = (self.ptr, self.entries, self.index_bits, self.mask, self.codebook, x, bias, out)
        if self.nonzeros < PARALLEL_WORK:  # the common case: no pool hand-off
            _kernels()[0](*args, 0, self.shape[0])
        else:
            parallel_for(_kernels()[0], self.shape[0], *args, threads=threads, min_jobs_per_thread=8)
        return out

    def matmul(self, x: np.ndarray, threads: int | None = None) -> np.ndarray:
        """``W @ x`` for a float32 ``x [cols, B]`` (C-contiguous): float32 ``[rows, B]``."""
        _, csr, csc = _kernels()
        out = np.zeros((self.shape[0], x.shape[1]), dtype=np.float32)
        args = (self.ptr, self.entries, self.index_bits, self.mask, self.codebook, x, out)
        if self.order == "csc":
            csc(*args, 0, self.shape[1])
        else:
            small = self.nonzeros * x.shape[1] < PARALLEL_WORK
            parallel_for(csr, self.shape[0], *args, threads=1 if small else threads, min_jobs_per_thread=8)
        return out

    def to_dense(self) -> np.ndarray:
        """The dense float32 matrix (tests and debugging only)."""
        return self.matmul(np.eye(self.shape[1], dtype=np.float32), threads=1)


def sparse_linear(x: torch.Tensor, matrix: SharedSparseMatrix, bias: torch.Tensor | None = None,
                  threads: int | None = None) -> torch.Tensor:
    """``F.linear(x, W, bias)`` with ``W`` a :class:`SharedSparseMatrix` ``[out, in]``; ``x``: ``[N, in]`` float32."""
    if x.dim() != 2 or x.shape[1] != matrix.shape[1]:
        raise ValueError(f"sparse_linear: input must be [N, {matrix.shape[1]}], got shape {tuple(x.shape)}")
    if x.shape[0] == 1:  # one output tensor, written by the kernel in place
        out = torch.empty(1, matrix.shape[0])
        b = bias.detach().numpy() if bias is not None else np.zeros(matrix.shape[0], dtype=np.float32)
        matrix.matvec(x.detach().contiguous().numpy()[0], b, out.numpy()[0], threads)
        return out
    xt = np.ascontiguousarray(x.detach().numpy().T, dtype=np.float32)  # [in, N]
    out = torch.from_numpy(matrix.matmul(xt, threads)).T
    return out + bias if bias is not None else out


def sparse_conv2d(x: torch.Tensor, matrix: SharedSparseMatrix, kernel: tuple[int, int],
                  bias: torch.Tensor | None = None, stride=(1, 1), padding=(0, 0),
                  threads: int | None = None) -> torch.Tensor:
    """Sparse im2col-GEMM convolution: ``W [O, C*kh*kw]`` (SharedSparseMatrix) over ``x [N, C, H, W]`` float32."""
    import torch.nn.functional as F

    kh, kw = kernel
    if x.dim() != 4 or x.shape[1] * kh * kw != matrix.shape[1]:
        raise ValueError(f"sparse_conv2d: input must be [N, {matrix.shape[1] // (kh * kw)}, H, W], "
                         f"got shape {tuple(x.shape)}")
    n, _, h, w = x.shape
    oh = (h + 2 * padding[0] - kh) // stride[0] + 1
    ow = (w + 2 * padding[1] - kw) // stride[1] + 1
    cols = F.unfold(x, (kh, kw), padding=padding, stride=stride)  # [N, C*kh*kw, L]
    cols = cols[0] if n == 1 else cols.permute(1, 0, 2).reshape(matrix.shape[1], -1)
    out = torch.from_numpy(matrix.matmul(np.ascontiguousarray(cols.detach().numpy()), threads))  # [O, N*L]
    out = out.view(matrix.shape[0], n, oh, ow).permute(1, 0, 2, 3) if n > 1 else out.view(1, -1, oh, ow)
    return out + bias.view(1, -1, 1, 1) if bias is not None else out


class SharedSparseLinear(nn.Module):
    """``y = x W^T + b`` with ``W [out, in]`` kept as b-bit indices + codebook (:class:`SharedSparseMatrix`)."""

    def __init__(self, matrix: SharedSparseMatrix, bias: bool) -> None:
        super().__init__()
        self.matrix = matrix
        self.out_features, self.in_features = matrix.shape
        self.register_buffer("bias", torch.zeros(self.out_features) if bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.matrix
        if x.dim() == 2 and x.shape[0] == 1 and m.order == "csr" and m.nonzeros < PARALLEL_WORK \
                and x.shape[1] == self.in_features and x.dtype == torch.float32:
            # batch 1, the real-time case: one tensor made, the kernel called directly (each Python-level
            # step costs about as much as the kernel on the small layers of these models)
            out = torch.empty(1, self.out_features)
            bias = self.bias.numpy() if self.bias is not None else np.zeros(self.out_features, dtype=np.float32)
            _kernels()[0](m.ptr, m.entries, m.index_bits, m.mask, m.codebook, x.detach().numpy()[0], bias,
                          out.numpy()[0], 0, self.out_features)
            return out
        lead = x.shape[:-1]
        out = sparse_linear(x.reshape(-1, self.in_features).float(), self.matrix, self.bias)
        return out.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        m = self.matrix
        return (f"{self.in_features}, {self.out_features}, {m.order}, nonzeros={m.nonzeros}, "
                f"entries={m.entries.size}x{8 * m.entries.itemsize}bit, bytes={m.nbytes}")


class SharedSparseConv2d(nn.Module):
    """Sparse im2col-GEMM convolution (groups 1) from b-bit indices + codebook, ``W`` viewed as ``[O, C*kh*kw]``."""

    def __init__(self, matrix: SharedSparseMatrix, conv: nn.Conv2d) -> None:
        super().__init__()
        self.matrix = matrix
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.padding = tuple(conv.kernel_size), tuple(conv.stride), tuple(conv.padding)
        self.register_buffer("bias", torch.zeros(conv.out_channels) if conv.bias is not None else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sparse_conv2d(x.float(), self.matrix, self.kernel_size, self.bias, self.stride, self.padding)

    def extra_repr(self) -> str:
        m = self.matrix
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, nonzeros={m.nonzeros}, bytes={m.nbytes}")


COMPRESSED_LAYERS = (SharedSparseLinear, SharedSparseConv2d)
