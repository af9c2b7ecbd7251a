//! Image build cost: bot-bottle's squashfs writer (a workspace snapshot of a host tree, which
//! compresses on every core) against `mksquashfs` from squashfs-tools on the same tree in the
//! same run, printed as ratios of time and size. Baselines: mksquashfs with our settings (zstd
//! level 6, small files in fragments) on one thread and on every core, the same without
//! fragments (what our writer did before it packed small files), and mksquashfs with its
//! defaults (zstd level 15, every core). `cargo bench -p bot-bottle --bench squashfs_image`;
//! the tree is `$BENCH_TREE`, default `/usr/lib/python3.11` (the files a language runtime
//! brings, ~50 MB).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// Runs per measurement; the best is reported (least disturbed by other load).
const RUNS: usize = 3;

fn best(mut f: impl FnMut() -> u64) -> (Duration, u64) {
    let mut best = Duration::MAX;
    let mut size = 0;
    for _ in 0..RUNS {
        let t = Instant::now();
        size = f();
        best = best.min(t.elapsed());
    }
    (best, size)
}

fn mksquashfs(tree: &Path, out: &Path, args: &[&str]) -> u64 {
    let status = Command::new("mksquashfs")
        .arg(tree)
        .arg(out)
        .args(["-noappend", "-quiet", "-no-progress", "-comp", "zstd"])
        .args(args)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("mksquashfs (apt-get install squashfs-tools)");
    assert!(status.success());
    std::fs::metadata(out).unwrap().len()
}

fn main() {
    let tree = std::env::var("BENCH_TREE").unwrap_or_else(|_| "/usr/lib/python3.11".to_owned());
    let tree = Path::new(&tree);
    let work = tempfile::tempdir().unwrap();
    let ours_out = work.path().join("ours.sqfs");
    let base_out = work.path().join("base.sqfs");

    let (ours, ours_size) = best(|| {
        bot_bottle::image::workspace::snapshot(tree, &ours_out, &mut |_, _| {}).unwrap();
        std::fs::metadata(&ours_out).unwrap().len()
    });
    let (same, same_size) = best(|| {
        mksquashfs(
            tree,
            &base_out,
            &["-Xcompression-level", "6", "-processors", "1"],
        )
    });
    let (same_all, same_all_size) =
        best(|| mksquashfs(tree, &base_out, &["-Xcompression-level", "6"]));
    let (nofrag, nofrag_size) = best(|| {
        mksquashfs(
            tree,
            &base_out,
            &["-Xcompression-level", "6", "-no-fragments"],
        )
    });
    let (dflt, dflt_size) = best(|| mksquashfs(tree, &base_out, &[]));

    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("tree: {} ({cores} cores)", tree.display());
    println!(
        "bot-bottle writer:                  {:>8.1} ms  {:>7.2} MiB",
        ours.as_secs_f64() * 1e3,
        mib(ours_size)
    );
    for (name, t, size) in [
        ("mksquashfs, same, 1 thread", same, same_size),
        ("mksquashfs, same, all cores", same_all, same_all_size),
        ("mksquashfs, no fragments", nofrag, nofrag_size),
        ("mksquashfs, defaults", dflt, dflt_size),
    ] {
        println!(
            "{name:<28}        {:>8.1} ms  {:>7.2} MiB   ours/this: time {:.2}x, size {:.2}x",
            t.as_secs_f64() * 1e3,
            mib(size),
            ours.as_secs_f64() / t.as_secs_f64(),
            ours_size as f64 / size as f64
        );
    }
}
