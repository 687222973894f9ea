//! Multi-head scaled dot-product attention, computed in query chunks (at most `CHUNK_BYTES` of f32 scores at a
//! time, `CPU_CHUNK_BYTES` on the CPU) with candle's fused softmax, and a backward that recomputes each chunk's probabilities (FlashAttention's
//! scheme, written with GEMMs): the graph keeps only q, k, v and the output, never the `[B, H, Sq, Sk]` scores.
//! Scores and softmax are f32; on CUDA with half-precision inputs the f32 GEMMs run as TF32 (`Tf32`). On CUDA,
//! bf16/f16 inputs go through the fused kernel of `nn::fused::flash` instead (unless `SDTUNE_FUSED=off`).

use super::grad;
use super::norm::stat_dtype;
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, D};

/// The most f32 attention scores held at once (bytes).
const CHUNK_BYTES: usize = 256 << 20;

/// The same on the CPU: chunks whose scores stay in cache through the passes over them (GEMM, softmax, GEMM; and
/// again in the backward). 1–2 MiB measured best: the tiny model's step at 256² took 2.0 s against 3.2 s with
/// 256 MiB, 2.4 s with 512 KiB (BENCHMARKS.md).
const CPU_CHUNK_BYTES: usize = 2 << 20;

/// Attention over `[B, S, C]` inputs with `heads` heads, softmax in f32 (f64 for f64 inputs); `causal` masks
/// future positions (CLIP).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, causal: bool) -> Result<Tensor> {
    super::profile::time("attention (scores, softmax, values)", q.device(), || {
        let (b, sq, _) = q.dims3()?;
        let budget = if q.device().is_cpu() { CPU_CHUNK_BYTES } else { CHUNK_BYTES };
        let rows = chunk_rows(budget, b * heads, k.dim(1)?);
        attention_chunked(q, k, v, heads, causal, rows.min(sq.max(1)))
    })
}

/// Query rows per chunk of at most `bytes` of f32 scores, for `bh` batch·heads and `sk` keys.
fn chunk_rows(bytes: usize, bh: usize, sk: usize) -> usize {
    (bytes / (4 * bh * sk).max(1)).max(1)
}

fn attention_chunked(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, causal: bool, rows: usize) -> Result<Tensor> {
    let (b, sq, c) = q.dims3()?;
    let (kb, sk, kc) = k.dims3()?;
    if heads == 0 || c % heads != 0 {
        bail!("attention: width {c} is not divisible by {heads} heads");
    }
    if kb != b || kc != c || v.dims() != k.dims() {
        bail!("attention: queries {:?}, keys {:?} and values {:?} do not fit together", q.dims(), k.dims(), v.dims());
    }
    let dtype = q.dtype();
    if let Some(y) = fused_attention(q, k, v, heads, causal)? {
        return Ok(y);
    }
    let shape = Shape { b, sq, sk, heads, d: c / heads, causal, rows };
    let y = shape.forward(&q.detach(), &k.detach(), &v.detach())?;
    grad::attach("attention backward", &[q, k, v], y, dtype, move |inp, out, g, need| {
        let (gq, gk, gv) = shape.backward(&inp[0], &inp[1], &inp[2], out, g)?;
        Ok(vec![need[0].then_some(gq), need[1].then_some(gk), need[2].then_some(gv)])
    })
}

/// The attention through the fused kernels (`nn::fused::flash`: CUDA, bf16/f16), or None where they do not apply.
#[cfg(feature = "cuda")]
fn fused_attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, causal: bool) -> Result<Option<Tensor>> {
    use super::fused::flash;
    let ((b, sq, c), sk) = (q.dims3()?, k.dim(1)?);
    if !flash::applies(&[q, k, v], c / heads)? {
        return Ok(None);
    }
    let f = flash::Flash { b, heads, sq, sk, d: c / heads, causal };
    let (y, lse) = f.forward(&q.detach(), &k.detach(), &v.detach())?;
    let y = grad::attach("attention backward", &[q, k, v], y, q.dtype(), move |inp, out, g, need| {
        let [gq, gk, gv] = f.backward(&inp[0], &inp[1], &inp[2], out, &lse, g)?;
        Ok(vec![need[0].then_some(gq), need[1].then_some(gk), need[2].then_some(gv)])
    })?;
    Ok(Some(y))
}

#[cfg(not(feature = "cuda"))]
fn fused_attention(_: &Tensor, _: &Tensor, _: &Tensor, _: usize, _: bool) -> Result<Option<Tensor>> {
    Ok(None)
}

#[derive(Clone, Copy)]
struct Shape {
    b: usize,
    sq: usize,
    sk: usize,
    heads: usize,
    d: usize,
    causal: bool,
    rows: usize,
}

impl Shape {
    /// `[B, S, C]` → `[B, H, S, D]`.
    fn split(&self, t: &Tensor) -> Result<Tensor> {
        let s = t.dim(1)?;
        Ok(t.reshape((self.b, s, self.heads, self.d))?.transpose(1, 2)?.contiguous()?)
    }

    /// `[B, H, S, D]` → `[B, S, C]`.
    fn merge(&self, t: &Tensor) -> Result<Tensor> {
        let s = t.dim(2)?;
        Ok(t.transpose(1, 2)?.reshape((self.b, s, self.heads * self.d))?)
    }

    fn scale(&self) -> f64 {
        1.0 / (self.d as f64).sqrt()
    }

    /// Softmax probabilities of query rows `r0..r0+n` (`qc`: those rows, already scaled by `1/√d`, in the
    /// statistics dtype).
    fn probs(&self, qc: &Tensor, k: &Tensor, r0: usize) -> Result<Tensor> {
        let n = qc.dim(2)?;
        let mut scores = qc.matmul(&k.t()?)?;
        if self.causal {
            scores = scores.broadcast_add(&causal_mask(r0, n, self.sk, scores.dtype(), qc.device())?)?;
        }
        Ok(candle_nn::ops::softmax_last_dim(&scores)?)
    }

    fn chunks(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        (0..self.sq).step_by(self.rows).map(|r0| (r0, self.rows.min(self.sq - r0)))
    }

    /// The output in the statistics dtype. The scale is applied to q (not to the scores), and the probabilities
    /// multiply V in the statistics dtype: each pass over the `[rows, Sk]` scores is a GEMM or the softmax.
    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let _tf32 = Tf32::for_inputs(q);
        let sd = stat_dtype(q.dtype());
        let f = |t: &Tensor| -> Result<Tensor> { self.split(&t.to_dtype(sd)?) };
        let (q, k, v) = ((f(q)? * self.scale())?, f(k)?, f(v)?);
        let mut outs = Vec::new();
        for (r0, n) in self.chunks() {
            outs.push(self.probs(&q.narrow(2, r0, n)?, &k, r0)?.matmul(&v)?);
        }
        self.merge(&Tensor::cat(&outs, 2)?)
    }

    /// Gradients of q, k and v for the output gradient `g`, given the forward's output `out`.
    fn backward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        g: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let _tf32 = Tf32::for_inputs(q);
        let sd = stat_dtype(q.dtype());
        let f = |t: &Tensor| -> Result<Tensor> { self.split(&t.to_dtype(sd)?) };
        let (q, k, v, out, g) = ((f(q)? * self.scale())?, f(k)?, f(v)?, f(out)?, f(g)?);
        let (mut gq, mut gk, mut gv) = (Vec::new(), None::<Tensor>, None::<Tensor>);
        let add = |acc: Option<Tensor>, t: Tensor| -> Result<Option<Tensor>> {
            Ok(Some(match acc {
                Some(a) => (a + t)?,
                None => t,
            }))
        };
        for (r0, n) in self.chunks() {
            let (qc, gc) = (q.narrow(2, r0, n)?, g.narrow(2, r0, n)?);
            let p = self.probs(&qc, &k, r0)?;
            gv = add(gv, p.t()?.matmul(&gc)?)?;
            // dS = P ⊙ (dP − rowsum(dO ⊙ O)), with dP = dO·Vᵀ; S = (q/√d)·Kᵀ, so dq = dS·K/√d, dK = dSᵀ·(q/√d)
            let delta = (&gc * out.narrow(2, r0, n)?)?.sum_keepdim(D::Minus1)?;
            let ds = (p * gc.matmul(&v.t()?)?.broadcast_sub(&delta)?)?;
            gq.push((ds.matmul(&k)? * self.scale())?);
            gk = add(gk, ds.t()?.matmul(&qc)?)?;
        }
        let zero = || Tensor::zeros((self.b, self.heads, self.sk, self.d), sd, q.device());
        Ok((
            self.merge(&Tensor::cat(&gq, 2)?)?,
            self.merge(&gk.map_or_else(zero, Ok)?)?,
            self.merge(&gv.map_or_else(zero, Ok)?)?,
        ))
    }
}

/// While alive, lets CUDA's f32 GEMMs use TF32 when the attention's inputs are f16/bf16: K, V and dO are exact in
/// TF32's 10-bit mantissa; q/√d (exact when √d is a power of two, as for 64-wide heads), the probabilities and the
/// score gradients are rounded to 10 bits, 8× finer than bf16's rounding of the inputs themselves. f32 inputs
/// keep full f32 GEMMs; the CPU never reads the switch. Restores the previous setting on drop.
struct Tf32(Option<bool>);

impl Tf32 {
    fn for_inputs(t: &Tensor) -> Self {
        if !t.device().is_cuda() || !matches!(t.dtype(), DType::BF16 | DType::F16) {
            return Self(None);
        }
        let before = candle_core::cuda::gemm_reduced_precision_f32();
        candle_core::cuda::set_gemm_reduced_precision_f32(true);
        Self(Some(before))
    }
}

impl Drop for Tf32 {
    fn drop(&mut self) {
        if let Some(before) = self.0 {
            candle_core::cuda::set_gemm_reduced_precision_f32(before);
        }
    }
}

/// `-inf` where key `j` follows query `r0 + i`, as `[1, 1, n, sk]`.
fn causal_mask(r0: usize, n: usize, sk: usize, dtype: DType, dev: &Device) -> Result<Tensor> {
    let m: Vec<f32> =
        (r0..r0 + n).flat_map(|i| (0..sk).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 })).collect();
    Ok(Tensor::from_vec(m, (1, 1, n, sk), dev)?.to_dtype(dtype)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    /// The attention as composed, differentiable candle ops (what the models ran before).
    fn composed(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, causal: bool) -> Tensor {
        let (b, sq, c) = q.dims3().unwrap();
        let sk = k.dim(1).unwrap();
        let d = c / heads;
        let split = |t: &Tensor, s| t.reshape((b, s, heads, d)).unwrap().transpose(1, 2).unwrap().contiguous().unwrap();
        let (qh, kh, vh) = (split(q, sq), split(k, sk), split(v, sk));
        let mut s = (qh.matmul(&kh.t().unwrap()).unwrap() * (1.0 / (d as f64).sqrt())).unwrap();
        if causal {
            s = s.broadcast_add(&causal_mask(0, sq, sk, s.dtype(), q.device()).unwrap()).unwrap();
        }
        let p = candle_nn::ops::softmax(&s, D::Minus1).unwrap();
        p.matmul(&vh).unwrap().transpose(1, 2).unwrap().reshape((b, sq, c)).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap()
    }

    fn check(sq: usize, sk: usize, heads: usize, causal: bool, rows: usize) {
        let dev = Device::Cpu;
        let var = |s: usize| Var::from_tensor(&Tensor::randn(0f64, 1., (2, s, 8), &dev).unwrap()).unwrap();
        let (q, k, v) = (var(sq), var(sk), var(sk));
        let ours = attention_chunked(q.as_tensor(), k.as_tensor(), v.as_tensor(), heads, causal, rows).unwrap();
        let reference = composed(q.as_tensor(), k.as_tensor(), v.as_tensor(), heads, causal);
        assert!(max_diff(&ours, &reference) < 1e-12, "forward sq{sq} sk{sk} rows{rows}");
        let r = Tensor::randn(0f64, 1., ours.dims(), &dev).unwrap();
        let go = (ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let gr = (reference * &r).unwrap().sum_all().unwrap().backward().unwrap();
        for (t, what) in [(&q, "q"), (&k, "k"), (&v, "v")] {
            let d = max_diff(go.get(t.as_tensor()).unwrap(), gr.get(t.as_tensor()).unwrap());
            assert!(d < 1e-12, "grad {what} sq{sq} sk{sk} rows{rows} causal {causal}: {d}");
        }
    }

    #[test]
    fn matches_the_composed_attention_and_its_gradients() {
        check(7, 7, 2, false, 7); // one chunk
        check(7, 7, 2, false, 2); // 2-row chunks, a short last one
        check(9, 9, 4, false, 3); // 3-row chunks
        check(5, 3, 1, false, 2); // cross-attention
        check(6, 6, 2, true, 4); // causal, chunked
    }

    #[test]
    fn no_graph_without_training_and_f32_kept() {
        let dev = Device::Cpu;
        let t = Tensor::randn(0f32, 1., (1, 4, 8), &dev).unwrap();
        let y = attention(&t, &t, &t, 2, false).unwrap();
        assert!(!y.track_op());
        assert_eq!(y.dtype(), DType::F32);
        assert!(attention(&t, &t, &t, 3, false).is_err());
    }
}
