//! Batching what the source forwards into frames: page records of one block gathered into
//! Pages frames of [`BATCH_PAGES`], verbatim stream bytes into QemuBytes, in stream order;
//! then compressed with the codec the picker chose (before any writer is locked, so memory
//! and disk frames do not wait on each other's compression).

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
        self.batch_block = block;
        self.batch_bytes += match &page.body {
            PageBody::Raw(d) => d.len() + 13,
            PageBody::Zero { .. } => 10,
            PageBody::Ref(_) => 25,
            PageBody::Delta { diff, .. } => 29 + diff.len(),
        };
        self.batch.push(page);
        if self.batch.len() >= BATCH_PAGES {
            self.close_batch();
        }
    }

    pub fn message(&mut self, m: Message) {
        self.close_batch();
        self.close_verbatim();
        self.queued.push(m);
    }

    pub fn size(&self) -> usize {
        self.queued_bytes + self.verbatim.len() + self.batch_bytes
    }

    /// Everything queued, in order, as frames: bulk frames compressed with the picker's
    /// codec (done here, before the writer is locked), the rest as messages.
    pub fn drain(&mut self, comp: &mut Compression) -> Vec<Out> {
        self.close_batch();
        self.close_verbatim();
        self.queued_bytes = 0;
        let codec = comp.picker.codec();
        let mut v = Vec::with_capacity(self.queued.len());
        for m in self.queued.drain(..) {
            let bulk = matches!(m, Message::Pages { .. } | Message::QemuBytes(_));
            if bulk && comp.picker.wants_sample() {
                comp.sample.clear();
                tern_proto::encode(&m, &mut comp.sample);
                comp.picker.sample(&comp.sample[tern_proto::HEADER_LEN..]);
            }
            if bulk && codec != Codec::None {
                let r = comp.fc.encode(&m, codec, &mut comp.buf);
                comp.raw += (r.raw + tern_proto::HEADER_LEN) as u64;
                comp.wire += r.wire as u64;
                v.push(Out::Encoded(comp.buf.split().freeze()));
            } else {
                let n = tern_proto::frame_len(&m) as u64;
                comp.raw += n;
                comp.wire += n;
                v.push(Out::Frame(m));
            }
        }
        v
    }
}
