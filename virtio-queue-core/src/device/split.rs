//! The device side of a split virtqueue (§2.7).

use super::{
    desc_flags, find_table, read_desc_data, AvailChain, ConfigError, DescInfo, DeviceConfig, MemoryRegion, ModelError,
    MAX_CHAIN,
};
use crate::layout::{off, AvailFlags, DescFlags, RingFeatures, RingFormat, UsedFlags};
use crate::notify::need_event;
use crate::shared::{fence_store_before_load, Ordering, SharedMemory};

/// The device side of one split virtqueue.
///
/// It consumes the available ring in order, returns chains through the used
/// ring (an element is written by [`push_used`](Self::push_used) and becomes
/// visible to the driver at [`publish_used`](Self::publish_used)), and keeps
/// both notification-suppression mechanisms (ring flags and EVENT_IDX).
#[derive(Debug)]
pub struct SplitDevice<'a> {
    ring: SharedMemory<'a>,
    memory: &'a [MemoryRegion<'a>],
    features: RingFeatures,
    size: u16,
    driver_offset: usize,
    device_offset: usize,
    /// Next avail index to consume.
    last_avail: u16,
    /// Next used index to write.
    used_shadow: u16,
    /// The used index of the last publication.
    used_published: u16,
    /// Something was pushed since the last publication.
    dirty: bool,
}

impl<'a> SplitDevice<'a> {
    /// A device over the split ring of `cfg`, in its reset state (both indices 0).
    pub fn new(cfg: DeviceConfig<'a>) -> Result<Self, ConfigError> {
        cfg.check(RingFormat::Split)?;
        Ok(SplitDevice {
            ring: cfg.ring,
            memory: cfg.memory,
            features: cfg.features,
            size: cfg.layout.queue_size(),
            driver_offset: cfg.layout.driver_offset(),
            device_offset: cfg.layout.device_offset(),
            last_avail: 0,
            used_shadow: 0,
            used_published: 0,
            dirty: false,
        })
    }

    /// The queue size.
    pub fn queue_size(&self) -> u16 {
        self.size
    }

    /// The next used index the device will write (pushed, published or not).
    pub fn used_idx(&self) -> u16 {
        self.used_shadow
    }

    /// The next avail index the device will consume.
    pub fn last_avail(&self) -> u16 {
        self.last_avail
    }

    // Offsets. All are inside the layout (indices are reduced modulo the queue
    // size), and `new` checked that the ring covers the layout.

    fn desc_off(&self, i: u16) -> usize {
        usize::from(i % self.size) * off::DESC_SIZE
    }

    fn avail_flags_off(&self) -> usize {
        self.driver_offset + off::AVAIL_FLAGS
    }

    fn avail_idx_off(&self) -> usize {
        self.driver_offset + off::AVAIL_IDX
    }

    fn avail_entry_off(&self, idx: u16) -> usize {
        self.driver_offset + off::AVAIL_RING + 2 * usize::from(idx % self.size)
    }

    fn used_event_off(&self) -> usize {
        self.driver_offset + off::AVAIL_RING + 2 * usize::from(self.size)
    }

    fn used_flags_off(&self) -> usize {
        self.device_offset + off::USED_FLAGS
    }

    fn used_idx_off(&self) -> usize {
        self.device_offset + off::USED_IDX
    }

    fn used_elem_off(&self, idx: u16) -> usize {
        self.device_offset + off::USED_RING + off::USED_ELEM_SIZE * usize::from(idx % self.size)
    }

    fn avail_event_off(&self) -> usize {
        self.device_offset + off::USED_RING + off::USED_ELEM_SIZE * usize::from(self.size)
    }

    fn load_avail_idx(&self) -> u16 {
        // SAFETY: a 2-aligned offset inside the layout, which the ring covers (`new`).
        unsafe { self.ring.load_u16(self.avail_idx_off(), Ordering::Acquire) }
    }

    /// Takes the next available chain, if the driver published one.
    ///
    /// On an error the device state is unchanged (the same call fails again).
    pub fn pop_avail(&mut self) -> Result<Option<AvailChain>, ModelError> {
        let avail_idx = self.load_avail_idx();
        if avail_idx == self.last_avail {
            return Ok(None);
        }
        if avail_idx.wrapping_sub(self.last_avail) > self.size {
            return Err(ModelError::AvailIndexJump { avail_idx, last_avail: self.last_avail, queue_size: self.size });
        }
        // SAFETY: a 2-aligned offset inside the layout, which the ring covers.
        let head = unsafe { self.ring.read_u16(self.avail_entry_off(self.last_avail)) };
        if head >= self.size {
            return Err(ModelError::HeadOutOfRange { head, queue_size: self.size });
        }
        let chain = self.walk(head)?;
        self.last_avail = self.last_avail.wrapping_add(1);
        Ok(Some(chain))
    }

    /// Follows the chain at `head` (below the queue size) through the descriptor table.
    fn walk(&self, head: u16) -> Result<AvailChain, ModelError> {
        let mut chain = AvailChain::new(head);
        let mut visited = [0u16; MAX_CHAIN];
        let mut i = head;
        let mut n: usize = 0;
        loop {
            // Past MAX_CHAIN descriptors `chain.push` fails before `visited` is needed.
            if let Some(v) = visited.get_mut(n) {
                *v = i;
            }
            n += 1;
            // SAFETY: `i < size` (head and every `next` are checked), so the
            // descriptor is 16-aligned and inside the descriptor area.
            let d = unsafe { read_desc_data(&self.ring, self.desc_off(i)) };
            let flags = desc_flags(d.word12);
            if flags.contains(DescFlags::INDIRECT) {
                if !self.features.contains(RingFeatures::INDIRECT_DESC) {
                    return Err(ModelError::IndirectNotNegotiated);
                }
                if flags.contains(DescFlags::NEXT) {
                    return Err(ModelError::IndirectWithNext);
                }
                if n > 1 {
                    return Err(ModelError::IndirectInChain);
                }
                chain.indirect = true;
                chain.ring_descs = 1;
                walk_table(&mut chain, self.memory, d.addr, d.len)?;
                return Ok(chain);
            }
            chain.push(DescInfo { addr: d.addr, len: d.len, writable: flags.contains(DescFlags::WRITE) })?;
            if !flags.contains(DescFlags::NEXT) {
                // `n <= size <= 32768`.
                chain.ring_descs = n as u16;
                return Ok(chain);
            }
            let next = d.word14;
            if next >= self.size {
                return Err(ModelError::NextOutOfRange { next, limit: self.size });
            }
            if visited.get(..n).unwrap_or(&visited).contains(&next) {
                return Err(ModelError::ChainLoop);
            }
            if n >= usize::from(self.size) {
                return Err(ModelError::ChainTooLong);
            }
            i = next;
        }
    }

    /// Writes a used element for chain `id` with `len` bytes written at the
    /// next used index. The driver sees it after [`publish_used`](Self::publish_used).
    pub fn push_used(&mut self, id: u32, len: u32) {
        self.write_used_elem_raw(self.used_shadow, id, len);
        self.used_shadow = self.used_shadow.wrapping_add(1);
        self.dirty = true;
    }

    /// VIRTIO_F_IN_ORDER batching (§2.7.8): returns all of `chains` with one
    /// used element carrying the id of the last chain and `len`, and advances
    /// the used index by `chains.len()`. Does nothing for an empty slice.
    pub fn push_used_batch(&mut self, chains: &[AvailChain], len: u32) {
        let Some(last) = chains.last() else { return };
        self.write_used_elem_raw(self.used_shadow, u32::from(last.id), len);
        // A used index is a 16-bit free-running counter.
        self.used_shadow = self.used_shadow.wrapping_add(chains.len() as u16);
        self.dirty = true;
    }

    /// Makes the pushed used elements visible (release store of the used index)
    /// and returns whether the driver asked for a used-buffer notification for
    /// them. False if nothing was pushed since the previous publication.
    pub fn publish_used(&mut self) -> bool {
        if !self.dirty {
            return false;
        }
        self.dirty = false;
        let old = self.used_published;
        let new = self.used_shadow;
        // SAFETY: a 2-aligned offset inside the layout, which the ring covers.
        unsafe { self.ring.store_u16(self.used_idx_off(), new, Ordering::Release) };
        self.used_published = new;
        fence_store_before_load();
        if self.features.contains(RingFeatures::EVENT_IDX) {
            // SAFETY: as above.
            let event = unsafe { self.ring.load_u16(self.used_event_off(), Ordering::Acquire) };
            need_event(event, new, old)
        } else {
            // SAFETY: as above.
            let flags = unsafe { self.ring.load_u16(self.avail_flags_off(), Ordering::Acquire) };
            flags & AvailFlags::NO_INTERRUPT.bits() == 0
        }
    }

    /// Asks the driver not to send available-buffer notifications: sets
    /// NO_NOTIFY, or with EVENT_IDX parks `avail_event` just behind the
    /// entries consumed so far, where the driver's index will not reach it.
    pub fn disable_kicks(&mut self) {
        if self.features.contains(RingFeatures::EVENT_IDX) {
            let parked = self.last_avail.wrapping_sub(1);
            // SAFETY: a 2-aligned offset inside the layout, which the ring covers.
            unsafe { self.ring.store_u16(self.avail_event_off(), parked, Ordering::Release) };
        } else {
            // SAFETY: as above.
            unsafe { self.ring.store_u16(self.used_flags_off(), UsedFlags::NO_NOTIFY.bits(), Ordering::Release) };
        }
    }

    /// Asks the driver for available-buffer notifications again (`avail_event`
    /// = the next index to consume with EVENT_IDX, otherwise NO_NOTIFY
    /// cleared), then returns whether entries arrived that the driver may
    /// not have notified: the caller must pop them instead of waiting.
    pub fn enable_kicks(&mut self) -> bool {
        if self.features.contains(RingFeatures::EVENT_IDX) {
            // SAFETY: a 2-aligned offset inside the layout, which the ring covers.
            unsafe { self.ring.store_u16(self.avail_event_off(), self.last_avail, Ordering::Release) };
        } else {
            // SAFETY: as above.
            unsafe { self.ring.store_u16(self.used_flags_off(), 0, Ordering::Release) };
        }
        fence_store_before_load();
        self.load_avail_idx() != self.last_avail
    }

    /// Misbehaviour: release-stores any used index, and makes it the device's
    /// next used index (as if published).
    pub fn set_used_idx_raw(&mut self, idx: u16) {
        // SAFETY: a 2-aligned offset inside the layout, which the ring covers.
        unsafe { self.ring.store_u16(self.used_idx_off(), idx, Ordering::Release) };
        self.used_shadow = idx;
        self.used_published = idx;
        self.dirty = false;
    }

    /// Misbehaviour: writes any used element at ring index `ring_index`
    /// (reduced modulo the queue size), without publishing it.
    pub fn write_used_elem_raw(&mut self, ring_index: u16, id: u32, len: u32) {
        let at = self.used_elem_off(ring_index);
        // SAFETY: the element is inside the used ring (index reduced modulo the
        // size) and 4-aligned (the device area is 64-aligned, elements are 8
        // bytes after a 4-byte header).
        unsafe {
            self.ring.write_u32(at + off::USED_ELEM_ID, id);
            self.ring.write_u32(at + off::USED_ELEM_LEN, len);
        }
    }
}

/// Follows an indirect table of split descriptors (§2.7.5.3): the chain starts
/// at entry 0 and continues by `next` inside the table.
fn walk_table(chain: &mut AvailChain, memory: &[MemoryRegion<'_>], addr: u64, len: u32) -> Result<(), ModelError> {
    let (table, entries) = find_table(memory, addr, len)?;
    let mut visited = [0u16; MAX_CHAIN];
    let mut i: u16 = 0;
    let mut n: usize = 0;
    loop {
        if let Some(v) = visited.get_mut(n) {
            *v = i;
        }
        n += 1;
        // SAFETY: `i < entries` and the table window is exactly `16 * entries`
        // bytes starting 16-aligned (`find_table`).
        let d = unsafe { read_desc_data(&table, usize::from(i) * off::DESC_SIZE) };
        let flags = desc_flags(d.word12);
        if flags.contains(DescFlags::INDIRECT) {
            return Err(ModelError::NestedIndirect);
        }
        chain.push(DescInfo { addr: d.addr, len: d.len, writable: flags.contains(DescFlags::WRITE) })?;
        if !flags.contains(DescFlags::NEXT) {
            return Ok(());
        }
        let next = d.word14;
        if next >= entries {
            return Err(ModelError::NextOutOfRange { next, limit: entries });
        }
        if visited.get(..n).unwrap_or(&visited).contains(&next) {
            return Err(ModelError::ChainLoop);
        }
        if n >= usize::from(entries) {
            return Err(ModelError::ChainTooLong);
        }
        i = next;
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{lines, lines_for};
    use super::*;
    use crate::layout::RingLayout;

    const NEXT: u16 = 1;
    const WRITE: u16 = 2;
    const INDIRECT: u16 = 4;

    /// A driver written by hand against the layout.
    struct Drv<'a> {
        mem: SharedMemory<'a>,
        layout: RingLayout,
        avail_idx: u16,
    }

    impl<'a> Drv<'a> {
        fn new(mem: SharedMemory<'a>, layout: RingLayout) -> Self {
            Drv { mem, layout, avail_idx: 0 }
        }

        fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
            write_split_desc(&self.mem, usize::from(i) * 16, addr, len, flags, next);
        }

        /// Puts `head` in the avail ring and release-stores the new index.
        fn publish(&mut self, head: u16) {
            let size = self.layout.queue_size();
            let d = self.layout.driver_offset();
            // SAFETY: offsets come from the layout (or the table window) and are aligned and in bounds.
            unsafe {
                self.mem.write_u16(d + off::AVAIL_RING + 2 * usize::from(self.avail_idx % size), head);
            }
            self.avail_idx = self.avail_idx.wrapping_add(1);
            self.set_avail_idx(self.avail_idx);
        }

        fn set_avail_idx(&self, idx: u16) {
            // SAFETY: offsets come from the layout (or the table window) and are aligned and in bounds.
            unsafe { self.mem.store_u16(self.layout.driver_offset() + off::AVAIL_IDX, idx, Ordering::Release) };
        }

        fn set_avail_flags(&self, v: u16) {
            // SAFETY: offsets come from the layout (or the table window) and are aligned and in bounds.
            unsafe { self.mem.store_u16(self.layout.driver_offset() + off::AVAIL_FLAGS, v, Ordering::Relaxed) };
        }

        fn set_used_event(&self, v: u16) {
            let o = self.layout.driver_offset() + off::AVAIL_RING + 2 * usize::from(self.layout.queue_size());
            // SAFETY: offsets come from the layout (or the table window) and are aligned and in bounds.
            unsafe { self.mem.store_u16(o, v, Ordering::Relaxed) };
        }

        fn used_idx(&self) -> u16 {
            // SAFETY: offsets come from the layout (or the table window) and are aligned and in bounds.
            unsafe { self.mem.load_u16(self.layout.device_offset() + off::USED_IDX, Ordering::Acquire) }
        }

        fn used_flags(&self) -> u16 {
            // SAFETY: offsets come from the layout (or the table window) and are aligned and in bounds.
            unsafe { self.mem.load_u16(self.layout.device_offset() + off::USED_FLAGS, Ordering::Acquire) }
        }

        fn avail_event(&self) -> u16 {
            let o = self.layout.device_offset() + off::USED_RING + 8 * usize::from(self.layout.queue_size());
            // SAFETY: offsets come from the layout (or the table window) and are aligned and in bounds.
            unsafe { self.mem.load_u16(o, Ordering::Acquire) }
        }

        fn used_elem(&self, idx: u16) -> (u32, u32) {
            let o = self.layout.device_offset() + off::USED_RING + 8 * usize::from(idx % self.layout.queue_size());
            // SAFETY: offsets come from the layout (or the table window) and are aligned and in bounds.
            unsafe { (self.mem.read_u32(o), self.mem.read_u32(o + 4)) }
        }
    }

    fn write_split_desc(mem: &SharedMemory<'_>, at: usize, addr: u64, len: u32, flags: u16, next: u16) {
        // SAFETY: offsets come from the layout (or the table window) and are aligned and in bounds.
        unsafe {
            mem.write_u64(at + off::SPLIT_DESC_ADDR, addr);
            mem.write_u32(at + off::SPLIT_DESC_LEN, len);
            mem.write_u16(at + off::SPLIT_DESC_FLAGS, flags);
            mem.write_u16(at + off::SPLIT_DESC_NEXT, next);
        }
    }

    fn cfg<'a>(
        layout: RingLayout,
        ring: SharedMemory<'a>,
        features: RingFeatures,
        memory: &'a [MemoryRegion<'a>],
    ) -> DeviceConfig<'a> {
        DeviceConfig { layout, ring, features, memory }
    }

    fn d(addr: u64, len: u32, writable: bool) -> DescInfo {
        DescInfo { addr, len, writable }
    }

    #[test]
    fn constructor_checks_format_and_length() {
        let layout = RingLayout::split(8).unwrap();
        let l = lines_for(&layout);
        let mem = SharedMemory::new(&l);
        let packed = RingLayout::packed(8).unwrap();
        assert_eq!(
            SplitDevice::new(cfg(packed, mem, RingFeatures::empty(), &[])).err(),
            Some(ConfigError::WrongFormat { expected: RingFormat::Split, found: RingFormat::Packed })
        );
        let short = mem.slice(0, layout.size() - 64).unwrap();
        assert_eq!(
            SplitDevice::new(cfg(layout, short, RingFeatures::empty(), &[])).err(),
            Some(ConfigError::RingTooSmall { needed: layout.size(), given: layout.size() - 64 })
        );
        assert!(SplitDevice::new(cfg(layout, mem, RingFeatures::empty(), &[])).is_ok());
    }

    #[test]
    fn pop_push_publish_roundtrip() {
        let layout = RingLayout::split(8).unwrap();
        let l = lines_for(&layout);
        let mem = SharedMemory::new(&l);
        let mut dev = SplitDevice::new(cfg(layout, mem, RingFeatures::empty(), &[])).unwrap();
        let mut drv = Drv::new(mem, layout);

        assert_eq!(dev.pop_avail(), Ok(None));
        drv.desc(3, 0x1000, 100, NEXT, 5);
        drv.desc(5, 0x2000, 200, NEXT | WRITE, 0);
        drv.desc(0, 0x3000, 300, WRITE, 7);
        drv.publish(3);
        let c = dev.pop_avail().unwrap().unwrap();
        assert_eq!(c.id, 3);
        assert_eq!(c.ring_descs, 3);
        assert!(!c.indirect);
        assert_eq!(c.descriptors(), &[d(0x1000, 100, false), d(0x2000, 200, true), d(0x3000, 300, true)]);
        assert_eq!(c.readable_len(), 100);
        assert_eq!(c.writable_len(), 500);
        assert_eq!(dev.last_avail(), 1);
        assert_eq!(dev.pop_avail(), Ok(None));

        // Nothing pushed: nothing to publish.
        assert!(!dev.publish_used());
        dev.push_used(u32::from(c.id), 42);
        assert_eq!(dev.used_idx(), 1);
        assert_eq!(drv.used_idx(), 0, "not visible before publish");
        assert!(dev.publish_used());
        assert_eq!(drv.used_idx(), 1);
        assert_eq!(drv.used_elem(0), (3, 42));
        assert!(!dev.publish_used());

        // NO_INTERRUPT suppresses the notification.
        drv.desc(1, 0x4000, 8, 0, 0);
        drv.publish(1);
        let c = dev.pop_avail().unwrap().unwrap();
        drv.set_avail_flags(AvailFlags::NO_INTERRUPT.bits());
        dev.push_used(u32::from(c.id), 0);
        assert!(!dev.publish_used());
        assert_eq!(drv.used_idx(), 2);
        assert_eq!(drv.used_elem(1), (1, 0));
    }

    #[test]
    #[cfg_attr(miri, ignore = "70000 rounds take many minutes under Miri; the same code runs in every other test")]
    fn indices_wrap_at_16_bits() {
        let layout = RingLayout::split(2).unwrap();
        let l = lines_for(&layout);
        let mem = SharedMemory::new(&l);
        let mut dev = SplitDevice::new(cfg(layout, mem, RingFeatures::EVENT_IDX, &[])).unwrap();
        let mut drv = Drv::new(mem, layout);
        for round in 0..70_000u32 {
            let head = (round % 2) as u16;
            drv.desc(head, u64::from(round), 1 + round % 7, 0, 0);
            drv.publish(head);
            let c = dev.pop_avail().unwrap().unwrap();
            assert_eq!(c.id, head);
            assert_eq!(c.descriptors(), &[d(u64::from(round), 1 + round % 7, false)]);
            // The driver wants a notification for every entry.
            drv.set_used_event(dev.used_idx());
            dev.push_used(u32::from(c.id), round);
            assert!(dev.publish_used());
            assert_eq!(drv.used_idx(), (round + 1) as u16);
            assert_eq!(drv.used_elem(round as u16), (u32::from(head), round));
        }
        assert_eq!(dev.last_avail(), 70_000u32 as u16);
    }

    #[test]
    fn event_idx_notifications() {
        let layout = RingLayout::split(8).unwrap();
        let l = lines_for(&layout);
        let mem = SharedMemory::new(&l);
        let mut dev = SplitDevice::new(cfg(layout, mem, RingFeatures::EVENT_IDX, &[])).unwrap();
        let mut drv = Drv::new(mem, layout);
        for i in 0..8 {
            drv.desc(i, 0x1000, 16, WRITE, 0);
            drv.publish(i);
        }
        // NO_INTERRUPT is ignored with EVENT_IDX.
        drv.set_avail_flags(AvailFlags::NO_INTERRUPT.bits());
        drv.set_used_event(2);
        // Used 0..2 = [0, 2): event 2 not passed.
        for _ in 0..2 {
            let c = dev.pop_avail().unwrap().unwrap();
            dev.push_used(u32::from(c.id), 1);
        }
        assert!(!dev.publish_used());
        // Used [2, 5): passes 2.
        for _ in 0..3 {
            let c = dev.pop_avail().unwrap().unwrap();
            dev.push_used(u32::from(c.id), 1);
        }
        assert!(dev.publish_used());
        // Used [5, 6): event still 2.
        let c = dev.pop_avail().unwrap().unwrap();
        dev.push_used(u32::from(c.id), 1);
        assert!(!dev.publish_used());
        drv.set_used_event(6);
        let c = dev.pop_avail().unwrap().unwrap();
        dev.push_used(u32::from(c.id), 1);
        assert!(dev.publish_used());
        assert_eq!(drv.used_idx(), 7);
    }

    #[test]
    fn in_order_batch_writes_one_element() {
        let layout = RingLayout::split(4).unwrap();
        let l = lines_for(&layout);
        let mem = SharedMemory::new(&l);
        let features = RingFeatures::IN_ORDER;
        let mut dev = SplitDevice::new(cfg(layout, mem, features, &[])).unwrap();
        let mut drv = Drv::new(mem, layout);
        drv.desc(0, 0x10, 4, NEXT, 1);
        drv.desc(1, 0x20, 4, WRITE, 0);
        drv.desc(2, 0x30, 4, WRITE, 0);
        drv.publish(0);
        drv.publish(2);
        let a = dev.pop_avail().unwrap().unwrap();
        let b = dev.pop_avail().unwrap().unwrap();
        assert_eq!((a.ring_descs, b.ring_descs), (2, 1));
        dev.push_used_batch(&[], 9);
        assert!(!dev.publish_used());
        dev.push_used_batch(&[a, b], 3);
        assert_eq!(dev.used_idx(), 2);
        assert!(dev.publish_used());
        assert_eq!(drv.used_idx(), 2);
        assert_eq!(drv.used_elem(0), (2, 3));
    }

    #[test]
    fn kick_suppression_flags() {
        let layout = RingLayout::split(4).unwrap();
        let l = lines_for(&layout);
        let mem = SharedMemory::new(&l);
        let mut dev = SplitDevice::new(cfg(layout, mem, RingFeatures::empty(), &[])).unwrap();
        let mut drv = Drv::new(mem, layout);
        dev.disable_kicks();
        assert_eq!(drv.used_flags(), UsedFlags::NO_NOTIFY.bits());
        assert!(!dev.enable_kicks());
        assert_eq!(drv.used_flags(), 0);
        dev.disable_kicks();
        drv.desc(0, 0x10, 4, 0, 0);
        drv.publish(0);
        assert!(dev.enable_kicks(), "entry published while kicks were off");
        assert_eq!(drv.used_flags(), 0);
        assert!(dev.pop_avail().unwrap().is_some());
        assert!(!dev.enable_kicks());
    }

    #[test]
    fn kick_suppression_event_idx() {
        let layout = RingLayout::split(4).unwrap();
        let l = lines_for(&layout);
        let mem = SharedMemory::new(&l);
        let mut dev = SplitDevice::new(cfg(layout, mem, RingFeatures::EVENT_IDX, &[])).unwrap();
        let mut drv = Drv::new(mem, layout);
        drv.desc(0, 0x10, 4, 0, 0);
        drv.publish(0);
        assert!(dev.enable_kicks());
        assert_eq!(drv.avail_event(), 0);
        dev.pop_avail().unwrap().unwrap();
        dev.disable_kicks();
        // Parked behind everything the driver can publish next.
        let ev = drv.avail_event();
        assert!(!need_event(ev, drv.avail_idx.wrapping_add(4), drv.avail_idx));
        assert_eq!(drv.used_flags(), 0, "flags untouched with EVENT_IDX");
        assert!(!dev.enable_kicks());
        assert_eq!(drv.avail_event(), 1);
    }

    #[test]
    fn raw_misbehaviour() {
        let layout = RingLayout::split(4).unwrap();
        let l = lines_for(&layout);
        let mem = SharedMemory::new(&l);
        let mut dev = SplitDevice::new(cfg(layout, mem, RingFeatures::empty(), &[])).unwrap();
        let drv = Drv::new(mem, layout);
        dev.write_used_elem_raw(6, 999, 0xffff_ffff);
        assert_eq!(drv.used_elem(2), (999, 0xffff_ffff));
        dev.set_used_idx_raw(1000);
        assert_eq!(drv.used_idx(), 1000);
        assert_eq!(dev.used_idx(), 1000);
        assert!(!dev.publish_used());
        dev.push_used(1, 1);
        assert!(dev.publish_used());
        assert_eq!(drv.used_idx(), 1001);
        assert_eq!(drv.used_elem(1000), (1, 1));
    }

    #[test]
    fn indirect_table() {
        let layout = RingLayout::split(4).unwrap();
        let l = lines_for(&layout);
        let mem = SharedMemory::new(&l);
        let tl = lines(4);
        let tmem = SharedMemory::new(&tl);
        let regions = [MemoryRegion { addr: 0x10_0000, mem: tmem }];
        let mut dev = SplitDevice::new(cfg(layout, mem, RingFeatures::INDIRECT_DESC, &regions)).unwrap();
        let mut drv = Drv::new(mem, layout);
        // Table at 0x10_0040: entries 0 -> 2 -> 1.
        write_split_desc(&tmem, 64, 0xa000, 10, NEXT, 2);
        write_split_desc(&tmem, 64 + 32, 0xb000, 20, NEXT | WRITE, 1);
        write_split_desc(&tmem, 64 + 16, 0xc000, 30, WRITE, 0);
        drv.desc(2, 0x10_0040, 48, INDIRECT | WRITE, 0);
        drv.publish(2);
        let c = dev.pop_avail().unwrap().unwrap();
        assert_eq!(c.id, 2);
        assert!(c.indirect);
        assert_eq!(c.ring_descs, 1);
        assert_eq!(c.descriptors(), &[d(0xa000, 10, false), d(0xb000, 20, true), d(0xc000, 30, true)]);
        assert_eq!((c.readable_len(), c.writable_len()), (10, 50));
    }

    /// Publishes one chain whose head is descriptor 0 and returns what popping it gives.
    fn pop_with(
        features: RingFeatures,
        size: u16,
        setup: impl FnOnce(&Drv<'_>, &SharedMemory<'_>),
    ) -> Result<Option<AvailChain>, ModelError> {
        let layout = RingLayout::split(size).unwrap();
        let l = lines_for(&layout);
        let mem = SharedMemory::new(&l);
        let tl = lines(MAX_CHAIN / 4 + 2);
        let tmem = SharedMemory::new(&tl);
        let regions = [MemoryRegion { addr: 0x8000, mem: tmem }];
        let mut dev = SplitDevice::new(cfg(layout, mem, features, &regions)).unwrap();
        let mut drv = Drv::new(mem, layout);
        setup(&drv, &tmem);
        drv.publish(0);
        let r = dev.pop_avail();
        if r.is_err() {
            // A failed pop leaves the device as it was.
            assert_eq!(dev.last_avail(), 0);
            assert_eq!(dev.pop_avail(), r);
        }
        r
    }

    #[test]
    fn chain_errors() {
        let none = RingFeatures::empty();
        let ind = RingFeatures::INDIRECT_DESC;
        assert_eq!(
            pop_with(none, 4, |drv, _| drv.desc(0, 1, 1, NEXT, 4)),
            Err(ModelError::NextOutOfRange { next: 4, limit: 4 })
        );
        assert_eq!(
            pop_with(none, 4, |drv, _| {
                drv.desc(0, 1, 1, NEXT, 1);
                drv.desc(1, 1, 1, NEXT, 0);
            }),
            Err(ModelError::ChainLoop)
        );
        assert_eq!(pop_with(none, 4, |drv, _| drv.desc(0, 1, 1, NEXT, 0)), Err(ModelError::ChainLoop));
        assert_eq!(
            pop_with(none, 4, |drv, _| {
                drv.desc(0, 1, 1, WRITE | NEXT, 1);
                drv.desc(1, 1, 1, 0, 0);
            }),
            Err(ModelError::ReadableAfterWritable)
        );
        assert_eq!(
            pop_with(none, 4, |drv, _| {
                drv.desc(0, 1, 1, NEXT, 1);
                drv.desc(1, 1, 0, WRITE, 0);
            }),
            Err(ModelError::ZeroLength)
        );
        assert_eq!(
            pop_with(none, 4, |drv, _| {
                drv.desc(0, 1, u32::MAX, NEXT, 1);
                drv.desc(1, 1, 1, WRITE, 0);
            }),
            Err(ModelError::ChainTooManyBytes)
        );
        // A chain through all 128 descriptors is legal but too long for the model.
        assert_eq!(
            pop_with(none, 128, |drv, _| {
                for i in 0..128u16 {
                    drv.desc(i, 1, 1, if i < 127 { NEXT } else { 0 }, i + 1);
                }
            }),
            Err(ModelError::ChainExceedsModel)
        );
        // ... and one of exactly MAX_CHAIN fits.
        let c = pop_with(none, 128, |drv, _| {
            for i in 0..MAX_CHAIN as u16 {
                drv.desc(i, 1, 1, if i + 1 < MAX_CHAIN as u16 { NEXT } else { 0 }, i + 1);
            }
        })
        .unwrap()
        .unwrap();
        assert_eq!((c.descriptors().len(), usize::from(c.ring_descs)), (MAX_CHAIN, MAX_CHAIN));

        // Indirect rules.
        assert_eq!(
            pop_with(none, 4, |drv, _| drv.desc(0, 0x8000, 16, INDIRECT, 0)),
            Err(ModelError::IndirectNotNegotiated)
        );
        assert_eq!(
            pop_with(ind, 4, |drv, _| drv.desc(0, 0x8000, 16, INDIRECT | NEXT, 1)),
            Err(ModelError::IndirectWithNext)
        );
        assert_eq!(
            pop_with(ind, 4, |drv, _| {
                drv.desc(0, 1, 1, NEXT, 1);
                drv.desc(1, 0x8000, 16, INDIRECT, 0);
            }),
            Err(ModelError::IndirectInChain)
        );
        for len in [0u32, 8, 17, 16 * (MAX_CHAIN as u32 + 1)] {
            assert_eq!(
                pop_with(ind, 4, |drv, _| drv.desc(0, 0x8000, len, INDIRECT, 0)),
                Err(ModelError::IndirectTableBadLen { len })
            );
        }
        for addr in [0x7ff0u64, 0x8000 + 64 * (MAX_CHAIN as u64 / 4 + 2) - 16, 0] {
            assert_eq!(
                pop_with(ind, 4, |drv, _| drv.desc(0, addr, 32, INDIRECT, 0)),
                Err(ModelError::IndirectTableUnmapped { addr })
            );
        }
        assert_eq!(
            pop_with(ind, 4, |drv, _| drv.desc(0, 0x8008, 16, INDIRECT, 0)),
            Err(ModelError::IndirectTableMisaligned { addr: 0x8008 })
        );
        assert_eq!(
            pop_with(ind, 4, |drv, t| {
                drv.desc(0, 0x8000, 32, INDIRECT, 0);
                write_split_desc(t, 0, 1, 1, NEXT, 1);
                write_split_desc(t, 16, 0x8000, 16, INDIRECT, 0);
            }),
            Err(ModelError::NestedIndirect)
        );
        assert_eq!(
            pop_with(ind, 4, |drv, t| {
                drv.desc(0, 0x8000, 32, INDIRECT, 0);
                write_split_desc(t, 0, 1, 1, NEXT, 2);
            }),
            Err(ModelError::NextOutOfRange { next: 2, limit: 2 })
        );
        assert_eq!(
            pop_with(ind, 4, |drv, t| {
                drv.desc(0, 0x8000, 32, INDIRECT, 0);
                write_split_desc(t, 0, 1, 1, NEXT, 1);
                write_split_desc(t, 16, 1, 1, NEXT, 0);
            }),
            Err(ModelError::ChainLoop)
        );
        assert_eq!(
            pop_with(ind, 4, |drv, t| {
                drv.desc(0, 0x8000, 32, INDIRECT, 0);
                write_split_desc(t, 0, 1, 1, NEXT | WRITE, 1);
                write_split_desc(t, 16, 1, 1, 0, 0);
            }),
            Err(ModelError::ReadableAfterWritable)
        );
        assert_eq!(
            pop_with(ind, 4, |drv, t| {
                drv.desc(0, 0x8000, 16, INDIRECT, 0);
                write_split_desc(t, 0, 1, 0, 0, 0);
            }),
            Err(ModelError::ZeroLength)
        );
        // A full table of MAX_CHAIN entries is accepted.
        let c = pop_with(ind, 4, |drv, t| {
            drv.desc(0, 0x8000, 16 * MAX_CHAIN as u32, INDIRECT, 0);
            for i in 0..MAX_CHAIN as u16 {
                let last = i + 1 == MAX_CHAIN as u16;
                write_split_desc(t, 16 * usize::from(i), 1, 1, if last { WRITE } else { NEXT | WRITE }, i + 1);
            }
        })
        .unwrap()
        .unwrap();
        assert_eq!(c.descriptors().len(), MAX_CHAIN);
        assert_eq!(c.writable_len(), MAX_CHAIN as u64);
    }

    #[test]
    fn ring_errors() {
        let layout = RingLayout::split(4).unwrap();
        let l = lines_for(&layout);
        let mem = SharedMemory::new(&l);
        let mut dev = SplitDevice::new(cfg(layout, mem, RingFeatures::empty(), &[])).unwrap();
        let mut drv = Drv::new(mem, layout);
        drv.set_avail_idx(5);
        assert_eq!(dev.pop_avail(), Err(ModelError::AvailIndexJump { avail_idx: 5, last_avail: 0, queue_size: 4 }));
        drv.set_avail_idx(0xffff);
        assert!(matches!(dev.pop_avail(), Err(ModelError::AvailIndexJump { .. })));
        drv.set_avail_idx(0);
        drv.publish(4);
        assert_eq!(dev.pop_avail(), Err(ModelError::HeadOutOfRange { head: 4, queue_size: 4 }));
        // Four entries at once is fine.
        drv.set_avail_idx(0);
        drv.avail_idx = 0;
        drv.desc(0, 1, 1, 0, 0);
        for _ in 0..4 {
            drv.publish(0);
        }
        for _ in 0..4 {
            assert!(dev.pop_avail().unwrap().is_some());
        }
        assert_eq!(dev.pop_avail(), Ok(None));
    }
}
