//! Model families and what differs between them, as one table.

use anyhow::{bail, Result};

/// A Stable Diffusion model family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    Sd1,
    Sd2,
    Sdxl,
}

/// Per-family facts.
pub struct FamilyInfo {
    pub family: Family,
    /// The script name (`"sd1"`, ...).
    pub name: &'static str,
    /// Latent scaling factor of the VAE.
    pub vae_scale: f64,
    /// Padding id of the (first) tokenizer: `<|endoftext|>` or `!`.
    pub pad_id: u32,
    /// sd-scripts' `ss_base_model_version`-style label.
    pub label: &'static str,
}

/// The family table.
pub const FAMILIES: &[FamilyInfo] = &[
    FamilyInfo { family: Family::Sd1, name: "sd1", vae_scale: 0.18215, pad_id: 49407, label: "Stable Diffusion 1.x" },
    FamilyInfo { family: Family::Sd2, name: "sd2", vae_scale: 0.18215, pad_id: 0, label: "Stable Diffusion 2.x" },
    FamilyInfo { family: Family::Sdxl, name: "sdxl", vae_scale: 0.13025, pad_id: 49407, label: "Stable Diffusion XL" },
];

impl Family {
    pub fn info(self) -> &'static FamilyInfo {
        FAMILIES.iter().find(|f| f.family == self).expect("every family is in the table")
    }

    pub fn name(self) -> &'static str {
        self.info().name
    }

    /// Parses `"sd1"`, `"sd2"`, `"sdxl"` (also `"sd15"`, `"sd21"`, `"v1"`, `"v2"`).
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "sd1" | "sd15" | "sd1.5" | "v1" => Family::Sd1,
            "sd2" | "sd21" | "sd2.1" | "v2" => Family::Sd2,
            "sdxl" | "xl" => Family::Sdxl,
            other => {
                bail!("unknown model family {other:?}; expected one of \"sd1\", \"sd2\", \"sdxl\"")
            }
        })
    }
}
