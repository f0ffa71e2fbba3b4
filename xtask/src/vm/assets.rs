//! Host packages and the cached guest assets: the bookworm-backports kernel and its modules,
//! plus the out-of-tree `vringh`/`vdpa_sim`/`vdpa_sim_blk` modules Debian does not build.
//!
//! Nothing is installed into the host's `/boot` or `/lib/modules`, and `/etc/apt` is not
//! changed: the backports suite is reached through a private apt configuration inside the
//! cache directory.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::{find_program, timed, Timings};
use crate::{is_root, Cmd, Result};

/// One Debian package the harness needs on the host, and how to tell it is there.
pub struct HostPackage {
    /// The Debian package name.
    pub package: &'static str,
    /// A program the package provides (looked up on `PATH` and the sbin directories), or
    /// `None` to ask dpkg whether the package itself is installed.
    pub program: Option<&'static str>,
}

/// What `vm-test` needs on the host. `cpio` is not here: the initramfs is written by
/// [`super::initramfs`] itself, in the kernel's `newc` format.
pub const HOST_PACKAGES: &[HostPackage] = &[
    HostPackage { package: "qemu-system-x86", program: Some("qemu-system-x86_64") },
    HostPackage { package: "busybox-static", program: None },
    HostPackage { package: "xz-utils", program: Some("xz") },
    HostPackage { package: "kmod", program: Some("depmod") },
    HostPackage { package: "iproute2", program: Some("vdpa") },
    HostPackage { package: "make", program: Some("make") },
    HostPackage { package: "gcc-12", program: Some("gcc-12") },
    HostPackage { package: "bc", program: Some("bc") },
    HostPackage { package: "libelf1", program: None },
    HostPackage { package: "libc6-dev", program: None },
];

/// Whether dpkg reports `package` as installed.
fn dpkg_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

/// The packages from [`HOST_PACKAGES`] that are missing.
fn missing_packages() -> Vec<&'static str> {
    HOST_PACKAGES
        .iter()
        .filter(|p| match p.program {
            Some(program) => find_program(program).is_none(),
            None => !dpkg_installed(p.package),
        })
        .map(|p| p.package)
        .collect()
}

/// The `apt-get install` command for `packages`.
pub fn apt_install_cmd(packages: &[&str]) -> Cmd {
    let mut args = vec!["install", "-y", "--no-install-recommends"];
    args.extend(packages);
    Cmd::new("apt-get", args).env("DEBIAN_FRONTEND", "noninteractive")
}

/// Installs the missing host packages (as root), or prints the exact commands and fails.
///
/// Installing `qemu-system-x86` 7.2 from bookworm replaces a backported `qemu-utils` (which
/// carried `qemu-storage-daemon` 10.0); `qemu-system-common` 7.2 then provides
/// `qemu-storage-daemon`. Afterwards this checks that `qemu-storage-daemon` still runs, since
/// the vhost-user tests and the VDUSE device in the guest both need it.
pub fn ensure_host_packages() -> Result {
    let missing = missing_packages();
    if !missing.is_empty() {
        println!("missing host packages: {}", missing.join(" "));
        let update = Cmd::new("apt-get", ["update"]).env("DEBIAN_FRONTEND", "noninteractive");
        let install = apt_install_cmd(&missing);
        if !is_root() {
            println!("not running as root, so nothing was installed; install them with:");
            println!("    {}", update.display());
            println!("    {}", install.display());
            return Err(format!("host packages missing: {}", missing.join(" ")));
        }
        let here = PathBuf::from("/");
        update.run_in(&here)?;
        install.run_in(&here)?;
        let still = missing_packages();
        if !still.is_empty() {
            return Err(format!("still missing after apt-get install: {}", still.join(" ")));
        }
    }
    let qsd = find_program("qemu-storage-daemon").ok_or_else(|| {
        "qemu-storage-daemon is missing (the VDUSE device and the vhost-user tests need it); \
         install qemu-system-common (bookworm 7.2) or qemu-utils"
            .to_string()
    })?;
    let owner = Command::new("dpkg")
        .arg("-S")
        .arg(&qsd)
        .stderr(Stdio::null())
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).split(':').next().unwrap_or("").trim().to_string())
        .unwrap_or_default();
    let version =
        Command::new(&qsd).arg("--version").output().map_err(|e| format!("cannot run {}: {e}", qsd.display()))?;
    if !version.status.success() {
        return Err(format!("{} --version failed ({})", qsd.display(), version.status));
    }
    let first = String::from_utf8_lossy(&version.stdout).lines().next().unwrap_or("").to_string();
    println!(
        "host packages present; {} from package {} ({first})",
        qsd.display(),
        if owner.is_empty() { "?" } else { &owner }
    );
    Ok(())
}

/// The guest kernel assets for one kernel version, inside the cache directory.
pub struct KernelAssets {
    /// The kernel release, e.g. `6.12.95+deb12-amd64`.
    pub kver: String,
    /// `<cache>/<kver>`.
    pub dir: PathBuf,
}

impl KernelAssets {
    /// The assets for `kver` under `cache` (they may not exist yet).
    pub fn new(cache: &Path, kver: &str) -> Self {
        KernelAssets { kver: kver.to_string(), dir: cache.join(kver) }
    }

    /// The extracted kernel package (a root for `depmod -b` / `modprobe -d`).
    pub fn kernel_root(&self) -> PathBuf {
        self.dir.join("kernel")
    }

    /// The bzImage.
    pub fn vmlinuz(&self) -> PathBuf {
        self.kernel_root().join("boot").join(format!("vmlinuz-{}", self.kver))
    }

    /// The stamp written when every step finished.
    fn stamp(&self) -> PathBuf {
        self.dir.join("complete")
    }

    /// Whether a previous run finished building these assets.
    pub fn is_complete(&self) -> bool {
        self.stamp().is_file() && self.vmlinuz().is_file()
    }
}

/// The newest kernel version with complete assets in `cache`, if any.
pub fn cached_kernel(cache: &Path) -> Option<String> {
    let mut versions: Vec<String> = fs::read_dir(cache)
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|name| KernelAssets::new(cache, name).is_complete())
        .collect();
    versions.sort_by_key(|a| version_key(a));
    versions.pop()
}

/// Sort key for kernel releases: the leading dot-separated numbers.
fn version_key(kver: &str) -> Vec<u64> {
    kver.split(['.', '-', '+']).map_while(|part| part.parse().ok()).collect()
}

/// Stamp file inside a cached tree that a step finished.
const STEP_DONE: &str = ".uvirtio-step-done";

/// The private apt configuration for bookworm-backports (no change to `/etc/apt`).
struct PrivateApt {
    dir: PathBuf,
}

impl PrivateApt {
    /// Creates `<cache>/apt` with a sources file for bookworm-backports on `archive`.
    fn new(cache: &Path, archive: &str) -> Result<Self> {
        let dir = cache.join("apt");
        for sub in ["lists/partial", "cache/archives/partial", "parts"] {
            mkdir(&dir.join(sub))?;
        }
        write(&dir.join("parts").join("bookworm-backports.sources"), &backports_sources(archive))?;
        Ok(PrivateApt { dir })
    }

    /// The `-o` options that point apt at the private directories.
    fn options(&self) -> Vec<String> {
        let d = self.dir.display();
        vec![
            "-o".into(),
            "Dir::Etc::SourceList=/dev/null".into(),
            "-o".into(),
            format!("Dir::Etc::SourceParts={d}/parts"),
            "-o".into(),
            format!("Dir::State::Lists={d}/lists"),
            "-o".into(),
            format!("Dir::Cache={d}/cache"),
        ]
    }

    /// `program` (apt-get or apt-cache) with the private options and `args`.
    fn cmd(&self, program: &str, args: &[&str]) -> Cmd {
        let mut all = self.options();
        all.extend(args.iter().map(|a| a.to_string()));
        Cmd::new(program, all)
    }
}

/// A deb822 sources entry for bookworm-backports main on `archive`.
pub fn backports_sources(archive: &str) -> String {
    format!(
        "Types: deb\nURIs: {archive}\nSuites: bookworm-backports\nComponents: main\n\
         Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
    )
}

/// The Debian archive URL the host's own apt sources name (first `URIs:` of a deb822 file or
/// first `deb` line), falling back to deb.debian.org.
pub fn host_archive(deb822: Option<&str>, one_line: Option<&str>) -> String {
    let from_deb822 = deb822.and_then(|text| {
        text.lines().find_map(|l| l.strip_prefix("URIs:")).and_then(|uris| uris.split_whitespace().next())
    });
    let from_list = one_line.and_then(|text| {
        text.lines().map(str::split_whitespace).find_map(|mut words| match (words.next(), words.next()) {
            (Some("deb"), Some(url)) if !url.starts_with('[') => Some(url),
            _ => None,
        })
    });
    from_deb822.or(from_list).unwrap_or("http://deb.debian.org/debian").to_string()
}

/// The kernel release that `linux-image-amd64` depends on, from `apt-cache depends` output.
pub fn parse_metapackage_kver(depends: &str) -> Option<String> {
    depends.lines().find_map(|line| {
        let dep = line.trim().strip_prefix("Depends:")?.trim();
        let kver = dep.strip_prefix("linux-image-")?;
        kver.starts_with(|c: char| c.is_ascii_digit()).then(|| kver.to_string())
    })
}

/// The Debian packages for kernel `kver` (image, headers, kbuild, source).
pub fn kernel_packages(kver: &str) -> Vec<String> {
    let flavourless = kver.strip_suffix("-amd64").unwrap_or(kver);
    let major_minor: Vec<&str> = kver.split('.').take(2).collect();
    vec![
        format!("linux-image-{kver}"),
        format!("linux-headers-{kver}"),
        format!("linux-headers-{flavourless}-common"),
        format!("linux-kbuild-{flavourless}"),
        format!("linux-source-{}", major_minor.join(".")),
    ]
}

/// Resolves the kernel to use: `requested`, or the newest complete one in the cache, or (with
/// `refresh`, or nothing cached) the version bookworm-backports' `linux-image-amd64` names now.
pub fn resolve_kernel(cache: &Path, requested: Option<&str>, refresh: bool, t: &mut Timings) -> Result<String> {
    if let Some(kver) = requested {
        return Ok(kver.to_string());
    }
    if !refresh {
        if let Some(kver) = cached_kernel(cache) {
            println!("guest kernel {kver} (cached; --refresh-kernel asks bookworm-backports for a newer one)");
            return Ok(kver);
        }
    }
    timed(t, "apt update (bookworm-backports, private)", || {
        let apt = private_apt(cache)?;
        apt.cmd("apt-get", &["update", "-qq"]).run_in(cache)
    })?;
    let apt = private_apt(cache)?;
    let out = capture(&apt.cmd("apt-cache", &["depends", "linux-image-amd64"]), cache)?;
    let kver = parse_metapackage_kver(&out)
        .ok_or_else(|| format!("linux-image-amd64 in bookworm-backports names no kernel:\n{out}"))?;
    println!("guest kernel {kver} (from bookworm-backports linux-image-amd64)");
    Ok(kver)
}

/// The private apt set-up for `cache`.
fn private_apt(cache: &Path) -> Result<PrivateApt> {
    let deb822 = fs::read_to_string("/etc/apt/sources.list.d/debian.sources").ok();
    let one_line = fs::read_to_string("/etc/apt/sources.list").ok();
    PrivateApt::new(cache, &host_archive(deb822.as_deref(), one_line.as_deref()))
}

/// Builds (or reuses) every asset for `kver`: downloads, extraction, the out-of-tree vdpa
/// simulator modules, `depmod`.
pub fn ensure_kernel_assets(cache: &Path, kver: &str, t: &mut Timings) -> Result<KernelAssets> {
    let assets = KernelAssets::new(cache, kver);
    if assets.is_complete() {
        println!("guest assets: reusing {}", assets.dir.display());
        return Ok(assets);
    }
    let dir = &assets.dir;
    let debs = dir.join("debs");
    mkdir(&debs)?;
    let packages = kernel_packages(kver);

    timed(t, "download kernel packages", || {
        let missing: Vec<&str> = packages.iter().map(String::as_str).filter(|p| find_deb(&debs, p).is_none()).collect();
        if missing.is_empty() {
            return Ok(());
        }
        let apt = private_apt(cache)?;
        if !apt
            .dir
            .join("lists")
            .read_dir()
            .map(|mut d| d.any(|e| e.is_ok_and(|e| e.path().is_file())))
            .unwrap_or(false)
        {
            apt.cmd("apt-get", &["update", "-qq"]).run_in(cache)?;
        }
        let mut args = vec!["download"];
        args.extend(&missing);
        apt.cmd("apt-get", &args)
            .run_in(&debs)
            .map_err(|e| format!("{e}\n(the kernel {kver} may have left bookworm-backports; try --refresh-kernel)"))
    })?;
    let deb = |name: &str| find_deb(&debs, name).ok_or_else(|| format!("{name}_*.deb missing in {}", debs.display()));

    timed(t, "extract kernel + headers", || {
        // Each tree gets a stamp when it is whole, so an interrupted run starts it over.
        let kernel = assets.kernel_root();
        if !kernel.join(STEP_DONE).is_file() {
            remove_dir(&kernel)?;
            Cmd::new("dpkg", ["-x".to_string(), path_str(&deb(&packages[0])?), path_str(&kernel)]).run_in(dir)?;
            write(&kernel.join(STEP_DONE), "")?;
        }
        let hdr = dir.join("hdr");
        let hdr_tree = hdr.join("usr/src").join(format!("linux-headers-{kver}"));
        if !hdr.join(STEP_DONE).is_file() {
            remove_dir(&hdr)?;
            for name in &packages[1..4] {
                Cmd::new("dpkg", ["-x".to_string(), path_str(&deb(name)?), path_str(&hdr)]).run_in(dir)?;
            }
            // The arch Makefile includes the -common tree by absolute path; point it into ours.
            let makefile = hdr_tree.join("Makefile");
            let text = read(&makefile)?;
            let fixed = fix_headers_makefile(&text, &hdr);
            if fixed == text {
                return Err(format!("{}: no `include /usr/src/` line to fix", makefile.display()));
            }
            write(&makefile, &fixed)?;
            write(&hdr.join(STEP_DONE), "")?;
        }
        Ok(())
    })?;

    let sim = dir.join("vdpasim");
    timed(t, "build vringh/vdpa_sim/vdpa_sim_blk", || {
        if sim.join(STEP_DONE).is_file() {
            return Ok(());
        }
        let src = dir.join("src");
        remove_dir(&src)?;
        remove_dir(&sim)?;
        mkdir(&sim)?;
        let source_deb = deb(&packages[4])?;
        Cmd::new("dpkg", ["-x".to_string(), path_str(&source_deb), path_str(&src)]).run_in(dir)?;
        let source_name = packages[4].clone(); // linux-source-6.12
        let tarball = src.join("usr/src").join(format!("{source_name}.tar.xz"));
        let wanted = [
            "drivers/vdpa/vdpa_sim/vdpa_sim.c",
            "drivers/vdpa/vdpa_sim/vdpa_sim.h",
            "drivers/vdpa/vdpa_sim/vdpa_sim_blk.c",
            "drivers/vhost/vringh.c",
        ];
        let mut args = vec!["-C".to_string(), path_str(&src), "-xJf".into(), path_str(&tarball)];
        args.extend(wanted.iter().map(|w| format!("{source_name}/{w}")));
        Cmd::new("tar", args).run_in(dir)?;
        for w in wanted {
            let from = src.join(&source_name).join(w);
            let name = from.file_name().ok_or_else(|| format!("bad path {w}"))?;
            fs::copy(&from, sim.join(name)).map_err(|e| format!("copy {}: {e}", from.display()))?;
        }
        write(&sim.join("Kbuild"), "obj-m := vringh.o vdpa_sim.o vdpa_sim_blk.o\n")?;
        let headers = dir.join("hdr/usr/src").join(format!("linux-headers-{kver}"));
        // CONFIG_DEBUG_INFO_BTF_MODULES= skips the BTF step, which needs pahole.
        let log = sim.join("build.log");
        let status = Command::new("make")
            .arg("-C")
            .arg(&headers)
            .arg(format!("M={}", sim.display()))
            .arg("modules")
            .arg(format!("-j{}", std::thread::available_parallelism().map_or(1, |n| n.get())))
            .arg("CONFIG_DEBUG_INFO_BTF_MODULES=")
            .stdout(fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?)
            .stderr(Stdio::from(fs::File::options().append(true).open(&log).map_err(|e| e.to_string())?))
            .status()
            .map_err(|e| format!("cannot start make (package make): {e}"))?;
        if !status.success() {
            let text = fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(30).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            return Err(format!("vdpa_sim module build failed ({status}); {}:\n{}", log.display(), tail.join("\n")));
        }
        let kos: Vec<String> =
            ["vringh.ko", "vdpa_sim.ko", "vdpa_sim_blk.ko"].iter().map(|k| path_str(&sim.join(k))).collect();
        let mut args = vec!["--strip-debug".to_string()];
        args.extend(kos);
        Cmd::new("strip", args).run_in(dir)?;
        remove_dir(&src)?; // the 151 MB source tarball is not needed any more
        write(&sim.join(STEP_DONE), "")
    })?;

    timed(t, "depmod", || {
        let extra = assets.kernel_root().join("lib/modules").join(kver).join("extra");
        mkdir(&extra)?;
        for ko in ["vringh.ko", "vdpa_sim.ko", "vdpa_sim_blk.ko"] {
            fs::copy(sim.join(ko), extra.join(ko)).map_err(|e| format!("copy {ko}: {e}"))?;
        }
        let depmod = find_program("depmod").ok_or("depmod not found (package kmod)")?;
        Cmd::new(&path_str(&depmod), ["-b".to_string(), path_str(&assets.kernel_root()), kver.to_string()]).run_in(dir)
    })?;
    write(&assets.stamp(), &format!("{}\n", packages.join("\n")))?;
    Ok(assets)
}

/// Points the headers Makefile's absolute `include /usr/src/...` at the extracted tree `hdr`.
pub fn fix_headers_makefile(text: &str, hdr: &Path) -> String {
    text.replace("include /usr/src/", &format!("include {}/usr/src/", hdr.display()))
}

/// The downloaded `.deb` of `package` in `dir` (named `<package>_<version>_<arch>.deb`).
fn find_deb(dir: &Path, package: &str) -> Option<PathBuf> {
    let prefix = format!("{package}_");
    fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".deb")))
}

/// Runs `cmd` in `dir` and returns its stdout.
fn capture(cmd: &Cmd, dir: &Path) -> Result<String> {
    println!("$ {}", cmd.display());
    let out = Command::new(&cmd.program)
        .args(&cmd.args)
        .current_dir(dir)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot start `{}`: {e}", cmd.program))?;
    if !out.status.success() {
        return Err(format!("`{}` failed ({})", cmd.display(), out.status));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A path as a `String` for a command line.
pub fn path_str(path: &Path) -> String {
    path.display().to_string()
}

/// `mkdir -p`.
pub fn mkdir(path: &Path) -> Result {
    fs::create_dir_all(path).map_err(|e| format!("cannot create {}: {e}", path.display()))
}

/// `rm -rf` (a missing directory is fine).
pub fn remove_dir(path: &Path) -> Result {
    match fs::remove_dir_all(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(format!("cannot remove {}: {e}", path.display())),
        _ => Ok(()),
    }
}

/// Reads a text file.
fn read(path: &Path) -> Result<String> {
    fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// Writes a text file.
pub fn write(path: &Path, text: &str) -> Result {
    fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_version_from_metapackage() {
        let out = "linux-image-amd64\n  Depends: linux-image-6.12.95+deb12-amd64\n";
        assert_eq!(parse_metapackage_kver(out).as_deref(), Some("6.12.95+deb12-amd64"));
        let unsigned = "linux-image-amd64\n  Depends: linux-image-6.12.95+deb12-amd64-unsigned\n";
        assert_eq!(parse_metapackage_kver(unsigned).as_deref(), Some("6.12.95+deb12-amd64-unsigned"));
        assert_eq!(parse_metapackage_kver("linux-image-amd64\n  Depends: linux-base\n"), None);
        assert_eq!(parse_metapackage_kver(""), None);
    }

    #[test]
    fn kernel_package_names() {
        assert_eq!(
            kernel_packages("6.12.95+deb12-amd64"),
            [
                "linux-image-6.12.95+deb12-amd64",
                "linux-headers-6.12.95+deb12-amd64",
                "linux-headers-6.12.95+deb12-common",
                "linux-kbuild-6.12.95+deb12",
                "linux-source-6.12"
            ]
        );
    }

    #[test]
    fn archive_from_host_sources() {
        let deb822 = "Types: deb\n# comment\nURIs: http://mirror.example/debian\nSuites: bookworm\n";
        assert_eq!(host_archive(Some(deb822), None), "http://mirror.example/debian");
        let list = "# x\ndeb [arch=amd64] http://a/b bookworm main\ndeb http://c/d bookworm main\n";
        assert_eq!(host_archive(None, Some(list)), "http://c/d");
        assert_eq!(host_archive(None, None), "http://deb.debian.org/debian");
        assert!(backports_sources("http://x/debian").contains("Suites: bookworm-backports\n"));
    }

    #[test]
    fn headers_makefile_fix() {
        let text = "include /usr/src/linux-headers-6.12.95+deb12-common/Makefile\n";
        assert_eq!(
            fix_headers_makefile(text, Path::new("/c/hdr")),
            "include /c/hdr/usr/src/linux-headers-6.12.95+deb12-common/Makefile\n"
        );
    }

    #[test]
    fn install_command_is_exact() {
        assert_eq!(
            apt_install_cmd(&["qemu-system-x86", "kmod"]).display(),
            "DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends qemu-system-x86 kmod"
        );
        // Every package is checked either by a program or by dpkg.
        assert!(HOST_PACKAGES.iter().any(|p| p.package == "busybox-static" && p.program.is_none()));
    }

    #[test]
    fn cached_kernel_needs_the_stamp() {
        let dir = std::env::temp_dir().join(format!("uvirtio-vm-cache-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let assets = KernelAssets::new(&dir, "6.12.95+deb12-amd64");
        let boot = assets.kernel_root().join("boot");
        assert!(mkdir(&boot).is_ok());
        assert!(fs::write(assets.vmlinuz(), b"k").is_ok());
        assert_eq!(cached_kernel(&dir), None, "no stamp yet");
        assert!(fs::write(assets.stamp(), b"").is_ok());
        assert_eq!(cached_kernel(&dir).as_deref(), Some("6.12.95+deb12-amd64"));
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn newest_kernel_sorts_numerically() {
        let mut v = ["6.12.9+deb12-amd64", "6.12.95+deb12-amd64", "6.9.1-amd64"];
        v.sort_by_key(|a| version_key(a));
        assert_eq!(v[2], "6.12.95+deb12-amd64");
    }
}
