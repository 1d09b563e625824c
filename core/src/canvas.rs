//! Images on a larger canvas: random placement for training (`--canvas`), and the two test sets
//! of the paper's affine-robustness experiment (section 5.2): the translated set (each test image
//! at a seeded position) and the affine set (each test image under a seeded small affine
//! transform, as affNIST's generator describes).
//!
//! # The affine set
//!
//! For image `i` of a split, [`AffineDraw::draw`] takes from `Rng::derive(seed, "affine", i)`, in
//! this order: a rotation uniform in ±20 degrees, a horizontal shear uniform in ±0.2, a scale per
//! axis uniform in 0.8..1.2, then a translation. The linear part is
//! `M = rotation x shear x scale`, applied about the centre of the object's bounding box (its
//! non-zero pixels). The translation places that centre uniformly among the positions that keep
//! the transformed bounding box inside the canvas (centred when none does). Pixels are sampled
//! through `M⁻¹` with bilinear interpolation and zero outside the source, then rounded to u8. So
//! the set depends only on the split, the canvas side and the seed.

use crate::data::{Batch, Dataset};
use crate::error::{CoreError, Result};
use crate::rng::Rng;

/// Largest rotation of the affine set, in degrees.
pub const MAX_ROTATION_DEG: f32 = 20.0;
/// Largest horizontal shear of the affine set.
pub const MAX_SHEAR: f32 = 0.2;
/// Range of the per-axis scale of the affine set.
pub const SCALE_RANGE: (f32, f32) = (0.8, 1.2);
/// The seed of the translated test set that training evaluates on (`capsnet eval --seed`
/// chooses another).
pub const TEST_PLACEMENT_SEED: u64 = 0;

/// Copies `src` (`rows x cols`, u8) into `dst` (`canvas x canvas`, f32 in [0,1]) with its
/// top-left corner at `(ox, oy)`; the rest is 0. The image must fit.
pub fn place(
    dst: &mut [f32],
    canvas: usize,
    src: &[u8],
    rows: usize,
    cols: usize,
    ox: usize,
    oy: usize,
) {
    dst.fill(0.0);
    for (y, row) in src.chunks_exact(cols).take(rows).enumerate() {
        let out = &mut dst[(oy + y) * canvas + ox..][..cols];
        for (d, &s) in out.iter_mut().zip(row) {
            *d = f32::from(s) / 255.0;
        }
    }
}

/// A random top-left corner for a `rows x cols` image on the canvas, drawn x then y.
fn random_corner(rng: &mut Rng, canvas: usize, rows: usize, cols: usize) -> (usize, usize) {
    let ox = rng.below(canvas - cols + 1);
    let oy = rng.below(canvas - rows + 1);
    (ox, oy)
}

/// Checks that a data set's images fit on the canvas.
pub fn check_fits(ds: &Dataset, canvas: usize) -> Result<()> {
    if ds.rows > canvas || ds.cols > canvas {
        return Err(CoreError::Config(format!(
            "images of {}x{} do not fit on a {canvas}x{canvas} canvas",
            ds.rows, ds.cols
        )));
    }
    Ok(())
}

/// Gathers `indices` into a batch of `canvas x canvas` images, each placed at an independent
/// random position drawn from `rng` (the training augmentation of `--canvas`). The images must
/// fit ([`check_fits`]); panics if an index is out of range.
pub fn make_canvas_batch(ds: &Dataset, indices: &[usize], rng: &mut Rng, canvas: usize) -> Batch {
    let px = canvas * canvas;
    let mut images = vec![0.0f32; indices.len() * px];
    let mut labels = Vec::with_capacity(indices.len());
    for (dst, &i) in images.chunks_exact_mut(px.max(1)).zip(indices) {
        let (ox, oy) = random_corner(rng, canvas, ds.rows, ds.cols);
        place(dst, canvas, ds.image(i), ds.rows, ds.cols, ox, oy);
        labels.push(usize::from(ds.labels[i]));
    }
    Batch::single(images, labels, canvas, canvas)
}

fn to_u8(x: f32) -> u8 {
    // In [0, 255] after the clamp, so the cast neither wraps nor truncates past rounding.
    (x * 255.0).round().clamp(0.0, 255.0) as u8
}

/// The translated test set: image `i` at the position drawn from `Rng::derive(seed, "canvas",
/// i)`.
pub fn translated(ds: &Dataset, canvas: usize, seed: u64) -> Result<Dataset> {
    check_fits(ds, canvas)?;
    let px = canvas * canvas;
    let mut images = vec![0u8; ds.len() * px];
    let mut buf = vec![0.0f32; px];
    for (i, dst) in images.chunks_exact_mut(px.max(1)).enumerate() {
        let mut rng = Rng::derive(seed, "canvas", i as u64);
        let (ox, oy) = random_corner(&mut rng, canvas, ds.rows, ds.cols);
        place(&mut buf, canvas, ds.image(i), ds.rows, ds.cols, ox, oy);
        dst.iter_mut().zip(&buf).for_each(|(d, &x)| *d = to_u8(x));
    }
    Ok(Dataset {
        images,
        labels: ds.labels.clone(),
        rows: canvas,
        cols: canvas,
        classes: ds.classes,
    })
}

/// The random part of one affine test image.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AffineDraw {
    pub rotation_deg: f32,
    pub shear: f32,
    pub scale_x: f32,
    pub scale_y: f32,
    /// Where the translation falls in its allowed range, per axis, in [0, 1).
    pub tx: f32,
    pub ty: f32,
}

impl AffineDraw {
    /// Draws in the order the module's documentation gives.
    pub fn draw(rng: &mut Rng) -> Self {
        AffineDraw {
            rotation_deg: rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG),
            shear: rng.uniform(-MAX_SHEAR, MAX_SHEAR),
            scale_x: rng.uniform(SCALE_RANGE.0, SCALE_RANGE.1),
            scale_y: rng.uniform(SCALE_RANGE.0, SCALE_RANGE.1),
            tx: rng.uniform(0.0, 1.0),
            ty: rng.uniform(0.0, 1.0),
        }
    }

    /// The identity transform, centred.
    pub fn identity() -> Self {
        AffineDraw {
            rotation_deg: 0.0,
            shear: 0.0,
            scale_x: 1.0,
            scale_y: 1.0,
            tx: 0.5,
            ty: 0.5,
        }
    }

    /// `rotation x shear x scale` as a row-major 2x2 matrix acting on (x, y).
    pub fn matrix(&self) -> [[f32; 2]; 2] {
        let (s, c) = self.rotation_deg.to_radians().sin_cos();
        // shear x scale = [[sx, k*sy], [0, sy]]
        let a = [
            [self.scale_x, self.shear * self.scale_y],
            [0.0, self.scale_y],
        ];
        [
            [c * a[0][0] - s * a[1][0], c * a[0][1] - s * a[1][1]],
            [s * a[0][0] + c * a[1][0], s * a[0][1] + c * a[1][1]],
        ]
    }
}

/// The bounding box `(x0, y0, x1, y1)` of the non-zero pixels in pixel-edge coordinates (the
/// whole image when all are zero).
fn bounding_box(src: &[u8], rows: usize, cols: usize) -> (f32, f32, f32, f32) {
    let (mut x0, mut y0, mut x1, mut y1) = (cols, rows, 0, 0);
    for (y, row) in src.chunks_exact(cols).take(rows).enumerate() {
        for (x, &p) in row.iter().enumerate() {
            if p > 0 {
                x0 = x0.min(x);
                y0 = y0.min(y);
                x1 = x1.max(x + 1);
                y1 = y1.max(y + 1);
            }
        }
    }
    if x1 == 0 {
        return (0.0, 0.0, cols as f32, rows as f32);
    }
    (x0 as f32, y0 as f32, x1 as f32, y1 as f32)
}

/// Renders `src` (`rows x cols`) through `draw` onto a `canvas x canvas` image.
pub fn warp(src: &[u8], rows: usize, cols: usize, canvas: usize, draw: &AffineDraw) -> Vec<u8> {
    let m = draw.matrix();
    let (x0, y0, x1, y1) = bounding_box(src, rows, cols);
    let (cx, cy) = ((x0 + x1) / 2.0, (y0 + y1) / 2.0);
    // The transformed box's extent about the centre.
    let (mut lo, mut hi) = ([f32::MAX; 2], [f32::MIN; 2]);
    for (x, y) in [(x0, y0), (x1, y0), (x0, y1), (x1, y1)] {
        let (dx, dy) = (x - cx, y - cy);
        let p = [m[0][0] * dx + m[0][1] * dy, m[1][0] * dx + m[1][1] * dy];
        for k in 0..2 {
            lo[k] = lo[k].min(p[k]);
            hi[k] = hi[k].max(p[k]);
        }
    }
    let c = canvas as f32;
    let centre = |lo: f32, hi: f32, u: f32| {
        let (a, b) = (-lo, c - hi);
        if a <= b { a + u * (b - a) } else { c / 2.0 }
    };
    let (tx, ty) = (centre(lo[0], hi[0], draw.tx), centre(lo[1], hi[1], draw.ty));
    let det = m[0][0] * m[1][1] - m[0][1] * m[1][0];
    let inv = [
        [m[1][1] / det, -m[0][1] / det],
        [-m[1][0] / det, m[0][0] / det],
    ];
    let at = |x: isize, y: isize| -> f32 {
        if x < 0 || y < 0 || x >= cols as isize || y >= rows as isize {
            0.0
        } else {
            f32::from(src[y as usize * cols + x as usize])
        }
    };
    let mut out = vec![0u8; canvas * canvas];
    for (oy, row) in out.chunks_exact_mut(canvas.max(1)).enumerate() {
        for (ox, px) in row.iter_mut().enumerate() {
            let (dx, dy) = (ox as f32 + 0.5 - tx, oy as f32 + 0.5 - ty);
            // Source position of this pixel's centre, in pixel-centre coordinates.
            let sx = inv[0][0] * dx + inv[0][1] * dy + cx - 0.5;
            let sy = inv[1][0] * dx + inv[1][1] * dy + cy - 0.5;
            let (fx, fy) = (sx.floor(), sy.floor());
            let (ax, ay) = (sx - fx, sy - fy);
            let (ix, iy) = (fx as isize, fy as isize);
            let v = (1.0 - ay) * ((1.0 - ax) * at(ix, iy) + ax * at(ix + 1, iy))
                + ay * ((1.0 - ax) * at(ix, iy + 1) + ax * at(ix + 1, iy + 1));
            *px = v.round().clamp(0.0, 255.0) as u8;
        }
    }
    out
}

/// The affine test set: image `i` through the transform drawn from `Rng::derive(seed, "affine",
/// i)`, on a `canvas x canvas` image.
pub fn affine(ds: &Dataset, canvas: usize, seed: u64) -> Result<Dataset> {
    check_fits(ds, canvas)?;
    let mut images = Vec::with_capacity(ds.len() * canvas * canvas);
    for i in 0..ds.len() {
        let draw = AffineDraw::draw(&mut Rng::derive(seed, "affine", i as u64));
        images.extend(warp(ds.image(i), ds.rows, ds.cols, canvas, &draw));
    }
    Ok(Dataset {
        images,
        labels: ds.labels.clone(),
        rows: canvas,
        cols: canvas,
        classes: ds.classes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(rows: usize, cols: usize) -> Vec<u8> {
        // A 6x4 bar with a notch, off-centre, so a transform shows.
        let mut v = vec![0u8; rows * cols];
        for y in 3..9 {
            for x in 2..6 {
                v[y * cols + x] = if (y, x) == (4, 3) { 0 } else { 200 };
            }
        }
        v
    }

    #[test]
    fn place_puts_the_image_at_its_corner() {
        let src = [255u8, 0, 0, 51];
        let mut dst = vec![9.0f32; 16];
        place(&mut dst, 4, &src, 2, 2, 1, 2);
        let mut want = vec![0.0f32; 16];
        want[2 * 4 + 1] = 1.0;
        want[3 * 4 + 2] = 0.2;
        assert_eq!(dst, want);
    }

    #[test]
    fn the_identity_warp_with_a_whole_pixel_shift_copies_the_image() {
        let (rows, cols) = (12, 10);
        let src = blob(rows, cols);
        // Box x 2..6, y 3..9: centre (4, 6); extent ±2, ±3. On a 20 canvas the centre ranges
        // over x 2..18 and y 3..17; tx = 0.5 puts it at (10, 10): a shift of (6, 4).
        let out = warp(&src, rows, cols, 20, &AffineDraw::identity());
        let mut want = vec![0u8; 400];
        for y in 0..rows {
            for x in 0..cols {
                want[(y + 4) * 20 + x + 6] = src[y * cols + x];
            }
        }
        assert_eq!(out, want);
    }

    #[test]
    fn draws_stay_in_their_ranges_and_cover_them() {
        let mut rng = Rng::new(3);
        let draws: Vec<AffineDraw> = (0..2000).map(|_| AffineDraw::draw(&mut rng)).collect();
        let span = |f: fn(&AffineDraw) -> f32| {
            draws
                .iter()
                .map(f)
                .fold((f32::MAX, f32::MIN), |(a, b), x| (a.min(x), b.max(x)))
        };
        let (lo, hi) = span(|d| d.rotation_deg);
        assert!(
            lo >= -20.0 && hi <= 20.0 && lo < -19.0 && hi > 19.0,
            "{lo} {hi}"
        );
        let (lo, hi) = span(|d| d.shear);
        assert!(
            lo >= -0.2 && hi <= 0.2 && lo < -0.19 && hi > 0.19,
            "{lo} {hi}"
        );
        for f in [|d: &AffineDraw| d.scale_x, |d: &AffineDraw| d.scale_y] {
            let (lo, hi) = span(f);
            assert!(
                lo >= 0.8 && hi <= 1.2 && lo < 0.81 && hi > 1.19,
                "{lo} {hi}"
            );
        }
    }

    #[test]
    fn a_warped_object_stays_whole_inside_the_canvas() {
        // The object's mass scales with |det M| and none of it is cut off by the border.
        let (rows, cols) = (12, 10);
        let src = blob(rows, cols);
        let mass = |v: &[u8]| v.iter().map(|&p| f64::from(p)).sum::<f64>();
        let m0 = mass(&src);
        for i in 0..300 {
            let d = AffineDraw::draw(&mut Rng::derive(5, "affine", i));
            let m = d.matrix();
            let det = f64::from(m[0][0] * m[1][1] - m[0][1] * m[1][0]);
            let out = warp(&src, rows, cols, 16, &d);
            let ratio = mass(&out) / (m0 * det);
            assert!(
                (0.93..1.07).contains(&ratio),
                "draw {i}: {d:?} keeps {ratio}"
            );
        }
    }

    #[test]
    fn the_test_sets_are_deterministic_by_seed() {
        let ds = Dataset {
            images: (0..5).flat_map(|_| blob(12, 10)).collect(),
            labels: vec![0, 1, 2, 0, 1],
            rows: 12,
            cols: 10,
            classes: 3,
        };
        for make in [translated, affine] {
            let a = make(&ds, 20, 7).unwrap();
            assert_eq!((a.rows, a.cols, a.len()), (20, 20, 5));
            assert_eq!(a.labels, ds.labels);
            assert_eq!(a.images, make(&ds, 20, 7).unwrap().images);
            assert_ne!(a.images, make(&ds, 20, 8).unwrap().images);
            // Images of one set differ from each other (each has its own draw).
            assert_ne!(a.image(0), a.image(1));
        }
        let err = affine(&ds, 11, 0).unwrap_err().to_string();
        assert!(err.contains("12x10") && err.contains("11x11"), "{err}");
    }

    #[test]
    fn a_canvas_batch_places_each_image_whole() {
        let ds = Dataset {
            images: blob(12, 10),
            labels: vec![2],
            rows: 12,
            cols: 10,
            classes: 3,
        };
        let mut rng = Rng::new(1);
        let mut corners = std::collections::HashSet::new();
        for _ in 0..50 {
            let b = make_canvas_batch(&ds, &[0], &mut rng, 16);
            assert_eq!((b.rows, b.cols, b.labels.as_slice()), (16, 16, &[2][..]));
            let sum: f32 = b.images.iter().sum();
            assert!((sum - 23.0 * 200.0 / 255.0).abs() < 1e-3, "{sum}");
            corners.insert(b.images.iter().position(|&x| x > 0.0));
        }
        assert!(corners.len() > 10, "{corners:?}");
    }
}
