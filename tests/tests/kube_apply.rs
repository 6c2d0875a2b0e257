//! The Kubernetes path against the API server double: filled in by the k3s executor work.
