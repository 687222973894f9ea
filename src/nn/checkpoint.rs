//! Gradient checkpointing (sd-scripts' `--gradient_checkpointing`, diffusers' per-block checkpoints): a block's
//! output is joined to its inputs by one op that keeps none of the block's intermediate tensors; its backward runs
//! the block again, with the same dropout draws, and takes the gradients from that. The trainable variables of
//! the adapters on the block's layers (LoRA weights) reach the op as one concatenated input, so their gradients
//! flow back through the concatenation.

use super::adapter::{Adapter, Slot};
use super::Weights;
use anyhow::Result;
use candle_core::{DType, Tensor, Var};
use std::sync::Arc;

/// A block's forward: `(x, aux) → y` (aux: the time embedding or the text context, if the block takes one).
pub type BlockFn = Arc<dyn Fn(&Tensor, Option<&Tensor>) -> Result<Tensor> + Send + Sync>;

/// A model block with the slots of its adaptable layers (what a checkpoint needs to run it again).
pub struct Checkpointed<B> {
    block: Arc<B>,
    slots: Vec<Slot>,
}

impl<B: Send + Sync + 'static> Checkpointed<B> {
    /// Builds the block from `w` and collects the layers it registered there.
    pub fn new(w: &Weights, build: impl FnOnce(&Weights) -> Result<B>) -> Result<Self> {
        let block = Arc::new(build(w)?);
        Ok(Self { block, slots: w.slots_under() })
    }

    /// `forward(block, x, aux)`, through a checkpoint when `on`; `kind` names its backward in the op profile.
    pub fn run(
        &self,
        on: bool,
        kind: &'static str,
        x: &Tensor,
        aux: Option<&Tensor>,
        forward: fn(&B, &Tensor, Option<&Tensor>) -> Result<Tensor>,
    ) -> Result<Tensor> {
        if !on {
            return forward(&self.block, x, aux);
        }
        let b = self.block.clone();
        checkpoint(kind, x, aux, &self.slots, Arc::new(move |x, a| forward(&b, x, a)))
    }
}

/// `f(x, aux)`, checkpointed when something needs gradients through it; `slots` are the block's layers.
pub fn checkpoint(kind: &'static str, x: &Tensor, aux: Option<&Tensor>, slots: &[Slot], f: BlockFn) -> Result<Tensor> {
    let adapters: Vec<Arc<dyn Adapter>> = slots.iter().flat_map(|s| s.adapters()).collect();
    if adapters.is_empty() && !super::grad::tracked(x) && !aux.is_some_and(super::grad::tracked) {
        return f(x, aux);
    }
    let streams: Vec<Option<u64>> = adapters.iter().map(|a| a.stream()).collect();
    // computed with a graph that is dropped as soon as `attach` takes the result
    let y = f(&x.detach(), aux.map(|a| a.detach()).as_ref())?;
    let dtype = y.dtype();
    // the variables this forward used (module dropout may have skipped some: they get no gradient, as without
    // checkpointing)
    let params: Vec<Var> = adapters.iter().flat_map(|a| a.params()).collect();
    let flat =
        params.iter().map(|v| Ok(v.as_tensor().flatten_all()?.to_dtype(DType::F32)?)).collect::<Result<Vec<_>>>()?;
    let packed = if flat.is_empty() { None } else { Some(Tensor::cat(&flat, 0)?) };
    // the op's inputs: x, then aux if given, then the packed variables if any
    let has_aux = aux.is_some();
    let mut inputs = vec![x];
    inputs.extend(aux);
    inputs.extend(packed.as_ref());
    super::grad::attach(kind, &inputs, y, dtype, move |inp, _, g, need| {
        // the draws after the forward's go on where the recomputation leaves them
        let after: Vec<Option<u64>> = adapters.iter().map(|a| a.stream()).collect();
        set_streams(&adapters, &streams);
        let recomputed = recompute(&f, inp, has_aux, g, need, &params);
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

/// The gradients of the op's inputs (`x`, `aux` if `has_aux`, the packed variables if any) from running the block
/// again on variables.
fn recompute(
    f: &BlockFn,
    inp: &[Tensor],
    has_aux: bool,
    g: &Tensor,
    need: &[bool],
    params: &[Var],
) -> Result<Vec<Option<Tensor>>> {
    let leaf = |i: usize| -> Result<Tensor> {
        Ok(if need[i] { Var::from_tensor(&inp[i])?.as_tensor().clone() } else { inp[i].clone() })
    };
    let leaves = (0..1 + usize::from(has_aux)).map(leaf).collect::<Result<Vec<_>>>()?;
    let y = f(&leaves[0], leaves.get(1))?;
    let g = g.to_dtype(y.dtype())?;
    let grads = (y * g)?.sum_all()?.backward()?;
    let mut out: Vec<Option<Tensor>> =
        leaves.iter().enumerate().map(|(i, t)| if need[i] { grads.get(t).cloned() } else { None }).collect();
    if inp.len() > leaves.len() {
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
