"""Semantic-alignment check: whether quantized embeddings still mean the same thing."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: The seed's default threshold on the mean Pearson correlation.
DEFAULT_THRESHOLD = 0.99


class SemanticDrift(RuntimeError):
    """Quantized embeddings drifted below the alignment threshold."""


@dataclass(frozen=True)
class AlignmentReport:
    """Mean per-query agreement between reference and quantized embeddings."""

    pearson: float
    cosine: float
    min_pearson: float
    queries: int


def alignment(reference: np.ndarray, quantized: np.ndarray) -> AlignmentReport:
    r"""Per-query Pearson correlation and cosine similarity, averaged.

    For query ``i`` with reference embedding ``a`` and quantized ``b``:
    ``pearson_i = sum((a - mean a)(b - mean b)) / (||a - mean a|| ||b - mean b||)``
    and ``cosine_i = a.b / (||a|| ||b||)``, computed in float64.
    """
    a = np.asarray(reference, np.float64)
    b = np.asarray(quantized, np.float64)
    if a.shape != b.shape or a.ndim != 2 or a.shape[0] == 0:
        raise ValueError(
            f"embeddings must be [queries, dim] of equal shape, got {a.shape} and {b.shape}"
        )
    ac = a - a.mean(axis=1, keepdims=True)
    bc = b - b.mean(axis=1, keepdims=True)
    pearson = np.sum(ac * bc, axis=1) / (
        np.linalg.norm(ac, axis=1) * np.linalg.norm(bc, axis=1) + 1e-300
    )
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    cosine = np.sum(a * b, axis=1) / (norms + 1e-300)
    return AlignmentReport(
        float(pearson.mean()), float(cosine.mean()), float(pearson.min()), a.shape[0]
    )


def validate_semantic_alignment(
    embed_fn_reference, embed_fn_quantized, queries, threshold: float = DEFAULT_THRESHOLD
) -> AlignmentReport:
    """Embeds ``queries`` with both functions and checks their agreement.

    Args:
        embed_fn_reference: ``queries -> [n, dim]`` embeddings of the
            full-precision model.
        embed_fn_quantized: the same for the quantized model.
        queries: whatever the embed functions take (texts, token ids).
        threshold: minimum mean Pearson correlation (seed default 0.99).

    Returns:
        The :class:`AlignmentReport` (mean Pearson, mean cosine).

    Raises:
        SemanticDrift: if the mean Pearson correlation is below ``threshold``.
    """
    report = alignment(
        np.asarray(embed_fn_reference(queries)), np.asarray(embed_fn_quantized(queries))
    )
    if report.pearson < threshold:
        raise SemanticDrift(
            f"mean Pearson correlation {report.pearson:.5f} < {threshold} over "
            f"{report.queries} queries (cosine {report.cosine:.5f}, worst query "
            f"{report.min_pearson:.5f})"
        )
    return report
