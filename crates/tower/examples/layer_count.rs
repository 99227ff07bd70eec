//! Runs one case of the `layer` bench a given number of times, for counting its
//! instructions exactly: `valgrind --tool=callgrind` on a run of N and one of 2N, the
//! difference of the totals divided by N (docs/performance.md, "The tower layer").
//! Instruction counts do not move with the load of a shared machine; wall clock does.
//!
//! `cargo run --release -p canary-tower --example layer_count -- split_stable 100000`
//! (cases: `direct`, `split_stable`, `split_canary`; `direct_nokey`, `new_client` for a
//! request without a sticky key)

#[path = "../tests/support/mod.rs"]
mod support;

use support::{once, version, version_of};

fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(case), Some(Ok(n))) = (args.next(), args.next().map(|a| a.parse::<u64>())) else {
        eprintln!(
            "usage: layer_count direct|split_stable|split_canary|direct_nokey|new_client <iterations>"
        );
        std::process::exit(2);
    };
    let (_rt, _dir, canary) = support::started();
    let mut split = canary.split("web", version("v1"), version("v2"));
    let user_of = |split: &mut _, want: &str| {
        ["alice", "bob", "carol", "dave"]
            .into_iter()
            .find(|u| version_of(split, u) == want)
            .expect("a user of each version at 50%")
    };
    let stable = user_of(&mut split, "v1");
    let on_canary = user_of(&mut split, "v2");
    let mut direct = version("v1");
    for _ in 0..n {
        match case.as_str() {
            "direct" => once(&mut direct, Some(stable)),
            "direct_nokey" => once(&mut direct, None),
            "split_stable" => once(&mut split, Some(stable)),
            "split_canary" => once(&mut split, Some(on_canary)),
            "new_client" => once(&mut split, None),
            other => {
                eprintln!("unknown case {other:?}");
                std::process::exit(2);
            }
        }
    }
    println!("{n} requests, case {case}");
}
