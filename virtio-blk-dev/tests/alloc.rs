//! No allocation per request in steady state: a counting global allocator
//! counts the allocations made by this test's thread (the embedded server's
//! threads are not counted) while requests are submitted, published,
//! waited for and completed.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::*;
use vblk::server::{Server, ServerOptions, Storage};
use virtio_blk_dev::{BlkOptions, Bufs};

struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
}

fn note() {
    if COUNTING.try_with(Cell::get).unwrap_or(false) {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
    }
}

// SAFETY: forwards to the system allocator unchanged; counting has no effect on the memory.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note();
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note();
        // SAFETY: same contract as ours.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note();
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn counted<R>(f: impl FnOnce() -> R) -> (R, u64) {
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    COUNTING.with(|c| c.set(true));
    let r = f();
    COUNTING.with(|c| c.set(false));
    (r, ALLOCATIONS.load(Ordering::Relaxed) - before)
}

#[test]
fn no_allocation_per_request_in_steady_state() {
    // The counter itself works.
    let ((), n) = counted(|| drop(std::hint::black_box(Vec::<u8>::with_capacity(8))));
    assert_eq!(n, 1);
    let s = Scratch::new();
    let _srv =
        Server::start(&s.sock, ServerOptions { storage: Storage::Ram { size: IMAGE_BYTES }, ..Default::default() })
            .unwrap();
    for options in [BlkOptions::default(), BlkOptions { indirect: false, event_idx: false, ..Default::default() }] {
        let mut dev = open(&s.sock, options);
        let bufs = dev.alloc_bufs(4096, 32).unwrap();
        let mut q = dev.take_queue(0).unwrap();
        let mut data = vec![0u8; 4096];
        // Warm up: every path once (submission, completion, blocking layer).
        q.write_at(0, &data).unwrap();
        q.read_at(0, &mut data).unwrap();
        q.flush().unwrap();
        let mut free: Vec<_> = Vec::with_capacity(bufs.len());
        free.extend(bufs);

        let ((), allocations) = counted(|| {
            for round in 0..200u64 {
                // A batch of reads and writes, published once, then drained.
                let n = free.len();
                for i in 0..n {
                    let b = free.pop().unwrap();
                    let off = (round * 7 + i as u64) % 512 * 4096;
                    if i % 2 == 0 {
                        q.submit_read(off, b, i as u64).unwrap();
                    } else {
                        q.submit_write(off, b, i as u64).unwrap();
                    }
                }
                q.publish().unwrap();
                while free.len() < n {
                    let c = q.wait(Some(Duration::from_secs(10))).expect("completion");
                    c.result.unwrap();
                    match c.bufs {
                        Bufs::One(b) => free.push(b),
                        other => panic!("unexpected {other:?}"),
                    }
                }
                q.submit_flush(99).unwrap();
                q.wait(Some(Duration::from_secs(10))).unwrap().result.unwrap();
                q.read_at(4096, &mut data).unwrap();
                q.write_at(8192, &data).unwrap();
            }
        });
        assert_eq!(allocations, 0, "allocations in 200 rounds of 34 requests");
    }
}
