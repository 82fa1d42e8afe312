use std::{
    io::{BufReader, Write},
    sync::mpsc,
};

use loupe_dataplane::stats::PolicyInfo;

use super::*;

/// A stand-in for the dataplane's socket: status says which policy it
/// runs; an apply with a higher version replaces it.
struct FakeDataplane {
    path: PathBuf,
    running: Arc<Mutex<Option<Policy>>>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl FakeDataplane {
    fn start(dir: &Path) -> FakeDataplane {
        let path = dir.join("dataplane.sock");
        let listener = unix::bind(&path, unix::Access::default()).unwrap();
        listener.set_nonblocking(true).unwrap();
        let running: Arc<Mutex<Option<Policy>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (running, stop) = (running.clone(), stop.clone());
            thread::spawn(move || {
                unix::accept_loop(
                    &listener,
                    unix::Access::default(),
                    &stop,
                    "fake dataplane",
                    |why| api::line(&Response::error(why)),
                    move |stream, slot| serve_fake(stream, slot, &running),
                )
            })
        };
        FakeDataplane {
            path,
            running,
            stop,
            thread: Some(thread),
        }
    }

    fn running(&self) -> Option<Policy> {
        lock(&self.running).clone()
    }
}

impl Drop for FakeDataplane {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve_fake(stream: UnixStream, slot: &unix::Slot, running: &Mutex<Option<Policy>>) {
    let mut reader = unix::LineReader::new(BufReader::new(stream.try_clone().unwrap()));
    let mut out = &stream;
    while let Ok(Some(line)) = reader.read_line() {
        let _busy = slot.busy();
        let resp = match serde_json::from_str::<Request>(&line) {
            Ok(Request::Status) => {
                let policy = lock(running).as_ref().map(|p| PolicyInfo {
                    version: p.version,
                    digest: p.digest.clone(),
                    source: p.source.clone(),
                    rules: p.rules.len(),
                    default_action: p.default_action.label().into(),
                });
                Response {
                    status: Some(Box::new(StatsReport {
                        policy,
                        ..StatsReport::default()
                    })),
                    ..Response::ok()
                }
            }
            Ok(Request::Apply { policy }) => {
                let mut r = lock(running);
                if r.as_ref().is_some_and(|p| p.version >= policy.version) {
                    Response::error("version not above the running one")
                } else {
                    let v = policy.version;
                    *r = Some(*policy);
                    Response {
                        version: Some(v),
                        ..Response::ok()
                    }
                }
            }
            _ => Response::error("not in this fake"),
        };
        if out.write_all(&api::line(&resp)).is_err() {
            return;
        }
    }
}

fn test_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("loupe-daemon-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn daemon(dir: &Path, dataplane: &Path) -> Daemon {
    let log = LogConfig {
        path: dir.join("flows.jsonl"),
        max_bytes: 1 << 20,
        keep: 1,
    };
    let cfg = DaemonConfig {
        dataplane: dataplane.to_path_buf(),
        socket: dir.join("control.sock"),
        access: unix::Access::default(),
        policy: None,
        state_dir: dir.join("state"),
        log: log.clone(),
        metrics: None,
    };
    Daemon::new(
        cfg,
        None,
        FlowLog::open(log).unwrap(),
        Arc::new(AtomicBool::new(false)),
    )
}

fn sources(dir: &Path, name: &str) -> Sources {
    Sources {
        path: dir.join(format!("{name}.toml")).display().to_string(),
        text: format!("[[rules]]\nname = \"{name}\"\naction = \"block\"\n"),
        files: BTreeMap::new(),
        blobs: BTreeMap::new(),
        version: 0,
    }
}

/// A compiler that holds the compile of every policy whose path contains
/// `held` until the test sends on the second channel, saying on the
/// first that it started.
fn hold_compiles(d: &mut Daemon, held: &'static str) -> (mpsc::Receiver<()>, mpsc::Sender<()>) {
    let (started_tx, started_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let (started_tx, release_rx) = (Mutex::new(started_tx), Mutex::new(release_rx));
    d.compiler = Box::new(move |s: &Sources, saved: bool| {
        if s.path.contains(held) {
            let _ = lock(&started_tx).send(());
            let _ = lock(&release_rx).recv_timeout(Duration::from_secs(120));
        }
        s.compile(saved)
    });
    (started_rx, release_tx)
}

/// While a large policy is being checked (here a compile held until the
/// test lets it go), status is answered and a small policy is applied;
/// the large one, sent first, then does not replace the later one.
#[test]
fn a_policy_being_checked_holds_up_neither_status_nor_another_apply() {
    let dir = test_dir("apply");
    let dp = FakeDataplane::start(&dir);
    let mut d = daemon(&dir, &dp.path);
    let (started_rx, release_tx) = hold_compiles(&mut d, "big.toml");
    let d = Arc::new(d);
    let big = {
        let d = d.clone();
        let s = sources(&dir, "big");
        thread::spawn(move || d.apply(s))
    };
    started_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the large policy is being checked");
    let (done_tx, done_rx) = mpsc::channel();
    {
        let d = d.clone();
        let small = sources(&dir, "small");
        thread::spawn(move || {
            let status = d.handle(CtlRequest::Status);
            let applied = d.apply(small);
            let _ = done_tx.send((status, applied));
        });
    }
    let answered = done_rx.recv_timeout(Duration::from_secs(60));
    let _ = release_tx.send(());
    let (status, small) =
        answered.expect("status and a small apply are answered while a policy is checked");
    assert!(status.ok, "{status:?}");
    assert!(status.control.unwrap().dataplane_connected);
    assert!(small.ok, "{small:?}");
    assert_eq!(small.version, Some(1));
    assert_eq!(dp.running().unwrap().rules[0].name, "small");
    let big = big.join().unwrap();
    assert!(!big.ok, "{big:?}");
    let e = big.error.unwrap_or_default();
    assert!(
        e.contains("a policy sent after this one was applied"),
        "{e}"
    );
    assert_eq!(dp.running().unwrap().rules[0].name, "small");
    assert_eq!(lock(&d.state).counters.applies_rejected, 1);
    drop(dp);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Applies that finish in the order they were sent each replace the one
/// before (the later version runs).
#[test]
fn applies_in_order_each_take_effect() {
    let dir = test_dir("order");
    let dp = FakeDataplane::start(&dir);
    let d = daemon(&dir, &dp.path);
    for (i, name) in ["one", "two", "three"].iter().enumerate() {
        let r = d.apply(sources(&dir, name));
        assert!(r.ok, "{r:?}");
        assert_eq!(r.version, Some(i as u64 + 1));
        assert_eq!(dp.running().unwrap().rules[0].name, *name);
    }
    drop(dp);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Beyond the checks that may run at once, an apply is refused at once
/// (not queued behind them), and the running policy stays.
#[test]
fn applies_beyond_the_checks_at_once_are_refused() {
    let dir = test_dir("busy");
    let dp = FakeDataplane::start(&dir);
    let mut d = daemon(&dir, &dp.path);
    let (started_rx, release_tx) = hold_compiles(&mut d, "slow");
    let d = Arc::new(d);
    let slow: Vec<_> = (0..MAX_CHECKING)
        .map(|i| {
            let d = d.clone();
            let s = sources(&dir, &format!("slow{i}"));
            thread::spawn(move || d.apply(s))
        })
        .collect();
    for _ in 0..MAX_CHECKING {
        started_rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the slow policies are being checked");
    }
    let busy = d.apply(sources(&dir, "one-more"));
    for _ in 0..MAX_CHECKING {
        let _ = release_tx.send(());
    }
    assert!(!busy.ok, "{busy:?}");
    let e = busy.error.unwrap_or_default();
    assert!(e.contains("policies are being checked already"), "{e}");
    for t in slow {
        t.join().unwrap();
    }
    // Once they are done, an apply goes through again.
    let r = d.apply(sources(&dir, "after"));
    assert!(r.ok, "{r:?}");
    assert_eq!(dp.running().unwrap().rules[0].name, "after");
    drop(dp);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The CLI sends a signature file's bytes with the policy, and the daemon
/// keeps them: a saved policy compiles to the same pattern after the file
/// is gone, and one too long arrives long enough to be refused as such.
#[test]
fn signature_files_travel_with_the_policy_and_are_kept() {
    let dir = test_dir("sigfile");
    let bytes = b"\xfe\xffMARK\x00".to_vec();
    std::fs::write(dir.join("mark.sig"), &bytes).unwrap();
    std::fs::write(dir.join("long.sig"), vec![b'z'; 5000]).unwrap();
    let text = "[signatures.mark]\nfile = \"mark.sig\"\n[profiles.p]\nsignatures = [\"mark\"]\n\
                [[rules]]\nname = \"d\"\naction = \"decrypt\"\nprofile = \"p\"\n";
    let policy = dir.join("p.toml");
    std::fs::write(&policy, text).unwrap();
    let s = Sources::read(&policy).unwrap();
    // Through the wire and the saved state, as JSON.
    let s: Sources = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
    std::fs::remove_file(dir.join("mark.sig")).unwrap();
    let (desired, diagnostics) = s.compile(true);
    let d = desired.unwrap_or_else(|| panic!("{diagnostics:?}"));
    assert_eq!(d.policy.signatures["mark"].pattern, bytes);
    let long = text.replace("mark.sig", "long.sig");
    std::fs::write(&policy, long).unwrap();
    let s = Sources::read(&policy).unwrap();
    assert_eq!(s.blobs.values().next().map(Vec::len), Some(1025));
    let (desired, diagnostics) = s.compile(false);
    assert!(desired.is_none());
    assert!(
        diagnostics
            .iter()
            .any(|d| d.contains("long.sig holds more than 1024 bytes")),
        "{diagnostics:?}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
