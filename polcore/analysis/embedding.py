"""2-D embeddings (PCA, UMAP) of patterns or model features, and the domain gap between two feature sets.

UMAP is imported inside :func:`embed_2d`; its first call in a process compiles with numba (about 40 s), so
the pipeline computes embeddings once and stores them. Large sets are subsampled to ``n_max`` rows (seeded).
"""

from __future__ import annotations

import logging

import numpy as np
from threadpoolctl import threadpool_limits

__all__ = ["EMBED_METHODS", "embed_2d", "domain_gap", "mmd_rbf"]

log = logging.getLogger(__name__)

EMBED_METHODS: tuple[str, ...] = ("pca", "umap")


def _rng(rng=None, seed: int | None = None) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is not None:
        return np.random.default_rng(rng)
    return np.random.default_rng(0 if seed is None else seed)


def _as_2d(features, name: str = "features") -> np.ndarray:
    x = np.asarray(features)
    if x.ndim < 2:
        raise ValueError(f"{name} must have shape (n, d) or (n, ky, kx), got {x.shape}")
    x = x.reshape(x.shape[0], -1).astype(np.float32, copy=False)
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} contains NaN or inf")
    return x


def embed_2d(features, method: str = "pca", *, n_max: int = 20000, rng=None, seed: int | None = None,
             n_neighbors: int = 15, min_dist: float = 0.1):
    """Embed rows of ``features`` in 2-D.

    Parameters
    ----------
    features : array_like, shape (n, d) or (n, ky, kx)
        Model features or preprocessed patterns (flattened per row).
    method : {"pca", "umap"}
    n_max : int
        At most this many rows are embedded: a seeded random subsample without replacement (sorted indices)
        when n > n_max. The subsample size is ``min(n, n_max)``.
    rng : np.random.Generator or int, optional
        Randomness for the subsample and the UMAP seed; ``seed`` is used when ``rng`` is None (default 0).
    n_neighbors, min_dist : UMAP parameters.

    Returns
    -------
    embedding : np.ndarray, shape (m, 2), float32
    index : np.ndarray, shape (m,), int64
        Rows of ``features`` that were embedded (m = min(n, n_max)).
    """
    if method not in EMBED_METHODS:
        raise ValueError(f"unknown embedding method {method!r}; valid: {EMBED_METHODS}")
    x = _as_2d(features)
    n = x.shape[0]
    if n < 3:
        raise ValueError(f"need at least 3 rows to embed, got {n}")
    if n_max < 3:
        raise ValueError(f"n_max must be >= 3, got {n_max}")
    gen = _rng(rng, seed)
    if n > n_max:
        index = np.sort(gen.choice(n, size=n_max, replace=False)).astype(np.int64)
        log.info("embed_2d: subsampled %d of %d rows", n_max, n)
    else:
        index = np.arange(n, dtype=np.int64)
    xs = x[index]
    if method == "pca":
        from sklearn.decomposition import PCA

        k = min(2, xs.shape[1])
        emb = PCA(n_components=k, random_state=int(gen.integers(2**31 - 1))).fit_transform(xs)
        if k < 2:
            emb = np.concatenate([emb, np.zeros((emb.shape[0], 2 - k))], axis=1)
    else:
        import umap  # slow import and numba compile on first use

        reducer = umap.UMAP(n_components=2, n_neighbors=int(min(n_neighbors, len(xs) - 1)), min_dist=min_dist,
                            init="random", random_state=int(gen.integers(2**31 - 1)), n_jobs=1)
        emb = reducer.fit_transform(xs)
    return np.asarray(emb, dtype=np.float32), index


def _balanced(a: np.ndarray, b: np.ndarray, n_max: int, gen: np.random.Generator):
    m = min(len(a), len(b), n_max)
    ia = gen.choice(len(a), size=m, replace=False)
    ib = gen.choice(len(b), size=m, replace=False)
    return a[ia], b[ib]


def domain_gap(features_a, features_b, *, rng=None, n_max: int = 5000, n_folds: int = 5, C: float = 0.1,
               max_components: int | None = None) -> float:
    """Classifier two-sample test: how well can a linear model tell sample A from sample B?

    A balanced subsample (``min(n_a, n_b, n_max)`` rows of each) is standardised (optionally reduced by PCA)
    and classified with L2-regularised logistic regression; the ROC-AUC of stratified ``n_folds``-fold
    out-of-fold scores is returned as ``max(auc, 1 - auc)``. Preprocessing is fitted inside each fold.

    Parameters
    ----------
    features_a, features_b : array_like, shapes (n_a, d), (n_b, d) (or (n, ky, kx) patterns)
    rng : np.random.Generator or int, optional (seed 0 when None)
    n_max : int
        Rows per sample at most.
    n_folds : int
        Cross-validation folds (reduced when the samples are small).
    C : float
        Inverse L2 regularisation strength of the logistic regression.
    max_components : int, optional
        PCA dimensions before the classifier (None = no PCA; PCA keeps high-variance directions and can miss
        a shift along a low-variance one).

    Returns
    -------
    float
        AUC in [0.5, 1]: about 0.5 when the samples come from one distribution, 1 when fully separable.
    """
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    a = _as_2d(features_a, "features_a")
    b = _as_2d(features_b, "features_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    gen = _rng(rng)
    a, b = _balanced(a, b, n_max, gen)
    m = len(a)
    if m < 4:
        raise ValueError(f"need at least 4 rows in each sample, got {m}")
    x = np.concatenate([a, b])
    y = np.r_[np.zeros(m, int), np.ones(m, int)]
    folds = int(min(n_folds, m))
    steps = [StandardScaler()]
    if max_components is not None:
        n_train = 2 * m - -(-2 * m // folds)  # smallest training fold
        steps.append(PCA(n_components=int(min(max_components, x.shape[1], n_train - 1)), random_state=0))
    steps.append(LogisticRegression(C=C, max_iter=2000))
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=int(gen.integers(2**31 - 1)))
    # small dense problems: BLAS threads only contend (badly so on a loaded 2-core machine)
    with threadpool_limits(limits=1, user_api="blas"):
        scores = cross_val_predict(make_pipeline(*steps), x, y, cv=cv, method="decision_function")
    auc = float(roc_auc_score(y, scores))
    return max(auc, 1.0 - auc)


def mmd_rbf(a, b, *, gamma: float | None = None, n_max: int = 2000, rng=None) -> float:
    """Unbiased squared maximum mean discrepancy with a Gaussian (RBF) kernel.

    Parameters
    ----------
    a, b : array_like, shapes (n_a, d), (n_b, d)
    gamma : float, optional
        Kernel ``exp(-gamma * |x - y|^2)``; default 1 / median of the pooled pairwise squared distances.
    n_max : int
        Rows per sample at most (seeded subsample; the cost is quadratic).
    rng : np.random.Generator or int, optional

    Returns
    -------
    float
        MMD^2 estimate; about 0 (may be slightly negative) for one distribution, larger for shifted ones.
    """
    from sklearn.metrics.pairwise import euclidean_distances

    x = _as_2d(a, "a").astype(np.float64)
    y = _as_2d(b, "b").astype(np.float64)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature dimensions differ: {x.shape[1]} vs {y.shape[1]}")
    if len(x) < 2 or len(y) < 2:
        raise ValueError("need at least 2 rows in each sample")
    gen = _rng(rng)
    if len(x) > n_max:
        x = x[gen.choice(len(x), n_max, replace=False)]
    if len(y) > n_max:
        y = y[gen.choice(len(y), n_max, replace=False)]
    dxx = euclidean_distances(x, squared=True)
    dyy = euclidean_distances(y, squared=True)
    dxy = euclidean_distances(x, y, squared=True)
    if gamma is None:
        pooled = np.concatenate([dxx[np.triu_indices_from(dxx, 1)], dyy[np.triu_indices_from(dyy, 1)],
                                 dxy.ravel()])
        med = float(np.median(pooled))
        gamma = 1.0 / med if med > 0 else 1.0
    kxx, kyy, kxy = np.exp(-gamma * dxx), np.exp(-gamma * dyy), np.exp(-gamma * dxy)
    n, m = len(x), len(y)
    return float((kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                 - 2.0 * kxy.mean())
