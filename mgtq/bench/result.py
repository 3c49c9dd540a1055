"""`CaseResult`: the one record of what a benchmark case measured (the "results" entries of the JSON).

Sub-records (bytes and seconds everywhere):
    weights  {unit: "bytes", transformer_bytes, method, storage_bytes, linear_layers {class: n}}
    memory   {unit: "bytes", peak_rss_build, rss_after_build (after gc + returning freed heap to the OS:
              heap_trimmed_after_build), peak_rss_inference (peak after that, reset), peak_rss_process
              (whole process: max of the build peak and the phase peaks), peak_reset_supported,
              phase_peaks {forwards, sampling, decode: peak RSS of that phase alone (offload: decode
              includes the VQ load)}, [cuda_build / cuda_inference {max_memory_reserved,
              max_memory_allocated}]}
    latency  {unit: "s", forward_batch, warmup_s [wall s of each untimed warm-up forward; with compile the
              first one includes compiling], forward {median, min, max, samples (wall s), cpu_median,
              cpu_samples (process CPU s), rounds (interleaved round of each sample, or null)} | null, image {steps, nfe, local_nfe (local steps of context
              reuse), token_nfe, reuse (the ReuseConfig the image ran with), text_s, tokens_s, per_step_s,
              decode_s, vq_load_s, total_s, transformer_calls_s, transformer_calls_cpu_s,
              extrapolated_steps, extrapolated_total_s (null with context reuse unless steps = 48)}}
    profile  null | {unit: "s", clock ("cpu" | "cuda": whose time), total_self_s, split_s {category: s}, split_fraction,
              top_ops}
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from mgtq.config import from_mapping

MB = 1e6


@dataclass
class CaseResult:
    """One case: which configuration (label … offload), how it went (status, message), what was measured.

    kind: "mgtq" or "peer"; family: "mgtq", "optimum-quanto" or "torchao"; scheme: what the format
    does, in words. status "skipped" (a peer that does not run here) and "failed" carry a message.
    build_s: building the pipeline; quantize_s: a peer's quantize + calibrate + freeze.
    transformer_freed_before_decode: offload cases only.
    """

    label: str
    target: str
    kind: Literal["mgtq", "peer"]
    family: str | None = None
    scheme: str | None = None
    tome: float = 0.0
    tome_blocks: str = "joint"
    offload: bool = False
    compile: bool = False
    status: Literal["ok", "skipped", "failed"] = "ok"
    message: str | None = None
    notes: list[str] = field(default_factory=list)
    weights: dict[str, Any] | None = None
    memory: dict[str, Any] | None = None
    latency: dict[str, Any] | None = None
    profile: dict[str, Any] | None = None
    build_s: float | None = None
    quantize_s: float | None = None
    wall_s: float | None = None
    loadavg: dict[str, Any] | None = None
    transformer_freed_before_decode: bool | None = None

    def __post_init__(self):
        if self.status != "ok" and not self.message:
            raise ValueError(f"result {self.label!r} is {self.status} without a message")
        if self.status == "ok" and self.weights is not None and not isinstance(self.weights.get("transformer_bytes"),
                                                                                int):
            raise ValueError(f"result {self.label!r}: weights.transformer_bytes must be integer bytes")

    @classmethod
    def of(cls, case, status: str = "ok", message: str | None = None, family: str | None = None) -> "CaseResult":
        """An empty result for `case` (a mgtq.bench.config.BenchCase)."""
        return cls(label=case.label, target=case.target, kind="peer" if case.is_peer else "mgtq",
                   family=family or (None if case.is_peer else "mgtq"), tome=case.tome,
                   tome_blocks=case.tome_blocks, offload=case.offload, compile=case.compile, status=status,
                   message=message)

    @classmethod
    def from_dict(cls, data: dict) -> "CaseResult":
        return from_mapping(cls, data, f"result {data.get('label')!r}" if isinstance(data, dict) else "result")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # ---------------------------------------------------------------------------- headline numbers
    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def weight_bytes(self) -> int | None:
        return (self.weights or {}).get("transformer_bytes")

    @property
    def peak_rss(self) -> int | None:
        return (self.memory or {}).get("peak_rss_process")

    @property
    def forward(self) -> dict | None:
        return (self.latency or {}).get("forward")

    @property
    def forward_median(self) -> float | None:
        return self.forward["median"] if self.forward else None

    @property
    def forward_cpu_median(self) -> float | None:
        return self.forward.get("cpu_median") if self.forward else None

    @property
    def image(self) -> dict | None:
        return (self.latency or {}).get("image")

    @property
    def per_step(self) -> float | None:
        return self.image["per_step_s"] if self.image else None

    @property
    def image_total(self) -> float | None:
        return self.image["total_s"] if self.image else None

    def one_line(self) -> str:
        """The headline numbers, for progress logs."""
        if not self.ok:
            return f"{self.label}: {self.status} — {message_line(self.message)}"
        parts = [f"weights {mb_text(self.weight_bytes)} MB", f"peak RSS {mb_text(self.peak_rss)} MB"]
        if self.forward_median is not None:
            parts.append(f"forward {self.forward_median:.3g} s")
        if self.per_step is not None:
            parts.append(f"step {self.per_step:.3g} s")
        return f"{self.label}: " + ", ".join(parts)


def mb_text(x) -> str:
    """Bytes as whole megabytes with thousands separators ("–" for unknown)."""
    return "–" if x is None else f"{x / MB:,.0f}"


def message_line(message: str) -> str:
    """A failure message in one line: a traceback's last line (the error and what to do), else its first line."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if not lines:
        return ""
    if "Traceback (most recent call last)" in lines[0]:
        head = lines[0].split("Traceback (most recent call last)")[0].strip()
        return f"{head} {lines[-1]}".strip()
    return lines[0]
