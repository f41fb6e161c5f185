"""Training on the pattern library: data selection, CoM filter, augmentation, early stopping, checkpoints and
the ``quick`` / ``paper`` profiles.

Held-out data are independent simulations: validation uses the library configurations with role ``val`` and
the reported test accuracy those with role ``test`` (other frozen-phonon / structure / nuisance draws), never a
random pick of patterns. A model is written with :func:`polcore.models.save_checkpoint` together with its full
metadata (training config, preprocessing, library sha256, versions, history, train seconds).

Command line (wired in ``polcore.cli``)::

    python -m polcore train --profile quick      # every family x head, one seed, <= 15 min on 2 CPU cores
    python -m polcore train --profile paper      # the study's networks, heads and seeds (GPU advised)
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from polcore import settings
from polcore.models import FAMILIES, FAMILY_HEADS, build_model, checkpoint_suffix, read_checkpoint_meta
from polcore.models import save_checkpoint as _save
from polcore.naming import run_name
from polcore.preprocess import Augmenter, Preprocessor, com_filter_mask, com_magnitude
from polcore.progress import Progress, scaled

__all__ = [
    "TrainConfig",
    "TrainResult",
    "PROFILES",
    "train_model",
    "train_profile",
    "profile_configs",
    "checkpoint_path",
    "prepare_split",
    "seed_everything",
]

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines one training run (stored in the checkpoint and in DuckDB).

    Attributes
    ----------
    family, head, arch : model (``arch`` None = the family default: resnet18, vgg11_bn, study).
    seed : seeds python, numpy and torch, the batch order, augmentation and subsampling.
    epochs, lr, weight_decay, batch_size, patience : Adam and early stopping on the validation loss
        (the study: 20 epochs, 2e-4, 1e-4, 128, patience 5).
    augment : training-only augmentations (:class:`polcore.preprocess.Augmenter`).
    com_filter : keep only training patterns whose CoM shift is above the mean of their group (one group =
        one variant x configuration x thickness, i.e. one simulated cell scan), the study's filter.
    train_thickness_nm : library thicknesses [nm] to train (and validate) on; None = all.
    max_train_patterns, max_val_patterns : random subsample sizes (None = all), drawn with ``seed``.
    eval_thickness_nm : thicknesses [nm] at which test accuracy is reported; None = all library thicknesses.
    max_eval_patterns : subsample per evaluated thickness (None = all test patterns).
    model_kwargs : extra ``build_model`` options (e.g. ``{"embed_dim": 128}``).
    tag : suffix of the run name (to tell variants apart).
    data : 'library' (the committed one-file library, ``epochs`` over fixed arrays) or 'draws' (the training
        library of independent nuisance draws, :mod:`polcore.simulate.draws`: ``steps`` batches sampled afresh
        and passed through :class:`polcore.simulate.microscope.MicroscopeAugment` when ``augment``).
    steps, eval_every : draws: optimisation steps and the validation interval [steps].
    train_roles : draws: roles trained on ('train', or 'ideal_train' for the study's ideal row).
    eval_role, eval_dose : draws: held-out role and dose [electrons per pattern] of the reported accuracy.
    n_fit_patterns : draws, pca_knn: number of augmented patterns the pipeline is fitted on.
    augment_profile : draws: 'microscope' (dose, camera length, shift, blur, background, hot pixels) or 'dose'
        (Poisson dose only: the study's ideal setting).
    warmup_steps : draws: curriculum, the first steps on the ideal subset at 20 nm (dose noise only) before
        ``steps`` on the training draws (see :class:`polcore.train_draws.Curriculum`).
    augment_ramp : draws: after the warm-up, the microscope augmentation grows from none to full over these
        steps.
    init_from : draws: fine-tune, i.e. start from the weights (and input normalisation) of this run name's
        checkpoint in the same output folder instead of from scratch; its sha256 is stored in the new
        checkpoint.
    thickness_weights : draws: ``((thickness_nm, weight), ...)``: thicknesses drawn ``weight`` times as often as
        the others (weight 1) in the training batches; None = uniform.
    augment_kwargs : draws: fields of :class:`polcore.simulate.microscope.MicroscopeAugment` that differ from its
        defaults in the 'microscope' profile (e.g. ``{"shift_px": 0.5}``).
    experts : draws, custom_cnn: ``((band name, lo_nm, hi_nm, run name), ...)``: no training of a network, but a
        :class:`polcore.models.experts.ThicknessExperts` composite of ``init_from`` (the general network, for
        every thickness outside the bands) and these fine-tuned runs (checkpoints in the same output folder),
        with a thickness gate fitted on ``n_fit_patterns`` augmented training patterns.
    """

    family: str
    head: str = "cls"
    arch: str | None = None
    seed: int = 888
    epochs: int = 20
    lr: float = 2e-4
    weight_decay: float = 1e-4
    batch_size: int = 128
    patience: int | None = 5
    augment: bool = True
    com_filter: bool = False
    train_thickness_nm: tuple[float, ...] | None = (20.0,)
    max_train_patterns: int | None = None
    max_val_patterns: int | None = None
    eval_thickness_nm: tuple[float, ...] | None = None
    max_eval_patterns: int | None = None
    model_kwargs: dict = field(default_factory=dict)
    tag: str = ""
    data: str = "library"
    steps: int | None = None
    eval_every: int = 250
    train_roles: tuple[str, ...] = ("train",)
    eval_role: str = "test"
    eval_dose: float | None = 2e4
    n_fit_patterns: int = 60000
    augment_profile: str = "microscope"
    warmup_steps: int = 0
    augment_ramp: int = 0
    init_from: str | None = None
    thickness_weights: tuple[tuple[float, float], ...] | None = None
    augment_kwargs: dict = field(default_factory=dict)
    experts: tuple[tuple[str, float, float, str], ...] | None = None

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"unknown model family {self.family!r}; valid: {', '.join(FAMILIES)}")
        if self.head not in FAMILY_HEADS[self.family]:
            raise ValueError(
                f"family {self.family!r} has no head {self.head!r}; valid: {', '.join(FAMILY_HEADS[self.family])}"
            )
        if self.epochs < 1 or self.batch_size < 2 or self.lr <= 0:
            raise ValueError("epochs must be >= 1, batch_size >= 2 and lr > 0")
        if self.data not in ("library", "draws"):
            raise ValueError(f"data must be 'library' or 'draws', got {self.data!r}")
        if self.data == "draws" and self.family != "pca_knn" and not self.steps and self.experts is None:
            raise ValueError("training on draws needs steps >= 1")
        if self.augment_profile not in ("microscope", "dose"):
            raise ValueError(f"augment_profile must be 'microscope' or 'dose', got {self.augment_profile!r}")
        if not isinstance(self.train_roles, tuple):
            object.__setattr__(self, "train_roles", tuple(self.train_roles))
        if self.thickness_weights is not None:
            tw = tuple((float(t), float(w)) for t, w in self.thickness_weights)
            if any(w <= 0 for _, w in tw):
                raise ValueError(f"thickness_weights must be positive, got {self.thickness_weights}")
            object.__setattr__(self, "thickness_weights", tw)
        if self.experts is not None:
            ex = tuple((str(n), float(lo), float(hi), str(run)) for n, lo, hi, run in self.experts)
            if self.data != "draws" or self.family != "custom_cnn" or self.head != "cls" or not self.init_from:
                raise ValueError("experts need data='draws', the custom_cnn cls family and init_from (the general "
                                 "network)")
            if any(hi <= lo for _, lo, hi, _ in ex):
                raise ValueError(f"every expert band needs lo_nm < hi_nm, got {self.experts}")
            object.__setattr__(self, "experts", ex)
        for name in ("train_thickness_nm", "eval_thickness_nm"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, tuple):
                object.__setattr__(self, name, tuple(float(t) for t in np.atleast_1d(v)))

    @property
    def name(self) -> str:
        """File-name-safe run name, e.g. ``resnet-resnet18-cls-s888`` (:func:`polcore.naming.run_name`)."""
        return run_name(self.family, self.head, self.seed, self.arch, self.tag)

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("train_thickness_nm", "eval_thickness_nm"):
            d[k] = None if d[k] is None else list(d[k])
        d["train_roles"] = list(d["train_roles"])
        if d["thickness_weights"] is not None:
            d["thickness_weights"] = [list(p) for p in d["thickness_weights"]]
        if d["experts"] is not None:
            d["experts"] = [list(p) for p in d["experts"]]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        bad = sorted(set(d) - names)
        if bad:
            raise ValueError(f"unknown TrainConfig fields {bad}; valid: {', '.join(sorted(names))}")
        d = dict(d)
        for k in ("train_thickness_nm", "eval_thickness_nm"):
            if d.get(k) is not None:
                d[k] = tuple(float(t) for t in d[k])
        if d.get("train_roles") is not None:
            d["train_roles"] = tuple(d["train_roles"])
        return cls(**d)


@dataclass
class TrainResult:
    """Outcome of one training run (also rebuilt from a checkpoint's metadata when the run is skipped).

    ``test_acc`` is the accuracy on held-out ``test`` configurations at the training thickness(es);
    ``test_acc_by_thickness`` maps each evaluated thickness [nm] (as a string) to the accuracy there.
    """

    name: str
    family: str
    head: str
    arch: str | None
    seed: int
    checkpoint: str
    train_seconds: float
    epochs_run: int
    best_epoch: int | None
    n_train: int
    n_val: int
    val_loss: float | None
    val_acc: float | None
    test_acc: float | None
    test_acc_by_thickness: dict
    config: dict
    skipped: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_meta(cls, meta: dict, checkpoint, skipped: bool = True) -> TrainResult:
        r = meta.get("train_result") or {}
        cfg = meta.get("train_config") or {}
        return cls(
            name=r.get("name", Path(checkpoint).stem),
            family=meta.get("family"),
            head=meta.get("head"),
            arch=(meta.get("model_cfg") or {}).get("arch"),
            seed=cfg.get("seed", meta.get("seed")),
            checkpoint=str(checkpoint),
            train_seconds=float(meta.get("train_seconds", float("nan"))),
            epochs_run=int(r.get("epochs_run", len(meta.get("history", [])))),
            best_epoch=meta.get("best_epoch"),
            n_train=int(r.get("n_train", 0)),
            n_val=int(r.get("n_val", 0)),
            val_loss=r.get("val_loss"),
            val_acc=r.get("val_acc"),
            test_acc=r.get("test_acc"),
            test_acc_by_thickness=dict(r.get("test_acc_by_thickness", {})),
            config=cfg,
            skipped=skipped,
        )


def seed_everything(seed: int) -> None:
    """Seed python's ``random``, numpy's legacy global state and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a runtime dependency
        return
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def checkpoint_path(cfg: TrainConfig, out_dir) -> Path:
    """Where ``train_model`` writes the checkpoint of ``cfg`` in ``out_dir``."""
    return Path(out_dir) / f"{cfg.name}{checkpoint_suffix(cfg.family)}"


def _library_preprocessor(library) -> Preprocessor:
    """The preprocessing of library patterns: centre = the optical axis at (K // 2, K // 2), library sampling."""
    k = int(library.patterns.shape[-1])
    mrad = float(library.meta["mrad_per_px"])
    pre = Preprocessor(mrad, float(library.meta.get("convergence_mrad", 24.0)), size=64)
    mean = library.patterns[:, :1, :1].mean(axis=(0, 1, 2, 3, 4))
    pre.fit_mean(mean, mrad_per_px=mrad, center=(k // 2, k // 2))
    pre.info["source"] = "library"
    return pre


def prepare_split(library, split: str, thickness, pre: Preprocessor, *, max_patterns=None, rng=None,
                  com_filter: bool = False):
    """Select, optionally CoM-filter and subsample, then preprocess library patterns of one split.

    Parameters
    ----------
    library : ``PatternLibrary``.
    split : 'train', 'val' or 'test' (configuration roles).
    thickness : nm value(s) or None for all.
    pre : fitted Preprocessor (library sampling, centre at the optical axis).
    max_patterns : random subsample size (needs ``rng``), None = all.
    com_filter : keep patterns whose CoM-shift magnitude is above the mean of their cell scan.

    Returns
    -------
    X : float32 (n, 64, 64); y : int64 (n,); info : DataFrame (library.select's, subset).
    """
    X, y, info = library.select(split=split, thickness=thickness)
    keep = np.ones(len(y), bool)
    if com_filter and len(y):
        k = X.shape[-1]
        com = com_magnitude(X, center=(k // 2, k // 2))
        groups = info.groupby(["variant", "config", "thickness_nm"]).indices
        keep[:] = False
        for idx in groups.values():
            keep[idx] = com_filter_mask(com[idx])
    idx = np.flatnonzero(keep)
    if max_patterns is not None and len(idx) > max_patterns:
        if rng is None:
            raise ValueError("max_patterns needs an rng")
        idx = np.sort(rng.choice(idx, size=int(max_patterns), replace=False))
    Xp = pre.transform(X[idx]) if len(idx) else np.zeros((0, pre.size, pre.size), np.float32)
    return Xp, y[idx], info.iloc[idx].reset_index(drop=True)


def train_model(cfg: TrainConfig, library, *, out_dir, progress: Progress | None = None):
    """Train one model on the library and save its checkpoint in ``out_dir``.

    Parameters
    ----------
    cfg : the run's TrainConfig.
    library : ``PatternLibrary`` (``polcore.simulate.load_library()``).
    out_dir : folder for the checkpoint (``checkpoint_path(cfg, out_dir)``) and its JSON sidecar.
    progress : optional ``progress(fraction in [0, 1], message)``.

    Returns
    -------
    (model, TrainResult)
    """
    if cfg.data == "draws":
        from polcore.train_draws import train_on_draws

        return train_on_draws(cfg, library, out_dir=out_dir, progress=progress)
    t0 = time.perf_counter()
    seed_everything(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    pre = _library_preprocessor(library)
    if progress is not None:
        progress(0.0, f"{cfg.name}: preparing data")
    Xtr, ytr, _ = prepare_split(library, "train", cfg.train_thickness_nm, pre, max_patterns=cfg.max_train_patterns,
                                rng=rng, com_filter=cfg.com_filter)
    Xv, yv, _ = prepare_split(library, "val", cfg.train_thickness_nm, pre, max_patterns=cfg.max_val_patterns, rng=rng)
    if len(ytr) < 2:
        raise ValueError(f"{cfg.name}: no training patterns (thickness {cfg.train_thickness_nm})")
    log.info("%s: %d training, %d validation patterns", cfg.name, len(ytr), len(yv))
    aug = Augmenter(np.random.default_rng(cfg.seed + 1)) if cfg.augment else None
    if cfg.family == "pca_knn":
        model = build_model("pca_knn", "cls", random_state=cfg.seed, **cfg.model_kwargs)
        model.fit(Xtr, ytr, Xv, yv, augmenter=aug, progress=scaled(progress, 0.05, 0.8))
    else:
        model = build_model(cfg.family, cfg.head, **({"arch": cfg.arch} if cfg.arch else {}), **cfg.model_kwargs)
        model.fit(
            Xtr, ytr, Xv, yv, epochs=cfg.epochs, lr=cfg.lr, weight_decay=cfg.weight_decay,
            batch_size=cfg.batch_size, patience=cfg.patience, augmenter=aug, seed=cfg.seed,
            progress=scaled(progress, 0.05, 0.8, f"{cfg.name}: "),
        )
    train_seconds = time.perf_counter() - t0
    # held-out configurations ('test' role) at every evaluated thickness
    eval_t = cfg.eval_thickness_nm
    if eval_t is None:
        eval_t = tuple(float(t) for t in library.thickness_nm)
    train_t = cfg.train_thickness_nm if cfg.train_thickness_nm is not None else tuple(library.thickness_nm)
    train_t_lib = {float(library.thickness_nm[library.thickness_index(t)]) for t in train_t}
    eval_lib = sorted({float(library.thickness_nm[library.thickness_index(t)]) for t in eval_t} | train_t_lib)
    by_t: dict[str, float] = {}
    n_ok_train, n_train_eval = 0, 0
    erng = np.random.default_rng(cfg.seed + 2)
    for i, t in enumerate(eval_lib):
        if progress is not None:
            progress(0.8 + 0.2 * i / len(eval_lib), f"{cfg.name}: evaluating at {t:g} nm")
        Xt, yt, _ = prepare_split(library, "test", t, pre, max_patterns=cfg.max_eval_patterns, rng=erng)
        if not len(yt):
            continue
        ok = int(np.sum(model.predict(Xt) == yt))
        by_t[f"{t:g}"] = ok / len(yt)
        if t in train_t_lib:
            n_ok_train += ok
            n_train_eval += len(yt)
    hist = getattr(model, "history_", [])
    best = model.best_epoch_
    best_rec = next((h for h in hist if h.get("epoch") == best), hist[-1] if hist else {})
    result = TrainResult(
        name=cfg.name, family=cfg.family, head=cfg.head, arch=model.cfg.get("arch"), seed=cfg.seed,
        checkpoint="", train_seconds=train_seconds, epochs_run=len(hist), best_epoch=best,
        n_train=int(len(ytr)), n_val=int(len(yv)), val_loss=best_rec.get("val_loss"), val_acc=best_rec.get("val_acc"),
        test_acc=(n_ok_train / n_train_eval) if n_train_eval else None, test_acc_by_thickness=by_t,
        config=cfg.to_dict(),
    )
    meta = {
        "train_config": cfg.to_dict(),
        "seed": cfg.seed,
        "preprocessing": pre.to_dict(),
        "augmentation": aug.to_dict() if aug is not None else None,
        "library_sha256": getattr(library, "sha256", ""),
        "library_path": getattr(library, "path", ""),
        "library_meta": {k: library.meta.get(k) for k in ("voltage_kv", "convergence_mrad", "mrad_per_px",
                                                          "profile", "abtem_version")},
        "split": {"train": "configs with role 'train'", "val": "configs with role 'val'",
                  "test": "configs with role 'test'"},
        "train_seconds": train_seconds,
    }
    out = Path(out_dir)
    path = checkpoint_path(cfg, out)
    result.checkpoint = str(path)
    meta["train_result"] = result.to_dict()
    _save(model, path, meta=meta)
    if progress is not None:
        progress(1.0, f"{cfg.name}: done, test acc {result.test_acc}")
    log.info("%s: trained in %.1f s, test accuracy %s (by thickness %s)", cfg.name, train_seconds,
             result.test_acc, by_t)
    return model, result


# ----------------------------------------------------------------------------------------------- profiles
def _quick() -> list[TrainConfig]:
    """The demo profile: every family with cls and proto (the custom CNN also with reg) plus PCA+kNN, seed 888,
    trained at 20 nm and scored on held-out configurations at 20 and 50 nm, about 15 minutes on an idle 2-core
    CPU in all.

    Budgets were measured on the 2-core CPU (training about 300, 120 and 37 patterns/s for custom_cnn, resnet18
    and vgg11_bn when the machine is otherwise idle); each network sees a seeded subsample of the 20 nm training
    configurations (the custom CNN all 13 056 of them: with fewer updates it stayed near chance). ``lr`` is 1e-3 (the study's 2e-4 needs more epochs than this budget has) and the batch is 64
    (more updates per second).
    """
    common = dict(seed=888, train_thickness_nm=(20.0,), eval_thickness_nm=(20.0, 50.0), lr=1e-3, batch_size=64)
    budget = {
        "custom_cnn": dict(epochs=5, patience=3, augment=True),
        "resnet": dict(epochs=3, patience=2, augment=False, max_train_patterns=2048, max_val_patterns=384),
        "vgg": dict(epochs=3, patience=2, augment=False, max_train_patterns=768, max_val_patterns=384,
                    max_eval_patterns=768),
    }
    heads = {"custom_cnn": ("cls", "reg", "proto"), "resnet": ("cls", "proto"), "vgg": ("cls", "proto")}
    out = []
    for fam in ("custom_cnn", "resnet", "vgg"):
        for head in heads[fam]:
            out.append(TrainConfig(family=fam, head=head, **{**common, **budget[fam]}))
    out.append(TrainConfig(family="pca_knn", head="cls", augment=False, **common))
    return out


def _paper() -> list[TrainConfig]:
    """The study: resnet50, vgg16_bn and the custom CNN with the three heads, five seeds, 20 epochs, patience 5,
    Adam 2e-4 / 1e-4, batch 128, augmentations and the CoM filter; PCA(20) + kNN(5) with the same seeds."""
    out = []
    for seed in (888, 1212, 3000, 5000, 7000):
        for fam, arch in (("custom_cnn", None), ("resnet", "resnet50"), ("vgg", "vgg16_bn")):
            for head in ("cls", "reg", "proto"):
                out.append(TrainConfig(family=fam, head=head, arch=arch, seed=seed, epochs=20, patience=5,
                                       com_filter=True, augment=True, train_thickness_nm=(20.0,)))
        out.append(TrainConfig(family="pca_knn", seed=seed, com_filter=True, augment=True,
                               train_thickness_nm=(20.0,)))
    return out


#: (steps, curriculum warm-up steps) of each torch network in the ``cpu`` profile (128 patterns per step), sized
#: for about 20-25 min each with one training job per core of this 2-core CPU (measured 0.19 / 0.9 / 3.5 / 6.5 s
#: per step for custom_cnn binned / custom_cnn study / resnet18 / vgg11_bn): the binned CNN sees 770k patterns,
#: VGG-11 23k. The CPU, not the architecture, limits the large networks; the paper profile is for a GPU.
CPU_STEPS = {("custom_cnn", "binned"): (16000, 1000), ("custom_cnn", "study"): (1200, 300),
             ("resnet", None): (300, 80), ("vgg", None): (160, 40)}


#: The fine-tune of the binned CNN at the thin end (tag 'thin'): trained on every thickness at once, the network
#: read 5 nm patterns at 0.41 per pattern against a bound of 0.83 (10-60 nm within 8 points of theirs); these steps
#: start from its weights, with 5 and 10 nm sampled 4x and 2x as often as each other thickness, at a lower
#: learning rate. Measured (seed 888, 5 nm per pattern): 0.414 -> 0.473.
THIN_FINETUNE = dict(steps=3000, warmup_steps=0, augment_ramp=0, lr=3e-4,
                     thickness_weights=((5.0, 4.0), (10.0, 2.0)))
#: The shipped fine-tune (tag 'reg2'): THIN_FINETUNE with the disc registered as the ingest registers it (disc
#: shift +-0.25 px instead of +-2 px, camera length +-1 % instead of +-4 %: the geometry's descan surface is
#: within 0.2 px and the sampling comes from the disc radius). A +-2 px shift hides a thin crystal's signal,
#: which lies in small intensity changes inside the disc. Measured (seed 888): 5 nm 0.473 (thin) -> 0.533 (shift
#: 0.5 px) -> 0.541, every other thickness +0.5 to +2.5 points over the parent, per cell 1.000 at 5-60 nm.
REG_FINETUNE = dict(THIN_FINETUNE, augment_kwargs={"shift_px": 0.25, "scale_range": 0.01})
#: The second fine-tune (tag 'reg3', the general member of the shipped thickness experts): from 'reg2', twice the
#: steps with 5 nm drawn 8x and 10 nm 2x as often. Measured (seed 888, per pattern): 5 nm 0.541 -> 0.698, and
#: +0.2 to +4.6 points at every other thickness (10 nm 0.762 -> 0.808, 50 nm 0.844 -> 0.857).
REG3_FINETUNE = dict(REG_FINETUNE, steps=6000, eval_every=500, thickness_weights=((5.0, 8.0), (10.0, 2.0)))
#: The 5 nm expert: from 'reg2', 3000 steps on 5 nm draws alone (tag 't5a'), then 4000 more at half the learning
#: rate (tag 't5'). Measured (seed 888, 5 nm per pattern): 0.541 -> 0.728 -> 0.772 (bound 0.833).
T5A_FINETUNE = dict(REG_FINETUNE, steps=3000, thickness_weights=None, train_thickness_nm=(5.0,),
                    eval_thickness_nm=(5.0,), eval_every=250)
T5_FINETUNE = dict(T5A_FINETUNE, steps=4000, lr=1.5e-4)
#: The thickness experts (tag 'tx', the recommended model): 'reg3' for 7.5 nm and thicker, 't5' below, gated per
#: pattern by a logistic regression on reg3's embedding and the 16 x 16 pattern, fitted on 24,000 augmented
#: training patterns (2,000 per thickness).
TX_EXPERTS = (("5 nm", 0.0, 7.5, "t5"),)


def _cpu() -> list[TrainConfig]:
    """Every family trained on the draw library (all thicknesses 5-60 nm, microscope augmentation), seed 888,
    scored on held-out draws at 2e4 electrons per pattern; plus the study's ideal row (the binned custom CNN on
    the ideal subset at 20 nm, scored on ideal held-out draws at 20 nm). The networks follow a curriculum: a
    warm-up on the ideal subset at 20 nm, then every draw and thickness with the microscope ramped in over
    1500 steps (or the whole run when shorter)."""
    common = dict(data="draws", seed=888, train_thickness_nm=None, eval_thickness_nm=None, lr=1e-3,
                  batch_size=128, augment=True, eval_every=200, patience=None)
    out = [TrainConfig(family=fam, head="cls", arch=arch, steps=n, warmup_steps=w, augment_ramp=min(1500, n // 2),
                       **common) for (fam, arch), (n, w) in CPU_STEPS.items()]
    # a second seed of the best network, for mean +- std over seeds
    (n, w) = CPU_STEPS[("custom_cnn", "binned")]
    out.insert(1, TrainConfig(family="custom_cnn", head="cls", arch="binned", steps=n, warmup_steps=w,
                              augment_ramp=min(1500, n // 2), **{**common, "seed": 1212}))
    out.insert(2, TrainConfig(family="pca_knn", head="cls", n_fit_patterns=60000, **common))
    out.insert(3, TrainConfig(family="custom_cnn", head="cls", arch="binned", tag="ideal20", steps=2000,
                              **{**common, "train_thickness_nm": (20.0,), "eval_thickness_nm": (20.0,),
                                 "train_roles": ("ideal_train",), "eval_role": "ideal_test",
                                 "augment_profile": "dose"}))
    # the thin end: each binned CNN fine-tuned with 5 and 10 nm drawn 4x and 2x as often and the disc registered
    # more tightly (REG_FINETUNE, tag 'reg2', the shipped model); for seed 888 also the two steps towards it
    # (the ablation in the README: thickness weights alone, 'thin'; then the disc shift cut to 0.5 px, 'thinreg')
    out.append(TrainConfig(family="custom_cnn", head="cls", arch="binned", tag="thin",
                           init_from="custom_cnn-binned-cls-s888", **{**common, **THIN_FINETUNE}))
    out.append(TrainConfig(family="custom_cnn", head="cls", arch="binned", tag="thinreg",
                           init_from="custom_cnn-binned-cls-s888",
                           **{**common, **THIN_FINETUNE, "augment_kwargs": {"shift_px": 0.5}}))
    for seed in (888, 1212):
        out.append(TrainConfig(family="custom_cnn", head="cls", arch="binned", tag="reg2",
                               init_from=f"custom_cnn-binned-cls-s{seed}", **{**common, **REG_FINETUNE, "seed": seed}))
    # the thickness experts, for both seeds: the general member ('reg3'), the 5 nm expert ('t5a' then 't5'),
    # and their composite ('tx')
    for seed in (888, 1212):
        base = f"custom_cnn-binned-cls-s{seed}"
        for tag, parent, recipe in (("reg3", "reg2", REG3_FINETUNE), ("t5a", "reg2", T5A_FINETUNE),
                                    ("t5", "t5a", T5_FINETUNE)):
            out.append(TrainConfig(family="custom_cnn", head="cls", arch="binned", tag=tag,
                                   init_from=f"{base}-{parent}", **{**common, **recipe, "seed": seed}))
        out.append(TrainConfig(family="custom_cnn", head="cls", arch="binned", tag="tx", init_from=f"{base}-reg3",
                               experts=tuple((n, lo, hi, f"{base}-{run}") for n, lo, hi, run in TX_EXPERTS),
                               n_fit_patterns=24000, **{**common, "seed": seed, "steps": None}))
    return out


#: The models shipped in ``data/models/shipped`` (and used by the demo), all seed 888, in training order: the binned
#: CNN, the thickness experts ``-tx`` built from its fine-tunes (the recommended model), the study's classical
#: baseline and the study's ideal row.
SHIPPED_MODELS = ("custom_cnn-binned-cls-s888", "custom_cnn-binned-cls-s888-tx", "pca_knn-cls-s888",
                  "custom_cnn-binned-cls-s888-ideal20")
#: The model the Upload page and the benchmarks choose first.
RECOMMENDED_MODEL = "custom_cnn-binned-cls-s888-tx"


def run_sources(cfg: TrainConfig) -> list[str]:
    """The run names a run starts from or is built of: its ``init_from`` parent and its experts."""
    return ([cfg.init_from] if cfg.init_from else []) + [e[3] for e in (cfg.experts or ())]


def with_sources(names, configs: list[TrainConfig]) -> list[TrainConfig]:
    """The configs of ``names`` and of every run they start from or are built of (recursively), in the order of
    ``configs`` (a parent is trained before its children)."""
    by_name = {c.name: c for c in configs}
    need, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name not in by_name:
            raise ValueError(f"run {name!r} is not in the profile")
        if name not in need:
            need.add(name)
            todo.extend(run_sources(by_name[name]))
    return [c for c in configs if c.name in need]


def _default() -> list[TrainConfig]:
    """The shipped models and the runs they are fine-tuned from or built of: exactly their configurations in the
    ``cpu`` profile (same steps, seeds and data), so ``python -m polcore train --profile default`` retrains what
    ``data/models/shipped`` holds, on the draw library (``simulate library --profile train``); the binned CNN's
    steps are ``CPU_STEPS`` (about 0.2 s per step on the 2-core CPU)."""
    return with_sources(SHIPPED_MODELS, _cpu())


PROFILES: dict[str, list[TrainConfig]] = {"quick": _quick(), "paper": _paper(), "cpu": _cpu(),
                                          "default": _default()}


def profile_configs(name: str) -> list[TrainConfig]:
    """The TrainConfigs of a profile; unknown names raise ValueError listing the valid ones."""
    if name not in PROFILES:
        raise ValueError(f"unknown training profile {name!r}; valid: {', '.join(PROFILES)}")
    return list(PROFILES[name])


def train_profile(name: str, library=None, out_dir=None, progress: Progress | None = None,
                  only: Callable[[TrainConfig], bool] | None = None) -> list[TrainResult]:
    """Train every model of a profile; models whose checkpoint already exists are skipped (idempotent).

    Parameters
    ----------
    name : 'quick' or 'paper'.
    library : a ``PatternLibrary``, a path, or None (the default library).
    out_dir : checkpoint folder (default ``data/models/<name>``).
    progress : optional ``progress(fraction, message)`` over the whole profile.
    only : optional predicate selecting configs (e.g. ``lambda c: c.family == "resnet"``).

    Returns
    -------
    list of TrainResult, in profile order (``skipped=True`` for existing checkpoints).
    """
    cfgs = [c for c in profile_configs(name) if only is None or only(c)]
    out = Path(out_dir) if out_dir is not None else settings.models_dir() / name
    lib = library
    results = []
    for i, cfg in enumerate(cfgs):
        path = checkpoint_path(cfg, out)
        sub = scaled(progress, i / len(cfgs), (i + 1) / len(cfgs), f"[{i + 1}/{len(cfgs)}] ")
        if path.is_file():
            results.append(TrainResult.from_meta(read_checkpoint_meta(path), path, skipped=True))
            log.info("%s: checkpoint exists, skipped", cfg.name)
            if sub is not None:
                sub(1.0, f"{cfg.name}: exists, skipped")
            continue
        if cfg.data == "draws" and (lib is None or isinstance(lib, (str, Path))):
            from polcore.simulate.draws import load_draws

            lib = load_draws(lib)
        elif lib is None or isinstance(lib, (str, Path)):
            from polcore.simulate import load_library

            lib = load_library(lib)
        _, res = train_model(cfg, lib, out_dir=out, progress=sub)
        results.append(res)
    return results
