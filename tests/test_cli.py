"""`mgtq` command line: every expected failure is one line on stderr and a non-zero exit code;
--version, documented defaults, --threads, --prompts FILE, --no-progress, and `mgtq quantize`
(PTQ into a checkpoint, never over other files).

The failure cases fail before a model is loaded (argument types, output-path checks) or fake the
long work with monkeypatch; the tests after them run the embedded model.
"""

import argparse
import errno
import json
import os
import re
import stat
import subprocess
import sys
import types

import pytest
import torch
from PIL import Image

import mgtq
import mgtq.cli
from mgtq.cli import build_parser, main
from mgtq.sampling.cli_args import load_sampler_file


def one_line_error(capsys, argv, code=2) -> str:
    """Run `mgtq argv`; assert the exit code and that stderr is exactly one line; return that line."""
    assert main(argv) == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    return err


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if the command gets as far as loading a model (errors must come first)."""

    def load(args):
        raise AssertionError("the model was loaded before the error was found")

    monkeypatch.setattr(mgtq.cli, "_load_pipe", load)


# --------------------------------------------------------------------- flag values ("silent nonsense")
BAD_FLAGS = [
    (["generate", "--prompt", "x", "--height", "0"], "argument --height: must be an integer in [1, 4096], got '0'"),
    (["generate", "--prompt", "x", "--height", "-64"], "argument --height: must be an integer in [1, 4096]"),
    (["generate", "--prompt", "x", "--width", "0"], "argument --width: must be an integer in [1, 4096]"),
    (["generate", "--prompt", "x", "--height", "64.5"], "argument --height: must be an integer in [1, 4096], got '64.5'"),
    (["generate", "--prompt", "x", "--num-images", "0"], "argument --num-images: must be an integer in [1, 1024]"),
    (["generate", "--prompt", "x", "--steps", "0"], "argument --steps: must be an integer in [1, 4096]"),
    (["generate", "--prompt", "x", "--seed", "-1"], "argument --seed: must be an integer in [0, "),
    (["generate", "--prompt", "x", "--seed", str(2**64)], "argument --seed: must be an integer in [0, "),
    (["generate", "--prompt", "x", "--cfg", "nan"], "argument --cfg: must be a finite number in [0, 100], got 'nan'"),
    (["generate", "--prompt", "x", "--cfg", "inf"], "argument --cfg: must be a finite number in [0, 100], got 'inf'"),
    (["generate", "--prompt", "x", "--cfg", "-1"], "argument --cfg: must be a finite number in [0, 100]"),
    (["generate", "--prompt", "x", "--cfg", "high"], "argument --cfg: must be a finite number in [0, 100], got 'high'"),
    (["generate", "--prompt", "x", "--gumbel-temperature", "nan", "nan"],
     "argument --gumbel-temperature: must be a finite number ≥ 0, got 'nan'"),
    (["generate", "--prompt", "x", "--gumbel-temperature", "2", "-1"],
     "argument --gumbel-temperature: must be a finite number ≥ 0, got '-1'"),
    (["generate", "--prompt", "x", "--rho", "nan"], "argument --rho: must be a finite number > 0, got 'nan'"),
    (["generate", "--prompt", "x", "--rho", "0"], "argument --rho: must be a finite number > 0"),
    (["generate", "--prompt", "x", "--noise-scale", "inf"], "argument --noise-scale: must be a finite number in [0, 100]"),
    (["generate", "--prompt", "x", "--diff-z", "150"], "argument --diff-z: must be a finite number in [0, 100]"),
    (["generate", "--prompt", "x", "--inversion-cfg", "nan"], "argument --inversion-cfg: must be a finite number"),
    (["generate", "--prompt", "x", "--zsampling-steps", "5:2"], "argument --zsampling-steps: takes 'all'"),
    (["generate", "--prompt", "x", "--zsampling-steps", "-1"], "argument --zsampling-steps: takes 'all'"),
    (["generate", "--prompt", "x", "--zsampling-steps", "a:b"], "argument --zsampling-steps: takes 'all'"),
    (["generate", "--prompt", "x", "--tome", "1"], "argument --tome: must be a finite number in [0, 1), got '1'"),
    (["generate", "--prompt", "x", "--tome", "nan"], "argument --tome: must be a finite number in [0, 1)"),
    (["generate", "--prompt", "x", "--device", "foo"], "argument --device: unknown device 'foo'; use cpu, cuda"),
    (["generate", "--prompt", "x", "--dtype", "fp64"], "argument --dtype: invalid choice: 'fp64'"),
    (["generate", "--prompt", "x", "--sampler-config", "no-such.yaml"],
     "argument --sampler-config: sampler config file 'no-such.yaml' does not exist"),
    (["generate"], "one of the arguments --prompt --prompts is required"),
    (["generate", "--prompt", "x", "--stpes", "4"], "unrecognized arguments: --stpes 4"),
    ([], "the following arguments are required: command"),
    (["eval", "--steps", "0"], "argument --steps: must be an integer in [1, 4096]"),
    (["eval", "--limit", "0"], "argument --limit: must be an integer ≥ 1, got '0'"),
    (["eval", "--limit", "-318"], "argument --limit: must be an integer ≥ 1, got '-318'"),
    (["eval", "--batch-size", "0"], "argument --batch-size: must be an integer ≥ 1, got '0'"),
    (["eval", "--split", "train"], "argument --split: invalid choice: 'train'"),
    (["calibrate", "--recipe", "no-such.yaml"], "argument --recipe: recipe 'no-such.yaml' is neither a file nor a shipped recipe"),
    (["export", "no-such-run", "--out", "x"], "argument run: calibration run folder 'no-such-run' does not exist"),
    (["bench", "--threads", "0"], "argument --threads: must be an integer ≥ 1, got '0'"),
    (["bench", "--repeats", "0"], "argument --repeats: must be an integer ≥ 1, got '0'"),
    (["bench", "--warmup", "-1"], "argument --warmup: must be an integer ≥ 0"),
    (["bench", "--steps", "0"], "argument --steps: must be an integer ≥ 1"),
    (["bench", "--budget", "0"], "argument --budget: must be a finite number > 0"),
    (["bench", "--budget", "nan"], "argument --budget: must be a finite number > 0"),
    (["bench", "--tome", "0,1.5"], "argument --tome: each entry must be a finite number in [0, 1), got '1.5'"),
    (["bench", "--tome", "0,nan"], "argument --tome: each entry must be a finite number in [0, 1), got 'nan'"),
    (["bench", "--tome", ","], "argument --tome: must be a comma-separated list"),
    (["bench", "--seed", "-3"], "argument --seed: must be an integer in [0, "),
    (["bench", "--device", "gpu"], "argument --device: unknown device 'gpu'"),
    (["bench", "--formats", ""], "nothing to benchmark: give at least one format or peer"),
    (["bench", "--reuse-interval", "0"], "argument --reuse-interval: must be an integer ≥ 1"),
    (["generate", "--prompt", "x", "--reuse-refresh", "1.5"], "argument --reuse-refresh: must be a finite number in"),
    (["bench", "--reuse-refresh", "-0.1"], "argument --reuse-refresh: must be a finite number in"),
    (["bench", "--sampler", "turbo"], "argument --sampler: invalid choice: 'turbo'"),
    (["generate", "--prompt", "x", "--seed", str(2**63 - 1)], "argument --seed: must be an integer in [0, "),
    (["edit", "--image", sys.executable, "--strength", "0.5", "--prompt", " "], "argument --prompt: the prompt is empty"),
    # bytes that are not UTF-8 reach Python as lone surrogates; the tokenizer failed on them after the model loaded
    (["generate", "--prompt", "\udcff\udcfe caf\udce9"], "argument --prompt: is not UTF-8 text"),
    (["generate", "--prompt", "x", "--negative-prompt", "\udcff"], "argument --negative-prompt: is not UTF-8 text"),
    (["edit", "--image", sys.executable, "--strength", "0.5", "--prompt", "caf\udce9"],
     "argument --prompt: is not UTF-8 text"),
    (["edit", "--image", sys.executable, "--strength", "0.5", "--prompt", "x", "--negative-prompt", "\udce9"],
     "argument --negative-prompt: is not UTF-8 text"),
    (["quantize", "--config", "w4a16", "--group-size", "7", "--out", "x"],
     "argument --group-size: must be an even integer ≥ 2, got '7'"),
    (["quantize", "--config", "w4a16", "--group-size", "0", "--out", "x"],
     "argument --group-size: must be an even integer ≥ 2, got '0'"),
    (["generate", "--prompt", "x", "--tome", "0.5", "--tome-locality", "bogus"],
     "argument --tome-locality: invalid choice: 'bogus'"),
    (["generate", "--prompt", "x", "--tome", "0.5", "--tome-window", "-3"],
     "argument --tome-window: must be an odd integer ≥ 3, got '-3'"),
    (["bench", "--tome-window", "4"], "argument --tome-window: must be an odd integer ≥ 3, got '4'"),
    (["eval", "--tome", "0.5", "--tome-sources", "some"], "argument --tome-sources: invalid choice: 'some'"),
    (["eval", "--tome", "0.5", "--tome-schedule", "often"], "argument --tome-schedule: invalid choice: 'often'"),
    # a negative pixel count: with "=" the type says what is allowed (without it argparse reads -1,… as an option)
    (["edit", "--image", sys.executable, "--prompt", "x", "--outpaint=-1,2,3,4"],
     "argument --outpaint: each entry must be an integer ≥ 0, got '-1'"),
]


@pytest.mark.parametrize("argv, message", BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_bad_flag_is_one_line_naming_it(capsys, no_model, argv, message):
    err = one_line_error(capsys, argv)
    assert message in err
    # the top-level parser reports unrecognized arguments, as "mgtq: error: …"
    assert err.startswith(f"mgtq{' ' + argv[0] if argv and 'unrecognized' not in message else ''}: error:")


def test_tome_options_without_tome_are_refused_before_loading(capsys, no_model):
    err = one_line_error(capsys, ["generate", "--prompt", "x", "--tome-locality", "window", "--tome-window", "5"])
    # the command's own parser reports it, as argparse's errors: "mgtq generate: …", its --help
    assert re.fullmatch(r"mgtq generate: error: --tome-locality, --tome-window: TomeMGT's options apply only "
                        r"with --tome RATIO; .* \(see mgtq generate --help\)", err), err


def test_edit_without_mask_outpaint_or_strength_names_the_edit_command(capsys, no_model):
    err = one_line_error(capsys, ["edit", "--image", sys.executable, "--prompt", "x"])
    assert re.fullmatch(r"mgtq edit: error: give --mask \(inpaint\), --outpaint L,R,T,B or --strength alone "
                        r"\(img2img\) \(see mgtq edit --help\)", err), err


def test_negative_prompt_may_be_empty():
    assert build_parser().parse_args(["generate", "--prompt", "x", "--negative-prompt", ""]).negative_prompt == ""


def test_group_size_help_says_even():
    quantize = build_parser().commands["quantize"]
    assert "an even number" in next(a.help for a in quantize._actions if a.dest == "group_size")


@pytest.mark.skipif(not os.path.exists("/dev/null"), reason="needs /dev/null")
def test_generate_out_that_is_a_device_is_called_a_device(capsys, no_model):
    err = one_line_error(capsys, ["generate", "--prompt", "x", "--out", "/dev/null"])
    assert err == ("mgtq generate: error: --out /dev/null is a character device, not a folder; give a .png path "
                   "or a folder")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
@pytest.mark.parametrize("command", [["generate", "--prompt", "x"], ["eval"], ["bench"]])
def test_cuda_without_cuda_is_refused_at_once(capsys, no_model, command):
    err = one_line_error(capsys, command + ["--device", "cuda"])
    assert "argument --device: 'cuda': CUDA is not available on this machine" in err and "--device cpu" in err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_index_beyond_the_devices_is_refused(capsys, no_model):
    err = one_line_error(capsys, ["generate", "--prompt", "x", "--device", f"cuda:{torch.cuda.device_count()}"])
    assert "CUDA device(s)" in err


def test_model_that_is_a_file_is_named_a_file(capsys, no_model, tmp_path):
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"")
    for argv in (["generate", "--prompt", "x", "--model", str(file)], ["eval", "--model", str(file)]):
        assert f"argument --model: '{file}' is a file, not a pipeline folder" in one_line_error(capsys, argv)
    err = one_line_error(capsys, ["eval", "--text-encoder", str(file)])
    assert "is a file, not a text encoder folder" in err
    err = one_line_error(capsys, ["export", str(file), "--out", str(tmp_path / "ck")])
    assert "is a file, not a calibration run folder" in err


def test_missing_model_folder(capsys, no_model, tmp_path):
    err = one_line_error(capsys, ["eval", "--model", str(tmp_path / "nope")])
    assert "argument --model: pipeline folder" in err and "does not exist" in err


def test_recipe_that_is_a_folder(capsys, tmp_path):
    err = one_line_error(capsys, ["calibrate", "--recipe", str(tmp_path)])
    assert f"argument --recipe: '{tmp_path}' is a folder, not a recipe file" in err


def test_sampler_config_file_errors_name_the_file(tmp_path):
    latin1 = tmp_path / "s.yaml"
    latin1.write_bytes("num_steps: 4  # für\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"sampler config file '.*s\.yaml' is not UTF-8 text"):
        load_sampler_file(latin1)
    broken = tmp_path / "s.json"
    broken.write_text('{"num_steps": 4,')
    with pytest.raises(ValueError, match=r"sampler config file '.*s\.json' is not valid JSON"):
        load_sampler_file(broken)
    bad_yaml = tmp_path / "b.yaml"
    bad_yaml.write_text("noise: [1, 2\n")
    with pytest.raises(ValueError, match=r"sampler config file '.*b\.yaml' is not valid YAML at line"):
        load_sampler_file(bad_yaml)


# --------------------------------------------------------------------- output paths, checked first
def test_eval_json_that_is_a_folder_fails_before_the_evaluation(capsys, no_model, tmp_path):
    err = one_line_error(capsys, ["eval", "--json", str(tmp_path)])
    assert err == f"mgtq eval: error: --json {tmp_path} is a folder; give a file path"


def test_output_below_a_file_fails_before_any_work(capsys, no_model, tmp_path):
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    cases = [
        (["eval", "--json", str(file / "r.json")], f"--json {file / 'r.json'}: {file} is a file, not a folder"),
        (["generate", "--prompt", "x", "--out", str(file / "a" / "x.png")], f"{file} is a file, not a folder"),
        # no .png suffix: --out names a folder of images, and here it is the file itself
        (["generate", "--prompt", "x", "--out", str(file)], f"--out {file} is a file, not a folder; give a .png"),
        (["calibrate", "--out", str(file)], f"--out {file} is a file; give a folder path"),
        (["bench", "--json", str(file / "b.json")], f"{file} is a file, not a folder"),
    ]
    for argv, message in cases:
        assert message in one_line_error(capsys, argv)
    run = tmp_path / "run"
    run.mkdir()
    assert f"{file} is a file, not a folder" in one_line_error(capsys, ["export", str(run), "--out", str(file / "c")])
    assert file.read_text() == "mine"


def _no_path_exists(monkeypatch):
    """Every path missing, its root too (as a drive letter that is not there on Windows); a climb that goes on
    past the root fails instead of spinning."""
    from pathlib import Path

    calls = []

    def exists(self, *a, **k):
        calls.append(self)
        assert len(calls) < 1000, f"still climbing at {self} after 1000 steps"
        return False

    monkeypatch.setattr(Path, "exists", exists)


def test_an_output_path_whose_root_does_not_exist_is_one_line_not_a_hang(monkeypatch, tmp_path):
    from mgtq.export import check_checkpoint_target

    out = tmp_path / "renders" / "r.json"
    root = out.anchor
    with monkeypatch.context() as m:
        _no_path_exists(m)
        with pytest.raises(ValueError) as json_error:
            mgtq.cli._check_output_path(out, "--json")
        with pytest.raises(ValueError) as out_error:
            check_checkpoint_target(out.parent / "ckpt", False, {}, "quantize")
    assert str(json_error.value).startswith(f"--json {out}: {root} does not exist (a drive that is not there")
    assert str(out_error.value).startswith(f"--out {out.parent / 'ckpt'}: {root} does not exist (a drive")


def test_generate_out_png_that_is_a_folder(capsys, no_model, tmp_path):
    (tmp_path / "img.png").mkdir()
    err = one_line_error(capsys, ["generate", "--prompt", "x", "--out", str(tmp_path / "img.png")])
    assert "is a folder; give a file path" in err
    err = one_line_error(capsys, ["generate", "--prompt", "x", "--out", str(tmp_path / "img.jpg")])
    assert "mgtq writes PNG images; give a .png path or a folder" in err


def test_edit_out_that_is_not_png_is_refused_as_generate_refuses_it(capsys, no_model, tmp_path):
    image = tmp_path / "in.png"
    Image.new("RGB", (64, 64)).save(image)
    for name in ("e.jpg", "e.WEBP"):
        err = one_line_error(capsys, ["edit", "--image", str(image), "--strength", "0.5", "--prompt", "x",
                                      "--out", str(tmp_path / name)])
        assert err == f"mgtq edit: error: --out {tmp_path / name}: mgtq writes PNG images; give a .png path or a folder"
    assert not any(p.name.startswith("e.") for p in tmp_path.iterdir())


def _edit_files(tmp_path, image_size=(64, 64), mask_size=None, alpha=255):
    image = tmp_path / "in.png"
    Image.new("RGBA", image_size, (200, 10, 10, alpha)).save(image)
    mask = None
    if mask_size:
        mask = tmp_path / "mask.png"
        Image.new("L", mask_size, 255).save(mask)
    return ["edit", "--image", str(image), "--prompt", "x", "--out", str(tmp_path / "o.png")] + (
        ["--mask", str(mask)] if mask else [])


def test_edit_image_and_mask_sizes_and_transparency_are_checked_before_loading(capsys, no_model, tmp_path):
    # the embedded model: 8 px per token side (VQ factor 4 × feature compression 2), read from its config files
    err = one_line_error(capsys, _edit_files(tmp_path, mask_size=(32, 32)))
    assert err == (f"mgtq edit: error: --mask {tmp_path / 'mask.png'} is 32×32 but --image {tmp_path / 'in.png'} is "
                   "64×64; resize --mask to 64×64 (nearest-neighbour keeps it black and white)")
    err = one_line_error(capsys, _edit_files(tmp_path, (60, 60), (60, 60)))
    assert err == (f"mgtq edit: error: --image {tmp_path / 'in.png'} is 60×60, but the model's sides must be "
                   "multiples of 8 px; try 64×64: resize or crop --image and --mask alike")
    err = one_line_error(capsys, _edit_files(tmp_path) + ["--outpaint", "4,0,0,3"])
    assert err.endswith("makes a 68×67 canvas, but the model's sides must be multiples of 8 px; "
                        "try --outpaint 4,4,0,8")
    # an RGBA file with transparent pixels (its alpha used to be dropped silently); an opaque one reads as RGB
    err = one_line_error(capsys, _edit_files(tmp_path, alpha=0) + ["--strength", "0.5"])
    assert f"--image {tmp_path / 'in.png'} has transparent pixels" in err and "flatten it onto a background" in err
    with pytest.raises(AssertionError, match="the model was loaded"):  # every check passed: the load comes next
        main(_edit_files(tmp_path, mask_size=(64, 64)))
    assert not (tmp_path / "o.png").exists()


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder_fails_at_once(capsys, no_model, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        err = one_line_error(capsys, ["eval", "--json", str(ro / "r.json")])
        assert f"no permission to write in {ro}" in err
        assert "no permission" in one_line_error(capsys, ["calibrate", "--out", str(ro / "run")])
    finally:
        ro.chmod(0o755)


def test_unwritable_output_folder_is_named(capsys, no_model, monkeypatch, tmp_path):
    # The same check as above, where the tests run as root (which may write anywhere): the folder
    # reports itself not writable.
    real_access = os.access
    monkeypatch.setattr(mgtq.cli.os, "access", lambda p, mode: real_access(p, mode) and str(p) != str(tmp_path))
    (tmp_path / "run").mkdir()
    cases = [["eval", "--json", str(tmp_path / "r.json")], ["generate", "--prompt", "x", "--out", str(tmp_path / "a.png")],
             ["calibrate", "--out", str(tmp_path / "run2")], ["bench", "--json", str(tmp_path / "b.json")],
             ["export", str(tmp_path / "run"), "--out", str(tmp_path / "ck")],
             ["quantize", "--config", "w4a16", "--out", str(tmp_path / "ck")]]
    for argv in cases:
        err = one_line_error(capsys, argv)
        assert f"no permission to write in {tmp_path}; choose another path" in err


# --------------------------------------------------------------------- failures during the work
def _raise_in_work(monkeypatch, exc):
    def load(args):
        raise exc

    monkeypatch.setattr(mgtq.cli, "_load_pipe", load)


def generate(tmp_path, *flags):
    # generate reaches the (faked) model load without importing the pipeline: the fastest command
    return ["generate", "--prompt", "x", "--out", str(tmp_path / "a.png"), *flags]


def test_ctrl_c_in_calibrate_says_how_to_resume(capsys, monkeypatch, tmp_path):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    # A stand-in module: importing the real one (diffusers, datasets) would take most of this file's time.
    fake = types.ModuleType("mgtq.scq.calibrate")
    fake.calibrate = interrupted
    monkeypatch.setitem(sys.modules, "mgtq.scq.calibrate", fake)
    err = one_line_error(capsys, ["calibrate", "--out", str(tmp_path / "run")], code=130)
    assert err == "mgtq calibrate: stopped; rerun the same command to resume"


def test_ctrl_c_elsewhere_says_stopped(capsys, monkeypatch, tmp_path):
    _raise_in_work(monkeypatch, KeyboardInterrupt())
    assert one_line_error(capsys, generate(tmp_path), code=130) == "mgtq generate: stopped"


def _interrupted(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize("argv, line", [
    (["generate", "--prompt", "x"], "mgtq generate: stopped"),
    (["calibrate", "--no-progress"], "mgtq calibrate: stopped"),  # nothing to resume yet
    (["--version"], "mgtq: stopped"),
    (["gnerate", "--prompt", "x"], "mgtq: stopped"),  # not a command: not named as one
])
def test_ctrl_c_while_the_parser_is_built_says_stopped(capsys, monkeypatch, argv, line):
    # a command's flags import torch, diffusers and transformers: seconds in which a Ctrl-C is likely
    monkeypatch.setattr(mgtq.cli, "build_parser", _interrupted)
    assert one_line_error(capsys, argv, code=130) == line


def test_ctrl_c_while_the_arguments_are_parsed_says_stopped(capsys, monkeypatch):
    monkeypatch.setattr(mgtq.cli, "_prompt", _interrupted)  # argparse calls the flags' types as it parses
    argv = ["edit", "--image", sys.executable, "--prompt", "x"]
    assert one_line_error(capsys, argv, code=130) == "mgtq edit: stopped"
    assert main(["--debug", "generate", "--prompt", "x"]) == 130
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.strip().endswith("mgtq generate: stopped")


def test_help_version_and_a_mistyped_command_answer_without_importing_torch():
    # a command's flags come from modules that import torch (seconds); these answer before any command runs
    code = ("import contextlib, io, sys\nfrom mgtq.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()) as err:\n"
            "    codes = [main(argv) for argv in (['--help'], ['--version'], [], ['gnerate'], ['--debug'])]\n"
            "print(codes, 'torch' in sys.modules, 'generate' in out.getvalue(), \"invalid choice: 'gnerate'\" in "
            "err.getvalue())")
    ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert ran.stdout.split() == ["[0,", "0,", "2,", "2,", "2]", "False", "True", "True"]


def test_the_parser_main_builds_for_one_command_lists_them_all_with_only_its_flags(tmp_path):
    parser = build_parser(commands=["export"])
    assert list(parser.commands) == list(mgtq.cli.COMMANDS)
    assert build_parser(commands=[]).parse_args(["cache"]).command == "cache"  # a command without its flags
    assert parser.parse_args(["export", str(tmp_path), "--out", "x"]).out.name == "x"
    with pytest.raises(SystemExit):
        parser.parse_args(["cache", "--clear"])


def test_ctrl_c_in_generate_has_printed_the_images_already_written(capsys, monkeypatch, tmp_path):
    from mgtq.sampling import SamplerConfig

    class Pipe:
        """A stand-in pipeline whose second batch is stopped by a Ctrl-C."""

        settings = types.SimpleNamespace(sampler=SamplerConfig())
        calls = 0

        def __call__(self, prompts, seed, **kwargs):
            self.calls += 1
            if self.calls == 2:
                raise KeyboardInterrupt
            return types.SimpleNamespace(images=[Image.new("RGB", (8, 8)) for _ in seed])

    monkeypatch.setattr(mgtq.cli, "_load_pipe", lambda args: Pipe())
    (tmp_path / "p.txt").write_text("a red circle\ntwo blue squares\n")
    argv = ["generate", "--prompts", str(tmp_path / "p.txt"), "--num-images", "2", "--batch-size", "1",
            "--out", str(tmp_path / "out")]
    assert main(argv) == 130
    done = capsys.readouterr()
    assert done.out.split() == [str(tmp_path / "out" / f"{i}.png") for i in (0, 1)]
    assert all((tmp_path / "out" / f"{i}.png").is_file() for i in (0, 1))
    assert done.err.strip() == "mgtq generate: stopped"


@pytest.mark.parametrize("exc, message", [
    (OSError(errno.ENOSPC, "No space left on device", "out/r.json"),
     "out/r.json: no space left on device; free some space and rerun"),
    (PermissionError(errno.EACCES, "Permission denied", "out/x.png"),
     "out/x.png: permission denied; check its permissions or choose another path"),
    (OSError(errno.EROFS, "Read-only file system", "/mnt/x"), "/mnt/x: read-only file system; choose a path on a writable disk"),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "a/b"), "a/b: not a directory (a part of the path is a file)"),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "a"), "a: is a directory (a file was expected)"),
    (FileNotFoundError("recipe model m does not exist"), "recipe model m does not exist"),
    (ValueError("first line\nsecond line"), "first line second line"),
    (MemoryError(), "out of memory; try a smaller --batch-size / image size, or free memory"),
])
def test_errors_during_the_work_are_one_line(capsys, monkeypatch, tmp_path, exc, message):
    _raise_in_work(monkeypatch, exc)
    assert one_line_error(capsys, generate(tmp_path)) == f"mgtq generate: error: {message}"


def test_a_refused_file_on_windows_may_be_open_in_another_program():
    """Windows refuses to replace or delete a file another program has open (an image viewer, a loaded model)
    with the errno of a permission problem; elsewhere the hint stays the permissions one."""
    from mgtq.cli import describe_error

    errors = [PermissionError(errno.EACCES, "Permission denied", "out/x.png"),
              PermissionError(errno.EPERM, "Operation not permitted", "out/x.png")]
    assert [describe_error(err) for err in errors] == [
        "out/x.png: permission denied; check its permissions or choose another path",
        "out/x.png: operation not permitted; check its permissions or choose another path"]
    with pytest.MonkeyPatch.context() as m:
        m.setattr(mgtq.cli, "_WINDOWS", True)
        assert [describe_error(err) for err in errors] == [
            "out/x.png: permission denied; close the program using it, check its permissions, or choose another path",
            "out/x.png: operation not permitted; close the program using it, check its permissions, or choose "
            "another path"]


def test_torch_out_of_memory_is_one_line(capsys, monkeypatch, tmp_path):
    _raise_in_work(monkeypatch, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB\nmore"))
    err = one_line_error(capsys, generate(tmp_path))
    assert err.startswith("mgtq generate: error: out of memory (CUDA out of memory. Tried to allocate 2 GiB)")


def test_a_cpu_allocation_failure_is_one_line_out_of_memory(capsys, monkeypatch, tmp_path):
    try:
        torch.empty(2**62, dtype=torch.uint8)
    except RuntimeError as err:
        cpu_oom = err
    _raise_in_work(monkeypatch, cpu_oom)
    err = one_line_error(capsys, generate(tmp_path))
    assert err.startswith("mgtq generate: error: out of memory (") and "try a smaller" in err


def test_debug_shows_the_traceback(capsys, monkeypatch, tmp_path):
    for exc, last in ((ValueError("bad value"), "mgtq generate: error: bad value"),
                      (KeyboardInterrupt(), "mgtq generate: stopped")):
        _raise_in_work(monkeypatch, exc)
        for argv in (["--debug", *generate(tmp_path)], [*generate(tmp_path), "--debug"]):
            assert main(argv) in (2, 130)
            err = capsys.readouterr().err
            assert "Traceback (most recent call last)" in err and err.strip().endswith(last)


def test_a_bug_keeps_its_traceback(monkeypatch, tmp_path):
    _raise_in_work(monkeypatch, RuntimeError("a bug"))
    with pytest.raises(RuntimeError, match="a bug"):
        main(generate(tmp_path))
    _raise_in_work(monkeypatch, ModuleNotFoundError("No module named 'mgtq.gone'", name="mgtq.gone"))
    with pytest.raises(ModuleNotFoundError):  # mgtq's own module: a broken install or a bug
        main(generate(tmp_path))


@pytest.mark.parametrize("exc, hint", [
    (ModuleNotFoundError("No module named 'PIL'", name="PIL"), "pip install -U pillow"),  # module ≠ package name
    (ModuleNotFoundError("No module named 'left_out'", name="left_out.sub"), "pip install -U left_out"),
    (ImportError("pyarrow requires NumPy 2.0 or newer, found 1.26.4"),  # a package refusing its neighbour's version
     "install the versions it asks for (pip install -U ...), or rerun with --debug to see where"),
])
def test_a_package_that_does_not_import_is_one_line_with_what_to_install(capsys, monkeypatch, tmp_path, exc, hint):
    _raise_in_work(monkeypatch, exc)
    assert one_line_error(capsys, generate(tmp_path)) == (
        f"mgtq generate: error: a package mgtq needs did not import ({exc}); {hint}")


def test_help_exits_zero(capsys):
    assert main(["generate", "--help"]) == 0
    assert "--debug" in capsys.readouterr().out


def test_inversion_cfg_may_be_negative():
    """Masked Z-sampling's inversion CFG is any finite value (the paper's best is near −1)."""
    from mgtq.cli import build_parser

    assert build_parser().parse_args(["generate", "--prompt", "x", "--inversion-cfg", "-1"]).inversion_cfg == -1.0


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"mgtq {mgtq.__version__}"


@pytest.mark.parametrize("command", ["generate", "edit", "eval", "calibrate", "export", "bench", "quantize", "cache"])
def test_every_flag_has_help_and_shows_its_default(command):
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    formatter = sub._get_formatter()
    for action in sub._actions:
        if action.dest in ("help",):
            continue
        assert action.help, f"{command} {action.option_strings or action.dest} has no help text"
        shown = formatter._expand_help(action)
        # one default, said once: never argparse's literal None/False after a default said in words
        assert shown.count("default") <= 1 and "(default: None)" not in shown, shown
        assert "(default: False)" not in shown, shown
        if action.default not in (None, False, argparse.SUPPRESS):
            assert "default" in shown, f"{command} {action.option_strings}: {shown}"
    text = " ".join(sub.format_help().split())
    if command == "generate":
        for shown in (r"same --batch-size\) \(default: 0\)", r"images per prompt[^()]*\(default: 1\)",
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
    # over a checkpoint with --overwrite: the whole folder at once, the user's files in it kept (as hard links)
    (out / "README.md").write_text("my model card")
    (out / ".git").mkdir()
    (out / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    os.chmod(out / ".git" / "HEAD", 0o600)
    interrupted = []

    swap = mgtq.files._swap_in

    def swap_then_stop(new, place):  # a Ctrl-C as the new folder is swapped in: the old one must stay whole
        if place != out:
            return swap(new, place)
        interrupted.append(place)
        raise KeyboardInterrupt

    def files():
        return {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    before = files()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("mgtq.files._swap_in", swap_then_stop)
        assert main(["quantize", "--config", "w4a16", "--out", str(out), "--overwrite", "--no-progress"]) == 130
    assert interrupted == [out] and files() == before
    assert main(["quantize", "--config", "w4a16", "--out", str(out), "--overwrite", "--no-progress"]) == 0
    assert (out / "README.md").read_text() == "my model card"
    assert stat.S_IMODE((out / ".git" / "HEAD").stat().st_mode) == 0o600  # the user's file, its mode too
    assert not any(m.group_size == 32 for m in mgtq.load(out, progress=False).transformer.modules()
                   if hasattr(m, "weight_packed"))  # the new checkpoint (per-channel), not the group-wise one


def test_quantize_refuses_an_out_inside_the_model_it_reads(tmp_path, capsys, random_pipeline_dir):
    for out in (random_pipeline_dir / "vqvae" / "q", random_pipeline_dir):
        before = sorted(p.name for p in random_pipeline_dir.rglob("*"))
        assert main(["quantize", "--config", "w4a16", "--model", str(random_pipeline_dir), "--out", str(out)]) == 2
        assert "overlaps the source model" in capsys.readouterr().err
        assert sorted(p.name for p in random_pipeline_dir.rglob("*")) == before


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


def test_compile_flags_on_generate_eval_bench():
    from mgtq.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["generate", "--prompt", "a red circle", "--compile"]).compile
    assert parser.parse_args(["eval", "--compile"]).compile
    assert parser.parse_args(["bench", "--compile"]).compile
    assert not parser.parse_args(["generate", "--prompt", "a red circle"]).compile


def test_cli_flags_reach_the_config():
    from mgtq.cli import _tome_options, build_parser

    args = build_parser().parse_args(["eval", "--tome", "0.5", "--tome-locality", "global", "--tome-sources",
                                      "decoded", "--tome-schedule", "masked", "--tome-window", "5", "--tome-mlp"])
    assert _tome_options(args) == dict(locality="global", sources="decoded", schedule="masked", window=5, merge_mlp=True)
    assert _tome_options(build_parser().parse_args(["eval", "--tome", "0.5"])) == {}
    bench = build_parser().parse_args(["bench", "--tome", "0,0.5", "--tome-sources", "decoded-first"])
    assert _tome_options(bench) == dict(sources="decoded-first")


def test_bench_takes_the_sampler_preset_and_reuse_flags_of_generate():
    from mgtq.cli import _bench_reuse, build_parser
    from mgtq.reuse.config import ReuseConfig

    parser = build_parser()
    assert _bench_reuse(parser.parse_args(["bench"])) is None  # no flag: the preset's (or the model's) reuse
    fast = parser.parse_args(["bench", "--sampler", "fast", "--reuse-interval", "4"])
    assert fast.sampler == "fast" and _bench_reuse(fast) == ReuseConfig(interval=4, group="cells", warmup=5)
    assert _bench_reuse(parser.parse_args(["bench", "--reuse-group", "masked"])) == ReuseConfig(group="masked")
    assert _bench_reuse(parser.parse_args(["bench", "--sampler", "fast", "--reuse-refresh", "0.1"])).refresh == 0.1
    for command in (["generate", "--prompt", "x"], ["eval"], ["edit", "--image", __file__, "--prompt", "x", "--strength", "0.5"]):
        assert parser.parse_args([*command, "--reuse-refresh", "0.2"]).reuse_refresh == 0.2


def test_bench_with_a_failed_case_prints_the_report_and_exits_non_zero(capsys, monkeypatch, tmp_path):
    import mgtq.bench

    def run_bench(config, log):
        ok = {"label": "bf16", "status": "ok"}
        failed = {"label": "scq", "status": "failed", "message": "case failed: Traceback (most recent call last):\n"
                  "ValueError: sha256 differs; re-export the checkpoint"}
        return {"results": [ok, failed]}

    monkeypatch.setattr(mgtq.bench, "run_bench", run_bench)
    monkeypatch.setattr(mgtq.bench, "to_markdown", lambda report: "the report")
    assert main(["bench", "--formats", "bf16,scq", "--json", str(tmp_path / "b.json")]) == 2
    out, err = capsys.readouterr()
    assert "the report" in out
    assert err.strip() == "mgtq bench: error: 1 case(s) failed (scq); see Skipped above for why"


# ------------------------------------------------------------------ a stdout that cannot encode everything
def test_only_a_strict_stdout_that_cannot_encode_unicode_is_made_tolerant():
    import io

    from mgtq.cli import _tolerant_output

    streams = {(encoding, errors): io.TextIOWrapper(io.BytesIO(), encoding=encoding, errors=errors)
               for encoding, errors in [("utf-8", "strict"), ("UTF8", "strict"), ("cp1252", "strict"),
                                        ("cp1252", "backslashreplace"), ("ascii", "strict")]}
    for stream in streams.values():
        _tolerant_output(stream)
    assert {key: stream.errors for key, stream in streams.items()} == {
        ("utf-8", "strict"): "strict", ("UTF8", "strict"): "strict", ("cp1252", "strict"): "replace",
        ("cp1252", "backslashreplace"): "backslashreplace", ("ascii", "strict"): "replace"}
    assert {stream.encoding for stream in streams.values()} == {"utf-8", "UTF8", "cp1252", "ascii"}


def test_help_and_eval_print_to_a_windows_code_page_stdout(tmp_path):
    """A redirected stdout on Windows encodes in the ANSI code page, strictly: "→", "σ", "≤" are printed as "?"
    rather than failing --help, or an evaluation at its very end."""
    env = {**os.environ, "PYTHONIOENCODING": "cp1252", "OMP_NUM_THREADS": "1"}
    for argv in ([], ["generate"], ["calibrate"]):
        done = subprocess.run([sys.executable, "-m", "mgtq.cli", *argv, "--help"], capture_output=True, env=env,
                              cwd=tmp_path, timeout=300)
        assert done.returncode == 0, done.stderr.decode("cp1252")[-2000:]
    out = tmp_path / "e.json"
    done = subprocess.run([sys.executable, "-m", "mgtq.cli", "eval", "--task", "inpaint", "--limit", "1", "--steps",
                           "2", "--no-progress", "--json", str(out)], capture_output=True, env=env, cwd=tmp_path,
                          timeout=600)
    assert done.returncode == 0, done.stderr.decode("cp1252")[-2000:]
    assert "NFE ? 2" in done.stdout.decode("cp1252") and "inpaint" in json.loads(out.read_text())["tasks"]


def test_eval_writes_its_json_before_it_prints(tmp_path, monkeypatch, capsys):
    """A print that fails (a pipe closed by `| head`, an encoding) must not lose the evaluation."""
    import builtins

    def closed_pipe(*args, file=None, **kwargs):
        if file is None:  # stdout; the error line goes to stderr as ever
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")
        builtins.print(*args, file=file, **kwargs)

    out = tmp_path / "e.json"
    monkeypatch.setattr(mgtq.cli, "print", closed_pipe, raising=False)
    assert main(["eval", "--task", "inpaint", "--limit", "1", "--steps", "2", "--no-progress", "--json", str(out),
                 "--device", "cpu"]) == 2
    assert "broken pipe" in capsys.readouterr().err
    assert "inpaint" in json.loads(out.read_text())["tasks"]
