//! NumPy `.npz` files (zip of `.npy` arrays), as `np.savez` writes them: what sd-scripts' latent caches use.

use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::Path;

/// An array's element data.
#[derive(Clone, Debug, PartialEq)]
pub enum NpyData {
    F32(Vec<f32>),
    F64(Vec<f64>),
    I64(Vec<i64>),
}

/// One array: shape and data (C order).
#[derive(Clone, Debug, PartialEq)]
pub struct NpyArray {
    pub shape: Vec<usize>,
    pub data: NpyData,
}

impl NpyArray {
    /// The values as f64 (any dtype).
    pub fn to_f64(&self) -> Vec<f64> {
        match &self.data {
            NpyData::F32(v) => v.iter().map(|&x| x as f64).collect(),
            NpyData::F64(v) => v.clone(),
            NpyData::I64(v) => v.iter().map(|&x| x as f64).collect(),
        }
    }
}

fn npy_bytes(a: &NpyArray) -> Vec<u8> {
    let (descr, body): (&str, Vec<u8>) = match &a.data {
        NpyData::F32(v) => ("<f4", v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        NpyData::F64(v) => ("<f8", v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        NpyData::I64(v) => ("<i8", v.iter().flat_map(|x| x.to_le_bytes()).collect()),
    };
    let shape = match a.shape.len() {
        0 => "()".to_string(),
        1 => format!("({},)", a.shape[0]),
        _ => format!("({})", a.shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")),
    };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    let total = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - total % 64) % 64));
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(&body);
    out
}

fn parse_npy(name: &str, bytes: &[u8]) -> Result<NpyArray> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        bail!("{name}: not a .npy array");
    }
    let (hlen, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 => (u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize, 12),
        v => bail!("{name}: unsupported .npy version {v}"),
    };
    let header = std::str::from_utf8(bytes.get(start..start + hlen).context("truncated header")?)?;
    let field = |key: &str| -> Option<&str> {
        let i = header.find(&format!("'{key}':"))? + key.len() + 3;
        Some(header[i..].trim_start())
    };
    let descr =
        field("descr").and_then(|s| s.strip_prefix('\'')).and_then(|s| s.split('\'').next()).context("no descr")?;
    if field("fortran_order").is_some_and(|s| s.starts_with("True")) {
        bail!("{name}: Fortran-ordered arrays are not supported");
    }
    let shape_s =
        field("shape").and_then(|s| s.strip_prefix('(')).and_then(|s| s.split(')').next()).context("no shape")?;
    let shape: Vec<usize> =
        shape_s.split(',').map(str::trim).filter(|s| !s.is_empty()).map(|s| s.parse()).collect::<Result<_, _>>()?;
    let n: usize = shape.iter().product();
    let body = &bytes[start + hlen..];
    let take =
        |size: usize| -> Result<&[u8]> { body.get(..n * size).with_context(|| format!("{name}: truncated data")) };
    let data = match descr {
        "<f4" => NpyData::F32(take(4)?.chunks(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect()),
        "<f2" => NpyData::F32(take(2)?.chunks(2).map(|c| half_to_f32(u16::from_le_bytes([c[0], c[1]]))).collect()),
        "<f8" => NpyData::F64(take(8)?.chunks(8).map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes"))).collect()),
        "<i8" => NpyData::I64(take(8)?.chunks(8).map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes"))).collect()),
        "<i4" => NpyData::I64(
            take(4)?.chunks(4).map(|c| i32::from_le_bytes(c.try_into().expect("4 bytes")) as i64).collect(),
        ),
        other => bail!("{name}: unsupported dtype {other}"),
    };
    Ok(NpyArray { shape, data })
}

fn half_to_f32(h: u16) -> f32 {
    let sign = if h & 0x8000 != 0 { -1.0 } else { 1.0 };
    let exp = ((h >> 10) & 0x1f) as i32;
    let frac = (h & 0x3ff) as f32;
    sign * match exp {
        0 => frac * 2f32.powi(-24),
        31 => {
            if frac == 0.0 {
                f32::INFINITY
            } else {
                f32::NAN
            }
        }
        e => (1.0 + frac / 1024.0) * 2f32.powi(e - 15),
    }
}

/// Writes arrays as an uncompressed `.npz`, atomically.
pub fn write_npz(path: &Path, arrays: &BTreeMap<String, NpyArray>) -> Result<()> {
    let mut buf = std::io::Cursor::new(Vec::new());
    {
        let mut z = zip::ZipWriter::new(&mut buf);
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored)
            .large_file(true);
        for (name, a) in arrays {
            z.start_file(format!("{name}.npy"), opts)?;
            z.write_all(&npy_bytes(a))?;
        }
        z.finish()?;
    }
    let bytes = buf.into_inner();
    crate::io::tensors::write_atomic(path, |f| Ok(f.write_all(&bytes)?))
}

/// Reads every array of an `.npz`.
pub fn read_npz(path: &Path) -> Result<BTreeMap<String, NpyArray>> {
    let file = std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let mut z =
        zip::ZipArchive::new(file).map_err(|e| anyhow::anyhow!("{}: not an .npz (zip) file: {e}", path.display()))?;
    let mut out = BTreeMap::new();
    for i in 0..z.len() {
        let mut f = z.by_index(i)?;
        let name = f.name()?.trim_end_matches(".npy").to_string();
        let mut bytes = Vec::new();
        f.read_to_end(&mut bytes)?;
        out.insert(name.clone(), parse_npy(&format!("{}:{name}", path.display()), &bytes)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npy_header_is_aligned_and_round_trips() {
        let a = NpyArray { shape: vec![2, 3], data: NpyData::F32(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]) };
        let b = npy_bytes(&a);
        let hlen = u16::from_le_bytes([b[8], b[9]]) as usize;
        assert_eq!((10 + hlen) % 64, 0);
        assert!(std::str::from_utf8(&b[10..10 + hlen])
            .unwrap()
            .starts_with("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }"));
        assert_eq!(parse_npy("t", &b).unwrap(), a);
        let one = NpyArray { shape: vec![2], data: NpyData::I64(vec![640, 480]) };
        let ob = npy_bytes(&one);
        let oh = u16::from_le_bytes([ob[8], ob[9]]) as usize;
        assert!(std::str::from_utf8(&ob[10..10 + oh])
            .unwrap()
            .contains("'descr': '<i8', 'fortran_order': False, 'shape': (2,)"));
        assert_eq!(parse_npy("o", &ob).unwrap(), one);
        assert_eq!(half_to_f32(0x3c00), 1.0);
        assert_eq!(half_to_f32(0xc000), -2.0);
    }
}
