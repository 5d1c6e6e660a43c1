"""Optimizers: Muon for the 2-D matrices inside the blocks, AdamW for embeddings, lm_head and scalars.

Both classes work in one process and under torchrun, unchanged. There is no DDP wrapper: every rank's
backward leaves its *local* gradients, and step() averages them across ranks itself, ZeRO-1 style:
each rank owns a slice of the parameters and keeps optimizer state for that slice only.

  1. reduce-scatter the gradients (each rank receives the average for the slice it owns),
  2. update the owned slice,
  3. all-gather the updated parameters so every rank holds the full model again.

gloo (CPU) has neither reduce_scatter nor the AVG op, so there step 1 is an all_reduce (SUM) followed by
taking the owned slice and dividing by the world size; the state is sharded exactly the same way.
Because state is per rank, state_dict() is per rank too: save one file per rank and resume with the same
world size.

Muon shards whole matrices (orthogonalisation needs the full matrix): matrices are grouped by shape, a
group's gradients are stacked into one (k, m, n) tensor, padded to a multiple of the world size, and
rank r owns stack entries [r*k', (r+1)*k'). AdamW shards large tensors along dim 0; small ones (the
scalars) are all-reduced and updated on every rank.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist


def _world() -> tuple[int, int, bool]:
    """(rank, world_size, is_gloo); (0, 1, False) without a process group."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank(), dist.get_world_size(), dist.get_backend() == "gloo"
    return 0, 1, False


def _launch_reduce_scatter(full: torch.Tensor, rank: int, ws: int, gloo: bool):
    """Start averaging `full` (dim 0 divisible by ws) over ranks. Returns (work, get) where get() gives
    this rank's averaged slice once work.wait() returned."""
    if gloo:
        work = dist.all_reduce(full, op=dist.ReduceOp.SUM, async_op=True)
        return work, lambda: full.chunk(ws)[rank].div_(ws)
    out = torch.empty_like(full.chunk(ws)[0])
    work = dist.reduce_scatter_tensor(out, full, op=dist.ReduceOp.AVG, async_op=True)
    return work, lambda: out


def _launch_all_reduce(t: torch.Tensor, ws: int, gloo: bool):
    """Start averaging `t` in place over ranks; get() returns it once work.wait() returned."""
    work = dist.all_reduce(t, op=dist.ReduceOp.SUM if gloo else dist.ReduceOp.AVG, async_op=True)
    return work, (lambda: t.div_(ws)) if gloo else (lambda: t)


def _launch_all_gather(full: torch.Tensor, shard: torch.Tensor, ws: int, gloo: bool):
    """Start gathering every rank's `shard` into `full` (ws * shard rows)."""
    if gloo:
        return dist.all_gather(list(full.chunk(ws)), shard, async_op=True)
    return dist.all_gather_into_tensor(full, shard, async_op=True)


# ----------------------------------------------------------------------------- Muon

# Polar Express (Amsel, Persson, Musco, Gower 2025, arXiv:2505.16932): one quintic (a, b, c) per iteration,
# each chosen for the spectrum the previous one leaves (5 iterations, safety factor 2e-2, cushion 2).
# Fixed coefficients (the older 3.4445, -4.7750, 2.0315) leave singular values spread over [0.7, 1.2].
POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


def orthogonalize(G: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximately replace each matrix of G (k, m, n) by U V^T from its SVD, in float32 on CPU and bf16
    on CUDA (fast, and accurate enough). Before: rows are rescaled to the mean row norm, so that one
    loud row does not squeeze the rest of the spectrum. After: the Frobenius norm is set to sqrt(min(m, n)),
    that of an exactly semi-orthogonal matrix, which corrects the iteration's under-convergence."""
    X = G.to(torch.bfloat16 if G.is_cuda else torch.float32)
    Xf = X.float()
    rows = Xf.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    X = X * (Xf.norm(dim=(-2, -1), keepdim=True) / X.size(-2) ** 0.5 / rows).to(X.dtype)
    tall = X.size(-2) > X.size(-1)
    if tall:  # iterate on the smaller Gram matrix
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.01 + 1e-6)  # spectral norm <= Frobenius norm < 1
    for a, b, c in POLAR_EXPRESS[:steps]:
        A = X @ X.mT
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b*A + c*A@A
        X = torch.baddbmm(X, B, X, beta=a, alpha=1.0)  # a*X + B@X
    X = X.float()
    X = X * (min(X.shape[-2:]) ** 0.5 / X.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-6))
    return X.mT if tall else X


def normalize_variance(U: torch.Tensor, second: list[torch.Tensor], beta2: float) -> torch.Tensor:
    """NorMuon (arXiv:2510.05491): orthogonalised updates (k, m, n) still have unequal scales across
    neurons, so each row (tall and square matrices) or column (wide ones) is divided by the root of a
    running mean of its squared update, then the whole matrix is rescaled to its old Frobenius norm:
    the direction changes, the step size does not. `second` holds each matrix's (m, 1) or (1, n) buffer."""
    dim = -1 if U.size(-2) >= U.size(-1) else -2
    sq = U.square().mean(dim=dim, keepdim=True)
    buf = torch.stack(second)
    buf.lerp_(sq, 1 - beta2)
    torch._foreach_copy_(second, list(buf.unbind(0)))
    scaled = U * buf.clamp_min(1e-10).rsqrt()
    return scaled * (U.norm(dim=(-2, -1), keepdim=True) / scaled.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-10))


class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton-schulz, for 2-D weight matrices.

    update = NorMuon-normalised orthogonalize(nesterov momentum of the gradient), scaled by
    sqrt(max(1, rows/cols)) so tall matrices get a comparable per-element step. Weight decay is cautious:
    p -= lr * wd * p only where the update and the weight have the same sign (where the step already
    shrinks the weight), so decay never fights the gradient. Params are grouped by shape (one group per
    shape) so each group is orthogonalised in one batched call.
    """

    is_muon = True  # lets a training loop find the optimizer whose momentum and decay it schedules

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, weight_decay=0.0, beta2=0.9):
        params = list(params)
        if any(p.ndim != 2 for p in params):
            raise ValueError("Muon only takes 2-D matrices; give embeddings, heads and scalars to AdamW")
        shapes = sorted({tuple(p.shape) for p in params}, key=lambda s: (-s[0] * s[1], s))  # same on every rank
        groups = [dict(params=[p for p in params if tuple(p.shape) == s]) for s in shapes]
        super().__init__(groups, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                                      weight_decay=weight_decay, beta2=beta2))

    def _state(self, p):
        st = self.state[p]
        if "momentum_buffer" not in st:
            m, n = p.shape
            st["momentum_buffer"] = torch.zeros_like(p)
            st["second_moment"] = torch.zeros((m, 1) if m >= n else (1, n), dtype=torch.float32, device=p.device)
        return st

    @torch.no_grad()
    def step(self):
        rank, ws, gloo = _world()
        pending = []
        for group in self.param_groups:  # 1. start every group's gradient reduction
            ps = group["params"]
            per_rank = math.ceil(len(ps) / ws)
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in ps]
            grads += [torch.zeros_like(ps[0])] * (per_rank * ws - len(ps))
            stacked = torch.stack(grads)
            if ws > 1:
                pending.append((group, per_rank) + _launch_reduce_scatter(stacked, rank, ws, gloo))
            else:
                pending.append((group, per_rank, None, lambda s=stacked: s))
        gathers = []
        for group, per_rank, work, get in pending:  # 2. update the owned matrices as reductions land
            if work is not None:
                work.wait()
            g = get()
            ps = group["params"]
            lo, hi = rank * per_rank, min(len(ps), (rank + 1) * per_rank)
            owned = ps[lo:hi]
            if owned:
                g = g[:len(owned)]
                states = [self._state(p) for p in owned]
                bufs = [st["momentum_buffer"] for st in states]
                mom = group["momentum"]
                gs = list(g.unbind(0))
                torch._foreach_lerp_(bufs, gs, 1 - mom)  # buf = mom * buf + (1 - mom) * g
                if group["nesterov"]:
                    torch._foreach_lerp_(gs, bufs, mom)  # look ahead: g = (1 - mom) * g + mom * buf
                    upd = g
                else:
                    upd = torch.stack(bufs)
                upd = orthogonalize(upd, group["ns_steps"])
                upd = normalize_variance(upd, [st["second_moment"] for st in states], group["beta2"])
                m, n = owned[0].shape
                lr = group["lr"] * max(1.0, m / n) ** 0.5
                W = torch.stack(owned)
                upd = upd.to(W.dtype)
                if group["weight_decay"]:  # cautious: decay only where the update already shrinks |W|
                    upd = upd + group["weight_decay"] * W * ((upd * W) >= 0)
                torch._foreach_add_(owned, list(upd.unbind(0)), alpha=-lr)
            if ws > 1:  # 3. share the owned matrices (padding entries are zeros)
                shard = torch.zeros((per_rank,) + tuple(ps[0].shape), dtype=ps[0].dtype, device=ps[0].device)
                if owned:
                    shard[:len(owned)] = torch.stack(owned)
                full = torch.empty((per_rank * ws,) + tuple(ps[0].shape), dtype=shard.dtype, device=shard.device)
                gathers.append((ps, full, _launch_all_gather(full, shard, ws, gloo)))
        for ps, full, work in gathers:
            work.wait()
            torch._foreach_copy_(ps, list(full[:len(ps)].unbind(0)))


# ----------------------------------------------------------------------------- AdamW

def _adamw_foreach(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps, weight_decay):
    """Reference AdamW (decoupled weight decay), used where the fused kernel is unavailable."""
    torch._foreach_add_(steps, 1)
    for p, g, m, v, s in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
        t = s.item()
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        if weight_decay:
            p.mul_(1 - lr * weight_decay)
        denom = (v.sqrt() / math.sqrt(1 - beta2 ** t)).add_(eps)
        p.addcdiv_(m, denom, value=-lr / (1 - beta1 ** t))


def _adamw_update(*args, **kw):
    fused = getattr(torch, "_fused_adamw_", None)
    params, grads, exp_avgs, exp_avg_sqs, steps = args
    if fused is None or params[0].device.type not in ("cpu", "cuda"):
        return _adamw_foreach(*args, **kw)
    torch._foreach_add_(steps, 1)
    fused(params, grads, exp_avgs, exp_avg_sqs, [], steps, amsgrad=False, lr=kw["lr"], beta1=kw["beta1"],
          beta2=kw["beta2"], weight_decay=kw["weight_decay"], eps=kw["eps"], maximize=False,
          grad_scale=None, found_inf=None)


class AdamW(torch.optim.Optimizer):
    """AdamW with decoupled weight decay; the fused kernel on CPU and CUDA, sharded state under torchrun.

    Tensors with at least SHARD_MIN_NUMEL elements whose dim 0 divides by the world size are sharded
    along dim 0; the rest are all-reduced and updated on every rank.
    """

    SHARD_MIN_NUMEL = 16384

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    def _sharded(self, p, ws):
        return ws > 1 and p.numel() >= self.SHARD_MIN_NUMEL and p.size(0) % ws == 0

    @torch.no_grad()
    def step(self):
        rank, ws, gloo = _world()
        pending = []
        for group in self.param_groups:  # 1. start the gradient reductions
            for p in group["params"]:
                if ws == 1:
                    if p.grad is not None:
                        pending.append((group, p, None, lambda g=p.grad: g))
                    continue
                g = p.grad if p.grad is not None else torch.zeros_like(p)
                launch = _launch_reduce_scatter(g, rank, ws, gloo) if self._sharded(p, ws) \
                    else _launch_all_reduce(g, ws, gloo)
                pending.append((group, p) + launch)
        batches = {}  # group index -> lists for one fused call
        for group, p, work, get in pending:  # 2. collect the owned slices and their state
            if work is not None:
                work.wait()
            g = get()
            sl = p.chunk(ws)[rank] if self._sharded(p, ws) else p
            st = self.state[p]
            if not st:
                st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                st["exp_avg"] = torch.zeros_like(sl)
                st["exp_avg_sq"] = torch.zeros_like(sl)
            if st["step"].device != p.device:  # state loaded with map_location elsewhere
                st["step"] = st["step"].to(p.device)
            lists = batches.setdefault(id(group), (group, [], [], [], [], []))
            for lst, t in zip(lists[1:], (sl, g, st["exp_avg"], st["exp_avg_sq"], st["step"])):
                lst.append(t)
        for group, *lists in batches.values():  # 3. update
            beta1, beta2 = group["betas"]
            _adamw_update(*lists, lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                          weight_decay=group["weight_decay"])
        gathers = []
        for group in self.param_groups:  # 4. share the updated shards
            for p in group["params"]:
                if self._sharded(p, ws):
                    gathers.append(_launch_all_gather(p, p.chunk(ws)[rank].clone(), ws, gloo))
        for work in gathers:
            work.wait()
