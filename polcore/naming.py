"""The one model-name scheme, shared by training (checkpoint file names), ingest (``models.name`` in the
store) and the dashboard (model pickers): ``family[-arch]-head-s<seed>[-tag]``, e.g.
``custom_cnn-binned-cls-s888`` or ``pca_knn-cls-s888``.
"""

from __future__ import annotations

__all__ = ["DEFAULT_ARCH", "run_name", "model_name", "model_variant"]

#: Architecture of a family when a config names none.
DEFAULT_ARCH = {"custom_cnn": "study", "resnet": "resnet18", "vgg": "vgg11_bn"}


def run_name(family: str, head: str, seed, arch: str | None = None, tag: str | None = None) -> str:
    """File-name-safe model name from its recipe (PCA+kNN has no architecture; the untrained CoM-direction
    baseline has neither architecture nor seed: ``com_direction-cls``)."""
    if family == "com_direction":
        return "-".join(str(p) for p in (family, head, tag) if p)
    parts = [family]
    if family != "pca_knn":
        parts.append(arch or DEFAULT_ARCH[family])
    parts += [head, f"s{seed}"]
    if tag:
        parts.append(tag)
    return "-".join(str(p) for p in parts)


def model_name(meta: dict) -> str:
    """A checkpoint's model name from its metadata (``train_config``); the same name training gave its file."""
    cfg = meta.get("train_config") or meta.get("config") or {}
    family = cfg.get("family", meta.get("family"))
    head = cfg.get("head", meta.get("head"))
    seed = cfg.get("seed", meta.get("seed"))
    if family == "com_direction":
        return run_name(family, head, None, tag=cfg.get("tag"))
    if family in DEFAULT_ARCH or family == "pca_knn":
        arch = cfg.get("arch") or (meta.get("model_cfg") or {}).get("arch")
        return run_name(family, head, seed, arch, cfg.get("tag"))
    name = (meta.get("train_result") or {}).get("name")
    if name:
        return str(name)
    raise ValueError(f"checkpoint metadata names no known family: {family!r}")


def model_variant(meta: dict) -> str:
    """Architecture and training tag (e.g. ``binned-ideal20``): models of one family and head trained
    differently are never averaged as if they were seeds of one recipe."""
    cfg = meta.get("train_config") or meta.get("config") or {}
    arch = cfg.get("arch") or (meta.get("model_cfg") or {}).get("arch")
    return "-".join(str(v) for v in (arch, cfg.get("tag")) if v)
