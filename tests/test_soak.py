"""A short adapter-churn soak (``benchmarks/soak_churn.py`` runs the long one): every call checked against an
unpatched PEFT twin, and no memory held beyond the live adapters and their packing."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from helpers import interpreted

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from soak_churn import soak  # noqa: E402


@pytest.mark.parametrize(
    "backend,calls", [("torch", 100), pytest.param("triton", 6, marks=interpreted)], ids=["torch", "triton"]
)
def test_churn_soak(backend, calls):
    report = soak(calls, backend=backend, generate_every=4, seed=calls)  # raises on any stale call
    assert sum(report["operations"].values()) == calls
    if calls >= 50:  # long enough that every kind of change happened
        assert min(report["operations"].values()) > 0, report["operations"]
    assert report["end"]["bank_bytes"] == report["fresh_bank_bytes"], "the bank holds stale packings"
    # Plan buffers grow geometrically with the largest batch seen; anything beyond a few kB is a leak.
    assert abs(report["unexplained_growth_bytes"]) < 16 * 1024, report
