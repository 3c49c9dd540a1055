"""MGTPipeline's diffusers surface (issue 23 item 1) and its argument checks (issue 29), on the embedded
model and on a quantized export of it (W4A8 on a third of the layers, W4A16 on the rest)."""

import pytest
import torch

import mgtq
from mgtq.pipeline import MGTPipelineOutput
from mgtq.sampling import SamplerConfig

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
    assert [c[:3] for c in calls] == [(True, 0, (1,)), (True, 1, (1,)), (True, 2, (1,))]
    assert calls[1][3] < 1.0  # step 1 unmasked some tokens of the all-mask grid the callback put back
    assert (out.tokens != mask).all()
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        pipe("a red circle", callback_on_step_end=lambda *a: a[-1], callback_on_step_end_tensor_inputs=["latents"])


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
    assert pipe.device.type == "cpu"


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


def test_sampler_mapping_is_a_sampler_config(embedded):
    pipe = embedded
    kwargs = dict(prompt="a red circle", seed=0, output_type="latent", progress=False)
    as_dict = pipe(sampler={"num_steps": 3, "guidance_scale": 2.0}, **kwargs).images
    as_config = pipe(sampler=SamplerConfig(num_steps=3, guidance_scale=2.0), **kwargs).images
    assert torch.equal(as_dict, as_config)
