//! The controller's state in etcd, with a leader lease, so that a standby controller takes
//! over when the active one stops (docs/controller.md). Owns [`EtcdStore`]: the state
//! document, the campaign for leadership and the lease's keepalive; must not decide
//! anything or talk to the agents.
//!
//! Keys, under a prefix `P`:
//! - `P/state`: [`Memory`] as JSON, written whole;
//! - `P/leader`: the leading controller's id, attached to its lease.
//!
//! Leadership: a controller campaigns by granting a lease (TTL `ttl_s`) and putting
//! `P/leader` only if the key does not exist (`create_revision == 0`). A background thread
//! renews the lease every TTL/3. A controller believes it leads only while `P/leader`
//! holds its id under its lease AND its last renewal is younger than TTL minus a margin,
//! so a controller stalled long enough to lose its lease cannot act on an old belief. Every
//! save is a transaction fenced on `P/leader == me` under our lease: a deposed controller
//! writes nothing ([`StateError::NotLeader`]). When the leader dies, its lease expires at
//! most TTL after its last renewal and the key goes with it; a standby's next
//! [`Store::leading`] call wins. A clean stop revokes the lease: the standby wins at once.
//!
//! Wire: etcd's v3 JSON gateway (etcd 3.4: `POST /v3/kv/range`, `/v3/kv/txn`,
//! `/v3/lease/grant`, `/v3/lease/keepalive`, `/v3/lease/revoke`; keys and values base64,
//! int64 as strings) over HTTP/1.1, one connection per request, no gRPC stack. Endpoints
//! are tried in turn when one cannot be reached; `https://` endpoints need
//! [`EtcdStore::open_tls`] (a CA, a client certificate and its key).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use parking_lot::{Condvar, Mutex};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::{json, Value};

use crate::decide::Memory;
use crate::state::{StateError, Store};

/// Connect, read and write timeout of one request to etcd.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest response body read from etcd.
pub const MAX_BODY_BYTES: usize = 64 << 20;
/// The largest status line plus headers read from etcd.
const MAX_HEAD_BYTES: usize = 64 << 10;

/// Files for `https://` endpoints: the CA that signed etcd's certificate, and this
/// controller's client certificate and key (PEM).
#[derive(Debug, Clone)]
pub struct EtcdTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// [`Memory`] and leadership in etcd (see the module doc).
pub struct EtcdStore {
    client: Arc<Client>,
    prefix: String,
    state_key: String,
    leader_key: String,
    me: String,
    ttl: Duration,
    cell: Arc<LeaseCell>,
    keeper: Option<JoinHandle<()>>,
}

/// The lease this controller leads under, shared with the keepalive thread.
struct LeaseCell {
    held: Mutex<Held>,
    wake: Condvar,
}

struct Held {
    lease: Option<Lease>,
    stop: bool,
    /// Test hook: the keepalive thread skips its renewals (a stalled controller).
    paused: bool,
}

#[derive(Debug, Clone, Copy)]
struct Lease {
    id: i64,
    /// When the last successful grant or keepalive was sent: etcd's expiry is at least
    /// this plus `ttl`.
    renewed: Instant,
    ttl: Duration,
}

impl Lease {
    /// Whether the lease is surely still alive at etcd, with a margin for the action the
    /// caller is about to take.
    fn fresh(&self) -> bool {
        self.renewed.elapsed() + self.ttl / 4 < self.ttl
    }
}

impl EtcdStore {
    /// Opens the store at `endpoints` (`http://HOST:PORT`, tried in turn) under `prefix`,
    /// as controller `me`, with a leader lease of `ttl_s` seconds. Does not campaign:
    /// [`Store::leading`] does. Fails if no endpoint answers.
    pub fn open(
        endpoints: &[String],
        prefix: &str,
        me: &str,
        ttl_s: u64,
    ) -> Result<EtcdStore, StateError> {
        Self::open_inner(endpoints, prefix, me, ttl_s, None)
    }

    /// [`EtcdStore::open`] for `https://` endpoints, with mutual TLS.
    pub fn open_tls(
        endpoints: &[String],
        prefix: &str,
        me: &str,
        ttl_s: u64,
        tls: &EtcdTls,
    ) -> Result<EtcdStore, StateError> {
        let config = tls_config(tls)?;
        Self::open_inner(endpoints, prefix, me, ttl_s, Some(config))
    }

    fn open_inner(
        endpoints: &[String],
        prefix: &str,
        me: &str,
        ttl_s: u64,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Result<EtcdStore, StateError> {
        if me.is_empty() {
            return Err(StateError::Etcd("the controller's id is empty".into()));
        }
        if ttl_s == 0 {
            return Err(StateError::Etcd(
                "the leader lease TTL must be at least 1 s".into(),
            ));
        }
        let prefix = prefix.trim_end_matches('/').to_string();
        if prefix.is_empty() {
            return Err(StateError::Etcd("the key prefix is empty".into()));
        }
        let client = Arc::new(Client::new(endpoints, tls)?);
        let ttl = Duration::from_secs(ttl_s);
        let cell = Arc::new(LeaseCell {
            held: Mutex::new(Held {
                lease: None,
                stop: false,
                paused: false,
            }),
            wake: Condvar::new(),
        });
        let mut store = EtcdStore {
            client: client.clone(),
            state_key: format!("{prefix}/state"),
            leader_key: format!("{prefix}/leader"),
            prefix,
            me: me.to_string(),
            ttl,
            cell: cell.clone(),
            keeper: None,
        };
        // Fail now, with a clear error, if etcd cannot be reached.
        store.leader()?;
        let keeper = std::thread::Builder::new()
            .name("etcd-keepalive".into())
            .spawn(move || keep_alive(&client, &cell, ttl))
            .map_err(|e| StateError::Etcd(format!("cannot start the keepalive thread: {e}")))?;
        store.keeper = Some(keeper);
        Ok(store)
    }

    /// Gives up leadership now (revokes the lease: `P/leader` goes and a standby can win at
    /// once). The store stays usable: a later [`Store::leading`] campaigns again.
    pub fn resign(&mut self) -> Result<(), StateError> {
        let lease = self.cell.held.lock().lease.take();
        match lease {
            Some(l) => self.client.revoke(l.id),
            None => Ok(()),
        }
    }

    /// This controller's id.
    pub fn id(&self) -> &str {
        &self.me
    }

    /// Test hook (fault injection): the controller dies without a word. Stops the
    /// keepalive thread without revoking the lease, which then expires at etcd on its own.
    /// Returns when the lease was last renewed (None: it did not lead): etcd keeps it at
    /// least until that instant plus the TTL.
    #[doc(hidden)]
    pub fn crash(mut self) -> Option<Instant> {
        self.stop_keeper();
        let lease = self.cell.held.lock().lease.take();
        lease.map(|l| l.renewed)
    }

    /// Test hook (fault injection): pauses or resumes the lease's renewals, as if this
    /// controller were stalled.
    #[doc(hidden)]
    pub fn pause_keepalive(&self, paused: bool) {
        self.cell.held.lock().paused = paused;
        self.cell.wake.notify_all();
    }

    fn stop_keeper(&mut self) {
        self.cell.held.lock().stop = true;
        self.cell.wake.notify_all();
        if let Some(k) = self.keeper.take() {
            let _ = k.join();
        }
    }

    /// `P/leader`: (who, under which lease), None if nobody leads.
    fn leader(&self) -> Result<Option<(String, i64)>, StateError> {
        Ok(self
            .client
            .get(&self.leader_key)?
            .map(|kv| (String::from_utf8_lossy(&kv.value).into_owned(), kv.lease)))
    }

    /// One attempt to become the leader.
    fn campaign(&self) -> Result<bool, StateError> {
        if self.leader()?.is_some() {
            return Ok(false);
        }
        let sent = Instant::now();
        let (id, ttl) = self.client.grant(self.ttl)?;
        let won = self.client.txn(json!({
            "compare": [{
                "key": B64.encode(&self.leader_key),
                "target": "CREATE",
                "result": "EQUAL",
                "create_revision": "0",
            }],
            "success": [{"request_put": {
                "key": B64.encode(&self.leader_key),
                "value": B64.encode(&self.me),
                "lease": id.to_string(),
            }}],
        }));
        match won {
            Ok(true) => {
                let lease = Lease {
                    id,
                    renewed: sent,
                    ttl,
                };
                self.cell.held.lock().lease = Some(lease);
                self.cell.wake.notify_all();
                tracing::info!(me = %self.me, key = %self.leader_key, "leading (etcd lease {id:x})");
                Ok(true)
            }
            Ok(false) => {
                let _ = self.client.revoke(id);
                Ok(false)
            }
            Err(e) => {
                let _ = self.client.revoke(id);
                Err(e)
            }
        }
    }
}

impl Store for EtcdStore {
    fn load(&mut self) -> Result<Option<Memory>, StateError> {
        match self.client.get(&self.state_key)? {
            None => Ok(None),
            Some(kv) => serde_json::from_slice(&kv.value).map(Some).map_err(|e| {
                StateError::Corrupt(PathBuf::from(format!("etcd key {}", self.state_key)), e)
            }),
        }
    }

    fn save(&mut self, m: &Memory) -> Result<(), StateError> {
        let lease = self.cell.held.lock().lease;
        let Some(lease) = lease.filter(Lease::fresh) else {
            return Err(StateError::NotLeader);
        };
        let body = serde_json::to_vec(m).expect("the state serialises");
        let saved = self.client.txn(json!({
            "compare": [
                {
                    "key": B64.encode(&self.leader_key),
                    "target": "VALUE",
                    "result": "EQUAL",
                    "value": B64.encode(&self.me),
                },
                {
                    "key": B64.encode(&self.leader_key),
                    "target": "LEASE",
                    "result": "EQUAL",
                    "lease": lease.id.to_string(),
                },
            ],
            "success": [{"request_put": {
                "key": B64.encode(&self.state_key),
                "value": B64.encode(&body),
            }}],
        }))?;
        if saved {
            Ok(())
        } else {
            Err(StateError::NotLeader)
        }
    }

    /// True only while `P/leader` holds this controller's id under its lease and the lease
    /// was renewed recently enough; otherwise campaigns once. A controller that becomes
    /// the leader again after losing it must `load` again: a standby may have saved.
    fn leading(&mut self) -> Result<bool, StateError> {
        let lease = self.cell.held.lock().lease;
        if let Some(l) = lease {
            if l.fresh() {
                if let Some((who, id)) = self.leader()? {
                    if who == self.me && id == l.id {
                        return Ok(true);
                    }
                }
                tracing::warn!(me = %self.me, "lost the leadership in etcd");
            } else {
                tracing::warn!(me = %self.me, "the leader lease was not renewed in time");
            }
            // Drop a lease we no longer trust (it may still hold P/leader).
            let mut held = self.cell.held.lock();
            if held.lease.map(|x| x.id) == Some(l.id) {
                held.lease = None;
            }
            drop(held);
            let _ = self.client.revoke(l.id);
        }
        self.campaign()
    }

    fn describe(&self) -> String {
        let leading = self.cell.held.lock().lease.is_some_and(|l| l.fresh());
        format!(
            "etcd {} (prefix {}, leader: {})",
            self.client.urls(),
            self.prefix,
            if leading { "yes" } else { "no" }
        )
    }
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        self.stop_keeper();
        if let Err(e) = self.resign() {
            tracing::warn!(
                "could not revoke the leader lease (a standby waits for it to expire): {e}"
            );
        }
    }
}

/// The keepalive thread: renews the current lease every TTL/3 (sooner after a failure),
/// and forgets it when etcd says it expired.
fn keep_alive(client: &Client, cell: &LeaseCell, ttl: Duration) {
    let period = ttl / 3;
    let retry = (ttl / 10).max(Duration::from_millis(200));
    let timeout = period.clamp(Duration::from_millis(500), REQUEST_TIMEOUT);
    let mut failed = false;
    loop {
        let mut held = cell.held.lock();
        if held.stop {
            return;
        }
        cell.wake
            .wait_for(&mut held, if failed { retry } else { period });
        if held.stop {
            return;
        }
        let Some(lease) = held.lease else { continue };
        if held.paused {
            continue;
        }
        drop(held);
        let sent = Instant::now();
        let answer = client.keepalive(lease.id, timeout);
        let mut held = cell.held.lock();
        let Some(current) = held.lease.as_mut().filter(|l| l.id == lease.id) else {
            continue; // resigned or replaced meanwhile
        };
        match answer {
            Ok(Some(ttl)) => {
                current.renewed = sent;
                current.ttl = ttl;
                failed = false;
            }
            Ok(None) => {
                held.lease = None;
                tracing::warn!("the leader lease expired at etcd: no longer leading");
            }
            Err(e) => {
                // Not renewed: `Lease::fresh` ends the leadership in time if this lasts.
                tracing::warn!("cannot renew the leader lease: {e}");
                failed = true;
            }
        }
    }
}

/// Reads the TLS files into a client configuration.
fn tls_config(tls: &EtcdTls) -> Result<Arc<rustls::ClientConfig>, StateError> {
    let read = |p: &Path| {
        std::fs::read(p).map_err(|e| StateError::Etcd(format!("cannot read {}: {e}", p.display())))
    };
    let no_pem =
        |p: &Path, what: &str| StateError::Etcd(format!("{} holds no PEM {what}", p.display()));
    let ca_pem = read(&tls.ca)?;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&ca_pem).filter_map(Result::ok) {
        roots
            .add(c)
            .map_err(|e| StateError::Etcd(format!("CA {}: {e}", tls.ca.display())))?;
    }
    if roots.is_empty() {
        return Err(no_pem(&tls.ca, "certificate"));
    }
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&read(&tls.cert)?)
        .filter_map(Result::ok)
        .collect();
    if chain.is_empty() {
        return Err(no_pem(&tls.cert, "certificate"));
    }
    let key = PrivateKeyDer::from_pem_slice(&read(&tls.key)?)
        .map_err(|_| no_pem(&tls.key, "private key"))?;
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .and_then(|b| {
        b.with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
    })
    .map_err(|e| StateError::Etcd(format!("TLS configuration refused: {e}")))?;
    Ok(Arc::new(config))
}

/// One etcd endpoint.
#[derive(Debug, Clone)]
struct Endpoint {
    url: String,
    host: String,
    port: u16,
    https: bool,
}

impl Endpoint {
    fn parse(url: &str) -> Result<Endpoint, String> {
        let (https, rest) = if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else {
            return Err(format!("{url}: not http://HOST:PORT or https://HOST:PORT"));
        };
        let rest = rest.trim_end_matches('/');
        let bad = || format!("{url}: not http://HOST:PORT or https://HOST:PORT");
        let (host, port) = if let Some(r) = rest.strip_prefix('[') {
            let (h, p) = r.split_once("]:").ok_or_else(bad)?;
            (h, p)
        } else {
            rest.rsplit_once(':').ok_or_else(bad)?
        };
        let port: u16 = port.parse().map_err(|_| bad())?;
        if host.is_empty() || host.contains(['/', '@']) {
            return Err(bad());
        }
        Ok(Endpoint {
            url: url.trim_end_matches('/').to_string(),
            host: host.to_string(),
            port,
            https,
        })
    }
}

/// A tiny etcd v3 gateway client: one HTTP/1.1 connection per request.
struct Client {
    endpoints: Vec<Endpoint>,
    tls: Option<Arc<rustls::ClientConfig>>,
    /// The endpoint that answered last, tried first.
    next: AtomicUsize,
}

/// A key's value and lease, from a range.
struct Kv {
    value: Vec<u8>,
    lease: i64,
}

trait Conn: Read + Write {}
impl<T: Read + Write> Conn for T {}

impl Client {
    fn new(urls: &[String], tls: Option<Arc<rustls::ClientConfig>>) -> Result<Client, StateError> {
        if urls.is_empty() {
            return Err(StateError::Etcd("no endpoint given".into()));
        }
        let endpoints = urls
            .iter()
            .map(|u| Endpoint::parse(u).map_err(StateError::Etcd))
            .collect::<Result<Vec<_>, _>>()?;
        if tls.is_none() {
            if let Some(e) = endpoints.iter().find(|e| e.https) {
                return Err(StateError::Etcd(format!(
                    "{}: https needs a CA, a client certificate and its key (EtcdTls)",
                    e.url
                )));
            }
        }
        Ok(Client {
            endpoints,
            tls,
            next: AtomicUsize::new(0),
        })
    }

    fn urls(&self) -> String {
        self.endpoints
            .iter()
            .map(|e| e.url.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Connects to the first endpoint that answers, starting with the last good one.
    fn connect(&self, timeout: Duration) -> Result<(Box<dyn Conn>, &Endpoint), StateError> {
        let start = self.next.load(Ordering::Relaxed);
        let mut errors = Vec::new();
        for i in 0..self.endpoints.len() {
            let n = (start + i) % self.endpoints.len();
            let ep = &self.endpoints[n];
            match self.connect_one(ep, timeout) {
                Ok(c) => {
                    self.next.store(n, Ordering::Relaxed);
                    return Ok((c, ep));
                }
                Err(e) => errors.push(format!("{}: {e}", ep.url)),
            }
        }
        Err(StateError::Etcd(format!(
            "cannot reach etcd ({})",
            errors.join("; ")
        )))
    }

    fn connect_one(&self, ep: &Endpoint, timeout: Duration) -> std::io::Result<Box<dyn Conn>> {
        let mut last = None;
        for addr in (ep.host.as_str(), ep.port).to_socket_addrs()? {
            match TcpStream::connect_timeout(&addr, timeout) {
                Ok(s) => {
                    s.set_read_timeout(Some(timeout))?;
                    s.set_write_timeout(Some(timeout))?;
                    s.set_nodelay(true)?;
                    if !ep.https {
                        return Ok(Box::new(s));
                    }
                    let config = self.tls.clone().expect("checked in Client::new");
                    let name = ServerName::try_from(ep.host.clone())
                        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
                    let conn = rustls::ClientConnection::new(config, name)
                        .map_err(std::io::Error::other)?;
                    return Ok(Box::new(rustls::StreamOwned::new(conn, s)));
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| std::io::Error::other("the name resolves to no address")))
    }

    /// POSTs `body` to `path` and returns the first JSON object of the answer.
    fn post(&self, path: &str, body: &Value, timeout: Duration) -> Result<Value, StateError> {
        let (mut conn, ep) = self.connect(timeout)?;
        let fail = |e: &dyn std::fmt::Display| StateError::Etcd(format!("{}{path}: {e}", ep.url));
        let body = serde_json::to_vec(body).expect("JSON serialises");
        let host = if ep.host.contains(':') {
            format!("[{}]:{}", ep.host, ep.port)
        } else {
            format!("{}:{}", ep.host, ep.port)
        };
        let mut req = format!(
            "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(&body);
        conn.write_all(&req)
            .and_then(|()| conn.flush())
            .map_err(|e| fail(&e))?;
        let resp =
            read_response(&mut BufReader::new(conn), MAX_BODY_BYTES).map_err(|e| fail(&e))?;
        let value = serde_json::Deserializer::from_slice(&resp.body)
            .into_iter::<Value>()
            .next();
        let value = match value {
            Some(Ok(v)) => v,
            _ if resp.status != 200 => {
                let text = String::from_utf8_lossy(&resp.body[..resp.body.len().min(200)]);
                return Err(fail(&format_args!("HTTP {}: {}", resp.status, text.trim())));
            }
            Some(Err(e)) => return Err(fail(&format_args!("bad JSON: {e}"))),
            None => return Err(fail(&"empty answer")),
        };
        // Errors: {"error": "...", "message": "...", "code": N}, or inside a stream result.
        let err = value.get("error").filter(|e| !e.is_null());
        if resp.status != 200 || err.is_some() {
            let msg = value
                .get("message")
                .or_else(|| err.and_then(|e| e.get("message")))
                .or(err)
                .and_then(Value::as_str)
                .unwrap_or("no message");
            let code = value
                .get("code")
                .or_else(|| err.and_then(|e| e.get("grpc_code").or(e.get("code"))))
                .and_then(Value::as_i64)
                .unwrap_or(-1);
            return Err(StateError::Etcd(format!(
                "{}{path}: HTTP {}, gRPC code {code}: {msg}",
                ep.url, resp.status
            )));
        }
        Ok(value)
    }

    fn get(&self, key: &str) -> Result<Option<Kv>, StateError> {
        let v = self.post(
            "/v3/kv/range",
            &json!({ "key": B64.encode(key) }),
            REQUEST_TIMEOUT,
        )?;
        let Some(kv) = v
            .get("kvs")
            .and_then(Value::as_array)
            .and_then(|a| a.first())
        else {
            return Ok(None);
        };
        let value = match kv.get("value").and_then(Value::as_str) {
            Some(s) => B64
                .decode(s)
                .map_err(|e| StateError::Etcd(format!("{key}: value is not base64: {e}")))?,
            None => Vec::new(),
        };
        Ok(Some(Kv {
            value,
            lease: int(kv.get("lease")),
        }))
    }

    /// Runs a transaction; whether its comparisons held (and its success branch ran).
    fn txn(&self, body: Value) -> Result<bool, StateError> {
        let v = self.post("/v3/kv/txn", &body, REQUEST_TIMEOUT)?;
        Ok(v.get("succeeded").and_then(Value::as_bool).unwrap_or(false))
    }

    /// Grants a lease: its id and the TTL etcd granted (it may raise a short one).
    fn grant(&self, ttl: Duration) -> Result<(i64, Duration), StateError> {
        let v = self.post(
            "/v3/lease/grant",
            &json!({ "TTL": ttl.as_secs().to_string() }),
            REQUEST_TIMEOUT,
        )?;
        let id = int(v.get("ID"));
        let granted = int(v.get("TTL"));
        if id == 0 || granted <= 0 {
            return Err(StateError::Etcd(format!("lease grant answered {v}")));
        }
        Ok((id, Duration::from_secs(granted as u64)))
    }

    /// Renews a lease: its TTL now, None if it has expired.
    fn keepalive(&self, id: i64, timeout: Duration) -> Result<Option<Duration>, StateError> {
        let v = self.post(
            "/v3/lease/keepalive",
            &json!({ "ID": id.to_string() }),
            timeout,
        )?;
        let result = v.get("result").unwrap_or(&v);
        let ttl = int(result.get("TTL"));
        Ok((ttl > 0).then(|| Duration::from_secs(ttl as u64)))
    }

    /// Revokes a lease (and deletes its keys); a lease already gone is fine.
    fn revoke(&self, id: i64) -> Result<(), StateError> {
        match self.post(
            "/v3/lease/revoke",
            &json!({ "ID": id.to_string() }),
            REQUEST_TIMEOUT,
        ) {
            Ok(_) => Ok(()),
            Err(StateError::Etcd(m)) if m.contains("lease not found") => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// An int64 from the gateway's JSON (a string, or a number); absent is 0.
fn int(v: Option<&Value>) -> i64 {
    match v {
        Some(Value::String(s)) => s.parse().unwrap_or(0),
        Some(Value::Number(n)) => n.as_i64().unwrap_or(0),
        _ => 0,
    }
}

/// An HTTP response's status and body.
#[derive(Debug)]
struct Response {
    status: u16,
    body: Vec<u8>,
}

/// Why an HTTP response could not be read.
#[derive(Debug, thiserror::Error)]
enum HttpError {
    #[error("reading the answer: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed HTTP answer: {0}")]
    Malformed(&'static str),
    #[error("the answer is larger than {0} bytes")]
    TooLarge(usize),
}

/// Reads one line (up to and without CRLF or LF), at most `left` bytes in all.
fn read_line(r: &mut impl BufRead, left: &mut usize) -> Result<String, HttpError> {
    let mut line = Vec::new();
    let n = r
        .by_ref()
        .take(*left as u64 + 1)
        .read_until(b'\n', &mut line)?;
    if n > *left {
        return Err(HttpError::Malformed("header too long"));
    }
    *left -= n;
    if line.last() != Some(&b'\n') {
        return Err(HttpError::Malformed("connection closed in the header"));
    }
    line.pop();
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    String::from_utf8(line).map_err(|_| HttpError::Malformed("header is not UTF-8"))
}

/// Reads an HTTP/1.1 response: `Content-Length`, `Transfer-Encoding: chunked`, or a body
/// to the end of the connection; bodies longer than `cap` are refused.
fn read_response(r: &mut impl BufRead, cap: usize) -> Result<Response, HttpError> {
    let mut left = MAX_HEAD_BYTES;
    let status_line = read_line(r, &mut left)?;
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or("");
    if !version.starts_with("HTTP/1.") {
        return Err(HttpError::Malformed("not an HTTP/1.x status line"));
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or(HttpError::Malformed("bad status code"))?;
    let mut length = None;
    let mut chunked = false;
    loop {
        let line = read_line(r, &mut left)?;
        if line.is_empty() {
            break;
        }
        let (name, value) = line
            .split_once(':')
            .ok_or(HttpError::Malformed("header without a colon"))?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            let n: u64 = value
                .parse()
                .map_err(|_| HttpError::Malformed("bad Content-Length"))?;
            if n > cap as u64 {
                return Err(HttpError::TooLarge(cap));
            }
            length = Some(n as usize);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value
                .rsplit(',')
                .next()
                .is_some_and(|v| v.trim().eq_ignore_ascii_case("chunked"));
            if !chunked {
                return Err(HttpError::Malformed("unsupported Transfer-Encoding"));
            }
        }
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            let mut line_left = 1024;
            let line = read_line(r, &mut line_left)?;
            let size = line.split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(size, 16)
                .map_err(|_| HttpError::Malformed("bad chunk size"))?;
            if size == 0 {
                // Trailers, up to the empty line.
                while !read_line(r, &mut left)?.is_empty() {}
                break;
            }
            if size > cap - body.len() {
                return Err(HttpError::TooLarge(cap));
            }
            let start = body.len();
            body.resize(start + size, 0);
            r.read_exact(&mut body[start..])?;
            let mut crlf_left = 2;
            if !read_line(r, &mut crlf_left)?.is_empty() {
                return Err(HttpError::Malformed("chunk longer than its size"));
            }
        }
    } else if let Some(n) = length {
        body.resize(n, 0);
        r.read_exact(&mut body)?;
    } else {
        r.take(cap as u64 + 1).read_to_end(&mut body)?;
        if body.len() > cap {
            return Err(HttpError::TooLarge(cap));
        }
    }
    Ok(Response { status, body })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &[u8], cap: usize) -> Result<Response, HttpError> {
        read_response(&mut BufReader::new(raw), cap)
    }

    #[test]
    fn a_content_length_body_is_read_exactly() {
        let r = parse(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 7\r\n\r\n{\"a\":1}trailing",
            1024,
        )
        .unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.body, b"{\"a\":1}");
    }

    #[test]
    fn a_chunked_body_is_reassembled_with_extensions_and_trailers() {
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
                    4\r\n{\"re\r\n7;ext=1\r\nsult\":1\r\nA\r\n}\n{\"x\":2}\n\r\n0\r\nX-T: 1\r\n\r\n";
        let r = parse(raw, 1024).unwrap();
        assert_eq!(r.body, b"{\"result\":1}\n{\"x\":2}\n");
    }

    #[test]
    fn a_body_to_the_end_of_the_connection_is_read() {
        let r = parse(b"HTTP/1.0 404 Not Found\nServer: x\n\nNot Found\n", 1024).unwrap();
        assert_eq!(r.status, 404);
        assert_eq!(r.body, b"Not Found\n");
    }

    #[test]
    fn oversize_bodies_are_refused_in_every_framing() {
        let cl = b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n01234567890";
        assert!(matches!(parse(cl, 10), Err(HttpError::TooLarge(10))));
        assert!(parse(cl, 11).is_ok());
        let ch = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\n012345\r\n6\r\n012345\r\n0\r\n\r\n";
        assert!(matches!(parse(ch, 10), Err(HttpError::TooLarge(10))));
        assert!(parse(ch, 12).is_ok());
        let eof = b"HTTP/1.1 200 OK\r\n\r\n01234567890";
        assert!(matches!(parse(eof, 10), Err(HttpError::TooLarge(10))));
        let huge = b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n";
        assert!(parse(huge, 10).is_err());
    }

    #[test]
    fn malformed_answers_are_errors_not_panics() {
        for raw in [
            &b""[..],
            b"SSH-2.0-OpenSSH\r\n\r\n",
            b"HTTP/1.1 abc OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nNoColon\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabcd\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nab",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n",
        ] {
            assert!(
                parse(raw, 1024).is_err(),
                "{:?}",
                String::from_utf8_lossy(raw)
            );
        }
        let long_header = [
            &b"HTTP/1.1 200 OK\r\nX: "[..],
            &vec![b'a'; MAX_HEAD_BYTES],
            b"\r\n\r\n",
        ]
        .concat();
        assert!(matches!(
            parse(&long_header, 1024),
            Err(HttpError::Malformed(_))
        ));
    }

    #[test]
    fn endpoints_parse_and_https_needs_tls_files() {
        let e = Endpoint::parse("http://127.0.0.1:2379/").unwrap();
        assert_eq!(
            (e.host.as_str(), e.port, e.https),
            ("127.0.0.1", 2379, false)
        );
        assert_eq!(e.url, "http://127.0.0.1:2379");
        let e = Endpoint::parse("https://[::1]:2379").unwrap();
        assert_eq!((e.host.as_str(), e.port, e.https), ("::1", 2379, true));
        for bad in [
            "127.0.0.1:2379",
            "http://host",
            "http://:2379",
            "http://h:x",
            "unix:///s",
        ] {
            assert!(Endpoint::parse(bad).is_err(), "{bad}");
        }
        let err = Client::new(&["https://127.0.0.1:2379".into()], None)
            .err()
            .unwrap();
        assert!(err.to_string().contains("https needs"), "{err}");
        assert!(Client::new(&[], None).is_err());
    }

    #[test]
    fn gateway_int64s_are_strings_or_numbers() {
        assert_eq!(
            int(Some(&json!("2324035869608294664"))),
            2324035869608294664
        );
        assert_eq!(int(Some(&json!(5))), 5);
        assert_eq!(int(None), 0);
    }
}
