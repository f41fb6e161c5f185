"""Thickness experts (``polcore.models.experts``): the mixture, its checkpoint, and its build from draws."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from polcore.models import build_model, load_checkpoint, save_checkpoint
from polcore.models.experts import GATE_BIN, ThicknessExperts, band_of, gate_features


def _members():
    return {"general": build_model("custom_cnn", "cls", arch="binned", device="cpu"),
            "expert0": build_model("custom_cnn", "cls", arch="binned", device="cpu")}


def _gate(intercept, d=512):
    n = len(intercept)
    return {"mean": np.zeros(d + GATE_BIN**2, np.float32), "scale": np.ones(d + GATE_BIN**2, np.float32),
            "coef": np.zeros((n, d + GATE_BIN**2), np.float32), "intercept": np.asarray(intercept, np.float32)}


BANDS = [dict(name="thin", lo_nm=0.0, hi_nm=7.5, member="expert0"),
         dict(name=">= 7.5 nm", lo_nm=7.5, hi_nm=1e6, member="general")]


def test_mixture_follows_the_gate_and_survives_a_checkpoint(tmp_path):
    members = _members()
    x = np.random.default_rng(0).random((12, 64, 64)).astype(np.float32)
    p_gen, p_exp = members["general"].predict_proba(x), members["expert0"].predict_proba(x)
    assert not np.allclose(p_gen, p_exp, atol=1e-3)  # two different random networks
    to_expert = ThicknessExperts(members, BANDS, _gate([30.0, -30.0]))
    np.testing.assert_allclose(to_expert.predict_proba(x), p_exp, atol=1e-5)
    to_general = ThicknessExperts(members, BANDS, _gate([-30.0, 30.0]))
    np.testing.assert_allclose(to_general.predict_proba(x), p_gen, atol=1e-5)
    half = ThicknessExperts(members, BANDS, _gate([0.0, 0.0]))
    pred, proba, emb = half.infer(x)
    np.testing.assert_allclose(proba, 0.5 * (p_gen + p_exp), atol=1e-5)
    np.testing.assert_array_equal(pred, np.argmax(proba, 1))
    np.testing.assert_allclose(emb, members["general"].embed(x), atol=1e-5)
    # the checkpoint rebuilds the same composite
    half.meta["members"] = {k: {"model_cfg": m.cfg} for k, m in members.items()}
    path = save_checkpoint(half, tmp_path / "tx.pt", meta={"members": half.meta["members"]})
    back = load_checkpoint(path, device="cpu")
    assert isinstance(back, ThicknessExperts) and back.bands == BANDS
    np.testing.assert_allclose(back.predict_proba(x), proba, atol=1e-6)


def test_bands_and_gate_features_check_their_input():
    assert band_of([4.0, 7.5, 60.0], BANDS).tolist() == [0, 1, 1]
    with pytest.raises(ValueError, match="no band"):
        band_of([-1.0], BANDS)
    with pytest.raises(ValueError, match="multiple of"):
        gate_features(np.zeros((2, 40, 40), np.float32), np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match="missing"):
        ThicknessExperts({"general": _members()["general"]}, BANDS, _gate([0.0, 0.0]))
    with pytest.raises(ValueError, match="gate has 3 bands"):
        ThicknessExperts(_members(), BANDS, _gate([0.0, 0.0, 0.0]))


def test_experts_built_from_draws_gate_the_thin_band(tiny_draws, tmp_path):
    from polcore.train import TrainConfig, train_model
    from polcore.train_draws import _complement_bands

    common = dict(family="custom_cnn", arch="binned", data="draws", eval_every=2, batch_size=16,
                  train_thickness_nm=None)
    parent = TrainConfig(steps=4, lr=1e-3, **common)
    train_model(parent, tiny_draws, out_dir=tmp_path)
    thin = TrainConfig(steps=2, lr=1e-4, init_from=parent.name, tag="t4", **{**common, "train_thickness_nm": (4.0,)})
    train_model(thin, tiny_draws, out_dir=tmp_path)
    with pytest.raises(ValueError, match="init_from"):
        TrainConfig(experts=(("4 nm", 0.0, 6.0, thin.name),), **common)
    cfg = TrainConfig(init_from=parent.name, tag="tx", experts=(("4 nm", 0.0, 6.0, thin.name),),
                      n_fit_patterns=64, **common)
    model, res = train_model(cfg, tiny_draws, out_dir=tmp_path)
    assert isinstance(model, ThicknessExperts)
    assert [b["member"] for b in model.bands] == ["expert0", "general"]
    back = load_checkpoint(res.checkpoint, device="cpu")
    meta = back.meta
    assert set(meta["gate_val"]) == {"4", "8"} and all(0.0 <= v <= 1.0 for v in meta["gate_val"].values())
    sha = hashlib.sha256((tmp_path / f"{thin.name}.pt").read_bytes()).hexdigest()
    assert meta["members"]["expert0"]["run"]["sha256"] == sha
    assert {r["thickness_nm"] for r in meta["heldout"]} == {4.0, 8.0}
    assert TrainConfig.from_dict(meta["train_config"]) == cfg
    x = np.random.default_rng(1).random((6, 64, 64)).astype(np.float32)
    np.testing.assert_allclose(back.predict_proba(x), model.predict_proba(x), atol=1e-6)
    assert _complement_bands((("a", 0.0, 6.0, "r"), ("b", 20.0, 30.0, "s"))) == [(6.0, 20.0), (30.0, 1e6)]
    with pytest.raises(ValueError, match="overlap"):
        _complement_bands((("a", 0.0, 6.0, "r"), ("b", 5.0, 30.0, "s")))
