//! Tensor files: memory-mapped safetensors reading, PyTorch `.ckpt` reading, atomic safetensors writing.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Tensors of a file with its `__metadata__`.
pub struct TensorFile {
    pub tensors: HashMap<String, Tensor>,
    pub metadata: HashMap<String, String>,
}

fn open_mmap(path: &Path) -> Result<memmap2::Mmap> {
    let file = std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    if len < 8 {
        bail!(
            "{}: not a safetensors file: {len} bytes, too short for the 8-byte header length (truncated?)",
            path.display()
        );
    }
    // SAFETY: the file is opened read-only; like every mmap reader we assume it is not truncated while mapped.
    unsafe { memmap2::Mmap::map(&file) }.with_context(|| format!("{}: cannot memory-map", path.display()))
}

/// The `__metadata__` map of a safetensors file (empty when it has none).
pub fn read_metadata(path: &Path) -> Result<HashMap<String, String>> {
    let mmap = open_mmap(path)?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&mmap).map_err(|e| {
        anyhow::anyhow!(
            "{}: not a valid safetensors file ({e:?}); expected an 8-byte length and a JSON header",
            path.display()
        )
    })?;
    Ok(meta.metadata().clone().unwrap_or_default())
}

/// Reads a safetensors file through a memory map, converting floats to `dtype` (integers keep theirs).
pub fn read_safetensors(path: &Path, dtype: Option<DType>, device: &Device) -> Result<TensorFile> {
    let mmap = open_mmap(path)?;
    let st = safetensors::SafeTensors::deserialize(&mmap).map_err(|e| {
        anyhow::anyhow!(
            "{}: not a valid safetensors file ({e:?}); the file may be truncated or corrupt",
            path.display()
        )
    })?;
    let mut tensors = HashMap::new();
    for (name, view) in st.tensors() {
        let t = candle_core::safetensors::Load::load(&view, device)
            .with_context(|| format!("{}: tensor `{name}` cannot be read", path.display()))?;
        tensors.insert(name, cast_float(t, dtype)?);
    }
    let metadata = read_metadata(path)?;
    Ok(TensorFile { tensors, metadata })
}

/// Reads a PyTorch zip checkpoint (`.ckpt`, `.pt`, `.bin`) with candle's pickle reader (no code is executed),
/// taking `state_dict` when present.
pub fn read_ckpt(path: &Path, dtype: Option<DType>, device: &Device) -> Result<TensorFile> {
    let tensors = read_pickled(path, "state_dict", dtype, device)?;
    if tensors.is_empty() {
        bail!("{}: no tensors found in the checkpoint's state_dict", path.display());
    }
    Ok(TensorFile { tensors, metadata: HashMap::new() })
}

/// The tensors of a PyTorch zip pickle under the dict entry `key` when there is one, else at its top level (no
/// code is executed).
pub fn read_pickled(path: &Path, key: &str, dtype: Option<DType>, device: &Device) -> Result<HashMap<String, Tensor>> {
    let pth = candle_core::pickle::PthTensors::new(path, Some(key))
        .or_else(|_| candle_core::pickle::PthTensors::new(path, None))
        .map_err(|e| anyhow::anyhow!("{}: not a readable PyTorch checkpoint (zip + pickle) : {e}", path.display()))?;
    let mut tensors = HashMap::new();
    let names: Vec<String> = pth.tensor_infos().keys().cloned().collect();
    for name in names {
        if let Some(t) =
            pth.get(&name).with_context(|| format!("{}: tensor `{name}` cannot be read", path.display()))?
        {
            tensors.insert(name, cast_float(t.to_device(device)?, dtype)?);
        }
    }
    Ok(tensors)
}

/// Reads any supported tensor file by extension.
pub fn read_any(path: &Path, dtype: Option<DType>, device: &Device) -> Result<TensorFile> {
    match path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref() {
        Some("ckpt" | "pt" | "pth" | "bin") => read_ckpt(path, dtype, device),
        _ => read_safetensors(path, dtype, device),
    }
}

fn cast_float(t: Tensor, dtype: Option<DType>) -> Result<Tensor> {
    Ok(match dtype {
        Some(d) if t.dtype().is_float() && t.dtype() != d => t.to_dtype(d)?,
        _ => t,
    })
}

/// A temporary sibling of `path` for atomic replacement.
pub fn temp_sibling(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Writes bytes produced by `write` to `path` atomically (temp file in the same folder, fsync, rename).
pub fn write_atomic(path: &Path, write: impl FnOnce(&mut std::fs::File) -> Result<()>) -> Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !parent.is_dir() {
            bail!("{}: the folder {} does not exist", path.display(), parent.display());
        }
    }
    let tmp = temp_sibling(path);
    let result = (|| -> Result<()> {
        let mut f = std::fs::File::create(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
        write(&mut f)?;
        f.flush()?;
        f.sync_all()?;
        std::fs::rename(&tmp, path).with_context(|| format!("{}: cannot move into place", path.display()))?;
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// The safetensors bytes of tensors (sorted by name) and metadata (none when empty).
pub fn serialize_safetensors(tensors: &HashMap<String, Tensor>, metadata: &HashMap<String, String>) -> Result<Vec<u8>> {
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let cpu: Vec<(String, Tensor)> = names
        .into_iter()
        .map(|n| Ok((n.clone(), tensors[n].to_device(&Device::Cpu)?.contiguous()?)))
        .collect::<Result<_>>()?;
    let meta = if metadata.is_empty() { None } else { Some(metadata.clone()) };
    safetensors::serialize(cpu.iter().map(|(n, t)| (n.as_str(), t)), meta)
        .map_err(|e| anyhow::anyhow!("cannot serialise tensors: {e:?}"))
}

/// Writes tensors (sorted by name) and metadata as safetensors, atomically.
pub fn write_safetensors(
    path: &Path,
    tensors: &HashMap<String, Tensor>,
    metadata: &HashMap<String, String>,
) -> Result<()> {
    let bytes = serialize_safetensors(tensors, metadata).with_context(|| format!("{}", path.display()))?;
    write_atomic(path, |f| Ok(f.write_all(&bytes)?))
}
