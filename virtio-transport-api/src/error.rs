//! The one error type of every transport.

use std::fmt;

/// The step of the transport's work that failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Step {
    /// Opening or connecting to the device or backend.
    Connect,
    /// Resetting the device.
    Reset,
    /// Reading or writing the device status.
    Status,
    /// Reading, writing or negotiating feature bits.
    Features,
    /// Reading the device configuration space.
    Config,
    /// Setting up, enabling or querying the virtqueue of this index.
    Queue(u16),
    /// Allocating, mapping or translating device-visible memory.
    Memory,
    /// Notifying the device (a kick).
    Notify,
    /// Waiting for a used-buffer notification.
    Wait,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Connect => f.write_str("connect"),
            Step::Reset => f.write_str("reset"),
            Step::Status => f.write_str("device status"),
            Step::Features => f.write_str("feature negotiation"),
            Step::Config => f.write_str("config space"),
            Step::Queue(i) => write!(f, "queue {i}"),
            Step::Memory => f.write_str("DMA memory"),
            Step::Notify => f.write_str("notify"),
            Step::Wait => f.write_str("wait for completion"),
        }
    }
}

/// Why a step failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum Cause {
    /// A system call failed; [`Error::raw_os_error`] gives the errno.
    Os(std::io::Error),
    /// The device or backend broke the transport protocol, or refused a request.
    Protocol(String),
    /// The device does not offer feature bits the driver requires.
    MissingFeatures {
        /// The bits required and not offered.
        missing: u64,
        /// Everything the device offered.
        offered: u64,
    },
    /// The device cleared FEATURES_OK: it does not accept this feature set.
    FeaturesNotAccepted {
        /// The features the driver wrote.
        features: u64,
    },
    /// The configuration generation kept changing while the config was read.
    ConfigGenerationUnstable {
        /// Reads attempted.
        attempts: u32,
    },
    /// The device set DEVICE_NEEDS_RESET.
    NeedsReset,
    /// The backend went away (closed the connection, died, or stopped answering);
    /// every later operation fails the same way.
    Disconnected(String),
    /// The transport or device cannot do this.
    Unsupported(String),
    /// An argument is out of range (queue index, size, address, length ...).
    InvalidArgument(String),
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Cause::Os(e) => write!(f, "{e}"),
            Cause::Protocol(s) => write!(f, "protocol error: {s}"),
            Cause::MissingFeatures { missing, offered } => {
                write!(f, "device lacks required features {missing:#x} (offered {offered:#x})")
            }
            Cause::FeaturesNotAccepted { features } => {
                write!(f, "device did not accept features {features:#x} (FEATURES_OK not set on read-back)")
            }
            Cause::ConfigGenerationUnstable { attempts } => {
                write!(f, "config generation still changing after {attempts} reads")
            }
            Cause::NeedsReset => f.write_str("device needs reset"),
            Cause::Disconnected(s) => write!(f, "backend disconnected: {s}"),
            Cause::Unsupported(s) => write!(f, "unsupported: {s}"),
            Cause::InvalidArgument(s) => write!(f, "invalid argument: {s}"),
        }
    }
}

/// A transport error: which transport, which step, and why.
///
/// Displays as `vhost-user: queue 1 (SET_VRING_ADDR): backend disconnected: ...`.
pub struct Error {
    /// Boxed so that `Result<T, Error>`, and the error types of device crates
    /// that wrap it, stay small on the hot paths that return them.
    inner: Box<Inner>,
}

#[derive(Debug)]
struct Inner {
    transport: &'static str,
    step: Step,
    context: Option<String>,
    cause: Cause,
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Error")
            .field("transport", &self.inner.transport)
            .field("step", &self.inner.step)
            .field("context", &self.inner.context)
            .field("cause", &self.inner.cause)
            .finish()
    }
}

impl Error {
    /// An error of `transport` at `step` because of `cause`.
    pub fn new(transport: &'static str, step: Step, cause: Cause) -> Self {
        Error { inner: Box::new(Inner { transport, step, context: None, cause }) }
    }

    /// An OS error (`errno`) of `transport` at `step`.
    pub fn os(transport: &'static str, step: Step, err: std::io::Error) -> Self {
        Self::new(transport, step, Cause::Os(err))
    }

    /// The last OS error (`errno`) of `transport` at `step`.
    pub fn last_os(transport: &'static str, step: Step) -> Self {
        Self::os(transport, step, std::io::Error::last_os_error())
    }

    /// Adds what was being done (a request name, a path) to the message.
    pub fn with_context(mut self, context: impl Into<String>) -> Self {
        self.inner.context = Some(context.into());
        self
    }

    /// Name of the transport that failed (`"vhost-user"`, `"vdpa"`, `"pci"` ...).
    pub fn transport(&self) -> &'static str {
        self.inner.transport
    }

    /// The step that failed.
    pub fn step(&self) -> Step {
        self.inner.step
    }

    /// Extra context, such as the request or path.
    pub fn context(&self) -> Option<&str> {
        self.inner.context.as_deref()
    }

    /// Why it failed.
    pub fn cause(&self) -> &Cause {
        &self.inner.cause
    }

    /// The errno, when the cause is an OS error.
    pub fn raw_os_error(&self) -> Option<i32> {
        match &self.inner.cause {
            Cause::Os(e) => e.raw_os_error(),
            _ => None,
        }
    }

    /// Whether the backend is gone (every later call will fail too).
    pub fn is_disconnected(&self) -> bool {
        matches!(self.inner.cause, Cause::Disconnected(_))
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.inner.transport, self.inner.step)?;
        if let Some(c) = &self.inner.context {
            write!(f, " ({c})")?;
        }
        write!(f, ": {}", self.inner.cause)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.inner.cause {
            Cause::Os(e) => Some(e),
            _ => None,
        }
    }
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_transport_step_context_and_cause() {
        let e = Error::new("vhost-user", Step::Queue(1), Cause::Disconnected("connection closed".into()))
            .with_context("SET_VRING_ADDR");
        assert_eq!(e.to_string(), "vhost-user: queue 1 (SET_VRING_ADDR): backend disconnected: connection closed");
        assert!(e.is_disconnected());
        assert_eq!(e.step(), Step::Queue(1));
        assert_eq!(e.transport(), "vhost-user");

        let e = Error::new("pci", Step::Features, Cause::MissingFeatures { missing: 1 << 32, offered: 0x30 });
        assert_eq!(
            e.to_string(),
            "pci: feature negotiation: device lacks required features 0x100000000 (offered 0x30)"
        );
        let e = Error::new("vdpa", Step::Features, Cause::FeaturesNotAccepted { features: 0x1_0000_0000 });
        assert!(e.to_string().contains("FEATURES_OK"));
        let e = Error::new("vdpa", Step::Config, Cause::ConfigGenerationUnstable { attempts: 8 });
        assert_eq!(e.to_string(), "vdpa: config space: config generation still changing after 8 reads");
    }

    #[test]
    fn os_errors_keep_errno_and_source() {
        let e = Error::os("vhost-user", Step::Connect, std::io::Error::from_raw_os_error(libc::ENOENT))
            .with_context("/tmp/missing.sock");
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
        assert!(std::error::Error::source(&e).is_some());
        let s = e.to_string();
        assert!(s.starts_with("vhost-user: connect (/tmp/missing.sock): "), "{s}");
        assert!(s.contains("No such file or directory"), "{s}");
        assert!(!e.is_disconnected());
    }
}
