"""crdtmail's benchmark suite: measurements written to bench/results/, never asserted by the tests."""
