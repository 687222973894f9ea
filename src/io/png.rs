//! A small PNG writer (RGB8, stored deflate blocks, optional tEXt chunks) and image-tensor conversion.

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use std::path::Path;

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

fn adler32(data: &[u8]) -> u32 {
    let (mut a, mut b) = (1u32, 0u32);
    for &x in data {
        a = (a + x as u32) % 65521;
        b = (b + a) % 65521;
    }
    (b << 16) | a
}

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let start = out.len();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let crc = crc32(&out[start..]);
    out.extend_from_slice(&crc.to_be_bytes());
}

/// Encodes `rgb` (`width·height·3` bytes, row-major) as PNG with `text` key/value chunks.
pub fn encode_rgb8(width: usize, height: usize, rgb: &[u8], text: &[(&str, &str)]) -> Result<Vec<u8>> {
    if rgb.len() != width * height * 3 || width == 0 || height == 0 {
        bail!("png: {} bytes do not make a {width}×{height} RGB image", rgb.len());
    }
    let mut raw = Vec::with_capacity((width * 3 + 1) * height);
    for row in rgb.chunks(width * 3) {
        raw.push(0); // filter: none
        raw.extend_from_slice(row);
    }
    let mut z = vec![0x78, 0x01];
    let blocks: Vec<&[u8]> = raw.chunks(65535).collect();
    for (i, block) in blocks.iter().enumerate() {
        z.push(u8::from(i + 1 == blocks.len()));
        let len = block.len() as u16;
        z.extend_from_slice(&len.to_le_bytes());
        z.extend_from_slice(&(!len).to_le_bytes());
        z.extend_from_slice(block);
    }
    z.extend_from_slice(&adler32(&raw).to_be_bytes());
    let mut out = vec![0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A];
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&(width as u32).to_be_bytes());
    ihdr.extend_from_slice(&(height as u32).to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    chunk(&mut out, b"IHDR", &ihdr);
    for (k, v) in text {
        let mut t = k.as_bytes().to_vec();
        t.push(0);
        t.extend(v.chars().map(|c| if (c as u32) < 256 { c as u8 } else { b'?' }));
        chunk(&mut out, b"tEXt", &t);
    }
    chunk(&mut out, b"IDAT", &z);
    chunk(&mut out, b"IEND", &[]);
    Ok(out)
}

/// An image tensor `[1, 3, H, W]` or `[3, H, W]` in [-1, 1] → (width, height, RGB8), clamped and rounded.
pub fn tensor_to_rgb8(t: &Tensor) -> Result<(usize, usize, Vec<u8>)> {
    let t = match t.rank() {
        4 if t.dim(0)? == 1 => t.squeeze(0)?,
        3 => t.clone(),
        _ => bail!("an image tensor must be [1, 3, H, W] or [3, H, W], got {:?}", t.dims()),
    };
    let (c, h, w) = t.dims3()?;
    if c != 3 {
        bail!("an image tensor must have 3 channels, got {c}");
    }
    let v = ((t.to_dtype(DType::F32)?.clamp(-1f32, 1f32)? + 1.0)? * 127.5)?
        .round()?
        .permute((1, 2, 0))?
        .flatten_all()?
        .to_vec1::<f32>()?;
    Ok((w, h, v.into_iter().map(|x| x as u8).collect()))
}

/// Writes an image tensor as PNG, atomically.
pub fn save_tensor_png(path: &Path, t: &Tensor, text: &[(&str, &str)]) -> Result<()> {
    let (w, h, rgb) = tensor_to_rgb8(t)?;
    let bytes = encode_rgb8(w, h, &rgb, text)?;
    super::tensors::write_atomic(path, |f| Ok(std::io::Write::write_all(f, &bytes)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_and_adler_match_known_values() {
        assert_eq!(crc32(b"IEND"), 0xAE42_6082);
        assert_eq!(adler32(b"Wikipedia"), 0x11E6_0398);
    }
}
