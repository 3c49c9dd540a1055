"""Inpainting, outpainting and img2img pipelines (mgtq.editing) on small random pipelines, float and
quantized, with the sampler's tricks, TomeMGT and compile; their input errors; `mgtq edit`."""

import numpy as np
import pytest
import torch
from PIL import Image

import mgtq
from mgtq.cli import main
from mgtq.editing import MGTImg2ImgPipeline, MGTInpaintPipeline, outpaint_canvas, token_mask
from mgtq.sampling import SamplerConfig, SamplerHooks
from mgtq.sampling.start import num_remasked, start_step_for_strength
from mgtq.shapes import render, sample_scene

F = 4  # the random pipeline's VQ factor: 64×64 pixels → 16×16 tokens


@pytest.fixture(scope="module")
def scene():
    return render(sample_scene(0, "two_objects"))  # uint8 (64, 64, 3)


def _box_mask(y0=8, y1=28, x0=20, x1=44):
    mask = np.zeros((64, 64), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def _inpaint(pipe, scene, mask, **kw):
    return MGTInpaintPipeline.from_pipe(pipe)("a red circle", image=scene, mask_image=mask, progress=False,
                                              **{"seed": 0, **kw})


# ------------------------------------------------------------------------------- construction
def test_from_pipe_shares_the_modules(random_pipeline):
    for cls in (MGTInpaintPipeline, MGTImg2ImgPipeline):
        sibling = cls.from_pipe(random_pipeline)
        assert isinstance(sibling, mgtq.MGTPipeline)
        for name in ("transformer", "vqvae", "text_encoder", "tokenizer"):
            assert getattr(sibling, name) is getattr(random_pipeline, name)
        assert sibling.settings == random_pipeline.settings and sibling.settings is not random_pipeline.settings


def test_from_pretrained_is_inherited(random_pipeline, random_pipeline_dir, scene):
    loaded = MGTInpaintPipeline.from_pretrained(random_pipeline_dir)
    assert type(loaded) is MGTInpaintPipeline
    mask = _box_mask()
    assert torch.equal(_inpaint(loaded, scene, mask).tokens, _inpaint(random_pipeline, scene, mask).tokens)


def test_top_level_names():
    assert mgtq.MGTInpaintPipeline is MGTInpaintPipeline and mgtq.MGTImg2ImgPipeline is MGTImg2ImgPipeline
    assert mgtq.outpaint_canvas is outpaint_canvas


# ------------------------------------------------------------------------------------- tokens
def test_encode_image_gives_token_ids(random_pipeline, scene):
    pipe = MGTInpaintPipeline.from_pipe(random_pipeline)
    tokens = pipe.encode_image([scene, Image.fromarray(scene)])
    assert tokens.shape == (2, 16, 16) and tokens.dtype == torch.long
    assert torch.equal(tokens[0], tokens[1]) and int(tokens.max()) < pipe.transformer.config.codebook_size


def test_a_token_is_repainted_when_any_of_its_pixels_is():
    mask = np.zeros((64, 64), dtype=bool)
    mask[5, 9] = True  # token (1, 2)
    mask[40:48, 3:5] = True  # tokens (10..11, 0..1)
    expected = torch.zeros(16, 16, dtype=torch.bool)
    expected[1, 2] = True
    expected[10:12, 0:2] = True
    assert torch.equal(token_mask(mask, F), expected)


@pytest.mark.parametrize("mask_kind", ["bool", "L", "RGB", "1"])
def test_inpaint_keeps_every_unmasked_token_and_white_repaints(random_pipeline, scene, mask_kind):
    pixels = _box_mask()
    pixels[60, 60] = True  # one pixel repaints its whole token
    mask = {"bool": pixels, "L": Image.fromarray(pixels.astype(np.uint8) * 255, mode="L"),
            "RGB": Image.fromarray(pixels.astype(np.uint8) * 255, mode="L").convert("RGB"),
            "1": Image.fromarray(pixels.astype(np.uint8) * 255, mode="L").convert("1")}[mask_kind]
    pipe = MGTInpaintPipeline.from_pipe(random_pipeline)
    out = _inpaint(pipe, scene, mask)
    encoded = pipe.encode_image(scene)[0]
    repaint = token_mask(pixels, F)
    assert torch.equal(out.tokens[0][~repaint], encoded[~repaint])
    assert (out.tokens[0][repaint] < pipe.transformer.config.codebook_size).all()
    assert out.images[0].size == (64, 64) and out.nfe == pipe.settings.sampler.num_steps


def test_same_seed_same_image_and_batch_independence(random_pipeline, scene):
    pipe = MGTInpaintPipeline.from_pipe(random_pipeline)
    mask = _box_mask()
    pair = pipe(["a red circle", "a blue square"], image=scene, mask_image=mask, seed=[4, 9], progress=False)
    alone = pipe("a blue square", image=scene, mask_image=mask, seed=9, progress=False)
    assert torch.equal(pair.tokens[1], alone.tokens[0])
    gen = pipe("a blue square", image=scene, mask_image=mask, generator=torch.Generator().manual_seed(9),
               progress=False)
    assert torch.equal(gen.tokens, pipe("a blue square", image=scene, mask_image=mask,
                                        generator=torch.Generator().manual_seed(9), progress=False).tokens)
    i2i = MGTImg2ImgPipeline.from_pipe(random_pipeline)
    a = i2i(["a red circle", "a blue square"], image=scene, strength=0.6, seed=[4, 9], progress=False)
    b = i2i("a blue square", image=scene, strength=0.6, seed=9, progress=False)
    assert torch.equal(a.tokens[1], b.tokens[0])


def test_full_mask_inpaint_and_strength_one_are_text_to_image(random_pipeline, scene):
    t2i = random_pipeline("a red circle", seed=3, progress=False).tokens
    full = np.ones((64, 64), dtype=bool)
    config = random_pipeline.settings.sampler
    assert config.schedule == "cosine" and config.inpaint_schedule == "linear"
    # inpainting runs the linear schedule (as the official and aMUSEd's do): text-to-image on that schedule
    linear = random_pipeline("a red circle", seed=3, progress=False, sampler=config.replace(schedule="linear")).tokens
    assert torch.equal(_inpaint(random_pipeline, scene, full, seed=3).tokens, linear)
    same = config.replace(inpaint_schedule=None)  # or on text-to-image's own
    assert torch.equal(_inpaint(random_pipeline, scene, full, seed=3, sampler=same).tokens, t2i)
    assert not torch.equal(linear, t2i)
    i2i = MGTImg2ImgPipeline.from_pipe(random_pipeline)
    assert torch.equal(i2i("a red circle", image=scene, strength=1.0, seed=3, progress=False).tokens, t2i)



def _remasked(pipe, strength: float) -> int:
    """How many of the 16×16 tokens an img2img start at `strength` re-masks with `pipe`'s sampler."""
    config = pipe.settings.sampler
    return num_remasked(config, start_step_for_strength(config, strength), 256)


def test_img2img_keeps_the_tokens_it_did_not_remask(random_pipeline, scene):
    i2i = MGTImg2ImgPipeline.from_pipe(random_pipeline)
    encoded = i2i.encode_image(scene)
    steps = i2i.settings.sampler.num_steps
    low = i2i("a red circle", image=scene, strength=0.3, seed=0, progress=False)
    high = i2i("a red circle", image=scene, strength=0.9, seed=0, progress=False)
    kept_low, kept_high = (low.tokens == encoded).sum(), (high.tokens == encoded).sum()
    # every token that was not re-masked is kept (a re-drawn one may also happen to come back)
    assert kept_low >= 256 - _remasked(i2i, 0.3) and kept_high >= 256 - _remasked(i2i, 0.9)
    assert kept_low > kept_high
    assert low.nfe < high.nfe <= steps  # a lower strength starts at a later step


def test_outpaint_canvas_and_outpainting(random_pipeline, scene):
    canvas, mask = outpaint_canvas(scene[:, 24:], left=24)
    assert canvas.size == (64, 64) and mask.mode == "L"
    pixels = np.asarray(mask) >= 128
    assert pixels[:, :24].all() and not pixels[:, 24:].any()
    assert (np.asarray(canvas)[:, 24:] == scene[:, 24:]).all()
    out = _inpaint(random_pipeline, np.asarray(canvas), mask)
    encoded = MGTInpaintPipeline.from_pipe(random_pipeline).encode_image(canvas)[0]
    assert torch.equal(out.tokens[0][:, 6:], encoded[:, 6:])  # tokens right of the padding are kept
    wide, wide_mask = outpaint_canvas(scene, right=16, top=8, bottom=8)
    assert wide.size == (80, 80) and (np.asarray(wide_mask)[8:72, :64] == 0).all()


# --------------------------------------------------------------- tricks, SCQ, TomeMGT, compile
@pytest.mark.parametrize("preset", ["paper-combo", "paper-combo-root"])
def test_sampler_tricks_keep_unmasked_tokens(random_pipeline, scene, preset):
    config = SamplerConfig.preset(preset, base=random_pipeline.settings.sampler)
    config = config.with_overrides({"momentum.order": 2, "zsampling.remask": "official"})
    mask = _box_mask()
    out = _inpaint(random_pipeline, scene, mask, sampler=config)
    encoded = MGTInpaintPipeline.from_pipe(random_pipeline).encode_image(scene)[0]
    assert torch.equal(out.tokens[0][~token_mask(mask, F)], encoded[~token_mask(mask, F)])
    assert out.nfe > config.num_steps  # Z-sampling ran
    i2i = MGTImg2ImgPipeline.from_pipe(random_pipeline)("a red circle", image=scene, strength=0.5, seed=0,
                                                        sampler=config, progress=False)
    assert i2i.tokens.shape == (1, 16, 16)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, random_pipeline_dir):
    """A random W4A8/W4A16 pipeline and its checkpoint, written by `mgtq export`'s writer."""
    from mgtq.export import write_checkpoint
    from mgtq.quantization import checkpoint
    from testkit import random_quantized_pipeline

    pipe = random_quantized_pipeline()
    manifest = checkpoint.describe(pipe.transformer)
    folder = tmp_path_factory.mktemp("q") / "ckpt"
    return pipe, write_checkpoint(random_pipeline_dir, pipe.transformer, manifest, folder)


def test_quantized_checkpoint_edits(quantized, scene):
    from mgtq.quantization import W4A8Linear

    pipe, folder = quantized
    inpaint = MGTInpaintPipeline.from_pretrained(folder)
    assert any(isinstance(m, W4A8Linear) for m in inpaint.transformer.modules())
    mask = _box_mask()
    config = SamplerConfig.preset("paper-combo", base=inpaint.settings.sampler)
    out = _inpaint(inpaint, scene, mask, sampler=config)
    assert torch.equal(out.tokens, _inpaint(pipe, scene, mask, sampler=config).tokens)  # same as in memory
    encoded = inpaint.encode_image(scene)[0]
    assert torch.equal(out.tokens[0][~token_mask(mask, F)], encoded[~token_mask(mask, F)])
    i2i = MGTImg2ImgPipeline.from_pretrained(folder)
    assert torch.equal(i2i("a red circle", image=scene, strength=1.0, seed=2, progress=False).tokens,
                       pipe("a red circle", seed=2, progress=False).tokens)
    half = i2i("a red circle", image=scene, strength=0.5, seed=2, progress=False)
    assert (half.tokens == encoded).sum() >= 256 - _remasked(i2i, 0.5)
    # with Z-sampling, the kept tokens are decoded tokens like any other: its inversion may re-draw them
    assert i2i("a red circle", image=scene, strength=0.5, seed=2, sampler=config, progress=False).nfe > half.nfe


def test_tomemgt_applies_to_the_siblings_and_keeps_unmasked_tokens(scene):
    from mgtq.merging import apply_tomemgt, remove_tomemgt
    from testkit import build_random_pipeline

    class LastLogits(SamplerHooks):  # the first step merges nothing: every repainted token is still masked
        def adjust_logits(self, logits, state):
            self.logits = logits.clone()
            return logits

    pipe = build_random_pipeline()
    inpaint = MGTInpaintPipeline.from_pipe(pipe)
    mask = _box_mask()
    plain_hook, merged_hook = LastLogits(), LastLogits()
    plain = _inpaint(inpaint, scene, mask, hooks=plain_hook).tokens
    plan = apply_tomemgt(pipe, 0.5, blocks="all")
    assert inpaint.transformer.token_hook is plan  # installed on the shared transformer
    merged = _inpaint(inpaint, scene, mask, hooks=merged_hook).tokens
    assert not torch.allclose(merged_hook.logits, plain_hook.logits)  # the merging ran
    repaint = token_mask(mask, F)
    assert torch.equal(merged[0][~repaint], plain[0][~repaint])
    i2i = MGTImg2ImgPipeline.from_pipe(pipe)("a red circle", image=scene, strength=0.5, seed=0, progress=False)
    assert (i2i.tokens == inpaint.encode_image(scene)).sum() >= 256 - _remasked(pipe, 0.5)
    remove_tomemgt(pipe)
    assert torch.equal(_inpaint(inpaint, scene, mask).tokens, plain)


def test_compiled_transformer_gives_the_same_edits(scene):
    from testkit import build_random_pipeline

    pipe = build_random_pipeline()
    mask = _box_mask()
    eager = _inpaint(pipe, scene, mask).tokens
    eager_i2i = MGTImg2ImgPipeline.from_pipe(pipe)("a red circle", image=scene, strength=0.5, seed=0,
                                                   progress=False).tokens
    torch._dynamo.reset()
    pipe.compile(backend="aot_eager")
    inpaint, i2i = MGTInpaintPipeline.from_pipe(pipe), MGTImg2ImgPipeline.from_pipe(pipe)
    assert torch.equal(_inpaint(inpaint, scene, mask).tokens, eager)
    assert torch.equal(i2i("a red circle", image=scene, strength=0.5, seed=0, progress=False).tokens, eager_i2i)


# ------------------------------------------------------------------- diffusers conventions (issue 23)
def test_output_types_as_text_to_image(random_pipeline, scene):
    inpaint = MGTInpaintPipeline.from_pipe(random_pipeline)
    kw = dict(image=scene, mask_image=_box_mask(), seed=0, progress=False)
    pil = inpaint("a red circle", **kw)
    as_np = inpaint("a red circle", output_type="np", **kw)
    as_pt = inpaint("a red circle", output_type="pt", **kw)
    latent = inpaint("a red circle", output_type="latent", **kw)
    assert torch.equal(latent.images, pil.tokens) and torch.equal(as_np.tokens, pil.tokens)
    assert as_np.images.shape == (1, 64, 64, 3) and as_np.images.dtype == np.float32
    assert as_pt.images.shape == (1, 3, 64, 64) and torch.equal(torch.from_numpy(as_np.images).permute(0, 3, 1, 2),
                                                                as_pt.images)
    assert np.array_equal(np.asarray(pil.images[0]), (as_np.images[0] * 255).round().astype(np.uint8))
    with pytest.warns(DeprecationWarning, match='"latent"'):
        assert torch.equal(inpaint("a red circle", output_type="tokens", **kw).images, pil.tokens)
    i2i = MGTImg2ImgPipeline.from_pipe(random_pipeline)
    kw = dict(image=scene, strength=0.5, seed=0, progress=False)
    assert torch.equal(i2i("a red circle", output_type="latent", **kw).images, i2i("a red circle", **kw).tokens)
    for pipe, extra in ((inpaint, {"mask_image": _box_mask()}), (i2i, {})):
        with pytest.raises(ValueError, match=r"output_type must be one of \['pil', 'np', 'pt', 'latent'\]"):
            pipe("a red circle", image=scene, output_type="bogus", progress=False, **extra)


def test_return_dict_false_gives_a_tuple(random_pipeline, scene):
    inpaint = MGTInpaintPipeline.from_pipe(random_pipeline)
    out = inpaint("a red circle", image=scene, mask_image=_box_mask(), seed=0, progress=False, return_dict=False)
    assert isinstance(out, tuple) and len(out) == 1 and out[0][0].size == (64, 64)
    i2i = MGTImg2ImgPipeline.from_pipe(random_pipeline)
    kw = dict(image=scene, strength=0.5, seed=1, output_type="latent", progress=False)
    (tokens,) = i2i("a red circle", return_dict=False, **kw)
    assert torch.equal(tokens, i2i("a red circle", **kw).tokens)


def test_callback_on_step_end_sees_and_replaces_the_tokens(random_pipeline, scene):
    inpaint = MGTInpaintPipeline.from_pipe(random_pipeline)
    mask = _box_mask()
    repaint = token_mask(mask, F)
    encoded = inpaint.encode_image(scene)[0]
    seen = []

    def record(pipe, step, timestep, kwargs):
        assert isinstance(pipe, MGTInpaintPipeline) and timestep.shape == () and set(kwargs) == {"tokens"}
        assert torch.equal(kwargs["tokens"][0][~repaint], encoded[~repaint])  # fixed at every step
        seen.append((step, kwargs["tokens"].clone()))
        return kwargs

    out = _inpaint(inpaint, scene, mask, callback_on_step_end=record)
    steps = inpaint.settings.sampler.num_steps
    assert [s for s, _ in seen] == list(range(steps)) and torch.equal(seen[-1][1], out.tokens)

    def zero_decoded(pipe, step, timestep, kwargs):  # a returned "tokens" is where the next step starts
        tokens = kwargs["tokens"]
        return {"tokens": torch.where(repaint & (tokens != pipe.transformer.mask_token_id), 0, tokens)}

    zeroed = _inpaint(inpaint, scene, mask, callback_on_step_end=zero_decoded).tokens
    assert (zeroed[0][repaint] == 0).all() and torch.equal(zeroed[0][~repaint], encoded[~repaint])

    i2i = MGTImg2ImgPipeline.from_pipe(random_pipeline)
    seen.clear()
    out = i2i("a red circle", image=scene, strength=0.5, seed=0, progress=False,
              callback_on_step_end=lambda p, i, t, kw: seen.append((i, None)) or kw)
    assert [s for s, _ in seen] == list(range(steps - out.nfe, steps)) and 0 < out.nfe < steps
    with pytest.raises(ValueError, match=r"callback_on_step_end_tensor_inputs may name \['tokens'\]"):
        i2i("a red circle", image=scene, progress=False, callback_on_step_end_tensor_inputs=["latents"])


def test_offloading_gives_the_same_tokens(scene):
    from testkit import build_random_pipeline

    kw = dict(prompt="a red circle", image=scene, seed=3, output_type="latent", progress=False)
    calls = [(MGTInpaintPipeline, dict(mask_image=_box_mask(), **kw)), (MGTImg2ImgPipeline, dict(strength=0.5, **kw))]
    expected = [cls.from_pipe(build_random_pipeline())(**args).images for cls, args in calls]
    for offload in ("enable_model_cpu_offload", "enable_sequential_cpu_offload"):
        for (cls, args), tokens in zip(calls, expected):
            sibling = cls.from_pipe(build_random_pipeline())  # the same weights, no hooks left from before
            getattr(sibling, offload)(device="cpu")
            assert sibling.transformer.embed.embeddings.weight.is_meta == (offload == "enable_sequential_cpu_offload")
            assert torch.equal(sibling(**args).images, tokens)


def test_from_pipe_keeps_dtype_and_settings_and_round_trips():
    from mgtq.pipeline import PipelineSettings
    from testkit import build_random_pipeline

    pipe = build_random_pipeline().to(torch.bfloat16)
    pipe.settings.sampler = pipe.settings.sampler.replace(num_steps=3)
    inpaint = MGTInpaintPipeline.from_pipe(pipe)
    # diffusers' DiffusionPipeline.from_pipe casts to float32 unless given a dtype: the shared modules too
    assert pipe.dtype == inpaint.dtype == torch.bfloat16 and pipe.text_encoder.dtype == torch.bfloat16
    assert inpaint.settings.sampler.num_steps == 3
    back = mgtq.MGTPipeline.from_pipe(inpaint)
    assert type(back) is mgtq.MGTPipeline
    assert all(back.components[k] is v for k, v in pipe.components.items() if k != "settings")
    assert back.components["settings"] == pipe.settings and back.settings is not pipe.settings
    kw = dict(prompt="a red circle", seed=0, output_type="latent", progress=False)
    assert torch.equal(back(**kw).images, pipe(**kw).images)
    other = PipelineSettings(resolution=32)
    assert MGTImg2ImgPipeline.from_pipe(pipe, settings=other).settings is other
    with pytest.raises(TypeError, match=r"from_pipe takes the components .* got \['scheduler'\]"):
        MGTInpaintPipeline.from_pipe(pipe, scheduler=None)
    # diffusers' torch_dtype: its own dtype (or "auto") is fine; another would cast the shared modules
    assert MGTInpaintPipeline.from_pipe(pipe, torch_dtype=torch.bfloat16).dtype == torch.bfloat16
    assert MGTInpaintPipeline.from_pipe(pipe, torch_dtype="auto").dtype == torch.bfloat16
    with pytest.raises(TypeError, match=r"call \.to\(torch.float32\) on the pipeline"):
        MGTInpaintPipeline.from_pipe(pipe, torch_dtype=torch.float32)
    assert pipe.dtype == torch.bfloat16


# ------------------------------------------------------------------------------------- errors
def test_bad_inputs_get_one_clear_error(random_pipeline, scene):
    inpaint = MGTInpaintPipeline.from_pipe(random_pipeline)
    i2i = MGTImg2ImgPipeline.from_pipe(random_pipeline)
    mask = _box_mask()
    with pytest.raises(ValueError, match=r"multiples of 8 .* try 64×64"):
        inpaint("a red circle", image=scene[:62, :66], mask_image=mask[:62, :66], progress=False)
    with pytest.raises(ValueError, match=r"mask_image is 48×64 \(W×H\) but the image is 64×64"):
        inpaint("a red circle", image=scene, mask_image=mask[:, :48], progress=False)
    with pytest.raises(ValueError, match="all black: nothing to repaint"):
        inpaint("a red circle", image=scene, mask_image=np.zeros((64, 64), bool), progress=False)
    with pytest.raises(ValueError, match="all black"):
        inpaint("a red circle", image=scene, mask_image=Image.new("L", (64, 64), 100), progress=False)
    see_through = Image.fromarray(scene).convert("RGBA")
    see_through.putpixel((3, 5), (0, 0, 0, 0))
    with pytest.raises(ValueError, match=r"transparent pixels .* flatten it onto a background "
                                         r".*image.convert\('RGB'\) drops alpha"):
        inpaint("a red circle", image=see_through, mask_image=mask, progress=False)
    with pytest.raises(ValueError, match=r"uint8 array \(H, W, 3\) or a float one in \[0, 1\]"):
        i2i("a red circle", image=scene.astype(np.int32), progress=False)
    with pytest.raises(ValueError, match=r"values in \[0, 1\]"):
        i2i("a red circle", image=scene.astype(np.float32), progress=False)  # 0–255 floats
    with pytest.raises(ValueError, match=r"brightest value is 1 of 255: a 0/1 mask must be scaled"):
        inpaint("a red circle", image=scene, mask_image=mask.astype(np.uint8), progress=False)
    with pytest.raises(ValueError, match=r"float mask must hold values in \[0, 1\]"):
        inpaint("a red circle", image=scene, mask_image=mask * 255.0, progress=False)
    for strength in (0, 1.2, -1, float("nan")):
        with pytest.raises(ValueError, match=r"strength must be a number in \(0, 1\]"):
            i2i("a red circle", image=scene, strength=strength, progress=False)
    with pytest.raises(ValueError, match="2 images for 1 prompts"):
        i2i("a red circle", image=[scene, scene], progress=False)
    with pytest.raises(ValueError, match="nothing to outpaint"):
        outpaint_canvas(scene)
    with pytest.raises(ValueError, match="whole pixels"):
        outpaint_canvas(scene, left=-8)
    with pytest.raises(ValueError, match=r"makes a 100064×64 canvas, past mgtq's limit of 4096 px"):
        outpaint_canvas(scene, left=100000)  # refused before the canvas is allocated


def test_images_and_masks_in_the_forms_diffusers_takes_read_alike(scene):
    from mgtq.editing import image_array, mask_array

    grey = Image.fromarray(scene).convert("L")
    assert np.array_equal(image_array(grey), np.asarray(grey.convert("RGB")))  # modes without alpha: to RGB
    palette = Image.fromarray(scene).convert("P")
    assert np.array_equal(image_array(palette), np.asarray(palette.convert("RGB")))
    assert np.array_equal(image_array(scene.astype(np.float32) / 255), scene)  # diffusers' "np" images
    box = _box_mask()
    forms = [box, box.astype(np.uint8) * 255, box.astype(np.float32), torch.from_numpy(box).float(),
             torch.from_numpy(box)[None], Image.fromarray(box.astype(np.uint8) * 255).convert("RGBA"),
             Image.fromarray(box.astype(np.uint8) * 255).convert("P")]
    for form in forms:
        assert np.array_equal(mask_array(form, box.shape), box), type(form)


def test_images_come_as_diffusers_preprocess_takes_them_and_as_mgtq_outputs_them(random_pipeline, scene):
    # torch (C, H, W) / (N, C, H, W) in [0, 1], numpy (N, H, W, 3) float or uint8, and lists of them: a batch of N is N
    # images, one per prompt as a list's are (these were refused; "np"/"pt" outputs could not be fed back)
    from mgtq.editing import image_array

    inpaint = MGTInpaintPipeline.from_pipe(random_pipeline)
    i2i = MGTImg2ImgPipeline.from_pipe(random_pipeline)
    chw = torch.from_numpy(scene).permute(2, 0, 1).float() / 255
    other = np.ascontiguousarray(scene[::-1])
    pair_pt = torch.stack([chw, torch.from_numpy(other).permute(2, 0, 1).float() / 255])
    assert np.array_equal(image_array(chw), scene) and np.array_equal(image_array(chw.half()), scene)
    expected = inpaint.encode_image([scene, other])
    for form in (pair_pt, pair_pt.numpy().transpose(0, 2, 3, 1), np.stack([scene, other]), list(pair_pt),
                 [pair_pt[:1], other[None]], inpaint.image_processor.preprocess([Image.fromarray(scene),
                                                                                 Image.fromarray(other)])):
        assert torch.equal(inpaint.encode_image(form), expected), type(form)
    reference = i2i(["a red circle", "a blue square"], image=[scene, other], strength=0.6, seed=[1, 2], progress=False)
    for form in (pair_pt, np.stack([scene, other]).astype(np.float32) / 255):
        out = i2i(["a red circle", "a blue square"], image=form, strength=0.6, seed=[1, 2], progress=False)
        assert torch.equal(out.tokens, reference.tokens)
    one = i2i(["a red circle", "a blue square"], image=scene, strength=0.6, seed=[1, 2], progress=False)
    batch_of_one = i2i(["a red circle", "a blue square"], image=chw[None], strength=0.6, seed=[1, 2], progress=False)
    assert torch.equal(batch_of_one.tokens, one.tokens)  # a batch of one is one image for every prompt
    with pytest.raises(ValueError, match=r"got 2 images for 1 prompts \(a batch of N counts as N\)"):
        i2i("a red circle", image=pair_pt, progress=False)
    with pytest.raises(ValueError, match=r"values in \[0, 1\] .* got \[-1, .*map a \[-1, 1\] tensor with "
                                         r"\(x \+ 1\) / 2"):
        i2i("a red circle", image=chw * 2 - 1, progress=False)
    with pytest.raises(ValueError, match=r"a torch image must be \(3, H, W\).* got shape \(64, 64, 3\)"):
        inpaint.encode_image(torch.from_numpy(scene).float() / 255)


def test_masks_in_amuseds_shapes_and_dtypes_and_a_batch_gives_one_per_prompt(random_pipeline, scene):
    # numpy (H, W, 1), (1, H, W), (B, H, W), (B, H, W, 1); torch (B, 1, H, W), (B, H, W); integer dtypes as uint8;
    # a bfloat16 tensor (it raised numpy's "unsupported ScalarType BFloat16")
    from mgtq.editing import mask_array

    box = _box_mask()
    as255 = box.astype(np.int64) * 255
    forms = [box[..., None], box[None], as255, as255.astype(np.int32)[..., None], torch.from_numpy(as255),
             torch.from_numpy(box)[None, None].to(torch.bfloat16), torch.from_numpy(box).to(torch.bfloat16)[None]]
    for form in forms:
        assert np.array_equal(mask_array(form, box.shape), box), (type(form), form.shape, form.dtype)
    with pytest.raises(ValueError, match=r"brightest value is 1 of 255: a 0/1 mask must be scaled"):
        mask_array(box.astype(np.int64), box.shape)
    with pytest.raises(ValueError, match=r"integer mask must hold values in 0–255 .* \[0, 1000\]"):
        mask_array(box.astype(np.int64) * 1000, box.shape)
    inpaint = MGTInpaintPipeline.from_pipe(random_pipeline)
    other = _box_mask(40, 60, 4, 20)
    prompts = ["a red circle", "a blue square"]
    expected = inpaint(prompts, image=scene, mask_image=[box, other], seed=[0, 1], progress=False).tokens
    pair = np.stack([box, other])
    for form in (torch.from_numpy(pair)[:, None].float(), torch.from_numpy(pair).to(torch.bfloat16), pair,
                 pair[..., None].astype(np.uint8) * 255, [torch.from_numpy(box)[None, None], other]):
        out = inpaint(prompts, image=scene, mask_image=form, seed=[0, 1], progress=False)
        assert torch.equal(out.tokens, expected), type(form)
    with pytest.raises(ValueError, match=r"got 2 mask_images for 1 prompts"):
        inpaint("a red circle", image=scene, mask_image=pair, progress=False)


def test_inpainting_has_amuseds_mask_processor(random_pipeline, scene):
    # diffusers users' scripts blur masks with it (it was an AttributeError); the call still reads masks itself
    inpaint = MGTInpaintPipeline.from_pipe(random_pipeline)
    config = inpaint.mask_processor.config
    assert config.do_binarize and config.do_convert_grayscale and not config.do_normalize
    assert config.vae_scale_factor == inpaint.vae_scale_factor
    assert set(inpaint.components) == {"transformer", "vqvae", "text_encoder", "tokenizer", "settings"}
    blurred = inpaint.mask_processor.blur(Image.fromarray(_box_mask().astype(np.uint8) * 255), blur_factor=3)
    out = inpaint("a red circle", image=scene, mask_image=blurred, seed=0, progress=False)
    assert torch.equal(out.tokens[0][~token_mask(np.asarray(blurred) >= 128, F)],
                       inpaint.encode_image(scene)[0][~token_mask(np.asarray(blurred) >= 128, F)])


def test_an_opaque_rgba_image_reads_as_rgb_and_size_errors_say_the_fix(random_pipeline, scene):
    inpaint = MGTInpaintPipeline.from_pipe(random_pipeline)
    mask = _box_mask()
    rgba = Image.fromarray(scene).convert("RGBA")  # as editors and screenshots save: alpha 255 everywhere
    assert torch.equal(_inpaint(inpaint, rgba, mask).tokens, _inpaint(inpaint, scene, mask).tokens)
    with pytest.raises(ValueError, match=r"mask_image is 32×32 .* mask.resize\(image.size, Image.NEAREST\)"):
        _inpaint(inpaint, scene, Image.fromarray(mask[::2, ::2]))
    with pytest.raises(ValueError, match=r"image is 60×60 .* multiples of 8 .* try 64×64: "
                                         r"image.resize\(\(64, 64\)\)"):
        _inpaint(inpaint, scene[:60, :60], mask[:60, :60])


def test_the_cli_checks_sizes_against_the_pipelines_token_pixels(random_pipeline, random_pipeline_dir):
    from mgtq.cli import _model_tile  # mgtq edit's check before the weights load, from the config files alone

    assert _model_tile(random_pipeline_dir) == random_pipeline.token_pixels == 8  # VQ factor 4 × compression 2
    assert random_pipeline.token_pixels == random_pipeline.vae_scale_factor * random_pipeline.transformer.grid_factor
    assert _model_tile(random_pipeline_dir / "missing") is None  # loading the model says why


def test_a_folder_without_downsample_in_its_transformer_config_has_the_transformers_default(random_pipeline_dir,
                                                                                           tmp_path):
    import shutil

    from mgtq.pipeline import folder_pixels_per_token
    from mgtq.files import read_json, write_json

    for part in ("vqvae", "transformer"):
        (tmp_path / part).mkdir()
        shutil.copy(random_pipeline_dir / part / "config.json", tmp_path / part / "config.json")
    config = read_json(tmp_path / "transformer" / "config.json")
    assert config.pop("downsample") is True
    write_json(tmp_path / "transformer" / "config.json", config)
    assert folder_pixels_per_token(tmp_path) == folder_pixels_per_token(random_pipeline_dir) == 8
    write_json(tmp_path / "transformer" / "config.json", {**config, "downsample": False})
    assert folder_pixels_per_token(tmp_path) == 4  # the VQ's factor alone


# ---------------------------------------------------------------------------------------- CLI
def test_cli_edit_mask_outpaint_and_strength(tmp_path, random_pipeline_dir, scene):
    image = tmp_path / "in.png"
    Image.fromarray(scene).save(image)
    mask = tmp_path / "mask.png"
    Image.fromarray(_box_mask().astype(np.uint8) * 255, mode="L").save(mask)
    base = ["edit", "--model", str(random_pipeline_dir), "--image", str(image), "--prompt", "a red circle",
            "--no-progress", "--device", "cpu"]
    for extra, name in ((["--mask", str(mask)], "m.png"), (["--outpaint", "8,8,0,0"], "o.png"),
                        (["--strength", "0.5", "--sampler", "paper-combo", "--seed", "3"], "s.png")):
        assert main(base + extra + ["--out", str(tmp_path / name)]) == 0
    assert Image.open(tmp_path / "m.png").size == (64, 64)
    assert Image.open(tmp_path / "o.png").size == (80, 64)
    pipe = MGTInpaintPipeline.from_pretrained(random_pipeline_dir)
    api = pipe("a red circle", image=scene, mask_image=_box_mask(), seed=0, progress=False).images[0]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "m.png")), np.asarray(api))
    # files as they come: an opaque RGBA PNG stored sideways (EXIF orientation) and a palette mask, read as
    # diffusers' load_image reads them
    rgba = Image.fromarray(np.rot90(scene).copy()).convert("RGBA")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to view": the stored pixels are the scene turned counter-clockwise
    rgba.save(image, exif=exif)
    Image.fromarray(_box_mask().astype(np.uint8) * 255, mode="L").convert("P").save(mask)
    assert main(base + ["--mask", str(mask), "--out", str(tmp_path / "m2.png")]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "m2.png")), np.asarray(api))


def test_cli_edit_errors(tmp_path, random_pipeline_dir, scene, capsys):
    image = tmp_path / "in.png"
    Image.fromarray(scene).save(image)
    base = ["edit", "--model", str(random_pipeline_dir), "--image", str(image), "--prompt", "a red circle",
            "--out", str(tmp_path / "o.png"), "--no-progress"]
    assert main(base) == 2
    assert "give --mask (inpaint), --outpaint L,R,T,B or --strength alone" in capsys.readouterr().err
    assert main(base + ["--mask", str(image), "--outpaint", "8,0,0,0"]) == 2
    assert "not allowed with argument" in capsys.readouterr().err
    assert main(base + ["--strength", "0.5", "--mask", str(image), "--out", str(tmp_path / "o.jpg")]) == 2
    assert "--out" in capsys.readouterr().err  # not a PNG: refused before any weight loads
    assert main(base + ["--strength", "2"]) == 2
    assert "strength" in capsys.readouterr().err
    assert main(base + ["--outpaint", "8,8"]) == 2
    assert "L,R,T,B" in capsys.readouterr().err
    assert main(base + ["--outpaint", "4,0,0,0"]) == 2
    assert "try --outpaint 4,4,0,0" in capsys.readouterr().err  # 68 px wide is not a multiple of 8
    assert not (tmp_path / "o.png").exists()
    mask = tmp_path / "mask.png"
    Image.fromarray(_box_mask()).save(mask)
    before = image.read_bytes(), mask.read_bytes()
    # writing the edit over a file it reads would lose the original
    for flag, out, extra in (("--image", image, ["--strength", "0.5"]), ("--mask", mask, ["--mask", str(mask)])):
        assert main(base[:-3] + ["--out", str(out), "--no-progress"] + extra) == 2
        assert f"is the {flag} file the edit reads" in capsys.readouterr().err
    assert (image.read_bytes(), mask.read_bytes()) == before
    args = ["edit", "--image", str(image), "--strength", "0.5", "--prompt", "a red circle", "--compile",
            "--tome", "0.5"]
    from mgtq.cli import build_parser

    parsed = build_parser().parse_args(args)
    assert parsed.compile and parsed.tome == 0.5 and parsed.func.__name__ == "cmd_edit"


def test_cli_edit_out_follows_generates_rule(tmp_path, random_pipeline_dir, scene, capsys):
    # a path without .png is a folder, as `mgtq generate --out` takes it (it used to be a PNG file named "results")
    image = tmp_path / "in.png"
    Image.fromarray(scene).save(image)
    base = ["edit", "--model", str(random_pipeline_dir), "--image", str(image), "--prompt", "a red circle",
            "--no-progress", "--device", "cpu", "--strength", "0.5"]
    assert main(base + ["--out", str(tmp_path / "results")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "results" / "0.png")
    assert (tmp_path / "results").is_dir() and Image.open(tmp_path / "results" / "0.png").format == "PNG"


def test_inpaint_strength_runs_only_the_last_steps_as_amused_does(random_pipeline, scene):
    inpaint = MGTInpaintPipeline.from_pipe(random_pipeline)
    mask, steps = _box_mask(), inpaint.settings.sampler.num_steps
    seen = []
    out = _inpaint(inpaint, scene, mask, strength=0.5, callback_on_step_end=lambda p, i, t, kw: seen.append(i) or kw)
    assert seen == list(range(steps - int(steps * 0.5), steps))
    repaint = token_mask(mask, F)
    assert torch.equal(out.tokens[0][~repaint], inpaint.encode_image(scene)[0][~repaint])
    assert (out.tokens < inpaint.transformer.mask_token_id).all()  # every repainted token decoded
    assert torch.equal(_inpaint(inpaint, scene, mask, strength=1.0).tokens, _inpaint(inpaint, scene, mask).tokens)
    with pytest.raises(ValueError, match="runs no step"):
        _inpaint(inpaint, scene, mask, strength=0.5 / steps)


def test_cli_edit_strength_with_a_mask_or_outpaint_is_the_inpaintings(tmp_path, random_pipeline_dir, scene):
    image, mask = tmp_path / "in.png", tmp_path / "mask.png"
    Image.fromarray(scene).save(image)
    Image.fromarray(_box_mask().astype(np.uint8) * 255, mode="L").save(mask)
    base = ["edit", "--model", str(random_pipeline_dir), "--image", str(image), "--prompt", "a red circle",
            "--no-progress", "--device", "cpu", "--seed", "2"]
    assert main(base + ["--mask", str(mask), "--strength", "0.5", "--out", str(tmp_path / "m.png")]) == 0
    assert main(base + ["--outpaint", "8,8,0,0", "--strength", "0.5", "--out", str(tmp_path / "o.png")]) == 0
    inpaint = MGTInpaintPipeline.from_pretrained(random_pipeline_dir)
    api = inpaint("a red circle", image=scene, mask_image=_box_mask(), strength=0.5, seed=2, progress=False)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "m.png")), np.asarray(api.images[0]))
    canvas, pad_mask = outpaint_canvas(Image.fromarray(scene), 8, 8, 0, 0)
    api = inpaint("a red circle", image=canvas, mask_image=pad_mask, strength=0.5, seed=2, progress=False)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "o.png")), np.asarray(api.images[0]))
    full = inpaint("a red circle", image=scene, mask_image=_box_mask(), seed=2, progress=False)
    assert not np.array_equal(np.asarray(full.images[0]), np.asarray(Image.open(tmp_path / "m.png")))


def test_inpainting_with_tomemgt_takes_sigma_over_the_repainted_area_and_any_batch(random_pipeline, scene,
                                                                                    monkeypatch):
    from mgtq.merging import TomeConfig, patch

    seen = []
    summary = patch._mask_summary
    monkeypatch.setattr(patch, "_mask_summary", lambda *a: seen.append(summary(*a)[0].tolist()) or summary(*a))
    inpaint = MGTInpaintPipeline.from_pipe(random_pipeline)
    small, large = _box_mask(8, 16, 8, 16), _box_mask(0, 48, 0, 48)
    kwargs = dict(progress=False, output_type="latent", token_merging=TomeConfig(ratio=0.5),
                  sampler=inpaint.settings.sampler.replace(num_steps=4, guidance_scale=3.0))  # CFG: batch [u; c]
    inpaint("a red circle", image=scene, mask_image=small, seed=0, **kwargs)
    assert seen[0] == [1.0, 1.0]  # the first step: every repainted token masked (it was 1/16 of the whole image)
    batch = inpaint(["a red circle", "a blue square"], image=scene, mask_image=[small, large], seed=[0, 1],
                    **kwargs).tokens
    for b, (prompt, mask) in enumerate([("a red circle", small), ("a blue square", large)]):
        alone = inpaint(prompt, image=scene, mask_image=mask, seed=b, **kwargs).tokens[0]
        assert torch.equal(batch[b], alone), b


def test_a_sibling_built_from_components_samples_with_the_checkpoints_settings():
    """diffusers' idiom `Sibling(**pipe.components)` shares the modules and copies the settings: without them the
    sibling ran the official defaults (1024 px, 48 steps, CFG 9, step-index timesteps, 0..1 images)."""
    pipe = mgtq.load(progress=False)
    inpaint = MGTInpaintPipeline(**pipe.components)
    assert inpaint.settings == pipe.settings and inpaint.settings is not pipe.settings
    assert all(getattr(inpaint, k) is getattr(pipe, k) for k in ("transformer", "vqvae", "text_encoder", "tokenizer"))
    inpaint.settings.sampler = inpaint.settings.sampler.replace(num_steps=3)  # the copy's, not pipe's
    assert pipe.settings.sampler.num_steps != 3
    kw = dict(prompt="a red circle", seed=0, output_type="latent", progress=False, num_inference_steps=2)
    assert torch.equal(mgtq.MGTPipeline(**pipe.components)(**kw).images, pipe(**kw).images)


def test_the_callback_gets_each_samples_timestep_where_their_masks_make_them_differ(random_pipeline, scene):
    inpaint = MGTInpaintPipeline.from_pipe(random_pipeline)
    shapes, steps = [], []
    inpaint(["a red circle", "a red circle"], image=scene, mask_image=[_box_mask(), _box_mask(0, 64, 0, 64)],
            progress=False, seed=0, num_inference_steps=4,
            callback_on_step_end=lambda p, i, t, kw: shapes.append(tuple(t.shape)) or steps.append(t.clone()) or kw)
    assert (2,) in shapes and all(s in ((), (2,)) for s in shapes)  # (2,) where the two samples' timesteps differ
    assert all(t.ndim == 0 or t[0] != t[1] for t in steps)


def test_an_rgb_array_given_as_a_mask_is_named_as_one(random_pipeline, scene):
    rgb = np.repeat((_box_mask() * 255).astype(np.uint8)[..., None], 3, axis=2)
    with pytest.raises(ValueError, match=r"mask_image of shape \(64, 64, 3\) looks like an RGB\(A\) image"):
        _inpaint(random_pipeline, scene, rgb)
    assert _inpaint(random_pipeline, scene, Image.fromarray(rgb)).tokens.shape == (1, 16, 16)  # the PIL image reads
