"""The quantized checkpoint format: round trip of a small random quantized pipeline, and strict loading.

No calibration run is needed: the transformer is random (tests' testkit), written by the same
`write_checkpoint` that `mgtq export` uses.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import mgtq
from mgtq.components import CHECKSUMS_KEY, SETTINGS_ENTRY
from mgtq.export import write_checkpoint
from mgtq.models.transformer import MeissonicTransformer
from mgtq.quantization import W4A8Linear, W4Linear
from mgtq.quantization import checkpoint as ckpt
from testkit import as_official_folder, random_quantized_pipeline

WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def qpipe():
    return random_quantized_pipeline(seed=0)


def _write(qpipe, source, out):
    manifest = ckpt.describe(qpipe.transformer, {"source_model": "random"})
    return write_checkpoint(source, qpipe.transformer, manifest, out)


@pytest.fixture(scope="module")
def exported(qpipe, random_pipeline_dir, tmp_path_factory):
    return _write(qpipe, random_pipeline_dir, tmp_path_factory.mktemp("q") / "ckpt")


# ------------------------------------------------------------------------------------ round trip
def test_round_trip_generates_the_same_tokens(qpipe, exported):
    loaded = mgtq.load(exported)
    kinds = {type(m) for m in loaded.transformer.modules()}
    assert W4A8Linear in kinds and W4Linear in kinds and torch.nn.Linear not in kinds
    assert ckpt.quantized_layers(loaded.transformer) == ckpt.quantized_layers(qpipe.transformer)
    kwargs = dict(prompt="a red circle", seed=3, num_inference_steps=2, progress=False, output_type="tokens")
    assert torch.equal(qpipe(**kwargs).tokens, loaded(**kwargs).tokens)


def test_load_casts_float_parts_but_not_scales(exported):
    model = ckpt.load(exported / "transformer", MeissonicTransformer, dtype="bf16")
    layer = next(m for m in model.modules() if isinstance(m, W4A8Linear))
    assert model.embed.embeddings.weight.dtype == torch.bfloat16
    assert layer.weight_scale.dtype == torch.float32 and layer.input_scale.dtype == torch.float32
    assert mgtq.load(exported, dtype=torch.bfloat16).transformer.embed.embeddings.weight.dtype == torch.bfloat16


def _digests(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_exports_are_byte_reproducible(qpipe, random_pipeline_dir, exported, tmp_path):
    again = _write(qpipe, random_pipeline_dir, tmp_path / "again")
    assert _digests(again) == _digests(exported)


def test_files_get_normal_permissions(exported):
    umask = os.umask(0o022)
    os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in exported.rglob("*")}
    assert modes[WEIGHTS] == 0o666 & ~umask and modes["manifest.json"] == 0o666 & ~umask
    assert modes["transformer"] == 0o777 & ~umask and (exported.stat().st_mode & 0o777) == 0o777 & ~umask


def test_manifest_records_sha256_and_round_trips(exported):
    manifest = ckpt.read_manifest(exported / "transformer")
    assert manifest.files == {name: hashlib.sha256((exported / "transformer" / name).read_bytes()).hexdigest()
                              for name in (WEIGHTS, "config.json")}
    assert ckpt.read_manifest(exported / "transformer") == manifest
    assert ckpt.is_quantized(exported / "transformer")


def test_save_refuses_a_manifest_that_does_not_match_the_model(qpipe, tmp_path):
    layers = ckpt.quantized_layers(qpipe.transformer)
    layers.pop(next(iter(layers)))
    with pytest.raises(ValueError, match="do not match"):
        ckpt.save(qpipe.transformer, ckpt.Manifest(layers=layers), tmp_path / "t")


def test_describe_reads_the_manifest_off_the_model_and_keeps_the_loaded_provenance(qpipe, exported):
    manifest = ckpt.describe(qpipe.transformer, {"source_model": "random", "recipe": {"qat": {"steps": 4}}})
    assert manifest.layers == ckpt.quantized_layers(qpipe.transformer) and manifest.float_dtype == "float32"
    assert manifest.provenance == {"source_model": "random", "source_fingerprint": None, "selection": None,
                                   "recipe": {"qat": {"steps": 4}}}
    assert "group_size" not in manifest.to_dict()  # each layer has its own
    loaded = mgtq.load(exported, torch_dtype=torch.bfloat16).transformer
    again = ckpt.describe(loaded)  # no provenance given: the one it was loaded with
    assert again.provenance["source_model"] == "random" and again.float_dtype == "bfloat16"
    with pytest.raises(ValueError, match="unknown provenance key 'group_size'"):
        ckpt.describe(qpipe.transformer, {"group_size": 64})
    with pytest.raises(ValueError, match="no quantized Linears"):
        ckpt.describe(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_assign_layer_fills_an_empty_quantized_module_and_refuses_what_it_cannot_hold(qpipe):
    from mgtq.config import plain_config

    layers = ckpt.quantized_layers(qpipe.transformer)
    a8 = next(n for n, layer in layers.items() if layer.scheme == "w4a8")
    source = qpipe.transformer.get_submodule(a8)
    empty = ckpt.build_empty(MeissonicTransformer, plain_config(qpipe.transformer.config),
                             ckpt.describe(qpipe.transformer)).get_submodule(a8)
    assert empty.weight_packed.is_meta
    bias = None if source.bias is None else source.bias.detach().clone()
    args = dict(codes=source.weight_packed.clone(), scales=source.weight_scale.clone(), bias=bias)
    with pytest.raises(ValueError, match="takes .*'input_scale'"):
        ckpt.assign_layer_(empty, **args)  # a w4a8 layer needs its input scale
    with pytest.raises(ValueError, match="codes must be torch.uint8"):
        ckpt.assign_layer_(empty, **{**args, "codes": source.weight_packed.to(torch.int16)}, input_scale=0.05)
    with pytest.raises(ValueError, match="weight_scale of a W4A8Linear is"):
        ckpt.assign_layer_(empty, **{**args, "scales": source.weight_scale[:1]}, input_scale=0.05)
    ckpt.assign_layer_(empty, **args, input_scale=source.input_scale.clone())
    x = torch.randn(3, source.in_features)
    assert torch.equal(empty(x), source(x))


def _w4a16_group_size(data):
    """The summary key an earlier mgtq wrote: the w4a16 layers' one group size, or None."""
    sizes = {layer["group_size"] for layer in data["layers"].values() if layer["scheme"] == "w4a16"}
    return sizes.pop() if len(sizes) == 1 else None


def test_a_manifest_with_the_older_top_level_group_size_still_loads(qpipe, exported, tmp_path):
    copy = shutil.copytree(exported, tmp_path / "older")
    data = _manifest(copy)
    _set_manifest(copy, {**data, "group_size": _w4a16_group_size(data)})
    _as_an_earlier_mgtq_wrote_it(copy)
    assert ckpt.read_manifest(copy / "transformer") == ckpt.read_manifest(exported / "transformer")
    kwargs = dict(prompt="a red circle", seed=1, num_inference_steps=2, progress=False, output_type="tokens")
    with pytest.warns(UserWarning, match="an earlier mgtq recorded these checksums"):
        older = mgtq.load(copy)
    assert torch.equal(older(**kwargs).tokens, qpipe(**kwargs).tokens)


@pytest.fixture(scope="module")
def grouped(tmp_path_factory):
    """A saved pipeline whose Linears are all W4A16 with 32-column groups (one group size, written per layer)."""
    pipe = mgtq.load(progress=False)
    mgtq.quantize_(pipe, mgtq.W4A16Config(group_size=32))
    folder = tmp_path_factory.mktemp("grouped") / "w4a16-g32"
    pipe.save_pretrained(folder, progress=False)
    return folder


def test_a_group_wise_checkpoint_loads_with_or_without_the_older_summary_key(grouped, tmp_path):
    data = _manifest(grouped)
    assert "group_size" not in data and _w4a16_group_size(data) == 32
    kwargs = dict(prompt="a red circle", seed=1, num_inference_steps=2, progress=False, output_type="latent")
    expected = mgtq.load(grouped, progress=False)(**kwargs).images
    # earlier writers put the layers' common size there, or the recipe's (which a layer as wide as its group lacks)
    for summary in (32, 128, None):
        copy = shutil.copytree(grouped, tmp_path / f"older-{summary}")
        _set_manifest(copy, {**data, "group_size": summary})
        _as_an_earlier_mgtq_wrote_it(copy)
        with pytest.warns(UserWarning, match="an earlier mgtq recorded these checksums"):
            assert torch.equal(mgtq.load(copy, progress=False)(**kwargs).images, expected)


def test_a_quantized_checkpoint_refuses_float64_before_it_loads(exported):
    # float64 is a dtype a float model computes in, so only the quantized loaders can refuse it (the layers
    # would refuse it at the first call)
    from mgtq.models.transformer import MeissonicTransformer

    for load in (lambda: mgtq.load(exported, torch_dtype=torch.float64, progress=False),
                 lambda: MeissonicTransformer.from_pretrained(exported / "transformer", torch_dtype=torch.float64)):
        with pytest.raises(ValueError, match="quantized layers compute in float32, bfloat16 or float16; torch_dtype "
                                             "torch.float64"):
            load()


def test_float_folder_is_not_quantized(random_pipeline_dir):
    assert not ckpt.is_quantized(random_pipeline_dir / "transformer")


def test_loading_a_checkpoint_imports_neither_scq_nor_bench(exported):
    code = ("import sys, mgtq; mgtq.load(sys.argv[1]); "
            "bad = sorted(m for m in sys.modules if m.startswith(('mgtq.scq', 'mgtq.bench', 'mgtq.export'))); "
            "assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code, str(exported)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]


# ---------------------------------------------------------------------------- bad checkpoints
def _as_an_earlier_mgtq_wrote_it(folder):
    """model_index.json as mgtq wrote it before its checksums covered the settings and the transformer's manifest."""
    index = json.loads((folder / "model_index.json").read_text())
    index[CHECKSUMS_KEY] = {k: v for k, v in index[CHECKSUMS_KEY].items()
                            if k != SETTINGS_ENTRY and not k.startswith("transformer/")}
    (folder / "model_index.json").write_text(json.dumps(index))


def _manifest(folder):
    return json.loads((folder / "transformer" / "manifest.json").read_text())


def _set_manifest(folder, data):
    (folder / "transformer" / "manifest.json").write_text(json.dumps(data))


def _edit_manifest(fn):
    def edit(folder):
        data = _manifest(folder)
        fn(data)
        _set_manifest(folder, data)
    return edit


def _first(data, scheme):
    return next(n for n, layer in data["layers"].items() if layer["scheme"] == scheme)


def _rewrite_tensors(fn, metadata=True):
    """Change the weights file, then record its new sha256, so that the value checks are reached."""
    def edit(folder):
        path = folder / "transformer" / WEIGHTS
        tensors = load_file(str(path))
        data = _manifest(folder)
        fn(tensors, data)
        save_file(tensors, str(path), metadata={"mgtq": ckpt._metadata_value()} if metadata else None)
        data["files"][WEIGHTS] = hashlib.sha256(path.read_bytes()).hexdigest()
        _set_manifest(folder, data)
    return edit


def _set_tensor(scheme, suffix, value):
    def fn(tensors, data):
        key = next(f"{n}.{suffix}" for n, layer in data["layers"].items()
                   if layer["scheme"] == scheme and f"{n}.{suffix}" in tensors)
        tensors[key] = value(tensors[key])
    return fn


def _truncate_with_sha(folder):
    path = folder / "transformer" / WEIGHTS
    path.write_bytes(path.read_bytes()[:3000])
    data = _manifest(folder)
    data["files"][WEIGHTS] = hashlib.sha256(path.read_bytes()).hexdigest()
    _set_manifest(folder, data)


def _flip_bytes(folder):
    path = folder / "transformer" / WEIGHTS
    raw = bytearray(path.read_bytes())
    for i in range(len(raw) - 4096, len(raw)):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))


def _edit_config(changes: dict, record_sha: bool = True):
    """Change config.json; with record_sha, also its sha256 in the manifest, so that the checks of its values run."""
    def edit(folder):
        path = folder / "transformer" / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
        if record_sha:
            data = _manifest(folder)
            data["files"]["config.json"] = hashlib.sha256(path.read_bytes()).hexdigest()
            _set_manifest(folder, data)
    return edit


def _pickle_vq(folder):
    vq = folder / "vqvae"
    (vq / "diffusion_pytorch_model.safetensors").unlink()
    torch.save({"harmless": torch.zeros(1)}, vq / "diffusion_pytorch_model.bin")


BAD = {
    # name: (damage, error type, the key the message must name)
    "manifest deleted": (lambda f: (f / "transformer" / "manifest.json").unlink(), ValueError, "manifest.json"),
    "manifest a JSON list": (lambda f: (f / "transformer" / "manifest.json").write_text("[1, 2]"), ValueError,
                             r"manifest.json must hold a mapping"),
    "manifest truncated": (lambda f: (f / "transformer" / "manifest.json").write_text('{"layers": {'), ValueError,
                           r"manifest.json is not valid JSON"),
    "manifest without layers": (_edit_manifest(lambda d: d.pop("layers")), ValueError, "layers is missing"),
    "manifest unknown key": (_edit_manifest(lambda d: d.update(extra_key=1)), ValueError, "extra_key"),
    "format version 1": (_edit_manifest(lambda d: d.update(format_version=1)), ValueError, "format_version|version 1"),
    "unknown float dtype": (_edit_manifest(lambda d: d.update(float_dtype="int8")), ValueError, "float_dtype"),
    "group_size a string": (_edit_manifest(lambda d: d["layers"][_first(d, "w4a16")].update(group_size="abc")),
                            ValueError, r"layers\.[\w.]+\.group_size must be an integer"),
    "odd group_size": (_edit_manifest(lambda d: d["layers"][_first(d, "w4a16")].update(group_size=3)), ValueError,
                       r"manifest.json: group_size must be null .* even integer ≥ 2 .*got 3; re-export"),
    "unknown scheme": (_edit_manifest(lambda d: d["layers"][_first(d, "w4a16")].update(scheme="w3a8")), ValueError,
                       r"layers\.[\w.]+\.scheme"),
    "layer that does not exist": (_edit_manifest(lambda d: d["layers"].update(nope={"scheme": "w4a16"})), ValueError,
                                  r"manifest.json: layers\.nope: the module does not exist"),
    "layer that is not a Linear": (_edit_manifest(lambda d: d["layers"].update(
        {"embed.conv": {"scheme": "w4a16", "group_size": None}})), ValueError,
        r"layers\.embed\.conv: .*not an nn.Linear"),
    "files names another file": (_edit_manifest(lambda d: d.update(files={"other.safetensors": "0" * 64})),
                                 ValueError, "files must name"),
    "4096 flipped bytes": (_flip_bytes, ValueError, f"{WEIGHTS}: sha256"),
    "weights file missing": (lambda f: (f / "transformer" / WEIGHTS).unlink(), FileNotFoundError, WEIGHTS),
    "truncated weights (sha updated)": (_truncate_with_sha, ValueError, "damaged or truncated"),
    "metadata missing": (_rewrite_tensors(lambda t, d: None, metadata=False), ValueError, "metadata key 'mgtq'"),
    "input_scale NaN": (_rewrite_tensors(_set_tensor("w4a8", "input_scale", lambda s: s * float("nan"))),
                        ValueError, r"\.input_scale holds NaN"),
    "input_scale inf": (_rewrite_tensors(_set_tensor("w4a8", "input_scale", lambda s: s * float("inf"))),
                        ValueError, r"\.input_scale holds NaN or infinite"),
    "input_scale zero": (_rewrite_tensors(_set_tensor("w4a8", "input_scale", torch.zeros_like)), ValueError,
                         r"\.input_scale holds scales ≤ 0"),
    "weight_scale negative": (_rewrite_tensors(_set_tensor("w4a16", "weight_scale", lambda s: -s)), ValueError,
                              r"\.weight_scale holds scales ≤ 0"),
    "weight_scale fp16": (_rewrite_tensors(_set_tensor("w4a16", "weight_scale", lambda s: s.half())), ValueError,
                          r"\.weight_scale is torch.float16 .*expected torch.float32"),
    "weight_scale int64": (_rewrite_tensors(_set_tensor("w4a8", "weight_scale", lambda s: s.long())), ValueError,
                           r"\.weight_scale is torch.int64"),
    "bias int32": (_rewrite_tensors(_set_tensor("w4a16", "bias", lambda b: b.int())), ValueError,
                   r"\.bias is torch.int32"),
    "weight_packed wrong shape": (_rewrite_tensors(_set_tensor("w4a16", "weight_packed",
                                                               lambda w: w[:, :-1].contiguous())),
                                  ValueError, r"\.weight_packed is torch.uint8 \(\d+, \d+\), expected"),
    "tensor missing": (_rewrite_tensors(lambda t, d: t.pop(f"{_first(d, 'w4a8')}.input_scale")), ValueError,
                       r"tensor '[\w.]+\.input_scale' is missing"),
    "unexpected tensor": (_rewrite_tensors(lambda t, d: t.update(stray=torch.zeros(2))), ValueError,
                          "unexpected tensor 'stray'"),
    "config.json unknown key": (_edit_config({"bogus_key": 1}), ValueError, "bogus_key"),
    "config.json edited": (_edit_config({"axes_dims_rope": [12, 8, 12]}, record_sha=False), ValueError,
                           r"config.json: sha256 .* the file was modified"),
    "quantization_config a string": (_edit_config({"quantization_config": "mgtq"}), ValueError,
                                     "quantization_config must be a mapping"),
    "more layers than tensors": (_edit_config({"num_single_layers": 10**9}), ValueError,
                                 "num_single_layers 1000000000 describes more layers"),
    "config.json missing": (lambda f: (f / "transformer" / "config.json").unlink(), FileNotFoundError, "config.json"),
    "pickle .bin in vqvae": (_pickle_vq, ValueError,  # the export records the VQ's safetensors file
                             r"vqvae/diffusion_pytorch_model.safetensors does not exist, but the folder's model_index"),
}


def test_a_manifest_of_an_older_mgtq_names_the_weights_only_and_loads(exported, tmp_path):
    copy = tmp_path / "ckpt"
    shutil.copytree(exported, copy)
    data = _manifest(copy)
    del data["files"]["config.json"]  # written before config.json was hashed
    _set_manifest(copy, data)
    with pytest.raises(ValueError, match="manifest.json: sha256 differs"):  # today's export records its manifest
        mgtq.load(copy)
    _as_an_earlier_mgtq_wrote_it(copy)
    with pytest.warns(UserWarning, match="an earlier mgtq"):
        assert mgtq.load(copy).transformer is not None


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_checkpoint_is_a_one_line_error_naming_the_key(case, exported, tmp_path):
    damage, error, key = BAD[case]
    copy = tmp_path / "ckpt"
    shutil.copytree(exported, copy)
    damage(copy)
    with pytest.raises(error, match=key) as info:
        mgtq.load(copy)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("version,advice", [(1, "(?<!upgrade mgtq, or )re-export the checkpoint"),
                                            ("2", "(?<!upgrade mgtq, or )re-export the checkpoint"),
                                            (3, "upgrade mgtq, or re-export")])
def test_a_manifest_of_another_format_version_says_what_helps(exported, tmp_path, version, advice):
    """Only a newer format is helped by upgrading mgtq; an older one (or one that is no number) needs a new export."""
    copy = shutil.copytree(exported, tmp_path / "ckpt")
    _set_manifest(copy, {**_manifest(copy), "format_version": version})
    with pytest.raises(ValueError, match=f"this mgtq reads 'mgtq-quantized-transformer' version 2: {advice}"):
        ckpt.read_manifest(copy / "transformer")


def test_saving_damaged_scales_says_they_are_damaged_and_writes_nothing(tmp_path):
    from mgtq.quantization import W4A8Linear

    pipe = random_quantized_pipeline(seed=1)
    layer = next(m for m in pipe.transformer.modules() if isinstance(m, W4A8Linear))
    layer.input_scale.fill_(float("nan"))
    with pytest.raises(ValueError, match="input_scale holds NaN or infinite values; the model's values are damaged.*"
                                         "nothing was written"):
        pipe.save_pretrained(tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_an_export_from_an_official_folder_carries_its_settings_and_loads(qpipe, random_pipeline_dir, tmp_path):
    official = shutil.copytree(random_pipeline_dir, tmp_path / "official")
    as_official_folder(official)  # no settings, no checksums
    out = _write(qpipe, official, tmp_path / "ckpt")
    loaded = mgtq.load(out)  # a quantized checkpoint without settings was refused: this one was unloadable
    assert loaded.settings.sampler.timestep_convention == "step_index"  # the official pipeline's, as read
    assert SETTINGS_ENTRY in json.loads((out / "model_index.json").read_text())[CHECKSUMS_KEY]
