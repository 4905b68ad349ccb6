//! Splitting a data set among clients.
//!
//! Every partitioner is deterministic by seed and assigns every sample to
//! exactly one client; each client's indices come back sorted ascending.
//! Clients may end up empty (e.g. Dirichlet with a small alpha, or quantity
//! skew with a large sigma): callers that cannot use an empty client should
//! skip it.

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Gamma, LogNormal};
use serde::{Deserialize, Serialize};

use crate::TasksError;

/// How samples are spread among clients.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Partitioner {
    /// Uniformly shuffled, near-equal sizes.
    #[default]
    Iid,
    /// Label skew: for each class, the shares of the clients are drawn from
    /// Dirichlet(alpha, ..., alpha). Small alpha = strong skew.
    Dirichlet { alpha: f64 },
    /// McMahan et al.'s pathological split: sort by label, cut into
    /// `clients * shards_per_client` equal shards, deal `shards_per_client`
    /// random shards to each client.
    Shards { shards_per_client: usize },
    /// By a key per sample (e.g. penguins' island): the distinct keys,
    /// sorted, are dealt to the clients round-robin (key `j` → client
    /// `j % clients`). Needs at least as many distinct keys as clients.
    Natural,
    /// Quantity skew: IID labels, client sizes proportional to
    /// LogNormal(0, sigma) weights.
    QuantitySkew { sigma: f64 },
}

/// Most clients one call may create.
pub const MAX_CLIENTS: usize = 10_000_000;

/// Splits samples `0..labels.len()` among `clients` clients.
pub fn partition(
    p: &Partitioner,
    labels: &[u32],
    keys: Option<&[u32]>,
    clients: usize,
    seed: u64,
) -> Result<Vec<Vec<usize>>, TasksError> {
    let bad = |m: String| Err(TasksError::InvalidPartition(m));
    if clients == 0 || clients > MAX_CLIENTS {
        return bad(format!("{clients} clients (allowed 1..={MAX_CLIENTS})"));
    }
    let n = labels.len();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out: Vec<Vec<usize>> = vec![Vec::new(); clients];
    match p {
        Partitioner::Iid => {
            let mut idx: Vec<usize> = (0..n).collect();
            idx.shuffle(&mut rng);
            for (c, chunk) in split_sizes(n, &vec![1.0; clients])
                .into_iter()
                .scan(0, |at, len| {
                    let r = *at..*at + len;
                    *at += len;
                    Some(r)
                })
                .enumerate()
            {
                out[c].extend_from_slice(&idx[chunk]);
            }
        }
        Partitioner::Dirichlet { alpha } => {
            if !(alpha.is_finite() && *alpha > 0.0) {
                return bad(format!("dirichlet alpha {alpha} must be finite and > 0"));
            }
            let gamma = match Gamma::new(*alpha, 1.0) {
                Ok(g) => g,
                Err(e) => return bad(format!("dirichlet alpha {alpha}: {e}")),
            };
            let classes = labels.iter().copied().max().map_or(0, |m| m as usize + 1);
            let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); classes];
            for (i, &y) in labels.iter().enumerate() {
                by_class[y as usize].push(i);
            }
            let mut shares = vec![0.0f64; clients];
            for mut members in by_class {
                members.shuffle(&mut rng);
                for s in shares.iter_mut() {
                    *s = gamma.sample(&mut rng);
                }
                let total: f64 = shares.iter().sum();
                if !(total.is_finite() && total > 0.0) {
                    // Every draw underflowed (tiny alpha): the limit of the
                    // distribution is one client taking the whole class.
                    shares.fill(0.0);
                    shares[rng.gen_range(0..clients)] = 1.0;
                }
                let mut at = 0;
                for (c, len) in split_sizes(members.len(), &shares).into_iter().enumerate() {
                    out[c].extend_from_slice(&members[at..at + len]);
                    at += len;
                }
            }
        }
        Partitioner::Shards { shards_per_client } => {
            let k = *shards_per_client;
            let total = clients.checked_mul(k).filter(|&t| t > 0 && t <= n.max(1));
            let Some(total) = total else {
                return bad(format!(
                    "{clients} clients x {k} shards needs 1 to {n} shards"
                ));
            };
            let mut sorted: Vec<usize> = (0..n).collect();
            sorted.sort_by_key(|&i| (labels[i], i));
            let mut shard_ids: Vec<usize> = (0..total).collect();
            shard_ids.shuffle(&mut rng);
            let sizes = split_sizes(n, &vec![1.0; total]);
            let starts: Vec<usize> = sizes
                .iter()
                .scan(0, |at, &l| {
                    let s = *at;
                    *at += l;
                    Some(s)
                })
                .collect();
            for (pos, &s) in shard_ids.iter().enumerate() {
                out[pos / k].extend_from_slice(&sorted[starts[s]..starts[s] + sizes[s]]);
            }
        }
        Partitioner::Natural => {
            let Some(keys) = keys else {
                return bad(
                    "the natural partitioner needs a key per sample (text data sets key each window by its document)".into(),
                );
            };
            if keys.len() != n {
                return bad(format!("{} keys for {n} samples", keys.len()));
            }
            let mut distinct: Vec<u32> = keys.to_vec();
            distinct.sort_unstable();
            distinct.dedup();
            if distinct.len() < clients {
                return bad(format!(
                    "{clients} clients but only {} distinct keys",
                    distinct.len()
                ));
            }
            for (i, k) in keys.iter().enumerate() {
                // `distinct` holds every key, so the search always succeeds.
                let j = distinct.binary_search(k).unwrap_or(0);
                out[j % clients].push(i);
            }
        }
        Partitioner::QuantitySkew { sigma } => {
            if !(sigma.is_finite() && *sigma >= 0.0) {
                return bad(format!(
                    "quantity skew sigma {sigma} must be finite and >= 0"
                ));
            }
            let ln = match LogNormal::new(0.0, *sigma) {
                Ok(d) => d,
                Err(e) => return bad(format!("sigma {sigma}: {e}")),
            };
            let weights: Vec<f64> = (0..clients).map(|_| ln.sample(&mut rng)).collect();
            let mut idx: Vec<usize> = (0..n).collect();
            idx.shuffle(&mut rng);
            let mut at = 0;
            for (c, len) in split_sizes(n, &weights).into_iter().enumerate() {
                out[c].extend_from_slice(&idx[at..at + len]);
                at += len;
            }
        }
    }
    for v in &mut out {
        v.sort_unstable();
    }
    Ok(out)
}

/// Integer sizes summing to `n`, proportional to `weights` (largest
/// remainder; ties to the lower index). Non-finite or negative weights
/// count as 0; all-zero weights split evenly.
fn split_sizes(n: usize, weights: &[f64]) -> Vec<usize> {
    let clean: Vec<f64> = weights
        .iter()
        .map(|w| if w.is_finite() && *w > 0.0 { *w } else { 0.0 })
        .collect();
    let total: f64 = clean.iter().sum();
    let clean = if total > 0.0 && total.is_finite() {
        clean
    } else {
        vec![1.0; weights.len()]
    };
    let total: f64 = clean.iter().sum();
    let exact: Vec<f64> = clean.iter().map(|w| w / total * n as f64).collect();
    let mut sizes: Vec<usize> = exact.iter().map(|e| (e.floor() as usize).min(n)).collect();
    let assigned: usize = sizes.iter().sum();
    let mut rest = n.saturating_sub(assigned);
    let mut order: Vec<usize> = (0..weights.len()).collect();
    order.sort_by(|&a, &b| {
        let ra = exact[a] - exact[a].floor();
        let rb = exact[b] - exact[b].floor();
        rb.total_cmp(&ra).then(a.cmp(&b))
    });
    for &i in order.iter().cycle().take(weights.len() * 2) {
        if rest == 0 {
            break;
        }
        sizes[i] += 1;
        rest -= 1;
    }
    // Floating rounding can only leave a few over; give them to the first.
    if rest > 0 {
        sizes[0] += rest;
    }
    let sum: usize = sizes.iter().sum();
    if sum > n {
        let mut over = sum - n;
        for s in sizes.iter_mut().rev() {
            let d = over.min(*s);
            *s -= d;
            over -= d;
        }
    }
    sizes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_sizes_worked_by_hand() {
        assert_eq!(split_sizes(10, &[1.0, 1.0, 1.0]), vec![4, 3, 3]);
        assert_eq!(split_sizes(10, &[3.0, 1.0]), vec![8, 2]);
        assert_eq!(split_sizes(5, &[0.0, 0.0]), vec![3, 2]);
        assert_eq!(split_sizes(0, &[1.0, 2.0]), vec![0, 0]);
    }

    #[test]
    fn shards_give_each_client_few_labels() {
        // 10 classes x 20 samples, 10 clients x 2 shards of 10: each client
        // sees at most 2 labels.
        let labels: Vec<u32> = (0..200).map(|i| (i % 10) as u32).collect();
        let parts = partition(
            &Partitioner::Shards {
                shards_per_client: 2,
            },
            &labels,
            None,
            10,
            1,
        )
        .expect("shards");
        for p in &parts {
            assert_eq!(p.len(), 20);
            let mut ls: Vec<u32> = p.iter().map(|&i| labels[i]).collect();
            ls.dedup();
            ls.sort_unstable();
            ls.dedup();
            assert!(ls.len() <= 2, "{ls:?}");
        }
    }

    #[test]
    fn natural_groups_by_key() {
        let labels = [0u32; 6];
        let keys = [5u32, 7, 5, 9, 7, 9];
        let parts = partition(&Partitioner::Natural, &labels, Some(&keys), 3, 0).expect("natural");
        assert_eq!(parts, vec![vec![0, 2], vec![1, 4], vec![3, 5]]);
        assert!(partition(&Partitioner::Natural, &labels, Some(&keys), 4, 0).is_err());
        assert!(partition(&Partitioner::Natural, &labels, None, 2, 0).is_err());
    }
}
