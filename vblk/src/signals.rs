//! SIGINT and SIGTERM: a clean stop, and no socket left behind.
//!
//! Commands that can stop early (`bench`, `verify`) call [`set_graceful`]: the first signal
//! then only sets a flag they poll ([`stop_requested`]), and they finish normally, which drops
//! the embedded server and removes its socket. Otherwise, or on a second signal, the handler
//! removes the embedded server's socket and directory (async-signal-safe `unlink`/`rmdir`)
//! and exits at once with status 130.

use std::ffi::CString;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

static STOP: AtomicBool = AtomicBool::new(false);
static GRACEFUL: AtomicBool = AtomicBool::new(false);
/// The embedded server's socket and its directory, removed by the handler.
static CLEANUP: OnceLock<(CString, CString)> = OnceLock::new();

extern "C" fn on_signal(_sig: libc::c_int) {
    if GRACEFUL.load(Ordering::SeqCst) && !STOP.swap(true, Ordering::SeqCst) {
        return;
    }
    if let Some((sock, dir)) = CLEANUP.get() {
        // SAFETY: unlink and rmdir are async-signal-safe; the strings live in a static that is
        // never dropped or changed once set.
        unsafe {
            libc::unlink(sock.as_ptr());
            libc::rmdir(dir.as_ptr());
        }
    }
    // SAFETY: _exit is async-signal-safe and does not return.
    unsafe { libc::_exit(130) }
}

/// Installs the handler for SIGINT and SIGTERM.
pub fn install() {
    let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: `on_signal` only does async-signal-safe work (atomics, unlink, rmdir, _exit).
        unsafe {
            libc::signal(sig, handler);
        }
    }
}

/// Remembers the files the handler removes on a hard stop (the first call wins).
pub fn cleanup_on_signal(socket: &std::path::Path, dir: &std::path::Path) {
    use std::os::unix::ffi::OsStrExt;
    if let (Ok(s), Ok(d)) = (CString::new(socket.as_os_str().as_bytes()), CString::new(dir.as_os_str().as_bytes())) {
        let _ = CLEANUP.set((s, d));
    }
}

/// From now on the first signal only sets the stop flag.
pub fn set_graceful() {
    GRACEFUL.store(true, Ordering::SeqCst);
}

/// Whether a signal asked the command to stop.
pub fn stop_requested() -> bool {
    STOP.load(Ordering::Relaxed)
}
