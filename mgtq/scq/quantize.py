"""A finished calibration run → the real W4 / W4A8 transformer and its provenance (what `mgtq export` saves)."""

from __future__ import annotations

from pathlib import Path

from mgtq.dtypes import parse_dtype
from mgtq.files import read_json
from mgtq.hashing import model_fingerprint
from mgtq.models.transformer import MeissonicTransformer
from mgtq.quantization import checkpoint, convert_qat_, prepare_qat_
from mgtq.scq.calibrate import check_run_current
from mgtq.scq.run import RunFolder


def quantize_from_run(run: str | Path) -> tuple[MeissonicTransformer, dict]:
    """The real W4/W4A8 transformer of a finished `mgtq calibrate` run, its float parts in the recipe's
    export dtype, and its provenance ({`checkpoint.PROVENANCE` key: value}: source model and fingerprint,
    A8 selection, recipe) for `checkpoint.describe`, which reads everything else off the model."""
    folder = RunFolder(run)
    with folder.reading():  # no calibrate --restart may change the run between these reads
        model_dir = check_run_current(folder.root)
        recipe = folder.recipe()
        selection = read_json(folder.selection_file)
        model = MeissonicTransformer.from_pretrained(folder.qat_weights, local_files_only=True,
                                                     use_safetensors=True)
    model = model.float().eval()
    prepare_qat_(model, group_size=recipe.qat.group_size, skip=recipe.qat.skip, a8_layers=selection["a8_layers"],
                 input_scales=selection["input_scales"])
    convert_qat_(model)
    checkpoint.cast_float_(model, parse_dtype(recipe.export.dtype))
    provenance = {
        "source_model": str(model_dir),
        "source_fingerprint": model_fingerprint(model_dir),
        # the magnitude statistic chose the A8 set only for "lowest" (sensitivity, random and all ignore it)
        "selection": {"mode": selection["selection"], "fraction": selection["fraction"],
                      "statistic": selection["magnitude_statistic"] if selection["selection"] == "lowest" else None},
        "recipe": recipe.to_dict(),
    }
    return model, provenance
