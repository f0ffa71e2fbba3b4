//! virtio-pci over VFIO transport (being built: issue 4).
