"""The procedural shapes world: scenes, their 64×64 renderings and their captions.

A :class:`Scene` is the single source of truth: the image (:func:`render`) and the caption
(:func:`caption`) are both pure functions of it, and :func:`parse_prompt` maps a caption back to the
:class:`Spec` (the constraints a caption states) that produced it. Everything is deterministic: the
only randomness is a ``numpy.random.Generator`` (or an int seed) passed in by the caller.

Design choices that make scoring robust after a lossy VQ round trip:

* flat colours, no anti-aliasing, one fixed light-grey background;
* six palette colours whose pairwise RGB distances are all ≥ 144 (and ≥ 240 from the background);
* shapes never touch: their bounding boxes are at least :data:`MIN_GAP` px apart;
* every position a caption states holds with a clear margin (see :data:`REGION_LIMIT` and
  :func:`relation_holds`), so a blurred or slightly shifted image still satisfies it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

import numpy as np

IMAGE_SIZE = 64
BACKGROUND: tuple[int, int, int] = (240, 240, 240)

# Chosen by hand for separation: min pairwise RGB distance 144 (blue–cyan), ≥ 240 to BACKGROUND.
PALETTE: Mapping[str, tuple[int, int, int]] = MappingProxyType(
    {
        "red": (220, 30, 30),
        "green": (30, 160, 50),
        "blue": (30, 60, 230),
        "yellow": (245, 215, 0),
        "purple": (160, 40, 170),
        "cyan": (0, 200, 220),
    }
)
COLOURS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Edge lengths in px (a shape is drawn inside a size×size box). ≥14 keeps triangles recognisable
# after an f=4 VQ round trip; ≤22 leaves room for three shapes in 64 px.
SIZES: tuple[int, ...] = (14, 18, 22)
CATEGORIES: tuple[str, ...] = ("single", "colour", "position", "two_objects", "counting")
REGIONS: tuple[str, ...] = ("left", "right", "top", "bottom")
RELATIONS: tuple[str, ...] = ("left_of", "right_of", "above", "below")
COUNTS: tuple[int, ...] = (2, 3)

MIN_GAP = 4  # px between the bounding boxes of any two shapes
BORDER = 2  # px between any shape and the image edge
# A shape "on the left" has its centre at x ≤ REGION_LIMIT (and "on the right" at x ≥ 64 − that):
# 12 px away from the image's centre line, so a scorer may use a much looser threshold.
REGION_LIMIT = 20.0
# Two-object relations: the boxes are fully separated along the stated axis (plus MIN_GAP) and the
# offset along the other axis is at most this fraction of the offset along the stated one.
RELATION_DOMINANCE = 0.5
MAX_LAYOUT_TRIES = 5000

_REGION_PHRASES: Mapping[str, str] = MappingProxyType(
    {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}
)
_RELATION_PHRASES: Mapping[str, str] = MappingProxyType(
    {"left_of": "to the left of", "right_of": "to the right of", "above": "above", "below": "below"}
)
_NUMBER_WORDS: Mapping[int, str] = MappingProxyType({2: "two", 3: "three"})


# --------------------------------------------------------------------------------------------
# Structured scene description
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectSpec:
    """One described object: a colour name from :data:`COLOURS` and a shape from :data:`SHAPES`."""

    colour: str
    shape: str

    def __post_init__(self) -> None:
        if self.colour not in PALETTE:
            raise ValueError(f"unknown colour {self.colour!r}; expected one of {COLOURS}")
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; expected one of {SHAPES}")


@dataclass(frozen=True)
class Spec:
    """What a caption states. ``objects`` lists every object (a count of N is N equal entries).

    * ``single``: 1 object.
    * ``colour``: 2 objects with different colours (attribute binding, no relation).
    * ``position``: 1 object and a ``region`` from :data:`REGIONS`.
    * ``two_objects``: 2 different objects and a ``relation`` (objects[0] <relation> objects[1]).
    * ``counting``: N ∈ :data:`COUNTS` identical objects.
    """

    category: str
    objects: tuple[ObjectSpec, ...]
    region: str | None = None
    relation: str | None = None

    def __post_init__(self) -> None:
        if self.category not in CATEGORIES:
            raise ValueError(f"unknown category {self.category!r}; expected one of {CATEGORIES}")
        objs = tuple(self.objects)
        object.__setattr__(self, "objects", objs)
        if not all(isinstance(o, ObjectSpec) for o in objs):
            raise TypeError("Spec.objects must be a tuple of ObjectSpec")
        n = len(objs)
        if self.region is not None and self.category != "position":
            raise ValueError(f"only 'position' specs take a region, got {self.category!r}")
        if self.relation is not None and self.category != "two_objects":
            raise ValueError(f"only 'two_objects' specs take a relation, got {self.category!r}")
        if self.category in ("single", "position") and n != 1:
            raise ValueError(f"a {self.category!r} spec has exactly 1 object, got {n}")
        if self.category == "position" and self.region not in REGIONS:
            raise ValueError(f"position spec needs a region in {REGIONS}, got {self.region!r}")
        if self.category == "colour":
            if n != 2 or objs[0].colour == objs[1].colour:
                raise ValueError("a 'colour' spec has 2 objects with different colours")
        if self.category == "two_objects":
            if n != 2 or objs[0] == objs[1]:
                raise ValueError("a 'two_objects' spec has 2 objects that differ in colour or shape")
            if self.relation not in RELATIONS:
                raise ValueError(f"two_objects spec needs a relation in {RELATIONS}, got {self.relation!r}")
        if self.category == "counting":
            if n not in COUNTS or len(set(objs)) != 1:
                raise ValueError(f"a 'counting' spec has N ∈ {COUNTS} identical objects, got {objs}")


@dataclass(frozen=True)
class PlacedShape:
    """A shape drawn in the size×size box whose top-left pixel is (x0, y0)."""

    shape: str
    colour: str
    x0: int
    y0: int
    size: int

    def __post_init__(self) -> None:
        ObjectSpec(self.colour, self.shape)  # validates names
        if self.size <= 0:
            raise ValueError(f"size must be positive, got {self.size}")

    @property
    def centre(self) -> tuple[float, float]:
        """(cx, cy) in continuous pixel coordinates (pixel i covers [i, i+1))."""
        return (self.x0 + self.size / 2.0, self.y0 + self.size / 2.0)

    @property
    def box(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) with x1, y1 exclusive."""
        return (self.x0, self.y0, self.x0 + self.size, self.y0 + self.size)


@dataclass(frozen=True)
class Scene:
    """A spec plus a layout: ``shapes[i]`` realises ``spec.objects[i]``.

    Construction validates every world invariant (in bounds, no overlap, stated positions true with
    margin), so any Scene that exists renders to an image its caption describes.
    """

    spec: Spec
    shapes: tuple[PlacedShape, ...]
    image_size: int = IMAGE_SIZE

    def __post_init__(self) -> None:
        shapes = tuple(self.shapes)
        object.__setattr__(self, "shapes", shapes)
        problem = layout_problem(self.spec, shapes, self.image_size)
        if problem is not None:
            raise ValueError(f"invalid scene: {problem}")


# --------------------------------------------------------------------------------------------
# Geometry and layout rules
# --------------------------------------------------------------------------------------------


def _boxes_apart(a: PlacedShape, b: PlacedShape, gap: int) -> bool:
    ax0, ay0, ax1, ay1 = a.box
    bx0, by0, bx1, by1 = b.box
    return ax1 + gap <= bx0 or bx1 + gap <= ax0 or ay1 + gap <= by0 or by1 + gap <= ay0


def region_holds(shape: PlacedShape, region: str, image_size: int = IMAGE_SIZE) -> bool:
    """True if the shape's centre is well inside ``region`` (see :data:`REGION_LIMIT`)."""
    cx, cy = shape.centre
    limit = REGION_LIMIT * image_size / IMAGE_SIZE
    return {
        "left": cx <= limit,
        "right": cx >= image_size - limit,
        "top": cy <= limit,
        "bottom": cy >= image_size - limit,
    }[region]


def relation_holds(a: PlacedShape, b: PlacedShape, relation: str, gap: int = MIN_GAP) -> bool:
    """True if ``a <relation> b`` holds unambiguously.

    The boxes must be separated along the stated axis by ``gap`` px, and the centre offset along the
    other axis must be at most :data:`RELATION_DOMINANCE` times the offset along the stated one.
    """
    (acx, acy), (bcx, bcy) = a.centre, b.centre
    ax0, ay0, ax1, ay1 = a.box
    bx0, by0, bx1, by1 = b.box
    if relation in ("left_of", "right_of"):
        separated = ax1 + gap <= bx0 if relation == "left_of" else bx1 + gap <= ax0
        return separated and abs(acy - bcy) <= RELATION_DOMINANCE * abs(acx - bcx)
    if relation in ("above", "below"):
        separated = ay1 + gap <= by0 if relation == "above" else by1 + gap <= ay0
        return separated and abs(acx - bcx) <= RELATION_DOMINANCE * abs(acy - bcy)
    raise ValueError(f"unknown relation {relation!r}; expected one of {RELATIONS}")


def layout_problem(spec: Spec, shapes: tuple[PlacedShape, ...], image_size: int = IMAGE_SIZE) -> str | None:
    """Why ``shapes`` is not a valid layout of ``spec``, or None if it is."""
    if len(shapes) != len(spec.objects):
        return f"{len(shapes)} shapes for {len(spec.objects)} described objects"
    for obj, s in zip(spec.objects, shapes):
        if (s.colour, s.shape) != (obj.colour, obj.shape):
            return f"shape {s} does not realise {obj}"
        x0, y0, x1, y1 = s.box
        if x0 < BORDER or y0 < BORDER or x1 > image_size - BORDER or y1 > image_size - BORDER:
            return f"{s} is not inside the image with a {BORDER}px border"
    for i in range(len(shapes)):
        for j in range(i + 1, len(shapes)):
            if not _boxes_apart(shapes[i], shapes[j], MIN_GAP):
                return f"shapes {i} and {j} are closer than {MIN_GAP}px"
    if spec.region is not None and not region_holds(shapes[0], spec.region, image_size):
        return f"shape centre {shapes[0].centre} is not clearly {spec.region}"
    if spec.relation is not None and not relation_holds(shapes[0], shapes[1], spec.relation):
        return f"{shapes[0].centre} is not clearly {spec.relation} {shapes[1].centre}"
    return None


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


def as_rng(rng: np.random.Generator | int) -> np.random.Generator:
    """Accept a Generator (used as is, advanced by the caller's draws) or an int seed."""
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        return np.random.default_rng(int(rng))
    raise TypeError(f"expected numpy.random.Generator or int seed, got {type(rng).__name__}")


def _pick(rng: np.random.Generator, options: tuple) -> object:
    return options[int(rng.integers(len(options)))]


def _random_object(rng: np.random.Generator) -> ObjectSpec:
    return ObjectSpec(str(_pick(rng, COLOURS)), str(_pick(rng, SHAPES)))


def sample_spec(rng: np.random.Generator | int, category: str | None = None) -> Spec:
    """Draw a caption-level description; ``category=None`` draws the category uniformly too."""
    rng = as_rng(rng)
    if category is None:
        category = str(_pick(rng, CATEGORIES))
    if category == "single":
        return Spec("single", (_random_object(rng),))
    if category == "position":
        return Spec("position", (_random_object(rng),), region=str(_pick(rng, REGIONS)))
    if category == "counting":
        n = int(_pick(rng, COUNTS))
        return Spec("counting", (_random_object(rng),) * n)
    if category == "colour":
        c0, c1 = (COLOURS[i] for i in rng.choice(len(COLOURS), size=2, replace=False))
        return Spec("colour", (ObjectSpec(c0, str(_pick(rng, SHAPES))), ObjectSpec(c1, str(_pick(rng, SHAPES)))))
    if category == "two_objects":
        a = _random_object(rng)
        b = _random_object(rng)
        while b == a:
            b = _random_object(rng)
        return Spec("two_objects", (a, b), relation=str(_pick(rng, RELATIONS)))
    raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")


def sample_layout(rng: np.random.Generator | int, spec: Spec, image_size: int = IMAGE_SIZE) -> Scene:
    """Place ``spec``'s objects by rejection sampling sizes and positions until the layout is valid.

    Raises RuntimeError if no valid layout was found in :data:`MAX_LAYOUT_TRIES` draws (does not
    happen for the 64 px world; it would signal an impossible spec or too small an image).
    """
    rng = as_rng(rng)
    for _ in range(MAX_LAYOUT_TRIES):
        shapes = []
        for obj in spec.objects:
            size = int(_pick(rng, SIZES))
            hi = image_size - BORDER - size  # inclusive upper bound of x0 / y0
            x0, y0 = (int(v) for v in rng.integers(BORDER, hi + 1, size=2))
            shapes.append(PlacedShape(obj.shape, obj.colour, x0, y0, size))
        if layout_problem(spec, tuple(shapes), image_size) is None:
            return Scene(spec, tuple(shapes), image_size)
    raise RuntimeError(f"no valid layout for {spec} in {MAX_LAYOUT_TRIES} tries at {image_size}px")


def sample_scene(rng: np.random.Generator | int, category: str | None = None) -> Scene:
    """Draw a full scene (spec then layout) from ``rng``; same seed → same scene."""
    rng = as_rng(rng)
    return sample_layout(rng, sample_spec(rng, category))


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def shape_mask(shape: PlacedShape, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """Boolean (H, W) mask of the pixels whose centres lie inside the shape (no anti-aliasing).

    Triangles are isosceles, apex up, base = height = size, so they fill half their box.
    """
    ys, xs = np.mgrid[0:image_size, 0:image_size]
    px, py = xs + 0.5, ys + 0.5  # pixel centres
    cx, cy = shape.centre
    half = shape.size / 2.0
    inside_box = (np.abs(px - cx) <= half) & (np.abs(py - cy) <= half)
    if shape.shape == "square":
        return inside_box
    if shape.shape == "circle":
        return (px - cx) ** 2 + (py - cy) ** 2 <= half**2
    if shape.shape == "triangle":
        depth = (py - shape.y0) / shape.size  # 0 at the apex row, 1 at the base
        return inside_box & (np.abs(px - cx) <= depth * half)
    raise ValueError(f"unknown shape {shape.shape!r}")


def render(scene: Scene) -> np.ndarray:
    """Render ``scene`` to a uint8 array (H, W, 3) with H = W = scene.image_size."""
    image = np.empty((scene.image_size, scene.image_size, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    for s in scene.shapes:
        image[shape_mask(s, scene.image_size)] = PALETTE[s.colour]
    return image


# --------------------------------------------------------------------------------------------
# Caption grammar
# --------------------------------------------------------------------------------------------


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _noun_phrase(obj: ObjectSpec) -> str:
    return f"{_article(obj.colour)} {obj.colour} {obj.shape}"


def spec_to_caption(spec: Spec) -> str:
    """The one caption the grammar produces for ``spec`` (lower case, no punctuation)."""
    objs = spec.objects
    if spec.category == "single":
        return _noun_phrase(objs[0])
    if spec.category == "position":
        return f"{_noun_phrase(objs[0])} {_REGION_PHRASES[spec.region]}"
    if spec.category == "colour":
        return f"{_noun_phrase(objs[0])} and {_noun_phrase(objs[1])}"
    if spec.category == "two_objects":
        return f"{_noun_phrase(objs[0])} {_RELATION_PHRASES[spec.relation]} {_noun_phrase(objs[1])}"
    if spec.category == "counting":
        return f"{_NUMBER_WORDS[len(objs)]} {objs[0].colour} {objs[0].shape}s"
    raise ValueError(f"unknown category {spec.category!r}")


def caption(scene: Scene) -> str:
    """Caption of a scene (a function of its spec only)."""
    return spec_to_caption(scene.spec)


def _alternation(words) -> str:
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


def _grammar_patterns() -> tuple[tuple[str, re.Pattern], ...]:
    np_ = rf"(?:a|an) (?P<c{{i}}>{_alternation(COLOURS)}) (?P<s{{i}}>{_alternation(SHAPES)})"
    np0, np1 = np_.format(i=0), np_.format(i=1)
    region = f"(?P<region>{_alternation(_REGION_PHRASES.values())})"
    relation = f"(?P<relation>{_alternation(_RELATION_PHRASES.values())})"
    count = f"(?P<count>{_alternation(_NUMBER_WORDS.values())})"
    plural = f"{count} (?P<c0>{_alternation(COLOURS)}) (?P<s0>{_alternation(SHAPES)})s"
    return (
        ("single", re.compile(rf"{np0}")),
        ("position", re.compile(rf"{np0} {region}")),
        ("colour", re.compile(rf"{np0} and {np1}")),
        ("two_objects", re.compile(rf"{np0} {relation} {np1}")),
        ("counting", re.compile(plural)),
    )


def _normalise(prompt: str) -> str:
    return " ".join(prompt.lower().strip().rstrip(".").split())


def parse_prompt(prompt: str) -> Spec:
    """Parse a caption of the grammar back into its :class:`Spec`.

    Case, surrounding whitespace and a final period are ignored. Raises ValueError for text the
    grammar cannot produce (including a wrong article, e.g. "an red circle").
    """
    text = _normalise(prompt)
    for category, pattern in _grammar_patterns():
        m = pattern.fullmatch(text)
        if m is None:
            continue
        g = m.groupdict()
        obj0 = ObjectSpec(g["c0"], g["s0"])
        if category == "single":
            spec = Spec("single", (obj0,))
        elif category == "position":
            region = {v: k for k, v in _REGION_PHRASES.items()}[g["region"]]
            spec = Spec("position", (obj0,), region=region)
        elif category == "colour":
            spec = Spec("colour", (obj0, ObjectSpec(g["c1"], g["s1"])))
        elif category == "two_objects":
            relation = {v: k for k, v in _RELATION_PHRASES.items()}[g["relation"]]
            spec = Spec("two_objects", (obj0, ObjectSpec(g["c1"], g["s1"])), relation=relation)
        else:
            n = {v: k for k, v in _NUMBER_WORDS.items()}[g["count"]]
            spec = Spec("counting", (obj0,) * n)
        if spec_to_caption(spec) != text:  # e.g. wrong article: the grammar is strict
            raise ValueError(f"not a caption of the shapes grammar: {prompt!r} (did you mean {spec_to_caption(spec)!r}?)")
        return spec
    raise ValueError(f"not a caption of the shapes grammar: {prompt!r}")


def all_specs() -> list[Spec]:
    """Every spec the grammar can describe, in a fixed order (a few thousand)."""
    objects = [ObjectSpec(c, s) for c in COLOURS for s in SHAPES]
    specs = [Spec("single", (o,)) for o in objects]
    specs += [Spec("position", (o,), region=r) for o in objects for r in REGIONS]
    specs += [Spec("colour", (a, b)) for a in objects for b in objects if a.colour != b.colour]
    specs += [Spec("two_objects", (a, b), relation=r) for a in objects for b in objects if a != b for r in RELATIONS]
    specs += [Spec("counting", (o,) * n) for o in objects for n in COUNTS]
    return specs


def vocabulary() -> list[str]:
    """Every word the caption grammar can produce, sorted (for building a tokenizer)."""
    return sorted({word for spec in all_specs() for word in spec_to_caption(spec).split()})
