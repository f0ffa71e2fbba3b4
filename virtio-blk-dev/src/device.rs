//! Opening a virtio-blk device: negotiation, configuration, queue set-up.

use virtio_queue_core::RingFeatures;
use virtio_transport_api::{driver_ok, negotiate, read_config_bytes, Cause, Error, Step, Transport, VirtioFeatures};
use zerocopy::IntoBytes;

use crate::buf::DmaBuf;
use crate::config::{BlkConfig, BlkFeatures, Topology};
use crate::error::{BlkError, Result};
use crate::queue::{BlkQueue, Graveyard, Limits};

/// The virtio device ID of a block device.
pub const VIRTIO_ID_BLOCK: u32 = 2;

/// What [`BlkDevice::open`] asks for. Every feature is taken only if the
/// device offers it; these switches can refuse it even then.
#[derive(Clone, Debug)]
pub struct BlkOptions {
    /// Request queues wanted (the device may offer fewer; at least 1).
    pub num_queues: u16,
    /// Largest queue size wanted (lowered to the device's maximum, and to a
    /// power of two for split rings).
    pub queue_size: u16,
    /// Accept VIRTIO_F_RING_PACKED.
    pub packed: bool,
    /// Accept VIRTIO_F_EVENT_IDX.
    pub event_idx: bool,
    /// Accept VIRTIO_F_INDIRECT_DESC.
    pub indirect: bool,
    /// Accept VIRTIO_F_IN_ORDER.
    pub in_order: bool,
    /// Device-specific features never to accept, even when offered.
    pub refuse: BlkFeatures,
    /// Most data segments per request the driver prepares for (indirect
    /// table size); lowered further by the device's `seg_max`.
    pub max_segments: u16,
    /// Bytes of the per-queue bounce buffer of [`BlkQueue::read_at`] and
    /// [`BlkQueue::write_at`] (larger transfers are split).
    pub bounce_size: usize,
    /// How long the blocking calls ([`BlkQueue::read_at`], [`BlkQueue::write_at`],
    /// [`BlkQueue::flush`], [`BlkQueue::get_id`]) wait for their request.
    /// A device that does not complete it in time is treated as gone: every
    /// request in flight fails and the queue refuses new ones. `None`: no limit.
    pub io_timeout: Option<std::time::Duration>,
}

impl Default for BlkOptions {
    fn default() -> Self {
        BlkOptions {
            num_queues: 1,
            queue_size: 256,
            packed: true,
            event_idx: true,
            indirect: true,
            in_order: true,
            refuse: BlkFeatures::empty(),
            max_segments: 64,
            bounce_size: 128 * 1024,
            io_timeout: Some(std::time::Duration::from_secs(30)),
        }
    }
}

/// A virtio-blk device on transport `T`, with its queues set up and
/// DRIVER_OK set. Hand each [`BlkQueue`] to its own thread.
pub struct BlkDevice<T: Transport> {
    // Queues not taken are dropped before the transport.
    queues: Vec<Option<BlkQueue<T>>>,
    transport: T,
    features: u64,
    config: BlkConfig,
    /// Memory of dropped queues, freed after the transport: the device may
    /// use a ring until it is reset. Only held, for its drop order.
    #[expect(dead_code, reason = "held so that it is dropped after the transport")]
    graveyard: Graveyard,
}

impl<T: Transport> std::fmt::Debug for BlkDevice<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlkDevice")
            .field("transport", &self.transport.name())
            .field("features", &format_args!("{:#x}", self.features))
            .field("config", &self.config)
            .field("queues", &self.queues.len())
            .finish()
    }
}

fn invalid(t: &impl Transport, step: Step, msg: String) -> BlkError {
    BlkError::Transport(Error::new(t.name(), step, Cause::InvalidArgument(msg)))
}

/// How many bytes of the configuration space the negotiated features make
/// valid (virtio 1.2 §5.2.4): a field exists only when its feature does, and
/// real back-ends refuse reads past the end of their structure
/// (qemu-storage-daemon's vhost-user-blk answers a 64-byte GET_CONFIG with an
/// empty reply, having 60 bytes).
fn config_len(blk: BlkFeatures) -> usize {
    if blk.contains(BlkFeatures::SECURE_ERASE) {
        core::mem::offset_of!(BlkConfig, secure_erase_sector_alignment) + 4
    } else if blk.intersects(BlkFeatures::DISCARD | BlkFeatures::WRITE_ZEROES) {
        // Through `write_zeroes_may_unmap` and its padding, as devices lay it out.
        core::mem::offset_of!(BlkConfig, max_secure_erase_sectors)
    } else if blk.contains(BlkFeatures::MQ) {
        core::mem::offset_of!(BlkConfig, num_queues) + 2
    } else if blk.contains(BlkFeatures::CONFIG_WCE) {
        core::mem::offset_of!(BlkConfig, writeback) + 1
    } else if blk.contains(BlkFeatures::TOPOLOGY) {
        core::mem::offset_of!(BlkConfig, opt_io_size) + 4
    } else {
        core::mem::offset_of!(BlkConfig, blk_size) + 4
    }
}

/// Reads the part of the configuration the negotiated features define (the
/// rest stays zero), retrying on a generation change.
fn read_blk_config<T: Transport>(t: &mut T, blk: BlkFeatures) -> Result<BlkConfig> {
    let mut config = BlkConfig::default();
    let len = config_len(blk);
    let Some(prefix) = config.as_mut_bytes().get_mut(..len) else {
        return Err(invalid(t, Step::Config, format!("config length {len}")));
    };
    read_config_bytes(t, 0, prefix)?;
    Ok(config)
}

impl<T: Transport> BlkDevice<T> {
    /// Negotiates features (VERSION_1 required; the virtio-blk and ring
    /// features this driver knows, as offered and allowed by `options`),
    /// reads the configuration, sets up `min(options.num_queues, offered)`
    /// queues and sets DRIVER_OK.
    pub fn open(mut transport: T, options: BlkOptions) -> Result<Self> {
        if transport.device_id() != VIRTIO_ID_BLOCK {
            let id = transport.device_id();
            return Err(invalid(&transport, Step::Connect, format!("device id {id} is not a block device (2)")));
        }
        let mut supported = (BlkFeatures::all() & !options.refuse).bits();
        for (on, bit) in [
            (options.packed, VirtioFeatures::RING_PACKED),
            (options.event_idx, VirtioFeatures::EVENT_IDX),
            (options.indirect, VirtioFeatures::INDIRECT_DESC),
            (options.in_order, VirtioFeatures::IN_ORDER),
        ] {
            if on {
                supported |= bit.bits();
            }
        }
        let features = negotiate(&mut transport, supported, 0)?;
        let blk = BlkFeatures::from_bits_truncate(features);
        let config = read_blk_config(&mut transport, blk)?;

        let offered_queues = if blk.contains(BlkFeatures::MQ) { config.num_queues.get().max(1) } else { 1 };
        let n = options.num_queues.max(1).min(offered_queues).min(transport.max_queues().max(1));

        let ring = VirtioFeatures::ring_features_of(features);
        let block_size = if blk.contains(BlkFeatures::BLK_SIZE) { config.blk_size.get() } else { 512 };
        if block_size < 512 || !block_size.is_power_of_two() {
            return Err(invalid(&transport, Step::Config, format!("unusable logical block size {block_size}")));
        }
        let mut limits = Limits {
            capacity_bytes: config.capacity.get().saturating_mul(512),
            block_size,
            max_segments: options.max_segments.max(1) as usize,
            size_max: if blk.contains(BlkFeatures::SIZE_MAX) && config.size_max.get() != 0 {
                u64::from(config.size_max.get())
            } else {
                u64::from(u32::MAX)
            },
            features: blk,
            max_discard_sectors: config.max_discard_sectors.get(),
            max_write_zeroes_sectors: config.max_write_zeroes_sectors.get(),
            max_secure_erase_sectors: config.max_secure_erase_sectors.get(),
        };
        if blk.contains(BlkFeatures::SEG_MAX) && config.seg_max.get() != 0 {
            limits.max_segments = limits.max_segments.min(config.seg_max.get() as usize);
        }

        let graveyard = Graveyard::default();
        let mut queues = Vec::with_capacity(n as usize);
        for i in 0..n {
            let q = BlkQueue::new(&mut transport, i, ring, &limits, &options, &graveyard)?;
            queues.push(Some(q));
        }
        driver_ok(&mut transport)?;
        Ok(BlkDevice { transport, features, config, queues, graveyard })
    }

    /// The negotiated feature word.
    pub fn negotiated_features(&self) -> u64 {
        self.features
    }

    /// The negotiated virtio-blk features.
    pub fn blk_features(&self) -> BlkFeatures {
        BlkFeatures::from_bits_truncate(self.features)
    }

    /// The negotiated ring features (packed, event-idx, indirect, in-order).
    pub fn ring_features(&self) -> RingFeatures {
        VirtioFeatures::ring_features_of(self.features)
    }

    /// The configuration read at open.
    pub fn config(&self) -> &BlkConfig {
        &self.config
    }

    /// Capacity in bytes.
    pub fn capacity(&self) -> u64 {
        self.config.capacity.get().saturating_mul(512)
    }

    /// Logical block size in bytes (512 unless VIRTIO_BLK_F_BLK_SIZE says otherwise).
    pub fn block_size(&self) -> u32 {
        if self.blk_features().contains(BlkFeatures::BLK_SIZE) {
            self.config.blk_size.get()
        } else {
            512
        }
    }

    /// The largest data segment (one buffer) a request may carry: `size_max` when
    /// VIRTIO_BLK_F_SIZE_MAX was negotiated with a non-zero value, else `u32::MAX`. Larger
    /// transfers take several segments (`submit_readv`/`submit_writev`) or several requests
    /// (the blocking layer splits on its own).
    pub fn max_segment_size(&self) -> u64 {
        match self.config.size_max.get() {
            n if n != 0 && self.blk_features().contains(BlkFeatures::SIZE_MAX) => u64::from(n),
            _ => u64::from(u32::MAX),
        }
    }

    /// The topology, if VIRTIO_BLK_F_TOPOLOGY was negotiated.
    pub fn topology(&self) -> Option<Topology> {
        self.blk_features().contains(BlkFeatures::TOPOLOGY).then(|| Topology {
            physical_block_exp: self.config.physical_block_exp,
            alignment_offset: self.config.alignment_offset,
            min_io_size: self.config.min_io_size.get(),
            opt_io_size: self.config.opt_io_size.get(),
        })
    }

    /// Whether the device is read-only (VIRTIO_BLK_F_RO).
    pub fn read_only(&self) -> bool {
        self.blk_features().contains(BlkFeatures::RO)
    }

    /// Whether the device caches writes (write-back): the `writeback` field
    /// with VIRTIO_BLK_F_CONFIG_WCE, else whether VIRTIO_BLK_F_FLUSH was
    /// negotiated (§5.2.5.1).
    pub fn write_cache(&self) -> bool {
        let f = self.blk_features();
        if f.contains(BlkFeatures::CONFIG_WCE) {
            self.config.writeback != 0
        } else {
            f.contains(BlkFeatures::FLUSH)
        }
    }

    /// Number of request queues set up.
    pub fn num_queues(&self) -> u16 {
        self.queues.len() as u16
    }

    /// Number of request queues the device offers: `num_queues` from the config with MQ
    /// negotiated, else 1. [`BlkDevice::open`] sets up `min(BlkOptions::num_queues, this)`
    /// (and no more than the transport handles).
    pub fn offered_queues(&self) -> u16 {
        if self.blk_features().contains(BlkFeatures::MQ) {
            self.config.num_queues.get().max(1)
        } else {
            1
        }
    }

    /// Takes queue `index` (each can be taken once) to use on some thread.
    pub fn take_queue(&mut self, index: u16) -> Result<BlkQueue<T>> {
        self.queues.get_mut(index as usize).and_then(Option::take).ok_or(BlkError::NoSuchQueue(index))
    }

    /// Takes every queue not taken yet, in index order.
    pub fn queues(&mut self) -> Vec<BlkQueue<T>> {
        self.queues.iter_mut().filter_map(Option::take).collect()
    }

    /// Allocates `count` device-visible buffers of `len` bytes each, in one region.
    pub fn alloc_bufs(&self, len: usize, count: usize) -> Result<Vec<DmaBuf>> {
        let stride = len.checked_add(15).map(|l| l & !15).unwrap_or(usize::MAX);
        let total = stride.saturating_mul(count).max(1);
        let region = self.transport.alloc_dma(total)?;
        DmaBuf::split(region, len, count).ok_or_else(|| {
            invalid(&self.transport, Step::Memory, format!("cannot split {total} bytes into {count} × {len}"))
        })
    }

    /// Allocates one device-visible buffer of `len` bytes.
    pub fn alloc_buf(&self, len: usize) -> Result<DmaBuf> {
        let mut v = self.alloc_bufs(len, 1)?;
        v.pop().ok_or_else(|| invalid(&self.transport, Step::Memory, "empty buffer".into()))
    }

    /// The transport, for transport-specific calls.
    pub fn transport(&self) -> &T {
        &self.transport
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_stop_where_the_negotiated_fields_end() {
        // Offsets from virtio 1.2 §5.2.4 (struct virtio_blk_config).
        assert_eq!(config_len(BlkFeatures::empty()), 24);
        assert_eq!(config_len(BlkFeatures::TOPOLOGY), 32);
        assert_eq!(config_len(BlkFeatures::CONFIG_WCE | BlkFeatures::TOPOLOGY), 33);
        assert_eq!(config_len(BlkFeatures::MQ | BlkFeatures::FLUSH), 36);
        // qemu-storage-daemon's 60-byte structure: DISCARD and WRITE_ZEROES.
        assert_eq!(config_len(BlkFeatures::MQ | BlkFeatures::DISCARD), 60);
        assert_eq!(config_len(BlkFeatures::WRITE_ZEROES), 60);
        assert_eq!(config_len(BlkFeatures::SECURE_ERASE | BlkFeatures::DISCARD), 72);
    }
}
