//! One module per command. Each `run` returns the exit code, or the one-line message for an
//! error (printed as `vblk: MESSAGE`, exit status 1).

pub mod bench;
pub mod info;
pub mod io;
pub mod serve;
pub mod verify;

use virtio_blk_dev::BlkDevice;
use virtio_transport_api::Transport;

/// Checks that `offset .. offset + len` is block-aligned, non-empty and on the device.
pub fn check_range<T: Transport>(dev: &BlkDevice<T>, what: &str, offset: u64, len: u64) -> Result<(), String> {
    let bs = u64::from(dev.block_size());
    let cap = dev.capacity();
    if offset % bs != 0 {
        return Err(format!("{what}: offset {offset} is not a multiple of the device's {bs}-byte block size"));
    }
    if len == 0 || len % bs != 0 {
        return Err(format!("{what}: length {len} is not a non-zero multiple of the device's {bs}-byte block size"));
    }
    match offset.checked_add(len) {
        Some(end) if end <= cap => Ok(()),
        _ => Err(format!("{what}: {len} bytes at offset {offset} end past the end of the device ({cap} bytes)")),
    }
}
