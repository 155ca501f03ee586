"""One folder per op: `api` (public function), `reference` (plain JAX), `pallas_triton` (kernel)."""
