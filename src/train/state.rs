//! Saved training states: everything to continue a run exactly (the trained weights, optimizer tensors, counters, the
//! recipe), written as a folder that replaces the previous one only when complete.

use super::trainer::Trainer;
use anyhow::{bail, Context, Result};
use candle_core::Device;
use std::collections::HashMap;
use std::path::Path;

/// Writes the state folder (built beside it, then swapped in).
pub fn save(tr: &Trainer, dir: &Path) -> Result<()> {
    let tmp = crate::io::tensors::temp_sibling(dir);
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
    let weights = tr.target.state_tensors()?;
    crate::io::tensors::write_safetensors(&tmp.join(tr.target.state_file()), &weights, &HashMap::new())?;
    let mut opt = HashMap::new();
    let o = tr.optimizer();
    for (gi, g) in o.groups.iter().enumerate() {
        for pi in 0..g.params.len() {
            for (si, t) in o.saved_state(gi, pi)?.iter().enumerate() {
                opt.insert(format!("g{gi}.{}.p{pi}.s{si}", g.name), t.to_device(&Device::Cpu)?);
            }
        }
    }
    crate::io::tensors::write_safetensors(&tmp.join("optimizer.safetensors"), &opt, &HashMap::new())?;
    let info = serde_json::json!({
        "format": "sdtune-train-state-1",
        "step": tr.step,
        "epoch": tr.epoch,
        "batch_in_epoch": tr.window_start(),
        "optimizer_scalars": o.scalars,
        "optimizer_param_steps": o.param_steps,
        "loss_scaler": tr.scaler.as_ref().map(|s| serde_json::json!({
            "scale": s.scale, "good_steps": s.good_steps, "skipped": s.skipped,
        })),
        "losses": tr.losses,
        "recipe": tr.recipe,
    });
    std::fs::write(tmp.join("state.json"), serde_json::to_string_pretty(&info)?)?;
    let old = dir.with_extension("old");
    let _ = std::fs::remove_dir_all(&old);
    if dir.exists() {
        std::fs::rename(dir, &old)
            .with_context(|| format!("{}: cannot move the previous state aside", dir.display()))?;
    }
    std::fs::rename(&tmp, dir).with_context(|| format!("{}: cannot move the new state into place", dir.display()))?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

/// Reads `state.json` of a state folder.
pub fn read_info(dir: &Path) -> Result<serde_json::Value> {
    let p = dir.join("state.json");
    let text = std::fs::read_to_string(&p)
        .with_context(|| format!("{}: not a training state folder (no state.json)", dir.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", p.display()))?;
    if v.get("format").and_then(|f| f.as_str()) != Some("sdtune-train-state-1") {
        bail!("{}: unknown state format", p.display());
    }
    Ok(v)
}

/// Loads the tensors and counters of a state folder into a trainer built from the same recipe.
pub fn load_into(tr: &mut Trainer, dir: &Path) -> Result<()> {
    let info = read_info(dir)?;
    let dev = tr.model.device.clone();
    let file = dir.join(tr.target.state_file());
    let weights = crate::io::tensors::read_safetensors(&file, None, &dev)
        .with_context(|| format!("{}: the saved weights (is this state from a run of the same kind?)", dir.display()))?
        .tensors;
    tr.target.restore(&weights, dir)?;
    let opt = crate::io::tensors::read_safetensors(&dir.join("optimizer.safetensors"), None, &dev)?.tensors;
    let o = tr.optimizer_mut();
    for gi in 0..o.groups.len() {
        let gname = o.groups[gi].name.clone();
        for pi in 0..o.state[gi].len() {
            let parts = (0..o.saved_state(gi, pi)?.len())
                .map(|si| {
                    let k = format!("g{gi}.{gname}.p{pi}.s{si}");
                    opt.get(&k).cloned().with_context(|| format!("{}: optimizer state `{k}` missing", dir.display()))
                })
                .collect::<Result<Vec<_>>>()?;
            o.restore_state(gi, pi, parts).with_context(|| format!("{}: optimizer state", dir.display()))?;
        }
    }
    let scalars: Vec<f64> = info
        .get("optimizer_scalars")
        .and_then(|v| v.as_array())
        .map(|a| a.iter().filter_map(|x| x.as_f64()).collect())
        .unwrap_or_default();
    if scalars.len() != o.scalars.len() {
        bail!(
            "{}: the saved optimizer has {} optimizer-wide values, this one {} (another optimizer_type?)",
            dir.display(),
            scalars.len(),
            o.scalars.len()
        );
    }
    o.scalars = scalars;
    if let Some(steps) = info.get("optimizer_param_steps").and_then(|v| v.as_array()) {
        for (gi, g) in steps.iter().enumerate().take(o.param_steps.len()) {
            for (pi, n) in g.as_array().into_iter().flatten().enumerate().take(o.param_steps[gi].len()) {
                o.param_steps[gi][pi] = n.as_u64().unwrap_or(0) as usize;
            }
        }
    }
    if let (Some(s), Some(saved)) = (tr.scaler.as_mut(), info.get("loss_scaler").filter(|v| !v.is_null())) {
        let n = |k: &str| saved.get(k).and_then(|v| v.as_f64()).unwrap_or(0.0);
        s.scale = n("scale");
        s.good_steps = n("good_steps") as usize;
        s.skipped = n("skipped") as usize;
    }
    let num = |k: &str| info.get(k).and_then(|v| v.as_u64()).unwrap_or(0) as usize;
    tr.step = num("step");
    tr.epoch = num("epoch");
    tr.batch_in_epoch = num("batch_in_epoch");
    tr.losses = info
        .get("losses")
        .and_then(|v| v.as_array())
        .map(|a| a.iter().filter_map(|x| x.as_f64()).collect())
        .unwrap_or_default();
    Ok(())
}
