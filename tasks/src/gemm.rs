//! The gemm executor: the built-in architectures with hand-written
//! forward and backward passes on `gemm` (the kernel of dfdx's CPU
//! backend), called single-threaded. It accelerates the MLPs that also run
//! on dfdx (1.5x, see `BENCHMARKS.md`: no gradient for the first layer's
//! input, fused optimizer passes) and is the only home of the CNN, since
//! dfdx 0.13's convolutions build only on nightly Rust. `tasks/tests/backends.rs`
//! checks that both backends train to the same weights.
//!
//! A model is stored the way it travels: one flat `Vec<f32>` for the
//! backbone and one per head, tensors laid end to end in [`Model::layout`]
//! order. Flattening and loading are therefore copies, exact bit for bit.
//!
//! Layouts (PyTorch-like names; `Linear` weights are `[out, in]` as in
//! PyTorch, conv weights `[out_channels, kh, kw, in_channels]` (channel-last,
//! unlike PyTorch's `[out, in, kh, kw]`: im2col rows are then contiguous
//! copies); the index is the position in
//! an equivalent `torch.nn.Sequential`, ReLU, pooling and flatten included):
//!
//! | backbone | layers | features |
//! |---|---|---|
//! | `mlp28` | 784 → 256 → 128 (ReLU after each) | 128 |
//! | `cnn28` | conv 5x5 1→8, ReLU, maxpool 2 (24→12), conv 5x5 8→16, ReLU, maxpool 2 (8→4), flatten (256), linear 256 → 128, ReLU | 128 |
//! | `mlp8x8` | 64 → 128 → 64 (ReLU after each) | 64 |
//! | `mlp_tab4` | 4 → 32 → 32 (ReLU after each) | 32 |
//!
//! Head `t` is one linear layer from the features to the task's classes
//! (`head/t.weight`, `head/t.bias`). Convolution activations are kept
//! channel-last (`h, w, c`), so the CNN flattens in `(h, w, c)` order (a
//! PyTorch port would permute before its flatten).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use std::sync::Arc;

use cohort_protocol::{head_group, Layout, ParamGroups, TensorSpec, BACKBONE};
use serde::{Deserialize, Serialize};

use crate::linalg::{matmul, matmul_add_scaled, View};
use crate::model::{he_uniform_backbone, init_heads, layout_with_heads, validate_tasks};
use crate::train::{softmax_xent, EvalMetrics, Stepper, TaskData, TrainOutcome, EVAL_BATCH};
use crate::{Backend, Dataset, Model, Optimizer, SharedModel, TaskSpec, TasksError, TrainConfig};

/// The backbone architectures, chosen at run time by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackboneKind {
    /// MLP 784-256-128 for 28x28 images.
    Mlp28,
    /// Small CNN for 28x28 images (two conv+pool stages, linear 256-128).
    Cnn28,
    /// MLP 64-128-64 for the 8x8 digits.
    Mlp8x8,
    /// MLP 4-32-32 for 4-feature tabular data.
    MlpTab4,
}

impl BackboneKind {
    pub const ALL: [BackboneKind; 4] = [
        BackboneKind::Mlp28,
        BackboneKind::Cnn28,
        BackboneKind::Mlp8x8,
        BackboneKind::MlpTab4,
    ];

    /// What the architecture is, for `--help` and the registry.
    pub fn description(self) -> &'static str {
        match self {
            BackboneKind::Mlp28 => "MLP 784-256-128 (ReLU) for 28x28 images",
            BackboneKind::Cnn28 => {
                "CNN for 28x28 images: conv5x5 1-8, pool, conv5x5 8-16, pool, linear 256-128"
            }
            BackboneKind::Mlp8x8 => "MLP 64-128-64 (ReLU) for 8x8 digits",
            BackboneKind::MlpTab4 => "MLP 4-32-32 (ReLU) for 4-feature tables",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            BackboneKind::Mlp28 => "mlp28",
            BackboneKind::Cnn28 => "cnn28",
            BackboneKind::Mlp8x8 => "mlp8x8",
            BackboneKind::MlpTab4 => "mlp_tab4",
        }
    }

    /// Number of input features per sample.
    pub fn input_dim(self) -> usize {
        self.arch().input
    }

    /// Number of features the backbone gives its heads.
    pub fn feature_dim(self) -> usize {
        self.arch().features
    }

    pub(crate) fn arch(self) -> Arch {
        use Layer::*;
        match self {
            BackboneKind::Mlp28 => Arch::new(
                784,
                vec![
                    (
                        Linear {
                            input: 784,
                            output: 256,
                        },
                        0,
                    ),
                    (
                        Linear {
                            input: 256,
                            output: 128,
                        },
                        2,
                    ),
                ],
            ),
            BackboneKind::Cnn28 => Arch::new(
                784,
                vec![
                    (
                        Conv {
                            cin: 1,
                            cout: 8,
                            k: 5,
                            h: 28,
                            w: 28,
                        },
                        0,
                    ),
                    (Pool { c: 8, h: 24, w: 24 }, 2),
                    (
                        Conv {
                            cin: 8,
                            cout: 16,
                            k: 5,
                            h: 12,
                            w: 12,
                        },
                        3,
                    ),
                    (Pool { c: 16, h: 8, w: 8 }, 5),
                    (
                        Linear {
                            input: 256,
                            output: 128,
                        },
                        7,
                    ),
                ],
            ),
            BackboneKind::Mlp8x8 => Arch::new(
                64,
                vec![
                    (
                        Linear {
                            input: 64,
                            output: 128,
                        },
                        0,
                    ),
                    (
                        Linear {
                            input: 128,
                            output: 64,
                        },
                        2,
                    ),
                ],
            ),
            BackboneKind::MlpTab4 => Arch::new(
                4,
                vec![
                    (
                        Linear {
                            input: 4,
                            output: 32,
                        },
                        0,
                    ),
                    (
                        Linear {
                            input: 32,
                            output: 32,
                        },
                        2,
                    ),
                ],
            ),
        }
    }
}

impl fmt::Display for BackboneKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for BackboneKind {
    type Err = TasksError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        BackboneKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| TasksError::UnknownModel {
                name: s.to_string(),
                known: BackboneKind::ALL.map(BackboneKind::name).join(", "),
            })
    }
}

/// One layer of a backbone. Every `Linear` and `Conv` is followed by a ReLU.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Layer {
    Linear {
        input: usize,
        output: usize,
    },
    /// Valid (no padding), stride 1, on a channel-last `h x w x cin` input.
    Conv {
        cin: usize,
        cout: usize,
        k: usize,
        h: usize,
        w: usize,
    },
    /// 2x2 max pooling, stride 2, on a channel-last `h x w x c` input.
    Pool {
        c: usize,
        h: usize,
        w: usize,
    },
}

impl Layer {
    pub fn in_size(&self) -> usize {
        match *self {
            Layer::Linear { input, .. } => input,
            Layer::Conv { cin, h, w, .. } => cin * h * w,
            Layer::Pool { c, h, w } => c * h * w,
        }
    }

    pub fn out_size(&self) -> usize {
        match *self {
            Layer::Linear { output, .. } => output,
            Layer::Conv { cout, k, h, w, .. } => cout * (h + 1 - k) * (w + 1 - k),
            Layer::Pool { c, h, w } => c * (h / 2) * (w / 2),
        }
    }

    /// (weight shape, bias length), `None` for parameterless layers.
    fn param_shapes(&self) -> Option<(Vec<u64>, usize)> {
        match *self {
            Layer::Linear { input, output } => Some((vec![output as u64, input as u64], output)),
            Layer::Conv { cin, cout, k, .. } => {
                Some((vec![cout as u64, k as u64, k as u64, cin as u64], cout))
            }
            Layer::Pool { .. } => None,
        }
    }

    /// Per-sample size of the im2col buffer (conv only).
    pub fn cols_size(&self) -> usize {
        match *self {
            Layer::Conv { cin, k, h, w, .. } => (h + 1 - k) * (w + 1 - k) * cin * k * k,
            _ => 0,
        }
    }
}

/// A backbone's layers with the offsets of their parameters in the flat
/// backbone vector.
#[derive(Clone, Debug)]
pub(crate) struct Arch {
    pub input: usize,
    pub features: usize,
    /// (layer, offset of its weight, offset of its bias, torch index)
    pub layers: Vec<(Layer, usize, usize, usize)>,
    pub num_params: usize,
}

impl Arch {
    fn new(input: usize, spec: Vec<(Layer, usize)>) -> Arch {
        let mut off = 0;
        let mut layers = Vec::with_capacity(spec.len());
        for (l, idx) in spec {
            let (w_off, b_off) = match l.param_shapes() {
                Some((shape, b)) => {
                    let wl: u64 = shape.iter().product();
                    let w_off = off;
                    off += wl as usize;
                    let b_off = off;
                    off += b;
                    (w_off, b_off)
                }
                None => (off, off),
            };
            layers.push((l, w_off, b_off, idx));
        }
        let features = layers.last().map_or(input, |l| l.0.out_size());
        Arch {
            input,
            features,
            layers,
            num_params: off,
        }
    }

    fn tensor_specs(&self) -> Vec<TensorSpec> {
        let mut out = Vec::new();
        for (l, w_off, b_off, idx) in &self.layers {
            if let Some((shape, b)) = l.param_shapes() {
                out.push(TensorSpec {
                    name: format!("backbone.{idx}.weight"),
                    shape,
                    offset: *w_off as u64,
                });
                out.push(TensorSpec {
                    name: format!("backbone.{idx}.bias"),
                    shape: vec![b as u64],
                    offset: *b_off as u64,
                });
            }
        }
        out
    }
}

/// A built-in architecture with its tasks, on the gemm executor.
#[derive(Clone, Debug, PartialEq)]
pub struct GemmModel {
    kind: BackboneKind,
    tasks: Vec<TaskSpec>,
    layout: Layout,
}

impl GemmModel {
    /// Checks the tasks (see [`validate_tasks`]).
    pub fn new(kind: BackboneKind, tasks: Vec<TaskSpec>) -> Result<GemmModel, TasksError> {
        validate_tasks(&tasks)?;
        let arch = kind.arch();
        let layout = layout_with_heads(arch.tensor_specs(), arch.features, &tasks);
        layout.validate()?;
        Ok(GemmModel {
            kind,
            tasks,
            layout,
        })
    }

    pub fn kind(&self) -> BackboneKind {
        self.kind
    }
}

impl Model for GemmModel {
    fn name(&self) -> &str {
        self.kind.name()
    }
    fn backend(&self) -> Backend {
        Backend::Gemm
    }
    fn input_dim(&self) -> usize {
        self.kind.input_dim()
    }
    fn tasks(&self) -> &[TaskSpec] {
        &self.tasks
    }
    fn layout(&self) -> Layout {
        self.layout.clone()
    }
    fn init(&self, seed: u64) -> ParamGroups {
        let mut p = ParamGroups::new();
        p.insert(
            BACKBONE,
            he_uniform_backbone(&self.layout.groups[0].tensors, seed),
        );
        init_heads(&self.layout, seed, &mut p);
        p
    }
    fn with_tasks(&self, tasks: Vec<TaskSpec>) -> Result<SharedModel, TasksError> {
        Ok(Arc::new(GemmModel::new(self.kind, tasks)?))
    }
    fn train_until(
        &self,
        start: &ParamGroups,
        data: &[TaskData<'_>],
        cfg: &TrainConfig,
        stop: &dyn Fn() -> bool,
    ) -> Result<TrainOutcome, TasksError> {
        let classes = crate::train::check_inputs(self, data, cfg)?;
        let net = GemmNet::from_groups(self, start)?;
        let mut stepper = GemmStepper::new(net, data, &classes, cfg);
        let metrics = crate::train::run_schedule(data, cfg, self.input_dim(), &mut stepper, stop)?;
        Ok(TrainOutcome {
            params: stepper.net.to_groups(),
            metrics,
        })
    }
    fn evaluate(
        &self,
        params: &ParamGroups,
        task: &str,
        data: &Dataset,
        indices: Option<&[usize]>,
    ) -> Result<EvalMetrics, TasksError> {
        let (sub, forward) = self.forward_pass(params, task)?;
        crate::train::eval_loop(&sub, task, data, indices, forward)
    }
    fn logits(
        &self,
        params: &ParamGroups,
        task: &str,
        data: &Dataset,
        indices: Option<&[usize]>,
    ) -> Result<Vec<f32>, TasksError> {
        let (sub, forward) = self.forward_pass(params, task)?;
        crate::train::logits_loop(&sub, task, data, indices, forward)
    }
}

impl GemmModel {
    /// The model of `task` alone and its forward pass on `params`: `(x, n)`
    /// to the `n x classes` logits of the `n` rows of `x`.
    #[allow(clippy::type_complexity)]
    fn forward_pass(
        &self,
        params: &ParamGroups,
        task: &str,
    ) -> Result<
        (
            GemmModel,
            impl FnMut(&[f32], usize) -> Result<Vec<f32>, TasksError>,
        ),
        TasksError,
    > {
        let sub = GemmModel::new(self.kind, vec![crate::train::task_spec(self, task)?])?;
        let net = GemmNet::from_groups(&sub, &crate::train::eval_groups(params, task)?)?;
        let classes = sub.tasks[0].classes;
        let mut ws = Workspace::with_classes(&net.arch, EVAL_BATCH, false, classes);
        let task = task.to_string();
        let forward = move |x: &[f32], n: usize| {
            ws.acts[0][..x.len()].copy_from_slice(x);
            net.forward(&mut ws, n, &task)?;
            Ok(ws.logits[..n * classes].to_vec())
        };
        Ok((sub, forward))
    }
}

/// A gemm model's weights, stored flat: the backbone and one head per task.
#[derive(Clone, Debug, PartialEq)]
pub struct GemmNet {
    model: GemmModel,
    pub(crate) arch: Arch,
    pub(crate) backbone: Vec<f32>,
    /// Head weights then bias, by task name.
    pub(crate) heads: BTreeMap<String, Vec<f32>>,
}

impl PartialEq for Arch {
    fn eq(&self, other: &Self) -> bool {
        self.input == other.input && self.num_params == other.num_params
    }
}

impl GemmNet {
    /// Loads flat groups; `groups` must have exactly `model.layout()`.
    /// A vector of another layout is a [`TasksError::Layout`] error.
    pub fn from_groups(model: &GemmModel, groups: &ParamGroups) -> Result<GemmNet, TasksError> {
        model.layout.check(groups)?;
        let arch = model.kind.arch();
        let heads = model
            .tasks
            .iter()
            .map(|t| (t.name.clone(), vec![0.0; t.classes * (arch.features + 1)]))
            .collect();
        let mut m = GemmNet {
            model: model.clone(),
            backbone: vec![0.0; arch.num_params],
            arch,
            heads,
        };
        m.load_groups(groups)?;
        Ok(m)
    }

    /// Overwrites the groups present in `groups` (a subset of this model's
    /// groups is fine: e.g. a new global backbone, keeping local heads).
    /// Unknown groups and wrong lengths are errors, and nothing is changed
    /// then.
    pub fn load_groups(&mut self, groups: &ParamGroups) -> Result<(), TasksError> {
        for (name, v) in groups.iter() {
            let expected = self.group(name).ok_or_else(|| {
                TasksError::Layout(cohort_protocol::ProtocolError::UnknownGroup(
                    name.to_string(),
                ))
            })?;
            if expected.len() != v.len() {
                return Err(TasksError::Layout(
                    cohort_protocol::ProtocolError::GroupLength {
                        group: name.to_string(),
                        expected: expected.len() as u64,
                        got: v.len() as u64,
                    },
                ));
            }
        }
        for (name, v) in groups.iter() {
            if let Some(dst) = self.group_mut(name) {
                dst.copy_from_slice(v);
            }
        }
        Ok(())
    }

    /// The flat values of group `name`.
    pub fn group(&self, name: &str) -> Option<&[f32]> {
        if name == BACKBONE {
            return Some(&self.backbone);
        }
        let task = cohort_protocol::task_of_group(name)?;
        self.heads.get(task).map(Vec::as_slice)
    }

    pub(crate) fn group_mut(&mut self, name: &str) -> Option<&mut [f32]> {
        if name == BACKBONE {
            return Some(&mut self.backbone);
        }
        let task = cohort_protocol::task_of_group(name)?;
        self.heads.get_mut(task).map(Vec::as_mut_slice)
    }

    /// All groups, flat (copies).
    pub fn to_groups(&self) -> ParamGroups {
        let mut p = ParamGroups::new();
        p.insert(BACKBONE, self.backbone.clone());
        for (t, h) in &self.heads {
            p.insert(head_group(t), h.clone());
        }
        p
    }

    pub fn model(&self) -> &GemmModel {
        &self.model
    }

    /// Class scores of `task` for `n` samples (`features` is `n x dim`,
    /// row-major), as an `n x classes` row-major vector.
    pub fn logits(&self, task: &str, features: &[f32]) -> Result<Vec<f32>, TasksError> {
        let classes = self
            .model
            .task(task)
            .ok_or_else(|| TasksError::UnknownTask(task.into()))?
            .classes;
        let dim = self.arch.input;
        if !features.len().is_multiple_of(dim) {
            return Err(TasksError::DataMismatch(format!(
                "{} features is not a multiple of the input size {dim}",
                features.len()
            )));
        }
        let n = features.len() / dim;
        let mut out = vec![0.0; n * classes];
        let mut ws = Workspace::with_classes(&self.arch, 256, false, classes);
        for (x, o) in features
            .chunks(256 * dim)
            .zip(out.chunks_mut(256 * classes))
        {
            let b = x.len() / dim;
            ws.acts[0][..x.len()].copy_from_slice(x);
            self.forward(&mut ws, b, task)?;
            o.copy_from_slice(&ws.logits[..b * classes]);
        }
        Ok(out)
    }

    /// Forward pass of the `b` samples in `ws.acts[0]` through the backbone
    /// and the head of `task`; leaves the class scores in `ws.logits`.
    pub(crate) fn forward(
        &self,
        ws: &mut Workspace,
        b: usize,
        task: &str,
    ) -> Result<(), TasksError> {
        let head = self
            .heads
            .get(task)
            .ok_or_else(|| TasksError::UnknownTask(task.into()))?;
        for (i, (layer, w_off, b_off, _)) in self.arch.layers.iter().enumerate() {
            let (before, after) = ws.acts.split_at_mut(i + 1);
            let x = &before[i][..b * layer.in_size()];
            let y = &mut after[0][..b * layer.out_size()];
            match *layer {
                Layer::Linear { input, output } => {
                    let w = &self.backbone[*w_off..*w_off + input * output];
                    let bias = &self.backbone[*b_off..*b_off + output];
                    linear_forward(y, x, w, bias, b, input, output);
                    relu(y);
                }
                Layer::Conv { cin, cout, k, h, w } => {
                    let kk = cin * k * k;
                    let cols = &mut ws.cols[i][..b * layer.cols_size()];
                    im2col(cols, x, b, cin, k, h, w);
                    let rows = b * (h + 1 - k) * (w + 1 - k);
                    let wt = &self.backbone[*w_off..*w_off + cout * kk];
                    let bias = &self.backbone[*b_off..*b_off + cout];
                    linear_forward(y, cols, wt, bias, rows, kk, cout);
                    relu(y);
                }
                Layer::Pool { c, h, w } => {
                    maxpool_forward(y, &mut ws.argmax[i][..b * layer.out_size()], x, b, c, h, w);
                }
            }
        }
        let f = self.arch.features;
        let classes = head.len() / (f + 1);
        let feat = &ws.acts[self.arch.layers.len()][..b * f];
        linear_forward(
            &mut ws.logits[..b * classes],
            feat,
            &head[..classes * f],
            &head[classes * f..],
            b,
            f,
            classes,
        );
        Ok(())
    }

    /// Backward pass after [`GemmNet::forward`] with `ws.dlogits` filled.
    /// With [`GradSink::Buffers`] it writes the head gradient to
    /// `ws.grad_head` and, if `backbone`, the backbone gradient to
    /// `ws.grad_backbone`; with [`GradSink::Sgd`] it steps the weights of
    /// the head (if `head`) and of the backbone (if `backbone`) instead.
    pub(crate) fn backward(
        &mut self,
        ws: &mut Workspace,
        b: usize,
        task: &str,
        head: bool,
        backbone: bool,
        sink: GradSink,
    ) {
        let Some(head_w) = self.heads.get_mut(task) else {
            return;
        };
        let f = self.arch.features;
        let classes = head_w.len() / (f + 1);
        let nl = self.arch.layers.len();
        let dlogits = &ws.dlogits[..b * classes];
        let feat = &ws.acts[nl][..b * f];
        // d features = dlogits * W_head, before a fused step changes W_head.
        if backbone {
            matmul(
                &mut ws.dacts[nl][..b * f],
                View::rm(dlogits, b, classes),
                View::rm(&head_w[..classes * f], classes, f),
                false,
            );
        }
        if head || matches!(sink, GradSink::Buffers) {
            let grads = &mut ws.grad_head[..classes * (f + 1)];
            param_step(
                sink,
                head_w,
                grads,
                classes * f,
                dlogits,
                feat,
                b,
                f,
                classes,
            );
        }
        if !backbone {
            return;
        }
        for i in (0..nl).rev() {
            let (layer, w_off, b_off, _) = self.arch.layers[i];
            let (dbefore, dafter) = ws.dacts.split_at_mut(i + 1);
            let dy = &mut dafter[0][..b * layer.out_size()];
            let y = &ws.acts[i + 1][..b * layer.out_size()];
            let x = &ws.acts[i][..b * layer.in_size()];
            let need_dx = i > 0;
            let dx = &mut dbefore[i][..b * layer.in_size()];
            // Each layer's input gradient is taken before its own step.
            match layer {
                Layer::Linear { input, output } => {
                    relu_backward(dy, y);
                    if need_dx {
                        let w = &self.backbone[w_off..w_off + input * output];
                        matmul(
                            dx,
                            View::rm(dy, b, output),
                            View::rm(w, output, input),
                            false,
                        );
                    }
                    let span = w_off..b_off + output;
                    param_step(
                        sink,
                        &mut self.backbone[span.clone()],
                        &mut ws.grad_backbone[span],
                        b_off - w_off,
                        dy,
                        x,
                        b,
                        input,
                        output,
                    );
                }
                Layer::Conv { cin, cout, k, h, w } => {
                    relu_backward(dy, y);
                    let kk = cin * k * k;
                    let rows = b * (h + 1 - k) * (w + 1 - k);
                    let cols = &ws.cols[i][..b * layer.cols_size()];
                    if need_dx {
                        let wt = &self.backbone[w_off..w_off + cout * kk];
                        let dcols = &mut ws.dcols[..b * layer.cols_size()];
                        matmul(
                            dcols,
                            View::rm(dy, rows, cout),
                            View::rm(wt, cout, kk),
                            false,
                        );
                        col2im(dx, dcols, b, cin, k, h, w);
                    }
                    let span = w_off..b_off + cout;
                    param_step(
                        sink,
                        &mut self.backbone[span.clone()],
                        &mut ws.grad_backbone[span],
                        b_off - w_off,
                        dy,
                        cols,
                        rows,
                        kk,
                        cout,
                    );
                }
                Layer::Pool { .. } => {
                    if need_dx {
                        dx.fill(0.0);
                        for (d, &a) in dy.iter().zip(&ws.argmax[i][..dy.len()]) {
                            dx[a as usize] += *d;
                        }
                    }
                }
            }
        }
    }
}

/// Where a backward pass puts a layer's parameter gradient.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum GradSink {
    /// Into the workspace's gradient buffers (overwritten), for an
    /// optimizer step afterwards.
    Buffers,
    /// Straight into the weights, `w -= lr * g`: plain SGD with no decay
    /// and no proximal term, fused into the gradient's matrix product, so
    /// no gradient buffer is written and no second pass reads it.
    Sgd { lr: f32 },
}

/// One layer's parameter gradient, `dW = dy^T x` and `db = column sums of
/// dy`, sent to `sink`. `weights` and `grads` are the layer's `[W, b]`
/// spans (W first, `split` values long).
#[allow(clippy::too_many_arguments)]
fn param_step(
    sink: GradSink,
    weights: &mut [f32],
    grads: &mut [f32],
    split: usize,
    dy: &[f32],
    x: &[f32],
    n: usize,
    input: usize,
    output: usize,
) {
    let (gw, gb) = grads.split_at_mut(split);
    match sink {
        GradSink::Buffers => linear_param_grads(gw, gb, dy, x, n, input, output),
        GradSink::Sgd { lr } => {
            let (w, bias) = weights.split_at_mut(split);
            matmul_add_scaled(w, View::rm_t(dy, n, output), View::rm(x, n, input), -lr);
            column_sums(gb, dy, output);
            for (bi, gi) in bias.iter_mut().zip(gb.iter()) {
                *bi -= lr * *gi;
            }
        }
    }
}

/// `y (n x out) = x (n x in) * W^T + bias`, W row-major `[out, in]`.
fn linear_forward(
    y: &mut [f32],
    x: &[f32],
    w: &[f32],
    bias: &[f32],
    n: usize,
    input: usize,
    output: usize,
) {
    for row in y.chunks_exact_mut(output) {
        row.copy_from_slice(bias);
    }
    matmul(y, View::rm(x, n, input), View::rm_t(w, output, input), true);
}

/// `dW = dy^T x`, `db = column sums of dy` (overwrite).
fn linear_param_grads(
    gw: &mut [f32],
    gb: &mut [f32],
    dy: &[f32],
    x: &[f32],
    n: usize,
    input: usize,
    output: usize,
) {
    matmul(gw, View::rm_t(dy, n, output), View::rm(x, n, input), false);
    column_sums(gb, dy, output);
}

/// `sums[j] = sum over rows of dy[row][j]` (overwrite), rows in order.
fn column_sums(sums: &mut [f32], dy: &[f32], output: usize) {
    sums.fill(0.0);
    for row in dy.chunks_exact(output) {
        for (g, d) in sums.iter_mut().zip(row) {
            *g += *d;
        }
    }
}

fn relu(y: &mut [f32]) {
    for v in y {
        *v = v.max(0.0);
    }
}

fn relu_backward(dy: &mut [f32], y: &[f32]) {
    for (d, v) in dy.iter_mut().zip(y) {
        if *v <= 0.0 {
            *d = 0.0;
        }
    }
}

/// Unfolds `b` channel-last images `h x w x cin` into rows of `k*k*cin`
/// values, one row per output pixel, columns in the weight's
/// `[kh, kw, cin]` order: each kernel row is one contiguous copy.
fn im2col(cols: &mut [f32], x: &[f32], b: usize, cin: usize, k: usize, h: usize, w: usize) {
    let (ho, wo) = (h + 1 - k, w + 1 - k);
    let kk = cin * k * k;
    let span = k * cin;
    let img = h * w * cin;
    let mut rows = cols.chunks_exact_mut(kk);
    for xi in x.chunks_exact(img).take(b) {
        for oi in 0..ho {
            for oj in 0..wo {
                let Some(row) = rows.next() else { return };
                for (di, dst) in row.chunks_exact_mut(span).enumerate() {
                    let at = ((oi + di) * w + oj) * cin;
                    dst.copy_from_slice(&xi[at..at + span]);
                }
            }
        }
    }
}

/// The adjoint of [`im2col`]: sums the column gradients back into pixels.
fn col2im(dx: &mut [f32], dcols: &[f32], b: usize, cin: usize, k: usize, h: usize, w: usize) {
    let (ho, wo) = (h + 1 - k, w + 1 - k);
    let kk = cin * k * k;
    let span = k * cin;
    let img = h * w * cin;
    dx.fill(0.0);
    let mut rows = dcols.chunks_exact(kk);
    for xi in dx.chunks_exact_mut(img).take(b) {
        for oi in 0..ho {
            for oj in 0..wo {
                let Some(row) = rows.next() else { return };
                for (di, src) in row.chunks_exact(span).enumerate() {
                    let at = ((oi + di) * w + oj) * cin;
                    for (d, s) in xi[at..at + span].iter_mut().zip(src) {
                        *d += *s;
                    }
                }
            }
        }
    }
}

/// 2x2 max pooling, stride 2, channel-last; records the winning input index
/// of each output (the first maximum in scan order).
fn maxpool_forward(
    y: &mut [f32],
    argmax: &mut [u32],
    x: &[f32],
    b: usize,
    c: usize,
    h: usize,
    w: usize,
) {
    let (ho, wo) = (h / 2, w / 2);
    let mut out = y.chunks_exact_mut(c).zip(argmax.chunks_exact_mut(c));
    for n in 0..b {
        for oi in 0..ho {
            for oj in 0..wo {
                let Some((yo, ao)) = out.next() else { return };
                let base = |di: usize, dj: usize| ((n * h + 2 * oi + di) * w + 2 * oj + dj) * c;
                let taps = [base(0, 0), base(0, 1), base(1, 0), base(1, 1)];
                yo.copy_from_slice(&x[taps[0]..taps[0] + c]);
                for (a, i) in ao.iter_mut().zip(taps[0]..) {
                    *a = i as u32;
                }
                for &t in &taps[1..] {
                    for ((yv, av), (i, xv)) in yo
                        .iter_mut()
                        .zip(ao.iter_mut())
                        .zip(x[t..t + c].iter().enumerate())
                    {
                        if *xv > *yv {
                            *yv = *xv;
                            *av = (t + i) as u32;
                        }
                    }
                }
            }
        }
    }
}

/// Reused buffers of one forward/backward pass for up to `cap` samples.
#[derive(Debug)]
pub(crate) struct Workspace {
    /// `acts[0]` is the input batch, `acts[i + 1]` the output of layer `i`.
    pub acts: Vec<Vec<f32>>,
    pub cols: Vec<Vec<f32>>,
    pub argmax: Vec<Vec<u32>>,
    pub dacts: Vec<Vec<f32>>,
    pub dcols: Vec<f32>,
    pub logits: Vec<f32>,
    pub dlogits: Vec<f32>,
    pub grad_backbone: Vec<f32>,
    pub grad_head: Vec<f32>,
}

impl Workspace {
    pub fn with_classes(arch: &Arch, cap: usize, train: bool, classes: usize) -> Workspace {
        let mut acts = vec![vec![0.0; cap * arch.input]];
        let mut cols = Vec::new();
        let mut argmax = Vec::new();
        let mut max_cols = 0;
        for (l, ..) in &arch.layers {
            acts.push(vec![0.0; cap * l.out_size()]);
            cols.push(vec![0.0; cap * l.cols_size()]);
            max_cols = max_cols.max(l.cols_size());
            argmax.push(if matches!(l, Layer::Pool { .. }) {
                vec![0; cap * l.out_size()]
            } else {
                Vec::new()
            });
        }
        let (dacts, dcols, grad_backbone, grad_head) = if train {
            (
                acts.iter().map(|a| vec![0.0; a.len()]).collect(),
                vec![0.0; cap * max_cols],
                vec![0.0; arch.num_params],
                vec![0.0; classes * (arch.features + 1)],
            )
        } else {
            (Vec::new(), Vec::new(), Vec::new(), Vec::new())
        };
        Workspace {
            acts,
            cols,
            argmax,
            dacts,
            dcols,
            logits: vec![0.0; cap * classes],
            dlogits: if train {
                vec![0.0; cap * classes]
            } else {
                Vec::new()
            },
            grad_backbone,
            grad_head,
        }
    }
}

/// Optimizer state of one group.
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

/// One optimizer step per batch on the gemm net (see [`crate::train`]).
struct GemmStepper<'a> {
    net: GemmNet,
    ws: Workspace,
    cfg: &'a TrainConfig,
    tasks: Vec<&'a str>,
    classes: Vec<usize>,
    backbone_frozen: bool,
    head_frozen: Vec<bool>,
    bb_state: OptState,
    head_states: Vec<OptState>,
    bb_start: Vec<f32>,
    head_starts: Vec<Vec<f32>>,
    /// `Some(lr)` when the step is plain SGD (no decay, no proximal term):
    /// the backward pass then updates the weights itself.
    fused_sgd: Option<f32>,
}

impl<'a> GemmStepper<'a> {
    fn new(net: GemmNet, data: &[TaskData<'a>], classes: &[usize], cfg: &'a TrainConfig) -> Self {
        let frozen = |g: &str| cfg.frozen.iter().any(|f| f == g);
        let max_classes = classes.iter().copied().max().unwrap_or(2);
        let ws = Workspace::with_classes(&net.arch, cfg.batch_size as usize, true, max_classes);
        GemmStepper {
            ws,
            cfg,
            tasks: data.iter().map(|td| td.task).collect(),
            classes: classes.to_vec(),
            backbone_frozen: frozen(BACKBONE),
            head_frozen: data.iter().map(|td| frozen(&head_group(td.task))).collect(),
            bb_state: OptState::default(),
            head_states: data.iter().map(|_| OptState::default()).collect(),
            bb_start: net.backbone.clone(),
            head_starts: data
                .iter()
                .map(|td| net.heads.get(td.task).cloned().unwrap_or_default())
                .collect(),
            fused_sgd: (cfg.optimizer == Optimizer::Sgd
                && cfg.weight_decay == 0.0
                && cfg.prox_mu == 0.0)
                .then_some(cfg.lr),
            net,
        }
    }
}

impl Stepper for GemmStepper<'_> {
    fn input(&mut self, n: usize) -> &mut [f32] {
        let dim = self.net.arch.input;
        &mut self.ws.acts[0][..n * dim]
    }

    fn step(&mut self, t: usize, labels: &[u32]) -> Result<f64, TasksError> {
        let (n, c, task) = (labels.len(), self.classes[t], self.tasks[t]);
        self.net.forward(&mut self.ws, n, task)?;
        let ws = &mut self.ws;
        let (loss, _) = softmax_xent(
            &ws.logits[..n * c],
            labels,
            c,
            Some(&mut ws.dlogits[..n * c]),
        );
        let train_head = !self.head_frozen[t];
        let backbone = !self.backbone_frozen;
        if !train_head && !backbone {
            return Ok(loss);
        }
        if let Some(lr) = self.fused_sgd {
            self.net
                .backward(ws, n, task, train_head, backbone, GradSink::Sgd { lr });
            return Ok(loss);
        }
        self.net
            .backward(ws, n, task, train_head, backbone, GradSink::Buffers);
        if train_head {
            if let Some(h) = self.net.heads.get_mut(task) {
                let g = &mut ws.grad_head[..h.len()];
                apply_step(
                    h,
                    g,
                    &self.head_starts[t],
                    &mut self.head_states[t],
                    self.cfg,
                );
            }
        }
        if backbone {
            apply_step(
                &mut self.net.backbone,
                &mut ws.grad_backbone,
                &self.bb_start,
                &mut self.bb_state,
                self.cfg,
            );
        }
        Ok(loss)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn layouts_have_the_documented_sizes() {
        let spec = GemmModel::new(
            BackboneKind::Mlp28,
            vec![TaskSpec::new("b", 10), TaskSpec::new("a", 3)],
        )
        .expect("valid");
        let l = spec.layout();
        let names: Vec<&str> = l.group_names().collect();
        assert_eq!(names, ["backbone", "head/a", "head/b"]);
        assert_eq!(l.groups[0].len(), 784 * 256 + 256 + 256 * 128 + 128);
        assert_eq!(l.groups[1].len(), 3 * 128 + 3);
        assert_eq!(l.groups[0].tensors[2].name, "backbone.2.weight");
        assert_eq!(l.groups[0].tensors[2].shape, vec![128, 256]);
        let cnn = GemmModel::new(BackboneKind::Cnn28, vec![TaskSpec::new("a", 10)])
            .expect("valid")
            .layout();
        assert_eq!(
            cnn.groups[0].len(),
            8 * 25 + 8 + 16 * 8 * 25 + 16 + 128 * 256 + 128
        );
        assert_eq!(cnn.groups[0].tensors[4].name, "backbone.7.weight");
    }

    #[test]
    fn pool_and_im2col_worked_by_hand() {
        // one 2x2 image with 1 channel: pool picks the max, argmax its index
        let x = [1.0, 5.0, 3.0, 2.0];
        let mut y = [0.0];
        let mut a = [0u32];
        maxpool_forward(&mut y, &mut a, &x, 1, 1, 2, 2);
        assert_eq!((y[0], a[0]), (5.0, 1));
        // 3x3 image, k=2: four rows of 4 values
        let x: Vec<f32> = (0..9).map(|v| v as f32).collect();
        let mut cols = vec![0.0; 16];
        im2col(&mut cols, &x, 1, 1, 2, 3, 3);
        assert_eq!(&cols[..8], &[0.0, 1.0, 3.0, 4.0, 1.0, 2.0, 4.0, 5.0]);
        let mut dx = vec![0.0; 9];
        col2im(&mut dx, &[1.0; 16], 1, 1, 2, 3, 3);
        assert_eq!(dx, vec![1.0, 2.0, 1.0, 2.0, 4.0, 2.0, 1.0, 2.0, 1.0]);
    }

    #[test]
    fn softmax_xent_worked_by_hand() {
        // two equal scores: loss ln 2, gradient (0.5 - 1, 0.5)
        let mut d = [0.0; 2];
        let (l, c) = softmax_xent(&[0.0, 0.0], &[0], 2, Some(&mut d));
        assert!((l - std::f64::consts::LN_2).abs() < 1e-6);
        assert_eq!(c, 1);
        assert!((d[0] + 0.5).abs() < 1e-6 && (d[1] - 0.5).abs() < 1e-6);
    }

    /// Gradients of every backbone match central finite differences of the
    /// loss (in f64 terms, with a tolerance for f32 rounding).
    #[test]
    fn gradients_match_finite_differences() {
        for kind in BackboneKind::ALL {
            let spec = GemmModel::new(kind, vec![TaskSpec::new("t", 3)]).expect("valid");
            let mut model = GemmNet::from_groups(&spec, &spec.init(7)).expect("layout");
            // non-zero biases so that ReLU boundaries are generic
            let mut rng = ChaCha8Rng::seed_from_u64(3);
            for v in model.backbone.iter_mut() {
                *v += rng.gen_range(-0.01..0.01);
            }
            let b = 3;
            let dim = spec.input_dim();
            let mut ws = Workspace::with_classes(&model.arch, b, true, 3);
            let x: Vec<f32> = (0..b * dim).map(|_| rng.gen_range(0.0..1.0)).collect();
            let labels = [0u32, 2, 1];
            let loss = |m: &GemmNet, ws: &mut Workspace| {
                ws.acts[0][..b * dim].copy_from_slice(&x);
                m.forward(ws, b, "t").expect("forward");
                softmax_xent(&ws.logits[..b * 3], &labels, 3, None).0 / b as f64
            };
            ws.acts[0][..b * dim].copy_from_slice(&x);
            model.forward(&mut ws, b, "t").expect("forward");
            let logits = ws.logits[..b * 3].to_vec();
            softmax_xent(&logits, &labels, 3, Some(&mut ws.dlogits[..b * 3]));
            model.backward(&mut ws, b, "t", true, true, GradSink::Buffers);
            let gb = ws.grad_backbone.clone();
            let gh = ws.grad_head.clone();
            let eps = 1e-3f32;
            let n = model.backbone.len();
            for k in (0..n).step_by((n / 40).max(1)) {
                let orig = model.backbone[k];
                model.backbone[k] = orig + eps;
                let lp = loss(&model, &mut ws);
                model.backbone[k] = orig - eps;
                let lm = loss(&model, &mut ws);
                model.backbone[k] = orig;
                let num = (lp - lm) / (2.0 * f64::from(eps));
                assert!(
                    (num - f64::from(gb[k])).abs() < 2e-3 + 0.05 * num.abs(),
                    "{kind} backbone[{k}]: numeric {num} vs analytic {}",
                    gb[k]
                );
            }
            let hl = model.heads["t"].len();
            #[allow(clippy::needless_range_loop)]
            for k in 0..hl {
                let orig = model.heads["t"][k];
                model.heads.get_mut("t").expect("head")[k] = orig + eps;
                let lp = loss(&model, &mut ws);
                model.heads.get_mut("t").expect("head")[k] = orig - eps;
                let lm = loss(&model, &mut ws);
                model.heads.get_mut("t").expect("head")[k] = orig;
                let num = (lp - lm) / (2.0 * f64::from(eps));
                assert!(
                    (num - f64::from(gh[k])).abs() < 2e-3 + 0.05 * num.abs(),
                    "{kind} head[{k}]"
                );
            }
        }
    }

    /// The fused SGD step (weights updated inside the backward pass) lands
    /// where the buffered gradient plus a separate SGD step lands, for
    /// every backbone, with the head trained or frozen.
    #[test]
    fn fused_sgd_step_matches_the_buffered_step() {
        for kind in BackboneKind::ALL {
            for train_head in [true, false] {
                let spec = GemmModel::new(kind, vec![TaskSpec::new("t", 3)]).expect("valid");
                let start = GemmNet::from_groups(&spec, &spec.init(5)).expect("layout");
                let b = 4;
                let dim = spec.input_dim();
                let mut rng = ChaCha8Rng::seed_from_u64(9);
                let x: Vec<f32> = (0..b * dim).map(|_| rng.gen_range(0.0..1.0)).collect();
                let labels = [0u32, 2, 1, 1];
                let lr = 0.1;
                let run = |sink: GradSink| {
                    let mut net = start.clone();
                    let mut ws = Workspace::with_classes(&net.arch, b, true, 3);
                    ws.acts[0][..b * dim].copy_from_slice(&x);
                    net.forward(&mut ws, b, "t").expect("forward");
                    let logits = ws.logits[..b * 3].to_vec();
                    softmax_xent(&logits, &labels, 3, Some(&mut ws.dlogits[..b * 3]));
                    net.backward(&mut ws, b, "t", train_head, true, sink);
                    if sink == GradSink::Buffers {
                        for (w, g) in net.backbone.iter_mut().zip(&ws.grad_backbone) {
                            *w -= lr * *g;
                        }
                        if train_head {
                            let h = net.heads.get_mut("t").expect("head");
                            for (w, g) in h.iter_mut().zip(&ws.grad_head) {
                                *w -= lr * *g;
                            }
                        }
                    }
                    net
                };
                let (fused, buffered) = (run(GradSink::Sgd { lr }), run(GradSink::Buffers));
                assert_ne!(
                    fused.backbone, start.backbone,
                    "{kind}: the step moved nothing"
                );
                for (a, e) in fused.backbone.iter().zip(&buffered.backbone) {
                    assert!(
                        (a - e).abs() <= 1e-6 * (1.0 + e.abs()),
                        "{kind}: {a} vs {e}"
                    );
                }
                let (fh, bh) = (&fused.heads["t"], &buffered.heads["t"]);
                if train_head {
                    assert_ne!(fh, &start.heads["t"], "{kind}: the head did not move");
                    for (a, e) in fh.iter().zip(bh) {
                        assert!(
                            (a - e).abs() <= 1e-6 * (1.0 + e.abs()),
                            "{kind}: {a} vs {e}"
                        );
                    }
                } else {
                    assert_eq!(fh, &start.heads["t"], "{kind}: a frozen head moved");
                }
            }
        }
    }
}
