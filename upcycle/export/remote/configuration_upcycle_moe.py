"""Configuration of a dense transformers model whose FFNs upcycle turned into Mixture-of-Experts layers.

Written by upcycle's ``hf_generic`` export. The config is
the dense family's own config, flattened (every field the family's modelling code reads is an attribute here),
plus three fields:

    dense_model_type   the dense family (``gemma2``, ``bert``, ...): its config class answers anything not stored
    dense_class        the transformers class the model is built from (``Gemma2ForCausalLM``)
    upcycle_moe        {"layers": {module name: {"moe": MoE structure, "dropout": p}}, "identity": [module names]}

``model_type`` is ``upcycle_moe`` so that loading without ``trust_remote_code=True`` fails instead of silently
building the dense family without its experts.
"""

from __future__ import annotations

import weakref

from transformers import AutoConfig, PretrainedConfig

_DENSE: dict[int, PretrainedConfig | None] = {}  # id(config) -> the dense family's config, built on first use
_UNDER_CONSTRUCTION: set[int] = set()  # ids of configs whose fields are not all set yet


class UpcycleMoEConfig(PretrainedConfig):
    model_type = "upcycle_moe"

    def __init__(self, dense_model_type: str = "", dense_class: str = "", upcycle_moe: dict | None = None, **kwargs):
        self.dense_model_type = dense_model_type
        self.dense_class = dense_class
        self.upcycle_moe = upcycle_moe or {"layers": {}, "identity": []}
        _UNDER_CONSTRUCTION.add(id(self))  # the base constructor probes attributes before every field is set
        try:
            super().__init__(**kwargs)
        finally:
            _UNDER_CONSTRUCTION.discard(id(self))

    def dense_config(self) -> PretrainedConfig | None:
        """The dense family's config with the same fields (its properties and attribute aliases included); None
        while it is being built (its constructor may probe this config's attributes)."""
        key = id(self)
        if key not in _DENSE:
            _DENSE[key] = None
            own = ("model_type", "auto_map", "upcycle_moe", "dense_model_type", "dense_class", "transformers_version")
            fields = {k: v for k, v in self.__dict__.items() if not k.startswith("_") and k not in own}
            try:
                _DENSE[key] = AutoConfig.for_model(self.dense_model_type, **fields)
            except Exception:
                del _DENSE[key]
                raise
            weakref.finalize(self, _DENSE.pop, key, None)
        return _DENSE[key]

    def __getattr__(self, name: str):
        # only reached for attributes the flattened fields lack: the family's aliases (GPT-2's hidden_size is
        # n_embd) and properties
        if name.startswith("_") or not self.__dict__.get("dense_model_type") or id(self) in _UNDER_CONSTRUCTION:
            raise AttributeError(name)
        dense = self.dense_config()
        if dense is None:
            raise AttributeError(name)
        return getattr(dense, name)
