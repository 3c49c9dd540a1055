"""The one hook through which a technique changes which image tokens the transformer computes.

A technique installs an object with `bind(grid, masked) -> TokenPlan` as `transformer.token_hook` (or
passes it per call as `token_hook=`). Each forward binds it once, with the h×w transformer grid and
which input ids are [MASK] (B, H, W), and the `TokenPlan` it gets lives only for that call. The
model asks the plan at three points:

    enter(x, context, rope)      after the embeddings: the image tokens (B, N, D) → the ones the
                                 blocks compute (B, M, D) (a plan whose `tokens` names them gets
                                 them already selected: the model embeds only those), the text
                                 tokens (or None when their keys/values come from elsewhere) and
                                 the RoPE rows of [text; image]
    plan(kind, index, x)         per block, with its image-token input: a (attention, mlp) pair of
                                 `BlockTokens` (or None), which reduce the image tokens and their
                                 RoPE rows before the sub-layer, add a key bias, extend the keys and
                                 values attention reads, and restore the tokens after it
    leave(logits)                only when `computes_subset`: the head's logits of the computed
                                 tokens (B, M, V, f, f) → the logits grid (B, V, H, W)

How the two techniques use it:
- TomeMGT (mgtq.merging): `enter`/`leave` change nothing; per block, `reduce` merges similar image
  tokens, `rope` gives a merged token the mean of its members' tables, `key_bias` is proportional
  attention (log member count) and `restore` copies each merged output back to its members.
- Context reuse (mgtq.reuse): a full step's plan changes no token and its `keys_values` records every
  block's keys/values; a local step's plan names the active image tokens (`tokens`: only they are
  embedded) and its `enter` keeps their RoPE rows and no text, each block's `keys_values` puts their
  fresh keys/values into the recorded ones (the context: text and every other image token), and
  `leave` places the active tokens' logits in the grid (0 elsewhere: the sampler reads only the tokens
  it computed). Every layer but attention is per token, so nothing else needs the inactive tokens.
  With K/V refresh (MARché), one block's `attention_inputs` scores which context tokens the active
  queries attend to most; the next local step recomputes those too. A full step can run another
  technique's hook inside it (`around`): TomeMGT merges as usual and the full step records one
  key/value row per image token.
"""

from __future__ import annotations

from typing import Protocol

import torch

Rope = tuple[torch.Tensor, torch.Tensor]  # cos, sin: (S, Dh) shared by the batch or (B, S, Dh) per sample


class BlockTokens:
    """What one block's sub-layer (attention, or the MLP) does to its image tokens; the defaults change nothing.

    Two class attributes tell a compiled model's precompiled blocks (mgtq.compilation) about a subclass:
    `precompilable`: its methods are tensor code over its own attributes only (tensors, plain values, other
    precompilable block tokens, lists or dicts it writes into), so a block called with it can be compiled ahead of
    time and saved; off by default, as a hook holding other objects may not survive saving. `varying_tokens`:
    the number of image tokens it computes changes from call to call (a local step's active set), so such
    calls are compiled once for every count (dynamic shapes) rather than once per count.
    """

    precompilable = False
    varying_tokens = False

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) image tokens (or rows of a per-sample table) → (B, M, C) the ones the sub-layer computes."""
        return x

    def restore(self, y: torch.Tensor) -> torch.Tensor:
        """(B, M, C) sub-layer outputs → (B, N, C)."""
        return y

    def rope(self, rope: Rope, n_text: int, batch: int) -> Rope:
        """The RoPE tables of [text; image] → those of [text; reduced image]."""
        return rope

    def key_bias(self, n_text: int) -> torch.Tensor | None:
        """Additive attention-logit bias per key (B, 1, 1, S) of [text; reduced image], or None."""
        return None

    def keys_values(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values (B, H, S, Dh) of the computed sequence, RoPE applied → the ones attention reads."""
        return k, v

    def attention_inputs(self, q: torch.Tensor, k: torch.Tensor) -> None:
        """Sees the queries (B, H, M, Dh) and the keys (B, H, S, Dh) attention reads (RoPE applied, after
        `keys_values`), for a technique that needs attention weights, which SDPA does not return; the
        default ignores them."""


class TokenPlan:
    """One forward's token plan (see the module docstring); the defaults change nothing.

    tokens: None, or the indices (B, M) of the image tokens the blocks compute, known before the embeddings
    (a plan that `computes_subset` of fixed tokens): the model then embeds only those (every layer before the
    blocks is per token) and `enter` gets them already selected.
    """

    computes_subset = False
    tokens: torch.Tensor | None = None

    def enter(self, x: torch.Tensor, context: torch.Tensor, rope: Rope) -> tuple[torch.Tensor, torch.Tensor | None, Rope]:
        return x, context, rope

    def plan(self, kind: str, index: int, x: torch.Tensor) -> tuple[BlockTokens | None, BlockTokens | None]:
        return None, None

    def leave(self, logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("a TokenPlan that computes a subset of tokens places their logits in the grid")


class TokenHook(Protocol):
    """What `transformer.token_hook` holds: `bind` gives the plan of one forward."""

    def bind(self, grid: tuple[int, int], masked: torch.Tensor | None = None) -> TokenPlan: ...


class EveryToken:
    """The token hook that computes every token. Passed per call it stands in for the installed one: a pipeline
    call's `token_merging=0` on a transformer with TomeMGT installed (None would mean the installed hook)."""

    def bind(self, grid: tuple[int, int], masked: torch.Tensor | None = None) -> TokenPlan:
        return TokenPlan()
