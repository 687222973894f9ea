//! Data-pipeline benchmark: 1,000 generated 1024×768 JPEGs scanned and bucketed, decoded + resized + trimmed
//! (1 and 2 loader threads), and latent caching with tiny-sd15's VAE. Prints a markdown table.
//!
//! `cargo bench --bench data` (set SDTUNE_BENCH_IMAGES to change the count).

use sdtune::data::config::{General, Resolution};
use sdtune::data::{cache, loader::Loader, open, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

fn generate(dir: &Path, n: usize) {
    let concept = dir.join("1_bench");
    std::fs::create_dir_all(&concept).unwrap();
    for i in 0..n {
        let p = concept.join(format!("img{i:04}.jpg"));
        if p.exists() {
            continue;
        }
        let img = image::RgbImage::from_fn(1024, 768, |x, y| {
            let v = (x.wrapping_mul(31) ^ y.wrapping_mul(17)).wrapping_add(i as u32 * 7);
            image::Rgb([(v % 256) as u8, ((x + y) % 256) as u8, ((x * y + i as u32) % 256) as u8])
        });
        let file = std::fs::File::create(&p).unwrap();
        let mut enc = image::codecs::jpeg::JpegEncoder::new_with_quality(std::io::BufWriter::new(file), 90);
        enc.encode_image(&img).unwrap();
    }
}

fn main() {
    let n: usize = std::env::var("SDTUNE_BENCH_IMAGES").ok().and_then(|v| v.parse().ok()).unwrap_or(1000);
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target").join(format!("bench-data-{n}"));
    generate(&dir, n);
    let opts = OpenOptions {
        call: General {
            resolution: Some(Resolution::Square(512)),
            enable_bucket: Some(true),
            batch_size: Some(1),
            ..Default::default()
        },
        ..Default::default()
    };
    let t = Instant::now();
    let group = open(&dir, &opts).unwrap();
    let scan = t.elapsed().as_secs_f64();
    let ds = Arc::new(group.datasets.into_iter().next().unwrap());
    let batches = ds.epoch_batches(0, 0);
    let mut rows = vec![("scan + bucket (headers only)", n, scan)];
    for workers in [1, 2] {
        let t = Instant::now();
        let mut count = 0;
        for b in Loader::start(ds.clone(), batches.clone(), Default::default(), 0, workers, 4) {
            count += b.unwrap().len();
        }
        let name = if workers == 1 {
            "decode + resize (INTER_AREA) + trim, 1 thread"
        } else {
            "decode + resize (INTER_AREA) + trim, 2 threads"
        };
        rows.push((name, count, t.elapsed().as_secs_f64()));
    }
    let model_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-sd15");
    let model = sdtune::models::StableDiffusion::load(&model_dir, &Default::default()).unwrap();
    let m = 100.min(n);
    let mut sub =
        sdtune::data::dataset::Dataset { cfg: ds.cfg.clone(), images: ds.images[..m].to_vec(), problems: Vec::new() };
    sub.cfg.subsets[0].flip_aug = false;
    let t = Instant::now();
    let (_, stats) = cache::cache_latents(&sub, &model, 4, false, 0).unwrap();
    rows.push((
        "latent cache: decode + resize + tiny-sd15 VAE encode (batch 4)",
        stats.encoded,
        t.elapsed().as_secs_f64(),
    ));
    let bucket = ds.images[0].placement;
    println!(
        "images: {n} JPEG 1024x768 (quality 90) -> bucket {}x{} (resized {}x{})",
        bucket.bucket.0, bucket.bucket.1, bucket.resized.0, bucket.resized.1
    );
    println!("| stage | images | seconds | images/s |");
    println!("|---|---|---|---|");
    for (name, count, secs) in rows {
        println!("| {name} | {count} | {secs:.2} | {:.1} |", count as f64 / secs);
    }
}
