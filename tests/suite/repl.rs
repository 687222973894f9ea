//! `sdtune repl` under a pseudo-terminal: values echo, variables persist, multi-line input, Tab completion of
//! functions and option keys, history across restarts, and Ctrl-C stopping a training (state saved) while the
//! REPL keeps its variables.

use crate::common::*;
use rexpect::reader::Options;
use rexpect::session::{spawn_with_options, PtySession};

/// A fresh prompt (a redrawn long line repeats the prompt without the newline).
const PROMPT: &str = "\n\rsdtune> ";

/// Types a line and presses Enter (a carriage return, as a terminal sends).
fn enter(p: &mut PtySession, line: &str) {
    p.send(line).unwrap();
    p.send("\r").unwrap();
    p.flush().unwrap();
}

/// Waits for `text` in the output, then for the next prompt.
fn expect(p: &mut PtySession, text: &str) {
    p.exp_string(text).unwrap();
    p.exp_string(PROMPT).unwrap();
}

/// Types a line and waits until it has run (the next prompt).
fn run_line(p: &mut PtySession, line: &str) {
    enter(p, line);
    p.exp_string(PROMPT).unwrap();
}

fn repl(state: &std::path::Path) -> PtySession {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_sdtune"));
    cmd.arg("repl").env("XDG_STATE_HOME", state).env("TERM", "xterm");
    let mut p = spawn_with_options(cmd, Options::new().timeout_ms(Some(60_000)).strip_ansi_escape_codes(true))
        .expect("the repl starts");
    p.exp_string(PROMPT).unwrap();
    p
}

#[test]
fn the_repl_evaluates_completes_remembers_and_survives_ctrl_c() {
    let dir = scratch("repl");
    let state = dir.join("state");
    let mut p = repl(&state);
    run_line(&mut p, "let abc = 40 + 2;");
    enter(&mut p, "abc * 1");
    expect(&mut p, "42");
    // multi-line: an open map continues on the next line
    enter(&mut p, "let mm = #{");
    run_line(&mut p, "  k: 5 + 2 };");
    enter(&mut p, "mm.k");
    expect(&mut p, "7");
    // functions persist
    run_line(&mut p, "fn twice(v) { v * 2 }");
    enter(&mut p, "twice(abc)");
    expect(&mut p, "84");
    // Tab completes a function name and an option key
    p.send("trainin\t").unwrap();
    p.flush().unwrap();
    enter(&mut p, "(\"no\")");
    expect(&mut p, "\"f32\"");
    p.send("let oo = #{ max_train_st\t").unwrap();
    run_line(&mut p, ": 3 };");
    enter(&mut p, "oo.max_train_steps + 1000");
    expect(&mut p, "1003");
    // an error does not end the session
    enter(&mut p, "no_such_variable");
    expect(&mut p, "Variable not found");
    // Ctrl-C during a training: it stops after a step with a saved state; the REPL keeps its variables
    let data = sdtune::data::synthetic::write_shapes(&dir.join("data"), "toy", 1, 4, 64, 0).unwrap();
    let model = fixture("tiny-sd15/tiny-sd15.safetensors");
    run_line(&mut p, &format!("let m = load_model(\"{}\");", model.display()));
    run_line(
        &mut p,
        &format!(
            "let d = dataset(\"{}\", #{{ resolution: 64, caption_extension: \".txt\", batch_size: 1 }});",
            data.display()
        ),
    );
    enter(
        &mut p,
        &format!(
            "let run = train(#{{ model: m, dataset: d, network: lora(m, #{{ dim: 4 }}), max_train_steps: 100000, \
         output_dir: \"{}\", output_name: \"r\", log_every_n_steps: 2 }});",
            dir.join("out").display()
        ),
    );
    p.exp_string("step 4/100000").unwrap();
    p.send_control('c').unwrap();
    expect(&mut p, "stopped at step");
    enter(&mut p, "run.stopped");
    expect(&mut p, "true");
    enter(&mut p, "abc + 100");
    expect(&mut p, "142");
    assert!(dir.join("out/r-state/state.json").is_file(), "the stopped training saved a state");
    // Ctrl-C while typing cancels the line; Ctrl-D exits
    p.send("let never = 1").unwrap();
    p.send_control('c').unwrap();
    p.exp_string(PROMPT).unwrap();
    enter(&mut p, "never");
    expect(&mut p, "Variable not found");
    p.send_control('d').unwrap();
    p.exp_eof().unwrap();
    // history across restarts: Up brings back the last line
    assert!(state.join("sdtune/history").is_file());
    let mut p = repl(&state);
    run_line(&mut p, "let abc = 1;");
    // previous-history (Ctrl-P, as Up) three times: `let abc = 1;`, `never`, then `abc + 100`
    for _ in 0..3 {
        p.send_control('p').unwrap();
    }
    enter(&mut p, "");
    expect(&mut p, "101");
    p.send_control('d').unwrap();
    p.exp_eof().unwrap();
}

#[test]
fn ctrl_c_stops_a_runaway_script() {
    let dir = scratch("runaway");
    let script = dir.join("loop.rhai");
    std::fs::write(&script, "print(\"looping\");\nlet i = 0;\nloop { i += 1; }\n").unwrap();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_sdtune"));
    cmd.arg("run").arg(&script);
    let mut p = spawn_with_options(cmd, Options::new().timeout_ms(Some(30_000)).strip_ansi_escape_codes(true)).unwrap();
    p.exp_string("looping").unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    p.send_control('c').unwrap();
    p.exp_string("interrupted").unwrap();
    p.exp_eof().unwrap();
}
