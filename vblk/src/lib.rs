//! `vblk`: the uvirtio command-line tool for virtio-blk devices, and the embedded
//! vhost-user-blk server ([`server`]) it uses as its default target.
//!
//! The binary is run as `cargo vblk <command>`; today it has `serve`, which runs the embedded
//! server alone for other vhost-user front-ends.

pub mod server;
