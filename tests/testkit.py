"""Test fixtures: random-weight pipelines, small quantized transformers, seconds-long recipes.

Tests import it as `testkit` (tests/conftest.py puts this folder on the path; a test's subprocess gets it through
`PYTHONPATH`); the installed package never does. The random-weight models it assembles come from
`mgtq.models.random`.
"""

from __future__ import annotations

import torch
from torch import nn

from mgtq.models.presets import build_transformer
from mgtq.models.random import WEIGHT_STD, fill_random_, random_quantized_transformer, tiny_text_encoder, tiny_vqmodel
from mgtq.pipeline import MGTPipeline, PipelineSettings
from mgtq.sampling import SamplerConfig
from mgtq.seeding import derive_seed
from mgtq.text import build_word_tokenizer


# ------------------------------------------------------------------------------------ pipelines
def build_random_pipeline(
    preset: str = "test-micro",
    resolution: int = 64,
    vq_factor: int = 4,
    words: list[str] | None = None,
    seed: int = 0,
    sampler: SamplerConfig | None = None,
    text_max_length: int = 24,
) -> MGTPipeline:
    """A complete pipeline with random weights (real component classes), e.g. 64×64 images in seconds."""
    torch.manual_seed(seed)  # module init draws from the global generator; make it repeatable
    transformer = build_transformer(preset)
    cfg = transformer.config
    from mgtq.shapes import vocabulary

    tokenizer = build_word_tokenizer(words or vocabulary(), max_length=text_max_length)
    # transformers' own init of the text encoder changed in 5.13 (values and draws from the global generator), so
    # it runs on a forked generator and its weights come from mgtq's seeded fill: the same pipeline on every version
    with torch.random.fork_rng(devices=[]):
        text_encoder = tiny_text_encoder(tokenizer, cfg.joint_attention_dim, cfg.pooled_projection_dim)
    fill_random_module_(text_encoder, "text_encoder", seed)
    vqvae = tiny_vqmodel(cfg.codebook_size, factor=vq_factor)
    settings = PipelineSettings(
        sampler=sampler or SamplerConfig(num_steps=8, guidance_scale=3.0, timestep_convention="mask_ratio"),
        resolution=resolution, image_range="-1,1",
    )
    return MGTPipeline(transformer.eval(), vqvae.eval(), text_encoder.eval(), tokenizer, settings)


def fill_random_module_(module: nn.Module, prefix: str, seed: int) -> nn.Module:
    """Every parameter of `module` filled by `mgtq.models.random.fill_random_` (LayerNorm weights 1, biases 0, the
    rest uniform), seeded by `seed` and the parameter's name: independent of library init code. Linear weights get
    std fan_in^-0.5 (embeddings keep 0.02), the scale of CLIP's own init: at 0.02 everywhere the text barely reaches
    the image (2 of 256 tokens changed with the prompt), and tests of prompts and guidance would test little."""
    for mod_name, sub in module.named_modules():
        for name, param in sub.named_parameters(recurse=False):
            full = ".".join(part for part in (prefix, mod_name, name) if part)
            fill_random_(param.data, full, isinstance(sub, (nn.LayerNorm, nn.GroupNorm)) and name == "weight", seed)
            if isinstance(sub, nn.Linear) and name == "weight":
                param.data.mul_(param.shape[1] ** -0.5 / WEIGHT_STD)
    return module


def random_quantized_pipeline(fraction_a8: float = 1 / 3, seed: int = 0, **kwargs) -> MGTPipeline:
    """`build_random_pipeline` with its transformer replaced by a random W4A8/W4A16 one of the same config
    (float parts fp32; a seeded `fraction_a8` of the Linears W4A8 with input scale 0.05)."""
    import random

    from mgtq.config import plain_config
    from mgtq.quantization import linear_names

    pipe = build_random_pipeline(seed=seed, **kwargs)
    config = plain_config(pipe.transformer.config)
    names = linear_names(pipe.transformer)
    a8 = set(random.Random(derive_seed(seed, "a8")).sample(sorted(names), round(fraction_a8 * len(names))))
    pipe.transformer = random_quantized_transformer(config, a8, dict.fromkeys(a8, 0.05), seed, torch.float32)
    return pipe


def micro_forward_inputs(model, batch: int = 2, grid: int = 8, seed: int = 0) -> dict:
    """Random forward keyword arguments for a small MeissonicTransformer: token ids (batch, grid, grid), text, t."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    return dict(
        hidden_states=torch.randint(0, cfg.codebook_size, (batch, grid, grid), generator=g),
        encoder_hidden_states=torch.randn(batch, 5, cfg.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, generator=g),
        timestep=torch.full((batch,), 0.5),
    )


def quantized_micro_transformer() -> nn.Module:
    """The "test-micro" transformer with every other Linear W4A8 and the rest W4A16 (both kinds, many-row
    image-stream and few-row adaLN inputs)."""
    from mgtq.quantization import W4A8Config, W4A16Config, linear_names, quantize_

    torch.manual_seed(0)
    model = build_transformer("test-micro").eval()
    a8 = linear_names(model)[::2]
    quantize_(model, W4A16Config(), overrides=dict.fromkeys(a8, W4A8Config()), input_scales=dict.fromkeys(a8, 0.05))
    return model


def tiny_recipe_dict(model_dir, **sections) -> dict:
    """A seconds-long SCQ recipe (as a mapping) for the pipeline folder `model_dir`.

    Each keyword names a recipe section whose keys override the defaults here
    (`qat={"steps": 4}`); a non-mapping value replaces the section whole.
    """
    data = {
        "model": str(model_dir),
        "prompts": {"source": "grammar", "count": 8},
        "synthesis": {"num_steps": 2, "guidance_scale": 3.0, "batch_size": 8},
        "qat": {"steps": 4, "lr": 2.0e-3, "batch_size": 4, "save_every": 4},
        "magnitudes": {"mask_ratios": [0.5, 1.0], "batch_size": 8},
        "secondary": {"fraction": 1 / 3, "selection": "lowest"},
        "export": {"dtype": "float32"},
    }
    for section, values in sections.items():
        data[section] = {**data.get(section, {}), **values} if isinstance(values, dict) else values
    return data


def as_official_folder(folder) -> None:
    """Rewrite the model_index.json of a pipeline folder mgtq wrote as an official Meissonic folder's reads: its
    own class names, no mgtq settings, no checksums."""
    import json

    from mgtq.components import CHECKSUMS_KEY

    path = folder / "model_index.json"
    index = {k: v for k, v in json.loads(path.read_text()).items() if k not in ("mgtq", CHECKSUMS_KEY)}
    index.update({"_class_name": "Pipeline", "transformer": ["transformer", "Transformer2DModel"],
                  "scheduler": ["scheduler", "Scheduler"]})
    path.write_text(json.dumps(index))


# ------------------------------------------------------------------------------------ training states


def resave_trainer_json(state_dir, **changes) -> None:
    """trainer.json of the training state in `state_dir` with `changes`, its sha256 and state.json's digest
    written as mgtq's writer writes them: the state another run (another process count, say) would leave."""
    from mgtq.training import loop, state
    from mgtq.files import read_json, write_json
    from mgtq.hashing import sha256_file

    marker = state_dir / loop.TRAINER_FILE
    write_json(marker, {**read_json(marker), **changes})
    meta = read_json(state_dir / state.STATE_FILE)
    meta.pop(state.DIGEST_KEY)
    meta["files"][loop.TRAINER_FILE] = sha256_file(marker)
    write_json(state_dir / state.STATE_FILE, {**meta, state.DIGEST_KEY: state._digest(meta)})
