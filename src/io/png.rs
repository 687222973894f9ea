//! PNG files: RGB8 images with text chunks (A1111's `parameters`), and image-tensor conversion.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::path::Path;

/// An 8-bit RGB image with optional text metadata.
#[derive(Clone, Debug)]
pub struct Image {
    pub width: usize,
    pub height: usize,
    /// `width·height·3` bytes, row-major.
    pub rgb: Vec<u8>,
    /// `tEXt`/`iTXt` chunks, in order (A1111 puts its generation settings under `parameters`).
    pub text: Vec<(String, String)>,
}

impl Image {
    /// From a tensor `[1, 3, H, W]` or `[3, H, W]` in [-1, 1] (clamped, `((x+1)·127.5).round()`).
    pub fn from_tensor(t: &Tensor) -> Result<Self> {
        let t = match t.rank() {
            4 if t.dim(0)? == 1 => t.squeeze(0)?,
            3 => t.clone(),
            _ => bail!("an image tensor must be [1, 3, H, W] or [3, H, W], got {:?}", t.dims()),
        };
        let (c, h, w) = t.dims3()?;
        if c != 3 {
            bail!("an image tensor must have 3 channels, got {c}");
        }
        let v = ((t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.clamp(-1f32, 1f32)? + 1.0)? * 127.5)?
            .round()?
            .permute((1, 2, 0))?
            .flatten_all()?
            .to_vec1::<f32>()?;
        Ok(Self { width: w, height: h, rgb: v.into_iter().map(|x| x as u8).collect(), text: Vec::new() })
    }

    /// `[1, 3, H, W]` f32 in [-1, 1].
    pub fn to_tensor(&self, device: &Device) -> Result<Tensor> {
        let v: Vec<f32> = self.rgb.iter().map(|&b| b as f32 / 127.5 - 1.0).collect();
        Ok(Tensor::from_vec(v, (self.height, self.width, 3), &Device::Cpu)?
            .permute((2, 0, 1))?
            .unsqueeze(0)?
            .to_device(device)?)
    }

    /// The value of text chunk `key`.
    pub fn text_value(&self, key: &str) -> Option<&str> {
        self.text.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// Encodes as PNG (text chunks as iTXt so that any UTF-8 survives).
    pub fn encode(&self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut out, self.width as u32, self.height as u32);
            enc.set_color(png::ColorType::Rgb);
            enc.set_depth(png::BitDepth::Eight);
            for (k, v) in &self.text {
                if v.is_ascii() {
                    enc.add_text_chunk(k.clone(), v.clone())?;
                } else {
                    enc.add_itxt_chunk(k.clone(), v.clone())?;
                }
            }
            let mut w = enc.write_header()?;
            w.write_image_data(&self.rgb)?;
        }
        Ok(out)
    }

    /// Writes a PNG atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let bytes = self.encode()?;
        super::tensors::write_atomic(path, |f| Ok(std::io::Write::write_all(f, &bytes)?))
    }

    /// Reads a PNG (any bit depth or colour type is converted to RGB8), keeping its text chunks.
    pub fn load(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
        let mut dec = png::Decoder::new(std::io::BufReader::new(file));
        dec.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
        let mut reader = dec.read_info().map_err(|e| anyhow::anyhow!("{}: not a readable PNG: {e}", path.display()))?;
        let mut buf = vec![0; reader.output_buffer_size().context("PNG too large")?];
        let info =
            reader.next_frame(&mut buf).map_err(|e| anyhow::anyhow!("{}: corrupt PNG data: {e}", path.display()))?;
        let (w, h) = (info.width as usize, info.height as usize);
        let px = &buf[..info.buffer_size()];
        let rgb: Vec<u8> = match info.color_type {
            png::ColorType::Rgb => px.to_vec(),
            png::ColorType::Rgba => px.chunks(4).flat_map(|p| [p[0], p[1], p[2]]).collect(),
            png::ColorType::Grayscale => px.iter().flat_map(|&g| [g, g, g]).collect(),
            png::ColorType::GrayscaleAlpha => px.chunks(2).flat_map(|p| [p[0], p[0], p[0]]).collect(),
            png::ColorType::Indexed => bail!("{}: unexpanded palette PNG", path.display()),
        };
        let pinfo = reader.info();
        let mut text: Vec<(String, String)> =
            pinfo.uncompressed_latin1_text.iter().map(|t| (t.keyword.clone(), t.text.clone())).collect();
        for t in &pinfo.utf8_text {
            if let Ok(v) = t.get_text() {
                text.push((t.keyword.clone(), v));
            }
        }
        Ok(Self { width: w, height: h, rgb, text })
    }
}
