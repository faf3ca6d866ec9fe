//! The state index's memory budget: at most 600 bytes of heap per workload.
//!
//! This measures heap bytes held by the data structure (a budget check, not a timing), counting
//! every allocation made while 10,000 realistic workloads are inserted. It runs in its own test
//! binary so no other test's allocations are counted.

mod support;

use std::alloc::System;

use ambit_state::StateIndex;
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};
use support::{service, workload};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const WORKLOADS: usize = 10_000;
const BUDGET_BYTES_PER_WORKLOAD: usize = 600;

#[test]
fn ten_thousand_workloads_fit_the_budget() {
    // Build the resources first: only the index's own allocations are measured.
    let services: Vec<_> = (0..WORKLOADS / 10)
        .map(|s| {
            service(
                &format!("ns-{}", s % 50),
                &format!("svc-{s}"),
                &format!("10.96.{}.{}", s / 250, s % 250),
                &[(80, 8080)],
            )
        })
        .collect();
    let workloads: Vec<_> = (0..WORKLOADS)
        .map(|i| {
            let s = i / 10;
            let key = format!("ns-{}/svc-{s}.ns-{}.svc.cluster.local", s % 50, s % 50);
            workload(
                &format!("ns-{}", s % 50),
                &format!("svc{s}-7d9f8c6b5-{i:05x}"),
                &format!("10.{}.{}.{}", 100 + i / 65536, (i / 256) % 256, i % 256),
                &format!("node-{}", i % 100),
                &[(key.as_str(), &[(80, 8080)])],
            )
        })
        .collect();

    let mut state = StateIndex::new("node-1");
    let region = Region::new(GLOBAL);
    for s in &services {
        state.insert_service(s).unwrap();
    }
    let services_bytes =
        region.change().bytes_allocated as isize - region.change().bytes_deallocated as isize;
    for w in &workloads {
        state.insert_workload(w).unwrap();
    }
    let change = region.change();
    let held = change.bytes_allocated as isize - change.bytes_deallocated as isize - services_bytes;
    let per_workload = held as usize / WORKLOADS;
    println!(
        "state index: {per_workload} bytes per workload ({held} bytes for {WORKLOADS} workloads; services {services_bytes} bytes)"
    );
    assert_eq!(state.len(), (WORKLOADS, WORKLOADS / 10));
    assert!(
        per_workload <= BUDGET_BYTES_PER_WORKLOAD,
        "{per_workload} bytes per workload exceeds the {BUDGET_BYTES_PER_WORKLOAD}-byte budget"
    );
}
