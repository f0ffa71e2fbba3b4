//! Writes, reads back and flushes 4 KiB at offset 0 of a virtio-blk device behind a
//! vhost-vdpa node: `cargo run -p transport-vdpa --example round-trip -- /dev/vhost-vdpa-0`.

use transport_vdpa::VdpaTransport;
use virtio_blk_dev::{BlkDevice, BlkOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args().nth(1).unwrap_or_else(|| "/dev/vhost-vdpa-0".into());
    let transport = VdpaTransport::open(&path)?;
    let mut dev = BlkDevice::open(transport, BlkOptions::default())?;
    println!("{path}: {} bytes, {} queue(s)", dev.capacity(), dev.num_queues());
    let mut q = dev.take_queue(0)?;
    q.write_at(0, &[0xa5; 4096])?;
    let mut back = vec![0u8; 4096];
    q.read_at(0, &mut back)?;
    q.flush()?;
    assert!(back.iter().all(|&b| b == 0xa5), "read back what was written");
    println!("4 KiB written, read back and flushed");
    Ok(())
}
