"""Hot pixels are found in the scan mean and repaired before min-max normalisation."""

from __future__ import annotations

import numpy as np

from polcore.io import ArrayScan
from polcore.preprocess import Preprocessor, find_hot_pixels


def _disc_scan(rng, hot=((5, 7), (40, 3))):
    yy, xx = np.mgrid[0:48, 0:48]
    disc = ((yy - 24) ** 2 + (xx - 25) ** 2 < 10**2).astype(float) * 50 + 1
    arr = rng.poisson(np.broadcast_to(disc, (4, 5, 48, 48))).astype(np.uint16)
    for r, c in hot:
        arr[..., r, c] = 4000
    return arr


def test_hot_pixels_are_found_and_do_not_dominate_the_input(rng):
    arr = _disc_scan(rng)
    found = {tuple(p) for p in find_hot_pixels(arr.mean(axis=(0, 1)))}
    assert found == {(5, 7), (40, 3)}
    pre = Preprocessor(1.0, 10.0, size=32).fit_scan(ArrayScan(arr))
    clean = Preprocessor(1.0, 10.0, size=32).fit_scan(ArrayScan(_disc_scan(np.random.default_rng(1234), hot=())))
    X = pre.transform(arr.reshape(-1, 48, 48))
    assert X.shape == (20, 32, 32)
    # with the hot pixel repaired, the disc (not one pixel) sets the min-max range: the disc interior is bright
    assert np.median(X[:, 12:20, 12:20]) > 0.5
    assert abs(pre.center_[1] - clean.center_[1]) < 0.5 and abs(pre.center_[0] - clean.center_[0]) < 0.5
    d = pre.to_dict()
    assert Preprocessor.from_dict(d).hot_pixels_.tolist() == pre.hot_pixels_.tolist()


def test_no_false_hot_pixels_on_a_clean_disc(rng):
    arr = _disc_scan(rng, hot=())
    assert len(find_hot_pixels(arr.mean(axis=(0, 1)))) == 0
