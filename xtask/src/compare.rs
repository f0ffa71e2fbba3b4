//! `cargo xtask compare`: uvirtio's `vblk bench` against libblkio's `virtio-driver` 0.6.1
//! (`bench/virtio-driver-ref`), alternately, on the same back-ends, in one session.
//!
//! Back-ends, each started once and kept for all its runs: `qemu-storage-daemon` exporting a
//! `null-co` block device (reads return zeroes without touching memory) as vhost-user-blk, and
//! `vblk serve` (the embedded server, RAM-backed) as a separate process. For each back-end ×
//! queue depth × completion mode the two drivers run one after the other, `runs` times each
//! (uvirtio, ref, uvirtio, ref, ...), on 4 KiB random reads from one queue. The table shows
//! the medians of each driver's runs and their ratios; `--json` prints every raw run instead.
//! A driver whose first run on a back-end fails sits out the rest of that back-end; failed runs
//! make the command fail at the end.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::io::{Read, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::{probe, target_dir, Cmd, Result, TempDir};

/// The reference tool's cargo project, relative to the workspace root.
const REF_DIR: &str = "bench/virtio-driver-ref";
/// Its binary name.
const REF_BIN: &str = "virtio-driver-ref";
/// Its target directory, under the workspace's target directory.
const REF_TARGET_SUBDIR: &str = "virtio-driver-ref";

/// Queue depths measured by default.
const DEFAULT_DEPTHS: &[u16] = &[1, 32, 128];
/// Runs per driver and configuration by default.
const DEFAULT_RUNS: usize = 3;
/// Seconds per run by default.
const DEFAULT_RUNTIME: f64 = 5.0;
/// Block size of every run.
const BS: &str = "4K";
/// Size of both back-ends' devices.
const DEVICE_BYTES: u64 = 1 << 30;
/// Queue size the embedded server offers: virtio-driver has no indirect descriptors, so a read
/// takes 3 descriptors and depth 128 needs a queue of 512.
const SERVE_QUEUE_SIZE: u16 = 1024;
/// How long a back-end may take to create its socket.
const START_TIMEOUT: Duration = Duration::from_secs(15);
/// Extra time a run may take beyond its runtime (connect, set-up, drain) before it is killed.
const RUN_GRACE: Duration = Duration::from_secs(60);

const USAGE: &str = "\
usage: cargo xtask compare [--runs N] [--runtime S] [--only uvirtio|ref] [--backend qsd,serve]
                           [--depths 1,32,128] [--modes poll,interrupt] [--ref-packed] [--no-pin] [--json]
                           [--vblk-arg ARG]...";

/// CPUs for `--pin` (the default): the driver on one, the back-end on the other.
const DRIVER_CPU: u32 = 0;
const BACKEND_CPU: u32 = 1;

/// `command` run under `taskset -c cpu` (util-linux), so it and every thread
/// it starts stay on `cpu`.
fn pinned(command: Cmd, cpu: u32) -> Cmd {
    let mut args = vec!["-c".to_string(), cpu.to_string(), command.program];
    args.extend(command.args);
    Cmd { program: "taskset".into(), args, envs: command.envs }
}

/// The two drivers, in the order they alternate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Driver {
    /// `vblk bench` (uvirtio).
    Uvirtio,
    /// `virtio-driver-ref` (virtio-driver 0.6.1).
    Ref,
}

impl Driver {
    fn name(self) -> &'static str {
        match self {
            Driver::Uvirtio => "uvirtio",
            Driver::Ref => "ref",
        }
    }
}

/// The back-ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Backend {
    /// qemu-storage-daemon, null-co.
    Qsd,
    /// `vblk serve`, RAM.
    Serve,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Qsd => "qsd",
            Backend::Serve => "serve",
        }
    }
}

/// Completion modes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Mode {
    /// `--poll`.
    Poll,
    /// `--interrupt`.
    Interrupt,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Poll => "poll",
            Mode::Interrupt => "interrupt",
        }
    }
}

/// Parsed command line of `cargo xtask compare`.
#[derive(Debug, PartialEq)]
pub(crate) struct Options {
    runs: usize,
    runtime: f64,
    drivers: Vec<Driver>,
    backends: Vec<Backend>,
    depths: Vec<u16>,
    modes: Vec<Mode>,
    /// Let the reference accept packed rings (libblkio never does).
    ref_packed: bool,
    /// Pin the back-end to CPU 1 and the driver to CPU 0 (`taskset`): with
    /// two CPUs and no pinning, the scheduler sometimes puts both on one CPU
    /// and sometimes not, which makes QD1 figures bimodal (3 vs 10 µs).
    pin: bool,
    json: bool,
    /// Extra arguments for every `vblk bench` run (`--vblk-arg`, repeatable), to compare a
    /// variant such as `--all-indirect` against the reference.
    vblk_args: Vec<String>,
}

/// Parses the arguments after `compare`.
pub(crate) fn parse_args(args: &[String]) -> Result<Options> {
    let mut o = Options {
        runs: DEFAULT_RUNS,
        runtime: DEFAULT_RUNTIME,
        drivers: vec![Driver::Uvirtio, Driver::Ref],
        backends: vec![Backend::Qsd, Backend::Serve],
        depths: DEFAULT_DEPTHS.to_vec(),
        modes: vec![Mode::Poll, Mode::Interrupt],
        ref_packed: false,
        pin: true,
        json: false,
        vblk_args: Vec::new(),
    };
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_string())),
            _ => (arg.as_str(), None),
        };
        let mut value = || -> Result<String> {
            inline.clone().or_else(|| iter.next().cloned()).ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))
        };
        match flag {
            "--runs" => {
                let v = value()?;
                o.runs =
                    v.parse().ok().filter(|&n| n > 0).ok_or_else(|| format!("--runs `{v}`: not a positive number"))?;
            }
            "--runtime" => {
                let v = value()?;
                o.runtime = v
                    .parse()
                    .ok()
                    .filter(|s: &f64| *s > 0.0 && s.is_finite())
                    .ok_or_else(|| format!("--runtime `{v}`: not a positive number of seconds"))?;
            }
            "--only" => {
                o.drivers = match value()?.as_str() {
                    "uvirtio" => vec![Driver::Uvirtio],
                    "ref" => vec![Driver::Ref],
                    other => return Err(format!("--only `{other}`: use uvirtio or ref")),
                }
            }
            "--backend" => {
                let v = value()?;
                o.backends = v
                    .split(',')
                    .map(|b| match b.trim() {
                        "qsd" => Ok(Backend::Qsd),
                        "serve" => Ok(Backend::Serve),
                        other => Err(format!("--backend `{other}`: use qsd, serve or both (qsd,serve)")),
                    })
                    .collect::<Result<Vec<_>>>()?;
            }
            "--depths" => {
                let v = value()?;
                o.depths = v
                    .split(',')
                    .map(|d| d.trim().parse::<u16>().ok().filter(|&n| n > 0))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| format!("--depths `{v}`: a comma-separated list of positive depths"))?;
            }
            "--modes" => {
                let v = value()?;
                o.modes = v
                    .split(',')
                    .map(|m| match m.trim() {
                        "poll" => Ok(Mode::Poll),
                        "interrupt" => Ok(Mode::Interrupt),
                        other => Err(format!("--modes: `{other}` is neither poll nor interrupt")),
                    })
                    .collect::<Result<Vec<_>>>()?;
            }
            "--vblk-arg" => {
                let v = value()?;
                if !v.starts_with("--") {
                    return Err(format!("--vblk-arg `{v}`: give a `vblk bench` option, such as --all-indirect"));
                }
                o.vblk_args.push(v);
            }
            "--ref-packed" if inline.is_none() => o.ref_packed = true,
            "--no-pin" if inline.is_none() => o.pin = false,
            "--json" if inline.is_none() => o.json = true,
            "-h" | "--help" => return Err(USAGE.to_string()),
            _ => return Err(format!("unexpected argument `{arg}`\n{USAGE}")),
        }
    }
    Ok(o)
}

// ---------------------------------------------------------------------------------------------
// A minimal JSON reader (xtask is plain std): enough for one bench result object.
// ---------------------------------------------------------------------------------------------

/// A JSON value.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Json {
    Null,
    Bool(bool),
    Num(f64),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

impl Json {
    /// Parses one JSON document (surrounding whitespace allowed).
    pub(crate) fn parse(text: &str) -> Result<Json> {
        let mut p = JsonParser { s: text.as_bytes(), i: 0 };
        let v = p.value()?;
        p.ws();
        if p.i != p.s.len() {
            return Err(format!("trailing characters at byte {}", p.i));
        }
        Ok(v)
    }

    /// The member at a `.`-separated path of object keys.
    pub(crate) fn get(&self, path: &str) -> Option<&Json> {
        path.split('.').try_fold(self, |v, key| match v {
            Json::Obj(members) => members.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        })
    }

    /// The number at `path`.
    pub(crate) fn num(&self, path: &str) -> Result<f64> {
        match self.get(path) {
            Some(Json::Num(n)) => Ok(*n),
            Some(other) => Err(format!("`{path}` is not a number: {other:?}")),
            None => Err(format!("no `{path}` in the result")),
        }
    }
}

struct JsonParser<'a> {
    s: &'a [u8],
    i: usize,
}

impl JsonParser<'_> {
    fn ws(&mut self) {
        while self.s.get(self.i).is_some_and(|c| c.is_ascii_whitespace()) {
            self.i += 1;
        }
    }

    fn err<T>(&self, what: &str) -> Result<T> {
        Err(format!("JSON: {what} at byte {}", self.i))
    }

    fn eat(&mut self, c: u8) -> Result {
        self.ws();
        if self.s.get(self.i) == Some(&c) {
            self.i += 1;
            Ok(())
        } else {
            self.err(&format!("expected `{}`", c as char))
        }
    }

    fn literal(&mut self, word: &str, v: Json) -> Result<Json> {
        if self.s[self.i..].starts_with(word.as_bytes()) {
            self.i += word.len();
            Ok(v)
        } else {
            self.err("unexpected word")
        }
    }

    fn value(&mut self) -> Result<Json> {
        self.ws();
        match self.s.get(self.i) {
            Some(b'{') => {
                self.i += 1;
                let mut members = Vec::new();
                self.ws();
                if self.s.get(self.i) == Some(&b'}') {
                    self.i += 1;
                    return Ok(Json::Obj(members));
                }
                loop {
                    self.ws();
                    let key = self.string()?;
                    self.eat(b':')?;
                    members.push((key, self.value()?));
                    self.ws();
                    match self.s.get(self.i) {
                        Some(b',') => self.i += 1,
                        Some(b'}') => {
                            self.i += 1;
                            return Ok(Json::Obj(members));
                        }
                        _ => return self.err("expected `,` or `}`"),
                    }
                }
            }
            Some(b'[') => {
                self.i += 1;
                let mut items = Vec::new();
                self.ws();
                if self.s.get(self.i) == Some(&b']') {
                    self.i += 1;
                    return Ok(Json::Arr(items));
                }
                loop {
                    items.push(self.value()?);
                    self.ws();
                    match self.s.get(self.i) {
                        Some(b',') => self.i += 1,
                        Some(b']') => {
                            self.i += 1;
                            return Ok(Json::Arr(items));
                        }
                        _ => return self.err("expected `,` or `]`"),
                    }
                }
            }
            Some(b'"') => Ok(Json::Str(self.string()?)),
            Some(b't') => self.literal("true", Json::Bool(true)),
            Some(b'f') => self.literal("false", Json::Bool(false)),
            Some(b'n') => self.literal("null", Json::Null),
            Some(c) if *c == b'-' || c.is_ascii_digit() => {
                let start = self.i;
                while self.s.get(self.i).is_some_and(|c| c.is_ascii_digit() || b"+-.eE".contains(c)) {
                    self.i += 1;
                }
                let text = std::str::from_utf8(&self.s[start..self.i]).unwrap_or("");
                text.parse().map(Json::Num).or_else(|_| self.err("bad number"))
            }
            _ => self.err("expected a value"),
        }
    }

    fn string(&mut self) -> Result<String> {
        if self.s.get(self.i) != Some(&b'"') {
            return self.err("expected a string");
        }
        self.i += 1;
        let mut out = Vec::new();
        loop {
            let Some(&c) = self.s.get(self.i) else { return self.err("unterminated string") };
            self.i += 1;
            match c {
                b'"' => return String::from_utf8(out).or_else(|_| self.err("invalid UTF-8")),
                b'\\' => {
                    let Some(&e) = self.s.get(self.i) else { return self.err("unterminated escape") };
                    self.i += 1;
                    match e {
                        b'n' => out.push(b'\n'),
                        b't' => out.push(b'\t'),
                        b'r' => out.push(b'\r'),
                        b'b' => out.push(8),
                        b'f' => out.push(12),
                        b'u' => {
                            let hex = self.s.get(self.i..self.i + 4).and_then(|h| std::str::from_utf8(h).ok());
                            let ch = hex.and_then(|h| u32::from_str_radix(h, 16).ok()).and_then(char::from_u32);
                            let Some(ch) = ch else { return self.err("bad \\u escape") };
                            self.i += 4;
                            out.extend_from_slice(ch.encode_utf8(&mut [0; 4]).as_bytes());
                        }
                        other => out.push(other),
                    }
                }
                c => out.push(c),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Results and medians
// ---------------------------------------------------------------------------------------------

/// The figures the table shows, from one run's JSON.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Figures {
    iops: f64,
    p50_ns: f64,
    p99_ns: f64,
    cpu_ns_per_io: f64,
    errors: f64,
    /// Kicks and sleeps on the completion eventfd per I/O, when the tool reports them (NaN
    /// otherwise): shown per run, to explain CPU per I/O.
    kicks_per_io: f64,
    waits_per_io: f64,
}

impl Figures {
    /// Reads the figures from a `vblk bench --json` object, checking that it describes the run
    /// that was asked for.
    pub(crate) fn from_json(v: &Json, iodepth: u16, mode: Mode) -> Result<Figures> {
        if v.num("iodepth")? != f64::from(iodepth) {
            return Err(format!("result is for iodepth {}, not {iodepth}", v.num("iodepth")?));
        }
        match v.get("mode") {
            Some(Json::Str(m)) if m == mode.name() => {}
            other => return Err(format!("result is for mode {other:?}, not {}", mode.name())),
        }
        let ios = v.num("ios")?;
        let per_io = |key: &str| match v.num(key) {
            Ok(n) if ios > 0.0 => n / ios,
            _ => f64::NAN,
        };
        Ok(Figures {
            iops: v.num("iops")?,
            p50_ns: v.num("lat_ns.p50")?,
            p99_ns: v.num("lat_ns.p99")?,
            cpu_ns_per_io: v.num("cpu_ns_per_io")?,
            errors: v.num("errors")?,
            kicks_per_io: per_io("kicks"),
            waits_per_io: per_io("waits"),
        })
    }
}

/// The JSON object in a bench tool's stdout: its last line that starts with `{`.
pub(crate) fn result_line(stdout: &str) -> Option<&str> {
    stdout.lines().map(str::trim).rev().find(|l| l.starts_with('{'))
}

/// The median (mean of the middle two for an even count); `None` when empty.
pub(crate) fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 })
}

/// Per-field medians of several runs.
pub(crate) fn median_figures(runs: &[Figures]) -> Option<Figures> {
    let m = |f: fn(&Figures) -> f64| median(&runs.iter().map(f).collect::<Vec<_>>());
    Some(Figures {
        iops: m(|f| f.iops)?,
        p50_ns: m(|f| f.p50_ns)?,
        p99_ns: m(|f| f.p99_ns)?,
        cpu_ns_per_io: m(|f| f.cpu_ns_per_io)?,
        errors: runs.iter().map(|f| f.errors).sum(),
        kicks_per_io: m(|f| f.kicks_per_io).unwrap_or(f64::NAN),
        waits_per_io: m(|f| f.waits_per_io).unwrap_or(f64::NAN),
    })
}

/// One configuration: back-end, depth, mode.
type Config = (Backend, u16, Mode);

/// The ratios uvirtio/ref of one figure over the pairs of runs made one after the other (run
/// `i` of each driver): median, lowest, highest. On a machine whose speed drifts between
/// minutes, a pair sees the same state, so the spread says how far one comparison can be
/// trusted; the ratio of the medians alone does not.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct PairRatios {
    median: f64,
    min: f64,
    max: f64,
}

/// [`PairRatios`] of `figure` from the runs of each driver, keyed by run index; `None` without a
/// complete pair.
pub(crate) fn pair_ratios(
    uvirtio: &BTreeMap<usize, Figures>,
    reference: &BTreeMap<usize, Figures>,
    figure: fn(&Figures) -> f64,
) -> Option<PairRatios> {
    let ratios: Vec<f64> = uvirtio
        .iter()
        .filter_map(|(i, u)| reference.get(i).map(|r| figure(u) / figure(r)))
        .filter(|x| x.is_finite())
        .collect();
    Some(PairRatios {
        median: median(&ratios)?,
        min: ratios.iter().copied().fold(f64::INFINITY, f64::min),
        max: ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max),
    })
}

/// One row of the table: a configuration, each driver's medians, and the paired IOPS and CPU
/// ratios.
pub(crate) struct Row {
    config: Config,
    uvirtio: Option<Figures>,
    reference: Option<Figures>,
    iops_pairs: Option<PairRatios>,
    cpu_pairs: Option<PairRatios>,
}

/// One run, kept for `--json`.
struct Run {
    config: Config,
    driver: Driver,
    index: usize,
    /// The tool's JSON object as printed, or why there is none.
    outcome: std::result::Result<(String, Figures), String>,
}

/// Issue 3's targets for one row: uvirtio's IOPS at least the reference's at every depth, and
/// at most half its CPU per I/O in interrupt mode at depth 32 and above.
pub(crate) fn verdict(depth: u16, mode: Mode, uvirtio: &Figures, reference: &Figures) -> &'static str {
    let iops_ok = uvirtio.iops >= reference.iops;
    let cpu_applies = mode == Mode::Interrupt && depth >= 32;
    let cpu_ok = !cpu_applies || uvirtio.cpu_ns_per_io <= reference.cpu_ns_per_io / 2.0;
    match (iops_ok, cpu_ok) {
        (true, true) => "met",
        (false, true) => "IOPS",
        (true, false) => "CPU",
        (false, false) => "IOPS, CPU",
    }
}

/// The markdown table of medians, with the paired ratios' median and range beside the ratios
/// of the medians.
pub(crate) fn table(rows: &[Row]) -> String {
    let us = |ns: f64| format!("{:.1}", ns / 1000.0);
    let cell = |f: &Option<Figures>, g: &dyn Fn(&Figures) -> String| f.as_ref().map_or_else(|| "-".into(), g);
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
        _ => "-".into(),
    };
    let mut out = String::new();
    out.push_str(
        "| back-end | QD | mode | IOPS uvirtio | IOPS ref | IOPS ratio | IOPS ratio, pairs | p50 µs uvirtio \
         | p50 µs ref | p99 µs uvirtio | p99 µs ref | CPU ns/IO uvirtio | CPU ns/IO ref | CPU ratio \
         | CPU ratio, pairs | target |\n",
    );
    out.push_str("|---|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|\n");
    let pairs = |p: &Option<PairRatios>| {
        p.map_or_else(|| "-".into(), |p| format!("{:.2} ({:.2}–{:.2})", p.median, p.min, p.max))
    };
    for Row { config: (backend, depth, mode), uvirtio: u, reference: r, iops_pairs, cpu_pairs } in rows {
        let target = match (u, r) {
            (Some(u), Some(r)) => verdict(*depth, *mode, u, r),
            _ => "-",
        };
        let _ = writeln!(
            out,
            "| {} | {depth} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {target} |",
            backend.name(),
            mode.name(),
            cell(u, &|f| format!("{:.0}", f.iops)),
            cell(r, &|f| format!("{:.0}", f.iops)),
            ratio(u.map(|f| f.iops), r.map(|f| f.iops)),
            pairs(iops_pairs),
            cell(u, &|f| us(f.p50_ns)),
            cell(r, &|f| us(f.p50_ns)),
            cell(u, &|f| us(f.p99_ns)),
            cell(r, &|f| us(f.p99_ns)),
            cell(u, &|f| format!("{:.0}", f.cpu_ns_per_io)),
            cell(r, &|f| format!("{:.0}", f.cpu_ns_per_io)),
            ratio(u.map(|f| f.cpu_ns_per_io), r.map(|f| f.cpu_ns_per_io)),
            pairs(cpu_pairs),
        );
    }
    out
}

/// `s` as a JSON string literal.
fn json_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Every raw run as one JSON document: `{"runs": [{"backend", "iodepth", "mode", "driver",
/// "run", "result" | "error"}, ...]}`; `result` is the tool's object as it printed it.
fn runs_json(opts: &Options, runs: &[Run]) -> String {
    let mut out = format!("{{\"runtime_s\":{},\"runs_per_driver\":{},\"runs\":[", opts.runtime, opts.runs);
    for (i, run) in runs.iter().enumerate() {
        let (backend, depth, mode) = run.config;
        if i > 0 {
            out.push(',');
        }
        let _ = write!(
            out,
            "\n{{\"backend\":{},\"iodepth\":{depth},\"mode\":{},\"driver\":{},\"run\":{},",
            json_str(backend.name()),
            json_str(mode.name()),
            json_str(run.driver.name()),
            run.index + 1
        );
        match &run.outcome {
            Ok((raw, _)) => {
                let _ = write!(out, "\"result\":{raw}}}");
            }
            Err(e) => {
                let _ = write!(out, "\"error\":{}}}", json_str(e));
            }
        }
    }
    out.push_str("\n]}");
    out
}

// ---------------------------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------------------------

/// A back-end process, killed (and reaped) when dropped: also on errors and panics.
struct BackendProcess {
    backend: Backend,
    child: Child,
    socket: PathBuf,
    command: Cmd,
}

impl BackendProcess {
    /// Starts `command` and waits for it to create `socket`.
    fn start(backend: Backend, command: Cmd, socket: PathBuf) -> Result<Self> {
        let _ = fs::remove_file(&socket);
        eprintln!("$ {}", command.display());
        let child = Command::new(&command.program)
            .args(&command.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot start `{}`: {e}", command.program))?;
        let mut p = BackendProcess { backend, child, socket, command };
        let t0 = Instant::now();
        while !p.socket.exists() {
            if let Ok(Some(status)) = p.child.try_wait() {
                return Err(format!("{} exited ({status}) before creating {}", backend.name(), p.socket.display()));
            }
            if t0.elapsed() > START_TIMEOUT {
                return Err(format!(
                    "{} did not create {} within {START_TIMEOUT:?}",
                    backend.name(),
                    p.socket.display()
                ));
            }
            thread::sleep(Duration::from_millis(20));
        }
        Ok(p)
    }

    /// Restarts the process if it has exited (a run may have made it fail).
    fn ensure_running(&mut self) -> Result {
        if let Ok(Some(status)) = self.child.try_wait() {
            eprintln!("compare: {} exited ({status}); restarting it", self.backend.name());
            let fresh = BackendProcess::start(self.backend, clone_cmd(&self.command), self.socket.clone())?;
            *self = fresh;
        }
        Ok(())
    }
}

impl Drop for BackendProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_file(&self.socket);
    }
}

fn clone_cmd(c: &Cmd) -> Cmd {
    Cmd { program: c.program.clone(), args: c.args.clone(), envs: c.envs.clone() }
}

/// Runs one bench command with a time limit; returns its stdout, or an error with its stderr.
fn run_bench(command: &Cmd, limit: Duration) -> Result<String> {
    let mut child = Command::new(&command.program)
        .args(&command.args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start `{}`: {e}", command.program))?;
    let mut stdout = child.stdout.take().ok_or("no stdout pipe")?;
    let mut stderr = child.stderr.take().ok_or("no stderr pipe")?;
    let out_reader = thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err_reader = thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let t0 = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().map_err(|e| format!("waiting for `{}`: {e}", command.program))? {
            break Some(status);
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(20));
    };
    let out = out_reader.join().unwrap_or_default();
    let err = err_reader.join().unwrap_or_default();
    let err = err.trim();
    match status {
        Some(s) if s.success() => Ok(out),
        Some(s) => Err(format!("`{}` failed ({s}): {err}", command.display())),
        None => Err(format!("`{}` did not finish within {limit:?} and was killed: {err}", command.display())),
    }
}

// ---------------------------------------------------------------------------------------------
// The command
// ---------------------------------------------------------------------------------------------

/// `cargo xtask compare`.
pub(crate) fn compare(root: &Path, args: &[String]) -> Result {
    let opts = parse_args(args)?;

    if opts.backends.contains(&Backend::Qsd) && probe("qemu-storage-daemon", ["--version"]).is_none() {
        return Err("qemu-storage-daemon not found: install the Debian package qemu-system-common \
                    (apt-get install qemu-system-common)"
            .into());
    }

    // Builds: vblk (bench and serve) in the workspace; the reference in its own target dir.
    let target = target_dir(root)?;
    let vblk = target.join("release").join("vblk");
    Cmd::cargo(["build", "--release", "--quiet", "-p", "vblk"]).run_in(root)?;
    let ref_target = target.join(REF_TARGET_SUBDIR);
    let ref_bin = ref_target.join("release").join(REF_BIN);
    if opts.drivers.contains(&Driver::Ref) {
        Cmd::cargo(["build", "--release", "--quiet", "--locked"])
            .env("CARGO_TARGET_DIR", &ref_target.display().to_string())
            .run_in(&root.join(REF_DIR))?;
    }

    let tmp = TempDir::new("uvirtio-compare")?;
    let mut runs: Vec<Run> = Vec::new();
    let limit = Duration::from_secs_f64(opts.runtime) + RUN_GRACE;
    for &backend in &opts.backends {
        let socket = tmp.0.join(format!("{}.sock", backend.name()));
        let command = match backend {
            Backend::Qsd => Cmd::new(
                "qemu-storage-daemon",
                [
                    format!("--blockdev=driver=null-co,node-name=null0,size={DEVICE_BYTES},read-zeroes=on"),
                    format!(
                        "--export=type=vhost-user-blk,id=exp0,node-name=null0,addr.type=unix,addr.path={},\
                         num-queues=1,writable=on",
                        socket.display()
                    ),
                ],
            ),
            Backend::Serve => Cmd::new(
                &vblk.display().to_string(),
                [
                    "serve".to_string(),
                    "--socket".into(),
                    socket.display().to_string(),
                    "--size".into(),
                    DEVICE_BYTES.to_string(),
                    "--queues".into(),
                    "1".into(),
                    "--queue-size".into(),
                    SERVE_QUEUE_SIZE.to_string(),
                ],
            ),
        };
        let command = if opts.pin { pinned(command, BACKEND_CPU) } else { command };
        let mut process = BackendProcess::start(backend, command, socket.clone())?;
        // Drivers that failed their first run on this back-end: a set-up problem every later
        // run would repeat, so they sit out the rest of this back-end.
        let mut benched: Vec<Driver> = Vec::new();
        for &depth in &opts.depths {
            for &mode in &opts.modes {
                for index in 0..opts.runs {
                    for &driver in &opts.drivers {
                        if benched.contains(&driver) {
                            continue;
                        }
                        process.ensure_running()?;
                        let program = match driver {
                            Driver::Uvirtio => vblk.display().to_string(),
                            Driver::Ref => ref_bin.display().to_string(),
                        };
                        let mut bench_args: Vec<String> = Vec::new();
                        if driver == Driver::Uvirtio {
                            bench_args.push("bench".into());
                        }
                        bench_args.extend([
                            "--vhost-user".to_string(),
                            socket.display().to_string(),
                            "--rw".into(),
                            "randread".into(),
                            "--bs".into(),
                            BS.into(),
                            "--iodepth".into(),
                            depth.to_string(),
                            "--queues".into(),
                            "1".into(),
                            "--runtime".into(),
                            opts.runtime.to_string(),
                            format!("--{}", mode.name()),
                            "--json".into(),
                        ]);
                        if driver == Driver::Ref && opts.ref_packed {
                            bench_args.push("--packed".into());
                        }
                        if driver == Driver::Uvirtio {
                            bench_args.extend(opts.vblk_args.iter().cloned());
                        }
                        let cmd = Cmd::new(&program, bench_args);
                        let cmd = if opts.pin { pinned(cmd, DRIVER_CPU) } else { cmd };
                        eprint!(
                            "compare: {} QD{depth} {} {} run {}/{} ... ",
                            backend.name(),
                            mode.name(),
                            driver.name(),
                            index + 1,
                            opts.runs
                        );
                        let _ = std::io::stderr().flush();
                        let outcome = run_bench(&cmd, limit).and_then(|stdout| {
                            let line = result_line(&stdout)
                                .ok_or_else(|| format!("`{}` printed no JSON object", cmd.display()))?;
                            let figures = Figures::from_json(&Json::parse(line)?, depth, mode)?;
                            Ok((line.to_string(), figures))
                        });
                        match &outcome {
                            Ok((_, f)) => eprintln!(
                                "{:.0} IOPS, p50 {:.1} µs, {:.0} CPU ns/IO, {:.3} kicks/IO, {:.3} waits/IO{}",
                                f.iops,
                                f.p50_ns / 1000.0,
                                f.cpu_ns_per_io,
                                f.kicks_per_io,
                                f.waits_per_io,
                                if f.errors > 0.0 { format!(", {} ERRORS", f.errors) } else { String::new() }
                            ),
                            Err(e) => eprintln!("FAILED: {e}"),
                        }
                        let never_ran =
                            !runs.iter().any(|r| r.config.0 == backend && r.driver == driver && r.outcome.is_ok());
                        if outcome.is_err() && never_ran {
                            eprintln!("compare: {} skips the rest of {}", driver.name(), backend.name());
                            benched.push(driver);
                        }
                        runs.push(Run { config: (backend, depth, mode), driver, index, outcome });
                    }
                }
            }
        }
        drop(process);
    }

    // Medians per configuration and driver, in the order measured.
    let mut grouped: BTreeMap<(Config, Driver), BTreeMap<usize, Figures>> = BTreeMap::new();
    let mut configs: Vec<Config> = Vec::new();
    for run in &runs {
        if !configs.contains(&run.config) {
            configs.push(run.config);
        }
        if let Ok((_, f)) = &run.outcome {
            grouped.entry((run.config, run.driver)).or_default().insert(run.index, *f);
        }
    }
    let none = BTreeMap::new();
    let of = |c: Config, d: Driver| grouped.get(&(c, d)).unwrap_or(&none);
    let med = |c: Config, d: Driver| median_figures(&of(c, d).values().copied().collect::<Vec<_>>());
    let rows: Vec<Row> = configs
        .iter()
        .map(|&c| Row {
            config: c,
            uvirtio: med(c, Driver::Uvirtio),
            reference: med(c, Driver::Ref),
            iops_pairs: pair_ratios(of(c, Driver::Uvirtio), of(c, Driver::Ref), |f| f.iops),
            cpu_pairs: pair_ratios(of(c, Driver::Uvirtio), of(c, Driver::Ref), |f| f.cpu_ns_per_io),
        })
        .collect();

    let summary = format!(
        "\nMedians of {} alternating run(s) per driver, {} s each, 4 KiB random reads, one queue \
         (uvirtio = vblk bench, ref = virtio-driver 0.6.1); ratios are uvirtio/ref, of the medians \
         and, for \"pairs\", the median (lowest–highest) of the ratios of runs made one after the \
         other; target (on the ratios of the medians): IOPS ratio >= 1 everywhere, CPU ratio <= \
         0.5 in interrupt mode at QD >= 32.\n\n{}",
        opts.runs,
        opts.runtime,
        table(&rows)
    );
    if opts.json {
        eprint!("{summary}");
        println!("{}", runs_json(&opts, &runs));
    } else {
        print!("{summary}");
    }

    let failed: Vec<String> = runs
        .iter()
        .filter_map(|r| r.outcome.as_ref().err().map(|e| format!("{} {}: {e}", r.config.0.name(), r.driver.name())))
        .collect();
    let with_errors = runs.iter().filter(|r| matches!(&r.outcome, Ok((_, f)) if f.errors > 0.0)).count();
    if !failed.is_empty() {
        return Err(format!("{} run(s) failed; first: {}", failed.len(), failed[0]));
    }
    if with_errors > 0 {
        return Err(format!("{with_errors} run(s) reported I/O errors"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"{"bs":4096,"bw_bytes_per_s":216354168.45,"cpu_ns_per_io":8960.7,"errors":0,
        "iodepth":32,"iops":52820.8,"ios":105642,"kicks":52821,"waits":0,"lat_ns":{"mean":18932.4,"p50":17871,"p99":38239,
        "p99_9":54847},"mode":"interrupt","queues":1,"read_ios":105642,"runtime_s":2.000005986,
        "rw":"randread","target":"vhost-user:/tmp/a \"b\"\u00e9","write_ios":0}"#;

    #[test]
    fn parses_a_bench_result() {
        let v = Json::parse(SAMPLE).unwrap();
        let f = Figures::from_json(&v, 32, Mode::Interrupt).unwrap();
        let want = Figures {
            iops: 52820.8,
            p50_ns: 17871.0,
            p99_ns: 38239.0,
            cpu_ns_per_io: 8960.7,
            errors: 0.0,
            kicks_per_io: 0.5,
            waits_per_io: 0.0,
        };
        assert_eq!(f, want);
        // Tools that do not count kicks and waits still parse.
        let old = Json::parse(&SAMPLE.replace("\"kicks\":52821,\"waits\":0,", "")).unwrap();
        let f = Figures::from_json(&old, 32, Mode::Interrupt).unwrap();
        assert!(f.kicks_per_io.is_nan() && f.waits_per_io.is_nan() && f.iops == want.iops);
        assert_eq!(v.get("target"), Some(&Json::Str("vhost-user:/tmp/a \"b\"é".into())));
        assert!(Figures::from_json(&v, 1, Mode::Interrupt).is_err());
        assert!(Figures::from_json(&v, 32, Mode::Poll).is_err());
        assert!(Json::parse("{\"a\":1} x").is_err());
        assert!(Json::parse("{\"a\":}").is_err());
        assert_eq!(
            Json::parse(" [true, null, -1.5e3] ").unwrap(),
            Json::Arr(vec![Json::Bool(true), Json::Null, Json::Num(-1500.0)])
        );
    }

    #[test]
    fn finds_the_json_line_among_other_output() {
        let out = "warming up\n{\"iops\":1}\n";
        assert_eq!(result_line(out), Some("{\"iops\":1}"));
        assert_eq!(result_line("no json here\n"), None);
    }

    #[test]
    fn medians() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0]), Some(3.0));
        assert_eq!(median(&[5.0, 1.0, 3.0]), Some(3.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        let f = |iops: f64, cpu: f64| Figures {
            iops,
            p50_ns: iops,
            p99_ns: 1.0,
            cpu_ns_per_io: cpu,
            errors: 0.0,
            kicks_per_io: 0.0,
            waits_per_io: 0.0,
        };
        let m = median_figures(&[f(1.0, 30.0), f(9.0, 10.0), f(5.0, 20.0)]).unwrap();
        assert_eq!((m.iops, m.cpu_ns_per_io, m.p50_ns), (5.0, 20.0, 5.0));
    }

    #[test]
    fn verdicts_follow_issue_3() {
        let f = |iops: f64, cpu: f64| Figures {
            iops,
            p50_ns: 0.0,
            p99_ns: 0.0,
            cpu_ns_per_io: cpu,
            errors: 0.0,
            kicks_per_io: 0.0,
            waits_per_io: 0.0,
        };
        assert_eq!(verdict(1, Mode::Interrupt, &f(10.0, 100.0), &f(9.0, 100.0)), "met");
        assert_eq!(verdict(32, Mode::Interrupt, &f(10.0, 60.0), &f(9.0, 100.0)), "CPU");
        assert_eq!(verdict(128, Mode::Poll, &f(8.0, 60.0), &f(9.0, 100.0)), "IOPS");
        assert_eq!(verdict(128, Mode::Interrupt, &f(10.0, 50.0), &f(9.0, 100.0)), "met");
    }

    #[test]
    fn parses_arguments() {
        let a = |v: &[&str]| parse_args(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        let d = a(&[]).unwrap();
        assert_eq!((d.runs, d.runtime, d.depths.as_slice(), d.json), (3, 5.0, &[1, 32, 128][..], false));
        let o = a(&["--runs", "1", "--runtime=2", "--only", "ref", "--modes", "poll", "--depths", "1,8", "--json"])
            .unwrap();
        assert_eq!(
            (o.runs, o.runtime, o.drivers, o.modes, o.depths, o.json),
            (1, 2.0, vec![Driver::Ref], vec![Mode::Poll], vec![1, 8], true)
        );
        assert!(!o.ref_packed && a(&["--ref-packed"]).unwrap().ref_packed);
        assert!(o.pin && !a(&["--no-pin"]).unwrap().pin);
        assert_eq!(a(&["--backend", "serve,qsd"]).unwrap().backends, [Backend::Serve, Backend::Qsd]);
        assert_eq!(a(&["--backend=qsd"]).unwrap().backends, [Backend::Qsd]);
        assert!(a(&["--backend", "qsd,spdk"]).is_err());
        assert!(a(&["--runs", "0"]).is_err());
        assert!(a(&["--only", "fio"]).is_err());
        assert!(a(&["--bogus"]).is_err());
        assert_eq!(
            a(&["--vblk-arg=--all-indirect", "--vblk-arg", "--split"]).unwrap().vblk_args,
            ["--all-indirect", "--split"]
        );
        assert!(a(&["--vblk-arg", "all-indirect"]).is_err());
    }

    #[test]
    fn json_output_embeds_raw_results() {
        let opts = parse_args(&[]).unwrap();
        let f = Figures {
            iops: 1.0,
            p50_ns: 1.0,
            p99_ns: 1.0,
            cpu_ns_per_io: 1.0,
            errors: 0.0,
            kicks_per_io: 0.0,
            waits_per_io: 0.0,
        };
        let runs = vec![
            Run {
                config: (Backend::Qsd, 1, Mode::Poll),
                driver: Driver::Ref,
                index: 0,
                outcome: Ok(("{\"iops\":1}".into(), f)),
            },
            Run {
                config: (Backend::Serve, 1, Mode::Poll),
                driver: Driver::Uvirtio,
                index: 0,
                outcome: Err("boom \"x\"".into()),
            },
        ];
        let v = Json::parse(&runs_json(&opts, &runs)).unwrap();
        let Some(Json::Arr(items)) = v.get("runs") else { panic!("no runs array") };
        assert_eq!(items[0].num("result.iops"), Ok(1.0));
        assert_eq!(items[1].get("error"), Some(&Json::Str("boom \"x\"".into())));
        let row = |uvirtio| Row {
            config: (Backend::Qsd, 1, Mode::Poll),
            uvirtio,
            reference: Some(f),
            iops_pairs: None,
            cpu_pairs: None,
        };
        let t = table(&[row(None)]);
        assert!(t.lines().nth(2).unwrap().starts_with("| qsd | 1 | poll | - | 1 | - | - |"));
        let half = |x: f64| Figures { iops: x, cpu_ns_per_io: x, ..f };
        let u: BTreeMap<usize, Figures> = [(0, half(1.0)), (1, half(3.0)), (2, half(2.0))].into();
        let r: BTreeMap<usize, Figures> = [(0, half(2.0)), (1, half(2.0)), (3, half(1.0))].into();
        let p = pair_ratios(&u, &r, |f| f.iops).unwrap();
        // Runs 0 and 1 pair up; run 2 of uvirtio and run 3 of ref have no partner.
        assert_eq!((p.median, p.min, p.max), (1.0, 0.5, 1.5));
        assert_eq!(pair_ratios(&u, &BTreeMap::new(), |f| f.iops), None);
        let t = table(&[Row { iops_pairs: Some(p), ..row(Some(half(1.0))) }]);
        assert!(t.lines().nth(2).unwrap().contains("| 1.00 (0.50–1.50) |"), "{t}");
    }
}
