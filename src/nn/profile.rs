//! Op-kind timing of a forward pass: while enabled, each layer kind's forward (Linear with its adapters, Conv2d,
//! GroupNorm, LayerNorm, attention) waits for the device before and after itself and adds the time to its kind.
//! Synchronising costs a little, so profiled runs are slightly slower than plain ones; off, it costs one atomic
//! load per layer.

use anyhow::Result;
use candle_core::Device;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

static ON: AtomicBool = AtomicBool::new(false);
static TABLE: Mutex<BTreeMap<&'static str, (usize, Duration)>> = Mutex::new(BTreeMap::new());

/// Starts recording (clearing what was recorded).
pub fn start() {
    TABLE.lock().unwrap_or_else(|e| e.into_inner()).clear();
    ON.store(true, Ordering::SeqCst);
}

/// Stops recording; returns `(kind, calls, time)` per kind.
pub fn stop() -> Vec<(&'static str, usize, Duration)> {
    ON.store(false, Ordering::SeqCst);
    let table = std::mem::take(&mut *TABLE.lock().unwrap_or_else(|e| e.into_inner()));
    table.into_iter().map(|(k, (n, t))| (k, n, t)).collect()
}

/// Runs `f`, timing it under `kind` when recording.
pub fn time<T>(kind: &'static str, device: &Device, f: impl FnOnce() -> Result<T>) -> Result<T> {
    if !ON.load(Ordering::Relaxed) {
        return f();
    }
    device.synchronize()?;
    let t = Instant::now();
    let out = f()?;
    device.synchronize()?;
    let mut table = TABLE.lock().unwrap_or_else(|e| e.into_inner());
    let e = table.entry(kind).or_insert((0, Duration::ZERO));
    e.0 += 1;
    e.1 += t.elapsed();
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn records_only_while_on() {
        let dev = candle_core::Device::Cpu;
        super::time("conv2d", &dev, || Ok(())).unwrap();
        super::start();
        super::time("conv2d", &dev, || Ok(())).unwrap();
        super::time("conv2d", &dev, || Ok(())).unwrap();
        super::time("linear", &dev, || Ok(())).unwrap();
        let t = super::stop();
        assert_eq!(t.iter().map(|(k, n, _)| (*k, *n)).collect::<Vec<_>>(), [("conv2d", 2), ("linear", 1)]);
        super::time("linear", &dev, || Ok(())).unwrap();
        super::start();
        assert!(super::stop().is_empty());
    }
}
