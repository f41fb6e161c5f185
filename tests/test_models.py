"""polcore.models: registry, heads and their losses, angle binning, checkpoints, weights files, no augmentation
at inference."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from polcore.models import (
    FAMILIES,
    FAMILY_HEADS,
    HEADS,
    build_model,
    load_checkpoint,
    read_checkpoint_meta,
    save_checkpoint,
)
from polcore.models.heads import RegHead, circular_soft_labels, prototypical_loss, vectors_to_class
from polcore.preprocess import Augmenter
from polcore.types import N_CLASSES, angle_to_class, class_to_angle, class_to_vector

CASES = [(f, h) for f in FAMILIES for h in FAMILY_HEADS[f]]


def _rand(n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((n, 64, 64), dtype=np.float32), rng.integers(0, N_CLASSES, n)


def _ready(model, seed=0):
    """A model that can predict: pca_knn fitted on random patterns, proto given prototypes."""
    if model.family == "pca_knn":
        X, y = _rand(40, seed)
        y[:8] = np.arange(8)
        model.fit(X, y)
    elif model.head == "proto":
        X, _ = _rand(16, seed)
        model.set_prototypes(X, np.arange(16) % 8)
    return model


@pytest.mark.parametrize("family, head", CASES)
def test_every_family_and_head_runs(family, head):
    torch.manual_seed(0)
    model = build_model(family, head, device="cpu") if family != "pca_knn" else build_model(family, head)
    _ready(model)
    X, _ = _rand(2, seed=1)
    if family != "pca_knn":
        model.net.eval()
        with torch.no_grad():
            out = model.net(torch.from_numpy(X)[:, None])
        assert out.shape == (2, {"cls": 8, "reg": 2, "proto": 128}[head])
        assert torch.isfinite(out).all()
    pred, proba, emb = model.infer(X)
    assert proba.shape == (2, 8) and np.all(np.isfinite(proba))
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-5)
    assert pred.shape == (2,) and pred.dtype == np.int64 and set(pred) <= set(range(8))
    assert emb.shape[0] == 2 and emb.shape[1] == model.embed_dim and np.all(np.isfinite(emb))
    np.testing.assert_array_equal(model.predict(X), pred)
    np.testing.assert_allclose(model.predict_proba(X), proba, rtol=1e-5, atol=1e-6)


def test_registry_errors_list_valid_names():
    with pytest.raises(ValueError, match="custom_cnn, resnet, vgg, pca_knn"):
        build_model("alexnet")
    with pytest.raises(ValueError, match="cls, reg, proto"):
        build_model("resnet", "softmax")
    with pytest.raises(ValueError, match="no head 'reg'"):
        build_model("pca_knn", "reg")
    with pytest.raises(ValueError, match="no head 'proto'"):
        build_model("pca_knn", "proto")
    with pytest.raises(ValueError, match="resnet18"):
        build_model("resnet", arch="resnet9")
    with pytest.raises(ValueError, match="vgg11_bn"):
        build_model("vgg", arch="vgg19")
    with pytest.raises(ValueError, match="unknown resnet options"):
        build_model("resnet", pretrained=True)
    assert HEADS == ("cls", "reg", "proto")


def test_paper_archs_build():
    for fam, arch, n_feat in (("resnet", "resnet50", 2048), ("vgg", "vgg16_bn", 512)):
        m = build_model(fam, "cls", arch=arch, device="cpu")
        assert m.cfg["arch"] == arch
        assert m.net.neck[0].in_features == n_feat
        first = next(x for x in m.net.backbone.modules() if isinstance(x, torch.nn.Conv2d))
        assert first.in_channels == 1  # single-channel diffraction patterns, for both families


# ----------------------------------------------------------------------------- angle <-> class helpers
@given(st.integers(min_value=-100, max_value=100))
def test_class_angle_round_trip(k):
    assert angle_to_class(class_to_angle(k)) == k % 8


@given(st.integers(0, 7), st.floats(min_value=-22.49, max_value=22.49), st.integers(-3, 3))
def test_angle_to_class_within_half_bin(k, delta, turns):
    assert angle_to_class(45.0 * k + delta + 360.0 * turns) == k


@given(st.floats(min_value=-720, max_value=720), st.floats(min_value=1e-3, max_value=1e3))
def test_reg_binning_of_vectors(angle, r):
    a = np.deg2rad(angle)
    v = r * np.array([np.cos(a), np.sin(a)])
    assert vectors_to_class(v) == angle_to_class(angle)


@settings(deadline=None, max_examples=50)
@given(st.floats(min_value=0, max_value=360), st.floats(min_value=0.05, max_value=5.0))
def test_reg_head_predict_and_proba_agree(angle, r):
    head = RegHead(hidden=4)
    a = np.deg2rad(angle)
    out = torch.tensor([[r * np.cos(a), r * np.sin(a)]], dtype=torch.float32)
    k = angle_to_class(angle)
    assert int(head.predict(out)[0]) == k
    p = head.proba(out)[0]
    assert float(p.sum()) == pytest.approx(1.0, abs=1e-5)
    off = abs(((angle - 45.0 * k) + 180) % 360 - 180)
    if off < 22.0:  # away from a bin edge the most probable class is the binned one
        assert int(p.argmax()) == k


def test_reg_targets_are_class_vectors():
    head = RegHead(hidden=4)
    y = torch.arange(8)
    target = torch.tensor(class_to_vector(np.arange(8)), dtype=torch.float32)
    assert float(head.loss(target, y)) == pytest.approx(0.0, abs=1e-7)
    assert [int(c) for c in head.predict(target)] == list(range(8))


# ----------------------------------------------------------------------------- proto loss
def test_soft_labels_sum_to_one_and_peak_at_true_class():
    y = torch.arange(8)
    t = circular_soft_labels(y, sigma=1.25)
    np.testing.assert_allclose(t.sum(dim=1).numpy(), 1.0, atol=1e-6)
    assert torch.equal(t.argmax(dim=1), y)
    # circular: neighbours either side weigh the same, opposite class weighs least
    for k in range(8):
        assert t[k, (k + 1) % 8] == pytest.approx(float(t[k, (k - 1) % 8]))
        assert int(t[k].argmin()) == (k + 4) % 8
    # sigma = 1.25 class steps: ratio of neighbour to peak = exp(-1 / (2 * 1.25^2))
    assert float(t[0, 1] / t[0, 0]) == pytest.approx(np.exp(-1 / (2 * 1.25**2)), rel=1e-5)


def test_prototypical_loss_prefers_circularly_ordered_embeddings():
    """Classes on a circle in their angular order beat the same points with the classes shuffled."""
    torch.manual_seed(0)
    y = torch.arange(64) % 8
    ang = torch.arange(8) * (2 * np.pi / 8)
    circle = 1.5 * torch.stack([torch.cos(ang), torch.sin(ang)], dim=1)
    ordered = circle[y] + 0.05 * torch.randn(64, 2)
    shuffled = circle[torch.tensor([0, 3, 6, 1, 4, 7, 2, 5])][y] + 0.05 * torch.randn(64, 2)
    lo, ls = prototypical_loss(ordered, y), prototypical_loss(shuffled, y)
    assert torch.isfinite(lo) and torch.isfinite(ls) and float(lo) < 0.5 * float(ls)
    # only two classes in the batch: finite, with gradient
    y2 = torch.tensor([0, 0, 3, 3])
    e = torch.randn(4, 16, requires_grad=True)
    loss = prototypical_loss(e, y2)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(e.grad).all()


def test_prototypical_loss_euclidean_option():
    """The study's (non-squared) distance: finite with gradient even where a sample is its class prototype."""
    e = torch.randn(5, 8, requires_grad=True)
    y = torch.tensor([0, 1, 1, 2, 2])  # class 0 has one member: distance 0 to its prototype
    loss = prototypical_loss(e, y, distance="euclidean")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(e.grad).all()
    with pytest.raises(ValueError, match="sqeuclidean, euclidean"):
        prototypical_loss(e, y, distance="cosine")
    m = build_model("custom_cnn", "proto", distance="euclidean", device="cpu")
    assert m.net.head.distance == "euclidean" and m.cfg["distance"] == "euclidean"


def test_proto_needs_prototypes():
    m = build_model("custom_cnn", "proto", device="cpu")
    with pytest.raises(RuntimeError, match="prototypes"):
        m.predict(_rand(2)[0])


# ----------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("family, head", [("custom_cnn", "cls"), ("custom_cnn", "proto"), ("custom_cnn", "reg"),
                                          ("pca_knn", "cls")])
def test_checkpoint_round_trip_identical_predictions(tmp_path, family, head):
    X, y = _rand(48, seed=3)
    Xv, yv = _rand(16, seed=4)
    yv[:8] = np.arange(8)
    torch.manual_seed(0)
    m = build_model(family, head) if family == "pca_knn" else build_model(family, head, device="cpu")
    if family == "pca_knn":
        m.fit(X, y, Xv, yv)
    else:
        m.fit(X, y, Xv, yv, epochs=1, batch_size=16, seed=0)
    path = save_checkpoint(m, tmp_path / "model", meta={"library_sha256": "abc", "preprocessing": {"size": 64}})
    assert path.suffix == (".npz" if family == "pca_knn" else ".pt")
    side = json.loads(path.with_suffix(".json").read_text())
    assert side["family"] == family and side["head"] == head and side["library_sha256"] == "abc"
    assert side["classes"] == ["RM", "RU", "MU", "LU", "LM", "LD", "MD", "RD"] and side["input_size"] == 64
    assert {"torch", "numpy", "polcore"} <= set(side["versions"])
    if family != "pca_knn":
        raw = torch.load(path, weights_only=True)  # plain tensors + a JSON string
        assert set(raw) == {"format", "state_dict", "meta_json"}
    m2 = load_checkpoint(path, **({} if family == "pca_knn" else {"device": "cpu"}))
    assert m2.meta["preprocessing"] == {"size": 64} and read_checkpoint_meta(path)["head"] == head
    Xt, _ = _rand(10, seed=5)
    # BLAS results depend on threads and load: compare floats with tolerances (CONVENTIONS.md 16)
    np.testing.assert_allclose(m.predict_proba(Xt), m2.predict_proba(Xt), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(m.predict(Xt), m2.predict(Xt))
    np.testing.assert_allclose(m.embed(Xt), m2.embed(Xt), rtol=1e-5, atol=1e-5)


def test_load_checkpoint_rejects_other_files(tmp_path):
    p = tmp_path / "x.pt"
    torch.save({"a": torch.zeros(2)}, p)
    with pytest.raises(ValueError, match="not a polbench model checkpoint"):
        load_checkpoint(p)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")


def test_weights_path_partial_load(tmp_path):
    import torchvision

    torch.manual_seed(1)
    ref = torchvision.models.resnet18(weights=None)  # a user's 3-channel torchvision state dict
    p = tmp_path / "resnet18_user.pth"
    torch.save(ref.state_dict(), p)
    m = build_model("resnet", "cls", weights_path=str(p), device="cpu")
    info = m.meta["init_weights"]
    assert info["n_loaded"] > 50 and info["n_skipped"] >= 2  # fc.weight/bias do not fit
    torch.testing.assert_close(m.net.backbone.conv1.weight, ref.conv1.weight.sum(dim=1, keepdim=True))
    torch.testing.assert_close(m.net.backbone.layer4[1].conv2.weight, ref.layer4[1].conv2.weight)
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        build_model("resnet", "cls", weights_path=str(tmp_path / "nope.pth"))


# ----------------------------------------------------------------------------- no augmentation at inference
class CountingAugmenter(Augmenter):
    """The real Augmenter, counting how often it is called."""

    calls = 0

    def __call__(self, X):
        self.calls += 1
        return super().__call__(X)


@pytest.mark.parametrize("family", ["custom_cnn", "pca_knn"])
def test_augmentations_never_change_inference(family):
    X, y = _rand(40, seed=7)
    Xt, _ = _rand(12, seed=8)
    aug = CountingAugmenter(np.random.default_rng(0), p_blur=1.0, p_noise=1.0)
    torch.manual_seed(0)
    if family == "pca_knn":
        m = build_model(family).fit(X, y, augmenter=aug)
    else:
        m = build_model(family, "cls", device="cpu").fit(X, y, epochs=1, batch_size=16, augmenter=aug)
    n_fit = aug.calls
    assert n_fit > 0
    p1 = m.predict_proba(Xt)
    e1 = m.embed(Xt)
    p2 = m.predict_proba(Xt)
    assert aug.calls == n_fit  # inference never calls it
    np.testing.assert_allclose(p1, p2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(e1, m.embed(Xt), rtol=1e-5, atol=1e-5)
