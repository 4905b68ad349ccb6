//! Next-character models in dfdx: modules that take a window of token ids
//! (as the `f32` features of a [`crate::text`] sample) and embed them.
//!
//! - [`CharEmbedding`]: the last `K` tokens of the window through one
//!   embedding table, their vectors end to end (`K x E = OUT` features), so
//!   that an MLP after it sees each position with its own weights.
//! - [`Gru`]: an embedding and a GRU cell (PyTorch's equations) over the
//!   last `STEPS` tokens of the window, written with dfdx tensor ops; the
//!   last hidden state is the feature vector.
//!
//! A token id at or above the table's `V` rows (or not an integer) reads
//! row 0, the unknown symbol, so that no input indexes out of the table.
//! Both work inside dfdx tuples and train with dfdx's autodiff like any
//! other module (`backbone.0.embed.weight`, ...).

use dfdx::nn::modules::{Embedding, Linear};
use dfdx::nn::tensor_collection::{ModuleVisitor, TensorCollection};
use dfdx::nn::{BuildOnDevice, Module, NonMutableModule};
use dfdx::shapes::{Const, Dtype, HasShape};
use dfdx::tensor::{
    Cpu, CpuError, Merge, NoneTape, PutTape, SplitTape, Tape, Tensor, TensorFromVec, WithEmptyTape,
    ZerosTensor,
};
use dfdx::tensor_ops::{Device, ReshapeTo, TryAdd, TryMul};

/// Row of the embedding table that token `v` reads.
fn token_id<const V: usize>(v: f32) -> usize {
    if v >= 0.0 && v < V as f32 && v.fract() == 0.0 {
        v as usize
    } else {
        0
    }
}

type Window<const IN: usize, T> = Tensor<(usize, Const<IN>), f32, Cpu, T>;

/// Builder of [`CharEmbeddingModule`]: `V` table rows of `E` values, windows
/// of `IN` tokens of which the last `K` are read, `OUT = K * E` features
/// (checked when compiled).
#[derive(Clone, Copy, Debug, Default)]
pub struct CharEmbedding<
    const V: usize,
    const E: usize,
    const IN: usize,
    const K: usize,
    const OUT: usize,
>;

/// A window's last `K` token vectors end to end.
#[derive(Clone, Debug)]
pub struct CharEmbeddingModule<
    const V: usize,
    const E: usize,
    const IN: usize,
    const K: usize,
    const OUT: usize,
    Ty: Dtype,
    D: dfdx::tensor::Storage<Ty>,
> {
    pub embed: Embedding<V, E, Ty, D>,
}

impl<const V: usize, const E: usize, const IN: usize, const K: usize, const OUT: usize>
    BuildOnDevice<Cpu, f32> for CharEmbedding<V, E, IN, K, OUT>
{
    type Built = CharEmbeddingModule<V, E, IN, K, OUT, f32, Cpu>;
}

impl<const V: usize, const E: usize, const IN: usize, const K: usize, const OUT: usize, Ty, D>
    TensorCollection<Ty, D> for CharEmbeddingModule<V, E, IN, K, OUT, Ty, D>
where
    Ty: Dtype + num_traits::Float + rand_distr::uniform::SampleUniform,
    D: Device<Ty>,
{
    type To<E2: Dtype, D2: Device<E2>> = CharEmbeddingModule<V, E, IN, K, OUT, E2, D2>;

    fn iter_tensors<W: ModuleVisitor<Self, Ty, D>>(
        visitor: &mut W,
    ) -> Result<Option<Self::To<W::E2, W::D2>>, W::Err> {
        visitor.visit_fields(
            Self::module("embed", |s| &s.embed, |s| &mut s.embed),
            |embed| CharEmbeddingModule { embed },
        )
    }
}

impl<const V: usize, const E: usize, const IN: usize, const K: usize, const OUT: usize, Ty, D>
    NonMutableModule for CharEmbeddingModule<V, E, IN, K, OUT, Ty, D>
where
    Ty: Dtype,
    D: dfdx::tensor::Storage<Ty>,
{
}

/// The `n x IN` token ids of a window batch, clamped into the table.
fn ids_of<const V: usize, const IN: usize, T>(x: &Window<IN, T>) -> Vec<usize> {
    x.as_vec().into_iter().map(token_id::<V>).collect()
}

impl<
        const V: usize,
        const E: usize,
        const IN: usize,
        const K: usize,
        const OUT: usize,
        T: Tape<f32, Cpu>,
    > Module<Window<IN, T>> for CharEmbeddingModule<V, E, IN, K, OUT, f32, Cpu>
{
    type Output = Tensor<(usize, Const<OUT>), f32, Cpu, T>;
    type Error = CpuError;

    fn try_forward(&self, x: Window<IN, T>) -> Result<Self::Output, CpuError> {
        const {
            assert!(
                K >= 1 && K <= IN && K * E == OUT,
                "CharEmbedding: K <= IN, OUT = K * E"
            )
        };
        let n = x.shape().0;
        let all = ids_of::<V, IN, T>(&x);
        let ids: Vec<usize> = all
            .chunks_exact(IN)
            .flat_map(|w| &w[IN - K..])
            .copied()
            .collect();
        let (x, tape) = x.split_tape();
        let ids = x.device().try_tensor_from_vec(ids, (n, Const::<K>))?;
        let e = self.embed.try_forward(ids.put_tape(tape))?;
        e.try_reshape_like(&(n, Const::<OUT>))
    }
}

/// Builder of [`GruModule`]: `V` table rows of `E` values, windows of `IN`
/// tokens of which the last `STEPS` are read, `H` hidden units.
#[derive(Clone, Copy, Debug, Default)]
pub struct Gru<const V: usize, const E: usize, const H: usize, const IN: usize, const STEPS: usize>;

/// An embedding and a GRU cell; see the [module docs](self).
#[derive(Clone, Debug)]
pub struct GruModule<
    const V: usize,
    const E: usize,
    const H: usize,
    const IN: usize,
    const STEPS: usize,
    Ty: Dtype,
    D: dfdx::tensor::Storage<Ty>,
> {
    pub embed: Embedding<V, E, Ty, D>,
    /// Input to reset, update and candidate gates.
    pub xr: Linear<E, H, Ty, D>,
    pub xz: Linear<E, H, Ty, D>,
    pub xn: Linear<E, H, Ty, D>,
    /// Hidden state to the same gates.
    pub hr: Linear<H, H, Ty, D>,
    pub hz: Linear<H, H, Ty, D>,
    pub hn: Linear<H, H, Ty, D>,
}

impl<const V: usize, const E: usize, const H: usize, const IN: usize, const STEPS: usize>
    BuildOnDevice<Cpu, f32> for Gru<V, E, H, IN, STEPS>
{
    type Built = GruModule<V, E, H, IN, STEPS, f32, Cpu>;
}

impl<
        const V: usize,
        const E: usize,
        const H: usize,
        const IN: usize,
        const STEPS: usize,
        Ty,
        D,
    > TensorCollection<Ty, D> for GruModule<V, E, H, IN, STEPS, Ty, D>
where
    Ty: Dtype + num_traits::Float + rand_distr::uniform::SampleUniform,
    D: Device<Ty>,
{
    type To<E2: Dtype, D2: Device<E2>> = GruModule<V, E, H, IN, STEPS, E2, D2>;

    fn iter_tensors<W: ModuleVisitor<Self, Ty, D>>(
        visitor: &mut W,
    ) -> Result<Option<Self::To<W::E2, W::D2>>, W::Err> {
        visitor.visit_fields(
            (
                Self::module("embed", |s| &s.embed, |s| &mut s.embed),
                (
                    Self::module("xr", |s| &s.xr, |s| &mut s.xr),
                    Self::module("xz", |s| &s.xz, |s| &mut s.xz),
                    Self::module("xn", |s| &s.xn, |s| &mut s.xn),
                ),
                (
                    Self::module("hr", |s| &s.hr, |s| &mut s.hr),
                    Self::module("hz", |s| &s.hz, |s| &mut s.hz),
                    Self::module("hn", |s| &s.hn, |s| &mut s.hn),
                ),
            ),
            |(embed, (xr, xz, xn), (hr, hz, hn))| GruModule {
                embed,
                xr,
                xz,
                xn,
                hr,
                hz,
                hn,
            },
        )
    }
}

impl<
        const V: usize,
        const E: usize,
        const H: usize,
        const IN: usize,
        const STEPS: usize,
        Ty,
        D,
    > NonMutableModule for GruModule<V, E, H, IN, STEPS, Ty, D>
where
    Ty: Dtype,
    D: dfdx::tensor::Storage<Ty>,
{
}

type State<const H: usize, T> = Tensor<(usize, Const<H>), f32, Cpu, T>;

impl<const V: usize, const E: usize, const H: usize, const IN: usize, const STEPS: usize>
    GruModule<V, E, H, IN, STEPS, f32, Cpu>
{
    /// One GRU step from state `h` on the tokens `ids` (one per row):
    /// `r = σ(x W_xr + h W_hr)`, `z = σ(x W_xz + h W_hz)`,
    /// `c = tanh(x W_xn + r ⊙ (h W_hn))`, `h' = c + z ⊙ (h - c)`.
    /// The tape travels with the state; the branches that reuse a tensor
    /// take an empty tape that the next binary op merges back.
    fn step<T: Tape<f32, Cpu> + Merge<T> + Merge<NoneTape>>(
        &self,
        h: State<H, T>,
        ids: Tensor<(usize,), usize, Cpu>,
    ) -> Result<State<H, T>, CpuError> {
        let hr = self.hr.try_forward(h.with_empty_tape())?;
        let hz = self.hz.try_forward(h.with_empty_tape())?;
        let hn = self.hn.try_forward(h.with_empty_tape())?;
        let (h, tape) = h.split_tape();
        let x = self.embed.try_forward(ids.put_tape(tape))?;
        let r = self
            .xr
            .try_forward(x.with_empty_tape())?
            .try_add(hr)?
            .try_sigmoid()?;
        let z = self
            .xz
            .try_forward(x.with_empty_tape())?
            .try_add(hz)?
            .try_sigmoid()?;
        let c = self
            .xn
            .try_forward(x)?
            .try_add(r.try_mul(hn)?)?
            .try_tanh()?;
        let keep = c.with_empty_tape().try_negate()?.try_add(h)?;
        c.try_add(z.try_mul(keep)?)
    }
}

impl<
        const V: usize,
        const E: usize,
        const H: usize,
        const IN: usize,
        const STEPS: usize,
        T: Tape<f32, Cpu> + Merge<T> + Merge<NoneTape>,
    > Module<Window<IN, T>> for GruModule<V, E, H, IN, STEPS, f32, Cpu>
{
    type Output = State<H, T>;
    type Error = CpuError;

    fn try_forward(&self, x: Window<IN, T>) -> Result<Self::Output, CpuError> {
        const { assert!(STEPS >= 1 && STEPS <= IN, "Gru: 1 <= STEPS <= IN") };
        let n = x.shape().0;
        let ids = ids_of::<V, IN, T>(&x);
        let (x, tape) = x.split_tape();
        let dev = x.device().clone();
        let mut h: State<H, T> = dev.try_zeros_like(&(n, Const::<H>))?.put_tape(tape);
        for t in IN - STEPS..IN {
            let column: Vec<usize> = (0..n).map(|r| ids[r * IN + t]).collect();
            h = self.step(h, dev.try_tensor_from_vec(column, (n,))?)?;
        }
        Ok(h)
    }
}
