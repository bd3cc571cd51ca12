"""llmjax.data.images and `experiments make_images`: labels read back from the pixels, seeds, the held-out split,
captions / QA against the labels, few-shot episodes, files on disk, and one clear error for each bad input."""

import json
import re

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from llmjax.data import images as I
from llmjax.data.images import ImageDataConfig, ImageDataError, Scene, SceneObject

COLOUR_OF_RGB = {rgb: name for name, rgb in I.PALETTE.items()}
WORD_COUNTS = {word: n for n, word in enumerate(I.NUMBER_WORDS)} | {"a": 1, "an": 1}


# ---------------------------------------------------------------------------------------------------------------
# Reading a scene back from its pixels alone (the reference the labels are checked against)


def classify_shape(mask: np.ndarray) -> str:
    """circle / square / triangle / diamond from a bool mask cropped to its bounding box: the textbook shape
    inscribed in that box that overlaps it best (intersection over union)."""
    height, width = mask.shape
    v = ((np.arange(height) + 0.5) / height * 2 - 1)[:, None]  # [height, 1] in (-1, 1), down
    u = ((np.arange(width) + 0.5) / width * 2 - 1)[None, :]  # [1, width] in (-1, 1), right
    templates = {"square": np.ones_like(mask), "circle": u * u + v * v <= 1, "diamond": np.abs(u) + np.abs(v) <= 1,
                 "triangle": np.abs(u) <= (v + 1) / 2}
    overlap = {name: (t & mask).sum() / (t | mask).sum() for name, t in templates.items()}
    return max(overlap, key=overlap.get)


def read_digit(white: np.ndarray) -> int | None:
    """The digit whose 3x5 glyph the white pixels show (every glyph fills its 3x5 box), or None if no white."""
    if not white.any():
        return None
    rows, columns = np.flatnonzero(white.any(axis=1)), np.flatnonzero(white.any(axis=0))
    height, width = rows[-1] - rows[0] + 1, columns[-1] - columns[0] + 1
    assert height % 5 == 0 and width % 3 == 0 and height // 5 == width // 3, (height, width)
    scale = height // 5
    box = white[rows[0]:rows[-1] + 1, columns[0]:columns[-1] + 1]
    cells = box[scale // 2::scale, scale // 2::scale]  # [5, 3]: one sample per glyph cell
    assert np.array_equal(np.kron(cells, np.ones((scale, scale), bool)), box), "glyph cells are not uniform"
    matches = [d for d in range(10) if np.array_equal(I.glyph_bitmap(d), cells)]
    assert len(matches) == 1, matches
    return matches[0]


def reference_area(shape: str, radius_px: float) -> tuple[float, float]:
    """(area, perimeter) in pixels, in float64, of the ideal shape."""
    r = radius_px
    return {"circle": (np.pi * r * r, 2 * np.pi * r), "square": (4 * r * r, 8 * r),
            "diamond": (2 * r * r, 4 * np.sqrt(2) * r), "triangle": (2 * r * r, 2 * r + 2 * np.sqrt(5) * r)}[shape]


def pixel_objects(image: np.ndarray, grid: int) -> list[dict]:
    """Objects found in the pixels alone: connected non-background regions, each with its cell, colour, shape,
    digit, area and bounding box."""
    size = image.shape[0]
    colours = {tuple(c) for c in np.unique(image.reshape(-1, 3), axis=0).tolist()}
    assert colours <= set(I.PALETTE.values()) | {I.BACKGROUND, I.GLYPH_COLOUR}, colours  # exact colours only
    foreground = np.any(image != np.array(I.BACKGROUND, np.uint8), axis=-1)
    components, count = ndimage.label(foreground, structure=np.ones((3, 3)))  # 8-connected
    found = []
    for box_index, box in enumerate(ndimage.find_objects(components)):
        mask = components[box] == box_index + 1
        pixels = image[box][mask]
        coloured = {tuple(p) for p in np.unique(pixels, axis=0).tolist() if tuple(p) != I.GLYPH_COLOUR}
        assert len(coloured) == 1, f"one colour per object, found {coloured}"
        white = np.all(image[box] == np.array(I.GLYPH_COLOUR, np.uint8), axis=-1) & mask
        rows, columns = np.nonzero(mask)
        centre_y, centre_x = box[0].start + rows.mean() + 0.5, box[1].start + columns.mean() + 0.5
        found.append({"row": int(centre_y * grid // size), "column": int(centre_x * grid // size),
                      "colour": COLOUR_OF_RGB[coloured.pop()], "shape": classify_shape(mask),
                      "digit": read_digit(white), "area": int(mask.sum()),
                      "box": (box[1].start, box[0].start, box[1].stop, box[0].stop)})
    return sorted(found, key=lambda o: (o["row"], o["column"]))


def assert_labels_match_pixels(image: np.ndarray, record_labels: dict) -> None:
    size, grid = image.shape[0], record_labels["grid"]
    seen = pixel_objects(image, grid)
    assert len(seen) == record_labels["count"] == len(record_labels["objects"])  # components == objects
    for pixels, label in zip(seen, record_labels["objects"]):
        for key in ("row", "column", "colour", "shape", "digit"):
            assert pixels[key] == label[key], (key, pixels, label)
        area, perimeter = reference_area(label["shape"], label["radius"] * size)
        assert abs(pixels["area"] - area) <= 0.6 * perimeter + 2, (pixels, label, area)
        left, top, right, bottom = pixels["box"]
        cell = size / grid
        assert 0 <= left and right <= size and 0 <= top and bottom <= size  # inside the image
        assert label["column"] * cell <= left and right <= (label["column"] + 1) * cell  # inside its own cell
        assert label["row"] * cell <= top and bottom <= (label["row"] + 1) * cell
        assert all(0 <= c <= 1 for c in label["center"])
    counts = {}
    for o in seen:
        counts[f"{o['colour']} {o['shape']}"] = counts.get(f"{o['colour']} {o['shape']}", 0) + 1
    assert counts == record_labels["counts"]


@pytest.mark.parametrize("size,grid,max_objects,digits", [(64, 3, 9, 0.5), (40, 2, 4, 0.0), (80, 4, 16, 0.3),
                                                          (60, 3, 6, 1.0), (20, 1, 1, 0.0)])
def test_labels_match_pixels(size, grid, max_objects, digits):
    config = ImageDataConfig(size=size, grid=grid, min_objects=1, max_objects=max_objects, digit_probability=digits)
    shapes_seen = set()
    for split in I.SPLITS:
        batch, records = I.examples(7, split, 0, 8, config)
        assert batch.shape == (8, size, size, 3) and batch.dtype == np.uint8
        for image, record in zip(batch, records):
            assert_labels_match_pixels(image, record["labels"])
            shapes_seen |= {o["shape"] for o in record["labels"]["objects"]}
            if digits == 1.0:
                assert all(o["digit"] is not None for o in record["labels"]["objects"])
    assert shapes_seen == set(I.SHAPES) or max_objects == 1


def test_hand_built_scene_pixels_equal_a_float64_reference():
    square = SceneObject("square", "red", 0, 0, center=(0.15, 0.17), radius=0.1)
    circle = SceneObject("circle", "blue", 1, 1, center=(0.5, 0.5), radius=0.12, digit=8)
    scene = Scene((square, circle), grid=3)
    image = I.draw(scene, size=60)
    centres = (np.arange(60, dtype=np.float64) + 0.5) / 60
    y, x = np.meshgrid(centres, centres, indexing="ij")
    square_mask = (np.abs(x - 0.15) <= 0.1) & (np.abs(y - 0.17) <= 0.1)
    circle_mask = (x - 0.5) ** 2 + (y - 0.5) ** 2 <= 0.12 ** 2
    assert np.array_equal(np.all(image == I.PALETTE["red"], axis=-1), square_mask)
    assert np.array_equal(np.all(image == I.PALETTE["blue"], axis=-1) | np.all(image == 255, axis=-1), circle_mask)
    assert np.all(image[~(square_mask | circle_mask)] == 0)
    assert read_digit(np.all(image == 255, axis=-1)) == 8
    assert I.caption(scene) == "a red square and a blue circle marked 8"


# ---------------------------------------------------------------------------------------------------------------
# Seeds, splits


def test_same_seed_same_images_and_each_index_stands_alone():
    config = ImageDataConfig(size=40, grid=2, max_objects=4)
    first, records = I.examples(3, "train", 0, 6, config)
    again, records_again = I.examples(3, "train", 0, 6, config)
    assert np.array_equal(first, again) and records == records_again
    tail, tail_records = I.examples(3, "train", 4, 2, config)  # image i depends only on (seed, split, i)
    assert np.array_equal(tail, first[4:]) and tail_records == records[4:]
    other, _ = I.examples(4, "train", 0, 6, config)
    validation, _ = I.examples(3, "validation", 0, 6, config)
    assert not np.array_equal(other, first) and not np.array_equal(validation, first)
    episode, again = (I.episode_for(3, "train", 2, "colour_word", 4) for _ in range(2))
    assert episode.prompt == again.prompt and all(np.array_equal(a, b) for a, b in zip(episode.images, again.images))


def test_held_out_combinations_never_appear_in_training():
    held_out = set(I.HELD_OUT_PAIRS)
    assert {c for c, _ in held_out} == set(I.PALETTE) and {s for _, s in held_out} == set(I.SHAPES)
    config = ImageDataConfig(max_objects=9)
    seen = {split: set() for split in I.SPLITS}
    for split in I.SPLITS:
        for index in range(200):
            pairs = {o.pair for o in I.scene_for(11, split, index, config).objects}
            seen[split] |= pairs
            if split == "heldout":
                assert pairs & held_out, f"heldout scene {index} shows no held-out pair"
    for split in ("train", "validation"):
        assert not seen[split] & held_out
        assert seen[split] == set(I.all_pairs()) - held_out  # every other pair is trained on
    assert held_out <= seen["heldout"]
    batch, records = I.examples(11, "train", 0, 30, config)  # and from the pixels
    for image, record in zip(batch, records):
        assert not {(o["colour"], o["shape"]) for o in pixel_objects(image, 3)} & held_out
    named = re.compile("|".join(f"{c} {s}" for c, s in held_out))  # no training question names one either
    for split in I.SPLITS:
        questions = [q for r in I.examples(11, split, 0, 60, config)[1] for q, _ in r["qa"]]
        scene = I.scene_for(11, split, 0, config)
        questions += [q for _, q, _ in I.all_questions(scene, I.split_question_skips(split))]
        assert any(map(named.search, questions)) == (split == "heldout"), split
    for index in range(20):  # episodes: train never, heldout queries always
        train = I.episode_for(11, "train", index, "shape_word", shots=4, config=config)
        assert not {(o["colour"], o["shape"]) for lab in train.labels for o in lab["objects"]} & held_out
        query = I.episode_for(11, "heldout", index, "colour_word", shots=4, config=config).labels[-1]["objects"][0]
        assert (query["colour"], query["shape"]) in held_out


# ---------------------------------------------------------------------------------------------------------------
# Captions and question-answer pairs against the labels


def parse_caption(text: str) -> dict:
    """{(colour, shape, digit): count} from a caption, parsed without the generator's code."""
    counts = {}
    for phrase in re.split(r", | and ", text):
        match = re.fullmatch(r"(\w+) (\w+) (\w+?)s?( marked (\d))?", phrase)
        assert match, phrase
        number, colour, shape, _, digit = match.groups()
        key = (colour, shape, None if digit is None else int(digit))
        counts[key] = counts.get(key, 0) + WORD_COUNTS[number]
    return counts


def answer_from_labels(question: str, record_labels: dict) -> str:
    objects = record_labels["objects"]
    where = {o["position"]: o for o in objects}
    patterns = [
        (r"how many objects\?", lambda: str(len(objects))),
        (r"how many (\w+) objects\?", lambda c: str(sum(o["colour"] == c for o in objects))),
        (r"how many (\w+) (\w+)s\?", lambda c, s: str(sum((o["colour"], o["shape"]) == (c, s) for o in objects))),
        (r"how many (\w+)s\?", lambda s: str(sum(o["shape"] == s for o in objects))),
        (r"is there an? (\w+) (\w+)\?",
         lambda c, s: "yes" if any((o["colour"], o["shape"]) == (c, s) for o in objects) else "no"),
        (r"what colour is the object at the ([\w ]+)\?", lambda p: where[p]["colour"]),
        (r"what shape is the object at the ([\w ]+)\?", lambda p: where[p]["shape"]),
        (r"what digit is on the object at the ([\w ]+)\?", lambda p: str(where[p]["digit"])),
        (r"where is the (\w+) (\w+)\?",
         lambda c, s: next(o["position"] for o in objects if (o["colour"], o["shape"]) == (c, s))),
    ]
    for pattern, answer in patterns:
        match = re.fullmatch(pattern, question)
        if match:
            return answer(*match.groups())
    raise AssertionError(f"unparsed question {question!r}")


def test_captions_and_answers_agree_with_labels():
    config = ImageDataConfig(max_objects=6, digit_probability=0.3, questions_per_image=6)
    kinds = set()
    for split in I.SPLITS:
        for index in range(40):
            scene = I.scene_for(5, split, index, config)
            record_labels = I.labels(scene)
            expected = {}
            for o in record_labels["objects"]:
                key = (o["colour"], o["shape"], o["digit"])
                expected[key] = expected.get(key, 0) + 1
            assert parse_caption(I.caption(scene)) == expected
            for kind, question, answer in I.all_questions(scene):
                kinds.add(kind)
                assert answer_from_labels(question, record_labels) == answer, question
                if kind == "position":  # asked only where the (colour, shape) is unique
                    assert sum(o.pair == tuple(question[13:-1].split(" ")) for o in scene.objects) == 1
            _, record = I.example_for(5, split, index, config)
            assert len(record["qa"]) == 6 and len({q for q, _ in record["qa"]}) == 6
            for question, answer in record["qa"]:
                assert answer_from_labels(question, record["labels"]) == answer
    assert kinds == {"count", "exists", "colour", "shape", "digit", "position"}
    two_red_circles = Scene((SceneObject("circle", "red", 0, 0, (0.15, 0.15), 0.08),
                             SceneObject("circle", "red", 0, 2, (0.85, 0.15), 0.08),
                             SceneObject("square", "blue", 2, 1, (0.5, 0.85), 0.08)))
    assert I.caption(two_red_circles) == "two red circles and a blue square"
    assert ("count", "how many red circles?", "2") in I.all_questions(two_red_circles)
    assert ("count", "how many green triangles?", "0") in I.all_questions(two_red_circles)
    assert ("position", "where is the blue square?", "bottom") in I.all_questions(two_red_circles)


def test_parse_caption_and_caption_scores():
    config = ImageDataConfig(max_objects=6, digit_probability=0.4)
    for index in range(30):
        scene = I.scene_for(8, "heldout", index, config)
        assert I.parse_caption(I.caption(scene)) == parse_caption(I.caption(scene))  # the test's own parser
        scores = I.caption_scores(I.caption(scene), I.labels(scene))
        assert all(scores.values()), scores
    scene_labels = I.labels(Scene((SceneObject("circle", "red", 0, 0, (0.15, 0.15), 0.08),
                                   SceneObject("circle", "red", 0, 2, (0.85, 0.15), 0.08),
                                   SceneObject("square", "blue", 2, 1, (0.5, 0.85), 0.08, digit=4))))
    expected = {  # prediction -> (exact, count, colour, shape, pair, digit)
        "two red circles and a blue square marked 4": (True, True, True, True, True, True),
        "a blue square marked 4 and two red circles": (False, True, True, True, True, True),
        "two red circles and a blue square": (False, True, True, True, True, False),
        "two red circles and a green square marked 4": (False, True, False, True, False, True),
        "a red circle and a blue square marked 4": (False, False, False, False, False, False),
        "two blue circles and a red square marked 4": (False, True, False, True, False, True),
        "three red triangles": (False, True, False, False, False, False),
        "two red circles and": (False, False, False, False, False, False),
        "2 red circles": (False, False, False, False, False, False),
    }
    for predicted, flags in expected.items():
        scores = I.caption_scores(predicted, scene_labels)
        assert tuple(scores[k] for k in ("exact", "count", "colour", "shape", "pair", "digit")) == flags, predicted
    assert I.parse_caption("a purple diamond, two orange triangles marked 3 and an orange circle") == {
        ("purple", "diamond", None): 1, ("orange", "triangle", 3): 2, ("orange", "circle", None): 1}
    assert I.parse_caption("two red circle") == {("red", "circle", None): 2}  # lenient on the plural
    assert I.parse_caption("a pink circle") is None and I.parse_caption("zero red circles") is None


# ---------------------------------------------------------------------------------------------------------------
# Few-shot episodes


@pytest.mark.parametrize("task", ["colour_word", "shape_word"])
def test_mapping_episodes_are_consistent_and_change_per_episode(task):
    attribute = "colour" if task == "colour_word" else "shape"
    mappings = set()
    for shots, ways in [(0, 2), (1, 3), (4, 2), (8, 3)]:
        for index in range(6):
            episode = I.episode_for(2, "train", index, task, shots=shots, ways=ways,
                                    config=ImageDataConfig(size=40, grid=2))
            assert episode.shots == shots and len(episode.images) == len(episode.texts) == shots + 1
            assert episode.prompt.count(I.IMAGE_TOKEN) == shots + 1
            assert episode.prompt.count(I.END_OF_CHUNK) == shots and episode.prompt.endswith(I.IMAGE_TOKEN + "Word:")
            mapping = episode.mapping
            assert len(mapping) == ways and len(set(mapping.values())) == ways  # a one-to-one naming
            assert set(mapping.values()) <= set(I.NONSENSE_WORDS)
            mappings.add(tuple(sorted(mapping.items())))
            shown = []
            for number, (image, text) in enumerate(zip(episode.images, episode.texts)):
                (found,) = pixel_objects(image, 2)  # one object per image, read from the pixels
                assert found[attribute] == episode.labels[number]["objects"][0][attribute]
                if number < shots:
                    assert text == f"Word: {mapping[found[attribute]]}"  # the same word for the same class
                    shown.append(found[attribute])
            query = pixel_objects(episode.images[-1], 2)[0][attribute]
            assert episode.answer == mapping[query]
            if shots:
                assert query in shown  # answerable from the examples
            if shots >= ways:
                assert set(shown) == set(mapping)
    assert len(mappings) > 10  # the naming changes from episode to episode


def test_interleaved_segments_pair_markers_with_images():
    episode = I.episode_for(0, "validation", 3, "qa", shots=2, config=ImageDataConfig(size=40, grid=2))
    segments = I.interleaved_segments(episode.prompt, episode.images)
    assert [type(s).__name__ for s in segments] == ["ndarray", "str"] * 3
    assert [s for s in segments if isinstance(s, str)] == [t + I.END_OF_CHUNK for t in episode.texts[:-1]] + [
        episode.texts[-1]]
    assert all(a is b for a, b in zip(segments[::2], episode.images))
    assert I.interleaved_segments("Look: <image> then <image>", episode.images[:2])[0] == "Look: "
    with pytest.raises(ImageDataError, match="the prompt has 3 <image> marker.s. but 2 image.s. were given"):
        I.interleaved_segments(episode.prompt, episode.images[:2])
    with pytest.raises(ImageDataError, match="the prompt has 0 <image> marker.s. but 1 image"):
        I.interleaved_segments("no image here", episode.images[:1])
    with pytest.raises(ImageDataError, match=r"image 1: shape \(40, 40, 4\)"):
        I.interleaved_segments("<image><image>", [episode.images[0], np.zeros((40, 40, 4), np.uint8)])


@pytest.mark.parametrize("task", ["caption", "qa"])
def test_caption_and_qa_episodes(task):
    config = ImageDataConfig(size=60, grid=3, max_objects=3)
    for index in range(4):
        episode = I.episode_for(1, "heldout", index, task, shots=3, config=config)
        assert len(episode.images) == 4 and episode.mapping is None
        assert episode.prompt.count(I.IMAGE_TOKEN) == 4 and episode.prompt.count(I.END_OF_CHUNK) == 3
        for number, (image, text) in enumerate(zip(episode.images, episode.texts)):
            assert_labels_match_pixels(image, episode.labels[number])
            answer = I.caption(I.scene_from_labels(episode.labels[number]))
            if task == "caption":
                assert text == ("Caption:" if number == 3 else f"Caption: {answer}")
            else:
                match = re.fullmatch(r"Question: (.+\?) Answer:( (.+))?", text)
                assert match and (match.group(3) is None) == (number == 3)
                answer = answer_from_labels(match.group(1), episode.labels[number])
                if number < 3:
                    assert match.group(3) == answer
        assert episode.answer == answer


# ---------------------------------------------------------------------------------------------------------------
# On disk


@pytest.mark.parametrize("image_format", ["npz", "png"])
def test_write_and_read_a_dataset(tmp_path, image_format):
    config = ImageDataConfig(size=40, grid=2, max_objects=3)
    workers = 2 if image_format == "npz" else 1  # two processes, chunks of 2: the same images as drawn here
    folder = I.write_image_dataset(tmp_path / "set", 5, seed=9, split="heldout", config=config,
                                   image_format=image_format, workers=workers, chunk=2)
    dataset = I.read_image_dataset(folder)
    expected, records = I.examples(9, "heldout", 0, 5, config)
    assert np.array_equal(dataset.images, expected) and len(dataset) == 5
    assert [{k: v for k, v in r.items() if k != "image"} for r in dataset.records] == json.loads(json.dumps(records))
    assert dataset.manifest["held_out_pairs"] == [list(p) for p in I.HELD_OUT_PAIRS]
    if image_format == "png":
        image, notes = I.load_image(folder / dataset.records[2]["image"], size=40)
        assert np.array_equal(image, expected[2]) and notes == []
    with pytest.raises(ImageDataError, match="unknown split 'test'"):  # a failed rewrite leaves the old one intact
        I.write_image_dataset(tmp_path / "set", 5, split="test", config=config)
    assert np.array_equal(I.read_image_dataset(folder).images, expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]  # no temporary folder left behind
    episodes_folder = I.write_episodes(tmp_path / "episodes", 3, seed=9, task="colour_word", shots=2, config=config)
    episodes = I.read_episodes(episodes_folder)
    for index, episode in enumerate(episodes):
        fresh = I.episode_for(9, "train", index, "colour_word", 2, config=config)
        assert episode.prompt == fresh.prompt and episode.answer == fresh.answer and episode.mapping == fresh.mapping
        assert all(np.array_equal(a, b) for a, b in zip(episode.images, fresh.images))


def test_load_image_checks_channels_and_size(tmp_path):
    rgb = I.draw(I.scene_for(0, "train", 0, ImageDataConfig(size=40, grid=2)), 40)
    Image.fromarray(rgb).convert("RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(rgb).save(tmp_path / "big.png")
    Image.fromarray(rgb[:, :, 0]).save(tmp_path / "gray.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ImageDataError, match="4 channel"):
        I.load_image(tmp_path / "rgba.png")
    with pytest.raises(ImageDataError, match="1 channel"):
        I.load_image(tmp_path / "gray.png")
    with pytest.raises(ImageDataError, match="40x40 pixels, expected 20x20"):
        I.load_image(tmp_path / "big.png", size=20)
    with pytest.raises(ImageDataError, match="not a decodable image"):
        I.load_image(tmp_path / "broken.png")
    with pytest.raises(ImageDataError, match="no such image file"):
        I.load_image(tmp_path / "missing.png")
    image, notes = I.load_image(tmp_path / "rgba.png", size=20, adapt=True)
    # nearest neighbour: output pixel i samples input pixel floor((i + 0.5) * 2) = 2i + 1; colours stay exact
    assert image.shape == (20, 20, 3) and np.array_equal(image, rgb[1::2, 1::2])
    assert len(notes) == 2 and "converted from mode RGBA" in notes[0] and "resized from 40x40 to 20x20" in notes[1]


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one clear error each

SCENE = Scene((SceneObject("circle", "red", 0, 0, (0.15, 0.15), 0.08),))


@pytest.mark.parametrize("make,message", [
    (lambda: SceneObject("hexagon", "red", 0, 0, (0.5, 0.5), 0.1), "unknown shape 'hexagon': choose one of circle"),
    (lambda: SceneObject("circle", "pink", 0, 0, (0.5, 0.5), 0.1), "unknown colour 'pink': choose one of red"),
    (lambda: SceneObject("circle", "red", 0, 0, (0.5, 0.5), 0.1, digit=12), r"SceneObject.digit=12: must be"),
    (lambda: SceneObject("circle", "red", 0, 0, (0.5, 0.5), -0.1), r"SceneObject.radius=-0.1"),
    (lambda: Scene((SceneObject("circle", "red", 0, 0, (0.15, 0.15), 0.08),
                    SceneObject("square", "blue", 0, 0, (0.2, 0.2), 0.05))), "already holds an object"),
    (lambda: Scene((SceneObject("circle", "red", 0, 0, (0.3, 0.15), 0.1),)), "leaves its cell's margins"),
    (lambda: Scene((SceneObject("circle", "red", 3, 0, (0.15, 0.15), 0.08),)), "outside the 3x3 grid"),
    (lambda: I.random_scene(np.random.default_rng(0), max_objects=10, grid=3), "max_objects=10 cannot fit a 3x3"),
    (lambda: I.random_scene(np.random.default_rng(0), min_objects=0), "min_objects=0: must be"),
    (lambda: I.random_scene(np.random.default_rng(0), min_objects=5, max_objects=3), "min_objects=5 exceeds"),
    (lambda: I.random_scene(np.random.default_rng(0), pairs=[("teal", "circle")]), "unknown colour 'teal'"),
    (lambda: ImageDataConfig(grid=2, max_objects=5), "max_objects=5 cannot fit a 2x2 grid"),
    (lambda: ImageDataConfig(size=0), "size=0: must be an integer >= 1"),
    (lambda: ImageDataConfig(size=-8), "size=-8: must be an integer >= 1"),
    (lambda: ImageDataConfig(size=40), "size=40: shapes need at least 20 pixels per grid cell .* use size >= 60"),
    (lambda: I.draw(SCENE, size=0), "size=0: must be an integer >= 1"),
    (lambda: I.draw(SCENE, size=59), "shapes need at least 20 pixels per grid cell"),
    (lambda: I.draw(Scene((SceneObject("triangle", "red", 0, 0, (0.15, 0.15), 0.05, digit=3),)), 64),
     "the digit on the red triangle .* does not fit"),
    (lambda: I.scene_for(0, "test", 0), "unknown split 'test'"),
    (lambda: I.scene_for(-1, "train", 0), "seed=-1"),
    (lambda: I.episode_for(0, "train", 0, task="dance"), "unknown task 'dance'"),
    (lambda: I.episode_for(0, "train", 0, task="colour_word", ways=7), "ways=7: a colour_word episode needs"),
    (lambda: I.episode_for(0, "train", 0, shots=-1), "shots=-1"),
    (lambda: I.write_image_dataset("/nonexistent/never", 0), "count=0"),
    (lambda: I.write_image_dataset("/nonexistent/never", 2, image_format="jpeg"), "unknown image format 'jpeg'"),
    (lambda: I.check_image(np.zeros((8, 8, 4), np.uint8)), r"shape \(8, 8, 4\), expected \[height, width, 3\]"),
    (lambda: I.check_image(np.zeros((8, 8, 3), np.float32)), "dtype float32, expected uint8"),
])
def test_bad_input_gives_one_clear_error(make, message):
    with pytest.raises(ImageDataError, match=message) as caught:
        make()
    assert "\n" not in str(caught.value)


def test_reading_a_folder_that_is_not_a_dataset(tmp_path):
    with pytest.raises(ImageDataError, match="no manifest.json"):
        I.read_image_dataset(tmp_path)
    folder = I.write_image_dataset(tmp_path / "set", 3, config=ImageDataConfig(size=20, grid=1, max_objects=1))
    lines = (folder / "records.jsonl").read_text().splitlines()
    (folder / "records.jsonl").write_text("\n".join(lines[:2]) + "\n")  # an interrupted copy
    with pytest.raises(ImageDataError, match="2 records, the manifest says 3"):
        I.read_image_dataset(folder)


# ---------------------------------------------------------------------------------------------------------------
# The experiment


def test_make_images_cli(tmp_path, capsys):
    from llmjax.experiments import make_images

    out = tmp_path / "out"
    assert make_images.main(["--out", str(out), "--count", "6", "--splits", "train,heldout", "--size", "60",
                             "--episodes", "2", "--shots", "2", "--task", "shape_word", "--preview", "3",
                             "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["splits"]["train"]["held_out_objects"] == 0 and report["splits"]["heldout"]["held_out_objects"] >= 6
    assert report["splits"]["train"]["images"] == 6 and not (out / "validation").exists()
    assert I.read_image_dataset(out / "heldout").manifest["split"] == "heldout"
    assert len(I.read_episodes(out / "episodes-train")) == 2
    assert Image.open(out / "preview.png").format == "PNG" and Image.open(out / "episodes.png").format == "PNG"
    assert "held-out (colour, shape) pairs: red triangle" in capsys.readouterr().out
    for argv, message in [(["--count", "0"], "--count=0: must be >= 1"),
                          (["--splits", "train,test"], "--splits: unknown split 'test'"),
                          (["--max-objects", "10"], "--max-objects=10 cannot fit a 3x3 grid"),
                          (["--size", "0"], "--size=0: must be >= 1"),
                          (["--size", "40"], "--size=40: shapes need at least 20 pixels"),
                          (["--workers", "0"], "--workers=0: must be >= 1"),
                          (["--episodes", "1", "--ways", "9"], "ways=9: a colour_word episode needs")]:
        assert make_images.main(["--out", str(tmp_path / "bad"), "--no-progress", *argv]) == 2
        error = capsys.readouterr().err
        assert message in error and error.count("\n") == 1, error
    assert not (tmp_path / "bad").exists()  # nothing written on bad flags
