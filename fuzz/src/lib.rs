//! Shared pieces of the virtio-queue-core fuzz targets: the arbitrary queue
//! configuration, the memory a queue and its device model live in, a
//! format-agnostic wrapper over the two device models, and the reference
//! rules for what `add` must answer.

use arbitrary::{Arbitrary, Result, Unstructured};
use virtio_queue_core::device::{
    AvailChain, DescInfo, DeviceConfig, MemoryRegion, ModelError, PackedDevice, SplitDevice,
};
use virtio_queue_core::{
    Buffer, ChainFrame, DriverQueue, Error, IndirectTables, QueueConfig, RingFeatures, RingFormat, RingLayout,
    SharedLine, SharedMemory, Slot, Virtqueue,
};

/// Device address of the ring area.
pub const RING_IOVA: u64 = 0x1_0000;
/// Device address of the indirect tables.
pub const TABLE_IOVA: u64 = 0x100_0000;
/// Most buffers a generated chain has.
pub const MAX_BUFS: usize = 6;
/// The chain frame every queue gets: chain `id`'s 16-byte header at
/// `FRAME.iova + 64 id`, its 1-byte status 32 bytes further.
pub const FRAME: ChainFrame =
    ChainFrame { iova: 0x200_0000, stride: 64, header_len: 16, status_offset: 32, status_len: 1 };

/// A queue configuration.
#[derive(Clone, Copy, Debug)]
pub struct Cfg {
    pub packed: bool,
    pub size: u16,
    pub event_idx: bool,
    pub in_order: bool,
    /// Entries per indirect table when INDIRECT_DESC is negotiated.
    pub indirect: Option<u16>,
    /// Framed chains straight into the ring even where the tables would hold
    /// them (`set_framed_chains_indirect(false)`).
    pub framed_direct: bool,
}

impl<'a> Arbitrary<'a> for Cfg {
    fn arbitrary(u: &mut Unstructured<'a>) -> Result<Self> {
        let packed: bool = u.arbitrary()?;
        let size = if packed { u.int_in_range(1..=300u16)? } else { 1u16 << u.int_in_range(0..=8u32)? };
        let event_idx = u.arbitrary()?;
        let in_order = u.arbitrary()?;
        let indirect = if u.arbitrary()? { Some(u.int_in_range(1..=8u16)?) } else { None };
        let framed_direct = u.arbitrary()?;
        Ok(Cfg { packed, size, event_idx, in_order, indirect, framed_direct })
    }
}

impl Cfg {
    pub fn features(&self) -> RingFeatures {
        let mut f = RingFeatures::empty();
        f.set(RingFeatures::RING_PACKED, self.packed);
        f.set(RingFeatures::EVENT_IDX, self.event_idx);
        f.set(RingFeatures::IN_ORDER, self.in_order);
        f.set(RingFeatures::INDIRECT_DESC, self.indirect.is_some());
        f
    }

    pub fn layout(&self) -> RingLayout {
        let format = if self.packed { RingFormat::Packed } else { RingFormat::Split };
        RingLayout::new(format, self.size).expect("valid queue size")
    }
}

/// A buffer length: mostly small and nonzero, sometimes zero, sometimes anything.
#[derive(Arbitrary, Clone, Copy, Debug)]
pub enum LenSpec {
    Small(u8),
    Zero,
    Raw(u32),
}

impl LenSpec {
    pub fn get(self) -> u32 {
        match self {
            LenSpec::Small(v) => 1 + u32::from(v),
            LenSpec::Zero => 0,
            LenSpec::Raw(v) => v,
        }
    }
}

#[derive(Arbitrary, Clone, Copy, Debug)]
pub struct BufSpec {
    pub addr: u64,
    pub len: LenSpec,
}

/// A chain to add: readable then writable buffers, at most [`MAX_BUFS`] in all.
#[derive(Arbitrary, Clone, Debug)]
pub struct AddSpec {
    pub readable: Vec<BufSpec>,
    pub writable: Vec<BufSpec>,
}

impl AddSpec {
    pub fn buffers(&self) -> (Vec<Buffer>, Vec<Buffer>) {
        let r: Vec<Buffer> = self.readable.iter().take(MAX_BUFS).map(|b| Buffer::new(b.addr, b.len.get())).collect();
        let w: Vec<Buffer> =
            self.writable.iter().take(MAX_BUFS - r.len()).map(|b| Buffer::new(b.addr, b.len.get())).collect();
        (r, w)
    }
}

/// A framed chain to add (`add_framed`): one data buffer, device-writable or not.
#[derive(Arbitrary, Clone, Copy, Debug)]
pub struct FramedSpec {
    pub data: BufSpec,
    pub writable: bool,
}

impl FramedSpec {
    /// The data buffer, and the readable and writable buffers of the same
    /// chain for `add` on chain `id` (header, data, status as [`FRAME`] says).
    pub fn buffers(&self, id: u16) -> (Buffer, Vec<Buffer>, Vec<Buffer>) {
        let data = Buffer::new(self.data.addr, self.data.len.get());
        let header = Buffer::new(FRAME.iova + u64::from(FRAME.stride) * u64::from(id), FRAME.header_len);
        let status = Buffer::new(header.addr + u64::from(FRAME.status_offset), FRAME.status_len);
        if self.writable {
            (data, vec![header], vec![data, status])
        } else {
            (data, vec![header, data], vec![status])
        }
    }
}

/// The buffers a device must see for a chain of `readable` then `writable`.
pub fn expected_descs(readable: &[Buffer], writable: &[Buffer]) -> Vec<DescInfo> {
    readable
        .iter()
        .map(|b| DescInfo { addr: b.addr, len: b.len, writable: false })
        .chain(writable.iter().map(|b| DescInfo { addr: b.addr, len: b.len, writable: true }))
        .collect()
}

/// What `add` must do, from the chain and the driver's free resources alone:
/// `Ok((indirect, ring descriptors or positions taken))`, or every error that
/// applies (the API does not say which of several wins, so any of them is
/// accepted). `free_units` is free descriptors (split) or free ring positions
/// (packed); `in_flight` the chains added and not yet returned.
pub fn expected_add(
    cfg: &Cfg,
    readable: &[Buffer],
    writable: &[Buffer],
    free_units: u32,
    in_flight: u32,
) -> core::result::Result<(bool, u16), Vec<Error>> {
    let n = readable.len() + writable.len();
    if n == 0 {
        return Err(vec![Error::EmptyChain]);
    }
    let mut errs = Vec::new();
    if readable.iter().chain(writable).any(|b| b.len == 0) {
        errs.push(Error::ZeroLengthBuffer);
    }
    let total: u64 = readable.iter().chain(writable).map(|b| u64::from(b.len)).sum();
    if total > u64::from(u32::MAX) {
        errs.push(Error::ChainTooLong);
    }
    let qs = usize::from(cfg.size);
    let indirect = cfg.indirect.is_some_and(|e| n > 1 && n <= usize::from(e));
    let max = cfg.indirect.map_or(qs, |e| qs.max(usize::from(e)));
    let units = if indirect { 1 } else { n };
    if !indirect && n > qs {
        errs.push(Error::TooManyBuffers { buffers: n, max });
    } else if units as u32 > free_units || in_flight >= u32::from(cfg.size) {
        errs.push(Error::QueueFull);
    }
    if errs.is_empty() {
        Ok((indirect, units as u16))
    } else {
        Err(errs)
    }
}

/// What `add_framed` must do with the chain `readable` + `writable` (its
/// id's header, the data and its id's status): as [`expected_add`], except
/// that with `cfg.framed_direct` the chain goes straight into the ring while
/// three descriptors (positions) are free, tables or not.
pub fn expected_add_framed(
    cfg: &Cfg,
    readable: &[Buffer],
    writable: &[Buffer],
    free_units: u32,
    in_flight: u32,
) -> core::result::Result<(bool, u16), Vec<Error>> {
    let in_ring = Cfg { indirect: None, ..*cfg };
    let cfg = if cfg.framed_direct && free_units >= 3 { &in_ring } else { cfg };
    expected_add(cfg, readable, writable, free_units, in_flight)
}

/// Either device model.
pub enum Dev<'a> {
    Split(SplitDevice<'a>),
    Packed(PackedDevice<'a>),
}

impl Dev<'_> {
    pub fn pop_avail(&mut self) -> core::result::Result<Option<AvailChain>, ModelError> {
        match self {
            Dev::Split(d) => d.pop_avail(),
            Dev::Packed(d) => d.pop_avail(),
        }
    }
    pub fn push_used(&mut self, c: &AvailChain, len: u32) {
        match self {
            Dev::Split(d) => d.push_used(u32::from(c.id), len),
            Dev::Packed(d) => d.push_used(c, len),
        }
    }
    pub fn push_used_batch(&mut self, cs: &[AvailChain], len: u32) {
        match self {
            Dev::Split(d) => d.push_used_batch(cs, len),
            Dev::Packed(d) => d.push_used_batch(cs, len),
        }
    }
    pub fn publish_used(&mut self) -> bool {
        match self {
            Dev::Split(d) => d.publish_used(),
            Dev::Packed(d) => d.publish_used(),
        }
    }
    pub fn enable_kicks(&mut self) -> bool {
        match self {
            Dev::Split(d) => d.enable_kicks(),
            Dev::Packed(d) => d.enable_kicks(),
        }
    }
    pub fn disable_kicks(&mut self) {
        match self {
            Dev::Split(d) => d.disable_kicks(),
            Dev::Packed(d) => d.disable_kicks(),
        }
    }
}

/// Everything one run works on.
pub struct Parts<'a> {
    pub cfg: Cfg,
    pub layout: RingLayout,
    pub q: Virtqueue<'a, u32>,
    pub dev: Dev<'a>,
    pub ring: SharedMemory<'a>,
    /// The indirect tables (empty without INDIRECT_DESC).
    pub tables: SharedMemory<'a>,
}

impl Parts<'_> {
    /// Copies what a failed `add` must not change in device-visible memory.
    /// Packed: the whole ring and the tables (a refused chain is checked
    /// before anything is written, since a descriptor's flags make it
    /// available). Split: the available-ring header, `used_event` and the
    /// used ring; writes to free descriptors, free tables and the avail entry
    /// beyond `avail.idx` are invisible to the device and allowed.
    pub fn snapshot(&self) -> Vec<(usize, Vec<u8>)> {
        let read = |mem: &SharedMemory<'_>, off: usize, len: usize| {
            let mut b = vec![0u8; len];
            assert!(mem.read_bytes(off, &mut b));
            b
        };
        if self.cfg.packed {
            vec![(0, read(&self.ring, 0, self.ring.len())), (usize::MAX, read(&self.tables, 0, self.tables.len()))]
        } else {
            let l = &self.layout;
            let used_event = l.driver_offset() + 4 + 2 * usize::from(self.cfg.size);
            vec![
                (l.driver_offset(), read(&self.ring, l.driver_offset(), 4)),
                (used_event, read(&self.ring, used_event, 2)),
                (l.device_offset(), read(&self.ring, l.device_offset(), self.ring.len() - l.device_offset())),
            ]
        }
    }
}

/// Builds a queue of `cfg` and its device model over fresh memory and runs `f`.
pub fn with_queue<R>(cfg: Cfg, f: impl FnOnce(&mut Parts<'_>) -> R) -> R {
    let layout = cfg.layout();
    let ring_lines: Vec<SharedLine> = (0..layout.lines()).map(|_| SharedLine::new()).collect();
    let table_bytes = cfg.indirect.map_or(0, |e| IndirectTables::bytes_needed(cfg.size, e).expect("small tables"));
    let table_lines: Vec<SharedLine> = (0..table_bytes.div_ceil(64)).map(|_| SharedLine::new()).collect();
    let mut slots: Vec<Slot<u32>> = (0..cfg.size).map(|_| Slot::new()).collect();
    let ring = SharedMemory::new(&ring_lines);
    let tables = SharedMemory::new(&table_lines);
    let indirect = cfg.indirect.map(|e| IndirectTables::new(tables, TABLE_IOVA, e).expect("aligned table address"));
    let regions = [MemoryRegion { addr: TABLE_IOVA, mem: tables }];
    let features = cfg.features();
    let mut q = Virtqueue::new(
        QueueConfig { queue_size: cfg.size, ring, ring_iova: RING_IOVA, features, indirect },
        slots.as_mut_slice(),
    )
    .expect("valid queue configuration");
    q.set_chain_frame(FRAME).expect("the frame fits every queue size");
    if cfg.framed_direct {
        q.set_framed_chains_indirect(false).expect("the ring's layout needs no tables");
    }
    assert_eq!(q.layout(), layout);
    assert_eq!(q.queue_size(), cfg.size);
    let dcfg = DeviceConfig { layout, ring, features, memory: &regions };
    let dev = if cfg.packed {
        Dev::Packed(PackedDevice::new(dcfg).expect("packed device model"))
    } else {
        Dev::Split(SplitDevice::new(dcfg).expect("split device model"))
    };
    let mut parts = Parts { cfg, layout, q, dev, ring, tables };
    f(&mut parts)
}

/// Decodes a fuzz input as a queue configuration and at most 4096 operations
/// (fewer if the input ends or stops decoding), printed to stderr when
/// `VQ_FUZZ_DEBUG` is set. `None` if not even the configuration decodes.
pub fn decode<'a, Op: Arbitrary<'a> + core::fmt::Debug>(data: &'a [u8]) -> Option<(Cfg, Vec<Op>)> {
    let mut u = Unstructured::new(data);
    let cfg = Cfg::arbitrary(&mut u).ok()?;
    let mut ops = Vec::new();
    while !u.is_empty() && ops.len() < 4096 {
        match Op::arbitrary(&mut u) {
            Ok(op) => ops.push(op),
            Err(_) => break,
        }
    }
    if std::env::var_os("VQ_FUZZ_DEBUG").is_some() {
        eprintln!("{cfg:?}\n{ops:#?}");
    }
    Some((cfg, ops))
}
