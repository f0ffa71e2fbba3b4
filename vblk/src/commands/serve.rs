//! `vblk serve`: the embedded vhost-user-blk server alone, until killed.

use std::process::ExitCode;
use std::time::Duration;

use vblk::server::{Server, ServerOptions, Storage};

use crate::cli::ServeArgs;

/// Runs `vblk serve`.
pub fn run(a: ServeArgs) -> Result<ExitCode, String> {
    let storage = match a.image {
        Some(path) => Storage::Image(path),
        None => Storage::Ram { size: a.size },
    };
    let options = ServerOptions {
        storage,
        queues: a.queues,
        queue_size: a.queue_size,
        read_only: a.read_only,
        serial: a.serial,
        packed: a.packed,
        poll: Duration::from_micros(a.poll_us),
    };
    let handle = Server::start(&a.socket, options).map_err(|e| e.to_string())?;
    eprintln!(
        "vblk: serving {} sectors of 512 bytes{}{} on {}",
        handle.capacity_sectors(),
        if a.read_only { " read-only" } else { "" },
        if a.packed { ", split and packed rings" } else { "" },
        handle.socket_path().display()
    );
    handle.wait();
    Ok(ExitCode::SUCCESS)
}
