"""polcore.analysis.embedding: PCA/UMAP embeddings, classifier two-sample AUC and MMD."""

import numpy as np
import pytest

from polcore.analysis import domain_gap, embed_2d, mmd_rbf


def test_pca_embedding_subsamples_reproducibly():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 10)).astype(np.float32)
    x[:, 3] *= 20  # dominant direction
    emb, idx = embed_2d(x, "pca", n_max=120, rng=np.random.default_rng(5))
    assert emb.shape == (120, 2) and idx.shape == (120,)
    assert np.all(np.diff(idx) > 0) and idx.max() < 300
    emb2, idx2 = embed_2d(x, "pca", n_max=120, rng=np.random.default_rng(5))
    np.testing.assert_array_equal(idx, idx2)
    np.testing.assert_allclose(emb, emb2, atol=1e-5)
    # the first component is the dominant axis
    assert abs(np.corrcoef(emb[:, 0], x[idx, 3])[0, 1]) > 0.99
    full, idx_full = embed_2d(x, "pca", seed=1)
    assert full.shape == (300, 2) and np.array_equal(idx_full, np.arange(300))


def test_embedding_accepts_patterns_and_rejects_bad_input():
    rng = np.random.default_rng(1)
    pats = rng.random((40, 8, 8))
    emb, idx = embed_2d(pats, "pca")
    assert emb.shape == (40, 2)
    with pytest.raises(ValueError, match="valid"):
        embed_2d(pats, "tsne")
    bad = pats.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        embed_2d(bad)


@pytest.mark.slow
def test_umap_embedding_tiny():
    rng = np.random.default_rng(2)
    x = np.concatenate([rng.normal(0, 1, (60, 5)), rng.normal(8, 1, (60, 5))]).astype(np.float32)
    emb, idx = embed_2d(x, "umap", n_max=100, rng=np.random.default_rng(3))
    assert emb.shape == (100, 2) and np.isfinite(emb).all()
    emb2, _ = embed_2d(x, "umap", n_max=100, rng=np.random.default_rng(3))
    np.testing.assert_allclose(emb, emb2, atol=1e-4)  # random_state + init="random" is reproducible
    # the two clusters stay apart
    lab = idx >= 60
    gap = np.linalg.norm(emb[lab].mean(0) - emb[~lab].mean(0))
    spread = max(emb[lab].std(0).max(), emb[~lab].std(0).max())
    assert gap > 2 * spread


def test_domain_gap_same_distribution_near_half():
    rng = np.random.default_rng(4)
    a = rng.normal(size=(400, 16))
    b = rng.normal(size=(500, 16))
    auc = domain_gap(a, b, rng=np.random.default_rng(0))
    assert 0.5 <= auc < 0.6


def test_domain_gap_shifted_near_one_and_monotone():
    rng = np.random.default_rng(5)
    a = rng.normal(size=(300, 16))
    far = domain_gap(a, rng.normal(size=(300, 16)) + 1.5, rng=1)
    near = domain_gap(a, rng.normal(size=(300, 16)) + np.r_[0.25, np.zeros(15)], rng=1)
    assert far > 0.97
    assert 0.55 < near < far
    # symmetric in its arguments (reports max(auc, 1 - auc))
    assert domain_gap(rng.normal(size=(300, 16)) + 1.5, a, rng=1) > 0.97
    with pytest.raises(ValueError, match="dimensions"):
        domain_gap(a, a[:, :3])


def test_domain_gap_high_dimensional_patterns():
    rng = np.random.default_rng(6)
    a = rng.random((150, 16, 16))
    b = rng.random((150, 16, 16))
    b[:, 7:9, 7:9] += 0.6  # a brighter centre: a detector / thickness difference
    assert domain_gap(a, rng.random((150, 16, 16)), rng=0) < 0.62
    assert domain_gap(a, b, rng=0) > 0.95
    # PCA before the classifier keeps only high-variance directions and loses this low-variance shift
    assert domain_gap(a, b, rng=0, max_components=10) < domain_gap(a, b, rng=0)


def test_mmd_rbf():
    rng = np.random.default_rng(7)
    a = rng.normal(size=(200, 5))
    same = mmd_rbf(a, rng.normal(size=(200, 5)), rng=0)
    shifted = mmd_rbf(a, rng.normal(size=(200, 5)) + 1.0, rng=0)
    assert abs(same) < 0.01
    assert shifted > 0.1 and shifted > 20 * abs(same)
