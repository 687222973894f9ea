//! AdamW8bit's step over a packed 8-bit state (kernels: `src/kernels/adam8bit.cu`): `Adam8bit::weights_`
//! updates the weights from the old state and the gradient, then `Adam8bit::state_` moves the state to the new
//! moments (the same arithmetic) and codes them again. The packed state of an `n`-element tensor is one u8 tensor:
//! the signed and unsigned code maps (f32 × 256 each), m's and v's block maxima (f32 × blocks each), m's and v's
//! codes (u8 × n each), blocks of `QBLOCK` values.

use super::{elems, elems_mut, same_len, Elem};
use anyhow::{bail, Result};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, InplaceOp2, InplaceOp3, Layout, Tensor};

/// Values per quantisation block.
pub const QBLOCK: usize = 256;
const MAPS: usize = 2 * 256 * 4;

/// Bytes of the packed state of an `n`-element tensor.
pub fn packed_len(n: usize) -> usize {
    MAPS + 8 * n.div_ceil(QBLOCK) + 2 * n
}

/// The numbers of one step.
#[derive(Clone, Copy, Debug)]
pub struct Adam8bit {
    pub betas: (f32, f32),
    /// `1 − β1`, `1 − β2` (rounded from f64)
    pub one_minus: (f32, f32),
    /// `√(1 − β2^t)`
    pub sqrt_bc2: f32,
    pub eps: f32,
    /// `1 − lr·weight_decay`, applied when weight decay is on
    pub decay: Option<f32>,
    /// `−lr / (1 − β1^t)`
    pub step_size: f32,
}

impl Adam8bit {
    /// Updates `w` in place from the gradient `g` and the (old) packed state.
    pub fn weights_(&self, w: &Tensor, g: &Tensor, state: &Tensor) -> Result<()> {
        Ok(w.inplace_op3(g, state, &Weights(*self))?)
    }

    /// Moves the packed state to the moments after gradient `g`, coded again; after `weights_`.
    pub fn state_(&self, state: &Tensor, g: &Tensor) -> Result<()> {
        if state.elem_count() != packed_len(g.elem_count()) {
            bail!("AdamW8bit: a packed state of {} bytes for {} values", state.elem_count(), g.elem_count());
        }
        Ok(state.inplace_op2(g, &State(*self))?)
    }
}

struct Weights(Adam8bit);
struct State(Adam8bit);

/// A read view of a packed state's parts.
struct Packed<'a> {
    smap: Vec<f32>,
    umap: Vec<f32>,
    mmax: Vec<f32>,
    vmax: Vec<f32>,
    mc: &'a [u8],
    vc: &'a [u8],
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

fn read(st: &[u8], n: usize) -> candle_core::Result<Packed<'_>> {
    let blocks = n.div_ceil(QBLOCK);
    if st.len() != packed_len(n) {
        candle_core::bail!("AdamW8bit: a packed state of {} bytes for {n} values", st.len());
    }
    let (maps, rest) = st.split_at(MAPS);
    let (maxes, codes) = rest.split_at(8 * blocks);
    Ok(Packed {
        smap: f32s(&maps[..1024]),
        umap: f32s(&maps[1024..]),
        mmax: f32s(&maxes[..4 * blocks]),
        vmax: f32s(&maxes[4 * blocks..]),
        mc: &codes[..n],
        vc: &codes[n..],
    })
}

impl Adam8bit {
    /// Element `e`'s new moments from its old codes and gradient `g`.
    fn moments(&self, s: &Packed, e: usize, g: f32) -> (f32, f32) {
        let (b1, b2) = self.betas;
        let (a1, a2) = self.one_minus;
        let blk = e / QBLOCK;
        let m = s.smap[s.mc[e] as usize] * s.mmax[blk] * b1 + a1 * g;
        let v = s.umap[s.vc[e] as usize] * s.vmax[blk] * b2 + a2 * g * g;
        (m, v)
    }

    fn weights_cpu<T: Elem>(&self, w: &mut [T], g: &[T], st: &[u8]) -> candle_core::Result<()> {
        same_len(w.len(), g.len())?;
        let s = read(st, w.len())?;
        for (e, (w, g)) in w.iter_mut().zip(g).enumerate() {
            let (m, v) = self.moments(&s, e, g.get());
            let denom = v.sqrt() / self.sqrt_bc2 + self.eps;
            let mut x = w.get();
            if let Some(d) = self.decay {
                x *= d;
            }
            *w = T::put(x + self.step_size * (m / denom));
        }
        Ok(())
    }

    fn state_cpu<T: Elem>(&self, st: &mut [u8], g: &[T]) -> candle_core::Result<()> {
        let n = g.len();
        let blocks = n.div_ceil(QBLOCK);
        let s = read(st, n)?;
        let (m, v): (Vec<f32>, Vec<f32>) = g.iter().enumerate().map(|(e, g)| self.moments(&s, e, g.get())).unzip();
        let (smap, umap) = (s.smap.clone(), s.umap.clone());
        let (mc, mmax) = encode(&m, &smap);
        let (vc, vmax) = encode(&v, &umap);
        let maxes = &mut st[MAPS..MAPS + 8 * blocks];
        for (i, x) in mmax.iter().chain(&vmax).enumerate() {
            maxes[4 * i..4 * i + 4].copy_from_slice(&x.to_le_bytes());
        }
        let codes = &mut st[MAPS + 8 * blocks..];
        codes[..n].copy_from_slice(&mc);
        codes[n..].copy_from_slice(&vc);
        Ok(())
    }
}

/// The index of the code nearest to `x` (the lower one on a tie, as `argmin`).
pub fn nearest(x: f32, map: &[f32]) -> u8 {
    let hi = map.partition_point(|&c| c < x).min(map.len() - 1);
    let mut best = hi;
    if hi > 0 && (x - map[hi - 1]).abs() <= (x - map[hi]).abs() {
        best = hi - 1;
    }
    while best > 0 && map[best - 1] == map[best] {
        best -= 1;
    }
    best as u8
}

/// Block-wise codes and block maxima (a block of zeros keeps maximum 1).
pub fn encode(x: &[f32], map: &[f32]) -> (Vec<u8>, Vec<f32>) {
    let mut codes = Vec::with_capacity(x.len());
    let mut absmax = Vec::with_capacity(x.len().div_ceil(QBLOCK));
    for block in x.chunks(QBLOCK) {
        let mut m = block.iter().fold(0f32, |a, v| a.max(v.abs()));
        if m == 0.0 {
            m = 1.0;
        }
        absmax.push(m);
        codes.extend(block.iter().map(|v| nearest(v / m, map)));
    }
    (codes, absmax)
}

/// The packed state from its parts (maps: the signed and unsigned code maps).
pub fn pack(maps: (&[f32], &[f32]), mmax: &[f32], vmax: &[f32], mc: &[u8], vc: &[u8]) -> Vec<u8> {
    let floats = maps.0.iter().chain(maps.1).chain(mmax).chain(vmax);
    let mut out: Vec<u8> = floats.flat_map(|x| x.to_le_bytes()).collect();
    out.extend_from_slice(mc);
    out.extend_from_slice(vc);
    out
}

/// The moments' parts of a packed state.
pub struct Parts {
    pub mmax: Vec<f32>,
    pub vmax: Vec<f32>,
    pub mc: Vec<u8>,
    pub vc: Vec<u8>,
}

/// The parts of a packed state of `n` values.
pub fn unpack(st: &[u8], n: usize) -> Result<Parts> {
    let p = read(st, n)?;
    Ok(Parts { mmax: p.mmax, vmax: p.vmax, mc: p.mc.to_vec(), vc: p.vc.to_vec() })
}

impl InplaceOp3 for Weights {
    fn name(&self) -> &'static str {
        "sdtune-adam8bit-weights"
    }
    fn cpu_fwd(
        &self,
        w: &mut CpuStorage,
        wl: &Layout,
        g: &CpuStorage,
        gl: &Layout,
        st: &CpuStorage,
        sl: &Layout,
    ) -> candle_core::Result<()> {
        fn typed<T: Elem>(
            a: &Adam8bit,
            w: (&mut CpuStorage, &Layout),
            g: (&CpuStorage, &Layout),
            st: &[u8],
        ) -> candle_core::Result<()> {
            a.weights_cpu(elems_mut::<T>(w.0, w.1)?, elems::<T>(g.0, g.1)?, st)
        }
        let st = elems::<u8>(st, sl)?;
        by_dtype!(w.dtype(), self.name(), typed(&self.0, (w, wl), (g, gl), st))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        w: &mut candle_core::CudaStorage,
        wl: &Layout,
        g: &candle_core::CudaStorage,
        gl: &Layout,
        st: &candle_core::CudaStorage,
        sl: &Layout,
    ) -> candle_core::Result<()> {
        use super::cuda::{adam8bit_weights, Arg::F32, Arg::I32};
        let a = self.0;
        let extra = [
            F32(a.betas.0),
            F32(a.betas.1),
            F32(a.one_minus.0),
            F32(a.one_minus.1),
            F32(a.sqrt_bc2),
            F32(a.eps),
            F32(a.decay.unwrap_or(1.0)),
            F32(a.step_size),
            I32(a.decay.is_some() as i32),
        ];
        by_dtype!(w.dtype(), self.name(), adam8bit_weights(w, wl, g, gl, st, sl, &extra))
    }
}

impl InplaceOp2 for State {
    fn name(&self) -> &'static str {
        "sdtune-adam8bit-state"
    }
    fn cpu_fwd(&self, st: &mut CpuStorage, sl: &Layout, g: &CpuStorage, gl: &Layout) -> candle_core::Result<()> {
        fn typed<T: Elem>(a: &Adam8bit, st: &mut [u8], g: &CpuStorage, gl: &Layout) -> candle_core::Result<()> {
            a.state_cpu(st, elems::<T>(g, gl)?)
        }
        let st = match st {
            CpuStorage::U8(v) => super::part_mut(v, sl)?,
            _ => candle_core::bail!("AdamW8bit: the packed state must be u8"),
        };
        by_dtype!(g.dtype(), self.name(), typed(&self.0, st, g, gl))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        st: &mut candle_core::CudaStorage,
        sl: &Layout,
        g: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> candle_core::Result<()> {
        use super::cuda::{adam8bit_state, Arg::F32};
        let a = self.0;
        let extra = [F32(a.betas.0), F32(a.betas.1), F32(a.one_minus.0), F32(a.one_minus.1)];
        by_dtype!(g.dtype(), self.name(), adam8bit_state(st, sl, g, gl, &extra))
    }
}
