//! Fused attention on CUDA (kernels: `src/kernels/flash.cu`, FlashAttention's scheme on tensor cores): the forward
//! keeps no `[Sq, Sk]` scores, the backward recomputes them tile by tile. bf16/f16 inputs of head width ≤ 160; the
//! CPU and f32 keep `nn::attention`'s chunked path, which is this kernel's reference in the ops bench's `check`
//! (on the GPU); `tests/kernels/` runs the kernels under a CPU emulation of CUDA against float64 attention.

use super::cuda::{tensor_view as view, wrap};
use anyhow::{bail, Result};
use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute_enum;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{DType, Tensor};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/flash.ptx"));
const MODULE: &str = "sdtune_flash";
/// Kernels with more than 48 KiB of dynamic shared memory must say so before their launch.
const MAX_SMEM: CUfunction_attribute_enum = CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
const TILE: usize = 64;
const THREADS: u32 = 128;
/// The widest head the kernels take (their shared memory grows with it).
pub const MAX_HEAD: usize = 160;

/// Whether the fused attention takes these inputs (`d`: head width): fused kernels on, CUDA, one dtype, bf16 or
/// f16.
pub fn applies(qkv: &[&Tensor; 3], d: usize) -> Result<bool> {
    let q = qkv[0];
    Ok(super::enabled()?
        && q.device().is_cuda()
        && matches!(q.dtype(), DType::BF16 | DType::F16)
        && qkv.iter().all(|t| t.dtype() == q.dtype() && t.rank() == 3 && t.dim(1).is_ok_and(|s| s > 0))
        && d <= MAX_HEAD)
}

/// The problem's sizes.
#[derive(Clone, Copy, Debug)]
pub struct Flash {
    pub b: usize,
    pub heads: usize,
    pub sq: usize,
    pub sk: usize,
    pub d: usize,
    pub causal: bool,
}

impl Flash {
    fn c(&self) -> usize {
        self.heads * self.d
    }
    fn dp(&self) -> usize {
        self.d.div_ceil(16) * 16
    }
    fn scale(&self) -> f32 {
        1.0 / (self.d as f32).sqrt()
    }
    /// Dynamic shared memory (bytes) of the forward, the dK/dV and the dQ kernel (see flash.cu's layouts; the
    /// backward kernels share `BwdTiles`, with two f32 accumulators or one).
    fn smem(&self) -> [usize; 3] {
        let (t, dp) = (TILE, self.dp());
        let backward = |accs: usize| 4 * t * dp * 2 + 2 * t * t * 2 + accs * t * dp * 4 + 2 * t * t * 4 + 2 * t * 4;
        [3 * t * dp * 2 + t * t * 2 + t * t * 4 + t * dp * 4 + 2 * t * 4, backward(2), backward(1)]
    }

    fn check(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<()> {
        let (c, dt) = (self.c(), q.dtype());
        let ok = q.dims() == [self.b, self.sq, c]
            && k.dims() == [self.b, self.sk, c]
            && v.dims() == k.dims()
            && k.dtype() == dt
            && v.dtype() == dt
            && self.d <= MAX_HEAD
            && self.d > 0;
        if !ok {
            bail!("fused attention: inputs {:?}, {:?}, {:?} do not fit {self:?}", q.dims(), k.dims(), v.dims());
        }
        Ok(())
    }

    /// The attention's output (q's dtype, `[B, Sq, C]`) and each query row's log-sum-exp (f32 `[B·H, Sq]`).
    pub fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        self.check(q, k, v)?;
        let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
        match q.dtype() {
            DType::BF16 => self.forward_typed::<half::bf16>(&q, &k, &v),
            DType::F16 => self.forward_typed::<half::f16>(&q, &k, &v),
            d => bail!("fused attention: {d:?} inputs are not supported"),
        }
    }

    /// The gradients of q, k, v (q's dtype) for the output gradient `g`, given the forward's output `o` and
    /// log-sum-exp `lse`.
    pub fn backward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        lse: &Tensor,
        g: &Tensor,
    ) -> Result<[Tensor; 3]> {
        self.check(q, k, v)?;
        let dt = q.dtype();
        // Δ = Σ dO·O over each head's row, [B·H, Sq]
        let (b, sq, h, d) = (self.b, self.sq, self.heads, self.d);
        let delta = (g.to_dtype(DType::F32)? * o.to_dtype(DType::F32)?)?.reshape((b, sq, h, d))?.sum(3)?;
        let delta = delta.transpose(1, 2)?.contiguous()?;
        let (q, k, v, g) = (q.contiguous()?, k.contiguous()?, v.contiguous()?, g.to_dtype(dt)?.contiguous()?);
        match dt {
            DType::BF16 => self.backward_typed::<half::bf16>(&q, &k, &v, &g, &lse.contiguous()?, &delta),
            DType::F16 => self.backward_typed::<half::f16>(&q, &k, &v, &g, &lse.contiguous()?, &delta),
            d => bail!("fused attention: {d:?} inputs are not supported"),
        }
    }

    /// Scalar parameters after the pointers: H, Sq, Sk, C, d, dp, scale, causal.
    fn scalars(&self) -> ([i32; 6], f32, i32) {
        let i = |x: usize| x as i32;
        (
            [i(self.heads), i(self.sq), i(self.sk), i(self.c()), i(self.d), i(self.dp())],
            self.scale(),
            self.causal as i32,
        )
    }

    fn forward_typed<T: CudaDType + DeviceRepr>(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (qs, ql) = q.storage_and_layout();
        let (ks, kl) = k.storage_and_layout();
        let (vs, vl) = v.storage_and_layout();
        let dev = super::cuda::device(&qs)?;
        let (qv, kv, vv) = (view::<T>(&qs, ql)?, view::<T>(&ks, kl)?, view::<T>(&vs, vl)?);
        let bh = self.b * self.heads;
        // SAFETY: the kernel writes every element of o and lse for the rows that exist.
        let mut o = unsafe { dev.alloc::<T>(q.elem_count())? };
        let mut lse = unsafe { dev.alloc::<f32>(bh * self.sq)? };
        if q.elem_count() > 0 && self.sk > 0 {
            let f = dev.get_or_load_custom_func(&name("flash_fwd", q.dtype()), MODULE, PTX)?;
            f.set_attribute(MAX_SMEM, self.smem()[0] as i32).w()?;
            let (ints, scale, causal) = self.scalars();
            let mut args = f.builder();
            args.arg(&qv).arg(&kv).arg(&vv).arg(&mut o).arg(&mut lse);
            for x in &ints {
                args.arg(x);
            }
            args.arg(&scale).arg(&causal);
            // SAFETY: flash_fwd_<dtype>(q, k, v, o, lse, H, Sq, Sk, C, d, dp, scale, causal) as pushed; the buffers
            // hold B·Sq·C, B·Sk·C and B·H·Sq elements.
            unsafe { args.launch(config(self.sq, bh, self.smem()[0])) }.w()?;
        }
        Ok((wrap(o, &dev, (self.b, self.sq, self.c())), wrap(lse, &dev, (bh, self.sq))))
    }

    #[allow(clippy::too_many_arguments)]
    fn backward_typed<T: CudaDType + DeviceRepr>(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        g: &Tensor,
        lse: &Tensor,
        delta: &Tensor,
    ) -> Result<[Tensor; 3]> {
        let (qs, ql) = q.storage_and_layout();
        let (ks, kl) = k.storage_and_layout();
        let (vs, vl) = v.storage_and_layout();
        let (gs, gl) = g.storage_and_layout();
        let (ls, ll) = lse.storage_and_layout();
        let (ds, dl) = delta.storage_and_layout();
        let dev = super::cuda::device(&qs)?;
        let (qv, kv, vv, gv) = (view::<T>(&qs, ql)?, view::<T>(&ks, kl)?, view::<T>(&vs, vl)?, view::<T>(&gs, gl)?);
        let (lv, dv_) = (view::<f32>(&ls, ll)?, view::<f32>(&ds, dl)?);
        let bh = self.b * self.heads;
        let (nq, nk) = (q.elem_count(), k.elem_count());
        // SAFETY: the kernels write every element (every row of q, k and v, every column of each head)
        let alloc = |n: usize| -> Result<CudaSlice<T>> { Ok(unsafe { dev.alloc::<T>(n)? }) };
        let (mut dq, mut dk, mut dv) = (alloc(nq)?, alloc(nk)?, alloc(nk)?);
        let (ints, scale, causal) = self.scalars();
        if nq > 0 && nk > 0 {
            let [_, smem_kv, smem_q] = self.smem();
            let f = dev.get_or_load_custom_func(&name("flash_bwd_kv", q.dtype()), MODULE, PTX)?;
            f.set_attribute(MAX_SMEM, smem_kv as i32).w()?;
            let mut args = f.builder();
            args.arg(&qv).arg(&kv).arg(&vv).arg(&gv).arg(&lv).arg(&dv_).arg(&mut dk).arg(&mut dv);
            for x in &ints {
                args.arg(x);
            }
            args.arg(&scale).arg(&causal);
            // SAFETY: flash_bwd_kv_<dtype>(q, k, v, dO, lse, delta, dk, dv, H, Sq, Sk, C, d, dp, scale, causal) as
            // pushed; sizes as in the forward.
            unsafe { args.launch(config(self.sk, bh, smem_kv)) }.w()?;
            let f = dev.get_or_load_custom_func(&name("flash_bwd_q", q.dtype()), MODULE, PTX)?;
            f.set_attribute(MAX_SMEM, smem_q as i32).w()?;
            let mut args = f.builder();
            args.arg(&qv).arg(&kv).arg(&vv).arg(&gv).arg(&lv).arg(&dv_).arg(&mut dq);
            for x in &ints {
                args.arg(x);
            }
            args.arg(&scale).arg(&causal);
            // SAFETY: flash_bwd_q_<dtype>(q, k, v, dO, lse, delta, dq, H, Sq, Sk, C, d, dp, scale, causal) as pushed.
            unsafe { args.launch(config(self.sq, bh, smem_q)) }.w()?;
        }
        let (c, b) = (self.c(), self.b);
        Ok([wrap(dq, &dev, (b, self.sq, c)), wrap(dk, &dev, (b, self.sk, c)), wrap(dv, &dev, (b, self.sk, c))])
    }
}

/// A kernel's name for inputs of `dtype`.
fn name(kernel: &str, dtype: DType) -> String {
    format!("{kernel}_{}", if dtype == DType::BF16 { "bf16" } else { "f16" })
}

fn config(rows: usize, bh: usize, smem: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows.div_ceil(TILE) as u32, bh as u32, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: smem as u32,
    }
}
