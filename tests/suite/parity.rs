//! Parity with the diffusers/transformers goldens of the tiny fixtures (f32, max abs error ≤ 1e-4).

use crate::common::*;
use sdtune::models::StableDiffusion;
use std::collections::HashMap;

const ATOL: f64 = 1e-4;

fn check_all_goldens(model: &StableDiffusion, tag: &str, g: &HashMap<String, candle_core::Tensor>) {
    let ids = &g["te.in.input_ids"];
    let last = model.encode_ids(ids, Some(1), true, true).unwrap();
    assert_close(&format!("{tag} te.out.last_hidden_state"), &last.context, &g["te.out.last_hidden_state"], ATOL);
    assert_close(
        &format!("{tag} te.out.pooler_output"),
        last.pooled.as_ref().unwrap(),
        &g["te.out.pooler_output"],
        ATOL,
    );
    let pen = model.encode_ids(ids, Some(2), true, false).unwrap();
    assert_close(&format!("{tag} te.out.penultimate_final_ln"), &pen.context, &g["te.out.penultimate_final_ln"], ATOL);
    let raw = model.encode_ids(ids, Some(2), false, false).unwrap();
    assert_close(
        &format!("{tag} te.out.penultimate_hidden_state"),
        &raw.context,
        &g["te.out.penultimate_hidden_state"],
        ATOL,
    );

    let noise = model.unet(&g["unet.in.sample"], &g["unet.in.timesteps"], &g["unet.in.encoder_hidden_states"]).unwrap();
    assert_close(&format!("{tag} unet.out.noise_pred"), &noise, &g["unet.out.noise_pred"], ATOL);

    let post = model.vae_encode(&g["vae.encode.in.image"]).unwrap();
    assert_close(&format!("{tag} vae.encode.out.moments"), &post.moments, &g["vae.encode.out.moments"], ATOL);
    assert_close(&format!("{tag} vae.encode.out.mean"), &post.mean, &g["vae.encode.out.mean"], ATOL);
    assert_close(&format!("{tag} vae.encode.out.logvar"), &post.logvar, &g["vae.encode.out.logvar"], ATOL);
    let std = (&post.logvar * 0.5).unwrap().exp().unwrap();
    assert_close(&format!("{tag} vae.encode.out.std"), &std, &g["vae.encode.out.std"], ATOL);
    let image = model.vae_decode(&g["vae.decode.in.latents"]).unwrap();
    assert_close(&format!("{tag} vae.decode.out.image"), &image, &g["vae.decode.out.image"], ATOL);
}

#[test]
fn every_module_golden_matches_from_folder_and_single_file() {
    for m in MODELS {
        let g = goldens(&format!("{m}/golden.safetensors"));
        let folder = load(&fixture(m));
        check_all_goldens(&folder, &format!("{m} (diffusers folder)"), &g);
        let single = load(&fixture(&format!("{m}/{m}.safetensors")));
        check_all_goldens(&single, &format!("{m} (single file)"), &g);
    }
}

#[test]
fn ckpt_single_file_loads_like_the_safetensors_one() {
    let g = goldens("tiny-sd2/golden.safetensors");
    let ckpt = load(&fixture("tiny-sd2/tiny-sd2.ckpt"));
    check_all_goldens(&ckpt, "tiny-sd2 (.ckpt)", &g);
    let st = load(&fixture("tiny-sd2/tiny-sd2.safetensors")).components;
    for (k, t) in &ckpt.components.unet {
        assert_eq!(max_abs_diff(t, &st.unet[k]), 0.0, "{k}");
    }
    assert_eq!(ckpt.components.unet.len(), st.unet.len());
    assert_eq!(ckpt.components.text_encoder.len(), st.text_encoder.len());
    assert_eq!(ckpt.components.vae.len(), st.vae.len());
}

#[test]
fn folder_and_single_file_load_identical_weights() {
    for m in MODELS {
        let a = load(&fixture(m)).components;
        let b = load(&fixture(&format!("{m}/{m}.safetensors"))).components;
        for (what, x, y) in
            [("unet", &a.unet, &b.unet), ("vae", &a.vae, &b.vae), ("text_encoder", &a.text_encoder, &b.text_encoder)]
        {
            let mut kx: Vec<_> = x.keys().collect();
            let mut ky: Vec<_> = y.keys().collect();
            kx.sort();
            ky.sort();
            assert_eq!(kx, ky, "{m} {what}: key sets differ");
            for k in kx {
                assert_eq!(x[k].dims(), y[k].dims(), "{m} {what} {k}: shape");
                assert_eq!(max_abs_diff(&x[k], &y[k]), 0.0, "{m} {what} {k}: values differ");
            }
        }
        assert!(
            b.extras.is_empty(),
            "{m}: unexpected unused single-file keys: {:?}",
            b.extras.keys().collect::<Vec<_>>()
        );
    }
}

#[test]
fn families_and_conventions_are_detected() {
    let sd15 = load(&fixture("tiny-sd15/tiny-sd15.safetensors"));
    assert_eq!(sd15.family.name(), "sd1");
    assert_eq!(sd15.tokenizer.pad_id, 49407);
    assert!((sd15.vae_scale - 0.18215).abs() < 1e-12);
    let sd2 = load(&fixture("tiny-sd2"));
    assert_eq!(sd2.family.name(), "sd2");
    assert_eq!(sd2.tokenizer.pad_id, 0);
    assert!(sd2.v_pred, "tiny-sd2's scheduler config says v_prediction");
    assert_eq!(sd2.unet.cfg.heads_list(), vec![2, 4, 4, 4]);
    assert!(sd2.unet.cfg.use_linear_projection);
    assert!(!sd15.unet.cfg.use_linear_projection);
}

#[test]
fn f16_load_runs_close_to_f32() {
    let opts = sdtune::models::LoadOptions { dtype: candle_core::DType::F16, ..Default::default() };
    let m = StableDiffusion::load(&fixture("tiny-sd15/tiny-sd15.safetensors"), &opts).unwrap();
    let g = goldens("tiny-sd15/golden.safetensors");
    let noise = m.unet(&g["unet.in.sample"], &g["unet.in.timesteps"], &g["unet.in.encoder_hidden_states"]).unwrap();
    assert_eq!(noise.dtype(), candle_core::DType::F16);
    // f16 activations: a loose sanity bound, not a parity claim.
    let d = max_abs_diff(&noise, &g["unet.out.noise_pred"]);
    assert!(d < 5e-2, "f16 UNet deviates by {d}");
}
