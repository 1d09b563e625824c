//! Running a hot loop with 8-wide vectors where the CPU has them, from a binary built for the
//! baseline x86-64 target (4-wide SSE2).

/// Runs `f` compiled for AVX2 when the CPU has it, else as built. `f` and what it inlines (mark
/// the loops it calls `#[inline]`) get the wider vectors. Rust never fuses a multiply and an add
/// on its own, so both versions do the same IEEE operations in the same order: the same bits.
#[inline]
pub fn with_avx2<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2")]
        #[inline]
        fn avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has the feature `avx2` was compiled for.
            return unsafe { avx2(f) };
        }
    }
    f()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A loop of the kinds the kernels run (multiplies, adds, a square root, a division),
    /// inlined into the AVX2 version as the kernels are.
    #[inline(always)]
    fn kernel(x: &[f32]) -> Vec<u32> {
        x.iter()
            .map(|&v| (0.9 * v + 0.1 * v * v).sqrt() / (v.abs() + 1e-8))
            .map(f32::to_bits)
            .collect()
    }

    #[test]
    fn the_avx2_version_gives_the_baseline_bits() {
        let x: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let wide = with_avx2(
            #[inline(always)]
            || kernel(&x),
        );
        assert_eq!(wide, kernel(&x));
    }
}
