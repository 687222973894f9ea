//! Op-kind timing: while enabled, each layer kind's forward (Linear with its adapters, Conv2d, GroupNorm, LayerNorm,
//! attention) and each of sdtune's own backward passes (`nn::grad::attach`: "… backward") waits for the device
//! before and after itself and adds the time to its kind; so does a training step's optimizer. candle's own
//! backward ops are not split. A checkpointed block's "(recomputed)" kind covers the block's forward and backward run
//! again, whose ops also count under their own kinds.
//! Synchronising costs a little, so profiled runs are slightly slower than plain ones; off, it costs one
//! thread-local read per layer. Recording is per thread: what other threads run at the same time is not counted.

use anyhow::Result;
use candle_core::Device;
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

thread_local! {
    static ON: Cell<bool> = const { Cell::new(false) };
    static TABLE: RefCell<BTreeMap<&'static str, (usize, Duration)>> = const { RefCell::new(BTreeMap::new()) };
}

/// Starts recording on this thread (clearing what was recorded).
pub fn start() {
    TABLE.with_borrow_mut(BTreeMap::clear);
    ON.set(true);
}

/// Stops recording on this thread; returns `(kind, calls, time)` per kind.
pub fn stop() -> Vec<(&'static str, usize, Duration)> {
    ON.set(false);
    TABLE.with_borrow_mut(std::mem::take).into_iter().map(|(k, (n, t))| (k, n, t)).collect()
}

/// Runs `f`, timing it under `kind` when this thread records.
pub fn time<T>(kind: &'static str, device: &Device, f: impl FnOnce() -> Result<T>) -> Result<T> {
    if !ON.get() {
        return f();
    }
    device.synchronize()?;
    let t = Instant::now();
    let out = f()?;
    device.synchronize()?;
    TABLE.with_borrow_mut(|table| {
        let e = table.entry(kind).or_insert((0, Duration::ZERO));
        e.0 += 1;
        e.1 += t.elapsed();
    });
    Ok(out)
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor, Var};

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
        // another thread's layers are not counted
        super::start();
        std::thread::spawn(move || super::time("test other thread", &Device::Cpu, || Ok(())).unwrap()).join().unwrap();
        assert!(super::stop().is_empty());
    }
}
