//! The Jupyter kernel: `sdtune kernel --connection-file F` speaks the Jupyter messaging protocol (5.3) over
//! ZeroMQ, runs cells in one engine and scope, and shows images, plots and trainings inline.
//!
//! Threads: the session (engine and scope) runs on the main thread; the sockets run on a tokio runtime on
//! another, so that interrupt and shutdown are answered while a cell runs; two threads pass captured
//! stdout/stderr on as streams.

pub mod capture;
pub mod iopub;
pub mod server;
pub mod session;
pub mod show;
pub mod spec;
pub mod wire;

use anyhow::{Context, Result};
use serde_json::json;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Runs the kernel for a connection file until a shutdown request ends the process.
pub fn run(connection_file: &Path) -> Result<()> {
    let conn = wire::Connection::read(connection_file)?;
    // bind before capturing output, so that a port in use is reported like any other error
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let sockets = runtime.block_on(server::bind(&conn))?;
    let (tx, iopub_rx) = tokio::sync::mpsc::unbounded_channel();
    let out = Arc::new(iopub::Outbox::new(wire::new_id(), tx));
    let streams = out.clone();
    let capture = capture::Capture::start(Arc::new(move |name, text| {
        streams.publish("stream", json!({ "name": name, "text": text }));
    }))
    .context("cannot capture stdout and stderr")?;
    crate::display::install(Arc::new(show::Notebook::new(out.clone(), capture.clone())));
    // SIGINT (a terminal, or a client that signals) interrupts like an interrupt_request
    let _ = ctrlc::set_handler(crate::interrupt::request_abort);
    let (jobs, requests) = std::sync::mpsc::channel::<server::Job>();
    let running = Arc::new(AtomicBool::new(false));
    let server = server::Server {
        codec: Arc::new(wire::Codec::new(&conn.key)),
        out: out.clone(),
        capture: capture.clone(),
        jobs,
        running: running.clone(),
    };
    let log = capture.clone();
    std::thread::spawn(move || {
        if let Err(e) = runtime.block_on(server.serve(sockets, iopub_rx)) {
            log.log(&format!("error: {e:#}"));
        }
        std::process::exit(1);
    });
    let mut session = session::Session::new(out.clone(), capture);
    for job in requests {
        out.set_parent(&job.request);
        running.store(true, Ordering::SeqCst);
        let reply = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| session.handle(&job.request)))
            .unwrap_or_else(|_| {
                Some(json!({
                    "status": "error", "ename": "InternalError",
                    "evalue": "internal error (please report it); the kernel goes on", "traceback": [],
                }))
            });
        running.store(false, Ordering::SeqCst);
        let _ = job.reply.send(reply);
    }
    Ok(())
}
