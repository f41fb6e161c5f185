"""The study's classical baseline: StandardScaler -> PCA(20) -> kNN(k = 5), a scikit-learn pipeline on the
flattened 64 x 64 patterns. Only the ``cls`` head exists for it.

Checkpoints store the fitted arrays (scaler moments, PCA components, the kNN training set in PCA space) in an
``.npz`` file read with ``allow_pickle=False``; the pipeline is rebuilt from them without pickle.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from polcore.types import N_CLASSES

__all__ = ["PCAKNNModel", "HEADS"]

log = logging.getLogger(__name__)

HEADS: tuple[str, ...] = ("cls",)


def _flat(X) -> np.ndarray:
    x = np.asarray(X, dtype=np.float32)
    if x.ndim == 4 and x.shape[1] == 1:
        x = x[:, 0]
    if x.ndim == 2:  # a single (K, K) pattern
        x = x[None]
    if x.ndim != 3:
        raise ValueError(f"X must be preprocessed patterns (n, K, K), got shape {x.shape}")
    return x.reshape(x.shape[0], -1)


class PCAKNNModel:
    """StandardScaler -> PCA(n_components) -> KNeighborsClassifier(n_neighbors) on flattened patterns.

    Parameters
    ----------
    n_components : PCA components (20 in the study).
    n_neighbors : k of the kNN (5 in the study).
    random_state : seed of the (randomized) PCA solver.

    Attributes
    ----------
    pipeline_ : the fitted ``sklearn.pipeline.Pipeline`` (after ``fit``).
    meta : metadata dict.
    """

    is_torch = False
    family = "pca_knn"
    head = "cls"

    def __init__(self, n_components: int = 20, n_neighbors: int = 5, random_state: int = 0, input_size: int = 64):
        if n_components < 1 or n_neighbors < 1:
            raise ValueError("n_components and n_neighbors must be >= 1")
        self.cfg = {"n_components": int(n_components), "n_neighbors": int(n_neighbors),
                    "random_state": int(random_state), "input_size": int(input_size)}
        self.meta: dict = {"family": self.family, "head": self.head, "model_cfg": dict(self.cfg)}
        self.pipeline_ = None
        self.history_: list[dict] = []
        self.best_epoch_ = None

    @property
    def input_size(self) -> int:
        return self.cfg["input_size"]

    @property
    def embed_dim(self) -> int:
        return self.cfg["n_components"]

    def _make(self):
        from sklearn.decomposition import PCA
        from sklearn.neighbors import KNeighborsClassifier
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        return make_pipeline(
            StandardScaler(),
            PCA(n_components=self.cfg["n_components"], random_state=self.cfg["random_state"]),
            KNeighborsClassifier(n_neighbors=self.cfg["n_neighbors"]),
        )

    def __repr__(self) -> str:
        return f"PCAKNNModel(n_components={self.cfg['n_components']}, n_neighbors={self.cfg['n_neighbors']})"

    def fit(self, X, y, X_val=None, y_val=None, *, augmenter=None, progress=None) -> PCAKNNModel:
        """Fit the pipeline on (X, y); ``augmenter`` (training only) is applied once to X.

        The validation split is used for the reported validation accuracy only (kNN has no epochs).

        Returns
        -------
        self
        """
        t0 = time.perf_counter()
        x = np.asarray(X, dtype=np.float32)
        y = np.asarray(y, dtype=np.int64)
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"X and y differ in length: {x.shape[0]} vs {y.shape[0]}")
        if x.shape[0] <= max(self.cfg["n_components"], self.cfg["n_neighbors"]):
            raise ValueError(f"need more than {max(self.cfg['n_components'], self.cfg['n_neighbors'])} patterns")
        if augmenter is not None:
            x = augmenter(x)
        if progress is not None:
            progress(0.0, "pca_knn: fitting")
        self.pipeline_ = self._make().fit(_flat(x), y)
        rec = {"epoch": 1, "seconds": time.perf_counter() - t0}
        if X_val is not None and y_val is not None and len(y_val):
            rec["val_acc"] = float(np.mean(self.predict(X_val) == np.asarray(y_val)))
        self.history_ = [rec]
        self.best_epoch_ = 1
        self.meta["fit_seconds"] = rec["seconds"]
        if progress is not None:
            progress(1.0, "pca_knn: fitted")
        return self

    def _check(self):
        if self.pipeline_ is None:
            raise RuntimeError("PCAKNNModel is not fitted: call fit(X, y) or load a checkpoint")

    def predict_proba(self, X, batch_size: int = 4096) -> np.ndarray:
        """(n, 8) float32: fraction of the k neighbours in each class (classes unseen in training get 0)."""
        self._check()
        x = _flat(X)
        knn = self.pipeline_[-1]
        out = np.zeros((x.shape[0], N_CLASSES), np.float32)
        for i in range(0, x.shape[0], batch_size):
            p = self.pipeline_.predict_proba(x[i : i + batch_size])
            out[i : i + batch_size][:, knn.classes_] = p
        return out

    def predict(self, X, batch_size: int = 4096) -> np.ndarray:
        """(n,) int64 class indices (argmax of :meth:`predict_proba`; ties go to the lowest class index)."""
        return self.predict_proba(X, batch_size).argmax(axis=1).astype(np.int64)

    def embed(self, X, batch_size: int = 4096) -> np.ndarray:
        """(n, n_components) float32 PCA coordinates."""
        self._check()
        x = _flat(X)
        return np.concatenate(
            [self.pipeline_[:-1].transform(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)]
        ).astype(np.float32) if x.shape[0] else np.zeros((0, self.embed_dim), np.float32)

    def infer(self, X, batch_size: int = 4096):
        """(pred (n,), proba (n, 8), embedding (n, d)) like ``TorchModel.infer``.

        The scaler and PCA run once per batch and feed both the embedding and the kNN (the same steps, so the
        same numbers, as :meth:`predict_proba` and :meth:`embed` called separately).
        """
        self._check()
        x = _flat(X)
        n = x.shape[0]
        front, knn = self.pipeline_[:-1], self.pipeline_[-1]
        proba = np.zeros((n, N_CLASSES), np.float32)
        emb = np.zeros((n, self.embed_dim), np.float32)
        for i in range(0, n, batch_size):
            z = front.transform(x[i : i + batch_size])
            emb[i : i + batch_size] = z
            proba[i : i + batch_size, knn.classes_] = knn.predict_proba(z)
        return proba.argmax(axis=1).astype(np.int64), proba, emb

    # ------------------------------------------------------------- checkpoints
    def to_arrays(self) -> dict[str, np.ndarray]:
        """The fitted state as plain arrays (for ``np.savez``)."""
        self._check()
        sc, pca, knn = self.pipeline_[0], self.pipeline_[1], self.pipeline_[2]
        return {
            "scaler_mean": sc.mean_, "scaler_scale": sc.scale_, "scaler_var": sc.var_,
            "scaler_n_samples_seen": np.asarray(sc.n_samples_seen_),
            "pca_components": pca.components_, "pca_mean": pca.mean_,
            "pca_explained_variance": pca.explained_variance_,
            "pca_explained_variance_ratio": pca.explained_variance_ratio_,
            "pca_singular_values": pca.singular_values_, "pca_noise_variance": np.asarray(pca.noise_variance_),
            "pca_n_samples": np.asarray(pca.n_samples_),
            "knn_X": knn._fit_X, "knn_y": knn.classes_[knn._y],
        }

    @classmethod
    def from_arrays(cls, arrays: dict, cfg: dict) -> PCAKNNModel:
        """Rebuild a fitted model from :meth:`to_arrays` output (no pickle)."""
        m = cls(**cfg)
        pipe = m._make()
        sc, pca, knn = pipe[0], pipe[1], pipe[2]
        sc.mean_ = np.asarray(arrays["scaler_mean"])
        sc.scale_ = np.asarray(arrays["scaler_scale"])
        sc.var_ = np.asarray(arrays["scaler_var"])
        sc.n_samples_seen_ = np.asarray(arrays["scaler_n_samples_seen"]).item()
        sc.n_features_in_ = sc.mean_.shape[0]
        pca.components_ = np.asarray(arrays["pca_components"])
        pca.mean_ = np.asarray(arrays["pca_mean"])
        pca.explained_variance_ = np.asarray(arrays["pca_explained_variance"])
        pca.explained_variance_ratio_ = np.asarray(arrays["pca_explained_variance_ratio"])
        pca.singular_values_ = np.asarray(arrays["pca_singular_values"])
        pca.noise_variance_ = np.asarray(arrays["pca_noise_variance"]).item()
        pca.n_samples_ = int(np.asarray(arrays["pca_n_samples"]).item())
        pca.n_components_ = pca.components_.shape[0]
        pca.n_features_in_ = pca.components_.shape[1]
        knn.fit(np.asarray(arrays["knn_X"]), np.asarray(arrays["knn_y"]))
        m.pipeline_ = pipe
        return m
