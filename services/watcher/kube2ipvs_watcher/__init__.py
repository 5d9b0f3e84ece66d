"""Watcher: the only Kubernetes client. Turns Nodes, Services, EndpointSlices and the LB ConfigMap into
normalized cluster state on NATS.

Not implemented yet: this package reserves the role's place in the layout (see the issues).
"""
