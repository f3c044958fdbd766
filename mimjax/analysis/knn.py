"""Weighted k-nearest-neighbour accuracy of frozen features (a training monitor)."""

from __future__ import annotations

import numpy as np


def knn_accuracy(bank: np.ndarray, bank_labels: np.ndarray, query: np.ndarray,
                 query_labels: np.ndarray, k: int = 20, num_classes: int = 10,
                 temperature: float = 0.07) -> float:
  """Top-1 (%) of a cosine kNN vote weighted by exp(similarity / T)."""
  def normalize(x):
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
  sims = normalize(query) @ normalize(bank).T
  k = min(k, len(bank))
  top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
  weights = np.exp(np.take_along_axis(sims, top, axis=1) / temperature)
  votes = np.zeros((len(query), num_classes), np.float64)
  np.add.at(votes, (np.arange(len(query))[:, None], bank_labels[top]), weights)
  return float(100.0 * np.mean(votes.argmax(axis=1) == query_labels))
