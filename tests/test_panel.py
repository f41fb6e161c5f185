"""Figure panels for slides (issue 16): `python -m polcore figure SCAN --model M --out panel.png` and
``polcore.panel.export_panel`` write valid PNG, SVG and PDF files of the expected size from a real store."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from app_fixtures import make_labels, write_checkpoint, write_plain_scan, write_scan
from PIL import Image

from polcore.cli import main
from polcore.ingest import ingest
from polcore.models import save_checkpoint
from polcore.models.com_direction import NAME as COM
from polcore.panel import (
    DPI,
    export_panel,
    nice_length,
    panel_figure,
    panel_size_in,
    panel_size_px,
    save_panel,
)

KNN = "pca_knn-cls-s0"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A store with a labelled scan and an unlabelled one, each ingested with PCA+kNN and the CoM baseline."""
    root = tmp_path_factory.mktemp("panel")
    models = root / "models"
    write_checkpoint(models, np.random.default_rng(3))
    meta = json.loads((models / f"{KNN}.json").read_text())
    from polcore.models.com_direction import ComDirectionModel

    save_checkpoint(ComDirectionModel(), models / COM, meta={"preprocessing": meta["preprocessing"]})
    db = root / "p.duckdb"
    lab = ingest(write_plain_scan(root / "lab.h5", 18, 24, seed=1), None, db, kind="synthetic", model_dir=models,
                 name="labelled")
    r = np.random.default_rng(5)
    labels = make_labels(16, 16, r)
    nogt = write_scan(root / "nogt.h5", labels, np.full((16, 16), 20.0, np.float32), np.zeros((16, 16), bool), r,
                      ground_truth=False)
    unl = ingest(nogt, None, db, kind="experimental", model_dir=models, name="unlabelled")
    return dict(root=root, db=db, labelled=lab.scan_id, unlabelled=unl.scan_id)


def test_png_svg_pdf_are_valid_files_of_the_expected_size(store, tmp_path):
    w, h = panel_size_px(True)
    assert (w, h) == (round(panel_size_in(True)[0] * DPI), round(panel_size_in(True)[1] * DPI))
    png = export_panel(store["db"], "labelled", KNN, tmp_path / "out" / "panel.png")
    with Image.open(png) as im:
        im.verify()
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (w, h)
        px = np.asarray(im.convert("RGB"))
    assert px.std() > 10  # something is drawn, not a blank page
    fig = panel_figure(store["db"], store["labelled"], COM, layer="cell")  # one figure, two more formats
    svg = save_panel(fig, tmp_path / "panel.svg")
    root = ET.parse(svg).getroot()
    assert root.tag.endswith("svg")
    assert float(root.get("width").removesuffix("pt")) == pytest.approx(panel_size_in(True)[0] * 72)
    assert float(root.get("height").removesuffix("pt")) == pytest.approx(panel_size_in(True)[1] * 72)
    pdf = save_panel(fig, tmp_path / "panel.pdf")
    data = pdf.read_bytes()
    assert data.startswith(b"%PDF") and b"%%EOF" in data[-64:]
    assert not list(tmp_path.glob(".*.tmp"))  # written via a temporary name, nothing left behind


def test_a_scan_without_ground_truth_gets_two_panels(store, tmp_path):
    fig = panel_figure(store["db"], "unlabelled", KNN)
    assert len(fig.axes) == 2
    png = export_panel(store["db"], "unlabelled", KNN, tmp_path / "nogt.png")
    with Image.open(png) as im:
        assert im.size == panel_size_px(False)


def test_panel_contents_follow_the_store(store):
    """Four panels with ground truth; the arrows come from the cell layer; the confusion counts are the
    labelled positions of the run."""
    from polcore.store import PredictionStore, queries

    fig = panel_figure(store["db"], "labelled", COM)
    titles = [a.get_title() for a in fig.axes]
    assert titles[0].startswith("virtual ADF, arrows per unit cell")
    assert titles[3] == "confusion (432 labelled positions)"  # 18 x 24, every position labelled
    ro = PredictionStore(store["db"], read_only=True)
    runs = queries.list_runs(ro, scan_ids=[store["labelled"]])
    rid = int(runs[(runs["model"] == COM) & (runs["layer"] == "pattern")]["run_id"].iloc[0])
    g = queries.run_grids(ro, rid)
    acc = float(np.mean(g["pred"] == g["true_label"]))
    assert f"accuracy {acc:.3f}" in titles[2]
    quiver = [c for c in fig.axes[0].collections if c.__class__.__name__ == "Quiver"][0]
    cell = float(queries.run_config(ro, int(runs[(runs["model"] == COM) & (runs["layer"] == "cell")]["run_id"]
                                               .iloc[0]))["cell_px"])
    n_cells = int(np.ceil(18 / cell - 1e-9)) * int(np.ceil(24 / cell - 1e-9))
    assert len(quiver.U) == n_cells
    # each arrow points along its class on screen: the image's rows run down, so up the screen is -row
    assert fig.axes[0].yaxis_inverted()
    hexes = [tuple(np.round(c[:3], 3)) for c in quiver.get_facecolors()]
    from polcore.figures import class_wheel_colors
    from polcore.types import class_to_vector

    wheel = [tuple(np.round([int(h[i:i + 2], 16) / 255 for i in (1, 3, 5)], 3)) for h in class_wheel_colors()]
    for u, v, col in zip(quiver.U, quiver.V, hexes):
        k = wheel.index(col)
        vec = class_to_vector(k)
        assert np.dot([u, -v], vec) / np.hypot(u, v) > 0.999


def test_cli_figure_and_its_errors(store, tmp_path, capsys):
    out = tmp_path / "cli.png"
    assert main(["figure", "labelled", "--model", KNN, "--out", str(out), str(tmp_path / "cli.svg"),
                 "--db", str(store["db"])]) == 0
    said = capsys.readouterr().out
    assert f"PNG {panel_size_px(True)[0]} x {panel_size_px(True)[1]} px" in said
    with Image.open(out) as im:
        assert im.size == panel_size_px(True)
    assert main(["figure", "labelled", "--model", "nope", "--out", str(tmp_path / "x.png"),
                 "--db", str(store["db"])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model 'nope' has no run" in err[0] and KNN in err[0]
    assert main(["figure", "missing", "--model", KNN, "--out", str(tmp_path / "x.png"),
                 "--db", str(store["db"])]) == 2
    assert "no ready scan 'missing'" in capsys.readouterr().err
    assert main(["figure", "labelled", "--model", KNN, "--out", str(tmp_path / "x.gif"),
                 "--db", str(store["db"])]) == 2
    assert "unsupported figure format of" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "x.gif").exists()
    with pytest.raises(ValueError, match="unsupported figure format '.tif'"):
        export_panel(store["db"], "labelled", KNN, tmp_path / "x.tif")


def test_nice_length():
    assert [nice_length(v) for v in (0.37, 1.0, 4.9, 7.0, 23.0)] == [0.2, 1.0, 2.0, 5.0, 20.0]
    with pytest.raises(ValueError):
        nice_length(0.0)
