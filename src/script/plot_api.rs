//! Script bindings for plots: `plot(values)`, `plot(#{ series, title, x_label, y_label })`, `p.save(path)`.

use super::errors::{rt, RhaiResult};
use super::opts::Opts;
use crate::io::plot::Plot;
use anyhow::{bail, Result};
use rhai::{Array, Engine, Map};
use std::path::Path;

const PLOT_KEYS: &[&str] = &["series", "title", "x_label", "y_label"];

fn numbers(values: &Array) -> Result<Vec<f64>> {
    values
        .iter()
        .map(|v| {
            v.as_float()
                .or_else(|_| v.as_int().map(|i| i as f64))
                .map_err(|t| anyhow::anyhow!("plot: expected numbers, got {t}"))
        })
        .collect()
}

fn from_map(m: &Map) -> Result<Plot> {
    let o = Opts::new(m, "plot", PLOT_KEYS)?;
    let mut p = Plot {
        title: o.string("title")?.unwrap_or_default(),
        x_label: o.string("x_label")?.unwrap_or_else(|| "step".into()),
        y_label: o.string("y_label")?.unwrap_or_default(),
        series: Vec::new(),
    };
    let Some(series) = m.get("series") else {
        bail!("plot: `series` is required (an array of numbers, arrays, or a map of name → array)")
    };
    if let Some(named) = series.read_lock::<Map>() {
        for (name, v) in named.iter() {
            let a = v.read_lock::<Array>().ok_or_else(|| anyhow::anyhow!("plot: series `{name}` must be an array"))?;
            p.series.push((name.to_string(), numbers(&a)?));
        }
    } else if let Some(list) = series.read_lock::<Array>() {
        if list.iter().all(|v| v.is_array()) {
            for v in list.iter() {
                p.series.push((String::new(), numbers(&v.read_lock::<Array>().expect("checked array"))?));
            }
        } else {
            p.series.push((String::new(), numbers(&list)?));
        }
    } else {
        bail!("plot: `series` must be an array or a map of name → array");
    }
    Ok(p)
}

pub fn register(engine: &mut Engine) {
    engine.register_type_with_name::<Plot>("Plot");
    engine.register_fn("plot", |values: Array| -> RhaiResult<Plot> { rt(numbers(&values).map(Plot::of)) });
    engine.register_fn("plot", |m: Map| -> RhaiResult<Plot> { rt(from_map(&m)) });
    engine.register_fn("save", |p: &mut Plot, path: &str| rt(p.save(Path::new(path))));
    engine.register_fn("to_image", |p: &mut Plot| rt(p.image(800, 450)));
    engine.register_fn("to_svg", |p: &mut Plot| rt(p.svg(800, 450)));
    let text = |p: &mut Plot| {
        format!(
            "Plot({}{} series)",
            if p.title.is_empty() { String::new() } else { format!("{}, ", p.title) },
            p.series.len()
        )
    };
    engine.register_fn("to_string", text);
    engine.register_fn("to_debug", text);
}
