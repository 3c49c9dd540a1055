"""benchmarks/bench_load.py: a load timed in fresh processes, with the files it verifies and the tensors it checks."""

import json


def test_a_round_loads_the_folder_and_times_its_checks(benchmark_script, tmp_path):
    script = benchmark_script("bench_load")
    out = tmp_path / "load"
    assert script.main(["--model", "tiny-shapes", "--formats", "scq", "--rounds", "1", "--checks", "1",
                        "--text-encoder", "model", "--work", str(tmp_path / "work"), "--out", str(out),
                        "--compare-one-by-one"]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    scq = report["formats"]["scq"]
    assert scq["load_s"]["median"] > 0 and scq["import_s"]["median"] > 0
    folder = tmp_path / "work" / "tiny-shapes-scq-model"
    from mgtq.components import verified_files

    hashed = verified_files(folder)
    names = {p.relative_to(folder).as_posix() for p in hashed}
    assert {"transformer/config.json", "transformer/diffusion_pytorch_model.safetensors"} <= names  # its manifest
    assert any(n.startswith("text_encoder/") for n in names) and any(n.startswith("vqvae/") for n in names)
    assert scq["hashed_bytes"] == sum(p.stat().st_size for p in hashed) > 0
    assert scq["checked_elements"] > 0 and scq["finite_aminmax_s"]["median"] > 0
    assert "| scq |" in out.with_suffix(".md").read_text()
    one_by_one = report["formats"]["scq, hashed one by one"]  # the load as before hashed_ahead, in the same rounds
    assert one_by_one["hashed_bytes"] == scq["hashed_bytes"]
    assert len(report["load_vs_one_by_one"]["scq"]["samples"]) == 1
