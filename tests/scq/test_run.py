"""mgtq.scq.run: the calibration run folder (one `mgtq calibrate` at a time, one recipe per folder, no
debris), and SCQ end to end on a small random pipeline: the stages' outputs, rerun and resume, export → load,
accelerate / torchrun."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from mgtq.cli import main
from mgtq.models import MeissonicTransformer
from mgtq.pipeline import MGTPipeline
from mgtq.quantization import W4A8Linear, W4Linear, prepare_qat_
from mgtq.quantization.checkpoint import FORMAT_VERSION, load as load_quantized_transformer
from mgtq.scq import qat, stages
from mgtq.scq.calibrate import calibrate
from mgtq.scq.recipe import dump_recipe, load_recipe, recipe_from_dict
from mgtq.scq.run import STAGES, RunFolder, RunFolderBusy
from testkit import resave_trainer_json, tiny_recipe_dict
from mgtq.files import read_json, recover_atomic_target, write_json


def test_a_second_calibrate_on_a_held_folder_fails_at_once_naming_the_holder(tmp_path, capsys):
    run = RunFolder(tmp_path / "run")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(dump_recipe(recipe_from_dict({"model": str(tmp_path / "no-such-model")})))
    with run.lock():
        with pytest.raises(RunFolderBusy, match=f"in use by pid {os.getpid()} on .* since "):
            with RunFolder(run.root).lock():
                pass
        # The lock is taken before the model is looked at: nothing else is tried or written.
        (tmp_path / "no-such-model").mkdir()
        assert main(["calibrate", "--recipe", str(recipe), "--out", str(run.root)]) == 2
        assert f"is in use by pid {os.getpid()} on " in capsys.readouterr().err
        assert sorted(p.name for p in run.root.iterdir()) == [".lock"]
    with RunFolder(run.root).lock():  # released with its holder
        pass


class _WindowsByteLocks:
    """msvcrt.locking as Windows behaves: a byte locked through one handle cannot be locked through another (of any
    process), nor read through it (byte locks there are mandatory), until unlocked."""

    LK_UNLCK, LK_NBLCK = 0, 2

    def __init__(self, monkeypatch):
        self.held = {}  # (device, inode, offset) → fd holding it
        self._read = os.read
        monkeypatch.setattr(os, "read", self.read)

    def _bytes(self, fd, count):
        st, at = os.fstat(fd), os.lseek(fd, 0, os.SEEK_CUR)
        return [(st.st_dev, st.st_ino, at + i) for i in range(count)]

    def locking(self, fd, mode, count):
        keys = self._bytes(fd, count)
        if mode == self.LK_UNLCK:
            for key in keys:
                self.held.pop(key)
        elif mode == self.LK_NBLCK:
            if any(key in self.held for key in keys):
                raise PermissionError(13, "Permission denied")
            self.held.update(dict.fromkeys(keys, fd))
        else:
            raise AssertionError(f"mgtq must not wait for a lock (mode {mode})")

    def read(self, fd, count):
        if any(self.held.get(key, fd) != fd for key in self._bytes(fd, count)):
            raise PermissionError(13, "The process cannot access the file because another process has locked a "
                                      "portion of the file")
        return self._read(fd, count)


def test_on_windows_the_run_folder_is_held_with_a_byte_lock_that_leaves_the_holder_readable(tmp_path, monkeypatch):
    import types

    import mgtq.scq.run as run_module

    locks = _WindowsByteLocks(monkeypatch)
    monkeypatch.setattr(run_module, "_WINDOWS", True)
    monkeypatch.setitem(sys.modules, "msvcrt", types.SimpleNamespace(
        LK_UNLCK=locks.LK_UNLCK, LK_NBLCK=locks.LK_NBLCK, locking=locks.locking))
    monkeypatch.setitem(sys.modules, "fcntl", None)  # not on Windows
    for unix_only in ("pread", "pwrite"):
        monkeypatch.delattr(os, unix_only, raising=False)
    run = RunFolder(tmp_path / "run")
    with run.lock():
        with pytest.raises(RunFolderBusy, match=f"in use by pid {os.getpid()} on .* since .*or calibrate into"):
            with RunFolder(run.root).lock():
                pass
        with pytest.raises(RunFolderBusy, match=f"in use by pid {os.getpid()} on .*; wait for it .*then export"):
            with RunFolder(run.root).reading():
                pass
    assert not locks.held
    # no shared lock there: an export holds the folder as calibrate does, and a second one is told to wait
    with RunFolder(run.root).reading():
        with pytest.raises(RunFolderBusy, match="or by an `mgtq export` reading it; wait"):
            with RunFolder(run.root).lock():
                pass
        with pytest.raises(RunFolderBusy, match="or by an `mgtq export` reading it; wait"):
            with RunFolder(run.root).reading():
                pass
    with RunFolder(run.root).lock():  # released with its holder
        assert len(locks.held) == 1


def test_the_commands_that_use_a_run_folder_import_without_fcntl_and_quantize_without_scq():
    # As on Windows: torch and the libraries take their own platform's branches, then mgtq sees no fcntl.
    code = ("import sys, torch, diffusers, transformers, datasets, accelerate; sys.modules['fcntl'] = None; "
            "import mgtq.ptq; bad = sorted(m for m in sys.modules if m.startswith('mgtq.scq')); assert not bad, bad; "
            "import mgtq.export, mgtq.scq.calibrate, mgtq.scq.run, mgtq.cli")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_a_run_folder_keeps_its_recipe_unless_restarted(tmp_path):
    run = RunFolder(tmp_path / "run")
    first, second = recipe_from_dict({"qat": {"steps": 3}}), recipe_from_dict({"qat": {"steps": 4}})
    run.start(first, tmp_path, {"synth": "x"})
    run.start(first, tmp_path, {"synth": "x"})  # the same recipe resumes
    with pytest.raises(ValueError, match=r"another recipe .*differs in qat\.steps.*--restart"):
        run.start(second, tmp_path, {"synth": "x"})
    assert run.recipe() == first
    run.start(second, tmp_path, {"synth": "x"}, restart=True)
    assert run.recipe() == second


def test_debris_of_killed_writes_is_cleaned_and_the_last_copy_restored(tmp_path):
    run = RunFolder(tmp_path / "run")
    run.root.mkdir()
    # killed between the two renames of a swap: only the old copy is left, under its hidden name
    # (debris names as mgtq's writers give them: `.NAME.tmp-PID-XXXXXXXX`, `.NAME.old-PID-XXXXXXXX`)
    (run.root / ".qat-state.old-1234-0000aaaa").mkdir()
    (run.root / ".qat-state.old-1234-0000aaaa" / "trainer.json").write_text("{}")
    (run.root / ".qat-state.tmp-1234-0000bbbb").mkdir()  # the new copy, maybe incomplete
    (run.root / "synth").mkdir()
    (run.root / ".synth.old-5678-0000cccc").mkdir()  # killed while deleting the replaced copy
    (run.root / ".recipe.yaml.tmp-1234-0000dddd.yaml").write_text("half")  # atomic_write_text's temporary file
    (run.root / ".user-notes").write_text("mine")  # not ours: kept
    (run.root / ".recipe.yaml.swp").write_text("an editor's")  # looks like debris, is not mgtq's: kept
    run.start(recipe_from_dict({}), tmp_path, {})
    assert (run.qat_state / "trainer.json").read_text() == "{}"
    assert sorted(p.name for p in run.root.iterdir() if p.name.startswith(".")) == [".recipe.yaml.swp", ".user-notes"]


def test_recover_atomic_target_leaves_a_clean_folder_alone(tmp_path):
    (tmp_path / "x").mkdir()
    recover_atomic_target(tmp_path / "x")
    recover_atomic_target(tmp_path / "missing" / "y")
    assert [p.name for p in tmp_path.iterdir()] == ["x"]


def test_unfinished_run_hint_names_the_runs_own_recipe(tmp_path):
    run = tmp_path / "run"
    recipe = recipe_from_dict({"model": str(tmp_path), "qat": {"steps": 0}})
    RunFolder(run).start(recipe, tmp_path, {"synth": "x", "qat": "y", "magnitudes": "z", "secondary": "w"})
    with pytest.raises(ValueError, match=f"stage 'synth' of {run} is not complete; run `mgtq calibrate --recipe "
                                         f"{run / 'recipe.yaml'} --out {run}`"):
        RunFolder(run).check_finished()


def _user_folder(root):
    root.mkdir()
    (root / "notes.txt").write_text("mine")
    (root / "synth").mkdir()
    (root / "synth" / "important.txt").write_text("mine")
    (root / "qat").mkdir()
    (root / "qat" / "model-notes.txt").write_text("mine")
    (root / ".recipe.yaml.swp").write_text("mine")
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_calibrate_refuses_a_folder_of_the_users_before_any_write(tmp_path, capsys):
    out = tmp_path / "mine"
    before = _user_folder(out)
    assert main(["calibrate", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"--out {out} is not empty (.recipe.yaml.swp, notes.txt, qat, synth) and is not an mgtq calibration run" in err
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before
    assert (out / "synth" / "important.txt").read_text() == "mine"


def test_calibrate_refuses_the_source_model_as_its_run_folder(tmp_path, capsys):
    from mgtq.default_model import default_model

    model = tmp_path / "model"
    import shutil

    shutil.copytree(default_model(), model)
    before = sorted(str(p.relative_to(model)) for p in model.rglob("*"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(dump_recipe(recipe_from_dict({"model": str(model)})))
    for out in (model, model / "calibration"):
        assert main(["calibrate", "--recipe", str(recipe), "--out", str(out), "--no-progress"]) == 2
        assert f"overlaps the source model {model}" in capsys.readouterr().err
    assert sorted(str(p.relative_to(model)) for p in model.rglob("*")) == before


def test_calibrate_refuses_a_quantized_checkpoint_as_its_model_before_any_work(tmp_path, capsys):
    import mgtq

    pipe = mgtq.load(progress=False)
    mgtq.quantize_(pipe, mgtq.W4A16Config())
    pipe.save_pretrained(tmp_path / "q", progress=False)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(dump_recipe(recipe_from_dict({"model": str(tmp_path / "q")})))
    assert main(["calibrate", "--recipe", str(recipe), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    assert "is a quantized mgtq checkpoint; SCQ calibrates a float model" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_an_empty_folder_or_an_mgtq_run_is_accepted(tmp_path):
    empty = RunFolder(tmp_path / "empty")
    empty.root.mkdir()
    empty.check_takeable(tmp_path / "model")
    run = RunFolder(tmp_path / "run")
    run.start(recipe_from_dict({}), tmp_path / "model", {})
    (run.root / "notes.txt").write_text("the user's notes beside a run")
    run.check_takeable(tmp_path / "model")


def _recipe(model_dir, **over):
    data = tiny_recipe_dict(model_dir, synthesis={"num_steps": 3}, qat={"steps": 12})
    for section, values in over.items():
        data[section] = {**data.get(section, {}), **values} if isinstance(values, dict) else values
    return recipe_from_dict(data)


@pytest.mark.parametrize("qat_section, message", [
    ({"skip": ["context_embedder", "transformer_block.*"]}, r"qat.skip pattern 'transformer_block\.\*' matches no nn.Linear"),
    ({"group_size": 64}, r"qat.group_size 64 does not divide the input width of \d+ quantized Linear\(s\), e\.g\. "
                         r".* \(32\); .*common divisor is 32\), or add them to qat.skip"),
])
def test_a_qat_section_that_cannot_apply_is_refused_before_any_stage(tmp_path, random_pipeline_dir, qat_section,
                                                                     message):
    with pytest.raises(ValueError, match=message):
        calibrate(_recipe(random_pipeline_dir, qat=qat_section), tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "synth").exists()


def test_a_mixed_precision_accelerate_cannot_give_is_refused_before_any_stage(tmp_path, random_pipeline_dir):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="qat.mixed_precision fp16 needs a CUDA GPU"):
            calibrate(_recipe(random_pipeline_dir, qat={"mixed_precision": "fp16"}), tmp_path / "a", progress=False)
    Accelerator(cpu=True)  # this process's accelerate holds one setting from now on
    other = "bf16" if AcceleratorState().mixed_precision != "bf16" else "no"
    with pytest.raises(ValueError, match=f"qat.mixed_precision '{other}': this Python process already trained"):
        calibrate(_recipe(random_pipeline_dir, qat={"mixed_precision": other}), tmp_path / "b", progress=False)
    assert not (tmp_path / "a" / "synth").exists() and not (tmp_path / "b" / "synth").exists()


@pytest.fixture(scope="module")
def run(tmp_path_factory, random_pipeline_dir):
    out = tmp_path_factory.mktemp("scq") / "run"
    report = calibrate(_recipe(random_pipeline_dir), out, progress=False)
    return out, report


def test_run_selected_lowest_third_of_recorded_magnitudes(run):
    out, report = run
    mags = read_json(out / "magnitudes" / "magnitudes.json")["magnitude"]
    chosen = read_json(out / "secondary" / "selection.json")["a8_layers"]
    k = round(len(mags) / 3)
    assert len(chosen) == k == report["a8_layers"]
    threshold = max(mags[n] for n in chosen)
    assert all(mags[n] >= threshold for n in set(mags) - set(chosen))
    assert (out / "secondary" / "magnitudes.png").stat().st_size > 1000


def test_qat_lowers_the_loss(run):
    out, report = run
    before, after = report["qat_loss"]["loss_before"], report["qat_loss"]["loss_after"]
    assert after["ce"] < before["ce"]  # the recipe's objective is CE
    assert "kl_to_float" not in before  # CE keeps no float teacher in memory


def test_distillation_qat_moves_towards_the_float_model(tmp_path, random_pipeline_dir):
    report = calibrate(_recipe(random_pipeline_dir, qat={"objective": "distill", "lr": 1e-4}), tmp_path / "run", progress=False)
    before, after = report["qat_loss"]["loss_before"], report["qat_loss"]["loss_after"]
    assert before["kl_to_float"] > 0  # W4 changes the predictions; the KL is measured, not assumed
    assert after["kl_to_float"] < 0.8 * before["kl_to_float"], (before, after)
    assert read_json(tmp_path / "run" / "qat" / "stage.json")["objective"] == "distill"


def test_synthesized_dataset_has_prompt_seed_image_tokens(run):
    from datasets import load_from_disk

    out, _ = run
    ds = load_from_disk(str(out / "synth" / "dataset"))
    assert set(ds.column_names) == {"prompt", "seed", "image", "tokens"}
    assert len(ds) == 8 and ds[0]["image"].size == (64, 64) and len(ds[0]["tokens"]) == 256
    assert ds["seed"] == list(range(8))


def test_a_run_synthesizing_tokens_only_in_bfloat16_calibrates_and_exports(tmp_path, random_pipeline_dir):
    from datasets import load_from_disk

    from mgtq.export import export_run

    out = tmp_path / "run"
    report = calibrate(_recipe(random_pipeline_dir, synthesis={"keep_images": False, "dtype": "bfloat16"}), out,
                       progress=False)
    assert [report[s] for s in STAGES] == ["ran"] * 4  # every stage reads the set without its images
    assert set(load_from_disk(str(out / "synth" / "dataset")).column_names) == {"prompt", "seed", "tokens"}
    assert (export_run(out, tmp_path / "ckpt") / "model_index.json").is_file()


def test_a_finished_run_keeps_none_of_the_work_it_resumed_from(run):
    out, _ = run
    # synthesis shards and QAT's state (at Meissonic's size about 12 GB) are gone once their stages are written
    assert sorted(p.name for p in out.iterdir()) == [".lock", "magnitudes", "qat", "recipe.yaml", "run.json",
                                                     "secondary", "synth"]


def test_rerun_skips_completed_stages(run, random_pipeline_dir):
    out, _ = run
    report = calibrate(_recipe(random_pipeline_dir), out, progress=False)
    assert [report[s] for s in STAGES] == ["skipped"] * 4


def test_reused_stages_made_by_another_torch_or_machine_class_are_said(tmp_path, random_pipeline_dir):
    import mgtq
    from mgtq.quantization.kernels import describe_kernels

    out = tmp_path / "run"
    calibrate(_recipe(random_pipeline_dir), out, progress=False)
    marker = out / "qat" / "stage.json"
    assert read_json(marker)["made_with"] == {"mgtq": mgtq.__version__, **describe_kernels("cpu")}
    write_json(marker, {**read_json(marker), "made_with": {**read_json(marker)["made_with"], "torch": "0.0"}})
    with pytest.warns(UserWarning, match=r"reusing stages computed elsewhere \(qat: torch '0.0'; here: mgtq .*"
                                         r"delete those stage folders"):
        report = calibrate(_recipe(random_pipeline_dir), out, progress=False)
    assert report["qat"] == "skipped"


def test_changed_section_reruns_that_stage_and_after(tmp_path, run, random_pipeline_dir):
    out, _ = run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    changed = _recipe(random_pipeline_dir, secondary={"selection": "all"})
    with pytest.raises(ValueError, match=r"another recipe .*secondary\.selection.*--restart"):
        calibrate(changed, copy, progress=False)  # a run folder keeps its recipe unless told to start over
    report = calibrate(changed, copy, progress=False, restart=True)
    assert [report[s] for s in STAGES] == ["skipped", "skipped", "skipped", "ran"]
    assert report["a8_layers"] == len(read_json(copy / "magnitudes" / "magnitudes.json")["magnitude"])


def _interrupt_qat_after_step_8(model_dir, out, monkeypatch):
    """Run calibrate into `out` until the 9th QAT training step, after the state of step 8 was saved; return the
    real loss, put back in place."""
    real_loss, calls = qat.qat_loss, {"n": 0}

    def stop_in_step_9(*args, **kwargs):
        calls["n"] += torch.is_grad_enabled()  # count training steps, not the no-grad evaluations
        if calls["n"] == 9:
            raise KeyboardInterrupt
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(qat, "qat_loss", stop_in_step_9)
    with pytest.raises(KeyboardInterrupt):
        calibrate(_recipe(model_dir), out, progress=False)
    monkeypatch.setattr(qat, "qat_loss", real_loss)
    return real_loss


def test_resume_after_interrupted_qat(tmp_path, random_pipeline_dir, monkeypatch):
    out = tmp_path / "run"
    _interrupt_qat_after_step_8(random_pipeline_dir, out, monkeypatch)
    assert not (out / "qat").exists()  # nothing half-written
    assert read_json(out / "qat-state" / "trainer.json")["step"] == 8
    import random

    import numpy as np

    torch.manual_seed(123), np.random.seed(123), random.seed(123)  # the caller's streams, as a script sets them
    streams = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    report = calibrate(_recipe(random_pipeline_dir), out, progress=False)
    assert report["synth"] == "skipped" and report["qat"] == "ran"
    assert read_json(out / "qat" / "stage.json")["steps"] == 12
    # the resume set the saved states for its run only (it overwrote the caller's with the interrupted run's)
    assert torch.equal(torch.get_rng_state(), streams[0]) and (np.random.get_state()[1] == streams[1]).all()
    assert random.getstate() == streams[2]


def test_a_qat_state_of_another_process_count_is_not_resumed(tmp_path, random_pipeline_dir, monkeypatch):
    out = tmp_path / "run"
    real_loss = _interrupt_qat_after_step_8(random_pipeline_dir, out, monkeypatch)
    marker = out / "qat-state" / "trainer.json"
    assert read_json(marker)["processes"] == 1
    resave_trainer_json(marker.parent, processes=2)  # as a 2-process torchrun run leaves it
    steps = []
    monkeypatch.setattr(qat, "qat_loss", lambda *a, **k: steps.append(torch.is_grad_enabled()) or real_loss(*a, **k))
    with pytest.warns(UserWarning, match=r"processes 2 there, 1 now\): starting over"):
        calibrate(_recipe(random_pipeline_dir), out, progress=False)
    assert sum(steps) == 12  # every step again, not the 4 after step 8: its batches were drawn per process


def test_an_edited_qat_step_is_refused(tmp_path, random_pipeline_dir, monkeypatch):
    out = tmp_path / "run"
    _interrupt_qat_after_step_8(random_pipeline_dir, out, monkeypatch)
    marker = out / "qat-state" / "trainer.json"
    write_json(marker, {**read_json(marker), "step": 11})  # 8 → 11: one step left instead of 4 (audit F8)
    with pytest.raises(ValueError, match=r"trainer.json is missing or does not match the sha256.*delete .*qat-state "
                                         r"to start this training over, or restore"):
        calibrate(_recipe(random_pipeline_dir), out, progress=False)
    resave_trainer_json(marker.parent, step=11)  # checksums made to fit: the step itself is still refused
    with pytest.raises(ValueError, match=r"step 11 is not one SCQ 2/4 QAT saves a state at \(every 4 of 12 "
                                         r"steps, and the last\)"):
        calibrate(_recipe(random_pipeline_dir), out, progress=False)
    assert not (out / "qat").exists()


def test_nan_loss_stops_with_clear_error_and_keeps_state(tmp_path, random_pipeline_dir, monkeypatch):
    out = tmp_path / "run"
    real_loss, calls = qat.qat_loss, {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += torch.is_grad_enabled()  # count training steps, not the no-grad evaluations
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if calls["n"] > 5 else loss

    monkeypatch.setattr(qat, "qat_loss", poisoned)
    with pytest.raises(FloatingPointError, match="last good state"):
        calibrate(_recipe(random_pipeline_dir), out, progress=False)
    assert read_json(out / "qat-state" / "trainer.json")["step"] == 4
    assert not (out / "qat").exists()


def test_damaged_calibration_state_is_detected(tmp_path, run, random_pipeline_dir):
    out, _ = run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    (copy / "magnitudes" / "stage.json").write_text("{truncated")  # damaged marker → the stage runs again
    report = calibrate(_recipe(random_pipeline_dir), copy, progress=False)
    assert report["magnitudes"] == "ran"
    shutil.rmtree(copy / "synth" / "dataset")
    (copy / "synth" / "dataset").mkdir()  # its files no longer those the stage recorded → it runs again
    report = calibrate(_recipe(random_pipeline_dir), copy, progress=False)
    assert report["synth"] == "ran" and len(stages.RunFolder(copy).load_dataset()) == 8


@pytest.fixture(scope="module")
def exported(tmp_path_factory, run):
    out, _ = run
    ckpt = tmp_path_factory.mktemp("ckpt") / "w4a8"
    assert main(["export", str(out), "--out", str(ckpt)]) == 0
    return ckpt


def test_export_ships_the_text_encoder_the_recipe_calibrated_with(tmp_path, random_pipeline_dir):
    from transformers import CLIPTextModelWithProjection

    import mgtq

    clip = CLIPTextModelWithProjection.from_pretrained(random_pipeline_dir / "text_encoder")
    with torch.no_grad():
        clip.text_projection.weight.mul_(-1)  # another encoder than the model folder's, as a separate CLIP is
    clip.save_pretrained(tmp_path / "clip")
    for name in ("pytorch_model.bin", "open_clip_model.safetensors", ".cache/huge.bin"):  # as a downloaded CLIP has
        (tmp_path / "clip" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "clip" / name).write_bytes(b"not read by the loader")
    run = tmp_path / "run"
    calibrate(_recipe(random_pipeline_dir, text_encoder=str(tmp_path / "clip")), run, progress=False)
    assert main(["export", str(run), "--out", str(tmp_path / "clip" / "ckpt")]) == 2  # never into the encoder
    assert main(["export", str(run), "--out", str(tmp_path / "ckpt")]) == 0
    assert sorted(p.name for p in (tmp_path / "ckpt" / "text_encoder").iterdir()) == ["config.json",
                                                                                      "model.safetensors"]
    loaded = mgtq.load(tmp_path / "ckpt", progress=False).text_encoder.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in clip.state_dict().items())
    calibrated_with = MGTPipeline.from_pretrained(random_pipeline_dir, text_encoder=tmp_path / "clip")
    prompt = ["two blue squares"]
    assert torch.equal(mgtq.load(tmp_path / "ckpt", progress=False).encode_prompt(prompt)[0],
                       calibrated_with.encode_prompt(prompt)[0])


def test_export_is_packed_safetensors_with_manifest(exported, run):
    manifest = read_json(exported / "transformer" / "manifest.json")
    assert manifest["format_version"] == FORMAT_VERSION
    schemes = [v["scheme"] for v in manifest["layers"].values()]
    a8 = read_json(run[0] / "secondary" / "selection.json")["a8_layers"]
    assert schemes.count("w4a8") == len(a8) and schemes.count("w4a16") == len(schemes) - len(a8)
    assert "group_size" not in manifest and manifest["recipe"] == load_recipe(run[0] / "recipe.yaml").to_dict()
    assert manifest["selection"]["mode"] == "lowest" and manifest["float_dtype"] == "float32"
    assert manifest["selection"]["statistic"] == load_recipe(run[0] / "recipe.yaml").magnitudes.statistic
    assert not list(exported.rglob("*.bin")) and not list(exported.rglob("*.pt"))
    from safetensors import safe_open

    with safe_open(str(exported / "transformer" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        name = next(iter(manifest["layers"]))
        assert f.get_tensor(f"{name}.weight_packed").dtype == torch.uint8


def test_export_load_same_logits_as_calibrated_model(exported, run):
    out, _ = run
    recipe = load_recipe_from_run(out)
    sel = read_json(out / "secondary" / "selection.json")
    fake = MeissonicTransformer.from_pretrained(out / "qat" / "transformer").eval()
    prepare_qat_(fake, group_size=recipe.qat.group_size, a8_layers=sel["a8_layers"], input_scales=sel["input_scales"])
    real = load_quantized_transformer(exported / "transformer", MeissonicTransformer)
    assert sum(isinstance(m, W4A8Linear) for m in real.modules()) == len(sel["a8_layers"])
    assert sum(isinstance(m, (W4Linear, W4A8Linear)) for m in real.modules()) == len(read_json(
        exported / "transformer" / "manifest.json")["layers"])
    gen = torch.Generator().manual_seed(0)
    kwargs = dict(hidden_states=torch.randint(0, 33, (2, 16, 16), generator=gen),
                  encoder_hidden_states=torch.randn(2, 16, 32, generator=gen), pooled_projections=torch.randn(2, 32, generator=gen),
                  timestep=torch.tensor([0.3, 0.9]))
    with torch.no_grad():
        a, b = fake(**kwargs), real(**kwargs)
    assert (a - b).abs().max().item() < 1e-3 * max(1.0, a.abs().max().item())


def load_recipe_from_run(out):
    return recipe_from_dict(yaml.safe_load((out / "recipe.yaml").read_text()))


def test_quantized_checkpoint_generates_through_load_and_cli(exported, tmp_path):
    import mgtq

    pipe = mgtq.load(exported)
    assert isinstance(pipe, MGTPipeline)
    out = pipe("a red circle", seed=0, progress=False)
    assert out.images[0].size == (64, 64)
    assert main(["generate", "--model", str(exported), "--prompt", "a red circle", "--steps", "3",
                 "--out", str(tmp_path / "q.png"), "--no-progress", "--device", "cpu"]) == 0


def test_unknown_format_version_is_clear_error(tmp_path, exported):
    copy = tmp_path / "ckpt"
    shutil.copytree(exported, copy)
    manifest = read_json(copy / "transformer" / "manifest.json")
    manifest["format_version"] = 99
    (copy / "transformer" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="version 99"):
        load_quantized_transformer(copy / "transformer", MeissonicTransformer)


def test_tampered_safetensors_is_clear_error(tmp_path, exported):
    from safetensors.torch import load_file, save_file

    copy = tmp_path / "ckpt"
    shutil.copytree(exported, copy)
    weights = copy / "transformer" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(weights))
    key = next(k for k in tensors if k.endswith("weight_packed"))
    tensors[key] = tensors[key][:, :-1].contiguous()
    save_file(tensors, str(weights))
    with pytest.raises(ValueError, match="sha256"):  # shapes, dtypes, values: tests/quantization/test_checkpoint.py
        load_quantized_transformer(copy / "transformer", MeissonicTransformer)
    weights.write_bytes(weights.read_bytes()[:2000])
    with pytest.raises(ValueError, match="sha256"):
        load_quantized_transformer(copy / "transformer", MeissonicTransformer)


def test_export_waits_for_no_one_and_refuses_a_run_a_calibrate_holds(tmp_path, run, capsys):
    out, _ = run
    with RunFolder(out).lock():
        assert main(["export", str(out), "--out", str(tmp_path / "ckpt")]) == 2
        assert f"is in use by pid {os.getpid()} on " in capsys.readouterr().err
    assert not (tmp_path / "ckpt").exists()
    with RunFolder(out).reading(), RunFolder(out).reading():  # exports side by side
        pass


def test_export_of_unfinished_run_is_clear_error(tmp_path, run):
    copy = tmp_path / "run"
    shutil.copytree(run[0], copy)
    shutil.rmtree(copy / "secondary")
    assert main(["export", str(copy), "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_accelerate_launch_and_torchrun_give_the_same_artifacts(tmp_path, random_pipeline_dir, run):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(random_pipeline_dir, qat={"steps": 4}).to_dict()))
    layouts = {}
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    commands = {
        "accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu",
                       "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                       "-m", "mgtq.cli", "calibrate"],
        "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "mgtq.cli",
                     "calibrate"],
    }
    for name, cmd in commands.items():
        out = tmp_path / name
        proc = subprocess.run(cmd + ["--recipe", str(recipe), "--out", str(out), "--no-progress"],
                              env={**env, "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        layouts[name] = sorted(str(p.relative_to(out)) for p in out.rglob("*") if "qat-state" not in str(p))
    assert layouts["accelerate"] == layouts["torchrun"]
    assert read_json(tmp_path / "torchrun" / "qat" / "stage.json")["processes"] == 2


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_calibrate_on_a_gpu_computes_every_stage_there(tmp_path, random_pipeline_dir, monkeypatch):
    devices = []
    forward = MeissonicTransformer.forward
    monkeypatch.setattr(MeissonicTransformer, "forward",
                        lambda self, *a, **k: devices.append(next(self.parameters()).device.type) or forward(self, *a, **k))
    calibrate(_recipe(random_pipeline_dir), tmp_path / "run", progress=False)
    assert devices and set(devices) == {"cuda"}  # synthesis, QAT, magnitudes, secondary
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "ckpt")]) == 0
    assert MGTPipeline.from_pretrained(tmp_path / "ckpt", device="cuda")("a red circle", progress=False).images


def test_work_that_cannot_be_removed_once_its_stage_is_written_is_said_not_fatal(tmp_path, monkeypatch):
    import mgtq.scq.run

    run = RunFolder(tmp_path / "run")
    (run.qat_state / "trainer.json").parent.mkdir(parents=True)
    (run.qat_state / "trainer.json").write_text("{}")

    def in_use(path):
        raise PermissionError(13, "Access is denied")  # as Windows answers for a folder whose files are mapped

    monkeypatch.setattr(mgtq.scq.run, "remove_directory", in_use)
    with pytest.warns(RuntimeWarning, match=r"qat-state could not be removed \(Access is denied\).*delete it"):
        run.write_stage("qat", "fp", {}, lambda folder: (folder / "weights").write_text("w"))
    assert run.stage_ran("qat", "fp") and run.qat_state.is_dir()
