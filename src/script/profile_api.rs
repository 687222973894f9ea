//! `profile_ops(|| ...)`: where the time of a forward pass goes, by layer kind (see `nn::profile`).

use super::errors::RhaiResult;
use rhai::{Dynamic, Engine, FnPtr, Map, NativeCallContext};

fn entry(calls: usize, ms: f64) -> Dynamic {
    let mut m = Map::new();
    m.insert("calls".into(), Dynamic::from_int(calls as i64));
    m.insert("ms".into(), Dynamic::from_float(ms));
    Dynamic::from_map(m)
}

pub fn register(engine: &mut Engine) {
    engine.register_fn("profile_ops", |ctx: NativeCallContext, f: FnPtr| -> RhaiResult<Map> {
        crate::nn::profile::start();
        let started = std::time::Instant::now();
        let result = f.call_within_context::<Dynamic>(&ctx, ());
        let total = started.elapsed();
        let table = crate::nn::profile::stop();
        let _value = result?;
        let mut m = Map::new();
        for (kind, calls, t) in table {
            m.insert(kind.into(), entry(calls, t.as_secs_f64() * 1e3));
        }
        m.insert("total".into(), entry(1, total.as_secs_f64() * 1e3));
        Ok(m)
    });
}
