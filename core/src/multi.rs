//! Overlapping pairs (the paper's MultiMNIST, section 6), generated on the fly from any IDX
//! split: sample `i` of an epoch is image `i` with a partner of another class, each shifted by
//! up to `shift` pixels in each direction on a canvas of side `image + 2 shift` (36 for 28x28
//! images and the paper's 4 pixels), overlaid by the brighter pixel.
//!
//! Every draw comes from `Rng::derive(seed, "multi", epoch << 32 ^ i)`: the partner (uniform
//! over the split, drawn again while its class is the image's), then the two shifts (x then y,
//! first image then partner). So an epoch is reproducible and a resumed or distributed run
//! draws what one process draws; the test pairs are epoch 0 of the test split.

use crate::data::{Batch, Dataset};
use crate::error::{CoreError, Result};
use crate::rng::Rng;

/// The paper's largest shift (36x36 pairs of 28x28 images).
pub const PAPER_SHIFT: usize = 4;
/// The seed of the test pairs (epoch 0 of the test split): the same for every run.
pub const TEST_PAIR_SEED: u64 = 0;
/// Partner draws before falling back to the next image of another class.
const MAX_DRAWS: usize = 64;

/// One pair: the two images and where each sits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pair {
    pub first: usize,
    pub second: usize,
    /// Shifts `(dx, dy)` of each image from the canvas's centre.
    pub shifts: [(isize, isize); 2],
}

/// Canvas side for `ds` and `shift`.
pub fn canvas_side(ds: &Dataset, shift: usize) -> usize {
    ds.rows.max(ds.cols) + 2 * shift
}

/// Checks that pairs can be made: at least two classes present.
pub fn check_pairs_possible(ds: &Dataset) -> Result<()> {
    let first = ds.labels.first().copied();
    if ds.labels.iter().all(|&l| Some(l) == first) {
        return Err(CoreError::Config(format!(
            "overlapping pairs need images of two classes; this split of {} images has one",
            ds.len()
        )));
    }
    Ok(())
}

/// The pair of sample `i` in `epoch`. The split must hold two classes
/// ([`check_pairs_possible`]).
pub fn draw_pair(ds: &Dataset, i: usize, seed: u64, epoch: u64, shift: usize) -> Pair {
    let mut rng = Rng::derive(seed, "multi", (epoch << 32) ^ i as u64);
    let n = ds.len();
    let label = ds.labels[i];
    let mut second = None;
    for _ in 0..MAX_DRAWS {
        let j = rng.below(n);
        if ds.labels[j] != label {
            second = Some(j);
            break;
        }
    }
    // A split almost all of one class: the next image of another class after the last draw.
    let second = second.unwrap_or_else(|| {
        let start = rng.below(n);
        (0..n)
            .map(|k| (start + k) % n)
            .find(|&j| ds.labels[j] != label)
            .unwrap_or(i)
    });
    let span = 2 * shift + 1;
    let mut d = || rng.below(span) as isize - shift as isize;
    let shifts = [(d(), d()), (d(), d())];
    Pair {
        first: i,
        second,
        shifts,
    }
}

/// Writes image `src` (`rows x cols`) into `dst` (`side x side`, zeroed first) centred and
/// shifted by `(dx, dy)`; `|dx|, |dy| <= (side - size) / 2` keeps it whole.
fn put(dst: &mut [f32], side: usize, src: &[u8], rows: usize, cols: usize, dx: isize, dy: isize) {
    dst.fill(0.0);
    let ox = ((side - cols) / 2) as isize + dx;
    let oy = ((side - rows) / 2) as isize + dy;
    for (y, row) in src.chunks_exact(cols).take(rows).enumerate() {
        let ty = oy + y as isize;
        if ty < 0 || ty >= side as isize {
            continue;
        }
        for (x, &p) in row.iter().enumerate() {
            let tx = ox + x as isize;
            if tx >= 0 && tx < side as isize {
                dst[ty as usize * side + tx as usize] = f32::from(p) / 255.0;
            }
        }
    }
}

/// The pairs of samples `indices` of `epoch`, drawn as [`draw_pair`] does: the overlays the
/// network sees (`[b, side, side]`), each image alone where it sits (`parts`, the targets of
/// its reconstruction: the first images, then the partners) and the two labels (`[2, b]`).
pub fn make_pair_batch(
    ds: &Dataset,
    indices: &[usize],
    seed: u64,
    epoch: u64,
    shift: usize,
) -> Batch {
    let side = canvas_side(ds, shift);
    let px = side * side;
    let b = indices.len();
    let mut images = vec![0.0; b * px];
    let mut parts = vec![0.0; 2 * b * px];
    let mut labels = vec![0; 2 * b];
    for (k, &i) in indices.iter().enumerate() {
        let pair = draw_pair(ds, i, seed, epoch, shift);
        for (o, (img, (dx, dy))) in [pair.first, pair.second]
            .into_iter()
            .zip(pair.shifts)
            .enumerate()
        {
            let dst = &mut parts[(o * b + k) * px..][..px];
            put(dst, side, ds.image(img), ds.rows, ds.cols, dx, dy);
            labels[o * b + k] = usize::from(ds.labels[img]);
        }
        let (first, second) = parts.split_at(b * px);
        for ((o, &x), &y) in images[k * px..][..px]
            .iter_mut()
            .zip(&first[k * px..][..px])
            .zip(&second[k * px..][..px])
        {
            *o = x.max(y);
        }
    }
    Batch {
        images,
        labels,
        rows: side,
        cols: side,
        objects: 2,
        parts,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dataset(n: usize, classes: u8) -> Dataset {
        // Image i: a 4x4 block at a class-dependent place in 8x8, brightness by index.
        let mut images = vec![0u8; n * 64];
        let labels: Vec<u8> = (0..n).map(|i| (i % classes as usize) as u8).collect();
        for (i, img) in images.chunks_exact_mut(64).enumerate() {
            let c = labels[i] as usize;
            for y in 2..6 {
                for x in c..c + 4 {
                    img[y * 8 + x.min(7)] = 100 + (i % 100) as u8;
                }
            }
        }
        Dataset {
            images,
            labels,
            rows: 8,
            cols: 8,
            classes: classes as usize,
        }
    }

    #[test]
    fn pairs_are_of_two_classes_with_shifts_in_range_and_reproducible() {
        let ds = dataset(50, 3);
        let mut seen = std::collections::HashSet::new();
        for i in 0..50 {
            let p = draw_pair(&ds, i, 7, 2, 3);
            assert_eq!(p, draw_pair(&ds, i, 7, 2, 3));
            assert_ne!(ds.labels[p.first], ds.labels[p.second], "{p:?}");
            for (dx, dy) in p.shifts {
                assert!((-3..=3).contains(&dx) && (-3..=3).contains(&dy), "{p:?}");
                seen.insert((dx, dy));
            }
        }
        // The shifts cover their range, and another epoch or seed draws other pairs.
        assert!(seen.len() > 30, "{}", seen.len());
        let moved = |f: &dyn Fn(usize) -> Pair| {
            (0..50)
                .filter(|&i| f(i) != draw_pair(&ds, i, 7, 2, 3))
                .count()
        };
        assert!(moved(&|i| draw_pair(&ds, i, 7, 3, 3)) > 40);
        assert!(moved(&|i| draw_pair(&ds, i, 8, 2, 3)) > 40);
    }

    #[test]
    fn a_split_of_mostly_one_class_still_pairs_across_classes() {
        let mut ds = dataset(200, 2);
        ds.labels.iter_mut().for_each(|l| *l = 0);
        ds.labels[123] = 1;
        assert!(check_pairs_possible(&ds).is_ok());
        for i in [0, 5, 199] {
            assert_eq!(draw_pair(&ds, i, 1, 0, 2).second, 123);
        }
        ds.labels[123] = 0;
        let err = check_pairs_possible(&ds).unwrap_err().to_string();
        assert!(err.contains("two classes"), "{err}");
    }

    #[test]
    fn the_overlay_is_the_brighter_of_the_two_whole_images() {
        let ds = dataset(10, 3);
        let b = make_pair_batch(&ds, &[0, 4, 7], 3, 0, 4);
        assert_eq!((b.rows, b.cols, b.len(), b.objects), (16, 16, 3, 2));
        let px = 256;
        let part = |o: usize, k: usize| &b.parts[(o * 3 + k) * px..][..px];
        for k in 0..3 {
            let pair = draw_pair(&ds, [0, 4, 7][k], 3, 0, 4);
            assert_eq!(b.labels[k], usize::from(ds.labels[pair.first]));
            assert_eq!(b.labels[3 + k], usize::from(ds.labels[pair.second]));
            for o in 0..2 {
                // Each image is placed whole: its mass is all there.
                let img = if o == 0 { pair.first } else { pair.second };
                let want: f32 = ds.image(img).iter().map(|&p| f32::from(p) / 255.0).sum();
                let got: f32 = part(o, k).iter().sum();
                assert!((want - got).abs() < 1e-3, "{want} {got}");
            }
            for p in 0..px {
                assert_eq!(b.images[k * px + p], part(0, k)[p].max(part(1, k)[p]));
            }
        }
        let t = b.targets();
        assert_eq!(
            (t.objects, t.parts.map(<[f32]>::len)),
            (2, Some(2 * 3 * px))
        );
        assert!(t.check(3, 3, px).is_ok());
    }
}
