//! The notebook session: one engine and one scope across cells, and the shell requests that need them —
//! execute, complete, inspect, is_complete, history.

use super::capture::Capture;
use super::iopub::Outbox;
use super::wire::Message;
use crate::repl::{self, Completions, Failure};
use rhai::{Array, Dynamic, Engine, Scope, AST};
use serde_json::{json, Value};
use std::sync::Arc;

/// One executed cell, as history keeps it.
struct Entry {
    line: usize,
    input: String,
    output: Option<String>,
}

/// The history's session number (one per kernel process).
const HISTORY_SESSION: i64 = 1;

/// The engine, its scope and what the kernel remembers between cells.
pub struct Session {
    engine: Engine,
    scope: Scope<'static>,
    functions: AST,
    completions: Completions,
    execution_count: usize,
    history: Vec<Entry>,
    out: Arc<Outbox>,
    capture: Arc<Capture>,
}

impl Session {
    pub fn new(out: Arc<Outbox>, capture: Arc<Capture>) -> Self {
        let engine = crate::script::engine();
        let completions = repl::completions(&engine);
        let mut scope = Scope::new();
        scope.push_constant("ARGS", Array::new());
        Self {
            engine,
            scope,
            functions: AST::empty(),
            completions,
            execution_count: 0,
            history: Vec::new(),
            out,
            capture,
        }
    }

    /// The reply content to a shell request this session handles (`None`: not one of them).
    pub fn handle(&mut self, req: &Message) -> Option<Value> {
        let c = &req.content;
        let code = c["code"].as_str().unwrap_or("");
        Some(match req.msg_type() {
            "execute_request" => self.execute(req),
            "complete_request" => self.complete(code, cursor(c, code)),
            "inspect_request" => self.inspect(code, cursor(c, code)),
            "is_complete_request" => is_complete(code),
            "history_request" => self.history(c),
            _ => return None,
        })
    }

    fn execute(&mut self, req: &Message) -> Value {
        let c = &req.content;
        let code = c["code"].as_str().unwrap_or("").to_string();
        let silent = c["silent"].as_bool().unwrap_or(false);
        let store = c["store_history"].as_bool().unwrap_or(true) && !silent;
        if store {
            self.execution_count += 1;
        }
        let count = self.execution_count;
        if !silent {
            self.out.publish("execute_input", json!({ "code": code, "execution_count": count }));
        }
        let name = format!("In [{count}]");
        let result = repl::eval_value(&self.engine, &mut self.scope, &mut self.functions, &code, &name);
        self.capture.flush();
        match result {
            Ok(v) => {
                let shown = if v.is_unit() { None } else { Some(self.result_bundle(v)) };
                if let (Some((data, metadata)), false) = (&shown, silent) {
                    self.out.publish(
                        "execute_result",
                        json!({ "execution_count": count, "data": data, "metadata": metadata }),
                    );
                }
                if store {
                    let output = shown.as_ref().and_then(|(d, _)| d["text/plain"].as_str().map(String::from));
                    self.history.push(Entry { line: count, input: code, output });
                }
                let exprs = self.user_expressions(&c["user_expressions"]);
                json!({ "status": "ok", "execution_count": count, "payload": [], "user_expressions": exprs })
            }
            Err(f) => {
                if store {
                    self.history.push(Entry { line: count, input: code, output: None });
                }
                let ename = match f {
                    Failure::Syntax(_) => "SyntaxError",
                    Failure::Error(_) => "ScriptError",
                    Failure::Interrupted(_) => "Interrupted",
                };
                let error = json!({ "ename": ename, "evalue": f.message(), "traceback": [format!("{ename}: {}", f.message())] });
                if !silent {
                    self.out.publish("error", error.clone());
                }
                let mut reply = error;
                reply["status"] = Value::from("error");
                reply["execution_count"] = Value::from(count);
                reply
            }
        }
    }

    /// `text/plain` (the REPL's echo), plus `image/png` for images, plots and image tensors.
    fn result_bundle(&mut self, v: Dynamic) -> (Value, Value) {
        let image = crate::script::as_image(&v);
        let text = repl::echo(&self.engine, &mut self.scope, v);
        match image {
            Ok(Some(img)) => super::show::image_bundle(&img, &text).unwrap_or_else(|_| plain(&text)),
            _ => plain(&text),
        }
    }

    fn user_expressions(&mut self, exprs: &Value) -> Value {
        let mut out = serde_json::Map::new();
        for (name, expr) in exprs.as_object().into_iter().flatten() {
            let src = expr.as_str().unwrap_or("");
            let v = match self.engine.eval_with_scope::<Dynamic>(&mut self.scope, src) {
                Ok(v) => {
                    let text = repl::echo(&self.engine, &mut self.scope, v);
                    json!({ "status": "ok", "data": { "text/plain": text }, "metadata": {} })
                }
                Err(e) => {
                    let msg = crate::script::describe_eval(name, &e);
                    json!({ "status": "error", "ename": "ScriptError", "evalue": msg, "traceback": [msg] })
                }
            };
            out.insert(name.clone(), v);
        }
        Value::Object(out)
    }

    fn variables(&self) -> Vec<String> {
        self.scope.iter_raw().map(|(n, _, _)| n.to_string()).filter(|n| !n.starts_with("__")).collect()
    }

    fn complete(&self, code: &str, pos: usize) -> Value {
        let before = &code[..pos];
        let (start, matches) = self.completions.candidates(before, &self.variables());
        json!({
            "status": "ok",
            "matches": matches,
            "cursor_start": before[..start].chars().count(),
            "cursor_end": before.chars().count(),
            "metadata": {},
        })
    }

    /// The help text of the name at the cursor (a function, an object type, or a variable's value and type).
    fn inspect(&mut self, code: &str, pos: usize) -> Value {
        let is_word = |c: char| c.is_alphanumeric() || c == '_';
        let start = code[..pos].rfind(|c: char| !is_word(c)).map_or(0, |i| i + 1);
        let end = code[pos..].find(|c: char| !is_word(c)).map_or(code.len(), |i| pos + i);
        let word = &code[start..end];
        let mut text = crate::script::help::lookup(word);
        if text.is_none() {
            if let Some(v) = self.scope.get_value::<Dynamic>(word) {
                let ty = self.engine.map_type_name(v.type_name()).to_string();
                let value = repl::echo(&self.engine, &mut self.scope, v);
                let mut t = format!("{word}: {ty} = {value}");
                if let Some(help) = crate::script::help::lookup(&ty) {
                    t.push_str(&format!("\n\n{help}"));
                }
                text = Some(t);
            }
        }
        match text {
            Some(t) => json!({ "status": "ok", "found": true, "data": { "text/plain": t }, "metadata": {} }),
            None => json!({ "status": "ok", "found": false, "data": {}, "metadata": {} }),
        }
    }

    /// `tail` (last n), `range` (lines start..stop of this session) and `search` (a glob with `*` and `?`,
    /// optionally unique, last n).
    fn history(&self, c: &Value) -> Value {
        let output = c["output"].as_bool().unwrap_or(false);
        let n = c["n"].as_u64().map(|n| n as usize);
        let entries: Vec<&Entry> = match c["hist_access_type"].as_str().unwrap_or("tail") {
            "range" => {
                let session = c["session"].as_i64().unwrap_or(0);
                let (start, stop) = (c["start"].as_u64().unwrap_or(0) as usize, c["stop"].as_u64().map(|s| s as usize));
                // 0 and negative numbers count back from the current session
                if session == HISTORY_SESSION || session <= 0 {
                    self.history.iter().filter(|e| e.line >= start && stop.is_none_or(|s| e.line < s)).collect()
                } else {
                    Vec::new()
                }
            }
            "search" => {
                let pattern = c["pattern"].as_str().unwrap_or("*");
                let mut found: Vec<&Entry> = self.history.iter().filter(|e| glob(pattern, &e.input)).collect();
                if c["unique"].as_bool().unwrap_or(false) {
                    let mut seen = std::collections::HashSet::new();
                    found = found.into_iter().rev().filter(|e| seen.insert(e.input.as_str())).collect();
                    found.reverse();
                }
                last(found, n)
            }
            _ => last(self.history.iter().collect(), Some(n.unwrap_or(10))),
        };
        let rows: Vec<Value> = entries
            .into_iter()
            .map(|e| {
                if output {
                    json!([HISTORY_SESSION, e.line, [e.input, e.output]])
                } else {
                    json!([HISTORY_SESSION, e.line, e.input])
                }
            })
            .collect();
        json!({ "status": "ok", "history": rows })
    }
}

fn plain(text: &str) -> (Value, Value) {
    (json!({ "text/plain": text }), json!({}))
}

fn last(v: Vec<&Entry>, n: Option<usize>) -> Vec<&Entry> {
    let skip = n.map_or(0, |n| v.len().saturating_sub(n));
    v.into_iter().skip(skip).collect()
}

/// The cursor as a byte offset (Jupyter counts Unicode code points; absent means the end).
fn cursor(content: &Value, code: &str) -> usize {
    match content["cursor_pos"].as_u64() {
        Some(p) => code.char_indices().nth(p as usize).map_or(code.len(), |(i, _)| i),
        None => code.len(),
    }
}

/// `complete`, `incomplete` (open brackets or strings, or the parser wanting more) or `invalid`.
fn is_complete(code: &str) -> Value {
    match repl::completeness(code) {
        repl::Completeness::Complete => json!({ "status": "complete" }),
        repl::Completeness::Incomplete => json!({ "status": "incomplete", "indent": "" }),
        repl::Completeness::Invalid => json!({ "status": "invalid" }),
    }
}

/// Anchored glob matching with `*` (any run) and `?` (one character).
fn glob(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti, mut star, mut mark) = (0, 0, None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_matches_like_sqlite() {
        assert!(glob("1?2*", "1+2+3"));
        assert!(glob("*plot*", "show(plot(x))"));
        assert!(!glob("1?2", "1+2+3"));
        assert!(glob("*", ""));
        assert!(!glob("a*b", "acbd"));
    }

    #[test]
    fn completeness_of_code() {
        assert_eq!(is_complete("let x = 1;")["status"], "complete");
        assert_eq!(is_complete("let m = load_model(\"a\");")["status"], "complete");
        assert_eq!(is_complete("fn f(x) {")["status"], "incomplete");
        assert_eq!(is_complete("\"open string")["status"], "incomplete");
        assert_eq!(is_complete("let = 7q")["status"], "invalid");
    }

    #[test]
    fn cursor_positions_count_code_points() {
        let code = "let é = 1; pri";
        assert_eq!(cursor(&json!({ "cursor_pos": 14 }), code), code.len());
        assert_eq!(cursor(&json!({ "cursor_pos": 5 }), code), 6);
        assert_eq!(cursor(&json!({}), code), code.len());
    }
}
