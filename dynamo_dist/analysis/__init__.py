"""Analyses of a DYNAMO meta run (paper sections 4, 5, appendix B.4).

Estimators in scikit-learn style (parameters in ``__init__``, work in ``fit``, learned
state with a trailing underscore) and ``run_analysis``, which runs every applicable one
on a finished meta run and writes plots, tables, ``analysis.json`` and ``report.html``.
Plain numpy/PyTorch; matplotlib is imported only when figures are drawn.
"""

from .averaging import ModelAveraging, centroids, midpoint
from .baseline import RepresentationBaseline, cka_distance, linear_cka, mds_embedding, svcca_distance
from .comparison import MethodComparison
from .fixed_points import (Dynamics, FixedPointFinder, base_dynamics, base_visited_states, line_attractor_stats,
                           meta_dynamics, meta_visited_states)
from .geometry import EmbeddingGeometry, clustering_scores, num_components_for, stratified_sample
from .landscape import ThetaLandscape, in_convex_hull
from .report import run_analysis
from .ssl import SemiSupervisedTheta
from .valence import NEGATIVE_WORDS, NEUTRAL_WORDS, POSITIVE_WORDS, WordValence, valence_score

__all__ = [
    "run_analysis", "EmbeddingGeometry", "clustering_scores", "num_components_for", "stratified_sample",
    "RepresentationBaseline", "MethodComparison",
    "svcca_distance", "cka_distance", "linear_cka", "mds_embedding", "ModelAveraging", "centroids", "midpoint",
    "ThetaLandscape", "in_convex_hull", "SemiSupervisedTheta", "FixedPointFinder", "Dynamics", "meta_dynamics",
    "base_dynamics", "meta_visited_states", "base_visited_states", "line_attractor_stats", "WordValence",
    "valence_score", "POSITIVE_WORDS", "NEGATIVE_WORDS", "NEUTRAL_WORDS",
]
