//! Script bindings for tensors: files, construction, properties, arithmetic and reductions.

use super::errors::{rt, RhaiResult};
use crate::device::{device_name, dtype_name, parse_device, parse_dtype};
use crate::io::tensors;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use rhai::{Array, Dynamic, Engine, Map};
use std::collections::HashMap;
use std::path::Path;

pub use crate::rng::randn_vec;

fn shape_of(a: &Array) -> Result<Vec<usize>> {
    a.iter()
        .map(|d| match d.as_int() {
            Ok(v) if v >= 0 => Ok(v as usize),
            _ => bail!("a shape must be an array of non-negative integers, got {d:?}"),
        })
        .collect()
}

/// Flattens nested script arrays of numbers, returning the values and the shape.
fn flatten(v: &Dynamic, out: &mut Vec<f64>, shape: &mut Vec<usize>, depth: usize) -> Result<()> {
    if let Some(a) = v.read_lock::<Array>() {
        if shape.len() == depth {
            shape.push(a.len());
        } else if shape[depth] != a.len() {
            bail!("tensor(...): ragged nested arrays (lengths {} and {})", shape[depth], a.len());
        }
        for x in a.iter() {
            flatten(x, out, shape, depth + 1)?;
        }
        return Ok(());
    }
    let x = v
        .as_float()
        .or_else(|_| v.as_int().map(|i| i as f64))
        .map_err(|t| anyhow::anyhow!("tensor(...): expected numbers, got {t}"))?;
    out.push(x);
    Ok(())
}

/// Builds a tensor from nested arrays.
pub fn from_array(a: &Array, dtype: DType) -> Result<Tensor> {
    let mut vals = Vec::new();
    let mut shape = Vec::new();
    flatten(&Dynamic::from_array(a.clone()), &mut vals, &mut shape, 0)?;
    Ok(Tensor::from_vec(vals, shape.as_slice(), &Device::Cpu)?.to_dtype(dtype)?)
}

fn to_array(t: &Tensor) -> Result<Dynamic> {
    if t.elem_count() > 1_000_000 {
        bail!("to_array: tensor has {} elements; convert smaller tensors (≤ 1,000,000)", t.elem_count());
    }
    let is_int = matches!(t.dtype(), DType::I64 | DType::U32 | DType::U8);
    fn build(vals: &[f64], shape: &[usize], is_int: bool) -> Dynamic {
        if shape.is_empty() {
            return if is_int { Dynamic::from_int(vals[0] as i64) } else { Dynamic::from_float(vals[0]) };
        }
        let step: usize = shape[1..].iter().product();
        let arr: Array = (0..shape[0]).map(|i| build(&vals[i * step..(i + 1) * step], &shape[1..], is_int)).collect();
        Dynamic::from_array(arr)
    }
    let vals = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    Ok(build(&vals, t.dims(), is_int))
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// `load_tensors(path)`.
pub fn load_tensors(path: &str) -> Result<Map> {
    let f = tensors::read_any(Path::new(path), None, &Device::Cpu)?;
    Ok(f.tensors.into_iter().map(|(k, v)| (k.into(), Dynamic::from(v))).collect())
}

/// `save_tensors(map, path)`.
pub fn save_tensors(map: &Map, path: &str) -> Result<()> {
    let mut out = HashMap::new();
    for (k, v) in map {
        let t = v
            .clone()
            .try_cast::<Tensor>()
            .with_context(|| format!("save_tensors: value `{k}` is a {}, expected a Tensor", v.type_name()))?;
        out.insert(k.to_string(), t);
    }
    tensors::write_safetensors(Path::new(path), &out, &HashMap::new())
}

fn binop(a: &Tensor, b: &Tensor, op: &str) -> Result<Tensor> {
    let b = if b.dtype() != a.dtype() { b.to_dtype(a.dtype())? } else { b.clone() };
    let b = if b.device().same_device(a.device()) { b } else { b.to_device(a.device())? };
    Ok(match op {
        "+" => a.broadcast_add(&b)?,
        "-" => a.broadcast_sub(&b)?,
        "*" => a.broadcast_mul(&b)?,
        "/" => a.broadcast_div(&b)?,
        _ => unreachable!("operators are registered below"),
    })
}

fn scalar_op(a: &Tensor, x: f64, op: &str, tensor_first: bool) -> Result<Tensor> {
    Ok(match (op, tensor_first) {
        ("+", _) => (a + x)?,
        ("*", _) => (a * x)?,
        ("-", true) => (a - x)?,
        ("-", false) => (a.neg()? + x)?,
        ("/", true) => (a / x)?,
        ("/", false) => (a.recip()? * x)?,
        _ => unreachable!("operators are registered below"),
    })
}

/// Registers the Tensor type and the tensor functions.
pub fn register(engine: &mut Engine) {
    engine.register_type_with_name::<Tensor>("Tensor");
    engine.register_fn("load_tensors", |p: &str| rt(load_tensors(p)));
    engine.register_fn("save_tensors", |m: Map, p: &str| rt(save_tensors(&m, p)));
    engine.register_fn("randn", |shape: Array, seed: i64| -> RhaiResult<Tensor> {
        rt((|| {
            let s = shape_of(&shape)?;
            let n = s.iter().product();
            Ok(Tensor::from_vec(randn_vec(n, seed as u64), s.as_slice(), &Device::Cpu)?)
        })())
    });
    engine.register_fn("tensor", |a: Array| rt(from_array(&a, DType::F32)));
    engine.register_fn("tensor", |a: Array, dtype: &str| rt(parse_dtype(dtype).and_then(|d| from_array(&a, d))));
    engine.register_get("shape", |t: &mut Tensor| -> Array {
        t.dims().iter().map(|&d| Dynamic::from_int(d as i64)).collect()
    });
    engine.register_get("dtype", |t: &mut Tensor| dtype_name(t.dtype()).to_string());
    engine.register_get("device", |t: &mut Tensor| device_name(t.device()));
    engine.register_fn("to_dtype", |t: &mut Tensor, d: &str| rt(parse_dtype(d).and_then(|d| Ok(t.to_dtype(d)?))));
    engine.register_fn("to_device", |t: &mut Tensor, d: &str| rt(parse_device(d).and_then(|d| Ok(t.to_device(&d)?))));
    engine.register_fn("mean", |t: &mut Tensor| {
        rt(t.to_dtype(DType::F64).and_then(|x| x.mean_all()).map_err(Into::into).and_then(|x| scalar(&x)))
    });
    engine.register_fn("sum", |t: &mut Tensor| {
        rt(t.to_dtype(DType::F64).and_then(|x| x.sum_all()).map_err(Into::into).and_then(|x| scalar(&x)))
    });
    engine.register_fn("abs_max", |t: &mut Tensor| {
        rt(t.to_dtype(DType::F64)
            .and_then(|x| x.abs()?.flatten_all()?.max(0))
            .map_err(Into::into)
            .and_then(|x| scalar(&x)))
    });
    engine.register_fn("abs", |t: &mut Tensor| rt(t.abs().map_err(Into::into)));
    engine.register_fn("to_array", |t: &mut Tensor| rt(to_array(t)));
    engine.register_fn("to_string", |t: &mut Tensor| {
        format!("Tensor({:?}, {}, {})", t.dims(), dtype_name(t.dtype()), device_name(t.device()))
    });
    engine.register_fn("to_debug", |t: &mut Tensor| {
        format!("Tensor({:?}, {}, {})", t.dims(), dtype_name(t.dtype()), device_name(t.device()))
    });
    for op in ["+", "-", "*", "/"] {
        engine.register_fn(op, move |a: Tensor, b: Tensor| rt(binop(&a, &b, op)));
        engine.register_fn(op, move |a: Tensor, x: f64| rt(scalar_op(&a, x, op, true)));
        engine.register_fn(op, move |x: f64, a: Tensor| rt(scalar_op(&a, x, op, false)));
        engine.register_fn(op, move |a: Tensor, x: i64| rt(scalar_op(&a, x as f64, op, true)));
        engine.register_fn(op, move |x: i64, a: Tensor| rt(scalar_op(&a, x as f64, op, false)));
    }
    engine.register_fn("read_metadata", |p: &str| -> RhaiResult<Map> {
        rt(tensors::read_metadata(Path::new(p))
            .map(|m| m.into_iter().map(|(k, v)| (k.into(), Dynamic::from(v))).collect()))
    });
}
