"""Methods mixed into vLLM's worker (`LLM(worker_extension_cls=...)`, vLLM's route for RLHF weight updates) so that a
trainer can load its weights into the running engine (`LLM.collective_rpc`).

Nothing here imports vLLM: the class is imported by name inside vLLM's worker process (or in this process when the
engine runs in-process) and its methods run with the worker as `self`."""

from __future__ import annotations


class WeightSync:
    def load_named_weights(self, weights: bytes) -> int:
        """Load checkpoint-named tensors (a safetensors blob) in place through the worker's own `reload_weights`
        (vLLM maps the names, fills the fused q/k/v and gate/up shards and redoes the CPU backend's weight
        processing, which a plain `load_weights` cannot: processed parameters lose their loaders); returns how many
        were loaded."""
        from safetensors.torch import load

        tensors = load(weights)
        self.reload_weights(weights_iterator=iter(tensors.items()),  # type: ignore[attr-defined]  # the worker's
                            is_checkpoint_format=True)
        return len(tensors)
