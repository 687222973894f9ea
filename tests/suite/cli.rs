//! The `sdtune` binary: scripts that reproduce goldens, and bad input that must give one-line errors.

use crate::common::*;
use std::path::Path;
use std::process::Command;

fn sdtune(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_sdtune")).args(args).output().expect("sdtune runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn script(dir: &Path, name: &str, body: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, body).unwrap();
    p.to_string_lossy().into_owned()
}

/// Asserts a failed run: non-zero exit, exactly one `error:` line naming what is expected, no panic.
fn assert_one_line_error(code: i32, stderr: &str, must_contain: &[&str]) {
    assert_ne!(code, 0, "expected failure; stderr: {stderr}");
    assert!(!stderr.contains("panicked") && !stderr.contains("internal error"), "panic: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.starts_with("warning:")).collect();
    assert_eq!(lines.len(), 1, "expected one error line, got: {stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    for s in must_contain {
        assert!(lines[0].contains(s), "error line lacks {s:?}: {}", lines[0]);
    }
}

#[test]
fn contract_script_reproduces_goldens_under_sdtune_run() {
    let dir = scratch("cli-parity");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scripts/golden_parity.rhai");
    for m in MODELS {
        for model in [fixture(m), fixture(&format!("{m}/{m}.safetensors"))] {
            let out = dir.join(format!("{m}.safetensors"));
            let golden = fixture(&format!("{m}/golden.safetensors"));
            let (code, stdout, stderr) = sdtune(&[
                "run",
                script.to_str().unwrap(),
                model.to_str().unwrap(),
                golden.to_str().unwrap(),
                out.to_str().unwrap(),
            ]);
            assert_eq!(code, 0, "stderr: {stderr}");
            assert!(stdout.contains("unet.out.noise_pred"), "{stdout}");
            let ours = sdtune::io::tensors::read_safetensors(&out, None, &candle_core::Device::Cpu).unwrap().tensors;
            let g = goldens(&format!("{m}/golden.safetensors"));
            assert_eq!(ours.len(), 6);
            for (k, t) in &ours {
                assert_close(&format!("{m} script {k}"), t, &g[k], 1e-4);
            }
        }
    }
}

#[test]
fn script_sees_args_and_model_properties() {
    let dir = scratch("cli-props");
    let model = fixture("tiny-sd2/tiny-sd2.safetensors");
    let s = script(
        &dir,
        "props.rhai",
        r#"
let m = load_model(ARGS[0], #{ v_pred: true, clip_skip: 1, dtype: "f32", device: "cpu" });
print(`${m.family} ${m.v_pred} ${m.vae_scale} ${ARGS.len()}`);
let ids = m.tokenize("a cat");
print(ids.shape);
print(ids.to_array()[0].extract(0, 4));
let x = randn([2, 3], 7);
let y = randn([2, 3], 7);
if (x - y).abs_max() != 0.0 { throw "randn is not deterministic"; }
print((x * 0.0 + 2).mean());
print(read_metadata(ARGS[1]).len());
"#,
    );
    let golden = fixture("tiny-sd2/golden.safetensors");
    let (code, stdout, stderr) = sdtune(&["run", &s, model.to_str().unwrap(), golden.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], "sd2 true 0.18215 2");
    assert_eq!(lines[1], "[1, 77]");
    assert_eq!(lines[2], "[49406, 320, 2368, 49407]");
    assert_eq!(lines[3], "2.0");
    assert!(lines[4].parse::<usize>().unwrap() >= 5);
}

#[test]
fn missing_path_is_a_one_line_error() {
    let dir = scratch("cli-missing");
    let s = script(&dir, "missing.rhai", "let m = load_model(\"/no/such/model.safetensors\");\n");
    let (code, _, stderr) = sdtune(&["run", &s]);
    assert_one_line_error(code, &stderr, &["missing.rhai:1", "/no/such/model.safetensors", "no such file"]);
    let (code, _, stderr) = sdtune(&["run", "/no/such/script.rhai"]);
    assert_one_line_error(code, &stderr, &["/no/such/script.rhai", "cannot read script"]);
}

#[test]
fn folder_that_is_not_diffusers_is_a_one_line_error() {
    let dir = scratch("cli-notdiffusers");
    std::fs::create_dir_all(dir.join("just-a-folder/unet")).unwrap();
    let s = script(&dir, "folder.rhai", &format!("load_model({:?});\n", dir.join("just-a-folder").to_string_lossy()));
    let (code, _, stderr) = sdtune(&["run", &s]);
    assert_one_line_error(code, &stderr, &["folder.rhai:1", "not a diffusers folder", "model_index.json", "vae/"]);
}

#[test]
fn truncated_safetensors_is_a_one_line_error() {
    let dir = scratch("cli-truncated");
    let bytes = std::fs::read(fixture("tiny-sd15/tiny-sd15.safetensors")).unwrap();
    for (name, len) in [("half.safetensors", bytes.len() / 2), ("header.safetensors", 100), ("tiny.safetensors", 3)] {
        let p = dir.join(name);
        std::fs::write(&p, &bytes[..len]).unwrap();
        let s = script(&dir, "trunc.rhai", &format!("\n\nload_model({:?});\n", p.to_string_lossy()));
        let (code, _, stderr) = sdtune(&["run", &s]);
        assert_one_line_error(code, &stderr, &["trunc.rhai:3", name, "truncated"]);
    }
}

#[test]
fn corrupt_ckpt_is_a_one_line_error() {
    let dir = scratch("cli-ckpt");
    let p = dir.join("broken.ckpt");
    std::fs::write(&p, b"PK\x03\x04 this is not a torch checkpoint").unwrap();
    let s = script(&dir, "ckpt.rhai", &format!("load_model({:?});\n", p.to_string_lossy()));
    let (code, _, stderr) = sdtune(&["run", &s]);
    assert_one_line_error(code, &stderr, &["ckpt.rhai:1", "broken.ckpt", "not a readable PyTorch checkpoint"]);
}

#[test]
fn safetensors_of_an_unknown_model_is_a_one_line_error() {
    let dir = scratch("cli-unknown");
    let p = dir.join("other.safetensors");
    let s = script(
        &dir,
        "unknown.rhai",
        &format!("save_tensors(#{{ \"encoder.weight\": randn([4, 4], 1), \"head.bias\": randn([4], 2) }}, {:?});\nload_model({:?});\n", p.to_string_lossy(), p.to_string_lossy()),
    );
    let (code, _, stderr) = sdtune(&["run", &s]);
    assert_one_line_error(
        code,
        &stderr,
        &["unknown.rhai:2", "other.safetensors", "not a Stable Diffusion checkpoint", "model.diffusion_model"],
    );
}

#[test]
fn sdxl_samples_with_a_lora_and_refuses_sd1_block_options() {
    let dir = scratch("cli-sdxl");
    let model = fixture("tiny-sdxl/tiny-sdxl.safetensors");
    let lora = fixture("lora-sdxl/lora_sdxl_dim4_alpha1.safetensors");
    let s = script(
        &dir,
        "xl.rhai",
        &format!(
            "let m = load_model({:?});\nprint(m.family);\nm.apply_network(load_network({:?}, m), 0.5);\nlet l = m.sample_latents(#{{ prompt: \"a fox\", width: 64, height: 64, steps: 2, seed: 1 }});\nprint(l.shape);\nlora(m, #{{ dim: 4, block_dims: \"{}\" }});\n",
            model.to_string_lossy(),
            lora.to_string_lossy(),
            ["4"; 25].join(",")
        ),
    );
    let (code, stdout, stderr) = sdtune(&["run", &s]);
    assert!(stdout.contains("sdxl") && stdout.contains("[1, 4, 8, 8]"), "{stdout}");
    assert_one_line_error(code, &stderr, &["xl.rhai:6", "SDXL networks take one dim"]);
}

#[test]
fn script_syntax_error_names_file_and_line() {
    let dir = scratch("cli-syntax");
    let s = script(&dir, "bad.rhai", "let a = 1;\nlet b = (a + ;\n");
    let (code, _, stderr) = sdtune(&["run", &s]);
    assert_one_line_error(code, &stderr, &["bad.rhai:2", "syntax error"]);
}

#[test]
fn unknown_option_lists_the_accepted_ones() {
    let dir = scratch("cli-opts");
    let s = script(
        &dir,
        "opts.rhai",
        &format!("load_model({:?}, #{{ clipskip: 2 }});\n", fixture("tiny-sd15").to_string_lossy()),
    );
    let (code, _, stderr) = sdtune(&["run", &s]);
    assert_one_line_error(code, &stderr, &["opts.rhai:1", "unknown option `clipskip`", "clip_skip"]);
}

#[test]
fn sampling_contract_functions_work_from_scripts() {
    let dir = scratch("cli-sample-api");
    let png = dir.join("cat.png");
    let s = script(
        &dir,
        "sample.rhai",
        &format!(
            r#"
let m = load_model({model:?});
let img = m.sample("a (cat:1.2) --n dog --w 64 --h 64 --d 9 --s 3 --ss heun");
print(`${{img.width}}x${{img.height}}`);
img.save({png:?});
let back = load_image({png:?});
print(back.parameters);
print(back.to_tensor().shape);
print(parse_prompt("a (b:1.5) [c]"));
let l = m.sample_latents(#{{ prompt: "x", width: 64, height: 64, steps: 2, seed: 1, sampler: "dpm_2_a", karras: true }});
print(l.shape);
m.sample(#{{ prompt: "x", width: 64, height: 64, steps: 2, sampler: "nope" }});
"#,
            model = fixture("tiny-sd15").to_string_lossy(),
            png = png.to_string_lossy()
        ),
    );
    let (code, stdout, stderr) = sdtune(&["run", &s]);
    assert_ne!(code, 0, "the last line must fail");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], "64x64");
    assert_eq!(lines[1], "a (cat:1.2)");
    assert_eq!(lines[2], "Negative prompt: dog");
    assert!(lines[3].starts_with("Steps: 3, Sampler: Heun, CFG scale: 7.5, Seed: 9, Size: 64x64"), "{}", lines[3]);
    assert_eq!(lines[4], "[1, 3, 64, 64]");
    assert_eq!(lines[5], r#"[["a ", 1.0], ["b", 1.5], [" ", 1.0], ["c", 0.9090909090909091]]"#);
    assert_eq!(lines[6], "[1, 4, 8, 8]");
    assert_one_line_error(code, &stderr, &["sample.rhai:12", "unknown sampler \"nope\"", "euler_a"]);
}
