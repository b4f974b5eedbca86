//! Batching what the source forwards into frames: page records of one block gathered into
//! Pages frames of [`BATCH_PAGES`] records (a run of zero pages is one record for a v5
//! peer), verbatim stream bytes into QemuBytes, in stream order ([`Outbox`], on the
//! reading side of the pipeline); then compressed with the codec the picker chose
//! ([`Compression::encode`], on the sending side, before any writer is locked, so memory and
//! disk frames do not wait on each other's compression).

use bytes::{Bytes, BytesMut};
use tern_proto::{Codec, FrameCompressor, Message, Page, PageBody};

use crate::codec::CodecPicker;

/// Batches page records per block and keeps them in order with verbatim bytes.
pub struct Outbox {
    verbatim: BytesMut,
    batch: Vec<Page>,
    batch_block: u16,
    batch_bytes: usize,
    queued: Vec<Message>,
    queued_bytes: usize,
    /// Consecutive zero pages of one fill become one `ZeroRun` record (v5 peers).
    pub zero_runs: bool,
}

pub const BATCH_PAGES: usize = 64;

/// A frame ready for the writer: as a message (bulk data not copied) or already encoded.
pub enum Out {
    Frame(Message),
    Encoded(Bytes),
}

/// Frame compression state of one migration.
pub struct Compression {
    pub fc: FrameCompressor,
    pub picker: CodecPicker,
    pub buf: BytesMut,
    pub sample: BytesMut,
    /// Frame bytes before compression and after (headers included).
    pub raw: u64,
    pub wire: u64,
}

impl Default for Outbox {
    fn default() -> Self {
        Outbox::new()
    }
}

impl Outbox {
    pub fn new() -> Self {
        Outbox {
            verbatim: BytesMut::new(),
            batch: Vec::with_capacity(BATCH_PAGES),
            batch_block: 0,
            batch_bytes: 0,
            queued: Vec::new(),
            queued_bytes: 0,
            zero_runs: false,
        }
    }

    fn close_batch(&mut self) {
        if !self.batch.is_empty() {
            let pages = std::mem::replace(&mut self.batch, Vec::with_capacity(BATCH_PAGES));
            self.queued.push(Message::Pages {
                block: self.batch_block,
                pages,
            });
            self.queued_bytes += self.batch_bytes;
            self.batch_bytes = 0;
        }
    }

    fn close_verbatim(&mut self) {
        if !self.verbatim.is_empty() {
            let b = self.verbatim.split().freeze();
            self.queued_bytes += b.len();
            self.queued.push(Message::QemuBytes(b));
        }
    }

    pub fn verbatim(&mut self, b: &[u8]) {
        self.close_batch();
        self.verbatim.extend_from_slice(b);
    }

    pub fn page(&mut self, block: u16, page: Page) {
        self.close_verbatim();
        if !self.batch.is_empty() && self.batch_block != block {
            self.close_batch();
        }
        if self.zero_runs && self.extend_zero_run(&page) {
            return;
        }
        self.batch_block = block;
        self.batch_bytes += page.body.record_len();
        self.batch.push(page);
        if self.batch.len() >= BATCH_PAGES {
            self.close_batch();
        }
    }

    /// A zero page right after a zero run (or page) of the same fill joins it.
    fn extend_zero_run(&mut self, page: &Page) -> bool {
        let PageBody::Zero { fill } = page.body else {
            return false;
        };
        let Some(last) = self.batch.last_mut() else {
            return false;
        };
        let (f, n) = match last.body {
            PageBody::Zero { fill } => (fill, 1),
            PageBody::ZeroRun { fill, pages } => (fill, pages),
            _ => return false,
        };
        let next = last.offset + u64::from(n) * tern_proto::limits::PAGE_SIZE;
        if f != fill || next != page.offset || n == u32::MAX {
            return false;
        }
        if n == 1 {
            self.batch_bytes += PageBody::ZeroRun { fill, pages: 2 }.record_len()
                - PageBody::Zero { fill }.record_len();
        }
        last.body = PageBody::ZeroRun { fill, pages: n + 1 };
        true
    }

    pub fn message(&mut self, m: Message) {
        self.close_batch();
        self.close_verbatim();
        self.queued.push(m);
    }

    pub fn size(&self) -> usize {
        self.queued_bytes + self.verbatim.len() + self.batch_bytes
    }

    /// Everything queued, in order.
    pub fn take(&mut self) -> Vec<Message> {
        self.close_batch();
        self.close_verbatim();
        self.queued_bytes = 0;
        std::mem::take(&mut self.queued)
    }
}

impl Compression {
    /// Frames as they go to the writer: bulk frames compressed with the picker's codec
    /// (sampled for the picker about once a second), the rest as messages.
    pub fn encode(&mut self, frames: Vec<Message>) -> Vec<Out> {
        let codec = self.picker.codec();
        let mut v = Vec::with_capacity(frames.len());
        for m in frames {
            let bulk = matches!(m, Message::Pages { .. } | Message::QemuBytes(_));
            if bulk && self.picker.wants_sample() {
                self.sample.clear();
                tern_proto::encode(&m, &mut self.sample);
                self.picker.sample(&self.sample[tern_proto::HEADER_LEN..]);
            }
            if bulk && codec != Codec::None {
                let r = self.fc.encode(&m, codec, &mut self.buf);
                self.raw += (r.raw + tern_proto::HEADER_LEN) as u64;
                self.wire += r.wire as u64;
                v.push(Out::Encoded(self.buf.split().freeze()));
            } else {
                let n = tern_proto::frame_len(&m) as u64;
                self.raw += n;
                self.wire += n;
                v.push(Out::Frame(m));
            }
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn zero(offset: u64) -> Page {
        Page {
            offset,
            body: PageBody::Zero { fill: 0 },
        }
    }

    #[test]
    fn consecutive_zero_pages_become_one_record_for_a_v5_peer() {
        let ps = tern_proto::limits::PAGE_SIZE;
        let mut o = Outbox::new();
        o.zero_runs = true;
        for i in 0..1000 {
            o.page(0, zero(i * ps));
        }
        // a gap, another fill, a data page, another block: each starts a new record
        o.page(0, zero(2000 * ps));
        o.page(
            0,
            Page {
                offset: 2001 * ps,
                body: PageBody::Zero { fill: 7 },
            },
        );
        o.page(
            0,
            Page {
                offset: 2002 * ps,
                body: PageBody::Raw(Bytes::from(vec![1; ps as usize])),
            },
        );
        o.page(0, zero(2003 * ps));
        o.page(1, zero(2004 * ps));
        let size = o.size();
        let frames = o.take();
        let bodies: Vec<(u16, u64, PageBody)> = frames
            .iter()
            .flat_map(|m| match m {
                Message::Pages { block, pages } => pages
                    .iter()
                    .map(|p| (*block, p.offset, p.body.clone()))
                    .collect::<Vec<_>>(),
                _ => vec![],
            })
            .collect();
        assert_eq!(bodies.len(), 6, "{bodies:?}");
        assert_eq!(
            bodies[0],
            (
                0,
                0,
                PageBody::ZeroRun {
                    fill: 0,
                    pages: 1000
                }
            )
        );
        assert_eq!(bodies[1], (0, 2000 * ps, PageBody::Zero { fill: 0 }));
        assert_eq!(bodies[2], (0, 2001 * ps, PageBody::Zero { fill: 7 }));
        assert_eq!(bodies[4], (0, 2003 * ps, PageBody::Zero { fill: 0 }));
        assert_eq!(bodies[5], (1, 2004 * ps, PageBody::Zero { fill: 0 }));
        let encoded: usize = frames.iter().map(tern_proto::frame_len).sum();
        assert!(
            encoded < ps as usize + 200,
            "1005 zero pages and a page in {encoded} bytes"
        );
        assert!(size <= encoded, "{size} {encoded}");
        // an older peer: one record per page, as QEMU sent them
        let mut o = Outbox::new();
        for i in 0..100 {
            o.page(0, zero(i * ps));
        }
        let n: usize = o
            .take()
            .iter()
            .map(|m| match m {
                Message::Pages { pages, .. } => pages.len(),
                _ => 0,
            })
            .sum();
        assert_eq!(n, 100);
    }
}
