"""Validation of the frames given to the store's writers and their conversion to Arrow tables.

:func:`_prediction_columns` checks a run's predictions (a DataFrame or a dict of arrays / (ny, nx) maps)
and returns flat numpy columns in (iy, ix) order; :func:`_predictions_arrow` turns them into an Arrow
table with the ``predictions`` table's column types for a bulk ``INSERT ... SELECT``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from polcore.store.schema import LAYERS
from polcore.types import N_CLASSES

__all__ = ["PREDICTION_COLUMNS"]

#: Columns accepted by :meth:`PredictionStore.write_run` (``iy``, ``ix`` and ``pred`` are required unless
#: the input is a dict of (ny, nx) maps, which implies the positions).
PREDICTION_COLUMNS: tuple[str, ...] = (
    "iy",
    "ix",
    "pred",
    "confidence",
    "probs",
    "true_label",
    "thickness_nm",
    "region",
    "is_defect",
    "irregularity",
)

_SMALLINT_MAX = 32767


def _check_layer(layer: str) -> None:
    if layer not in LAYERS:
        raise ValueError(f"layer must be one of {LAYERS}, got {layer!r}")


def _check_frame(df: Any, required: set[str], allowed: set[str], what: str) -> None:
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"{what} must be a pandas DataFrame, got {type(df).__name__}")
    missing = required - set(df.columns)
    if missing:
        raise ValueError(f"{what} DataFrame lacks columns {sorted(missing)}; required: {sorted(required)}")
    extra = set(df.columns) - allowed
    if extra:
        raise ValueError(f"{what} DataFrame has unknown columns {sorted(extra)}; valid: {sorted(allowed)}")


def _finite(values: Any, name: str, dtype: Any) -> np.ndarray:
    arr = np.asarray(values, dtype=dtype)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite")
    return arr


def _int_column(values: Any, name: str, lo: int, hi: int, dtype: Any) -> np.ndarray:
    arr = np.asarray(values)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if (
            not np.issubdtype(arr.dtype, np.floating)
            or not np.all(np.isfinite(arr))
            or np.any(arr != np.round(arr))
        ):
            raise ValueError(f"{name} must hold integers, got dtype {arr.dtype}")
    if arr.size and (arr.min() < lo or arr.max() > hi):
        raise ValueError(f"{name} must lie in {lo}..{hi}, got {arr.min()}..{arr.max()}")
    return arr.astype(dtype)


def _labels_column(values: Any) -> np.ndarray:
    """True labels as int8 with -1 for 'no label' (negative values, NaN or None)."""
    arr = np.asarray(values)
    if arr.dtype == object:
        arr = pd.to_numeric(pd.Series(arr), errors="raise").to_numpy(dtype=float)
    if np.issubdtype(arr.dtype, np.floating):
        arr = np.where(np.isnan(arr), -1, arr)
    arr = np.where(arr < 0, -1, arr)
    return _int_column(arr, "true_label", -1, N_CLASSES - 1, np.int8)


def _prediction_columns(predictions: Any) -> dict[str, np.ndarray | None]:
    """Validate predictions and return flat numpy columns sorted by (iy, ix)."""
    if isinstance(predictions, pd.DataFrame):
        raw: dict[str, Any] = {c: predictions[c].to_numpy() for c in predictions.columns}
        if "probs" in raw and raw["probs"].dtype == object:
            try:
                raw["probs"] = np.stack([np.asarray(p, dtype=np.float32) for p in raw["probs"]])
            except ValueError as err:
                raise ValueError(f"probs must hold sequences of {N_CLASSES} floats: {err}") from err
    elif isinstance(predictions, Mapping):
        raw = {str(k): (None if v is None else np.asarray(v)) for k, v in predictions.items()}
        raw = {k: v for k, v in raw.items() if v is not None}
    else:
        raise TypeError(
            f"predictions must be a pandas DataFrame or a dict of arrays, got {type(predictions).__name__}"
        )
    unknown = set(raw) - set(PREDICTION_COLUMNS)
    if unknown:
        raise ValueError(f"unknown prediction columns {sorted(unknown)}; valid: {list(PREDICTION_COLUMNS)}")
    if "pred" not in raw:
        raise ValueError("predictions need a 'pred' column (class index 0..7)")
    has_pos = ("iy" in raw, "ix" in raw)
    if has_pos == (False, False):
        pred = raw["pred"]
        if pred.ndim != 2:
            raise ValueError(f"without iy/ix columns, 'pred' must be a (ny, nx) map, got shape {pred.shape}")
        ny, nx = pred.shape
        iy, ix = np.divmod(np.arange(ny * nx), nx)
        for key, value in list(raw.items()):
            want = (ny, nx, N_CLASSES) if key == "probs" else (ny, nx)
            if value.shape != want:
                raise ValueError(f"map '{key}' has shape {value.shape}, expected {want}")
            raw[key] = value.reshape(ny * nx, N_CLASSES) if key == "probs" else value.reshape(-1)
        raw["iy"], raw["ix"] = iy, ix
    elif not all(has_pos):
        raise ValueError("give both 'iy' and 'ix' columns, or neither (then the arrays are (ny, nx) maps)")
    n = len(raw["pred"])
    for key, value in raw.items():
        want = (n, N_CLASSES) if key == "probs" else (n,)
        if value.shape != want:
            raise ValueError(f"column '{key}' has shape {value.shape}, expected {want}")
    out: dict[str, np.ndarray | None] = {
        "iy": _int_column(raw["iy"], "iy", 0, _SMALLINT_MAX, np.int16),
        "ix": _int_column(raw["ix"], "ix", 0, _SMALLINT_MAX, np.int16),
        "pred": _int_column(raw["pred"], "pred", 0, N_CLASSES - 1, np.int8),
    }
    probs = raw.get("probs")
    out["probs"] = None if probs is None else _finite(probs, "probs", np.float32)
    if "confidence" in raw:
        out["confidence"] = _finite(raw["confidence"], "confidence", np.float32)
    else:
        out["confidence"] = None if probs is None else out["probs"].max(axis=1)
    out["true_label"] = _labels_column(raw["true_label"]) if "true_label" in raw else np.full(n, -1, np.int8)
    for key in ("thickness_nm", "irregularity"):
        out[key] = raw[key].astype(np.float32) if key in raw else None
    out["region"] = raw.get("region")
    out["is_defect"] = raw.get("is_defect")
    if n > 1:
        key = out["iy"].astype(np.int64) * (_SMALLINT_MAX + 1) + out["ix"]
        if np.any(np.diff(key) <= 0):  # not strictly raster-ordered: sort (duplicates are caught below)
            order = np.argsort(key, kind="stable")
            out = {k: (None if v is None else v[order]) for k, v in out.items()}
        dup = (np.diff(out["iy"]) == 0) & (np.diff(out["ix"]) == 0)
        if np.any(dup):
            i = int(np.argmax(dup))
            raise ValueError(f"duplicate position (iy={out['iy'][i]}, ix={out['ix'][i]}) in predictions")
    return out


def _predictions_arrow(cols: dict[str, np.ndarray | None], run_id: int) -> pa.Table:
    """Arrow table with the predictions table's column types (NaN/None -> NULL where nullable)."""
    n = len(cols["pred"])

    def nullable(values: np.ndarray | None, pa_type: pa.DataType) -> pa.Array:
        if values is None:
            return pa.nulls(n, pa_type)
        return pa.array(values, type=pa_type, from_pandas=True)  # NaN -> NULL

    if cols["probs"] is None:
        probs = pa.nulls(n, pa.list_(pa.float32(), N_CLASSES))
    else:
        probs = pa.FixedSizeListArray.from_arrays(pa.array(cols["probs"].ravel()), N_CLASSES)
    region = cols["region"]
    if region is not None:
        mask = np.asarray(pd.isna(region), bool)
        values = _int_column(np.where(mask, 0, region), "region", -_SMALLINT_MAX, _SMALLINT_MAX, np.int16)
        region = pa.array(values, mask=mask)
    else:
        region = pa.nulls(n, pa.int16())
    defect = cols["is_defect"]
    if defect is not None:
        mask = np.asarray(pd.isna(defect), bool)
        defect = pa.array(np.where(mask, False, defect).astype(bool), mask=mask)
    else:
        defect = pa.nulls(n, pa.bool_())
    return pa.table(
        {
            "run_id": pa.array(np.full(n, run_id, np.int32)),
            "iy": pa.array(cols["iy"]),
            "ix": pa.array(cols["ix"]),
            "pred": pa.array(cols["pred"]),
            "confidence": nullable(cols["confidence"], pa.float32()),
            "probs": probs,
            "true_label": pa.array(cols["true_label"]),
            "thickness_nm": nullable(cols["thickness_nm"], pa.float32()),
            "region": region,
            "is_defect": defect,
            "irregularity": nullable(cols["irregularity"], pa.float32()),
        }
    )
