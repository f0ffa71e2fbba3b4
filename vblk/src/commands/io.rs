//! `vblk read` and `vblk write`: bytes between a file and the device, through the queue's
//! blocking `read_at`/`write_at`.

use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;
use std::process::ExitCode;

use virtio_blk_dev::BlkFeatures;

use super::check_range;
use crate::cli::{ReadArgs, WriteArgs};
use crate::target;

/// Bytes moved per blocking call.
const CHUNK: usize = 1 << 20;

fn is_stdio(p: &Path) -> bool {
    p.as_os_str() == "-"
}

/// Runs `vblk read`.
pub fn read(a: ReadArgs) -> Result<ExitCode, String> {
    let mut t = target::open(&a.target, a.ram.bytes(), a.target.queue_size_for(1))?;
    check_range(&t.dev, "read", a.offset, a.length)?;
    let mut out: Box<dyn Write> = if is_stdio(&a.output) {
        Box::new(std::io::stdout().lock())
    } else {
        let f = File::create(&a.output).map_err(|e| format!("cannot create {}: {e}", a.output.display()))?;
        Box::new(std::io::BufWriter::new(f))
    };
    let mut q = t.take_queue(0)?;
    let mut buf = vec![0u8; CHUNK.min(a.length as usize)];
    let mut done = 0u64;
    while done < a.length {
        let n = (a.length - done).min(buf.len() as u64) as usize;
        let chunk = &mut buf[..n];
        q.read_at(a.offset + done, chunk).map_err(|e| format!("read at byte {}: {e}", a.offset + done))?;
        out.write_all(chunk).map_err(|e| format!("cannot write {}: {e}", a.output.display()))?;
        done += n as u64;
    }
    out.flush().map_err(|e| format!("cannot write {}: {e}", a.output.display()))?;
    Ok(ExitCode::SUCCESS)
}

/// Runs `vblk write`: writes the input, then flushes when the device has a write cache.
pub fn write(a: WriteArgs) -> Result<ExitCode, String> {
    let mut data = Vec::new();
    let read = if is_stdio(&a.input) {
        std::io::stdin().lock().read_to_end(&mut data)
    } else {
        File::open(&a.input).and_then(|mut f| f.read_to_end(&mut data))
    };
    read.map_err(|e| format!("cannot read {}: {e}", a.input.display()))?;
    let mut t = target::open(&a.target, a.ram.bytes(), a.target.queue_size_for(1))?;
    if data.is_empty() {
        return Err(format!("{} is empty: nothing to write", a.input.display()));
    }
    check_range(&t.dev, "write", a.offset, data.len() as u64)?;
    if t.dev.read_only() {
        return Err(format!("{} is read-only", t.name));
    }
    let flush = t.dev.blk_features().contains(BlkFeatures::FLUSH);
    let mut q = t.take_queue(0)?;
    for (i, chunk) in data.chunks(CHUNK).enumerate() {
        let at = a.offset + (i * CHUNK) as u64;
        q.write_at(at, chunk).map_err(|e| format!("write at byte {at}: {e}"))?;
    }
    if flush {
        q.flush().map_err(|e| format!("flush: {e}"))?;
    }
    Ok(ExitCode::SUCCESS)
}
