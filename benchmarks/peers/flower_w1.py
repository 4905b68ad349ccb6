#!/usr/bin/env python3
"""W1 of shared/DESIGN.md in Flower + PyTorch, for the side-by-side comparison
with `cohort-sim --config simulator/experiments/w1-fashion.toml`.

W1: full Fashion-MNIST (60k train / 10k test, gzipped IDX files read with
numpy from /usr/share/datasets/fashion-mnist, pixels / 255), MLP
784-256-128 (ReLU) + a 10-class head, 100 clients with Dirichlet(0.5) label
skew, 10 clients a round, 1 local epoch, batch 32, plain SGD lr 0.05 (no
momentum, no weight decay), FedAvg weighted by examples, central evaluation
on the 10k test set after every round, 30 rounds.

Flower: the Ray simulation engine (`flwr.simulation.start_simulation`, the
VirtualClientEngine), Ray limited to 2 CPUs with `client_resources =
{"num_cpus": 1}` (so 2 client actors run at once), no dashboard. PyTorch on
one thread in every process (`torch.set_num_threads(1)`). The server's
central evaluation runs in the driver process (one thread too).

Timing: the strategy's `evaluate_fn` is called once with the initial weights
("round 0": Ray start-up, actor creation, the first evaluation) and then
after each round's aggregation. Round r's time is the interval between the
end of evaluation r-1 and the end of evaluation r, so it contains sampling,
the clients' training (including the per-client set-up Flower does in the
actors), aggregation and the central evaluation: the same span as
`wall_ms` of cohort-sim. Round 0 is excluded from the means. The mean over
rounds 2-30 is printed too (round 1 still pays for Ray actors importing torch
and loading the data set on their first task).

Memory: a thread samples the RSS of this process and all its descendants
(the Ray head: gcs_server, raylet, the workers, ...) every 0.25 s with psutil
and keeps the peak of the sum; every 4th sample it also sums PSS (which does
not count shared pages, e.g. Ray's object store in /dev/shm, once per process
that maps them). The sum of RSS therefore over-counts shared memory; the PSS
sum is the better estimate of what the tree really occupies. The same
thread keeps each process's user + system CPU seconds; the CPU seconds a
round (rounds 2-30, whole tree) are less sensitive to a loaded machine than
the wall time.

The last line of the output is `RESULT {json}` for benchmarks/peers/compare.py.
"""

from __future__ import annotations

import argparse
import functools
import gzip
import json
import os
import random
import sys
import threading
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)
try:
    torch.set_num_interop_threads(1)
except RuntimeError:  # already set in this process
    pass

DATA_DIR = "/usr/share/datasets/fashion-mnist"
HERE = os.path.dirname(os.path.abspath(__file__))


# --------------------------------------------------------------------------
# Data: gzipped IDX files, read directly (no download)


def read_idx(path: str) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    magic = int.from_bytes(raw[0:4], "big")
    if magic >> 8 != 0x08:  # unsigned byte data
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {magic:#x})")
    ndim = magic & 0xFF
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: {data.size} values for dims {dims}")
    return data.reshape(dims)


_DATA: dict | None = None


def data(data_dir: str = DATA_DIR) -> dict:
    """Train and test tensors, loaded once per process (driver and each actor)."""
    global _DATA
    if _DATA is None:
        p = lambda n: os.path.join(data_dir, n)  # noqa: E731
        xtr = read_idx(p("train-images-idx3-ubyte.gz")).reshape(-1, 784)
        ytr = read_idx(p("train-labels-idx1-ubyte.gz"))
        xte = read_idx(p("t10k-images-idx3-ubyte.gz")).reshape(-1, 784)
        yte = read_idx(p("t10k-labels-idx1-ubyte.gz"))
        _DATA = {
            "ytr_np": ytr.astype(np.int64),
            "xtr": torch.from_numpy(xtr.astype(np.float32) / 255.0),
            "ytr": torch.from_numpy(ytr.astype(np.int64)),
            "xte": torch.from_numpy(xte.astype(np.float32) / 255.0),
            "yte": torch.from_numpy(yte.astype(np.int64)),
        }
    return _DATA


def split_sizes(n: int, weights: np.ndarray) -> np.ndarray:
    """Largest-remainder rounding of n * weights / sum(weights) (as Cohort's)."""
    exact = weights / weights.sum() * n
    sizes = np.floor(exact).astype(np.int64)
    rest = n - int(sizes.sum())
    order = np.argsort(-(exact - np.floor(exact)), kind="stable")
    for i in order[:rest]:
        sizes[i] += 1
    return sizes


def dirichlet_partition(labels: np.ndarray, clients: int, alpha: float, seed: int) -> list[np.ndarray]:
    """Label skew as in Cohort's `Partitioner::Dirichlet`: for each class, its
    samples (shuffled) are cut among the clients by shares drawn from
    Dirichlet(alpha, ..., alpha)."""
    rng = np.random.default_rng(seed)
    out: list[list[np.ndarray]] = [[] for _ in range(clients)]
    for c in range(int(labels.max()) + 1):
        members = np.flatnonzero(labels == c)
        rng.shuffle(members)
        shares = rng.gamma(alpha, 1.0, size=clients)
        at = 0
        for k, size in enumerate(split_sizes(len(members), shares)):
            out[k].append(members[at : at + size])
            at += size
    return [np.sort(np.concatenate(parts)) for parts in out]


_PARTS: dict = {}


def partition(clients: int, alpha: float, seed: int) -> list[np.ndarray]:
    key = (clients, alpha, seed)
    if key not in _PARTS:
        _PARTS[key] = dirichlet_partition(data()["ytr_np"], clients, alpha, seed)
    return _PARTS[key]


# --------------------------------------------------------------------------
# Model


def make_model() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(784, 256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, 128),
        torch.nn.ReLU(),
        torch.nn.Linear(128, 10),
    )


def get_weights(model: torch.nn.Module) -> list[np.ndarray]:
    return [v.detach().cpu().numpy().copy() for v in model.state_dict().values()]


def set_weights(model: torch.nn.Module, weights: list[np.ndarray]) -> None:
    keys = list(model.state_dict().keys())
    model.load_state_dict({k: torch.from_numpy(np.asarray(w)) for k, w in zip(keys, weights)}, strict=True)


def batches(x, y, batch: int, gen: torch.Generator, loader: str):
    """Shuffled mini-batches; the last one may be short. `tensor` indexes the
    tensors directly (the cheaper way); `dataloader` goes through
    torch.utils.data.DataLoader(TensorDataset, shuffle=True), as Flower's
    PyTorch tutorials do."""
    if loader == "dataloader":
        dl = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(x, y), batch_size=batch, shuffle=True, generator=gen
        )
        yield from dl
        return
    perm = torch.randperm(len(y), generator=gen)
    for i in range(0, len(y), batch):
        idx = perm[i : i + batch]
        yield x[idx], y[idx]


def train_one_epoch(model, x, y, batch: int, lr: float, gen: torch.Generator, loader: str = "tensor") -> float:
    """One epoch of plain SGD over (x, y) in shuffled mini-batches."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loss_fn = torch.nn.CrossEntropyLoss()
    model.train()
    total, seen = 0.0, 0
    for xb, yb in batches(x, y, batch, gen, loader):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(xb), yb)
        loss.backward()
        opt.step()
        total += loss.item() * len(yb)
        seen += len(yb)
    return total / max(seen, 1)


@torch.no_grad()
def evaluate_model(model, x, y) -> tuple[float, float]:
    model.eval()
    logits = model(x)
    loss = float(torch.nn.functional.cross_entropy(logits, y))
    acc = float((logits.argmax(1) == y).float().mean())
    return loss, acc


# --------------------------------------------------------------------------
# Flower client (runs inside the Ray actors)

import flwr  # noqa: E402
from flwr.client import NumPyClient  # noqa: E402
from flwr.common import Context, ndarrays_to_parameters  # noqa: E402


class W1Client(NumPyClient):
    def __init__(self, cid: int, cfg: dict):
        self.cid = cid
        self.cfg = cfg
        d = data(cfg["data_dir"])
        idx = torch.from_numpy(partition(cfg["clients"], cfg["alpha"], cfg["seed"])[cid])
        self.x = d["xtr"][idx]
        self.y = d["ytr"][idx]
        self.model = make_model()

    def get_parameters(self, config):
        return get_weights(self.model)

    def fit(self, parameters, config):
        set_weights(self.model, parameters)
        n = len(self.y)
        if n == 0:
            return parameters, 0, {}
        rnd = int(config.get("server_round", 0))
        gen = torch.Generator().manual_seed(self.cfg["seed"] * 1_000_003 + rnd * 1_009 + self.cid)
        t0 = time.perf_counter()
        loss = train_one_epoch(self.model, self.x, self.y, self.cfg["batch"], self.cfg["lr"], gen,
                               self.cfg["loader"])
        train_s = time.perf_counter() - t0
        return get_weights(self.model), n, {"train_loss": loss, "train_s": train_s}


def client_fn(cfg: dict, context: Context):
    torch.set_num_threads(1)
    cid = int(context.node_config["partition-id"])
    return W1Client(cid, cfg).to_client()


# --------------------------------------------------------------------------
# Memory of the whole process tree


class TreeMemory(threading.Thread):
    def __init__(self, period: float = 0.25):
        super().__init__(daemon=True)
        import psutil

        self.psutil = psutil
        self.root = psutil.Process()
        self.period = period
        self.peak_rss = 0
        self.peak_pss = 0
        self.peak_procs = 0
        self.cpu: dict = {}
        self.lock = threading.Lock()
        self.stop_event = threading.Event()

    def sample(self, with_pss: bool) -> None:
        with self.lock:
            procs = [self.root]
            try:
                procs += self.root.children(recursive=True)
            except self.psutil.Error:
                pass
            rss = pss = 0
            for p in procs:
                try:
                    with p.oneshot():
                        if with_pss:
                            m = p.memory_full_info()
                            pss += m.pss
                            rss += m.rss
                        else:
                            rss += p.memory_info().rss
                        t = p.cpu_times()
                        self.cpu[(p.pid, p.create_time())] = t.user + t.system
                except self.psutil.Error:
                    pass
            self.peak_rss = max(self.peak_rss, rss)
            self.peak_procs = max(self.peak_procs, len(procs))
            if with_pss:
                self.peak_pss = max(self.peak_pss, pss)

    def cpu_seconds(self) -> float:
        """User + system CPU seconds of every process of the tree so far (a
        process that ended counts with its last sampled value)."""
        self.sample(with_pss=False)
        with self.lock:
            return float(sum(self.cpu.values()))

    def run(self) -> None:
        i = 0
        while not self.stop_event.is_set():
            self.sample(with_pss=(i % 4 == 0))
            i += 1
            self.stop_event.wait(self.period)

    def stop(self) -> None:
        self.stop_event.set()
        self.join()
        self.sample(with_pss=True)


# --------------------------------------------------------------------------
# Driver


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--per-round", type=int, default=10)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--cpus", type=int, default=2, help="CPUs given to Ray")
    ap.add_argument("--data-dir", default=DATA_DIR)
    ap.add_argument("--loader", choices=["tensor", "dataloader"], default="tensor",
                    help="how clients batch their data (see batches())")
    args = ap.parse_args(argv)

    t_start = time.perf_counter()
    mem = TreeMemory()
    mem.start()

    import ray
    from flwr.server import ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.simulation import start_simulation

    # The Ray workers import this module by name (so that client_fn and the
    # per-process data cache live in `flower_w1`, not in a pickled __main__).
    os.environ["PYTHONPATH"] = HERE + os.pathsep + os.environ.get("PYTHONPATH", "")

    d = data(args.data_dir)
    parts = partition(args.clients, args.alpha, args.seed)
    sizes = np.array([len(p) for p in parts])
    print(
        f"W1 Flower {flwr.__version__}, PyTorch {torch.__version__}, Ray {ray.__version__}, "
        f"numpy {np.__version__}, Python {sys.version.split()[0]}; "
        f"{len(d['ytr'])} train / {len(d['yte'])} test; {args.clients} clients "
        f"Dirichlet({args.alpha}): sizes min {sizes.min()} median {int(np.median(sizes))} "
        f"max {sizes.max()} (empty {int((sizes == 0).sum())}); {args.per_round} a round, "
        f"{args.rounds} rounds, batch {args.batch}, SGD lr {args.lr}, batches by {args.loader}",
        flush=True,
    )

    # Flower's SimpleClientManager samples with Python's `random`: seed it so
    # that every run trains the same clients in the same rounds (as Cohort's
    # seeded sampling does; the sample differs from Cohort's).
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    init = get_weights(make_model())
    eval_model = make_model()
    xte, yte = d["xte"], d["yte"]

    ends: list[float] = []
    accs: list[float] = []
    eval_s: list[float] = []

    cpu_at: dict[int, float] = {}

    def evaluate_fn(server_round: int, parameters, config):
        t0 = time.perf_counter()
        set_weights(eval_model, parameters)
        loss, acc = evaluate_model(eval_model, xte, yte)
        t1 = time.perf_counter()
        ends.append(t1)
        accs.append(acc)
        eval_s.append(t1 - t0)
        if server_round in (1, args.rounds):
            cpu_at[server_round] = mem.cpu_seconds()
        if server_round == 0:
            print(f"round 0 (set-up + initial evaluation): {t1 - t_start:.3f} s since start, "
                  f"accuracy {100 * acc:.2f}%", flush=True)
        else:
            tr = train_sum[-1] if train_sum else float("nan")
            print(f"round {server_round:2d}: {t1 - ends[-2]:.3f} s (evaluation {t1 - t0:.3f} s, "
                  f"clients' training {tr:.3f} s summed over 2 actors), "
                  f"accuracy {100 * acc:.2f}%, loss {loss:.4f}", flush=True)
        return loss, {"accuracy": acc}

    train_sum: list[float] = []
    train_max: list[float] = []

    def fit_metrics(results):
        # Seconds the clients spent in train_one_epoch this round (the rest of
        # a round is Flower/Ray overhead, waiting and the evaluation).
        ts = [m.get("train_s", 0.0) for _, m in results]
        train_sum.append(float(sum(ts)))
        train_max.append(float(max(ts, default=0.0)))
        return {"train_s_sum": train_sum[-1]}

    frac = args.per_round / args.clients
    strategy = FedAvg(
        fraction_fit=frac,
        min_fit_clients=args.per_round,
        fraction_evaluate=0.0,
        min_evaluate_clients=0,
        min_available_clients=args.clients,
        evaluate_fn=evaluate_fn,
        on_fit_config_fn=lambda r: {"server_round": r},
        fit_metrics_aggregation_fn=fit_metrics,
        initial_parameters=ndarrays_to_parameters(init),
    )
    cfg = {
        "clients": args.clients,
        "alpha": args.alpha,
        "seed": args.seed,
        "batch": args.batch,
        "lr": args.lr,
        "data_dir": args.data_dir,
        "loader": args.loader,
    }
    start_simulation(
        client_fn=functools.partial(client_fn, cfg),
        num_clients=args.clients,
        config=ServerConfig(num_rounds=args.rounds),
        strategy=strategy,
        client_resources={"num_cpus": 1, "num_gpus": 0.0},
        ray_init_args={
            "num_cpus": args.cpus,
            "num_gpus": 0,
            "include_dashboard": False,
            "ignore_reinit_error": True,
        },
    )
    t_end = time.perf_counter()
    cpu_total = mem.cpu_seconds()
    mem.stop()

    if len(ends) != args.rounds + 1:
        print(f"error: {len(ends)} evaluations for {args.rounds} rounds", file=sys.stderr)
        return 1
    per_round = [ends[i] - ends[i - 1] for i in range(1, len(ends))]
    res = {
        "system": "flower",
        "versions": {"flwr": flwr.__version__, "torch": torch.__version__,
                     "ray": ray.__version__, "numpy": np.__version__,
                     "python": sys.version.split()[0]},
        "rounds": args.rounds,
        "loader": args.loader,
        "round_s": per_round,
        "acc": accs[1:],
        "eval_s": eval_s[1:],
        "train_s_sum": train_sum,
        "train_s_max": train_max,
        "setup_s": ends[0] - t_start,
        "total_s": t_end - t_start,
        "mean_s_1": float(np.mean(per_round)),
        "mean_s_2": float(np.mean(per_round[1:])) if len(per_round) > 1 else float("nan"),
        "final_acc": accs[-1],
        "best_acc": max(accs[1:]),
        "peak_rss_tree_mb": mem.peak_rss / 2**20,
        "peak_pss_tree_mb": mem.peak_pss / 2**20,
        "peak_procs": mem.peak_procs,
        # CPU seconds (user + system, whole process tree) per round over
        # rounds 2..N, and for the whole run.
        "cpu_s_2": (cpu_at[args.rounds] - cpu_at[1]) / (args.rounds - 1) if args.rounds > 1 else float("nan"),
        "cpu_total_s": cpu_total,
    }
    tr2 = float(np.mean(train_sum[1:])) if len(train_sum) > 1 else float("nan")
    print(
        f"\nFlower W1: clients' training {tr2:.3f} s a round (summed over the 2 actors, rounds 2-{args.rounds}); "
        f"mean {res['mean_s_1']:.3f} s/round over rounds 1-{args.rounds} "
        f"({res['mean_s_2']:.3f} over 2-{args.rounds}; round 0 = set-up + initial evaluation, "
        f"{res['setup_s']:.1f} s, excluded); final accuracy {100 * res['final_acc']:.2f}%, "
        f"best {100 * res['best_acc']:.2f}%; peak RSS of the process tree {res['peak_rss_tree_mb']:.0f} MB "
        f"(sum over up to {res['peak_procs']} processes; PSS sum {res['peak_pss_tree_mb']:.0f} MB); "
        f"CPU {res['cpu_s_2']:.3f} s a round (rounds 2-{args.rounds}, user + system over the tree), "
        f"{res['cpu_total_s']:.1f} s in all; total {res['total_s']:.1f} s",
        flush=True,
    )
    print("RESULT " + json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    import flower_w1  # run as the module, so Ray pickles its functions by reference

    sys.exit(flower_w1.main())
