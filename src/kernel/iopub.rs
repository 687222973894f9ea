//! The IOPub side: every message a kernel publishes (status, inputs, outputs, streams, displays) goes through
//! one `Outbox`, in order, addressed to the request being handled.

use super::wire::{header, Message};
use bytes::Bytes;
use serde_json::{json, Value};
use std::sync::Mutex;
use tokio::sync::mpsc::UnboundedSender;

/// Publishes messages on IOPub, each with the current request as its parent.
pub struct Outbox {
    /// This kernel's session id.
    pub session: String,
    tx: UnboundedSender<Message>,
    parent: Mutex<Value>,
}

impl Outbox {
    pub fn new(session: String, tx: UnboundedSender<Message>) -> Self {
        Self { session, tx, parent: Mutex::new(json!({})) }
    }

    /// Makes `request` the parent of what is published next (streams, displays).
    pub fn set_parent(&self, request: &Message) {
        *self.parent.lock().unwrap_or_else(|e| e.into_inner()) = request.header.clone();
    }

    /// Publishes `content` as `msg_type` under the current parent.
    pub fn publish(&self, msg_type: &str, content: Value) {
        let parent = self.parent.lock().unwrap_or_else(|e| e.into_inner()).clone();
        self.send(parent, msg_type, content);
    }

    /// Publishes `content` as `msg_type` in answer to `request`.
    pub fn publish_for(&self, request: &Message, msg_type: &str, content: Value) {
        self.send(request.header.clone(), msg_type, content);
    }

    /// `status` busy / idle for `request`.
    pub fn status(&self, request: &Message, state: &str) {
        self.publish_for(request, "status", json!({ "execution_state": state }));
    }

    fn send(&self, parent_header: Value, msg_type: &str, content: Value) {
        let topic = format!("kernel.{}.{msg_type}", self.session);
        // the receiving task ends only when the kernel does
        let _ = self.tx.send(Message {
            identities: vec![Bytes::from(topic)],
            header: header(&self.session, msg_type),
            parent_header,
            metadata: json!({}),
            content,
            buffers: Vec::new(),
        });
    }
}
