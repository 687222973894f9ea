//! A small generated dataset (coloured shapes with captions) in kohya's folder layout, for quickstarts and tests.

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

const COLORS: &[(&str, [u8; 3])] =
    &[("red", [220, 40, 40]), ("green", [40, 180, 60]), ("blue", [40, 70, 220]), ("yellow", [230, 210, 40])];
const SHAPES: &[&str] = &["circle", "square"];

/// Writes `count` `size`×`size` PNGs with `.txt` captions into `dir/<repeats>_<concept>/` and returns that folder's
/// parent (the training folder). Existing files are left alone.
pub fn write_shapes(dir: &Path, concept: &str, repeats: usize, count: usize, size: u32, seed: u64) -> Result<PathBuf> {
    let folder = dir.join(format!("{repeats}_{concept}"));
    std::fs::create_dir_all(&folder).with_context(|| format!("{}: cannot create", folder.display()))?;
    let mut rng = crate::rng::Rng::new(seed);
    for i in 0..count {
        let (cname, color) = COLORS[i % COLORS.len()];
        let shape = SHAPES[(i / COLORS.len()) % SHAPES.len()];
        let img_path = folder.join(format!("{i:03}.png"));
        if !img_path.exists() {
            let (cx, cy) = (size as f64 * (0.35 + 0.3 * rng.uniform()), size as f64 * (0.35 + 0.3 * rng.uniform()));
            let r = size as f64 * 0.22;
            let img = image::RgbImage::from_fn(size, size, |x, y| {
                let (dx, dy) = (x as f64 - cx, y as f64 - cy);
                let inside =
                    if shape == "circle" { dx * dx + dy * dy <= r * r } else { dx.abs() <= r && dy.abs() <= r };
                if inside {
                    image::Rgb(color)
                } else {
                    image::Rgb([235, 235, 225])
                }
            });
            img.save(&img_path).with_context(|| format!("{}: cannot write", img_path.display()))?;
        }
        let cap = folder.join(format!("{i:03}.txt"));
        if !cap.exists() {
            std::fs::write(&cap, format!("{concept}, a {cname} {shape}, plain background"))?;
        }
    }
    Ok(dir.to_path_buf())
}
