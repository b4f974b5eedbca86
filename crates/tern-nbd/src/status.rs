//! Block status results: [`Extent`]s per meta context, and [`ExtentWalk`], a lazy cursor
//! that covers a byte range with as many `NBD_CMD_BLOCK_STATUS` requests as the server
//! needs (servers may answer a request with fewer bytes than asked).

use std::collections::VecDeque;
use std::ops::Range;

use tokio::io::{AsyncRead, AsyncWrite};

use crate::client::{NbdClient, MAX_STATUS_REQUEST};
use crate::error::BlockStatusError;
use crate::handshake::MetaContextId;
use crate::wire;

/// A run of bytes with one status value in one meta context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
    /// Context-defined flags: for `base:allocation` bit 0 = hole, bit 1 = zero; for
    /// `qemu:dirty-bitmap:*` bit 0 = dirty; for `qemu:allocation-depth` the depth.
    pub flags: u32,
}

impl Extent {
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }

    pub fn range(&self) -> Range<u64> {
        self.offset..self.end()
    }

    /// Dirty, when this extent comes from a `qemu:dirty-bitmap:*` context.
    pub fn is_dirty(&self) -> bool {
        self.flags & wire::STATE_DIRTY != 0
    }

    /// Unallocated, when this extent comes from `base:allocation`.
    pub fn is_hole(&self) -> bool {
        self.flags & wire::STATE_HOLE != 0
    }

    /// Reads as zeroes, when this extent comes from `base:allocation`.
    pub fn is_zero(&self) -> bool {
        self.flags & wire::STATE_ZERO != 0
    }
}

/// Reply to one block status request: extents per negotiated context, each list starting
/// at `offset`, contiguous, and within `offset..offset + length` (possibly shorter).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockStatus {
    pub offset: u64,
    pub length: u64,
    pub contexts: Vec<(MetaContextId, Vec<Extent>)>,
}

impl BlockStatus {
    pub fn extents(&self, context: MetaContextId) -> Option<&[Extent]> {
        self.contexts
            .iter()
            .find(|(id, _)| *id == context)
            .map(|(_, e)| e.as_slice())
    }
}

/// Lazy walk over the extents of one meta context across a byte range. Holds no borrow of
/// the client, so the caller can read data between steps on the same connection.
#[derive(Debug, Clone)]
pub struct ExtentWalk {
    context: MetaContextId,
    /// First byte not yet fetched from the server.
    fetched_to: u64,
    end: u64,
    pending: VecDeque<Extent>,
}

impl ExtentWalk {
    pub fn new(context: MetaContextId, range: Range<u64>) -> Self {
        Self {
            context,
            fetched_to: range.start,
            end: range.end.max(range.start),
            pending: VecDeque::new(),
        }
    }

    /// Next extent in order, or `None` once the range is covered.
    pub async fn next<S>(
        &mut self,
        client: &mut NbdClient<S>,
    ) -> Result<Option<Extent>, BlockStatusError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        if let Some(e) = self.pending.pop_front() {
            return Ok(Some(e));
        }
        if self.fetched_to >= self.end {
            return Ok(None);
        }
        if !client
            .info()
            .meta_contexts
            .iter()
            .any(|c| c.id == self.context)
        {
            return Err(BlockStatusError::UnknownContext(self.context.0));
        }
        let len = (self.end - self.fetched_to).min(MAX_STATUS_REQUEST) as u32;
        let status = client.block_status(self.fetched_to, len).await?;
        // block_status checked every negotiated context is present.
        let extents = status.extents(self.context).unwrap_or_default();
        for e in extents {
            self.fetched_to = e.end();
            self.pending.push_back(*e);
        }
        // Non-empty and zero-length-free (checked in the parser), so the walk advances.
        Ok(self.pending.pop_front())
    }

    /// Next maximal dirty byte range (adjacent dirty extents merged), or `None` when no
    /// dirty bytes remain in the range. Meant for `qemu:dirty-bitmap:*` contexts.
    pub async fn next_dirty<S>(
        &mut self,
        client: &mut NbdClient<S>,
    ) -> Result<Option<Range<u64>>, BlockStatusError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let mut run = loop {
            match self.next(client).await? {
                None => return Ok(None),
                Some(e) if e.is_dirty() => break e.range(),
                Some(_) => {}
            }
        };
        while let Some(e) = self.next(client).await? {
            if e.is_dirty() && e.offset == run.end {
                run.end = e.end();
            } else {
                self.pending.push_front(e);
                break;
            }
        }
        Ok(Some(run))
    }
}
