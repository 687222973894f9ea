//! Gradient checkpointing (sd-scripts' `--gradient_checkpointing`, diffusers' per-block checkpoints): a block's
//! output is joined to its inputs by one op that keeps none of the block's intermediate tensors; its backward runs
//! the block again, with the same dropout draws, and takes the gradients from that. The trainable variables of
//! the adapters on the block's layers (LoRA weights) reach the op as one concatenated input, so their gradients
//! flow back through the concatenation. A block whose own weights are variables (full fine-tuning) hands their
//! gradients to a per-thread collector instead (copying every weight into one input each step would double the
//! model's memory); whoever calls `backward` adds them with `add_block_gradients`.

use super::adapter::{Adapter, Slot};
use super::Weights;
use anyhow::Result;
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use std::cell::RefCell;
use std::sync::Arc;

thread_local! {
    /// Gradients of blocks' own variables from the backward passes run on this thread, not yet collected.
    static BLOCK_GRADIENTS: RefCell<Vec<(Tensor, Tensor)>> = const { RefCell::new(Vec::new()) };
}

/// Adds to `grads` the gradients of checkpointed blocks' own variables computed by this thread's backward passes
/// since the last call (a backward with full fine-tuning and checkpointing must be followed by this).
pub fn add_block_gradients(grads: &mut GradStore) -> Result<()> {
    for (var, g) in BLOCK_GRADIENTS.with(|b| std::mem::take(&mut *b.borrow_mut())) {
        let sum = match grads.get(&var) {
            Some(prev) => (prev + &g)?,
            None => g,
        };
        grads.insert(&var, sum);
    }
    Ok(())
}

/// Drops uncollected block gradients (of a backward that failed).
pub fn clear_block_gradients() {
    BLOCK_GRADIENTS.with(|b| b.borrow_mut().clear());
}

/// A block's forward: `(x, aux) → y` (aux: the time embedding or the text context, if the block takes one).
pub type BlockFn = Arc<dyn Fn(&Tensor, Option<&Tensor>) -> Result<Tensor> + Send + Sync>;

/// A model block with the slots of its adaptable layers (what a checkpoint needs to run it again).
pub struct Checkpointed<B> {
    block: Arc<B>,
    slots: Vec<Slot>,
    /// The block's own weights that are variables (full fine-tuning).
    vars: Vec<Tensor>,
}

impl<B: Send + Sync + 'static> Checkpointed<B> {
    /// Builds the block from `w` and collects the layers it registered there.
    pub fn new(w: &Weights, build: impl FnOnce(&Weights) -> Result<B>) -> Result<Self> {
        let block = Arc::new(build(w)?);
        Ok(Self { block, slots: w.slots_under(), vars: w.variables_under() })
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
        checkpoint(kind, x, aux, &self.slots, &self.vars, Arc::new(move |x, a| forward(&b, x, a)))
    }
}

/// `f(x, aux)`, checkpointed when something needs gradients through it; `slots` are the block's layers, `vars`
/// its own weights that are variables.
pub fn checkpoint(
    kind: &'static str,
    x: &Tensor,
    aux: Option<&Tensor>,
    slots: &[Slot],
    vars: &[Tensor],
    f: BlockFn,
) -> Result<Tensor> {
    let adapters: Vec<Arc<dyn Adapter>> = slots.iter().flat_map(|s| s.adapters()).collect();
    // the op's backward runs only if one of its inputs needs a gradient; without one (nor adapters), the block
    // runs in the graph, where its own variables still get theirs
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
    let vars = vars.to_vec();
    super::grad::attach(kind, &inputs, y, dtype, move |inp, _, g, need| {
        // the draws after the forward's go on where the recomputation leaves them
        let after: Vec<Option<u64>> = adapters.iter().map(|a| a.stream()).collect();
        set_streams(&adapters, &streams);
        let recomputed = recompute(&f, inp, has_aux, g, need, &params, &vars);
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
    vars: &[Tensor],
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
    let own: Vec<(Tensor, Tensor)> = vars.iter().filter_map(|v| grads.get(v).map(|g| (v.clone(), g.clone()))).collect();
    BLOCK_GRADIENTS.with(|b| b.borrow_mut().extend(own));
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
