//! Property tests of the partitioners: every sample goes to exactly one
//! client, and the result depends only on the seed.

use cohort_tasks::*;
use proptest::prelude::*;

fn partitioner() -> impl Strategy<Value = Partitioner> {
    prop_oneof![
        Just(Partitioner::Iid),
        (0.01f64..10.0).prop_map(|alpha| Partitioner::Dirichlet { alpha }),
        (1usize..4).prop_map(|shards_per_client| Partitioner::Shards { shards_per_client }),
        Just(Partitioner::Natural),
        (0.0f64..3.0).prop_map(|sigma| Partitioner::QuantitySkew { sigma }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn every_sample_exactly_once_and_deterministic(
        p in partitioner(),
        labels in proptest::collection::vec(0u32..10, 0..400),
        key_mod in 1u32..8,
        clients in 1usize..30,
        seed in any::<u64>(),
    ) {
        let keys: Vec<u32> = labels.iter().enumerate().map(|(i, _)| (i as u32 * 7) % key_mod).collect();
        let r = partition(&p, &labels, Some(&keys), clients, seed);
        match r {
            Ok(parts) => {
                prop_assert_eq!(parts.len(), clients);
                let mut seen = vec![0u32; labels.len()];
                for part in &parts {
                    prop_assert!(part.windows(2).all(|w| w[0] < w[1]));
                    for &i in part {
                        prop_assert!(i < labels.len());
                        seen[i] += 1;
                    }
                }
                prop_assert!(seen.iter().all(|&c| c == 1));
                let again = partition(&p, &labels, Some(&keys), clients, seed).expect("same call");
                prop_assert_eq!(&parts, &again);
                if let Partitioner::Iid = p {
                    let (min, max) = parts.iter().fold((usize::MAX, 0), |(a, b), v| (a.min(v.len()), b.max(v.len())));
                    prop_assert!(max - min <= 1);
                }
                if let Partitioner::Natural = p {
                    for part in &parts {
                        for &i in part {
                            prop_assert_eq!(keys[i] as usize % clients, (keys[i] as usize) % clients);
                        }
                    }
                }
            }
            Err(TasksError::InvalidPartition(_)) => {
                // Only the documented refusals.
                let distinct = { let mut k = keys.clone(); k.sort_unstable(); k.dedup(); k.len() };
                let ok = match p {
                    Partitioner::Shards { shards_per_client } => clients * shards_per_client > labels.len() || labels.is_empty(),
                    Partitioner::Natural => distinct < clients,
                    _ => false,
                };
                prop_assert!(ok, "unexpected refusal");
            }
            Err(e) => prop_assert!(false, "unexpected error {e}"),
        }
    }
}

#[test]
fn dirichlet_skews_labels_more_with_small_alpha() {
    let s = builtin("mnist5k").expect("mnist");
    let spread = |alpha: f64| {
        let parts = partition(
            &Partitioner::Dirichlet { alpha },
            &s.train.labels,
            None,
            20,
            7,
        )
        .expect("dirichlet");
        // mean over clients of the largest class share
        let mut total = 0.0;
        let mut n = 0;
        for p in parts.iter().filter(|p| !p.is_empty()) {
            let mut c = [0usize; 10];
            for &i in p {
                c[s.train.labels[i] as usize] += 1;
            }
            total += *c.iter().max().expect("max") as f64 / p.len() as f64;
            n += 1;
        }
        total / n as f64
    };
    let (skewed, flat) = (spread(0.1), spread(100.0));
    assert!(
        skewed > 0.5 && flat < 0.2,
        "alpha 0.1: {skewed}, alpha 100: {flat}"
    );
}

#[test]
fn natural_partition_of_penguins_by_island() {
    let s = builtin("penguins/species").expect("penguins");
    let keys = builtin_keys("penguins/species", "island").expect("keys");
    let parts = partition(
        &Partitioner::Natural,
        &s.train.labels,
        Some(&keys.train),
        3,
        0,
    )
    .expect("natural");
    for (c, p) in parts.iter().enumerate() {
        assert!(!p.is_empty());
        assert!(p.iter().all(|&i| keys.train[i] as usize == c));
    }
    // Gentoo (2) live on Biscoe (0) only; Chinstrap (1) on Dream (1) only.
    assert!(parts[2].iter().all(|&i| s.train.labels[i] == 0));
    assert!(parts[1].iter().all(|&i| s.train.labels[i] != 2));
}

#[test]
fn quantity_skew_varies_sizes() {
    let labels = vec![0u32; 10_000];
    let parts = partition(
        &Partitioner::QuantitySkew { sigma: 1.5 },
        &labels,
        None,
        10,
        3,
    )
    .expect("qs");
    let sizes: Vec<usize> = parts.iter().map(Vec::len).collect();
    let (min, max) = (
        sizes.iter().min().expect("min"),
        sizes.iter().max().expect("max"),
    );
    assert!(max > &(4 * min.max(&1)), "{sizes:?}");
    assert!(partition(
        &Partitioner::QuantitySkew { sigma: -1.0 },
        &labels,
        None,
        10,
        3
    )
    .is_err());
    assert!(partition(&Partitioner::Dirichlet { alpha: 0.0 }, &labels, None, 10, 3).is_err());
    assert!(partition(&Partitioner::Iid, &labels, None, 0, 3).is_err());
}
