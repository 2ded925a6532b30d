"""Test set-up: 8 fake CPU devices, and tiny HF models/tokenizers built here.

Nothing is downloaded: each family's model is a transformers config saved
with random weights, and the tokenizer is a small BPE trained on the spot.
"""

import os

# Tiny test models spend most of their time in XLA's CPU compiler: skipping its
# expensive LLVM passes halves compile times (runtime is irrelevant here).
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8 " + FAST_COMPILE).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the whole suite, its subprocesses and
# both xdist workers: the same tiny programs are compiled by many tests and by
# every `launch.*` subprocess of the end-to-end tests. The cache only saves
# time (entries are keyed by the program, the flags and the jax version); a
# damaged entry is a warning and a recompile. MAFT_TEST_JAX_CACHE='' disables it.
_CACHE = os.environ.get("MAFT_TEST_JAX_CACHE", os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".cache", "jax"))
if _CACHE:
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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


# The longest tests (a minute or more, mostly subprocesses) start first, so
# that with `-n 2` neither worker is left running one of them alone at the end.
HEAVY = ("test_smoke_two_iterations_resume_evaluate_report",
         "test_two_processes_run_one_iteration_like_one_process",
         "test_finetune_cli_empty_file_means_no_update", "test_train_step_on_meshes_matches_one_device",
         "test_sampling_on_meshes_matches_one_device",
         "test_dry_run_refuses_one_device_and_fits_a_64_chip_mesh")


def pytest_collection_modifyitems(config, items):
  items.sort(key=lambda item: item.originalname not in HEAVY)  # stable: order kept otherwise
