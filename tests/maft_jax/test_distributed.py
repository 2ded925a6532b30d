"""maft_jax.distributed: the flags of a multi-process run are checked before
joining."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maft_jax import distributed


def test_distributed_flags_are_checked_before_joining():
  with pytest.raises(ValueError, match="give all of --coordinator_address"):
    distributed.initialize("localhost:1234", None, 0)
  with pytest.raises(ValueError, match=r"--process_id=2 must be in \[0, --num_processes=2\)"):
    distributed.initialize("localhost:1234", 2, 2)
  distributed.initialize("localhost:1234", 1, 0)  # one process: nothing to join
  assert jax.process_count() == 1 and distributed.is_primary()
  x = np.arange(4.0)
  np.testing.assert_array_equal(distributed.to_host(jnp.asarray(x)), x)
