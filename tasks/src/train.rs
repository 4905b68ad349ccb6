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
//! **Determinism.** All randomness comes from `cfg.seed`; the matrix kernel
//! runs single-threaded (see `linalg.rs`), so the result does not depend on
//! the rayon pool `train` is called from.

use cohort_protocol::messages::{Optimizer, TaskMetrics, TrainConfig};
use cohort_protocol::{head_group, ParamGroups, BACKBONE};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::model::{softmax_xent, Model, ModelSpec, Workspace};
use crate::{Dataset, TasksError};

/// Training data of one task for one node: a data set and the indices of
/// the node's samples in it (no copies).
#[derive(Clone, Copy, Debug)]
pub struct TaskData<'a> {
    pub task: &'a str,
    pub data: &'a Dataset,
    pub indices: &'a [usize],
}

/// New weights (every group of the spec, frozen ones unchanged) and
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

#[derive(Debug, Default)]
struct OptState {
    steps: u64,
    m: Vec<f32>,
    v: Vec<f32>,
}

/// Applies one optimizer step to `w` with raw gradient `g` (overwritten).
/// Each variant is one fused pass over the group: at batch 32 the update
/// streams as many bytes as the matrix products, so passes matter.
fn apply_step(w: &mut [f32], g: &mut [f32], w0: &[f32], st: &mut OptState, cfg: &TrainConfig) {
    let (wd, mu, lr) = (cfg.weight_decay, cfg.prox_mu, cfg.lr);
    if wd != 0.0 || mu != 0.0 {
        for ((gi, wi), w0i) in g.iter_mut().zip(w.iter()).zip(w0) {
            *gi += wd * *wi + mu * (*wi - *w0i);
        }
    }
    st.steps += 1;
    match cfg.optimizer {
        Optimizer::Sgd => {
            for (wi, gi) in w.iter_mut().zip(g.iter()) {
                *wi -= lr * *gi;
            }
        }
        Optimizer::Momentum { momentum, nesterov } => {
            // A zero buffer makes the first step `v = g`, as PyTorch does.
            if st.m.len() != w.len() {
                st.m = vec![0.0; w.len()];
            }
            if nesterov {
                for ((wi, gi), mi) in w.iter_mut().zip(g.iter()).zip(st.m.iter_mut()) {
                    *mi = momentum * *mi + *gi;
                    *wi -= lr * (*gi + momentum * *mi);
                }
            } else {
                for ((wi, gi), mi) in w.iter_mut().zip(g.iter()).zip(st.m.iter_mut()) {
                    *mi = momentum * *mi + *gi;
                    *wi -= lr * *mi;
                }
            }
        }
        Optimizer::Adam { beta1, beta2, eps } => {
            if st.m.len() != w.len() {
                st.m = vec![0.0; w.len()];
                st.v = vec![0.0; w.len()];
            }
            let t = st.steps.min(i32::MAX as u64) as i32;
            let c1 = 1.0 / (1.0 - beta1.powi(t));
            let c2 = 1.0 / (1.0 - beta2.powi(t));
            for (((wi, gi), mi), vi) in w
                .iter_mut()
                .zip(g.iter())
                .zip(st.m.iter_mut())
                .zip(st.v.iter_mut())
            {
                *mi = beta1 * *mi + (1.0 - beta1) * *gi;
                *vi = beta2 * *vi + (1.0 - beta2) * *gi * *gi;
                *wi -= lr * (*mi * c1) / ((*vi * c2).sqrt() + eps);
            }
        }
    }
}

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

/// Checks that a task's data fits the model: dimension, indices in range,
/// labels below the head's class count.
fn check_task_data(spec: &ModelSpec, td: &TaskData<'_>) -> Result<usize, TasksError> {
    let classes = spec
        .task(td.task)
        .ok_or_else(|| TasksError::UnknownTask(td.task.to_string()))?
        .classes;
    let d = td.data;
    if d.dim != spec.input_dim() {
        return Err(TasksError::DataMismatch(format!(
            "data set `{}` has {} features per sample, backbone {} takes {}",
            d.name,
            d.dim,
            spec.backbone,
            spec.input_dim()
        )));
    }
    if d.features.len() != d.labels.len() * d.dim {
        return Err(TasksError::DataMismatch(format!(
            "data set `{}` has inconsistent lengths",
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
    Ok(classes)
}

/// Trains `spec`'s model from `start` on the node's tasks (see the module
/// docs for the details). `start` must match `spec.layout()` exactly.
pub fn train(
    spec: &ModelSpec,
    start: &ParamGroups,
    data: &[TaskData<'_>],
    cfg: &TrainConfig,
) -> Result<TrainOutcome, TasksError> {
    check_config(cfg)?;
    let mut model = Model::from_groups(spec, start)?;
    let mut classes = Vec::with_capacity(data.len());
    for (i, td) in data.iter().enumerate() {
        if data[..i].iter().any(|o| o.task == td.task) {
            return Err(TasksError::DataMismatch(format!(
                "task `{}` given twice",
                td.task
            )));
        }
        classes.push(check_task_data(spec, td)?);
    }
    let frozen = |g: &str| cfg.frozen.iter().any(|f| f == g);
    let backbone_frozen = frozen(BACKBONE);
    let head_frozen: Vec<bool> = data.iter().map(|td| frozen(&head_group(td.task))).collect();

    let bs = cfg.batch_size as usize;
    let max_classes = classes.iter().copied().max().unwrap_or(2);
    let mut ws = Workspace::with_classes(&model.arch, bs, true, max_classes);
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);

    let mut bb_state = OptState::default();
    let mut head_states: Vec<OptState> = data.iter().map(|_| OptState::default()).collect();
    let bb_start = model.backbone.clone();
    let head_starts: Vec<Vec<f32>> = data
        .iter()
        .map(|td| model.heads.get(td.task).cloned().unwrap_or_default())
        .collect();

    let mut orders: Vec<Vec<usize>> = data.iter().map(|td| td.indices.to_vec()).collect();
    let mut schedule: Vec<(usize, usize)> = Vec::new();
    let mut steps = vec![0u64; data.len()];
    let mut last_loss = vec![0.0f32; data.len()];
    let mut labels_buf: Vec<u32> = Vec::with_capacity(bs);
    let max_steps = cfg.max_steps.unwrap_or(u64::MAX);
    let mut total_steps = 0u64;
    let dim = spec.input_dim();

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
            if total_steps >= max_steps {
                record(&mut last_loss, &epoch_loss);
                break 'epochs;
            }
            let td = &data[t];
            let idx = &orders[t][b * bs..((b + 1) * bs).min(orders[t].len())];
            let n = idx.len();
            labels_buf.clear();
            for (r, &i) in idx.iter().enumerate() {
                ws.acts[0][r * dim..(r + 1) * dim]
                    .copy_from_slice(&td.data.features[i * dim..(i + 1) * dim]);
                labels_buf.push(td.data.labels[i]);
            }
            model.forward(&mut ws, n, td.task)?;
            let c = classes[t];
            let (loss, _) = softmax_xent(
                &ws.logits[..n * c],
                &labels_buf,
                c,
                Some(&mut ws.dlogits[..n * c]),
            );
            epoch_loss[t].0 += loss;
            epoch_loss[t].1 += n as u64;
            let train_head = !head_frozen[t];
            if train_head || !backbone_frozen {
                model.backward(&mut ws, n, td.task, !backbone_frozen);
                if train_head {
                    if let Some(h) = model.heads.get_mut(td.task) {
                        let g = &mut ws.grad_head[..h.len()];
                        apply_step(h, g, &head_starts[t], &mut head_states[t], cfg);
                    }
                }
                if !backbone_frozen {
                    apply_step(
                        &mut model.backbone,
                        &mut ws.grad_backbone,
                        &bb_start,
                        &mut bb_state,
                        cfg,
                    );
                }
            }
            steps[t] += 1;
            total_steps += 1;
        }
        record(&mut last_loss, &epoch_loss);
    }

    let metrics = data
        .iter()
        .enumerate()
        .map(|(t, td)| TaskMetrics {
            task: td.task.to_string(),
            loss: last_loss[t],
            samples: td.indices.len() as u64,
            steps: steps[t],
        })
        .collect();
    Ok(TrainOutcome {
        params: model.to_groups(),
        metrics,
    })
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

/// Accuracy and loss of `task` on `data` (all samples, or `indices`).
///
/// `params` needs only the `backbone` and `head/<task>` groups of `spec`'s
/// layout (other groups are ignored), so a node can evaluate the global
/// backbone with its own personalized head by passing those groups.
pub fn evaluate(
    spec: &ModelSpec,
    params: &ParamGroups,
    task: &str,
    data: &Dataset,
    indices: Option<&[usize]>,
) -> Result<EvalMetrics, TasksError> {
    let sub = spec.subset(&[task])?;
    let head = head_group(task);
    let mut groups = ParamGroups::new();
    for g in [BACKBONE, head.as_str()] {
        let v = params.get(g).ok_or_else(|| {
            TasksError::Layout(cohort_protocol::ProtocolError::LayoutMismatch(format!(
                "group `{g}` missing"
            )))
        })?;
        groups.insert(g, v.to_vec());
    }
    let model = Model::from_groups(&sub, &groups)?;
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
    let classes = check_task_data(&sub, &td)?;
    let dim = sub.input_dim();
    const EVAL_BATCH: usize = 256;
    let mut ws = Workspace::with_classes(&model.arch, EVAL_BATCH, false, classes);
    let mut labels = Vec::with_capacity(EVAL_BATCH);
    let (mut loss, mut correct) = (0.0f64, 0u64);
    for chunk in idx.chunks(EVAL_BATCH) {
        labels.clear();
        for (r, &i) in chunk.iter().enumerate() {
            ws.acts[0][r * dim..(r + 1) * dim]
                .copy_from_slice(&data.features[i * dim..(i + 1) * dim]);
            labels.push(data.labels[i]);
        }
        model.forward(&mut ws, chunk.len(), task)?;
        let (l, c) = softmax_xent(&ws.logits[..chunk.len() * classes], &labels, classes, None);
        loss += l;
        correct += c;
    }
    let n = idx.len() as u64;
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
