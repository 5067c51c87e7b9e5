"""slimkit.decompose.ranks: fraction, energy and VBMF rank selection."""

from __future__ import annotations

import pytest
import torch

from slimkit.decompose.ranks import energy_rank, fraction_rank, unfold, vbmf_rank


@pytest.mark.parametrize(("full", "fraction", "expected"), [(64, 0.25, 16), (64, 1.0, 64), (3, 0.1, 1), (10, 0.55, 6)])
def test_fraction_rank(full, fraction, expected):
    assert fraction_rank(full, fraction) == expected


def test_energy_rank():
    s = torch.tensor([4.0, 2.0, 1.0, 1.0, 0.0])  # energies 16, 4, 1, 1 of 22
    assert energy_rank(s, 16 / 22) == 1
    assert energy_rank(s, 16 / 22 + 1e-6) == 2
    assert energy_rank(s, 1.0) == 4  # the zero singular value is never needed
    assert energy_rank(torch.zeros(3), 0.9) == 1


@pytest.mark.parametrize("shape", [(60, 80), (80, 60), (32, 288), (200, 40)])
@pytest.mark.parametrize("rank", [1, 3, 8])
def test_vbmf_finds_the_planted_rank(shape, rank):
    g = torch.Generator().manual_seed(rank)
    rows, cols = shape
    signal = torch.randn(rows, rank, generator=g) @ torch.randn(rank, cols, generator=g)
    noise = torch.randn(rows, cols, generator=g) * 0.05
    assert vbmf_rank(signal + noise) == rank


def test_vbmf_on_noise_keeps_little():
    noise = torch.randn(64, 96, generator=torch.Generator().manual_seed(0))
    assert vbmf_rank(noise) <= 2
    assert vbmf_rank(torch.zeros(5, 7)) == 1


def test_unfold():
    w = torch.arange(2 * 3 * 4 * 5.0).reshape(2, 3, 4, 5)
    assert unfold(w, 0).shape == (2, 60) and unfold(w, 1).shape == (3, 40)
    assert torch.equal(unfold(w, 1)[1], w[:, 1].reshape(-1))
