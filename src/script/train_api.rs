//! Script bindings for networks and training: `lora`, `load_network`, apply/remove/merge, `optimizer`,
//! `lr_scheduler`, `train`, `trainer`, `resume`, `synthetic_dataset`.

use super::data_api::{to_json, DatasetRef};
use super::errors::{rt, RhaiResult};
use super::model_api::Model;
use crate::networks::{file, Network};
use crate::train::build::NetworkOptions;
use crate::train::config::TrainConfig;
use crate::train::{Batch, Trainer};
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use rhai::{Array, Dynamic, Engine, Map};
use serde_json::Value;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// A network as scripts hold it.
pub type NetworkRef = Arc<Network>;
/// A trainer as scripts hold it.
pub type TrainerRef = Arc<Mutex<Trainer>>;

/// The outcome of `train(...)` / `trainer.run()` / `resume(...)`.
#[derive(Clone)]
pub struct Run {
    pub losses: Vec<f64>,
    pub step: usize,
    pub epoch: usize,
    pub stopped: bool,
    pub output: String,
    pub trainer: TrainerRef,
}

fn lora(model: &Model, opts: &Map) -> Result<NetworkRef> {
    let o: NetworkOptions =
        serde_json::from_value(to_json(&Dynamic::from_map(opts.clone()))?).map_err(|e| anyhow::anyhow!("lora: {e}"))?;
    Ok(Arc::new(Network::create(model, &o.config()?, o.seed.unwrap_or(0))?))
}

/// Splits `train` options into objects (model, network, dataset), optimizer / scheduler maps and loop options.
fn make_trainer(opts: &Map) -> Result<Trainer> {
    let mut flat = Map::new();
    let mut model: Option<Model> = None;
    let mut network: Option<NetworkRef> = None;
    let mut data: Option<DatasetRef> = None;
    for (k, v) in opts {
        match k.as_str() {
            "model" => {
                model = Some(v.clone().try_cast::<Model>().context("train: `model` must be a Model (load_model(...))")?)
            }
            "network" => {
                network = Some(
                    v.clone()
                        .try_cast::<NetworkRef>()
                        .context("train: `network` must be a Network (lora(...) or load_network(...))")?,
                )
            }
            "dataset" => {
                data = Some(
                    v.clone().try_cast::<DatasetRef>().context("train: `dataset` must be a Dataset (dataset(...))")?,
                )
            }
            // a name alone is sd-scripts' `lr_scheduler` / `optimizer_type`
            "lr_scheduler" if v.is_string() => {
                flat.insert(k.clone(), v.clone());
            }
            "optimizer" if v.is_string() => {
                flat.insert("optimizer_type".into(), v.clone());
            }
            "optimizer" | "lr_scheduler" => {
                let m = v
                    .read_lock::<Map>()
                    .with_context(|| format!("train: `{k}` must be a name or the result of {k}(...)"))?;
                for (mk, mv) in m.iter() {
                    flat.insert(mk.clone(), mv.clone());
                }
            }
            _ => {
                flat.insert(k.clone(), v.clone());
            }
        }
    }
    let model = model.context("train: `model` is required")?;
    let train_json = to_json(&Dynamic::from_map(flat))?;
    let cfg = TrainConfig::from_json(train_json.clone())?;
    let recipe = serde_json::json!({
        "model": crate::train::trainer::absolute(&model.source),
        "model_options": {
            "dtype": crate::device::dtype_name(model.dtype), "v_pred": model.v_pred, "clip_skip": model.clip_skip,
            "device": crate::device::device_name(&model.device),
        },
        "dataset": data.as_ref().map(|d| crate::train::trainer::absolute(&d.source)),
        "dataset_options": data.as_ref().map(|d| d.options.clone()).unwrap_or(Value::Null),
        "network": network.as_ref().map_or(Value::Null, |n| network_json(n)),
        "fine_tune": network.is_none() && cfg.token_string.is_none(),
        "train": train_json,
    });
    match network {
        Some(n) => Trainer::new(model, n.into(), data, cfg, recipe),
        // a new word's vectors (the model keeps the word)
        None if cfg.token_string.is_some() => Trainer::textual_inversion(model, data, cfg, recipe),
        // no network: the model itself trains (the script contract's full fine-tuning)
        None => Trainer::fine_tune(&model, data, cfg, recipe),
    }
}

/// A network acts on the model it was made for; another model is an error rather than a silent no-op.
fn same_model(m: &Model, n: &Network) -> Result<()> {
    if !n.is_for(m) {
        bail!("this network was made for another loaded model: use load_network(path, model) or lora(model, ...) with this one");
    }
    Ok(())
}

fn network_json(n: &Network) -> Value {
    let c = &n.config;
    let mut v = serde_json::json!({
        "dim": c.dim, "alpha": c.alpha, "conv_dim": c.conv_dim, "conv_alpha": c.conv_alpha,
        "dropout": c.dropouts.neuron, "rank_dropout": c.dropouts.rank, "module_dropout": c.dropouts.module,
        "train_unet": c.train_unet, "train_text_encoder": c.train_text_encoder,
        "module": if c.lora_fa { "networks.lora_fa" } else { "networks.lora" },
        "dtype": crate::device::dtype_name(c.dtype),
    });
    // the block options as given (numbers where NetworkOptions takes numbers)
    for (k, given) in &c.blocks.given {
        v[k.as_str()] = match k.as_str() {
            "mid_lr_weight" | "block_lr_zero_threshold" => given.parse::<f64>().map(Value::from).unwrap_or(Value::Null),
            _ => Value::from(given.as_str()),
        };
    }
    for (k, r) in c.loraplus.args() {
        v[k.as_str()] = Value::from(r);
    }
    v
}

fn run_trainer(tr: TrainerRef) -> Result<Run> {
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let id = format!("sdtune-train-{}-{}", std::process::id(), CALLS.fetch_add(1, std::sync::atomic::Ordering::SeqCst));
    let started = std::time::Instant::now();
    let mut t = tr.lock().map_err(|_| anyhow::anyhow!("the trainer is in use"))?;
    let first_step = t.step;
    let mut samples: Vec<std::path::PathBuf> = Vec::new();
    let view = |t: &Trainer, samples: &[std::path::PathBuf], done: bool| {
        crate::display::training(&crate::display::TrainView {
            id: &id,
            step: t.step,
            total_steps: t.total_steps,
            epoch: t.epoch + 1,
            losses: &t.losses,
            rate: (t.step - first_step) as f64 / started.elapsed().as_secs_f64().max(1e-9),
            samples,
            log_every: t.cfg.log_every_n_steps,
            done,
        })
    };
    let result = t.run(&mut |t, event| {
        if let crate::train::Event::Sampled(paths) = event {
            samples = paths.to_vec();
        }
        view(t, &samples, false)
    });
    view(&t, &samples, true);
    result?;
    if t.stopped {
        eprintln!("stopped at step {}: state saved to {}", t.step, t.state_dir().display());
    }
    let run = Run {
        losses: t.losses.clone(),
        step: t.step,
        epoch: t.epoch,
        stopped: t.stopped,
        output: if t.stopped { t.state_dir() } else { t.final_path() }.display().to_string(),
        trainer: tr.clone(),
    };
    Ok(run)
}

fn step_with(tr: &TrainerRef, m: &Map) -> Result<f64> {
    let get = |k: &str| -> Result<Tensor> {
        m.get(k)
            .and_then(|v| v.clone().try_cast::<Tensor>())
            .with_context(|| format!("step_with: `{k}` (a Tensor) is required"))
    };
    const KEYS: &[&str] = &["input_ids", "latents", "noise", "timesteps", "weights", "time_ids"];
    if let Some(k) = m.keys().find(|k| !KEYS.contains(&k.as_str())) {
        bail!("step_with: unknown key `{k}`; accepted: {}", KEYS.join(", "));
    }
    let latents = get("latents")?;
    let b = latents.dim(0)?;
    let weights = match m.get("weights") {
        Some(w) => w.clone().try_cast::<Tensor>().context("weights must be a Tensor")?,
        None => Tensor::ones(b, candle_core::DType::F32, &candle_core::Device::Cpu)?,
    };
    let batch = Batch {
        latents,
        input_ids: get("input_ids")?,
        weights,
        noise: Some(get("noise")?),
        timesteps: Some(get("timesteps")?),
        time_ids: m.contains_key("time_ids").then(|| get("time_ids")).transpose()?,
        captions: None,
        masks: None,
    };
    let mut t = tr.lock().map_err(|_| anyhow::anyhow!("the trainer is in use"))?;
    t.train_batch(&batch)
}

fn floats(v: &[f64]) -> Array {
    v.iter().map(|&x| Dynamic::from_float(x)).collect()
}

fn kv_map(name_key: &str, name: &str, opts: &Map) -> Map {
    let mut m = opts.clone();
    m.insert(name_key.into(), Dynamic::from(name.to_string()));
    m
}

/// Registers networks and training.
pub fn register(engine: &mut Engine) {
    engine.register_type_with_name::<NetworkRef>("Network");
    engine.register_type_with_name::<TrainerRef>("Trainer");
    engine.register_type_with_name::<Run>("Run");
    engine.register_fn("lora", |m: Model, o: Map| rt(lora(&m, &o)));
    engine.register_fn("lora", |m: Model| rt(lora(&m, &Map::new())));
    engine.register_fn("load_network", |p: &str, m: Model| rt(file::load(Path::new(p), &m).map(Arc::new)));
    engine.register_fn("apply_network", |m: &mut Model, n: NetworkRef, mult: f64| {
        rt(same_model(m, &n).map(|_| n.apply(mult)))
    });
    engine.register_fn("remove_network", |m: &mut Model, n: NetworkRef| rt(same_model(m, &n).map(|_| n.remove())));
    engine.register_fn("merge_network", |m: &mut Model, n: NetworkRef, mult: f64| {
        rt(same_model(m, &n).and_then(|_| n.merge(mult)))
    });
    engine.register_get("modules", |n: &mut NetworkRef| n.modules.len() as i64);
    engine.register_get("tensors", |n: &mut NetworkRef| -> RhaiResult<Map> {
        let sd = rt(n.state_dict(candle_core::DType::F32))?;
        // copies: the network's own tensors change in place as it trains
        let cpu = |t: Tensor| rt(t.to_device(&candle_core::Device::Cpu).and_then(|t| t.copy()).map_err(Into::into));
        sd.into_iter().map(|(k, v)| Ok((k.into(), Dynamic::from(cpu(v)?)))).collect()
    });
    engine.register_fn("save", |n: &mut NetworkRef, p: &str| rt(save_network(n, p, &Map::new())));
    engine.register_fn("save", |n: &mut NetworkRef, p: &str, extra: Map| rt(save_network(n, p, &extra)));
    engine.register_fn("optimizer", |name: &str, o: Map| -> RhaiResult<Map> {
        rt((|| {
            let mut m = Map::new();
            m.insert("optimizer_type".into(), Dynamic::from(name.to_string()));
            let mut args = Array::new();
            for (k, v) in &o {
                if k.as_str() == "learning_rate" || k.as_str() == "unet_lr" || k.as_str() == "text_encoder_lr" {
                    m.insert(k.clone(), v.clone());
                } else {
                    args.push(Dynamic::from(format!("{k}={v}")));
                }
            }
            m.insert("optimizer_args".into(), Dynamic::from_array(args));
            crate::train::optim::Kind::parse(
                name,
                &crate::train::optim::parse_args(
                    &m["optimizer_args"]
                        .clone()
                        .into_array()
                        .unwrap_or_default()
                        .iter()
                        .map(|a| a.to_string())
                        .collect::<Vec<_>>(),
                )?,
            )?;
            Ok(m)
        })())
    });
    engine.register_fn("optimizer", |name: &str| kv_map("optimizer_type", name, &Map::new()));
    engine.register_fn("lr_scheduler", |name: &str, o: Map| -> RhaiResult<Map> {
        rt((|| {
            if !crate::train::lr::NAMES.contains(&name) {
                bail!("unknown lr_scheduler {name:?}; available: {}", crate::train::lr::NAMES.join(", "));
            }
            let mut m = Map::new();
            m.insert("lr_scheduler".into(), Dynamic::from(name.to_string()));
            for (k, v) in &o {
                let key = match k.as_str() {
                    "warmup_steps" | "lr_warmup_steps" => "lr_warmup_steps",
                    "num_cycles" | "lr_scheduler_num_cycles" => "lr_scheduler_num_cycles",
                    "power" | "lr_scheduler_power" => "lr_scheduler_power",
                    "step_rules" => "step_rules",
                    other => bail!(
                        "lr_scheduler: unknown option `{other}`; accepted: warmup_steps, num_cycles, power, step_rules"
                    ),
                };
                m.insert(key.into(), v.clone());
            }
            Ok(m)
        })())
    });
    engine.register_fn("lr_scheduler", |name: &str| kv_map("lr_scheduler", name, &Map::new()));
    engine.register_fn("train", |o: Map| rt(make_trainer(&o).and_then(|t| run_trainer(Arc::new(Mutex::new(t))))));
    engine.register_fn("trainer", |o: Map| rt(make_trainer(&o).map(|t| Arc::new(Mutex::new(t)))));
    engine.register_fn("resume", |p: &str| {
        rt(crate::train::build::resume(Path::new(p), None).and_then(|t| run_trainer(Arc::new(Mutex::new(t)))))
    });
    engine.register_fn("step", |t: &mut TrainerRef| -> RhaiResult<f64> {
        rt((|| {
            let mut tr = t.lock().map_err(|_| anyhow::anyhow!("the trainer is in use"))?;
            tr.train_next_batch().context("trainer.step()")
        })())
    });
    engine.register_fn("step_with", |t: &mut TrainerRef, m: Map| rt(step_with(t, &m)));
    engine.register_fn("run", |t: &mut TrainerRef| rt(run_trainer(t.clone())));
    engine.register_get("options", |t: &mut TrainerRef| -> RhaiResult<Dynamic> {
        let tr = t.lock().map_err(|_| "trainer in use")?;
        Ok(super::data_api::from_json(&rt(tr.resolved_options())?))
    });
    engine.register_get("network", |t: &mut TrainerRef| -> RhaiResult<NetworkRef> {
        rt((|| Ok(t.lock().map_err(|_| anyhow::anyhow!("the trainer is in use"))?.network()?.clone()))())
    });
    engine.register_get("model", |t: &mut TrainerRef| -> RhaiResult<Model> {
        t.lock().map(|t| t.model.clone()).map_err(|_| "trainer in use".into())
    });
    engine.register_get("model", |r: &mut Run| -> RhaiResult<Model> {
        r.trainer.lock().map(|t| t.model.clone()).map_err(|_| "trainer in use".into())
    });
    engine.register_fn("save", |t: &mut TrainerRef, p: &str| -> RhaiResult<()> {
        rt((|| {
            let tr = t.lock().map_err(|_| anyhow::anyhow!("the trainer is in use"))?;
            tr.target.save(&tr.model, Path::new(p), (512, 512), &tr.metadata()?, tr.cfg.save_dtype()?, false)
        })())
    });
    engine.register_get("losses", |r: &mut Run| floats(&r.losses));
    engine.register_get("step", |r: &mut Run| r.step as i64);
    engine.register_get("epoch", |r: &mut Run| r.epoch as i64);
    engine.register_get("stopped", |r: &mut Run| r.stopped);
    engine.register_get("output", |r: &mut Run| r.output.clone());
    engine.register_fn("stop", |r: &mut Run| {
        if let Ok(t) = r.trainer.lock() {
            t.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    });
    engine.register_fn("save_now", |r: &mut Run| -> RhaiResult<String> {
        rt(r.trainer
            .lock()
            .map_err(|_| anyhow::anyhow!("the trainer is in use"))
            .and_then(|t| Ok(t.save_state_now()?.display().to_string())))
    });
    engine.register_get("losses", |t: &mut TrainerRef| t.lock().map(|t| floats(&t.losses)).unwrap_or_default());
    engine.register_get("step", |t: &mut TrainerRef| t.lock().map(|t| t.step as i64).unwrap_or(0));
    engine.register_fn("synthetic_dataset", |dir: &str, o: Map| -> RhaiResult<String> {
        rt((|| {
            let g = |k: &str, d: i64| o.get(k).and_then(|v| v.as_int().ok()).unwrap_or(d);
            let concept = o.get("concept").map(|v| v.to_string()).unwrap_or_else(|| "sdtoy".into());
            let p = crate::data::synthetic::write_shapes(
                Path::new(dir),
                &concept,
                g("repeats", 1) as usize,
                g("count", 8) as usize,
                g("size", 64) as u32,
                g("seed", 0) as u64,
            )?;
            Ok(p.display().to_string())
        })())
    });
}

/// `net.save(path[, metadata])`: kohya format with the network's metadata plus `extra`, never overwriting.
fn save_network(n: &Network, p: &str, extra: &Map) -> Result<()> {
    let extra: std::collections::BTreeMap<String, String> =
        extra.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let meta = file::base_metadata(n, &stem(p), (512, 512), &extra);
    file::save(n, Path::new(p), &meta, candle_core::DType::F32, false)
}

fn stem(p: &str) -> String {
    Path::new(p).file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
}
