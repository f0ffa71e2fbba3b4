//! Runs the ring benchmark's request loop once, for instruction counting:
//!
//! ```text
//! valgrind --tool=callgrind --toggle-collect='*driver_side*' \
//!     target/release/examples/ring-count split direct 32 4000
//! ```
//!
//! `cargo xtask bench` runs it at two request counts per case and divides the
//! difference, so start-up cost cancels out.

#[path = "../benches/harness/mod.rs"]
mod harness;

use virtio_queue_core::device::MemoryRegion;
use virtio_queue_core::{RingFormat, SharedLine, SharedMemory};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: ring-count split|packed direct|indirect BATCH REQUESTS";
    let (Some(format), Some(mode), Some(batch), Some(requests)) = (args.get(1), args.get(2), args.get(3), args.get(4))
    else {
        eprintln!("{usage}");
        std::process::exit(2);
    };
    let format = match format.as_str() {
        "split" => RingFormat::Split,
        "packed" => RingFormat::Packed,
        _ => {
            eprintln!("{usage}");
            std::process::exit(2);
        }
    };
    let indirect = match mode.as_str() {
        "direct" => false,
        "indirect" => true,
        _ => {
            eprintln!("{usage}");
            std::process::exit(2);
        }
    };
    let (Ok(batch), Ok(requests)) = (batch.parse::<u32>(), requests.parse::<u32>()) else {
        eprintln!("{usage}");
        std::process::exit(2);
    };
    if batch == 0 || u32::from(harness::QUEUE_SIZE) < batch * 3 {
        eprintln!("batch must be 1..={}", harness::QUEUE_SIZE / 3);
        std::process::exit(2);
    }
    let mut mem = harness::Memory::new(format);
    let placeholder = [SharedLine::new()];
    let mut regions = [MemoryRegion { addr: 0, mem: SharedMemory::new(&placeholder) }];
    let mut bench = harness::Bench::new(&mut mem, &mut regions, format, indirect);
    let sum = bench.run(requests, batch);
    println!("{sum}");
}
