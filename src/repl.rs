//! `sdtune repl`: the script engine line by line. Variables and functions persist between inputs, each
//! statement's value is printed, an incomplete input (open bracket, unfinished expression) continues on the next
//! line, Tab completes functions, methods and option keys, history persists across sessions, Ctrl-C cancels the
//! line being typed or stops what runs (a training saves a resumable state) without leaving, Ctrl-D exits.

use anyhow::Result;
use rhai::{Array, Dynamic, Engine, Scope, AST};
use rustyline::completion::{Completer, Pair};
use rustyline::error::ReadlineError;
use rustyline::highlight::Highlighter;
use rustyline::hint::Hinter;
use rustyline::history::DefaultHistory;
use rustyline::validate::{ValidationContext, ValidationResult, Validator};
use rustyline::{Context, Editor, Helper};
use std::path::PathBuf;

/// The history file: `$XDG_STATE_HOME/sdtune/history` (else `~/.local/state/sdtune/history`).
pub fn history_path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))?;
    Some(base.join("sdtune").join("history"))
}

/// What Tab offers: function and method names, and option keys (completed inside `#{ ... }`).
pub struct Completions {
    functions: Vec<String>,
    keys: Vec<String>,
}

impl Completions {
    /// The start (byte offset) of the word before the cursor and its completions; `variables` are offered with
    /// the functions.
    pub fn candidates(&self, before: &str, variables: &[String]) -> (usize, Vec<String>) {
        let start = before.rfind(|c: char| !(c.is_alphanumeric() || c == '_')).map_or(0, |i| i + 1);
        let word = &before[start..];
        // inside an open `#{`: option keys; otherwise functions, methods and variables
        let in_map = before.rfind("#{").is_some_and(|i| !before[i..].contains('}'));
        let pool: Vec<&String> = if in_map && !before[..start].ends_with('.') {
            self.keys.iter().collect()
        } else {
            self.functions.iter().chain(variables).collect()
        };
        let mut out: Vec<String> = pool.into_iter().filter(|n| n.starts_with(word)).cloned().collect();
        out.sort();
        out.dedup();
        (start, out)
    }
}

impl Completer for Completions {
    type Candidate = Pair;

    fn complete(&self, line: &str, pos: usize, _: &Context<'_>) -> rustyline::Result<(usize, Vec<Pair>)> {
        let (start, names) = self.candidates(&line[..pos], &[]);
        Ok((start, names.into_iter().map(|n| Pair { display: n.clone(), replacement: n }).collect()))
    }
}

impl Hinter for Completions {
    type Hint = String;
}

impl Highlighter for Completions {}

impl Validator for Completions {
    /// Incomplete while brackets are open or the parser runs out of input.
    fn validate(&self, ctx: &mut ValidationContext) -> rustyline::Result<ValidationResult> {
        Ok(if incomplete(ctx.input()) { ValidationResult::Incomplete } else { ValidationResult::Valid(None) })
    }
}

impl Helper for Completions {}

/// How far an input is from running.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Completeness {
    Complete,
    /// It needs more lines: open brackets or strings, or the parser wanted more input.
    Incomplete,
    /// It does not parse.
    Invalid,
}

/// Whether `src` needs more lines: open brackets or strings, or the parser wanted more input.
pub fn incomplete(src: &str) -> bool {
    completeness(src) == Completeness::Incomplete
}

/// Whether `src` parses, needs more lines, or cannot parse.
pub fn completeness(src: &str) -> Completeness {
    let (mut depth, mut in_str, mut esc) = (0i64, None::<char>, false);
    for c in src.chars() {
        match in_str {
            Some(q) => {
                if esc {
                    esc = false;
                } else if c == '\\' {
                    esc = true;
                } else if c == q {
                    in_str = None;
                }
            }
            None => match c {
                '"' | '`' => in_str = Some(c),
                '(' | '[' | '{' => depth += 1,
                ')' | ']' | '}' => depth -= 1,
                _ => {}
            },
        }
    }
    if depth > 0 || in_str.is_some() {
        return Completeness::Incomplete;
    }
    match Engine::new_raw().compile(src).map_err(|e| *e.0) {
        Ok(_) => Completeness::Complete,
        Err(rhai::ParseErrorType::UnexpectedEOF) => Completeness::Incomplete,
        Err(_) => Completeness::Invalid,
    }
}

/// The names Tab completes.
pub fn completions(engine: &Engine) -> Completions {
    let mut functions: Vec<String> = engine
        .gen_fn_signatures(false)
        .into_iter()
        .filter_map(|s| {
            let s = s.trim_start_matches("fn ").trim_start_matches("get$").trim_start_matches("set$");
            s.split('(').next().map(|n| n.trim().to_string())
        })
        .filter(|n| !n.is_empty() && !n.starts_with("get$") && !n.contains('$'))
        .collect();
    for (n, _, _) in crate::script::help::ENTRIES {
        functions.push(n.to_string());
    }
    functions.extend(
        ["let", "const", "fn", "print", "show", "help", "if", "else", "for", "while", "loop"].map(String::from),
    );
    functions.sort();
    functions.dedup();
    let mut keys = crate::script::option_keys();
    keys.sort();
    keys.dedup();
    Completions { functions, keys }
}

/// A value as the REPL echoes it (the script's `to_debug`).
pub fn echo(engine: &Engine, scope: &mut Scope, v: Dynamic) -> String {
    let n = scope.len();
    scope.push("__sdtune_repl_value", v.clone());
    let text =
        engine.eval_with_scope::<String>(scope, "to_debug(__sdtune_repl_value)").unwrap_or_else(|_| format!("{v:?}"));
    scope.rewind(n);
    text
}

/// Why an input failed.
#[derive(Debug, PartialEq)]
pub enum Failure {
    /// It does not parse.
    Syntax(String),
    /// It stopped with an error.
    Error(String),
    /// An interrupt stopped it.
    Interrupted(String),
}

impl Failure {
    /// The message (with the position).
    pub fn message(&self) -> &str {
        match self {
            Failure::Syntax(m) | Failure::Error(m) | Failure::Interrupted(m) => m,
        }
    }
}

/// Runs one input named `name` in errors; the functions it defines are kept in `functions`.
pub fn eval_value(
    engine: &Engine,
    scope: &mut Scope,
    functions: &mut AST,
    src: &str,
    name: &str,
) -> std::result::Result<Dynamic, Failure> {
    let ast = engine.compile_with_scope(scope, src).map_err(|e| {
        let at = crate::script::locate(name, e.1);
        Failure::Syntax(format!("{at}: syntax error: {}", e.0))
    })?;
    *functions = functions.merge(&ast.clone_functions_only());
    let full = functions.merge(&ast.clone_statements_only());
    crate::interrupt::clear();
    engine.eval_ast_with_scope::<Dynamic>(scope, &full).map_err(|e| {
        let msg = crate::script::describe_eval(name, &e);
        match *e {
            rhai::EvalAltResult::ErrorTerminated(..) => Failure::Interrupted(msg),
            _ => Failure::Error(msg),
        }
    })
}

/// Runs one input; returns the text to print (value or error).
pub fn eval(
    engine: &Engine,
    scope: &mut Scope,
    functions: &mut AST,
    src: &str,
) -> std::result::Result<Option<String>, String> {
    let v = eval_value(engine, scope, functions, src, "repl").map_err(|f| f.message().to_string())?;
    Ok((!v.is_unit()).then(|| echo(engine, scope, v)))
}

/// The interactive loop.
pub fn run() -> Result<()> {
    let engine = crate::script::engine();
    let mut scope = Scope::new();
    scope.push_constant("ARGS", Array::new());
    let mut functions = AST::empty();
    let mut rl: Editor<Completions, DefaultHistory> = Editor::new()?;
    rl.set_helper(Some(completions(&engine)));
    let history = history_path();
    if let Some(h) = &history {
        let _ = rl.load_history(h);
    }
    // Ctrl-C while something runs: stop it gracefully (typing is handled by the line editor)
    let _ = ctrlc::set_handler(crate::interrupt::request);
    println!(
        "sdtune {} — Rhai REPL. help() lists what there is; Tab completes; Ctrl-D exits.",
        env!("CARGO_PKG_VERSION")
    );
    loop {
        match rl.readline("sdtune> ") {
            Ok(line) => {
                if line.trim().is_empty() {
                    continue;
                }
                let _ = rl.add_history_entry(line.as_str());
                if let Some(h) = &history {
                    if let Some(dir) = h.parent() {
                        let _ = std::fs::create_dir_all(dir);
                    }
                    let _ = rl.save_history(h);
                }
                match eval(&engine, &mut scope, &mut functions, &line) {
                    Ok(Some(text)) => println!("{text}"),
                    Ok(None) => {}
                    Err(e) => eprintln!("error: {e}"),
                }
            }
            Err(ReadlineError::Interrupted) => {
                println!("^C");
                continue;
            }
            Err(ReadlineError::Eof) => break,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}
