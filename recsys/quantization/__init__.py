"""Vector quantisation of embeddings (residual VQ user codes for the hierarchical losses)."""

from recsys.quantization.rvq import (
    LAPLACE_EPS,
    ResidualVQ,
    RVQOutput,
    code_perplexity,
    ema_step,
    fit_offline,
    kmeans,
    num_nodes,
    prefix_ids,
)

__all__ = [
    "LAPLACE_EPS",
    "RVQOutput",
    "ResidualVQ",
    "code_perplexity",
    "ema_step",
    "fit_offline",
    "kmeans",
    "num_nodes",
    "prefix_ids",
]
