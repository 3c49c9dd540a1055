"""Meissonic's masked generative transformer on current diffusers.

The official `Transformer2DModel` of Meissonic (arXiv 2410.08261) only runs on diffusers ≈0.32 because
current diffusers rewrote `Attention`. This is the same network, with exactly the official state-dict
keys and forward semantics, written as plain torch blocks that read top to bottom, on top of
diffusers' `ModelMixin`/`ConfigMixin` for `from_pretrained`/`save_pretrained` (sharded safetensors,
meta-device loading, dtype) and diffusers' embedding/sampling layers where their keys match.

Data flow (B batch, h×w token grid, L text tokens, D = heads·head_dim):
    token ids (B,h,w) ─ embed ─ [down 2×] ─ (B,N,D) image tokens          N = h·w (÷4 with down)
    text (B,L,joint) ─ context_embedder ─ RMSNorm ─ (B,L,D) text tokens
    pooled (B,D) ⊕ micro-conds (B,5·256) ─ cond_embed ─ (B,D) ┐
    timestep (B,) · 1000 ───────────────────────────────────── time_text_embed ─ temb (B,D)
    num_layers   × MMDiT block  (text and image streams, joint attention, RoPE)
    num_single_layers × single-stream block on [text; image]
    image tokens ─ project_from_hidden ─ [up 2×] ─ mlm_layer ─ logits (B, codebook, h, w)

Techniques that compute fewer image tokens (token merging, context reuse) plug in through one hook,
`token_hook` (mgtq.models.hooks); quantization (mgtq.quantization) swaps the `nn.Linear` layers.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import CombinedTimestepTextProjEmbeddings, TimestepEmbedding, get_timestep_embedding
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from mgtq.fused import attention, native_qk_norm_rope, qk_norm_rope
from mgtq.models.hooks import BlockTokens, TokenPlan
from mgtq.models.layers import Linear, PatchConv2d, PointwiseConv2d, RMSNorm, linear_act
from mgtq.quantization import checkpoint

# Fixed by the official architecture (inherited from aMUSEd): five micro-conditions, each embedded
# sinusoidally to 256 channels; norms use eps 1e-6; the conv/projection layers around the
# transformer have no bias.
MICRO_COND_ENCODE_DIM = 256
NUM_MICRO_CONDS = 5
NORM_EPS = 1e-6
DEFAULT_MICRO_CONDS = (1024.0, 1024.0, 0.0, 0.0, 6.0)


# ----------------------------------------------------------------------------------------- RoPE
# Device types without float64 tensors (Apple's MPS framework has none).
NO_FLOAT64_DEVICES = ("mps",)


def rope_tables(ids: torch.Tensor, axes_dim: tuple[int, ...], theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary cos/sin tables of FLUX-style multi-axis RoPE.

    ids (N, n_axes) positions per axis → cos, sin (N, sum(axes_dim)) in float32, each frequency
    repeated twice (interleaved pairs), computed in float64 like the official code.
    """
    if ids.shape[-1] != len(axes_dim):
        raise ValueError(f"position ids have {ids.shape[-1]} axes but axes_dims_rope has {len(axes_dim)}")
    device = ids.device
    if device.type in NO_FLOAT64_DEVICES:  # built on the host, the same float64 math, then moved
        ids = ids.cpu()
    cos_parts, sin_parts = [], []
    pos = ids.to(torch.float64)
    for axis, dim in enumerate(axes_dim):
        freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=ids.device) / dim)
        angles = torch.outer(pos[:, axis], freqs)  # (N, dim/2)
        cos_parts.append(angles.cos().repeat_interleave(2, dim=1))
        sin_parts.append(angles.sin().repeat_interleave(2, dim=1))
    return (torch.cat(cos_parts, dim=-1).to(device, torch.float32),
            torch.cat(sin_parts, dim=-1).to(device, torch.float32))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x (B, H, N, Dh) by cos/sin of shape (N, Dh) or (B, N, Dh).

    Per-sample tables (B, N, Dh) are what token merging produces: a merged token carries the mean
    of its members' tables. Computed in float32 as the official code does. Each pair (a, b) becomes
    (a·c − b·s, b·c + a·s): one complex product per pair, the official formula's values, in one pass
    instead of the official code's six (upcast twice, unbind, stack, two products and a sum).
    """
    if cos.dim() == 3:  # (B, N, Dh) → broadcast over heads
        cos, sin = cos[:, None], sin[:, None]
    c, s = cos[..., ::2].float(), sin[..., ::2].float()  # (…, N, Dh/2): both members of a pair share them
    if torch.compiler.is_compiling():  # real arithmetic: Inductor fuses it into one kernel (complex it does not)
        a, b = x.float().unflatten(-1, (-1, 2)).unbind(-1)
        return torch.stack([a * c - b * s, b * c + a * s], dim=-1).flatten(-2).to(x.dtype)
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())
    return torch.view_as_real(pairs * torch.complex(c, s)).flatten(-2).to(x.dtype)


class QKNorm(RMSNorm):
    """Attention's RMS QK-norm (diffusers' RMSNorm: same `weight` key), optionally followed by RoPE.

    ``forward(x, rope)`` is ``apply_rope(RMSNorm(x), *rope)``. In eager inference both run as
    :func:`mgtq.fused.qk_norm_rope`: one pass per row on AVX512-BF16 CPUs in bf16, else five in-place fp32
    passes where the two functions make eleven; the normed values are not rounded to the model dtype
    before the rotation (one rounding instead of two: within one ulp of the composed functions).
    With autograd, and compiled where mgtq's kernel does not run, it is the composition itself (Inductor
    fuses it into one kernel).
    Reached through the module call, so offload hooks see it like any RMSNorm.
    """

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        fused = (rope is not None and self.weight is not None and self.bias is None
                 and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)))
        if fused and torch.compiler.is_compiling():  # Inductor fuses the composition, unless mgtq's kernel runs
            fused = native_qk_norm_rope(x, self.weight, *rope)
        if not fused:
            y = super().forward(x)
            return y if rope is None else apply_rope(y, *rope)
        return qk_norm_rope(x, self.weight, self.eps, *rope)


# ------------------------------------------------------------------------------------ attention
class Attention(nn.Module):
    """Multi-head attention with RMS QK-norm and RoPE; optional second (text) stream.

    Keys follow diffusers' FLUX attention: to_q/k/v, norm_q/k, to_out.0; with `context_dim`,
    add_q/k/v_proj, norm_added_q/k, to_add_out. `pre_only` drops the output projection (the
    single-stream block fuses it into its proj_out).
    """

    def __init__(self, dim: int, heads: int, head_dim: int, joint: bool = False, pre_only: bool = False):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.to_q = Linear(dim, inner)
        self.to_k = Linear(dim, inner)
        self.to_v = Linear(dim, inner)
        self.norm_q = QKNorm(head_dim, eps=NORM_EPS)
        self.norm_k = QKNorm(head_dim, eps=NORM_EPS)
        self.to_out = None if pre_only else nn.ModuleList([Linear(inner, dim), nn.Dropout(0.0)])
        self.joint = joint
        if joint:
            self.add_q_proj = Linear(dim, inner)
            self.add_k_proj = Linear(dim, inner)
            self.add_v_proj = Linear(dim, inner)
            self.norm_added_q = QKNorm(head_dim, eps=NORM_EPS)
            self.norm_added_k = QKNorm(head_dim, eps=NORM_EPS)
            self.to_add_out = Linear(inner, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, H·Dh) → (B, H, N, Dh)
        return x.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

    def _qkv(self, x, to_q, to_k, to_v, norm_q, norm_k, rope):
        # QK-norm and RoPE in one call per tensor (QKNorm); rope holds this stream's rows of the tables.
        return norm_q(self._heads(to_q(x)), rope), norm_k(self._heads(to_k(x)), rope), self._heads(to_v(x))

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], context: torch.Tensor | None = None,
                key_bias: torch.Tensor | None = None, tokens: BlockTokens | None = None):
        """x (B, N, D) image (or joint) tokens; context (B, L, D) text tokens for the joint block.

        rope: cos/sin for the concatenated sequence [context; x]. key_bias (B, 1, 1, S): added to the
        attention logits of each key. tokens: the block's token hook, whose `keys_values` may extend
        the keys/values attention reads (context reuse) and whose `attention_inputs` sees the queries and
        those keys (context reuse's K/V refresh scores them). Returns the attended x, and for the joint
        block with a context also the attended context.
        """
        n_ctx = 0 if context is None else context.shape[1]
        cos, sin = rope  # rows for [context; x]
        q, k, v = self._qkv(x, self.to_q, self.to_k, self.to_v, self.norm_q, self.norm_k,
                            (cos[..., n_ctx:, :], sin[..., n_ctx:, :]))
        if context is not None:
            cq, ck, cv = self._qkv(context, self.add_q_proj, self.add_k_proj, self.add_v_proj, self.norm_added_q,
                                   self.norm_added_k, (cos[..., :n_ctx, :], sin[..., :n_ctx, :]))
            q, k, v = torch.cat([cq, q], dim=2), torch.cat([ck, k], dim=2), torch.cat([cv, v], dim=2)
        if tokens is not None:
            k, v = tokens.keys_values(k, v)
            tokens.attention_inputs(q, k)
        out = attention(q, k, v, key_bias).transpose(1, 2).to(q.dtype)  # (B, S, H, Dh)
        if context is None:
            out = out.flatten(2)
            return out if self.to_out is None else self.to_out[0](out)
        # Split before flattening: each stream's heads are gathered into its own contiguous (B, ·, D) in
        # one copy. A row slice of the flattened joint output is not a (B·N, D) matrix, and a linear
        # on it falls back to a batched GEMM with the weight copied per sample.
        ctx_out, out = out[:, :n_ctx].flatten(2), out[:, n_ctx:].flatten(2)
        return self.to_out[0](out), self.to_add_out(ctx_out)


class FeedForward(nn.Module):
    """GELU(tanh) MLP with the key layout of diffusers' FeedForward: net.0.proj, net.2."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        proj_in = nn.Module()
        proj_in.proj = Linear(dim, dim * mult)
        self.net = nn.ModuleList([proj_in, nn.Dropout(0.0), Linear(dim * mult, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](linear_act(self.net[0].proj, x, "gelu_tanh"))


class AdaNormZero(nn.Module):
    """adaLN-Zero: LayerNorm without affine, modulated by chunks of linear(silu(temb)).

    Keys: `linear` (D → n_chunks·D). Returns the chunks (B, D) each; the caller modulates.
    """

    def __init__(self, dim: int, n_chunks: int):
        super().__init__()
        self.linear = Linear(dim, n_chunks * dim)
        self.n_chunks = n_chunks

    def forward(self, temb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(F.silu(temb)).chunk(self.n_chunks, dim=1)


# adaLN modulation and the gated residual as one addcmul each: one pass over the tokens where a
# product and a sum make two, rounded once (the official code rounds the product first).
def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.addcmul(shift[:, None], F.layer_norm(x, x.shape[-1:], eps=NORM_EPS), 1 + scale[:, None])


def _gated(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x + gate (B, D) · y, per sample."""
    return torch.addcmul(x, gate[:, None], y)


def _clip_fp16(x: torch.Tensor) -> torch.Tensor:
    # The official blocks clip fp16 activations so a residual overflow cannot turn into inf.
    return x.clip(-65504, 65504) if x.dtype == torch.float16 else x


# ---------------------------------------------------------------------------------------- blocks
class MMDiTBlock(nn.Module):
    """Multi-modal block: separate weights for text and image streams, joint attention.

    Keys: norm1, norm1_context, attn, norm2 (no params), ff, norm2_context, ff_context.
    """

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.norm1 = AdaNormZero(dim, 6)
        self.norm1_context = AdaNormZero(dim, 6)
        self.attn = Attention(dim, heads, head_dim, joint=True)
        self.ff = FeedForward(dim)
        self.ff_context = FeedForward(dim)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None,
        temb: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        tokens: BlockTokens | None = None,
        mlp_tokens: BlockTokens | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """x (B, N, D) image, context (B, L, D) text → (context, x).

        tokens / mlp_tokens (mgtq.models.hooks): which image tokens attention / the MLP compute, and
        how their outputs return to x. context None: the text stream is not computed (its keys and
        values come through `tokens.keys_values`) and None is returned for it.
        """
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(temb)
        n_text = 0 if context is None else context.shape[1]

        h = _modulate(x, shift_msa, scale_msa)
        c = None
        if context is not None:
            c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(temb)
            c = _modulate(context, c_shift_msa, c_scale_msa)
        bias = None
        if tokens is not None:
            h, rope, bias = tokens.reduce(h), tokens.rope(rope, n_text, x.shape[0]), tokens.key_bias(n_text)
        attn_out = self.attn(h, rope, context=c, key_bias=bias, tokens=tokens)
        attn_out, ctx_attn_out = attn_out if context is not None else (attn_out, None)
        if tokens is not None:
            attn_out = tokens.restore(attn_out)
        x = _gated(x, gate_msa, attn_out)

        h = _modulate(x, shift_mlp, scale_mlp)
        if mlp_tokens is not None:
            x = _gated(x, gate_mlp, mlp_tokens.restore(self.ff(mlp_tokens.reduce(h))))
        else:
            x = _gated(x, gate_mlp, self.ff(h))

        if context is not None:
            context = _gated(context, c_gate_msa, ctx_attn_out)
            c = _modulate(context, c_shift_mlp, c_scale_mlp)
            context = _clip_fp16(_gated(context, c_gate_mlp, self.ff_context(c)))
        return context, _clip_fp16(x)


class SingleStreamBlock(nn.Module):
    """Single-stream block on [text; image]: parallel attention and MLP, fused output projection.

    Keys: norm, proj_mlp, proj_out, attn (pre_only). With `tokens` (mgtq.models.hooks), only the
    image part of the sequence is reduced before attention/MLP and restored after proj_out.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm = AdaNormZero(dim, 3)
        self.proj_mlp = Linear(dim, int(dim * mlp_ratio))
        self.proj_out = Linear(dim + int(dim * mlp_ratio), dim)
        self.attn = Attention(dim, heads, head_dim, pre_only=True)

    def forward(
        self,
        x: torch.Tensor,
        temb: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        n_text: int,
        tokens: BlockTokens | None = None,
    ) -> torch.Tensor:
        """x (B, L + N, D) = [text; image] → same shape (L = n_text, 0 when the text is not computed)."""
        shift, scale, gate = self.norm(temb)
        h = _modulate(x, shift, scale)
        bias = None
        if tokens is not None:
            h = torch.cat([h[:, :n_text], tokens.reduce(h[:, n_text:])], dim=1)
            rope, bias = tokens.rope(rope, n_text, x.shape[0]), tokens.key_bias(n_text)
        attn_out = self.attn(h, rope, key_bias=bias, tokens=tokens)
        out = self.proj_out(torch.cat([attn_out, linear_act(self.proj_mlp, h, "gelu_tanh")], dim=2))
        if tokens is not None:
            out = torch.cat([out[:, :n_text], tokens.restore(out[:, n_text:])], dim=1)
        return _clip_fp16(_gated(x, gate, out))


# ----------------------------------------------------------------------------------------- model
class MeissonicTransformer(ModelMixin, ConfigMixin):
    """Meissonic's MGT transformer: (token ids, text, pooled, timestep, ids, micro-conds) → logits.

    Config keys are the official ones, so a Meissonic `transformer/` folder loads unchanged.
    """

    _supports_gradient_checkpointing = True
    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        patch_size: int = 1,
        in_channels: int = 64,
        num_layers: int = 14,
        num_single_layers: int = 28,
        attention_head_dim: int = 128,
        num_attention_heads: int = 8,
        joint_attention_dim: int = 1024,
        pooled_projection_dim: int = 1024,
        guidance_embeds: bool = False,
        axes_dims_rope: tuple[int, int, int] = (16, 56, 56),
        vocab_size: int = 8256,
        codebook_size: int = 8192,
        downsample: bool = True,
        upsample: bool = True,
    ):
        super().__init__()
        dim = num_attention_heads * attention_head_dim
        _validate_config(dim, attention_head_dim, pooled_projection_dim, axes_dims_rope, vocab_size, codebook_size,
                         downsample, upsample, guidance_embeds, patch_size)
        self.gradient_checkpointing = False
        # Default RoPE tables and micro-conditions per (text length, grid, device): pure functions of
        # the key, rebuilt on a miss, never part of the state dict (see _default_tables).
        self._table_cache: dict[tuple, tuple[torch.Tensor, ...]] = {}
        self.precompiled = None  # compile_blocks' PrecompiledBlocks (its counts say what was loaded / compiled)
        # The token hook of every forward (mgtq.models.hooks), installed by a technique such as
        # mgtq.merging.apply_tomemgt; None = every token computed.
        self.token_hook = None

        self.time_text_embed = CombinedTimestepTextProjEmbeddings(embedding_dim=dim, pooled_projection_dim=dim)
        self.context_embedder = Linear(joint_attention_dim, dim)
        self.transformer_blocks = nn.ModuleList(
            [MMDiTBlock(dim, num_attention_heads, attention_head_dim) for _ in range(num_layers)]
        )
        self.single_transformer_blocks = nn.ModuleList(
            [SingleStreamBlock(dim, num_attention_heads, attention_head_dim) for _ in range(num_single_layers)]
        )
        self.embed = _ConvEmbed(dim, vocab_size)
        self.mlm_layer = _MlmHead(dim, codebook_size)
        self.cond_embed = TimestepEmbedding(
            MICRO_COND_ENCODE_DIM * NUM_MICRO_CONDS + pooled_projection_dim, dim, sample_proj_bias=False
        )
        self.encoder_proj_layer_norm = RMSNorm(dim, NORM_EPS)
        self.project_to_hidden_norm = RMSNorm(dim, NORM_EPS)
        self.project_to_hidden = Linear(dim, dim, bias=False)
        self.project_from_hidden_norm = RMSNorm(dim, NORM_EPS)
        self.project_from_hidden = Linear(dim, dim, bias=False)
        self.down_block = _Resample(dim, down=downsample, up=False)
        self.up_block = _Resample(dim, down=False, up=upsample)

    # ------------------------------------------------------------------------------ load / save
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' loader; a quantized mgtq folder loads through mgtq.quantization.checkpoint instead
        (diffusers would build random float weights for its packed Linears). A local folder inside a pipeline
        folder whose model_index.json records checksums is held to them, unless `checksums=False` (a caller that
        checks them itself: mgtq.load hashes them beside the load and checks them before it returns)."""
        from mgtq.components import check_files, check_loaded, check_recorded

        folder = Path(pretrained_model_name_or_path) / (kwargs.get("subfolder") or "")
        if folder.is_dir():
            if kwargs.get("use_safetensors") is False:  # diffusers would unpickle a .bin beside the safetensors
                raise ValueError(f"{folder}: mgtq loads safetensors only, never pickle files; leave use_safetensors "
                                 "out (or pass True)")
            kwargs["use_safetensors"] = True
            if kwargs.pop("checksums", True):
                check_recorded(folder)  # the checksums of the pipeline folder around it, if it records them
        if folder.is_dir() and checkpoint.is_quantized(folder):
            return checkpoint.load_pretrained(cls, pretrained_model_name_or_path, **kwargs)
        variant = kwargs.get("variant")  # the files diffusers reads are the ones checked
        if folder.is_dir():  # a local float folder is held to mgtq's checks, as mgtq.load holds it
            check_files(folder, variant)  # layer counts the weights can hold, before anything is allocated
        loaded = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        if folder.is_dir():  # no tensor missing (random init), none ignored, none NaN
            check_loaded(loaded[0] if isinstance(loaded, tuple) else loaded, folder, variant)  # output_loading_info
        return loaded

    def save_pretrained(self, save_directory, **kwargs):
        """diffusers' writer, local and safetensors only; a quantized model is written in mgtq's checkpoint format
        (manifest, sha256), which takes no options."""
        if kwargs.get("safe_serialization", True) is False:
            raise ValueError("mgtq writes safetensors only, never pickle files; leave safe_serialization out "
                             "(or pass True); nothing was written")
        if kwargs.get("push_to_hub"):
            raise ValueError("MeissonicTransformer.save_pretrained writes a local folder only; save it, then upload "
                             "the folder with huggingface_hub.upload_folder; nothing was written")
        if checkpoint.quantized_layers(self):
            unsupported = sorted(k for k in kwargs if k != "safe_serialization")
            if unsupported:
                raise ValueError(f"a quantized transformer is saved in mgtq's checkpoint format (one weights file, "
                                 f"its manifest), which takes no options: unsupported {unsupported}; nothing was "
                                 "written")
            checkpoint.save_pretrained(self, save_directory)
            return
        from mgtq.files import atomic_entries
        from mgtq.finite import non_finite_tensor

        key = non_finite_tensor(self)  # a save that loads: the float loader refuses NaN/inf
        if key is not None:
            raise ValueError(f"cannot save the transformer: tensor {key!r} holds NaN or infinite values, which a "
                             "load would refuse; nothing was written")
        # each file replaced whole; weights files of an earlier save of the same variant that this one does not
        # write (other shards, their index, which a load would read first) removed, as diffusers' writer removes
        # them; another variant's (the plain weights beside an fp16 save) stay
        own = _weights_names(kwargs.get("variant"))
        with atomic_entries(save_directory, stale=lambda name: own.fullmatch(name) is not None) as tmp:
            super().save_pretrained(tmp, **kwargs)
        checkpoint.remove_stale_manifest(save_directory)

    def enable_layerwise_casting(self, storage_dtype: torch.dtype = torch.float8_e4m3fn,
                                 compute_dtype: torch.dtype | None = None, *args, **kwargs) -> None:
        """diffusers' layerwise casting. A compute dtype other than the model's casts the model to it first: the
        modules diffusers leaves uncast (norms, embeddings) compute in it too, where their float32 output met a
        bfloat16 layer ("expected m1 and m2 to have the same dtype")."""
        if compute_dtype is not None and compute_dtype != self.dtype:
            from mgtq.modules import cast_module

            cast_module(self, dtype=compute_dtype)
        super().enable_layerwise_casting(storage_dtype, compute_dtype, *args, **kwargs)

    def requires_grad_(self, requires_grad: bool = True) -> "MeissonicTransformer":
        """nn.Module's, saying what to do where a quantized layer's packed integer weights cannot take gradients
        (torch's own error names no parameter: "only Tensors of floating point dtype can require gradients")."""
        packed = [name for name, p in self.named_parameters() if not p.is_floating_point()]
        if requires_grad and packed:
            raise ValueError(f"this quantized transformer holds packed integer weights ({packed[0]} and "
                             f"{len(packed) - 1} more), which cannot take gradients: train the float model (mgtq "
                             "calibrate runs SCQ's quantization-aware training on it), or train only the float "
                             "parameters: for p in model.parameters(): p.requires_grad_(p.is_floating_point())")
        return super().requires_grad_(requires_grad)

    # ------------------------------------------------------------------------------- properties
    @property
    def mask_token_id(self) -> int:
        """Id of the [MASK] token: the last id of the vocabulary, as in Meissonic."""
        return self.config.vocab_size - 1

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype activations run in: diffusers' layerwise-casting compute dtype when enabled, else
        the float parameters' dtype (never a single weight's: it may be fp8-stored or offloaded)."""
        return self.dtype

    @property
    def grid_factor(self) -> int:
        """Token-grid side ÷ transformer-grid side: 2 with feature compression, else 1."""
        return 2 if self.config.downsample else 1

    def image_ids(self, height: int, width: int, device=None) -> torch.Tensor:
        """img_ids (h'·w', 3) for a token grid of height×width: channel 1 = row, 2 = col."""
        f = self.grid_factor
        if height % f or width % f:
            raise ValueError(f"token grid {height}×{width} must be divisible by {f} (feature compression)")
        h, w = height // f, width // f
        ids = torch.zeros(h, w, 3, device=device)
        ids[..., 1] = torch.arange(h, device=device)[:, None]
        ids[..., 2] = torch.arange(w, device=device)[None, :]
        return ids.reshape(h * w, 3)

    @staticmethod
    def text_ids(length: int, device=None) -> torch.Tensor:
        """txt_ids (L, 3): all zeros, as in Meissonic."""
        return torch.zeros(length, 3, device=device)

    # ---------------------------------------------------------------------------------- forward
    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        timestep: torch.Tensor,
        img_ids: torch.Tensor | None = None,
        txt_ids: torch.Tensor | None = None,
        micro_conds: torch.Tensor | None = None,
        token_hook=None,
        return_dict: bool = False,
        **unused,
    ) -> torch.Tensor:
        """Logits (B, codebook_size, H, W) for token ids `hidden_states` (B, H, W).

        encoder_hidden_states (B, L, joint_attention_dim); pooled_projections (B, pooled_dim);
        timestep (B,) or scalar in [0, 1] (multiplied by 1000 inside, as in the official code);
        img_ids/txt_ids default to the official layout; micro_conds (B, 5) default to
        [1024, 1024, 0, 0, 6]. `token_hook` (mgtq.models.hooks.TokenHook): which image tokens the
        blocks compute, bound once per forward; defaults to the installed `self.token_hook`.
        Extra official keyword arguments (guidance, joint_attention_kwargs, controlnet_*) are
        accepted and ignored when None, so official call sites work unchanged.
        """
        _reject_unsupported(unused)
        token_hook = token_hook if token_hook is not None else self.token_hook
        batch, height, width = _check_token_ids(hidden_states, self.config.vocab_size)
        device = hidden_states.device
        dtype = self.compute_dtype

        if micro_conds is None:
            micro_conds = self._default_tables(("micro", str(device)), lambda: (
                torch.tensor(DEFAULT_MICRO_CONDS, device=device),))[0].expand(batch, -1)
        micro = get_timestep_embedding(
            micro_conds.flatten(), MICRO_COND_ENCODE_DIM, flip_sin_to_cos=True, downscale_freq_shift=0
        ).reshape(batch, -1)
        pooled = torch.cat([pooled_projections, micro.to(pooled_projections.dtype)], dim=1).to(dtype)
        pooled = self.cond_embed(pooled).to(encoder_hidden_states.dtype)

        # A technique needs the grid (2×2 cells) and which ids are [MASK]; its plan dies with this call.
        f = self.grid_factor
        h, w = -(-height // f), -(-width // f)  # the down conv's grid (odd sides: diffusers' pad row/column)
        masked = hidden_states == self.mask_token_id  # (B, H, W)
        plan = token_hook.bind((h, w), masked) if token_hook is not None else TokenPlan()

        context = self.encoder_proj_layer_norm(self.context_embedder(encoder_hidden_states.to(dtype)))
        if plan.tokens is None:
            x = self.down_block(self.embed(hidden_states))  # (B, D, h, w)
        else:
            x = self.down_block(self.embed(_cells_row(hidden_states, plan.tokens, f)))  # (B, D, 1, M)
        channels = x.shape[1]
        x = x.permute(0, 2, 3, 1).reshape(batch, -1, channels)
        x = self.project_to_hidden(self.project_to_hidden_norm(x))

        timestep = torch.as_tensor(timestep, device=device)
        timestep = timestep.expand(batch) if timestep.dim() == 0 else timestep
        temb = self.time_text_embed(timestep.to(x.dtype) * 1000, pooled)

        axes = tuple(self.config.axes_dims_rope)
        if img_ids is None and txt_ids is None:
            rope = self._default_tables(
                ("rope", context.shape[1], height, width, str(device)),
                lambda: rope_tables(torch.cat([self.text_ids(context.shape[1], device),
                                               self.image_ids(height, width, device)]), axes),
            )
        else:
            txt_ids = self.text_ids(context.shape[1], device) if txt_ids is None else txt_ids
            img_ids = self.image_ids(height, width, device) if img_ids is None else img_ids
            txt_ids, img_ids = (ids[0] if ids.dim() == 3 else ids for ids in (txt_ids, img_ids))
            if img_ids.shape[0] != h * w or txt_ids.shape[0] != context.shape[1]:
                raise ValueError(
                    f"img_ids has {img_ids.shape[0]} rows for {h * w} image tokens and txt_ids {txt_ids.shape[0]} rows "
                    f"for {context.shape[1]} text tokens; build them with image_ids()/text_ids() or omit them"
                )
            rope = rope_tables(torch.cat([txt_ids, img_ids], dim=0), axes)
        x, context, rope = plan.enter(x, context, rope)

        for index, block in enumerate(self.transformer_blocks):
            context, x = self._run(block, x, context, temb, rope, *plan.plan("joint", index, x))

        n_text = 0 if context is None else context.shape[1]
        x = x if context is None else torch.cat([context, x], dim=1)
        for index, block in enumerate(self.single_transformer_blocks):
            x = self._run(block, x, temb, rope, n_text, plan.plan("single", index, x[:, n_text:])[0])
        x = self.project_from_hidden(self.project_from_hidden_norm(x[:, n_text:]))

        if plan.computes_subset:
            # Every head layer is per token (the transposed 2×2 conv gives each token its own f×f cell), so
            # the computed tokens run side by side as one 1×(B·M) image: as a batch of 1×1 images, oneDNN
            # takes several times longer for the same values (a convolution call per tiny image).
            row = x.reshape(1, 1, -1, channels).permute(0, 3, 1, 2)  # (1, C, 1, B·M), channels last
            logits = self.mlm_layer(self.up_block(row))  # (1, V, f, f·B·M): token t's cell is columns f·t … f·t + f − 1
            f = logits.shape[2]
            logits = logits[0].unflatten(2, (-1, f)).permute(2, 0, 1, 3)  # (B·M, V, f, f)
            logits = plan.leave(logits.unflatten(0, (batch, -1)))
        else:
            x = x.reshape(batch, h, w, channels).permute(0, 3, 1, 2)
            logits = self.mlm_layer(self.up_block(x))
        return (logits,) if return_dict else logits

    def compile_blocks(self, persistent_cache: bool = True, **kwargs) -> None:
        """torch.compile every transformer block in place (regional compilation); kwargs go to torch.compile.

        persistent_cache: keep the compiled code in mgtq's user cache folder (mgtq.compilation), so a
        later process compiling the same blocks at the same shapes loads it instead of building it; with
        Inductor's default options, whole blocks are saved ahead of time (`PrecompiledBlocks`: Dynamo's
        bytecode and guards too), so a later process does not trace them either; a torch without the
        ahead-of-time compile API that needs (before 2.11, `precompile_supported`) skips that part.

        Blocks of one kind share their compiled code (Dynamo guards on tensor properties, not on
        which block), so compiling costs about two blocks instead of the whole model; what stays
        eager between blocks is a few embeddings and the (cached) RoPE tables. Blocks whose
        quantized layer kinds differ (SCQ) compile once per distinct pattern, and each kind of token
        hook a block is given (none, merging, a full step of context reuse with or without merging
        inside, a local step) is another graph, so the recompile limit is raised to cover both.
        """
        from mgtq.compilation import PrecompiledBlocks, compile_in_place, use_persistent_compile_cache

        store = None
        if persistent_cache:
            folder = use_persistent_compile_cache()
            store = PrecompiledBlocks(folder, kwargs) if PrecompiledBlocks.supports(kwargs) else None
        blocks = [*self.transformer_blocks, *self.single_transformer_blocks]
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * len(blocks))
        for block in blocks:
            compile_in_place(block, **kwargs)  # fullgraph, but for calls under offload or casting hooks
            if store is not None:
                store.install(block)
        self.precompiled = store

    def _default_tables(self, key: tuple, build) -> tuple[torch.Tensor, ...]:
        """`build()` memoised under `key` (eager only: a compiled graph computes them inside, once).

        The tables depend on nothing but the key (positions, not weights), so a hit is exactly what a
        rebuild would give; this saves the float64 RoPE build and a host-to-device copy per forward.
        """
        if torch.compiler.is_compiling():
            return build()
        tables = self._table_cache.get(key)
        if tables is None:
            if len(self._table_cache) >= 8:  # a handful of grids per process; never grow without bound
                self._table_cache.clear()
            # Plain constants: built outside inference mode and autograd, so a table first made under
            # torch.inference_mode() can later enter a training forward (which saves it for backward).
            with torch.inference_mode(False), torch.no_grad():
                tables = self._table_cache[key] = build()
        return tables

    def _run(self, block, *args):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
        return block(*args)


# Around the transformer: the token-grid layers of aMUSEd's U-ViT that Meissonic keeps, under diffusers'
# module and key names (UVit2DConvEmbed, ConvMlmLayer, Downsample2D, Upsample2D), the same arithmetic.
# Every tensor between them is stored channels last (each token's channels one dense row), so the 1×1 and
# 2×2 convolutions run as linears (mgtq.models.layers) and the RMSNorms in one pass per row.
def _cells_row(ids: torch.Tensor, tokens: torch.Tensor, f: int) -> torch.Tensor:
    """Token ids (B, H, W) → the f×f cells of transformer tokens `tokens` (B, M) side by side, (B, f, M·f):
    token t's cell is columns f·t … f·t + f − 1. Every layer before the blocks is per transformer token (the
    embedding, its RMSNorm and 1×1 conv per id, the 2×2 stride-2 conv per cell, the projection per token),
    so embedding this row gives exactly those tokens' inputs (B, D, 1, M), without the rest of the grid."""
    batch, height, width = ids.shape
    h, w = height // f, width // f
    cells = ids.reshape(batch, h, f, w, f).transpose(2, 3).reshape(batch, h * w, f, f)
    cells = cells.gather(1, tokens.to(ids.device)[..., None, None].expand(-1, -1, f, f))  # (B, M, f, f)
    return cells.transpose(1, 2).reshape(batch, f, -1)


class _ConvEmbed(nn.Module):
    """Token ids (B, h, w) → embedding → RMSNorm → 1×1 conv → (B, D, h, w), stored channels last."""

    def __init__(self, dim: int, vocab_size: int):
        super().__init__()
        self.embeddings = nn.Embedding(vocab_size, dim)
        self.layer_norm = RMSNorm(dim, NORM_EPS)
        self.conv = PointwiseConv2d(dim, dim, kernel_size=1, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.conv(self.layer_norm(self.embeddings(ids)).permute(0, 3, 1, 2))


class _MlmHead(nn.Module):
    """(B, D, h, w) → 1×1 conv → RMSNorm → 1×1 conv → logits (B, codebook, h, w), per token."""

    def __init__(self, dim: int, codebook_size: int):
        super().__init__()
        self.conv1 = PointwiseConv2d(dim, dim, kernel_size=1, bias=False)
        self.layer_norm = RMSNorm(dim, NORM_EPS)
        self.conv2 = PointwiseConv2d(dim, codebook_size, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        return self.conv2(self.layer_norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))


class _Down(nn.Module):
    """RMSNorm then the 2×2 stride-2 conv. diffusers' Downsample2D first pads one row and column that this
    convolution never reads on the even grids Meissonic allows (validated by image_ids), so none is made."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, NORM_EPS)
        self.conv = PatchConv2d(dim, dim, kernel_size=2, stride=2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[2] % 2 or x.shape[3] % 2:  # where diffusers' pad is read
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))


class _Up(nn.Module):
    """RMSNorm then the 2×2 stride-2 transposed conv (each token's own 2×2 cell)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, NORM_EPS)
        self.conv = nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))


class _Resample(nn.Module):
    """Feature compression around the transformer under the official names (`downsample`, `upsample`)."""

    def __init__(self, dim: int, down: bool, up: bool):
        super().__init__()
        self.downsample = _Down(dim) if down else None
        self.upsample = _Up(dim) if up else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample is not None:
            x = self.downsample(x)
        if self.upsample is not None:
            x = self.upsample(x)
        return x


# ---------------------------------------------------------------------------------- validation
def _weights_names(variant: str | None) -> re.Pattern:
    """The weights files diffusers writes for `variant`: single, sharded and their index (safetensors or .bin)."""
    tag = "" if variant is None else re.escape(f".{variant}")
    return re.compile(rf"diffusion_pytorch_model{tag}(-\d+-of-\d+)?\.(safetensors|bin)"
                      rf"|diffusion_pytorch_model\.(safetensors|bin)\.index{tag}\.json")


def _validate_config(dim, head_dim, pooled_dim, axes_dims_rope, vocab_size, codebook_size, downsample, upsample,
                     guidance_embeds, patch_size):
    if pooled_dim != dim:
        raise ValueError(
            f"pooled_projection_dim ({pooled_dim}) must equal num_attention_heads·attention_head_dim ({dim}): "
            "Meissonic feeds the micro-conditioned pooled embedding (width D) into the text projection"
        )
    if sum(axes_dims_rope) != head_dim or any(d % 2 for d in axes_dims_rope):
        raise ValueError(f"axes_dims_rope {tuple(axes_dims_rope)} must be even and sum to attention_head_dim {head_dim}")
    if vocab_size <= codebook_size:
        raise ValueError(f"vocab_size ({vocab_size}) must exceed codebook_size ({codebook_size}): the last id is [MASK]")
    if downsample != upsample:
        raise ValueError("downsample and upsample must be equal: the logits grid must match the token grid")
    if guidance_embeds:
        raise ValueError("guidance_embeds=True is not part of Meissonic (no distilled guidance); set it to false")
    if patch_size != 1:
        raise ValueError(f"patch_size {patch_size} is not supported; Meissonic uses 1")


def _check_token_ids(ids: torch.Tensor, vocab_size: int) -> tuple[int, int, int]:
    if ids.dim() != 3 or ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"hidden_states must be integer token ids (B, H, W); got {tuple(ids.shape)} {ids.dtype}")
    if ids.is_meta or not ids.numel():
        pass
    elif ids.device.type == "cpu" and not torch.compiler.is_compiling():
        if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:  # reading a CPU tensor costs no sync
            raise ValueError(f"token ids must lie in [0, {vocab_size}); got [{int(ids.min())}, {int(ids.max())}]")
    else:  # no host sync on an accelerator or in a compiled graph: the device checks
        torch._assert_async(((ids >= 0) & (ids < vocab_size)).all(), f"token ids must lie in [0, {vocab_size})")
    return ids.shape[0], ids.shape[1], ids.shape[2]


def _reject_unsupported(unused: dict) -> None:
    ignorable = {"guidance", "joint_attention_kwargs", "controlnet_block_samples", "controlnet_single_block_samples"}
    for name, value in unused.items():
        if name not in ignorable:
            raise TypeError(f"MeissonicTransformer.forward() got an unexpected keyword argument '{name}'")
        if value is not None:
            raise ValueError(f"'{name}' is not supported by mgtq's Meissonic transformer; pass None")

