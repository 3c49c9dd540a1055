"""MGTPipeline: text → tokens (MaskGIT sampler over MeissonicTransformer) → image (VQ decoder).

Thin orchestration over real components: a diffusers `VQModel`, a transformers
`CLIPTextModelWithProjection` + `CLIPTokenizer`, and mgtq's `MeissonicTransformer` (float or
quantized). Reads the official Meissonic folder layout and mgtq's own checkpoints, offline only.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import VQModel
from PIL import Image
from transformers import CLIPTextModelWithProjection, CLIPTokenizer

from mgtq.components import check_files, check_index, check_loaded
from mgtq.config import from_mapping
from mgtq.models.transformer import MeissonicTransformer
from mgtq.quantization import checkpoint
from mgtq.sampling import SamplerConfig, SamplerHooks, sample
from mgtq.utils import atomic_directory, micro_conditions, parse_dtype, per_sample_generators, read_json, write_json


@dataclass
class PipelineSettings:
    """What a checkpoint says about how to run it (stored under "mgtq" in model_index.json).

    sampler: default SamplerConfig; resolution: default image side in pixels; image_range: value
    range of the VQ decoder's output ("0,1" as Meissonic's VQ, or "-1,1"); aesthetic_score: the
    fifth micro-condition.
    """

    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    resolution: int = 1024
    image_range: str = "0,1"
    aesthetic_score: float = 6.0

    def __post_init__(self):
        if isinstance(self.sampler, dict):
            self.sampler = SamplerConfig.from_dict(self.sampler)
        if self.image_range not in ("0,1", "-1,1"):
            raise ValueError(f"image_range must be '0,1' or '-1,1', got {self.image_range!r}")
        if self.resolution <= 0:
            raise ValueError(f"resolution must be positive, got {self.resolution}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["sampler"] = self.sampler.to_dict()
        return d


@dataclass
class MGTPipelineOutput:
    images: list[Image.Image]
    tokens: torch.Tensor  # (B, h, w) VQ token ids
    nfe: int = 0  # transformer calls of the sampler (a CFG call, uncond+cond in one batch, counts once)


class MGTPipeline:
    """Text-to-image pipeline of a masked generative transformer (Meissonic family)."""

    def __init__(
        self,
        transformer: MeissonicTransformer,
        vqvae: VQModel,
        text_encoder: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        settings: PipelineSettings | None = None,
    ):
        self.transformer, self.vqvae, self.text_encoder, self.tokenizer = transformer, vqvae, text_encoder, tokenizer
        self.settings = settings or PipelineSettings()
        _check_compatible(self)

    # ------------------------------------------------------------------------------- properties
    @property
    def device(self) -> torch.device:
        return self.transformer.embed.embeddings.weight.device

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per VQ token side: 2^(number of VQ encoder blocks − 1) (16 for Meissonic)."""
        return 2 ** (len(self.vqvae.config.block_out_channels) - 1)

    def to(self, device=None, dtype=None) -> "MGTPipeline":
        """Move components; `dtype` applies to the transformer and text encoder (the VQ stays fp32)."""
        # Only name what changes: diffusers warns on any dtype= keyword, even None.
        kwargs = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        for module in (self.transformer, self.text_encoder):
            module.to(**kwargs)
        self.vqvae.to(device)
        return self

    def compile(self, regional: bool = True, **kwargs) -> "MGTPipeline":
        """torch.compile the transformer in place (fullgraph: it has no graph breaks); compiled on first use.

        regional: compile each transformer block (MeissonicTransformer.compile_blocks: minutes less
        compile time on large models); else the whole transformer as one graph. The module objects,
        weights and state-dict keys stay as they are; `kwargs` go to torch.compile.
        """
        if regional:
            self.transformer.compile_blocks(**kwargs)
        else:
            self.transformer.compile(**{"fullgraph": True, **kwargs})
        return self

    # ---------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        text_encoder: str | os.PathLike | CLIPTextModelWithProjection | None = None,
        tokenizer: str | os.PathLike | CLIPTokenizer | None = None,
        dtype: torch.dtype | str | None = None,
        device: str | torch.device | None = None,
        torch_dtype: torch.dtype | str | None = None,
        transformer: MeissonicTransformer | None = None,
        vqvae: VQModel | None = None,
    ) -> "MGTPipeline":
        """Load a pipeline folder: official Meissonic layout or an mgtq checkpoint (float or quantized).

        The folder holds transformer/, vqvae/, tokenizer/, text_encoder/ (the text encoder and
        tokenizer may be given separately, as the official setup loads CLIP ViT-H/14 from its own
        folder). Local folders only, safetensors only: nothing is downloaded or unpickled.
        `dtype` (or diffusers' spelling `torch_dtype`) applies to the transformer and text encoder.
        A `transformer` or `vqvae` module given here is used as is instead of the folder's.
        """
        if dtype is not None and torch_dtype is not None:
            raise ValueError("pass dtype or torch_dtype, not both")
        dtype = parse_dtype(dtype if dtype is not None else torch_dtype)
        root = _existing_dir(path, "pipeline")
        settings = read_settings(root)
        if transformer is None:
            transformer = load_transformer(root / "transformer", dtype=dtype)
        if vqvae is None:
            vqvae = load_component(VQModel, _existing_dir(root / "vqvae", "vqvae"))
        text_encoder = _load_text_encoder(root, text_encoder, dtype)
        tokenizer = _load_tokenizer(root, tokenizer)
        pipe = cls(transformer, vqvae, text_encoder, tokenizer, settings)
        for module in (transformer, vqvae, text_encoder):
            module.eval()
        return pipe.to(device) if device is not None else pipe

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write the float pipeline in diffusers layout (safetensors only), atomically.

        Quantized transformers are written by `mgtq export` (mgtq.quantization.checkpoint).
        """
        with atomic_directory(path) as tmp:
            self.transformer.save_pretrained(tmp / "transformer", safe_serialization=True)
            self.vqvae.save_pretrained(tmp / "vqvae", safe_serialization=True)
            self.text_encoder.save_pretrained(tmp / "text_encoder", safe_serialization=True)
            self.tokenizer.save_pretrained(tmp / "tokenizer")
            write_json(tmp / "scheduler" / "scheduler_config.json", {
                "_class_name": "Scheduler",
                "mask_token_id": self.transformer.mask_token_id,
                "masking_schedule": self.settings.sampler.schedule,
            })
            write_json(tmp / "model_index.json", {
                "_class_name": "MGTPipeline",
                "transformer": ["mgtq", "MeissonicTransformer"],
                "vqvae": ["diffusers", "VQModel"],
                "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "scheduler": ["mgtq", "Scheduler"],
                "mgtq": self.settings.to_dict(),
            })

    # ---------------------------------------------------------------------------------- prompts
    def encode_prompt(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """CLIP text features: (encoder_hidden_states (B, L, C) = hidden_states[-2], pooled (B, P))."""
        max_len = self.tokenizer.model_max_length
        for prompt in prompts:
            n = len(self.tokenizer(prompt, truncation=False, verbose=False)["input_ids"])
            if n > max_len:
                warnings.warn(
                    f"prompt has {n} tokens; CLIP reads at most {max_len}, the rest is cut off: {prompt[:60]!r}…",
                    stacklevel=3,
                )
        ids = self.tokenizer(prompts, padding="max_length", max_length=max_len, truncation=True,
                             return_tensors="pt").input_ids.to(self.text_encoder.device)
        out = self.text_encoder(ids, output_hidden_states=True, return_dict=True)
        return out.hidden_states[-2], out.text_embeds

    # ------------------------------------------------------------------------------------- call
    @torch.inference_mode()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        seed: int | list[int] | None = None,
        micro_conds: torch.Tensor | None = None,
        sampler: SamplerConfig | None = None,
        hooks: SamplerHooks | None = None,
        token_merging=None,
        progress: bool = True,
        output_type: str = "pil",
    ) -> MGTPipelineOutput:
        """Generate images. Steps/CFG default to the checkpoint's sampler settings.

        Each image gets its own generator (seed, seed+1, … or the given list), so an image is
        the same whatever else is in the batch. `output_type="tokens"` skips VQ decoding.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("prompt must be a non-empty string or list of strings")
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        batch = len(prompts)
        config = sampler or self.settings.sampler
        overrides = {k: v for k, v in (("num_steps", num_inference_steps), ("guidance_scale", guidance_scale)) if v is not None}
        config = config.replace(**overrides) if overrides else config
        height = height or self.settings.resolution
        width = width or self.settings.resolution
        grid = self.token_grid(height, width)
        generators = per_sample_generators(batch, seed=seed, generator=generator, device=self.device)

        text, pooled = self.encode_prompt(prompts)
        negative = None
        if config.needs_unconditional:  # CFG, or masked Z-sampling's inversion pass
            negative = self.encode_prompt(_broadcast_negative(negative_prompt, prompts, num_images_per_prompt))
        if micro_conds is None:
            micro_conds = micro_conditions(width, height, self.settings.aesthetic_score)
        micro_conds = micro_conds.to(self.device).reshape(-1, 5)
        model_fn = self.guided_model_fn(text, pooled, micro_conds, config, token_merging, negative=negative)

        result = sample(model_fn, batch, grid, self.transformer.mask_token_id, config, generators,
                        device=self.device, hooks=hooks, progress=progress, return_info=True)
        images = self.decode_tokens(result.tokens) if output_type == "pil" else []
        return MGTPipelineOutput(images=images, tokens=result.tokens, nfe=result.nfe)

    def token_grid(self, height: int, width: int) -> tuple[int, int]:
        """Token grid (h, w) for an image of height×width pixels; errors name valid sizes."""
        f = self.vae_scale_factor * self.transformer.grid_factor
        if height % f or width % f or height <= 0 or width <= 0:
            raise ValueError(
                f"height and width must be positive multiples of {f} (VQ factor {self.vae_scale_factor} × "
                f"feature compression {self.transformer.grid_factor}); got {height}×{width}, "
                f"try {max(f, round(height / f) * f)}×{max(f, round(width / f) * f)}"
            )
        return height // self.vae_scale_factor, width // self.vae_scale_factor

    def guided_model_fn(self, text, pooled, micro_conds, config: SamplerConfig, token_merging=None, negative=None):
        """model_fn(tokens (B,h,w), timestep (B,), guidance_scale=None) → guided logits (B, V, h, w).

        text/pooled: the prompts' features (B, …); negative: the negative prompts' (text, pooled) or
        None; micro_conds: (1 or B, 5). Without guidance_scale the call is the configured sampler's
        (CFG when config.use_cfg, batch [uncond, cond]); an explicit guidance_scale s (masked
        Z-sampling's inversion CFG) is literal, ℓu + s(ℓc − ℓu), and runs only the branches it needs.
        """
        transformer = self.transformer
        dtype = transformer.embed.embeddings.weight.dtype
        cond = (text.to(dtype), pooled.to(dtype))
        uncond = None if negative is None else (negative[0].to(dtype), negative[1].to(dtype))

        if micro_conds.shape[0] not in (1, text.shape[0]):
            raise ValueError(f"micro_conds must have 1 or {text.shape[0]} (one per image) rows of 5, "
                             f"got {tuple(micro_conds.shape)}")

        def forward(tokens, timestep, features):
            text_b, pooled_b = features
            n = text_b.shape[0]  # B, or 2B for [uncond, cond]
            rows = micro_conds.shape[0]
            micro = micro_conds.expand(n, 5) if rows == 1 else micro_conds.repeat(n // rows, 1)
            return transformer(hidden_states=tokens, encoder_hidden_states=text_b, pooled_projections=pooled_b,
                               timestep=timestep, micro_conds=micro, token_merging=token_merging).float()

        def model_fn(tokens: torch.Tensor, timestep: torch.Tensor, guidance_scale: float | None = None) -> torch.Tensor:
            scale = config.guidance_scale if guidance_scale is None else float(guidance_scale)
            guided = config.use_cfg if guidance_scale is None else scale != 1.0
            if not guided:
                return forward(tokens, timestep, cond)
            if uncond is None:
                raise ValueError(f"guidance scale {scale} needs the unconditional branch, but no negative prompt "
                                 "features were given to guided_model_fn")
            if scale == 0.0:  # ℓu + 0·(ℓc − ℓu) = ℓu: skip the conditional branch
                return forward(tokens, timestep, uncond)
            both = (torch.cat([uncond[0], cond[0]]), torch.cat([uncond[1], cond[1]]))
            logits = forward(torch.cat([tokens, tokens]), torch.cat([timestep, timestep]), both)
            uncond_logits, cond_logits = logits.chunk(2)
            return uncond_logits + scale * (cond_logits - uncond_logits)

        return model_fn

    @torch.inference_mode()
    def decode_tokens(self, tokens: torch.Tensor) -> list[Image.Image]:
        """VQ-decode token ids (B, h, w) by codebook lookup into PIL images."""
        b, h, w = tokens.shape
        shape = (b, h, w, self.vqvae.config.latent_channels)
        images = self.vqvae.decode(tokens.to(self.vqvae.device), force_not_quantize=True, shape=shape).sample.float()
        if self.settings.image_range == "-1,1":
            images = (images + 1) / 2
        arrays = (images.clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
        return [Image.fromarray(a) for a in arrays]


# -------------------------------------------------------------------------------------- loading
def load_transformer(folder: str | os.PathLike, dtype: torch.dtype | str | None = None) -> MeissonicTransformer:
    """Load `transformer/`: an official/mgtq float folder, or an mgtq quantized checkpoint."""
    folder = _existing_dir(folder, "transformer")
    if checkpoint.is_quantized(folder):
        return checkpoint.load(folder, dtype=dtype)
    config_path = folder / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{folder} has no config.json; is it a diffusers-layout transformer folder?")
    return load_component(MeissonicTransformer, folder, dtype)


def load_component(cls, folder: str | os.PathLike, dtype: torch.dtype | None = None):
    """`cls.from_pretrained` of a local folder, safetensors only; failures become one-line ValueErrors."""
    folder = Path(folder)
    if not any(folder.glob("*.safetensors")):
        found = sorted(p.name for p in folder.iterdir() if p.is_file())
        raise FileNotFoundError(f"{folder} has no .safetensors weights (found {found}); mgtq loads safetensors "
                                "only, never pickle files: convert the weights to safetensors")
    kwargs = {"local_files_only": True, "use_safetensors": True}
    if dtype is not None:  # diffusers calls it torch_dtype, transformers dtype
        kwargs["dtype" if cls is CLIPTextModelWithProjection else "torch_dtype"] = dtype
    check_files(folder)  # damaged weights, a deep or oversized config.json: named before anything is built
    try:
        model = cls.from_pretrained(folder, **kwargs)
    except (RuntimeError, ValueError, OSError, TypeError) as err:
        what = {"MeissonicTransformer": "transformer", "VQModel": "VQ model"}.get(cls.__name__, "text encoder")
        raise ValueError(
            f"could not load the {what} in {folder} ({cls.__name__}): its config.json does not match its weights "
            f"or the weights are damaged ({str(err).strip().splitlines()[0][:300] if str(err).strip() else err!r}); "
            "fix config.json or re-create the folder"
        ) from None
    check_loaded(model, folder)  # missing, unexpected and non-finite tensors are errors naming file and key
    return model


def _existing_dir(path, what: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(
            f"{what} folder {str(p)!r} does not exist. mgtq loads local folders only (no hub downloads): "
            "download the model yourself and pass its local path."
        )
    return p


def set_default_sampler(path: str | os.PathLike, sampler: SamplerConfig) -> None:
    """Make `sampler` the default of the mgtq pipeline folder `path` (its model_index.json), atomically.

    For settings chosen after training (e.g. CFG on a validation split); weights are untouched.
    """
    root = _existing_dir(path, "pipeline")
    index_path = root / "model_index.json"
    index = read_json(index_path) if index_path.exists() else {}
    if "mgtq" not in index:
        raise ValueError(f"{str(root)!r} is not an mgtq pipeline folder (no 'mgtq' settings in model_index.json); "
                         "save it with MGTPipeline.save_pretrained first")
    settings = _settings(index["mgtq"], index_path)  # validates what is there before rewriting it
    settings.sampler = sampler
    index["mgtq"] = settings.to_dict()
    write_json(index_path, index)


def read_settings(root: str | os.PathLike) -> PipelineSettings:
    """The settings a pipeline folder stores (model_index.json "mgtq"); an official Meissonic folder's
    otherwise (its scheduler's mask schedule, the step-index timestep convention)."""
    root = Path(root)
    index = read_json(root / "model_index.json") if (root / "model_index.json").exists() else {}
    check_index(index, root / "model_index.json")  # a JSON object; its resolution within mgtq.limits
    if "mgtq" in index:
        return _settings(index["mgtq"], root / "model_index.json")
    # An official Meissonic folder: its pipeline feeds the reversed step index as timestep.
    sched = root / "scheduler" / "scheduler_config.json"
    schedule = read_json(sched).get("masking_schedule", "cosine") if sched.exists() else "cosine"
    return PipelineSettings(sampler=SamplerConfig(schedule=schedule, timestep_convention="step_index"))


def _settings(data, path: Path) -> PipelineSettings:
    try:
        return from_mapping(PipelineSettings, data, "mgtq")
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def _load_text_encoder(root: Path, text_encoder, dtype):
    if isinstance(text_encoder, torch.nn.Module):
        return text_encoder
    folder = Path(text_encoder) if text_encoder is not None else root / "text_encoder"
    if not folder.is_dir():
        raise FileNotFoundError(
            f"no text encoder at {folder}. The official Meissonic setup keeps CLIP ViT-H/14 in a separate "
            "folder: pass text_encoder=PATH (CLI: --text-encoder PATH) to a local CLIPTextModelWithProjection."
        )
    return load_component(CLIPTextModelWithProjection, folder, dtype)


def _load_tokenizer(root: Path, tokenizer):
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    folder = Path(tokenizer) if tokenizer is not None else root / "tokenizer"
    if not folder.is_dir():
        raise FileNotFoundError(f"no tokenizer at {folder}; pass tokenizer=PATH to a local CLIPTokenizer folder")
    return CLIPTokenizer.from_pretrained(folder, local_files_only=True)


def _broadcast_negative(negative_prompt, prompts: list[str], per_prompt: int) -> list[str]:
    if negative_prompt is None:
        return [""] * len(prompts)
    if isinstance(negative_prompt, str):
        return [negative_prompt] * len(prompts)
    negs = [n for n in negative_prompt for _ in range(per_prompt)]
    if len(negs) != len(prompts):
        raise ValueError(f"got {len(negative_prompt)} negative prompts for {len(prompts) // per_prompt} prompts")
    return negs


def _check_compatible(pipe: MGTPipeline) -> None:
    t, te, vq = pipe.transformer.config, pipe.text_encoder.config, pipe.vqvae.config
    if te.hidden_size != t.joint_attention_dim:
        raise ValueError(f"text encoder width {te.hidden_size} ≠ transformer joint_attention_dim {t.joint_attention_dim}")
    if te.projection_dim != t.pooled_projection_dim:
        raise ValueError(f"text projection {te.projection_dim} ≠ transformer pooled_projection_dim {t.pooled_projection_dim}")
    if vq.num_vq_embeddings != t.codebook_size:
        raise ValueError(f"VQ codebook {vq.num_vq_embeddings} ≠ transformer codebook_size {t.codebook_size}")
    if not vq.lookup_from_codebook:
        raise ValueError("the VQModel must have lookup_from_codebook=True to decode token ids")


def load(path: str | os.PathLike, **kwargs) -> MGTPipeline:
    """Load any mgtq or Meissonic pipeline folder (float or quantized), ready to generate."""
    return MGTPipeline.from_pretrained(path, **kwargs)

