//! Runs `BlkQueue` requests against the loopback RAM disk once, for
//! instruction counting of the driver side only:
//!
//! ```text
//! valgrind --tool=callgrind --toggle-collect='*driver_side*' \
//!     target/release/examples/blk-count split indirect 32 4000
//! ```
//!
//! Each round submits `BATCH` 4 KiB reads (one `submit_reads` batch of owned
//! `DmaBuf`s), publishes them, lets the device serve them (`process()`, in this
//! thread but outside the counted functions) and takes every completion with
//! `poll_each`, taking the buffers back. Queue size 256, EVENT_IDX, split or
//! packed, with INDIRECT negotiated (`indirect`, the default of `BlkOptions`:
//! every request takes one ring descriptor and its slot's indirect table) or
//! not (`direct`: three ring descriptors). `cargo xtask bench` runs it at two request counts per case
//! and divides the difference, so start-up cost cancels out.

use std::hint::black_box;

use virtio_blk_dev::loopback::RamDisk;
use virtio_blk_dev::{BlkDevice, BlkError, BlkOptions, BlkQueue, Bufs, DmaBuf};
use virtio_transport_api::loopback::{LoopbackTransport, ServiceMode};

type Transport = LoopbackTransport<RamDisk>;

const BLOCK: usize = 4096;
/// Disk size in blocks; reads walk over it.
const BLOCKS: u64 = 256;

/// Submits `n` 4 KiB reads into buffers from `free` (one `submit_reads`
/// batch) and publishes them.
#[inline(never)]
fn driver_side_submit(q: &mut BlkQueue<Transport>, free: &mut Vec<DmaBuf>, n: u32, next: &mut u64) {
    let Some(first) = free.len().checked_sub(n as usize) else { panic!("no free buffer") };
    let reqs = free.drain(first..).zip(*next..).map(|(buf, tag)| ((tag % BLOCKS) * BLOCK as u64, buf, tag));
    if let Err(r) = q.submit_reads(reqs) {
        panic!("submit_reads: {}", r.error);
    }
    *next += u64::from(n);
    if let Err(e) = q.publish() {
        panic!("publish: {e}");
    }
}

/// Takes every completion (`poll_each`), puts the buffers back; returns the
/// sum of tags.
#[inline(never)]
fn driver_side_complete(q: &mut BlkQueue<Transport>, free: &mut Vec<DmaBuf>) -> u64 {
    // The sum and the list behind one pointer (the closure's only capture).
    let mut state = (0u64, std::mem::take(free));
    q.poll_each(|c| {
        let (sum, free) = &mut state;
        *sum += c.tag;
        if let Err(e) = c.result {
            failed(c.tag, e);
        }
        match c.bufs {
            // Room for every buffer was reserved: the push never grows.
            Bufs::One(b) if free.len() < free.capacity() => free.push(b),
            other => lost(c.tag, other),
        }
    });
    *free = state.1;
    state.0
}

/// A request that failed.
#[cold]
#[inline(never)]
fn failed(tag: u64, e: BlkError) -> ! {
    panic!("request {tag}: {e}")
}

/// A read that did not give its one buffer back.
#[cold]
#[inline(never)]
fn lost(tag: u64, bufs: Bufs) -> ! {
    panic!("request {tag}: a read gives its one buffer back, not {bufs:?}")
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: blk-count split|packed direct|indirect BATCH REQUESTS";
    let (Some(format), Some(mode), Some(batch), Some(requests)) = (args.get(1), args.get(2), args.get(3), args.get(4))
    else {
        eprintln!("{usage}");
        std::process::exit(2);
    };
    let packed = match format.as_str() {
        "split" => false,
        "packed" => true,
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
    if !(1..=64).contains(&batch) {
        eprintln!("batch must be 1..=64");
        std::process::exit(2);
    }
    let transport = LoopbackTransport::new(RamDisk::new(BLOCKS * 8), ServiceMode::Manual);
    let device = transport.handle();
    let options =
        BlkOptions { packed, event_idx: true, indirect, in_order: false, queue_size: 256, ..Default::default() };
    let mut dev = BlkDevice::open(transport, options).expect("open the loopback RAM disk");
    let mut free = dev.alloc_bufs(BLOCK, batch as usize).expect("buffers");
    let mut q = dev.take_queue(0).expect("queue 0");
    let (mut next, mut done, mut sum) = (0u64, 0u32, 0u64);
    while done < requests {
        let n = batch.min(requests - done);
        driver_side_submit(&mut q, &mut free, n, &mut next);
        let served = device.process().expect("the driver follows the ring protocol");
        assert_eq!(served, n as usize);
        sum += driver_side_complete(&mut q, &mut free);
        done += n;
    }
    assert_eq!(free.len(), batch as usize, "every buffer came back");
    assert_eq!(device.with_device(|d| d.violations()), 0);
    println!("{}", black_box(sum));
}
