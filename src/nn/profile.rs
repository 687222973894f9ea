//! Op-kind timing: while enabled, each layer kind's forward (Linear with its adapters, Conv2d, GroupNorm, LayerNorm,
//! attention) and each of sdtune's own backward passes (`nn::grad::attach`: "… backward") waits for the device
//! before and after itself and adds the time to its kind; so does a training step's optimizer. candle's own
//! backward ops are not split.
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
    use candle_core::{DType, Device, Tensor, Var};

    /// Other tests run layers in parallel while this one records: only its own kinds are compared exactly.
    fn own(t: &[(&'static str, usize, std::time::Duration)]) -> Vec<(&'static str, usize)> {
        t.iter().filter(|(k, _, _)| k.starts_with("test ")).map(|(k, n, _)| (*k, *n)).collect()
    }

    #[test]
    fn records_only_while_on_and_times_backward_passes() {
        let dev = Device::Cpu;
        super::time("test conv2d", &dev, || Ok(())).unwrap();
        super::start();
        super::time("test conv2d", &dev, || Ok(())).unwrap();
        super::time("test conv2d", &dev, || Ok(())).unwrap();
        super::time("test linear", &dev, || Ok(())).unwrap();
        // sdtune's own backward pass of a layer op is timed under its kind
        let x = Var::from_tensor(&Tensor::ones((2, 3), DType::F32, &dev).unwrap()).unwrap();
        let w = Tensor::ones((4, 3), DType::F32, &dev).unwrap();
        super::super::grad::matmul_t(x.as_tensor(), &w, DType::F32).unwrap().sum_all().unwrap().backward().unwrap();
        let t = super::stop();
        assert_eq!(own(&t), [("test conv2d", 2), ("test linear", 1)]);
        assert!(t.iter().any(|(k, n, _)| *k == "linear (+ adapters) backward" && *n >= 1), "{t:?}");
        super::time("test linear", &dev, || Ok(())).unwrap();
        super::start();
        assert!(own(&super::stop()).is_empty());
    }
}
