//! Empty host-side library: the XDP program is the `loupe-xdp` binary target,
//! compiled for BPF by `dataplane/build.rs`.
#![no_std]
