//! Option maps from scripts: typed access with errors that name the key and list the accepted ones.

use anyhow::{bail, Result};
use rhai::{Dynamic, Map};

/// A script option map checked against the accepted keys.
pub struct Opts<'a> {
    map: &'a Map,
    what: &'a str,
}

impl<'a> Opts<'a> {
    /// Fails on keys outside `allowed`.
    pub fn new(map: &'a Map, what: &'a str, allowed: &[&str]) -> Result<Self> {
        for k in map.keys() {
            if !allowed.contains(&k.as_str()) {
                bail!("{what}: unknown option `{k}`; accepted options are: {}", allowed.join(", "));
            }
        }
        Ok(Self { map, what })
    }

    fn get(&self, key: &str) -> Option<&Dynamic> {
        self.map.get(key).filter(|v| !v.is_unit())
    }

    pub fn string(&self, key: &str) -> Result<Option<String>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) if v.is_string() => Ok(Some(v.clone().into_string().expect("checked string"))),
            Some(v) => bail!("{}: option `{key}` must be a string, got {}", self.what, v.type_name()),
        }
    }

    pub fn bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .map_err(|t| anyhow::anyhow!("{}: option `{key}` must be true or false, got {t}", self.what)),
        }
    }

    pub fn int(&self, key: &str) -> Result<Option<i64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_int()
                .map(Some)
                .map_err(|t| anyhow::anyhow!("{}: option `{key}` must be an integer, got {t}", self.what)),
        }
    }

    /// A number (integers accepted).
    pub fn float(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_float()
                .or_else(|_| v.as_int().map(|i| i as f64))
                .map(Some)
                .map_err(|t| anyhow::anyhow!("{}: option `{key}` must be a number, got {t}", self.what)),
        }
    }

    /// A Tensor.
    pub fn tensor(&self, key: &str) -> Result<Option<candle_core::Tensor>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.clone().try_cast::<candle_core::Tensor>() {
                Some(t) => Ok(Some(t)),
                None => bail!("{}: option `{key}` must be a Tensor, got {}", self.what, v.type_name()),
            },
        }
    }

    /// A non-negative integer.
    pub fn usize(&self, key: &str) -> Result<Option<usize>> {
        match self.int(key)? {
            Some(v) if v < 0 => bail!("{}: option `{key}` must be ≥ 0, got {v}", self.what),
            v => Ok(v.map(|v| v as usize)),
        }
    }
}
