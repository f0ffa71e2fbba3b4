//! The request loop shared by the criterion benchmark (`benches/ring.rs`) and
//! the callgrind driver (`examples/ring-count.rs`): a blk-shaped chain (16-byte
//! readable header, 4 KiB writable data, 1-byte writable status) added,
//! published and completed, with the device model answering in the same
//! thread. Driver-side work happens only inside the `driver_side_*`
//! functions, which are never inlined so callgrind can count them alone.

use std::hint::black_box;

use virtio_queue_core::device::{DeviceConfig, MemoryRegion, PackedDevice, SplitDevice};
use virtio_queue_core::{
    Buffer, IndirectTables, PackedQueue, QueueConfig, RingFeatures, RingFormat, RingLayout, SharedLine, SharedMemory,
    Slot, SplitQueue,
};

pub const QUEUE_SIZE: u16 = 256;
const RING_IOVA: u64 = 0x10_0000;
const TABLE_IOVA: u64 = 0x100_0000;
const TABLE_ENTRIES: u16 = 4;

/// Memory for one queue and its indirect tables.
pub struct Memory {
    ring: Vec<SharedLine>,
    tables: Vec<SharedLine>,
    slots: Vec<Slot<u32>>,
}

impl Memory {
    pub fn new(format: RingFormat) -> Self {
        let layout = RingLayout::new(format, QUEUE_SIZE).expect("valid size");
        let table_lines = IndirectTables::bytes_needed(QUEUE_SIZE, TABLE_ENTRIES).expect("fits") / 64;
        Memory {
            ring: (0..layout.lines()).map(|_| SharedLine::new()).collect(),
            tables: (0..table_lines).map(|_| SharedLine::new()).collect(),
            slots: (0..QUEUE_SIZE).map(|_| Slot::new()).collect(),
        }
    }
}

/// One driver queue and the model device behind it.
pub enum Bench<'a> {
    Split(SplitQueue<'a, u32>, SplitDevice<'a>),
    Packed(PackedQueue<'a, u32>, PackedDevice<'a>),
}

impl<'a> Bench<'a> {
    pub fn new(
        mem: &'a mut Memory,
        regions: &'a mut [MemoryRegion<'a>; 1],
        format: RingFormat,
        indirect: bool,
    ) -> Self {
        let ring = SharedMemory::new(&mem.ring);
        let tables = SharedMemory::new(&mem.tables);
        regions[0] = MemoryRegion { addr: TABLE_IOVA, mem: tables };
        let mut features = RingFeatures::EVENT_IDX;
        if indirect {
            features |= RingFeatures::INDIRECT_DESC;
        }
        let config = QueueConfig {
            queue_size: QUEUE_SIZE,
            ring,
            ring_iova: RING_IOVA,
            features,
            indirect: Some(IndirectTables::new(tables, TABLE_IOVA, TABLE_ENTRIES).expect("aligned")),
        };
        let layout = RingLayout::new(format, QUEUE_SIZE).expect("valid size");
        let dev_config = DeviceConfig { layout, ring, features, memory: &regions[..] };
        let slots = mem.slots.as_mut_slice();
        match format {
            RingFormat::Split => Bench::Split(
                SplitQueue::new(config, slots).expect("queue"),
                SplitDevice::new(dev_config).expect("device"),
            ),
            RingFormat::Packed => Bench::Packed(
                PackedQueue::new(config, slots).expect("queue"),
                PackedDevice::new(dev_config).expect("device"),
            ),
        }
    }

    /// Runs `requests` requests in batches of `batch`; returns a checksum of
    /// the completions so nothing is optimised away.
    pub fn run(&mut self, count: u32, batch: u32) -> u64 {
        let reqs = requests();
        let reqs = &*reqs;
        let mut sum = 0u64;
        let mut token = 0u32;
        let mut done = 0;
        while done < count {
            let n = batch.min(count - done);
            match self {
                Bench::Split(q, d) => {
                    black_box(driver_side_submit_split(q, reqs, n, &mut token));
                    split_device_answers(d, n);
                    sum += driver_side_complete_split(q);
                }
                Bench::Packed(q, d) => {
                    black_box(driver_side_submit_packed(q, reqs, n, &mut token));
                    packed_device_answers(d, n);
                    sum += driver_side_complete_packed(q);
                }
            }
            done += n;
        }
        sum
    }
}

const HDR: u64 = 0x200_0000;
const DATA: u64 = 0x300_0000;
const STATUS: u64 = 0x400_0000;

/// The caller's data buffer of one request: address and length are run-time
/// values. The 16-byte header and 1-byte status live in a pre-allocated
/// per-slot area, as in a block driver, so their lengths are constants.
pub struct Request {
    data: Buffer,
}

/// One request per queue slot, as a block driver keeps them (by tag).
pub type Requests = [Request; QUEUE_SIZE as usize];

/// The requests of one run, used round-robin by token (the token modulo the
/// queue size is the slot, as a block driver's tag).
pub fn requests() -> Box<Requests> {
    Box::new(core::array::from_fn(|t| Request { data: Buffer::new(DATA + t as u64 * 4096, 4096) }))
}

/// The chain of request `token`: header, data, status.
#[inline(always)]
fn blk_chain(token: u32, data: Buffer) -> ([Buffer; 1], [Buffer; 2]) {
    let slot = u64::from(token) % u64::from(QUEUE_SIZE);
    ([Buffer::new(HDR + slot * 16, 16)], [data, Buffer::new(STATUS + slot, 1)])
}

macro_rules! driver_side {
    ($submit:ident, $complete:ident, $q:ty) => {
        /// Adds `n` blk-shaped chains and publishes them; returns the kick decision.
        #[inline(never)]
        pub fn $submit(q: &mut $q, reqs: &Requests, n: u32, next_token: &mut u32) -> bool {
            let mut token = *next_token;
            for _ in 0..n {
                let Some(r) = reqs.get(token as usize % reqs.len()) else { panic!("no request") };
                let (readable, writable) = blk_chain(token, r.data);
                if q.add(&readable, &writable, token).is_err() {
                    panic!("add failed");
                }
                token = token.wrapping_add(1);
            }
            *next_token = token;
            match q.publish() {
                Ok(kick) => kick,
                Err(e) => panic!("publish: {e}"),
            }
        }

        /// Pops every used chain; returns the sum of tokens and lengths.
        #[inline(never)]
        pub fn $complete(q: &mut $q) -> u64 {
            let mut sum = 0;
            loop {
                match q.pop_used() {
                    Ok(Some(u)) => sum += u64::from(u.token) + u64::from(u.len),
                    Ok(None) => return sum,
                    Err(e) => panic!("pop_used: {e}"),
                }
            }
        }
    };
}

driver_side!(driver_side_submit_split, driver_side_complete_split, SplitQueue<'_, u32>);
driver_side!(driver_side_submit_packed, driver_side_complete_packed, PackedQueue<'_, u32>);

#[inline(never)]
fn split_device_answers(d: &mut SplitDevice<'_>, n: u32) {
    for _ in 0..n {
        let c = d.pop_avail().expect("driver followed the protocol").expect("chain published");
        d.push_used(u32::from(c.id), 4097);
    }
    black_box(d.publish_used());
}

#[inline(never)]
fn packed_device_answers(d: &mut PackedDevice<'_>, n: u32) {
    for _ in 0..n {
        let c = d.pop_avail().expect("driver followed the protocol").expect("chain published");
        d.push_used(&c, 4097);
    }
    black_box(d.publish_used());
}
