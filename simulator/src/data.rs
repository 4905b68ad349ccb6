//! The data of a simulated federation: tasks loaded once, and which samples
//! each virtual client holds.
//!
//! Nothing here grows with the number of *registered* clients in `sampled`
//! mode: who holds which task and which samples are functions of the seed and
//! the client index, computed when a client is sampled.

use std::borrow::Cow;

use cohort_node::mix_seed;
use cohort_tasks::{Dataset, Model, Partitioner, Split, TaskSpec};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Gamma};

use crate::config::{ClientData, ExperimentConfig};
use crate::SimError;

/// One task's data, loaded once for the whole federation.
#[derive(Clone, Debug)]
pub struct LoadedTask {
    pub name: String,
    pub split: Split,
    /// Training samples of each class (used by `sampled` clients).
    by_class: Vec<Vec<usize>>,
}

impl LoadedTask {
    /// Task `name` with the data of `split`, e.g. `Dataset`s a program built
    /// itself. Checks both datasets ([`Dataset::validate`]), that neither is
    /// empty and that they agree on features per sample and classes.
    pub fn new(name: impl Into<String>, split: Split) -> Result<Self, SimError> {
        let name = name.into();
        for (which, d) in [("train", &split.train), ("test", &split.test)] {
            d.validate()?;
            if d.is_empty() {
                return Err(SimError::Config(format!(
                    "task `{name}`: data set `{}` has an empty {which} split",
                    d.name
                )));
            }
        }
        if split.train.dim != split.test.dim || split.train.classes != split.test.classes {
            return Err(SimError::Config(format!(
                "task `{name}`: train split has {} features and {} classes, test split {} and {}",
                split.train.dim, split.train.classes, split.test.dim, split.test.classes
            )));
        }
        let mut by_class = vec![Vec::new(); split.train.classes];
        for (i, &y) in split.train.labels.iter().enumerate() {
            if let Some(c) = by_class.get_mut(y as usize) {
                c.push(i);
            }
        }
        Ok(LoadedTask {
            name,
            split,
            by_class,
        })
    }

    /// The task as a model sees it (name, classes).
    pub fn spec(&self) -> TaskSpec {
        TaskSpec {
            name: self.name.clone(),
            classes: self.split.train.classes,
        }
    }
}

/// Loads a data set named as in [`crate::config::TaskConfig::dataset`].
pub fn load_dataset(name: &str) -> Result<Split, SimError> {
    Ok(cohort_tasks::load_dataset(name)?)
}

/// Loads the data of every task of `cfg` ([`cohort_tasks::DatasetSpec::load`];
/// relative paths against the working directory: read the file with
/// [`ExperimentConfig::from_file`] to have them relative to it).
pub fn load_tasks(cfg: &ExperimentConfig) -> Result<Vec<LoadedTask>, SimError> {
    cfg.tasks
        .iter()
        .map(|t| LoadedTask::new(t.name.clone(), t.dataset.load(None)?))
        .collect()
}

/// `tasks` in the order of `cfg.tasks`, matched by name; an error if a task
/// of the experiment has no data or data names a task it does not have.
pub fn order_tasks(
    cfg: &ExperimentConfig,
    mut tasks: Vec<LoadedTask>,
) -> Result<Vec<LoadedTask>, SimError> {
    let mut out = Vec::with_capacity(cfg.tasks.len());
    for t in &cfg.tasks {
        let i = tasks.iter().position(|l| l.name == t.name).ok_or_else(|| {
            SimError::Config(format!("task `{}` of the experiment has no data", t.name))
        })?;
        out.push(tasks.swap_remove(i));
    }
    if let Some(extra) = tasks.first() {
        return Err(SimError::Config(format!(
            "data for task `{}`, which the experiment does not have",
            extra.name
        )));
    }
    Ok(out)
}

/// Checks that every task's data fits `model` ([`cohort_tasks::check_input`]:
/// features per sample against the model's input, classes against its head).
pub fn check_fit(model: &dyn Model, tasks: &[LoadedTask]) -> Result<(), SimError> {
    for t in tasks {
        cohort_tasks::check_input(model, &t.name, &t.split)?;
    }
    Ok(())
}

/// Which samples each client holds, per task.
#[derive(Debug)]
enum Assignment {
    /// `parts[task][k]` = indices of the `k`-th holder of `task`, and
    /// `slot[task][client]` = that `k` (`u32::MAX` when the client does not
    /// hold the task).
    Partitioned {
        parts: Vec<Vec<Vec<usize>>>,
        slot: Vec<Vec<u32>>,
    },
    Sampled {
        samples: usize,
        alpha: f64,
    },
}

/// The population: tasks and how their data is spread over clients.
#[derive(Debug)]
pub struct Population {
    pub tasks: Vec<LoadedTask>,
    holders: Vec<f64>,
    clients: usize,
    seed: u64,
    assignment: Assignment,
    /// Fraction of each client's samples kept aside as its local test split.
    holdout: f64,
}

/// A uniform number in [0, 1) from a seed: the coin behind per-client
/// decisions that must not need per-client storage.
fn coin(seed: u64) -> f64 {
    (mix_seed(seed, 0x5EED) >> 11) as f64 / (1u64 << 53) as f64
}

const TASK_SALT: u64 = 0x7A5C;

impl Population {
    /// Loads every task's data ([`load_tasks`]) and spreads it over the
    /// clients as `cfg` says.
    pub fn new(cfg: &ExperimentConfig) -> Result<Self, SimError> {
        Self::from_tasks(cfg, load_tasks(cfg)?)
    }

    /// The population of `cfg` on data already loaded (or built by a
    /// program): one [`LoadedTask`] per task of `cfg.tasks`, matched by name
    /// ([`order_tasks`]); the tasks' `dataset` settings are not read.
    pub fn from_tasks(cfg: &ExperimentConfig, tasks: Vec<LoadedTask>) -> Result<Self, SimError> {
        let tasks = order_tasks(cfg, tasks)?;
        let holdout = if cfg.eval.personalized || cfg.sharing == crate::config::Sharing::LocalOnly {
            cfg.eval.holdout
        } else {
            0.0
        };
        let mut pop = Population {
            tasks,
            holders: cfg.tasks.iter().map(|t| t.holders).collect(),
            clients: cfg.clients.count,
            seed: cfg.seed,
            assignment: Assignment::Sampled {
                samples: 0,
                alpha: 1.0,
            },
            holdout,
        };
        pop.assignment = match &cfg.clients.data {
            ClientData::Sampled { samples, alpha } => Assignment::Sampled {
                samples: *samples,
                alpha: *alpha,
            },
            ClientData::Partition { partitioner } => pop.partition(partitioner)?,
        };
        Ok(pop)
    }

    fn partition(&self, partitioner: &Partitioner) -> Result<Assignment, SimError> {
        let mut parts = Vec::with_capacity(self.tasks.len());
        let mut slot = Vec::with_capacity(self.tasks.len());
        for (t, task) in self.tasks.iter().enumerate() {
            let holders: Vec<usize> = (0..self.clients).filter(|&c| self.holds(c, t)).collect();
            // Text data sets key each sample by its document (e.g. a
            // speaking role): the natural partitioner's keys.
            let p = cohort_tasks::partition(
                partitioner,
                &task.split.train.labels,
                task.split.train.keys(),
                holders.len(),
                mix_seed(self.seed, TASK_SALT + t as u64),
            )?;
            let mut s = vec![u32::MAX; self.clients];
            for (k, &c) in holders.iter().enumerate() {
                s[c] = k as u32;
            }
            parts.push(p);
            slot.push(s);
        }
        Ok(Assignment::Partitioned { parts, slot })
    }

    pub fn clients(&self) -> usize {
        self.clients
    }

    /// Whether `client` holds task number `task`. Each client holds each task
    /// with the task's `holders` probability, and at least one task.
    pub fn holds(&self, client: usize, task: usize) -> bool {
        let base = mix_seed(self.seed, client as u64);
        let any = (0..self.tasks.len()).any(|t| coin(mix_seed(base, t as u64)) < self.holders[t]);
        if any {
            coin(mix_seed(base, task as u64)) < self.holders[task]
        } else {
            task == client % self.tasks.len()
        }
    }

    /// Task numbers `client` holds.
    pub fn client_tasks(&self, client: usize) -> Vec<usize> {
        (0..self.tasks.len())
            .filter(|&t| self.holds(client, t))
            .collect()
    }

    /// All of `client`'s samples of `task` (training and held-out).
    fn all_indices(&self, client: usize, task: usize) -> Cow<'_, [usize]> {
        match &self.assignment {
            Assignment::Partitioned { parts, slot } => match slot[task].get(client) {
                Some(&k) if k != u32::MAX => Cow::Borrowed(parts[task][k as usize].as_slice()),
                _ => Cow::Owned(Vec::new()),
            },
            Assignment::Sampled { samples, alpha } => {
                if !self.holds(client, task) {
                    return Cow::Owned(Vec::new());
                }
                Cow::Owned(self.sample_indices(client, task, *samples, *alpha))
            }
        }
    }

    fn sample_indices(&self, client: usize, task: usize, samples: usize, alpha: f64) -> Vec<usize> {
        let by_class = &self.tasks[task].by_class;
        let mut rng = ChaCha8Rng::seed_from_u64(mix_seed(
            mix_seed(self.seed, client as u64),
            TASK_SALT + task as u64,
        ));
        // Dirichlet(alpha) label proportions as normalized Gamma(alpha) draws.
        let gamma = Gamma::new(alpha, 1.0).ok();
        let mut p: Vec<f64> = by_class
            .iter()
            .map(|c| {
                if c.is_empty() {
                    0.0
                } else {
                    gamma.map_or(1.0, |g| g.sample(&mut rng))
                }
            })
            .collect();
        let total: f64 = p.iter().sum();
        if total.is_nan() || total <= 0.0 {
            p = by_class
                .iter()
                .map(|c| if c.is_empty() { 0.0 } else { 1.0 })
                .collect();
        }
        let total: f64 = p.iter().sum();
        let mut out = Vec::with_capacity(samples);
        for _ in 0..samples {
            let mut u = rng.gen::<f64>() * total;
            let mut class = p.len() - 1;
            for (c, &w) in p.iter().enumerate() {
                if u < w {
                    class = c;
                    break;
                }
                u -= w;
            }
            let pool = &by_class[class];
            if !pool.is_empty() {
                out.push(pool[rng.gen_range(0..pool.len())]);
            }
        }
        out
    }

    /// `client`'s training samples of `task` and its held-out samples. The
    /// held-out ones are a seeded random choice: data sets stored sorted by
    /// label (MNIST 5k is) would otherwise hold out only the client's
    /// highest classes.
    pub fn client_data(&self, client: usize, task: usize) -> (Vec<usize>, Vec<usize>) {
        let all = self.all_indices(client, task);
        let held = self.held_out(all.len());
        if held == 0 {
            return (all.into_owned(), Vec::new());
        }
        let mut rng = ChaCha8Rng::seed_from_u64(mix_seed(
            mix_seed(self.seed, client as u64),
            0x401D + task as u64,
        ));
        let mut shuffled = all.into_owned();
        shuffled.shuffle(&mut rng);
        let test = shuffled.split_off(shuffled.len() - held);
        (shuffled, test)
    }

    /// Training samples of `client` for `task`, weight of its update.
    pub fn train_count(&self, client: usize, task: usize) -> usize {
        let n = self.all_indices(client, task).len();
        n - self.held_out(n)
    }

    /// How many of `n` samples a client keeps aside (at least one sample
    /// stays for training whenever there is one).
    fn held_out(&self, n: usize) -> usize {
        (((n as f64) * self.holdout).floor() as usize).min(n.saturating_sub(1))
    }

    /// The training set of task `t`, with labels flipped (`y -> classes-1-y`)
    /// for label-flip attackers.
    pub fn flipped(&self, task: usize) -> Dataset {
        let d = &self.tasks[task].split.train;
        let mut f = d.clone();
        let k = d.classes as u32;
        for y in &mut f.labels {
            *y = k - 1 - *y;
        }
        f
    }
}

/// Random choice of exactly `round(fraction * n)` clients, as a sorted list.
pub fn choose_fraction(n: usize, fraction: f64, seed: u64) -> Vec<usize> {
    let k = ((fraction * n as f64).round() as usize).min(n);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut v = rand::seq::index::sample(&mut rng, n, k).into_vec();
    v.sort_unstable();
    v
}
