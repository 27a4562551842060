"""The policy models of cascade-jax (pure JAX functions over parameter pytrees)."""
