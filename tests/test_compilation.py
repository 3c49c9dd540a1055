"""mgtq.compilation: torch.compile's caches in mgtq's user cache folder, a warm start that uses them, and eager where
no toolchain can build compiled code."""

import copy
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mgtq import compilation

# The precompiled store needs torch's ahead-of-time compile API as of 2.11; older torch compiles the plain way.
needs_precompile = pytest.mark.skipif(not compilation.precompile_supported(),
                                      reason="this torch lacks the ahead-of-time compile API of the precompiled "
                                             "store (torch 2.11+): blocks compile with plain torch.compile")

REPO = Path(__file__).resolve().parents[1]


def test_cache_dir_follows_mgtq_then_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.delenv(compilation.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compilation.cache_dir() == tmp_path / "xdg" / "mgtq"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert compilation.cache_dir() == Path.home() / ".cache" / "mgtq"
    monkeypatch.setenv(compilation.CACHE_ENV, str(tmp_path / "mine"))
    assert compilation.cache_dir() == tmp_path / "mine"
    assert compilation.compile_cache_dir().parent == tmp_path / "mine" / "torch-compile"


def test_cache_dir_on_windows_is_under_localappdata_unless_mgtq_or_xdg_say_otherwise(monkeypatch, tmp_path):
    monkeypatch.delenv(compilation.CACHE_ENV, raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("LOCALAPPDATA", str(tmp_path / "AppData" / "Local"))
    assert compilation.cache_dir() == Path.home() / ".cache" / "mgtq"  # the variable means nothing elsewhere
    monkeypatch.setattr(compilation, "_WINDOWS", True)
    assert compilation.cache_dir() == tmp_path / "AppData" / "Local" / "mgtq"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compilation.cache_dir() == tmp_path / "xdg" / "mgtq"
    monkeypatch.setenv(compilation.CACHE_ENV, str(tmp_path / "mine"))
    assert compilation.cache_dir() == tmp_path / "mine"
    monkeypatch.delenv(compilation.CACHE_ENV)
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.delenv("LOCALAPPDATA")
    assert compilation.cache_dir() == Path.home() / ".cache" / "mgtq"


def test_cache_folder_changes_with_the_custom_op_schemas():
    # A cached graph calls mgtq's ops by their argument names: a schema change must not load it.
    import torch

    assert compilation.compile_cache_dir().name.endswith(compilation.ops_digest())
    before = compilation.ops_digest("mgtq_schema_probe")
    torch.library.define("mgtq_schema_probe::op", "(Tensor x, int renamed) -> Tensor")
    assert compilation.ops_digest("mgtq_schema_probe") != before
    assert compilation.ops_digest() != before  # mgtq's own ops are registered and counted


def test_persistent_cache_goes_to_the_user_folder_unless_torch_s_own_knob_is_set(monkeypatch, tmp_path):
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv(compilation.CACHE_ENV, str(tmp_path / "mgtq"))
    monkeypatch.setenv(compilation.INDUCTOR_CACHE_ENV, default_cache_dir())  # what torch writes on first use
    folder = compilation.use_persistent_compile_cache()
    assert folder == compilation.compile_cache_dir() and folder.is_dir()
    assert os.environ[compilation.INDUCTOR_CACHE_ENV] == str(folder)
    monkeypatch.setenv(compilation.INDUCTOR_CACHE_ENV, str(tmp_path / "users-own"))
    assert compilation.use_persistent_compile_cache() == tmp_path / "users-own"


def test_builds_outside_a_compile_go_to_the_user_folder_and_leave_the_process_as_it_was(monkeypatch, tmp_path):
    # mgtq's C++ kernels are built in eager processes too: tmp would lose them at the next reboot.
    seen = []

    def build():
        with compilation.inductor_cache_for_builds():
            seen.append(os.environ.get(compilation.INDUCTOR_CACHE_ENV))

    monkeypatch.setenv(compilation.CACHE_ENV, str(tmp_path / "mgtq"))
    monkeypatch.delenv(compilation.INDUCTOR_CACHE_ENV, raising=False)
    build()
    assert seen[-1] == str(compilation.compile_cache_dir()) and compilation.compile_cache_dir().is_dir()
    assert compilation.INDUCTOR_CACHE_ENV not in os.environ  # a user's own torch.compile keeps torch's folder
    monkeypatch.setenv(compilation.INDUCTOR_CACHE_ENV, str(tmp_path / "users-own"))
    build()
    assert seen[-1] == str(tmp_path / "users-own") == os.environ[compilation.INDUCTOR_CACHE_ENV]
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    monkeypatch.setenv(compilation.CACHE_ENV, str(blocked / "mgtq"))  # cannot be made: torch's folder, no error
    monkeypatch.delenv(compilation.INDUCTOR_CACHE_ENV)
    build()
    assert seen[-1] is None


def test_mgtq_s_native_kernels_are_built_in_the_user_folder(monkeypatch, tmp_path):
    from torch._inductor import codecache

    from mgtq.native import amx

    seen = []

    def record(cls, source):
        seen.append(os.environ.get(compilation.INDUCTOR_CACHE_ENV))
        raise RuntimeError("simulated: recorded where it would build")

    monkeypatch.setenv(compilation.CACHE_ENV, str(tmp_path))
    monkeypatch.delenv(compilation.INDUCTOR_CACHE_ENV, raising=False)
    monkeypatch.setattr(amx, "_has_avx512_vnni", lambda: True)
    monkeypatch.setattr(codecache.CppCodeCache, "load", classmethod(record))
    amx._library.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="simulated"):
            assert amx._library() is None
    finally:
        amx._library.cache_clear()  # the real library again for the tests after this one
    assert seen == [str(compilation.compile_cache_dir())]


def test_compile_blocks_uses_the_persistent_cache(monkeypatch, tmp_path):
    from mgtq.models.presets import build_transformer

    monkeypatch.setenv(compilation.CACHE_ENV, str(tmp_path))
    monkeypatch.delenv(compilation.INDUCTOR_CACHE_ENV, raising=False)
    build_transformer("test-micro").compile_blocks(backend="eager")
    assert os.environ[compilation.INDUCTOR_CACHE_ENV] == str(compilation.compile_cache_dir())


# One small quantized layer and a neighbour (few kernels to build: the test is about the cache).
_COMPILE_ONCE = """
import json, torch
from torch._dynamo.utils import counters
from mgtq.compilation import use_persistent_compile_cache
from mgtq.quantization import W4A8Linear
torch.set_num_threads(1)
torch.manual_seed(0)
layer = W4A8Linear.from_float(torch.nn.Linear(64, 32), 0.05)
use_persistent_compile_cache()
with torch.no_grad():
    torch.compile(lambda x: layer(torch.relu(x)), fullgraph=True)(torch.randn(40, 64))
print(json.dumps(dict(counters["inductor"])))
"""


@pytest.mark.slow
def test_second_process_loads_the_compiled_code_from_the_cache(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != compilation.INDUCTOR_CACHE_ENV}
    env[compilation.CACHE_ENV] = str(tmp_path / "cache")

    def run() -> dict:
        out = subprocess.run([sys.executable, "-c", _COMPILE_ONCE], cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    cold = run()
    assert cold.get("fxgraph_cache_miss", 0) > 0 and cold.get("fxgraph_cache_hit", 0) == 0, cold
    assert any((tmp_path / "cache" / "torch-compile").rglob("*")), "nothing was written to the user cache"
    warm = run()
    assert warm.get("fxgraph_cache_hit", 0) > 0 and warm.get("fxgraph_cache_miss", 0) == 0, warm



# ------------------------------------------------------------------------------------------ precompiled blocks
_PRECOMPILE = """
import json, sys, torch
from torch._dynamo.utils import counters
from testkit import micro_forward_inputs, quantized_micro_transformer
torch.set_num_threads(1)
model = quantized_micro_transformer()
model.compile_blocks()
with torch.inference_mode():  # as the sampler calls the transformer
    out = model(**micro_forward_inputs(model))
torch.save(out, sys.argv[1])
print(json.dumps({"counts": model.precompiled.counts, "graphs": counters["stats"]["unique_graphs"]}))
"""


def _run_in_fresh_process(script: str, cache: Path, out: Path) -> dict:
    """`script` in a new interpreter with `cache` as mgtq's cache folder, writing `out`; its last JSON line."""
    env = {k: v for k, v in os.environ.items() if k != compilation.INDUCTOR_CACHE_ENV}
    env[compilation.CACHE_ENV] = str(cache)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "tests"), env.get("PYTHONPATH")]))  # testkit
    done = subprocess.run([sys.executable, "-c", script, str(out)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@needs_precompile
def test_a_second_process_loads_the_precompiled_blocks_without_tracing(tmp_path):
    import torch

    def run(name: str) -> dict:
        return _run_in_fresh_process(_PRECOMPILE, tmp_path / "cache", tmp_path / name)

    cold = run("cold.pt")
    assert cold["counts"]["compiled"] > 0 and cold["counts"]["loaded"] == 0 and cold["graphs"] > 0, cold
    assert cold["counts"]["fallback_calls"] == 0, cold
    warm = run("warm.pt")
    assert warm["counts"]["loaded"] == cold["counts"]["compiled"] and warm["counts"]["compiled"] == 0, warm
    assert warm["graphs"] == 0, "Dynamo traced a block that was precompiled"
    assert torch.equal(torch.load(tmp_path / "warm.pt"), torch.load(tmp_path / "cold.pt"))


# Context reuse (mgtq.reuse) through the store: a full step, then local steps of three token counts.
_REUSE = """
import json, sys, torch
from torch._dynamo.utils import counters
from mgtq.reuse import ContextCache
from testkit import micro_forward_inputs, quantized_micro_transformer
torch.set_num_threads(1)
model = quantized_micro_transformer()
model.compile_blocks()
inputs = micro_forward_inputs(model, grid=8)  # 4x4 transformer tokens
cache = ContextCache()  # bucket 1: every local step its own token count
outs, counts = [], []
with torch.inference_mode():
    outs.append(model(**inputs, token_hook=cache.full_step()))
    for count in (3, 6, 10):
        active = torch.zeros(1, 8, 8, dtype=torch.bool)
        active.view(-1)[torch.randperm(64, generator=torch.Generator().manual_seed(count))[:count]] = True
        outs.append(model(**inputs, token_hook=cache.local_step(active)))
        counts.append(dict(model.precompiled.counts))
torch.save(outs, sys.argv[1])
print(json.dumps({"counts": counts, "graphs": counters["stats"]["unique_graphs"]}))
"""


@pytest.mark.slow
@needs_precompile
def test_context_reuse_steps_are_precompiled_once_for_every_token_count(tmp_path):
    # --sampler fast --compile: full steps and local steps of any token count load in a second process.
    import torch

    from mgtq.reuse import ContextCache
    from testkit import micro_forward_inputs, quantized_micro_transformer

    outs = _compiled_once_then_loaded(_REUSE, tmp_path)
    # and what eager computes, within int8 rounding (the local steps' logits of their active tokens)
    model, cache = quantized_micro_transformer(), ContextCache()
    inputs = micro_forward_inputs(model, grid=8)
    with torch.inference_mode():
        torch.testing.assert_close(outs[0], model(**inputs, token_hook=cache.full_step()), rtol=2e-2, atol=2e-2)
        active = torch.zeros(1, 8, 8, dtype=torch.bool)
        active.view(-1)[torch.randperm(64, generator=torch.Generator().manual_seed(10))[:10]] = True
        torch.testing.assert_close(outs[-1], model(**inputs, token_hook=cache.local_step(active)), rtol=2e-2,
                                   atol=2e-2)


# TomeMGT (mgtq.merging) through the store: the decoded schedule merges more tokens as fewer are masked.
_TOME = """
import json, sys, torch
from torch._dynamo.utils import counters
from mgtq.merging import TomeConfig, TomePlan
from testkit import micro_forward_inputs, quantized_micro_transformer
torch.set_num_threads(1)
model = quantized_micro_transformer()
model.compile_blocks()
inputs = micro_forward_inputs(model, grid=8)  # 4x4 transformer tokens
plan = TomePlan(TomeConfig(ratio=0.5, blocks="all", merge_mlp=False))
outs, counts = [], []
with torch.inference_mode():
    # r = 1, 3, 5, 7 of 16 tokens; more would leave <= 16 rows, where the kernel choice changes (SMALL_M)
    for step, masked in enumerate((56, 40, 24, 8)):
        ids = inputs["hidden_states"].clone()
        ids.view(-1)[torch.randperm(64, generator=torch.Generator().manual_seed(step))[:masked]] = model.mask_token_id
        outs.append(model(**{**inputs, "hidden_states": ids}, token_hook=plan.at_step(step)))
        counts.append(dict(model.precompiled.counts))
torch.save(outs, sys.argv[1])
print(json.dumps({"counts": counts, "graphs": counters["stats"]["unique_graphs"]}))
"""


@pytest.mark.slow
@needs_precompile
def test_tomemgt_merges_are_precompiled_once_for_every_merged_count(tmp_path):
    # --tome --compile: every step's merged count is served by one function per block kind, loaded next time.
    import torch

    from mgtq.merging import TomeConfig, TomePlan
    from testkit import micro_forward_inputs, quantized_micro_transformer

    outs = _compiled_once_then_loaded(_TOME, tmp_path)
    # and what eager computes with the same merges, within int8 rounding (the last step: 7 of 16 tokens merged)
    model = quantized_micro_transformer()
    inputs = micro_forward_inputs(model, grid=8)
    ids = inputs["hidden_states"].clone()
    ids.view(-1)[torch.randperm(64, generator=torch.Generator().manual_seed(3))[:8]] = model.mask_token_id
    plan = TomePlan(TomeConfig(ratio=0.5, blocks="all", merge_mlp=False)).at_step(3)
    with torch.inference_mode():
        eager = model(**{**inputs, "hidden_states": ids}, token_hook=plan)
    torch.testing.assert_close(outs[-1], eager, rtol=2e-2, atol=2e-2)


def _compiled_once_then_loaded(script: str, tmp_path) -> list:
    """Run `script` cold then warm on one cache: each block kind compiled once whatever its calls' token counts,
    nothing served by plain torch.compile, the warm process tracing nothing and computing the same; its outputs."""
    import torch

    def run(name: str) -> dict:
        return _run_in_fresh_process(script, tmp_path / "cache", tmp_path / name)

    cold = run("cold.pt")
    first, *later = cold["counts"]
    assert first["compiled"] > 0 and all(c["compiled"] == first["compiled"] for c in later), cold  # no new count
    assert all(c["fallback_calls"] == 0 for c in cold["counts"]), cold
    warm = run("warm.pt")
    assert warm["graphs"] == 0, "Dynamo traced a block that was precompiled"
    assert warm["counts"][-1]["loaded"] == first["compiled"] and warm["counts"][-1]["compiled"] == 0, warm
    outs = torch.load(tmp_path / "warm.pt")
    assert all(torch.equal(a, b) for a, b in zip(outs, torch.load(tmp_path / "cold.pt")))
    return outs


def _micro(monkeypatch, tmp_path):
    from testkit import micro_forward_inputs, quantized_micro_transformer

    monkeypatch.setenv(compilation.CACHE_ENV, str(tmp_path))
    monkeypatch.delenv(compilation.INDUCTOR_CACHE_ENV, raising=False)
    model = quantized_micro_transformer()
    return model, micro_forward_inputs(model, grid=4)


@pytest.mark.slow
@needs_precompile
def test_precompiled_blocks_equal_plain_torch_compile_and_a_damaged_file_is_compiled_again(monkeypatch, tmp_path):
    import torch

    model, inputs = _micro(monkeypatch, tmp_path)
    with torch.no_grad():
        model.compile_blocks(persistent_cache=False)  # plain torch.compile: no store
        assert model.precompiled is None
        plain = model(**inputs)
    model, _ = _micro(monkeypatch, tmp_path)
    model.compile_blocks()
    with torch.no_grad():
        first = model(**inputs)
    assert torch.equal(first, plain)
    store = model.precompiled
    twin = copy.deepcopy(model)  # the copy computes with its own weights, eagerly: torch drops a compiled call
    assert twin.transformer_blocks[0]._compiled_call_impl is None  # (compile_blocks on the copy compiles it)
    with torch.no_grad():
        next(p for p in twin.transformer_blocks[0].parameters() if p.is_floating_point()).add_(1.0)
        assert not torch.equal(twin(**inputs), first) and torch.equal(model(**inputs), first)
    buffer = io.BytesIO()
    torch.save(model, buffer)  # whole-module pickling: torch saves the modules uncompiled
    buffer.seek(0)
    unpickled = torch.load(buffer, weights_only=False)
    assert unpickled.precompiled is None
    with torch.no_grad():
        assert torch.equal(unpickled(**inputs), first)
    assert store.counts["compiled"] > 0 and store.counts["fallback_calls"] == 0
    files = sorted(store.folder.rglob("*.bin"))
    assert len(files) == store.counts["compiled"]
    files[0].write_bytes(files[0].read_bytes()[:-1] + b"x")  # one byte changed: its checksum no longer matches

    model, _ = _micro(monkeypatch, tmp_path)
    model.compile_blocks()
    with pytest.warns(RuntimeWarning, match="damaged"), torch.no_grad():
        again = model(**inputs)
    assert torch.equal(again, plain)
    assert model.precompiled.counts["loaded"] == len(files) - 1 and model.precompiled.counts["compiled"] == 1


@pytest.mark.slow
@needs_precompile
def test_a_compiled_pipeline_s_sampler_calls_are_served_by_the_precompiled_blocks(monkeypatch, tmp_path):
    # The user's path: pipe.compile(), then the sampler calls the transformer in inference mode, CFG batch 2;
    # with the fast preset, context reuse's full and local steps (token hooks) are served too.
    from mgtq.sampling import SamplerConfig
    from testkit import build_random_pipeline

    monkeypatch.setenv(compilation.CACHE_ENV, str(tmp_path))
    monkeypatch.delenv(compilation.INDUCTOR_CACHE_ENV, raising=False)
    pipe = build_random_pipeline()
    runs = [(None, 3), (SamplerConfig.preset("fast", num_steps=8), 8)]  # fast: 5 full steps, then local ones
    eager = [pipe("a red circle", seed=0, num_inference_steps=steps, sampler=sampler, output_type="latent",
                  progress=False).images for sampler, steps in runs]
    pipe.compile()
    compiled_before = 0
    for (sampler, steps), expected in zip(runs, eager):
        compiled = pipe("a red circle", seed=0, num_inference_steps=steps, sampler=sampler, output_type="latent",
                        progress=False).images
        counts = pipe.transformer.precompiled.counts
        assert counts["compiled"] > compiled_before and counts["fallback_calls"] == 0, counts  # new kinds of call
        compiled_before = counts["compiled"]
        assert (compiled == expected).float().mean() > 0.9  # Inductor's last bits may flip a near-tie draw


@needs_precompile
def test_calls_the_precompiled_path_does_not_serve_go_to_plain_torch_compile(monkeypatch, tmp_path):
    import torch

    model, inputs = _micro(monkeypatch, tmp_path)
    model.compile_blocks(backend="aot_eager")  # another backend: torch.compile as asked, nothing saved
    assert model.precompiled is None

    model, inputs = _micro(monkeypatch, tmp_path)
    model.compile_blocks()
    store = model.precompiled
    monkeypatch.setattr(store, "_compile", lambda *a: pytest.fail("compiled ahead of time for a call it cannot serve"))
    block = model.transformer_blocks[0]
    x = torch.zeros(1, 2, requires_grad=True)
    assert store.function_for(block, (x,), {}) is None  # grad: training graphs are not saved
    with torch.no_grad():
        handle = block.register_forward_pre_hook(lambda *a: None)
        assert store.function_for(block, (), {}) is None  # a hook: Dynamo traces it, the saved function would not
        handle.remove()
        handle = block.attn.to_q.register_forward_hook(lambda *a: None)
        assert store.function_for(block, (), {}) is None  # on a submodule too (accelerate's sequential offload)
        handle.remove()
        assert store.function_for(block, (object(),), {}) is None  # an argument the guards may not serialize
        from mgtq.models.hooks import BlockTokens

        # block tokens that do not declare themselves precompilable (a user's own hook)
        assert store.function_for(block, (BlockTokens(),), {}) is None
    assert not list(store.folder.rglob("*.bin"))

@pytest.mark.parametrize("regional", [True, False])
def test_a_compiled_transformer_runs_under_offload_and_casting_hooks_added_after_compile(regional):
    import accelerate
    import torch

    from mgtq.models import build_transformer
    from testkit import micro_forward_inputs

    torch.manual_seed(0)
    model = build_transformer("test-micro").eval()
    inputs = micro_forward_inputs(model, grid=4)
    with torch.no_grad():
        eager = model(**inputs)
        if regional:
            model.compile_blocks(persistent_cache=False)
        else:
            compilation.compile_in_place(model)  # MGTPipeline.compile(regional=False)
        torch.testing.assert_close(model(**inputs), eager)
        compiled = model.transformer_blocks[0] if regional else model
        assert sorted(compiled._compiled_call_impl._compiled) == [True]  # one graph (fullgraph) while no hooks
        # accelerate's sequential offload: a torch.compiler.disable'd weight load in every leaf's forward, which a
        # fullgraph trace refuses (Dynamo `Unsupported`); the call goes through a graph with breaks instead
        accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
        torch.testing.assert_close(model(**inputs), eager)
        assert sorted(compiled._compiled_call_impl._compiled) == [False, True]
        accelerate.hooks.remove_hook_from_submodules(model)
        calls = []
        whole = compiled._compiled_call_impl._compiled[True]
        compiled._compiled_call_impl._compiled[True] = lambda *a, **k: calls.append(1) or whole(*a, **k)
        torch.testing.assert_close(model(**inputs), eager)
        assert calls  # without hooks again: back to the one-graph variant
        model.enable_layerwise_casting(storage_dtype=torch.bfloat16, compute_dtype=torch.float32)
        torch.testing.assert_close(model(**inputs), eager, atol=0.1, rtol=0.1)  # bf16-stored weights


@needs_precompile
def test_an_ahead_of_time_compile_failure_falls_back_and_bad_inputs_raise_their_own_error(monkeypatch, tmp_path):
    import torch

    model, inputs = _micro(monkeypatch, tmp_path)
    block = model.transformer_blocks[0]
    captured = []
    handle = block.register_forward_pre_hook(lambda module, args: captured.append(args))
    with torch.no_grad():
        model(**inputs)  # eager: the block's arguments
    handle.remove()
    model.compile_blocks()
    store = model.precompiled
    x, *rest = captured[0]
    with torch.no_grad(), pytest.raises(Exception):
        block(x[..., :-1], *rest)  # one feature short: the block's own error
    assert store.disabled is None and store.failure is None  # the inputs were wrong, not the ahead-of-time compile

    def fail(*args, **kwargs):
        raise RuntimeError("unsupported")

    monkeypatch.setattr(torch._dynamo.aot_compile, "aot_compile_fullgraph", fail)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="ahead-of-time compile failed"):
        out = model(**inputs)
    assert store.disabled and store.counts["fallback_calls"] > 0 and store.counts["compiled"] == 0
    torch.testing.assert_close(out, quantized_eager(inputs), rtol=2e-2, atol=2e-2)


@pytest.fixture
def fresh_precompile_check():
    """`precompile_supported` decided again (it is cached for the process), before and after the test."""
    compilation.precompile_supported.cache_clear()
    yield compilation.precompile_supported
    compilation.precompile_supported.cache_clear()


def test_precompile_support_is_read_from_torch_s_api(monkeypatch, fresh_precompile_check):
    try:
        import torch._dynamo.aot_compile as aot_compile
    except ImportError:  # torch < 2.9
        aot_compile = None
    assert fresh_precompile_check() == hasattr(aot_compile, "AOTCompileSaveResult")
    if aot_compile is not None:
        fresh_precompile_check.cache_clear()
        # torch 2.9 and 2.10: the module is there, but serialize returns bare bytes (no AOTCompileSaveResult)
        monkeypatch.delattr(aot_compile, "AOTCompileSaveResult", raising=False)
        assert not fresh_precompile_check()
    fresh_precompile_check.cache_clear()
    monkeypatch.setitem(sys.modules, "torch._dynamo.aot_compile", None)  # torch < 2.9: no such module
    monkeypatch.delattr(torch._dynamo, "aot_compile", raising=False)
    assert not fresh_precompile_check()


def test_without_torch_s_ahead_of_time_compile_blocks_compile_the_plain_way_and_quietly(monkeypatch, tmp_path):
    # torch 2.7 to 2.10: no store at all (no import error at the first forward, no warning per call); the
    # persistent Inductor cache still serves
    model, inputs = _micro(monkeypatch, tmp_path)
    monkeypatch.setattr(compilation, "precompile_supported", lambda: False)
    model.compile_blocks()
    assert model.precompiled is None
    assert all(isinstance(b._compiled_call_impl, compilation.HookAwareCompile) for b in model.transformer_blocks)
    assert os.environ[compilation.INDUCTOR_CACHE_ENV] == str(compilation.compile_cache_dir())


def quantized_eager(inputs):
    import torch

    from testkit import quantized_micro_transformer

    with torch.no_grad():
        return quantized_micro_transformer()(**inputs)

def test_precompiled_folder_changes_with_what_the_saved_guards_leave_out(monkeypatch, tmp_path):
    from mgtq.compilation import PrecompiledBlocks

    monkeypatch.delenv("MGTQ_CPU_CLASS", raising=False)
    base = PrecompiledBlocks(tmp_path, {}).folder
    assert base.parent == tmp_path / compilation.PRECOMPILED_FOLDER
    assert PrecompiledBlocks(tmp_path, {}).folder == base
    assert PrecompiledBlocks(tmp_path, {"mode": "max-autotune"}).folder != base
    monkeypatch.setenv("MGTQ_CPU_CLASS", "avx2")  # another kernel choice, read through a global
    assert PrecompiledBlocks(tmp_path, {}).folder != base
    monkeypatch.setattr(compilation, "precompile_supported", lambda: True)  # the kwargs' part, whatever this torch
    assert PrecompiledBlocks.supports({}) and PrecompiledBlocks.supports({"mode": "max-autotune"})
    assert not PrecompiledBlocks.supports({"backend": "eager"}) and not PrecompiledBlocks.supports({"dynamic": True})
    monkeypatch.setattr(compilation, "precompile_supported", lambda: False)
    assert not PrecompiledBlocks.supports({})
    assert len(compilation.source_digest()) == 12


@pytest.mark.cuda
@pytest.mark.slow
@needs_precompile
def test_precompiled_blocks_on_cuda(monkeypatch, tmp_path):
    # Triton kernels in the saved functions: a second model in this process loads them from disk and gives
    # the first one's output (benchmarks/gpu_check.py runs the tests marked cuda).
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    outputs, counts = [], []
    for _ in range(2):
        model, inputs = _micro(monkeypatch, tmp_path)
        model = model.to("cuda", torch.bfloat16)
        inputs = {k: v.to("cuda", torch.bfloat16 if v.is_floating_point() else v.dtype) for k, v in inputs.items()}
        model.compile_blocks()
        with torch.inference_mode():
            outputs.append(model(**inputs).cpu())
        counts.append(dict(model.precompiled.counts))
    assert counts[0]["compiled"] > 0 and counts[0]["fallback_calls"] == 0, counts
    assert counts[1]["loaded"] == counts[0]["compiled"] and counts[1]["compiled"] == 0, counts
    assert torch.equal(outputs[0], outputs[1])

if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))


def _fake_cache(root: Path, name: str, settings: list[str], days_ago: float) -> Path:
    """A torch folder of the compile cache with some bytes, and precompiled settings folders in it."""
    import time

    folder = root / "torch-compile" / name
    (folder / "fxgraph").mkdir(parents=True)
    (folder / "fxgraph" / "entry").write_bytes(b"x" * 1000)
    for key in settings:
        (folder / compilation.PRECOMPILED_FOLDER / key / "group").mkdir(parents=True)
        (folder / compilation.PRECOMPILED_FOLDER / key / "group" / "a.bin").write_bytes(b"y" * 300)
    when = time.time() - days_ago * 86400
    for path in [folder, *(folder / compilation.PRECOMPILED_FOLDER).glob("*")]:
        os.utime(path, (when, when))
    return folder


def test_cache_entries_list_each_folder_with_its_size_and_clear_removes_the_unused(monkeypatch, tmp_path):
    monkeypatch.setenv(compilation.CACHE_ENV, str(tmp_path))
    assert compilation.cache_entries() == [] and compilation.clear_cache() == []  # nothing there yet
    old = _fake_cache(tmp_path, "torch-2.12.0-ops-aaa", ["k1", "k2"], days_ago=40)
    new = _fake_cache(tmp_path, "torch-2.13.0-ops-bbb", ["k3"], days_ago=1)
    entries = compilation.cache_entries()
    assert [(e.path.name, e.kind, e.size) for e in entries] == [
        ("k1", "precompiled", 300), ("k2", "precompiled", 300), ("torch-2.12.0-ops-aaa", "inductor", 1000),
        ("k3", "precompiled", 300), ("torch-2.13.0-ops-bbb", "inductor", 1000)]
    with pytest.raises(ValueError, match="≥ 0"):
        compilation.clear_cache(-1)
    removed = compilation.clear_cache(unused_days=30)
    assert {e.path.name for e in removed} == {"k1", "k2", "torch-2.12.0-ops-aaa"}
    assert not old.exists() and new.exists() and (new / compilation.PRECOMPILED_FOLDER / "k3").exists()
    assert not list((tmp_path / "torch-compile").glob(".*"))  # nothing half-removed left behind
    assert {e.path.name for e in compilation.clear_cache()} == {"k3", "torch-2.13.0-ops-bbb"}
    assert compilation.cache_entries() == []


def test_what_a_killed_clear_left_is_not_listed_and_the_next_clear_removes_it(monkeypatch, tmp_path):
    monkeypatch.setenv(compilation.CACHE_ENV, str(tmp_path))
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)  # a pid that ran and has exited
    base = tmp_path / "torch-compile"
    kept = _fake_cache(tmp_path, "torch-2.13.0-ops-bbb", ["k3", "k4"], days_ago=1)
    # a clear_cache killed mid-rmtree: its folders renamed, last touched at the kill (just now)
    killed = _fake_cache(tmp_path, "torch-2.12.0-ops-aaa", ["k1"], days_ago=0)
    os.replace(killed, base / f".{killed.name}.removing-{dead}")
    precompiled = kept / compilation.PRECOMPILED_FOLDER
    os.replace(precompiled / "k3", precompiled / f".k3.removing-{dead}")
    busy = base / f".torch-2.11.0-ops-ccc.removing-{os.getpid()}"  # a clear_cache still running: its own
    busy.mkdir()
    assert [(e.path.name, e.kind) for e in compilation.cache_entries()] == [
        ("k4", "precompiled"), (kept.name, "inductor")]
    removed = compilation.clear_cache(unused_days=30)  # nothing is 30 days old: only the leftovers go
    assert [(e.path.name, e.kind) for e in removed] == [
        (f".{killed.name}.removing-{dead}", "half-removed"), (f".k3.removing-{dead}", "half-removed")]
    assert removed[0].size == 1300
    assert sorted(p.name for p in base.iterdir()) == [busy.name, kept.name]
    assert [p.name for p in precompiled.iterdir()] == ["k4"]


def test_using_the_cache_renews_its_folders(monkeypatch, tmp_path):
    import time

    monkeypatch.setenv(compilation.CACHE_ENV, str(tmp_path))
    monkeypatch.delenv(compilation.INDUCTOR_CACHE_ENV, raising=False)
    folder = compilation.compile_cache_dir()
    _fake_cache(tmp_path, folder.name, [], days_ago=40)
    store = compilation.PrecompiledBlocks(folder, {})
    store.folder.mkdir(parents=True)
    os.utime(store.folder, (time.time() - 40 * 86400,) * 2)
    compilation.use_persistent_compile_cache()  # what compile_blocks() does first
    compilation.PrecompiledBlocks(folder, {})
    assert compilation.clear_cache(unused_days=30) == []  # both were used just now


def test_mgtq_cache_lists_and_clears(monkeypatch, tmp_path, capsys):
    from mgtq.cli import main

    monkeypatch.setenv(compilation.CACHE_ENV, str(tmp_path))
    _fake_cache(tmp_path, "torch-2.12.0-ops-aaa", ["k1"], days_ago=40)
    assert main(["cache"]) == 0
    out = capsys.readouterr().out
    assert "2 folder(s)" in out and "precompiled" in out and "inductor" in out and "k1" in out
    assert main(["cache", "--unused-days", "30"]) == 2  # without --clear: says what to add
    assert "add --clear" in capsys.readouterr().err
    assert main(["cache", "--clear", "--unused-days", "60"]) == 0 and "removed 0 folder(s)" in capsys.readouterr().out
    assert main(["cache", "--clear", "--unused-days", "30"]) == 0 and "removed 2 folder(s)" in capsys.readouterr().out
    assert compilation.cache_entries() == []


class _Block(torch.nn.Module):
    """A module of this file's (torch.nn's own modules are in Dynamo's skip list: nothing of theirs compiles)."""

    def __init__(self, seed: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(8, 8, generator=torch.Generator().manual_seed(seed)))

    def forward(self, x):
        return torch.nn.functional.gelu(x @ self.weight)


def _no_toolchain(calls):
    """A torch.compile backend that fails as Inductor does without a C++ compiler (or Triton): counted."""
    from torch._inductor.exc import InvalidCxxCompiler

    def backend(gm, example_inputs):
        calls.append(gm)
        raise InvalidCxxCompiler()  # (a message argument is accepted from torch 2.13 only)

    return backend


def test_without_a_toolchain_compiled_modules_run_eager_after_one_warning(monkeypatch):
    monkeypatch.setitem(compilation._TOOLCHAIN, "failure", None)
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    modules = [_Block(seed) for seed in range(2)]
    x = torch.randn(3, 8, generator=g)
    expected = [m(x) for m in modules]
    calls = []
    for m in modules:
        compilation.compile_in_place(m, backend=_no_toolchain(calls))
    with pytest.warns(RuntimeWarning, match=r"cannot build code on this machine \(InvalidCxxCompiler.*runs eager"):
        outputs = [m(x) for m in modules]
    assert all(torch.equal(a, b) for a, b in zip(outputs, expected))  # answered eager, not raised
    assert len(calls) == 1  # the second module did not try again
    assert compilation.toolchain_failure().startswith("InvalidCxxCompiler")
    torch._dynamo.reset()


def test_a_compile_error_that_is_not_the_toolchains_is_raised(monkeypatch):
    monkeypatch.setitem(compilation._TOOLCHAIN, "failure", None)
    torch._dynamo.reset()

    def buggy(gm, example_inputs):
        raise RuntimeError("simulated: a bug in a backend")

    m = _Block(0)
    compilation.compile_in_place(m, backend=buggy)
    with pytest.raises(Exception, match="a bug in a backend"):
        m(torch.ones(2, 8))
    assert compilation.toolchain_failure() is None
    torch._dynamo.reset()
