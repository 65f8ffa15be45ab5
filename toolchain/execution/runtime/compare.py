"""Parity statistics between a candidate and a reference output, padding masked out.

Accumulates over batches; an element passes when |c - r| <= atol + rtol * |r| (as numpy.isclose),
and the report gives the smallest atol that would have passed with the same rtol (as Polygraphy does).
The default gates per precision are in toolchain/planning/tolerances.py.
"""
from __future__ import annotations

import numpy as np


class OutputStats:
    def __init__(self, atol: float, rtol: float):
        self.atol, self.rtol = atol, rtol
        self.max_abs = self.max_rel = self.min_atol = 0.0
        self.sum_abs, self.count = 0.0, 0
        self.min_cos = 1.0
        self.sum_cos, self.rows = 0.0, 0
        self.nonfinite = 0

    def add(self, cand: np.ndarray, ref: np.ndarray, mask: np.ndarray | None = None) -> None:
        """cand/ref: (batch, seq, ...) arrays; mask: (batch, seq) with 1 for real tokens."""
        cand = np.asarray(cand, dtype=np.float64)
        ref = np.asarray(ref, dtype=np.float64)
        if cand.shape != ref.shape:  # another model, not a numerical difference: the recipe's input is wrong
            from toolchain.errors import StageUserError

            raise StageUserError(f"the candidate's output has shape {cand.shape} where the reference's has "
                                 f"{ref.shape}: they are not the same model (another hidden size, vocabulary or "
                                 "head), so there is no parity to measure; compare the candidate with the model it "
                                 "was made from")
        if mask is not None:
            keep = np.asarray(mask).astype(bool)
            cand, ref = cand[keep], ref[keep]  # (n_valid, ...)
        else:
            cand, ref = cand.reshape(-1, *cand.shape[2:]) if cand.ndim > 2 else cand, \
                ref.reshape(-1, *ref.shape[2:]) if ref.ndim > 2 else ref
        if cand.size == 0:
            return
        self.nonfinite += int((~np.isfinite(cand)).sum())
        diff = np.abs(cand - ref)
        diff = np.where(np.isfinite(diff), diff, np.inf)
        self.max_abs = max(self.max_abs, float(diff.max()))
        self.max_rel = max(self.max_rel, float((diff / np.maximum(np.abs(ref), 1e-6)).max()))
        self.min_atol = max(self.min_atol, float((diff - self.rtol * np.abs(ref)).max()))
        self.sum_abs += float(diff[np.isfinite(diff)].sum())
        self.count += diff.size
        c = cand.reshape(cand.shape[0], -1)
        r = ref.reshape(ref.shape[0], -1)
        num = (c * r).sum(1)
        den = np.linalg.norm(c, axis=1) * np.linalg.norm(r, axis=1)
        cos = np.where(den > 0, num / np.maximum(den, 1e-30), 1.0)
        cos = np.nan_to_num(cos, nan=-1.0)
        self.min_cos = min(self.min_cos, float(cos.min()))
        self.sum_cos += float(cos.sum())
        self.rows += cos.size

    def result(self, min_cosine: float | None) -> dict:
        within = self.atol is None or self.min_atol <= self.atol  # atol None: not gated
        cos_ok = min_cosine is None or self.min_cos >= min_cosine  # None: reported, not gated
        passed = self.nonfinite == 0 and within and cos_ok
        return {"max_abs": self.max_abs, "max_rel": self.max_rel, "mean_abs": self.sum_abs / max(self.count, 1),
                "min_cosine": self.min_cos, "mean_cosine": self.sum_cos / max(self.rows, 1), "atol": self.atol, "rtol": self.rtol, "min_cosine_gate": min_cosine,
                "min_atol_to_pass": max(self.min_atol, 0.0), "elements": self.count, "nonfinite": self.nonfinite,
                "passed": passed}
