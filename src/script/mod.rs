//! The Rhai scripting host: one engine with thin bindings over the Rust API, and `run` for script files.

mod data_api;
pub use data_api::{from_json, to_json};
mod errors;
pub mod help;
mod model_api;
mod opts;
mod plot_api;
mod profile_api;
mod sample_api;
mod tensor_api;
mod train_api;

pub use errors::{describe_eval, locate};
pub use model_api::Model;
pub use tensor_api::randn_vec;

use rhai::{Array, Dynamic, Engine, Scope};
use std::path::Path;

/// A fresh engine with every sdtune function registered.
pub fn engine() -> Engine {
    let mut engine = Engine::new();
    engine.set_max_expr_depths(0, 0);
    tensor_api::register(&mut engine);
    model_api::register(&mut engine);
    sample_api::register(&mut engine);
    data_api::register(&mut engine);
    train_api::register(&mut engine);
    plot_api::register(&mut engine);
    profile_api::register(&mut engine);
    engine.register_fn("show", |x: Dynamic| errors::rt(show(x)));
    help::register(&mut engine);
    // `debug(x)` writes to stderr, with where it was called
    engine.on_debug(|text, source, pos| eprintln!("{}: {text}", locate(source.unwrap_or("script"), pos)));
    let resolver = module_resolver(&engine);
    engine.set_module_resolver(resolver);
    // Ctrl-C stops a running script at its next operation (a training loop stops first, saving its state);
    // an abort ends the script even after a training consumed the request
    engine.on_progress(|_| {
        (crate::interrupt::take() || crate::interrupt::aborting()).then(|| Dynamic::from(INTERRUPTED))
    });
    engine
}

/// The message of a script stopped by an interrupt.
pub const INTERRUPTED: &str = "interrupted";

/// The bundled Rhai modules (`stdlib/`), importable by name from any folder.
pub const STDLIB: &[(&str, &str)] = &[("lora", include_str!("../../stdlib/lora.rhai"))];

/// `import "name"`: a `.rhai` file next to the importing script (or the working folder) first, then the stdlib.
fn module_resolver(engine: &Engine) -> rhai::module_resolvers::ModuleResolversCollection {
    use rhai::module_resolvers::{FileModuleResolver, ModuleResolversCollection, StaticModuleResolver};
    let mut stdlib = StaticModuleResolver::new();
    for (name, source) in STDLIB {
        let module = engine
            .compile(*source)
            .map_err(|e| e.to_string())
            .and_then(|ast| rhai::Module::eval_ast_as_new(Scope::new(), &ast, engine).map_err(|e| e.to_string()));
        match module {
            Ok(m) => stdlib.insert(*name, m),
            Err(e) => eprintln!("internal: stdlib module `{name}` does not load: {e}"),
        }
    }
    let mut all = ModuleResolversCollection::new();
    all.push(FileModuleResolver::new());
    all.push(stdlib);
    all
}

/// The fields an option table accepts (from its unknown-field error, so the table itself is the one list).
fn field_names<T: serde::de::DeserializeOwned>() -> Vec<String> {
    let Err(e) = serde_json::from_value::<T>(serde_json::json!({ "\u{1}": 0 })) else { return Vec::new() };
    let msg = e.to_string();
    let Some(list) = msg.split("expected one of ").nth(1) else { return Vec::new() };
    list.split('`').skip(1).step_by(2).map(String::from).collect()
}

/// The option keys a function takes (for help and completion).
pub fn option_keys_of(function: &str) -> Vec<String> {
    let strs = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    match function {
        "train" | "trainer" => {
            let mut k = strs(&["model", "network", "dataset", "optimizer", "lr_scheduler"]);
            k.extend(field_names::<crate::train::config::TrainConfig>());
            k
        }
        "lora" => field_names::<crate::train::build::NetworkOptions>(),
        "dataset" => {
            let mut k = field_names::<crate::data::config::General>();
            k.extend(strs(&["reg_data_dir", "in_json", "strict"]));
            k
        }
        "load_model" => strs(model_api::LOAD_KEYS),
        "Model" => strs(sample_api::SAMPLE_KEYS),
        _ => Vec::new(),
    }
}

/// Every option key of every function.
pub fn option_keys() -> Vec<String> {
    ["train", "lora", "dataset", "load_model", "Model"].iter().flat_map(|f| option_keys_of(f)).collect()
}

/// The image a value shows as: an Image, a Plot (800×450) or an image tensor (`[1, 3, H, W]` in [-1, 1]).
/// Anything else (a tensor of another shape included) is `None`.
pub fn as_image(x: &Dynamic) -> anyhow::Result<Option<crate::io::png::Image>> {
    if let Some(img) = x.clone().try_cast::<crate::io::png::Image>() {
        return Ok(Some(img));
    }
    if let Some(p) = x.clone().try_cast::<crate::io::plot::Plot>() {
        return Ok(Some(p.image(800, 450)?));
    }
    Ok(x.clone().try_cast::<candle_core::Tensor>().and_then(|t| crate::io::png::Image::from_tensor(&t).ok()))
}

/// `show(x)`: images, plots and image tensors go to the display; anything else is printed.
fn show(x: Dynamic) -> anyhow::Result<()> {
    match as_image(&x)? {
        Some(img) => crate::display::image(&img),
        None => {
            println!("{x}");
            Ok(())
        }
    }
}

/// Runs a script file with `ARGS`; the error is one line naming the file, the script position and the cause.
pub fn run_file(path: &Path, args: &[String]) -> Result<(), String> {
    let name = path.display().to_string();
    let source = std::fs::read_to_string(path).map_err(|e| format!("{name}: cannot read script: {e}"))?;
    let engine = engine();
    let mut ast = engine.compile(&source).map_err(|e| format!("{}: syntax error: {}", locate(&name, e.1), e.0))?;
    ast.set_source(name.as_str());
    let mut scope = Scope::new();
    let argv: Array = args.iter().map(|a| Dynamic::from(a.clone())).collect();
    scope.push_constant("ARGS", argv);
    engine.run_ast_with_scope(&mut scope, &ast).map_err(|e| describe_eval(&name, &e))
}
