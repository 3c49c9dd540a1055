"""The shared resumable training loop: a resumed run ends exactly where an uninterrupted one does."""

import subprocess
import sys

import pytest
import torch
from accelerate import Accelerator

from mgtq.files import read_json, write_json
from mgtq.training import loop, state
from testkit import resave_trainer_json


SETTINGS = loop.LoopSettings(steps=6, save_every=2, accumulation=2, desc="toy")


def _train(state_dir, stop_at=None, identity=None, loss_hook=None):
    """A toy regression on the loop; `stop_at` interrupts it in that step (before its update)."""
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=SETTINGS.accumulation)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 / (1 + s))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    start, info = loop.resume(accelerator, state_dir, model, optimizer, scheduler, identity or {"fingerprint": "a"},
                              settings=SETTINGS)

    def loss_fn(step, micro):
        if step == stop_at:
            raise KeyboardInterrupt
        gen = torch.Generator().manual_seed(100 * step + micro)
        x = torch.randn(8, 4, generator=gen)
        loss = (model(x).squeeze(1) - x.sum(1)).pow(2).mean()
        return loss_hook(step, loss) if loss_hook else loss

    losses = loop.train(accelerator, model, optimizer, loss_fn, SETTINGS, state_dir, start,
                        {**info, **(identity or {"fingerprint": "a"})}, scheduler=scheduler, progress=False)
    return start, losses, accelerator.unwrap_model(model).weight.detach().clone()


def test_resume_ends_byte_identical_with_the_same_loss_history(tmp_path):
    _, losses, weight = _train(tmp_path / "straight")
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path / "resumed", stop_at=3)
    assert read_json(tmp_path / "resumed" / loop.TRAINER_FILE)["step"] == 2
    start, resumed_losses, resumed_weight = _train(tmp_path / "resumed")
    assert start == 2 and torch.equal(resumed_weight, weight)
    assert resumed_losses == losses  # what is computed from recent losses is the same after a resume


def test_a_state_of_other_inputs_is_not_resumed(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path / "s", stop_at=3)
    with pytest.warns(UserWarning, match=r"saved by another run \(fingerprint 'a' there, 'b' now\): starting over"):
        start, _, _ = _train(tmp_path / "s", identity={"fingerprint": "b"})
    assert start == 0


def test_non_finite_loss_stops_before_the_update_and_keeps_the_last_state(tmp_path):
    with pytest.raises(FloatingPointError, match=r"toy: the loss became nan at step 4.*last good state .* in"):
        _train(tmp_path / "s", loss_hook=lambda step, loss: loss * float("nan") if step == 4 else loss)
    assert read_json(tmp_path / "s" / loop.TRAINER_FILE)["step"] == 4


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_state_whose_swap_was_cut_short_is_restored(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path / "s", stop_at=3)
    dead = _dead_pid()
    # killed between the two renames of the next save (debris named as mgtq's writers name it)
    (tmp_path / "s").rename(tmp_path / f".s.old-{dead}-0000aaaa")
    (tmp_path / f".s.tmp-{dead}-1111bbbb").mkdir()
    start, _, _ = _train(tmp_path / "s")
    assert start == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_the_state_is_safetensors_and_json_only_and_an_altered_file_is_refused(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path / "s", stop_at=3)
    files = sorted(p.name for p in (tmp_path / "s").iterdir())
    assert files == ["model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json", loop.TRAINER_FILE]
    optimizer = tmp_path / "s" / "optimizer.safetensors"
    data = bytearray(optimizer.read_bytes())
    data[-1] ^= 1  # one bit of one moment estimate
    optimizer.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"optimizer.safetensors is missing or does not match the sha256.*delete"):
        _train(tmp_path / "s")


def test_an_edited_step_in_trainer_json_is_refused(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path / "s", stop_at=3)
    marker = tmp_path / "s" / loop.TRAINER_FILE
    write_json(marker, {**read_json(marker), "step": 4})  # would skip steps 2 and 3
    with pytest.raises(ValueError, match=r"trainer.json is missing or does not match the sha256 recorded in "
                                         r"state.json .*delete .* to start this training over, or restore"):
        _train(tmp_path / "s")


@pytest.mark.parametrize("step", [3, 6, 8, 0, -2, 2.0, True, None])
def test_a_step_the_loop_does_not_save_at_is_refused(tmp_path, step):
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path / "s", stop_at=3)
    resave_trainer_json(tmp_path / "s", step=step)  # checksums and all, as if the settings had been others
    with pytest.raises(ValueError, match=rf"trainer.json: step {step!r} is not one toy saves a state at \(every 2 "
                                         r"of 6 steps\).*run with the settings it was saved with, or delete"):
        _train(tmp_path / "s")


def test_the_steps_a_loop_saves_at():
    assert [s for s in range(-1, 9) if loop.saves_at(s, SETTINGS)] == [2, 4]
    final = loop.LoopSettings(steps=6, save_every=4, save_final=True)
    assert [s for s in range(-1, 9) if loop.saves_at(s, final)] == [4, 6]
    assert not loop.saves_at(0, loop.LoopSettings(steps=0, save_every=1, save_final=True))


def test_a_state_of_an_earlier_mgtq_starts_over_with_a_warning(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path / "s", stop_at=3)
    meta = read_json(tmp_path / "s" / state.STATE_FILE)  # as mgtq wrote it before the metadata's digest
    meta.pop(state.DIGEST_KEY)
    meta["version"] = 1
    meta["files"].pop(loop.TRAINER_FILE)
    write_json(tmp_path / "s" / state.STATE_FILE, meta)
    _, losses, weight = _train(tmp_path / "straight")
    with pytest.warns(UserWarning, match=r"written by an earlier mgtq, with no digest over its step and settings: "
                                         r"starting over"):
        start, restarted_losses, restarted_weight = _train(tmp_path / "s")
    assert start == 0 and restarted_losses == losses and torch.equal(restarted_weight, weight)


def _one_accumulated_step(tmp_path, accumulation, grads):
    """One SGD step (lr 1) of a 2-vector over micro-batches whose gradients are `grads`: the update."""
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulation)
    w = torch.nn.Parameter(torch.zeros(2))
    module = torch.nn.ParameterList([w])
    optimizer = torch.optim.SGD(module.parameters(), lr=1.0)
    module, optimizer = accelerator.prepare(module, optimizer)
    settings = loop.LoopSettings(steps=1, save_every=1, accumulation=accumulation, grad_clip=1.0, desc="toy")
    loop.train(accelerator, module, optimizer, lambda step, micro: (module[0] * grads[micro]).sum(), settings,
               tmp_path / "s", progress=False)
    return -module[0].detach()


def test_accumulated_gradients_are_clipped_once_as_one_batchs(tmp_path):
    # micro-batch gradients (10, 0) and (0, 10): their mean (5, 5) clipped to norm 1 is the update, both halves
    # alike; clipping each partial sum instead gave (0.196, 0.981)
    update = _one_accumulated_step(tmp_path, 2, [torch.tensor([10.0, 0.0]), torch.tensor([0.0, 10.0])])
    assert torch.allclose(update, torch.full((2,), 0.5 ** 0.5), atol=1e-6)


def test_the_accelerator_must_accumulate_as_the_loop_settings_say(tmp_path):
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=1)
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"gradient_accumulation_steps=2"):
        loop.train(accelerator, model, optimizer, lambda step, micro: model.weight.sum(), SETTINGS, tmp_path / "s",
                   progress=False)


def test_warmup_cosine_warms_up_linearly_then_decays_to_min_ratio_at_the_last_step():
    assert loop.warmup_cosine(0, 100, 10, 0.1) == pytest.approx(0.1)  # step 0: 1/warmup
    assert loop.warmup_cosine(9, 100, 10, 0.1) == pytest.approx(1.0)
    assert loop.warmup_cosine(10, 100, 10, 0.1) == pytest.approx(1.0)
    assert loop.warmup_cosine(55, 100, 10, 0.1) == pytest.approx(0.55)  # half way down the cosine
    assert loop.warmup_cosine(100, 100, 10, 0.1) == pytest.approx(0.1)
    assert loop.warmup_cosine(130, 100, 10, 0.1) == pytest.approx(0.1)  # held after the last step
    assert loop.warmup_cosine(0, 4, 0, 0.05) == pytest.approx(1.0)  # no warm-up


def test_mgt_training_schedules_its_learning_rate_with_warmup_cosine():
    from mgtq.training import mgt

    config = mgt.MGTTrainConfig(steps=50, warmup=5, min_lr_ratio=0.2)
    assert [mgt.lr_at(s, config) for s in range(60)] == [loop.warmup_cosine(s, 50, 5, 0.2) for s in range(60)]
