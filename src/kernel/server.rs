//! The five sockets of a Jupyter kernel and the requests that need no engine: shell (requests, handed to the
//! session one at a time), control (interrupt, shutdown, kernel_info — answered even while a cell runs), IOPub
//! (what the outbox publishes, signed), stdin (bound; the kernel never asks for input) and heartbeat (echo).

use super::capture::Capture;
use super::iopub::Outbox;
use super::wire::{Codec, Connection, Message, PROTOCOL_VERSION};
use anyhow::{Context, Result};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc::UnboundedReceiver;
use zeromq::{PubSocket, RepSocket, RouterSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

/// A shell request for the session, and where its reply content goes (`None`: the session does not handle it).
pub struct Job {
    pub request: Message,
    pub reply: tokio::sync::oneshot::Sender<Option<Value>>,
}

/// The shell requests the session answers.
const SESSION_REQUESTS: &[&str] =
    &["execute_request", "complete_request", "inspect_request", "is_complete_request", "history_request"];

/// How long a shutdown waits for a running cell (a training saving its state) before the process ends.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// The two request channels: shell (handed to the session in order) and control (answered at once).
#[derive(Clone, Copy, PartialEq)]
enum Channel {
    Shell,
    Control,
}

/// What the socket tasks share.
#[derive(Clone)]
pub struct Server {
    pub codec: Arc<Codec>,
    pub out: Arc<Outbox>,
    pub capture: Arc<Capture>,
    pub jobs: std::sync::mpsc::Sender<Job>,
    /// Whether the session is running a request.
    pub running: Arc<AtomicBool>,
}

/// The bound sockets.
pub struct Sockets {
    shell: RouterSocket,
    control: RouterSocket,
    stdin: RouterSocket,
    iopub: PubSocket,
    heartbeat: RepSocket,
}

/// Binds the five sockets at the connection file's ports.
pub async fn bind(c: &Connection) -> Result<Sockets> {
    async fn at<S: Socket>(mut s: S, c: &Connection, port: u16, name: &str) -> Result<S> {
        let endpoint = c.endpoint(port);
        s.bind(&endpoint).await.with_context(|| format!("cannot bind the {name} socket at {endpoint}"))?;
        Ok(s)
    }
    Ok(Sockets {
        shell: at(RouterSocket::new(), c, c.shell_port, "shell").await?,
        control: at(RouterSocket::new(), c, c.control_port, "control").await?,
        stdin: at(RouterSocket::new(), c, c.stdin_port, "stdin").await?,
        iopub: at(PubSocket::new(), c, c.iopub_port, "iopub").await?,
        heartbeat: at(RepSocket::new(), c, c.hb_port, "heartbeat").await?,
    })
}

impl Server {
    /// Serves until a shutdown request ends the process.
    pub async fn serve(self, s: Sockets, iopub_rx: UnboundedReceiver<Message>) -> Result<()> {
        tokio::spawn(heartbeat(s.heartbeat));
        tokio::spawn(drain(s.stdin));
        tokio::spawn(publish(s.iopub, self.codec.clone(), iopub_rx));
        tokio::spawn(self.clone().channel(s.control, Channel::Control));
        self.channel(s.shell, Channel::Shell).await;
        Ok(())
    }

    /// The next correctly signed message; others are dropped and logged.
    async fn next<S: SocketRecv>(&self, socket: &mut S, channel: &str) -> Message {
        loop {
            match socket.recv().await {
                Ok(m) => match self.codec.decode(m.into_vec()) {
                    Ok(msg) => return msg,
                    Err(e) => self.capture.log(&format!("{channel}: dropped a message: {e:#}")),
                },
                Err(e) => {
                    self.capture.log(&format!("{channel}: receive failed: {e}"));
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }

    async fn reply<S: SocketSend>(&self, socket: &mut S, to: &Message, content: Value) {
        let msg_type = to.msg_type().replace("_request", "_reply");
        let msg = Message::reply_to(to, &self.out.session, &msg_type, content);
        let frames = ZmqMessage::try_from(self.codec.encode(&msg)).expect("a message has frames");
        if let Err(e) = socket.send(frames).await {
            self.capture.log(&format!("cannot send {msg_type}: {e}"));
        }
    }

    /// One channel's loop: each request is answered between busy and idle statuses.
    async fn channel(self, mut socket: RouterSocket, channel: Channel) {
        let name = if channel == Channel::Shell { "shell" } else { "control" };
        loop {
            let msg = self.next(&mut socket, name).await;
            self.out.status(&msg, "busy");
            if let Some(content) = self.answer(&mut socket, &msg, channel).await {
                self.reply(&mut socket, &msg, content).await;
            }
            self.out.status(&msg, "idle");
        }
    }

    /// The reply content to a request on `channel` (`None`: no reply).
    async fn answer(&self, socket: &mut RouterSocket, msg: &Message, channel: Channel) -> Option<Value> {
        match (channel, msg.msg_type()) {
            (_, "kernel_info_request") => Some(kernel_info()),
            (_, "shutdown_request") => self.shutdown(socket, msg).await,
            (Channel::Control, "interrupt_request") => {
                if self.running.load(Ordering::SeqCst) {
                    crate::interrupt::request_abort();
                }
                Some(json!({ "status": "ok" }))
            }
            (Channel::Shell, "comm_info_request") => Some(json!({ "status": "ok", "comms": {} })),
            (Channel::Shell, t) if SESSION_REQUESTS.contains(&t) => {
                let (tx, rx) = tokio::sync::oneshot::channel();
                match self.jobs.send(Job { request: msg.clone(), reply: tx }) {
                    Ok(()) => rx.await.ok().flatten(),
                    Err(_) => Some(
                        json!({ "status": "error", "ename": "KernelError", "evalue": "the session has ended", "traceback": [] }),
                    ),
                }
            }
            // widgets' comms are not supported: ignored, as kernels without comms do
            (Channel::Shell, "comm_open" | "comm_msg" | "comm_close") => None,
            (_, other) => {
                let name = if channel == Channel::Shell { "shell" } else { "control" };
                self.capture.log(&format!("{name}: `{other}` is not supported (ignored)"));
                None
            }
        }
    }

    /// Answers, stops a running cell (a training saves its state), then ends the process.
    async fn shutdown(&self, socket: &mut RouterSocket, msg: &Message) -> Option<Value> {
        let restart = msg.content["restart"].as_bool().unwrap_or(false);
        let content = json!({ "status": "ok", "restart": restart });
        self.reply(socket, msg, content.clone()).await;
        self.out.publish_for(msg, "shutdown_reply", content);
        if self.running.load(Ordering::SeqCst) {
            crate::interrupt::request_abort();
            let since = std::time::Instant::now();
            while self.running.load(Ordering::SeqCst) && since.elapsed() < SHUTDOWN_GRACE {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        self.out.status(msg, "idle");
        self.capture.flush();
        // let IOPub send what is queued
        tokio::time::sleep(Duration::from_millis(100)).await;
        std::process::exit(0);
    }
}

fn kernel_info() -> Value {
    json!({
        "status": "ok",
        "protocol_version": PROTOCOL_VERSION,
        "implementation": "sdtune",
        "implementation_version": env!("CARGO_PKG_VERSION"),
        "language_info": {
            "name": "rhai",
            "version": "1",
            "mimetype": "text/x-rhai",
            "file_extension": ".rhai",
            "pygments_lexer": "rust",
            "codemirror_mode": "rust",
        },
        "banner": format!("sdtune {} — Stable Diffusion training in Rhai. help() lists what there is.", env!("CARGO_PKG_VERSION")),
        "help_links": [],
        "debugger": false,
    })
}

async fn heartbeat(mut socket: RepSocket) {
    while let Ok(ping) = socket.recv().await {
        if socket.send(ping).await.is_err() {
            break;
        }
    }
}

async fn drain(mut socket: RouterSocket) {
    while socket.recv().await.is_ok() {}
}

async fn publish(mut socket: PubSocket, codec: Arc<Codec>, mut rx: UnboundedReceiver<Message>) {
    while let Some(msg) = rx.recv().await {
        let frames = ZmqMessage::try_from(codec.encode(&msg)).expect("a message has frames");
        // PUB drops messages nobody subscribed to; an error here is not the request's concern
        let _ = socket.send(frames).await;
    }
}
