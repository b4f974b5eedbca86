//! Test fixtures for tern: the test guest image ([`guest`]), real agents on this machine
//! ([`agents`]), what sits on the wire between them ([`wire`]: TLS test peers, a relay
//! that alters bytes, packet capture), a hostile peer with a valid certificate
//! ([`hostile`]), libvirt hosts ([`libvirt`]), what a client sees of a moving guest
//! ([`probe`]), helpers to read guest consoles and to run
//! tools ([`run`]). Used by
//! integration tests and benchmarks only.
#![forbid(unsafe_code)]

pub mod agents;
pub mod etcd;
pub mod guest;
pub mod hostile;
pub mod libvirt;
pub mod probe;
pub mod wire;

/// Runs a tool to its end: its stdout if it succeeded, else an error with the command and
/// everything it printed.
pub fn run(cmd: &mut std::process::Command) -> anyhow::Result<String> {
    use anyhow::Context;
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    anyhow::ensure!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Moves the calling thread into network namespace `name` (made with `ip netns add`):
/// the sockets it opens from then on live there. For a thread of its own.
pub fn enter_netns(name: &str) -> anyhow::Result<()> {
    use anyhow::Context;
    use std::os::fd::AsFd;
    let path = format!("/run/netns/{name}");
    let ns = std::fs::File::open(&path).with_context(|| format!("open {path}"))?;
    rustix::thread::move_into_link_name_space(
        ns.as_fd(),
        Some(rustix::thread::LinkNameSpaceType::Network),
    )
    .with_context(|| format!("enter network namespace {name}"))
}
