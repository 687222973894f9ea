//! Key mapping between the original LDM single-file layout and diffusers/transformers names, as prefix tables.
//!
//! Each table lists `(ldm_prefix, diffusers_prefix)` module pairs generated from the model's structure (levels,
//! layers per block, which up levels have attention). A key is renamed through its longest matching module prefix;
//! the same table serves both directions. Tensor-shape fix-ups live in `checkpoint.rs`.

use std::collections::HashMap;

/// Which side of a table a key is written in.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Side {
    Ldm,
    Diffusers,
}

/// A prefix table: module pairs, longest prefix wins.
pub struct KeyTable {
    pairs: Vec<(String, String)>,
}

impl KeyTable {
    fn new(pairs: Vec<(String, String)>) -> Self {
        Self { pairs }
    }

    /// Renames `key` from `from` to the other side; `None` when no prefix matches.
    pub fn rename(&self, key: &str, from: Side) -> Option<String> {
        let mut best: Option<(&str, &str)> = None;
        for (l, d) in &self.pairs {
            let (src, dst) = if from == Side::Ldm { (l.as_str(), d.as_str()) } else { (d.as_str(), l.as_str()) };
            let matches = key == src || (key.starts_with(src) && key.as_bytes().get(src.len()) == Some(&b'.'));
            if matches && best.is_none_or(|(b, _)| src.len() > b.len()) {
                best = Some((src, dst));
            }
        }
        best.map(|(src, dst)| format!("{dst}{}", &key[src.len()..]))
    }
}

fn p(l: impl Into<String>, d: impl Into<String>) -> (String, String) {
    (l.into(), d.into())
}

/// Resnet internals: LDM `in_layers/out_layers/emb_layers/skip_connection` ↔ diffusers names.
const UNET_RESNET: &[(&str, &str)] = &[
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("emb_layers.1", "time_emb_proj"),
    ("skip_connection", "conv_shortcut"),
];

fn unet_resnet(pairs: &mut Vec<(String, String)>, ldm: &str, diff: &str) {
    for (l, d) in UNET_RESNET {
        pairs.push(p(format!("{ldm}.{l}"), format!("{diff}.{d}")));
    }
}

/// The UNet table (keys without `model.diffusion_model.`; `label_emb` is SDXL's added conditioning).
pub fn unet_table(levels: usize, layers: usize, up_attn: &[bool]) -> KeyTable {
    let n = layers;
    let mut t = vec![
        p("time_embed.0", "time_embedding.linear_1"),
        p("time_embed.2", "time_embedding.linear_2"),
        p("label_emb.0.0", "add_embedding.linear_1"),
        p("label_emb.0.2", "add_embedding.linear_2"),
        p("input_blocks.0.0", "conv_in"),
        p("middle_block.1", "mid_block.attentions.0"),
        p("out.0", "conv_norm_out"),
        p("out.2", "conv_out"),
    ];
    unet_resnet(&mut t, "middle_block.0", "mid_block.resnets.0");
    unet_resnet(&mut t, "middle_block.2", "mid_block.resnets.1");
    for i in 0..levels {
        for j in 0..n {
            let b = (n + 1) * i + j + 1;
            unet_resnet(&mut t, &format!("input_blocks.{b}.0"), &format!("down_blocks.{i}.resnets.{j}"));
            t.push(p(format!("input_blocks.{b}.1"), format!("down_blocks.{i}.attentions.{j}")));
        }
        if i + 1 < levels {
            t.push(p(
                format!("input_blocks.{}.0.op", (n + 1) * (i + 1)),
                format!("down_blocks.{i}.downsamplers.0.conv"),
            ));
        }
        for j in 0..=n {
            let b = (n + 1) * i + j;
            unet_resnet(&mut t, &format!("output_blocks.{b}.0"), &format!("up_blocks.{i}.resnets.{j}"));
            if up_attn.get(i).copied().unwrap_or(false) {
                t.push(p(format!("output_blocks.{b}.1"), format!("up_blocks.{i}.attentions.{j}")));
            }
        }
        if i + 1 < levels {
            let slot = if up_attn.get(i).copied().unwrap_or(false) { 2 } else { 1 };
            t.push(p(format!("output_blocks.{}.{slot}", (n + 1) * i + n), format!("up_blocks.{i}.upsamplers.0")));
        }
    }
    KeyTable::new(t)
}

/// The VAE table (keys without `first_stage_model.`). Attention q/k/v/proj_out change shape: see checkpoint.rs.
pub fn vae_table(levels: usize, layers: usize) -> KeyTable {
    let mut t = vec![];
    for (side_l, side_d) in [("encoder", "encoder"), ("decoder", "decoder")] {
        t.push(p(format!("{side_l}.norm_out"), format!("{side_d}.conv_norm_out")));
        t.push(p(format!("{side_l}.mid.block_1"), format!("{side_d}.mid_block.resnets.0")));
        t.push(p(format!("{side_l}.mid.block_2"), format!("{side_d}.mid_block.resnets.1")));
        let a = format!("{side_l}.mid.attn_1");
        let b = format!("{side_d}.mid_block.attentions.0");
        for (l, d) in [("norm", "group_norm"), ("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")] {
            t.push(p(format!("{a}.{l}"), format!("{b}.{d}")));
        }
    }
    for i in 0..levels {
        for j in 0..layers {
            t.push(p(format!("encoder.down.{i}.block.{j}"), format!("encoder.down_blocks.{i}.resnets.{j}")));
            t.push(p(
                format!("encoder.down.{i}.block.{j}.nin_shortcut"),
                format!("encoder.down_blocks.{i}.resnets.{j}.conv_shortcut"),
            ));
        }
        if i + 1 < levels {
            t.push(p(format!("encoder.down.{i}.downsample"), format!("encoder.down_blocks.{i}.downsamplers.0")));
        }
        let li = levels - 1 - i;
        for j in 0..=layers {
            t.push(p(format!("decoder.up.{li}.block.{j}"), format!("decoder.up_blocks.{i}.resnets.{j}")));
            t.push(p(
                format!("decoder.up.{li}.block.{j}.nin_shortcut"),
                format!("decoder.up_blocks.{i}.resnets.{j}.conv_shortcut"),
            ));
        }
        if i + 1 < levels {
            t.push(p(format!("decoder.up.{li}.upsample"), format!("decoder.up_blocks.{i}.upsamplers.0")));
        }
    }
    for k in
        ["encoder.conv_in", "encoder.conv_out", "decoder.conv_in", "decoder.conv_out", "quant_conv", "post_quant_conv"]
    {
        t.push(p(k, k));
    }
    KeyTable::new(t)
}

/// OpenCLIP (SD2 `cond_stage_model.model.`) ↔ transformers CLIP names, for `layers` resblocks.
/// The fused `attn.in_proj_*` is split/joined in checkpoint.rs.
pub fn openclip_table(layers: usize) -> KeyTable {
    let mut t = vec![
        p("token_embedding", "text_model.embeddings.token_embedding"),
        p("ln_final", "text_model.final_layer_norm"),
    ];
    for i in 0..layers {
        let l = format!("transformer.resblocks.{i}");
        let d = format!("text_model.encoder.layers.{i}");
        for (a, b) in [
            ("ln_1", "layer_norm1"),
            ("ln_2", "layer_norm2"),
            ("mlp.c_fc", "mlp.fc1"),
            ("mlp.c_proj", "mlp.fc2"),
            ("attn.out_proj", "self_attn.out_proj"),
        ] {
            t.push(p(format!("{l}.{a}"), format!("{d}.{b}")));
        }
    }
    KeyTable::new(t)
}

/// The positional embedding is a bare tensor in OpenCLIP and a module weight in transformers.
pub const OPENCLIP_POSITIONAL: (&str, &str) =
    ("positional_embedding", "text_model.embeddings.position_embedding.weight");

/// Legacy diffusers VAE attention names (before diffusers 0.14) → current names.
pub const LEGACY_VAE_ATTENTION: &[(&str, &str)] =
    &[(".query.", ".to_q."), (".key.", ".to_k."), (".value.", ".to_v."), (".proj_attn.", ".to_out.0.")];

/// Renames every key of `map` with `table`, returning the renamed map and the keys that matched nothing.
pub fn rename_all<T>(map: HashMap<String, T>, table: &KeyTable, from: Side) -> (HashMap<String, T>, Vec<String>) {
    let mut out = HashMap::new();
    let mut unmatched = Vec::new();
    for (k, v) in map {
        match table.rename(&k, from) {
            Some(nk) => {
                out.insert(nk, v);
            }
            None => unmatched.push(k),
        }
    }
    unmatched.sort();
    (out, unmatched)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unet_table_maps_sd_names_both_ways() {
        let t = unet_table(4, 2, &[false, true, true, true]);
        let cases = [
            (
                "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
                "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight",
            ),
            ("input_blocks.5.1.proj_in.weight", "down_blocks.1.attentions.1.proj_in.weight"),
            (
                "output_blocks.11.1.transformer_blocks.0.ff.net.2.bias",
                "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.2.bias",
            ),
            (
                "middle_block.1.transformer_blocks.0.attn1.to_q.weight",
                "mid_block.attentions.0.transformer_blocks.0.attn1.to_q.weight",
            ),
            ("output_blocks.3.0.in_layers.2.weight", "up_blocks.1.resnets.0.conv1.weight"),
            ("input_blocks.3.0.op.weight", "down_blocks.0.downsamplers.0.conv.weight"),
            ("output_blocks.2.1.conv.weight", "up_blocks.0.upsamplers.0.conv.weight"),
            ("output_blocks.5.2.conv.bias", "up_blocks.1.upsamplers.0.conv.bias"),
            ("time_embed.2.weight", "time_embedding.linear_2.weight"),
            ("input_blocks.4.0.skip_connection.weight", "down_blocks.1.resnets.0.conv_shortcut.weight"),
        ];
        for (l, d) in cases {
            assert_eq!(t.rename(l, Side::Ldm).as_deref(), Some(d), "{l}");
            assert_eq!(t.rename(d, Side::Diffusers).as_deref(), Some(l), "{d}");
        }
    }

    #[test]
    fn vae_table_reverses_decoder_levels() {
        let t = vae_table(4, 2);
        assert_eq!(
            t.rename("decoder.up.3.block.2.conv1.weight", Side::Ldm).as_deref(),
            Some("decoder.up_blocks.0.resnets.2.conv1.weight")
        );
        assert_eq!(
            t.rename("decoder.up.1.upsample.conv.weight", Side::Ldm).as_deref(),
            Some("decoder.up_blocks.2.upsamplers.0.conv.weight")
        );
        assert_eq!(
            t.rename("encoder.down.1.block.0.nin_shortcut.bias", Side::Ldm).as_deref(),
            Some("encoder.down_blocks.1.resnets.0.conv_shortcut.bias")
        );
        assert_eq!(
            t.rename("encoder.mid_block.attentions.0.to_out.0.weight", Side::Diffusers).as_deref(),
            Some("encoder.mid.attn_1.proj_out.weight")
        );
        assert_eq!(t.rename("encoder.norm_out.weight", Side::Ldm).as_deref(), Some("encoder.conv_norm_out.weight"));
    }
}
