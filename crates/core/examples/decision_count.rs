//! Runs the `decide/full` bench's decision a given number of times, for counting its
//! instructions exactly: `valgrind --tool=callgrind` on a run of N and one of 2N, the
//! difference of the totals divided by N (see docs/performance.md, "Micro-benchmarks").
//!
//! `cargo run --release -p canary-core --example decision_count -- 1000000`

#[path = "../tests/support.rs"]
mod support;

use canary_core::Weight;
use std::hint::black_box;

fn main() {
    let n: u64 = match std::env::args().nth(1).map(|a| a.parse()) {
        Some(Ok(n)) => n,
        _ => {
            eprintln!("usage: decision_count <iterations>");
            std::process::exit(2);
        }
    };
    let table = support::table();
    let facts = support::facts();
    let weight = Weight::from_percent(10.0).expect("10% is a valid weight");
    let mut canary = 0u64;
    for _ in 0..n {
        let d = black_box(support::decide(&table, &facts, weight));
        canary += u64::from(d.target == canary_core::routing::Target::Canary);
    }
    println!("{n} decisions, {canary} to canary");
}
