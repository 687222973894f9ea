//! `sdtune kernel`: the kernelspec it installs and its errors on bad input. The protocol itself is tested with
//! real Jupyter clients in `tests/jupyter/` (run by `.ci/run`).

use crate::common::*;
use std::process::Command;

fn sdtune(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_sdtune")).args(args).output().expect("sdtune runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn png_size(path: &std::path::Path) -> (u32, u32) {
    let b = std::fs::read(path).unwrap();
    assert_eq!(&b[1..4], b"PNG", "{}", path.display());
    (u32::from_be_bytes(b[16..20].try_into().unwrap()), u32::from_be_bytes(b[20..24].try_into().unwrap()))
}

#[test]
fn kernelspec_installs_and_uninstalls_under_a_prefix() {
    let dir = scratch("kernelspec");
    let prefix = dir.to_string_lossy().into_owned();
    let (code, out, err) = sdtune(&["kernel", "install", "--prefix", &prefix]);
    assert_eq!(code, 0, "{err}");
    let spec = dir.join("share/jupyter/kernels/sdtune");
    assert!(out.contains(&spec.display().to_string()), "{out}");
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(spec.join("kernel.json")).unwrap()).unwrap();
    let exe = std::fs::canonicalize(env!("CARGO_BIN_EXE_sdtune")).unwrap();
    assert_eq!(json["argv"][0], exe.display().to_string());
    assert_eq!(json["argv"].as_array().unwrap()[1..], ["kernel", "--connection-file", "{connection_file}"]);
    assert_eq!((json["display_name"].as_str(), json["language"].as_str()), (Some("sdtune (Rhai)"), Some("rhai")));
    assert_eq!(json["interrupt_mode"], "message");
    assert_eq!(png_size(&spec.join("logo-32x32.png")), (32, 32));
    assert_eq!(png_size(&spec.join("logo-64x64.png")), (64, 64));
    // installing again replaces it; uninstalling removes it; a second uninstall says there is none
    assert_eq!(sdtune(&["kernel", "install", "--prefix", &prefix]).0, 0);
    assert_eq!(sdtune(&["kernel", "uninstall", "--prefix", &prefix]).0, 0);
    assert!(!spec.exists());
    let (code, _, err) = sdtune(&["kernel", "uninstall", "--prefix", &prefix]);
    assert_ne!(code, 0);
    assert!(err.starts_with("error: ") && err.contains("no sdtune kernelspec"), "{err}");
    // one location at a time
    let (code, _, err) = sdtune(&["kernel", "install", "--user", "--prefix", &prefix]);
    assert_ne!(code, 0);
    assert!(err.contains("cannot be used with"), "{err}");
}

#[test]
fn kernel_refuses_bad_connection_files_with_one_line_errors() {
    let dir = scratch("kernel-conn");
    let (code, _, err) = sdtune(&["kernel"]);
    assert_ne!(code, 0);
    assert!(err.starts_with("error: ") && err.contains("--connection-file"), "{err}");
    let missing = dir.join("missing.json").to_string_lossy().into_owned();
    let (code, _, err) = sdtune(&["kernel", "--connection-file", &missing]);
    assert_ne!(code, 0);
    assert!(err.contains("missing.json") && err.contains("cannot read the connection file"), "{err}");
    let cases = [
        ("notjson.json", "{ports", "not a Jupyter connection file"),
        ("noport.json", r#"{"transport": "tcp", "ip": "127.0.0.1"}"#, "shell_port"),
        (
            "ipc.json",
            r#"{"transport": "ipc", "ip": "k", "shell_port": 1, "iopub_port": 2, "stdin_port": 3, "control_port": 4, "hb_port": 5, "key": "x"}"#,
            "transport `ipc` is not supported",
        ),
        (
            "scheme.json",
            r#"{"transport": "tcp", "ip": "127.0.0.1", "shell_port": 1, "iopub_port": 2, "stdin_port": 3, "control_port": 4, "hb_port": 5, "key": "x", "signature_scheme": "hmac-md5"}"#,
            "signature_scheme `hmac-md5`",
        ),
    ];
    // a port in use
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let in_use = format!(
        r#"{{"transport": "tcp", "ip": "127.0.0.1", "shell_port": {port}, "iopub_port": 0, "stdin_port": 0, "control_port": 0, "hb_port": 0, "key": "x"}}"#
    );
    let bind_error = format!("cannot bind the shell socket at tcp://127.0.0.1:{port}");
    let cases = cases.iter().map(|(n, t, e)| (*n, t.to_string(), e.to_string()));
    for (name, text, expected) in cases.chain([("inuse.json", in_use, bind_error)]) {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        let (code, _, err) = sdtune(&["kernel", "--connection-file", &path.to_string_lossy()]);
        assert_ne!(code, 0, "{name}");
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 1, "{name}: {err}");
        let named = lines[0].contains(name) || name == "inuse.json";
        assert!(lines[0].starts_with("error: ") && named && lines[0].contains(&expected), "{err}");
    }
}
