"""What `mgtq bench` measures, as validated dataclasses.

`BenchConfig` is the whole run (one model, many configurations); `BenchCase` is one configuration
(a format or a peer, a TomeMGT ratio, offloading on/off); `MeasureSettings` says how each case is
timed. All three are plain data that cross process boundaries as dicts (`to_dict`/`from_dict`).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mgtq.config import from_mapping

DEFAULT_FORMATS = ("fp32", "bf16", "w4a16", "w4a8", "scq")
# Opt-in: the same W4A8 layers with W4A8Linear's int8 weight cache (oneDNN prepacked) enabled:
# faster, but +1 byte per A8 weight in memory. They show what the cache trades.
CACHED_FORMATS = ("w4a8-cached", "scq-cached")
# Group-wise int4 on the W4A16 layers (`-g<columns>`, as SCQ's `qat.group_size`; A8 layers stay per
# channel): the weight-bytes and speed cost of finer scales.
GROUP_SIZES = (32, 64, 128)
GROUPED_FORMATS = tuple(f"{fmt}-g{g}" for fmt in ("w4a16", "scq") for g in GROUP_SIZES)
FORMATS = DEFAULT_FORMATS + CACHED_FORMATS + GROUPED_FORMATS
# Which blocks TomeMGT merges in (mgtq.merging): "joint" is the paper's setting (the 14 MMDiT blocks).
TOME_BLOCKS = ("joint", "single", "all")
# Paper setting for the image extrapolation: Meissonic's default sampler runs 48 steps.
EXTRAPOLATE_STEPS = 48


def _positive_int(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer ≥ {minimum}, got {value!r}")
    return value


@dataclass(frozen=True)
class MeasureSettings:
    """How one case is measured.

    warmup: untimed transformer forwards before timing (first calls pay oneDNN primitive creation,
    allocator growth). repeats: timed forwards (median, min, max reported). interleave: time them
    in rounds across the cases (A B C … A B C …, one forward per case per round, every case
    built once and held until the last round) so that the machine's drift lands on every case
    alike and ratios are taken per round; otherwise each case times all its forwards in a row. steps: sampler steps of
    the timed whole-image run (then VQ decode); per-step and 48-step extrapolations are derived.
    budget_s: stop timing forwards once this many seconds were spent on them (≥ 1 repeat always);
    None = no limit. profile: also profile one forward (time split by operator category).
    latency / memory: what to measure (memory = peak RSS and weight bytes).
    """

    warmup: int = 1
    repeats: int = 5
    steps: int = 2
    budget_s: float | None = None
    profile: bool = False
    latency: bool = True
    memory: bool = True
    interleave: bool = True

    def __post_init__(self):
        _positive_int(self.warmup, "warmup", 0)
        _positive_int(self.repeats, "repeats", 1)
        _positive_int(self.steps, "steps", 1)
        if self.budget_s is not None and not (isinstance(self.budget_s, (int, float)) and self.budget_s > 0):
            raise ValueError(f"budget_s must be a positive number of seconds or None, got {self.budget_s!r}")
        for name in ("profile", "latency", "memory", "interleave"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not (self.latency or self.memory):
            raise ValueError("nothing to measure: enable latency, memory or both")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "MeasureSettings":
        return from_mapping(cls, data, "measure")


@dataclass(frozen=True)
class BenchCase:
    """One configuration: `target` is an mgtq format (FORMATS) or a peer name (mgtq.bench.peers.PEERS).

    tome: TomeMGT ratio (0 = off; mgtq formats only); tome_blocks: where it merges ("joint" = the
    paper's setting); tome_options: any other TomeConfig fields (mgtq.merging). offload: the paper's CPU-offloading mode (transformer freed before the VQ
    decoder is loaded). compile: the transformer under torch.compile(fullgraph=True), block by block
    (compiled during the warm-up forward).
    """

    target: str
    tome: float = 0.0
    offload: bool = False
    tome_blocks: str = "joint"
    tome_options: dict = field(default_factory=dict)
    compile: bool = False

    def __post_init__(self):
        from mgtq.bench.peers import PEERS

        if self.target not in FORMATS and self.target not in PEERS:
            raise ValueError(f"unknown format or peer {self.target!r}; formats are {list(FORMATS)}, "
                             f"peers are {sorted(PEERS)}")
        if isinstance(self.tome, bool) or not isinstance(self.tome, (int, float)) or not 0 <= self.tome < 1:
            raise ValueError(f"tome ratio must be a number in [0, 1), got {self.tome!r}")
        if self.is_peer and self.tome:
            raise ValueError(f"TomeMGT is only benchmarked on mgtq formats, not on peer {self.target!r}")
        if not isinstance(self.offload, bool):
            raise ValueError(f"offload must be true or false, got {self.offload!r}")
        if not isinstance(self.compile, bool):
            raise ValueError(f"compile must be true or false, got {self.compile!r}")
        if self.tome_blocks not in TOME_BLOCKS:
            raise ValueError(f"tome_blocks must be one of {TOME_BLOCKS}, got {self.tome_blocks!r}")
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
        if self.offload:
            label += "+offload"
        if self.compile:
            label += "+compile"
        return label

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "BenchCase":
        return from_mapping(cls, data, "case")


ISOLATIONS = ("forkserver", "spawn", "none")


@dataclass(frozen=True)
class BenchConfig:
    """A whole `mgtq bench` run.

    model: "tiny-shapes", "meissonic-1024" (random weights, full size) or a pipeline folder.
    text_encoder: a separate CLIP text-encoder folder for a pipeline folder that lacks one (as
    `mgtq.load(..., text_encoder=)`).
    formats / tome / tome_blocks: every format is run at every TomeMGT ratio (ratios > 0 once per
    block set in tome_blocks), with the other TomeConfig fields in tome_options. offload: add, per format, a case in
    the CPU-offloading mode (no merging). compile: add, per format, a torch.compile-d case.
    peers: peer names to run beside (mgtq.bench.peers).
    threads: torch intra-op threads in each case (default: all cores). isolation: "forkserver"
    (fresh process per case, forked from a server that preloaded torch+mgtq), "spawn" (fresh
    interpreter per case) or "none" (in this process: fast, but peak memory is then not per case).
    json: output path of the JSON (Markdown and PNG are written beside it with the same stem).
    device: "cpu" or "cuda[:i]" (CUDA path reports torch.cuda peak memory; untested here).
    seed: random weights, the SCQ third and the inputs.
    """

    model: str = "tiny-shapes"
    text_encoder: str | None = None
    formats: tuple[str, ...] = DEFAULT_FORMATS
    tome: tuple[float, ...] = (0.0,)
    tome_blocks: tuple[str, ...] = ("joint",)
    tome_options: dict = field(default_factory=dict)
    offload: bool = False
    compile: bool = False
    peers: tuple[str, ...] = ()
    measure: MeasureSettings = field(default_factory=MeasureSettings)
    threads: int | None = None
    isolation: str = "forkserver"
    json: str | None = None
    device: str = "cpu"
    seed: int = 0

    def __post_init__(self):
        from mgtq.bench.peers import PEERS

        object.__setattr__(self, "formats", tuple(self.formats))
        object.__setattr__(self, "tome", tuple(float(t) for t in self.tome))
        object.__setattr__(self, "peers", tuple(self.peers))
        object.__setattr__(self, "tome_blocks", tuple(self.tome_blocks))
        if not isinstance(self.measure, MeasureSettings):
            object.__setattr__(self, "measure", MeasureSettings.from_dict(self.measure))
        if not self.formats and not self.peers:
            raise ValueError("nothing to benchmark: give at least one format or peer")
        bad = [f for f in self.formats if f not in FORMATS]
        if bad:
            raise ValueError(f"unknown format(s) {bad}; choose from {list(FORMATS)}")
        if len(set(self.formats)) != len(self.formats):
            raise ValueError(f"formats listed twice: {list(self.formats)}")
        bad = [p for p in self.peers if p not in PEERS]
        if bad:
            raise ValueError(f"unknown peer(s) {bad}; choose from {sorted(PEERS)}")
        if not self.tome or any(not (0 <= t < 1) or math.isnan(t) for t in self.tome):
            raise ValueError(f"tome ratios must be in [0, 1), got {list(self.tome)}")
        bad = [b for b in self.tome_blocks if b not in TOME_BLOCKS]
        if bad or not self.tome_blocks:
            raise ValueError(f"tome_blocks must be a non-empty list of {TOME_BLOCKS}, got {list(self.tome_blocks)}")
        _check_tome_options(self.tome_options)
        if self.threads is not None:
            _positive_int(self.threads, "threads")
        if self.isolation not in ISOLATIONS:
            raise ValueError(f"isolation must be one of {ISOLATIONS}, got {self.isolation!r}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device must be 'cpu' or 'cuda[:i]', got {self.device!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")

    @property
    def num_threads(self) -> int:
        return self.threads or os.cpu_count() or 1

    def cases(self) -> list[BenchCase]:
        """Every format at every ratio (× block set), then the offload and compiled cases, then the peers."""
        cases = [BenchCase(f, tome=t, tome_blocks=b, tome_options=dict(self.tome_options) if t else {})
                 for f in self.formats for t in self.tome for b in (self.tome_blocks if t else ("joint",))]
        if self.offload:
            cases += [BenchCase(f, offload=True) for f in self.formats]
        if self.compile:
            cases += [BenchCase(f, compile=True) for f in self.formats]
        cases += [BenchCase(p) for p in self.peers]
        return cases

    def output_paths(self, model_slug: str) -> dict[str, Path]:
        """{"json", "md", "png"}: default benchmarks/results/bench_<model>.*, or beside `json`."""
        json_path = Path(self.json) if self.json else Path("benchmarks") / "results" / f"bench_{model_slug}.json"
        return {"json": json_path, "md": json_path.with_suffix(".md"), "png": json_path.with_suffix(".png")}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["measure"] = self.measure.to_dict()
        d["formats"], d["tome"], d["peers"] = list(self.formats), list(self.tome), list(self.peers)
        d["tome_blocks"] = list(self.tome_blocks)
        return d


def _check_tome_options(options: dict) -> None:
    """TomeConfig fields other than ratio/blocks/seed (validated by TomeConfig itself, unknown keys named)."""
    from mgtq.merging import TomeConfig

    if not isinstance(options, dict):
        raise ValueError(f"tome_options must be a mapping of TomeConfig fields, got {options!r}")
    taken = sorted({"ratio", "blocks", "seed"} & set(options))
    if taken:
        raise ValueError(f"tome_options may not set {taken}: use tome / tome_blocks")
    TomeConfig.from_dict(options)
