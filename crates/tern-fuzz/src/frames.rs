//! Target `frames`: tern-proto's frame decoder and its encoders.

use bytes::{Bytes, BytesMut};
use tern_proto::{decode, encode, encode_segments, frame_len, Codec, FrameCompressor, HEADER_LEN};

pub(crate) fn run(data: &[u8]) {
    let mut buf = BytesMut::from(data);
    let mut compressor = FrameCompressor::default();
    let mut n = 0usize;
    while let Ok(Some(m)) = decode(&mut buf) {
        let mut again = BytesMut::new();
        encode(&m, &mut again);
        assert_eq!(again.len(), frame_len(&m), "{} frame length", m.name());
        let whole = again.clone().freeze();

        let mut scratch = BytesMut::new();
        let mut segs: Vec<Bytes> = Vec::new();
        encode_segments(&m, &mut scratch, &mut segs);
        let mut joined: Vec<u8> = segs.iter().flat_map(|s| s.iter().copied()).collect();
        joined.extend_from_slice(&scratch);
        assert_eq!(
            joined,
            &whole[..],
            "{}: segments differ from encode",
            m.name()
        );

        let mut cut = BytesMut::from(&whole[..whole.len() - 1]);
        assert_eq!(decode(&mut cut), Ok(None), "{} cut short", m.name());

        assert_eq!(decode(&mut again), Ok(Some(m.clone())), "{}", m.name());
        assert!(
            again.is_empty(),
            "{}: bytes left after re-decoding",
            m.name()
        );

        // through a compressor too, alternating codecs (zstd keeps its context between frames)
        let codec = if n.is_multiple_of(2) {
            Codec::Lz4
        } else {
            Codec::Zstd(1)
        };
        n += 1;
        let mut packed = BytesMut::new();
        let r = compressor.encode(&m, codec, &mut packed);
        assert_eq!(r.wire, packed.len());
        assert_eq!(r.raw + HEADER_LEN, whole.len());
        assert!(r.wire <= r.raw + HEADER_LEN, "compression grew the frame");
        assert_eq!(decode(&mut packed), Ok(Some(m.clone())), "{codec:?}");
        assert!(packed.is_empty());
    }
}
