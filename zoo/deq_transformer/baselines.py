"""Count-based baselines of the offline experiment: unigram and interpolated Kneser-Ney bigram.

Both are fitted on the train id stream (the vocabulary the DEQ uses) and scored on another
stream, each token given the one before it (the first given ``<eos>``, which ends the
previous line). Interpolated Kneser-Ney (Chen & Goodman 1998, one discount per order):

    P(w | v) = max(c(v, w) - D, 0) / c(v) + D * N1+(v .) / c(v) * P_cont(w)
    P_cont(w) = max(N1+(. w) - D1, 0) / N1+(. .) + D1 * |{w: N1+(. w) > 0}| / N1+(. .) / V

with D = n1 / (n1 + 2 n2) from the bigram count-of-counts, D1 likewise from the
continuation counts, and P(w | v) = P_cont(w) for a context never seen in train.
"""
from __future__ import annotations

import math

import numpy as np
import torch


def _discount(counts: np.ndarray) -> float:
    n1, n2 = float((counts == 1).sum()), float((counts == 2).sum())
    return n1 / (n1 + 2 * n2) if n1 > 0 else 0.5


def unigram_ppl(train: torch.Tensor, ids: torch.Tensor, n_token: int) -> float:
    """Perplexity of `ids` under the maximum-likelihood unigram of `train`."""
    counts = np.bincount(train.numpy(), minlength=n_token).astype(np.float64)
    p = counts / counts.sum()
    return float(math.exp(-np.log(p[ids.numpy()]).mean()))


class KneserNeyBigram:
    """Interpolated Kneser-Ney bigram over ids 0..n_token-1 (formula in the module docstring)."""

    def __init__(self, train: torch.Tensor, n_token: int, eos: int):
        self.n_token, self.eos = n_token, eos
        ids = np.concatenate([[eos], train.numpy()]).astype(np.int64)
        pairs, counts = np.unique(ids[:-1] * n_token + ids[1:], return_counts=True)
        self.pairs, self.counts = pairs, counts.astype(np.float64)
        prev, nxt = pairs // n_token, pairs % n_token
        self.d = _discount(counts)
        self.context_count = np.bincount(prev, weights=self.counts, minlength=n_token)
        self.context_types = np.bincount(prev, minlength=n_token).astype(np.float64)
        continuation = np.bincount(nxt, minlength=n_token).astype(np.float64)
        d1 = _discount(continuation[continuation > 0].astype(np.int64))
        total = continuation.sum()
        self.p_cont = (np.maximum(continuation - d1, 0.0) / total
                       + d1 * float((continuation > 0).sum()) / total / n_token)

    def prob(self, prev: np.ndarray, nxt: np.ndarray) -> np.ndarray:
        """P(nxt | prev) elementwise."""
        keys = prev * self.n_token + nxt
        pos = np.searchsorted(self.pairs, keys).clip(max=len(self.pairs) - 1)
        c = np.where(self.pairs[pos] == keys, self.counts[pos], 0.0)
        cv = self.context_count[prev]
        seen = cv > 0
        safe = np.where(seen, cv, 1.0)
        backoff = np.where(seen, self.d * self.context_types[prev] / safe, 1.0)
        return np.where(seen, np.maximum(c - self.d, 0.0) / safe, 0.0) + backoff * self.p_cont[nxt]

    def ppl(self, ids: torch.Tensor) -> float:
        seq = np.concatenate([[self.eos], ids.numpy()]).astype(np.int64)
        return float(math.exp(-np.log(self.prob(seq[:-1], seq[1:])).mean()))
