//! The display sink: where output that a person looks at goes — shown images and plots, and a training's
//! progress. Each front end installs its own (the terminal's is the default: a PNG in a temporary folder and a
//! progress line; the Jupyter kernel's sends display messages). Script bindings call only these functions.

use crate::io::png::Image;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

/// A training's progress, as a display shows it.
pub struct TrainView<'a> {
    /// A name unique to this training call (a display updates in place under it).
    pub id: &'a str,
    pub step: usize,
    pub total_steps: usize,
    /// 1-based.
    pub epoch: usize,
    /// Every step's loss so far.
    pub losses: &'a [f64],
    /// Steps per second since this call started.
    pub rate: f64,
    /// The latest sample images (empty until the first are written).
    pub samples: &'a [PathBuf],
    /// Print a progress line every this many steps (0: never); the training's `log_every_n_steps`.
    pub log_every: usize,
    /// The last report of this call (finished or stopped).
    pub done: bool,
}

impl TrainView<'_> {
    /// The mean of the last 100 losses.
    pub fn average(&self) -> f64 {
        self.losses.iter().rev().take(100).sum::<f64>() / self.losses.len().clamp(1, 100) as f64
    }

    /// One line: step, epoch, loss, average, speed and time left.
    pub fn line(&self) -> String {
        let loss = self.losses.last().copied().unwrap_or(f64::NAN);
        let eta = self.total_steps.saturating_sub(self.step) as f64 / self.rate.max(1e-9);
        format!(
            "step {}/{} epoch {} loss {loss:.4} avg {:.4} {:.2} it/s ETA {eta:.0}s",
            self.step,
            self.total_steps,
            self.epoch,
            self.average(),
            self.rate
        )
    }
}

/// What a front end implements.
pub trait Display: Send + Sync {
    /// Shows an image (`show(x)`).
    fn image(&self, img: &Image) -> anyhow::Result<()>;
    /// Reports a training's progress (called after every step, when samples are written, and once at the end).
    fn training(&self, view: &TrainView);
}

static SINK: RwLock<Option<Arc<dyn Display>>> = RwLock::new(None);

/// Installs a front end's display (the terminal's is used until one is).
pub fn install(sink: Arc<dyn Display>) {
    *SINK.write().unwrap_or_else(|e| e.into_inner()) = Some(sink);
}

fn current() -> Arc<dyn Display> {
    SINK.read().unwrap_or_else(|e| e.into_inner()).clone().unwrap_or_else(|| Arc::new(Terminal))
}

/// Shows an image on the current display.
pub fn image(img: &Image) -> anyhow::Result<()> {
    current().image(img)
}

/// Reports training progress to the current display.
pub fn training(view: &TrainView) {
    current().training(view)
}

/// The terminal: images are saved as PNGs in a temporary folder and their paths printed; training prints a
/// line every `log_every` steps and the paths of new samples.
pub struct Terminal;

impl Display for Terminal {
    fn image(&self, img: &Image) -> anyhow::Result<()> {
        static COUNT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!("sdtune-show-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let n = COUNT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let path = dir.join(format!("show-{n:03}.png"));
        img.save(&path)?;
        println!("{}", path.display());
        Ok(())
    }

    fn training(&self, v: &TrainView) {
        let every = v.log_every;
        let due = every > 0 && (v.step % every == 0 || v.step == v.total_steps);
        if due && !v.done && !v.losses.is_empty() {
            eprintln!("{}", v.line());
        }
    }
}
