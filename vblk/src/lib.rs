//! `vblk`: the uvirtio command-line tool for virtio-blk devices, and the embedded
//! vhost-user-blk server ([`server`]) it uses as its default target.
//!
//! The binary is run as `cargo vblk <command>`: `info`, `read`, `write`, `verify` and `bench`
//! drive a virtio-blk device through `virtio-blk-dev` (a vhost-user back-end, or this server
//! started in the same process on a temporary socket); `serve` runs the server alone for
//! other vhost-user front-ends. See the crate's README.

pub mod server;
