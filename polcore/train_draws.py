"""Training on the draw library (:mod:`polcore.simulate.draws`): every thickness, batches sampled afresh from
the independent nuisance draws and passed through the microscope (:class:`MicroscopeAugment`), validation on
``val`` draws and the reported accuracy on ``test`` draws at 2e4 electrons per pattern, per pattern and per
unit cell (:func:`polcore.evaluate.evaluate_model`).

The library is far too large to visit pattern by pattern on a CPU (160 draws x 8 classes x 12 thicknesses x
64 positions = 983k patterns), and every visit should see another dose, blur and shift anyway, so the torch
families train for a fixed number of steps on sampled batches (``TrainConfig.steps``) and PCA+kNN is fitted on
``n_fit_patterns`` augmented patterns. Everything is seeded: batch ``k`` of a run is a function of
``(seed, k)`` only.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from polcore.models import build_model
from polcore.models import save_checkpoint as _save
from polcore.preprocess import Preprocessor, minmax

__all__ = ["DrawSampler", "train_on_draws", "draws_preprocessor", "validation_set"]

log = logging.getLogger(__name__)


def draws_preprocessor(lib) -> Preprocessor:
    """The preprocessing of draw-library patterns: optical axis at (K // 2, K // 2), the library's sampling."""
    k = lib.size
    mrad = float(lib.meta["mrad_per_px"])
    pre = Preprocessor(mrad, float(lib.meta.get("convergence_mrad", 24.0)), size=k)
    role = "train" if lib.n_draws("train") else lib.roles()[0]
    t = float(lib.thickness_nm[role][len(lib.thickness_nm[role]) // 2])
    mean = lib.expanded(role, t, draws=[0]).mean(axis=(0, 1, 2, 3))
    pre.fit_mean(mean, mrad_per_px=mrad, center=(k // 2, k // 2))
    pre.info["source"] = "draws"
    return pre


class DrawSampler:
    """Seeded batches of model inputs from draws: ``sampler(step) -> (X (n, K, K) float32, y (n,) int64)``.

    Parameters
    ----------
    lib : ``DrawLibrary``.
    roles : roles to sample from.
    thickness : thicknesses [nm] to sample (None = all of the roles').
    thickness_weights : ``((thickness_nm, weight), ...)``: relative sampling weights (others 1); None = uniform.
    augment : a :class:`MicroscopeAugment` or None (noise-free patterns).
    batch_size : patterns per batch.
    seed : the run's seed.
    """

    def __init__(self, lib, roles=("train",), thickness=None, augment=None, batch_size: int = 128, seed: int = 0,
                 draws: dict | None = None, ramp: tuple[int, int] | None = None, thickness_weights=None):
        from polcore.simulate.draws import QUARTER_TURN_CLASS

        self.parts = []
        for role in roles:
            if not lib.n_draws(role):
                raise ValueError(f"the draw library {lib.path} has no {role!r} draws")
            ts = lib.thickness_nm[role]
            t_idx = (np.arange(len(ts)) if thickness is None
                     else np.unique([lib.thickness_index(role, t) for t in np.atleast_1d(thickness)]))
            base = lib.base[role] if not draws or role not in draws else lib.base[role][np.asarray(draws[role])]
            tw = dict(thickness_weights or ())
            w = np.array([next((v for t, v in tw.items() if abs(t - ts[i]) < 1e-3), 1.0) for i in t_idx])
            self.parts.append((base, t_idx, None if thickness_weights is None else w / w.sum()))
        self.weights = np.array([p[0].shape[0] * len(p[1]) for p in self.parts], float)
        self.weights /= self.weights.sum()
        self.qtc = np.array(QUARTER_TURN_CLASS)
        self.scale = float(lib.scale)
        self.augment = augment
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.ramp = ramp  # (first step, steps): the augmentation strength grows linearly from 0 to 1

    def strength(self, step: int) -> float:
        """Augmentation strength at ``step`` (1 without a ramp; negative steps = input-norm batches: 1)."""
        if self.ramp is None or step < 0:
            return 1.0
        start, n = self.ramp
        return float(min(1.0, max(0.0, (step - start) / max(n, 1))))

    def __call__(self, step: int):
        import torch

        key = [self.seed, int(step) % (2**31), int(step < 0)]
        rng = np.random.default_rng(key)
        n = self.batch_size
        part = rng.choice(len(self.parts), size=n, p=self.weights)
        raws, ys = [], []
        for pi in np.unique(part):
            base, t_idx, t_p = self.parts[pi]
            m = int(np.sum(part == pi))
            D, B, _, N, _, _, _ = base.shape
            d, b = rng.integers(D, size=m), rng.integers(B, size=m)
            t = t_idx[rng.integers(len(t_idx), size=m) if t_p is None else rng.choice(len(t_idx), size=m, p=t_p)]
            py, px, q = rng.integers(N, size=m), rng.integers(N, size=m), rng.integers(4, size=m)
            raw = torch.from_numpy(base[d, b, t, py, px].astype(np.float32)) / self.scale
            for k in range(1, 4):
                sel = torch.from_numpy(np.flatnonzero(q == k))
                if len(sel):
                    raw[sel] = torch.rot90(raw[sel], k, dims=(-2, -1))
            raws.append(raw[:, :-1, :-1])
            ys.append(self.qtc[b, q])
        x = torch.cat(raws)
        y = np.concatenate(ys).astype(np.int64)
        if self.augment is not None:
            g = torch.Generator().manual_seed(int(rng.integers(2**62)))
            s = self.strength(step)
            x = (self.augment if s >= 1.0 else self.augment.scaled(s))(x, g)
        return minmax(x.numpy()), y


class Curriculum:
    """``warmup`` steps from an easy sampler (the ideal subset at one thickness), then the main sampler.

    Measured on the draw library: trained from scratch on every thickness and nuisance at once, the custom CNN
    stayed on the chance plateau (loss ln 8) for 600 steps with or without augmentation, with or without batch
    norm, at lr 1e-3 or 3e-3; started from 1000 steps on ideal 20 nm patterns it left the plateau at once.
    Input-normalisation batches (negative steps) come from the easy sampler, as in that measurement.
    """

    def __init__(self, easy: DrawSampler, main: DrawSampler, warmup: int):
        self.easy, self.main, self.warmup = easy, main, int(warmup)

    def __call__(self, step: int):
        return self.easy(step) if step <= self.warmup else self.main(step)


def validation_set(lib, thickness=None, dose: float = 2e4, max_patterns: int = 6144, seed: int = 0,
                   role: str = "val", draws=None):
    """Fixed validation patterns from ``role`` draws (all, or the indices ``draws``) at ``dose`` (all
    thicknesses by default), subsampled."""
    from polcore.evaluate import heldout_counts

    ts = lib.thickness_nm[role] if thickness is None else np.atleast_1d(thickness)
    Xs, ys = [], []
    rng = np.random.default_rng(seed)
    per_t = max(1, max_patterns // len(ts))
    for t in ts:
        counts, _ = heldout_counts(lib, role, float(t), dose, seed=seed + 1000, draws=draws)
        D, C, N, _, K, _ = counts.shape
        flat = counts.reshape(-1, K, K)
        y = np.broadcast_to(np.arange(C)[None, :, None, None], (D, C, N, N)).ravel()
        idx = rng.choice(len(flat), size=min(per_t, len(flat)), replace=False)
        Xs.append(minmax(flat[idx]))
        ys.append(y[idx])
    return np.concatenate(Xs), np.concatenate(ys).astype(np.int64)


def _parent_model(cfg, out_dir: Path, name: str | None = None):
    """The checkpoint a fine-tune starts from (``cfg.init_from`` in ``out_dir``, or the run ``name``: an expert
    of a composite), checked against ``cfg``'s family, arch and head.

    Returns (model, {"name", "checkpoint", "sha256", "library_sha256"})."""
    import hashlib

    from polcore.models import checkpoint_suffix, load_checkpoint

    name = name or cfg.init_from
    path = out_dir / f"{name}{checkpoint_suffix(cfg.family)}"
    if not path.is_file():
        raise FileNotFoundError(f"{cfg.name}: fine-tuning starts from {path}, which does not exist; train "
                                f"{name} into {out_dir} first")
    model = load_checkpoint(path, device="cpu")
    arch = model.cfg.get("arch")
    if model.meta.get("family") != cfg.family or model.meta.get("head") != cfg.head or (cfg.arch and arch != cfg.arch):
        raise ValueError(f"{cfg.name}: {path} is {model.meta.get('family')}/{arch}/{model.meta.get('head')}, not "
                         f"{cfg.family}/{cfg.arch}/{cfg.head}")
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    return model, {"name": name, "checkpoint": str(path), "sha256": sha,
                   "library_sha256": model.meta.get("library_sha256"),
                   "train_config": model.meta.get("train_config")}


def _complement_bands(experts) -> list[tuple[float, float]]:
    """The thickness intervals [nm] outside every expert band (read by the general network)."""
    edges, lo = [], 0.0
    for _, a, b, _ in sorted(experts, key=lambda e: e[1]):
        if a < lo - 1e-9:
            raise ValueError(f"expert bands overlap: {experts}")
        if a > lo:
            edges.append((lo, a))
        lo = b
    edges.append((lo, 1e6))
    return edges


def _thickness_experts(cfg, lib, out_dir: Path, aug, progress=None):
    """The :class:`~polcore.models.experts.ThicknessExperts` composite of ``cfg.init_from`` (general) and the
    ``cfg.experts`` runs, its gate fitted on ``cfg.n_fit_patterns`` augmented training patterns (every thickness
    equally often). Returns (model, parent info, per-thickness gate accuracy on the 'val' draws)."""
    from polcore.models.experts import ThicknessExperts, band_of, fit_gate, gate_features

    general, parent = _parent_model(cfg, out_dir)
    members, infos, bands = {"general": general}, {"general": parent}, []
    for i, (name, lo, hi, run) in enumerate(cfg.experts):
        key = f"expert{i}"
        members[key], infos[key] = _parent_model(cfg, out_dir, name=run)
        bands.append(dict(name=name, lo_nm=lo, hi_nm=hi, member=key))
    for lo, hi in _complement_bands(cfg.experts):
        bands.append(dict(name=f"{lo:g}-{hi:g} nm" if hi < 1e6 else f">= {lo:g} nm", lo_nm=lo, hi_nm=hi,
                          member="general"))
    ts = [float(t) for t in lib.thickness_nm["train"]]
    per_t = max(cfg.batch_size, int(cfg.n_fit_patterns) // len(ts))
    embs, labels = [], []
    for i, t in enumerate(ts):
        if progress is not None:
            progress(0.1 + 0.6 * i / len(ts), f"{cfg.name}: gate patterns at {t:g} nm")
        sampler = DrawSampler(lib, ("train",), (t,), aug, cfg.batch_size, cfg.seed + 31 + i)
        X = np.concatenate([sampler(k)[0] for k in range(-(-per_t // cfg.batch_size))])[:per_t]
        embs.append(gate_features(X, general.embed(X)))
        labels.append(np.full(len(X), band_of(t, bands)[0]))
    gate = fit_gate(np.concatenate(embs), np.concatenate(labels), len(bands), seed=cfg.seed)
    model = ThicknessExperts(members, bands, gate)
    model.member_info = {k: v for k, v in infos.items() if k != "general"}
    gate_val = {}
    for t in lib.thickness_nm["val"]:
        Xv, _ = validation_set(lib, [float(t)], dose=cfg.eval_dose or 2e4, seed=cfg.seed, max_patterns=2048)
        gate_val[f"{float(t):g}"] = float(np.mean(model.thickness_band(Xv) == band_of(float(t), bands)[0]))
    log.info("%s: thickness gate accuracy on the val draws by thickness: %s", cfg.name, gate_val)
    return model, parent, gate_val


def train_on_draws(cfg, lib, *, out_dir, progress=None):
    """Train ``cfg`` (``data='draws'``) on a ``DrawLibrary``, evaluate on held-out draws, save the checkpoint.

    Returns
    -------
    (model, TrainResult)
    """
    from polcore.evaluate import evaluate_model
    from polcore.progress import scaled
    from polcore.simulate.microscope import MicroscopeAugment
    from polcore.train import TrainResult, checkpoint_path, seed_everything

    if isinstance(lib, (str, Path)) or lib is None:
        from polcore.simulate.draws import load_draws

        lib = load_draws(lib)
    t0 = time.perf_counter()
    seed_everything(cfg.seed)
    pre = draws_preprocessor(lib)
    aug = None
    if cfg.augment:
        aug = (MicroscopeAugment(**cfg.augment_kwargs) if cfg.augment_profile == "microscope" else
               MicroscopeAugment(scale_range=0.0, shift_px=0.0, p_blur=0.0, p_background=0.0, p_hot=0.0))
    # validation: the 'val' draws; a model of the ideal subset validates on its last ideal_train draw instead
    # (ideal, independent of its training draws, and never the held-out ideal_test draws)
    train_draws, val_draws = None, None
    val_role = "val"
    if cfg.train_roles == ("ideal_train",):
        n = lib.n_draws("ideal_train")
        if n < 2:
            raise ValueError("training on the ideal subset needs at least 2 ideal_train draws (one validates)")
        val_role, train_draws, val_draws = "ideal_train", {"ideal_train": list(range(n - 1))}, [n - 1]
    elif not lib.n_draws("val"):
        raise ValueError(f"the draw library {lib.path} has no 'val' draws")
    ramp = (cfg.warmup_steps, cfg.augment_ramp) if cfg.augment_ramp else None
    sampler = DrawSampler(lib, cfg.train_roles, cfg.train_thickness_nm, aug, cfg.batch_size, cfg.seed,
                          draws=train_draws, ramp=ramp, thickness_weights=cfg.thickness_weights)
    if cfg.warmup_steps:
        easy_aug = MicroscopeAugment(scale_range=0.0, shift_px=0.0, p_blur=0.0, p_background=0.0, p_hot=0.0)
        easy = DrawSampler(lib, ("ideal_train",), (20.0,), easy_aug, cfg.batch_size, cfg.seed + 17)
        sampler = Curriculum(easy, sampler, cfg.warmup_steps)
    val_t = cfg.train_thickness_nm
    if val_t is not None:
        val_t = [t for t in val_t if np.min(np.abs(lib.thickness_nm[val_role] - t)) < 1e-3] or None
    Xv, yv = validation_set(lib, val_t, dose=cfg.eval_dose or 2e4, seed=cfg.seed, role=val_role,
                            max_patterns=cfg.max_val_patterns or 6144, draws=val_draws)
    if progress is not None:
        progress(0.0, f"{cfg.name}: training on {sum(lib.n_draws(r) for r in cfg.train_roles)} draws")
    parent = None
    if cfg.family == "pca_knn":
        model = build_model("pca_knn", "cls", random_state=cfg.seed, **cfg.model_kwargs)
        n_b = max(1, cfg.n_fit_patterns // cfg.batch_size)
        parts = [sampler(k) for k in range(n_b)]
        X = np.concatenate([p[0] for p in parts])
        y = np.concatenate([p[1] for p in parts])
        model.fit(X, y, Xv, yv, progress=scaled(progress, 0.05, 0.8))
        steps_run = n_b
    elif cfg.experts:
        model, parent, gate_val = _thickness_experts(cfg, lib, Path(out_dir), aug, progress)
        steps_run = 0
    else:
        if cfg.init_from:
            model, parent = _parent_model(cfg, Path(out_dir))
        else:
            model = build_model(cfg.family, cfg.head, **({"arch": cfg.arch} if cfg.arch else {}), **cfg.model_kwargs)
        model.fit_stream(sampler, Xv, yv, steps=int(cfg.steps) + cfg.warmup_steps, lr=cfg.lr,
                         weight_decay=cfg.weight_decay, fit_norm=parent is None,
                         eval_every=cfg.eval_every, patience=cfg.patience,
                         progress=scaled(progress, 0.02, 0.85, f"{cfg.name}: "))
        steps_run = max((h.get("step", 0) for h in model.history_), default=0)
    train_seconds = time.perf_counter() - t0
    if progress is not None:
        progress(0.86, f"{cfg.name}: evaluating on held-out draws")
    role = cfg.eval_role if lib.n_draws(cfg.eval_role) else val_role
    heldout = evaluate_model(model, lib, role=role, thickness=cfg.eval_thickness_nm, dose=cfg.eval_dose,
                             seed=0)
    train_t = (set(np.round(lib.thickness_nm[role], 3).tolist()) if cfg.train_thickness_nm is None
               else {round(float(t), 3) for t in cfg.train_thickness_nm})
    in_range = heldout[heldout["thickness_nm"].round(3).isin(train_t)]
    by_t = {f"{r.thickness_nm:g}": float(r.per_pattern) for r in heldout.itertuples()}
    hist = getattr(model, "history_", [])
    best = model.best_epoch_
    best_rec = next((h for h in hist if h.get("epoch") == best), hist[-1] if hist else {})
    result = TrainResult(
        name=cfg.name, family=cfg.family, head=cfg.head, arch=model.cfg.get("arch"), seed=cfg.seed, checkpoint="",
        train_seconds=train_seconds, epochs_run=len(hist), best_epoch=best,
        n_train=int(steps_run * cfg.batch_size), n_val=int(len(yv)), val_loss=best_rec.get("val_loss"),
        val_acc=best_rec.get("val_acc"),
        test_acc=float(in_range["per_pattern"].mean()) if len(in_range) else None,
        test_acc_by_thickness=by_t, config=cfg.to_dict(),
    )
    meta = {
        "train_config": cfg.to_dict(),
        "seed": cfg.seed,
        "preprocessing": pre.to_dict(),
        "augmentation": aug.to_dict() if aug is not None else None,
        "library_sha256": lib.sha256,
        "library_path": lib.path,
        "library_kind": "draws",
        "library_meta": {k: lib.meta.get(k) for k in ("voltage_kv", "convergence_mrad", "mrad_per_px", "profile")},
        "library_recipe": lib.meta.get("recipe"),
        "library_draws": {r: lib.n_draws(r) for r in lib.roles()},
        "split": {"train": f"draws with role in {list(cfg.train_roles)}"
                  + ("" if train_draws is None else f" (indices {train_draws})"),
                  "val": f"'{val_role}' draws" + ("" if val_draws is None else f" {val_draws}"),
                  "test": f"'{role}' draws at {cfg.eval_dose} electrons per pattern"},
        "heldout": heldout.to_dict(orient="records"),
        "steps_run": steps_run,
        "train_seconds": train_seconds,
    }
    if parent is not None:
        meta["init_from"] = parent
    if cfg.experts:
        meta["members"] = {k: {"model_cfg": m.cfg, **({"run": model.member_info[k]} if k in model.member_info else {})}
                           for k, m in model.members.items()}
        meta["composite"] = model.meta["composite"]
        meta["gate_val"] = gate_val
    path = checkpoint_path(cfg, Path(out_dir))
    result.checkpoint = str(path)
    meta["train_result"] = result.to_dict()
    _save(model, path, meta=meta)
    log.info("%s: %.0f s, held-out per pattern / per cell by thickness:\n%s", cfg.name, train_seconds,
             heldout[["thickness_nm", "per_pattern", "per_cell"]].to_string(index=False))
    if progress is not None:
        progress(1.0, f"{cfg.name}: done, held-out per-pattern {result.test_acc}")
    return model, result
