"""The glyphs dataset: characters rendered with the text fonts matplotlib ships, 100 classes at
32x32 RGB, written once as a folder-per-class JPEG tree (``train/``, ``val/``, ``test/``). Made
offline from installed packages (matplotlib's fonts, PIL, numpy, fontTools), in seconds.

Why it suits distillation: the classes come in families that look alike (O 0 o Q D, l 1 I | i
!, S 5 s $, rn m, vv w, cl d, ...), and the validation and test images are drawn in fonts that
no training image uses, so a model must generalise across typefaces and its mistakes fall
inside the families: a teacher's soft labels say which.

Design, per image (every random draw comes from its own generator, seeded by (seed, split,
class, index), so the tree is a pure function of the seed and does not depend on build order):

- Fonts: the 22 text faces (DejaVu Sans, Sans Mono and Serif in four styles, STIXGeneral in
  four, Computer Modern cmr10 cmb10 cmss10 cmtt10 cmti10 cmmi10). A (font, class) pair is used
  only if the font's character map sends each character to the glyph of that name (Adobe's
  glyph list): Computer Modern's TeX encoding puts other glyphs at ``< > \\ | { } ^ _ ~ " '``
  and cmmi10's digits are old-style, and those are left out rather than mislabelled. The fonts
  are split into train / val / test, disjoint (``FONT_SPLITS``); each split holds a DejaVu face,
  which has every class, so every class appears in every split. Each class takes the same
  number of images per split, its split's fonts used in turn.
- Drawing, at twice the final size (64 px, then box-filtered down to 32 for anti-aliasing): the
  text is centred horizontally and its baseline sits at a fixed height, so size and height
  carry meaning as in printed text (o is smaller than O, ``.`` sits low, ``'`` high). Font size
  19-25 px at 32 px (wider bigrams are shrunk to fit); stroke thickened by 0, 0.5 or 1 px or
  thinned by 0.5 px.
- Clutter: partly cut neighbour characters to the left and right, in the same ink, as in a
  crop of a line of text (each side with probability 0.5, at least a third of the font size
  away); sometimes an underline.
- Affine distortion about the centre: rotation within +-12 degrees, shear within +-0.25,
  scale 0.85-1.15 per axis, shift within +-2 px.
- Colour: dark ink on a light ground (70%) or the reverse, grey levels at least 0.35 apart,
  each colour tinted by a random zero-mean RGB offset, the ground shaded by a linear gradient;
  then a Gaussian blur of 0-0.6 px and Gaussian pixel noise of sigma 0-0.06. (The issue's probe
  found that fully random colours per image leave nothing learnable in a short run; the
  luminance gap keeps the glyph readable while colour varies.)
"""

import functools
import json
import math
import os
import string

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from ..files import atomic_write, user_cache_dir
from .written import MANIFEST, complete_manifest, foreign_entries

VERSION = 1  # of the rendering recipe: a manifest of another version is rebuilt
IMAGE_SIZE = 32
SUPERSAMPLE = 2  # glyphs are drawn at IMAGE_SIZE * SUPERSAMPLE, then box-filtered down
SPLITS = ("train", "val", "test")
PER_CLASS = {"train": 60, "val": 15, "test": 15}  # images of each class in each split

# The classes: the 62 alphanumerics, the 32 ASCII punctuation marks and 6 bigrams, 100 in all.
# They are listed family by family (the single letters closing FAMILIES are the bigrams'
# look-alikes); the order fixes each class's random draws, the labels follow the folder names.
FAMILIES = ("O0oQD", "l1I|i!", "S5s$", "Z2z", "B8&", "G6b", "g9q", "A4", "Uu", "Vv", "Ww", "Cc",
            "Xx", "Kk", "Pp", "Yy", "T7", "E3", "(){}[]<>", ",.;:'`\"", "-_~^=+", "/\\", "*#%@?",
            "n", "h", "r", "m", "d", "w")
ALPHANUMERICS = string.ascii_lowercase + string.ascii_uppercase + string.digits
BIGRAMS = ("rn", "cl", "vv", "VV", "nn", "ll")  # look like m, d, w, W, m, ll/11/II
TEXT = tuple(dict.fromkeys(
    [c for family in FAMILIES for c in family]
    + list(ALPHANUMERICS) + list(string.punctuation) + list(BIGRAMS)))

# Glyphs the character map names right but draws as another character: cmti10's "$" is TeX's
# italic pound sign (seen in the rendered images).
MISDRAWN = {"cmti10": "$"}

# Disjoint font splits: the held-out faces each have a relative in training (another style of
# the same family, or a face of the same kind), so they are new but not alien.
FONT_SPLITS = {
    "train": ("DejaVuSans", "DejaVuSans-Bold", "DejaVuSans-Oblique", "DejaVuSansMono",
              "DejaVuSansMono-Oblique", "DejaVuSansMono-BoldOblique", "DejaVuSerif",
              "DejaVuSerif-BoldItalic", "STIXGeneral", "STIXGeneralBolIta", "cmr10", "cmtt10",
              "cmti10", "cmmi10"),
    "val": ("DejaVuSans-BoldOblique", "DejaVuSerif-Bold", "STIXGeneralItalic", "cmss10"),
    "test": ("DejaVuSansMono-Bold", "DejaVuSerif-Italic", "STIXGeneralBol", "cmb10"),
}


def class_folder(text):
    """A folder name safe on every filesystem: code points, ``U+0041`` or ``U+0072_U+006E``."""
    return "_".join(f"U+{ord(char):04X}" for char in text)


CLASS_FOLDERS = {class_folder(text): text for text in TEXT}


def font_dir():
    import matplotlib

    return os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "fonts", "ttf")


@functools.lru_cache(maxsize=None)
def covered(font):
    """The characters whose glyph in ``font`` is the one the character names (fontTools reads
    the character map; matplotlib depends on fontTools)."""
    from fontTools.agl import UV2AGL
    from fontTools.ttLib import TTFont

    cmap = TTFont(os.path.join(font_dir(), font + ".ttf"), lazy=True).getBestCmap() or {}
    chars = {char for text in TEXT for char in text}
    return frozenset(char for char in chars if char not in MISDRAWN.get(font, "")
                     and cmap.get(ord(char)) in (UV2AGL.get(ord(char)), f"uni{ord(char):04X}"))


def fonts_for(text, split):
    """The fonts of ``split`` that draw every character of ``text``."""
    return [font for font in FONT_SPLITS[split] if set(text) <= covered(font)]


@functools.lru_cache(maxsize=None)
def _truetype(font, size):
    return ImageFont.truetype(os.path.join(font_dir(), font + ".ttf"), size)


def _rng(seed, split, label, index):
    return np.random.default_rng([seed, SPLITS.index(split), label, index])


def _draw_mask(text, font, rng):
    """The ink of ``text`` and its clutter as an 8-bit mask at the supersampled size."""
    side = IMAGE_SIZE * SUPERSAMPLE
    size = int(rng.integers(19, 26)) * SUPERSAMPLE
    face = _truetype(font, size)
    if face.getlength(text) > 0.85 * side:  # a wide bigram: shrink it to fit
        size = int(size * 0.85 * side / face.getlength(text))
        face = _truetype(font, size)
    stroke = int(rng.choice([0, 0, 0, 1, 2]))
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    baseline = side / 2 + 0.36 * size  # cap height ~0.72 em, centred
    left, _, right, _ = draw.textbbox((0, baseline), text, font=face, anchor="ls")
    x = (side - (right - left)) / 2 - left
    draw.text((x, baseline), text, fill=255, font=face, anchor="ls", stroke_width=stroke)
    _draw_neighbours(draw, face, rng, x + left, x + right, baseline, size, stroke)
    if rng.random() < 0.15:  # an underline
        y = baseline + size * rng.uniform(0.1, 0.25)
        draw.line([(0, y), (side, y)], fill=255, width=max(1, size // 14))
    if stroke == 0 and rng.random() < 0.25:
        mask = mask.filter(ImageFilter.MinFilter(3))  # thinner strokes
    return mask


def _draw_neighbours(draw, face, rng, left, right, baseline, size, stroke):
    """Partly visible characters beside the glyph, as in a crop of a line of text."""
    for side in (-1, 1):
        if rng.random() >= 0.5:
            continue
        char = ALPHANUMERICS[int(rng.integers(len(ALPHANUMERICS)))]
        gap = size * rng.uniform(0.35, 0.6)
        if side < 0:
            x = left - gap - face.getlength(char)
        else:
            x = right + gap
        draw.text((x, baseline), char, fill=255, font=face, anchor="ls", stroke_width=stroke)


def _affine(mask, rng):
    """Rotate, shear and scale about the centre, then shift (PIL maps output to input pixels,
    so it takes the inverse matrix)."""
    side = mask.size[0]
    angle = math.radians(rng.uniform(-12, 12))
    shear = rng.uniform(-0.25, 0.25)
    scale_x, scale_y = rng.uniform(0.85, 1.15, size=2)
    shift = rng.uniform(-2, 2, size=2) * SUPERSAMPLE
    cos, sin = math.cos(angle), math.sin(angle)
    linear = (np.array([[cos, -sin], [sin, cos]]) @ np.array([[1, shear], [0, 1]])
              @ np.diag([scale_x, scale_y]))
    centre = np.array([side / 2, side / 2])
    inverse = np.linalg.inv(linear)
    offset = centre - inverse @ (centre + shift)
    data = (*inverse[0], offset[0], *inverse[1], offset[1])
    return mask.transform(mask.size, Image.Transform.AFFINE, data, Image.Resampling.BILINEAR)


def _colours(rng):
    """Ink and ground RGB in [0, 1]: grey levels at least 0.35 apart, each tinted."""
    gap = rng.uniform(0.35, 0.8)
    ground = rng.uniform(gap, 1.0)
    ink = ground - gap
    if rng.random() < 0.3:  # light ink on a dark ground
        ink, ground = 1 - ink, 1 - ground

    def tint(level):
        offset = rng.uniform(-0.2, 0.2, size=3)
        return np.clip(level + offset - offset.mean(), 0, 1)

    return tint(ink), tint(ground)


def render(text, font, rng):
    """One 32x32 RGB uint8 image of ``text`` in ``font``."""
    mask = _affine(_draw_mask(text, font, rng), rng)
    mask = mask.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)
    blur = rng.uniform(0, 0.6)
    if blur > 0.2:
        mask = mask.filter(ImageFilter.GaussianBlur(blur))
    alpha = np.asarray(mask, dtype=np.float32)[..., None] / 255
    ink, ground = _colours(rng)
    ramp = np.linspace(-0.5, 0.5, IMAGE_SIZE, dtype=np.float32)
    direction = rng.normal(size=2)
    shade = (ramp[None, :] * direction[0] + ramp[:, None] * direction[1]) * rng.uniform(0, 0.2)
    background = np.clip(ground[None, None, :] + shade[..., None], 0, 1)
    image = background * (1 - alpha) + ink[None, None, :] * alpha
    image = image + rng.normal(0, rng.uniform(0, 0.06), size=image.shape)
    return np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)


def _plan(per_class):
    """{relative path: (text, font, split, label, index)} for every image, in a fixed order."""
    plan = {}
    for split in SPLITS:
        for label, text in enumerate(TEXT):
            fonts = fonts_for(text, split)
            for index in range(per_class[split]):
                name = f"{split}/{class_folder(text)}/{index:04d}.jpeg"
                plan[name] = (text, fonts[index % len(fonts)], split, label, index)
    return plan


def _complete(root, seed, per_class):
    """Whether ``root`` holds a complete tree made with these settings."""
    manifest = complete_manifest(root)
    return manifest is not None and (manifest.get("version"), manifest.get("seed"),
                                     manifest.get("per_class")) == (VERSION, seed, per_class)


def foreign_glyph_entries(root):
    """None if ``root`` may hold the glyph tree, else what else is there, in words
    (``written.foreign_entries``)."""
    return foreign_entries(root, SPLITS, CLASS_FOLDERS, "glyph dataset", "glyphs", "its images")


def build_glyph_dataset(root, seed=0, per_class=None):
    """Write the glyph tree under ``root`` (``<split>/<class folder>/<index>.jpeg`` for the
    splits train, val and test; ``per_class`` images of each class per split, default
    ``PER_CLASS``), unless a complete one made with the same settings is already there; returns
    ``root``. A tree with a missing file, or made with another seed, size or recipe version, is
    rebuilt. A folder holding anything else is refused (ValueError) before anything is written.
    The manifest, written last and atomically, records the settings, the classes (folder ->
    text), each split's fonts and each file's font."""
    per_class = dict(per_class or PER_CLASS)
    if _complete(root, seed, per_class):
        return root
    problem = foreign_glyph_entries(root)
    if problem:
        raise ValueError(f"{root} {problem}")
    plan = _plan(per_class)
    for folder in {os.path.dirname(name) for name in plan}:
        os.makedirs(os.path.join(root, folder), exist_ok=True)
    for name, (text, font, split, label, index) in plan.items():
        pixels = render(text, font, _rng(seed, split, label, index))
        Image.fromarray(pixels).save(os.path.join(root, name), quality=90)
    manifest = {"version": VERSION, "seed": seed, "per_class": per_class,
                "image_size": IMAGE_SIZE, "classes": CLASS_FOLDERS, "fonts": FONT_SPLITS,
                "files": {name: font for name, (_, font, *_) in plan.items()}}
    with atomic_write(os.path.join(root, MANIFEST)) as handle:
        json.dump(manifest, handle, indent=1)
    return root


def default_glyph_root():
    return os.path.join(user_cache_dir(), "glyphs")
