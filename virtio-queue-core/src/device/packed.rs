//! The device side of a packed virtqueue (§2.8).

use super::{
    desc_flags, find_table, read_desc_data, AvailChain, ConfigError, DescInfo, DeviceConfig, MemoryRegion, ModelError,
};
use crate::layout::{off, DescFlags, PackedEventFlags, RingFeatures, RingFormat};
use crate::notify::{need_event, packed_event_position};
use crate::shared::{fence_store_before_load, Ordering, SharedMemory};

/// The device side of one packed virtqueue.
///
/// It keeps the device's avail position and wrap counter (where the next
/// available chain starts) and its used position and wrap counter (where the
/// next used descriptor goes). A used descriptor is visible to the driver as
/// soon as [`push_used`](Self::push_used) writes its flags;
/// [`publish_used`](Self::publish_used) only decides whether to notify.
#[derive(Debug)]
pub struct PackedDevice<'a> {
    /// The descriptor ring: at least `16 * size` bytes.
    ring: SharedMemory<'a>,
    memory: &'a [MemoryRegion<'a>],
    features: RingFeatures,
    size: u16,
    /// The driver event suppression area: 4 bytes at `driver_offset` (a multiple of 4) of
    /// `driver`.
    driver: SharedMemory<'a>,
    driver_offset: usize,
    /// The device event suppression area: 4 bytes at `device_offset` (a multiple of 4) of
    /// `device`.
    device: SharedMemory<'a>,
    device_offset: usize,
    avail_pos: u16,
    avail_wrap: bool,
    used_pos: u16,
    used_wrap: bool,
    /// Used ring positions advanced since the previous publication.
    pending: u32,
    /// Something was pushed since the previous publication.
    dirty: bool,
}

/// The three areas of a packed ring given separately, for [`PackedDevice::with_areas`].
///
/// A [`SharedMemory`] view starts on a 16-byte boundary, while the specification asks only
/// 4-byte alignment of the event suppression areas, so each of those is a view plus the
/// offset of the area in it.
#[derive(Clone, Copy, Debug)]
pub struct PackedAreas<'a> {
    /// Queue size (1..=32768).
    pub queue_size: u16,
    /// The descriptor ring: at least `16 * queue_size` bytes.
    pub desc: SharedMemory<'a>,
    /// A view holding the driver event suppression area (4 bytes) ...
    pub driver: SharedMemory<'a>,
    /// ... at this offset, a multiple of 4.
    pub driver_offset: usize,
    /// A view holding the device event suppression area (4 bytes) ...
    pub device: SharedMemory<'a>,
    /// ... at this offset, a multiple of 4.
    pub device_offset: usize,
    /// Negotiated features that change the ring's behaviour.
    pub features: RingFeatures,
    /// Memory reachable by device address (indirect tables).
    pub memory: &'a [MemoryRegion<'a>],
}

/// Whether descriptor `flags` mark it available in the lap of `wrap` (§2.8.1).
fn is_avail(flags: u16, wrap: bool) -> bool {
    let f = DescFlags::from_bits_retain(flags);
    f.contains(DescFlags::AVAIL) == wrap && f.contains(DescFlags::USED) != wrap
}

impl<'a> PackedDevice<'a> {
    /// A device over the packed ring of `cfg`, in its reset state (positions
    /// 0, wrap counters set).
    pub fn new(cfg: DeviceConfig<'a>) -> Result<Self, ConfigError> {
        cfg.check(RingFormat::Packed)?;
        Ok(PackedDevice {
            ring: cfg.ring,
            memory: cfg.memory,
            features: cfg.features,
            size: cfg.layout.queue_size(),
            driver: cfg.ring,
            driver_offset: cfg.layout.driver_offset(),
            device: cfg.ring,
            device_offset: cfg.layout.device_offset(),
            avail_pos: 0,
            avail_wrap: true,
            used_pos: 0,
            used_wrap: true,
            pending: 0,
            dirty: false,
        })
    }

    /// A device over the packed ring of `cfg` that continues from the given
    /// avail and used positions (each reduced modulo the queue size) and wrap
    /// counters, instead of the reset state: for a back-end that is told where
    /// a ring stands (vhost-user SET_VRING_BASE), or that rebuilds the model
    /// for every batch of work from positions it keeps itself.
    pub fn with_positions(cfg: DeviceConfig<'a>, avail: (u16, bool), used: (u16, bool)) -> Result<Self, ConfigError> {
        let mut dev = Self::new(cfg)?;
        dev.set_positions(avail, used);
        Ok(dev)
    }

    /// A device over a packed ring whose three areas are anywhere, not laid out as one
    /// [`RingLayout`](crate::layout::RingLayout) block: for a device serving a driver that
    /// allocates them separately (any vhost-user front-end). Starts from the reset state.
    pub fn with_areas(areas: PackedAreas<'a>) -> Result<Self, ConfigError> {
        let PackedAreas { queue_size, desc, driver, driver_offset, device, device_offset, features, memory } = areas;
        if queue_size == 0 || queue_size > crate::layout::MAX_QUEUE_SIZE {
            return Err(ConfigError::QueueSize { size: queue_size });
        }
        let needed = usize::from(queue_size) * off::DESC_SIZE;
        if desc.len() < needed {
            return Err(ConfigError::RingTooSmall { needed, given: desc.len() });
        }
        for (view, offset) in [(&driver, driver_offset), (&device, device_offset)] {
            if offset % 4 != 0 || offset.checked_add(4).is_none_or(|end| end > view.len()) {
                return Err(ConfigError::EventArea { offset, len: view.len() });
            }
        }
        Ok(PackedDevice {
            ring: desc,
            memory,
            features,
            size: queue_size,
            driver,
            driver_offset,
            device,
            device_offset,
            avail_pos: 0,
            avail_wrap: true,
            used_pos: 0,
            used_wrap: true,
            pending: 0,
            dirty: false,
        })
    }

    /// Moves the device to the given avail and used positions (each reduced modulo the queue
    /// size) and wrap counters, as [`with_positions`](Self::with_positions) does for
    /// [`new`](Self::new).
    pub fn set_positions(&mut self, avail: (u16, bool), used: (u16, bool)) {
        (self.avail_pos, self.avail_wrap) = (avail.0 % self.size, avail.1);
        (self.used_pos, self.used_wrap) = (used.0 % self.size, used.1);
    }

    /// The queue size.
    pub fn queue_size(&self) -> u16 {
        self.size
    }

    /// Where the next used descriptor goes, and the used wrap counter.
    pub fn used_position(&self) -> (u16, bool) {
        (self.used_pos, self.used_wrap)
    }

    /// Where the next available chain is expected, and the avail wrap counter.
    pub fn avail_position(&self) -> (u16, bool) {
        (self.avail_pos, self.avail_wrap)
    }

    /// `(pos, wrap)` moved on by `n` ring positions.
    fn advance(&self, pos: u16, wrap: bool, n: u32) -> (u16, bool) {
        let size = u32::from(self.size);
        let total = u32::from(pos % self.size) + n;
        // `total % size < size <= 32768`.
        ((total % size) as u16, wrap ^ ((total / size) % 2 == 1))
    }

    /// Offset of the descriptor at ring position `pos` (reduced modulo the size).
    /// With `new`'s check that the ring covers the layout, the 16 bytes there
    /// are inside the ring and 16-aligned.
    fn desc_off(&self, pos: u16) -> usize {
        usize::from(pos % self.size) * off::DESC_SIZE
    }

    fn load_flags(&self, pos: u16) -> u16 {
        // SAFETY: a 2-aligned field of a descriptor inside the ring (`desc_off`).
        unsafe { self.ring.load_u16(self.desc_off(pos) + off::PACKED_DESC_FLAGS, Ordering::Acquire) }
    }

    /// Whether the driver has made the next chain available (an acquire load
    /// of its first descriptor's flags, as [`pop_avail`](Self::pop_avail)
    /// does): what a device looks at before it decides how to read the chain.
    pub fn avail_pending(&self) -> bool {
        is_avail(self.load_flags(self.avail_pos), self.avail_wrap)
    }

    /// Takes the next available chain, if the driver made one available.
    ///
    /// On an error the device state is unchanged (the same call fails again).
    pub fn pop_avail(&mut self) -> Result<Option<AvailChain>, ModelError> {
        let mut flags = self.load_flags(self.avail_pos);
        if !is_avail(flags, self.avail_wrap) {
            return Ok(None);
        }
        let (mut pos, mut wrap) = (self.avail_pos, self.avail_wrap);
        let mut chain = AvailChain::new(0);
        let mut n: u16 = 0;
        loop {
            n += 1;
            let at = self.desc_off(pos);
            // SAFETY: fields of a descriptor inside the ring, each aligned to its
            // width (`desc_off`); read after the acquire load of its flags.
            let (addr, len, id) = unsafe {
                (
                    self.ring.read_u64(at + off::PACKED_DESC_ADDR),
                    self.ring.read_u32(at + off::PACKED_DESC_LEN),
                    self.ring.read_u16(at + off::PACKED_DESC_ID),
                )
            };
            let f = desc_flags(flags);
            if f.contains(DescFlags::INDIRECT) {
                if !self.features.contains(RingFeatures::INDIRECT_DESC) {
                    return Err(ModelError::IndirectNotNegotiated);
                }
                if f.contains(DescFlags::NEXT) {
                    return Err(ModelError::IndirectWithNext);
                }
                if n > 1 {
                    return Err(ModelError::IndirectInChain);
                }
                chain.indirect = true;
                walk_table(&mut chain, self.memory, addr, len)?;
                chain.id = id;
                chain.ring_descs = 1;
                break;
            }
            chain.push(DescInfo { addr, len, writable: f.contains(DescFlags::WRITE) })?;
            if !f.contains(DescFlags::NEXT) {
                chain.id = id;
                chain.ring_descs = n;
                break;
            }
            if n >= self.size {
                return Err(ModelError::ChainTooLong);
            }
            (pos, wrap) = self.advance(pos, wrap, 1);
            flags = self.load_flags(pos);
            if !is_avail(flags, wrap) {
                return Err(ModelError::ChainIncomplete { position: pos });
            }
        }
        (self.avail_pos, self.avail_wrap) = self.advance(self.avail_pos, self.avail_wrap, u32::from(n));
        Ok(Some(chain))
    }

    /// Marks `chain` used with `len` bytes written: a used descriptor at the
    /// used position (id, len, then the flags with a release store), and the
    /// used position moves past the chain's `ring_descs` positions.
    pub fn push_used(&mut self, chain: &AvailChain, len: u32) {
        self.push_one(chain.id, len, u32::from(chain.ring_descs));
    }

    /// VIRTIO_F_IN_ORDER batching (§2.8.9): one used descriptor with the id of
    /// the last of `chains`, skipping the ring positions of all of them. Does
    /// nothing for an empty slice.
    pub fn push_used_batch(&mut self, chains: &[AvailChain], len: u32) {
        let Some(last) = chains.last() else { return };
        let skip = chains.iter().map(|c| u32::from(c.ring_descs)).fold(0u32, u32::saturating_add);
        self.push_one(last.id, len, skip);
    }

    fn push_one(&mut self, id: u16, len: u32, skip: u32) {
        let flags = if self.used_wrap { (DescFlags::AVAIL | DescFlags::USED).bits() } else { 0 };
        self.write_used_raw(self.used_pos, id, len, flags);
        (self.used_pos, self.used_wrap) = self.advance(self.used_pos, self.used_wrap, skip);
        self.pending = self.pending.saturating_add(skip);
        self.dirty = true;
    }

    /// Returns whether the driver asked for a used-buffer notification for
    /// what was pushed since the previous publication (its event suppression
    /// structure, §2.8.10). False if nothing was pushed.
    pub fn publish_used(&mut self) -> bool {
        if !self.dirty {
            return false;
        }
        self.dirty = false;
        let pending = self.pending;
        self.pending = 0;
        fence_store_before_load();
        // SAFETY: 2-aligned fields of the driver area, which lies inside `driver` (checked by
        // both constructors: the layout the ring covers, or `with_areas`' bounds check).
        let flags = unsafe { self.driver.load_u16(self.driver_offset + off::EVENT_FLAGS, Ordering::Acquire) };
        match flags & 3 {
            f if f == PackedEventFlags::Enable as u16 => true,
            f if f == PackedEventFlags::Disable as u16 => false,
            f if f == PackedEventFlags::Desc as u16 && self.features.contains(RingFeatures::EVENT_IDX) => {
                // More than a whole ring since the last publication passes every event: the
                // driver's offset and wrap counter can no longer say which lap it meant.
                if pending > u32::from(self.size) {
                    return true;
                }
                // At most a whole ring (checked just above).
                let advanced = pending as u16;
                // SAFETY: as above.
                let off_wrap =
                    unsafe { self.driver.load_u16(self.driver_offset + off::EVENT_OFF_WRAP, Ordering::Acquire) };
                let new = self.used_pos;
                let old = new.wrapping_sub(advanced);
                need_event(packed_event_position(off_wrap, self.used_wrap, self.size), new, old)
            }
            // Desc without EVENT_IDX, or the reserved value: notify.
            _ => true,
        }
    }

    /// Asks the driver not to send available-buffer notifications (device
    /// event suppression flags = Disable).
    pub fn disable_kicks(&mut self) {
        // SAFETY: a 2-aligned field of the device area, which lies inside `device` (checked by
        // both constructors).
        unsafe {
            self.device.store_u16(
                self.device_offset + off::EVENT_FLAGS,
                PackedEventFlags::Disable as u16,
                Ordering::Release,
            )
        };
    }

    /// Asks the driver for available-buffer notifications again (with
    /// EVENT_IDX for the avail position, otherwise for every chain), then
    /// returns whether a chain is available at the avail position already:
    /// the caller must pop it instead of waiting.
    pub fn enable_kicks(&mut self) -> bool {
        let ev = self.device_offset;
        if self.features.contains(RingFeatures::EVENT_IDX) {
            let off_wrap = self.avail_pos | (u16::from(self.avail_wrap) << 15);
            // SAFETY: 2-aligned fields of the device area, which lies inside `device` (checked
            // by both constructors).
            unsafe {
                self.device.store_u16(ev + off::EVENT_OFF_WRAP, off_wrap, Ordering::Release);
                self.device.store_u16(ev + off::EVENT_FLAGS, PackedEventFlags::Desc as u16, Ordering::Release);
            }
        } else {
            // SAFETY: as above.
            unsafe { self.device.store_u16(ev + off::EVENT_FLAGS, PackedEventFlags::Enable as u16, Ordering::Release) };
        }
        fence_store_before_load();
        is_avail(self.load_flags(self.avail_pos), self.avail_wrap)
    }

    /// Misbehaviour: writes any used descriptor at ring position `position`
    /// (reduced modulo the queue size): `id` and `len` as data, then a release
    /// store of `flags`. The device's positions do not change.
    pub fn write_used_raw(&mut self, position: u16, id: u16, len: u32, flags: u16) {
        let at = self.desc_off(position);
        // SAFETY: fields of a descriptor inside the ring, each aligned to its width.
        unsafe {
            self.ring.write_u16(at + off::PACKED_DESC_ID, id);
            self.ring.write_u32(at + off::PACKED_DESC_LEN, len);
            self.ring.store_u16(at + off::PACKED_DESC_FLAGS, flags, Ordering::Release);
        }
    }
}

/// Takes the buffers of a packed indirect table (§2.8.19): all `len / 16`
/// entries, in order (a NEXT flag in the table is ignored, ids too).
fn walk_table(chain: &mut AvailChain, memory: &[MemoryRegion<'_>], addr: u64, len: u32) -> Result<(), ModelError> {
    let (table, entries) = find_table(memory, addr, len)?;
    for i in 0..entries {
        // SAFETY: `i < entries` and the table window is exactly `16 * entries`
        // bytes starting 16-aligned (`find_table`).
        let d = unsafe { read_desc_data(&table, usize::from(i) * off::DESC_SIZE) };
        // In a packed descriptor the flags are the last field (`word14`).
        let flags = desc_flags(d.word14);
        if flags.contains(DescFlags::INDIRECT) {
            return Err(ModelError::NestedIndirect);
        }
        chain.push(DescInfo { addr: d.addr, len: d.len, writable: flags.contains(DescFlags::WRITE) })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{lines, lines_for};
    use super::super::MAX_CHAIN;
    use super::*;
    use crate::layout::RingLayout;

    const NEXT: u16 = 1;
    const WRITE: u16 = 2;
    const INDIRECT: u16 = 4;
    const AVAIL: u16 = 1 << 7;
    const USED: u16 = 1 << 15;

    /// A packed driver written by hand.
    struct Drv<'a> {
        mem: SharedMemory<'a>,
        layout: RingLayout,
        pos: u16,
        wrap: bool,
        used_pos: u16,
        used_wrap: bool,
    }

    impl<'a> Drv<'a> {
        fn new(mem: SharedMemory<'a>, layout: RingLayout) -> Self {
            Drv { mem, layout, pos: 0, wrap: true, used_pos: 0, used_wrap: true }
        }

        fn size(&self) -> u16 {
            self.layout.queue_size()
        }

        fn wrap_bits(wrap: bool) -> u16 {
            if wrap {
                AVAIL
            } else {
                USED
            }
        }

        /// Writes one descriptor at `pos` as available in lap `wrap` (flags last, release).
        fn write_at(&self, pos: u16, wrap: bool, addr: u64, len: u32, id: u16, flags: u16) {
            let at = usize::from(pos) * 16;
            // SAFETY: offsets come from the layout (or the table window) and are aligned and in bounds.
            unsafe {
                self.mem.write_u64(at + off::PACKED_DESC_ADDR, addr);
                self.mem.write_u32(at + off::PACKED_DESC_LEN, len);
                self.mem.write_u16(at + off::PACKED_DESC_ID, id);
                self.mem.store_u16(at + off::PACKED_DESC_FLAGS, flags | Self::wrap_bits(wrap), Ordering::Release);
            }
        }

        /// Makes a chain of `(addr, len, flags)` available with buffer id `id`
        /// (NEXT added between descriptors); the head's flags are written last.
        fn add(&mut self, id: u16, descs: &[(u64, u32, u16)]) {
            let (head_pos, head_wrap) = (self.pos, self.wrap);
            let mut head = None;
            for (k, &(addr, len, flags)) in descs.iter().enumerate() {
                let flags = if k + 1 < descs.len() { flags | NEXT } else { flags };
                if k == 0 {
                    head = Some((addr, len, flags));
                } else {
                    self.write_at(self.pos, self.wrap, addr, len, id, flags);
                }
                self.step();
            }
            let (addr, len, flags) = head.unwrap();
            self.write_at(head_pos, head_wrap, addr, len, id, flags);
        }

        fn step(&mut self) {
            self.pos += 1;
            if self.pos == self.size() {
                self.pos = 0;
                self.wrap = !self.wrap;
            }
        }

        /// The next used descriptor, if the device wrote it: (id, len), and the
        /// driver's used position moves on by `skip`.
        fn take_used(&mut self, skip: u16) -> Option<(u16, u32)> {
            let at = usize::from(self.used_pos) * 16;
            // SAFETY: offsets come from the layout (or the table window) and are aligned and in bounds.
            let flags = unsafe { self.mem.load_u16(at + off::PACKED_DESC_FLAGS, Ordering::Acquire) };
            let want = if self.used_wrap { AVAIL | USED } else { 0 };
            if flags & (AVAIL | USED) != want {
                return None;
            }
            // SAFETY: offsets come from the layout (or the table window) and are aligned and in bounds.
            let r =
                unsafe { (self.mem.read_u16(at + off::PACKED_DESC_ID), self.mem.read_u32(at + off::PACKED_DESC_LEN)) };
            for _ in 0..skip {
                self.used_pos += 1;
                if self.used_pos == self.size() {
                    self.used_pos = 0;
                    self.used_wrap = !self.used_wrap;
                }
            }
            Some(r)
        }

        fn set_event(&self, flags: PackedEventFlags, off_wrap: u16) {
            let d = self.layout.driver_offset();
            // SAFETY: offsets come from the layout (or the table window) and are aligned and in bounds.
            unsafe {
                self.mem.store_u16(d + off::EVENT_OFF_WRAP, off_wrap, Ordering::Relaxed);
                self.mem.store_u16(d + off::EVENT_FLAGS, flags as u16, Ordering::Release);
            }
        }

        fn device_event(&self) -> (u16, u16) {
            let d = self.layout.device_offset();
            // SAFETY: offsets come from the layout (or the table window) and are aligned and in bounds.
            unsafe {
                (
                    self.mem.load_u16(d + off::EVENT_OFF_WRAP, Ordering::Acquire),
                    self.mem.load_u16(d + off::EVENT_FLAGS, Ordering::Acquire),
                )
            }
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
        let layout = RingLayout::packed(5).unwrap();
        let l = lines_for(&layout);
        let mem = SharedMemory::new(&l);
        let split = RingLayout::split(4).unwrap();
        assert_eq!(
            PackedDevice::new(cfg(split, mem, RingFeatures::empty(), &[])).err(),
            Some(ConfigError::WrongFormat { expected: RingFormat::Packed, found: RingFormat::Split })
        );
        let short = mem.slice(0, layout.size() - 64).unwrap();
        assert_eq!(
            PackedDevice::new(cfg(layout, short, RingFeatures::empty(), &[])).err(),
            Some(ConfigError::RingTooSmall { needed: layout.size(), given: layout.size() - 64 })
        );
        let dev = PackedDevice::new(cfg(layout, mem, RingFeatures::empty(), &[])).unwrap();
        assert_eq!(dev.avail_position(), (0, true));
        assert_eq!(dev.used_position(), (0, true));
    }

    #[test]
    fn continues_from_given_positions() {
        let layout = RingLayout::packed(5).unwrap();
        let l = lines_for(&layout);
        let mem = SharedMemory::new(&l);
        let mut drv = Drv::new(mem, layout);
        // The driver is at position 3 of the second lap (wrap counter clear).
        for id in 0..8 {
            drv.add(id, &[(1, 1, 0)]);
            drv.take_used(0);
        }
        let mut dev =
            PackedDevice::with_positions(cfg(layout, mem, RingFeatures::empty(), &[]), (8, false), (3, false)).unwrap();
        assert_eq!(dev.avail_position(), (3, false));
        assert_eq!(dev.used_position(), (3, false));
        // Nothing new yet: the chains before position 3 belong to the previous lap.
        assert_eq!(dev.pop_avail(), Ok(None));
        drv.used_pos = 3;
        drv.used_wrap = false;
        drv.add(9, &[(1, 1, 0), (2, 2, WRITE), (3, 3, WRITE)]);
        let c = dev.pop_avail().unwrap().unwrap();
        assert_eq!((c.id, c.ring_descs), (9, 3));
        assert_eq!(dev.avail_position(), (1, true));
        dev.push_used(&c, 5);
        assert!(dev.publish_used());
        assert_eq!(drv.take_used(3), Some((9, 5)));
    }

    #[test]
    fn separate_areas() {
        // The driver writes its ring through a layout-shaped block; the device is given the
        // descriptor ring of that block, and event areas in other memory at offsets 4 and 8.
        let layout = RingLayout::packed(5).unwrap();
        let l = lines_for(&layout);
        let mem = SharedMemory::new(&l);
        let ev = lines(1);
        let ev_mem = SharedMemory::new(&ev);
        fn areas<'a>(size: u16, desc: SharedMemory<'a>, ev: SharedMemory<'a>, at: (usize, usize)) -> PackedAreas<'a> {
            PackedAreas {
                queue_size: size,
                desc,
                driver: ev,
                driver_offset: at.0,
                device: ev,
                device_offset: at.1,
                features: RingFeatures::EVENT_IDX,
                memory: &[],
            }
        }
        let desc = mem;
        let short = mem.slice(0, 64).unwrap();
        assert_eq!(
            PackedDevice::with_areas(areas(0, desc, ev_mem, (4, 8))).err(),
            Some(ConfigError::QueueSize { size: 0 })
        );
        assert_eq!(
            PackedDevice::with_areas(areas(5, short, ev_mem, (4, 8))).err(),
            Some(ConfigError::RingTooSmall { needed: 80, given: 64 })
        );
        assert_eq!(
            PackedDevice::with_areas(areas(5, desc, ev_mem, (2, 8))).err(),
            Some(ConfigError::EventArea { offset: 2, len: 64 })
        );
        assert_eq!(
            PackedDevice::with_areas(areas(5, desc, ev_mem, (4, 61))).err(),
            Some(ConfigError::EventArea { offset: 61, len: 64 })
        );
        assert_eq!(
            PackedDevice::with_areas(areas(5, desc, ev_mem, (60, 64))).err(),
            Some(ConfigError::EventArea { offset: 64, len: 64 })
        );
        let mut dev = PackedDevice::with_areas(areas(5, desc, ev_mem, (4, 8))).unwrap();
        let mut drv = Drv::new(mem, layout);
        // Kick suppression lands in the device area at offset 8 of `ev`.
        dev.disable_kicks();
        // SAFETY: 2-aligned fields inside the 64-byte line.
        let read = |at: usize| unsafe { ev_mem.load_u16(at, Ordering::Acquire) };
        assert_eq!(read(8 + off::EVENT_FLAGS), PackedEventFlags::Disable as u16);
        assert!(!dev.enable_kicks());
        assert_eq!(
            (read(8 + off::EVENT_OFF_WRAP), read(8 + off::EVENT_FLAGS)),
            (0x8000, PackedEventFlags::Desc as u16)
        );
        // Used-buffer suppression is read from the driver area at offset 4: Disable, then Enable.
        // SAFETY: as above.
        unsafe { ev_mem.store_u16(4 + off::EVENT_FLAGS, PackedEventFlags::Disable as u16, Ordering::Release) };
        drv.add(7, &[(1, 1, 0), (2, 2, WRITE)]);
        let c = dev.pop_avail().unwrap().unwrap();
        dev.push_used(&c, 2);
        assert!(!dev.publish_used());
        assert_eq!(drv.take_used(2), Some((7, 2)));
        // SAFETY: as above.
        unsafe { ev_mem.store_u16(4 + off::EVENT_FLAGS, PackedEventFlags::Enable as u16, Ordering::Release) };
        drv.add(8, &[(3, 3, WRITE)]);
        let c = dev.pop_avail().unwrap().unwrap();
        dev.push_used(&c, 3);
        assert!(dev.publish_used());
        assert_eq!(drv.take_used(1), Some((8, 3)));
        // The ring block's own event areas were never touched.
        // SAFETY: as above, inside the layout.
        let untouched = unsafe { mem.load_u16(layout.device_offset() + off::EVENT_FLAGS, Ordering::Acquire) };
        assert_eq!(untouched, 0);
    }

    #[test]
    fn wraps_at_size_five() {
        let layout = RingLayout::packed(5).unwrap();
        let l = lines_for(&layout);
        let mem = SharedMemory::new(&l);
        let mut dev = PackedDevice::new(cfg(layout, mem, RingFeatures::empty(), &[])).unwrap();
        let mut drv = Drv::new(mem, layout);
        assert_eq!(dev.pop_avail(), Ok(None));
        // Chains of 1, 2 and 3 descriptors, many laps, crossing the end of the ring.
        let mut expect_pos: u32 = 0;
        for round in 0..40u16 {
            let n = 1 + round % 3;
            let descs: Vec<(u64, u32, u16)> = (0..n)
                .map(|k| {
                    (u64::from(round) * 0x100 + u64::from(k), 10 + u32::from(k), if k == n - 1 { WRITE } else { 0 })
                })
                .collect();
            drv.add(round, &descs);
            let c = dev.pop_avail().unwrap().unwrap();
            assert_eq!(c.id, round);
            assert_eq!(c.ring_descs, n);
            let want: Vec<DescInfo> = descs.iter().map(|&(a, l, f)| d(a, l, f & WRITE != 0)).collect();
            assert_eq!(c.descriptors(), &want[..]);
            expect_pos += u32::from(n);
            assert_eq!(dev.avail_position(), ((expect_pos % 5) as u16, (expect_pos / 5) % 2 == 0));
            assert_eq!(dev.pop_avail(), Ok(None));
            assert_eq!(drv.take_used(0), None);
            dev.push_used(&c, u32::from(round));
            assert_eq!(dev.used_position(), dev.avail_position());
            assert!(dev.publish_used());
            assert_eq!(drv.take_used(n), Some((round, u32::from(round))));
            assert!(!dev.publish_used());
        }
    }

    /// A device that writes more than a whole ring of used descriptors before it publishes
    /// (here two on a one-entry ring) can no longer tell which lap the driver's event offset
    /// and wrap counter meant, so it notifies; exactly a whole ring still goes by the event.
    /// Found by the `ops` fuzz target (regression `packed-publish-after-more-than-a-ring`).
    #[test]
    fn more_than_a_ring_before_publishing_notifies() {
        let layout = RingLayout::packed(1).unwrap();
        let l = lines_for(&layout);
        let mem = SharedMemory::new(&l);
        let mut dev = PackedDevice::new(cfg(layout, mem, RingFeatures::EVENT_IDX, &[])).unwrap();
        let mut drv = Drv::new(mem, layout);
        // Notify at position 0 of the first lap (wrap counter 1).
        drv.set_event(PackedEventFlags::Desc, 1 << 15);
        for round in 0..2u16 {
            drv.add(round, &[(1, 1, WRITE)]);
            let c = dev.pop_avail().unwrap().unwrap();
            dev.push_used(&c, 1);
            assert_eq!(drv.take_used(1), Some((round, 1)));
        }
        assert!(dev.publish_used(), "two used descriptors on a ring of one passed the event");
        // Then the third used descriptor (lap 3, wrap counter 1) against an event for the
        // next lap with wrap counter 0: one descriptor, not the one named, no notification.
        drv.set_event(PackedEventFlags::Desc, 0);
        drv.add(2, &[(1, 1, WRITE)]);
        let c = dev.pop_avail().unwrap().unwrap();
        dev.push_used(&c, 1);
        assert!(!dev.publish_used());
    }

    #[test]
    fn in_order_batch() {
        let layout = RingLayout::packed(5).unwrap();
        let l = lines_for(&layout);
        let mem = SharedMemory::new(&l);
        let mut dev = PackedDevice::new(cfg(layout, mem, RingFeatures::IN_ORDER, &[])).unwrap();
        let mut drv = Drv::new(mem, layout);
        drv.add(7, &[(1, 1, 0), (2, 2, WRITE)]);
        drv.add(8, &[(3, 3, WRITE)]);
        drv.add(9, &[(4, 4, 0), (5, 5, 0)]);
        let cs =
            [dev.pop_avail().unwrap().unwrap(), dev.pop_avail().unwrap().unwrap(), dev.pop_avail().unwrap().unwrap()];
        assert_eq!(dev.avail_position(), (0, false));
        dev.push_used_batch(&[], 1);
        assert!(!dev.publish_used());
        dev.push_used_batch(&cs, 6);
        assert_eq!(dev.used_position(), (0, false));
        assert!(dev.publish_used());
        assert_eq!(drv.take_used(5), Some((9, 6)));
        // Only the first position was written.
        assert_eq!(drv.take_used(0), None);
    }

    #[test]
    fn notification_suppression_for_used_buffers() {
        let layout = RingLayout::packed(5).unwrap();
        let l = lines_for(&layout);
        let mem = SharedMemory::new(&l);
        let mut dev = PackedDevice::new(cfg(layout, mem, RingFeatures::EVENT_IDX, &[])).unwrap();
        let mut drv = Drv::new(mem, layout);
        let one = |dev: &mut PackedDevice<'_>, drv: &mut Drv<'_>| {
            drv.add(0, &[(1, 1, WRITE)]);
            let c = dev.pop_avail().unwrap().unwrap();
            dev.push_used(&c, 1);
        };
        one(&mut dev, &mut drv);
        assert!(dev.publish_used(), "Enable");
        drv.set_event(PackedEventFlags::Disable, 0);
        one(&mut dev, &mut drv);
        assert!(!dev.publish_used(), "Disable");
        // Used position now 2 (wrap true). Event at position 3 of this lap.
        drv.set_event(PackedEventFlags::Desc, 3 | 0x8000);
        one(&mut dev, &mut drv); // [2, 3)
        assert!(!dev.publish_used());
        one(&mut dev, &mut drv); // [3, 4)
        assert!(dev.publish_used());
        // Across the wrap: [4, 5) and [0, 1) of the next lap in one publication.
        drv.set_event(PackedEventFlags::Desc, 0);
        one(&mut dev, &mut drv);
        one(&mut dev, &mut drv);
        assert_eq!(dev.used_position(), (1, false));
        assert!(dev.publish_used(), "event 0 of the new lap passed");
        // Event of the previous lap (position 4, wrap set): already behind.
        drv.set_event(PackedEventFlags::Desc, 4 | 0x8000);
        one(&mut dev, &mut drv);
        assert!(!dev.publish_used());
        // Event at the position just used in this lap.
        drv.set_event(PackedEventFlags::Desc, 2);
        one(&mut dev, &mut drv); // [2, 3)
        assert!(dev.publish_used());
        // Without EVENT_IDX, Desc is not valid: notify.
        let mut dev2 = PackedDevice::new(cfg(layout, mem, RingFeatures::empty(), &[])).unwrap();
        let mut c = AvailChain::new(0);
        c.ring_descs = 1;
        dev2.push_used(&c, 0);
        assert!(dev2.publish_used());
    }

    #[test]
    fn kick_suppression() {
        let layout = RingLayout::packed(3).unwrap();
        let l = lines_for(&layout);
        let mem = SharedMemory::new(&l);
        let mut dev = PackedDevice::new(cfg(layout, mem, RingFeatures::empty(), &[])).unwrap();
        let mut drv = Drv::new(mem, layout);
        dev.disable_kicks();
        assert_eq!(drv.device_event().1, PackedEventFlags::Disable as u16);
        assert!(!dev.enable_kicks());
        assert_eq!(drv.device_event().1, PackedEventFlags::Enable as u16);
        dev.disable_kicks();
        drv.add(1, &[(1, 1, 0)]);
        assert!(dev.enable_kicks());

        let mut dev = PackedDevice::new(cfg(layout, mem, RingFeatures::EVENT_IDX, &[])).unwrap();
        // This device sees the chain above too; consume it and two more to wrap.
        for id in 2..4 {
            drv.add(id, &[(1, 1, 0)]);
        }
        for _ in 0..3 {
            dev.pop_avail().unwrap().unwrap();
        }
        assert_eq!(dev.avail_position(), (0, false));
        assert!(!dev.enable_kicks());
        assert_eq!(drv.device_event(), (0, PackedEventFlags::Desc as u16));
        dev.disable_kicks();
        assert_eq!(drv.device_event().1, PackedEventFlags::Disable as u16);
        drv.add(4, &[(1, 1, 0)]);
        assert!(dev.enable_kicks());
        dev.pop_avail().unwrap().unwrap();
        assert!(!dev.enable_kicks());
        assert_eq!(drv.device_event(), (1, PackedEventFlags::Desc as u16));
    }

    #[test]
    fn raw_misbehaviour() {
        let layout = RingLayout::packed(5).unwrap();
        let l = lines_for(&layout);
        let mem = SharedMemory::new(&l);
        let mut dev = PackedDevice::new(cfg(layout, mem, RingFeatures::empty(), &[])).unwrap();
        let mut drv = Drv::new(mem, layout);
        dev.write_used_raw(5, 77, 1234, AVAIL | USED);
        assert_eq!(drv.take_used(1), Some((77, 1234)));
        assert_eq!(dev.used_position(), (0, true));
        dev.write_used_raw(1, 1, 1, 0);
        assert_eq!(drv.take_used(1), None);
    }

    #[test]
    fn indirect_table() {
        let layout = RingLayout::packed(5).unwrap();
        let l = lines_for(&layout);
        let mem = SharedMemory::new(&l);
        let tl = lines(2);
        let tmem = SharedMemory::new(&tl);
        let regions = [MemoryRegion { addr: 0x4000, mem: tmem }];
        let mut dev = PackedDevice::new(cfg(layout, mem, RingFeatures::INDIRECT_DESC, &regions)).unwrap();
        let mut drv = Drv::new(mem, layout);
        // NEXT inside the table is ignored; all 3 entries are the chain.
        write_packed_table_entry(&tmem, 16, 0xa0, 1, NEXT);
        write_packed_table_entry(&tmem, 32, 0xb0, 2, WRITE);
        write_packed_table_entry(&tmem, 48, 0xc0, 3, WRITE);
        drv.add(3, &[(0x4010, 48, INDIRECT)]);
        let c = dev.pop_avail().unwrap().unwrap();
        assert_eq!((c.id, c.ring_descs, c.indirect), (3, 1, true));
        assert_eq!(c.descriptors(), &[d(0xa0, 1, false), d(0xb0, 2, true), d(0xc0, 3, true)]);
        dev.push_used(&c, 5);
        assert!(dev.publish_used());
        assert_eq!(drv.take_used(1), Some((3, 5)));
    }

    fn write_packed_table_entry(t: &SharedMemory<'_>, at: usize, addr: u64, len: u32, flags: u16) {
        // SAFETY: offsets come from the layout (or the table window) and are aligned and in bounds.
        unsafe {
            t.write_u64(at + off::PACKED_DESC_ADDR, addr);
            t.write_u32(at + off::PACKED_DESC_LEN, len);
            t.write_u16(at + off::PACKED_DESC_ID, 0xdead);
            t.write_u16(at + off::PACKED_DESC_FLAGS, flags);
        }
    }

    /// Runs `setup` against a fresh size-`size` ring and pops.
    fn pop_with(
        features: RingFeatures,
        size: u16,
        setup: impl FnOnce(&mut Drv<'_>, &SharedMemory<'_>),
    ) -> Result<Option<AvailChain>, ModelError> {
        let layout = RingLayout::packed(size).unwrap();
        let l = lines_for(&layout);
        let mem = SharedMemory::new(&l);
        let tl = lines(MAX_CHAIN / 4 + 2);
        let tmem = SharedMemory::new(&tl);
        let regions = [MemoryRegion { addr: 0x8000, mem: tmem }];
        let mut dev = PackedDevice::new(cfg(layout, mem, features, &regions)).unwrap();
        let mut drv = Drv::new(mem, layout);
        setup(&mut drv, &tmem);
        let r = dev.pop_avail();
        if r.is_err() {
            assert_eq!(dev.avail_position(), (0, true));
            assert_eq!(dev.pop_avail(), r);
        }
        r
    }

    #[test]
    fn chain_errors() {
        let none = RingFeatures::empty();
        let ind = RingFeatures::INDIRECT_DESC;
        // Head available, second descriptor never written.
        assert_eq!(
            pop_with(none, 5, |drv, _| drv.write_at(0, true, 1, 1, 0, NEXT)),
            Err(ModelError::ChainIncomplete { position: 1 })
        );
        // Second descriptor available for the wrong lap.
        assert_eq!(
            pop_with(none, 5, |drv, _| {
                drv.write_at(1, false, 1, 1, 0, 0);
                drv.write_at(0, true, 1, 1, 0, NEXT);
            }),
            Err(ModelError::ChainIncomplete { position: 1 })
        );
        // A chain of more than the queue size: every descriptor continues.
        // (The head itself comes round again in the other lap, so the walk
        // ends at it as incomplete or too long; both are errors.)
        let r = pop_with(none, 3, |drv, _| {
            drv.write_at(1, true, 1, 1, 0, NEXT);
            drv.write_at(2, true, 1, 1, 0, NEXT);
            drv.write_at(0, true, 1, 1, 0, NEXT);
        });
        assert!(matches!(r, Err(ModelError::ChainTooLong)), "{r:?}");
        assert_eq!(pop_with(none, 5, |drv, _| drv.add(0, &[(1, 0, 0)])), Err(ModelError::ZeroLength));
        assert_eq!(
            pop_with(none, 5, |drv, _| drv.add(0, &[(1, 1, WRITE), (1, 1, 0)])),
            Err(ModelError::ReadableAfterWritable)
        );
        assert_eq!(
            pop_with(none, 5, |drv, _| drv.add(0, &[(1, u32::MAX, 0), (1, 1, WRITE)])),
            Err(ModelError::ChainTooManyBytes)
        );
        let long: Vec<(u64, u32, u16)> = (0..MAX_CHAIN as u64 + 1).map(|a| (a, 1, 0)).collect();
        assert_eq!(pop_with(none, 100, |drv, _| drv.add(0, &long)), Err(ModelError::ChainExceedsModel));
        let c = pop_with(none, 100, |drv, _| drv.add(0, &long[..MAX_CHAIN])).unwrap().unwrap();
        assert_eq!(c.ring_descs as usize, MAX_CHAIN);

        assert_eq!(
            pop_with(none, 5, |drv, _| drv.add(0, &[(0x8000, 16, INDIRECT)])),
            Err(ModelError::IndirectNotNegotiated)
        );
        assert_eq!(
            pop_with(ind, 5, |drv, _| drv.add(0, &[(0x8000, 16, INDIRECT), (1, 1, 0)])),
            Err(ModelError::IndirectWithNext)
        );
        assert_eq!(
            pop_with(ind, 5, |drv, _| drv.add(0, &[(1, 1, 0), (0x8000, 16, INDIRECT)])),
            Err(ModelError::IndirectInChain)
        );
        for len in [0u32, 15, 40, 16 * (MAX_CHAIN as u32 + 1)] {
            assert_eq!(
                pop_with(ind, 5, |drv, _| drv.add(0, &[(0x8000, len, INDIRECT)])),
                Err(ModelError::IndirectTableBadLen { len })
            );
        }
        assert_eq!(
            pop_with(ind, 5, |drv, _| drv.add(0, &[(0x100, 16, INDIRECT)])),
            Err(ModelError::IndirectTableUnmapped { addr: 0x100 })
        );
        assert_eq!(
            pop_with(ind, 5, |drv, _| drv.add(0, &[(0x8004, 16, INDIRECT)])),
            Err(ModelError::IndirectTableMisaligned { addr: 0x8004 })
        );
        assert_eq!(
            pop_with(ind, 5, |drv, t| {
                write_packed_table_entry(t, 0, 1, 1, 0);
                write_packed_table_entry(t, 16, 0x8000, 16, INDIRECT);
                drv.add(0, &[(0x8000, 32, INDIRECT)]);
            }),
            Err(ModelError::NestedIndirect)
        );
        assert_eq!(
            pop_with(ind, 5, |drv, t| {
                write_packed_table_entry(t, 0, 1, 1, WRITE);
                write_packed_table_entry(t, 16, 1, 1, 0);
                drv.add(0, &[(0x8000, 32, INDIRECT)]);
            }),
            Err(ModelError::ReadableAfterWritable)
        );
        assert_eq!(
            pop_with(ind, 5, |drv, t| {
                write_packed_table_entry(t, 0, 1, 0, 0);
                drv.add(0, &[(0x8000, 16, INDIRECT)]);
            }),
            Err(ModelError::ZeroLength)
        );
    }
}
