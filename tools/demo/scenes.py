"""Procedural scenes and their captions for the demo checkpoint: flat-coloured circles, squares
and triangles of a few sizes at named positions (a 3x3 grid) or scattered in counts, on a
flat background.

Some combinations never appear in training, by construction, so the quality test can ask for
them: a colour x shape x position triple is held out when `held_out_triple` says so, and a
count x colour x shape triple when `held_out_count`. `held_out_prompts` lists test prompts
made only of those, with what a checker must find in the image.
"""

import json
import sys
from pathlib import Path

import numpy as np

# Colours far apart in RGB so a pixel's nearest palette colour is unambiguous.
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 220, 40),
    "purple": (140, 60, 180),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "orange": (245, 140, 30),
}
SHAPES = ["circle", "square", "triangle"]
# Name -> (column, row) in a 3x3 grid; the phrase a caption uses.
POSITIONS = {
    "top left": ((0, 0), "in the top left"),
    "top": ((1, 0), "at the top"),
    "top right": ((2, 0), "in the top right"),
    "left": ((0, 1), "on the left"),
    "center": ((1, 1), "in the center"),
    "right": ((2, 1), "on the right"),
    "bottom left": ((0, 2), "in the bottom left"),
    "bottom": ((1, 2), "at the bottom"),
    "bottom right": ((2, 2), "in the bottom right"),
}
# Radius as a fraction of the image's shorter side.
SIZES = {"small": 0.09, None: 0.13, "large": 0.17}
COUNT_WORDS = {2: "two", 3: "three", 4: "four"}
# Training and generation sizes: the shapes a requested aspect ratio maps to at 64x64 pixels
# of area (see the checkpoint's `_kiln` settings in model_index.json).
BUCKETS = [(64, 64), (64, 48), (48, 64), (80, 48), (48, 80)]

_C, _S, _P = list(COLORS), SHAPES, list(POSITIONS)


def held_out_triple(color: str, shape: str, position: str) -> bool:
    """About one colour x shape x position triple in seven, spread over every colour, shape
    and position."""
    return (_C.index(color) + 3 * _S.index(shape) + 5 * _P.index(position)) % 7 == 0


def held_out_count(count: int, color: str, shape: str) -> bool:
    return (count + 2 * _C.index(color) + _S.index(shape)) % 5 == 0


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def plural(shape: str) -> str:
    return shape + "s"


def _object_phrase(color, shape, size, position):
    words = ([size] if size else []) + [color, shape]
    words.insert(0, article(words[0]))
    if position:
        words.append(POSITIONS[position][1])
    return " ".join(words)


def sample_scene(rng: np.random.Generator):
    """A random training scene: `{"background", "objects": [{color, shape, size, position|None,
    cx, cy, r}]}` in relative coordinates, and its caption. Never a held-out combination."""
    bg = _C[rng.integers(len(_C))]
    kind = rng.choice(["one", "two", "count", "loose"], p=[0.5, 0.2, 0.2, 0.1])
    objects = []
    if kind in ("one", "two"):
        cells = rng.permutation(len(_P))[: 1 if kind == "one" else 2]
        for cell in cells:
            while True:
                color, shape = _C[rng.integers(len(_C))], _S[rng.integers(len(_S))]
                position = _P[cell]
                if color != bg and not held_out_triple(color, shape, position):
                    break
            size = [None, "small", "large"][rng.integers(3)]
            objects.append(dict(color=color, shape=shape, size=size, position=position))
        caption = " and ".join(_object_phrase(o["color"], o["shape"], o["size"], o["position"]) for o in objects)
    elif kind == "count":
        while True:
            count = int(rng.integers(2, 5))
            color, shape = _C[rng.integers(len(_C))], _S[rng.integers(len(_S))]
            if color != bg and not held_out_count(count, color, shape):
                break
        cells = rng.permutation(len(_P))[:count]
        objects = [dict(color=color, shape=shape, size="small", position=_P[c]) for c in cells]
        caption = f"{COUNT_WORDS[count]} {color} {plural(shape)}"
    else:
        while True:
            color, shape = _C[rng.integers(len(_C))], _S[rng.integers(len(_S))]
            if color != bg:
                break
        size = [None, "small", "large"][rng.integers(3)]
        objects = [dict(color=color, shape=shape, size=size, position="center")]
        caption = _object_phrase(color, shape, size, None)
    caption += f" on {article(bg)} {bg} background"
    for o in objects:
        (col, row), _ = POSITIONS[o["position"]]
        jitter = rng.uniform(-0.06, 0.06, size=2)
        o["cx"], o["cy"] = (col + 0.5) / 3 + jitter[0], (row + 0.5) / 3 + jitter[1]
        o["r"] = SIZES[o["size"]] * rng.uniform(0.9, 1.1)
        # Count scenes' objects are not at named places; they only need to be apart.
        if kind == "count":
            o["position"] = None
    return dict(background=bg, objects=objects), caption


def render(scene, width: int, height: int) -> np.ndarray:
    """The scene as `height x width x 3` uint8, anti-aliased by 4x supersampling."""
    ss = 4
    ys, xs = np.mgrid[0:height * ss, 0:width * ss].astype(np.float32)
    xs, ys = (xs + 0.5) / ss, (ys + 0.5) / ss
    img = np.empty((height * ss, width * ss, 3), np.float32)
    img[:] = COLORS[scene["background"]]
    side = min(width, height)
    for o in scene["objects"]:
        cx, cy, r = o["cx"] * width, o["cy"] * height, o["r"] * side
        dx, dy = xs - cx, ys - cy
        if o["shape"] == "circle":
            mask = dx * dx + dy * dy <= r * r
        elif o["shape"] == "square":
            h = r * 0.9
            mask = (np.abs(dx) <= h) & (np.abs(dy) <= h)
        else:
            # Apex up, base at cy + r; half-width grows from 0 to r * 1.15 down the height.
            t = (dy + r) / (2 * r)
            mask = (t >= 0) & (t <= 1) & (np.abs(dx) <= t * r * 1.15)
        img[mask] = COLORS[o["color"]]
    img = img.reshape(height, ss, width, ss, 3).mean(axis=(1, 3))
    return np.round(img).astype(np.uint8)


def caption_corpus():
    """Every word a caption can hold, in caption-like sentences, for training the tokenizers."""
    lines = []
    for bg in _C:
        for color in _C:
            for shape in _S:
                for pos in _P:
                    for size in SIZES:
                        lines.append(_object_phrase(color, shape, size, pos) + f" on {article(bg)} {bg} background")
                for n, w in COUNT_WORDS.items():
                    lines.append(f"{w} {color} {plural(shape)} on {article(bg)} {bg} background")
    return lines


def held_out_prompts():
    """Test prompts made only of held-out combinations: every held-out triple on two
    backgrounds (one object, default size), plus every held-out count triple on one."""
    out = []
    for i, (color, shape, position) in enumerate(
            (c, s, p) for c in _C for s in _S for p in _P if held_out_triple(c, s, p)):
        others = [b for b in _C if b != color]
        for bg in (others[(7 * i + 3) % len(others)], others[(7 * i + 6) % len(others)]):
            out.append(dict(prompt=f"{_object_phrase(color, shape, None, position)} on {article(bg)} {bg} background",
                            color=color, shape=shape, position=position, background=bg, count=None))
    for i, (count, color, shape) in enumerate(
            (n, c, s) for n in COUNT_WORDS for c in _C for s in _S if held_out_count(n, c, s)):
        others = [b for b in _C if b != color]
        bg = others[(5 * i + 1) % len(others)]
        out.append(dict(prompt=f"{COUNT_WORDS[count]} {color} {plural(shape)} on {article(bg)} {bg} background",
                        color=color, shape=shape, position=None, background=bg, count=count))
    return out


def write_test_set(path: Path):
    """The held-out prompts and the palette, as the Rust quality test reads them."""
    path.write_text(json.dumps({
        "palette": COLORS,
        "grid": {k: v[0] for k, v in POSITIONS.items()},
        "prompts": held_out_prompts(),
    }, indent=1) + "\n")


if __name__ == "__main__":
    # `python scenes.py OUT.png N`: a contact sheet of N random scenes with their captions.
    from PIL import Image

    out, n = Path(sys.argv[1]), int(sys.argv[2])
    rng = np.random.default_rng(0)
    tiles = []
    for _ in range(n):
        scene, caption = sample_scene(rng)
        print(caption)
        tiles.append(render(scene, 64, 64))
    Image.fromarray(np.concatenate(tiles, axis=1)).save(out)
