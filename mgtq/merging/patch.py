"""Install / remove TomeMGT on a Meissonic transformer (tomesd-style thin patch).

    plan = apply_tomemgt(pipe, ratio=0.5)            # joint (MMDiT) blocks, merge before attention
    image = pipe("a red circle", seed=0).images[0]
    remove_tomemgt(pipe)                               # the model is exactly as before

Nothing in the model is replaced: the patch only sets `transformer.token_hook` (the model's one
token hook, mgtq.models.hooks) to an immutable
`TomePlan`. Each forward calls `plan.bind(grid, masked)` with which of its input token ids are
[MASK] and gets a `ForwardPlan` that lives only in that call's locals; it computes each block's
matching (`tome.match_2x2`) from the block's input, so nothing carries over
between blocks, sampler steps or images.

Mask awareness needs no sampler change: the masked fraction σ of the input ids is the sampler's
schedule value at this step (a proxy for the step itself), and a transformer token whose ids are
all decoded has an output the sampler never reads (decoded tokens are never re-masked).

Destination randomness: the pattern of block (kind, index) is drawn from a fresh generator seeded
by hash(seed, kind, index, step); it is a function of those numbers only, never of what ran
before. By default (`step` 0) every forward uses the same per-block pattern; a custom sampler
loop may pass `token_hook=plan.at_step(i)` to vary it across steps, still deterministically.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal, get_args

import torch

from mgtq.merging.tome import Locality, cell_destinations, match_2x2
from mgtq.merging.token_merge import TokenMerge
from mgtq.models.hooks import TokenPlan
from mgtq.models.transformer import MeissonicTransformer
from mgtq.config import from_mapping, validate
from mgtq.modules import unwrapped
from mgtq.seeding import derive_seed

_KIND_IDS = {"joint": 1, "single": 2}  # the transformer's block kinds
BlockSet = Literal["joint", "single", "all"]  # the blocks TomeMGT merges in; "joint" is the paper's setting
BLOCK_SET_NAMES = get_args(BlockSet)
# The block kinds of each set: "all" is both kinds, the others their own.
BLOCK_SETS = {name: tuple(_KIND_IDS) if name == "all" else (name,) for name in BLOCK_SET_NAMES}
Sources = Literal["all", "decoded", "masked", "decoded-first"]
MergeSchedule = Literal["constant", "decoded", "masked"]


@dataclass(frozen=True)
class TomeConfig:
    """What TomeMGT does.

    ratio: fraction of a block's image tokens removed, r = ⌊ratio·w(σ)·N⌋ (capped at the sources
    that may merge: 3N/4 at most).
    blocks: "joint" (the paper's setting: the 14 MMDiT blocks), "single" or "all".
    locality: where a source may merge: "cell" (its own 2×2 cell's destination), "window" (any
    destination in the window×window square around it) or "global" (anywhere: the paper, ToMe-SD).
    window: the side of that square (odd, ≥ 3), for locality "window".
    sources: which image tokens may be merged away: "all", "decoded" (all their ids decoded, so
    the sampler never reads their output), "masked" (some id still [MASK]) or "decoded-first"
    (all, but decoded tokens before any masked one).
    schedule: the ratio over sampling, through the masked fraction σ of the input ids (1 at the
    first step, → 0 at the last): w(σ) = 1 ("constant"), 1 − σ ("decoded": merge more as the
    image is decoded) or σ ("masked": merge most while the image is mostly [MASK]).
    merge_mlp: also merge before the MLP of joint blocks (same matching); default attention only.
    proportional_attention: add log(member count) to each merged token's attention logits as a key,
    so it weighs as much as the tokens it replaced (ToMe's proportional attention; ToMe-SD and the
    paper do without: false).
    recompute_every: compute the matching every k blocks of a kind within one forward, reusing
    it in between (k = 1: every block, the paper's setting).
    random_destinations: a random token of each 2×2 cell is the destination (else top-left).
    seed: base seed of the destination pattern.
    """

    ratio: float = 0.5
    blocks: BlockSet = "joint"
    locality: Locality = "cell"
    window: int = 3
    sources: Sources = "all"
    # Default "decoded": merging while the image is mostly [MASK] is what costs quality (chosen on
    # ShapeBench val, benchmarks/results/tomemgt_select_val.md).
    schedule: MergeSchedule = "decoded"
    merge_mlp: bool = False
    # Default on: on ShapeBench val it raised token agreement with the unmerged model in 4 of 5
    # settings (benchmarks/results/tomemgt_select_val.md); exact when merged tokens are identical.
    proportional_attention: bool = True
    recompute_every: int = 1
    random_destinations: bool = True
    seed: int = 0

    def __post_init__(self):
        validate(self, "TomeConfig")
        if not 0 <= self.ratio < 1:
            raise ValueError(f"TomeConfig.ratio must be a number in [0, 1) (0 = no merging); got {self.ratio!r}")
        if self.window < 3 or self.window % 2 == 0:
            raise ValueError(f"TomeConfig.window must be an odd integer ≥ 3 (the side of the square); got {self.window!r}")
        if self.recompute_every < 1:
            raise ValueError(f"TomeConfig.recompute_every must be an integer ≥ 1; got {self.recompute_every!r}")

    @classmethod
    def from_dict(cls, data: dict) -> "TomeConfig":
        """From a recipe mapping; an unknown key or a mistyped value is an error that names it."""
        return from_mapping(cls, data, "tome")


@dataclass(frozen=True)
class TomePlan:
    """Immutable token-merging plan installed as `transformer.token_hook` (or passed per call)."""

    config: TomeConfig
    step: int = 0
    # (B, H, W) bool: the token ids a call may change (inpainting's repainted area); None = all of them
    area: torch.Tensor | None = field(default=None, compare=False, repr=False)

    def at_step(self, step: int) -> "TomePlan":
        """The same plan with destination patterns salted by a sampler step (deterministic)."""
        return replace(self, step=int(step))

    def within(self, area: torch.Tensor | None) -> "TomePlan":
        """The same plan for a call that changes only the ids of `area` (B, H, W) bool, one row per image: the
        masked fraction σ is taken over that area, as the sampler's schedule is (the kept ids of inpainting
        are not "decoded" the way the schedule counts)."""
        return replace(self, area=area)

    def bind(self, grid: tuple[int, int], masked: torch.Tensor | None = None) -> "ForwardPlan":
        """A plan for one forward pass on an h×w transformer grid (called by the model).

        masked (B, H, W) bool: which input token ids are [MASK] (H, W a multiple of the grid, as
        with feature compression); needed by the mask-aware settings, None = all decoded.
        """
        return ForwardPlan(self.config, self.step, grid, masked, self.area)


class ForwardPlan(TokenPlan):
    """One forward's token merging: the model calls `plan(kind, index, x)` per block.

    Holds the forward's mask summary and the reused matching of `recompute_every > 1`, and dies
    with the forward call.
    """

    def __init__(self, config: TomeConfig, step: int, grid: tuple[int, int], masked: torch.Tensor | None = None,
                 area: torch.Tensor | None = None):
        self.config, self.step, self.grid = config, step, (int(grid[0]), int(grid[1]))
        self._latest: dict[str, TokenMerge | None] = {}
        self.masked_fraction, self.token_masked = _mask_summary(masked, self.grid, area)

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
        config = self.config
        # each sample its own r (σ differs within a batch in editing, one mask per prompt); match_2x2 pads
        sigmas = self.masked_fraction.tolist() if self.masked_fraction is not None else [0.0] * x.shape[0]
        r = [merge_count(config, x.shape[1], sigma) for sigma in sigmas]
        if max(r) == 0:
            return None  # nothing to merge: the block runs exactly as unpatched
        destinations = None
        if config.random_destinations:
            generator = torch.Generator().manual_seed(derive_seed(config.seed, _KIND_IDS[kind], index, self.step))
            destinations = cell_destinations(self.grid, generator, device=x.device)
        eligible = preferred = None
        if config.sources != "all":
            token_masked = self.token_masked if self.token_masked is not None else x.new_zeros(x.shape[:2], dtype=torch.bool)
            if config.sources == "decoded-first":
                preferred = ~token_masked
            else:
                eligible = token_masked if config.sources == "masked" else ~token_masked
        merge = match_2x2(x, self.grid, r, destinations, config.locality, config.window, eligible, preferred)
        if merge is not None:
            merge.proportional = config.proportional_attention
        return merge


def merge_count(config: TomeConfig, n: int, masked_fraction: float) -> int:
    """r = ⌊ratio·w(σ)·N⌋ for a block of N image tokens at masked fraction σ (see TomeConfig.schedule).

    A forward without token ids (σ unknown) counts as fully decoded, σ = 0."""
    weight = {"constant": 1.0, "decoded": 1.0 - masked_fraction, "masked": masked_fraction}[config.schedule]
    return math.floor(config.ratio * weight * n + 1e-9)  # ε: 0.29·100 must give 29, not 28


def _mask_summary(masked: torch.Tensor | None, grid: tuple[int, int],
                  area: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(σ (B,), token_masked (B, N) bool): each sample's masked fraction of input ids (of those in `area`, one row
    per image, repeated over a CFG batch's halves), and which transformer tokens hold at least one [MASK] id (a
    transformer token covers f×f ids with feature compression)."""
    if masked is None:
        return None, None
    batch, height, width = masked.shape
    h, w = grid
    if height % h or width % w or height // h != width // w:
        raise ValueError(f"mask of {height}×{width} token ids does not tile the {h}×{w} transformer grid")
    f = height // h
    per_token = masked.reshape(batch, h, f, w, f).any(dim=4).any(dim=2).reshape(batch, h * w)
    if area is None:
        return masked.float().mean(dim=(1, 2)).cpu(), per_token
    if area.shape[1:] != masked.shape[1:] or batch % area.shape[0]:
        raise ValueError(f"TomeMGT's area {tuple(area.shape)} does not match the forward's token ids "
                         f"{tuple(masked.shape)} (one row per image; a CFG batch repeats them)")
    area = area.to(masked.device).repeat(batch // area.shape[0], 1, 1)
    inside = area.sum(dim=(1, 2)).clamp(min=1)
    return ((masked & area).sum(dim=(1, 2)) / inside).float().cpu(), per_token


def apply_tomemgt(
    model_or_pipe,
    ratio: float | TomeConfig = 0.5,
    generator: torch.Generator | int | None = None,
    **settings,
) -> TomePlan:
    """Install TomeMGT on an MGTPipeline or a MeissonicTransformer; returns the installed plan.

    `ratio` may also be a whole TomeConfig (then pass nothing else). settings: any other
    TomeConfig field (blocks, locality, window, sources, schedule, merge_mlp, …); an unknown one is
    an error naming it. generator: an int seed, or a torch.Generator that is drawn from once, here,
    for the base seed (never during sampling, so no state leaks into later images); None = seed 0.
    Re-applying replaces a previous TomeMGT plan.
    """
    transformer = _transformer_of(model_or_pipe)
    if isinstance(ratio, TomeConfig):
        if settings or generator is not None:
            raise TypeError("apply_tomemgt got a TomeConfig and other settings; put every setting in the TomeConfig")
        config = ratio
    else:
        if "seed" in settings:
            raise TypeError("apply_tomemgt takes the seed as `generator` (an int or a torch.Generator)")
        config = TomeConfig.from_dict({
            **settings, "ratio": ratio,
            "seed": _base_seed(generator, settings.get("random_destinations", True)),
        })
    current = transformer.token_hook
    if current is not None and not isinstance(current, TomePlan):
        raise ValueError(
            f"the transformer already holds a token hook of type {type(current).__name__} that "
            "apply_tomemgt did not install; set `transformer.token_hook = None` first"
        )
    plan = TomePlan(config)
    transformer.token_hook = plan
    return plan


def remove_tomemgt(model_or_pipe):
    """Uninstall TomeMGT: the model's forward is exactly the unpatched one again. Returns the input."""
    transformer = _transformer_of(model_or_pipe)
    if isinstance(transformer.token_hook, TomePlan):
        transformer.token_hook = None
    return model_or_pipe


def _transformer_of(model_or_pipe) -> MeissonicTransformer:
    """The MeissonicTransformer of a pipeline or module; under torch.compile's wrapper, the module it compiled
    (the plan is an attribute the forward reads, so patching it needs no recompile of the wrapper's code)."""
    transformer = getattr(model_or_pipe, "transformer", model_or_pipe)
    transformer = unwrapped(transformer)
    if not isinstance(transformer, MeissonicTransformer):
        raise TypeError(
            f"TomeMGT patches an MGTPipeline or a MeissonicTransformer (compiled or not); got "
            f"{type(model_or_pipe).__name__} holding {type(transformer).__name__}"
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
