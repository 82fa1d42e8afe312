//! TCP sockets created inside a namespace, used from anywhere.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    time::Duration,
};

use anyhow::Context;

use crate::netns::Netns;

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
