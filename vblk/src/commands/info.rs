//! `vblk info`: what the device is and what was negotiated.

use std::process::ExitCode;

use virtio_blk_dev::{BlkFeatures, ID_LEN};
use virtio_queue_core::RingFormat;
use virtio_transport_api::VirtioFeatures;

use crate::cli::InfoArgs;
use crate::stats::human_bytes;
use crate::target;

/// Names of the negotiated feature bits, device-specific first; unnamed bits as `bit N`.
fn feature_names(features: u64) -> Vec<String> {
    let mut names: Vec<String> =
        BlkFeatures::from_bits_truncate(features).iter_names().map(|(n, _)| n.into()).collect();
    names.extend(VirtioFeatures::from_bits_truncate(features).iter_names().map(|(n, _)| n.to_string()));
    let known = BlkFeatures::all().bits() | VirtioFeatures::all().bits();
    names.extend((0..64).filter(|b| features & !known & (1u64 << b) != 0).map(|b| format!("bit {b}")));
    names
}

/// The GET_ID answer as text: up to the first NUL, non-printable bytes escaped.
fn id_text(id: &[u8; ID_LEN]) -> String {
    let end = id.iter().position(|&b| b == 0).unwrap_or(ID_LEN);
    id[..end].iter().flat_map(|&b| std::ascii::escape_default(b)).map(char::from).collect()
}

/// Runs `vblk info`.
pub fn run(a: InfoArgs) -> Result<ExitCode, String> {
    let mut t = target::open(&a.target, a.ram.bytes(), a.target.queue_size_for(1))?;
    let mut q = t.take_queue(0)?;
    let dev = &t.dev;
    let id = q.get_id().map(|id| id_text(&id));
    let features = dev.negotiated_features();
    let names = feature_names(features);
    let format = match q.format() {
        RingFormat::Split => "split",
        RingFormat::Packed => "packed",
    };
    let wc = if dev.write_cache() { "write-back" } else { "write-through" };
    if a.json {
        let topo = dev.topology().map(|t| {
            serde_json::json!({
                "physical_block_exp": t.physical_block_exp,
                "alignment_offset": t.alignment_offset,
                "min_io_size": t.min_io_size,
                "opt_io_size": t.opt_io_size,
            })
        });
        let v = serde_json::json!({
            "target": t.name,
            "capacity_bytes": dev.capacity(),
            "block_size": dev.block_size(),
            "topology": topo,
            "read_only": dev.read_only(),
            "write_cache": wc,
            "features": names,
            "features_raw": format!("{features:#x}"),
            "queues": dev.num_queues(),
            "queues_offered": dev.offered_queues(),
            "queue_size": q.queue_size(),
            "ring_format": format,
            "device_id": id.as_ref().ok(),
        });
        println!("{v}");
    } else {
        let topo = match dev.topology() {
            Some(t) => format!(
                "physical block 2^{} logical blocks, alignment offset {}, min I/O {}, optimal I/O {} blocks",
                t.physical_block_exp, t.alignment_offset, t.min_io_size, t.opt_io_size
            ),
            None => "not reported".into(),
        };
        let id = match &id {
            Ok(s) => s.clone(),
            Err(e) => format!("(GET_ID failed: {e})"),
        };
        println!("target:       {}", t.name);
        println!(
            "capacity:     {} bytes ({}), {} sectors",
            dev.capacity(),
            human_bytes(dev.capacity()),
            dev.capacity() / 512
        );
        println!("block size:   {}", dev.block_size());
        println!("topology:     {topo}");
        println!("read-only:    {}", if dev.read_only() { "yes" } else { "no" });
        println!("write cache:  {wc}");
        println!("features:     {} ({features:#x})", names.join(" "));
        println!("queues:       {} set up, {} offered (--queues N)", dev.num_queues(), dev.offered_queues());
        println!("queue size:   {}", q.queue_size());
        println!("ring format:  {format}");
        println!("device id:    {id}");
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_cover_every_bit() {
        let f = BlkFeatures::FLUSH.bits() | VirtioFeatures::VERSION_1.bits() | (1 << 50);
        assert_eq!(feature_names(f), ["FLUSH", "VERSION_1", "bit 50"]);
    }

    #[test]
    fn ids_stop_at_nul_and_escape() {
        let mut id = [0u8; ID_LEN];
        id[..4].copy_from_slice(b"ab\x01c");
        assert_eq!(id_text(&id), "ab\\x01c");
    }
}
