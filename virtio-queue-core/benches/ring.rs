//! Driver-side cost per blk-shaped request (add, publish, pop), with the
//! device model answering in the same thread: split and packed, direct and
//! indirect, batches of 1 and 32. Instruction counts of the same loop come
//! from `cargo xtask bench` (callgrind), which is stable on noisy machines.

mod harness;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use virtio_queue_core::device::MemoryRegion;
use virtio_queue_core::{RingFormat, SharedLine, SharedMemory};

fn ring(c: &mut Criterion) {
    let mut group = c.benchmark_group("ring");
    group.measurement_time(std::time::Duration::from_secs(2)).warm_up_time(std::time::Duration::from_millis(500));
    for (format, fname) in [(RingFormat::Split, "split"), (RingFormat::Packed, "packed")] {
        for (indirect, mname) in [(false, "direct"), (true, "indirect")] {
            for batch in [1u32, 32] {
                let requests = 1024u32;
                group.throughput(Throughput::Elements(u64::from(requests)));
                let id = BenchmarkId::new(format!("{fname}/{mname}"), batch);
                group.bench_with_input(id, &batch, |b, &batch| {
                    let mut mem = harness::Memory::new(format);
                    let placeholder = [SharedLine::new()];
                    let mut regions = [MemoryRegion { addr: 0, mem: SharedMemory::new(&placeholder) }];
                    let mut bench = harness::Bench::new(&mut mem, &mut regions, format, indirect);
                    b.iter(|| bench.run(requests, batch));
                });
            }
        }
    }
    group.finish();
}

#[allow(missing_docs)]
mod group {
    use super::*;
    criterion_group!(benches, ring);
}

criterion_main!(group::benches);
