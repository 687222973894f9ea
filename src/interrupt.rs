//! The user's Ctrl-C, shared by everything that can stop gracefully: a training loop stops after the current
//! step and saves a state; a running script stops at its next operation. Whoever acts on a request consumes it.

use std::sync::atomic::{AtomicBool, Ordering};

static REQUESTED: AtomicBool = AtomicBool::new(false);

/// Asks whatever runs to stop (from a Ctrl-C handler).
pub fn request() {
    REQUESTED.store(true, Ordering::SeqCst);
}

/// Whether a stop was asked for; consumes the request.
pub fn take() -> bool {
    REQUESTED.swap(false, Ordering::SeqCst)
}

/// Forgets a pending request (before the next REPL line).
pub fn clear() {
    REQUESTED.store(false, Ordering::SeqCst);
}
