//! The legal order of messages, sans I/O. One [`Conversation`] per connection is fed every
//! message received (and, where an agent wants to check itself, sent), with who sent it; a
//! message that may not come now is an [`OrderError`], which the receiver answers with
//! `Abort{protocol}`. The order lives here once, unit-tested without sockets, instead of in
//! checks scattered over the agents.
//!
//! ```text
//!  Hello ──> HelloAck ──> Opening ──Prepare──> Preparing ──Prepared──> Transfer
//!   (src)     (dst)        │  (src: DiskOffer v3, TpmKey v4 first)   (dst: Summary v2)
//!                          ├─Query──> Querying ──QueryAnswer──> Closed
//!                          ├─Attach─> Data (src: Seq, frame, Seq, frame, ...)
//!                          ├─Tunnel─> Tunneling ──TunnelOpen──> Tunnel (v6: TunnelBytes both ways)
//!                          └─Locations─> Locating ──Locations──> Closed (v7)
//!                                                   └─Locations──> Located ──Addresses──>
//!                                                        Addressing ──Addresses──> Closed (v8)
//!                          └─PlanQuery─> Sounding ──PlanHeld──> Probing (src: ProbeBytes...)
//!                                 ──ProbeEnd──> ProbeEnded ──ProbeResult──> Closed (v9)
//!  Transfer ──SourceDone{commit}──> Finishing ──Resumed──> Closed          (v2)
//!  (v10, after PostcopyOffer in Opening: PostcopyRun once, in Transfer)
//!  Opening ──PostcopyResume──> Resuming ──PostcopyResumed──> Transfer   (v11: post-copy
//!           goes on over a new connection after the link broke; no PostcopyRun again)
//!  (v12, after PostcopyRun: the destination's PostcopyFaults once, in Finishing, before
//!           ReadyToResume)
//!  Transfer ──SourceDone──> Finishing ──ReadyToResume──> AwaitCommit
//!           ──Commit──> Committed ──Resumed──> Closed                      (v1)
//!  Abort from either side, at any stage: Closed.
//! ```

use crate::message::{Message, MessageType};
use crate::version::{MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};

/// Who sent a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Source,
    Destination,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Source => "the source",
            Side::Destination => "the destination",
        }
    }
}

/// Where a connection is in its conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Nothing yet: the source says Hello.
    Hello,
    /// The destination answers with the version (or aborts).
    HelloAck,
    /// The source says what the connection is for: Prepare (after DiskOffer and TpmKey
    /// when the VM has them), Query, or Attach.
    Opening,
    /// The destination prepares: Summary frames (v2), then Prepared.
    Preparing,
    /// QEMU's stream and the disks travel; the destination relays the return path.
    Transfer,
    /// SourceDone came; what is left of the disks' last rounds and Wants may still travel.
    Finishing { commit: bool },
    /// v1: the destination is ready; the source commits.
    AwaitCommit,
    /// v1: committed; the destination answers Resumed.
    Committed,
    /// A Query: the destination answers.
    Querying,
    /// An extra data connection: `Seq`, then the frame it numbers, again and again.
    Data { frame_next: bool },
    /// A libvirt storage tunnel (v6): the destination opens it or aborts.
    Tunneling,
    /// An open storage tunnel: TunnelBytes either way, until each side closes.
    Tunnel,
    /// The opener told where network cards live (v7): the other side answers with its own.
    Locating,
    /// v8: the cards' locations went both ways; the opener tells their addresses.
    Located,
    /// v8: the opener told its cards' addresses; the other side answers with its own.
    Addressing,
    /// v9, a plan: the source asked what the destination holds of a page sample.
    Sounding,
    /// v9: the source may send the link probe's filler, then ProbeEnd.
    Probing,
    /// v9: the probe is over; the destination answers what arrived.
    ProbeEnded,
    /// v11: the source asked to go on with a post-copy migration on this connection; the
    /// destination's QEMU gets ready to recover (or it aborts).
    Resuming,
    /// Ended (Abort, Resumed, QueryAnswer): nothing more may come.
    Closed,
}

impl Stage {
    fn name(self) -> &'static str {
        match self {
            Stage::Hello => "before Hello",
            Stage::HelloAck => "waiting for HelloAck",
            Stage::Opening => "before Prepare",
            Stage::Preparing => "while the destination prepares",
            Stage::Transfer => "during the transfer",
            Stage::Finishing { .. } => "after SourceDone",
            Stage::AwaitCommit => "waiting for Commit",
            Stage::Committed => "after Commit",
            Stage::Querying => "during a Query",
            Stage::Data { .. } => "on a data connection",
            Stage::Tunneling => "while a tunnel opens",
            Stage::Tunnel => "in a tunnel",
            Stage::Locating => "while locations are exchanged",
            Stage::Located => "after the locations, before the addresses",
            Stage::Addressing => "while addresses are exchanged",
            Stage::Sounding => "while a plan asks what is held",
            Stage::Probing => "while a plan probes the link",
            Stage::ProbeEnded => "after a plan's probe",
            Stage::Resuming => "while post-copy is resumed",
            Stage::Closed => "after the conversation ended",
        }
    }
}

/// A message that may not come now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OrderError {
    #[error("{msg} from {} is not allowed {}", from.name(), stage.name())]
    OutOfOrder {
        msg: &'static str,
        from: Side,
        stage: Stage,
    },
    #[error("{msg} needs protocol v{needs}; this connection speaks v{version}")]
    Version {
        msg: &'static str,
        needs: u16,
        version: u16,
    },
    #[error("HelloAck names version {0}, which the Hello did not offer")]
    BadVersion(u16),
}

/// One connection's conversation.
#[derive(Debug, Clone)]
pub struct Conversation {
    stage: Stage,
    /// Offered in Hello, then agreed in HelloAck.
    offered: (u16, u16),
    version: u16,
    disk_offer: bool,
    tpm_key: bool,
    /// v10: PostcopyOffer came (then, in the transfer, PostcopyRun once).
    postcopy: bool,
    postcopy_run: bool,
    /// v12: PostcopyFaults came (once, after PostcopyRun).
    postcopy_faults: bool,
}

impl Default for Conversation {
    fn default() -> Self {
        Conversation::new()
    }
}

impl Conversation {
    pub fn new() -> Self {
        Conversation {
            stage: Stage::Hello,
            offered: (MIN_PROTOCOL_VERSION, PROTOCOL_VERSION),
            version: MIN_PROTOCOL_VERSION,
            disk_offer: false,
            tpm_key: false,
            postcopy: false,
            postcopy_run: false,
            postcopy_faults: false,
        }
    }

    pub fn stage(&self) -> Stage {
        self.stage
    }

    /// The agreed version (once HelloAck went by).
    pub fn version(&self) -> u16 {
        self.version
    }

    /// Checks `msg`, sent by `from`, against the order and moves on.
    pub fn on(&mut self, from: Side, msg: &Message) -> Result<(), OrderError> {
        use MessageType as T;
        use Side::{Destination as D, Source as S};
        let kind = msg.kind();
        let out_of_order = OrderError::OutOfOrder {
            msg: kind.name(),
            from,
            stage: self.stage,
        };
        if !matches!(self.stage, Stage::Hello | Stage::HelloAck) && kind.since() > self.version {
            return Err(OrderError::Version {
                msg: kind.name(),
                needs: kind.since(),
                version: self.version,
            });
        }
        if kind == T::Abort && self.stage != Stage::Closed {
            self.stage = Stage::Closed;
            return Ok(());
        }
        let next = match (self.stage, from, kind) {
            (Stage::Hello, S, T::Hello) => {
                if let Message::Hello {
                    min_version,
                    max_version,
                    ..
                } = msg
                {
                    self.offered = (*min_version, *max_version);
                }
                Stage::HelloAck
            }
            (Stage::HelloAck, D, T::HelloAck) => {
                if let Message::HelloAck { version, .. } = msg {
                    if !(self.offered.0..=self.offered.1).contains(version) {
                        return Err(OrderError::BadVersion(*version));
                    }
                    self.version = *version;
                }
                Stage::Opening
            }
            (Stage::Opening, S, T::DiskOffer) if !self.disk_offer => {
                self.disk_offer = true;
                Stage::Opening
            }
            (Stage::Opening, S, T::TpmKey) if !self.tpm_key => {
                self.tpm_key = true;
                Stage::Opening
            }
            (Stage::Opening, S, T::PostcopyOffer) if !self.postcopy => {
                self.postcopy = true;
                Stage::Opening
            }
            (Stage::Opening, S, T::Prepare) => Stage::Preparing,
            (Stage::Opening, S, T::PostcopyResume)
                if !self.disk_offer && !self.tpm_key && !self.postcopy =>
            {
                // the transfer goes on past POSTCOPY_RUN: it does not come again
                self.postcopy = true;
                self.postcopy_run = true;
                Stage::Resuming
            }
            (Stage::Resuming, D, T::PostcopyResumed) => Stage::Transfer,
            (Stage::Opening, S, T::Query) if !self.disk_offer && !self.tpm_key => Stage::Querying,
            (Stage::Opening, S, T::Attach) if !self.disk_offer && !self.tpm_key => {
                Stage::Data { frame_next: false }
            }
            (Stage::Opening, S, T::Tunnel) if !self.disk_offer && !self.tpm_key => Stage::Tunneling,
            (Stage::Opening, S, T::Locations) if !self.disk_offer && !self.tpm_key => {
                Stage::Locating
            }
            (Stage::Locating, D, T::Locations) if self.version >= 8 => Stage::Located,
            (Stage::Locating, D, T::Locations) => Stage::Closed,
            (Stage::Located, S, T::Addresses) => Stage::Addressing,
            (Stage::Addressing, D, T::Addresses) => Stage::Closed,
            (Stage::Opening, S, T::PlanQuery) if !self.disk_offer && !self.tpm_key => {
                Stage::Sounding
            }
            (Stage::Sounding, D, T::PlanHeld) => Stage::Probing,
            (Stage::Probing, S, T::ProbeBytes) => Stage::Probing,
            (Stage::Probing, S, T::ProbeEnd) => Stage::ProbeEnded,
            (Stage::ProbeEnded, D, T::ProbeResult) => Stage::Closed,
            (Stage::Tunneling, D, T::TunnelOpen) => Stage::Tunnel,
            (Stage::Tunnel, _, T::TunnelBytes) => Stage::Tunnel,
            (Stage::Preparing, D, T::Summary) => Stage::Preparing,
            (Stage::Preparing, D, T::Prepared) => Stage::Transfer,
            (
                Stage::Transfer,
                S,
                T::QemuBytes
                | T::RamBlocks
                | T::Pages
                | T::Content
                | T::DiskManifest
                | T::DiskData
                | T::DiskRoundEnd,
            ) => Stage::Transfer,
            (Stage::Transfer, S, T::PostcopyRun) if self.postcopy && !self.postcopy_run => {
                self.postcopy_run = true;
                Stage::Transfer
            }
            (Stage::Transfer, S, T::SourceDone) => Stage::Finishing {
                commit: matches!(msg, Message::SourceDone { commit: true, .. }),
            },
            (
                Stage::Transfer | Stage::Finishing { .. },
                D,
                T::ReturnPath | T::Want | T::Applied | T::DiskWant | T::DiskRoundDone,
            ) => self.stage,
            (Stage::Finishing { .. }, S, T::Content | T::DiskData | T::DiskRoundEnd) => self.stage,
            (Stage::Finishing { commit: false }, D, T::PostcopyFaults)
                if self.postcopy_run && !self.postcopy_faults =>
            {
                self.postcopy_faults = true;
                self.stage
            }
            (Stage::Finishing { commit: false }, D, T::ReadyToResume) => Stage::AwaitCommit,
            (Stage::Finishing { commit: true }, D, T::Resumed) => Stage::Closed,
            (Stage::AwaitCommit | Stage::Committed, D, T::ReturnPath | T::Applied) => self.stage,
            (Stage::AwaitCommit, S, T::Commit) => Stage::Committed,
            (Stage::Committed, D, T::Resumed) => Stage::Closed,
            (Stage::Querying, D, T::QueryAnswer) => Stage::Closed,
            (Stage::Data { frame_next: false }, S, T::Seq) => Stage::Data { frame_next: true },
            (
                Stage::Data { frame_next: true },
                S,
                T::QemuBytes | T::RamBlocks | T::Pages | T::SourceDone | T::PostcopyRun,
            ) => Stage::Data { frame_next: false },
            _ => return Err(out_of_order),
        };
        self.stage = next;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ErrorCode, MigrationState};
    use bytes::Bytes;
    use Side::{Destination as D, Source as S};

    fn hello(max: u16) -> Message {
        Message::Hello {
            min_version: 1,
            max_version: max,
            agent: "a".into(),
        }
    }
    fn ack(v: u16) -> Message {
        Message::HelloAck {
            version: v,
            agent: "b".into(),
        }
    }
    fn prepare() -> Message {
        Message::Prepare {
            migration_id: "m".into(),
            spec_toml: String::new(),
            source_running: true,
            qemu_version: "10.0.2".into(),
        }
    }
    fn prepared() -> Message {
        Message::Prepared {
            qemu_version: "10.0.2".into(),
        }
    }
    fn data() -> Message {
        Message::QemuBytes(Bytes::from_static(b"x"))
    }
    fn done(commit: bool) -> Message {
        Message::SourceDone {
            digest: [0; 32],
            pages: 1,
            commit,
        }
    }

    fn run(c: &mut Conversation, steps: &[(Side, Message)]) -> Result<(), OrderError> {
        for (from, m) in steps {
            c.on(*from, m)?;
        }
        Ok(())
    }

    #[test]
    fn a_v2_migration_with_summary_wants_and_an_early_commit() {
        let mut c = Conversation::new();
        run(
            &mut c,
            &[
                (S, hello(4)),
                (D, ack(2)),
                (S, prepare()),
                (
                    D,
                    Message::Summary {
                        key_id: 1,
                        prefixes: vec![],
                    },
                ),
                (D, prepared()),
                (S, data()),
                (D, Message::Want { hashes: vec![] }),
                (S, Message::Content { pages: vec![] }),
                (D, Message::Applied { units: 1 }),
                (S, done(true)),
                (D, Message::Applied { units: 1 }),
                (D, Message::Resumed { resumed_unix_us: 1 }),
            ],
        )
        .unwrap();
        assert_eq!(c.stage(), Stage::Closed);
        assert_eq!(c.version(), 2);
        assert!(c.on(S, &data()).is_err(), "nothing after the end");
    }

    #[test]
    fn a_v1_migration_commits_after_ready_to_resume() {
        let mut c = Conversation::new();
        run(
            &mut c,
            &[
                (S, hello(1)),
                (D, ack(1)),
                (S, prepare()),
                (D, prepared()),
                (S, data()),
                (S, done(false)),
                (D, Message::ReadyToResume { digest: [0; 32] }),
                (S, Message::Commit),
                (D, Message::Resumed { resumed_unix_us: 1 }),
            ],
        )
        .unwrap();
        // Resumed without a commit, or Commit before ReadyToResume: refused
        let mut c = Conversation::new();
        run(
            &mut c,
            &[(S, hello(1)), (D, ack(1)), (S, prepare()), (D, prepared())],
        )
        .unwrap();
        c.on(S, &done(false)).unwrap();
        assert!(c.on(S, &Message::Commit).is_err());
        assert!(c.on(D, &Message::Resumed { resumed_unix_us: 1 }).is_err());
    }

    #[test]
    fn messages_newer_than_the_agreed_version_are_refused() {
        let mut c = Conversation::new();
        run(&mut c, &[(S, hello(4)), (D, ack(2))]).unwrap();
        let e = c.on(S, &Message::TpmKey { key: [0; 32] }).unwrap_err();
        assert!(
            matches!(
                e,
                OrderError::Version {
                    needs: 4,
                    version: 2,
                    ..
                }
            ),
            "{e}"
        );
        assert!(c.on(S, &Message::DiskOffer { disks: vec![] }).is_err());
        // a HelloAck outside what the Hello offered
        let mut c = Conversation::new();
        c.on(S, &hello(2)).unwrap();
        assert_eq!(c.on(D, &ack(3)), Err(OrderError::BadVersion(3)));
    }

    #[test]
    fn postcopy_run_only_after_postcopy_offer_and_once() {
        let (prep, prepared) = (prepare(), prepared());
        let mut c = Conversation::new();
        run(
            &mut c,
            &[
                (S, hello(10)),
                (D, ack(10)),
                (S, Message::PostcopyOffer),
                (S, prep.clone()),
                (D, prepared.clone()),
                (S, Message::PostcopyRun),
            ],
        )
        .unwrap();
        assert!(c.on(S, &Message::PostcopyRun).is_err(), "twice");
        // without the offer
        let mut c = Conversation::new();
        run(
            &mut c,
            &[(S, hello(10)), (D, ack(10)), (S, prep), (D, prepared)],
        )
        .unwrap();
        assert!(c.on(S, &Message::PostcopyRun).is_err());
        // not to a v9 peer
        let mut c = Conversation::new();
        run(&mut c, &[(S, hello(9)), (D, ack(9))]).unwrap();
        assert!(c.on(S, &Message::PostcopyOffer).is_err());
    }

    #[test]
    fn postcopy_faults_come_once_after_a_postcopy_stream_before_ready_to_resume() {
        let faults = Message::PostcopyFaults {
            requests: 3,
            pages: 5,
            blocktime: None,
            local: 0,
        };
        let (prep, prepared) = (prepare(), prepared());
        let done = done(false);
        let mut c = Conversation::new();
        run(
            &mut c,
            &[
                (S, hello(12)),
                (D, ack(12)),
                (S, Message::PostcopyOffer),
                (S, prep.clone()),
                (D, prepared.clone()),
                (S, Message::PostcopyRun),
                (S, done.clone()),
                (D, faults.clone()),
            ],
        )
        .unwrap();
        assert!(c.on(D, &faults).is_err(), "twice");
        // on a connection where post-copy went on after the link broke
        let mut c = Conversation::new();
        run(
            &mut c,
            &[
                (S, hello(12)),
                (D, ack(12)),
                (
                    S,
                    Message::PostcopyResume {
                        migration_id: "m".into(),
                    },
                ),
                (D, Message::PostcopyResumed),
                (S, done.clone()),
                (D, faults.clone()),
                (D, Message::ReadyToResume { digest: [0; 32] }),
            ],
        )
        .unwrap();
        // not without post-copy, nor after ReadyToResume, nor to a v11 peer
        let mut c = Conversation::new();
        run(
            &mut c,
            &[
                (S, hello(12)),
                (D, ack(12)),
                (S, prep.clone()),
                (D, prepared.clone()),
                (S, done.clone()),
            ],
        )
        .unwrap();
        assert!(c.on(D, &faults).is_err());
        let mut c = Conversation::new();
        run(
            &mut c,
            &[
                (S, hello(11)),
                (D, ack(11)),
                (S, Message::PostcopyOffer),
                (S, prep),
                (D, prepared),
                (S, Message::PostcopyRun),
                (S, done),
            ],
        )
        .unwrap();
        assert!(c.on(D, &faults).is_err());
    }

    #[test]
    fn a_postcopy_resume_goes_on_with_the_transfer_without_a_second_run() {
        let mut c = Conversation::new();
        let resume = Message::PostcopyResume {
            migration_id: "m".into(),
        };
        run(
            &mut c,
            &[
                (S, hello(11)),
                (D, ack(11)),
                (S, resume.clone()),
                (D, Message::PostcopyResumed),
                (S, Message::QemuBytes(Bytes::from_static(b"x"))),
                (D, Message::ReturnPath(Bytes::from_static(b"y"))),
            ],
        )
        .unwrap();
        assert!(
            c.on(S, &Message::PostcopyRun).is_err(),
            "POSTCOPY_RUN went before the break"
        );
        // nothing travels before the destination is ready
        let mut c = Conversation::new();
        run(&mut c, &[(S, hello(11)), (D, ack(11)), (S, resume.clone())]).unwrap();
        assert!(c
            .on(S, &Message::QemuBytes(Bytes::from_static(b"x")))
            .is_err());
        // not on a migration's own connection, nor to a v10 peer
        let mut c = Conversation::new();
        run(
            &mut c,
            &[(S, hello(11)), (D, ack(11)), (S, Message::PostcopyOffer)],
        )
        .unwrap();
        assert!(c.on(S, &resume).is_err());
        let mut c = Conversation::new();
        run(&mut c, &[(S, hello(10)), (D, ack(10))]).unwrap();
        assert!(c.on(S, &resume).is_err());
    }

    #[test]
    fn the_opening_takes_disks_and_a_key_once_each_then_prepare() {
        let mut c = Conversation::new();
        run(
            &mut c,
            &[
                (S, hello(4)),
                (D, ack(4)),
                (S, Message::DiskOffer { disks: vec![] }),
                (S, Message::TpmKey { key: [1; 32] }),
            ],
        )
        .unwrap();
        assert!(c.on(S, &Message::TpmKey { key: [1; 32] }).is_err(), "twice");
        let mut c2 = c.clone();
        assert!(
            c2.on(
                S,
                &Message::Query {
                    migration_id: "m".into()
                }
            )
            .is_err(),
            "a Query after a DiskOffer"
        );
        c.on(S, &prepare()).unwrap();
        assert!(c.on(S, &data()).is_err(), "data before Prepared");
        assert!(c.on(S, &prepare()).is_err(), "Prepare twice");
    }

    #[test]
    fn queries_and_data_connections_have_their_own_order() {
        let mut q = Conversation::new();
        run(
            &mut q,
            &[
                (S, hello(4)),
                (D, ack(4)),
                (
                    S,
                    Message::Query {
                        migration_id: "m".into(),
                    },
                ),
                (
                    D,
                    Message::QueryAnswer {
                        state: MigrationState::Running,
                        resumed_unix_us: 0,
                    },
                ),
            ],
        )
        .unwrap();
        assert_eq!(q.stage(), Stage::Closed);
        let mut d = Conversation::new();
        run(
            &mut d,
            &[
                (S, hello(4)),
                (D, ack(4)),
                (
                    S,
                    Message::Attach {
                        migration_id: "m".into(),
                        index: 1,
                    },
                ),
                (S, Message::Seq { seq: 0 }),
                (S, data()),
                (S, Message::Seq { seq: 1 }),
                (S, done(true)),
            ],
        )
        .unwrap();
        assert!(d.on(S, &data()).is_err(), "a frame without its Seq");
        d.on(S, &Message::Seq { seq: 2 }).unwrap();
        assert!(d.on(S, &Message::Seq { seq: 3 }).is_err(), "two Seqs");
    }

    #[test]
    fn locations_are_told_once_and_answered_once_on_v7() {
        let told = || Message::Locations { entries: vec![] };
        let mut c = Conversation::new();
        run(&mut c, &[(S, hello(7)), (D, ack(7)), (S, told())]).unwrap();
        assert!(c.on(S, &told()).is_err(), "told twice");
        assert!(c.on(D, &data()).is_err(), "a migration's frame");
        c.on(D, &told()).unwrap();
        assert!(c.on(D, &told()).is_err(), "answered twice");
        let mut old = Conversation::new();
        run(&mut old, &[(S, hello(6)), (D, ack(6))]).unwrap();
        assert!(old.on(S, &told()).is_err(), "a v6 peer");
        let mut first = Conversation::new();
        run(&mut first, &[(S, hello(7)), (D, ack(7))]).unwrap();
        assert!(
            first.on(D, &told()).is_err(),
            "the answer before the question"
        );
    }

    #[test]
    fn on_v8_the_addresses_follow_the_locations_once_each_way() {
        let told = || Message::Locations { entries: vec![] };
        let addrs = || Message::Addresses { entries: vec![] };
        let mut c = Conversation::new();
        run(
            &mut c,
            &[(S, hello(8)), (D, ack(8)), (S, told()), (D, told())],
        )
        .unwrap();
        assert!(c.on(D, &addrs()).is_err(), "the answer before the question");
        c.on(S, &addrs()).unwrap();
        assert!(c.on(S, &addrs()).is_err(), "told twice");
        c.on(D, &addrs()).unwrap();
        assert!(c.on(D, &addrs()).is_err(), "answered twice");
        let mut early = Conversation::new();
        run(&mut early, &[(S, hello(8)), (D, ack(8)), (S, told())]).unwrap();
        assert!(
            early.on(S, &addrs()).is_err(),
            "before the locations' answer"
        );
        let mut v7 = Conversation::new();
        run(
            &mut v7,
            &[(S, hello(7)), (D, ack(7)), (S, told()), (D, told())],
        )
        .unwrap();
        assert!(v7.on(S, &addrs()).is_err(), "a v7 conversation");
    }

    #[test]
    fn on_v9_a_plan_asks_once_then_probes_then_hears_what_arrived() {
        let query = || Message::PlanQuery {
            key_id: 7,
            hashes: vec![[1; 16]],
            chunks: vec![],
        };
        let held = || Message::PlanHeld {
            held: 1,
            chunks_held: 0,
        };
        let filler = || Message::ProbeBytes(Bytes::from_static(&[0; 64]));
        let result = || Message::ProbeResult {
            bytes: 64,
            micros: 10,
        };
        let mut c = Conversation::new();
        run(&mut c, &[(S, hello(9)), (D, ack(9))]).unwrap();
        assert!(c.on(S, &filler()).is_err(), "filler before the question");
        c.on(S, &query()).unwrap();
        assert!(c.on(S, &filler()).is_err(), "filler before the answer");
        assert!(c.on(S, &query()).is_err(), "asked twice");
        c.on(D, &held()).unwrap();
        c.on(S, &filler()).unwrap();
        c.on(S, &filler()).unwrap();
        assert!(c.on(D, &result()).is_err(), "a result before the end");
        c.on(S, &Message::ProbeEnd).unwrap();
        assert!(c.on(S, &filler()).is_err(), "filler after the end");
        c.on(D, &result()).unwrap();
        assert_eq!(c.stage(), Stage::Closed);
        // a plan needs v9, and opens a connection of its own
        let mut v8 = Conversation::new();
        run(&mut v8, &[(S, hello(8)), (D, ack(8))]).unwrap();
        assert!(v8.on(S, &query()).is_err(), "a v8 conversation");
        let mut offered = Conversation::new();
        run(
            &mut offered,
            &[
                (S, hello(9)),
                (D, ack(9)),
                (S, Message::TpmKey { key: [0; 32] }),
            ],
        )
        .unwrap();
        assert!(
            offered.on(S, &query()).is_err(),
            "after a migration's opening"
        );
    }

    #[test]
    fn a_tunnel_opens_once_and_then_carries_only_its_bytes() {
        let tunnel = || Message::Tunnel {
            domain: "web".into(),
        };
        let mut t = Conversation::new();
        let bytes = || Message::TunnelBytes(Bytes::from_static(b"x"));
        run(&mut t, &[(S, hello(6)), (D, ack(6)), (S, tunnel())]).unwrap();
        assert!(t.on(S, &bytes()).is_err(), "bytes before it opened");
        t.on(D, &Message::TunnelOpen).unwrap();
        run(&mut t, &[(S, bytes()), (D, bytes()), (S, bytes())]).unwrap();
        assert!(t.on(S, &data()).is_err(), "a migration's frame in a tunnel");
        assert!(t.on(D, &Message::TunnelOpen).is_err(), "opened twice");
        // v6 only, and never after a VM's disks or key
        let mut old = Conversation::new();
        run(&mut old, &[(S, hello(5)), (D, ack(5))]).unwrap();
        assert!(old.on(S, &tunnel()).is_err(), "a v5 peer");
        let mut after = Conversation::new();
        run(
            &mut after,
            &[
                (S, hello(6)),
                (D, ack(6)),
                (S, Message::TpmKey { key: [1; 32] }),
            ],
        )
        .unwrap();
        assert!(after.on(S, &tunnel()).is_err());
    }

    #[test]
    fn abort_ends_any_stage_and_the_wrong_side_is_refused() {
        let mut c = Conversation::new();
        run(&mut c, &[(S, hello(4)), (D, ack(4)), (S, prepare())]).unwrap();
        assert!(c.on(S, &prepared()).is_err(), "Prepared from the source");
        c.on(
            D,
            &Message::Abort {
                code: ErrorCode::VmExists,
                message: String::new(),
            },
        )
        .unwrap();
        assert_eq!(c.stage(), Stage::Closed);
        let e = c.on(D, &prepared()).unwrap_err();
        assert!(
            e.to_string().contains("after the conversation ended"),
            "{e}"
        );
    }
}
