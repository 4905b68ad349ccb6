//! Writes a real delta for `compression_table`: an MLP 784-256-128-10
//! (ReLU) after one epoch of plain SGD (batch 32, lr 0.05, softmax
//! cross-entropy) on an MNIST CSV (784 pixels 0..255, then the label), as
//! raw little-endian `f32` (`W_after - W_before`, all parameters).
//! Plain Rust, no dfdx: `protocol` stays free of the learning side.
//!
//! `zcat mnist_5k.csv.gz > /tmp/mnist_5k.csv`
//! `cargo run -p cohort-protocol --release --example mlp_delta -- /tmp/mnist_5k.csv /tmp/delta.f32`

use std::error::Error;
use std::io::{BufRead, Write};

struct Layer {
    w: Vec<f32>,
    b: Vec<f32>,
    inputs: usize,
}

/// xorshift64: enough for an initialization and a shuffle.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32) / ((1u64 << 24) as f32)
    }
}

fn flat(layers: &[Layer]) -> Vec<f32> {
    layers
        .iter()
        .flat_map(|l| l.w.iter().chain(&l.b).copied())
        .collect()
}

fn main() -> Result<(), Box<dyn Error>> {
    let mut args = std::env::args().skip(1);
    let (input, output) = match (args.next(), args.next()) {
        (Some(i), Some(o)) => (i, o),
        _ => return Err("usage: mlp_delta <mnist.csv> <out.f32>".into()),
    };
    let mut xs = Vec::new();
    let mut ys = Vec::new();
    for line in std::io::BufReader::new(std::fs::File::open(&input)?).lines() {
        let v: Vec<f32> = line?
            .split(',')
            .map(|s| s.trim().parse())
            .collect::<Result<_, _>>()?;
        if v.len() != 785 || !(0.0..10.0).contains(&v[784]) {
            return Err(format!("{input}: expected 784 pixels and a label 0-9 per row").into());
        }
        ys.push(v[784] as usize);
        xs.push(v[..784].iter().map(|p| p / 255.0).collect::<Vec<f32>>());
    }
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let dims = [784usize, 256, 128, 10];
    let mut layers: Vec<Layer> = dims
        .windows(2)
        .map(|d| {
            let s = 1.0 / (d[0] as f32).sqrt();
            Layer {
                w: (0..d[0] * d[1])
                    .map(|_| (rng.next() * 2.0 - 1.0) * s)
                    .collect(),
                b: (0..d[1]).map(|_| (rng.next() * 2.0 - 1.0) * s).collect(),
                inputs: d[0],
            }
        })
        .collect();
    let before = flat(&layers);
    let n = xs.len();
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (rng.next() * (i + 1) as f32) as usize % (i + 1);
        order.swap(i, j);
    }
    let (lr, batch_size) = (0.05f32, 32usize);
    let mut loss_sum = 0.0f64;
    for batch in order.chunks(batch_size) {
        let mut gw: Vec<Vec<f32>> = layers.iter().map(|l| vec![0.0; l.w.len()]).collect();
        let mut gb: Vec<Vec<f32>> = layers.iter().map(|l| vec![0.0; l.b.len()]).collect();
        for &s in batch {
            let mut acts = vec![xs[s].clone()];
            for (li, l) in layers.iter().enumerate() {
                let a = &acts[li];
                let mut z = l.b.clone();
                for (o, zo) in z.iter_mut().enumerate() {
                    let row = &l.w[o * l.inputs..(o + 1) * l.inputs];
                    *zo += row.iter().zip(a).map(|(w, x)| w * x).sum::<f32>();
                }
                if li + 1 < layers.len() {
                    z.iter_mut().for_each(|v| *v = v.max(0.0));
                }
                acts.push(z);
            }
            let logits = &acts[layers.len()];
            let m = logits.iter().fold(f32::MIN, |a, b| a.max(*b));
            let e: Vec<f32> = logits.iter().map(|v| (v - m).exp()).collect();
            let se: f32 = e.iter().sum();
            loss_sum -= f64::from((e[ys[s]] / se).ln());
            let mut g: Vec<f32> = e.iter().map(|v| v / se).collect();
            g[ys[s]] -= 1.0;
            for li in (0..layers.len()).rev() {
                let l = &layers[li];
                let a = &acts[li];
                for (o, &go) in g.iter().enumerate() {
                    gb[li][o] += go;
                    let row = &mut gw[li][o * l.inputs..(o + 1) * l.inputs];
                    row.iter_mut().zip(a).for_each(|(r, x)| *r += go * x);
                }
                if li > 0 {
                    let mut gp = vec![0.0f32; l.inputs];
                    for (row, &go) in l.w.chunks_exact(l.inputs).zip(&g) {
                        gp.iter_mut().zip(row).for_each(|(p, w)| *p += go * w);
                    }
                    // ReLU: no gradient where the activation was clipped.
                    gp.iter_mut()
                        .zip(a)
                        .filter(|(_, a)| **a <= 0.0)
                        .for_each(|(p, _)| *p = 0.0);
                    g = gp;
                }
            }
        }
        let k = lr / batch.len() as f32;
        for (li, l) in layers.iter_mut().enumerate() {
            l.w.iter_mut().zip(&gw[li]).for_each(|(w, g)| *w -= k * g);
            l.b.iter_mut().zip(&gb[li]).for_each(|(b, g)| *b -= k * g);
        }
    }
    let after = flat(&layers);
    let mut out = std::io::BufWriter::new(std::fs::File::create(&output)?);
    for (a, b) in after.iter().zip(&before) {
        out.write_all(&(a - b).to_le_bytes())?;
    }
    out.flush()?;
    eprintln!(
        "{} parameters, mean training loss over the epoch {:.4}",
        after.len(),
        loss_sum / n as f64
    );
    Ok(())
}
