"""mgtq bench: memory accounting, the result record, CLI smoke run, folders with a separate CLIP, peers, offload.

Peers, profiler categories and the plot are the lab in benchmarks/ (loaded through mgtq.bench.lab).
"""

from __future__ import annotations

import json
import weakref
from pathlib import Path

import pytest
import torch
from torch import nn

from mgtq.bench import BenchCase, BenchConfig, MeasureSettings, run_bench, validate_report
from mgtq.bench.build import a8_layers_for
from mgtq.bench.lab import load_lab
from mgtq.bench.memory import module_storage_nbytes, storage_nbytes, transformer_weight_nbytes
from mgtq.bench.report import compute_ratios
from mgtq.bench.result import CaseResult
from mgtq.models import preset_config
from mgtq.models.random import random_float_transformer, random_quantized_transformer
from mgtq.quantization import W4Linear, linear_names


# ------------------------------------------------------------------------------------ memory
def test_w4_linear_counts_about_an_eighth_of_fp32():
    linear = nn.Linear(1024, 512, bias=False)
    fp32 = transformer_weight_nbytes(linear)[0]
    assert fp32 == 1024 * 512 * 4
    packed = nn.Sequential(W4Linear.from_float(linear))
    nbytes, method = transformer_weight_nbytes(packed)
    assert "model_weight_nbytes" in method
    # int4 = 1/8 of fp32, plus one fp32 scale per output channel
    assert nbytes == 1024 * 512 // 2 + 512 * 4
    assert 0.12 < nbytes / fp32 < 0.13
    assert module_storage_nbytes(packed) == nbytes


def test_random_quantized_model_is_packed_and_float_parts_stay_bf16():
    config = preset_config("test-micro")
    bf16 = random_float_transformer(config, torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    names = linear_names(bf16)
    a8 = a8_layers_for("scq", names, seed=0)
    assert len(a8) == round(len(names) / 3)
    scq = random_quantized_transformer(config, a8, {n: 0.01 for n in a8})
    assert not any(isinstance(m, nn.Linear) for m in scq.modules())
    assert scq.embed.embeddings.weight.dtype == torch.bfloat16
    assert transformer_weight_nbytes(scq)[0] < transformer_weight_nbytes(bf16)[0]
    assert transformer_weight_nbytes(scq)[0] == module_storage_nbytes(scq)


def test_grouped_formats_add_exactly_their_group_scales():
    from mgtq.bench.formats import FORMATS, Format

    assert all(Format.parse(f).scheme for f in FORMATS)  # every format describes itself in the report
    assert Format.parse("scq-g64") == Format("scq-g64", "scq", 64, False)
    assert Format.parse("w4a8-cached") == Format("w4a8-cached", "w4a8", None, True)
    with pytest.raises(ValueError, match="unknown format 'w4a8-g64'"):
        Format.parse("w4a8-g64")  # A8 layers stay per channel: no grouped w4a8
    config = preset_config("test-micro")
    names = linear_names(random_float_transformer(config, torch.bfloat16))
    a8 = a8_layers_for("scq", names, seed=0)
    scales = {n: 0.01 for n in a8}
    per_channel = random_quantized_transformer(config, a8, scales)
    grouped = random_quantized_transformer(config, a8, scales, group_size=16)
    a16 = [grouped.get_submodule(n) for n in names if n not in a8]
    assert all(m.weight_scale.shape == (m.out_features, m.in_features // 16) for m in a16)
    assert all(grouped.get_submodule(n).weight_scale.shape[1] == 1 for n in a8)
    extra = sum(m.out_features * (m.in_features // 16 - 1) * 4 for m in a16)  # fp32 scales
    assert transformer_weight_nbytes(grouped)[0] == transformer_weight_nbytes(per_channel)[0] + extra
    with pytest.raises(ValueError, match="group_size 7 must divide"):
        random_quantized_transformer(config, set(), None, group_size=7)


def test_storage_of_tensor_subclasses_counts_inner_tensors():
    from torchao.quantization import IntxWeightOnlyConfig, PerAxis, quantize_

    model = nn.Sequential(nn.Linear(256, 128)).to(torch.bfloat16)
    quantize_(model, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerAxis(0)))
    weight = model[0].weight
    assert type(weight) is not nn.Parameter
    # torchao stores int4 one value per byte on x86: about numel bytes, not numel / 2
    assert 256 * 128 <= storage_nbytes(weight) < 256 * 128 * 1.2
    nbytes, method = transformer_weight_nbytes(model)
    assert "__tensor_flatten__" in method and nbytes >= storage_nbytes(weight)


# ------------------------------------------------------------------------------------ config
def test_config_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown format"):
        BenchConfig(formats=("bf16", "int3"))
    with pytest.raises(ValueError, match="unknown peer"):
        BenchConfig(peers=("bitsandbytes",))
    with pytest.raises(ValueError, match="TomeMGT"):
        BenchCase("quanto-w4a8", tome=0.5)
    cases = BenchConfig(formats=("bf16", "scq"), tome=(0, 0.5), offload=True, peers=("quanto-w4a8",)).cases()
    assert [c.label for c in cases] == ["bf16", "bf16+tome0.5", "scq", "scq+tome0.5", "bf16+offload",
                                        "scq+offload", "quanto-w4a8"]
    cases = BenchConfig(formats=("bf16",), tome=(0, 0.5), tome_blocks=("joint", "all")).cases()
    assert [c.label for c in cases] == ["bf16", "bf16+tome0.5", "bf16+tome0.5-all"]
    with pytest.raises(ValueError, match="tome_blocks"):
        BenchConfig(tome_blocks=("mlp",))


def test_profile_categories():
    categorize = load_lab("profile").categorize
    assert categorize("aten::_int_mm") == "int8 GEMM"
    assert categorize("aten::mm") == "float GEMM"
    assert categorize("aten::_scaled_dot_product_flash_attention_for_cpu") == "attention"
    assert categorize("aten::bitwise_left_shift") == "int4 unpack"
    assert categorize("aten::layer_norm") == "other"


def test_ratios_from_typed_results():
    def res(label, target, nbytes, fwd, tome=0.0):
        return CaseResult(label=label, target=target, kind="mgtq", tome=tome, weights={"transformer_bytes": nbytes},
                          memory={"peak_rss_process": 10}, latency={"forward": {"median": fwd}, "image": None})

    results = [res("bf16", "bf16", 100, 1.0), res("scq", "scq", 27, 0.9), res("bf16+tome0.5", "bf16", 100, 0.5, 0.5),
               CaseResult(label="quanto-w4a8", target="quanto-w4a8", kind="peer", status="skipped", message="absent")]
    ratios = compute_ratios(results)
    assert ratios["scq"]["weights_vs_bf16"] == pytest.approx(0.27) and ratios["scq"]["forward_vs_bf16"] == 0.9
    assert ratios["bf16+tome0.5"]["forward_speedup_vs_no_tome"] == pytest.approx(2.0)
    assert "quanto-w4a8" not in ratios


def test_result_record_is_strict():
    good = CaseResult(label="bf16", target="bf16", kind="mgtq").to_dict()
    assert CaseResult.from_dict(good) == CaseResult(label="bf16", target="bf16", kind="mgtq")
    with pytest.raises(ValueError, match="unknown key.*goals"):
        CaseResult.from_dict({**good, "goals": []})
    with pytest.raises(ValueError, match="status"):
        CaseResult.from_dict({**good, "status": "fine"})
    with pytest.raises(ValueError, match="without a message"):
        CaseResult.from_dict({**good, "status": "failed"})


# ----------------------------------------------------------------------------- CLI smoke run
@pytest.fixture(scope="module")
def smoke_report(tmp_path_factory):
    from mgtq.cli import main

    out = tmp_path_factory.mktemp("bench") / "bench_smoke.json"
    code = main(["bench", "--model", "tiny-shapes", "--formats", "bf16,scq", "--repeats", "1", "--warmup", "0",
                 "--steps", "1", "--threads", "1", "--json", str(out), "--no-progress", "--plot"])
    assert code == 0
    return out


def test_cli_smoke_writes_json_markdown_and_with_plot_png(smoke_report):
    report = json.loads(smoke_report.read_text())
    assert [r["label"] for r in report["results"]] == ["bf16", "scq"]
    assert all(r["status"] == "ok" for r in report["results"])
    assert smoke_report.with_suffix(".md").read_text().startswith("# mgtq bench")
    assert smoke_report.with_suffix(".png").stat().st_size > 1000


def test_json_schema(smoke_report):
    report = json.loads(smoke_report.read_text())
    validate_report(report)
    assert report["machine"]["cpu_count"] >= 1 and report["machine"]["torch_version"] == torch.__version__
    assert report["baseline"]["unit"] == "bytes" and report["baseline"]["rss"] > 0
    scq = next(r for r in report["results"] if r["label"] == "scq")
    assert scq["weights"]["linear_layers"].keys() == {"W4A8Linear", "W4Linear"}
    assert scq["memory"]["peak_rss_process"] >= scq["memory"]["rss_after_build"] > 0
    assert set(scq["memory"]["phase_peaks"]) == {"forwards", "sampling", "decode"}
    forward = scq["latency"]["forward"]
    assert forward["min"] <= forward["median"] <= forward["max"] and len(forward["samples"]) == 1
    assert forward["cpu_median"] > 0 and len(forward["cpu_samples"]) == 1
    assert scq["latency"]["image"]["steps"] == 1 and scq["latency"]["image"]["extrapolated_steps"] == 48
    assert report["ratios"]["bf16"]["weights_vs_bf16"] == 1.0
    assert "goals" not in report  # the project's goals live in benchmarks/bench_goals.py
    broken = {**report, "results": [{k: v for k, v in scq.items() if k != "weights"}] * 2}
    with pytest.raises(ValueError, match="weights"):
        validate_report(broken)


def test_folder_with_a_separate_text_encoder_and_a_quantized_checkpoint(tmp_path, random_pipeline_dir):
    """A folder loads through MGTPipeline.from_pretrained, so a separate CLIP folder works as for mgtq.load."""
    from mgtq.export import write_checkpoint
    from mgtq.quantization import checkpoint
    from mgtq.testing import random_quantized_pipeline

    qpipe = random_quantized_pipeline()
    folder = write_checkpoint(random_pipeline_dir, qpipe.transformer,
                              checkpoint.describe(qpipe.transformer), tmp_path / "q")
    clip = tmp_path / "clip"
    (folder / "text_encoder").rename(clip)
    config = BenchConfig(model=str(folder), text_encoder=str(clip), formats=("scq",), isolation="none",
                         measure=MeasureSettings(repeats=1, steps=1, warmup=0, memory=False))
    report = run_bench(config, write=False, log=lambda msg: None)
    (result,) = report["results"]
    assert result["status"] == "ok" and "as exported" in " ".join(result["notes"])
    assert report["model"]["kind"] == "quantized-dir" and report["model"]["text_encoder"] == str(clip)
    with pytest.raises(FileNotFoundError, match="text_encoder=PATH"):
        run_bench(BenchConfig(model=str(folder), formats=("scq",), isolation="none",
                              measure=MeasureSettings(repeats=1, steps=1, warmup=0, memory=False)),
                  write=False, log=lambda msg: None)


# ------------------------------------------------------------------------------------- peers
def test_missing_peer_package_is_skipped_with_a_clear_message(monkeypatch):
    peers_module = load_lab("peers")
    real = peers_module.import_module

    def fake_import(name):
        if name.startswith("optimum"):
            raise ImportError(f"No module named {name!r}")
        return real(name)

    monkeypatch.setattr(peers_module, "import_module", fake_import)
    reason = peers_module.unavailable_reason("quanto-w4a8")
    assert "not installed" in reason and "pip install" in reason
    report = run_bench(BenchConfig(model="tiny-shapes", formats=(), peers=("quanto-w4a8",), isolation="none",
                                   measure=MeasureSettings(repeats=1, steps=1, warmup=0)),
                       write=False, log=lambda msg: None)
    (result,) = report["results"]
    assert result["status"] == "skipped" and "optimum.quanto" in result["message"]
    assert report["skipped"] == [result["message"]]


# ----------------------------------------------------------------------------------- offload
def test_offload_frees_the_transformer_before_the_decoder_is_loaded():
    from mgtq.bench.case import timed_image
    from mgtq.bench.memory import PhasePeaks
    from mgtq.testing import build_random_pipeline

    pipe = build_random_pipeline("test-micro", resolution=32, text_max_length=16)
    vq = pipe.vqvae
    alive = weakref.ref(pipe.transformer)
    seen = {}

    def load_vq():
        seen["transformer_alive_at_vq_load"] = alive() is not None
        return vq

    phases = PhasePeaks()
    image, freed, images = timed_image(pipe, steps=1, phases=phases, load_vq=load_vq)
    assert freed and seen == {"transformer_alive_at_vq_load": False}
    assert set(phases.peaks) == {"sampling", "decode"} and phases.overall > 0
    assert pipe.transformer is None and len(images) == 1
    assert image["vq_load_s"] is not None and image["steps"] == 1


# --------------------------------------------------------------------------------- isolation
def test_a_failing_case_process_is_reported_and_the_next_one_runs(tmp_path):
    from mgtq.bench.case import make_payload
    from mgtq.bench.runner import ChildError, Worker
    from mgtq.bench.source import resolve_model

    source = resolve_model("tiny-shapes")
    with pytest.raises(ChildError, match="case must be a mapping"):  # no case: the process fails while building
        Worker(make_payload("case", source, None, MeasureSettings(), threads=1), in_process=False, folder=tmp_path)
    baseline = Worker(make_payload("baseline", source, None, MeasureSettings(), threads=1), False, tmp_path).result
    assert baseline["rss"] > 0 and baseline["imports"] == ["torch", "mgtq"]


# ------------------------------------------------------------------------- interleaved rounds
def _timed(label, target, samples, compile=False):
    forward = {"median": sorted(samples)[len(samples) // 2], "samples": samples, "cpu_samples": samples,
               "cpu_median": sorted(samples)[len(samples) // 2], "rounds": list(range(len(samples)))}
    return CaseResult(label=label, target=target, kind="mgtq", compile=compile, weights={"transformer_bytes": 1},
                      memory={"peak_rss_process": 1}, latency={"forward": forward, "image": None})


def test_interleaved_ratio_is_the_median_of_per_round_ratios_not_of_medians():
    # Round 2 is slow for both (machine drift): per-round ratios cancel it, a ratio of medians does not.
    results = [_timed("bf16", "bf16", [1.0, 1.0, 3.0]), _timed("scq", "scq", [0.8, 0.9, 2.4]),
               _timed("bf16+compile", "bf16", [0.5, 0.5, 1.5], compile=True)]
    ratios = compute_ratios(results)
    assert ratios["scq"]["forward_vs_bf16"] == pytest.approx(0.8)  # per round 0.8, 0.9, 0.8
    assert ratios["scq"]["forward_vs_bf16_spread"] == pytest.approx({"min": 0.8, "max": 0.9, "rounds": 3})
    assert ratios["bf16+compile"]["forward_speedup_vs_eager"] == pytest.approx(2.0)
    sequential = [_timed("bf16", "bf16", [1.0, 1.0, 3.0]), _timed("scq", "scq", [0.8, 0.9, 2.4])]
    for r in sequential:
        r.latency["forward"]["rounds"] = None
    assert compute_ratios(sequential)["scq"]["forward_vs_bf16"] == pytest.approx(0.9)  # medians 0.9 / 1.0
    assert "forward_vs_bf16_spread" not in compute_ratios(sequential)["scq"]


def test_interleaved_rounds_time_each_case_once_per_round_after_all_are_built():
    messages = []
    config = BenchConfig(model="tiny-shapes", formats=("bf16", "w4a8"), isolation="none", threads=1,
                         measure=MeasureSettings(repeats=3, steps=1, warmup=0, memory=False))
    report = run_bench(config, write=False, log=messages.append)
    for r in report["results"]:
        assert r["latency"]["forward"]["rounds"] == [0, 1, 2] and len(r["latency"]["forward"]["samples"]) == 3
    first_round = next(i for i, m in enumerate(messages) if m.startswith("round 1/3"))
    assert sum(m.endswith("building and warming up …") for m in messages[:first_round]) == 2
    assert report["ratios"]["w4a8"]["forward_vs_bf16_spread"]["rounds"] == 3
    assert len(report["machine"]["loadavg_rounds"]) == 3 and "interleaved" in report["machine"]["timing"]


# --------------------------------------------------------------------------- harness and lab
def test_formats_are_described_once_for_the_cli_and_the_report():
    from mgtq.bench.formats import DEFAULT_FORMATS, FORMATS, HELP
    from mgtq.cli import build_parser

    action = next(a for a in build_parser()._subparsers._group_actions[0].choices["bench"]._actions
                  if a.dest == "formats")
    assert action.help == HELP and action.default == ",".join(DEFAULT_FORMATS)
    assert all(f.partition("-")[0] in HELP for f in FORMATS) and "-g64" in HELP and "-cached" in HELP


def test_default_outputs_go_to_the_working_folder():
    assert BenchConfig().output_paths("tiny-shapes") == {"json": Path("bench_tiny-shapes.json"),
                                                         "md": Path("bench_tiny-shapes.md")}
    assert BenchConfig(json="out/x.json").output_paths("tiny-shapes")["md"] == Path("out/x.md")


def test_the_lab_outside_a_checkout_is_one_clear_error(monkeypatch, tmp_path):
    from mgtq.bench import lab

    monkeypatch.setattr(lab, "ROOT", tmp_path)  # an installed wheel: no benchmarks/ beside the package
    monkeypatch.delitem(__import__("sys").modules, "mgtq_bench_lab_peers", raising=False)
    with pytest.raises(FileNotFoundError, match="needs a checkout"):
        lab.load_lab("peers")
    with pytest.raises(FileNotFoundError, match="needs a checkout"):
        BenchConfig(peers=("quanto-w4a8",))
    assert BenchConfig(formats=("bf16",)).cases()[0].label == "bf16"  # formats need no lab


def test_config_is_checked_by_the_one_validator_and_forkserver_is_deprecated():
    with pytest.raises(ValueError, match="bench.isolation must be one of"):
        BenchConfig(isolation="fork")
    with pytest.raises(ValueError, match="measure.repeats must be an integer"):
        MeasureSettings(repeats=1.5)
    with pytest.raises(ValueError, match="case.offload must be true or false"):
        BenchCase("bf16", offload="yes")
    with pytest.warns(DeprecationWarning, match="forkserver"):
        assert BenchConfig(isolation="forkserver").isolation == "spawn"
