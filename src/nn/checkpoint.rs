//! Gradient checkpointing (sd-scripts' `--gradient_checkpointing`, diffusers' per-block checkpoints): a block's
//! output is joined to its inputs by one op that keeps none of the block's intermediate tensors; its backward runs
//! the block again, with the same dropout draws, and takes the gradients from that. The trainable variables of
//! the adapters on the block's layers (LoRA weights) reach the op as one concatenated input, so their gradients
//! flow back through the concatenation.

use super::adapter::{Adapter, Slot};
use anyhow::Result;
use candle_core::{DType, Tensor, Var};
use std::sync::Arc;

/// A block's forward: `(x, aux) → y` (aux: the time embedding or the text context).
pub type BlockFn = Arc<dyn Fn(&Tensor, &Tensor) -> Result<Tensor> + Send + Sync>;

/// `f(x, aux)`, checkpointed when something needs gradients through it; `slots` are the block's layers.
pub fn checkpoint(kind: &'static str, x: &Tensor, aux: &Tensor, slots: &[Slot], f: BlockFn) -> Result<Tensor> {
    let adapters: Vec<Arc<dyn Adapter>> = slots.iter().flat_map(|s| s.adapters()).collect();
    if adapters.is_empty() && !super::grad::tracked(x) && !super::grad::tracked(aux) {
        return f(x, aux);
    }
    let streams: Vec<Option<u64>> = adapters.iter().map(|a| a.stream()).collect();
    // computed with a graph that is dropped as soon as `attach` takes the result
    let y = f(&x.detach(), &aux.detach())?;
    let dtype = y.dtype();
    // the variables this forward used (module dropout may have skipped some: they get no gradient, as without
    // checkpointing)
    let params: Vec<Var> = adapters.iter().flat_map(|a| a.params()).collect();
    let flat =
        params.iter().map(|v| Ok(v.as_tensor().flatten_all()?.to_dtype(DType::F32)?)).collect::<Result<Vec<_>>>()?;
    let packed = if flat.is_empty() { None } else { Some(Tensor::cat(&flat, 0)?) };
    let mut inputs = vec![x, aux];
    inputs.extend(packed.as_ref());
    super::grad::attach(kind, &inputs, y, dtype, move |inp, _, g, need| {
        // the draws after the forward's go on where the recomputation leaves them
        let after: Vec<Option<u64>> = adapters.iter().map(|a| a.stream()).collect();
        set_streams(&adapters, &streams);
        let recomputed = recompute(&f, inp, g, need, &params);
        set_streams(&adapters, &after);
        recomputed
    })
}

fn set_streams(adapters: &[Arc<dyn Adapter>], states: &[Option<u64>]) {
    for (a, s) in adapters.iter().zip(states) {
        if let Some(s) = s {
            a.set_stream(*s);
        }
    }
}

/// The gradients of `x`, `aux` and the packed variables from running the block again on variables.
fn recompute(f: &BlockFn, inp: &[Tensor], g: &Tensor, need: &[bool], params: &[Var]) -> Result<Vec<Option<Tensor>>> {
    let leaf = |i: usize| -> Result<Tensor> {
        Ok(if need[i] { Var::from_tensor(&inp[i])?.as_tensor().clone() } else { inp[i].clone() })
    };
    let (x, aux) = (leaf(0)?, leaf(1)?);
    let y = f(&x, &aux)?;
    let g = g.to_dtype(y.dtype())?;
    let grads = (y * g)?.sum_all()?.backward()?;
    let take = |t: &Tensor, i: usize| if need[i] { grads.get(t).cloned() } else { None };
    let mut out = vec![take(&x, 0), take(&aux, 1)];
    if need.len() > 2 {
        let parts = params
            .iter()
            .map(|v| match grads.get(v.as_tensor()) {
                Some(gv) => Ok(gv.flatten_all()?.to_dtype(DType::F32)?),
                None => Ok(Tensor::zeros(v.elem_count(), DType::F32, v.device())?),
            })
            .collect::<Result<Vec<_>>>()?;
        out.push(Some(Tensor::cat(&parts, 0)?));
    }
    Ok(out)
}
