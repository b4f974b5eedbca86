//! tern frames on arbitrary bytes: never panic; decoded messages re-encode and decode equal.
#![no_main]
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    while let Ok(Some(m)) = tern_proto::decode(&mut buf) {
        let mut again = BytesMut::new();
        tern_proto::encode(&m, &mut again);
        assert_eq!(tern_proto::decode(&mut again), Ok(Some(m)));
    }
});
