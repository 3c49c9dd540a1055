"""The formats `mgtq bench` builds the transformer in: the one place their names are parsed and described.

A name is a base format (BASES), or a base with one suffix: a W4A16 group size (`scq-g64`) or the int8
weight cache (`w4a8-cached`); HELP says what each does. Non-Linear parts stay bf16 in every format but fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

BASES = {
    "fp32": "fp32 weights and activations",
    "bf16": "bf16 weights and activations",
    "w4a16": "every Linear W4Linear (int4 per-channel weights, bf16 activations)",
    "w4a8": "every Linear W4A8Linear (int4 weights, static int8 activations, int8 GEMM)",
    "scq": "SCQ — a third of the Linears W4A8, the rest W4A16",
}
# The suffixes and the bases they apply to (HELP says what they do; the group size is SCQ's `qat.group_size`).
GROUP_SIZES = (32, 64, 128)
GROUPED = ("w4a16", "scq")
CACHED = ("w4a8", "scq")
DEFAULT_FORMATS = ("fp32", "bf16", "w4a16", "w4a8", "scq")
FORMATS = (DEFAULT_FORMATS + tuple(f"{base}-cached" for base in CACHED)
           + tuple(f"{base}-g{g}" for base in GROUPED for g in GROUP_SIZES))
HELP = (f"comma list of {', '.join(DEFAULT_FORMATS)}; -g{'/-g'.join(map(str, GROUP_SIZES))} on "
        f"{' and '.join(GROUPED)}: W4A16 layers in groups of that many input columns; -cached on "
        f"{' and '.join(CACHED)}: the opt-in int8 weight cache of the W4A8 layers (+1 byte per A8 weight). On "
        "random weights scq's third is a seeded random third; a quantized folder's scq is the checkpoint as exported")


@dataclass(frozen=True)
class Format:
    """A parsed format name: `base` (BASES), `group_size` of the W4A16 layers (None = per channel), `cached`."""

    name: str
    base: str
    group_size: int | None = None
    cached: bool = False

    @classmethod
    def parse(cls, name: str) -> "Format":
        if name not in FORMATS:
            raise ValueError(f"unknown format {name!r}; choose from {list(FORMATS)}")
        base, _, group = name.removesuffix("-cached").partition("-g")
        return cls(name, base, int(group) if group else None, name.endswith("-cached"))

    @property
    def is_float(self) -> bool:
        return self.base in ("fp32", "bf16")

    @property
    def float_dtype(self) -> str:
        """dtype of the float parts: fp32 for "fp32", bf16 for every other format."""
        return "fp32" if self.base == "fp32" else "bf16"

    @property
    def scheme(self) -> str:
        """What the format does, in words (the report's "Schemes")."""
        text = f"mgtq: {BASES[self.base]}"
        if self.group_size:
            text += f"; W4A16 layers in groups of {self.group_size} input columns"
        if self.cached:
            text += ("; the opt-in int8 weight cache on its W4A8 layers (oneDNN's prepacked layout on amx-int8 CPUs, "
                     "the plain int8 weight elsewhere: mgtq.quantization.kernels.weight_cache_backend)")
        return text
