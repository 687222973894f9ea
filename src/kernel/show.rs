//! The notebook's display: `show(x)` becomes `display_data` with `image/png`; a training becomes one display,
//! updated in place (`update_display_data` under its display id), with a progress bar, the loss curve and the
//! latest samples.

use super::capture::Capture;
use super::iopub::Outbox;
use crate::display::{Display, TrainView};
use crate::io::plot::Plot;
use crate::io::png::Image;
use base64::Engine as _;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How often a training display is redrawn at most (new samples and the end always redraw it).
const REDRAW: Duration = Duration::from_millis(1000);
/// Sample images shown at most.
const MAX_SAMPLES: usize = 4;

/// The display sink of the kernel.
pub struct Notebook {
    out: Arc<Outbox>,
    capture: Arc<Capture>,
    trainings: Mutex<HashMap<String, Drawn>>,
}

/// What a training display last showed.
struct Drawn {
    at: Instant,
    samples: Option<PathBuf>,
}

impl Notebook {
    pub fn new(out: Arc<Outbox>, capture: Arc<Capture>) -> Self {
        Self { out, capture, trainings: Mutex::new(HashMap::new()) }
    }
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The MIME bundle of an image: `image/png` with its size, and `text/plain`.
pub fn image_bundle(img: &Image, text: &str) -> anyhow::Result<(Value, Value)> {
    let data = json!({ "image/png": b64(&img.encode()?), "text/plain": text });
    let metadata = json!({ "image/png": { "width": img.width, "height": img.height } });
    Ok((data, metadata))
}

impl Display for Notebook {
    fn image(&self, img: &Image) -> anyhow::Result<()> {
        let (data, metadata) = image_bundle(img, &format!("<Image {}×{}>", img.width, img.height))?;
        self.capture.flush();
        self.out.publish("display_data", json!({ "data": data, "metadata": metadata, "transient": {} }));
        Ok(())
    }

    fn training(&self, v: &TrainView) {
        let mut drawn = self.trainings.lock().unwrap_or_else(|e| e.into_inner());
        let last = drawn.get(v.id);
        let newest = v.samples.first().cloned();
        let due = match last {
            None => true,
            Some(d) => v.done || d.samples != newest || d.at.elapsed() >= REDRAW,
        };
        if !due {
            return;
        }
        let msg_type = if last.is_none() { "display_data" } else { "update_display_data" };
        let data = training_bundle(v);
        self.capture.flush();
        self.out.publish(msg_type, json!({ "data": data, "metadata": {}, "transient": { "display_id": v.id } }));
        if v.done {
            drawn.remove(v.id);
        } else {
            drawn.insert(v.id.to_string(), Drawn { at: Instant::now(), samples: newest });
        }
    }
}

/// Progress, loss curve and samples as `text/plain`, `text/html` and (the loss curve) `image/png`.
fn training_bundle(v: &TrainView) -> Value {
    let state = match (v.done, v.step >= v.total_steps) {
        (true, true) => " — done",
        (true, false) => " — stopped",
        _ => "",
    };
    let line = format!("{}{state}", v.line());
    let mut text = line.clone();
    let mut html = format!(
        "<div style=\"font-family:monospace\"><progress value=\"{}\" max=\"{}\" style=\"width:24em\"></progress> {}</div>",
        v.step,
        v.total_steps.max(1),
        escape(&line)
    );
    let mut data = json!({});
    if !v.losses.is_empty() {
        if let Ok(png) = loss_plot(v.losses).image(640, 240).and_then(|i| i.encode()) {
            let png = b64(&png);
            html.push_str(&format!("<div><img src=\"data:image/png;base64,{png}\" alt=\"loss\"/></div>"));
            data["image/png"] = Value::from(png);
        }
    }
    let samples: Vec<(String, Vec<u8>)> = v
        .samples
        .iter()
        .take(MAX_SAMPLES)
        .filter_map(|p| Some((p.file_name()?.to_string_lossy().into_owned(), std::fs::read(p).ok()?)))
        .collect();
    if !samples.is_empty() {
        html.push_str("<div>");
        for (name, png) in &samples {
            html.push_str(&format!(
                "<img src=\"data:image/png;base64,{}\" title=\"{}\" style=\"max-width:256px;margin:2px\"/>",
                b64(png),
                escape(name)
            ));
        }
        html.push_str("</div>");
        let names: Vec<String> = v.samples.iter().map(|p| p.display().to_string()).collect();
        text.push_str(&format!("\nsamples: {}", names.join(", ")));
    }
    data["text/plain"] = Value::from(text);
    data["text/html"] = Value::from(html);
    data
}

/// The loss of every step and its running mean over 10 steps.
fn loss_plot(losses: &[f64]) -> Plot {
    let mean: Vec<f64> = (0..losses.len())
        .map(|i| {
            let w = &losses[i.saturating_sub(9)..=i];
            w.iter().sum::<f64>() / w.len() as f64
        })
        .collect();
    Plot {
        title: "loss".into(),
        x_label: "step".into(),
        y_label: String::new(),
        series: vec![("loss".into(), losses.to_vec()), ("mean of 10".into(), mean)],
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_training_bundle_has_progress_the_loss_curve_and_samples() {
        let dir = std::env::temp_dir().join(format!("sdtune-show-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sample = dir.join("000-1.png");
        Image { width: 2, height: 2, rgb: vec![255; 12], text: Vec::new() }.save(&sample).unwrap();
        let losses = [0.5, 0.4, 0.3];
        let samples = [sample];
        let v = TrainView {
            id: "t",
            step: 3,
            total_steps: 10,
            epoch: 1,
            losses: &losses,
            rate: 2.0,
            samples: &samples,
            log_every: 1,
            done: true,
        };
        let b = training_bundle(&v);
        let text = b["text/plain"].as_str().unwrap();
        assert!(text.starts_with("step 3/10 epoch 1 loss 0.3000 avg 0.4000") && text.contains("stopped"), "{text}");
        let html = b["text/html"].as_str().unwrap();
        assert!(html.contains("<progress value=\"3\" max=\"10\""));
        assert_eq!(html.matches("data:image/png;base64,").count(), 2, "loss curve and one sample");
        let png = base64::engine::general_purpose::STANDARD.decode(b["image/png"].as_str().unwrap()).unwrap();
        assert_eq!(&png[1..4], b"PNG");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
