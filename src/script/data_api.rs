//! Script bindings for datasets: `dataset(path, opts)` and the Dataset object.

use super::errors::{rt, RhaiResult};
use crate::data::{config::General, open, DatasetGroup, OpenOptions};
use crate::io::png::Image;
use anyhow::{Context, Result};
use rhai::{Array, Dynamic, Engine, Map};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A dataset as scripts hold it.
pub type DatasetRef = Arc<DatasetGroup>;

/// Converts a script value to JSON (for typed option parsing).
pub fn to_json(v: &Dynamic) -> Result<serde_json::Value> {
    use serde_json::Value;
    Ok(if v.is_unit() {
        Value::Null
    } else if let Ok(b) = v.as_bool() {
        Value::Bool(b)
    } else if let Ok(i) = v.as_int() {
        Value::from(i)
    } else if let Ok(f) = v.as_float() {
        Value::from(f)
    } else if v.is_string() {
        Value::String(v.clone().into_string().expect("checked string"))
    } else if let Some(a) = v.read_lock::<Array>() {
        Value::Array(a.iter().map(to_json).collect::<Result<_>>()?)
    } else if let Some(m) = v.read_lock::<Map>() {
        Value::Object(m.iter().map(|(k, x)| Ok((k.to_string(), to_json(x)?))).collect::<Result<_>>()?)
    } else {
        anyhow::bail!("a {} cannot be used as an option value", v.type_name())
    })
}

/// Converts JSON to a script value (objects become maps).
pub fn from_json(v: &serde_json::Value) -> Dynamic {
    use serde_json::Value;
    match v {
        Value::Null => Dynamic::UNIT,
        Value::Bool(b) => Dynamic::from_bool(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => Dynamic::from_int(i),
            None => Dynamic::from_float(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => Dynamic::from(s.clone()),
        Value::Array(a) => Dynamic::from_array(a.iter().map(from_json).collect()),
        Value::Object(m) => Dynamic::from_map(m.iter().map(|(k, x)| (k.as_str().into(), from_json(x))).collect()),
    }
}

fn open_dataset(path: &str, opts: &Map) -> Result<DatasetRef> {
    let m_all = opts.clone();
    let mut m = opts.clone();
    let reg = m
        .remove("reg_data_dir")
        .filter(|v| !v.is_unit())
        .map(|v| v.into_string().map_err(|t| anyhow::anyhow!("reg_data_dir must be a string, got {t}")))
        .transpose()?;
    let in_json = m
        .remove("in_json")
        .filter(|v| !v.is_unit())
        .map(|v| v.into_string().map_err(|t| anyhow::anyhow!("in_json must be a string, got {t}")))
        .transpose()?;
    let strict = m
        .remove("strict")
        .map(|v| v.as_bool().map_err(|t| anyhow::anyhow!("strict must be true or false, got {t}")))
        .transpose()?
        .unwrap_or(false);
    let call: General = serde_json::from_value(to_json(&Dynamic::from_map(m))?)
        .map_err(|e| anyhow::anyhow!("dataset: {e} (also accepted: reg_data_dir, in_json, strict)"))?;
    let opts = OpenOptions { call, reg_dir: reg.map(PathBuf::from), in_json: in_json.map(PathBuf::from), strict };
    let mut group = open(Path::new(path), &opts)?;
    // kept for the training recipe, so that a resumed run opens the same dataset
    group.options = to_json(&Dynamic::from_map(m_all))?;
    Ok(Arc::new(group))
}

fn get(d: &DatasetRef, i: i64) -> Result<Map> {
    let idx = usize::try_from(i).ok().context("dataset.get: the index must be ≥ 0")?;
    let s = d.get(idx, 0)?;
    let mut m = Map::new();
    m.insert(
        "image".into(),
        Dynamic::from(Image { width: s.image.width, height: s.image.height, rgb: s.image.data, text: Vec::new() }),
    );
    m.insert("caption".into(), Dynamic::from(s.caption));
    m.insert(
        "bucket".into(),
        Dynamic::from_array(vec![Dynamic::from_int(s.bucket.0 as i64), Dynamic::from_int(s.bucket.1 as i64)]),
    );
    m.insert("path".into(), Dynamic::from(s.path.display().to_string()));
    Ok(m)
}

/// Registers `dataset(...)` and the Dataset type.
pub fn register(engine: &mut Engine) {
    engine.register_type_with_name::<DatasetRef>("Dataset");
    engine.register_fn("dataset", |p: &str| rt(open_dataset(p, &Map::new())));
    engine.register_fn("dataset", |p: &str, o: Map| rt(open_dataset(p, &o)));
    engine.register_get("len", |d: &mut DatasetRef| d.len() as i64);
    engine.register_get("batches_per_epoch", |d: &mut DatasetRef| d.batches_per_epoch() as i64);
    engine.register_get("buckets", |d: &mut DatasetRef| -> Array {
        d.buckets()
            .into_iter()
            .map(|((w, h), n)| {
                let mut m = Map::new();
                m.insert("width".into(), Dynamic::from_int(w as i64));
                m.insert("height".into(), Dynamic::from_int(h as i64));
                m.insert("count".into(), Dynamic::from_int(n as i64));
                Dynamic::from_map(m)
            })
            .collect()
    });
    engine.register_get("problems", |d: &mut DatasetRef| -> Array {
        d.problems().iter().map(|p| Dynamic::from(p.to_string())).collect()
    });
    engine.register_get("report", |d: &mut DatasetRef| d.report());
    engine.register_fn("get", |d: &mut DatasetRef, i: i64| -> RhaiResult<Map> { rt(get(d, i)) });
    engine
        .register_fn("to_string", |d: &mut DatasetRef| format!("Dataset({}, {} samples)", d.source.display(), d.len()));
    engine
        .register_fn("to_debug", |d: &mut DatasetRef| format!("Dataset({}, {} samples)", d.source.display(), d.len()));
}
