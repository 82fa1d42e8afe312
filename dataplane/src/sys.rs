//! Host facts and process set-up the engine needs before it touches the
//! kernel: capabilities, interfaces and their queues, CPU pinning, locked
//! memory. Each failure is an error that says what is missing and what to do.

use std::{ffi::CString, fs, path::Path};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum SysError {
    #[error(
        "missing privileges: {missing} (loupe-dataplane attaches XDP programs, creates BPF maps \
         and AF_XDP sockets; run it as root or grant CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN and \
         CAP_NET_RAW, e.g. with the systemd unit's AmbientCapabilities)"
    )]
    Privileges { missing: String },
    #[error("interface '{0}' not found (check the name with `ip link` in this network namespace)")]
    NoInterface(String),
    #[error("interface name '{0}' is not valid")]
    BadInterfaceName(String),
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
}

/// Capability numbers from linux/capability.h.
const CAP_NET_ADMIN: u32 = 12;
const CAP_NET_RAW: u32 = 13;
const CAP_IPC_LOCK: u32 = 14;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Effective capability set of this process (from /proc/self/status).
pub fn effective_caps() -> Result<u64, SysError> {
    let status = fs::read_to_string("/proc/self/status").map_err(|source| SysError::Read {
        path: "/proc/self/status".into(),
        source,
    })?;
    Ok(parse_cap_eff(&status).unwrap_or(0))
}

fn parse_cap_eff(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
}

/// The capabilities missing from `caps` for attaching XDP and binding AF_XDP
/// sockets; empty when all are present. CAP_SYS_ADMIN stands in for CAP_BPF
/// and CAP_PERFMON (kernels before 5.8, and the way root holds them).
/// CAP_PERFMON: without it the verifier refuses pointer arithmetic between
/// packet pointers (the frame length, `data_end - data`): "pointer -=
/// pointer prohibited".
pub fn missing_caps(caps: u64) -> Vec<&'static str> {
    let has = |c: u32| caps & (1u64 << c) != 0;
    let mut missing = Vec::new();
    if !has(CAP_BPF) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_BPF");
    }
    if !has(CAP_PERFMON) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_PERFMON");
    }
    if !has(CAP_NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    if !has(CAP_NET_RAW) {
        missing.push("CAP_NET_RAW");
    }
    missing
}

pub fn check_privileges() -> Result<(), SysError> {
    let missing = missing_caps(effective_caps()?);
    if missing.is_empty() {
        Ok(())
    } else {
        Err(SysError::Privileges {
            missing: missing.join(", "),
        })
    }
}

/// Interface index of `name` in the current network namespace.
pub fn ifindex(name: &str) -> Result<u32, SysError> {
    let c = CString::new(name).map_err(|_| SysError::BadInterfaceName(name.into()))?;
    // SAFETY: FFI call with a valid NUL-terminated string; returns 0 on error.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 {
        Err(SysError::NoInterface(name.into()))
    } else {
        Ok(idx)
    }
}

/// Number of RX queues the interface exposes (sysfs `queues/rx-N`).
pub fn rx_queue_count(name: &str) -> Result<u32, SysError> {
    let dir = format!("/sys/class/net/{name}/queues");
    let entries = fs::read_dir(Path::new(&dir)).map_err(|source| SysError::Read {
        path: dir.clone(),
        source,
    })?;
    let n = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("rx-"))
        .count();
    Ok(n.max(1) as u32)
}

/// The interface's MTU (sysfs `mtu`).
pub fn mtu(name: &str) -> Result<u32, SysError> {
    let path = format!("/sys/class/net/{name}/mtu");
    let text = fs::read_to_string(&path).map_err(|source| SysError::Read {
        path: path.clone(),
        source,
    })?;
    text.trim().parse().map_err(|_| SysError::Read {
        path,
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, "not a number"),
    })
}

/// Number of CPUs this process may run on.
pub fn cpu_count() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Pin the calling thread to one CPU. Failure is reported, not fatal: the
/// engine still works unpinned (containers may forbid affinity changes).
pub fn pin_current_thread(cpu: usize) -> std::io::Result<()> {
    loupe_hsm::signer::pin_thread(cpu % libc::CPU_SETSIZE as usize)
}

/// Lift RLIMIT_MEMLOCK: UMEM registration charges locked memory.
pub fn raise_memlock() -> std::io::Result<()> {
    let lim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: valid pointer to an initialised rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Why locked memory (a UMEM) could not be had, and what to do: with
/// CAP_IPC_LOCK nothing counts against RLIMIT_MEMLOCK; without it the
/// kernel refuses pages beyond the limit (ENOBUFS for a UMEM).
pub fn memlock_advice() -> String {
    let ipc_lock = effective_caps().is_ok_and(|c| c & (1u64 << CAP_IPC_LOCK) != 0);
    if ipc_lock {
        return "lower --frames if memory is short".into();
    }
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid pointer to an rlimit for getrlimit to fill.
    let limit = if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) } == 0 {
        if lim.rlim_cur == libc::RLIM_INFINITY {
            "unlimited".to_string()
        } else {
            format!("{} KiB", lim.rlim_cur / 1024)
        }
    } else {
        "unknown".to_string()
    };
    format!(
        "without CAP_IPC_LOCK it counts against the locked-memory limit ({limit} here): grant \
         CAP_IPC_LOCK (the systemd unit does), raise RLIMIT_MEMLOCK (LimitMEMLOCK=, ulimit -l) \
         or lower --frames"
    )
}

/// Reads a configuration file: a regular file of at most `max` bytes. It is
/// opened non-blocking, so a FIFO or device named by mistake is an error at
/// once instead of a thread stuck in `open` or `read`, and its size is
/// bounded before and while reading, so `/dev/zero` or a runaway file
/// cannot exhaust memory.
pub fn read_regular(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    use std::{io::Read, os::unix::fs::OpenOptionsExt};
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("not a regular file ({})", file_kind(&meta)),
        ));
    }
    let too_big = || {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("larger than the {max} bytes allowed"),
        )
    };
    if meta.len() > max {
        return Err(too_big());
    }
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    file.take(max.saturating_add(1)).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(too_big());
    }
    Ok(bytes)
}

/// What kind of file `meta` describes, for an error message.
pub fn file_kind(meta: &fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    if t.is_file() {
        "a regular file"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_symlink() {
        "a symbolic link"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_char_device() || t.is_block_device() {
        "a device"
    } else {
        "not a regular file"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_regular_refuses_fifos_devices_directories_and_big_files() {
        let dir = std::env::temp_dir().join(format!("loupe-sys-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir(&dir).unwrap();
        let fifo = dir.join("fifo");
        let c = CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path; mkfifo only creates a node.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        // A FIFO nobody writes to: an error at once, not a hang.
        let e = read_regular(&fifo, 1 << 20).unwrap_err();
        assert!(e.to_string().contains("a FIFO"), "{e}");
        let e = read_regular(Path::new("/dev/zero"), 1 << 20).unwrap_err();
        assert!(e.to_string().contains("a device"), "{e}");
        let e = read_regular(&dir, 1 << 20).unwrap_err();
        assert!(e.to_string().contains("a directory"), "{e}");
        let file = dir.join("f");
        fs::write(&file, [7u8; 100]).unwrap();
        assert_eq!(read_regular(&file, 100).unwrap(), vec![7u8; 100]);
        let e = read_regular(&file, 99).unwrap_err();
        assert!(e.to_string().contains("larger than the 99 bytes"), "{e}");
        // A symbolic link to a regular file is read (bundles often are).
        let link = dir.join("link");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert_eq!(read_regular(&link, 100).unwrap().len(), 100);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn root_has_everything() {
        // Root's usual CapEff on 6.x kernels (41 capabilities).
        let caps = parse_cap_eff("Name:\tx\nCapEff:\t000001ffffffffff\n").unwrap();
        assert!(missing_caps(caps).is_empty());
    }

    #[test]
    fn unprivileged_lacks_all_four() {
        assert_eq!(
            missing_caps(0),
            vec!["CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN", "CAP_NET_RAW"]
        );
    }

    #[test]
    fn sys_admin_stands_in_for_bpf() {
        let caps = (1 << CAP_SYS_ADMIN) | (1 << CAP_NET_ADMIN) | (1 << CAP_NET_RAW);
        assert!(missing_caps(caps).is_empty());
        let caps = (1 << CAP_NET_ADMIN) | (1 << CAP_NET_RAW);
        assert_eq!(missing_caps(caps), vec!["CAP_BPF", "CAP_PERFMON"]);
        let caps = (1 << CAP_BPF) | (1 << CAP_NET_ADMIN) | (1 << CAP_NET_RAW);
        assert_eq!(missing_caps(caps), vec!["CAP_PERFMON"]);
    }

    #[test]
    fn missing_interface_is_a_clear_error() {
        let e = ifindex("loupe-nope0").unwrap_err();
        assert!(e.to_string().contains("'loupe-nope0' not found"), "{e}");
    }
}
