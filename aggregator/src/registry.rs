//! The engine's registry of hellos, compact enough for a million nodes.
//!
//! What a hello records is mostly shared: nodes with the same set of tasks
//! hold the same groups, upload the same groups and send the same
//! sub-layout fingerprint. So the registry keeps one [`Profile`] per
//! distinct task set (task names, upload groups, fingerprint) and, per node,
//! only its id and a `(profile, row)` pair; the node's sample counts are row
//! `row` of its profile's flat column (one `u64` per task). A node costs its
//! id, one map entry and 8 bytes per task, instead of a `NodeInfo`, a map of
//! samples and a list of group names of its own.

use std::collections::BTreeMap;

use cohort_protocol::messages::NodeId;
use cohort_protocol::Fingerprint;

use crate::engine::NodeInfo;

/// What nodes with the same task set share, and their sample counts.
#[derive(Clone, Debug, Default)]
struct Profile {
    /// Task names, sorted.
    tasks: Vec<String>,
    /// Global groups these nodes hold: what they may upload.
    upload: Vec<String>,
    fingerprint: Option<Fingerprint>,
    /// Row-major, `tasks.len()` counts per row, in the order of `tasks`.
    samples: Vec<u64>,
    /// Rows of removed nodes, reused first (memory stays bounded by the
    /// most nodes this profile ever held at once).
    free_rows: Vec<u32>,
    /// Rows handed out so far (with the free ones).
    rows: u32,
    members: u32,
}

impl Profile {
    fn width(&self) -> usize {
        self.tasks.len()
    }

    fn row(&self, row: u32) -> &[u64] {
        let w = self.width();
        let at = row as usize * w;
        self.samples.get(at..at + w).unwrap_or(&[])
    }

    fn alloc_row(&mut self, counts: &[u64]) -> u32 {
        let w = self.width();
        self.members += 1;
        if let Some(row) = self.free_rows.pop() {
            let at = row as usize * w;
            self.samples[at..at + w].copy_from_slice(counts);
            return row;
        }
        let row = self.rows;
        self.rows += 1;
        self.samples.extend_from_slice(counts);
        row
    }

    fn free_row(&mut self, row: u32) {
        self.members = self.members.saturating_sub(1);
        self.free_rows.push(row);
    }
}

/// Where a node's record lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Slot {
    profile: u32,
    row: u32,
}

/// One registered node, read from the registry.
#[derive(Clone, Copy, Debug)]
pub(crate) struct NodeView<'a> {
    /// Global groups the node holds: what it may upload.
    pub(crate) upload: &'a [String],
    /// Its training samples per task.
    pub(crate) samples: Samples<'a>,
    fingerprint: Option<&'a Fingerprint>,
}

impl<'a> NodeView<'a> {
    /// The tasks, sorted, with their sample counts.
    pub(crate) fn tasks(&self) -> impl Iterator<Item = (&'a str, u64)> + 'a {
        let s = self.samples;
        s.tasks
            .iter()
            .map(String::as_str)
            .zip(s.counts.iter().copied())
    }

    /// The hello as the engine recorded it (tasks sorted by name).
    pub(crate) fn info(&self, id: &str) -> Option<NodeInfo> {
        Some(NodeInfo {
            id: id.to_string(),
            tasks: self.tasks().map(|(t, n)| (t.to_string(), n)).collect(),
            fingerprint: *self.fingerprint?,
        })
    }
}

/// A node's sample counts per task, as a small read-only map.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Samples<'a> {
    tasks: &'a [String],
    counts: &'a [u64],
}

impl<'a> Samples<'a> {
    pub(crate) fn get(&self, task: &str) -> Option<&'a u64> {
        let i = self.tasks.binary_search_by(|t| t.as_str().cmp(task)).ok()?;
        self.counts.get(i)
    }

    /// The counts, in task-name order.
    pub(crate) fn values(&self) -> std::slice::Iter<'a, u64> {
        self.counts.iter()
    }
}

/// The registered nodes. Iteration is in id order, which sampling relies on.
#[derive(Clone, Debug, Default)]
pub(crate) struct Registry {
    index: BTreeMap<Box<str>, Slot>,
    profiles: Vec<Profile>,
    /// Task set -> profile, for profiles with members.
    by_tasks: BTreeMap<Vec<String>, u32>,
    /// Profiles whose last member left, reused first.
    free_profiles: Vec<u32>,
}

impl Registry {
    pub(crate) fn len(&self) -> usize {
        self.index.len()
    }

    pub(crate) fn contains_key(&self, id: &str) -> bool {
        self.index.contains_key(id)
    }

    pub(crate) fn get(&self, id: &str) -> Option<NodeView<'_>> {
        let slot = self.index.get(id)?;
        let p = self.profiles.get(slot.profile as usize)?;
        Some(NodeView {
            upload: &p.upload,
            samples: Samples {
                tasks: &p.tasks,
                counts: p.row(slot.row),
            },
            fingerprint: p.fingerprint.as_ref(),
        })
    }

    /// Ids of the registered nodes, in order.
    pub(crate) fn ids(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(|k| &**k)
    }

    /// The ids as owned strings, in order (what a [`crate::Strategy`]
    /// samples from).
    pub(crate) fn id_list(&self) -> Vec<NodeId> {
        self.ids().map(str::to_string).collect()
    }

    /// The fingerprint nodes with these (sorted) tasks registered with, if
    /// any is registered: it is a function of the task set, so a hello can
    /// be checked against it without hashing the sub-layout again.
    pub(crate) fn known_fingerprint(&self, tasks: &[String]) -> Option<Fingerprint> {
        let p = *self.by_tasks.get(tasks)?;
        self.profiles.get(p as usize)?.fingerprint
    }

    /// Registered nodes that may upload `group`.
    pub(crate) fn holders(&self, group: &str) -> usize {
        self.by_tasks
            .values()
            .filter_map(|&p| self.profiles.get(p as usize))
            .filter(|p| p.upload.iter().any(|u| u == group))
            .map(|p| p.members as usize)
            .sum()
    }

    /// Records a hello (replacing an earlier one of `id`). `samples` are
    /// sorted by task and hold each task once (a `BTreeMap`'s order).
    pub(crate) fn insert(
        &mut self,
        id: &str,
        samples: &BTreeMap<String, u64>,
        upload: Vec<String>,
        fingerprint: Fingerprint,
    ) {
        self.remove(id);
        let tasks: Vec<String> = samples.keys().cloned().collect();
        let counts: Vec<u64> = samples.values().copied().collect();
        let p = match self.by_tasks.get(&tasks) {
            Some(&p) => p,
            None => {
                let profile = Profile {
                    tasks: tasks.clone(),
                    upload,
                    fingerprint: Some(fingerprint),
                    ..Profile::default()
                };
                let p = match self.free_profiles.pop() {
                    Some(p) => {
                        self.profiles[p as usize] = profile;
                        p
                    }
                    None => {
                        self.profiles.push(profile);
                        // Bounded by the registered nodes, far below u32.
                        (self.profiles.len() - 1) as u32
                    }
                };
                self.by_tasks.insert(tasks, p);
                p
            }
        };
        let row = self.profiles[p as usize].alloc_row(&counts);
        self.index.insert(id.into(), Slot { profile: p, row });
    }

    /// Forgets `id`; whether it was registered.
    pub(crate) fn remove(&mut self, id: &str) -> bool {
        let Some(slot) = self.index.remove(id) else {
            return false;
        };
        let Some(p) = self.profiles.get_mut(slot.profile as usize) else {
            return true;
        };
        p.free_row(slot.row);
        if p.members == 0 {
            // The last member left: free the profile, so that churn over
            // many task sets cannot grow the registry.
            let tasks = std::mem::take(&mut p.tasks);
            *p = Profile::default();
            self.by_tasks.remove(&tasks);
            self.free_profiles.push(slot.profile);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// The registry as it was: one full record per node.
    #[derive(Default)]
    struct Naive {
        nodes: BTreeMap<String, (BTreeMap<String, u64>, Vec<String>, Fingerprint)>,
    }

    const TASKS: [&str; 4] = ["a", "b", "c", "digits"];

    /// A stand-in fingerprint: a function of the task set.
    fn fp(tasks: &[String]) -> Fingerprint {
        let mut b = [0u8; 32];
        for (i, t) in tasks.iter().enumerate() {
            b[i] = t.as_bytes()[0];
        }
        b[31] = tasks.len() as u8;
        Fingerprint(b)
    }

    fn check(r: &Registry, n: &Naive) {
        assert_eq!(r.len(), n.nodes.len());
        assert!(r.ids().eq(n.nodes.keys().map(String::as_str)));
        for (id, (samples, upload, f)) in &n.nodes {
            let v = r.get(id).expect("registered");
            assert_eq!(v.upload, upload.as_slice());
            assert!(v.samples.values().eq(samples.values()));
            for t in TASKS {
                assert_eq!(v.samples.get(t), samples.get(t), "{id} {t}");
            }
            let info = v.info(id).expect("info");
            assert_eq!(info.fingerprint, *f);
            assert!(info
                .tasks
                .iter()
                .map(|(t, c)| (t.as_str(), *c))
                .eq(samples.iter().map(|(t, c)| (t.as_str(), *c))));
        }
        for g in ["backbone", "head/a", "head/b", "head/c", "head/digits", "x"] {
            let want = n
                .nodes
                .values()
                .filter(|(_, u, _)| u.iter().any(|x| x == g))
                .count();
            assert_eq!(r.holders(g), want, "{g}");
        }
    }

    /// Thousands of hellos with mixed tasks, hellos again (other tasks and
    /// counts) and departures: the compact registry answers as one full
    /// record per node did.
    #[test]
    fn compact_registry_answers_as_full_records() {
        let mut rng = ChaCha8Rng::seed_from_u64(16);
        let mut r = Registry::default();
        let mut n = Naive::default();
        for step in 0..6000u32 {
            let id = format!("node-{}", rng.gen_range(0..3000u32));
            if rng.gen_bool(0.15) {
                assert_eq!(r.remove(&id), n.nodes.remove(&id).is_some());
                continue;
            }
            let mut samples = BTreeMap::new();
            for t in TASKS {
                if rng.gen_bool(0.4) {
                    samples.insert(t.to_string(), rng.gen_range(0..1000u64));
                }
            }
            let tasks: Vec<String> = samples.keys().cloned().collect();
            let f = fp(&tasks);
            if let Some(k) = r.known_fingerprint(&tasks) {
                assert_eq!(k, f);
            }
            // Upload: the backbone, plus heads of every task but `c`
            // (a local head).
            let upload: Vec<String> = std::iter::once("backbone".to_string())
                .chain(
                    tasks
                        .iter()
                        .filter(|t| *t != "c")
                        .map(|t| format!("head/{t}")),
                )
                .collect();
            r.insert(&id, &samples, upload.clone(), f);
            n.nodes.insert(id, (samples, upload, f));
            if step % 500 == 0 {
                check(&r, &n);
            }
        }
        check(&r, &n);
        // Everyone leaves: nothing is left behind but freed slots.
        let ids: Vec<String> = n.nodes.keys().cloned().collect();
        for id in &ids {
            assert!(r.remove(id));
        }
        assert_eq!(r.len(), 0);
        assert!(r.by_tasks.is_empty());
        assert!(r.profiles.len() <= 1 << TASKS.len());
    }
}
