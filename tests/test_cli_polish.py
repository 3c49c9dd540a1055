"""`mgtq` CLI polish (issue 23 item 5): --version, documented defaults, --threads, --prompts FILE, --prompt ""
refused, --no-progress over loading bars, and `mgtq quantize` (PTQ into a checkpoint, never over other files)."""

import re

import pytest
import torch
from PIL import Image

import mgtq
import mgtq.cli
from mgtq.cli import build_parser, main


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"mgtq {mgtq.__version__}"


@pytest.mark.parametrize("command", ["generate", "eval", "calibrate", "export", "bench", "quantize"])
def test_every_flag_has_help_and_shows_its_default(command):
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    for action in sub._actions:
        if action.dest in ("help",):
            continue
        assert action.help, f"{command} {action.option_strings or action.dest} has no help text"
    text = " ".join(sub.format_help().split())
    if command == "generate":
        for shown in (r"reproducible alone \(default: 0\)", r"images per prompt[^()]*\(default: 1\)",
                      r"with --prompts\) \(default: 8\)", r"prompt-major \(default: mgtq-out.png\)"):
            assert re.search(shown, text), shown


def test_empty_prompt_is_refused(capsys):
    assert main(["generate", "--prompt", "  "]) == 2
    assert "the prompt is empty" in capsys.readouterr().err


def test_prompts_file_generates_each_prompt_with_its_own_seeds(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\ntwo blue squares\n")
    argv = ["generate", "--prompts", str(prompts), "--num-images", "2", "--steps", "2", "--no-progress",
            "--threads", "1", "--batch-size", "1", "--out", str(tmp_path / "batch")]
    assert main(argv) == 0
    paths = sorted((tmp_path / "batch").glob("*.png"))
    assert [p.name for p in paths] == ["0.png", "1.png", "2.png", "3.png"]
    assert torch.get_num_threads() == 1
    single = tmp_path / "single.png"
    assert main(["generate", "--prompt", "two blue squares", "--seed", "2", "--steps", "2", "--no-progress",
                 "--out", str(single)]) == 0
    assert Image.open(single).tobytes() == Image.open(tmp_path / "batch" / "2.png").tobytes()
    err = capsys.readouterr().err
    assert "Loading" not in err and "sampling" not in err


def test_empty_prompts_file_is_refused(tmp_path, capsys):
    (tmp_path / "p.txt").write_text("\n \n")
    assert main(["generate", "--prompts", str(tmp_path / "p.txt")]) == 2
    assert "holds no prompt" in capsys.readouterr().err


def test_quantize_writes_a_checkpoint_and_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "w4a16"
    assert main(["quantize", "--config", "w4a16", "--group-size", "32", "--out", str(out), "--no-progress"]) == 0
    assert re.search(r"wrote .*w4a16 \(\d+ W4Linear\)", capsys.readouterr().out)
    pipe = mgtq.load(out, progress=False)
    assert all(m.group_size == 32 for m in pipe.transformer.modules() if hasattr(m, "weight_packed"))
    assert main(["quantize", "--config", "w4a16", "--out", str(out)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert main(["quantize", "--config", "w4a16", "--out", str(tmp_path / "other")]) == 2
    assert "not an mgtq checkpoint" in capsys.readouterr().err
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_quantize_w4a8_with_group_size_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("mgtq.ptq.quantize_pipeline", lambda *a, **k: pytest.fail("loaded before the error"))
    assert main(["quantize", "--config", "w4a8", "--group-size", "64", "--out", str(tmp_path / "x")]) == 2
    assert "--group-size does not apply to w4a8" in capsys.readouterr().err


def test_readme_first_example_draws_what_it_says(tmp_path):
    from pathlib import Path

    from mgtq.shapes import score_image

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    match = re.search(r'mgtq generate --prompt "([^"]+)" --seed (\d+)', readme)
    prompt, seed = match.group(1), match.group(2)
    out = tmp_path / "first.png"
    assert main(["generate", "--prompt", prompt, "--seed", seed, "--out", str(out), "--no-progress"]) == 0
    accepted, info = score_image(Image.open(out), prompt)
    assert accepted, info
