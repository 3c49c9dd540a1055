"""Zero-shot editing with an MGT (Meissonic §3.2): inpainting, outpainting and image-to-image.

    pipe = mgtq.load("checkpoints/tiny-shapes-w4a8-scq")
    inpaint = mgtq.MGTInpaintPipeline.from_pipe(pipe)          # shares pipe's modules, no copy
    out = inpaint("a red circle", image=image, mask_image=mask, seed=0)
    canvas, mask = mgtq.outpaint_canvas(image, left=16)         # outpainting = inpainting on a canvas
    out = mgtq.MGTImg2ImgPipeline.from_pipe(pipe)("a blue square", image=image, strength=0.5, seed=0)

The pipelines are `MGTPipeline`s with other inputs: the same components, prompt encoding, guided
model function, sampler (every trick), TomeMGT and compile, and the same output record. The editing
itself is the sampler's start state (mgtq.sampling.start); this module turns images and masks into
token ids and token masks. Masks follow diffusers: white (≥ 0.5) = repaint, black = keep. A token
is repainted when any of its pixels is.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mgtq.pipeline import MGTPipeline, MGTPipelineOutput, _broadcast_negative
from mgtq.sampling import SamplerConfig, SamplerHooks, sample
from mgtq.sampling.start import StartState, check_strength, img2img_start, inpaint_start
from mgtq.utils import micro_conditions, per_sample_generators
from mgtq.vq import encode_to_tokens

__all__ = ["MGTInpaintPipeline", "MGTImg2ImgPipeline", "outpaint_canvas", "image_array", "mask_array",
           "token_mask", "edit_to_file"]


# ---------------------------------------------------------------------------------- pixels
def image_array(image) -> np.ndarray:
    """An RGB image (PIL "RGB", or uint8 (H, W, 3)) → uint8 (H, W, 3); anything else is a clear error."""
    if isinstance(image, Image.Image):
        if image.mode != "RGB":
            raise ValueError(f"image has mode {image.mode!r}; editing takes RGB images: convert it with "
                             "image.convert('RGB')")
        return np.asarray(image)
    arr = np.asarray(image) if isinstance(image, np.ndarray) else None
    if arr is None or arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        what = f"{arr.dtype} array of shape {arr.shape}" if arr is not None else type(image).__name__
        raise ValueError(f"image must be an RGB PIL image or a uint8 array (H, W, 3), got {what}")
    return arr


def mask_array(mask, size: tuple[int, int]) -> np.ndarray:
    """A mask (PIL "1"/"L"/"RGB", or an (H, W) bool/uint8 array) → bool (H, W), True = repaint.

    White (≥ 0.5 of full scale) repaints, as in diffusers. size: the image's (height, width); a mask
    of another size, or one that repaints nothing, is an error.
    """
    if isinstance(mask, Image.Image):
        if mask.mode not in ("1", "L", "RGB"):
            raise ValueError(f"mask_image has mode {mask.mode!r}; use a black-and-white mask (mode 'L' or '1', "
                             "white = repaint): mask.convert('L')")
        arr = np.asarray(mask.convert("L")) >= 128
    elif isinstance(mask, np.ndarray) and mask.ndim == 2 and (mask.dtype == bool or mask.dtype == np.uint8):
        arr = mask >= 128 if mask.dtype == np.uint8 else mask
    else:
        what = f"{mask.dtype} array of shape {mask.shape}" if isinstance(mask, np.ndarray) else type(mask).__name__
        raise ValueError(f"mask_image must be a PIL image or a bool/uint8 array (H, W), got {what}")
    if arr.shape != tuple(size):
        raise ValueError(f"mask_image is {arr.shape[1]}×{arr.shape[0]} (W×H) but the image is {size[1]}×{size[0]}; "
                         "give a mask of the image's size")
    if not arr.any():
        raise ValueError("mask_image is all black: nothing to repaint; paint the area to repaint white")
    return arr


def token_mask(mask: np.ndarray, factor: int) -> torch.Tensor:
    """Pixel mask bool (H, W) → token mask bool (H/f, W/f): a token is repainted when any of its pixels is."""
    h, w = mask.shape
    if h % factor or w % factor:
        raise ValueError(f"a {w}×{h} mask does not tile into {factor}×{factor} tokens")
    cells = torch.from_numpy(np.ascontiguousarray(mask)).view(h // factor, factor, w // factor, factor)
    return cells.any(dim=3).any(dim=1)


def outpaint_canvas(image, left: int = 0, right: int = 0, top: int = 0, bottom: int = 0,
                    fill: tuple[int, int, int] = (127, 127, 127)) -> tuple[Image.Image, Image.Image]:
    """The padded canvas and its mask for outpainting: (canvas RGB, mask L, white over the padding).

    The padding (pixels on each side) is filled with `fill`; it is repainted anyway, the colour only
    reaches the VQ encoder's view of the kept border. The canvas must be a size the model takes.
    """
    pixels = image_array(image)
    pads = {"left": left, "right": right, "top": top, "bottom": bottom}
    bad = {k: v for k, v in pads.items() if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0}
    if bad:
        raise ValueError(f"outpaint padding must be whole pixels ≥ 0, got {bad}")
    if not any(pads.values()):
        raise ValueError("outpaint padding is 0 on every side: nothing to outpaint; give left/right/top/bottom")
    h, w = pixels.shape[:2]
    canvas = np.empty((top + h + bottom, left + w + right, 3), dtype=np.uint8)
    canvas[:] = fill
    canvas[top:top + h, left:left + w] = pixels
    mask = np.full(canvas.shape[:2], 255, dtype=np.uint8)
    mask[top:top + h, left:left + w] = 0
    return Image.fromarray(canvas), Image.fromarray(mask, mode="L")


# -------------------------------------------------------------------------------- pipelines
class _EditingPipeline(MGTPipeline):
    """What the editing pipelines share: `from_pipe`, `encode_image` and the sampling call from a start."""

    @classmethod
    def from_pipe(cls, pipe: MGTPipeline):
        """A sibling pipeline on `pipe`'s modules (the same objects: no second copy in memory) and a copy
        of its settings. TomeMGT or compile installed on the modules apply to both."""
        return cls(pipe.transformer, pipe.vqvae, pipe.text_encoder, pipe.tokenizer, dataclasses.replace(pipe.settings))

    @torch.inference_mode()
    def encode_image(self, image) -> torch.Tensor:
        """VQ-encode RGB image(s) (one, or a list of the same size) → token ids (B, h, w).

        The image size must be a multiple of the VQ factor (× the feature compression); the error
        names the nearest valid size.
        """
        arrays = self._image_arrays(list(image) if isinstance(image, (list, tuple)) else [image])
        pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0  # (B, 3, H, W) in [0, 1]
        if self.settings.image_range == "-1,1":
            pixels = pixels * 2 - 1
        return encode_to_tokens(self.vqvae, pixels).to(self.device)

    def _image_arrays(self, images: list) -> list[np.ndarray]:
        """uint8 (H, W, 3) arrays of RGB images of one size the model takes (errors name the nearest valid size)."""
        arrays = [image_array(im) for im in images]
        if not arrays:
            raise ValueError("image must be an image or a non-empty list of images")
        sizes = {a.shape[:2] for a in arrays}
        if len(sizes) > 1:
            raise ValueError(f"the images of one call must share a size, got {sorted(sizes)} (H, W)")
        self.token_grid(*arrays[0].shape[:2])
        return arrays

    def _edit(self, prompts: list[str], size: tuple[int, int], make_start, *, negative_prompt, num_images_per_prompt,
              num_inference_steps, guidance_scale, generator, seed, micro_conds, sampler, hooks, token_merging,
              progress, output_type) -> MGTPipelineOutput:
        """Sample from make_start(config, generators, per_prompt) → StartState, as MGTPipeline.__call__
        samples from all-mask."""
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be at least 1, got {num_images_per_prompt}")
        if output_type not in ("pil", "tokens"):
            raise ValueError(f"output_type must be 'pil' or 'tokens', got {output_type!r}")
        all_prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        config = sampler or self.settings.sampler
        overrides = {k: v for k, v in (("num_steps", num_inference_steps), ("guidance_scale", guidance_scale))
                     if v is not None}
        config = config.replace(**overrides) if overrides else config
        height, width = size
        grid = self.token_grid(height, width)
        generators = per_sample_generators(len(all_prompts), seed=seed, generator=generator, device=self.device)
        start = make_start(config, generators, num_images_per_prompt)

        text, pooled = self.encode_prompt(all_prompts)
        negative = None
        if config.needs_unconditional:
            negative = self.encode_prompt(_broadcast_negative(negative_prompt, all_prompts, num_images_per_prompt))
        if micro_conds is None:
            micro_conds = micro_conditions(width, height, self.settings.aesthetic_score)
        micro_conds = micro_conds.to(self.device).reshape(-1, 5)
        model_fn = self.guided_model_fn(text, pooled, micro_conds, config, token_merging, negative=negative)
        result = sample(model_fn, len(all_prompts), grid, self.transformer.mask_token_id, config, generators,
                        device=self.device, hooks=hooks, progress=progress, return_info=True, start=start)
        images = self.decode_tokens(result.tokens) if output_type == "pil" else []
        return MGTPipelineOutput(images=images, tokens=result.tokens, nfe=result.nfe)


class MGTInpaintPipeline(_EditingPipeline):
    """Inpainting (and outpainting, on an `outpaint_canvas`): repaint the masked tokens, keep every other
    token exactly. The schedule runs over the repainted tokens only."""

    @torch.inference_mode()
    def __call__(
        self,
        prompt: str | list[str],
        image,
        mask_image,
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
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
        """Repaint the white area of `mask_image` in `image` from `prompt`.

        image / mask_image: one of each (for every prompt) or one per prompt; the mask has the
        image's size. Other arguments as MGTPipeline.__call__. `.tokens` equals
        `encode_image(image)` at every token the mask does not touch.
        """
        prompts = _prompt_list(prompt)
        images = _per_prompt(image, len(prompts), "image")
        masks = _per_prompt(mask_image, len(prompts), "mask_image")
        arrays = self._image_arrays(images)
        repaint = torch.stack([token_mask(mask_array(m, a.shape[:2]), self.vae_scale_factor)
                               for m, a in zip(masks, arrays)])
        tokens = self.encode_image(arrays)

        def make_start(config, generators, per_prompt) -> StartState:
            return inpaint_start(tokens.repeat_interleave(per_prompt, 0),
                                 repaint.to(tokens.device).repeat_interleave(per_prompt, 0),
                                 self.transformer.mask_token_id)

        return self._edit(prompts, arrays[0].shape[:2], make_start, negative_prompt=negative_prompt,
                          num_images_per_prompt=num_images_per_prompt, num_inference_steps=num_inference_steps,
                          guidance_scale=guidance_scale, generator=generator, seed=seed, micro_conds=micro_conds,
                          sampler=sampler, hooks=hooks, token_merging=token_merging, progress=progress,
                          output_type=output_type)


class MGTImg2ImgPipeline(_EditingPipeline):
    """Mask-free editing: re-mask a `strength` fraction of the image's tokens (random, seeded) and sample
    from the schedule step with that mask ratio (mgtq.sampling.start.img2img_start)."""

    @torch.inference_mode()
    def __call__(
        self,
        prompt: str | list[str],
        image,
        strength: float = 0.5,
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
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
        """Re-draw `image` toward `prompt`; strength in (0, 1] is the fraction of tokens re-drawn.

        The sampler runs the steps from the one whose mask ratio is `strength` on (fewer steps for a
        lower strength); at strength 1 the result is text-to-image at the same seed (for an image of the
        model's resolution: the micro-conditions come from the image size). Other arguments as
        MGTPipeline.__call__.
        """
        check_strength(strength)  # before any encoding
        prompts = _prompt_list(prompt)
        arrays = self._image_arrays(_per_prompt(image, len(prompts), "image"))
        tokens = self.encode_image(arrays)

        def make_start(config, generators, per_prompt) -> StartState:
            return img2img_start(tokens.repeat_interleave(per_prompt, 0), strength, self.transformer.mask_token_id,
                                 config, generators)

        return self._edit(prompts, arrays[0].shape[:2], make_start, negative_prompt=negative_prompt,
                          num_images_per_prompt=num_images_per_prompt, num_inference_steps=num_inference_steps,
                          guidance_scale=guidance_scale, generator=generator, seed=seed, micro_conds=micro_conds,
                          sampler=sampler, hooks=hooks, token_merging=token_merging, progress=progress,
                          output_type=output_type)


def _prompt_list(prompt) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, (list, tuple)) else None
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompt must be a str or a non-empty list of str, got {prompt!r}")
    return prompts


def _per_prompt(value, count: int, name: str) -> list:
    """One value for every prompt, or a list with one per prompt."""
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise ValueError(f"got {len(value)} {name}s for {count} prompts; give one, or one per prompt")
        return list(value)
    return [value] * count


# -------------------------------------------------------------------------------------- files
def edit_to_file(
    pipe: MGTPipeline, image: str | os.PathLike, prompt: str, out: str | os.PathLike, *,
    mask: str | os.PathLike | None = None, outpaint: tuple[int, int, int, int] | None = None,
    strength: float | None = None, seed: int = 0, **call_kwargs,
) -> Path:
    """What `mgtq edit` calls: edit the image file by exactly one of mask / outpaint (L, R, T, B) / strength,
    and write the result as PNG (atomically)."""
    from mgtq.generate import write_png

    chosen = [name for name, v in (("mask", mask), ("outpaint", outpaint), ("strength", strength)) if v is not None]
    if len(chosen) != 1:
        raise ValueError(f"give exactly one of --mask, --outpaint or --strength, got {chosen or 'none'}")
    source = _open_image(image, "--image")
    if strength is not None:
        result = MGTImg2ImgPipeline.from_pipe(pipe)(prompt, image=source, strength=strength, seed=seed, **call_kwargs)
    else:
        if outpaint is not None:
            source, mask_image = outpaint_canvas(source, *outpaint)
        else:
            mask_image = _open_image(mask, "--mask")
        result = MGTInpaintPipeline.from_pipe(pipe)(prompt, image=source, mask_image=mask_image, seed=seed,
                                                    **call_kwargs)
    out = Path(out)
    write_png(result.images[0], out)
    return out


def _open_image(path, flag: str) -> Image.Image:
    try:
        with Image.open(path) as im:
            im.load()
            return im
    except FileNotFoundError:
        raise FileNotFoundError(f"{flag} {path} does not exist") from None
    except (OSError, Image.UnidentifiedImageError) as err:
        raise ValueError(f"{flag} {path} is not an image PIL can read ({err})") from None
