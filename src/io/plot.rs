//! Line plots (loss curves and any series of numbers) with plotters: SVG, or PNG through a bitmap with the
//! bundled DejaVu Sans (assets/fonts), so text renders the same on every machine.

use super::png::Image;
use anyhow::{bail, Context, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::Path;
use std::sync::OnceLock;

/// A line plot: named series of y values against their index.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plot {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<(String, Vec<f64>)>,
}

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

fn font() -> Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        let bytes: &'static [u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok()
    });
    if !ok {
        bail!("the bundled plot font could not be loaded");
    }
    Ok(())
}

impl Plot {
    /// One unnamed series.
    pub fn of(values: Vec<f64>) -> Self {
        Plot { series: vec![(String::new(), values)], x_label: "step".into(), ..Default::default() }
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()>
    where
        DB::ErrorType: 'static,
    {
        let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow::anyhow!("plot: {e:?}");
        root.fill(&WHITE).map_err(err)?;
        let finite: Vec<f64> = self.series.iter().flat_map(|(_, v)| v).copied().filter(|v| v.is_finite()).collect();
        let n = self.series.iter().map(|(_, v)| v.len()).max().unwrap_or(0).max(2);
        let (mut lo, mut hi) = finite.iter().fold((f64::MAX, f64::MIN), |(a, b), &v| (a.min(v), b.max(v)));
        if finite.is_empty() {
            (lo, hi) = (0.0, 1.0);
        } else if hi <= lo {
            (lo, hi) = (lo - 0.5, hi + 0.5);
        }
        let pad = (hi - lo) * 0.05;
        let mut chart = ChartBuilder::on(root)
            .caption(&self.title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(0f64..(n - 1) as f64, (lo - pad)..(hi + pad))
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc(&self.x_label)
            .y_desc(&self.y_label)
            .label_style(("sans-serif", 13))
            .light_line_style(RGBColor(235, 235, 235))
            .draw()
            .map_err(err)?;
        for (i, (name, values)) in self.series.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            let points = values.iter().enumerate().filter(|(_, v)| v.is_finite()).map(|(x, &y)| (x as f64, y));
            let drawn = chart.draw_series(LineSeries::new(points, color.stroke_width(2))).map_err(err)?;
            if !name.is_empty() {
                drawn
                    .label(name.clone())
                    .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], color.stroke_width(2)));
            }
        }
        if self.series.iter().any(|(n, _)| !n.is_empty()) {
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .label_font(("sans-serif", 13))
                .draw()
                .map_err(err)?;
        }
        root.present().map_err(err)?;
        Ok(())
    }

    /// The plot as an SVG document.
    pub fn svg(&self, width: u32, height: u32) -> Result<String> {
        font()?;
        let mut out = String::new();
        {
            let root = SVGBackend::with_string(&mut out, (width, height)).into_drawing_area();
            self.draw(&root)?;
        }
        Ok(out)
    }

    /// The plot as an image.
    pub fn image(&self, width: u32, height: u32) -> Result<Image> {
        font()?;
        let mut rgb = vec![0u8; (width * height * 3) as usize];
        {
            let root = BitMapBackend::with_buffer(&mut rgb, (width, height)).into_drawing_area();
            self.draw(&root)?;
        }
        Ok(Image { width: width as usize, height: height as usize, rgb, text: Vec::new() })
    }

    /// Writes `.svg` or `.png` (by extension), atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        match path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref() {
            Some("svg") => {
                let svg = self.svg(800, 450)?;
                super::tensors::write_atomic(path, |f| Ok(std::io::Write::write_all(f, svg.as_bytes())?))
                    .with_context(|| format!("{}", path.display()))
            }
            Some("png") => self.image(800, 450)?.save(path),
            _ => bail!("{}: plots are saved as .png or .svg", path.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plots_render_to_svg_and_png_with_their_text() {
        let p = Plot {
            title: "loss".into(),
            x_label: "step".into(),
            y_label: "value".into(),
            series: vec![("train".into(), vec![3.0, 2.0, 1.5, 1.2]), ("eval".into(), vec![3.2, 2.5, f64::NAN, 1.6])],
        };
        let svg = p.svg(400, 300).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("loss") && svg.contains("train") && svg.contains("<polyline"));
        let img = p.image(400, 300).unwrap();
        assert_eq!((img.width, img.height), (400, 300));
        // a line in the first series' colour and dark text pixels are drawn on the white background
        let px: Vec<&[u8]> = img.rgb.chunks(3).collect();
        assert!(px.iter().any(|c| *c == [31, 119, 180]));
        assert!(px.iter().filter(|c| c[0] < 80 && c[1] < 80 && c[2] < 80).count() > 200, "text and axes");
        assert!(Plot::of(vec![]).svg(200, 100).is_ok(), "an empty plot still draws");
    }
}
