"""One way to compare two image-embedding (or logit) arrays, used at export time, in tests
and in benchmarks alike."""

from __future__ import annotations

import numpy as np


def compare(got: np.ndarray, ref: np.ndarray) -> dict:
    """max_abs: max |got - ref|; rel_err: max_abs / max |ref| (a max-norm relative error);
    cosine: mean cosine similarity of the vectors along the last axis (per image token)."""
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if got.shape != ref.shape:
        raise ValueError(f"compare | shapes differ: {got.shape} vs {ref.shape}")
    diff = np.abs(got - ref)
    max_abs = float(diff.max())
    rel = max_abs / max(float(np.abs(ref).max()), 1e-30)
    g = got.reshape(-1, got.shape[-1])
    r = ref.reshape(-1, ref.shape[-1])
    cos = (g * r).sum(-1) / np.maximum(np.linalg.norm(g, axis=-1) * np.linalg.norm(r, axis=-1), 1e-30)
    return {"max_abs": max_abs, "rel_err": rel, "cosine": float(cos.mean()), "min_cosine": float(cos.min())}


def image_cosines(got: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """got, ref: [B, N, D] embeddings; each image's mean token cosine, [B]. One bad photo shows
    in the lowest of these while the mean over all tokens of all photos hides it."""
    g, r = got.astype(np.float64), ref.astype(np.float64)
    cos = (g * r).sum(-1) / np.maximum(np.linalg.norm(g, axis=-1) * np.linalg.norm(r, axis=-1), 1e-30)
    return cos.reshape(len(cos), -1).mean(axis=1)
