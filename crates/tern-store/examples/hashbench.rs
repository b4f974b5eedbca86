//! Measures the candidate page hashes per 4 KiB page (docs/adr/0004-content-hashing.md):
//! `cargo run --release -p tern-store --example hashbench`.
use std::time::Instant;

fn main() {
    let pages = 32 * 1024; // 128 MiB
    let mut data = vec![0u8; pages * 4096];
    let mut s = 0x9E3779B97F4A7C15u64;
    for w in data.chunks_mut(8) {
        s ^= s >> 12;
        s ^= s << 25;
        s ^= s >> 27;
        w.copy_from_slice(&s.wrapping_mul(0x2545F4914F6CDD1D).to_le_bytes());
    }
    let key = [7u8; 32];
    let secret = [3u8; 192];
    let mut sink = 0u64;
    let mut run = |name: &str, f: &mut dyn FnMut(&[u8]) -> u64| {
        let mut best = f64::MAX;
        for _ in 0..5 {
            let t = Instant::now();
            for p in data.chunks(4096) {
                sink ^= f(p);
            }
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!(
            "{name:<28} {:>7.0} ns/page  {:>6.2} GB/s",
            best * 1e9 / pages as f64,
            (pages * 4096) as f64 / best / 1e9
        );
    };
    run("xxh3-128 (secret)", &mut |p| {
        xxhash_rust::xxh3::xxh3_128_with_secret(p, &secret) as u64
    });
    run("blake3 keyed (128 bits kept)", &mut |p| {
        u64::from_le_bytes(
            blake3::keyed_hash(&key, p).as_bytes()[..8]
                .try_into()
                .unwrap(),
        )
    });
    println!("(sink {sink:x})");
}
