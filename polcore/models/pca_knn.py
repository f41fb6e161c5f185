"""The study's classical baseline: StandardScaler -> PCA(20) -> kNN(k = 5), a scikit-learn pipeline on the
flattened 64 x 64 patterns. Only the ``cls`` head exists for it.

Checkpoints store the fitted arrays (scaler moments, PCA components, the kNN training set in PCA space) in an
``.npz`` file read with ``allow_pickle=False``; the pipeline is rebuilt from them without pickle.

Inference (:meth:`PCAKNNModel.infer`, :meth:`~PCAKNNModel.predict_proba`) does not go through the pipeline's
per-call validation: the scaler and the PCA are the same float32 operations in the same order as scikit-learn's
``transform`` (``(x - mean) / scale``, then ``@ components.T`` minus the projected PCA mean), and the k nearest
neighbours come from one of two exact searches, both in float64 distances with scikit-learn's tie rule (among
equal distances the lower training index wins):

* ``"brute"``: scikit-learn's own ``KNeighborsClassifier.kneighbors`` (its brute-force search; for 20 features
  scikit-learn never picks a tree);
* ``"kdtree"``: ``scipy.spatial.cKDTree`` over the training set, ``k + 3`` neighbours fetched and re-sorted by
  (distance, index), rows whose tie runs past them fetched again with more.

Which one is faster depends on the data, not only on the model: a k-d tree prunes well when the queries lie
away from the training cloud along a few dominant directions (a library-fitted scaler meets a real detector's
noise in pixels the library never lit) and badly for queries inside it. ``knn_route="auto"`` (the default)
times both on a probe of the first batch (and the idle one again every :data:`RETUNE_EVERY` batches) and runs
each batch with the one that was cheaper per query when last timed; both give the same neighbours, so the
route changes the speed only (``tests/test_pca_fast.py`` checks both against the scikit-learn pipeline on the
committed library's patterns).

Not done, and why: folding the whole front end (resampling, centring, min-max, scaler, PCA) into one matrix
per scan geometry. Everything but the per-pattern min-max is linear in the raw pattern, and min-max is a
per-pattern affine map that could be applied after the projection; but its two scalars are the minimum and
maximum of the *resampled* pattern, so the resampling has to run in full anyway, and projecting the 83 x 83
detector region read (at 1.27 source px per model px) costs more than projecting the 64 x 64 model input.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from polcore.types import N_CLASSES

__all__ = ["PCAKNNModel", "HEADS", "KNN_ROUTES"]

log = logging.getLogger(__name__)

HEADS: tuple[str, ...] = ("cls",)
#: Neighbour searches of :meth:`PCAKNNModel.infer` ("auto": the faster of the two, timed on the data).
KNN_ROUTES: tuple[str, ...] = ("auto", "brute", "kdtree")
#: With ``knn_route="auto"``, both searches are timed again on every this many-th batch.
RETUNE_EVERY = 32
#: Queries each search is timed on when ``knn_route="auto"`` compares them.
PROBE = 128
#: Extra neighbours the k-d tree route fetches beyond k, so that ties at the k-th distance are resolved by index.
_KD_EXTRA = 3


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
    batch_parallel = True  # numpy only: batches run side by side on the pass's workers
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
        return self.infer(X, batch_size)[1]

    def predict(self, X, batch_size: int = 4096) -> np.ndarray:
        """(n,) int64 class indices (argmax of :meth:`predict_proba`; ties go to the lowest class index)."""
        return self.predict_proba(X, batch_size).argmax(axis=1).astype(np.int64)

    def embed(self, X, batch_size: int = 4096) -> np.ndarray:
        """(n, n_components) float32 PCA coordinates."""
        self._check()
        x = _flat(X)
        return np.concatenate([self._project(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)]) \
            if x.shape[0] else np.zeros((0, self.embed_dim), np.float32)

    def infer(self, X, batch_size: int = 4096):
        """(pred (n,), proba (n, 8), embedding (n, d)) like ``TorchModel.infer``.

        The scaler and PCA run once per batch and feed both the embedding and the kNN: the same float32 steps as
        the scikit-learn pipeline's ``transform``, then an exact neighbour search (see the module docstring), so
        the same numbers as ``pipeline_.predict_proba``.
        """
        self._check()
        x = _flat(X)
        n = x.shape[0]
        fast = self._prepared()
        proba = np.zeros((n, N_CLASSES), np.float32)
        emb = np.zeros((n, self.embed_dim), np.float32)
        k = self.cfg["n_neighbors"]
        for i in range(0, n, batch_size):
            z = self._project(x[i : i + batch_size])
            emb[i : i + batch_size] = z
            idx = self._neighbours(z)
            labels = fast["y"][idx]  # (m, k) encoded classes
            nc = len(fast["classes"])
            counts = np.bincount((labels + nc * np.arange(len(z))[:, None]).ravel(), minlength=len(z) * nc)
            proba[i : i + batch_size, fast["classes"]] = counts.reshape(len(z), nc) / k
        return proba.argmax(axis=1).astype(np.int64), proba, emb

    # ------------------------------------------------------------- fast path
    @property
    def active_backend(self) -> str:
        """The neighbour search the last batches used ('knn:brute' or 'knn:kdtree')."""
        f = self.__dict__.get("_fast") or {}
        return "knn:" + (f.get("route") or (self.knn_route if self.knn_route != "auto" else "auto"))

    @property
    def knn_route(self) -> str:
        """'auto' (default), 'brute' or 'kdtree': see the module docstring; every route gives the same result."""
        return self.__dict__.get("_knn_route", "auto")

    @knn_route.setter
    def knn_route(self, route: str) -> None:
        if route not in KNN_ROUTES:
            raise ValueError(f"knn_route must be one of {', '.join(KNN_ROUTES)}, got {route!r}")
        self.__dict__["_knn_route"] = route
        f = self.__dict__.get("_fast")
        if f is not None:
            f["route"], f["batches"], f["cost"] = None, 0, {}

    def _prepared(self) -> dict:
        """The fitted pipeline's arrays for the fast path (made once per fitted pipeline)."""
        self._check()
        f = self.__dict__.get("_fast")
        if f is None or f["pipeline"] is not self.pipeline_:
            sc, pca, knn = self.pipeline_[0], self.pipeline_[1], self.pipeline_[2]
            comp_t = np.asarray(pca.components_).T
            f = {"pipeline": self.pipeline_, "scaler_mean": np.asarray(sc.mean_), "scaler_scale": np.asarray(sc.scale_),
                 "components_t": comp_t, "pca_offset": np.reshape(np.asarray(pca.mean_), (1, -1)) @ comp_t,
                 "classes": np.asarray(knn.classes_), "y": np.asarray(knn._y), "knn": knn, "tree": None,
                 "route": None, "batches": 0, "cost": {}}
            self.__dict__["_fast"] = f
        return f

    def _project(self, x: np.ndarray) -> np.ndarray:
        """PCA coordinates of flat float32 patterns (m, n_features): scikit-learn's StandardScaler.transform and
        PCA.transform, the same operations in the same dtypes, without their per-call validation."""
        f = self._prepared()
        if x.shape[1] != f["scaler_mean"].shape[0]:
            raise ValueError(f"patterns have {x.shape[1]} pixels, the model was fitted on {f['scaler_mean'].shape[0]}")
        u = np.subtract(x, f["scaler_mean"].astype(x.dtype))
        u /= f["scaler_scale"].astype(x.dtype)
        z = u @ f["components_t"]
        z -= f["pca_offset"]
        return np.asarray(z, np.float32)

    def _neighbours(self, z: np.ndarray) -> np.ndarray:
        """(m, k) training indices of the k nearest neighbours of ``z`` (m, d), in scikit-learn's order of ties."""
        f = self._prepared()
        if len(z) == 0:
            return np.zeros((0, self.cfg["n_neighbors"]), np.intp)
        route = self.knn_route
        if route != "auto":
            f["route"] = route
            return self._search(route, z)
        # the cost per query of each search, measured on the data: the first batch times both on probes of
        # PROBE queries, then each batch runs with the one that was cheaper when last timed (its cost updated
        # by the batch), the other timed again on a probe every RETUNE_EVERY batches. Both give the same
        # neighbours, so this moves the speed only.
        cost, out, done = f["cost"], [], 0
        self._tree()  # built once, outside the timings
        if len(cost) < 2 or f["batches"] % RETUNE_EVERY == 0:
            for r in [r for r in ("kdtree", "brute") if len(cost) < 2 or r != f["route"]]:
                if done < len(z):
                    t0 = time.perf_counter()
                    out.append(self._search(r, z[done : done + PROBE]))
                    cost[r] = (time.perf_counter() - t0) / len(out[-1])
                    done += len(out[-1])
        f["batches"] += 1
        snap = dict(cost)  # a copy: a scan pass's workers may time another batch meanwhile
        f["route"] = min(snap, key=snap.get)
        if done < len(z):
            t0 = time.perf_counter()
            out.append(self._search(f["route"], z[done:]))
            cost[f["route"]] = (time.perf_counter() - t0) / (len(z) - done)
        return out[0] if len(out) == 1 else np.concatenate(out)

    def _tree(self):
        """The k-d tree over the training set in PCA space (float64), built on first use."""
        f = self._prepared()
        if f["tree"] is None:
            from scipy.spatial import cKDTree

            f["tree"] = cKDTree(np.asarray(f["knn"]._fit_X, np.float64))
        return f["tree"]

    def _search(self, route: str, z: np.ndarray) -> np.ndarray:
        f = self._prepared()
        k = self.cfg["n_neighbors"]
        if route == "brute":
            return np.asarray(f["knn"].kneighbors(z, return_distance=False))
        tree = self._tree()
        q = np.asarray(z, np.float64)
        m = min(k + _KD_EXTRA, tree.n)
        out = np.empty((len(q), k), np.intp)
        rows = np.arange(len(q))
        while len(rows):
            d, idx = tree.query(q[rows], k=m)
            d, idx = d.reshape(len(rows), m), idx.reshape(len(rows), m)
            order = np.lexsort((idx, d))  # by distance, ties by the lower training index (scikit-learn's rule)
            d, idx = np.take_along_axis(d, order, 1), np.take_along_axis(idx, order, 1)
            out[rows] = idx[:, :k]
            if m >= tree.n:
                break
            rows = rows[d[:, m - 1] <= d[:, k - 1]]  # a tie at the k-th distance that may go on past m
            m = min(2 * m, tree.n)
        return out

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
