"""The checkpoints shipped in data/models/shipped: what `train --profile cpu` trains, with full provenance, small,
and reading polarization on independent simulations (the committed library, another recipe)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from polcore.ingest import checkpoints
from polcore.models import load_checkpoint, read_checkpoint_meta
from polcore.settings import shipped_models_dir
from polcore.simulate.draws import DRAW_PROFILES
from polcore.train import TrainConfig, profile_configs


@pytest.fixture(scope="module")
def shipped():
    paths = checkpoints(shipped_models_dir())
    if not paths:
        pytest.fail(f"no shipped checkpoints in {shipped_models_dir()}")
    return paths


def test_shipped_metadata_is_what_the_cpu_profile_trains(shipped):
    cfgs = {c.name: c for c in profile_configs("cpu")}
    recipe = json.loads(DRAW_PROFILES["train"].to_json())
    for p in shipped:
        meta = read_checkpoint_meta(p)
        cfg = TrainConfig.from_dict(meta["train_config"])
        assert cfg.name in cfgs and cfg == cfgs[cfg.name], f"{p.name} was not trained by the cpu profile"
        assert meta["library_kind"] == "draws" and re.fullmatch(r"[0-9a-f]{64}", meta["library_sha256"])
        assert meta["library_recipe"] == recipe
        assert meta["heldout"] and {"torch", "numpy", "polcore"} <= set(meta["versions"])
        assert meta["steps_run"] >= 1 and meta["train_seconds"] > 0
    total = sum(p.stat().st_size for p in shipped) / 1e6
    assert total < 40, f"shipped checkpoints take {total:.1f} MB"


def test_shipped_models_read_polarization_of_independent_simulations(shipped, default_library):
    """The committed library's held-out configurations at 20 nm (2 phonon snapshots, its own nuisance draws) at
    2e4 electrons per pattern: the shipped CNN reads the polarization of every cell (64 positions pooled)."""
    from polcore.analysis import pool_scan
    from polcore.preprocess import minmax
    from polcore.simulate.microscope import apply_dose

    X, y, info = default_library.select("test", 20.0)
    counts = apply_dose(X, 2e4, np.random.default_rng(0))
    best = [p for p in shipped if p.name.startswith("custom_cnn-binned-cls-s888.")]
    assert best, "the binned custom CNN is not shipped"
    model = load_checkpoint(best[0], device="cpu")
    probs = model.predict_proba(minmax(counts))
    per_pattern = float(np.mean(probs.argmax(1) == y))
    n = 8  # probe positions per cell side
    cells = probs.reshape(-1, n, n, 8)
    cell_y = y.reshape(-1, n * n)[:, 0]
    cell_pred = np.array([pool_scan(c, n)["cell_pred"][0, 0] for c in cells])
    per_cell = float(np.mean(cell_pred == cell_y))
    assert per_pattern > 0.7 and per_cell >= 0.95, (per_pattern, per_cell)  # measured 0.82 and 1.0
