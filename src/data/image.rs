//! Image files for training: decoding (png, jpg/jpeg, webp, bmp), OpenCV-style area resizing, trimming to the
//! bucket, flips and colour augmentation.

use crate::rng::Rng;
use anyhow::{Context, Result};
use std::path::Path;

/// The image extensions a dataset folder is scanned for.
pub const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "webp", "bmp"];

/// Whether `path` has an image extension (any case).
pub fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// An 8-bit RGB image.
#[derive(Clone, Debug, PartialEq)]
pub struct Rgb {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

/// Width and height from the file header (no full decode).
pub fn dimensions(path: &Path) -> Result<(usize, usize)> {
    let reader = image::ImageReader::open(path)
        .with_context(|| format!("{}: cannot open", path.display()))?
        .with_guessed_format()
        .with_context(|| format!("{}: cannot read", path.display()))?;
    let (w, h) =
        reader.into_dimensions().map_err(|e| anyhow::anyhow!("{}: not a readable image ({e})", path.display()))?;
    Ok((w as usize, h as usize))
}

/// Decodes a whole image; a truncated or corrupt file is an error naming it.
fn decode_image(path: &Path) -> Result<image::DynamicImage> {
    image::ImageReader::open(path)
        .with_context(|| format!("{}: cannot open", path.display()))?
        .with_guessed_format()
        .with_context(|| format!("{}: cannot read", path.display()))?
        .decode()
        .map_err(|e| anyhow::anyhow!("{}: truncated or corrupt image ({e})", path.display()))
}

/// Decodes a whole image to RGB8 (alpha dropped).
pub fn decode(path: &Path) -> Result<Rgb> {
    let img = decode_image(path)?.to_rgb8();
    let (w, h) = img.dimensions();
    Ok(Rgb { width: w as usize, height: h as usize, data: img.into_raw() })
}

/// Decodes a whole image once to RGB8 and its alpha channel as an image (the value in all three channels; opaque
/// when the file has none), so that the mask is resized, trimmed and flipped exactly as the picture (sd-scripts'
/// `alpha_mask`).
pub fn decode_with_alpha(path: &Path) -> Result<(Rgb, Rgb)> {
    let img = decode_image(path)?.to_rgba8();
    let (w, h) = img.dimensions();
    let (mut rgb, mut alpha) = (Vec::with_capacity((w * h * 3) as usize), Vec::with_capacity((w * h * 3) as usize));
    for p in img.into_raw().chunks_exact(4) {
        rgb.extend_from_slice(&p[..3]);
        alpha.extend_from_slice(&[p[3]; 3]);
    }
    let (width, height) = (w as usize, h as usize);
    Ok((Rgb { width, height, data: rgb }, Rgb { width, height, data: alpha }))
}

/// A mask image (from `decode_with_alpha`) as values in [0, 1], row-major.
pub fn mask_values(m: &Rgb) -> Vec<f32> {
    m.data.chunks_exact(3).map(|p| p[0] as f32 / 255.0).collect()
}

/// Per output index: (first source index, weights) along one axis.
fn axis_weights(src: usize, dst: usize) -> Vec<(usize, Vec<f32>)> {
    let scale = src as f64 / dst as f64;
    (0..dst)
        .map(|o| {
            if scale >= 1.0 {
                // area: integrate the source over [o·s, (o+1)·s)
                let (a, b) = (o as f64 * scale, (o + 1) as f64 * scale);
                let first = a.floor() as usize;
                let last = (b.ceil() as usize).min(src);
                let w: Vec<f32> =
                    (first..last).map(|i| ((b.min(i as f64 + 1.0) - a.max(i as f64)) / scale) as f32).collect();
                (first, w)
            } else {
                // upscaling: linear interpolation at pixel centres
                let x = ((o as f64 + 0.5) * scale - 0.5).max(0.0);
                let i = (x.floor() as usize).min(src - 1);
                let f = (x - i as f64) as f32;
                if i + 1 < src {
                    (i, vec![1.0 - f, f])
                } else {
                    (i, vec![1.0])
                }
            }
        })
        .collect()
}

/// Resizes like OpenCV's `INTER_AREA` (box-integrated downscaling; bilinear when enlarging).
pub fn resize_area(img: &Rgb, width: usize, height: usize) -> Rgb {
    if (width, height) == (img.width, img.height) {
        return img.clone();
    }
    let wx = axis_weights(img.width, width);
    let wy = axis_weights(img.height, height);
    // horizontal pass into f32 rows
    let mut tmp = vec![0f32; img.height * width * 3];
    for y in 0..img.height {
        let row = &img.data[y * img.width * 3..(y + 1) * img.width * 3];
        for (x, (first, ws)) in wx.iter().enumerate() {
            let mut acc = [0f32; 3];
            for (k, w) in ws.iter().enumerate() {
                let p = &row[(first + k) * 3..(first + k) * 3 + 3];
                for c in 0..3 {
                    acc[c] += w * p[c] as f32;
                }
            }
            tmp[(y * width + x) * 3..(y * width + x) * 3 + 3].copy_from_slice(&acc);
        }
    }
    let mut out = vec![0u8; height * width * 3];
    for (y, (first, ws)) in wy.iter().enumerate() {
        for x in 0..width * 3 {
            let mut acc = 0f32;
            for (k, w) in ws.iter().enumerate() {
                acc += w * tmp[(first + k) * width * 3 + x];
            }
            out[y * width * 3 + x] = acc.round().clamp(0.0, 255.0) as u8;
        }
    }
    Rgb { width, height, data: out }
}

/// Crops `img` to `w`×`h` at (`left`, `top`).
pub fn crop(img: &Rgb, left: usize, top: usize, w: usize, h: usize) -> Rgb {
    let mut data = Vec::with_capacity(w * h * 3);
    for y in top..top + h {
        data.extend_from_slice(&img.data[(y * img.width + left) * 3..(y * img.width + left + w) * 3]);
    }
    Rgb { width: w, height: h, data }
}

/// Resizes to `resized` then trims the excess to `bucket`: centred, or at a random offset with `random_crop`.
pub fn fit_to_bucket(
    img: &Rgb,
    resized: (usize, usize),
    bucket: (usize, usize),
    random_crop: bool,
    rng: &mut Rng,
) -> Rgb {
    let r = resize_area(img, resized.0.max(bucket.0), resized.1.max(bucket.1));
    let (ex, ey) = (r.width - bucket.0, r.height - bucket.1);
    let (left, top) = if random_crop { (rng.below(ex + 1), rng.below(ey + 1)) } else { (ex / 2, ey / 2) };
    crop(&r, left, top, bucket.0, bucket.1)
}

/// Mirrors an image left–right.
pub fn flip_horizontal(img: &Rgb) -> Rgb {
    let mut data = Vec::with_capacity(img.data.len());
    for y in 0..img.height {
        for x in (0..img.width).rev() {
            data.extend_from_slice(&img.data[(y * img.width + x) * 3..(y * img.width + x) * 3 + 3]);
        }
    }
    Rgb { width: img.width, height: img.height, data }
}

/// sd-scripts' `color_aug`: with p = 0.33, either a hue shift of ±8 (OpenCV 8-bit HSV, hue modulo 180) or a gamma
/// in [0.95, 1.05] applied to the raw 0–255 values (`clip(x^g, 0, 255)`, sd-scripts' quirk), 50/50.
pub fn color_aug(img: &Rgb, rng: &mut Rng) -> Rgb {
    if rng.uniform() >= 0.33 {
        return img.clone();
    }
    let mut out = img.clone();
    if rng.uniform() < 0.5 {
        let shift = rng.below(17) as i32 - 8;
        for p in out.data.chunks_mut(3) {
            let (h, s, v) = rgb_to_hsv8(p[0], p[1], p[2]);
            let h = (h as i32 + shift).rem_euclid(180) as u8;
            let (r, g, b) = hsv8_to_rgb(h, s, v);
            p.copy_from_slice(&[r, g, b]);
        }
    } else {
        let gamma = 0.95 + 0.1 * rng.uniform();
        for x in out.data.iter_mut() {
            *x = (*x as f64).powf(gamma).clamp(0.0, 255.0) as u8;
        }
    }
    out
}

/// OpenCV's 8-bit RGB→HSV (H in 0..180, S and V in 0..255).
fn rgb_to_hsv8(r: u8, g: u8, b: u8) -> (u8, u8, u8) {
    let (r, g, b) = (r as f32, g as f32, b as f32);
    let v = r.max(g).max(b);
    let min = r.min(g).min(b);
    let d = v - min;
    let s = if v > 0.0 { 255.0 * d / v } else { 0.0 };
    let mut h = if d == 0.0 {
        0.0
    } else if v == r {
        60.0 * (g - b) / d
    } else if v == g {
        120.0 + 60.0 * (b - r) / d
    } else {
        240.0 + 60.0 * (r - g) / d
    };
    if h < 0.0 {
        h += 360.0;
    }
    ((h / 2.0).round() as u8 % 180, s.round() as u8, v as u8)
}

/// OpenCV's 8-bit HSV→RGB.
fn hsv8_to_rgb(h: u8, s: u8, v: u8) -> (u8, u8, u8) {
    let (h, s, v) = (h as f32 * 2.0, s as f32 / 255.0, v as f32);
    let c = v * s;
    let hp = h / 60.0;
    let x = c * (1.0 - ((hp % 2.0) - 1.0).abs());
    let (r, g, b) = match hp as u32 {
        0 => (c, x, 0.0),
        1 => (x, c, 0.0),
        2 => (0.0, c, x),
        3 => (0.0, x, c),
        4 => (x, 0.0, c),
        _ => (c, 0.0, x),
    };
    let m = v - c;
    let q = |x: f32| (x + m).round().clamp(0.0, 255.0) as u8;
    (q(r), q(g), q(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn img(w: usize, h: usize, f: impl Fn(usize, usize) -> [u8; 3]) -> Rgb {
        let mut data = Vec::new();
        for y in 0..h {
            for x in 0..w {
                data.extend_from_slice(&f(x, y));
            }
        }
        Rgb { width: w, height: h, data }
    }

    #[test]
    fn area_downscale_averages_boxes() {
        // 4×2 → 2×1: each output pixel is the mean of a 2×2 box
        let i = img(4, 2, |x, y| [(x * 10 + y * 100) as u8, 0, 255]);
        let r = resize_area(&i, 2, 1);
        assert_eq!(r.data, vec![55, 0, 255, 75, 0, 255]);
        // 3 → 2 (scale 1.5): out0 = (p0 + 0.5·p1)/1.5, out1 = (0.5·p1 + p2)/1.5
        let i = img(3, 1, |x, _| [[0u8, 30, 90][x], 0, 0]);
        let r = resize_area(&i, 2, 1);
        assert_eq!(r.data[0], 10);
        assert_eq!(r.data[3], 70);
    }

    #[test]
    fn fit_trims_centred_and_flip_mirrors() {
        let i = img(10, 4, |x, _| [x as u8, 0, 0]);
        let out = fit_to_bucket(&i, (10, 4), (6, 4), false, &mut Rng::new(0));
        assert_eq!(out.width, 6);
        assert_eq!(out.data[0], 2, "centre trim drops 2 columns each side");
        let f = flip_horizontal(&out);
        assert_eq!(f.data[0], 7);
    }

    #[test]
    fn hsv_round_trip_is_close() {
        for &(r, g, b) in &[(255u8, 0u8, 0u8), (10, 200, 30), (90, 90, 90), (0, 0, 255), (250, 240, 10)] {
            let (h, s, v) = rgb_to_hsv8(r, g, b);
            let (r2, g2, b2) = hsv8_to_rgb(h, s, v);
            for (a, b) in [(r, r2), (g, g2), (b, b2)] {
                assert!((a as i32 - b as i32).abs() <= 3, "{r},{g},{b} → {r2},{g2},{b2}");
            }
        }
    }
}
