//! QMP client: one background task owns QEMU's QMP socket; any number of tasks send
//! commands through a cloneable [`QmpClient`] (replies matched by `id`) and subscribe to
//! events. Owns the QMP wire format and typed helpers for the commands tern uses; must not
//! decide anything about migrations.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::{broadcast, mpsc, oneshot};

/// How long [`QmpClient::execute`] waits for QEMU's reply. Every command tern sends
/// answers in milliseconds; a QEMU that does not answer within this is hung.
pub const COMMAND_DEADLINE: Duration = Duration::from_secs(20);

/// A roomy socket buffer for a migration stream socket ([`QmpClient::stream_socket`]):
/// a few MiB in flight, so neither end waits on the other for every 200 KiB (the default).
pub const STREAM_SOCKET_BUFFER: usize = 4 << 20;

/// A QMP event (`{"event": ..., "data": ..., "timestamp": {...}}`).
#[derive(Debug, Clone)]
pub struct QmpEvent {
    pub event: String,
    pub data: Value,
    pub timestamp: SystemTime,
}

/// QEMU's version as its QMP greeting states it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct QemuVersion {
    pub major: u32,
    pub minor: u32,
    pub micro: u32,
    pub package: String,
}

impl std::fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("cannot connect to QMP socket {path}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("QMP handshake failed: {0}")]
    Handshake(String),
    #[error("QMP connection closed (QEMU exited?)")]
    Closed,
    #[error("QMP command {command} failed: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("QMP I/O error")]
    Io(#[from] std::io::Error),
    #[error("malformed QMP message: {0}")]
    Malformed(String),
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, String),
    #[error(
        "QMP command {0} needs out-of-band execution, which this QEMU's monitor does not offer"
    )]
    NoOob(String),
}

/// `query-status`.
#[derive(Debug, Clone)]
pub struct RunStatus {
    pub running: bool,
    pub status: String,
}

/// `query-migrate`, the fields tern reads.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MigrationInfo {
    pub status: String,
    pub total_time_ms: Option<u64>,
    pub downtime_ms: Option<u64>,
    pub expected_downtime_ms: Option<u64>,
    pub setup_time_ms: Option<u64>,
    pub ram_transferred: Option<u64>,
    pub ram_remaining: Option<u64>,
    pub ram_total: Option<u64>,
    pub ram_duplicate: Option<u64>,
    pub ram_normal: Option<u64>,
    pub dirty_pages_rate: Option<u64>,
    pub dirty_sync_count: Option<u64>,
    pub mbps: Option<f64>,
    /// The guest CPU throttle auto-converge applies now, percent (present while on).
    pub cpu_throttle_percentage: Option<u64>,
    pub error_desc: Option<String>,
    /// Source of a post-copy migration: the page requests the destination sent.
    pub postcopy_requests: Option<u64>,
    /// Destination of a post-copy migration that completed, with capability
    /// `postcopy-blocktime`: the time every vCPU waited on a page at once, ms.
    pub postcopy_blocktime_ms: Option<u64>,
    /// The same, per vCPU: the time each waited on pages in all, ms.
    pub postcopy_vcpu_blocktime_ms: Option<Vec<u64>>,
}

impl MigrationInfo {
    pub fn from_json(v: &Value) -> MigrationInfo {
        let u = |k: &str| v.get(k).and_then(Value::as_u64);
        let ram = |k: &str| v.get("ram").and_then(|r| r.get(k)).and_then(Value::as_u64);
        MigrationInfo {
            status: v
                .get("status")
                .and_then(Value::as_str)
                .unwrap_or("none")
                .to_string(),
            total_time_ms: u("total-time"),
            downtime_ms: u("downtime"),
            expected_downtime_ms: u("expected-downtime"),
            setup_time_ms: u("setup-time"),
            ram_transferred: ram("transferred"),
            ram_remaining: ram("remaining"),
            ram_total: ram("total"),
            ram_duplicate: ram("duplicate"),
            ram_normal: ram("normal"),
            dirty_pages_rate: ram("dirty-pages-rate"),
            dirty_sync_count: ram("dirty-sync-count"),
            mbps: v
                .get("ram")
                .and_then(|r| r.get("mbps"))
                .and_then(Value::as_f64),
            cpu_throttle_percentage: u("cpu-throttle-percentage"),
            postcopy_requests: ram("postcopy-requests"),
            postcopy_blocktime_ms: u("postcopy-blocktime"),
            postcopy_vcpu_blocktime_ms: v
                .get("postcopy-vcpu-blocktime")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Value::as_u64).collect()),
            error_desc: v
                .get("error-desc")
                .and_then(Value::as_str)
                .map(str::to_string),
        }
    }
}

type Pending = Arc<Mutex<Option<HashMap<u64, oneshot::Sender<Result<Value, QmpError>>>>>>;

/// A line for QEMU, with a file descriptor to pass along (SCM_RIGHTS) for `getfd`/`add-fd`.
type Outgoing = (String, Option<OwnedFd>);

struct Inner {
    tx: mpsc::UnboundedSender<Outgoing>,
    pending: Pending,
    next_id: AtomicU64,
    events: broadcast::Sender<QmpEvent>,
    version: QemuVersion,
    /// The monitor runs out-of-band commands (capability `oob`, enabled when offered).
    oob: bool,
}

/// A handle to one QEMU's QMP; cheap to clone.
#[derive(Clone)]
pub struct QmpClient {
    inner: Arc<Inner>,
}

/// What one QMP line means.
#[derive(Debug)]
enum Line {
    Reply {
        id: u64,
        result: Result<Value, (String, String)>,
    },
    Event(QmpEvent),
    Other,
}

fn parse_line(line: &str) -> Result<Line, QmpError> {
    let v: Value =
        serde_json::from_str(line).map_err(|e| QmpError::Malformed(format!("{e}: {line}")))?;
    if let Some(name) = v.get("event").and_then(Value::as_str) {
        let ts = v.get("timestamp");
        let secs = ts
            .and_then(|t| t.get("seconds"))
            .and_then(Value::as_u64)
            .unwrap_or(0);
        let us = ts
            .and_then(|t| t.get("microseconds"))
            .and_then(Value::as_u64)
            .unwrap_or(0);
        return Ok(Line::Event(QmpEvent {
            event: name.to_string(),
            data: v.get("data").cloned().unwrap_or(Value::Null),
            // (a timestamp past what SystemTime holds is nonsense, not a reason to panic)
            timestamp: SystemTime::UNIX_EPOCH
                .checked_add(Duration::from_secs(secs))
                .and_then(|t| t.checked_add(Duration::from_micros(us)))
                .unwrap_or(SystemTime::UNIX_EPOCH),
        }));
    }
    let Some(id) = v.get("id").and_then(Value::as_u64) else {
        return Ok(Line::Other);
    };
    if let Some(r) = v.get("return") {
        return Ok(Line::Reply {
            id,
            result: Ok(r.clone()),
        });
    }
    if let Some(e) = v.get("error") {
        let class = e
            .get("class")
            .and_then(Value::as_str)
            .unwrap_or("GenericError")
            .to_string();
        let desc = e
            .get("desc")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        return Ok(Line::Reply {
            id,
            result: Err((class, desc)),
        });
    }
    Err(QmpError::Malformed(format!(
        "reply without return or error: {line}"
    )))
}

fn parse_version(greeting: &Value) -> Result<QemuVersion, QmpError> {
    let v = greeting
        .get("QMP")
        .and_then(|q| q.get("version"))
        .ok_or_else(|| QmpError::Handshake(format!("no version in greeting {greeting}")))?;
    let q = v.get("qemu").cloned().unwrap_or(Value::Null);
    let n = |k: &str| q.get(k).and_then(Value::as_u64).unwrap_or(0) as u32;
    Ok(QemuVersion {
        major: n("major"),
        minor: n("minor"),
        micro: n("micro"),
        package: v
            .get("package")
            .and_then(Value::as_str)
            .unwrap_or("")
            .trim()
            .to_string(),
    })
}

impl QmpClient {
    /// Connects (retrying until `timeout`: QEMU creates the socket shortly after start),
    /// reads the greeting and enters command mode.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<QmpClient, QmpError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path).await {
                Ok(s) => break s,
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    return Err(QmpError::Connect {
                        path: path.to_path_buf(),
                        source: e,
                    })
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        let (rd, mut wr) = stream.into_split();
        let mut lines = BufReader::new(rd).lines();
        let left = deadline
            .saturating_duration_since(tokio::time::Instant::now())
            .max(Duration::from_secs(5));
        let greeting = tokio::time::timeout(left, lines.next_line())
            .await
            .map_err(|_| QmpError::Handshake("no greeting".into()))??
            .ok_or_else(|| QmpError::Handshake("socket closed before the greeting".into()))?;
        let greeting: Value = serde_json::from_str(&greeting)
            .map_err(|e| QmpError::Handshake(format!("{e}: {greeting}")))?;
        let version = parse_version(&greeting)?;
        // out-of-band execution where the monitor offers it: the commands that must get
        // through while QEMU's main loop is blocked (`migrate-recover` on a post-copy
        // destination whose vCPU waits on a missing page holding the big lock)
        let oob = greeting["QMP"]["capabilities"]
            .as_array()
            .is_some_and(|c| c.iter().any(|c| c == "oob"));
        if oob {
            wr.write_all(
                b"{\"execute\":\"qmp_capabilities\",\"arguments\":{\"enable\":[\"oob\"]}}\n",
            )
            .await?;
        } else {
            wr.write_all(b"{\"execute\":\"qmp_capabilities\"}\n")
                .await?;
        }
        loop {
            let l = tokio::time::timeout(left, lines.next_line())
                .await
                .map_err(|_| QmpError::Handshake("no answer to qmp_capabilities".into()))??
                .ok_or_else(|| {
                    QmpError::Handshake("socket closed during qmp_capabilities".into())
                })?;
            let v: Value =
                serde_json::from_str(&l).map_err(|e| QmpError::Handshake(format!("{e}: {l}")))?;
            if v.get("return").is_some() {
                break;
            }
            if let Some(e) = v.get("error") {
                return Err(QmpError::Handshake(e.to_string()));
            }
        }

        let (tx, mut rx) = mpsc::unbounded_channel::<Outgoing>();
        let pending: Pending = Arc::new(Mutex::new(Some(HashMap::new())));
        let (events, _) = broadcast::channel(1024);
        // writer task
        tokio::spawn(async move {
            while let Some((line, fd)) = rx.recv().await {
                let sent = match fd {
                    None => wr.write_all(line.as_bytes()).await,
                    Some(fd) => send_with_fd(&mut wr, line.as_bytes(), fd).await,
                };
                if sent.is_err() {
                    break;
                }
            }
        });
        // reader task: replies to their waiters, events to subscribers; on EOF or a bad
        // line every waiter gets an error and later calls fail at once.
        {
            let pending = pending.clone();
            let events = events.clone();
            tokio::spawn(async move {
                // None: the connection ended (EOF or I/O error: QEMU is gone);
                // Some: QEMU sent something that is not QMP.
                let bad: Option<String> = loop {
                    match lines.next_line().await {
                        Ok(Some(l)) => match parse_line(&l) {
                            Ok(Line::Reply { id, result }) => {
                                let waiter =
                                    pending.lock().unwrap().as_mut().and_then(|p| p.remove(&id));
                                if let Some(w) = waiter {
                                    let _ =
                                        w.send(result.map_err(|(class, desc)| QmpError::Command {
                                            command: String::new(),
                                            class,
                                            desc,
                                        }));
                                }
                            }
                            Ok(Line::Event(e)) => {
                                let _ = events.send(e);
                            }
                            Ok(Line::Other) => {}
                            Err(e) => break Some(e.to_string()),
                        },
                        Ok(None) => break None,
                        Err(e) => {
                            tracing::debug!("QMP connection lost: {e}");
                            break None;
                        }
                    }
                };
                if let Some(w) = &bad {
                    tracing::warn!("QMP reader stopped: {w}");
                }
                let waiters = pending.lock().unwrap().take().unwrap_or_default();
                for (_, w) in waiters {
                    let _ = w.send(Err(match &bad {
                        Some(m) => QmpError::Malformed(m.clone()),
                        None => QmpError::Closed,
                    }));
                }
            });
        }
        Ok(QmpClient {
            inner: Arc::new(Inner {
                tx,
                pending,
                next_id: AtomicU64::new(1),
                events,
                version,
                oob,
            }),
        })
    }

    pub fn version(&self) -> &QemuVersion {
        &self.inner.version
    }

    /// Whether the connection to QEMU is gone.
    pub fn is_closed(&self) -> bool {
        self.inner.pending.lock().unwrap().is_none()
    }

    /// Runs one command and waits for its reply, at most [`COMMAND_DEADLINE`]: a hung
    /// QEMU fails the call with [`QmpError::Timeout`] instead of hanging its caller.
    pub async fn execute(
        &self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        self.execute_within(command, arguments, COMMAND_DEADLINE)
            .await
    }

    /// Runs one command out of band (`exec-oob`): QEMU runs it in the monitor's own thread
    /// even while its main loop is blocked. Only for commands QEMU allows there.
    pub async fn execute_oob(
        &self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        if !self.inner.oob {
            return Err(QmpError::NoOob(command.to_string()));
        }
        self.send(command, "exec-oob", arguments, None, COMMAND_DEADLINE)
            .await
    }

    /// [`QmpClient::execute`] with its own deadline.
    pub async fn execute_within(
        &self,
        command: &str,
        arguments: Option<Value>,
        within: Duration,
    ) -> Result<Value, QmpError> {
        self.send_command(command, arguments, None, within).await
    }

    /// Runs `command` with `fd` passed along (SCM_RIGHTS), as `getfd` and `add-fd` need.
    pub async fn execute_with_fd(
        &self,
        command: &str,
        arguments: Option<Value>,
        fd: OwnedFd,
    ) -> Result<Value, QmpError> {
        self.send_command(command, arguments, Some(fd), COMMAND_DEADLINE)
            .await
    }

    /// `getfd`: QEMU keeps `fd` under `name` until a command (e.g. `migrate fd:NAME`)
    /// takes it. The way to give an unprivileged QEMU a socket or file it could not open.
    pub async fn getfd(&self, name: &str, fd: OwnedFd) -> Result<(), QmpError> {
        self.execute_with_fd("getfd", Some(json!({ "fdname": name })), fd)
            .await?;
        Ok(())
    }

    /// A connected socket pair for a migration stream (send and receive buffers of
    /// `buffer` bytes, e.g. [`STREAM_SOCKET_BUFFER`]): QEMU gets one end under `name`
    /// (`getfd`), the caller keeps the other; then `migrate` or `migrate-incoming` with
    /// `uri: "fd:NAME"`. QEMU opens nothing itself, so it needs no access to any path.
    pub async fn stream_socket(&self, name: &str, buffer: usize) -> Result<UnixStream, QmpError> {
        let (ours, theirs) = UnixStream::pair()?;
        // past the system's limit only where the agent may (root), else as much as it
        // allows
        {
            use rustix::net::sockopt as so;
            for s in [ours.as_fd(), theirs.as_fd()] {
                if so::set_socket_send_buffer_size_force(s, buffer).is_err() {
                    let _ = so::set_socket_send_buffer_size(s, buffer);
                }
                if so::set_socket_recv_buffer_size_force(s, buffer).is_err() {
                    let _ = so::set_socket_recv_buffer_size(s, buffer);
                }
            }
        }
        let theirs: OwnedFd = theirs.into_std()?.into();
        self.getfd(name, theirs).await?;
        Ok(ours)
    }

    async fn send_command(
        &self,
        command: &str,
        arguments: Option<Value>,
        fd: Option<OwnedFd>,
        within: Duration,
    ) -> Result<Value, QmpError> {
        self.send(command, "execute", arguments, fd, within).await
    }

    async fn send(
        &self,
        command: &str,
        how: &str,
        arguments: Option<Value>,
        fd: Option<OwnedFd>,
        within: Duration,
    ) -> Result<Value, QmpError> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let mut msg = json!({ how: command, "id": id });
        if let Some(a) = arguments {
            if !a.is_null() {
                msg["arguments"] = a;
            }
        }
        let (tx, rx) = oneshot::channel();
        {
            let mut p = self.inner.pending.lock().unwrap();
            let Some(map) = p.as_mut() else {
                return Err(QmpError::Closed);
            };
            map.insert(id, tx);
        }
        let line = format!("{msg}\n");
        if self.inner.tx.send((line, fd)).is_err() {
            return Err(QmpError::Closed);
        }
        let reply = match tokio::time::timeout(within, rx).await {
            Ok(r) => r,
            Err(_) => {
                // the reply may still come: nobody waits for it any more
                if let Some(map) = self.inner.pending.lock().unwrap().as_mut() {
                    map.remove(&id);
                }
                return Err(QmpError::Timeout(within, format!("QMP command {command}")));
            }
        };
        match reply {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(QmpError::Command { class, desc, .. })) => Err(QmpError::Command {
                command: command.to_string(),
                class,
                desc,
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(QmpError::Closed),
        }
    }

    /// Every event from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<QmpEvent> {
        self.inner.events.subscribe()
    }

    /// Waits for the next event named `name` on `rx`.
    pub async fn wait_event(
        &self,
        rx: &mut broadcast::Receiver<QmpEvent>,
        name: &str,
        timeout: Duration,
    ) -> Result<QmpEvent, QmpError> {
        let fut = async {
            loop {
                match rx.recv().await {
                    Ok(e) if e.event == name => return Ok(e),
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => return Err(QmpError::Closed),
                }
            }
        };
        tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| QmpError::Timeout(timeout, format!("QMP event {name}")))?
    }

    pub async fn query_status(&self) -> Result<RunStatus, QmpError> {
        let v = self.execute("query-status", None).await?;
        Ok(RunStatus {
            running: v.get("running").and_then(Value::as_bool).unwrap_or(false),
            status: v
                .get("status")
                .and_then(Value::as_str)
                .unwrap_or("unknown")
                .to_string(),
        })
    }

    pub async fn query_migrate(&self) -> Result<MigrationInfo, QmpError> {
        Ok(MigrationInfo::from_json(
            &self.execute("query-migrate", None).await?,
        ))
    }

    pub async fn set_migrate_capabilities(&self, caps: &[(&str, bool)]) -> Result<(), QmpError> {
        let list: Vec<Value> = caps
            .iter()
            .map(|(c, on)| json!({ "capability": c, "state": on }))
            .collect();
        self.execute(
            "migrate-set-capabilities",
            Some(json!({ "capabilities": list })),
        )
        .await?;
        Ok(())
    }

    pub async fn query_migrate_capabilities(&self) -> Result<Vec<(String, bool)>, QmpError> {
        let v = self.execute("query-migrate-capabilities", None).await?;
        Ok(v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| {
                Some((
                    c.get("capability")?.as_str()?.to_string(),
                    c.get("state")?.as_bool()?,
                ))
            })
            .collect())
    }

    pub async fn set_migrate_parameters(&self, params: Value) -> Result<(), QmpError> {
        self.execute("migrate-set-parameters", Some(params)).await?;
        Ok(())
    }
}

/// Writes `bytes` with `fd` attached to the first of them (QEMU takes the descriptor with
/// the command it arrives with), then the rest.
async fn send_with_fd(
    wr: &mut tokio::net::unix::OwnedWriteHalf,
    bytes: &[u8],
    fd: OwnedFd,
) -> std::io::Result<()> {
    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    use std::os::fd::AsFd;
    let sent = {
        let stream: &UnixStream = wr.as_ref();
        loop {
            stream.writable().await?;
            let r = stream.try_io(tokio::io::Interest::WRITABLE, || {
                let mut space =
                    [std::mem::MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
                let mut anc = SendAncillaryBuffer::new(&mut space);
                let fds = [fd.as_fd()];
                anc.push(SendAncillaryMessage::ScmRights(&fds));
                rustix::net::sendmsg(
                    stream,
                    &[std::io::IoSlice::new(bytes)],
                    &mut anc,
                    SendFlags::empty(),
                )
                .map_err(std::io::Error::from)
            });
            match r {
                Ok(n) => break n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    };
    wr.write_all(&bytes[sent..]).await
}

/// `parse_line` and, on a line that is JSON, `parse_version` (as if it were the greeting),
/// for the fuzz targets in `crates/tern-fuzz`. Not an API.
#[doc(hidden)]
pub fn parse_qmp_line_for_fuzzing(line: &str) -> Result<(), QmpError> {
    if let Ok(v) = serde_json::from_str::<Value>(line) {
        let _ = parse_version(&v);
    }
    parse_line(line).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_timestamp_past_system_time_does_not_panic() {
        let l = r#"{"timestamp": {"seconds": 17000004294967296001, "microseconds": 999999}, "event": "MIGRATION", "data": {"status": "active"}}"#;
        match parse_line(l).unwrap() {
            Line::Event(e) => assert_eq!(e.timestamp, SystemTime::UNIX_EPOCH),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn parses_replies_events_and_errors() {
        match parse_line(r#"{"return": {"status": "running"}, "id": 7}"#).unwrap() {
            Line::Reply {
                id: 7,
                result: Ok(v),
            } => assert_eq!(v["status"], "running"),
            l => panic!("{l:?}"),
        }
        match parse_line(r#"{"error": {"class": "GenericError", "desc": "nope"}, "id": 3}"#)
            .unwrap()
        {
            Line::Reply {
                id: 3,
                result: Err((c, d)),
            } => assert_eq!((c.as_str(), d.as_str()), ("GenericError", "nope")),
            l => panic!("{l:?}"),
        }
        match parse_line(
            r#"{"timestamp": {"seconds": 1700000000, "microseconds": 250}, "event": "STOP"}"#,
        )
        .unwrap()
        {
            Line::Event(e) => {
                assert_eq!(e.event, "STOP");
                let us = e
                    .timestamp
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap()
                    .as_micros();
                assert_eq!(us, 1_700_000_000_000_250);
            }
            l => panic!("{l:?}"),
        }
        assert!(matches!(
            parse_line("{not json"),
            Err(QmpError::Malformed(_))
        ));
        assert!(matches!(
            parse_line(r#"{"id": 1}"#),
            Err(QmpError::Malformed(_))
        ));
    }

    #[test]
    fn parses_greeting_version_and_migration_info() {
        let g: Value = serde_json::from_str(
            r#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "Debian 1:10.0.2"}, "capabilities": ["oob"]}}"#,
        )
        .unwrap();
        let v = parse_version(&g).unwrap();
        assert_eq!(v.to_string(), "10.0.2");
        let m = MigrationInfo::from_json(
            &json!({"status": "completed", "downtime": 12, "total-time": 900, "ram": {"total": 100, "remaining": 0, "transferred": 55, "mbps": 1.5}}),
        );
        assert_eq!(m.status, "completed");
        assert_eq!(
            (
                m.downtime_ms,
                m.total_time_ms,
                m.ram_total,
                m.ram_transferred
            ),
            (Some(12), Some(900), Some(100), Some(55))
        );
        assert_eq!(MigrationInfo::from_json(&json!({})).status, "none");
    }
}
