//! KubeApiDouble: the one test double of this project, a thin stand-in for the Kubernetes API server.
