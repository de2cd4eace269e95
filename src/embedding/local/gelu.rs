//! BERT's exact GELU, `x/2 * (1 + erf(x/sqrt 2))`, fused with the bias add
//! of the intermediate dense layer, as a candle custom op.
//!
//! candle's own `gelu_erf` evaluates a branchy scalar erf per element: about
//! a quarter of the forward pass on this model. Here erf is one odd rational
//! function, `x * P(x^2) / Q(x^2)` with `x` clamped to `[-ERF_CLAMP, ERF_CLAMP]`,
//! branch-free, so the compiler vectorises the loop. `P` and `Q` (degree 5
//! each) were fitted for this crate by `scripts/erf_fit.py` (linearised least
//! squares, then reweighted towards the minimax fit): the fit is within
//! 1.6e-8 of erf on `[0, ERF_CLAMP]` and erf is within 3e-8 of +-1 beyond;
//! evaluated in `f32` the result is within 3e-7 of erf (about 2.5 `f32` ulps
//! of 1; candle's scalar erf: 0.5 ulp), which leaves the embeddings unchanged
//! to 1e-6. The tanh approximation would be cheaper but changes them.

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, bail};

use super::ops::for_row_blocks;

/// Where erf is +-1 to within 3e-8 (less than half an `f32` ulp of 1).
const ERF_CLAMP: f32 = 3.92;
// The fitted coefficients (constant term first), rounded to f32. P[0] is the
// fit's, not 2/sqrt(pi) (the slope at 0): they differ in the 7th digit.
#[allow(clippy::approx_constant)]
const P: [f32; 6] = [1.128_379, 0.192_764_62, 0.053_060_535, 0.003_868_346_8, 0.000_287_479, 2.034_718_8e-6];
const Q: [f32; 6] = [1.0, 0.504_164_9, 0.115_084_834, 0.015_172_334, 0.001_188_118_4, 3.807_045_5e-5];

/// erf(x) for `f32`, NaN in NaN out.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let x = x.clamp(-ERF_CLAMP, ERF_CLAMP);
    let t = x * x;
    let p = ((((P[5] * t + P[4]) * t + P[3]) * t + P[2]) * t + P[1]) * t + P[0];
    let q = ((((Q[5] * t + Q[4]) * t + Q[3]) * t + Q[2]) * t + Q[1]) * t + Q[0];
    x * p / q
}

/// The exact (erf) GELU.
#[inline(always)]
pub fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// `gelu(xs + bias)` with `bias` broadcast over the rows of `xs`; both
/// contiguous `f32`, `bias` as long as the rows of `xs`.
pub struct BiasGelu;

impl CustomOp2 for BiasGelu {
    fn name(&self) -> &'static str {
        "bias-gelu"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xs_l: &Layout,
        bias: &CpuStorage,
        bias_l: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (Some((x0, x1)), Some((b0, b1))) = (xs_l.contiguous_offsets(), bias_l.contiguous_offsets()) else {
            bail!("bias-gelu needs contiguous inputs");
        };
        let xs = &xs.as_slice::<f32>()?[x0..x1];
        let bias = &bias.as_slice::<f32>()?[b0..b1];
        let width = bias.len();
        if width == 0 || xs_l.dims().last() != Some(&width) {
            bail!("bias-gelu: bias {:?} does not match the rows of {:?}", bias_l.dims(), xs_l.dims());
        }
        let mut out = vec![0f32; xs.len()];
        for_row_blocks(&mut out, width, |first, block| {
            let rows = block.chunks_exact_mut(width).zip(xs[first * width..].chunks_exact(width));
            for (out, row) in rows {
                for ((o, &x), &b) in out.iter_mut().zip(row).zip(bias) {
                    *o = gelu(x + b);
                }
            }
        });
        Ok((CpuStorage::F32(out), xs_l.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

    /// erf in f64, from its Maclaurin series (small |x|) or its continued
    /// fraction for erfc (large |x|): exact to ~1e-15 over the range tested.
    fn erf_f64(x: f64) -> f64 {
        let a = x.abs();
        let v = if a < 2.5 {
            let (mut term, mut sum, mut n) = (a, a, 0.0);
            while term.abs() > 1e-17 * sum.abs() {
                n += 1.0;
                term *= -a * a / n;
                sum += term / (2.0 * n + 1.0);
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        } else {
            // erfc(a) = exp(-a^2)/sqrt(pi) * 1/(a + (1/2)/(a + 1/(a + (3/2)/(a + ...))))
            let mut frac = a;
            for k in (1..=80).rev() {
                frac = a + f64::from(k) / 2.0 / frac;
            }
            1.0 - (-a * a).exp() / std::f64::consts::PI.sqrt() / frac
        };
        v.copysign(x)
    }

    #[test]
    fn reference_erf_is_right() {
        // Published values.
        assert!((erf_f64(0.5) - 0.520_499_877_813_046_5).abs() < 1e-12);
        assert!((erf_f64(1.0) - 0.842_700_792_949_714_9).abs() < 1e-12);
        assert!((erf_f64(2.5) - 0.999_593_047_982_555).abs() < 1e-12);
        assert!((erf_f64(3.0) - 0.999_977_909_503_001_4).abs() < 1e-12);
        assert!((erf_f64(-1.0) + 0.842_700_792_949_714_9).abs() < 1e-12);
    }

    #[test]
    fn erf_matches_f64_to_f32_resolution() {
        let mut worst = 0f64;
        for i in -100_000..=100_000 {
            let x = i as f32 * 1e-4 * 7.0; // [-7, 7]
            let err = (f64::from(erf(x)) - erf_f64(f64::from(x))).abs();
            worst = worst.max(err);
        }
        // The fit is within 1.6e-8; evaluating it in f32 adds about 2 ulps.
        assert!(worst < 3.5e-7, "max |erf error| {worst:e}");
        assert_eq!(erf(0.0), 0.0);
        assert_eq!(erf(-20.0), -erf(20.0));
        assert!(erf(f32::NAN).is_nan());
    }

    #[test]
    fn gelu_matches_f64() {
        for i in -20_000..=20_000 {
            let x = i as f32 * 5e-4; // [-10, 10]
            let x64 = f64::from(x);
            let want = 0.5 * x64 * (1.0 + erf_f64(x64 / std::f64::consts::SQRT_2));
            let got = f64::from(gelu(x));
            assert!((got - want).abs() <= 3e-7 * x64.abs().max(1.0), "gelu({x}) = {got}, want {want}");
        }
    }

    #[test]
    fn op_adds_the_bias_per_row() -> candle_core::Result<()> {
        let xs = Tensor::new(&[[0.5f32, -1.0, 2.0], [0.0, 3.0, -4.0]], &Device::Cpu)?;
        let bias = Tensor::new(&[1.0f32, 0.0, -0.5], &Device::Cpu)?;
        let got = xs.apply_op2_no_bwd(&bias, &BiasGelu)?.to_vec2::<f32>()?;
        let want: Vec<Vec<f32>> = xs.broadcast_add(&bias)?.gelu_erf()?.to_vec2()?;
        for (g, w) in got.iter().flatten().zip(want.iter().flatten()) {
            assert!((g - w).abs() < 1e-6, "{got:?} != {want:?}");
        }
        assert!(xs.apply_op2_no_bwd(&Tensor::new(&[1.0f32, 2.0], &Device::Cpu)?, &BiasGelu).is_err());
        Ok(())
    }
}
