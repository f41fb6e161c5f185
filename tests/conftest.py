"""Shared fixtures. Tests build their own small data in tmp dirs; real-file tests read ../shared/realdata."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
REALDATA = ROOT.parent / "shared" / "realdata"


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(scope="session")
def realdata() -> Path:
    if not REALDATA.is_dir():
        pytest.skip(f"real detector files not found at {REALDATA}")
    return REALDATA


@pytest.fixture(scope="session")
def tiny_library(tmp_path_factory):
    """A real abTEM library of the 'tiny' profile (seconds to simulate)."""
    pytest.importorskip("abtem")
    from polcore.simulate import build_library, load_library

    path = build_library("tiny", tmp_path_factory.mktemp("lib") / "knn_tiny.h5")
    return load_library(path)


@pytest.fixture(scope="session")
def default_library():
    """The committed default library (data/library/knn_default.h5)."""
    from polcore.simulate import DEFAULT_LIBRARY, load_library

    if not DEFAULT_LIBRARY.exists():
        pytest.fail(f"the committed default library is missing: {DEFAULT_LIBRARY}")
    return load_library(DEFAULT_LIBRARY)


@pytest.fixture(scope="session")
def tiny_draws(tmp_path_factory):
    """A real abTEM draw library of the 'tiny' profile (about 10 s to simulate)."""
    pytest.importorskip("abtem")
    from polcore.simulate.draws import build_draws, load_draws

    out = tmp_path_factory.mktemp("draws") / "tiny"
    build_draws("tiny", out)
    return load_draws(out)
