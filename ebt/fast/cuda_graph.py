"""CUDA graphs: a step captured once and replayed, so the CPU stops launching its kernels one by one."""

from __future__ import annotations

import torch

from ebt.errors import ConfigError
from ebt.recipe import draw_steps, step_range


def capture_cuda_graph(fn, warmup: int = 2):
    """Run fn() `warmup` times on a side stream, then capture one call as a CUDA graph: returns (graph,
    its output). A replay reruns every kernel on the same memory without the CPU launching them one by
    one."""
    return capture_cuda_graphs([fn], warmup)[0]


def capture_cuda_graphs(fns, warmup: int = 2, warmup_fns=None, release: bool = False,
                        error_mode: str = "global") -> list:
    """Graphs that never run at the same time (e.g. one per step count), each replay's outputs used before
    the next replay (a replay may overwrite the other graphs' outputs): each of `warmup_fns` (default
    fns) run `warmup` times on a side stream, then each of fns captured, all into one memory pool.
    Returns [(graph, its output)]. Every warm-up comes before any capture, so a warm-up never runs
    beside an earlier graph's memory; with `release` the allocator's cache is emptied in between, so the
    warm-ups' memory is not held beside the graphs' pool either (a training step's: gigabytes; a decode
    step's is not worth the synchronisation). autocast's weight-cast cache stays off meanwhile (its
    copies would be freed under the graph). error_mode: torch.cuda.graph's capture_error_mode ("global":
    an unsafe CUDA call from any thread breaks the capture; "thread_local": from this thread only)."""
    cast = lambda: torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"),  # noqa: E731
                                  enabled=torch.is_autocast_enabled("cuda"), cache_enabled=False)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), cast():
        for f in warmup_fns or fns:
            for _ in range(warmup):
                f()
    torch.cuda.current_stream().wait_stream(side)
    if release:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    out, pool = [], None
    for fn in fns:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, capture_error_mode=error_mode), cast():
            out.append((graph, fn()))
        pool = pool if pool is not None else graph.pool()
    return out


def draws_in_step(ebt_cfg) -> bool:
    """Whether a recipe's training step draws random numbers or reads the replay buffer (System 2's: random
    step counts or step sizes, Langevin noise, replayed rows): what a capture has not yet been shown to
    handle on a GPU (issue 23)."""
    return ebt_cfg is not None and (ebt_cfg.rand_steps > 0 or ebt_cfg.alpha_rand_scale > 1
                                    or ebt_cfg.langevin > 0 or ebt_cfg.replay_buffer > 0)


UNPROVEN = ("--cuda-graph with this recipe (random step counts or step sizes, Langevin noise or a replay "
            "buffer: System 2's) is not yet proven on a GPU, where its capture failed; train without "
            "--cuda-graph (--compile still applies), or use a recipe without them (--recipe s1)")


class CapturedStep:
    """One training micro-step (forward and backward, e.g. ebt.objective.train_step) captured as a CUDA
    graph and replayed. An EBT step launches thousands of small kernels (every layer, every unroll step, the
    second-order terms) and the CPU cannot issue them as fast as the GPU runs them; a replay issues them
    all at once. A graph needs the same shapes every call, no host synchronisation and no host-side
    randomness, so System 2's recipe is met this way:
    - a random step schedule (a count, or with several landscapes a count per landscape) is drawn here on
      the host (as the step itself would draw it), and each possible schedule gets its own graph, all
      captured at once into one memory pool (they never run at the same time);
    - the replay buffer samples and writes on the device (ebt.models.ebt.ReplayBuffer); until it is full
      the number of replayed rows and the rows to sample from change, so those steps run eagerly;
    - the warm-ups before the captures push no rows (`paused`): the replay after capture is the step;
      the allocator's cache (the eager steps' and warm-ups' memory) is emptied before the captures.
    A replay's outputs (its losses and the gradients it binds to .grad) last until the next replay: the
    graphs share their pool, so another count's graph writes its temporaries over them. Use them first
    (clip, optimizer step, summed logs), as the training loop does; clone what must outlive the step.
    `capture` is the capturing function (`capture_cuda_graphs`; tests pass a stand-in on CPU)."""

    def __init__(self, model: torch.nn.Module, step, warmup: int = 2, capture=capture_cuda_graphs):
        device = next(model.parameters()).device
        if capture is capture_cuda_graphs and device.type != "cuda":
            raise ConfigError(f"--cuda-graph needs a CUDA device, and the model is on {device}: drop "
                              f"--cuda-graph or train with --device cuda")
        self.model, self.step, self.warmup, self.capture = model, step, warmup, capture
        self.recipe = getattr(getattr(model, "cfg", None), "ebt", None)
        self.replay = getattr(model, "replay", None)
        # drawn schedule (None: the recipe's fixed one) -> (graph, (outputs, parameter grads))
        self.graphs = {}

    def counts(self) -> list:
        """Every step schedule the recipe can draw (None: it draws none)."""
        e = self.recipe
        return list(step_range(e)) if e is not None and e.rand_steps else [None]

    def __call__(self, batch: torch.Tensor, **kw) -> dict:
        if self.recipe is not None and self.recipe.rand_steps:
            kw = {**kw, "n_steps": draw_steps(self.recipe, self.model.training)}
        if self.replay is not None and self.model.training and len(self.replay) < self.replay.capacity:
            return self.step(batch, **kw)  # still filling: eager
        if not self.graphs:
            self._capture(batch, kw)
        graph, (out, grads) = self.graphs[kw.get("n_steps")]
        self.static_batch.copy_(batch)
        graph.replay()
        for p, g in zip(self.params, grads):  # the optimizer may have unbound them (set_to_none)
            p.grad = g
        return out

    def _capture(self, batch, kw) -> None:
        self.static_batch = batch.clone()  # the input of every graph, allocated outside their pool
        self.params = [p for p in self.model.parameters() if p.requires_grad]

        def run(n):
            def fn():
                for p in self.params:  # captured from no gradient: each replay writes fresh ones
                    p.grad = None
                out = self.step(self.static_batch, **{**kw, **({} if n is None else {"n_steps": n})})
                return out, [p.grad for p in self.params]
            return fn

        def warm(n):
            def fn():
                if self.replay is not None:
                    self.replay.paused = True
                try:
                    return run(n)()
                finally:
                    if self.replay is not None:
                        self.replay.paused = False
            return fn

        counts = self.counts()
        graphs = self.capture([run(n) for n in counts], self.warmup, warmup_fns=[warm(n) for n in counts],
                              release=True)
        self.graphs = dict(zip(counts, graphs))
