//! The same experiment and seed give the same numbers, whatever the thread
//! count.

use cohort_simulator::Simulation;
use cohort_tasks::Partitioner;
use cohort_tests::digits;

fn final_weights(threads: usize, seed: u64) -> Vec<u32> {
    let mut cfg = digits(12, Partitioner::Dirichlet { alpha: 0.5 }, 3);
    cfg.clients.per_round = 6;
    cfg.engine.codec.bits = 8;
    cfg.threads = threads;
    cfg.seed = seed;
    let mut sim = Simulation::new(cfg).expect("builds");
    sim.run(|_| {}).expect("runs");
    sim.engine
        .global()
        .iter()
        .flat_map(|(_, v)| v.iter().map(|x| x.to_bits()))
        .collect()
}

#[test]
fn same_seed_same_weights_with_1_or_2_threads() {
    let one = final_weights(1, 11);
    let two = final_weights(2, 11);
    assert_eq!(one, two, "weights differ between 1 and 2 threads");
    let other = final_weights(2, 12);
    assert_ne!(one, other, "another seed should give other weights");
}
