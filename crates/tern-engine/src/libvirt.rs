//! The carrier sockets of libvirt domains whose migration tern carries.
//!
//! libvirt runs both QEMUs and drives the migration; since libvirt 6.8 it migrates over a
//! UNIX socket of the same path on both hosts (`virsh migrate --migrateuri
//! unix://DIR/DOMAIN.sock`): the destination QEMU listens there, the source QEMU connects
//! there. tern puts itself between them: the source agent listens on the path on its host
//! ([`Carrier`]), the destination agent connects to the destination QEMU's socket on its
//! host ([`connect`]), and the stream travels between the agents as any other.
//!
//! A domain with local disks migrates them too (`--copy-storage-all --disks-uri
//! unix://DIR/DOMAIN.disks.sock`): libvirt's destination QEMU serves the disks over NBD on
//! that path, its source QEMU mirrors each disk to it over a connection of its own. The
//! source agent listens there too ([`Carrier::listen_disks`]) and carries each connection
//! byte for byte through a storage tunnel ([`crate::tunnel`]) to the destination agent,
//! which connects to the NBD server ([`connect_disks`]).
//!
//! The other end of a carrier socket must be libvirt: the process at the other end of the
//! connection (`SO_PEERCRED`) must be the domain's QEMU (`RUN/DOMAIN.pid`) or, for the
//! migration stream, libvirt's QEMU driver (`RUN/driver.pid`: libvirtd or virtqemud, which
//! opens that connection and hands it to QEMU; QEMU opens its NBD connections itself). A
//! local user who connects first, or who made a socket of that name, is refused, so nobody
//! else can feed a stream or a disk to the destination or read the guest's.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tern_qemu::spec::LibvirtDomain;
use tokio::net::{UnixListener, UnixStream};

/// Where carrier sockets and libvirt's pid files are on this host.
#[derive(Debug, Clone)]
pub struct LibvirtPaths {
    /// Carrier sockets (`DIR/DOMAIN.sock`); the path libvirt is told is the same on every
    /// host. Default `/run/tern/libvirt`.
    pub socket_dir: PathBuf,
    /// libvirt's QEMU driver state (`DOMAIN.pid`). Default `/run/libvirt/qemu`.
    pub run_dir: PathBuf,
}

impl Default for LibvirtPaths {
    fn default() -> Self {
        LibvirtPaths {
            socket_dir: PathBuf::from("/run/tern/libvirt"),
            run_dir: PathBuf::from("/run/libvirt/qemu"),
        }
    }
}

impl LibvirtPaths {
    /// The carrier socket of `domain` (a name [`LibvirtDomain::valid_name`] accepts).
    pub fn socket(&self, domain: &str) -> PathBuf {
        self.socket_dir.join(format!("{domain}.sock"))
    }

    /// The socket of `domain`'s storage migration (`--disks-uri`).
    pub fn disks_socket(&self, domain: &str) -> PathBuf {
        self.socket_dir.join(format!("{domain}.disks.sock"))
    }

    /// The pid of the domain's QEMU, from libvirt's pid file.
    pub fn domain_pid(&self, domain: &str) -> Result<u32, CarrierError> {
        read_pid(&self.run_dir.join(format!("{domain}.pid")), domain)
    }

    /// The pid of libvirt's QEMU driver (libvirtd or virtqemud).
    pub fn driver_pid(&self, domain: &str) -> Result<u32, CarrierError> {
        read_pid(&self.run_dir.join("driver.pid"), domain)
    }
}

fn read_pid(path: &Path, domain: &str) -> Result<u32, CarrierError> {
    let text = std::fs::read_to_string(path).map_err(|source| CarrierError::NoPidFile {
        domain: domain.into(),
        path: path.to_path_buf(),
        source,
    })?;
    text.trim().parse().map_err(|_| CarrierError::BadPidFile {
        path: path.to_path_buf(),
    })
}

/// Why a carrier socket could not be used.
#[derive(Debug, thiserror::Error)]
pub enum CarrierError {
    #[error("libvirt domain name {0:?} cannot be carried: use 1-64 characters from [A-Za-z0-9._-], not starting with '.'")]
    BadName(String),
    #[error("no libvirt pid file {path} (for domain {domain:?}): is the domain running on this host, and is --libvirt-run-dir libvirt's QEMU state directory?")]
    NoPidFile {
        domain: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("libvirt's pid file {path} holds no pid")]
    BadPidFile { path: PathBuf },
    #[error("cannot make the carrier socket {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot connect to the destination QEMU's socket {path}: did libvirt start the domain here with --migrateuri (or --disks-uri) unix://{path}?")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the process at the other end of {path} (pid {found}) is not libvirt domain {domain:?}'s QEMU (pid {qemu}){}", driver_note(.driver))]
    NotTheDomain {
        path: PathBuf,
        domain: String,
        found: String,
        qemu: u32,
        driver: u32,
    },
    #[error("the domain's QEMU did not connect to {path} within {0:?}", .within)]
    NoConnection { path: PathBuf, within: Duration },
    #[error("accepting on {path} failed")]
    Accept {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// ", nor libvirt (pid N)" where libvirt's driver may connect (0: it may not).
fn driver_note(driver: &u32) -> String {
    match driver {
        0 => String::new(),
        d => format!(" nor libvirt (pid {d})"),
    }
}

fn check_name(domain: &str) -> Result<(), CarrierError> {
    if LibvirtDomain::valid_name(domain) {
        Ok(())
    } else {
        Err(CarrierError::BadName(domain.into()))
    }
}

/// What a carrier socket carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Channel {
    /// The migration stream: libvirt's driver connects and hands QEMU the socket.
    Stream,
    /// One NBD connection of the storage migration: QEMU connects itself.
    Disks,
}

/// The other end of `s` must be the domain's QEMU (or, for the stream, libvirt's driver);
/// its pid.
fn check_peer(
    s: &UnixStream,
    paths: &LibvirtPaths,
    domain: &str,
    path: &Path,
    channel: Channel,
) -> Result<u32, CarrierError> {
    let qemu = paths.domain_pid(domain)?;
    let driver = match channel {
        Channel::Stream => paths.driver_pid(domain)?,
        Channel::Disks => 0,
    };
    let found = s.peer_cred().ok().and_then(|c| c.pid());
    if let Some(p) = found.and_then(|p| u32::try_from(p).ok()) {
        if p == qemu || (driver != 0 && p == driver) {
            return Ok(p);
        }
    }
    Err(CarrierError::NotTheDomain {
        path: path.to_path_buf(),
        domain: domain.into(),
        found: found.map_or_else(|| "unknown".into(), |p| p.to_string()),
        qemu,
        driver,
    })
}

/// The destination side: a connection to the destination QEMU libvirt started for
/// `domain`, listening on its carrier socket.
pub async fn connect(paths: &LibvirtPaths, domain: &str) -> Result<UnixStream, CarrierError> {
    Ok(connect_to(paths, domain, Channel::Stream).await?.0)
}

/// The destination side of a storage tunnel: a connection to the NBD server of the
/// destination QEMU libvirt started for `domain`, and that QEMU's pid.
pub async fn connect_disks(
    paths: &LibvirtPaths,
    domain: &str,
) -> Result<(UnixStream, u32), CarrierError> {
    connect_to(paths, domain, Channel::Disks).await
}

async fn connect_to(
    paths: &LibvirtPaths,
    domain: &str,
    channel: Channel,
) -> Result<(UnixStream, u32), CarrierError> {
    check_name(domain)?;
    let path = match channel {
        Channel::Stream => paths.socket(domain),
        Channel::Disks => paths.disks_socket(domain),
    };
    let s = UnixStream::connect(&path)
        .await
        .map_err(|source| CarrierError::Connect {
            path: path.clone(),
            source,
        })?;
    let pid = check_peer(&s, paths, domain, &path, channel)?;
    Ok((s, pid))
}

/// The source side: the socket the domain's QEMU migrates into (or, for its disks,
/// connects its NBD clients to). Removed when dropped.
pub struct Carrier {
    listener: UnixListener,
    path: PathBuf,
    domain: String,
    paths: LibvirtPaths,
    channel: Channel,
}

impl Carrier {
    /// Listens on `domain`'s carrier socket (a stale one from an earlier run is replaced).
    pub fn listen(paths: &LibvirtPaths, domain: &str) -> Result<Carrier, CarrierError> {
        Carrier::listen_on(paths, domain, Channel::Stream)
    }

    /// Listens on `domain`'s storage socket, for the NBD connections of its disks.
    pub fn listen_disks(paths: &LibvirtPaths, domain: &str) -> Result<Carrier, CarrierError> {
        Carrier::listen_on(paths, domain, Channel::Disks)
    }

    fn listen_on(
        paths: &LibvirtPaths,
        domain: &str,
        channel: Channel,
    ) -> Result<Carrier, CarrierError> {
        use std::os::unix::fs::PermissionsExt;
        check_name(domain)?;
        let path = match channel {
            Channel::Stream => paths.socket(domain),
            Channel::Disks => paths.disks_socket(domain),
        };
        let bind = |e| CarrierError::Bind {
            path: path.clone(),
            source: e,
        };
        std::fs::create_dir_all(&paths.socket_dir).map_err(bind)?;
        // libvirt's QEMU runs as its own user and must reach the socket; who connects is
        // checked by its pid, not by the file's mode
        std::fs::set_permissions(&paths.socket_dir, std::fs::Permissions::from_mode(0o755))
            .map_err(bind)?;
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(bind(e)),
        }
        let listener = UnixListener::bind(&path).map_err(bind)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).map_err(bind)?;
        Ok(Carrier {
            listener,
            path,
            domain: domain.into(),
            paths: paths.clone(),
            channel,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The domain's QEMU, connected. Anything else that connects is refused (and logged);
    /// waiting goes on until `within`.
    pub async fn accept(&self, within: Duration) -> Result<UnixStream, CarrierError> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let (s, _) = tokio::time::timeout_at(deadline, self.listener.accept())
                .await
                .map_err(|_| CarrierError::NoConnection {
                    path: self.path.clone(),
                    within,
                })?
                .map_err(|source| CarrierError::Accept {
                    path: self.path.clone(),
                    source,
                })?;
            match check_peer(&s, &self.paths, &self.domain, &self.path, self.channel) {
                Ok(_) => return Ok(s),
                Err(e @ CarrierError::NotTheDomain { .. }) => {
                    tracing::warn!("{e}: connection refused");
                }
                Err(e) => return Err(e),
            }
        }
    }
}

impl Drop for Carrier {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths(dir: &Path) -> LibvirtPaths {
        LibvirtPaths {
            socket_dir: dir.join("sock"),
            run_dir: dir.join("run"),
        }
    }

    #[tokio::test]
    async fn only_the_process_libvirt_names_may_connect() {
        let dir = tempfile::tempdir().unwrap();
        let p = paths(dir.path());
        std::fs::create_dir_all(&p.run_dir).unwrap();
        let carrier = Carrier::listen(&p, "dom").unwrap();
        // libvirt names another process: this one is refused and the carrier waits on
        std::fs::write(p.run_dir.join("dom.pid"), "1\n").unwrap();
        std::fs::write(p.run_dir.join("driver.pid"), "2\n").unwrap();
        let _intruder = UnixStream::connect(carrier.path()).await.unwrap();
        let e = carrier
            .accept(Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(matches!(e, CarrierError::NoConnection { .. }), "{e}");
        // libvirt names this process as the domain's QEMU: accepted

        std::fs::write(p.run_dir.join("dom.pid"), std::process::id().to_string()).unwrap();
        let _qemu = UnixStream::connect(carrier.path()).await.unwrap();
        carrier.accept(Duration::from_secs(5)).await.unwrap();
        // and the destination side checks the listener the same way
        connect(&p, "dom").await.unwrap();
        std::fs::write(p.run_dir.join("dom.pid"), "1\n").unwrap();
        let e = connect(&p, "dom").await.unwrap_err();
        assert!(matches!(e, CarrierError::NotTheDomain { .. }), "{e}");
        // or as libvirt's driver (libvirtd connects and hands QEMU the socket)
        std::fs::write(p.run_dir.join("driver.pid"), std::process::id().to_string()).unwrap();
        connect(&p, "dom").await.unwrap();
        let path = carrier.path().to_path_buf();
        drop(carrier);
        assert!(!path.exists(), "the carrier socket goes with the carrier");

        // the disks' socket: QEMU connects itself, libvirt's driver is not let in
        let disks = Carrier::listen_disks(&p, "dom").unwrap();
        assert_eq!(disks.path(), p.socket_dir.join("dom.disks.sock"));
        let _driver = UnixStream::connect(disks.path()).await.unwrap();
        let e = disks.accept(Duration::from_millis(300)).await.unwrap_err();
        assert!(matches!(e, CarrierError::NoConnection { .. }), "{e}");
        let e = connect_disks(&p, "dom").await.unwrap_err();
        assert!(matches!(e, CarrierError::NotTheDomain { .. }), "{e}");
        std::fs::write(p.run_dir.join("dom.pid"), std::process::id().to_string()).unwrap();
        let _qemu = UnixStream::connect(disks.path()).await.unwrap();
        disks.accept(Duration::from_secs(5)).await.unwrap();
        assert_eq!(
            connect_disks(&p, "dom").await.unwrap().1,
            std::process::id()
        );
    }

    #[test]
    fn names_that_are_not_plain_file_names_are_refused() {
        let p = LibvirtPaths::default();
        for bad in ["", "../etc", "a/b", ".hidden", "sp ace"] {
            assert!(
                matches!(Carrier::listen(&p, bad), Err(CarrierError::BadName(_))),
                "{bad:?}"
            );
        }
    }
}
