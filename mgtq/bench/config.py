"""What `mgtq bench` measures, as validated dataclasses.

`BenchConfig` is the whole run (one model, many cases); `BenchCase` is one case (a format or a peer, a
TomeMGT ratio, offloading, compiling); `MeasureSettings` says how each case is measured. All three
cross process boundaries as dicts (`to_dict` / `from_dict`).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, get_args

from mgtq.bench.formats import DEFAULT_FORMATS, FORMATS, Format
from mgtq.config import from_mapping, validate
from mgtq.merging.patch import BLOCK_SET_NAMES, BlockSet
from mgtq.reuse.config import ReuseConfig
from mgtq.sampling.config import SamplerConfig
from mgtq.sampling.presets import PRESET_NAMES

# How cases are kept apart: a fresh process per case, or none; "forkserver" is deprecated and runs as "spawn".
Isolation = Literal["spawn", "none", "forkserver"]
ISOLATIONS = get_args(Isolation)
# Meissonic's default sampler runs 48 steps: whole-image times are also extrapolated to that many.
EXTRAPOLATE_STEPS = SamplerConfig.num_steps


@dataclass(frozen=True)
class MeasureSettings:
    """How one case is measured.

    warmup: untimed forwards before timing (the first compiles, creates oneDNN primitives, grows the
    allocator). repeats: timed forwards. interleave: time them in rounds across the cases (A B C …
    A B C …, every case built once and held until the last round) so that drift of the machine
    lands on every case alike; else each case times all its forwards in a row. steps: sampler steps
    of the timed whole-image run. sampler: a sampler preset (mgtq.sampling.presets, e.g. "fast") the whole
    image runs with, on top of the model's sampler settings (None: those as they are). reuse: the whole
    image's context reuse (mgtq.reuse), replacing the sampler's (None: the preset's, or the model's).
    Forwards are always timed as plain full forwards (every token, no cache): sampler and reuse only
    change the whole image. budget_s: stop timing a case's forwards after this many seconds
    (at least one always runs). profile: also profile one forward (needs a checkout: benchmarks/
    bench_profile.py). latency / memory: what to measure (memory = peak RSS and weight bytes).
    """

    warmup: int = 1
    repeats: int = 5
    steps: int = 2
    sampler: str | None = None
    reuse: ReuseConfig | None = None
    budget_s: float | None = None
    profile: bool = False
    latency: bool = True
    memory: bool = True
    interleave: bool = True

    def __post_init__(self):
        validate(self, "measure")
        for name, minimum in (("warmup", 0), ("repeats", 1), ("steps", 1)):
            if getattr(self, name) < minimum:
                raise ValueError(f"measure.{name} must be an integer ≥ {minimum}, got {getattr(self, name)}")
        if self.sampler is not None and self.sampler not in PRESET_NAMES:
            raise ValueError(f"measure.sampler must be a sampler preset, one of {PRESET_NAMES}, got {self.sampler!r}")
        if self.budget_s is not None and self.budget_s <= 0:
            raise ValueError(f"measure.budget_s must be a positive number of seconds or None, got {self.budget_s}")
        if not (self.latency or self.memory):
            raise ValueError("nothing to measure: enable latency, memory or both")

    def image_sampler(self, base):
        """The whole image's SamplerConfig: `base` (the model's, at `steps` steps) under the preset, then `reuse`."""
        sampler = base if self.sampler is None else base.preset(self.sampler)
        return sampler if self.reuse is None else sampler.replace(reuse=self.reuse)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "MeasureSettings":
        return from_mapping(cls, data, "measure")


@dataclass(frozen=True)
class BenchCase:
    """One case: `target` is a format (mgtq.bench.formats) or a peer (benchmarks/bench_peers.py).

    tome: TomeMGT ratio (0 = off; formats only), merging in `tome_blocks` with the other TomeConfig
    fields in `tome_options`. offload: the paper's CPU-offloading mode (the transformer is freed before
    the VQ decoder loads). compile: every transformer block under torch.compile(fullgraph=True).
    """

    target: str
    tome: float = 0.0
    offload: bool = False
    tome_blocks: BlockSet = "joint"
    tome_options: dict = field(default_factory=dict)
    compile: bool = False

    def __post_init__(self):
        validate(self, "case")
        if self.is_peer:
            check_peers((self.target,))
        if not 0 <= self.tome < 1:
            raise ValueError(f"tome ratio must be a number in [0, 1), got {self.tome!r}")
        if self.is_peer and self.tome:
            raise ValueError(f"TomeMGT is only benchmarked on mgtq formats, not on peer {self.target!r}")
        _check_tome_options(self.tome_options)

    @property
    def is_peer(self) -> bool:
        return self.target not in FORMATS

    @property
    def label(self) -> str:
        """Stable name used in tables and JSON: "scq", "scq+tome0.5", "scq+tome0.5-all", "bf16+offload"."""
        label = self.target
        if self.tome:
            label += f"+tome{self.tome:g}" + ("" if self.tome_blocks == "joint" else f"-{self.tome_blocks}")
        return label + "+offload" * self.offload + "+compile" * self.compile

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "BenchCase":
        return from_mapping(cls, data, "case")


@dataclass(frozen=True)
class BenchConfig:
    """A whole `mgtq bench` run.

    model: "tiny-shapes", "meissonic-1024" (random weights, full size) or a pipeline folder, whose CLIP
    may be the separate folder `text_encoder`. Every format runs at every TomeMGT ratio (ratios > 0
    once per block set in tome_blocks, with tome_options). offload / compile: add, per format, a case
    in that mode. peers: peer names run beside (benchmarks/bench_peers.py, from a checkout).
    threads: torch threads per case (default all cores). isolation: "spawn" (a fresh process per case,
    so its peak memory is its own) or "none" (all in this process: fast, peaks not per case).
    json: output path (default bench_<model>.json here; the Markdown beside it). device: "cpu" or
    "cuda[:i]". seed: random weights, the SCQ third and the inputs.
    """

    model: str = "tiny-shapes"
    text_encoder: str | None = None
    formats: tuple[str, ...] = DEFAULT_FORMATS
    tome: tuple[float, ...] = (0.0,)
    tome_blocks: tuple[BlockSet, ...] = ("joint",)
    tome_options: dict = field(default_factory=dict)
    offload: bool = False
    compile: bool = False
    peers: tuple[str, ...] = ()
    measure: MeasureSettings = field(default_factory=MeasureSettings)
    threads: int | None = None
    isolation: Isolation = "spawn"
    json: str | None = None
    device: str = "cpu"
    seed: int = 0

    def __post_init__(self):
        validate(self, "bench")
        if self.isolation == "forkserver":
            warnings.warn('isolation "forkserver" is deprecated and runs as "spawn"', DeprecationWarning, stacklevel=3)
            object.__setattr__(self, "isolation", "spawn")
        if not self.formats and not self.peers:
            raise ValueError("nothing to benchmark: give at least one format or peer")
        for name in self.formats:
            Format.parse(name)
        if len(set(self.formats)) != len(self.formats):
            raise ValueError(f"formats listed twice: {list(self.formats)}")
        check_peers(self.peers)
        if not self.tome or not all(0 <= t < 1 for t in self.tome):
            raise ValueError(f"tome ratios must be in [0, 1), got {list(self.tome)}")
        if not self.tome_blocks:
            raise ValueError(f"tome_blocks must name at least one of {', '.join(BLOCK_SET_NAMES)}")
        _check_tome_options(self.tome_options)
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be an integer ≥ 1, got {self.threads}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device must be 'cpu' or 'cuda[:i]', got {self.device!r}")

    @property
    def num_threads(self) -> int:
        return self.threads or os.cpu_count() or 1

    def cases(self) -> list[BenchCase]:
        """Every format at every ratio (× block set), then the offload and compiled cases, then the peers, compiled
        too with `compile` (torchao's CPU int8 path is written for Inductor: eager alone would understate it)."""
        cases = [BenchCase(f, tome=t, tome_blocks=b, tome_options=dict(self.tome_options) if t else {})
                 for f in self.formats for t in self.tome for b in (self.tome_blocks if t else ("joint",))]
        cases += [BenchCase(f, offload=True) for f in self.formats if self.offload]
        cases += [BenchCase(f, compile=True) for f in self.formats if self.compile]
        cases += [BenchCase(p) for p in self.peers]
        return cases + [BenchCase(p, compile=True) for p in self.peers if self.compile]

    def output_paths(self, model_slug: str) -> dict[str, Path]:
        """{"json", "md"}: `json` and the Markdown beside it; default bench_<model>.json in the working folder."""
        json_path = Path(self.json or f"bench_{model_slug}.json")
        return {"json": json_path, "md": json_path.with_suffix(".md")}

    def to_dict(self) -> dict:
        return {**asdict(self), "measure": self.measure.to_dict(), "formats": list(self.formats),
                "tome": list(self.tome), "peers": list(self.peers), "tome_blocks": list(self.tome_blocks)}


def check_peers(names: tuple[str, ...]) -> None:
    """Unknown peer names are an error; any peer needs benchmarks/bench_peers.py (a checkout)."""
    if not names:
        return
    from mgtq.bench.lab import load_lab

    known = load_lab("peers").PEERS
    bad = [name for name in names if name not in known]
    if bad:
        raise ValueError(f"unknown peer(s) {bad}; peers are {sorted(known)}, formats are {list(FORMATS)}")


def _check_tome_options(options: dict) -> None:
    """TomeConfig fields other than ratio/blocks/seed (validated by TomeConfig itself, unknown keys named)."""
    from mgtq.merging import TomeConfig

    taken = sorted({"ratio", "blocks", "seed"} & set(options))
    if taken:
        raise ValueError(f"tome_options may not set {taken}: use tome / tome_blocks")
    TomeConfig.from_dict(options)
