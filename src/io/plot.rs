//! A minimal line plot rendered to an RGB image (loss curves), until the plotting issue brings full charts.

use super::png::Image;

/// Draws `series` (each a list of y values against their index) as lines on a white `width`×`height` image with
/// axes; series are coloured in turn.
pub fn line_plot(series: &[Vec<f64>], width: usize, height: usize) -> Image {
    const COLORS: [[u8; 3]; 4] = [[31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40]];
    let mut rgb = vec![255u8; width * height * 3];
    let (ml, mr, mt, mb) = (40usize, 10usize, 10usize, 30usize);
    let (pw, ph) = (width.saturating_sub(ml + mr).max(1), height.saturating_sub(mt + mb).max(1));
    let mut put = |x: usize, y: usize, c: [u8; 3]| {
        if x < width && y < height {
            rgb[(y * width + x) * 3..(y * width + x) * 3 + 3].copy_from_slice(&c);
        }
    };
    for x in ml..ml + pw {
        put(x, mt + ph, [0, 0, 0]);
    }
    for y in mt..=mt + ph {
        put(ml, y, [0, 0, 0]);
    }
    let finite: Vec<f64> = series.iter().flatten().copied().filter(|v| v.is_finite()).collect();
    if finite.is_empty() {
        return Image { width, height, rgb, text: Vec::new() };
    }
    let (lo, hi) = finite.iter().fold((f64::MAX, f64::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    let span = if hi > lo { hi - lo } else { 1.0 };
    for (si, s) in series.iter().enumerate() {
        let n = s.len().max(2) - 1;
        let pt = |i: usize, v: f64| -> (f64, f64) {
            (ml as f64 + pw as f64 * i as f64 / n as f64, mt as f64 + ph as f64 * (1.0 - (v - lo) / span))
        };
        for i in 1..s.len() {
            if !(s[i - 1].is_finite() && s[i].is_finite()) {
                continue;
            }
            let (a, b) = (pt(i - 1, s[i - 1]), pt(i, s[i]));
            let steps = ((b.0 - a.0).abs().max((b.1 - a.1).abs()) as usize).max(1);
            for k in 0..=steps {
                let t = k as f64 / steps as f64;
                put((a.0 + (b.0 - a.0) * t) as usize, (a.1 + (b.1 - a.1) * t) as usize, COLORS[si % COLORS.len()]);
            }
        }
    }
    Image { width, height, rgb, text: vec![("Comment".into(), format!("y from {lo:.4} to {hi:.4}"))] }
}
