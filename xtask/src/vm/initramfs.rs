//! The guest's initramfs: busybox, the kernel modules in dependency order (decompressed, since
//! busybox `insmod` cannot read `.ko.xz`), `vdpa` and `qemu-storage-daemon` with their shared
//! libraries, the static test binary, and an `/init` generated from the phase table in
//! [`super::guest`]. Written directly in the kernel's `newc` cpio format, uncompressed (the
//! kernel unpacks it without a decompressor, which is faster under TCG than gunzip).

use std::collections::BTreeMap;
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::assets::{path_str, KernelAssets};
use super::find_program;
use crate::Result;

/// Top-level modules the guest loads; `modprobe --show-depends` adds their dependencies.
/// `virtio_vdpa` is deliberately absent: without it, new vdpa devices bind to `vhost_vdpa`.
/// `virtio_blk` binds the PCI disk first, so the kernel negotiates its features (which
/// `/init` records) before the device moves to vfio-pci.
pub const GUEST_MODULES: &[&str] =
    &["virtio_blk", "vfio-pci", "vfio_iommu_type1", "vhost_vdpa", "vduse", "vdpa_sim_blk"];

/// Modules that `/init` loads per phase (with `use_va=`), not at boot.
pub const SIM_MODULES: &[&str] = &["vdpa_sim", "vdpa_sim_blk"];

/// One entry of the archive.
#[derive(Debug, PartialEq, Eq)]
pub enum Entry {
    /// A directory.
    Dir,
    /// A regular file with its mode bits and contents.
    File {
        /// Permission bits.
        mode: u32,
        /// Contents.
        data: Vec<u8>,
    },
    /// A symbolic link to the given target.
    Symlink(String),
}

/// An initramfs being assembled: archive path (no leading `/`) to entry.
#[derive(Default)]
pub struct Initramfs {
    entries: BTreeMap<String, Entry>,
}

impl Initramfs {
    /// Adds `path` and every parent directory of it.
    fn add(&mut self, path: &str, entry: Entry) {
        let path = path.trim_start_matches('/');
        let mut parent = String::new();
        for part in path.split('/').collect::<Vec<_>>().iter().rev().skip(1).rev() {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(part);
            self.entries.entry(parent.clone()).or_insert(Entry::Dir);
        }
        self.entries.insert(path.to_string(), entry);
    }

    /// Adds an empty directory.
    pub fn dir(&mut self, path: &str) {
        self.add(path, Entry::Dir);
    }

    /// Adds a file with the given contents and mode.
    pub fn file(&mut self, path: &str, mode: u32, data: Vec<u8>) {
        self.add(path, Entry::File { mode, data });
    }

    /// Adds a symlink.
    pub fn symlink(&mut self, path: &str, target: &str) {
        self.add(path, Entry::Symlink(target.to_string()));
    }

    /// Copies a host file (following symlinks) to `path`, keeping its permission bits.
    pub fn copy(&mut self, path: &str, host: &Path) -> Result {
        let data = fs::read(host).map_err(|e| format!("cannot read {}: {e}", host.display()))?;
        let mode = fs::metadata(host).map_err(|e| format!("{}: {e}", host.display()))?.permissions().mode() & 0o7777;
        self.file(path, mode, data);
        Ok(())
    }

    /// Copies a dynamically linked host program to the same path, with every library `ldd`
    /// lists for it (at the paths `ldd` prints, so the dynamic loader finds them).
    pub fn copy_with_libraries(&mut self, program: &Path) -> Result {
        self.copy(&path_str(program), program)?;
        let out = Command::new("ldd")
            .arg(program)
            .stderr(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run ldd (package libc-bin): {e}"))?;
        if !out.status.success() {
            return Err(format!("ldd {} failed ({})", program.display(), out.status));
        }
        for lib in parse_ldd(&String::from_utf8_lossy(&out.stdout)) {
            if !self.entries.contains_key(lib.trim_start_matches('/')) {
                self.copy(&lib, Path::new(&lib))?;
            }
        }
        Ok(())
    }

    /// Total bytes of file contents.
    pub fn payload_bytes(&self) -> usize {
        self.entries.values().map(|e| if let Entry::File { data, .. } = e { data.len() } else { 0 }).sum()
    }

    /// The archive in `newc` format, ending with the `TRAILER!!!` record.
    pub fn to_cpio(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.payload_bytes() + self.entries.len() * 256);
        for (ino, (path, entry)) in self.entries.iter().enumerate() {
            let (mode, data): (u32, &[u8]) = match entry {
                Entry::Dir => (0o040_755, &[]),
                Entry::File { mode, data } => (0o100_000 | mode, data),
                Entry::Symlink(target) => (0o120_777, target.as_bytes()),
            };
            cpio_record(&mut out, ino as u32 + 1, mode, if matches!(entry, Entry::Dir) { 2 } else { 1 }, path, data);
        }
        cpio_record(&mut out, 0, 0, 1, "TRAILER!!!", &[]);
        out
    }
}

/// Appends one `newc` record: 110-byte ASCII header, name + NUL padded to 4, data padded to 4.
pub fn cpio_record(out: &mut Vec<u8>, ino: u32, mode: u32, nlink: u32, name: &str, data: &[u8]) {
    let fields = [ino, mode, 0, 0, nlink, 0, data.len() as u32, 0, 0, 0, 0, name.len() as u32 + 1, 0];
    out.extend_from_slice(b"070701");
    for field in fields {
        let _ = write!(out, "{field:08X}");
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
    out.extend_from_slice(data);
    pad4(out);
}

/// Pads `out` with NULs to a multiple of 4 bytes.
fn pad4(out: &mut Vec<u8>) {
    while out.len() % 4 != 0 {
        out.push(0);
    }
}

/// The library paths in `ldd` output (`name => /path (addr)` and `/path (addr)` lines; the
/// vDSO, which has no file, is left out).
pub fn parse_ldd(text: &str) -> Vec<String> {
    let mut libs = Vec::new();
    for line in text.lines() {
        let candidate = match line.split_once("=>") {
            Some((_, right)) => right.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(path) = candidate.filter(|p| p.starts_with('/')) {
            if !libs.iter().any(|l| l == path) {
                libs.push(path.to_string());
            }
        }
    }
    libs
}

/// The module files in load order from `modprobe --show-depends` output (`insmod <path>
/// [params]` lines; `builtin <name>` lines are already in the kernel), without repeats.
pub fn parse_show_depends(text: &str) -> Vec<PathBuf> {
    let mut modules: Vec<PathBuf> = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if words.next() == Some("insmod") {
            if let Some(path) = words.next() {
                let path = PathBuf::from(path);
                if !modules.contains(&path) {
                    modules.push(path);
                }
            }
        }
    }
    modules
}

/// The module name of a `.ko` / `.ko.xz` file (`vfio-pci.ko.xz` -> `vfio-pci`).
pub fn module_name(path: &Path) -> String {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let name = name.strip_suffix(".xz").or_else(|| name.strip_suffix(".zst")).unwrap_or(name);
    name.strip_suffix(".ko").unwrap_or(name).to_string()
}

/// Whether `module` is one of [`SIM_MODULES`] (dashes and underscores are the same).
pub fn is_sim_module(module: &str) -> bool {
    let normal = module.replace('-', "_");
    SIM_MODULES.contains(&normal.as_str())
}

/// The guest modules in dependency order, resolved by kmod against the extracted tree.
pub fn module_order(assets: &KernelAssets) -> Result<Vec<PathBuf>> {
    let modprobe = find_program("modprobe").ok_or("modprobe not found (package kmod)")?;
    let mut cmd = Command::new(&modprobe);
    // `-a`: without it, every name after the first would be taken as a module parameter.
    cmd.arg("-a").arg("-d").arg(assets.kernel_root()).arg("-S").arg(&assets.kver).arg("--show-depends");
    cmd.args(GUEST_MODULES);
    let out = cmd.output().map_err(|e| format!("cannot run {}: {e}", modprobe.display()))?;
    if !out.status.success() {
        return Err(format!(
            "modprobe --show-depends failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let order = parse_show_depends(&String::from_utf8_lossy(&out.stdout));
    for wanted in GUEST_MODULES {
        if !order.iter().any(|p| module_name(p).replace('-', "_") == wanted.replace('-', "_")) {
            return Err(format!("module {wanted} is not in kernel {} (modprobe listed {order:?})", assets.kver));
        }
    }
    Ok(order)
}

/// Reads a module file, decompressing `.ko.xz` with `xz`.
fn module_bytes(path: &Path) -> Result<Vec<u8>> {
    if path.extension().and_then(|e| e.to_str()) == Some("xz") {
        let out = Command::new("xz")
            .arg("-dc")
            .arg(path)
            .output()
            .map_err(|e| format!("cannot run xz (package xz-utils): {e}"))?;
        if !out.status.success() {
            return Err(format!("xz -dc {} failed ({})", path.display(), out.status));
        }
        Ok(out.stdout)
    } else {
        fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
    }
}

/// Whether an ELF file has no program interpreter (is statically linked).
pub fn elf_is_static(bytes: &[u8]) -> Result<bool> {
    let get = |at: usize, len: usize| bytes.get(at..at + len).ok_or_else(|| "truncated ELF header".to_string());
    if get(0, 4)? != b"\x7fELF" || get(4, 1)? != [2] {
        return Err("not a 64-bit ELF file".into());
    }
    let u16_at = |at: usize| get(at, 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let phoff = u64::from_le_bytes(get(0x20, 8)?.try_into().map_err(|_| "bad ELF header")?) as usize;
    let phentsize = u16_at(0x36)? as usize;
    let phnum = u16_at(0x38)? as usize;
    for i in 0..phnum {
        let p_type = get(phoff + i * phentsize, 4)?;
        if u32::from_le_bytes([p_type[0], p_type[1], p_type[2], p_type[3]]) == 3 {
            return Ok(false); // PT_INTERP
        }
    }
    Ok(true)
}

/// Checks that `path` is a static ELF executable, naming `what` in the error.
pub fn require_static(path: &Path, what: &str) -> Result {
    let bytes = fs::read(path).map_err(|e| format!("cannot read {what} {}: {e}", path.display()))?;
    match elf_is_static(&bytes) {
        Ok(true) => Ok(()),
        Ok(false) => Err(format!("{what} {} is dynamically linked; the guest has no libc for it", path.display())),
        Err(e) => Err(format!("{what} {}: {e}", path.display())),
    }
}

/// What goes into the initramfs besides the kernel modules.
pub struct Contents<'a> {
    /// The kernel assets (for the modules).
    pub assets: &'a KernelAssets,
    /// The static test binary, installed as `/bin/vm-test`.
    pub test_binary: &'a Path,
    /// The static `vblk`, installed as `/bin/vblk` (guest tests run its `verify` and `bench`).
    pub vblk_binary: &'a Path,
    /// The generated `/init`.
    pub init: &'a str,
}

/// Builds the initramfs and writes it to `out`. Returns the module names in load order.
pub fn build(contents: &Contents<'_>, out: &Path) -> Result<Vec<String>> {
    let mut fs_image = Initramfs::default();
    for d in ["dev", "proc", "sys", "tmp", "run", "etc", "sbin", "usr/sbin", "lib/modules"] {
        fs_image.dir(d);
    }

    let busybox = Path::new("/bin/busybox");
    require_static(busybox, "busybox (package busybox-static)")?;
    fs_image.copy("bin/busybox", busybox)?;
    fs_image.symlink("bin/sh", "busybox");

    let mut names = Vec::new();
    for path in module_order(contents.assets)? {
        let name = module_name(&path);
        fs_image.file(&format!("lib/modules/{name}.ko"), 0o644, module_bytes(&path)?);
        names.push(name);
    }

    let vdpa = find_program("vdpa").ok_or("vdpa not found (package iproute2)")?;
    fs_image.copy_with_libraries(&vdpa)?;
    let qsd = find_program("qemu-storage-daemon")
        .ok_or("qemu-storage-daemon not found (package qemu-system-common or qemu-utils)")?;
    fs_image.copy_with_libraries(&qsd)?;
    // Both may live under /usr/bin or /usr/sbin; make sure /init finds them on its PATH.

    require_static(contents.test_binary, "test binary")?;
    fs_image.copy("bin/vm-test", contents.test_binary)?;
    require_static(contents.vblk_binary, "vblk")?;
    fs_image.copy("bin/vblk", contents.vblk_binary)?;
    fs_image.file("init", 0o755, contents.init.as_bytes().to_vec());

    let bytes = fs_image.to_cpio();
    fs::write(out, &bytes).map_err(|e| format!("cannot write {}: {e}", out.display()))?;
    println!("initramfs {}: {:.1} MB, modules: {}", out.display(), bytes.len() as f64 / 1e6, names.join(" "));
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn show_depends_order() {
        let text = "\
insmod /k/lib/modules/6.12/kernel/virt/lib/irqbypass.ko.xz \n\
insmod /k/lib/modules/6.12/kernel/drivers/vfio/vfio.ko.xz \n\
insmod /k/lib/modules/6.12/kernel/drivers/vfio/pci/vfio-pci.ko.xz \n\
builtin virtio_pci\n\
insmod /k/lib/modules/6.12/kernel/drivers/vfio/vfio.ko.xz \n\
insmod /k/lib/modules/6.12/extra/vdpa_sim.ko use_va=0\n";
        let order = parse_show_depends(text);
        let names: Vec<String> = order.iter().map(|p| module_name(p)).collect();
        assert_eq!(names, ["irqbypass", "vfio", "vfio-pci", "vdpa_sim"]);
        assert!(parse_show_depends("").is_empty());
        assert!(is_sim_module("vdpa_sim_blk") && is_sim_module("vdpa-sim") && !is_sim_module("vringh"));
    }

    #[test]
    fn ldd_paths() {
        let text = "\tlinux-vdso.so.1 (0x00007ffc)\n\
\tlibmnl.so.0 => /lib/x86_64-linux-gnu/libmnl.so.0 (0x00007f)\n\
\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\
\t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n\
\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n";
        assert_eq!(
            parse_ldd(text),
            ["/lib/x86_64-linux-gnu/libmnl.so.0", "/lib/x86_64-linux-gnu/libc.so.6", "/lib64/ld-linux-x86-64.so.2"]
        );
        assert!(parse_ldd("\tstatically linked\n").is_empty());
    }

    #[test]
    fn cpio_newc_layout() {
        let mut image = Initramfs::default();
        image.file("bin/x", 0o755, b"hello".to_vec());
        image.symlink("bin/sh", "busybox");
        let bytes = image.to_cpio();
        assert_eq!(&bytes[..6], b"070701");
        assert_eq!(bytes.len() % 4, 0);
        // Records in path order: bin (dir), bin/sh, bin/x, trailer.
        let text = String::from_utf8_lossy(&bytes);
        let bin = text.find("bin\0").unwrap_or(usize::MAX);
        let sh = text.find("bin/sh\0").unwrap_or(usize::MAX);
        let x = text.find("bin/x\0").unwrap_or(usize::MAX);
        assert!(bin < sh && sh < x && x < usize::MAX);
        assert!(text.contains("hello") && text.contains("TRAILER!!!\0"));
        // Header of bin/x: mode 0100755, filesize 5, namesize 6.
        let header_start = x - 110;
        let header = &text[header_start..x];
        assert_eq!(&header[14..22], "000081ED");
        assert_eq!(&header[54..62], "00000005");
        assert_eq!(&header[94..102], "00000006");
    }

    #[test]
    fn static_elf_detection() {
        let mut elf = vec![0u8; 0x40 + 56];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2;
        elf[0x20..0x28].copy_from_slice(&0x40u64.to_le_bytes());
        elf[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        elf[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
        elf[0x40..0x44].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        assert_eq!(elf_is_static(&elf), Ok(true));
        elf[0x40..0x44].copy_from_slice(&3u32.to_le_bytes()); // PT_INTERP
        assert_eq!(elf_is_static(&elf), Ok(false));
        assert!(elf_is_static(b"#!/bin/sh\n").is_err());
        assert!(elf_is_static(&elf[..0x30]).is_err());
    }
}
