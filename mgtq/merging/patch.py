"""Install / remove TomeMGT on a Meissonic transformer (tomesd-style thin patch).

    plan = apply_tomemgt(pipe, ratio=0.5)            # joint (MMDiT) blocks, merge before attention
    image = pipe("a red circle", seed=0).images[0]
    remove_tomemgt(pipe)                               # the model is exactly as before

Nothing in the model is replaced: the patch only sets `transformer.token_merging` to an immutable
`TomePlan`. Each forward calls `plan.bind(grid)` and gets a `ForwardPlan` that lives only in that
call's locals; it computes each block's matching (`tome.bipartite_soft_matching_2x2`) from the
block's input, so nothing carries over between blocks, sampler steps or images.

Destination randomness: the pattern of block (kind, index) is drawn from a fresh generator seeded
by hash(seed, kind, index, step); it is a function of those numbers only, never of what ran
before. By default (`step` 0) every forward uses the same per-block pattern; a custom sampler
loop may pass `token_merging=plan.at_step(i)` to vary it across steps, still deterministically.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch

from mgtq.merging.tome import bipartite_soft_matching_2x2, cell_destinations, identity
from mgtq.models.transformer import MeissonicTransformer, TokenMerge
from mgtq.utils import derive_seed

BLOCK_SETS = {"joint": ("joint",), "single": ("single",), "all": ("joint", "single")}
_KIND_IDS = {"joint": 1, "single": 2}


@dataclass(frozen=True)
class TomeConfig:
    """What TomeMGT does.

    ratio: fraction of a block's image tokens removed, r = ⌊ratio·N⌋ (capped at the 3N/4 sources).
    blocks: "joint" (the paper's setting: the 14 MMDiT blocks), "single" or "all".
    merge_mlp: also merge before the MLP of joint blocks (same matching); default attention only.
    recompute_every: compute the matching every k blocks of a kind within one forward, reusing
    it in between (k = 1: every block, the paper's setting).
    random_destinations: a random token of each 2×2 cell is the destination (else top-left).
    seed: base seed of the destination pattern.
    """

    ratio: float = 0.5
    blocks: str = "joint"
    merge_mlp: bool = False
    recompute_every: int = 1
    random_destinations: bool = True
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not 0 <= self.ratio < 1:
            raise ValueError(f"TomeConfig.ratio must be a number in [0, 1) (0 = no merging); got {self.ratio!r}")
        if self.blocks not in BLOCK_SETS:
            raise ValueError(f"TomeConfig.blocks must be one of {sorted(BLOCK_SETS)}; got {self.blocks!r}")
        k = self.recompute_every
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"TomeConfig.recompute_every must be an integer ≥ 1; got {self.recompute_every!r}")
        for name in ("merge_mlp", "random_destinations"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"TomeConfig.{name} must be true or false; got {getattr(self, name)!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"TomeConfig.seed must be an integer; got {self.seed!r}")

    @classmethod
    def from_dict(cls, data: dict) -> "TomeConfig":
        """From a recipe mapping; an unknown key is an error that names it."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown TomeMGT key(s) {unknown}; valid keys are {sorted(known)}")
        return cls(**data)


@dataclass(frozen=True)
class TomePlan:
    """Immutable token-merging plan installed as `transformer.token_merging` (or passed per call)."""

    config: TomeConfig
    step: int = 0

    def at_step(self, step: int) -> "TomePlan":
        """The same plan with destination patterns salted by a sampler step (deterministic)."""
        return replace(self, step=int(step))

    def bind(self, grid: tuple[int, int]) -> "ForwardPlan":
        """A plan for one forward pass on an h×w transformer grid (called by the model)."""
        return ForwardPlan(self.config, self.step, grid)


class ForwardPlan:
    """One forward's token merging: the model calls `plan(kind, index, x)` per block.

    Holds only the reused matching of `recompute_every > 1`, and dies with the forward call.
    """

    def __init__(self, config: TomeConfig, step: int, grid: tuple[int, int]):
        self.config, self.step, self.grid = config, step, (int(grid[0]), int(grid[1]))
        self._latest: dict[str, TokenMerge | None] = {}

    def plan(self, kind: str, index: int, x: torch.Tensor) -> tuple[TokenMerge | None, TokenMerge | None]:
        """x (B, N, D): the block's image-token input → (merge, merge_mlp) for that block, or None."""
        if kind not in _KIND_IDS:
            raise ValueError(f"unknown block kind {kind!r}; the Meissonic transformer has 'joint' and 'single' blocks")
        if kind not in BLOCK_SETS[self.config.blocks]:
            return None, None
        if index % self.config.recompute_every == 0 or kind not in self._latest:
            self._latest[kind] = self._match(kind, index, x)
        merge = self._latest[kind]
        return merge, (merge if kind == "joint" and self.config.merge_mlp else None)

    def _match(self, kind: str, index: int, x: torch.Tensor) -> TokenMerge | None:
        n = x.shape[1]
        r = math.floor(self.config.ratio * n + 1e-9)  # ε: 0.29·100 must give 29, not 28
        if r == 0:
            return None  # nothing to merge: the block runs exactly as unpatched
        destinations = None
        if self.config.random_destinations:
            generator = torch.Generator().manual_seed(derive_seed(self.config.seed, _KIND_IDS[kind], index, self.step))
            destinations = cell_destinations(self.grid, generator, device=x.device)
        merge, unmerge = bipartite_soft_matching_2x2(x, self.grid, r, destinations)
        return None if merge is identity else TokenMerge(merge, unmerge)


def apply_tomemgt(
    model_or_pipe,
    ratio: float | TomeConfig = 0.5,
    blocks: str = "joint",
    merge_mlp: bool = False,
    recompute_every: int = 1,
    generator: torch.Generator | int | None = None,
    random_destinations: bool = True,
) -> TomePlan:
    """Install TomeMGT on an MGTPipeline or a MeissonicTransformer; returns the installed plan.

    `ratio` may also be a whole TomeConfig (then leave the other arguments at their defaults).
    generator: an int seed, or a torch.Generator that is drawn from once, here, for the base seed
    (never during sampling, so no state leaks into later images); None = seed 0. Re-applying
    replaces a previous TomeMGT plan.
    """
    transformer = _transformer_of(model_or_pipe)
    if isinstance(ratio, TomeConfig):
        if (blocks, merge_mlp, recompute_every, generator, random_destinations) != ("joint", False, 1, None, True):
            raise TypeError("apply_tomemgt got a TomeConfig and other settings; put every setting in the TomeConfig")
        config = ratio
    else:
        config = TomeConfig(ratio=ratio, blocks=blocks, merge_mlp=merge_mlp, recompute_every=recompute_every,
                            random_destinations=random_destinations, seed=_base_seed(generator, random_destinations))
    current = transformer.token_merging
    if current is not None and not isinstance(current, TomePlan):
        raise ValueError(
            f"the transformer already holds a token-merging plan of type {type(current).__name__} that "
            "apply_tomemgt did not install; set `transformer.token_merging = None` first"
        )
    plan = TomePlan(config)
    transformer.token_merging = plan
    return plan


def remove_tomemgt(model_or_pipe):
    """Uninstall TomeMGT: the model's forward is exactly the unpatched one again. Returns the input."""
    transformer = _transformer_of(model_or_pipe)
    if isinstance(transformer.token_merging, TomePlan):
        transformer.token_merging = None
    return model_or_pipe


def _transformer_of(model_or_pipe) -> MeissonicTransformer:
    transformer = getattr(model_or_pipe, "transformer", model_or_pipe)
    if not isinstance(transformer, MeissonicTransformer):
        raise TypeError(
            f"TomeMGT patches an MGTPipeline or a MeissonicTransformer; got {type(model_or_pipe).__name__}"
        )
    return transformer


def _base_seed(generator: torch.Generator | int | None, needed: bool) -> int:
    if generator is None or not needed:
        return 0
    if isinstance(generator, torch.Generator):
        return int(torch.randint(2**62, (1,), generator=generator, device=generator.device))
    if isinstance(generator, bool) or not isinstance(generator, int):
        raise TypeError(f"generator must be a torch.Generator, an int seed or None; got {type(generator).__name__}")
    return generator
