"""Test set-up: 8 fake CPU devices, and tiny HF models/tokenizers built here.

Nothing is downloaded: each family's model is a transformers config saved
with random weights, and the tokenizer is a small BPE trained on the spot.
The one real model comes from an installed package (tests/real_model.py).
"""

import os

# Tiny test models spend ~90% of their time in XLA's CPU compiler (runtime is
# irrelevant here). Its cheapest settings: no expensive LLVM passes, the
# classic emitters instead of the MLIR fusion emitters, one codegen module
# (not split for threads that two busy cores do not have). Measured on
# tests/test_sampling.py alone, 2 cores, jax 0.10: 74 CPU-s with the first two
# flags, 28 with all four (backend compile 47 s -> 13 s).
FAST_COMPILE = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                "--xla_cpu_use_fusion_emitters=false --xla_cpu_parallel_codegen_split_count=1")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8 " + FAST_COMPILE).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One torch (OpenMP) thread, here and in launch.* subprocesses, which inherit
# it (XLA ignores it): the suite keeps both cores busy with several processes,
# where a second intra-op thread of the parity references only spins.
# SmolLM2's greedy reference took 61 CPU-s inside the suite, 15 alone on one thread.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

from tests import hf_fixtures  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
  return hf_fixtures.make_tokenizer(str(tmp_path_factory.mktemp("tokenizer")))


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory, tokenizer_dir):
  """family -> directory of a tiny float32 HF model (built lazily, once)."""
  cache = {}

  def get(family):
    if family not in cache:
      cache[family] = hf_fixtures.make_model(
          family, str(tmp_path_factory.mktemp(family)), tokenizer_dir)
    return cache[family]
  return get


@pytest.fixture(scope="session")
def smollm2_dir():
  """The float32 HF directory of SmolLM2-135M-Instruct (tests/real_model.py)."""
  from tests import real_model
  return real_model.hf_dir()


# The longest chains start first, so that no worker is left running one alone
# at the end: the real-model group (conversion, then four tests on one worker),
# the two-process run, and the shared smoke run with its longest reader.
FIRST = ("tests/test_smollm2.py::", "::test_two_processes_run_one_iteration_like_one_process",
         "::test_killed_between_stages_and_mid_finetune_resumes_to_the_same_records")


def pytest_collection_modifyitems(config, items):
  def rank(item):
    return next((i for i, part in enumerate(FIRST) if part in item.nodeid), len(FIRST))
  items.sort(key=rank)  # stable: the rest keep their order
