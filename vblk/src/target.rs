//! Opening the device a command drives: a vhost-user back-end, a vhost-vdpa device, a PCI
//! device bound to vfio-pci, or the embedded server started in this process on a temporary
//! unix socket.

use std::ops::{Deref, DerefMut};
use std::path::PathBuf;
use std::time::Duration;

use tempfile::TempDir;
use transport_pci::{PciOptions, PciTransport};
use transport_vdpa::VdpaTransport;
use transport_vhost_user::{VhostUserOptions, VhostUserTransport};
use vblk::server::{Server, ServerHandle, ServerOptions, Storage, DEFAULT_QUEUE_SIZE};
use virtio_blk_dev::{BlkDevice, BlkOptions, BlkQueue};
use virtio_queue_core::RingFeatures;

use crate::cli::TargetArgs;
use crate::stats::human_bytes;
use crate::transport::AnyTransport;

/// The embedded server and the directory holding its socket. The handle is dropped first:
/// it stops the server and removes the socket; then the directory goes.
struct Embedded {
    _server: ServerHandle,
    _dir: TempDir,
}

/// An open device, and the server behind it when it is the embedded one.
pub struct Target {
    /// The device, negotiated, with its queues set up. Dropped before the server.
    pub dev: BlkDevice<AnyTransport>,
    /// What the device is, for humans and for JSON (`embedded-ram`, `vhost-user:PATH` ...).
    pub name: String,
    _embedded: Option<Embedded>,
}

/// Stops logging: the command's outcome is known. What the embedded server or the transport
/// logs while the front-end goes away is noise that would break the one-line error contract:
/// a dropped `BlkQueue` unregisters its ring memory without stopping the device's queue first,
/// and a server worker still looking at that ring says "error accessing guest memory".
fn teardown() {
    log::set_max_level(log::LevelFilter::Off);
}

impl Drop for Target {
    fn drop(&mut self) {
        teardown();
    }
}

/// A queue taken from the target. Drop it only when the command is done (it ends logging,
/// see [`teardown`]).
pub struct Queue(BlkQueue<AnyTransport>);

impl Drop for Queue {
    fn drop(&mut self) {
        teardown();
    }
}

impl Deref for Queue {
    type Target = BlkQueue<AnyTransport>;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl DerefMut for Queue {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Target {
    /// Takes queue `index`.
    pub fn take_queue(&mut self, index: u16) -> Result<Queue, String> {
        self.dev.take_queue(index).map(Queue).map_err(|e| e.to_string())
    }

    /// Takes every queue.
    pub fn queues(&mut self) -> Vec<Queue> {
        self.dev.queues().into_iter().map(Queue).collect()
    }
}

impl TargetArgs {
    /// The queue size to negotiate: `--queue-size`, else the default raised to fit `depth`
    /// requests of three descriptors (direct; with indirect tables a request needs one, and
    /// the device may offer less than asked).
    pub fn queue_size_for(&self, depth: u16) -> u16 {
        self.queue_size.unwrap_or_else(|| {
            let need = (u32::from(depth) * 3).next_power_of_two().clamp(u32::from(DEFAULT_QUEUE_SIZE), 32768);
            need as u16
        })
    }

    fn blk_options(&self, queue_size: u16) -> BlkOptions {
        BlkOptions {
            num_queues: self.queues,
            queue_size,
            packed: !self.split,
            event_idx: !self.no_event_idx,
            indirect: !self.no_indirect,
            in_order: !self.no_in_order,
            ..BlkOptions::default()
        }
    }
}

/// Opens the target of `args`. `ram_size` is the embedded RAM disk's size; `queue_size` the
/// largest queue size to negotiate (and to offer, for the embedded server).
pub fn open(args: &TargetArgs, ram_size: u64, queue_size: u16) -> Result<Target, String> {
    let options = args.blk_options(queue_size);
    let vu_options = VhostUserOptions { max_queue_size: queue_size.max(1024), ..VhostUserOptions::default() };
    let (dev, name, embedded) = match (&args.vhost_user, &args.vdpa, &args.pci) {
        (_, Some(node), _) => {
            let t = VdpaTransport::open(node).map_err(|e| e.to_string())?;
            let dev = BlkDevice::open(AnyTransport::Vdpa(t), options)
                .map_err(|e| format!("cannot open {}: {e}", node.display()))?;
            (dev, format!("vdpa:{}", node.display()), None)
        }
        (_, _, Some(address)) => {
            let t = PciTransport::open(address, PciOptions::default()).map_err(|e| e.to_string())?;
            let dev = BlkDevice::open(AnyTransport::Pci(Box::new(t)), options)
                .map_err(|e| format!("cannot open {address}: {e}"))?;
            (dev, format!("pci:{address}"), None)
        }
        (Some(path), _, _) => {
            let t = VhostUserTransport::connect(path, vu_options).map_err(|e| e.to_string())?;
            let dev = BlkDevice::open(AnyTransport::VhostUser(t), options)
                .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
            (dev, format!("vhost-user:{}", path.display()), None)
        }
        (None, None, None) => {
            let dir = tempfile::Builder::new()
                .prefix("vblk-")
                .tempdir()
                .map_err(|e| format!("cannot create a directory for the embedded server's socket: {e}"))?;
            let sock: PathBuf = dir.path().join("vblk.sock");
            crate::signals::cleanup_on_signal(&sock, dir.path());
            let (storage, name) = match &args.image {
                Some(p) => (Storage::Image(p.clone()), format!("embedded-image:{}", p.display())),
                None => (
                    Storage::Ram { size: ram_size },
                    format!("embedded-ram:{}", human_bytes(ram_size).replace(' ', "")),
                ),
            };
            let server_options = ServerOptions {
                storage,
                queues: args.queues,
                queue_size,
                read_only: false,
                packed: args.packed,
                poll: Duration::from_micros(args.server_poll_us),
                ..ServerOptions::default()
            };
            let server = Server::start(&sock, server_options).map_err(|e| format!("embedded server: {e}"))?;
            let t = VhostUserTransport::connect(&sock, vu_options)
                .map_err(|e| format!("cannot connect to the embedded server: {e}"))?;
            let dev = BlkDevice::open(AnyTransport::VhostUser(t), options)
                .map_err(|e| format!("cannot open the embedded server's device: {e}"))?;
            (dev, name, Some(Embedded { _server: server, _dir: dir }))
        }
    };
    // Built before any further check, so that an error drops the device before the server.
    let target = Target { dev, name, _embedded: embedded };
    if args.packed && !target.dev.ring_features().contains(RingFeatures::RING_PACKED) {
        return Err(format!(
            "{} does not offer packed rings (VIRTIO_F_RING_PACKED), asked for by --packed",
            target.name
        ));
    }
    Ok(target)
}
