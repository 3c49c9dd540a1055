"""Zero-shot editing with an MGT (Meissonic §3.2): inpainting, outpainting and image-to-image.

    pipe = mgtq.load("checkpoints/tiny-shapes-w4a8-scq")
    inpaint = mgtq.MGTInpaintPipeline.from_pipe(pipe)          # shares pipe's modules, no copy
    out = inpaint("a red circle", image=image, mask_image=mask, seed=0)
    canvas, mask = mgtq.outpaint_canvas(image, left=16)         # outpainting = inpainting on a canvas
    out = mgtq.MGTImg2ImgPipeline.from_pipe(pipe)("a blue square", image=image, strength=0.5, seed=0)

The pipelines are `MGTPipeline`s with other inputs, as aMUSEd's inpaint and img2img pipelines are
siblings of its text-to-image one in diffusers: the same components (`from_pipe`), one call path
(prompt encoding, guided model function, sampler with every trick, TomeMGT and compile, output_type,
return_dict, callbacks, offload hooks) and the same output record. The editing itself is the sampler's
start state (mgtq.sampling.start); this module turns images and masks into token ids and token masks.
Masks follow diffusers: white (≥ 0.5) = repaint, black = keep. A token is repainted when any of its
pixels is.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image, ImageOps

from mgtq.limits import MAX_RESOLUTION
from mgtq.pipeline import MGTPipeline, MGTPipelineOutput
from mgtq.sampling import SamplerConfig, SamplerHooks
from mgtq.sampling.start import check_strength, img2img_start, inpaint_start, start_step_for_strength
from mgtq.vq import encode_to_tokens

__all__ = ["MGTInpaintPipeline", "MGTImg2ImgPipeline", "outpaint_canvas", "image_array", "image_batch", "mask_array",
           "mask_batch", "token_mask", "tiled_size", "edit_to_file", "check_edit_files"]


# ---------------------------------------------------------------------------------- pixels
def image_array(image) -> np.ndarray:
    """One image → uint8 RGB (H, W, 3), from the forms diffusers' VaeImageProcessor.preprocess takes and mgtq's
    own outputs come in: a PIL image of any mode (converted to RGB), a uint8 array (H, W, 3), a float array
    (H, W, 3) in [0, 1] ("np" images) or a torch tensor (3, H, W) in [0, 1] ("pt" images, any float dtype);
    anything else is a clear error. An image with transparent pixels is refused rather than guessed at (what
    lies under them is often black); a fully opaque one is read as RGB. Batches: `image_batch`."""
    if isinstance(image, Image.Image):
        return np.asarray(_opaque_rgb(image, "image"))
    if isinstance(image, torch.Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError("a torch image must be (3, H, W), or a batch (N, 3, H, W), with values in [0, 1] (as "
                             f"diffusers' 'pt' images), got shape {tuple(image.shape)}")
        image = image.detach().cpu()
        # .float() first: numpy has no bfloat16; uint8 stays 0–255
        image = (image if image.dtype == torch.uint8 else image.float()).permute(1, 2, 0).numpy()
    arr = image if isinstance(image, np.ndarray) else None
    if arr is not None and arr.ndim == 3 and arr.shape[2] == 3 and arr.dtype.kind == "f" and arr.size:
        if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
            raise ValueError("a float image must hold values in [0, 1] (as diffusers' 'np' and 'pt' images), got "
                             f"[{float(np.nanmin(arr)):.3g}, {float(np.nanmax(arr)):.3g}]; map a [-1, 1] tensor with "
                             "(x + 1) / 2, and 0–255 values with x / 255")
        return np.round(arr * 255).astype(np.uint8)
    if arr is None or arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        what = f"{arr.dtype} array of shape {arr.shape}" if arr is not None else type(image).__name__
        raise ValueError("image must be a PIL image, a uint8 array (H, W, 3) or a float one in [0, 1], a torch "
                         f"tensor (3, H, W) in [0, 1], or a batch of arrays or tensors (N, …), got {what}")
    return arr


def image_batch(image) -> list:
    """One `image=` value → the images it holds: a batch (N, 3, H, W) tensor or (N, H, W, 3) array is N images,
    as diffusers' VaeImageProcessor.preprocess takes them and mgtq's 'pt' / 'np' outputs come (so an output
    can be fed back); anything else is one image (image_array checks it)."""
    if (isinstance(image, torch.Tensor) and image.dim() == 4) or (isinstance(image, np.ndarray) and image.ndim == 4):
        return list(image)
    return [image]


def _opaque_rgb(image: Image.Image, name: str) -> Image.Image:
    """A PIL image as RGB. Its alpha (or transparent palette entry) is dropped only when every pixel is opaque,
    as in the RGBA files editors and screenshots save: under transparent pixels lies whatever colour the file
    kept there, so an image with real transparency is refused (name: how the message names it)."""
    if image.mode not in ("RGBA", "LA", "PA", "RGBa", "La") and "transparency" not in image.info:
        return image if image.mode == "RGB" else image.convert("RGB")
    rgba = image.convert("RGBA")
    lowest = rgba.getchannel("A").getextrema()[0]
    if lowest < 255:
        raise ValueError(f"{name} has transparent pixels (mode {image.mode!r}, alpha down to {lowest}); editing "
                         "takes RGB images: flatten it onto a background first, e.g. Image.alpha_composite(Image.new("
                         "'RGBA', image.size, 'white'), image.convert('RGBA')).convert('RGB') (image.convert('RGB') "
                         "drops alpha, leaving whatever colour lies under the transparent pixels)")
    return rgba.convert("RGB")


def mask_array(mask, size: tuple[int, int]) -> np.ndarray:
    """One mask → bool (H, W), True = repaint. White (≥ 0.5 of full scale) repaints, as in diffusers: a PIL image of
    any mode (its grey level, as diffusers' mask processor converts it), or a numpy array or torch tensor (H, W),
    (H, W, 1) or (1, H, W) that is bool, integer (0–255, as uint8) or float (any dtype) with values in [0, 1].
    Batches: `mask_batch`.

    size: the image's (height, width); a mask of another size, or one that repaints nothing, is an error.
    """
    if not isinstance(mask, Image.Image):
        masks = mask_batch(mask)  # a tensor → numpy; a singleton channel dimension dropped
        if len(masks) != 1:
            raise ValueError(f"mask_array takes one mask, got a batch of {len(masks)}; pass one of them")
        mask = masks[0]
    if isinstance(mask, Image.Image):
        arr = np.asarray(mask.convert("L")) >= 128
    elif isinstance(mask, np.ndarray) and mask.ndim == 2 and mask.dtype.kind in "buif":
        if mask.dtype.kind == "f" and mask.size and (not np.isfinite(mask).all() or mask.min() < 0 or mask.max() > 1):
            raise ValueError("a float mask must hold values in [0, 1] (1 = repaint); got "
                             f"[{float(np.nanmin(mask)):.3g}, {float(np.nanmax(mask)):.3g}]")
        if mask.dtype.kind in "iu" and mask.size and (mask.min() < 0 or mask.max() > 255):
            raise ValueError("an integer mask must hold values in 0–255 (255 = repaint), as a uint8 one; got "
                             f"{mask.dtype} values in [{mask.min()}, {mask.max()}]")
        arr = mask >= {"b": True, "u": 128, "i": 128, "f": 0.5}[mask.dtype.kind]
    else:
        what = f"{mask.dtype} array of shape {mask.shape}" if isinstance(mask, np.ndarray) else type(mask).__name__
        raise ValueError("mask_image must be a PIL image, or a bool, integer (0–255) or float ([0, 1]) array or "
                         "tensor (H, W), (H, W, 1) or (1, H, W), or a batch of them (B, H, W), (B, 1, H, W), "
                         f"(B, H, W, 1); got {what}")
    if arr.shape != tuple(size):
        raise ValueError(f"mask_image is {arr.shape[1]}×{arr.shape[0]} (W×H) but the image is {size[1]}×{size[0]}; "
                         "give a mask of the image's size (a PIL mask: mask.resize(image.size, Image.NEAREST), which "
                         "keeps it black and white)")
    if not arr.any():
        peak = np.asarray(mask.convert("L") if isinstance(mask, Image.Image) else mask).max()
        hint = (f" (its brightest value is {peak} of 255: a 0/1 mask must be scaled to 0/255, or given as a bool "
                "array)" if 0 < peak < 128 and not isinstance(peak, (np.floating, float)) else "")
        raise ValueError(f"mask_image is all black: nothing to repaint{hint}; paint the area to repaint white")
    return arr


def mask_batch(mask) -> list:
    """One `mask_image=` value → the masks it holds, in the shapes aMUSEd's inpainting takes: an array or tensor
    (H, W), (H, W, 1) or (1, H, W) is one mask; (B, H, W), (B, 1, H, W) or (B, H, W, 1) is B masks (one per prompt,
    as a list). Tensors become numpy arrays (bool stays bool, integers int64, floats float32: numpy has no
    bfloat16); a PIL image, or anything else, is one mask (mask_array checks it)."""
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu()
        if mask.dtype != torch.bool and not mask.is_complex():
            mask = mask.float() if mask.is_floating_point() else mask.long()
        mask = mask.numpy()
    if not isinstance(mask, np.ndarray):
        return [mask]
    if mask.ndim == 3 and mask.shape[2] in (3, 4):  # no image is 3 or 4 pixels wide: an RGB(A) array, not B masks
        raise ValueError(f"mask_image of shape {mask.shape} looks like an RGB(A) image; pass its grey level (H, W), "
                         "or the PIL image (Image.fromarray(mask)), which is read by its grey level")
    if mask.ndim == 3:
        return [mask[..., 0]] if mask.shape[2] == 1 else list(mask)
    if mask.ndim == 4 and 1 in (mask.shape[1], mask.shape[3]):
        return list(mask[:, 0] if mask.shape[1] == 1 else mask[..., 0])
    return [mask]


def tiled_size(width: int, height: int, tile: int) -> tuple[int, int]:
    """The nearest (width, height) whose sides are positive multiples of `tile` (what an error suggests)."""
    return max(tile, round(width / tile) * tile), max(tile, round(height / tile) * tile)


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
    if max(top + h + bottom, left + w + right) > MAX_RESOLUTION:
        raise ValueError(f"outpainting {w}×{h} by {left},{right},{top},{bottom} (L,R,T,B) makes a "
                         f"{left + w + right}×{top + h + bottom} canvas, past mgtq's limit of {MAX_RESOLUTION} px a "
                         "side (mgtq.limits); pad less")
    canvas = np.empty((top + h + bottom, left + w + right, 3), dtype=np.uint8)
    canvas[:] = fill
    canvas[top:top + h, left:left + w] = pixels
    mask = np.full(canvas.shape[:2], 255, dtype=np.uint8)
    mask[top:top + h, left:left + w] = 0
    return Image.fromarray(canvas), Image.fromarray(mask, mode="L")


# -------------------------------------------------------------------------------- pipelines
class _EditingPipeline(MGTPipeline):
    """What the editing pipelines share: `encode_image`, and the checks of an editing call."""

    # As aMUSEd's inpaint/img2img: offloading keeps the VQ on the execution device. Its encoder's quantizer
    # reads the codebook weight directly, not through a submodule's forward, so sequential offload's
    # per-submodule hooks would never bring it in (the VQ is a small part of the memory).
    _exclude_from_cpu_offload = ["vqvae"]

    @torch.no_grad()  # not inference_mode: the sampler updates the start tokens in place outside it
    def encode_image(self, image) -> torch.Tensor:
        """VQ-encode RGB image(s) → token ids (B, h, w): one image, a batch (N, 3, H, W) tensor or (N, H, W, 3)
        array, or a list of these, all of one size (the forms of `image_array` and `image_batch`).

        The image size must be a multiple of the VQ factor (× the feature compression); the error
        names the nearest valid size.
        """
        images = [one for item in (image if isinstance(image, (list, tuple)) else [image]) for one in image_batch(item)]
        arrays = self._image_arrays(images)
        pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0  # (B, 3, H, W) in [0, 1]
        if self.settings.image_range == "-1,1":
            pixels = pixels * 2 - 1
        device = self._execution_device  # an offload hook's, while the VQ's weights may sit elsewhere
        return encode_to_tokens(self.vqvae, pixels, device=device).to(device)

    def _image_arrays(self, images: list) -> list[np.ndarray]:
        """uint8 (H, W, 3) arrays of RGB images of one size the model takes (errors name the nearest valid size)."""
        arrays = [image_array(im) for im in images]
        if not arrays:
            raise ValueError("image must be an image or a non-empty list of images")
        sizes = {a.shape[:2] for a in arrays}
        if len(sizes) > 1:
            raise ValueError(f"the images of one call must share a size, got {sorted(sizes)} (H, W)")
        (h, w), f = arrays[0].shape[:2], self.token_pixels
        if h % f or w % f:  # token_grid's message speaks of height and width, which an editing call does not take
            near = tiled_size(w, h, f)
            raise ValueError(f"image is {w}×{h} (W×H) but its sides must be multiples of {f} (VQ factor "
                             f"{self.vae_scale_factor} × feature compression {self.transformer.grid_factor}); try "
                             f"{near[0]}×{near[1]}: image.resize({near}) for a PIL image (and its mask with "
                             "Image.NEAREST), or crop both")
        self.token_grid(h, w)
        return arrays

    def _size_advice(self, side: int) -> str:
        """An editing call's size is its image's."""
        return f"resize the image to sides that are multiples of {side} (mgtq edit: --image)"

    def check_inputs(self, prompt, image, mask_image, strength, negative_prompt, num_images_per_prompt, seed, sampler,
                     output_type, callback_on_step_end_tensor_inputs, token_merging) -> None:
        """MGTPipeline's checks (the size comes from the image), then the editing ones: one image (and
        mask_image, for inpainting) for every prompt or a list of one per prompt; strength a number in (0, 1].
        What an image holds is checked as it is read, before any encoding."""
        super().check_inputs(prompt, negative_prompt, None, None, num_images_per_prompt, seed, sampler, output_type,
                             callback_on_step_end_tensor_inputs, token_merging)
        count = 1 if isinstance(prompt, str) else len(prompt)
        _per_prompt(image, count, "image", image_batch)
        if mask_image is not None:
            _per_prompt(mask_image, count, "mask_image", mask_batch)
        check_strength(strength)


class MGTInpaintPipeline(_EditingPipeline):
    """Inpainting (and outpainting, on an `outpaint_canvas`): repaint the masked tokens, keep every other
    token exactly. The schedule runs over the repainted tokens only."""

    def __init__(self, transformer, vqvae, text_encoder, tokenizer, settings=None):
        # The signature spelled out, not *args: diffusers reads the components' names from it (`components`).
        super().__init__(transformer, vqvae, text_encoder, tokenizer, settings)
        # For users' scripts (`pipe.mask_processor.blur(mask, blur_factor=…)`), configured as aMUSEd's inpainting
        # pipeline's. The call itself reads masks with mask_array (a token is repainted when any of its pixels is).
        self.mask_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor, do_normalize=False,
                                                do_binarize=True, do_convert_grayscale=True)

    def _size_advice(self, side: int) -> str:
        """An inpainting call's size is its image's; an outpainted canvas is the image and its margins."""
        return (f"resize the image (and its mask) to sides that are multiples of {side}, or outpaint by margins that "
                "make the canvas so (mgtq edit: --image, --outpaint)")

    @torch.no_grad()  # not inference_mode: offload hooks re-wrap Parameters during the call
    def __call__(
        self,
        prompt: str | list[str],
        image,
        mask_image,
        strength: float = 1.0,
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
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
        """Repaint the white area of `mask_image` in `image` from `prompt`.

        image / mask_image: one of each (for every prompt) or one per prompt, as a list or a batch (an image
        tensor (N, 3, H, W) or array (N, H, W, 3), a mask (B, H, W), (B, 1, H, W) or (B, H, W, 1): aMUSEd's forms,
        see image_array and mask_array); the mask has the image's size. strength in (0, 1]: only the last
        int(steps × strength) steps run, as in diffusers' aMUSEd inpainting (the masked tokens all start masked).
        Other arguments as MGTPipeline.__call__ (output types, return_dict, callbacks). `.tokens` equals
        `encode_image(image)` at every token the mask does not touch.
        """
        output_type = self._resolve_output_type(output_type)
        self.check_inputs(prompt, image, mask_image, strength, negative_prompt, num_images_per_prompt, seed, sampler,
                          output_type, callback_on_step_end_tensor_inputs, token_merging)
        count = 1 if isinstance(prompt, str) else len(prompt)
        arrays = self._image_arrays(_per_prompt(image, count, "image", image_batch))
        repaint = torch.stack([token_mask(mask_array(m, a.shape[:2]), self.vae_scale_factor)
                               for m, a in zip(_per_prompt(mask_image, count, "mask_image", mask_batch), arrays)])
        tokens = self.encode_image(arrays)
        run = self._prepare_sampling(prompt, *arrays[0].shape[:2], negative_prompt=negative_prompt,
                                     num_images_per_prompt=num_images_per_prompt,
                                     num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                     generator=generator, seed=seed, micro_conds=micro_conds,
                                     sampler=self.sampler_config(sampler).for_inpainting(),
                                     token_merging=token_merging,
                                     merge_area=repaint.repeat_interleave(num_images_per_prompt, 0))
        start = inpaint_start(tokens.repeat_interleave(num_images_per_prompt, 0),
                              repaint.to(tokens.device).repeat_interleave(num_images_per_prompt, 0),
                              self.transformer.mask_token_id, start_step_for_strength(run.config, strength))
        result = self._run_sampler(run, start, hooks=hooks, progress=progress,
                                   callback_on_step_end=callback_on_step_end,
                                   callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs)
        return self._finish(result, output_type, return_dict)


class MGTImg2ImgPipeline(_EditingPipeline):
    """Mask-free editing: run the last int(steps × strength) steps of the schedule from the image's tokens, re-masked
    (random, seeded) as text-to-image holds them at that step (mgtq.sampling.start.img2img_start)."""

    @torch.no_grad()  # not inference_mode: offload hooks re-wrap Parameters during the call
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
        sampler: SamplerConfig | dict | None = None,
        hooks: SamplerHooks | None = None,
        token_merging=None,
        progress: bool = True,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] = ("tokens",),
    ) -> MGTPipelineOutput | tuple:
        """Re-draw `image` toward `prompt`; strength in (0, 1] as in diffusers: the share of the steps run.

        The sampler runs the last int(steps × strength) steps, from the image's tokens re-masked in the count
        text-to-image holds masked there (cosine schedule, strength 0.5: 71 %); at strength 1 the result is
        text-to-image at the same seed (for an image of the model's resolution: the micro-conditions come from
        the image size). Other arguments as MGTPipeline.__call__ (output types, return_dict, callbacks).
        """
        output_type = self._resolve_output_type(output_type)
        self.check_inputs(prompt, image, None, strength, negative_prompt, num_images_per_prompt, seed, sampler,
                          output_type, callback_on_step_end_tensor_inputs, token_merging)
        strength = check_strength(strength)  # as a float (it may come as a numpy or torch scalar)
        arrays = self._image_arrays(_per_prompt(image, 1 if isinstance(prompt, str) else len(prompt), "image",
                                                image_batch))
        tokens = self.encode_image(arrays)
        run = self._prepare_sampling(prompt, *arrays[0].shape[:2], negative_prompt=negative_prompt,
                                     num_images_per_prompt=num_images_per_prompt,
                                     num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                     generator=generator, seed=seed, micro_conds=micro_conds, sampler=sampler,
                                     token_merging=token_merging)
        # drawn from the per-image generators before the sampler draws from them
        start = img2img_start(tokens.repeat_interleave(num_images_per_prompt, 0), strength,
                              self.transformer.mask_token_id, run.config, run.generators)
        result = self._run_sampler(run, start, hooks=hooks, progress=progress,
                                   callback_on_step_end=callback_on_step_end,
                                   callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs)
        return self._finish(result, output_type, return_dict)


def _per_prompt(value, count: int, name: str, batch) -> list:
    """One value for every prompt, or one per prompt: a list, or a batch along a leading dimension (`batch`
    splits one value into what it holds: image_batch, mask_batch); a list's items may be batches too, as
    diffusers' processors concatenate them. A batch of one is one value."""
    if isinstance(value, (list, tuple)):
        values = [one for item in value for one in batch(item)]
    else:
        values = batch(value)
        if len(values) == 1:
            return values * count
    if len(values) != count:
        raise ValueError(f"got {len(values)} {name}s for {count} prompts (a batch of N counts as N); give one, or "
                         "one per prompt")
    return values


# -------------------------------------------------------------------------------------- files
def edit_to_file(
    pipe: MGTPipeline, image: str | os.PathLike, prompt: str, out: str | os.PathLike, *,
    mask: str | os.PathLike | None = None, outpaint: tuple[int, int, int, int] | None = None,
    strength: float | None = None, seed: int = 0, **call_kwargs,
) -> Path:
    """What `mgtq edit` calls: inpaint the image file by `mask` or `outpaint` (L, R, T, B), or re-draw it
    (img2img) by `strength` alone; write the result as PNG (atomically) to `out`, a .png path or a folder (then
    0.png in it), as `mgtq generate` takes --out; returns the path written. With a mask or outpaint, `strength`
    is the inpainting's share of the steps run (default 1: all of them), as in diffusers' aMUSEd."""
    from mgtq.generate import output_paths, write_png

    if mask is not None and outpaint is not None:
        raise ValueError("give --mask or --outpaint, not both")
    out = output_paths(Path(out), 1)[0]  # before any work: a .jpg path is refused
    check_out_is_no_input(out, image, mask)
    source = _open_image(image, "--image")
    mask_image = None if mask is None else _open_image(mask, "--mask")
    check_edit_sizes(image, source.size, mask, None if mask_image is None else mask_image.size, outpaint,
                     pipe.token_pixels)
    if mask is None and outpaint is None:
        if strength is None:
            raise ValueError("give --mask, --outpaint or --strength")
        result = MGTImg2ImgPipeline.from_pipe(pipe)(prompt, image=source, strength=strength, seed=seed, **call_kwargs)
    else:
        if outpaint is not None:
            source, mask_image = outpaint_canvas(source, *outpaint)
        result = MGTInpaintPipeline.from_pipe(pipe)(prompt, image=source, mask_image=mask_image, seed=seed,
                                                    strength=1.0 if strength is None else strength, **call_kwargs)
    write_png(result.images[0], out)
    return out


def check_edit_files(image: str | os.PathLike, mask: str | os.PathLike | None = None,
                     outpaint: tuple[int, int, int, int] | None = None, tile: int | None = None,
                     out: str | os.PathLike | None = None) -> None:
    """What `mgtq edit` checks before any weight loads, in its flags' words: the --image file reads as an RGB
    image (transparency refused), the --mask file as a mask of its size, and, with `tile` (the model's pixels per
    token side, when known), that the image or the outpainting canvas tiles into tokens; `out` (the PNG path to
    write) is neither of them. Reads the files as edit_to_file does (small next to loading a model)."""
    if out is not None:
        check_out_is_no_input(out, image, mask)
    source = _open_image(image, "--image")
    mask_size = None if mask is None else _open_image(mask, "--mask").size
    check_edit_sizes(image, source.size, mask, mask_size, outpaint, tile)


def check_out_is_no_input(out: str | os.PathLike, image: str | os.PathLike, mask: str | os.PathLike | None) -> None:
    """Refuse writing the edit over the image or mask it reads: the original would be lost."""
    for flag, path in (("--image", image), ("--mask", mask)):
        if path is not None and Path(out).exists() and Path(path).exists() and os.path.samefile(out, path):
            raise ValueError(f"--out {out} is the {flag} file the edit reads, which writing it would replace; "
                             "choose another path")


def check_edit_sizes(image, size: tuple[int, int], mask=None, mask_size: tuple[int, int] | None = None,
                     outpaint: tuple[int, int, int, int] | None = None, tile: int | None = None) -> None:
    """The sizes (W, H) of the --image and --mask files against each other and the model's `tile` (None: not
    checked here; the pipeline checks it); errors name the flags and the fix."""
    w, h = size
    if mask_size is not None and tuple(mask_size) != (w, h):
        raise ValueError(f"--mask {mask} is {mask_size[0]}×{mask_size[1]} but --image {image} is {w}×{h}; resize "
                         f"--mask to {w}×{h} (nearest-neighbour keeps it black and white)")
    if not tile:
        return
    left, right, top, bottom = outpaint or (0, 0, 0, 0)
    cw, ch = left + w + right, top + h + bottom
    if not (cw % tile or ch % tile):
        return
    if outpaint is not None:  # the canvas must tile, not the image: widen the right and bottom padding
        raise ValueError(f"--outpaint {left},{right},{top},{bottom} on the {w}×{h} --image makes a {cw}×{ch} canvas, "
                         f"but the model's sides must be multiples of {tile} px; try --outpaint {left},"
                         f"{right + -cw % tile},{top},{bottom + -ch % tile}")
    near = tiled_size(w, h, tile)
    also = " and --mask alike" if mask is not None else ""
    raise ValueError(f"--image {image} is {w}×{h}, but the model's sides must be multiples of {tile} px; try "
                     f"{near[0]}×{near[1]}: resize or crop --image{also}")


def _open_image(path, flag: str) -> Image.Image:
    """A file as diffusers' `load_image` reads one: turned upright by its EXIF orientation, then RGB (an image:
    an alpha channel is dropped only when every pixel is opaque) or grey levels (a mask)."""
    try:
        with Image.open(path) as im:
            if max(im.size) > MAX_RESOLUTION:  # read from the header: nothing decoded yet
                raise ValueError(f"{flag} {path} is {im.size[0]}×{im.size[1]}, past mgtq's limit of {MAX_RESOLUTION} "
                                 "px a side (mgtq.limits); resize it")
            im.load()
            upright = ImageOps.exif_transpose(im)
            return upright.convert("L") if flag == "--mask" else _opaque_rgb(upright, f"{flag} {path}")
    except FileNotFoundError:
        raise FileNotFoundError(f"{flag} {path} does not exist") from None
    except (OSError, Image.UnidentifiedImageError) as err:
        raise ValueError(f"{flag} {path} is not an image PIL can read ({err})") from None
