"""The draw library (independent nuisance draws), the microscope augmentation, the held-out evaluation and the
ideal observer, on a real tiny abTEM draw library."""

from __future__ import annotations

import json

import numpy as np
import pytest

from polcore.simulate.draws import (
    DRAW_PROFILES,
    QUARTER_TURN_CLASS,
    DrawConfig,
    build_draws,
    draw_nuisance,
    load_draws,
)
from polcore.simulate.library import rotate_entry
from polcore.simulate.microscope import MicroscopeAugment, apply_dose


def test_nuisance_draws_are_seeded_and_roles_independent():
    cfg = DRAW_PROFILES["train"]
    a = draw_nuisance(cfg, "train", 3)
    assert a == draw_nuisance(cfg, "train", 3)
    assert a != draw_nuisance(cfg, "train", 4)
    # adding training draws never changes a held-out draw: each role has its own stream
    assert draw_nuisance(cfg, "test", 0)["phonon_seed"] != draw_nuisance(cfg, "train", 0)["phonon_seed"]
    assert abs(a["tilt_x_mrad"]) <= 1.5 and abs(a["tilt_y_mrad"]) <= 1.5
    assert 0.10 <= a["nb_disp_A"] <= 0.20 and 23.0 <= a["convergence_mrad"] <= 25.0
    ideal = draw_nuisance(cfg, "ideal_test", 0)
    assert ideal["tilt_x_mrad"] == ideal["tilt_y_mrad"] == 0.0 and ideal["defocus_A"] == 0.0
    with pytest.raises(ValueError, match="unknown role"):
        draw_nuisance(cfg, "holdout", 0)


def test_draw_config_checks_the_build_order():
    with pytest.raises(ValueError, match="order must schedule"):
        DrawConfig(counts={"train": 2}, order=(("train", 1),))
    jobs = DRAW_PROFILES["train"].jobs()
    assert len(jobs) == sum(DRAW_PROFILES["train"].counts.values()) == len(set(jobs))
    assert jobs[0] == ("test", 0)  # held-out draws first: a partial build can already be scored


def test_quarter_turn_classes_cover_the_eight_classes():
    flat = sorted(c for row in QUARTER_TURN_CLASS for c in row)
    assert flat == list(range(8))
    assert QUARTER_TURN_CLASS[0][0] == 1  # RU
    assert QUARTER_TURN_CLASS[1][0] == 0  # RM


def test_tiny_draws_build_load_and_resume(tiny_draws, tmp_path):
    lib = tiny_draws
    assert set(lib.roles()) == {"train", "val", "test", "ideal_train", "ideal_test"}
    assert lib.base["train"].shape == (3, 2, 2, 4, 4, 65, 65)
    assert lib.thickness_nm["ideal_test"].tolist() == [8.0]
    assert len(lib.sha256) == 64 and lib.meta["mrad_per_px"] > 0
    ex = lib.expanded("train", 8.0)
    assert ex.shape == (3, 8, 4, 4, 64, 64) and np.all(np.isfinite(ex)) and ex.min() >= 0
    # every class is the exact quarter turn of a base variant, probe positions included
    base = lib.base["train"][:, 1, 1].astype(np.float32) / lib.scale
    for q in range(4):
        np.testing.assert_allclose(ex[:, QUARTER_TURN_CLASS[1][q]], rotate_entry(base, q)[..., :-1, :-1],
                                   rtol=1e-6)
    # a rerun into the same folder simulates nothing (resumable); another recipe is refused
    folder = lib.path
    assert build_draws("tiny", folder) == []
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "recipe.json").write_text(json.dumps({"profile": "other"}))
    with pytest.raises(ValueError, match="another recipe"):
        build_draws("tiny", tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="no draw library"):
        load_draws(tmp_path / "missing")


def test_stale_claim_of_a_dead_process_is_taken_over(tiny_draws, tmp_path):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(tiny_draws.path, folder)
    (folder / "train_0002.h5").unlink()
    (folder / "train_0002.claim").write_text("999999999")  # no such process
    made = build_draws("tiny", folder)
    assert [p.name for p in made] == ["train_0002.h5"]
    assert not (folder / "train_0002.claim").exists()


def test_apply_dose_is_seeded_poisson():
    x = np.ones((2, 8, 8), np.float32)
    a = apply_dose(x, 1000, np.random.default_rng(1))
    b = apply_dose(x, 1000, np.random.default_rng(1))
    np.testing.assert_array_equal(a, b)
    assert abs(a.sum(axis=(1, 2)).mean() - 1000) < 150
    assert np.all(a == np.round(a))
    with pytest.raises(ValueError, match="dose"):
        apply_dose(x, 0, np.random.default_rng(0))


def test_microscope_augment_identity_and_effects():
    import torch

    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.random((16, 32, 32)).astype(np.float32) + 0.1)
    g = torch.Generator().manual_seed(0)
    off = MicroscopeAugment(scale_range=0.0, shift_px=0.0, p_blur=0.0, p_background=0.0, p_hot=0.0, p_noise_free=1.0)
    y = off(x, g)
    xn = x / x.sum(dim=(1, 2), keepdim=True)
    np.testing.assert_allclose((y / y.sum(dim=(1, 2), keepdim=True)).numpy(), xn.numpy(), rtol=1e-4, atol=1e-7)
    # the optical axis (pixel K // 2) is the fixed point of the camera-length scaling
    one = torch.zeros(1, 32, 32)
    one[0, 16, 16] = 1.0
    sc = MicroscopeAugment(scale_range=0.04, shift_px=1e-9, p_blur=0.0, p_background=0.0, p_hot=0.0,
                           p_noise_free=1.0)
    z = sc(one, g)[0]
    assert float(z[16, 16] / z.sum()) > 0.85
    noisy = MicroscopeAugment(dose_range=(1e3, 1e3), p_noise_free=0.0)(x, torch.Generator().manual_seed(1))
    assert torch.all(noisy >= 0) and torch.allclose(noisy, noisy.round())
    again = MicroscopeAugment(dose_range=(1e3, 1e3), p_noise_free=0.0)(x, torch.Generator().manual_seed(1))
    assert torch.equal(noisy, again)


def test_ideal_observer_known_nuisance_is_perfect_without_noise(tiny_draws):
    from polcore.evaluate import ideal_observer

    df = ideal_observer(tiny_draws, doses=(None,), versions=("known",))
    assert (df["per_pattern"] >= 0.99).all() and (df["per_cell"] == 1.0).all()
    noisy = ideal_observer(tiny_draws, doses=(2e4,), thickness=(8.0,))
    assert set(noisy["version"]) == {"known", "unknown"}
    k = noisy[noisy["version"] == "known"].iloc[0]
    u = noisy[noisy["version"] == "unknown"].iloc[0]
    assert u["per_pattern"] <= k["per_pattern"] + 1e-9  # knowing the nuisances can only help
    assert u["n_train_draws"] == 3


def test_position_blind_observer_matches_a_direct_computation(tiny_draws):
    """The position-blind limit: each pattern's likelihood averaged over training draws AND probe positions,
    checked against a direct loop over the templates."""
    from polcore.evaluate import _bin, _log_templates, _logmeanexp, heldout_counts, ideal_observer

    t = 8.0
    df = ideal_observer(tiny_draws, doses=(2e4,), thickness=(t,), versions=("unknown", "unknown_pos"), bin_px=1)
    blind = df[df["version"] == "unknown_pos"].iloc[0]
    counts, _ = heldout_counts(tiny_draws, "test", t, 2e4, 0)
    D, C, N, _, K, _ = counts.shape
    lt = _log_templates(_bin(tiny_draws.expanded("train", t), 1), 2e4).reshape(-1, C, N * N, K * K)
    n = counts.reshape(D, C, N * N, K * K).astype(np.float64)
    hits = 0
    for d in range(D):
        for c in range(C):
            for p in range(N * N):
                ll = np.einsum("k,jcpk->cjp", n[d, c, p], lt.astype(np.float64)).reshape(C, -1)
                hits += int(np.argmax(_logmeanexp(ll, axis=1)) == c)
    assert blind["per_pattern"] == pytest.approx(hits / (D * C * N * N))
    assert 0.0 <= blind["per_cell"] <= 1.0


def test_draw_count_curve_rows(tiny_draws):
    from polcore.evaluate import draw_count_curve

    df = draw_count_curve(tiny_draws, counts=(1, 2), thickness=(8.0,))
    assert sorted(df["n_train_draws"].unique().tolist()) == [1, 2, 3]


def test_train_on_draws_saves_heldout_rows(tiny_draws, tmp_path):
    from polcore.models import load_checkpoint
    from polcore.train import TrainConfig, train_model

    cfg = TrainConfig(family="custom_cnn", data="draws", steps=4, eval_every=2, batch_size=16,
                      train_thickness_nm=None, lr=1e-3)
    model, res = train_model(cfg, tiny_draws, out_dir=tmp_path)
    assert set(res.test_acc_by_thickness) == {"4", "8"}
    m2 = load_checkpoint(res.checkpoint, device="cpu")
    meta = m2.meta
    assert meta["library_sha256"] == tiny_draws.sha256 and meta["library_kind"] == "draws"
    assert meta["train_config"]["train_roles"] == ["train"] and meta["steps_run"] == 4
    assert {r["thickness_nm"] for r in meta["heldout"]} == {4.0, 8.0}
    assert all(0 <= r["per_cell"] <= 1 for r in meta["heldout"])
    assert TrainConfig.from_dict(meta["train_config"]) == cfg
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(family="custom_cnn", data="draws")
    # the held-out rows travel from the checkpoint into the store, beside the committed limit rows
    from polcore.heldout import load_results, model_heldout_rows
    from polcore.store import PredictionStore, queries

    rows = model_heldout_rows([tmp_path])
    assert len(rows) == 2 and set(rows["kind"]) == {"model"}
    res_dir = tmp_path / "results"
    res_dir.mkdir()
    limit = rows.assign(name="limit: nuisances known", kind="limit", per_pattern=1.0, per_cell=1.0)
    limit.to_csv(res_dir / "limit.csv", index=False)
    db = tmp_path / "x.duckdb"
    assert load_results(db, [tmp_path], results_dir=res_dir) == 4
    assert load_results(db, [tmp_path], results_dir=res_dir) == 4  # replaces, never duplicates
    table = queries.heldout_table(PredictionStore(db))
    assert len(table) == 4 and list(table["kind"]) == ["model", "model", "limit", "limit"]
    with pytest.raises(ValueError, match="per_cell"):
        PredictionStore(db).write_heldout(limit.assign(per_cell=1.5))


def test_fine_tune_starts_from_its_parent_and_weights_thicknesses(tiny_draws, tmp_path):
    import hashlib

    from polcore.models import load_checkpoint
    from polcore.train import TrainConfig, train_model
    from polcore.train_draws import DrawSampler

    common = dict(family="custom_cnn", data="draws", eval_every=2, batch_size=16, train_thickness_nm=None)
    parent_cfg = TrainConfig(steps=4, lr=1e-3, **common)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train_model(TrainConfig(steps=2, init_from=parent_cfg.name, tag="ft", **common), tiny_draws,
                    out_dir=tmp_path)
    parent, pres = train_model(parent_cfg, tiny_draws, out_dir=tmp_path)
    # a fine-tune at a vanishing learning rate keeps the parent's weights and input normalisation
    cfg = TrainConfig(steps=2, lr=1e-9, init_from=parent_cfg.name, tag="ft",
                      thickness_weights=((4.0, 3.0),), **common)
    child, res = train_model(cfg, tiny_draws, out_dir=tmp_path)
    x = np.random.default_rng(0).random((8, 64, 64)).astype(np.float32)
    np.testing.assert_allclose(child.predict_proba(x), parent.predict_proba(x), atol=1e-4)
    meta = load_checkpoint(res.checkpoint, device="cpu").meta
    parent_file = tmp_path / f"{parent_cfg.name}.pt"
    assert meta["init_from"]["name"] == parent_cfg.name
    assert meta["init_from"]["sha256"] == hashlib.sha256(parent_file.read_bytes()).hexdigest()
    assert TrainConfig.from_dict(meta["train_config"]) == cfg
    # the sampler draws 4 nm three times as often as 8 nm
    s = DrawSampler(tiny_draws, thickness_weights=((4.0, 3.0),))
    ts = tiny_draws.thickness_nm["train"]
    p = dict(zip(ts.tolist(), s.parts[0][2].tolist()))
    assert p[4.0] == pytest.approx(0.75) and p[8.0] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="positive"):
        TrainConfig(steps=2, thickness_weights=((4.0, 0.0),), **common)
