"""Images made here, with known content: coloured shapes (and digits) on a grid, for a Flamingo-style VLM.

Nothing is downloaded. A scene is a few objects, one per cell of a `grid` x `grid` layout (so objects never
overlap), each a shape from SHAPES in an exact colour from PALETTE, optionally marked with a white digit drawn from a
3x5 bitmap font. Drawing is pure NumPy with no anti-aliasing: every pixel is the background (black), an object's
palette colour or a glyph's white, so every label can be checked from the pixels.

    scene = random_scene(np.random.default_rng(0), max_objects=4)
    image = draw(scene, size=64)                          # uint8 [64, 64, 3]
    caption(scene)                                        # "two red circles and a blue square"
    questions(scene, rng)                                 # [("how many green triangles?", "0"), ...]
    caption_scores("two red circles", labels(scene))      # {"exact": ..., "colour": ..., "count": ...}: scoring

Splits (`scene_for(seed, split, index, config)`; image `index` of a split depends only on (seed, split, index)):
    train       no object has a pair of HELD_OUT_PAIRS
    validation  the same distribution as train, other random draws
    heldout     every scene has at least one object whose (colour, shape) is in HELD_OUT_PAIRS: combinations
                never seen in training, made of colours and shapes that each were (every colour and every shape
                appears in training with other partners)

Few-shot episodes (`episode_for`): k (image, text) pairs then a query image, as plain data: a tuple of images and
a prompt string with one IMAGE_TOKEN where each image goes, and the answer. Tasks: caption, qa, and two tasks
defined only by the in-context examples, colour_word / shape_word (each colour or shape named by a nonsense word
drawn afresh for every episode, so a model can only answer from the examples).

On disk (`write_image_dataset` / `read_image_dataset`): a folder holding manifest.json, records.jsonl (one line per
image: caption, question-answer pairs, labels) and the pixels, as images.npz (one uint8 [count, H, W, 3] array) or
images/NNNNNN.png; written atomically (a temporary folder renamed into place).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 75),
    "green": (60, 180, 75),
    "blue": (0, 130, 200),
    "yellow": (255, 225, 25),
    "purple": (145, 30, 180),
    "orange": (245, 130, 48),
}
BACKGROUND = (0, 0, 0)
GLYPH_COLOUR = (255, 255, 255)
SHAPES = ("circle", "square", "triangle", "diamond")

# (colour, shape) pairs that never appear in train / validation scenes; every heldout scene has at least one.
# Each colour is held out with exactly one shape, each shape with one or two colours.
HELD_OUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("red", "triangle"),
    ("green", "diamond"),
    ("blue", "circle"),
    ("yellow", "square"),
    ("purple", "triangle"),
    ("orange", "diamond"),
)
SPLITS = ("train", "validation", "heldout")
TASKS = ("caption", "qa", "colour_word", "shape_word")
IMAGE_TOKEN = "<image>"
END_OF_CHUNK = "<|endofchunk|>"

# Nonsense words for the in-context mapping tasks (none is an English word the captions use).
NONSENSE_WORDS = ("dax", "wug", "blicket", "fep", "toma", "zup", "kiki", "bouba", "lorp", "mib", "tasp", "gazzer",
                  "vimble", "skee", "frel", "nork")

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve", "thirteen", "fourteen", "fifteen", "sixteen")
MAX_GRID = 4  # 16 cells: NUMBER_WORDS names every count
# Below 20 pixels a cell, the smallest objects (radius 0.3 cell = 6 px) start to be ambiguous: a 4-pixel circle and
# diamond differ by a few pixels. At 20, every shape is told apart from its pixels and the smallest digit-bearing
# triangle (radius 0.38 cell) still holds a 3x5 glyph with a 1-pixel margin.
MIN_CELL_PIXELS = 20
CELL_MARGIN = 0.08  # each object keeps this fraction of its cell free on every side: neighbours never touch
RADIUS_RANGE = (0.3, 0.42)  # an object's radius (half its bounding box), as a fraction of the cell
DIGIT_RADIUS_RANGE = (0.38, 0.42)  # larger, so the glyph fits

# 3x5 bitmap digits ("#" = glyph pixel), one string per row.
DIGIT_GLYPHS: dict[int, tuple[str, ...]] = {
    0: ("###", "#.#", "#.#", "#.#", "###"),
    1: (".#.", "##.", ".#.", ".#.", "###"),
    2: ("###", "..#", "###", "#..", "###"),
    3: ("###", "..#", ".##", "..#", "###"),
    4: ("#.#", "#.#", "###", "..#", "..#"),
    5: ("###", "#..", "###", "..#", "###"),
    6: ("###", "#..", "###", "#.#", "###"),
    7: ("###", "..#", ".#.", ".#.", ".#."),
    8: ("###", "#.#", "###", "#.#", "###"),
    9: ("###", "#.#", "###", "..#", "###"),
}


class ImageDataError(ValueError):
    """Bad input to the image generator, writer or reader; the message names the field and the fix."""


def glyph_bitmap(digit: int) -> np.ndarray:
    """The digit's glyph as a bool [5, 3] array."""
    return np.array([[c == "#" for c in row] for row in DIGIT_GLYPHS[digit]], dtype=bool)


def position_name(row: int, column: int, grid: int) -> str:
    """Words for a cell: 'top left', 'center', 'bottom' ... for grids of 2 and 3; 'row 2 column 4' otherwise."""
    if grid == 1:
        return "center"
    if grid in (2, 3):
        vertical = ("top", "middle", "bottom")[row if grid == 3 else 2 * row]
        horizontal = ("left", "center", "right")[column if grid == 3 else 2 * column]
        if vertical == "middle":
            return horizontal
        return vertical if horizontal == "center" else f"{vertical} {horizontal}"
    return f"row {row + 1} column {column + 1}"


def _check_choice(value, allowed, what: str) -> None:
    if value not in allowed:
        raise ImageDataError(f"unknown {what} {value!r}: choose one of {', '.join(map(str, allowed))}")


def _check_int(value, name: str, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low or (
            high is not None and value > high):
        bound = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
        raise ImageDataError(f"{name}={value!r}: must be {bound}")


@dataclasses.dataclass(frozen=True)
class SceneObject:
    """One object: its shape and colour, its grid cell, and its geometry in canvas fractions.

    center = (x, y) with x to the right and y down, both in [0, 1]; radius is half the side of the object's square
    bounding box (the circle's radius; the square's half side; the triangle points up)."""

    shape: str
    colour: str
    row: int
    column: int
    center: tuple[float, float]
    radius: float
    digit: int | None = None

    def __post_init__(self):
        _check_choice(self.shape, SHAPES, "shape")
        _check_choice(self.colour, tuple(PALETTE), "colour")
        _check_int(self.row, "SceneObject.row", 0)
        _check_int(self.column, "SceneObject.column", 0)
        if self.digit is not None:
            _check_int(self.digit, "SceneObject.digit", 0, 9)
        if not (isinstance(self.radius, (int, float)) and 0 < self.radius < 0.5):
            raise ImageDataError(f"SceneObject.radius={self.radius!r}: must be a canvas fraction in (0, 0.5)")
        if len(self.center) != 2 or not all(0 <= c <= 1 for c in self.center):
            raise ImageDataError(f"SceneObject.center={self.center!r}: must be (x, y) canvas fractions in [0, 1]")

    @property
    def pair(self) -> tuple[str, str]:
        return self.colour, self.shape

    def bounds(self) -> tuple[float, float, float, float]:
        """(left, top, right, bottom) of the bounding box, canvas fractions."""
        (x, y), r = self.center, self.radius
        return x - r, y - r, x + r, y + r


@dataclasses.dataclass(frozen=True)
class Scene:
    """Objects on a grid x grid layout: at most one per cell, each inside its cell's margins (so none overlap)."""

    objects: tuple[SceneObject, ...]
    grid: int = 3

    def __post_init__(self):
        _check_int(self.grid, "Scene.grid", 1, MAX_GRID)
        object.__setattr__(self, "objects", tuple(self.objects))
        cells = set()
        for number, item in enumerate(self.objects):
            if not isinstance(item, SceneObject):
                raise ImageDataError(f"Scene.objects[{number}] is a {type(item).__name__}, not a SceneObject")
            if item.row >= self.grid or item.column >= self.grid:
                raise ImageDataError(f"Scene.objects[{number}]: cell (row {item.row}, column {item.column}) is outside "
                                     f"the {self.grid}x{self.grid} grid")
            if (item.row, item.column) in cells:
                raise ImageDataError(f"Scene.objects[{number}]: cell (row {item.row}, column {item.column}) already "
                                     f"holds an object (one object per cell)")
            cells.add((item.row, item.column))
            cell = 1 / self.grid
            left, top, right, bottom = item.bounds()
            low_x, low_y = item.column * cell + CELL_MARGIN * cell, item.row * cell + CELL_MARGIN * cell
            high_x, high_y = low_x + cell * (1 - 2 * CELL_MARGIN), low_y + cell * (1 - 2 * CELL_MARGIN)
            slack = 1e-9
            if left < low_x - slack or top < low_y - slack or right > high_x + slack or bottom > high_y + slack:
                box = tuple(round(b, 4) for b in item.bounds())
                raise ImageDataError(f"Scene.objects[{number}]: its bounding box {box} leaves its cell's margins "
                                     f"(objects stay {CELL_MARGIN:.0%} of a cell inside their own cell, so they "
                                     f"never overlap)")


def _object_window(item: SceneObject, size: int) -> tuple[slice, slice]:
    """(rows, columns) of the pixels that can hold the object: its bounding box, a pixel wider, clipped."""
    left, top, right, bottom = (int(np.floor(b * size)) for b in item.bounds())
    return slice(max(top - 1, 0), min(bottom + 2, size)), slice(max(left - 1, 0), min(right + 2, size))


def _object_mask(item: SceneObject, size: int, rows: slice = slice(None), columns: slice = slice(None)) -> np.ndarray:
    """bool [rows, columns] (default: the whole canvas): pixels whose centres lie inside the object's shape."""
    coordinates = (np.arange(size) + 0.5) / size
    y, x = coordinates[rows, None], coordinates[None, columns]  # [rows, 1], [1, columns]
    (cx, cy), r = item.center, item.radius
    dx, dy = x - cx, y - cy
    if item.shape == "circle":
        return dx * dx + dy * dy <= r * r
    if item.shape == "square":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    if item.shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= r
    # triangle: apex (cx, cy - r), base from (cx - r, cy + r) to (cx + r, cy + r)
    return (dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) / 2)


def _inscribed_box(item: SceneObject, size: int) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) in pixels of a rectangle inside the shape, where the digit goes."""
    (cx, cy), r = (item.center[0] * size, item.center[1] * size), item.radius * size
    if item.shape == "square":
        half = r
    elif item.shape == "circle":
        half = r / np.sqrt(2)
    elif item.shape == "diamond":
        half = r / 2
    else:  # the largest square in the triangle stands on its base: side r
        return cx - r / 2, cy, cx + r / 2, cy + r
    return cx - half, cy - half, cx + half, cy + half


def glyph_placement(item: SceneObject, size: int) -> tuple[int, int, int]:
    """(top row, left column, scale) in pixels of the object's digit glyph (3 x 5 cells of scale x scale pixels),
    centred in the shape's inscribed box with a 1-pixel margin. A clear error if it cannot fit."""
    left, top, right, bottom = _inscribed_box(item, size)
    left, top, right, bottom = left + 1, top + 1, right - 1, bottom - 1
    scale = int(min((right - left) // 3, (bottom - top) // 5)) if right > left and bottom > top else 0
    if scale < 1:
        raise ImageDataError(f"size={size}: the digit on the {item.colour} {item.shape} at cell (row {item.row}, "
                             f"column {item.column}) does not fit (radius {item.radius * size:.1f} px); draw at a "
                             f"larger size or without digits")
    row = int(np.floor((top + bottom) / 2 - 2.5 * scale + 0.5))
    column = int(np.floor((left + right) / 2 - 1.5 * scale + 0.5))
    return row, column, scale


def check_size(size, grid: int, name: str = "size") -> None:
    """One clear error if `size` pixels cannot show a grid x grid scene with every shape and digit readable."""
    _check_int(size, name, 1)
    if size / grid < MIN_CELL_PIXELS:
        raise ImageDataError(f"{name}={size}: shapes need at least {MIN_CELL_PIXELS} pixels per grid cell to be "
                             f"told apart, and a {grid}x{grid} grid gives {size / grid:.1f}; use {name} >= "
                             f"{MIN_CELL_PIXELS * grid} or a smaller grid")


def draw(scene: Scene, size: int = 64) -> np.ndarray:
    """The scene as uint8 [size, size, 3]: exact palette colours on black, white digit glyphs, no anti-aliasing."""
    check_size(size, scene.grid)
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    for item in scene.objects:
        rows, columns = _object_window(item, size)
        mask = _object_mask(item, size, rows, columns)  # [rows, columns] of the object's window
        image[rows, columns][mask] = PALETTE[item.colour]
        if item.digit is not None:
            row, column, scale = glyph_placement(item, size)
            glyph = np.kron(glyph_bitmap(item.digit), np.ones((scale, scale), dtype=bool))  # [5 * scale, 3 * scale]
            window = (slice(row, row + 5 * scale), slice(column, column + 3 * scale))
            inside = (slice(row - rows.start, row - rows.start + 5 * scale),
                      slice(column - columns.start, column - columns.start + 3 * scale))  # the same, in the window
            if row < rows.start or column < columns.start or mask[inside].shape != glyph.shape or not (
                    mask[inside][glyph].all()):
                raise ImageDataError(f"size={size}: the digit on the {item.colour} {item.shape} at cell (row "
                                     f"{item.row}, column {item.column}) would leave its shape; draw at a larger size")
            image[window][glyph] = GLYPH_COLOUR
    return image


def all_pairs(colours=tuple(PALETTE), shapes=SHAPES) -> tuple[tuple[str, str], ...]:
    return tuple((colour, shape) for colour in colours for shape in shapes)


def random_scene(rng: np.random.Generator, *, min_objects: int = 1, max_objects: int = 4, grid: int = 3,
                 pairs=None, required_pairs=None, digit_probability: float = 0.0) -> Scene:
    """A seeded random scene: between min_objects and max_objects objects, in distinct cells of the grid.

    pairs: the (colour, shape) pairs objects are drawn from (default: every pair); required_pairs: if given, one
    object (at random) takes its pair from these instead; digit_probability: the chance an object carries a digit."""
    _check_int(grid, "grid", 1, MAX_GRID)
    _check_int(min_objects, "min_objects", 1)
    _check_int(max_objects, "max_objects", 1)
    if max_objects > grid * grid:
        raise ImageDataError(f"max_objects={max_objects} cannot fit a {grid}x{grid} grid (one object per cell: at "
                             f"most {grid * grid})")
    if min_objects > max_objects:
        raise ImageDataError(f"min_objects={min_objects} exceeds max_objects={max_objects}")
    if not (isinstance(digit_probability, (int, float)) and 0 <= digit_probability <= 1):
        raise ImageDataError(f"digit_probability={digit_probability!r}: must be in [0, 1]")
    pairs = all_pairs() if pairs is None else tuple(tuple(p) for p in pairs)
    for colour, shape in list(pairs) + list(required_pairs or ()):
        _check_choice(colour, tuple(PALETTE), "colour")
        _check_choice(shape, SHAPES, "shape")
    if not pairs:
        raise ImageDataError("pairs is empty: give at least one (colour, shape) pair")
    count = int(rng.integers(min_objects, max_objects + 1))
    cells = rng.choice(grid * grid, size=count, replace=False)
    chosen = [pairs[i] for i in rng.integers(0, len(pairs), size=count)]
    if required_pairs:
        required = tuple(tuple(p) for p in required_pairs)
        chosen[int(rng.integers(0, count))] = required[int(rng.integers(0, len(required)))]
    cell = 1 / grid
    objects = []
    for cell_index, (colour, shape) in zip(sorted(cells.tolist()), chosen):
        row, column = divmod(cell_index, grid)
        digit = int(rng.integers(0, 10)) if rng.random() < digit_probability else None
        low, high = DIGIT_RADIUS_RANGE if digit is not None else RADIUS_RANGE
        radius = float(rng.uniform(low, high))  # in cells
        free = 1 - 2 * CELL_MARGIN - 2 * radius  # room left for the centre to move, in cells
        x = (column + CELL_MARGIN + radius + rng.uniform(0, free)) * cell
        y = (row + CELL_MARGIN + radius + rng.uniform(0, free)) * cell
        objects.append(SceneObject(shape=shape, colour=colour, row=row, column=column, center=(float(x), float(y)),
                                   radius=radius * cell, digit=digit))
    return Scene(objects=tuple(objects), grid=grid)


# ---------------------------------------------------------------------------------------------------------------
# Text: captions, question-answer pairs, labels


def _plural(shape: str) -> str:
    return shape + "s"


def _a(word: str) -> str:
    """'a red', 'an orange'."""
    return ("an " if word[0] in "aeiou" else "a ") + word


def _noun_phrase(count: int, colour: str, shape: str, digit: int | None) -> str:
    words = f"{_a(colour)} {shape}" if count == 1 else f"{NUMBER_WORDS[count]} {colour} {_plural(shape)}"
    return words if digit is None else f"{words} marked {digit}"


def _join(phrases: list[str]) -> str:
    if not phrases:
        return "nothing"
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def caption(scene: Scene) -> str:
    """'two red circles and a blue square': objects grouped by (colour, shape, digit), groups in the reading order
    (top-left to bottom-right) of their first object. One canonical caption per scene, for exact-match scoring."""
    groups: dict[tuple, int] = {}
    for item in sorted(scene.objects, key=lambda o: (o.row, o.column)):
        key = (item.colour, item.shape, item.digit)
        groups[key] = groups.get(key, 0) + 1
    return _join([_noun_phrase(count, *key) for key, count in groups.items()])


def parse_caption(text: str) -> dict[tuple[str, str, int | None], int] | None:
    """{(colour, shape, digit): count} from a caption in `caption`'s grammar (e.g. a model's output), or None if
    `text` does not follow it. The inverse of `caption` up to the order of the groups."""
    words = {word: n for n, word in enumerate(NUMBER_WORDS)} | {"a": 1, "an": 1}
    counts: dict[tuple[str, str, int | None], int] = {}
    for phrase in text.strip().replace(", ", " and ").split(" and "):
        parts = phrase.split()
        digit = None
        if len(parts) == 5 and parts[3] == "marked" and parts[4].isdigit() and len(parts[4]) == 1:
            parts, digit = parts[:3], int(parts[4])
        if len(parts) != 3 or parts[0] not in words or parts[1] not in PALETTE:
            return None
        number, colour, shape = words[parts[0]], parts[1], parts[2]
        shape = shape[:-1] if number != 1 and shape.endswith("s") else shape
        if shape not in SHAPES or number == 0:
            return None
        counts[(colour, shape, digit)] = counts.get((colour, shape, digit), 0) + number
    return counts


def caption_scores(predicted: str, scene_labels: dict) -> dict[str, bool]:
    """How a predicted caption matches an image's labels: exact (the canonical caption), and per attribute, each
    compared as a multiset over the objects: colours, shapes, (colour, shape) pairs, digits, and the object count.
    An unparseable prediction scores False everywhere."""
    objects = scene_labels["objects"]
    truth = caption(scene_from_labels(scene_labels))
    parsed = parse_caption(predicted)
    if parsed is None:
        return {"exact": False, "count": False, "colour": False, "shape": False, "pair": False, "digit": False}

    def multiset(values) -> dict:
        found: dict = {}
        for value in values:
            found[value] = found.get(value, 0) + 1
        return found

    predicted_objects = [key for key, number in parsed.items() for _ in range(number)]
    return {
        "exact": predicted.strip() == truth,
        "count": len(predicted_objects) == len(objects),
        "colour": multiset(k[0] for k in predicted_objects) == multiset(o["colour"] for o in objects),
        "shape": multiset(k[1] for k in predicted_objects) == multiset(o["shape"] for o in objects),
        "pair": multiset(k[:2] for k in predicted_objects) == multiset((o["colour"], o["shape"]) for o in objects),
        "digit": multiset(k[2] for k in predicted_objects) == multiset(o["digit"] for o in objects),
    }


def labels(scene: Scene) -> dict:
    """The attributes of every object (reading order), plus counts per (colour, shape): plain JSON-able data."""
    objects = sorted(scene.objects, key=lambda o: (o.row, o.column))
    counts: dict[str, int] = {}
    for item in objects:
        counts[f"{item.colour} {item.shape}"] = counts.get(f"{item.colour} {item.shape}", 0) + 1
    return {
        "grid": scene.grid,
        "count": len(objects),
        "objects": [{"shape": o.shape, "colour": o.colour, "row": o.row, "column": o.column,
                     "position": position_name(o.row, o.column, scene.grid), "center": list(o.center),
                     "radius": o.radius, "digit": o.digit} for o in objects],
        "counts": counts,
    }


def scene_from_labels(record_labels: dict) -> Scene:
    """The Scene that `labels` described (labels hold the full geometry)."""
    return Scene(objects=tuple(SceneObject(shape=o["shape"], colour=o["colour"], row=o["row"], column=o["column"],
                                           center=tuple(o["center"]), radius=o["radius"], digit=o["digit"])
                               for o in record_labels["objects"]), grid=record_labels["grid"])


def all_questions(scene: Scene, skip_pairs=()) -> list[tuple[str, str, str]]:
    """Every (kind, question, answer) this scene supports: counts (of every colour x shape, every shape, every
    colour, and all objects, zeros included), existence, the colour / shape / digit at each occupied position, and
    the position of each (colour, shape) that occurs exactly once. No count / existence question names a pair of
    `skip_pairs` (train and validation skip HELD_OUT_PAIRS: 'how many blue circles?' -> '0' on every training
    image would teach that the combination cannot exist)."""
    objects = sorted(scene.objects, key=lambda o: (o.row, o.column))
    skip = {tuple(p) for p in skip_pairs}
    found = []
    for colour in PALETTE:
        for shape in SHAPES:
            if (colour, shape) in skip:
                continue
            number = sum(o.pair == (colour, shape) for o in objects)
            found.append(("count", f"how many {colour} {_plural(shape)}?", str(number)))
            found.append(("exists", f"is there {_a(colour)} {shape}?", "yes" if number else "no"))
    for shape in SHAPES:
        found.append(("count", f"how many {_plural(shape)}?", str(sum(o.shape == shape for o in objects))))
    for colour in PALETTE:
        found.append(("count", f"how many {colour} objects?", str(sum(o.colour == colour for o in objects))))
    found.append(("count", "how many objects?", str(len(objects))))
    for o in objects:
        where = position_name(o.row, o.column, scene.grid)
        found.append(("colour", f"what colour is the object at the {where}?", o.colour))
        found.append(("shape", f"what shape is the object at the {where}?", o.shape))
        if o.digit is not None:
            found.append(("digit", f"what digit is on the object at the {where}?", str(o.digit)))
        if sum(p.pair == o.pair for p in objects) == 1:
            found.append(("position", f"where is the {o.colour} {o.shape}?", where))
    return found


def questions(scene: Scene, rng: np.random.Generator, count: int = 4, skip_pairs=()) -> list[tuple[str, str]]:
    """`count` (question, answer) pairs drawn without replacement, kinds balanced: a kind first (uniformly among
    the kinds the scene supports), then a question of that kind. Count questions with the answer 0 stay rare but
    present (about half of the count questions are about things in the scene). skip_pairs: as in all_questions."""
    _check_int(count, "count", 0)
    pool = all_questions(scene, skip_pairs)
    present_pairs = {f"{o.colour} {_plural(o.shape)}" for o in scene.objects}
    by_kind: dict[str, list[tuple[str, str]]] = {}
    for kind, question, answer in pool:
        if kind == "count" and answer == "0" and rng.random() < 0.8:
            continue  # keep some zeros, not 70 of them
        if kind == "exists" and answer == "no" and rng.random() < 0.85:
            continue
        by_kind.setdefault(kind, []).append((question, answer))
    chosen: list[tuple[str, str]] = []
    while len(chosen) < count and by_kind:
        kinds = sorted(by_kind)
        kind = kinds[int(rng.integers(0, len(kinds)))]
        options = by_kind[kind]
        if kind == "count" and rng.random() < 0.5:  # favour counts of things present
            present = [i for i, (q, _) in enumerate(options) if any(p in q for p in present_pairs)]
            index = present[int(rng.integers(0, len(present)))] if present else int(rng.integers(0, len(options)))
        else:
            index = int(rng.integers(0, len(options)))
        chosen.append(options.pop(index))
        if not options:
            del by_kind[kind]
    return chosen


# ---------------------------------------------------------------------------------------------------------------
# Splits and datasets


@dataclasses.dataclass(frozen=True)
class ImageDataConfig:
    """How scenes are drawn: canvas size in pixels, grid, objects per scene, digit probability, questions per image."""

    size: int = 64
    grid: int = 3
    min_objects: int = 1
    max_objects: int = 4
    digit_probability: float = 0.0
    questions_per_image: int = 4

    def __post_init__(self):
        _check_int(self.grid, "grid", 1, MAX_GRID)
        _check_int(self.min_objects, "min_objects", 1)
        _check_int(self.max_objects, "max_objects", 1)
        _check_int(self.questions_per_image, "questions_per_image", 0)
        if self.max_objects > self.grid * self.grid:
            raise ImageDataError(f"max_objects={self.max_objects} cannot fit a {self.grid}x{self.grid} grid (one "
                                 f"object per cell: at most {self.grid * self.grid})")
        if self.min_objects > self.max_objects:
            raise ImageDataError(f"min_objects={self.min_objects} exceeds max_objects={self.max_objects}")
        if not (isinstance(self.digit_probability, (int, float)) and 0 <= self.digit_probability <= 1):
            raise ImageDataError(f"digit_probability={self.digit_probability!r}: must be in [0, 1]")
        check_size(self.size, self.grid)


def split_pairs(split: str) -> tuple[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...] | None]:
    """(pairs objects are drawn from, pairs one object must take or None) for a split."""
    _check_choice(split, SPLITS, "split")
    if split == "heldout":
        return all_pairs(), HELD_OUT_PAIRS
    held_out = set(HELD_OUT_PAIRS)
    return tuple(p for p in all_pairs() if p not in held_out), None


def split_question_skips(split: str) -> tuple[tuple[str, str], ...]:
    """Pairs the split's questions never name: the held-out pairs, except in the heldout split."""
    return () if split == "heldout" else HELD_OUT_PAIRS


def _rng(seed: int, split: str, index: int, stream: int) -> np.random.Generator:
    _check_int(seed, "seed", 0)
    _check_int(index, "index", 0)
    return np.random.default_rng([seed, SPLITS.index(split), index, stream])


def scene_for(seed: int, split: str, index: int, config: ImageDataConfig = ImageDataConfig(),
              min_objects: int | None = None, max_objects: int | None = None) -> Scene:
    """Scene `index` of `split` under `seed`: depends on nothing else (not on how many are drawn, nor in what order)."""
    pairs, required = split_pairs(split)
    return random_scene(_rng(seed, split, index, 0), min_objects=min_objects or config.min_objects,
                        max_objects=max_objects or config.max_objects, grid=config.grid, pairs=pairs,
                        required_pairs=required, digit_probability=config.digit_probability)


def example_for(seed: int, split: str, index: int, config: ImageDataConfig = ImageDataConfig()):
    """(image uint8 [size, size, 3], record) of image `index`: record = {index, caption, qa: [[q, a], ...], labels}."""
    scene = scene_for(seed, split, index, config)
    qa = questions(scene, _rng(seed, split, index, 1), config.questions_per_image, split_question_skips(split))
    record = {"index": index, "caption": caption(scene), "qa": [list(p) for p in qa], "labels": labels(scene)}
    return draw(scene, config.size), record


def examples(seed: int, split: str, start: int, count: int, config: ImageDataConfig = ImageDataConfig()):
    """Images start .. start + count - 1 of a split: (uint8 [count, size, size, 3], list of records)."""
    _check_int(count, "count", 0)
    pairs = [example_for(seed, split, start + i, config) for i in range(count)]
    images = np.stack([p[0] for p in pairs]) if pairs else np.zeros((0, config.size, config.size, 3), np.uint8)
    return images, [p[1] for p in pairs]


# ---------------------------------------------------------------------------------------------------------------
# Few-shot episodes


@dataclasses.dataclass(frozen=True, eq=False)  # holds arrays: compared by identity
class Episode:
    """k (image, text) pairs then a query image. `texts` has k + 1 entries: the k example texts and the query's
    prefix; the prompt puts IMAGE_TOKEN before each text and END_OF_CHUNK after each example. The target text is
    `answer` (after the query prefix and a space). `mapping` (colour_word / shape_word) is the episode's own naming."""

    task: str
    images: tuple  # k + 1 arrays, uint8 [size, size, 3]
    texts: tuple[str, ...]
    answer: str
    mapping: dict | None
    labels: tuple  # k + 1 label dicts

    @property
    def shots(self) -> int:
        return len(self.images) - 1

    @property
    def prompt(self) -> str:
        examples_text = "".join(f"{IMAGE_TOKEN}{text}{END_OF_CHUNK}" for text in self.texts[:-1])
        return examples_text + IMAGE_TOKEN + self.texts[-1]


def interleaved_segments(prompt: str, images) -> list:
    """The prompt cut at its IMAGE_TOKEN markers, with each marker replaced by its image, in order: a list of
    strings and uint8 [H, W, 3] arrays (empty strings dropped). One clear error when the markers and the images
    do not pair up, or an image is not RGB uint8."""
    images = list(images)
    pieces = prompt.split(IMAGE_TOKEN)
    if len(pieces) - 1 != len(images):
        raise ImageDataError(f"the prompt has {len(pieces) - 1} {IMAGE_TOKEN} marker(s) but {len(images)} image(s) "
                             f"were given: one image per marker, in order")
    segments: list = [pieces[0]] if pieces[0] else []
    for number, (image, text) in enumerate(zip(images, pieces[1:])):
        segments.append(check_image(image, f"image {number}"))
        if text:
            segments.append(text)
    return segments


def _mapping_episode(rng: np.random.Generator, task: str, shots: int, ways: int, split: str, config: ImageDataConfig):
    attribute = "colour" if task == "colour_word" else "shape"
    values = tuple(PALETTE) if attribute == "colour" else SHAPES
    if not 1 <= ways <= len(values):
        raise ImageDataError(f"ways={ways}: a {task} episode needs 1 <= ways <= {len(values)} (the {attribute}s)")
    classes = [values[i] for i in rng.choice(len(values), size=ways, replace=False)]
    words = [NONSENSE_WORDS[i] for i in rng.choice(len(NONSENSE_WORDS), size=ways, replace=False)]
    mapping = dict(zip(classes, words))
    pairs, required = split_pairs(split)
    # the shots cycle through the classes (in a random order), so with shots >= ways every class is shown
    shown = [classes[i % ways] for i in range(shots)]
    rng.shuffle(shown)
    query_class = shown[int(rng.integers(0, shots))] if shots else classes[int(rng.integers(0, ways))]
    images, texts, all_labels = [], [], []
    for number, value in enumerate([*shown, query_class]):
        usable = [p for p in pairs if p[0 if attribute == "colour" else 1] == value]
        need = None
        if required and number == shots:  # heldout: the query shows an unseen combination where one exists
            need = [p for p in required if p[0 if attribute == "colour" else 1] == value] or None
        scene = random_scene(rng, min_objects=1, max_objects=1, grid=config.grid, pairs=usable, required_pairs=need,
                             digit_probability=0.0)
        images.append(draw(scene, config.size))
        texts.append(f"Word: {mapping[value]}" if number < shots else "Word:")
        all_labels.append(labels(scene))
    return tuple(images), tuple(texts), mapping[query_class], mapping, tuple(all_labels)


def episode_for(seed: int, split: str, index: int, task: str = "colour_word", shots: int = 4, ways: int = 2,
                config: ImageDataConfig = ImageDataConfig()) -> Episode:
    """Episode `index` of a split: `shots` (image, text) pairs then a query image.

    caption: 'Caption: two red circles' per image; qa: 'Question: how many ...? Answer: 2'; colour_word /
    shape_word: one object per image, 'Word: dax' where the word names its colour (shape) under a mapping drawn
    for this episode alone among `ways` classes; the query's class is one the examples showed (when shots > 0)."""
    _check_choice(task, TASKS, "task")
    _check_choice(split, SPLITS, "split")
    _check_int(seed, "seed", 0)
    _check_int(index, "index", 0)
    _check_int(shots, "shots", 0)
    _check_int(ways, "ways", 1)
    rng = np.random.default_rng([seed, SPLITS.index(split), index, 2, TASKS.index(task)])
    if task in ("colour_word", "shape_word"):
        images, texts, answer, mapping, all_labels = _mapping_episode(rng, task, shots, ways, split, config)
        return Episode(task, images, texts, answer, mapping, all_labels)
    pairs, required = split_pairs(split)
    images, texts, all_labels = [], [], []
    answer = ""
    for number in range(shots + 1):
        scene = random_scene(rng, min_objects=config.min_objects, max_objects=config.max_objects, grid=config.grid,
                             pairs=pairs, required_pairs=required, digit_probability=config.digit_probability)
        images.append(draw(scene, config.size))
        all_labels.append(labels(scene))
        if task == "caption":
            text, answer = "Caption:", caption(scene)
        else:
            ((question, answer),) = questions(scene, rng, 1, split_question_skips(split))
            text = f"Question: {question} Answer:"
        texts.append(f"{text} {answer}" if number < shots else text)
    return Episode(task, tuple(images), tuple(texts), answer, None, tuple(all_labels))


# ---------------------------------------------------------------------------------------------------------------
# On disk

FORMAT = "llmjax-images"
VERSION = 1


def check_image(image, name: str = "image", size: int | None = None) -> np.ndarray:
    """One clear error unless `image` is uint8 [H, W, 3] (and H = W = size when given)."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ImageDataError(f"{name}: dtype {image.dtype}, expected uint8 pixels in [0, 255]")
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ImageDataError(f"{name}: shape {image.shape}, expected [height, width, 3] (RGB)")
    if size is not None and image.shape[:2] != (size, size):
        raise ImageDataError(f"{name}: {image.shape[1]}x{image.shape[0]} pixels, expected {size}x{size}")
    return image


def save_png(image: np.ndarray, path) -> None:
    from PIL import Image

    Image.fromarray(check_image(image, str(path))).save(path, format="PNG")  # uint8 [H, W, 3] -> mode RGB


def load_image(path, size: int | None = None, adapt: bool = False) -> tuple[np.ndarray, list[str]]:
    """(uint8 [H, W, 3], notes) from an image file. An image that is not RGB (grayscale, RGBA, palette) or not
    size x size is an error naming the mismatch, unless adapt=True: then it is converted (alpha dropped) and resized
    (nearest neighbour, keeping exact colours), and each change is described in `notes`."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise ImageDataError(f"{path}: no such image file")
    try:
        with Image.open(path) as opened:
            opened.load()
            picture = opened.copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ImageDataError(f"{path}: not a decodable image ({error})") from None
    notes = []
    if picture.mode != "RGB":
        channels = len(picture.getbands())
        if not adapt:
            raise ImageDataError(f"{path}: {channels} channel(s) (mode {picture.mode}), expected 3 (RGB); convert it "
                                 f"or pass adapt=True (--adapt-images)")
        notes.append(f"{path}: converted from mode {picture.mode} ({channels} channel(s)) to RGB")
        picture = picture.convert("RGB")
    if size is not None:
        _check_int(size, "size", 1)
        if picture.size != (size, size):
            if not adapt:
                raise ImageDataError(f"{path}: {picture.size[0]}x{picture.size[1]} pixels, expected {size}x{size}; "
                                     f"resize it or pass adapt=True (--adapt-images)")
            notes.append(f"{path}: resized from {picture.size[0]}x{picture.size[1]} to {size}x{size} (nearest)")
            picture = picture.resize((size, size), Image.Resampling.NEAREST)
    return np.asarray(picture, dtype=np.uint8).copy(), notes


def _examples_task(task: tuple) -> tuple[np.ndarray, list[dict]]:
    seed, split, start, count, config = task
    return examples(seed, split, start, count, config)


def example_chunks(seed: int, split: str, count: int, config: ImageDataConfig = ImageDataConfig(), workers: int = 1,
                   chunk: int = 256):
    """Images 0 .. count-1 of a split as consecutive (images [n, size, size, 3], records) chunks of up to `chunk`,
    in order, drawn by `workers` processes (each image depends only on (seed, split, index): any worker count
    gives the same images)."""
    _check_int(workers, "workers", 1)
    _check_int(chunk, "chunk", 1)
    tasks = [(seed, split, start, min(chunk, count - start), config) for start in range(0, count, chunk)]
    if workers == 1 or len(tasks) == 1:
        yield from map(_examples_task, tasks)
        return
    from llmjax.data.shards import worker_context

    with worker_context([__name__]).Pool(min(workers, len(tasks))) as pool:
        yield from pool.imap(_examples_task, tasks)


def write_image_dataset(out_dir, count: int, seed: int = 0, split: str = "train",
                        config: ImageDataConfig = ImageDataConfig(), image_format: str = "npz",
                        progress: bool = False, workers: int = 1, chunk: int = 256) -> Path:
    """Write images 0 .. count-1 of `split` to `out_dir` atomically: manifest.json, records.jsonl and images.npz
    (uint8 [count, size, size, 3]) or images/NNNNNN.png. Replaces an older folder only once all is written.
    `workers` processes draw the images (the same images for any number)."""
    from tqdm import tqdm

    from llmjax.retrieval.base import atomic_folder

    _check_int(count, "count", 1)
    _check_int(seed, "seed", 0)
    _check_choice(split, SPLITS, "split")
    _check_choice(image_format, ("npz", "png"), "image format")
    _check_int(workers, "workers", 1)
    out_dir = Path(out_dir)
    with atomic_folder(out_dir) as temporary:
        if image_format == "png":
            (temporary / "images").mkdir()
        images = np.empty((count, config.size, config.size, 3), np.uint8) if image_format == "npz" else None
        with open(temporary / "records.jsonl", "w") as records, tqdm(
                total=count, desc=f"images ({split})", unit="img", disable=not progress, dynamic_ncols=True) as bar:
            for chunk_images, chunk_records in example_chunks(seed, split, count, config, workers, chunk):
                for image, record in zip(chunk_images, chunk_records):
                    index = record["index"]
                    if image_format == "npz":
                        images[index] = image
                    else:
                        record["image"] = f"images/{index:06d}.png"
                        save_png(image, temporary / record["image"])
                    records.write(json.dumps(record) + "\n")
                bar.update(len(chunk_records))
        if image_format == "npz":
            np.savez(temporary / "images.npz", images=images)
        manifest = {"format": FORMAT, "version": VERSION, "count": count, "seed": seed, "split": split,
                    "image_format": image_format, "config": dataclasses.asdict(config),
                    "palette": {k: list(v) for k, v in PALETTE.items()}, "shapes": list(SHAPES),
                    "held_out_pairs": [list(p) for p in HELD_OUT_PAIRS]}
        (temporary / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out_dir


@dataclasses.dataclass(frozen=True, eq=False)  # holds arrays: compared by identity
class ImageDataset:
    """A dataset folder read back: `images` uint8 [count, size, size, 3], `records` (caption, qa, labels)."""

    directory: Path
    manifest: dict
    images: np.ndarray
    records: tuple

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        return self.images[index], self.records[index]


def read_image_dataset(directory) -> ImageDataset:
    """Read a folder written by `write_image_dataset`; a clear error for a missing / corrupt file or a mismatch."""
    directory = Path(directory)
    manifest_path = directory / "manifest.json"
    if not manifest_path.is_file():
        raise ImageDataError(f"{directory}: no manifest.json (not an image dataset written by make_images)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except ValueError as error:
        raise ImageDataError(f"{manifest_path}: not valid JSON ({error})") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ImageDataError(f"{manifest_path}: not an {FORMAT} dataset of version {VERSION}")
    try:
        records = tuple(json.loads(line) for line in (directory / "records.jsonl").read_text().splitlines() if line)
    except (OSError, ValueError) as error:
        raise ImageDataError(f"{directory / 'records.jsonl'}: unreadable ({error})") from None
    size = manifest["config"]["size"]
    if len(records) != manifest["count"]:
        raise ImageDataError(f"{directory / 'records.jsonl'}: {len(records)} records, the manifest says "
                             f"{manifest['count']} (an interrupted copy?)")
    if manifest["image_format"] == "npz":
        try:
            with np.load(directory / "images.npz", allow_pickle=False) as data:
                images = data["images"]
        except (OSError, ValueError, KeyError, EOFError) as error:
            raise ImageDataError(f"{directory / 'images.npz'}: unreadable ({error})") from None
        check_image(images[0] if len(images) else np.zeros((size, size, 3), np.uint8), str(directory / "images.npz"),
                    size)
        if images.shape != (manifest["count"], size, size, 3):
            raise ImageDataError(f"{directory / 'images.npz'}: shape {images.shape}, expected "
                                 f"{(manifest['count'], size, size, 3)}")
    else:
        images = np.stack([load_image(directory / r["image"], size)[0] for r in records])
    images.flags.writeable = False
    return ImageDataset(directory=directory, manifest=manifest, images=images, records=records)


def preview_grid(images: np.ndarray, columns: int = 8, border: int = 2) -> np.ndarray:
    """Images uint8 [n, H, W, 3] tiled in rows of `columns` with grey borders: uint8 [rows*(H+b)+b, ...]."""
    count, height, width, _ = images.shape
    rows = max(1, -(-count // columns))
    columns = min(columns, max(count, 1))
    grid = np.full((rows * (height + border) + border, columns * (width + border) + border, 3), 128, np.uint8)
    for n, image in enumerate(images):
        r, c = divmod(n, columns)
        top, left = border + r * (height + border), border + c * (width + border)
        grid[top:top + height, left:left + width] = image
    return grid


def pair_counts(records) -> dict[str, int]:
    """{'colour shape': objects} over records: how often each combination appears."""
    total: dict[str, int] = {}
    for record in records:
        for key, value in record["labels"]["counts"].items():
            total[key] = total.get(key, 0) + value
    return total



def write_episodes(out_dir, count: int, seed: int = 0, split: str = "train", task: str = "colour_word",
                   shots: int = 4, ways: int = 2, config: ImageDataConfig = ImageDataConfig(),
                   progress: bool = False) -> Path:
    """Write episodes 0 .. count-1 to `out_dir` atomically: manifest.json, episodes.jsonl (task, texts, prompt,
    answer, mapping, labels) and images.npz (uint8 [count, shots + 1, size, size, 3])."""
    from tqdm import tqdm

    from llmjax.retrieval.base import atomic_folder

    _check_int(count, "count", 1)
    episode_for(seed, split, 0, task, shots, ways, config)  # bad arguments fail before anything is written
    out_dir = Path(out_dir)
    images = np.empty((count, shots + 1, config.size, config.size, 3), np.uint8)
    with atomic_folder(out_dir) as temporary:
        with open(temporary / "episodes.jsonl", "w") as lines:
            for index in tqdm(range(count), desc=f"episodes ({split}, {task})", unit="ep", disable=not progress,
                              dynamic_ncols=True):
                episode = episode_for(seed, split, index, task, shots, ways, config)
                images[index] = np.stack(episode.images)
                lines.write(json.dumps({"index": index, "task": task, "texts": list(episode.texts),
                                        "prompt": episode.prompt, "answer": episode.answer,
                                        "mapping": episode.mapping, "labels": list(episode.labels)}) + "\n")
        np.savez(temporary / "images.npz", images=images)
        manifest = {"format": FORMAT + "-episodes", "version": VERSION, "count": count, "seed": seed,
                    "split": split, "task": task, "shots": shots, "ways": ways, "config": dataclasses.asdict(config),
                    "image_token": IMAGE_TOKEN, "end_of_chunk": END_OF_CHUNK}
        (temporary / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out_dir


def read_episodes(directory) -> list[Episode]:
    """Episodes written by `write_episodes`."""
    directory = Path(directory)
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
        lines = [json.loads(line) for line in (directory / "episodes.jsonl").read_text().splitlines() if line]
        with np.load(directory / "images.npz", allow_pickle=False) as data:
            images = data["images"]
    except (OSError, ValueError, KeyError, EOFError) as error:
        raise ImageDataError(f"{directory}: not a readable episode folder written by make_images ({error})") from None
    if manifest.get("format") != FORMAT + "-episodes" or not len(lines) == len(images) == manifest.get("count"):
        raise ImageDataError(f"{directory}: not a complete {FORMAT}-episodes folder of version {VERSION}")
    return [Episode(line["task"], tuple(images[n]), tuple(line["texts"]), line["answer"], line["mapping"],
                    tuple(line["labels"])) for n, line in enumerate(lines)]
