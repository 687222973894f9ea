//! Tokenizer ids against the reference implementations.

use crate::common::*;
use sdtune::models::tokenizer::{ClipTokenizer, EOS};
use serde_json::Value;

fn cases(file: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(fixture(&format!("clip-tokenizer/{file}"))).unwrap();
    serde_json::from_str::<Value>(&text).unwrap().as_array().unwrap().clone()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

#[test]
fn ids_equal_the_reference_on_every_case() {
    let tok = ClipTokenizer::new(EOS);
    let all = cases("tokenizer_cases.json");
    assert!(all.len() >= 30);
    for c in &all {
        let text = c["text"].as_str().unwrap();
        assert_eq!(tok.encode_full(text).unwrap(), ids(&c["ids"]), "case {text:?}");
    }
    assert!(all.iter().any(|c| ids(&c["ids"]).len() > 77), "the cases include prompts over 77 tokens");
}

/// We use the `tokenizers` crate on tokenizer.json, so our target is the tokenizer.json group (no ftfy).
#[test]
fn divergent_cases_follow_the_tokenizer_json_group() {
    let tok = ClipTokenizer::new(EOS);
    for c in cases("tokenizer_cases_divergent.json") {
        let text = c["text"].as_str().unwrap();
        let want = ids(&c["ids_by_implementation"]["tokenizer_json"]);
        assert_eq!(tok.encode_full(text).unwrap(), want, "case {text:?}");
    }
}

#[test]
fn padded_ids_match_the_golden_inputs_of_each_family() {
    for m in MODELS {
        let g = goldens(&format!("{m}/golden.safetensors"));
        let meta = sdtune::io::tensors::read_metadata(&fixture(&format!("{m}/golden.safetensors"))).unwrap();
        let prompts: Vec<String> = serde_json::from_str(&meta["te_prompts"]).unwrap();
        let model = load(&fixture(&format!("{m}/{m}.safetensors")));
        let want = g["te.in.input_ids"].to_vec2::<i64>().unwrap();
        for (p, w) in prompts.iter().zip(want) {
            let ours = model.tokenize(p).unwrap().to_vec2::<i64>().unwrap();
            assert_eq!(ours[0], w, "{m}: {p:?}");
        }
        for (key, prompt) in [("pipe.in.prompt_ids", "pipe_prompt"), ("pipe.in.negative_ids", "pipe_negative_prompt")] {
            let ours = model.tokenize(&meta[prompt]).unwrap().to_vec2::<i64>().unwrap();
            assert_eq!(ours, g[key].to_vec2::<i64>().unwrap(), "{m}: {key}");
        }
    }
}

#[test]
fn long_prompts_truncate_to_77_with_eos_last() {
    let tok = ClipTokenizer::new(0);
    let long = "a very long prompt, ".repeat(40);
    let full = tok.encode_full(&long).unwrap();
    assert!(full.len() > 77);
    let padded = tok.encode_padded(&long).unwrap();
    assert_eq!(padded.len(), 77);
    assert_eq!(&padded[..76], &full[..76]);
    assert_eq!(padded[76], EOS);
    let short = tok.encode_padded("a cat").unwrap();
    assert_eq!(short[..4], [49406, 320, 2368, EOS]);
    assert!(short[4..].iter().all(|&i| i == 0));
}
