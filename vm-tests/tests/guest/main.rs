//! Tests that run inside the `cargo xtask vm-test` guest (see the crate docs for the
//! environment contract). The top-level module a test lives in decides which phase runs it:
//! `pci`, `vdpa_sim`, `vduse` (VA-mode devices), `vdpa_sim_pa` (simulator with `use_va=0`),
//! `pci_no_access_platform` (negative-control boot).
//!
//! One file per transport: `pci.rs` and `pci_no_access_platform.rs` (VFIO), `vdpa.rs`
//! (vhost-vdpa; its macro makes one module per vhost-vdpa device kind); `cli.rs` runs the
//! `vblk` binary on each device.

mod cli;
mod pci_common;

mod pci;
mod pci_no_access_platform;

#[macro_use]
mod vdpa;

// vdpa_sim_blk has one virtqueue; qemu-storage-daemon's VDUSE export is started with
// num-queues=2 (xtask/src/vm/guest.rs).
vhost_vdpa_tests!(vdpa_sim, DeviceKind::VdpaSim, queues = 1);
vhost_vdpa_tests!(vdpa_sim_pa, DeviceKind::VdpaSimPa, queues = 1);
vhost_vdpa_tests!(vduse, DeviceKind::Vduse, queues = 2);
