//! Every function of the script contract (`docs/script-api.md`, v1) called from a script:
//! `tests/scripts/contract.rhai` checks each result and throws on a failed check.

use crate::common::*;

#[test]
fn every_contract_function_works_from_a_script() {
    let dir = scratch("contract");
    let script = fixture("../scripts/contract.rhai");
    let args = [
        dir.display().to_string(),
        fixture("tiny-sd15/tiny-sd15.safetensors").display().to_string(),
        fixture("lora-sd15/lora_sd15_dim4_alpha2.safetensors").display().to_string(),
    ];
    if let Err(e) = sdtune::script::run_file(&script, &args) {
        panic!("{e}");
    }
    for f in ["loss.png", "loss.svg", "img.png", "tr.safetensors", "out/run.safetensors"] {
        assert!(dir.join(f).is_file(), "{f} was not written");
    }
    // the script names every function of the contract
    let text = std::fs::read_to_string(&script).unwrap();
    for name in [
        "print(",
        "show(",
        "load_tensors(",
        "save_tensors(",
        "randn(",
        ".shape",
        ".dtype",
        ".device",
        ".to_dtype(",
        ".to_device(",
        ".mean()",
        ".sum()",
        ".abs_max()",
        ".to_array()",
        "load_model(",
        ".family",
        ".v_pred",
        ".vae_scale",
        ".tokenize(",
        ".encode_ids(",
        ".encode_text(",
        ".unet(",
        ".vae_encode(",
        ".vae_decode(",
        "m.save(",
        "load_network(",
        "lora(",
        ".apply_network(",
        ".remove_network(",
        ".merge_network(",
        "net.save(",
        "read_metadata(",
        ".sample(",
        ".sample_latents(",
        "parse_prompt(",
        ".width",
        ".height",
        "img.save(",
        ".to_tensor()",
        "load_image(",
        "dataset(",
        ".len",
        ".buckets",
        ".batches_per_epoch",
        ".get(",
        "optimizer(",
        "lr_scheduler(",
        "train(",
        ".losses",
        ".step",
        ".epoch",
        ".stop()",
        ".save_now()",
        "trainer(",
        ".step()",
        ".step_with(",
        ".run()",
        ".network",
        ".model",
        "tr.save(",
        "resume(",
        "plot(",
        "p.save(",
    ] {
        assert!(text.contains(name), "contract.rhai does not call {name}");
    }
}

#[test]
fn the_ready_to_run_recipes_parse_and_explain_their_arguments() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let e = sdtune::script::run_file(&root.join("scripts/lora.rhai"), &[]).unwrap_err();
    assert!(e.contains("usage: sdtune run scripts/lora.rhai MODEL TRAIN_DATA OUTPUT_DIR"), "{e}");
    // the quickstart (run in full by .ci/run) compiles with the stdlib engine
    let source = std::fs::read_to_string(root.join("scripts/quickstart.rhai")).unwrap();
    sdtune::script::engine().compile(&source).unwrap();
}
