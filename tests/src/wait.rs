//! Waiting on conditions with deadlines (never on fixed sleeps).

use std::time::{Duration, Instant};

/// Poll `cond` until it returns `Some`, or fail after `timeout` with a
/// message naming what was awaited and the last state seen.
pub fn wait_until<T>(
    what: &str,
    timeout: Duration,
    mut cond: impl FnMut() -> Result<Option<T>, String>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    let mut delay = Duration::from_millis(5);
    let mut last = String::from("(never checked)");
    loop {
        match cond() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(state) => last = state,
        }
        if Instant::now() >= deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}; last state: {last}");
        }
        std::thread::sleep(delay);
        delay = (delay * 2).min(Duration::from_millis(100));
    }
}
