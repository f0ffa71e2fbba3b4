//! Packed virtqueues (VIRTIO_F_RING_PACKED, virtio 1.2 §2.8) for the embedded server.
//!
//! `virtio-queue` 0.18, which serves split rings, has no device side for the packed format,
//! so a packed queue is served by `virtio_queue_core::device::PackedDevice`, the reference
//! device model of our ring crate, over views of the memory the front-end registered.
//! The `vhost-user-backend` crate still owns the vring's set-up: its queue state holds the
//! queue size and the three area addresses from SET_VRING_NUM / SET_VRING_ADDR (for a packed
//! ring: the descriptor ring, the driver event suppression area in the "avail" slot and the
//! device event suppression area in the "used" slot) and the SET_VRING_BASE value.
//!
//! What this module adds per queue: the device's avail and used positions and wrap counters
//! between events, the notification-suppression handshake of the model, and the avail
//! position written back into the queue state after every batch, so GET_VRING_BASE reports
//! where the ring stands in the packed encoding (bits 0-14 index, bit 15 wrap counter).
//!
//! The three areas may be anywhere in registered memory (each inside one region; the
//! descriptor ring 16-byte aligned, the event suppression areas 4-byte aligned, as the
//! specification asks). Limits (documented in the server docs): a chain holds at most
//! `MAX_CHAIN` buffers, so `seg_max` is lowered while packed rings are offered; and the queue
//! size must be a power of two, because `virtio-queue`'s queue state, which keeps
//! SET_VRING_NUM, refuses other sizes (silently keeping the previous one); a ring whose areas
//! then overlap is refused. A front-end that breaks the packed-ring rules (a malformed chain,
//! areas outside its memory or overlapping) gets its ring marked broken with a log line; the
//! server does not panic and the other queues keep working.

use std::io;
use std::ptr::NonNull;
use std::sync::Arc;

use log::warn;
use vhost_user_backend::VringState;
use virtio_queue::QueueT;
use vm_memory::{
    GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    MemoryRegionAddress,
};

use virtio_queue_core::device::{MemoryRegion, PackedAreas, PackedDevice};
use virtio_queue_core::{RingFeatures, SharedMemory};

use super::device::{Desc, Pass};

/// The most descriptors a packed chain may have here (the device model's limit).
pub(crate) const MAX_CHAIN: usize = virtio_queue_core::device::MAX_CHAIN;

/// Device-model views of the front-end's memory: one [`MemoryRegion`] per mapped region,
/// rebuilt whenever the memory table changes.
pub(crate) struct MemoryViews {
    /// The memory map the views point into. Holding the `Arc` keeps every region mapped.
    mem: Arc<GuestMemoryMmap>,
    /// Views of `mem`'s regions. The `'static` is a private fiction: the views are only
    /// handed out borrowed from `self` (see [`MemoryViews::regions`]), so none outlives `mem`.
    regions: Vec<MemoryRegion<'static>>,
}

impl MemoryViews {
    fn new(mem: Arc<GuestMemoryMmap>) -> Self {
        let mut regions = Vec::with_capacity(mem.num_regions());
        for r in mem.iter() {
            let Ok(host) = r.get_host_address(MemoryRegionAddress(0)) else { continue };
            let (Some(base), Ok(len)) = (NonNull::new(host), usize::try_from(r.len())) else { continue };
            // SAFETY: `base .. base + len` is the host mapping of region `r` of `mem`. The
            // mapping stays in place as long as `mem` (an `Arc` of the whole memory map) is
            // alive, and `mem` lives in `self` next to the views; the views never leave `self`
            // except borrowed from it, so they cannot outlive the mapping. The memory is
            // shared with the front-end process, which may change it at any time:
            // `SharedMemory` never forms references to it, only atomic accesses, and the rest
            // of the server touches it only through `vm-memory`'s volatile copies and
            // `pread`/`pwrite`, never through Rust references, so no reference is invalidated.
            let Some(view) = (unsafe { SharedMemory::from_raw_parts(base, len) }) else {
                warn!("memory region at {:#x} is not 16-byte aligned in this process", r.start_addr().0);
                continue;
            };
            regions.push(MemoryRegion { addr: r.start_addr().0, mem: view });
        }
        MemoryViews { mem, regions }
    }

    /// Views of the current memory map of `atomic`, reusing `cached` if the memory table
    /// did not change since it was built.
    pub(crate) fn current<'c>(
        cached: &'c mut Option<MemoryViews>,
        atomic: &GuestMemoryAtomic<GuestMemoryMmap>,
    ) -> &'c Self {
        let mem = atomic.memory().into_inner();
        if !cached.as_ref().is_some_and(|v| Arc::ptr_eq(&v.mem, &mem)) {
            *cached = None;
        }
        cached.get_or_insert_with(|| MemoryViews::new(mem))
    }

    /// Whether the views were built from `atomic`'s current memory map.
    fn is_current(&self, atomic: &GuestMemoryAtomic<GuestMemoryMmap>) -> bool {
        std::ptr::eq::<GuestMemoryMmap>(&*self.mem, &*atomic.memory())
    }

    /// The memory map the views were built from.
    pub(crate) fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// The regions, for the device model (indirect tables). Borrowed from `self`: a view
    /// cannot outlive the mapping it points into.
    fn regions(&self) -> &[MemoryRegion<'_>] {
        &self.regions
    }

    /// A view holding the `len` bytes at guest address `addr`, and their offset in it, if
    /// they lie inside one region. The view starts on the 16-byte boundary at or below
    /// `addr` (views always do), so the offset is below 16.
    fn area(&self, addr: u64, len: usize) -> Option<(SharedMemory<'_>, usize)> {
        self.regions().iter().find_map(|r| {
            let offset = usize::try_from(addr.checked_sub(r.addr)?).ok()?;
            let skew = offset % 16;
            Some((r.mem.slice(offset - skew, skew.checked_add(len)?)?, skew))
        })
    }
}

/// Where one packed ring stands between events.
#[derive(Debug)]
pub(crate) struct PackedRing {
    /// Descriptor ring, driver area, device area and size the ring was set up with; a
    /// change means the front-end set up a new ring.
    setup: (u64, u64, u64, u16),
    avail: (u16, bool),
    used: (u16, bool),
    /// The front-end broke the ring; nothing more is served until it sets the ring up again.
    broken: bool,
}

/// Decodes a SET_VRING_BASE value for a packed ring: bits 0-14 the descriptor ring index of
/// the next available descriptor, bit 15 its wrap counter (the vhost-user specification's
/// `last_avail_idx` / `last_avail_wrap_counter`). Bits 16-31 (the used index and wrap counter)
/// never reach the back-end: `vhost-user-backend` 0.24 keeps only the low 16 bits (and the
/// `vhost` 0.18 front-end sends only 16), so the used position starts where the avail
/// position does, which is right whenever no request is in flight when the ring is set up.
fn decode_base(base: u16) -> (u16, bool) {
    (base & 0x7fff, base & 0x8000 != 0)
}

fn encode_base((pos, wrap): (u16, bool)) -> u16 {
    (pos & 0x7fff) | (u16::from(wrap) << 15)
}

/// What [`process`] did.
pub(crate) struct Processed {
    /// Requests served.
    pub(crate) served: usize,
    /// The front-end changed the memory table since `views` were built, and a request is
    /// waiting that may use the new memory: build the views again and process again.
    pub(crate) stale: bool,
}

/// Serves every available chain of one packed queue, then records where the ring stands.
///
/// `serve` executes one request given its buffers and returns the used length. The queue's
/// `next_avail` is kept equal to the encoded avail position, so GET_VRING_BASE is right.
/// `views` must be current for `atomic` when called; a chain seen available after the table
/// changed is left for the next call (see [`Processed::stale`]). `pass` and `kicks_on` are as
/// for `BlkBackend::process` in device.rs.
#[allow(clippy::too_many_arguments)]
pub(crate) fn process(
    ring: &mut Option<PackedRing>,
    views: &MemoryViews,
    atomic: &GuestMemoryAtomic<GuestMemoryMmap>,
    state: &mut VringState<GuestMemoryAtomic<GuestMemoryMmap>>,
    features: RingFeatures,
    descs: &mut Vec<Desc>,
    (pass, kicks_on): (Pass, bool),
    mut serve: impl FnMut(&GuestMemoryMmap, &[Desc]) -> u32,
) -> io::Result<Processed> {
    let done = |served| Ok(Processed { served, stale: false });
    let q = state.get_queue();
    let setup = (q.desc_table(), q.avail_ring(), q.used_ring(), q.size());
    let r = match ring {
        Some(r) if r.setup == setup => r,
        _ => {
            let avail = decode_base(q.next_avail());
            ring.insert(PackedRing { setup, avail, used: avail, broken: false })
        }
    };
    if r.broken {
        return done(0);
    }
    let (desc, driver, device, size) = setup;
    let desc_len = usize::from(size) * 16;
    let Some((desc_mem, 0)) = views.area(desc, desc_len) else {
        return broken(
            r,
            format!("descriptor ring at {desc:#x} ({desc_len} bytes) is not 16-byte aligned in one memory region"),
        );
    };
    let Some((driver_mem, driver_offset)) = views.area(driver, 4) else {
        return broken(r, format!("driver event suppression area at {driver:#x} is not in one memory region"));
    };
    let Some((device_mem, device_offset)) = views.area(device, 4) else {
        return broken(r, format!("device event suppression area at {device:#x} is not in one memory region"));
    };
    let disjoint =
        |a: u64, a_len: u64, b: u64, b_len: u64| a.saturating_add(a_len) <= b || b.saturating_add(b_len) <= a;
    let ring_len = desc_len as u64;
    if !disjoint(desc, ring_len, driver, 4) || !disjoint(desc, ring_len, device, 4) || !disjoint(driver, 4, device, 4) {
        return broken(
            r,
            format!(
                "areas overlap: {ring_len}-byte descriptor ring at {desc:#x}, event areas at {driver:#x} and \
                 {device:#x}. A ring size that is not a power of two looks like this: vhost-user-backend keeps \
                 only power-of-two sizes, so the ring is taken as {size} entries"
            ),
        );
    }
    let areas = PackedAreas {
        queue_size: size,
        desc: desc_mem,
        driver: driver_mem,
        driver_offset,
        device: device_mem,
        device_offset,
        features,
        memory: views.regions(),
    };
    let mut dev = match PackedDevice::with_areas(areas) {
        Ok(d) => d,
        Err(e) => return broken(r, e.to_string()),
    };
    dev.set_positions(r.avail, r.used);
    let mem = views.memory();
    let mut failure = None;
    let mut signal = Ok(());
    let mut served = 0;
    let mut stale = false;
    let mut kicks_on = kicks_on;
    loop {
        if kicks_on {
            dev.disable_kicks();
        }
        loop {
            // The memory table is looked at after the chain is seen available, as for split
            // rings (`process_split` in device.rs): the front-end adds the memory a request
            // uses before it makes the request available.
            if !dev.avail_pending() {
                break;
            }
            if !views.is_current(atomic) {
                stale = true;
                break;
            }
            match dev.pop_avail() {
                Ok(Some(chain)) => {
                    descs.clear();
                    descs.extend(chain.descriptors().iter().map(|d| Desc {
                        addr: GuestAddress(d.addr),
                        len: d.len,
                        write: d.writable,
                    }));
                    let used = serve(mem, descs);
                    dev.push_used(&chain, used);
                    served += 1;
                }
                Ok(None) => break,
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        if dev.publish_used() {
            signal = state.signal_used_queue();
        }
        if failure.is_some() || signal.is_err() || stale || pass == Pass::Poll || !dev.enable_kicks() {
            break;
        }
        kicks_on = true;
    }
    // Saved before any error is returned: the chains popped so far are completed, and
    // serving them again would repeat their requests.
    r.avail = dev.avail_position();
    r.used = dev.used_position();
    state.get_queue_mut().set_next_avail(encode_base(r.avail));
    signal?;
    match failure {
        Some(e) => broken(r, format!("malformed chain at ring position {}: {e}", r.avail.0)).and_then(|_| done(served)),
        None => Ok(Processed { served, stale }),
    }
}

/// Marks the ring broken and says why, once; no request served.
fn broken(r: &mut PackedRing, why: String) -> io::Result<Processed> {
    r.broken = true;
    warn!("packed ring broken by the front-end, no longer served: {why}");
    Ok(Processed { served: 0, stale: false })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_encoding() {
        assert_eq!(decode_base(0x8000), (0, true));
        assert_eq!(decode_base(0x0005), (5, false));
        assert_eq!(decode_base(0xffff), (0x7fff, true));
        for v in [(0, true), (0, false), (17, true), (0x7fff, false)] {
            assert_eq!(decode_base(encode_base(v)), v);
        }
    }
}
