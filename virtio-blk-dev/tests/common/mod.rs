//! Shared by the integration tests: back-ends to start and the checks run against each.
#![allow(dead_code)]

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use transport_vhost_user::{VhostUserOptions, VhostUserTransport};
use virtio_blk_dev::{BlkDevice, BlkOptions, BlkQueue};

// The scenarios and checks shared with the VM tier.
#[allow(unused_imports)]
pub use virtio_blk_dev::suite::*;

pub type Dev = BlkDevice<VhostUserTransport>;
pub type Queue = BlkQueue<VhostUserTransport>;

pub const IMAGE_BYTES: u64 = 4 << 20;
pub const QSD: &str = "qemu-storage-daemon";

pub fn open(sock: &Path, options: BlkOptions) -> Dev {
    let t = VhostUserTransport::connect(sock, VhostUserOptions::default()).unwrap();
    BlkDevice::open(t, options).unwrap()
}

/// A raw image file in a temporary directory, with a socket path beside it.
pub struct Scratch {
    pub dir: tempfile::TempDir,
    pub image: PathBuf,
    pub sock: PathBuf,
}

impl Scratch {
    pub fn new() -> Scratch {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.raw");
        let sock = dir.path().join("vhost.sock");
        std::fs::File::create(&image).unwrap().set_len(IMAGE_BYTES).unwrap();
        Scratch { dir, image, sock }
    }
}

pub fn write_file(path: &Path, offset: u64, data: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(data, offset).unwrap();
    f.sync_all().unwrap();
}

/// `qemu-storage-daemon` exporting `image` over `sock`.
pub struct Qsd {
    pub child: Child,
}

impl Qsd {
    pub fn start(s: &Scratch, queues: u32, writable: bool) -> Qsd {
        // A daemon started earlier on this scratch directory may have left it.
        let _ = std::fs::remove_file(s.dir.path().join("qsd.pid"));
        let child = Command::new(QSD)
            .arg("--blockdev")
            .arg(format!("driver=file,node-name=disk,filename={}", s.image.display()))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=exp,node-name=disk,addr.type=unix,addr.path={},writable={},num-queues={queues}",
                s.sock.display(),
                if writable { "on" } else { "off" }
            ))
            // qsd writes its pid file after its exports listen and before it
            // accepts connections: the file's existence means "ready" (the
            // socket file alone appears between bind and listen).
            .arg("--pidfile")
            .arg(s.dir.path().join("qsd.pid"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run {QSD} ({e}): install the Debian package qemu-utils (apt-get install qemu-utils)")
            });
        let mut d = Qsd { child };
        let t = Instant::now();
        let pidfile = s.dir.path().join("qsd.pid");
        while !pidfile.exists() {
            if let Some(status) = d.child.try_wait().unwrap() {
                panic!("{QSD} exited early: {status}");
            }
            assert!(t.elapsed() < Duration::from_secs(10), "{QSD} did not get ready (pid file) within 10 s");
            std::thread::sleep(Duration::from_millis(10));
        }
        d
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        self.kill();
    }
}
