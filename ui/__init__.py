"""Shared Streamlit helpers of the dashboard (polcore itself never imports streamlit).

Every page starts with :func:`init_page` and wraps its body in :func:`guard`; filters live in plain
``st.session_state`` keys mirrored to the URL (:mod:`ui.state`); cached reads are in :mod:`ui.data`; long
work runs in background threads (:mod:`ui.jobs`); maps get box/click interaction from :mod:`ui.maps`.
"""

from ui.page import (
    PageContext,
    download_table,
    guard,
    init_page,
    require_db,
    require_run,
    scan_label,
    short_error,
)

__all__ = [
    "PageContext",
    "init_page",
    "guard",
    "short_error",
    "require_db",
    "require_run",
    "download_table",
    "scan_label",
]
