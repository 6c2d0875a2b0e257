//! A Docker registry (Debian's `docker-registry`) on loopback, for registry-pull tests.
