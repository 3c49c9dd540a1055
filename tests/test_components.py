"""Float components load as strictly as quantized ones: missing, unexpected or non-finite tensors and
damaged files are one-line errors naming the file and the key, never a black or different image."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from mgtq.cli import main
from mgtq.pipeline import MGTPipeline

VQ = "vqvae/diffusion_pytorch_model.safetensors"
TEXT = "text_encoder/model.safetensors"
TRANSFORMER = "transformer/diffusion_pytorch_model.safetensors"


@pytest.fixture
def model(random_pipeline_dir, tmp_path):
    """A saved pipeline without its recorded checksums, as an official folder: the checks of each component run."""
    shutil.copytree(random_pipeline_dir, tmp_path / "model")
    index = json.loads((tmp_path / "model" / "model_index.json").read_text())
    index.pop("mgtq_files")
    (tmp_path / "model" / "model_index.json").write_text(json.dumps(index))
    return tmp_path / "model"


def _edit(path, change):
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


def _first(tensors, part):
    return next(k for k in sorted(tensors) if part in k)


def _nan(part):
    def change(tensors):
        key = _first(tensors, part)
        tensors[key] = torch.full_like(tensors[key], float("nan"))
    return change


@pytest.mark.parametrize("file,change,match", [
    (VQ, _nan("quantize.embedding"), r"model/vqvae/diffusion_pytorch_model.safetensors: tensor 'quantize\.embedding\.weight'"
                                     r" of the VQ model holds NaN"),
    (TEXT, _nan("final_layer_norm"), r"model/text_encoder/model.safetensors: tensor 'text_model\.final_layer_norm\.\w+' of "
                                     r"the text encoder holds NaN"),
    (TRANSFORMER, _nan("norm"), r"model/transformer/diffusion_pytorch_model.safetensors: tensor '[\w.]*norm[\w.]*' of the "
                                r"transformer holds NaN"),
    (TEXT, lambda t: t.pop("text_projection.weight"), r"model/text_encoder: the text encoder's weights files lack tensor "
                                                       r"'text_projection\.weight'"),
    (VQ, lambda t: t.update(extra=torch.zeros(2)), r"model/vqvae/diffusion_pytorch_model.safetensors: tensor 'extra' is "
                                                   r"not part of the VQ model"),
], ids=["nan-vq", "nan-text-norm", "nan-transformer", "missing-text-projection", "unexpected-vq-key"])
def test_a_damaged_float_component_is_refused_naming_file_and_key(model, file, change, match, capsys):
    _edit(model / file, change)
    with pytest.raises(ValueError, match=match):
        MGTPipeline.from_pretrained(model)
    assert main(["generate", "--model", str(model), "--prompt", "a red circle", "--out", str(model.parent / "x.png"),
                 "--no-progress"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' progress bar
    assert last.startswith("mgtq generate: error: ") and "tensor" in last
    assert not (model.parent / "x.png").exists()


def test_a_missing_vq_tensor_is_refused_before_any_meta_tensor_is_used(model):
    _edit(model / VQ, lambda t: t.pop(_first(t, "decoder.conv_out.weight")))
    with pytest.raises(ValueError, match=r"model/vqvae(: the VQ model's weights files lack tensor 'decoder\.conv_out"
                                         r"\.weight'|.*could not load the VQ model)"):
        MGTPipeline.from_pretrained(model)


def test_a_truncated_text_encoder_file_is_named(model):
    path = model / TEXT
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"model/text_encoder/model.safetensors is not a readable safetensors file"):
        MGTPipeline.from_pretrained(model)


def test_the_image_tower_of_a_whole_clip_checkpoint_is_not_an_unexpected_key(model):
    _edit(model / TEXT, lambda t: t.update({"vision_model.post_layernorm.weight": torch.ones(4),
                                            "visual_projection.weight": torch.ones(2, 4), "logit_scale": torch.ones(())}))
    MGTPipeline.from_pretrained(model)
