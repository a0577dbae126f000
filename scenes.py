"""
The synthetic scene generator behind data.py's synthetic set: draw_scene(rng, size) paints one
scene of shapes and returns (uint8 size x size x 3 image, uint8 size x size label).

Classes are defined by shape; colour, texture, size, position, rotation, occlusion and noise
are random, so colour alone says nothing. Two pairs of classes differ only by a small detail
(square / holed square) or by what surrounds them (cross / cross on panel), so a model needs
capacity and a receptive field larger than the object.

Lengths below are pixels of a 96 x 96 image, scaled with size. A scene is
1. a background: a random colour, flat or textured, a linear shading and 0-2 soft colour blobs
   (colour without shape, so still background);
2. in 60% of the scenes a panel: a large rectangle (44-64 a side), turned by up to 0.3 rad;
3. 4-8 tries to place an object of radius r = 9-15 at a random angle, covering earlier objects
   by at most a quarter of its disc (occlusion): disc; equilateral triangle (r 25% larger, to
   give it a similar area); square (side 1.6 r); holed square (a hole of radius 0.22-0.32 r,
   off-centre by up to 0.3 r: its only difference from a square); cross (arms 0.6-0.9 r wide)
   wholly off the panel; cross on panel (wholly on it).
Every painted region gets a random colour at least 90 (RGB distance) away from the mean of what
it covers and a random texture; then Gaussian pixel noise (sigma 0-8) over everything.

The random numbers are drawn in a fixed order from the one generator passed in, so the same
generator state always gives the same scene: reordering the draws below changes every scene.
"""

import numpy as np
from PIL import Image

SYNTHETIC_CLASSES = (
    "background", "disc", "triangle", "panel", "square", "holed square", "cross", "cross on panel")
SYNTHETIC_OBJECTS = ("disc", "triangle", "square", "holed square", "cross", "cross on panel")


def rotated(x, y, angle):
    """Coordinates (x, y) in the frame turned by `angle`."""
    c, s = np.cos(angle), np.sin(angle)
    return x * c + y * s, -x * s + y * c


class Canvas:
    """A scene being drawn: its image, label and the pixels objects cover so far (the panel does
    not count), with the random generator every draw comes from."""

    def __init__(self, rng, size):
        self.rng, self.size, self.unit = rng, size, size / 96
        self.yy, self.xx = np.mgrid[0:size, 0:size].astype(np.float32)
        self.image = None  # draw_background paints it first
        self.label = np.zeros((size, size), np.uint8)
        self.taken = np.zeros((size, size), bool)

    def window(self, cx, cy, extent):
        """Slices of the square around (cx, cy) and its pixel coordinates relative to the centre."""
        y0, y1 = max(0, int(cy - extent) - 1), min(self.size, int(cy + extent) + 2)
        x0, x1 = max(0, int(cx - extent) - 1), min(self.size, int(cx + extent) + 2)
        return (slice(y0, y1), slice(x0, x1)), self.xx[y0:y1, x0:x1] - cx, self.yy[y0:y1, x0:x1] - cy

    def texture(self, x, y, colour):
        """colour over the pixels (x, y): flat (half the time), stripes or blotches."""
        rng = self.rng
        kind = rng.integers(4)
        if kind < 2:
            return np.broadcast_to(colour, x.shape + (3,))
        if kind == 2:
            angle, period = rng.uniform(0, np.pi), rng.uniform(3, 10) * self.unit
            t = np.sin((x * np.cos(angle) + y * np.sin(angle)) * (2 * np.pi / period))
        else:
            coarse = rng.uniform(-1, 1, (5, 5)).astype(np.float32)
            t = np.asarray(Image.fromarray(coarse).resize(x.shape[::-1], Image.BILINEAR))
        return colour + rng.uniform(-1, 1, 3).astype(np.float32) * rng.uniform(20, 50) * t[..., None]

    def contrasting(self, covered):
        """A random colour at least 90 away from the mean colour of the pixels it covers."""
        mean = covered.reshape(-1, 3).mean(0)
        for _ in range(20):
            colour = self.rng.uniform(0, 255, 3).astype(np.float32)
            if np.linalg.norm(colour - mean) > 90:
                break
        return colour

    def paint(self, sub, mask, x, y, cls):
        """Paint the pixels `mask` of window `sub` as class cls, in a contrasting textured colour."""
        region = self.image[sub]  # a view: painting it paints the image
        region[mask] = self.texture(x, y, self.contrasting(region[mask]))[mask]
        self.label[sub][mask] = cls
        self.taken[sub][mask] = True

    def free_spot(self, r, inside):
        """A centre whose disc of radius r lies inside `inside` and overlaps objects by <= 1/4."""
        for _ in range(20):
            cx, cy = self.rng.uniform(r, self.size - r, 2)
            sub, x, y = self.window(cx, cy, r)
            disc = x * x + y * y <= r * r
            if inside[sub][disc].all() and self.taken[sub][disc].sum() <= disc.sum() / 4:
                return cx, cy
        return None


def draw_background(canvas):
    """A textured random colour, a linear shading and 0-2 soft colour blobs."""
    rng, xx, yy, size = canvas.rng, canvas.xx, canvas.yy, canvas.size
    image = canvas.texture(xx, yy, rng.uniform(0, 255, 3).astype(np.float32)).copy()
    u, _ = rotated(xx, yy, rng.uniform(0, 2 * np.pi))
    image += rng.uniform(-40, 40, 3).astype(np.float32) * (u / size)[..., None]
    for _ in range(rng.integers(0, 3)):
        cx, cy = rng.uniform(0, size, 2)
        s = rng.uniform(6, 14) * canvas.unit
        w = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * s * s))[..., None]
        image = image * (1 - w) + rng.uniform(0, 255, 3).astype(np.float32) * w
    canvas.image = image


def draw_panel(canvas):
    """In 60% of the scenes a turned rectangle; returns its pixels (all False without one)."""
    rng, size = canvas.rng, canvas.size
    panel = np.zeros((size, size), bool)
    if rng.random() < 0.6:
        a, b = rng.uniform(22, 32, 2) * canvas.unit
        cx, cy = rng.uniform(a, size - a), rng.uniform(b, size - b)
        sub, x, y = canvas.window(cx, cy, np.hypot(a, b))
        u, v = rotated(x, y, rng.uniform(-0.3, 0.3))
        panel[sub] = (abs(u) <= a) & (abs(v) <= b)
        canvas.paint(sub, panel[sub], x, y, SYNTHETIC_CLASSES.index("panel"))
        canvas.taken[:] = False  # objects may cover the panel freely
    return panel


def object_mask(name, u, v, r, rng):
    """The pixels of object `name` of radius r, at coordinates (u, v) in its own turned frame."""
    if name == "disc":
        return u * u + v * v <= r * r
    if name == "triangle":  # three half-planes at distance r/2 from the centre
        return np.all([u * np.cos(a) + v * np.sin(a) <= r / 2 for a in np.arange(3) * 2 * np.pi / 3], axis=0)
    if name in ("square", "holed square"):
        mask = np.maximum(abs(u), abs(v)) <= 0.8 * r
        if name == "holed square":
            hx, hy = rng.uniform(-0.3, 0.3, 2) * r
            mask &= (u - hx) ** 2 + (v - hy) ** 2 > (rng.uniform(0.22, 0.32) * r) ** 2
        return mask
    arm = rng.uniform(0.3, 0.45) * r  # the crosses
    return ((abs(u) <= arm) & (abs(v) <= r)) | ((abs(v) <= arm) & (abs(u) <= r))


def draw_objects(canvas, panel):
    """4-8 tries to place a random object where it fits (crosses on or off the panel)."""
    rng = canvas.rng
    anywhere = np.ones(panel.shape, bool)
    for _ in range(rng.integers(4, 9)):
        names = SYNTHETIC_OBJECTS if panel.any() else SYNTHETIC_OBJECTS[:-1]
        name = names[rng.integers(len(names))]
        r = rng.uniform(9, 15) * canvas.unit * (1.25 if name == "triangle" else 1.0)
        at = canvas.free_spot(r, panel if name == "cross on panel" else ~panel if name == "cross" else anywhere)
        if at is None:
            continue
        angle = rng.uniform(0, 2 * np.pi)
        sub, x, y = canvas.window(*at, r)
        u, v = rotated(x, y, angle)
        canvas.paint(sub, object_mask(name, u, v, r, rng), x, y, SYNTHETIC_CLASSES.index(name))


def draw_scene(rng, size):
    """One scene (see the top): (uint8 size x size x 3 image, uint8 size x size label)."""
    canvas = Canvas(rng, size)
    draw_background(canvas)
    panel = draw_panel(canvas)
    draw_objects(canvas, panel)
    image = canvas.image + rng.normal(0, rng.uniform(0, 8), canvas.image.shape).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8), canvas.label
