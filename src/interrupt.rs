//! The user's Ctrl-C, shared by everything that can stop gracefully: a training loop stops after the current
//! step and saves a state; a running script stops at its next operation. Whoever acts on a request consumes it.
//! An abort (the Jupyter kernel's interrupt) also ends the script after a training has stopped.

use std::sync::atomic::{AtomicBool, Ordering};

static REQUESTED: AtomicBool = AtomicBool::new(false);
static ABORT: AtomicBool = AtomicBool::new(false);

/// Asks whatever runs to stop (from a Ctrl-C handler).
pub fn request() {
    REQUESTED.store(true, Ordering::SeqCst);
}

/// Whether a stop was asked for; consumes the request.
pub fn take() -> bool {
    REQUESTED.swap(false, Ordering::SeqCst)
}

/// Asks whatever runs to stop and the script around it to end: a training still stops first with a saved state.
pub fn request_abort() {
    ABORT.store(true, Ordering::SeqCst);
    REQUESTED.store(true, Ordering::SeqCst);
}

/// Whether the script should end (an abort is pending); not consumed.
pub fn aborting() -> bool {
    ABORT.load(Ordering::SeqCst)
}

/// Forgets a pending request or abort (before the next REPL line or notebook cell).
pub fn clear() {
    REQUESTED.store(false, Ordering::SeqCst);
    ABORT.store(false, Ordering::SeqCst);
}
