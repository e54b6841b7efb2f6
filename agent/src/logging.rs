//! Structured logs: tracing for the agent, with kernel-side aya-log records forwarded into the
//! same stream under target `weft::kernel`.
use std::{
    io::IsTerminal as _,
    sync::{Mutex, OnceLock},
};

use tracing_subscriber::{EnvFilter, Registry, fmt, prelude::*, reload};

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid --log-level {filter:?}")]
    Filter {
        filter: String,
        #[source]
        source: tracing_subscriber::filter::ParseError,
    },
    #[error("a global logger is already installed")]
    AlreadyInstalled,
    #[error("the log filter cannot be changed: logging was not set up by `init`")]
    NotReloadable,
    #[error("cannot read the kernel programs' log records")]
    KernelLogs(#[source] std::io::Error),
}

/// The installed filter, replaceable at run time (`weft log-level`), and its text.
static FILTER: OnceLock<(reload::Handle<EnvFilter, Registry>, Mutex<String>)> = OnceLock::new();

/// kube-client logs every failed HTTP response at ERROR; the Kubernetes source reports the
/// same failures once, with the kind and what the agent does about it. Silenced unless the
/// filter names kube_client itself.
const KUBE_CLIENT_QUIET: &str = "kube_client::client::builder=off";

fn parse(filter: &str) -> Result<EnvFilter, Error> {
    let full = if filter.contains("kube_client") {
        filter.to_owned()
    } else {
        format!("{filter},{KUBE_CLIENT_QUIET}")
    };
    EnvFilter::try_new(full).map_err(|source| Error::Filter {
        filter: filter.to_owned(),
        source,
    })
}

/// The filter in force.
pub fn filter() -> Option<String> {
    FILTER
        .get()
        .map(|(_, text)| text.lock().unwrap_or_else(|e| e.into_inner()).clone())
}

/// Replaces the filter in force; returns the previous one. A filter that does not parse is an
/// error and changes nothing. (Kernel programs format records up to the level chosen at load:
/// raising `weft::kernel` above it shows no more of them until the agent restarts.)
pub fn set_filter(filter: &str) -> Result<String, Error> {
    let new = parse(filter)?;
    let (handle, text) = FILTER.get().ok_or(Error::NotReloadable)?;
    handle.reload(new).map_err(|_| Error::NotReloadable)?;
    let mut text = text.lock().unwrap_or_else(|e| e.into_inner());
    Ok(std::mem::replace(&mut *text, filter.to_owned()))
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Installs the global subscriber. `filter` uses tracing's EnvFilter syntax
/// (`info`, `info,weft::kernel=debug`, ...).
pub fn init(filter: &str, format: Format) -> Result<(), Error> {
    let (env_filter, handle) = reload::Layer::new(parse(filter)?);
    let registry = tracing_subscriber::registry().with(env_filter);
    let result = match format {
        Format::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .with_current_span(false)
                    .with_span_list(false),
            )
            .try_init(),
        Format::Text => registry
            .with(fmt::layer().with_ansi(std::io::stdout().is_terminal()))
            .try_init(),
    };
    result.map_err(|_| Error::AlreadyInstalled)?;
    let _ = FILTER.set((handle, Mutex::new(filter.to_owned())));
    Ok(())
}

/// The aya-log level for kernel programs that matches what the installed filter lets through
/// for target `weft::kernel` (0 = off, 1 = error .. 5 = trace), so the kernel does not format
/// records nobody will see.
pub fn kernel_log_level() -> u8 {
    use tracing::Level;
    if tracing::enabled!(target: "weft::kernel", Level::TRACE) {
        5
    } else if tracing::enabled!(target: "weft::kernel", Level::DEBUG) {
        4
    } else if tracing::enabled!(target: "weft::kernel", Level::INFO) {
        3
    } else if tracing::enabled!(target: "weft::kernel", Level::WARN) {
        2
    } else if tracing::enabled!(target: "weft::kernel", Level::ERROR) {
        1
    } else {
        0
    }
}

/// Forwards aya-log records (which use the `log` crate) into tracing.
#[derive(Debug, Clone, Copy)]
pub struct KernelLog;

impl log::Log for KernelLog {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let message = record.args().to_string();
        let program = record.module_path().unwrap_or("weft-ebpf");
        match record.level() {
            log::Level::Error => tracing::error!(target: "weft::kernel", program, "{message}"),
            log::Level::Warn => tracing::warn!(target: "weft::kernel", program, "{message}"),
            log::Level::Info => tracing::info!(target: "weft::kernel", program, "{message}"),
            log::Level::Debug => tracing::debug!(target: "weft::kernel", program, "{message}"),
            log::Level::Trace => tracing::trace!(target: "weft::kernel", program, "{message}"),
        }
    }

    fn flush(&self) {}
}

/// The kernel programs' log records (aya-log's ring buffer), forwarded as they arrive.
pub struct KernelLogs {
    // Declared (so dropped) before the logger that owns the descriptor it watches.
    fd: tokio::io::unix::AsyncFd<RawFd>,
    logger: aya_log::EbpfLogger<KernelLog>,
}

impl std::fmt::Debug for KernelLogs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelLogs").finish_non_exhaustive()
    }
}

/// Lets tokio watch a descriptor owned elsewhere (the logger's ring buffer).
struct RawFd(std::os::fd::RawFd);

impl std::os::fd::AsRawFd for RawFd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0
    }
}

impl KernelLogs {
    /// Takes aya-log's map from the loaded object. Must be called inside a tokio runtime.
    pub fn new(ebpf: &mut aya::Ebpf) -> Result<Self, Error> {
        let logger = aya_log::EbpfLogger::init_with_logger(ebpf, KernelLog)
            .map_err(|e| Error::KernelLogs(std::io::Error::other(e)))?;
        let raw = std::os::fd::AsRawFd::as_raw_fd(&logger);
        // SAFETY: the logger owns the ring buffer's descriptor, which stays open and unchanged
        // while the AsyncFd exists: both live in this struct, and the AsyncFd is dropped first.
        let fd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(
                RawFd(raw),
                tokio::io::Interest::READABLE,
            )
        }
        .map_err(|e| Error::KernelLogs(e.into()))?;
        Ok(Self { fd, logger })
    }

    /// Resolves when records are waiting (an error to watch the descriptor is logged once
    /// and then never resolves: the kernel logs are best effort).
    pub async fn readable(&self) {
        match self.fd.readable().await {
            Ok(mut guard) => guard.clear_ready(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch the kernel programs' log records");
                std::future::pending::<()>().await;
            }
        }
    }

    /// Forwards every waiting record.
    pub fn flush(&mut self) {
        self.logger.flush();
    }
}
