"""Token merging for masked generative transformers: TomeMGT (arXiv 2411.10781 §4.2).

`tome` holds the algorithm (a pure matching function); `patch` installs it on a model.
"""

from mgtq.merging.patch import ForwardPlan, TomeConfig, TomePlan, apply_tomemgt, remove_tomemgt
from mgtq.merging.tome import bipartite_soft_matching_2x2, cell_destinations

__all__ = ["TomeConfig", "TomePlan", "ForwardPlan", "apply_tomemgt", "remove_tomemgt",
           "bipartite_soft_matching_2x2", "cell_destinations"]
