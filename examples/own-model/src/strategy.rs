//! Bring your own strategy: server momentum with a server learning-rate
//! schedule (linear warmup, then cosine decay), optionally normalized by
//! the clients' local steps as in FedNova (Wang et al., 2020). It is
//! written here, outside the aggregator crate, with its public API only,
//! and runs unchanged in the simulator (`run_experiment_with_strategy`,
//! `Simulation::with_strategy`) and in a deployment (`Engine::new` /
//! `Engine::resume` take any `Box<dyn Strategy>`).
//!
//! Its state survives a checkpoint: the step counter (`StrategyState::steps`),
//! scalars (the last learning rate, the failures seen, a running mean of
//! the clients' training loss) and one velocity tensor per group, named
//! `velocity.<group>` (no `m/<group>` rule: `restore` checks the shapes
//! against the layout itself).

use std::collections::BTreeMap;

use cohort_aggregator::{AggError, AggregateInput, ClientResult, Strategy, StrategyState};
use cohort_protocol::{Layout, ParamGroups};

/// The name this strategy goes by (and checks in `restore`).
pub const NAME: &str = "scheduled_momentum";
/// Prefix of the velocity tensors in the state.
const VELOCITY: &str = "velocity.";

/// The server learning rate of step `s` (0-based): `peak * (s + 1) /
/// warmup` during the warmup, then a cosine from `peak` down to
/// `floor * peak` at step `total` (and `floor * peak` after it).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LrSchedule {
    pub peak: f64,
    pub warmup: u64,
    pub total: u64,
    /// Fraction of `peak` at the end of the decay.
    pub floor: f64,
}

impl LrSchedule {
    /// The learning rate of server step `step`.
    pub fn lr(&self, step: u64) -> f64 {
        if step < self.warmup {
            return self.peak * (step + 1) as f64 / self.warmup as f64;
        }
        let span = self.total.saturating_sub(self.warmup).max(1);
        let progress = ((step - self.warmup) as f64 / span as f64).min(1.0);
        let low = self.floor * self.peak;
        low + (self.peak - low) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}

/// `v = momentum * v + Δ; w += lr(step) * v` per group, where `Δ` is the
/// engine's combined delta, rescaled as FedNova when `normalize_steps` is
/// set (see [`ScheduledMomentum::fednova_factor`]).
#[derive(Clone, Debug)]
pub struct ScheduledMomentum {
    pub schedule: LrSchedule,
    pub momentum: f32,
    /// FedNova: weigh each update by `examples / local steps` and rescale
    /// the mean by the effective number of steps.
    pub normalize_steps: bool,
    steps: u64,
    velocity: BTreeMap<String, Vec<f32>>,
    last_lr: f64,
    failures_seen: u64,
    /// Sample-weighted running mean (EMA 0.5) of the clients' reported
    /// training loss; `None` before the first round with a loss.
    loss_ema: Option<f64>,
}

impl ScheduledMomentum {
    /// A fresh strategy (step 0, zero velocity).
    pub fn new(schedule: LrSchedule, momentum: f32, normalize_steps: bool) -> Self {
        ScheduledMomentum {
            schedule,
            momentum,
            normalize_steps,
            steps: 0,
            velocity: BTreeMap::new(),
            last_lr: 0.0,
            failures_seen: 0,
            loss_ema: None,
        }
    }

    /// Server steps taken.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Nodes that failed, over all rounds.
    pub fn failures_seen(&self) -> u64 {
        self.failures_seen
    }

    /// The running mean of the clients' training loss.
    pub fn loss_ema(&self) -> Option<f64> {
        self.loss_ema
    }

    /// FedNova's rescaling of group `group`'s mean. With `w_i = n_i / τ_i`
    /// (the weights [`Strategy::update_weight`] gave, `τ_i` the local
    /// steps), the engine's mean is `Σ w_i d_i / Σ w_i`, and FedNova's step
    /// `τ_eff Σ p_i d_i / τ_i` (`p_i = n_i / Σ n`, `τ_eff = Σ p_i τ_i`) is
    /// that mean times `(Σ w_i τ_i²)(Σ w_i) / (Σ w_i τ_i)²`: 1 when every
    /// client took the same number of steps. Updates without steps count
    /// as one step.
    pub fn fednova_factor(group: &str, results: &[ClientResult]) -> f64 {
        let (mut w, mut wt, mut wt2) = (0.0f64, 0.0f64, 0.0f64);
        for r in results {
            let Some(wi) = r.weight(group) else { continue };
            let tau = r.steps.unwrap_or(1).max(1) as f64;
            w += wi;
            wt += wi * tau;
            wt2 += wi * tau * tau;
        }
        if wt > 0.0 && (wt2 * w / (wt * wt)).is_finite() {
            wt2 * w / (wt * wt)
        } else {
            1.0
        }
    }
}

fn refuse(message: String) -> AggError {
    AggError::Checkpoint(format!("{NAME}: {message}"))
}

impl Strategy for ScheduledMomentum {
    fn name(&self) -> &str {
        NAME
    }

    fn update_weight(&self, _group: &str, result: &ClientResult, weight: f64) -> f64 {
        match (self.normalize_steps, result.steps) {
            (true, Some(tau)) if tau > 0 => weight / tau as f64,
            _ => weight,
        }
    }

    fn aggregate(
        &mut self,
        input: &AggregateInput<'_>,
        global: &mut ParamGroups,
    ) -> Result<(), AggError> {
        let lr = self.schedule.lr(self.steps);
        for (group, delta) in input.combined {
            let Some(w) = global.get_mut(group) else {
                return Err(AggError::Strategy {
                    strategy: NAME.into(),
                    message: format!("unknown group `{group}`"),
                });
            };
            if w.len() != delta.len() {
                return Err(AggError::Strategy {
                    strategy: NAME.into(),
                    message: format!("group `{group}`: delta of the wrong length"),
                });
            }
            let scale = if self.normalize_steps {
                Self::fednova_factor(group, input.results) as f32
            } else {
                1.0
            };
            let v = self
                .velocity
                .entry(group.clone())
                .or_insert_with(|| vec![0.0; delta.len()]);
            let lr = lr as f32;
            for ((wi, vi), di) in w.iter_mut().zip(v.iter_mut()).zip(delta) {
                *vi = self.momentum * *vi + scale * di;
                *wi += lr * *vi;
            }
        }
        // Bookkeeping from the per-client results and the failures.
        let (mut loss, mut n) = (0.0f64, 0.0f64);
        for r in input.results {
            for m in &r.metrics {
                if m.loss.is_finite() {
                    loss += f64::from(m.loss) * m.samples as f64;
                    n += m.samples as f64;
                }
            }
        }
        if n > 0.0 {
            let round_loss = loss / n;
            self.loss_ema = Some(match self.loss_ema {
                Some(e) => 0.5 * e + 0.5 * round_loss,
                None => round_loss,
            });
        }
        self.failures_seen += input.failures.len() as u64;
        self.last_lr = lr;
        self.steps += 1;
        Ok(())
    }

    fn state(&self) -> StrategyState {
        let mut scalars = BTreeMap::new();
        scalars.insert("last_lr".to_string(), self.last_lr);
        scalars.insert("failures_seen".to_string(), self.failures_seen as f64);
        if let Some(l) = self.loss_ema {
            scalars.insert("loss_ema".to_string(), l);
        }
        StrategyState {
            name: NAME.into(),
            steps: self.steps,
            tensors: self
                .velocity
                .iter()
                .map(|(g, v)| (format!("{VELOCITY}{g}"), v.clone()))
                .collect(),
            scalars,
            ..StrategyState::default()
        }
    }

    fn restore(&mut self, state: StrategyState, layout: &Layout) -> Result<(), AggError> {
        if state.name != NAME {
            return Err(refuse(format!("the state is of strategy `{}`", state.name)));
        }
        let mut velocity = BTreeMap::new();
        for (name, t) in state.tensors {
            let Some(group) = name.strip_prefix(VELOCITY) else {
                return Err(refuse(format!("unknown tensor `{name}`")));
            };
            let Some(g) = layout.group(group) else {
                return Err(refuse(format!("tensor `{name}`: no group `{group}`")));
            };
            if g.len() != t.len() as u64 {
                return Err(refuse(format!(
                    "tensor `{name}` holds {} values, its group {}",
                    t.len(),
                    g.len()
                )));
            }
            velocity.insert(group.to_string(), t);
        }
        let scalar = |k: &str| state.scalars.get(k).copied();
        let failures = scalar("failures_seen").unwrap_or(0.0);
        if !(failures >= 0.0 && failures.fract() == 0.0) {
            return Err(refuse(format!("failures_seen = {failures}")));
        }
        self.steps = state.steps;
        self.velocity = velocity;
        self.last_lr = scalar("last_lr").unwrap_or(0.0);
        self.failures_seen = failures as u64;
        self.loss_ema = scalar("loss_ema");
        Ok(())
    }
}
