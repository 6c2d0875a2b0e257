//! Import into the node's containerd (the one k3s runs): images streamed out of Docker or
//! pulled from a registry, written through the Content service under a lease, recorded through
//! the Images service with the CRI labels, and unpacked client-side for the snapshotter.
