//! Background loading: worker threads decode, resize and augment the epoch's batches ahead of the trainer,
//! in order, with a bounded prefetch.

use super::captions::Progress;
use super::dataset::{Dataset, Sample};
use crate::rng::Rng;
use anyhow::Result;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;

/// An iterator over an epoch's batches, loaded on `workers` threads; batch k always gets the same random choices
/// (augmentation, caption shuffling) for a seed, whatever the number of workers.
pub struct Loader {
    receivers: Vec<Receiver<Result<Vec<Sample>>>>,
    next: usize,
    total: usize,
}

impl Loader {
    pub fn start(
        ds: Arc<Dataset>,
        batches: Vec<Vec<usize>>,
        progress: Progress,
        seed: u64,
        workers: usize,
        prefetch: usize,
    ) -> Self {
        Self::start_at(ds, batches, 0, progress, seed, workers, prefetch)
    }

    /// Like `start`, skipping the first `first` batches (resuming mid-epoch) with the same per-batch seeds.
    pub fn start_at(
        ds: Arc<Dataset>,
        batches: Vec<Vec<usize>>,
        first: usize,
        progress: Progress,
        seed: u64,
        workers: usize,
        prefetch: usize,
    ) -> Self {
        let total = batches.len().saturating_sub(first);
        let workers = workers.clamp(1, total.max(1));
        let batches = Arc::new(batches);
        let mut receivers = Vec::with_capacity(workers);
        for w in 0..workers {
            let (tx, rx) = sync_channel(prefetch.max(1));
            receivers.push(rx);
            let (ds, batches) = (ds.clone(), batches.clone());
            std::thread::spawn(move || {
                for k in (first + w..batches.len()).step_by(workers) {
                    let mut rng =
                        Rng::new(seed ^ (k as u64).wrapping_mul(0xA24B_AED4_963E_E407) ^ (progress.epoch as u64) << 48);
                    let batch: Result<Vec<Sample>> =
                        batches[k].iter().map(|&i| ds.sample(i, progress, &mut rng)).collect();
                    if tx.send(batch).is_err() {
                        return; // the consumer stopped
                    }
                }
            });
        }
        Self { receivers, next: 0, total }
    }
}

impl Iterator for Loader {
    type Item = Result<Vec<Sample>>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.next >= self.total {
            return None;
        }
        let w = self.next % self.receivers.len();
        self.next += 1;
        match self.receivers[w].recv() {
            Ok(b) => Some(b),
            Err(_) => Some(Err(anyhow::anyhow!("a data loader thread stopped unexpectedly"))),
        }
    }
}
