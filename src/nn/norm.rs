//! GroupNorm and LayerNorm, statistics in f32 (f64 for f64 inputs). While their affine parameters are frozen
//! (every LoRA training), each is one op with its own backward — GroupNorm optionally fused with the SiLU that
//! follows it in every resnet half — so the graph keeps only the input; trained affine parameters (full
//! fine-tuning) take the composed, differentiable path of the same maths.

use super::{fused, grad, Weights};
use anyhow::{bail, Result};
use candle_core::{DType, Tensor, D};

/// The longest row the fused norm kernel takes (one block of threads per row).
const FUSED_ROW_MAX: usize = 1 << 17;

/// The dtype statistics (norms, softmax) are computed in: f32, or f64 for f64 inputs.
pub(crate) fn stat_dtype(d: DType) -> DType {
    if d == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// Group normalisation over `[B, C, ...]`.
#[derive(Clone)]
pub struct GroupNorm {
    pub groups: usize,
    pub eps: f64,
    pub weight: Tensor,
    pub bias: Tensor,
}

impl GroupNorm {
    pub fn new(w: &Weights, groups: usize, eps: f64) -> Result<Self> {
        let weight = w.get("weight")?;
        let c = weight.dims1()?;
        if groups == 0 || c % groups != 0 {
            bail!("`{}`: {c} channels cannot be split into {groups} groups", w.key("weight"));
        }
        Ok(Self { groups, eps, weight, bias: w.get("bias")? })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        super::profile::time("group_norm", x.device(), || self.norm(x, false))
    }

    /// `silu(group_norm(x))`.
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        super::profile::time("group_norm", x.device(), || self.norm(x, true))
    }

    fn norm(&self, x: &Tensor, silu: bool) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let mut affine = vec![1usize; dims.len()];
        affine[1] = dims[1];
        let groups = (dims[0] * self.groups, x.elem_count() / (dims[0] * self.groups));
        let hw = x.elem_count() / (dims[0] * dims[1]);
        let op = NormOp { kind: "group_norm backward", eps: self.eps, silu, groups: self.groups, hw };
        norm_affine(x, groups, &self.weight, &self.bias, &affine, op)
    }
}

/// Layer normalisation over the last dimension.
#[derive(Clone)]
pub struct LayerNorm {
    pub eps: f64,
    pub weight: Tensor,
    pub bias: Tensor,
}

impl LayerNorm {
    pub fn new(w: &Weights, eps: f64) -> Result<Self> {
        Ok(Self { eps, weight: w.get("weight")?, bias: w.get("bias")? })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        super::profile::time("layer_norm", x.device(), || {
            let c = x.dim(D::Minus1)?;
            let op = NormOp { kind: "layer_norm backward", eps: self.eps, silu: false, groups: 1, hw: 1 };
            norm_affine(x, (x.elem_count() / c, c), &self.weight, &self.bias, &[c], op)
        })
    }
}

/// What follows the normalisation, the profile kind of its backward, and how rows map to affine channels (see
/// `fused::NormRows`).
#[derive(Clone, Copy)]
struct NormOp {
    kind: &'static str,
    eps: f64,
    silu: bool,
    groups: usize,
    hw: usize,
}

/// `x` normalised over the rows of its `(rows, len)` view, times `weight` plus `bias` (both reshaped to `affine`),
/// then SiLU if `silu`; in `x`'s dtype. Frozen parameters → one attached op; trained ones → composed ops.
fn norm_affine(
    x: &Tensor,
    rows: (usize, usize),
    weight: &Tensor,
    bias: &Tensor,
    affine: &[usize],
    op: NormOp,
) -> Result<Tensor> {
    let NormOp { kind, eps, silu, .. } = op;
    let sd = stat_dtype(x.dtype());
    if grad::tracked(weight) || grad::tracked(bias) {
        let y = composed_norm(x, rows, &weight.reshape(affine)?, &bias.reshape(affine)?, eps)?;
        return Ok(if silu { y.silu()? } else { y });
    }
    // on a GPU one kernel each way, one block per row: rows longer than FUSED_ROW_MAX (the VAE's at 256² and above,
    // 32 rows of ≥ 262144 values) would leave most of the GPU idle, and take candle's ops; so does the CPU, where
    // candle's vectorised ops are faster (BENCHMARKS.md)
    if fused::takes(x.dtype())? && !x.device().is_cpu() && rows.1 <= FUSED_ROW_MAX {
        return fused_norm(x, rows, weight, bias, op);
    }
    let (w, b) = (weight.detach().to_dtype(sd)?.reshape(affine)?, bias.detach().to_dtype(sd)?.reshape(affine)?);
    let scale_shift = {
        let (w, b) = (w.clone(), b);
        move |xhat: &Tensor| -> Result<Tensor> { Ok(xhat.broadcast_mul(&w)?.broadcast_add(&b)?) }
    };
    let y = scale_shift(&normalize(&x.detach().to_dtype(sd)?, rows, eps)?.0)?;
    let y = if silu { y.silu()? } else { y };
    grad::attach(kind, &[x], y, x.dtype(), move |inp, _, g, _| {
        let x = inp[0].to_dtype(sd)?;
        let (xhat, rstd) = normalize(&x, rows, eps)?;
        let mut gy = g.to_dtype(sd)?;
        if silu {
            // silu'(y) = σ(y)·(1 + y·(1 − σ(y)))
            let y = scale_shift(&xhat)?;
            let s = candle_nn::ops::sigmoid(&y)?;
            gy = (gy * (&s * ((y * (1.0 - &s)?)? + 1.0)?)?)?;
        }
        let gxhat = gy.broadcast_mul(&w)?.reshape(rows)?;
        let xhat = xhat.reshape(rows)?;
        let m1 = gxhat.mean_keepdim(1)?;
        let m2 = (&gxhat * &xhat)?.mean_keepdim(1)?;
        let gx = gxhat.broadcast_sub(&m1)?.sub(&xhat.broadcast_mul(&m2)?)?.broadcast_mul(&rstd)?;
        Ok(vec![Some(gx.reshape(x.dims())?)])
    })
}

/// `norm_affine` for frozen parameters as one fused op each way (`nn::fused`).
fn fused_norm(x: &Tensor, rows: (usize, usize), weight: &Tensor, bias: &Tensor, op: NormOp) -> Result<Tensor> {
    let NormOp { kind, eps, silu, groups, hw } = op;
    let f32 = |t: &Tensor| -> Result<Tensor> { Ok(t.detach().to_dtype(DType::F32)?.flatten_all()?) };
    let wb = Tensor::stack(&[f32(weight)?, f32(bias)?], 0)?;
    let p = fused::NormRows { rows: rows.0, hw, groups, eps, silu };
    let y = fused::norm_forward(&x.detach().contiguous()?, &wb, p)?;
    grad::attach(kind, &[x], y, x.dtype(), move |inp, _, g, _| {
        let x = inp[0].contiguous()?;
        Ok(vec![Some(fused::norm_backward(&x, &wb, &g.to_dtype(x.dtype())?.contiguous()?, p)?)])
    })
}

/// `(x − mean) / √(var + eps)` over the rows of `x`'s `(rows, len)` view (in `x`'s shape), and `1/√(var + eps)`.
fn normalize(x: &Tensor, rows: (usize, usize), eps: f64) -> Result<(Tensor, Tensor)> {
    let xr = x.reshape(rows)?;
    let mean = xr.mean_keepdim(1)?;
    let xc = xr.broadcast_sub(&mean)?;
    let rstd = (xc.sqr()?.mean_keepdim(1)? + eps)?.sqrt()?.recip()?;
    Ok((xc.broadcast_mul(&rstd)?.reshape(x.dims())?, rstd))
}

/// The same normalisation through candle's differentiable ops (statistics in f32, affine in `x`'s dtype).
fn composed_norm(x: &Tensor, rows: (usize, usize), w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let xn = normalize(&x.to_dtype(stat_dtype(dtype))?, rows, eps)?.0.to_dtype(dtype)?;
    Ok(xn.broadcast_mul(&w.to_dtype(dtype)?)?.broadcast_add(&b.to_dtype(dtype)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap()
    }

    /// The attached op in `dtype` (`fused`: the fused kernel's CPU code, else the composed maths) and its gradient
    /// against the composed ops (candle's differentiable ops) in f64 on the same (`dtype`-rounded) inputs, drawn
    /// from `seed`: max differences of output and gradient, each relative to the reference's largest magnitude.
    #[allow(clippy::too_many_arguments)]
    fn check(
        dims: &[usize],
        rows: (usize, usize),
        affine: &[usize],
        (groups, hw): (usize, usize),
        silu: bool,
        dtype: DType,
        fused: bool,
        seed: u64,
    ) -> (f64, f64) {
        let dev = Device::Cpu;
        let mut rng = crate::rng::Rng::new(seed);
        // inputs as `dtype` holds them, so that the f64 reference sees the same numbers
        let mut draw = |shape: &[usize], shift: f64| -> Tensor {
            let t = (rng.randn(shape, &dev).unwrap().to_dtype(DType::F64).unwrap() + shift).unwrap();
            t.to_dtype(dtype).unwrap().to_dtype(DType::F64).unwrap()
        };
        let x64 = draw(dims, 0.0);
        let n: usize = affine.iter().product();
        let (w, b) = (draw(&[n], 1.0), draw(&[n], 0.0));
        let r = draw(dims, 0.0);
        let x = Var::from_tensor(&x64.to_dtype(dtype).unwrap()).unwrap();
        let x64 = Var::from_tensor(&x64).unwrap();
        let op = NormOp { kind: "test", eps: 1e-5, silu, groups, hw };
        let (wd, bd) = (w.to_dtype(dtype).unwrap(), b.to_dtype(dtype).unwrap());
        let ours = if fused {
            fused_norm(x.as_tensor(), rows, &wd, &bd, op).unwrap()
        } else {
            norm_affine(x.as_tensor(), rows, &wd, &bd, affine, op).unwrap()
        };
        assert_eq!(ours.dtype(), dtype);
        let ours = ours.to_dtype(DType::F64).unwrap();
        let reference =
            composed_norm(x64.as_tensor(), rows, &w.reshape(affine).unwrap(), &b.reshape(affine).unwrap(), 1e-5)
                .unwrap();
        let reference = if silu { reference.silu().unwrap() } else { reference };
        let go = (&ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let gr = (&reference * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let gx = go.get(x.as_tensor()).unwrap().to_dtype(DType::F64).unwrap();
        assert!(go.get(&wd).is_none());
        let grx = gr.get(x64.as_tensor()).unwrap();
        let scale = |t: &Tensor| t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap();
        (max_diff(&ours, &reference) / scale(&reference), max_diff(&gx, grx) / scale(grx))
    }

    /// dims, (rows, row length), affine shape, (groups, hw), silu
    type Case = (&'static [usize], (usize, usize), &'static [usize], (usize, usize), bool);
    const CASES: [Case; 3] = [
        (&[2, 6, 3, 4], (2 * 3, 2 * 12), &[1, 6, 1, 1], (3, 12), false), // GroupNorm, 3 groups
        (&[2, 6, 3, 4], (2 * 3, 2 * 12), &[1, 6, 1, 1], (3, 12), true),  // GroupNorm + SiLU
        (&[2, 5, 8], (10, 8), &[8], (1, 1), false),                      // LayerNorm
    ];

    #[test]
    fn group_norm_silu_and_layer_norm_match_the_composed_ops() {
        for seed in 0..8 {
            for (dims, rows, affine, layout, silu) in CASES {
                let (y, g) = check(dims, rows, affine, layout, silu, DType::F64, false, seed);
                assert!(y < 1e-12 && g < 1e-10, "{dims:?} silu {silu} seed {seed}: {y} {g}");
            }
        }
    }

    #[test]
    fn the_fused_kernels_cpu_code_matches_the_composed_ops() {
        // relative to the largest magnitude: f32 rounding only; bf16 outputs and gradients rounded to 8 bits
        // (2^-8 ≈ 0.004 relative), statistics in f32
        for seed in 0..8 {
            for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 1e-2)] {
                for (dims, rows, affine, layout, silu) in CASES {
                    let (y, g) = check(dims, rows, affine, layout, silu, dtype, true, seed);
                    assert!(y < tol && g < tol, "{dtype:?} {dims:?} silu {silu} seed {seed}: output {y}, gradient {g}");
                }
            }
        }
    }

    #[test]
    fn trained_affine_parameters_still_get_gradients() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (1, 4, 2, 2), &dev).unwrap();
        let w = Var::from_tensor(&Tensor::ones(4, DType::F32, &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::zeros(4, DType::F32, &dev).unwrap()).unwrap();
        let gn = GroupNorm { groups: 2, eps: 1e-5, weight: w.as_tensor().clone(), bias: b.as_tensor().clone() };
        let g = gn.forward_silu(&x).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(g.get(w.as_tensor()).is_some() && g.get(b.as_tensor()).is_some());
    }
}
