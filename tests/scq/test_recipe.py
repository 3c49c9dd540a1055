"""Recipes: every bad value is refused before anything runs, with a message naming its key."""

from pathlib import Path

import pytest

from mgtq.scq.recipe import QATConfig, Recipe, load_recipe, recipe_from_dict

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("bad,message", [
    ({"qat": {"steps": "many"}}, "qat.steps must be an integer, got 'many'"),
    ({"qat": {"steps": 2.5}}, "qat.steps must be an integer, got 2.5"),
    ({"qat": {"steps": -1}}, "qat.steps must be ≥ 0, got -1"),
    ({"qat": {"lr": float("nan")}}, "qat.lr must be a finite number, got nan"),
    ({"qat": {"lr": float("inf")}}, "qat.lr must be a finite number, got inf"),
    ({"qat": {"lr": 0}}, "qat.lr must be positive, got 0.0"),
    ({"qat": {"lr": "fast"}}, "qat.lr must be a number, got 'fast'"),
    ({"qat": {"batch_size": 0}}, "qat.batch_size must be ≥ 1, got 0"),
    ({"qat": {"save_every": True}}, "qat.save_every must be an integer, got True"),
    ({"qat": {"cond_drop": 1.0}}, "qat.cond_drop must be in [0, 1), got 1.0"),
    ({"qat": {"group_size": 3}}, "qat.group_size must be null (one scale per output channel) or an even integer ≥ 2 "
                                 "such as 32, 64 or 128, got 3"),
    ({"qat": {"group_size": 0}}, "or an even integer ≥ 2 such as 32, 64 or 128, got 0"),
    ({"qat": {"skip": "to_q"}}, "qat.skip must be a list, got 'to_q'"),
    ({"qat": {"mixed_precision": "int8"}}, "qat.mixed_precision must be one of ['no', 'bf16', 'fp16'], got 'int8'"),
    ({"prompts": {"count": 2.5}}, "prompts.count must be an integer, got 2.5"),
    ({"prompts": {"count": 0}}, "prompts.count must be ≥ 1, got 0"),
    ({"prompts": {"source": "file"}}, "prompts.source is 'file' but prompts.file is not set"),
    ({"prompts": {"file": "prompts.txt"}}, "prompts.file is set but prompts.source is 'shapebench': set source: file"),
    ({"synthesis": {"resolution": 0}}, "synthesis.resolution must be ≥ 1, got 0"),
    ({"synthesis": {"guidance_scale": float("nan")}}, "synthesis.guidance_scale must be a finite number, got nan"),
    ({"synthesis": {"dtype": "int8"}}, "synthesis.dtype must be one of ['auto', 'float32', 'bfloat16', 'float16'], "
                                       "got 'int8'"),
    ({"synthesis": {"keep_images": "no"}}, "synthesis.keep_images must be true or false, got 'no'"),
    ({"secondary": {"fraction": "a third"}}, "secondary.fraction must be a number, got 'a third'"),
    ({"secondary": {"fraction": 1.5}}, "secondary.fraction must be in [0, 1], got 1.5"),
    ({"magnitudes": {"mask_ratios": 0.5}}, "magnitudes.mask_ratios must be a list, got 0.5"),
    ({"magnitudes": {"mask_ratios": [0.5, 0]}}, "magnitudes.mask_ratios must be values in (0, 1], got [0.5, 0.0]"),
    ({"magnitudes": {"max_samples": 0}}, "magnitudes.max_samples must be ≥ 1, got 0"),
    ({"export": {"dtype": "int8"}}, "export.dtype must be one of ['float32', 'bfloat16', 'float16'], got 'int8'"),
    ({"model": 123}, "model must be a string, got 123"),
    ({"qat": [1, 2]}, "qat must be a mapping"),
    ({"qat": {"stesp": 3}}, "unknown key 'qat.stesp'"),
])
def test_bad_values_name_their_key(bad, message):
    with pytest.raises(ValueError) as err:
        recipe_from_dict(bad)
    assert message in str(err.value)


def test_yaml_number_spellings_and_empty_sections():
    recipe = recipe_from_dict({"qat": {"lr": "1e-4", "skip": ["a.*"]}, "synthesis": None})
    assert recipe.qat.lr == 1e-4 and recipe.qat.skip == ("a.*",)  # YAML 1.1 reads `1e-4` as a string
    assert recipe.synthesis == Recipe().synthesis


def test_dataclasses_built_in_python_are_checked_too():
    with pytest.raises(ValueError, match="qat.steps must be an integer"):
        QATConfig(steps=2.5)


def test_recipe_files(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    with pytest.raises(ValueError, match=f"recipe {empty} is empty"):
        load_recipe(empty)
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("prompts: {source: file, file: café.txt}\n".encode("latin-1"))
    with pytest.raises(ValueError, match=f"recipe {latin1} is not UTF-8"):
        load_recipe(latin1)
    listed = tmp_path / "list.yaml"
    listed.write_text("- qat\n")
    with pytest.raises(ValueError, match=f"recipe {listed} must hold a mapping"):
        load_recipe(listed)
    typo = tmp_path / "typo.yaml"
    typo.write_text("qat:\n  steps: many\n")
    with pytest.raises(ValueError, match=f"recipe {typo}: qat.steps must be an integer, got 'many'"):
        load_recipe(typo)


def test_gradient_checkpointing_is_outside_the_fingerprint():
    # it changes memory and time, not the result: switching it on resumes a run instead of starting its QAT over
    on = recipe_from_dict({"qat": {"gradient_checkpointing": True}})
    assert on.qat.gradient_checkpointing and not Recipe().qat.gradient_checkpointing
    assert on.section_fingerprint("qat") == Recipe().section_fingerprint("qat")


def test_differences_name_dotted_keys():
    a = recipe_from_dict({"qat": {"steps": 3}})
    b = recipe_from_dict({"qat": {"steps": 4}, "secondary": {"selection": "all"}})
    assert a.differences(b) == ["qat.steps", "secondary.selection"]
    assert a.differences(a) == []


def test_shipped_recipes_load():
    tiny = load_recipe(REPO / "recipes" / "tiny-shapes-w4a8-scq.yaml")
    assert tiny.qat.weight_bits == 4 and abs(tiny.secondary.fraction - 1 / 3) < 1e-9
    paper = load_recipe(REPO / "recipes" / "meissonic-1024-w4a8-scq.yaml")
    assert (paper.synthesis.num_steps, paper.synthesis.guidance_scale) == (64, 9.0)
    assert (paper.qat.lr, paper.qat.gradient_accumulation) == (5e-6, 32) and paper.qat.gradient_checkpointing
    assert paper.qat.save_every == 200  # a state is ~12 GB at this size: 4 saves and the last, not 20
    assert paper.synthesis.dtype == "bfloat16" and not paper.synthesis.keep_images


@pytest.mark.parametrize("bad,match", [
    ({"qat": {"lerning_rate": 1.0}}, "qat.*lerning_rate"),
    ({"secundary": {}}, "secundary"),
    ({"qat": {"weight_bits": 8}}, "weight_bits"),
    ({"secondary": {"selection": "highest"}}, "selection"),
    ({"magnitudes": {"statistic": "median"}}, "statistic"),
    ({"qat": {"objective": "mse"}}, "objective"),
])
def test_recipe_errors_name_the_key(bad, match):
    with pytest.raises(ValueError, match=match):
        recipe_from_dict(bad)


def test_recipe_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_recipe(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("qat: [unclosed")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_recipe(tmp_path / "bad.yaml")
