//! Output capture: the process's stdout and stderr (file descriptors 1 and 2) are pipes whose contents become
//! `stream` messages, so that everything printed — a script's `print`, the core's warnings — reaches the
//! notebook. `flush` returns once all that was written before it has been passed on, which keeps streams in order
//! with the other messages of a cell.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// Where captured text goes: `(stream name, text)`.
pub type Sink = Arc<dyn Fn(&'static str, String) + Send + Sync>;

const MARK: &[u8] = b"\0sdtune-flush:";

/// The running capture.
pub struct Capture {
    /// The flush number each stream (stdout, stderr) has passed on.
    seen: Arc<(Mutex<[u64; 2]>, Condvar)>,
    next: AtomicU64,
    /// The kernel's own log (the original stderr).
    log: Mutex<Box<dyn Write + Send>>,
    active: bool,
}

impl Capture {
    /// Redirects fds 1 and 2 into pipes read by two threads that hand text to `sink` (on Unix; elsewhere output
    /// stays where it was and only the log works).
    pub fn start(sink: Sink) -> std::io::Result<Arc<Capture>> {
        imp::start(sink)
    }

    /// Waits (at most 2 s) until everything written to stdout and stderr so far has gone to the sink.
    pub fn flush(&self) {
        let _ = std::io::stdout().flush();
        let _ = std::io::stderr().flush();
        if !self.active {
            return;
        }
        let n = self.next.fetch_add(1, Ordering::SeqCst) + 1;
        let mark = [MARK, n.to_string().as_bytes(), b"\0"].concat();
        let _ = std::io::stdout().write_all(&mark).and_then(|_| std::io::stdout().flush());
        let _ = std::io::stderr().write_all(&mark);
        let (lock, cv) = &*self.seen;
        let guard = lock.lock().unwrap_or_else(|e| e.into_inner());
        let _ = cv.wait_timeout_while(guard, Duration::from_secs(2), |seen| seen[0] < n || seen[1] < n);
    }

    /// Writes a line to the kernel's log (the terminal or Jupyter server log it was started from).
    pub fn log(&self, line: &str) {
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(log, "sdtune kernel: {line}");
    }
}

/// Splits what a pipe delivered into text to pass on and flush marks; keeps an incomplete mark or UTF-8
/// sequence at the end for the next read.
fn split_chunk(buf: &mut Vec<u8>) -> (String, Vec<u64>) {
    let mut text = Vec::new();
    let mut marks = Vec::new();
    loop {
        match find(buf, MARK) {
            Some(i) => match buf[i + MARK.len()..].iter().position(|&b| b == 0) {
                Some(j) => {
                    text.extend_from_slice(&buf[..i]);
                    let num = &buf[i + MARK.len()..i + MARK.len() + j];
                    if let Some(n) = std::str::from_utf8(num).ok().and_then(|s| s.parse().ok()) {
                        marks.push(n);
                    }
                    buf.drain(..i + MARK.len() + j + 1);
                }
                None => {
                    text.extend_from_slice(&buf[..i]);
                    buf.drain(..i);
                    break;
                }
            },
            None => {
                // a mark may have begun at the end
                let keep = (1..MARK.len().min(buf.len() + 1))
                    .rev()
                    .find(|&k| buf.ends_with(&MARK[..k]))
                    .map_or(buf.len(), |k| buf.len() - k);
                let cut = match std::str::from_utf8(&buf[..keep]) {
                    Err(e) if e.error_len().is_none() => e.valid_up_to(),
                    _ => keep,
                };
                text.extend_from_slice(&buf[..cut]);
                buf.drain(..cut);
                break;
            }
        }
    }
    (String::from_utf8_lossy(&text).into_owned(), marks)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(unix)]
mod imp {
    use super::*;
    use std::fs::File;
    use std::io::Read;
    use std::os::fd::FromRawFd;

    pub fn start(sink: Sink) -> std::io::Result<Arc<Capture>> {
        // SAFETY: plain descriptor calls on fds this process owns; each new fd is owned by exactly one File.
        let log = unsafe {
            let fd = libc::dup(2);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            File::from_raw_fd(fd)
        };
        let seen = Arc::new((Mutex::new([0u64; 2]), Condvar::new()));
        for (index, (fd, name)) in [(1, "stdout"), (2, "stderr")].into_iter().enumerate() {
            let mut fds = [0i32; 2];
            // SAFETY: as above; the write end replaces fd 1 or 2 and is then closed once.
            let reader = unsafe {
                if libc::pipe(fds.as_mut_ptr()) != 0 || libc::dup2(fds[1], fd) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(fds[1]);
                File::from_raw_fd(fds[0])
            };
            let (sink, seen) = (sink.clone(), seen.clone());
            std::thread::spawn(move || pump(reader, name, index, sink, seen));
        }
        Ok(Arc::new(Capture { seen, next: AtomicU64::new(0), log: Mutex::new(Box::new(log)), active: true }))
    }

    fn pump(mut reader: File, name: &'static str, index: usize, sink: Sink, seen: Arc<(Mutex<[u64; 2]>, Condvar)>) {
        let mut buf = Vec::new();
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            let n = match reader.read(&mut chunk) {
                Ok(0) => return,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            };
            buf.extend_from_slice(&chunk[..n]);
            let (text, marks) = split_chunk(&mut buf);
            if !text.is_empty() {
                sink(name, text);
            }
            if let Some(&last) = marks.last() {
                let (lock, cv) = &*seen;
                let mut s = lock.lock().unwrap_or_else(|e| e.into_inner());
                s[index] = s[index].max(last);
                cv.notify_all();
            }
        }
    }
}

#[cfg(not(unix))]
mod imp {
    use super::*;

    pub fn start(_sink: Sink) -> std::io::Result<Arc<Capture>> {
        let seen = Arc::new((Mutex::new([0u64; 2]), Condvar::new()));
        Ok(Arc::new(Capture {
            seen,
            next: AtomicU64::new(0),
            log: Mutex::new(Box::new(std::io::stderr())),
            active: false,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::split_chunk;

    #[test]
    fn marks_split_text_even_across_reads() {
        let mut buf = b"hello\n\0sdtune-flush:3\0after".to_vec();
        assert_eq!(split_chunk(&mut buf), ("hello\nafter".to_string(), vec![3]));
        assert!(buf.is_empty());
        // a mark cut in two by the pipe
        let mut buf = b"a\0sdtune-fl".to_vec();
        assert_eq!(split_chunk(&mut buf), ("a".to_string(), vec![]));
        buf.extend_from_slice(b"ush:12\0b");
        assert_eq!(split_chunk(&mut buf), ("b".to_string(), vec![12]));
        let mut buf = b"x\0sdtune-flush:4".to_vec();
        assert_eq!(split_chunk(&mut buf), ("x".to_string(), vec![]));
        buf.extend_from_slice(b"\0");
        assert_eq!(split_chunk(&mut buf), (String::new(), vec![4]));
        // a UTF-8 character cut in two waits for its second byte
        let mut buf = vec![b'e', 0xC3];
        assert_eq!(split_chunk(&mut buf), ("e".to_string(), vec![]));
        buf.push(0xA9);
        assert_eq!(split_chunk(&mut buf), ("é".to_string(), vec![]));
    }
}
