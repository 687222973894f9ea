//! The optimizer step's in-place updates: Adam's moments, AdamW's weight update, and the gradient norm's sum of
//! squares (kernels: `src/kernels/optim.cu`).

use super::{elems, elems_mut, same_len, Elem};
use anyhow::{bail, Result};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, InplaceOp2, InplaceOp3, Layout, Tensor};

/// `s ← β·s + (1 − β)·x` in place, with `x = scale·g`, or `(scale·g)²` when `square` (Adam's moments).
pub fn ema_(s: &Tensor, g: &Tensor, beta: f64, scale: f64, square: bool) -> Result<()> {
    if s.dtype() != g.dtype() {
        bail!("fused moment update: a {:?} moment and a {:?} gradient (one dtype expected)", s.dtype(), g.dtype());
    }
    Ok(s.inplace_op2(g, &Ema { beta: beta as f32, one_minus_beta: (1.0 - beta) as f32, scale: scale as f32, square })?)
}

/// AdamW's step from its new moments, in place: `w ← w·decay − step·m / (√v / sqrt_bc2 + eps)`.
#[derive(Clone, Copy, Debug)]
pub struct AdamW {
    /// `1 − lr·weight_decay`
    pub decay: f64,
    /// `lr / (1 − β1^t)`
    pub step: f64,
    /// `√(1 − β2^t)`
    pub sqrt_bc2: f64,
    pub eps: f64,
}

impl AdamW {
    pub fn apply_(&self, w: &Tensor, m: &Tensor, v: &Tensor) -> Result<()> {
        Ok(w.inplace_op3(m, v, self)?)
    }
}

/// `acc ← acc + Σ g²` (`acc`: a 1-element f32 tensor on `g`'s device): a gradient norm's square, accumulated on
/// the device so that reading it costs one synchronisation.
pub fn add_sum_squares(acc: &Tensor, g: &Tensor) -> Result<()> {
    if acc.dtype() != DType::F32 || acc.elem_count() != 1 || !acc.is_contiguous() {
        bail!("add_sum_squares: the accumulator must be one contiguous f32 element, not {:?}", acc.shape());
    }
    Ok(acc.inplace_op2(g, &SumSquares)?)
}

struct Ema {
    beta: f32,
    /// from f64: `1 − (0.999 as f32)` would be off by 5e-5
    one_minus_beta: f32,
    scale: f32,
    square: bool,
}

struct SumSquares;

impl Ema {
    fn cpu<T: Elem>(&self, s: &mut [T], g: &[T]) -> candle_core::Result<()> {
        same_len(s.len(), g.len())?;
        for (s, g) in s.iter_mut().zip(g) {
            let x = self.scale * g.get();
            let x = if self.square { x * x } else { x };
            *s = T::put(self.beta * s.get() + self.one_minus_beta * x);
        }
        Ok(())
    }
}

impl AdamW {
    fn cpu<T: Elem>(&self, w: &mut [T], m: &[T], v: &[T]) -> candle_core::Result<()> {
        same_len(w.len(), m.len())?;
        same_len(w.len(), v.len())?;
        let (decay, step, sqrt_bc2, eps) = (self.decay as f32, self.step as f32, self.sqrt_bc2 as f32, self.eps as f32);
        for ((w, m), v) in w.iter_mut().zip(m).zip(v) {
            let denom = v.get().sqrt() / sqrt_bc2 + eps;
            *w = T::put(w.get() * decay - step * (m.get() / denom));
        }
        Ok(())
    }
}

fn sum_squares<T: Elem>(g: &[T]) -> f32 {
    g.iter().map(|x| x.get() * x.get()).sum()
}

impl InplaceOp2 for Ema {
    fn name(&self) -> &'static str {
        "sdtune-ema"
    }
    fn cpu_fwd(&self, dst: &mut CpuStorage, dl: &Layout, g: &CpuStorage, gl: &Layout) -> candle_core::Result<()> {
        fn typed<T: Elem>(
            op: &Ema,
            s: &mut CpuStorage,
            sl: &Layout,
            g: &CpuStorage,
            gl: &Layout,
        ) -> candle_core::Result<()> {
            op.cpu(elems_mut::<T>(s, sl)?, elems::<T>(g, gl)?)
        }
        by_dtype!(dst.dtype(), self.name(), typed(self, dst, dl, g, gl))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        dst: &mut candle_core::CudaStorage,
        dl: &Layout,
        g: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> candle_core::Result<()> {
        use super::cuda::{launch, Arg::F32, Arg::I32};
        let extra = [F32(self.beta), F32(self.one_minus_beta), F32(self.scale), I32(self.square as i32)];
        by_dtype!(dst.dtype(), self.name(), launch("optim", "ema", dst, dl, &[(g, gl)], &extra))
    }
}

impl InplaceOp3 for AdamW {
    fn name(&self) -> &'static str {
        "sdtune-adamw"
    }
    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        wl: &Layout,
        m: &CpuStorage,
        ml: &Layout,
        v: &CpuStorage,
        vl: &Layout,
    ) -> candle_core::Result<()> {
        fn typed<T: Elem>(
            op: &AdamW,
            w: (&mut CpuStorage, &Layout),
            m: (&CpuStorage, &Layout),
            v: (&CpuStorage, &Layout),
        ) -> candle_core::Result<()> {
            op.cpu(elems_mut::<T>(w.0, w.1)?, elems::<T>(m.0, m.1)?, elems::<T>(v.0, v.1)?)
        }
        by_dtype!(dst.dtype(), self.name(), typed(self, (dst, wl), (m, ml), (v, vl)))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        dst: &mut candle_core::CudaStorage,
        wl: &Layout,
        m: &candle_core::CudaStorage,
        ml: &Layout,
        v: &candle_core::CudaStorage,
        vl: &Layout,
    ) -> candle_core::Result<()> {
        use super::cuda::{launch, Arg::F32};
        let p = [F32(self.decay as f32), F32(self.step as f32), F32(self.sqrt_bc2 as f32), F32(self.eps as f32)];
        by_dtype!(dst.dtype(), self.name(), launch("optim", "adamw", dst, wl, &[(m, ml), (v, vl)], &p))
    }
}

impl InplaceOp2 for SumSquares {
    fn name(&self) -> &'static str {
        "sdtune-sum-squares"
    }
    fn cpu_fwd(&self, dst: &mut CpuStorage, al: &Layout, g: &CpuStorage, gl: &Layout) -> candle_core::Result<()> {
        fn typed<T: Elem>(g: &CpuStorage, gl: &Layout) -> candle_core::Result<f32> {
            Ok(sum_squares(elems::<T>(g, gl)?))
        }
        let sum = by_dtype!(g.dtype(), self.name(), typed(g, gl))?;
        elems_mut::<f32>(dst, al)?[0] += sum;
        Ok(())
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        dst: &mut candle_core::CudaStorage,
        al: &Layout,
        g: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> candle_core::Result<()> {
        use super::cuda::sum_squares;
        by_dtype!(g.dtype(), self.name(), sum_squares(dst, al, g, gl))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::fused::applies;
    use candle_core::Device;

    fn t(v: &[f32], dtype: DType) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap().to_dtype(dtype).unwrap()
    }

    fn f32s(t: &Tensor) -> Vec<f32> {
        t.to_dtype(DType::F32).unwrap().to_vec1().unwrap()
    }

    #[test]
    fn fused_ops_match_composed_candle_ops() {
        let (m0, v0, w0, g0) = ([0.5f32, -1.0, 0.0], [0.25f32, 1.0, 0.0], [1.0f32, -2.0, 3.0], [2.0f32, 0.5, -4.0]);
        for (dtype, tol) in [(DType::F32, 1e-6), (DType::BF16, 1e-2), (DType::F16, 2e-3)] {
            let (m, v, w, g) = (t(&m0, dtype), t(&v0, dtype), t(&w0, dtype), t(&g0, dtype));
            assert!(applies(&[&w, &m, &v, &g]).unwrap());
            ema_(&m, &g, 0.9, 0.5, false).unwrap();
            ema_(&v, &g, 0.999, 0.5, true).unwrap();
            let p = AdamW { decay: 1.0 - 0.1 * 0.01, step: 0.1 / (1.0 - 0.9f64.powi(3)), sqrt_bc2: 0.05, eps: 1e-8 };
            p.apply_(&w, &m, &v).unwrap();
            // the same arithmetic as candle ops in f32
            let (m32, v32, w32, g32) = (t(&m0, DType::F32), t(&v0, DType::F32), t(&w0, DType::F32), t(&g0, DType::F32));
            let gs = (&g32 * 0.5).unwrap();
            let m_want = ((&m32 * 0.9).unwrap() + (&gs * 0.1).unwrap()).unwrap();
            let v_want = ((&v32 * 0.999).unwrap() + (gs.sqr().unwrap() * (1.0 - 0.999)).unwrap()).unwrap();
            let denom = ((v_want.sqrt().unwrap() / 0.05).unwrap() + 1e-8).unwrap();
            let w_want = ((&w32 * p.decay).unwrap() - (m_want.div(&denom).unwrap() * p.step).unwrap()).unwrap();
            for (got, want) in [(&m, &m_want), (&v, &v_want), (&w, &w_want)] {
                for (a, b) in f32s(got).iter().zip(f32s(want)) {
                    assert!((a - b).abs() <= tol * b.abs().max(1.0), "{dtype:?}: {a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn sum_squares_accumulates_across_tensors_and_dtypes() {
        let acc = Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap();
        add_sum_squares(&acc, &t(&[3.0, 4.0], DType::F32)).unwrap();
        add_sum_squares(&acc, &t(&[1.0, -2.0], DType::BF16)).unwrap();
        assert_eq!(f32s(&acc), vec![30.0]);
        let e = add_sum_squares(&Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap(), &acc).unwrap_err();
        assert!(e.to_string().contains("one contiguous f32 element"), "{e}");
    }

    #[test]
    fn views_with_offsets_are_updated_in_place_and_mixed_dtypes_refused() {
        let base = t(&[9.0, 1.0, 2.0], DType::F32);
        let s = base.narrow(0, 1, 2).unwrap();
        ema_(&s, &t(&[3.0, 4.0], DType::F32), 0.5, 1.0, false).unwrap();
        assert_eq!(f32s(&base), vec![9.0, 2.0, 3.0]);
        assert!(!applies(&[&t(&[1.0], DType::F32), &t(&[1.0], DType::BF16)]).unwrap());
        let e = ema_(&t(&[1.0], DType::F32), &t(&[1.0], DType::BF16), 0.5, 1.0, false).unwrap_err();
        assert!(e.to_string().contains("a F32 moment and a BF16 gradient"), "{e}");
    }
}
