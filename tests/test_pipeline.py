"""MGTPipeline and `mgtq generate` on a small random pipeline (real VQModel, CLIP, tokenizer classes)."""

import json
import shutil

import pytest
import torch
from PIL import Image

from mgtq.cli import main
from mgtq.pipeline import MGTPipeline, set_default_sampler


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
    index = json.loads((folder / "model_index.json").read_text())
    index.pop("mgtq")
    index["transformer"] = ["meissonic.transformer", "Transformer2DModel"]
    (folder / "model_index.json").write_text(json.dumps(index))
    pipe = MGTPipeline.from_pretrained(folder)
    assert pipe.settings.sampler.timestep_convention == "step_index"
    assert pipe.settings.sampler.num_steps == 48 and pipe.settings.sampler.guidance_scale == 9.0


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
