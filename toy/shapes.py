"""The shapes world: synthetic image-text data that stands in for real data on a CPU.

32-pixel Pillow drawings of one or two coloured shapes, their captions, paraphrases and
compositional hard negatives in the SugarCrepe styles (replace / swap an attribute, an object or
the relation). Some colour-shape combinations are held out of training, to test generalization
to unseen compositions. Used only by the embedded default (toy/default.py); no method file imports it.
"""
import itertools
import random

from PIL import Image, ImageDraw

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (60, 100, 240),
          "yellow": (235, 215, 40), "purple": (160, 70, 210), "orange": (245, 140, 30)}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = {"small": 4, "large": 7}  # radius in pixels
SYNONYMS = {"small": "little", "large": "big"}
HELD_OUT = {("red", "triangle"), ("green", "circle"), ("blue", "cross"), ("yellow", "square")}
# A two-object scene is (first, second, relation) with the first left of / above the second;
# captions may say it either way round, so every scene has exactly one canonical key.
RELATIONS = {"left": ("to the left of", "to the right of"), "above": ("above", "below")}
IMAGE_SIZE = 32

OBJECTS = [(c, s, z) for c in COLORS for s in SHAPES for z in SIZES]  # 48 objects


def is_held_out(scene):
    return any((c, s) in HELD_OUT for c, s, _ in scene_objects(scene))


def scene_objects(scene):
    return scene[:2] if len(scene) == 3 else scene[:1]


def all_scenes():
    """Every distinct scene: 48 single objects and 48*47*2 ordered pairs."""
    singles = [(o,) for o in OBJECTS]
    pairs = [(a, b, rel) for a, b in itertools.permutations(OBJECTS, 2) for rel in RELATIONS]
    return singles + pairs


def split_scenes(seed=0, n_test=200):
    """{'train', 'test', 'ood', 'pretrain'}: test scenes never occur in training; 'ood' scenes
    contain a colour-shape combination that no 'train' scene (UniME's stages 1 and 2) contains.
    'pretrain' (the toy's stage 0) stands in for a real MLLM's pretraining, which has seen red
    triangles too: every scene but the two test sets."""
    scenes = all_scenes()
    random.Random(seed).shuffle(scenes)
    ood = [s for s in scenes if is_held_out(s)]
    seen = [s for s in scenes if not is_held_out(s)]
    return {"train": seen[n_test:], "test": seen[:n_test], "ood": ood[:n_test],
            "pretrain": seen[n_test:] + ood[n_test:]}


# ---------------------------------------------------------------- words

def object_phrase(obj, synonyms=False):
    color, shape, size = obj
    return f"a {SYNONYMS[size] if synonyms else size} {color} {shape}"


def caption(scene, flip=False, synonyms=False):
    """"a small red circle to the left of a large blue square"; with flip=True the same scene
    said from the other object ("a large blue square to the right of a small red circle")."""
    if len(scene) == 1:
        return object_phrase(scene[0], synonyms)
    a, b, rel = scene
    if flip:
        return f"{object_phrase(b, synonyms)} {RELATIONS[rel][1]} {object_phrase(a, synonyms)}"
    return f"{object_phrase(a, synonyms)} {RELATIONS[rel][0]} {object_phrase(b, synonyms)}"


def paraphrase(scene, rng):
    """Same scene, said differently: flipped relation and/or size synonyms (never identical)."""
    if len(scene) == 1:
        return caption(scene, synonyms=True)
    flip, syn = rng.choice([(True, False), (True, True), (False, True)])
    return caption(scene, flip=flip, synonyms=syn)


def keywords(scene):
    """The one-word answers of the toy's pretraining: colours and shapes in the scene."""
    return sorted({w for c, s, _ in scene_objects(scene) for w in (c, s)})


def _replace(obj, index, choices, rng):
    new = list(obj)
    new[index] = rng.choice([x for x in choices if x != obj[index]])
    return tuple(new)


def negative(scene, rng, kind=None):
    """A compositional hard negative (SugarCrepe styles) -> (kind, scene'), scene' != scene."""
    kinds = ["replace_att", "replace_obj"]
    if len(scene) == 3:
        a, b, rel = scene
        kinds.append("replace_rel")
        if a[0] != b[0]:
            kinds.append("swap_att")
        if a[1] != b[1]:
            kinds.append("swap_obj")
    kind = kind or rng.choice(kinds)
    if kind not in kinds:
        raise ValueError(f"negative kind {kind!r} does not apply to scene {scene}")
    objs = list(scene_objects(scene))
    i = rng.randrange(len(objs))
    if kind == "replace_att":
        objs[i] = _replace(objs[i], 0, list(COLORS), rng)
    elif kind == "replace_obj":
        objs[i] = _replace(objs[i], 1, SHAPES, rng)
    elif kind == "swap_att":
        objs = [(b[0], a[1], a[2]), (a[0], b[1], b[2])]
    elif kind == "swap_obj":
        objs = [(a[0], b[1], a[2]), (b[0], a[1], b[2])]
    if kind == "replace_rel":  # "left of" becomes "right of": the objects trade places
        return kind, (b, a, rel)
    return kind, tuple(objs) + scene[2:]


# ---------------------------------------------------------------- pictures

def draw(scene, rng):
    """A 32x32 RGB Pillow image of the scene, positions jittered by `rng`."""
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (24, 24, 24))
    pen = ImageDraw.Draw(img)
    h = IMAGE_SIZE // 2
    if len(scene) == 1:
        centers = [(h, h)]
    elif scene[2] == "left":
        centers = [(h // 2, h), (h + h // 2, h)]
    else:
        centers = [(h, h // 2), (h, h + h // 2)]
    jitter = 3 if len(scene) == 1 else 1
    for (color, shape, size), (x, y) in zip(scene_objects(scene), centers):
        x, y, r = x + rng.randint(-jitter, jitter), y + rng.randint(-jitter, jitter), SIZES[size]
        fill = COLORS[color]
        if shape == "circle":
            pen.ellipse((x - r, y - r, x + r, y + r), fill=fill)
        elif shape == "square":
            pen.rectangle((x - r + 1, y - r + 1, x + r - 1, y + r - 1), fill=fill)
        elif shape == "triangle":
            pen.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=fill)
        else:  # cross
            w = max(1, r // 3)
            pen.rectangle((x - r, y - w, x + r, y + w), fill=fill)
            pen.rectangle((x - w, y - r, x + w, y + r), fill=fill)
    return img
