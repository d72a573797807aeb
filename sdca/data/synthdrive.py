"""SynthDrive: procedural driving scenes in two domains, labelled with Cityscapes trainIds.

One scene model (:func:`sample_layout`: camera, road, sidewalks, buildings, vegetation, poles with lights and
signs, vehicles, people; placed on a ground plane and projected with a pinhole camera) is rendered in two
looks (:func:`render`): ``sim`` (flat shading, saturated palette, crisp edges, tail classes rare) and ``real``
(textures, shading, another colour temperature and exposure, blur, sensor noise, JPEG compression, another
camera height and field of view, other class frequencies). Labels depend on the layout only; the look changes
the pixels. Everything is drawn far to near, so occlusion follows depth.

Deterministic: a frame is a function of (version, domain, split, index). Frames are cached on disk as PNGs.
GENERATOR_VERSION is recorded with every cache; change it whenever the output changes.
"""
from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

GENERATOR_VERSION = "synthdrive-1.0"  # frozen: calibrated once (issue 6), then measured; change it with the output

ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, LIGHT, SIGN, VEGETATION, TERRAIN, SKY = range(11)
PERSON, RIDER, CAR, TRUCK, BUS, TRAIN, MOTORCYCLE, BICYCLE = range(11, 19)
CLASSES_USED = (ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, LIGHT, SIGN, VEGETATION, TERRAIN, SKY, PERSON,
                RIDER, CAR, TRUCK, BUS, MOTORCYCLE, BICYCLE)


@dataclass(frozen=True)
class DomainStyle:
    name: str
    camera_height: Tuple[float, float]  # metres
    fov_deg: Tuple[float, float]  # horizontal field of view
    pitch: Tuple[float, float]  # horizon position as a fraction of the height
    object_rate: Dict[int, float]  # expected count per frame of each object class
    palette: Dict[int, Tuple[int, int, int]]
    colour_jitter: float  # per-object colour variation
    texture: float  # amplitude of the per-class texture
    shading: float  # strength of the depth / light shading
    gains: Tuple[float, float, float]  # colour temperature (RGB gains)
    exposure: float
    blur_sigma: float
    noise_std: float
    jpeg_quality: Optional[int]


SIM = DomainStyle(
    name="sim", camera_height=(1.4, 1.6), fov_deg=(80, 90), pitch=(0.40, 0.46),
    object_rate={CAR: 3.0, TRUCK: 0.3, BUS: 0.2, PERSON: 1.5, RIDER: 0.15, BICYCLE: 0.15, MOTORCYCLE: 0.1,
                 POLE: 3.0, LIGHT: 0.6, SIGN: 0.8, VEGETATION: 2.5, FENCE: 0.4, WALL: 0.5},
    # Stylised, saturated and clean, but not the label palette: a colour must not name its class outright.
    palette={ROAD: (105, 95, 118), SIDEWALK: (190, 165, 180), BUILDING: (150, 118, 105), WALL: (172, 160, 138),
             FENCE: (140, 118, 85), POLE: (125, 125, 138), LIGHT: (60, 60, 40), SIGN: (40, 110, 215),
             VEGETATION: (55, 165, 40), TERRAIN: (150, 175, 75), SKY: (90, 160, 240), PERSON: (205, 60, 60),
             RIDER: (85, 60, 185), CAR: (40, 80, 205), TRUCK: (225, 225, 212), BUS: (245, 175, 20),
             MOTORCYCLE: (60, 60, 72), BICYCLE: (40, 95, 50)},
    colour_jitter=25.0, texture=0.0, shading=0.0, gains=(1.0, 1.0, 1.0), exposure=1.0, blur_sigma=0.0,
    noise_std=0.0, jpeg_quality=None)

REAL = DomainStyle(
    name="real", camera_height=(1.1, 1.3), fov_deg=(60, 70), pitch=(0.44, 0.52),
    object_rate={CAR: 4.0, TRUCK: 0.5, BUS: 0.4, PERSON: 2.5, RIDER: 0.6, BICYCLE: 0.6, MOTORCYCLE: 0.4,
                 POLE: 4.0, LIGHT: 1.0, SIGN: 1.2, VEGETATION: 3.5, FENCE: 0.8, WALL: 0.8},
    palette={ROAD: (92, 90, 94), SIDEWALK: (150, 140, 132), BUILDING: (120, 104, 92), WALL: (140, 130, 115),
             FENCE: (110, 100, 80), POLE: (80, 82, 86), LIGHT: (40, 40, 44), SIGN: (30, 90, 170),
             VEGETATION: (70, 100, 45), TERRAIN: (120, 120, 70), SKY: (185, 200, 215), PERSON: (90, 70, 60),
             RIDER: (60, 60, 90), CAR: (150, 40, 35), TRUCK: (200, 200, 190), BUS: (210, 160, 40),
             MOTORCYCLE: (40, 40, 45), BICYCLE: (30, 60, 40)},
    colour_jitter=30.0, texture=0.10, shading=0.35, gains=(1.08, 1.0, 0.88), exposure=0.85, blur_sigma=0.8,
    noise_std=6.0, jpeg_quality=70)

STYLES = {"sim": SIM, "real": REAL}

# Object sizes in metres (width, height) and where they stand: on the road or beside it.
_SIZES = {CAR: (1.8, 1.5), TRUCK: (2.5, 3.2), BUS: (2.6, 3.2), PERSON: (0.5, 1.75), RIDER: (0.6, 1.7),
          BICYCLE: (0.6, 1.0), MOTORCYCLE: (0.8, 1.1), POLE: (0.15, 4.5), VEGETATION: (3.0, 5.0), FENCE: (6.0, 1.2),
          WALL: (8.0, 2.0)}
_ON_ROAD = {CAR, TRUCK, BUS, RIDER, MOTORCYCLE, BICYCLE}


@dataclass
class Primitive:
    depth: float
    cls: int
    shape: str  # poly | rect | ellipse
    points: np.ndarray  # poly: [n, 2]; rect: [[x0, y0], [x1, y1]]; ellipse: [[cx, cy], [rx, ry]]
    tint: Tuple[float, float, float] = (0.0, 0.0, 0.0)  # per-object colour offset (scaled by the style)


@dataclass
class Layout:
    height: int
    width: int
    horizon: float
    primitives: List[Primitive] = field(default_factory=list)


def frame_seed(domain: str, split: str, index: int) -> int:
    key = f"{GENERATOR_VERSION}/{domain}/{split}/{index}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little")


def sample_layout(rng: np.random.Generator, style: DomainStyle, height: int, width: int) -> Layout:
    """A street scene on a ground plane; the same model for both domains, with the style's camera and rates."""
    cam_h = rng.uniform(*style.camera_height)
    fov = math.radians(rng.uniform(*style.fov_deg))
    focal = width / (2 * math.tan(fov / 2))
    horizon = height * rng.uniform(*style.pitch)
    vx = width * (0.5 + rng.uniform(-0.12, 0.12))  # vanishing point: the road bends left or right
    layout = Layout(height, width, horizon)
    far = 1e4

    def ground_y(z):
        return horizon + focal * cam_h / z

    def screen_x(x, z):  # x metres right of the camera at depth z, the road axis through the vanishing point
        t = min(1.0, 8.0 / z)
        return vx + (width / 2 - vx) * t + focal * x / z

    half_road = rng.uniform(3.5, 7.0)
    walk = rng.uniform(2.0, 4.0)
    bottom, top_z = height + 2, 200.0

    def strip(x0, x1, cls, depth):
        z_near = focal * cam_h / (bottom - horizon)
        pts = np.array([[screen_x(x0, top_z), ground_y(top_z)], [screen_x(x1, top_z), ground_y(top_z)],
                        [screen_x(x1, z_near), bottom], [screen_x(x0, z_near), bottom]])
        layout.primitives.append(Primitive(depth, cls, "poly", pts))

    # Ground first (everything stands on it): terrain, sidewalks, road; then lane marks as road (labels stay).
    strip(-60, 60, TERRAIN, far)
    strip(-half_road - walk, half_road + walk, SIDEWALK, far - 1)
    strip(-half_road, half_road, ROAD, far - 2)

    # Facades along both sides, far to near.
    for side in (-1, 1):
        z = rng.uniform(6, 12)
        while z < 120:
            depth_len = rng.uniform(8, 25)
            x_in = side * (half_road + walk + rng.uniform(0.5, 3.0))
            h_m = rng.uniform(6, 25)
            z0, z1 = z, z + depth_len
            pts = np.array([[screen_x(x_in, z0), ground_y(z0) - focal * h_m / z0],
                            [screen_x(x_in, z1), ground_y(z1) - focal * h_m / z1],
                            [screen_x(x_in, z1), ground_y(z1)], [screen_x(x_in, z0), ground_y(z0)]])
            outer = x_in + side * 40
            pts = np.vstack([pts, [[screen_x(outer, z0), ground_y(z0)], [screen_x(outer, z0),
                                                                          ground_y(z0) - focal * h_m / z0]]])
            cls = BUILDING if rng.random() > 0.1 else VEGETATION
            layout.primitives.append(Primitive(z0 + 50, cls, "poly", pts, tuple(rng.normal(0, 1, 3))))
            z = z1 + rng.uniform(0, 6)

    # Objects: Poisson counts per class at depths on the road or beside it.
    for cls, rate in style.object_rate.items():
        for _ in range(rng.poisson(rate)):
            z = rng.uniform(4, 60)
            if cls in _ON_ROAD:
                x = rng.uniform(-half_road + 1, half_road - 1)
            elif cls in (LIGHT, SIGN):
                x = rng.choice([-1, 1]) * (half_road + rng.uniform(0.2, walk))
            elif cls in (FENCE, WALL):
                x = rng.choice([-1, 1]) * (half_road + walk - 0.2)
            else:
                x = rng.choice([-1, 1]) * (half_road + rng.uniform(0.3, walk + 2))
            _add_object(layout, rng, cls, x, z, ground_y, screen_x, focal)
    layout.primitives.sort(key=lambda p: -p.depth)  # far to near: nearer objects occlude
    return layout


def _add_object(layout, rng, cls, x, z, ground_y, screen_x, focal):
    gy, sx = ground_y(z), screen_x(x, z)
    tint = tuple(rng.normal(0, 1, 3))
    if cls in (LIGHT, SIGN):  # on a pole
        pole_h = rng.uniform(3.0, 5.0)
        pw = max(1.0, focal * 0.12 / z)
        top = gy - focal * pole_h / z
        layout.primitives.append(Primitive(z, POLE, "rect", np.array([[sx - pw / 2, top], [sx + pw / 2, gy]])))
        box_w, box_h = (0.35, 0.9) if cls == LIGHT else (0.7, 0.7)
        bw, bh = focal * box_w / z, focal * box_h / z
        shape = "ellipse" if cls == SIGN and rng.random() < 0.5 else "rect"
        pts = (np.array([[sx, top + bh / 2], [bw / 2, bh / 2]]) if shape == "ellipse"
               else np.array([[sx - bw / 2, top], [sx + bw / 2, top + bh]]))
        layout.primitives.append(Primitive(z - 0.01, cls, shape, pts, tint))
        return
    w_m, h_m = _SIZES[cls]
    w_m *= rng.uniform(0.85, 1.2)
    h_m *= rng.uniform(0.9, 1.15)
    w, h = focal * w_m / z, focal * h_m / z
    if cls == VEGETATION:  # a tree: trunk and canopy (both vegetation)
        layout.primitives.append(Primitive(z, cls, "rect", np.array([[sx - w * 0.06, gy - h * 0.5], [sx + w * 0.06, gy]]), tint))
        layout.primitives.append(Primitive(z - 0.01, cls, "ellipse", np.array([[sx, gy - h * 0.65], [w / 2, h * 0.38]]), tint))
    elif cls in (PERSON, RIDER):
        if cls == RIDER:  # on a bicycle or motorcycle
            bike = BICYCLE if rng.random() < 0.6 else MOTORCYCLE
            layout.primitives.append(Primitive(z, bike, "rect", np.array([[sx - w, gy - h * 0.45], [sx + w, gy]]), tint))
            gy -= h * 0.3
        head = h * 0.13
        layout.primitives.append(Primitive(z - 0.01, cls, "rect", np.array([[sx - w / 2, gy - h + 2 * head], [sx + w / 2, gy]]), tint))
        layout.primitives.append(Primitive(z - 0.02, cls, "ellipse", np.array([[sx, gy - h + head], [head * 0.8, head]]), tint))
    elif cls in (CAR, TRUCK, BUS):
        layout.primitives.append(Primitive(z, cls, "rect", np.array([[sx - w / 2, gy - h * 0.7], [sx + w / 2, gy]]), tint))
        cabin = 0.6 if cls == CAR else 0.95
        cab = np.array([[sx - w * cabin / 2, gy - h], [sx + w * cabin / 2, gy - h * 0.6]])
        layout.primitives.append(Primitive(z - 0.01, cls, "rect", cab, tint))
    else:  # pole, fence, wall, bicycle, motorcycle standing alone
        layout.primitives.append(Primitive(z, cls, "rect", np.array([[sx - w / 2, gy - h], [sx + w / 2, gy]]), tint))


def render(layout: Layout, style: DomainStyle, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """(uint8 RGB image [H, W, 3], uint8 trainId labels [H, W]) of ``layout`` in ``style``'s look."""
    import cv2

    h, w = layout.height, layout.width
    labels = np.full((h, w), SKY, dtype=np.uint8)
    image = np.empty((h, w, 3), dtype=np.float32)
    image[:] = style.palette[SKY]
    if style.shading > 0:  # a brighter sky towards the horizon
        ramp = np.linspace(1 - style.shading * 0.5, 1.05, h, dtype=np.float32)[:, None, None]
        image *= ramp
    for p in layout.primitives:
        colour = np.clip(np.asarray(style.palette[p.cls], np.float32) + style.colour_jitter * np.asarray(p.tint,
                                                                                                     np.float32), 0, 255)
        if style.shading > 0:  # farther is hazier
            haze = min(1.0, p.depth / 150.0) * style.shading
            colour = colour * (1 - haze) + np.asarray(style.palette[SKY], np.float32) * haze
        _draw(labels, image, p, int(p.cls), tuple(float(c) for c in colour), cv2)
    if style.texture > 0:
        low = rng.normal(0, 1, (h // 8 + 1, w // 8 + 1)).astype(np.float32)
        low = cv2.resize(low, (w, h), interpolation=cv2.INTER_LINEAR)
        fine = rng.normal(0, 0.5, (h, w)).astype(np.float32)
        surface = (labels != SKY).astype(np.float32)  # real skies are smooth; surfaces carry texture
        image *= (1 + style.texture * surface * (low + fine))[..., None]
    image *= np.asarray(style.gains, np.float32) * style.exposure
    if style.blur_sigma > 0:
        image = cv2.GaussianBlur(image, (0, 0), style.blur_sigma)
    if style.noise_std > 0:
        image += rng.normal(0, style.noise_std, image.shape).astype(np.float32)
    out = np.clip(image, 0, 255).astype(np.uint8)
    if style.jpeg_quality:
        ok, data = cv2.imencode(".jpg", out[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, style.jpeg_quality])
        out = cv2.imdecode(data, cv2.IMREAD_COLOR)[..., ::-1].copy()
    return out, labels


def _draw(labels, image, p: Primitive, cls: int, colour, cv2) -> None:
    # No anti-aliasing: labels must be exact, and the real look gets its soft edges from the blur.
    if p.shape == "poly":
        pts = np.round(p.points).astype(np.int32).reshape(-1, 1, 2)
        cv2.fillPoly(labels, [pts], cls, lineType=cv2.LINE_8)
        cv2.fillPoly(image, [pts], colour, lineType=cv2.LINE_8)
    elif p.shape == "rect":
        (x0, y0), (x1, y1) = np.round(p.points).astype(np.int32)
        if x1 >= x0 and y1 >= y0:
            cv2.rectangle(labels, (int(x0), int(y0)), (int(x1), int(y1)), cls, thickness=-1)
            cv2.rectangle(image, (int(x0), int(y0)), (int(x1), int(y1)), colour, thickness=-1)
    else:
        (cx, cy), (rx, ry) = p.points
        centre, axes = (int(round(cx)), int(round(cy))), (max(1, int(round(rx))), max(1, int(round(ry))))
        cv2.ellipse(labels, centre, axes, 0, 0, 360, cls, thickness=-1, lineType=cv2.LINE_8)
        cv2.ellipse(image, centre, axes, 0, 0, 360, colour, thickness=-1, lineType=cv2.LINE_8)


def generate_frame(domain: str, split: str, index: int, height: int = 256, width: int = 512):
    """Frame ``index`` of a domain's split: (image, labels), deterministic."""
    style = STYLES[domain]
    rng = np.random.default_rng(frame_seed(domain, split, index))
    layout = sample_layout(rng, style, height, width)
    return render(layout, style, rng)


class SynthDriveCache:
    """Frames of one domain and split, generated on first use into ``root/<version>/<domain>/<split>/`` as
    ``images/NNNNNN.png`` and ``labels/NNNNNN.png`` (atomic writes), then read back like any folder."""

    def __init__(self, root: str, domain: str, split: str, num_frames: int, height: int = 256, width: int = 512,
                 progress: bool = False):
        if domain not in STYLES:
            raise ValueError(f"SynthDrive domain must be one of {', '.join(STYLES)}, got {domain!r}")
        if num_frames < 1:
            raise ValueError(f"num_frames must be at least 1, got {num_frames}")
        self.folder = os.path.join(root, GENERATOR_VERSION, f"{domain}_{width}x{height}", split)
        self.domain, self.split, self.num_frames, self.height, self.width = domain, split, num_frames, height, width
        self.ensure(progress)

    def names(self) -> List[str]:
        return [f"{i:06d}.png" for i in range(self.num_frames)]

    def ensure(self, progress: bool = False) -> int:
        """Generate the frames that are not on disk yet; returns how many were made."""
        from tqdm.auto import tqdm

        from .io import write_png

        missing = [i for i, n in enumerate(self.names())
                   if not (os.path.isfile(os.path.join(self.folder, "images", n))
                           and os.path.isfile(os.path.join(self.folder, "labels", n)))]
        for i in tqdm(missing, desc=f"SynthDrive {self.domain}/{self.split}", disable=not (progress and missing)):
            image, labels = generate_frame(self.domain, self.split, i, self.height, self.width)
            name = f"{i:06d}.png"
            write_png(os.path.join(self.folder, "labels", name), labels)
            write_png(os.path.join(self.folder, "images", name), image)
        return len(missing)
