//! Phase `Connect`: a mutually authenticated connection to the destination agent, Hello
//! (the protocol version both speak, the round trip), and the policy checked against the
//! labels the cluster CA gave the destination, before anything of the VM is sent. Also
//! the other connections a migration opens to the same agent: extra data connections and
//! a Query.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tern_proto::{Message, MigrationState};
use tokio::sync::Mutex;

use super::{expect, send, unexpected, MigrateError, Migration};
use crate::handle::Phase;
use crate::transport::conn::{FrameReader, FrameWriter};
use crate::transport::links::PeerWriter;
use crate::transport::probe::TcpProbe;
use crate::transport::tls::{PeerIdentity, PeerRead, PeerStream, PeerWrite};

/// The control connection, after Hello.
pub(super) struct Peer {
    pub reader: FrameReader<PeerRead>,
    pub writer: PeerWriter,
    pub version: u16,
    /// The destination agent's name, as it said it.
    pub agent: String,
    /// Hello's round trip.
    pub rtt: Duration,
    /// The control connection's path, for the bandwidth controller.
    pub probe: Option<TcpProbe>,
}

pub(super) async fn run(m: &mut Migration) -> Result<Peer, MigrateError> {
    m.handle.set_phase(Phase::Connect);
    let (stream, identity) = dial(m, Duration::from_secs(10)).await?;
    let probe = stream.probe();
    m.peer_ip = stream.tcp().peer_addr().ok().map(|a| a.ip());
    let (rd, wr) = stream.split();
    let mut reader = FrameReader::new(rd);
    let writer: PeerWriter = Arc::new(Mutex::new(FrameWriter::new(wr)));
    m.writer = Some(writer.clone());
    let t_hello = Instant::now();
    send(&writer, &m.engine.hello()).await?;
    let (version, agent) = match expect(&mut reader, Duration::from_secs(10), "HelloAck").await? {
        Message::HelloAck { version, agent } => (version, agent),
        msg => return Err(unexpected(&msg, "HelloAck")),
    };
    let rtt = t_hello.elapsed();
    authorize(m, &agent, &identity)?;
    Ok(Peer {
        reader,
        writer,
        version,
        agent,
        rtt,
        probe,
    })
}

/// The policy, on the labels the cluster CA gave the destination.
fn authorize(m: &Migration, agent: &str, identity: &PeerIdentity) -> Result<(), MigrateError> {
    crate::authorize_there(&*m.host, &m.vm.spec, agent, identity)
        .map_err(MigrateError::NotAuthorized)
}

/// A mutually authenticated connection to the destination agent.
async fn dial(m: &Migration, within: Duration) -> Result<(PeerStream, PeerIdentity), MigrateError> {
    Ok(m.engine
        .security
        .connect(&m.req.to, within, m.engine.config.stall_timeout)
        .await?)
}

/// Another connection to the same agent, after Hello.
async fn side_connection(
    m: &Migration,
    within: Duration,
) -> Result<(FrameReader<PeerRead>, FrameWriter<PeerWrite>), MigrateError> {
    let (stream, _) = dial(m, within).await?;
    let (reader, writer, _) = side_hello(m, stream, within).await?;
    Ok((reader, writer))
}

/// Hello on another connection; the version and agent name of HelloAck.
async fn side_hello(
    m: &Migration,
    stream: PeerStream,
    within: Duration,
) -> Result<(FrameReader<PeerRead>, FrameWriter<PeerWrite>, (u16, String)), MigrateError> {
    let (rd, wr) = stream.split();
    let mut reader = FrameReader::new(rd);
    let mut writer = FrameWriter::new(wr);
    writer
        .send(&m.engine.hello())
        .await
        .map_err(MigrateError::PeerWrite)?;
    match expect(&mut reader, within, "HelloAck").await? {
        Message::HelloAck { version, agent } => Ok((reader, writer, (version, agent))),
        msg => Err(unexpected(&msg, "HelloAck")),
    }
}

/// Opens extra data connection `index` for this migration (Hello, then Attach).
pub(super) async fn open_data_stream(
    m: &Migration,
    index: u16,
) -> Result<(FrameWriter<PeerWrite>, Option<TcpProbe>), MigrateError> {
    let within = Duration::from_secs(10);
    let (stream, _) = dial(m, within).await?;
    let probe = stream.probe();
    let (_, mut writer, _) = side_hello(m, stream, within).await?;
    writer
        .send(&Message::Attach {
            migration_id: m.wire_id(),
            index,
        })
        .await
        .map_err(MigrateError::PeerWrite)?;
    Ok((writer, probe))
}

/// A new connection on which post-copy goes on after the link broke (v11): Hello, the
/// policy checked again (the address may now lead elsewhere), PostcopyResume, and the
/// destination's PostcopyResumed (its QEMU waits on a new stream) or its Abort.
pub(super) async fn resume_postcopy(
    m: &Migration,
) -> Result<(FrameReader<PeerRead>, PeerWriter, u16), MigrateError> {
    let within = Duration::from_secs(10);
    let (stream, identity) = dial(m, within).await?;
    let (mut reader, mut writer, (version, agent)) = side_hello(m, stream, within).await?;
    authorize(m, &agent, &identity)?;
    if version < 11 {
        return Err(MigrateError::Protocol(format!(
            "the destination agent now speaks protocol v{version}: resuming post-copy needs v11"
        )));
    }
    writer
        .send(&Message::PostcopyResume {
            migration_id: m.wire_id(),
        })
        .await
        .map_err(MigrateError::PeerWrite)?;
    // (the destination's QEMU pauses and takes the new stream first)
    match expect(&mut reader, Duration::from_secs(60), "PostcopyResumed").await? {
        Message::PostcopyResumed => Ok((reader, Arc::new(Mutex::new(writer)), version)),
        msg => Err(unexpected(&msg, "PostcopyResumed")),
    }
}

/// Asks the destination what became of this migration (Query), once.
pub(super) async fn query_once(m: &Migration) -> Result<(MigrationState, u64), MigrateError> {
    let within = Duration::from_secs(5);
    let (mut reader, mut writer) = side_connection(m, within).await?;
    writer
        .send(&Message::Query {
            migration_id: m.wire_id(),
        })
        .await
        .map_err(MigrateError::PeerWrite)?;
    match expect(&mut reader, within, "QueryAnswer").await? {
        Message::QueryAnswer {
            state,
            resumed_unix_us,
        } => Ok((state, resumed_unix_us)),
        msg => Err(unexpected(&msg, "QueryAnswer")),
    }
}
