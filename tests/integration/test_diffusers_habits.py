"""Not per module: each habit crosses loading, the pipeline, quantization and merging, as users do.

Issue 23's "Why", replayed habit by habit as a diffusers user types it, on the embedded model.

Each test is one bullet of the issue: what failed (or silently went wrong) then, and what must hold now.
"""

import json
import threading

import diffusers
import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from packaging.version import Version

import mgtq
from mgtq.cli import main
from mgtq.models import MeissonicTransformer
from mgtq.quantization import W4A8Linear, W4Linear

STEPS = dict(num_inference_steps=3)
DIFFUSERS = Version(diffusers.__version__)


@pytest.fixture(scope="module")
def pipe():
    pipe = mgtq.load(progress=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def quantized_dir(tmp_path_factory):
    """A W4A16 export of the embedded model, written by save_pretrained after quantizing in a script."""
    pipe = mgtq.load(progress=False)
    mgtq.quantize_(pipe, mgtq.W4A16Config())
    path = tmp_path_factory.mktemp("habits") / "w4a16"
    pipe.save_pretrained(path, progress=False)
    return path


def test_output_type_np_pt_and_bogus(pipe):
    pil = pipe("a red circle", seed=0, **STEPS).images
    as_np = pipe("a red circle", seed=0, output_type="np", **STEPS).images
    as_pt = pipe("a red circle", seed=0, output_type="pt", **STEPS).images
    assert as_np.shape == (1, 64, 64, 3) and as_np.dtype == np.float32 and 0 <= as_np.min() <= as_np.max() <= 1
    assert as_pt.shape == (1, 3, 64, 64) and torch.equal(torch.from_numpy(as_np).permute(0, 3, 1, 2), as_pt)
    assert np.array_equal(np.asarray(pil[0]), (as_np[0] * 255).round().astype(np.uint8))
    with pytest.raises(ValueError, match=r"output_type must be one of \['pil', 'np', 'pt', 'latent'\]"):
        pipe("a red circle", output_type="bogus", **STEPS)


def test_accelerate_cpu_offload_of_the_transformer(pipe):
    from accelerate import cpu_offload
    from accelerate.hooks import remove_hook_from_module

    expected = pipe("a red circle", seed=1, output_type="latent", **STEPS).images
    cpu_offload(pipe.transformer, execution_device=torch.device("cpu"))
    try:
        assert pipe.transformer.embed.embeddings.weight.is_meta  # what used to become the pipeline's device
        assert pipe.device == torch.device("cpu")
        got = pipe("a red circle", seed=1, output_type="latent", **STEPS).images
    finally:
        remove_hook_from_module(pipe.transformer, recurse=True)
    assert torch.equal(got, expected)


def test_layerwise_casting_fp8_storage_generates(tmp_path):
    pipe = mgtq.load(progress=False)
    pipe.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    assert pipe.transformer.transformer_blocks[0].attn.to_q.weight.dtype == torch.float8_e4m3fn
    # diffusers casts nn.Embedding layerwise too from 0.37 (before: Linear and Conv only)
    embedding = torch.float8_e4m3fn if DIFFUSERS >= Version("0.37") else torch.float32
    assert pipe.transformer.embed.embeddings.weight.dtype == embedding
    assert pipe.transformer.compute_dtype == torch.float32 and pipe.dtype == torch.float32
    tokens = pipe("a red circle", seed=0, output_type="latent", progress=False, **STEPS).images
    assert tokens.shape == (1, 16, 16) and int(tokens.max()) < pipe.transformer.config.codebook_size
    # a save of fp8-stored weights (no isfinite kernel for float8 on the CPU) loads back as the same model
    pipe.save_pretrained(tmp_path / "fp8", progress=False)
    again = mgtq.load(tmp_path / "fp8", progress=False)
    assert torch.equal(again("a red circle", seed=0, output_type="latent", progress=False, **STEPS).images, tokens)


def test_layerwise_casting_to_a_compute_dtype_other_than_the_loaded_one():
    import logging

    warned = []
    handler = logging.Handler()
    handler.emit = lambda record: warned.append(record.getMessage())
    logging.getLogger("diffusers.models.modeling_utils").addHandler(handler)
    try:
        cast = mgtq.load(progress=False)
        cast.transformer.to(torch.bfloat16)
        # from 0.39 diffusers warns of modules "to be kept in float32: []" (before: no such warning)
        assert any("kept in float32: []" in message for message in warned) == (DIFFUSERS >= Version("0.39"))
        warned.clear()
        cast.to(torch.float16)  # mgtq's documented cast does not pass that on
        assert not warned
    finally:
        logging.getLogger("diffusers.models.modeling_utils").removeHandler(handler)
    pipe, reference = mgtq.load(progress=False), mgtq.load(progress=False)  # float32
    # diffusers leaves norms and embeddings uncast: their float32 output met bfloat16 layers (m1 and m2 dtypes);
    # the model is cast to the compute dtype first, as a user would cast it by hand
    pipe.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    reference.transformer.to(torch.bfloat16)
    reference.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    assert pipe.dtype == torch.bfloat16
    kwargs = dict(prompt="a red circle", seed=0, output_type="latent", progress=False, **STEPS)
    assert torch.equal(pipe(**kwargs).images, reference(**kwargs).images)


def test_what_sequential_offload_holds_on_meta_is_refused_with_the_way_out(tmp_path):
    pipe = mgtq.load(progress=False)
    pipe.enable_sequential_cpu_offload(device="cpu")
    for action, match in ((lambda: pipe.save_pretrained(tmp_path / "x", progress=False), "cannot save them"),
                          (lambda: pipe.to("cpu"), "cannot move it to another device")):
        with pytest.raises(RuntimeError, match=match + ": call pipe.remove_all_hooks"):
            action()  # torch's "Cannot copy out of meta tensor; use to_empty()"
    assert not (tmp_path / "x").exists()
    pipe.to(torch.float32)  # a cast is no move: the hooks cast what they hold
    pipe.remove_all_hooks()
    pipe.save_pretrained(tmp_path / "x", progress=False)
    assert mgtq.load(tmp_path / "x", progress=False) is not None


def test_save_pretrained_of_a_loaded_quantized_pipeline_loads_back(quantized_dir, tmp_path):
    loaded = mgtq.load(quantized_dir, progress=False)
    again = tmp_path / "again"
    loaded.save_pretrained(again, progress=False)
    assert (again / "transformer" / "manifest.json").is_file()
    kwargs = dict(prompt="two blue squares", seed=2, output_type="latent", progress=False, **STEPS)
    assert torch.equal(mgtq.load(again, progress=False)(**kwargs).images, loaded(**kwargs).images)
    for name in ("manifest.json", "config.json", "diffusion_pytorch_model.safetensors"):
        assert (again / "transformer" / name).read_bytes() == (quantized_dir / "transformer" / name).read_bytes()


def test_save_pretrained_into_a_users_folder_keeps_its_other_files(quantized_dir, tmp_path):
    # a clone of a model repo: its .git, model card and a part of another pipeline stay, as with diffusers
    loaded = mgtq.load(quantized_dir, progress=False)
    repo = tmp_path / "repo"
    (repo / ".git").mkdir(parents=True)
    (repo / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (repo / "README.md").write_text("my model card")
    (repo / "unet").mkdir()
    (repo / "transformer").mkdir()
    (repo / "transformer" / "diffusion_pytorch_model-00001-of-00002.safetensors").write_bytes(b"old shard")
    loaded.save_pretrained(repo, progress=False)
    assert (repo / ".git" / "HEAD").read_text() == "ref: refs/heads/main\n"
    assert (repo / "README.md").read_text() == "my model card" and (repo / "unet").is_dir()
    assert sorted(p.name for p in (repo / "transformer").iterdir()) == sorted(  # replaced whole: no old shard
        p.name for p in (quantized_dir / "transformer").iterdir())
    assert not [p for p in repo.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    kwargs = dict(prompt="two blue squares", seed=2, output_type="latent", progress=False, **STEPS)
    assert torch.equal(mgtq.load(repo, progress=False)(**kwargs).images, loaded(**kwargs).images)
    # the quantized transformer alone, into a folder with a card and a float model's shards
    folder = tmp_path / "transformer-only"
    folder.mkdir()
    (folder / "README.md").write_text("card")
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text("{}")
    loaded.transformer.save_pretrained(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json",
                                                        "diffusion_pytorch_model.safetensors", "manifest.json"]
    # a float model saved over it: the quantized save's manifest goes too, so it loads as the float model
    float_model = mgtq.load(progress=False).transformer
    float_model.save_pretrained(folder)
    assert not (folder / "manifest.json").exists() and (folder / "README.md").read_text() == "card"
    assert not any(isinstance(m, (W4Linear, W4A8Linear)) for m in MeissonicTransformer.from_pretrained(folder).modules())


def test_save_pretrained_of_a_torch_compiled_quantized_transformer(quantized_dir, tmp_path):
    loaded = mgtq.load(quantized_dir, progress=False)
    loaded.transformer = torch.compile(loaded.transformer)  # the wrapper's keys carry `_orig_mod.`
    loaded.save_pretrained(tmp_path / "out", progress=False)
    for name in ("manifest.json", "diffusion_pytorch_model.safetensors"):
        assert (tmp_path / "out" / "transformer" / name).read_bytes() == (quantized_dir / "transformer" / name).read_bytes()
    assert mgtq.load(tmp_path / "out", progress=False).transformer is not None


def test_transformer_from_pretrained_of_a_quantized_folder_is_the_quantized_model(quantized_dir):
    model = MeissonicTransformer.from_pretrained(quantized_dir / "transformer")
    assert all(isinstance(model.get_submodule(n), W4Linear) for n in json.loads(
        (quantized_dir / "transformer" / "manifest.json").read_text())["layers"])
    reference = mgtq.load(quantized_dir, progress=False).transformer
    inputs = _forward_inputs(model)
    with torch.no_grad():
        assert torch.equal(model(**inputs), reference(**inputs))
    config = json.loads((quantized_dir / "transformer" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "mgtq"
    # a loader that does not know mgtq (diffusers' own ModelMixin.from_pretrained) refuses, never random weights
    plain_loader = super(MeissonicTransformer, MeissonicTransformer).from_pretrained
    with pytest.raises(ValueError, match="mgtq"):
        plain_loader(quantized_dir / "transformer")
    with pytest.raises(ValueError, match="not split across devices; got 'auto'"):
        MeissonicTransformer.from_pretrained(quantized_dir / "transformer", device_map="auto")
    # the defaults diffusers' loaders pass are no request; an option a quantized checkpoint cannot honour is refused
    assert MeissonicTransformer.from_pretrained(quantized_dir / "transformer", disable_mmap=False) is not None
    with pytest.raises(ValueError, match=r"unsupported options \['output_loading_info'\]"):
        MeissonicTransformer.from_pretrained(quantized_dir / "transformer", output_loading_info=True)


def test_a_quantized_transformers_save_takes_no_option_it_would_drop(quantized_dir, tmp_path):
    model = MeissonicTransformer.from_pretrained(quantized_dir / "transformer")
    for options in ({"variant": "fp16"}, {"max_shard_size": "1MB"}, {"push_to_hub": True, "repo_id": "me/x"}):
        with pytest.raises(ValueError, match="nothing was written"):
            model.save_pretrained(tmp_path / "t", **options)  # push_to_hub returned as if it had pushed
        assert not (tmp_path / "t").exists()
    model.save_pretrained(tmp_path / "t", safe_serialization=True)
    manifest = "manifest.json"
    assert (tmp_path / "t" / manifest).read_bytes() == (quantized_dir / "transformer" / manifest).read_bytes()


def test_requires_grad_on_a_quantized_transformer_names_the_packed_weights_and_what_to_do(quantized_dir):
    model = MeissonicTransformer.from_pretrained(quantized_dir / "transformer")
    with pytest.raises(ValueError, match=r"packed integer weights \(.*weight_packed and \d+ more\).*is_floating_point"):
        model.requires_grad_(True)
    assert not any(p.requires_grad for p in model.parameters())  # nothing half-set
    assert model.requires_grad_(False) is model
    for p in model.parameters():  # the way out it names works
        p.requires_grad_(p.is_floating_point())
    assert any(p.requires_grad for p in model.parameters())
    float_model = mgtq.load(progress=False).transformer
    assert all(p.requires_grad for p in float_model.requires_grad_(True).parameters())


def test_missing_diffusers_conventions(pipe, quantized_dir, capsys):
    assert isinstance(pipe, DiffusionPipeline)
    assert set(pipe.components) == {"transformer", "vqvae", "text_encoder", "tokenizer", "settings"}
    out = pipe("a red circle", seed=0, return_dict=False, **STEPS)
    assert isinstance(out, tuple) and out[0][0].size == (64, 64)
    assert pipe("a red circle", seed=0, **STEPS)[0][0].size == (64, 64)
    seen = []
    pipe("a red circle", seed=0, callback_on_step_end=lambda p, i, t, kw: seen.append(i) or kw, **STEPS)
    assert seen == [0, 1, 2]
    on_cpu = mgtq.load(quantized_dir, device_map="cpu", torch_dtype="auto", progress=False)
    assert on_cpu.device == torch.device("cpu") and on_cpu.dtype == torch.float32
    half = mgtq.load(progress=False).to(torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.vqvae.dtype == torch.float32
    assert main(["--version"]) == 0 and capsys.readouterr().out.strip() == f"mgtq {mgtq.__version__}"


def test_offload_methods_give_the_same_tokens():
    pipe = mgtq.load(progress=False)
    kwargs = dict(prompt="a green triangle", seed=3, output_type="latent", progress=False, **STEPS)
    expected = pipe(**kwargs).images
    pipe.enable_model_cpu_offload(device="cpu")
    assert torch.equal(pipe(**kwargs).images, expected)
    pipe.remove_all_hooks()
    pipe.enable_sequential_cpu_offload(device="cpu")
    assert torch.equal(pipe(**kwargs).images, expected)


def test_quantizing_a_pipeline_one_loaded(pipe):
    own = mgtq.load(progress=False)
    done = mgtq.quantize_(own, mgtq.W4A16Config(group_size=32))
    assert done and set(done.values()) == {"W4Linear"}
    assert own("a red circle", seed=0, output_type="latent", **STEPS).images.shape == (1, 16, 16)
    from mgtq.quantization import quantize_weights_

    old = mgtq.load(progress=False)
    with pytest.warns(DeprecationWarning, match="quantize_"):
        quantize_weights_(old)  # the pipeline itself, as users typed it
    assert any(isinstance(m, W4Linear) for m in old.transformer.modules())
    calibrated = mgtq.load(progress=False)
    with mgtq.calibrate_activations(calibrated) as stats:
        calibrated(["a red circle", "two blue squares"], seed=0, output_type="latent", **STEPS)
    done = mgtq.quantize_(calibrated, mgtq.W4A8Config(), activation_stats=stats)
    assert set(done.values()) == {"W4A8Linear"}
    assert all(isinstance(calibrated.transformer.get_submodule(n), W4A8Linear) for n in done)


def test_tomemgt_after_torch_compile_and_per_call_config():
    pipe = mgtq.load(progress=False)
    kwargs = dict(prompt="a red circle", seed=0, output_type="latent", progress=False, **STEPS)
    per_call = pipe(token_merging=mgtq.TomeConfig(0.5), **kwargs).images
    assert torch.equal(pipe(token_merging=0.5, **kwargs).images, per_call)
    eager = pipe.transformer
    # aot_eager: the patch under compile's wrapper is what is tested here, not Inductor's code generation
    pipe.transformer = torch.compile(pipe.transformer, backend="aot_eager")
    plan = mgtq.apply_tomemgt(pipe, 0.5)
    assert eager.token_hook is plan
    assert torch.equal(pipe(**kwargs).images, per_call)
    mgtq.remove_tomemgt(pipe)
    assert eager.token_hook is None


def test_mgtq_load_after_torchao_quantize():
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    other = torch.nn.Sequential(torch.nn.Linear(32, 32))
    quantize_(other, Int8WeightOnlyConfig())
    pipe = mgtq.load(progress=False)
    assert pipe("a red circle", seed=0, output_type="latent", progress=False, **STEPS).images.shape == (1, 16, 16)


def _forward_inputs(model):
    from testkit import micro_forward_inputs

    return micro_forward_inputs(model, batch=1, grid=8)


def test_editing_from_a_pipeline_with_sequential_offload():
    # offload enabled on the text-to-image pipeline, editing pipelines made from it afterwards (README's pattern):
    # the VQ's weights wait on "meta", and its quantizer reads the codebook without the embedding's forward
    from PIL import Image

    pipe = mgtq.load(progress=False)
    image = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    calls = {mgtq.MGTInpaintPipeline: dict(mask_image=Image.fromarray(mask)), mgtq.MGTImg2ImgPipeline: dict(strength=0.6)}
    kwargs = dict(prompt="a red circle", image=image, seed=0, output_type="latent", progress=False, **STEPS)
    expected = {cls: cls.from_pipe(pipe)(**kwargs, **extra).images for cls, extra in calls.items()}
    pipe.enable_sequential_cpu_offload(device="cpu")
    assert pipe.vqvae.quantize.embedding.weight.is_meta
    for cls, extra in calls.items():
        assert torch.equal(cls.from_pipe(pipe)(**kwargs, **extra).images, expected[cls])
    assert pipe.vqvae.quantize.embedding.weight.is_meta  # offloaded again after the call


def test_outputs_and_the_image_processors_chain_into_the_editing_pipelines(pipe):
    # t2i → img2img with output_type "np" / "pt" images, the pipeline's own image_processor.preprocess, and
    # aMUSEd's mask_processor.blur: each was refused (or missing) before
    from PIL import Image

    prompts = ["a red circle", "a blue square"]
    first = pipe(prompts, seed=[0, 1], **STEPS)
    as_np = pipe(prompts, seed=[0, 1], output_type="np", **STEPS).images
    as_pt = pipe(prompts, seed=[0, 1], output_type="pt", **STEPS).images
    i2i = mgtq.MGTImg2ImgPipeline.from_pipe(pipe)
    kwargs = dict(strength=0.5, seed=[2, 3], output_type="latent", progress=False, **STEPS)
    expected = i2i(prompts, image=first.images, **kwargs).images
    for images in (as_np, as_pt, i2i.image_processor.preprocess(first.images)):
        assert torch.equal(i2i(prompts, image=images, **kwargs).images, expected)
    inpaint = mgtq.MGTInpaintPipeline.from_pipe(pipe)
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    blurred = inpaint.mask_processor.blur(Image.fromarray(mask), blur_factor=2)
    out = inpaint("a green triangle", image=as_pt[:1], mask_image=blurred, seed=0, progress=False, **STEPS)
    assert out.images[0].size == (64, 64)


def test_a_pipeline_loads_in_the_dtype_it_was_saved_in_by_default(quantized_dir, tmp_path):
    pipe = mgtq.load(progress=False).to(torch.bfloat16)
    pipe.save_pretrained(tmp_path / "bf16", progress=False)
    for folder in (tmp_path / "bf16", quantized_dir):
        loaded = mgtq.load(folder, progress=False)  # no torch_dtype: each component as saved, one dtype
        assert loaded.transformer.dtype == loaded.text_encoder.dtype == mgtq.pipeline.saved_dtype(folder / "transformer")
    loaded = mgtq.load(tmp_path / "bf16", torch_dtype=torch.float32, progress=False)
    assert loaded.transformer.dtype == loaded.text_encoder.dtype == torch.float32


def test_quantizing_after_sequential_offload_is_refused_before_anything_changes():
    pipe = mgtq.load(progress=False)
    pipe.enable_sequential_cpu_offload(device="cpu")
    with pytest.raises(ValueError, match="hold no weights.*quantize first and enable offload after"):
        mgtq.quantize_(pipe, mgtq.W4A16Config())
    assert not any(isinstance(m, (W4Linear, W4A8Linear)) for m in pipe.transformer.modules())


def test_numpy_and_torch_scalars_are_numbers_and_a_wrong_generator_is_named(pipe):
    kwargs = dict(prompt="a red circle", seed=0, output_type="latent", progress=False)
    expected = pipe(num_inference_steps=3, guidance_scale=2.0, token_merging=0.5, **kwargs).images
    for steps, scale, ratio in ((np.int64(3), np.float32(2), np.float32(0.5)),
                                (torch.tensor(3), torch.tensor(2.0), torch.tensor(0.5))):
        got = pipe(num_inference_steps=steps, guidance_scale=scale, token_merging=ratio, **kwargs).images
        assert torch.equal(got, expected)
    from PIL import Image

    image = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))
    i2i = mgtq.MGTImg2ImgPipeline.from_pipe(pipe)
    assert torch.equal(i2i(image=image, strength=np.float32(0.5), **kwargs, **STEPS).images,
                       i2i(image=image, strength=0.5, **kwargs, **STEPS).images)
    with pytest.raises(TypeError, match="generator must be a torch.Generator.*got int; pass integer seeds as seed="):
        pipe("a red circle", generator=42, **STEPS)
    with pytest.raises(TypeError, match="a list holding int"):
        pipe(["a", "b"], generator=[0, 1], **STEPS)


def test_a_quantized_pipeline_in_float64_says_what_to_do(quantized_dir, tmp_path):
    loaded = mgtq.load(quantized_dir, progress=False).to(torch.float64)
    with pytest.raises(TypeError, match="quantized layers compute in float32, bfloat16 or float16"):
        loaded("a red circle", progress=False, **STEPS)
    with pytest.raises(ValueError, match="cannot save the quantized transformer: .* save it in float32, bfloat16"):
        loaded.save_pretrained(tmp_path / "f64", progress=False)
    assert not (tmp_path / "f64").exists()


def test_context_reuse_by_cells_on_an_odd_token_grid_names_the_size_and_the_fix():
    pipe = mgtq.load("tiny-shapes-16x16", progress=False)  # no feature compression: 4 pixels a token
    with pytest.raises(ValueError, match=r"68×64 image \(17×16 tokens\) does not tile.*--reuse-group confidence"):
        pipe("a red circle", width=68, height=64, sampler=mgtq.SamplerConfig.preset("fast"), **STEPS)
    fast = mgtq.SamplerConfig.preset("fast").with_overrides({"reuse.group": "confidence"})
    assert pipe("a red circle", width=68, height=64, sampler=fast, output_type="latent", progress=False,
                **STEPS).images.shape == (1, 16, 17)
    # an editing call takes no width or height: its advice is about the image (or outpainted canvas)
    from PIL import Image

    inpaint = mgtq.MGTInpaintPipeline.from_pipe(pipe)
    with pytest.raises(ValueError, match=r"does not tile: resize the image \(and its mask\).*outpaint"):
        inpaint("a red circle", image=Image.new("RGB", (68, 64)), mask_image=Image.new("L", (68, 64), 255),
                sampler=mgtq.SamplerConfig.preset("fast"), **STEPS)


def test_a_load_hashes_each_verified_file_once_side_by_side_and_still_refuses_a_changed_one(quantized_dir, tmp_path,
                                                                                            monkeypatch):
    import shutil

    import mgtq.hashing
    from mgtq.components import verified_files

    files = verified_files(quantized_dir)
    names = {p.relative_to(quantized_dir).as_posix() for p in files}
    assert {"transformer/diffusion_pytorch_model.safetensors", "transformer/config.json"} <= names
    assert any(n.startswith("text_encoder/") for n in names) and any(n.startswith("vqvae/") for n in names)
    own_text_encoder = mgtq.load(progress=False).text_encoder
    reads, threads = [], set()
    real_feed = mgtq.hashing._feed_file

    def feed(h, path, stop=None):
        reads.append(path)
        threads.add(threading.current_thread() is threading.main_thread())
        return real_feed(h, path, stop)

    monkeypatch.setattr(mgtq.hashing, "_feed_file", feed)
    mgtq.load(quantized_dir, progress=False)
    assert sorted(reads) == sorted(files) and threads == {False}  # each once, side by side in worker threads
    reads.clear()
    mgtq.load(quantized_dir, text_encoder=own_text_encoder, progress=False)
    assert reads and not any("text_encoder" in p.parts for p in reads)  # a component passed in is not hashed
    damaged = tmp_path / "damaged"
    shutil.copytree(quantized_dir, damaged)
    with open(damaged / "transformer" / "diffusion_pytorch_model.safetensors", "r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    with pytest.raises(ValueError, match="sha256"):
        mgtq.load(damaged, progress=False)


def test_diffusers_memory_helpers_mgtq_has_no_use_for_say_so(pipe):
    with pytest.warns(UserWarning, match="attention slicing changes nothing in mgtq"):
        pipe.enable_attention_slicing()  # returned silently, no memory saved
    with pytest.warns(UserWarning, match="does not use xformers"):
        pipe.enable_xformers_memory_efficient_attention()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe.disable_attention_slicing()  # diffusers' enable_attention_slicing(None): nothing to warn of
