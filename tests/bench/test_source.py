"""mgtq.bench.source: `--model` names resolve to what the bench builds and feeds."""

import pytest

from mgtq.bench.source import resolve_model, token_grid, transformer_config


def test_the_second_embedded_model_is_benched_by_name_on_its_16x16_grid():
    source = resolve_model("tiny-shapes-16x16")
    assert source.name == "tiny-shapes-16x16" and source.kind == "float-dir" and source.slug == "tiny-shapes-16x16"
    assert token_grid(source) == (16, 16)
    assert transformer_config(source)["downsample"] is False
    assert transformer_config(resolve_model("tiny-shapes"))["downsample"] is True
    # a report names an embedded model, not where the install keeps it
    assert source.path == "tiny-shapes-16x16" and source.notes[0] == "embedded model tiny-shapes-16x16 (float transformer)"
    assert (source.folder / "model_index.json").is_file()


def test_an_unknown_model_names_the_known_ones():
    with pytest.raises(FileNotFoundError, match="tiny-shapes-16x16, meissonic-1024|meissonic-1024, tiny-shapes, tiny-shapes-16x16"):
        resolve_model("tiny-shapes-32x32")
    with pytest.raises(ValueError, match="--text-encoder applies to pipeline folders"):
        resolve_model("tiny-shapes-16x16", text_encoder="somewhere")
