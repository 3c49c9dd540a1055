"""Not per module: every reader (recipes, settings, checkpoints, JSON, CLI) meets the same bad files.

Damaged, hostile or wrong-shaped files are one-line errors naming the file, never a traceback or a
silently different result: one bounded JSON/YAML reader, shape checks, failed writes that leave nothing."""

import json
import shutil

import pytest
import torch

from mgtq.cli import main
from mgtq.config import MAX_DEPTH, read_data
from mgtq.files import read_json, save_safetensors
from mgtq.pipeline import MGTPipeline, read_settings
from mgtq.quantization.checkpoint import read_manifest
from mgtq.sampling.cli_args import load_sampler_file
from mgtq.scq.recipe import load_recipe
from mgtq.scq.run import RunFolder

DEEP_JSON = "[" * 100_000 + "]" * 100_000
DEEP_YAML = "".join("  " * i + "a:\n" for i in range(2000))


@pytest.fixture
def model(random_pipeline_dir, tmp_path):
    """A copy of a saved pipeline without its recorded checksums (as an official folder has none), so that each
    damage below meets the check that names it, not the checksum's "modified or damaged"."""
    shutil.copytree(random_pipeline_dir, tmp_path / "model")
    index = json.loads((tmp_path / "model" / "model_index.json").read_text())
    index.pop("mgtq_files")
    (tmp_path / "model" / "model_index.json").write_text(json.dumps(index))
    return tmp_path / "model"


@pytest.mark.parametrize("name,text", [("x.json", DEEP_JSON), ("x.yaml", DEEP_JSON), ("x.yaml", DEEP_YAML),
                                       ("x.json", "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1))],
                         ids=["json", "yaml-flow", "yaml-block", "json-just-past-the-limit"])
def test_the_reader_refuses_deep_nesting_naming_the_file(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=f"{path} nests deeper than {MAX_DEPTH} levels"):
        read_data(path)


def test_the_reader_reads_what_mgtq_writes_and_names_a_folder_and_bad_bytes(tmp_path):
    (tmp_path / "ok.json").write_text(json.dumps({"a": [[{"b": 1}]]}))
    assert read_data(tmp_path / "ok.json") == {"a": [[{"b": 1}]]}
    with pytest.raises(ValueError, match=f"{tmp_path} is a folder; give the path of a file"):
        read_data(tmp_path)
    (tmp_path / "latin1.json").write_bytes('{"a": "café"}'.encode("latin-1"))
    with pytest.raises(ValueError, match=f"{tmp_path / 'latin1.json'} is not UTF-8 text"):
        read_data(tmp_path / "latin1.json")


@pytest.mark.parametrize("reader,name", [
    (read_json, "run.json"), (read_json, "selection.json"), (read_json, "state.json"),
    (lambda p: read_manifest(p.parent), "manifest.json"), (load_recipe, "recipe.yaml"),
    (load_sampler_file, "sampler.yaml"), (load_sampler_file, "sampler.json"),
])
def test_every_reader_refuses_a_deep_file_in_one_line(tmp_path, reader, name):
    path = tmp_path / name
    path.write_text(DEEP_JSON)
    with pytest.raises(ValueError, match=f"{path}'? nests deeper than {MAX_DEPTH} levels"):
        reader(path)


@pytest.mark.parametrize("file", ["model_index.json", "transformer/config.json", "vqvae/config.json",
                                  "text_encoder/config.json"])
def test_a_deep_model_file_is_named_by_the_cli(model, file, tmp_path, capsys):
    (model / file).write_text(DEEP_JSON)
    assert main(["generate", "--model", str(model), "--prompt", "x", "--out", str(tmp_path / "x.png")]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("mgtq generate: error: ") and f"{model / file} nests deeper than" in last


def test_a_deep_run_json_is_named_by_export(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(DEEP_JSON)
    (run / "recipe.yaml").write_text("model: default\n")
    assert main(["export", str(run), "--out", str(tmp_path / "ckpt")]) == 2
    assert f"{run / 'run.json'} nests deeper than" in capsys.readouterr().err


@pytest.mark.parametrize("index,match", [
    ([], r"model_index.json must hold a JSON object \(diffusers' model_index\), got list"),
    (7, r"model_index.json must hold a JSON object .*got int"),
    ({"mgtq": {"resolution": 10**9}}, r"mgtq.resolution 1000000000 is past mgtq's limit of 4096 px"),
])
def test_a_model_index_of_the_wrong_shape_is_refused(model, index, match):
    (model / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=match):
        read_settings(model)


def test_a_non_utf8_model_index_names_the_file(model):
    (model / "model_index.json").write_bytes(b'{"mgtq": "\xff"}')
    with pytest.raises(ValueError, match=f"{model / 'model_index.json'} is not UTF-8 text"):
        read_settings(model)


def test_a_config_with_more_layers_than_its_weights_is_refused_before_building(model):
    config = json.loads((model / "transformer" / "config.json").read_text())
    config["num_layers"] = 10**6
    (model / "transformer" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"transformer/config.json: num_layers 1000000 describes more layers than"):
        MGTPipeline.from_pretrained(model)
    from mgtq.models import MeissonicTransformer

    with pytest.raises(ValueError, match=r"transformer/config.json: num_layers 1000000 describes more layers than"):
        MeissonicTransformer.from_pretrained(model / "transformer")  # the class's own loader, as users call it


def test_the_transformer_class_loader_holds_a_float_folder_to_mgtq_s_checks(model):
    from safetensors.torch import load_file, save_file

    from mgtq.models import MeissonicTransformer

    path = model / "transformer" / "diffusion_pytorch_model.safetensors"
    # copies: safetensors < 0.8 maps the file, and save_file below truncates it (SIGBUS at the next read)
    tensors = {k: v.clone() for k, v in load_file(str(path)).items()}
    key = sorted(k for k in tensors if tensors[k].is_floating_point())[0]
    for damage, match in ((lambda t: t[key].fill_(float("nan")), "holds NaN or infinite"),
                          (lambda t: t.pop(key), f"lack tensor {key!r}"),
                          (lambda t: t.update(stray=torch.zeros(2)), "tensor 'stray' is not part of the transformer")):
        damaged = {k: v.clone() for k, v in tensors.items()}
        damage(damaged)
        save_file(damaged, str(path))
        with pytest.raises(ValueError, match=match):
            MeissonicTransformer.from_pretrained(model / "transformer")
        with pytest.raises(ValueError, match=match):
            MGTPipeline.from_pretrained(model)  # one message through either loader


def test_a_full_disk_while_saving_tensors_names_the_file_and_leaves_nothing(tmp_path, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    def full(tensors, filename, metadata=None):
        open(filename, "wb").write(b"half")
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull })')

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(OSError, match=f"could not write {tmp_path / 'rng.safetensors'} .*free some disk space"):
        save_safetensors({"a": torch.zeros(2)}, tmp_path / "rng.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_a_calibrate_run_json_that_is_not_a_run_record_is_refused(tmp_path):
    (tmp_path / "run.json").write_text("[]")
    with pytest.raises(ValueError, match=r"run.json is not an mgtq run record \(model, fingerprints\)"):
        RunFolder(tmp_path).check_takeable(tmp_path.parent / "model")


# ------------------------------------------------------------------------------ messages that say it
def test_weights_linked_to_a_device_are_named_as_such(model):
    weights = model / "vqvae" / "diffusion_pytorch_model.safetensors"
    weights.unlink()
    weights.symlink_to("/dev/zero")
    with pytest.raises(ValueError, match=f"{weights} is a character device, not a weights file"):
        MGTPipeline.from_pretrained(model)


def test_a_folder_given_as_the_prompts_file_is_named_a_folder(tmp_path):
    from mgtq.scq.recipe import PromptsConfig
    from mgtq.scq.synthesis import calibration_prompts

    with pytest.raises(FileNotFoundError, match=f"prompts.file {tmp_path} is a folder; give a text file"):
        calibration_prompts(PromptsConfig(source="file", file=str(tmp_path)))


def test_a_full_disk_during_export_names_the_target(random_pipeline_dir, tmp_path, monkeypatch, capsys):
    import errno

    from mgtq import export
    from mgtq.quantization import checkpoint
    from testkit import random_quantized_pipeline

    def full(src, dst, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(src))

    monkeypatch.setattr(export.shutil, "copyfile", full)
    pipe = random_quantized_pipeline()
    manifest = checkpoint.describe(pipe.transformer)
    with pytest.raises(OSError) as caught:
        export.write_checkpoint(random_pipeline_dir, pipe.transformer, manifest, tmp_path / "ckpt")
    assert caught.value.filename == str(tmp_path / "ckpt") and caught.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []


def test_a_failed_png_write_leaves_no_temporary_file_and_keeps_the_old_image(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from PIL import Image

    from mgtq.generate import generate_to_files

    out = tmp_path / "img.png"
    out.write_bytes(b"the previous image")
    pipe = lambda *args, **kwargs: SimpleNamespace(images=[Image.new("RGB", (4, 4))])  # noqa: E731

    def full_disk(self, fp, format=None, **params):
        open(fp, "wb").write(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full_disk)
    with pytest.raises(OSError):
        generate_to_files(pipe, "a red circle", out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.png"] and out.read_bytes() == b"the previous image"


def test_a_transformer_folder_that_is_a_file_is_named_a_file(model):
    shutil.rmtree(model / "transformer")
    (model / "transformer").write_text("not a folder")
    with pytest.raises(NotADirectoryError, match=f"{model / 'transformer'}' is a file, not a folder"):
        MGTPipeline.from_pretrained(model)


def test_a_non_utf8_tokenizer_file_names_the_file(model):
    name = next(p.name for p in sorted((model / "tokenizer").iterdir()) if p.suffix == ".json")
    path = model / "tokenizer" / name
    path.write_bytes(path.read_bytes()[:10] + b"\xff\xfe" + path.read_bytes()[10:])
    with pytest.raises(ValueError, match=f"{path} is not UTF-8 text"):
        MGTPipeline.from_pretrained(model)


def test_a_pipeline_folder_without_its_model_index_or_settings_is_refused(model, tmp_path):
    (model / "model_index.json").rename(tmp_path / "index.json")
    with pytest.raises(FileNotFoundError, match="has no model_index.json; every pipeline folder"):
        MGTPipeline.from_pretrained(model)  # not read as an official folder: 1024 px, 48 steps, CFG 9
    import mgtq

    (tmp_path / "index.json").rename(model / "model_index.json")
    pipe = MGTPipeline.from_pretrained(model)
    mgtq.quantize_(pipe, mgtq.W4A16Config())
    pipe.save_pretrained(tmp_path / "q", progress=False)
    index = json.loads((tmp_path / "q" / "model_index.json").read_text())
    del index["mgtq"]
    (tmp_path / "q" / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="no 'mgtq' settings, but .* is an mgtq quantized checkpoint"):
        MGTPipeline.from_pretrained(tmp_path / "q")


def test_a_component_folder_given_as_the_pipeline_names_its_parent(model):
    with pytest.raises(FileNotFoundError, match=r"is a component folder .* pass the pipeline folder that holds it"):
        MGTPipeline.from_pretrained(model / "transformer")


def test_a_dtype_no_model_computes_in_is_refused_by_name(model):
    for dtype in (torch.int8, torch.float8_e4m3fn):
        with pytest.raises(ValueError, match=f"dtype {dtype} is not one a model computes in"):
            MGTPipeline.from_pretrained(model, torch_dtype=dtype)


def test_a_damaged_vq_or_text_encoder_of_an_mgtq_checkpoint_is_refused(model, tmp_path):
    import mgtq

    pipe = MGTPipeline.from_pretrained(model)
    mgtq.quantize_(pipe, mgtq.W4A16Config())
    pipe.save_pretrained(tmp_path / "q", progress=False)
    (tmp_path / "q" / "README.md").write_text("a model card added later")  # not recorded, not checked
    MGTPipeline.from_pretrained(tmp_path / "q")
    for part in ("vqvae/diffusion_pytorch_model.safetensors", "text_encoder/config.json", "tokenizer/tokenizer.json"):
        path = tmp_path / "q" / part
        original = path.read_bytes()
        raw = bytearray(original)
        raw[-2] ^= 0x01  # one bit: still a readable file with plausible values
        path.write_bytes(bytes(raw))
        with pytest.raises(ValueError, match=f"{part}: sha256 differs from the one model_index.json records"):
            MGTPipeline.from_pretrained(tmp_path / "q")
        path.write_bytes(original)
    shutil.move(tmp_path / "q" / "text_encoder", tmp_path / "shared-clip")  # one CLIP for several checkpoints
    MGTPipeline.from_pretrained(tmp_path / "q", text_encoder=tmp_path / "shared-clip")
    (tmp_path / "q" / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="tokenizer.json does not exist, but the folder's model_index.json records it"):
        MGTPipeline.from_pretrained(tmp_path / "q")


@pytest.mark.parametrize("name", [".", "", "../outside.bin", "/etc/hostname",
                                  # outside the folder on Windows: drive-relative, on a drive, rooted, up by "\\"
                                  "C:outside.bin", "C:\\Windows\\win.ini", "\\outside.bin",
                                  "vqvae\\..\\..\\outside.bin"])
def test_a_recorded_checksum_naming_no_file_of_the_folder_is_the_checks_error(model, name):
    """The load lists the files to hash ahead from model_index.json before any check: a key naming the folder
    itself or something outside it must reach the checks' error, not an IndexError."""
    from mgtq.components import BadComponent, verified_files

    index = json.loads((model / "model_index.json").read_text())
    index["mgtq_files"] = {name: "0" * 64}
    (model / "model_index.json").write_text(json.dumps(index))
    assert verified_files(model) == []
    with pytest.raises(BadComponent, match="not a file inside the folder"):
        MGTPipeline.from_pretrained(model, progress=False)


def _flip_last_bit(path):
    raw = bytearray(path.read_bytes())
    raw[-2] ^= 0x01  # one bit: still a readable file with plausible values
    path.write_bytes(bytes(raw))


def _index(folder):
    return json.loads((folder / "model_index.json").read_text())


def _write_index(folder, index):
    (folder / "model_index.json").write_text(json.dumps(index))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The embedded model as an mgtq writer saves it (float), and a quantized save of it."""
    import mgtq

    root = tmp_path_factory.mktemp("saved")
    pipe = mgtq.load(progress=False)
    pipe.save_pretrained(root / "float", progress=False)
    mgtq.quantize_(pipe, mgtq.W4A16Config())
    pipe.save_pretrained(root / "quantized", progress=False)
    return root


@pytest.mark.parametrize("origin", ["saved", "embedded"])
def test_a_float_transformer_of_an_mgtq_folder_is_held_to_its_checksums_through_every_loader(saved, tmp_path, origin):
    from mgtq.default_model import default_model
    from mgtq.models.transformer import MeissonicTransformer

    folder = shutil.copytree(saved / "float" if origin == "saved" else default_model(), tmp_path / "m")
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    original = weights.read_bytes()
    _flip_last_bit(weights)
    for load in (MGTPipeline.from_pretrained, lambda f: MeissonicTransformer.from_pretrained(f / "transformer")):
        with pytest.raises(ValueError, match="diffusion_pytorch_model.safetensors: sha256 differs"):
            load(folder)
    weights.write_bytes(original)
    config = folder / "transformer" / "config.json"
    data = json.loads(config.read_text())
    data["axes_dims_rope"] = data["axes_dims_rope"][::-1]  # same shapes, other RoPE: a silently different model
    config.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="transformer/config.json: sha256 differs"):
        MGTPipeline.from_pretrained(folder, progress=False)


def test_a_transformer_swapped_for_another_is_refused(saved, tmp_path):
    floats = shutil.copytree(saved / "float", tmp_path / "float")
    quantized = shutil.copytree(saved / "quantized", tmp_path / "quantized")
    shutil.rmtree(floats / "transformer")
    shutil.copytree(saved / "quantized" / "transformer", floats / "transformer")
    with pytest.raises(ValueError, match=r"transformer/\S+( is not among the files|: sha256 differs)"):
        MGTPipeline.from_pretrained(floats, progress=False)
    shutil.rmtree(quantized / "transformer")
    shutil.copytree(saved / "float" / "transformer", quantized / "transformer")
    with pytest.raises(ValueError, match="transformer/manifest.json .*does not exist"):
        MGTPipeline.from_pretrained(quantized, progress=False)


def test_an_mgtq_folder_whose_checksums_were_dropped_is_refused_or_said(saved, tmp_path):
    folder = shutil.copytree(saved / "quantized", tmp_path / "q")
    _flip_last_bit(folder / "vqvae" / "diffusion_pytorch_model.safetensors")
    index = _index(folder)
    del index["mgtq_files"]["vqvae/diffusion_pytorch_model.safetensors"]  # one entry dropped: that file is uncovered
    _write_index(folder, index)
    with pytest.raises(ValueError, match="diffusion_pytorch_model.safetensors is not among the files"):
        MGTPipeline.from_pretrained(folder, progress=False)
    del index["mgtq_files"]  # all of them: an mgtq folder (settings, a quantized transformer) without checksums
    _write_index(folder, index)
    with pytest.warns(UserWarning, match="records no checksums .* its files are not verified"):
        MGTPipeline.from_pretrained(folder, progress=False)


def test_the_settings_an_mgtq_folder_was_written_with_are_held_to_its_checksums(saved, tmp_path):
    from mgtq.pipeline import set_default_sampler

    folder = shutil.copytree(saved / "float", tmp_path / "f")
    index = _index(folder)
    edited = json.loads(json.dumps(index))
    edited["mgtq"]["sampler"]["timestep_convention"] = "step_index"
    _write_index(folder, edited)
    with pytest.raises(ValueError, match="'mgtq' settings differ .*set_default_sampler"):
        MGTPipeline.from_pretrained(folder, progress=False)
    _write_index(folder, {k: v for k, v in index.items() if k != "mgtq"})  # settings gone: not the official defaults
    with pytest.raises(ValueError, match="lost its 'mgtq' settings"):
        MGTPipeline.from_pretrained(folder, progress=False)
    _write_index(folder, index)
    pipe = MGTPipeline.from_pretrained(folder, progress=False)
    set_default_sampler(folder, pipe.settings.sampler.replace(num_steps=5))  # the sanctioned edit records them
    assert MGTPipeline.from_pretrained(folder, progress=False).settings.sampler.num_steps == 5


def test_a_float_tensor_stored_as_integers_is_refused(model):
    """Same byte length, another dtype in the header: diffusers would convert the integers to floats."""
    path = model / "transformer" / "diffusion_pytorch_model.safetensors"
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + size])
    key = next(k for k, v in sorted(header.items()) if k != "__metadata__" and v["dtype"] == "F32")
    header[key]["dtype"] = "I32"
    text = json.dumps(header, separators=(",", ":")).encode().ljust(size)
    path.write_bytes(raw[:8] + text + raw[8 + size:])
    with pytest.raises(ValueError, match=f"{key}' of the transformer is stored as an integer or bool type"):
        MGTPipeline.from_pretrained(model, progress=False)


def test_the_transformer_class_loader_never_unpickles(model):
    from mgtq.models.transformer import MeissonicTransformer

    torch.save({"harmless": torch.zeros(1)}, model / "transformer" / "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError, match="safetensors only, never pickle files"):
        MeissonicTransformer.from_pretrained(model / "transformer", use_safetensors=False)
    assert MeissonicTransformer.from_pretrained(model / "transformer") is not None  # its safetensors


def test_load_vq_holds_the_vq_to_the_loaders_checks(model):
    from mgtq.files import save_safetensors
    from mgtq.vq import load_vq
    from safetensors.torch import load_file

    path = model / "vqvae" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(path)
    key = sorted(k for k in tensors if k.endswith("bias"))[0]
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_safetensors(tensors, path)
    with pytest.raises(ValueError, match=f"{key}' of the VQ model holds NaN"):
        load_vq(model / "vqvae")


def test_a_float_save_of_damaged_weights_writes_nothing(tmp_path):
    import mgtq

    pipe = mgtq.load(progress=False)
    pipe.save_pretrained(tmp_path / "good", progress=False)
    before = {p: p.read_bytes() for p in sorted((tmp_path / "good").rglob("*")) if p.is_file()}
    with torch.no_grad():
        next(pipe.transformer.parameters())[0, 0] = float("nan")
    with pytest.raises(ValueError, match="transformer: tensor .* holds NaN or infinite values.*nothing was written"):
        pipe.save_pretrained(tmp_path / "good", progress=False)
    assert {p: p.read_bytes() for p in sorted((tmp_path / "good").rglob("*")) if p.is_file()} == before


def test_a_transformer_folder_of_pickles_only_says_so(model):
    from mgtq.models.transformer import MeissonicTransformer

    weights = model / "transformer" / "diffusion_pytorch_model.safetensors"
    torch.save({"harmless": torch.zeros(1)}, weights.with_suffix(".bin"))
    weights.unlink()
    with pytest.raises(ValueError, match="has no .safetensors weights .*never pickle files"):
        MeissonicTransformer.from_pretrained(model / "transformer")


def test_set_default_sampler_records_neither_a_hand_edit_nor_an_earlier_record_as_current(saved, tmp_path):
    from mgtq.components import SETTINGS_ENTRY
    from mgtq.pipeline import set_default_sampler

    folder = shutil.copytree(saved / "float", tmp_path / "f")
    index = _index(folder)
    sampler = MGTPipeline.from_pretrained(folder, progress=False).settings.sampler
    edited = json.loads(json.dumps(index))
    edited["mgtq"]["image_range"] = "0,1"
    _write_index(folder, edited)
    with pytest.raises(ValueError, match="'mgtq' settings differ"):
        set_default_sampler(folder, sampler.replace(num_steps=5))
    earlier = {**index, "mgtq_files": {k: v for k, v in index["mgtq_files"].items()
                                       if k != SETTINGS_ENTRY and not k.startswith("transformer/")}}
    _write_index(folder, earlier)  # as an earlier mgtq recorded it
    set_default_sampler(folder, sampler.replace(num_steps=5))
    assert SETTINGS_ENTRY not in _index(folder)["mgtq_files"]  # still an earlier record: it loads, with its warning
    with pytest.warns(UserWarning, match="an earlier mgtq recorded these checksums"):
        assert MGTPipeline.from_pretrained(folder, progress=False).settings.sampler.num_steps == 5


def test_a_checkpoints_own_text_encoder_or_tokenizer_passed_as_a_path_is_still_checked(saved, tmp_path):
    folder = shutil.copytree(saved / "float", tmp_path / "f")
    _flip_last_bit(folder / "text_encoder" / "model.safetensors")
    with pytest.raises(ValueError, match="text_encoder/model.safetensors: sha256 differs"):
        MGTPipeline.from_pretrained(folder, text_encoder=folder / "text_encoder", progress=False)
    shutil.rmtree(folder / "text_encoder")
    shutil.copytree(saved / "float" / "text_encoder", folder / "text_encoder")
    _flip_last_bit(folder / "tokenizer" / "tokenizer.json")
    with pytest.raises(ValueError, match="tokenizer/tokenizer.json: sha256 differs"):
        MGTPipeline.from_pretrained(folder, tokenizer=folder / "tokenizer", progress=False)


def test_a_component_folder_that_is_a_link_is_checked_as_a_folder(saved, tmp_path):
    folder = shutil.copytree(saved / "float", tmp_path / "f")
    shutil.move(folder / "text_encoder", tmp_path / "shared-clip")
    (folder / "text_encoder").symlink_to(tmp_path / "shared-clip", target_is_directory=True)
    MGTPipeline.from_pretrained(folder, progress=False)  # a linked folder whose files are the recorded ones
    torch.save({"harmless": torch.zeros(1)}, tmp_path / "shared-clip" / "pytorch_model.bin")
    with pytest.raises(ValueError, match="text_encoder/pytorch_model.bin is not among the files"):
        MGTPipeline.from_pretrained(folder, progress=False)
