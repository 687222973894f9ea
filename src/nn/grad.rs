//! Custom backward passes: a forward computed outside candle's graph (on detached inputs) is joined to its inputs
//! by one custom op (a CustomOp3 for 1 to 3 inputs) whose forward hands back that result (cast to the output dtype)
//! and whose backward is a given function. The backward is asked only for the gradients that something needs: an
//! input that is neither a variable nor computed from one (a frozen weight) gets none.

use anyhow::Result;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CudaStorage, CustomOp3, DType, Layout, Shape, Storage, Tensor};
use std::sync::{Arc, Mutex};

/// `backward(inputs, output, grad_output, needed)` → one gradient per input (`None` where not needed).
pub type Backward = dyn Fn(&[Tensor], &Tensor, &Tensor, &[bool]) -> Result<Vec<Option<Tensor>>> + Send + Sync;

/// Whether gradients flow into `t` (a variable, or computed from one).
pub fn tracked(t: &Tensor) -> bool {
    t.track_op()
}

/// Joins `y` (computed from detached copies of `inputs`) to `inputs`, with `backward` as its gradient; `y` is cast
/// to `dtype`. With no tracked input, `y` is returned cast, and no graph is built. At most 3 inputs. The backward
/// is timed under `kind` while `profile_ops` records.
pub fn attach(
    kind: &'static str,
    inputs: &[&Tensor],
    y: Tensor,
    dtype: DType,
    backward: impl Fn(&[Tensor], &Tensor, &Tensor, &[bool]) -> Result<Vec<Option<Tensor>>> + Send + Sync + 'static,
) -> Result<Tensor> {
    if !inputs.iter().any(|t| tracked(t)) {
        return Ok(y.to_dtype(dtype)?);
    }
    if inputs.is_empty() || inputs.len() > 3 {
        anyhow::bail!("grad::attach takes 1 to 3 inputs, got {}", inputs.len());
    }
    let n = inputs.len();
    let op = Attached { kind, n, y: Mutex::new(Some(y)), dtype, backward: Arc::new(backward) };
    // one 3-input op for every arity: missing inputs repeat the last one and receive no gradient
    let arg = |i: usize| inputs[i.min(n - 1)];
    Ok(arg(0).apply_op3(arg(1), arg(2), op)?)
}

struct Attached {
    kind: &'static str,
    /// How many of the op's 3 arguments are real inputs.
    n: usize,
    /// The precomputed result, handed over (and dropped here) by the forward: the graph keeps only the op's output.
    y: Mutex<Option<Tensor>>,
    dtype: DType,
    backward: Arc<Backward>,
}

impl Attached {
    fn take_y(&self) -> candle_core::Result<Tensor> {
        let taken = self.y.lock().map(|mut y| y.take()).ok().flatten();
        taken.ok_or_else(|| candle_core::Error::Msg("grad::attach: the result was already handed over".into()))
    }

    fn cpu(&self) -> candle_core::Result<(CpuStorage, Shape)> {
        let y = self.take_y()?;
        let (storage, layout) = y.storage_and_layout();
        match &*storage {
            Storage::Cpu(s) => Ok((s.to_dtype(layout, self.dtype)?, layout.shape().clone())),
            _ => Err(candle_core::Error::Msg("grad::attach: result is not on the CPU".into())),
        }
    }

    fn cuda(&self) -> candle_core::Result<(CudaStorage, Shape)> {
        let y = self.take_y()?;
        let (storage, layout) = y.storage_and_layout();
        match &*storage {
            Storage::Cuda(s) => Ok((s.to_dtype(layout, self.dtype)?, layout.shape().clone())),
            _ => Err(candle_core::Error::Msg("grad::attach: result is not on the CUDA device".into())),
        }
    }

    fn bwd(&self, args: &[&Tensor], res: &Tensor, grad: &Tensor) -> candle_core::Result<Vec<Option<Tensor>>> {
        let args = &args[..self.n];
        let needed: Vec<bool> = args.iter().map(|t| tracked(t)).collect();
        let detached: Vec<Tensor> = args.iter().map(|t| t.detach()).collect();
        let grads = super::profile::time(self.kind, grad.device(), || {
            (self.backward)(&detached, &res.detach(), &grad.detach(), &needed)
        })
        .map_err(|e| candle_core::Error::Msg(format!("{e:#}")))?;
        grads.into_iter().zip(args).map(|(g, a)| g.map(|g| g.to_dtype(a.dtype())).transpose()).collect()
    }
}

const NAME: &str = "sdtune-attached";

impl CustomOp3 for Attached {
    fn name(&self) -> &'static str {
        NAME
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.cpu()
    }
    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        self.cuda()
    }
    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let mut g = Attached::bwd(self, &[a, b, c], res, grad)?.into_iter();
        Ok((g.next().flatten(), g.next().flatten(), g.next().flatten()))
    }
}

/// `x · wᵀ` over the last dimension of `x` (`w`: `[out, in]`), in `x`'s dtype (or `out_dtype`: `w` is cast inside the
/// op, so a graph keeps no cast copy of `x`). The backward computes only the needed gradients: a frozen weight costs
/// no GEMM in backward.
pub fn matmul_t(x: &Tensor, w: &Tensor, out_dtype: DType) -> Result<Tensor> {
    let (xd, wd) = (x.detach().to_dtype(out_dtype)?, w.detach().to_dtype(out_dtype)?);
    let (o, i) = wd.dims2()?;
    let mut dims = x.dims().to_vec();
    if dims.last() != Some(&i) {
        anyhow::bail!("linear: input {:?} does not end in the weight's {i} input features", x.dims());
    }
    *dims.last_mut().expect("checked above") = o;
    // one GEMM over every row (a batch of GEMMs over a broadcast weight is slower on both devices)
    let y = xd.reshape(((), i))?.matmul(&wd.t()?)?.reshape(dims)?;
    attach("linear (+ adapters) backward", &[x, w], y, out_dtype, |inp, _, g, need| {
        let (x, w) = (&inp[0], &inp[1]);
        let (o, i) = w.dims2()?;
        let g2 = g.reshape(((), o))?;
        let gx = if need[0] {
            Some(g2.matmul(&w.to_dtype(g.dtype())?)?.reshape(x.dims())?.to_dtype(x.dtype())?)
        } else {
            None
        };
        let gw = if need[1] {
            let x2 = x.to_dtype(g.dtype())?.reshape(((), i))?;
            Some(g2.t()?.matmul(&x2)?.to_dtype(w.dtype())?)
        } else {
            None
        };
        Ok(vec![gx, gw])
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    #[test]
    fn matmul_t_matches_candle_and_skips_frozen_weights() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f64, 1., (2, 3, 5), &dev).unwrap()).unwrap();
        let w = Var::from_tensor(&Tensor::randn(0f64, 1., (4, 5), &dev).unwrap()).unwrap();
        let r = Tensor::randn(0f64, 1., (2, 3, 4), &dev).unwrap();
        let reference = x.as_tensor().broadcast_matmul(&w.as_tensor().t().unwrap()).unwrap();
        let ours = matmul_t(x.as_tensor(), w.as_tensor(), DType::F64).unwrap();
        assert!(max_diff(&reference, &ours) < 1e-12);
        let gr = (reference * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let go = (ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
        for v in [&x, &w] {
            assert!(max_diff(gr.get(v.as_tensor()).unwrap(), go.get(v.as_tensor()).unwrap()) < 1e-12);
        }
        // A frozen weight: the gradient store holds x's gradient only.
        let frozen = w.as_tensor().detach();
        let g = matmul_t(x.as_tensor(), &frozen, DType::F64).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(g.get(&frozen).is_none());
        assert!(g.get(x.as_tensor()).is_some());
        // Nothing trained: no graph at all.
        let y = matmul_t(&x.as_tensor().detach(), &frozen, DType::F32).unwrap();
        assert!(!tracked(&y));
        assert_eq!(y.dtype(), DType::F32);
        let e = matmul_t(&Tensor::zeros((2, 3), DType::F64, &dev).unwrap(), &frozen, DType::F64).unwrap_err();
        assert!(format!("{e:#}").contains("does not end in the weight's 5 input features"), "{e:#}");
    }
}
