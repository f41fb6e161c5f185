"""PredictionStore scan status (add_scan status, set_scan_status, scan_status) and delete_models.

Every test uses a real DuckDB file in a tmp dir.
"""

from __future__ import annotations

import duckdb
import numpy as np
import pandas as pd
import pytest

from polcore.store import PredictionStore, StoreError, queries
from polcore.store.schema import SCAN_STATUSES

SHA_A = "a" * 64
SHA_B = "b" * 64


def _preds(rng, ny=3, nx=4):
    probs = rng.random((ny, nx, 8)).astype(np.float32)
    probs /= probs.sum(-1, keepdims=True)
    return {"pred": probs.argmax(-1), "probs": probs}


def _raw_status(path, scan_id):
    """The status column read with DuckDB directly (not through the store)."""
    con = duckdb.connect(str(path), read_only=True)
    try:
        rows = con.execute("SELECT status FROM scans WHERE scan_id = ?", [scan_id]).fetchall()
    finally:
        con.close()
    return rows[0][0] if rows else None


@pytest.fixture
def store(tmp_path):
    return PredictionStore(tmp_path / "db" / "p.duckdb")


def _scan(store, sha=SHA_A, **kw):
    return store.add_scan(name=f"scan-{sha[0]}", kind="synthetic", sha256=sha, ny=3, nx=4, **kw)


def test_status_values_match_the_schema():
    assert SCAN_STATUSES == ("ready", "ingesting", "failed")


def test_add_scan_status_defaults_to_ready_and_is_stored(store):
    sid = _scan(store)
    assert store.scan_status(sid) == "ready"
    assert _raw_status(store.path, sid) == "ready"
    sid2 = _scan(store, SHA_B, status="ingesting")
    assert sid2 != sid
    assert store.scan_status(sid2) == "ingesting"
    assert _raw_status(store.path, sid2) == "ingesting"
    assert store.scan_status(sid) == "ready"


def test_add_scan_rejects_a_bad_status_and_writes_nothing(store):
    with pytest.raises(ValueError, match="status must be one of"):
        _scan(store, status="done")
    assert store.counts()["scans"] == 0


def test_add_scan_of_a_stored_sha256_returns_its_id_and_keeps_its_status(store):
    sid = _scan(store, status="failed")
    again = store.add_scan(name="other", kind="experimental", sha256=SHA_A, ny=5, nx=5, status="ready")
    assert again == sid
    assert store.scan_status(sid) == "failed"
    assert store.counts()["scans"] == 1


def test_set_scan_status_updates_only_that_scan(store):
    sid = _scan(store, status="ingesting")
    other = _scan(store, SHA_B, status="ingesting")
    store.set_scan_status(sid, "ready")
    assert store.scan_status(sid) == "ready"
    assert store.scan_status(other) == "ingesting"
    store.set_scan_status(np.int64(other), "failed")
    assert _raw_status(store.path, other) == "failed"
    store.set_scan_status(other, "ingesting")
    assert store.scan_status(other) == "ingesting"
    assert store.counts()["scans"] == 2


def test_set_scan_status_validates(store):
    sid = _scan(store, status="ingesting")
    with pytest.raises(ValueError, match="status must be one of"):
        store.set_scan_status(sid, "finished")
    with pytest.raises(ValueError, match="unknown scan_id 99"):
        store.set_scan_status(99, "ready")
    assert store.scan_status(sid) == "ingesting"
    assert store.scan_status(99) is None


def test_status_through_a_read_only_store(store):
    sid = _scan(store, status="ingesting")
    ro = PredictionStore(store.path, read_only=True)
    assert ro.scan_status(sid) == "ingesting"
    assert ro.scan_status(sid + 1) is None
    with pytest.raises(StoreError, match="read-only"):
        ro.set_scan_status(sid, "ready")
    with pytest.raises(StoreError, match="read-only"):
        ro.delete_models([1])
    assert store.scan_status(sid) == "ingesting"


def test_delete_models_removes_only_unused_models(store, rng):
    sid = _scan(store)
    used = store.add_model(name="used", family="resnet", head="cls")
    free1 = store.add_model(name="free1", family="resnet", head="cls")
    free2 = store.add_model(name="free2", family="vgg", head="cls")
    keep = store.add_model(name="keep", family="vgg", head="cls")
    store.write_run(used, sid, _preds(rng), seconds=1.0, device="cpu")
    assert store.delete_models([used, free1, free2, 12345]) == 2
    names = sorted(queries.list_models(store)["name"])
    assert names == ["keep", "used"]
    counts = store.counts()
    assert (counts["models"], counts["runs"], counts["predictions"]) == (2, 1, 12)
    assert store.delete_models([free1]) == 0  # already gone
    assert store.delete_models([]) == 0
    assert store.add_model(name="free1", family="resnet", head="cls") == keep + 1  # ids not reused


def test_delete_models_keeps_models_with_embeddings_or_domain_gap_rows(store):
    sid = _scan(store)
    sid2 = _scan(store, SHA_B)
    emb = store.add_model(name="emb", family="resnet", head="cls")
    gap = store.add_model(name="gap", family="resnet", head="cls")
    store.write_embeddings(
        pd.DataFrame(
            {"model_id": emb, "method": "pca", "space": "features", "scan_id": sid, "iy": [0], "ix": [0],
             "e1": [0.0], "e2": [1.0]}
        )
    )
    # an input-space set (model_id NULL) must not make every model look used
    store.write_embeddings(
        pd.DataFrame(
            {"method": "pca", "space": "input", "scan_id": sid, "iy": [0], "ix": [0], "e1": [0.0], "e2": [1.0]}
        )
    )
    store.write_domain_gap(gap, sid, sid2, auc=0.7)
    free = store.add_model(name="free", family="resnet", head="cls")
    assert store.delete_models([emb, gap, free]) == 1
    assert sorted(queries.list_models(store)["name"]) == ["emb", "gap"]


def test_delete_models_not_only_unused_removes_their_rows(store, rng):
    sid = _scan(store)
    sid2 = _scan(store, SHA_B)
    gone = store.add_model(name="gone", family="resnet", head="cls")
    kept = store.add_model(name="kept", family="vgg", head="cls")
    store.write_run(gone, sid, _preds(rng), seconds=1.0, device="cpu")
    store.write_run(gone, sid, _preds(rng), seconds=1.0, device="cpu", layer="cell")
    kept_run = store.write_run(kept, sid, _preds(rng), seconds=1.0, device="cpu")
    store.write_embeddings(
        pd.DataFrame(
            {"model_id": [gone, kept], "method": "pca", "space": "features", "scan_id": sid, "iy": 0, "ix": 0,
             "e1": [0.0, 1.0], "e2": [1.0, 0.0]}
        )
    )
    store.write_domain_gap(gone, sid, sid2, auc=0.7)
    store.write_domain_gap(kept, sid, sid2, auc=0.6)
    assert store.delete_models([gone], only_unused=False) == 1
    counts = store.counts()
    assert (counts["models"], counts["runs"], counts["predictions"]) == (1, 1, 12)
    assert (counts["embeddings"], counts["domain_gap"], counts["scans"]) == (1, 1, 2)
    assert queries.list_runs(store)["run_id"].tolist() == [kept_run]
    assert queries.list_models(store)["name"].tolist() == ["kept"]
