//! `tern agent --config FILE`: the agent's options from a TOML file (the Debian package
//! installs `/etc/tern/agent.toml` and its systemd unit passes it). Each key is a flag's
//! name without the leading dashes (`state-dir`, `boot-dir` as a list); a flag on the
//! command line wins over the file, the file over the built-in default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::ArgMatches;
use serde::Deserialize;

use crate::{AgentArgs, LogFormat, OverlayControl};

/// Why a config file was not taken.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the agent's config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the agent's config file {path} is not valid (keys are the flags of `tern agent --help` without their dashes)")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
}

/// The file's keys; each absent key leaves its flag's value.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct AgentFile {
    name: Option<String>,
    state_dir: Option<PathBuf>,
    api: Option<String>,
    listen: Option<SocketAddr>,
    stall_timeout_secs: Option<u64>,
    cluster_key: Option<PathBuf>,
    store_mem_mib: Option<u64>,
    store_file_mib: Option<u64>,
    tls_dir: Option<PathBuf>,
    policy: Option<PathBuf>,
    #[serde(rename = "boot-dir")]
    boot_dirs: Option<Vec<PathBuf>>,
    #[serde(rename = "shared-dir")]
    shared_dirs: Option<Vec<PathBuf>>,
    #[serde(rename = "network")]
    networks: Option<Vec<String>>,
    vtep: Option<std::net::Ipv4Addr>,
    #[serde(rename = "vxlan-peer")]
    vxlan_peers: Option<Vec<std::net::Ipv4Addr>>,
    #[serde(rename = "overlay-control")]
    overlay_control: Option<OverlayControl>,
    qemu_user: Option<String>,
    max_incoming: Option<usize>,
    log_format: Option<LogFormat>,
    metrics_listen: Option<SocketAddr>,
    control_listen: Option<SocketAddr>,
    capacity_cores: Option<f64>,
    snapshot_limit_mib: Option<u64>,
    fence_after: Option<f64>,
    libvirt_uri: Option<String>,
    libvirt_socket_dir: Option<PathBuf>,
    libvirt_run_dir: Option<PathBuf>,
}

impl AgentFile {
    pub fn read(path: &Path) -> Result<AgentFile, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Fills `args` from the file where the command line (`m`, the `agent` subcommand's
    /// matches) did not give the flag.
    pub fn apply(self, args: &mut AgentArgs, m: &ArgMatches) {
        let unset = |id: &str| m.value_source(id) != Some(ValueSource::CommandLine);
        macro_rules! take {
            ($($field:ident),*) => {$(
                if let Some(v) = self.$field {
                    if unset(stringify!($field)) {
                        args.$field = v;
                    }
                }
            )*};
        }
        macro_rules! take_opt {
            ($($field:ident),*) => {$(
                if let Some(v) = self.$field {
                    if unset(stringify!($field)) {
                        args.$field = Some(v);
                    }
                }
            )*};
        }
        take!(
            name,
            state_dir,
            api,
            listen,
            stall_timeout_secs,
            store_mem_mib,
            store_file_mib,
            tls_dir,
            boot_dirs,
            shared_dirs,
            networks,
            vxlan_peers,
            overlay_control,
            qemu_user,
            max_incoming,
            log_format,
            libvirt_uri,
            libvirt_socket_dir,
            libvirt_run_dir,
            snapshot_limit_mib
        );
        take_opt!(
            cluster_key,
            policy,
            metrics_listen,
            control_listen,
            capacity_cores,
            vtep,
            fence_after
        );
    }
}

/// The `agent` arguments with the config file (`--config`) under them.
pub fn agent_args(m: &ArgMatches) -> anyhow::Result<AgentArgs> {
    use clap::FromArgMatches;
    let mut args = AgentArgs::from_arg_matches(m)?;
    if let Some(path) = args.config.clone() {
        AgentFile::read(&path)?.apply(&mut args, m);
    }
    Ok(args)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(file: &str, argv: &[&str]) -> anyhow::Result<AgentArgs> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, file)?;
        let mut full = vec!["tern", "agent", "--config", path.to_str().unwrap()];
        full.extend_from_slice(argv);
        let m = crate::Cli::command().try_get_matches_from(full)?;
        agent_args(m.subcommand_matches("agent").unwrap())
    }

    #[test]
    fn the_file_fills_what_the_command_line_left_and_the_command_line_wins() {
        let a = parse(
            "name = \"host-f\"\nstate-dir = \"/srv/tern\"\nlisten = \"198.18.0.1:7700\"\nboot-dir = [\"/srv/boot\", \"/srv/boot2\"]\nlog-format = \"json\"\nmetrics-listen = \"127.0.0.1:9477\"\nmax-incoming = 2\n",
            &["--name", "host-cli", "--max-incoming", "4"],
        )
        .unwrap();
        assert_eq!(a.name, "host-cli", "a flag wins over the file");
        assert_eq!(a.max_incoming, 4, "even when it equals the default");
        assert_eq!(a.state_dir, PathBuf::from("/srv/tern"));
        assert_eq!(a.listen, "198.18.0.1:7700".parse().unwrap());
        assert_eq!(a.boot_dirs.len(), 2);
        assert_eq!(a.log_format, LogFormat::Json);
        assert_eq!(a.metrics_listen, Some("127.0.0.1:9477".parse().unwrap()));
        assert_eq!(a.store_mem_mib, 512, "absent keys keep the default");
    }

    #[test]
    fn a_bad_file_is_refused_with_its_path_and_what_is_wrong() {
        let e = parse("stat-dir = \"/srv\"\n", &[]).unwrap_err();
        let chain = format!("{e:#}");
        assert!(chain.contains("agent.toml is not valid"), "{chain}");
        assert!(
            chain.contains("stat-dir"),
            "the unknown key is named: {chain}"
        );
        let e = parse("listen = \"not an address\"\n", &[]).unwrap_err();
        assert!(format!("{e:#}").contains("listen"), "{e:#}");
    }

    #[test]
    fn the_packaged_config_file_parses_and_every_key_it_shows_is_one_the_agent_takes() {
        let packaged = include_str!("../../../packaging/agent.toml");
        parse(packaged, &[]).unwrap();
        // each commented `# key = value` line, uncommented
        let keys: Vec<&str> = packaged
            .lines()
            .filter_map(|l| l.strip_prefix("# "))
            .filter(|l| {
                l.split_once(" = ")
                    .is_some_and(|(k, _)| k.chars().all(|c| c.is_ascii_lowercase() || c == '-'))
            })
            .collect();
        assert!(keys.len() >= 14, "{keys:?}");
        let a = parse(&keys.join("\n"), &[]).unwrap();
        assert_eq!(a.state_dir, PathBuf::from("/var/lib/tern"));
        assert_eq!(a.tls_dir, PathBuf::from("/etc/tern/tls"));
    }

    #[test]
    fn a_missing_file_is_an_error_not_a_silent_default() {
        let m = crate::Cli::command()
            .try_get_matches_from(["tern", "agent", "--config", "/nonexistent/agent.toml"])
            .unwrap();
        let e = agent_args(m.subcommand_matches("agent").unwrap()).unwrap_err();
        assert!(
            format!("{e:#}")
                .contains("cannot read the agent's config file /nonexistent/agent.toml"),
            "{e:#}"
        );
    }
}
