//! The kernelspec: `kernel.json` (from the template in `kernel/`, with this executable's path) and the logos,
//! written to a Jupyter data folder's `kernels/sdtune`.

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// The kernelspec's name (`jupyter console --kernel sdtune`).
pub const NAME: &str = "sdtune";

const TEMPLATE: &str = include_str!("../../kernel/kernel.json");
const FILES: &[(&str, &[u8])] = &[
    ("logo-32x32.png", include_bytes!("../../kernel/logo-32x32.png")),
    ("logo-64x64.png", include_bytes!("../../kernel/logo-64x64.png")),
];

/// Where a kernelspec goes.
#[derive(Clone, Debug)]
pub enum Location {
    /// The user's Jupyter data folder (`$JUPYTER_DATA_DIR`, else the platform's).
    User,
    /// The active Python environment (`$VIRTUAL_ENV`, `$CONDA_PREFIX`, else `python3`'s `sys.prefix`).
    SysPrefix,
    /// `PREFIX/share/jupyter`.
    Prefix(PathBuf),
}

/// The `kernels/sdtune` folder of a location.
pub fn folder(location: &Location) -> Result<PathBuf> {
    let data = match location {
        Location::User => user_data_dir()?,
        Location::SysPrefix => sys_prefix()?.join("share").join("jupyter"),
        Location::Prefix(p) => p.join("share").join("jupyter"),
    };
    Ok(data.join("kernels").join(NAME))
}

fn user_data_dir() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("JUPYTER_DATA_DIR").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(d));
    }
    let home = std::env::var_os("HOME").map(PathBuf::from);
    if cfg!(target_os = "macos") {
        return Ok(home.context("HOME is not set")?.join("Library").join("Jupyter"));
    }
    if cfg!(windows) {
        let appdata = std::env::var_os("APPDATA").context("APPDATA is not set")?;
        return Ok(PathBuf::from(appdata).join("jupyter"));
    }
    let base = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| home.map(|h| h.join(".local").join("share")))
        .context("neither XDG_DATA_HOME nor HOME is set: use --prefix PATH")?;
    Ok(base.join("jupyter"))
}

fn sys_prefix() -> Result<PathBuf> {
    for var in ["VIRTUAL_ENV", "CONDA_PREFIX"] {
        if let Some(p) = std::env::var_os(var).filter(|p| !p.is_empty()) {
            return Ok(PathBuf::from(p));
        }
    }
    let out = std::process::Command::new("python3").args(["-c", "import sys; print(sys.prefix)"]).output().context(
        "--sys-prefix: no active environment (VIRTUAL_ENV, CONDA_PREFIX) and python3 cannot be run; use --prefix PATH",
    )?;
    let prefix = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() || prefix.is_empty() {
        bail!("--sys-prefix: python3 did not report sys.prefix; use --prefix PATH");
    }
    Ok(PathBuf::from(prefix))
}

/// `kernel.json` for the executable at `exe`.
pub fn kernel_json(exe: &Path) -> Result<String> {
    let mut spec: Value = serde_json::from_str(TEMPLATE).context("kernel/kernel.json is not JSON")?;
    spec["argv"][0] = Value::from(exe.display().to_string());
    Ok(serde_json::to_string_pretty(&spec)? + "\n")
}

/// Writes the kernelspec (replacing an earlier sdtune one there); returns its folder.
pub fn install(location: &Location) -> Result<PathBuf> {
    let dir = folder(location)?;
    let exe = std::env::current_exe().context("cannot find this executable's path")?;
    let exe = std::fs::canonicalize(&exe).unwrap_or(exe);
    std::fs::create_dir_all(&dir).with_context(|| format!("{}: cannot create the kernelspec folder", dir.display()))?;
    let json = kernel_json(&exe)?;
    let files = std::iter::once(("kernel.json", json.as_bytes())).chain(FILES.iter().copied());
    for (name, bytes) in files {
        let path = dir.join(name);
        crate::io::tensors::write_atomic(&path, |f| Ok(std::io::Write::write_all(f, bytes)?))
            .with_context(|| format!("{}: cannot write", path.display()))?;
    }
    Ok(dir)
}

/// Removes the kernelspec from a location; returns its folder.
pub fn uninstall(location: &Location) -> Result<PathBuf> {
    let dir = folder(location)?;
    if !dir.join("kernel.json").is_file() {
        bail!("{}: no sdtune kernelspec there", dir.display());
    }
    for name in std::iter::once("kernel.json").chain(FILES.iter().map(|(n, _)| *n)) {
        let path = dir.join(name);
        if path.exists() {
            std::fs::remove_file(&path).with_context(|| format!("{}: cannot remove", path.display()))?;
        }
    }
    // the folder goes only if nothing else was put there
    let _ = std::fs::remove_dir(&dir);
    Ok(dir)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_spec_names_this_executable_and_message_interrupts() {
        let json: serde_json::Value =
            serde_json::from_str(&super::kernel_json(std::path::Path::new("/opt/x y/sdtune")).unwrap()).unwrap();
        assert_eq!(
            json["argv"],
            serde_json::json!(["/opt/x y/sdtune", "kernel", "--connection-file", "{connection_file}"])
        );
        assert_eq!(json["display_name"], "sdtune (Rhai)");
        assert_eq!(json["language"], "rhai");
        assert_eq!(json["interrupt_mode"], "message");
    }
}
