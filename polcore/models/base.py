"""The network wrapper shared by the torch families: backbone -> neck -> head, scikit-learn style API.

``TorchModel`` takes preprocessed patterns ``X`` (n, 64, 64) float32 (see :mod:`polcore.preprocess`) and offers
``fit``, ``predict``, ``predict_proba`` (n, 8), ``embed`` (n, d) and ``infer`` (all three in one pass).
Inference runs in eval mode under ``torch.no_grad`` in batches and never augments. CUDA is used when available.

Inference backends (``TorchModel.backend``, on the CPU only; a CUDA model always runs eager PyTorch): the
feature extractor (input normalisation, backbone, neck) is the whole cost, so it is what a backend replaces;
the head stays in PyTorch. ``'auto'`` (default) uses ONNX Runtime when ``onnxruntime`` and ``onnx`` are
installed and the exported graph agrees with PyTorch on the first patterns, else channels-last PyTorch; it
switches only for calls of at least :data:`FAST_MIN_PATTERNS` patterns (an export costs seconds). Measured
rates and the tolerance check: ``benchmarks/infer_bench.py``, ``tests/test_infer_speed.py``.
"""

from __future__ import annotations

import copy
import io
import logging
import math
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from polcore.models.heads import ProtoHead, class_prototypes
from polcore.preprocess import as_patterns
from polcore.types import N_CLASSES

__all__ = ["InputNorm", "Net", "TorchModel", "default_device", "load_weights_file", "BACKENDS",
           "FAST_MIN_PATTERNS", "onnxruntime_available"]

log = logging.getLogger(__name__)


#: Inference backends of :class:`TorchModel` (see the module docstring).
BACKENDS: tuple[str, ...] = ("auto", "onnxruntime", "channels_last", "eager")
#: ``backend='auto'`` builds a fast runner only for an ``infer`` call of at least this many patterns.
FAST_MIN_PATTERNS = 64
#: A fast runner is kept only when its features agree with eager PyTorch on the first patterns of the call:
#: ``|fast - eager| <= FAST_ATOL * (1 + max |eager|)``.
FAST_ATOL = 1e-4


def onnxruntime_available() -> bool:
    """True when ``onnxruntime`` and ``onnx`` (needed by ``torch.onnx.export``) can be imported."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "onnx"))


def default_device() -> str:
    """'cuda' when a GPU is visible to torch, else 'cpu'."""
    return "cuda" if torch.cuda.is_available() else "cpu"


class InputNorm(nn.Module):
    """Subtract the training set's mean pattern and divide by the global std of the residual.

    Min-max normalised patterns differ between polarizations by a few percent of a bright disc that looks alike
    in every pattern; removing the common mean pattern lets the networks see the small asymmetric residual
    (measured on the default library: the custom CNN went from chance to 0.73 held-out accuracy at 20 nm in
    7 epochs, against no progress without it). Fitted by ``TorchModel.fit`` on the training data and saved in
    the state dict, so inference applies exactly the same transform.
    """

    def __init__(self, size: int, enabled: bool = True):
        super().__init__()
        self.enabled = bool(enabled)
        self.register_buffer("mean", torch.zeros(1, 1, size, size))
        self.register_buffer("scale", torch.ones(()))

    @torch.no_grad()
    def fit(self, X: np.ndarray) -> None:
        """Set mean (K, K) and scale from training patterns X (n, K, K)."""
        m = X.mean(axis=0, dtype=np.float64)
        ss = sum(float(np.sum((X[i : i + 1024] - m) ** 2)) for i in range(0, X.shape[0], 1024))
        sd = float(np.sqrt(ss / max(X.size, 1)))
        self.mean.copy_(torch.as_tensor(m, dtype=torch.float32)[None, None])
        self.scale.fill_(max(sd, 1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.scale if self.enabled else x


class Net(nn.Module):
    """Input normalisation, ``backbone (n, 1, S, S) -> (n, F)``, neck ``Linear(F, hidden) + ReLU`` (the study's
    decoder), head."""

    def __init__(self, backbone: nn.Module, n_features: int, head: nn.Module, hidden: int = 512,
                 input_size: int = 64, input_norm: bool = True):
        super().__init__()
        self.input_norm = InputNorm(input_size, enabled=input_norm)
        self.backbone = backbone
        self.neck = nn.Sequential(nn.Linear(n_features, hidden), nn.ReLU())
        self.head = head

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.neck(self.backbone(self.input_norm(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def load_weights_file(net: nn.Module, path: str | Path) -> dict:
    """Partially load a user's local state dict into ``net`` (never downloads).

    Keys are matched as given or with the ``backbone.`` prefix (so a plain torchvision ResNet/VGG state dict
    fits the backbone); a 3-channel stem weight is summed over its input channels to fit the 1-channel stem.
    Tensors whose shape does not match are skipped. The file is read with ``torch.load(weights_only=True)``.

    Returns
    -------
    dict with ``path``, ``loaded`` (list of keys) and ``skipped`` (list of keys) for the metadata.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file not found (weights are never downloaded)")
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a state dict (name -> tensor), got {type(sd).__name__}")
    own = net.state_dict()
    new, loaded, skipped = {}, [], []
    for k, v in sd.items():
        if not torch.is_tensor(v):
            continue
        target = k if k in own else (f"backbone.{k}" if f"backbone.{k}" in own else None)
        if target is None:
            skipped.append(k)
            continue
        want = own[target].shape
        if v.shape != want and v.ndim == 4 and v.shape[1] == 3 and want[1] == 1 and v.shape[0] == want[0]:
            v = v.sum(dim=1, keepdim=True)
        if v.shape != want:
            skipped.append(k)
            continue
        new[target] = v.to(own[target].dtype)
        loaded.append(target)
    net.load_state_dict(new, strict=False)
    log.info("weights %s: loaded %d tensors, skipped %d (%s)", path, len(loaded), len(skipped),
             ", ".join(skipped[:8]) + (" ..." if len(skipped) > 8 else ""))
    return {"path": str(path), "loaded": loaded, "skipped": skipped}


class _Features(nn.Module):
    """``Net.features`` as a module of its own (what a fast backend runs)."""

    def __init__(self, net: Net):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.features(x)


def _fingerprint(net: Net) -> tuple:
    """Storage and in-place version of every parameter and buffer of the feature extractor: changes whenever
    the weights do (optimizer steps, ``load_state_dict``, ``InputNorm.fit``, moving the net), so a runner built
    from them is rebuilt."""
    parts = (net.input_norm, net.backbone, net.neck)
    try:
        return tuple((t.data_ptr(), t._version) for m in parts for t in (*m.parameters(), *m.buffers()))
    except RuntimeError:  # inference-mode tensors keep no version counter: no fast runner for them
        return None


class _OrtFeatures:
    """The feature extractor exported to ONNX (in memory) and run by ONNX Runtime on the CPU."""

    name = "onnxruntime"

    def __init__(self, net: Net, size: int):
        import onnxruntime as ort

        buf = io.BytesIO()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(_Features(net).eval(), (torch.zeros(2, 1, size, size),), buf, input_names=["x"],
                              output_names=["h"], dynamic_axes={"x": {0: "n"}, "h": {0: "n"}}, dynamo=False)
        so = ort.SessionOptions()
        so.intra_op_num_threads = max(1, torch.get_num_threads())
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # no busy-waiting between ops: the scan reader thread (and anything else on the machine) gets the cores
        # (measured: the same or faster, model alone and end to end; benchmarks/infer_bench.py)
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(buf.getvalue(), so, providers=["CPUExecutionProvider"])

    def __call__(self, x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(self.session.run(["h"], {"x": np.ascontiguousarray(x[:, None])})[0])


class _ChannelsLastFeatures:
    """A channels-last copy of the feature extractor (oneDNN's preferred layout on the CPU), eager PyTorch."""

    name = "channels_last"

    def __init__(self, net: Net, size: int):
        self.module = copy.deepcopy(_Features(net)).eval().to(memory_format=torch.channels_last)

    def __call__(self, x: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(x[:, None])).contiguous(memory_format=torch.channels_last)
        return self.module(t).contiguous()


_as_input = as_patterns


class TorchModel:
    """A torch network of one family with one head, used like a scikit-learn estimator.

    Parameters
    ----------
    family, head : registry names.
    net : the :class:`Net`.
    cfg : JSON-able build configuration (rebuilds the same architecture with ``build_model``).
    device : 'cpu', 'cuda' or None (CUDA when available).

    Attributes
    ----------
    meta : metadata dict (filled by training / checkpoints).
    history_ : per-epoch dicts (epoch, train_loss, val_loss, val_acc, seconds) after ``fit``.
    best_epoch_ : epoch whose weights were kept (lowest validation loss).
    """

    is_torch = True

    def __init__(self, family: str, head: str, net: Net, cfg: dict, device: str | None = None):
        self.family = family
        self.head = head
        self.net = net
        self.cfg = dict(cfg)
        self.device = torch.device(device or default_device())
        self.net.to(self.device)
        self.meta: dict = {"family": family, "head": head, "model_cfg": dict(cfg)}
        self.history_: list[dict] = []
        self.best_epoch_: int | None = None
        self.backend = "auto"
        # ORT sessions fix their thread count when built: one runner per torch thread count in use, each
        # (fingerprint, backend asked, runner or None); ``_last`` is the one the most recent call used
        self._runner: dict[int, tuple] = {}
        self._last: object | None = None

    # ------------------------------------------------------------------ basics
    @property
    def input_size(self) -> int:
        return int(self.cfg.get("input_size", 64))

    @property
    def embed_dim(self) -> int:
        return int(self.cfg.get("embed_dim", 128)) if self.head == "proto" else int(self.cfg.get("hidden", 512))

    @property
    def batch_parallel(self) -> bool:
        """Whether a scan pass runs this model on several batches at once, each on a share of the cores
        (``polcore.infer._workers_default``), rather than one batch on every core. Measured on 2 cores
        (``predict_scan``, the same scan and run): the custom CNN gains or holds (thickness experts 6,000 ->
        7,900 patterns/s alone, study architecture 1,803 -> 1,843); ResNet-18 and VGG-11-BN lose
        (``benchmarks/pass_cpu.py --workers 1,2``: 580 -> 543, 156 -> 141: two batches' activations at once
        overflow the caches), so they keep all cores on one."""
        return self.family == "custom_cnn"

    def n_parameters(self) -> int:
        return int(sum(p.numel() for p in self.net.parameters()))

    def to(self, device) -> TorchModel:
        self.device = torch.device(device)
        self.net.to(self.device)
        self._runner, self._last = {}, None
        return self

    def __getstate__(self) -> dict:  # copies and pickles leave the runner behind (an ONNX session is neither)
        d = self.__dict__.copy()
        d["_runner"], d["_last"] = {}, None
        return d

    @property
    def backend(self) -> str:
        """Inference backend on the CPU: one of :data:`BACKENDS` (see the module docstring)."""
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        if value not in BACKENDS:
            raise ValueError(f"unknown inference backend {value!r}; valid: {', '.join(BACKENDS)}")
        if value == "onnxruntime" and not onnxruntime_available():
            raise ValueError("inference backend 'onnxruntime' needs the packages onnxruntime and onnx "
                             "(pip install onnxruntime onnx); 'auto' falls back to PyTorch without them")
        self._backend = value
        self._runner, self._last = {}, None

    @property
    def active_backend(self) -> str:
        """The backend the most recent large ``infer`` call used ('eager' on CUDA or before any)."""
        r = self.__dict__.get("_last")
        return r.name if r is not None else "eager"

    def _fast_features(self, x: np.ndarray):
        """The fast CPU runner for this call (built or reused), or None for eager PyTorch."""
        if self.device.type != "cpu" or self.backend == "eager":
            return None
        fp = _fingerprint(self.net)
        if fp is None:
            return None
        threads = torch.get_num_threads()  # an ONNX Runtime session keeps the count it was built with
        got = self._runner.get(threads)
        if got is not None:
            if got[0] == fp and got[1] == self.backend:
                self._last = got[2]
                return got[2]
            self._runner, self._last = {}, None  # built from other weights (or for another backend): stale
        if self.backend == "auto" and x.shape[0] < FAST_MIN_PATTERNS:
            return None
        kinds = {"auto": ("onnxruntime", "channels_last") if onnxruntime_available() else ("channels_last",),
                 "onnxruntime": ("onnxruntime",), "channels_last": ("channels_last",)}[self.backend]
        runner = None
        probe = x[: min(16, x.shape[0])]
        ref = self.net.features(self._tensor(probe)).float().numpy()
        for kind in kinds:
            try:
                cand = (_OrtFeatures if kind == "onnxruntime" else _ChannelsLastFeatures)(self.net, x.shape[-1])
                got = cand(probe).float().numpy()
            except Exception as exc:  # noqa: BLE001 - any export/runtime failure means: use the next backend
                log.warning("%s: inference backend %s unavailable (%s: %s); falling back", self, kind,
                            type(exc).__name__, str(exc)[:200])
                continue
            tol = FAST_ATOL * (1.0 + float(np.abs(ref).max(initial=0.0)))
            if got.shape == ref.shape and float(np.abs(got - ref).max(initial=0.0)) <= tol:
                runner = cand
                break
            log.warning("%s: inference backend %s disagrees with PyTorch (max |diff| %.2e > %.2e); not used",
                        self, kind, float(np.abs(got - ref).max(initial=0.0)) if got.shape == ref.shape else
                        float("inf"), tol)
        if runner is None and self.backend != "auto":
            raise RuntimeError(f"{self}: inference backend {self.backend!r} failed (see the log)")
        log.info("%s: inference backend %s", self, runner.name if runner is not None else "eager")
        self._runner[threads] = (fp, self.backend, runner)
        self._last = runner
        return runner

    def _tensor(self, x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x)).to(self.device).unsqueeze(1)

    def __repr__(self) -> str:
        return f"TorchModel(family={self.family!r}, head={self.head!r}, arch={self.cfg.get('arch')!r})"

    # --------------------------------------------------------------- inference
    @torch.no_grad()
    def infer(self, X, batch_size: int = 512) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Predictions, probabilities and embeddings in one pass (eval mode, no grad, no augmentation).

        Parameters
        ----------
        X : (n, K, K) float32 preprocessed patterns.

        Returns
        -------
        pred : int64 (n,); proba : float32 (n, 8), rows sum to 1; embedding : float32 (n, d).
        """
        x = _as_input(X)
        was_training = self.net.training
        self.net.eval()
        preds, probas, embs = [], [], []
        try:
            fast = self._fast_features(x) if x.shape[0] else None
            for i in range(0, x.shape[0], batch_size):
                h = fast(x[i : i + batch_size]) if fast is not None else self.net.features(self._tensor(x[i : i + batch_size]))
                out = self.net.head(h)
                preds.append(self.net.head.predict(out).cpu().numpy())
                probas.append(self.net.head.proba(out).float().cpu().numpy())
                embs.append(self.net.head.embedding(h, out).float().cpu().numpy())
        finally:
            self.net.train(was_training)
        if not preds:
            return np.zeros(0, np.int64), np.zeros((0, N_CLASSES), np.float32), np.zeros((0, self.embed_dim), np.float32)
        return (np.concatenate(preds).astype(np.int64), np.concatenate(probas), np.concatenate(embs))

    def predict(self, X, batch_size: int = 512) -> np.ndarray:
        """Class index (n,) int64 of each pattern."""
        return self.infer(X, batch_size)[0]

    def predict_proba(self, X, batch_size: int = 512) -> np.ndarray:
        """Class probabilities (n, 8) float32; rows sum to 1."""
        return self.infer(X, batch_size)[1]

    def embed(self, X, batch_size: int = 512) -> np.ndarray:
        """Feature vectors (n, d): the neck output (cls, reg; d = 512) or the embedding (proto; d = 128)."""
        return self.infer(X, batch_size)[2]

    # ------------------------------------------------------------------ losses
    @torch.no_grad()
    def evaluate_loss(self, X, y, batch_size: int = 512) -> tuple[float, float]:
        """Mean loss and accuracy on (X, y) in eval mode.

        The proto loss uses per-batch prototypes, so X is visited in a fixed shuffled order (mixed classes in
        every batch); the caller passes the same arrays each epoch.
        """
        x = _as_input(X)
        y = np.asarray(y, dtype=np.int64)
        was_training = self.net.training
        self.net.eval()
        tot, n_ok, n = 0.0, 0, 0
        try:
            for i in range(0, x.shape[0], batch_size):
                xb, yb = self._tensor(x[i : i + batch_size]), torch.from_numpy(y[i : i + batch_size]).to(self.device)
                out = self.net(xb)
                tot += float(self.net.head.loss(out, yb)) * len(yb)
                if not (isinstance(self.net.head, ProtoHead) and not bool(self.net.head.has_prototypes)):
                    n_ok += int((self.net.head.predict(out) == yb).sum())
                n += len(yb)
        finally:
            self.net.train(was_training)
        return tot / max(n, 1), n_ok / max(n, 1)

    @torch.no_grad()
    def set_prototypes(self, X, y, batch_size: int = 512, fallback_X=None, fallback_y=None) -> None:
        """Store class prototypes (mean embeddings per class) computed from (X, y) in the proto head.

        Classes absent from ``y`` take their prototype from ``(fallback_X, fallback_y)`` when given.
        """
        if not isinstance(self.net.head, ProtoHead):
            raise ValueError(f"set_prototypes needs the proto head, this model has {self.head!r}")
        emb = torch.from_numpy(self._raw_embed(X, batch_size)).to(self.device)
        fb = None
        missing = set(range(N_CLASSES)) - set(np.unique(np.asarray(y)).tolist())
        if missing and fallback_X is not None and len(fallback_X):
            fb_emb = torch.from_numpy(self._raw_embed(fallback_X, batch_size)).to(self.device)
            fb = class_prototypes(fb_emb, torch.as_tensor(np.asarray(fallback_y), device=self.device))
        protos = class_prototypes(emb, torch.as_tensor(np.asarray(y), device=self.device), fallback=fb)
        self.net.head.set_prototypes(protos)

    @torch.no_grad()
    def _raw_embed(self, X, batch_size: int) -> np.ndarray:
        x = _as_input(X)
        was_training = self.net.training
        self.net.eval()
        try:
            out = [self.net(self._tensor(x[i : i + batch_size])).float().cpu().numpy()
                   for i in range(0, x.shape[0], batch_size)]
        finally:
            self.net.train(was_training)
        return np.concatenate(out) if out else np.zeros((0, self.embed_dim), np.float32)

    # ---------------------------------------------------------------- training
    def fit(
        self,
        X,
        y,
        X_val=None,
        y_val=None,
        *,
        epochs: int = 20,
        lr: float = 2e-4,
        weight_decay: float = 1e-4,
        batch_size: int = 128,
        patience: int | None = 5,
        augmenter: Callable[[np.ndarray], np.ndarray] | None = None,
        seed: int = 0,
        progress: Callable[[float, str], None] | None = None,
    ) -> TorchModel:
        """Train with Adam; early stopping on the validation loss; the best weights are kept.

        Parameters
        ----------
        X, y : training patterns (n, K, K) float32 and classes (n,) int.
        X_val, y_val : validation data (independent simulations, never a random pick of the training patterns);
            None = no early stopping, the last epoch is kept (and proto prototypes come from the training data).
        epochs, lr, weight_decay, batch_size : optimisation settings (the study: 20, 2e-4, 1e-4, 128).
        patience : epochs without a lower validation loss before stopping (None = never stop early).
        augmenter : callable (n, K, K) -> (n, K, K) applied to training batches only.
        seed : seeds the batch order.
        progress : optional ``progress(fraction, message)``.

        Returns
        -------
        self
        """
        x = _as_input(X)
        y = np.asarray(y, dtype=np.int64)
        if x.shape[0] != y.shape[0] or x.shape[0] < 2:
            raise ValueError(f"X and y must hold the same number (>= 2) of patterns, got {x.shape[0]}, {y.shape[0]}")
        if y.min() < 0 or y.max() >= N_CLASSES:
            raise ValueError(f"class indices must lie in 0..{N_CLASSES - 1}")
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        rng = np.random.default_rng(seed)
        has_val = X_val is not None and y_val is not None and len(y_val) > 1
        if has_val:
            xv = _as_input(X_val)
            yv = np.asarray(y_val, dtype=np.int64)
            order = np.random.default_rng(seed + 1).permutation(len(yv))  # mixed classes per batch (proto loss)
            xv, yv = xv[order], yv[order]
        fb = slice(None, None, max(1, x.shape[0] // 4096))  # class-balanced-ish subset for prototype fallback
        if self.net.input_norm.enabled:
            self.net.input_norm.fit(x)
        opt = torch.optim.Adam(self.net.parameters(), lr=lr, weight_decay=weight_decay)
        n = x.shape[0]
        drop_last = n > batch_size
        n_batches = n // batch_size if drop_last else 1
        best = (math.inf, None, None)
        bad = 0
        self.history_ = []
        t_start = time.perf_counter()
        for epoch in range(1, epochs + 1):
            t0 = time.perf_counter()
            self.net.train()
            perm = rng.permutation(n)
            tot = 0.0
            for b in range(n_batches):
                idx = np.sort(perm[b * batch_size : (b + 1) * batch_size]) if drop_last else perm
                xb = x[idx]
                if augmenter is not None:
                    xb = augmenter(xb)
                out = self.net(self._tensor(xb.astype(np.float32, copy=False)))
                loss = self.net.head.loss(out, torch.from_numpy(y[idx]).to(self.device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                tot += float(loss.detach())
                if progress is not None and (b % 10 == 0):
                    progress(((epoch - 1) + (b + 1) / n_batches) / epochs, f"epoch {epoch}/{epochs}")
            rec = {"epoch": epoch, "train_loss": tot / n_batches}
            if has_val:
                if isinstance(self.net.head, ProtoHead):
                    self.set_prototypes(xv, yv, fallback_X=x[fb], fallback_y=y[fb])
                vl, va = self.evaluate_loss(xv, yv)
                rec.update(val_loss=vl, val_acc=va)
            rec["seconds"] = time.perf_counter() - t0
            self.history_.append(rec)
            msg = f"epoch {epoch}/{epochs}: train loss {rec['train_loss']:.4f}"
            if has_val:
                msg += f", val loss {rec['val_loss']:.4f}, val acc {rec['val_acc']:.3f}"
            log.info("%s %s (%.1f s)", self, msg, rec["seconds"])
            if progress is not None:
                progress(epoch / epochs, msg)
            score = rec["val_loss"] if has_val else -epoch
            if score < best[0]:
                best = (score, epoch, {k: v.detach().clone() for k, v in self.net.state_dict().items()})
                bad = 0
            else:
                bad += 1
                if patience is not None and has_val and bad >= patience:
                    log.info("%s: early stop after epoch %d (best %d)", self, epoch, best[1])
                    break
        if best[2] is not None:
            self.net.load_state_dict(best[2])
        self.best_epoch_ = best[1]
        if isinstance(self.net.head, ProtoHead):
            if has_val:
                self.set_prototypes(xv, yv, fallback_X=x[fb], fallback_y=y[fb])
            else:
                self.set_prototypes(x, y)
        self.net.eval()
        self.meta["fit_seconds"] = time.perf_counter() - t_start
        return self

    def fit_stream(
        self,
        sample: Callable[[int], tuple[np.ndarray, np.ndarray]],
        X_val,
        y_val,
        *,
        steps: int,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        eval_every: int = 250,
        patience: int | None = None,
        norm_X=None,
        fit_norm: bool = True,
        progress: Callable[[float, str], None] | None = None,
    ) -> TorchModel:
        """Train on freshly sampled batches (a library too large to visit, augmented on the fly).

        Adam with a cosine learning-rate decay to 2 % of ``lr`` over ``steps``; every ``eval_every`` steps the
        validation loss is measured and the weights with the lowest one are kept (``history_`` records each
        evaluation as an "epoch" of ``eval_every`` steps).

        Parameters
        ----------
        sample : ``sample(step) -> (X (n, K, K) float32 model input, y (n,) int)``: a seeded batch.
        X_val, y_val : fixed validation set (independent simulations).
        steps : optimisation steps.
        patience : evaluations without a lower validation loss before stopping (None = never).
        norm_X : patterns for the input normalisation (default: a few sampled batches).
        fit_norm : False keeps the current input normalisation (fine-tuning a trained model).
        progress : optional ``progress(fraction, message)``.
        """
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        xv = _as_input(X_val)
        yv = np.asarray(y_val, dtype=np.int64)
        order = np.random.default_rng(1).permutation(len(yv))  # mixed classes per batch (proto loss)
        xv, yv = xv[order], yv[order]
        if self.net.input_norm.enabled and fit_norm:
            if norm_X is None:
                norm_X = np.concatenate([sample(-1 - i)[0] for i in range(8)])
            self.net.input_norm.fit(_as_input(norm_X))
        opt = torch.optim.Adam(self.net.parameters(), lr=lr, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda k: 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(k, steps) / steps)))
        best = (math.inf, None, None)
        bad = 0
        self.history_ = []
        t_start = time.perf_counter()
        t0 = time.perf_counter()
        tot, nb = 0.0, 0
        for step in range(1, steps + 1):
            self.net.train()
            xb, yb = sample(step)
            out = self.net(self._tensor(np.asarray(xb, np.float32)))
            loss = self.net.head.loss(out, torch.as_tensor(np.asarray(yb), dtype=torch.int64, device=self.device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot += float(loss.detach())
            nb += 1
            if step % eval_every and step != steps:
                continue
            if isinstance(self.net.head, ProtoHead):
                self.set_prototypes(xv, yv)
            vl, va = self.evaluate_loss(xv, yv)
            rec = {"epoch": len(self.history_) + 1, "step": step, "train_loss": tot / max(nb, 1), "val_loss": vl,
                   "val_acc": va, "lr": float(sched.get_last_lr()[0]), "seconds": time.perf_counter() - t0}
            self.history_.append(rec)
            tot, nb, t0 = 0.0, 0, time.perf_counter()
            msg = f"step {step}/{steps}: train loss {rec['train_loss']:.4f}, val loss {vl:.4f}, val acc {va:.3f}"
            log.info("%s %s", self, msg)
            if progress is not None:
                progress(step / steps, msg)
            if vl < best[0]:
                best = (vl, rec["epoch"], {k: v.detach().clone() for k, v in self.net.state_dict().items()})
                bad = 0
            else:
                bad += 1
                if patience is not None and bad >= patience:
                    log.info("%s: early stop at step %d (best evaluation %d)", self, step, best[1])
                    break
        if best[2] is not None:
            self.net.load_state_dict(best[2])
        self.best_epoch_ = best[1]
        if isinstance(self.net.head, ProtoHead):
            self.set_prototypes(xv, yv)
        self.net.eval()
        self.meta["fit_seconds"] = time.perf_counter() - t_start
        return self

    # -------------------------------------------------------------- state dict
    def state_dict(self) -> dict:
        """Plain tensors on the CPU (for checkpoints)."""
        return {k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}

    def load_state_dict(self, sd: dict, strict: bool = True) -> None:
        self.net.load_state_dict(sd, strict=strict)
