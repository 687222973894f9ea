//! A read-only, prefix-scoped view over a map of named tensors, used to build models.

use super::adapter::{LayerInfo, Registry};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::sync::Arc;

/// Named tensors plus a key prefix; `pp` descends into a sub-module like candle's `VarBuilder`.
#[derive(Clone)]
pub struct Weights {
    map: Arc<HashMap<String, Tensor>>,
    prefix: String,
    source: Arc<str>,
    registry: Option<Registry>,
}

impl Weights {
    /// Wraps a tensor map; `source` names where the tensors came from (for error messages).
    pub fn new(map: HashMap<String, Tensor>, source: &str) -> Self {
        Self { map: Arc::new(map), prefix: String::new(), source: source.into(), registry: None }
    }

    /// Records every Linear/Conv2d built from this view (and its children) in `registry`.
    pub fn with_registry(mut self, registry: Registry) -> Self {
        self.registry = Some(registry);
        self
    }

    /// Records an adaptable layer (no-op without a registry).
    pub fn register(&self, info: LayerInfo) {
        if let Some(r) = &self.registry {
            r.push(info);
        }
    }

    /// The slots of the layers registered so far under this view's prefix (a block's own layers, once built).
    pub fn slots_under(&self) -> Vec<super::adapter::Slot> {
        let Some(r) = &self.registry else { return Vec::new() };
        let dotted = format!("{}.", self.prefix);
        r.layers()
            .into_iter()
            .filter(|l| l.name == self.prefix || l.name.starts_with(&dotted))
            .map(|l| l.slot)
            .collect()
    }

    /// The variables (trained weights, full fine-tuning) under this view's prefix, sorted by name.
    pub fn variables_under(&self) -> Vec<Tensor> {
        let dotted = format!("{}.", self.prefix);
        let mut v: Vec<(&String, &Tensor)> = self
            .map
            .iter()
            .filter(|(k, t)| t.is_variable() && (self.prefix.is_empty() || k.starts_with(&dotted)))
            .collect();
        v.sort_by(|a, b| a.0.cmp(b.0));
        v.into_iter().map(|(_, t)| t.clone()).collect()
    }

    /// Shares an existing map.
    pub fn from_arc(map: Arc<HashMap<String, Tensor>>, source: &str) -> Self {
        Self { map, prefix: String::new(), source: source.into(), registry: None }
    }

    /// A view one level deeper (`prefix.name`).
    pub fn pp(&self, name: impl std::fmt::Display) -> Self {
        let prefix = if self.prefix.is_empty() { name.to_string() } else { format!("{}.{}", self.prefix, name) };
        Self { map: self.map.clone(), prefix, source: self.source.clone(), registry: self.registry.clone() }
    }

    /// The module path of this view (dotted, as in the checkpoint).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The full key of `name` under this view.
    pub fn key(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.prefix, name)
        }
    }

    /// Whether `name` exists under this view.
    pub fn contains(&self, name: &str) -> bool {
        self.map.contains_key(&self.key(name))
    }

    /// Whether any key starts with `name.` under this view.
    pub fn has_module(&self, name: &str) -> bool {
        let p = format!("{}.", self.key(name));
        self.map.keys().any(|k| k.starts_with(&p))
    }

    /// The tensor `name`; an error names the missing key and the source.
    pub fn get(&self, name: &str) -> Result<Tensor> {
        let key = self.key(name);
        self.map.get(&key).cloned().with_context(|| format!("{}: missing tensor `{key}`", self.source))
    }

    /// The tensor `name` if present.
    pub fn get_opt(&self, name: &str) -> Option<Tensor> {
        self.map.get(&self.key(name)).cloned()
    }

    /// The tensor `name`, checked against an expected shape.
    pub fn get_shape(&self, name: &str, dims: &[usize]) -> Result<Tensor> {
        let t = self.get(name)?;
        if t.dims() != dims {
            bail!("{}: tensor `{}` has shape {:?}, expected {:?}", self.source, self.key(name), t.dims(), dims);
        }
        Ok(t)
    }

    /// Number of consecutive numbered children `name.0`, `name.1`, ... under this view.
    pub fn count(&self, name: &str) -> usize {
        let mut n = 0;
        while self.has_module(&format!("{name}.{n}")) {
            n += 1;
        }
        n
    }

    /// The dtype of the stored tensors (of any one of them; F32 when empty).
    pub fn dtype(&self) -> DType {
        self.map.values().next().map(|t| t.dtype()).unwrap_or(DType::F32)
    }

    /// The device of the stored tensors (CPU when empty).
    pub fn device(&self) -> Device {
        self.map.values().next().map(|t| t.device().clone()).unwrap_or(Device::Cpu)
    }
}
