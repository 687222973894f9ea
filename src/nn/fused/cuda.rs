//! Launching sdtune's kernels (`src/kernels/*.cu`, compiled to PTX by build.rs). The launchers are generic over
//! the element type `T`; callers pick it from the tensors' dtype with `by_dtype!`.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaView, DeviceRepr, LaunchArgs, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result, Storage, Tensor};

const OPTIM: &str = include_str!(concat!(env!("OUT_DIR"), "/optim.ptx"));
const CONV: &str = include_str!(concat!(env!("OUT_DIR"), "/conv.ptx"));
const NORM: &str = include_str!(concat!(env!("OUT_DIR"), "/norm.ptx"));
const ADAM8BIT: &str = include_str!(concat!(env!("OUT_DIR"), "/adam8bit.ptx"));
const RAND: &str = include_str!(concat!(env!("OUT_DIR"), "/rand.ptx"));
const BLOCK: u32 = 256;
/// Threads per row of the row-wise kernels (a multiple of 32, at most 1024).
const ROW_BLOCK: u32 = 512;

/// A scalar kernel parameter after the pointers and the element count.
pub enum Arg {
    F32(f32),
    I32(i32),
    Usize(usize),
}

fn push<'a>(args: &mut LaunchArgs<'a>, extra: &'a [Arg]) {
    for e in extra {
        match e {
            Arg::F32(x) => args.arg(x),
            Arg::I32(x) => args.arg(x),
            Arg::Usize(x) => args.arg(x),
        };
    }
}

/// `KERNEL_<dtype>` of a module (`optim`, `norm`): its name, its module's name and PTX (loaded once per device by
/// `get_or_load_custom_func`).
fn kernel_id(module: &str, kernel: &str, dtype: DType) -> Result<(String, String, &'static str)> {
    let suffix = match dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        d => candle_core::bail!("sdtune kernel {kernel}: {d:?} tensors are not supported"),
    };
    let ptx = match module {
        "optim" => OPTIM,
        "conv" => CONV,
        "norm" => NORM,
        "adam8bit" => ADAM8BIT,
        "rand" => RAND,
        m => candle_core::bail!("no sdtune kernel module {m:?}"),
    };
    Ok((format!("{kernel}_{suffix}"), format!("sdtune_{module}"), ptx))
}

fn range(l: &Layout) -> Result<(usize, usize)> {
    l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("sdtune kernel: a tensor is not contiguous".into()))
}

/// The contiguous elements of a `T` tensor.
fn view<'a, T: CudaDType>(s: &'a CudaStorage, l: &Layout) -> Result<CudaView<'a, T>> {
    let (a, b) = range(l)?;
    Ok(s.as_cuda_slice::<T>()?.slice(a..b))
}

fn elementwise(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(BLOCK as usize).clamp(1, 4096) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 }
}

/// `KERNEL_<dtype>(dst, srcs…, n, extra…)` in place over the elements of `dst` (every source of `dst`'s dtype and
/// size).
pub fn launch<T: CudaDType + DeviceRepr>(
    module: &str,
    kernel: &str,
    dst: &mut CudaStorage,
    dl: &Layout,
    srcs: &[(&CudaStorage, &Layout)],
    extra: &[Arg],
) -> Result<()> {
    let dev = dst.device.clone();
    let (name, m, ptx) = kernel_id(module, kernel, dst.dtype())?;
    let f = dev.get_or_load_custom_func(&name, &m, ptx)?;
    let (a, b) = range(dl)?;
    let n = b - a;
    let views = srcs.iter().map(|(s, l)| view::<T>(s, l)).collect::<Result<Vec<_>>>()?;
    if let Some(v) = views.iter().find(|v| v.len() != n) {
        candle_core::bail!("sdtune kernel {kernel}: tensors of {n} and {} elements", v.len());
    }
    if n == 0 {
        return Ok(());
    }
    let mut out = dst.as_cuda_slice_mut::<T>()?.slice_mut(a..b);
    let mut args = f.builder();
    args.arg(&mut out);
    for v in &views {
        args.arg(v);
    }
    args.arg(&n);
    push(&mut args, extra);
    // SAFETY: the kernel's parameters are (T* dst, const T* srcs…, size_t n, extra…) as pushed above, and
    // every pointer covers n elements.
    unsafe { args.launch(elementwise(n)) }.w()?;
    Ok(())
}

/// `sum_squares_<dtype>(acc, g, n)`: `acc` one f32, `g` of a float dtype.
pub fn sum_squares<T: CudaDType + DeviceRepr>(
    acc: &mut CudaStorage,
    al: &Layout,
    g: &CudaStorage,
    gl: &Layout,
) -> Result<()> {
    let dev = acc.device.clone();
    let (name, m, ptx) = kernel_id("optim", "sum_squares", g.dtype())?;
    let f = dev.get_or_load_custom_func(&name, &m, ptx)?;
    let (a, _) = range(al)?;
    let g = view::<T>(g, gl)?;
    let n = g.len();
    if n == 0 {
        return Ok(());
    }
    let mut acc = acc.as_cuda_slice_mut::<f32>()?.slice_mut(a..a + 1);
    let mut args = f.builder();
    args.arg(&mut acc).arg(&g).arg(&n);
    // SAFETY: sum_squares_<dtype>(float* acc, const T* g, size_t n) as pushed above; acc is one element.
    unsafe { args.launch(elementwise(n)) }.w()?;
    Ok(())
}

/// `KERNEL_<dtype>(inputs…, out, extra…)` with one block per row of a `rows`-row view: `inputs` are `(storage,
/// layout, f32?)` (an f32 input of any size, or one of the first input's dtype and size); `out` is new, of the
/// first input's dtype and size.
pub fn rows<T: CudaDType + DeviceRepr>(
    module: &str,
    kernel: &str,
    inputs: &[(&CudaStorage, &Layout, bool)],
    rows: usize,
    extra: &[Arg],
) -> Result<CudaStorage> {
    let dev = inputs[0].0.device.clone();
    let (name, m, ptx) = kernel_id(module, kernel, inputs[0].0.dtype())?;
    let f = dev.get_or_load_custom_func(&name, &m, ptx)?;
    let n = range(inputs[0].1).map(|(a, b)| b - a)?;
    enum V<'a, T> {
        Typed(CudaView<'a, T>),
        F32(CudaView<'a, f32>),
    }
    let views = inputs
        .iter()
        .map(|(s, l, is_f32)| {
            Ok(if *is_f32 {
                V::F32(view::<f32>(s, l)?)
            } else {
                let v = view::<T>(s, l)?;
                if v.len() != n {
                    candle_core::bail!("sdtune kernel {kernel}: inputs of {n} and {} elements", v.len());
                }
                V::Typed(v)
            })
        })
        .collect::<Result<Vec<_>>>()?;
    // SAFETY: every element is written by the kernel before the result is read.
    let mut out = unsafe { dev.alloc::<T>(n)? };
    if n > 0 && rows > 0 {
        let mut args = f.builder();
        for v in &views {
            match v {
                V::Typed(v) => args.arg(v),
                V::F32(v) => args.arg(v),
            };
        }
        args.arg(&mut out);
        push(&mut args, extra);
        let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (ROW_BLOCK, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: the kernel's parameters are (inputs…, T* out, extra…) as pushed above; out has n elements, one
        // block per row of n / rows.
        unsafe { args.launch(cfg) }.w()?;
    }
    Ok(T::wrap_cuda_slice(out, dev))
}

/// `adam8bit_weights_<dtype>(w, g, state, n, extra…)`: `w` updated in place, `state` the packed u8 state.
pub fn adam8bit_weights<T: CudaDType + DeviceRepr>(
    w: &mut CudaStorage,
    wl: &Layout,
    g: &CudaStorage,
    gl: &Layout,
    st: &CudaStorage,
    sl: &Layout,
    extra: &[Arg],
) -> Result<()> {
    let dev = w.device.clone();
    let (name, m, ptx) = kernel_id("adam8bit", "adam8bit_weights", w.dtype())?;
    let f = dev.get_or_load_custom_func(&name, &m, ptx)?;
    let (g, st) = (view::<T>(g, gl)?, view::<u8>(st, sl)?);
    let (a, b) = range(wl)?;
    let n = b - a;
    if g.len() != n {
        candle_core::bail!("sdtune kernel adam8bit_weights: {n} weights, {} gradients", g.len());
    }
    if n == 0 {
        return Ok(());
    }
    let mut out = w.as_cuda_slice_mut::<T>()?.slice_mut(a..b);
    let mut args = f.builder();
    args.arg(&mut out).arg(&g).arg(&st).arg(&n);
    push(&mut args, extra);
    // SAFETY: (T* w, const T* g, unsigned char* st, size_t n, extra…) as pushed above; the kernel only reads st,
    // whose size the caller checked against n.
    unsafe { args.launch(elementwise(n)) }.w()?;
    Ok(())
}

/// `adam8bit_state_<dtype>(state, g, n, extra…)`: the packed u8 `state` updated in place, one block per 256 values.
pub fn adam8bit_state<T: CudaDType + DeviceRepr>(
    st: &mut CudaStorage,
    sl: &Layout,
    g: &CudaStorage,
    gl: &Layout,
    extra: &[Arg],
) -> Result<()> {
    let dev = st.device.clone();
    let (name, m, ptx) = kernel_id("adam8bit", "adam8bit_state", g.dtype())?;
    let f = dev.get_or_load_custom_func(&name, &m, ptx)?;
    let g = view::<T>(g, gl)?;
    let n = g.len();
    let (a, b) = range(sl)?;
    if b - a != super::adam8bit::packed_len(n) {
        candle_core::bail!("sdtune kernel adam8bit_state: a packed state of {} bytes for {n} values", b - a);
    }
    if n == 0 {
        return Ok(());
    }
    let mut out = st.as_cuda_slice_mut::<u8>()?.slice_mut(a..b);
    let mut args = f.builder();
    args.arg(&mut out).arg(&g).arg(&n);
    push(&mut args, extra);
    let blocks = n.div_ceil(super::adam8bit::QBLOCK) as u32;
    let cfg = LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (super::adam8bit::QBLOCK as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: (unsigned char* st, const T* g, size_t n, extra…) as pushed above; st holds packed_len(n) bytes and
    // each block of QBLOCK threads covers one quantisation block.
    unsafe { args.launch(cfg) }.w()?;
    Ok(())
}

/// `keep_mask_<dtype>(out, n, state, p, keep)`: a new mask of `n` elements (kernel: rand.cu).
pub fn keep_mask<T: CudaDType + DeviceRepr + candle_core::WithDType>(
    dev: &CudaDevice,
    n: usize,
    state: u64,
    p: f64,
    keep: f32,
) -> Result<candle_core::cuda_backend::cudarc::driver::CudaSlice<T>> {
    // SAFETY: the kernel writes every element.
    let mut out = unsafe { dev.alloc::<T>(n)? };
    if n > 0 {
        let (name, m, ptx) = kernel_id("rand", "keep_mask", T::DTYPE)?;
        let f = dev.get_or_load_custom_func(&name, &m, ptx)?;
        let mut args = f.builder();
        args.arg(&mut out).arg(&n).arg(&state).arg(&p).arg(&keep);
        // SAFETY: keep_mask_<dtype>(T* out, size_t n, unsigned long long state, double p, float keep) as pushed;
        // out holds n elements.
        unsafe { args.launch(elementwise(n)) }.w()?;
    }
    Ok(out)
}

/// The CUDA storage behind a tensor's storage guard.
fn cuda_storage(s: &Storage) -> Result<&CudaStorage> {
    match s {
        Storage::Cuda(c) => Ok(c),
        _ => candle_core::bail!("sdtune kernel: a tensor is not on the GPU"),
    }
}

/// The device of a tensor's storage (for launches outside candle's ops).
pub fn device(s: &Storage) -> Result<CudaDevice> {
    Ok(cuda_storage(s)?.device().clone())
}

/// The contiguous elements of a tensor's storage, from its storage guard and layout.
pub fn tensor_view<'a, T: CudaDType>(s: &'a Storage, l: &Layout) -> Result<CudaView<'a, T>> {
    view::<T>(cuda_storage(s)?, l)
}

/// A new tensor (no gradient) over a kernel's output.
pub fn wrap<T: CudaDType>(
    s: candle_core::cuda_backend::cudarc::driver::CudaSlice<T>,
    dev: &CudaDevice,
    shape: impl Into<candle_core::Shape>,
) -> Tensor {
    Tensor::from_storage(Storage::Cuda(T::wrap_cuda_slice(s, dev.clone())), shape, BackpropOp::none(), false)
}

/// nn/conv.rs's wide columns `[B, C·kh·kw, ho·wq]` of a `[B, C, H, W]` tensor in one launch (kernel: conv.cu).
#[allow(clippy::too_many_arguments)]
pub fn im2col(
    x: &Tensor,
    (kh, kw): (usize, usize),
    (ph, pw): (usize, usize),
    s: usize,
    ho: usize,
    wq: usize,
) -> Result<Tensor> {
    let x = x.contiguous()?;
    by_dtype!(x.dtype(), "im2col", im2col_typed(&x, (kh, kw), (ph, pw), s, ho, wq))
}

fn im2col_typed<T: CudaDType + DeviceRepr>(
    x: &Tensor,
    (kh, kw): (usize, usize),
    (ph, pw): (usize, usize),
    s: usize,
    ho: usize,
    wq: usize,
) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let (st, l) = x.storage_and_layout();
    let dev = device(&st)?;
    let xv = tensor_view::<T>(&st, l)?;
    let n = b * c * kh * kw * ho * wq;
    // SAFETY: the kernel writes every element.
    let mut cols = unsafe { dev.alloc::<T>(n)? };
    if n > 0 {
        let (name, m, ptx) = kernel_id("conv", "im2col", x.dtype())?;
        let f = dev.get_or_load_custom_func(&name, &m, ptx)?;
        let i = |v: usize| v as i32;
        let ints = [i(b), i(c), i(h), i(w), i(kh), i(kw), i(ph), i(pw), i(s), i(ho), i(wq)];
        let mut args = f.builder();
        args.arg(&xv).arg(&mut cols);
        for v in &ints {
            args.arg(v);
        }
        // SAFETY: im2col_<dtype>(const T* x, T* cols, int B, C, H, W, kh, kw, ph, pw, s, ho, wq) as pushed; cols
        // holds B·C·kh·kw·ho·wq elements, x B·C·H·W.
        unsafe { args.launch(elementwise(n)) }.w()?;
    }
    Ok(wrap(cols, &dev, (b, c * kh * kw, ho * wq)))
}
