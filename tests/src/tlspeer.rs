//! A TLS peer pair in Python (`ssl` + `asyncio`, Debian's python3) for
//! volume tests through decryption: a server that, per connection, sends
//! a requested amount of seeded pseudo-random bytes or takes an upload and
//! answers its SHA-256; and a client that runs many such connections at
//! once, checks every byte and prints a JSON summary.

use std::{path::PathBuf, process::Stdio, time::Duration};

use anyhow::{bail, Context};
use serde_json::Value;

use crate::{
    harness::{Harness, SERVER_V4},
    https::ServerCert,
    proc::Proc,
};

const PEER: &str = r#"
import asyncio, hashlib, json, random, ssl, sys, time

CHUNK = 1 << 20

def stream(seed, n):
    # The same bytes on both ends: seeded Mersenne Twister, 1 MiB at a time.
    r = random.Random(seed)
    while n > 0:
        k = min(CHUNK, n)
        yield r.randbytes(k)
        n -= k

async def serve_one(reader, writer):
    try:
        line = (await reader.readline()).decode().split()
        if line[0] == "DOWN":
            n, seed = int(line[1]), int(line[2])
            for part in stream(seed, n):
                writer.write(part)
                await writer.drain()
        elif line[0] == "UP":
            n = int(line[1])
            h = hashlib.sha256()
            left = n
            while left > 0:
                part = await reader.read(min(CHUNK, left))
                if not part:
                    break
                h.update(part)
                left -= len(part)
            writer.write((h.hexdigest() + " %d\n" % (n - left)).encode())
            await writer.drain()
    except Exception as e:
        print("server:", repr(e), file=sys.stderr, flush=True)
    finally:
        writer.close()

async def server(addr, port, cert, key):
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    srv = await asyncio.start_server(serve_one, addr, port, ssl=ctx, backlog=4096)
    print("listening", flush=True)
    async with srv:
        await srv.serve_forever()

async def one(i, mode, n, host, addr, port, ctx):
    t = time.monotonic()
    reader, writer = await asyncio.open_connection(addr, port, ssl=ctx, server_hostname=host)
    tls = writer.get_extra_info("ssl_object")
    version = tls.version()
    issuer = dict(x[0] for x in tls.getpeercert()["issuer"]).get("commonName")
    seed = 1000 + i
    if mode == "down":
        writer.write(b"DOWN %d %d\n" % (n, seed))
        await writer.drain()
        want = hashlib.sha256()
        for part in stream(seed, n):
            want.update(part)
        got = hashlib.sha256()
        total = 0
        while True:
            part = await reader.read(CHUNK)
            if not part:
                break
            got.update(part)
            total += len(part)
        ok = total == n and got.digest() == want.digest()
    else:
        writer.write(b"UP %d\n" % n)
        want = hashlib.sha256()
        for part in stream(seed, n):
            want.update(part)
            writer.write(part)
            await writer.drain()
        answer = (await reader.readline()).decode().split()
        ok = answer == [want.hexdigest(), str(n)]
        total = n
    writer.close()
    return {"ok": ok, "bytes": total, "secs": time.monotonic() - t,
            "version": version, "issuer": issuer}

async def clients(mode, n, conns, host, addr, port, cafile):
    ctx = ssl.create_default_context(cafile=cafile)
    t = time.monotonic()
    results = await asyncio.gather(*(one(i, mode, n, host, addr, port, ctx) for i in range(conns)),
                                   return_exceptions=True)
    secs = time.monotonic() - t
    errors = [repr(r) for r in results if isinstance(r, BaseException)]
    good = [r for r in results if not isinstance(r, BaseException)]
    print(json.dumps({"connections": conns, "ok": sum(1 for r in good if r["ok"]),
                      "bad": [r for r in good if not r["ok"]][:5], "errors": errors[:5],
                      "error_count": len(errors), "bytes": sum(r["bytes"] for r in good),
                      "secs": secs, "issuers": sorted({r["issuer"] for r in good}),
                      "versions": sorted({r["version"] for r in good})}), flush=True)

if sys.argv[1] == "server":
    asyncio.run(server(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]))
else:
    asyncio.run(clients(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5],
                        sys.argv[6], int(sys.argv[7]), sys.argv[8]))
"#;

/// Debian's python3 (its `ssl` is the system OpenSSL).
const PYTHON: &str = "/usr/bin/python3";

fn script(h: &Harness) -> anyhow::Result<PathBuf> {
    let path = h.dir.join("tlspeer.py");
    if !path.exists() {
        std::fs::write(&path, PEER)?;
    }
    Ok(path)
}

/// The server side, in the server namespace.
pub struct PeerServer {
    _proc: Proc,
    pub port: u16,
}

impl PeerServer {
    pub fn start(h: &Harness, port: u16, cert: &ServerCert) -> anyhow::Result<PeerServer> {
        // Its output goes to a file: a pipe nobody reads would stall it.
        let log = std::fs::File::create(h.dir.join(format!("tlspeer-{port}.log")))?;
        let child = h
            .server
            .command(PYTHON)
            .arg(script(h)?)
            .args(["server", "0.0.0.0", &port.to_string()])
            .arg(&cert.cert)
            .arg(&cert.key)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawning the python TLS server")?;
        let mut proc = Proc::new("tlspeer server", child);
        let listening = format!("0.0.0.0:{port}");
        proc.wait_ready(
            "the python TLS server to listen",
            Duration::from_secs(60),
            || h.server.listens_on(&listening),
        )?;
        Ok(PeerServer { _proc: proc, port })
    }
}

/// Which way the bytes go.
#[derive(Clone, Copy, Debug)]
pub enum Mode {
    Down,
    Up,
}

/// What the clients do: `conns` connections at once, each moving `bytes`
/// one way.
#[derive(Clone, Copy, Debug)]
pub struct Load {
    pub mode: Mode,
    pub bytes: usize,
    pub conns: usize,
}

/// Runs `load` against `host` at the server's IPv4 address and `port`,
/// trusting `cafile`; returns the client's summary (`ok`, `errors`,
/// `bytes`, `secs`, `issuers`).
pub fn run_clients(
    h: &Harness,
    load: Load,
    (host, port): (&str, u16),
    cafile: &std::path::Path,
    timeout: Duration,
) -> anyhow::Result<Value> {
    let Load { mode, bytes, conns } = load;
    let mode = match mode {
        Mode::Down => "down",
        Mode::Up => "up",
    };
    let child = h
        .client
        .command(PYTHON)
        .arg(script(h)?)
        .args([
            "client",
            mode,
            &bytes.to_string(),
            &conns.to_string(),
            host,
            SERVER_V4,
            &port.to_string(),
        ])
        .arg(cafile)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawning the python TLS client")?;
    let mut proc = Proc::new("tlspeer client", child);
    let (status, in_time) = proc.wait_timeout(timeout);
    let (out, err) = proc.take_output();
    if !in_time || !status.success() {
        bail!("the python TLS client failed ({status}, in time: {in_time}): {err}{out}");
    }
    let line = out.lines().last().unwrap_or_default();
    serde_json::from_str(line).with_context(|| format!("client summary {out:?} {err}"))
}
