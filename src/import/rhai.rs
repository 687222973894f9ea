//! A training recipe (the JSON of `train::build`) written out as a `.rhai` script to read, edit and share.

use super::Report;
use serde_json::{Map, Value};

/// A JSON value as a Rhai literal.
pub fn literal(v: &Value) -> String {
    match v {
        Value::Null => "()".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) if n.is_i64() || n.is_u64() => n.to_string(),
        Value::Number(n) => {
            let x = n.as_f64().unwrap_or(0.0);
            let s = format!("{x:?}");
            if s.contains(['.', 'e']) {
                s
            } else {
                format!("{s}.0")
            }
        }
        Value::String(s) => {
            let mut out = String::from("\"");
            for c in s.chars() {
                match c {
                    '"' => out.push_str("\\\""),
                    '\\' => out.push_str("\\\\"),
                    '\n' => out.push_str("\\n"),
                    '\t' => out.push_str("\\t"),
                    c => out.push(c),
                }
            }
            out.push('"');
            out
        }
        Value::Array(a) => format!("[{}]", a.iter().map(literal).collect::<Vec<_>>().join(", ")),
        Value::Object(m) => map_literal(m, ""),
    }
}

fn key(k: &str) -> String {
    let ident = k.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ident {
        k.to_string()
    } else {
        literal(&Value::from(k))
    }
}

/// `#{ k: v, ... }`, one entry per line when `indent` is given.
fn map_literal(m: &Map<String, Value>, indent: &str) -> String {
    if m.is_empty() {
        return "#{}".into();
    }
    let items: Vec<String> = m.iter().map(|(k, v)| format!("{}: {}", key(k), literal(v))).collect();
    if indent.is_empty() {
        format!("#{{ {} }}", items.join(", "))
    } else {
        format!("#{{\n{}\n}}", items.iter().map(|i| format!("{indent}{i},")).collect::<Vec<_>>().join("\n"))
    }
}

fn obj(v: &Value) -> Map<String, Value> {
    v.as_object().cloned().unwrap_or_default()
}

/// The recipe as a script. `source` and `how` say where it came from; paths become the script's arguments.
pub fn script(recipe: &Value, report: &Report, source: &str, how: &str) -> String {
    let mut s = String::new();
    s.push_str(&format!("// sdtune training recipe, imported from {source} by `{how}`.\n"));
    s.push_str(
        "// Run: sdtune run THIS.rhai [MODEL] [TRAINING_DATA] [OUTPUT_DIR]  (arguments replace the paths below)\n",
    );
    let lines = report.lines();
    if !lines.is_empty() {
        s.push_str("//\n// From the import report:\n");
        for l in lines {
            s.push_str(&format!("//   {l}\n"));
        }
    }
    let mut train = obj(&recipe["train"]);
    let output_dir = train.remove("output_dir");
    s.push('\n');
    let arg = |i: usize, name: &str, given: Option<&Value>, what: &str| -> String {
        let fallback = match given.filter(|v| !v.is_null()) {
            Some(v) => literal(v),
            None => format!("throw \"pass {what} as argument {}\"", i + 1),
        };
        format!("let {name} = if ARGS.len() > {i} {{ ARGS[{i}] }} else {{ {fallback} }};\n")
    };
    s.push_str(&arg(
        0,
        "model_path",
        recipe.get("model"),
        "the model to train (a checkpoint file or diffusers folder)",
    ));
    s.push_str(&arg(
        1,
        "data_path",
        recipe.get("dataset"),
        "the training data (a folder of N_concept folders or a dataset .toml)",
    ));
    let out = output_dir.unwrap_or_else(|| Value::from("output"));
    s.push_str(&arg(2, "output_dir", Some(&out), "the output folder"));
    s.push('\n');
    let model_options = obj(&recipe["model_options"]);
    let fine_tune = recipe.get("fine_tune").and_then(Value::as_bool).unwrap_or(false);
    let model_opts = {
        // full fine-tuning starts from the file's own weights (the trained copy is f32 either way)
        let mp = train.get("mixed_precision").and_then(|v| v.as_str()).filter(|m| *m != "no" && !fine_tune);
        let mut items: Vec<String> = model_options
            .iter()
            .filter(|(k, _)| k.as_str() != "dtype")
            .map(|(k, v)| format!("{}: {}", key(k), literal(v)))
            .collect();
        if let Some(mp) = mp {
            items.push(format!("dtype: training_dtype({})", literal(&Value::from(mp))));
        }
        if items.is_empty() {
            String::new()
        } else {
            format!(", #{{ {} }}", items.join(", "))
        }
    };
    s.push_str(&format!("let model = load_model(model_path{model_opts});\n"));
    let opts = obj(&recipe["dataset_options"]);
    s.push_str(&format!("let data = dataset(data_path, {});\n", map_literal(&opts, "    ")));
    let embedding = train.get("token_string").is_some_and(|v| !v.is_null());
    match recipe.get("network_weights").and_then(|v| v.as_str()) {
        _ if fine_tune => s.push_str("// no network: the model itself trains (DreamBooth / fine-tuning)\n"),
        _ if embedding => s.push_str("// no network: token_string's vectors train (textual inversion)\n"),
        Some(w) => s.push_str(&format!(
            "// continues training the weights of an existing file\nlet network = load_network({}, model);\n",
            literal(&Value::from(w))
        )),
        None => s.push_str(&format!("let network = lora(model, {});\n", map_literal(&obj(&recipe["network"]), "    "))),
    }
    let network_line = if fine_tune || embedding { "" } else { "    network: network,\n" };
    s.push_str(&format!("\nlet options = #{{\n    model: model,\n{network_line}    dataset: data,\n"));
    s.push_str("    output_dir: output_dir,\n");
    for (k, v) in &train {
        s.push_str(&format!("    {}: {},\n", key(k), literal(v)));
    }
    s.push_str("};\n");
    s.push_str("let run = train(options);\n");
    s.push_str("print(`trained ${run.step} steps: ${run.output}`);\n");
    s
}
