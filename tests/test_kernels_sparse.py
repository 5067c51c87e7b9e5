"""Sparse shared-weight kernels: CSR/CSC matrices of b-bit indices + codebook equal F.linear / F.conv2d."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from slimkit.kernels.sparse import SharedSparseMatrix, sparse_conv2d, sparse_linear


def _shared(shape, k, density, seed):
    """(positions, symbols, codebook, dense weight) of a random pruned + shared tensor."""
    rng = np.random.default_rng(seed)
    codebook = rng.standard_normal(k).astype(np.float32)
    index = np.where(rng.random(shape) < density, rng.integers(0, k, shape), -1)
    dense = np.where(index >= 0, codebook[np.clip(index, 0, None)], 0).astype(np.float32)
    flat = index.reshape(shape[0], -1).ravel()
    positions = np.flatnonzero(flat >= 0)
    return positions, flat[positions] + 1, codebook, torch.from_numpy(dense)


def _rel(out, ref):
    return float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


@pytest.mark.parametrize("order", ["csr", "csc"])
@pytest.mark.parametrize("rows,cols,k,density,batch", [
    (7, 13, 4, 0.3, 1), (31, 97, 64, 0.06, 3), (5, 2001, 2, 0.01, 1), (50, 499, 256, 0.1, 4), (1, 1, 1, 1.0, 2)])
def test_linear_matches_f_linear(order, rows, cols, k, density, batch):
    positions, symbols, codebook, dense = _shared((rows, cols), k, density, rows + cols)
    matrix = SharedSparseMatrix((rows, cols), positions, symbols, codebook, order)
    assert matrix.nonzeros == positions.size
    np.testing.assert_array_equal(matrix.to_dense(), dense.numpy())
    x, bias = torch.randn(batch, cols), torch.randn(rows)
    assert _rel(sparse_linear(x, matrix, bias), F.linear(x, dense, bias)) <= 1e-4
    relu_x = torch.relu(x)  # CSC skips the zero inputs
    assert _rel(sparse_linear(relu_x, matrix), F.linear(relu_x, dense)) <= 1e-4


@pytest.mark.parametrize("n,c,o,h,w,k,stride,padding", [
    (1, 1, 5, 9, 9, 5, 1, 0), (2, 7, 9, 11, 13, 3, 1, 1), (3, 5, 6, 8, 10, 3, 2, 2), (4, 3, 17, 7, 7, 1, 1, 0)])
def test_conv_matches_f_conv2d(n, c, o, h, w, k, stride, padding):
    positions, symbols, codebook, dense = _shared((o, c, k, k), 16, 0.3, o * c)
    matrix = SharedSparseMatrix((o, c * k * k), positions, symbols, codebook)
    x, bias = torch.randn(n, c, h, w), torch.randn(o)
    out = sparse_conv2d(x, matrix, (k, k), bias, (stride, stride), (padding, padding))
    assert _rel(out, F.conv2d(x, dense, bias, stride=stride, padding=padding)) <= 1e-4


def test_long_gaps_are_bridged_by_fillers_and_bytes_are_counted_exactly():
    # non-zeros 70 apart: 8-bit entries have 6-bit gaps (at most 63), so each needs one filler;
    # 2 bytes per non-zero either way, and the 8-bit layout wins the tie
    positions = np.arange(40) * 70 + 69
    matrix = SharedSparseMatrix((1, 2800), positions, np.arange(40) % 3 + 1, np.array([0.5, -2.0, 3.0]))
    assert matrix.index_bits == 2 and matrix.entries.dtype == np.uint8
    assert matrix.entries.size == 80  # 40 fillers were inserted
    dense = matrix.to_dense()
    np.testing.assert_array_equal(np.flatnonzero(dense[0]), positions)
    np.testing.assert_array_equal(dense[0, positions], np.array([0.5, -2.0, 3.0])[np.arange(40) % 3])
    assert matrix.nbytes == matrix.entries.nbytes + matrix.ptr.nbytes + matrix.codebook.nbytes


def test_wide_codebooks_use_16_bit_entries():
    positions, symbols, codebook, _ = _shared((8, 40), 200, 0.5, 3)
    assert SharedSparseMatrix((8, 40), positions, symbols, codebook).entries.dtype == np.uint16


def test_bad_inputs_raise():
    matrix = SharedSparseMatrix((2, 3), np.array([0]), np.array([1]), np.array([1.0]))
    with pytest.raises(ValueError, match=r"input must be \[N, 3\]"):
        sparse_linear(torch.randn(1, 4), matrix)
    with pytest.raises(ValueError, match="symbols must be 1..1"):
        SharedSparseMatrix((2, 3), np.array([0]), np.array([2]), np.array([1.0]))
    with pytest.raises(ValueError, match="order must be"):
        SharedSparseMatrix((2, 3), np.array([0]), np.array([1]), np.array([1.0]), order="coo")
