//! The `sdtune` command line: a thin front end over the library.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "sdtune", version, about = "A Stable Diffusion training studio scripted in Rhai")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a Rhai script; extra arguments are visible to it as the array `ARGS`.
    Run {
        /// The script file (.rhai).
        script: PathBuf,
        /// Arguments passed to the script.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The script engine line by line: values are printed, variables persist, Tab completes, history is kept
    /// (`$XDG_STATE_HOME/sdtune/history`), Ctrl-C stops what runs (a training saves its state), Ctrl-D exits.
    Repl,
    /// Render every prompt of a prompt file (sd-scripts' .txt/.toml/.json syntax) to PNGs.
    Sample(SampleArgs),
    /// Train a LoRA with sd-scripts' option names: `--pretrained_model_name_or_path M --train_data_dir D
    /// --output_dir O --network_dim 8 ...`, optionally `--config_file cfg.toml` or `--kohya gui.json` (a kohya_ss
    /// GUI config; flags win over either file). `--fine_tune` trains the model itself instead (DreamBooth, as
    /// train_db.py: `--learning_rate_te`, `--stop_text_encoder_training`, `--save_model_as safetensors|diffusers`).
    /// `--device cpu|cuda|cuda:N` picks the device (default: the first GPU when built with CUDA, else the CPU).
    /// Ctrl-C stops after the current step and saves a resumable state; `--resume STATE_DIR [--device D]`
    /// continues one.
    Train {
        /// sd-scripts options as `--name value` (lists: `--optimizer_args a=1 b=2`), flags as `--name`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Datasets: `sdtune dataset inspect PATH` reports subsets, repeats, buckets, steps per epoch and problems.
    Dataset {
        #[command(subcommand)]
        command: DatasetCommand,
    },
    /// The Jupyter kernel: `sdtune kernel install` registers it (kernelspec `sdtune`, "sdtune (Rhai)");
    /// Jupyter runs it as `sdtune kernel --connection-file F`.
    Kernel(KernelArgs),
    /// Bring a kohya_ss GUI config or an sd-scripts config as a `.rhai` recipe (with a report of what does not
    /// carry over).
    Import {
        #[command(subcommand)]
        command: ImportCommand,
    },
}

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
struct KernelArgs {
    /// The connection file Jupyter wrote (ports and signing key).
    #[arg(long)]
    connection_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<KernelCommand>,
}

#[derive(Subcommand)]
enum KernelCommand {
    /// Write the kernelspec (default: --user).
    Install(SpecWhere),
    /// Remove the kernelspec (default: --user).
    Uninstall(SpecWhere),
}

#[derive(clap::Args)]
#[group(multiple = false)]
struct SpecWhere {
    /// The user's Jupyter data folder ($JUPYTER_DATA_DIR, else ~/.local/share/jupyter on Linux).
    #[arg(long)]
    user: bool,
    /// The active Python environment ($VIRTUAL_ENV, $CONDA_PREFIX, else python3's sys.prefix).
    #[arg(long)]
    sys_prefix: bool,
    /// PREFIX/share/jupyter/kernels/sdtune.
    #[arg(long)]
    prefix: Option<PathBuf>,
}

impl SpecWhere {
    fn location(&self) -> sdtune::kernel::spec::Location {
        use sdtune::kernel::spec::Location;
        match (&self.prefix, self.sys_prefix) {
            (Some(p), _) => Location::Prefix(p.clone()),
            (None, true) => Location::SysPrefix,
            (None, false) => Location::User,
        }
    }
}

fn kernel(a: KernelArgs) -> anyhow::Result<()> {
    use sdtune::kernel::spec;
    match (a.command, a.connection_file) {
        (Some(KernelCommand::Install(w)), _) => {
            let dir = spec::install(&w.location())?;
            println!("installed the kernelspec `{}` in {}", spec::NAME, dir.display());
        }
        (Some(KernelCommand::Uninstall(w)), _) => {
            let dir = spec::uninstall(&w.location())?;
            println!("removed the kernelspec `{}` from {}", spec::NAME, dir.display());
        }
        (None, Some(f)) => sdtune::kernel::run(&f)?,
        (None, None) => {
            anyhow::bail!("sdtune kernel needs --connection-file FILE (Jupyter passes it), or `install` / `uninstall`")
        }
    }
    Ok(())
}

#[derive(Subcommand)]
enum ImportCommand {
    /// A kohya_ss GUI config or preset (.json).
    Kohya(ImportArgs),
    /// An sd-scripts `--config_file` (.toml).
    SdScripts(ImportArgs),
}

#[derive(clap::Args)]
struct ImportArgs {
    /// The config file.
    config: PathBuf,
    /// The recipe to write (default: the config's name with `.rhai`, in the current folder).
    #[arg(short, long)]
    output: Option<PathBuf>,
    /// Replace an existing recipe file.
    #[arg(long)]
    force: bool,
}

#[derive(Subcommand)]
enum DatasetCommand {
    /// Summarise a kohya folder (`N_concept` sub-folders) or a dataset .toml/.json, and list every problem.
    Inspect(InspectArgs),
}

#[derive(clap::Args)]
#[command(rename_all = "snake_case")]
struct InspectArgs {
    /// A training folder with `N_concept` sub-folders, or a dataset config (.toml / .json).
    path: PathBuf,
    /// `512` or `768,512` (width,height).
    #[arg(long)]
    resolution: Option<String>,
    #[arg(long)]
    batch_size: Option<usize>,
    #[arg(long)]
    enable_bucket: bool,
    #[arg(long)]
    min_bucket_reso: Option<usize>,
    #[arg(long)]
    max_bucket_reso: Option<usize>,
    #[arg(long)]
    bucket_reso_steps: Option<usize>,
    #[arg(long)]
    bucket_no_upscale: bool,
    /// Caption file extension (sd-scripts' default `.caption`; kohya_ss users mostly use `.txt`).
    #[arg(long)]
    caption_extension: Option<String>,
    /// Regularisation folder with `N_class` sub-folders.
    #[arg(long)]
    reg_data_dir: Option<PathBuf>,
    /// Stop at the first problem instead of skipping the image.
    #[arg(long)]
    strict: bool,
    /// Decode every image fully (finds truncated files whose headers are intact).
    #[arg(long)]
    verify: bool,
}

fn inspect(a: InspectArgs) -> anyhow::Result<()> {
    use sdtune::data::config::{General, Resolution};
    let resolution = match &a.resolution {
        None => None,
        Some(r) => Some(match r.split_once(',') {
            Some((w, h)) => Resolution::Pair([w.trim().parse()?, h.trim().parse()?]),
            None => Resolution::Square(
                r.trim().parse().map_err(|_| anyhow::anyhow!("--resolution: expected 512 or 768,512, got {r:?}"))?,
            ),
        }),
    };
    let call = General {
        resolution,
        batch_size: a.batch_size,
        enable_bucket: a.enable_bucket.then_some(true),
        min_bucket_reso: a.min_bucket_reso,
        max_bucket_reso: a.max_bucket_reso,
        bucket_reso_steps: a.bucket_reso_steps,
        bucket_no_upscale: a.bucket_no_upscale.then_some(true),
        caption_extension: a.caption_extension,
        ..Default::default()
    };
    let group = sdtune::data::open(
        &a.path,
        &sdtune::data::OpenOptions { call, reg_dir: a.reg_data_dir, in_json: None, strict: a.strict },
    )?;
    print!("{}", group.report());
    if a.verify {
        let mut bad = 0;
        for d in &group.datasets {
            for im in &d.images {
                if let Err(e) = sdtune::data::image::decode(&im.path) {
                    println!("  {e:#}");
                    bad += 1;
                }
            }
        }
        println!("verify: {bad} unreadable images");
        if bad > 0 && a.strict {
            anyhow::bail!("{bad} images cannot be decoded");
        }
    }
    Ok(())
}

#[derive(clap::Args)]
#[command(rename_all = "snake_case")]
struct SampleArgs {
    /// A single-file checkpoint or a diffusers folder.
    #[arg(long)]
    model: PathBuf,
    /// The prompt file (.txt lines with --n --w --h --d --l --s --ss, or .toml / .json).
    #[arg(long)]
    prompts: PathBuf,
    /// Output folder (created if missing; existing files are never overwritten).
    #[arg(long)]
    out: PathBuf,
    /// Sampler for prompts without --ss (sd-scripts names: ddim, euler_a, dpmsolver++, ...).
    #[arg(long, default_value = "ddim")]
    sampler: String,
    /// Steps for prompts without --s.
    #[arg(long, default_value_t = 30)]
    steps: usize,
    /// CFG scale for prompts without --l.
    #[arg(long, default_value_t = 7.5)]
    cfg: f64,
    /// Width for prompts without --w.
    #[arg(long, default_value_t = 512)]
    width: usize,
    /// Height for prompts without --h.
    #[arg(long, default_value_t = 512)]
    height: usize,
    /// Karras sigmas (sigma-based samplers).
    #[arg(long)]
    karras: bool,
    /// Use the n-th hidden state from the end of the text encoder.
    #[arg(long)]
    clip_skip: Option<usize>,
    /// The model predicts v (SD 2.x 768-v single files).
    #[arg(long)]
    v_pred: bool,
    /// Compute dtype: f32, f16 (bf16 on GPUs).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// cpu, cuda, cuda:N (default: cuda when available).
    #[arg(long)]
    device: Option<String>,
    /// A textual-inversion embedding (sd-scripts' / A1111's .safetensors or .pt) that prompts use by its file
    /// name (repeatable; `NAME=FILE` for another name).
    #[arg(long)]
    embedding: Vec<String>,
    /// A network file to sample with (LoRA, LoCon, LoHa, LoKr, DoRA; gen_img.py's `--network_weights`),
    /// repeatable.
    #[arg(long)]
    network_weights: Vec<PathBuf>,
    /// Each network's multiplier, in the order of `--network_weights` (gen_img.py's `--network_mul`; default 1).
    #[arg(long)]
    network_mul: Vec<f64>,
    /// Merge the networks into the weights instead of applying them (gen_img.py's `--network_merge`).
    #[arg(long)]
    network_merge: bool,
}

fn sample(a: SampleArgs) -> anyhow::Result<()> {
    use sdtune::device::{default_device, parse_device, parse_dtype};
    let opts = sdtune::models::LoadOptions {
        dtype: parse_dtype(&a.dtype)?,
        device: match &a.device {
            Some(d) => parse_device(d)?,
            None => default_device(),
        },
        v_pred: a.v_pred.then_some(true),
        ..Default::default()
    };
    sdtune::sample::schedulers::parse_sampler(&a.sampler)?;
    let model = sdtune::models::StableDiffusion::load(&a.model, &opts)?;
    for e in &a.embedding {
        let (word, file) = match e.split_once('=') {
            Some((w, f)) => (Some(w), f),
            None => (None, e.as_str()),
        };
        let word = model.load_embedding(std::path::Path::new(file), word)?;
        eprintln!("embedding {word}: {file}");
    }
    if a.network_mul.len() > a.network_weights.len() {
        anyhow::bail!(
            "--network_mul: {} values for {} --network_weights",
            a.network_mul.len(),
            a.network_weights.len()
        );
    }
    for (i, path) in a.network_weights.iter().enumerate() {
        let m = a.network_mul.get(i).copied().unwrap_or(1.0);
        let net = sdtune::networks::file::load(path, &model)?;
        if a.network_merge {
            net.merge(m)?;
        } else {
            net.apply(m);
        }
        let how = if a.network_merge { "merged" } else { "applied" };
        eprintln!("network {} ({} modules) {how} at {m}", path.display(), net.modules.len());
    }
    let defaults = sdtune::sample::SampleOptions {
        sampler: a.sampler,
        steps: a.steps,
        cfg: a.cfg,
        width: a.width,
        height: a.height,
        karras: a.karras,
        clip_skip: a.clip_skip,
        ..Default::default()
    };
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} steps, {per_sec}, ETA {eta}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    let written =
        sdtune::sample::batch::sample_prompt_file(&model, &a.prompts, &defaults, &a.out, &mut |i, n, s, steps| {
            if s == 1 {
                bar.set_length(steps as u64);
                bar.set_position(0);
                bar.set_message(format!("image {}/{n}", i + 1));
            }
            bar.set_position(s as u64);
        })?;
    bar.finish_and_clear();
    for p in written {
        println!("{}", p.display());
    }
    Ok(())
}

fn train(args: Vec<String>) -> anyhow::Result<()> {
    let mut flags = sdtune::import::parse_flags(&args)?;
    let mut trainer = if let Some(state) = flags.remove("resume") {
        let dir = state.as_str().ok_or_else(|| anyhow::anyhow!("--resume needs a state folder"))?.to_string();
        let device = match flags.remove("device") {
            Some(serde_json::Value::String(d)) => Some(d),
            Some(_) => anyhow::bail!("--device needs a name (cpu, cuda, cuda:N)"),
            None => None,
        };
        sdtune::train::build::resume(std::path::Path::new(&dir), device.as_deref())?
    } else {
        let mut flat = match flags.remove("config_file") {
            Some(serde_json::Value::String(p)) => sdtune::import::read_sd_scripts_toml(std::path::Path::new(&p))?,
            Some(_) => anyhow::bail!("--config_file needs a path"),
            None => serde_json::Map::new(),
        };
        if let Some(k) = flags.remove("kohya") {
            let path = std::path::PathBuf::from(k.as_str().ok_or_else(|| anyhow::anyhow!("--kohya needs a path"))?);
            let mut imported = sdtune::import::kohya(&path)?;
            for line in imported.report.lines() {
                eprintln!("{line}");
            }
            imported.report.check_runnable(&path)?;
            let out = flags
                .get("output_dir")
                .or(flat.get("output_dir"))
                .or(imported.options.get("output_dir"))
                .and_then(|v| v.as_str())
                .unwrap_or(".")
                .to_string();
            imported.write_prompts(&std::path::Path::new(&out).join("sample_prompts.txt"), false)?;
            flat.extend(imported.options);
        }
        flat.extend(flags);
        let (recipe, notes) = sdtune::train::build::recipe_from_flat(flat)?;
        for n in notes {
            eprintln!("note: {n}");
        }
        sdtune::train::build::build(&recipe)?
    };
    let _ = ctrlc::set_handler(|| {
        eprintln!("\nstopping after this step (a resumable state will be saved)...");
        sdtune::interrupt::request();
    });
    trainer.cfg.log_every_n_steps = 0;
    let bar = indicatif::ProgressBar::new(trainer.total_steps as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("steps {pos}/{len} [{bar:30}] {msg} {per_sec} ETA {eta}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar.set_position(trainer.step as u64);
    trainer.run(&mut |t, event| {
        let sdtune::train::Event::Step(loss) = event else { return };
        let avg = t.losses.iter().rev().take(100).sum::<f64>() / t.losses.len().clamp(1, 100) as f64;
        bar.set_message(format!("epoch {}/{} loss {loss:.4} avg {avg:.4}", t.epoch + 1, t.epochs));
        bar.set_position(t.step as u64);
    })?;
    bar.finish_and_clear();
    if trainer.stopped {
        println!(
            "stopped at step {}; resume with: sdtune train --resume {}",
            trainer.step,
            trainer.state_dir().display()
        );
    } else {
        println!("{}", trainer.final_path().display());
    }
    Ok(())
}

fn main() -> ExitCode {
    sdtune::device::use_all_cores();
    sdtune::device::keep_freed_memory();
    std::panic::set_hook(Box::new(|info| {
        eprintln!("error: internal error (please report it): {info}");
    }));
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run { script, args } => {
            // Ctrl-C: the script (or its training, saving a state) stops gracefully; a second one exits at once
            let _ = ctrlc::set_handler(|| {
                static PRESSED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
                if PRESSED.swap(true, std::sync::atomic::Ordering::SeqCst) {
                    std::process::exit(130);
                }
                eprintln!("\nstopping (Ctrl-C again to quit at once)...");
                sdtune::interrupt::request();
            });
            sdtune::script::run_file(&script, &args)
        }
        Command::Repl => sdtune::repl::run().map_err(|e| format!("{e:#}")),
        Command::Sample(a) => sample(a).map_err(|e| format!("{e:#}")),
        Command::Train { args } => train(args).map_err(|e| format!("{e:#}")),
        Command::Dataset { command: DatasetCommand::Inspect(a) } => inspect(a).map_err(|e| format!("{e:#}")),
        Command::Import { command } => import(command).map_err(|e| format!("{e:#}")),
        Command::Kernel(a) => kernel(a).map_err(|e| format!("{e:#}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("error: {}", sdtune::device::with_hint(msg).replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}

/// `sdtune import kohya|sd-scripts CONFIG`: the report on stderr, the recipe written, its path on stdout.
fn import(command: ImportCommand) -> anyhow::Result<()> {
    use sdtune::import;
    let (args, kind) = match command {
        ImportCommand::Kohya(a) => (a, "kohya"),
        ImportCommand::SdScripts(a) => (a, "sd-scripts"),
    };
    let mut imported = if kind == "kohya" { import::kohya(&args.config)? } else { import::sd_scripts(&args.config)? };
    for line in imported.report.lines() {
        eprintln!("{line}");
    }
    imported.report.check_runnable(&args.config)?;
    let stem = args.config.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "recipe".into());
    let out = args.output.unwrap_or_else(|| PathBuf::from(format!("{stem}.rhai")));
    let refuse = |p: &std::path::Path| -> anyhow::Result<()> {
        if p.exists() && !args.force {
            anyhow::bail!("{}: already exists; pass --force to replace it", p.display());
        }
        Ok(())
    };
    refuse(&out)?;
    imported.write_prompts(&out.with_extension("prompts.txt"), args.force)?;
    let (recipe, notes) = sdtune::train::build::recipe_from_flat(imported.options)?;
    let mut report = imported.report;
    for n in notes {
        let (k, why) = n.split_once(": ").unwrap_or(("", n.as_str()));
        report.ignored(k, why);
    }
    let text =
        import::rhai::script(&recipe, &report, &args.config.display().to_string(), &format!("sdtune import {kind}"));
    sdtune::io::tensors::write_atomic(&out, |f| Ok(std::io::Write::write_all(f, text.as_bytes())?))?;
    println!("{}", out.display());
    Ok(())
}
