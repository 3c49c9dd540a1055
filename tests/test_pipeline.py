"""MGTPipeline and `mgtq generate` on a small random pipeline (real VQModel, CLIP, tokenizer classes),
and its diffusers surface and argument checks on the embedded model and on a quantized export of it
(W4A8 on a third of the layers, W4A16 on the rest)."""

import json
import shutil

import pytest
import torch
from PIL import Image

import mgtq
from mgtq.cli import main
from mgtq.pipeline import MGTPipeline, MGTPipelineOutput, set_default_sampler
from mgtq.sampling import SamplerConfig
from testkit import as_official_folder


def test_generates_images_and_tokens(random_pipeline):
    out = random_pipeline(["a red circle", "two blue squares"], seed=0, progress=False)
    assert out.tokens.shape == (2, 16, 16) and out.tokens.max() < random_pipeline.transformer.config.codebook_size
    assert len(out.images) == 2 and out.images[0].size == (64, 64)


def test_seed_determinism_and_batch_independence(random_pipeline):
    a = random_pipeline(["a red circle", "a green square"], seed=5, progress=False).tokens
    b = random_pipeline(["a red circle"], seed=5, progress=False).tokens
    c = random_pipeline(["a green square"], seed=6, progress=False).tokens
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], c[0])


def test_save_load_round_trip_same_images(random_pipeline, random_pipeline_dir):
    loaded = MGTPipeline.from_pretrained(random_pipeline_dir)
    kwargs = dict(prompt="a blue triangle", seed=1, progress=False)
    assert torch.equal(random_pipeline(**kwargs).tokens, loaded(**kwargs).tokens)


def test_resolution_not_divisible_is_clear_error(random_pipeline):
    with pytest.raises(ValueError, match="multiple of 8"):
        random_pipeline("a red circle", height=60, width=64, progress=False)


def test_overlong_prompt_is_truncated_with_warning(random_pipeline):
    long = " ".join(["red circle"] * 40)
    with pytest.warns(UserWarning, match="cut off"):
        text, pooled = random_pipeline.encode_prompt([long])
    assert text.shape[1] == random_pipeline.tokenizer.model_max_length


def test_missing_text_encoder_is_clear_error(tmp_path, random_pipeline_dir):
    folder = tmp_path / "no-te"
    shutil.copytree(random_pipeline_dir, folder)
    shutil.rmtree(folder / "text_encoder")
    with pytest.raises(FileNotFoundError, match="text_encoder=PATH"):
        MGTPipeline.from_pretrained(folder)


def test_official_layout_without_mgtq_settings_uses_official_sampler(tmp_path, random_pipeline_dir):
    folder = tmp_path / "official"
    shutil.copytree(random_pipeline_dir, folder)
    as_official_folder(folder)
    pipe = MGTPipeline.from_pretrained(folder)
    assert pipe.settings.sampler.timestep_convention == "step_index"
    assert pipe.settings.sampler.num_steps == 48 and pipe.settings.sampler.guidance_scale == 9.0


def test_save_config_is_refused_and_a_folder_mgtq_wrote_never_reads_as_official(tmp_path, random_pipeline,
                                                                                  random_pipeline_dir):
    folder = shutil.copytree(random_pipeline_dir, tmp_path / "ckpt")
    before = (folder / "model_index.json").read_bytes()
    with pytest.raises(NotImplementedError, match="save_config would write model_index.json without mgtq's "
                                                  "settings .* save_pretrained"):
        random_pipeline.save_config(folder)  # diffusers' would drop the settings: 1024 px, 48 steps, CFG 9 after
    assert (folder / "model_index.json").read_bytes() == before
    index = json.loads(before)
    index.pop("mgtq")
    index.pop("mgtq_files")  # what diffusers' save_config writes: the classes alone
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="names mgtq's classes but has no 'mgtq' settings"):
        MGTPipeline.from_pretrained(folder)


def test_diffusers_loading_habits_load_or_say_what_to_do(random_pipeline, random_pipeline_dir):
    pipe = MGTPipeline.from_pretrained(random_pipeline_dir, use_safetensors=True, local_files_only=True,
                                       low_cpu_mem_usage=False, progress=False)
    MGTPipeline.from_pretrained(random_pipeline_dir, variant=None, revision=None, use_safetensors=None,
                                progress=False)  # diffusers' defaults, as a wrapper passes them on, ask for nothing
    assert pipe.name_or_path == str(random_pipeline_dir)
    for options in ({"variant": "fp16"}, {"revision": "main"}, {"cache_dir": "x", "token": "t"}):
        with pytest.raises(TypeError, match=r"loads a local folder .* huggingface_hub.snapshot_download"):
            MGTPipeline.from_pretrained(random_pipeline_dir, **options)
    with pytest.raises(ValueError, match="safetensors only"):
        MGTPipeline.from_pretrained(random_pipeline_dir, use_safetensors=False)
    # a component given as a folder loads, as text_encoder= and tokenizer= do
    parts = MGTPipeline.from_pretrained(random_pipeline_dir, transformer=str(random_pipeline_dir / "transformer"),
                                        vqvae=random_pipeline_dir / "vqvae", progress=False)
    assert torch.equal(parts("a red circle", seed=1, num_inference_steps=2, progress=False).tokens,
                       pipe("a red circle", seed=1, num_inference_steps=2, progress=False).tokens)
    with pytest.raises(TypeError, match="transformer= takes a loaded module or a folder path, got int"):
        MGTPipeline.from_pretrained(random_pipeline_dir, transformer=3)


def test_cli_generate_writes_pngs(tmp_path, random_pipeline_dir):
    out = tmp_path / "img.png"
    code = main(["generate", "--model", str(random_pipeline_dir), "--prompt", "a red circle", "--steps", "4",
                 "--num-images", "2", "--seed", "3", "--out", str(out), "--no-progress", "--device", "cpu"])
    assert code == 0
    files = sorted(tmp_path.glob("img-*.png"))
    assert [f.name for f in files] == ["img-0.png", "img-1.png"]
    assert Image.open(files[0]).size == (64, 64)
    assert not list(tmp_path.glob(".*tmp"))


def test_cli_missing_model_exits_with_message(tmp_path, capsys):
    code = main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "x", "--device", "cpu"])
    assert code == 2
    assert "does not exist" in capsys.readouterr().err


def test_set_default_sampler_changes_only_the_settings(tmp_path, random_pipeline_dir):
    folder = tmp_path / "pipe"
    shutil.copytree(random_pipeline_dir, folder)
    before = MGTPipeline.from_pretrained(folder)
    chosen = before.settings.sampler.with_overrides({"guidance_scale": 2.0, "gumbel_temperature": (1.0, 0.0)})
    set_default_sampler(folder, chosen)
    after = MGTPipeline.from_pretrained(folder)
    assert after.settings.sampler == chosen and after.settings.resolution == before.settings.resolution
    assert torch.equal(after("a red circle", seed=3, progress=False).tokens,
                       before("a red circle", seed=3, progress=False, sampler=chosen).tokens)
    index = json.loads((folder / "model_index.json").read_text())
    index.pop("mgtq")
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="not an mgtq pipeline"):
        set_default_sampler(folder, chosen)


def test_cli_eval_writes_json(tmp_path, random_pipeline_dir):
    out = tmp_path / "eval.json"
    code = main(["eval", "--model", str(random_pipeline_dir), "--limit", "5", "--steps", "2", "--json", str(out),
                 "--no-progress", "--device", "cpu"])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["n"] == 5 and 0.0 <= result["overall"] <= 1.0
    assert set(result["per_category"]) == {"single", "colour", "position", "two_objects", "counting"}
    assert result["sampler"]["num_steps"] == 2 and result["split"] == "test"
    val = tmp_path / "val.json"
    assert main(["eval", "--model", str(random_pipeline_dir), "--limit", "5", "--steps", "2", "--json", str(val),
                 "--no-progress", "--device", "cpu", "--split", "val"]) == 0
    assert json.loads(val.read_text())["split"] == "val"


def test_cli_generate_with_enhanced_sampler_flags(tmp_path, random_pipeline_dir):
    out = tmp_path / "e.png"
    code = main(["generate", "--model", str(random_pipeline_dir), "--prompt", "a red circle", "--steps", "4",
                 "--sampler", "paper-combo", "--noise-scale", "2", "--out", str(out), "--no-progress", "--device", "cpu"])
    assert code == 0 and out.exists()


def test_cli_generate_with_tome(tmp_path, random_pipeline_dir, monkeypatch):
    """--tome merges: the joint blocks' attention sees fewer image tokens than without it, the single blocks the same."""
    from mgtq.models.transformer import Attention

    seen = []
    forward = Attention.forward

    def recording(self, x, *args, **kwargs):
        seen.append((self.joint, x.shape[1]))  # joint: image tokens only; single: [text; image]
        return forward(self, x, *args, **kwargs)

    monkeypatch.setattr(Attention, "forward", recording)
    runs = {}
    for name, flags in (("plain", []), ("tome", ["--tome", "0.5"])):
        seen.clear()
        out = tmp_path / f"{name}.png"
        code = main(["generate", "--model", str(random_pipeline_dir), "--prompt", "a red circle", "--steps", "3",
                     *flags, "--out", str(out), "--no-progress", "--device", "cpu"])
        assert code == 0 and out.exists()
        runs[name] = list(seen)
    plain, tome = runs["plain"], runs["tome"]
    assert [joint for joint, _ in plain] == [joint for joint, _ in tome]
    joint_pairs = [(p, t) for (joint, p), (_, t) in zip(plain, tome) if joint]
    assert all(t <= p for p, t in joint_pairs) and any(t < p for p, t in joint_pairs)
    assert [n for joint, n in plain if not joint] == [n for joint, n in tome if not joint]


def test_settings_with_an_unknown_key_is_an_error_naming_it(tmp_path, random_pipeline_dir):
    folder = tmp_path / "p"
    shutil.copytree(random_pipeline_dir, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["mgtq"]["resolutoin"] = 64
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="model_index.json: unknown key 'mgtq.resolutoin'"):
        MGTPipeline.from_pretrained(folder)


def test_dtype_keyword_and_torch_dtype_alias(random_pipeline_dir):
    import mgtq

    assert mgtq.load(random_pipeline_dir, dtype="bf16").transformer.dtype == torch.bfloat16
    assert mgtq.load(random_pipeline_dir, torch_dtype=torch.bfloat16).text_encoder.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="not both"):
        mgtq.load(random_pipeline_dir, dtype=torch.float32, torch_dtype=torch.float32)


STEPS = dict(num_inference_steps=3)


@pytest.fixture(scope="module")
def quantized_dir(tmp_path_factory):
    pipe = mgtq.load(progress=False)
    mgtq.quantize_(pipe, mgtq.SCQConfig(), calibration_prompts=["a red circle", "two blue squares"])
    path = tmp_path_factory.mktemp("surface") / "scq-ptq"
    pipe.save_pretrained(path, progress=False)
    return path


@pytest.fixture(scope="module")
def embedded():
    return mgtq.load(progress=False)


@pytest.fixture(params=["embedded", "quantized"])
def pipe(request, quantized_dir):
    path = None if request.param == "embedded" else quantized_dir
    return mgtq.load(path, progress=False)


def test_output_types_decode_the_same_tokens(pipe):
    kwargs = dict(prompt="a red circle", seed=4, progress=False, **STEPS)
    latent = pipe(output_type="latent", **kwargs)
    assert torch.equal(latent.images, latent.tokens) and latent.images.dtype == torch.long
    pt = pipe(output_type="pt", **kwargs)
    assert torch.equal(pt.tokens, latent.tokens)
    assert torch.equal(pt.images, pipe.decode_tokens(latent.tokens, output_type="pt"))


def test_return_dict_false_is_a_tuple_of_the_images(pipe):
    kwargs = dict(prompt="a red circle", seed=5, output_type="latent", progress=False, **STEPS)
    out = pipe(return_dict=False, **kwargs)
    assert isinstance(out, tuple) and len(out) == 1 and torch.equal(out[0], pipe(**kwargs).images)
    assert isinstance(pipe(**kwargs), MGTPipelineOutput)


def test_callback_sees_every_step_and_can_replace_tokens(pipe):
    mask = pipe.transformer.mask_token_id
    calls = []

    def keep_everything_masked(p, step, timestep, kwargs):
        calls.append((p is pipe, step, tuple(timestep.shape), (kwargs["tokens"] == mask).float().mean().item()))
        return {"tokens": torch.full_like(kwargs["tokens"], mask)} if step < 2 else kwargs

    out = pipe("a red circle", seed=0, output_type="latent", progress=False, callback_on_step_end=keep_everything_masked,
               callback_on_step_end_tensor_inputs=["tokens"], **STEPS)
    assert [c[:3] for c in calls] == [(True, 0, ()), (True, 1, ()), (True, 2, ())]  # diffusers' one timestep
    assert calls[1][3] < 1.0  # step 1 unmasked some tokens of the all-mask grid the callback put back
    assert (out.tokens != mask).all()
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        pipe("a red circle", callback_on_step_end=lambda *a: a[-1], callback_on_step_end_tensor_inputs=["latents"])


def test_a_callback_compares_the_timestep_as_diffusers_callbacks_do_for_any_batch(pipe):
    seen = []

    def late_steps_only(p, step, t, kwargs):
        seen.append((tuple(t.shape), bool(t < 0.5)))  # a (B,) tensor made this comparison an error for B > 1
        return kwargs

    pipe(["a red circle", "two blue squares"], seed=0, output_type="latent", progress=False,
         callback_on_step_end=late_steps_only, **STEPS)
    assert [shape for shape, _ in seen] == [()] * 3


def test_returned_tokens_are_plain_tensors_and_a_callback_s_bad_return_is_named(pipe):
    kwargs = dict(prompt="a red circle", seed=0, progress=False, **STEPS)
    out = pipe(output_type="latent", **kwargs)
    for tokens in (out.images, out.tokens):  # the sampler runs in inference mode; its outputs are ordinary tensors
        assert not tokens.is_inference()
        tokens[0, 0, 0] = 5  # writable, as a diffusers pipeline's outputs
    embedded = torch.nn.Embedding(pipe.transformer.config.vocab_size, 4)(pipe(output_type="latent", **kwargs).images)
    embedded.sum().backward()  # and usable in autograd
    seen = []

    def in_place(p, step, timestep, kw):  # changed in place and handed back, diffusers' way
        seen.append(kw["tokens"].is_inference())
        kw["tokens"].fill_(pipe.transformer.mask_token_id)
        return kw

    masked = pipe(output_type="latent", callback_on_step_end=in_place, **{**kwargs, "num_inference_steps": 2})
    assert seen == [False, False] and (masked.images == pipe.transformer.mask_token_id).all()
    for bad, match in ((lambda p, i, t, kw: None, "must return a dict"),
                       (lambda p, i, t, kw: {"tokens": kw["tokens"][:, :3]}, r"return integer token ids of the shape"),
                       (lambda p, i, t, kw: {"tokens": kw["tokens"].float()}, "torch.float32")):
        with pytest.raises((TypeError, ValueError), match=match):
            pipe(callback_on_step_end=bad, **kwargs)


def test_set_progress_bar_config_silences_the_sampler(pipe, capsys):
    pipe("a red circle", seed=0, output_type="latent", **STEPS)
    assert "sampling" in capsys.readouterr().err
    pipe.set_progress_bar_config(disable=True)
    pipe("a red circle", seed=0, output_type="latent", **STEPS)
    assert "sampling" not in capsys.readouterr().err


@pytest.mark.parametrize("offload", ["model", "sequential", "accelerate"])
def test_offload_with_tomemgt_gives_the_same_tokens(pipe, offload):
    from accelerate import cpu_offload

    mgtq.apply_tomemgt(pipe, 0.5)
    kwargs = dict(prompt="two blue squares", seed=7, output_type="latent", progress=False, **STEPS)
    expected = pipe(**kwargs).images
    if offload == "model":
        pipe.enable_model_cpu_offload(device="cpu")
    elif offload == "sequential":
        pipe.enable_sequential_cpu_offload(device="cpu")
    else:
        cpu_offload(pipe.transformer, execution_device=torch.device("cpu"))
    assert torch.equal(pipe(**kwargs).images, expected)
    assert pipe.device == torch.device("cpu")  # as tensors say, not diffusers' "cpu:0"
    assert torch.equal(pipe(**kwargs).images, expected)  # a second call: diffusers re-adds model offload's hooks
    assert pipe.device == torch.device("cpu")


def test_to_dtype_and_device_spellings(pipe):
    assert pipe.to("cpu", torch.bfloat16) is pipe
    assert pipe.dtype == torch.bfloat16 and pipe.text_encoder.dtype == torch.bfloat16
    assert pipe.vqvae.dtype == torch.float32  # decodes in the dtype it was trained in
    pipe.to(dtype=torch.float32)
    assert pipe.dtype == torch.float32 and pipe.device == torch.device("cpu")
    assert pipe("a red circle", seed=0, output_type="latent", progress=False, **STEPS).tokens.shape == (1, 16, 16)
    with pytest.raises(TypeError, match="at most two"):
        pipe.to("cpu", torch.float32, "again")


def test_torch_dtype_auto_is_the_saved_dtype(tmp_path):
    pipe = mgtq.load(progress=False).to(torch.bfloat16)
    pipe.save_pretrained(tmp_path / "bf16", progress=False)
    auto = mgtq.load(tmp_path / "bf16", torch_dtype="auto", progress=False)
    assert auto.dtype == torch.bfloat16 and auto.text_encoder.dtype == torch.bfloat16
    assert mgtq.load(tmp_path / "bf16", torch_dtype=torch.float32, progress=False).dtype == torch.float32
    with pytest.warns(DeprecationWarning, match="torch_dtype"):
        assert mgtq.load(tmp_path / "bf16", dtype="fp32", progress=False).dtype == torch.float32


@pytest.mark.parametrize("dtypes, auto", [((torch.bfloat16, torch.float32), torch.float32),
                                           ((torch.float16, torch.bfloat16), torch.float32),
                                           ((torch.float16, torch.float16), torch.float16)])
def test_torch_dtype_auto_of_mixed_float_dtypes_loses_nothing(tmp_path, dtypes, auto):
    # the first tensor's dtype (transformers' "auto") would round the other tensors
    from safetensors.torch import save_file

    tensors = {"a.weight": torch.ones(2, dtype=dtypes[0]), "b.weight": torch.ones(2, dtype=dtypes[1]),
               "c.index": torch.ones(2, dtype=torch.int64)}
    save_file(tensors, tmp_path / "model.safetensors")
    assert mgtq.pipeline.saved_dtype(tmp_path) == auto


def test_device_map_names_one_device():
    assert mgtq.load(device_map="cpu", progress=False).device == torch.device("cpu")
    with pytest.raises(ValueError, match="enable_model_cpu_offload"):
        mgtq.load(device_map="balanced", progress=False)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_device_map_cuda_matches_moving_later(quantized_dir):
    on_gpu = mgtq.load(quantized_dir, device_map="cuda", progress=False)
    assert on_gpu.device.type == "cuda"
    kwargs = dict(prompt="a red circle", seed=0, output_type="latent", progress=False, **STEPS)
    assert torch.equal(on_gpu(**kwargs).images.cpu(), mgtq.load(quantized_dir, progress=False).to("cuda")(**kwargs).images.cpu())



def test_a_generator_is_the_first_images_as_in_a_list_of_one():
    """diffusers' `generator=g` and `[g]` are one image; mgtq's `seed=s` is `G(s)`. Image i does not depend on how
    many images share the call, and a generator used again goes on from where it stopped."""
    pipe = mgtq.load(progress=False)
    kwargs = dict(output_type="latent", progress=False, **STEPS)
    g = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    alone = pipe("a red circle", seed=7, **kwargs).images
    assert torch.equal(pipe("a red circle", generator=g(), **kwargs).images, alone)
    assert torch.equal(pipe("a red circle", generator=[g()], **kwargs).images, alone)
    two = pipe(["a red circle", "a red circle"], generator=g(), **kwargs).images
    three = pipe(["a red circle", "a red circle", "a red circle"], generator=g(), **kwargs).images
    assert torch.equal(two[:1], alone) and torch.equal(three[:2], two)
    assert not torch.equal(two[0], two[1])  # the others have seeds of their own
    used = g()
    assert torch.equal(pipe("a red circle", generator=used, **kwargs).images, alone)
    assert not torch.equal(pipe("a red circle", generator=used, **kwargs).images, alone)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_generators_and_cpu_generator_lists_on_a_cuda_pipeline(quantized_dir):
    """diffusers' idioms on a GPU: generator=torch.Generator("cuda") (its seeds are drawn on the GPU), and a list
    of CPU generators (each seeds one on the GPU): both reproducible."""
    pipe = mgtq.load(quantized_dir, progress=False).to("cuda")
    kwargs = dict(prompt=["a red circle", "a blue square"], output_type="latent", progress=False, **STEPS)
    first = pipe(generator=torch.Generator("cuda").manual_seed(5), **kwargs).images
    assert torch.equal(first, pipe(generator=torch.Generator("cuda").manual_seed(5), **kwargs).images)
    cpu_list = lambda: [torch.Generator().manual_seed(s) for s in (1, 2)]  # noqa: E731
    assert torch.equal(pipe(generator=cpu_list(), **kwargs).images, pipe(generator=cpu_list(), **kwargs).images)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_sequential_offload_with_a_w4a8_weight_cache_on_cuda(quantized_dir):
    kwargs = dict(prompt="a red circle", seed=0, output_type="latent", progress=False, **STEPS)
    reference = mgtq.load(quantized_dir, progress=False).to("cuda")(**kwargs).images.cpu()
    from mgtq.quantization import W4A8Linear

    pipe = mgtq.load(quantized_dir, progress=False)
    layers = [m for m in pipe.transformer.modules() if isinstance(m, W4A8Linear)]
    for layer in layers:
        layer.enable_weight_cache("int8")  # built on the host; the offload hooks move only parameters and buffers
    assert layers
    pipe.enable_sequential_cpu_offload()
    assert torch.equal(pipe(**kwargs).images.cpu(), reference)

# ------------------------------------------------------------------------------ issue 29: check_inputs
@pytest.mark.parametrize("kwargs, error, match", [
    (dict(prompt="a", num_images_per_prompt=0), ValueError, "num_images_per_prompt must be an integer ≥ 1"),
    (dict(prompt=None), TypeError, "prompt must be a str or a list of str"),
    (dict(prompt=["a", None]), TypeError, "prompt must be a str or a list of str"),
    (dict(prompt=[]), TypeError, "prompt must be a str or a list of str"),
    (dict(prompt="a", height=64.0), ValueError, "height must be a positive multiple of 8"),
    (dict(prompt="a", height=0), ValueError, "height must be a positive multiple of 8"),
    (dict(prompt="a", width=-64), ValueError, "width must be a positive multiple of 8"),
    (dict(prompt="a", seed=2**64), ValueError, r"seed must be an int in \[0, 2\*\*63\)"),
    (dict(prompt="a", seed=1.5), ValueError, r"seed must be an int in \[0, 2\*\*63\)"),
    (dict(prompt="a", seed=-1), ValueError, r"seed must be an int in \[0, 2\*\*63\)"),
    (dict(prompt="a", sampler="vanilla"), TypeError, "sampler must be a SamplerConfig"),
    (dict(prompt="a", sampler={"num_step": 3}), ValueError, "num_step"),
    (dict(prompt="a", negative_prompt=3), TypeError, "negative_prompt must be None, a str or a list of str"),
    (dict(prompt="a", token_merging="half"), TypeError, "token_merging must be a TomeConfig, a ratio"),
])
def test_bad_arguments_are_refused_in_mgtq_words(embedded, kwargs, error, match):
    with pytest.raises(error, match=match):
        embedded(progress=False, **kwargs)


def test_a_sampler_mapping_changes_the_checkpoints_settings_and_the_model_keeps_its_timestep_convention(embedded):
    pipe, base = embedded, embedded.settings.sampler
    assert base.timestep_convention == "mask_ratio"  # what the embedded model was trained with
    kwargs = dict(prompt="a red circle", seed=0, output_type="latent", progress=False)
    as_dict = pipe(sampler={"num_steps": 3, "noise": {"curve": "abs_cos"}}, **kwargs).images
    assert torch.equal(as_dict, pipe(sampler=base.replace(num_steps=3, noise={"curve": "abs_cos"}), **kwargs).images)
    assert torch.equal(as_dict, pipe(sampler={"num_steps": 3, "noise.curve": "abs_cos"}, **kwargs).images)
    # a config made without the checkpoint (the class's preset) leaves the convention to the model: it used to
    # feed this model the official step indices, which it never saw in training
    own = SamplerConfig.preset("vanilla", num_steps=3, guidance_scale=base.guidance_scale,
                               gumbel_temperature=base.gumbel_temperature)
    assert own.timestep_convention is None and pipe.sampler_config(own).timestep_convention == "mask_ratio"
    assert torch.equal(pipe(sampler=own, **kwargs).images, pipe(sampler=base.replace(num_steps=3), **kwargs).images)
    explicit = own.replace(timestep_convention="step_index")  # an explicit choice is the caller's
    assert pipe.sampler_config(explicit).timestep_convention == "step_index"
    with pytest.raises(ValueError, match="unknown sampler setting 'noise.curb'"):
        pipe(sampler={"noise": {"curb": "abs_cos"}}, **kwargs)


def test_settings_keep_their_models_timestep_convention_for_a_sampler_set_without_one(tmp_path, embedded):
    from mgtq.pipeline import read_settings, set_default_sampler

    embedded.save_pretrained(tmp_path / "p", progress=False)
    set_default_sampler(tmp_path / "p", SamplerConfig.preset("paper-combo", num_steps=8))  # convention None
    saved = read_settings(tmp_path / "p").sampler
    assert saved.timestep_convention == "mask_ratio" and saved.num_steps == 8
    pipe = mgtq.load(tmp_path / "p", progress=False)
    pipe.settings.sampler = SamplerConfig(num_steps=3)
    assert pipe.settings.sampler.timestep_convention == "mask_ratio"
    pipe.settings.sampler = SamplerConfig(num_steps=3, timestep_convention="step_index")  # an explicit choice
    assert pipe.settings.sampler.timestep_convention == "step_index"


def test_non_finite_logits_from_damaged_weights_name_the_weights_not_the_guidance():
    import mgtq

    pipe = mgtq.load(progress=False)
    with torch.no_grad():
        pipe.transformer.project_from_hidden.weight[0, 0] = float("nan")  # a module damaged after loading
    with pytest.raises(FloatingPointError, match="transformer's tensor 'project_from_hidden.weight' holds NaN"):
        pipe("a red circle", seed=0, output_type="latent", progress=False, num_inference_steps=2)


def test_bfloat16_on_mps_before_macos_14_is_refused_with_what_to_do(random_pipeline, monkeypatch):
    import torch

    from mgtq.pipeline import _check_mps_dtype

    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: False)
    before = random_pipeline.transformer.dtype
    with pytest.raises(ValueError, match=r"bfloat16 on mps needs macOS 14 or newer: load with torch_dtype=torch"):
        random_pipeline.to("mps", torch.bfloat16)
    assert random_pipeline.transformer.dtype == before and random_pipeline.device.type == "cpu"  # nothing moved
    _check_mps_dtype("mps", torch.float16)  # float16 is there on every macOS
    _check_mps_dtype("cpu", torch.bfloat16)
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: (major, minor) <= (14, 0))
    _check_mps_dtype("mps", torch.bfloat16)  # macOS 14: bfloat16 is there
