//! Builds the XDP program (`ebpf/xdp`) for the BPF target with the nightly
//! toolchain and bpf-linker, and leaves the object in OUT_DIR where
//! `src/ebpf.rs` embeds it. No prebuilt object is committed.
use std::{env, path::PathBuf};

fn main() -> anyhow::Result<()> {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let root = manifest.join("../ebpf/xdp");
    let root = root
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("non-UTF-8 path {root:?}"))?;
    let has_linker = env::var_os("PATH")
        .map(|p| env::split_paths(&p).any(|d| d.join("bpf-linker").is_file()))
        .unwrap_or(false);
    if !has_linker && env::var_os("AYA_BUILD_SKIP").is_none() {
        anyhow::bail!(
            "bpf-linker is not on PATH: the XDP program cannot be built. \
             Run scripts/setup (it installs bpf-linker against LLVM 22 into ~/.cargo/bin)."
        );
    }
    println!("cargo:rerun-if-changed=../ebpf/common/src");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "loupe-xdp",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::Nightly,
    )
}
