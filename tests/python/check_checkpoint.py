"""Opens a Cohort checkpoint with PyTorch's `safetensors` (numpy flavour),
runs the model's forward pass in numpy the way an equivalent
`torch.nn.Sequential` would, and compares the logits with Cohort's.

    python check_checkpoint.py WEIGHTS CASES --backbone mlp8x8 --task digits

WEIGHTS: a `weights.safetensors` of `cohort-aggregator` (a checkpoint) or
of `cohort-sim --output`. CASES: a safetensors file with `inputs` (rows x
features, as Cohort feeds them) and `logits` (rows x classes, Cohort's
output for them). Exit 0 when every logit agrees within --tol, 1 otherwise.

The built-in MLPs are Linear layers with a ReLU after each; tensors are
named as in the `nn.Sequential` (`backbone.0.weight`, `backbone.2.weight`,
...) and `Linear` weights are stored (out, in) as in PyTorch. The head of
task t is `head/t.weight`, `head/t.bias`. cnn28's convolution weights are
stored channel-last, (out, kh, kw, in): PyTorch's (out, in, kh, kw) is
`w.transpose(0, 3, 1, 2)`; its activations are flattened in (h, w, c)
order, so PyTorch's (c, h, w) flatten needs the first Linear's columns
permuted the same way. This script converts to PyTorch's layout first and
then computes in PyTorch's (N, C, H, W) convention, so it checks that
mapping too.
"""

import argparse
import sys

import numpy as np
from safetensors.numpy import load_file


def relu(x):
    return np.maximum(x, 0.0)


def linear(x, w, b):
    # PyTorch's nn.Linear: x @ W^T + b, W of shape (out, in).
    return x @ w.T + b


def conv2d(x, w, b):
    # PyTorch's nn.Conv2d, stride 1, no padding: x (N, C, H, W), w (O, C, kh, kw).
    kh, kw = w.shape[2], w.shape[3]
    win = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))
    # win: (N, C, H', W', kh, kw)
    return np.einsum("nchwij,ocij->nohw", win, w, optimize=True) + b[None, :, None, None]


def maxpool2(x):
    n, c, h, w = x.shape
    return x[:, :, : h // 2 * 2, : w // 2 * 2].reshape(n, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))


def torch_state(t, backbone):
    """The checkpoint's tensors in PyTorch's layout (float64 for the check)."""
    s = {k: v.astype(np.float64) for k, v in t.items()}
    if backbone == "cnn28":
        for k in ("backbone.0.weight", "backbone.3.weight"):
            s[k] = s[k].transpose(0, 3, 1, 2)  # (out, kh, kw, in) -> (out, in, kh, kw)
        # Linear 256 -> 128 reads (h=4, w=4, c=16) in Cohort, (c, h, w) in PyTorch.
        w = s["backbone.7.weight"]
        s["backbone.7.weight"] = w.reshape(w.shape[0], 4, 4, 16).transpose(0, 3, 1, 2).reshape(w.shape[0], -1)
    return s


def forward(s, backbone, task, x):
    if backbone == "cnn28":
        h = x.reshape(-1, 1, 28, 28)
        h = maxpool2(relu(conv2d(h, s["backbone.0.weight"], s["backbone.0.bias"])))
        h = maxpool2(relu(conv2d(h, s["backbone.3.weight"], s["backbone.3.bias"])))
        h = h.reshape(h.shape[0], -1)  # nn.Flatten: (c, h, w) order
        h = relu(linear(h, s["backbone.7.weight"], s["backbone.7.bias"]))
    else:
        layers = sorted(
            int(k.split(".")[1]) for k in s if k.startswith("backbone.") and k.endswith(".weight")
        )
        if not layers:
            sys.exit(f"no backbone.N.weight tensor in the checkpoint: {sorted(s)}")
        h = x
        for i in layers:
            h = relu(linear(h, s[f"backbone.{i}.weight"], s[f"backbone.{i}.bias"]))
    return linear(h, s[f"head/{task}.weight"], s[f"head/{task}.bias"])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("weights")
    p.add_argument("cases")
    p.add_argument("--backbone", required=True)
    p.add_argument("--task", required=True)
    p.add_argument("--tol", type=float, default=1e-5)
    a = p.parse_args()
    tensors = load_file(a.weights)
    for k, v in tensors.items():
        if v.dtype != np.float32:
            sys.exit(f"{k}: dtype {v.dtype}, expected float32")
    cases = load_file(a.cases)
    x, expected = cases["inputs"].astype(np.float64), cases["logits"].astype(np.float64)
    got = forward(torch_state(tensors, a.backbone), a.backbone, a.task, x)
    if got.shape != expected.shape:
        print(f"shape {got.shape}, Cohort's {expected.shape}")
        return 1
    diff = float(np.max(np.abs(got - expected)))
    scale = float(np.max(np.abs(expected)))
    agree = int(np.sum(got.argmax(1) == expected.argmax(1)))
    print(
        f"{a.backbone}/{a.task}: {len(tensors)} tensors, {x.shape[0]} inputs; "
        f"max |numpy - cohort| = {diff:.3e} (logits up to {scale:.3f}); "
        f"argmax agrees on {agree}/{x.shape[0]}"
    )
    if not np.isfinite(diff) or diff > a.tol:
        print(f"FAIL: more than {a.tol}")
        return 1
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
