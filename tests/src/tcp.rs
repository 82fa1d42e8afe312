//! TCP sockets created inside a namespace, used from anywhere.

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use anyhow::Context;
use sha2::{Digest, Sha256};

use crate::{https::fill_pseudo_random, netns::Netns, Harness};

pub fn listen(ns: &Netns, addr: &str) -> anyhow::Result<TcpListener> {
    let addr: SocketAddr = addr.parse().context("listen address")?;
    ns.enter(|| TcpListener::bind(addr))?
        .with_context(|| format!("bind {addr} in {}", ns.name))
}

pub fn connect(ns: &Netns, addr: &str) -> anyhow::Result<TcpStream> {
    let addr: SocketAddr = addr.parse().context("connect address")?;
    let s = ns
        .enter(|| TcpStream::connect_timeout(&addr, Duration::from_secs(20)))?
        .with_context(|| format!("connect {addr} from {}", ns.name))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    s.set_write_timeout(Some(Duration::from_secs(60)))?;
    Ok(s)
}

/// Serve `conns` connections: each echoes what it reads until EOF.
pub fn spawn_echo_server(
    listener: TcpListener,
    conns: usize,
) -> std::thread::JoinHandle<anyhow::Result<()>> {
    std::thread::spawn(move || {
        let mut handles = Vec::new();
        for _ in 0..conns {
            let (mut s, _) = listener.accept()?;
            s.set_read_timeout(Some(Duration::from_secs(60)))?;
            handles.push(std::thread::spawn(move || -> std::io::Result<()> {
                let mut buf = vec![0u8; 16384];
                loop {
                    let n = s.read(&mut buf)?;
                    if n == 0 {
                        return s.shutdown(std::net::Shutdown::Write);
                    }
                    s.write_all(&buf[..n])?;
                }
            }));
        }
        for h in handles {
            h.join()
                .map_err(|_| anyhow::anyhow!("echo thread panicked"))??;
        }
        Ok(())
    })
}

/// Write `data`, half-close, read everything back.
pub fn echo_roundtrip(s: &mut TcpStream, data: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut writer = s.try_clone()?;
    let data_owned = data.to_vec();
    let w = std::thread::spawn(move || -> std::io::Result<()> {
        writer.write_all(&data_owned)?;
        writer.shutdown(std::net::Shutdown::Write)
    });
    let mut back = Vec::with_capacity(data.len());
    s.read_to_end(&mut back)?;
    w.join().map_err(|_| anyhow::anyhow!("writer panicked"))??;
    Ok(back)
}

/// CUBIC (see [`set_cubic`]) and `timeout` for reads and writes.
pub fn tune(s: &TcpStream, timeout: Duration) {
    set_cubic(s);
    s.set_read_timeout(Some(timeout)).expect("read timeout");
    s.set_write_timeout(Some(timeout)).expect("write timeout");
}

/// Use CUBIC on this socket. This machine's default, BBR, takes minutes to
/// climb back from the bandwidth it measures during heavy loss or an
/// overload (seen here: 4 kbit/s pacing afterwards); tests of the split
/// would then be measuring BBR.
pub fn set_cubic(s: &TcpStream) {
    let name = b"cubic";
    // SAFETY: a valid socket fd and a buffer of the given length.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(s),
            libc::IPPROTO_TCP,
            libc::TCP_CONGESTION,
            name.as_ptr().cast(),
            name.len() as libc::socklen_t,
        )
    };
    assert_eq!(
        rc,
        0,
        "TCP_CONGESTION cubic: {}",
        std::io::Error::last_os_error()
    );
}

/// SO_RCVBUF on a socket. On a listener, before any connection: its
/// connections are accepted with that buffer, and their SYN-ACK announces
/// the window shift it allows (the log2 of the largest window they could
/// offer, less 15; 0 below 64 KiB).
pub fn set_recv_buffer(s: &impl std::os::fd::AsRawFd, bytes: usize) {
    let v = libc::c_int::try_from(bytes).expect("a buffer size that fits an int");
    set_int_option(s, libc::SOL_SOCKET, libc::SO_RCVBUF, v, "SO_RCVBUF");
}

/// Sets the socket option `name` (called `what` in the panic if it fails)
/// of `level` to the int `v`.
pub fn set_int_option(
    s: &impl std::os::fd::AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
    v: libc::c_int,
    what: &str,
) {
    set_option(s, level, name, &v, what);
}

/// Sets the socket option `name` (called `what` in the panic if it fails)
/// of `level` to `v`, a value of the C type the option takes.
pub fn set_option<T: Copy>(
    s: &impl std::os::fd::AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
    v: &T,
    what: &str,
) {
    // SAFETY: a valid socket fd, and a value of the option's C type and
    // size that outlives the call.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            level,
            name,
            (v as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "{what}: {}", std::io::Error::last_os_error());
}

/// Sends `len` pseudo-random bytes from `seed`, returns their SHA-256.
fn send(mut s: TcpStream, seed: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut left = len;
    let mut n = 0;
    while left > 0 {
        let k = left.min(buf.len());
        fill_pseudo_random(&mut buf[..k], seed.wrapping_add(n));
        s.write_all(&buf[..k])?;
        hash.update(&buf[..k]);
        left -= k;
        n += 1;
    }
    s.shutdown(Shutdown::Write)?;
    Ok(hash.finalize().to_vec())
}

/// Reads to EOF; returns (bytes, SHA-256).
pub fn receive(s: &mut TcpStream) -> std::io::Result<(usize, Vec<u8>)> {
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut total = 0;
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Ok((total, hash.finalize().to_vec()));
        }
        hash.update(&buf[..n]);
        total += n;
    }
}

/// One connection from the client to `addr` on the server, `len`
/// pseudo-random bytes each way at once (CUBIC at both ends), both checked
/// by SHA-256; returns how long it took.
pub fn both_ways(h: &Harness, addr: &str, len: usize) -> anyhow::Result<Duration> {
    both_ways_on(h, listen(&h.server, addr)?, addr, len)
}

/// [`both_ways`] to a listener made already (with options of its own).
pub fn both_ways_on(
    h: &Harness,
    listener: TcpListener,
    addr: &str,
    len: usize,
) -> anyhow::Result<Duration> {
    // Each end sends from its own seed while it receives: returns what it
    // received (bytes, SHA-256) and the SHA-256 of what it sent.
    let exchange = move |mut s: TcpStream, seed: u64| {
        tune(&s, Duration::from_secs(120));
        let w = s.try_clone().expect("clone");
        let sender = std::thread::spawn(move || send(w, seed, len).expect("send"));
        let got = receive(&mut s).expect("receive");
        (got, sender.join().expect("sender"))
    };
    let server = std::thread::spawn(move || exchange(listener.accept().expect("accept").0, 2));
    let t0 = Instant::now();
    let c = connect(&h.client, addr)?;
    let ((down, down_hash), up_hash) = exchange(c, 1);
    let ((up, up_seen), down_sent) = server.join().unwrap();
    let took = t0.elapsed();
    anyhow::ensure!(
        (up, down) == (len, len),
        "bytes up/down: {up}/{down} of {len}"
    );
    anyhow::ensure!(up_seen == up_hash, "upload differs");
    anyhow::ensure!(down_hash == down_sent, "download differs");
    Ok(took)
}

/// The namespace's `TcpExt` counters (`/proc/net/netstat` read from
/// inside it), by name.
pub fn tcp_ext(ns: &Netns) -> anyhow::Result<std::collections::HashMap<String, u64>> {
    let out = ns.exec("cat", &["/proc/net/netstat"])?;
    let text = String::from_utf8(out.stdout).context("netstat is not UTF-8")?;
    let mut lines = text.lines().filter_map(|l| l.strip_prefix("TcpExt:"));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        anyhow::bail!("no TcpExt lines in /proc/net/netstat of {}", ns.name);
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .map(|(n, v)| Ok((n.to_string(), v.parse().context("a TcpExt value")?)))
        .collect()
}
