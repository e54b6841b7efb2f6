//! The agent's own CPU and memory (`process_*`, the names Prometheus client libraries use),
//! read from /proc/self at every scrape.
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
};

/// Reads /proc/self when scraped.
#[derive(Debug, Default)]
pub struct ProcessCollector;

/// Clock ticks per second for /proc/self/stat times.
fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// (user + system CPU seconds, start time in ticks since boot) from /proc/self/stat.
fn stat() -> Option<(f64, f64)> {
    let text = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = text.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime, stime and starttime are fields 14, 15 and 22 of the whole line.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    let start: f64 = fields.get(19)?.parse().ok()?;
    Some(((utime + stime) / ticks_per_second(), start))
}

fn status_kib(field: &str) -> Option<f64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

fn boot_time() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

fn open_fds() -> Option<f64> {
    Some(std::fs::read_dir("/proc/self/fd").ok()?.count() as f64)
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if let Some((cpu, start_ticks)) = stat() {
            let m = encoder.encode_descriptor(
                "process_cpu_seconds",
                "User and system CPU time the agent spent",
                None,
                MetricType::Counter,
            )?;
            ConstCounter::new(cpu).encode(m)?;
            if let Some(boot) = boot_time() {
                let m = encoder.encode_descriptor(
                    "process_start_time_seconds",
                    "When the agent started, in seconds since the Unix epoch",
                    None,
                    MetricType::Gauge,
                )?;
                ConstGauge::new(boot + start_ticks / ticks_per_second()).encode(m)?;
            }
        }
        if let Some(rss) = status_kib("VmRSS:") {
            let m = encoder.encode_descriptor(
                "process_resident_memory_bytes",
                "The agent's resident memory",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(rss * 1024.0).encode(m)?;
        }
        if let Some(fds) = open_fds() {
            let m = encoder.encode_descriptor(
                "process_open_fds",
                "File descriptors the agent holds open",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(fds).encode(m)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let (cpu, start) = stat().expect("/proc/self/stat");
        assert!(cpu >= 0.0 && start > 0.0);
        assert!(status_kib("VmRSS:").expect("VmRSS") > 0.0);
        assert!(open_fds().expect("fds") >= 3.0);
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(ProcessCollector));
        let text = super::super::render(&registry, super::super::Format::Text);
        for name in [
            "process_cpu_seconds_total ",
            "process_resident_memory_bytes ",
            "process_start_time_seconds ",
            "process_open_fds ",
        ] {
            assert!(text.contains(name), "{name} in {text}");
        }
    }
}
