"""The VQ image tokenizer: a diffusers ``VQModel`` plus token-level encode/decode helpers.

Images are float tensors (B, 3, H, W) in [-1, 1] for the VQs mgtq trains (Meissonic's take [0, 1]: a
pipeline's `settings.image_range`); tokens are LongTensors (B, H/f, W/f) of codebook
indices, f = 2^(len(block_out_channels) − 1). For the tiny shapes model, 64×64 → 16×16 tokens.

Models are built with ``lookup_from_codebook=True`` so that, like Meissonic's VQ, they decode token
ids directly: ``vq.decode(tokens, force_not_quantize=True, shape=(B, h, w, C))``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

from mgtq.config import validate


def vq_factor(block_out_channels) -> int:
    """Pixels per VQ token side: the encoder halves the image between its blocks, 2^(blocks − 1) (16 for
    Meissonic's VQ, 4 for the embedded one)."""
    return 2 ** (len(block_out_channels) - 1)


@dataclass(frozen=True)
class VQConfig:
    """Architecture of the VQ tokenizer (maps onto ``diffusers.VQModel`` kwargs).

    block_out_channels: one encoder/decoder block per entry; all but the last downsample by 2.
    latent_channels: width of the latent grid and of every codebook vector.
    num_vq_embeddings: codebook size (= the transformer's image vocabulary, without the mask id).
    norm_num_groups: GroupNorm groups; must divide every entry of block_out_channels.
    mid_block_add_attention: self-attention in the middle blocks (off: costs CPU time, and flat
        shapes need no global context to reconstruct).
    """

    block_out_channels: tuple[int, ...] = (16, 32, 64)
    layers_per_block: int = 1
    latent_channels: int = 8
    num_vq_embeddings: int = 256
    norm_num_groups: int = 8
    mid_block_add_attention: bool = False
    image_size: int = 64

    def __post_init__(self) -> None:
        validate(self)
        if not self.block_out_channels or min(self.block_out_channels) <= 0:
            raise ValueError(f"block_out_channels must be non-empty and positive, got {self.block_out_channels}")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"norm_num_groups={self.norm_num_groups} must divide every block width, not {bad}")
        if self.layers_per_block < 1 or self.latent_channels < 1 or self.num_vq_embeddings < 2:
            raise ValueError("layers_per_block ≥ 1, latent_channels ≥ 1 and num_vq_embeddings ≥ 2 are required")
        if self.image_size % self.downsample_factor:
            raise ValueError(f"image_size {self.image_size} is not divisible by f = {self.downsample_factor}")

    @property
    def downsample_factor(self) -> int:
        return vq_factor(self.block_out_channels)

    @property
    def token_grid(self) -> int:
        """Side of the token grid: image_size / f."""
        return self.image_size // self.downsample_factor


def vq_model_kwargs(config: VQConfig) -> dict:
    """``diffusers.VQModel`` constructor kwargs for ``config``."""
    n = len(config.block_out_channels)
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=config.block_out_channels,
        layers_per_block=config.layers_per_block,
        latent_channels=config.latent_channels,
        num_vq_embeddings=config.num_vq_embeddings,
        norm_num_groups=config.norm_num_groups,
        vq_embed_dim=config.latent_channels,
        sample_size=config.image_size,
        mid_block_add_attention=config.mid_block_add_attention,
        lookup_from_codebook=True,
    )


def build_vq(config: VQConfig, seed: int = 0):
    """A freshly initialised ``VQModel``; weights depend only on ``seed``.

    diffusers/torch initialise layers from the global RNG, so the global state is forked, seeded
    and restored: callers' random streams are left untouched.
    """
    from diffusers import VQModel

    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # the CPU stream init draws from, given back on exit
        return VQModel(**vq_model_kwargs(config))


def load_vq(path: str):
    """Load a VQModel saved with ``save_pretrained`` (diffusers layout), in eval mode, held to the checks a
    pipeline load applies (safetensors only, no tensor missing, unexpected or non-finite, recorded checksums)."""
    from diffusers import VQModel

    from mgtq.pipeline import load_component

    return load_component(VQModel, path).eval()


def config_of(vq) -> VQConfig:
    """Recover the :class:`VQConfig` of a ``VQModel`` from its diffusers config."""
    c = vq.config
    return VQConfig(
        block_out_channels=tuple(c.block_out_channels),
        layers_per_block=c.layers_per_block,
        latent_channels=c.latent_channels,
        num_vq_embeddings=c.num_vq_embeddings,
        norm_num_groups=c.norm_num_groups,
        mid_block_add_attention=c.mid_block_add_attention,
        image_size=c.sample_size,
    )


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 images (B, H, W, 3) → float32 (B, 3, H, W) in [-1, 1]."""
    arr = np.asarray(images)
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"expected uint8 (B, H, W, 3), got {arr.dtype} {arr.shape}")
    x = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def tensor_to_images(x: torch.Tensor) -> np.ndarray:
    """float (B, 3, H, W) in [-1, 1] → uint8 (B, H, W, 3) (values outside are clipped)."""
    x = ((x.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
@contextlib.contextmanager
def _onloaded(module: torch.nn.Module):
    """`module`'s weights on its execution device for the block. Sequential offload (accelerate) keeps them on
    "meta" until the module's own forward runs, and the quantizer reads its codebook weight directly, never
    calling the embedding's forward; so the hook's own loading is run around the call (what accelerate's
    `align_module_device` does, which its 1.0 lacks)."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None or not getattr(hook, "offload", False):
        yield
        return
    hook.pre_forward(module)
    try:
        yield
    finally:
        hook.post_forward(module, None)


def encode_to_tokens(vq, images: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """images (B, 3, H, W) in the VQ's range → token ids LongTensor (B, H/f, W/f).

    The range is the one the VQ was trained on: [-1, 1] for the VQs mgtq trains, [0, 1] for Meissonic's
    (a pipeline's `settings.image_range`; the editing pipelines' `encode_image` converts).

    device: where the VQ computes; default where its weights are (an offloaded pipeline passes its
    execution device: its weights wait on the CPU or on "meta" until the hooks move them in).
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images (B, 3, H, W), got {tuple(images.shape)}")
    param = next(vq.parameters())
    latents = vq.encode(images.to(device or param.device, param.dtype)).latents  # (B, C, h, w)
    with _onloaded(vq.quantize.embedding):
        _, _, (_, _, indices) = vq.quantize(latents)  # indices (B·h·w, 1), row-major over (B, h, w)
    b, _, h, w = latents.shape
    return indices.reshape(b, h, w).long()


@torch.no_grad()
def decode_tokens(vq, tokens: torch.Tensor) -> torch.Tensor:
    """token ids (B, h, w) → images float (B, 3, h·f, w·f) clamped to [-1, 1]."""
    if tokens.ndim != 3:
        raise ValueError(f"expected tokens (B, h, w), got {tuple(tokens.shape)}")
    n = vq.config.num_vq_embeddings
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= n):
        raise ValueError(f"token ids must be in [0, {n}); got range [{int(tokens.min())}, {int(tokens.max())}]")
    b, h, w = tokens.shape
    device = next(vq.parameters()).device
    shape = (b, h, w, vq.quantize.vq_embed_dim)
    tokens = tokens.to(device)
    if vq.config.lookup_from_codebook:  # Meissonic-style: decode() looks the ids up itself
        return vq.decode(tokens, force_not_quantize=True, shape=shape).sample.clamp(-1, 1)
    quant = vq.quantize.get_codebook_entry(tokens.reshape(-1), shape)  # (B, C, h, w)
    return vq.decode(quant, force_not_quantize=True).sample.clamp(-1, 1)


def roundtrip(vq, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """uint8 (N, H, W, 3) → encode → tokens → decode → uint8 (N, H, W, 3)."""
    out = []
    for i in range(0, len(images), batch_size):
        tokens = encode_to_tokens(vq, images_to_tensor(images[i : i + batch_size]))
        out.append(tensor_to_images(decode_tokens(vq, tokens)))
    return np.concatenate(out) if out else np.zeros((0,) + tuple(np.shape(images)[1:]), np.uint8)
