//! The dfdx backend: any dfdx 0.13 module on [`Cpu`] as a backbone, heads
//! sized at run time from the tasks' class counts, trained by dfdx's
//! autodiff and dfdx's own per-tensor optimizer kernels
//! ([`SgdConfig::try_update`], [`AdamConfig::try_update`]).
//!
//! Names and layout come from dfdx's `TensorCollection` walk, prefixed with
//! `backbone.`: a tuple `(Linear<784, 256>, ReLU, Linear<256, 128>, ReLU)`
//! has `backbone.0.weight [256, 784]`, `backbone.0.bias`, `backbone.2.weight`,
//! ..., the names of an equivalent `torch.nn.Sequential`. Heads are
//! `head/<task>.weight [classes, features]` and `.bias`, as on the gemm
//! executor.
//!
//! Why the optimizer is ours (built on dfdx's kernels) and not dfdx's
//! `Sgd`/`Adam`: those walk a `TensorCollection`, which a runtime-shaped
//! head cannot join from outside dfdx, and a whole-model `Sgd` would move
//! the heads of tasks without a batch by momentum. Why gradients start from
//! `Gradients::leaky()` every step: `alloc_grads()` keeps only the module's
//! tensors and drops the heads' gradients.
//!
//! FedProx's `mu/2 ||w - w_start||^2` is folded into dfdx's L2 weight decay
//! (`wd + mu`) plus the constant `-mu w_start` added to the gradient, so the
//! kernels stay dfdx's.

pub mod builtin;
pub mod text;

use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;

use cohort_protocol::{head_group, Layout, ParamGroups, TensorSpec, BACKBONE};
use dfdx::nn::tensor_collection::{
    RecursiveWalker, ScalarOptions, TensorCollection, TensorOptions, TensorVisitor, ViewTensorMut,
    ViewTensorName, ViewTensorRef,
};
use dfdx::prelude::*;
use rand::Rng;

use crate::model::{group_rng, he_uniform_backbone, init_heads, layout_with_heads, validate_tasks};
use crate::train::{
    check_inputs, eval_groups, eval_loop, logits_loop, missing_group, run_schedule, task_spec,
};
use crate::train::{EvalMetrics, Stepper, TaskData, TrainOutcome};
use crate::{
    Backend, Dataset, Model, ModelRegistry, Optimizer, SharedModel, TaskSpec, TasksError,
    TrainConfig,
};

/// `n` rows of `N` values.
pub type Rows<const N: usize, T = NoneTape> = Tensor<(usize, Const<N>), f32, Cpu, T>;
/// The tape of a training step.
pub type Tape = OwnedTape<f32, Cpu>;
type Mat<T = NoneTape> = Tensor<(usize, usize), f32, Cpu, T>;
type Vector = Tensor<(usize,), f32, Cpu>;

/// What a built dfdx module must do to serve as a backbone of `IN` inputs
/// and `F` features: be walkable (names, load, flatten, optimizer), run
/// forward without a tape (evaluation) and with one (training; `ModuleMut`,
/// so that dropout is active). Every dfdx module built from `Linear`,
/// `ReLU`/`GeLU`/`Tanh`..., `LayerNorm1D`, `DropoutOneIn<N>` (drops 1 in
/// `N`; the `Dropout` builder is always p = 0.5, a type cannot carry its
/// `p`), `Residual` and tuples of them qualifies; implemented automatically.
pub trait DfdxBackbone<const IN: usize, const F: usize>:
    TensorCollection<f32, Cpu>
    + Module<Rows<IN>, Output = Rows<F>>
    + ModuleMut<Rows<IN, Tape>, Output = Rows<F, Tape>>
    + Clone
    + Send
    + Sync
    + fmt::Debug
    + 'static
{
}

impl<M, const IN: usize, const F: usize> DfdxBackbone<IN, F> for M where
    M: TensorCollection<f32, Cpu>
        + Module<Rows<IN>, Output = Rows<F>>
        + ModuleMut<Rows<IN, Tape>, Output = Rows<F, Tape>>
        + Clone
        + Send
        + Sync
        + fmt::Debug
        + 'static
{
}

/// How a dfdx model's backbone starts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DfdxInit {
    /// dfdx's own initialization of each module (`Linear`: `U(±1/sqrt(in))`,
    /// `LayerNorm1D`: gamma 1, beta 0, ...) on a device seeded from the seed.
    #[default]
    Module,
    /// The built-in architectures' He-uniform rule (that of the gemm
    /// executor), so that a backend switch does not change the start.
    HeUniform,
}

fn device_err<E: fmt::Debug>(e: E) -> TasksError {
    TasksError::Backend(format!("dfdx: {e:?}"))
}

/// A dfdx module type `B` (a builder, e.g. `(Linear<784, 256>, ReLU)`) as
/// a backbone of `IN` inputs and `F` features, with a runtime head per
/// task. See `examples/own-model` for a user's own architecture.
pub struct DfdxModel<B, const IN: usize, const F: usize> {
    name: String,
    tasks: Vec<TaskSpec>,
    layout: Layout,
    init: DfdxInit,
    _builder: PhantomData<fn() -> B>,
}

impl<B, const IN: usize, const F: usize> Clone for DfdxModel<B, IN, F> {
    fn clone(&self) -> Self {
        DfdxModel {
            name: self.name.clone(),
            tasks: self.tasks.clone(),
            layout: self.layout.clone(),
            init: self.init,
            _builder: PhantomData,
        }
    }
}

impl<B, const IN: usize, const F: usize> fmt::Debug for DfdxModel<B, IN, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DfdxModel")
            .field("name", &self.name)
            .field("input", &IN)
            .field("features", &F)
            .field("tasks", &self.tasks)
            .finish()
    }
}

impl<B, const IN: usize, const F: usize> DfdxModel<B, IN, F>
where
    B: BuildOnDevice<Cpu, f32> + 'static,
    B::Built: DfdxBackbone<IN, F>,
{
    /// The architecture `B` called `name`, with a head for each task.
    pub fn new(name: &str, tasks: Vec<TaskSpec>) -> Result<Self, TasksError> {
        validate_tasks(&tasks)?;
        let layout = layout_with_heads(Self::backbone_tensors(), F, &tasks);
        layout.validate()?;
        Ok(DfdxModel {
            name: name.to_string(),
            tasks,
            layout,
            init: DfdxInit::default(),
            _builder: PhantomData,
        })
    }

    /// The same model with another initialization rule.
    pub fn with_init(mut self, init: DfdxInit) -> Self {
        self.init = init;
        self
    }

    /// The backbone's tensors (names, shapes, offsets), from the type alone.
    pub fn backbone_tensors() -> Vec<TensorSpec> {
        let mut v = Namer { specs: Vec::new() };
        // Naming visits no tensor data and cannot fail.
        let _ = B::Built::iter_tensors(&mut RecursiveWalker {
            m: String::new(),
            f: &mut v,
        });
        v.specs
    }

    /// A module holding `flat` (the `backbone` group), bit for bit. A
    /// vector of another length is a [`TasksError::Layout`] error.
    pub fn load_backbone(&self, dev: &Cpu, flat: &[f32]) -> Result<B::Built, TasksError> {
        let expected = self.layout.groups[0].len();
        if flat.len() as u64 != expected {
            return Err(TasksError::Layout(
                cohort_protocol::ProtocolError::GroupLength {
                    group: BACKBONE.to_string(),
                    expected,
                    got: flat.len() as u64,
                },
            ));
        }
        let mut m = dev.try_build_module::<B, f32>().map_err(device_err)?;
        let mut v = Loader { src: flat, pos: 0 };
        B::Built::iter_tensors(&mut RecursiveWalker {
            m: &mut m,
            f: &mut v,
        })
        .map_err(device_err)?;
        Ok(m)
    }

    /// The module's tensors end to end in walk order (the `backbone` group).
    pub fn flatten_backbone(m: &B::Built) -> Vec<f32> {
        let mut v = Flattener { data: Vec::new() };
        // Copying out of CPU tensors cannot fail.
        let _ = B::Built::iter_tensors(&mut RecursiveWalker {
            m: (m, String::new()),
            f: &mut v,
        });
        v.data
    }

    fn init_backbone(&self, seed: u64) -> Result<Vec<f32>, TasksError> {
        Ok(match self.init {
            DfdxInit::HeUniform => he_uniform_backbone(&self.layout.groups[0].tensors, seed),
            DfdxInit::Module => {
                let dev = Cpu::seed_from_u64(group_rng(seed, BACKBONE).gen());
                let m = dev.try_build_module::<B, f32>().map_err(device_err)?;
                Self::flatten_backbone(&m)
            }
        })
    }

    fn load_head(
        &self,
        dev: &Cpu,
        params: &ParamGroups,
        task: &str,
    ) -> Result<DynHead, TasksError> {
        let classes = task_spec(self, task)?.classes;
        let g = head_group(task);
        let v = params.get(&g).ok_or_else(|| missing_group(&g))?;
        if v.len() != classes * (F + 1) {
            return Err(TasksError::Layout(
                cohort_protocol::ProtocolError::GroupLength {
                    group: g,
                    expected: (classes * (F + 1)) as u64,
                    got: v.len() as u64,
                },
            ));
        }
        Ok(DynHead {
            weight: dev.tensor_from_vec(v[..classes * F].to_vec(), (classes, F)),
            bias: dev.tensor_from_vec(v[classes * F..].to_vec(), (classes,)),
        })
    }

    /// The forward pass of `task` on `params`: `(x, n)` to the
    /// `n x classes` logits of the `n` rows of `x`.
    fn forward_pass(
        &self,
        params: &ParamGroups,
        task: &str,
    ) -> Result<impl FnMut(&[f32], usize) -> Result<Vec<f32>, TasksError>, TasksError> {
        let groups = eval_groups(params, task)?;
        let dev = Cpu::seed_from_u64(0);
        let backbone = self.load_backbone(&dev, groups.get(BACKBONE).unwrap_or(&[]))?;
        let head = self.load_head(&dev, &groups, task)?;
        Ok(move |x: &[f32], n: usize| {
            let x = dev
                .try_tensor_from_vec(x.to_vec(), (n, Const::<IN>))
                .map_err(device_err)?;
            let f = backbone.try_forward(x).map_err(device_err)?;
            Ok(head.forward(f.realize::<(usize, usize)>()).as_vec())
        })
    }
}

impl<B, const IN: usize, const F: usize> Model for DfdxModel<B, IN, F>
where
    B: BuildOnDevice<Cpu, f32> + 'static,
    B::Built: DfdxBackbone<IN, F>,
{
    fn name(&self) -> &str {
        &self.name
    }
    fn backend(&self) -> Backend {
        Backend::Dfdx
    }
    fn input_dim(&self) -> usize {
        IN
    }
    fn tasks(&self) -> &[TaskSpec] {
        &self.tasks
    }
    fn layout(&self) -> Layout {
        self.layout.clone()
    }
    fn init(&self, seed: u64) -> ParamGroups {
        let mut p = ParamGroups::new();
        // Building a CPU module fails only when memory does; an empty
        // backbone then fails every layout check downstream.
        p.insert(BACKBONE, self.init_backbone(seed).unwrap_or_default());
        init_heads(&self.layout, seed, &mut p);
        p
    }
    fn with_tasks(&self, tasks: Vec<TaskSpec>) -> Result<SharedModel, TasksError> {
        Ok(Arc::new(
            DfdxModel::<B, IN, F>::new(&self.name, tasks)?.with_init(self.init),
        ))
    }
    fn train_until(
        &self,
        start: &ParamGroups,
        data: &[TaskData<'_>],
        cfg: &TrainConfig,
        stop: &dyn Fn() -> bool,
    ) -> Result<TrainOutcome, TasksError> {
        let classes = check_inputs(self, data, cfg)?;
        self.layout.check(start)?;
        // The device's generator drives dropout: seeded per training run.
        let dev = Cpu::seed_from_u64(cfg.seed ^ 0xD20F_0D70);
        let bb_start = start.get(BACKBONE).unwrap_or(&[]);
        let backbone = self.load_backbone(&dev, bb_start)?;
        let heads = data
            .iter()
            .map(|td| self.load_head(&dev, start, td.task))
            .collect::<Result<Vec<_>, _>>()?;
        let mut stepper = DfdxStepper::<B::Built, IN, F>::new(
            dev,
            backbone,
            heads,
            Prox::new(
                cfg,
                &self.layout.groups[0].tensors,
                F,
                bb_start,
                start,
                data,
            ),
            data,
            classes,
            cfg,
        );
        let metrics = run_schedule(data, cfg, IN, &mut stepper, stop)?;
        let mut params = start.clone();
        params.insert(BACKBONE, Self::flatten_backbone(&stepper.backbone));
        for (td, h) in data.iter().zip(&stepper.heads) {
            params.insert(head_group(td.task), h.flatten());
        }
        Ok(TrainOutcome { params, metrics })
    }
    fn evaluate(
        &self,
        params: &ParamGroups,
        task: &str,
        data: &Dataset,
        indices: Option<&[usize]>,
    ) -> Result<EvalMetrics, TasksError> {
        eval_loop(self, task, data, indices, self.forward_pass(params, task)?)
    }
    fn logits(
        &self,
        params: &ParamGroups,
        task: &str,
        data: &Dataset,
        indices: Option<&[usize]>,
    ) -> Result<Vec<f32>, TasksError> {
        logits_loop(self, task, data, indices, self.forward_pass(params, task)?)
    }
}

impl ModelRegistry {
    /// Registers the dfdx module type `B` (a builder tuple) under `name`
    /// on the dfdx backend, initialized by dfdx's own rules. `IN` and `F`
    /// are its input and feature widths (checked at compile time). A name
    /// registered before (a built-in one too) is replaced on the dfdx
    /// backend.
    pub fn register_dfdx<B, const IN: usize, const F: usize>(
        &mut self,
        name: &str,
        description: &str,
    ) where
        B: BuildOnDevice<Cpu, f32> + 'static,
        B::Built: DfdxBackbone<IN, F>,
    {
        self.register_dfdx_with::<B, IN, F>(name, description, DfdxInit::Module);
    }

    /// [`ModelRegistry::register_dfdx`] with another initialization rule.
    pub fn register_dfdx_with<B, const IN: usize, const F: usize>(
        &mut self,
        name: &str,
        description: &str,
        init: DfdxInit,
    ) where
        B: BuildOnDevice<Cpu, f32> + 'static,
        B::Built: DfdxBackbone<IN, F>,
    {
        let owned = name.to_string();
        self.register(name, Backend::Dfdx, description, move |tasks| {
            Ok(Arc::new(
                DfdxModel::<B, IN, F>::new(&owned, tasks)?.with_init(init),
            ))
        });
    }
}

/// A linear head whose class count is known only at run time
/// (`x W^T + b`, weight `[classes, features]` as dfdx's `Linear`).
#[derive(Clone, Debug)]
struct DynHead {
    weight: Mat,
    bias: Vector,
}

impl DynHead {
    fn forward<T: dfdx::tensor::Tape<f32, Cpu> + Merge<NoneTape>>(&self, x: Mat<T>) -> Mat<T> {
        let shape = (x.shape().0, self.weight.shape().0);
        let y = x.matmul(self.weight.clone().permute::<(usize, usize), Axes2<1, 0>>());
        y + self.bias.clone().broadcast_like::<_, Axis<0>>(&shape)
    }

    fn flatten(&self) -> Vec<f32> {
        let mut v = self.weight.as_vec();
        v.extend(self.bias.as_vec());
        v
    }
}

/// FedProx's constant part, `-mu w_start`, per tensor (backbone tensors in
/// walk order; each head's weight and bias), when `mu > 0`.
struct Prox {
    backbone: Vec<Vec<f32>>,
    heads: Vec<[Vec<f32>; 2]>,
}

impl Prox {
    fn new(
        cfg: &TrainConfig,
        tensors: &[TensorSpec],
        features: usize,
        bb_start: &[f32],
        start: &ParamGroups,
        data: &[TaskData<'_>],
    ) -> Option<Prox> {
        if cfg.prox_mu == 0.0 {
            return None;
        }
        let mu = cfg.prox_mu;
        let scaled = |v: &[f32]| v.iter().map(|w| -mu * w).collect::<Vec<f32>>();
        let backbone = tensors
            .iter()
            .map(|t| {
                let (o, n) = (t.offset as usize, t.shape.iter().product::<u64>() as usize);
                scaled(&bb_start[o..o + n])
            })
            .collect();
        let heads = data
            .iter()
            .map(|td| {
                let h = start.get(&head_group(td.task)).unwrap_or(&[]);
                let split = h.len() / (features + 1) * features;
                [scaled(&h[..split]), scaled(&h[split..])]
            })
            .collect();
        Some(Prox { backbone, heads })
    }
}

/// dfdx's kernel for the plan's optimizer, with its state keyed by tensor.
struct DfdxOpt {
    kernel: Kernel,
    m1: Gradients<f32, Cpu>,
    m2: Gradients<f32, Cpu>,
}

#[derive(Clone, Copy)]
enum Kernel {
    Sgd(SgdConfig),
    Adam(AdamConfig),
}

impl DfdxOpt {
    fn new(cfg: &TrainConfig) -> DfdxOpt {
        let decay = f64::from(cfg.weight_decay) + f64::from(cfg.prox_mu);
        let weight_decay = (decay != 0.0).then_some(WeightDecay::L2(decay));
        let lr = f64::from(cfg.lr);
        let kernel = match cfg.optimizer {
            Optimizer::Sgd => Kernel::Sgd(SgdConfig {
                lr,
                momentum: None,
                weight_decay,
            }),
            Optimizer::Momentum { momentum, nesterov } => Kernel::Sgd(SgdConfig {
                lr,
                momentum: Some(if nesterov {
                    Momentum::Nesterov(f64::from(momentum))
                } else {
                    Momentum::Classic(f64::from(momentum))
                }),
                weight_decay,
            }),
            Optimizer::Adam { beta1, beta2, eps } => Kernel::Adam(AdamConfig {
                lr,
                betas: [f64::from(beta1), f64::from(beta2)],
                eps: f64::from(eps),
                weight_decay,
            }),
        };
        DfdxOpt {
            kernel,
            m1: Gradients::leaky(),
            m2: Gradients::leaky(),
        }
    }

    /// One step of tensor `p` (its `t`-th step) from its gradient in
    /// `grads`, after adding `prox` to that gradient.
    fn update<S: Shape>(
        &mut self,
        p: &mut Tensor<S, f32, Cpu>,
        grads: &mut Gradients<f32, Cpu>,
        prox: Option<&[f32]>,
        t: i32,
    ) -> Result<(), CpuError> {
        let g = grads.get_or_alloc_mut(&*p)?;
        if let Some(c) = prox {
            for (gi, ci) in g.iter_mut().zip(c) {
                *gi += *ci;
            }
        }
        match self.kernel {
            Kernel::Sgd(cfg) => {
                let v = self.m1.get_or_alloc_mut(&*p)?;
                cfg.try_update(p, v, g)
            }
            Kernel::Adam(cfg) => {
                let m = self.m1.get_or_alloc_mut(&*p)?;
                let v = self.m2.get_or_alloc_mut(&*p)?;
                cfg.try_update(t, p, m, v, g)
            }
        }
    }
}

/// One optimizer step per batch with dfdx (see [`crate::train`]).
struct DfdxStepper<M, const IN: usize, const F: usize> {
    dev: Cpu,
    backbone: M,
    heads: Vec<DynHead>,
    opt: DfdxOpt,
    prox: Option<Prox>,
    classes: Vec<usize>,
    backbone_frozen: bool,
    head_frozen: Vec<bool>,
    backbone_steps: i32,
    head_steps: Vec<i32>,
    x: Vec<f32>,
}

impl<M: DfdxBackbone<IN, F>, const IN: usize, const F: usize> DfdxStepper<M, IN, F> {
    fn new(
        dev: Cpu,
        backbone: M,
        heads: Vec<DynHead>,
        prox: Option<Prox>,
        data: &[TaskData<'_>],
        classes: Vec<usize>,
        cfg: &TrainConfig,
    ) -> Self {
        let frozen = |g: &str| cfg.frozen.iter().any(|f| f == g);
        DfdxStepper {
            dev,
            backbone,
            opt: DfdxOpt::new(cfg),
            prox,
            classes,
            backbone_frozen: frozen(BACKBONE),
            head_frozen: data.iter().map(|td| frozen(&head_group(td.task))).collect(),
            backbone_steps: 0,
            head_steps: vec![0; heads.len()],
            heads,
            x: Vec::new(),
        }
    }

    fn update_backbone(&mut self, grads: &mut Gradients<f32, Cpu>) -> Result<(), TasksError> {
        self.backbone_steps = self.backbone_steps.saturating_add(1);
        let mut v = UpdateVisitor {
            opt: &mut self.opt,
            grads,
            prox: self.prox.as_ref().map(|p| p.backbone.as_slice()),
            index: 0,
            t: self.backbone_steps,
        };
        M::iter_tensors(&mut RecursiveWalker {
            m: &mut self.backbone,
            f: &mut v,
        })
        .map_err(device_err)?;
        Ok(())
    }

    fn update_head(&mut self, t: usize, grads: &mut Gradients<f32, Cpu>) -> Result<(), TasksError> {
        self.head_steps[t] = self.head_steps[t].saturating_add(1);
        let steps = self.head_steps[t];
        let prox = self.prox.as_ref().map(|p| &p.heads[t]);
        let h = &mut self.heads[t];
        self.opt
            .update(&mut h.weight, grads, prox.map(|p| p[0].as_slice()), steps)
            .map_err(device_err)?;
        self.opt
            .update(&mut h.bias, grads, prox.map(|p| p[1].as_slice()), steps)
            .map_err(device_err)
    }
}

impl<M: DfdxBackbone<IN, F>, const IN: usize, const F: usize> Stepper for DfdxStepper<M, IN, F> {
    fn input(&mut self, n: usize) -> &mut [f32] {
        self.x.resize(n * IN, 0.0);
        &mut self.x
    }

    fn step(&mut self, t: usize, labels: &[u32]) -> Result<f64, TasksError> {
        let n = labels.len();
        let x = self
            .dev
            .try_tensor_from_vec(std::mem::take(&mut self.x), (n, Const::<IN>))
            .map_err(device_err)?;
        let features: Rows<F, Tape> = if self.backbone_frozen {
            // A frozen backbone is a feature extractor: no tape through it.
            let f = self.backbone.try_forward(x).map_err(device_err)?;
            f.traced(Gradients::leaky())
        } else {
            self.backbone
                .try_forward_mut(x.traced(Gradients::leaky()))
                .map_err(device_err)?
        };
        let c = self.classes[t];
        let logits = self.heads[t].forward(features.realize::<(usize, usize)>());
        let targets = one_hot(&self.dev, labels, c)?;
        let loss = cross_entropy_with_logits_loss(logits, targets);
        let mean = loss.array();
        let mut grads = loss.backward();
        if !self.head_frozen[t] {
            self.update_head(t, &mut grads)?;
        }
        if !self.backbone_frozen {
            self.update_backbone(&mut grads)?;
        }
        Ok(f64::from(mean) * n as f64)
    }
}

fn one_hot(dev: &Cpu, labels: &[u32], classes: usize) -> Result<Mat, TasksError> {
    let mut v = vec![0.0f32; labels.len() * classes];
    for (i, &y) in labels.iter().enumerate() {
        v[i * classes + y as usize] = 1.0;
    }
    dev.try_tensor_from_vec(v, (labels.len(), classes))
        .map_err(device_err)
}

/// Applies the optimizer to every trainable tensor of a module, in walk
/// order (the order of [`Prox::backbone`]).
struct UpdateVisitor<'a> {
    opt: &'a mut DfdxOpt,
    grads: &'a mut Gradients<f32, Cpu>,
    prox: Option<&'a [Vec<f32>]>,
    index: usize,
    t: i32,
}

impl TensorVisitor<f32, Cpu> for UpdateVisitor<'_> {
    type Viewer = ViewTensorMut;
    type Err = CpuError;
    type E2 = f32;
    type D2 = Cpu;

    fn visit<S: Shape>(
        &mut self,
        opts: TensorOptions<S, f32, Cpu>,
        p: &mut Tensor<S, f32, Cpu>,
    ) -> Result<Option<Tensor<S, f32, Cpu>>, Self::Err> {
        let i = self.index;
        self.index += 1;
        if opts.do_gradient_update {
            let prox = self.prox.and_then(|v| v.get(i)).map(Vec::as_slice);
            self.opt.update(p, self.grads, prox, self.t)?;
        }
        Ok(None)
    }
}

/// Names and shapes from the type alone (the viewer needs no instance).
struct Namer {
    specs: Vec<TensorSpec>,
}

impl TensorVisitor<f32, Cpu> for Namer {
    type Viewer = ViewTensorName;
    type Err = CpuError;
    type E2 = f32;
    type D2 = Cpu;

    fn visit<S: Shape>(
        &mut self,
        opts: TensorOptions<S, f32, Cpu>,
        name: String,
    ) -> Result<Option<Tensor<S, f32, Cpu>>, Self::Err> {
        let shape: Vec<u64> = opts
            .shape
            .concrete()
            .into_iter()
            .map(|d| d as u64)
            .collect();
        let offset = self
            .specs
            .last()
            .map_or(0, |t| t.offset + t.shape.iter().product::<u64>());
        self.specs.push(TensorSpec {
            name: format!("{BACKBONE}.{name}"),
            shape,
            offset,
        });
        Ok(None)
    }
}

struct Flattener {
    data: Vec<f32>,
}

impl TensorVisitor<f32, Cpu> for Flattener {
    type Viewer = (ViewTensorRef, ViewTensorName);
    type Err = CpuError;
    type E2 = f32;
    type D2 = Cpu;

    fn visit<S: Shape>(
        &mut self,
        _opts: TensorOptions<S, f32, Cpu>,
        (t, _name): (&Tensor<S, f32, Cpu>, String),
    ) -> Result<Option<Tensor<S, f32, Cpu>>, Self::Err> {
        let off = self.data.len();
        self.data.resize(off + t.shape().num_elements(), 0.0);
        t.copy_into(&mut self.data[off..]);
        Ok(None)
    }

    fn visit_scalar<N: num_traits::NumCast>(
        &mut self,
        opts: ScalarOptions<N>,
        _h: (&N, String),
    ) -> Result<Option<N>, Self::Err> {
        // Scalars (BatchNorm's momentum and epsilon) are settings, not weights.
        Ok(Some(opts.default))
    }
}

struct Loader<'a> {
    src: &'a [f32],
    pos: usize,
}

impl TensorVisitor<f32, Cpu> for Loader<'_> {
    type Viewer = ViewTensorMut;
    type Err = CpuError;
    type E2 = f32;
    type D2 = Cpu;

    fn visit<S: Shape>(
        &mut self,
        _opts: TensorOptions<S, f32, Cpu>,
        t: &mut Tensor<S, f32, Cpu>,
    ) -> Result<Option<Tensor<S, f32, Cpu>>, Self::Err> {
        // The caller checked the total length against the layout, which
        // has these tensors' sizes.
        let end = self.pos + t.shape().num_elements();
        if let Some(src) = self.src.get(self.pos..end) {
            t.copy_from(src);
        }
        self.pos = end;
        Ok(None)
    }

    fn visit_scalar<N: num_traits::NumCast>(
        &mut self,
        _opts: ScalarOptions<N>,
        _h: &mut N,
    ) -> Result<Option<N>, Self::Err> {
        Ok(None)
    }
}
