"""Token merging for masked generative transformers: TomeMGT (arXiv 2411.10781 §4.2).

`tome` holds the algorithm (pure matching functions); `token_merge` is one block's merging through
the model's token hook (RoPE merge, proportional attention); `patch` installs it on a model.
"""

from mgtq.merging.patch import ForwardPlan, TomeConfig, TomePlan, apply_tomemgt, remove_tomemgt
from mgtq.merging.tome import bipartite_soft_matching_2x2, cell_destinations, match_2x2
from mgtq.merging.token_merge import TokenMerge, merge_rope

__all__ = ["TomeConfig", "TomePlan", "ForwardPlan", "apply_tomemgt", "remove_tomemgt",
           "bipartite_soft_matching_2x2", "cell_destinations", "match_2x2",
           "TokenMerge", "merge_rope"]
