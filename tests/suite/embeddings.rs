//! Textual-inversion embeddings in prompts: loaded from sd-scripts' / A1111's files, tokenized and encoded as
//! diffusers' `load_textual_inversion` does (goldens from `tests/python/make_embedding_goldens.py`).

use crate::common::*;
use candle_core::{DType, Tensor};

const PROMPTS: [&str; 4] =
    ["a photo of toyemb on a table", "toyemb, toyemb", "toyemb in the snow, a red circle", "a plain photo"];

fn ids(m: &sdtune::models::StableDiffusion, p: &str) -> Vec<i64> {
    m.tokenize(p).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

fn golden_ids(g: &std::collections::HashMap<String, Tensor>, k: &str) -> Vec<i64> {
    g[k].flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn sd15_embeddings_tokenize_and_encode_as_diffusers() {
    let g = goldens("embeddings/golden.safetensors");
    let m = load(&fixture("tiny-sd15/tiny-sd15.safetensors"));
    let word = m.load_embedding(&fixture("embeddings/toy-sd15.safetensors"), Some("toyemb")).unwrap();
    assert_eq!(word, "toyemb");
    for (i, p) in PROMPTS.iter().enumerate() {
        assert_eq!(ids(&m, p), golden_ids(&g, &format!("sd15.p{i}.ids")), "{p}");
        let ctx = m.encode_ids(&m.tokenize(p).unwrap(), None, true, false).unwrap().context;
        assert_close(&format!("sd15 context {p:?}"), &ctx, &g[&format!("sd15.p{i}.context")], 1e-5);
        // the sampling path (A1111 weighting, all weights 1) encodes the same
        let lpw = sdtune::sample::prompt::encode_prompts(&m, &[p.to_string()], 1, None).unwrap().context;
        assert_close(&format!("sd15 weighted-prompt context {p:?}"), &lpw, &g[&format!("sd15.p{i}.context")], 1e-5);
    }
    // a whole word, any case
    assert_eq!(ids(&m, "A photo of TOYEMB on a table"), golden_ids(&g, "sd15.p0.ids"));
    assert!(ids(&m, "toyembs").iter().all(|&i| i < 49408), "a longer word is not the embedding");
    // A1111's pickle holds the same vectors
    let m2 = load(&fixture("tiny-sd15/tiny-sd15.safetensors"));
    assert_eq!(m2.load_embedding(&fixture("embeddings/toy-sd15.pt"), None).unwrap(), "toy-sd15");
    let a = m.encode_ids(&m.tokenize("toyemb").unwrap(), None, true, false).unwrap().context;
    let b = m2.encode_ids(&m2.tokenize("toy-sd15").unwrap(), None, true, false).unwrap().context;
    assert_eq!(max_abs_diff(&a, &b), 0.0);
    // a second name is refused, as are vectors of another width
    let e = format!("{:#}", m.load_embedding(&fixture("embeddings/toy-sd15.safetensors"), Some("ToyEmb")).unwrap_err());
    assert!(e.contains("already loaded"), "{e}");
    let wide = Tensor::zeros((2, 768), DType::F32, &candle_core::Device::Cpu).unwrap();
    let e = format!("{:#}", m.add_embedding("wide", &[wide]).unwrap_err());
    assert!(e.contains("768-wide vectors") && e.contains("takes 32"), "{e}");
}

#[test]
fn sdxl_embeddings_feed_both_text_encoders_as_diffusers() {
    let g = goldens("embeddings/golden.safetensors");
    let m = load(&fixture("tiny-sdxl/tiny-sdxl.safetensors"));
    let e = format!("{:#}", m.load_embedding(&fixture("embeddings/toy-sd15.safetensors"), None).unwrap_err());
    assert!(e.contains("clip_l") && e.contains("emb_params"), "{e}");
    m.load_embedding(&fixture("embeddings/toy-sdxl.safetensors"), Some("toyemb")).unwrap();
    for (i, p) in PROMPTS.iter().enumerate() {
        assert_eq!(ids(&m, p), golden_ids(&g, &format!("sdxl.p{i}.ids")), "{p}");
        let ctx = m.encode_ids(&m.tokenize(p).unwrap(), None, true, false).unwrap().context;
        assert_close(&format!("sdxl context {p:?}"), &ctx, &g[&format!("sdxl.p{i}.context")], 1e-5);
    }
    // an SD embedding file in an SD 1.x model names what it lacks
    let sd = load(&fixture("tiny-sd15/tiny-sd15.safetensors"));
    let e = format!("{:#}", sd.load_embedding(&fixture("embeddings/toy-sdxl.safetensors"), None).unwrap_err());
    assert!(e.contains("SDXL embedding?"), "{e}");
}
