//! PCI configuration space: identity (vendor, device id) and the virtio vendor capabilities
//! (virtio 1.2 §4.1.4).
//!
//! Everything here works on a copy of the 256-byte standard configuration space (read once
//! through VFIO's config region), so it is plain, testable parsing. The bytes come from the
//! device and are not trusted: the capability walk is bounded and loop-safe, and every
//! structure must lie inside a BAR the device really has.

use std::fmt;

/// Bytes of the standard (conventional PCI) configuration space.
pub const CONFIG_SPACE_LEN: usize = 256;

/// The vendor id of virtio devices (Red Hat, Inc.).
pub const VIRTIO_PCI_VENDOR_ID: u16 = 0x1af4;
/// First PCI device id of a modern virtio device: 0x1040 + virtio device id.
pub const VIRTIO_PCI_MODERN_DEVICE_ID_BASE: u16 = 0x1040;
/// Last PCI device id of a modern virtio device (virtio device ids go up to 63 here).
pub const VIRTIO_PCI_MODERN_DEVICE_ID_LAST: u16 = 0x107f;
/// Transitional device ids (0x1000..=0x103f): the virtio id is the subsystem device id.
pub const VIRTIO_PCI_TRANSITIONAL_DEVICE_IDS: std::ops::RangeInclusive<u16> = 0x1000..=0x103f;

/// `PCI_STATUS` register offset and its "capability list present" bit.
const PCI_STATUS: usize = 0x06;
const PCI_STATUS_CAP_LIST: u16 = 0x10;
/// `PCI_CAPABILITY_LIST`: offset of the first capability pointer.
const PCI_CAPABILITY_LIST: usize = 0x34;
/// `PCI_SUBSYSTEM_ID`.
const PCI_SUBSYSTEM_ID: usize = 0x2e;
/// `PCI_CAP_ID_VNDR`: vendor-specific capability, which virtio uses.
const PCI_CAP_ID_VNDR: u8 = 0x09;
/// Capabilities live after the 64-byte header.
const FIRST_CAP_OFFSET: usize = 0x40;
/// Most capabilities a 256-byte space can hold (each at least 4 bytes, dword-aligned, after
/// the header): a bound on the walk even before the loop check.
const MAX_CAPS: usize = (CONFIG_SPACE_LEN - FIRST_CAP_OFFSET) / 4;

/// `struct virtio_pci_cap` is 16 bytes; `struct virtio_pci_notify_cap` adds a 32-bit
/// `notify_off_multiplier`.
const VIRTIO_PCI_CAP_LEN: usize = 16;
const VIRTIO_PCI_NOTIFY_CAP_LEN: usize = 20;

/// `cfg_type` values of `struct virtio_pci_cap`.
pub const VIRTIO_PCI_CAP_COMMON_CFG: u8 = 1;
/// Notifications.
pub const VIRTIO_PCI_CAP_NOTIFY_CFG: u8 = 2;
/// ISR status.
pub const VIRTIO_PCI_CAP_ISR_CFG: u8 = 3;
/// Device-specific configuration.
pub const VIRTIO_PCI_CAP_DEVICE_CFG: u8 = 4;

/// Bytes of `struct virtio_pci_common_cfg` up to and including `queue_device` (virtio 1.0);
/// a smaller common configuration window is refused.
pub const COMMON_CFG_MIN_LEN: u32 = 56;

/// Number of BARs of a type-0 header.
pub const NUM_BARS: usize = 6;

/// Why configuration space was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CapError {
    /// Vendor id is not 0x1af4.
    NotVirtio {
        /// The vendor id found.
        vendor: u16,
        /// The device id found.
        device: u16,
    },
    /// Vendor 0x1af4 but a device id outside the virtio ranges.
    UnknownDeviceId(u16),
    /// No modern virtio capabilities (no common configuration structure): a legacy-only device.
    LegacyOnly {
        /// The PCI device id.
        device: u16,
    },
    /// A required structure is missing.
    Missing(&'static str),
    /// The capability list is malformed (pointer out of range, a loop, too many entries).
    BadList(String),
    /// A virtio capability is malformed or lies outside its BAR.
    BadCap(String),
}

impl fmt::Display for CapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CapError::NotVirtio { vendor, device } => {
                write!(f, "PCI device {vendor:04x}:{device:04x} is not a virtio device (vendor 1af4)")
            }
            CapError::UnknownDeviceId(d) => write!(
                f,
                "PCI device id {d:#06x} is neither a modern (0x1040-0x107f) nor a transitional (0x1000-0x103f) virtio id"
            ),
            CapError::LegacyOnly { device } => write!(
                f,
                "legacy-only virtio device (PCI id 1af4:{device:04x}): it has no virtio 1.0 vendor capabilities \
                 (no common configuration structure), and this transport drives modern devices only"
            ),
            CapError::Missing(what) => write!(f, "the device has no {what} capability"),
            CapError::BadList(s) => write!(f, "malformed PCI capability list: {s}"),
            CapError::BadCap(s) => write!(f, "malformed virtio capability: {s}"),
        }
    }
}

impl std::error::Error for CapError {}

/// The identity of a virtio PCI function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Identity {
    /// PCI device id.
    pub pci_device_id: u16,
    /// Virtio device id (2 = block).
    pub virtio_id: u32,
    /// Whether the PCI id is a transitional one (0x1000-0x103f).
    pub transitional: bool,
}

fn u16_at(cfg: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(cfg.get(off..off + 2)?.try_into().ok()?))
}

fn u32_at(cfg: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(cfg.get(off..off + 4)?.try_into().ok()?))
}

/// Checks vendor and device id; returns the virtio device id.
pub fn identify(cfg: &[u8]) -> Result<Identity, CapError> {
    let short = || CapError::BadList("configuration space shorter than its header".into());
    let vendor = u16_at(cfg, 0).ok_or_else(short)?;
    let device = u16_at(cfg, 2).ok_or_else(short)?;
    if vendor != VIRTIO_PCI_VENDOR_ID {
        return Err(CapError::NotVirtio { vendor, device });
    }
    if (VIRTIO_PCI_MODERN_DEVICE_ID_BASE..=VIRTIO_PCI_MODERN_DEVICE_ID_LAST).contains(&device) {
        return Ok(Identity {
            pci_device_id: device,
            virtio_id: u32::from(device - VIRTIO_PCI_MODERN_DEVICE_ID_BASE),
            transitional: false,
        });
    }
    if VIRTIO_PCI_TRANSITIONAL_DEVICE_IDS.contains(&device) {
        // virtio 1.2 §4.1.2.1: a transitional device's subsystem device id is its virtio id.
        let sub = u16_at(cfg, PCI_SUBSYSTEM_ID).ok_or_else(short)?;
        return Ok(Identity { pci_device_id: device, virtio_id: u32::from(sub), transitional: true });
    }
    Err(CapError::UnknownDeviceId(device))
}

/// Where one virtio structure lives: BAR index, offset and length inside it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    /// BAR index (0..6).
    pub bar: u8,
    /// Offset of the structure inside the BAR.
    pub offset: u32,
    /// Length of the structure.
    pub length: u32,
}

impl Window {
    /// One past the last byte, inside the BAR.
    pub fn end(&self) -> u64 {
        u64::from(self.offset) + u64::from(self.length)
    }

    fn overlaps(&self, other: &Window) -> bool {
        self.bar == other.bar && u64::from(self.offset) < other.end() && u64::from(other.offset) < self.end()
    }
}

/// The virtio structures of a modern device, validated against the BAR sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioCaps {
    /// `struct virtio_pci_common_cfg`.
    pub common: Window,
    /// The notification area.
    pub notify: Window,
    /// `notify_off_multiplier` of the notification capability.
    pub notify_off_multiplier: u32,
    /// The ISR status byte.
    pub isr: Window,
    /// The device-specific configuration, if the device has one.
    pub device: Option<Window>,
}

impl VirtioCaps {
    /// The BARs the structures use.
    pub fn bars(&self) -> impl Iterator<Item = u8> {
        let mut used = [false; NUM_BARS];
        for w in [Some(self.common), Some(self.notify), Some(self.isr), self.device].into_iter().flatten() {
            if let Some(u) = used.get_mut(usize::from(w.bar)) {
                *u = true;
            }
        }
        (0..NUM_BARS as u8).filter(move |&b| used[usize::from(b)])
    }

    /// Offset inside the notification BAR of queue notify register `queue_notify_off`
    /// (virtio 1.2 §4.1.4.4: `cap.offset + queue_notify_off * notify_off_multiplier`),
    /// checked to leave room for a 16-bit write inside the notification window and to be
    /// 2-byte aligned.
    pub fn notify_offset(&self, queue_notify_off: u16) -> Result<u64, CapError> {
        let rel = u64::from(queue_notify_off) * u64::from(self.notify_off_multiplier);
        if rel + 2 > u64::from(self.notify.length) {
            return Err(CapError::BadCap(format!(
                "queue_notify_off {queue_notify_off} * notify_off_multiplier {} lies outside the {}-byte notification window",
                self.notify_off_multiplier, self.notify.length
            )));
        }
        let off = u64::from(self.notify.offset) + rel;
        if off % 2 != 0 {
            return Err(CapError::BadCap(format!("notify address at BAR offset {off:#x} is not 2-byte aligned")));
        }
        Ok(off)
    }
}

/// Offsets of every capability in the list, in order: bounded, loop-safe.
pub fn capability_offsets(cfg: &[u8]) -> Result<Vec<usize>, CapError> {
    if cfg.len() < CONFIG_SPACE_LEN {
        return Err(CapError::BadList(format!("{} bytes of configuration space, need {CONFIG_SPACE_LEN}", cfg.len())));
    }
    let status = u16_at(cfg, PCI_STATUS).unwrap_or(0);
    if status & PCI_STATUS_CAP_LIST == 0 {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    let mut seen = [false; CONFIG_SPACE_LEN];
    // The low two bits of the pointers are reserved (PCI 3.0 §6.7).
    let mut ptr = usize::from(cfg[PCI_CAPABILITY_LIST] & !3);
    while ptr != 0 {
        if !(FIRST_CAP_OFFSET..=CONFIG_SPACE_LEN - 4).contains(&ptr) {
            return Err(CapError::BadList(format!("capability pointer {ptr:#x} outside 0x40..0xfc")));
        }
        if std::mem::replace(&mut seen[ptr], true) {
            return Err(CapError::BadList(format!("the list loops back to offset {ptr:#x}")));
        }
        if out.len() >= MAX_CAPS {
            return Err(CapError::BadList(format!("more than {MAX_CAPS} capabilities")));
        }
        out.push(ptr);
        ptr = usize::from(cfg[ptr + 1] & !3);
    }
    Ok(out)
}

/// Parses the virtio vendor capabilities of `cfg` (256 bytes of configuration space) and
/// checks each structure against `bar_sizes` (bytes; 0 for a BAR the device lacks).
///
/// The first capability of each type that this driver can use is taken (virtio 1.2
/// §4.1.4.1: later ones are alternatives); capabilities naming a reserved BAR index are
/// skipped, as the specification asks. Every chosen structure must be long enough, lie
/// inside its BAR, and not overlap another one.
pub fn parse_virtio_caps(cfg: &[u8], bar_sizes: &[u64; NUM_BARS]) -> Result<VirtioCaps, CapError> {
    let mut common = None;
    let mut notify: Option<(Window, u32)> = None;
    let mut isr = None;
    let mut device = None;
    let mut any_virtio = false;
    for off in capability_offsets(cfg)? {
        if cfg[off] != PCI_CAP_ID_VNDR {
            continue;
        }
        let cap_len = usize::from(cfg[off + 2]);
        if cap_len < VIRTIO_PCI_CAP_LEN {
            // Not a virtio_pci_cap (another vendor's, or garbage): not ours to judge.
            continue;
        }
        if off + cap_len > CONFIG_SPACE_LEN {
            return Err(CapError::BadCap(format!(
                "capability at {off:#x} claims {cap_len} bytes, past the end of configuration space"
            )));
        }
        let cfg_type = cfg[off + 3];
        let bar = cfg[off + 4];
        if usize::from(bar) >= NUM_BARS {
            // Reserved BAR values: the driver MUST ignore the capability.
            continue;
        }
        let (offset, length) = match (u32_at(cfg, off + 8), u32_at(cfg, off + 12)) {
            (Some(o), Some(l)) => (o, l),
            _ => continue,
        };
        let w = Window { bar, offset, length };
        let slot_taken = match cfg_type {
            VIRTIO_PCI_CAP_COMMON_CFG => common.is_some(),
            VIRTIO_PCI_CAP_NOTIFY_CFG => notify.is_some(),
            VIRTIO_PCI_CAP_ISR_CFG => isr.is_some(),
            VIRTIO_PCI_CAP_DEVICE_CFG => device.is_some(),
            _ => continue,
        };
        any_virtio = true;
        if slot_taken {
            continue;
        }
        let what = cap_name(cfg_type);
        let bar_size = bar_sizes[usize::from(bar)];
        if bar_size == 0 {
            return Err(CapError::BadCap(format!(
                "{what} at {off:#x} is in BAR {bar}, which the device does not have"
            )));
        }
        if w.end() > bar_size {
            return Err(CapError::BadCap(format!(
                "{what} at {off:#x}: {length:#x} bytes at offset {offset:#x} run past the end of BAR {bar} ({bar_size:#x} bytes)"
            )));
        }
        match cfg_type {
            VIRTIO_PCI_CAP_COMMON_CFG => {
                if length < COMMON_CFG_MIN_LEN {
                    return Err(CapError::BadCap(format!(
                        "common configuration of {length} bytes (at least {COMMON_CFG_MIN_LEN})"
                    )));
                }
                if offset % 8 != 0 {
                    return Err(CapError::BadCap(format!("common configuration at unaligned offset {offset:#x}")));
                }
                common = Some(w);
            }
            VIRTIO_PCI_CAP_NOTIFY_CFG => {
                if cap_len < VIRTIO_PCI_NOTIFY_CAP_LEN {
                    return Err(CapError::BadCap(format!(
                        "notification capability of {cap_len} bytes has no notify_off_multiplier"
                    )));
                }
                let mult = u32_at(cfg, off + VIRTIO_PCI_CAP_LEN).unwrap_or(0);
                if length < 2 {
                    return Err(CapError::BadCap(format!("notification window of {length} bytes")));
                }
                if mult != 0 && (mult % 2 != 0 || !mult.is_power_of_two()) {
                    // §4.1.4.4: "an even power of 2, or 0".
                    return Err(CapError::BadCap(format!(
                        "notify_off_multiplier {mult} is neither 0 nor an even power of two"
                    )));
                }
                notify = Some((w, mult));
            }
            VIRTIO_PCI_CAP_ISR_CFG => {
                if length < 1 {
                    return Err(CapError::BadCap("empty ISR window".into()));
                }
                isr = Some(w);
            }
            _ => {
                if offset % 4 != 0 {
                    return Err(CapError::BadCap(format!("device configuration at unaligned offset {offset:#x}")));
                }
                device = Some(w);
            }
        }
    }
    let Some(common) = common else {
        let device_id = u16_at(cfg, 2).unwrap_or(0);
        if !any_virtio {
            return Err(CapError::LegacyOnly { device: device_id });
        }
        return Err(CapError::Missing("common configuration"));
    };
    let (notify, notify_off_multiplier) = notify.ok_or(CapError::Missing("notification"))?;
    let isr = isr.ok_or(CapError::Missing("ISR status"))?;
    let caps = VirtioCaps { common, notify, notify_off_multiplier, isr, device };
    let named = [
        ("common configuration", Some(common)),
        ("notification", Some(notify)),
        ("ISR", Some(isr)),
        ("device configuration", device),
    ];
    for (i, (a_name, a)) in named.iter().enumerate() {
        for (b_name, b) in named.iter().skip(i + 1) {
            if let (Some(a), Some(b)) = (a, b) {
                if a.overlaps(b) {
                    return Err(CapError::BadCap(format!(
                        "the {a_name} and {b_name} windows overlap in BAR {}",
                        a.bar
                    )));
                }
            }
        }
    }
    Ok(caps)
}

fn cap_name(cfg_type: u8) -> &'static str {
    match cfg_type {
        VIRTIO_PCI_CAP_COMMON_CFG => "common configuration",
        VIRTIO_PCI_CAP_NOTIFY_CFG => "notification",
        VIRTIO_PCI_CAP_ISR_CFG => "ISR",
        _ => "device configuration",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake configuration space in the shape QEMU's virtio-blk-pci has: caps in BAR 4.
    struct Space {
        bytes: [u8; CONFIG_SPACE_LEN],
        next: usize,
        last: Option<usize>,
    }

    impl Space {
        fn new(vendor: u16, device: u16) -> Self {
            let mut bytes = [0u8; CONFIG_SPACE_LEN];
            bytes[0..2].copy_from_slice(&vendor.to_le_bytes());
            bytes[2..4].copy_from_slice(&device.to_le_bytes());
            Space { bytes, next: 0x40, last: None }
        }

        fn raw_cap(&mut self, id: u8, body: &[u8]) -> usize {
            let at = self.next;
            self.bytes[at] = id;
            self.bytes[at + 1] = 0;
            self.bytes[at + 2..at + 2 + body.len()].copy_from_slice(body);
            match self.last {
                None => self.bytes[PCI_CAPABILITY_LIST] = at as u8,
                Some(l) => self.bytes[l + 1] = at as u8,
            }
            self.bytes[PCI_STATUS] |= PCI_STATUS_CAP_LIST as u8;
            self.last = Some(at);
            self.next = (at + 2 + body.len()).next_multiple_of(4);
            at
        }

        fn virtio_cap(&mut self, cfg_type: u8, bar: u8, offset: u32, length: u32, mult: Option<u32>) -> usize {
            let mut body = vec![0u8; if mult.is_some() { 18 } else { 14 }];
            body[0] = body.len() as u8 + 2;
            body[1] = cfg_type;
            body[2] = bar;
            body[6..10].copy_from_slice(&offset.to_le_bytes());
            body[10..14].copy_from_slice(&length.to_le_bytes());
            if let Some(m) = mult {
                body[14..18].copy_from_slice(&m.to_le_bytes());
            }
            self.raw_cap(PCI_CAP_ID_VNDR, &body)
        }

        fn qemu_blk() -> Self {
            let mut s = Space::new(0x1af4, 0x1042);
            s.raw_cap(0x11, &[0x02, 0x00, 0x01, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00]); // MSI-X
            s.virtio_cap(VIRTIO_PCI_CAP_COMMON_CFG, 4, 0x0, 0x1000, None);
            s.virtio_cap(VIRTIO_PCI_CAP_ISR_CFG, 4, 0x1000, 0x1000, None);
            s.virtio_cap(VIRTIO_PCI_CAP_DEVICE_CFG, 4, 0x2000, 0x1000, None);
            s.virtio_cap(VIRTIO_PCI_CAP_NOTIFY_CFG, 4, 0x3000, 0x1000, Some(4));
            s
        }
    }

    const BARS: [u64; NUM_BARS] = [0, 0x1000, 0, 0, 0x4000, 0];

    #[test]
    fn qemu_layout_parses() {
        let s = Space::qemu_blk();
        assert_eq!(identify(&s.bytes).unwrap(), Identity { pci_device_id: 0x1042, virtio_id: 2, transitional: false });
        let c = parse_virtio_caps(&s.bytes, &BARS).unwrap();
        assert_eq!(c.common, Window { bar: 4, offset: 0, length: 0x1000 });
        assert_eq!(c.notify, Window { bar: 4, offset: 0x3000, length: 0x1000 });
        assert_eq!(c.notify_off_multiplier, 4);
        assert_eq!(c.isr.offset, 0x1000);
        assert_eq!(c.device, Some(Window { bar: 4, offset: 0x2000, length: 0x1000 }));
        assert_eq!(c.bars().collect::<Vec<_>>(), [4]);
    }

    #[test]
    fn notify_multiplier_places_each_queue() {
        let c = parse_virtio_caps(&Space::qemu_blk().bytes, &BARS).unwrap();
        assert_eq!(c.notify_offset(0).unwrap(), 0x3000);
        assert_eq!(c.notify_offset(1).unwrap(), 0x3004);
        assert_eq!(c.notify_offset(1023).unwrap(), 0x3000 + 4092);
        assert!(matches!(c.notify_offset(1024), Err(CapError::BadCap(_))), "0x1000 + 2 does not fit");
        // A multiplier of 0: every queue shares one register.
        let mut s = Space::new(0x1af4, 0x1042);
        s.virtio_cap(VIRTIO_PCI_CAP_COMMON_CFG, 4, 0, 0x100, None);
        s.virtio_cap(VIRTIO_PCI_CAP_ISR_CFG, 4, 0x100, 4, None);
        s.virtio_cap(VIRTIO_PCI_CAP_NOTIFY_CFG, 4, 0x200, 2, Some(0));
        let c = parse_virtio_caps(&s.bytes, &BARS).unwrap();
        assert_eq!(c.notify_offset(7).unwrap(), 0x200);
        assert_eq!(c.device, None);
    }

    #[test]
    fn odd_or_non_power_of_two_multiplier_is_refused() {
        for m in [1, 3, 6, 12] {
            let mut s = Space::new(0x1af4, 0x1042);
            s.virtio_cap(VIRTIO_PCI_CAP_COMMON_CFG, 4, 0, 0x100, None);
            s.virtio_cap(VIRTIO_PCI_CAP_ISR_CFG, 4, 0x100, 4, None);
            s.virtio_cap(VIRTIO_PCI_CAP_NOTIFY_CFG, 4, 0x200, 0x100, Some(m));
            let e = parse_virtio_caps(&s.bytes, &BARS).unwrap_err();
            assert!(e.to_string().contains("notify_off_multiplier"), "{m}: {e}");
        }
        // A notification capability too short to hold the multiplier.
        let mut s = Space::new(0x1af4, 0x1042);
        s.virtio_cap(VIRTIO_PCI_CAP_COMMON_CFG, 4, 0, 0x100, None);
        s.virtio_cap(VIRTIO_PCI_CAP_NOTIFY_CFG, 4, 0x200, 0x100, None);
        assert!(parse_virtio_caps(&s.bytes, &BARS).unwrap_err().to_string().contains("no notify_off_multiplier"));
    }

    #[test]
    fn legacy_only_device_is_named_as_such() {
        let mut s = Space::new(0x1af4, 0x1001);
        s.bytes[PCI_SUBSYSTEM_ID] = 2;
        s.raw_cap(0x11, &[0; 10]);
        let id = identify(&s.bytes).unwrap();
        assert_eq!(id, Identity { pci_device_id: 0x1001, virtio_id: 2, transitional: true });
        let e = parse_virtio_caps(&s.bytes, &BARS).unwrap_err();
        assert_eq!(e, CapError::LegacyOnly { device: 0x1001 });
        assert!(e.to_string().contains("legacy-only"), "{e}");
        // No capability list at all.
        let s = Space::new(0x1af4, 0x1001);
        assert_eq!(parse_virtio_caps(&s.bytes, &BARS).unwrap_err(), CapError::LegacyOnly { device: 0x1001 });
    }

    #[test]
    fn transitional_with_modern_caps_is_accepted() {
        let mut s = Space::qemu_blk();
        s.bytes[2..4].copy_from_slice(&0x1001u16.to_le_bytes());
        s.bytes[PCI_SUBSYSTEM_ID] = 2;
        assert_eq!(identify(&s.bytes).unwrap().virtio_id, 2);
        assert!(parse_virtio_caps(&s.bytes, &BARS).is_ok());
    }

    #[test]
    fn wrong_vendor_and_device_ids_are_refused() {
        assert_eq!(
            identify(&Space::new(0x8086, 0x1042).bytes).unwrap_err(),
            CapError::NotVirtio { vendor: 0x8086, device: 0x1042 }
        );
        assert_eq!(identify(&Space::new(0x1af4, 0x1100).bytes).unwrap_err(), CapError::UnknownDeviceId(0x1100));
        assert_eq!(identify(&Space::new(0x1af4, 0x107f).bytes).unwrap().virtio_id, 63);
        assert!(identify(&[0u8; 2]).is_err(), "a truncated header is an error, not a panic");
    }

    #[test]
    fn loops_in_the_list_are_refused() {
        let mut s = Space::qemu_blk();
        let last = s.last.unwrap();
        s.bytes[last + 1] = 0x40; // back to the first
        let e = parse_virtio_caps(&s.bytes, &BARS).unwrap_err();
        assert!(matches!(&e, CapError::BadList(m) if m.contains("loops")), "{e}");
        // A capability that points at itself.
        let mut s = Space::new(0x1af4, 0x1042);
        let at = s.raw_cap(0x05, &[0, 0]);
        s.bytes[at + 1] = at as u8;
        assert!(matches!(capability_offsets(&s.bytes), Err(CapError::BadList(_))));
    }

    #[test]
    fn pointers_into_the_header_or_the_end_are_refused() {
        for bad in [0x10u8, 0x3c, 0xfe] {
            let mut s = Space::qemu_blk();
            s.bytes[PCI_CAPABILITY_LIST] = bad;
            let r = capability_offsets(&s.bytes);
            if bad & !3 == 0xfc {
                // 0xfe & !3 = 0xfc: a legal place for the last capability (points to 0 next).
                assert!(r.is_ok());
            } else {
                assert!(matches!(r, Err(CapError::BadList(_))), "{bad:#x}: {r:?}");
            }
        }
        assert!(matches!(capability_offsets(&[0u8; 64]), Err(CapError::BadList(_))));
    }

    #[test]
    fn every_walk_of_arbitrary_bytes_terminates() {
        // A deterministic generator: arbitrary configuration spaces never panic or hang.
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..2000 {
            let mut bytes = [0u8; CONFIG_SPACE_LEN];
            for b in bytes.iter_mut() {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                *b = seed as u8;
            }
            bytes[0..2].copy_from_slice(&0x1af4u16.to_le_bytes());
            let _ = identify(&bytes);
            if let Ok(offsets) = capability_offsets(&bytes) {
                assert!(offsets.len() <= MAX_CAPS);
            }
            if let Ok(c) = parse_virtio_caps(&bytes, &[u64::MAX / 2; NUM_BARS]) {
                assert!(c.common.length >= COMMON_CFG_MIN_LEN);
            }
        }
    }

    #[test]
    fn structures_outside_their_bar_are_refused() {
        // Past the end of BAR 4.
        let mut s = Space::new(0x1af4, 0x1042);
        s.virtio_cap(VIRTIO_PCI_CAP_COMMON_CFG, 4, 0x3f00, 0x200, None);
        let e = parse_virtio_caps(&s.bytes, &BARS).unwrap_err();
        assert!(e.to_string().contains("past the end of BAR 4"), "{e}");
        // Offset + length overflowing 32 bits.
        let mut s = Space::new(0x1af4, 0x1042);
        s.virtio_cap(VIRTIO_PCI_CAP_COMMON_CFG, 4, 0xffff_ff00, 0x200, None);
        // With a huge BAR the window itself is fine (no 32-bit wrap): only the notification
        // structure is missing.
        assert_eq!(parse_virtio_caps(&s.bytes, &[u64::MAX; NUM_BARS]).unwrap_err(), CapError::Missing("notification"));
        assert!(parse_virtio_caps(&s.bytes, &BARS).is_err());
        // A BAR the device does not have.
        let mut s = Space::new(0x1af4, 0x1042);
        s.virtio_cap(VIRTIO_PCI_CAP_COMMON_CFG, 2, 0, 0x100, None);
        assert!(parse_virtio_caps(&s.bytes, &BARS).unwrap_err().to_string().contains("does not have"));
        // A reserved BAR index is ignored, so the common structure is missing.
        let mut s = Space::new(0x1af4, 0x1042);
        s.virtio_cap(VIRTIO_PCI_CAP_COMMON_CFG, 7, 0, 0x100, None);
        s.virtio_cap(VIRTIO_PCI_CAP_ISR_CFG, 4, 0x100, 4, None);
        assert_eq!(parse_virtio_caps(&s.bytes, &BARS).unwrap_err(), CapError::Missing("common configuration"));
        // A capability running past the end of configuration space.
        let mut s = Space::new(0x1af4, 0x1042);
        s.next = 0xf8;
        s.raw_cap(PCI_CAP_ID_VNDR, &[16, VIRTIO_PCI_CAP_COMMON_CFG, 4, 0, 0, 0]);
        assert!(parse_virtio_caps(&s.bytes, &BARS).unwrap_err().to_string().contains("past the end of configuration"));
    }

    #[test]
    fn overlapping_structures_are_refused() {
        let mut s = Space::new(0x1af4, 0x1042);
        s.virtio_cap(VIRTIO_PCI_CAP_COMMON_CFG, 4, 0, 0x1000, None);
        s.virtio_cap(VIRTIO_PCI_CAP_ISR_CFG, 4, 0x1000, 0x1000, None);
        s.virtio_cap(VIRTIO_PCI_CAP_NOTIFY_CFG, 4, 0x0ffe, 0x100, Some(4));
        let e = parse_virtio_caps(&s.bytes, &BARS).unwrap_err();
        assert!(e.to_string().contains("overlap"), "{e}");
        // The same offsets in different BARs do not overlap.
        let mut s = Space::new(0x1af4, 0x1042);
        s.virtio_cap(VIRTIO_PCI_CAP_COMMON_CFG, 4, 0, 0x1000, None);
        s.virtio_cap(VIRTIO_PCI_CAP_ISR_CFG, 1, 0, 4, None);
        s.virtio_cap(VIRTIO_PCI_CAP_NOTIFY_CFG, 1, 0x100, 0x100, Some(2));
        let c = parse_virtio_caps(&s.bytes, &BARS).unwrap();
        assert_eq!(c.bars().collect::<Vec<_>>(), [1, 4]);
    }

    #[test]
    fn short_or_missing_structures_are_refused() {
        let mut s = Space::new(0x1af4, 0x1042);
        s.virtio_cap(VIRTIO_PCI_CAP_COMMON_CFG, 4, 0, 40, None);
        assert!(parse_virtio_caps(&s.bytes, &BARS).unwrap_err().to_string().contains("at least 56"));
        let mut s = Space::new(0x1af4, 0x1042);
        s.virtio_cap(VIRTIO_PCI_CAP_COMMON_CFG, 4, 0, 0x100, None);
        s.virtio_cap(VIRTIO_PCI_CAP_ISR_CFG, 4, 0x100, 4, None);
        assert_eq!(parse_virtio_caps(&s.bytes, &BARS).unwrap_err(), CapError::Missing("notification"));
        let mut s = Space::new(0x1af4, 0x1042);
        s.virtio_cap(VIRTIO_PCI_CAP_COMMON_CFG, 4, 0, 0x100, None);
        s.virtio_cap(VIRTIO_PCI_CAP_NOTIFY_CFG, 4, 0x200, 0x100, Some(4));
        assert_eq!(parse_virtio_caps(&s.bytes, &BARS).unwrap_err(), CapError::Missing("ISR status"));
    }

    #[test]
    fn the_first_capability_of_a_type_wins() {
        let mut s = Space::qemu_blk();
        // A second, broken common cfg after the good one is an alternative, not used.
        s.virtio_cap(VIRTIO_PCI_CAP_COMMON_CFG, 4, 0x3f00, 0x10_0000, None);
        assert_eq!(parse_virtio_caps(&s.bytes, &BARS).unwrap().common.offset, 0);
    }
}
