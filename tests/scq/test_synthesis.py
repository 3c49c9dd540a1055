"""mgtq.scq.synthesis: calibration prompts come from ShapeBench's val split, not the scored one; the set without
images holds the same tokens; a killed synthesis resumes from its shards and gives the same set."""

import datasets
import pytest

from mgtq.scq import synthesis
from mgtq.scq.recipe import recipe_from_dict
from mgtq.scq.synthesis import calibration_prompts, save_dataset, synthesize


def test_shapebench_calibration_prompts_are_not_the_scored_ones():
    from mgtq.shapes import shapebench_prompts

    recipe = recipe_from_dict({"prompts": {"source": "shapebench", "count": 40, "seed": 5}})
    pairs = calibration_prompts(recipe.prompts)
    assert [seed for _, seed in pairs] == list(range(5, 45))
    scored = [it.prompt for it in shapebench_prompts()]
    val = [it.prompt for it in shapebench_prompts(split="val")]
    assert {p for p, _ in pairs} <= set(val)
    assert [p for p, _ in pairs] != [p for p in scored[: len(pairs)]]


def test_without_images_the_set_has_the_same_tokens_and_nothing_is_decoded(random_pipeline, monkeypatch):
    import torch

    from mgtq.scq.synthesis import calibration_data

    pairs, sampler = [("a red circle", 0), ("a blue square", 1)], random_pipeline.settings.sampler.replace(num_steps=2)
    full = synthesize(random_pipeline, pairs, sampler, 64, 2, progress=False)

    def no_decoding(*args, **kwargs):
        raise AssertionError("the VQ decoder ran")

    monkeypatch.setattr(type(random_pipeline), "decode_tokens", no_decoding)
    tokens_only = synthesize(random_pipeline, pairs, sampler, 64, 2, progress=False, keep_images=False)
    assert set(full.column_names) - set(tokens_only.column_names) == {"image"}
    assert tokens_only["tokens"] == full["tokens"] and tokens_only["prompt"] == full["prompt"]
    grid = random_pipeline.token_grid(64, 64)
    a, b = calibration_data(full, random_pipeline, grid, 64), calibration_data(tokens_only, random_pipeline, grid, 64)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.text, b.text)


def test_saving_the_synthesized_set_without_progress_shows_no_bar(capsys, tmp_path):
    ds = datasets.Dataset.from_dict({"prompt": ["a red circle", "a blue square"]})
    save_dataset(ds, tmp_path / "quiet", progress=False)
    assert "Saving the dataset" not in capsys.readouterr().err
    assert datasets.load_from_disk(str(tmp_path / "quiet"))["prompt"] == ["a red circle", "a blue square"]
    assert not datasets.are_progress_bars_disabled()  # the global switch is back as it was
    save_dataset(ds, tmp_path / "shown", progress=True)
    assert "Saving the dataset" in capsys.readouterr().err


def _counting_calls(pipe, monkeypatch, fail_at=None):
    """Count the pipeline's calls (one a batch); raise KeyboardInterrupt in call `fail_at`, as a kill would stop it."""
    real, calls = type(pipe).__call__, []

    def call(self, *args, **kwargs):
        calls.append(list(args[0]))
        if len(calls) == fail_at:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(pipe), "__call__", call)
    return calls


def _rows(ds):
    return ds["prompt"], ds["seed"], ds["tokens"]


def test_a_killed_synthesis_resumes_from_its_shards_and_gives_the_same_set(random_pipeline, monkeypatch, tmp_path):
    pairs = [(f"{n} red circles", 10 + n) for n in range(5)]
    sampler = random_pipeline.settings.sampler.replace(num_steps=2)
    reference = synthesize(random_pipeline, pairs, sampler, 64, 2, progress=False, keep_images=False)
    monkeypatch.setattr(synthesis, "SHARD_PROMPTS", 3)  # rounded up to 4: whole batches of 2, so shards 0-4, 4-5
    shards = tmp_path / "progress"
    _counting_calls(random_pipeline, monkeypatch, fail_at=3)
    with pytest.raises(KeyboardInterrupt):
        synthesize(random_pipeline, pairs, sampler, 64, 2, progress=False, keep_images=False, shards=shards,
                   fingerprint="fp")
    assert sorted(p.name for p in shards.iterdir()) == ["0000000-0000004"]  # the finished shard, nothing else
    monkeypatch.undo()
    monkeypatch.setattr(synthesis, "SHARD_PROMPTS", 3)
    calls = _counting_calls(random_pipeline, monkeypatch)
    resumed = synthesize(random_pipeline, pairs, sampler, 64, 2, progress=False, keep_images=False, shards=shards,
                         fingerprint="fp")
    assert calls == [["4 red circles"]]  # only the last shard's batch sampled again
    assert _rows(resumed) == _rows(reference)


def test_shards_of_other_settings_or_damaged_ones_are_sampled_again(random_pipeline, monkeypatch, tmp_path):
    pairs = [(f"{n} blue squares", n) for n in range(4)]
    sampler = random_pipeline.settings.sampler.replace(num_steps=2)
    monkeypatch.setattr(synthesis, "SHARD_PROMPTS", 2)
    shards, kwargs = tmp_path / "progress", dict(progress=False, keep_images=False, shards=tmp_path / "progress")
    first = synthesize(random_pipeline, pairs, sampler, 64, 2, fingerprint="fp", **kwargs)
    calls = _counting_calls(random_pipeline, monkeypatch)
    assert _rows(synthesize(random_pipeline, pairs, sampler, 64, 2, fingerprint="fp", **kwargs)) == _rows(first)
    assert calls == []  # a finished synthesis read back whole
    arrow = next((shards / "0000002-0000004" / synthesis.SHARD_ROWS).glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[:-8] + bytes(8))  # damaged on disk
    assert _rows(synthesize(random_pipeline, pairs, sampler, 64, 2, fingerprint="fp", **kwargs)) == _rows(first)
    assert calls == [["2 blue squares", "3 blue squares"]]
    calls.clear()
    synthesize(random_pipeline, pairs, sampler, 64, 2, fingerprint="other settings", **kwargs)
    assert len(calls) == 2  # every shard again
    other_pairs = [(p, s + 1) for p, s in pairs]  # same fingerprint, other seeds: not the shards' rows
    calls.clear()
    synthesize(random_pipeline, other_pairs, sampler, 64, 2, fingerprint="other settings", **kwargs)
    assert len(calls) == 2


def test_prompts_encoded_in_chunks_give_the_features_of_one_batch(random_pipeline, monkeypatch):
    import torch

    prompts = [f"{n} green triangles" for n in range(5)]
    ds = datasets.Dataset.from_dict({"prompt": prompts, "tokens": [[0] * 16] * 5})
    with torch.inference_mode():
        text, pooled = random_pipeline.encode_prompt(prompts)
    monkeypatch.setattr(synthesis, "ENCODE_BATCH", 2)
    data = synthesis.calibration_data(ds, random_pipeline, (4, 4), 64)
    assert torch.allclose(data.text, text.float(), atol=1e-6) and torch.allclose(data.pooled, pooled.float(), atol=1e-6)
    assert data.text.shape[0] == 5 and not data.text.is_inference()  # QAT trains on them: ordinary tensors
