//! Booting the guest under QEMU (TCG, emulated Intel IOMMU) with a hard timeout, and reading
//! the results back from the serial log.

use std::fs;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use super::guest::Case;
use crate::{shell_quote, Result};

/// Marker that starts every line the guest's `/init` reports.
pub const MARKER: &str = "UVIRTIO-VM ";

/// Everything one boot needs.
pub struct Boot<'a> {
    /// The case (decides the device options and the phases).
    pub case: &'a Case,
    /// The kernel image.
    pub kernel: &'a Path,
    /// The initramfs.
    pub initrd: &'a Path,
    /// The raw disk image behind the virtio-blk-pci device.
    pub disk: &'a Path,
    /// Where the serial console goes.
    pub serial_log: &'a Path,
    /// Per-test timeout inside the guest, in seconds.
    pub test_timeout: u64,
}

/// The kernel command line.
pub fn kernel_cmdline(boot: &Boot<'_>) -> String {
    let mut words: Vec<String> = [
        "console=ttyS0",
        "loglevel=4",
        "panic=-1", // a guest panic ends QEMU at once (with -no-reboot) instead of hanging
        "rdinit=/init",
        "intel_iommu=on",
        "iommu=pt",
    ]
    .map(String::from)
    .to_vec();
    words.extend(super::guest::cmdline_words(boot.case, boot.test_timeout));
    words.join(" ")
}

/// The virtio-blk-pci `-device` value for `case`. `packed=on` offers packed rings (the
/// PCI operation suite runs on both formats); `serial` gives GET_ID something to return.
pub fn blk_device(case: &Case) -> String {
    format!(
        "virtio-blk-pci,drive=d0,disable-legacy=on,num-queues=2,iommu_platform={},packed=on,serial=uvirtio-pci",
        if case.iommu_platform { "on" } else { "off" }
    )
}

/// QEMU's arguments. The intel-iommu device comes before the PCI device it translates for.
pub fn qemu_args(boot: &Boot<'_>) -> Vec<String> {
    let mut args: Vec<String> = [
        "-nodefaults",
        "-no-reboot",
        "-display",
        "none",
        "-monitor",
        "none",
        "-machine",
        "q35,accel=tcg",
        "-cpu",
        "max",
        "-smp",
        "2",
        "-m",
        "1G",
        "-device",
        "intel-iommu,intremap=on,caching-mode=on",
    ]
    .map(String::from)
    .to_vec();
    args.extend([
        "-kernel".into(),
        boot.kernel.display().to_string(),
        "-initrd".into(),
        boot.initrd.display().to_string(),
        "-append".into(),
        kernel_cmdline(boot),
        "-drive".into(),
        format!("if=none,id=d0,file={},format=raw,cache=unsafe", boot.disk.display()),
        "-device".into(),
        blk_device(boot.case),
        "-serial".into(),
        format!("file:{}", boot.serial_log.display()),
    ]);
    args
}

/// How a boot ended.
pub struct BootOutcome {
    /// QEMU's exit status, or `None` if it was killed at the timeout.
    pub exit: Option<std::process::ExitStatus>,
    /// Wall-clock seconds from start to exit.
    pub wall: f64,
    /// What QEMU itself wrote to stderr.
    pub stderr: String,
}

/// Boots QEMU, echoing the guest's result lines as they appear, and kills it after
/// `timeout`.
pub fn run(qemu: &Path, boot: &Boot<'_>, timeout: Duration) -> Result<BootOutcome> {
    let args = qemu_args(boot);
    let shown: Vec<String> = args.iter().map(|a| shell_quote(a)).collect();
    println!("$ {} {}", qemu.display(), shown.join(" "));
    let _ = fs::remove_file(boot.serial_log);
    let stderr_path = boot.serial_log.with_extension("qemu-stderr.log");
    let stderr_file = fs::File::create(&stderr_path).map_err(|e| format!("{}: {e}", stderr_path.display()))?;
    let start = Instant::now();
    let mut child = Command::new(qemu)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr_file)
        .spawn()
        .map_err(|e| format!("cannot start {} (package qemu-system-x86): {e}", qemu.display()))?;
    let mut follower = LogFollower::new(boot.serial_log.to_path_buf());
    let exit = loop {
        follower.poll();
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if start.elapsed() >= timeout => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => sleep(Duration::from_millis(100)),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("waiting for QEMU: {e}"));
            }
        }
    };
    follower.poll();
    let wall = start.elapsed().as_secs_f64();
    let stderr = fs::read_to_string(&stderr_path).unwrap_or_default();
    Ok(BootOutcome { exit, wall, stderr })
}

/// Prints the guest's result lines from a growing serial log.
struct LogFollower {
    path: PathBuf,
    offset: u64,
    partial: Vec<u8>,
}

impl LogFollower {
    /// Follows `path` from its start.
    fn new(path: PathBuf) -> Self {
        LogFollower { path, offset: 0, partial: Vec::new() }
    }

    /// Reads what was appended since the last call and prints complete marker lines.
    fn poll(&mut self) {
        let Ok(mut file) = fs::File::open(&self.path) else { return };
        if file.seek(SeekFrom::Start(self.offset)).is_err() {
            return;
        }
        let mut buf = Vec::new();
        if let Ok(n) = file.read_to_end(&mut buf) {
            self.offset += n as u64;
            self.partial.extend_from_slice(&buf);
        }
        while let Some(pos) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=pos).collect();
            let line = String::from_utf8_lossy(&line);
            if let Some(at) = line.find(MARKER) {
                println!("  guest: {}", line[at..].trim_end());
            }
        }
    }
}

/// One test's result.
#[derive(Debug, Clone, PartialEq)]
pub struct TestResult {
    /// The phase it ran in.
    pub phase: String,
    /// The libtest name, e.g. `pci::bound_to_vfio_pci`.
    pub name: String,
    /// `PASS`, `FAIL` or `SKIP`.
    pub verdict: String,
    /// Milliseconds inside the guest (process start to exit).
    pub millis: u64,
}

/// Everything the serial log says.
#[derive(Debug, Default, PartialEq)]
pub struct SerialReport {
    /// Guest uptime when `/init` started, in seconds.
    pub booted: Option<f64>,
    /// Guest uptime at the end, in seconds.
    pub done: Option<f64>,
    /// Per-test results, in order.
    pub tests: Vec<TestResult>,
    /// Phases that reported their test count: (phase, count).
    pub phases: Vec<(String, u32)>,
    /// Set-up and phase failures, as the guest worded them.
    pub failures: Vec<String>,
    /// Kernel panics and oopses seen on the console.
    pub kernel_errors: Vec<String>,
}

/// Parses the serial log. Marker lines may carry a prefix (a kernel message that raced with
/// them), so a marker is looked for anywhere in the line.
pub fn parse_serial(log: &str) -> SerialReport {
    let mut report = SerialReport::default();
    for line in log.lines() {
        if line.contains("Kernel panic") || line.contains("BUG:") || line.contains("Oops:") {
            report.kernel_errors.push(line.trim().to_string());
        }
        let Some(at) = line.find(MARKER) else { continue };
        let rest = line[at + MARKER.len()..].trim_end();
        let words: Vec<&str> = rest.split_whitespace().collect();
        let uptime = |words: &[&str]| {
            words.iter().find_map(|w| w.strip_prefix("uptime=")).and_then(|v| v.trim_end_matches('s').parse().ok())
        };
        match words.as_slice() {
            ["booted", tail @ ..] => report.booted = uptime(tail),
            ["done", tail @ ..] => report.done = uptime(tail),
            ["test", phase, name, verdict, millis, ..] => report.tests.push(TestResult {
                phase: phase.to_string(),
                name: name.to_string(),
                verdict: verdict.to_string(),
                millis: millis.trim_end_matches("ms").parse().unwrap_or(0),
            }),
            ["phase", phase, count, ..] if count.starts_with("tests=") => {
                report.phases.push((phase.to_string(), count["tests=".len()..].parse().unwrap_or(0)));
            }
            ["phase", _, "FAIL", ..] | ["setup", _, "FAIL", ..] => report.failures.push(rest.to_string()),
            _ => {}
        }
    }
    report
}

/// Why a boot of `case` failed, if it did: every phase must report at least one test, every
/// test must pass (an `#[ignore]`d test, reported as `SKIP`, fails the run: a skipped test
/// would hide a failure), no set-up may fail, and the guest must finish.
pub fn verdict(case: &Case, report: &SerialReport, outcome_ok: bool) -> Vec<String> {
    let mut problems = Vec::new();
    if report.booted.is_none() {
        problems.push("the guest never reached /init".to_string());
    }
    problems.extend(report.failures.iter().cloned());
    problems.extend(report.kernel_errors.iter().map(|e| format!("kernel: {e}")));
    for phase in case.phases {
        match report.phases.iter().find(|(p, _)| p == phase.name) {
            None => problems.push(format!("phase {} did not report", phase.name)),
            Some((_, 0)) => problems.push(format!(
                "phase {} ran no tests (no test name starts with {})",
                phase.name,
                phase.prefixes.join(" or ")
            )),
            Some(_) => {}
        }
    }
    for test in &report.tests {
        if test.verdict != "PASS" {
            problems.push(format!("{} {}: {}", test.phase, test.name, test.verdict));
        }
    }
    if report.done.is_none() {
        problems.push("the guest did not finish (no `done` line)".to_string());
    }
    if !outcome_ok {
        problems.push("QEMU did not exit cleanly".to_string());
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::super::guest::CASES;
    use super::*;

    const LOG: &str = "\
[    0.000000] Linux version 6.12.95+deb12-amd64\n\
UVIRTIO-VM booted uptime=2.31 kernel=6.12.95+deb12-amd64\n\
UVIRTIO-VM device pci /sys/bus/pci/devices/0000:00:01.0 driver=vfio-pci iommu_group=1\n\
UVIRTIO-VM test va pci::is_modern_virtio_blk PASS 40ms exit=0\n\
[    3.1] vfio-pci 0000:00:01.0: something UVIRTIO-VM test va vduse::answers_as_virtio_blk FAIL 120ms exit=101\n\
UVIRTIO-VM phase va tests=2 uptime=4.5\n\
UVIRTIO-VM setup VIRTIO_TEST_VDPA_SIM_PA FAIL insmod vdpa_sim use_va=0: File exists\n\
UVIRTIO-VM phase pa tests=0\n\
UVIRTIO-VM done uptime=5.80\n";

    #[test]
    fn parses_serial_log() {
        let r = parse_serial(LOG);
        assert_eq!(r.booted, Some(2.31));
        assert_eq!(r.done, Some(5.8));
        assert_eq!(r.tests.len(), 2);
        assert_eq!(
            r.tests[1],
            TestResult {
                phase: "va".into(),
                name: "vduse::answers_as_virtio_blk".into(),
                verdict: "FAIL".into(),
                millis: 120
            }
        );
        assert_eq!(r.phases, [("va".to_string(), 2), ("pa".to_string(), 0)]);
        assert_eq!(r.failures, ["setup VIRTIO_TEST_VDPA_SIM_PA FAIL insmod vdpa_sim use_va=0: File exists"]);
        assert!(r.kernel_errors.is_empty());
    }

    #[test]
    fn verdict_names_every_problem() {
        let case = &CASES[0];
        let problems = verdict(case, &parse_serial(LOG), true);
        assert!(problems.iter().any(|p| p.contains("vduse::answers_as_virtio_blk: FAIL")));
        assert!(problems.iter().any(|p| p.contains("phase pa ran no tests")));
        assert!(problems.iter().any(|p| p.starts_with("setup VIRTIO_TEST_VDPA_SIM_PA FAIL")));

        let good = "UVIRTIO-VM booted uptime=2\nUVIRTIO-VM test va pci::x PASS 1ms exit=0\n\
                    UVIRTIO-VM phase va tests=1\nUVIRTIO-VM test pa vdpa_sim_pa::x PASS 1ms exit=0\n\
                    UVIRTIO-VM phase pa tests=1\nUVIRTIO-VM done uptime=3\n";
        assert!(verdict(case, &parse_serial(good), true).is_empty());
        assert_eq!(verdict(case, &parse_serial(good), false), ["QEMU did not exit cleanly"]);
        let ignored = good.replace("vdpa_sim_pa::x PASS", "vdpa_sim_pa::x SKIP");
        assert_eq!(verdict(case, &parse_serial(&ignored), true), ["pa vdpa_sim_pa::x: SKIP"]);

        let silent = verdict(case, &parse_serial("Kernel panic - not syncing: VFS\n"), false);
        assert!(silent.iter().any(|p| p == "the guest never reached /init"));
        assert!(silent.iter().any(|p| p.starts_with("kernel: Kernel panic")));
        assert!(silent.iter().any(|p| p == "phase va did not report"));
    }

    #[test]
    fn command_line() {
        let case = &CASES[0];
        let boot = Boot {
            case,
            kernel: Path::new("/c/vmlinuz"),
            initrd: Path::new("/c/initramfs.cpio"),
            disk: Path::new("/t/disk.img"),
            serial_log: Path::new("/t/serial.log"),
            test_timeout: 60,
        };
        assert_eq!(
            kernel_cmdline(&boot),
            "console=ttyS0 loglevel=4 panic=-1 rdinit=/init intel_iommu=on iommu=pt \
             uvirtio.phases=va,pa uvirtio.test_timeout=60"
        );
        let args = qemu_args(&boot);
        let joined = args.join(" ");
        assert!(joined.contains("-machine q35,accel=tcg -cpu max"));
        let iommu = args.iter().position(|a| a.starts_with("intel-iommu"));
        let blk = args.iter().position(|a| a.starts_with("virtio-blk-pci"));
        assert!(iommu < blk && iommu.is_some());
        assert!(joined.contains(
            "virtio-blk-pci,drive=d0,disable-legacy=on,num-queues=2,iommu_platform=on,packed=on,serial=uvirtio-pci"
        ));
        assert!(joined.contains("-serial file:/t/serial.log"));
        let negative = CASES.iter().find(|c| !c.iommu_platform).map(blk_device);
        assert_eq!(
            negative.as_deref(),
            Some("virtio-blk-pci,drive=d0,disable-legacy=on,num-queues=2,iommu_platform=off,packed=on,serial=uvirtio-pci")
        );
    }
}
