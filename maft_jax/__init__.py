"""maft_jax: a JAX-native trainer for Multiagent Finetuning (MAFT).

A population of agents is one stacked parameter pytree (leading agent axis);
see README.md for the module map.
"""

__version__ = "0.1.0"
