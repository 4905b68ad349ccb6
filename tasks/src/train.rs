//! Local training and evaluation.
//!
//! **How tasks are mixed.** Every optimizer step is a batch of *one* task. An
//! epoch shuffles each task's samples (seeded), cuts them into batches of
//! `batch_size` (the last one may be smaller), and interleaves the batches
//! of all tasks in a seeded random order, so each task gets steps in
//! proportion to its batch count. One epoch = every sample of every task
//! once. A step updates the backbone and the head of that batch's task; the
//! other heads are untouched (their gradient is not zero, it is absent, as
//! in PyTorch with `set_to_none`), and each group counts its own steps (for
//! Adam's bias correction).
//!
//! **Gradient.** `g = dL/dw + weight_decay * w + prox_mu * (w - w_start)`,
//! where the last term is the gradient of FedProx's `mu/2 ||w - w_start||^2`.
//! Then SGD `w -= lr g`; momentum (PyTorch's form) `v = m v + g`,
//! `w -= lr v` (Nesterov: `w -= lr (g + m v)`); Adam with bias correction.
//!
//! **Frozen groups** are never written: no gradient is applied to them (and
//! a frozen backbone is not even back-propagated), so they come back
//! bit-identical. Names in `frozen` that the model does not hold are
//! ignored: a plan may freeze groups of tasks this node does not have.
//!
//! **Determinism.** All randomness comes from `cfg.seed` (the schedule here;
//! dfdx's dropout from a device seeded by it). The gemm executor runs its
//! kernel single-threaded; dfdx's matmul splits over output tiles only. So
//! the result does not depend on the rayon pool training is called from
//! (tested with 1 and 2 threads in `tasks/tests/backends.rs`).
//!
//! Both backends share this module's schedule (`run_schedule`) and
//! evaluation loop, so they differ only in how one batch steps the
//! weights.

use cohort_protocol::messages::{Optimizer, TaskMetrics, TrainConfig};
use cohort_protocol::{head_group, ParamGroups, BACKBONE};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::{Dataset, Model, TaskSpec, TasksError};

/// Training data of one task for one node: a data set and the indices of
/// the node's samples in it (no copies).
#[derive(Clone, Copy, Debug)]
pub struct TaskData<'a> {
    pub task: &'a str,
    pub data: &'a Dataset,
    pub indices: &'a [usize],
}

/// New weights (every group of the model, frozen ones unchanged) and
/// metrics per task, in the order of `data`.
///
/// `TaskMetrics`: `samples` is the number of local samples of the task (the
/// weight FedAvg gives it), `steps` the optimizer steps taken on it, `loss`
/// the mean training cross-entropy over the last epoch in which the task had
/// a batch (0 if it had none).
#[derive(Clone, Debug, PartialEq)]
pub struct TrainOutcome {
    pub params: ParamGroups,
    pub metrics: Vec<TaskMetrics>,
}

/// Largest batch accepted (bounds the workspace a plan can make us
/// allocate).
pub const MAX_BATCH: u32 = 8192;

fn check_config(cfg: &TrainConfig) -> Result<(), TasksError> {
    let bad = |m: String| Err(TasksError::InvalidConfig(m));
    if cfg.batch_size == 0 || cfg.batch_size > MAX_BATCH {
        return bad(format!(
            "batch size {} (allowed 1..={MAX_BATCH})",
            cfg.batch_size
        ));
    }
    if !cfg.lr.is_finite() || cfg.lr < 0.0 {
        return bad(format!("learning rate {}", cfg.lr));
    }
    if !cfg.weight_decay.is_finite() || !cfg.prox_mu.is_finite() || cfg.prox_mu < 0.0 {
        return bad("weight decay and prox mu must be finite, mu >= 0".into());
    }
    match cfg.optimizer {
        Optimizer::Sgd => {}
        Optimizer::Momentum { momentum, .. } => {
            if !(0.0..1.0).contains(&momentum) {
                return bad(format!("momentum {momentum} (allowed [0, 1))"));
            }
        }
        Optimizer::Adam { beta1, beta2, eps } => {
            if !(0.0..1.0).contains(&beta1)
                || !(0.0..1.0).contains(&beta2)
                || eps.is_nan()
                || eps <= 0.0
            {
                return bad(format!("adam betas {beta1}, {beta2}, eps {eps}"));
            }
        }
    }
    Ok(())
}

/// The model's task `task`.
pub(crate) fn task_spec(model: &dyn Model, task: &str) -> Result<TaskSpec, TasksError> {
    model
        .task(task)
        .cloned()
        .ok_or_else(|| TasksError::UnknownTask(task.to_string()))
}

/// Checks that a task's data fits a head of `classes` on a model of `dim`
/// inputs: dimension, indices in range, labels below the class count.
fn check_task_data(model: &dyn Model, classes: usize, td: &TaskData<'_>) -> Result<(), TasksError> {
    let d = td.data;
    let dim = model.input_dim();
    if d.dim != dim {
        return Err(TasksError::DataMismatch(format!(
            "data set `{}` has {} features per sample, model `{}` takes {dim}",
            d.name,
            d.dim,
            model.name(),
        )));
    }
    if let Some(m) = d.shape_error() {
        return Err(TasksError::DataMismatch(format!(
            "data set `{}`: {m}",
            d.name
        )));
    }
    for &i in td.indices {
        let Some(&y) = d.labels.get(i) else {
            return Err(TasksError::DataMismatch(format!(
                "index {i} out of range for data set `{}` of {} samples",
                d.name,
                d.len()
            )));
        };
        if y as usize >= classes {
            return Err(TasksError::DataMismatch(format!(
                "label {y} of sample {i} of `{}` is out of range for task `{}` ({classes} classes)",
                d.name, td.task
            )));
        }
    }
    Ok(())
}

/// Everything a backend checks before it trains: the config, each task
/// once, each task's data. Returns each task's class count, in `data`
/// order.
pub(crate) fn check_inputs(
    model: &dyn Model,
    data: &[TaskData<'_>],
    cfg: &TrainConfig,
) -> Result<Vec<usize>, TasksError> {
    check_config(cfg)?;
    let mut classes = Vec::with_capacity(data.len());
    for (i, td) in data.iter().enumerate() {
        if data[..i].iter().any(|o| o.task == td.task) {
            return Err(TasksError::DataMismatch(format!(
                "task `{}` given twice",
                td.task
            )));
        }
        let c = task_spec(model, td.task)?.classes;
        check_task_data(model, c, td)?;
        classes.push(c);
    }
    Ok(classes)
}

/// What a backend does with one batch: forward, backward, optimizer step.
pub(crate) trait Stepper {
    /// Where the next batch's `n` rows of inputs go.
    fn input(&mut self, n: usize) -> &mut [f32];
    /// One step on the batch just written to [`Stepper::input`], of the
    /// `t`-th task of `data`; returns the sum of the batch's losses.
    fn step(&mut self, t: usize, labels: &[u32]) -> Result<f64, TasksError>;
}

/// The schedule of the module docs: epochs of shuffled, interleaved
/// single-task batches, at most `cfg.max_steps` steps, and after the first
/// none once `stop` says so. Returns the metrics per task.
pub(crate) fn run_schedule(
    data: &[TaskData<'_>],
    cfg: &TrainConfig,
    dim: usize,
    stepper: &mut dyn Stepper,
    stop: &dyn Fn() -> bool,
) -> Result<Vec<TaskMetrics>, TasksError> {
    let bs = cfg.batch_size as usize;
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let mut orders: Vec<Vec<usize>> = data.iter().map(|td| td.indices.to_vec()).collect();
    let mut schedule: Vec<(usize, usize)> = Vec::new();
    let mut steps = vec![0u64; data.len()];
    let mut last_loss = vec![0.0f32; data.len()];
    let mut labels: Vec<u32> = Vec::with_capacity(bs);
    let max_steps = cfg.max_steps.unwrap_or(u64::MAX);
    let mut total_steps = 0u64;

    'epochs: for _ in 0..cfg.epochs {
        schedule.clear();
        for (t, order) in orders.iter_mut().enumerate() {
            order.shuffle(&mut rng);
            for b in 0..order.len().div_ceil(bs) {
                schedule.push((t, b));
            }
        }
        schedule.shuffle(&mut rng);
        let mut epoch_loss = vec![(0.0f64, 0u64); data.len()];
        for &(t, b) in &schedule {
            // At least one step: an update that moved nothing would still
            // weigh in the average.
            if total_steps >= max_steps || (total_steps > 0 && stop()) {
                record(&mut last_loss, &epoch_loss);
                break 'epochs;
            }
            let td = &data[t];
            let idx = &orders[t][b * bs..((b + 1) * bs).min(orders[t].len())];
            let x = stepper.input(idx.len());
            labels.clear();
            for (r, &i) in idx.iter().enumerate() {
                td.data.copy_row(i, &mut x[r * dim..(r + 1) * dim]);
                labels.push(td.data.labels[i]);
            }
            let loss = stepper.step(t, &labels)?;
            epoch_loss[t].0 += loss;
            epoch_loss[t].1 += idx.len() as u64;
            steps[t] += 1;
            total_steps += 1;
        }
        record(&mut last_loss, &epoch_loss);
    }

    Ok(data
        .iter()
        .enumerate()
        .map(|(t, td)| TaskMetrics {
            task: td.task.to_string(),
            loss: last_loss[t],
            samples: td.indices.len() as u64,
            steps: steps[t],
        })
        .collect())
}

fn record(last: &mut [f32], epoch: &[(f64, u64)]) {
    for (l, &(sum, n)) in last.iter_mut().zip(epoch) {
        if n > 0 {
            *l = (sum / n as f64) as f32;
        }
    }
}

/// Held-out metrics of one task.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EvalMetrics {
    /// Fraction of samples whose top class is the label, in [0, 1].
    pub accuracy: f32,
    /// Mean cross-entropy.
    pub loss: f32,
    pub samples: u64,
}

/// The layout error of a group that `params` lacks.
pub(crate) fn missing_group(group: &str) -> TasksError {
    TasksError::Layout(cohort_protocol::ProtocolError::LayoutMismatch(format!(
        "group `{group}` missing"
    )))
}

/// The `backbone` and `head/<task>` groups of `params`.
pub(crate) fn eval_groups(params: &ParamGroups, task: &str) -> Result<ParamGroups, TasksError> {
    let head = head_group(task);
    let mut groups = ParamGroups::new();
    for g in [BACKBONE, head.as_str()] {
        let v = params.get(g).ok_or_else(|| missing_group(g))?;
        groups.insert(g, v.to_vec());
    }
    Ok(groups)
}

/// Rows per forward pass in evaluation.
pub(crate) const EVAL_BATCH: usize = 256;

/// Runs `f(x, labels)` on `task`'s samples of `data` (all, or `indices`),
/// checked against the model, in batches of [`EVAL_BATCH`] rows (`x`
/// holds `labels.len()` rows of the model's input). Returns the number of
/// samples.
fn eval_batches(
    model: &dyn Model,
    task: &str,
    data: &Dataset,
    indices: Option<&[usize]>,
    mut f: impl FnMut(&[f32], &[u32]) -> Result<(), TasksError>,
) -> Result<u64, TasksError> {
    let classes = task_spec(model, task)?.classes;
    let all: Vec<usize>;
    let idx = match indices {
        Some(i) => i,
        None => {
            all = (0..data.len()).collect();
            &all
        }
    };
    let td = TaskData {
        task,
        data,
        indices: idx,
    };
    check_task_data(model, classes, &td)?;
    let dim = model.input_dim();
    let mut x = vec![0.0; EVAL_BATCH.min(idx.len().max(1)) * dim];
    let mut labels = Vec::with_capacity(EVAL_BATCH);
    for chunk in idx.chunks(EVAL_BATCH) {
        labels.clear();
        labels.extend(chunk.iter().map(|&i| data.labels[i]));
        // Consecutive dense rows (a central evaluation's slices) are
        // already one batch in memory: no copy.
        let first = chunk[0];
        let run = data.windows.is_none() && chunk.iter().enumerate().all(|(r, &i)| i == first + r);
        if run {
            f(
                &data.features[first * dim..(first + chunk.len()) * dim],
                &labels,
            )?;
            continue;
        }
        for (r, &i) in chunk.iter().enumerate() {
            data.copy_row(i, &mut x[r * dim..(r + 1) * dim]);
        }
        f(&x[..chunk.len() * dim], &labels)?;
    }
    Ok(idx.len() as u64)
}

/// Accuracy and loss of `task` on `data` (all samples, or `indices`), with
/// `logits(x, n)` giving the `n x classes` scores of the `n` rows in `x`.
pub(crate) fn eval_loop(
    model: &dyn Model,
    task: &str,
    data: &Dataset,
    indices: Option<&[usize]>,
    mut logits: impl FnMut(&[f32], usize) -> Result<Vec<f32>, TasksError>,
) -> Result<EvalMetrics, TasksError> {
    let classes = task_spec(model, task)?.classes;
    let (mut loss, mut correct) = (0.0f64, 0u64);
    let n = eval_batches(model, task, data, indices, |x, labels| {
        let scores = logits(x, labels.len())?;
        let (l, c) = softmax_xent(&scores, labels, classes, None);
        loss += l;
        correct += c;
        Ok(())
    })?;
    Ok(EvalMetrics {
        accuracy: if n == 0 {
            0.0
        } else {
            correct as f32 / n as f32
        },
        loss: if n == 0 {
            0.0
        } else {
            (loss / n as f64) as f32
        },
        samples: n,
    })
}

/// The logits of [`eval_loop`]'s forward passes, row after row (`classes`
/// values per sample).
pub(crate) fn logits_loop(
    model: &dyn Model,
    task: &str,
    data: &Dataset,
    indices: Option<&[usize]>,
    mut logits: impl FnMut(&[f32], usize) -> Result<Vec<f32>, TasksError>,
) -> Result<Vec<f32>, TasksError> {
    let mut out = Vec::new();
    eval_batches(model, task, data, indices, |x, labels| {
        out.extend(logits(x, labels.len())?);
        Ok(())
    })?;
    Ok(out)
}

/// Mean softmax cross-entropy of `b` rows of `classes` scores; writes
/// `(softmax - onehot) / b` to `dlogits` if given. Returns (sum of losses,
/// number correct).
pub(crate) fn softmax_xent(
    logits: &[f32],
    labels: &[u32],
    classes: usize,
    mut dlogits: Option<&mut [f32]>,
) -> (f64, u64) {
    let b = labels.len();
    let mut loss = 0.0f64;
    let mut correct = 0u64;
    for (i, &y) in labels.iter().enumerate() {
        let row = &logits[i * classes..(i + 1) * classes];
        let mut max = f32::NEG_INFINITY;
        let mut arg = 0usize;
        for (j, v) in row.iter().enumerate() {
            if *v > max {
                max = *v;
                arg = j;
            }
        }
        if arg == y as usize {
            correct += 1;
        }
        let sum: f32 = row.iter().map(|v| (v - max).exp()).sum();
        let lse = max + sum.ln();
        loss += f64::from(lse - row[y as usize]);
        if let Some(d) = dlogits.as_deref_mut() {
            let drow = &mut d[i * classes..(i + 1) * classes];
            let inv_b = 1.0 / b as f32;
            for (j, (dv, v)) in drow.iter_mut().zip(row).enumerate() {
                let p = (v - lse).exp();
                *dv = (p - if j == y as usize { 1.0 } else { 0.0 }) * inv_b;
            }
        }
    }
    (loss, correct)
}
