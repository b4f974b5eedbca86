//! Postcopy commands and the package on hand-built streams: every command round-trips,
//! a package's contents are items, and malformed postcopy input is a typed error.

use super::*;

fn command(v: &mut Vec<u8>, cmd: u16, payload: &[u8]) {
    v.push(T_COMMAND);
    v.extend_from_slice(&cmd.to_be_bytes());
    v.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    v.extend_from_slice(payload);
}

fn advise(v: &mut Vec<u8>, page_sizes: u64) {
    let mut p = page_sizes.to_be_bytes().to_vec();
    p.extend_from_slice(&4096u64.to_be_bytes());
    command(v, cmd::POSTCOPY_ADVISE, &p);
}

fn discard_payload(name: &str, ranges: &[(u64, u64)]) -> Vec<u8> {
    let mut p = vec![0, name.len() as u8];
    p.extend_from_slice(name.as_bytes());
    p.push(0);
    for (s, l) in ranges {
        p.extend_from_slice(&s.to_be_bytes());
        p.extend_from_slice(&l.to_be_bytes());
    }
    p
}

fn full_section(v: &mut Vec<u8>, sid: u32, idstr: &str, body: &[u8]) {
    v.push(T_FULL);
    v.extend_from_slice(&be32(sid));
    v.push(idstr.len() as u8);
    v.extend_from_slice(idstr.as_bytes());
    v.extend_from_slice(&be32(0));
    v.extend_from_slice(&be32(1));
    v.extend_from_slice(body);
    v.push(T_FOOTER);
    v.extend_from_slice(&be32(sid));
}

/// The package QEMU sends at the switch: LISTEN, device sections, PING 3, RUN. The
/// "cpu" body holds a false footer for its own section id.
fn package_blob() -> Vec<u8> {
    let mut b = Vec::new();
    command(&mut b, cmd::POSTCOPY_LISTEN, &[]);
    full_section(&mut b, 3, "timer", &[1, 2, 3, 4, 5]);
    full_section(&mut b, 4, "cpu", &[9, T_FOOTER, 0, 0, 0, 4, 0xAA, 7]);
    full_section(&mut b, 5, "empty", &[]);
    command(&mut b, cmd::PING, &be32(3));
    command(&mut b, cmd::POSTCOPY_RUN, &[]);
    b
}

fn packaged(v: &mut Vec<u8>, blob: &[u8]) {
    command(v, cmd::PACKAGED, &be32(blob.len() as u32));
    v.extend_from_slice(blob);
}

/// A postcopy stream as 7.2 sends it (§8), ending with END ram and EOF (no vmdesc).
fn postcopy_sample() -> Vec<u8> {
    let mut v = header();
    command(&mut v, cmd::OPEN_RETURN_PATH, &[]);
    command(&mut v, cmd::PING, &be32(1));
    advise(&mut v, 4096);
    start_ram(&mut v, &[("pc.ram", 16 * 4096), ("vga", 4 * 4096)]);
    part(&mut v, false);
    page(&mut v, Some("pc.ram"), 0, 1);
    zero(&mut v, None, 4096);
    eos_footer(&mut v, 2);
    command(
        &mut v,
        cmd::POSTCOPY_RAM_DISCARD,
        &discard_payload("pc.ram", &[(0, 4096), (8192, 8192)]),
    );
    command(
        &mut v,
        cmd::POSTCOPY_RAM_DISCARD,
        &discard_payload("vga", &[(0, 4 * 4096)]),
    );
    command(&mut v, cmd::PING, &be32(2));
    packaged(&mut v, &package_blob());
    command(&mut v, cmd::PING, &be32(4));
    part(&mut v, false);
    page(&mut v, None, 8192, 2); // CONTINUE across the package: still "pc.ram"
    page(&mut v, Some("vga"), 0, 3);
    eos_footer(&mut v, 2);
    part(&mut v, true);
    eos_footer(&mut v, 2);
    v.push(T_EOF);
    v
}

#[test]
fn postcopy_stream_parses_and_reencodes_byte_identically() {
    let s = postcopy_sample();
    let (items, end) = parse_all(&s).unwrap();
    assert_eq!(encode_all(&items, NameMode::AsInput), s);
    assert_eq!(end.vmdesc_bytes, None);
    let pc: Vec<&PostcopyCommand> = items
        .iter()
        .filter_map(|i| match i {
            Item::Postcopy(c) => Some(c),
            _ => None,
        })
        .collect();
    assert_eq!(
        pc[0],
        &PostcopyCommand::Advise {
            page_sizes: 4096,
            target_page_size: 4096
        }
    );
    assert_eq!(
        pc[1],
        &PostcopyCommand::RamDiscard {
            block: "pc.ram".into(),
            ranges: vec![
                DiscardRange {
                    start: 0,
                    length: 4096
                },
                DiscardRange {
                    start: 8192,
                    length: 8192
                }
            ]
        }
    );
    let pkg = items
        .iter()
        .find_map(|i| match i {
            Item::Packaged(p) => Some(p),
            _ => None,
        })
        .expect("a package");
    let ids: Vec<_> = pkg
        .items
        .iter()
        .filter_map(|i| match i {
            Item::Section(h) => h.idstr.clone(),
            _ => None,
        })
        .collect();
    assert_eq!(ids, ["timer", "cpu", "empty"]);
    assert_eq!(pkg.items[0], Item::Postcopy(PostcopyCommand::Listen));
    assert_eq!(
        pkg.items.last(),
        Some(&Item::Postcopy(PostcopyCommand::Run))
    );
    let bodies: Vec<_> = pkg
        .items
        .iter()
        .filter_map(|i| match i {
            Item::DeviceState(b) => Some(b.to_vec()),
            _ => None,
        })
        .collect();
    assert_eq!(
        bodies,
        [
            vec![1, 2, 3, 4, 5],
            vec![9, T_FOOTER, 0, 0, 0, 4, 0xAA, 7],
            vec![]
        ]
    );
    // CONTINUE after the package still means pc.ram
    assert!(items.iter().any(|i| matches!(
        i,
        Item::Ram(RamRecord::Page { block, offset: 8192, named: false, .. }) if &**block == "pc.ram"
    )));
}

#[test]
fn postcopy_stream_fed_in_chunks_or_from_shared_bytes_gives_the_same_items() {
    let s = postcopy_sample();
    let whole = same_items_in_any_chunks(&s);
    let shared = Bytes::from(s.clone());
    let mut p = Parser::new();
    let mut at = 0;
    let mut items = Vec::new();
    while let Some((it, n)) = p.parse_bytes(&shared.slice(at..)).unwrap() {
        items.push(it);
        at += n;
    }
    assert_eq!(merge_tail(items), whole);
}

#[test]
fn every_postcopy_command_roundtrips_alone() {
    let cmds: Vec<(u16, Vec<u8>)> = vec![
        (
            cmd::POSTCOPY_ADVISE,
            [4096u64.to_be_bytes(), 4096u64.to_be_bytes()].concat(),
        ),
        (cmd::POSTCOPY_ADVISE, vec![]),
        (cmd::POSTCOPY_LISTEN, vec![]),
        (cmd::POSTCOPY_RUN, vec![]),
        (
            cmd::POSTCOPY_RAM_DISCARD,
            discard_payload("pc.ram", &[(4096, 4096)]),
        ),
        (cmd::POSTCOPY_RESUME, vec![]),
        (cmd::RECV_BITMAP, b"\x06pc.ram".to_vec()),
        (cmd::PACKAGED, be32(0).to_vec()),
    ];
    for (c, payload) in cmds {
        let mut v = header();
        command(&mut v, c, &payload);
        let mut p = Parser::new();
        let (h, n) = p.parse(&v).unwrap().unwrap();
        let (item, m) = p.parse(&v[n..]).unwrap().unwrap();
        assert_eq!(n + m, v.len(), "command {c}");
        assert!(
            matches!(item, Item::Postcopy(_) | Item::Packaged(_)),
            "command {c}: {item:?}"
        );
        assert_eq!(encode_all(&[h, item], NameMode::AsInput), v, "command {c}");
        // every shorter input asks for more bytes
        for cut in n..v.len() {
            let mut p = Parser::new();
            p.parse(&v).unwrap();
            assert!(
                p.parse(&v[n..cut]).unwrap().is_none(),
                "command {c} cut at {cut}"
            );
        }
    }
}

#[test]
fn a_package_whose_contents_change_size_is_reencoded_with_its_new_length() {
    let s = postcopy_sample();
    let (mut items, _) = parse_all(&s).unwrap();
    for it in items.iter_mut() {
        if let Item::Packaged(p) = it {
            for i in p.items.iter_mut() {
                if let Item::DeviceState(b) = i {
                    if b.as_ref() == [1, 2, 3, 4, 5] {
                        *b = Bytes::from_static(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
                    }
                }
            }
            p.items.insert(
                p.items.len() - 1,
                Item::Command {
                    cmd: cmd::PING,
                    data: Bytes::from_static(&[0, 0, 0, 0x42]),
                },
            );
        }
    }
    let out = encode_all(&items, NameMode::AsInput);
    assert_eq!(out.len(), s.len() + 5 + 9);
    let (again, _) = parse_all(&out).unwrap();
    assert_eq!(again, items);
}

#[test]
fn hugepage_blocks_carry_their_page_size_when_advise_says_so() {
    let huge = 2 << 20;
    let mut v = header();
    advise(&mut v, 4096 | huge);
    v.push(T_START);
    v.extend_from_slice(&be32(2));
    v.push(3);
    v.extend_from_slice(b"ram");
    v.extend_from_slice(&be32(0));
    v.extend_from_slice(&be32(4));
    let blocks: [(&str, u64, Option<u64>); 3] = [
        ("pc.ram", 4 * huge, Some(huge)),
        ("vga", 4 * 4096, None),
        ("big", 2 * huge, Some(huge)),
    ];
    let total: u64 = blocks.iter().map(|b| b.1).sum();
    v.extend_from_slice(&(total | F_MEM_SIZE).to_be_bytes());
    for (n, l, ps) in blocks {
        v.push(n.len() as u8);
        v.extend_from_slice(n.as_bytes());
        v.extend_from_slice(&l.to_be_bytes());
        if let Some(ps) = ps {
            v.extend_from_slice(&ps.to_be_bytes());
        }
    }
    eos_footer(&mut v, 2);
    part(&mut v, true);
    page(&mut v, Some("big"), huge, 7);
    eos_footer(&mut v, 2);
    v.push(T_EOF);
    let (items, _) = parse_all(&v).unwrap();
    assert_eq!(encode_all(&items, NameMode::AsInput), v);
    let mut p = Parser::new();
    let mut pos = 0;
    while let Some((_, n)) = p.parse(&v[pos..]).unwrap() {
        pos += n;
    }
    assert_eq!(p.postcopy_page_sizes(), Some(4096 | huge));
    let got: Vec<_> = p.blocks().iter().map(|b| b.page_size).collect();
    assert_eq!(got, [Some(huge), None, Some(huge)]);
}

#[test]
fn a_resumed_channel_continues_without_a_header() {
    let s = postcopy_sample();
    // parse up to (not including) the PART after the package, as if the link broke there
    let mut p = Parser::new();
    let mut pos = 0;
    loop {
        let (it, n) = p.parse(&s[pos..]).unwrap().unwrap();
        pos += n;
        if matches!(it, Item::Command { cmd: cmd::PING, ref data } if data[..] == be32(4)) {
            break;
        }
    }
    let mut v = Vec::new();
    command(&mut v, cmd::RECV_BITMAP, b"\x06pc.ram");
    command(&mut v, cmd::RECV_BITMAP, b"\x03vga");
    command(&mut v, cmd::POSTCOPY_RESUME, &[]);
    part(&mut v, false);
    page(&mut v, Some("vga"), 4096, 9);
    eos_footer(&mut v, 2);
    part(&mut v, true);
    eos_footer(&mut v, 2);
    v.push(T_EOF);
    // an agent that restarted makes the same parser from what its predecessor kept
    let kept = serde_json::to_string(&p.resume_state()).unwrap();
    let mut again = Parser::from_resume_state(serde_json::from_str(&kept).unwrap());
    assert_eq!(again.resume_state(), p.resume_state());
    let mut at = 0;
    let mut items_again = Vec::new();
    while let Some((it, n)) = again.parse(&v[at..]).unwrap() {
        items_again.push(it);
        at += n;
    }
    let mut r = p.resumed();
    let mut items = Vec::new();
    let mut at = 0;
    while let Some((it, n)) = r.parse(&v[at..]).unwrap() {
        items.push(it);
        at += n;
    }
    assert_eq!(at, v.len());
    r.finish().unwrap();
    assert_eq!(
        items[0],
        Item::Postcopy(PostcopyCommand::RecvBitmap {
            block: "pc.ram".into()
        })
    );
    assert_eq!(items[2], Item::Postcopy(PostcopyCommand::Resume));
    assert_eq!(encode_all(&items, NameMode::AsInput), v);
    assert_eq!(items_again, items);
    // the source names the block again on the new channel: a CONTINUE first is refused
    let mut bad = Vec::new();
    part(&mut bad, false);
    page(&mut bad, None, 4096, 9);
    let mut r = p.resumed();
    let (_, n) = r.parse(&bad).unwrap().unwrap();
    assert!(matches!(
        r.parse(&bad[n..]),
        Err(StreamError::Malformed { .. })
    ));
}

/// The error for `v`, which must be a postcopy stream up to RAM's first PART (as
/// `prefix` builds) followed by one bad item.
fn malformed_after_prefix(bad: impl FnOnce(&mut Vec<u8>)) -> String {
    let mut v = prefix();
    bad(&mut v);
    malformed(&v)
}

fn prefix() -> Vec<u8> {
    let mut v = header();
    advise(&mut v, 4096);
    start_ram(&mut v, &[("pc.ram", 16 * 4096)]);
    v
}

#[test]
fn malformed_packages_are_refused() {
    // the blob ends inside an item (a PING cut short)
    let w = malformed_after_prefix(|v| {
        let mut blob = Vec::new();
        command(&mut blob, cmd::POSTCOPY_LISTEN, &[]);
        command(&mut blob, cmd::PING, &be32(3));
        blob.truncate(blob.len() - 2);
        packaged(v, &blob);
        command(v, cmd::PING, &be32(4));
    });
    assert!(w.contains("ends inside an item"), "{w}");
    // over the limit: refused from the length alone, before the bytes arrive
    let mut v = prefix();
    command(&mut v, cmd::PACKAGED, &be32(MAX_PACKAGED as u32 + 1));
    let mut p = Parser::new();
    let mut pos = 0;
    let e = loop {
        match p.parse(&v[pos..]) {
            Ok(Some((_, n))) => pos += n,
            Ok(None) => panic!("waited for an oversized package"),
            Err(e) => break e,
        }
    };
    assert!(
        matches!(&e, StreamError::Malformed { what, .. } if what.contains("at most")),
        "{e:?}"
    );
    // the PACKAGED command's own payload is not 4 bytes
    let w = malformed_after_prefix(|v| command(v, cmd::PACKAGED, &[0, 0, 0, 0, 0]));
    assert!(w.contains("5-byte payload"), "{w}");
    // nested
    let w = malformed_after_prefix(|v| {
        let mut inner = Vec::new();
        packaged(&mut inner, &[]);
        packaged(v, &inner);
    });
    assert!(w.contains("inside a package"), "{w}");
    // EOF inside
    let w = malformed_after_prefix(|v| packaged(v, &[T_EOF]));
    assert!(w.contains("EOF inside"), "{w}");
    // a device section with no footer
    let w = malformed_after_prefix(|v| {
        let mut blob = Vec::new();
        full_section(&mut blob, 3, "timer", &[1, 2, 3]);
        blob.truncate(blob.len() - 5);
        packaged(v, &blob);
    });
    assert!(w.contains("no footer"), "{w}");
    // a RAM section left open at the package's end
    let w = malformed_after_prefix(|v| {
        let mut blob = Vec::new();
        part(&mut blob, false);
        page(&mut blob, Some("pc.ram"), 0, 1);
        packaged(v, &blob);
    });
    assert!(w.contains("inside a section"), "{w}");
}

#[test]
fn malformed_discards_are_refused() {
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (vec![], "empty payload"),
        (
            [&[1u8][..], &discard_payload("pc.ram", &[(0, 4096)])[1..]].concat(),
            "version 1",
        ),
        (
            discard_payload("pc.ram", &[]),
            "not a positive multiple of 16",
        ),
        (
            {
                let mut p = discard_payload("pc.ram", &[(0, 4096)]);
                p.pop();
                p
            },
            "not a positive multiple of 16",
        ),
        (
            {
                let mut p = discard_payload("pc.ram", &[(0, 4096)]);
                p[8] = 1; // the terminator
                p
            },
            "no terminator",
        ),
        (vec![0, 0, 0], "no block name"),
        (vec![0, 9, b'p'], "no block name"),
        (discard_payload("pc.ram", &[(100, 4096)]), "not aligned"),
        (
            discard_payload("pc.ram", &[(15 * 4096, 2 * 4096)]),
            "outside RAM block",
        ),
        (discard_payload("pc.ram", &[(!4095, 8192)]), "overflows"),
        (discard_payload("nope", &[(0, 4096)]), "unknown RAM block"),
    ];
    for (payload, want) in cases {
        let w = malformed_after_prefix(|v| command(v, cmd::POSTCOPY_RAM_DISCARD, &payload));
        assert!(w.contains(want), "{payload:?}: {w} (wanted {want})");
    }
}

#[test]
fn malformed_postcopy_commands_are_refused() {
    let w = malformed_after_prefix(|v| command(v, cmd::POSTCOPY_LISTEN, &[0]));
    assert!(w.contains("1-byte payload"), "{w}");
    let w = malformed_after_prefix(|v| command(v, cmd::POSTCOPY_RUN, &[0, 0]));
    assert!(w.contains("2-byte payload"), "{w}");
    let w = malformed_after_prefix(|v| command(v, cmd::POSTCOPY_RESUME, &[0]));
    assert!(w.contains("1-byte payload"), "{w}");
    let w = malformed_after_prefix(|v| command(v, cmd::RECV_BITMAP, b"\x07pc.ram"));
    assert!(w.contains("7-byte payload"), "{w}");
    let w = malformed_after_prefix(|v| command(v, cmd::RECV_BITMAP, b"\x03vga"));
    assert!(w.contains("unknown RAM block"), "{w}");
    let w = malformed_after_prefix(|v| command(v, cmd::POSTCOPY_ADVISE, &[0; 8]));
    assert!(w.contains("8-byte payload"), "{w}");
    // ADVISE after RAM's START: the block list could not have been read right
    let w = malformed_after_prefix(|v| advise(v, 4096));
    assert!(w.contains("after RAM's START"), "{w}");
    let mut v = header();
    let mut p = 4096u64.to_be_bytes().to_vec();
    p.extend_from_slice(&65536u64.to_be_bytes());
    command(&mut v, cmd::POSTCOPY_ADVISE, &p);
    assert!(malformed(&v).contains("target pages of 65536"));
    let mut v = header();
    advise(&mut v, 4096 | 100);
    assert!(malformed(&v).contains("summary"));
    let mut v = header();
    advise(&mut v, 0);
    assert!(malformed(&v).contains("summary"));
}

proptest! {
    #[test]
    fn parser_never_panics_on_junk_inside_a_package(junk in proptest::collection::vec(any::<u8>(), 0..400)) {
        let mut v = prefix();
        packaged(&mut v, &junk);
        let mut p = Parser::new();
        let mut pos = 0;
        while let Ok(Some((it, n))) = p.parse(&v[pos..]) {
            prop_assert!(n > 0);
            if let Item::Packaged(_) = &it {
                let mut out = Vec::new();
                Encoder::new(4096).encode(&it, NameMode::AsInput, &mut out);
                prop_assert_eq!(&out[..], &v[pos..pos + n]);
            }
            pos += n;
        }
    }
}
