"""Faster ways to take the steps of ebt.think, each computing what the reference loop computes.

A run picks among them once: `ebt.fast.plan.resolve_plan(model, device, ...)` returns a frozen `Plan`
whose steps the trainer, the evaluation and generation pass down. Each module can be skipped by a
reader of the algorithm: plan (the choice), stepwise (one step's graph at a time in training),
vocab_side (the candidate's linear map in closed form, fused kernels), written_out (the energy's
gradient by plain operations, compilable), memory (recycled CPU tensors), cuda_graph (captured steps).
"""
