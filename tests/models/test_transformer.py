"""MeissonicTransformer: exact against the official-code fixtures, key manifest, round trips, errors,
torch.compile (no graph breaks, same output, float and quantized) and its cached RoPE tables."""

import json
import shutil
from pathlib import Path

import copy

import pytest
import torch
from diffusers.models.normalization import RMSNorm
from safetensors.torch import load_file, save_file
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import mgtq.fused
from mgtq.fused import native_qk_norm_rope
from mgtq.models import MeissonicTransformer, build_transformer, preset_config
from mgtq.models.transformer import QKNorm, apply_rope, rope_tables
from testkit import micro_forward_inputs, quantized_micro_transformer

# Outputs of the official Meissonic code; importlib mode cannot import them from conftest.
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
FIXTURE_NAMES = ["meissonic-tiny-a", "meissonic-tiny-nodown"]


def _load_fixture(name):
    folder = FIXTURES / name
    model = MeissonicTransformer.from_pretrained(folder).eval()
    return model, load_file(folder / "inputs.safetensors"), load_file(folder / "outputs.safetensors")["logits"]


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_reproduces_official_logits(name):
    model, inputs, expected = _load_fixture(name)
    with torch.no_grad():
        logits = model(**inputs)
    assert logits.shape == expected.shape
    assert (logits - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_batch_rows_are_independent(name):
    model, inputs, expected = _load_fixture(name)
    single = {k: (v[1:2] if k not in ("img_ids", "txt_ids") else v) for k, v in inputs.items()}
    with torch.no_grad():
        logits = model(**single)
    assert (logits - expected[1:2]).abs().max().item() < 1e-4


def test_default_ids_and_micro_conds_match_official_layout():
    model, inputs, expected = _load_fixture("meissonic-tiny-a")
    inputs = {k: v for k, v in inputs.items() if k not in ("img_ids", "txt_ids")}
    with torch.no_grad():
        assert (model(**inputs) - expected).abs().max().item() < 1e-4


def test_bf16_close_to_fp32():
    model, inputs, expected = _load_fixture("meissonic-tiny-a")
    model = model.to(torch.bfloat16)
    cast = {k: (v.to(torch.bfloat16) if v.is_floating_point() and k not in ("img_ids", "txt_ids") else v) for k, v in inputs.items()}
    with torch.no_grad():
        logits = model(**cast).float()
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    rel = (logits - expected).norm() / expected.norm()
    assert rel < 0.05


def test_full_key_manifest_on_meta_device():
    model = build_transformer("meissonic-1024", empty=True)
    assert all(p.device.type == "meta" for p in model.parameters())
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    ref = {}
    for line in (FIXTURES / "meissonic-1024-keys.tsv").read_text().splitlines():
        key, shape = line.split("\t")
        ref[key] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    assert set(ours) == set(ref), (sorted(set(ours) - set(ref))[:5], sorted(set(ref) - set(ours))[:5])
    assert ours == ref
    assert sum(p.numel() for p in model.parameters()) == 1_006_946_304
    assert sum(isinstance(m, torch.nn.Linear) for m in model.modules()) == 373


def test_released_config_matches_preset():
    official = json.loads((FIXTURES / "meissonic-1024-transformer-config.json").read_text())
    preset = preset_config("meissonic-1024")
    for key, value in preset.items():
        assert official[key] == (list(value) if isinstance(value, tuple) else value), key


def test_save_load_round_trip_identical(tmp_path):
    model, inputs, _ = _load_fixture("meissonic-tiny-a")
    model.save_pretrained(tmp_path / "t", safe_serialization=True)
    again = MeissonicTransformer.from_pretrained(tmp_path / "t").eval()
    with torch.no_grad():
        assert torch.equal(model(**inputs), again(**inputs))


def test_diffusers_save_and_load_options_keep_safetensors_and_mgtqs_checks(tmp_path):
    model, inputs, _ = _load_fixture("meissonic-tiny-a")
    for options, match in (({"safe_serialization": False}, "safetensors only, never pickle files"),
                           ({"push_to_hub": True, "repo_id": "me/x"}, "local folder only; .*upload_folder")):
        with pytest.raises(ValueError, match=match):
            model.save_pretrained(tmp_path / "refused", **options)
        assert not (tmp_path / "refused").exists()
    loaded, info = MeissonicTransformer.from_pretrained(FIXTURES / "meissonic-tiny-a", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    # a variant is held to the checks on its own file, not the plain one beside it
    model.save_pretrained(tmp_path / "t", safe_serialization=True)
    model.save_pretrained(tmp_path / "t", safe_serialization=True, variant="fp16")
    assert sorted(p.name for p in (tmp_path / "t").glob("*.safetensors")) == [
        "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.safetensors"]  # as diffusers keeps both
    with torch.no_grad():
        assert torch.equal(MeissonicTransformer.from_pretrained(tmp_path / "t", variant="fp16").eval()(**inputs),
                           model(**inputs))
    variant = tmp_path / "t" / "diffusion_pytorch_model.fp16.safetensors"
    tensors = load_file(variant)
    save_file({**tensors, "extra.weight": torch.zeros(2)}, variant)
    with pytest.raises(ValueError, match=r"diffusion_pytorch_model.fp16.safetensors: tensor 'extra.weight' is not "
                                         "part of the transformer"):
        MeissonicTransformer.from_pretrained(tmp_path / "t", variant="fp16")
    (tmp_path / "t" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"holds a variant's weights only .* variant="):
        MeissonicTransformer.from_pretrained(tmp_path / "t")


def test_a_float_save_of_damaged_weights_leaves_the_folder_as_it_was(tmp_path):
    model, _, _ = _load_fixture("meissonic-tiny-a")
    model.save_pretrained(tmp_path / "t", safe_serialization=True)
    before = {p.name: p.read_bytes() for p in (tmp_path / "t").iterdir()}
    (tmp_path / "t" / "README.md").write_text("a model card of the user's")
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match="holds NaN or infinite values, which a load would refuse; nothing was written"):
        model.save_pretrained(tmp_path / "t", safe_serialization=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "t").iterdir() if p.name != "README.md"} == before
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = 0.0
    model.save_pretrained(tmp_path / "t", safe_serialization=True, max_shard_size="500KB")
    model.save_pretrained(tmp_path / "t", safe_serialization=True)  # into the folder: the user's file stays
    assert (tmp_path / "t" / "README.md").is_file() and not list((tmp_path / "t").glob(".*"))
    assert sorted(p.name for p in (tmp_path / "t").glob("diffusion_pytorch_model*")) == [
        "diffusion_pytorch_model.safetensors"]  # the earlier save's shards and their index are gone


def test_sharded_checkpoint_loads(tmp_path):
    model, inputs, expected = _load_fixture("meissonic-tiny-a")
    model.save_pretrained(tmp_path / "s", safe_serialization=True, max_shard_size="500KB")
    assert len(list((tmp_path / "s").glob("*.safetensors"))) > 1
    again = MeissonicTransformer.from_pretrained(tmp_path / "s").eval()
    with torch.no_grad():
        assert (again(**inputs) - expected).abs().max().item() < 1e-4


def test_config_that_does_not_match_weights_is_a_clear_error(tmp_path):
    from mgtq.pipeline import load_transformer

    folder = tmp_path / "bad"
    shutil.copytree(FIXTURES / "meissonic-tiny-a", folder)
    config = json.loads((folder / "config.json").read_text())
    config["codebook_size"] = 48
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not match its weights"):
        load_transformer(folder)


def test_truncated_weights_are_a_clear_error(tmp_path):
    from mgtq.pipeline import load_transformer

    folder = tmp_path / "trunc"
    shutil.copytree(FIXTURES / "meissonic-tiny-nodown", folder)
    weights = folder / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match=f"{weights} is not a readable safetensors file .*truncated"):
        load_transformer(folder)


def test_missing_folder_is_a_clear_error(tmp_path):
    from mgtq.pipeline import load_transformer

    with pytest.raises(FileNotFoundError, match="no hub downloads"):
        load_transformer(tmp_path / "does-not-exist")


@pytest.mark.parametrize("bad", [dict(pooled_projection_dim=48), dict(axes_dims_rope=(4, 6, 8)), dict(vocab_size=32),
                                 dict(downsample=True, upsample=False)])
def test_invalid_configs_are_rejected(bad):
    with pytest.raises(ValueError):
        build_transformer("test-micro", **bad)


def test_out_of_range_token_ids_are_rejected():
    model = build_transformer("test-micro")
    ids = torch.full((1, 4, 4), 40)
    with pytest.raises(ValueError, match="token ids"):
        model(ids, torch.zeros(1, 3, 32), torch.zeros(1, 32), torch.zeros(1))


def test_rope_tables_rotate_pairs():
    cos, sin = rope_tables(torch.tensor([[0.0, 1.0, 2.0]]), (2, 2, 2))
    assert cos.shape == (1, 6)
    x = torch.randn(1, 1, 1, 6)
    y = apply_rope(x, cos, sin)
    assert torch.allclose(y.norm(), x.norm(), atol=1e-6)  # rotations keep the norm
    assert torch.allclose(y[..., :2], x[..., :2])  # axis 0 has position 0: identity


class _TensorsMade(TorchDispatchMode):
    """Records (device type, dtype) of every tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.made = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.made |= {(t.device.type, t.dtype) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)}
        return out


def test_rope_tables_for_an_mps_model_make_no_float64_tensor_there():
    # MPS has no float64 ("Cannot convert a MPS Tensor to float64"): the tables are built on the host and moved.
    # Fake tensors stand for MPS ones (building them on "mps" itself fails at the first factory call here).
    with FakeTensorMode(allow_non_fake_inputs=True):
        ids = torch.zeros(10, 3, device="mps")
        made = _TensorsMade()
        with made:
            cos, sin = rope_tables(ids, (4, 6, 6))
    assert (cos.device.type, cos.dtype, sin.device.type, sin.dtype) == ("mps", torch.float32, "mps", torch.float32)
    assert ("cpu", torch.float64) in made.made and ("mps", torch.float64) not in made.made


def _official_rope(x, cos, sin):
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]
    x_real, x_imag = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    x_rot = torch.stack([-x_imag, x_real], dim=-1).flatten(-2)
    return (x.float() * cos + x_rot * sin).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per_sample", [False, True])
def test_rope_in_one_complex_product_equals_the_official_formula(dtype, per_sample):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (77, 3), generator=g).float()
    cos, sin = rope_tables(ids, (16, 56, 56))
    if per_sample:  # token merging's per-sample tables
        cos, sin = torch.stack([cos, cos.flip(0)]), torch.stack([sin, sin.flip(0)])
    x = (torch.randn(2, 8, 77, 128, generator=g) * 4).to(dtype)
    # bf16: the same value after the one rounding; fp32: within an ulp (the product may use an FMA).
    tol = dict(rtol=0, atol=0) if dtype == torch.bfloat16 else dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(apply_rope(x, cos, sin), _official_rope(x, cos, sin), **tol)
    torch.testing.assert_close(apply_rope(x.transpose(1, 2).contiguous().transpose(1, 2), cos, sin),
                               _official_rope(x, cos, sin), **tol)  # strided input, as after a head split


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per_sample", [False, True])
def test_qk_norm_with_rope_in_one_chain_equals_the_two_functions(dtype, per_sample):
    # Eager inference fuses RMSNorm and RoPE into in-place fp32 passes: equal in fp32 (same products in
    # the same order), within one bf16 step in bf16 (one rounding instead of two).
    g = torch.Generator().manual_seed(3)
    cos, sin = rope_tables(torch.randint(0, 64, (40, 3), generator=g).float(), (16, 56, 56))
    if per_sample:
        cos, sin = torch.stack([cos, cos.flip(0)]), torch.stack([sin, sin.flip(0)])
    norm = QKNorm(128, eps=1e-6)
    norm.weight.data = torch.rand(128, generator=g) + 0.5
    norm = norm.to(dtype).requires_grad_(False)
    heads = (torch.randn(2, 40, 8 * 128, generator=g) * 3).to(dtype).unflatten(-1, (8, 128)).transpose(1, 2)
    fused = norm(heads, (cos, sin))
    # The two functions in fp32, rounded once at the end: what the fused chain computes. mgtq's one-pass
    # kernel (bf16 on AMX-class CPUs) adds the sum of squares in another order: a rare last-bit difference.
    exact = apply_rope(RMSNorm.forward(copy.deepcopy(norm).float(), heads.float()), cos, sin).to(dtype)
    if native_qk_norm_rope(heads, norm.weight, cos, sin):
        steps = (fused.view(torch.int16).int() - exact.view(torch.int16).int()).abs()
        assert steps.max() <= 1 and (steps > 0).float().mean() < 1e-3
    else:
        torch.testing.assert_close(fused, exact, rtol=1e-6, atol=1e-6)
    if dtype == torch.bfloat16:  # the composition in bf16 rounds the normed values first: one more step
        composed = apply_rope(RMSNorm.forward(norm, heads), cos, sin)
        assert (fused.float() - composed.float()).abs().max() <= 2 ** -7 * composed.float().abs().max()
    assert torch.equal(norm(heads), RMSNorm.forward(norm, heads))  # without tables: the plain RMSNorm
    # Autograd takes the composition (in-place passes would break backward).
    norm.requires_grad_(True)
    out = norm(heads.detach().float().requires_grad_(), (cos, sin)) if dtype == torch.float32 else None
    if out is not None:
        out.sum().backward()
        assert norm.weight.grad is not None


def test_multi_modal_block_runs_no_batched_gemm():
    # Each stream's attention output is gathered contiguous before its projection: a row slice of the
    # joint output would make F.linear fall back to bmm with the weight copied per sample.
    from mgtq.models.transformer import MMDiTBlock

    torch.manual_seed(0)
    block = MMDiTBlock(64, 2, 32).to(torch.bfloat16).eval()
    ids = torch.zeros(5 + 16, 3)
    ids[5:, 1], ids[5:, 2] = torch.arange(16) // 4, torch.arange(16) % 4
    x, ctx, temb = (torch.randn(2, n, 64).to(torch.bfloat16) for n in (16, 5, 1))
    with torch.no_grad(), torch.profiler.profile() as prof:
        block(x, ctx, temb[:, 0], rope_tables(ids, (8, 12, 12)))
    names = {e.name for e in prof.events()}
    assert "aten::bmm" not in names, sorted(names)
    if mgtq.fused._X86 and torch._C._has_mkldnn:  # every bf16 Linear on oneDNN's linear
        assert "aten::addmm" not in names, sorted(names)


def test_compiled_rope_equals_eager_rope():
    g = torch.Generator().manual_seed(1)
    cos, sin = rope_tables(torch.randint(0, 64, (40, 3), generator=g).float(), (16, 56, 56))
    x = (torch.randn(2, 8, 40, 128, generator=g) * 4).to(torch.bfloat16)
    torch._dynamo.reset()
    compiled = torch.compile(apply_rope, fullgraph=True)(x, cos, sin)
    torch.testing.assert_close(compiled.float(), _official_rope(x, cos, sin).float(), rtol=2 ** -7, atol=1e-6)


def test_no_graph_breaks_and_same_output():
    # The quantized model runs every float op of the float one too, plus both quantized layer kinds.
    model = quantized_micro_transformer()
    inputs = micro_forward_inputs(model)
    torch._dynamo.reset()
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(**inputs)
        assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
        assert explained.graph_count == 1
        eager = model(**inputs)
        # aot_eager traces through the fake (meta) kernels of mgtq's custom ops, as Inductor does.
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(**inputs)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_default_tables_are_cached_per_grid_and_equal_a_rebuild():
    model = build_transformer("test-micro").eval()
    small, large = micro_forward_inputs(model, grid=4), micro_forward_inputs(model, grid=8)
    with torch.no_grad():
        first = model(**small)
        model(**large)
        assert {k[0] for k in model._table_cache} == {"rope", "micro"}
        assert sum(k[0] == "rope" for k in model._table_cache) == 2  # one per grid
        again = model(**small)
        model._table_cache.clear()
        rebuilt = model(**small)
    assert torch.equal(first, again) and torch.equal(first, rebuilt)
    assert not any("cache" in k for k in model.state_dict())


def test_tables_cached_in_inference_mode_serve_a_training_forward():
    model = build_transformer("test-micro")
    inputs = micro_forward_inputs(model, grid=4)
    with torch.inference_mode():
        model(**inputs)  # fills the cache
    model(**inputs).float().square().mean().backward()  # saves the cached tables for backward
    assert model.context_embedder.weight.grad is not None


def test_compile_blocks_same_output():
    model = quantized_micro_transformer()
    inputs = micro_forward_inputs(model)
    with torch.no_grad():
        eager = model(**inputs)
        model.compile_blocks(backend="aot_eager")
        compiled = model(**inputs)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    assert set(model.state_dict()) == set(quantized_micro_transformer().state_dict())  # compiled in place, same keys


def test_compile_blocks_with_the_onednn_weight_cache():
    # The opt-in cache's prepacked weights pass through the compiled blocks (custom op, fullgraph) and the
    # result is the eager cached model's within int8 rounding: Inductor's fused float ops differ from eager
    # in the last bits, which can flip an activation's int8 code at a rounding boundary (one step, 0.05).
    import pytest

    from mgtq.quantization import W4A8Linear
    from mgtq.quantization.qtensor import onednn_int8_linear_available

    if not onednn_int8_linear_available():
        pytest.skip("needs the oneDNN weight cache (an x86 CPU build of torch 2.11 or newer)")
    model = quantized_micro_transformer()
    layers = [m for m in model.modules() if isinstance(m, W4A8Linear)]
    assert layers
    for layer in layers:
        layer.enable_weight_cache("onednn")
    inputs = micro_forward_inputs(model)
    with torch.no_grad():
        eager = model(**inputs)
        model.compile_blocks()
        compiled = model(**inputs)
    assert all(layer.weight_cache == "onednn" for layer in layers)
    torch.testing.assert_close(compiled, eager, rtol=2e-2, atol=2e-2)
    # oneDNN's prepacked weights cannot be traced ahead of time: plain torch.compile, nothing saved, no warning
    store = model.precompiled  # (None where torch lacks the store's ahead-of-time compile)
    assert store is None or (store.counts["compiled"] == 0 and store.counts["fallback_calls"] > 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("grid", [(8, 12), (7, 9)])
def test_token_grid_layers_equal_diffusers_modules(dtype, grid):
    """The embedding, head and feature compression run as linears and one-pass norms; diffusers' modules
    (what the official code uses) give the same values from the same state dict, odd grids included."""
    from diffusers.models.downsampling import Downsample2D
    from diffusers.models.unets.uvit_2d import ConvMlmLayer, UVit2DConvEmbed
    from diffusers.models.upsampling import Upsample2D

    model = build_transformer("tiny-shapes").to(dtype).eval()
    dim, vocab, codebook = 128, model.config.vocab_size, model.config.codebook_size
    pairs = [
        (model.embed, UVit2DConvEmbed(dim, dim, vocab, True, 1e-6, False)),
        (model.mlm_layer, ConvMlmLayer(dim, dim, False, True, 1e-6, codebook)),
        (model.down_block.downsample, Downsample2D(dim, use_conv=True, padding=0, name="Conv2d_0", kernel_size=2,
                                                   norm_type="rms_norm", eps=1e-6, elementwise_affine=True, bias=False)),
        (model.up_block.upsample, Upsample2D(dim, use_conv_transpose=True, kernel_size=2, padding=0, name="conv",
                                             norm_type="rms_norm", eps=1e-6, elementwise_affine=True, bias=False,
                                             interpolate=False)),
    ]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, *grid), generator=g)
    image = torch.randn(2, *grid, dim, generator=g).to(dtype).permute(0, 3, 1, 2)  # channels last, as in the model
    for mine, theirs in pairs:
        theirs = theirs.to(dtype).eval()
        theirs.load_state_dict(mine.state_dict())
        x = ids if mine is model.embed else image
        with torch.inference_mode():
            y, expected = mine(x), theirs(x)
        assert y.shape == expected.shape
        tol = 3e-2 if dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(y.float(), expected.float(), rtol=tol, atol=tol)
