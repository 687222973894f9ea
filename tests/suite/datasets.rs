//! Datasets: kohya folders, dataset configs, captions on disk, bad input, epochs, the latent cache and the loader.

use crate::common::*;
use sdtune::data::config::{read_config_file, General, Resolution};
use sdtune::data::{open, OpenOptions};
use std::path::{Path, PathBuf};

/// Writes a w×h RGB image (a gradient) in the format given by the extension.
fn write_image(path: &Path, w: u32, h: u32) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([(x * 255 / w.max(1)) as u8, (y * 255 / h.max(1)) as u8, 128])
    });
    img.save(path).unwrap();
}

fn opts(res: usize, bucket: bool) -> OpenOptions {
    OpenOptions {
        call: General {
            resolution: Some(Resolution::Square(res)),
            enable_bucket: Some(bucket),
            min_bucket_reso: Some(64),
            max_bucket_reso: Some(256),
            bucket_reso_steps: Some(32),
            caption_extension: Some(".txt".into()),
            batch_size: Some(4),
            ..Default::default()
        },
        ..Default::default()
    }
}

/// train/10_cat (3 captioned + 1 uncaptioned), train/2_dog (2), train/notes (ignored), reg/1_animal (2).
fn kohya_folder(root: &Path) -> (PathBuf, PathBuf) {
    let train = root.join("train");
    for (i, (w, h)) in [(128, 128), (160, 96), (96, 160), (128, 128)].iter().enumerate() {
        write_image(&train.join(format!("10_cat/img{i}.png")), *w, *h);
        if i < 3 {
            std::fs::write(train.join(format!("10_cat/img{i}.txt")), format!("cat {i}, sitting, indoors")).unwrap();
        }
    }
    write_image(&train.join("2_dog/a.jpg"), 128, 128);
    write_image(&train.join("2_dog/b.webp"), 128, 96);
    std::fs::create_dir_all(train.join("notes")).unwrap();
    let reg = root.join("reg");
    write_image(&reg.join("1_animal/r1.bmp"), 128, 128);
    write_image(&reg.join("1_animal/r2.png"), 128, 128);
    (train, reg)
}

#[test]
fn kohya_folders_give_sd_scripts_counts() {
    let dir = scratch("ds-folder");
    let (train, reg) = kohya_folder(&dir);
    let mut o = opts(128, true);
    o.reg_dir = Some(reg);
    let g = open(&train, &o).unwrap();
    let d = &g.datasets[0];
    // 4 cat images × 10 + 2 dog × 2 = 44 training samples; 2 reg images balanced up to 44 (22 repeats each)
    assert_eq!(d.images.iter().filter(|i| !i.is_reg).map(|i| i.num_repeats).sum::<usize>(), 44);
    assert_eq!(d.images.iter().filter(|i| i.is_reg).map(|i| i.num_repeats).collect::<Vec<_>>(), vec![22, 22]);
    assert_eq!(g.len(), 88);
    // captions: file, else class tokens
    let cap = |name: &str| d.images.iter().find(|i| i.path.ends_with(name)).unwrap().caption.clone();
    assert_eq!(cap("img0.png"), "cat 0, sitting, indoors");
    assert_eq!(cap("img3.png"), "cat");
    assert_eq!(cap("a.jpg"), "dog");
    // buckets at 128² (steps 32, 64..256): 128x128, 160x96 → (160,96), 96x160 → (96,160), 128x96 → (128,96)?
    let b = g.buckets();
    assert_eq!(b.values().sum::<usize>(), 88);
    assert_eq!(g.batches_per_epoch(), b.values().map(|n| n.div_ceil(4)).sum::<usize>());
    assert!(g.notes.iter().any(|n| n.contains("notes") && n.contains("<repeats>_<concept>")), "{:?}", g.notes);
    let report = g.report();
    assert!(
        report.contains("10 repeats")
            && report.contains("batches (steps) per epoch")
            && report.contains("(regularisation)"),
        "{report}"
    );
}

#[test]
fn no_numbered_folders_is_an_error_showing_the_layout() {
    let dir = scratch("ds-none");
    write_image(&dir.join("plain/a.png"), 64, 64);
    let e = open(&dir.join("plain"), &opts(64, false)).err().unwrap().to_string();
    assert!(e.contains("no `N_concept` folders") && e.contains("10_mychar woman/") && e.contains("image1.txt"), "{e}");
}

#[test]
fn bad_files_are_skipped_with_problems_or_fail_in_strict_mode() {
    let dir = scratch("ds-bad");
    let c = dir.join("t/3_thing");
    write_image(&c.join("good.png"), 128, 128);
    std::fs::write(c.join("garbage.png"), b"this is not a png").unwrap();
    write_image(&c.join("empty_caption.png"), 128, 128);
    std::fs::write(c.join("empty_caption.txt"), b"").unwrap();
    write_image(&c.join("latin1.png"), 128, 128);
    std::fs::write(c.join("latin1.txt"), [0x63u8, 0x61, 0x66, 0xe9, 0xff]).unwrap();
    // truncated after the header: dimensions read fine, decoding fails later
    let full = std::fs::read(c.join("good.png")).unwrap();
    std::fs::write(c.join("truncated.png"), &full[..full.len() / 2]).unwrap();
    let g = open(&dir.join("t"), &opts(128, true)).unwrap();
    let problems: Vec<String> = g.problems().iter().map(|p| p.to_string()).collect();
    let has = |name: &str, what: &str| problems.iter().any(|p| p.contains(name) && p.contains(what));
    assert!(has("garbage.png", "not a readable image") && has("garbage.png", "(skipped)"), "{problems:?}");
    assert!(has("empty_caption.txt", "empty caption file; using the class tokens \"thing\""), "{problems:?}");
    assert!(has("latin1.png", "not UTF-8") && has("latin1.png", "(skipped)"), "{problems:?}");
    let d = &g.datasets[0];
    assert_eq!(d.images.len(), 3, "good, empty_caption and truncated remain");
    // the truncated image fails when loaded: an error naming it, not a panic
    let t = d.images.iter().position(|i| i.path.ends_with("truncated.png")).unwrap();
    let e = d.sample(t, Default::default(), &mut sdtune::rng::Rng::new(0)).unwrap_err().to_string();
    assert!(e.contains("truncated.png") && e.contains("truncated or corrupt"), "{e}");
    // strict mode turns the first problem into an error
    let mut strict = opts(128, true);
    strict.strict = true;
    let e = open(&dir.join("t"), &strict).err().unwrap().to_string();
    assert!(e.contains("strict mode"), "{e}");
}

#[test]
fn images_smaller_than_the_smallest_bucket() {
    let dir = scratch("ds-small");
    write_image(&dir.join("t/1_x/tiny.png"), 20, 20);
    write_image(&dir.join("t/1_x/ok.png"), 128, 128);
    let mut o = opts(128, true);
    o.call.bucket_no_upscale = Some(true);
    let g = open(&dir.join("t"), &o).unwrap();
    let p: Vec<String> = g.problems().iter().map(|p| p.to_string()).collect();
    assert!(
        p.iter().any(|p| p.contains("tiny.png")
            && p.contains("smaller than the smallest bucket")
            && p.contains("(skipped)")),
        "{p:?}"
    );
    assert_eq!(g.len(), 1);
    let g = open(&dir.join("t"), &opts(128, true)).unwrap();
    let p: Vec<String> = g.problems().iter().map(|p| p.to_string()).collect();
    assert!(p.iter().any(|p| p.contains("tiny.png") && p.contains("upscaled") && !p.contains("skipped")), "{p:?}");
    assert_eq!(g.len(), 2);
}

#[test]
fn config_files_unknown_keys_and_type_errors() {
    let dir = scratch("ds-toml");
    std::fs::write(
        dir.join("unknown.toml"),
        "[general]\nresolution = 512\nflip_augment = true\n\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = \"x\"\n",
    )
    .unwrap();
    let e = read_config_file(&dir.join("unknown.toml"), &General::default()).unwrap_err().to_string();
    assert!(
        e.contains("unknown.toml")
            && e.contains("flip_augment")
            && e.contains("flip_aug")
            && e.contains("shuffle_caption"),
        "{e}"
    );
    std::fs::write(dir.join("types.toml"), "[[datasets]]\nresolution = 512\nbatch_size = \"four\"\n").unwrap();
    let e = read_config_file(&dir.join("types.toml"), &General::default()).unwrap_err().to_string();
    assert!(e.contains("types.toml: line 3") && e.contains("batch_size"), "{e}");
    std::fs::write(
        dir.join("bad.json"),
        r#"{"datasets": [{"resolution": 512, "subsets": [{"image_dir": "x", "num_repeat": 2}]}]}"#,
    )
    .unwrap();
    let e = read_config_file(&dir.join("bad.json"), &General::default()).unwrap_err().to_string();
    assert!(e.contains("num_repeat") && e.contains("num_repeats"), "{e}");
}

#[test]
fn precedence_is_subset_dataset_general_call() {
    let dir = scratch("ds-prec");
    std::fs::write(
        dir.join("c.toml"),
        "[general]\nnum_repeats = 3\nflip_aug = true\nbatch_size = 2\n\n[[datasets]]\nresolution = [768, 512]\nnum_repeats = 5\n\n  [[datasets.subsets]]\n  image_dir = \"a\"\n  num_repeats = 7\n\n  [[datasets.subsets]]\n  image_dir = \"b\"\n\n[[datasets]]\nresolution = 512\n  [[datasets.subsets]]\n  image_dir = \"c\"\n",
    )
    .unwrap();
    let call =
        General { num_repeats: Some(100), batch_size: Some(9), shuffle_caption: Some(true), ..Default::default() };
    let c = read_config_file(&dir.join("c.toml"), &call).unwrap();
    assert_eq!(c.len(), 2);
    assert_eq!(c[0].subsets.iter().map(|s| s.num_repeats).collect::<Vec<_>>(), vec![7, 5]);
    assert_eq!(c[1].subsets[0].num_repeats, 3, "general beats the call options");
    assert_eq!(c[0].batch_size, 2);
    assert!(
        c[0].subsets[0].flip_aug && c[0].subsets[0].caption.shuffle_caption,
        "general and call options fill what is unset"
    );
    assert_eq!(c[0].buckets.resolution, (768, 512));
    assert_eq!(c[0].subsets[0].caption_extension, ".caption", "sd-scripts' default caption extension");
}

#[test]
fn kohya_gui_dataset_tomls_parse() {
    let base = fixture("kohya-configs");
    let c = read_config_file(&base.join("dataset.toml"), &General::default()).unwrap();
    assert_eq!((c[0].batch_size, c[0].buckets.resolution, c[0].buckets.bucket_no_upscale), (4, (512, 512), true));
    assert_eq!(c[0].subsets[0].num_repeats, 10);
    assert_eq!(c[0].subsets[0].caption.keep_tokens, 1);
    assert_eq!(c[0].subsets[0].class_tokens.as_deref(), Some("darius kawasaki person"));
    let m = read_config_file(&base.join("dataset-multires.toml"), &General::default()).unwrap();
    assert_eq!(m.iter().map(|d| d.buckets.resolution).collect::<Vec<_>>(), vec![(1024, 1024), (768, 768), (512, 512)]);
    assert!(m.iter().all(|d| d.subsets[0].flip_aug
        && d.subsets[0].caption.keep_tokens_separator == "|||"
        && d.buckets.max_bucket_reso == 2048));
    let f = read_config_file(&base.join("dataset-finetune.toml"), &General::default()).unwrap();
    assert!(
        f[0].subsets[0].metadata_file.as_ref().unwrap().ends_with("test/config/meta-1_lat.json"),
        "Windows separators are accepted"
    );
    // the GUI's paths point into its own tree: opening reports the missing folder clearly
    let e = open(&base.join("dataset.toml"), &OpenOptions::default()).err().unwrap().to_string();
    assert!(e.contains("10_darius kawasaki person") && e.contains("does not exist"), "{e}");
}

#[test]
fn epochs_cover_every_sample_once_in_bucket_batches() {
    let dir = scratch("ds-epochs");
    let (train, _) = kohya_folder(&dir);
    let g = open(&train, &opts(128, true)).unwrap();
    let d = &g.datasets[0];
    let e0 = d.epoch_batches(0, 42);
    assert_eq!(e0.len(), d.batches_per_epoch());
    let mut counts = vec![0; d.images.len()];
    for b in &e0 {
        assert!(b.len() <= 4);
        let bucket = d.images[b[0]].placement.bucket;
        assert!(b.iter().all(|&i| d.images[i].placement.bucket == bucket), "a batch mixes buckets");
        for &i in b {
            counts[i] += 1;
        }
    }
    assert_eq!(counts, d.images.iter().map(|i| i.num_repeats).collect::<Vec<_>>());
    assert_eq!(e0, d.epoch_batches(0, 42), "seeded");
    assert_ne!(e0, d.epoch_batches(1, 42), "each epoch is shuffled anew");
}

#[test]
fn background_loader_matches_sequential_loading() {
    let dir = scratch("ds-loader");
    let (train, _) = kohya_folder(&dir);
    let mut o = opts(128, true);
    o.call.flip_aug = Some(true);
    o.call.shuffle_caption = Some(true);
    let g = open(&train, &o).unwrap();
    let d = std::sync::Arc::new(g.datasets.into_iter().next().unwrap());
    let batches = d.epoch_batches(0, 1);
    let run = |workers| -> Vec<(Vec<u8>, String)> {
        sdtune::data::loader::Loader::start(d.clone(), batches.clone(), Default::default(), 5, workers, 2)
            .flat_map(|b| b.unwrap())
            .map(|s| (s.image.data, s.caption))
            .collect()
    };
    let one = run(1);
    assert_eq!(one.len(), d.len());
    assert_eq!(one, run(3), "results do not depend on the number of workers");
    let s = &d.sample(0, Default::default(), &mut sdtune::rng::Rng::new(0)).unwrap();
    assert_eq!((s.image.width, s.image.height), s.bucket);
}

#[test]
fn latent_cache_writes_valid_npz_and_reuses_it() {
    use sdtune::data::cache::{cache_latents, load_npz, npz_path};
    let dir = scratch("ds-cache");
    write_image(&dir.join("t/2_a/x.png"), 100, 64);
    write_image(&dir.join("t/2_a/y.png"), 64, 64);
    let mut o = opts(64, true);
    o.call.flip_aug = Some(true);
    o.call.min_bucket_reso = Some(32);
    o.call.max_bucket_reso = Some(128);
    let g = open(&dir.join("t"), &o).unwrap();
    let model = load(&fixture("tiny-sd15"));
    let d = &g.datasets[0];
    let (lat, stats) = cache_latents(d, &model, 2, true, 0).unwrap();
    assert_eq!((stats.encoded, stats.reused), (2, 0));
    for (im, c) in d.images.iter().zip(&lat) {
        let c = c.as_ref().unwrap();
        let (bw, bh) = im.placement.bucket;
        assert_eq!(c.latents.dims(), &[4, bh / 8, bw / 8]);
        assert!(c.latents_flipped.is_some());
        let back = load_npz(&npz_path(&im.path), im.placement.bucket, true, false).unwrap();
        assert_eq!(max_abs_diff(&back.latents, &c.latents), 0.0);
        assert_eq!(back.original_size, im.size);
    }
    let (_, stats) = cache_latents(d, &model, 2, true, 0).unwrap();
    assert_eq!((stats.encoded, stats.reused), (0, 2), "valid cache files are reused");
    // a cache made for another bucket is not valid
    let x = &d.images.iter().find(|i| i.path.ends_with("x.png")).unwrap();
    assert_eq!(x.placement.bucket, (64, 64));
    assert!(load_npz(&npz_path(&x.path), (96, 64), true, false).unwrap_err().contains("bucket needs"));
    // pixel-changing augmentation refuses caching
    let mut o2 = o.clone();
    o2.call.color_aug = Some(true);
    let g2 = open(&dir.join("t"), &o2).unwrap();
    assert!(cache_latents(&g2.datasets[0], &model, 1, false, 0).unwrap_err().to_string().contains("color_aug"));
}

#[test]
fn sd_scripts_npz_files_are_accepted_and_ours_are_written_for_numpy() {
    use sdtune::data::cache::{load_npz, save_npz, CachedLatents};
    // written by numpy exactly as sd-scripts' save_latents_to_disk (tests/fixtures/npz/make_npz.py)
    let c = load_npz(&fixture("npz/sd_scripts_cache.npz"), (64, 64), true, false).unwrap();
    assert_eq!(c.original_size, (70, 64));
    assert_eq!(c.crop_ltrb, (0.0, 0.0, 64.0, 58.0));
    let l = c.latents.to_vec3::<f32>().unwrap();
    let f = c.latents_flipped.unwrap().to_vec3::<f32>().unwrap();
    assert_eq!(f[1][2][0], l[1][2][7], "numpy's flipped copy");
    // ours, checked by numpy in .ci/run (tests/python/check_npz.py)
    let mut v: Vec<f32> = (0..4 * 8 * 12).map(|i| i as f32).collect();
    v[0] = 0.5;
    v[1] = 1.5;
    v[2] = 2.5;
    let t = candle_core::Tensor::from_vec(v, (4, 8, 12), &candle_core::Device::Cpu).unwrap();
    let ours = CachedLatents {
        latents: t.clone(),
        latents_flipped: Some(t),
        original_size: (100, 64),
        crop_ltrb: (0.0, 1.0, 96.0, 62.0),
        // sd-scripts' `alpha_mask`: [H, W] at pixel resolution
        alpha_mask: Some(candle_core::Tensor::full(0.25f32, (64, 96), &candle_core::Device::Cpu).unwrap()),
    };
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("sdtune-latents-for-numpy.npz");
    save_npz(&out, &ours).unwrap();
    let back = load_npz(&out, (96, 64), true, true).unwrap();
    assert_eq!(back.alpha_mask.as_ref().unwrap().dims(), [64, 96]);
    assert_eq!(back.original_size, (100, 64));
}

#[test]
fn dataset_inspect_cli_and_script_api() {
    let dir = scratch("ds-cli");
    let (train, _) = kohya_folder(&dir);
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_sdtune"))
        .args([
            "dataset",
            "inspect",
            train.to_str().unwrap(),
            "--resolution",
            "128",
            "--enable_bucket",
            "--min_bucket_reso",
            "64",
            "--bucket_reso_steps",
            "32",
            "--caption_extension",
            ".txt",
            "--batch_size",
            "2",
        ])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.contains("batch size 2") && out.contains("samples per epoch: 44") && out.contains("128x128:"), "{out}");
    let script = dir.join("d.rhai");
    std::fs::write(
        &script,
        format!(
            "let d = dataset({:?}, #{{ resolution: 128, enable_bucket: true, min_bucket_reso: 64, bucket_reso_steps: 32, caption_extension: \".txt\", batch_size: 2 }});\nprint(d.len);\nprint(d.batches_per_epoch);\nlet b = d.buckets;\nprint(b[0].width + \"x\" + b[0].height + \":\" + b[0].count);\nlet s = d.get(0);\nprint(s.caption);\nprint(s.image.width == s.bucket[0]);\ndataset({:?}, #{{ resolutoin: 5 }});\n",
            train.to_string_lossy(),
            train.to_string_lossy()
        ),
    )
    .unwrap();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_sdtune"))
        .args(["run", script.to_str().unwrap()])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "44");
    assert!(lines[1].parse::<usize>().unwrap() >= 22);
    assert!(lines[2].contains('x') && lines[2].contains(':'));
    assert_eq!(lines[3], "cat 0, sitting, indoors");
    assert_eq!(lines[4], "true");
    assert!(err.contains("d.rhai:9") && err.contains("resolutoin") && err.contains("resolution"), "{err}");
}

#[test]
fn finetune_subsets_read_the_metadata_json() {
    let dir = scratch("ds-finetune");
    write_image(&dir.join("imgs/one.png"), 128, 128);
    write_image(&dir.join("imgs/two.jpg"), 128, 96);
    std::fs::write(
        dir.join("meta.json"),
        r#"{"one": {"caption": "a red car", "tags": "car, red"}, "two": {"tags": "street, night"}, "missing": {"caption": "x"}}"#,
    )
    .unwrap();
    std::fs::write(
        dir.join("ft.toml"),
        "[general]\nresolution = 128\nenable_bucket = true\nmin_bucket_reso = 64\nbucket_reso_steps = 32\n\n[[datasets]]\n  [[datasets.subsets]]\n  image_dir = \"imgs\"\n  metadata_file = \"meta.json\"\n  num_repeats = 2\n",
    )
    .unwrap();
    let g = open(&dir.join("ft.toml"), &OpenOptions::default()).unwrap();
    let d = &g.datasets[0];
    let cap = |n: &str| d.images.iter().find(|i| i.path.ends_with(n)).unwrap().caption.clone();
    assert_eq!(cap("one.png"), "a red car,car, red", "caption + caption_separator + tags");
    assert_eq!(cap("two.jpg"), "street, night");
    assert_eq!(g.len(), 4);
    assert!(g.problems().iter().any(|p| p.to_string().contains("missing") && p.skipped));
    // sd-scripts' --in_json / --dataset_repeats: the folder with that metadata file is the same dataset
    let (recipe, _) = sdtune::train::build::recipe_from_flat(
        serde_json::json!({
            "pretrained_model_name_or_path": "m.safetensors", "train_data_dir": dir.join("imgs"),
            "in_json": dir.join("meta.json"), "dataset_repeats": 2,
            "resolution": 128, "enable_bucket": true, "min_bucket_reso": 64, "bucket_reso_steps": 32,
        })
        .as_object()
        .unwrap()
        .clone(),
    )
    .unwrap();
    let r: sdtune::train::build::Recipe = serde_json::from_value(recipe).unwrap();
    let g2 = sdtune::train::build::open_dataset(&r).unwrap().unwrap();
    let d2 = &g2.datasets[0];
    assert_eq!(g2.len(), 4);
    for im in &d.images {
        let other = d2.images.iter().find(|i| i.path == im.path).unwrap();
        assert_eq!((&other.caption, other.num_repeats), (&im.caption, im.num_repeats));
    }
    let e = open(&dir.join("imgs"), &OpenOptions { in_json: Some(dir.join("nope.json")), ..Default::default() });
    assert!(format!("{:#}", e.err().unwrap()).contains("nope.json"));
}

#[test]
fn custom_caption_separator_splits_tags() {
    use sdtune::data::captions::{process_caption, Progress};
    let o = sdtune::data::config::CaptionOptions {
        shuffle_caption: true,
        keep_tokens: 1,
        caption_separator: ";".into(),
        ..Default::default()
    };
    let out = process_caption("first; b; c; d", &o, Progress::default(), &mut sdtune::rng::Rng::new(3));
    assert!(out.starts_with("first, "), "{out}");
    let mut parts: Vec<&str> = out.split(", ").collect();
    parts.sort();
    assert_eq!(parts, vec!["b", "c", "d", "first"], "re-joined with \", \" as sd-scripts does");
}

#[test]
fn training_metadata_describes_the_data_as_sd_scripts_does() {
    use serde_json::{json, Value};
    let dir = scratch("ds-metadata");
    let (train, reg) = kohya_folder(&dir);
    let mut o = opts(128, true);
    o.reg_dir = Some(reg);
    let m = sdtune::data::metadata::ss_metadata(&open(&train, &o).unwrap()).unwrap();
    let js = |k: &str| -> Value { serde_json::from_str(&m[k]).unwrap_or_else(|e| panic!("{k}: {e}: {}", m[k])) };
    assert_eq!(
        js("ss_dataset_dirs"),
        json!({ "10_cat": { "n_repeats": 10, "img_count": 4 }, "2_dog": { "n_repeats": 2, "img_count": 2 } })
    );
    assert_eq!(js("ss_reg_dataset_dirs"), json!({ "1_animal": { "n_repeats": 1, "img_count": 2 } }));
    assert_eq!(
        js("ss_tag_frequency"),
        json!({
            "10_cat": { "cat 0": 1, "cat 1": 1, "cat 2": 1, "sitting": 3, "indoors": 3, "cat": 1 },
            "2_dog": { "dog": 2 },
            "1_animal": { "animal": 2 },
        })
    );
    // Python's json.dumps spacing
    assert!(m["ss_dataset_dirs"].contains(r#"{"n_repeats": 10, "img_count": 4}"#), "{}", m["ss_dataset_dirs"]);
    let info = js("ss_bucket_info");
    let total: u64 = info["buckets"].as_object().unwrap().values().map(|b| b["count"].as_u64().unwrap()).sum();
    assert_eq!(total, 88);
    assert!(info["mean_img_ar_error"].as_f64().unwrap() >= 0.0);
    for (k, v) in [
        ("ss_enable_bucket", "True"),
        ("ss_min_bucket_reso", "64"),
        ("ss_max_bucket_reso", "256"),
        ("ss_resolution", "128,128"),
        ("ss_batch_size_per_device", "4"),
        ("ss_flip_aug", "False"),
    ] {
        assert_eq!(m[k], v, "{k}");
    }

    // a dataset config file: ss_datasets, with reg subsets left out of ss_dataset_dirs
    let toml = dir.join("data.toml");
    std::fs::write(
        &toml,
        "[general]\ncaption_extension = \".txt\"\n[[datasets]]\nresolution = 128\nbatch_size = 2\n\
         [[datasets.subsets]]\nimage_dir = \"train/10_cat\"\nnum_repeats = 3\nclass_tokens = \"cat\"\n\
         [[datasets.subsets]]\nimage_dir = \"reg/1_animal\"\nis_reg = true\nclass_tokens = \"animal\"\n",
    )
    .unwrap();
    let m = sdtune::data::metadata::ss_metadata(&open(&toml, &OpenOptions::default()).unwrap()).unwrap();
    let js = |k: &str| -> Value { serde_json::from_str(&m[k]).unwrap() };
    assert_eq!(js("ss_dataset_dirs"), json!({ "10_cat": { "n_repeats": 3, "img_count": 4 } }));
    let ds = js("ss_datasets");
    assert_eq!(ds.as_array().unwrap().len(), 1);
    let d = &ds[0];
    assert_eq!((d["is_dreambooth"].clone(), d["batch_size_per_device"].clone()), (json!(true), json!(2)));
    assert_eq!((d["num_train_images"].clone(), d["resolution"].clone()), (json!(12), json!([128, 128])));
    assert_eq!(d["subsets"][0]["image_dir"], "10_cat");
    assert_eq!(d["subsets"][1]["is_reg"], true);
    assert_eq!(d["subsets"][1]["class_tokens"], "animal");
    assert_eq!(d["tag_frequency"]["1_animal"], json!({ "animal": 2 }));
    assert!(!m.contains_key("ss_bucket_info"), "flat keys are for folders only");
}
