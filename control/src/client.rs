//! Talking to a Unix socket that speaks newline-delimited JSON: the
//! dataplane's (from the daemon) and the daemon's (from the CLI).

use std::{
    io::{BufReader, Write},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use anyhow::{bail, Context};
use loupe_dataplane::api::unix::{LineReader, MAX_MESSAGE};
use serde::{de::DeserializeOwned, Serialize};

/// One connection; requests and answers in turn.
pub struct Conn {
    out: UnixStream,
    reader: LineReader<BufReader<UnixStream>>,
    path: String,
}

impl Conn {
    pub fn open(path: &Path, timeout: Duration) -> anyhow::Result<Conn> {
        let out = UnixStream::connect(path).map_err(|e| {
            let hint = match e.kind() {
                std::io::ErrorKind::PermissionDenied => {
                    " (this user is not root or in the socket's group)"
                }
                std::io::ErrorKind::NotFound => " (is the process running?)",
                std::io::ErrorKind::ConnectionRefused => {
                    " (nothing serves it: is the process running?)"
                }
                _ => "",
            };
            anyhow::anyhow!("cannot connect to {}: {e}{hint}", path.display())
        })?;
        out.set_read_timeout(Some(timeout))?;
        out.set_write_timeout(Some(timeout))?;
        let reader = LineReader::new(BufReader::new(out.try_clone()?));
        Ok(Conn {
            out,
            reader,
            path: path.display().to_string(),
        })
    }

    /// How long [`Conn::poll`] waits for a message.
    pub fn set_read_timeout(&self, t: Duration) -> anyhow::Result<()> {
        Ok(self.out.set_read_timeout(Some(t))?)
    }

    pub fn send(&mut self, req: &impl Serialize) -> anyhow::Result<()> {
        let mut line = serde_json::to_vec(req)?;
        line.push(b'\n');
        // The server would cut the connection half-way through it.
        if line.len() > MAX_MESSAGE {
            bail!(
                "the request to {} is {} bytes, more than the {MAX_MESSAGE} a message may be",
                self.path,
                line.len()
            );
        }
        self.out
            .write_all(&line)
            .with_context(|| format!("writing to {}", self.path))
    }

    /// The next message; an error when the peer hung up.
    pub fn recv<T: DeserializeOwned>(&mut self) -> anyhow::Result<T> {
        match self
            .reader
            .read_line()
            .with_context(|| format!("reading from {}", self.path))?
        {
            Some(line) => serde_json::from_str(&line)
                .with_context(|| format!("a malformed answer from {}", self.path)),
            None => bail!("{} closed the connection", self.path),
        }
    }

    /// The next message, `None` when none came within the read timeout.
    pub fn poll<T: DeserializeOwned>(&mut self) -> anyhow::Result<Option<T>> {
        match self.reader.read_line() {
            Ok(Some(line)) => Ok(Some(serde_json::from_str(&line)?)),
            Ok(None) => bail!("{} closed the connection", self.path),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    pub fn call<T: DeserializeOwned>(&mut self, req: &impl Serialize) -> anyhow::Result<T> {
        match self.send(req) {
            Ok(()) => self.recv(),
            // A server that refuses us answers and hangs up at once; the
            // answer may be waiting even though our request could not go.
            Err(e) => self.recv().or(Err(e)),
        }
    }
}

/// One request on a fresh connection.
pub fn call<T: DeserializeOwned>(
    path: &Path,
    req: &impl Serialize,
    timeout: Duration,
) -> anyhow::Result<T> {
    Conn::open(path, timeout)?.call(req)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each failure to connect is named for what it is: a socket file
    /// nobody serves is not a permission problem.
    #[test]
    fn connection_errors_say_what_happened() {
        let dir = std::env::temp_dir().join(format!("loupe-client-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let e = Conn::open(&path, Duration::from_secs(5)).err().unwrap();
        let e = format!("{e:#}");
        assert!(
            e.contains("No such file") && e.contains("is the process running?"),
            "{e}"
        );
        // Bound, then nobody listening: the file stays, connecting is refused.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let e = Conn::open(&path, Duration::from_secs(5)).err().unwrap();
        let e = format!("{e:#}");
        assert!(
            e.contains("Connection refused") && e.contains("nothing serves it"),
            "{e}"
        );
        assert!(!e.to_lowercase().contains("permission"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A request longer than a message may be is refused before a byte
    /// is sent (the server would cut the connection half-way).
    #[test]
    fn requests_too_long_for_the_socket_are_not_sent() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        // Were it sent, nobody reads it: a write would time out.
        ours.set_write_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut conn = Conn {
            reader: LineReader::new(BufReader::new(ours.try_clone().unwrap())),
            out: ours,
            path: "test".into(),
        };
        let e = conn.send(&"x".repeat(MAX_MESSAGE)).unwrap_err().to_string();
        assert!(e.contains("more than the 16777216"), "{e}");
        conn.send(&"ok").unwrap();
        theirs.set_nonblocking(true).unwrap();
        let mut got = Vec::new();
        let _ = std::io::Read::read_to_end(&mut &theirs, &mut got);
        assert_eq!(got, b"\"ok\"\n");
    }
}
