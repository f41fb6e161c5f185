"""Model registry: families ``custom_cnn``, ``resnet``, ``vgg`` (torch), ``pca_knn`` (scikit-learn) and
``com_direction`` (the classical centre-of-mass direction, no training); heads ``cls``, ``reg``, ``proto``
(``pca_knn`` and ``com_direction``: ``cls`` only).

``build_model(family, head="cls", **cfg)`` returns an estimator with ``fit(X, y, X_val, y_val, ...)``,
``predict(X)``, ``predict_proba(X)`` (n, 8), ``embed(X)`` (n, d) and ``infer(X)`` (all three), where X is
(n, 64, 64) float32 preprocessed patterns. ``save_checkpoint`` / ``load_checkpoint`` write and read models with
their metadata: torch files of plain tensors plus a JSON string (``torch.load(weights_only=True)``), or ``.npz``
arrays for ``pca_knn`` (``np.load(allow_pickle=False)``); a ``.json`` sidecar sits next to every checkpoint.

A torch checkpoint may also hold a composite, :class:`polcore.models.experts.ThicknessExperts` (a general
network and thickness experts mixed by a per-pattern thickness gate; ``meta["composite"]``), which
``load_checkpoint`` rebuilds; it has the same ``infer`` / ``predict_proba`` / ``embed`` contract.

Torch and scikit-learn are imported only when a model is built or loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
from importlib import metadata
from pathlib import Path

import numpy as np

from polcore.types import CLASS_NAMES, jsonable

__all__ = [
    "FAMILIES",
    "HEADS",
    "FAMILY_HEADS",
    "UNTRAINED_FAMILIES",
    "ALL_FAMILIES",
    "CHECKPOINT_FORMAT",
    "build_model",
    "save_checkpoint",
    "load_checkpoint",
    "read_checkpoint_meta",
    "checkpoint_suffix",
    "versions",
]

log = logging.getLogger(__name__)

#: the families that are trained (``polcore.train``)
FAMILIES: tuple[str, ...] = ("custom_cnn", "resnet", "vgg", "pca_knn")
HEADS: tuple[str, ...] = ("cls", "reg", "proto")
#: heads available for each family
FAMILY_HEADS: dict[str, tuple[str, ...]] = {
    "custom_cnn": HEADS, "resnet": HEADS, "vgg": HEADS, "pca_knn": ("cls",), "com_direction": ("cls",),
}
#: families with nothing to train (no training profile makes them; their checkpoints hold fixed settings)
UNTRAINED_FAMILIES: tuple[str, ...] = ("com_direction",)
#: every family a checkpoint may hold (``build_model``, ``load_checkpoint``)
ALL_FAMILIES: tuple[str, ...] = FAMILIES + UNTRAINED_FAMILIES
#: families whose checkpoints are ``.npz`` arrays (``to_arrays`` / ``from_arrays``), not torch files
_NPZ_FAMILIES: tuple[str, ...] = ("pca_knn", "com_direction")
CHECKPOINT_FORMAT = "polbench-model/1"

_TORCH_CFG = {
    "arch": None,  # family-specific default
    "hidden": 512,
    "embed_dim": 128,
    "sigma": 1.25,
    "temperature": 0.1,
    "kappa": 5.0,
    "distance": "sqeuclidean",
    "input_size": 64,
    "input_norm": True,
}
_PCA_CFG = {"n_components": 20, "n_neighbors": 5, "random_state": 0, "input_size": 64}
_COM_CFG = {"kappa": 0.5, "sign": 1, "input_size": 64}
_RUNTIME_KEYS = ("device", "weights_path")


def _family_module(family: str):
    import importlib

    return importlib.import_module(f"polcore.models.{family}")


def build_model(family: str, head: str = "cls", **cfg):
    """Build an untrained model.

    Parameters
    ----------
    family : one of ``ALL_FAMILIES`` (the trained ``FAMILIES`` and the untrained ``com_direction``).
    head : one of ``HEADS`` (``pca_knn`` has ``cls`` only).
    **cfg : torch families: ``arch`` (resnet: resnet18 | resnet34 | resnet50; vgg: vgg11_bn | vgg13_bn |
        vgg16_bn; custom_cnn: study), ``hidden`` (neck width, 512), ``embed_dim`` (proto, 128), ``sigma`` (proto
        soft labels, 1.25 class steps), ``distance`` (proto training distance: 'sqeuclidean' or the study's
        'euclidean'), ``temperature`` (proto probabilities, 0.1), ``kappa`` (reg
        probabilities, 5), ``input_size`` (64), ``input_norm`` (True: subtract the training mean pattern and
        divide by the residual std, fitted in ``fit``; see ``base.InputNorm``), ``device`` ('cpu' | 'cuda'; default CUDA when available),
        ``weights_path`` (a local state-dict file to initialise from; never downloaded).
        pca_knn: ``n_components`` (20), ``n_neighbors`` (5), ``random_state``, ``input_size``.
        com_direction: ``kappa`` (logit scale, 0.5 / px), ``sign`` (+1: CoM along P), ``input_size``.

    Returns
    -------
    ``TorchModel`` or ``PCAKNNModel``.
    """
    if family not in ALL_FAMILIES:
        raise ValueError(f"unknown model family {family!r}; valid: {', '.join(ALL_FAMILIES)}")
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; valid: {', '.join(HEADS)}")
    if head not in FAMILY_HEADS[family]:
        raise ValueError(f"family {family!r} has no head {head!r}; valid: {', '.join(FAMILY_HEADS[family])}")
    if family == "com_direction":
        bad = sorted(set(cfg) - set(_COM_CFG))
        if bad:
            raise ValueError(f"unknown com_direction options {bad}; valid: {', '.join(_COM_CFG)}")
        from polcore.models.com_direction import ComDirectionModel

        return ComDirectionModel(**{**_COM_CFG, **cfg})
    if family == "pca_knn":
        bad = sorted(set(cfg) - set(_PCA_CFG))
        if bad:
            raise ValueError(f"unknown pca_knn options {bad}; valid: {', '.join(_PCA_CFG)}")
        from polcore.models.pca_knn import PCAKNNModel

        return PCAKNNModel(**{**_PCA_CFG, **cfg})
    bad = sorted(set(cfg) - set(_TORCH_CFG) - set(_RUNTIME_KEYS))
    if bad:
        raise ValueError(f"unknown {family} options {bad}; valid: {', '.join(list(_TORCH_CFG) + list(_RUNTIME_KEYS))}")
    from polcore.models.base import Net, TorchModel, load_weights_file
    from polcore.models.heads import make_head

    device = cfg.pop("device", None)
    weights_path = cfg.pop("weights_path", None)
    mod = _family_module(family)
    c = {**_TORCH_CFG, **cfg}
    c["arch"] = c["arch"] or mod.DEFAULT_ARCH
    backbone, n_feat = mod.build_backbone(c["arch"], input_size=int(c["input_size"]))
    head_mod = make_head(head, int(c["hidden"]), embed_dim=int(c["embed_dim"]), sigma=float(c["sigma"]),
                         temperature=float(c["temperature"]), kappa=float(c["kappa"]), distance=str(c["distance"]))
    net = Net(backbone, n_feat, head_mod, hidden=int(c["hidden"]), input_size=int(c["input_size"]),
              input_norm=bool(c["input_norm"]))
    model = TorchModel(family, head, net, c, device=device)
    if weights_path is not None:
        rep = load_weights_file(model.net, weights_path)
        model.meta["init_weights"] = {
            "path": rep["path"], "sha256": _sha256(Path(weights_path)), "n_loaded": len(rep["loaded"]),
            "n_skipped": len(rep["skipped"]),
        }
        model.net.to(model.device)
    return model


# ------------------------------------------------------------------------------------------- checkpoints
def versions() -> dict:
    """Versions of the packages a checkpoint depends on (read from package metadata; imports nothing)."""
    import polcore

    out = {"polcore": polcore.__version__, "numpy": np.__version__, "python": platform.python_version()}
    for pkg in ("torch", "torchvision", "scikit-learn"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:  # pragma: no cover - depends on the environment
            out[pkg] = None
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def checkpoint_suffix(family: str) -> str:
    """File suffix of a family's checkpoints: '.npz' for pca_knn and com_direction, '.pt' otherwise."""
    if family not in ALL_FAMILIES:
        raise ValueError(f"unknown model family {family!r}; valid: {', '.join(ALL_FAMILIES)}")
    return ".npz" if family in _NPZ_FAMILIES else ".pt"





def save_checkpoint(model, path, meta: dict | None = None) -> Path:
    """Write ``model`` and its metadata; returns the path written (suffix fixed to the family's).

    The metadata holds family, head, model_cfg (rebuilds the architecture), classes, input size, versions,
    history and best epoch, plus everything in ``model.meta`` and ``meta`` (training config, preprocessing,
    library sha256, train seconds...). A JSON sidecar ``<name>.json`` holds the same metadata. Files are written
    to a temporary name and renamed, so a crash never leaves half a checkpoint.
    """
    path = Path(path)
    path = path.with_suffix(checkpoint_suffix(model.family))
    path.parent.mkdir(parents=True, exist_ok=True)
    m = {**model.meta, **(meta or {})}
    m.update(
        format=CHECKPOINT_FORMAT,
        family=model.family,
        head=model.head,
        model_cfg=dict(model.cfg),
        classes=list(CLASS_NAMES),
        input_size=int(model.input_size),
        embed_dim=int(model.embed_dim),
        versions=versions(),
        history=list(getattr(model, "history_", []) or []),
        best_epoch=getattr(model, "best_epoch_", None),
    )
    m = jsonable(m)
    meta_json = json.dumps(m)
    tmp = path.with_name(path.name + ".tmp")
    if model.family in _NPZ_FAMILIES:
        with open(tmp, "wb") as fh:
            np.savez(fh, meta_json=np.array(meta_json), **model.to_arrays())
    else:
        import torch

        torch.save({"format": CHECKPOINT_FORMAT, "state_dict": model.state_dict(), "meta_json": meta_json}, tmp)
    os.replace(tmp, path)
    side = path.with_suffix(".json")
    tmp_side = side.with_name(side.name + ".tmp")
    tmp_side.write_text(json.dumps(m, indent=1))
    os.replace(tmp_side, side)
    model.meta = m
    log.info("saved %s %s checkpoint to %s", model.family, model.head, path)
    return path


def read_checkpoint_meta(path) -> dict:
    """Metadata of a checkpoint (from its JSON sidecar when present, else from the file itself)."""
    path = Path(path)
    side = path.with_suffix(".json")
    if side.is_file():
        return json.loads(side.read_text())
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as f:
            return json.loads(str(f["meta_json"]))
    import torch

    return json.loads(torch.load(path, map_location="cpu", weights_only=True)["meta_json"])


def load_checkpoint(path, device: str | None = None):
    """Rebuild a model from a checkpoint written by :func:`save_checkpoint`; ``model.meta`` holds its metadata.

    Raises
    ------
    FileNotFoundError if the file is missing; ValueError if it is not a polbench model checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    if path.suffix == ".npz":
        from polcore.models.pca_knn import PCAKNNModel

        with np.load(path, allow_pickle=False) as f:
            if "meta_json" not in f.files:
                raise ValueError(f"{path}: not a polbench model checkpoint (no meta_json)")
            meta = json.loads(str(f["meta_json"]))
            arrays = {k: f[k] for k in f.files if k != "meta_json"}
        if meta.get("family") == "com_direction":
            from polcore.models.com_direction import ComDirectionModel

            model = ComDirectionModel.from_arrays(arrays, meta["model_cfg"])
        else:
            model = PCAKNNModel.from_arrays(arrays, meta["model_cfg"])
    else:
        import torch

        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # unpickling errors come in many types
            raise ValueError(f"{path}: cannot read as a polbench model checkpoint ({exc})") from exc
        if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path}: not a polbench model checkpoint (expected format {CHECKPOINT_FORMAT})")
        meta = json.loads(obj["meta_json"])
        if meta.get("composite") is not None:
            from polcore.models.experts import COMPOSITE, ThicknessExperts

            if meta["composite"] != COMPOSITE:
                raise ValueError(f"{path}: unknown composite model {meta['composite']!r}")
            model = ThicknessExperts.from_state(obj["state_dict"], meta, device=device)
        else:
            model = build_model(meta["family"], meta["head"], **meta["model_cfg"], device=device)
            model.load_state_dict(obj["state_dict"], strict=True)
            model.net.eval()
        model.history_ = meta.get("history", [])
        model.best_epoch_ = meta.get("best_epoch")
    model.meta = meta
    model.meta["checkpoint_path"] = str(path)
    return model
