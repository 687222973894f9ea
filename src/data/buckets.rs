//! Aspect-ratio bucketing exactly as sd-scripts v0.8.7 (`make_bucket_resolutions`, `BucketManager`,
//! `get_crop_ltrb`).

use anyhow::{bail, Result};

/// Bucket options of a dataset.
#[derive(Clone, Debug, PartialEq)]
pub struct BucketConfig {
    /// `resolution` (W, H): its area is the bucket area.
    pub resolution: (usize, usize),
    pub enable_bucket: bool,
    pub min_bucket_reso: usize,
    pub max_bucket_reso: usize,
    pub bucket_reso_steps: usize,
    pub bucket_no_upscale: bool,
}

impl Default for BucketConfig {
    fn default() -> Self {
        Self {
            resolution: (512, 512),
            enable_bucket: false,
            min_bucket_reso: 256,
            max_bucket_reso: 1024,
            bucket_reso_steps: 64,
            bucket_no_upscale: false,
        }
    }
}

/// The predefined bucket resolutions for `max_reso`, sorted by (w, h).
pub fn make_bucket_resolutions(
    max_reso: (usize, usize),
    min_size: usize,
    max_size: usize,
    divisible: usize,
) -> Vec<(usize, usize)> {
    let max_area = max_reso.0 * max_reso.1;
    let side = ((max_area as f64).sqrt() as usize / divisible) * divisible;
    let mut resos = std::collections::BTreeSet::new();
    resos.insert((side, side));
    let mut w = min_size;
    while w <= max_size {
        let h = max_size.min(((max_area / w) / divisible) * divisible);
        if h >= min_size {
            resos.insert((w, h));
            resos.insert((h, w));
        }
        w += divisible;
    }
    resos.into_iter().collect()
}

/// Where an image goes: its bucket, the size it is resized to before trimming, and the aspect-ratio error.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Placement {
    pub bucket: (usize, usize),
    pub resized: (usize, usize),
    pub ar_error: f64,
}

/// Python's `int(x + 0.5)` for non-negative x.
fn round_half_up(x: f64) -> usize {
    (x + 0.5) as usize
}

/// Chooses buckets for image sizes.
pub struct BucketManager {
    pub cfg: BucketConfig,
    /// Predefined resolutions (empty with `bucket_no_upscale`, where buckets come from the images).
    pub predefined: Vec<(usize, usize)>,
}

impl BucketManager {
    pub fn new(cfg: &BucketConfig) -> Result<Self> {
        let (w, h) = cfg.resolution;
        if w == 0 || h == 0 || cfg.bucket_reso_steps == 0 {
            bail!("resolution {w}x{h} and bucket_reso_steps {} must be positive", cfg.bucket_reso_steps);
        }
        let predefined = if !cfg.enable_bucket {
            vec![cfg.resolution]
        } else if cfg.bucket_no_upscale {
            Vec::new()
        } else {
            if cfg.min_bucket_reso > cfg.max_bucket_reso {
                bail!("min_bucket_reso {} is larger than max_bucket_reso {}", cfg.min_bucket_reso, cfg.max_bucket_reso);
            }
            make_bucket_resolutions(cfg.resolution, cfg.min_bucket_reso, cfg.max_bucket_reso, cfg.bucket_reso_steps)
        };
        Ok(Self { cfg: cfg.clone(), predefined })
    }

    /// The bucket of an image of `w`×`h` (sd-scripts' `select_bucket`).
    pub fn select(&self, w: usize, h: usize) -> Placement {
        let ar = w as f64 / h as f64;
        if !self.cfg.enable_bucket {
            let (bw, bh) = self.cfg.resolution;
            let bar = bw as f64 / bh as f64;
            let scale = if ar > bar { bh as f64 / h as f64 } else { bw as f64 / w as f64 };
            let resized = (round_half_up(w as f64 * scale), round_half_up(h as f64 * scale));
            return Placement { bucket: (bw, bh), resized, ar_error: bar - ar };
        }
        if !self.cfg.bucket_no_upscale {
            if self.predefined.contains(&(w, h)) {
                return Placement { bucket: (w, h), resized: (w, h), ar_error: 0.0 };
            }
            let (bucket, bar) = self
                .predefined
                .iter()
                .map(|&(bw, bh)| ((bw, bh), bw as f64 / bh as f64))
                .fold(None::<((usize, usize), f64)>, |best, (b, bar)| match best {
                    Some((_, best_ar)) if (best_ar - ar).abs() <= (bar - ar).abs() => best,
                    _ => Some((b, bar)),
                })
                .expect("at least one predefined bucket");
            let scale = if ar > bar { bucket.1 as f64 / h as f64 } else { bucket.0 as f64 / w as f64 };
            let resized = (round_half_up(w as f64 * scale), round_half_up(h as f64 * scale));
            return Placement { bucket, resized, ar_error: bar - ar };
        }
        let (rw0, rh0) = self.cfg.resolution;
        let max_area = (rw0 * rh0) as f64;
        let steps = self.cfg.bucket_reso_steps;
        let resized = if (w * h) as f64 > max_area {
            let rw = (max_area * ar).sqrt();
            let rh = max_area / rw;
            let round = |x: f64| {
                let v = round_half_up(x);
                v - v % steps
            };
            let b_w = round(rw);
            let b_h = round(rh);
            let ar_a = b_w as f64 / round(b_w as f64 / ar) as f64;
            let ar_b = round(b_h as f64 * ar) as f64 / b_h as f64;
            if (ar_a - ar).abs() < (ar_b - ar).abs() {
                (b_w, round_half_up(b_w as f64 / ar))
            } else {
                (round_half_up(b_h as f64 * ar), b_h)
            }
        } else {
            (w, h)
        };
        let bucket = (resized.0 - resized.0 % steps, resized.1 - resized.1 % steps);
        Placement { bucket, resized, ar_error: bucket.0 as f64 / bucket.1 as f64 - ar }
    }
}

/// SDXL's crop conditioning as sd-scripts computes it (letter-box style, not the real trim):
/// `(left, top, right, bottom)` for an image of `original` size placed in `bucket`.
pub fn crop_ltrb(bucket: (usize, usize), original: (usize, usize)) -> (f64, f64, f64, f64) {
    let (bw, bh) = (bucket.0 as f64, bucket.1 as f64);
    let image_ar = original.0 as f64 / original.1 as f64;
    let bucket_ar = bw / bh;
    let (rw, rh) = if bucket_ar > image_ar { (bh * image_ar, bh) } else { (bw, bw / image_ar) };
    let left = ((bw - rw) / 2.0).floor();
    let top = ((bh - rh) / 2.0).floor();
    (left, top, left + rw, top + rh)
}

/// SDXL's size conditioning of one sample, as sd-scripts batches it: `[original h, original w, crop top, crop left,
/// target h, target w]` for an `original` (w, h) image in `bucket` (w, h), with `crop_ltrb` from `crop_ltrb`; a
/// flipped image's crop left is `target w − right`.
pub fn size_ids(
    original: (usize, usize),
    crop: (f64, f64, f64, f64),
    bucket: (usize, usize),
    flipped: bool,
) -> [f32; 6] {
    let (l, t, r, _) = crop;
    let left = if flipped { bucket.0 as f64 - r } else { l };
    [original.1 as f32, original.0 as f32, t as f32, left as f32, bucket.1 as f32, bucket.0 as f32]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mgr(res: usize, min: usize, max: usize, steps: usize, no_up: bool) -> BucketManager {
        BucketManager::new(&BucketConfig {
            resolution: (res, res),
            enable_bucket: true,
            min_bucket_reso: min,
            max_bucket_reso: max,
            bucket_reso_steps: steps,
            bucket_no_upscale: no_up,
        })
        .unwrap()
    }

    /// The vectors of the research notes §4.
    #[test]
    fn research_note_vectors() {
        let r = make_bucket_resolutions((512, 512), 256, 1024, 64);
        assert_eq!(
            r,
            vec![
                (256, 832),
                (256, 896),
                (256, 960),
                (256, 1024),
                (320, 704),
                (320, 768),
                (384, 640),
                (448, 576),
                (512, 512),
                (576, 448),
                (640, 384),
                (704, 320),
                (768, 320),
                (832, 256),
                (896, 256),
                (960, 256),
                (1024, 256)
            ]
        );
        let r = make_bucket_resolutions((1024, 1024), 256, 2048, 64);
        assert_eq!(r.len(), 41);
        for b in [(832, 1216), (896, 1152), (960, 1088), (1024, 1024), (1344, 768), (1856, 512), (2048, 256)] {
            assert!(r.contains(&b), "{b:?}");
        }
        let r = make_bucket_resolutions((1024, 1024), 256, 1024, 64);
        assert_eq!(r.len(), 25);
        assert!(r.iter().all(|&(w, h)| w == 1024 || h == 1024));

        let m = mgr(512, 256, 1024, 64, false);
        let s = |w, h| {
            let p = m.select(w, h);
            (p.bucket, p.resized)
        };
        assert_eq!(s(1000, 1500), ((384, 640), (427, 640)));
        assert_eq!(s(1920, 1080), ((640, 384), (683, 384)));
        assert_eq!(s(300, 900), ((256, 832), (277, 832)));
        assert_eq!(s(640, 480), ((576, 448), (597, 448)));
        let m = mgr(512, 256, 1024, 64, true);
        let s = |w, h| {
            let p = m.select(w, h);
            (p.bucket, p.resized)
        };
        assert_eq!(s(1000, 1500), ((384, 576), (384, 576)));
        assert_eq!(s(300, 900), ((256, 768), (256, 768)));
        assert_eq!(s(640, 480), ((512, 384), (512, 384)));
        assert_eq!(s(500, 300), ((448, 256), (500, 300)));
        let m = mgr(1024, 256, 2048, 64, false);
        let s = |w, h| {
            let p = m.select(w, h);
            (p.bucket, p.resized)
        };
        assert_eq!(s(1000, 1500), ((832, 1216), (832, 1248)));
        assert_eq!(s(1920, 1080), ((1344, 768), (1365, 768)));
        assert_eq!(s(3000, 1000).0, (1728, 576));
        assert_eq!(crop_ltrb((384, 640), (1000, 1500)), (0.0, 32.0, 384.0, 608.0));
        // the batch's size ids: (h, w) order, crop (top, left), flipped left = target w − right
        let c = crop_ltrb((640, 384), (1497, 1000)); // letter-boxed width 574.848: left 32, right 606.848
        assert_eq!(size_ids((1497, 1000), c, (640, 384), false), [1000.0, 1497.0, 0.0, 32.0, 384.0, 640.0]);
        let flipped = size_ids((1497, 1000), c, (640, 384), true);
        assert!((flipped[3] - 33.152).abs() < 1e-3, "{flipped:?}");
    }

    type Size = (usize, usize);

    /// 24 more vectors worked out by hand from the algorithm (each comment shows the arithmetic): nearest aspect
    /// ratio among the predefined buckets (first on ties), cover scale = bucket side / image side on the limiting
    /// axis, `int(x + 0.5)`; for `bucket_no_upscale`, the area-fit rounding of §4.
    #[test]
    fn hand_derived_vectors() {
        let up = mgr(512, 256, 1024, 64, false);
        let cases_up: &[(Size, Size, Size)] = &[
            ((512, 512), (512, 512), (512, 512)),    // a predefined bucket itself
            ((1024, 1024), (512, 512), (512, 512)),  // ar 1, scale 512/1024
            ((256, 256), (512, 512), (512, 512)),    // ar 1, scale 2 (upscaled)
            ((800, 600), (576, 448), (597, 448)),    // ar 1.333 → 576/448=1.286; 800·448/600=597.3
            ((600, 800), (448, 576), (448, 597)),    // ar 0.75 → 448/576=0.778; 800·448/600=597.3
            ((1000, 1000), (512, 512), (512, 512)),  // scale 0.512
            ((2000, 500), (1024, 256), (1024, 256)), // ar 4 exactly; scale 1024/2000
            ((500, 2000), (256, 1024), (256, 1024)), // ar 0.25 exactly
            ((900, 400), (704, 320), (720, 320)),    // ar 2.25 → 2.2 (Δ.05) beats 2.4; 900·0.8
            ((1200, 800), (640, 384), (640, 427)),   // ar 1.5 → 1.667 (Δ.167) beats 1.286 (Δ.214); 800·640/1200=426.7
            ((100, 100), (512, 512), (512, 512)),    // scale 5.12
            ((3000, 100), (1024, 256), (7680, 256)), // ar 30 → widest bucket; scale 256/100
        ];
        for &(img, bucket, resized) in cases_up {
            let p = up.select(img.0, img.1);
            assert_eq!((p.bucket, p.resized), (bucket, resized), "upscale {img:?}");
        }
        let no = mgr(512, 256, 1024, 64, true);
        let cases_no: &[(Size, Size, Size)] = &[
            ((512, 512), (512, 512), (512, 512)),   // area = max: kept
            ((600, 600), (512, 512), (512, 512)),   // √262144 = 512 both ways
            ((400, 300), (384, 256), (400, 300)),   // small: kept, bucket floors to 64s
            ((1000, 500), (640, 320), (640, 320)),  // rw 724→704, rh 362→320; A=704/320=2.2, B=640/320=2.0 wins
            ((64, 64), (64, 64), (64, 64)),         // tiny, on the grid
            ((100, 70), (64, 64), (100, 70)),       // 100−36, 70−6
            ((2000, 1000), (640, 320), (640, 320)), // same aspect as 1000×500
            ((1500, 1000), (576, 384), (576, 384)), // rw 627→576, rh 418→384; A = B = 1.5 → B branch
        ];
        for &(img, bucket, resized) in cases_no {
            let p = no.select(img.0, img.1);
            assert_eq!((p.bucket, p.resized), (bucket, resized), "no_upscale {img:?}");
        }
        let fixed =
            BucketManager::new(&BucketConfig { resolution: (512, 512), enable_bucket: false, ..Default::default() })
                .unwrap();
        let p = fixed.select(1024, 768); // ar 1.333 > 1: scale 512/768 → 682.7
        assert_eq!((p.bucket, p.resized), ((512, 512), (683, 512)));
        let p = fixed.select(300, 600); // ar 0.5: scale 512/300
        assert_eq!((p.bucket, p.resized), ((512, 512), (512, 1024)));
        // resolution 768×512 (area 393216): side floor(627.06/64)·64 = 576; h = min(1024, floor((393216//w)/64)·64)
        let r = make_bucket_resolutions((768, 512), 256, 1024, 64);
        assert_eq!(
            r,
            vec![
                (256, 1024),
                (320, 1024),
                (384, 896),
                (384, 960),
                (384, 1024),
                (448, 832),
                (512, 704),
                (512, 768),
                (576, 576),
                (576, 640),
                (640, 576),
                (704, 512),
                (768, 512),
                (832, 448),
                (896, 384),
                (960, 384),
                (1024, 256),
                (1024, 320),
                (1024, 384)
            ]
        );
        let d = BucketManager::new(&BucketConfig { resolution: (768, 512), enable_bucket: true, ..Default::default() })
            .unwrap();
        let p = d.select(1536, 1024); // ar 1.5 = 768/512 exactly; scale 0.5
        assert_eq!((p.bucket, p.resized), ((768, 512), (768, 512)));
    }
}
