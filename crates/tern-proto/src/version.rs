//! Protocol versions: which this build speaks, and how two agents agree on one (the
//! newest both speak). A message type's version is in [`crate::MessageType::since`].

/// Newest protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 13;
/// Oldest protocol version this build still accepts. With a v1 peer a source sends zero and
/// raw pages only, uncompressed.
pub const MIN_PROTOCOL_VERSION: u16 = 1;

/// Picks the protocol version for a peer offering `[min, max]`: the newest both speak.
pub fn negotiate(peer_min: u16, peer_max: u16) -> Option<u16> {
    let hi = peer_max.min(PROTOCOL_VERSION);
    let lo = peer_min.max(MIN_PROTOCOL_VERSION);
    (lo <= hi).then_some(hi)
}
