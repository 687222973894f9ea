//! `help()`, `help("name")` and `help(value)`: what each script function and object does, and its options.
//! The entries are data; the option lists come from the option tables the functions themselves check.

use rhai::{Dynamic, Engine, NativeCallContext};

/// (name, call forms, what it does). Object types are listed under their type name.
pub const ENTRIES: &[(&str, &str, &str)] = &[
    ("print", "print(x)", "prints a value"),
    ("show", "show(x)", "displays an Image, an image Tensor or a Plot (a terminal saves a PNG and prints its path)"),
    ("help", "help() / help(\"name\") / help(value)", "lists the functions, or describes one function or a value's type"),
    ("load_tensors", "load_tensors(path)", "map of name → Tensor from a safetensors file"),
    ("save_tensors", "save_tensors(map, path)", "writes a safetensors file atomically"),
    ("read_metadata", "read_metadata(path)", "the metadata map of a safetensors file"),
    ("randn", "randn(shape_array, seed)", "an f32 Tensor of standard normal values, the same for a seed"),
    ("tensor", "tensor(array)", "a Tensor from nested arrays of numbers"),
    ("Tensor", "t.shape, t.dtype, t.device, t.to_dtype(s), t.to_device(s), + - * /, t.mean(), t.sum(), t.abs_max(), t.to_array()", "a candle tensor"),
    ("load_model", "load_model(path) / load_model(path, #{ family, v_pred, vae, dtype, device, clip_skip, config })", "a Stable Diffusion model from a single file (.safetensors, .ckpt) or a diffusers folder"),
    ("training_dtype", "training_dtype(mixed_precision)", "the dtype to load a model in for that mixed_precision on this machine (\"f16\", \"bf16\" on CUDA, else \"f32\")"),
    ("Model", "m.family, m.v_pred, m.vae_scale, m.clip_skip, m.dtype, m.tokenize(text), m.load_embedding(path[, word]), m.embeddings, m.encode_ids(ids[, opts]), m.encode_text(prompts), m.unet(x, t, context[, y]), m.sdxl_vector(pooled, sizes), m.vae_encode(image), m.vae_decode(latents), m.sample(line|opts), m.sample_latents(opts), m.apply_network(net, m), m.remove_network(net), m.merge_network(net, m), m.save(path, #{ format, dtype })", "a loaded model"),
    ("lora", "lora(model, #{ dim, alpha, conv_dim, conv_alpha, dropout, rank_dropout, module_dropout, train_unet, train_text_encoder, network_module, block_dims, loraplus_lr_ratio, algo, preset, factor, ... })", "a new trainable network: LoRA (sd-scripts' networks.lora / networks.lora_fa) or LyCORIS LoCon / LoHa / LoKr (network_module \"lycoris.kohya\", algo \"locon\" / \"loha\" / \"lokr\")"),
    ("load_network", "load_network(path, model)", "a LoRA file (sd-scripts' keys) for that model, to apply, merge or continue training"),
    ("Network", "net.save(path[, metadata]), net.modules, net.tensors (kohya-named f32 CPU tensors)", "a LoRA or LyCORIS (LoCon, LoHa, LoKr) network"),
    ("parse_prompt", "parse_prompt(text)", "[[text, weight], ...]: how A1111's ( ), [ ], (text:1.3) weighting reads the prompt"),
    ("load_image", "load_image(path)", "an Image from a PNG/JPEG/WebP/BMP file"),
    ("Image", "img.width, img.height, img.save(path), img.to_tensor()", "an RGB image (PNGs carry an A1111 `parameters` chunk)"),
    ("dataset", "dataset(path_or_toml, #{ resolution, enable_bucket, batch_size, caption_extension, ... })", "a kohya training folder (N_concept sub-folders) or a dataset TOML"),
    ("Dataset", "d.len, d.buckets, d.batches_per_epoch, d.get(i), d.problems, d.report", "training data"),
    ("optimizer", "optimizer(name, #{ optimizer_args... })", "an optimizer choice for train(): AdamW, AdamW8bit, Lion, SGDNesterov, AdaFactor, Prodigy, DAdaptAdam"),
    ("lr_scheduler", "lr_scheduler(name, #{ warmup_steps, num_cycles, power, step_rules })", "an LR schedule for train(): constant, constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial, piecewise_constant, adafactor"),
    ("train", "train(#{ model, network, dataset, optimizer, lr_scheduler, ...sd-scripts options })", "trains to the end and returns a Run; without a network the model itself trains (DreamBooth / fine-tuning: train_text_encoder, learning_rate_te, save_model_as), or with token_string a textual-inversion word (init_word, num_vectors_per_token, use_object_template)"),
    ("trainer", "trainer(#{ same as train })", "a Trainer that runs only when asked"),
    ("Trainer", "t.step(), t.step_with(#{ input_ids, latents, noise, timesteps }), t.run(), t.network, t.model, t.save(path), t.options", "a training run to step through"),
    ("Run", "run.losses, run.step, run.epoch, run.stopped, run.output, run.model", "the outcome of train() / trainer.run() (run.model: the model trained on; the fine-tuned one without a network)"),
    ("resume", "resume(state_dir)", "continues a saved training state to the end"),
    ("synthetic_dataset", "synthetic_dataset(folder, #{ concept, repeats, count, size, seed })", "writes a small captioned shapes dataset (for trying things out)"),
    ("profile_ops", "profile_ops(|| ...)", "runs the function with each layer kind's forward and sdtune's own backward passes timed (device synchronised around each): #{ kind: #{ calls, ms }, total: ... }; a training step also shows its optimizer (+ clipping); the rest of total is everything else (candle's backward ops, glue)"),
    ("plot", "plot(values) / plot(#{ series: #{ name: values }, title, x_label, y_label })", "a line plot; p.save(\"x.png\" or \"x.svg\"), show(p)"),
];

fn entry(name: &str) -> Option<&'static (&'static str, &'static str, &'static str)> {
    ENTRIES.iter().find(|(n, _, _)| *n == name)
}

/// The help text of a function or object type, if it has one.
pub fn lookup(name: &str) -> Option<String> {
    entry(name).map(|_| describe(name))
}

fn describe(name: &str) -> String {
    match entry(name) {
        Some((n, forms, what)) => {
            let mut s = format!("{n}: {what}\n  {forms}");
            let keys = super::option_keys_of(n);
            if !keys.is_empty() {
                s.push_str(&format!("\n  options: {}", keys.join(", ")));
            }
            s
        }
        None => {
            let close: Vec<&str> =
                ENTRIES.iter().map(|(n, _, _)| *n).filter(|n| n.contains(name) || name.contains(*n)).collect();
            if close.is_empty() {
                format!("no help for `{name}`; help() lists everything")
            } else {
                format!("no help for `{name}`; see {}", close.join(", "))
            }
        }
    }
}

fn overview() -> String {
    let mut s = String::from("sdtune script functions (help(\"name\") for one; help(value) for its type):\n");
    for (n, forms, _) in ENTRIES {
        s.push_str(&format!("  {:<18} {}\n", n, forms.split(" / ").next().unwrap_or(forms)));
    }
    s
}

pub fn register(engine: &mut Engine) {
    engine.register_fn("help", || println!("{}", overview()));
    engine.register_fn("help", |name: &str| println!("{}", describe(name)));
    engine.register_fn("help", |ctx: NativeCallContext, v: Dynamic| {
        let ty = ctx.engine().map_type_name(v.type_name()).to_string();
        println!("{}", describe(&ty));
    });
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_entry_describes_itself_and_options_come_from_the_tables() {
        for (n, _, _) in super::ENTRIES {
            assert!(super::describe(n).starts_with(&format!("{n}: ")));
        }
        let train = super::describe("train");
        assert!(train.contains("max_train_steps") && train.contains("min_snr_gamma"), "{train}");
        assert!(super::describe("load_model").contains("clip_skip"));
        assert!(super::describe("lor").contains("see lora"));
    }
}
