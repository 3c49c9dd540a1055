"""MGTPipeline: text → tokens (MaskGIT sampler over MeissonicTransformer) → image (VQ decoder).

Thin orchestration over real components: a diffusers `VQModel`, a transformers
`CLIPTextModelWithProjection` + `CLIPTokenizer`, and mgtq's `MeissonicTransformer` (float or
quantized). Reads the official Meissonic folder layout and mgtq's own checkpoints, offline only.

A `diffusers.DiffusionPipeline` (like aMUSEd's): users get its offload, progress-bar, `components` and
`to` habits for free, while `from_pretrained` / `save_pretrained` stay mgtq's own (local, safetensors
only, quantized transformers through `mgtq.quantization.checkpoint`).
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Literal

import numpy as np
import torch
from diffusers import DiffusionPipeline, VQModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import BaseOutput
from PIL import Image
from transformers import CLIPTextModelWithProjection, CLIPTokenizer

from mgtq.compilation import compile_in_place
from mgtq.components import (CHECKSUMS_KEY, SAFETENSORS_FLOATS, BadComponent, check_checksums, check_files,
                             check_index, check_loaded, check_recorded, check_recorded_settings, pipeline_checksums,
                             record_settings, stored_headers, verified_files)
from mgtq.config import from_mapping, plain_scalar, validate
from mgtq.dtypes import DTYPE_NAMES, parse_dtype
from mgtq.files import atomic_entries, read_json, write_json
from mgtq.finite import non_finite_tensor
from mgtq.hashing import hashed_ahead
from mgtq.models.hooks import EveryToken
from mgtq.models.transformer import MeissonicTransformer
from mgtq.modules import cast_module, unwrapped
from mgtq.quantization import checkpoint
from mgtq.sampling import SampleResult, SamplerConfig, SamplerHooks, StartState, classifier_free_guidance, sample
from mgtq.sampling.config import flatten_overrides
from mgtq.seeding import per_sample_generators
from mgtq.vq import vq_factor


@dataclass
class PipelineSettings:
    """What a checkpoint says about how to run it (stored under "mgtq" in model_index.json).

    sampler: default SamplerConfig; resolution: default image side in pixels; image_range: value
    range of the VQ decoder's output ("0,1" as Meissonic's VQ, or "-1,1"); aesthetic_score: the
    fifth micro-condition.
    """

    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    resolution: int = 1024
    image_range: Literal["0,1", "-1,1"] = "0,1"
    aesthetic_score: float = 6.0

    def __post_init__(self):
        validate(self, "mgtq")
        if self.resolution <= 0:
            raise ValueError(f"resolution must be positive, got {self.resolution}")

    def __setattr__(self, name, value):
        # A checkpoint says which timestep convention its model takes: a sampler set without one (a class-made
        # SamplerConfig, set_default_sampler's) keeps the one these settings had (the official one at first).
        if name == "sampler" and isinstance(value, SamplerConfig) and value.timestep_convention is None:
            current = getattr(self, "sampler", None)
            value = value.replace(timestep_convention=current.convention if current is not None else "step_index")
        super().__setattr__(name, value)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["sampler"] = self.sampler.to_dict()
        return d


OUTPUT_TYPES = ("pil", "np", "pt", "latent")
SEED_LIMIT = 2**63


@dataclass
class MGTPipelineOutput(BaseOutput):
    """images: PIL images ("pil"), an array (B, H, W, 3) in [0, 1] ("np"), a tensor (B, 3, H, W) in [0, 1]
    ("pt") or the token ids (B, h, w) ("latent"); tokens: the VQ token ids (B, h, w); nfe: transformer
    calls of the sampler (a CFG call, uncond+cond in one batch, counts once); local_nfe: how many of
    them were local steps of context reuse; token_nfe: the calls counted by the image tokens they
    computed (mgtq.sampling.maskgit.SampleResult)."""

    images: list[Image.Image] | np.ndarray | torch.Tensor
    tokens: torch.Tensor
    nfe: int = 0
    local_nfe: int = 0
    token_nfe: float = 0.0


@dataclass(frozen=True)
class SamplingRun:
    """What one pipeline call samples with: `batch` images (prompts × images per prompt), the sampler `config`
    after the call's overrides, the token `grid` (h, w), one generator per image, the guided `model_fn`
    (MGTPipeline.guided_model_fn) and the `device` it runs on."""

    batch: int
    config: SamplerConfig
    grid: tuple[int, int]
    generators: list[torch.Generator]
    model_fn: Callable
    device: torch.device


class MGTPipeline(DiffusionPipeline):
    """Text-to-image pipeline of a masked generative transformer (Meissonic family)."""

    model_cpu_offload_seq = "text_encoder->transformer->vqvae"
    # What `callback_on_step_end` may read and replace at the end of a step.
    _callback_tensor_inputs = ["tokens"]

    def __init__(
        self,
        transformer: MeissonicTransformer,
        vqvae: VQModel,
        text_encoder: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        settings: PipelineSettings | None = None,
    ):
        super().__init__()
        self.register_modules(transformer=transformer, vqvae=vqvae, text_encoder=text_encoder, tokenizer=tokenizer)
        self.settings = settings or PipelineSettings()
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor, do_normalize=False)
        _check_compatible(self)

    # ------------------------------------------------------------------------------- properties
    @property
    def components(self) -> dict:
        """diffusers' components (the four modules, shared) plus a copy of the settings: diffusers' idiom for
        sharing weights, `MGTInpaintPipeline(**pipe.components)`, then samples with this checkpoint's settings
        (resolution, image range, sampler and timestep convention) instead of the official defaults."""
        return {**super().components, "settings": dataclasses.replace(self.settings)}

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per VQ token side: 2^(number of VQ encoder blocks − 1) (16 for Meissonic)."""
        return pixels_per_token(self.vqvae.config.block_out_channels, downsample=False)

    @property
    def token_pixels(self) -> int:
        """Pixels per transformer-grid side: the VQ factor × feature compression (32 for Meissonic); image sides
        must be multiples of it."""
        return pixels_per_token(self.vqvae.config.block_out_channels, self.transformer.config.downsample)

    @property
    def device(self) -> torch.device:
        """Where the pipeline computes: an offload hook's execution device, else where the weights are (never
        "meta", whatever hooks or meta-device weights hold)."""
        return self._execution_device

    @property
    def _execution_device(self) -> torch.device:
        # A component may be None for a while (the offloading benchmark frees the transformer before decoding).
        modules = [m for m in (self.transformer, self.text_encoder, self.vqvae) if isinstance(m, torch.nn.Module)]
        for module in modules:
            for sub in module.modules():
                hook = getattr(sub, "_hf_hook", None)
                if getattr(hook, "execution_device", None) is not None:
                    return torch.device(hook.execution_device)
        for module in modules:
            for tensor in [*module.parameters(), *module.buffers()]:
                if tensor.device.type != "meta":
                    return tensor.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        """The transformer's compute dtype (what `.to(dtype)` set; the VQ decoder stays fp32)."""
        return self.transformer.compute_dtype

    def to(self, *args, **kwargs) -> "MGTPipeline":
        """Move components: `.to(device)`, `.to(dtype)`, `.to(device, dtype)` or keywords, as diffusers.

        `dtype` applies to the transformer and text encoder; the VQ decoder stays fp32 (it decodes in
        the dtype it was trained in and is a small part of the memory).
        """
        device, dtype = _device_and_dtype(args, kwargs)
        # Only name what changes: diffusers warns on any dtype= keyword, even None.
        change = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        if not change:
            return self
        if device is not None:
            self._check_weights_held("move it to another device")
        _check_mps_dtype(device or self.device, dtype or self.transformer.dtype)
        for module in (self.transformer, self.text_encoder):
            cast_module(module, **change)
        if device is not None:
            self.vqvae.to(device)
        return self

    def enable_attention_slicing(self, slice_size: str | int | None = "auto") -> None:
        """Not offered (a warning, as diffusers' call would change nothing here): attention runs in fused kernels
        (torch's scaled_dot_product_attention or mgtq's own); for less memory use enable_model_cpu_offload()."""
        if slice_size is None:  # diffusers' disable_attention_slicing(): nothing to say
            return
        warnings.warn("attention slicing changes nothing in mgtq: attention runs in fused kernels (torch's "
                      "scaled_dot_product_attention or mgtq's own); for less memory use enable_model_cpu_offload() "
                      "or enable_sequential_cpu_offload()", stacklevel=2)

    def enable_xformers_memory_efficient_attention(self, attention_op=None) -> None:
        """Not offered (a warning): mgtq's attention does not go through xformers (see enable_attention_slicing)."""
        warnings.warn("mgtq's attention does not use xformers: it runs in fused kernels (torch's "
                      "scaled_dot_product_attention or mgtq's own) already; nothing changed", stacklevel=2)

    def _check_weights_held(self, action: str) -> None:
        """Refuse what needs the weights while sequential offload holds them (on "meta" between forwards)."""
        for name in ("transformer", "text_encoder", "vqvae"):
            if any(getattr(getattr(m, "_hf_hook", None), "offload", False) for m in getattr(self, name).modules()):
                raise RuntimeError(f"the {name}'s weights are held by sequential offload hooks (enable_sequential_"
                                   f"cpu_offload or accelerate.cpu_offload: on 'meta' between forwards), so the "
                                   f"pipeline cannot {action}: call pipe.remove_all_hooks() first, which puts them "
                                   "back")

    def enable_sequential_cpu_offload(self, gpu_id: int | None = None, device: torch.device | str | None = None):
        """diffusers' sequential offload (weights on "meta", each submodule's moved in for its forward). With
        device="cpu" (CPU-only machines, tests) the hooks run on "cpu": accelerate cannot re-offload to "cpu:0"."""
        super().enable_sequential_cpu_offload(gpu_id=gpu_id, device=device)
        self._offload_to_plain_cpu()

    def enable_model_cpu_offload(self, gpu_id: int | None = None, device: torch.device | str | None = None):
        """diffusers' model offload (each component moved in whole for its forward). With device="cpu" the hooks
        and `pipe.device` say "cpu", the device tensors report (diffusers names it "cpu:0")."""
        super().enable_model_cpu_offload(gpu_id=gpu_id, device=device)
        self._offload_to_plain_cpu()

    def _offload_to_plain_cpu(self) -> None:
        """diffusers numbers the offload device, "cpu:0" for the CPU; torch's CPU tensors are on "cpu", which
        accelerate's sequential hooks need to re-offload and which `pipe.device == torch.device("cpu")` compares."""
        if self._offload_device.type != "cpu":
            return
        self._offload_device = torch.device("cpu")
        for module in (self.transformer, self.text_encoder, self.vqvae):
            for sub in module.modules():
                if getattr(getattr(sub, "_hf_hook", None), "execution_device", None) is not None:
                    sub._hf_hook.execution_device = torch.device("cpu")

    def compile(self, regional: bool = True, **kwargs) -> "MGTPipeline":
        """torch.compile the transformer in place (fullgraph: it has no graph breaks; a call under sequential offload
        or layerwise casting, whose hooks Dynamo cannot trace in one graph, compiles without); on first use.

        regional: compile each transformer block (MeissonicTransformer.compile_blocks: minutes less
        compile time on large models); else the whole transformer as one graph. The module objects,
        weights and state-dict keys stay as they are; `kwargs` go to torch.compile.
        """
        if regional:
            self.transformer.compile_blocks(**kwargs)
        else:
            compile_in_place(unwrapped(self.transformer), **kwargs)
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
        transformer: str | os.PathLike | MeissonicTransformer | None = None,
        vqvae: str | os.PathLike | VQModel | None = None,
        device_map: str | torch.device | None = None,
        progress: bool = True,
        **hub_options,
    ) -> "MGTPipeline":
        """Load a pipeline folder: official Meissonic layout or an mgtq checkpoint (float or quantized).

        The folder holds transformer/, vqvae/, tokenizer/, text_encoder/ (the text encoder and
        tokenizer may be given separately, as the official setup loads CLIP ViT-H/14 from its own
        folder; None, unlike diffusers' "skip it", is the folder's own: a call takes prompts, not
        embeddings). Local folders only, safetensors only: nothing is downloaded or unpickled.
        `torch_dtype` applies to the transformer and text encoder; "auto" (or None, the default) keeps the
        dtype each was saved in (`dtype=` is the deprecated spelling). `device_map` ("cpu", "cuda", "cuda:1")
        or `device` places the whole pipeline on one device. A `transformer` or `vqvae` module given
        here is used as is instead of the folder's; a folder path given for one is loaded (and held to the
        checksums of the pipeline folder around it, if any). progress=False hides the weight-loading bars.
        `path` may also name an embedded model ("tiny-shapes", "tiny-shapes-16x16") where no folder of
        that name exists, as a hub id would on diffusers. Of diffusers' hub options, `use_safetensors=True`,
        `local_files_only` and `low_cpu_mem_usage` change nothing here; the others are refused.
        """
        _check_hub_options(hub_options)
        if dtype is not None:
            if torch_dtype is not None:
                raise ValueError("pass torch_dtype only (dtype= is its deprecated spelling), not both")
            warnings.warn("MGTPipeline.from_pretrained(dtype=...) is deprecated; use torch_dtype=... as diffusers",
                          DeprecationWarning, stacklevel=2)
            torch_dtype = dtype
        device = _single_device(device, device_map)
        root = _existing_dir(_embedded_or_path(path), "pipeline")
        # None is "auto" for every component: transformers (v5) loads as saved by default, diffusers in float32;
        # one rule keeps a pipeline in one dtype (a bf16 save used to load with an fp32 transformer beside a bf16
        # text encoder), and a quantized folder loads as saved either way.
        auto = torch_dtype is None or torch_dtype == "auto"
        dtype = None if auto else parse_dtype(torch_dtype)
        given = {name for name, part in (("text_encoder", text_encoder), ("tokenizer", tokenizer), ("vqvae", vqvae),
                                         ("transformer", transformer)) if part is not None}
        # the files the checks below hash, hashed side by side in the background while the unhashed ones load
        with _loading_bars(progress), hashed_ahead(verified_files(root, skip=given)):
            # the other components' recorded files are checked after the transformer loads (which checks its own),
            # before any of them loads: their hashes run meanwhile
            settings = read_settings(root, given, verify=False)
            if not isinstance(transformer, torch.nn.Module):
                folder = _component_folder(transformer, root, "transformer")
                transformer = load_transformer(folder, dtype=saved_dtype(folder) if auto else dtype,
                                               checksums=transformer is not None)
            check_checksums(read_json(root / "model_index.json"), root, given)
            if not isinstance(vqvae, torch.nn.Module):
                vqvae = load_component(VQModel, _component_folder(vqvae, root, "vqvae"), checksums=vqvae is not None)
            text_encoder = _load_text_encoder(root, text_encoder, dtype, auto)
            tokenizer = _load_tokenizer(root, tokenizer)
        pipe = cls(transformer, vqvae, text_encoder, tokenizer, settings)
        pipe.register_to_config(_name_or_path=str(path))  # diffusers' `pipe.name_or_path`
        for module in (transformer, vqvae, text_encoder):
            module.eval()
        return pipe.to(device) if device is not None else pipe

    @classmethod
    def from_pipe(cls, pipeline: MGTPipeline, **kwargs) -> MGTPipeline:
        """A pipeline of this class on `pipeline`'s components (the same module objects: no second copy in
        memory; TomeMGT or compile installed on them apply to both) and a copy of its settings. Keyword
        arguments replace components (`transformer=…`) or the settings (`settings=PipelineSettings(…)`).

        diffusers' `DiffusionPipeline.from_pipe` is not used: without a dtype it casts the new pipeline to
        float32, which on shared modules also casts the pipeline they came from (a bf16 or quantized
        transformer's compute dtype included), and mgtq's settings are not part of the diffusers config it
        copies, so the sibling would sample with defaults instead of the checkpoint's sampler.
        """
        parts = pipeline.components  # the modules and a copy of the settings
        dtype = kwargs.pop("torch_dtype", None)
        if dtype not in (None, "auto") and parse_dtype(dtype) != pipeline.dtype:
            # diffusers' from_pipe casts; here the modules are shared, so a cast would change `pipeline` too
            raise TypeError(f"{cls.__name__}.from_pipe shares {type(pipeline).__name__}'s modules, so it does not cast "
                            f"them to {dtype}: call .to({dtype}) on the pipeline (it casts both), or leave torch_dtype "
                            "out")
        unknown = sorted(set(kwargs) - set(parts))
        if unknown:
            raise TypeError(f"{cls.__name__}.from_pipe takes the components {sorted(parts)} as keyword arguments "
                            f"(and torch_dtype, of the pipeline's own dtype), got {unknown}")
        return cls(**{**parts, **kwargs})

    def save_pretrained(self, path: str | os.PathLike, progress: bool = True, **unused) -> None:
        """Write the pipeline in diffusers layout (safetensors only) so `mgtq.load` reads it back.

        As diffusers' does, it writes into `path` and leaves other files there alone (a model repo's `.git`
        and model card); each part it writes (a component folder, `model_index.json` last) is replaced
        whole by a rename, never half-written. A quantized transformer is written by mgtq's checkpoint writer (`mgtq.quantization.checkpoint`,
        the same bytes as `mgtq export`: manifest, sha256, `quantization_config` in config.json).
        progress=False hides the weight-writing bars.
        """
        _reject_save_options(unused)
        self._check_weights_held("save them")
        transformer = unwrapped(self.transformer)  # pipe.transformer = torch.compile(...): keys without `_orig_mod.`
        for name in ("vqvae", "text_encoder"):  # a save that loads (the transformer's writers check their own)
            _check_finite(unwrapped(getattr(self, name)), name)
        with _loading_bars(progress), atomic_entries(path) as tmp:
            if checkpoint.quantized_layers(transformer):
                checkpoint.save(transformer, checkpoint.describe(transformer), tmp / "transformer")
            else:
                transformer.save_pretrained(tmp / "transformer", safe_serialization=True)
            unwrapped(self.vqvae).save_pretrained(tmp / "vqvae", safe_serialization=True)
            unwrapped(self.text_encoder).save_pretrained(tmp / "text_encoder", safe_serialization=True)
            self.tokenizer.save_pretrained(tmp / "tokenizer")
            write_json(tmp / "scheduler" / "scheduler_config.json", {
                "_class_name": "Scheduler",
                "mask_token_id": self.transformer.mask_token_id,
                "masking_schedule": self.settings.sampler.schedule,
            })
            write_json(tmp / "model_index.json", {
                CHECKSUMS_KEY: pipeline_checksums(tmp, self.settings.to_dict()),
                "_class_name": "MGTPipeline",
                "transformer": ["mgtq", "MeissonicTransformer"],
                "vqvae": ["diffusers", "VQModel"],
                "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "scheduler": ["mgtq", "Scheduler"],
                "mgtq": self.settings.to_dict(),
            })

    def save_config(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs) -> None:
        """Refused: diffusers' `save_config` would write a model_index.json without mgtq's settings and checksums,
        and the folder would then load with the official defaults (1024 px, 48 steps, CFG 9)."""
        raise NotImplementedError(f"{type(self).__name__}.save_config would write model_index.json without mgtq's "
                                  "settings (resolution, sampler); save the pipeline with save_pretrained(DIR), which "
                                  "writes the whole folder")

    # ---------------------------------------------------------------------------------- prompts
    def encode_prompt(self, prompts: list[str], device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """CLIP text features: (encoder_hidden_states (B, L, C) = hidden_states[-2], pooled (B, P))."""
        max_len = self.tokenizer.model_max_length
        for prompt in prompts:
            n = len(self.tokenizer(prompt, truncation=False, verbose=False)["input_ids"])
            if n > max_len:
                warnings.warn(
                    f"prompt has {n} tokens; CLIP reads at most {max_len}, the rest is cut off: {prompt[:60]!r}…",
                    stacklevel=3,
                )
        device = device if device is not None else self._execution_device
        ids = self.tokenizer(prompts, padding="max_length", max_length=max_len, truncation=True,
                             return_tensors="pt").input_ids.to(device)
        out = self.text_encoder(ids, output_hidden_states=True, return_dict=True)
        return out.hidden_states[-2], out.text_embeds

    # ------------------------------------------------------------------------------------- call
    def check_inputs(self, prompt, negative_prompt, height, width, num_images_per_prompt, seed, sampler, output_type,
                     callback_on_step_end_tensor_inputs, token_merging) -> None:
        """Refuse bad arguments before any work, in mgtq's words (diffusers' `check_inputs` habit)."""
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompt must be a str or a list of str, got {_shown(prompt)}")
        if negative_prompt is not None and not isinstance(negative_prompt, str) and not (
                isinstance(negative_prompt, (list, tuple)) and all(isinstance(p, str) for p in negative_prompt)):
            raise TypeError(f"negative_prompt must be None, a str or a list of str, got {_shown(negative_prompt)}")
        if not _is_int(num_images_per_prompt) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be an integer ≥ 1, got {num_images_per_prompt!r}")
        f = self.token_pixels
        for name, side in (("height", height), ("width", width)):
            if side is not None and (not _is_int(side) or side <= 0 or side % f):
                near = max(f, round(side / f) * f) if _is_int(side) else self.settings.resolution
                raise ValueError(f"{name} must be a positive multiple of {f} (VQ factor {self.vae_scale_factor} × "
                                 f"feature compression {self.transformer.grid_factor}; leave it out for the model's "
                                 f"{self.settings.resolution}), got {side!r}; try {near}")
        seeds = seed if isinstance(seed, (list, tuple)) else [seed]
        if seed is not None and not all(_is_int(s) and 0 <= s < SEED_LIMIT for s in seeds):
            raise ValueError(f"seed must be an int in [0, 2**63) (or a list of them), got {seed!r}")
        if sampler is not None and not isinstance(sampler, (SamplerConfig, dict)):
            raise TypeError(f"sampler must be a SamplerConfig (or a mapping of changes to the checkpoint's settings), "
                            f"got {type(sampler).__name__}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {list(OUTPUT_TYPES)}, got {output_type!r}")
        unknown = [n for n in callback_on_step_end_tensor_inputs if n not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs may name {self._callback_tensor_inputs}, got {unknown}")
        _merging_plan(token_merging)

    @torch.no_grad()  # not inference_mode: offload hooks re-wrap Parameters during the call
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
        sampler: SamplerConfig | dict | None = None,
        hooks: SamplerHooks | None = None,
        token_merging=None,
        progress: bool = True,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] = ("tokens",),
    ) -> MGTPipelineOutput | tuple:
        """Generate images. Steps/CFG default to the checkpoint's sampler settings.

        Each image gets its own generator (seed, seed+1, … or the given list), so an image draws the same random
        numbers whatever else is in the batch. The same call gives the same images; a batch of another size can,
        rarely, give an image with other tokens: the GEMMs round differently with their row count, and a near-tie
        in the sampler's ranking then falls the other way.

        sampler: a SamplerConfig, or a mapping of changes to the checkpoint's settings ({"noise": {"scale": 2.0}},
        `sampler_config`); default the checkpoint's. token_merging: TomeMGT for this call only, a `TomeConfig`, a
        ratio (a TomeConfig with that ratio; 0 merges nothing, even where a plan is installed) or a `TomePlan`;
        default the one `apply_tomemgt` installed.
        output_type: "pil", "np" (B, H, W, 3) in [0, 1], "pt" (B, 3, H, W) in [0, 1] or "latent" (the token
        ids, no VQ decoding). return_dict=False returns `(images,)`. callback_on_step_end(pipe, step,
        timestep, callback_kwargs) runs after every sampler step with {name: tensor} of
        `callback_on_step_end_tensor_inputs` ("tokens": (B, h, w) ids, a copy) and returns that dict, whose
        tokens (changed in place or replaced) the sampler goes on from; timestep is the one the model saw, a 0-d
        tensor (a (B,) one where the samples' differ: inpainting with a mask per prompt). To stop a call early,
        raise from the callback: an MGT has no partial image to return (undecoded tokens are [MASK]), so diffusers'
        `pipe._interrupt` is not read.
        progress=False (or `set_progress_bar_config(disable=True)`) hides the sampler's bar.
        """
        output_type = self._resolve_output_type(output_type)
        self.check_inputs(prompt, negative_prompt, height, width, num_images_per_prompt, seed, sampler, output_type,
                          callback_on_step_end_tensor_inputs, token_merging)
        height = self.settings.resolution if height is None else height
        width = self.settings.resolution if width is None else width
        run = self._prepare_sampling(prompt, height, width, negative_prompt=negative_prompt,
                                     num_images_per_prompt=num_images_per_prompt,
                                     num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                     generator=generator, seed=seed, micro_conds=micro_conds, sampler=sampler,
                                     token_merging=token_merging)
        result = self._run_sampler(run, hooks=hooks, progress=progress, callback_on_step_end=callback_on_step_end,
                                   callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs)
        return self._finish(result, output_type, return_dict)

    @staticmethod
    def _resolve_output_type(output_type: str) -> str:
        """diffusers' output_type of a call; mgtq's old "tokens" is "latent" (deprecated spelling)."""
        if output_type == "tokens":
            warnings.warn('output_type="tokens" is deprecated; use diffusers\' "latent" (the token ids, no decoding)',
                          DeprecationWarning, stacklevel=4)  # the caller of the pipeline, past __call__ and no_grad
            return "latent"
        return output_type

    def _size_advice(self, side: int) -> str:
        """How a caller gets an image whose sides are multiples of `side` (text-to-image: the size asked for)."""
        return f"use a width and height that are multiples of {side}"

    def token_merging_config(self, token_merging=None):
        """The TomeMGT settings (a TomeConfig) a call with this `token_merging` runs: the call's, else those of the
        plan `apply_tomemgt` installed; None where nothing merges."""
        plan = _merging_plan(token_merging)
        if plan is None:
            plan = getattr(unwrapped(self.transformer), "token_hook", None)
        config = getattr(plan, "config", None)
        return config if config is not None and config.ratio > 0 else None

    # The steps of a call, shared by text-to-image and the editing pipelines (mgtq.editing), which differ
    # only in the inputs they check and the sampler's start state.
    def sampler_config(self, sampler: SamplerConfig | dict | None = None) -> SamplerConfig:
        """The SamplerConfig a call runs: the pipeline's settings, `sampler` in their place, or a dict of changes
        to them (nested or dotted: {"noise": {"scale": 2.0}}, {"noise.scale": 2.0}), as the CLI's
        --sampler-config FILE. The model's timestep convention where `sampler` leaves it None: it is the model's
        input, not a sampling choice, and another one feeds it values it never saw."""
        base = self.settings.sampler
        if sampler is None:
            return base
        config = base.with_overrides(flatten_overrides(sampler)) if isinstance(sampler, dict) else sampler
        if config.timestep_convention is None:
            config = config.replace(timestep_convention=base.timestep_convention)
        return config

    def _prepare_sampling(self, prompt, height: int, width: int, *, negative_prompt=None, num_images_per_prompt=1,
                          num_inference_steps=None, guidance_scale=None, generator=None, seed=None, micro_conds=None,
                          sampler=None, token_merging=None, merge_area=None) -> SamplingRun:
        """The prompts repeated per image, the call's sampler config, one generator per image (seed, seed+1,
        … or the given ones) and the guided model function on the encoded prompts; inputs already checked."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        config = self.sampler_config(sampler)
        overrides = {k: v for k, v in (("num_steps", num_inference_steps), ("guidance_scale", guidance_scale)) if v is not None}
        config = config.replace(**overrides) if overrides else config
        grid = self.token_grid(height, width)
        if config.reuse.enabled and config.reuse.group == "cells" and (grid[0] % 2 or grid[1] % 2):
            side = 2 * self.vae_scale_factor
            raise ValueError(f"context reuse's group 'cells' decodes 2×2 token cells, which a {width}×{height} image "
                             f"({grid[1]}×{grid[0]} tokens) does not tile: {self._size_advice(side)}, or the group "
                             "'confidence' (CLI: --reuse-group confidence; Python: "
                             "sampler=config.with_overrides({'reuse.group': 'confidence'}))")
        device = self._execution_device
        generators = per_sample_generators(len(prompts), seed=seed, generator=generator, device=device)

        text, pooled = self.encode_prompt(prompts, device)
        negative = None
        if config.needs_unconditional:  # CFG, or masked Z-sampling's inversion pass
            negative = self.encode_prompt(_broadcast_negative(negative_prompt, prompts, num_images_per_prompt), device)
        if micro_conds is None:
            micro_conds = micro_conditions(width, height, self.settings.aesthetic_score)
        micro_conds = micro_conds.to(device).reshape(-1, 5)
        plan = _merging_plan(token_merging)
        if merge_area is not None:  # editing: TomeMGT's masked fraction over the area the call repaints
            hook = plan if plan is not None else getattr(unwrapped(self.transformer), "token_hook", None)
            plan = hook.within(merge_area.to(device)) if hasattr(hook, "within") else plan
        model_fn = self.guided_model_fn(text, pooled, micro_conds, config, plan, negative=negative)
        return SamplingRun(len(prompts), config, grid, generators, model_fn, device)

    def _run_sampler(self, run: SamplingRun, start: StartState | None = None, hooks: SamplerHooks | None = None,
                     progress: bool = True, callback_on_step_end=None,
                     callback_on_step_end_tensor_inputs=("tokens",)) -> SampleResult:
        """The sampler from the all-mask grid, or from `start` (editing: mgtq.sampling.start)."""
        model_fn, callback = self._step_callback(run.model_fn, callback_on_step_end,
                                                 list(callback_on_step_end_tensor_inputs))
        progress = progress and not getattr(self, "_progress_bar_config", {}).get("disable", False)
        try:
            return sample(model_fn, run.batch, run.grid, self.transformer.mask_token_id, run.config, run.generators,
                          device=run.device, hooks=hooks, progress=progress, callback=callback, return_info=True,
                          start=start)
        except FloatingPointError:
            # the sampler blames the guidance or noise scale; damaged weights (a module passed in, never checked
            # by a load) are the likelier cause, and one pass over them, on this error only, tells
            for name in ("transformer", "text_encoder"):
                key = non_finite_tensor(unwrapped(getattr(self, name)))
                if key is not None:
                    raise FloatingPointError(f"the {name}'s tensor {key!r} holds NaN or infinite values, so the "
                                             "logits are not finite; load undamaged weights") from None
            raise

    def _finish(self, result: SampleResult, output_type: str, return_dict: bool) -> MGTPipelineOutput | tuple:
        """Decode by output_type, put offloaded models back (diffusers' maybe_free_model_hooks) and wrap."""
        images = result.tokens if output_type == "latent" else self.decode_tokens(result.tokens, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return MGTPipelineOutput(images=images, tokens=result.tokens, nfe=result.nfe, local_nfe=result.local_nfe,
                                 token_nfe=result.token_nfe)

    def _step_callback(self, model_fn, callback_on_step_end, names: list[str]):
        """(model_fn, sampler callback) that give diffusers' callback_on_step_end(pipe, step, timestep, kwargs)
        the step's tokens (a copy) and the timestep the model saw (`_callback_timestep`); the tokens it returns (or
        the copy, changed in place) become the sampler's."""
        if callback_on_step_end is None:
            return model_fn, None
        seen = {}

        def recording_model_fn(tokens, timestep, *args, **kwargs):
            seen["timestep"] = timestep
            return model_fn(tokens, timestep, *args, **kwargs)

        def callback(step: int, tokens: torch.Tensor) -> None:
            with torch.inference_mode(False):  # the sampler's state is an inference tensor; hand over a plain copy
                given = tokens.clone()
            out = callback_on_step_end(self, step, _callback_timestep(seen.get("timestep")), {n: given for n in names})
            if out is None or not isinstance(out, dict):
                raise TypeError("callback_on_step_end must return a dict (the callback_kwargs it got, changed or "
                                f"not), as in diffusers; it returned {type(out).__name__}")
            new = out.get("tokens", given)
            if (not isinstance(new, torch.Tensor) or new.shape != tokens.shape or new.dtype.is_floating_point
                    or new.dtype.is_complex or new.dtype == torch.bool):
                what = f"{tuple(new.shape)} {new.dtype}" if isinstance(new, torch.Tensor) else type(new).__name__
                raise ValueError(f"callback_on_step_end returned tokens {what}; return integer token ids of the shape "
                                 f"it was given, {tuple(tokens.shape)}")
            tokens.copy_(new)  # into the sampler's state (changed in place or returned): the next step starts from it

        return recording_model_fn, callback

    def token_grid(self, height: int, width: int) -> tuple[int, int]:
        """Token grid (h, w) for an image of height×width pixels; errors name valid sizes."""
        f = self.token_pixels
        if height % f or width % f or height <= 0 or width <= 0:
            raise ValueError(
                f"height and width must be positive multiples of {f} (VQ factor {self.vae_scale_factor} × "
                f"feature compression {self.transformer.grid_factor}); got {height}×{width}, "
                f"try {max(f, round(height / f) * f)}×{max(f, round(width / f) * f)}"
            )
        return height // self.vae_scale_factor, width // self.vae_scale_factor

    def guided_model_fn(self, text, pooled, micro_conds, config: SamplerConfig, token_hook=None, negative=None):
        """model_fn(tokens (B,h,w), timestep (B,), guidance_scale=None, token_hook=None) → guided logits (B, V, h, w).

        text/pooled: the prompts' features (B, …); negative: the negative prompts' (text, pooled) or
        None; micro_conds: (1 or B, 5). Without guidance_scale the call is the configured sampler's
        (CFG when config.use_cfg, batch [uncond, cond]); an explicit guidance_scale s (masked
        Z-sampling's inversion CFG) is literal, ℓu + s(ℓc − ℓu), and runs only the branches it needs.
        token_hook: the transformer's token hook for every call (TomeMGT); a per-call token_hook replaces
        it, except context reuse's (the sampler's), whose full steps run it inside (`around`).
        """
        transformer = self.transformer
        per_call_hook = token_hook
        inner_hook = token_hook if token_hook is not None else getattr(transformer, "token_hook", None)
        dtype = transformer.compute_dtype
        cond = (text.to(dtype), pooled.to(dtype))
        uncond = None if negative is None else (negative[0].to(dtype), negative[1].to(dtype))

        if micro_conds.shape[0] not in (1, text.shape[0]):
            raise ValueError(f"micro_conds must have 1 or {text.shape[0]} (one per image) rows of 5, "
                             f"got {tuple(micro_conds.shape)}")

        def forward(tokens, timestep, features, hook):
            text_b, pooled_b = features
            n = text_b.shape[0]  # B, or 2B for [uncond, cond]
            rows = micro_conds.shape[0]
            micro = micro_conds.expand(n, 5) if rows == 1 else micro_conds.repeat(n // rows, 1)
            return transformer(hidden_states=tokens, encoder_hidden_states=text_b, pooled_projections=pooled_b,
                               timestep=timestep, micro_conds=micro, token_hook=hook)

        def model_fn(tokens: torch.Tensor, timestep: torch.Tensor, guidance_scale: float | None = None,
                     token_hook=None) -> torch.Tensor:
            hook = per_call_hook if token_hook is None else token_hook
            if token_hook is not None and inner_hook is not None and hasattr(token_hook, "around"):
                hook = token_hook.around(inner_hook)  # context reuse's step, with TomeMGT inside its full steps
            scale = config.guidance_scale if guidance_scale is None else float(guidance_scale)
            guided = config.use_cfg if guidance_scale is None else scale != 1.0
            if not guided:
                return forward(tokens, timestep, cond, hook).float()
            if uncond is None:
                raise ValueError(f"guidance scale {scale} needs the unconditional branch, but no negative prompt "
                                 "features were given to guided_model_fn")
            if scale == 0.0:  # ℓu + 0·(ℓc − ℓu) = ℓu: skip the conditional branch
                return forward(tokens, timestep, uncond, hook).float()
            both = (torch.cat([uncond[0], cond[0]]), torch.cat([uncond[1], cond[1]]))
            logits = forward(torch.cat([tokens, tokens]), torch.cat([timestep, timestep]), both, hook)
            uncond_logits, cond_logits = logits.chunk(2)
            return classifier_free_guidance(uncond_logits, cond_logits, scale)

        return model_fn

    @torch.no_grad()  # not inference_mode: offload hooks re-wrap Parameters during the call
    def decode_tokens(self, tokens: torch.Tensor, output_type: str = "pil"):
        """VQ-decode token ids (B, h, w) by codebook lookup: PIL images, or "np" / "pt" as in __call__."""
        b, h, w = tokens.shape
        shape = (b, h, w, self.vqvae.config.latent_channels)
        images = self.vqvae.decode(tokens.to(self._execution_device), force_not_quantize=True, shape=shape).sample.float()
        if self.settings.image_range == "-1,1":
            images = (images + 1) / 2
        return self.image_processor.postprocess(images.clamp(0, 1), output_type=output_type)


# ----------------------------------------------------------------------------- micro-conditions
def _check_mps_dtype(device: str | torch.device, dtype: torch.dtype) -> None:
    """Refuse bfloat16 on Apple's mps before macOS 14, which lacks it (torch's own error names neither way out)."""
    if (torch.device(device).type == "mps" and dtype == torch.bfloat16
            and not torch.backends.mps.is_macos_or_newer(14, 0)):
        raise ValueError("bfloat16 on mps needs macOS 14 or newer: load with torch_dtype=torch.float16 (or float32), "
                         "or update macOS")


def micro_conditions(width: int, height: int, aesthetic_score: float = 6.0, crop_top: int = 0,
                     crop_left: int = 0, device: str | torch.device = "cpu") -> torch.Tensor:
    """Meissonic's micro-conditions (1, 5): [orig_w, orig_h, crop_top, crop_left, aesthetic score]."""
    return torch.tensor([[width, height, crop_top, crop_left, aesthetic_score]], dtype=torch.float32, device=device)


# -------------------------------------------------------------------------------------- loading
def pixels_per_token(block_out_channels, downsample: bool) -> int:
    """Pixels per token side, from the configs alone: the VQ's factor (mgtq.vq.vq_factor), × 2 with the
    transformer's feature compression (`downsample`)."""
    return vq_factor(block_out_channels) * (2 if downsample else 1)


def folder_pixels_per_token(folder: str | os.PathLike) -> int:
    """pixels_per_token of a pipeline folder from its vqvae/ and transformer/ config files, no weights read (so a
    size can be checked before a load); a transformer config without `downsample` has MeissonicTransformer's
    default. OSError, ValueError or KeyError where the configs do not read."""
    folder = Path(folder)
    channels = read_json(folder / "vqvae" / "config.json")["block_out_channels"]
    downsample = read_json(folder / "transformer" / "config.json").get("downsample", _TRANSFORMER_DOWNSAMPLE)
    return pixels_per_token(channels, downsample)


_TRANSFORMER_DOWNSAMPLE = inspect.signature(MeissonicTransformer.__init__).parameters["downsample"].default


def _callback_timestep(timestep: torch.Tensor | None) -> torch.Tensor | None:
    """The step's timestep as diffusers' callbacks get it, one 0-d tensor (`if t < 500:` works for any batch),
    where every sample saw the same; (B,) where they differ (inpainting with a mask of its own per prompt)."""
    if timestep is None or timestep.ndim == 0 or not bool((timestep == timestep.reshape(-1)[0]).all()):
        return timestep
    return timestep.reshape(-1)[0].clone()


def _check_finite(module: torch.nn.Module, name: str) -> None:
    """Refuse to save a component holding NaN or infinite values, naming the tensor: a load would refuse it."""
    key = non_finite_tensor(module)
    if key is not None:
        raise ValueError(f"{name}: tensor {key!r} holds NaN or infinite values, which a load of the saved folder "
                         "would refuse; nothing was written: find what damaged the weights and save a good copy")


def load_transformer(folder: str | os.PathLike, dtype: torch.dtype | str | None = None,
                     checksums: bool = True) -> MeissonicTransformer:
    """Load `transformer/`: an official/mgtq float folder, or an mgtq quantized checkpoint. checksums: hold it to
    those its pipeline folder records (`load_component`)."""
    folder = _existing_dir(folder, "transformer")
    if checkpoint.is_quantized(folder):
        if checksums:
            check_recorded(folder)
        return checkpoint.load(folder, MeissonicTransformer, dtype=dtype)
    config_path = folder / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{folder} has no config.json; is it a diffusers-layout transformer folder?")
    return load_component(MeissonicTransformer, folder, dtype, checksums)


def load_component(cls, folder: str | os.PathLike, dtype: torch.dtype | None = None, checksums: bool = True):
    """`cls.from_pretrained` of a local folder, safetensors only; failures become one-line ValueErrors.
    checksums: hold the folder to those the pipeline folder around it records (`components.check_recorded`);
    False for a caller that checks them itself."""
    folder = Path(folder)
    if not any(folder.glob("*.safetensors")):
        found = sorted(p.name for p in folder.iterdir() if p.is_file())
        raise FileNotFoundError(f"{folder} has no .safetensors weights (found {found}); mgtq loads safetensors "
                                "only, never pickle files: convert the weights to safetensors")
    kwargs = {"local_files_only": True, "use_safetensors": True}
    if dtype is not None:  # diffusers calls it torch_dtype, transformers dtype
        kwargs["dtype" if cls is CLIPTextModelWithProjection else "torch_dtype"] = dtype
    # MeissonicTransformer.from_pretrained runs the checks itself (users call it directly too)
    checked = cls is MeissonicTransformer
    if checked:
        kwargs["checksums"] = checksums
    else:
        if checksums:
            check_recorded(folder)
        check_files(folder)  # damaged weights, a deep or oversized config.json: named before anything is built
    try:
        model = cls.from_pretrained(folder, **kwargs)
    except BadComponent:
        raise
    except (RuntimeError, ValueError, OSError, TypeError) as err:
        what = {"MeissonicTransformer": "transformer", "VQModel": "VQ model"}.get(cls.__name__, "text encoder")
        raise ValueError(
            f"could not load the {what} in {folder} ({cls.__name__}): its config.json does not match its weights "
            f"or the weights are damaged ({str(err).strip().splitlines()[0][:300] if str(err).strip() else err!r}); "
            "fix config.json or re-create the folder"
        ) from None
    if not checked:
        check_loaded(model, folder)  # missing, unexpected and non-finite tensors are errors naming file and key
    return model


def _component_folder(given, root: Path, name: str) -> Path:
    """The folder to load component `name` from: a path given for it, else the pipeline folder's own."""
    if given is not None and not isinstance(given, (str, os.PathLike)):
        raise TypeError(f"{name}= takes a loaded module or a folder path, got {_shown(given)}")
    return _existing_dir(root / name if given is None else given, name)


# diffusers' from_pretrained options that ask for what mgtq does anyway (local safetensors files)
_HUB_NO_OPS = {"use_safetensors", "local_files_only", "low_cpu_mem_usage"}


def _check_hub_options(options: dict) -> None:
    """diffusers' download and variant options are errors that say what to do, never silently ignored."""
    if options.get("use_safetensors", True) is False:
        raise ValueError("mgtq loads safetensors only, never pickle files; leave use_safetensors out (or pass True)")
    # None and False ask for nothing (diffusers' own defaults, as a wrapper passes them on)
    bad = sorted(k for k, v in options.items() if k not in _HUB_NO_OPS and v is not None and v is not False)
    if bad:
        raise TypeError(f"mgtq's from_pretrained loads a local folder (safetensors, no variants or revisions) "
                        f"and does not take {bad}: download a hub model with "
                        "huggingface_hub.snapshot_download(repo_id) and pass the folder it returns")


def _embedded_or_path(path: str | os.PathLike) -> str | os.PathLike:
    """An embedded model's folder for its name when no folder of that name exists; else `path` as given."""
    from mgtq.default_model import EMBEDDED_MODELS, model_folder

    return model_folder(path) if str(path) in EMBEDDED_MODELS and not Path(path).is_dir() else path


def _existing_dir(path, what: str) -> Path:
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise NotADirectoryError(f"{what} folder {str(p)!r} is a file, not a folder; pass the folder that holds "
                                 f"the {what}'s config and weights")
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
    check_recorded_settings(index, index_path)  # a hand edit is refused, never recorded as the folder's own
    settings = _settings(index["mgtq"], index_path)  # validates what is there before rewriting it
    settings.sampler = sampler
    index["mgtq"] = settings.to_dict()
    write_json(index_path, record_settings(index))


def read_settings(root: str | os.PathLike, provided: Iterable[str] = (), verify: bool = True) -> PipelineSettings:
    """The settings a pipeline folder stores (model_index.json "mgtq"); an official Meissonic folder's
    otherwise (its scheduler's mask schedule, the step-index timestep convention). verify: also check the files
    its model_index.json records (`check_checksums`); a caller that does not must check them before it loads them."""
    root = Path(root)
    path = root / "model_index.json"
    if not path.exists():
        # Official and mgtq folders both have one; without it the official defaults (1024 px, 48 steps, CFG 9)
        # would silently apply to whatever model the folder holds.
        if (root / "config.json").is_file() and not (root / "transformer").exists():
            raise FileNotFoundError(f"{root} is a component folder (a config.json, no model_index.json): pass the "
                                    f"pipeline folder that holds it ({root.parent}), or load a transformer alone with "
                                    "MeissonicTransformer.from_pretrained")
        raise FileNotFoundError(f"{root} has no model_index.json; every pipeline folder (official Meissonic or "
                                "mgtq's) has one: restore it, or re-create the folder (save_pretrained, mgtq export)")
    index = read_json(path)
    check_index(index, path)  # a JSON object; its resolution within mgtq.limits
    if verify:
        check_checksums(index, root, provided)  # what an mgtq writer put beside the transformer is what it wrote
    if "mgtq" in index:
        return _settings(index["mgtq"], path)
    if (root / "transformer").is_dir() and checkpoint.is_quantized(root / "transformer"):
        raise ValueError(f"{path} has no 'mgtq' settings, but {root / 'transformer'} is an mgtq quantized checkpoint, "
                         "whose folder always has them (resolution, sampler): restore the file or re-export")
    check_recorded_settings(index, path)  # settings its checksums record: "lost", in those words
    if _written_by_mgtq(index):  # e.g. rewritten by diffusers' save_config: the official defaults would not fit it
        raise ValueError(f"{path} names mgtq's classes but has no 'mgtq' settings (resolution, sampler), which every "
                         "folder mgtq writes has: restore the file, or re-save the pipeline with save_pretrained")
    # An official Meissonic folder: its pipeline feeds the reversed step index as timestep.
    sched = root / "scheduler" / "scheduler_config.json"
    schedule = read_json(sched).get("masking_schedule", "cosine") if sched.exists() else "cosine"
    return PipelineSettings(sampler=SamplerConfig(schedule=schedule, timestep_convention="step_index"))


def _written_by_mgtq(index: dict) -> bool:
    """Whether a model_index.json names mgtq's pipeline or component classes (an official Meissonic one does not)."""
    entries = [v for v in index.values() if isinstance(v, list) and len(v) == 2 and isinstance(v[0], str)]
    return str(index.get("_class_name", "")).startswith("MGT") or any(
        library == "mgtq" or library.startswith("mgtq.") for library, _ in entries)


def _settings(data, path: Path) -> PipelineSettings:
    try:
        return from_mapping(PipelineSettings, data, "mgtq")
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def saved_dtype(folder: str | os.PathLike) -> torch.dtype | None:
    """The float dtype a component folder was saved in; None if it holds no float tensor. torch_dtype="auto"
    loads in it. Mixed float dtypes (fp32 norms beside bf16 weights, say) load in float32, which holds them all
    without loss (transformers' "auto" takes the first tensor's dtype, which rounds the others)."""
    folder = Path(folder)
    if checkpoint.is_quantized(folder):
        return checkpoint.read_manifest(folder).dtype
    # the float dtypes of the files a load reads that a model computes in (fp64 and fp8 tensors do not count)
    found = {SAFETENSORS_FLOATS.get(d) for _, header in stored_headers(folder) for d in header.values()}
    found &= set(DTYPE_NAMES)
    if len(found) > 1:
        return torch.float32
    return found.pop() if found else None


def _load_text_encoder(root: Path, text_encoder, dtype, auto: bool = False):
    if isinstance(text_encoder, torch.nn.Module):
        return text_encoder
    folder = Path(text_encoder) if text_encoder is not None else root / "text_encoder"
    if not folder.is_dir():
        raise FileNotFoundError(
            f"no text encoder at {folder}. The official Meissonic setup keeps CLIP ViT-H/14 in a separate "
            "folder: pass text_encoder=PATH (CLI: --text-encoder PATH) to a local CLIPTextModelWithProjection."
        )
    # the folder's own was checked with the pipeline's checksums; one passed in is held to those of the pipeline
    # folder around it, if any (a separate CLIP, the official set-up, has none)
    return load_component(CLIPTextModelWithProjection, folder, saved_dtype(folder) if auto else dtype,
                          checksums=text_encoder is not None)


def _load_tokenizer(root: Path, tokenizer):
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    folder = Path(tokenizer) if tokenizer is not None else root / "tokenizer"
    if not folder.is_dir():
        raise FileNotFoundError(f"no tokenizer at {folder}; pass tokenizer=PATH to a local CLIPTokenizer folder")
    if tokenizer is not None:
        check_recorded(folder)  # a folder passed in: the checksums of the pipeline folder around it, if any
    for path in sorted(folder.glob("*.json")) + sorted(folder.glob("*.txt")):
        # The tokenizer libraries fail on bad bytes without naming the file; these files are small.
        try:
            path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}); re-create the "
                             "tokenizer folder with save_pretrained") from None
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


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _shown(value) -> str:
    return f"{type(value).__name__} {value!r}"[:120]


def _merging_plan(token_merging):
    """The per-call TomeMGT plan: None (the installed one, if any), a TomePlan (anything with `bind`), a TomeConfig
    or a ratio (0: no merging in this call, whatever is installed)."""
    token_merging = plain_scalar(token_merging)
    if token_merging is None or hasattr(token_merging, "bind"):
        return token_merging
    from mgtq.merging.patch import TomeConfig, TomePlan

    if isinstance(token_merging, TomeConfig):
        return TomePlan(token_merging)
    if isinstance(token_merging, (int, float)) and not isinstance(token_merging, bool):
        if not token_merging:
            return EveryToken()
        return TomePlan(TomeConfig(ratio=token_merging))
    raise TypeError(f"token_merging must be a TomeConfig, a ratio in [0, 1) or a TomePlan, got "
                    f"{type(token_merging).__name__}")


def _device_and_dtype(args: tuple, kwargs: dict) -> tuple[torch.device | None, torch.dtype | None]:
    """(device, dtype) of diffusers' `.to` spellings: (device), (dtype), (device, dtype) or keywords."""
    kwargs = dict(kwargs)
    kwargs.pop("silence_dtype_warnings", None)
    device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
    if kwargs:
        raise TypeError(f"MGTPipeline.to() got unexpected keyword arguments {sorted(kwargs)}")
    if len(args) > 2:
        raise TypeError("MGTPipeline.to() takes at most two arguments: device and dtype")
    for arg in args:
        if isinstance(arg, torch.dtype):
            if dtype is not None:
                raise TypeError("MGTPipeline.to() got the dtype twice")
            dtype = arg
        elif arg is not None:
            if device is not None:
                raise TypeError("MGTPipeline.to() got the device twice")
            device = arg
    return (torch.device(device) if device is not None else None), parse_dtype(dtype)


def _single_device(device, device_map) -> torch.device | None:
    """The one device of `device=` / diffusers' `device_map=` ("cpu", "cuda", "cuda:1"): mgtq pipelines are small
    enough for one device, and offloading is `enable_model_cpu_offload()`."""
    if device_map is None:
        return torch.device(device) if device is not None else None
    if device is not None:
        raise ValueError("pass device_map or device, not both")
    try:
        return torch.device(device_map)
    except (RuntimeError, TypeError):
        raise ValueError(f"device_map must name one device (\"cpu\", \"cuda\", \"cuda:1\"), got {device_map!r}; to "
                         "save memory call pipe.enable_model_cpu_offload() after loading") from None


@contextmanager
def _loading_bars(show: bool):
    """Hide diffusers' and transformers' weight-loading bars while loading, unless `show`."""
    if show:
        yield
        return
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    was = (not diffusers_logging.is_progress_bar_enabled(), not transformers_logging.is_progress_bar_enabled())
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if not was[0]:
            diffusers_logging.enable_progress_bar()
        if not was[1]:
            transformers_logging.enable_progress_bar()


def _reject_save_options(options: dict) -> None:
    """diffusers' save options that mgtq's format does not offer are errors, not silently ignored."""
    options = {k: v for k, v in options.items() if not (k == "safe_serialization" and v)}
    if options:
        raise ValueError(f"MGTPipeline.save_pretrained writes local safetensors folders only; unsupported options "
                         f"{sorted(options)}")


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


def load(path: str | os.PathLike | None = None, **kwargs) -> MGTPipeline:
    """Load any mgtq or Meissonic pipeline folder (float or quantized), ready to generate; no path = the
    embedded default model, and an embedded model's name (e.g. "tiny-shapes-16x16") loads that one.
    kwargs as `MGTPipeline.from_pretrained`."""
    from mgtq.default_model import default_model

    return MGTPipeline.from_pretrained(default_model() if path is None else path, **kwargs)
