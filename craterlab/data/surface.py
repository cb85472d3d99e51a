"""A procedural cratered planetary surface, evaluable at any place and scale, lazily.

The surface is an infinite plane in world units; nothing is stored. Every random quantity is a
hash of (seed, what, where), so any window renders the same terrain every time, and two views
of one place agree however they are cropped, scaled or lit.

- Terrain: fractal value noise (octaves of a hashed lattice, amplitude ~ wavelength^H) for the
  height field, and a second noise field for albedo.
- Craters: diameter classes D in [2^j, 2^(j+1)) world units. Class j lives on square cells of
  side ``cell_factor * 2^j``; each cell holds Poisson(lam) craters. With a constant per-cell
  mean this gives a cumulative size-frequency distribution N(>D) ~ D^-2 (many small, few
  large), and within a class D follows the same power law.
- Crater shape: parabolic bowl with depth/diameter 0.2 (simple craters), raised rim (0.04 D),
  ejecta blanket falling off as (r/R)^-3, flat floor and central peak above ``complex_d``;
  four degradation levels soften the rim (smooth min of bowl and ejecta) and fill the floor.
- Rendering: Lambertian hillshading from a sun azimuth (clockwise from image-up, i.e. north)
  and elevation, times albedo (fresh craters have bright ejecta), then optics blur, gain, gamma
  and sensor noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# splitmix64 constants
_G = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S11 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11)

# Hash "channels": keep every random stream independent.
CH_HEIGHT, CH_ALBEDO, CH_COUNT, CH_CRATER, CH_VIEW, CH_PICK = 1, 2, 3, 4, 5, 6


def _mix(x: np.ndarray) -> np.ndarray:
    x = x + _G
    x = (x ^ (x >> _S30)) * _M1
    x = (x ^ (x >> _S27)) * _M2
    return x ^ (x >> _S31)


def hash64(*keys: int | np.ndarray) -> np.ndarray:
    """A 64-bit hash of integer keys (scalars or broadcastable arrays), splitmix64-chained."""
    with np.errstate(over="ignore"):
        h = np.zeros((), dtype=np.uint64)
        for k in keys:
            k_arr = np.asarray(k, dtype=np.int64).astype(np.uint64)
            h = _mix(h ^ k_arr)
    return h


def uniform(*keys: int | np.ndarray) -> np.ndarray:
    """Uniform [0, 1) floats hashed from integer keys."""
    return (hash64(*keys) >> _S11).astype(np.float64) * (1.0 / (1 << 53))


def seed_of(*keys: int) -> int:
    """An integer seed for ``np.random.default_rng`` derived from keys."""
    return int(hash64(*keys))


# --------------------------------------------------------------------------- terrain noise


def _fade(t: np.ndarray) -> np.ndarray:
    return t * t * t * (t * (t * 6 - 15) + 10)


def value_noise(
    seed: int, channel: int, octave: int, xs: np.ndarray, ys: np.ndarray, spacing: float
) -> np.ndarray:
    """One octave of value noise in [-1, 1] on the grid ys x xs (world coordinates).

    Only the lattice points that the window touches are hashed, then interpolated separably.
    """
    gx, gy = xs / spacing, ys / spacing
    ix0, iy0 = math.floor(gx.min()), math.floor(gy.min())
    ix1, iy1 = math.floor(gx.max()) + 1, math.floor(gy.max()) + 1
    lx = np.arange(ix0, ix1 + 1)
    ly = np.arange(iy0, iy1 + 1)
    lattice = (uniform(seed, channel, octave, ly[:, None], lx[None, :]) * 2.0 - 1.0).astype(
        np.float32
    )
    cx = np.floor(gx).astype(np.int64) - ix0
    cy = np.floor(gy).astype(np.int64) - iy0
    tx = _fade(gx - np.floor(gx)).astype(np.float32)
    ty = _fade(gy - np.floor(gy)).astype(np.float32)[:, None]
    # interpolate along x on the lattice rows first (small), then along y per pixel row
    rows = lattice[:, cx] * (1 - tx) + lattice[:, cx + 1] * tx  # (lattice rows, W)
    top, bottom = rows[cy], rows[cy + 1]
    return top + (bottom - top) * ty


def fractal(
    seed: int,
    channel: int,
    xs: np.ndarray,
    ys: np.ndarray,
    pixel: float,
    *,
    hurst: float,
    amplitude: float,
    finest: float,
    coarsest: int = 6,
) -> np.ndarray:
    """Sum of value-noise octaves with wavelength 2^o, from ``finest`` pixels up to 2^coarsest."""
    out = np.zeros((ys.size, xs.size), dtype=np.float64)
    o_min = math.ceil(math.log2(finest * pixel))
    for o in range(o_min, coarsest + 1):
        lam = 2.0**o
        out += amplitude * lam**hurst * value_noise(seed, channel, o, xs, ys, lam)
    return out


# --------------------------------------------------------------------------- craters


@dataclass(frozen=True)
class CraterField:
    """Parameters of the crater population (see the module docstring)."""

    lam: float = 1.0
    cell_factor: float = 4.0
    min_class: int = -7
    max_class: int = 4
    complex_d: float = 3.0

    def craters_in(
        self, seed: int, x0: float, y0: float, x1: float, y1: float, min_d: float
    ) -> dict[str, np.ndarray]:
        """Craters whose influence (radius 1.5 D) reaches the window, with D >= ``min_d``.

        Returns arrays ``cls, ix, iy, k, x, y, d, degr, albedo`` (one entry per crater); the key
        (cls, ix, iy, k) is the crater's unique identity in the world.
        """
        parts: list[dict[str, np.ndarray]] = []
        j_lo = max(self.min_class, math.floor(math.log2(max(min_d, 1e-9))))
        for j in range(j_lo, self.max_class + 1):
            parts.append(
                self.craters_of_class(seed, j, x0, y0, x1, y1, margin=1.5 * 2.0 ** (j + 1))
            )
        out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        keep = out["d"] >= min_d
        return {k: v[keep] for k, v in out.items()}

    def craters_of_class(
        self, seed: int, j: int, x0: float, y0: float, x1: float, y1: float, margin: float = 0.0
    ) -> dict[str, np.ndarray]:
        """All craters of class j whose centre lies in the window grown by ``margin``."""
        cell = self.cell_factor * 2.0**j
        cx0, cx1 = math.floor((x0 - margin) / cell), math.floor((x1 + margin) / cell)
        cy0, cy1 = math.floor((y0 - margin) / cell), math.floor((y1 + margin) / cell)
        ix, iy = np.meshgrid(np.arange(cx0, cx1 + 1), np.arange(cy0, cy1 + 1))
        ix, iy = ix.ravel(), iy.ravel()
        counts = _poisson(uniform(seed, CH_COUNT, j, ix, iy), self.lam)
        total = int(counts.sum())
        rep_ix = np.repeat(ix, counts)
        rep_iy = np.repeat(iy, counts)
        k = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)

        def u(field: int) -> np.ndarray:
            return uniform(seed, CH_CRATER, j, rep_ix, rep_iy, k, field)

        x = (rep_ix + u(0)) * cell
        y = (rep_iy + u(1)) * cell
        # Within the octave [2^j, 2^(j+1)): differential power law D^-3 (cumulative D^-2).
        lo, hi = 2.0**j, 2.0 ** (j + 1)
        t = u(2)
        d = 1.0 / np.sqrt(lo**-2 - t * (lo**-2 - hi**-2))
        degr = np.minimum((u(3) * 4).astype(np.int64), 3)
        albedo = 0.85 + 0.3 * u(4)
        inside = (x >= x0 - margin) & (x <= x1 + margin) & (y >= y0 - margin) & (y <= y1 + margin)
        cls = np.full(total, j, dtype=np.int64)
        out = {
            "cls": cls,
            "ix": rep_ix,
            "iy": rep_iy,
            "k": k,
            "x": x,
            "y": y,
            "d": d,
            "degr": degr,
            "albedo": albedo,
        }
        return {key: v[inside] for key, v in out.items()}


def _poisson(u: np.ndarray, lam: float) -> np.ndarray:
    """Poisson(lam) draws by inverse CDF from uniforms (vectorized, deterministic)."""
    n_max = int(lam + 10 * math.sqrt(lam) + 10)
    pmf = np.array([math.exp(-lam) * lam**n / math.factorial(n) for n in range(n_max + 1)])
    cdf = np.cumsum(pmf)
    return np.minimum(np.searchsorted(cdf, u, side="right"), n_max).astype(np.int64)


_RIM_FACTOR = np.array([1.0, 0.8, 0.6, 0.4])
_RIM_SOFT = np.array([0.004, 0.012, 0.025, 0.045])
_INFILL = np.array([0.0, 0.15, 0.3, 0.45])
_FRESH = np.array([1.0, 0.5, 0.2, 0.0])


def _smin(a: np.ndarray, b: np.ndarray, k: np.ndarray) -> np.ndarray:
    h = np.maximum(k - np.abs(a - b), 0.0) / k
    return np.minimum(a, b) - h * h * k * 0.25


def crater_profile(
    r: np.ndarray, d: np.ndarray, degr: np.ndarray, complex_d: float
) -> tuple[np.ndarray, np.ndarray]:
    """Height (world units) and albedo boost at normalized radius r = dist / (D/2).

    Arrays broadcast: ``r`` (n, ...) with ``d`` and ``degr`` shaped (n, 1, ...).
    """
    is_complex = d >= complex_d
    depth = np.where(is_complex, 0.1, 0.2) * d
    rim = 0.04 * d * _RIM_FACTOR[degr]
    rf = 0.45  # floor radius of complex craters (fraction of R)
    rw = np.where(is_complex, np.maximum(r - rf, 0.0) / (1 - rf), r)
    interior = rim - depth + depth * rw * rw
    peak = np.where(is_complex, 0.35 * depth * np.exp(-((r / 0.15) ** 2)), 0.0)
    interior = interior + peak
    exterior = rim / np.maximum(r, 0.6) ** 3
    h = _smin(interior, exterior, _RIM_SOFT[degr] * d + 1e-12)
    floor = rim - depth * (1 - _INFILL[degr])
    h = -_smin(-h, -floor, 0.02 * d + 1e-12)  # smooth max: infill flattens the floor
    taper = 1.0 - _smoothstep(2.2, 3.0, r)
    boost = _FRESH[degr] * 0.35 * np.exp(-np.maximum(r - 1.0, 0.0) / 0.5) * (r > 0.85)
    return h * taper, boost * taper


def _smoothstep(a: float, b: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - a) / (b - a), 0.0, 1.0)
    return t * t * (3 - 2 * t)


_LUT_SAMPLES = 4096
_LUT_R2_MAX = 9.0  # profiles vanish beyond r = 3 (r^2 = 9)


def profile_tables(complex_d: float) -> tuple[np.ndarray, np.ndarray]:
    """Height / D and albedo boost as tables over r^2, for (simple, complex) x 4 degradations.

    Every length in :func:`crater_profile` scales with D, so height / D depends on r alone;
    rendering looks the profile up instead of evaluating it per pixel.
    """
    r = np.sqrt(np.linspace(0.0, _LUT_R2_MAX, _LUT_SAMPLES))
    heights, boosts = [], []
    for d in (complex_d * 0.5, complex_d * 1.5):
        for degr in range(4):
            h, b = crater_profile(r, np.asarray(d), np.asarray(degr), complex_d)
            heights.append(h / d)
            boosts.append(b)
    heights[0:8] = [np.where(r < np.sqrt(_LUT_R2_MAX) - 1e-9, t, 0.0) for t in heights]
    return np.stack(heights).astype(np.float32), np.stack(boosts).astype(np.float32)


def splat_craters(
    craters: dict[str, np.ndarray],
    xs: np.ndarray,
    ys: np.ndarray,
    pixel: float,
    complex_d: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Sum crater heights and albedo boosts onto the grid ys x xs.

    Craters of one class are evaluated together on equal-size pixel boxes around their centres
    (profile looked up by r^2) and scattered with ``np.bincount`` onto a padded canvas.
    """
    h_tab, b_tab = profile_tables(complex_d)
    h_img, w_img = ys.size, xs.size
    x0, y0 = xs[0] - pixel / 2, ys[0] - pixel / 2
    classes = np.unique(craters["cls"])
    limit = max(h_img, w_img)  # boxes up to this side are splatted, larger craters evaluated
    halves = {int(j): math.ceil(1.5 * 2.0 ** (j + 1) / pixel) + 1 for j in classes}
    pad = max([h for h in halves.values() if 2 * h + 1 <= limit], default=0)
    hp, wp = h_img + 2 * pad, w_img + 2 * pad
    height = np.zeros(hp * wp)
    albedo = np.zeros(hp * wp)
    direct_h = np.zeros((h_img, w_img))
    direct_b = np.zeros((h_img, w_img))
    scale = (_LUT_SAMPLES - 1) / _LUT_R2_MAX
    for j in classes:
        sel = craters["cls"] == j
        d = craters["d"][sel]
        table = (d >= complex_d) * 4 + craters["degr"][sel]
        cx, cy = craters["x"][sel], craters["y"][sel]
        alb = craters["albedo"][sel]
        half = halves[int(j)]
        if 2 * half + 1 > limit:  # as big as the view: evaluate on the whole grid
            for i in range(d.size):
                r2 = (xs[None, :] - cx[i]) ** 2 + (ys[:, None] - cy[i]) ** 2
                idx = np.minimum(r2 * (4.0 / d[i] ** 2) * scale, _LUT_SAMPLES - 1).astype(np.int64)
                direct_h += h_tab[table[i]][idx] * d[i]
                direct_b += b_tab[table[i]][idx] * alb[i]
            continue
        off = np.arange(-half, half + 1)
        c0 = np.floor((cx - x0) / pixel).astype(np.int64)
        r0 = np.floor((cy - y0) / pixel).astype(np.int64)
        inside = (c0 + half >= 0) & (c0 - half < w_img) & (r0 + half >= 0) & (r0 - half < h_img)
        if not inside.any():
            continue
        c0, r0, cx, cy, d, table, alb = (a[inside] for a in (c0, r0, cx, cy, d, table, alb))
        c0 = np.clip(c0, -pad + half, w_img + pad - half - 1)
        r0 = np.clip(r0, -pad + half, h_img + pad - half - 1)
        col = c0[:, None] + off[None, :]
        row = r0[:, None] + off[None, :]
        inv = (4.0 / d**2 * scale)[:, None]
        dx2 = ((x0 + (col + 0.5) * pixel - cx[:, None]) ** 2 * inv).astype(np.float32)
        dy2 = ((y0 + (row + 0.5) * pixel - cy[:, None]) ** 2 * inv).astype(np.float32)
        idx = np.minimum(dy2[:, :, None] + dx2[:, None, :], _LUT_SAMPLES - 1).astype(np.int32)
        base = (table * _LUT_SAMPLES)[:, None, None]
        flat_idx = (idx + base).ravel()
        hh = h_tab.ravel()[flat_idx] * np.repeat(d.astype(np.float32), idx[0].size)
        bb = b_tab.ravel()[flat_idx] * np.repeat(alb.astype(np.float32), idx[0].size)
        target = ((row + pad)[:, :, None] * wp + (col + pad)[:, None, :]).ravel()
        height += np.bincount(target, weights=hh, minlength=hp * wp)
        albedo += np.bincount(target, weights=bb, minlength=hp * wp)
    height = height.reshape(hp, wp)[pad : pad + h_img, pad : pad + w_img] + direct_h
    albedo = albedo.reshape(hp, wp)[pad : pad + h_img, pad : pad + w_img] + direct_b
    return height, albedo


# --------------------------------------------------------------------------- rendering


@dataclass(frozen=True)
class Photometry:
    """Illumination and sensor of one image."""

    sun_azimuth: float = 270.0
    sun_elevation: float = 30.0
    gain: float = 1.0
    gamma: float = 1.0
    noise: float = 0.01
    blur: float = 0.0


def gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur (reflect padding); sigma in pixels."""
    if sigma <= 0.05:
        return img
    radius = max(1, math.ceil(3 * sigma))
    t = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (t / sigma) ** 2)
    kernel /= kernel.sum()
    out = img
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="reflect")
        n = out.shape[axis]
        acc = np.zeros_like(out)
        for i, w in enumerate(kernel):
            acc += w * (padded[i : i + n] if axis == 0 else padded[:, i : i + n])
        out = acc
    return out


def render(
    seed: int,
    field: CraterField,
    centre: tuple[float, float],
    width: float,
    size: int,
    photometry: Photometry,
    noise_seed: int,
    *,
    hurst: float = 0.85,
    terrain_amplitude: float = 0.012,
    min_crater_px: float = 2.5,
) -> np.ndarray:
    """A (size, size) uint8 grayscale image of the square window ``width`` around ``centre``."""
    pixel = width / size
    x0 = centre[0] - width / 2
    y0 = centre[1] - width / 2
    xs = x0 + (np.arange(size) + 0.5) * pixel
    ys = y0 + (np.arange(size) + 0.5) * pixel
    height = fractal(
        seed, CH_HEIGHT, xs, ys, pixel, hurst=hurst, amplitude=terrain_amplitude, finest=2.0
    )
    alb = 1.0 + fractal(seed, CH_ALBEDO, xs, ys, pixel, hurst=0.5, amplitude=0.05, finest=6.0)
    craters = field.craters_in(seed, x0, y0, x0 + width, y0 + width, min_crater_px * pixel)
    ch, cb = splat_craters(craters, xs, ys, pixel, field.complex_d)
    height += ch
    alb += cb
    gy, gx = np.gradient(height, pixel)
    az = math.radians(photometry.sun_azimuth)
    el = math.radians(photometry.sun_elevation)
    sun = (math.sin(az) * math.cos(el), -math.cos(az) * math.cos(el), math.sin(el))
    shade = (-gx * sun[0] - gy * sun[1] + sun[2]) / np.sqrt(gx * gx + gy * gy + 1.0)
    radiance = np.clip(alb, 0.2, None) * np.maximum(shade, 0.0) / math.sin(el)
    img = 0.42 * radiance + 0.03
    img = gaussian_blur(img, photometry.blur)
    img = np.clip(img * photometry.gain, 0.0, 1.0) ** photometry.gamma
    rng = np.random.default_rng(noise_seed)
    img = img + rng.normal(0.0, photometry.noise, img.shape)
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
