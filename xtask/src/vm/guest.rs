//! What happens inside the guest: the cases (one boot each), their phases (device set-up plus
//! the test-name prefixes that run against it), the environment-variable contract with the
//! test binary, and the generated `/init`.
//!
//! The test binary is a plain libtest binary. `/init` lists its tests (`--list`) and runs each
//! one whose name starts with one of the phase's prefixes as its own process
//! (`--exact NAME`), so a hanging test is killed by its own timeout and every test gets its own
//! result line on the serial console. A new test is therefore only a `#[test]` in the right
//! module of `vm-tests/tests/guest/` (top-level module = phase prefix).

/// A device `/init` sets up before a phase's tests run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    /// The virtio-blk-pci function, unbound from virtio-pci and bound to vfio-pci.
    Pci,
    /// A `vdpa_sim_blk` device bound to vhost_vdpa, with the simulator loaded in VA mode
    /// (`use_va=1`) or PA mode (`use_va=0`).
    VdpaSim {
        /// The `vdpa_sim` module's `use_va` parameter.
        use_va: bool,
    },
    /// A VDUSE block device exported by `qemu-storage-daemon` inside the guest, bound to
    /// vhost_vdpa.
    Vduse,
}

impl Device {
    /// The environment variable that carries this device's path to the tests.
    pub fn env_var(self) -> &'static str {
        match self {
            Device::Pci => "VIRTIO_TEST_PCI",
            Device::VdpaSim { use_va: true } => "VIRTIO_TEST_VDPA_SIM",
            Device::VdpaSim { use_va: false } => "VIRTIO_TEST_VDPA_SIM_PA",
            Device::Vduse => "VIRTIO_TEST_VDUSE",
        }
    }

    /// The shell code that sets the device up; on success the path is in `$NODE_<var>`.
    fn setup(self) -> String {
        match self {
            Device::Pci => "setup_pci".into(),
            Device::VdpaSim { use_va } => format!("setup_sim {} {}", self.env_var(), u8::from(use_va)),
            Device::Vduse => "setup_vduse".into(),
        }
    }

    /// The shell variable `setup` leaves the path in.
    fn shell_var(self) -> &'static str {
        match self {
            Device::Pci => "PCI_DEV",
            Device::VdpaSim { .. } => "SIM_NODE",
            Device::Vduse => "VDUSE_NODE",
        }
    }
}

/// One group of tests in one guest set-up.
#[derive(Debug)]
pub struct Phase {
    /// Name, as it appears in the result lines.
    pub name: &'static str,
    /// Devices set up before the tests run.
    pub devices: &'static [Device],
    /// Tests whose names start with one of these run in this phase.
    pub prefixes: &'static [&'static str],
    /// Negative controls in effect, passed as `VIRTIO_TEST_EXPECT_FAIL` (comma-separated).
    pub expect_fail: &'static [&'static str],
}

/// One boot of the guest.
#[derive(Debug)]
pub struct Case {
    /// Name, for `--case`.
    pub name: &'static str,
    /// One line for the help text.
    pub about: &'static str,
    /// The virtio-blk-pci device's `iommu_platform` property (whether it offers
    /// VIRTIO_F_ACCESS_PLATFORM).
    pub iommu_platform: bool,
    /// Phases, run in order in the same boot.
    pub phases: &'static [&'static Phase],
}

/// Phase `va`: the PCI device, vdpa_sim in VA mode and VDUSE at the same time.
pub const PHASE_VA: Phase = Phase {
    name: "va",
    devices: &[Device::Pci, Device::VdpaSim { use_va: true }, Device::Vduse],
    prefixes: &["pci::", "vdpa_sim::", "vduse::"],
    expect_fail: &[],
};

/// Phase `pa`: the simulator reloaded with `use_va=0` (pinned pages, physical addresses).
pub const PHASE_PA: Phase =
    Phase { name: "pa", devices: &[Device::VdpaSim { use_va: false }], prefixes: &["vdpa_sim_pa::"], expect_fail: &[] };

/// Phase `no-access-platform`: the PCI device without ACCESS_PLATFORM (negative control).
pub const PHASE_NO_ACCESS_PLATFORM: Phase = Phase {
    name: "no-access-platform",
    devices: &[Device::Pci],
    prefixes: &["pci_no_access_platform::"],
    expect_fail: &["no-access-platform"],
};

/// Every case, in the order `--case all` runs them.
pub const CASES: &[Case] = &[
    Case {
        name: "devices",
        about: "PCI (vfio-pci), vdpa_sim use_va=1 and VDUSE, then vdpa_sim use_va=0 (default)",
        iommu_platform: true,
        phases: &[&PHASE_VA, &PHASE_PA],
    },
    Case {
        name: "no-access-platform",
        about: "negative control: virtio-blk-pci with iommu_platform=off, bound to vfio-pci",
        iommu_platform: false,
        phases: &[&PHASE_NO_ACCESS_PLATFORM],
    },
];

/// The case run when no `--case` is given.
pub const DEFAULT_CASE: &str = "devices";

/// Every phase of every case, deduplicated, in order.
fn all_phases() -> Vec<&'static Phase> {
    let mut phases: Vec<&'static Phase> = Vec::new();
    for case in CASES {
        for phase in case.phases {
            if !phases.iter().any(|p| p.name == phase.name) {
                phases.push(phase);
            }
        }
    }
    phases
}

/// A phase name as a shell function name.
fn phase_function(name: &str) -> String {
    format!("phase_{}", name.replace(|c: char| !c.is_ascii_alphanumeric(), "_"))
}

/// The shell function for one phase.
fn phase_script(phase: &Phase) -> String {
    let mut s = format!("{}() {{\n", phase_function(phase.name));
    for device in phase.devices {
        s.push_str(&format!("    {} && export {}=\"${}\"\n", device.setup(), device.env_var(), device.shell_var()));
        if *device == Device::Pci {
            s.push_str("    [ -n \"$PCI_FEATURES\" ] && export VIRTIO_TEST_PCI_FEATURES=\"$PCI_FEATURES\"\n");
        }
    }
    if !phase.expect_fail.is_empty() {
        s.push_str(&format!("    export VIRTIO_TEST_EXPECT_FAIL={}\n", phase.expect_fail.join(",")));
    }
    let prefixes: Vec<String> = phase.prefixes.iter().map(|p| format!("'{p}'")).collect();
    s.push_str(&format!("    run_tests {} {}\n", phase.name, prefixes.join(" ")));
    if phase.devices.contains(&Device::Vduse) {
        s.push_str("    teardown_vduse\n");
    }
    if phase.devices.iter().any(|d| matches!(d, Device::VdpaSim { .. })) {
        s.push_str("    unload_sim\n");
    }
    let mut vars: Vec<&str> = phase.devices.iter().map(|d| d.env_var()).collect();
    vars.extend(["VIRTIO_TEST_PCI_FEATURES", "VIRTIO_TEST_EXPECT_FAIL"]);
    s.push_str(&format!("    unset {}\n}}\n", vars.join(" ")));
    s
}

/// The kernel command-line words that select the phases of `case` and the per-test timeout.
pub fn cmdline_words(case: &Case, test_timeout: u64) -> Vec<String> {
    let phases: Vec<&str> = case.phases.iter().map(|p| p.name).collect();
    vec![format!("uvirtio.phases={}", phases.join(",")), format!("uvirtio.test_timeout={test_timeout}")]
}

/// The guest's `/init`: mounts, loads `boot_modules` in order, then runs the phases the kernel
/// command line names (`uvirtio.phases=a,b`), and powers off.
pub fn init_script(boot_modules: &[String], sim_modules: &[String]) -> String {
    let mut phases = String::new();
    let mut dispatch = String::new();
    for phase in all_phases() {
        phases.push_str(&phase_script(phase));
        dispatch.push_str(&format!("        {}) {} ;;\n", phase.name, phase_function(phase.name)));
    }
    INIT_TEMPLATE
        .replace("@BOOT_MODULES@", &boot_modules.join(" "))
        .replace("@SIM_MODULES@", &sim_modules.join(" "))
        .replace("@PHASES@", &phases)
        .replace("@DISPATCH@", &dispatch)
}

/// `/init`, with `@...@` placeholders filled by [`init_script`].
const INIT_TEMPLATE: &str = r#"#!/bin/sh
# Generated by `cargo xtask vm-test` (xtask/src/vm/guest.rs); rebuilt on every run.
# Result lines on the console start with `UVIRTIO-VM`; the host parses them.
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
echo 1 > /proc/sys/kernel/printk   # keep kernel messages from splitting result lines

up() { cut -d' ' -f1 /proc/uptime; }
say() { echo "UVIRTIO-VM $*"; }
fail_setup() { say "setup $1 FAIL $2"; }
say "booted uptime=$(up) kernel=$(uname -r)"

PHASES=""
TEST_TIMEOUT=120
for w in $(cat /proc/cmdline); do
    case "$w" in
        uvirtio.phases=*) PHASES=$(echo "${w#*=}" | tr , ' ') ;;
        uvirtio.test_timeout=*) TEST_TIMEOUT=${w#*=} ;;
    esac
done

for m in @BOOT_MODULES@; do
    out=$(insmod /lib/modules/$m.ko 2>&1) || say "setup insmod FAIL $m: $out"
done

PCI_DEV=""
PCI_FEATURES=""
setup_pci() {
    [ -n "$PCI_DEV" ] && return 0
    local dev="" d bdf grp
    for d in /sys/bus/pci/devices/*; do   # modern virtio-blk: 1af4:1042
        if [ "$(cat $d/vendor)" = 0x1af4 ] && [ "$(cat $d/device)" = 0x1042 ]; then dev=$d; break; fi
    done
    [ -n "$dev" ] || { fail_setup pci "no virtio-blk-pci (1af4:1042) device"; return 1; }
    bdf=${dev##*/}
    [ -e $dev/iommu_group ] || { fail_setup pci "$bdf has no iommu_group (no IOMMU?)"; return 1; }
    grp=$(basename "$(readlink $dev/iommu_group)")
    # The features the kernel's virtio-blk driver negotiated, before the device moves to vfio-pci.
    PCI_FEATURES=$(cat $dev/virtio*/features 2>/dev/null)
    [ -e $dev/driver ] && echo $bdf > $dev/driver/unbind
    echo vfio-pci > $dev/driver_override
    echo $bdf > /sys/bus/pci/drivers_probe
    [ -e /dev/vfio/$grp ] || { fail_setup pci "/dev/vfio/$grp missing after binding $bdf to vfio-pci"; return 1; }
    say "device pci $dev driver=$(basename "$(readlink $dev/driver)") iommu_group=$grp features=$PCI_FEATURES uptime=$(up)"
    PCI_DEV=$dev
}

vhost_node() {   # $1 = vdpa device name; prints /dev/vhost-vdpa-N
    local n
    n=$(ls -d /sys/bus/vdpa/devices/$1/vhost-vdpa-* 2>/dev/null | head -1)
    [ -n "$n" ] && [ -c /dev/${n##*/} ] && echo /dev/${n##*/}
}

SIM_LOADED=""
SIM_NODE=""
unload_sim() {
    vdpa dev del blk0 2>/dev/null
    if [ -n "$SIM_LOADED" ]; then
        for m in $(echo @SIM_MODULES@ | tr ' ' '\n' | sed -n '1!G;h;$p'); do
            rmmod $m || say "setup rmmod FAIL $m"
        done
    fi
    SIM_LOADED=""
    SIM_NODE=""
}
setup_sim() {   # $1 = label, $2 = use_va (1 or 0)
    local m args out
    unload_sim
    for m in @SIM_MODULES@; do
        args=""
        [ $m = vdpa_sim ] && args="use_va=$2"
        out=$(insmod /lib/modules/$m.ko $args 2>&1) || { fail_setup $1 "insmod $m $args: $out"; return 1; }
    done
    SIM_LOADED=1
    out=$(vdpa dev add mgmtdev vdpasim_blk name blk0 2>&1) || { fail_setup $1 "vdpa dev add mgmtdev vdpasim_blk: $out"; return 1; }
    SIM_NODE=$(vhost_node blk0) || { fail_setup $1 "no /dev/vhost-vdpa-* for blk0"; return 1; }
    say "device $1 $SIM_NODE use_va=$(cat /sys/module/vdpa_sim/parameters/use_va) uptime=$(up)"
}

VDUSE_NODE=""
QSD_PID=""
setup_vduse() {
    local i=0 out
    truncate -s 64M /tmp/vduse.img
    qemu-storage-daemon \
        --blockdev driver=file,node-name=file0,filename=/tmp/vduse.img \
        --export type=vduse-blk,id=vduse0,node-name=file0,name=vduse0,writable=on,num-queues=2,serial=uvirtio-vduse0 \
        > /tmp/qsd.log 2>&1 &
    QSD_PID=$!
    while [ ! -e /dev/vduse/vduse0 ] && [ $i -lt 100 ]; do sleep 0.2; i=$((i+1)); done
    [ -e /dev/vduse/vduse0 ] || { fail_setup vduse "/dev/vduse/vduse0 did not appear: $(cat /tmp/qsd.log)"; return 1; }
    out=$(vdpa dev add mgmtdev vduse name vduse0 2>&1) || { fail_setup vduse "vdpa dev add mgmtdev vduse: $out"; return 1; }
    VDUSE_NODE=$(vhost_node vduse0) || { fail_setup vduse "no /dev/vhost-vdpa-* for vduse0"; return 1; }
    say "device vduse $VDUSE_NODE uptime=$(up)"
}
teardown_vduse() {
    vdpa dev del vduse0 2>/dev/null
    [ -n "$QSD_PID" ] && { kill $QSD_PID; wait $QSD_PID 2>/dev/null; }
    [ -s /tmp/qsd.log ] && sed 's/^/[qsd] /' /tmp/qsd.log
    VDUSE_NODE=""
    QSD_PID=""
}

run_tests() {   # $1 = phase, then the test-name prefixes of this phase
    local phase=$1 t p match n=0 rc t0 t1 ms verdict
    shift
    export VIRTIO_TEST_REQUIRE=1 RUST_BACKTRACE=1
    if ! /bin/vm-test --list > /tmp/list 2>&1; then
        sed 's/^/  | /' /tmp/list
        say "phase $phase FAIL cannot list the tests"
        return
    fi
    for t in $(sed -n 's/: test$//p' /tmp/list); do
        match=0
        for p in "$@"; do case "$t" in "$p"*) match=1 ;; esac; done
        [ $match = 1 ] || continue
        n=$((n+1))
        t0=$(up)
        timeout $TEST_TIMEOUT /bin/vm-test --exact "$t" --test-threads=1 > /tmp/test.out 2>&1
        rc=$?
        t1=$(up)
        ms=$(awk -v a=$t0 -v b=$t1 'BEGIN { printf "%d", (b - a) * 1000 }')
        if [ $rc != 0 ]; then verdict=FAIL
        elif grep -q '^test result: ok. 1 passed' /tmp/test.out; then verdict=PASS
        elif grep -q '^test result: ok. 0 passed; 0 failed; 1 ignored' /tmp/test.out; then verdict=SKIP
        else verdict=FAIL
        fi
        [ $verdict = PASS ] || sed 's/^/  | /' /tmp/test.out
        say "test $phase $t $verdict ${ms}ms exit=$rc"
    done
    say "phase $phase tests=$n uptime=$(up)"
}

@PHASES@
for p in $PHASES; do
    case $p in
@DISPATCH@        *) say "phase $p FAIL unknown phase" ;;
    esac
done
dmesg | grep -iE "DMAR|vfio|vdpa|vduse|iommu|taint|error|fault|BUG|WARNING" | tail -40 | sed 's/^/[dmesg] /'
say "done uptime=$(up)"
poweroff -f
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cases_are_consistent() {
        assert!(CASES.iter().any(|c| c.name == DEFAULT_CASE));
        for case in CASES {
            assert!(!case.phases.is_empty());
            for phase in case.phases {
                assert!(!phase.prefixes.is_empty() && phase.prefixes.iter().all(|p| p.ends_with("::")));
            }
        }
        // No prefix of one phase is a prefix of another's (so no test runs in two phases).
        let prefixes: Vec<&str> = all_phases().iter().flat_map(|p| p.prefixes.iter().copied()).collect();
        for a in &prefixes {
            for b in &prefixes {
                assert!(a == b || !a.starts_with(b), "{a} / {b}");
            }
        }
    }

    #[test]
    fn init_has_every_phase_and_no_placeholders() {
        let init = init_script(&["vfio".into(), "vfio-pci".into()], &["vdpa_sim".into(), "vdpa_sim_blk".into()]);
        assert!(init.starts_with("#!/bin/sh\n"));
        for placeholder in ["@BOOT_MODULES@", "@SIM_MODULES@", "@PHASES@", "@DISPATCH@"] {
            assert!(!init.contains(placeholder), "unfilled {placeholder}");
        }
        assert!(init.contains("for m in vfio vfio-pci; do"));
        assert!(init.contains("        no-access-platform) phase_no_access_platform ;;\n"));
        assert!(init.contains("setup_sim VIRTIO_TEST_VDPA_SIM_PA 0 && export VIRTIO_TEST_VDPA_SIM_PA=\"$SIM_NODE\""));
        assert!(init.contains("export VIRTIO_TEST_EXPECT_FAIL=no-access-platform\n"));
        assert!(init.contains("run_tests va 'pci::' 'vdpa_sim::' 'vduse::'\n"));
    }

    #[test]
    fn cmdline_selects_phases() {
        let case = CASES.iter().find(|c| c.name == DEFAULT_CASE).map(|c| cmdline_words(c, 90));
        assert_eq!(case, Some(vec!["uvirtio.phases=va,pa".to_string(), "uvirtio.test_timeout=90".to_string()]));
    }
}
