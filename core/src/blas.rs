//! Matrix products on OpenBLAS.
//!
//! Products run on OpenBLAS's own threads, as many as the calling rayon pool has; element-wise
//! loops run on the rayon pool. The two never run at once (a product is called from outside any
//! parallel loop), so the busy threads never exceed the pool size. OpenBLAS splits a product
//! over rows and columns only, never over the shared dimension, so results do not depend on the
//! thread count. (Splitting rows across rayon tasks with single-threaded BLAS was measured
//! slower: every task packs the whole right-hand matrix.)

use std::sync::atomic::{AtomicUsize, Ordering};

use ndarray::linalg::general_mat_mul;
use ndarray::{ArrayView2, ArrayViewMut2};

// Link OpenBLAS (system library) for ndarray's `blas` feature.
extern crate blas_src;

unsafe extern "C" {
    fn openblas_set_num_threads(num_threads: std::ffi::c_int);
}

static BLAS_THREADS: AtomicUsize = AtomicUsize::new(0);

/// Sets OpenBLAS's thread count (only when it changes).
pub fn set_blas_threads(n: usize) {
    let n = n.max(1);
    if BLAS_THREADS.swap(n, Ordering::Relaxed) != n {
        // SAFETY: plain setter of OpenBLAS's global thread count.
        unsafe { openblas_set_num_threads(n as std::ffi::c_int) };
    }
}

/// Starts OpenBLAS single-threaded until a product says otherwise.
pub fn init_blas() {
    if BLAS_THREADS.load(Ordering::Relaxed) == 0 {
        set_blas_threads(1);
    }
}

/// `c = alpha * a @ b + beta * c` on as many BLAS threads as the current rayon pool has.
/// `a` and `b` may be transposed views; BLAS handles the strides.
pub fn par_gemm(
    alpha: f32,
    a: &ArrayView2<'_, f32>,
    b: &ArrayView2<'_, f32>,
    beta: f32,
    c: &mut ArrayViewMut2<'_, f32>,
) {
    debug_assert_eq!(a.nrows(), c.nrows());
    debug_assert_eq!(a.ncols(), b.nrows());
    debug_assert_eq!(b.ncols(), c.ncols());
    set_blas_threads(rayon::current_num_threads());
    general_mat_mul(alpha, a, b, beta, c);
}

/// A row-major `[rows, cols]` view of a slice.
///
/// # Panics
/// When `s.len() != rows * cols`. Every caller slices its buffer from the model's own sizes
/// (the [`crate::Workspace`] and [`crate::ParamLayout`] are built from the same config), so a
/// mismatch is a bug in this crate, never bad input: inputs are checked before any kernel runs.
#[allow(
    clippy::expect_used,
    reason = "a length mismatch is an internal bug, see # Panics"
)]
pub fn view2(s: &[f32], rows: usize, cols: usize) -> ArrayView2<'_, f32> {
    ArrayView2::from_shape((rows, cols), s).expect("view2: slice length is not rows * cols")
}

/// A mutable row-major `[rows, cols]` view of a slice.
///
/// # Panics
/// When `s.len() != rows * cols`, as [`view2`].
#[allow(
    clippy::expect_used,
    reason = "a length mismatch is an internal bug, see # Panics"
)]
pub fn view2_mut(s: &mut [f32], rows: usize, cols: usize) -> ArrayViewMut2<'_, f32> {
    ArrayViewMut2::from_shape((rows, cols), s).expect("view2_mut: slice length is not rows * cols")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn naive(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f64> {
        let mut c = vec![0.0f64; m * n];
        for i in 0..m {
            for p in 0..k {
                for j in 0..n {
                    c[i * n + j] += a[i * k + p] as f64 * b[p * n + j] as f64;
                }
            }
        }
        c
    }

    /// Guards against BLAS builds that pick a broken kernel on this CPU: odd sizes, transposes
    /// and two threads all have to agree with a plain triple loop.
    #[test]
    fn par_gemm_matches_naive_at_odd_sizes() {
        init_blas();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let mut rng = Rng::new(3);
        for &(m, k, n) in &[(1, 1, 1), (37, 81, 45), (130, 257, 33), (200, 9, 300)] {
            let a: Vec<f32> = (0..m * k).map(|_| rng.normal()).collect();
            let b: Vec<f32> = (0..k * n).map(|_| rng.normal()).collect();
            let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
            let want = naive(&a, &b, m, k, n);
            let mut c = vec![1.0f32; m * n];
            pool.install(|| {
                par_gemm(
                    1.0,
                    &view2(&a, m, k),
                    &view2(&bt, n, k).t(),
                    0.0,
                    &mut view2_mut(&mut c, m, n),
                )
            });
            for (x, y) in c.iter().zip(&want) {
                assert!(
                    (*x as f64 - y).abs() < 1e-3 * (1.0 + y.abs()),
                    "{m}x{k}x{n}: {x} vs {y}"
                );
            }
        }
    }
}
