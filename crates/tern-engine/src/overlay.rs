//! The overlay's control plane between agents (protocol v7, addresses v8): where VMs'
//! network cards live, and their IPv4 addresses. An agent tells its peers when a VM starts running on it (a start, the switchover
//! of an incoming migration, a source that runs its VM again) and, at its own start,
//! everything it runs; each peer answers with everything it runs. The engine carries the
//! exchange; what a location means (forwarding entries) is the daemon's, through
//! [`crate::Host::located`].

use std::time::Duration;

use tern_proto::{CardAddress, Location, Message};

use crate::transport::conn::{ExpectError, FrameReader, FrameWriter};
use crate::transport::tls::HandshakeError;
use crate::Engine;

/// How long one exchange with a peer may take, connection included.
pub const TELL_WITHIN: Duration = Duration::from_secs(10);

/// Why a peer could not be told.
#[derive(Debug, thiserror::Error)]
pub enum TellError {
    #[error("connect to {to}")]
    Connect {
        to: String,
        #[source]
        source: HandshakeError,
    },
    #[error("write to {to}")]
    Write {
        to: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{to}: no answer")]
    Answer {
        to: String,
        #[source]
        source: ExpectError,
    },
    #[error("{to} speaks protocol v{version}; locations need v7 (upgrade that agent)")]
    TooOld { to: String, version: u16 },
    #[error("{to} answered {got}, not {wanted}")]
    Protocol {
        to: String,
        got: &'static str,
        wanted: &'static str,
    },
}

/// What a told peer answered: where its VMs' cards live and (v8) their addresses.
#[derive(Debug, Default)]
pub struct Told {
    pub locations: Vec<Location>,
    pub addresses: Vec<CardAddress>,
}

/// Tells the agent at `to` (HOST:PORT) `entries` and then, when it speaks v8, the cards'
/// `addresses`; its answers are its own. Hello and the locations go out together (one
/// round trip less before the peer's forwarding changes); the addresses (for ARP
/// suppression) follow the answer.
pub async fn tell(
    engine: &Engine,
    to: &str,
    entries: Vec<Location>,
    addresses: Vec<CardAddress>,
) -> Result<Told, TellError> {
    let (stream, _) = engine
        .security
        .connect(to, TELL_WITHIN, engine.config.stall_timeout)
        .await
        .map_err(|source| TellError::Connect {
            to: to.into(),
            source,
        })?;
    let (rd, wr) = stream.split();
    let mut reader = FrameReader::new(rd);
    let mut writer = FrameWriter::new(wr);
    let write = |source| TellError::Write {
        to: to.into(),
        source,
    };
    writer.push(&engine.hello());
    writer.push(&Message::Locations { entries });
    writer.flush().await.map_err(write)?;
    let answer = |source| TellError::Answer {
        to: to.into(),
        source,
    };
    let version = match reader
        .expect(TELL_WITHIN, "HelloAck")
        .await
        .map_err(answer)?
    {
        Message::HelloAck { version, .. } if version < 7 => {
            return Err(TellError::TooOld {
                to: to.into(),
                version,
            })
        }
        Message::HelloAck { version, .. } => version,
        m => {
            return Err(TellError::Protocol {
                to: to.into(),
                got: m.name(),
                wanted: "HelloAck",
            })
        }
    };
    let locations = match reader
        .expect(TELL_WITHIN, "Locations")
        .await
        .map_err(answer)?
    {
        Message::Locations { entries } => entries,
        m => {
            return Err(TellError::Protocol {
                to: to.into(),
                got: m.name(),
                wanted: "Locations",
            })
        }
    };
    if version < 8 {
        return Ok(Told {
            locations,
            addresses: Vec::new(),
        });
    }
    writer.push(&Message::Addresses { entries: addresses });
    writer.flush().await.map_err(write)?;
    match reader
        .expect(TELL_WITHIN, "Addresses")
        .await
        .map_err(answer)?
    {
        Message::Addresses { entries } => Ok(Told {
            locations,
            addresses: entries,
        }),
        m => Err(TellError::Protocol {
            to: to.into(),
            got: m.name(),
            wanted: "Addresses",
        }),
    }
}

/// Whether this agent keeps quiet about its cards (the `overlay-silent` fault of test
/// builds: the overlay as it would be without its control plane).
pub fn silent(engine: &Engine) -> bool {
    crate::fault::fault!(engine.config.fault, OverlaySilent)
}

/// How long frames for a card that left go on to its new host: `normal`, or 1 s with the
/// `overlay-forward-briefly` fault of test builds.
pub fn forward_for(engine: &Engine, normal: std::time::Duration) -> std::time::Duration {
    if crate::fault::fault!(engine.config.fault, OverlayForwardBriefly) {
        std::time::Duration::from_secs(1)
    } else {
        normal
    }
}
