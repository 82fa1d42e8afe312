//! Talking to a Unix socket that speaks newline-delimited JSON: the
//! dataplane's (from the daemon) and the daemon's (from the CLI).

use std::{
    io::{BufReader, Write},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use anyhow::{bail, Context};
use loupe_dataplane::api::unix::LineReader;
use serde::{de::DeserializeOwned, Serialize};

/// One connection; requests and answers in turn.
pub struct Conn {
    out: UnixStream,
    reader: LineReader<BufReader<UnixStream>>,
    path: String,
}

impl Conn {
    pub fn open(path: &Path, timeout: Duration) -> anyhow::Result<Conn> {
        let out = UnixStream::connect(path).with_context(|| {
            format!(
                "cannot connect to {}{}",
                path.display(),
                if path.exists() {
                    " (permission denied means this user is not root or in the socket's group)"
                } else {
                    " (is the process running?)"
                }
            )
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
