"""Ember: an O(V + D)-state optimizer for token tables, integrated with DeepSpeed ZeRO and
megatron-core vocab parallelism.

    from ember_ds import Ember
    opt = Ember(model, lr=1e-3)            # tables -> Ember, the rest -> AdamW

Importing the package registers ``"optimizer": {"type": "Ember"}`` with DeepSpeed;
``ember_ds.register_deepspeed()`` does the same explicitly (idempotent).
"""
from .deepspeed_integration import disable_cpu_shm_build, register_deepspeed
from .optimizer import NORMALIZATIONS, Ember, state_bytes
from .tables import (TableMeta, is_token_table, mark_not_token_table, mark_token_table,
                     tag_module_tables)

register_deepspeed()

__all__ = ["Ember", "NORMALIZATIONS", "TableMeta", "disable_cpu_shm_build", "is_token_table",
           "mark_not_token_table", "mark_token_table", "register_deepspeed", "state_bytes",
           "tag_module_tables"]
