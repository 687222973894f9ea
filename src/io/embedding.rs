//! Textual-inversion embedding files: sd-scripts' and A1111's safetensors (`emb_params`; SDXL `clip_l` + `clip_g`)
//! and A1111's PyTorch pickles (`string_to_param: {"*": vectors}`), read without executing code.

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// An embedding's vectors, `[n, width]` in f32 on the CPU: one set for SD 1.x/2.x, or SDXL's two (`clip_l` for the
/// first text encoder, `clip_g` for the second).
#[derive(Clone, Debug)]
pub struct EmbeddingFile {
    pub vectors: Vec<Tensor>,
}

/// Reads an embedding file; `encoders` is how many text encoders the model has (2 for SDXL).
pub fn load(path: &Path, encoders: usize) -> Result<EmbeddingFile> {
    let ext = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
    let tensors: HashMap<String, Tensor> = match ext.as_deref() {
        // A1111: the vectors under string_to_param (the dict's one entry, usually `*`)
        Some("pt" | "bin" | "ckpt" | "pth") => {
            crate::io::tensors::read_pickled(path, "string_to_param", None, &Device::Cpu)?
        }
        _ => crate::io::tensors::read_safetensors(path, None, &Device::Cpu)?.tensors,
    };
    let as_rows = |k: &str, t: &Tensor| -> Result<Tensor> {
        let t = t.to_dtype(DType::F32)?;
        match t.rank() {
            1 => Ok(t.unsqueeze(0)?),
            2 => Ok(t),
            _ => bail!("{}: `{k}` has shape {:?}, expected [vectors, width]", path.display(), t.dims()),
        }
    };
    let get = |k: &str| tensors.get(k).map(|t| as_rows(k, t)).transpose();
    let vectors = if encoders == 2 {
        match (get("clip_l")?, get("clip_g")?) {
            (Some(l), Some(g)) => vec![l, g],
            _ => bail!(
                "{}: an SDXL embedding has `clip_l` and `clip_g` vectors; found {:?} (an SD 1.x/2.x embedding?)",
                path.display(),
                sorted_keys(&tensors)
            ),
        }
    } else if let Some(e) = get("emb_params")? {
        vec![e]
    } else if tensors.len() == 1 {
        let (k, t) = tensors.iter().next().expect("one entry");
        vec![as_rows(k, t)?]
    } else {
        bail!(
            "{}: no embedding vectors: expected `emb_params` (or one tensor), found {:?}{}",
            path.display(),
            sorted_keys(&tensors),
            if tensors.contains_key("clip_l") { " (an SDXL embedding?)" } else { "" }
        )
    };
    if vectors[0].dim(0)? == 0 || vectors.iter().any(|v| v.dim(0).ok() != vectors[0].dim(0).ok()) {
        bail!("{}: the embedding's vector sets must be non-empty and of one length", path.display());
    }
    Ok(EmbeddingFile { vectors })
}

fn sorted_keys(m: &HashMap<String, Tensor>) -> Vec<&String> {
    let mut k: Vec<&String> = m.keys().collect();
    k.sort();
    k
}

/// Writes an embedding as sd-scripts does (`emb_params`, or SDXL's `clip_l` + `clip_g`) in `dtype`, atomically.
pub fn save(path: &Path, vectors: &[Tensor], dtype: DType, metadata: &HashMap<String, String>) -> Result<()> {
    let names: &[&str] = if vectors.len() == 2 { &["clip_l", "clip_g"] } else { &["emb_params"] };
    let mut m = HashMap::new();
    for (n, v) in names.iter().zip(vectors) {
        m.insert(n.to_string(), v.to_dtype(dtype)?.to_device(&Device::Cpu)?);
    }
    crate::io::tensors::write_safetensors(path, &m, metadata)
}
