//! Every fuzz target on stable Rust, as part of `cargo test`: each file of
//! `fuzz/corpus/<target>/`, then deterministic mutations of them (bit flips, byte sets,
//! inserts, deletes, duplicated chunks, splices between files, length-field and varint
//! tweaks, dictionary tokens) for a fixed time per target. No coverage feedback: this is
//! the CI gate that keeps every target green on known inputs and their neighbours;
//! libFuzzer (`fuzz/`) is the tool for finding new bugs.
//!
//! A panic fails the test: the input is written to `target/fuzz-crashes/<target>-<n>.bin`
//! and the message says how to replay it. Knobs: `TERN_FUZZ_MS` (time per target, default
//! 2500), `TERN_FUZZ_ITERS` (most mutations per target, default 2 million),
//! `TERN_FUZZ_SEED` (PRNG seed; the default is fixed per target, so a run is reproducible
//! up to how far the time allows), `TERN_FUZZ_REPLAY=FILE` (test `replay`).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tern_fuzz::{seeds, Target, TARGETS};

/// Largest mutated input.
const MAX_LEN: usize = 64 << 10;
/// Stops a target's loop even if time is left (a fast machine stays bounded);
/// `TERN_FUZZ_ITERS` overrides it for long runs.
const MAX_ITERATIONS: u64 = 2_000_000;
/// Files kept in a corpus directory when the seeds are rewritten (minimised crashes).
const REGRESSION_PREFIX: &str = "regression-";

fn corpus_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus")
}

fn crash_dir() -> PathBuf {
    // CARGO_TARGET_TMPDIR is <target dir>/tmp
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("the target dir")
        .join("fuzz-crashes")
}

fn target(name: &str) -> Target {
    TARGETS
        .iter()
        .find(|(n, _)| *n == name)
        .unwrap_or_else(|| panic!("no fuzz target {name}"))
        .1
}

/// The corpus files of `name`, in name order.
fn corpus(name: &str) -> Vec<(String, Vec<u8>)> {
    let dir = corpus_root().join(name);
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let e = e.expect("directory entry");
            let bytes = std::fs::read(e.path()).expect("corpus file");
            (e.file_name().to_string_lossy().into_owned(), bytes)
        })
        .collect();
    files.sort();
    files
}

/// xorshift64*: small, fast, and the same sequence everywhere.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform-ish in `0..n` (`n` > 0).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len())]
    }
}

/// Values that length and offset fields like to break on.
const INTERESTING: &[u64] = &[
    0,
    1,
    2,
    7,
    8,
    15,
    16,
    63,
    64,
    127,
    128,
    255,
    256,
    511,
    512,
    1023,
    1024,
    4095,
    4096,
    4097,
    65535,
    65536,
    1 << 20,
    (1 << 24) + 1,
    (32 << 20) + 1,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    1 << 32,
    1 << 40,
    (1 << 52) - 1,
    1 << 52,
    1 << 63,
    u64::MAX / 4096,
    u64::MAX - 4095,
    u64::MAX - 1,
    u64::MAX,
];

/// Tokens worth inserting into text inputs.
fn dictionary(name: &str) -> &'static [&'static [u8]] {
    match name {
        "qmp_line" => &[
            b"\"event\"",
            b"\"timestamp\"",
            b"\"seconds\"",
            b"\"microseconds\"",
            b"\"data\"",
            b"\"id\"",
            b"\"return\"",
            b"\"error\"",
            b"\"class\"",
            b"\"desc\"",
            b"\"QMP\"",
            b"\"version\"",
            b"\"qemu\"",
            b"\"major\"",
            b"\"package\"",
            b"\"ram\"",
            b"\"mbps\"",
            b"\"status\"",
            b"18446744073709551615",
            b"9223372036854775807",
            b"9223372036854775808",
            b"4294967296",
            b"-1",
            b"1e400",
            b"0.5",
            b"null",
            b"true",
            b"[]",
            b"{}",
            b"\"\\ud800\"",
            b"\n",
            b"\r\n",
        ],
        "stream_parser" => &[
            b"QEVM",
            b"ram",
            b"pc.ram",
            b"\x06pc.ram",
            b"\x03ram",
            b"\x03\xef\xbf\xbd",
            b"\x03vga",
            // post-copy: LISTEN, RUN, RESUME, RAM's footer, a RECV_BITMAP's end mark
            b"\x08\x00\x04\x00\x00",
            b"\x08\x00\x05\x00\x00",
            b"\x08\x00\x09\x00\x00",
            b"\x7e\x00\x00\x00\x02",
            b"\x01\x23\x45\x67\x89\xab\xcd\xef",
        ],
        _ => &[],
    }
}

fn put_uint(v: &mut [u8], at: usize, width: usize, big_endian: bool, x: u64) {
    for i in 0..width {
        let byte = (x >> (8 * i)) as u8;
        let j = if big_endian { width - 1 - i } else { i };
        v[at + j] = byte;
    }
}

fn get_uint(v: &[u8], at: usize, width: usize, big_endian: bool) -> u64 {
    (0..width).fold(0u64, |acc, i| {
        let j = if big_endian { i } else { width - 1 - i };
        (acc << 8) | u64::from(v[at + j])
    })
}

fn leb128(mut x: u64) -> Vec<u8> {
    let mut out = Vec::new();
    while x >= 0x80 {
        out.push((x as u8) | 0x80);
        x >>= 7;
    }
    out.push(x as u8);
    out
}

/// One mutant of `base`.
fn mutate(rng: &mut Rng, base: &[u8], files: &[(String, Vec<u8>)], dict: &[&[u8]]) -> Vec<u8> {
    let mut v = base.to_vec();
    let rounds = *rng.pick(&[1, 1, 1, 1, 2, 2, 3, 4, 8]);
    for _ in 0..rounds {
        let len = v.len();
        match rng.below(12) {
            0 if len > 0 => {
                let i = rng.below(len);
                v[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                v[i] = rng.next() as u8;
            }
            2 if len > 0 => {
                let i = rng.below(len);
                v[i] = *rng.pick(&[0u8, 1, 0x7f, 0x80, 0xfe, 0xff]);
            }
            3 => {
                let at = rng.below(len + 1);
                let n = 1 + rng.below(8);
                let fill = rng.next() as u8;
                let bytes: Vec<u8> = (0..n)
                    .map(|_| {
                        if rng.below(2) == 0 {
                            fill
                        } else {
                            rng.next() as u8
                        }
                    })
                    .collect();
                v.splice(at..at, bytes);
            }
            4 if len > 0 => {
                let at = rng.below(len);
                let n = (1 + rng.below(16)).min(len - at);
                v.drain(at..at + n);
            }
            5 if len > 0 => {
                // a copy of one chunk elsewhere (a repeated record)
                let from = rng.below(len);
                let n = (1 + rng.below(64)).min(len - from);
                let chunk = v[from..from + n].to_vec();
                let at = rng.below(len + 1);
                v.splice(at..at, chunk);
            }
            6 => {
                // splice with another file: its middle into ours, or its tail after our head
                let other = &rng.pick(files).1;
                if other.is_empty() {
                    continue;
                }
                let a = rng.below(other.len());
                let b = a + rng.below(other.len() - a) + 1;
                let at = rng.below(len + 1);
                if rng.below(2) == 0 {
                    v.splice(at..at, other[a..b].iter().copied());
                } else {
                    v.truncate(at);
                    v.extend_from_slice(&other[a..]);
                }
            }
            7 => {
                // a length or offset field: nudge it, or set something interesting
                let width = *rng.pick(&[1usize, 2, 4, 4, 8, 8]);
                if len < width {
                    continue;
                }
                let at = rng.below(len - width + 1);
                let be = rng.below(3) != 0;
                let old = get_uint(&v, at, width, be);
                let x = match rng.below(3) {
                    0 => old.wrapping_add(1 + rng.below(16) as u64),
                    1 => old.wrapping_sub(1 + rng.below(16) as u64),
                    _ => match rng.below(4) {
                        0 => (len - at) as u64,
                        _ => *rng.pick(INTERESTING),
                    },
                };
                put_uint(&mut v, at, width, be, x);
            }
            8 => {
                // a LEB128 varint (manifests, deltas)
                let bytes = leb128(*rng.pick(INTERESTING));
                let at = rng.below(len + 1);
                let end = if rng.below(2) == 0 {
                    (at + bytes.len()).min(len)
                } else {
                    at
                };
                v.splice(at..end, bytes);
            }
            9 if !dict.is_empty() => {
                let t = *rng.pick(dict);
                let at = rng.below(len + 1);
                let end = if rng.below(2) == 0 {
                    (at + t.len()).min(len)
                } else {
                    at
                };
                v.splice(at..end, t.iter().copied());
            }
            10 if len > 0 => {
                let at = rng.below(len);
                v.truncate(at);
            }
            _ => {
                let at = rng.below(len + 1);
                let b = rng.next() as u8;
                v.insert(at, b);
            }
        }
        v.truncate(MAX_LEN);
    }
    v
}

fn env_u64(name: &str) -> Option<u64> {
    let s = std::env::var(name).ok()?;
    let s = s.trim();
    match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

/// FNV-1a of the target's name: each target gets its own fixed default seed.
fn default_seed(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Runs one input; on a panic writes it out and fails with how to reproduce it.
fn run_one(name: &str, f: Target, data: &[u8], what: &str, file_tag: &str) {
    if catch_unwind(AssertUnwindSafe(|| f(data))).is_ok() {
        return;
    }
    let dir = crash_dir();
    std::fs::create_dir_all(&dir).expect("crash directory");
    let path = dir.join(format!("{name}-{file_tag}.bin"));
    std::fs::write(&path, data).expect("crash file");
    panic!(
        "fuzz target {name} panicked on {what}; input ({} bytes) written to {}\n\
         replay: TERN_FUZZ_REPLAY={} cargo test -p tern-fuzz --test corpus replay -- --nocapture\n\
         or with libFuzzer: cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run {name} {}",
        data.len(),
        path.display(),
        path.display(),
        path.display()
    );
}

fn fuzz(name: &str) {
    let f = target(name);
    let files = corpus(name);
    assert!(
        !files.is_empty(),
        "fuzz/corpus/{name} is empty (see tern_fuzz::seeds to regenerate it)"
    );
    let started = Instant::now();
    for (file, data) in &files {
        run_one(name, f, data, &format!("corpus file {file}"), file);
    }
    let seed = env_u64("TERN_FUZZ_SEED").unwrap_or_else(|| default_seed(name));
    let budget = Duration::from_millis(env_u64("TERN_FUZZ_MS").unwrap_or(2500));
    let dict = dictionary(name);
    let mut rng = Rng::new(seed);
    let deadline = Instant::now() + budget;
    let mut last: Option<Vec<u8>> = None;
    let max = env_u64("TERN_FUZZ_ITERS").unwrap_or(MAX_ITERATIONS);
    let mut n = 0u64;
    while n < max && (!n.is_multiple_of(32) || Instant::now() < deadline) {
        // mostly a corpus file; sometimes the previous mutant again (deeper changes)
        let base = match &last {
            Some(prev) if rng.below(4) == 0 => prev.clone(),
            _ => rng.pick(&files).1.clone(),
        };
        let input = mutate(&mut rng, &base, &files, dict);
        run_one(
            name,
            f,
            &input,
            &format!("mutation {n} (TERN_FUZZ_SEED={seed:#x})"),
            &n.to_string(),
        );
        last = Some(input);
        n += 1;
    }
    eprintln!(
        "{name}: {} corpus files and {n} mutations in {:.1?} (seed {seed:#x})",
        files.len(),
        started.elapsed()
    );
}

macro_rules! fuzz_tests {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                fuzz(stringify!($name));
            }
        )*

        #[test]
        fn every_target_has_a_test() {
            let tested = [$(stringify!($name)),*];
            for (name, _) in TARGETS {
                assert!(tested.contains(name), "no corpus test for target {name}");
            }
        }
    };
}

fuzz_tests!(
    frames,
    stream_parser,
    delta_apply,
    manifest_decode,
    chunk_index_file,
    nbd_replies,
    qmp_line,
    page_decode,
    chunks_rebuild,
    disk_worker,
);

/// The committed corpus holds every seed the generator makes, as it makes it.
#[test]
fn the_committed_corpus_matches_the_seed_generator() {
    for (name, seeds) in seeds::all() {
        let files = corpus(name);
        for (file, bytes) in seeds {
            let got = files.iter().find(|(f, _)| *f == file);
            assert!(
                got.is_some_and(|(_, b)| *b == bytes),
                "fuzz/corpus/{name}/{file} is missing or stale: run \
                 cargo test -p tern-fuzz --test corpus -- --ignored write_seed_corpus"
            );
        }
    }
}

/// Rewrites `fuzz/corpus/` from `tern_fuzz::seeds` (files named `regression-*` stay).
#[test]
#[ignore = "writes fuzz/corpus; run by hand after changing the seeds"]
fn write_seed_corpus() {
    for (name, seeds) in seeds::all() {
        let dir = corpus_root().join(name);
        std::fs::create_dir_all(&dir).expect("corpus dir");
        for e in std::fs::read_dir(&dir).expect("corpus dir") {
            let e = e.expect("entry");
            let keep = e
                .file_name()
                .to_string_lossy()
                .starts_with(REGRESSION_PREFIX);
            if !keep {
                std::fs::remove_file(e.path()).expect("old seed");
            }
        }
        for (file, bytes) in seeds {
            std::fs::write(dir.join(file), bytes).expect("seed");
        }
    }
}

/// `TERN_FUZZ_REPLAY=FILE`: runs the target named by the file's name (`<target>-...`, as
/// the crash files are named, or a file under `fuzz/corpus/<target>/`) on it, without
/// catching the panic, so the backtrace shows where.
#[test]
fn replay() {
    let Some(path) = std::env::var_os("TERN_FUZZ_REPLAY") else {
        return;
    };
    let path = PathBuf::from(path);
    let file = path.file_name().expect("a file").to_string_lossy();
    let parent = path
        .parent()
        .and_then(|p| p.file_name())
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    let (name, f) = TARGETS
        .iter()
        .find(|(n, _)| file.starts_with(&format!("{n}-")) || parent == *n)
        .unwrap_or_else(|| panic!("which target is {}?", path.display()));
    let data = std::fs::read(&path).expect("replay file");
    eprintln!(
        "replaying {} ({} bytes) on {name}",
        path.display(),
        data.len()
    );
    f(&data);
}
