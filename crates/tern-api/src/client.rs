//! A minimal blocking HTTP/1.1 client for the agent's control API, over its unix socket:
//! what the CLI and the test kit use. One request per connection
//! (`Connection: close`); JSON in, JSON out. Kept tiny on purpose: the API is local and
//! simple, and the CLI should not pull in an HTTP stack.
//!
//! The same client runs over any stream a [`Connector`] opens
//! ([`Client::with_connector`]): a cluster controller reaches agents' control listeners
//! over mutual TLS that way (`tern_agent::control::client_for`). An answer is read up to
//! [`MAX_ANSWER_BYTES`].

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use crate::image::{ImageInfo, ImportReport, RefreshSummary};
use crate::migration::{MigrateRequest, MigrateStarted, MigrationStatus};
use crate::vm::VmInfo;

/// How long a call waits for the agent's answer.
const CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// The most of an answer a call reads (a VM list or a migration's report is far less); a
/// longer answer is a [`ClientError::BadResponse`].
pub const MAX_ANSWER_BYTES: u64 = 64 << 20;

/// Why a call to the agent's API failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("agent address {0:?}: use unix:/path (the agent's API is a local socket; reach another host's agent over ssh)")]
    BadEndpoint(String),
    #[error(
        "cannot reach the tern agent at {0} (is `tern agent` running? set --agent or TERN_AGENT)"
    )]
    Connect(String, #[source] std::io::Error),
    #[error("cannot reach the tern agent at {0}")]
    Dial(String, #[source] std::io::Error),
    #[error("talking to the agent failed")]
    Io(#[from] std::io::Error),
    #[error("the agent's answer is not valid HTTP: {0}")]
    BadResponse(String),
    #[error("the agent answered HTTP {status} with non-JSON: {body}")]
    NotJson { status: u16, body: String },
    #[error("{message} (HTTP {status})")]
    Api { status: u16, message: String },
    #[error("the agent's answer to {0} is not what this tern expects (a different version?)")]
    Shape(String, #[source] serde_json::Error),
    #[error("path {0:?} is not UTF-8: the API carries paths as JSON strings")]
    NonUtf8Path(std::path::PathBuf),
}

type Result<T> = std::result::Result<T, ClientError>;

/// Where the agent's API is.
#[derive(Debug, Clone)]
pub enum Endpoint {
    /// Its unix socket (this host's agent).
    Unix(String),
    /// Wherever the client's [`Connector`] reaches (e.g. another host's control
    /// listener over TLS); the text names it in messages.
    Custom(String),
}

impl Endpoint {
    pub fn parse(s: &str) -> Result<Endpoint> {
        if let Some(p) = s.strip_prefix("unix:") {
            Ok(Endpoint::Unix(p.into()))
        } else if s.starts_with('/') {
            Ok(Endpoint::Unix(s.into()))
        } else {
            Err(ClientError::BadEndpoint(s.into()))
        }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "unix:{p}"),
            Endpoint::Custom(name) => f.write_str(name),
        }
    }
}

/// A byte stream a call runs over: a unix socket, a TLS stream.
pub trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

/// Opens a new connection to the agent for one call; its argument is how long a read may
/// wait for the agent (None: as long as it takes). An error is a
/// [`ClientError::Dial`].
pub type Connector =
    Arc<dyn Fn(Option<Duration>) -> std::io::Result<Box<dyn ReadWrite + Send>> + Send + Sync>;

#[derive(Clone)]
pub struct Client {
    pub endpoint: Endpoint,
    /// How a [`Endpoint::Custom`] is reached.
    connector: Option<Connector>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl Client {
    pub fn new(endpoint: Endpoint) -> Client {
        Client {
            endpoint,
            connector: None,
        }
    }

    /// A client whose every call opens its connection with `connect`; `name` (e.g.
    /// `tls:HOST:PORT`) names the agent in messages.
    pub fn with_connector(name: impl Into<String>, connect: Connector) -> Client {
        Client {
            endpoint: Endpoint::Custom(name.into()),
            connector: Some(connect),
        }
    }

    fn connect(&self, timeout: Option<Duration>) -> Result<Box<dyn ReadWrite + Send>> {
        Ok(match (&self.endpoint, &self.connector) {
            (Endpoint::Unix(p), _) => {
                let s = UnixStream::connect(p)
                    .map_err(|e| ClientError::Connect(self.endpoint.to_string(), e))?;
                s.set_read_timeout(timeout)?;
                Box::new(s)
            }
            (Endpoint::Custom(name), Some(connect)) => {
                connect(timeout).map_err(|e| ClientError::Dial(name.clone(), e))?
            }
            (Endpoint::Custom(name), None) => return Err(ClientError::BadEndpoint(name.clone())),
        })
    }

    /// Sends one request; returns the JSON body of a 2xx answer (Null when empty).
    pub fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
        self.call_within(method, path, body, Some(CALL_TIMEOUT))
    }

    /// [`Self::call`], waiting at most `timeout` for the answer (None: as long as it
    /// takes, for requests whose work grows with the data, like indexing an image).
    pub fn call_within(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        timeout: Option<Duration>,
    ) -> Result<Value> {
        let mut c = self.connect(timeout)?;
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: tern\r\nContent-Type: application/json\r\nAccept: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        c.write_all(req.as_bytes())?;
        c.flush()?;
        let raw = read_answer(c)?;
        let (status, body) = parse_response(&raw)?;
        let v: Value = if body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&body).map_err(|_| ClientError::NotJson {
                status,
                body: String::from_utf8_lossy(&body).into_owned(),
            })?
        };
        if !(200..300).contains(&status) {
            let message = v
                .get("error")
                .and_then(|e| e.as_str())
                .map(str::to_string)
                .unwrap_or_else(|| v.to_string());
            return Err(ClientError::Api { status, message });
        }
        Ok(v)
    }
}

/// The whole answer, up to [`MAX_ANSWER_BYTES`].
fn read_answer(c: impl Read) -> Result<Vec<u8>> {
    let mut raw = Vec::new();
    c.take(MAX_ANSWER_BYTES + 1).read_to_end(&mut raw)?;
    if raw.len() as u64 > MAX_ANSWER_BYTES {
        return Err(bad(&format!(
            "the answer is longer than {} MiB",
            MAX_ANSWER_BYTES >> 20
        )));
    }
    Ok(raw)
}

fn utf8(p: &Path) -> Result<&str> {
    p.to_str()
        .ok_or_else(|| ClientError::NonUtf8Path(p.to_path_buf()))
}

fn typed<T: DeserializeOwned>(what: &str, v: Value) -> Result<T> {
    serde_json::from_value(v).map_err(|e| ClientError::Shape(what.into(), e))
}

/// The agent's event stream.
impl Client {
    /// Follows `GET /v1/events`: calls `each` with every event as it comes, until `each`
    /// returns false or the agent closes the stream.
    pub fn events(&self, mut each: impl FnMut(crate::events::AgentEvent) -> bool) -> Result<()> {
        self.events_since(None, |_, e| each(e))
    }

    /// The agent's events as [`Client::events`], each with its number (None for progress
    /// ticks and the stream's own `open` and `lagged`); with `since`, first the kept
    /// events after that number (a listener that reconnects misses nothing still kept).
    pub fn events_since(
        &self,
        since: Option<u64>,
        mut each: impl FnMut(Option<u64>, crate::events::AgentEvent) -> bool,
    ) -> Result<()> {
        use std::io::BufRead;
        let mut c = self.connect(None)?;
        let last = since
            .map(|n| format!("Last-Event-ID: {n}\r\n"))
            .unwrap_or_default();
        c.write_all(format!("GET /v1/events HTTP/1.1\r\nHost: tern\r\nAccept: text/event-stream\r\n{last}Connection: close\r\n\r\n").as_bytes())?;
        let mut r = std::io::BufReader::new(c);
        let bad = |s: &str| ClientError::BadResponse(s.into());
        let mut line = String::new();
        r.read_line(&mut line)?;
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("no status line"))?;
        let mut chunked = false;
        loop {
            line.clear();
            if r.read_line(&mut line)? == 0 {
                return Err(bad("headers cut short"));
            }
            let l = line.trim().to_ascii_lowercase();
            if l.is_empty() {
                break;
            }
            chunked |= l.starts_with("transfer-encoding:") && l.contains("chunked");
        }
        if status != 200 {
            return Err(ClientError::Api {
                status,
                message: "the agent refused the event stream".into(),
            });
        }
        read_events(&mut r, chunked, &mut each)
    }
}

/// Largest event (and chunk) the event stream may send: a migration's status is a few KB.
const MAX_EVENT: usize = 1 << 20;

/// The body of an event stream (chunked or plain), event by event, until `each` says stop
/// or the body ends. Sizes are checked before anything is allocated for them.
fn read_events(
    r: &mut impl std::io::BufRead,
    chunked: bool,
    each: &mut impl FnMut(Option<u64>, crate::events::AgentEvent) -> bool,
) -> Result<()> {
    let bad = |s: &str| ClientError::BadResponse(s.into());
    let mut pending: Vec<u8> = Vec::new();
    let mut line = String::new();
    loop {
        // the next piece of the body: one chunk, or what a plain body has
        let piece = if chunked {
            line.clear();
            r.read_line(&mut line)?;
            let size = usize::from_str_radix(line.trim(), 16).map_err(|_| bad("bad chunk size"))?;
            if size > MAX_EVENT {
                return Err(bad("an event stream chunk larger than 1 MiB"));
            }
            if size == 0 {
                return Ok(());
            }
            let mut b = vec![0; size + 2];
            r.read_exact(&mut b)?;
            b.truncate(size);
            b
        } else {
            let b = r.fill_buf()?.to_vec();
            if b.is_empty() {
                return Ok(());
            }
            r.consume(b.len());
            b
        };
        pending.extend_from_slice(&piece);
        while let Some(end) = pending.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = pending.drain(..end + 2).collect();
            let event = String::from_utf8_lossy(&event);
            let id = event
                .lines()
                .find_map(|l| l.strip_prefix("id:"))
                .and_then(|v| v.trim().parse().ok());
            for data in event.lines().filter_map(|l| l.strip_prefix("data:")) {
                let ev = serde_json::from_str(data.trim())
                    .map_err(|e| ClientError::Shape("GET /v1/events".into(), e))?;
                if !each(id, ev) {
                    return Ok(());
                }
            }
        }
        if pending.len() > MAX_EVENT {
            return Err(bad("an event stream event larger than 1 MiB"));
        }
    }
}

/// VMs and migrations, typed.
impl Client {
    /// The agent itself (`GET /v1/agent`): name, addresses, labels, protocol, version.
    pub fn agent_info(&self) -> Result<Value> {
        self.call("GET", "/v1/agent", None)
    }

    /// What the agent's host and its VMs use (`GET /v1/load`), at its latest sample.
    pub fn load(&self) -> Result<crate::load::HostLoad> {
        typed("GET /v1/load", self.call("GET", "/v1/load", None)?)
    }

    /// The VMs on the agent's host.
    pub fn vms(&self) -> Result<Vec<VmInfo>> {
        typed("GET /v1/vms", self.call("GET", "/v1/vms", None)?)
    }

    /// Starts a migration; its id.
    pub fn migrate(&self, vm: &str, req: &MigrateRequest) -> Result<MigrateStarted> {
        let path = format!("/v1/vms/{vm}/migrate");
        let body = serde_json::to_value(req).map_err(|e| ClientError::Shape(path.clone(), e))?;
        typed(&path.clone(), self.call("POST", &path, Some(&body))?)
    }

    /// Carries a libvirt domain's migration (libvirt runs it, tern carries the stream).
    pub fn migrate_libvirt(
        &self,
        domain: &str,
        req: &crate::LibvirtMigrateRequest,
    ) -> Result<MigrateStarted> {
        let path = format!("/v1/libvirt/{domain}/migrate");
        let body = serde_json::to_value(req).map_err(|e| ClientError::Shape(path.clone(), e))?;
        typed(&path.clone(), self.call("POST", &path, Some(&body))?)
    }

    /// One migration's status, progress and report.
    pub fn migration(&self, id: &str) -> Result<MigrationStatus> {
        let path = format!("/v1/migrations/{id}");
        typed(&path.clone(), self.call("GET", &path, None)?)
    }

    /// Every migration this agent knows.
    pub fn migrations(&self) -> Result<Vec<MigrationStatus>> {
        typed(
            "GET /v1/migrations",
            self.call("GET", "/v1/migrations", None)?,
        )
    }
}

/// Failover: the snapshots VMs left here when they migrated away, and the fence.
impl Client {
    /// The departure snapshots this host keeps (`GET /v1/snapshots`).
    pub fn snapshots(&self) -> Result<Vec<crate::snapshot::SnapshotInfo>> {
        typed(
            "GET /v1/snapshots",
            self.call("GET", "/v1/snapshots", None)?,
        )
    }

    /// Runs VM `vm` here again from its snapshot (`POST /v1/snapshots/{vm}/restart`);
    /// waits as long as the restart takes (the stream is read back whole).
    pub fn restart_snapshot(&self, vm: &str) -> Result<crate::snapshot::RestartReport> {
        let path = format!("/v1/snapshots/{vm}/restart");
        typed(
            &path.clone(),
            self.call_within("POST", &path, None, Some(RESTART_TIMEOUT))?,
        )
    }

    /// Drops VM `vm`'s snapshot (`DELETE /v1/snapshots/{vm}`).
    pub fn delete_snapshot(&self, vm: &str) -> Result<()> {
        self.call("DELETE", &format!("/v1/snapshots/{vm}"), None)?;
        Ok(())
    }

    /// Whether the agent fenced itself (`GET /v1/fence`).
    pub fn fence(&self) -> Result<crate::snapshot::FenceStatus> {
        typed("GET /v1/fence", self.call("GET", "/v1/fence", None)?)
    }

    /// Lifts the fence: stops and resumes the VMs named (`POST /v1/fence/release`).
    pub fn release_fence(
        &self,
        req: &crate::snapshot::FenceRelease,
    ) -> Result<crate::snapshot::FenceReleased> {
        let path = "/v1/fence/release";
        let body =
            serde_json::to_value(req).map_err(|e| ClientError::Shape(path.to_string(), e))?;
        typed(path, self.call("POST", path, Some(&body))?)
    }
}

/// How long [`Client::restart_snapshot`] waits: a large VM's stream is read back whole.
const RESTART_TIMEOUT: Duration = Duration::from_secs(600);

/// The host's image library (the chunk index an incoming disk is rebuilt from). These
/// calls wait as long as it takes: the index serves one of them at a time, and an import
/// or index reads whole images.
impl Client {
    /// The indexed images, by path.
    pub fn images(&self) -> Result<Vec<ImageInfo>> {
        typed(
            "GET /v1/images",
            self.call_within("GET", "/v1/images", None, None)?,
        )
    }

    /// Indexes the image at `path` (absolute, on the agent's host) in place; its format
    /// is probed when `format` is None.
    pub fn import_image(&self, path: &Path, format: Option<&str>) -> Result<ImportReport> {
        let body = json!({ "path": utf8(path)?, "format": format });
        typed(
            "POST /v1/images",
            self.call_within("POST", "/v1/images", Some(&body), None)?,
        )
    }

    /// Re-reads the images that changed, drops those whose file is gone.
    pub fn index_images(&self) -> Result<RefreshSummary> {
        typed(
            "POST /v1/images/index",
            self.call_within("POST", "/v1/images/index", None, None)?,
        )
    }

    /// Drops the image at `path` (absolute) from the index; the file stays.
    pub fn remove_image(&self, path: &Path) -> Result<()> {
        let body = json!({ "path": utf8(path)? });
        self.call_within("DELETE", "/v1/images", Some(&body), None)?;
        Ok(())
    }
}

fn parse_response(raw: &[u8]) -> Result<(u16, Vec<u8>)> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("the agent closed the connection before a full HTTP header"))?;
    let head = std::str::from_utf8(&raw[..split]).map_err(|_| bad("HTTP header is not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(&format!("bad HTTP status line {status_line:?}")))?;
    let (mut chunked, mut length) = (false, None);
    for l in lines {
        let l = l.to_ascii_lowercase();
        chunked |= l.starts_with("transfer-encoding:") && l.contains("chunked");
        if let Some(n) = l.strip_prefix("content-length:") {
            length = Some(
                n.trim()
                    .parse::<usize>()
                    .map_err(|_| bad("bad Content-Length"))?,
            );
        }
    }
    let mut body = raw[split + 4..].to_vec();
    if chunked {
        body = dechunk(&body)?;
    } else if let Some(n) = length {
        // a connection that ends early (e.g. TLS without its close_notify) is caught here
        if body.len() < n {
            return Err(bad(&format!(
                "the answer ends after {} of its {n} bytes",
                body.len()
            )));
        }
        body.truncate(n);
    }
    Ok((status, body))
}

fn bad(what: &str) -> ClientError {
    ClientError::BadResponse(what.to_string())
}

fn dechunk(mut b: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = b
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| bad("bad chunked body"))?;
        let size_txt = std::str::from_utf8(&b[..eol]).map_err(|_| bad("bad chunk size"))?;
        let size_txt = size_txt.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_txt, 16).map_err(|_| bad("bad chunk size"))?;
        b = &b[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if b.len() < size + 2 {
            return Err(bad("truncated chunked body"));
        }
        out.extend_from_slice(&b[..size]);
        b = &b[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_stream_is_read_event_by_event_and_oversized_pieces_are_refused() {
        use crate::events::AgentEvent;
        let open = r#"data: {"kind":"open","agent":"a"}"#;
        let vm =
            "id: 41\n".to_string() + r#"data: {"kind":"vm","name":"x","what":"started","pid":7}"#;
        // one event split across two chunks, a keep-alive comment, a second event
        let body = format!("{open}\n\n:\n\n{vm}\n\n");
        let (one, two) = body.split_at(10);
        let chunked = format!(
            "{:x}\r\n{one}\r\n{:x}\r\n{two}\r\n0\r\n\r\n",
            one.len(),
            two.len()
        );
        let mut seen = Vec::new();
        read_events(&mut chunked.as_bytes(), true, &mut |id, e| {
            seen.push((id, e));
            true
        })
        .unwrap();
        assert!(matches!(&seen[0], (None, AgentEvent::Open { agent }) if agent == "a"));
        assert!(matches!(
            &seen[1],
            (Some(41), AgentEvent::Vm { pid: Some(7), .. })
        ));
        assert_eq!(seen.len(), 2);
        // a listener that says stop gets no more
        let mut n = 0;
        read_events(&mut body.as_bytes(), false, &mut |_, _| {
            n += 1;
            false
        })
        .unwrap();
        assert_eq!(n, 1);
        // a hostile chunk size is refused before anything is allocated for it
        let e = read_events(&mut "ffffffffff\r\n".as_bytes(), true, &mut |_, _| true);
        assert!(matches!(e, Err(ClientError::BadResponse(_))), "{e:?}");
        // an endless event too
        let endless = "data: ".to_string() + &"x".repeat(MAX_EVENT + 10);
        let e = read_events(&mut endless.as_bytes(), false, &mut |_, _| true);
        assert!(matches!(e, Err(ClientError::BadResponse(_))), "{e:?}");
    }

    #[test]
    fn parses_plain_and_chunked_responses() {
        let (s, b) =
            parse_response(b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\n{}").unwrap();
        assert_eq!((s, b.as_slice()), (201, &b"{}"[..]));
        let (s, b) =
            parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n[1,\r\n2\r\n2]\r\n0\r\n\r\n").unwrap();
        assert_eq!((s, b.as_slice()), (200, &b"[1,2]"[..]));
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n").is_err());
        // a body shorter than it said is cut short, not taken
        let e = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n[1,").unwrap_err();
        assert!(matches!(e, ClientError::BadResponse(_)), "{e:?}");
    }

    #[test]
    fn an_answer_longer_than_the_cap_is_refused() {
        let mut big = b"HTTP/1.1 200 OK\r\n\r\n".to_vec();
        big.resize(MAX_ANSWER_BYTES as usize + 1, b' ');
        let e = read_answer(big.as_slice()).unwrap_err();
        assert!(
            matches!(&e, ClientError::BadResponse(m) if m.contains("64 MiB")),
            "{e:?}"
        );
        big.truncate(MAX_ANSWER_BYTES as usize);
        assert_eq!(
            read_answer(big.as_slice()).unwrap().len() as u64,
            MAX_ANSWER_BYTES
        );
    }

    #[test]
    fn a_client_runs_over_the_stream_its_connector_opens() {
        use std::sync::Mutex;
        // a stream that answers every request with one canned answer and keeps what was sent
        struct Canned {
            answer: std::io::Cursor<Vec<u8>>,
            sent: Arc<Mutex<Vec<u8>>>,
        }
        impl Read for Canned {
            fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
                self.answer.read(b)
            }
        }
        impl Write for Canned {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.sent.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let load = r#"{"host":"a","labels":["x"],"capacity_cores":3.0,"mem_total_bytes":10,"mem_available_bytes":5,"cpu_busy_cores":0.5,"uptime_ms":7,"interval_ms":2000,"vms":[]}"#;
        let answer = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{load}",
            load.len()
        );
        let sent = Arc::new(Mutex::new(Vec::new()));
        let s2 = sent.clone();
        let c = Client::with_connector(
            "test:a",
            Arc::new(move |_| {
                Ok(Box::new(Canned {
                    answer: std::io::Cursor::new(answer.clone().into_bytes()),
                    sent: s2.clone(),
                }) as Box<dyn ReadWrite + Send>)
            }),
        );
        let l = c.load().unwrap();
        assert_eq!((l.host.as_str(), l.capacity_cores), ("a", 3.0));
        assert!(
            String::from_utf8_lossy(&sent.lock().unwrap()).starts_with("GET /v1/load HTTP/1.1\r\n")
        );
        // a connector that cannot connect names the agent
        let c = Client::with_connector(
            "tls:10.0.0.9:7701",
            Arc::new(|_| Err(std::io::ErrorKind::ConnectionRefused.into())),
        );
        let e = c.agent_info().unwrap_err();
        assert!(
            matches!(&e, ClientError::Dial(n, _) if n == "tls:10.0.0.9:7701"),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            "cannot reach the tern agent at tls:10.0.0.9:7701"
        );
    }
}
