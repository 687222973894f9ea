//! The dataset part of sd-scripts' training metadata: `ss_datasets`, `ss_tag_frequency`, `ss_dataset_dirs` for a
//! dataset config file; the flat `ss_resolution`, `ss_bucket_info`, ... for a training folder.

use super::buckets::BucketManager;
use super::config::SubsetConfig;
use super::dataset::Dataset;
use super::DatasetGroup;
use crate::io::py::Py;
use anyhow::Result;
use std::collections::BTreeMap;
use std::path::Path;

fn basename(p: &Path) -> String {
    p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

/// The folder (or metadata file) name sd-scripts keys a subset by.
fn dir_name(s: &SubsetConfig) -> String {
    s.image_dir.as_deref().or(s.metadata_file.as_deref()).map(basename).unwrap_or_default()
}

fn img_count(ds: &Dataset, subset: usize) -> usize {
    ds.images.iter().filter(|i| i.subset == subset).count()
}

fn dict_entry<'a>(d: &'a mut Vec<(String, Py)>, key: &str) -> &'a mut Py {
    let i = match d.iter().position(|(k, _)| k == key) {
        Some(i) => i,
        None => {
            d.push((key.to_string(), Py::Dict(Vec::new())));
            d.len() - 1
        }
    };
    &mut d[i].1
}

/// `{dir: {tag: count}}`: comma-separated tags of every caption, stripped and lower-cased.
fn tag_frequency(ds: &Dataset) -> Vec<(String, Py)> {
    let mut out = Vec::new();
    for (si, s) in ds.cfg.subsets.iter().enumerate() {
        let Py::Dict(tags) = dict_entry(&mut out, &dir_name(s)) else { unreachable!("a dict") };
        for img in ds.images.iter().filter(|i| i.subset == si) {
            for tag in img.caption.split(',').map(|t| t.trim().to_lowercase()).filter(|t| !t.is_empty()) {
                match tags.iter_mut().find(|(k, _)| *k == tag) {
                    Some((_, Py::Int(n))) => *n += 1,
                    _ => tags.push((tag, Py::Int(1))),
                }
            }
        }
    }
    out
}

/// `{"buckets": {i: {"resolution": [w, h], "count": n}}, "mean_img_ar_error": e}` (i indexes the sorted
/// bucket list; counts include repeats).
fn bucket_info(ds: &Dataset) -> Result<Py> {
    let b = &ds.cfg.buckets;
    let used = ds.buckets();
    let mut all: Vec<(usize, usize)> = BucketManager::new(b)?.predefined;
    all.extend(used.keys().copied());
    all.sort();
    all.dedup();
    let buckets = all
        .iter()
        .enumerate()
        .filter_map(|(i, r)| {
            used.get(r).map(|&n| {
                let reso = Py::List(vec![r.0.into(), r.1.into()]);
                (i.to_string(), Py::Dict(vec![("resolution".into(), reso), ("count".into(), n.into())]))
            })
        })
        .collect();
    let errors: Vec<f64> =
        if b.enable_bucket { ds.images.iter().map(|i| i.placement.ar_error.abs()).collect() } else { vec![] };
    let mean = if errors.is_empty() { 0.0 } else { errors.iter().sum::<f64>() / errors.len() as f64 };
    Ok(Py::Dict(vec![("buckets".into(), Py::Dict(buckets)), ("mean_img_ar_error".into(), mean.into())]))
}

/// `{dir: {"n_repeats": r, "img_count": n}}` of the subsets `keep` selects (a repeated name gets " (2)", ...).
fn dataset_dirs(datasets: &[Dataset], keep: impl Fn(&SubsetConfig) -> bool) -> Py {
    let mut out: Vec<(String, Py)> = Vec::new();
    for ds in datasets {
        for (si, s) in ds.cfg.subsets.iter().enumerate().filter(|(_, s)| keep(s)) {
            let base = dir_name(s);
            let (mut name, mut i) = (base.clone(), 2);
            while out.iter().any(|(k, _)| *k == name) {
                name = format!("{base} ({i})");
                i += 1;
            }
            let info = vec![("n_repeats".into(), s.num_repeats.into()), ("img_count".into(), img_count(ds, si).into())];
            out.push((name, Py::Dict(info)));
        }
    }
    Py::Dict(out)
}

fn subset_info(ds: &Dataset, si: usize, s: &SubsetConfig) -> Py {
    let c = &s.caption;
    let mut d: Vec<(String, Py)> = vec![
        ("img_count".into(), img_count(ds, si).into()),
        ("num_repeats".into(), s.num_repeats.into()),
        ("color_aug".into(), s.color_aug.into()),
        ("flip_aug".into(), s.flip_aug.into()),
        ("random_crop".into(), s.random_crop.into()),
        ("shuffle_caption".into(), c.shuffle_caption.into()),
        ("keep_tokens".into(), c.keep_tokens.into()),
        ("keep_tokens_separator".into(), c.keep_tokens_separator.as_str().into()),
        ("secondary_separator".into(), c.secondary_separator.as_deref().into()),
        ("enable_wildcard".into(), c.enable_wildcard.into()),
        ("caption_prefix".into(), c.caption_prefix.as_deref().into()),
        ("caption_suffix".into(), c.caption_suffix.as_deref().into()),
    ];
    if let Some(dir) = &s.image_dir {
        d.push(("image_dir".into(), basename(dir).as_str().into()));
    }
    match &s.metadata_file {
        Some(f) => d.push(("metadata_file".into(), basename(f).as_str().into())),
        None => {
            d.push(("class_tokens".into(), s.class_tokens.as_deref().into()));
            d.push(("is_reg".into(), s.is_reg.into()));
        }
    }
    Py::Dict(d)
}

fn dataset_info(ds: &Dataset) -> Result<Py> {
    let b = &ds.cfg.buckets;
    let count = |reg: bool| -> usize { ds.images.iter().filter(|i| i.is_reg == reg).map(|i| i.num_repeats).sum() };
    let subsets = ds.cfg.subsets.iter().enumerate().map(|(si, s)| subset_info(ds, si, s)).collect();
    Ok(Py::Dict(vec![
        ("is_dreambooth".into(), ds.cfg.subsets.iter().all(|s| s.metadata_file.is_none()).into()),
        ("batch_size_per_device".into(), ds.cfg.batch_size.into()),
        ("num_train_images".into(), count(false).into()),
        ("num_reg_images".into(), count(true).into()),
        ("resolution".into(), Py::List(vec![b.resolution.0.into(), b.resolution.1.into()])),
        ("enable_bucket".into(), b.enable_bucket.into()),
        ("min_bucket_reso".into(), b.min_bucket_reso.into()),
        ("max_bucket_reso".into(), b.max_bucket_reso.into()),
        ("tag_frequency".into(), Py::Dict(tag_frequency(ds))),
        ("bucket_info".into(), bucket_info(ds)?),
        ("subsets".into(), Py::List(subsets)),
    ]))
}

/// The `ss_*` dataset keys sd-scripts writes: with a dataset config file `ss_datasets`, `ss_tag_frequency` and
/// `ss_dataset_dirs`; for a training folder the flat keys of its one dataset.
pub fn ss_metadata(group: &DatasetGroup) -> Result<BTreeMap<String, String>> {
    let mut m = BTreeMap::new();
    let py_bool = |b: bool| if b { "True" } else { "False" }.to_string();
    if group.source.is_file() {
        let infos = group.datasets.iter().map(dataset_info).collect::<Result<Vec<_>>>()?;
        let mut tags: Vec<(String, Py)> = Vec::new();
        for ds in &group.datasets {
            for (k, v) in tag_frequency(ds) {
                if !tags.iter().any(|(t, _)| *t == k) {
                    tags.push((k, v));
                }
            }
        }
        m.insert("ss_datasets".into(), Py::List(infos).dumps());
        m.insert("ss_tag_frequency".into(), Py::Dict(tags).dumps());
        m.insert(
            "ss_dataset_dirs".into(),
            dataset_dirs(&group.datasets, |s| !s.is_reg || s.metadata_file.is_some()).dumps(),
        );
    } else if let Some(ds) = group.datasets.first() {
        let b = &ds.cfg.buckets;
        let first = ds.cfg.subsets.iter().find(|s| !s.is_reg).or(ds.cfg.subsets.first());
        let any = |f: fn(&SubsetConfig) -> bool| first.is_some_and(f);
        m.insert("ss_batch_size_per_device".into(), ds.cfg.batch_size.to_string());
        m.insert("ss_total_batch_size".into(), ds.cfg.batch_size.to_string());
        m.insert("ss_resolution".into(), format!("{},{}", b.resolution.0, b.resolution.1));
        m.insert("ss_color_aug".into(), py_bool(any(|s| s.color_aug)));
        m.insert("ss_flip_aug".into(), py_bool(any(|s| s.flip_aug)));
        m.insert("ss_random_crop".into(), py_bool(any(|s| s.random_crop)));
        m.insert("ss_shuffle_caption".into(), py_bool(any(|s| s.caption.shuffle_caption)));
        m.insert("ss_keep_tokens".into(), first.map_or(0, |s| s.caption.keep_tokens).to_string());
        m.insert("ss_enable_bucket".into(), py_bool(b.enable_bucket));
        m.insert("ss_bucket_no_upscale".into(), py_bool(b.bucket_no_upscale));
        m.insert("ss_min_bucket_reso".into(), b.min_bucket_reso.to_string());
        m.insert("ss_max_bucket_reso".into(), b.max_bucket_reso.to_string());
        m.insert("ss_dataset_dirs".into(), dataset_dirs(&group.datasets[..1], |s| !s.is_reg).dumps());
        m.insert("ss_reg_dataset_dirs".into(), dataset_dirs(&group.datasets[..1], |s| s.is_reg).dumps());
        m.insert("ss_tag_frequency".into(), Py::Dict(tag_frequency(ds)).dumps());
        m.insert("ss_bucket_info".into(), bucket_info(ds)?.dumps());
    }
    Ok(m)
}
