//! The Jupyter wire format: the connection file, messages as multipart frames, and their HMAC-SHA256 signatures.

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use sha2::Sha256;
use std::path::Path;

/// The protocol version this kernel speaks.
pub const PROTOCOL_VERSION: &str = "5.3";
const DELIMITER: &[u8] = b"<IDS|MSG>";

/// A kernel's connection file (written by the Jupyter client that starts it).
#[derive(Debug, Deserialize)]
pub struct Connection {
    pub transport: String,
    pub ip: String,
    pub shell_port: u16,
    pub iopub_port: u16,
    pub stdin_port: u16,
    pub control_port: u16,
    pub hb_port: u16,
    #[serde(default)]
    pub key: String,
    #[serde(default = "default_scheme")]
    pub signature_scheme: String,
}

fn default_scheme() -> String {
    "hmac-sha256".into()
}

impl Connection {
    /// Reads and checks a connection file.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read the connection file", path.display()))?;
        let c: Connection = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a Jupyter connection file", path.display()))?;
        if c.transport != "tcp" {
            bail!("{}: transport `{}` is not supported (expected \"tcp\")", path.display(), c.transport);
        }
        if !c.key.is_empty() && c.signature_scheme != "hmac-sha256" {
            bail!(
                "{}: signature_scheme `{}` is not supported (expected \"hmac-sha256\")",
                path.display(),
                c.signature_scheme
            );
        }
        Ok(c)
    }

    /// `tcp://ip:port`.
    pub fn endpoint(&self, port: u16) -> String {
        format!("tcp://{}:{port}", self.ip)
    }
}

/// One message: routing identities, then header, parent header, metadata and content.
#[derive(Clone, Debug)]
pub struct Message {
    pub identities: Vec<Bytes>,
    pub header: Value,
    pub parent_header: Value,
    pub metadata: Value,
    pub content: Value,
    pub buffers: Vec<Bytes>,
}

impl Message {
    /// The header's `msg_type`.
    pub fn msg_type(&self) -> &str {
        self.header["msg_type"].as_str().unwrap_or("")
    }

    /// A message of `msg_type` in this kernel's `session`, answering `parent` (its identities too).
    pub fn reply_to(parent: &Message, session: &str, msg_type: &str, content: Value) -> Message {
        Message {
            identities: parent.identities.clone(),
            header: header(session, msg_type),
            parent_header: parent.header.clone(),
            metadata: json!({}),
            content,
            buffers: Vec::new(),
        }
    }
}

/// A fresh header.
pub fn header(session: &str, msg_type: &str) -> Value {
    json!({
        "msg_id": new_id(),
        "session": session,
        "username": "sdtune",
        "date": iso8601_now(),
        "msg_type": msg_type,
        "version": PROTOCOL_VERSION,
    })
}

/// Signs and checks messages with the connection key (no key: no signatures, as Jupyter defines).
pub struct Codec {
    key: Vec<u8>,
}

impl Codec {
    pub fn new(key: &str) -> Self {
        Self { key: key.as_bytes().to_vec() }
    }

    /// The hex HMAC-SHA256 of the four JSON parts (empty without a key).
    pub fn sign(&self, parts: &[&[u8]]) -> String {
        if self.key.is_empty() {
            return String::new();
        }
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key length");
        for p in parts {
            mac.update(p);
        }
        mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Frames: identities, delimiter, signature, header, parent, metadata, content, buffers.
    pub fn encode(&self, m: &Message) -> Vec<Bytes> {
        let parts: Vec<Vec<u8>> = [&m.header, &m.parent_header, &m.metadata, &m.content]
            .iter()
            .map(|v| serde_json::to_vec(v).expect("JSON values serialise"))
            .collect();
        let refs: Vec<&[u8]> = parts.iter().map(|p| p.as_slice()).collect();
        let mut frames = m.identities.clone();
        frames.push(Bytes::from_static(DELIMITER));
        frames.push(Bytes::from(self.sign(&refs)));
        frames.extend(parts.into_iter().map(Bytes::from));
        frames.extend(m.buffers.iter().cloned());
        frames
    }

    /// Parses frames and checks the signature; an unsigned or wrongly signed message is an error.
    pub fn decode(&self, frames: Vec<Bytes>) -> Result<Message> {
        let at = frames.iter().position(|f| f.as_ref() == DELIMITER).context("no <IDS|MSG> delimiter")?;
        if frames.len() < at + 6 {
            bail!("{} frames after the delimiter (expected at least 5)", frames.len() - at - 1);
        }
        let parts: Vec<&[u8]> = frames[at + 2..at + 6].iter().map(|f| f.as_ref()).collect();
        if !self.key.is_empty() {
            let given = std::str::from_utf8(&frames[at + 1]).unwrap_or("");
            if given.is_empty() {
                bail!("unsigned message");
            }
            if !constant_time_eq(given.as_bytes(), self.sign(&parts).as_bytes()) {
                bail!("bad signature");
            }
        }
        let json = |i: usize, what: &str| -> Result<Value> {
            let v: Value = serde_json::from_slice(parts[i]).with_context(|| format!("{what} is not JSON"))?;
            Ok(if v.is_null() { Value::Object(Map::new()) } else { v })
        };
        Ok(Message {
            identities: frames[..at].to_vec(),
            header: json(0, "header")?,
            parent_header: json(1, "parent header")?,
            metadata: json(2, "metadata")?,
            content: json(3, "content")?,
            buffers: frames[at + 6..].to_vec(),
        })
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A random UUID (version 4 layout) from the system's randomness, falling back to time and a counter.
pub fn new_id() -> String {
    use sha2::Digest;
    static COUNT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut seed = [0u8; 16];
    let from_os = std::fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut seed));
    let mut h = sha2::Sha256::new();
    if from_os.is_err() {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        h.update(now.as_nanos().to_le_bytes());
        h.update(std::process::id().to_le_bytes());
    }
    h.update(seed);
    h.update(COUNT.fetch_add(1, std::sync::atomic::Ordering::SeqCst).to_le_bytes());
    let mut b: [u8; 16] = h.finalize()[..16].try_into().expect("16 of 32 bytes");
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &hex[..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..])
}

/// The current UTC time as ISO 8601 with microseconds (`2026-11-26T11:34:17.123456Z`).
pub fn iso8601_now() -> String {
    let now = crate::io::time::now();
    format!("{}.{:06}Z", crate::io::time::iso8601(now.as_secs() as i64), now.subsec_micros())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_rfc_4231() {
        // RFC 4231, test case 2
        let c = Codec::new("Jefe");
        assert_eq!(
            c.sign(&[b"what do ya want ", b"for nothing?"]),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn messages_round_trip_and_bad_signatures_are_refused() {
        let c = Codec::new("secret");
        let m = Message {
            identities: vec![Bytes::from_static(b"peer")],
            header: header("s", "execute_request"),
            parent_header: json!({}),
            metadata: json!({}),
            content: json!({"code": "1 + 1"}),
            buffers: Vec::new(),
        };
        let frames = c.encode(&m);
        let back = c.decode(frames.clone()).unwrap();
        assert_eq!(back.content, m.content);
        assert_eq!(back.identities, m.identities);
        assert_eq!(back.msg_type(), "execute_request");
        let mut bad = frames.clone();
        bad[2] = Bytes::from_static(b"00");
        assert!(c.decode(bad).unwrap_err().to_string().contains("bad signature"));
        let mut unsigned = frames.clone();
        unsigned[2] = Bytes::new();
        assert!(c.decode(unsigned).is_err());
        let mut tampered = frames;
        tampered[6] = Bytes::from_static(br#"{"code": "2"}"#);
        assert!(c.decode(tampered).is_err());
        assert!(Codec::new("other").decode(c.encode(&m)).is_err());
    }

    #[test]
    fn dates_and_ids_have_the_expected_shape() {
        let d = iso8601_now();
        assert_eq!((d.len(), &d[10..11], &d[19..20], &d[26..]), (27, "T", ".", "Z"), "{d}");
        let id = new_id();
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
        assert_ne!(new_id(), id);
    }
}
