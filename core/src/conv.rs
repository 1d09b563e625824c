//! Convolution geometry, im2col and col2im on channel-major (`[C, B, H, W]`) activations.
//!
//! Both convolutions of CapsNet read a channel-major tensor (the image, whose single channel makes
//! `[B, 1, H, W]` and `[1, B, H, W]` the same bytes, and conv1's output). Columns are ordered
//! `(cin, kh, kw)`, the order of the PyTorch weight `[cout, cin, kh, kw]`, so the weights are used
//! as stored. Two column layouts are offered:
//! - k-major `[K, B*P]` for `out[cout, B*P] = W @ col` (conv1: output stays channel-major);
//! - row-major `[B*P, K]` for `out[B*P, cout] = col @ W^T` (primary: one row per capsule
//!   position, channels contiguous, which is the capsule layout).
//!
//! A geometry may pad its input with zeros ([`ConvGeom::padded`], the CNN baseline's 'same'
//! convolutions): the loops copy the span of each row that meets the image and zero the rest,
//! so without padding they copy whole rows.

use rayon::prelude::*;

/// A square convolution, optionally zero-padded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvGeom {
    pub cin: usize,
    pub cout: usize,
    pub kernel: usize,
    pub stride: usize,
    /// Zeros added on each side of the input.
    pub pad: usize,
    /// Input side.
    pub h_in: usize,
    /// Output side.
    pub h_out: usize,
}

impl ConvGeom {
    /// Without padding: `h_out = (h_in - kernel) / stride + 1`.
    pub fn new(cin: usize, cout: usize, kernel: usize, stride: usize, h_in: usize) -> Self {
        Self::padded(cin, cout, kernel, stride, 0, h_in)
    }
    /// With `pad` zeros on each side: `h_out = (h_in + 2 pad - kernel) / stride + 1`.
    pub fn padded(
        cin: usize,
        cout: usize,
        kernel: usize,
        stride: usize,
        pad: usize,
        h_in: usize,
    ) -> Self {
        ConvGeom {
            cin,
            cout,
            kernel,
            stride,
            pad,
            h_in,
            h_out: (h_in + 2 * pad - kernel) / stride + 1,
        }
    }
    /// Column length cin * k * k.
    pub fn k(&self) -> usize {
        self.cin * self.kernel * self.kernel
    }
    /// Output positions per image.
    pub fn positions(&self) -> usize {
        self.h_out * self.h_out
    }

    /// `col[(cin,kh,kw), (b,oy,ox)]` for images `b0..b0+nb` of a `[cin, batch, h, h]` input.
    pub fn im2col_k_major(&self, x: &[f32], batch: usize, b0: usize, nb: usize, col: &mut [f32]) {
        let (h, ho, k, s, p) = (self.h_in, self.h_out, self.kernel, self.stride, self.pad);
        let n = nb * ho * ho;
        debug_assert_eq!(col.len(), self.k() * n);
        col.par_chunks_mut(n).enumerate().for_each(|(r, row)| {
            let (c, kh, kw) = (r / (k * k), (r / k) % k, r % k);
            let (y0, y1) = self.inside(kh);
            let (x0, x1) = self.inside(kw);
            for b in 0..nb {
                let plane = &x[(c * batch + b0 + b) * h * h..][..h * h];
                let out = &mut row[b * ho * ho..][..ho * ho];
                for (oy, dst) in out.chunks_exact_mut(ho).enumerate() {
                    // Rows above or below the image, or a kernel column that never meets it.
                    if oy < y0 || oy >= y1 || x0 == x1 {
                        dst.fill(0.0);
                        continue;
                    }
                    let src = &plane[(oy * s + kh - p) * h..][..h];
                    dst[..x0].fill(0.0);
                    dst[x1..].fill(0.0);
                    if s == 1 {
                        dst[x0..x1].copy_from_slice(&src[x0 + kw - p..x1 + kw - p]);
                    } else {
                        for ox in x0..x1 {
                            dst[ox] = src[ox * s + kw - p];
                        }
                    }
                }
            }
        });
    }

    /// Adds a k-major column gradient back into `gx` (`[cin, batch, h, h]`).
    pub fn col2im_k_major(&self, col: &[f32], batch: usize, b0: usize, nb: usize, gx: &mut [f32]) {
        let (h, ho, k, s, p) = (self.h_in, self.h_out, self.kernel, self.stride, self.pad);
        let n = nb * ho * ho;
        gx.par_chunks_mut(batch * h * h)
            .enumerate()
            .for_each(|(c, gxc)| {
                for kh in 0..k {
                    let (y0, y1) = self.inside(kh);
                    for kw in 0..k {
                        let (x0, x1) = self.inside(kw);
                        let row = &col[((c * k + kh) * k + kw) * n..][..n];
                        for b in 0..nb {
                            let plane = &mut gxc[(b0 + b) * h * h..][..h * h];
                            for oy in y0..y1 {
                                let src = &row[(b * ho + oy) * ho..][..ho];
                                let dst = &mut plane[(oy * s + kh - p) * h..][..h];
                                for ox in x0..x1 {
                                    dst[ox * s + kw - p] += src[ox];
                                }
                            }
                        }
                    }
                }
            });
    }

    /// `col[(b,oy,ox), (cin,kh,kw)]` for images `b0..b0+nb` of a `[cin, batch, h, h]` input.
    pub fn im2col_row_major(&self, x: &[f32], batch: usize, b0: usize, nb: usize, col: &mut [f32]) {
        let (h, ho, k, s, p) = (self.h_in, self.h_out, self.kernel, self.stride, self.pad);
        let kk = self.k();
        debug_assert_eq!(col.len(), nb * ho * ho * kk);
        col.par_chunks_mut(kk).enumerate().for_each(|(r, row)| {
            let (b, oy, ox) = (r / (ho * ho), (r / ho) % ho, r % ho);
            // Kernel columns lo..hi read the image; the others, padding.
            let (lo, hi) = self.kernel_span(ox);
            for c in 0..self.cin {
                let plane = &x[(c * batch + b0 + b) * h * h..][..h * h];
                for kh in 0..k {
                    let dst = &mut row[(c * k + kh) * k..][..k];
                    let Some(iy) = self.source(oy, kh) else {
                        dst.fill(0.0);
                        continue;
                    };
                    dst[..lo].fill(0.0);
                    dst[hi..].fill(0.0);
                    let at = iy * h + ox * s + lo - p;
                    dst[lo..hi].copy_from_slice(&plane[at..at + hi - lo]);
                }
            }
        });
    }

    /// Adds a row-major column gradient back into `gx` (`[cin, batch, h, h]`).
    pub fn col2im_row_major(
        &self,
        col: &[f32],
        batch: usize,
        b0: usize,
        nb: usize,
        gx: &mut [f32],
    ) {
        let (h, ho, k, s, p) = (self.h_in, self.h_out, self.kernel, self.stride, self.pad);
        let kk = self.k();
        gx.par_chunks_mut(batch * h * h)
            .enumerate()
            .for_each(|(c, gxc)| {
                for b in 0..nb {
                    let plane = &mut gxc[(b0 + b) * h * h..][..h * h];
                    for oy in 0..ho {
                        for ox in 0..ho {
                            let (lo, hi) = self.kernel_span(ox);
                            let row = &col[((b * ho + oy) * ho + ox) * kk + c * k * k..][..k * k];
                            for kh in 0..k {
                                let Some(iy) = self.source(oy, kh) else {
                                    continue;
                                };
                                let at = iy * h + ox * s + lo - p;
                                let dst = &mut plane[at..at + hi - lo];
                                for (d, g) in dst.iter_mut().zip(&row[kh * k + lo..kh * k + hi]) {
                                    *d += g;
                                }
                            }
                        }
                    }
                }
            });
    }

    /// Output positions `lo..hi` along one axis whose input index `o * stride + koff - pad`
    /// lies inside the image (the others read padding zeros).
    fn inside(&self, koff: usize) -> (usize, usize) {
        let (h, s, p) = (self.h_in, self.stride, self.pad);
        let lo = p.saturating_sub(koff).div_ceil(s);
        let hi = if h + p > koff {
            ((h + p - koff - 1) / s + 1).min(self.h_out)
        } else {
            0
        };
        (lo.min(hi), hi)
    }

    /// Kernel offsets `lo..hi` at which output `o` reads inside the image along one axis (all
    /// of `0..kernel` without padding).
    fn kernel_span(&self, o: usize) -> (usize, usize) {
        let start = o * self.stride;
        let lo = self.pad.saturating_sub(start).min(self.kernel);
        let hi = (self.h_in + self.pad)
            .saturating_sub(start)
            .min(self.kernel);
        (lo.min(hi), hi)
    }

    /// The input index read by output `o` at kernel offset `koff`, or `None` in the padding.
    fn source(&self, o: usize, koff: usize) -> Option<usize> {
        (o * self.stride + koff)
            .checked_sub(self.pad)
            .filter(|&i| i < self.h_in)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// im2col then the transposed layout must agree, and col2im must be im2col's adjoint:
    /// <im2col(x), y> == <x, col2im(y)> for any x, y.
    #[test]
    fn layouts_agree_and_col2im_is_the_adjoint() {
        let g = ConvGeom::new(3, 4, 3, 2, 9);
        assert_eq!(g.h_out, 4);
        let batch = 3;
        let x: Vec<f32> = (0..g.cin * batch * 81)
            .map(|i| ((i * 37) % 101) as f32 * 0.01)
            .collect();
        let (b0, nb) = (1, 2);
        let n = nb * g.positions();
        let mut km = vec![0.0; g.k() * n];
        let mut rm = vec![0.0; g.k() * n];
        g.im2col_k_major(&x, batch, b0, nb, &mut km);
        g.im2col_row_major(&x, batch, b0, nb, &mut rm);
        for r in 0..g.k() {
            for p in 0..n {
                assert_eq!(km[r * n + p], rm[p * g.k() + r]);
            }
        }
        // Spot check one element against the definition.
        let (c, kh, kw, b, oy, ox) = (2, 1, 2, 1, 3, 1);
        let want = x[((c * batch + b0 + b) * 9 + oy * 2 + kh) * 9 + ox * 2 + kw];
        assert_eq!(
            km[((c * 3 + kh) * 3 + kw) * n + (b * 4 + oy) * 4 + ox],
            want
        );

        let y: Vec<f32> = (0..g.k() * n)
            .map(|i| ((i * 13) % 17) as f32 - 8.0)
            .collect();
        let mut gx = vec![0.0; x.len()];
        g.col2im_k_major(&y, batch, b0, nb, &mut gx);
        let lhs: f64 = km.iter().zip(&y).map(|(a, b)| (a * b) as f64).sum();
        let rhs: f64 = x.iter().zip(&gx).map(|(a, b)| (a * b) as f64).sum();
        assert!((lhs - rhs).abs() < 1e-6 * lhs.abs().max(1.0), "{lhs} {rhs}");
        let yt: Vec<f32> = (0..g.k() * n)
            .map(|i| y[(i % g.k()) * n + i / g.k()])
            .collect();
        let mut gx2 = vec![0.0; x.len()];
        g.col2im_row_major(&yt, batch, b0, nb, &mut gx2);
        assert_eq!(gx, gx2);
    }

    fn dot(a: &[f32], b: &[f32]) -> f64 {
        a.iter()
            .zip(b)
            .map(|(x, y)| f64::from(*x) * f64::from(*y))
            .sum()
    }

    /// With and without zero padding: every column entry is the padded input at its position
    /// (zero outside the image), both layouts agree, and both col2im are im2col's adjoint. Geometries include a
    /// kernel wider than the image and a stride of 2.
    #[test]
    fn im2col_matches_the_definition_and_col2im_is_the_adjoint() {
        for g in [
            ConvGeom::new(2, 3, 3, 1, 6),
            ConvGeom::new(2, 3, 3, 2, 7),
            ConvGeom::padded(2, 3, 3, 1, 1, 5),
            ConvGeom::padded(1, 2, 5, 1, 2, 4),
            ConvGeom::padded(2, 2, 3, 2, 1, 6),
            ConvGeom::padded(1, 1, 5, 1, 2, 1),
        ] {
            let (h, ho, k, s, p) = (g.h_in, g.h_out, g.kernel, g.stride, g.pad);
            let batch = 3;
            let x: Vec<f32> = (0..g.cin * batch * h * h)
                .map(|i| ((i * 37) % 101) as f32 * 0.01 + 0.5)
                .collect();
            let (b0, nb) = (1, 2);
            let n = nb * g.positions();
            let mut km = vec![f32::NAN; g.k() * n];
            let mut rm = vec![f32::NAN; g.k() * n];
            g.im2col_k_major(&x, batch, b0, nb, &mut km);
            g.im2col_row_major(&x, batch, b0, nb, &mut rm);
            let mut zeros = 0;
            for c in 0..g.cin {
                for kh in 0..k {
                    for kw in 0..k {
                        let r = (c * k + kh) * k + kw;
                        for b in 0..nb {
                            for oy in 0..ho {
                                for ox in 0..ho {
                                    let (iy, ix) = (
                                        (oy * s + kh) as isize - p as isize,
                                        (ox * s + kw) as isize - p as isize,
                                    );
                                    let inside = (0..h as isize).contains(&iy)
                                        && (0..h as isize).contains(&ix);
                                    let want = if inside {
                                        x[((c * batch + b0 + b) * h + iy as usize) * h
                                            + ix as usize]
                                    } else {
                                        zeros += 1;
                                        0.0
                                    };
                                    let pos = (b * ho + oy) * ho + ox;
                                    assert_eq!(km[r * n + pos], want, "{g:?} k-major");
                                    assert_eq!(rm[pos * g.k() + r], want, "{g:?} row-major");
                                }
                            }
                        }
                    }
                }
            }
            assert_eq!(zeros > 0, p > 0, "{g:?}: padding read {zeros} times");
            let y: Vec<f32> = (0..g.k() * n)
                .map(|i| ((i * 13) % 17) as f32 - 8.0)
                .collect();
            let mut gx = vec![0.0; x.len()];
            g.col2im_k_major(&y, batch, b0, nb, &mut gx);
            let (lhs, rhs) = (dot(&km, &y), dot(&x, &gx));
            assert!(
                (lhs - rhs).abs() < 1e-6 * lhs.abs().max(1.0),
                "{g:?}: {lhs} {rhs}"
            );
            let yt: Vec<f32> = (0..g.k() * n)
                .map(|i| y[(i % g.k()) * n + i / g.k()])
                .collect();
            let mut gx2 = vec![0.0; x.len()];
            g.col2im_row_major(&yt, batch, b0, nb, &mut gx2);
            assert_eq!(gx, gx2, "{g:?}");
            // Images outside b0..b0+nb get nothing.
            assert!(gx[..h * h].iter().all(|&v| v == 0.0));
        }
    }
}
