//! Cross-check against dfdx 0.13's autodiff and optimizer: the same weights,
//! data and SGD-with-momentum steps give the same model (to f32 rounding)
//! with `Model::train` and with a plain dfdx `Linear`/`ReLU` network trained
//! by dfdx's own `Sgd`. Checked for the gemm executor (hand-written
//! gradients) and for the dfdx backend (runtime heads, our optimizer
//! plumbing around dfdx's kernels).

use cohort_tasks::{builtin, Backend, ModelRegistry, TaskData, TaskSpec, TrainConfig, BACKBONE};
use dfdx::optim::{Momentum, Optimizer as _, Sgd, SgdConfig};
use dfdx::prelude::*;

type Net = (Linear<4, 32>, ReLU, Linear<32, 32>, ReLU, Linear<32, 3>);

#[test]
fn two_momentum_steps_match_dfdx() {
    let split = builtin("penguins/species").expect("penguins");
    let data = &split.train;
    let n = data.len();
    let registry = ModelRegistry::default();
    let tasks = vec![TaskSpec::new("species", 3)];
    let start = registry
        .build("mlp_tab4", Backend::Gemm, tasks.clone())
        .expect("mlp_tab4")
        .init(17);
    let bb = start.get(BACKBONE).expect("backbone");
    let head = start.get("head/species").expect("head");

    let dev: Cpu = Default::default();
    let mut net = dev.build_module::<Net, f32>();
    net.0.weight.copy_from(&bb[0..128]);
    net.0.bias.copy_from(&bb[128..160]);
    net.2.weight.copy_from(&bb[160..1184]);
    net.2.bias.copy_from(&bb[1184..1216]);
    net.4.weight.copy_from(&head[0..96]);
    net.4.bias.copy_from(&head[96..99]);

    // One full batch per step, so the sample order of `train` does not matter.
    let (lr, momentum) = (0.1f32, 0.9f32);
    let mut opt = Sgd::new(
        &net,
        SgdConfig {
            lr: f64::from(lr),
            momentum: Some(Momentum::Classic(f64::from(momentum))),
            weight_decay: None,
        },
    );
    let mut onehot = vec![0.0f32; n * 3];
    for (i, &y) in data.labels.iter().enumerate() {
        onehot[i * 3 + y as usize] = 1.0;
    }
    let mut grads = net.alloc_grads();
    for _ in 0..2 {
        let x = dev.tensor_from_vec(data.features.clone(), (n, Const::<4>));
        let y = dev.tensor_from_vec(onehot.clone(), (n, Const::<3>));
        let logits = net.forward_mut(x.traced(grads));
        let loss = cross_entropy_with_logits_loss(logits, y);
        grads = loss.backward();
        opt.update(&mut net, &grads).expect("dfdx update");
        net.zero_grads(&mut grads);
    }

    let idx: Vec<usize> = (0..n).collect();
    let cfg = TrainConfig {
        epochs: 2,
        batch_size: n as u32,
        lr,
        optimizer: cohort_tasks::Optimizer::Momentum {
            momentum,
            nesterov: false,
        },
        ..TrainConfig::default()
    };
    for backend in [Backend::Gemm, Backend::Dfdx] {
        let spec = registry
            .build("mlp_tab4", backend, tasks.clone())
            .expect("mlp_tab4");
        assert_eq!(spec.init(17), start, "{backend}: the same start");
        let out = spec
            .train(
                &start,
                &[TaskData {
                    task: "species",
                    data,
                    indices: &idx,
                }],
                &cfg,
            )
            .expect("train");
        check_against_dfdx(&net, &out.params, bb, backend);
    }
}

/// The trained `params` equal the reference `net`'s weights to f32
/// rounding, and moved away from the start `bb`.
fn check_against_dfdx(
    net: &<Net as BuildOnDevice<Cpu, f32>>::Built,
    params: &cohort_tasks::ParamGroups,
    bb: &[f32],
    backend: Backend,
) {
    let ours_bb = params.get(BACKBONE).expect("backbone");
    let ours_head = params.get("head/species").expect("head");

    let theirs: Vec<(Vec<f32>, &[f32])> = vec![
        (net.0.weight.as_vec(), &ours_bb[0..128]),
        (net.0.bias.as_vec(), &ours_bb[128..160]),
        (net.2.weight.as_vec(), &ours_bb[160..1184]),
        (net.2.bias.as_vec(), &ours_bb[1184..1216]),
        (net.4.weight.as_vec(), &ours_head[0..96]),
        (net.4.bias.as_vec(), &ours_head[96..99]),
    ];
    let mut moved = 0.0f32;
    for (k, (t, o)) in theirs.iter().enumerate() {
        for (i, (a, b)) in t.iter().zip(o.iter()).enumerate() {
            assert!(
                (a - b).abs() <= 1e-5 + 1e-4 * a.abs(),
                "{backend}: tensor {k}[{i}]: dfdx {a} vs ours {b}"
            );
        }
    }
    for (a, b) in ours_bb.iter().zip(bb) {
        moved = moved.max((a - b).abs());
    }
    assert!(
        moved > 1e-3,
        "{backend}: the two steps must change the weights ({moved})"
    );
}
