"""ShapeBench scorer: decides from the pixels alone whether an image matches a caption.

Pipeline (all deterministic numpy):

1. colour segmentation: each pixel takes the nearest of the palette colours and the background
   (RGB distance); pixels farther than ``colour_threshold`` from all of them — blurred edges,
   noise, colour mixtures — are left unassigned;
2. 8-connected components per colour; blobs smaller than ``min_area`` px are ignored;
3. shape: IoU of the blob with a circle / square / apex-up triangle template fitted to the blob's
   bounding box (≈ fill ratios 0.785 / 1 / 0.5, but using where the pixels are, not just how many),
   "unknown" below ``min_shape_iou`` or for elongated boxes;
4. location: centre of the bounding box (the world's notion of a shape's centre);
5. the caption's :class:`~mgtq.shapes.world.Spec` is checked against the detections: every
   described object present, exact counts for counting, regions and relations with a margin, and
   (by default) no extra objects — captions in this world describe the whole scene.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .world import BACKGROUND, COLOURS, IMAGE_SIZE, PALETTE, SHAPES, Spec, parse_prompt


@dataclass(frozen=True)
class ScorerConfig:
    """Tolerances of the scorer (pixel units refer to a 64×64 image).

    colour_threshold: max RGB distance from a palette/background colour for a pixel to count
        (palette colours are ≥ 144 apart, so 70 never makes a pixel ambiguous).
    min_area: blobs with fewer pixels are noise (the smallest world shape has ≈ 98 px).
    min_shape_iou: best template IoU below this → shape "unknown".
    max_aspect: bounding boxes more elongated than this → shape "unknown" (world shapes are 1:1).
    position_margin: "on the left" means centre x < W/2 − margin (the world places it ≤ 20).
    relation_margin: "A left of B" means cx(B) − cx(A) ≥ margin (the world guarantees ≥ 18).
    allow_extra_objects: if False, any detected object not described by the caption fails it.
    """

    colour_threshold: float = 70.0
    min_area: int = 20
    min_shape_iou: float = 0.6
    max_aspect: float = 1.6
    position_margin: float = 4.0
    relation_margin: float = 4.0
    allow_extra_objects: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.colour_threshold < 255 * 3**0.5:
            raise ValueError(f"colour_threshold must be in (0, 441), got {self.colour_threshold}")
        if self.min_area < 1:
            raise ValueError(f"min_area must be ≥ 1 px, got {self.min_area}")
        if not 0 < self.min_shape_iou <= 1:
            raise ValueError(f"min_shape_iou must be in (0, 1], got {self.min_shape_iou}")
        if self.max_aspect < 1:
            raise ValueError(f"max_aspect must be ≥ 1, got {self.max_aspect}")
        if self.position_margin < 0 or self.relation_margin < 0:
            raise ValueError("position_margin and relation_margin must be ≥ 0")


@dataclass(frozen=True)
class Detection:
    """One detected blob. ``box`` = (x0, y0, x1, y1), x1/y1 exclusive; ``centre`` = box centre."""

    colour: str
    shape: str
    centre: tuple[float, float]
    box: tuple[int, int, int, int]
    area: int
    fill: float
    shape_iou: dict[str, float]

    def summary(self) -> str:
        return f"{self.colour} {self.shape} @({self.centre[0]:.1f},{self.centre[1]:.1f})"


# --------------------------------------------------------------------------------------------
# Pixels → detections
# --------------------------------------------------------------------------------------------


def to_uint8_rgb(image) -> np.ndarray:
    """Accept a PIL image or an (H, W, 3) array (uint8, or float in [0, 1]); return uint8 (64, 64, 3).

    Images of another size are resized to 64×64 (bilinear) because all tolerances are in 64 px units.
    """
    from PIL import Image

    if isinstance(image, Image.Image):
        arr = np.asarray(image.convert("RGB"))
    else:
        arr = np.asarray(image)
        if arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) image, got shape {arr.shape}")
        if arr.dtype != np.uint8:
            arr = np.clip(np.round(arr.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    if arr.shape[:2] != (IMAGE_SIZE, IMAGE_SIZE):
        arr = np.asarray(Image.fromarray(arr).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR))
    return arr


def colour_labels(image: np.ndarray, threshold: float) -> np.ndarray:
    """Per-pixel label (H, W) int: -1 unassigned, 0 background, k ≥ 1 → COLOURS[k-1]."""
    refs = np.array([BACKGROUND, *(PALETTE[c] for c in COLOURS)], dtype=np.float64)  # (K, 3)
    dist = np.linalg.norm(image.astype(np.float64)[:, :, None, :] - refs[None, None], axis=-1)
    labels = dist.argmin(-1)
    labels[dist.min(-1) > threshold] = -1
    return labels


def connected_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of a bool mask (H, W) → (labels (H, W) int, 0 = off, 1..n; n).

    Min-label propagation: every pixel repeatedly takes the smallest label in its 3×3 window until
    nothing changes (≤ a few dozen vectorised passes on 64×64 blobs).
    """
    h, w = mask.shape
    off = h * w + 1
    labels = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), off)
    while True:
        padded = np.pad(labels, 1, constant_values=off)
        window_min = np.min(
            [padded[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)], axis=0
        )
        updated = np.where(mask, window_min, off)
        if np.array_equal(updated, labels):
            break
        labels = updated
    roots = np.unique(labels[mask])
    out = np.zeros((h, w), dtype=np.int64)
    out[mask] = np.searchsorted(roots, labels[mask]) + 1
    return out, len(roots)


def shape_templates(width: int, height: int) -> dict[str, np.ndarray]:
    """Bool templates (height, width) of each world shape inscribed in a width×height box."""
    v, u = np.mgrid[0:height, 0:width]
    u = (u + 0.5) / width  # pixel centres in [0, 1]
    v = (v + 0.5) / height
    return {
        "circle": (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25,
        "square": np.ones((height, width), dtype=bool),
        "triangle": np.abs(u - 0.5) <= v / 2,
    }


def classify_blob(blob: np.ndarray, config: ScorerConfig) -> tuple[str, dict[str, float], float]:
    """Shape of a blob cropped to its bounding box (bool (h, w)) → (shape, IoU per shape, fill)."""
    h, w = blob.shape
    fill = float(blob.mean())
    ious = {}
    for name, tpl in shape_templates(w, h).items():
        ious[name] = float((blob & tpl).sum() / (blob | tpl).sum())
    best = max(SHAPES, key=lambda s: ious[s])
    if ious[best] < config.min_shape_iou or max(h, w) > config.max_aspect * min(h, w):
        best = "unknown"
    return best, ious, fill


def detect_objects(image, config: ScorerConfig = ScorerConfig()) -> list[Detection]:
    """All coloured blobs of ``image`` (see :func:`to_uint8_rgb` for accepted inputs), sorted by
    (colour, y, x) so the output is deterministic."""
    pixels = to_uint8_rgb(image)
    labels = colour_labels(pixels, config.colour_threshold)
    found = []
    for k, colour in enumerate(COLOURS, start=1):
        mask = labels == k
        if mask.sum() < config.min_area:
            continue
        comps, n = connected_components(mask)
        for i in range(1, n + 1):
            blob = comps == i
            area = int(blob.sum())
            if area < config.min_area:
                continue
            ys, xs = np.nonzero(blob)
            x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
            shape, ious, fill = classify_blob(blob[y0:y1, x0:x1], config)
            centre = ((x0 + x1) / 2.0, (y0 + y1) / 2.0)
            found.append(Detection(colour, shape, centre, (x0, y0, x1, y1), area, fill, ious))
    return sorted(found, key=lambda d: (d.colour, d.centre[1], d.centre[0]))


# --------------------------------------------------------------------------------------------
# Detections + spec → verdict
# --------------------------------------------------------------------------------------------


def _in_region(d: Detection, region: str, margin: float) -> bool:
    half = IMAGE_SIZE / 2.0
    cx, cy = d.centre
    return {
        "left": cx < half - margin,
        "right": cx > half + margin,
        "top": cy < half - margin,
        "bottom": cy > half + margin,
    }[region]


def _relation(a: Detection, b: Detection, relation: str, margin: float) -> bool:
    (ax, ay), (bx, by) = a.centre, b.centre
    return {
        "left_of": bx - ax >= margin,
        "right_of": ax - bx >= margin,
        "above": by - ay >= margin,
        "below": ay - by >= margin,
    }[relation]


def check_spec(spec: Spec, detections: Sequence[Detection], config: ScorerConfig = ScorerConfig()) -> str | None:
    """Why ``detections`` do not satisfy ``spec`` (a short reason), or None if they do."""
    wanted = Counter((o.colour, o.shape) for o in spec.objects)
    have = Counter((d.colour, d.shape) for d in detections)
    for (colour, shape), n in wanted.items():
        if spec.category == "counting" and have[(colour, shape)] != n:
            return f"wrong count: found {have[(colour, shape)]} {colour} {shape}s, need {n}"
        if have[(colour, shape)] < n:
            return f"missing: found {have[(colour, shape)]} {colour} {shape}(s), need {n}"
    if not config.allow_extra_objects and len(detections) != len(spec.objects):
        return f"extra objects: found {len(detections)}, caption describes {len(spec.objects)}"

    def matches(i: int) -> list[Detection]:
        o = spec.objects[i]
        return [d for d in detections if (d.colour, d.shape) == (o.colour, o.shape)]

    if spec.region is not None:
        if not any(_in_region(d, spec.region, config.position_margin) for d in matches(0)):
            return f"wrong position: no {spec.objects[0].colour} {spec.objects[0].shape} clearly {spec.region}"
    if spec.relation is not None:
        pairs = ((a, b) for a in matches(0) for b in matches(1) if a is not b)
        if not any(_relation(a, b, spec.relation, config.relation_margin) for a, b in pairs):
            return f"wrong relation: objects are not clearly {spec.relation}"
    return None


def score_image(image, prompt: str | Spec, config: ScorerConfig = ScorerConfig()) -> tuple[bool, dict]:
    """Does ``image`` show what ``prompt`` says? Reads only the pixels.

    Returns (ok, details) with details = {"reason": str | None, "category": str,
    "detections": [Detection.summary(), ...]}.
    """
    spec = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    detections = detect_objects(image, config)
    reason = check_spec(spec, detections, config)
    return reason is None, {
        "reason": reason,
        "category": spec.category,
        "detections": [d.summary() for d in detections],
    }


def evaluate(images: Sequence, prompts: Sequence, config: ScorerConfig = ScorerConfig()) -> dict:
    """Score ``images[i]`` against ``prompts[i]`` (str or ShapeBenchPrompt) and aggregate.

    Returns {"overall": accuracy, "per_category": {category: accuracy}, "n": count,
    "per_prompt": [{"prompt", "category", "seed", "ok", "reason", "detections"}, ...]}.
    """
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
    rows = []
    for image, item in zip(images, prompts):
        text = item if isinstance(item, str) else item.prompt
        ok, details = score_image(image, text, config)
        rows.append(
            {
                "prompt": text,
                "category": details["category"],
                "seed": getattr(item, "seed", None),
                "ok": ok,
                "reason": details["reason"],
                "detections": details["detections"],
            }
        )
    per_category: dict[str, list[bool]] = {}
    for row in rows:
        per_category.setdefault(row["category"], []).append(row["ok"])
    n = len(rows)
    return {
        "overall": sum(r["ok"] for r in rows) / n if n else 0.0,
        "per_category": {c: sum(v) / len(v) for c, v in per_category.items()},
        "n": n,
        "per_prompt": rows,
    }
