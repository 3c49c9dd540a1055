"""The training state on disk: exactly its files, each and the metadata itself checked before anything is read."""

import pytest
import torch
from accelerate import Accelerator

from mgtq.files import read_json, write_json
from mgtq.training import state


def _parts():
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 / (1 + s))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    return accelerator, model, optimizer, scheduler


def _saved(folder):
    """A state after one step, with one file of the caller's ("mine.json")."""
    accelerator, model, optimizer, scheduler = _parts()
    model(torch.ones(2, 3)).sum().backward()
    optimizer.step()
    scheduler.step()
    folder.mkdir()
    write_json(folder / "mine.json", {"step": 1})
    state.save_training_state(folder, accelerator, model, optimizer, scheduler, extra=("mine.json",))
    return accelerator.unwrap_model(model).weight.detach().clone()


def _load(folder, extra=("mine.json",)):
    accelerator, model, optimizer, scheduler = _parts()
    state.load_training_state(folder, accelerator, model, optimizer, scheduler, extra=extra)
    return accelerator.unwrap_model(model).weight.detach().clone(), optimizer


def _edit_meta(folder, edit, digest=True):
    """state.json edited by `edit(meta)`; with `digest` its digest recomputed as mgtq's writer computes it."""
    meta = read_json(folder / state.STATE_FILE)
    meta.pop(state.DIGEST_KEY)
    edit(meta)
    write_json(folder / state.STATE_FILE, {**meta, state.DIGEST_KEY: state._digest(meta)} if digest else meta)


def test_a_saved_state_loads_back(tmp_path):
    weight = _saved(tmp_path / "s")
    loaded, optimizer = _load(tmp_path / "s")
    assert torch.equal(loaded, weight) and optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    assert sorted(read_json(tmp_path / "s" / state.STATE_FILE)["files"]) == [
        "mine.json", "model.safetensors", "optimizer.safetensors", "rng.safetensors"]


def test_an_edit_of_state_json_is_refused(tmp_path):
    _saved(tmp_path / "s")
    meta = read_json(tmp_path / "s" / state.STATE_FILE)
    meta["optimizer"]["param_groups"][0]["lr"] = 1.0
    write_json(tmp_path / "s" / state.STATE_FILE, meta)
    with pytest.raises(ValueError, match=r"state.json does not match the digest written with it .*delete .*s to "
                                         r"start this training over, or restore"):
        _load(tmp_path / "s")


def test_the_callers_file_is_checked_too(tmp_path):
    _saved(tmp_path / "s")
    write_json(tmp_path / "s" / "mine.json", {"step": 7})
    with pytest.raises(ValueError, match=r"mine.json is missing or does not match the sha256"):
        _load(tmp_path / "s")


@pytest.mark.parametrize("name", ["model.safetensors", "mine.json"])
def test_a_file_left_out_of_the_list_is_refused_by_name(tmp_path, name):
    _saved(tmp_path / "s")
    _edit_meta(tmp_path / "s", lambda meta: meta["files"].pop(name))  # even with the digest made to fit
    with pytest.raises(ValueError, match=rf"records no sha256 for {name}; delete"):
        _load(tmp_path / "s")


def test_a_file_the_state_is_not_made_of_is_refused(tmp_path):
    _saved(tmp_path / "s")
    with pytest.raises(ValueError, match=r"records files this training state is not made of: mine.json"):
        _load(tmp_path / "s", extra=())


def test_a_state_of_format_1_is_an_outdated_state(tmp_path):
    _saved(tmp_path / "s")

    def as_format_1(meta):  # what an earlier mgtq wrote: no digest, its own three files listed
        meta["version"] = 1
        meta["files"].pop("mine.json")

    _edit_meta(tmp_path / "s", as_format_1, digest=False)
    with pytest.raises(state.OutdatedTrainingState, match=r"format 1, whose metadata no digest covers.*delete"):
        _load(tmp_path / "s")


def test_a_state_json_that_is_not_json_is_refused(tmp_path):
    _saved(tmp_path / "s")
    (tmp_path / "s" / state.STATE_FILE).write_text("{truncated")
    with pytest.raises(ValueError, match=r"state.json cannot be read .*restore"):
        _load(tmp_path / "s")
