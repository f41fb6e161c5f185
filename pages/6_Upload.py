"""Upload: a new scan (browser upload or a path under the data directory) -> validate -> ingest -> maps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import streamlit as st

from polcore import settings
from polcore.figures import class_map_figure, scalar_map_figure
from polcore.store.schema import SCAN_KINDS
from ui import data as D
from ui import guard, init_page, jobs, paths, short_error, state
from ui.backend import available_models, ingest_scan, save_upload, validate_scan
from ui.maps import png_config

ctx = init_page("Upload", icon=":material/upload_file:")
st.title("Upload a scan")
LIMIT_MB = st.get_option("server.maxUploadSize")
st.caption(
    f"Any format polcore reads: HDF5 (generic, py4DSTEM/EMD 1.0, Prismatic, ARINA), NumPy .npy, Merlin "
    f".mib, NanoMegas .blo. Browser uploads up to {LIMIT_MB} MB are written to "
    f"`{paths.uploads_dir()}` in chunks; for larger scans copy the file under the data directory "
    "`" + str(paths.data_dir()) + "` and give its path."
)


def _validate(path: Path, shown_name: str, *, remove_on_error: bool) -> dict | None:
    """Open the scan with polcore.io; show the reader's message (never a traceback) when it cannot."""
    from polcore.io import ScanFormatError

    try:
        return validate_scan(path)
    except ScanFormatError as exc:
        where = f" [dataset {exc.dataset!r}]" if exc.dataset else ""
        st.error(f"**{shown_name}**{where} cannot be read as a 4D-STEM scan: {exc.reason or exc}")
    except Exception as exc:  # noqa: BLE001 - never a traceback
        st.error(f"**{shown_name}** cannot be read: {short_error(exc)}")
    if remove_on_error:
        path.unlink(missing_ok=True)
        st.session_state.get("up_saved", {}).pop(st.session_state.get("up_file_id"), None)
    return None


def _source() -> tuple[Path | None, str, bool]:
    """(path, display name, is_upload) of the scan to ingest, or (None, '', False)."""
    mode = st.radio("Source", ["Upload a file", "Path on the server"], horizontal=True, key="up_mode")
    if mode == "Upload a file":
        up = st.file_uploader("Scan file", key="up_file", help=f"Limit {LIMIT_MB} MB (server.maxUploadSize).")
        if up is None:
            return None, "", False
        saved = st.session_state.setdefault("up_saved", {})
        fid = getattr(up, "file_id", None) or f"{up.name}-{up.size}"
        st.session_state["up_file_id"] = fid
        if fid not in saved or not Path(saved[fid]).is_file():
            with st.spinner(f"Writing {up.name} to disk ..."):
                saved[fid] = str(save_upload(up, up.name, fid))
        return Path(saved[fid]), up.name, True
    text = st.text_input("Path of the scan file (absolute, or relative to the data directory)", key="up_path")
    if not text.strip():
        return None, "", False
    try:
        p = paths.resolve_data_path(text)
    except ValueError as exc:
        st.error(str(exc))
        return None, "", False
    return p, p.name, False


def _show_result(scan_id: int) -> None:
    tok = D.token()
    runs = D.runs(tok)
    mine = runs[(runs["scan_id"] == scan_id) & (runs["layer"] == "pattern")]
    if mine.empty:
        st.warning("The scan is stored but has no finished run.")
        return
    scans = D.scans(tok)
    row = scans[scans["scan_id"] == scan_id].iloc[0]
    st.success(
        f"Stored scan **{row['name']}** (scan id {scan_id}) with {len(mine)} model run(s). The sidebar now "
        "selects it; the other pages show it too."
    )
    for r in mine.itertuples():
        g = D.grids(tok, int(r.run_id))
        left, right = st.columns(2)
        with left:
            fig = class_map_figure(g["pred"], title=f"Predicted class \u2014 {r.model}")
            fig.update_layout(height=420)
            st.plotly_chart(
                fig, config=png_config(f"upload_class_{row['name']}_{r.model}"), key=f"up_class_{r.run_id}"
            )
        with right:
            fig = scalar_map_figure(
                np.asarray(g["confidence"], float), title="Confidence", zmin=0, zmax=1, colorbar_title="p"
            )
            fig.update_layout(height=420)
            st.plotly_chart(
                fig, config=png_config(f"upload_conf_{row['name']}_{r.model}"), key=f"up_conf_{r.run_id}"
            )
    st.page_link("pages/3_Error_maps.py", label="Open it on the Error maps page", icon=":material/map:")


def _select_new_scan(scan_id: int, model: str | None) -> None:
    st.session_state["f_dataset"] = None
    st.session_state["f_scan"] = int(scan_id)
    if model:
        st.session_state["f_model"] = model
    state.clear_region()


with guard("The upload page"):
    job = jobs.get_job(st.session_state.get("up_job"))
    if job is not None and job.status == "running":
        st.info(f"Ingesting {job.label} \u2014 you can keep browsing the other pages meanwhile.")
        jobs.job_progress(job.job_id)
        st.stop()
    if job is not None and job.status == "failed":
        st.error(f"Ingest failed, the database is unchanged: {job.error}")
        st.session_state.pop("up_job", None)
    if job is not None and job.status == "done":
        D.clear_caches()
        st.session_state.pop("up_job", None)
        _select_new_scan(int(job.result), st.session_state.get("up_first_model"))
        st.session_state["up_done"] = int(job.result)
        st.rerun()
    if st.session_state.get("up_done") is not None:
        _show_result(int(st.session_state["up_done"]))
        if st.button("Upload another scan", key="up_again"):
            st.session_state.pop("up_done", None)
            st.rerun()
        st.stop()

    path, shown, is_upload = _source()
    if path is None:
        st.stop()
    info = _validate(path, shown, remove_on_error=is_upload)
    if info is None:
        st.stop()
    ny, nx = info["nav_shape"]
    ky, kx = info["sig_shape"]
    meta = info["meta"]
    cal = (
        ", ".join(
            f"{k} {v:g}"
            for k, v in (("step [nm]", meta.step_nm), ("mrad/px", meta.mrad_per_px), ("kV", meta.voltage_kv))
            if v is not None
        )
        or "no calibration"
    )
    st.success(f"**{shown}**: {ny}\u00d7{nx} positions of {ky}\u00d7{kx} px, {info['dtype']} ({cal}).")

    avail = available_models()
    if not avail:
        st.warning(
            f"No trained models under `{settings.models_dir()}`: build the demo (Overview page) or "
            "train models with `python -m polcore train` first."
        )
        st.stop()
    stored = set(ctx.models["name"]) if len(ctx.models) else set()
    names = sorted(avail)
    default = [n for n in names if n in stored] or names[:1]
    with st.form("up_form"):
        chosen = st.multiselect("Models", names, default=default, key="up_models")
        c1, c2, c3 = st.columns(3)
        name = c1.text_input("Scan name", value=Path(shown).stem, key="up_name")
        kind = c2.selectbox(
            "Kind", list(SCAN_KINDS), index=list(SCAN_KINDS).index("experimental"), key="up_kind"
        )
        dataset = c3.text_input("Data set", value="uploads", key="up_dataset")
        go = st.form_submit_button("Ingest", type="primary", icon=":material/play_arrow:")
    if go:
        if not chosen:
            st.error("Choose at least one model.")
            st.stop()
        st.session_state["up_first_model"] = chosen[0]
        new = jobs.start_job(
            "ingest",
            f"{name or path.stem} ({len(chosen)} model(s))",
            ingest_scan,
            path,
            list(chosen),
            ctx.db,
            name=name or None,
            kind=kind,
            dataset=dataset or None,
        )
        st.session_state["up_job"] = new.job_id
        st.rerun()
