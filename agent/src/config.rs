//! `weft agent`'s configuration. Every setting is declared once, as a flag in the subsystem
//! that uses it (each has a clap `Settings`); this type flattens them. Whatever clap can check
//! field by field is refused while parsing (a zero duration or capacity names its flag);
//! [`Config::validate`] checks what spans fields, before anything is loaded.
use crate::{admin, datapath, events, mesh, pipeline, source, stats, telemetry};

/// Everything `weft agent` is asked to do.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    #[command(flatten)]
    pub datapath: datapath::Settings,
    #[command(flatten)]
    pub source: source::Settings,
    #[command(flatten)]
    pub pipeline: pipeline::Settings,
    #[command(flatten)]
    pub events: events::Settings,
    #[command(flatten)]
    pub telemetry: telemetry::Settings,
    #[command(flatten)]
    pub stats: stats::Settings,
    #[command(flatten)]
    pub mesh: mesh::Settings,
    #[command(flatten)]
    pub admin: admin::Settings,
}

impl Config {
    /// What spans fields; the message names the flags.
    pub fn validate(&self) -> Result<(), String> {
        self.datapath.validate()
    }

    /// The admin socket of this agent.
    pub fn admin_socket(&self) -> std::path::PathBuf {
        self.admin.socket(&self.datapath.instance.name)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use clap::Parser as _;

    use super::*;

    #[derive(Debug, clap::Parser)]
    struct Agent {
        #[command(flatten)]
        config: Config,
    }

    fn parse(args: &[&str]) -> Result<Config, clap::Error> {
        Agent::try_parse_from(std::iter::once("agent").chain(args.iter().copied()))
            .map(|a| a.config)
    }

    /// The error for `flag value`, which must name the flag.
    fn refused(flag: &str, value: &str) -> String {
        let e = parse(&[flag, value]).expect_err("refused");
        assert_eq!(e.kind(), clap::error::ErrorKind::ValueValidation, "{e}");
        let text = e.to_string();
        assert!(text.contains(flag), "{text}");
        text
    }

    #[test]
    fn zero_periods_are_refused_naming_the_flag() {
        for flag in [
            "--stats-interval",
            "--events-poll-interval",
            "--udp-idle-timeout",
        ] {
            let text = refused(flag, "0s");
            assert!(text.contains("must be more than zero"), "{text}");
        }
    }

    #[test]
    fn a_zero_update_interval_means_only_open_and_close() {
        let c = parse(&["--conn-update-interval", "0s"]).expect("valid");
        assert_eq!(c.telemetry.conn_update_interval, Duration::ZERO);
        assert_eq!(c.telemetry.tick(), Duration::from_secs(5));
    }

    #[test]
    fn nonsensical_values_are_refused_naming_the_flag() {
        refused("--max-connections", "0");
        refused("--flow-buffer", "0");
        refused("--metrics-addr", "9967");
        refused("--ring-buffer-size", "65537");
    }

    #[test]
    fn defaults_parse_and_validate() {
        let c = parse(&[]).expect("defaults");
        assert_eq!(c.validate(), Ok(()));
        assert_eq!(c.stats.stats_interval, Duration::from_secs(30));
        assert_eq!(
            c.admin_socket(),
            std::path::PathBuf::from("/run/weft/default.sock")
        );
    }

    #[test]
    fn telemetry_off_tells_the_kernel_to_write_no_events_and_check_no_updates() {
        let globals = |args: &[&str]| {
            let mut g = crate::datapath::Globals {
                kernel_log_level: 0,
                events_wakeup_bytes: 0,
                cgroup_level: 0,
                unbound_isolated: 0,
                unbound_scope_level: 0,
                unbound_scope_id: 0,
                host_netns_cookie: 0,
                sock_states: 0,
                sock_states_per_pod: 0,
                sock_states_floor: 0,
                sockmap_enabled: 0,
                agent_cgroup_level: 0,
                agent_cgroup_id: 0,
                kernel_hz: 0,
                conn_update_interval_ns: 7,
                conn_events_enabled: 7,
            };
            parse(args).expect("valid").telemetry.apply_to(&mut g);
            (g.conn_update_interval_ns, g.conn_events_enabled)
        };
        assert_eq!(globals(&[]), (5_000_000_000, 1));
        assert_eq!(globals(&["--telemetry=false"]), (0, 0));
        assert_eq!(globals(&["--conn-update-interval", "0s"]), (0, 1));
    }

    #[test]
    fn kubernetes_needs_a_node_name() {
        let e = parse(&["--source", "kubernetes"]).expect_err("refused");
        assert_eq!(e.kind(), clap::error::ErrorKind::MissingRequiredArgument);
        assert!(e.to_string().contains("--node-name"), "{e}");
    }
}
