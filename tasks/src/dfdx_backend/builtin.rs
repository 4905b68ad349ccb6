//! The built-in architectures defined in dfdx. The three MLPs are the
//! gemm executor's twins (same layout, same He-uniform start, so that
//! `tasks/tests/backends.rs` can check that both train to the same
//! weights); `resmlp28` and the text models (`char_mlp80`, `char_gru80`,
//! see [`super::text`]) exist only here.

use dfdx::nn::builders::{LayerNorm1D, Linear, ReLU, Residual};

use super::text::{CharEmbedding, Gru};
use super::DfdxInit;
use crate::ModelRegistry;

/// MLP 784-256-128 (ReLU after each) for 28x28 images.
pub type Mlp28 = (Linear<784, 256>, ReLU, Linear<256, 128>, ReLU);
/// MLP 64-128-64 for the 8x8 digits.
pub type Mlp8x8 = (Linear<64, 128>, ReLU, Linear<128, 64>, ReLU);
/// MLP 4-32-32 for 4-feature tables.
pub type MlpTab4 = (Linear<4, 32>, ReLU, Linear<32, 32>, ReLU);
/// A pre-norm residual block of width 128: `x + relu(W layernorm(x) + b)`.
pub type ResBlock128 = Residual<(LayerNorm1D<128>, Linear<128, 128>, ReLU)>;
/// Residual MLP for 28x28 images: 784 → 128 (ReLU), two pre-norm residual
/// blocks, a final LayerNorm; 128 features.
pub type ResMlp28 = (
    Linear<784, 128>,
    ReLU,
    ResBlock128,
    ResBlock128,
    LayerNorm1D<128>,
);

/// Rows of the text models' embedding table: token ids of a vocabulary of
/// up to 128 symbols (the default `max_vocab` of a text data set).
pub const TEXT_VOCAB: usize = 128;
/// Characters per window of the text models (LEAF's Shakespeare: 80).
pub const TEXT_CONTEXT: usize = 80;

/// Next character from an 80-character window: its last 16 characters,
/// each embedded in 16 values, end to end through 256-512-256 (ReLU); 256
/// features. (Reading all 80 learned more slowly per CPU second: see
/// `BENCHMARKS.md`, W2.)
pub type CharMlp80 = (
    CharEmbedding<TEXT_VOCAB, 16, TEXT_CONTEXT, 16, 256>,
    Linear<256, 512>,
    ReLU,
    Linear<512, 256>,
    ReLU,
);
/// Next character from an 80-character window: a GRU of 128 units over its
/// last 20 characters, each embedded in 8 values; the last state is the
/// 128 features.
pub type CharGru80 = Gru<TEXT_VOCAB, 8, 128, TEXT_CONTEXT, 20>;

/// Adds the dfdx architectures to `r`.
pub(crate) fn register(r: &mut ModelRegistry) {
    let he = DfdxInit::HeUniform;
    r.register_dfdx_with::<Mlp28, 784, 128>("mlp28", "", he);
    r.register_dfdx_with::<Mlp8x8, 64, 64>("mlp8x8", "", he);
    r.register_dfdx_with::<MlpTab4, 4, 32>("mlp_tab4", "", he);
    r.register_dfdx_with::<ResMlp28, 784, 128>(
        "resmlp28",
        "residual MLP for 28x28 images: 784-128, 2 pre-norm residual blocks, LayerNorm",
        DfdxInit::Module,
    );
    r.register_dfdx_with::<CharMlp80, TEXT_CONTEXT, 256>(
        "char_mlp80",
        "next character from an 80-character window: its last 16 embedded in 16 each, 256-512-256 MLP",
        DfdxInit::Module,
    );
    r.register_dfdx_with::<CharGru80, TEXT_CONTEXT, 128>(
        "char_gru80",
        "next character from an 80-character window: GRU of 128 units over its last 20, embedded in 8 each",
        DfdxInit::Module,
    );
}
