"""The names a run folder is laid out with (RUN/recipe.yaml, RUN/checkpoints/step_N/), in a module that
imports nothing, so that `config` (loaded by `smapctl --help`, which must not import torch) names them too.
"""

RUN_RECIPE = "recipe.yaml"  # the recipe as resolved, which `--resume` goes on with
CHECKPOINTS = "checkpoints"
