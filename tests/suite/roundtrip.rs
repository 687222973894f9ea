//! Saving and reloading: single file → diffusers → single file keeps names and values.

use crate::common::*;
use candle_core::{DType, Device};
use sdtune::models::SaveFormat;

#[test]
fn single_to_diffusers_to_single_is_lossless() {
    for m in MODELS {
        let dir = scratch(&format!("roundtrip-{m}"));
        let src = fixture(&format!("{m}/{m}.safetensors"));
        let original = sdtune::io::tensors::read_safetensors(&src, None, &Device::Cpu).unwrap().tensors;
        let model = load(&src);
        let folder = dir.join("diffusers");
        model.save(&folder, SaveFormat::Diffusers, DType::F16, false).unwrap();
        let reloaded = load(&folder);
        let single = dir.join("again.safetensors");
        reloaded.save(&single, SaveFormat::SingleFile, DType::F16, false).unwrap();
        let again = sdtune::io::tensors::read_safetensors(&single, None, &Device::Cpu).unwrap().tensors;
        let mut a: Vec<_> = original.keys().collect();
        let mut b: Vec<_> = again.keys().collect();
        a.sort();
        b.sort();
        assert_eq!(a, b, "{m}: tensor names differ after the round trip");
        for k in a {
            assert_eq!(original[k].dtype(), again[k].dtype(), "{m} {k}: dtype");
            assert_eq!(original[k].dims(), again[k].dims(), "{m} {k}: shape");
            assert_eq!(max_abs_diff(&original[k], &again[k]), 0.0, "{m} {k}: values");
        }
        // The written folder is a diffusers folder that reproduces the goldens.
        let g = goldens(&format!("{m}/golden.safetensors"));
        let noise =
            reloaded.unet(&g["unet.in.sample"], &g["unet.in.timesteps"], &g["unet.in.encoder_hidden_states"]).unwrap();
        assert_close(&format!("{m} unet after round trip"), &noise, &g["unet.out.noise_pred"], 1e-4);
        for f in [
            "model_index.json",
            "unet/config.json",
            "vae/config.json",
            "text_encoder/config.json",
            "scheduler/scheduler_config.json",
            "tokenizer/vocab.json",
        ] {
            assert!(folder.join(f).is_file(), "{m}: {f} missing");
        }
    }
}

#[test]
fn save_refuses_to_overwrite_unless_asked() {
    let dir = scratch("overwrite");
    let model = load(&fixture("tiny-sd15/tiny-sd15.safetensors"));
    let out = dir.join("m.safetensors");
    std::fs::write(&out, b"user data").unwrap();
    let err = model.save(&out, SaveFormat::SingleFile, DType::F16, false).unwrap_err().to_string();
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(std::fs::read(&out).unwrap(), b"user data");
    model.save(&out, SaveFormat::SingleFile, DType::F16, true).unwrap();
    assert!(std::fs::metadata(&out).unwrap().len() > 1000);
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left behind");
}
