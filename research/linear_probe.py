"""A linear probe for preference data: a Bradley-Terry score `w . f` on frozen features `f` of each
response, fit by L2-regularised logistic regression on chosen-minus-rejected differences, with the
L2 strength picked by cross-validation on the training pairs alone and accuracy measured by nested
k-fold over every pair (each pair held out once). It is the baseline a fine-tuned reward model has
to beat: what the starting model's features already rank, with no training of the decoder.

Pure numpy/scipy over arrays: `features_nkf` holds one feature vector per response (record n,
response k, best first as in research/data/preferences.py), `valid_nk` which responses exist.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
from scipy import optimize

from research.errors import ConfigError

L2_GRID = (1e-2, 1e-1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)


def pair_differences(features_nkf: np.ndarray, valid_nk: np.ndarray,
                     records: np.ndarray | None = None) -> np.ndarray:
  """[P, F] `f_i - f_j` for every valid pair i < j (i preferred) of the given records."""
  n, k, _ = features_nkf.shape
  rows = np.arange(n) if records is None else np.asarray(records)
  diffs = [features_nkf[r, i] - features_nkf[r, j] for r in rows for i in range(k)
           for j in range(i + 1, k) if valid_nk[r, i] and valid_nk[r, j]]
  return np.stack(diffs) if diffs else np.zeros((0, features_nkf.shape[-1]), features_nkf.dtype)


def fit_bradley_terry(diffs_pf: np.ndarray, l2: float) -> np.ndarray:
  """w minimising mean softplus(-w . d) + l2/2 |w|^2 (L-BFGS; strictly convex for l2 > 0)."""
  d = np.asarray(diffs_pf, np.float64)

  def objective(w):
    m = d @ w
    loss = np.mean(np.logaddexp(0.0, -m)) + 0.5 * l2 * w @ w
    grad = -(d.T @ (0.5 * (1.0 - np.tanh(0.5 * m)))) / len(d) + l2 * w  # sigmoid(-m), stably
    return loss, grad

  return optimize.minimize(objective, np.zeros(d.shape[1]), jac=True, method="L-BFGS-B").x


def feature_scale(features_nkf: np.ndarray, valid_nk: np.ndarray,
                  records: np.ndarray) -> np.ndarray:
  """Per-feature standard deviation over the given records' responses (so one L2 strength suits
  every feature, whatever its range); 1 where a feature is constant."""
  x = features_nkf[records][valid_nk[records]]
  scale = x.std(axis=0)
  return np.where(scale > 0, scale, 1.0)


@dataclasses.dataclass(frozen=True)
class ProbeResult:
  accuracy: float  # held-out pairs ranked right (a tie counts half)
  log_loss: float  # mean held-out -log sigmoid(w . d)
  pairs: int
  l2: tuple[float, ...]  # the strength chosen for each fit

  @property
  def standard_error(self) -> float:
    return float(np.sqrt(self.accuracy * (1.0 - self.accuracy) / max(self.pairs, 1)))


def fit_head(features_nkf: np.ndarray, valid_nk: np.ndarray, records: np.ndarray | None = None,
             l2_grid: Sequence[float] = L2_GRID, folds: int = 5, seed: int = 0,
             ) -> tuple[np.ndarray, float]:
  """(w [F], l2): the probe fit on `records` (all by default) with features scaled to unit
  variance and the L2 strength chosen by `folds`-fold CV among those records; `w` applies to the
  unscaled features (score = w . f), so it can serve as a score head's kernel."""
  records = np.arange(len(features_nkf)) if records is None else np.asarray(records)
  scale = feature_scale(features_nkf, valid_nk, records)
  scaled = features_nkf / scale
  l2 = choose_l2(scaled, valid_nk, records, l2_grid, folds, seed)
  return fit_bradley_terry(pair_differences(scaled, valid_nk, records), l2) / scale, l2


def _held_out_margins(features_nkf, valid_nk, train, test, l2_grid, inner_folds, seed):
  w, l2 = fit_head(features_nkf, valid_nk, train, l2_grid, inner_folds, seed)
  return pair_differences(features_nkf, valid_nk, test) @ w, l2


def _summary(margins: Sequence[np.ndarray], l2s: Sequence[float]) -> ProbeResult:
  m = np.concatenate(margins)
  return ProbeResult(accuracy=float(np.mean(m > 0) + 0.5 * np.mean(m == 0)),
                     log_loss=float(np.mean(np.logaddexp(0.0, -m))), pairs=len(m),
                     l2=tuple(float(x) for x in l2s))


def fold_records(records: np.ndarray, folds: int, seed: int) -> list[np.ndarray]:
  """`records` shuffled from `seed` and dealt into `folds` disjoint parts of near-equal size."""
  if not 2 <= folds <= len(records):
    raise ConfigError(f"{folds} folds over {len(records)} records: need 2 <= folds <= records")
  shuffled = np.random.default_rng(seed).permutation(np.asarray(records))
  return [np.sort(shuffled[f::folds]) for f in range(folds)]


def cv_splits(records: np.ndarray, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
  """(train, test) record indices of each of the `fold_records` parts held out in turn."""
  parts = fold_records(records, folds, seed)
  return [(np.concatenate([p for g, p in enumerate(parts) if g != f]), test)
          for f, test in enumerate(parts)]


def choose_l2(features_nkf: np.ndarray, valid_nk: np.ndarray, records: np.ndarray,
              l2_grid: Sequence[float] = L2_GRID, folds: int = 5, seed: int = 0) -> float:
  """The L2 strength of `l2_grid` with the lowest cross-validated log loss over `records` alone."""
  splits = cv_splits(records, folds, seed)
  best = None
  for l2 in l2_grid:
    losses = []
    for train, test in splits:
      w = fit_bradley_terry(pair_differences(features_nkf, valid_nk, train), l2)
      losses.append(np.logaddexp(0.0, -(pair_differences(features_nkf, valid_nk, test) @ w)))
    loss = float(np.mean(np.concatenate(losses)))
    if best is None or loss < best[0]:
      best = (loss, l2)
  return best[1]


def nested_cv(features_nkf: np.ndarray, valid_nk: np.ndarray, folds: int = 5, seed: int = 0,
              l2_grid: Sequence[float] = L2_GRID, inner_folds: int = 5) -> ProbeResult:
  """Every record held out once: each outer fold's head is fit (scale and L2 chosen) on the
  other folds only, and scores the pairs of its own."""
  margins, l2s = [], []
  for train, test in cv_splits(np.arange(len(features_nkf)), folds, seed):
    m, l2 = _held_out_margins(features_nkf, valid_nk, train, test, l2_grid, inner_folds, seed)
    margins.append(m)
    l2s.append(l2)
  return _summary(margins, l2s)


def split_score(features_nkf: np.ndarray, valid_nk: np.ndarray, train: np.ndarray,
                test: np.ndarray, l2_grid: Sequence[float] = L2_GRID, inner_folds: int = 5,
                seed: int = 0) -> ProbeResult:
  """Fit on the `train` records (L2 by CV among them), score the pairs of the `test` records."""
  m, l2 = _held_out_margins(features_nkf, valid_nk, np.asarray(train), np.asarray(test), l2_grid,
                            inner_folds, seed)
  return _summary([m], [l2])
