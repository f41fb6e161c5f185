"""polcore.train: configs, profiles, held-out splits and a tiny training run on the real pattern library."""

from __future__ import annotations

import json

import numpy as np
import pytest

from polcore.models import FAMILIES, FAMILY_HEADS, load_checkpoint
from polcore.simulate import DEFAULT_LIBRARY
from polcore.train import (
    PROFILES,
    TrainConfig,
    TrainResult,
    checkpoint_path,
    prepare_split,
    profile_configs,
    train_model,
    train_profile,
)

needs_library = pytest.mark.skipif(not DEFAULT_LIBRARY.is_file(), reason=f"no pattern library at {DEFAULT_LIBRARY}")


@pytest.fixture(scope="module")
def library():
    from polcore.simulate import load_library

    return load_library()


def test_train_config_validates_and_round_trips():
    with pytest.raises(ValueError, match="custom_cnn, resnet, vgg, pca_knn"):
        TrainConfig(family="lenet")
    with pytest.raises(ValueError, match="no head 'proto'"):
        TrainConfig(family="pca_knn", head="proto")
    with pytest.raises(ValueError, match="unknown TrainConfig fields"):
        TrainConfig.from_dict({"family": "resnet", "learning_rate": 1.0})
    c = TrainConfig(family="resnet", head="proto", seed=5, train_thickness_nm=20.0)
    assert c.train_thickness_nm == (20.0,)
    assert c.name == "resnet-resnet18-proto-s5"
    d = json.loads(json.dumps(c.to_dict()))
    assert TrainConfig.from_dict(d) == c
    assert c.lr == 2e-4 and c.weight_decay == 1e-4 and c.batch_size == 128


def test_profiles():
    with pytest.raises(ValueError, match="quick, paper"):
        profile_configs("huge")
    quick = PROFILES["quick"]
    pairs = {(c.family, c.head) for c in quick}
    # every family with cls and proto, the custom CNN also with reg, PCA+kNN with cls
    assert {(f, h) for f in FAMILIES for h in FAMILY_HEADS[f] if h != "reg"} <= pairs
    assert ("custom_cnn", "reg") in pairs and pairs <= {(f, h) for f in FAMILIES for h in FAMILY_HEADS[f]}
    assert len({c.seed for c in quick}) == 1
    paper = PROFILES["paper"]
    assert {c.seed for c in paper} == {888, 1212, 3000, 5000, 7000}
    assert {c.arch for c in paper if c.family in ("resnet", "vgg")} == {"resnet50", "vgg16_bn"}
    assert all(c.epochs == 20 and c.patience == 5 and c.lr == 2e-4 and c.batch_size == 128 for c in paper
               if c.family != "pca_knn")
    assert len(paper) == 5 * (3 * 3 + 1)
    for prof in (quick, paper):
        assert len({c.name for c in prof}) == len(prof)  # one checkpoint per run


@needs_library
def test_splits_are_independent_configurations(library):
    from polcore.train import _library_preprocessor

    pre = _library_preprocessor(library)
    _, _, itr = prepare_split(library, "train", 20.0, pre)
    Xv, yv, iv = prepare_split(library, "val", 20.0, pre)
    _, _, ite = prepare_split(library, "test", 20.0, pre)
    assert set(iv["role"]) == {"val"} and set(ite["role"]) == {"test"}
    assert not (set(itr["config"]) & set(iv["config"])) and not (set(itr["config"]) & set(ite["config"]))
    assert Xv.shape[1:] == (64, 64) and Xv.min() >= 0 and Xv.max() <= 1 and set(yv) == set(range(8))
    Xf, _, inf = prepare_split(library, "train", 20.0, pre, com_filter=True)
    assert 0.2 * len(itr) < len(inf) < 0.8 * len(itr)


@needs_library
@pytest.mark.slow  # about 60-70 s on an idle 2-core CPU (3-4 min while the machine is shared)
def test_tiny_training_run_beats_chance_on_held_out_configs(library, tmp_path):
    """custom_cnn cls on 3840 of the 20 nm training patterns, scored on the 'test' configurations.

    A few hundred patterns are not enough on this library: every (probe position, variant) pair then has about
    one example and even PCA + kNN stays near 0.2-0.26 on held-out configurations.
    """
    cfg = TrainConfig(family="custom_cnn", head="cls", seed=888, epochs=4, patience=None, augment=False,
                      lr=1e-3, batch_size=64, train_thickness_nm=(20.0,), max_train_patterns=3840,
                      eval_thickness_nm=(20.0,))
    model, res = train_model(cfg, library, out_dir=tmp_path)
    assert isinstance(res, TrainResult) and res.n_train == 3840 and res.n_val == 768
    assert res.test_acc > 0.3, f"held-out accuracy {res.test_acc:.3f} (chance 0.125)"
    # checkpoint with full metadata, loadable, same predictions
    path = checkpoint_path(cfg, tmp_path)
    assert path.is_file() and path.with_suffix(".json").is_file()
    m2 = load_checkpoint(path, device="cpu")
    meta = m2.meta
    assert meta["library_sha256"] == library.sha256 and meta["train_config"]["seed"] == 888
    assert meta["preprocessing"]["target_mrad_per_px"] == pytest.approx(library.meta["mrad_per_px"])
    from polcore.train import _library_preprocessor

    Xt, _, _ = prepare_split(library, "test", 20.0, _library_preprocessor(library))
    np.testing.assert_allclose(model.predict_proba(Xt[:50]), m2.predict_proba(Xt[:50]), rtol=1e-5, atol=1e-6)


@needs_library
def test_train_profile_is_idempotent(library, tmp_path):
    only = lambda c: c.family == "pca_knn"  # noqa: E731 - seconds to train
    first = train_profile("quick", library, tmp_path, only=only)
    # PCA + kNN on real library patterns beats chance (0.125) clearly on held-out configurations
    assert len(first) == 1 and not first[0].skipped and first[0].test_acc > 0.3
    calls = []
    second = train_profile("quick", library, tmp_path, only=only, progress=lambda f, m: calls.append((f, m)))
    assert len(second) == 1 and second[0].skipped
    assert second[0].test_acc == pytest.approx(first[0].test_acc)
    assert calls and calls[-1][0] == pytest.approx(1.0)
