//! Codec rules on hand-built streams; real captured streams are in tests/stream_capture.rs.

use super::*;
use proptest::prelude::*;

mod postcopy;

fn be32(v: u32) -> [u8; 4] {
    v.to_be_bytes()
}

fn header() -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&be32(MAGIC));
    v.extend_from_slice(&be32(3));
    v.push(T_CONFIG);
    v.extend_from_slice(&be32(6));
    v.extend_from_slice(b"pc-10x");
    v
}

fn start_ram(v: &mut Vec<u8>, blocks: &[(&str, u64)]) {
    v.push(T_START);
    v.extend_from_slice(&be32(2));
    v.push(3);
    v.extend_from_slice(b"ram");
    v.extend_from_slice(&be32(0));
    v.extend_from_slice(&be32(4));
    let total: u64 = blocks.iter().map(|b| b.1).sum();
    v.extend_from_slice(&(total | F_MEM_SIZE).to_be_bytes());
    for (n, l) in blocks {
        v.push(n.len() as u8);
        v.extend_from_slice(n.as_bytes());
        v.extend_from_slice(&l.to_be_bytes());
    }
    eos_footer(v, 2);
}

fn eos_footer(v: &mut Vec<u8>, sid: u32) {
    v.extend_from_slice(&F_EOS.to_be_bytes());
    v.push(T_FOOTER);
    v.extend_from_slice(&be32(sid));
}

fn part(v: &mut Vec<u8>, end: bool) {
    v.push(if end { T_END } else { T_PART });
    v.extend_from_slice(&be32(2));
}

fn page(v: &mut Vec<u8>, name: Option<&str>, off: u64, fill: u8) {
    let cont = if name.is_none() { F_CONTINUE } else { 0 };
    v.extend_from_slice(&(off | F_PAGE | cont).to_be_bytes());
    if let Some(n) = name {
        v.push(n.len() as u8);
        v.extend_from_slice(n.as_bytes());
    }
    v.extend_from_slice(&[fill; 4096]);
}

fn zero(v: &mut Vec<u8>, name: Option<&str>, off: u64) {
    let cont = if name.is_none() { F_CONTINUE } else { 0 };
    v.extend_from_slice(&(off | F_ZERO | cont).to_be_bytes());
    if let Some(n) = name {
        v.push(n.len() as u8);
        v.extend_from_slice(n.as_bytes());
    }
    v.push(0);
}

fn tail(v: &mut Vec<u8>) {
    v.push(T_FULL);
    v.extend_from_slice(&be32(3));
    v.push(5);
    v.extend_from_slice(b"timer");
    v.extend_from_slice(&be32(0));
    v.extend_from_slice(&be32(2));
    v.extend_from_slice(&[1, 2, 3, 4, 5]);
    v.push(T_FOOTER);
    v.extend_from_slice(&be32(3));
    v.push(T_EOF);
    let js = br#"{"page_size":4096,"devices":[{"name":"timer"}]}"#;
    v.push(T_VMDESC);
    v.extend_from_slice(&be32(js.len() as u32));
    v.extend_from_slice(js);
}

/// A small but complete stream: START, a PART with pages across two blocks, END, tail.
fn sample() -> Vec<u8> {
    let mut v = header();
    v.push(T_COMMAND);
    v.extend_from_slice(&1u16.to_be_bytes());
    v.extend_from_slice(&0u16.to_be_bytes());
    start_ram(&mut v, &[("pc.ram", 16 * 4096), ("vga", 4 * 4096)]);
    part(&mut v, false);
    page(&mut v, Some("pc.ram"), 0, 1);
    zero(&mut v, None, 4096);
    page(&mut v, Some("vga"), 8192, 2);
    eos_footer(&mut v, 2);
    part(&mut v, false);
    page(&mut v, None, 0, 3); // CONTINUE across sections: still "vga"
    eos_footer(&mut v, 2);
    v.push(T_COMMAND);
    v.extend_from_slice(&11u16.to_be_bytes());
    v.extend_from_slice(&0u16.to_be_bytes());
    part(&mut v, true);
    page(&mut v, Some("pc.ram"), 4096, 4);
    eos_footer(&mut v, 2);
    tail(&mut v);
    v
}

fn feed_in_chunks(
    data: &[u8],
    sizes: &mut dyn Iterator<Item = usize>,
) -> Result<(Vec<Item>, StreamEnd), StreamError> {
    let mut p = Parser::new();
    let mut items = Vec::new();
    let mut buf: Vec<u8> = Vec::new();
    let mut pos = 0;
    loop {
        while let Some((it, n)) = p.parse(&buf)? {
            items.push(it);
            buf.drain(..n);
        }
        if pos == data.len() {
            break;
        }
        let k = sizes.next().unwrap_or(1).max(1).min(data.len() - pos);
        buf.extend_from_slice(&data[pos..pos + k]);
        pos += k;
    }
    assert!(buf.is_empty());
    Ok((merge_tail(items), p.finish()?))
}

/// Tail items arrive in chunks; merge them so chunkings compare equal.
fn merge_tail(items: Vec<Item>) -> Vec<Item> {
    let mut out: Vec<Item> = Vec::new();
    for it in items {
        if let (Some(Item::Tail(a)), Item::Tail(b)) = (out.last_mut(), &it) {
            let mut v = a.to_vec();
            v.extend_from_slice(b);
            *a = Bytes::from(v);
            continue;
        }
        out.push(it);
    }
    out
}

fn encode_all(items: &[Item], mode: NameMode) -> Vec<u8> {
    let mut e = Encoder::new(4096);
    let mut out = Vec::new();
    for i in items {
        e.encode(i, mode, &mut out);
    }
    out
}

#[test]
fn sample_parses_and_reencodes_byte_identically() {
    let s = sample();
    let (items, end) = parse_all(&s).unwrap();
    assert_eq!(encode_all(&items, NameMode::AsInput), s);
    assert_eq!(end.vmdesc_devices, Some(1));
    let pages: Vec<_> = items
        .iter()
        .filter_map(|i| match i {
            Item::Ram(RamRecord::Page { block, offset, .. }) => Some((block.to_string(), *offset)),
            _ => None,
        })
        .collect();
    assert_eq!(
        pages,
        vec![
            ("pc.ram".into(), 0),
            ("vga".into(), 8192),
            ("vga".into(), 0),
            ("pc.ram".into(), 4096)
        ]
    );
    assert!(items
        .iter()
        .any(|i| matches!(i, Item::Command { cmd: 11, .. })));
}

/// `s` fed byte by byte and in odd chunks gives the items it gives whole; those items.
fn same_items_in_any_chunks(s: &[u8]) -> Vec<Item> {
    let (whole, _) = parse_all(s).unwrap();
    let whole = merge_tail(whole);
    let (ones, _) = feed_in_chunks(s, &mut std::iter::repeat(1)).unwrap();
    assert_eq!(ones, whole);
    let (odd, _) = feed_in_chunks(s, &mut [7usize, 4095, 3, 8193, 1].into_iter().cycle()).unwrap();
    assert_eq!(odd, whole);
    whole
}

#[test]
fn feeding_byte_by_byte_or_in_odd_chunks_gives_the_same_items() {
    same_items_in_any_chunks(&sample());
}

#[test]
fn auto_names_reparse_to_the_same_records() {
    let s = sample();
    let (items, _) = parse_all(&s).unwrap();
    let auto = encode_all(&items, NameMode::Auto);
    let (again, _) = parse_all(&auto).unwrap();
    let strip = |v: &[Item]| -> Vec<(String, u64)> {
        v.iter()
            .filter_map(|i| match i {
                Item::Ram(RamRecord::Page { block, offset, .. })
                | Item::Ram(RamRecord::Zero { block, offset, .. }) => {
                    Some((block.to_string(), *offset))
                }
                _ => None,
            })
            .collect()
    };
    assert_eq!(strip(&again), strip(&items));
}

fn err_of(v: &[u8]) -> StreamError {
    let mut p = Parser::new();
    let mut pos = 0;
    loop {
        match p.parse(&v[pos..]) {
            Ok(Some((_, n))) => pos += n,
            Ok(None) => return p.finish().expect_err("stream should be refused"),
            Err(e) => return e,
        }
    }
}

fn unsupported_feature(e: StreamError) -> (String, String) {
    match e {
        StreamError::Unsupported { feature, hint, .. } => (feature, hint),
        e => panic!("expected Unsupported, got {e:?}"),
    }
}

#[test]
fn bad_header_is_refused() {
    assert!(matches!(
        err_of(b"QEVX\0\0\0\x03"),
        StreamError::BadMagic(_)
    ));
    let mut v = header();
    v[7] = 2;
    assert!(matches!(err_of(&v), StreamError::UnsupportedVersion(2)));
}

#[test]
fn unsupported_features_say_what_to_turn_off() {
    for (flag, word) in [
        (F_XBZRLE, "xbzrle"),
        (F_COMPRESS_PAGE, "compress"),
        (F_MULTIFD_FLUSH, "multifd"),
        (F_HOOK, "RDMA"),
    ] {
        let mut v = header();
        start_ram(&mut v, &[("pc.ram", 4096)]);
        part(&mut v, false);
        v.extend_from_slice(&flag.to_be_bytes());
        let (_, hint) = unsupported_feature(err_of(&v));
        assert!(hint.contains(word), "{hint}");
    }
    // COLO (postcopy commands parse: see postcopy.rs)
    let mut v = header();
    v.push(T_COMMAND);
    v.extend_from_slice(&8u16.to_be_bytes());
    v.extend_from_slice(&0u16.to_be_bytes());
    assert!(unsupported_feature(err_of(&v)).1.contains("x-colo"));
    // a non-RAM live section
    let mut v = header();
    v.push(T_START);
    v.extend_from_slice(&be32(5));
    v.push(5);
    v.extend_from_slice(b"block");
    v.extend_from_slice(&be32(0));
    v.extend_from_slice(&be32(1));
    assert!(unsupported_feature(err_of(&v)).1.contains("block"));
    // early-setup device state before RAM's end
    let mut v = header();
    start_ram(&mut v, &[("pc.ram", 4096)]);
    tail(&mut v);
    assert!(unsupported_feature(err_of(&v))
        .0
        .contains("before the end of RAM"));
    // mapped-ram in the configuration
    let mut v = header();
    v.push(T_SUBSECTION);
    let n = b"configuration/capabilities";
    v.push(n.len() as u8);
    v.extend_from_slice(n);
    v.extend_from_slice(&be32(1));
    v.extend_from_slice(&be32(1));
    v.push(10);
    v.extend_from_slice(b"mapped-ram");
    v.push(T_EOF);
    assert!(unsupported_feature(err_of(&v)).0.contains("mapped-ram"));
}

fn malformed(v: &[u8]) -> String {
    match err_of(v) {
        StreamError::Malformed { what, .. } => what,
        e => panic!("expected Malformed, got {e:?}"),
    }
}

#[test]
fn malformed_streams_are_refused() {
    // CONTINUE with no previous block
    let mut v = header();
    start_ram(&mut v, &[("pc.ram", 4096)]);
    part(&mut v, false);
    page(&mut v, None, 0, 1);
    assert!(malformed(&v).contains("CONTINUE"));
    // page outside its block
    let mut v = header();
    start_ram(&mut v, &[("pc.ram", 4096)]);
    part(&mut v, false);
    page(&mut v, Some("pc.ram"), 4096, 1);
    assert!(malformed(&v).contains("outside"));
    // unknown block
    let mut v = header();
    start_ram(&mut v, &[("pc.ram", 4096)]);
    part(&mut v, false);
    page(&mut v, Some("nope"), 0, 1);
    assert!(malformed(&v).contains("unknown RAM block"));
    // unknown flags
    let mut v = header();
    start_ram(&mut v, &[("pc.ram", 4096)]);
    part(&mut v, false);
    v.extend_from_slice(&0x401u64.to_be_bytes());
    assert!(malformed(&v).contains("flags"));
    // EOS with address bits (found by cargo fuzz: they would be lost on re-encoding)
    let mut v = header();
    start_ram(&mut v, &[("pc.ram", 4096)]);
    part(&mut v, false);
    v.extend_from_slice(&(0x5000 | F_EOS).to_be_bytes());
    assert!(malformed(&v).contains("EOS"));
    // wrong footer
    let mut v = header();
    start_ram(&mut v, &[("pc.ram", 4096)]);
    let n = v.len();
    v[n - 1] = 9;
    assert!(malformed(&v).contains("footer"));
    // PART for a section never started
    let mut v = header();
    part(&mut v, false);
    assert!(malformed(&v).contains("unknown section"));
    // unknown top-level byte and unknown command
    let mut v = header();
    v.push(0x42);
    assert!(malformed(&v).contains("unknown item"));
    let mut v = header();
    v.extend_from_slice(&[T_COMMAND, 0, 99, 0, 0]);
    assert!(malformed(&v).contains("unknown command"));
    // MEM_SIZE total that the blocks do not add up to... (blocks overshoot)
    let mut v = header();
    v.push(T_START);
    v.extend_from_slice(&be32(2));
    v.push(3);
    v.extend_from_slice(b"ram");
    v.extend_from_slice(&be32(0));
    v.extend_from_slice(&be32(4));
    v.extend_from_slice(&(4096u64 | F_MEM_SIZE).to_be_bytes());
    v.push(1);
    v.push(b'a');
    v.extend_from_slice(&8192u64.to_be_bytes());
    assert!(malformed(&v).contains("add up"));
}

#[test]
fn names_that_are_not_utf8_are_refused_not_mangled() {
    // found by cargo fuzz: a lossy conversion changed the bytes on re-encoding
    let mut v = header();
    v.push(T_START);
    v.extend_from_slice(&be32(2));
    v.push(3);
    v.extend_from_slice(&[b'r', 0x85, b'm']);
    v.extend_from_slice(&be32(0));
    v.extend_from_slice(&be32(4));
    assert!(malformed(&v).contains("not UTF-8"));
    let mut v = header();
    start_ram(&mut v, &[("pc.ram", 4096)]);
    let at = v.len() - 5 - 8 - 8 - 6; // a byte of the block name inside MEM_SIZE
    v[at] = 0xff;
    assert!(malformed(&v).contains("not UTF-8"), "{}", malformed(&v));
}

#[test]
fn a_page_naming_a_block_in_bytes_that_are_not_utf8_is_refused() {
    // found writing the stream_parser fuzz target: the name 0xff, converted lossily,
    // matched a block named U+FFFD, and re-encoding wrote that name instead
    let mut v = header();
    start_ram(&mut v, &[("\u{fffd}", 4 * 4096)]);
    part(&mut v, false);
    v.extend_from_slice(&F_ZERO.to_be_bytes());
    v.extend_from_slice(&[1, 0xff, 0]);
    assert!(
        malformed(&v).contains("unknown RAM block"),
        "{}",
        malformed(&v)
    );
}

#[test]
fn truncated_streams_fail_at_finish() {
    let s = sample();
    for cut in [0, 5, 30, 200, 5000, s.len() - 40, s.len() - 1] {
        match parse_all(&s[..cut]) {
            Err(StreamError::Truncated { .. }) => {}
            r => panic!("cut at {cut}: {r:?}"),
        }
    }
}

#[test]
fn eof_without_device_sections_and_without_vmdesc_is_a_proper_end() {
    let mut v = header();
    start_ram(&mut v, &[("pc.ram", 4096)]);
    part(&mut v, true);
    zero(&mut v, Some("pc.ram"), 0);
    eos_footer(&mut v, 2);
    v.push(T_EOF);
    let (items, end) = parse_all(&v).unwrap();
    assert_eq!(end.vmdesc_bytes, None);
    assert_eq!(encode_all(&items, NameMode::AsInput), v);
}

proptest! {
    #[test]
    fn random_ram_records_roundtrip(recs in proptest::collection::vec((0u64..16, any::<bool>(), any::<u8>(), any::<bool>(), any::<bool>()), 0..40)) {
        let mut v = header();
        start_ram(&mut v, &[("pc.ram", 16 * 4096), ("vga", 16 * 4096)]);
        part(&mut v, false);
        let mut first = true;
        for (pg, is_zero, fill, vga, named) in recs {
            let name = if vga { "vga" } else { "pc.ram" };
            // CONTINUE is only legal for the same block as the previous record
            let n = if named || first { Some(name) } else { None };
            let off = pg * 4096;
            if is_zero { zero(&mut v, n, off) } else { page(&mut v, n, off, fill) }
            first = false;
        }
        eos_footer(&mut v, 2);
        v.push(T_EOF);
        let (items, _) = parse_all(&v).unwrap();
        prop_assert_eq!(encode_all(&items, NameMode::AsInput), v);
    }

    #[test]
    fn parser_never_panics_after_a_valid_header(junk in proptest::collection::vec(any::<u8>(), 0..600)) {
        let mut v = header();
        start_ram(&mut v, &[("pc.ram", 8 * 4096)]);
        v.extend_from_slice(&junk);
        let mut p = Parser::new();
        let mut pos = 0;
        while let Ok(Some((_, n))) = p.parse(&v[pos..]) { pos += n; }
        let _ = p.finish();
    }
}

#[test]
fn parse_speed_for_page_records() {
    // 64 MiB of PAGE records; a release build parses well above 1 GB/s on this machine.
    let mut v = header();
    start_ram(&mut v, &[("pc.ram", 16384 * 4096)]);
    part(&mut v, false);
    for i in 0..16384u64 {
        page(
            &mut v,
            if i == 0 { Some("pc.ram") } else { None },
            i * 4096,
            i as u8,
        );
    }
    eos_footer(&mut v, 2);
    let t = std::time::Instant::now();
    let mut p = Parser::new();
    let mut pos = 0;
    let mut pages = 0;
    while let Some((it, n)) = p.parse(&v[pos..]).unwrap() {
        pages += matches!(it, Item::Ram(RamRecord::Page { .. })) as u64;
        pos += n;
    }
    assert_eq!(pages, 16384);
    eprintln!(
        "parsed {} MB in {:?} ({:.0} MB/s)",
        v.len() / 1_000_000,
        t.elapsed(),
        v.len() as f64 / 1e6 / t.elapsed().as_secs_f64()
    );
}
