"""Virtual images (issue 16): bright field, annular dark field and the centre-of-mass field, computed in the
ingest's one pass and stored once per scan (schema version 4, table ``scan_images``)."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import numpy as np
import pytest
from app_fixtures import write_checkpoint, write_plain_scan, write_scan

from polcore.ingest import ingest
from polcore.io import open_scan
from polcore.store import PredictionStore, queries
from polcore.store.schema import IMAGE_KINDS as SCHEMA_KINDS
from polcore.store.schema import SCHEMA_VERSION, STORE_MARKER
from polcore.virtual import IMAGE_KINDS, VirtualImages, centre_of_mass, detector_masks, stitch_rows


def _shifted_discs(ny: int, nx: int, rng, det: int = 40, r: float = 7.0):
    """Discs at (19.5, 20.5) whose brightness leans by a known amount per position, on a small background."""
    yy, xx = np.mgrid[0:det, 0:det].astype(float)
    cy, cx = 19.5, 20.5
    disc = (np.hypot(yy - cy, xx - cx) <= r).astype(float)
    ay = rng.uniform(-0.4, 0.4, (ny, nx))
    ax = rng.uniform(-0.4, 0.4, (ny, nx))
    pats = disc * (1 + ay[..., None, None] * (yy - cy) / r + ax[..., None, None] * (xx - cx) / r)
    pats = pats * 100 + rng.uniform(0, 0.5, (ny, nx, det, det))
    return pats.astype(np.float32), (cy, cx), r


def test_kinds_agree_between_store_and_virtual():
    assert IMAGE_KINDS == SCHEMA_KINDS == ("bf", "adf", "com_y", "com_x")


def test_accumulator_equals_direct_sums_in_any_batch_order(rng):
    ny, nx = 6, 7
    pats, c, r = _shifted_discs(ny, nx, rng)
    hot = np.array([[19, 21], [2, 3]])  # one inside the disc, one in a corner
    pats[:, :, 19, 21] = 5e4
    acc = VirtualImages((ny, nx), pats.shape[2:], c, r, hot_pixels=hot)
    flat = pats.reshape(ny * nx, *pats.shape[2:])
    order = rng.permutation(ny * nx)
    for chunk in np.array_split(order, 5):  # batches out of order, uneven sizes
        acc.add(chunk, flat[chunk])
    out = acc.result()
    assert set(out) == set(IMAGE_KINDS) and all(v.shape == (ny, nx) and v.dtype == np.float32 for v in out.values())
    m = detector_masks(pats.shape[2:], c, r, hot_pixels=hot)
    assert not m["bf"][19, 21] and not m["com"][2, 3]  # hot pixels left out of every detector
    np.testing.assert_allclose(out["bf"], (pats * m["bf"]).sum(axis=(2, 3)), rtol=1e-5)
    np.testing.assert_allclose(out["adf"], (pats * m["adf"]).sum(axis=(2, 3)), rtol=1e-5)
    com = centre_of_mass((flat * m["com"]), c).reshape(ny, nx, 2)
    com -= com.reshape(-1, 2).mean(axis=0)
    np.testing.assert_allclose(out["com_y"], com[..., 0], atol=1e-4)
    np.testing.assert_allclose(out["com_x"], com[..., 1], atol=1e-4)
    # the field follows the lean of the disc: brighter to the right -> CoM to the right
    assert np.corrcoef(out["com_x"].ravel(), (pats[..., 19:21, 25:27].mean((2, 3)) -
                                               pats[..., 19:21, 14:16].mean((2, 3))).ravel())[0, 1] > 0.9


def test_from_mean_pattern_finds_the_disc_and_positions_never_added_are_nan(rng):
    pats, c, r = _shifted_discs(3, 4, rng)
    acc = VirtualImages.from_mean_pattern(pats.reshape(-1, 40, 40).mean(axis=0), (3, 4))
    assert abs(acc.center[0] - c[0]) < 0.3 and abs(acc.center[1] - c[1]) < 0.3 and abs(acc.radius - r) < 0.7
    acc.add(np.arange(6), pats.reshape(-1, 40, 40)[:6])
    out = acc.result()
    assert np.isfinite(out["bf"].ravel()[:6]).all() and np.isnan(out["bf"].ravel()[6:]).all()
    assert abs(float(np.nanmean(out["com_x"]))) < 1e-5  # centred on the mean of the positions seen


def test_bad_input_is_refused(rng):
    acc = VirtualImages((2, 2), (8, 8), (4, 4), 2.0)
    with pytest.raises(ValueError, match="batch must be"):
        acc.add([0, 1], np.zeros((3, 8, 8)))
    with pytest.raises(ValueError, match="out of the 2x2 scan"):
        acc.add([7], np.zeros((1, 8, 8)))
    with pytest.raises(ValueError, match="radius"):
        VirtualImages((2, 2), (8, 8), (4, 4), 0.0)
    with pytest.raises(ValueError, match="ADF radii"):
        VirtualImages((2, 2), (8, 8), (4, 4), 2.0, adf=(3.0, 1.2))


def test_row_blocks_stitch_into_the_whole_scan(rng):
    ny, nx = 9, 5
    pats, c, r = _shifted_discs(ny, nx, rng)
    whole = VirtualImages((ny, nx), (40, 40), c, r)
    whole.add(np.arange(ny * nx), pats.reshape(-1, 40, 40))
    parts = []
    for y0, y1 in ((0, 4), (4, 9)):
        a = VirtualImages((y1 - y0, nx), (40, 40), c, r)
        a.add(np.arange((y1 - y0) * nx), pats[y0:y1].reshape(-1, 40, 40))
        img = a.result()
        parts.append((y0, img, a.info()))
    joined, info = stitch_rows(parts[::-1])
    ref = whole.result()
    for k in IMAGE_KINDS:
        np.testing.assert_allclose(joined[k], ref[k], atol=1e-4)
    assert info["blocks"] == 2


# --------------------------------------------------------------------------------------- through the ingest


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
    root = tmp_path_factory.mktemp("virtual")
    models = root / "models"
    write_checkpoint(models, np.random.default_rng(3))
    scan = write_plain_scan(root / "scan.h5", 18, 20, seed=2)
    res = ingest(scan, None, root / "p.duckdb", kind="synthetic", model_dir=models)
    return dict(root=root, models=models, scan=scan, db=root / "p.duckdb", res=res)


def test_ingest_stores_the_images_once_in_its_pass(ingested):
    store = PredictionStore(ingested["db"], read_only=True)
    sid = ingested["res"].scan_id
    img = queries.scan_images(store, sid)
    assert list(img) == list(IMAGE_KINDS)
    assert all(v.shape == (18, 20) and v.dtype == np.float32 and np.isfinite(v).all() for v in img.values())
    info = queries.scan_images_info(store, sid)
    assert ingested["res"].geometry["applied"] is False  # so the file's patterns are what the pass saw
    scan = open_scan(ingested["scan"])
    pats = np.concatenate([b for _, b in scan.iter_batches(512)]).reshape(18, 20, *scan.sig_shape)
    m = detector_masks(scan.sig_shape, info["center_px"], info["disc_radius_px"], info["adf_radii"])
    np.testing.assert_allclose(img["bf"], (pats * m["bf"]).sum(axis=(2, 3)), rtol=1e-4)
    np.testing.assert_allclose(img["adf"], (pats * m["adf"]).sum(axis=(2, 3)), rtol=1e-4)
    assert abs(float(img["com_y"].mean())) < 1e-4 and float(img["com_x"].std()) > 0
    # the same connection object works too (the dashboard may hold one)
    with store.connect() as con:
        np.testing.assert_array_equal(queries.scan_images(con, sid)["adf"], img["adf"])
    assert queries.scan_images(store, sid + 100) is None


def test_reingest_with_another_model_keeps_one_set_and_delete_removes_it(ingested, tmp_path):
    import shutil

    db = tmp_path / "p.duckdb"
    shutil.copy(ingested["db"], db)
    sid = ingested["res"].scan_id
    before = queries.scan_images(PredictionStore(db, read_only=True), sid)
    models = tmp_path / "models"
    shutil.copytree(ingested["models"], models)
    meta = json.loads((models / "pca_knn-cls-s0.json").read_text())
    from polcore.models import save_checkpoint
    from polcore.models.com_direction import ComDirectionModel

    save_checkpoint(ComDirectionModel(), models / "com_direction-cls", meta={"preprocessing": meta["preprocessing"]})
    res = ingest(ingested["scan"], None, db, kind="synthetic", model_dir=models)
    assert res.scan_id == sid and len(res.run_ids) == 2  # only the new model ran
    store = PredictionStore(db)
    assert store.counts()["scan_images"] == len(IMAGE_KINDS)
    after = queries.scan_images(store, sid)
    for k in IMAGE_KINDS:
        np.testing.assert_allclose(after[k], before[k], rtol=1e-6)
    assert store.write_scan_images(sid, after) is False  # stored once: kept
    with pytest.raises(ValueError, match="do not match"):
        store.write_scan_images(sid, {k: np.zeros((3, 3)) for k in IMAGE_KINDS}, replace=True)
    with pytest.raises(ValueError, match="missing"):
        store.write_scan_images(sid, {"bf": np.zeros((18, 20))})
    assert store.delete_scan(sid)["scan_images"] == len(IMAGE_KINDS)
    assert queries.scan_images(store, sid) is None and store.counts()["scan_images"] == 0


def _downgrade_to_v3(path: Path) -> None:
    """The layout polbench wrote at schema version 3 (no scan_images table)."""
    con = duckdb.connect(str(path))
    con.execute("DROP TABLE scan_images")
    con.execute("DELETE FROM schema_version")
    con.execute("INSERT INTO schema_version VALUES (3, now())")
    con.close()


def test_a_version_3_store_stays_readable_and_is_migrated_in_place(ingested, tmp_path):
    import shutil

    db = tmp_path / "v3.duckdb"
    shutil.copy(ingested["db"], db)
    _downgrade_to_v3(db)
    ro = PredictionStore(db, read_only=True)
    assert ro.exists() and len(queries.list_runs(ro)) == 2
    assert queries.scan_images(ro, ingested["res"].scan_id) is None  # no table: no images, no error
    assert ro.counts()["scan_images"] == 0
    con = duckdb.connect(str(db), read_only=True)
    assert "scan_images" not in {r[0] for r in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
    con.close()  # reading did not migrate
    store = PredictionStore(db)  # writing does: the table, version 4
    con = duckdb.connect(str(db), read_only=True)
    versions = sorted(r[0] for r in con.execute("SELECT version FROM schema_version").fetchall())
    marker = con.execute("SELECT marker FROM polbench_store").fetchall()
    con.close()
    assert versions == [3, SCHEMA_VERSION] == [3, 4] and marker == [(STORE_MARKER,)]
    assert queries.scan_images(store, ingested["res"].scan_id) is None  # an old scan has none ...
    other = write_scan(tmp_path / "other.h5", np.zeros((10, 12), np.int8), np.full((10, 12), 20.0, np.float32),
                       np.zeros((10, 12), bool), np.random.default_rng(0))
    res = ingest(other, None, db, kind="synthetic", model_dir=ingested["models"])
    assert queries.scan_images(store, res.scan_id)["bf"].shape == (10, 12)  # ... a new one has them
