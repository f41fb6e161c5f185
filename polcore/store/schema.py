"""DuckDB schema of the prediction store (version :data:`SCHEMA_VERSION`).

Tables
------
``schema_version(version, applied_at)``
    One row per schema version applied to the file (a store migrated from version 2 holds 2 and 3).
``polbench_store(marker, created_at)``
    The marker that makes a DuckDB file a polbench store: one row ``marker = STORE_MARKER``. The store opens
    only files that carry it (or the layout of a version-2 store, written before the marker existed, which is
    migrated in place); any other DuckDB file is refused and left untouched.
``scans``
    One row per scan file, unique by the file's ``sha256``. ``kind`` is one of :data:`SCAN_KINDS`;
    ``dataset`` is the benchmark row the scan belongs to (e.g. ``'synthetic 20 nm'``); ``ny, nx`` probe
    positions, ``ky, kx`` detector pixels; ``step_nm`` probe step [nm]; ``thickness_nm`` nominal
    thickness [nm] (NULL when unknown or varying); ``cell_px`` lattice period in scan pixels (NULL when
    unknown); ``meta_json`` anything else (calibration, composer config) as JSON text; ``status`` one of
    :data:`SCAN_STATUSES`. ``owner`` (``host:pid:start-token``) names the ingest that holds an 'ingesting'
    row and ``heartbeat_at`` is when that ingest last said it was alive; a row whose owner is dead is removed
    by the next ingest (:meth:`polcore.store.PredictionStore.cleanup_stale_ingests`).
``models``
    One row per trained model, unique by ``name``; ``config_json`` the full training config as JSON text,
    ``library_sha256`` the pattern library it was trained on, ``train_seconds`` [s].
``runs``
    One row per (model, scan) inference run, unique by ``(model_id, scan_id)``. Written in the same
    transaction as its predictions and set to ``status = 'finished'`` last; readers only ever see finished
    runs. ``seconds`` inference wall time [s], ``patterns_per_s`` throughput.
``predictions``
    One row per probe position of a run, appended in ``(run_id, iy, ix)`` order so that DuckDB's zonemaps
    prune per-run queries. ``pred`` class index 0..7 (``polcore.types``), ``confidence`` max probability,
    ``probs`` FLOAT[8] class probabilities (NULL for heads without probabilities), ``true_label`` ground-truth
    class (-1 = no label, as in the composer's files and ``polcore.analysis.metrics``), ``thickness_nm``
    local thickness [nm], ``region`` composer region / domain id, ``is_defect`` ground-truth defect mask,
    ``irregularity`` defect score. No index: per-run reads rely on the insertion order.
``embeddings``
    2-D embedding coordinates (``e1, e2``) of probe positions, one set per ``(model_id, method, space)``:
    ``space = 'input'`` embeds preprocessed patterns (``model_id`` may be NULL: model independent),
    ``space = 'features'`` a model's features. Several scans (synthetic and experimental) share one set, so
    the Embeddings page shows them in one frame. Full feature vectors are not stored.
``domain_gap``
    Two-sample scores between the features of two scans for one model: ``auc`` (classifier two-sample test,
    0.5 = indistinguishable) and ``mmd``; unique by ``(model_id, scan_a, scan_b)``.
``bench``
    The study's benchmark: one row per (model, dataset) with accuracy, macro-F1, per-class recall and the
    number of patterns ``n``; unique by ``(model_name, dataset)``.
``analysis_cache``
    ``key -> value_json`` for results that are slow to compute (periodicity, UMAP parameters, ...).
``scan_images``
    Virtual detector images of a scan, computed once in the ingest's pass over the file
    (:mod:`polcore.virtual`) and written in its final transaction: one row per ``(scan_id, kind)`` with
    ``kind`` one of :data:`IMAGE_KINDS` (``bf`` virtual bright field, ``adf`` annular dark field [counts];
    ``com_y``, ``com_x`` centre-of-mass shift [detector px] relative to the scan mean), ``ny, nx`` the scan's
    positions and ``data`` the image as little-endian float32 bytes in row-major order; ``meta_json`` the
    detectors used (disc centre and radius, ADF radii). Added by version 4: a store of version 3 or older
    has no such table until it is opened for writing (readers then find no images).

``id_counters(name, last_id)``
    The last identifier handed out per table. Identifiers are taken from it inside the write transaction:
    they are never reused after a delete or a ``replace`` (so caches keyed by id never serve stale rows),
    and a rolled-back write consumes none.
"""

from __future__ import annotations

__all__ = [
    "SCHEMA_VERSION",
    "LEGACY_VERSIONS",
    "STORE_MARKER",
    "LEGACY_TABLES",
    "ADDED_SCAN_COLUMNS",
    "LAYERS",
    "SCAN_KINDS",
    "SCAN_STATUSES",
    "IMAGE_KINDS",
    "RUN_STATUSES",
    "EMBEDDING_SPACES",
    "TABLES",
    "DDL",
]

#: Version of the layout below; stored in ``schema_version``. Version 4 added ``scan_images``.
SCHEMA_VERSION = 4
#: Older versions this code still reads (read-only) and migrates in place when the store is opened for writing
#: (version 3: the ``scan_images`` table is created; version 2: also the marker and the owner columns).
LEGACY_VERSIONS: tuple[int, ...] = (2, 3)
#: The ``polbench_store.marker`` value that identifies a polbench prediction store.
STORE_MARKER = "polbench prediction store"
#: Tables that a version-2 store (written before the marker existed) always has: together with
#: ``schema_version`` at version 2 they identify such a file.
LEGACY_TABLES: tuple[str, ...] = ("schema_version", "scans", "models", "runs", "predictions", "id_counters")
#: Columns added to ``scans`` by version 3 (``ALTER TABLE scans ADD COLUMN`` when migrating a version-2 store).
ADDED_SCAN_COLUMNS: tuple[tuple[str, str], ...] = (("owner", "VARCHAR"), ("heartbeat_at", "TIMESTAMP"))

#: Valid ``scans.kind`` values.
SCAN_KINDS: tuple[str, ...] = ("synthetic", "pseudo_experimental", "experimental")
#: Valid ``scans.status`` values.
SCAN_STATUSES: tuple[str, ...] = ("ready", "ingesting", "failed")
#: Valid ``runs.status`` values ('running' is never visible outside its own transaction).
RUN_STATUSES: tuple[str, ...] = ("running", "finished")
#: Valid ``runs.layer`` values: per probe position, or per projected unit cell (class log-probabilities of
#: the cell's positions pooled, the cell's class written at each of its positions).
LAYERS: tuple[str, ...] = ("pattern", "cell")
#: Valid ``scan_images.kind`` values (:data:`polcore.virtual.IMAGE_KINDS`).
IMAGE_KINDS: tuple[str, ...] = ("bf", "adf", "com_y", "com_x")
#: Valid ``embeddings.space`` values.
EMBEDDING_SPACES: tuple[str, ...] = ("input", "features")

#: Tables in creation order (also the order used to dump or compare a store).
TABLES: tuple[str, ...] = (
    "schema_version",
    "polbench_store",
    "scans",
    "models",
    "runs",
    "predictions",
    "embeddings",
    "domain_gap",
    "bench",
    "heldout",
    "analysis_cache",
    "id_counters",
    "scan_images",
)


def _in(values: tuple[str, ...]) -> str:
    """SQL list literal of constant strings (schema constants only, never user input)."""
    return "(" + ", ".join(f"'{v}'" for v in values) + ")"


#: Idempotent DDL (``CREATE ... IF NOT EXISTS``), executed in one transaction by the store.
DDL: tuple[str, ...] = (
    """CREATE TABLE IF NOT EXISTS schema_version (
        version INTEGER NOT NULL,
        applied_at TIMESTAMP NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS polbench_store (
        marker VARCHAR NOT NULL,
        created_at TIMESTAMP NOT NULL
    )""",
    f"""CREATE TABLE IF NOT EXISTS scans (
        scan_id INTEGER PRIMARY KEY,
        name VARCHAR NOT NULL,
        kind VARCHAR NOT NULL CHECK (kind IN {_in(SCAN_KINDS)}),
        dataset VARCHAR,
        source_file VARCHAR,
        sha256 VARCHAR NOT NULL UNIQUE,
        ny INTEGER NOT NULL CHECK (ny > 0),
        nx INTEGER NOT NULL CHECK (nx > 0),
        ky INTEGER CHECK (ky > 0),
        kx INTEGER CHECK (kx > 0),
        step_nm DOUBLE,
        thickness_nm DOUBLE,
        cell_px DOUBLE,
        has_ground_truth BOOLEAN NOT NULL,
        meta_json VARCHAR,
        created_at TIMESTAMP NOT NULL,
        status VARCHAR NOT NULL CHECK (status IN {_in(SCAN_STATUSES)}),
        owner VARCHAR,
        heartbeat_at TIMESTAMP
    )""",
    """CREATE TABLE IF NOT EXISTS models (
        model_id INTEGER PRIMARY KEY,
        name VARCHAR NOT NULL UNIQUE,
        family VARCHAR NOT NULL,
        head VARCHAR NOT NULL,
        variant VARCHAR NOT NULL,
        seed INTEGER,
        config_json VARCHAR,
        checkpoint_path VARCHAR,
        library_sha256 VARCHAR,
        train_seconds DOUBLE,
        n_params BIGINT,
        created_at TIMESTAMP NOT NULL
    )""",
    f"""CREATE TABLE IF NOT EXISTS runs (
        run_id INTEGER PRIMARY KEY,
        model_id INTEGER NOT NULL,
        scan_id INTEGER NOT NULL,
        started_at TIMESTAMP,
        finished_at TIMESTAMP,
        status VARCHAR NOT NULL CHECK (status IN {_in(RUN_STATUSES)}),
        n_patterns BIGINT,
        seconds DOUBLE,
        patterns_per_s DOUBLE,
        device VARCHAR,
        config_json VARCHAR,
        layer VARCHAR NOT NULL DEFAULT 'pattern' CHECK (layer IN {_in(LAYERS)}),
        UNIQUE (model_id, scan_id, layer)
    )""",
    """CREATE TABLE IF NOT EXISTS predictions (
        run_id INTEGER NOT NULL,
        iy SMALLINT NOT NULL,
        ix SMALLINT NOT NULL,
        pred TINYINT NOT NULL,
        confidence FLOAT,
        probs FLOAT[8],
        true_label TINYINT NOT NULL,
        thickness_nm FLOAT,
        region SMALLINT,
        is_defect BOOLEAN,
        irregularity FLOAT
    )""",
    f"""CREATE TABLE IF NOT EXISTS embeddings (
        model_id INTEGER,
        method VARCHAR NOT NULL,
        space VARCHAR NOT NULL CHECK (space IN {_in(EMBEDDING_SPACES)}),
        scan_id INTEGER NOT NULL,
        iy SMALLINT NOT NULL,
        ix SMALLINT NOT NULL,
        e1 FLOAT NOT NULL,
        e2 FLOAT NOT NULL,
        true_label TINYINT,
        thickness_nm FLOAT,
        created_at TIMESTAMP NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS domain_gap (
        model_id INTEGER NOT NULL,
        scan_a INTEGER NOT NULL,
        scan_b INTEGER NOT NULL,
        auc DOUBLE NOT NULL,
        mmd DOUBLE,
        n_a BIGINT,
        n_b BIGINT,
        created_at TIMESTAMP NOT NULL,
        UNIQUE (model_id, scan_a, scan_b)
    )""",
    """CREATE TABLE IF NOT EXISTS bench (
        bench_id INTEGER PRIMARY KEY,
        model_id INTEGER,
        model_name VARCHAR NOT NULL,
        family VARCHAR NOT NULL,
        head VARCHAR NOT NULL,
        variant VARCHAR NOT NULL,
        seed INTEGER,
        dataset VARCHAR NOT NULL,
        accuracy DOUBLE,
        macro_f1 DOUBLE,
        per_class_recall FLOAT[8],
        n BIGINT,
        created_at TIMESTAMP NOT NULL,
        UNIQUE (model_name, dataset)
    )""",
    """CREATE TABLE IF NOT EXISTS heldout (
        name VARCHAR NOT NULL,
        kind VARCHAR NOT NULL CHECK (kind IN ('model', 'limit')),
        role VARCHAR NOT NULL,
        dose DOUBLE,
        thickness_nm DOUBLE NOT NULL,
        per_pattern DOUBLE,
        per_cell DOUBLE,
        library_sha256 VARCHAR,
        created_at TIMESTAMP NOT NULL,
        UNIQUE (name, role, dose, thickness_nm)
    )""",
    """CREATE TABLE IF NOT EXISTS analysis_cache (
        key VARCHAR PRIMARY KEY,
        value_json VARCHAR NOT NULL,
        created_at TIMESTAMP NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS id_counters (
        name VARCHAR PRIMARY KEY,
        last_id BIGINT NOT NULL
    )""",
    f"""CREATE TABLE IF NOT EXISTS scan_images (
        scan_id INTEGER NOT NULL,
        kind VARCHAR NOT NULL CHECK (kind IN {_in(IMAGE_KINDS)}),
        ny INTEGER NOT NULL CHECK (ny > 0),
        nx INTEGER NOT NULL CHECK (nx > 0),
        data BLOB NOT NULL,
        meta_json VARCHAR,
        created_at TIMESTAMP NOT NULL,
        UNIQUE (scan_id, kind)
    )""",
)
