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
from ui.backend import (
    DISK_MARGIN_BYTES,
    UPLOAD_MAX_AGE_S,
    UploadRefused,
    available_models,
    cleanup_uploads_if_due,
    estimate_scan_geometry,
    ingest_scan,
    live_map,
    save_upload,
    validate_scan,
)
from ui.maps import png_config

ctx = init_page("Upload", icon=":material/upload_file:")
st.title("Upload a scan")
#: Per-file limit of a browser upload [MB]: ``server.maxUploadSize`` in .streamlit/config.toml.
LIMIT_MB = int(st.get_option("server.maxUploadSize"))
_CAP = jobs.MAX_RUNNING.get("ingest", 1)
#: How often the map of a running ingest is redrawn [s].
LIVE_EVERY_S = 3.0


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:g} h"


st.caption(
    "Any format polcore reads: HDF5 (generic, py4DSTEM/EMD 1.0, Prismatic, ARINA), NumPy .npy, Merlin "
    f".mib, NanoMegas .blo. **Browser uploads: at most {LIMIT_MB} MB per file.** Larger scans: copy the file "
    f"under the data directory `{paths.data_dir()}` (scp, rsync, a shared drive) and choose *Path on the "
    "server*: it is read where it lies, never held in memory nor copied."
)
with st.expander("What happens to an uploaded file", icon=":material/info:"):
    st.markdown(
        f"""
1. **Once your browser has sent it, the whole file is held in the server's memory until it is saved** (that
   is how Streamlit receives uploads, one copy per browser session; hence the {LIMIT_MB} MB limit per file).
2. The server checks the free disk space first: it refuses the file unless its size plus
   {DISK_MARGIN_BYTES / 2**30:g} GB stay free. Then it writes the file to `{paths.uploads_dir()}` in chunks,
   computing its sha256 on the way, and **drops the in-memory copy** (the upload box empties).
3. The saved file is opened to check that it is a 4D-STEM scan; a file that cannot be read is deleted at once.
4. It is ingested only when you press *Ingest*. **{_CAP} ingest runs at a time on this server**; others wait
   in line (the page shows your place) and start in turn. While it runs, the class map of the first chosen
   model fills in every {LIVE_EVERY_S:g} s, with patterns/s and the time left. A waiting or running ingest can
   be cancelled: nothing is stored then (a running one rolls back what it wrote).
5. **An upload that was never ingested is deleted {_hours(UPLOAD_MAX_AGE_S)} after it was saved**; the files
   of stored scans are kept.
"""
    )


def _show_message() -> None:
    """A message left by the run that ended with st.rerun (a refused upload)."""
    msg = st.session_state.pop("up_msg", None)
    if msg:
        getattr(st, msg[0])(msg[1])


def _forget_upload(*, delete: bool) -> None:
    """Forget the saved upload of this session; delete its file when asked and no ingest uses it."""
    cur = st.session_state.pop("up_current", None)
    if delete and cur:
        p = Path(cur["path"])
        if p.resolve() not in jobs.active_paths():
            p.unlink(missing_ok=True)


def _release_upload(up) -> None:
    """Drop a browser upload from Streamlit's memory once it is on disk.

    Streamlit keeps the bytes in its ``MemoryUploadedFileManager`` (per session, until the browser deletes
    the file or the session ends), and the uploader's value (an ``UploadedFile``, a BytesIO over the same
    bytes) in the widget state. ``remove_file`` drops the first, as ``st.chat_input`` does after reading its
    files; a new widget key makes the old widget stale, and Streamlit deletes a stale widget's state at the
    end of the next full run (``SessionState._remove_stale_widgets``).
    """
    from streamlit.runtime.memory_uploaded_file_manager import MemoryUploadedFileManager
    from streamlit.runtime.scriptrunner import get_script_run_ctx

    run_ctx = get_script_run_ctx()
    fid = getattr(up, "file_id", None)
    if run_ctx is not None and fid and isinstance(run_ctx.uploaded_file_mgr, MemoryUploadedFileManager):
        run_ctx.uploaded_file_mgr.remove_file(session_id=run_ctx.session_id, file_id=fid)
    up.close()  # the BytesIO lets go of its buffer
    st.session_state["up_nonce"] = int(st.session_state.get("up_nonce", 0)) + 1


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
        _forget_upload(delete=True)
        _upload_widget()  # offer the upload box again at once
    return None


def _upload_widget():
    return st.file_uploader(
        "Scan file",
        key=f"up_file_{st.session_state.get('up_nonce', 0)}",
        help=f"At most {LIMIT_MB} MB per file (server.maxUploadSize); larger scans: Path on the server.",
    )


def _source() -> tuple[Path | None, str, bool]:
    """(path, display name, is_upload) of the scan to ingest, or (None, '', False)."""
    mode = st.radio("Source", ["Upload a file", "Path on the server"], horizontal=True, key="up_mode")
    if mode == "Upload a file":
        _show_message()
        cur = st.session_state.get("up_current")
        if cur and not Path(cur["path"]).is_file():
            _forget_upload(delete=False)
            st.info(
                f"The earlier upload {cur['name']} is gone (uploads never ingested are deleted "
                f"{_hours(UPLOAD_MAX_AGE_S)} after they were saved): upload it again."
            )
            cur = None
        if cur:
            left, right = st.columns([4, 1])
            size_mb = Path(cur["path"]).stat().st_size / 2**20
            left.caption(
                f"**{cur['name']}** ({size_mb:.1f} MB) is saved as `{cur['path']}`; the server no longer "
                "holds it in memory."
            )
            if right.button("Discard", key="up_discard", help="Delete the saved file and upload another."):
                _forget_upload(delete=True)
                st.rerun()
            return Path(cur["path"]), cur["name"], True
        up = _upload_widget()
        if up is None:
            return None, "", False
        fid = getattr(up, "file_id", None) or f"{up.name}-{up.size}"
        try:
            with st.spinner(f"Writing {up.name} to disk ..."):
                saved = save_upload(up, up.name, fid)
        except UploadRefused as exc:
            st.session_state["up_msg"] = ("error", f"**{up.name}** refused: {exc}")
        except OSError as exc:  # disk full while writing, permissions: the partial file is already gone
            st.session_state["up_msg"] = ("error", f"**{up.name}** could not be written: {short_error(exc)}")
        else:
            st.session_state["up_current"] = {"path": str(saved), "name": up.name}
        _release_upload(up)
        st.rerun()
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


def _tag(g: dict, key: str) -> str:
    src = (g.get("sources") or {}).get(key, "?")
    conf = (g.get("confidence") or {}).get(key)
    return f"{src}, {conf} confidence" if src == "estimated" and conf else src


def _geometry_section(path: Path) -> dict:
    """Show the scan geometry found before the run and let the user correct it; the ingest's overrides."""
    st.subheader("Scan geometry")
    try:
        with st.spinner("Reading the first patterns for the scan geometry ..."):
            found = estimate_scan_geometry(path)
    except Exception as exc:  # noqa: BLE001 - never a traceback; the ingest estimates it again
        st.warning(f"The scan geometry could not be estimated here ({short_error(exc)}); the ingest tries again.")
        return {}
    est, app = found["estimate"], found["applied"]
    d = (est.get("details") or {}).get("descan") or {}
    applied_descan = (app.get("sources") or {}).get("descan") in ("estimated", "user") and app.get("descan_y")
    descan = (f"{d.get('range_y_px', 0.0):.1f} \u00d7 {d.get('range_x_px', 0.0):.1f} px" if d else "not measured")
    mrad = est.get("mrad_per_px")
    c = st.columns(4)
    c[0].metric("Rotation", f"{est['rotation_deg']:.1f}\u00b0", help="detector-to-scan, counter-clockwise on screen "
                "(py4DSTEM QR_rotation_degrees)")
    rot_used = "applied" if app["rotation_deg"] == est["rotation_deg"] else "NOT applied: 0\u00b0 used"
    if rot_used == "applied" and (app.get("sources") or {}).get("rotation_deg") == "estimated":
        rot_used += " (the run refines it within \u00b12\u00b0 with the first model)"
    c[0].caption(f"{_tag(est, 'rotation_deg')}; {rot_used}")
    c[1].metric("Flip", "flip" if est["flip"] else "no flip", help="transpose of the detector axes (QR_flip)")
    c[1].caption(f"{_tag(est, 'flip')}; {'applied' if app['flip'] == est['flip'] else 'NOT applied'}")
    c[2].metric("Descan range", descan, help="how far the disc wanders across the scan (edge-fitted surface)")
    c[2].caption(f"{_tag(est, 'descan')}; {'applied' if applied_descan else 'not applied (one centre)'}")
    c[3].metric("mrad/px", "?" if mrad is None else f"{mrad:.3f}")
    c[3].caption(_tag(est, "mrad_per_px"))
    for w in found["warnings"]:
        st.warning(w, icon=":material/warning:")
    st.caption(f"From the first {found['n_patterns']} patterns (the ones the ingest fits on). File or user values "
               "are always applied; estimates only with high confidence.")
    keep = st.checkbox("Use the file's / estimated values", value=True, key="up_geom_keep",
                       help="Untick to give the detector rotation and flip yourself (e.g. from a calibration scan "
                            "of a known crystal).")
    if keep:
        return {}
    g1, g2 = st.columns(2)
    rot = g1.number_input("Rotation [deg]", min_value=-180.0, max_value=180.0, value=float(est["rotation_deg"]),
                          step=0.5, key="up_geom_rot", help="counter-clockwise on screen, as py4DSTEM QR_rotation_degrees")
    flip = g2.checkbox("Flip (transpose the detector axes first)", value=bool(est["flip"]), key="up_geom_flip")
    return {"rotation_deg": float(rot), "flip": bool(flip)}


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "\u2026"
    s = int(round(seconds))
    return f"{s // 3600} h {s % 3600 // 60:02d} min" if s >= 3600 else f"{s // 60} min {s % 60:02d} s" if s >= 60 \
        else f"{s} s"


@st.fragment(run_every=LIVE_EVERY_S)
def _live_map(job_id: str) -> None:
    """The class map of the first chosen model filling in while the ingest runs, with its rate and time left."""
    job = jobs.get_job(job_id)
    live = getattr(job, "live", None) if job is not None else None
    snap = live.snapshot() if live is not None and job.status == "running" else None
    if snap is None:
        if job is not None and job.status == "running":
            st.caption("The map fills in here once the models run (the first patterns fit the preprocessing).")
        return
    c = st.columns(3)
    c[0].metric("Positions done", f"{snap['done']:,} / {snap['total']:,}")
    c[1].metric("Patterns/s", "\u2026" if snap["rate"] is None else f"{snap['rate']:,.0f}",
                help=f"positions per second through every chosen model, over the last {live.window_s:.0f} s")
    c[2].metric("Time left", _duration(snap["eta_s"]), help="at the current rate")
    fig = class_map_figure(snap["pred"], title=f"Predicted class \u2014 {snap['model']} (filling in)")
    fig.update_layout(height=420)
    st.plotly_chart(fig, config=png_config(f"upload_live_{snap['model']}"), key=f"up_live_{job_id}")
    st.caption(f"Grey: not predicted yet. Redrawn every {LIVE_EVERY_S:g} s; the stored maps appear when the run ends.")


def _select_new_scan(scan_id: int, model: str | None) -> None:
    st.session_state["f_dataset"] = None
    st.session_state["f_scan"] = int(scan_id)
    if model:
        st.session_state["f_model"] = model
    state.clear_region()


with guard("The upload page"):
    _cur = st.session_state.get("up_current")
    cleanup_uploads_if_due(keep=jobs.active_paths() | ({Path(_cur["path"])} if _cur else set()))
    job = jobs.get_job(st.session_state.get("up_job"))
    if job is not None and job.status in jobs.ACTIVE:
        if job.status == "queued":
            st.info(
                f"{job.label} waits for its turn: {_CAP} ingest runs at a time on this server. It starts by "
                "itself; you can keep browsing the other pages meanwhile."
            )
        else:
            st.info(f"Ingesting {job.label} \u2014 you can keep browsing the other pages meanwhile.")
        jobs.job_progress(job.job_id)
        if job.status == "running" and job.live is not None:
            _live_map(job.job_id)
        if job.cancel_requested:
            st.caption("Cancelling: the ingest stops at its next step and removes what it wrote ...")
        else:
            st.button(
                "Cancel" if job.status == "running" else "Leave the queue",
                key="up_cancel",
                icon=":material/cancel:",
                on_click=jobs.cancel_job,
                args=(job.job_id,),
                help="Stop the ingest; nothing is stored (what it wrote so far is removed).",
            )
        st.stop()
    if job is not None and job.status == "cancelled":
        st.warning("Cancelled, nothing was stored.")
        st.session_state.pop("up_job", None)
    if job is not None and job.status == "failed":
        st.error(f"Ingest failed, the database is unchanged: {job.error}")
        st.session_state.pop("up_job", None)
    if job is not None and job.status == "done":
        D.clear_caches()
        st.session_state.pop("up_job", None)
        st.session_state.pop("up_current", None)  # stored now: its file stays
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
    geom_overrides = _geometry_section(path)

    avail = available_models()
    if not avail:
        st.warning(
            f"No trained models under `{settings.models_dir()}`: build the demo (Overview page) or "
            "train models with `python -m polcore train` first."
        )
        st.stop()
    stored = set(ctx.models["name"]) if len(ctx.models) else set()
    from polcore.train import RECOMMENDED_MODEL

    names = sorted(avail)
    # the recommended model alone by default: its map is there soonest; add others to compare them
    default = ([RECOMMENDED_MODEL] if RECOMMENDED_MODEL in names
               else [n for n in names if n in stored] or names[:1])
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
        live = live_map(chosen[0])  # the job fills it in, the page's fragment shows it
        try:
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
                live=live,
                **geom_overrides,
            )
        except jobs.QueueFull as exc:
            st.error(f"Not started: {exc}")
            st.stop()
        new.path = str(path)
        new.live = live
        st.session_state["up_job"] = new.job_id
        st.rerun()
