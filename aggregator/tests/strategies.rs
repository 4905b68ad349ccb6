//! Each strategy against numbers worked out by hand.

use std::collections::BTreeMap;

use cohort_aggregator::strategy::{
    krum, krum_scores, median, trimmed_mean, weighted_mean, AdaptiveParams, KrumParams,
    MomentumParams, ProxParams, TrimParams,
};
use cohort_aggregator::{
    server_strategy, strategy_from_config, AggregateInput, Sampling, Strategy, StrategyConfig,
    StrategyKind,
};
use cohort_protocol::messages::TrainConfig;
use cohort_protocol::ParamGroups;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

fn cfg(kind: StrategyKind) -> StrategyConfig {
    StrategyConfig {
        kind,
        clip_norm: None,
    }
}

fn one_group(v: Vec<f32>) -> ParamGroups {
    let mut p = ParamGroups::new();
    p.insert("backbone", v);
    p
}

/// Applies two server steps with Δ1 = [2, -1], Δ2 = [2, 1] from w = [0, 0].
fn two_steps(s: &mut dyn Strategy) -> (Vec<f32>, Vec<f32>) {
    let mut w = one_group(vec![0.0, 0.0]);
    let step = |s: &mut dyn Strategy, w: &mut ParamGroups, d: Vec<f32>| {
        let mut c = BTreeMap::new();
        c.insert("backbone".to_string(), d);
        s.aggregate(&AggregateInput::new(1, &c), w)
            .expect("aggregate");
    };
    step(s, &mut w, vec![2.0, -1.0]);
    let after1 = w.get("backbone").expect("g").to_vec();
    step(s, &mut w, vec![2.0, 1.0]);
    (after1, w.get("backbone").expect("g").to_vec())
}

fn close(got: &[f32], want: &[f32]) {
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() < 1e-6, "got {got:?}, want {want:?}");
    }
    assert_eq!(got.len(), want.len());
}

/// b1 = 0.5, b2 = 0.75, lr = 1, tau = 0.5: numbers that are easy by hand.
fn adaptive() -> AdaptiveParams {
    AdaptiveParams {
        server_lr: 1.0,
        beta1: 0.5,
        beta2: 0.75,
        tau: 0.5,
    }
}

#[test]
fn fedavg_is_plain_step() {
    let mut s = strategy_from_config(&cfg(StrategyKind::FedAvg));
    let (a, b) = two_steps(s.as_mut());
    assert_eq!(a, vec![2.0, -1.0]);
    assert_eq!(b, vec![4.0, 0.0]);
}

#[test]
fn fedavgm_accumulates_momentum() {
    // m1 = Δ1 = [2,-1], w = [2,-1]; m2 = 0.5 m1 + Δ2 = [3, 0.5], w = [5, -0.5].
    let mut s = strategy_from_config(&cfg(StrategyKind::FedAvgM(MomentumParams {
        server_lr: 1.0,
        momentum: 0.5,
    })));
    let (a, b) = two_steps(s.as_mut());
    assert_eq!(a, vec![2.0, -1.0]);
    assert_eq!(b, vec![5.0, -0.5]);
}

#[test]
fn fedadam_by_hand() {
    // Step 1: m = [1, -0.5], v = 0.25 Δ² = [1, 0.25], w = m / (sqrt v + 0.5) = [1/1.5, -0.5/1].
    // Step 2: m = [1.5, 0.25], v = 0.75 v + 0.25 Δ² = [1.75, 0.4375],
    //   w += [1.5 / (sqrt 1.75 + 0.5), 0.25 / (sqrt 0.4375 + 0.5)] = [0.82287566, 0.21525044].
    let mut s = strategy_from_config(&cfg(StrategyKind::FedAdam(adaptive())));
    let (a, b) = two_steps(s.as_mut());
    close(&a, &[0.666_666_7, -0.5]);
    close(&b, &[0.666_666_7 + 0.822_875_7, -0.5 + 0.215_250_44]);
    let st = s.state();
    close(&st.tensors["m/backbone"], &[1.5, 0.25]);
    close(&st.tensors["v/backbone"], &[1.75, 0.4375]);
}

#[test]
fn fedyogi_by_hand() {
    // Step 1 as Adam (v starts at 0, sign(0 - Δ²) = -1): v = [1, 0.25].
    // Step 2: v - Δ² < 0, so v += 0.25 Δ² = [2, 0.5];
    //   w += [1.5 / (sqrt 2 + 0.5), 0.25 / (sqrt 0.5 + 0.5)] = [0.78361162, 0.20710678].
    let mut s = strategy_from_config(&cfg(StrategyKind::FedYogi(adaptive())));
    let (a, b) = two_steps(s.as_mut());
    close(&a, &[0.666_666_7, -0.5]);
    close(&b, &[0.666_666_7 + 0.783_611_6, -0.5 + 0.207_106_78]);
    close(&s.state().tensors["v/backbone"], &[2.0, 0.5]);
}

#[test]
fn fedadagrad_by_hand() {
    // Step 1: m = [1, -0.5], v = Δ² = [4, 1], w = [1/2.5, -0.5/1.5] = [0.4, -0.33333333].
    // Step 2: m = [1.5, 0.25], v = [8, 2],
    //   w += [1.5 / (sqrt 8 + 0.5), 0.25 / (sqrt 2 + 0.5)] = [0.45066331, 0.13060194].
    let mut s = strategy_from_config(&cfg(StrategyKind::FedAdagrad(adaptive())));
    let (a, b) = two_steps(s.as_mut());
    close(&a, &[0.4, -0.333_333_34]);
    close(&b, &[0.4 + 0.450_663_3, -0.333_333_34 + 0.130_601_94]);
}

#[test]
fn group_without_contributors_is_untouched_and_its_state_not_advanced() {
    let mut s = strategy_from_config(&cfg(StrategyKind::FedAdam(adaptive())));
    let mut w = one_group(vec![0.0, 0.0]);
    w.insert("head/a", vec![7.0, 8.0]);
    let mut c = BTreeMap::new();
    c.insert("backbone".to_string(), vec![2.0, -1.0]);
    s.aggregate(&AggregateInput::new(1, &c), &mut w)
        .expect("aggregate");
    assert_eq!(w.get("head/a"), Some(&[7.0f32, 8.0][..]));
    let st = s.state();
    assert!(st.tensors.contains_key("m/backbone"));
    assert!(
        !st.tensors.keys().any(|k| k.ends_with("head/a")),
        "{:?}",
        st.tensors.keys()
    );
}

#[test]
fn fedprox_sends_mu_in_the_plan() {
    let mut s = strategy_from_config(&cfg(StrategyKind::FedProx(ProxParams { mu: 0.25 })));
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let nodes: Vec<String> = (0..4).map(|i| format!("n{i}")).collect();
    let plans = s.configure(
        1,
        &nodes,
        &Sampling {
            fraction: 0.5,
            min_per_round: 1,
            min_available: 1,
        },
        &TrainConfig::default(),
        &mut rng,
    );
    assert_eq!(plans.len(), 2);
    assert!(plans.iter().all(|(_, t)| t.prox_mu == 0.25));
    // FedAvg leaves it at the base value.
    let mut f = strategy_from_config(&cfg(StrategyKind::FedAvg));
    let plans = f.configure(
        1,
        &nodes,
        &Sampling::default(),
        &TrainConfig::default(),
        &mut rng,
    );
    assert_eq!(plans.len(), 4);
    assert!(plans.iter().all(|(_, t)| t.prox_mu == 0.0));
}

#[test]
fn weighted_mean_by_hand() {
    // ([2,-4]*1 + [6,8]*3) / 4 = [5, 5]
    let m = weighted_mean(&[vec![2.0, -4.0], vec![6.0, 8.0]], &[1.0, 3.0]).expect("mean");
    assert_eq!(m, vec![5.0, 5.0]);
    assert!(weighted_mean(&[vec![1.0]], &[0.0]).is_err());
}

#[test]
fn median_odd_and_even() {
    let mut d = vec![
        vec![1.0, 10.0, -3.0],
        vec![2.0, 0.0, 5.0],
        vec![100.0, -1.0, 4.0],
    ];
    // columns [1,2,100] [10,0,-1] [-3,5,4]
    assert_eq!(median(&d).expect("median"), vec![2.0, 0.0, 4.0]);
    d.push(vec![3.0, 7.0, 0.0]);
    // sorted columns [1,2,3,100] [-1,0,7,10] [-3,0,4,5]
    assert_eq!(median(&d).expect("median"), vec![2.5, 3.5, 2.0]);
}

#[test]
fn trimmed_mean_by_hand() {
    let d = vec![
        vec![1.0, -50.0],
        vec![100.0, 0.0],
        vec![2.0, 3.0],
        vec![4.0, 1.0],
        vec![3.0, 2.0],
    ];
    // beta 0.2 of 5 = 1 cut at each end: [2,3,4] -> 3, [0,1,2] -> 1
    assert_eq!(trimmed_mean(&d, 0.2).expect("tm"), vec![3.0, 1.0]);
    // beta 0.1 of 5 = 0 cut: plain means 110/5 = 22, -44/5 = -8.8
    close(&trimmed_mean(&d, 0.1).expect("tm"), &[22.0, -8.8]);
    // beta 0.5 would cut everything: keeps the middle one (the median).
    assert_eq!(trimmed_mean(&d, 0.5).expect("tm"), vec![3.0, 1.0]);
}

#[test]
fn krum_and_multi_krum_by_hand() {
    let d: Vec<Vec<f32>> = [0.0, 1.0, 2.0, 3.0, 100.0]
        .iter()
        .map(|&x| vec![x])
        .collect();
    // f = 1, n = 5: 2 nearest neighbours. Scores: 0 -> 1+4, 1 -> 1+1, 2 -> 1+1, 3 -> 1+4,
    // 100 -> 97² + 98².
    let s = krum_scores(&d, 1).expect("scores");
    assert_eq!(s, vec![5.0, 2.0, 2.0, 5.0, 9409.0 + 9604.0]);
    let w = [1.0, 1.0, 2.0, 1.0, 1.0];
    // Krum: the best score, ties to the earlier: [1].
    assert_eq!(krum(&d, &w, 1, 1).expect("krum"), vec![1.0]);
    // Multi-Krum m = 3: deltas 1, 2 and 0 (tie with 3 goes to the earlier),
    // weighted: (0*1 + 1*1 + 2*2) / 4 = 1.25.
    assert_eq!(krum(&d, &w, 1, 3).expect("krum"), vec![1.25]);
    let s = strategy_from_config(&cfg(StrategyKind::Krum(KrumParams { f: 1, m: 3 })));
    assert_eq!(s.combine("backbone", &d, &w).expect("combine"), vec![1.25]);
}

#[test]
fn robust_strategies_retain_and_mean_ones_stream() {
    use cohort_aggregator::Collect;
    for (kind, collect) in [
        (StrategyKind::FedAvg, Collect::Stream),
        (
            StrategyKind::FedAdam(AdaptiveParams::default()),
            Collect::Stream,
        ),
        (StrategyKind::Median, Collect::Retain),
        (
            StrategyKind::TrimmedMean(TrimParams { beta: 0.1 }),
            Collect::Retain,
        ),
        (StrategyKind::Krum(KrumParams::default()), Collect::Retain),
    ] {
        assert_eq!(
            server_strategy(&cfg(kind.clone())).collect(),
            collect,
            "{kind:?}"
        );
    }
}

#[test]
fn strategy_config_is_tagged_by_name() {
    let c: StrategyConfig =
        serde_json::from_str(r#"{"name":"fedadam","server_lr":0.5,"clip_norm":2.0}"#)
            .expect("parse");
    assert_eq!(
        c.kind,
        StrategyKind::FedAdam(AdaptiveParams {
            server_lr: 0.5,
            ..AdaptiveParams::default()
        })
    );
    assert_eq!(c.clip_norm, Some(2.0));
    let c: StrategyConfig = serde_json::from_str(r#"{"name":"median"}"#).expect("parse");
    assert_eq!(c.kind, StrategyKind::Median);
    let c: StrategyConfig = serde_json::from_str(r#"{"name":"krum","f":2,"m":4}"#).expect("parse");
    assert_eq!(c.kind, StrategyKind::Krum(KrumParams { f: 2, m: 4 }));
    let back: StrategyConfig =
        serde_json::from_str(&serde_json::to_string(&c).expect("ser")).expect("parse");
    assert_eq!(back, c);
    assert!(serde_json::from_str::<StrategyConfig>(r#"{"name":"nope"}"#).is_err());
}

/// The sorting-network path (up to 32 deltas) and the sorting path (more)
/// must agree with a plain per-coordinate sort, ties and signed zeros
/// included.
#[test]
fn robust_combiners_match_a_plain_sort() {
    use rand::Rng;
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    for k in (1usize..=34).chain([40]) {
        let n = 300; // more than one block, a partial last lane group
        let d: Vec<Vec<f32>> = (0..k)
            .map(|_| {
                (0..n)
                    .map(|_| match rng.gen_range(0..6) {
                        0 => 0.0,
                        1 => -0.0,
                        2 => 1.5,
                        _ => rng.gen_range(-10.0f32..10.0),
                    })
                    .collect()
            })
            .collect();
        let cut = ((0.2 * k as f64).floor() as usize).min((k - 1) / 2);
        let mut want_med = Vec::new();
        let mut want_tm = Vec::new();
        for i in 0..n {
            let mut col: Vec<f32> = d.iter().map(|v| v[i]).collect();
            col.sort_by(f32::total_cmp);
            want_med.push(if k % 2 == 1 {
                col[k / 2]
            } else {
                ((f64::from(col[k / 2 - 1]) + f64::from(col[k / 2])) / 2.0) as f32
            });
            let s: f64 = col[cut..k - cut].iter().map(|&x| f64::from(x)).sum();
            want_tm.push((s / (k - 2 * cut) as f64) as f32);
        }
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(&median(&d).expect("median")),
            bits(&want_med),
            "median, k = {k}"
        );
        assert_eq!(
            bits(&trimmed_mean(&d, 0.2).expect("tm")),
            bits(&want_tm),
            "trimmed, k = {k}"
        );
    }
}

#[test]
fn robust_combiners_do_not_depend_on_the_thread_count() {
    use rand::Rng;
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let n = 70_000; // several parallel chunks
    for k in [5usize, 40] {
        let d: Vec<Vec<f32>> = (0..k)
            .map(|_| (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect())
            .collect();
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .expect("pool");
        let four = rayon::ThreadPoolBuilder::new()
            .num_threads(4)
            .build()
            .expect("pool");
        let (m1, t1) = one.install(|| (median(&d).expect("m"), trimmed_mean(&d, 0.1).expect("t")));
        let (m4, t4) = four.install(|| (median(&d).expect("m"), trimmed_mean(&d, 0.1).expect("t")));
        assert_eq!(m1, m4);
        assert_eq!(t1, t4);
    }
}
