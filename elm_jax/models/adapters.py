"""The name gin files bind expert configurations by (`adapters.ExpertConfig.kind = 'lora'`, with
`import elm_jax.models.adapters as adapters`): the kinds of experts and `ExpertConfig` live in
`elm_jax.models.experts`, one module per kind; this module only names them for gin files and
scripts written before."""

from elm_jax.models.experts import (ExpertConfig, ExpertConfigError, count_parameters, merge_params,
                                    split_params)

__all__ = ["ExpertConfig", "ExpertConfigError", "count_parameters", "merge_params",
           "split_params"]
