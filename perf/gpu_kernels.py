"""The first minutes of a GPU run: the kernels of the unified and per-example backward at the
target shape, against cuBLAS and dense, v1 against v2, in the order of issue 13's item 9.

    python perf/gpu_kernels.py --out OUT.csv             # B = 4096, M = N = 8192, bf16, CUDA
    TRITON_INTERPRET=1 python perf/gpu_kernels.py --rehearse --out OUT.csv   # tiny, on the CPU

Sections, each row written as soon as it is measured (a run cut short keeps what it did):
1. ``kernels``: the unified path's operations (selection with db, dx, dW rows, dW into a dense
   gradient) for v1 and v2 (``TRITON_MEBP_KERNELS``) on the Triton kernels, autotuning off; 2. the
   same, tuned, with the chosen configs; 3. ``k``: dx, dW rows and dW into a dense gradient at
   k = 410 and 416 by each route of the library's launchers (``TRITON_MEBP_PRODUCTS``: the Triton
   kernels with and without TMA (``TRITON_MEBP_TMA``), cuBLAS on the gathered operands, and what
   "auto" takes); 4. ``cublas``: torch.mm on the same gathered operands, without the gather;
   5. ``dense``: dx, dW, db of the dense backward and a copy of dy (bandwidth); 6. ``per_example``:
   its kernels; 7. ``layer``: the whole layer backward against dense (products by
   ``TRITON_MEBP_PRODUCTS``, default "auto"), per-example also by dense products on the masked dy
   (what auto=True runs above its predicted break-even, timed there too:
   ``per_example_break_even.py``), and under bf16 autocast with float32 weights (``.../amp``,
   against dense autocast); 8. ``host``: host time of 50 backward calls without a sync;
   9. ``check``: bf16 results of the kernels and of the cuBLAS route against the PyTorch ops on
   the same tensors, also with autocast's float32 W and x; 10. ``graph``: a training step of a
   converted MLP (RowAdam, grad="sparse") under the sync debug mode, and replayed from a CUDA
   graph against eager steps; a per-example backward (grad="dense", by its own products and by
   auto's choice) under that mode; 11. ``wide``: the unified selection of wide layers
   (N = 65536, 262144) by the split threshold search and by one program.
"""

import argparse
import contextlib
import csv
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import triton_mebp as mebp  # noqa: E402
from triton_mebp import backend, torch_ops  # noqa: E402
from triton_mebp.bench import harness  # noqa: E402
from triton_mebp.functional import _mebp_linear  # noqa: E402

COLUMNS = [
    "section",
    "name",
    "version",
    "products",
    "tuned",
    "B",
    "M",
    "N",
    "k",
    "dtype",
    "median_ms",
    "q20_ms",
    "q80_ms",
    "value",
    "config",
    "device",
    "triton",
    "torch",
    "commit",
]


# The products' routes timed side by side (TRITON_MEBP_PRODUCTS, TRITON_MEBP_TMA): the Triton
# kernels with TMA descriptors where they apply and without, cuBLAS, and what "auto" takes.
ROUTES = (("triton", "1"), ("triton", "0"), ("cublas", "1"), ("auto", "1"))


@contextlib.contextmanager
def env(**values):
    before = {k: os.environ.get(k) for k in values}
    os.environ.update({k: str(v) for k, v in values.items()})
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def configs():
    from triton_mebp.kernels import gathered, selection
    from triton_mebp.kernels._tuning import config_label

    kernels = [
        selection.column_scores,
        selection.unified_select_row,
        selection.gather_columns,
        selection.scores_bias_partial,
        selection.scores_bias_finish,
        selection.unified_top,
        selection.gather_padded,
        gathered.gathered_rows_matmul,
        gathered.transposed_matmul_rows,
        gathered.gathered_rows_matmul_tma,
        gathered.transposed_matmul_rows_tma,
        selection.per_example_top,
        selection.per_example_select_rows,
        gathered.per_example_dx,
        gathered.segment_rows,
    ]
    return ";".join(
        f"{t.fn.__name__.strip('_')}[{config_label(t.last_config)}]"
        for t in kernels
        if t.last_config is not None
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--rehearse", action="store_true", help="tiny shapes, fp32, on the CPU")
    args = parser.parse_args(argv)
    rehearse = args.rehearse
    if not rehearse and not torch.cuda.is_available():
        print("gpu_kernels: no CUDA GPU (use --rehearse on the CPU)", file=sys.stderr)
        return 2
    device = torch.device("cpu" if rehearse else "cuda")
    B, M, N = (48, 96, 160) if rehearse else (4096, 8192, 8192)
    ks = (13, 16) if rehearse else (410, 416)
    dtype = torch.float32 if rehearse else torch.bfloat16
    timing = dict(min_run_time=0.05) if rehearse else dict(warmup_ms=10, rep_ms=50)
    mebp.set_backend("triton")
    torch.manual_seed(0)
    dy = torch.randn(B, N, device=device, dtype=dtype)
    x = torch.randn(B, M, device=device, dtype=dtype)
    w = torch.randn(N, M, device=device, dtype=dtype)
    ops = backend.triton_ops()
    common = dict(
        B=B,
        M=M,
        N=N,
        dtype=harness.dtype_label(dtype),
        device=harness.device_name(device),
        triton=harness.triton_version(),
        torch=torch.__version__,
        commit=harness.git_commit(ROOT),
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    handle = open(args.out, "w", newline="")
    writer = csv.DictWriter(handle, fieldnames=COLUMNS)
    writer.writeheader()
    started = time.perf_counter()

    def row(
        section, name, fn=None, value="", version="", tuned="", k="", config=False, products=""
    ):
        t = harness.measure(fn, device, **timing) if fn is not None else None
        writer.writerow(
            dict(
                common,
                section=section,
                name=name,
                version=version,
                products=products,
                tuned=tuned,
                k=k,
                median_ms=f"{t.median_ms:.4f}" if t else "",
                q20_ms=f"{t.q20_ms:.4f}" if t else "",
                q80_ms=f"{t.q80_ms:.4f}" if t else "",
                value=value,
                config=configs() if config else "",
            )
        )
        handle.flush()
        print(
            f"[{time.perf_counter() - started:6.1f}s] {section:11s} {name:28s} {version:3s} "
            f"{products:6s} {tuned:5s} k={k} {t.median_ms if t else value}",
            flush=True,
        )

    k = ks[0]
    # 1, 2: the unified path's operations, v1 and v2, untuned then tuned.
    for tuned in ("0", "1"):
        for version in ("v1", "v2"):
            with env(
                TRITON_MEBP_KERNELS=version,
                TRITON_MEBP_AUTOTUNE=tuned,
                TRITON_MEBP_PRODUCTS="triton",
            ):
                idx, dy_c, _ = ops.unified_select_and_bias(dy, k)
                dense_out = torch.zeros_like(w)
                for name, fn in (
                    ("select+db", lambda: ops.unified_select_and_bias(dy, k)),
                    ("dx", lambda: ops.gathered_input_grad(dy_c, w, idx)),
                    ("dW rows", lambda: ops.gathered_weight_grad(dy_c, x, idx)),
                    (
                        "dW into dense",
                        lambda: ops.gathered_weight_grad(dy_c, x, idx, out=dense_out),
                    ),
                ):
                    row(
                        "kernels",
                        name,
                        fn,
                        version=version,
                        tuned=tuned,
                        k=k,
                        config=True,
                        products="triton",
                    )
    # 3: products at k and at a multiple of 16 (v2 pads both to the same width; v1 does not), by
    # each route of the launchers: Triton kernels, cuBLAS on gathered operands, what auto takes.
    for version in ("v1", "v2"):
        for kk in ks:
            for products, tma in ROUTES:
                with env(
                    TRITON_MEBP_KERNELS=version,
                    TRITON_MEBP_AUTOTUNE="1",
                    TRITON_MEBP_PRODUCTS=products,
                    TRITON_MEBP_TMA=tma,
                ):
                    idx, dy_c, _ = ops.unified_select_and_bias(dy, kk)
                    dense_out = torch.zeros_like(w)
                    for name, fn in (
                        ("dx", lambda: ops.gathered_input_grad(dy_c, w, idx)),
                        ("dW rows", lambda: ops.gathered_weight_grad(dy_c, x, idx)),
                        (
                            "dW into dense",
                            lambda: ops.gathered_weight_grad(dy_c, x, idx, out=dense_out),
                        ),
                    ):
                        row(
                            "k",
                            name,
                            fn,
                            version=version,
                            tuned="1",
                            k=kk,
                            products=products if tma == "1" else f"{products} tma=0",
                            config=products != "cublas",
                        )
    # 4: cuBLAS on the same gathered operands.
    idx, dy_c, _ = ops.unified_select_and_bias(dy, k)
    dense_c, w_rows = dy_c.contiguous(), w.index_select(0, idx)
    row("cublas", "dx = dy_c @ W[idx]", lambda: dense_c @ w_rows, k=k)
    row("cublas", "dW = dy_c.T @ x", lambda: dense_c.t() @ x, k=k)
    row("cublas", "gather W[idx]", lambda: w.index_select(0, idx), k=k)
    # 5: dense backward and the copy bandwidth.
    row("dense", "dx = dy @ W", lambda: dy @ w)
    row("dense", "dW = dy.T @ x", lambda: dy.t() @ x)
    row("dense", "db = dy.sum(0)", lambda: dy.sum(0))
    copy = harness.measure(lambda: dy.clone(), device, **timing)
    row(
        "dense",
        "copy dy (GB/s)",
        value=f"{2 * dy.numel() * dy.element_size() / copy.median_ms / 1e6:.1f}",
    )
    # 6: per-example kernels.
    with env(TRITON_MEBP_AUTOTUNE="1"):
        values, pidx = ops.per_example_select(dy, k)
        row("per_example", "select", lambda: ops.per_example_select(dy, k), version="v2", k=k)
        row("per_example", "dx", lambda: ops.per_example_input_grad(values, pidx, w), k=k)
        row(
            "per_example",
            "dW (dense)",
            lambda: ops.per_example_weight_grad(values, pidx, x, N, dense=True),
            k=k,
            config=True,
        )
    # 7: the layer backward against dense.
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    bg = torch.zeros(N, device=device, dtype=dtype, requires_grad=True)
    layers = {"dense": F.linear(xg, wg, bg)}
    for mode in ("unified", "per_example"):
        for grad in ("sparse", "dense"):
            layers[f"{mode}/{grad}"] = mebp.mebp_linear(xg, wg, bg, k=k, mode=mode, grad=grad)
    # per-example meProp's gradient by dense products on the masked dy, here and at the predicted
    # break-even k (nominal model: 0.51% of N), where it should tie with the per-example products
    even = max(1, round(0.0051 * N))
    per_example_ks = {f"per_example/{grad}": k for grad in ("sparse", "dense")}
    for kk in (k, even):
        for masked in (True, False):
            if kk == k and not masked:
                continue  # timed above
            name = f"per_example/dense{'/masked-dense' if masked else ''} k={kk}"
            call = (xg, wg, bg, kk, "per_example", "dense", False, None, None, masked)
            layers[name], per_example_ks[name] = _mebp_linear(*call), kk
    for name, y in layers.items():
        row(
            "layer",
            name,
            lambda y=y: torch.autograd.grad(y, (xg, wg, bg), dy, retain_graph=True),
            version="v2",
            k=per_example_ks.get(name, k),
            products=os.environ.get("TRITON_MEBP_PRODUCTS", "auto"),
        )
    # 7, under autocast: float32 master weights, the forward and the backward in bf16 (dense:
    # PyTorch's autocast; meProp: bf16 products on the float32 rows of W and tiles of x).
    x32, w32 = x.float().requires_grad_(), w.float().requires_grad_()
    b32 = torch.zeros(N, device=device, requires_grad=True)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        amp = {"dense/amp": F.linear(x32, w32, b32)}
        for mode in ("unified", "per_example"):
            for grad in ("sparse", "dense"):
                amp[f"{mode}/{grad}/amp"] = mebp.mebp_linear(
                    x32, w32, b32, k=k, mode=mode, grad=grad
                )
    dy16 = dy.to(torch.bfloat16)
    for name, y in amp.items():
        row(
            "layer",
            name,
            lambda y=y: torch.autograd.grad(y, (x32, w32, b32), dy16, retain_graph=True),
            version="v2",
            k=k,
            products=os.environ.get("TRITON_MEBP_PRODUCTS", "auto"),
        )
    # 8: host time of 50 backward calls, no sync between them.
    y = layers["unified/sparse"]
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(50):
        torch.autograd.grad(y, (xg, wg, bg), dy, retain_graph=True)
    host = (time.perf_counter() - start) * 1e3
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = (time.perf_counter() - start) * 1e3
    row("host", "50 backward calls: host ms", value=f"{host:.2f}", k=k)
    row("host", "50 backward calls: wall ms", value=f"{wall:.2f}", k=k)
    # 9: the kernels' results against the PyTorch ops on the same tensors.
    idx_t, dy_c_t, db_t = torch_ops.unified_select_and_bias(dy, k)
    idx, dy_c, db = ops.unified_select_and_bias(dy, k)
    same = torch.equal(idx.long(), idx_t.long())
    row("check", "same selection as torch", value=str(same), k=k)
    if same:
        for products in ("triton", "cublas"):
            with env(TRITON_MEBP_PRODUCTS=products):
                for name, mine, ref in (
                    (
                        "dx",
                        ops.gathered_input_grad(dy_c, w, idx),
                        dy_c_t.float() @ w[idx_t].float(),
                    ),
                    (
                        "dW rows",
                        ops.gathered_weight_grad(dy_c, x, idx),
                        dy_c_t.float().t() @ x.float(),
                    ),
                    ("db", db, dy.float().sum(0)),
                    # autocast's operands: bf16 dy_c, float32 W and x, float32 dW rows
                    (
                        "dx, float32 W",
                        ops.gathered_input_grad(dy_c.bfloat16(), w32.detach(), idx),
                        dy_c_t.bfloat16().float() @ w32.detach()[idx_t].bfloat16().float(),
                    ),
                    (
                        "dW rows, float32 x",
                        ops.gathered_weight_grad(
                            dy_c.bfloat16(), x32.detach(), idx, dtype=torch.float32
                        ),
                        dy_c_t.bfloat16().float().t() @ x32.detach().bfloat16().float(),
                    ),
                ):
                    error = (mine.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)
                    row(
                        "check",
                        f"{name}: max rel. error",
                        value=f"{error.item():.2e}",
                        k=k,
                        products=products,
                    )
    # 10: one training step of a converted MLP, free of syncs and captured in a CUDA graph.
    for name, value in graph_step_check(device):
        row("graph", name, value=value, k="5%")
    # 11: the unified selection of wide layers: the split threshold search against one program.
    from triton_mebp.kernels import selection

    wide_B = 64 if rehearse else 1024
    for wide_N in (256, 1024) if rehearse else (65536, 262144):
        dy_wide = torch.randn(wide_B, wide_N, device=device, dtype=dtype)
        wide_k = max(1, wide_N // 20)
        for name, threshold in (("split", 128 if rehearse else None), ("one program", wide_N + 1)):
            before = selection.SPLIT_MIN_COLUMNS
            selection.SPLIT_MIN_COLUMNS = threshold or before
            try:
                with env(TRITON_MEBP_AUTOTUNE="1"):
                    row(
                        "wide",
                        f"select+db N={wide_N} B={wide_B}: {name}",
                        lambda: ops.unified_select_and_bias(dy_wide, wide_k),
                        version="v2",
                        k=wide_k,
                    )
            finally:
                selection.SPLIT_MIN_COLUMNS = before
    handle.close()
    print(f"wrote {args.out}")
    return 0


def _converted_mlp(device):
    torch.manual_seed(1)
    model = torch.nn.Sequential(
        torch.nn.Linear(512, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 512)
    ).to(device)
    model = mebp.convert(model, k=0.05, grad="sparse", skip_output=False)
    return model, mebp.RowAdam(model.parameters(), lr=1e-3, capturable=True)


def _train_step(model, optimizer, x, target):
    F.mse_loss(model(x), target).backward()
    optimizer.step()


def graph_step_check(device):
    """``(name, value)`` rows: a step under ``torch.cuda.set_sync_debug_mode("error")``, then the
    same steps replayed from a CUDA graph against eager ones (largest parameter difference)."""
    if device.type != "cuda":
        return [("CUDA graph of a training step", "needs a CUDA GPU")]
    results = []
    torch.manual_seed(2)
    xs = [torch.randn(256, 512, device=device) for _ in range(5)]
    targets = [torch.randn(256, 512, device=device) for _ in range(5)]
    with env(TRITON_MEBP_AUTOTUNE="0"):
        eager, eager_opt = _converted_mlp(device)
        for i in range(5):
            eager_opt.zero_grad(set_to_none=True)
            if i == 1:  # state exists after the first step
                try:
                    torch.cuda.synchronize()
                    torch.cuda.set_sync_debug_mode("error")
                    _train_step(eager, eager_opt, xs[i], targets[i])
                    verdict = "none"
                except RuntimeError as error:
                    verdict = f"sync: {str(error).splitlines()[0][:120]}"
                finally:
                    torch.cuda.set_sync_debug_mode("default")
                results.append(("syncs in an eager step (RowAdam, grad=sparse)", verdict))
            else:
                _train_step(eager, eager_opt, xs[i], targets[i])
        try:
            model, optimizer = _converted_mlp(device)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for i in range(2):  # warm-up: state, autotuning and caches settle
                    optimizer.zero_grad(set_to_none=True)
                    _train_step(model, optimizer, xs[i], targets[i])
            torch.cuda.current_stream().wait_stream(side)
            static_x, static_target = xs[2].clone(), targets[2].clone()
            optimizer.zero_grad(set_to_none=True)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                _train_step(model, optimizer, static_x, static_target)
            for i in range(2, 5):
                static_x.copy_(xs[i])
                static_target.copy_(targets[i])
                graph.replay()
            torch.cuda.synchronize()
            gap = max(
                (a.detach() - b.detach()).abs().max().item()
                for a, b in zip(model.parameters(), eager.parameters())
            )
            results.append(("CUDA graph: max |param - eager| after 5 steps", f"{gap:.3e}"))
        except Exception as error:  # the check reports, the run goes on
            results.append(("CUDA graph of a training step", f"failed: {error!r}"[:200]))
        for auto in (False, True):
            results.append(_per_example_backward_syncs(device, xs[0], targets[0], auto))
    return results


def _per_example_backward_syncs(device, x, target, auto):
    """``(name, verdict)``: a per-example backward with dense gradients and hit counting under
    ``torch.cuda.set_sync_debug_mode("error")``, by its own products or (``auto``, k = 5%) by
    dense products on the masked dy."""
    name = f"syncs in a per-example backward (grad=dense, {'auto' if auto else 'own products'})"
    torch.manual_seed(1)
    model = torch.nn.Sequential(
        torch.nn.Linear(512, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 512)
    ).to(device)
    model = mebp.convert(
        model, k=0.05, mode="per_example", count_hits=True, auto=auto, skip_output=False
    )
    try:
        F.mse_loss(model(x), target).backward()  # warm-up: compiles, decides
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        F.mse_loss(model(x), target).backward()
        verdict = "none"
    except RuntimeError as error:
        verdict = f"sync: {str(error).splitlines()[0][:120]}"
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return name, verdict


if __name__ == "__main__":
    sys.exit(main())
