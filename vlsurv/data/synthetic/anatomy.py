"""Anatomy and findings of the synthetic chest CT, drawn as a label map and turned into HU.

Coordinates are millimetres in RAS+ (x toward the patient's right, y anterior, z superior) with the
origin at the centre of the volume. A volume has shape (X, Y, Z); ``render_scan`` returns int16 HU of
that shape and boolean masks (X, Y, Z) of every finding, so tests can check that findings are visible.
The normal anatomy is drawn once per grid (``base_labels``); per patient only the findings are drawn
(in their bounding boxes) and the voxel noise is added.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from enum import IntEnum

import numpy as np

#: The field of view (mm) the anatomy needs along x, y, z; smaller grids would cut findings off.
MIN_FOV_MM = (340.0, 250.0, 286.0)
#: Field of view used when no spacing is given: spacing = STANDARD_FOV_MM / shape.
STANDARD_FOV_MM = (384.0, 384.0, 384.0)

LOBES = ("RUL", "RML", "RLL", "LUL", "LLL")
#: Node stations -> centre (mm) and the side they belong to ("R", "L" or "M" for midline).
NODE_STATIONS: dict[str, tuple[tuple[float, float, float], str]] = {
    "right paratracheal": ((18.0, -6.0, 102.0), "R"),
    "left paratracheal": ((-17.0, -10.0, 110.0), "L"),
    "prevascular": ((2.0, 52.0, 100.0), "M"),
    "aortopulmonary window": ((-26.0, 8.0, 68.0), "L"),
    "subcarinal": ((0.0, -20.0, 58.0), "M"),
    "right hilar": ((46.0, -14.0, 42.0), "R"),
    "left hilar": ((-49.0, -16.0, 45.0), "L"),
}
VESSELS = ("right pulmonary artery", "left pulmonary artery", "superior vena cava")
#: Vertebral levels from the top of T1 (z = 150 mm) downward, 22 mm each.
VERTEBRAE = tuple([f"T{k}" for k in range(1, 13)] + ["L1", "L2"])
_SPINE_TOP_MM, _LEVEL_MM = 150.0, 22.0


class Tissue(IntEnum):
    AIR = 0
    FAT = 1
    MUSCLE = 2
    RIGHT_LUNG = 3
    LEFT_LUNG = 4
    MEDIASTINAL_FAT = 5
    HEART = 6
    BLOOD_POOL = 7
    AORTA = 8
    PULMONARY_ARTERY = 9
    SVC = 10
    AIRWAY = 11
    ESOPHAGUS = 12
    VERTEBRA = 13
    RIB = 14
    DISC = 15
    CSF = 16
    LIVER = 17
    SPLEEN = 18
    STOMACH = 19
    ADRENAL = 20
    ABDOMEN = 21
    NORMAL_NODE = 22
    TUMOR = 30
    NODE = 31
    EFFUSION = 32
    METASTASIS = 33
    LIVER_METASTASIS = 34
    LYTIC = 35
    SCLEROTIC = 36


#: Tissue -> (mean HU, noise SD in HU).
TISSUE_HU: dict[Tissue, tuple[float, float]] = {
    Tissue.AIR: (-1000.0, 6.0),
    Tissue.FAT: (-100.0, 12.0),
    Tissue.MUSCLE: (45.0, 12.0),
    Tissue.RIGHT_LUNG: (-850.0, 40.0),
    Tissue.LEFT_LUNG: (-850.0, 40.0),
    Tissue.MEDIASTINAL_FAT: (-90.0, 12.0),
    Tissue.HEART: (45.0, 10.0),
    Tissue.BLOOD_POOL: (150.0, 12.0),
    Tissue.AORTA: (190.0, 14.0),
    Tissue.PULMONARY_ARTERY: (170.0, 14.0),
    Tissue.SVC: (140.0, 14.0),
    Tissue.AIRWAY: (-990.0, 8.0),
    Tissue.ESOPHAGUS: (35.0, 10.0),
    Tissue.VERTEBRA: (700.0, 60.0),
    Tissue.RIB: (650.0, 60.0),
    Tissue.DISC: (80.0, 12.0),
    Tissue.CSF: (10.0, 8.0),
    Tissue.LIVER: (60.0, 10.0),
    Tissue.SPLEEN: (50.0, 10.0),
    Tissue.STOMACH: (30.0, 12.0),
    Tissue.ADRENAL: (25.0, 10.0),
    Tissue.ABDOMEN: (30.0, 14.0),
    Tissue.NORMAL_NODE: (35.0, 10.0),
    Tissue.TUMOR: (35.0, 15.0),
    Tissue.NODE: (35.0, 10.0),
    Tissue.EFFUSION: (10.0, 8.0),
    Tissue.METASTASIS: (35.0, 12.0),
    Tissue.LIVER_METASTASIS: (15.0, 10.0),
    Tissue.LYTIC: (40.0, 15.0),
    Tissue.SCLEROTIC: (1200.0, 80.0),
}
_THORAX = (Tissue.RIGHT_LUNG, Tissue.LEFT_LUNG, Tissue.EFFUSION)
_LUNG_OF_SIDE = {"right": Tissue.RIGHT_LUNG, "left": Tissue.LEFT_LUNG}
#: Lung ellipsoids: centre and semi-axes (mm).
_LUNGS = {
    "right": ((72.0, -8.0, 35.0), (58.0, 82.0, 105.0)),
    "left": ((-74.0, -8.0, 35.0), (54.0, 80.0, 103.0)),
}
#: Lobe centre as (side, fraction of the lung's semi-axes along y, fraction along z).
_LOBE_CENTRES = {
    "RUL": ("right", 0.05, 0.45),
    "RML": ("right", 0.45, -0.1),
    "RLL": ("right", -0.35, -0.42),
    "LUL": ("left", 0.15, 0.35),
    "LLL": ("left", -0.35, -0.42),
}
#: Where an invading tumor sits: a point on the vessel and the side the mass grows toward.
_VESSEL_CONTACT = {
    "right pulmonary artery": ((30.0, 4.0, 50.0), 1.0),
    "left pulmonary artery": ((-40.0, -2.0, 54.0), -1.0),
    "superior vena cava": ((36.0, 18.0, 90.0), 1.0),
}


@dataclass(frozen=True)
class Grid:
    """A voxel grid of ``shape`` (X, Y, Z) at ``spacing`` mm, RAS+, origin at the centre."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]

    @property
    def affine(self) -> np.ndarray:
        """(4, 4) voxel -> world (mm) matrix."""
        affine = np.diag([*self.spacing, 1.0])
        affine[:3, 3] = [-(n - 1) / 2.0 * s for n, s in zip(self.shape, self.spacing)]
        return affine

    def axes_mm(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """World coordinates (mm) of the voxel centres along x, y and z: arrays (X,), (Y,), (Z,)."""
        return tuple(  # type: ignore[return-value]
            ((np.arange(n) - (n - 1) / 2.0) * s).astype(np.float32) for n, s in zip(self.shape, self.spacing)
        )

    def box(self, centre, half_extent) -> tuple[tuple[slice, ...], tuple[np.ndarray, ...]]:
        """Index slices of the voxels within ``half_extent`` mm of ``centre`` and their broadcastable
        world coordinates (x[:, None, None], y[None, :, None], z[None, None, :])."""
        slices, coords = [], []
        for axis, (c, h, n, s) in enumerate(zip(centre, half_extent, self.shape, self.spacing)):
            lo = max(int(np.ceil((c - h) / s + (n - 1) / 2.0)), 0)
            hi = min(int(np.floor((c + h) / s + (n - 1) / 2.0)) + 1, n)
            hi = max(hi, lo)
            view = [1, 1, 1]
            view[axis] = -1
            coords.append(((np.arange(lo, hi) - (n - 1) / 2.0) * s).astype(np.float32).reshape(view))
            slices.append(slice(lo, hi))
        return tuple(slices), tuple(coords)


@dataclass(frozen=True)
class Findings:
    """What one synthetic scan shows; sizes in whole millimetres, 0 / "" meaning absent."""

    tumor_size_mm: int = 0
    tumor_lobe: str = ""
    nodes: tuple[tuple[str, int], ...] = ()  # (station, short axis mm), enlarged nodes only
    effusion_right_mm: int = 0
    effusion_left_mm: int = 0
    lung_metastases_mm: tuple[int, ...] = ()  # nodules in the lung opposite the tumor
    adrenal_metastasis_mm: int = 0
    adrenal_side: str = ""
    liver_metastasis_mm: int = 0
    vessel: str = ""  # one of VESSELS when the tumor invades it
    bone_lesion: str = ""  # "lytic" or "sclerotic"
    bone_site: str = ""  # e.g. "T7 vertebral body" or "right 6th rib"
    bone_size_mm: int = 0

    @property
    def tumor_side(self) -> str:
        return {"R": "right", "L": "left"}.get(self.tumor_lobe[:1], "")

    @property
    def flags(self) -> dict[str, int]:
        """The six lung question ids -> 0/1."""
        return {
            "tumor": int(self.tumor_size_mm > 0),
            "lymph_nodes": int(bool(self.nodes)),
            "pleura": int(self.effusion_right_mm > 0 or self.effusion_left_mm > 0),
            "metastases": int(
                bool(self.lung_metastases_mm)
                or self.adrenal_metastasis_mm > 0
                or self.liver_metastasis_mm > 0
            ),
            "vessels": int(bool(self.vessel)),
            "bone": int(bool(self.bone_lesion)),
        }


@dataclass
class RenderedScan:
    """int16 HU volume (X, Y, Z) and its Tissue label map (X, Y, Z) uint8."""

    hu: np.ndarray
    labels: np.ndarray

    def mask(self, question_id: str) -> np.ndarray:
        """Boolean (X, Y, Z) mask of the finding behind a lung question id (not "vessels")."""
        return np.isin(self.labels, FINDING_TISSUES[question_id])


def _ellipsoid(coords, centre, semi) -> np.ndarray:
    x, y, z = coords
    return (
        ((x - centre[0]) / semi[0]) ** 2 + ((y - centre[1]) / semi[1]) ** 2 + ((z - centre[2]) / semi[2]) ** 2
    ) <= 1.0


def _cylinder(coords, centre_xy, semi_xy, z_range) -> np.ndarray:
    x, y, z = coords
    inside = ((x - centre_xy[0]) / semi_xy[0]) ** 2 + ((y - centre_xy[1]) / semi_xy[1]) ** 2 <= 1.0
    return inside & (z >= z_range[0]) & (z <= z_range[1])


def _capsule(coords, start, end, radius) -> np.ndarray:
    """Voxels within ``radius`` mm of the segment start -> end."""
    p = [c - s for c, s in zip(coords, start)]
    d = np.subtract(end, start)
    t = np.clip(sum(pi * di for pi, di in zip(p, d)) / float(d @ d), 0.0, 1.0)
    return sum((pi - t * di) ** 2 for pi, di in zip(p, d)) <= radius**2


def _vertebra_z(level: str) -> float:
    return _SPINE_TOP_MM - _LEVEL_MM * (VERTEBRAE.index(level) + 0.5)


def _rib_phase(y, z):
    """Position along the rib cycle (mm from the top of rib 1): ribs slope down toward the front."""
    return _SPINE_TOP_MM - (z + 12.0 * (y + 8.0) / 98.0)


@functools.lru_cache(maxsize=4)
def base_labels(grid: Grid) -> np.ndarray:
    """The normal anatomy as a Tissue label map (X, Y, Z) uint8; cached per grid (read-only)."""
    x, y, z = (a.reshape(v) for a, v in zip(grid.axes_mm(), ([-1, 1, 1], [1, -1, 1], [1, 1, -1])))
    c = (x, y, z)
    labels = np.zeros(grid.shape, dtype=np.uint8)

    def paint(mask, tissue):
        labels[np.broadcast_to(mask, grid.shape)] = tissue

    paint(_cylinder(c, (0, -5), (165, 118), (-1e3, 1e3)), Tissue.FAT)
    paint(_cylinder(c, (0, -5), (151, 104), (-1e3, 1e3)), Tissue.MUSCLE)
    paint(_cylinder(c, (0, -5), (145, 98), (-1e3, -55)), Tissue.ABDOMEN)
    paint(_ellipsoid(c, (55, 5, -150), (100, 92, 95)), Tissue.LIVER)
    paint(_ellipsoid(c, (-60, 25, -130), (48, 42, 45)), Tissue.STOMACH)
    paint(_ellipsoid(c, (-88, -45, -135), (32, 40, 48)), Tissue.SPLEEN)
    for side in (1, -1):
        paint(_ellipsoid(c, (35 * side, -45, -100), (24, 22, 30)), Tissue.FAT)
        paint(_ellipsoid(c, (35 * side, -45, -100), (6, 12, 18)), Tissue.ADRENAL)
    # rib cage: an elliptic shell banded in z, open at the front where the cartilage is
    shell = _cylinder(c, (0, -8), (144.5, 102.5), (-120, 150)) & ~_cylinder(
        c, (0, -8), (135.5, 93.5), (-1e3, 1e3)
    )
    phase = _rib_phase(y, z)
    paint(
        shell
        & (np.mod(phase, _LEVEL_MM) < 9.0)
        & (phase > 0)
        & (phase < 12 * _LEVEL_MM)
        & ~((y > 50) & (np.abs(x) < 45)),
        Tissue.RIB,
    )
    for side, (centre, semi) in _LUNGS.items():
        paint(_ellipsoid(c, centre, semi), _LUNG_OF_SIDE[side])
    paint(_cylinder(c, (-3, 10), (30, 66), (-40, 145)), Tissue.MEDIASTINAL_FAT)
    paint(_ellipsoid(c, (-18, 28, -25), (66, 56, 58)), Tissue.MEDIASTINAL_FAT)
    paint(_ellipsoid(c, (-18, 28, -25), (60, 50, 52)), Tissue.HEART)
    paint(_ellipsoid(c, (-18, 28, -25), (45, 36, 38)), Tissue.BLOOD_POOL)
    paint(_cylinder(c, (-8, -40), (8, 8), (-60, 150)), Tissue.ESOPHAGUS)
    paint(_cylinder(c, (0, -10), (9, 9), (75, 1e3)), Tissue.AIRWAY)
    paint(_capsule(c, (0, -10, 75), (38, -15, 52), 6.5), Tissue.AIRWAY)
    paint(_capsule(c, (0, -10, 75), (-40, -16, 50), 6.5), Tissue.AIRWAY)
    paint(_cylinder(c, (8, 25), (16, 16), (-10, 85)), Tissue.AORTA)
    paint(_capsule(c, (8, 25, 85), (-20, -42, 85), 14), Tissue.AORTA)
    paint(_cylinder(c, (-20, -45), (13, 13), (-1e3, 85)), Tissue.AORTA)
    paint(_capsule(c, (-20, 40, 10), (-15, 15, 50), 14), Tissue.PULMONARY_ARTERY)
    paint(_capsule(c, (-15, 15, 50), (38, 2, 50), 9), Tissue.PULMONARY_ARTERY)
    paint(_capsule(c, (-15, 15, 50), (-45, -4, 54), 9), Tissue.PULMONARY_ARTERY)
    paint(_cylinder(c, (28, 18), (10, 10), (45, 125)), Tissue.SVC)
    paint(_cylinder(c, (0, 92), (22, 8), (-20, 120)), Tissue.VERTEBRA)  # sternum
    paint(_cylinder(c, (0, -92), (24, 14), (-1e3, 1e3)), Tissue.VERTEBRA)  # posterior elements
    paint(_cylinder(c, (0, -108), (5, 10), (-1e3, 1e3)), Tissue.VERTEBRA)  # spinous process
    paint(_cylinder(c, (0, -62), (22, 18), (-1e3, 1e3)), Tissue.VERTEBRA)
    paint(
        _cylinder(c, (0, -62), (22, 18), (-1e3, 1e3)) & (np.mod(_SPINE_TOP_MM - z, _LEVEL_MM) < 5.0),
        Tissue.DISC,
    )
    paint(_cylinder(c, (0, -88), (8, 8), (-1e3, 1e3)), Tissue.CSF)
    for side in (1, -1):
        paint(_cylinder(c, (36 * side, -102), (22, 16), (-1e3, 1e3)), Tissue.MUSCLE)
    labels.flags.writeable = False
    return labels


def _paint_box(labels, grid, centre, semi, tissue, allowed) -> None:
    """Label the ellipsoid (centre, semi-axes mm) as ``tissue`` where the current label is in ``allowed``;
    an ellipsoid smaller than a voxel still takes the voxel holding its centre."""
    slices, coords = grid.box(centre, semi)
    local = labels[slices]
    inside = _ellipsoid(coords, centre, semi)
    if not inside.any():
        slices = tuple(
            slice(i, i + 1) for i in np.rint(np.linalg.solve(grid.affine, [*centre, 1.0])[:3]).astype(int)
        )
        if not all(0 <= s.start < n for s, n in zip(slices, grid.shape)):
            return
        local, inside = labels[slices], np.ones((1, 1, 1), dtype=bool)
    local[inside & np.isin(local, allowed)] = tissue


def _lung_point(side: str, fy: float, fz: float, rng: np.random.Generator, margin: float) -> np.ndarray:
    """A point in the ``side`` lung near (fy, fz) x its semi-axes, ``margin`` mm inside the lung's outer
    edge and ``margin`` mm lateral to x = +-45 mm (clear of the mediastinum and hila); where the lung is
    too narrow for both, the medial clearance wins."""
    (cx, cy, cz), (sx, sy, sz) = _LUNGS[side]
    y = cy + (fy + rng.uniform(-0.1, 0.1)) * sy
    z = cz + (fz + rng.uniform(-0.1, 0.1)) * sz
    half_width = sx * np.sqrt(max(1.0 - ((y - cy) / sy) ** 2 - ((z - cz) / sz) ** 2, 0.0))
    lo = max(abs(cx) - half_width, 45.0) + margin  # distances from the midline
    hi = abs(cx) + half_width - margin
    distance = rng.uniform(lo, hi) if lo < hi else lo
    return np.array([distance if side == "right" else -distance, y, z])


def _draw_tumor(labels, grid, f: Findings, rng) -> None:
    radius = f.tumor_size_mm / 2.0
    side, fy, fz = _LOBE_CENTRES[f.tumor_lobe]
    if f.vessel:
        point, direction = _VESSEL_CONTACT[f.vessel]
        centre = np.array(point) + [direction * 0.6 * radius, 0.0, 0.0]
        allowed = (*_THORAX, Tissue.MEDIASTINAL_FAT, Tissue.NORMAL_NODE)
    else:
        centre = _lung_point(side, fy, fz, rng, margin=radius + 12.0)
        allowed = _THORAX
    semi = radius * rng.uniform(0.85, 1.0, size=3)
    semi[np.argmax(semi)] = radius
    _paint_box(labels, grid, centre, semi, Tissue.TUMOR, allowed)
    for _ in range(3):  # lobulation: smaller lobes on the surface, never beyond the stated size
        offset = rng.normal(size=3)
        offset *= 0.45 * radius / np.linalg.norm(offset)
        _paint_box(labels, grid, centre + offset, np.full(3, 0.5 * radius), Tissue.TUMOR, allowed)


def _draw_bone_lesion(labels, grid, f: Findings, rng) -> None:
    tissue = Tissue.LYTIC if f.bone_lesion == "lytic" else Tissue.SCLEROTIC
    radius = f.bone_size_mm / 2.0
    if f.bone_site.endswith("vertebral body"):
        centre = (0.0, -62.0, _vertebra_z(f.bone_site.split()[0]))
        _paint_box(labels, grid, centre, (radius,) * 3, tissue, (Tissue.VERTEBRA, Tissue.DISC))
        return
    side, ordinal = f.bone_site.split()[:2]
    number = int(ordinal[:-2])
    angle = np.deg2rad(rng.uniform(-60.0, -20.0))  # posterolateral arc of the rib
    x = 140.0 * np.cos(angle) * (1.0 if side == "right" else -1.0)
    y = -8.0 + 98.0 * np.sin(angle)
    z = _SPINE_TOP_MM - _LEVEL_MM * (number - 1) - 4.5 - 12.0 * (y + 8.0) / 98.0
    semi = (radius, radius, max(radius, 0.6 * grid.spacing[2]))
    chest_wall = (Tissue.RIB, Tissue.MUSCLE, Tissue.FAT)
    _paint_box(
        labels, grid, (x, y, z), semi, tissue, (Tissue.RIB,) if tissue == Tissue.SCLEROTIC else chest_wall
    )
    slices, _ = grid.box((x, y, z), semi)
    if not (labels[slices] == tissue).any():  # coarse grids can miss the thin rib: mark the chest wall there
        _paint_box(labels, grid, (x, y, z), (0.1, 0.1, 0.1), tissue, chest_wall)


def _draw_findings(labels, grid, f: Findings, rng) -> None:
    for station in rng.choice(list(NODE_STATIONS), size=2, replace=False):  # normal small nodes
        if station not in dict(f.nodes):
            _paint_box(
                labels,
                grid,
                NODE_STATIONS[station][0],
                (3.0, 3.0, 4.0),
                Tissue.NORMAL_NODE,
                (Tissue.MEDIASTINAL_FAT, *_THORAX),
            )
    for side, depth in (("right", f.effusion_right_mm), ("left", f.effusion_left_mm)):
        if depth:
            (cx, cy, cz), (sx, sy, sz) = _LUNGS[side]
            slices, (_, y, _) = grid.box((cx, cy, cz), (sx, sy, sz))
            local = labels[slices]
            local[(local == _LUNG_OF_SIDE[side]) & np.broadcast_to(y < cy - sy + depth, local.shape)] = (
                Tissue.EFFUSION
            )
    if f.tumor_size_mm:
        _draw_tumor(labels, grid, f, rng)
    for station, short_axis in f.nodes:
        semi = (short_axis / 2.0, short_axis / 2.0, 0.7 * short_axis)
        _paint_box(
            labels,
            grid,
            NODE_STATIONS[station][0],
            semi,
            Tissue.NODE,
            (Tissue.MEDIASTINAL_FAT, Tissue.NORMAL_NODE, Tissue.ESOPHAGUS, *_THORAX),
        )
    contralateral = "left" if f.tumor_side == "right" else "right"
    for size in f.lung_metastases_mm:
        centre = _lung_point(
            contralateral, rng.uniform(-0.5, 0.5), rng.uniform(-0.5, 0.4), rng, margin=size / 2.0 + 8.0
        )
        _paint_box(labels, grid, centre, (size / 2.0,) * 3, Tissue.METASTASIS, _THORAX)
    if f.adrenal_metastasis_mm:
        centre = (35.0 if f.adrenal_side == "right" else -35.0, -45.0, -100.0)
        _paint_box(
            labels,
            grid,
            centre,
            (f.adrenal_metastasis_mm / 2.0,) * 3,
            Tissue.METASTASIS,
            (Tissue.ADRENAL, Tissue.FAT, Tissue.ABDOMEN),
        )
    if f.liver_metastasis_mm:
        centre = (rng.uniform(40.0, 90.0), rng.uniform(-20.0, 40.0), rng.uniform(-125.0, -95.0))
        _paint_box(
            labels, grid, centre, (f.liver_metastasis_mm / 2.0,) * 3, Tissue.LIVER_METASTASIS, (Tissue.LIVER,)
        )
    if f.bone_lesion:
        _draw_bone_lesion(labels, grid, f, rng)


#: The lung question ids whose finding is drawn as tissue -> those tissues (vessel invasion is not).
FINDING_TISSUES = {
    "tumor": (Tissue.TUMOR,),
    "lymph_nodes": (Tissue.NODE,),
    "pleura": (Tissue.EFFUSION,),
    "metastases": (Tissue.METASTASIS, Tissue.LIVER_METASTASIS),
    "bone": (Tissue.LYTIC, Tissue.SCLEROTIC),
}
_HU_TABLES = (
    np.array([TISSUE_HU.get(t, (0.0, 0.0))[0] for t in range(256)], dtype=np.float32),
    np.array([TISSUE_HU.get(t, (0.0, 0.0))[1] for t in range(256)], dtype=np.float32),
)


def _correlated_noise(shape: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    """Unit-variance noise (X, Y, Z) float32, constant over 2 x 2 in-plane blocks (CT noise is not white)."""
    coarse = rng.standard_normal(((shape[0] + 1) // 2, (shape[1] + 1) // 2, shape[2]), dtype=np.float32)
    return coarse.repeat(2, axis=0).repeat(2, axis=1)[: shape[0], : shape[1]]


def render_scan(findings: Findings, grid: Grid, rng: np.random.Generator) -> RenderedScan:
    """Draw ``findings`` on the base anatomy of ``grid`` and add voxel noise -> RenderedScan."""
    labels = base_labels(grid).copy()
    _draw_findings(labels, grid, findings, rng)
    hu = _HU_TABLES[0][labels]
    hu += _HU_TABLES[1][labels] * _correlated_noise(grid.shape, rng)
    return RenderedScan(hu=np.clip(np.rint(hu), -1024, 3071).astype(np.int16), labels=labels)
