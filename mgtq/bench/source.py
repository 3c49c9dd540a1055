"""Which model is benchmarked, and the inputs of its forward pass.

`resolve_model(name)` turns `--model` into a `ModelSource`: a preset with random weights (speed and
size do not depend on values) or a pipeline folder.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch

from mgtq.config import from_mapping, validate
from mgtq.default_model import EMBEDDED_MODELS, embedded_model
from mgtq.sampling.config import SamplerConfig

# The official sampler's CFG scale: the benchmark's, so each transformer call is a CFG batch of 2.
GUIDANCE_SCALE = SamplerConfig.guidance_scale

BENCH_PROMPT = "a red circle above a blue square"


@dataclass(frozen=True)
class ModelSource:
    """Where the benchmarked pipeline comes from.

    kind: "preset" (random weights built from `preset`), "float-dir" or "quantized-dir" (a pipeline
    folder at `path`; quantized = its transformer/ holds an mgtq manifest). resolution: image side
    in pixels; vq_factor: pixels per token side; text_length: text tokens L. vq_channels /
    text_layers / text_heads: the random stand-in VQ and CLIP of a preset. guidance_scale: CFG of
    the sampler runs (> 1, so each transformer call is a CFG batch of 2). text_encoder: a separate
    CLIP folder for a pipeline folder without one (the official Meissonic setup). notes: said in the report.
    """

    name: str
    kind: Literal["preset", "float-dir", "quantized-dir"]
    preset: str | None = None
    path: str | None = None
    resolution: int = 64
    vq_factor: int = 4
    vq_channels: tuple[int, ...] = (16, 32, 64)
    vq_latent_channels: int = 8
    text_length: int = 32
    text_layers: int = 2
    text_heads: int = 4
    guidance_scale: float = GUIDANCE_SCALE
    text_encoder: str | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self):
        validate(self, "source")

    @property
    def folder(self) -> Path:
        """The pipeline folder: `path`, or the embedded model `path` names (reports are shared: they name an
        embedded model, not where an install keeps it)."""
        return embedded_model(self.path) if self.path in EMBEDDED_MODELS else Path(self.path)

    @property
    def slug(self) -> str:
        """File-name friendly model name (bench_<slug>.json)."""
        return Path(self.name).name.replace(" ", "_") if self.kind != "preset" else self.name

    def to_dict(self) -> dict:
        d = asdict(self)
        d["vq_channels"], d["notes"] = list(self.vq_channels), list(self.notes)
        return d

    @classmethod
    def from_dict(cls, data: dict) -> "ModelSource":
        return from_mapping(cls, data, "source")


def _meissonic_1024() -> ModelSource:
    # 1024 px, VQ f = 16 → a 64×64 token grid → 32×32 = 1024 transformer tokens after the 2× feature
    # compression; 77 CLIP tokens; the official sampler's CFG. The VQ has Meissonic's factor and
    # codebook but few channels (speed/size of the *transformer* are what this preset is about).
    return ModelSource(
        name="meissonic-1024", kind="preset", preset="meissonic-1024", resolution=1024, vq_factor=16,
        vq_channels=(32, 32, 32, 32, 32), vq_latent_channels=16, text_length=77, text_layers=2, text_heads=8,
        guidance_scale=GUIDANCE_SCALE,
        notes=("transformer: the released Meissonic-1024 config (1.0B params) with random weights, built on the "
               "meta device and filled layer by layer (speed and size do not depend on weight values)",
               "text encoder and VQ: small random stand-ins (2-layer CLIP of width 1024; VQ with f=16, 32 "
               "channels, codebook 8192) so that the whole pipeline runs at 1024×1024"),
    )


def resolve_model(name: str | Path, text_encoder: str | Path | None = None) -> ModelSource:
    """`--model` → ModelSource: an embedded model ("tiny-shapes", "tiny-shapes-16x16"), "meissonic-1024"
    or a pipeline folder (whose CLIP text encoder may be the separate folder `text_encoder`)."""
    name = str(name)
    known = ("meissonic-1024", *EMBEDDED_MODELS)
    if name in known and text_encoder is not None:
        raise ValueError(f"--text-encoder applies to pipeline folders, not to --model {name}")
    if name == "meissonic-1024":
        return _meissonic_1024()
    if name in EMBEDDED_MODELS:
        return _folder_source(embedded_model(name), display=name, shown=name)
    path = Path(name)
    if not path.is_dir():
        raise FileNotFoundError(
            f"--model {name!r} is neither a known model ({', '.join(known)}) nor a pipeline folder")
    return _folder_source(path, text_encoder=text_encoder)


def _shown(path: Path) -> str:
    """The folder as reports print it: relative to the working directory when inside it, so results
    committed from a checkout name the folder the way a user of that checkout would."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _folder_source(path: Path, display: str | None = None, text_encoder: str | Path | None = None,
                   shown: str | None = None) -> ModelSource:
    from mgtq.files import read_json
    from mgtq.pipeline import read_settings
    from mgtq.quantization import checkpoint
    from mgtq.vq import vq_factor as vq_factor_of

    if not (path / "transformer").is_dir():
        raise FileNotFoundError(f"{path} has no transformer/ folder; is it a pipeline folder?")
    settings = read_settings(path, verify=False)  # the case builders load (and check) what they read
    quantized = checkpoint.is_quantized(path / "transformer")
    tokenizer_cfg = path / "tokenizer" / "tokenizer_config.json"
    text_length = int(read_json(tokenizer_cfg).get("model_max_length", 77)) if tokenizer_cfg.exists() else 77
    vq_cfg = read_json(path / "vqvae" / "config.json")
    vq_factor = vq_factor_of(vq_cfg["block_out_channels"])
    guidance = settings.sampler.guidance_scale if settings.sampler.use_cfg else GUIDANCE_SCALE
    shown = shown or _shown(path)
    notes = [(f"embedded model {shown}" if shown in EMBEDDED_MODELS else f"pipeline folder {shown}")
             + (" (quantized transformer: its manifest says which layers are A8)" if quantized
                else " (float transformer)")]
    if not settings.sampler.use_cfg:
        notes.append(f"the checkpoint's sampler has CFG off; the benchmark uses CFG {GUIDANCE_SCALE:g} so each step "
                     "is a batch of 2")
    return ModelSource(name=display or shown, kind="quantized-dir" if quantized else "float-dir", path=shown,
                       resolution=settings.resolution, vq_factor=vq_factor, text_length=text_length,
                       guidance_scale=guidance, notes=tuple(notes),
                       text_encoder=None if text_encoder is None else _shown(Path(text_encoder)))


def transformer_config(source: ModelSource) -> dict:
    """Constructor kwargs of the source's MeissonicTransformer."""
    from mgtq.models import preset_config
    from mgtq.files import read_json

    if source.kind == "preset":
        return preset_config(source.preset)
    raw = read_json(source.folder / "transformer" / "config.json")
    return {k: v for k, v in raw.items() if not k.startswith("_") and k != "quantization_config"}


def token_grid(source: ModelSource) -> tuple[int, int]:
    """(h, w) VQ token grid of one image at the source's resolution."""
    side = source.resolution // source.vq_factor
    return side, side


def forward_inputs(source: ModelSource, dtype: torch.dtype, device: str = "cpu", batch: int = 2,
                   seed: int = 0) -> dict:
    """Keyword arguments of one transformer forward of the sampler: a CFG batch of `batch`.

    hidden_states (B, h, w) token ids (random image tokens), encoder_hidden_states (B, L, joint_dim),
    pooled_projections (B, pooled_dim), timestep (B,) in [0, 1]. Values are random (fixed seed).
    """
    config = transformer_config(source)
    h, w = token_grid(source)
    g = torch.Generator().manual_seed(seed)
    inputs = dict(
        hidden_states=torch.randint(0, config["codebook_size"], (batch, h, w), generator=g),
        encoder_hidden_states=torch.randn(batch, source.text_length, config["joint_attention_dim"], generator=g),
        pooled_projections=torch.randn(batch, config["pooled_projection_dim"], generator=g),
        timestep=torch.full((batch,), 0.5),
    )
    inputs["encoder_hidden_states"] = inputs["encoder_hidden_states"].to(dtype)
    inputs["pooled_projections"] = inputs["pooled_projections"].to(dtype)
    return {k: v.to(device) for k, v in inputs.items()}
