//! Turning Rust errors into Rhai errors and Rhai errors into one-line messages with the script position.

use rhai::{EvalAltResult, Position};

/// The result type of registered functions.
pub type RhaiResult<T> = Result<T, Box<EvalAltResult>>;

/// Converts an error chain into a Rhai runtime error (the call site's position is filled in by Rhai).
pub fn rt<T>(r: anyhow::Result<T>) -> RhaiResult<T> {
    r.map_err(|e| {
        let msg = crate::device::with_hint(format!("{e:#}"));
        Box::new(EvalAltResult::ErrorRuntime(msg.into(), Position::NONE))
    })
}

/// A one-line description: `FILE:LINE:COL: message`.
pub fn describe_eval(file: &str, err: &EvalAltResult) -> String {
    let mut inner = err;
    let mut pos = err.position();
    while let EvalAltResult::ErrorInFunctionCall(_, _, e, p) | EvalAltResult::ErrorInModule(_, e, p) = inner {
        if !p.is_none() {
            pos = *p;
        }
        inner = e;
        if !inner.position().is_none() {
            pos = inner.position();
        }
    }
    let msg = match inner {
        EvalAltResult::ErrorRuntime(v, _) => v.to_string(),
        EvalAltResult::ErrorTerminated(token, _) if token.is_string() => token.to_string(),
        other => {
            let s = other.to_string();
            match s.rfind(" (line ") {
                Some(i) if s.ends_with(')') => s[..i].to_string(),
                _ => s,
            }
        }
    };
    format!("{}: {}", locate(file, pos), msg.replace('\n', " "))
}

/// `FILE:LINE:COL` (or just FILE when the position is unknown).
pub fn locate(file: &str, pos: Position) -> String {
    match (pos.line(), pos.position()) {
        (Some(l), Some(c)) => format!("{file}:{l}:{c}"),
        (Some(l), None) => format!("{file}:{l}"),
        _ => file.to_string(),
    }
}
