//! The built-in architectures defined in dfdx. The three MLPs are the
//! gemm executor's twins (same layout, same He-uniform start, so that
//! `tasks/tests/backends.rs` can check that both train to the same
//! weights); `resmlp28` exists only here.

use dfdx::nn::builders::{LayerNorm1D, Linear, ReLU, Residual};

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
}
